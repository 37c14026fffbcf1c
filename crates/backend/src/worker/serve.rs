//! Serving the ring: pop a chain (translated whole before it is consumed), let the device
//! serve it, complete it, and notify the driver; fail a request the engine cannot serve by
//! writing the device's error status into it, and never complete one whose status cannot be
//! written. Each step that touches guest memory runs in its own quiescence section. Waiting
//! and the miss lifecycle are elsewhere (`run`, `miss`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use iotlb::Access;
use virtq::{Chain, DirtyLog, Fault, PopError, Queue, Translator};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::miss::{Next, Parked, Unfinished};
use super::wake::signal;
use super::{Idle, QueueState, Runner};
use crate::device::{Device, MoreChains, QueueHandler, Served, Unreported};
use crate::dirty::SharedLog;
use crate::stats::EngineCounters;

/// Completions between two driver notifications under sustained load.
pub(super) const NOTIFY_EVERY: u32 = 32;

/// Requests one drain serves before it returns to the wait loop (which looks at stop and
/// enable and the eventfds), whatever the guest keeps posting: Linux's vhost bounds a round
/// the same way (`vhost_exceeds_weight`). Stop and enable are also looked at between any two
/// requests, so this bounds only how long kicks and wake-ups wait to be consumed.
pub(super) const DRAIN_BUDGET_REQUESTS: u32 = 64;
/// Bytes (readable and writable buffers) one drain serves before it returns: a few large
/// requests are a round too.
pub(super) const DRAIN_BUDGET_BYTES: u64 = 16 << 20;

/// How a drain ended.
pub(super) enum Drained {
    Empty,
    Parked(Parked),
    Broken,
    /// It served its budget of requests, or saw a stop or a disable between two requests:
    /// the queue may not be empty; the wait loop looks at stop and enable, then drains again
    /// without waiting for a kick.
    Yielded,
}

/// What one section of [`Runner::drain`] did.
pub(super) enum Popped {
    /// Served `head` (and `chains - 1` chains after it); `done` is how completing them went.
    Served {
        head: u16,
        len: u32,
        chains: u16,
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
    /// The device gave the chains back ([`Served::Retry`]) with nothing missing: ask it
    /// again.
    Retried,
    /// The device gave the chains back because the ring had too few for its request: wait
    /// for a kick (the driver adding one), not for the ring to be non-empty.
    Starved,
    /// Nothing to do.
    Empty,
}

/// Whose outcome a request's status byte gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The engine could not serve it: the device's error status ([`QueueHandler::fail`]).
    Failed,
    /// The device did its deferred work ([`QueueHandler::report_deferred`]).
    Deferred,
}

/// What one attempt at writing a failed request's status came to.
pub(super) enum FailStep {
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

/// The queue has no chain to pop (`pop` said so, or a request's next chain was not there):
/// leave kicks off while the wait polls the avail index, or ask for a kick at the next avail
/// index and look once more.
fn went_empty<H>(
    w: &mut QueueState<H>,
    tr: &mut dyn Translator,
    gm: &GuestMemoryMmap,
) -> Result<Popped, PopError> {
    // The wait will poll for the next chain: the driver need not kick meanwhile (with
    // EVENT_IDX, leaving avail_event behind is enough; without, the used ring's NO_NOTIFY
    // flag says so).
    if w.poll.poll_for_chains() {
        if !w.poll.kicks_off {
            w.queue.set_notification(tr, gm, false)?;
            w.poll.kicks_off = true;
        }
        return Ok(Popped::Empty);
    }
    // With EVENT_IDX the driver kicks only where avail_event says; a chain that came in
    // between would otherwise wait for a kick that is not coming.
    w.queue.set_notification(tr, gm, true).map(|more| {
        w.poll.kicks_off = false;
        if more {
            Popped::More
        } else {
            Popped::Empty
        }
    })
}

/// Log the buffers of `chain`, which the device is done with, before its used entry (live
/// migration): every writable byte, by the guest-physical address it was written through.
/// The broken mode logs the descriptors' addresses instead (IOVAs behind an IOMMU).
fn log_buffers(
    log: &SharedLog,
    queue: &mut Queue,
    tr: &mut dyn Translator,
    gm: &GuestMemoryMmap,
    chain: &Chain,
) {
    if !log.active() {
        return;
    }
    if log.logs_iovas() {
        let _ = queue.visit_buffers(tr, gm, chain.head(), |addr, len, writable| {
            if writable {
                log.log(addr, u64::from(len));
            }
            true
        });
        return;
    }
    for s in chain.writable() {
        log.log(s.addr, s.len);
    }
}

/// The engine's [`MoreChains`]: the queue's next chains, popped in the section the
/// request's first chain was popped in.
struct Taker<'a> {
    queue: &'a mut Queue,
    tr: &'a mut dyn Translator,
    gm: &'a GuestMemoryMmap,
    chain: &'a mut Chain,
    /// The chains done with, in ring order, and the used length each was given.
    taken: &'a mut Vec<(u16, u32)>,
    /// The chain being filled.
    current: u16,
    /// Why the last [`MoreChains::next`] gave `None`: `Ok` if the ring had no chain.
    stopped: Option<Result<(), PopError>>,
    log: &'a SharedLog,
}

impl MoreChains for Taker<'_> {
    fn next(&mut self, used: u32) -> Option<&Chain> {
        if self.stopped.is_some() {
            return None;
        }
        // The device is done with the chain before: a later one of this request is about to
        // replace it here (the first stays in the queue state, logged when it completes).
        if !self.taken.is_empty() {
            log_buffers(self.log, self.queue, &mut *self.tr, self.gm, self.chain);
        }
        match self.queue.pop(&mut *self.tr, self.gm, self.chain) {
            Ok(true) => {
                self.taken.push((self.current, used));
                self.current = self.chain.head();
                Some(self.chain)
            }
            Ok(false) => {
                self.stopped = Some(Ok(()));
                None
            }
            Err(e) => {
                self.stopped = Some(Err(e));
                None
            }
        }
    }
}

/// What the handler's answer for the request at `head` comes to, inside the section it was
/// served in: complete its chains (`current` is the last one taken), give them back, or fail
/// the chain that stopped it (`stopped`: why [`MoreChains::next`] last gave `None`).
#[allow(clippy::too_many_arguments)]
fn settle<H>(
    w: &mut QueueState<H>,
    tr: &mut dyn Translator,
    gm: &GuestMemoryMmap,
    head: u16,
    popped: Instant,
    answer: Result<Served, Unreported>,
    current: u16,
    stopped: Option<Result<(), PopError>>,
    log: &SharedLog,
) -> Result<Popped, PopError> {
    let extra = w.taken.len() as u16;
    if let Ok(Served::Done(_)) = answer {
        if log.active() {
            log.count_request();
        }
        log_buffers(log, &mut w.queue, tr, gm, &w.chain);
        if extra > 0 {
            log_buffers(log, &mut w.queue, tr, gm, &w.extra);
        }
    }
    let served = |len, done| Popped::Served {
        head,
        len,
        chains: extra + 1,
        done,
        popped,
    };
    match answer {
        Ok(Served::Done(len)) if extra == 0 => Ok(served(len, w.queue.complete(tr, gm, head, len))),
        Ok(Served::Done(len)) => {
            w.taken.push((current, len));
            // Published together, with the used ring translated when they were popped in
            // this section: none of them can be left to park on.
            let done = w.queue.complete_all(tr, gm, &w.taken).map_err(|e| match e {
                PopError::Miss { .. } => {
                    PopError::Broken("used ring unmapped within a section".into())
                }
                e => e,
            });
            Ok(served(len, done))
        }
        Ok(Served::Retry) => {
            w.open = None;
            match stopped {
                // The next chain was refused (and consumed): the ones before it are given
                // back empty, and it is failed as any refused chain.
                Some(Err(e @ (PopError::Denied { .. } | PopError::Invalid { .. }))) => {
                    w.taken.push((current, 0));
                    let empty: Vec<(u16, u32)> = w.taken.iter().map(|&(h, _)| (h, 0)).collect();
                    w.queue.complete_all(tr, gm, &empty).and(Err(e))
                }
                // Parked on the miss; the walk starts again from the first chain.
                Some(Err(e @ PopError::Miss { .. })) => {
                    w.queue.unpop(extra + 1);
                    Err(e)
                }
                Some(Err(e)) => Err(e),
                // The ring has too few chains for the request: ask for a kick once the
                // driver adds one past those there are (the avail event at the end of them),
                // then give them back; until then the wait sleeps, since the ring is not
                // empty and polling it would only find the same chains.
                Some(Ok(())) => {
                    let more = w.queue.set_notification(tr, gm, true)?;
                    w.poll.kicks_off = false;
                    w.queue.unpop(extra + 1);
                    Ok(if more { Popped::More } else { Popped::Starved })
                }
                None => {
                    w.queue.unpop(extra + 1);
                    Ok(Popped::Retried)
                }
            }
        }
        Ok(Served::Deferred) if extra == 0 => Ok(Popped::Deferred { head, popped }),
        // A deferred request spans one chain (the engine reports it at one status byte); a
        // device that took more is wrong, and its request is not completed.
        Ok(Served::Deferred) | Err(Unreported) => {
            w.queue.unpop(extra);
            Ok(Popped::Unreported { head, popped })
        }
    }
}

impl<D: Device> Runner<D> {
    /// Serve chains until the queue is empty, a miss parks it, it breaks, or its budget is
    /// spent (or a stop or a disable came: [`Drained::Yielded`]).
    pub(super) fn serve_ring(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
    ) -> Drained {
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
            if !w.handler.ready() {
                w.device_idle = Idle::Device;
                // The device wakes this queue when it has work (QueueWakers), and the drain
                // then reads the avail index itself: kicks meanwhile (a receive ring being
                // refilled) would only wake the worker to find nothing to do.
                if !w.poll.kicks_off {
                    match self.section(|gm| w.queue.set_notification(tr, gm, false)) {
                        Ok(_) => w.poll.kicks_off = true,
                        Err(e) => tracing::debug!(error = %e, "vhost-user: cannot turn kicks off"),
                    }
                }
                break Drained::Empty;
            }
            w.device_idle = Idle::No;
            let popped = self.section(|gm| match w.queue.pop(tr, gm, &mut w.chain) {
                Ok(true) => {
                    let head = w.chain.head();
                    let popped = Instant::now();
                    w.open = Some(head);
                    let bytes =
                        u64::from(w.chain.readable_len()) + u64::from(w.chain.writable_len());
                    EngineCounters::max(&self.shared.stats.largest_request, bytes);
                    w.taken.clear();
                    let mut more = Taker {
                        queue: &mut w.queue,
                        tr: &mut *tr,
                        gm,
                        chain: &mut w.extra,
                        taken: &mut w.taken,
                        current: head,
                        stopped: None,
                        log: &self.shared.log,
                    };
                    let served = w.handler.serve(&w.chain, &mut more, gm);
                    let (current, stopped) = (more.current, more.stopped);
                    let log = &self.shared.log;
                    settle(w, tr, gm, head, popped, served, current, stopped, log)
                }
                Ok(false) => went_empty(w, tr, gm),
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
                    head,
                    len,
                    chains,
                    done,
                    ..
                }) => {
                    EngineCounters::add(&self.shared.stats.requests, 1);
                    served += 1;
                    bytes += u64::from(w.chain.readable_len()) + u64::from(w.chain.writable_len());
                    match done {
                        Ok(()) => {
                            w.unnotified += u32::from(chains) - 1;
                            self.count_completion(w, tr);
                        }
                        // The used ring was invalidated while the request was served (pop
                        // translated it first): park until it is mapped again, then
                        // complete. The request is not served twice.
                        Err(PopError::Miss { iova, access }) => {
                            match self.park(iova, access, Unfinished::Complete { head, len }) {
                                Some(p) => break Drained::Parked(p),
                                None => match self.put_used(w, tr, head, len) {
                                    Next::Go => {}
                                    Next::Parked(p) => break Drained::Parked(p),
                                    Next::Broken => break Drained::Broken,
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
                        Next::Go => {}
                        Next::Parked(p) => break Drained::Parked(p),
                        Next::Broken => break Drained::Broken,
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
                Ok(Popped::Retried) => {
                    // Counted against the budget: a device that keeps giving chains back
                    // must not hold the wait loop off.
                    served += 1;
                }
                Ok(Popped::Empty) => break Drained::Empty,
                Ok(Popped::Starved) => {
                    w.device_idle = Idle::Starved;
                    break Drained::Empty;
                }
                Err(PopError::Miss { iova, access }) => match self.miss(iova, access) {
                    Some(p) => {
                        if let Some(sent) = p.sent {
                            w.rtt = Some((sent, iova, access));
                            // A new miss: ask at once for every other page the next chains
                            // will miss on, rather than one round trip each (unless the
                            // front-end's unread messages may map them: pre-push).
                            if !p.held {
                                self.prefetch(w, tr, iova);
                            }
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
                    let (stats, index) = (&self.shared.stats, self.cfg.index);
                    let limit = &mut w.access_fails;
                    self.shared
                        .channel
                        .access_fail(stats, index, limit, iova, access);
                    w.open = Some(head);
                    match self.fail(w, tr, head) {
                        Next::Go => {}
                        Next::Parked(p) => break Drained::Parked(p),
                        Next::Broken => break Drained::Broken,
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
                        Next::Go => {}
                        Next::Parked(p) => break Drained::Parked(p),
                        Next::Broken => break Drained::Broken,
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

    /// Whether a warning the guest caused (and can cause in a loop) may be logged now: `Some`
    /// with the number held back since the last one logged; `None` (counted) if not.
    pub(super) fn may_warn(&self, w: &mut QueueState<D::Handler>) -> Option<u64> {
        let held = w.warnings.allow(Instant::now());
        if held.is_none() {
            EngineCounters::add(&self.shared.stats.warnings_suppressed, 1);
        }
        held
    }

    /// A request was completed: notify the driver now and then under sustained load, not
    /// only when the queue runs dry.
    pub(super) fn count_completion(&self, w: &mut QueueState<D::Handler>, tr: &mut dyn Translator) {
        w.open = None;
        w.unnotified += 1;
        if w.unnotified >= NOTIFY_EVERY {
            self.notify(w, tr);
        }
    }

    /// Fail the consumed request `head`: write the device's error status into its status byte
    /// and complete it; if the byte's translation is missing, park until it comes; if the
    /// status cannot be written, [`Next::Broken`] (the queue breaks: the request is never completed).
    pub(super) fn fail(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
    ) -> Next {
        self.report(w, tr, head, Outcome::Failed)
    }

    /// Write `outcome` into the consumed request `head`'s status byte and complete it (see
    /// [`Self::fail`]).
    pub(super) fn report(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        outcome: Outcome,
    ) -> Next {
        let u = Unfinished::Report {
            head,
            status: None,
            outcome,
        };
        self.finish_now(w, tr, u)
    }

    /// Try to finish `u` now.
    pub(super) fn finish_now(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        u: Unfinished,
    ) -> Next {
        match u {
            Unfinished::Complete { head, len } => self.put_used(w, tr, head, len),
            Unfinished::Report {
                head,
                status,
                outcome,
            } => loop {
                let log = &self.shared.log;
                let step =
                    self.section(|gm| Self::write_outcome(w, tr, gm, head, status, outcome, log));
                match step {
                    FailStep::Written(len) => {
                        if outcome == Outcome::Failed {
                            EngineCounters::add(&self.shared.stats.failed, 1);
                        }
                        return self.put_used(w, tr, head, len);
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
                            return Next::Parked(p);
                        }
                    }
                    FailStep::Unwritable(why) => {
                        tracing::warn!(
                            queue = self.cfg.index,
                            head,
                            reason = why,
                            "vhost-user: a request's status cannot be written; not completing it"
                        );
                        return Next::Broken;
                    }
                }
            },
        }
    }

    /// Let the device write `outcome` for the consumed request `head`, inside the caller's
    /// section: the status byte (the last device-writable byte, at `status` if it is known
    /// already) is found, translated for writing and written there and then.
    pub(super) fn write_outcome(
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        gm: &GuestMemoryMmap,
        head: u16,
        status: Option<u64>,
        outcome: Outcome,
        log: &SharedLog,
    ) -> FailStep {
        if outcome == Outcome::Failed && !w.handler.status_in_chain() {
            return FailStep::Written(0);
        }
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
                    if log.active() {
                        let at = if log.logs_iovas() { iova } else { s.addr };
                        log.log(at, 1);
                    }
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

    /// Complete `head` with `len` (parked when the used ring missed).
    pub(super) fn put_used(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        head: u16,
        len: u32,
    ) -> Next {
        loop {
            let done = self.section(|gm| w.queue.complete(tr, gm, head, len));
            match done {
                Ok(()) => {
                    self.count_completion(w, tr);
                    return Next::Go;
                }
                Err(PopError::Miss { iova, access }) => {
                    if let Some(p) = self.park(iova, access, Unfinished::Complete { head, len }) {
                        return Next::Parked(p);
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: complete failed");
                    return Next::Broken;
                }
            }
        }
    }

    pub(super) fn notify(&self, w: &mut QueueState<D::Handler>, tr: &mut dyn Translator) {
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
