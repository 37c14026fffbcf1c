//! The split ring's three areas, and the cache of their translations.
//!
//! Layout (virtio 1.x, little-endian fields, `size` a power of two up to 32768):
//!
//! ```text
//! descriptor table  16 * size     { le64 addr; le32 len; le16 flags; le16 next; }[size]
//! available ring    6 + 2 * size  le16 flags; le16 idx; le16 ring[size]; le16 used_event
//! used ring         6 + 8 * size  le16 flags; le16 idx; { le32 id; le32 len; }[size];
//!                                 le16 avail_event
//! ```
//!
//! A [`RingArea`] keeps the guest-physical segments of one area (it may span several
//! mappings) and the translator generation they were obtained at, so that field accesses on
//! the hot path do no IOTLB lookup; it translates again only when the translator reports a
//! change overlapping the area. Fields are read and written through vm-memory's volatile
//! accessors, atomically with the ordering asked for when the field lies in one segment, and
//! byte by byte (fenced) in the odd case of a mapping boundary inside a field.

use std::sync::atomic::{fence, Ordering};

use iotlb::{Access, IovaRange, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::translate::{Fault, Translator};

/// Bytes of a descriptor.
pub const DESC_SIZE: u64 = 16;
/// Largest queue size of a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of the descriptor table of a queue of `size`.
pub const fn desc_table_len(size: u16) -> u64 {
    DESC_SIZE * size as u64
}

/// Bytes of the available ring of a queue of `size` (with `used_event`).
pub const fn avail_ring_len(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring of a queue of `size` (with `avail_event`).
pub const fn used_ring_len(size: u16) -> u64 {
    6 + 8 * size as u64
}

/// A ring area could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Translating the area failed (a miss parks the queue; anything else breaks it).
    #[error("ring area at {addr:#x}: {fault}")]
    Fault {
        /// The area's driver address.
        addr: u64,
        /// Why.
        fault: Fault,
    },
    /// Guest memory refused an access inside a translated area.
    #[error("guest memory access at {gpa:#x} failed: {reason}")]
    Memory {
        /// The guest-physical address.
        gpa: u64,
        /// vm-memory's message.
        reason: String,
    },
}

/// One ring area and its cached translation.
///
/// The cache is tied to the translator's generation, not to the translator itself: whoever
/// gives a queue another translator (the IOMMU switched on or off, a new IOTLB) must call
/// [`crate::Queue::invalidate_translations`] or configure a new queue.
///
/// An area larger than the IOTLB (a descriptor table of 8192 entries is 32 pages, an indirect
/// table up to 256) is translated piece by piece across misses: what translated before a miss
/// is kept (checked against the translator's changes like the rest), so the area never needs
/// all its pages cached at once.
#[derive(Debug)]
pub(crate) struct RingArea {
    addr: u64,
    len: u64,
    access: Access,
    /// `(offset in the area, guest-physical segment)`, in order, covering `0..covered`.
    segs: Vec<(u64, Segment)>,
    /// Bytes from the area's start translated so far (all of it when `valid`).
    covered: u64,
    generation: u64,
    valid: bool,
    scratch: Vec<Segment>,
}

impl RingArea {
    pub(crate) fn new(access: Access) -> Self {
        RingArea {
            addr: 0,
            len: 0,
            access,
            segs: Vec::new(),
            covered: 0,
            generation: 0,
            valid: false,
            scratch: Vec::new(),
        }
    }

    /// Point the area at `addr..addr + len`. The translation (whole or partial) is kept if
    /// it is the same area, and forgotten otherwise.
    pub(crate) fn set(&mut self, addr: u64, len: u64) {
        if addr == self.addr && len == self.len {
            return;
        }
        self.addr = addr;
        self.len = len;
        self.forget();
    }

    fn forget(&mut self) {
        self.valid = false;
        self.covered = 0;
        self.segs.clear();
    }

    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// Forget the translation (the next access translates again).
    pub(crate) fn invalidate(&mut self) {
        self.forget();
    }

    /// Make sure the translation is current: translate again if it was never made or if the
    /// translator reports a change overlapping what was translated since. A miss keeps the
    /// part before the missing byte; the next call goes on from there.
    pub(crate) fn ensure<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
    ) -> Result<(), RingError> {
        let now = tr.generation();
        if self.valid && now == self.generation {
            return Ok(());
        }
        if self.covered > 0 && now != self.generation {
            let range = IovaRange::from_size(self.addr, self.covered).unwrap_or(IovaRange::FULL);
            if tr.stale(self.generation, range) {
                self.forget();
            }
        }
        self.generation = now;
        if self.covered >= self.len {
            self.valid = true;
            return Ok(());
        }
        let area = self.addr;
        let fault = |fault| RingError::Fault { addr: area, fault };
        let Some(cur) = self.addr.checked_add(self.covered) else {
            return Err(fault(Fault::BadAddress {
                addr: self.addr,
                len: self.len,
            }));
        };
        let left = self.len - self.covered;
        self.scratch.clear();
        match tr.translate(cur, left, self.access, &mut self.scratch) {
            Ok(()) => {
                self.keep(mem)?;
                self.valid = true;
                Ok(())
            }
            Err(Fault::Miss { iova, access }) => {
                // Keep what lies before the missing byte, if it still translates now.
                if iova > cur && iova - cur < left {
                    self.scratch.clear();
                    if tr
                        .translate(cur, iova - cur, self.access, &mut self.scratch)
                        .is_ok()
                    {
                        self.keep(mem)?;
                    }
                }
                Err(fault(Fault::Miss { iova, access }))
            }
            Err(other) => Err(fault(other)),
        }
    }

    /// Append the segments in `scratch` to the translation, checking they are guest memory.
    fn keep<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<(), RingError> {
        for s in &self.scratch {
            if !mem.check_range(GuestAddress(s.addr), s.len as usize) {
                let (addr, bad) = (self.addr, *s);
                self.forget();
                return Err(RingError::Fault {
                    addr,
                    fault: Fault::BadAddress {
                        addr: bad.addr,
                        len: bad.len,
                    },
                });
            }
        }
        for s in &self.scratch {
            self.segs.push((self.covered, *s));
            self.covered += s.len;
        }
        Ok(())
    }

    /// The guest-physical address of `off..off + len` if it lies in one segment.
    #[inline]
    fn locate(&self, off: u64, len: u64) -> Option<u64> {
        // Almost always one segment: check it first.
        let (base, seg) = match self.segs.as_slice() {
            [only] => *only,
            segs => {
                let i = segs.partition_point(|(o, _)| *o <= off).checked_sub(1)?;
                *segs.get(i)?
            }
        };
        let rel = off.checked_sub(base)?;
        (rel.checked_add(len)? <= seg.len).then_some(seg.addr + rel)
    }

    /// Log the guest-physical pieces of `off..off + len` of the area (after writing them).
    /// Bytes outside the translated part are not logged: nothing was written there.
    pub(crate) fn log_written(&self, off: u64, len: u64, log: &dyn crate::DirtyLog) {
        if log.logs_iovas() {
            log.log(self.addr.wrapping_add(off), len);
            return;
        }
        let Some(end) = off.checked_add(len) else {
            return;
        };
        for &(base, seg) in &self.segs {
            let seg_end = base.saturating_add(seg.len);
            if seg_end <= off || base >= end {
                continue;
            }
            let from = off.max(base);
            let to = end.min(seg_end);
            log.log(seg.addr + (from - base), to - from);
        }
    }

    fn mem_err(gpa: u64, e: impl std::fmt::Display) -> RingError {
        RingError::Memory {
            gpa,
            reason: e.to_string(),
        }
    }

    /// Copy `buf.len()` bytes at `off` of the area out of guest memory.
    pub(crate) fn read<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), RingError> {
        if let Some(gpa) = self.locate(off, buf.len() as u64) {
            return mem
                .read_slice(buf, GuestAddress(gpa))
                .map_err(|e| Self::mem_err(gpa, e));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let gpa = self.byte(off + i as u64)?;
            *b = mem
                .read_obj(GuestAddress(gpa))
                .map_err(|e| Self::mem_err(gpa, e))?;
        }
        Ok(())
    }

    /// Copy `buf` into guest memory at `off` of the area.
    pub(crate) fn write<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        off: u64,
        buf: &[u8],
    ) -> Result<(), RingError> {
        if let Some(gpa) = self.locate(off, buf.len() as u64) {
            return mem
                .write_slice(buf, GuestAddress(gpa))
                .map_err(|e| Self::mem_err(gpa, e));
        }
        for (i, b) in buf.iter().enumerate() {
            let gpa = self.byte(off + i as u64)?;
            mem.write_obj(*b, GuestAddress(gpa))
                .map_err(|e| Self::mem_err(gpa, e))?;
        }
        Ok(())
    }

    fn byte(&self, off: u64) -> Result<u64, RingError> {
        self.locate(off, 1).ok_or(RingError::Fault {
            addr: self.addr,
            fault: Fault::BadAddress {
                addr: self.addr.wrapping_add(off),
                len: 1,
            },
        })
    }

    /// Load the little-endian `u16` at `off`, with `order` (acquire for the avail index).
    pub(crate) fn load_u16<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        off: u64,
        order: Ordering,
    ) -> Result<u16, RingError> {
        if let Some(gpa) = self.locate(off, 2) {
            if gpa % 2 == 0 {
                let v: u16 = mem
                    .load(GuestAddress(gpa), order)
                    .map_err(|e| Self::mem_err(gpa, e))?;
                return Ok(u16::from_le(v));
            }
        }
        let mut b = [0u8; 2];
        self.read(mem, off, &mut b)?;
        fence(order_for_load(order));
        Ok(u16::from_le_bytes(b))
    }

    /// Store `v` little-endian at `off`, with `order` (release for the used index).
    pub(crate) fn store_u16<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        off: u64,
        v: u16,
        order: Ordering,
    ) -> Result<(), RingError> {
        if let Some(gpa) = self.locate(off, 2) {
            if gpa % 2 == 0 {
                return mem
                    .store(v.to_le(), GuestAddress(gpa), order)
                    .map_err(|e| Self::mem_err(gpa, e));
            }
        }
        fence(order_for_store(order));
        self.write(mem, off, &v.to_le_bytes())
    }
}

/// The fence that gives a plain load the ordering `order` asked of an atomic load.
fn order_for_load(order: Ordering) -> Ordering {
    match order {
        Ordering::Relaxed => Ordering::Relaxed,
        Ordering::SeqCst => Ordering::SeqCst,
        _ => Ordering::Acquire,
    }
}

/// The fence that gives a plain store the ordering `order` asked of an atomic store.
fn order_for_store(order: Ordering) -> Ordering {
    match order {
        Ordering::Relaxed => Ordering::Relaxed,
        Ordering::SeqCst => Ordering::SeqCst,
        _ => Ordering::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::GpaTranslator;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn layout_sizes() {
        assert_eq!(desc_table_len(256), 4096);
        assert_eq!(avail_ring_len(256), 518);
        assert_eq!(used_ring_len(256), 2054);
    }

    /// A translator that maps an area in two pieces, 3 bytes apart in guest memory, with the
    /// boundary at area offset 5 (inside a u16 at offsets 4..6 and 5..7).
    struct Split;

    impl Translator for Split {
        fn translate(
            &mut self,
            addr: u64,
            len: u64,
            _: Access,
            out: &mut Vec<Segment>,
        ) -> Result<(), Fault> {
            out.push(Segment { addr, len: 5 });
            out.push(Segment {
                addr: addr + 8,
                len: len - 5,
            });
            Ok(())
        }
        fn generation(&self) -> u64 {
            0
        }
        fn stale(&self, _: u64, _: IovaRange) -> bool {
            false
        }
        fn is_iommu(&self) -> bool {
            true
        }
    }

    #[test]
    fn fields_across_a_mapping_boundary() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut a = RingArea::new(Access::Write);
        a.set(0x100, 16);
        a.ensure(&mut Split, &mem).unwrap();
        a.store_u16(&mem, 4, 0xbeef, Ordering::Release).unwrap();
        // Byte 4 at 0x104, byte 5 at 0x100 + 8 + 0.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x104)).unwrap(), 0xef);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x108)).unwrap(), 0xbe);
        assert_eq!(a.load_u16(&mem, 4, Ordering::Acquire).unwrap(), 0xbeef);
        // A field wholly in the second piece.
        a.store_u16(&mem, 6, 0x1234, Ordering::Release).unwrap();
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x109)).unwrap(),
            0x1234u16.to_le()
        );
    }

    #[test]
    fn areas_outside_memory_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut a = RingArea::new(Access::Read);
        a.set(0xff0, 0x20);
        assert!(matches!(
            a.ensure(&mut GpaTranslator, &mem),
            Err(RingError::Fault {
                fault: Fault::BadAddress { .. },
                ..
            })
        ));
    }
}
