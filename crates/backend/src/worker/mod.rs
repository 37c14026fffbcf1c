//! Queue workers: one thread per started queue, never the connection thread.
//!
//! A worker sleeps on its kick eventfd and its wake eventfd (written by the connection thread
//! when an UPDATE covers the address it parked on, or to stop it), with a timeout while it is
//! parked on a miss; for the busy-poll window before that it polls a flag instead, which a
//! waker sets without a system call ([`Waker`]). Under adaptive polling
//! ([`wire::poll::PollMode::Adaptive`]) a queue that runs empty also polls its avail index,
//! with the driver's kicks turned off, for a window that follows how long the driver takes
//! to post the next chain (zero for an idle queue), and only then asks for kicks and sleeps. Awake, it drains its queue: pop a chain
//! (translating all of it), let the device serve it, complete it, notify the driver (every 32
//! completions under load, and when the queue runs dry; a queue parked on a miss holds the
//! interrupt while it busy-polls for the answer and sends it before it blocks).
//!
//! A device's handler may have nothing to do with its ring for a while
//! ([`crate::QueueHandler::ready`] false: a receive queue with no frame, a transmit queue
//! whose peer is full): the worker then sleeps on its eventfds (no ring polling) until a
//! kick or a [`crate::QueueWakers::wake`] from whoever made it ready. A request may span
//! several chains ([`crate::MoreChains`]: a merged receive frame): they are popped in one
//! section and published with one used index store, or all given back ([`crate::Served::Retry`])
//! when the ring runs out of chains or one's translation is missing (the queue then waits
//! for a kick or parks on the miss, and serves the request again whole).
//!
//! On a miss the queue does not consume the chain: the worker registers in the IOTLB's
//! pending table, sends `BACKEND_IOTLB_MSG(MISS)` on the back-end channel if it is the first
//! to miss on that page (never waiting for any reply), and parks. An UPDATE wakes it and the
//! walk goes on from where it stopped: it keeps what it translated, so a chain needing more
//! entries than the IOTLB holds still finishes. A MISS not answered within the timeout is
//! sent once more; if that one is not answered either, the request fails with the device's
//! error status and the queue moves on. A denied access sends ACCESS_FAIL and fails that
//! request. A guest can loop on a denied access or a malformed chain: a queue logs at most
//! 10 such warnings a second, and sends one ACCESS_FAIL per page and direction a second, 16 a
//! second in all (see [`crate::ratelimit`]); what it holds back is counted.
//!
//! Every unit of work that translates and touches guest memory runs inside the worker's
//! epoch (see [`crate::quiesce`]), and reads the memory table only once inside it;
//! parking, sending misses and sleeping happen outside it. The segments a parked walk kept
//! are checked against the IOTLB's changes at the start of the next section before any is
//! used (see `virtq`'s walk); a failed request's status byte is translated and written in one
//! section. A device's long call that touches no guest memory (an fsync) runs between two
//! sections ([`Served::Deferred`]): the request is checked in one, and its status byte
//! translated and written in the next.
//!
//! **The control thread never waits on a busy ring.** A drain serves at most
//! `DRAIN_BUDGET_REQUESTS` requests (or `DRAIN_BUDGET_BYTES`) before going back to the wait
//! loop, and looks at stop and enable between any two requests: GET_VRING_BASE,
//! SET_VRING_ENABLE(0), a reset and a disconnect wait for the request being served at most
//! (its disk I/O included, as QEMU's own block layer drains it), never for the ring to empty.
//!
//! **A completion is the truth** (design invariant 11). Every request the worker takes off the
//! avail ring ends in one of three ways:
//! - served: the device wrote its outcome (success or its own error status, e.g.
//!   `VIRTIO_BLK_S_UNSUPP`) and it goes on the used ring;
//! - failed: the engine could not serve it (a malformed chain, one beyond the device's
//!   limits, an access the IOMMU denied, a miss never answered): the device writes its error
//!   status (`VIRTIO_BLK_S_IOERR`) into the chain's last device-writable byte, translated for
//!   writing like any other access, and then it goes on the used ring;
//! - unreported: no status can be written (the chain has no device-writable byte, the byte is
//!   mapped without write permission or lies outside guest memory, its miss is never
//!   answered, or the device could not write it). Such a request is **never** put on the used
//!   ring: a driver that trusts the status byte, as Linux's virtio-blk does (it ignores the
//!   used length), would take stale memory for success. The queue stops instead (*broken*:
//!   the `DEVICE_NEEDS_RESET` case of the virtio spec, which a vhost-user back-end has no
//!   way to set), the vring error eventfd given by `SET_VRING_ERR` is signalled, and
//!   GET_VRING_BASE hands the request back to the driver's side of the ring, so that a
//!   restarted queue sees it again. QEMU 10 answers that signal only by logging `vhost vring
//!   error in virtqueue N` (nothing while the device is stopped); Linux keeps the request in
//!   flight (virtio-blk has no timeout handler) and its submitter waits.
//!
//! A ring that cannot be used (a ring area refused, a head outside the table, the used ring
//! unmapped for good) breaks the queue the same way. A broken queue stays so until the
//! front-end restarts it: it drops its miss and sleeps without a timeout. A request taken off
//! the avail ring but never completed is handed back by GET_VRING_BASE, one index earlier, so
//! that it is served again after a restart rather than lost; block requests may be repeated.
//!
//!
//! Where each part lives:
//! - this file: what a worker is given ([`QueueConfig`]), the connection thread's handle
//!   ([`Worker`]: start, stop), and the worker's own state ([`Runner`] for what stays fixed,
//!   `QueueState` for what serving changes);
//! - `wake`: the flag-and-eventfd wake protocol ([`Waker`]);
//! - `run`: the thread's wait loop (sleep, stop, enable, broken queues);
//! - `poll`: busy-polling for a miss's answer and, adaptive, for the next chain;
//! - `serve`: serving the ring (pop, serve, complete, fail, notify);
//! - `miss`: the miss lifecycle (register, park, resume, time out);
//! - `prefetch`: the MISSes sent ahead for the chains after the one that missed.

mod miss;
mod poll;
mod prefetch;
mod run;
mod serve;
mod wake;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use iotlb::Access;
use parking_lot::Mutex;
use virtq::{Chain, Queue};

use crate::device::Device;
use crate::quiesce::WorkerEpoch;
use crate::ratelimit::{AccessFailLimit, Limit};
use crate::shared::Shared;

pub(crate) use wake::Waker;

/// What a worker needs to start.
pub(crate) struct QueueConfig {
    pub index: u16,
    pub size: u16,
    /// Ring addresses in the translator's space (IOVAs with the IOMMU, guest-physical
    /// otherwise).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub base: u16,
    pub event_idx: bool,
    pub iommu: bool,
    /// The kick eventfd (shared with the session, which restarts the queue with it).
    pub kick: Arc<OwnedFd>,
    pub call: Arc<Mutex<Option<OwnedFd>>>,
    /// The vring error eventfd (SET_VRING_ERR), signalled when the queue breaks.
    pub err: Arc<Mutex<Option<OwnedFd>>>,
    pub enabled: Arc<AtomicBool>,
}

/// The connection thread's handle on a running worker.
pub(crate) struct Worker {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Waker>,
    epoch: Arc<WorkerEpoch>,
    /// Where the queue resumes (next avail index, less an unfinished request), kept current
    /// by the worker so that it is known even if the thread died.
    base: Arc<AtomicU16>,
}

impl Worker {
    /// Start the worker of `cfg.index`.
    pub(crate) fn start<D: Device>(
        shared: Arc<Shared<D>>,
        cfg: QueueConfig,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(Waker::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let base = Arc::new(AtomicU16::new(cfg.base));
        let epoch = shared.epochs.register();
        let epochs = shared.clone();
        let state = Runner {
            shared,
            cfg,
            wake: wake.clone(),
            stop: stop.clone(),
            epoch: epoch.clone(),
            base: base.clone(),
        };
        let index = state.cfg.index;
        let name = format!("vq{index}");
        let thread = match std::thread::Builder::new()
            .name(name)
            .spawn(move || state.run())
        {
            Ok(t) => t,
            Err(e) => {
                epochs.epochs.unregister(&epoch);
                return Err(e);
            }
        };
        epochs.wakers.register(index, &wake);
        Ok(Worker {
            thread: Some(thread),
            stop,
            wake,
            epoch,
            base,
        })
    }

    /// Stop it and return where the queue resumes (for GET_VRING_BASE).
    pub(crate) fn stop<D: Device>(mut self, shared: &Shared<D>) -> u16 {
        shared.wakers.unregister(&self.wake);
        self.stop.store(true, Ordering::SeqCst);
        self.wake.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("vhost-user: a queue worker panicked; its queue stopped");
            }
        }
        shared.epochs.unregister(&self.epoch);
        self.base.load(Ordering::SeqCst)
    }
}

struct Runner<D: Device> {
    shared: Arc<Shared<D>>,
    cfg: QueueConfig,
    wake: Arc<Waker>,
    stop: Arc<AtomicBool>,
    epoch: Arc<WorkerEpoch>,
    base: Arc<AtomicU16>,
}

/// Why a drain stopped before the ring was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// It did not: the ring was empty (or it yielded).
    No,
    /// The handler was not [`crate::QueueHandler::ready`]: the wait polls the handler for the
    /// chain window (another queue's [`crate::QueueWakers::wake`] makes it ready), then
    /// sleeps.
    Device,
    /// The handler gave back a request the ring has too few chains for: the wait sleeps
    /// until the driver kicks (more chains); the handler is ready, so polling it would spin.
    Starved,
}

/// What a worker works with.
struct QueueState<H> {
    queue: Queue,
    handler: H,
    chain: Chain,
    /// The chains after `chain` a request spanning several takes ([`crate::MoreChains`]),
    /// one at a time, and the ones it took.
    extra: Chain,
    taken: Vec<(u16, u32)>,
    /// Why the last drain stopped with chains possibly left on the ring; the wait then does
    /// not poll the ring (see [`Idle`]).
    device_idle: Idle,
    /// A request taken off the avail ring and not completed yet.
    open: Option<u16>,
    /// Completions since the driver was last notified.
    unnotified: u32,
    /// Since when completions are held back while the queue is parked (see `drain`).
    held_since: Option<Instant>,
    /// The MISS this queue sent and waits for: when, and the address that missed.
    rtt: Option<(Instant, u64, Access)>,
    /// Warnings the guest causes (malformed chains, denied accesses), rate-limited.
    warnings: Limit,
    /// ACCESS_FAILs sent, rate-limited per page and in all.
    access_fails: AccessFailLimit,
    /// Busy-poll windows and whether kicks are off.
    poll: poll::Polling,
}

/// IOTLB pages (MISSes are per page).
const PAGE: u64 = iotlb::MISS_PAGE_SIZE;
