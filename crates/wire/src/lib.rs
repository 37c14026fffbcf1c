//! Byte-exact messages between a vhost device and the IOMMU side, in both dialects:
//!
//! - [`linux`]: the kernel's `struct vhost_msg` / `vhost_msg_v2` on a `/dev/vhost-*` fd, and
//!   [`ioctl`]: the ioctl numbers and structs a vhost-net client needs;
//! - [`vhost_user`]: the vhost-user protocol (QEMU's), with `IOTLB_MSG` (22) from the
//!   front-end and `BACKEND_IOTLB_MSG` (1) on the back-end channel, framing over a Unix socket
//!   with descriptor passing;
//! - [`iotlb_msg`]: the `vhost_iotlb_msg` both carry, validated into [`IotlbMsg`];
//! - [`features`]: feature bits and the negotiation rules around IOMMU support;
//! - [`poll`]: the busy-poll window of a waiting thread, fixed or adaptive (a connection's
//!   receive uses it, and so do the back-end's queue workers).
//!
//! Every byte comes from an untrusted peer: decoding validates sizes, counts, descriptor
//! numbers, ranges and permissions, and returns typed errors ([`WireError`], [`IotlbError`]);
//! encoding writes every byte, padding included. This crate never interprets a request beyond
//! its format: what a request does is the back-end's and front-end's business.

#![forbid(unsafe_code)]

pub mod error;
pub mod features;
pub mod ioctl;
pub mod iotlb_msg;
pub mod linux;
pub mod poll;
pub mod vhost_user;

pub use error::{IotlbError, WireError};
pub use iotlb_msg::{IotlbMsg, VhostIotlbMsg};
