//! A virtio-net guest driver simulator: receive queue 0 and transmit queue 1, for the net
//! benchmark and tests. It sends frames of one size (a sequence number, the length, a
//! pattern and a checksum: `guest::frames`) to a peer that sends each one back with the MAC
//! addresses swapped (our loopback, testpmd's macswap), and checks every frame that returns
//! byte for byte.
//!
//! - Receive buffers are posted and recycled: the receive ring is kept full, one page per
//!   buffer (room for the 12-byte `virtio_net_hdr_v1` and the frame; no `MRG_RXBUF`).
//! - Behind the IOMMU, buffers are mapped once ([`Mapping::Persistent`]: a fixed pool,
//!   used in turn, so that `buffers` sets the working set) or per frame
//!   ([`Mapping::PerRequest`]: what Linux's virtio_net does under the DMA API: a receive
//!   buffer mapped when posted and unmapped when it comes back, a transmit buffer mapped
//!   when sent and unmapped when the device is done with it). Unmapped buffers are poisoned
//!   and checked when reused (`pages.rs`).
//! - At most `inflight` frames are out at once (sent, not back). A peer may drop frames
//!   (testpmd does when its enqueue misses in its IOTLB): the ring keeps order, so a frame
//!   that comes back tells that the ones sent before it that are still out were lost; and
//!   when nothing comes back for a while after the device took every frame (16 times the
//!   mean round trip while sending, within 100 µs and `loss_timeout`; at least 200 ms at the
//!   end, which is not timed), all that are out are counted lost. One that turns up later is
//!   counted late, not lost.
//! - The miss round trip is measured here, the same way for any back-end: from a MISS for a
//!   buffer's page received by the front-end (or, if later, from the ring's previous used
//!   entry: a miss asked ahead was not waited on meanwhile) to the used entry of that buffer.
//!
//! Guest memory is only reached through vm-memory's accessors. Nothing here knows the
//! back-end's internals.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::frames;
use iotlb::hist::Histogram;
use iotlb::Perm;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::testing::Rng;
use vm_memory::{Bytes, GuestAddress};

use super::pages::PagePool;
use super::ring::{DriverRing, F_WRITE};
use super::{Bump, DriverError, Mapping};
use crate::vhost_user::{GuestRam, VhostUserFrontend};
use crate::viommu::{Viommu, PAGE};

/// `virtio_net_hdr_v1`, 12 bytes with `VERSION_1`.
pub const NET_HDR: usize = 12;
/// The largest frame a one-page receive buffer holds.
pub const MAX_FRAME: u32 = PAGE as u32 - NET_HDR as u32;
/// The driver's MAC address (locally administered).
pub const DRIVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x5e, 0x01];
/// The peer's.
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x5e, 0x02];
/// How long the end of a run waits for the frames still out (at least).
const DRAIN_WAIT: Duration = Duration::from_millis(200);
/// Frames sent since one was counted lost after which it no longer counts as late.
const LATE_WINDOW: u32 = 1 << 20;
/// How receive buffers are mapped: read-write, as Linux's intel-iommu driver maps a
/// `DMA_FROM_DEVICE` buffer when the IOMMU lacks zero-length-read support (QEMU's does).
/// A device needs only write access, and ours asks for no more; DPDK's vhost library asks
/// for read-write on its enqueue and would miss for ever on a write-only mapping.
const RX_PERM: Perm = Perm::ReadWrite;
/// Receive queue index.
const RX: u16 = 0;
/// Transmit queue index.
const TX: u16 = 1;

/// The net driver's settings.
#[derive(Debug, Clone, Copy)]
pub struct NetDriverConfig {
    /// Entries of each ring (a power of two, at most 32768).
    pub queue_size: u16,
    /// Frames out at once (1..=queue_size).
    pub inflight: u16,
    /// Bytes per frame, Ethernet header included (60..=[`MAX_FRAME`]).
    pub frame_bytes: u32,
    /// How buffers are mapped (ignored without an IOMMU).
    pub mapping: Mapping,
    /// Buffers of each direction with [`Mapping::Persistent`], used in turn: the working set
    /// is twice this (at least a ring's worth each).
    pub buffers: u32,
    /// Check returned frames and poison.
    pub verify: bool,
    /// Nothing back for this long once the device took every frame: those out are lost.
    /// The driver waits less when frames come back faster: 16 times their mean round trip,
    /// at least 100 µs, at most this.
    pub loss_timeout: Duration,
    /// Poll the used rings for this long before waiting for an interrupt (as a guest's
    /// busy-polling socket does; zero: wait at once).
    pub busy_poll: Duration,
    /// Random seed (for the buffers' placement).
    pub seed: u64,
}

impl Default for NetDriverConfig {
    fn default() -> Self {
        NetDriverConfig {
            queue_size: 256,
            inflight: 32,
            frame_bytes: 64,
            mapping: Mapping::PerRequest,
            buffers: 256,
            verify: true,
            loss_timeout: Duration::from_millis(5),
            busy_poll: Duration::ZERO,
            seed: 1,
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct NetReport {
    /// Frames sent.
    pub sent: u64,
    /// Frames that came back (right or not).
    pub returned: u64,
    /// Bytes of the frames that came back right.
    pub bytes: u64,
    /// Frames counted lost (including those that turned up later).
    pub lost: u64,
    /// Frames that came back after they were counted lost.
    pub late: u64,
    /// Returned frames that were not what was sent (MACs swapped), or not ours.
    pub corrupt: u64,
    /// Freed buffers found written after their unmap was complete.
    pub poison_violations: u64,
    /// Freed buffers checked for poison when reused.
    pub poison_checks: u64,
    /// Used entries that named no buffer the device had (a device bug).
    pub bad_completions: u64,
    /// Sent to back.
    pub latency: Histogram,
    /// MISS received to the used entry of the buffer it was about.
    pub miss_rtt: Histogram,
    /// Time spent running.
    pub elapsed: Duration,
}

impl NetReport {
    /// Frames lost for good (lost and never turned up).
    pub fn missing(&self) -> u64 {
        self.lost.saturating_sub(self.late)
    }

    /// Nothing was wrong with what came back and no poison was broken (losses aside).
    pub fn clean(&self) -> bool {
        self.corrupt == 0 && self.poison_violations == 0 && self.bad_completions == 0
    }
}

/// A buffer: guest-physical address, the device's address.
#[derive(Debug, Clone, Copy)]
struct Buf {
    gpa: u64,
    dev: u64,
}

/// Where the driver's buffers come from.
#[derive(Debug)]
enum Buffers {
    /// Mapped once (or no IOMMU): used in turn.
    Persistent {
        rx: VecDeque<Buf>,
        tx: VecDeque<Buf>,
    },
    /// Mapped per frame.
    PerRequest(PagePool),
}

/// The driver of one queue pair.
pub struct NetDriver<'a> {
    fe: &'a VhostUserFrontend,
    ram: Arc<GuestRam>,
    viommu: Option<Arc<Viommu>>,
    cfg: NetDriverConfig,
    rx: DriverRing,
    tx: DriverRing,
    /// Per descriptor of each ring: the buffer the device has.
    rx_bufs: Vec<Option<Buf>>,
    tx_bufs: Vec<Option<Buf>>,
    rx_free: Vec<u16>,
    tx_free: Vec<u16>,
    buffers: Buffers,
    /// Frames out: sequence number, when sent (in sending order).
    out: VecDeque<(u32, Instant)>,
    /// Frames counted lost lately (they may still turn up, late).
    lost_seqs: BTreeSet<u32>,
    /// Moving mean of the frames' round trip, ns.
    mean_rtt_ns: u64,
    next_seq: u32,
    /// MISSes not matched yet: IOVA page, when received.
    misses: HashMap<u64, Instant>,
    /// When each ring's last used entry was taken (before this harvest).
    rx_moved: Instant,
    tx_moved: Instant,
    frame: Vec<u8>,
    got: Vec<u8>,
    report: NetReport,
}

impl std::fmt::Debug for NetDriver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDriver")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn mem_err(e: impl std::fmt::Display) -> DriverError {
    DriverError::Memory(e.to_string())
}

impl<'a> NetDriver<'a> {
    /// Lay both rings and the buffers out in guest RAM (from `ram_base`), map what is
    /// mapped once and start the queues. The front-end must have been set up with at least
    /// two queues.
    pub fn new(
        fe: &'a VhostUserFrontend,
        cfg: NetDriverConfig,
        ram_base: u64,
    ) -> Result<Self, DriverError> {
        if !cfg.queue_size.is_power_of_two()
            || cfg.queue_size > 32768
            || cfg.inflight == 0
            || cfg.inflight > cfg.queue_size
        {
            return Err(DriverError::Config(format!(
                "queue size {} (a power of two up to 32768) and {} frames out (1..=size)",
                cfg.queue_size, cfg.inflight
            )));
        }
        if !(frames::MIN_FRAME as u32..=MAX_FRAME).contains(&cfg.frame_bytes) {
            return Err(DriverError::Config(format!(
                "frames of {} bytes ({}..={MAX_FRAME})",
                cfg.frame_bytes,
                frames::MIN_FRAME
            )));
        }
        let ram = fe.ram().clone();
        let viommu = fe.viommu().cloned();
        let mut bump = Bump {
            next: ram_base.div_ceil(PAGE) * PAGE,
            end: ram.size(),
        };
        let rx = DriverRing::start(fe, &mut bump, RX, cfg.queue_size)?;
        let tx = DriverRing::start(fe, &mut bump, TX, cfg.queue_size)?;
        let per_request = viommu.is_some() && cfg.mapping == Mapping::PerRequest;
        let (n_rx, n_tx) = Self::buffer_counts(&cfg);
        let count = u64::from(n_rx + n_tx);
        // Scattered, a guard page after each: no two buffers make one IOTLB entry.
        let base = bump.pages(2 * count)?;
        let mut pages: Vec<u64> = (0..count).map(|i| base + 2 * i * PAGE).collect();
        let mut rng = Rng::new(cfg.seed);
        for i in (1..pages.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            pages.swap(i, j);
        }
        let buffers = if per_request {
            Buffers::PerRequest(PagePool::new(pages, PAGE as usize, cfg.verify))
        } else {
            let map = |gpa: u64, perm| -> Result<Buf, DriverError> {
                let dev = match &viommu {
                    Some(v) => v.map(gpa, PAGE, perm)?,
                    None => gpa,
                };
                Ok(Buf { gpa, dev })
            };
            let (rx_pages, tx_pages) = pages.split_at(n_rx as usize);
            Buffers::Persistent {
                rx: rx_pages
                    .iter()
                    .map(|&g| map(g, RX_PERM))
                    .collect::<Result<_, _>>()?,
                tx: tx_pages
                    .iter()
                    .map(|&g| map(g, Perm::ReadOnly))
                    .collect::<Result<_, _>>()?,
            }
        };
        let n = usize::from(cfg.queue_size);
        let mut d = NetDriver {
            fe,
            ram,
            viommu,
            cfg,
            rx,
            tx,
            rx_bufs: vec![None; n],
            tx_bufs: vec![None; n],
            rx_free: (0..cfg.queue_size).rev().collect(),
            tx_free: (0..cfg.queue_size).rev().collect(),
            buffers,
            out: VecDeque::new(),
            lost_seqs: BTreeSet::new(),
            mean_rtt_ns: 0,
            next_seq: 0,
            misses: HashMap::new(),
            rx_moved: Instant::now(),
            tx_moved: Instant::now(),
            frame: Vec::new(),
            got: vec![0; PAGE as usize],
            report: NetReport::default(),
        };
        if d.viommu.is_some() {
            d.fe.channel_stats().miss_log.enable();
        }
        d.refill()?;
        Ok(d)
    }

    /// Receive and transmit buffers: persistent, each at least a ring's worth (or the frames
    /// out); per frame, room for both rings, the frames out and a lazy batch not flushed yet.
    fn buffer_counts(cfg: &NetDriverConfig) -> (u32, u32) {
        let q = u32::from(cfg.queue_size);
        match cfg.mapping {
            Mapping::Persistent => (cfg.buffers.max(q), cfg.buffers.max(u32::from(cfg.inflight))),
            Mapping::PerRequest => (2 * q + 256, u32::from(cfg.inflight) + q),
        }
    }

    /// Guest RAM the driver needs beyond `ram_base` for `cfg`.
    pub fn ram_needed(cfg: &NetDriverConfig) -> u64 {
        let (r, t) = Self::buffer_counts(cfg);
        2 * DriverRing::ram_needed(cfg.queue_size) + 2 * u64::from(r + t) * PAGE + PAGE
    }

    /// A buffer for a ring: from the pool in turn, or a page mapped for this use.
    fn take_buf(&mut self, rx: bool) -> Result<Option<Buf>, DriverError> {
        match &mut self.buffers {
            Buffers::Persistent { rx: r, tx: t } => {
                Ok(if rx { r.pop_front() } else { t.pop_front() })
            }
            Buffers::PerRequest(pool) => {
                let gpa = pool.take(&self.ram, self.viommu.as_deref())?;
                if !rx {
                    // Written before it is mapped: the frame is there when the device looks.
                    self.ram
                        .memory()
                        .write_slice(&self.frame, GuestAddress(gpa))
                        .map_err(mem_err)?;
                }
                let v = self.viommu.as_ref().ok_or_else(|| {
                    DriverError::Config("per-frame mapping needs a vIOMMU".into())
                })?;
                let perm = if rx { RX_PERM } else { Perm::ReadOnly };
                Ok(Some(Buf {
                    gpa,
                    dev: v.map(gpa, PAGE, perm)?,
                }))
            }
        }
    }

    /// Buffers the device gave back: to the pool's tail, or unmapped together (their
    /// INVALIDATEs pipelined, as a guest's completion handler does) and poisoned.
    fn give_back(&mut self, done: &mut Vec<(Buf, bool)>) -> Result<(), DriverError> {
        for (b, _) in done.iter() {
            self.misses.remove(&b.dev);
        }
        match &mut self.buffers {
            Buffers::Persistent { rx, tx } => {
                for (b, is_rx) in done.drain(..) {
                    if is_rx {
                        rx.push_back(b)
                    } else {
                        tx.push_back(b)
                    }
                }
            }
            Buffers::PerRequest(pool) => {
                let Some(v) = &self.viommu else {
                    return Ok(());
                };
                let before = v.stats().invalidations.load(Ordering::Relaxed);
                let ranges: Vec<(u64, u64)> = done.iter().map(|(b, _)| (b.dev, PAGE)).collect();
                v.unmap_all(&ranges)?;
                for (b, _) in done.drain(..) {
                    pool.put(b.gpa, before, &self.ram, Some(v));
                }
            }
        }
        Ok(())
    }

    /// Keep the receive ring full.
    fn refill(&mut self) -> Result<(), DriverError> {
        let mut posted = false;
        while let Some(&i) = self.rx_free.last() {
            let Some(b) = self.take_buf(true)? else {
                break;
            };
            self.rx_free.pop();
            self.rx
                .write_desc(&self.ram, i, b.dev, PAGE as u32, F_WRITE, 0)?;
            self.rx.push(&self.ram, i)?;
            self.rx_bufs[usize::from(i)] = Some(b);
            posted = true;
        }
        if posted {
            self.rx.publish(&self.ram, true)?;
        }
        Ok(())
    }

    /// Send up to `budget` frames while fewer than `inflight` are out; returns how many.
    fn send(&mut self, budget: u64) -> Result<usize, DriverError> {
        let mut sent = 0;
        while self.out.len() < usize::from(self.cfg.inflight) && (sent as u64) < budget {
            let Some(&i) = self.tx_free.last() else {
                break;
            };
            let seq = self.next_seq;
            self.frame.clear();
            self.frame.resize(NET_HDR, 0);
            self.frame.extend_from_slice(&frames::frame(
                PEER_MAC,
                DRIVER_MAC,
                seq,
                self.cfg.frame_bytes as usize,
            ));
            let Some(b) = self.take_buf(false)? else {
                break;
            };
            if matches!(self.buffers, Buffers::Persistent { .. }) {
                self.ram
                    .memory()
                    .write_slice(&self.frame, GuestAddress(b.gpa))
                    .map_err(mem_err)?;
            }
            self.tx_free.pop();
            self.tx
                .write_desc(&self.ram, i, b.dev, self.frame.len() as u32, 0, 0)?;
            self.tx.push(&self.ram, i)?;
            self.tx_bufs[usize::from(i)] = Some(b);
            self.out.push_back((seq, Instant::now()));
            self.next_seq = seq.wrapping_add(1);
            self.report.sent += 1;
            sent += 1;
        }
        if sent > 0 {
            self.tx.publish(&self.ram, true)?;
        }
        Ok(sent)
    }

    /// Take the MISSes the front-end saw since the last look.
    fn note_misses(&mut self) {
        for (page, at) in self.fe.channel_stats().miss_log.take() {
            self.misses.entry(page).or_insert(at);
        }
    }

    /// A buffer the device finished with: time the MISS it waited on, if any, from when
    /// the device could have gone on with it: the later of the MISS and the ring's previous
    /// completions (`ring_moved`). A back-end that asked ahead for a buffer further down the
    /// ring did not wait on that miss for the time the buffers before it took.
    fn buffer_done(&mut self, b: &Buf, ring_moved: Instant) {
        if let Some(at) = self.misses.remove(&b.dev) {
            self.report.miss_rtt.record(at.max(ring_moved).elapsed());
        }
    }

    /// Take one ring's used entries (and check each received frame); returns how many.
    fn harvest_ring(
        &mut self,
        rx: bool,
        done: &mut Vec<(Buf, bool)>,
    ) -> Result<usize, DriverError> {
        let ring = if rx { &mut self.rx } else { &mut self.tx };
        let used = ring.used_idx(&self.ram)?;
        let mut entries = Vec::new();
        while let Some(e) = ring.next_used(&self.ram, used)? {
            entries.push(e);
        }
        let moved = if rx { self.rx_moved } else { self.tx_moved };
        let mut n = 0;
        for (id, len) in entries {
            let bufs = if rx {
                &mut self.rx_bufs
            } else {
                &mut self.tx_bufs
            };
            let Some(b) = usize::try_from(id)
                .ok()
                .and_then(|i| bufs.get_mut(i))
                .and_then(Option::take)
            else {
                self.report.bad_completions += 1;
                tracing::error!(id, rx, "net driver: used entry for no buffer");
                continue;
            };
            self.buffer_done(&b, moved);
            if rx {
                self.rx_moved = Instant::now();
                self.rx_free.push(id as u16);
                self.check_frame(&b, len)?;
            } else {
                self.tx_moved = Instant::now();
                self.tx_free.push(id as u16);
            }
            done.push((b, rx));
            n += 1;
        }
        Ok(n)
    }

    /// One received frame: which one it is, whether it is right, what it says about the
    /// frames sent before it.
    fn check_frame(&mut self, b: &Buf, len: u32) -> Result<(), DriverError> {
        self.report.returned += 1;
        let want = NET_HDR + self.cfg.frame_bytes as usize;
        let len = len as usize;
        if len != want {
            self.report.corrupt += 1;
            tracing::error!(len, want, "net driver: received frame of the wrong length");
            return Ok(());
        }
        let got = &mut self.got[..len];
        self.ram
            .memory()
            .read_slice(got, GuestAddress(b.gpa))
            .map_err(mem_err)?;
        let f = &got[NET_HDR..];
        let Some(seq) = frames::sequence(f) else {
            self.report.corrupt += 1;
            tracing::error!(head = ?&f[..f.len().min(24)], "net driver: received a frame that is not ours");
            return Ok(());
        };
        if self.cfg.verify {
            let sent = frames::frame(PEER_MAC, DRIVER_MAC, seq, self.cfg.frame_bytes as usize);
            if f != frames::expected_back(&sent).as_slice() {
                self.report.corrupt += 1;
                tracing::error!(seq, "net driver: frame came back changed");
                return Ok(());
            }
        }
        // In order: the ones out before it were lost.
        match self.out.iter().position(|&(s, _)| s == seq) {
            Some(pos) => {
                let sent_at = self.out[pos].1;
                let before: Vec<(u32, Instant)> = self.out.drain(..=pos).take(pos).collect();
                for (s, _) in before {
                    self.declare_lost(s);
                }
                let rtt = sent_at.elapsed();
                self.report.latency.record(rtt);
                // A moving mean (1/8 weight) of the round trip, for the loss timeout.
                let ns = rtt.as_nanos().min(u128::from(u64::MAX)) as u64;
                self.mean_rtt_ns = self.mean_rtt_ns - self.mean_rtt_ns / 8 + ns / 8;
                self.report.bytes += u64::from(self.cfg.frame_bytes);
            }
            None if self.lost_seqs.remove(&seq) => {
                self.report.late += 1;
                self.report.bytes += u64::from(self.cfg.frame_bytes);
            }
            None => {
                self.report.corrupt += 1;
                tracing::error!(
                    seq,
                    "net driver: a frame came back that was not out (twice, or never sent)"
                );
            }
        }
        Ok(())
    }

    /// Count frame `seq` lost, remembering it for a while in case it turns up late.
    fn declare_lost(&mut self, seq: u32) {
        self.report.lost += 1;
        self.lost_seqs.insert(seq);
        // Forget those lost more than a million frames ago: they are not coming.
        while let Some(&first) = self.lost_seqs.first() {
            if self.next_seq.wrapping_sub(first) <= LATE_WINDOW {
                break;
            }
            self.lost_seqs.pop_first();
        }
    }

    /// Take both rings' completions, give the buffers back, refill; returns how many.
    fn harvest(&mut self) -> Result<usize, DriverError> {
        if self.viommu.is_some() {
            self.note_misses();
        }
        let mut done = Vec::new();
        let n = self.harvest_ring(false, &mut done)? + self.harvest_ring(true, &mut done)?;
        if !done.is_empty() {
            self.give_back(&mut done)?;
        }
        self.refill()?;
        Ok(n)
    }

    /// How long to wait for frames that are out before counting them lost.
    fn loss_timeout(&self) -> Duration {
        Duration::from_nanos(self.mean_rtt_ns.saturating_mul(16)).clamp(
            Duration::from_micros(100),
            self.cfg.loss_timeout.max(Duration::from_micros(100)),
        )
    }

    /// Poll both used rings for up to `busy_poll`; true when either moved.
    fn spin_for_used(&mut self) -> Result<bool, DriverError> {
        if self.cfg.busy_poll.is_zero() {
            return Ok(false);
        }
        let start = Instant::now();
        let (rx0, tx0) = (self.rx.used_idx(&self.ram)?, self.tx.used_idx(&self.ram)?);
        while start.elapsed() < self.cfg.busy_poll {
            if self.rx.used_idx(&self.ram)? != rx0 || self.tx.used_idx(&self.ram)? != tx0 {
                return Ok(true);
            }
            std::thread::yield_now();
        }
        Ok(false)
    }

    /// Frames in the transmit ring the device has not taken yet.
    fn tx_pending(&self) -> usize {
        usize::from(self.cfg.queue_size) - self.tx_free.len()
    }

    /// Send and receive until `deadline` (or `max_frames` sent), then wait for the frames
    /// out. Fails if nothing happens for `stall` while the device holds frames.
    pub fn run(
        &mut self,
        deadline: Instant,
        max_frames: Option<u64>,
        stall: Duration,
    ) -> Result<(), DriverError> {
        let start = Instant::now();
        let sent0 = self.report.sent;
        let mut last_progress = Instant::now();
        let mut last_back = Instant::now();
        let mut stopped: Option<Instant> = None;
        loop {
            let budget =
                max_frames.map_or(u64::MAX, |m| m.saturating_sub(self.report.sent - sent0));
            let stopping = Instant::now() >= deadline || budget == 0;
            if !stopping {
                self.send(budget)?;
            } else if stopped.is_none() {
                stopped = Some(Instant::now());
            }
            let returned = self.report.returned;
            if self.harvest()? > 0 {
                last_progress = Instant::now();
                if self.report.returned > returned {
                    last_back = last_progress;
                }
                continue;
            }
            if self.out.is_empty() && stopping && self.tx_pending() == 0 {
                break;
            }
            // While sending, a frame out for long is lost (the window moves on); at the end,
            // the stragglers get longer (they are not timed).
            let wait = if stopping {
                self.cfg.loss_timeout.max(DRAIN_WAIT)
            } else {
                self.loss_timeout()
            };
            if !self.out.is_empty() && self.tx_pending() == 0 && last_back.elapsed() >= wait {
                for (s, _) in std::mem::take(&mut self.out) {
                    self.declare_lost(s);
                }
                last_back = Instant::now();
                continue;
            }
            if self.tx_pending() > 0 && last_progress.elapsed() >= stall {
                return Err(DriverError::Stalled(stall, self.tx_pending()));
            }
            if self.spin_for_used()? {
                continue;
            }
            let mut fds = [
                PollFd::new(&self.rx.notifiers.call, PollFlags::IN),
                PollFd::new(&self.tx.notifiers.call, PollFlags::IN),
            ];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            self.rx.notifiers.take_call();
            self.tx.notifiers.take_call();
        }
        if let Some(v) = &self.viommu {
            v.flush()?;
            if let Buffers::PerRequest(pool) = &mut self.buffers {
                pool.release_deferred(&self.ram, Some(v));
            }
        }
        if let Buffers::PerRequest(pool) = &self.buffers {
            self.report.poison_checks = pool.count.checks;
            self.report.poison_violations = pool.count.violations;
        }
        // The rate is over the sending time: the drain after it only waits for stragglers.
        self.report.elapsed += stopped.unwrap_or_else(Instant::now) - start;
        Ok(())
    }

    /// Start counting afresh (after a warm-up).
    pub fn reset_report(&mut self) {
        self.report = NetReport::default();
        if let Buffers::PerRequest(pool) = &mut self.buffers {
            pool.count = Default::default();
        }
    }

    /// What was done so far.
    pub fn report(&self) -> &NetReport {
        &self.report
    }

    /// Stop both queues (GET_VRING_BASE) and return the report. The transmit ring's base
    /// must equal what was sent: the device took every frame.
    pub fn finish(self) -> Result<NetReport, DriverError> {
        let tx_base = self.fe.stop_queue(self.tx.index)?;
        let _ = self.fe.stop_queue(self.rx.index)?;
        if tx_base != self.tx.avail_idx {
            return Err(DriverError::Config(format!(
                "GET_VRING_BASE of the transmit queue returned {tx_base}, {} frames were sent",
                self.tx.avail_idx
            )));
        }
        Ok(self.report)
    }
}
