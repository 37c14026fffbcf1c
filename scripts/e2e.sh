#!/usr/bin/env bash
# End to end against real peers nobody here wrote: QEMU with a Linux guest, a
# vhost-user-blk-pci device with iommu_platform=on behind intel-iommu, behind virtio-iommu,
# and with no IOMMU, each served by `vhost-iotlb blk`. Uses the shared harness
# (../shared/e2e, or E2E_DIR): installs QEMU and builds the guest when missing, checks data
# both ways. Prints each mode's result line and wall time, and the back-end's stats line of
# the intel-iommu run. Exits non-zero unless every mode passes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
MODES="${E2E_MODES:-intel virtio none}"
exec </dev/null

die() { echo "e2e: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-blk.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

echo "e2e: installing QEMU and guest dependencies when missing"
"$E2E/install-deps.sh" || die "install-deps.sh failed"
echo "e2e: building the guest when missing"
"$E2E/build-guest.sh" >/dev/null || die "build-guest.sh failed"
echo "e2e: building vhost-iotlb (release)"
(cd "$ROOT" && cargo build --release -q) || die "cargo build --release failed"
BIN="$ROOT/target/release/vhost-iotlb"

summary=()
failed=0
for mode in $MODES; do
    out=$(mktemp)
    set +e
    "$E2E/run-blk.sh" --keep --timeout "${E2E_TIMEOUT:-180}" \
        --backend-cmd "$BIN blk --socket {socket} --disk {disk} --json {socket}.json" \
        --iommu "$mode" >"$out" 2>&1
    rc=$?
    set -e
    result=$(grep '^E2E-RESULT:' "$out" | tail -1 || true)
    work=$(sed -n 's/^run-blk: kept //p' "$out" | tail -1)
    stats=''
    if [ -n "$work" ] && [ -f "$work/backend.log" ]; then
        stats=$(grep '^stats:' "$work/backend.log" | tail -1 || true)
        # The same counters as JSON (`blk --json`), written on exit.
        if [ "$rc" -eq 0 ] && ! grep -q '"access_fails_suppressed"' "$work"/*.sock.json 2>/dev/null; then
            echo "e2e: $mode: the back-end wrote no stats JSON" >&2
            rc=1
        fi
    fi
    echo "e2e: $mode: ${result:-no result line}"
    [ -n "$stats" ] && echo "e2e: $mode: back-end $stats"
    if [ "$rc" -ne 0 ] || [[ "$result" != *PASS* ]]; then
        failed=1
        echo "---- e2e $mode output ----" >&2
        tail -40 "$out" >&2
    fi
    summary+=("$mode: ${result:-none}")
    [ -n "$work" ] && rm -rf "$work"
    rm -f "$out"
done
echo "e2e: ==== summary ===="
printf 'e2e: %s\n' "${summary[@]}"
[ "$failed" -eq 0 ] || die "at least one mode failed"
echo "e2e: all modes passed"
