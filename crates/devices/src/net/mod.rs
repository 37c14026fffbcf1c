//! virtio-net on the back-end engine.
//!
//! - `frame`: the frame-level facts (the per-packet header, the config space, queue roles,
//!   control commands, the MAC swap), on bytes only;
//! - `device`: the device ([`Net`]) and its queue handlers: receive, transmit, control;
//! - `packets`: where frames go and come from ([`Packets`]): the loopback, which sends each
//!   transmitted frame back on the same pair's receive queue with its MACs swapped.
//!
//! Nothing here knows about the IOMMU: the engine hands the handlers translated chains.

mod device;
mod frame;
mod packets;

pub use device::{Net, NetConfig, NetQueue, NetStats};
pub use frame::*;
pub use packets::{Packets, PAIR_FRAMES};
