//! Session-level fuzz harness, shared by the proptest `tests/session_fuzz.rs` and the cargo-fuzz
//! target `fuzz/fuzz_targets/session.rs` (which includes this file with `#[path]`; this being a
//! `mod.rs`, its submodules are found next to it there too).
//!
//! What lives here: [`Op`], one vhost-user operation a fuzzer may play (memory table and
//! regions up to and past the 32-region limit, SET_FEATURES toggling ACCESS_PLATFORM and
//! RING_EVENT_IDX, vring setup, stop and restart, IOTLB UPDATE / INVALIDATE at the 2^64 edges
//! and across regions, a hostile second queue, disconnect and reconnect), and [`Harness`],
//! which runs a real in-process back-end (`backend::Server` serving `devices::Blk` on one end
//! of a socket pair, on its own thread) and plays, on the calling thread, both the front-end
//! (QEMU, the IOMMU side answering misses) and a virtio-blk driver that keeps I/O in flight on
//! queue 0 between operations.
//!
//! After every step it checks, and reports the first violation as an `Err`:
//! - liveness: the server thread is alive; every request sent with NEED_REPLY is answered
//!   within [`REPLY_TIMEOUT`]; a disconnect ends the session within it; once the harness has
//!   repaired everything it broke, every request in flight completes;
//! - a completion is the truth: no used entry without a status byte; `OK` only with the data
//!   (reads return what the disk holds, writes land on the disk), never for a request
//!   outside the disk; a GET_VRING_BASE hands back every request not completed;
//! - poison: a page whose translation was invalidated (or replaced by an UPDATE), a page of
//!   a stopped queue or of an ended connection, is filled with a canary once the back-end
//!   acknowledged; the canary must stay, and never reach the disk; a memory region removed
//!   from the back-end's table must not change while it is out.
//!
//! What it must not do: use anything of the back-end but its public API and the socket; panic
//! on anything the back-end does (a violation is an `Err`; panics are for harness bugs);
//! assert behaviour the protocol leaves open (an overflowing INVALIDATE may be acked or not; a
//! request may fail with IOERR when its memory or its mapping went away; a queue may be stopped
//! and restarted under it). Guest memory is sealed memfds and every vring fd an eventfd, as the
//! back-end requires. No `unsafe`.
//!
//! Layout: the state is defined here and each file below adds one `impl Harness` block on it
//! (private items of this file are visible there; what the files share is `pub(super)`):
//! - `mod.rs` (this file): the entry ([`run`], [`count_panics`]), the configuration, the
//!   geometry, the state ([`Harness`], the driver's requests and their pages) and the run:
//!   setup, a step, the final drain;
//! - `ops.rs`: [`Op`] and how each is played, with what the back-end must answer;
//! - `frontend.rs`: the connection, requests with a bounded wait for their reply, the
//!   handshake, queue 0's setup, stop and restart, the disconnect;
//! - `memory.rs`: guest memory and regions, the back-end's table, free pages, poisoning, the
//!   IOMMU side answering MISSes;
//! - `driver.rs`: the virtio-blk driver on queue 0 (submit, collect, release, abandon);
//! - `checks.rs`: the checks and the fills they recognise.

#![allow(dead_code)]

mod checks;
mod driver;
mod frontend;
mod memory;
mod ops;

pub use ops::Op;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iotlb::Perm;
use rustix::fs::MemfdFlags;
use virtq::testing::{DriverQueue, IovaSpace, Rng, PAGE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use wire::vhost_user::{Connection, FrontendRequest};

use memory::sealed_memfd;

/// How long any request with NEED_REPLY may wait for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the final drain may take once everything is repaired.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The back-end's miss timeout (short: requests whose pages went away fail quickly).
const MISS_TIMEOUT: Duration = Duration::from_millis(20);

/// Core slots: where the driver's rings and buffers live (2 MiB each, guest-physical
/// `i * 2 MiB`).
const CORE_SLOTS: usize = 3;
const CORE_SIZE: u64 = 2 << 20;
/// Extra slots: scratch memory for region-limit play and UPDATE targets (64 KiB each, from
/// guest-physical 8 MiB). Core plus extra is past the back-end's 32-region limit.
const EXTRA_SLOTS: usize = 32;
const EXTRA_SIZE: u64 = 64 << 10;
const EXTRA_GPA: u64 = 8 << 20;
/// All slots.
pub const SLOTS: usize = CORE_SLOTS + EXTRA_SLOTS;
/// The back-end's limit (`backend::memory::MAX_REGIONS`), reached with ADD_MEM_REG.
const MAX_REGIONS: usize = 32;
/// Most regions one SET_MEM_TABLE carries (QEMU's `VHOST_MEMORY_BASELINE_NREGIONS`: the
/// connection takes at most 8 descriptors with a message).
const MAX_TABLE_REGIONS: usize = 8;
/// The front-end virtual address of guest-physical 0.
const VA_BASE: u64 = 0x7f00_0000_0000;
/// Pages of core slot 0 never handed out (page 0 up to the ring zone).
const RESERVED_PAGES: u64 = 16;
/// Ring generations: each (re)built driver queue takes fresh ring pages from core slot 0.
const RING_GENERATIONS: u64 = 32;
const RING_PAGES: u64 = 3;
/// The driver's IOVAs (far from anything a hostile ring or a used entry can spell).
const RING_IOVA: u64 = 0x5a00_0000_0000_0000;
const BUF_IOVA: u64 = 0x5a00_1000_0000_0000;
/// IOVAs the hostile queue and the edge UPDATEs use, answered with scratch pages.
const SCRATCH_IOVA: u64 = 0x3000_0000_0000;
const SCRATCH_PAGES: u64 = EXTRA_SLOTS as u64 * (EXTRA_SIZE / PAGE);
/// Queue 0's size (the driver's), and the disk.
const QSIZE: u16 = 32;
const DISK: u64 = 1 << 20;
const DISK_PAGES: u64 = DISK / PAGE;
const SECTOR: u64 = 512;
/// Pages kept back for repairing unmapped pages before the drain.
const REPAIR_RESERVE: usize = 64;
const SERIAL: &str = "session-fuzz";

/// Panics seen anywhere in the process since [`count_panics`] was called (a back-end worker
/// that panics is joined and logged, not propagated: this makes it visible).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Count every panic (chaining the previous hook). Idempotent.
pub fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// How a run starts.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Seeds the driver's choices (request mix, sectors, data, page placement).
    pub seed: u64,
    /// ACCESS_PLATFORM at the start.
    pub iommu: bool,
    /// RING_EVENT_IDX at the start.
    pub event_idx: bool,
    /// The back-end's IOTLB capacity.
    pub iotlb_capacity: usize,
    /// Requests the driver keeps in flight (1..=8).
    pub depth: usize,
}

/// A violation, or a step the harness could not take (described).
pub type Failure = String;

/// What a run did (for reports).
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Requests submitted.
    pub submitted: u64,
    /// Completed with OK.
    pub ok: u64,
    /// Completed with an error status.
    pub errors: u64,
    /// Completions whose status page had been unmapped (outcome not checked).
    pub unchecked: u64,
    /// MISSes answered.
    pub misses: u64,
    /// Pages poisoned.
    pub poisoned: u64,
    /// Queue 0 broke (vring error eventfd).
    pub broken: u64,
    /// Connections.
    pub connections: u64,
}

#[derive(Debug, Clone)]
struct Page {
    iova: u64,
    gpa: u64,
    /// What the driver put in it (restored if it is repaired).
    init: Vec<u8>,
    /// Its mapping was taken away at some point while the request was in flight.
    lost: bool,
    /// Not mapped now.
    unmapped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    /// IN or OUT past the end of the disk (must fail).
    Beyond(u32),
}

#[derive(Debug)]
struct Req {
    id: u64,
    kind: Kind,
    /// First disk page and count (for IN/OUT).
    disk_page: u64,
    npages: u64,
    data: Vec<u8>,
    header: Page,
    data_pages: Vec<Page>,
    status: Page,
    table: Option<Page>,
    /// Uses a straddle pair (index).
    straddle: Option<usize>,
}

impl Req {
    fn pages_mut(&mut self) -> impl Iterator<Item = &mut Page> {
        std::iter::once(&mut self.header)
            .chain(self.data_pages.iter_mut())
            .chain(std::iter::once(&mut self.status))
            .chain(self.table.iter_mut())
    }

    fn pages(&self) -> impl Iterator<Item = &Page> {
        std::iter::once(&self.header)
            .chain(self.data_pages.iter())
            .chain(std::iter::once(&self.status))
            .chain(self.table.iter())
    }

    fn writes_disk(&self) -> bool {
        self.kind == Kind::Out
    }

    fn disk_overlaps(&self, first: u64, n: u64) -> bool {
        matches!(self.kind, Kind::In | Kind::Out)
            && self.disk_page < first + n
            && first < self.disk_page + self.npages
    }
}

struct Slot {
    gpa: u64,
    size: u64,
    fd: OwnedFd,
}

struct Queue0 {
    driver: DriverQueue,
    kick: OwnedFd,
    call: OwnedFd,
    err: OwnedFd,
    generation: u64,
    addrs: (u64, u64, u64),
    running: bool,
    enabled: bool,
    broken: bool,
    /// Used entries seen and avail entries published (wrapping), the driver's side.
    used: u16,
    avail: u16,
}

/// The front-end, the IOMMU side and the driver of one run, and the back-end they talk to.
pub struct Harness {
    cfg: Config,
    rng: Rng,
    server: Arc<backend::Server<devices::Blk>>,
    thread: Option<JoinHandle<()>>,
    conn: Option<Connection>,
    channel: Option<Connection>,
    disk: File,
    /// Per disk page: what it must hold (`None`: unknown after a failed or abandoned write).
    model: Vec<Option<Vec<u8>>>,
    slots: Vec<Slot>,
    mem: GuestMemoryMmap,
    /// Slots in the back-end's table (as far as its acks tell).
    present: BTreeSet<usize>,
    /// Core slots out of the back-end's table: their contents when they went out.
    snapshots: BTreeMap<usize, Vec<u8>>,
    features: u64,
    iommu: bool,
    event_idx: bool,
    space: IovaSpace,
    /// Multi-page extents the IOMMU side answers as one UPDATE: page -> (start, gpa, pages).
    extents: BTreeMap<u64, (u64, u64, u64)>,
    free: Vec<u64>,
    /// Straddle pairs (last page of a core slot and the first of the next): in use?
    straddle_busy: Vec<bool>,
    next_iova: u64,
    queue: Option<Queue0>,
    next_generation: u64,
    inflight: BTreeMap<u16, Req>,
    next_id: u64,
    /// Poisoned pages (their canary is a function of the address).
    quarantine: Vec<u64>,
    hostile_fds: Vec<OwnedFd>,
    panics_at_start: usize,
    /// Counters for the report.
    pub summary: Summary,
}

impl Harness {
    /// A back-end on a fresh disk, connected and set up: queue 0 running with I/O about to
    /// start, queue 1 idle.
    pub fn new(cfg: Config) -> Result<Self, Failure> {
        let mut rng = Rng::new(cfg.seed);
        let disk_fd = rustix::fs::memfd_create("disk", MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&disk_fd, DISK).expect("ftruncate");
        let disk = File::from(disk_fd);
        let mut model = Vec::new();
        for p in 0..DISK_PAGES {
            let mut b = vec![0u8; PAGE as usize];
            for (i, x) in b.iter_mut().enumerate() {
                *x = (p as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ 0x11;
            }
            disk.write_all_at(&b, p * PAGE).expect("disk");
            model.push(Some(b));
        }
        let dev = devices::Blk::new(
            disk.try_clone().expect("dup"),
            devices::BlkConfig {
                queues: 2,
                queue_size: 256,
                read_only: false,
                serial: SERIAL.into(),
            },
        )
        .map_err(|e| format!("Blk::new: {e}"))?;
        let server = Arc::new(backend::Server::new(
            dev,
            backend::EngineConfig {
                iotlb_capacity: cfg.iotlb_capacity,
                miss_timeout: MISS_TIMEOUT,
                busy_poll: Duration::ZERO,
                ..backend::EngineConfig::default()
            },
        ));
        let mut slots = Vec::new();
        let mut regions = Vec::new();
        for i in 0..SLOTS {
            let (gpa, size) = if i < CORE_SLOTS {
                (i as u64 * CORE_SIZE, CORE_SIZE)
            } else {
                (EXTRA_GPA + (i - CORE_SLOTS) as u64 * EXTRA_SIZE, EXTRA_SIZE)
            };
            let fd = sealed_memfd("guest-ram", size);
            let file = File::from(fd.try_clone().expect("dup"));
            let region = MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
                .map_err(|e| format!("mmap: {e}"))?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(gpa)).expect("region"));
            slots.push(Slot { gpa, size, fd });
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| format!("memory: {e}"))?;
        let mut free = Vec::new();
        for s in 0..CORE_SLOTS as u64 {
            for p in 0..CORE_SIZE / PAGE {
                let gpa = s * CORE_SIZE + p * PAGE;
                let reserved = s == 0 && p < RESERVED_PAGES + RING_GENERATIONS * RING_PAGES;
                // The last page of a slot and the first of the next form a straddle pair.
                let straddle =
                    (p == CORE_SIZE / PAGE - 1 && s + 1 < CORE_SLOTS as u64) || (p == 0 && s > 0);
                if !reserved && !straddle {
                    free.push(gpa);
                }
            }
        }
        for i in (1..free.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            free.swap(i, j);
        }
        let mut h = Harness {
            cfg,
            rng,
            server,
            thread: None,
            conn: None,
            channel: None,
            disk,
            model,
            slots,
            mem,
            present: BTreeSet::new(),
            snapshots: BTreeMap::new(),
            features: 0,
            iommu: cfg.iommu,
            event_idx: cfg.event_idx,
            space: IovaSpace::new(),
            extents: BTreeMap::new(),
            free,
            straddle_busy: vec![false; CORE_SLOTS - 1],
            next_iova: BUF_IOVA,
            queue: None,
            next_generation: 0,
            inflight: BTreeMap::new(),
            next_id: 0,
            quarantine: Vec::new(),
            hostile_fds: Vec::new(),
            panics_at_start: PANICS.load(Ordering::SeqCst),
            summary: Summary::default(),
        };
        h.connect()?;
        Ok(h)
    }

    /// Play one operation, then let the driver run a little.
    pub fn step(&mut self, op: &Op) -> Result<(), Failure> {
        self.apply(op)
            .map_err(|e| format!("{e}\n  during {op:?}"))?;
        for _ in 0..2 {
            self.round().map_err(|e| format!("{e}\n  after {op:?}"))?;
        }
        self.check_memory()
            .map_err(|e| format!("{e}\n  after {op:?}"))
    }

    /// Repair what the operations broke, let every request in flight complete (liveness),
    /// check everything once more, and disconnect.
    pub fn finish(mut self) -> Result<Summary, Failure> {
        self.finish_inner()
            .map_err(|e| format!("{e}\n  while draining"))?;
        Ok(self.summary)
    }

    fn finish_inner(&mut self) -> Result<(), Failure> {
        self.check_alive()?;
        // Memory: every core slot back in.
        for s in 0..CORE_SLOTS {
            if !self.present.contains(&s) {
                if self.present.len() >= MAX_REGIONS {
                    let extra = *self.present.iter().next_back().expect("regions");
                    self.expect_ack(
                        "REM_MEM_REG",
                        FrontendRequest::RemMemReg(self.region(extra)),
                    )?;
                    self.present.remove(&extra);
                }
                self.expect_ack("ADD_MEM_REG", FrontendRequest::AddMemReg(self.region_fd(s)))?;
                let mut set = self.present.clone();
                set.insert(s);
                self.set_present(set);
            }
        }
        if self.queue.is_none() {
            if self.next_generation < RING_GENERATIONS {
                self.abandon();
                self.new_queue()?;
            }
            return self.disconnect();
        }
        // Pages unmapped under requests in flight: mapped again, onto fresh pages holding
        // what the driver put there.
        let heads: Vec<u16> = self.inflight.keys().copied().collect();
        for head in heads {
            let n = self.inflight[&head].pages().count();
            for i in 0..n {
                let p = self.inflight[&head].pages().nth(i).expect("page").clone();
                if !p.unmapped {
                    continue;
                }
                let Some(new) = self.alloc_page(0) else {
                    return Ok(());
                };
                self.write_page(new, &p.init);
                self.space.map_page(p.iova, new, Perm::ReadWrite);
                let r = self.inflight.get_mut(&head).expect("in flight");
                let q = r.pages_mut().nth(i).expect("page");
                q.gpa = new;
                q.unmapped = false;
            }
        }
        // The queue: restarted where it stopped (a queue that broke with no error eventfd to
        // say so stays broken until then), so that it sees every request handed back.
        self.restart_queue()?;
        let start = Instant::now();
        let mut progress = Instant::now();
        let mut restarts = 0;
        while !self.inflight.is_empty() {
            if start.elapsed() > DRAIN_TIMEOUT {
                let ids: Vec<String> = self
                    .inflight
                    .values()
                    .map(|r| format!("#{} {:?}", r.id, r.kind))
                    .collect();
                return Err(format!(
                    "liveness: {} request(s) never completed after everything was repaired \
                     ({DRAIN_TIMEOUT:?}, {restarts} restarts): {}",
                    ids.len(),
                    ids.join(", ")
                ));
            }
            self.check_alive()?;
            self.serve_misses()?;
            std::thread::sleep(Duration::from_millis(1));
            self.serve_misses()?;
            let before = self.inflight.len();
            self.collect()?;
            if self.inflight.len() < before {
                progress = Instant::now();
            }
            self.check_err_fd();
            let broken = self.queue.as_ref().is_some_and(|q| q.broken);
            if broken || progress.elapsed() > Duration::from_millis(500) {
                restarts += 1;
                if restarts > 5 {
                    return Err("queue 0 keeps breaking after everything was repaired".into());
                }
                self.restart_queue()?;
                progress = Instant::now();
            }
        }
        self.check_memory()?;
        self.disconnect()?;
        self.abandon();
        self.check_memory()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A failed run still ends its connection (the server thread then returns).
        self.conn = None;
        self.channel = None;
    }
}

/// Run `ops` from `cfg`: every step checked, then the drain.
pub fn run(cfg: Config, ops: &[Op]) -> Result<Summary, Failure> {
    let t = Instant::now();
    let mut h = Harness::new(cfg)?;
    for (i, op) in ops.iter().enumerate() {
        h.step(op).map_err(|e| format!("step {i}: {e}"))?;
    }
    let r = h.finish();
    if std::env::var_os("SESSION_FUZZ_VERBOSE").is_some() {
        eprintln!(
            "session-fuzz: {} ops in {:?}: {r:?}",
            ops.len(),
            t.elapsed()
        );
    }
    r
}
