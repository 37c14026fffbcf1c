//! The IOTLB message both dialects carry: Linux `struct vhost_iotlb_msg` and its typed form.
//!
//! `struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; }` has 26 bytes
//! of fields and 6 bytes of tail padding (sizeof 32, no alignment requirement on the wire).
//! The Linux `vhost_msg`/`vhost_msg_v2` and the vhost-user `IOTLB_MSG` (22) and
//! `BACKEND_IOTLB_MSG` (1) payloads are all this struct, in host byte order.
//!
//! [`IotlbMsg`] is what the rest of the project handles. Decoding validates per type:
//! - UPDATE: perm RO/WO/RW, size > 0, `iova + size` within 2^64;
//! - INVALIDATE: size 0 means the whole space (whatever the iova: invalidating more is always
//!   safe); a range running past 2^64 is clamped to its end instead of rejected, for the same
//!   reason: refusing it would leave translations live that the IOMMU side wanted gone.
//!   `perm` and `uaddr` are ignored: QEMU leaves them uninitialised in its INVALIDATEs;
//! - MISS and ACCESS_FAIL: perm RO/WO/RW; size and uaddr ignored (the kernel sends 0);
//! - BATCH_BEGIN/BATCH_END: nothing else is read.
//!
//! Encoding writes every byte, padding included, so no stale memory ever reaches a peer
//! (CVE-2018-1118 came from a kernel that did not). This file does no I/O.

use iotlb::{IovaRange, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::IotlbError;

/// IOTLB message types (`VHOST_IOTLB_*`).
pub mod iotlb_type {
    /// The device needs a translation.
    pub const MISS: u8 = 1;
    /// A translation to cache.
    pub const UPDATE: u8 = 2;
    /// Translations to drop.
    pub const INVALIDATE: u8 = 3;
    /// The device was refused an access.
    pub const ACCESS_FAIL: u8 = 4;
    /// Start of a batch of updates (vDPA).
    pub const BATCH_BEGIN: u8 = 5;
    /// End of a batch of updates (vDPA).
    pub const BATCH_END: u8 = 6;
}

/// `VHOST_ACCESS_*` permission values.
pub mod access {
    /// Read only.
    pub const RO: u8 = 1;
    /// Write only.
    pub const WO: u8 = 2;
    /// Read and write.
    pub const RW: u8 = 3;
}

/// `struct vhost_iotlb_msg`, byte for byte.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VhostIotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end (or VMM) virtual address of `iova`, for UPDATE.
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub ty: u8,
    /// Tail padding of the C struct; always written as zeroes.
    pub padding: [u8; 6],
}

impl VhostIotlbMsg {
    /// The raw fields as given, unvalidated (what a test of a peer's checks sends).
    pub fn raw(ty: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> Self {
        VhostIotlbMsg {
            iova,
            size,
            uaddr,
            perm,
            ty,
            padding: [0; 6],
        }
    }
}

const _: () = {
    assert!(std::mem::size_of::<VhostIotlbMsg>() == 32);
    assert!(std::mem::offset_of!(VhostIotlbMsg, iova) == 0);
    assert!(std::mem::offset_of!(VhostIotlbMsg, size) == 8);
    assert!(std::mem::offset_of!(VhostIotlbMsg, uaddr) == 16);
    assert!(std::mem::offset_of!(VhostIotlbMsg, perm) == 24);
    assert!(std::mem::offset_of!(VhostIotlbMsg, ty) == 25);
};

/// A validated IOTLB message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbMsg {
    /// The device missed on `iova` and needs `perm` (RO for a read, WO for a write).
    Miss {
        /// The address that missed.
        iova: u64,
        /// The access needed.
        perm: Perm,
    },
    /// `range` maps to `uaddr..` with `perm`.
    Update {
        /// The IOVA range.
        range: IovaRange,
        /// Front-end virtual address of `range.start()`.
        uaddr: u64,
        /// The permission.
        perm: Perm,
    },
    /// Drop every translation of `range` (`IovaRange::FULL` for size 0 on the wire).
    Invalidate {
        /// The IOVA range.
        range: IovaRange,
    },
    /// The device was refused `perm` access at `iova`.
    AccessFail {
        /// The address refused.
        iova: u64,
        /// The access refused.
        perm: Perm,
    },
    /// Start of a batch (vDPA only).
    BatchBegin,
    /// End of a batch (vDPA only).
    BatchEnd,
}

fn perm_for(ty: u8, bits: u8) -> Result<Perm, IotlbError> {
    Perm::from_bits(bits).map_err(|perm| IotlbError::BadPerm { ty, perm })
}

impl IotlbMsg {
    /// Validate a raw message.
    pub fn from_raw(raw: &VhostIotlbMsg) -> Result<Self, IotlbError> {
        use iotlb_type::*;
        let ty = raw.ty;
        Ok(match ty {
            MISS => IotlbMsg::Miss {
                iova: raw.iova,
                perm: perm_for(ty, raw.perm)?,
            },
            UPDATE => {
                let perm = perm_for(ty, raw.perm)?;
                let range = IovaRange::from_size(raw.iova, raw.size)
                    .map_err(|err| IotlbError::Range { ty, err })?;
                IotlbMsg::Update {
                    range,
                    uaddr: raw.uaddr,
                    perm,
                }
            }
            INVALIDATE => {
                let range = if raw.size == 0 {
                    IovaRange::FULL
                } else {
                    let last = raw.iova.saturating_add(raw.size - 1);
                    // `iova <= last` holds, so this cannot fail; FULL is the safe fallback.
                    IovaRange::new(raw.iova, last).unwrap_or(IovaRange::FULL)
                };
                IotlbMsg::Invalidate { range }
            }
            ACCESS_FAIL => IotlbMsg::AccessFail {
                iova: raw.iova,
                perm: perm_for(ty, raw.perm)?,
            },
            BATCH_BEGIN => IotlbMsg::BatchBegin,
            BATCH_END => IotlbMsg::BatchEnd,
            other => return Err(IotlbError::UnknownType(other)),
        })
    }

    /// Decode the 32 bytes of a `vhost_iotlb_msg` (extra bytes are an error for the caller
    /// to judge; fewer are [`IotlbError::Short`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, IotlbError> {
        let raw = VhostIotlbMsg::read_from_prefix(bytes)
            .map_err(|_| IotlbError::Short {
                expected: std::mem::size_of::<VhostIotlbMsg>(),
                got: bytes.len(),
            })?
            .0;
        Self::from_raw(&raw)
    }

    /// The raw message, every unused byte zero.
    ///
    /// Fails only for an UPDATE of the whole 2^64 space, whose size does not fit the wire.
    pub fn to_raw(&self) -> Result<VhostIotlbMsg, IotlbError> {
        use iotlb_type::*;
        let mut raw = VhostIotlbMsg::default();
        match *self {
            IotlbMsg::Miss { iova, perm } => {
                raw.ty = MISS;
                raw.iova = iova;
                raw.perm = perm.bits();
            }
            IotlbMsg::Update { range, uaddr, perm } => {
                raw.ty = UPDATE;
                raw.iova = range.start();
                raw.size = range.size().ok_or(IotlbError::FullSpaceUpdate)?;
                raw.uaddr = uaddr;
                raw.perm = perm.bits();
            }
            IotlbMsg::Invalidate { range } => {
                raw.ty = INVALIDATE;
                // The whole space is iova 0, size 0; any other range has a size.
                if let Some(size) = range.size() {
                    raw.iova = range.start();
                    raw.size = size;
                }
            }
            IotlbMsg::AccessFail { iova, perm } => {
                raw.ty = ACCESS_FAIL;
                raw.iova = iova;
                raw.perm = perm.bits();
            }
            IotlbMsg::BatchBegin => raw.ty = BATCH_BEGIN,
            IotlbMsg::BatchEnd => raw.ty = BATCH_END,
        }
        Ok(raw)
    }

    /// The 32 bytes of the raw message.
    pub fn encode(&self) -> Result<[u8; 32], IotlbError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.to_raw()?.as_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotlb::RangeError;

    fn raw(ty: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> VhostIotlbMsg {
        VhostIotlbMsg::raw(ty, iova, size, uaddr, perm)
    }

    #[test]
    fn invalidate_size_zero_is_everything_and_perm_is_ignored() {
        for iova in [0, 0x1000, u64::MAX] {
            let m = IotlbMsg::from_raw(&raw(3, iova, 0, 0xdead, 0xee)).unwrap();
            assert_eq!(
                m,
                IotlbMsg::Invalidate {
                    range: IovaRange::FULL
                }
            );
        }
        // QEMU's `[0xfef00000, 2^64)`: ends exactly at the top.
        let m =
            IotlbMsg::from_raw(&raw(3, 0xfef0_0000, 0u64.wrapping_sub(0xfef0_0000), 0, 0)).unwrap();
        assert_eq!(
            m,
            IotlbMsg::Invalidate {
                range: IovaRange::new(0xfef0_0000, u64::MAX).unwrap()
            }
        );
        // Past the top: clamped, never rejected.
        let m = IotlbMsg::from_raw(&raw(3, 0x1000, u64::MAX, 0, 0)).unwrap();
        assert_eq!(
            m,
            IotlbMsg::Invalidate {
                range: IovaRange::new(0x1000, u64::MAX).unwrap()
            }
        );
    }

    #[test]
    fn update_is_validated() {
        assert_eq!(
            IotlbMsg::from_raw(&raw(2, 0x1000, 0, 0, 3)),
            Err(IotlbError::Range {
                ty: 2,
                err: RangeError::ZeroSize { iova: 0x1000 }
            })
        );
        assert!(matches!(
            IotlbMsg::from_raw(&raw(2, u64::MAX, 2, 0, 3)),
            Err(IotlbError::Range {
                err: RangeError::Overflow { .. },
                ..
            })
        ));
        for bad in [0u8, 4, 0xff] {
            assert!(matches!(
                IotlbMsg::from_raw(&raw(2, 0x1000, 0x1000, 0, bad)),
                Err(IotlbError::BadPerm { ty: 2, .. })
            ));
            assert!(matches!(
                IotlbMsg::from_raw(&raw(1, 0x1000, 0, 0, bad)),
                Err(IotlbError::BadPerm { ty: 1, .. })
            ));
        }
        assert_eq!(
            IotlbMsg::from_raw(&raw(2, 0x1000, 0x1000, 0x7f00, 1)),
            Ok(IotlbMsg::Update {
                range: IovaRange::from_size(0x1000, 0x1000).unwrap(),
                uaddr: 0x7f00,
                perm: Perm::ReadOnly
            })
        );
    }

    #[test]
    fn unknown_types() {
        for ty in [0u8, 7, 0x80, 0xff] {
            assert_eq!(
                IotlbMsg::from_raw(&raw(ty, 0, 0, 0, 1)),
                Err(IotlbError::UnknownType(ty))
            );
        }
        assert_eq!(
            IotlbMsg::from_raw(&raw(5, 1, 2, 3, 0)),
            Ok(IotlbMsg::BatchBegin)
        );
        assert_eq!(
            IotlbMsg::from_raw(&raw(6, 1, 2, 3, 9)),
            Ok(IotlbMsg::BatchEnd)
        );
    }

    #[test]
    fn whole_space_update_cannot_be_encoded() {
        let m = IotlbMsg::Update {
            range: IovaRange::FULL,
            uaddr: 0,
            perm: Perm::ReadWrite,
        };
        assert_eq!(m.encode(), Err(IotlbError::FullSpaceUpdate));
        let inv = IotlbMsg::Invalidate {
            range: IovaRange::FULL,
        };
        assert_eq!(inv.encode().unwrap(), {
            let mut b = [0u8; 32];
            b[25] = 3;
            b
        });
    }

    #[test]
    fn short_input() {
        assert_eq!(
            IotlbMsg::decode(&[0u8; 31]),
            Err(IotlbError::Short {
                expected: 32,
                got: 31
            })
        );
    }
}
