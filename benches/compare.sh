#!/usr/bin/env bash
# pgbench -S through no proxy, PgBouncer and pgsluice, interleaved, medians of REPS rounds.
#
# Usage: benches/compare.sh            (from the repository root, as root)
# Knobs (environment):
#   DUR=10         seconds per pgbench run
#   REPS=3         rounds; each round runs every (mode, clients, target) once
#   CLIENTS="8 32 128"   pgbench -c values
#   MODES="simple extended"   pgbench -M values
#   TARGETS="direct pgbouncer pgsluice"
#   POOL=16        server connections of each proxy
#   SCALE=10       pgbench -i scale
#   PREPARED=1     also run -M prepared against pgsluice (PgBouncer 1.18 cannot pool it)
#   QUICK=1        smoke run: DUR=1 REPS=1 CLIENTS=8 MODES=simple SCALE=1
#   SKIP_BUILD=1   use the existing target/release/pgsluice
#   PGSLUICE_ARGS="..."  extra pgsluice flags (e.g. "--max-queue 5000 --queue-timeout 30s")
#   OUT_DIR=bench-results
#   STRICT=1       exit non-zero when any pgbench run failed, aborted or completed nothing
# The open-files limit is raised to the hard limit: 128 clients need 128 descriptors in
# pgbench and in each proxy, plus the proxies' server side.
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ ${QUICK:-0} == 1 ]]; then
    DUR=${DUR:-1} REPS=${REPS:-1} CLIENTS=${CLIENTS:-8} MODES=${MODES:-simple} SCALE=${SCALE:-1}
fi
DUR=${DUR:-10}
REPS=${REPS:-3}
CLIENTS=${CLIENTS:-"8 32 128"}
MODES=${MODES:-"simple extended"}
TARGETS=${TARGETS:-"direct pgbouncer pgsluice"}
POOL=${POOL:-16}
SCALE=${SCALE:-10}
PREPARED=${PREPARED:-0}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench-results}

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
for t in $TARGETS; do
    case $t in direct | pgbouncer | pgsluice) ;; *) die "unknown target $t" ;; esac
done

trap bench_cleanup EXIT
trap 'exit 130' INT TERM
raise_nofile 65536

if [[ " $TARGETS " == *" pgsluice "* && ${SKIP_BUILD:-0} != 1 ]]; then
    log "building pgsluice (release)"
    (cd "$REPO_DIR" && cargo build --release --bin pgsluice -q)
fi

bench_workdir
PGPORT=$(free_port)
start_postgres "$PGPORT"
log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

declare -A PORT PID
PORT[direct]=$PGPORT
PID[direct]=""
if [[ " $TARGETS " == *" pgbouncer "* ]]; then
    PORT[pgbouncer]=$(free_port)
    start_pgbouncer "${PORT[pgbouncer]}" "$PGPORT" "$POOL" 1000
    PID[pgbouncer]=$PGBOUNCER_PID
fi
if [[ " $TARGETS " == *" pgsluice "* ]]; then
    PORT[pgsluice]=$(free_port)
    read -r -a PGSLUICE_EXTRA <<<"${PGSLUICE_ARGS:-}"
    start_pgsluice "${PORT[pgsluice]}" "$PGPORT" "$POOL" "${PGSLUICE_EXTRA[@]}"
    PID[pgsluice]=$PGSLUICE_PID
fi

mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT_DIR/compare-$STAMP.tsv"
TABLE="$OUT_DIR/compare-$STAMP.md"
printf 'target\tmode\tclients\trep\ttps\tlat_avg_ms\tp99_ms\tproxy_cpu_s\ttxns\tfailed\taborted\tclients_aborted\n' >"$RAW"

# One pgbench run; appends a raw row.
run_one() {
    local target=$1 mode=$2 clients=$3 rep=$4
    local out="$WORK/run.out" logdir="$WORK/txlog" pid=${PID[$target]} cpu0=0 cpu1=0
    rm -rf "$logdir" && mkdir -p "$logdir"
    [[ -n $pid ]] && cpu0=$(proc_cpu_seconds "$pid")
    if ! pgbench -n -S -j 2 -c "$clients" -T "$DUR" -M "$mode" --log --log-prefix="$logdir/tx" \
        -h 127.0.0.1 -p "${PORT[$target]}" -U postgres postgres >"$out" 2>&1; then
        log "pgbench failed: $target $mode c=$clients"
        tail -5 "$out" >&2
    fi
    [[ -n $pid ]] && cpu1=$(proc_cpu_seconds "$pid")
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        die "$target (pid $pid) exited during the run"
    fi
    local gone
    gone=$(grep -cE 'client [0-9]+ script [0-9]+ aborted' "$out" || true)
    local tps lat txns p99 cpu failed aborted=0
    # pgbench prints partial figures for a run whose clients aborted; keep them but flag it.
    if grep -q 'Run was aborted' "$out"; then
        aborted=1
        log "aborted run: $target -M $mode -c $clients: $(grep -m1 'error:' "$out" || true)"
    fi
    tps=$(awk '/^tps = / { print $3; exit }' "$out")
    lat=$(awk '/^latency average = / { print $4; exit }' "$out")
    txns=$(awk '/number of transactions actually processed:/ { print $NF; exit }' "$out")
    failed=$(awk '/number of failed transactions:/ { print $5; exit }' "$out")
    # Per-transaction log: field 3 is the latency in microseconds.
    p99=$(cat "$logdir"/tx* 2>/dev/null | awk '{ print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR) { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", v[i] / 1000 } }')
    if [[ -n $pid ]]; then
        cpu=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }')
    else
        cpu=""
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$mode" "$clients" "$rep" \
        "${tps:-0}" "${lat:-}" "${p99:-}" "$cpu" "${txns:-0}" "${failed:-0}" "$aborted" "${gone:-0}" >>"$RAW"
    log "$target -M $mode -c $clients rep $rep: tps=${tps:-0} lat=${lat:-?}ms p99=${p99:-?}ms cpu=${cpu:--}s"
}

runs=0
for rep in $(seq 1 "$REPS"); do
    for mode in $MODES; do
        for clients in $CLIENTS; do
            for target in $TARGETS; do
                run_one "$target" "$mode" "$clients" "$rep"
                runs=$((runs + 1))
            done
        done
    done
    if [[ $PREPARED == 1 && -n ${PORT[pgsluice]:-} ]]; then
        for clients in $CLIENTS; do
            run_one pgsluice prepared "$clients" "$rep"
            runs=$((runs + 1))
        done
    fi
done

bash "$BENCH_DIR/compare_report.sh" "$RAW" "$DUR" "$SCALE" "$POOL" "$REPS" >"$TABLE"
cat "$TABLE"
log "wrote $TABLE ($runs runs)"
if [[ ${STRICT:-0} == 1 ]]; then
    bad=$(tail -n +2 "$RAW" | awk -F'\t' '$9 == 0 || $10 > 0 || $11 > 0' | wc -l)
    [[ $bad == 0 ]] || die "$bad run(s) failed, aborted or completed no transaction"
fi
