//! How the queue engine turns the addresses a driver gives it into guest-physical memory.
//!
//! Every address the engine touches (the three ring areas, each descriptor buffer, each
//! indirect table) goes through a [`Translator`], with the direction of the access:
//!
//! - without `VIRTIO_F_ACCESS_PLATFORM`, addresses are guest-physical: [`GpaTranslator`] is the
//!   identity (the engine still checks every range against guest memory);
//! - with it, they are IOVAs: [`IotlbTranslator`] looks them up in the device IOTLB through a
//!   worker's [`IotlbHandle`], and a miss or a permission failure comes back as a [`Fault`].
//!
//! Translations produce guest-physical [`Segment`]s; memory is then reached through vm-memory
//! only. A translator also says when translations it gave may have gone stale
//! ([`Translator::stale`]), so that cached ring translations are revalidated after an
//! INVALIDATE and not before. Nothing here touches guest memory or blocks on I/O.

use iotlb::{Access, IotlbHandle, IovaRange, Segment, TranslateError};

/// Why an address could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// Nothing translates `iova` yet: the device reports a MISS and parks the queue.
    #[error("IOTLB miss at {iova:#x} for {access}")]
    Miss {
        /// First byte that missed.
        iova: u64,
        /// Direction of the access.
        access: Access,
    },
    /// The mapping of `iova` forbids `access`.
    #[error("access denied at {iova:#x} for {access}")]
    Denied {
        /// First byte refused.
        iova: u64,
        /// Direction of the access.
        access: Access,
    },
    /// The range is not guest memory, or runs past 2^64.
    #[error("address range {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

impl From<TranslateError> for Fault {
    fn from(e: TranslateError) -> Self {
        match e {
            TranslateError::Miss { iova, access } => Fault::Miss { iova, access },
            TranslateError::Denied { iova, access } => Fault::Denied { iova, access },
            TranslateError::Overflow { iova, len } => Fault::BadAddress { addr: iova, len },
        }
    }
}

/// Driver addresses to guest-physical segments.
pub trait Translator {
    /// Append the guest-physical segments of `len` bytes at `addr` to `out`, or fail at the
    /// first byte that cannot be used for `access` (`out` is then left as it was).
    fn translate(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), Fault>;

    /// A number that moves when translations given before may have become wrong.
    fn generation(&self) -> u64;

    /// Whether a translation of `range` obtained at generation `since` may have changed.
    fn stale(&self, since: u64, range: IovaRange) -> bool;

    /// Whether a translation of any of `ranges` obtained at generation `since` may have
    /// changed (one look at the change log for all of them where the translator can).
    fn stale_any(&self, since: u64, ranges: &[IovaRange]) -> bool {
        ranges.iter().any(|r| self.stale(since, *r))
    }

    /// Whether addresses are IOVAs (so misses can happen).
    fn is_iommu(&self) -> bool;
}

/// Guest-physical addresses, used as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpaTranslator;

impl Translator for GpaTranslator {
    #[inline]
    fn translate(
        &mut self,
        addr: u64,
        len: u64,
        _access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        if addr.checked_add(len - 1).is_none() {
            return Err(Fault::BadAddress { addr, len });
        }
        out.push(Segment { addr, len });
        Ok(())
    }

    fn generation(&self) -> u64 {
        0
    }

    fn stale(&self, _since: u64, _range: IovaRange) -> bool {
        false
    }

    fn is_iommu(&self) -> bool {
        false
    }
}

/// IOVAs, translated by the device IOTLB through one worker's handle.
#[derive(Debug)]
pub struct IotlbTranslator<W> {
    handle: IotlbHandle<W>,
}

impl<W: Clone + PartialEq> IotlbTranslator<W> {
    /// Translate through `handle`.
    pub fn new(handle: IotlbHandle<W>) -> Self {
        IotlbTranslator { handle }
    }

    /// The handle (to register misses with the shared table).
    pub fn handle(&self) -> &IotlbHandle<W> {
        &self.handle
    }
}

impl<W: Clone + PartialEq> Translator for IotlbTranslator<W> {
    #[inline]
    fn translate(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), Fault> {
        self.handle
            .translate_into(addr, len, access, out)
            .map_err(Fault::from)
    }

    fn generation(&self) -> u64 {
        self.handle.shared().generation()
    }

    fn stale(&self, since: u64, range: IovaRange) -> bool {
        self.stale_any(since, std::slice::from_ref(&range))
    }

    fn stale_any(&self, since: u64, ranges: &[IovaRange]) -> bool {
        if since == self.generation() || ranges.is_empty() {
            return false;
        }
        self.handle.shared().with_cache(|tlb| {
            tlb.changes_since(since)
                .is_none_or(|mut changes| changes.any(|c| ranges.iter().any(|r| r.overlaps(&c))))
        })
    }

    fn is_iommu(&self) -> bool {
        true
    }
}

impl<T: Translator + ?Sized> Translator for &mut T {
    fn translate(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        out: &mut Vec<Segment>,
    ) -> Result<(), Fault> {
        (**self).translate(addr, len, access, out)
    }

    fn generation(&self) -> u64 {
        (**self).generation()
    }

    fn stale(&self, since: u64, range: IovaRange) -> bool {
        (**self).stale(since, range)
    }

    fn stale_any(&self, since: u64, ranges: &[IovaRange]) -> bool {
        (**self).stale_any(since, ranges)
    }

    fn is_iommu(&self) -> bool {
        (**self).is_iommu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotlb::{Iotlb, Perm, SharedIotlb};

    #[test]
    fn gpa_is_identity_with_overflow_check() {
        let mut t = GpaTranslator;
        let mut out = Vec::new();
        t.translate(0x1000, 8, Access::Read, &mut out).unwrap();
        t.translate(0x9000, 0, Access::Read, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Segment {
                addr: 0x1000,
                len: 8
            }]
        );
        assert_eq!(
            t.translate(u64::MAX, 2, Access::Read, &mut out),
            Err(Fault::BadAddress {
                addr: u64::MAX,
                len: 2
            })
        );
        assert!(!t.is_iommu() && !t.stale(0, IovaRange::FULL));
    }

    #[test]
    fn iotlb_faults_and_staleness() {
        let shared: SharedIotlb<u16> = SharedIotlb::new(Iotlb::new());
        let mut t = IotlbTranslator::new(shared.handle());
        let mut out = Vec::new();
        assert_eq!(
            t.translate(0x5000, 4, Access::Read, &mut out),
            Err(Fault::Miss {
                iova: 0x5000,
                access: Access::Read
            })
        );
        let r = IovaRange::from_size(0x5000, 0x1000).unwrap();
        shared.update(r, 0x9_0000, Perm::ReadOnly).unwrap();
        let g = t.generation();
        t.translate(0x5004, 4, Access::Read, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Segment {
                addr: 0x9_0004,
                len: 4
            }]
        );
        assert!(matches!(
            t.translate(0x5000, 4, Access::Write, &mut out),
            Err(Fault::Denied { .. })
        ));
        assert!(!t.stale(g, r));
        shared.invalidate(IovaRange::from_size(0x8000, 0x1000).unwrap());
        assert!(!t.stale(g, r), "an INVALIDATE elsewhere leaves it valid");
        shared.invalidate(IovaRange::from_size(0x5800, 8).unwrap());
        assert!(t.stale(g, r));
    }
}
