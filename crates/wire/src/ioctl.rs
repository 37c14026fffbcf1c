//! The Linux vhost ioctls a `/dev/vhost-net` client needs, and their argument structs.
//!
//! Numbers are built as the kernel's `_IO/_IOR/_IOW/_IOWR` macros build them on the common
//! ioctl layout (x86, arm64, riscv): direction in bits 30-31 (write 1, read 2), argument size
//! in bits 16-29, type (`VHOST_VIRTIO` = 0xAF) in bits 8-15, number in bits 0-7. Nothing
//! here calls `ioctl`; the client that does lives with the IOMMU side.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub use crate::vhost_user::{VringAddr as VhostVringAddr, VringState as VhostVringState};

/// The ioctl type of vhost.
pub const VHOST_VIRTIO: u32 = 0xAF;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// An ioctl number from its parts.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
    ((dir as u64) << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

const fn io(nr: u32) -> u64 {
    ioc(IOC_NONE, VHOST_VIRTIO, nr, 0)
}
const fn ior<T>(nr: u32) -> u64 {
    ioc(IOC_READ, VHOST_VIRTIO, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u64 {
    ioc(IOC_WRITE, VHOST_VIRTIO, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u32) -> u64 {
    ioc(
        IOC_READ | IOC_WRITE,
        VHOST_VIRTIO,
        nr,
        std::mem::size_of::<T>(),
    )
}

/// `struct vhost_vring_file`: a queue index and an fd (-1 to unset).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VhostVringFile {
    /// Queue index.
    pub index: u32,
    /// File descriptor, or -1.
    pub fd: i32,
}

/// `struct vhost_memory` without its flexible array of regions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VhostMemory {
    /// Number of `VhostMemoryRegion`s that follow.
    pub nregions: u32,
    /// Zero.
    pub padding: u32,
}

/// `struct vhost_memory_region`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VhostMemoryRegion {
    /// Guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Address in the calling process.
    pub userspace_addr: u64,
    /// Zero.
    pub flags_padding: u64,
}

const _: () = {
    assert!(std::mem::size_of::<VhostVringFile>() == 8);
    assert!(std::mem::size_of::<VhostMemory>() == 8);
    assert!(std::mem::size_of::<VhostMemoryRegion>() == 32);
};

/// `VHOST_GET_FEATURES`.
pub const VHOST_GET_FEATURES: u64 = ior::<u64>(0x00);
/// `VHOST_SET_FEATURES`.
pub const VHOST_SET_FEATURES: u64 = iow::<u64>(0x00);
/// `VHOST_SET_OWNER`.
pub const VHOST_SET_OWNER: u64 = io(0x01);
/// `VHOST_RESET_OWNER`.
pub const VHOST_RESET_OWNER: u64 = io(0x02);
/// `VHOST_SET_MEM_TABLE`.
pub const VHOST_SET_MEM_TABLE: u64 = iow::<VhostMemory>(0x03);
/// `VHOST_SET_LOG_BASE`.
pub const VHOST_SET_LOG_BASE: u64 = iow::<u64>(0x04);
/// `VHOST_SET_LOG_FD`.
pub const VHOST_SET_LOG_FD: u64 = iow::<i32>(0x07);
/// `VHOST_SET_VRING_NUM`.
pub const VHOST_SET_VRING_NUM: u64 = iow::<VhostVringState>(0x10);
/// `VHOST_SET_VRING_ADDR`.
pub const VHOST_SET_VRING_ADDR: u64 = iow::<VhostVringAddr>(0x11);
/// `VHOST_SET_VRING_BASE`.
pub const VHOST_SET_VRING_BASE: u64 = iow::<VhostVringState>(0x12);
/// `VHOST_GET_VRING_BASE`.
pub const VHOST_GET_VRING_BASE: u64 = iowr::<VhostVringState>(0x12);
/// `VHOST_SET_VRING_KICK`.
pub const VHOST_SET_VRING_KICK: u64 = iow::<VhostVringFile>(0x20);
/// `VHOST_SET_VRING_CALL`.
pub const VHOST_SET_VRING_CALL: u64 = iow::<VhostVringFile>(0x21);
/// `VHOST_SET_VRING_ERR`.
pub const VHOST_SET_VRING_ERR: u64 = iow::<VhostVringFile>(0x22);
/// `VHOST_SET_BACKEND_FEATURES`.
pub const VHOST_SET_BACKEND_FEATURES: u64 = iow::<u64>(0x25);
/// `VHOST_GET_BACKEND_FEATURES`.
pub const VHOST_GET_BACKEND_FEATURES: u64 = ior::<u64>(0x26);
/// `VHOST_NET_SET_BACKEND`.
pub const VHOST_NET_SET_BACKEND: u64 = iow::<VhostVringFile>(0x30);

#[cfg(test)]
mod tests {
    use super::*;

    /// Values as `strace` shows them for QEMU driving vhost-net on x86_64.
    #[test]
    fn numbers() {
        assert_eq!(VHOST_GET_FEATURES, 0x8008_af00);
        assert_eq!(VHOST_SET_FEATURES, 0x4008_af00);
        assert_eq!(VHOST_SET_OWNER, 0xaf01);
        assert_eq!(VHOST_RESET_OWNER, 0xaf02);
        assert_eq!(VHOST_SET_MEM_TABLE, 0x4008_af03);
        assert_eq!(VHOST_SET_LOG_BASE, 0x4008_af04);
        assert_eq!(VHOST_SET_LOG_FD, 0x4004_af07);
        assert_eq!(VHOST_SET_VRING_NUM, 0x4008_af10);
        assert_eq!(VHOST_SET_VRING_ADDR, 0x4028_af11);
        assert_eq!(VHOST_SET_VRING_BASE, 0x4008_af12);
        assert_eq!(VHOST_GET_VRING_BASE, 0xc008_af12);
        assert_eq!(VHOST_SET_VRING_KICK, 0x4008_af20);
        assert_eq!(VHOST_SET_VRING_CALL, 0x4008_af21);
        assert_eq!(VHOST_SET_VRING_ERR, 0x4008_af22);
        assert_eq!(VHOST_SET_BACKEND_FEATURES, 0x4008_af25);
        assert_eq!(VHOST_GET_BACKEND_FEATURES, 0x8008_af26);
        assert_eq!(VHOST_NET_SET_BACKEND, 0x4008_af30);
    }
}
