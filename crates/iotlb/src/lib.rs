//! The vhost **device IOTLB**: the translation cache a vhost device keeps when it sits behind a
//! virtual IOMMU.
//!
//! With `VIRTIO_F_ACCESS_PLATFORM` negotiated, every address a device touches (rings,
//! descriptors, indirect tables, buffers) is an I/O virtual address (IOVA). The device may only
//! use translations the IOMMU side gave it (UPDATE), in the direction they allow (RO, WO, RW),
//! and must stop using them once it acknowledges an INVALIDATE. On a miss it asks (MISS),
//! parks the queue, and resumes when an UPDATE covers the address.
//!
//! This crate is the device side's bookkeeping for all of that, with no I/O of its own:
//!
//! - [`Iotlb`]: the bounded cache of `[start, last] -> target, perm` entries, exact under
//!   overlapping UPDATEs and partial INVALIDATEs, with hit-aware eviction;
//! - [`PendingMisses`]: who waits for which page, so one MISS serves every queue;
//! - [`SharedIotlb`] and [`IotlbHandle`]: the cache shared by queue workers (lock-free hits)
//!   and the control thread, with the generation number that tells when cached translations
//!   must be dropped;
//! - [`IovaRange`], [`Perm`], [`Access`]: the protocol's vocabulary, with typed errors for
//!   every malformed value.
//! - [`lock`]: how the locks above are taken (polled, never slept on for a short wait), also
//!   for other short-held locks of the miss path.
//!
//! It never blocks, never sends a message and never touches guest memory: those belong to the
//! backend and virtqueue crates built on top.

#![deny(clippy::undocumented_unsafe_blocks)]
#![forbid(unsafe_code)]

mod cache;
mod error;
mod evicted;
mod handle;
pub mod hist;
pub mod lock;
mod pending;
mod policy;
mod range;
mod segments;
mod shared;
mod stats;

#[cfg(feature = "bench-support")]
pub mod bench_support;

pub use cache::{
    CacheCounters, Iotlb, Mapping, UpdateOutcome, CHANGE_LOG_LEN, DEFAULT_CAPACITY, MAX_CAPACITY,
};
pub use error::{CapacityError, InvariantViolation, TranslateError, UpdateError};
pub use handle::{IotlbHandle, HANDLE_CACHE_ENTRIES};
pub use pending::{PendingMiss, PendingMisses, Registration, Resolution, MISS_PAGE_SIZE};
pub use range::{Access, InvalidPerm, IovaRange, Perm, RangeError};
pub use segments::{Segment, Segments};
pub use shared::{MissOutcome, SharedIotlb};
pub use stats::Stats;
