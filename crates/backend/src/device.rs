//! What a device built on the back-end engine provides: its features, its config space, and
//! a handler per queue that serves a walked chain.
//!
//! The engine owns everything vhost-user and IOMMU: negotiation, memory, rings, translation,
//! misses, invalidations. A device only sees complete chains of guest-physical segments
//! ([`virtq::Chain`]) and guest memory, and decides what a request means and how a failed one
//! is reported to the driver. Handlers run on their queue's worker thread; they may block on
//! their backing store, never on the front-end.
//!
//! **A completion is the truth** (design invariant 11): a handler says whether it wrote the
//! request's outcome for the driver. One that could not ([`Unreported`]) is never put on the
//! used ring; the engine stops that queue instead (see the worker's documentation).

use std::sync::Arc;

use virtq::{Chain, ChainLimits};
use vm_memory::GuestMemoryMmap;

use crate::shared::Wakers;

/// A request whose outcome could not be written for the driver (no place for a status in the
/// chain, or the write failed). It must not be completed as if it had been served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request's status could not be written")]
pub struct Unreported;

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

    /// The limits the device puts on one chain, as it advertises them (for virtio-blk,
    /// `seg_max` and `size_max`). The engine refuses a chain beyond them before translating
    /// its buffers and fails the request ([`QueueHandler::fail`]). Nothing else limits a
    /// chain: not the IOTLB's size.
    fn chain_limits(&self) -> ChainLimits {
        ChainLimits::NONE
    }

    /// A handler for queue `index`. `wake` wakes this session's queue workers: a handler
    /// whose [`QueueHandler::ready`] changes because of another queue (a frame one queue
    /// sends for another to receive) wakes that queue with it.
    fn handler(&self, index: u16, wake: QueueWakers) -> Self::Handler;
}

/// Wakes the queue workers of one session from a handler (another queue's) or a device
/// thread: the woken worker asks its handler [`QueueHandler::ready`] and looks at its ring
/// again. Never blocks; waking a queue that does not run does nothing.
#[derive(Debug, Clone)]
pub struct QueueWakers(pub(crate) Arc<Wakers>);

impl QueueWakers {
    /// Wake queue `index`'s worker. Call it after the change that makes its handler ready:
    /// a worker that looked before the change sees the wake-up, one that looks after sees
    /// the change, so no wake-up is lost.
    pub fn wake(&self, index: u16) {
        self.0.wake(index);
    }
}

/// Further chains of the queue being served, for a request whose outcome spans several
/// (virtio-net's mergeable receive buffers). Each is walked and translated whole, in the
/// same quiescence section as the first.
pub trait MoreChains {
    /// The queue's next chain, after the previous one (the chain given to
    /// [`QueueHandler::serve`] or the last one this returned) was given `used` bytes.
    /// `None` when there is none yet, or its translation is not there yet: the handler
    /// then answers [`Served::Retry`], and the engine puts every chain of the request back
    /// and serves the request again when the ring changes or the translation comes.
    fn next(&mut self, used: u32) -> Option<&Chain>;
}

/// What serving a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Its outcome, success or the device's error status, is written for the driver; the
    /// number of bytes written to its device-writable buffers (the used length).
    Done(u32),
    /// Parsed and checked, but its work is a call that touches no guest memory and may take
    /// long (an fsync, a fallocate), which must not run while the engine's invalidations wait
    /// (inside the quiescence section). The engine leaves the section and calls
    /// [`QueueHandler::run_deferred`], then has the outcome written in a new section with
    /// [`QueueHandler::report_deferred`], at the status byte translated anew.
    Deferred,
    /// Nothing delivered: the chain (and every chain taken with [`MoreChains::next`]) goes
    /// back on the ring, untouched as far as the driver can tell (nothing was completed),
    /// and is served again: after a [`MoreChains::next`] that gave `None`, when what was
    /// missing came; otherwise at once, [`QueueHandler::ready`] asked first (a device that
    /// dropped what it had to deliver).
    Retry,
}

/// Serves the requests of one queue.
pub trait QueueHandler: Send + 'static {
    /// Serve one request, inside the engine's quiescence section (every guest address the
    /// chain holds stays valid until it returns). [`Unreported`] if no outcome could be
    /// written (the engine then does not complete it). `more` gives the queue's next chains
    /// to a request that needs several; a device whose requests are one chain each ignores
    /// it. With [`Served::Done`], the used length is the last chain's; the earlier ones got
    /// what was passed to [`MoreChains::next`]; all of them are published at once.
    fn serve(
        &mut self,
        chain: &Chain,
        more: &mut dyn MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Result<Served, Unreported>;

    /// Whether the handler has work for its ring: a queue whose chains are buffers the
    /// device fills (virtio-net's receive queue) has none until a frame waits, and a queue
    /// whose outcome needs room elsewhere (a transmit queue whose peer is full) none until
    /// there is room. Asked before each chain is taken; while it is false the worker
    /// sleeps until a kick or a [`QueueWakers::wake`]. Must not block.
    fn ready(&mut self) -> bool {
        true
    }

    /// Whether a failed request's outcome is written into the chain (a status byte, as
    /// virtio-blk's). A device without one (virtio-net: a failed frame is dropped and its
    /// buffer given back) answers false: the engine then completes a failed request with
    /// used length 0 and writes nothing, and [`QueueHandler::fail`] is not called.
    fn status_in_chain(&self) -> bool {
        true
    }

    /// Do the work of the request [`QueueHandler::serve`] answered with [`Served::Deferred`],
    /// outside every quiescence section: guest memory must not be touched here (what the
    /// chain held may be unmapped meanwhile). Called once per deferred request, before
    /// [`QueueHandler::report_deferred`].
    fn run_deferred(&mut self) {}

    /// Write the outcome of the deferred request at guest-physical `status` (the chain's last
    /// device-writable byte, translated for writing in the current section). Returns the
    /// used length, or [`Unreported`] if the write failed. A device that never defers keeps
    /// the default, which reports the request as failed.
    fn report_deferred(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        self.fail(status, mem)
    }

    /// Report a request the engine could not serve (an access the IOMMU denied, a malformed
    /// chain or one beyond [`Device::chain_limits`], a miss never answered): write the
    /// device's error status at guest-physical `status`, the chain's last device-writable
    /// byte, translated for writing. Returns the used length, or [`Unreported`] if the write
    /// failed.
    fn fail(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported>;
}
