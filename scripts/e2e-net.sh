#!/usr/bin/env bash
# vhost-iotlb net --loopback under QEMU with a Linux guest's virtio_net (virtio-net-pci,
# iommu_platform=on, and ats=on with intel; host_mtu=9000), behind intel-iommu, virtio-iommu
# and no IOMMU, each with and without mergeable receive buffers, through the shared
# harness's run-guest.sh (../shared/e2e, or E2E_DIR). In the guest, `net-check`
# (crates/guest, built static) sends 10 frames of each size from 60 bytes to 9014 on an
# AF_PACKET socket and checks that every one comes back byte for byte with its MACs swapped;
# the back-end's counters must show every frame passed on and delivered (no drop), merged
# frames exactly when MRG_RXBUF is on, IOTLB traffic behind an IOMMU, no failed request and
# no broken queue; once with two queue pairs (MQ, the control queue, two guest CPUs). Then
# `vhost-iotlb net --tap` with the host side of the tap in a network namespace the script
# creates: the guest pings the host and sends it 2 MiB over TCP, checked by SHA-256 on both
# sides. Then the same program against DPDK's testpmd (`--forward-mode=macswap`,
# `iommu-support=1`) as a reference: every frame that comes back must be right, and without
# an IOMMU all must; behind one, the frames testpmd lost are reported (a finding about DPDK,
# not a failure of ours). Installs QEMU, dpdk-dev and the guest when missing. Exits non-zero
# on any failure.
# `./scripts/e2e-net.sh [--peer ours|dpdk|both] [intel|virtio|none ...]` (default: both
# peers, all three modes).
set -euo pipefail
# shellcheck source=lib/e2e-common.sh
. "$(dirname "$0")/lib/e2e-common.sh"

die() { echo "e2e-net: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"
e2e_prepare
e2e_release_bin
CHECK=$(e2e_static_bin -p guest --bin net-check)
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

# Run net-check (arguments $4) in the guest against the back-end listening on $1, IOMMU
# mode $2, MRG_RXBUF $3 (on|off); prints its NET-CHECK line. GUEST_BIN, GUEST_GREP and
# GUEST_EXTRA (more run-guest.sh options) change what runs and what is kept of its output.
guest_run() {
    local sock=$1 mode=$2 mrg=$3 args=$4 dev out
    dev="virtio-net-pci,netdev=n0,bus=rp0,disable-legacy=on,host_mtu=9000,mrg_rxbuf=$mrg${DEV_EXTRA:-}"
    case $mode in
        intel) dev+=",iommu_platform=on,ats=on" ;;
        virtio) dev+=",iommu_platform=on" ;;
        none) ;;
        *) die "unknown mode $mode" ;;
    esac
    # shellcheck disable=SC2086 # GUEST_EXTRA is a list of options
    out="$("$E2E/run-guest.sh" --bin "${GUEST_BIN:-$CHECK}" --iommu "$mode" \
        --timeout "${E2E_TIMEOUT:-240}" --args "$args" ${GUEST_EXTRA:-} \
        --qemu-arg -object --qemu-arg memory-backend-memfd,id=mem,size=512M,share=on \
        --qemu-arg -numa --qemu-arg node,memdev=mem \
        --qemu-arg -chardev --qemu-arg "socket,id=c0,path=$sock" \
        --qemu-arg -netdev --qemu-arg "vhost-user,id=n0,chardev=c0${NETDEV_EXTRA:-}" \
        --qemu-arg -device --qemu-arg pcie-root-port,id=rp0,chassis=1 \
        --qemu-arg -device --qemu-arg "$dev")" || { echo "$out" >&2; return 1; }
    grep -o "${GUEST_GREP:-NET-CHECK} .*" <<<"$out" | tail -1
}

wait_socket() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    return 1
}

# `run_ours MODE MRG [PAIRS]`: with PAIRS > 1, the device offers MQ and the guest (two CPUs)
# gets that many pairs and a control queue.
run_ours() {
    local mode=$1 mrg=$2 pairs=${3:-1} sock="$work/net-$1-$2.sock" line stats net
    rm -f "$sock"
    "$BIN" net --socket "$sock" --loopback --queues "$pairs" >"$work/be.out" 2>"$work/be.err" &
    be=$!
    wait_socket "$sock" || die "ours $mode: the back-end did not listen"
    if [ "$pairs" -gt 1 ]; then
        line="$(DEV_EXTRA=",mq=on,vectors=$((2 * pairs + 2))" NETDEV_EXTRA=",queues=$pairs" \
            GUEST_EXTRA="--smp 2" guest_run "$sock" "$mode" "$mrg" "--count 10")" ||
            die "ours $mode mrg_rxbuf=$mrg pairs=$pairs: net-check failed"
        mrg="$mrg pairs=$pairs"
    else
        line="$(guest_run "$sock" "$mode" "$mrg" "--count 10")" ||
            die "ours $mode mrg_rxbuf=$mrg: net-check failed"
    fi
    kill -INT "$be"
    wait "$be" || die "ours $mode: the back-end exited with an error: $(tail -3 "$work/be.err")"
    be=""
    stats="$(grep '^stats:' "$work/be.out" || true)"
    net="$(grep '^net:' "$work/be.out" || true)"
    echo "e2e-net: ours $mode mrg_rxbuf=$mrg: guest $line"
    echo "e2e-net: ours $mode mrg_rxbuf=$mrg: back-end $net"
    python3 - "$mode" "${mrg%% *}" "$line" "$stats" "$net" <<'PY' || die "ours $mode mrg_rxbuf=$mrg: counters do not add up"
import sys
mode, mrg, line, stats, net = sys.argv[1:]
kv = lambda s: dict(w.split("=", 1) for w in s.split() if "=" in w)
g, s, n = kv(line), kv(stats), kv(net)
assert g, "no NET-CHECK line from the guest"
frames = int(g["frames"])
assert frames == 90 and g["lost"] == "0" and g["back"] == g["frames"], g
# Sent again only after 2 s without an answer: the loopback never needed it.
assert g["resent"] == "0", g
# The loopback sends back all it takes. The guest's own stack may send a few frames of its
# own while the link is up (IPv6 neighbour discovery, 90 bytes): they go round too.
tx, rx = int(n["tx_frames"]), int(n["rx_frames"])
assert rx == tx and frames <= tx <= frames + 8, n
if tx > frames:
    print(f"e2e-net: {mode}: {tx - frames} frame(s) of the guest's own stack went round too")
assert n["tx_dropped"] == "0" and n["rx_dropped"] == "0", n
merged = int(n["rx_merged"])
if mrg == "on":
    assert merged >= 30, f"frames of 4000 bytes and more take several buffers: {n}"
else:
    assert merged == 0, n
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
        >"$work/tp.out" 2>&1 &
    be=$!
    wait_socket "$sock" || die "dpdk $mode: testpmd did not listen: $(tail -3 "$work/tp.out")"
    # Fewer frames, each sent once: a frame testpmd loses costs the 2 s wait.
    line="$(guest_run "$sock" "$mode" on "--count 4 --tries 1 --allow-loss")" ||
        die "dpdk $mode: net-check failed (a wrong frame, or no run)"
    kill -INT "$be"
    wait "$be" || true
    be=""
    echo "e2e-net: dpdk $mode: guest $line"
    python3 - "$mode" "$line" "$work/tp.out" <<'PY' || die "dpdk $mode: reference run failed"
import re, sys
mode, line, log = sys.argv[1:]
kv = lambda s: dict(w.split("=", 1) for w in s.split() if "=" in w)
g = kv(line)
assert g, "no NET-CHECK line from the guest"
text = open(log).read()
tx = re.findall(r"TX-packets: +(\d+) +TX-dropped: +(\d+)", text)
sent, dropped = tx[-1] if tx else ("?", "?")
print(f"e2e-net: dpdk {mode}: {g['back']} of {g['frames']} frames came back right "
      f"({g['resent']} sent again, {g['lost']} lost); testpmd sent {sent}, dropped {dropped} "
      "on the way to the guest")
if mode == "none":
    assert g["lost"] == "0", "without an IOMMU every frame comes back"
PY
}

# The tap back-end: the host side of the tap in a network namespace of its own (10.77.0.1,
# with a TCP sink), the guest at 10.77.0.2; the guest pings the host and sends it 2 MiB over
# TCP, and both sides' SHA-256 of the data must match.
NS="vhiotlb-e2e-$$"
TAP_BYTES=$((2 * 1024 * 1024))
cat >"$work/tap-guest.sh" <<'GUEST'
set -e
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
ping -c 5 -W 10 10.77.0.1 | tail -2
dd if=/dev/urandom of=/tmp/data bs=64k count=32 2>/dev/null
echo "TAP-SENT $(sha256sum /tmp/data | cut -d' ' -f1)"
nc 10.77.0.1 5001 </tmp/data
echo "TAP-CHECK done"
GUEST
cat >"$work/tap-sink.py" <<'SINK'
import hashlib, socket, sys
want, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.1", 5001))
s.listen(1)
s.settimeout(300)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while n < want:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
c.close()
open(out, "w").write(f"{n} {h.hexdigest()}\n")
SINK

run_tap() {
    local mode=$1 sock="$work/tap-$1.sock" line sent got ping sink
    rm -f "$sock" "$work/sink.out"
    ip netns add "$NS" || die "tap: cannot create a network namespace (root and iproute2 needed)"
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" "$BIN" net --socket "$sock" --tap vhtap0 >"$work/be.out" 2>"$work/be.err" &
    be=$!
    wait_socket "$sock" || die "tap $mode: the back-end did not listen: $(tail -3 "$work/be.err")"
    ip netns exec "$NS" ip link set vhtap0 mtu 9000 up
    ip netns exec "$NS" ip addr add 10.77.0.1/24 dev vhtap0
    ip netns exec "$NS" python3 "$work/tap-sink.py" "$TAP_BYTES" "$work/sink.out" &
    sink=$!
    local ok=1
    line="$(GUEST_BIN=/bin/busybox GUEST_GREP=TAP-SENT \
        GUEST_EXTRA="--file $work/tap-guest.sh:/e2e-run/tap.sh" \
        guest_run "$sock" "$mode" on "sh /e2e-run/tap.sh")" || ok=0
    # The sink ends when all came, or when its accept times out.
    [ $ok = 1 ] && wait "$sink" || kill "$sink" 2>/dev/null || true
    kill -INT "$be" 2>/dev/null || true
    wait "$be" || true
    be=""
    ip netns del "$NS"
    [ $ok = 1 ] || die "tap $mode: the guest's ping or TCP transfer failed"
    sent="$(awk '{print $2}' <<<"$line")"
    got="$(cat "$work/sink.out" 2>/dev/null || echo "0 none")"
    echo "e2e-net: tap $mode: guest sent $TAP_BYTES bytes, sha256 $sent"
    echo "e2e-net: tap $mode: host received $got; back-end $(grep '^net:' "$work/be.out" || true)"
    [ "$got" = "$TAP_BYTES $sent" ] || die "tap $mode: what the host received is not what the guest sent"
}

modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(intel virtio none)
first=1
for m in "${modes[@]}"; do
    if [ "$peer" != dpdk ]; then
        run_ours "$m" on
        run_ours "$m" off
        # Multi-queue once: two pairs and the control queue.
        [ $first = 1 ] && run_ours "$m" on 2
        run_tap "$m"
    fi
    first=0
    if [ "$peer" != ours ]; then run_dpdk "$m"; fi
done
echo "e2e-net: PASS (peer $peer: ${modes[*]})"
