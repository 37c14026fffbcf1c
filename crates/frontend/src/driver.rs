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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iotlb::hist::Histogram;
use iotlb::Perm;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::testing::Rng;
use vm_memory::{Bytes, GuestAddress};

use crate::vhost_user::{FrontendError, GuestRam, Notifiers, RingSetup, VhostUserFrontend};
use crate::viommu::{Invalidation, Viommu, ViommuError, PAGE};

/// `VIRTIO_BLK_T_IN`.
const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
const T_OUT: u32 = 1;
/// Sector size.
const SECTOR: u64 = 512;
/// `VIRTQ_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const F_WRITE: u16 = 2;
/// Status byte before the device writes it.
const STATUS_UNSET: u8 = 0xff;
/// Fill of freed pages.
const POISON: u64 = 0xdead_beef_0bad_f00d;
/// A block whose content is unknown (a write that failed).
const UNKNOWN: u32 = u32::MAX;

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

/// The content of `block` at `version` (version 0: a fresh, zeroed disk).
fn pattern(block: u64, version: u32, out: &mut [u8]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    let seed = (block << 32) ^ u64::from(version);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = (seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xff51_afd7_ed55_8ccd);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn poison_page(out: &mut [u8]) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&POISON.to_le_bytes());
    }
}

/// A request in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    submitted: Instant,
    write: bool,
    block: u64,
    version: u32,
    data_gpa: u64,
    /// Per-request mappings to tear down: header, status, data.
    maps: [u64; 3],
}

#[derive(Debug)]
struct Slot {
    /// Header at +0, status at +16.
    meta_gpa: u64,
    /// Persistent mappings of the header and status (device addresses).
    hdr_dev: u64,
    status_dev: u64,
    /// Persistent data pages: guest-physical, device address.
    data: Vec<(u64, u64)>,
    /// First disk block of the slot's share and how many.
    first_block: u64,
    blocks: u64,
    busy: Option<InFlight>,
}

/// Buffers for per-request mappings, with poison checks.
#[derive(Debug)]
struct PagePool {
    free: Vec<u64>,
    /// Pages whose unmap is not complete yet (lazy): the invalidation count before it.
    deferred: Vec<(u64, u64)>,
    poisoned: std::collections::HashSet<u64>,
}

/// The driver of one queue.
pub struct BlkDriver<'a> {
    fe: &'a VhostUserFrontend,
    ram: Arc<GuestRam>,
    viommu: Option<Arc<Viommu>>,
    cfg: DriverConfig,
    /// Bytes per request.
    bytes: u64,
    desc: u64,
    avail: u64,
    used: u64,
    notifiers: Notifiers,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pool: PagePool,
    avail_idx: u16,
    last_used: u16,
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
        let n = u64::from(cfg.queue_size);
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
        let desc = bump.pages((16 * n).div_ceil(PAGE))?;
        let avail = bump.pages((6 + 2 * n).div_ceil(PAGE))?;
        let used = bump.pages((6 + 8 * n).div_ceil(PAGE))?;
        // Ring addresses as the device sees them: mapped for good behind the IOMMU.
        let (desc_dev, avail_dev, used_dev) = match &viommu {
            Some(v) => (
                v.map(desc, (16 * n).div_ceil(PAGE) * PAGE, Perm::ReadOnly)?,
                v.map(avail, (6 + 2 * n).div_ceil(PAGE) * PAGE, Perm::ReadOnly)?,
                v.map(used, (6 + 8 * n).div_ceil(PAGE) * PAGE, Perm::ReadWrite)?,
            ),
            None => (desc, avail, used),
        };
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
        let notifiers = fe.start_queue(RingSetup {
            index: cfg.queue,
            size: cfg.queue_size,
            desc: desc_dev,
            avail: avail_dev,
            used: used_dev,
        })?;
        Ok(BlkDriver {
            fe,
            ram,
            viommu,
            cfg,
            bytes,
            desc,
            avail,
            used,
            notifiers,
            free_slots: (0..slots.len()).rev().collect(),
            slots,
            pool: PagePool {
                free: pages,
                deferred: Vec::new(),
                poisoned: Default::default(),
            },
            avail_idx: 0,
            last_used: 0,
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
        let n = u64::from(cfg.queue_size);
        let inflight = u64::from(cfg.inflight);
        let rings =
            (16 * n).div_ceil(PAGE) + (6 + 2 * n).div_ceil(PAGE) + (6 + 8 * n).div_ceil(PAGE);
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

    /// Take a page for a per-request buffer, checking its poison.
    fn take_page(&mut self) -> Result<u64, DriverError> {
        self.release_deferred();
        if self.pool.free.is_empty() && !self.pool.deferred.is_empty() {
            // Lazy mode ran the pool dry before a batch filled: flush now, as a guest's
            // flush timer would.
            if let Some(v) = &self.viommu {
                v.flush()?;
            }
            self.release_deferred();
        }
        let gpa = self
            .pool
            .free
            .pop()
            .ok_or_else(|| DriverError::Config("per-request page pool empty".into()))?;
        if self.cfg.verify && self.pool.poisoned.remove(&gpa) {
            self.ram
                .memory()
                .read_slice(&mut self.buf, GuestAddress(gpa))
                .map_err(Self::mem_err)?;
            poison_page(&mut self.expect);
            self.report.poison_checks += 1;
            if self.buf != self.expect {
                self.report.poison_violations += 1;
                tracing::error!(
                    gpa = %format_args!("{gpa:#x}"),
                    "driver: a page was written after its unmap was acknowledged"
                );
            }
        }
        Ok(gpa)
    }

    /// A page whose mappings are being torn down: poison it once no device may reach it.
    fn put_page(&mut self, gpa: u64, invalidations_before: u64) {
        self.pool.deferred.push((gpa, invalidations_before));
        self.release_deferred();
    }

    fn release_deferred(&mut self) {
        let done = match &self.viommu {
            Some(v) => v.stats().invalidations.load(Ordering::Relaxed),
            None => u64::MAX,
        };
        let strict = self
            .viommu
            .as_ref()
            .is_none_or(|v| v.config().invalidation == Invalidation::Strict);
        let mut i = 0;
        while i < self.pool.deferred.len() {
            let (gpa, before) = self.pool.deferred[i];
            // Strict: the unmap returned after the acknowledgement. Lazy: wait for a flush.
            if strict || done > before {
                self.pool.deferred.swap_remove(i);
                if self.cfg.verify {
                    poison_page(&mut self.buf);
                    if self
                        .ram
                        .memory()
                        .write_slice(&self.buf, GuestAddress(gpa))
                        .is_ok()
                    {
                        self.pool.poisoned.insert(gpa);
                    }
                }
                self.pool.free.push(gpa);
            } else {
                i += 1;
            }
        }
    }

    fn submit(&mut self, s: usize) -> Result<(), DriverError> {
        let write = self.rng.below(100) < u64::from(self.cfg.write_percent);
        let (first, blocks, meta) = {
            let slot = &self.slots[s];
            (slot.first_block, slot.blocks, slot.meta_gpa)
        };
        let block = first + self.rng.below(blocks);
        let current = self.versions[block as usize];
        let version = if write {
            if current == UNKNOWN {
                1
            } else {
                current.wrapping_add(1).max(1)
            }
        } else {
            current
        };
        let per_request = self.viommu.is_some() && self.cfg.mapping == Mapping::PerRequest;
        let data_gpa = if per_request {
            self.take_page()?
        } else {
            let slot = &self.slots[s];
            slot.data[self.rng.below(slot.data.len() as u64) as usize].0
        };
        if write {
            pattern(block, version, &mut self.buf);
        } else {
            // Garbage, so that a read the device did not do is noticed.
            self.buf.fill(0xa5);
        }
        if write || self.cfg.verify {
            self.ram
                .memory()
                .write_slice(&self.buf, GuestAddress(data_gpa))
                .map_err(Self::mem_err)?;
        }
        // virtio_blk_outhdr, then the status byte.
        self.write(meta, if write { T_OUT } else { T_IN }.to_le())?;
        self.write(meta + 4, 0u32)?;
        self.write(meta + 8, (block * (self.bytes / SECTOR)).to_le())?;
        self.write(meta + 16, STATUS_UNSET)?;
        let data_perm = if write {
            Perm::ReadOnly
        } else {
            Perm::WriteOnly
        };
        let (hdr, status, data, maps) = if per_request {
            let v = self
                .viommu
                .as_ref()
                .ok_or_else(|| DriverError::Config("per-request mapping needs a vIOMMU".into()))?;
            let m = v.map_all(&[
                (meta, PAGE, Perm::ReadOnly),
                (meta, PAGE, Perm::WriteOnly),
                (data_gpa, self.bytes, data_perm),
            ])?;
            (m[0], m[1], m[2], [m[0], m[1], m[2]])
        } else {
            let slot = &self.slots[s];
            let dev = slot
                .data
                .iter()
                .find(|(g, _)| *g == data_gpa)
                .map_or(data_gpa, |&(_, d)| d);
            (slot.hdr_dev, slot.status_dev, dev, [0; 3])
        };
        let head = (s * 3) as u16;
        let d = self.desc + u64::from(head) * 16;
        let descs: [(u64, u32, u16); 3] = [
            (hdr, 16, F_NEXT),
            (
                data,
                self.bytes as u32,
                F_NEXT | if write { 0 } else { F_WRITE },
            ),
            (status + 16, 1, F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let at = d + 16 * i as u64;
            self.write(at, addr.to_le())?;
            self.write(at + 8, len.to_le())?;
            self.write(at + 12, flags.to_le())?;
            self.write(at + 14, (head + i as u16 + 1).to_le())?;
        }
        let ring_slot = u64::from(self.avail_idx % self.cfg.queue_size);
        self.write(self.avail + 4 + 2 * ring_slot, head.to_le())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.slots[s].busy = Some(InFlight {
            submitted: Instant::now(),
            write,
            block,
            version,
            data_gpa,
            maps,
        });
        Ok(())
    }

    fn publish(&self) -> Result<(), DriverError> {
        // Descriptors and ring entries before the index (release).
        self.ram
            .memory()
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .map_err(Self::mem_err)?;
        self.notifiers.kick();
        Ok(())
    }

    /// Take every completion the device published; returns how many.
    fn harvest(&mut self) -> Result<usize, DriverError> {
        let used_idx = u16::from_le(
            self.ram
                .memory()
                .load::<u16>(GuestAddress(self.used + 2), Ordering::Acquire)
                .map_err(Self::mem_err)?,
        );
        let mut n = 0;
        let mut teardown = Vec::new();
        while self.last_used != used_idx {
            let at = self.used + 4 + 8 * u64::from(self.last_used % self.cfg.queue_size);
            let id: u32 = self
                .ram
                .memory()
                .read_obj(GuestAddress(at))
                .map_err(Self::mem_err)?;
            self.last_used = self.last_used.wrapping_add(1);
            self.complete(u32::from_le(id), &mut teardown)?;
            n += 1;
        }
        // Unmap the batch's buffers together, as a guest's completion handler does: their
        // INVALIDATEs go out pipelined, and the pages are freed once all are acknowledged.
        if let (Some(v), false) = (&self.viommu, teardown.is_empty()) {
            let before = v.stats().invalidations.load(Ordering::Relaxed);
            let mut ranges = Vec::with_capacity(3 * teardown.len());
            for (maps, _) in &teardown {
                let [h, st, d] = *maps;
                ranges.extend([(h, PAGE), (st, PAGE), (d, self.bytes)]);
            }
            v.unmap_all(&ranges)?;
            for (_, page) in teardown {
                self.put_page(page, before);
            }
        }
        Ok(n)
    }

    fn complete(
        &mut self,
        id: u32,
        teardown: &mut Vec<([u64; 3], u64)>,
    ) -> Result<(), DriverError> {
        let s = (id / 3) as usize;
        let busy = if id % 3 == 0 {
            self.slots.get_mut(s).and_then(|slot| slot.busy.take())
        } else {
            None
        };
        let Some(r) = busy else {
            self.report.bad_completions += 1;
            tracing::error!(id, "driver: used entry for no request in flight");
            return Ok(());
        };
        let meta = self.slots[s].meta_gpa;
        let status: u8 = self
            .ram
            .memory()
            .read_obj(GuestAddress(meta + 16))
            .map_err(Self::mem_err)?;
        let ok = status == 0;
        if !ok {
            self.report.errors += 1;
            tracing::warn!(
                status,
                block = r.block,
                write = r.write,
                "driver: request failed"
            );
        }
        if r.write {
            self.report.writes += 1;
            self.versions[r.block as usize] = if ok { r.version } else { UNKNOWN };
        } else {
            self.report.reads += 1;
            if ok && self.cfg.verify && r.version != UNKNOWN {
                self.ram
                    .memory()
                    .read_slice(&mut self.buf, GuestAddress(r.data_gpa))
                    .map_err(Self::mem_err)?;
                pattern(r.block, r.version, &mut self.expect);
                if self.buf != self.expect {
                    self.report.verify_failures += 1;
                    tracing::error!(
                        block = r.block,
                        version = r.version,
                        gpa = %format_args!("{:#x}", r.data_gpa),
                        got = ?&self.buf[..16],
                        want = ?&self.expect[..16],
                        "driver: read returned wrong data"
                    );
                }
            }
        }
        if self.viommu.is_some() && self.cfg.mapping == Mapping::PerRequest {
            teardown.push((r.maps, r.data_gpa));
        }
        self.report.latency.record(r.submitted.elapsed());
        self.report.requests += 1;
        self.free_slots.push(s);
        Ok(())
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
            let mut fds = [PollFd::new(&self.notifiers.call, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            self.notifiers.take_call();
        }
        if let Some(v) = &self.viommu {
            v.flush()?;
            self.release_deferred();
        }
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
    }

    /// What was done so far.
    pub fn report(&self) -> &DriverReport {
        &self.report
    }

    /// Stop the queue (GET_VRING_BASE) and return the report; the base must equal what was
    /// submitted (nothing in flight is lost).
    pub fn finish(self) -> Result<DriverReport, DriverError> {
        let base = self.fe.stop_queue(self.cfg.queue)?;
        if base != self.avail_idx {
            return Err(DriverError::Config(format!(
                "GET_VRING_BASE returned {base}, {} requests were submitted",
                self.avail_idx
            )));
        }
        Ok(self.report)
    }
}
