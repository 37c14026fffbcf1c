#!/usr/bin/env bash
# vhost-iotlb net --loopback under QEMU with a Linux guest's virtio_net (virtio-net-pci,
# iommu_platform=on, and ats=on with intel), behind intel-iommu, virtio-iommu and no IOMMU,
# through the shared harness's run-guest.sh (../shared/e2e, or E2E_DIR). The guest brings
# eth0 up and sends ICMP echo frames of 98, 1442 and 8042 bytes (the last over several
# mergeable receive buffers) to a static neighbour; the loopback sends each back with its
# MACs swapped. Checked: the guest received as many frames and bytes as it sent, and the
# back-end passed on and delivered every one (no drops), with no failed request and no
# broken queue. Installs QEMU and builds the guest when missing. Exits non-zero on any
# failure. Modes: `./scripts/e2e-net.sh [intel|virtio|none ...]` (default: all three).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
exec </dev/null

die() { echo "e2e-net: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"
"$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
"$E2E/build-guest.sh" >/dev/null || die "build-guest.sh failed"
(cd "$ROOT" && cargo build --release -q --bin vhost-iotlb) || die "build failed"
BIN="$ROOT/target/release/vhost-iotlb"

work="$(mktemp -d)"
be=""
cleanup() {
    [ -n "$be" ] && kill "$be" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# In the guest (busybox sh): eth0 up with a static neighbour, 3 x 40 echo requests, then
# the interface's counters.
GUEST='set -e
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
arp -i eth0 -s 10.9.0.2 52:54:00:00:00:02
for s in 56 1400 8000; do ping -q -c 40 -i 0.01 -W 1 -s $s 10.9.0.2 || true; done
sleep 1
s=/sys/class/net/eth0/statistics
echo "E2E-NET tx=$(cat $s/tx_packets) rx=$(cat $s/rx_packets) txb=$(cat $s/tx_bytes) rxb=$(cat $s/rx_bytes) mtu=$(cat /sys/class/net/eth0/mtu)"'

run_mode() {
    local mode=$1 sock="$work/net-$1.sock" dev
    dev="virtio-net-pci,netdev=n0,bus=rp0,disable-legacy=on,host_mtu=9000"
    case $mode in
        intel) dev+=",iommu_platform=on,ats=on" ;;
        virtio) dev+=",iommu_platform=on" ;;
        none) ;;
        *) die "unknown mode $mode" ;;
    esac
    rm -f "$sock"
    "$BIN" net --socket "$sock" --loopback >"$work/be-$mode.out" 2>"$work/be-$mode.err" &
    be=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] || die "$mode: the back-end did not listen"
    local out
    out="$("$E2E/run-guest.sh" --bin /bin/busybox --iommu "$mode" --timeout "${E2E_TIMEOUT:-240}" \
        --args "sh -c '$GUEST'" \
        --qemu-arg -object --qemu-arg memory-backend-memfd,id=mem,size=512M,share=on \
        --qemu-arg -numa --qemu-arg node,memdev=mem \
        --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock" \
        --qemu-arg -netdev --qemu-arg vhost-user,id=n0,chardev=c0 \
        --qemu-arg -device --qemu-arg pcie-root-port,id=rp0,chassis=1 \
        --qemu-arg -device --qemu-arg "$dev")" || { echo "$out"; die "$mode: the guest run failed"; }
    kill -INT "$be"
    wait "$be" || die "$mode: the back-end exited with an error: $(tail -3 "$work/be-$mode.err")"
    be=""
    local line stats net
    line="$(grep -o 'E2E-NET .*' <<<"$out" | tail -1)"
    stats="$(grep '^stats:' "$work/be-$mode.out" || true)"
    net="$(grep '^net:' "$work/be-$mode.out" || true)"
    echo "e2e-net: $mode: guest $line"
    echo "e2e-net: $mode: back-end $net"
    python3 - "$mode" "$line" "$stats" "$net" <<'PY' || die "$mode: counters do not add up"
import sys
mode, line, stats, net = sys.argv[1:]
kv = lambda s: dict(w.split("=", 1) for w in s.split() if "=" in w)
g, s, n = kv(line), kv(stats), kv(net)
assert g, "no counters from the guest"
tx, rx = int(g["tx"]), int(g["rx"])
assert tx >= 120, f"the guest sent {tx} frames"
assert rx == tx and g["rxb"] == g["txb"], f"guest sent {tx} ({g['txb']} B), received {rx} ({g['rxb']} B)"
assert int(n["tx_frames"]) == tx and int(n["rx_frames"]) == tx, n
assert n["tx_dropped"] == "0" and n["rx_dropped"] == "0", n
assert int(n["rx_merged"]) >= 40, f"8000-byte echoes take several buffers: {n}"
assert s["failed"] == "0" and s["broken_queues"] == "0", s
if mode != "none":
    assert int(s["misses_sent"]) > 0 and int(s["invalidations"]) > 0, f"no IOTLB traffic: {s}"
PY
}

modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(intel virtio none)
for m in "${modes[@]}"; do run_mode "$m"; done
echo "e2e-net: PASS (${modes[*]})"
