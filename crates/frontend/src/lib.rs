//! The IOMMU side.
//!
//! - [`viommu`]: the vIOMMU model (I/O page tables, IOVA allocator, strict or lazy
//!   invalidation, optional pre-push), forwarding to any [`viommu::DeviceIotlb`];
//! - [`vhost_user`]: a vhost-user front-end that shares guest RAM as a memfd, places vrings at
//!   IOVAs, answers MISS messages from the vIOMMU and forwards its unmaps, with the back-end
//!   channel served on its own thread so that it never deadlocks against a waiting back-end;
//! - [`kernel`]: the kernel transport: a `/dev/vhost-*` fd driven by the same vIOMMU (its
//!   ioctls, `vhost_msg_v2` reads and writes, MISSes deduplicated);
//! - [`driver`]: a virtio-blk guest-driver simulator over the split ring in that memory;
//! - [`dirty_log`]: the dirty log a migrating VMM shares with the back-end, and its sync.
//!
//! This crate plays the guest and the VMM; it never reaches into the back-end's state.

pub mod dirty_log;
pub mod driver;
pub mod kernel;
pub mod vhost_user;
pub mod viommu;
