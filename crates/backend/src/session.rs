//! One front-end connection: the vhost-user state machine, run on the connection thread.
//!
//! The thread reads a request, applies it and answers it, and never does anything that can
//! wait for the front-end or for guest I/O: queues run on their own workers
//! ([`crate::worker`]), misses go out from the workers without waiting for a reply, and the
//! only thing the thread may wait for before acknowledging an IOTLB change is a worker
//! finishing the request it is serving (never a worker parked on a miss).
//!
//! IOTLB messages:
//! - UPDATE: `uaddr` is a front-end virtual address; it is resolved through the memory table
//!   to guest-physical pieces when the UPDATE is applied (an UPDATE spanning two regions
//!   becomes two entries; one outside every region is refused), so that a hit costs one
//!   IOTLB lookup. Waiters whose missing byte it covers are woken.
//! - INVALIDATE: applied, then acknowledged once no worker can still use what it removed.
//!   Acknowledgements of a pipelined burst are held while more of it is readable and then
//!   sent together after one quiescence; any other request first flushes them (replies stay
//!   in request order).
//!
//! What the front-end hands us is checked before it is used: kick, call and error fds must
//! be eventfds ([`crate::eventfd`]), memory regions must fit in 64 bits and a memfd must be
//! sealed against shrinking ([`crate::memory`]).
//!
//! Changes under a running queue restart it: a SET_FEATURES that changes the features stops
//! every running queue, applies, and starts them again from where they stopped (with the new
//! translator, notification mode and chain limits); a SET_VRING_BASE stops a running queue,
//! and the next SET_VRING_KICK starts it from that base. Ring sizes and addresses take
//! effect at the next start too.
//!
//! Reset hygiene: GET_VRING_BASE stops that queue and drops its pending misses; every
//! SET_FEATURES with ACCESS_PLATFORM empties the IOTLB (QEMU re-sends it after a guest reset
//! without forwarding the unmaps of the old rings); a new memory table empties it too; the
//! end of the connection stops everything and unmaps the memory.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use iotlb::{Iotlb, IovaRange, SharedIotlb};
use parking_lot::{Mutex, RwLock};
use wire::features::{check_acked, check_iommu_offer, device as dev_f, protocol};
use wire::vhost_user::{
    reply_kind, Config, Connection, DecodeLimits, FrontendRequest, Header, RawMessage, Reply,
    VringAddr, VringState,
};
use wire::{IotlbMsg, WireError};

use crate::channel::BackendChannel;
use crate::device::Device;
use crate::dirty::SharedLog;
use crate::eventfd::checked_eventfd;
use crate::memory::{MapOptions, MemTable, MAX_REGIONS};
use crate::quiesce::Epochs;
use crate::shared::{EngineConfig, Shared, Wakers, MIN_ENTRIES_PER_QUEUE, MIN_IOTLB_CAPACITY};
use crate::stats::EngineCounters;
use crate::worker::{QueueConfig, Worker};

/// Most IOTLB acknowledgements held back to be sent together (see `Session::deferred`).
const MAX_DEFERRED_ACKS: usize = 128;

/// Why a front-end request was refused (logged, and answered with a failure status when the
/// request asks for one).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// Features or protocol features not offered.
    #[error(transparent)]
    Negotiation(#[from] wire::features::NegotiationError),
    /// A memory table or region refused.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemError),
    /// A kick, call or error fd refused.
    #[error(transparent)]
    SignalFd(#[from] crate::eventfd::SignalFdError),
    /// An IOTLB UPDATE the cache refused.
    #[error(transparent)]
    Update(#[from] iotlb::UpdateError),
    /// A range that cannot be represented.
    #[error(transparent)]
    Range(#[from] iotlb::RangeError),
    /// A queue index the device does not have.
    #[error("no queue {0}")]
    NoQueue(u32),
    /// A queue size over the device's largest.
    #[error("queue size {0}")]
    QueueSize(u32),
    /// A vring base that is not a 16-bit index.
    #[error("vring base {0}")]
    VringBase(u32),
    /// SET_VRING_KICK without a fd (polling mode).
    #[error("polling mode (no kick fd) is not supported")]
    NoKickFd,
    /// A queue started before its ring addresses were given.
    #[error("SET_VRING_KICK before SET_VRING_ADDR")]
    NoRingAddress,
    /// A queue worker could not be started.
    #[error("cannot start the queue worker: {0}")]
    Worker(std::io::Error),
    /// An UPDATE of all 2^64 bytes.
    #[error("an UPDATE of the whole space")]
    WholeSpace,
    /// An IOTLB message only a back-end sends (MISS, ACCESS_FAIL).
    #[error("unexpected IOTLB message from the front-end: {0:?}")]
    UnexpectedIotlb(IotlbMsg),
    /// An IOTLB message reached the wrong handler (they are applied by `Session::deferred`).
    #[error("IOTLB messages are not applied here")]
    IotlbElsewhere,
    /// A dirty log refused (SET_LOG_BASE).
    #[error(transparent)]
    Log(#[from] crate::dirty::LogError),
    /// SET_LOG_BASE without `VHOST_USER_PROTOCOL_F_LOG_SHMFD` negotiated.
    #[error("SET_LOG_BASE before LOG_SHMFD was negotiated")]
    NoLogShmfd,
    /// A config-space write the device refused.
    #[error("config write refused")]
    ConfigRefused,
}

/// The connection thread's view of one vring.
struct Vring {
    size: u16,
    addr: Option<VringAddr>,
    base: u16,
    call: Arc<Mutex<Option<OwnedFd>>>,
    /// The vring error eventfd (SET_VRING_ERR): signalled when the queue breaks.
    err: Arc<Mutex<Option<OwnedFd>>>,
    enabled: Arc<AtomicBool>,
    /// The kick eventfd of the last SET_VRING_KICK: the queue runs (or is restarted) with it.
    kick: Option<Arc<OwnedFd>>,
    worker: Option<Worker>,
}

impl Vring {
    fn new() -> Self {
        Vring {
            size: 0,
            addr: None,
            base: 0,
            call: Arc::new(Mutex::new(None)),
            err: Arc::new(Mutex::new(None)),
            enabled: Arc::new(AtomicBool::new(false)),
            kick: None,
            worker: None,
        }
    }
}

/// One connection's state.
pub(crate) struct Session<D: Device> {
    shared: Arc<Shared<D>>,
    conn: Arc<Connection>,
    vrings: Vec<Vring>,
    features: u64,
    protocol: u64,
    status: u8,
    /// IOTLB messages applied but not acknowledged yet, in order (see [`Session::deferred`]).
    deferred: Vec<(Header, bool)>,
    /// The IOTLB generation the deferred acknowledgements wait for, if any.
    deferred_gen: Option<u64>,
    /// How memory regions are accepted.
    map: MapOptions,
    /// Message service times (see [`crate::Server::service_time`]).
    service: Arc<iotlb::hist::Histogram>,
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The front-end hung up.
    Disconnected,
    /// The stream broke.
    Error(WireError),
}

impl<D: Device> Session<D> {
    pub(crate) fn new(
        dev: Arc<D>,
        sock: UnixStream,
        config: &EngineConfig,
        miss_rtt: Arc<iotlb::hist::Histogram>,
        service: Arc<iotlb::hist::Histogram>,
    ) -> Self {
        let queues = usize::from(dev.queues());
        let capacity = config
            .iotlb_capacity
            .clamp(MIN_IOTLB_CAPACITY, iotlb::MAX_CAPACITY);
        if capacity != config.iotlb_capacity {
            tracing::warn!(
                asked = config.iotlb_capacity,
                capacity,
                "vhost-user: IOTLB capacity out of range; using the nearest supported"
            );
        }
        if capacity < MIN_ENTRIES_PER_QUEUE * queues {
            tracing::warn!(
                capacity,
                queues,
                "vhost-user: a small IOTLB for this many queues: the answer to one queue's \
                 MISS may be evicted by the others' before it looks, and be asked for again \
                 (every request is still served)"
            );
        }
        let iotlb =
            SharedIotlb::new(Iotlb::with_capacity(capacity).unwrap_or_else(|_| Iotlb::new()));
        // A MISS sent ahead that nobody joined within the miss timeout was lost.
        iotlb.set_ahead_ttl(config.miss_timeout);
        let conn = Arc::new(Connection::new(sock));
        conn.set_busy_poll(config.poll, config.busy_poll);
        let channel = BackendChannel::default();
        channel.watch_frontend(conn.clone());
        Session {
            shared: Arc::new(Shared {
                dev,
                mem: RwLock::new(Arc::new(MemTable::empty())),
                iotlb,
                channel,
                epochs: Epochs::default(),
                stats: EngineCounters {
                    miss_rtt,
                    ..EngineCounters::default()
                },
                miss_timeout: config.miss_timeout,
                busy_poll: config.busy_poll,
                poll: config.poll,
                iotlb_capacity: capacity,
                wakers: Arc::new(Wakers::new(queues)),
                log: Arc::new(SharedLog::new(config.log_mode)),
            }),
            conn,
            service,
            vrings: (0..queues).map(|_| Vring::new()).collect(),
            features: 0,
            protocol: 0,
            status: 0,
            deferred: Vec::new(),
            deferred_gen: None,
            map: MapOptions {
                allow_unsealed: config.allow_unsealed_memory,
            },
        }
    }

    /// The features this back-end offers.
    pub(crate) fn offered_features(dev: &D) -> u64 {
        dev.features()
            | dev_f::VERSION_1
            | dev_f::ACCESS_PLATFORM
            | dev_f::PROTOCOL_FEATURES
            | dev_f::LOG_ALL
    }

    /// The protocol features this back-end offers.
    pub(crate) fn offered_protocol(dev: &D) -> u64 {
        dev.protocol_features()
            | protocol::REPLY_ACK
            | protocol::BACKEND_REQ
            | protocol::CONFIGURE_MEM_SLOTS
            | protocol::STATUS
            | protocol::LOG_SHMFD
    }

    pub(crate) fn iotlb(&self) -> &SharedIotlb<u16> {
        &self.shared.iotlb
    }

    pub(crate) fn counters(&self) -> &EngineCounters {
        &self.shared.stats
    }

    pub(crate) fn dirty_log(&self) -> &SharedLog {
        &self.shared.log
    }

    fn iommu(&self) -> bool {
        self.features & dev_f::ACCESS_PLATFORM != 0
    }

    /// Serve requests until the front-end goes away; then stop everything.
    pub(crate) fn run(&mut self, stop: &AtomicBool) -> SessionEnd {
        if let Err(e) = check_iommu_offer(
            Self::offered_features(&self.shared.dev),
            Self::offered_protocol(&self.shared.dev),
        ) {
            tracing::error!(error = %e, "vhost-user: inconsistent offer");
        }
        let end = loop {
            if stop.load(Ordering::SeqCst) {
                let _ = self.flush_deferred();
                break SessionEnd::Disconnected;
            }
            let msg = match self.conn.recv() {
                Ok(m) => m,
                Err(WireError::Disconnected) => break SessionEnd::Disconnected,
                Err(e) if e.is_fatal() => break SessionEnd::Error(e),
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user: refused a message");
                    if let Err(e) = self.flush_deferred().and_then(|()| self.conn.reject(&e)) {
                        break SessionEnd::Error(e);
                    }
                    continue;
                }
            };
            let read = Instant::now();
            let mut res = self.handle(msg);
            if res.is_ok()
                && !self.deferred.is_empty()
                && (self.deferred.len() >= MAX_DEFERRED_ACKS || !self.conn.readable_now())
            {
                res = self.flush_deferred();
            }
            if self.shared.channel.has_held() {
                self.release_held_misses();
            }
            self.service.record(read.elapsed());
            if let Err(e) = res {
                if e.is_fatal() {
                    break SessionEnd::Error(e);
                }
                tracing::warn!(error = %e, "vhost-user: reply failed");
            }
        };
        self.shutdown();
        end
    }

    /// MISSes a worker held while messages of ours were unread (see
    /// [`BackendChannel::miss_unless_pending`]): once we have read them all, send those that
    /// no UPDATE among them answered.
    fn release_held_misses(&self) {
        let iotlb = &self.shared.iotlb;
        self.shared.channel.release_held(
            &self.shared.stats,
            !self.conn.readable_now(),
            |iova, access| iotlb.lookup(iova).is_some_and(|m| m.perm.allows(access)),
        );
    }

    /// Decode, apply and answer one message.
    fn handle(&mut self, msg: RawMessage) -> Result<(), WireError> {
        let header = msg.header;
        let limits = DecodeLimits {
            max_mem_regions: MAX_REGIONS,
        };
        let req = match FrontendRequest::decode(&header, &msg.payload, msg.fds, &limits) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(request = header.request, error = %e, "vhost-user: refused a request");
                self.flush_deferred()?;
                return self.conn.refuse(&header);
            }
        };
        tracing::debug!(request = ?req.req(), "vhost-user: request");
        let req = match req {
            FrontendRequest::IotlbMsg(m) => return self.deferred(header, m),
            other => other,
        };
        // Replies go out in request order.
        self.flush_deferred()?;
        let code = req.req();
        match self.apply(req) {
            Ok(Some(reply)) => self.conn.send_reply(&header, &reply),
            Ok(None) if reply_kind(code).is_some() => self.conn.refuse(&header),
            Ok(None) => self.conn.ack(&header, true),
            Err(why) => {
                // A failure status if the request asked for one (or has an answer of its
                // own); nothing otherwise, as the protocol says.
                tracing::warn!(request = ?code, error = %why, "vhost-user: request failed");
                self.conn.refuse(&header)
            }
        }
    }

    /// Apply an IOTLB message now and queue its acknowledgement.
    ///
    /// A front-end that pipelines a burst (a batch of unmaps, the UPDATEs answering a burst
    /// of misses) gets one quiescence and one write for all of it: acknowledgements are held
    /// while more messages are already readable, up to [`MAX_DEFERRED_ACKS`], then sent
    /// together once no worker can use what any of them removed. A front-end that waits for
    /// each acknowledgement loses nothing: with nothing more to read, the ack goes at once.
    fn deferred(&mut self, header: Header, m: IotlbMsg) -> Result<(), WireError> {
        let ok = match self.iotlb_msg(m) {
            Ok(wait) => {
                if let Some(g) = wait {
                    self.deferred_gen = Some(self.deferred_gen.map_or(g, |d| d.max(g)));
                }
                true
            }
            Err(why) => {
                tracing::warn!(error = %why, "vhost-user: IOTLB message refused");
                false
            }
        };
        self.deferred.push((header, ok));
        Ok(())
    }

    /// Quiesce for, then send, the acknowledgements held by [`Session::deferred`].
    fn flush_deferred(&mut self) -> Result<(), WireError> {
        if let Some(g) = self.deferred_gen.take() {
            self.quiesce(g);
        }
        if self.deferred.is_empty() {
            return Ok(());
        }
        let res = self.conn.ack_all(&self.deferred);
        self.deferred.clear();
        res
    }

    /// Apply one request; `Ok(Some)` is its reply when it has one of its own.
    fn apply(&mut self, req: FrontendRequest) -> Result<Option<Reply>, RequestError> {
        use FrontendRequest as R;
        let dev = self.shared.dev.clone();
        Ok(match req {
            R::GetFeatures => Some(Reply::U64(Self::offered_features(&dev))),
            R::SetFeatures(f) => {
                check_acked(Self::offered_features(&dev), f)?;
                let toggled = (self.features ^ f) & dev_f::ACCESS_PLATFORM != 0;
                // A change under running queues (their translator, notification mode and
                // chain limits come from the features): they stop, the change applies, and
                // they start again from where they stopped. The same features again change
                // nothing, and neither does LOG_ALL alone: logging is switched on or off
                // under running queues, which log after each write and so never miss one
                // made after the switch is acknowledged.
                let restart = if (f ^ self.features) & !dev_f::LOG_ALL != 0 {
                    self.stop_running()
                } else {
                    Vec::new()
                };
                if (f ^ self.features) & dev_f::LOG_ALL != 0 {
                    tracing::info!(
                        on = f & dev_f::LOG_ALL != 0,
                        "vhost-user: dirty logging (LOG_ALL)"
                    );
                }
                self.shared.log.set_on(f & dev_f::LOG_ALL != 0);
                self.features = f;
                dev.set_features(f & !dev_f::LOG_ALL);
                // Every SET_FEATURES with ACCESS_PLATFORM starts from an empty IOTLB (QEMU
                // re-sends it after a guest reset without the unmaps of the old rings), and
                // so does switching the IOMMU off.
                if f & dev_f::ACCESS_PLATFORM != 0 || toggled {
                    self.invalidate(IovaRange::FULL);
                    self.shared.iotlb.clear_pending();
                }
                for index in restart {
                    if let Err(why) = self.run_vring(index) {
                        tracing::warn!(queue = index, error = %why, "vhost-user: queue not restarted after SET_FEATURES");
                    }
                }
                None
            }
            R::GetProtocolFeatures => Some(Reply::U64(Self::offered_protocol(&dev))),
            R::SetProtocolFeatures(p) => {
                check_acked(Self::offered_protocol(&dev), p)?;
                self.protocol = p;
                None
            }
            R::SetOwner => None,
            R::ResetOwner | R::ResetDevice => {
                self.stop_all();
                self.shared.log.set_on(false);
                self.shared.log.unmap();
                self.invalidate(IovaRange::FULL);
                self.shared.iotlb.clear_pending();
                None
            }
            R::GetQueueNum => Some(Reply::U64(u64::from(dev.queues()))),
            R::GetMaxMemSlots => Some(Reply::U64(MAX_REGIONS as u64)),
            R::SetMemTable(regions) => {
                let table = MemTable::new(regions, self.map)?;
                self.set_memory(table);
                None
            }
            R::AddMemReg(region) => {
                let table = self.shared.mem.read().with_region(region, self.map)?;
                self.set_memory(table);
                None
            }
            R::RemMemReg(region) => {
                let table = self.shared.mem.read().without_region(&region)?;
                self.set_memory(table);
                None
            }
            R::SetLogBase { area, fd } => {
                if self.protocol & protocol::LOG_SHMFD == 0 {
                    return Err(RequestError::NoLogShmfd);
                }
                self.shared
                    .log
                    .map(area, std::fs::File::from(fd), self.map.allow_unsealed)?;
                tracing::info!(
                    bytes = area.mmap_size,
                    "vhost-user: dirty log mapped (SET_LOG_BASE)"
                );
                // Answered once mapped (the front-end waits for it before it reads the log);
                // a log it replaces is never marked again after this.
                Some(Reply::Log(area))
            }
            // A log-change eventfd: we have nothing to signal on it (the front-end reads the
            // log when it syncs), so it is accepted and closed.
            R::SetLogFd(_) => None,
            R::SetVringNum(s) => {
                let size = u16::try_from(s.num)
                    .ok()
                    .filter(|n| *n <= dev.max_queue_size())
                    .ok_or(RequestError::QueueSize(s.num))?;
                self.vring(s.index)?.size = size;
                None
            }
            R::SetVringAddr(a) => {
                self.vring(a.index)?.addr = Some(a);
                None
            }
            R::SetVringBase(s) => {
                let base = u16::try_from(s.num).map_err(|_| RequestError::VringBase(s.num))?;
                // A running queue stops (the front-end's base wins over where the worker
                // was) and stays stopped until the next SET_VRING_KICK starts it from here.
                self.stop(s.index)?;
                self.vring(s.index)?.base = base;
                None
            }
            R::GetVringBase(s) => {
                let base = self.stop(s.index)?;
                self.vring(s.index)?.enabled.store(false, Ordering::SeqCst);
                Some(Reply::VringState(VringState {
                    index: s.index,
                    num: u32::from(base),
                }))
            }
            R::SetVringKick(f) => {
                let kick = f.fd.ok_or(RequestError::NoKickFd)?;
                let kick = checked_eventfd(kick, "kick")?;
                self.vring(u32::from(f.index))?.kick = Some(Arc::new(kick));
                self.run_vring(f.index)?;
                None
            }
            R::SetVringCall(f) => {
                let fd = f.fd.map(|fd| checked_eventfd(fd, "call")).transpose();
                let fd = fd?;
                *self.vring(u32::from(f.index))?.call.lock() = fd;
                None
            }
            R::SetVringErr(f) => {
                let fd = f.fd.map(|fd| checked_eventfd(fd, "err")).transpose();
                let fd = fd?;
                *self.vring(u32::from(f.index))?.err.lock() = fd;
                None
            }
            R::SetVringEnable(s) => {
                let v = self.vring(s.index)?;
                v.enabled.store(s.num != 0, Ordering::SeqCst);
                self.shared.wakers.wake(s.index as u16);
                None
            }
            R::SetBackendReqFd(fd) => {
                self.shared.channel.connect(UnixStream::from(fd));
                None
            }
            // Applied, and acknowledged in bursts, by `Session::deferred`, which `handle` hands
            // every IOTLB message to before this is reached.
            R::IotlbMsg(_) => return Err(RequestError::IotlbElsewhere),
            R::GetConfig(c) => {
                let mut data = vec![0u8; c.data.len()];
                dev.read_config(c.offset, &mut data);
                Some(Reply::Config(Config {
                    offset: c.offset,
                    flags: c.flags,
                    data,
                }))
            }
            R::SetConfig(c) => {
                if !dev.write_config(c.offset, &c.data) {
                    return Err(RequestError::ConfigRefused);
                }
                None
            }
            R::SetStatus(s) => {
                self.status = s;
                None
            }
            R::GetStatus => Some(Reply::U64(u64::from(self.status))),
        })
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, RequestError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(RequestError::NoQueue(index))
    }

    /// Empty the IOTLB and swap the memory table in.
    fn set_memory(&mut self, table: MemTable) {
        *self.shared.mem.write() = Arc::new(table);
        // IOTLB targets were resolved through the old table.
        self.invalidate(IovaRange::FULL);
    }

    /// Invalidate `range` and wait until no worker can still use it.
    fn invalidate(&self, range: IovaRange) {
        if let Some(g) = self.shared.iotlb.invalidate(range) {
            self.quiesce(g);
        }
    }

    fn quiesce(&self, generation: u64) {
        let waited = self.shared.epochs.wait(generation);
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let stats = &self.shared.stats;
        EngineCounters::add(&stats.quiesce_us, us);
        EngineCounters::max(&stats.quiesce_max_us, us);
        if us > 1000 {
            EngineCounters::add(&stats.slow_quiesces, 1);
        }
    }

    /// Apply an UPDATE or INVALIDATE. `Ok(Some(generation))`: it took translations away
    /// (an INVALIDATE of mapped bytes, or an UPDATE remapping them; see
    /// [`iotlb::UpdateOutcome`]), and must not be acknowledged before the workers have
    /// quiesced for that generation.
    fn iotlb_msg(&mut self, m: IotlbMsg) -> Result<Option<u64>, RequestError> {
        match m {
            IotlbMsg::Update { range, uaddr, perm } => {
                let size = range.size().ok_or(RequestError::WholeSpace)?;
                let pieces = self.shared.mem.read().va_to_gpa(uaddr, size)?;
                let mut replaces = false;
                let mut iova = range.start();
                for (gpa, len) in pieces {
                    let piece = IovaRange::from_size(iova, len)?;
                    let res = self.shared.iotlb.update(piece, gpa, perm)?;
                    replaces |= res.replaced;
                    for q in res.woken {
                        self.shared.wakers.wake(q);
                    }
                    // Misses the UPDATE covered only in part: asked again for the rest.
                    for (iova, access) in res.resend {
                        self.shared
                            .channel
                            .miss(&self.shared.stats, None, iova, access);
                    }
                    iova = iova.wrapping_add(len);
                }
                // An UPDATE that remaps bytes a worker may hold (cached, or evicted but still
                // in a worker's copies or in the segments of a chain it is walking) replaces
                // their translation: as for an INVALIDATE, nobody may use the old one once we
                // acknowledge. One that maps unmapped bytes takes nothing from anybody.
                Ok(replaces.then(|| self.shared.iotlb.generation()))
            }
            IotlbMsg::Invalidate { range } => Ok(self.shared.iotlb.invalidate(range)),
            other => Err(RequestError::UnexpectedIotlb(other)),
        }
    }

    /// Stop every running queue; returns their indices (to restart them).
    fn stop_running(&mut self) -> Vec<u8> {
        let running: Vec<u8> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].worker.is_some())
            .filter_map(|i| u8::try_from(i).ok())
            .collect();
        for &i in &running {
            let _ = self.stop(u32::from(i));
        }
        running
    }

    /// Start queue `index` with its kick fd (SET_VRING_KICK, or a restart): from its base,
    /// with the current features and ring addresses.
    fn run_vring(&mut self, index: u8) -> Result<(), RequestError> {
        // A running worker is replaced (QEMU may set a new kick fd).
        let base = self.stop(u32::from(index))?;
        let iommu = self.iommu();
        let event_idx = self.features & dev_f::RING_EVENT_IDX != 0;
        let protocol_features = self.features & dev_f::PROTOCOL_FEATURES != 0;
        let mem = self.shared.mem.read().clone();
        let shared = self.shared.clone();
        let v = self.vring(u32::from(index))?;
        let kick = v.kick.clone().ok_or(RequestError::NoKickFd)?;
        let a = v.addr.ok_or(RequestError::NoRingAddress)?;
        let size = v.size;
        let areas = [
            (a.descriptor, virtq::desc_table_len(size)),
            (a.available, virtq::avail_ring_len(size)),
            (a.used, virtq::used_ring_len(size)),
        ];
        // Ring addresses: IOVAs with the IOMMU; front-end virtual addresses otherwise.
        let mut addrs = [0u64; 3];
        for (out, (addr, len)) in addrs.iter_mut().zip(areas) {
            *out = if iommu {
                addr
            } else {
                mem.va_to_gpa_contiguous(addr, len)?
            };
        }
        // Without PROTOCOL_FEATURES a ring is enabled when it starts; with them it waits
        // for SET_VRING_ENABLE.
        if !protocol_features {
            v.enabled.store(true, Ordering::SeqCst);
        }
        let cfg = QueueConfig {
            index: u16::from(index),
            size,
            desc: addrs[0],
            avail: addrs[1],
            used: addrs[2],
            base,
            event_idx,
            iommu,
            kick,
            call: v.call.clone(),
            err: v.err.clone(),
            enabled: v.enabled.clone(),
        };
        let worker = Worker::start(shared, cfg).map_err(RequestError::Worker)?;
        v.worker = Some(worker);
        Ok(())
    }

    /// Stop queue `index` (GET_VRING_BASE): returns its next avail index.
    fn stop(&mut self, index: u32) -> Result<u16, RequestError> {
        let shared = self.shared.clone();
        let v = self.vring(index)?;
        let base = match v.worker.take() {
            Some(w) => w.stop(&shared),
            None => v.base,
        };
        v.base = base;
        // No MISS is ever sent for a stopped queue, and its old misses wake nobody.
        shared.iotlb.cancel_waiter(&(index as u16));
        Ok(base)
    }

    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            let _ = self.stop(i as u32);
            if let Some(v) = self.vrings.get_mut(i) {
                *v = Vring::new();
            }
        }
    }

    /// The connection ended: stop the workers, forget every translation and pending miss,
    /// unmap the memory.
    fn shutdown(&mut self) {
        self.stop_all();
        self.shared.iotlb.invalidate_all();
        self.shared.iotlb.clear_pending();
        self.shared.channel.disconnect();
        self.shared.log.set_on(false);
        self.shared.log.unmap();
        *self.shared.mem.write() = Arc::new(MemTable::empty());
    }
}
