//! Queue workers: one thread per started queue, never the connection thread.
//!
//! A worker sleeps on its kick eventfd and its wake eventfd (written by the connection thread
//! when an UPDATE covers the address it parked on, or to stop it), with a timeout while it is
//! parked on a miss. Awake, it drains its queue: pop a chain (translating all of it), let the
//! device serve it, complete it, notify the driver.
//!
//! On a miss the queue does not consume the chain: the worker registers in the IOTLB's
//! pending table, sends `BACKEND_IOTLB_MSG(MISS)` on the back-end channel if it is the first
//! to miss on that page (never waiting for any reply), and parks. An UPDATE wakes it and it
//! walks the same chain again. A MISS not answered within the timeout is sent once more; if
//! that one is not answered either, the request fails with the device's error status and the
//! queue moves on. A denied access sends ACCESS_FAIL and fails that request.
//!
//! Every unit of work that translates and touches guest memory runs inside the worker's
//! epoch (see [`crate::quiesce`]); parking, sending misses and sleeping happen outside it.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iotlb::{Access, MissOutcome};
use parking_lot::Mutex;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use virtq::{Chain, GpaTranslator, IotlbTranslator, PopError, Queue, Translator};
use wire::vhost_user::BackendRequest;
use wire::IotlbMsg;

use crate::device::{Device, QueueHandler};
use crate::quiesce::WorkerEpoch;
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
    pub kick: OwnedFd,
    pub call: Arc<Mutex<Option<OwnedFd>>>,
    pub enabled: Arc<AtomicBool>,
}

/// The connection thread's handle on a running worker.
pub(crate) struct Worker {
    thread: Option<JoinHandle<u16>>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    epoch: Arc<WorkerEpoch>,
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
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = shared.epochs.register();
        let state = WorkerState::new(shared, cfg, wake.clone(), stop.clone(), epoch.clone());
        let name = format!("vq{}", state.cfg.index);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || state.run())?;
        Ok(Worker {
            thread: Some(thread),
            stop,
            wake,
            epoch,
        })
    }

    /// Wake it (an UPDATE covered its miss).
    pub(crate) fn wake(&self) {
        signal(&self.wake);
    }

    /// Stop it and return the next avail index (for GET_VRING_BASE).
    pub(crate) fn stop<D: Device>(mut self, shared: &Shared<D>) -> u16 {
        self.stop.store(true, Ordering::SeqCst);
        signal(&self.wake);
        let base = self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0);
        shared.epochs.unregister(&self.epoch);
        base
    }
}

/// A parked worker: the miss it waits for, and what to finish once it is answered.
#[derive(Debug, Clone, Copy)]
struct Parked {
    iova: u64,
    access: Access,
    since: Instant,
    /// A request already taken off the avail ring that is not complete yet.
    unfinished: Option<Unfinished>,
}

/// A request consumed from the avail ring whose completion waits for a translation.
#[derive(Debug, Clone, Copy)]
enum Unfinished {
    /// Served; its completion missed (the used ring was invalidated in the middle of it).
    Complete { head: u16, len: u32 },
    /// To be failed; its status byte (at this IOVA) is not translated yet.
    Fail { head: u16, status: u64 },
}

struct WorkerState<D: Device> {
    shared: Arc<Shared<D>>,
    cfg: WorkerConfig,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    epoch: Arc<WorkerEpoch>,
}

/// How a drain ended.
enum Drained {
    Empty,
    Parked(Parked),
    Broken,
}

/// Where a failed request's status byte is.
enum Status {
    /// Translated: this guest-physical address.
    At(u64),
    /// Not translated yet: this IOVA.
    Missing(u64),
    /// Nowhere (no writable buffer, or it cannot be used).
    None,
}

impl<D: Device> WorkerState<D> {
    fn new(
        shared: Arc<Shared<D>>,
        cfg: WorkerConfig,
        wake: Arc<OwnedFd>,
        stop: Arc<AtomicBool>,
        epoch: Arc<WorkerEpoch>,
    ) -> Self {
        WorkerState {
            shared,
            cfg,
            wake,
            stop,
            epoch,
        }
    }

    fn run(self) -> u16 {
        let mut queue = Queue::new(self.shared.dev.max_queue_size());
        let configured = queue
            .set_size(self.cfg.size)
            .and_then(|()| queue.set_addresses(self.cfg.desc, self.cfg.avail, self.cfg.used));
        queue.set_next_avail(self.cfg.base);
        queue.set_event_idx(self.cfg.event_idx);
        // Keep every chain well inside the IOTLB, or it could miss forever.
        queue.set_max_segments((self.shared.iotlb_capacity / 2).clamp(1, 1024));
        if let Err(e) = configured {
            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: queue not started");
            self.wait_for_stop();
            return self.cfg.base;
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
        };
        let mut parked: Option<Parked> = None;
        let mut broken = false;
        tracing::debug!(
            queue = self.cfg.index,
            iommu = self.cfg.iommu,
            "vhost-user: worker started"
        );

        loop {
            let timeout = parked.map(|p| {
                (p.since + self.shared.miss_timeout).saturating_duration_since(Instant::now())
            });
            self.sleep(timeout);
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if broken || !self.cfg.enabled.load(Ordering::SeqCst) {
                continue;
            }
            if let Some(p) = parked {
                let step = match p.unfinished {
                    Some(u) => self.finish(&mut w, &mut *tr, p, u),
                    None if p.since.elapsed() >= self.shared.miss_timeout => {
                        self.on_timeout(&mut w, &mut *tr, p)
                    }
                    None => Ok(None),
                };
                match step {
                    Ok(Some(again)) => {
                        parked = Some(again);
                        continue;
                    }
                    Ok(None) => parked = None,
                    Err(()) => {
                        broken = true;
                        continue;
                    }
                }
            }
            match self.drain(&mut w, &mut *tr) {
                Drained::Empty => parked = None,
                Drained::Parked(p) => {
                    // Keep the original time if it is the same miss again (a kick while
                    // parked must not postpone the timeout).
                    parked = Some(match parked {
                        Some(old) if old.iova == p.iova && old.access == p.access => Parked {
                            since: old.since,
                            ..p
                        },
                        _ => p,
                    });
                }
                Drained::Broken => broken = true,
            }
        }
        w.queue.next_avail()
    }

    /// Sleep until a kick, a wake-up, or `timeout`.
    fn sleep(&self, timeout: Option<Duration>) {
        let mut fds = [
            PollFd::new(&self.cfg.kick, PollFlags::IN),
            PollFd::new(&*self.wake, PollFlags::IN),
        ];
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        if let Err(e) = poll(&mut fds, ts.as_ref()) {
            if e != rustix::io::Errno::INTR {
                tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if fds[0].revents().contains(PollFlags::IN) {
            drain(&self.cfg.kick);
        }
        if fds[1].revents().contains(PollFlags::IN) {
            drain(&*self.wake);
        }
    }

    fn wait_for_stop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.sleep(None);
        }
    }

    fn generation(&self) -> u64 {
        self.shared.iotlb.generation()
    }

    /// Serve chains until the queue is empty, a miss parks it, or it breaks.
    fn drain(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator) -> Drained {
        let mut completed = false;
        let outcome = loop {
            let mem = self.shared.mem.read().clone();
            let gm = mem.memory();
            self.epoch.enter(|| self.generation());
            match w.queue.pop(tr, gm, &mut w.chain) {
                Ok(true) => {
                    let len = w.handler.serve(&w.chain, gm);
                    let head = w.chain.head();
                    let done = w.queue.complete(tr, gm, head, len);
                    self.epoch.exit();
                    EngineCounters::add(&self.shared.stats.requests, 1);
                    match done {
                        Ok(()) => completed = true,
                        // The used ring was invalidated while the request was served (pop
                        // translated it first): park until it is mapped again, then
                        // complete. The request is not served twice.
                        Err(PopError::Miss { iova, access }) => {
                            match self.park(iova, access, Unfinished::Complete { head, len }) {
                                Some(p) => break Drained::Parked(p),
                                None => {
                                    match self.finish_now(w, tr, Unfinished::Complete { head, len })
                                    {
                                        Ok(None) => completed = true,
                                        Ok(Some(p)) => break Drained::Parked(p),
                                        Err(()) => break Drained::Broken,
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: complete failed");
                            break Drained::Broken;
                        }
                    }
                }
                Ok(false) => {
                    // Ask for a kick at the next avail index (with EVENT_IDX the driver kicks
                    // only where avail_event says), then look once more: a chain that came
                    // in between would otherwise wait for a kick that is not coming.
                    let more = w.queue.set_notification(tr, gm, true);
                    self.epoch.exit();
                    match more {
                        Ok(true) => continue,
                        Ok(false) => break Drained::Empty,
                        Err(PopError::Miss { iova, access }) => match self.miss(iova, access) {
                            Some(p) => break Drained::Parked(p),
                            None => continue,
                        },
                        Err(e) => {
                            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: queue broken until reset");
                            break Drained::Broken;
                        }
                    }
                }
                Err(PopError::Miss { iova, access }) => {
                    self.epoch.exit();
                    match self.miss(iova, access) {
                        Some(p) => break Drained::Parked(p),
                        None => continue, // mapped meanwhile: retry
                    }
                }
                Err(PopError::Denied { head, iova, access }) => {
                    self.epoch.exit();
                    EngineCounters::add(&self.shared.stats.access_failures, 1);
                    tracing::info!(
                        queue = self.cfg.index,
                        iova = %format_args!("{iova:#x}"),
                        %access,
                        "vhost-user: access denied by the IOMMU; request failed"
                    );
                    self.send(IotlbMsg::AccessFail {
                        iova,
                        perm: access.as_perm(),
                    });
                    match self.fail(w, tr, head) {
                        Ok(None) => completed = true,
                        Ok(Some(p)) => break Drained::Parked(p),
                        Err(()) => break Drained::Broken,
                    }
                }
                Err(PopError::Invalid { head, reason }) => {
                    self.epoch.exit();
                    EngineCounters::add(&self.shared.stats.invalid_chains, 1);
                    tracing::warn!(queue = self.cfg.index, %reason, "vhost-user: malformed chain");
                    if let Some(head) = head {
                        match self.fail(w, tr, head) {
                            Ok(None) => completed = true,
                            Ok(Some(p)) => break Drained::Parked(p),
                            Err(()) => break Drained::Broken,
                        }
                    }
                }
                Err(PopError::Broken(why)) => {
                    self.epoch.exit();
                    tracing::warn!(queue = self.cfg.index, error = %why, "vhost-user: queue broken until reset");
                    break Drained::Broken;
                }
            }
        };
        if completed {
            self.notify(&mut w.queue, tr);
        }
        outcome
    }

    /// Register a miss; send the MISS if we are the first. `None` if an UPDATE covered it in
    /// the meantime (retry at once).
    fn miss(&self, iova: u64, access: Access) -> Option<Parked> {
        let now = Instant::now();
        let parked = Parked {
            iova,
            access,
            since: now,
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
                Some(parked)
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

    /// Send on the back-end channel without waiting for anything.
    fn send(&self, msg: IotlbMsg) {
        let chan = self.shared.backend_chan.read().clone();
        match chan {
            Some(chan) => {
                if let Err(e) = chan.send_backend_request(&BackendRequest::IotlbMsg(msg), false) {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: back-end channel send failed");
                }
            }
            None => tracing::warn!(
                queue = self.cfg.index,
                "vhost-user: no back-end channel (SET_BACKEND_REQ_FD) to report a miss on"
            ),
        }
    }

    /// Woken while a consumed request waits: finish it, or park again (giving up on its
    /// status byte once the miss has timed out).
    fn finish(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        p: Parked,
        u: Unfinished,
    ) -> Result<Option<Parked>, ()> {
        let expired = p.since.elapsed() >= self.shared.miss_timeout;
        match (u, expired) {
            (Unfinished::Fail { head, .. }, true) => {
                // The status byte never got a translation: complete without it.
                self.shared.iotlb.cancel_waiter(&self.cfg.index);
                self.complete_failed(w, tr, head, None)
            }
            _ => self.finish_now(w, tr, u).map(|again| {
                again.map(|a| Parked {
                    since: p.since,
                    ..a
                })
            }),
        }
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
            Unfinished::Fail { head, status } => {
                let mem = self.shared.mem.read().clone();
                let mut seg = Vec::with_capacity(1);
                self.epoch.enter(|| self.generation());
                let r = tr.translate(status, 1, Access::Write, &mut seg);
                self.epoch.exit();
                match r {
                    Ok(()) => {
                        let gpa = seg.first().map(|s| s.addr);
                        drop(mem);
                        self.complete_failed(w, tr, head, gpa)
                    }
                    Err(virtq::Fault::Miss { iova, access }) => match self.park(iova, access, u) {
                        Some(p) => Ok(Some(p)),
                        None => self.finish_now(w, tr, u),
                    },
                    Err(_) => self.complete_failed(w, tr, head, None),
                }
            }
        }
    }

    /// Let the device write its error status (if `status` is known) and complete `head`.
    fn complete_failed(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        status: Option<u64>,
    ) -> Result<Option<Parked>, ()> {
        let mem = self.shared.mem.read().clone();
        self.epoch.enter(|| self.generation());
        let len = w.handler.fail(status, mem.memory());
        self.epoch.exit();
        self.complete(w, tr, head, len)
    }

    /// Fail the consumed request `head`: find its status byte; if it is not translated yet,
    /// park until it is.
    fn fail(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
    ) -> Result<Option<Parked>, ()> {
        match self.status_of(w, tr, head) {
            Status::At(gpa) => self.complete_failed(w, tr, head, Some(gpa)),
            Status::None => self.complete_failed(w, tr, head, None),
            Status::Missing(iova) => {
                self.finish_now(w, tr, Unfinished::Fail { head, status: iova })
            }
        }
    }

    /// Where the status byte (last device-writable byte) of `head` is.
    fn status_of(&self, w: &mut Work<D::Handler>, tr: &mut dyn Translator, head: u16) -> Status {
        let mem = self.shared.mem.read().clone();
        self.epoch.enter(|| self.generation());
        let last = w.queue.last_writable(tr, mem.memory(), head);
        let status = match last {
            Ok(Some((addr, len))) => {
                let iova = addr + u64::from(len) - 1;
                let mut seg = Vec::with_capacity(1);
                match tr.translate(iova, 1, Access::Write, &mut seg) {
                    Ok(()) => seg.first().map_or(Status::None, |s| Status::At(s.addr)),
                    Err(virtq::Fault::Miss { .. }) => Status::Missing(iova),
                    Err(_) => Status::None,
                }
            }
            _ => Status::None,
        };
        self.epoch.exit();
        status
    }

    /// Complete `head` with `len` (and notify). `Ok(Some)` when the used ring missed.
    fn complete(
        &self,
        w: &mut Work<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        len: u32,
    ) -> Result<Option<Parked>, ()> {
        loop {
            let mem = self.shared.mem.read().clone();
            self.epoch.enter(|| self.generation());
            let done = w.queue.complete(tr, mem.memory(), head, len);
            self.epoch.exit();
            match done {
                Ok(()) => {
                    self.notify(&mut w.queue, tr);
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

    /// Our miss was not answered in time: send it once more, or give up on the request.
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
            .find(|m| m.waiters.contains(&index));
        match mine {
            Some(m) if m.sends < 2 => {
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
                Ok(Some(Parked { since: now, ..p }))
            }
            Some(m) => {
                tracing::warn!(
                    queue = index,
                    iova = %format_args!("{:#x}", m.miss_iova),
                    "vhost-user: MISS never answered; failing the request"
                );
                self.shared.iotlb.cancel_waiter(&index);
                EngineCounters::add(&self.shared.stats.timeouts, 1);
                let mem = self.shared.mem.read().clone();
                self.epoch.enter(|| self.generation());
                let skipped = w.queue.skip(tr, mem.memory());
                self.epoch.exit();
                match skipped {
                    Ok(Some(head)) => self.fail(w, tr, head),
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::warn!(queue = index, error = %e, "vhost-user: queue broken until reset");
                        Err(())
                    }
                }
            }
            // Resolved, cancelled, or resent by another queue: look again.
            None => Ok(None),
        }
    }

    fn notify(&self, queue: &mut Queue, tr: &mut dyn Translator) {
        let mem = self.shared.mem.read().clone();
        self.epoch.enter(|| self.generation());
        let wants = queue.needs_notification(tr, mem.memory());
        self.epoch.exit();
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
}
