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
//! Two tiers, because this sits on the eviction path of a thrashing IOTLB: ranges that are
//! exactly one aligned 4 KiB page (what QEMU answers misses with) live in a hash map, one
//! lookup each; any other range lives in an ordered map. The two never overlap.
//!
//! Bounded: past its limit, neighbouring ranges are merged pairwise into ranges whose
//! translation is unknown (any UPDATE or INVALIDATE over them counts as a change).
//! Over-approximating costs a quiescence at worst, never a missed one.
//!
//! Plain bookkeeping: no lock, no I/O, nothing that can panic on any input.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::range::{IovaRange, Perm};

/// The page of the hash tier: the page MISSes are keyed by, which QEMU answers with.
const PAGE: u64 = crate::pending::MISS_PAGE_SIZE;

/// One evicted range: its last byte and, unless merged, its translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    last: u64,
    /// `(target of the range's first byte, perm)`; `None` once merged with a neighbour.
    map: Option<(u64, Perm)>,
}

/// A multiplicative hash of a page address (the keys are not chosen by anybody who gains
/// from collisions but the guest, whose worst case is a slower eviction).
#[derive(Default)]
struct PageHash(u64);

impl Hasher for PageHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Ranges evicted from the cache whose translation a worker may still hold.
#[derive(Debug, Clone)]
pub(crate) struct Evicted {
    /// Aligned 4 KiB pages: page address -> (target, perm).
    pages: HashMap<u64, (u64, Perm), BuildHasherDefault<PageHash>>,
    /// Every other range: start -> held range.
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

/// Whether `held`, a range starting at `s`, translates otherwise than `[start..]` to
/// `target..` with `perm`: another offset from IOVA to target, another permission (a wider
/// one changes what a copy would refuse), or an unknown translation.
fn other(s: u64, held: Option<(u64, Perm)>, start: u64, target: u64, perm: Perm) -> bool {
    match held {
        None => true,
        Some((t, p)) => p != perm || t.wrapping_sub(s) != target.wrapping_sub(start),
    }
}

/// The page `range` is, if it is exactly one aligned 4 KiB page.
fn as_page(range: IovaRange) -> Option<u64> {
    (range.start() % PAGE == 0 && range.size() == Some(PAGE)).then_some(range.start())
}

impl Evicted {
    /// An empty set that coarsens past `limit` ranges (at least 2).
    pub(crate) fn new(limit: usize) -> Self {
        Evicted {
            pages: HashMap::default(),
            ranges: BTreeMap::new(),
            limit: limit.max(2),
        }
    }

    /// Ranges held now.
    pub(crate) fn len(&self) -> usize {
        self.pages.len() + self.ranges.len()
    }

    /// Forget everything (the whole space was invalidated).
    pub(crate) fn clear(&mut self) {
        self.pages.clear();
        self.ranges.clear();
    }

    /// The ordered tier's range with the greatest start at or before `last`, if it reaches
    /// `start`: the last one (in IOVA order) overlapping `[start, last]`.
    fn last_overlapping(&self, start: u64, last: u64) -> Option<(u64, Held)> {
        if self.ranges.is_empty() {
            return None;
        }
        let (&s, &h) = self.ranges.range(..=last).next_back()?;
        (h.last >= start).then_some((s, h))
    }

    /// The hash tier's pages overlapping `range`, with their translation: by lookup when the
    /// range spans fewer pages than the tier holds, by a scan otherwise.
    fn pages_in(&self, range: IovaRange) -> Vec<(u64, (u64, Perm))> {
        if self.pages.is_empty() {
            return Vec::new();
        }
        let (first, last) = (range.start() / PAGE, range.last() / PAGE);
        if last - first < self.pages.len() as u64 {
            (first..=last)
                .filter_map(|i| self.pages.get(&(i * PAGE)).map(|&m| (i * PAGE, m)))
                .collect()
        } else {
            self.pages
                .iter()
                .filter(|(&p, _)| p <= range.last() && p + (PAGE - 1) >= range.start())
                .map(|(&p, &m)| (p, m))
                .collect()
        }
    }

    /// `range` translating to `target..` with `perm` left the cache.
    pub(crate) fn insert(&mut self, range: IovaRange, target: u64, perm: Perm) {
        match as_page(range) {
            // The common case: one lookup (a merged range may cover it: then as any range).
            Some(p) if self.last_overlapping(p, p + (PAGE - 1)).is_none() => {
                self.pages.insert(p, (target, perm));
            }
            _ => self.insert_range(range, target, perm),
        }
        if self.len() > self.limit {
            self.coarsen();
        }
    }

    /// Insert into the ordered tier, joining neighbours that continue the translation.
    fn insert_range(&mut self, range: IovaRange, target: u64, perm: Perm) {
        self.take(range, target, perm);
        let (mut start, mut held) = (
            range.start(),
            Held {
                last: range.last(),
                map: Some((target, perm)),
            },
        );
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
    }

    /// Merge neighbours pairwise (halving the count) into ranges of unknown translation.
    fn coarsen(&mut self) {
        let mut all: Vec<(u64, u64)> = self
            .pages
            .drain()
            .map(|(p, _)| (p, p + (PAGE - 1)))
            .chain(
                std::mem::take(&mut self.ranges)
                    .into_iter()
                    .map(|(s, h)| (s, h.last)),
            )
            .collect();
        all.sort_unstable();
        for pair in all.chunks(2) {
            if let (Some(a), Some(b)) = (pair.first(), pair.last()) {
                self.ranges.insert(
                    a.0,
                    Held {
                        last: b.1,
                        map: None,
                    },
                );
            }
        }
    }

    /// No byte of `range` is held any more (it was invalidated or mapped anew).
    pub(crate) fn remove(&mut self, range: IovaRange) {
        self.take(range, 0, Perm::ReadOnly);
    }

    /// Forget every held byte of `range`, which is now mapped to `target..` with `perm`;
    /// returns whether any of them was held with another translation (or an unknown one).
    /// One lookup for a page-sized UPDATE when nothing else is held there.
    pub(crate) fn take(&mut self, range: IovaRange, target: u64, perm: Perm) -> bool {
        let (start, last) = (range.start(), range.last());
        let mut differs = false;
        if let Some(p) = as_page(range) {
            if let Some((t, q)) = self.pages.remove(&p) {
                differs |= other(p, Some((t, q)), start, target, perm);
            }
        } else {
            for (p, (t, q)) in self.pages_in(range) {
                self.pages.remove(&p);
                differs |= other(p, Some((t, q)), start, target, perm);
                // The bytes of the page outside `range` are still held: into the ordered
                // tier (they overlap nothing there: the tiers are disjoint).
                if p < start {
                    // `start > p`: no underflow.
                    self.ranges.insert(
                        p,
                        Held {
                            last: start - 1,
                            map: Some((t, q)),
                        },
                    );
                }
                let end = p + (PAGE - 1);
                if end > last {
                    // `last < end`: no overflow; the offset stays inside the page.
                    self.ranges.insert(
                        last + 1,
                        Held {
                            last: end,
                            map: Some((t + (last + 1 - p), q)),
                        },
                    );
                }
            }
        }
        // From the last overlapping range backwards: each step removes one, and ends once a
        // range starting at or before `start` was dealt with (nothing before it overlaps).
        while let Some((s, h)) = self.last_overlapping(start, last) {
            differs |= other(s, h.map, start, target, perm);
            self.ranges.remove(&s);
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
            if s <= start {
                break;
            }
        }
        differs
    }

    /// Whether any byte of `range` is held.
    pub(crate) fn overlaps(&self, range: IovaRange) -> bool {
        let page_held = match as_page(range) {
            Some(p) => self.pages.contains_key(&p),
            None => !self.pages_in(range).is_empty(),
        };
        page_held || self.last_overlapping(range.start(), range.last()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    /// `take` on a copy: whether an UPDATE would count as a change, leaving `e` as it is.
    fn differs(e: &Evicted, range: IovaRange, target: u64, perm: Perm) -> bool {
        e.clone().take(range, target, perm)
    }

    #[test]
    fn the_same_translation_again_is_no_change() {
        for page in [true, false] {
            let mut e = Evicted::new(16);
            let (start, last) = if page {
                (0x1000, 0x1fff)
            } else {
                (0x1000, 0x2fff)
            };
            e.insert(r(start, last), 0xa000, Perm::ReadWrite);
            assert!(!differs(&e, r(start, last), 0xa000, Perm::ReadWrite));
            assert!(
                !differs(&e, r(0x1800, 0x18ff), 0xa800, Perm::ReadWrite),
                "a part of it"
            );
            assert!(
                !differs(&e, r(0x0, 0x4fff), 0x9000, Perm::ReadWrite),
                "a larger one"
            );
            assert!(
                differs(&e, r(start, last), 0xb000, Perm::ReadWrite),
                "another target"
            );
            assert!(
                differs(&e, r(start, last), 0xa000, Perm::ReadOnly),
                "narrower"
            );
            assert!(
                differs(&e, r(0x1ff0, 0x2fff), 0xaff1, Perm::ReadWrite),
                "shifted"
            );
            assert!(
                !differs(&e, r(0x3000, 0x3fff), 0, Perm::ReadOnly),
                "outside"
            );
            // Taking removes.
            assert!(!e.take(r(start, last), 0xa000, Perm::ReadWrite));
            assert_eq!(e.len(), 0);
        }
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
        assert!(!differs(&e, r(0x3000, 0x3fff), 0xc000, Perm::ReadOnly));
        // A byte of a page in the hash tier, and a range over pages of both tiers.
        e.insert(r(0x8000, 0x8fff), 0x1_0000, Perm::ReadWrite);
        assert!(e.overlaps(r(0x8800, 0x8800)));
        assert!(e.overlaps(r(0x7000, 0x9fff)));
        e.remove(r(0x8800, 0x8800));
        assert!(!e.overlaps(r(0x8800, 0x8800)));
        assert!(
            e.overlaps(r(0x87ff, 0x87ff)) && e.overlaps(r(0x8801, 0x8801)),
            "the rest"
        );
        assert!(!differs(&e, r(0x8801, 0x8fff), 0x1_0801, Perm::ReadWrite));
        assert!(differs(&e, r(0x8000, 0x80ff), 0x2_0000, Perm::ReadWrite));
        e.remove(IovaRange::FULL);
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn contiguous_neighbours_join_and_the_bound_holds() {
        let mut e = Evicted::new(8);
        for i in 0..4u64 {
            e.insert(
                r(0x10_0000 + (i << 13), 0x10_0000 + (i << 13) + 0x1fff),
                0x100_0000 + (i << 13),
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
            let page = 0x100_0000 + (i << 13);
            assert!(differs(&e, r(page, page + 0xfff), i << 20, Perm::ReadOnly));
            assert!(e.overlaps(r(page, page)));
        }
        assert!(!e.overlaps(r(u64::MAX - 10, u64::MAX)));
    }

    #[test]
    fn the_end_of_the_space() {
        let mut e = Evicted::new(4);
        let top = u64::MAX - 0xfff;
        e.insert(r(top, u64::MAX), top, Perm::ReadWrite);
        assert!(e.overlaps(r(u64::MAX, u64::MAX)));
        assert!(!differs(&e, r(top, u64::MAX), top, Perm::ReadWrite));
        e.remove(r(u64::MAX - 0x7ff, u64::MAX - 0x7ff));
        assert!(!e.overlaps(r(u64::MAX - 0x7ff, u64::MAX - 0x7ff)));
        assert!(
            e.overlaps(r(u64::MAX, u64::MAX)),
            "the page's tail is still held"
        );
        assert!(!differs(
            &e,
            r(u64::MAX, u64::MAX),
            u64::MAX,
            Perm::ReadWrite
        ));
        e.remove(r(u64::MAX - 0x7fe, u64::MAX));
        assert!(!e.overlaps(r(u64::MAX - 0x7fe, u64::MAX)));
        assert!(e.overlaps(r(top, top)));
    }
}
