//! Devices served by the vhost-user back-end engine ([`backend`]).
//!
//! - [`blk`]: virtio-blk on a file or a block device;
//! - [`io`]: positioned vectored I/O straight between files and guest memory.
//!
//! Devices see complete chains of guest-physical segments and guest memory; everything
//! about the IOMMU, misses and invalidations is the engine's.

pub mod blk;
pub mod io;

pub use blk::{Blk, BlkConfig, BlkError, BlkQueue};
