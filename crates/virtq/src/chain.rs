//! A descriptor chain once walked: its head, and its buffers as guest-physical segments.
//!
//! The engine fills a [`Chain`] only when every address of the chain translated, so a chain
//! the device sees is complete: driver-to-device bytes in [`Chain::readable`], then
//! device-to-driver bytes in [`Chain::writable`], split where guest-physical memory is not
//! contiguous (pieces that are adjacent are merged, across mappings and descriptors). The
//! buffers are reused from pop to pop (no allocation on the hot path once warm).
//! [`ChainError`] lists why a chain the driver wrote is refused. No memory access here.

use iotlb::Segment;

use crate::rw::{Reader, Writer};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// A split-ring descriptor, decoded from its 16 little-endian bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Buffer address (IOVA or guest-physical).
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor, if `DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// Decode the wire form.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[0..8]);
        Descriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Whether the buffer is device-writable.
    pub fn is_write(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }

    /// Whether the chain continues.
    pub fn has_next(&self) -> bool {
        self.flags & DESC_F_NEXT != 0
    }

    /// Whether the buffer is an indirect table.
    pub fn is_indirect(&self) -> bool {
        self.flags & DESC_F_INDIRECT != 0
    }
}

/// Why a chain written by the driver is refused. The avail entry is consumed and the device
/// completes the head with an error (but for [`ChainError::HeadOutOfRange`]: nothing to
/// complete, the ring is broken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail ring names a head outside the descriptor table.
    #[error("head {head} is outside a queue of {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A `next` outside the table it points into.
    #[error("descriptor {index}: next {next} is outside its table of {table}")]
    NextOutOfRange {
        /// The descriptor.
        index: u16,
        /// Its next.
        next: u16,
        /// Entries of its table.
        table: u32,
    },
    /// More descriptors than the queue size (or than its indirect table holds): a loop, or
    /// a chain the driver may not build.
    #[error("chain longer than its table of {limit} descriptors (a loop?)")]
    TooLong {
        /// The limit.
        limit: u32,
    },
    /// More descriptors than the device allows in a chain ([`crate::ChainLimits`]).
    #[error("chain has more than the {limit} descriptors the device allows")]
    TooManyDescriptors {
        /// The limit.
        limit: u32,
    },
    /// A descriptor longer than the device allows ([`crate::ChainLimits`]).
    #[error("descriptor {index} is {len} bytes, more than the {limit} the device allows")]
    DescriptorTooLong {
        /// The descriptor.
        index: u16,
        /// Its length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The buffers add up to more than `u32::MAX` bytes.
    #[error("chain length exceeds 4 GiB")]
    LengthOverflow,
    /// A driver-to-device buffer after a device-to-driver one.
    #[error("readable descriptor {index} after a writable one")]
    ReadableAfterWritable {
        /// The descriptor.
        index: u16,
    },
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has NEXT.
    #[error("indirect descriptor {index} also has NEXT")]
    IndirectWithNext {
        /// The descriptor.
        index: u16,
    },
    /// An indirect table whose length is 0 or not a multiple of 16.
    #[error("indirect table of {len} bytes")]
    IndirectLength {
        /// Its length.
        len: u32,
    },
    /// A buffer outside guest memory (or past 2^64).
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// A walked chain.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    pub(crate) head: u16,
    pub(crate) readable: Vec<Segment>,
    pub(crate) writable: Vec<Segment>,
    pub(crate) readable_len: u32,
    pub(crate) writable_len: u32,
    pub(crate) descriptors: u16,
}

impl Chain {
    /// An empty chain, to be filled by [`crate::Queue::pop`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The head descriptor index (what the used ring gets back).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Driver-to-device buffers, as guest-physical segments.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// Device-to-driver buffers, as guest-physical segments.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Descriptors walked (indirect table entries included).
    pub fn descriptors(&self) -> u16 {
        self.descriptors
    }

    /// A reader over the readable bytes.
    pub fn reader<'a, M: vm_memory::GuestMemoryBackend>(&'a self, mem: &'a M) -> Reader<'a, M> {
        Reader::new(mem, &self.readable)
    }

    /// A writer over the writable bytes.
    pub fn writer<'a, M: vm_memory::GuestMemoryBackend>(&'a self, mem: &'a M) -> Writer<'a, M> {
        Writer::new(mem, &self.writable)
    }

    pub(crate) fn clear(&mut self) {
        self.head = 0;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.descriptors = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_wire_form() {
        let d = Descriptor {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: 0x0102,
        };
        let b = d.to_bytes();
        assert_eq!(
            b,
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xcc, 0xbb, 0xaa, 0x99, 3, 0, 0x02,
                0x01
            ]
        );
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert!(d.is_write() && d.has_next() && !d.is_indirect());
    }
}
