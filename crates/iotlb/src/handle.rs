//! A queue worker's view of the shared IOTLB: translation with a private, lock-free cache.
//!
//! Each [`IotlbHandle`] keeps copies of recently used entries in a 4-way set-associative table
//! indexed by a hash of the IOVA page (direct-mapped lost a fifth of a 256-page working set to
//! conflicts, and every conflict is a trip through the shared lock). A lookup first compares the shared generation with the one its
//! copies are valid for; if they match and the copy covers the request with the right
//! permission, the translation is done without a lock and without writing shared memory
//! (apart from the entry's heat counter until it saturates).
//!
//! When the generation has moved, the handle asks the cache which ranges changed since
//! ([`Iotlb::changes_since`]) and drops only the copies overlapping them, so a strict-mode
//! guest unmapping one buffer does not cost every queue its whole cache; if the log no longer
//! reaches back far enough, it drops everything. A copy of an entry the shared cache evicted
//! may stay: the IOMMU still maps it (see [`crate::shared`] for the full argument).
//!
//! A handle belongs to one thread (`&mut self`); it never blocks except on the shared read
//! lock of the slow path, and never touches guest memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::Iotlb;
use crate::error::TranslateError;
use crate::lock;
use crate::policy;
use crate::range::{Access, IovaRange};
use crate::segments::{Segment, Segments};
use crate::shared::{MissOutcome, SharedIotlb};
use crate::stats::HandleCounters;

/// Entries in each handle's private cache (32 KiB).
pub const HANDLE_CACHE_ENTRIES: usize = SETS * WAYS;
const WAYS: usize = 4;
const SETS: usize = 256;
const SET_SHIFT: u32 = 64 - SETS.trailing_zeros();
/// Beyond this many changes to catch up with, dropping every copy is cheaper than checking.
const MAX_SELECTIVE: usize = 16;

/// A copy of one cache entry. Empty when `start > last`.
#[derive(Clone, Copy)]
struct CachedEntry {
    start: u64,
    last: u64,
    target: u64,
    /// The shared cache's slot, for heat accounting only (a stale one is harmless).
    slot: u32,
    perm: u8,
}

impl CachedEntry {
    const EMPTY: CachedEntry = CachedEntry {
        start: u64::MAX,
        last: 0,
        target: 0,
        slot: u32::MAX,
        perm: 0,
    };

    fn overlaps(&self, r: &IovaRange) -> bool {
        self.start <= r.last() && r.start() <= self.last
    }
}

/// One set: `WAYS` copies, the most recently filled first.
type Set = [CachedEntry; WAYS];

/// The set of `iova`'s page: a multiplicative hash, so that strided buffers (every other
/// page, every 2 MiB) still spread over the whole table.
#[inline]
fn set_index(iova: u64) -> usize {
    ((iova >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> SET_SHIFT) as usize
}

/// Put `copy` first in `set`: in place of an older copy of the same entry if there is one,
/// otherwise pushing the least recently filled copy out.
fn fill(set: &mut Set, copy: CachedEntry) {
    let at = set
        .iter()
        .position(|e| e.start == copy.start && e.start <= e.last)
        .unwrap_or(WAYS - 1);
    set[..=at].rotate_right(1);
    set[0] = copy;
}

/// Drop the copies that changes after `*generation` touch, and move `*generation` to the
/// cache's.
fn apply_changes(cache: &mut [Set], generation: &mut u64, tlb: &Iotlb) {
    let mut ranges = [IovaRange::FULL; MAX_SELECTIVE];
    let mut n = 0;
    let selective = tlb.changes_since(*generation).is_some_and(|changes| {
        for r in changes {
            if n == MAX_SELECTIVE || r == IovaRange::FULL {
                return false;
            }
            ranges[n] = r;
            n += 1;
        }
        true
    });
    if selective {
        let ranges = &ranges[..n];
        for e in cache.iter_mut().flatten() {
            if ranges.iter().any(|r| e.overlaps(r)) {
                *e = CachedEntry::EMPTY;
            }
        }
    } else {
        cache.fill([CachedEntry::EMPTY; WAYS]);
    }
    *generation = tlb.generation();
}

/// One worker's view of a [`SharedIotlb`].
pub struct IotlbHandle<W> {
    shared: SharedIotlb<W>,
    /// The generation the copies in `cache` are valid for.
    generation: u64,
    cache: Box<[Set]>,
    counters: Arc<HandleCounters>,
}

impl<W> std::fmt::Debug for IotlbHandle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotlbHandle")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<W> Drop for IotlbHandle<W> {
    fn drop(&mut self) {
        let inner = &self.shared.inner;
        let mut handles = inner.handles.lock();
        inner.retired.absorb(&self.counters);
        handles.retain(|h| !Arc::ptr_eq(h, &self.counters));
    }
}

impl<W: Clone + PartialEq> IotlbHandle<W> {
    pub(crate) fn new(shared: SharedIotlb<W>) -> Self {
        let counters = Arc::new(HandleCounters::default());
        shared.inner.handles.lock().push(Arc::clone(&counters));
        IotlbHandle {
            generation: shared.generation(),
            shared,
            cache: vec![[CachedEntry::EMPTY; WAYS]; SETS].into_boxed_slice(),
            counters,
        }
    }

    /// The shared IOTLB this handle reads.
    pub fn shared(&self) -> &SharedIotlb<W> {
        &self.shared
    }

    /// The generation this handle's copies are valid for: after a translation, at least the
    /// generation that was current when it started.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Translate like [`Iotlb::translate`], counting hits, misses and denials.
    #[inline]
    pub fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, TranslateError> {
        match self.cached(iova, len, access) {
            Some(seg) => Ok(Segments::single(seg)),
            None => self.translate_shared(iova, len, |tlb| tlb.translate(iova, len, access)),
        }
    }

    /// Like [`IotlbHandle::translate`], appending to `out`; on error `out` is left as it was.
    #[inline]
    pub fn translate_into(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), TranslateError> {
        match self.cached(iova, len, access) {
            Some(seg) => {
                out.push(seg);
                Ok(())
            }
            None => {
                self.translate_shared(iova, len, |tlb| tlb.translate_into(iova, len, access, out))
            }
        }
    }

    /// The whole request from one private copy, if there is one (counted as a hit).
    #[inline]
    fn cached(&mut self, iova: u64, len: u64, access: Access) -> Option<Segment> {
        let generation = self.shared.inner.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.catch_up();
        }
        let last = iova.checked_add(len.checked_sub(1)?)?;
        let set = self.cache.get(set_index(iova))?;
        // Copies never overlap (a change that could make them is logged and drops them), so
        // the first one containing the request is the only one.
        let e = set
            .iter()
            .find(|e| e.start <= iova && last <= e.last && e.perm & access.bit() != 0)?;
        policy::touch(&self.shared.inner.heat, e.slot as usize);
        HandleCounters::bump(&self.counters.hits);
        Some(Segment {
            addr: e.target + (iova - e.start),
            len,
        })
    }

    /// Bring the copies up to the shared generation: drop those the changes since ours touch.
    #[cold]
    fn catch_up(&mut self) {
        let tlb = lock::read(&self.shared.inner.tlb);
        apply_changes(&mut self.cache, &mut self.generation, &tlb);
    }

    /// The slow path: `f` on the shared cache under the read lock, then keep a copy of the
    /// entry holding `iova`.
    fn translate_shared<R>(
        &mut self,
        iova: u64,
        len: u64,
        f: impl FnOnce(&Iotlb) -> Result<R, TranslateError>,
    ) -> Result<R, TranslateError> {
        let tlb = lock::read(&self.shared.inner.tlb);
        // Copies must match the state we are about to read.
        if tlb.generation() != self.generation {
            apply_changes(&mut self.cache, &mut self.generation, &tlb);
        }
        let result = f(&tlb);
        let counter = match &result {
            Ok(_) => &self.counters.hits,
            Err(TranslateError::Denied { .. }) => &self.counters.denied,
            Err(_) => &self.counters.misses,
        };
        HandleCounters::bump(counter);
        if len != 0 {
            if let Some((slot, m)) = tlb.lookup_slot(iova) {
                if let Some(set) = self.cache.get_mut(set_index(iova)) {
                    let copy = CachedEntry {
                        start: m.range.start(),
                        last: m.range.last(),
                        target: m.target,
                        slot: slot as u32,
                        perm: m.perm.bits(),
                    };
                    fill(set, copy);
                }
            }
        }
        result
    }

    /// Register a miss for this handle's worker (see [`SharedIotlb::register_miss`]).
    pub fn register_miss(&self, iova: u64, access: Access, waiter: W, now: Instant) -> MissOutcome {
        self.shared.register_miss(iova, access, waiter, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::Perm;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    fn cached(h: &IotlbHandle<u8>) -> usize {
        h.cache
            .iter()
            .flatten()
            .filter(|e| e.start <= e.last)
            .count()
    }

    #[test]
    fn invalidation_drops_only_overlapping_copies() {
        let s: SharedIotlb<u8> = SharedIotlb::new(Iotlb::with_capacity(64).unwrap());
        let mut h = s.handle();
        for i in 0..8u64 {
            s.update(r(i << 12, (i << 12) | 0xfff), i << 20, Perm::ReadWrite)
                .unwrap();
            h.translate(i << 12, 8, Access::Read).unwrap();
        }
        assert_eq!(cached(&h), 8);
        s.invalidate(r(0x2000, 0x2fff));
        assert!(h.translate(0x2000, 8, Access::Read).is_err());
        assert_eq!(cached(&h), 7);
        s.invalidate_all();
        assert!(h.translate(0x3000, 8, Access::Read).is_err());
        assert_eq!(cached(&h), 0);
    }

    #[test]
    fn falling_behind_the_log_drops_everything() {
        let s: SharedIotlb<u8> = SharedIotlb::new(Iotlb::with_capacity(64).unwrap());
        let mut h = s.handle();
        s.update(r(0, 0xfff), 0x1000, Perm::ReadWrite).unwrap();
        h.translate(0, 8, Access::Read).unwrap();
        for i in 0..(crate::cache::CHANGE_LOG_LEN as u64 + 5) {
            s.invalidate(r(0x10_0000 + (i << 12), 0x10_0000 + (i << 12)));
        }
        // Page 0 was never invalidated: it is still translated (through the shared cache).
        assert_eq!(h.translate(0, 8, Access::Read).unwrap()[0].addr, 0x1000);
        assert_eq!(h.generation(), s.generation());
    }

    #[test]
    fn strided_pages_spread_over_the_table() {
        let used: std::collections::HashSet<usize> =
            (0..256u64).map(|i| set_index(i * 0x2000)).collect();
        assert!(used.len() > 150, "only {} distinct sets", used.len());
    }

    #[test]
    fn fill_keeps_recent_copies_without_duplicates() {
        let copy = |start: u64| CachedEntry {
            start,
            last: start + 0xfff,
            target: 0,
            slot: 0,
            perm: 3,
        };
        let mut set = [CachedEntry::EMPTY; WAYS];
        for i in 1..=5u64 {
            fill(&mut set, copy(i << 12));
        }
        let starts: Vec<u64> = set.iter().map(|e| e.start >> 12).collect();
        assert_eq!(starts, vec![5, 4, 3, 2]);
        fill(&mut set, copy(3 << 12));
        let starts: Vec<u64> = set.iter().map(|e| e.start >> 12).collect();
        assert_eq!(starts, vec![3, 5, 4, 2]);
    }
}
