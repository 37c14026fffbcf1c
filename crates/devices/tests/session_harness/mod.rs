//! Session-level fuzz harness, shared by the proptest `tests/session_fuzz.rs` and the cargo-fuzz
//! target `fuzz/fuzz_targets/session.rs` (which includes this file with `#[path]`).
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

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iotlb::{IovaRange, Perm};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fs::{MemfdFlags, SealFlags};
use virtq::testing::{Buf, DriverQueue, IovaSpace, PageAllocator, Rng, PAGE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use wire::features::{device as dev_f, protocol};
use wire::vhost_user::{
    BackendRequest, Connection, FrontendRequest, Header, MemoryRegion, RegionFd, Reply, ReplyKind,
    VringAddr, VringFile, VringState,
};
use wire::{IotlbMsg, VhostIotlbMsg, WireError};

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

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const CANARY_SIG: [u8; 8] = *b"CANARY\xc3\x3c";
const STALE_SIG: [u8; 8] = *b"STALE!\x5a\xa5";

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

/// One operation of a session.
#[derive(Debug, Clone)]
pub enum Op {
    /// Let the driver run this many rounds (serve misses, complete, submit).
    Pump(u8),
    /// SET_MEM_TABLE with the slots whose bit is set (bits 0..35; 0 or more than 8 regions
    /// must be refused: more go in with ADD_MEM_REG).
    SetMemTable(u64),
    /// ADD_MEM_REG of slot `n % SLOTS`.
    AddRegion(u8),
    /// REM_MEM_REG of slot `slot % SLOTS`, with its real size or a wrong one.
    RemRegion {
        /// The slot.
        slot: u8,
        /// Send a size that does not match (must be refused).
        wrong_size: bool,
    },
    /// SET_FEATURES while the queue runs; the driver resets its queue if ACCESS_PLATFORM
    /// changed (its ring addresses change meaning).
    SetFeatures {
        /// ACCESS_PLATFORM.
        iommu: bool,
        /// RING_EVENT_IDX.
        event_idx: bool,
    },
    /// GET_VRING_BASE on queue 0, then restart it from there (or leave it stopped).
    StopQueue {
        /// Restart at once.
        restart: bool,
    },
    /// A new kick eventfd for queue 0 while it runs (the worker is replaced).
    NewKick,
    /// SET_VRING_CALL on queue 0: a new eventfd, or none.
    NewCall(bool),
    /// SET_VRING_ERR on queue 0: a new eventfd, or none.
    NewErr(bool),
    /// SET_VRING_ENABLE on queue 0.
    Enable(bool),
    /// IOMMU side: unmap one page of an in-flight request (its I/O page table entry and an
    /// INVALIDATE of a range covering it, chosen by `how`), then poison the old page.
    Unmap {
        /// Which in-flight request.
        req: u8,
        /// Which of its pages.
        page: u8,
        /// The INVALIDATE's range: the page, the page and neighbours, up to 2^64, all.
        how: u8,
    },
    /// IOMMU side: move one page of an in-flight request to a new page (an UPDATE replacing
    /// the mapping), then poison the old page.
    Remap {
        /// Which in-flight request.
        req: u8,
        /// Which of its pages.
        page: u8,
    },
    /// IOTLB-only INVALIDATEs (the page table keeps its mappings; misses are answered again).
    Flush {
        /// Whole space, the rings, a split at `at` (as QEMU's flush), `[at, 2^64)`.
        kind: u8,
        /// A boundary.
        at: u64,
    },
    /// A raw IOTLB message at the edges of the space (may overflow).
    EdgeIotlb {
        /// UPDATE or INVALIDATE.
        update: bool,
        /// Index into the edge IOVAs.
        iova: u8,
        /// Index into the edge sizes.
        size: u8,
        /// Index into the target addresses (a scratch page, across two regions, nowhere).
        uaddr: u8,
        /// Raw permission bits (0 and 4.. are invalid).
        perm: u8,
    },
    /// A vring request on the hostile queue 1 (or a queue that does not exist).
    Hostile {
        /// Which request.
        what: u8,
        /// Its value (an index into edge values).
        value: u64,
    },
    /// Close the connection (requests in flight) and connect again.
    Reconnect,
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

fn canary(gpa: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGE as usize);
    while v.len() < PAGE as usize {
        v.extend_from_slice(&CANARY_SIG);
        v.extend_from_slice(&gpa.to_le_bytes());
    }
    v
}

fn stale(id: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&STALE_SIG);
        v.extend_from_slice(&id.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Whether `data` holds a canary or a stale-buffer block at a 16-byte boundary.
fn poisoned(data: &[u8]) -> Option<&'static str> {
    for b in data.chunks(16) {
        if b.starts_with(&CANARY_SIG) {
            return Some("a canary (a poisoned page)");
        }
        if b.starts_with(&STALE_SIG) {
            return Some("a read buffer's stale fill");
        }
    }
    None
}

fn sealed_memfd(name: &str, len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .expect("memfd");
    rustix::fs::ftruncate(&fd, len).expect("ftruncate");
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).expect("seals");
    fd
}

fn new_eventfd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).expect("eventfd")
}

fn is_timeout(e: &WireError) -> bool {
    matches!(e, WireError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}

/// A page of a straddle pair (never in the allocator).
fn is_straddle_page(gpa: u64) -> bool {
    gpa < CORE_SLOTS as u64 * CORE_SIZE
        && gpa > 0
        && (gpa & (CORE_SIZE - 1) == 0 || gpa & (CORE_SIZE - 1) == CORE_SIZE - PAGE)
        && gpa != CORE_SLOTS as u64 * CORE_SIZE - PAGE
}

fn slot_of(gpa: u64) -> Option<usize> {
    if gpa < CORE_SLOTS as u64 * CORE_SIZE {
        return Some((gpa / CORE_SIZE) as usize);
    }
    if (EXTRA_GPA..EXTRA_GPA + EXTRA_SLOTS as u64 * EXTRA_SIZE).contains(&gpa) {
        return Some(CORE_SLOTS + ((gpa - EXTRA_GPA) / EXTRA_SIZE) as usize);
    }
    None
}

const EDGE_IOVAS: [u64; 8] = [
    u64::MAX,
    u64::MAX - 0xfff,
    u64::MAX - 0x1fff,
    0,
    1 << 63,
    SCRATCH_IOVA,
    u64::MAX - 0x7ff,
    (1 << 63) - 0x1000,
];

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

    // ---- connection and requests ----

    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("connected")
    }

    fn connect(&mut self) -> Result<(), Failure> {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let server = self.server.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name("session-fuzz-server".into())
                .spawn(move || server.serve_connection(theirs))
                .expect("spawn"),
        );
        ours.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        self.conn = Some(Connection::new(ours));
        self.summary.connections += 1;

        let offered = self.get_u64("GET_FEATURES", FrontendRequest::GetFeatures)?;
        let want = dev_f::ACCESS_PLATFORM | dev_f::RING_EVENT_IDX | dev_f::PROTOCOL_FEATURES;
        if offered & want != want {
            return Err(format!("the back-end offers {offered:#x}"));
        }
        self.features = (offered & 0xff_ffff)
            | dev_f::VERSION_1
            | dev_f::PROTOCOL_FEATURES
            | (offered & dev_f::RING_INDIRECT_DESC);
        let f = self.wanted_features(self.iommu, self.event_idx);
        self.expect_ack("SET_FEATURES", FrontendRequest::SetFeatures(f))?;
        let proto = self.get_u64(
            "GET_PROTOCOL_FEATURES",
            FrontendRequest::GetProtocolFeatures,
        )?;
        let want_p = protocol::REPLY_ACK
            | protocol::BACKEND_REQ
            | protocol::CONFIG
            | protocol::MQ
            | protocol::CONFIGURE_MEM_SLOTS;
        if proto & want_p != want_p {
            return Err(format!("the back-end offers protocol features {proto:#x}"));
        }
        self.conn()
            .send_request(&FrontendRequest::SetProtocolFeatures(want_p), false)
            .map_err(|e| format!("SET_PROTOCOL_FEATURES: {e}"))?;
        self.expect_ack("SET_OWNER", FrontendRequest::SetOwner)?;
        let (chan_ours, chan_theirs) = UnixStream::pair().expect("socketpair");
        let channel = Connection::backend_channel(chan_ours);
        // `backend_channel` makes it blocking; misses are read without waiting.
        channel.socket().set_nonblocking(true).expect("nonblocking");
        self.channel = Some(channel);
        self.expect_ack(
            "SET_BACKEND_REQ_FD",
            FrontendRequest::SetBackendReqFd(OwnedFd::from(chan_theirs)),
        )?;
        let regions = (0..CORE_SLOTS).map(|s| self.region_fd(s)).collect();
        self.expect_ack("SET_MEM_TABLE", FrontendRequest::SetMemTable(regions))?;
        self.present = (0..CORE_SLOTS).collect();
        self.snapshots.clear();
        self.new_queue()
    }

    fn wanted_features(&self, iommu: bool, event_idx: bool) -> u64 {
        let mut f = self.features & !(dev_f::ACCESS_PLATFORM | dev_f::RING_EVENT_IDX);
        if iommu {
            f |= dev_f::ACCESS_PLATFORM;
        }
        if event_idx {
            f |= dev_f::RING_EVENT_IDX;
        }
        f
    }

    /// Send `req` with NEED_REPLY; `Ok(true)` if acked with 0, `Ok(false)` if refused.
    fn ack(&mut self, what: &str, req: FrontendRequest) -> Result<bool, Failure> {
        let sent = Instant::now();
        let h = self
            .conn()
            .send_request(&req, true)
            .map_err(|e| format!("{what}: send failed: {e} (back-end gone?)"))?;
        match self.conn().recv_ack(&h) {
            Ok(()) => Ok(true),
            Err(WireError::PeerFailed { .. } | WireError::PeerRefused { .. }) => Ok(false),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} (NEED_REPLY) not answered within {:?}",
                sent.elapsed()
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    fn expect_ack(&mut self, what: &str, req: FrontendRequest) -> Result<(), Failure> {
        if self.ack(what, req)? {
            Ok(())
        } else {
            Err(format!("{what} refused"))
        }
    }

    fn reply(
        &mut self,
        what: &str,
        req: FrontendRequest,
        kind: ReplyKind,
    ) -> Result<Option<Reply>, Failure> {
        let h = self
            .conn()
            .send_request(&req, false)
            .map_err(|e| format!("{what}: send failed: {e}"))?;
        match self.conn().recv_reply(&h, kind) {
            Ok(r) => Ok(Some(r)),
            Err(WireError::PeerRefused { .. }) => Ok(None),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} not answered within {REPLY_TIMEOUT:?}"
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    fn get_u64(&mut self, what: &str, req: FrontendRequest) -> Result<u64, Failure> {
        match self.reply(what, req, ReplyKind::U64)? {
            Some(Reply::U64(v)) => Ok(v),
            other => Err(format!("{what}: {other:?}")),
        }
    }

    fn get_vring_base(&mut self, index: u32) -> Result<Option<u32>, Failure> {
        let r = self.reply(
            "GET_VRING_BASE",
            FrontendRequest::GetVringBase(VringState { index, num: 0 }),
            ReplyKind::VringState,
        )?;
        Ok(match r {
            Some(Reply::VringState(v)) => Some(v.num),
            _ => None,
        })
    }

    /// A raw IOTLB message (any iova/size/perm, even invalid ones) with NEED_REPLY.
    fn raw_iotlb(&mut self, what: &str, m: VhostIotlbMsg) -> Result<bool, Failure> {
        use zerocopy_free::as_bytes;
        let payload = as_bytes(&m);
        let header = Header::new(22, payload.len() as u32, true);
        self.conn()
            .send(&header, &payload, &[])
            .map_err(|e| format!("{what}: send failed: {e}"))?;
        match self.conn().recv_ack(&header) {
            Ok(()) => Ok(true),
            Err(WireError::PeerFailed { .. } | WireError::PeerRefused { .. }) => Ok(false),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} (NEED_REPLY) not answered within {REPLY_TIMEOUT:?}"
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    fn iotlb(&mut self, what: &str, m: IotlbMsg) -> Result<bool, Failure> {
        self.ack(what, FrontendRequest::IotlbMsg(m))
    }

    fn region(&self, s: usize) -> MemoryRegion {
        let slot = &self.slots[s];
        MemoryRegion {
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: VA_BASE + slot.gpa,
            mmap_offset: 0,
        }
    }

    fn region_fd(&self, s: usize) -> RegionFd {
        RegionFd {
            region: self.region(s),
            fd: self.slots[s].fd.try_clone().expect("dup"),
        }
    }

    // ---- the driver's queue ----

    fn core_present(&self) -> bool {
        (0..CORE_SLOTS).all(|s| self.present.contains(&s))
    }

    /// Build queue 0 on fresh ring pages in the current mode and start it.
    fn new_queue(&mut self) -> Result<(), Failure> {
        if self.next_generation >= RING_GENERATIONS {
            self.queue = None;
            return Ok(());
        }
        let g = self.next_generation;
        self.next_generation += 1;
        let gpa = (RESERVED_PAGES + g * RING_PAGES) * PAGE;
        let (space, base) = if self.iommu {
            (IovaSpace::new(), RING_IOVA + g * 0x10_0000)
        } else {
            (IovaSpace::identity(), gpa)
        };
        self.space = space;
        self.extents.clear();
        let mut alloc = PageAllocator::new(0, 0, 0);
        for p in (0..RING_PAGES).rev() {
            alloc.free(gpa + p * PAGE);
        }
        let driver = DriverQueue::new(&self.mem, &mut self.space, &mut alloc, base, QSIZE);
        let addrs = driver.addresses();
        self.queue = Some(Queue0 {
            driver,
            kick: new_eventfd(),
            call: new_eventfd(),
            err: new_eventfd(),
            generation: g,
            addrs,
            running: false,
            enabled: false,
            broken: false,
            used: 0,
            avail: 0,
        });
        self.start_queue(0)
    }

    /// Set up and start queue 0 from `base`.
    fn start_queue(&mut self, base: u16) -> Result<(), Failure> {
        let Some(q) = self.queue.as_ref() else {
            return Ok(());
        };
        let (d, a, u) = q.addrs;
        let va = |x: u64| if self.iommu { x } else { VA_BASE + x };
        let (d, a, u) = (va(d), va(a), va(u));
        let err = q.err.try_clone().expect("dup");
        let call = q.call.try_clone().expect("dup");
        let kick = q.kick.try_clone().expect("dup");
        self.expect_ack(
            "SET_VRING_NUM",
            FrontendRequest::SetVringNum(VringState {
                index: 0,
                num: u32::from(QSIZE),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_BASE",
            FrontendRequest::SetVringBase(VringState {
                index: 0,
                num: u32::from(base),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_ADDR",
            FrontendRequest::SetVringAddr(VringAddr {
                index: 0,
                flags: 0,
                descriptor: d,
                used: u,
                available: a,
                log: 0,
            }),
        )?;
        self.expect_ack(
            "SET_VRING_ERR",
            FrontendRequest::SetVringErr(VringFile {
                index: 0,
                fd: Some(err),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_CALL",
            FrontendRequest::SetVringCall(VringFile {
                index: 0,
                fd: Some(call),
            }),
        )?;
        let started = self.ack(
            "SET_VRING_KICK",
            FrontendRequest::SetVringKick(VringFile {
                index: 0,
                fd: Some(kick),
            }),
        )?;
        // Without the IOMMU the ring addresses are resolved at start: refused only if their
        // memory is out of the table.
        if !started && (self.iommu || self.core_present()) {
            return Err("SET_VRING_KICK of a valid ring refused".into());
        }
        self.expect_ack(
            "SET_VRING_ENABLE",
            FrontendRequest::SetVringEnable(VringState { index: 0, num: 1 }),
        )?;
        let q = self.queue.as_mut().expect("queue");
        q.running = started;
        q.enabled = true;
        q.broken = false;
        // Whatever was published and not handed to the device yet is there for it.
        let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
        Ok(())
    }

    /// GET_VRING_BASE on queue 0; checks that every request not completed is handed back.
    fn stop_queue(&mut self, strict: bool) -> Result<Option<u16>, Failure> {
        if self.queue.is_none() {
            return Ok(None);
        }
        let base = self.get_vring_base(0)?;
        // Completions published before the stop are checked as usual.
        self.collect()?;
        let q = self.queue.as_mut().expect("queue");
        q.running = false;
        q.enabled = false;
        let Some(base) = base else {
            return Err("GET_VRING_BASE of queue 0 refused".into());
        };
        let base = u16::try_from(base).map_err(|_| format!("GET_VRING_BASE answered {base}"))?;
        if strict && base != q.used {
            let lost = base.wrapping_sub(q.used);
            return Err(format!(
                "GET_VRING_BASE answered {base} but the driver saw {} completions of {} \
                 published: {} request(s) consumed and neither completed nor handed back",
                q.used, q.avail, lost
            ));
        }
        Ok(Some(base))
    }

    /// Stop queue 0 and restart it where it stopped.
    fn restart_queue(&mut self) -> Result<(), Failure> {
        if let Some(base) = self.stop_queue(true)? {
            self.start_queue(base)?;
        }
        Ok(())
    }

    // ---- the IOMMU side ----

    /// Answer the MISSes that have arrived.
    fn serve_misses(&mut self) -> Result<(), Failure> {
        loop {
            let Some(chan) = self.channel.as_ref() else {
                return Ok(());
            };
            let msg = match chan.recv() {
                Ok(m) => m,
                Err(e) if is_timeout(&e) => return Ok(()),
                Err(WireError::Disconnected) => return Ok(()),
                Err(e) => return Err(format!("back-end channel: {e}")),
            };
            let req = BackendRequest::decode(&msg.header, &msg.payload, msg.fds)
                .map_err(|e| format!("back-end channel: undecodable request: {e}"))?;
            let iova = match req {
                BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, .. }) => iova,
                BackendRequest::IotlbMsg(IotlbMsg::AccessFail { .. }) => continue,
                other => return Err(format!("back-end channel: unexpected {other:?}")),
            };
            let page = iova & !(PAGE - 1);
            let answer = if let Some(&(start, gpa, n)) = self.extents.get(&page) {
                Some((start, gpa, n * PAGE, Perm::ReadWrite))
            } else if let Some((range, gpa, perm)) =
                self.space.update_for(iova).filter(|_| self.iommu)
            {
                range.size().map(|s| (range.start(), gpa, s, perm))
            } else if (SCRATCH_IOVA..SCRATCH_IOVA + SCRATCH_PAGES * PAGE).contains(&iova) {
                let i = (page - SCRATCH_IOVA) / PAGE;
                Some((page, EXTRA_GPA + i * PAGE, PAGE, Perm::ReadWrite))
            } else {
                None
            };
            if let Some((start, gpa, size, perm)) = answer {
                let range = IovaRange::from_size(start, size).expect("range");
                self.summary.misses += 1;
                // Refused when the target's region is out of the table: fine.
                self.iotlb(
                    "IOTLB UPDATE (miss answer)",
                    IotlbMsg::Update {
                        range,
                        uaddr: VA_BASE + gpa,
                        perm,
                    },
                )?;
            }
        }
    }

    fn alloc_page(&mut self, reserve: usize) -> Option<u64> {
        if self.free.len() <= reserve {
            return None;
        }
        self.free.pop()
    }

    fn write_page(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("guest write");
    }

    fn read_mem(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("guest read");
        v
    }

    /// Poison `gpa` (the back-end acknowledged it can no longer reach it).
    fn poison(&mut self, gpa: u64) {
        self.write_page(gpa, &canary(gpa));
        self.quarantine.push(gpa);
        self.summary.poisoned += 1;
        // A core slot out of the table: its snapshot follows our own writes.
        if let Some(s) = slot_of(gpa) {
            if let Some(snap) = self.snapshots.get_mut(&s) {
                let off = (gpa - self.slots[s].gpa) as usize;
                snap[off..off + PAGE as usize].copy_from_slice(&canary(gpa));
            }
        }
    }

    // ---- the driver ----

    /// Submit requests up to the configured depth.
    fn submit_some(&mut self) -> Result<(), Failure> {
        if self.queue.is_none() || !self.core_present() {
            return Ok(());
        }
        while self.inflight.len() < self.cfg.depth {
            // The longest chain: header, three data pages, status.
            if self
                .queue
                .as_ref()
                .is_some_and(|q| q.driver.free_descriptors() < 5)
                || !self.submit_one()?
            {
                break;
            }
        }
        Ok(())
    }

    fn pick_disk_range(&mut self, n: u64, write: bool) -> Option<u64> {
        for _ in 0..4 {
            let first = self.rng.below(DISK_PAGES - n + 1);
            let clash = self
                .inflight
                .values()
                .any(|r| r.disk_overlaps(first, n) && (write || r.writes_disk()));
            if !clash {
                return Some(first);
            }
        }
        None
    }

    fn submit_one(&mut self) -> Result<bool, Failure> {
        let roll = self.rng.below(100);
        let kind = match roll {
            0..=39 => Kind::In,
            40..=79 => Kind::Out,
            80..=84 => Kind::Flush,
            85..=89 => Kind::GetId,
            90..=94 => Kind::Beyond(T_IN),
            _ => Kind::Beyond(T_OUT),
        };
        let straddle = if matches!(kind, Kind::In | Kind::Out) && self.rng.below(5) == 0 {
            self.straddle_busy.iter().position(|b| !b)
        } else {
            None
        };
        let npages = match (kind, straddle) {
            (Kind::Flush, _) => 0,
            (Kind::GetId | Kind::Beyond(_), _) => 1,
            (_, Some(_)) => 2,
            _ => 1 + self.rng.below(3),
        };
        let indirect = self.features & dev_f::RING_INDIRECT_DESC != 0 && self.rng.below(4) == 0;
        let need = 2 + if straddle.is_some() { 0 } else { npages } + u64::from(indirect);
        if self.free.len() < REPAIR_RESERVE + need as usize {
            return Ok(false);
        }
        let (disk_page, sector) = match kind {
            Kind::In | Kind::Out => {
                let Some(p) = self.pick_disk_range(npages, kind == Kind::Out) else {
                    return Ok(false);
                };
                (p, p * PAGE / SECTOR)
            }
            Kind::Beyond(_) => (0, DISK / SECTOR + self.rng.below(4) * 8),
            _ => (0, 0),
        };
        let id = self.next_id;
        self.next_id += 1;
        let ty = match kind {
            Kind::In => T_IN,
            Kind::Out => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::GetId => T_GET_ID,
            Kind::Beyond(t) => t,
        };
        let writes_data = matches!(kind, Kind::Out | Kind::Beyond(T_OUT));
        let mut data = Vec::new();
        if writes_data {
            data = (0..npages * PAGE)
                .map(|_| self.rng.next_u64() as u8)
                .collect();
        }
        // Header.
        let mut hdr = vec![0u8; PAGE as usize];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let header = self.place(&[hdr], Perm::ReadOnly, None).remove(0);
        // Data.
        let contents: Vec<Vec<u8>> = (0..npages as usize)
            .map(|i| {
                if writes_data {
                    data[i * PAGE as usize..(i + 1) * PAGE as usize].to_vec()
                } else {
                    stale(id, PAGE as usize)
                }
            })
            .collect();
        let data_perm = if writes_data {
            Perm::ReadOnly
        } else {
            Perm::ReadWrite
        };
        let data_pages = if npages > 0 {
            self.place(&contents, data_perm, straddle)
        } else {
            Vec::new()
        };
        if let Some(s) = straddle {
            self.straddle_busy[s] = true;
        }
        let mut st = vec![0u8; PAGE as usize];
        st[0] = 0xff;
        let status = self.place(&[st], Perm::ReadWrite, None).remove(0);
        // Descriptors: with the IOMMU one per buffer; without it one per data page, except
        // across a straddle pair (one descriptor over two regions).
        let mut bufs = vec![Buf {
            iova: header.iova,
            len: 16,
            write: false,
        }];
        if !data_pages.is_empty() {
            let write = !writes_data;
            let len = if kind == Kind::GetId {
                512
            } else {
                (npages * PAGE) as u32
            };
            if self.iommu || straddle.is_some() {
                bufs.push(Buf {
                    iova: data_pages[0].iova,
                    len,
                    write,
                });
            } else {
                for p in &data_pages {
                    bufs.push(Buf {
                        iova: p.iova,
                        len: len.min(PAGE as u32),
                        write,
                    });
                }
            }
        }
        bufs.push(Buf {
            iova: status.iova,
            len: 1,
            write: true,
        });
        let table = if indirect {
            Some(
                self.place(&[vec![0u8; PAGE as usize]], Perm::ReadOnly, None)
                    .remove(0),
            )
        } else {
            None
        };
        let q = self.queue.as_mut().expect("queue");
        let Some(head) = q.driver.add_chain(
            &self.mem,
            &self.space,
            &bufs,
            table.as_ref().map(|t| t.iova),
        ) else {
            return Err("harness: out of descriptors".into());
        };
        q.avail = q.avail.wrapping_add(1);
        let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
        let table = table.map(|mut t| {
            t.init = self.read_mem(t.gpa, PAGE as usize);
            t
        });
        if self.inflight.contains_key(&head) {
            return Err(format!("harness: head {head} reused while in flight"));
        }
        self.inflight.insert(
            head,
            Req {
                id,
                kind,
                disk_page,
                npages,
                data,
                header,
                data_pages,
                status,
                table,
                straddle,
            },
        );
        self.summary.submitted += 1;
        Ok(true)
    }

    /// Place `contents` (one page each) on fresh pages (or a straddle pair) at fresh IOVAs
    /// (with the IOMMU; guest-physical addresses without it).
    fn place(&mut self, contents: &[Vec<u8>], perm: Perm, straddle: Option<usize>) -> Vec<Page> {
        let gpas: Vec<u64> = match straddle {
            Some(s) => vec![
                (s as u64 + 1) * CORE_SIZE - PAGE,
                (s as u64 + 1) * CORE_SIZE,
            ],
            None => contents
                .iter()
                .map(|_| self.alloc_page(0).expect("pages counted"))
                .collect(),
        };
        let start = self.next_iova;
        if self.iommu {
            self.next_iova += (contents.len() as u64 + 1) * PAGE;
        }
        let mut out = Vec::new();
        for (i, (c, &gpa)) in contents.iter().zip(&gpas).enumerate() {
            self.write_page(gpa, c);
            let iova = if self.iommu {
                let iova = start + i as u64 * PAGE;
                self.space.map_page(iova, gpa, perm);
                iova
            } else {
                gpa
            };
            out.push(Page {
                iova,
                gpa,
                init: c.clone(),
                lost: false,
                unmapped: false,
            });
        }
        if self.iommu && straddle.is_some() {
            for p in &out {
                self.extents.insert(p.iova, (start, gpas[0], 2));
            }
        }
        out
    }

    /// Check the completions published so far.
    fn collect(&mut self) -> Result<(), Failure> {
        let Some(q) = self.queue.as_mut() else {
            return Ok(());
        };
        let used = q.driver.take_used(&self.mem, &self.space);
        q.used = q.used.wrapping_add(used.len() as u16);
        for (head, _len) in used {
            let Some(req) = self.inflight.remove(&head) else {
                return Err(format!(
                    "used entry for head {head}, which is not in flight (completed twice?)"
                ));
            };
            self.check_completion(&req)?;
            self.release(req);
        }
        Ok(())
    }

    fn mark_unknown(&mut self, req: &Req) {
        if req.writes_disk() {
            for p in req.disk_page..req.disk_page + req.npages {
                self.model[p as usize] = None;
            }
        }
    }

    fn check_completion(&mut self, req: &Req) -> Result<(), Failure> {
        let what = format!("request #{} ({:?})", req.id, req.kind);
        if req.status.lost {
            self.summary.unchecked += 1;
            self.mark_unknown(req);
            return Ok(());
        }
        let status = self.read_mem(req.status.gpa, 1)[0];
        let data_lost = req.data_pages.iter().any(|p| p.lost);
        match status {
            S_OK => {
                self.summary.ok += 1;
                match req.kind {
                    Kind::Beyond(_) => {
                        return Err(format!("{what}: completed OK beyond the end of the disk"))
                    }
                    Kind::In if !data_lost => {
                        let len = (req.npages * PAGE) as usize;
                        let mut got = Vec::with_capacity(len);
                        for p in &req.data_pages {
                            got.extend(self.read_mem(p.gpa, PAGE as usize));
                        }
                        let mut disk = vec![0u8; len];
                        self.disk
                            .read_exact_at(&mut disk, req.disk_page * PAGE)
                            .expect("disk");
                        if got != disk {
                            let at = got.iter().zip(&disk).position(|(a, b)| a != b).unwrap_or(0);
                            let why = poisoned(&got[at - at % 16..])
                                .map(|p| format!(" (the buffer holds {p})"))
                                .unwrap_or_default();
                            return Err(format!(
                                "{what}: completed OK but its data differs from the disk at \
                                 byte {at} of {len} (disk page {}){why}",
                                req.disk_page
                            ));
                        }
                    }
                    Kind::Out => {
                        for i in 0..req.npages {
                            let a = (i * PAGE) as usize;
                            self.model[(req.disk_page + i) as usize] =
                                Some(req.data[a..a + PAGE as usize].to_vec());
                        }
                    }
                    Kind::GetId if !data_lost => {
                        let got = self.read_mem(req.data_pages[0].gpa, SERIAL.len());
                        if got != SERIAL.as_bytes() {
                            return Err(format!("{what}: completed OK with id {got:?}"));
                        }
                    }
                    _ => {}
                }
            }
            S_IOERR | S_UNSUPP => {
                self.summary.errors += 1;
                if status == S_UNSUPP
                    && !req.header.lost
                    && matches!(req.kind, Kind::In | Kind::Out | Kind::GetId)
                {
                    return Err(format!("{what}: UNSUPP for a supported request"));
                }
                self.mark_unknown(req);
            }
            0xff => {
                return Err(format!(
                    "{what}: on the used ring without its status byte written"
                ))
            }
            s => return Err(format!("{what}: status byte {s}")),
        }
        Ok(())
    }

    /// A completed request's pages go back to the allocator (its IOVAs are never reused); a
    /// straddle pair is free again unless one of its pages was poisoned.
    fn release(&mut self, req: Req) {
        if let Some(s) = req.straddle {
            let pair = [
                (s as u64 + 1) * CORE_SIZE - PAGE,
                (s as u64 + 1) * CORE_SIZE,
            ];
            let intact = req
                .data_pages
                .iter()
                .zip(pair)
                .all(|(p, g)| !p.lost && p.gpa == g);
            if intact {
                self.straddle_busy[s] = false;
            }
        }
        for p in req.pages() {
            if p.unmapped {
                continue;
            }
            if self.iommu {
                self.space.unmap(p.iova, PAGE);
                self.extents.remove(&p.iova);
            }
            if !is_straddle_page(p.gpa) {
                self.free.push(p.gpa);
            }
        }
    }

    /// Everything in flight is given up (the queue is stopped or the connection gone): its
    /// pages and the rings are poisoned, its writes leave the disk unknown.
    fn abandon(&mut self) {
        let reqs: Vec<Req> = std::mem::take(&mut self.inflight).into_values().collect();
        for r in reqs {
            self.mark_unknown(&r);
            for p in r.pages() {
                if !p.unmapped {
                    self.poison(p.gpa);
                }
            }
            // A straddle pair is never handed out again once poisoned.
        }
        if let Some(q) = self.queue.take() {
            let gpa = (RESERVED_PAGES + q.generation * RING_PAGES) * PAGE;
            for p in 0..RING_PAGES {
                self.poison(gpa + p * PAGE);
            }
        }
    }

    fn check_err_fd(&mut self) {
        if let Some(q) = self.queue.as_mut() {
            let mut b = [0u8; 8];
            if rustix::io::read(&q.err, &mut b).is_ok() {
                q.broken = true;
                self.summary.broken += 1;
            }
        }
    }

    // ---- checks ----

    fn check_alive(&mut self) -> Result<(), Failure> {
        let panics = PANICS.load(Ordering::SeqCst);
        if panics != self.panics_at_start {
            return Err(format!(
                "{} panic(s) in the process (a back-end worker or the session)",
                panics - self.panics_at_start
            ));
        }
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let t = self.thread.take().expect("thread");
            let how = match t.join() {
                Ok(()) => "returned",
                Err(_) => "panicked",
            };
            return Err(format!("the server thread {how} while connected"));
        }
        Ok(())
    }

    fn check_memory(&mut self) -> Result<(), Failure> {
        for &gpa in &self.quarantine {
            let got = self.read_mem(gpa, PAGE as usize);
            if got != canary(gpa) {
                let at = got
                    .iter()
                    .zip(canary(gpa))
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "poison: the back-end wrote into page {gpa:#x} (offset {at:#x}) after it \
                     acknowledged losing access to it"
                ));
            }
        }
        for (&s, snap) in &self.snapshots {
            let got = self.read_mem(self.slots[s].gpa, snap.len());
            if &got != snap {
                let at = got.iter().zip(snap).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "removed region: slot {s} (guest-physical {:#x}) changed at offset {at:#x} \
                     after the back-end acknowledged its removal",
                    self.slots[s].gpa
                ));
            }
        }
        let mut disk = vec![0u8; DISK as usize];
        self.disk.read_exact_at(&mut disk, 0).expect("disk");
        for p in 0..DISK_PAGES {
            if self
                .inflight
                .values()
                .any(|r| r.writes_disk() && r.disk_overlaps(p, 1))
            {
                continue;
            }
            let got = &disk[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            match &self.model[p as usize] {
                Some(want) if got != want.as_slice() => {
                    let why = poisoned(got)
                        .map(|w| format!(": it holds {w}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "disk page {p} differs from what was last written with OK{why}"
                    ));
                }
                None => {
                    if let Some(w) = poisoned(got) {
                        return Err(format!("disk page {p} holds {w}"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One round of the driver: misses, completions (checked), submissions. Memory is checked
    /// once per step ([`Harness::step`]).
    fn round(&mut self) -> Result<(), Failure> {
        self.check_alive()?;
        if self.queue.is_none() && self.core_present() && self.conn.is_some() {
            self.new_queue()?;
        }
        self.serve_misses()?;
        if let Some(q) = self.queue.as_ref() {
            let chan = self.channel.as_ref().map(|c| c.socket());
            let mut fds = vec![PollFd::new(&q.call, PollFlags::IN)];
            if let Some(c) = chan {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 250_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&q.call, &mut b);
        }
        self.serve_misses()?;
        self.collect()?;
        self.check_err_fd();
        self.submit_some()
    }

    // ---- operations ----

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

    fn apply(&mut self, op: &Op) -> Result<(), Failure> {
        match *op {
            Op::Pump(n) => {
                for _ in 0..n % 32 {
                    self.round()?;
                }
            }
            Op::SetMemTable(mask) => {
                let set: BTreeSet<usize> = (0..SLOTS).filter(|s| mask & (1 << s) != 0).collect();
                let regions = set.iter().map(|&s| self.region_fd(s)).collect();
                let acked = self.ack("SET_MEM_TABLE", FrontendRequest::SetMemTable(regions))?;
                let valid = !set.is_empty() && set.len() <= MAX_TABLE_REGIONS;
                if acked != valid {
                    return Err(format!(
                        "SET_MEM_TABLE of {} regions {}",
                        set.len(),
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    self.set_present(set);
                }
            }
            Op::AddRegion(n) => {
                let s = usize::from(n) % SLOTS;
                let acked =
                    self.ack("ADD_MEM_REG", FrontendRequest::AddMemReg(self.region_fd(s)))?;
                let valid = !self.present.contains(&s) && self.present.len() < MAX_REGIONS;
                if acked != valid {
                    return Err(format!(
                        "ADD_MEM_REG of slot {s} with {} regions in (slot {}) {}",
                        self.present.len(),
                        if self.present.contains(&s) {
                            "in"
                        } else {
                            "out"
                        },
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    let mut set = self.present.clone();
                    set.insert(s);
                    self.set_present(set);
                }
            }
            Op::RemRegion { slot, wrong_size } => {
                let s = usize::from(slot) % SLOTS;
                let mut r = self.region(s);
                if wrong_size {
                    r.memory_size -= PAGE;
                }
                let acked = self.ack("REM_MEM_REG", FrontendRequest::RemMemReg(r))?;
                let valid = self.present.contains(&s) && !wrong_size;
                if acked != valid {
                    return Err(format!(
                        "REM_MEM_REG of slot {s} (wrong size: {wrong_size}) {}",
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    let mut set = self.present.clone();
                    set.remove(&s);
                    self.set_present(set);
                }
            }
            Op::SetFeatures { iommu, event_idx } => {
                let f = self.wanted_features(iommu, event_idx);
                self.expect_ack("SET_FEATURES", FrontendRequest::SetFeatures(f))?;
                self.event_idx = event_idx;
                if iommu != self.iommu {
                    // The ring addresses change meaning: the driver resets its queue (the
                    // back-end may have stopped or restarted it meanwhile).
                    if self.queue.is_some() {
                        self.stop_queue(false)?;
                    }
                    self.abandon();
                    self.iommu = iommu;
                    if self.core_present() {
                        self.new_queue()?;
                    }
                }
            }
            Op::StopQueue { restart } => {
                if let Some(base) = self.stop_queue(true)? {
                    if restart {
                        self.start_queue(base)?;
                    }
                }
            }
            Op::NewKick => {
                if let Some(q) = self.queue.as_mut() {
                    q.kick = new_eventfd();
                    let kick = q.kick.try_clone().expect("dup");
                    let acked = self.ack(
                        "SET_VRING_KICK",
                        FrontendRequest::SetVringKick(VringFile {
                            index: 0,
                            fd: Some(kick),
                        }),
                    )?;
                    let q = self.queue.as_mut().expect("queue");
                    q.running = acked;
                    q.broken = false;
                    let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
                }
            }
            Op::NewCall(none) | Op::NewErr(none) => {
                if let Some(q) = self.queue.as_mut() {
                    let fd = if none {
                        None
                    } else {
                        let fd = new_eventfd();
                        let dup = fd.try_clone().expect("dup");
                        if matches!(op, Op::NewCall(_)) {
                            q.call = fd;
                        } else {
                            q.err = fd;
                        }
                        Some(dup)
                    };
                    let f = VringFile { index: 0, fd };
                    let req = if matches!(op, Op::NewCall(_)) {
                        FrontendRequest::SetVringCall(f)
                    } else {
                        FrontendRequest::SetVringErr(f)
                    };
                    self.expect_ack("SET_VRING_CALL/ERR", req)?;
                }
            }
            Op::Enable(on) => {
                if self.queue.is_some() {
                    self.expect_ack(
                        "SET_VRING_ENABLE",
                        FrontendRequest::SetVringEnable(VringState {
                            index: 0,
                            num: u32::from(on),
                        }),
                    )?;
                    let q = self.queue.as_mut().expect("queue");
                    q.enabled = on;
                    let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
                }
            }
            Op::Unmap { req, page, how } => self.unmap(req, page, how)?,
            Op::Remap { req, page } => self.remap(req, page)?,
            Op::Flush { kind, at } => self.flush(kind, at)?,
            Op::EdgeIotlb {
                update,
                iova,
                size,
                uaddr,
                perm,
            } => self.edge(update, iova, size, uaddr, perm)?,
            Op::Hostile { what, value } => self.hostile(what, value)?,
            Op::Reconnect => {
                self.disconnect()?;
                self.abandon();
                self.connect()?;
            }
        }
        Ok(())
    }

    /// The back-end's table is now `set`: snapshot the core slots that went out.
    fn set_present(&mut self, set: BTreeSet<usize>) {
        for s in 0..CORE_SLOTS {
            if set.contains(&s) {
                self.snapshots.remove(&s);
            } else if !self.snapshots.contains_key(&s) {
                let slot = &self.slots[s];
                let snap = self.read_mem(slot.gpa, slot.size as usize);
                self.snapshots.insert(s, snap);
            }
        }
        self.present = set;
    }

    /// The in-flight request and page an op names.
    fn target(&self, req: u8, page: u8) -> Option<(u16, usize)> {
        if self.inflight.is_empty() {
            return None;
        }
        let (&head, r) = self
            .inflight
            .iter()
            .nth(usize::from(req) % self.inflight.len())?;
        let n = r.pages().count();
        Some((head, usize::from(page) % n))
    }

    fn unmap(&mut self, req: u8, page: u8, how: u8) -> Result<(), Failure> {
        if !self.iommu {
            return Ok(());
        }
        let Some((head, i)) = self.target(req, page) else {
            return Ok(());
        };
        let r = self.inflight.get_mut(&head).expect("in flight");
        let p = r.pages_mut().nth(i).expect("page");
        if p.unmapped {
            return Ok(());
        }
        p.unmapped = true;
        p.lost = true;
        let (iova, gpa) = (p.iova, p.gpa);
        self.space.unmap(iova, PAGE);
        // What is left of a two-page extent is answered page by page.
        if let Some((start, egpa, n)) = self.extents.remove(&iova) {
            for k in 0..n {
                let other = start + k * PAGE;
                if other != iova {
                    self.extents.insert(other, (other, egpa + k * PAGE, 1));
                }
            }
        }
        let range = match how % 4 {
            0 => IovaRange::from_size(iova, PAGE),
            1 => IovaRange::from_size(iova - 3 * PAGE, 7 * PAGE),
            2 => IovaRange::new(iova, u64::MAX),
            _ => Ok(IovaRange::FULL),
        }
        .expect("range");
        if !self.iotlb("IOTLB INVALIDATE (unmap)", IotlbMsg::Invalidate { range })? {
            return Err(format!("INVALIDATE of {range:?} refused"));
        }
        self.poison(gpa);
        Ok(())
    }

    fn remap(&mut self, req: u8, page: u8) -> Result<(), Failure> {
        if !self.iommu || !self.snapshots.is_empty() || self.free.len() <= REPAIR_RESERVE {
            return Ok(());
        }
        let Some((head, i)) = self.target(req, page) else {
            return Ok(());
        };
        let p = self.inflight[&head].pages().nth(i).expect("page").clone();
        if p.unmapped || self.extents.contains_key(&p.iova) {
            return Ok(());
        }
        let new = self.alloc_page(0).expect("free page");
        let before = self.read_mem(p.gpa, PAGE as usize);
        self.write_page(new, &before);
        let perm = self
            .space
            .translate(p.iova)
            .map(|(_, perm)| perm)
            .expect("mapped");
        self.space.map_page(p.iova, new, perm);
        let range = IovaRange::from_size(p.iova, PAGE).expect("range");
        if !self.iotlb(
            "IOTLB UPDATE (remap)",
            IotlbMsg::Update {
                range,
                uaddr: VA_BASE + new,
                perm,
            },
        )? {
            return Err("UPDATE remapping a page of a present region refused".into());
        }
        // Acknowledged: the old page is frozen. Whatever the device wrote there before moves.
        let old = self.read_mem(p.gpa, PAGE as usize);
        if old != before {
            self.write_page(new, &old);
        }
        let r = self.inflight.get_mut(&head).expect("in flight");
        let q = r.pages_mut().nth(i).expect("page");
        q.gpa = new;
        self.poison(p.gpa);
        Ok(())
    }

    fn flush(&mut self, kind: u8, at: u64) -> Result<(), Failure> {
        let mut ranges = Vec::new();
        match kind % 4 {
            0 => ranges.push(IovaRange::FULL),
            1 => {
                if let Some(q) = self.queue.as_ref() {
                    let (d, _, u) = q.addrs;
                    ranges.push(IovaRange::new(d, u + PAGE - 1).expect("range"));
                }
            }
            2 => {
                // QEMU's full flush: [0, at) and [at, 2^64).
                let at = at.max(1);
                ranges.push(IovaRange::new(0, at - 1).expect("range"));
                ranges.push(IovaRange::new(at, u64::MAX).expect("range"));
            }
            _ => ranges.push(IovaRange::new(at, u64::MAX).expect("range")),
        }
        for range in ranges {
            if !self.iotlb("IOTLB INVALIDATE (flush)", IotlbMsg::Invalidate { range })? {
                return Err(format!("INVALIDATE of {range:?} refused"));
            }
        }
        Ok(())
    }

    fn edge(
        &mut self,
        update: bool,
        iova: u8,
        size: u8,
        uaddr: u8,
        perm: u8,
    ) -> Result<(), Failure> {
        let iova = EDGE_IOVAS[usize::from(iova) % EDGE_IOVAS.len()];
        let to_end = 0u64.wrapping_sub(iova); // 2^64 - iova (0 when iova is 0)
        let size = [
            0,
            1,
            PAGE,
            2 * PAGE,
            u64::MAX,
            1 << 63,
            to_end,
            to_end.wrapping_add(1),
        ][usize::from(size) % 8];
        // Targets: a scratch page, a range across two extra slots, a core slot, nowhere.
        let e = usize::from(uaddr / 4) % EXTRA_SLOTS;
        let extra = self.slots[CORE_SLOTS + e].gpa;
        let uaddr = match uaddr % 4 {
            0 => VA_BASE + extra,
            1 => VA_BASE + extra + EXTRA_SIZE - PAGE,
            // Core slot 0's reserved page 0 (the driver never uses the first pages).
            2 => VA_BASE,
            _ => 0x1000,
        };
        let perm = perm % 5;
        let m = VhostIotlbMsg {
            iova,
            size,
            uaddr,
            perm,
            ty: if update { 2 } else { 3 },
            padding: [0; 6],
        };
        let acked = self.raw_iotlb("raw IOTLB message at the edges", m)?;
        let overflows = size != 0 && iova.checked_add(size - 1).is_none();
        if update {
            // Valid only with a size, no wrap, a permission, and its whole target in the
            // table (the regions it spans adjacent in front-end address space).
            let in_table = !overflows
                && size != 0
                && size < (1 << 32)
                && (0..size.div_ceil(PAGE)).all(|k| {
                    let va = uaddr + k * PAGE;
                    va >= VA_BASE
                        && slot_of(va - VA_BASE).is_some_and(|s| self.present.contains(&s))
                });
            let valid = in_table && (1..=3).contains(&perm);
            if acked && !valid {
                return Err(format!("UPDATE {m:?} accepted (it must be refused)"));
            }
            if !acked && valid {
                return Err(format!("UPDATE {m:?} refused (it is valid)"));
            }
        } else if !overflows && !acked {
            return Err(format!("INVALIDATE {m:?} refused"));
        }
        Ok(())
    }

    fn hostile(&mut self, what: u8, value: u64) -> Result<(), Failure> {
        const NUMS: [u32; 10] = [0, 1, 2, 3, 16, 32, 256, 257, 1024, 65535];
        let addr = |v: u64| -> u64 {
            let extra = EXTRA_GPA + (v / 16 % EXTRA_SLOTS as u64) * EXTRA_SIZE;
            [
                SCRATCH_IOVA + (v / 16 % SCRATCH_PAGES) * PAGE,
                SCRATCH_IOVA + 0x7f0,
                u64::MAX - 0xfff,
                u64::MAX - 0x10,
                u64::MAX,
                0,
                1,
                VA_BASE + extra,
                VA_BASE + extra + EXTRA_SIZE - 0x10,
                VA_BASE + (1 << 40),
                v,
            ][(v % 11) as usize]
        };
        let index = if what >= 200 {
            [2u32, 255, u32::MAX][usize::from(what) % 3]
        } else {
            1
        };
        let idx8 = index as u8;
        match what % 10 {
            0 => {
                let num = if value % 16 == 15 {
                    value as u32
                } else {
                    NUMS[(value % 10) as usize]
                };
                self.ack(
                    "SET_VRING_NUM (hostile)",
                    FrontendRequest::SetVringNum(VringState { index, num }),
                )?;
            }
            1 => {
                let r = value.rotate_left(21);
                self.ack(
                    "SET_VRING_ADDR (hostile)",
                    FrontendRequest::SetVringAddr(VringAddr {
                        index,
                        flags: (value >> 60) as u32 & 1,
                        descriptor: addr(value),
                        available: addr(r),
                        used: addr(r.rotate_left(13)),
                        log: 0,
                    }),
                )?;
            }
            2 => {
                self.ack(
                    "SET_VRING_BASE (hostile)",
                    FrontendRequest::SetVringBase(VringState {
                        index,
                        num: value as u32,
                    }),
                )?;
            }
            3 => {
                let fd = new_eventfd();
                let dup = fd.try_clone().expect("dup");
                self.hostile_fds.push(fd);
                self.ack(
                    "SET_VRING_KICK (hostile)",
                    FrontendRequest::SetVringKick(VringFile {
                        index: idx8,
                        fd: (value & 7 != 0).then_some(dup),
                    }),
                )?;
            }
            4 | 5 => {
                let fd = (value & 3 != 0).then(new_eventfd);
                let f = VringFile { index: idx8, fd };
                let req = if what % 10 == 4 {
                    FrontendRequest::SetVringCall(f)
                } else {
                    FrontendRequest::SetVringErr(f)
                };
                self.ack("SET_VRING_CALL/ERR (hostile)", req)?;
            }
            6 => {
                self.ack(
                    "SET_VRING_ENABLE (hostile)",
                    FrontendRequest::SetVringEnable(VringState {
                        index,
                        num: (value & 1) as u32,
                    }),
                )?;
            }
            7 => {
                let r = self.reply(
                    "GET_VRING_BASE (hostile)",
                    FrontendRequest::GetVringBase(VringState { index, num: 0 }),
                    ReplyKind::VringState,
                )?;
                if index != 1 && r.is_some() {
                    return Err(format!("GET_VRING_BASE of queue {index} answered {r:?}"));
                }
            }
            _ => {
                for fd in &self.hostile_fds {
                    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
                }
            }
        }
        Ok(())
    }

    /// Close the connection and wait for the server thread to end.
    fn disconnect(&mut self) -> Result<(), Failure> {
        self.conn = None;
        self.channel = None;
        self.hostile_fds.clear();
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let end = Instant::now() + REPLY_TIMEOUT;
        while !t.is_finished() {
            if Instant::now() > end {
                return Err(format!(
                    "liveness: serve_connection did not return within {REPLY_TIMEOUT:?} of \
                     a disconnect"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join()
            .map_err(|_| "the server thread panicked".to_string())
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

/// `VhostIotlbMsg` to bytes without depending on zerocopy here (the fuzz crate does not).
mod zerocopy_free {
    use wire::VhostIotlbMsg;

    pub fn as_bytes(m: &VhostIotlbMsg) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&m.iova.to_ne_bytes());
        v.extend_from_slice(&m.size.to_ne_bytes());
        v.extend_from_slice(&m.uaddr.to_ne_bytes());
        v.push(m.perm);
        v.push(m.ty);
        v.extend_from_slice(&m.padding);
        v
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
