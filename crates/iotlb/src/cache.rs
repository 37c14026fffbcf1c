//! The device IOTLB proper: a bounded cache of IOVA -> target translations with permissions.
//!
//! # What it holds
//! Non-overlapping entries `[start, last] -> target, perm`, at most `capacity` of them, indexed
//! by start in an ordered map. An entry's target is an opaque `u64` chosen by the caller (the
//! vhost-user backend stores an address in its own mapping of the front-end's memory, so a hit
//! costs one lookup).
//!
//! # Overlap semantics
//! - **UPDATE**: the newer mapping wins every byte it covers. Older entries that overlap it are
//!   trimmed, split (when the new one sits in their middle) or dropped; they never shadow it.
//! - **INVALIDATE** removes exactly the invalidated bytes, trimming or splitting entries that
//!   stick out of the range; bytes outside it stay cached.
//!
//! Linux keeps overlapping entries side by side (the older one wins lookups until an
//! INVALIDATE) and deletes every entry that overlaps an INVALIDATE whole. Ours is stricter in
//! both directions, and safe: after an UPDATE we translate exactly as the IOMMU now maps (a
//! replaced mapping can no longer be used, which is what invariant 3 of the design asks of an
//! UPDATE that replaces a mapping); after an INVALIDATE no byte of the range translates; and
//! the bytes we keep outside the range are still mapped by the IOMMU, which did not unmap them.
//! Keeping fewer entries than Linux would only cost extra misses, never a wrong access.
//!
//! # Bound and eviction
//! Splits never push the count over `capacity`: room is made first, and if there is none (a
//! capacity of 1) the split-off fragment is dropped, which is always safe for a cache. Victims
//! are chosen by [`crate::policy`] (sampled LFU with history), O(1) per eviction; the index
//! operations around it are O(log n).
//!
//! An evicted translation is still what the IOMMU maps and may still be held outside the cache
//! (a worker's copies, the segments of a chain being walked): it is remembered until its
//! bytes are invalidated or remapped, so that a remap of them counts as a change (see
//! `evicted.rs` and [`Iotlb::generation`]).
//!
//! # Hit path
//! `translate` takes `&self`: a hint table indexed by IOVA page remembers which slot served
//! that page last. A hint is only a guess: it is verified against the slot (which must contain
//! the address), so a stale one costs a fall-back to the ordered index, never a wrong answer.
//! Hints and heat counters are relaxed atomics, so many readers can translate at once (see
//! [`crate::shared`]). Nothing here blocks, allocates on a single-segment hit, or touches
//! guest memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{CapacityError, InvariantViolation, TranslateError, UpdateError};
use crate::evicted::Evicted;
use crate::policy::{self, Ancestry, HeatMap, Policy};
use crate::range::{Access, IovaRange, Perm};
use crate::segments::{Segment, Segments};

/// Default number of entries, as in Linux (`max_iotlb_entries`) and DPDK.
pub const DEFAULT_CAPACITY: usize = 2048;
/// Largest supported capacity (slots are numbered with `u32`, hints stay small).
pub const MAX_CAPACITY: usize = 1 << 24;

/// Largest hint table, in entries (4 MiB of hints).
const MAX_HINTS: usize = 1 << 20;
/// Hints are per 4 KiB page of IOVA.
const HINT_PAGE_SHIFT: u32 = 12;
/// No slot: never a valid slot number since capacity <= 2^24.
const NO_SLOT: u32 = u32::MAX;
/// How many generation changes [`Iotlb::changes_since`] can replay. A holder of translations
/// that falls further behind must drop them all: a worker's copies (cheap to refill), or a
/// chain walk parked on a miss, which then starts over. Only INVALIDATEs of mapped bytes and
/// remapping UPDATEs count, so 1024 spans many round trips of strict-mode traffic.
pub const CHANGE_LOG_LEN: usize = 1024;

/// Evicted ranges remembered per entry of capacity before they are merged (see
/// `evicted.rs`), and at least this many: a merged range has lost its translation, so an
/// UPDATE mapping its pages again as they were counts as a change (a quiescence, and a
/// walk that kept those pages starts over).
const EVICTED_PER_ENTRY: usize = 8;
const EVICTED_MIN: usize = 4096;

/// What an UPDATE did to translations that may be held outside the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Every byte it covers was unmapped, or already translated exactly so (cached, or evicted
    /// with the same translation): no translation anybody holds changed. Needs no quiescence.
    Added,
    /// Some byte it covers was translated otherwise before (a different target or
    /// permission, cached or evicted): like an INVALIDATE of those bytes, the generation
    /// moved, and the caller must quiesce before acknowledging.
    Replaced,
}

impl UpdateOutcome {
    /// Whether a translation handed out before may have become wrong.
    pub fn replaced(self) -> bool {
        self == UpdateOutcome::Replaced
    }
}

/// One cached translation, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The IOVA bytes it covers.
    pub range: IovaRange,
    /// Target address of `range.start()`.
    pub target: u64,
    /// What the device may do through it.
    pub perm: Perm,
}

impl Mapping {
    /// Target address of `iova`; `None` if `iova` is outside `range` (or the target would
    /// overflow, which a mapping from an [`Iotlb`] never does).
    #[inline]
    pub fn target_of(&self, iova: u64) -> Option<u64> {
        if !self.range.contains(iova) {
            return None;
        }
        self.target.checked_add(iova - self.range.start())
    }
}

/// Counters of the cache itself (hits and misses are counted by the caller; see
/// [`crate::SharedIotlb::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// UPDATEs applied.
    pub updates: u64,
    /// INVALIDATEs applied (ranges and whole-space).
    pub invalidations: u64,
    /// Entries evicted to respect the capacity.
    pub evictions: u64,
    /// Split-off fragments dropped because there was no room (capacity 1 only).
    pub dropped_fragments: u64,
    /// Entries cached now.
    pub entries: u64,
    /// The configured bound.
    pub capacity: u64,
    /// See [`Iotlb::generation`].
    pub generation: u64,
}

/// A slab slot. A free slot covers nothing (`start > last`).
#[derive(Clone, Copy)]
struct Slot {
    start: u64,
    last: u64,
    target: u64,
    perm: Perm,
}

impl Slot {
    const FREE: Slot = Slot {
        start: u64::MAX,
        last: 0,
        target: 0,
        perm: Perm::ReadOnly,
    };

    #[inline]
    fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.last
    }

    fn is_live(&self) -> bool {
        self.start <= self.last
    }

    fn mapping(&self) -> Mapping {
        Mapping {
            range: IovaRange::new(self.start, self.last).unwrap_or(IovaRange::FULL),
            target: self.target,
            perm: self.perm,
        }
    }
}

/// The bounded device IOTLB. See the module documentation for its semantics.
pub struct Iotlb {
    /// start -> slot number, one per live entry.
    index: BTreeMap<u64, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Per IOVA page: the slot that served it last (a verified guess).
    hints: Box<[AtomicU32]>,
    hint_shift: u32,
    policy: Policy,
    capacity: usize,
    generation: u64,
    counters: CacheCounters,
    /// The range behind each of the last generation changes, newest last.
    changes: VecDeque<(u64, IovaRange)>,
    /// Evicted translations a worker may still hold.
    evicted: Evicted,
    /// Reused buffer for the slots an operation overlaps.
    scratch: Vec<u32>,
}

impl std::fmt::Debug for Iotlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iotlb")
            .field("entries", &self.index.len())
            .field("capacity", &self.capacity)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// An empty IOTLB with [`DEFAULT_CAPACITY`] entries.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY).unwrap_or_else(|_| unreachable!())
    }

    /// An empty IOTLB holding at most `capacity` entries (`1..=MAX_CAPACITY`).
    pub fn with_capacity(capacity: usize) -> Result<Self, CapacityError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(CapacityError {
                requested: capacity,
                max: MAX_CAPACITY,
            });
        }
        let nhints = (capacity * 2).next_power_of_two().clamp(64, MAX_HINTS);
        Ok(Iotlb {
            index: BTreeMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hints: (0..nhints).map(|_| AtomicU32::new(NO_SLOT)).collect(),
            hint_shift: 64 - nhints.trailing_zeros(),
            policy: Policy::new(capacity),
            capacity,
            generation: 0,
            counters: CacheCounters::default(),
            changes: VecDeque::with_capacity(CHANGE_LOG_LEN),
            evicted: Evicted::new(capacity.saturating_mul(EVICTED_PER_ENTRY).max(EVICTED_MIN)),
            scratch: Vec::new(),
        })
    }

    /// The bound on the number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries cached now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A number that changes whenever a translation that was handed out may have become wrong:
    /// on every INVALIDATE of bytes that were mapped, and on every UPDATE that maps bytes
    /// otherwise than they were ([`UpdateOutcome::Replaced`]). "Mapped" includes entries
    /// this cache evicted, which a caller may still hold a copy of (the IOMMU may remap those
    /// bytes): they are remembered, with their translation, until invalidated or remapped.
    /// An UPDATE of unmapped bytes, or one repeating a translation, leaves it alone: nobody
    /// can hold a translation it changes. Evictions leave it alone too: an evicted
    /// translation is still what the IOMMU maps. [`Iotlb::changes_since`] says which ranges
    /// changed, so that copies outside them can be kept.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The ranges whose translations changed after generation `since`, so that a copy of
    /// entries taken at `since` can drop just those; `None` if the log (the last
    /// [`CHANGE_LOG_LEN`] changes) does not reach back that far: drop everything then.
    pub fn changes_since(&self, since: u64) -> Option<impl Iterator<Item = IovaRange> + '_> {
        if since > self.generation {
            return None;
        }
        // The log holds consecutive generations, newest last: the changes after `since` are
        // its last `generation - since` entries (the whole log must reach back that far).
        let newer = usize::try_from(self.generation - since).ok()?;
        let first = self.changes.len().checked_sub(newer)?;
        Some(self.changes.range(first..).map(|&(_, r)| r))
    }

    fn bump_generation(&mut self, range: IovaRange) {
        self.generation += 1;
        if self.changes.len() == CHANGE_LOG_LEN {
            self.changes.pop_front();
        }
        self.changes.push_back((self.generation, range));
    }

    /// Counters of updates, invalidations, evictions and entries.
    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            entries: self.index.len() as u64,
            capacity: self.capacity as u64,
            generation: self.generation,
            ..self.counters
        }
    }

    pub(crate) fn heat(&self) -> &HeatMap {
        self.policy.heat()
    }

    // ---- lookups -------------------------------------------------------------------------

    #[inline]
    fn hint_index(&self, iova: u64) -> usize {
        ((iova >> HINT_PAGE_SHIFT).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.hint_shift) as usize
    }

    /// The slot whose entry contains `iova`.
    #[inline]
    fn find(&self, iova: u64) -> Option<(usize, &Slot)> {
        let h = self.hint_index(iova);
        let hint = self.hints.get(h)?.load(Ordering::Relaxed) as usize;
        if let Some(slot) = self.slots.get(hint) {
            if slot.contains(iova) {
                return Some((hint, slot));
            }
        }
        self.find_in_index(iova, h)
    }

    fn find_in_index(&self, iova: u64, hint: usize) -> Option<(usize, &Slot)> {
        let (n, slot) = self.index_lookup(iova)?;
        if let Some(h) = self.hints.get(hint) {
            h.store(n as u32, Ordering::Relaxed);
        }
        Some((n, slot))
    }

    /// The slot whose entry contains `iova`, from the ordered index alone.
    fn index_lookup(&self, iova: u64) -> Option<(usize, &Slot)> {
        let (_, &n) = self.index.range(..=iova).next_back()?;
        let slot = self.slots.get(n as usize)?;
        slot.contains(iova).then_some((n as usize, slot))
    }

    /// [`Iotlb::translate`] for a request inside one entry, bypassing the hint table: what a
    /// hit costs when its hint is cold. Benchmarks only.
    #[cfg(feature = "bench-support")]
    #[doc(hidden)]
    pub fn translate_index_only(&self, iova: u64, len: u64, access: Access) -> Option<Segment> {
        let last = iova.checked_add(len.checked_sub(1)?)?;
        let (n, slot) = self.index_lookup(iova)?;
        (last <= slot.last && slot.perm.allows(access)).then(|| {
            policy::touch(self.policy.heat(), n);
            Segment {
                addr: slot.target + (iova - slot.start),
                len,
            }
        })
    }

    /// The entry containing `iova`, if any, and its slot number (for the worker caches).
    pub(crate) fn lookup_slot(&self, iova: u64) -> Option<(usize, Mapping)> {
        self.find(iova).map(|(n, s)| (n, s.mapping()))
    }

    /// The cached entry containing `iova`, if any. Does not count as a hit.
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        self.find(iova).map(|(_, s)| s.mapping())
    }

    /// Walk `[iova, iova + len)`, emitting one segment per entry crossed, or fail at the first
    /// byte (in address order) that is not cached or not allowed.
    #[inline]
    fn walk(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        mut emit: impl FnMut(Segment),
    ) -> Result<(), TranslateError> {
        if len == 0 {
            return Ok(());
        }
        let last = iova
            .checked_add(len - 1)
            .ok_or(TranslateError::Overflow { iova, len })?;
        let heat = self.policy.heat();
        let mut cur = iova;
        loop {
            let Some((n, slot)) = self.find(cur) else {
                return Err(TranslateError::Miss { iova: cur, access });
            };
            if !slot.perm.allows(access) {
                return Err(TranslateError::Denied { iova: cur, access });
            }
            policy::touch(heat, n);
            let end = slot.last.min(last);
            // No overflow: `target + (last - start)` was checked when the entry was stored,
            // and `cur <= end <= last`.
            emit(Segment {
                addr: slot.target + (cur - slot.start),
                len: end - cur + 1,
            });
            if end == last {
                return Ok(());
            }
            cur = end + 1;
        }
    }

    /// Translate `len` bytes at `iova` for `access`.
    ///
    /// Returns one segment per cached entry the bytes cross (adjacent entries are not merged),
    /// or the first failing byte in address order: [`TranslateError::Miss`] where nothing is
    /// cached, [`TranslateError::Denied`] where the entry forbids `access`.
    /// `len == 0` translates to no segments. Counts as a hit for eviction.
    #[inline]
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, TranslateError> {
        // Fast path: the whole request inside the entry that holds its first byte.
        if let Some(last) = len.checked_sub(1).and_then(|l| iova.checked_add(l)) {
            if let Some((n, slot)) = self.find(iova) {
                if last <= slot.last && slot.perm.allows(access) {
                    policy::touch(self.policy.heat(), n);
                    return Ok(Segments::single(Segment {
                        addr: slot.target + (iova - slot.start),
                        len,
                    }));
                }
            }
        }
        let mut out = Segments::new();
        self.walk(iova, len, access, |s| out.push(s))?;
        Ok(out)
    }

    /// Like [`Iotlb::translate`], appending to `out`; on error `out` is left as it was.
    pub fn translate_into(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), TranslateError> {
        let mark = out.len();
        let r = self.walk(iova, len, access, |s| out.push(s));
        if r.is_err() {
            out.truncate(mark);
        }
        r
    }

    /// Whether any cached entry shares a byte with `range`.
    pub fn overlaps(&self, range: IovaRange) -> bool {
        let before = self
            .index
            .range(..range.start())
            .next_back()
            .and_then(|(_, &n)| self.slots.get(n as usize))
            .is_some_and(|s| s.last >= range.start());
        before
            || self
                .index
                .range(range.start()..=range.last())
                .next()
                .is_some()
    }

    /// Every cached entry, in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.index
            .values()
            .filter_map(|&n| self.slots.get(n as usize).map(Slot::mapping))
    }

    // ---- updates ---------------------------------------------------------------------------

    /// Apply an UPDATE: from now on `range` translates to `target..` with `perm`.
    ///
    /// Overlapped bytes of older entries are replaced (see the module doc). Fails, changing
    /// nothing, if the target range would run past 2^64. Says whether a translation handed
    /// out before may have changed (see [`Iotlb::generation`]).
    pub fn update(
        &mut self,
        range: IovaRange,
        target: u64,
        perm: Perm,
    ) -> Result<UpdateOutcome, UpdateError> {
        let (start, last) = (range.start(), range.last());
        if target.checked_add(last - start).is_none() {
            return Err(UpdateError::TargetOverflow { range, target });
        }
        self.counters.updates += 1;

        // The same UPDATE again (a retried miss, two queues racing): nothing changes.
        if let Some(&n) = self.index.get(&start) {
            if let Some(s) = self.slots.get(n as usize) {
                if s.last == last && s.target == target && s.perm == perm {
                    policy::touch(self.policy.heat(), n as usize);
                    return Ok(UpdateOutcome::Added);
                }
            }
        }

        let new = Slot {
            start,
            last,
            target,
            perm,
        };
        // A remap of bytes a worker may hold, cached or evicted, takes their old translation
        // away: it is a change. Mapping unmapped bytes, or bytes evicted with this very
        // translation, is not.
        let held_otherwise = self.evicted.take(range, target, perm);
        let outcome = if held_otherwise || self.cache_differs(range, target, perm) {
            self.bump_generation(range);
            UpdateOutcome::Replaced
        } else {
            UpdateOutcome::Added
        };
        let tail = self.carve(range);
        self.make_room(1 + usize::from(tail.is_some()));
        self.insert(new, None);
        if let Some((tail, from)) = tail {
            self.insert_fragment(tail, from);
        }
        Ok(outcome)
    }

    /// Whether a cached entry translates a byte of `range` otherwise than `target..`, `perm`.
    fn cache_differs(&self, range: IovaRange, target: u64, perm: Perm) -> bool {
        let (start, last) = (range.start(), range.last());
        let before = self
            .index
            .range(..start)
            .next_back()
            .filter(|(_, &n)| self.slots.get(n as usize).is_some_and(|s| s.last >= start));
        before
            .into_iter()
            .chain(self.index.range(start..=last))
            .any(|(_, &n)| {
                self.slots.get(n as usize).is_none_or(|s| {
                    s.perm != perm || s.target.wrapping_sub(s.start) != target.wrapping_sub(start)
                })
            })
    }

    /// Apply an INVALIDATE of `range`: no byte of it translates afterwards. Returns whether
    /// a translation handed out before may have changed: false when no byte of `range` was
    /// mapped, cached or evicted (the generation stays; nobody needs to quiesce).
    pub fn invalidate(&mut self, range: IovaRange) -> bool {
        self.counters.invalidations += 1;
        if range == IovaRange::FULL {
            self.bump_generation(range);
            self.evicted.clear();
            self.clear_entries();
            return true;
        }
        let held = self.evicted.overlaps(range);
        if !held && !self.overlaps(range) {
            return false;
        }
        self.bump_generation(range);
        if held {
            self.evicted.remove(range);
        }
        let tail = self.carve(range);
        if let Some((tail, from)) = tail {
            self.make_room(1);
            self.insert_fragment(tail, from);
        }
        true
    }

    /// Apply an INVALIDATE of the whole IOVA space (a size-0 INVALIDATE on the wire, a reset,
    /// a new memory table).
    pub fn invalidate_all(&mut self) {
        self.invalidate(IovaRange::FULL);
    }

    /// Evicted ranges remembered now (see `evicted.rs`).
    pub fn evicted_ranges(&self) -> usize {
        self.evicted.len()
    }

    fn clear_entries(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.policy.clear();
        for h in self.hints.iter() {
            h.store(NO_SLOT, Ordering::Relaxed);
        }
    }

    /// Remove every byte of `range` from the cached entries.
    ///
    /// Returns the piece beyond `range` when one entry stuck out on both sides, with what it
    /// inherits from that entry. The caller inserts that piece once it has made room.
    fn carve(&mut self, range: IovaRange) -> Option<(Slot, Ancestry)> {
        let (start, last) = (range.start(), range.last());
        let mut overlapped = std::mem::take(&mut self.scratch);
        overlapped.clear();
        if let Some((_, &n)) = self.index.range(..start).next_back() {
            if self.slots.get(n as usize).is_some_and(|s| s.last >= start) {
                overlapped.push(n);
            }
        }
        overlapped.extend(self.index.range(start..=last).map(|(_, &n)| n));

        let mut tail = None;
        for &n in &overlapped {
            let n = n as usize;
            let Some(&old) = self.slots.get(n) else {
                continue;
            };
            let keeps_head = old.start < start;
            let keeps_tail = old.last > last;
            if keeps_tail {
                // `last < old.last <= u64::MAX`, so `last + 1` does not overflow; the target
                // offset stays within the range checked when `old` was stored.
                let piece = Slot {
                    start: last + 1,
                    last: old.last,
                    target: old.target + (last + 1 - old.start),
                    perm: old.perm,
                };
                if keeps_head {
                    tail = Some((piece, self.policy.ancestry(n)));
                } else {
                    self.index.remove(&old.start);
                    self.index.insert(piece.start, n as u32);
                    self.slots[n] = piece;
                }
            }
            if keeps_head {
                // `start > old.start >= 0`, so `start - 1` does not underflow.
                self.slots[n].last = start - 1;
            } else if !keeps_tail {
                self.remove(n);
                self.policy.forget(n);
            }
        }
        self.scratch = overlapped;
        tail
    }

    /// Evict until `need` more entries fit, or nothing is left to evict.
    fn make_room(&mut self, need: usize) {
        while self.index.len() + need > self.capacity {
            let slots = &self.slots;
            let Some(victim) = self
                .policy
                .choose_victim(slots.len(), |i| slots.get(i).is_some_and(Slot::is_live))
            else {
                return;
            };
            let v = self.slots[victim];
            let start = v.start;
            // Still what the IOMMU maps, and maybe in a worker's hands.
            if let Ok(range) = IovaRange::new(v.start, v.last) {
                self.evicted.insert(range, v.target, v.perm);
            }
            self.remove(victim);
            self.policy.evicted(victim, start);
            self.counters.evictions += 1;
            tracing::trace!(
                iova = %format_args!("{start:#x}"),
                "iotlb: evicted entry"
            );
        }
    }

    fn remove(&mut self, n: usize) {
        if let Some(slot) = self.slots.get_mut(n) {
            self.index.remove(&slot.start);
            *slot = Slot::FREE;
            self.free.push(n as u32);
        }
    }

    /// Store `slot` in a free slot; the caller made room. Returns the slot number.
    fn insert(&mut self, slot: Slot, ancestry: Option<Ancestry>) -> Option<usize> {
        if self.index.len() >= self.capacity {
            return None;
        }
        let n = match self.free.pop() {
            Some(n) => n as usize,
            None => {
                self.slots.push(Slot::FREE);
                self.slots.len() - 1
            }
        };
        self.slots[n] = slot;
        self.index.insert(slot.start, n as u32);
        match ancestry {
            Some(a) => self.policy.inherit(n, a),
            None => self.policy.admit(n, slot.start),
        }
        Some(n)
    }

    fn insert_fragment(&mut self, piece: Slot, ancestry: Ancestry) {
        if self.insert(piece, Some(ancestry)).is_none() {
            self.counters.dropped_fragments += 1;
            // Dropped like an eviction: still mapped, maybe held.
            if let Ok(range) = IovaRange::new(piece.start, piece.last) {
                self.evicted.insert(range, piece.target, piece.perm);
            }
        }
    }

    /// Check every internal invariant; `Err` names the first one broken. O(n). For tests and
    /// fuzzing.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let broken = |why: String| Err(InvariantViolation(why));
        if self.index.len() > self.capacity {
            return broken(format!(
                "{} entries over capacity {}",
                self.index.len(),
                self.capacity
            ));
        }
        let mut prev_last: Option<u64> = None;
        let mut live = 0usize;
        for (&start, &n) in &self.index {
            let s = self
                .slots
                .get(n as usize)
                .ok_or_else(|| InvariantViolation(format!("index points at missing slot {n}")))?;
            if s.start != start || !s.is_live() {
                return broken(format!("slot {n} does not hold the entry at {start:#x}"));
            }
            if s.target.checked_add(s.last - s.start).is_none() {
                return broken(format!("slot {n}: target range overflows"));
            }
            if prev_last.is_some_and(|p| p >= start) {
                return broken(format!("entry at {start:#x} overlaps its predecessor"));
            }
            prev_last = Some(s.last);
            live += 1;
        }
        let free_ok = self
            .free
            .iter()
            .all(|&n| self.slots.get(n as usize).is_some_and(|s| !s.is_live()));
        if !free_ok || live + self.free.len() != self.slots.len() {
            return broken("slab and free list disagree".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
