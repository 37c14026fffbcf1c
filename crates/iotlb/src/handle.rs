//! A queue worker's view of the shared IOTLB: translation with a private, lock-free cache.
//!
//! Each [`IotlbHandle`] keeps copies of recently used entries in a 4-way set-associative table
//! indexed by a hash of the IOVA page (direct-mapped lost a fifth of a 256-page working set to
//! conflicts, and every conflict is a trip through the shared lock). A copy is clipped to one
//! 4 KiB page and kept in that page's set: an entry used on three pages has three copies. A
//! lookup first compares the shared generation with the one its copies are valid for; if
//! they match and the copies of the request's pages (at most [`MAX_PAGES_CACHED`]) cover it
//! with the right permission and contiguous targets, the translation is done without a lock
//! and without writing shared memory (apart from the entry's heat counter until it
//! saturates).
//!
//! When the generation has moved, the handle asks the cache which ranges changed since
//! ([`Iotlb::changes_since`]) and drops only the copies overlapping them, so a strict-mode
//! guest unmapping one buffer does not cost every queue its whole cache. Because a copy lies
//! in its page's set, a change of a few pages is checked in those pages' sets only (a few
//! comparisons each), not across the whole table: a burst of UPDATEs, each of which moves the
//! generation, costs the worker next to nothing. A large change is checked against every copy;
//! if the log no longer reaches back far enough, everything is dropped. A copy of an entry the
//! shared cache evicted may stay: the IOMMU still maps it (see [`crate::shared`] for the full
//! argument).
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
/// A change of up to this many pages is checked in those pages' sets; a larger one against
/// every copy.
const MAX_PAGES_CHECKED: u64 = 64;
/// Most pages a request may span and still be served from copies.
pub const MAX_PAGES_CACHED: u64 = 16;
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;

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
    let selective = tlb.changes_since(*generation).is_some_and(|changes| {
        for r in changes {
            if r == IovaRange::FULL {
                return false;
            }
            drop_overlapping(cache, &r);
        }
        true
    });
    if !selective {
        cache.fill([CachedEntry::EMPTY; WAYS]);
    }
    *generation = tlb.generation();
}

/// Drop the copies overlapping `r`: in its pages' sets when it spans few pages (a copy lies
/// within its page, in that page's set), otherwise anywhere.
fn drop_overlapping(cache: &mut [Set], r: &IovaRange) {
    let (first, last) = (r.start() >> PAGE_SHIFT, r.last() >> PAGE_SHIFT);
    if last - first < MAX_PAGES_CHECKED {
        for page in first..=last {
            if let Some(set) = cache.get_mut(set_index(page << PAGE_SHIFT)) {
                for e in set.iter_mut().filter(|e| e.overlaps(r)) {
                    *e = CachedEntry::EMPTY;
                }
            }
        }
    } else {
        for e in cache.iter_mut().flatten().filter(|e| e.overlaps(r)) {
            *e = CachedEntry::EMPTY;
        }
    }
}

/// The part of `m` in `iova`'s page, as a copy.
fn page_copy(slot: usize, m: &crate::cache::Mapping, iova: u64) -> CachedEntry {
    let start = m.range.start().max(iova & !PAGE_MASK);
    let last = m.range.last().min(iova | PAGE_MASK);
    CachedEntry {
        start,
        last,
        target: m.target.wrapping_add(start - m.range.start()),
        slot: slot as u32,
        perm: m.perm.bits(),
    }
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

    /// The whole request from private copies, one per page it spans, if they cover it with
    /// contiguous targets (counted as a hit).
    #[inline]
    fn cached(&mut self, iova: u64, len: u64, access: Access) -> Option<Segment> {
        let generation = self.shared.inner.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.catch_up();
        }
        let last = iova.checked_add(len.checked_sub(1)?)?;
        if (last >> PAGE_SHIFT) - (iova >> PAGE_SHIFT) >= MAX_PAGES_CACHED {
            return None;
        }
        let mut addr = None;
        let mut at = iova;
        loop {
            let piece_last = last.min(at | PAGE_MASK);
            let set = self.cache.get(set_index(at))?;
            // Copies never overlap (a change that could make them is logged and drops them),
            // so the first one containing the piece is the only one.
            let e = set
                .iter()
                .find(|e| e.start <= at && piece_last <= e.last && e.perm & access.bit() != 0)?;
            let target = e.target + (at - e.start);
            match addr {
                None => addr = Some(target),
                Some(a) if a.checked_add(at - iova) == Some(target) => {}
                Some(_) => return None, // not contiguous: several segments, the slow path
            }
            policy::touch(&self.shared.inner.heat, e.slot as usize);
            if piece_last == last {
                break;
            }
            at = piece_last + 1;
        }
        HandleCounters::bump(&self.counters.hits);
        Some(Segment { addr: addr?, len })
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
        // Copies of the pages the request spans, for next time.
        let last = iova.saturating_add(len.saturating_sub(1));
        if len != 0 && (last >> PAGE_SHIFT) - (iova >> PAGE_SHIFT) < MAX_PAGES_CACHED {
            let mut at = iova;
            loop {
                if let Some((slot, m)) = tlb.lookup_slot(at) {
                    if let Some(set) = self.cache.get_mut(set_index(at)) {
                        fill(set, page_copy(slot, &m, at));
                    }
                }
                match (at | PAGE_MASK).checked_add(1) {
                    Some(next) if next <= last => at = next,
                    _ => break,
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
    fn copies_are_per_page_and_a_change_drops_only_its_pages() {
        let s: SharedIotlb<u8> = SharedIotlb::new(Iotlb::with_capacity(64).unwrap());
        let mut h = s.handle();
        // One 16-page entry; a 3-page request makes three copies, one per page.
        s.update(r(0x10_000, 0x1f_fff), 0x100_000, Perm::ReadWrite)
            .unwrap();
        let seg = h.translate(0x10_800, 0x2000, Access::Read).unwrap();
        assert_eq!((seg[0].addr, seg[0].len), (0x100_800, 0x2000));
        assert_eq!(cached(&h), 3);
        let hits = h.counters.hits.load(Ordering::Relaxed);
        assert_eq!(
            h.translate(0x10_900, 0x2000, Access::Read).unwrap()[0].addr,
            0x100_900
        );
        assert_eq!(
            h.counters.hits.load(Ordering::Relaxed),
            hits + 1,
            "served from copies"
        );
        // Unmapping the middle page drops its copy only; the pages around still hit.
        s.invalidate(r(0x11_000, 0x11_fff));
        assert_eq!(
            h.translate(0x10_000, 8, Access::Read).unwrap()[0].addr,
            0x100_000
        );
        assert_eq!(cached(&h), 2);
        assert!(h.translate(0x10_ff0, 0x20, Access::Read).is_err());
        assert!(h.translate(0x11_000, 1, Access::Read).is_err());
        assert_eq!(
            h.translate(0x12_004, 4, Access::Read).unwrap()[0].addr,
            0x102_004
        );
        // Pieces whose targets are not contiguous are two segments, from the slow path.
        s.update(r(0x11_000, 0x11_fff), 0x900_000, Perm::ReadWrite)
            .unwrap();
        let seg = h.translate(0x10_ff0, 0x20, Access::Read).unwrap();
        assert_eq!(seg.len(), 2);
        assert_eq!((seg[1].addr, seg[1].len), (0x900_000, 0x10));
        // A change of many pages is checked against every copy.
        s.invalidate(r(0, 0xfff_fff));
        assert_eq!(h.translate(0x12_004, 4, Access::Read).ok(), None);
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
