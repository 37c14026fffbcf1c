#!/usr/bin/env bash
# Data integrity through the Linux guest's own virtio-blk driver, in every configuration
# the issue of small IOTLBs and large, scattered I/O asks for: `blk-check` (crates/guest),
# a static program run in the e2e guest by the shared run-guest.sh, reads and writes
# 4 KiB to 4 MiB with O_DIRECT from scattered 4 KiB pages and from huge pages, checks
# every byte in the guest, and the host checks the disk image afterwards. The back-end is
# `vhost-iotlb blk`, behind intel-iommu or virtio-iommu, with the default IOTLB and with 16
# entries, one queue or four (each guest CPU then drives its own queue). Each run must
# pass, and the back-end's stats line must show no failed request, no broken queue and a
# request of at least 4 MiB.
#
# Usage: scripts/e2e-guest.sh [CONFIG...]   CONFIG = IOMMU:CAPACITY:QUEUES, for example
#        intel:16:4 (default: the five configurations below). Env: E2E_DIR, E2E_TIMEOUT.
set -euo pipefail
# shellcheck source=lib/e2e-common.sh
. "$(dirname "$0")/lib/e2e-common.sh"

die() { echo "e2e-guest: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(intel:2048:1 intel:16:1 virtio:2048:1 virtio:16:1 intel:16:4)

e2e_prepare
echo "e2e-guest: building vhost-iotlb (release) and a static blk-check"
e2e_release_bin
BIN="$ROOT/target/release/vhost-iotlb"
CHECK=$(e2e_static_bin -p guest --bin blk-check)

summary=()
failed=0
for cfg in "${CONFIGS[@]}"; do
    IFS=: read -r iommu capacity queues <<<"$cfg"
    work=$(mktemp -d "${TMPDIR:-/tmp}/vhost-iotlb-e2e-guest.XXXXXX")
    seed=$(( (RANDOM << 15 | RANDOM) + 1 ))
    img="$work/disk.img" sock="$work/blk.sock" log="$work/backend.log"
    "$CHECK" fill --disk "$img" --seed "$seed" >/dev/null || die "$cfg: fill failed"
    "$BIN" blk --socket "$sock" --disk "$img" --iotlb-capacity "$capacity" \
        --queues "$queues" >"$log" 2>&1 &
    backend=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    [ -S "$sock" ] || { kill "$backend" 2>/dev/null; die "$cfg: back-end did not listen"; }
    ats=",ats=on"
    [ "$iommu" = virtio ] && ats=""
    qemu=(-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
          -chardev "socket,id=c0,path=$sock" -device pcie-root-port,id=rp0,chassis=1
          -device "vhost-user-blk-pci,chardev=c0,bus=rp0,num-queues=$queues,disable-legacy=on,iommu_platform=on$ats")
    qargs=()
    for a in "${qemu[@]}"; do qargs+=(--qemu-arg "$a"); done
    out="$work/guest.out"
    set +e
    "$E2E/run-guest.sh" --bin "$CHECK" --iommu "$iommu" --smp "$queues" \
        --timeout "${E2E_TIMEOUT:-600}" "${qargs[@]}" \
        -- run --dev /dev/vda --seed "$seed" --threads "$queues" >"$out" 2>&1
    rc=$?
    set -e
    kill -TERM "$backend" 2>/dev/null || true
    wait "$backend" 2>/dev/null || true
    result=$(grep '^E2E-RESULT:' "$out" | tail -1 || true)
    stats=$(grep '^stats:' "$log" | tail -1 || true)
    verify=$("$CHECK" verify --disk "$img" --seed "$seed" --threads "$queues" 2>&1 || true)
    ok=1
    [ "$rc" -eq 0 ] && [[ "$result" == *PASS* ]] || ok=0
    [[ "$verify" == *PASS* ]] || ok=0
    [[ "$stats" == *" failed=0 broken_queues=0 "* ]] || ok=0
    largest=$(sed -n 's/.*largest_request=\([0-9]*\).*/\1/p' <<<"$stats")
    [ "${largest:-0}" -ge $((4 << 20)) ] || ok=0
    echo "e2e-guest: $cfg: ${result:-no result line}"
    grep '^blk-check:' "$out" | sed "s/^/e2e-guest: $cfg: /" || true
    echo "e2e-guest: $cfg: host $verify"
    echo "e2e-guest: $cfg: back-end $stats"
    if [ "$ok" -ne 1 ]; then
        failed=1
        echo "---- e2e-guest $cfg: guest output ----" >&2
        tail -40 "$out" >&2
        echo "---- e2e-guest $cfg: back-end log ----" >&2
        tail -20 "$log" >&2
        summary+=("$cfg: FAIL")
    else
        summary+=("$cfg: PASS $(sed -n 's/.* wall_s=\([0-9.]*\).*/wall_s=\1/p' <<<"$result")")
    fi
    rm -rf "$work"
done
echo "e2e-guest: ==== summary ===="
printf 'e2e-guest: %s\n' "${summary[@]}"
[ "$failed" -eq 0 ] || die "at least one configuration failed"
echo "e2e-guest: all configurations passed"
