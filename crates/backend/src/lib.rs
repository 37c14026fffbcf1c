//! The vhost-user back-end engine, with a device IOTLB.
//!
//! It serves a [`Device`] to a vhost-user front-end (QEMU, or our own) over a Unix socket:
//! negotiation (with `VIRTIO_F_ACCESS_PLATFORM`, `REPLY_ACK` and `BACKEND_REQ` for the IOMMU),
//! the memory table mapped through vm-memory, vrings whose addresses are IOVAs when the IOMMU
//! is on, one worker thread per queue, misses reported on the back-end channel without ever
//! waiting, UPDATEs that wake parked queues, and INVALIDATEs acknowledged only once no worker
//! can use what they removed.
//!
//! - [`server`]: the listening socket, one front-end at a time, reconnects;
//! - `session` (private): one connection's state machine, on the connection thread;
//! - `shared` (private): what the connection thread and the workers share, and
//!   [`EngineConfig`];
//! - `worker` (private): queue workers, misses, timeouts, how a parked worker is woken;
//! - [`quiesce`]: per-worker epochs behind invalidation acknowledgement;
//! - [`memory`]: the memory table;
//! - `channel` (private): the back-end channel, the one place MISS and ACCESS_FAIL go out;
//! - `device` ([`Device`], [`QueueHandler`]): what a device provides;
//! - `testing` (feature `testing`): a scripted front-end, a null device, test helpers;
//! - `eventfd` (private): the checks on kick, call and error fds;
//! - `ratelimit` (private): how often a guest can make a queue warn or send ACCESS_FAIL.

mod channel;
mod device;
pub mod dirty;
mod eventfd;
pub mod memory;
pub mod quiesce;
mod ratelimit;
pub mod server;
mod session;
mod shared;
mod stats;
#[cfg(feature = "testing")]
pub mod testing;
mod worker;

pub use device::{Device, MoreChains, QueueHandler, QueueWakers, Served, Unreported};
pub use server::{wait_for_socket, ServeError, Server, ShutdownHandle};
pub use session::SessionEnd;
pub use shared::{EngineConfig, MIN_IOTLB_CAPACITY};
pub use stats::{EngineCounters, Stats};
pub use wire::poll::PollMode;
