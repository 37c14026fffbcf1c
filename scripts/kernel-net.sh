#!/usr/bin/env bash
# The kernel's /dev/vhost-net behind our vIOMMU, in the e2e guest: builds `vhost-iotlb`
# statically (the guest has no libc) and runs `vhost-iotlb kernel-net` there through the
# shared harness's run-guest.sh (../shared/e2e, or E2E_DIR), with the vhost_net and tun
# modules. Installs QEMU and builds the guest when missing. Extra arguments go to
# `kernel-net` (for example `--frames 64`). Exits non-zero unless the guest run passes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
exec </dev/null

die() { echo "kernel-net: FAILED: $*" >&2; exit 1; }
[ -x "$E2E/run-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"

"$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
"$E2E/build-guest.sh" >/dev/null || die "build-guest.sh failed"
TARGET=x86_64-unknown-linux-gnu
echo "kernel-net: building a static vhost-iotlb"
# Its own target dir: static flags would otherwise rebuild the normal release tree.
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/static" \
    RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release -q --target "$TARGET" --bin vhost-iotlb) || die "static build failed"
BIN="$ROOT/target/static/$TARGET/release/vhost-iotlb"
"$E2E/run-guest.sh" --bin "$BIN" --modules 'vhost_net tun' --iommu none \
    --timeout "${E2E_TIMEOUT:-300}" -- kernel-net "$@"
