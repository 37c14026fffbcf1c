//! Devices served by the vhost-user back-end engine ([`backend`]).
//!
//! - [`blk`]: virtio-blk on a file or a block device;
//! - [`io`]: positioned vectored I/O straight between files and guest memory;
//! - [`net`]: virtio-net with a loopback, and its frame-level facts (header, config, queue
//!   roles, control commands, the MAC swap);
//! - `testing` (feature `testing`): block back-ends on in-memory disks for tests.
//!
//! Devices see complete chains of guest-physical segments and guest memory; everything
//! about the IOMMU, misses and invalidations is the engine's.

pub mod blk;
pub mod io;
pub mod net;
#[cfg(feature = "testing")]
pub mod testing;

pub use blk::{Blk, BlkConfig, BlkError, BlkQueue};
pub use net::{Net, NetConfig, NetQueue, NetStats};
