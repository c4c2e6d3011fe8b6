#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECS seconds each, seeded from
# fuzz/corpus/<target> (read-only: new inputs go to a scratch corpus under fuzz/target).
# Installs what it needs: the nightly toolchain (rustup) and cargo-fuzz (crates.io).
# Exit status: 0 when no target found a crash; 1 otherwise (its input is in
# fuzz/artifacts/<target>/, reproduce with `cargo +nightly fuzz run <target> <file>`).
set -euo pipefail
secs=${1:-30}
cd "$(dirname "$0")/.."
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version '^0.13' --locked
fi
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^podvisor-fuzz$')
# One build for all targets (debug assertions on, AddressSanitizer).
cargo +nightly fuzz build --dev
failed=()
for t in $targets; do
    scratch=fuzz/target/corpus/$t
    mkdir -p "$scratch" "fuzz/corpus/$t"
    echo "fuzz: $t for ${secs} s"
    if ! cargo +nightly fuzz run --dev "$t" "$scratch" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 \
        > "fuzz/target/$t.log" 2>&1; then
        tail -n 40 "fuzz/target/$t.log"
        failed+=("$t")
    else
        grep -E '^Done [0-9]+ runs' "fuzz/target/$t.log" | tail -n 1 || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz: $(echo $targets | wc -w) targets, ${secs} s each, no crash"
