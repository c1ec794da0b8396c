#!/usr/bin/env bash
# Starts a throwaway PostgreSQL (pgbench scale SCALE), PgBouncer and pgsluice, then runs the
# outage replay against all of them in one run. Extra arguments go to outage_replay.
#
# Usage: benches/outage.sh [outage_replay args...]      e.g. benches/outage.sh --step 5s
#        benches/outage.sh --quick                        (seconds-long smoke)
# Knobs: TARGETS="direct pgbouncer pgsluice"  POOL=16  SCALE=10  OUT_DIR=bench-results
#        SKIP_BUILD=1  PGSLUICE_ARGS="..." (extra pgsluice flags)
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TARGETS=${TARGETS:-"direct pgbouncer pgsluice"}
POOL=${POOL:-16}
SCALE=${SCALE:-10}
OUT_DIR=${OUT_DIR:-$REPO_DIR/bench-results}
read -r -a PGSLUICE_EXTRA <<<"${PGSLUICE_ARGS:-}"

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
raise_nofile 65536

if [[ ${SKIP_BUILD:-0} != 1 && " $TARGETS " == *" pgsluice "* ]]; then
    log "building pgsluice (release)"
    (cd "$REPO_DIR" && cargo build --release --bin pgsluice -q)
fi
REPLAY=$(bench_exe outage_replay)

bench_workdir
PGPORT=$(free_port)
start_postgres "$PGPORT"
log "pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

DIRECT="postgres://postgres@127.0.0.1:$PGPORT/postgres"
ARGS=(--monitor "$DIRECT" --out-dir "$OUT_DIR")
for t in $TARGETS; do
    case $t in
        direct) ARGS+=(--target "direct=$DIRECT") ;;
        pgbouncer)
            port=$(free_port)
            start_pgbouncer "$port" "$PGPORT" "$POOL" 2000
            ARGS+=(--target "pgbouncer=postgres://postgres@127.0.0.1:$port/postgres")
            ;;
        pgsluice)
            port=$(free_port)
            start_pgsluice "$port" "$PGPORT" "$POOL" "${PGSLUICE_EXTRA[@]}"
            ARGS+=(--target "pgsluice=postgres://postgres@127.0.0.1:$port/postgres")
            ;;
        *) die "unknown target $t" ;;
    esac
done
mkdir -p "$OUT_DIR"
"$REPLAY" "${ARGS[@]}" "$@"
# A proxy that died mid-run shows up only as connect errors; say so plainly.
for pid in "${BENCH_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "proxy process $pid exited during the run; results for it are void"
done
