#!/usr/bin/env bash
# Every check of the project, as CI runs it: installs what the checks need (idempotent,
# non-interactive), then formatting, lints, all tests, the benches in test mode, a fuzzing
# smoke run of every cargo-fuzz target (nightly toolchain and cargo-fuzz installed when
# missing), the end-to-end run against QEMU in three IOMMU modes (QEMU and the guest
# installed/built when missing), and one run of the main job (`vhost-iotlb bench`) whose JSON output is checked
# for its keys.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain components"
for comp in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${comp}"; then
        rustup component add "$comp"
    fi
done

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "benches in test mode (each benchmark runs once)"
cargo test --workspace --benches

step "fuzzing smoke run (scripts/fuzz-smoke.sh: each cargo-fuzz target for ${FUZZ_SECONDS:-60} s)"
./scripts/fuzz-smoke.sh

step "end to end: QEMU + Linux guest + vhost-iotlb blk (intel-iommu, virtio-iommu, none)"
./scripts/e2e.sh

step "main job: cargo run --release -- bench"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo run --release -q -- bench --json "$out/bench.json"
for key in '"lookup_ns"' '"ours"' '"vm_memory"' '"linear"' '"entries"' '"hit_rate"' '"zipf"' '"scan"' '"fifo"' '"random"'; do
    grep -q "$key" "$out/bench.json" || { echo "bench JSON lacks $key" >&2; exit 1; }
done

step "all checks passed"
