//! The vIOMMU model: the IOMMU side's I/O page table, IOVA allocator and invalidation policy.
//!
//! A [`Viommu`] holds one domain: 4 KiB and 2 MiB pages mapping IOVAs to guest-physical
//! addresses with a permission. It answers a device's MISS with the UPDATE covering the
//! largest run of pages around the address that is contiguous in both IOVA and guest-physical
//! space and has the same permission, up to a limit (QEMU answers one page at a time; set the
//! limit to 4 KiB to behave like it). It forwards unmaps to every attached device IOTLB
//! ([`DeviceIotlb`], whatever the transport) as INVALIDATEs:
//!
//! - strict: each unmap is invalidated, and the IOVA is reused only after every device
//!   acknowledged; a batch of unmaps ([`Viommu::unmap_all`]) goes as the fewest INVALIDATEs
//!   that cover exactly what it unmapped (adjacent ranges merged, see [`coalesce`]);
//! - lazy: unmaps are queued and flushed together (one whole-space INVALIDATE, as a Linux
//!   guest's flush queue ends up), their IOVAs reused only after the flush.
//!
//! Optionally the UPDATE is pushed at map time ("pre-push"), before any miss.
//!
//! The page table, the IOVA allocator and the range arithmetic are plain data in
//! [`table`]; this file is the policy around them.
//!
//! A fault answer and an unmap never interleave (`order`): otherwise an answer computed just
//! before an unmap could reach the device after the INVALIDATE and leave it a translation for
//! a page the guest freed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iotlb::{Access, IovaRange, Perm};

pub mod table;
use parking_lot::{Mutex, RwLock};
pub use table::{coalesce, IovaAllocator, PageTable};

/// Small page.
pub const PAGE: u64 = 4096;

/// The range a lazy flush invalidates: every IOVA but the last byte of the space, which no
/// mapping reaches (the allocator stays below it). Not the whole space: that is iova 0,
/// size 0 on the wire, which Linux takes as everything but DPDK's vhost library (22.11)
/// takes as nothing, keeping every stale translation; `size = 2^64 - 1` means the same to
/// both.
pub fn flush_range() -> IovaRange {
    IovaRange::new(0, u64::MAX - 1).unwrap_or(IovaRange::FULL)
}
/// Large page.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Why a vIOMMU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ViommuError {
    /// An address or length not aligned to 4 KiB, or zero.
    #[error("map of {len:#x} bytes at IOVA {iova:#x} -> {gpa:#x} is not 4 KiB aligned")]
    Unaligned {
        /// IOVA.
        iova: u64,
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The IOVA range is already (partly) mapped.
    #[error("IOVA range {0} is already mapped")]
    Busy(IovaRange),
    /// Unmapping part of a large page, or a range with nothing mapped.
    #[error("cannot unmap {0}: {1}")]
    Unmap(IovaRange, &'static str),
    /// The IOVA space is exhausted.
    #[error("IOVA space exhausted")]
    NoSpace,
    /// A device did not take an UPDATE or INVALIDATE.
    #[error("device IOTLB: {0}")]
    Forward(#[from] ForwardError),
}

/// Why a device IOTLB did not take an UPDATE or INVALIDATE.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The vhost-user transport failed (the back-end refused, or the connection broke).
    #[error("vhost-user: {0}")]
    Wire(#[from] wire::WireError),
    /// The kernel vhost device failed.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// A guest-physical address with no front-end virtual address.
    #[error("guest-physical {0:#x} has no address in the front-end's space")]
    NoAddress(u64),
    /// A range that cannot be represented.
    #[error(transparent)]
    Range(#[from] iotlb::RangeError),
}

/// A device IOTLB the vIOMMU forwards to (a vhost-user back-end, a kernel vhost device).
pub trait DeviceIotlb: Send + Sync {
    /// `range` now maps to guest-physical `gpa` with `perm`.
    fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), ForwardError>;
    /// Drop every translation of `range`; returns once the device acknowledged.
    fn invalidate(&self, range: IovaRange) -> Result<(), ForwardError>;

    /// Several UPDATEs; a transport that can pipeline them overrides this.
    fn update_all(&self, updates: &[(IovaRange, u64, Perm)]) -> Result<(), ForwardError> {
        updates
            .iter()
            .try_for_each(|&(r, gpa, perm)| self.update(r, gpa, perm))
    }

    /// UPDATEs pushed ahead of use (pre-push): the device may miss on them before it has
    /// applied them (the miss is answered as any other), so a transport that can send them
    /// without waiting for the device overrides this; by default they are applied as
    /// [`DeviceIotlb::update_all`].
    fn push_all(&self, updates: &[(IovaRange, u64, Perm)]) -> Result<(), ForwardError> {
        self.update_all(updates)
    }

    /// Several INVALIDATEs, all acknowledged when this returns; a transport that can
    /// pipeline them overrides this.
    fn invalidate_all(&self, ranges: &[IovaRange]) -> Result<(), ForwardError> {
        ranges.iter().try_for_each(|&r| self.invalidate(r))
    }
}

/// When unmaps reach the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Every unmap, acknowledged before its IOVA is reused.
    Strict,
    /// Queued; flushed (one whole-space INVALIDATE) when `batch` unmaps are waiting.
    Lazy {
        /// Unmaps per flush.
        batch: usize,
    },
}

/// vIOMMU settings.
#[derive(Debug, Clone, Copy)]
pub struct ViommuConfig {
    /// How unmaps are forwarded.
    pub invalidation: Invalidation,
    /// Push the UPDATE at map time.
    pub prepush: bool,
    /// Largest UPDATE sent in answer to a miss, in bytes (at least one page).
    pub max_update: u64,
    /// Wait for the device to acknowledge each UPDATE that answers a miss, as QEMU does.
    /// Without, the answers are posted ([`DeviceIotlb::push_all`]): safe, because answers
    /// and INVALIDATEs go out under one lock, in the order the page table changed, so an
    /// answer can never land after the INVALIDATE of what it maps.
    pub ack_answers: bool,
}

impl Default for ViommuConfig {
    fn default() -> Self {
        ViommuConfig {
            invalidation: Invalidation::Strict,
            prepush: false,
            max_update: 2 << 20,
            ack_answers: false,
        }
    }
}

/// Counters of the IOMMU side.
#[derive(Debug, Default)]
pub struct ViommuStats {
    /// Maps.
    pub maps: AtomicU64,
    /// Unmaps.
    pub unmaps: AtomicU64,
    /// Misses answered with an UPDATE.
    pub faults_answered: AtomicU64,
    /// Misses for unmapped IOVAs (left unanswered, as QEMU does).
    pub faults_unmapped: AtomicU64,
    /// INVALIDATEs forwarded.
    pub invalidations: AtomicU64,
    /// UPDATEs pushed at map time.
    pub prepushed: AtomicU64,
}

struct Domain {
    table: PageTable,
    alloc: IovaAllocator,
    /// Lazy mode: unmapped ranges waiting for the next flush (their IOVAs are not reusable).
    queued: VecDeque<(u64, u64)>,
}

/// The vIOMMU: one domain, forwarding to attached device IOTLBs.
pub struct Viommu {
    domain: Mutex<Domain>,
    /// Serialises fault answers with unmaps (see the module doc).
    order: Mutex<()>,
    devices: RwLock<Vec<Arc<dyn DeviceIotlb>>>,
    config: ViommuConfig,
    stats: ViommuStats,
}

impl std::fmt::Debug for Viommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viommu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The first IOVA the allocator hands out (IOVAs differ from guest-physical addresses).
pub const IOVA_BASE: u64 = 0x40_0000_0000;

impl Viommu {
    /// A vIOMMU with an empty domain.
    pub fn new(config: ViommuConfig) -> Self {
        Viommu {
            domain: Mutex::new(Domain {
                table: PageTable::default(),
                alloc: IovaAllocator::new(IOVA_BASE, IOVA_BASE << 4),
                queued: VecDeque::new(),
            }),
            order: Mutex::new(()),
            devices: RwLock::new(Vec::new()),
            config,
            stats: ViommuStats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ViommuConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &ViommuStats {
        &self.stats
    }

    /// Forward to `dev` from now on.
    pub fn attach(&self, dev: Arc<dyn DeviceIotlb>) {
        self.devices.write().push(dev);
    }

    /// Stop forwarding to every device.
    pub fn detach_all(&self) {
        self.devices.write().clear();
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Map `len` bytes of guest-physical memory at `gpa` at a fresh IOVA.
    pub fn map(&self, gpa: u64, len: u64, perm: Perm) -> Result<u64, ViommuError> {
        let iova = {
            let mut d = self.domain.lock();
            let iova = d.alloc.alloc(len)?;
            let len = len.div_ceil(PAGE) * PAGE;
            if let Err(e) = d.table.map(iova, gpa, len, perm) {
                d.alloc.free(iova, len);
                return Err(e);
            }
            iova
        };
        Self::add(&self.stats.maps);
        if self.config.prepush {
            self.push(iova, gpa, len.div_ceil(PAGE) * PAGE, perm)?;
        }
        Ok(iova)
    }

    /// Map several buffers (`(gpa, len, perm)` each) at fresh IOVAs, returned in order. With
    /// pre-push, their UPDATEs go to each device as one batch (one round trip). If one fails,
    /// those mapped before it stay mapped (the caller unmaps them).
    pub fn map_all(&self, bufs: &[(u64, u64, Perm)]) -> Result<Vec<u64>, ViommuError> {
        let mut iovas = Vec::with_capacity(bufs.len());
        {
            let mut d = self.domain.lock();
            for &(gpa, len, perm) in bufs {
                let iova = d.alloc.alloc(len)?;
                let len = len.div_ceil(PAGE) * PAGE;
                if let Err(e) = d.table.map(iova, gpa, len, perm) {
                    d.alloc.free(iova, len);
                    return Err(e);
                }
                iovas.push(iova);
            }
        }
        self.stats
            .maps
            .fetch_add(bufs.len() as u64, Ordering::Relaxed);
        if self.config.prepush {
            let mut updates = Vec::with_capacity(bufs.len());
            for (&iova, &(gpa, len, perm)) in iovas.iter().zip(bufs) {
                let range = IovaRange::from_size(iova, len.div_ceil(PAGE) * PAGE)
                    .map_err(ForwardError::from)?;
                updates.push((range, gpa, perm));
            }
            let _order = self.order.lock();
            for dev in self.devices.read().iter() {
                dev.push_all(&updates)?;
            }
            self.stats
                .prepushed
                .fetch_add(bufs.len() as u64, Ordering::Relaxed);
        }
        Ok(iovas)
    }

    /// Map at a given IOVA (rings the driver placed itself).
    pub fn map_at(&self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), ViommuError> {
        self.domain.lock().table.map(iova, gpa, len, perm)?;
        Self::add(&self.stats.maps);
        if self.config.prepush {
            self.push(iova, gpa, len, perm)?;
        }
        Ok(())
    }

    fn push(&self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), ViommuError> {
        let range = IovaRange::from_size(iova, len).map_err(ForwardError::from)?;
        let _order = self.order.lock();
        for dev in self.devices.read().iter() {
            dev.push_all(&[(range, gpa, perm)])?;
        }
        Self::add(&self.stats.prepushed);
        Ok(())
    }

    /// Unmap `len` bytes at `iova` (mapped by [`Viommu::map`]) and forward it as configured.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), ViommuError> {
        let len = len.div_ceil(PAGE) * PAGE;
        let range = IovaRange::from_size(iova, len)
            .map_err(|_| ViommuError::Unmap(IovaRange::byte(iova), "bad length"))?;
        Self::add(&self.stats.unmaps);
        match self.config.invalidation {
            Invalidation::Strict => {
                let _order = self.order.lock();
                self.domain.lock().table.unmap(range)?;
                self.forward_invalidate(range)?;
                self.domain.lock().alloc.free(iova, len);
                Ok(())
            }
            Invalidation::Lazy { batch } => {
                let flush = {
                    let mut d = self.domain.lock();
                    d.table.unmap(range)?;
                    d.queued.push_back((iova, len));
                    d.queued.len() >= batch.max(1)
                };
                if flush {
                    self.flush()?;
                }
                Ok(())
            }
        }
    }

    /// Unmap several ranges at once (a driver completing a batch of requests). Strict mode
    /// forwards their INVALIDATEs together (pipelined by transports that can), and reuses
    /// the IOVAs only after all were acknowledged. On an error nothing more is unmapped.
    pub fn unmap_all(&self, ranges: &[(u64, u64)]) -> Result<(), ViommuError> {
        let Invalidation::Strict = self.config.invalidation else {
            return ranges
                .iter()
                .try_for_each(|&(iova, len)| self.unmap(iova, len));
        };
        let mut rs = Vec::with_capacity(ranges.len());
        for &(iova, len) in ranges {
            let len = len.div_ceil(PAGE) * PAGE;
            let r = IovaRange::from_size(iova, len)
                .map_err(|_| ViommuError::Unmap(IovaRange::byte(iova), "bad length"))?;
            rs.push((r, iova, len));
        }
        let _order = self.order.lock();
        {
            let mut d = self.domain.lock();
            for (i, &(r, _, _)) in rs.iter().enumerate() {
                if let Err(e) = d.table.unmap(r) {
                    // Forward what was unmapped before failing.
                    drop(d);
                    let done: Vec<IovaRange> = rs[..i].iter().map(|x| x.0).collect();
                    self.forward_invalidate_all(&done)?;
                    return Err(e);
                }
            }
        }
        let all: Vec<IovaRange> = rs.iter().map(|x| x.0).collect();
        self.stats
            .unmaps
            .fetch_add(rs.len() as u64, Ordering::Relaxed);
        self.forward_invalidate_all(&all)?;
        let mut d = self.domain.lock();
        for (_, iova, len) in rs {
            d.alloc.free(iova, len);
        }
        Ok(())
    }

    /// Forward a batch of unmaps: ranges that touch or overlap go as one INVALIDATE (the
    /// union of what was unmapped, nothing more), as Linux gathers the pages of an unmap.
    fn forward_invalidate_all(&self, ranges: &[IovaRange]) -> Result<(), ViommuError> {
        let merged = coalesce(ranges);
        if merged.is_empty() {
            return Ok(());
        }
        for dev in self.devices.read().iter() {
            dev.invalidate_all(&merged)?;
        }
        self.stats
            .invalidations
            .fetch_add(merged.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Lazy mode: invalidate everything queued (one INVALIDATE of the whole space, see
    /// [`flush_range`]) and make those IOVAs reusable. Strict mode: nothing to do.
    pub fn flush(&self) -> Result<(), ViommuError> {
        let _order = self.order.lock();
        let queued: Vec<(u64, u64)> = self.domain.lock().queued.drain(..).collect();
        if queued.is_empty() {
            return Ok(());
        }
        self.forward_invalidate(flush_range())?;
        let mut d = self.domain.lock();
        for (iova, len) in queued {
            d.alloc.free(iova, len);
        }
        Ok(())
    }

    fn forward_invalidate(&self, range: IovaRange) -> Result<(), ViommuError> {
        for dev in self.devices.read().iter() {
            dev.invalidate(range)?;
        }
        Self::add(&self.stats.invalidations);
        Ok(())
    }

    /// Answer a MISS at `iova` on `dev`: send it the UPDATE for the run around `iova`, with
    /// the mapping's permission whatever the access asked for (a device that asked RO for a
    /// ring it later writes must be given what the mapping allows). Returns whether an
    /// UPDATE was sent; an unmapped IOVA gets nothing, as with QEMU.
    pub fn fault(
        &self,
        dev: &dyn DeviceIotlb,
        iova: u64,
        _access: Access,
    ) -> Result<bool, ViommuError> {
        let _order = self.order.lock();
        let run = self
            .domain
            .lock()
            .table
            .run(iova, self.config.max_update.max(PAGE));
        match run {
            Some(run) => {
                self.answer(dev, &[run])?;
                Self::add(&self.stats.faults_answered);
                Ok(true)
            }
            None => {
                Self::add(&self.stats.faults_unmapped);
                Ok(false)
            }
        }
    }

    /// Send UPDATEs answering misses: acknowledged one by one as QEMU does, or posted
    /// ([`ViommuConfig::ack_answers`]). The caller holds the order lock.
    fn answer(
        &self,
        dev: &dyn DeviceIotlb,
        updates: &[(IovaRange, u64, Perm)],
    ) -> Result<(), ForwardError> {
        for (range, gpa, perm) in updates {
            tracing::trace!(?range, gpa = %format_args!("{gpa:#x}"), ?perm, "vIOMMU: UPDATE");
        }
        if self.config.ack_answers {
            dev.update_all(updates)
        } else {
            dev.push_all(updates)
        }
    }

    /// Answer several MISSes on `dev` at once: one UPDATE per distinct run (pipelined by
    /// transports that can). Returns how many were answered (the others are unmapped).
    pub fn fault_all(
        &self,
        dev: &dyn DeviceIotlb,
        misses: &[(u64, Access)],
    ) -> Result<usize, ViommuError> {
        let _order = self.order.lock();
        let mut updates: Vec<(IovaRange, u64, Perm)> = Vec::with_capacity(misses.len());
        let mut answered = 0;
        {
            let d = self.domain.lock();
            // Lowest first: an answer runs forward from its miss, so it covers the misses
            // above it on the same run, which need none of their own.
            let mut sorted: Vec<u64> = misses.iter().map(|&(iova, _)| iova).collect();
            sorted.sort_unstable();
            for iova in sorted {
                if updates.iter().any(|x| x.0.contains(iova)) {
                    answered += 1;
                    continue;
                }
                match d.table.run(iova, self.config.max_update.max(PAGE)) {
                    Some(u) => {
                        answered += 1;
                        updates.push(u);
                    }
                    None => Self::add(&self.stats.faults_unmapped),
                }
            }
        }
        if !updates.is_empty() {
            self.answer(dev, &updates)?;
        }
        self.stats
            .faults_answered
            .fetch_add(answered as u64, Ordering::Relaxed);
        Ok(answered)
    }

    /// Guest-physical address and permission of `iova`.
    pub fn translate(&self, iova: u64) -> Option<(u64, Perm)> {
        self.domain.lock().table.translate(iova)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> IovaRange {
        IovaRange::from_size(start, len).unwrap()
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl DeviceIotlb for Recorder {
        fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), ForwardError> {
            self.0.lock().push(format!("U {range} {gpa:#x} {perm:?}"));
            Ok(())
        }
        fn invalidate(&self, range: IovaRange) -> Result<(), ForwardError> {
            self.0.lock().push(format!("I {range}"));
            Ok(())
        }
    }

    #[test]
    fn strict_lazy_and_prepush_forwarding() {
        let rec = Arc::new(Recorder::default());
        let v = Viommu::new(ViommuConfig::default());
        v.attach(rec.clone());
        let iova = v.map(0x5000, PAGE, Perm::ReadOnly).unwrap();
        assert!(
            v.fault(&*rec, iova + 8, Access::Write).unwrap(),
            "answered with RO anyway"
        );
        v.unmap(iova, PAGE).unwrap();
        assert!(!v.fault(&*rec, iova, Access::Read).unwrap());
        assert_eq!(
            *rec.0.lock(),
            vec![
                format!("U {} 0x5000 ReadOnly", r(iova, PAGE)),
                format!("I {}", r(iova, PAGE))
            ]
        );
        // Strict: the IOVA is reusable at once; lazy: only after the flush.
        assert_eq!(v.map(0x6000, PAGE, Perm::ReadWrite).unwrap(), iova);

        let rec = Arc::new(Recorder::default());
        let v = Viommu::new(ViommuConfig {
            invalidation: Invalidation::Lazy { batch: 2 },
            prepush: true,
            ..ViommuConfig::default()
        });
        v.attach(rec.clone());
        let a = v.map(0x5000, PAGE, Perm::ReadWrite).unwrap();
        v.unmap(a, PAGE).unwrap();
        let b = v.map(0x6000, PAGE, Perm::ReadWrite).unwrap();
        assert_ne!(a, b, "not reused before the flush");
        v.unmap(b, PAGE).unwrap(); // second unmap: flush
        let log = rec.0.lock().clone();
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log[0].starts_with("U ") && log[1].starts_with("U "));
        assert_eq!(log[2], format!("I {}", flush_range()));
        assert_eq!(
            flush_range().size(),
            Some(u64::MAX),
            "a size every peer honours"
        );
        assert_eq!(v.stats().prepushed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_batch_of_unmaps_is_forwarded_as_few_invalidates_as_cover_it() {
        let rec = Arc::new(Recorder::default());
        let v = Viommu::new(ViommuConfig::default());
        v.attach(rec.clone());
        // Three adjacent mappings, then one apart from them.
        let m = v
            .map_all(&[
                (0x5000, PAGE, Perm::ReadOnly),
                (0x5000, PAGE, Perm::WriteOnly),
                (0x9000, 2 * PAGE, Perm::WriteOnly),
            ])
            .unwrap();
        let gap = v.map(0x10000, PAGE, Perm::ReadOnly).unwrap();
        let apart = v.map(0x20000, PAGE, Perm::ReadOnly).unwrap();
        v.unmap(gap, PAGE).unwrap();
        rec.0.lock().clear();
        let before = v.stats().invalidations.load(Ordering::Relaxed);
        v.unmap_all(&[(apart, PAGE), (m[2], 2 * PAGE), (m[0], PAGE), (m[1], PAGE)])
            .unwrap();
        assert_eq!(
            *rec.0.lock(),
            vec![
                format!("I {}", r(m[0], 4 * PAGE)),
                format!("I {}", r(apart, PAGE))
            ],
            "the adjacent three as one; the still-unmapped gap keeps the fourth apart"
        );
        assert_eq!(v.stats().invalidations.load(Ordering::Relaxed) - before, 2);
        assert_eq!(v.stats().unmaps.load(Ordering::Relaxed), 5);
        assert!(v.translate(m[1]).is_none() && v.translate(apart).is_none());
    }

    #[test]
    fn misses_on_one_run_get_one_answer_from_the_lowest() {
        let rec = Arc::new(Recorder::default());
        let v = Viommu::new(ViommuConfig::default());
        v.attach(rec.clone());
        // One 4-page buffer: contiguous in both spaces, one run.
        let iova = v.map(0x10000, 4 * PAGE, Perm::ReadWrite).unwrap();
        let misses = [
            (iova + 2 * PAGE, Access::Write),
            (iova + PAGE, Access::Write),
            (iova + 3 * PAGE + 8, Access::Write),
        ];
        assert_eq!(
            v.fault_all(&*rec, &misses).unwrap(),
            3,
            "all three answered"
        );
        assert_eq!(
            *rec.0.lock(),
            vec![format!("U {} 0x11000 ReadWrite", r(iova + PAGE, 3 * PAGE))],
            "one UPDATE, from the lowest miss forward, never before it"
        );
    }
}
