//! Dirty logging for live migration: the bitmap the front-end shares with SET_LOG_BASE, and
//! whether writes go into it now.
//!
//! The log is one bit per 4 KiB page of guest-physical memory: page `n` is bit `n % 8` of
//! byte `n / 8` (the same as bit `n % 64` of little-endian 64-bit word `n / 64`, which is how
//! QEMU reads and clears it). Bits are set with an atomic OR on shared memory the front-end
//! clears concurrently, so a bit set is never lost and one cleared is set again by the next
//! write.
//!
//! Writes are logged only while `VHOST_F_LOG_ALL` is negotiated and a log is mapped, and
//! always by guest-physical address (design invariant 10): the IOTLB's targets are
//! guest-physical (an UPDATE's `uaddr` is resolved through the memory table when it is
//! applied, see `session.rs`), so what the engine logs is the address it wrote through,
//! never the IOVA the driver gave. The engine logs after each write: the buffers of a chain
//! when it completes it, before the used index that publishes them, and every used-ring
//! write (`virtq::Queue`). A log that is replaced (a bigger one while migrating) is swapped
//! under a write lock: once SET_LOG_BASE is answered no writer can still mark the old one,
//! which the front-end then reads a last time.
//!
//! `--broken log-iova` ([`LogMode::BrokenIova`]) logs the addresses the driver gave instead,
//! to show that the migration test catches that bug. Nothing here touches guest memory.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use parking_lot::RwLock;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};
use wire::vhost_user::LogArea;

use crate::memory::check_file;

pub use wire::vhost_user::LOG_PAGE;

/// The largest log accepted: 1 GiB, one bit per page of 32 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// What is logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogMode {
    /// Guest-physical pages written (correct).
    #[default]
    Gpa,
    /// The addresses the driver gave (IOVAs behind an IOMMU): a known bug, for tests only.
    BrokenIova,
}

/// Why a log could not be mapped.
#[derive(Debug, thiserror::Error)]
#[error("cannot map the dirty log ({size:#x} bytes at offset {offset:#x}): {reason}")]
pub struct LogError {
    size: u64,
    offset: u64,
    reason: String,
}

/// A mapped log.
#[derive(Debug)]
struct Mapped {
    region: MmapRegion,
    bytes: u64,
}

/// A connection's dirty log.
#[derive(Debug, Default)]
pub struct SharedLog {
    mode: LogMode,
    map: RwLock<Option<Mapped>>,
    /// `VHOST_F_LOG_ALL` negotiated.
    on: AtomicBool,
    /// `on` and a log mapped: the one flag the hot path reads.
    active: AtomicBool,
    /// Bits we set that were clear (pages newly dirtied since the front-end last looked).
    pub pages: AtomicU64,
    /// Pages beyond the end of the log (a log smaller than guest memory: not logged).
    pub beyond: AtomicU64,
    /// Requests completed with their buffers logged (served while migrating).
    pub requests: AtomicU64,
}

impl SharedLog {
    /// A log that logs `mode`'s addresses once it is mapped and switched on.
    pub fn new(mode: LogMode) -> Self {
        SharedLog {
            mode,
            ..SharedLog::default()
        }
    }

    /// Map the log of SET_LOG_BASE (replacing any earlier one). The fd is checked as a
    /// memory region's is: a memfd must be sealed against shrinking unless `allow_unsealed`,
    /// and the file must hold the whole log.
    pub fn map(&self, area: LogArea, file: File, allow_unsealed: bool) -> Result<(), LogError> {
        let err = |reason: String| LogError {
            size: area.mmap_size,
            offset: area.mmap_offset,
            reason,
        };
        if area.mmap_size == 0 || area.mmap_size > MAX_LOG_BYTES {
            return Err(err(format!(
                "a log of 1 to {MAX_LOG_BYTES:#x} bytes is accepted"
            )));
        }
        check_file(&file, area.mmap_offset, area.mmap_size, allow_unsealed).map_err(err)?;
        let size = usize::try_from(area.mmap_size).map_err(|e| err(e.to_string()))?;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, area.mmap_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| err(e.to_string()))?;
        *self.map.write() = Some(Mapped {
            region,
            bytes: area.mmap_size,
        });
        self.update_active();
        Ok(())
    }

    /// Switch logging on or off (`VHOST_F_LOG_ALL` in SET_FEATURES).
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        self.update_active();
    }

    /// Forget the log (the connection ended or the device was reset).
    pub fn unmap(&self) {
        *self.map.write() = None;
        self.update_active();
    }

    fn update_active(&self) {
        let mapped = self.map.read().is_some();
        self.active
            .store(mapped && self.on.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Set the bits of the pages of `gpa..gpa + len`.
    fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        // The last byte, clamped at the top of the space (no wrap).
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let guard = self.map.read();
        let Some(m) = guard.as_ref() else {
            return;
        };
        let slice = m.region.as_volatile_slice();
        let bits = m.bytes.saturating_mul(8);
        if last >= bits {
            let out = last - first.max(bits) + 1;
            if self.beyond.fetch_add(out, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    gpa = %format_args!("{gpa:#x}"),
                    log_bytes = m.bytes,
                    "vhost-user: a write beyond the dirty log's end is not logged (the log is \
                     smaller than guest memory)"
                );
            }
        }
        if first >= bits {
            return;
        }
        let last = last.min(bits - 1);
        let mut page = first;
        let mut newly = 0u64;
        while page <= last {
            let byte = page / 8;
            let lo = page % 8;
            let hi = if last / 8 == byte { last % 8 } else { 7 };
            let mask = ((0xffu16 << lo) & (0xffu16 >> (7 - hi))) as u8;
            // The byte lies inside the mapping: byte < bytes (checked through `bits`).
            if let Ok(b) = slice.get_atomic_ref::<AtomicU8>(byte as usize) {
                let before = b.fetch_or(mask, Ordering::SeqCst);
                newly += u64::from((mask & !before).count_ones());
            }
            page = (byte + 1) * 8;
        }
        if newly > 0 {
            self.pages.fetch_add(newly, Ordering::Relaxed);
        }
    }

    /// A request's buffers were logged.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether page `page` is marked (tests).
    pub fn is_marked(&self, page: u64) -> bool {
        let guard = self.map.read();
        let Some(m) = guard.as_ref() else {
            return false;
        };
        if page / 8 >= m.bytes {
            return false;
        }
        m.region
            .as_volatile_slice()
            .get_atomic_ref::<AtomicU8>((page / 8) as usize)
            .is_ok_and(|b| b.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
    }
}

impl virtq::DirtyLog for SharedLog {
    #[inline]
    fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn log(&self, gpa: u64, len: u64) {
        if self.active() {
            self.mark(gpa, len);
        }
    }

    fn logs_iovas(&self) -> bool {
        self.mode == LogMode::BrokenIova
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags, SealFlags};
    use virtq::DirtyLog;

    fn log_of(bytes: u64) -> (SharedLog, File) {
        let fd = memfd_create("log", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, bytes).unwrap();
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let file = File::from(fd);
        let log = SharedLog::new(LogMode::Gpa);
        let area = LogArea {
            mmap_size: bytes,
            mmap_offset: 0,
        };
        log.map(area, file.try_clone().unwrap(), false).unwrap();
        (log, file)
    }

    fn bytes_of(file: &File, n: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; n];
        file.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn bits_are_pages_of_the_written_range_in_the_shared_file() {
        let (log, file) = log_of(16);
        assert!(!log.active(), "off until LOG_ALL");
        log.log(0, 1);
        assert_eq!(bytes_of(&file, 16), vec![0; 16], "nothing while off");
        log.set_on(true);
        assert!(log.active());
        log.log(0x1fff, 2); // pages 1 and 2
        log.log(9 * LOG_PAGE, 8 * LOG_PAGE); // pages 9..=16
        log.log(127 * LOG_PAGE + 5, 1); // the last page of the log
        let b = bytes_of(&file, 16);
        assert_eq!(b[0], 0b0000_0110);
        assert_eq!(b[1], 0b1111_1110);
        assert_eq!(b[2], 0b0000_0001);
        assert_eq!(b[15], 0b1000_0000);
        assert!(b[3..15].iter().all(|&x| x == 0));
        assert_eq!(log.pages.load(Ordering::Relaxed), 2 + 8 + 1);
        // Again: nothing new.
        log.log(0x1000, 0x2000);
        assert_eq!(log.pages.load(Ordering::Relaxed), 11);
        assert!(log.is_marked(16) && !log.is_marked(17));
    }

    #[test]
    fn past_the_end_and_at_the_top_of_the_space_nothing_wraps() {
        let (log, file) = log_of(2);
        log.set_on(true);
        log.log(15 * LOG_PAGE, 3 * LOG_PAGE); // pages 15..=17: only 15 is in the log
        assert_eq!(bytes_of(&file, 2), vec![0, 0x80]);
        assert_eq!(log.beyond.load(Ordering::Relaxed), 2);
        log.log(u64::MAX - 10, 100);
        log.log(0, 0);
        assert_eq!(bytes_of(&file, 2), vec![0, 0x80]);
        assert_eq!(log.beyond.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_log_is_refused_when_its_file_cannot_hold_it_or_it_is_absurd() {
        let fd = memfd_create("log", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let file = File::from(fd);
        let log = SharedLog::new(LogMode::Gpa);
        let area = |mmap_size, mmap_offset| LogArea {
            mmap_size,
            mmap_offset,
        };
        // Unsealed memfd.
        assert!(log
            .map(area(4096, 0), file.try_clone().unwrap(), false)
            .is_err());
        // Too big for the file, empty, absurd, overflowing.
        for a in [
            area(8192, 0),
            area(0, 0),
            area(MAX_LOG_BYTES + 1, 0),
            area(4096, u64::MAX - 100),
        ] {
            assert!(
                log.map(a, file.try_clone().unwrap(), true).is_err(),
                "{a:?}"
            );
        }
        log.set_on(true);
        assert!(!log.active(), "nothing mapped");
        log.map(area(4096, 0), file, true).unwrap();
        assert!(log.active());
        log.unmap();
        assert!(!log.active());
    }
}
