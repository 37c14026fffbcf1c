//! Walking one descriptor chain into a [`Chain`], resumable across misses.
//!
//! A [`Walk`] reads the chain at the head of the avail ring descriptor by descriptor and
//! translates each buffer. When a translation misses it stops *where it is*: the segments
//! translated so far, the descriptor being translated and how far into it, the counts that
//! bound the walk. The queue parks; after the UPDATE it goes on from that point, instead of
//! walking again from the head. So a chain needing more IOTLB entries than the cache holds
//! still finishes: pages translated earlier may be evicted meanwhile, but their segments
//! are kept.
//!
//! Why kept segments stay safe to use: each resumption first asks the translator whether any
//! change since the walk's generation touched an IOVA range the walk translated
//! ([`Translator::stale_any`]). Evictions are no change (the IOMMU still maps those bytes);
//! an INVALIDATE or a remapping UPDATE of those bytes is, and the walk then starts over from
//! the head. Inside one unit of work the back-end's quiescence covers the rest: a change
//! acknowledged while a walk is parked is seen by the next check, one applied during the
//! unit of work is not acknowledged before it ends.
//!
//! Translated segments adjacent in guest-physical memory are merged (a 4 MiB buffer of
//! 4 KiB IOTLB pages over contiguous memory is one segment, not 1024). The only limits are
//! the ones given in [`ChainLimits`] (the device's, from its config space) and the ring's
//! own (a table walked longer than its size is a loop). They are checked on a descriptor
//! before its buffer is translated, so no MISS is ever sent for a chain that will be refused.
//!
//! Nothing here touches guest memory except through the ring areas' readers, never blocks,
//! never sends anything.

use std::num::Wrapping;

use iotlb::{Access, IovaRange, Segment};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::chain::{Chain, ChainError, Descriptor};
use crate::ring::{RingArea, RingError, DESC_SIZE};
use crate::translate::{Fault, Translator};

/// Largest indirect table accepted, in descriptors.
pub const MAX_INDIRECT: u64 = 65536;

/// The limits a device puts on one chain (from what it advertises, e.g. virtio-blk's
/// `seg_max` and `size_max`). A chain beyond them is refused with
/// [`ChainError::TooManyDescriptors`] or [`ChainError::DescriptorTooLong`] before any of its
/// buffers is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLimits {
    /// Most descriptors in a chain, indirect-table entries included (the descriptor that
    /// points to an indirect table is not counted).
    pub max_descriptors: u32,
    /// Longest buffer one descriptor may describe, in bytes.
    pub max_descriptor_len: u32,
}

impl ChainLimits {
    /// No limit but the ring's own.
    pub const NONE: ChainLimits = ChainLimits {
        max_descriptors: u32::MAX,
        max_descriptor_len: u32::MAX,
    };
}

impl Default for ChainLimits {
    fn default() -> Self {
        Self::NONE
    }
}

/// Why a walk stopped before the chain's end.
#[derive(Debug)]
pub(crate) enum Stop {
    /// A translation failed: a miss (the walk can go on later), or a denial or bad address.
    Fault(Fault),
    /// The chain is malformed or beyond the limits.
    Invalid(ChainError),
    /// A ring area could not be read.
    Ring(RingError),
}

/// Where the next descriptor is.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Descriptor `index` of the ring's table.
    Main(u16),
    /// Entry `next` of the indirect table (of `entries` descriptors) the queue's indirect area
    /// points at.
    Indirect { entries: u64, next: u64 },
}

/// The areas and rules a walk reads.
pub(crate) struct Areas<'q> {
    pub desc: &'q RingArea,
    pub indirect: &'q mut RingArea,
    pub size: u16,
    pub limits: ChainLimits,
    pub scratch: &'q mut Vec<Segment>,
}

/// A chain walk in progress (or finished, not yet handed out).
#[derive(Debug)]
pub(crate) struct Walk {
    /// Whether the state below describes a walk.
    active: bool,
    /// The avail index whose chain this is.
    avail: Wrapping<u16>,
    head: u16,
    at: Position,
    /// The descriptor being translated, its index (errors only), and its bytes done.
    current: Option<(Descriptor, u16, u64)>,
    /// Descriptors read from the current table (loop bound).
    in_table: u32,
    /// Descriptors in all (the device's limit).
    total: u32,
    seen_writable: bool,
    /// IOVA ranges translated so far (and the indirect table's), merged when adjacent.
    translated: Vec<IovaRange>,
    /// The translator generation the kept segments are known valid at.
    generation: u64,
    chain: Chain,
}

impl Walk {
    pub(crate) fn new() -> Self {
        Walk {
            active: false,
            avail: Wrapping(0),
            head: 0,
            at: Position::Main(0),
            current: None,
            in_table: 0,
            total: 0,
            seen_writable: false,
            translated: Vec::new(),
            generation: 0,
            chain: Chain::new(),
        }
    }

    /// Forget the walk (its avail entry was consumed, or the queue was reconfigured).
    pub(crate) fn cancel(&mut self) {
        self.active = false;
    }

    /// Whether a walk of the chain at avail index `avail` is in progress.
    pub(crate) fn is_walking(&self, avail: Wrapping<u16>) -> bool {
        self.active && self.avail == avail
    }

    /// The chain's head (meaningful while walking).
    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    /// The IOVA ranges translated so far (empty when no walk is in progress).
    pub(crate) fn translated(&self) -> &[IovaRange] {
        if self.active {
            &self.translated
        } else {
            &[]
        }
    }

    /// Start walking the chain at `head`, the entry at avail index `avail`, in the descriptor
    /// table at IOVAs `table` (a change to it while the walk is parked starts it over too).
    pub(crate) fn start(
        &mut self,
        avail: Wrapping<u16>,
        head: u16,
        generation: u64,
        table: Option<IovaRange>,
    ) {
        self.active = true;
        self.avail = avail;
        self.head = head;
        self.at = Position::Main(head);
        self.current = None;
        self.in_table = 0;
        self.total = 0;
        self.seen_writable = false;
        self.translated.clear();
        self.translated.extend(table);
        self.generation = generation;
        self.chain.clear();
        self.chain.head = head;
    }

    /// Before going on at generation `now`: false if a change since the walk's generation
    /// touched what it translated (it must start over).
    pub(crate) fn still_valid<T: Translator + ?Sized>(&mut self, tr: &T, now: u64) -> bool {
        if now != self.generation && tr.stale_any(self.generation, &self.translated) {
            return false;
        }
        self.generation = now;
        true
    }

    /// Hand the finished chain out (swapped with `out`, so buffers are reused).
    pub(crate) fn finish(&mut self, out: &mut Chain) {
        std::mem::swap(&mut self.chain, out);
        self.active = false;
    }

    fn record(&mut self, range: IovaRange) {
        if let Some(last) = self.translated.last_mut() {
            if last.last().checked_add(1) == Some(range.start()) {
                if let Ok(joined) = IovaRange::new(last.start(), range.last()) {
                    *last = joined;
                    return;
                }
            }
        }
        self.translated.push(range);
    }

    /// Walk on until the chain ends or something stops it.
    pub(crate) fn run<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        a: &mut Areas<'_>,
        tr: &mut T,
        mem: &M,
    ) -> Result<(), Stop> {
        loop {
            let (d, index, done) = match self.current {
                Some(c) => c,
                None => match self.next_descriptor(a, tr, mem)? {
                    Some((d, index)) => {
                        self.begin(a, &d, index)?;
                        (d, index, 0)
                    }
                    None => continue, // entered an indirect table
                },
            };
            self.translate(a, tr, mem, &d, index, done)?;
            self.current = None;
            if !d.has_next() {
                return Ok(());
            }
            self.at = match self.at {
                Position::Main(_) => {
                    if d.next >= a.size {
                        return Err(Stop::Invalid(ChainError::NextOutOfRange {
                            index,
                            next: d.next,
                            table: a.size.into(),
                        }));
                    }
                    Position::Main(d.next)
                }
                Position::Indirect { entries, .. } => {
                    if u64::from(d.next) >= entries {
                        return Err(Stop::Invalid(ChainError::NextOutOfRange {
                            index,
                            next: d.next,
                            table: entries.min(u64::from(u32::MAX)) as u32,
                        }));
                    }
                    Position::Indirect {
                        entries,
                        next: u64::from(d.next),
                    }
                }
            };
        }
    }

    /// Read the descriptor at the walk's position. `None` when it pointed to an indirect
    /// table, which the walk enters.
    fn next_descriptor<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        a: &mut Areas<'_>,
        tr: &mut T,
        mem: &M,
    ) -> Result<Option<(Descriptor, u16)>, Stop> {
        let mut raw = [0u8; 16];
        match self.at {
            Position::Main(index) => {
                self.count(u32::from(a.size))?;
                a.desc
                    .read(mem, u64::from(index) * DESC_SIZE, &mut raw)
                    .map_err(Stop::Ring)?;
                let d = Descriptor::from_bytes(&raw);
                if !d.is_indirect() {
                    return Ok(Some((d, index)));
                }
                if d.has_next() {
                    return Err(Stop::Invalid(ChainError::IndirectWithNext { index }));
                }
                let entries = u64::from(d.len) / DESC_SIZE;
                if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 || entries > MAX_INDIRECT {
                    return Err(Stop::Invalid(ChainError::IndirectLength { len: d.len }));
                }
                // A table holding more descriptors than a chain may have is refused before
                // it is translated (up to 1 MiB of it otherwise: 256 MISSes for nothing).
                let allowed = u64::from(a.limits.max_descriptors.saturating_sub(self.total));
                if entries > allowed {
                    return Err(Stop::Invalid(ChainError::TooManyDescriptors {
                        limit: a.limits.max_descriptors,
                    }));
                }
                let Ok(table) = IovaRange::from_size(d.addr, u64::from(d.len)) else {
                    return Err(Stop::Invalid(ChainError::BadAddress {
                        addr: d.addr,
                        len: d.len.into(),
                    }));
                };
                // An indirect table is limited by its own size (as Linux and QEMU do), so
                // that a table of `size` entries (header, `seg_max` buffers, status) fits.
                a.indirect.set(d.addr, u64::from(d.len));
                self.record(table);
                self.in_table = 0;
                self.at = Position::Indirect { entries, next: 0 };
                Ok(None)
            }
            Position::Indirect { entries, next } => {
                // Translated when entered, and again if a change touched it since.
                a.indirect.ensure(tr, mem).map_err(|e| match e {
                    RingError::Fault { fault, .. } => Stop::Fault(fault),
                    other => Stop::Ring(other),
                })?;
                self.count(entries as u32)?;
                a.indirect
                    .read(mem, next * DESC_SIZE, &mut raw)
                    .map_err(|_| {
                        Stop::Invalid(ChainError::BadAddress {
                            addr: a.indirect.addr(),
                            len: entries * DESC_SIZE,
                        })
                    })?;
                let d = Descriptor::from_bytes(&raw);
                if d.is_indirect() {
                    return Err(Stop::Invalid(ChainError::NestedIndirect));
                }
                // `next < entries <= MAX_INDIRECT` (65536): the index fits in a u16 but for
                // the last entry of the largest table, reported truncated (errors only).
                Ok(Some((d, next as u16)))
            }
        }
    }

    /// One more descriptor of the current table: refuse tables walked longer than `limit`
    /// (loops included).
    fn count(&mut self, limit: u32) -> Result<(), Stop> {
        self.in_table += 1;
        if self.in_table > limit {
            return Err(Stop::Invalid(ChainError::TooLong { limit }));
        }
        Ok(())
    }

    /// Check a descriptor met for the first time and account for it.
    fn begin(&mut self, a: &Areas<'_>, d: &Descriptor, index: u16) -> Result<(), Stop> {
        let write = d.is_write();
        if !write && self.seen_writable {
            return Err(Stop::Invalid(ChainError::ReadableAfterWritable { index }));
        }
        self.total = self.total.saturating_add(1);
        if self.total > a.limits.max_descriptors {
            return Err(Stop::Invalid(ChainError::TooManyDescriptors {
                limit: a.limits.max_descriptors,
            }));
        }
        if d.len > a.limits.max_descriptor_len {
            return Err(Stop::Invalid(ChainError::DescriptorTooLong {
                index,
                len: d.len,
                limit: a.limits.max_descriptor_len,
            }));
        }
        self.seen_writable |= write;
        let c = &mut self.chain;
        c.descriptors = c.descriptors.saturating_add(1);
        let total = if write {
            &mut c.writable_len
        } else {
            &mut c.readable_len
        };
        *total = total
            .checked_add(d.len)
            .ok_or(Stop::Invalid(ChainError::LengthOverflow))?;
        if c.readable_len.checked_add(c.writable_len).is_none() {
            return Err(Stop::Invalid(ChainError::LengthOverflow));
        }
        self.current = Some((*d, index, 0));
        Ok(())
    }

    /// Translate what is left of descriptor `d` (`done` bytes of it are). On a miss, what
    /// lies before the missing byte is kept and the walk remembers how far it got.
    fn translate<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        a: &mut Areas<'_>,
        tr: &mut T,
        mem: &M,
        d: &Descriptor,
        index: u16,
        done: u64,
    ) -> Result<(), Stop> {
        let len = u64::from(d.len);
        if done >= len {
            return Ok(());
        }
        let access = if d.is_write() {
            Access::Write
        } else {
            Access::Read
        };
        let Some(cur) = d.addr.checked_add(done) else {
            return Err(Stop::Fault(Fault::BadAddress { addr: d.addr, len }));
        };
        let left = len - done;
        a.scratch.clear();
        match tr.translate(cur, left, access, a.scratch) {
            Ok(()) => {
                self.keep(a, mem, cur, left, d.is_write())?;
                Ok(())
            }
            Err(Fault::Miss { iova, access }) => {
                // Keep the part before the missing byte, if it still translates now.
                if iova > cur && iova - cur < left {
                    a.scratch.clear();
                    if tr.translate(cur, iova - cur, access, a.scratch).is_ok() {
                        self.keep(a, mem, cur, iova - cur, d.is_write())?;
                        self.current = Some((*d, index, done + (iova - cur)));
                    }
                }
                Err(Stop::Fault(Fault::Miss { iova, access }))
            }
            Err(other) => Err(Stop::Fault(other)),
        }
    }

    /// Add the segments in `a.scratch` (the translation of `len` bytes at IOVA `iova`) to the
    /// chain, merging those adjacent in guest-physical memory.
    fn keep<M: GuestMemoryBackend>(
        &mut self,
        a: &mut Areas<'_>,
        mem: &M,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(), Stop> {
        for s in a.scratch.iter() {
            if !mem.check_range(GuestAddress(s.addr), s.len as usize) {
                return Err(Stop::Fault(Fault::BadAddress {
                    addr: s.addr,
                    len: s.len,
                }));
            }
        }
        let out = if write {
            &mut self.chain.writable
        } else {
            &mut self.chain.readable
        };
        for s in a.scratch.iter() {
            match out.last_mut() {
                Some(last) if last.addr.checked_add(last.len) == Some(s.addr) => {
                    last.len += s.len;
                }
                _ => out.push(*s),
            }
        }
        if let Ok(r) = IovaRange::from_size(iova, len) {
            self.record(r);
        }
        Ok(())
    }
}
