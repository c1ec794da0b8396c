#!/usr/bin/env bash
# Explicit transactions with more clients than server connections: pgbench running
# `BEGIN; SELECT 1; SELECT 2; COMMIT` directly and through pgsluice (transaction mode, pool 4)
# at several --max-active settings, and through PgBouncer with the same pool, interleaved, each cell checked for failed and aborted
# clients. A pool that deadlocks shows up as aborted clients and a TPS near zero.
#
# Usage (as root): benches/tx_pgbench.sh [--quick]
#   SECS (default 5), CLIENTS (default "16 64"), POOL (default 4), ROUNDS (default 3: the
#   median of ROUNDS runs is reported), SKIP_BUILD=1 to reuse target/release/pgsluice.
# Exits non-zero if any run through pgsluice had a failed transaction or an aborted client.
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECS=${SECS:-5}
CLIENTS=${CLIENTS:-16 64}
POOL=${POOL:-4}
ROUNDS=${ROUNDS:-3}
if [[ ${1:-} == --quick ]]; then
    SECS=2
    CLIENTS=16
    ROUNDS=1
fi
# Name and extra pgsluice flags of each configuration ("" = the defaults).
CONFIGS=("max-active 4|--max-active 4" "max-active 8|--max-active 8"
    "max-active 16|--max-active 16" "defaults|")

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
for tool in initdb pg_ctl pgbench psql setpriv ss; do
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

PGPORT=$(free_port)
start_postgres "$PGPORT"
SCRIPT="$WORK/tx.sql"
printf 'BEGIN;\nSELECT 1;\nSELECT 2;\nCOMMIT;\n' >"$SCRIPT"
chmod 644 "$SCRIPT"

declare -A PROXY_PORT
# PgBouncer with the same pool, for what a pool of $POOL allows at all (when installed).
TARGETS=(direct)
if command -v pgbouncer >/dev/null; then
    PROXY_PORT[pgbouncer]=$(free_port)
    start_pgbouncer "${PROXY_PORT[pgbouncer]}" "$PGPORT" "$POOL" 1000
    TARGETS+=(pgbouncer)
fi
for cfg in "${CONFIGS[@]}"; do
    name=${cfg%%|*}
    flags=${cfg#*|}
    port=$(free_port)
    # shellcheck disable=SC2086
    start_pgsluice "$port" "$PGPORT" "$POOL" $flags
    PROXY_PORT[$name]=$port
    TARGETS+=("$name")
done

# run PORT CLIENTS -> "tps failed aborted"
run() {
    local port=$1 c=$2 out tps failed aborted
    out=$(pgbench -n -f "$SCRIPT" -c "$c" -j 2 -T "$SECS" -h 127.0.0.1 -p "$port" -U postgres postgres 2>&1) || true
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out" | head -1)
    aborted=$(grep -c 'aborted in command' <<<"$out" || true)
    echo "${tps:-0} ${failed:-0} ${aborted:-0}"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

bad=0
printf '| clients | target | TPS (median of %s) | vs direct | failed | aborted clients |\n' "$ROUNDS"
printf '|---|---|---|---|---|---|\n'
for c in $CLIENTS; do
    declare -A TPS=() FAILED=() ABORTED=()
    for ((r = 0; r < ROUNDS; r++)); do
        # Interleaved: every target once per round, so machine noise hits all alike.
        for target in "${TARGETS[@]}"; do
            if [[ $target == direct ]]; then port=$PGPORT; else port=${PROXY_PORT[$target]}; fi
            read -r tps failed aborted < <(run "$port" "$c")
            TPS[$target]+="$tps "
            # A run that completed nothing (no tps line: pgbench could not connect) fails too.
            if [[ $target != direct && $target != pgbouncer ]] && awk -v t="$tps" 'BEGIN { exit !(t <= 0) }'; then
                bad=1
            fi
            FAILED[$target]=$((${FAILED[$target]:-0} + failed))
            ABORTED[$target]=$((${ABORTED[$target]:-0} + aborted))
        done
    done
    direct=$(tr ' ' '\n' <<<"${TPS[direct]}" | grep . | median)
    for target in "${TARGETS[@]}"; do
        tps=$(tr ' ' '\n' <<<"${TPS[$target]}" | grep . | median)
        ratio=$(awk -v a="$tps" -v b="$direct" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
        printf '| %s | %s | %.0f | %s | %s | %s |\n' "$c" "$target" "$tps" "$ratio" \
            "${FAILED[$target]}" "${ABORTED[$target]}"
        if [[ $target != direct && $target != pgbouncer ]] && ((FAILED[$target] + ABORTED[$target] > 0)); then
            bad=1
        fi
    done
done
log "build: $(git -C "$REPO_DIR" rev-parse --short HEAD)$(git -C "$REPO_DIR" diff --quiet || echo '+dirty')"
if ((bad)); then
    log "FAIL: transactions failed or clients aborted through pgsluice"
    exit 1
fi
