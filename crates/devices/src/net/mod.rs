//! virtio-net on the back-end engine.
//!
//! - `frame`: the frame-level facts (the per-packet header, the config space, queue roles,
//!   control commands, the MAC swap), on bytes only;
//! - `device`: the device ([`Net`]) and its queue handlers: receive, transmit, control;
//! - `packets`: the frames waiting for each pair's receive queue ([`Packets`]), filled by
//!   the loopback (each transmitted frame back on the same pair, MACs swapped) or by
//! - `tap`: a Linux tap interface ([`Tap`]): transmitted frames are written to it, and a
//!   reader thread queues what the host sends on it.
//!
//! Nothing here knows about the IOMMU: the engine hands the handlers translated chains.

mod device;
mod frame;
mod packets;
mod tap;

pub use device::{Net, NetConfig, NetQueue, NetStats};
pub use frame::*;
pub use packets::{Packets, PAIR_FRAMES};
pub use tap::{Tap, TapError};
