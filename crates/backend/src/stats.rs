//! Back-end counters: what the IOTLB counts, plus what only the engine knows (miss timeouts,
//! access failures, quiescence waits), summed over connections for the stats line printed on
//! exit. Counting only; nothing here decides anything.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iotlb::hist::Histogram;
use iotlb::Stats as IotlbStats;

use crate::dirty::SharedLog;

/// Counters the engine keeps beside the IOTLB's.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Requests failed because their MISS was never answered.
    pub timeouts: AtomicU64,
    /// Accesses the IOMMU denied (each fails its request).
    pub access_failures: AtomicU64,
    /// ACCESS_FAIL messages sent (at most one per page and direction a second per queue).
    pub access_fails_sent: AtomicU64,
    /// Denied accesses whose ACCESS_FAIL was held back by the rate limit.
    pub access_fails_suppressed: AtomicU64,
    /// Warnings a guest caused (malformed chains, denied accesses) held back by the rate
    /// limit.
    pub warnings_suppressed: AtomicU64,
    /// MISS messages sent.
    pub misses_sent: AtomicU64,
    /// Of which sent ahead for chains not reached yet.
    pub prefetched: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Malformed chains, and chains beyond the device's limits.
    pub invalid_chains: AtomicU64,
    /// Requests the engine did not serve and completed with the device's error status
    /// (malformed, beyond the limits, denied, never answered).
    pub failed: AtomicU64,
    /// Queues stopped until reset: a request's status could not be written (never completed
    /// as if served) or the ring itself was unusable. Each signals the vring error fd.
    pub broken_queues: AtomicU64,
    /// Total microseconds the control thread waited for workers before acknowledging.
    pub quiesce_us: AtomicU64,
    /// The longest of those waits, in microseconds (how long a worker held a section while
    /// an invalidation waited for it).
    pub quiesce_max_us: AtomicU64,
    /// Waits for workers that took over a millisecond.
    pub slow_quiesces: AtomicU64,
    /// MISSes sent again because the first went unanswered for the miss timeout.
    pub resends: AtomicU64,
    /// MISSes held while the front-end's messages waited unread (a pre-pushed UPDATE may be
    /// among them).
    pub held_misses: AtomicU64,
    /// Of those, answered by such a message: never sent.
    pub held_answered: AtomicU64,
    /// Bytes of the largest request served (its readable and writable buffers together).
    pub largest_request: AtomicU64,
    /// Miss round trips: from a queue's MISS sent to the queue running again (the UPDATE
    /// applied and the worker woken). Shared by every connection of a server, recorded live.
    pub miss_rtt: Arc<Histogram>,
}

impl EngineCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Raise `c` to `n` (a load first: the common case writes nothing shared).
    pub(crate) fn max(c: &AtomicU64, n: u64) {
        if n > c.load(Ordering::Relaxed) {
            c.fetch_max(n, Ordering::Relaxed);
        }
    }
}

/// A snapshot of everything counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Translations served from the IOTLB.
    pub hits: u64,
    /// Translations that missed.
    pub misses: u64,
    /// Misses that joined an outstanding MISS.
    pub coalesced: u64,
    /// IOTLB evictions.
    pub evictions: u64,
    /// INVALIDATEs applied.
    pub invalidations: u64,
    /// UPDATEs applied.
    pub updates: u64,
    /// Requests failed after an unanswered MISS.
    pub timeouts: u64,
    /// Accesses the IOMMU denied.
    pub access_failures: u64,
    /// ACCESS_FAIL messages sent.
    pub access_fails_sent: u64,
    /// ACCESS_FAILs held back by the rate limit.
    pub access_fails_suppressed: u64,
    /// Guest-caused warnings held back by the rate limit.
    pub warnings_suppressed: u64,
    /// MISS messages sent.
    pub misses_sent: u64,
    /// Of which sent ahead for chains not reached yet.
    pub prefetched: u64,
    /// Requests served.
    pub requests: u64,
    /// Malformed chains, and chains beyond the device's limits.
    pub invalid_chains: u64,
    /// Requests completed with the device's error status by the engine.
    pub failed: u64,
    /// Queues stopped until reset (see [`EngineCounters::broken_queues`]).
    pub broken_queues: u64,
    /// Microseconds spent waiting for workers before acknowledging IOTLB changes.
    pub quiesce_us: u64,
    /// See [`EngineCounters::quiesce_max_us`].
    pub quiesce_max_us: u64,
    /// See [`EngineCounters::slow_quiesces`].
    pub slow_quiesces: u64,
    /// See [`EngineCounters::resends`].
    pub resends: u64,
    /// See [`EngineCounters::held_misses`].
    pub held_misses: u64,
    /// See [`EngineCounters::held_answered`].
    pub held_answered: u64,
    /// Bytes of the largest request served.
    pub largest_request: u64,
    /// Pages the dirty log got newly marked (live migration).
    pub logged_pages: u64,
    /// Pages written beyond the end of the dirty log (not logged: the log was too small).
    pub log_beyond: u64,
    /// Requests completed while dirty logging was on.
    pub logged_requests: u64,
    /// Connections that ended.
    pub connections: u64,
}

impl Stats {
    /// Add one connection's IOTLB statistics and engine counters.
    pub fn add(&mut self, t: &IotlbStats, e: &EngineCounters, log: &SharedLog) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.hits += t.hits;
        self.misses += t.misses;
        self.coalesced += t.coalesced_misses;
        self.evictions += t.evictions;
        self.invalidations += t.invalidations;
        self.updates += t.updates;
        self.timeouts += get(&e.timeouts);
        self.access_failures += get(&e.access_failures);
        self.access_fails_sent += get(&e.access_fails_sent);
        self.access_fails_suppressed += get(&e.access_fails_suppressed);
        self.warnings_suppressed += get(&e.warnings_suppressed);
        self.misses_sent += get(&e.misses_sent);
        self.prefetched += get(&e.prefetched);
        self.requests += get(&e.requests);
        self.invalid_chains += get(&e.invalid_chains);
        self.failed += get(&e.failed);
        self.broken_queues += get(&e.broken_queues);
        self.quiesce_us += get(&e.quiesce_us);
        self.quiesce_max_us = self.quiesce_max_us.max(get(&e.quiesce_max_us));
        self.slow_quiesces += get(&e.slow_quiesces);
        self.resends += get(&e.resends);
        self.held_misses += get(&e.held_misses);
        self.held_answered += get(&e.held_answered);
        self.largest_request = self.largest_request.max(get(&e.largest_request));
        self.logged_pages += get(&log.pages);
        self.log_beyond += get(&log.beyond);
        self.logged_requests += get(&log.requests);
        self.connections += 1;
    }
}

impl Stats {
    /// Every counter by the name the stats line and JSON give it, in the stats line's order.
    pub fn fields(&self) -> [(&'static str, u64); 28] {
        [
            ("requests", self.requests),
            ("hits", self.hits),
            ("misses", self.misses),
            ("coalesced", self.coalesced),
            ("misses_sent", self.misses_sent),
            ("prefetched", self.prefetched),
            ("held_misses", self.held_misses),
            ("held_answered", self.held_answered),
            ("evictions", self.evictions),
            ("updates", self.updates),
            ("invalidations", self.invalidations),
            ("resends", self.resends),
            ("timeouts", self.timeouts),
            ("access_failures", self.access_failures),
            ("access_fails_sent", self.access_fails_sent),
            ("access_fails_suppressed", self.access_fails_suppressed),
            ("invalid_chains", self.invalid_chains),
            ("warnings_suppressed", self.warnings_suppressed),
            ("failed", self.failed),
            ("broken_queues", self.broken_queues),
            ("quiesce_us", self.quiesce_us),
            ("quiesce_max_us", self.quiesce_max_us),
            ("slow_quiesces", self.slow_quiesces),
            ("largest_request", self.largest_request),
            ("logged_pages", self.logged_pages),
            ("log_beyond", self.log_beyond),
            ("logged_requests", self.logged_requests),
            ("connections", self.connections),
        ]
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stats:")?;
        for (name, value) in self.fields() {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}
