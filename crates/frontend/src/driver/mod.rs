//! A virtio-blk guest driver simulator over one split ring, for tests and benchmarks.
//!
//! It plays the guest kernel: it owns its rings and buffers in [`GuestRam`] (guest-physical
//! addresses), and gives the device what a Linux guest would: guest-physical addresses
//! without an IOMMU, IOVAs behind one. Behind the IOMMU its buffers are mapped either once
//! ([`Mapping::Persistent`], a driver with a fixed buffer pool; the IOTLB warms up) or for
//! every request and unmapped when it completes ([`Mapping::PerRequest`], what Linux's DMA
//! API does for a block device: header, data and status are three mappings, each unmapped on
//! completion, strict or lazy as the vIOMMU is configured).
//!
//! Each request moves one *block* of `block_pages` pages (header, data buffer, status byte),
//! on disk blocks owned by its slot so that requests in flight never overlap. A data buffer
//! is contiguous in guest-physical memory; buffers are scattered, so that no two of them
//! merge into one IOTLB entry. Data is checked end to end: every write
//! stores a pattern naming the block and a version, every read must return the latest one.
//! Pages whose mappings were torn down are filled with poison when the unmap is complete
//! (strict: when the INVALIDATE was acknowledged; lazy: at the flush) and checked intact
//! when reused: a device that wrote through a translation after acknowledging its
//! invalidation breaks the poison.
//!
//! Guest memory is only reached through vm-memory's volatile accessors. Nothing here knows
//! the back-end's internals.
//!
//! The driver is split by concept: this file holds its configuration, report and the
//! request loop; `requests.rs` builds, publishes and completes requests on the split ring;
//! `pages.rs` hands out per-request buffer pages and keeps their poison.

mod net;
mod pages;
mod requests;
mod ring;

pub use net::{NetDriver, NetDriverConfig, NetReport, DRIVER_MAC, MAX_FRAME, NET_HDR, PEER_MAC};

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotlb::hist::Histogram;
use iotlb::Perm;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::testing::Rng;
use vm_memory::{Bytes, GuestAddress};

use crate::vhost_user::{FrontendError, GuestRam, VhostUserFrontend};
use crate::viommu::{Viommu, ViommuError, PAGE};
use pages::PagePool;
use requests::{Slot, UNKNOWN};
use ring::DriverRing;

/// How buffers are mapped behind the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Once, at setup.
    Persistent,
    /// For each request, unmapped on completion.
    PerRequest,
}

/// The driver's settings.
#[derive(Debug, Clone, Copy)]
pub struct DriverConfig {
    /// Queue index.
    pub queue: u16,
    /// Ring size (a power of two).
    pub queue_size: u16,
    /// Requests in flight (at most `queue_size / 3`: three descriptors each).
    pub inflight: u16,
    /// Pages per request's data buffer (the request size is `4 KiB * block_pages`).
    pub block_pages: u32,
    /// How buffers are mapped (ignored without an IOMMU).
    pub mapping: Mapping,
    /// Data buffers each slot cycles through with [`Mapping::Persistent`]: the working set is
    /// `inflight * buffers_per_slot` buffers, each mapped on its own.
    pub buffers_per_slot: u32,
    /// Percentage of writes.
    pub write_percent: u8,
    /// Blocks (of `block_pages` pages) of the disk to use.
    pub disk_blocks: u64,
    /// Check read data and poison.
    pub verify: bool,
    /// The disk reads zero where this driver has not written (a fresh disk). If not, a block
    /// is checked only after this run wrote it.
    pub fresh_disk: bool,
    /// Random seed.
    pub seed: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            queue: 0,
            queue_size: 128,
            inflight: 32,
            block_pages: 1,
            mapping: Mapping::PerRequest,
            buffers_per_slot: 1,
            write_percent: 50,
            disk_blocks: 4096,
            verify: true,
            fresh_disk: true,
            seed: 1,
        }
    }
}

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Setting the queue up failed.
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    /// The vIOMMU refused a map or an unmap.
    #[error("vIOMMU: {0}")]
    Viommu(#[from] ViommuError),
    /// Guest memory access failed (a bug in the layout).
    #[error("guest memory: {0}")]
    Memory(String),
    /// The configuration does not fit.
    #[error("{0}")]
    Config(String),
    /// No completion for too long.
    #[error("no completion for {0:?} with {1} requests in flight")]
    Stalled(Duration, usize),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct DriverReport {
    /// Requests completed.
    pub requests: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Completed with a status other than OK.
    pub errors: u64,
    /// Reads whose data was not the latest written.
    pub verify_failures: u64,
    /// Freed buffers found written after their unmap was complete.
    pub poison_violations: u64,
    /// Freed buffers checked for poison when reused.
    pub poison_checks: u64,
    /// Used entries that named no request in flight (a device bug).
    pub bad_completions: u64,
    /// Submission to completion.
    pub latency: Histogram,
    /// Time spent running.
    pub elapsed: Duration,
}

impl DriverReport {
    /// Whether anything went wrong.
    pub fn clean(&self) -> bool {
        self.errors == 0
            && self.verify_failures == 0
            && self.poison_violations == 0
            && self.bad_completions == 0
    }
}

/// The driver of one queue.
pub struct BlkDriver<'a> {
    fe: &'a VhostUserFrontend,
    ram: Arc<GuestRam>,
    viommu: Option<Arc<Viommu>>,
    cfg: DriverConfig,
    /// Bytes per request.
    bytes: u64,
    ring: DriverRing,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pool: PagePool,
    versions: Vec<u32>,
    rng: Rng,
    buf: Vec<u8>,
    expect: Vec<u8>,
    report: DriverReport,
}

impl std::fmt::Debug for BlkDriver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Hands out guest-physical pages at setup.
struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    fn pages(&mut self, n: u64) -> Result<u64, DriverError> {
        let at = self.next;
        let end = n
            .checked_mul(PAGE)
            .and_then(|b| at.checked_add(b))
            .filter(|&e| e <= self.end)
            .ok_or_else(|| DriverError::Config("guest RAM too small for the driver".into()))?;
        self.next = end;
        Ok(at)
    }
}

impl<'a> BlkDriver<'a> {
    /// Lay the queue out in guest RAM (from `ram_base`, to the end of RAM), map what is
    /// mapped once, and start the queue on the device.
    pub fn new(
        fe: &'a VhostUserFrontend,
        cfg: DriverConfig,
        ram_base: u64,
    ) -> Result<Self, DriverError> {
        if !cfg.queue_size.is_power_of_two()
            || cfg.inflight == 0
            || cfg.inflight > cfg.queue_size / 3
        {
            return Err(DriverError::Config(format!(
                "queue size {} (a power of two) and {} in flight (1..=size/3)",
                cfg.queue_size, cfg.inflight
            )));
        }
        let inflight = u64::from(cfg.inflight);
        if cfg.block_pages == 0 || cfg.block_pages > 256 {
            return Err(DriverError::Config(format!(
                "{} pages per request (1..=256)",
                cfg.block_pages
            )));
        }
        let bp = u64::from(cfg.block_pages);
        let bytes = bp * PAGE;
        if cfg.disk_blocks < inflight {
            return Err(DriverError::Config(format!(
                "{} disk blocks for {} requests in flight",
                cfg.disk_blocks, cfg.inflight
            )));
        }
        let ram = fe.ram().clone();
        let viommu = fe.viommu().cloned();
        let mut bump = Bump {
            next: ram_base.div_ceil(PAGE) * PAGE,
            end: ram.size(),
        };
        let ring = DriverRing::start(fe, &mut bump, cfg.queue, cfg.queue_size)?;
        let persistent = viommu.is_none() || cfg.mapping == Mapping::Persistent;
        let per_slot = if persistent {
            u64::from(cfg.buffers_per_slot.max(1))
        } else {
            0
        };
        let share = cfg.disk_blocks / inflight;
        let mut slots = Vec::with_capacity(cfg.inflight as usize);
        // Buffers are scattered (shuffled), with a guard page after each, so that no two are
        // contiguous: each mapping is its own IOTLB entry, as a real guest's page cache gives.
        let pool_buffers = if persistent { 0 } else { inflight * 4 };
        let buffers = inflight * per_slot + pool_buffers;
        let meta_base = bump.pages(inflight)?;
        let data_base = bump.pages(buffers * (bp + 1))?;
        let mut rng = Rng::new(cfg.seed);
        let mut pages: Vec<u64> = (0..buffers)
            .map(|i| data_base + i * (bp + 1) * PAGE)
            .collect();
        for i in (1..pages.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            pages.swap(i, j);
        }
        for s in 0..inflight {
            let meta_gpa = meta_base + s * PAGE;
            let (hdr_dev, status_dev) = match (&viommu, persistent) {
                (Some(v), true) => (
                    v.map(meta_gpa, PAGE, Perm::ReadOnly)?,
                    v.map(meta_gpa, PAGE, Perm::WriteOnly)?,
                ),
                _ => (meta_gpa, meta_gpa),
            };
            let mut data = Vec::with_capacity(per_slot as usize);
            for _ in 0..per_slot {
                let gpa = pages
                    .pop()
                    .ok_or_else(|| DriverError::Config("pages".into()))?;
                let dev = match &viommu {
                    Some(v) => v.map(gpa, bytes, Perm::ReadWrite)?,
                    None => gpa,
                };
                data.push((gpa, dev));
            }
            slots.push(Slot {
                meta_gpa,
                hdr_dev,
                status_dev,
                data,
                first_block: s * share,
                blocks: share,
                busy: None,
            });
        }
        Ok(BlkDriver {
            fe,
            ram,
            viommu,
            cfg,
            bytes,
            ring,
            free_slots: (0..slots.len()).rev().collect(),
            slots,
            pool: PagePool::new(pages, bytes as usize, cfg.verify),
            versions: vec![if cfg.fresh_disk { 0 } else { UNKNOWN }; cfg.disk_blocks as usize],
            rng,
            buf: vec![0; bytes as usize],
            expect: vec![0; bytes as usize],
            report: DriverReport::default(),
        })
    }

    /// Guest RAM the driver needs beyond `ram_base` for `cfg` (rings, request headers, data
    /// pages), rounded to pages.
    pub fn ram_needed(cfg: &DriverConfig) -> u64 {
        let inflight = u64::from(cfg.inflight);
        let rings = DriverRing::ram_needed(cfg.queue_size) / PAGE;
        let buffers = inflight * u64::from(cfg.buffers_per_slot.max(1)) + inflight * 4;
        let bp = u64::from(cfg.block_pages.max(1));
        (rings + inflight + buffers * (bp + 1) + 1) * PAGE
    }

    fn mem_err(e: impl std::fmt::Display) -> DriverError {
        DriverError::Memory(e.to_string())
    }

    fn write<T: vm_memory::ByteValued>(&self, gpa: u64, v: T) -> Result<(), DriverError> {
        self.ram
            .memory()
            .write_obj(v, GuestAddress(gpa))
            .map_err(Self::mem_err)
    }

    /// Keep every slot busy until `deadline` or `max_requests` completions, then wait for
    /// what is in flight. Fails if nothing completes for `stall` while requests are out.
    pub fn run(
        &mut self,
        deadline: Instant,
        max_requests: Option<u64>,
        stall: Duration,
    ) -> Result<(), DriverError> {
        let start = Instant::now();
        let mut submitted = 0u64;
        let mut last_progress = Instant::now();
        loop {
            let stopping =
                Instant::now() >= deadline || max_requests.is_some_and(|m| submitted >= m);
            let mut batch = 0;
            while !stopping && max_requests.is_none_or(|m| submitted < m) {
                let Some(s) = self.free_slots.pop() else {
                    break;
                };
                self.submit(s)?;
                submitted += 1;
                batch += 1;
            }
            if batch > 0 {
                self.publish()?;
            }
            let inflight = self.slots.len() - self.free_slots.len();
            if stopping && inflight == 0 {
                break;
            }
            if self.harvest()? > 0 {
                last_progress = Instant::now();
                continue;
            }
            if inflight > 0 && last_progress.elapsed() >= stall {
                return Err(DriverError::Stalled(stall, inflight));
            }
            // Wait for an interrupt (the device signals after publishing used entries, so
            // one that came after the check above is pending on the eventfd).
            let mut fds = [PollFd::new(&self.ring.notifiers.call, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            self.ring.notifiers.take_call();
        }
        if let Some(v) = &self.viommu {
            v.flush()?;
            self.pool.release_deferred(&self.ram, Some(v));
        }
        self.report.poison_checks = self.pool.count.checks;
        self.report.poison_violations = self.pool.count.violations;
        self.report.elapsed += start.elapsed();
        Ok(())
    }

    /// Bytes per request.
    pub fn request_bytes(&self) -> u64 {
        self.bytes
    }

    /// Start counting afresh (after a warm-up).
    pub fn reset_report(&mut self) {
        self.report = DriverReport::default();
        self.pool.count = Default::default();
    }

    /// What was done so far.
    pub fn report(&self) -> &DriverReport {
        &self.report
    }

    /// Stop the queue (GET_VRING_BASE) and return the report; the base must equal what was
    /// submitted (nothing in flight is lost).
    pub fn finish(self) -> Result<DriverReport, DriverError> {
        let base = self.fe.stop_queue(self.cfg.queue)?;
        if base != self.ring.avail_idx {
            return Err(DriverError::Config(format!(
                "GET_VRING_BASE returned {base}, {} requests were submitted",
                self.ring.avail_idx
            )));
        }
        Ok(self.report)
    }
}
