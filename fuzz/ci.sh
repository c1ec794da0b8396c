#!/usr/bin/env bash
# Builds every fuzz target and runs each for FUZZ_SECONDS (default 60), FUZZ_JOBS (default 2)
# at a time. Exits non-zero when a target crashes, hangs past 10 s on one input, or runs out
# of memory (the input is left under fuzz/artifacts/<target>/), and also when cargo-fuzz cannot
# be installed or the targets do not build: a fuzzer that cannot run is a failure, not a skip.
#
# Build choices (measured in docs/RELIABILITY.md): no sanitizer (`-s none`; the fuzzed code
# has no `unsafe`, and panics, overflows and hangs are caught without one), release with debug
# assertions and overflow checks, 16 codegen units, and the pgsluice library without its
# `server` feature (no HTTP, pool or metrics stacks to compile). Works on stable Rust.
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-2}"
triple="$(rustc -vV | sed -n 's/^host: //p')"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz missing; cargo install cargo-fuzz --locked"
    start=$(date +%s)
    if ! cargo install cargo-fuzz --locked >/tmp/cargo-fuzz-install.log 2>&1; then
        echo "fuzz: FAILED: cargo-fuzz could not be installed; last lines of /tmp/cargo-fuzz-install.log:" >&2
        tail -n 20 /tmp/cargo-fuzz-install.log >&2
        exit 1
    fi
    echo "fuzz: cargo-fuzz installed in $(($(date +%s) - start))s"
fi

build_flags=(-s none --codegen-units 16 --no-default-features)
start=$(date +%s)
if ! cargo fuzz build "${build_flags[@]}" >/tmp/cargo-fuzz-build.log 2>&1; then
    echo "fuzz: FAILED: the targets do not build; last lines of /tmp/cargo-fuzz-build.log:" >&2
    tail -n 30 /tmp/cargo-fuzz-build.log >&2
    exit 1
fi
echo "fuzz: built in $(($(date +%s) - start))s"

bin_dir="target/${triple}/release"
mapfile -t targets < <(cargo fuzz list)
[ ${#targets[@]} -gt 0 ] || { echo "fuzz: FAILED: no targets" >&2; exit 1; }

run_one() {
    local target="$1"
    mkdir -p "corpus/$target" "artifacts/$target"
    if "$bin_dir/$target" "corpus/$target" "seeds/$target" \
        -artifact_prefix="artifacts/$target/" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"/tmp/fuzz-$target.log" 2>&1; then
        echo ok >"/tmp/fuzz-$target.status"
    else
        echo failed >"/tmp/fuzz-$target.status"
    fi
}

echo "fuzz: ${#targets[@]} targets, ${secs}s each, ${jobs} at a time"
start=$(date +%s)
running=0
for target in "${targets[@]}"; do
    rm -f "/tmp/fuzz-$target.status"
    run_one "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait
echo "fuzz: ran in $(($(date +%s) - start))s"

status=0
printf 'fuzz: %-16s %14s %8s  %s\n' target executions corpus result
for target in "${targets[@]}"; do
    log="/tmp/fuzz-$target.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    corpus=$(find "corpus/$target" -type f | wc -l)
    result=$(cat "/tmp/fuzz-$target.status" 2>/dev/null || echo failed)
    printf 'fuzz: %-16s %14s %8s  %s\n' "$target" "${execs:-?}" "$corpus" "$result"
    if [ "$result" != ok ]; then
        status=1
        echo "fuzz: $target FAILED; last lines of $log:" >&2
        tail -n 40 "$log" >&2
    fi
done
exit $status
