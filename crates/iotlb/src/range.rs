//! IOVA ranges, mapping permissions and access directions: the vocabulary of the IOTLB.
//!
//! A range is inclusive, `[start, last]`, so that every range of the 64-bit IOVA space is
//! representable, including the whole space `[0, u64::MAX]` (its size, 2^64, does not fit in a
//! `u64`). Messages on the wire carry `(iova, size)`; [`IovaRange::from_size`] is the one place
//! where such a pair becomes a range, and it rejects a zero size and a range that would run past
//! 2^64 instead of wrapping.
//!
//! This file holds plain values only: no state, no I/O, nothing that can panic on any input.

use std::fmt;

/// Why an `(iova, size)` pair or a `[start, last]` pair is not a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A range of zero bytes was requested (UPDATE with size 0, for example).
    #[error("empty IOVA range at {iova:#x}: size 0")]
    ZeroSize {
        /// The start address that came with the zero size.
        iova: u64,
    },
    /// `iova + size - 1` is beyond the last byte of the 64-bit IOVA space.
    #[error("IOVA range {iova:#x}+{size:#x} runs past the end of the 64-bit space")]
    Overflow {
        /// Start of the requested range.
        iova: u64,
        /// Size of the requested range.
        size: u64,
    },
    /// `start > last`.
    #[error("IOVA range [{start:#x}, {last:#x}] ends before it starts")]
    Inverted {
        /// Requested first byte.
        start: u64,
        /// Requested last byte.
        last: u64,
    },
}

/// An inclusive range `[start, last]` of I/O virtual addresses. Never empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IovaRange {
    start: u64,
    last: u64,
}

impl IovaRange {
    /// The whole 64-bit IOVA space, `[0, u64::MAX]`.
    pub const FULL: IovaRange = IovaRange {
        start: 0,
        last: u64::MAX,
    };

    /// The range `[start, last]`; fails if `start > last`.
    pub const fn new(start: u64, last: u64) -> Result<Self, RangeError> {
        if start > last {
            return Err(RangeError::Inverted { start, last });
        }
        Ok(IovaRange { start, last })
    }

    /// The range of `size` bytes starting at `iova`, as a message carries it.
    ///
    /// Rejects `size == 0` and ranges whose last byte would be beyond `u64::MAX`.
    pub const fn from_size(iova: u64, size: u64) -> Result<Self, RangeError> {
        if size == 0 {
            return Err(RangeError::ZeroSize { iova });
        }
        match iova.checked_add(size - 1) {
            Some(last) => Ok(IovaRange { start: iova, last }),
            None => Err(RangeError::Overflow { iova, size }),
        }
    }

    /// The single byte at `iova`.
    pub const fn byte(iova: u64) -> Self {
        IovaRange {
            start: iova,
            last: iova,
        }
    }

    /// First byte of the range.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Last byte of the range (inclusive).
    pub const fn last(&self) -> u64 {
        self.last
    }

    /// Size in bytes, or `None` for the whole space (2^64 bytes do not fit in a `u64`).
    pub const fn size(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }

    /// Whether `iova` lies in the range (inclusive at both ends).
    pub const fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.last
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// Whether every byte of `other` lies in `self`.
    pub const fn covers(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }
}

impl fmt::Debug for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.start, self.last)
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A mapping's permission, with the numeric values of the vhost `perm` byte
/// (`VHOST_ACCESS_RO` = 1, `VHOST_ACCESS_WO` = 2, `VHOST_ACCESS_RW` = 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Perm {
    /// The device may read (driver-to-device buffers, ring reads).
    ReadOnly = 1,
    /// The device may write (device-to-driver buffers, used-ring writes).
    WriteOnly = 2,
    /// The device may read and write.
    ReadWrite = 3,
}

/// A `perm` byte that is not RO, WO or RW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid vhost IOTLB permission {0:#x} (expected 1 = RO, 2 = WO or 3 = RW)")]
pub struct InvalidPerm(pub u8);

impl Perm {
    /// Decode the vhost `perm` byte.
    pub const fn from_bits(bits: u8) -> Result<Self, InvalidPerm> {
        match bits {
            1 => Ok(Perm::ReadOnly),
            2 => Ok(Perm::WriteOnly),
            3 => Ok(Perm::ReadWrite),
            other => Err(InvalidPerm(other)),
        }
    }

    /// The vhost `perm` byte.
    pub const fn bits(self) -> u8 {
        self as u8
    }

    /// Whether a mapping with this permission allows `access`.
    #[inline]
    pub const fn allows(self, access: Access) -> bool {
        self.bits() & access.bit() != 0
    }
}

/// The direction of one device access to guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// The device reads guest memory.
    Read,
    /// The device writes guest memory.
    Write,
}

impl Access {
    /// The permission bit this access needs (1 for read, 2 for write).
    #[inline]
    pub const fn bit(self) -> u8 {
        match self {
            Access::Read => 1,
            Access::Write => 2,
        }
    }

    /// The permission a MISS for this access asks for: RO for a read, WO for a write.
    pub const fn as_perm(self) -> Perm {
        match self {
            Access::Read => Perm::ReadOnly,
            Access::Write => Perm::WriteOnly,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_size_rejects_zero_and_overflow() {
        assert_eq!(
            IovaRange::from_size(0x1000, 0),
            Err(RangeError::ZeroSize { iova: 0x1000 })
        );
        assert_eq!(
            IovaRange::from_size(u64::MAX, 2),
            Err(RangeError::Overflow {
                iova: u64::MAX,
                size: 2
            })
        );
        assert_eq!(
            IovaRange::from_size(2, u64::MAX),
            Err(RangeError::Overflow {
                iova: 2,
                size: u64::MAX
            })
        );
        // 1 + (2^64 - 1) - 1 is exactly the last byte: allowed.
        assert_eq!(
            IovaRange::from_size(1, u64::MAX).map(|r| r.last()),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn from_size_reaches_the_last_byte() {
        let r = IovaRange::from_size(u64::MAX, 1).unwrap();
        assert_eq!((r.start(), r.last()), (u64::MAX, u64::MAX));
        assert_eq!(r.size(), Some(1));
        let r = IovaRange::from_size(0, u64::MAX).unwrap();
        assert_eq!(r.last(), u64::MAX - 1);
        let r = IovaRange::from_size(u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(r.last(), u64::MAX);
    }

    #[test]
    fn full_space_is_representable() {
        assert_eq!(IovaRange::new(0, u64::MAX), Ok(IovaRange::FULL));
        assert_eq!(IovaRange::FULL.size(), None);
        assert!(IovaRange::FULL.contains(0) && IovaRange::FULL.contains(u64::MAX));
        assert_eq!(
            IovaRange::new(2, 1),
            Err(RangeError::Inverted { start: 2, last: 1 })
        );
    }

    #[test]
    fn inclusive_ends() {
        let r = IovaRange::new(0x1000, 0x1fff).unwrap();
        assert!(r.contains(0x1fff) && !r.contains(0x2000) && !r.contains(0xfff));
        assert!(r.overlaps(&IovaRange::byte(0x1fff)));
        assert!(!r.overlaps(&IovaRange::byte(0x2000)));
        assert!(r.covers(&IovaRange::new(0x1000, 0x1fff).unwrap()));
        assert!(!r.covers(&IovaRange::new(0x1000, 0x2000).unwrap()));
    }

    #[test]
    fn perm_bits_round_trip_and_reject_others() {
        for p in [Perm::ReadOnly, Perm::WriteOnly, Perm::ReadWrite] {
            assert_eq!(Perm::from_bits(p.bits()), Ok(p));
        }
        for bad in [0u8, 4, 0x80, 0xff] {
            assert_eq!(Perm::from_bits(bad), Err(InvalidPerm(bad)));
        }
        assert!(Perm::ReadOnly.allows(Access::Read) && !Perm::ReadOnly.allows(Access::Write));
        assert!(!Perm::WriteOnly.allows(Access::Read) && Perm::WriteOnly.allows(Access::Write));
        assert!(Perm::ReadWrite.allows(Access::Read) && Perm::ReadWrite.allows(Access::Write));
        assert_eq!(Access::Read.as_perm(), Perm::ReadOnly);
        assert_eq!(Access::Write.as_perm(), Perm::WriteOnly);
    }
}
