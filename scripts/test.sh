#!/usr/bin/env bash
# Every check of the project, as CI runs it: installs what the checks need (idempotent,
# non-interactive), then formatting, lints, all tests, the benches in test mode, a fuzzing
# smoke run of every cargo-fuzz target (nightly toolchain and cargo-fuzz installed when
# missing), the end-to-end run against QEMU in three IOMMU modes (QEMU and the guest
# installed/built when missing), the guest's own driver doing O_DIRECT I/O of 4 KiB to 4 MiB
# behind intel-iommu and virtio-iommu with the default and a 16-entry IOTLB, one queue and
# four (scripts/e2e-guest.sh), the kernel's /dev/vhost-net driven by our vIOMMU in the
# same guest, frames through a Linux guest's virtio_net to `vhost-iotlb net --loopback`
# and `--tap` in three IOMMU modes, with DPDK's testpmd as a reference (scripts/e2e-net.sh),
# a live migration between two QEMUs behind intel-iommu and virtio-iommu, checked by the
# guest on the destination (scripts/e2e-migrate.sh), and one run of the main job (`vhost-iotlb bench`), of `bench --iotlb` and of a short
# `bench --device net --peer dpdk`, whose JSON output is checked.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain components"
for comp in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${comp}"; then
        rustup component add "$comp"
    fi
done

step "tools: python3 (checks the bench JSON)"
if ! command -v python3 >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q python3
fi

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

step "end to end: the guest's driver, O_DIRECT 4 KiB..4 MiB, small IOTLBs, 4 queues (scripts/e2e-guest.sh)"
./scripts/e2e-guest.sh

step "kernel vhost-net behind our vIOMMU, in the guest (scripts/kernel-net.sh)"
./scripts/kernel-net.sh

step "end to end: QEMU + Linux virtio_net + vhost-iotlb net --loopback (intel-iommu, virtio-iommu, none)"
./scripts/e2e-net.sh

step "live migration behind intel-iommu and virtio-iommu: dirty logging in guest pages (scripts/e2e-migrate.sh)"
./scripts/e2e-migrate.sh

step "main job: cargo run --release -- bench (end to end), then bench --iotlb"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo run --release -q -- bench --json "$out/bench.json" --plot "$out/bench.svg"
python3 - "$out/bench.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
want = ["off", "warm", "strict", "lazy", "thrash", "off-1m", "big", "small-tlb"]
missing = [w for w in want if w not in doc]
assert not missing, f"bench JSON lacks workloads {missing}"
for name, w in doc.items():
    assert w["iops"] > 0, f"{name}: no I/O"
    assert set(w["miss_rtt_us"]) == {"p50", "p99"}, f"{name}: miss_rtt_us"
    assert w["verify_failures"] == 0 and w["poison_violations"] == 0, f"{name}: data check"
    # Our back-end's counters, by their stats-line names (rate-limited ACCESS_FAILs too).
    assert w["backend"]["requests"] > 0 and "access_fails_suppressed" in w["backend"], name
for name in ["strict", "lazy", "thrash", "big", "small-tlb"]:
    assert doc[name]["miss_rtt_us"]["p50"] is not None, f"{name}: no miss measured"
# A 1 MiB request is 256 pages plus header and status: every one of them misses once in
# `big` and `small-tlb` (misses answered 4 KiB at a time), at any IOTLB capacity.
for name in ["big", "small-tlb"]:
    mpr = doc[name]["misses_per_request"]
    assert 250 <= mpr <= 270, f"{name}: {mpr} MISSes per 1 MiB request"
    assert doc[name]["baseline"] == "off-1m", name
assert doc["small-tlb"]["iotlb_capacity"] == 16
print("bench JSON: " + ", ".join(f"{k} {v['iops']:.0f} IOPS" for k, v in doc.items()))
PY
grep -q "<svg" "$out/bench.svg" || { echo "bench plot is not an SVG" >&2; exit 1; }
cargo run --release -q -- bench --iotlb --json "$out/iotlb.json"
for key in '"lookup_ns"' '"ours"' '"vm_memory"' '"linear"' '"entries"' '"hit_rate"' '"zipf"' '"scan"' '"fifo"' '"random"'; do
    grep -q "$key" "$out/iotlb.json" || { echo "bench --iotlb JSON lacks $key" >&2; exit 1; }
done

step "bench --device net --peer dpdk (short: one round; ours must lose and break nothing)"
cargo run --release -q -- bench --device net --peer dpdk --duration 1.5 --rounds 1 \
    --json "$out/net.json" --plot "$out/net.svg"
python3 - "$out/net.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
rows = {(r["workload"], r["peer"]): r for r in doc["rows"]}
want = {"off", "warm", "strict", "lazy", "thrash", "prepush"}
for peer in ("ours", "dpdk"):
    missing = want - {w for (w, p) in rows if p == peer}
    assert not missing, f"net bench JSON lacks {peer} rows {missing}"
for w in want:
    r = rows[(w, "ours")]
    assert r["returned"] > 0 and r["lost"] == 0 and r["corrupt"] == 0, r
    assert r["poison_violations"] == 0, r
    assert r["cpu_device_s_per_mpkt"] > 0, r
    # A ratio to DPDK exists where DPDK moved frames (it moves none under lazy flushes).
    if rows[(w, "dpdk")]["returned"] > 0:
        assert r["vs_dpdk"] is not None, r
print("net bench JSON: " + ", ".join(
    f"{w} {rows[(w, 'ours')]['pps'] / 1e3:.0f}k/{rows[(w, 'dpdk')]['pps'] / 1e3:.0f}k pps"
    for w in sorted(want)))
PY
grep -q "<svg" "$out/net.svg" || { echo "net bench plot is not an SVG" >&2; exit 1; }

step "all checks passed"
