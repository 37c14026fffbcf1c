//! Test support (feature `testing`): virtio-blk back-ends on in-memory disks, for the tests
//! of this crate and of the crates that drive a real device (the IOMMU side's, the bench's).
//! For tests only: it panics on anything unexpected, which is what a test wants.

#![allow(clippy::missing_panics_doc)]

use std::sync::Arc;

use backend::{EngineConfig, Server};

use crate::{Blk, BlkConfig};

/// A disk of `len` zeroed bytes in memory (a memfd).
pub fn memory_disk(len: u64) -> std::fs::File {
    let fd = rustix::fs::memfd_create("disk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    std::fs::File::from(fd)
}

/// A block back-end on a fresh in-memory disk of `disk_len` bytes. `RUST_LOG=backend=trace`
/// shows the back-end's side of a failing test.
pub fn blk_server(disk_len: u64, blk: BlkConfig, engine: EngineConfig) -> Arc<Server<Blk>> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dev = Blk::new(memory_disk(disk_len), blk).unwrap();
    Arc::new(Server::new(dev, engine))
}
