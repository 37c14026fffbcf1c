//! The dirty log a migrating VMM hands a vhost-user back-end (SET_LOG_BASE): a bitmap of
//! guest-physical pages in a sealed memfd, as QEMU's `vhost_log_alloc` makes one, and the
//! take-and-clear of the pages the back-end marked, as QEMU's log sync does.
//!
//! Memory only: negotiating and sending it is [`crate::vhost_user`]'s business. The log is
//! shared with a back-end that writes it concurrently, so it is reached only through
//! vm-memory's atomic accessors, never as a `&[u8]`.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory};
use wire::vhost_user::LogArea;

use crate::vhost_user::{io, FrontendError};

pub use wire::vhost_user::LOG_PAGE;

/// The dirty log of a migration: one bit per [`LOG_PAGE`] of guest-physical memory, page `n`
/// at bit `n % 8` of byte `n / 8`, in a memfd shared with the back-end by SET_LOG_BASE.
///
/// The back-end sets bits with atomic ORs while it runs; [`DirtyLog::take_pages`] takes them
/// as QEMU's `vhost_dev_sync_region` does, a 64-bit word at a time with an atomic exchange
/// against zero, so a bit set concurrently is either taken now or left for the next take,
/// never lost. Word `w` holds pages `64 w ..= 64 w + 63` when read little-endian, which is
/// the byte layout above. The memory is reached only through vm-memory's atomic accessors:
/// the back-end writes it concurrently, so no `&[u8]` of it is ever made.
#[derive(Debug)]
pub struct DirtyLog {
    fd: OwnedFd,
    region: MmapRegion,
    bytes: u64,
}

impl DirtyLog {
    /// A zeroed log for `ram_bytes` of guest memory from guest-physical 0, in a memfd sealed
    /// as QEMU seals its log (no shrinking, no growing, no further seals).
    pub fn new(ram_bytes: u64) -> Result<Self, FrontendError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let bytes = Self::bytes_for(ram_bytes);
        if bytes == 0 {
            return Err(FrontendError::Invalid(
                "a dirty log for no guest memory".into(),
            ));
        }
        let sys = |what| {
            move |e: rustix::io::Errno| FrontendError::Io {
                what,
                source: e.into(),
            }
        };
        let fd = rustix::fs::memfd_create(
            "vhost-iotlb-dirty-log",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(sys("memfd_create dirty log"))?;
        rustix::fs::ftruncate(&fd, bytes).map_err(sys("ftruncate dirty log"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(sys("seal dirty log"))?;
        let file = std::fs::File::from(fd.try_clone().map_err(io("dup dirty log fd"))?);
        let len = usize::try_from(bytes).map_err(|e| FrontendError::Invalid(e.to_string()))?;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| FrontendError::Invalid(format!("mapping the dirty log: {e}")))?;
        Ok(DirtyLog { fd, region, bytes })
    }

    /// The log's size for `ram_bytes` of memory: a bit per page, in whole 64-bit words (as
    /// QEMU sizes it, `vhost_get_log_size`).
    pub fn bytes_for(ram_bytes: u64) -> u64 {
        ram_bytes.div_ceil(LOG_PAGE).div_ceil(64) * 8
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The area SET_LOG_BASE describes: the whole memfd.
    pub fn area(&self) -> LogArea {
        LogArea {
            mmap_size: self.bytes,
            mmap_offset: 0,
        }
    }

    /// A descriptor of the memfd, to send or to read it with `pread`.
    pub fn fd(&self) -> Result<OwnedFd, FrontendError> {
        self.fd.try_clone().map_err(io("dup dirty log fd"))
    }

    /// The log's 64-bit words, in order (each inside the mapping and 8-byte aligned, as
    /// the mapping is page-aligned and its length a multiple of 8).
    fn words(&self) -> impl Iterator<Item = (u64, &AtomicU64)> + '_ {
        (0..self.bytes / 8).filter_map(move |w| {
            let offset = usize::try_from(w * 8).ok()?;
            self.region
                .get_atomic_ref::<AtomicU64>(offset)
                .ok()
                .map(|word| (w, word))
        })
    }

    /// Pages marked now, left marked.
    pub fn count_pages(&self) -> u64 {
        self.words()
            .map(|(_, word)| u64::from(word.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Take the marked pages: clear them, call `each` with every page number taken, in
    /// increasing order, and return how many there were.
    pub fn take_pages(&self, mut each: impl FnMut(u64)) -> u64 {
        let mut taken = 0;
        for (w, word) in self.words() {
            // Most words are clear: look before the exchange, as QEMU does.
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = u64::from_le(word.swap(0, Ordering::AcqRel));
            taken += u64::from(bits.count_ones());
            while bits != 0 {
                each(w * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_has_a_bit_per_page_in_whole_words() {
        assert_eq!(DirtyLog::bytes_for(0), 0);
        assert_eq!(DirtyLog::bytes_for(4096), 8);
        assert_eq!(DirtyLog::bytes_for(64 * 4096), 8);
        assert_eq!(DirtyLog::bytes_for(65 * 4096), 16);
        // A partial page is a page.
        assert_eq!(DirtyLog::bytes_for(64 * 4096 + 1), 16);
        assert_eq!(DirtyLog::bytes_for(2 << 20), 64);
        assert_eq!(DirtyLog::bytes_for(1 << 30), 32 << 10);
        assert!(DirtyLog::new(0).is_err());
    }

    #[test]
    fn pages_marked_through_the_fd_are_taken_once_in_order() {
        use rustix::fs::SealFlags;
        let log = DirtyLog::new(200 * 4096).unwrap();
        assert_eq!(log.bytes(), 32);
        assert_eq!(
            log.area(),
            LogArea {
                mmap_size: 32,
                mmap_offset: 0
            }
        );
        let fd = log.fd().unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert_eq!(log.count_pages(), 0);
        // Marked through the file, not through the log's mapping (as the back-end's own
        // mapping would): page n is bit n % 8 of byte n / 8.
        let mark = |page: u64| {
            let mut b = [0u8];
            rustix::io::pread(&fd, &mut b, page / 8).unwrap();
            b[0] |= 1 << (page % 8);
            rustix::io::pwrite(&fd, &b, page / 8).unwrap();
        };
        let pages = [0u64, 7, 8, 63, 64, 130, 199];
        for p in pages {
            mark(p);
        }
        assert_eq!(log.count_pages(), pages.len() as u64);
        let mut taken = Vec::new();
        assert_eq!(log.take_pages(|p| taken.push(p)), pages.len() as u64);
        assert_eq!(taken, pages);
        // Cleared in the file too, and nothing twice.
        let mut all = [0xffu8; 32];
        rustix::io::pread(&fd, &mut all, 0).unwrap();
        assert_eq!(all, [0; 32]);
        assert_eq!(log.take_pages(|_| panic!("taken twice")), 0);
        mark(5);
        assert_eq!(log.take_pages(|p| assert_eq!(p, 5)), 1);
    }
}
