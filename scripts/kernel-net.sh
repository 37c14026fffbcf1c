#!/usr/bin/env bash
# The kernel's /dev/vhost-net behind our vIOMMU, in the e2e guest: builds `vhost-iotlb`
# statically (the guest has no libc) and runs `vhost-iotlb kernel-net` there through the
# shared harness's run-guest.sh (../shared/e2e, or E2E_DIR), with the vhost_net and tun
# modules. Installs QEMU and builds the guest when missing. Extra arguments go to
# `kernel-net` (for example `--frames 64`). Exits non-zero unless the guest run passes.
set -euo pipefail
# shellcheck source=lib/e2e-common.sh
. "$(dirname "$0")/lib/e2e-common.sh"

die() { echo "kernel-net: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

e2e_prepare
echo "kernel-net: building a static vhost-iotlb"
BIN=$(e2e_static_bin --bin vhost-iotlb)
"$E2E/run-guest.sh" --bin "$BIN" --modules 'vhost_net tun' --iommu none \
    --timeout "${E2E_TIMEOUT:-300}" -- kernel-net "$@"
