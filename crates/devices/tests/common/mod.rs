//! Test support of the device tests: the engine's scripted front-end and guest driver
//! (`backend::testing`, re-exported here), virtio-blk back-ends on in-memory disks, a gated
//! device and the liveness bounds.

#![allow(dead_code)]

pub mod gated;
pub mod liveness;

#[allow(unused_imports)]
pub use backend::testing::{request as blk_request, *};

/// A disk of `len` bytes in memory.
pub fn disk(len: u64) -> std::fs::File {
    let fd = rustix::fs::memfd_create("disk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    std::fs::File::from(fd)
}

/// A block back-end on a fresh in-memory disk of `disk_len` bytes.
pub fn blk_server(
    disk_len: u64,
    blk: devices::BlkConfig,
    engine: backend::EngineConfig,
) -> std::sync::Arc<backend::Server<devices::Blk>> {
    // `RUST_LOG=backend=trace` shows the back-end's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dev = devices::Blk::new(disk(disk_len), blk).unwrap();
    std::sync::Arc::new(backend::Server::new(dev, engine))
}

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
