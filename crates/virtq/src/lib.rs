//! The device side of a split virtqueue, for a vhost device behind an IOMMU.
//!
//! Every address the device touches (the descriptor table, the avail and used rings, each
//! buffer, each indirect table) goes through a [`Translator`]: guest-physical addresses as
//! they are without `VIRTIO_F_ACCESS_PLATFORM`, IOVAs through the device IOTLB with it, with
//! the access direction checked. Ring translations are cached per queue and revalidated only
//! when the IOTLB reports an overlapping change.
//!
//! A miss never loses or half-does work: [`Queue::pop`] translates a whole chain before it
//! consumes the avail entry, so after a miss the queue parks, and once an UPDATE covers the
//! address the walk goes on from where it stopped, keeping what it translated (a chain
//! needing more entries than the IOTLB holds still finishes). Nothing is written before
//! that. The only limits on a chain are the device's ([`ChainLimits`]) and the ring's.
//! Hostile rings (loops, indices out of range, huge lengths, addresses outside memory, an
//! avail index jumping ahead) give typed errors, never panics or out-of-bounds accesses.
//!
//! Guest memory is reached only through vm-memory's volatile accessors. [`IotlbMemory`] makes
//! the IOTLB usable by rust-vmm crates (virtio-queue) as a vm-memory `GuestMemory`.

#![forbid(unsafe_code)]

mod chain;
mod log;
mod queue;
mod ring;
mod rw;
#[cfg(feature = "testing")]
pub mod testing;
mod translate;
mod vm;
mod walk;

pub use chain::{Chain, ChainError, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
pub use log::DirtyLog;
pub use queue::{ConfigError, PopError, Queue, AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY};
pub use ring::{avail_ring_len, desc_table_len, used_ring_len, RingError, MAX_QUEUE_SIZE};
pub use rw::{BufferError, Reader, Slice, Writer};
pub use translate::{Fault, GpaTranslator, IotlbTranslator, Translator};
pub use vm::IotlbMemory;
pub use walk::{ChainLimits, MAX_INDIRECT};
