//! The front-end's memory as the back-end maps it: the memory table.
//!
//! Each region of SET_MEM_TABLE (or ADD_MEM_REG) comes with a file descriptor; it is mapped
//! shared, read-write, at its `mmap_offset`, and indexed by guest-physical address in a
//! vm-memory `GuestMemoryMmap`. The table also knows each region's front-end virtual address
//! (`userspace_addr`), because the protocol speaks that language in two places: vring
//! addresses without an IOMMU, and the `uaddr` of an IOTLB UPDATE. [`MemTable::va_to_gpa`]
//! converts those to guest-physical pieces, so that the IOTLB stores guest-physical targets
//! and every access, with or without the IOMMU, goes through the same vm-memory regions.
//!
//! A table is immutable; a change builds a new one, and the old mappings go away when the
//! last worker holding it lets go. This file never touches guest memory contents.
//!
//! # A file that shrinks under us
//!
//! Touching a mapped page past the end of its file raises SIGBUS, which kills the back-end.
//! We refuse what could shrink rather than survive the signal: recovering from SIGBUS in the
//! middle of a `preadv` or a volatile copy would need a handler that knows which access
//! faulted and a way out of it for every code path that touches guest memory, and the
//! front-ends we serve can all avoid the case. What is checked, once, when a region is mapped
//! (SET_MEM_TABLE, ADD_MEM_REG):
//! - every file: that it holds `mmap_offset + memory_size` bytes;
//! - a memfd (what `/proc/self/fd` names `/memfd:...`): that it carries `F_SEAL_SHRINK`, so
//!   that nobody can shrink it any more. QEMU's `memory-backend-memfd` seals by default
//!   (`seal=on` adds `F_SEAL_SHRINK` and `F_SEAL_GROW`); [`MapOptions::allow_unsealed`] (the
//!   CLI's `--allow-unsealed-memory`) accepts an unsealed one, trusting the front-end;
//! - any other file (tmpfs, hugetlbfs, a disk file, e.g. QEMU's `memory-backend-file`) cannot
//!   be sealed: it is trusted not to shrink after the check, as every vhost-user back-end
//!   trusts it. A front-end that truncates it kills the back-end, not the guest's data.

use std::fs::File;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use wire::vhost_user::{MemoryRegion, RegionFd};

/// Why a memory table could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// Mapping a region failed.
    #[error("cannot map region at guest-physical {gpa:#x} ({size:#x} bytes): {reason}")]
    Map {
        /// The region's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// Regions overlap in guest-physical or front-end virtual space.
    #[error("memory regions overlap: {0}")]
    Overlap(String),
    /// Too many regions.
    #[error("{got} memory regions, at most {max}")]
    TooMany {
        /// Regions asked for.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A front-end virtual range not (entirely) inside the table.
    #[error("front-end address range {uaddr:#x}+{len:#x} is not in the memory table")]
    NotMapped {
        /// Start.
        uaddr: u64,
        /// Length.
        len: u64,
    },
    /// REM_MEM_REG of a region that is not there.
    #[error("no region at guest-physical {gpa:#x} to remove")]
    NoSuchRegion {
        /// Its guest-physical address.
        gpa: u64,
    },
}

/// One mapped region.
#[derive(Debug, Clone)]
struct Region {
    info: MemoryRegion,
    mapped: Arc<GuestRegionMmap>,
}

/// The memory table: mapped regions, by guest-physical and by front-end virtual address.
#[derive(Debug)]
pub struct MemTable {
    mem: GuestMemoryMmap,
    /// Sorted by `userspace_addr`.
    regions: Vec<Region>,
}

/// Most regions a table may hold.
pub const MAX_REGIONS: usize = 32;

/// How regions are accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOptions {
    /// Accept a memfd without `F_SEAL_SHRINK` (see the module documentation).
    pub allow_unsealed: bool,
}

/// What `/proc/self/fd` names a memfd's link with.
const MEMFD_LINK_PREFIX: &str = "/memfd:";

/// Whether `file` is a memfd (its `/proc/self/fd` link names it so).
fn is_memfd(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|l| l.to_string_lossy().starts_with(MEMFD_LINK_PREFIX))
}

/// Whether `size` bytes at `offset` of `file` can be mapped without risking SIGBUS (see the
/// module documentation): a memfd must be sealed against shrinking (unless `allow_unsealed`),
/// and a regular file must hold them. Also used for the dirty log's fd.
pub(crate) fn check_file(
    file: &File,
    offset: u64,
    size: u64,
    allow_unsealed: bool,
) -> Result<(), String> {
    if !allow_unsealed && is_memfd(file) {
        let seals = rustix::fs::fcntl_get_seals(file).map_err(|e| e.to_string())?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(
                "the memfd is not sealed against shrinking (F_SEAL_SHRINK): truncating \
                 it would kill the back-end; seal it (QEMU: memory-backend-memfd,seal=on, the \
                 default) or start the back-end with --allow-unsealed-memory"
                    .into(),
            );
        }
    }
    // Mapping past the end of a file succeeds, but touching those pages raises SIGBUS: refuse
    // what the file does not hold (a front-end that shrinks the file later can still do that
    // to us; nothing short of a SIGBUS handler prevents it).
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.file_type().is_file() {
        let end = offset
            .checked_add(size)
            .ok_or_else(|| "offset + size overflows".to_string())?;
        if end > meta.len() {
            return Err(format!(
                "the file holds {:#x} bytes, {end:#x} are needed",
                meta.len()
            ));
        }
    }
    Ok(())
}

fn map(info: &MemoryRegion, file: File, opts: MapOptions) -> Result<GuestRegionMmap, MemError> {
    let err = |reason: String| MemError::Map {
        gpa: info.guest_phys_addr,
        size: info.memory_size,
        reason,
    };
    if info.memory_size == 0 {
        return Err(err("an empty region".into()));
    }
    // Both ends of the region in front-end and in guest-physical space must fit in 64 bits
    // (the table computes the last byte of each).
    if info
        .userspace_addr
        .checked_add(info.memory_size - 1)
        .is_none()
        || info
            .guest_phys_addr
            .checked_add(info.memory_size - 1)
            .is_none()
    {
        return Err(err(
            "the region runs past the end of the address space".into()
        ));
    }
    let size = usize::try_from(info.memory_size).map_err(|e| err(e.to_string()))?;
    check_file(
        &file,
        info.mmap_offset,
        info.memory_size,
        opts.allow_unsealed,
    )
    .map_err(err)?;
    let region = MmapRegion::build(
        Some(FileOffset::new(file, info.mmap_offset)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| err(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(info.guest_phys_addr))
        .ok_or_else(|| err("region runs past the end of the address space".into()))
}

impl MemTable {
    /// Map `regions` (SET_MEM_TABLE).
    pub fn new(regions: Vec<RegionFd>, opts: MapOptions) -> Result<Self, MemError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemError::TooMany {
                got: regions.len(),
                max: MAX_REGIONS,
            });
        }
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            let mapped = map(&r.region, File::from(r.fd), opts)?;
            out.push(Region {
                info: r.region,
                mapped: Arc::new(mapped),
            });
        }
        Self::from_regions(out)
    }

    fn from_regions(mut regions: Vec<Region>) -> Result<Self, MemError> {
        // vm-memory refuses a memory of no region; REM_MEM_REG of the last one leaves that.
        if regions.is_empty() {
            return Ok(Self::empty());
        }
        regions.sort_by_key(|r| r.info.guest_phys_addr);
        let mem =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapped.clone()).collect())
                .map_err(|e| MemError::Overlap(e.to_string()))?;
        regions.sort_by_key(|r| r.info.userspace_addr);
        for w in regions.windows(2) {
            let (a, b) = (&w[0].info, &w[1].info);
            if a.userspace_addr + (a.memory_size - 1) >= b.userspace_addr {
                return Err(MemError::Overlap(format!(
                    "front-end addresses {:#x} and {:#x}",
                    a.userspace_addr, b.userspace_addr
                )));
            }
        }
        Ok(MemTable { mem, regions })
    }

    /// An empty table.
    pub fn empty() -> Self {
        MemTable {
            mem: GuestMemoryMmap::new(),
            regions: Vec::new(),
        }
    }

    /// This table with one more region (ADD_MEM_REG).
    pub fn with_region(&self, r: RegionFd, opts: MapOptions) -> Result<Self, MemError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemError::TooMany {
                got: self.regions.len() + 1,
                max: MAX_REGIONS,
            });
        }
        let mapped = map(&r.region, File::from(r.fd), opts)?;
        let mut regions = self.regions.clone();
        regions.push(Region {
            info: r.region,
            mapped: Arc::new(mapped),
        });
        Self::from_regions(regions)
    }

    /// This table without the region at `region.guest_phys_addr` (REM_MEM_REG).
    pub fn without_region(&self, region: &MemoryRegion) -> Result<Self, MemError> {
        let before = self.regions.len();
        let regions: Vec<Region> = self
            .regions
            .iter()
            .filter(|r| {
                !(r.info.guest_phys_addr == region.guest_phys_addr
                    && r.info.memory_size == region.memory_size)
            })
            .cloned()
            .collect();
        if regions.len() == before {
            return Err(MemError::NoSuchRegion {
                gpa: region.guest_phys_addr,
            });
        }
        Self::from_regions(regions)
    }

    /// The guest-physical memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether there is no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The guest-physical pieces of the front-end virtual range `uaddr..uaddr + len`, in
    /// order; every byte must be in some region.
    pub fn va_to_gpa(&self, uaddr: u64, len: u64) -> Result<Vec<(u64, u64)>, MemError> {
        let not_mapped = MemError::NotMapped { uaddr, len };
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = uaddr
            .checked_add(len - 1)
            .ok_or(MemError::NotMapped { uaddr, len })?;
        let mut out = Vec::new();
        let mut cur = uaddr;
        loop {
            let i = self
                .regions
                .partition_point(|r| r.info.userspace_addr <= cur)
                .checked_sub(1)
                .ok_or(MemError::NotMapped { uaddr, len })?;
            let r = &self.regions[i].info;
            let r_last = r.userspace_addr + (r.memory_size - 1);
            if cur > r_last {
                return Err(not_mapped);
            }
            let end = r_last.min(last);
            out.push((r.guest_phys_addr + (cur - r.userspace_addr), end - cur + 1));
            if end == last {
                return Ok(out);
            }
            cur = end + 1;
        }
    }

    /// The guest-physical address of a front-end virtual range that must be contiguous in
    /// guest-physical space (a ring area without the IOMMU).
    pub fn va_to_gpa_contiguous(&self, uaddr: u64, len: u64) -> Result<u64, MemError> {
        let pieces = self.va_to_gpa(uaddr, len.max(1))?;
        let first = pieces.first().ok_or(MemError::NotMapped { uaddr, len })?.0;
        let mut expect = first;
        for (gpa, n) in &pieces {
            if *gpa != expect {
                return Err(MemError::NotMapped { uaddr, len });
            }
            expect = gpa + n;
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use vm_memory::Bytes;

    use rustix::fs::{memfd_create, MemfdFlags, SealFlags};

    const SEALED: MapOptions = MapOptions {
        allow_unsealed: false,
    };

    /// A memfd of `len` bytes, sealed as QEMU seals its own.
    fn memfd(len: u64) -> OwnedFd {
        let fd = unsealed(len);
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        fd
    }

    fn unsealed(len: u64) -> OwnedFd {
        let fd = memfd_create("memtable", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uaddr,
            mmap_offset: off,
        }
    }

    #[test]
    fn two_regions_of_one_memfd_like_qemu() {
        let fd = memfd(0x40_0000);
        let t = MemTable::new(
            vec![
                RegionFd {
                    region: region(0, 0x20_0000, 0x7f00_0000_0000, 0),
                    fd: fd.try_clone().unwrap(),
                },
                RegionFd {
                    region: region(0x100_0000, 0x20_0000, 0x7f00_0020_0000, 0x20_0000),
                    fd,
                },
            ],
            SEALED,
        )
        .unwrap();
        // Front-end addresses map across the two regions.
        assert_eq!(
            t.va_to_gpa(0x7f00_001f_f000, 0x2000).unwrap(),
            vec![(0x1f_f000, 0x1000), (0x100_0000, 0x1000)]
        );
        assert!(t.va_to_gpa_contiguous(0x7f00_001f_f000, 0x2000).is_err());
        assert_eq!(
            t.va_to_gpa_contiguous(0x7f00_0000_1000, 0x100).unwrap(),
            0x1000
        );
        assert!(matches!(
            t.va_to_gpa(0x7f00_0040_0000, 1),
            Err(MemError::NotMapped { .. })
        ));
        assert!(t.va_to_gpa(u64::MAX, 2).is_err());
        // Both views of the memfd are the same memory.
        t.memory()
            .write_obj(0xabcdu16, GuestAddress(0x100_0010))
            .unwrap();
        let again = t.with_region(
            RegionFd {
                region: region(0x200_0000, 0x1000, 0x6000_0000, 0),
                fd: memfd(0x1000),
            },
            SEALED,
        );
        let again = again.unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(
            again
                .memory()
                .read_obj::<u16>(GuestAddress(0x100_0010))
                .unwrap(),
            0xabcd
        );
        let less = again
            .without_region(&region(0x200_0000, 0x1000, 0, 0))
            .unwrap();
        assert_eq!(less.len(), 2);
        assert!(less.without_region(&region(0x999_0000, 1, 0, 0)).is_err());
        // Down to no region at all (REM_MEM_REG of the last), and back.
        let none = less
            .without_region(&region(0, 0x20_0000, 0, 0))
            .and_then(|t| t.without_region(&region(0x100_0000, 0x20_0000, 0, 0)))
            .unwrap();
        assert!(none.is_empty());
        let one = none.with_region(
            RegionFd {
                region: region(0, 0x1000, 0x6000_0000, 0),
                fd: memfd(0x1000),
            },
            SEALED,
        );
        assert_eq!(one.unwrap().len(), 1);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let r = |gpa, uaddr| RegionFd {
            region: region(gpa, 0x1000, uaddr, 0),
            fd: memfd(0x1000),
        };
        assert!(MemTable::new(vec![r(0, 0x10_0000), r(0x800, 0x20_0000)], SEALED).is_err());
        assert!(MemTable::new(vec![r(0, 0x10_0000), r(0x10_0000, 0x10_0800)], SEALED).is_err());
    }

    #[test]
    fn regions_at_the_end_of_the_address_space_or_empty_are_refused() {
        let r = |gpa, size, uaddr| RegionFd {
            region: region(gpa, size, uaddr, 0),
            fd: memfd(0x2000),
        };
        for (gpa, size, uaddr) in [
            (0, 0, 0x1000),
            (0, 0x2000, u64::MAX - 0xfff),
            (u64::MAX - 0xfff, 0x2000, 0x1000),
        ] {
            assert!(
                matches!(
                    MemTable::new(vec![r(gpa, size, uaddr)], SEALED),
                    Err(MemError::Map { .. })
                ),
                "{gpa:#x}+{size:#x} at {uaddr:#x}"
            );
        }
        // Up to the last page of both spaces (vm-memory wants the end of a region to fit
        // in 64 bits, so the very last page is out).
        let near_end = u64::MAX - 0x1fff;
        assert!(MemTable::new(vec![r(near_end, 0x1000, near_end)], SEALED).is_ok());
    }

    #[test]
    fn an_unsealed_memfd_is_refused_unless_allowed() {
        let r = |fd| RegionFd {
            region: region(0, 0x1000, 0x1000_0000, 0),
            fd,
        };
        let e = MemTable::new(vec![r(unsealed(0x1000))], SEALED).unwrap_err();
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
        // Created without sealing allowed: it can never be sealed, and is refused the same.
        let plain = memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, 0x1000).unwrap();
        assert!(MemTable::new(vec![r(plain)], SEALED).is_err());
        let allow = MapOptions {
            allow_unsealed: true,
        };
        assert!(MemTable::new(vec![r(unsealed(0x1000))], allow).is_ok());
        // Sealed against shrinking only: enough.
        let shrink = unsealed(0x1000);
        rustix::fs::fcntl_add_seals(&shrink, SealFlags::SHRINK).unwrap();
        assert!(MemTable::new(vec![r(shrink)], SEALED).is_ok());
        // A regular file is not a memfd: only its size is checked.
        let dir = std::env::temp_dir().join(format!("memtable-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        let _ = std::fs::remove_file(&dir);
        f.set_len(0x800).unwrap();
        let short = f.try_clone().unwrap();
        assert!(
            MemTable::new(vec![r(OwnedFd::from(short))], SEALED).is_err(),
            "too short"
        );
        f.set_len(0x1000).unwrap();
        assert!(MemTable::new(vec![r(OwnedFd::from(f))], SEALED).is_ok());
    }
}
