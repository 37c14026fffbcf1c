//! Statistics of a shared IOTLB, and the per-handle counters they are summed from.
//!
//! Each worker handle counts its own hits, misses and denials in counters only it writes
//! (a relaxed load and store, no read-modify-write, no shared cache line on the hit path);
//! [`crate::SharedIotlb::stats`] sums them with the counters of the cache and of the pending
//! table. Nothing here influences translation.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of everything the IOTLB counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Translations fully served from the cache.
    pub hits: u64,
    /// Translations that stopped at an uncached byte.
    pub misses: u64,
    /// Translations refused by a mapping's permission.
    pub denied: u64,
    /// MISS messages the caller was told to send (first registrations and resends).
    pub misses_sent: u64,
    /// Miss registrations that joined an outstanding MISS instead of sending another.
    pub coalesced_misses: u64,
    /// Misses outstanding now.
    pub pending_misses: u64,
    /// UPDATEs applied.
    pub updates: u64,
    /// INVALIDATEs applied.
    pub invalidations: u64,
    /// Entries evicted to respect the capacity.
    pub evictions: u64,
    /// Entries cached now.
    pub entries: u64,
    /// The configured bound on entries.
    pub capacity: u64,
    /// The current invalidation generation.
    pub generation: u64,
}

impl Stats {
    /// Hits over all translations, in 0..=1 (0 when nothing was translated).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits as f64 + self.misses as f64 + self.denied as f64;
        if total == 0.0 {
            0.0
        } else {
            self.hits as f64 / total
        }
    }
}

/// Counters of one worker handle. Written by its owner thread only, on every translation:
/// aligned to two cache lines so that two handles' counters never share one (false sharing
/// would make every hit bounce a line between cores).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct HandleCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) denied: AtomicU64,
}

impl HandleCounters {
    /// Add one, from the single thread that owns these counters.
    #[inline]
    pub(crate) fn bump(c: &AtomicU64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// Add these counters into `stats`.
    pub(crate) fn add_to(&self, stats: &mut Stats) {
        stats.hits += self.hits.load(Ordering::Relaxed);
        stats.misses += self.misses.load(Ordering::Relaxed);
        stats.denied += self.denied.load(Ordering::Relaxed);
    }

    /// Fold `other` into these (a handle went away); may race with nothing but other folds,
    /// which are serialised by the registry lock.
    pub(crate) fn absorb(&self, other: &HandleCounters) {
        for (mine, theirs) in [
            (&self.hits, &other.hits),
            (&self.misses, &other.misses),
            (&self.denied, &other.denied),
        ] {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}
