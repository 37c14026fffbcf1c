//! Back-end counters: what the IOTLB counts, plus what only the engine knows (miss timeouts,
//! access failures, quiescence waits), summed over connections for the stats line printed on
//! exit. Counting only; nothing here decides anything.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iotlb::hist::Histogram;
use iotlb::Stats as IotlbStats;

/// Counters the engine keeps beside the IOTLB's.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Requests failed because their MISS was never answered.
    pub timeouts: AtomicU64,
    /// Accesses the IOMMU denied (ACCESS_FAIL sent).
    pub access_failures: AtomicU64,
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
    /// ACCESS_FAILs.
    pub access_failures: u64,
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
    /// Bytes of the largest request served.
    pub largest_request: u64,
}

impl Stats {
    /// Add one connection's IOTLB statistics and engine counters.
    pub fn add(&mut self, t: &IotlbStats, e: &EngineCounters) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.hits += t.hits;
        self.misses += t.misses;
        self.coalesced += t.coalesced_misses;
        self.evictions += t.evictions;
        self.invalidations += t.invalidations;
        self.updates += t.updates;
        self.timeouts += get(&e.timeouts);
        self.access_failures += get(&e.access_failures);
        self.misses_sent += get(&e.misses_sent);
        self.prefetched += get(&e.prefetched);
        self.requests += get(&e.requests);
        self.invalid_chains += get(&e.invalid_chains);
        self.failed += get(&e.failed);
        self.broken_queues += get(&e.broken_queues);
        self.quiesce_us += get(&e.quiesce_us);
        self.largest_request = self.largest_request.max(get(&e.largest_request));
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stats: requests={} hits={} misses={} coalesced={} misses_sent={} prefetched={} \
             evictions={} \
             updates={} invalidations={} timeouts={} access_failures={} invalid_chains={} \
             failed={} broken_queues={} quiesce_us={} largest_request={}",
            self.requests,
            self.hits,
            self.misses,
            self.coalesced,
            self.misses_sent,
            self.prefetched,
            self.evictions,
            self.updates,
            self.invalidations,
            self.timeouts,
            self.access_failures,
            self.invalid_chains,
            self.failed,
            self.broken_queues,
            self.quiesce_us,
            self.largest_request
        )
    }
}
