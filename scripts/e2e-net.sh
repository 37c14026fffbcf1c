#!/usr/bin/env bash
# vhost-iotlb net --loopback under QEMU with a Linux guest's virtio_net (virtio-net-pci,
# iommu_platform=on, and ats=on with intel), behind intel-iommu, virtio-iommu and no IOMMU,
# through the shared harness's run-guest.sh (../shared/e2e, or E2E_DIR). The guest brings
# eth0 up and sends ICMP echo frames of 98, 1442 and 8042 bytes (the last over several
# mergeable receive buffers) to a static neighbour; the loopback sends each back with its
# MACs swapped. Checked: the guest received as many frames and bytes as it sent, and the
# back-end passed on and delivered every one (no drops), with no failed request and no
# broken queue. Then the same guest run against DPDK's testpmd (`--forward-mode=macswap`,
# `iommu-support=1`) as a reference: without an IOMMU every frame must come back; behind
# one, what testpmd returned and dropped is reported (a finding about DPDK, not a failure
# of ours), and every frame must at least have reached it. Installs QEMU, dpdk-dev and the
# guest when missing. Exits non-zero on any failure.
# `./scripts/e2e-net.sh [--peer ours|dpdk|both] [intel|virtio|none ...]` (default: both
# peers, all three modes).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
exec </dev/null

die() { echo "e2e-net: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"
"$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
"$E2E/build-guest.sh" >/dev/null || die "build-guest.sh failed"
(cd "$ROOT" && cargo build --release -q --bin vhost-iotlb) || die "build failed"
peer=both
if [ "${1:-}" = "--peer" ]; then peer=$2; shift 2; fi
case $peer in ours|dpdk|both) ;; *) die "--peer ours|dpdk|both" ;; esac
if [ "$peer" != ours ] && ! command -v dpdk-testpmd >/dev/null; then
    echo "e2e-net: installing dpdk-dev (dpdk-testpmd)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dpdk-dev >/dev/null \
        || die "dpdk-testpmd missing and apt-get install dpdk-dev failed"
fi
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
s=/sys/class/net/eth0/statistics
for n in 56 1400 8000; do
    ping -q -c 40 -i 0.01 -W 1 -s $n 10.9.0.2 >/dev/null || true
    echo "E2E-NET-STEP payload=$n tx=$(cat $s/tx_packets) rx=$(cat $s/rx_packets)"
done
sleep 1
echo "E2E-NET tx=$(cat $s/tx_packets) rx=$(cat $s/rx_packets) txb=$(cat $s/tx_bytes) rxb=$(cat $s/rx_bytes) mtu=$(cat /sys/class/net/eth0/mtu)"'

# Run the guest against the back-end listening on $1 in IOMMU mode $2; prints its
# E2E-NET line.
guest_run() {
    local sock=$1 mode=$2 dev out
    dev="virtio-net-pci,netdev=n0,bus=rp0,disable-legacy=on,host_mtu=9000"
    case $mode in
        intel) dev+=",iommu_platform=on,ats=on" ;;
        virtio) dev+=",iommu_platform=on" ;;
        none) ;;
        *) die "unknown mode $mode" ;;
    esac
    out="$("$E2E/run-guest.sh" --bin /bin/busybox --iommu "$mode" --timeout "${E2E_TIMEOUT:-240}" \
        --args "sh -c '$GUEST'" \
        --qemu-arg -object --qemu-arg memory-backend-memfd,id=mem,size=512M,share=on \
        --qemu-arg -numa --qemu-arg node,memdev=mem \
        --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock" \
        --qemu-arg -netdev --qemu-arg vhost-user,id=n0,chardev=c0 \
        --qemu-arg -device --qemu-arg pcie-root-port,id=rp0,chassis=1 \
        --qemu-arg -device --qemu-arg "$dev")" || { echo "$out" >&2; return 1; }
    grep -o 'E2E-NET-STEP .*' <<<"$out" | sed "s/^/e2e-net: $mode: /" >&2
    grep -o 'E2E-NET .*' <<<"$out" | tail -1
}

wait_socket() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    return 1
}

run_ours() {
    local mode=$1 sock="$work/net-$1.sock" line stats net
    rm -f "$sock"
    "$BIN" net --socket "$sock" --loopback >"$work/be-$mode.out" 2>"$work/be-$mode.err" &
    be=$!
    wait_socket "$sock" || die "$mode: the back-end did not listen"
    line="$(guest_run "$sock" "$mode")" || die "ours $mode: the guest run failed"
    kill -INT "$be"
    wait "$be" || die "$mode: the back-end exited with an error: $(tail -3 "$work/be-$mode.err")"
    be=""
    stats="$(grep '^stats:' "$work/be-$mode.out" || true)"
    net="$(grep '^net:' "$work/be-$mode.out" || true)"
    echo "e2e-net: ours $mode: guest $line"
    echo "e2e-net: ours $mode: back-end $net"
    python3 - "$mode" "$line" "$stats" "$net" <<'PY' || die "ours $mode: counters do not add up"
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

run_dpdk() {
    local mode=$1 sock="$work/dpdk-$1.sock" line
    rm -f "$sock"
    # Non-interactive with a long stats period: it forwards until SIGINT, then prints its
    # totals.
    dpdk-testpmd --no-huge -m 1024 --no-pci --file-prefix="e2enet$$" \
        --vdev "net_vhost0,iface=$sock,iommu-support=1,queues=1" -- \
        --total-num-mbufs=8192 --forward-mode=macswap --auto-start --stats-period 1000 \
        >"$work/tp-$mode.out" 2>&1 &
    be=$!
    wait_socket "$sock" || die "dpdk $mode: testpmd did not listen: $(tail -3 "$work/tp-$mode.out")"
    line="$(guest_run "$sock" "$mode")" || die "dpdk $mode: the guest run failed"
    kill -INT "$be"
    wait "$be" || true
    be=""
    echo "e2e-net: dpdk $mode: guest $line"
    python3 - "$mode" "$line" "$work/tp-$mode.out" <<'PY' || die "dpdk $mode: reference run failed"
import re, sys
mode, line, log = sys.argv[1:]
kv = lambda s: dict(w.split("=", 1) for w in s.split() if "=" in w)
g = kv(line)
text = open(log).read()
rx = re.findall(r"RX-packets: +(\d+) +RX-dropped: +(\d+)", text)
tx = re.findall(r"TX-packets: +(\d+) +TX-dropped: +(\d+)", text)
assert rx and tx, "no totals from testpmd"
(got, _), (sent, dropped) = rx[-1], tx[-1]
print(f"e2e-net: dpdk {mode}: testpmd received {got}, sent back {sent}, dropped {dropped} "
      f"on the way to the guest; the guest sent {g['tx']}, received {g['rx']}")
assert int(got) == int(g["tx"]), "every frame the guest sent reached testpmd"
assert int(g["rx"]) == int(sent), "the guest received what testpmd sent back"
if mode == "none":
    assert int(g["rx"]) == int(g["tx"]) and g["rxb"] == g["txb"], "without an IOMMU every frame comes back"
PY
}

modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(intel virtio none)
for m in "${modes[@]}"; do
    if [ "$peer" != dpdk ]; then run_ours "$m"; fi
    if [ "$peer" != ours ]; then run_dpdk "$m"; fi
done
echo "e2e-net: PASS (peer $peer: ${modes[*]})"
