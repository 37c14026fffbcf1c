//! Typed errors of the wire crate: one variant per way a peer's bytes can be wrong.
//!
//! Every byte decoded here comes from an untrusted peer (a front-end, a back-end, the kernel).
//! Decoding never panics; it returns one of these. Framing errors say whether the byte stream
//! is still in step ([`WireError::is_fatal`]): a message that was read whole but is wrong in
//! itself leaves the connection usable, and if its header asked for a reply, the caller
//! answers with an error ([`crate::vhost_user::Connection::reject`]).

use std::io;

use iotlb::{InvalidPerm, RangeError};

use crate::vhost_user::Header;

/// A malformed or unexpected message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection between two messages.
    #[error("peer closed the connection")]
    Disconnected,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed after {got} of {expected} bytes of a message")]
    Truncated {
        /// Bytes the message needed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The header's version bits are not 1.
    #[error("unsupported vhost-user version in flags {flags:#x} (request {request})")]
    BadVersion {
        /// The request code.
        request: u32,
        /// The flags word.
        flags: u32,
        /// The whole header (payload was drained, the stream is in step).
        header: Header,
    },
    /// The header sets flag bits the protocol does not define.
    #[error("unknown vhost-user flags {flags:#x} (request {request})")]
    UnknownFlags {
        /// The request code.
        request: u32,
        /// The flags word.
        flags: u32,
        /// The header.
        header: Header,
    },
    /// The payload is larger than the configured cap; it was read and discarded.
    #[error("payload of {size} bytes exceeds the cap of {max} (request {})", header.request)]
    PayloadTooLarge {
        /// Announced payload size.
        size: u32,
        /// The cap.
        max: usize,
        /// The header.
        header: Header,
    },
    /// More file descriptors arrived than the cap allows (all were closed).
    #[error("{got} file descriptors attached, at most {max} allowed (request {})", header.request)]
    TooManyFds {
        /// How many arrived (a lower bound if the kernel truncated them).
        got: usize,
        /// The cap.
        max: usize,
        /// The header.
        header: Header,
    },
    /// The request code is not one this side handles.
    #[error("unknown or unsupported request {request}")]
    UnknownRequest {
        /// The request code.
        request: u32,
    },
    /// The payload size does not match what the request carries.
    #[error("request {request}: payload is {got} bytes, expected {expected}")]
    PayloadSize {
        /// The request code.
        request: u32,
        /// The expected size (or minimum, for variable payloads).
        expected: usize,
        /// The announced size.
        got: usize,
    },
    /// A request that needs file descriptors came without (enough of) them.
    #[error("request {request}: needs {expected} file descriptors, got {got}")]
    MissingFds {
        /// The request code.
        request: u32,
        /// Descriptors needed.
        expected: usize,
        /// Descriptors attached.
        got: usize,
    },
    /// File descriptors came with a request that takes none (or fewer); they were closed.
    #[error("request {request}: {got} unexpected file descriptors (closed)")]
    UnexpectedFds {
        /// The request code.
        request: u32,
        /// Descriptors attached beyond what it takes.
        got: usize,
    },
    /// A reply came for another request than the one sent, or without the REPLY flag.
    #[error("expected a reply to request {expected}, got request {got} with flags {flags:#x}")]
    UnexpectedReply {
        /// The request the reply should answer.
        expected: u32,
        /// The request code that came.
        got: u32,
        /// Its flags.
        flags: u32,
    },
    /// The peer answered a request with a failure status.
    #[error("request {request} failed at the peer (status {status:#x})")]
    PeerFailed {
        /// The request code.
        request: u32,
        /// The nonzero status.
        status: u64,
    },
    /// The peer answered with an empty reply: its failure form for requests that have a
    /// reply of their own.
    #[error("request {request} was refused by the peer (empty reply)")]
    PeerRefused {
        /// The request code.
        request: u32,
    },
    /// A field holds a value the protocol does not allow.
    #[error("request {request}: invalid {field} {value:#x}")]
    InvalidField {
        /// The request code (0 for Linux vhost messages).
        request: u32,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// An IOTLB message is malformed.
    #[error(transparent)]
    Iotlb(#[from] IotlbError),
    /// A memory region is malformed.
    #[error("memory region {index}: {reason}")]
    Region {
        /// Index of the region in its message.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

impl WireError {
    /// Whether the byte stream is out of step (or gone) after this error, so that the
    /// connection must be closed. Errors about one message that was read whole are not fatal.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            WireError::Io(_) | WireError::Disconnected | WireError::Truncated { .. }
        )
    }

    /// The header of the message the error is about, when the framing layer read one.
    pub fn header(&self) -> Option<&Header> {
        match self {
            WireError::BadVersion { header, .. }
            | WireError::UnknownFlags { header, .. }
            | WireError::PayloadTooLarge { header, .. }
            | WireError::TooManyFds { header, .. } => Some(header),
            _ => None,
        }
    }
}

/// A malformed IOTLB message (either dialect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    /// The IOTLB `type` byte is not one of MISS..BATCH_END.
    #[error("unknown IOTLB message type {0}")]
    UnknownType(u8),
    /// The `perm` byte is not valid for this message type.
    #[error("IOTLB message type {ty}: {perm}")]
    BadPerm {
        /// The IOTLB message type.
        ty: u8,
        /// The bad permission.
        perm: InvalidPerm,
    },
    /// An UPDATE (or a MISS/ACCESS_FAIL range) that is empty or runs past 2^64.
    #[error("IOTLB message type {ty}: {err}")]
    Range {
        /// The IOTLB message type.
        ty: u8,
        /// Why the range is invalid.
        err: RangeError,
    },
    /// The Linux message type is neither VHOST_IOTLB_MSG (1) nor VHOST_IOTLB_MSG_V2 (2), or
    /// not the one negotiated.
    #[error("unexpected vhost message type {0}")]
    UnknownMsgType(u32),
    /// A nonzero address space id without VHOST_BACKEND_F_IOTLB_ASID negotiated.
    #[error("address space id {0} without VHOST_BACKEND_F_IOTLB_ASID")]
    AsidNotNegotiated(u32),
    /// An UPDATE of the whole 2^64 space: its size does not fit the wire's `u64`.
    #[error("an UPDATE of the whole 64-bit space cannot be encoded (size 2^64)")]
    FullSpaceUpdate,
    /// A Linux message shorter than the struct.
    #[error("vhost message of {got} bytes, expected {expected}")]
    Short {
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}
