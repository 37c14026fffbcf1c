//! Test support of the device tests: the engine's scripted front-end and guest driver
//! (`backend::testing`, re-exported here), virtio-blk back-ends on in-memory disks
//! (`devices::testing`, re-exported too), a gated device and the liveness bounds.

#![allow(dead_code)]

pub mod gated;
pub mod liveness;

#[allow(unused_imports)]
pub use backend::testing::{request as blk_request, *};

#[allow(unused_imports)]
pub use devices::testing::{blk_server, memory_disk as disk};

/// A block back-end on a fresh in-memory disk of `disk_len` bytes with `queues` queues of 64
/// entries and `engine`.
pub fn blk_queues(
    disk_len: u64,
    queues: u16,
    engine: backend::EngineConfig,
) -> std::sync::Arc<backend::Server<devices::Blk>> {
    let blk = devices::BlkConfig {
        queues,
        queue_size: 64,
        ..devices::BlkConfig::default()
    };
    blk_server(disk_len, blk, engine)
}
