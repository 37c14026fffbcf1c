//! What a device built on the back-end engine provides: its features, its config space, and
//! a handler per queue that serves a walked chain.
//!
//! The engine owns everything vhost-user and IOMMU: negotiation, memory, rings, translation,
//! misses, invalidations. A device only sees complete chains of guest-physical segments
//! ([`virtq::Chain`]) and guest memory, and decides what a request means and how a failed one
//! is reported to the driver. Handlers run on their queue's worker thread; they may block on
//! their backing store, never on the front-end.

use virtq::Chain;
use vm_memory::GuestMemoryMmap;

/// A virtio device served over vhost-user.
pub trait Device: Send + Sync + 'static {
    /// The per-queue request handler.
    type Handler: QueueHandler;

    /// Device feature bits to offer (device-specific ones and the ring features the device
    /// handles, e.g. `VIRTIO_RING_F_INDIRECT_DESC`). The engine adds `VIRTIO_F_VERSION_1`,
    /// `VIRTIO_F_ACCESS_PLATFORM` and `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64;

    /// Protocol features the device needs (e.g. `CONFIG`, `MQ`). The engine adds those the
    /// IOTLB needs (`REPLY_ACK`, `BACKEND_REQ`).
    fn protocol_features(&self) -> u64;

    /// Number of queues.
    fn queues(&self) -> u16;

    /// Largest queue size accepted.
    fn max_queue_size(&self) -> u16;

    /// Fill `buf` with the config space from `offset` (zeros past its end).
    fn read_config(&self, offset: u32, buf: &mut [u8]);

    /// Write the config space at `offset`; false if refused.
    fn write_config(&self, offset: u32, data: &[u8]) -> bool;

    /// The features the driver acked.
    fn set_features(&self, _acked: u64) {}

    /// A handler for queue `index`.
    fn handler(&self, index: u16) -> Self::Handler;
}

/// Serves the requests of one queue.
pub trait QueueHandler: Send + 'static {
    /// Serve one request; returns the number of bytes written to its device-writable
    /// buffers (the used length).
    fn serve(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> u32;

    /// Report a request the engine could not serve (an access the IOMMU denied, a malformed
    /// chain, a miss never answered). `status` is the guest-physical address of the last
    /// device-writable byte, when it could be translated. Returns the used length.
    fn fail(&mut self, status: Option<u64>, mem: &GuestMemoryMmap) -> u32;
}
