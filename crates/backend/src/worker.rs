//! Queue workers: one thread per started queue, never the connection thread.
//!
//! A worker sleeps on its kick eventfd and its wake eventfd (written by the connection thread
//! when an UPDATE covers the address it parked on, or to stop it), with a timeout while it is
//! parked on a miss; for the busy-poll window before that it polls a flag instead, which a
//! waker sets without a system call ([`Waker`]). Awake, it drains its queue: pop a chain
//! (translating all of it), let the device serve it, complete it, notify the driver (every 32
//! completions under load, and when the queue runs dry; a queue parked on a miss holds the
//! interrupt while it busy-polls for the answer and sends it before it blocks).
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
//! Why this file is over the size the project aims for: it still holds six concepts (the
//! wake protocol, the thread, the wait loop, serving, the miss lifecycle, the look-ahead);
//! splitting it into a `worker/` directory, with one home for sending MISS, is issue 16,
//! which lands after the control-path issue so that their tests guard the move.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iotlb::{Access, MissOutcome};
use parking_lot::Mutex;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use virtq::{Chain, Fault, GpaTranslator, IotlbTranslator, PopError, Queue, Translator};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use wire::vhost_user::BackendRequest;
use wire::IotlbMsg;

use crate::device::{Device, QueueHandler, Served, Unreported};
use crate::quiesce::{Section, WorkerEpoch};
use crate::ratelimit::{AccessFailLimit, Limit, WARNINGS_PER_WINDOW};
use crate::session::Shared;
use crate::stats::EngineCounters;

/// What a worker needs to start.
pub(crate) struct WorkerConfig {
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

/// How a worker is woken: an eventfd it sleeps on, and a flag it looks at while it
/// busy-polls, so that a wake-up during the busy-poll window costs the waker no system call
/// and the worker only a load.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
    /// The worker is busy-polling: it will see `woken` without the eventfd.
    polling: AtomicBool,
    woken: AtomicBool,
}

impl Waker {
    fn new() -> std::io::Result<Self> {
        Ok(Waker {
            fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
        })
    }

    /// Wake the worker. The flag is set before `polling` is read and the worker clears
    /// `polling` before it reads the flag a last time (both sequentially consistent), so
    /// either we see it is not polling and write the eventfd, or it sees the flag.
    pub(crate) fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            signal(&self.fd);
        }
    }

    /// Take a wake-up given through the flag.
    fn take(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }

    /// From now on wakers set the flag only; look at it with [`Waker::take`].
    fn start_polling(&self) {
        self.polling.store(true, Ordering::SeqCst);
    }

    /// Wakers write the eventfd again. True if a wake-up came through the flag meanwhile (a
    /// waker that saw us polling did not write the eventfd: its flag is all there is).
    fn stop_polling(&self) -> bool {
        self.polling.store(false, Ordering::SeqCst);
        self.take()
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What we sent on a socket that the peer has not read yet (`SIOCOUTQ`; for a Unix stream
/// socket the size of the buffers holding it, not the byte count: zero exactly when the
/// peer has read everything); `None` if the socket cannot tell.
fn unread_by_peer(sock: BorrowedFd<'_>) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket writes one int through the pointer, which
    // points to `n`, live and writable for the call; the fd is borrowed, so it is open.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0).then(|| usize::try_from(n).ok()).flatten()
}

fn signal(fd: &OwnedFd) {
    // An eventfd counter; a failure (overflow) still leaves it readable, which is all we need.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn drain(fd: &impl AsFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

impl Worker {
    /// Start the worker of `cfg.index`.
    pub(crate) fn start<D: Device>(
        shared: Arc<Shared<D>>,
        cfg: WorkerConfig,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(Waker::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let base = Arc::new(AtomicU16::new(cfg.base));
        let epoch = shared.epochs.register();
        let epochs = shared.clone();
        let state = WorkerState {
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
        if let Some(slot) = epochs.wakers.write().get_mut(usize::from(index)) {
            *slot = Some(wake.clone());
        }
        Ok(Worker {
            thread: Some(thread),
            stop,
            wake,
            epoch,
            base,
        })
    }

    /// Wake it (an UPDATE covered its miss).
    pub(crate) fn wake(&self) {
        self.wake.wake();
    }

    /// Stop it and return where the queue resumes (for GET_VRING_BASE).
    pub(crate) fn stop<D: Device>(mut self, shared: &Shared<D>) -> u16 {
        for slot in shared.wakers.write().iter_mut() {
            if slot.as_ref().is_some_and(|w| Arc::ptr_eq(w, &self.wake)) {
                *slot = None;
            }
        }
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

/// A parked worker: the miss it waits for, and what to finish once it is answered.
#[derive(Debug, Clone, Copy)]
struct Parked {
    iova: u64,
    access: Access,
    since: Instant,
    /// When this queue sent the MISS itself (for the round-trip histogram).
    sent: Option<Instant>,
    /// A request already taken off the avail ring that is not complete yet.
    unfinished: Option<Unfinished>,
}

/// A request consumed from the avail ring whose completion waits for a translation.
#[derive(Debug, Clone, Copy)]
enum Unfinished {
    /// Served; its completion missed (the used ring was invalidated in the middle of it).
    Complete { head: u16, len: u32 },
    /// Its outcome is to be written (`outcome`); its status byte (at this IOVA, or not found
    /// yet) is not translated yet.
    Report {
        head: u16,
        status: Option<u64>,
        outcome: Outcome,
    },
}

/// Whose outcome a request's status byte gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The engine could not serve it: the device's error status ([`QueueHandler::fail`]).
    Failed,
    /// The device did its deferred work ([`QueueHandler::report_deferred`]).
    Deferred,
}

/// What one attempt at writing a failed request's status came to.
enum FailStep {
    /// Written; the used length.
    Written(u32),
    /// A translation on the way is missing (the status byte's, with its IOVA, or an indirect
    /// table's while looking for it).
    Missing {
        iova: u64,
        access: Access,
        status: Option<u64>,
    },
    /// It cannot be written at all.
    Unwritable(&'static str),
}

struct WorkerState<D: Device> {
    shared: Arc<Shared<D>>,
    cfg: WorkerConfig,
    wake: Arc<Waker>,
    stop: Arc<AtomicBool>,
    epoch: Arc<WorkerEpoch>,
    base: Arc<AtomicU16>,
}

/// How a drain ended.
enum Drained {
    Empty,
    Parked(Parked),
    Broken,
    /// It served its budget of requests, or saw a stop or a disable between two requests:
    /// the queue may not be empty; the wait loop looks at stop and enable, then drains again
    /// without waiting for a kick.
    Yielded,
}

/// What one section of [`WorkerState::drain`] did.
enum Popped {
    /// Served `head`; `done` is how completing it went.
    Served {
        head: u16,
        len: u32,
        done: Result<(), PopError>,
        /// When it was popped: the queue got past any miss it waited for (the round trip
        /// ends there, not after the device served the request).
        popped: Instant,
    },
    /// Taken off the ring, but the device could not write its outcome: never completed.
    Unreported { head: u16, popped: Instant },
    /// Checked by the device, whose work runs outside the section
    /// ([`Served::Deferred`]).
    Deferred { head: u16, popped: Instant },
    /// A chain came in while notifications were being re-enabled.
    More,
    /// Nothing to do.
    Empty,
}

/// Available chains looked at for misses to send ahead.
const PREFETCH_CHAINS: u16 = 32;
/// Most MISSes sent ahead at once.
const PREFETCH_MISSES: usize = 96;
/// Of the IOTLB's entries, the share one queue's MISSes sent ahead may fill: their answers
/// must not evict one another (or the page the queue waits for) before the queue gets there.
/// The IOTLB protects its newest `min(capacity / 2, 32)` entries.
const PREFETCH_SHARE: usize = 4;

/// MISSes one of `queues` queues may send ahead with an IOTLB of `capacity` entries.
fn prefetch_budget(capacity: usize, queues: u16) -> usize {
    (capacity / (PREFETCH_SHARE * usize::from(queues.max(1)))).clamp(1, PREFETCH_MISSES)
}
/// IOTLB pages (MISSes are per 4 KiB page).
const PAGE: u64 = 4096;

/// Busy-poll looks at the wake-up flag per look at the kick and wake-up eventfds.
const KICK_LOOK_EVERY: u32 = 8;

/// Completions between two driver notifications under sustained load.
const NOTIFY_EVERY: u32 = 32;

/// Requests one drain serves before it returns to the wait loop (which looks at stop and
/// enable and the eventfds), whatever the guest keeps posting: Linux's vhost bounds a round
/// the same way (`vhost_exceeds_weight`). Stop and enable are also looked at between any two
/// requests, so this bounds only how long kicks and wake-ups wait to be consumed.
const DRAIN_BUDGET_REQUESTS: u32 = 64;
/// Bytes (readable and writable buffers) one drain serves before it returns: a few large
/// requests are a round too.
const DRAIN_BUDGET_BYTES: u64 = 16 << 20;

impl<D: Device> WorkerState<D> {
    fn run(self) {
        let mut queue = Queue::new(self.shared.dev.max_queue_size());
        let configured = queue
            .set_size(self.cfg.size)
            .and_then(|()| queue.set_addresses(self.cfg.desc, self.cfg.avail, self.cfg.used));
        queue.set_next_avail(self.cfg.base);
        queue.set_event_idx(self.cfg.event_idx);
        // The device's limits, and no other: a walk keeps what it translated across misses,
        // so the IOTLB's size limits nothing.
        queue.set_limits(self.shared.dev.chain_limits());
        if let Err(e) = configured {
            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: queue not started");
            self.wait_for_stop();
            return;
        }
        let mut tr: Box<dyn Translator> = if self.cfg.iommu {
            Box::new(IotlbTranslator::new(self.shared.iotlb.handle()))
        } else {
            Box::new(GpaTranslator)
        };
        let mut w = Work {
            queue,
            handler: self.shared.dev.handler(self.cfg.index),
            chain: Chain::new(),
            open: None,
            unnotified: 0,
            held_since: None,
            rtt: None,
            warnings: Limit::new(WARNINGS_PER_WINDOW),
            access_fails: AccessFailLimit::new(),
        };
        let mut parked: Option<Parked> = None;
        let mut broken = false;
        // The last drain yielded with work possibly left: look at the eventfds without
        // blocking, then drain again.
        let mut more = false;
        tracing::debug!(
            queue = self.cfg.index,
            iommu = self.cfg.iommu,
            "vhost-user: worker started"
        );

        loop {
            let enabled = self.cfg.enabled.load(Ordering::SeqCst);
            // A broken or disabled queue waits for nothing but a kick, a wake-up or a stop.
            let timeout = parked.filter(|_| enabled && !broken).map(|p| {
                (p.since + self.shared.miss_timeout).saturating_duration_since(Instant::now())
            });
            // Completions a parked drain left unannounced (see `drain`) are announced before
            // blocking; a wait answered within the busy-poll window goes on without either.
            if std::mem::take(&mut more) && parked.is_none() {
                // Consume the kicks that came meanwhile (their chains are what we drain).
                self.sleep(Some(Duration::ZERO));
            } else if !(timeout.is_some() && self.spin_for_wake()) {
                if w.unnotified > 0 {
                    self.notify(&mut w, &mut *tr);
                }
                self.sleep(timeout);
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if broken || !self.cfg.enabled.load(Ordering::SeqCst) {
                continue;
            }
            let prev = parked.take();
            if let Some(p) = prev {
                match self.resume(&mut w, &mut *tr, p) {
                    Ok(Some(again)) => {
                        parked = Some(again);
                        self.publish_base(&w);
                        continue;
                    }
                    Ok(None) => {}
                    Err(()) => {
                        broken = self.break_queue();
                        self.publish_base(&w);
                        continue;
                    }
                }
            }
            match self.drain(&mut w, &mut *tr) {
                Drained::Empty => {}
                Drained::Parked(p) => {
                    // The same miss again (a kick while parked re-walks the chain and misses
                    // where it did): keep its start time, or kicks would postpone the
                    // timeout forever. A miss whose time is up was just dealt with by
                    // `resume`; its retry starts a new wait.
                    parked = Some(match prev {
                        Some(old)
                            if old.iova == p.iova
                                && old.access == p.access
                                && old.unfinished.is_none()
                                && p.unfinished.is_none()
                                && old.since.elapsed() < self.shared.miss_timeout =>
                        {
                            Parked {
                                since: old.since,
                                sent: old.sent,
                                ..p
                            }
                        }
                        _ => p,
                    });
                }
                Drained::Broken => broken = self.break_queue(),
                Drained::Yielded => more = true,
            }
            self.publish_base(&w);
        }
        // Stopping (possibly straight out of a busy-poll): completions held while parked are
        // announced now, or a driver waiting for them would wait for nothing.
        if w.unnotified > 0 {
            self.notify(&mut w, &mut *tr);
        }
        self.publish_base(&w);
    }

    /// Where the queue resumes: a request off the avail ring but not completed is handed back.
    fn publish_base(&self, w: &Work<D::Handler>) {
        let next = w.queue.next_avail();
        let base = if w.open.is_some() {
            next.wrapping_sub(1)
        } else {
            next
        };
        self.base.store(base, Ordering::SeqCst);
    }

    /// The queue cannot go on (the reason was logged where it was found): drop our misses,
    /// count it and signal the vring error eventfd. Returns true (the new `broken`).
    fn break_queue(&self) -> bool {
        self.shared.iotlb.cancel_waiter(&self.cfg.index);
        EngineCounters::add(&self.shared.stats.broken_queues, 1);
        let signalled = match self.cfg.err.lock().as_ref() {
            Some(fd) => {
                signal(fd);
                true
            }
            None => false,
        };
        tracing::warn!(
            queue = self.cfg.index,
            signalled,
            "vhost-user: queue stopped until the front-end restarts it"
        );
        true
    }

    /// Sleep until a kick, a wake-up, or `timeout`.
    fn sleep(&self, timeout: Option<Duration>) {
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        if let Err(e) = self.poll_eventfds(ts.as_ref()) {
            if e != rustix::io::Errno::INTR {
                tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Every wake-up that set the flag while we were not polling also wrote the eventfd:
        // the flag is stale (an eventfd write still to come is seen by the next poll).
        self.wake.take();
    }

    /// Wait up to `ts` (`None`: for ever) for a kick or an eventfd wake-up, and consume what
    /// came. True if either did.
    fn poll_eventfds(&self, ts: Option<&Timespec>) -> rustix::io::Result<bool> {
        let mut fds = [
            PollFd::new(&*self.cfg.kick, PollFlags::IN),
            PollFd::new(&*self.wake, PollFlags::IN),
        ];
        poll(&mut fds, ts)?;
        let kicked = fds[0].revents().contains(PollFlags::IN);
        let woken = fds[1].revents().contains(PollFlags::IN);
        if kicked {
            drain(&*self.cfg.kick);
        }
        if woken {
            drain(&*self.wake);
        }
        Ok(kicked || woken)
    }

    /// Parked on a miss: poll for the wake-up (or a kick) for up to the busy-poll window
    /// before [`Self::sleep`] blocks, so that an answer coming within it costs no thread
    /// wake-up. True when the wait ended with a wake-up or a kick; false when the window ran
    /// out (or there is none).
    fn spin_for_wake(&self) -> bool {
        let window = self.shared.busy_poll;
        if window.is_zero() {
            return false;
        }
        let start = Instant::now();
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // A flag set while we were not polling came with an eventfd write, which look 0
        // reads: taking both would walk the chain twice for one wake-up.
        self.wake.take();
        self.wake.start_polling();
        let mut looks = 0u32;
        let answered = loop {
            if self.wake.take() {
                break true;
            }
            // The eventfds (a kick, or a wake-up from before we polled) every few looks.
            if looks % KICK_LOOK_EVERY == 0 {
                match self.poll_eventfds(Some(&zero)) {
                    Ok(true) => break true,
                    Err(e) if e != rustix::io::Errno::INTR => break false,
                    _ => {}
                }
            }
            looks = looks.wrapping_add(1);
            if start.elapsed() >= window || self.stop.load(Ordering::Relaxed) {
                break false;
            }
            std::thread::yield_now();
        };
        // Not short-circuited: polling must stop either way.
        self.wake.stop_polling() | answered
    }

    fn wait_for_stop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.sleep(None);
        }
    }

    /// Run `f` inside the worker's epoch, with the memory table current at its start. The
    /// epoch is entered before the table is read (so a table swap waits for us or is seen by
    /// us) and left when `f` returns or unwinds.
    fn section<R>(&self, f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
        let _section = Section::enter(&self.epoch, || self.shared.iotlb.generation());
        let mem = self.shared.mem.read().clone();
        f(mem.memory())
    }

    /// Serve chains until the queue is empty, a miss parks it, it breaks, or its budget is
    /// spent (or a stop or a disable came: [`Drained::Yielded`]).
    fn drain(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator) -> Drained {
        let (mut served, mut bytes) = (0u32, 0u64);
        let outcome = loop {
            // Between two requests: a stop or a disable is seen here, never after the ring
            // empties (a guest may keep it full for ever).
            if served > 0
                && (served >= DRAIN_BUDGET_REQUESTS
                    || bytes >= DRAIN_BUDGET_BYTES
                    || self.stop.load(Ordering::SeqCst)
                    || !self.cfg.enabled.load(Ordering::SeqCst))
            {
                break Drained::Yielded;
            }
            let popped = self.section(|gm| match w.queue.pop(tr, gm, &mut w.chain) {
                Ok(true) => {
                    let head = w.chain.head();
                    let popped = Instant::now();
                    w.open = Some(head);
                    let bytes =
                        u64::from(w.chain.readable_len()) + u64::from(w.chain.writable_len());
                    EngineCounters::max(&self.shared.stats.largest_request, bytes);
                    match w.handler.serve(&w.chain, gm) {
                        Ok(Served::Deferred) => Ok(Popped::Deferred { head, popped }),
                        Ok(Served::Done(len)) => {
                            let done = w.queue.complete(tr, gm, head, len);
                            Ok(Popped::Served {
                                head,
                                len,
                                done,
                                popped,
                            })
                        }
                        Err(Unreported) => Ok(Popped::Unreported { head, popped }),
                    }
                }
                // Ask for a kick at the next avail index (with EVENT_IDX the driver kicks
                // only where avail_event says), then look once more: a chain that came in
                // between would otherwise wait for a kick that is not coming.
                Ok(false) => w.queue.set_notification(tr, gm, true).map(|more| {
                    if more {
                        Popped::More
                    } else {
                        Popped::Empty
                    }
                }),
                Err(e) => Err(e),
            });
            // A walk that got further than the address it was parked on: that miss is over.
            match &popped {
                Err(PopError::Miss { iova, access }) => {
                    self.progress(w, Some((*iova, *access)), Instant::now())
                }
                Ok(
                    Popped::Served { popped, .. }
                    | Popped::Unreported { popped, .. }
                    | Popped::Deferred { popped, .. },
                ) => self.progress(w, None, *popped),
                _ => self.progress(w, None, Instant::now()),
            }
            match popped {
                Ok(Popped::Served {
                    head, len, done, ..
                }) => {
                    EngineCounters::add(&self.shared.stats.requests, 1);
                    served += 1;
                    bytes += u64::from(w.chain.readable_len()) + u64::from(w.chain.writable_len());
                    match done {
                        Ok(()) => self.completed(w, tr),
                        // The used ring was invalidated while the request was served (pop
                        // translated it first): park until it is mapped again, then
                        // complete. The request is not served twice.
                        Err(PopError::Miss { iova, access }) => {
                            match self.park(iova, access, Unfinished::Complete { head, len }) {
                                Some(p) => break Drained::Parked(p),
                                None => match self.complete(w, tr, head, len) {
                                    Ok(None) => {}
                                    Ok(Some(p)) => break Drained::Parked(p),
                                    Err(()) => break Drained::Broken,
                                },
                            }
                        }
                        Err(e) => {
                            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: complete failed");
                            break Drained::Broken;
                        }
                    }
                }
                Ok(Popped::Deferred { head, .. }) => {
                    EngineCounters::add(&self.shared.stats.requests, 1);
                    served += 1;
                    // Outside any section: an invalidation or a memory table swap meanwhile
                    // does not wait for it (the status byte is translated again after).
                    w.handler.run_deferred();
                    match self.report(w, tr, head, Outcome::Deferred) {
                        Ok(None) => {}
                        Ok(Some(p)) => break Drained::Parked(p),
                        Err(()) => break Drained::Broken,
                    }
                }
                Ok(Popped::Unreported { head, .. }) => {
                    EngineCounters::add(&self.shared.stats.requests, 1);
                    tracing::warn!(
                        queue = self.cfg.index,
                        head,
                        "vhost-user: the device could not write a request's status; not completing it"
                    );
                    break Drained::Broken;
                }
                Ok(Popped::More) => continue,
                Ok(Popped::Empty) => break Drained::Empty,
                Err(PopError::Miss { iova, access }) => match self.miss(iova, access) {
                    Some(p) => {
                        if let Some(sent) = p.sent {
                            w.rtt = Some((sent, iova, access));
                            // A new miss: ask at once for every other page the next chains
                            // will miss on, rather than one round trip each.
                            self.prefetch(w, tr, iova);
                        }
                        break Drained::Parked(p);
                    }
                    None => continue, // mapped meanwhile: retry
                },
                Err(PopError::Denied { head, iova, access }) => {
                    served += 1;
                    EngineCounters::add(&self.shared.stats.access_failures, 1);
                    if let Some(suppressed) = self.may_warn(w) {
                        tracing::info!(
                            queue = self.cfg.index,
                            iova = %format_args!("{iova:#x}"),
                            %access,
                            suppressed,
                            "vhost-user: access denied by the IOMMU; request failed"
                        );
                    }
                    // A guest may loop on a denied access; the front-end hears of each page
                    // and direction once per window, and of a bounded number per queue.
                    let page = iova & !(PAGE - 1);
                    if w.access_fails.allow(page, access, Instant::now()) {
                        EngineCounters::add(&self.shared.stats.access_fails_sent, 1);
                        self.send(IotlbMsg::AccessFail {
                            iova,
                            perm: access.as_perm(),
                        });
                    } else {
                        EngineCounters::add(&self.shared.stats.access_fails_suppressed, 1);
                    }
                    w.open = Some(head);
                    match self.fail(w, tr, head) {
                        Ok(None) => {}
                        Ok(Some(p)) => break Drained::Parked(p),
                        Err(()) => break Drained::Broken,
                    }
                }
                Err(PopError::Invalid { head, reason }) => {
                    served += 1;
                    EngineCounters::add(&self.shared.stats.invalid_chains, 1);
                    if let Some(suppressed) = self.may_warn(w) {
                        tracing::warn!(
                            queue = self.cfg.index,
                            head,
                            %reason,
                            suppressed,
                            "vhost-user: chain refused; request failed"
                        );
                    }
                    w.open = Some(head);
                    match self.fail(w, tr, head) {
                        Ok(None) => {}
                        Ok(Some(p)) => break Drained::Parked(p),
                        Err(()) => break Drained::Broken,
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: queue broken until reset");
                    break Drained::Broken;
                }
            }
        };
        // A drain that parked on a miss does not interrupt the driver for the few completions
        // before it: the answer usually comes within the busy-poll window, and the queue goes
        // on then; an interrupt now would wake the driver's thread to compete for the CPU
        // with the threads the answer needs. They are held for one busy-poll window at most
        // (counted from the first of them, across misses and kicks), announced before the
        // worker blocks or stops, and at NOTIFY_EVERY as always.
        if w.unnotified > 0 {
            let held_too_long = w
                .held_since
                .is_some_and(|t| t.elapsed() >= self.shared.busy_poll);
            if matches!(outcome, Drained::Parked(_)) && !held_too_long {
                w.held_since.get_or_insert_with(Instant::now);
            } else {
                self.notify(w, tr);
            }
        }
        outcome
    }

    /// The queue got past the miss `w.rtt` waited for at `at` (unless it misses on that very
    /// address again, `missing`): record the round trip.
    fn progress(&self, w: &mut Work<D::Handler>, missing: Option<(u64, Access)>, at: Instant) {
        if let Some((sent, iova, access)) = w.rtt {
            if missing != Some((iova, access)) {
                self.shared
                    .stats
                    .miss_rtt
                    .record(at.saturating_duration_since(sent));
                w.rtt = None;
            }
        }
    }

    /// Whether a warning the guest caused (and can cause in a loop) may be logged now: `Some`
    /// with the number held back since the last one logged; `None` (counted) if not.
    fn may_warn(&self, w: &mut Work<D::Handler>) -> Option<u64> {
        match w.warnings.allow(Instant::now()) {
            Ok(held) => Some(held),
            Err(()) => {
                EngineCounters::add(&self.shared.stats.warnings_suppressed, 1);
                None
            }
        }
    }

    /// A request was completed: notify the driver now and then under sustained load, not
    /// only when the queue runs dry.
    fn completed(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator) {
        w.open = None;
        w.unnotified += 1;
        if w.unnotified >= NOTIFY_EVERY {
            self.notify(w, tr);
        }
    }

    /// Register a miss; send the MISS if we are the first. `None` if an UPDATE covered it in
    /// the meantime (retry at once).
    fn miss(&self, iova: u64, access: Access) -> Option<Parked> {
        let now = Instant::now();
        let parked = Parked {
            iova,
            access,
            since: now,
            sent: None,
            unfinished: None,
        };
        match self
            .shared
            .iotlb
            .register_miss(iova, access, self.cfg.index, now)
        {
            MissOutcome::Mapped => None,
            MissOutcome::Coalesced => Some(parked),
            MissOutcome::SendMiss { iova, access } => {
                tracing::trace!(
                    queue = self.cfg.index,
                    iova = %format_args!("{iova:#x}"),
                    %access,
                    "vhost-user: MISS"
                );
                self.send(IotlbMsg::Miss {
                    iova,
                    perm: access.as_perm(),
                });
                EngineCounters::add(&self.shared.stats.misses_sent, 1);
                Some(Parked {
                    sent: Some(now),
                    ..parked
                })
            }
        }
    }

    /// Find the pages the next [`PREFETCH_CHAINS`] available chains (the one that just
    /// missed first) will miss on, without consuming anything, and send their MISSes now:
    /// the front-end answers a burst in one round trip where walking chain by chain would
    /// cost one round trip per missing page. At most [`prefetch_budget`] pages; the page of
    /// `first` (already sent) is skipped. The pages are registered *ahead* (no waiter: their
    /// UPDATEs wake nobody, the queue still waits for `first` only), so when the queue reaches
    /// one it joins the outstanding MISS instead of sending a second; one that is never
    /// answered times out like any other once the queue reaches it.
    fn prefetch(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator, first: u64) {
        if !self.cfg.iommu {
            return;
        }
        let page = |a: u64| a & !(PAGE - 1);
        let budget = prefetch_budget(self.shared.iotlb_capacity, self.shared.dev.queues());
        let mut wanted: Vec<(u64, Access)> = Vec::new();
        self.section(|gm| {
            let mut seg = Vec::new();
            let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
            // What the walk of the chain that missed already translated and keeps: never
            // asked for again (its entries may be evicted by now; asking would evict the
            // pages still ahead).
            let walked: Vec<iotlb::IovaRange> = w.queue.walked().to_vec();
            for ahead in 0..PREFETCH_CHAINS {
                let Ok(Some(head)) = w.queue.peek_head(tr, gm, ahead) else {
                    break;
                };
                bufs.clear();
                let visited = w.queue.visit_buffers(tr, gm, head, |addr, len, write| {
                    bufs.push((addr, len, write));
                    bufs.len() < 64
                });
                for &(addr, len, write) in &bufs {
                    let access = if write { Access::Write } else { Access::Read };
                    let Some(last) = u64::from(len)
                        .checked_sub(1)
                        .and_then(|l| addr.checked_add(l))
                    else {
                        continue;
                    };
                    let mut cur = addr;
                    // (Only the chain being walked kept anything.)
                    let walked: &[iotlb::IovaRange] = if ahead == 0 { &walked } else { &[] };
                    while wanted.len() < budget {
                        if let Some(r) = walked.iter().find(|r| r.contains(cur)) {
                            match r.last().checked_add(1) {
                                Some(next) if next <= last => {
                                    cur = next;
                                    continue;
                                }
                                _ => break,
                            }
                        }
                        seg.clear();
                        let Err(Fault::Miss { iova, access }) =
                            tr.translate(cur, last - cur + 1, access, &mut seg)
                        else {
                            break;
                        };
                        if walked.iter().any(|r| r.contains(iova)) {
                            cur = iova;
                            continue;
                        }
                        if page(iova) != page(first)
                            && !wanted
                                .iter()
                                .any(|&(i, a)| page(i) == page(iova) && a == access)
                        {
                            wanted.push((iova, access));
                        }
                        match (iova | (PAGE - 1)).checked_add(1) {
                            Some(next) if next <= last => cur = next,
                            _ => break,
                        }
                    }
                }
                if visited.is_err() || wanted.len() >= budget {
                    break;
                }
            }
        });
        // The front-end has not read our MISS yet, after all that scanning (a socket
        // hand-off takes a few microseconds): its thread is likely waiting for this CPU. Let
        // it have it now, not after registering and sending the rest. On the 2-core bench
        // this takes the round trip p50 from about 30 us to under 20 us in the runs where
        // the scheduler put the two threads together, for about 5 % of lazy and thrash IOPS.
        let chan = self.shared.backend_chan.read().clone();
        if chan.is_some_and(|c| unread_by_peer(c.as_fd()).is_some_and(|n| n > 0)) {
            std::thread::yield_now();
        }
        let now = Instant::now();
        let found = wanted.len();
        self.shared.iotlb.register_ahead(&mut wanted, now);
        tracing::trace!(
            queue = self.cfg.index,
            found,
            new = wanted.len(),
            "vhost-user: misses ahead"
        );
        let msgs: Vec<BackendRequest> = wanted
            .iter()
            .map(|&(iova, access)| {
                BackendRequest::IotlbMsg(IotlbMsg::Miss {
                    iova,
                    perm: access.as_perm(),
                })
            })
            .collect();
        if msgs.is_empty() {
            return;
        }
        // One write for all of them, never blocking. A batch that did not go out is
        // forgotten, so the queue sends each MISS itself when it reaches the page.
        let chan = self.shared.backend_chan.read().clone();
        let sent = match chan {
            Some(chan) => match chan.try_send_backend_requests(&msgs) {
                Ok(sent) => {
                    if !sent {
                        tracing::debug!(
                            queue = self.cfg.index,
                            "vhost-user: back-end channel full; MISSes not sent ahead"
                        );
                    }
                    sent
                }
                Err(e) => {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: back-end channel send failed");
                    false
                }
            },
            None => false,
        };
        if sent {
            let n = msgs.len() as u64;
            EngineCounters::add(&self.shared.stats.misses_sent, n);
            EngineCounters::add(&self.shared.stats.prefetched, n);
        } else {
            // A queue that joined one of them meanwhile waits for a MISS that never went
            // out: wake it to walk again and send its own.
            let wakers = self.shared.wakers.read();
            for &(iova, access) in &wanted {
                for q in self.shared.iotlb.unregister_ahead(iova, access) {
                    if let Some(Some(w)) = wakers.get(usize::from(q)) {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Register a miss for a request that is already off the avail ring.
    fn park(&self, iova: u64, access: Access, u: Unfinished) -> Option<Parked> {
        self.miss(iova, access).map(|p| Parked {
            unfinished: Some(u),
            ..p
        })
    }

    /// Send on the back-end channel without ever blocking: a worker must not wait for a
    /// front-end that is busy waiting for us. A message that does not fit now is dropped; the
    /// miss timeout sends it again.
    fn send(&self, msg: IotlbMsg) {
        let chan = self.shared.backend_chan.read().clone();
        match chan {
            Some(chan) => match chan.try_send_backend_request(&BackendRequest::IotlbMsg(msg)) {
                Ok(true) => {}
                Ok(false) => tracing::debug!(
                    queue = self.cfg.index,
                    "vhost-user: back-end channel full; the message will be sent again on timeout"
                ),
                Err(e) => {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: back-end channel send failed")
                }
            },
            None => tracing::warn!(
                queue = self.cfg.index,
                "vhost-user: no back-end channel (SET_BACKEND_REQ_FD) to report a miss on"
            ),
        }
    }

    /// Woken, or timed out, while parked: finish what waits, and deal with a miss whose time
    /// is up. `Ok(None)`: go on draining the queue.
    fn resume(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        p: Parked,
    ) -> Result<Option<Parked>, ()> {
        let p = match p.unfinished {
            Some(u) => match self.finish_now(w, tr, u)? {
                None => return Ok(None),
                // Still waiting: on the same miss, the clock keeps running.
                Some(again) if again.iova == p.iova && again.access == p.access => Parked {
                    since: p.since,
                    sent: p.sent,
                    ..again
                },
                Some(again) => again,
            },
            None => p,
        };
        if p.since.elapsed() < self.shared.miss_timeout {
            // Not answered yet (a request in progress waits; a queue re-walks its chain).
            return Ok(p.unfinished.map(|_| p));
        }
        self.on_timeout(w, tr, p)
    }

    /// Try to finish `u` now.
    fn finish_now(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        u: Unfinished,
    ) -> Result<Option<Parked>, ()> {
        match u {
            Unfinished::Complete { head, len } => self.complete(w, tr, head, len),
            Unfinished::Report {
                head,
                status,
                outcome,
            } => loop {
                let step = self.section(|gm| Self::write_outcome(w, tr, gm, head, status, outcome));
                match step {
                    FailStep::Written(len) => {
                        if outcome == Outcome::Failed {
                            EngineCounters::add(&self.shared.stats.failed, 1);
                        }
                        return self.complete(w, tr, head, len);
                    }
                    FailStep::Missing {
                        iova,
                        access,
                        status,
                    } => {
                        let u = Unfinished::Report {
                            head,
                            status,
                            outcome,
                        };
                        if let Some(p) = self.park(iova, access, u) {
                            return Ok(Some(p));
                        }
                    }
                    FailStep::Unwritable(why) => {
                        tracing::warn!(
                            queue = self.cfg.index,
                            head,
                            reason = why,
                            "vhost-user: a request's status cannot be written; not completing it"
                        );
                        return Err(());
                    }
                }
            },
        }
    }

    /// Let the device write `outcome` for the consumed request `head`, inside the caller's
    /// section: the status byte (the last device-writable byte, at `status` if it is known
    /// already) is found, translated for writing and written there and then.
    fn write_outcome(
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        gm: &GuestMemoryMmap,
        head: u16,
        status: Option<u64>,
        outcome: Outcome,
    ) -> FailStep {
        let iova = match status {
            Some(iova) => iova,
            None => match w.queue.last_writable(tr, gm, head) {
                // The buffer's bounds come from the guest: no overflow.
                Ok(Some((addr, len))) => match u64::from(len)
                    .checked_sub(1)
                    .and_then(|last| addr.checked_add(last))
                {
                    Some(iova) => iova,
                    None => return FailStep::Unwritable("status byte past the end of the space"),
                },
                Ok(None) => return FailStep::Unwritable("no device-writable descriptor"),
                // An indirect table not translated yet.
                Err(PopError::Miss { iova, access }) => {
                    return FailStep::Missing {
                        iova,
                        access,
                        status: None,
                    }
                }
                Err(_) => return FailStep::Unwritable("the chain cannot be read"),
            },
        };
        let mut seg = Vec::with_capacity(1);
        match tr.translate(iova, 1, Access::Write, &mut seg) {
            Ok(()) => match seg.first() {
                Some(s) if gm.check_range(GuestAddress(s.addr), 1) => {
                    let written = match outcome {
                        Outcome::Failed => w.handler.fail(s.addr, gm),
                        Outcome::Deferred => w.handler.report_deferred(s.addr, gm),
                    };
                    match written {
                        Ok(len) => FailStep::Written(len),
                        Err(Unreported) => FailStep::Unwritable("the device could not write it"),
                    }
                }
                _ => FailStep::Unwritable("outside guest memory"),
            },
            Err(Fault::Miss { iova: at, access }) => FailStep::Missing {
                iova: at,
                access,
                status: Some(iova),
            },
            Err(Fault::Denied { .. }) => FailStep::Unwritable("mapped without write permission"),
            Err(Fault::BadAddress { .. }) => FailStep::Unwritable("outside guest memory"),
        }
    }

    /// Fail the consumed request `head`: write the device's error status into its status byte
    /// and complete it; if the byte's translation is missing, park until it comes; if the
    /// status cannot be written, `Err` (the queue breaks: the request is never completed).
    fn fail(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
    ) -> Result<Option<Parked>, ()> {
        self.report(w, tr, head, Outcome::Failed)
    }

    /// Write `outcome` into the consumed request `head`'s status byte and complete it (see
    /// [`Self::fail`]).
    fn report(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        outcome: Outcome,
    ) -> Result<Option<Parked>, ()> {
        let u = Unfinished::Report {
            head,
            status: None,
            outcome,
        };
        self.finish_now(w, tr, u)
    }

    /// Complete `head` with `len`. `Ok(Some)` when the used ring missed.
    fn complete(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        len: u32,
    ) -> Result<Option<Parked>, ()> {
        loop {
            let done = self.section(|gm| w.queue.complete(tr, gm, head, len));
            match done {
                Ok(()) => {
                    self.completed(w, tr);
                    return Ok(None);
                }
                Err(PopError::Miss { iova, access }) => {
                    if let Some(p) = self.park(iova, access, Unfinished::Complete { head, len }) {
                        return Ok(Some(p));
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: complete failed");
                    return Err(());
                }
            }
        }
    }

    /// Our miss was not answered in time: send it once more, or give up.
    fn on_timeout(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        p: Parked,
    ) -> Result<Option<Parked>, ()> {
        let now = Instant::now();
        let index = self.cfg.index;
        let mine = self
            .shared
            .iotlb
            .expired_misses(now - self.shared.miss_timeout)
            .into_iter()
            .find(|m| {
                m.waiters.contains(&index) && m.access == p.access && m.page == p.iova & !(PAGE - 1)
            });
        let Some(m) = mine else {
            // Resolved, cancelled, or resent by another queue not long ago: a queue re-walks
            // its chain; a request in progress waits once more, from now.
            return Ok(p.unfinished.map(|_| Parked { since: now, ..p }));
        };
        if m.sends < 2 {
            tracing::info!(
                queue = index,
                iova = %format_args!("{:#x}", m.miss_iova),
                "vhost-user: MISS unanswered, sending it again"
            );
            self.send(IotlbMsg::Miss {
                iova: m.miss_iova,
                perm: m.access.as_perm(),
            });
            EngineCounters::add(&self.shared.stats.misses_sent, 1);
            self.shared.iotlb.miss_resent(m.page, m.access, now);
            return Ok(Some(Parked { since: now, ..p }));
        }
        tracing::warn!(
            queue = index,
            iova = %format_args!("{:#x}", m.miss_iova),
            "vhost-user: MISS never answered; giving up"
        );
        self.shared.iotlb.cancel_waiter(&index);
        EngineCounters::add(&self.shared.stats.timeouts, 1);
        w.rtt = None; // never answered: no round trip to record
        match p.unfinished {
            // The chain at the head of the avail ring: fail it without translating its
            // buffers.
            None => {
                let skipped = self.section(|gm| w.queue.skip(tr, gm));
                match skipped {
                    Ok(Some(head)) => {
                        w.open = Some(head);
                        self.fail(w, tr, head)
                    }
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::warn!(queue = index, error = %e, "vhost-user: queue broken until reset");
                        Err(())
                    }
                }
            }
            // Its status byte never got a translation: it cannot be reported, so it is not
            // completed.
            Some(Unfinished::Report { head, .. }) => {
                tracing::warn!(
                    queue = index,
                    head,
                    "vhost-user: a failed request's status byte was never mapped; not completing it"
                );
                Err(())
            }
            // The used ring itself cannot be written: nothing more can be done on this ring.
            Some(Unfinished::Complete { .. }) => {
                tracing::warn!(
                    queue = index,
                    "vhost-user: used ring unreachable; queue broken until reset"
                );
                Err(())
            }
        }
    }

    fn notify(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator) {
        w.unnotified = 0;
        w.held_since = None;
        let wants = self.section(|gm| w.queue.needs_notification(tr, gm));
        // When the driver's wish cannot be read, notify anyway: a spurious interrupt is
        // harmless, a missing one hangs the driver.
        if matches!(wants, Ok(true) | Err(_)) {
            if let Some(call) = self.cfg.call.lock().as_ref() {
                signal(call);
            }
        }
    }
}

/// What a worker works with.
struct Work<H> {
    queue: Queue,
    handler: H,
    chain: Chain,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the eventfd has a wake-up, waiting up to `ms`; drains it.
    fn eventfd_woken(w: &Waker, ms: i64) -> bool {
        let mut fds = [PollFd::new(w, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        let got = matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0);
        if got {
            drain(w);
        }
        got
    }

    #[test]
    fn a_wake_up_is_never_lost_between_the_flag_and_the_eventfd() {
        // Each round the "worker" polls the flag for a few looks, stops polling, and then
        // blocks on the eventfd, while the waker wakes it once at a random moment: the
        // wake-up must arrive through the flag or the eventfd, every time.
        let w = Arc::new(Waker::new().unwrap());
        let rounds = 20_000u32;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let waker = {
            let (w, barrier) = (w.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_u32;
                for _ in 0..rounds {
                    barrier.wait();
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    for _ in 0..(x % 64) {
                        std::hint::spin_loop();
                    }
                    w.wake();
                    barrier.wait();
                }
            })
        };
        let (mut by_flag, mut by_fd) = (0u32, 0u32);
        for round in 0..rounds {
            barrier.wait();
            w.start_polling();
            let mut got = false;
            for _ in 0..(round % 8) {
                if w.take() {
                    got = true;
                    break;
                }
                std::hint::spin_loop();
            }
            got |= w.stop_polling();
            if got {
                by_flag += 1;
            } else {
                assert!(eventfd_woken(&w, 5000), "round {round}: wake-up lost");
                by_fd += 1;
            }
            barrier.wait();
            // Leave nothing behind for the next round: a stale flag or eventfd count.
            w.take();
            eventfd_woken(&w, 0);
        }
        waker.join().unwrap();
        assert_eq!(by_flag + by_fd, rounds);
    }

    #[test]
    fn unread_by_peer_is_zero_once_the_peer_has_read() {
        use std::io::{Read, Write};
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(unread_by_peer(a.as_fd()), Some(0));
        a.write_all(&[7u8; 60]).unwrap();
        assert!(unread_by_peer(a.as_fd()).is_some_and(|n| n > 0));
        let mut buf = [0u8; 60];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(unread_by_peer(a.as_fd()), Some(0));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(unread_by_peer(f.as_fd()), None, "not a socket");
    }

    #[test]
    fn a_worker_not_polling_is_woken_through_the_eventfd() {
        let w = Waker::new().unwrap();
        w.wake();
        assert!(eventfd_woken(&w, 1000));
        w.start_polling();
        w.wake();
        assert!(!eventfd_woken(&w, 0), "while polling, the flag only");
        assert!(w.stop_polling());
    }
}
