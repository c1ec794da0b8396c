#!/usr/bin/env bash
# A database with a hidden knee, and what the concurrency limit makes of it.
#
# The workload: every query calls knee_work(), which counts the knee_work() queries running
# at that moment (n, from pg_stat_activity) and sleeps BASE_MS * (1 + FALL * max(0, n - KNEE)^2).
# Up to KNEE running queries the database scales; past it each extra query slows every other
# one quadratically (a lock convoy, or a working set that no longer fits), so throughput
# *falls*. pgsluice is not told KNEE. Sleep-based, so the figures do not depend on how busy
# this machine's CPUs are.
#
# Phases (PHASES, default "sweep shift select closed"):
#   sweep   pgbench -c CLIENTS through pgsluice at each static --max-active in LIMITS and
#           with --max-active auto, interleaved over ROUNDS rounds; goodput (TPS) and p99.
#   shift   --max-active auto for 3*SHIFT_SECS; in the middle third SIDE clients run the
#           same queries directly (a side load the proxy cannot see): the knee left to the
#           proxy moves from KNEE to KNEE - SIDE and back. The limit is sampled every 0.5 s.
#   select  pgbench -S at -c 8 and 32 (pool 16): each static limit in SELECT_LIMITS and auto.
#   closed  40 clients looping SELECT pg_sleep(0.2), pool 4, --max-queue 1000
#           --queue-timeout 10s: --max-active 4 and auto; then pgbench -S -c 128 over a pool
#           of 16, --max-active 16 and auto; refusals counted from /metrics.
#
# Usage (as root): benches/knee.sh
#   CLIENTS (48), POOL (32), LIMITS ("2 4 6 8 10 12 16 32"), KNEE (8), BASE_MS (20),
#   FALL (0.05), SECS (12), ROUNDS (3), SHIFT_SECS (15), SIDE (4), SELECT_LIMITS ("2 4 8 16"),
#   SELECT_SECS (10), SKIP_BUILD=1, OUT_DIR (bench-results).
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PHASES=${PHASES:-sweep shift select closed}
CLIENTS=${CLIENTS:-48}
POOL=${POOL:-32}
LIMITS=${LIMITS:-2 4 6 8 10 12 16 32}
KNEE=${KNEE:-8}
BASE_MS=${BASE_MS:-20}
FALL=${FALL:-0.05}
SECS=${SECS:-12}
ROUNDS=${ROUNDS:-3}
SHIFT_SECS=${SHIFT_SECS:-15}
SIDE=${SIDE:-4}
SELECT_LIMITS=${SELECT_LIMITS:-2 4 8 16}
SELECT_SECS=${SELECT_SECS:-10}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench-results}

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
for tool in initdb pg_ctl pgbench psql setpriv ss curl; do
    command -v "$tool" >/dev/null || die "missing $tool"
done
raise_nofile 65536
trap bench_cleanup EXIT
bench_workdir
cd "$REPO_DIR"
if [[ -z ${SKIP_BUILD:-} ]]; then
    log "build: cargo build --release --bin pgsluice"
    cargo build --release --bin pgsluice -q
fi
BUILD="$(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
REPORT="$OUT_DIR/knee-$STAMP.md"

PGPORT=$(free_port)
start_postgres "$PGPORT"
psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -qX -v ON_ERROR_STOP=1 <<SQL
CREATE FUNCTION knee_work() RETURNS void LANGUAGE plpgsql AS \$\$
DECLARE n int;
BEGIN
    SELECT count(*) INTO n FROM pg_stat_activity
        WHERE state = 'active' AND query LIKE 'SELECT knee_work()%';
    PERFORM pg_sleep($BASE_MS / 1000.0 * (1 + $FALL * greatest(0, n - $KNEE) ^ 2));
END \$\$;
SQL
KNEE_SQL="$WORK/knee.sql"
echo 'SELECT knee_work();' >"$KNEE_SQL"
SLEEP_SQL="$WORK/sleep.sql"
echo 'SELECT pg_sleep(0.2);' >"$SLEEP_SQL"
chmod 644 "$KNEE_SQL" "$SLEEP_SQL"
if [[ " $PHASES " == *" select "* || " $PHASES " == *" closed "* ]]; then
    pgbench -i -q -s 10 -h 127.0.0.1 -p "$PGPORT" -U postgres postgres >/dev/null 2>&1
fi

# metric PORT NAME: the sum of a metric's samples on a pgsluice admin port.
metric() {
    curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%g", s }'
}

# bench PORT CLIENTS SECS SCRIPT|-S -> "tps p99_ms aborted_clients"
bench() {
    local port=$1 c=$2 secs=$3 script=$4 out="$WORK/run.out" logdir="$WORK/txlog" tps p99 gone
    rm -rf "$logdir" && mkdir -p "$logdir"
    local what=(-f "$script")
    [[ $script == -S ]] && what=(-S)
    pgbench -n "${what[@]}" -c "$c" -j 2 -T "$secs" --log --log-prefix="$logdir/tx" \
        -h 127.0.0.1 -p "$port" -U postgres postgres >"$out" 2>&1 || true
    tps=$(awk '/^tps = / { print $3; exit }' "$out")
    p99=$(cat "$logdir"/tx* 2>/dev/null | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR) { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.1f", v[i] / 1000 } }')
    gone=$(grep -cE 'client [0-9]+ script [0-9]+ aborted' "$out" || true)
    echo "${tps:-0} ${p99:--} ${gone:-0}"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# proxy NAME POOL FLAGS...: starts one pgsluice; its ports go to PORT[NAME], ADMIN[NAME].
declare -A PORT ADMIN
proxy() {
    local name=$1 pool=$2
    shift 2
    PORT[$name]=$(free_port)
    start_pgsluice "${PORT[$name]}" "$PGPORT" "$pool" --max-queue 10000 --queue-timeout 30s "$@"
    ADMIN[$name]=$PGSLUICE_ADMIN
}

{
    echo "# Hidden-knee benchmark, build $BUILD, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "knee_work(): ${BASE_MS} ms * (1 + $FALL * max(0, running - $KNEE)^2); $(nproc) cores."
} >"$REPORT"

if [[ " $PHASES " == *" sweep "* ]]; then
    names=()
    for l in $LIMITS; do
        proxy "static $l" "$POOL" --max-active "$l"
        names+=("static $l")
    done
    proxy auto "$POOL" --max-active auto
    names+=(auto)
    declare -A TPS=() P99=() GONE=()
    for ((r = 1; r <= ROUNDS; r++)); do
        for n in "${names[@]}"; do
            read -r tps p99 gone < <(bench "${PORT[$n]}" "$CLIENTS" "$SECS" "$KNEE_SQL")
            TPS[$n]+="$tps "
            P99[$n]+="$p99 "
            GONE[$n]=$((${GONE[$n]:-0} + gone))
            log "sweep round $r $n: tps=$tps p99=${p99}ms aborted=$gone"
        done
    done
    {
        echo
        echo "## Sweep: pgbench -c $CLIENTS -T $SECS -f knee.sql, pool $POOL, median of $ROUNDS interleaved rounds"
        echo
        echo "| --max-active | goodput (TPS) | p99 ms | TPS of each round | aborted clients | limit at end |"
        echo "|---|---|---|---|---|---|"
        for n in "${names[@]}"; do
            tps=$(tr ' ' '\n' <<<"${TPS[$n]}" | grep . | median)
            p99=$(tr ' ' '\n' <<<"${P99[$n]}" | grep . | median)
            each=$(awk '{ for (i = 1; i <= NF; i++) printf "%s%.0f", (i > 1 ? " / " : ""), $i }' <<<"${TPS[$n]}")
            lim=$(metric "${ADMIN[$n]}" pgsluice_concurrency_limit)
            printf '| %s | %.0f | %s | %s | %s | %s |\n' "${n#static }" "$tps" "$p99" "$each" "${GONE[$n]}" "$lim"
        done
    } >>"$REPORT"
fi

if [[ " $PHASES " == *" shift "* ]]; then
    proxy shift "$POOL" --max-active auto
    csv="$OUT_DIR/knee-shift-$STAMP.csv"
    echo "seconds,limit,base_limit,throughput" >"$csv"
    total=$((3 * SHIFT_SECS))
    pgbench -n -f "$KNEE_SQL" -c "$CLIENTS" -j 2 -T "$total" -h 127.0.0.1 -p "${PORT[shift]}" \
        -U postgres postgres >"$WORK/shift.out" 2>&1 &
    load=$!
    (sleep "$SHIFT_SECS" && pgbench -n -f "$KNEE_SQL" -c "$SIDE" -j 1 -T "$SHIFT_SECS" \
        -h 127.0.0.1 -p "$PGPORT" -U postgres postgres >"$WORK/side.out" 2>&1) &
    side=$!
    t0=$(date +%s.%N)
    for ((i = 0; i < total * 2; i++)); do
        t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        printf '%s,%s,%s,%s\n' "$t" "$(metric "${ADMIN[shift]}" pgsluice_concurrency_limit)" \
            "$(metric "${ADMIN[shift]}" pgsluice_limiter_base_limit)" \
            "$(metric "${ADMIN[shift]}" pgsluice_limiter_throughput)" >>"$csv"
        sleep 0.5
    done
    wait "$load" "$side" || true
    {
        echo
        echo "## Shift: --max-active auto, pgbench -c $CLIENTS; $SIDE direct clients of the same load from ${SHIFT_SECS} s to $((2 * SHIFT_SECS)) s"
        echo
        echo "Base limit (between probes) over time, one character per 0.5 s, as a digit"
        echo "or letter (a = 10, b = 11, ...); the full series is in \`$(basename "$csv")\`."
        echo
        echo '```'
        awk -F, 'NR > 1 { v = int($3); printf "%s", (v < 10 ? v : sprintf("%c", 87 + v)); if ((NR - 1) % 30 == 0) printf "\n" } END { print "" }' "$csv"
        echo '```'
        for part in 1 2 3; do
            lo=$(((part - 1) * SHIFT_SECS + SHIFT_SECS / 2))
            hi=$((part * SHIFT_SECS))
            awk -F, -v lo="$lo" -v hi="$hi" -v p="$part" 'NR > 1 && $1 >= lo && $1 < hi { s += $3; n++ }
                END { if (n) printf "- third %d, seconds %d-%d: mean base limit %.1f\n", p, lo, hi, s / n }' "$csv"
        done
        echo "- proxy load TPS over the whole run: $(awk '/^tps = / { print $3; exit }' "$WORK/shift.out")"
    } >>"$REPORT"
fi

if [[ " $PHASES " == *" select "* ]]; then
    names=()
    for l in $SELECT_LIMITS; do
        proxy "select $l" 16 --max-active "$l"
        names+=("select $l")
    done
    proxy "select auto" 16 --max-active auto
    names+=("select auto")
    {
        echo
        echo "## pgbench -S -T $SELECT_SECS, pool 16, scale 10 (median of $ROUNDS interleaved rounds)"
        echo
        echo "| clients | --max-active | TPS | p99 ms | limit at end |"
        echo "|---|---|---|---|---|"
    } >>"$REPORT"
    for c in 8 32; do
        declare -A STPS=() SP99=()
        for ((r = 1; r <= ROUNDS; r++)); do
            for n in "${names[@]}"; do
                read -r tps p99 _ < <(bench "${PORT[$n]}" "$c" "$SELECT_SECS" -S)
                STPS[$n]+="$tps "
                SP99[$n]+="$p99 "
                log "select -c $c round $r $n: tps=$tps p99=${p99}ms"
            done
        done
        for n in "${names[@]}"; do
            tps=$(tr ' ' '\n' <<<"${STPS[$n]}" | grep . | median)
            p99=$(tr ' ' '\n' <<<"${SP99[$n]}" | grep . | median)
            printf '| %s | %s | %.0f | %s | %s |\n' "$c" "${n#select }" "$tps" "$p99" \
                "$(metric "${ADMIN[$n]}" pgsluice_concurrency_limit)" >>"$REPORT"
        done
        unset STPS SP99
    done
fi

if [[ " $PHASES " == *" closed "* ]]; then
    {
        echo
        echo "## Closed loop: 40 clients looping SELECT pg_sleep(0.2) for 10 s, pool 4, --max-queue 1000 --queue-timeout 10s"
        echo
        echo "| --max-active | TPS | refused (pgsluice_shed_total) | aborted clients |"
        echo "|---|---|---|---|"
    } >>"$REPORT"
    for l in 4 auto; do
        port=$(free_port)
        start_pgsluice "$port" "$PGPORT" 4 --max-active "$l" --max-queue 1000 --queue-timeout 10s
        read -r tps _ gone < <(bench "$port" 40 10 "$SLEEP_SQL")
        shed=$(metric "$PGSLUICE_ADMIN" pgsluice_shed_total)
        printf '| %s | %s | %s | %s |\n' "$l" "$tps" "$shed" "$gone" >>"$REPORT"
        log "closed --max-active $l: tps=$tps shed=$shed aborted=$gone"
    done
    {
        echo
        echo "## Closed loop: pgbench -S -c 128 -T 10, pool 16, other settings default"
        echo
        echo "| --max-active | TPS | refused (pgsluice_shed_total) | aborted clients |"
        echo "|---|---|---|---|"
    } >>"$REPORT"
    for l in 16 auto; do
        port=$(free_port)
        start_pgsluice "$port" "$PGPORT" 16 --max-active "$l"
        read -r tps _ gone < <(bench "$port" 128 10 -S)
        shed=$(metric "$PGSLUICE_ADMIN" pgsluice_shed_total)
        printf '| %s | %.0f | %s | %s |\n' "$l" "$tps" "$shed" "$gone" >>"$REPORT"
        log "closed -S -c 128 --max-active $l: tps=$tps shed=$shed aborted=$gone"
    done
fi

cat "$REPORT"
log "wrote $REPORT"
