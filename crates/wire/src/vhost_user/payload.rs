//! vhost-user payload structs, byte for byte (host byte order), with compile-time layout checks.
//!
//! Names follow the vhost-user specification. Field meanings and limits are checked where the
//! typed requests are decoded (`request.rs`); this file only fixes the layouts. The vring
//! structs have the same layout as Linux's `vhost_vring_state` and `vhost_vring_addr`, which
//! the ioctl module reuses.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Largest virtio device config space a GET/SET_CONFIG may carry (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_SIZE: usize = 256;
/// Regions a SET_MEM_TABLE carries at most in the baseline protocol
/// (`VHOST_MEMORY_BASELINE_NREGIONS`).
pub const BASELINE_MEM_REGIONS: usize = 8;
/// In SET_VRING_KICK/CALL/ERR: the queue index bits of the u64.
pub const VRING_INDEX_MASK: u64 = 0xff;
/// In SET_VRING_KICK/CALL/ERR: no file descriptor is attached (polling mode / invalid fd).
pub const VRING_NOFD: u64 = 0x100;
/// In SET_VRING_ADDR flags: log used-ring writes (`1 << VHOST_VRING_F_LOG`).
pub const VRING_F_LOG: u32 = 0x1;

/// `struct vhost_vring_state`: a queue index and a number (size, base, enable).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VringState {
    /// Queue index.
    pub index: u32,
    /// The value (queue size, next avail index, or enable flag).
    pub num: u32,
}

/// `struct vhost_vring_addr`: where a queue's three areas are.
///
/// With `VIRTIO_F_ACCESS_PLATFORM` the ring addresses are IOVAs; otherwise front-end
/// virtual addresses (vhost-user) or user addresses (Linux).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VringAddr {
    /// Queue index.
    pub index: u32,
    /// `VRING_F_LOG` or 0.
    pub flags: u32,
    /// Descriptor table.
    pub descriptor: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub available: u64,
    /// Guest-physical address of the used ring, for dirty logging.
    pub log: u64,
}

/// A region of the front-end's memory (`VhostUserMemoryRegion`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MemoryRegion {
    /// Guest-physical address of the region.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Front-end virtual address of the region.
    pub userspace_addr: u64,
    /// Offset of the region in the file descriptor sent with it.
    pub mmap_offset: u64,
}

/// The fixed part of SET_MEM_TABLE (`VhostUserMemory` before its regions).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MemoryTableHeader {
    /// Number of regions that follow.
    pub nregions: u32,
    /// Always zero.
    pub padding: u32,
}

/// The payload of ADD_MEM_REG and REM_MEM_REG (`VhostUserMemRegMsg`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SingleMemoryRegion {
    /// Always zero.
    pub padding: u64,
    /// The region.
    pub region: MemoryRegion,
}

/// Bytes of guest-physical memory per bit of the dirty log (`VHOST_LOG_PAGE`): page `n` is
/// bit `n % 8` of byte `n / 8` of the log.
pub const LOG_PAGE: u64 = 4096;

/// The payload of SET_LOG_BASE (`VhostUserLog`): where the dirty log is in the fd sent with it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct LogArea {
    /// Size of the log in bytes.
    pub mmap_size: u64,
    /// Offset of the log in the fd.
    pub mmap_offset: u64,
}

/// The fixed part of GET_CONFIG / SET_CONFIG (`VhostUserConfig` before its data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ConfigHeader {
    /// Offset in the device config space.
    pub offset: u32,
    /// Bytes of config data that follow.
    pub size: u32,
    /// `VHOST_SET_CONFIG_TYPE_*` (0 front-end, 1 migration).
    pub flags: u32,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<VringState>() == 8);
    assert!(size_of::<VringAddr>() == 40);
    assert!(offset_of!(VringAddr, descriptor) == 8);
    assert!(offset_of!(VringAddr, used) == 16);
    assert!(offset_of!(VringAddr, available) == 24);
    assert!(offset_of!(VringAddr, log) == 32);
    assert!(size_of::<MemoryRegion>() == 32);
    assert!(size_of::<MemoryTableHeader>() == 8);
    assert!(size_of::<SingleMemoryRegion>() == 40);
    assert!(offset_of!(SingleMemoryRegion, region) == 8);
    assert!(size_of::<LogArea>() == 16);
    assert!(size_of::<ConfigHeader>() == 12);
};

impl MemoryRegion {
    /// Check the region: nonzero size, and no address range running past 2^64.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.memory_size == 0 {
            return Err("size 0");
        }
        let end = self.memory_size - 1;
        if self.guest_phys_addr.checked_add(end).is_none() {
            return Err("guest-physical range runs past 2^64");
        }
        if self.userspace_addr.checked_add(end).is_none() {
            return Err("front-end address range runs past 2^64");
        }
        if self.mmap_offset.checked_add(end).is_none() {
            return Err("mmap offset range runs past 2^64");
        }
        Ok(())
    }
}
