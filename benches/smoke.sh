#!/usr/bin/env bash
# Builds every benchmark tool and runs each once in a seconds-long mode. Exits non-zero on any
# failure; exits 0 with a SKIP line only when PgBouncer is missing and cannot be installed.
#
# Usage (as root, from anywhere): benches/smoke.sh
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root (servers are started as the postgres user)"

if ! command -v pgbouncer >/dev/null; then
    log "pgbouncer missing; trying apt-get install"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; } >/dev/null 2>&1 ||
        ! command -v pgbouncer >/dev/null; then
        echo "SKIP: benchmark smoke needs pgbouncer, which is not installable here"
        exit 0
    fi
fi
for tool in initdb pg_ctl pgbench psql setpriv ss; do
    command -v "$tool" >/dev/null || die "missing $tool"
done

if [[ -z ${OUT_DIR:-} ]]; then
    OUT_DIR=$(mktemp -d /tmp/pgsluice-smoke.XXXXXX)
    trap 'rm -rf "$OUT_DIR"' EXIT
fi
export OUT_DIR
log "results in $OUT_DIR"

cd "$REPO_DIR"
log "build: pgsluice and bench targets"
# One invocation: the bench targets' dev-dependencies (tokio's test-util among them) change
# the features of ~150 shared crates, so building the proxy on its own first compiled them all
# twice (2.5 min, then 4 min more on a fresh 2-core machine). The proxy this smoke runs is
# therefore built with those features too; the figures in BENCHMARKS.md come from
# `cargo build --release --bin pgsluice` (each script's own build).
BENCH_TARGETS=(--bench frame_scan --bench idle_clients --bench outage_replay --bench cancel_latency --bench difftest --bench allocs)
cargo build --release -q --bin pgsluice "${BENCH_TARGETS[@]}" 2>/dev/null ||
    cargo build --release --bin pgsluice "${BENCH_TARGETS[@]}"

log "frame_scan (one pass per benchmark)"
cargo bench -q --bench frame_scan -- --test

log "allocs --quick (proxy allocations per query)"
cargo bench -q --bench allocs -- --quick

log "compare.sh QUICK=1"
QUICK=1 STRICT=1 SKIP_BUILD=1 bash "$BENCH_DIR/compare.sh"

log "tx_pgbench --quick (explicit transactions, more clients than connections)"
SKIP_BUILD=1 bash "$BENCH_DIR/tx_pgbench.sh" --quick

log "outage replay --quick"
SKIP_BUILD=1 SCALE=1 bash "$BENCH_DIR/outage.sh" --quick --vus 20 --calib-concurrency 2

log "idle clients (50)"
SKIP_BUILD=1 COUNTS=50 bash "$BENCH_DIR/idle_memory.sh"

log "cancel latency --quick"
SKIP_BUILD=1 bash "$BENCH_DIR/cancel_latency.sh" --quick --out "$OUT_DIR/cancel-latency.md"

# The oracle must hold against PostgreSQL itself; one pgsluice configuration shows the tool
# runs end to end (its verdict on pgsluice gates in the test suite, not here).
log "difftest (3 s per configuration)"
DIFFTEST=$(bench_exe difftest)
"$DIFFTEST" --secs 3 --config direct_baseline
"$DIFFTEST" --secs 3 --config txn_pool_above_active --allow-failures

echo "benchmark smoke: passed"
