# Sourced by the end-to-end scripts (e2e-guest, e2e-net, e2e-migrate, kernel-net): the
# preamble they share. It sets ROOT (the repository) and E2E (the shared harness,
# ../shared/e2e or E2E_DIR), closes stdin, and defines:
#   e2e_prepare          install QEMU and the rest (install-deps.sh) and build the guest
#                        (build-guest.sh); its KEY=VALUE lines (E2E_KERNEL, E2E_INITRD, ...)
#                        are left in E2E_GUEST_ENV
#   e2e_release_bin      build target/release/vhost-iotlb
#   e2e_static_bin ARGS  build a static binary (cargo build ARGS, glibc linked statically, in
#                        target/static: the guest has no libc) and print its path
# The caller defines die() before calling any of them. Nothing here starts QEMU.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
E2E="${E2E_DIR:-$ROOT/../shared/e2e}"
E2E_TARGET=x86_64-unknown-linux-gnu
exec </dev/null

e2e_prepare() {
    [ -x "$E2E/build-guest.sh" ] || die "no end-to-end harness at $E2E (set E2E_DIR)"
    "$E2E/install-deps.sh" >/dev/null || die "install-deps.sh failed"
    E2E_GUEST_ENV=$("$E2E/build-guest.sh") || die "build-guest.sh failed"
}

e2e_release_bin() {
    (cd "$ROOT" && cargo build --release -q --bin vhost-iotlb) || die "cargo build --release failed"
}

e2e_static_bin() {
    local name=${*: -1}
    # Its own target dir: static flags would otherwise rebuild the normal release tree.
    (cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/static" \
        RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --release -q --target "$E2E_TARGET" "$@") >&2 ||
        die "static build of $name failed"
    echo "$ROOT/target/static/$E2E_TARGET/release/$name"
}
