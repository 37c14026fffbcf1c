# Run by busybox sh inside the e2e guest (scripts/compare-qsd.sh --harness guest, through
# ../shared/e2e/run-guest.sh): the timed part of the shared harness's blk test, for any
# virtio-blk device at /dev/vda (vhost-user or QEMU's own), so that every config of the
# comparison runs the very same guest work. Reads N MiB from [N, 2N) MiB with O_DIRECT and
# checks its sha256 against HSHA (the host's fill), writes N MiB of e2e-gen data to
# [0, N) MiB with O_DIRECT and fsync, reads it back with O_DIRECT and buffered, and checks
# both. Prints one "BLK-TIMED: PASS|FAIL ..." line (guest_s, the written data's sha256 for
# the host to check the image, whether ACCESS_PLATFORM was negotiated and the IOMMU domain
# type) and exits 0 only on PASS. It must not change anything but /dev/vda and /tmp.
# usage: sh blk-timed.sh N HSHA IOMMU(none|intel|virtio)
N=$1 HSHA=$2 IOMMU=$3
fail() { echo "BLK-TIMED: FAIL $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.2; done
[ -b /dev/vda ] || fail "no /dev/vda"
ap=$(cut -c34 /sys/block/vda/device/features)
dom=$(cat "$(readlink -f /sys/block/vda/device/..)/iommu_group/type" 2>/dev/null || echo none)
if [ "$IOMMU" = none ]; then
    [ "$ap" = 0 ] || fail "ACCESS_PLATFORM negotiated without an IOMMU"
else
    [ "$ap" = 1 ] || fail "ACCESS_PLATFORM not negotiated"
    case $dom in DMA | DMA-FQ) ;; *) fail "not behind a translating IOMMU (domain $dom)" ;; esac
fi
t0=$(now)
h=$(dd if=/dev/vda bs=1M skip="$N" count="$N" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$h" = "$HSHA" ] || fail "host region: sha256 $h, want $HSHA"
e2e-gen 7 "$N" >/tmp/w || fail "e2e-gen failed"
w=$(sha256sum </tmp/w | cut -d' ' -f1)
dd if=/tmp/w of=/dev/vda bs=1M count="$N" oflag=direct conv=fsync 2>/dev/null || fail "write failed"
rm -f /tmp/w
sync
echo 3 >/proc/sys/vm/drop_caches
r=$(dd if=/dev/vda bs=1M count="$N" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$r" = "$w" ] || fail "direct read-back: sha256 $r, want $w"
echo 3 >/proc/sys/vm/drop_caches
b=$(head -c $((N * 1048576)) /dev/vda | sha256sum | cut -d' ' -f1)
[ "$b" = "$w" ] || fail "buffered read-back: sha256 $b, want $w"
t1=$(now)
echo "BLK-TIMED: PASS guest_s=$(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }') wsha=$w access_platform=$ap domain=$dom"
