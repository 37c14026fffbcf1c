//! The vhost-user protocol: header and request codes, payload layouts, typed requests and
//! replies, and framing over a Unix socket with descriptor passing.

mod connection;
mod header;
mod payload;
mod request;

pub use connection::{
    answer, answer_for, Answer, Channel, Connection, Limits, RawMessage, MAX_FDS,
};
pub use header::{flags, BackendReq, FrontendReq, Header, HEADER_SIZE};
pub use payload::{
    ConfigHeader, LogArea, MemoryRegion, MemoryTableHeader, SingleMemoryRegion, VringAddr,
    VringState, BASELINE_MEM_REGIONS, LOG_PAGE, MAX_CONFIG_SIZE, VRING_F_LOG, VRING_INDEX_MASK,
    VRING_NOFD,
};
pub use request::{
    reply_kind, BackendRequest, Config, DecodeLimits, FrontendRequest, RegionFd, Reply, ReplyKind,
    VringFile,
};
