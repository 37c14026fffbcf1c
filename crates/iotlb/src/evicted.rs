//! Translations the cache evicted that a worker may still hold.
//!
//! Eviction does not change what the IOMMU maps, so a translation taken before it stays
//! correct and may still be in use: a worker's handle keeps private copies of entries (see
//! [`crate::handle`]), and a queue keeps the segments of a chain it is walking across misses.
//! If the IOMMU side then remaps those bytes, the UPDATE takes a translation away from them
//! exactly as an INVALIDATE would (design invariant 3): the generation must move and the
//! back-end must quiesce before it acknowledges, although the cache no longer holds anything
//! there. [`Evicted`] remembers such bytes: ranges evicted and not invalidated or remapped
//! since, with the translation they had, so that an UPDATE that maps them again *the same
//! way* (the common case: a page missed again after its eviction) changes nothing.
//!
//! Bounded: past its limit, neighbouring ranges are merged pairwise into ranges whose
//! translation is unknown (any UPDATE or INVALIDATE over them counts as a change).
//! Over-approximating costs a quiescence at worst, never a missed one.
//!
//! Plain bookkeeping: no lock, no I/O, nothing that can panic on any input.

use std::collections::BTreeMap;

use crate::range::{IovaRange, Perm};

/// One evicted range: its last byte and, unless merged, its translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    last: u64,
    /// `(target of the range's first byte, perm)`; `None` once merged with a neighbour.
    map: Option<(u64, Perm)>,
}

/// Ranges evicted from the cache whose translation a worker may still hold.
#[derive(Debug, Clone)]
pub(crate) struct Evicted {
    /// start -> held range; ranges never overlap.
    ranges: BTreeMap<u64, Held>,
    limit: usize,
}

/// Whether two ranges that touch at `a.last + 1 == b_start` translate as one.
fn continues(a_start: u64, a: &Held, b_start: u64, b: &Held) -> bool {
    match (a.map, b.map) {
        (Some((ta, pa)), Some((tb, pb))) => {
            pa == pb && ta.checked_add(b_start - a_start) == Some(tb)
        }
        _ => false,
    }
}

impl Evicted {
    /// An empty set that coarsens past `limit` ranges (at least 2).
    pub(crate) fn new(limit: usize) -> Self {
        Evicted {
            ranges: BTreeMap::new(),
            limit: limit.max(2),
        }
    }

    /// Ranges held now.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Forget everything (the whole space was invalidated).
    pub(crate) fn clear(&mut self) {
        self.ranges.clear();
    }

    /// `range` translating to `target..` with `perm` left the cache.
    pub(crate) fn insert(&mut self, range: IovaRange, target: u64, perm: Perm) {
        self.remove(range);
        let (mut start, mut held) = (
            range.start(),
            Held {
                last: range.last(),
                map: Some((target, perm)),
            },
        );
        // Join the neighbours that continue the same translation.
        if let Some((&ps, &prev)) = self.ranges.range(..start).next_back() {
            if prev.last.checked_add(1) == Some(start) && continues(ps, &prev, start, &held) {
                self.ranges.remove(&ps);
                held.map = prev.map;
                start = ps;
            }
        }
        if let Some(ns) = held.last.checked_add(1) {
            if let Some(&next) = self.ranges.get(&ns) {
                if continues(start, &held, ns, &next) {
                    self.ranges.remove(&ns);
                    held.last = next.last;
                }
            }
        }
        self.ranges.insert(start, held);
        if self.ranges.len() > self.limit {
            self.coarsen();
        }
    }

    /// Merge neighbours pairwise (halving the count) into ranges of unknown translation.
    fn coarsen(&mut self) {
        let old = std::mem::take(&mut self.ranges);
        let mut it = old.into_iter();
        while let Some((start, a)) = it.next() {
            let last = match it.next() {
                Some((_, b)) => b.last,
                None => a.last,
            };
            self.ranges.insert(start, Held { last, map: None });
        }
    }

    /// No byte of `range` is held any more (it was invalidated or mapped anew).
    pub(crate) fn remove(&mut self, range: IovaRange) {
        // The common case (a fresh page, an UPDATE of bytes nothing evicted) costs two
        // lookups and no allocation.
        if !self.overlaps(range) {
            return;
        }
        let (start, last) = (range.start(), range.last());
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, h)) = self.ranges.range(..start).next_back() {
            if h.last >= start {
                hit.push(s);
            }
        }
        hit.extend(self.ranges.range(start..=last).map(|(&s, _)| s));
        for s in hit {
            let Some(h) = self.ranges.remove(&s) else {
                continue;
            };
            if s < start {
                // Keeps its head: `start > s >= 0`, so `start - 1` does not underflow.
                self.ranges.insert(
                    s,
                    Held {
                        last: start - 1,
                        map: h.map,
                    },
                );
            }
            if h.last > last {
                // Keeps its tail: `last < h.last`, so `last + 1` does not overflow, and the
                // target offset stays inside what the range translated to.
                let map = h
                    .map
                    .and_then(|(t, p)| t.checked_add(last + 1 - s).map(|t| (t, p)));
                self.ranges.insert(last + 1, Held { last: h.last, map });
            }
        }
    }

    /// Whether any byte of `range` is held with a translation other than `target..` with
    /// `perm` (or with one no longer known).
    pub(crate) fn differs(&self, range: IovaRange, target: u64, perm: Perm) -> bool {
        let (start, last) = (range.start(), range.last());
        let before = self
            .ranges
            .range(..start)
            .next_back()
            .filter(|(_, h)| h.last >= start);
        before
            .into_iter()
            .chain(self.ranges.range(start..=last))
            .any(|(&s, h)| match h.map {
                None => true,
                // Same translation: the offset from IOVA to target is the same, and so is
                // the permission (a wider one changes what a copy would refuse).
                Some((t, p)) => p != perm || t.wrapping_sub(s) != target.wrapping_sub(start),
            })
    }

    /// Whether any byte of `range` is held.
    pub(crate) fn overlaps(&self, range: IovaRange) -> bool {
        let before = self
            .ranges
            .range(..range.start())
            .next_back()
            .is_some_and(|(_, h)| h.last >= range.start());
        before
            || self
                .ranges
                .range(range.start()..=range.last())
                .next()
                .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    #[test]
    fn the_same_translation_again_is_no_change() {
        let mut e = Evicted::new(16);
        e.insert(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite);
        assert!(!e.differs(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite));
        assert!(
            !e.differs(r(0x1800, 0x18ff), 0xa800, Perm::ReadWrite),
            "a part of it"
        );
        assert!(
            !e.differs(r(0x0, 0x4fff), 0x9000, Perm::ReadWrite),
            "a larger one"
        );
        assert!(
            e.differs(r(0x1000, 0x1fff), 0xb000, Perm::ReadWrite),
            "another target"
        );
        assert!(
            e.differs(r(0x1000, 0x1fff), 0xa000, Perm::ReadOnly),
            "narrower"
        );
        assert!(
            e.differs(r(0x1ff0, 0x2fff), 0xaff1, Perm::ReadWrite),
            "shifted"
        );
        assert!(!e.differs(r(0x2000, 0x2fff), 0, Perm::ReadOnly), "outside");
    }

    #[test]
    fn removal_trims_and_splits() {
        let mut e = Evicted::new(16);
        e.insert(r(0x1000, 0x4fff), 0xa000, Perm::ReadOnly);
        e.remove(r(0x2000, 0x2fff));
        assert_eq!(e.len(), 2);
        assert!(!e.overlaps(r(0x2000, 0x2fff)));
        assert!(e.overlaps(r(0x1fff, 0x1fff)) && e.overlaps(r(0x3000, 0x3000)));
        // The tail keeps its translation.
        assert!(!e.differs(r(0x3000, 0x3fff), 0xc000, Perm::ReadOnly));
        e.remove(IovaRange::FULL);
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn contiguous_neighbours_join_and_the_bound_holds() {
        let mut e = Evicted::new(8);
        for i in 0..4u64 {
            e.insert(
                r(i << 12, (i << 12) | 0xfff),
                0x10_0000 + (i << 12),
                Perm::ReadWrite,
            );
        }
        assert_eq!(e.len(), 1, "one translation, one range");
        for i in 0..100u64 {
            // Scattered targets: nothing joins.
            e.insert(
                r(0x100_0000 + (i << 13), 0x100_0000 + (i << 13) + 0xfff),
                i << 20,
                Perm::ReadOnly,
            );
            assert!(e.len() <= 8);
        }
        // Coarsened, but still a superset: every inserted byte is reported.
        for i in 0..100u64 {
            assert!(e.differs(
                r(0x100_0000 + (i << 13), 0x100_0000 + (i << 13)),
                i << 20,
                Perm::ReadOnly
            ));
        }
        assert!(!e.overlaps(r(u64::MAX - 10, u64::MAX)));
    }

    #[test]
    fn the_end_of_the_space() {
        let mut e = Evicted::new(4);
        e.insert(
            r(u64::MAX - 0xfff, u64::MAX),
            u64::MAX - 0xfff,
            Perm::ReadWrite,
        );
        assert!(e.overlaps(r(u64::MAX, u64::MAX)));
        e.remove(r(u64::MAX - 0x7ff, u64::MAX - 0x7ff));
        assert_eq!(e.len(), 2);
        assert!(!e.differs(r(u64::MAX, u64::MAX), u64::MAX, Perm::ReadWrite));
    }
}
