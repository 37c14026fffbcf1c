#!/usr/bin/env bash
# Live migration of a guest whose vhost-user-blk disk sits behind an IOMMU, with the disk
# served by `vhost-iotlb blk`: two QEMU instances (a source, and a destination started with
# `-incoming`), each with its own back-end on the same disk image, memfd guest memory,
# intel-iommu (device-iotlb, ATS) or virtio-iommu, iommu.strict=1. In the guest,
# `blk-migrate` (crates/guest, built static) fills 8192 4 KiB buffers once with the CPU,
# then keeps O_DIRECT reads going into them (a new disk block each round; only the device
# writes them from then on) and a write every 8 reads. The host starts the migration over
# QMP while that runs; once QEMU says `completed`, it writes a signal into the disk image,
# and the guest, now on the destination, checks every buffer it read and every block it
# wrote. The device's writes are invisible to QEMU's own dirty tracking: a back-end that
# does not log them by guest-physical page (design invariant 10) leaves stale buffers on
# the destination, and the guest fails. The host then checks that the read region was
# never written.
#
# Reported per mode: the guest's line, the downtime and total time (query-migrate), the
# pages the source's back-end logged and the requests it completed while logging
# (`logged_pages`, `logged_requests` of its stats line), the requests the destination's
# served after the switch-over.
#
# Usage: scripts/e2e-migrate.sh [--broken log-iova] [intel|virtio ...]   (default: both).
# `--broken log-iova` runs both back-ends with the deliberate bug (IOVAs logged instead of
# guest pages): the migration must then FAIL. Env: E2E_DIR, MIGRATE_TIMEOUT (s, default 900),
# MIGRATE_KEEP=1 keeps the work directory (consoles, QEMU and back-end logs).
set -euo pipefail
# shellcheck source=lib/e2e-common.sh
. "$(dirname "$0")/lib/e2e-common.sh"

die() { echo "e2e-migrate: FAILED: $*" >&2; exit 1; }
say() { echo "e2e-migrate: $*"; }
broken=()
if [ "${1:-}" = "--broken" ]; then broken=(--broken "$2"); shift 2; fi
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(intel virtio)
for m in "${MODES[@]}"; do
    case $m in intel|virtio) ;; *) die "unknown mode $m (intel|virtio)" ;; esac
done
TIMEOUT=${MIGRATE_TIMEOUT:-900}

e2e_prepare
KERNEL=$(sed -n 's/^E2E_KERNEL=//p' <<<"$E2E_GUEST_ENV")
BASE_INITRD=$(sed -n 's/^E2E_INITRD=//p' <<<"$E2E_GUEST_ENV")
[ -f "$KERNEL" ] && [ -f "$BASE_INITRD" ] || die "build-guest.sh gave no kernel/initramfs"
command -v cpio >/dev/null || die "cpio missing (install-deps.sh should have installed it)"
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 missing"
BIOS=/usr/share/qemu/qboot.rom
[ -f "$BIOS" ] || BIOS=""

say "building vhost-iotlb (release) and a static blk-migrate"
e2e_release_bin
BIN="$ROOT/target/release/vhost-iotlb"
PROG=$(e2e_static_bin -p guest --bin blk-migrate)

work=$(mktemp -d "${TMPDIR:-/tmp}/vhost-iotlb-migrate.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [ -n "${MIGRATE_KEEP:-}" ]; then echo "e2e-migrate: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The guest's initramfs: the shared base one, plus our own PID 1 and program (a second
# cpio archive appended: the kernel unpacks both).
mkdir -p "$work/overlay/migrate"
cp "$PROG" "$work/overlay/migrate/blk-migrate"
cat >"$work/overlay/migrate/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the migration guest: modules, then blk-migrate with the seed from the kernel
# command line (migrate.seed=N); its exit status is printed, then the guest powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null || true; done </lib/modules/load.order
seed=1
for w in $(cat /proc/cmdline); do
  case $w in migrate.seed=*) seed=${w#migrate.seed=} ;; esac
done
echo "MIGRATE-GUEST-BEGIN"
/migrate/blk-migrate run --dev /dev/vda --seed "$seed" --buffers 8192
echo "MIGRATE-GUEST-END rc=$?"
sync
poweroff -f
INIT
chmod +x "$work/overlay/migrate/init"
(cd "$work/overlay" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/overlay.cpio.gz"
INITRD="$work/initrd.img"
cat "$BASE_INITRD" "$work/overlay.cpio.gz" >"$INITRD"

# QMP: one command per call, on a fresh connection (greeting, capabilities, command).
qmp() {
    python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
def read():
    while True:
        line = f.readline()
        if not line:
            sys.exit("QMP: connection closed")
        msg = json.loads(line)
        if "event" not in msg:
            return msg
read()  # greeting
for cmd in ({"execute": "qmp_capabilities"}, json.loads(sys.argv[2])):
    f.write(json.dumps(cmd) + "\n")
    f.flush()
    r = read()
    if "error" in r:
        sys.exit("QMP error: " + json.dumps(r["error"]))
print(json.dumps(r.get("return", {})))
PY
}

# Wait until file $1 has a line matching $2, for at most $3 seconds; pid $4 must live.
wait_for() {
    local file=$1 pat=$2 secs=$3 pid=$4 end=$((SECONDS + $3))
    while [ $SECONDS -lt $end ]; do
        grep -q -- "$pat" "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { grep -q -- "$pat" "$file" 2>/dev/null && return 0; return 1; }
        sleep 0.5
    done
    return 1
}

stats_field() { sed -n "s/.* $2=\([0-9]*\).*/\1/p" <<<"$1"; }

summary=()
failed=0
for mode in "${MODES[@]}"; do
    d="$work/$mode"
    mkdir -p "$d"
    seed=$(( (RANDOM << 15 | RANDOM) + 1 ))
    img="$d/disk.img"
    "$PROG" fill --disk "$img" --seed "$seed" >/dev/null || die "$mode: fill failed"
    for side in src dst; do
        "$BIN" blk --socket "$d/$side-blk.sock" --disk "$img" "${broken[@]}" \
            >"$d/$side-backend.log" 2>&1 &
        pids+=($!)
        eval "be_$side=$!"
    done
    for side in src dst; do
        for _ in $(seq 100); do [ -S "$d/$side-blk.sock" ] && break; sleep 0.1; done
        [ -S "$d/$side-blk.sock" ] || die "$mode: the $side back-end did not listen"
    done
    case $mode in
        intel)
            iommu_dev=(-device intel-iommu,intremap=on,device-iotlb=on,caching-mode=on)
            append="intel_iommu=on iommu.strict=1" ats=",ats=on" ;;
        virtio)
            iommu_dev=(-device virtio-iommu-pci)
            append="iommu.strict=1" ats="" ;;
    esac
    # Both sides: the same machine, memory, kernel, initramfs and devices.
    common=(-machine q35,kernel-irqchip=split,memory-backend=mem -accel tcg -m 256M
            -object memory-backend-memfd,id=mem,size=256M,share=on -smp 1
            ${BIOS:+-bios "$BIOS"} -display none -monitor none -no-reboot -nic none
            -kernel "$KERNEL" -initrd "$INITRD"
            -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/migrate/init migrate.seed=$seed $append"
            "${iommu_dev[@]}" -device pcie-root-port,id=rp0,chassis=1)
    dev="vhost-user-blk-pci,chardev=c0,bus=rp0,num-queues=1,disable-legacy=on,iommu_platform=on$ats"
    "$QEMU" "${common[@]}" -chardev "socket,id=c0,path=$d/dst-blk.sock" -device "$dev" \
        -serial "file:$d/dst-console.log" -qmp "unix:$d/dst-qmp.sock,server=on,wait=off" \
        -incoming "unix:$d/migrate.sock" >"$d/dst-qemu.log" 2>&1 &
    qemu_dst=$!
    pids+=("$qemu_dst")
    "$QEMU" "${common[@]}" -chardev "socket,id=c0,path=$d/src-blk.sock" -device "$dev" \
        -serial "file:$d/src-console.log" -qmp "unix:$d/src-qmp.sock,server=on,wait=off" \
        >"$d/src-qemu.log" 2>&1 &
    qemu_src=$!
    pids+=("$qemu_src")

    ok=1 why=""
    if ! wait_for "$d/src-console.log" "blk-migrate: ready" 300 "$qemu_src"; then
        ok=0 why="the guest never got ready on the source"
    fi
    mig="" downtime="-" total="-"
    if [ $ok -eq 1 ]; then
        sleep 2 # reads going on before the migration starts
        qmp "$d/src-qmp.sock" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":16777216,"downtime-limit":300}}' >/dev/null ||
            { ok=0 why="migrate-set-parameters failed"; }
    fi
    if [ $ok -eq 1 ]; then
        qmp "$d/src-qmp.sock" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$d/migrate.sock\"}}" >/dev/null ||
            { ok=0 why="migrate failed to start"; }
    fi
    if [ $ok -eq 1 ]; then
        end=$((SECONDS + TIMEOUT))
        status=""
        while [ $SECONDS -lt $end ]; do
            mig=$(qmp "$d/src-qmp.sock" '{"execute":"query-migrate"}') || { status=gone; break; }
            status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("status",""))' "$mig")
            case $status in completed|failed|cancelled) break ;; esac
            sleep 0.2
        done
        if [ "$status" = completed ]; then
            read -r downtime total < <(python3 -c 'import json,sys; m=json.loads(sys.argv[1]); print(m.get("downtime","-"), m.get("total-time","-"))' "$mig")
            "$PROG" signal --disk "$img" --seed "$seed" >/dev/null || { ok=0 why="signal failed"; }
        else
            ok=0 why="migration ended $status: $mig"
        fi
    fi
    guest=""
    if [ $ok -eq 1 ]; then
        wait_for "$d/dst-console.log" "MIGRATE-GUEST-END" "$TIMEOUT" "$qemu_dst" ||
            { ok=0 why="no result from the guest on the destination"; }
        guest=$(grep -a '^blk-migrate: \(PASS\|FAIL\)' "$d/dst-console.log" | tail -1 || true)
        [[ "$guest" == "blk-migrate: PASS"* ]] || { ok=0 why="the guest's check failed"; }
    fi
    qmp "$d/src-qmp.sock" '{"execute":"quit"}' >/dev/null 2>&1 || true
    for p in "$qemu_src" "$qemu_dst"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    # shellcheck disable=SC2154 # set by eval above
    for p in "$be_src" "$be_dst"; do
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    src_stats=$(grep '^stats:' "$d/src-backend.log" | tail -1 || true)
    dst_stats=$(grep '^stats:' "$d/dst-backend.log" | tail -1 || true)
    host=$("$PROG" verify --disk "$img" --seed "$seed" 2>&1 || true)
    [[ "$host" == *PASS* ]] || { [ $ok -eq 1 ] && why="host check: $host"; ok=0; }
    for s in "$src_stats" "$dst_stats"; do
        [[ "$s" == *" failed=0 broken_queues=0 "* ]] ||
            { [ $ok -eq 1 ] && why="a back-end failed a request or broke a queue"; ok=0; }
    done
    pages=$(stats_field "$src_stats" logged_pages)
    logreq=$(stats_field "$src_stats" logged_requests)
    dst_req=$(stats_field "$dst_stats" requests)
    if [ $ok -eq 1 ] && [ "${pages:-0}" -eq 0 ]; then ok=0 why="the source's back-end logged no page"; fi
    say "$mode: ${guest:-no result line from the guest}"
    say "$mode: downtime_ms=$downtime total_ms=$total source: logged_pages=${pages:-?} logged_requests=${logreq:-?}; destination: requests=${dst_req:-?}"
    say "$mode: source back-end $src_stats"
    say "$mode: destination back-end $dst_stats"
    if [ $ok -eq 1 ]; then
        summary+=("$mode:PASS")
    else
        failed=1
        summary+=("$mode:FAIL")
        say "$mode: FAILED: $why"
        for f in src-console.log dst-console.log src-qemu.log dst-qemu.log src-backend.log dst-backend.log; do
            echo "---- $mode $f (last 20 lines)" >&2
            tail -20 "$d/$f" >&2 2>/dev/null || true
        done
    fi
done
say "${summary[*]}"
if [ $failed -ne 0 ]; then
    echo "e2e-migrate: FAILED${broken[*]:+ (with ${broken[*]})}" >&2
    exit 1
fi
say "PASS${broken[*]:+ (with ${broken[*]})}"
