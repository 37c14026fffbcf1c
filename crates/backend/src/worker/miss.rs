//! The miss lifecycle of a queue: register a miss in the IOTLB's pending table (sending the
//! MISS if this queue is the first), park, resume when woken, send the MISS once more after
//! a timeout and give up after a second one. The queue's place is never lost: a parked walk
//! keeps what it translated, and a request already off the ring keeps what is left to do.

use std::time::Instant;

use iotlb::{Access, MissOutcome};
use virtq::Translator;

use super::serve::Outcome;
use super::{QueueState, Runner, PAGE};
use crate::device::Device;
use crate::stats::EngineCounters;

/// A parked worker: the miss it waits for, and what to finish once it is answered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    pub(super) iova: u64,
    pub(super) access: Access,
    pub(super) since: Instant,
    /// When this queue sent the MISS itself (for the round-trip histogram).
    pub(super) sent: Option<Instant>,
    /// A request already taken off the avail ring that is not complete yet.
    pub(super) unfinished: Option<Unfinished>,
    /// The MISS waits for the front-end's unread messages, which may answer it (and the
    /// chains after it): nothing is asked ahead.
    pub(super) held: bool,
}

/// Where a step on a request the queue took off the ring left it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Next {
    /// Done with it: the queue goes on.
    Go,
    /// Waiting for a translation (the queue parks).
    Parked(Parked),
    /// The queue cannot go on (broken until the front-end restarts it).
    Broken,
}

impl Next {
    /// Parked if `p` is there, else go on.
    pub(super) fn waiting(p: Option<Parked>) -> Next {
        p.map_or(Next::Go, Next::Parked)
    }
}

/// A request consumed from the avail ring whose completion waits for a translation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unfinished {
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

impl<D: Device> Runner<D> {
    /// The queue got past the miss `w.rtt` waited for at `at` (unless it misses on that very
    /// address again, `missing`): record the round trip.
    pub(super) fn progress(
        &self,
        w: &mut QueueState<D::Handler>,
        missing: Option<(u64, Access)>,
        at: Instant,
    ) {
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

    /// Register a miss; send the MISS if we are the first. `None` if an UPDATE covered it in
    /// the meantime (retry at once).
    pub(super) fn miss(&self, iova: u64, access: Access) -> Option<Parked> {
        let now = Instant::now();
        let parked = Parked {
            iova,
            access,
            since: now,
            sent: None,
            unfinished: None,
            held: false,
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
                let held = self.shared.channel.miss_unless_pending(
                    &self.shared.stats,
                    self.cfg.index,
                    iova,
                    access,
                );
                Some(Parked {
                    sent: Some(now),
                    held,
                    ..parked
                })
            }
        }
    }

    /// Register a miss for a request that is already off the avail ring.
    pub(super) fn park(&self, iova: u64, access: Access, u: Unfinished) -> Option<Parked> {
        self.miss(iova, access).map(|p| Parked {
            unfinished: Some(u),
            ..p
        })
    }

    /// Woken, or timed out, while parked: finish what waits, and deal with a miss whose time
    /// is up. [`Next::Go`]: go on serving the ring.
    pub(super) fn resume(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        p: Parked,
    ) -> Next {
        let p = match p.unfinished {
            Some(u) => match self.finish_now(w, tr, u) {
                Next::Go => return Next::Go,
                Next::Broken => return Next::Broken,
                // Still waiting: on the same miss, the clock keeps running.
                Next::Parked(again) if again.iova == p.iova && again.access == p.access => Parked {
                    since: p.since,
                    sent: p.sent,
                    ..again
                },
                Next::Parked(again) => again,
            },
            None => p,
        };
        if p.since.elapsed() < self.shared.miss_timeout {
            // Not answered yet (a request in progress waits; a queue re-walks its chain).
            return Next::waiting(p.unfinished.map(|_| p));
        }
        self.on_timeout(w, tr, p)
    }

    /// Our miss was not answered in time: send it once more, or give up.
    pub(super) fn on_timeout(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        p: Parked,
    ) -> Next {
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
            return Next::waiting(p.unfinished.map(|_| Parked { since: now, ..p }));
        };
        if m.sends < 2 {
            tracing::info!(
                queue = index,
                iova = %format_args!("{:#x}", m.miss_iova),
                "vhost-user: MISS unanswered, sending it again"
            );
            self.shared
                .channel
                .miss(&self.shared.stats, Some(index), m.miss_iova, m.access);
            self.shared.iotlb.miss_resent(m.page, m.access, now);
            EngineCounters::add(&self.shared.stats.resends, 1);
            return Next::Parked(Parked { since: now, ..p });
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
                    Ok(None) => Next::Go,
                    Err(e) => {
                        tracing::warn!(queue = index, error = %e, "vhost-user: queue broken until reset");
                        Next::Broken
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
                Next::Broken
            }
            // The used ring itself cannot be written: nothing more can be done on this ring.
            Some(Unfinished::Complete { .. }) => {
                tracing::warn!(
                    queue = index,
                    "vhost-user: used ring unreachable; queue broken until reset"
                );
                Next::Broken
            }
        }
    }
}
