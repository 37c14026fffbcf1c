//! The result of a translation: host segments, kept inline for the common case.
//!
//! A buffer that lies inside one mapping translates to one segment; one that spans several
//! adjacent mappings translates to one segment per mapping. [`Segments`] keeps up to
//! [`Segments::INLINE`] of them without allocating, so a hit on the data path never touches the
//! heap. This file only stores values; it does not translate anything.

use std::fmt;

/// A contiguous run of translated bytes: `len` bytes at target address `addr`.
///
/// The target address is whatever the IOTLB's user stored with the mapping (for the vhost-user
/// backend, an address in its own mapping of the front-end's memory).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Target (host) address of the first byte.
    pub addr: u64,
    /// Number of bytes; never 0.
    pub len: u64,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.addr, self.len)
    }
}

/// The segments of one translation, in IOVA order.
#[derive(Clone, Default)]
pub struct Segments {
    len: usize,
    inline: [Segment; Segments::INLINE],
    /// Holds every segment once there are more than `INLINE`; empty otherwise.
    spill: Vec<Segment>,
}

impl Segments {
    /// How many segments are stored without a heap allocation.
    pub const INLINE: usize = 4;

    /// No segments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exactly one segment.
    #[inline]
    pub fn single(seg: Segment) -> Self {
        let mut inline = [Segment::default(); Self::INLINE];
        inline[0] = seg;
        Segments {
            len: 1,
            inline,
            spill: Vec::new(),
        }
    }

    /// Append a segment.
    #[inline]
    pub fn push(&mut self, seg: Segment) {
        if self.len < Self::INLINE {
            self.inline[self.len] = seg;
        } else {
            if self.len == Self::INLINE {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(seg);
        }
        self.len += 1;
    }

    /// Drop every segment (keeps any spill allocation for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }

    /// The segments as a slice.
    #[inline]
    pub fn as_slice(&self) -> &[Segment] {
        if self.len <= Self::INLINE {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no segments (a zero-length translation).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes over all segments (saturating; a translation never exceeds `u64::MAX`).
    pub fn total_len(&self) -> u64 {
        self.as_slice()
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.len))
    }
}

impl std::ops::Deref for Segments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        self.as_slice()
    }
}

impl fmt::Debug for Segments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Segments {}

impl Extend<Segment> for Segments {
    fn extend<T: IntoIterator<Item = Segment>>(&mut self, iter: T) {
        for s in iter {
            self.push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(i: u64) -> Segment {
        Segment {
            addr: i * 0x1000,
            len: i + 1,
        }
    }

    #[test]
    fn inline_then_spill_keeps_order() {
        let mut s = Segments::new();
        assert!(s.is_empty());
        for i in 0..10 {
            s.push(seg(i));
            assert_eq!(s.len(), (i + 1) as usize);
            let want: Vec<Segment> = (0..=i).map(seg).collect();
            assert_eq!(s.as_slice(), &want[..]);
        }
        assert_eq!(s.total_len(), (1..=10).sum::<u64>());
        s.clear();
        assert!(s.is_empty());
        s.push(seg(7));
        assert_eq!(s.as_slice(), &[seg(7)]);
    }
}
