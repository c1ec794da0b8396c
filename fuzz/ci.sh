#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) each. Exits non-zero when a target
# finds a crash (the input is left under fuzz/artifacts/<target>/). Without cargo-fuzz, or
# when it cannot build (it needs nightly-only compiler flags), prints why and exits 0.
set -u
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-60}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    if ! cargo install cargo-fuzz >/tmp/cargo-fuzz-install.log 2>&1; then
        echo "fuzz: cargo-fuzz is not installed and could not be installed (see /tmp/cargo-fuzz-install.log); skipping"
        exit 0
    fi
fi

# cargo-fuzz passes -Z flags; stable toolchains accept them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz build -O >/tmp/cargo-fuzz-build.log 2>&1; then
    echo "fuzz: targets do not build with this toolchain (see /tmp/cargo-fuzz-build.log); skipping"
    tail -n 5 /tmp/cargo-fuzz-build.log
    exit 0
fi

status=0
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${secs}s"
    if ! cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 \
        >"/tmp/fuzz-$target.log" 2>&1; then
        echo "fuzz: $target FAILED; last lines:"
        tail -n 30 "/tmp/fuzz-$target.log"
        status=1
    else
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "/tmp/fuzz-$target.log" | tail -n 2
    fi
done
exit $status
