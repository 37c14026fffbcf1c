//! Typed errors of the IOTLB crate. Every input that can come from a guest or a front-end
//! (addresses, sizes, permissions, capacities) fails with one of these instead of panicking.
//! Addresses print in hex.

use crate::range::{Access, IovaRange};

/// A translation did not produce host segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// No cached mapping covers `iova`, the first untranslated byte of the request. The device
    /// should report a MISS for it and park until an UPDATE covers it.
    #[error("IOTLB miss at {iova:#x} for {access}")]
    Miss {
        /// First byte of the request that no entry covers.
        iova: u64,
        /// Direction of the access that missed.
        access: Access,
    },
    /// A mapping covers `iova` but does not allow `access` (a write to an RO mapping, say).
    #[error("IOTLB permission denied at {iova:#x} for {access}")]
    Denied {
        /// First byte of the request whose mapping forbids the access.
        iova: u64,
        /// Direction of the refused access.
        access: Access,
    },
    /// `iova + len` runs past the end of the 64-bit IOVA space: no mapping can cover it.
    #[error("IOVA range {iova:#x}+{len:#x} runs past the end of the 64-bit space")]
    Overflow {
        /// Start of the request.
        iova: u64,
        /// Length of the request.
        len: u64,
    },
}

impl TranslateError {
    /// The IOVA the error is about.
    pub fn iova(&self) -> u64 {
        match *self {
            TranslateError::Miss { iova, .. }
            | TranslateError::Denied { iova, .. }
            | TranslateError::Overflow { iova, .. } => iova,
        }
    }
}

/// An UPDATE that cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// The target address of the last byte (`target + size - 1`) overflows 64 bits.
    #[error("mapping {range} -> {target:#x}: target range runs past the end of the 64-bit space")]
    TargetOverflow {
        /// The IOVA range of the UPDATE.
        range: IovaRange,
        /// Its target address.
        target: u64,
    },
}

/// An IOTLB capacity outside `1..=MAX_CAPACITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("IOTLB capacity {requested} is outside 1..={max}")]
pub struct CapacityError {
    /// The capacity that was asked for.
    pub requested: usize,
    /// The largest supported capacity.
    pub max: usize,
}

/// An internal invariant of the cache found broken by [`crate::Iotlb::check_invariants`]
/// (which one, in words): a bug in this crate, never the caller's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IOTLB invariant broken: {0}")]
pub struct InvariantViolation(pub String);
