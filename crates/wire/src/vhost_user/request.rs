//! Typed vhost-user requests and replies: decoding with validation, and encoding.
//!
//! [`FrontendRequest`] covers what a block or net back-end needs from the front-end;
//! [`BackendRequest`] what the back-end sends on its channel; [`Reply`] the answers. Decoding
//! takes the header, the payload and the file descriptors that came with them, checks sizes,
//! descriptor counts and field values, and owns the descriptors from then on: any that a
//! request does not take are closed, never leaked. Requests without payload accept an empty
//! one or a single ignored `u64` (some front-ends send one). Nothing here does I/O.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::header::{BackendReq, FrontendReq, Header};
use super::payload::{
    ConfigHeader, LogArea, MemoryRegion, MemoryTableHeader, SingleMemoryRegion, VringAddr,
    VringState, BASELINE_MEM_REGIONS, MAX_CONFIG_SIZE, VRING_F_LOG, VRING_INDEX_MASK, VRING_NOFD,
};
use crate::error::WireError;
use crate::iotlb_msg::IotlbMsg;

/// A memory region and the file descriptor that backs it.
#[derive(Debug)]
pub struct RegionFd {
    /// Where the region is.
    pub region: MemoryRegion,
    /// The memory (a memfd, say), mapped at `region.mmap_offset`.
    pub fd: OwnedFd,
}

/// The payload of SET_VRING_KICK/CALL/ERR: a queue index and an eventfd, or none.
#[derive(Debug)]
pub struct VringFile {
    /// Queue index (8 bits on the wire).
    pub index: u8,
    /// The eventfd; `None` when the NOFD bit is set (polling, or "no notifications").
    pub fd: Option<OwnedFd>,
}

/// A window of the device config space (GET_CONFIG asks with `data` zeroed, and is answered
/// with it filled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Offset in the config space.
    pub offset: u32,
    /// `VHOST_SET_CONFIG_TYPE_*`.
    pub flags: u32,
    /// The bytes (at most [`MAX_CONFIG_SIZE`]).
    pub data: Vec<u8>,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Most regions a SET_MEM_TABLE may carry.
    pub max_mem_regions: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_mem_regions: BASELINE_MEM_REGIONS,
        }
    }
}

/// A request from the front-end.
#[derive(Debug)]
#[allow(missing_docs)] // variants are named after their requests
pub enum FrontendRequest {
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    ResetOwner,
    SetMemTable(Vec<RegionFd>),
    SetLogBase { area: LogArea, fd: OwnedFd },
    SetLogFd(OwnedFd),
    SetVringNum(VringState),
    SetVringAddr(VringAddr),
    SetVringBase(VringState),
    GetVringBase(VringState),
    SetVringKick(VringFile),
    SetVringCall(VringFile),
    SetVringErr(VringFile),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    SetVringEnable(VringState),
    SetBackendReqFd(OwnedFd),
    IotlbMsg(IotlbMsg),
    GetConfig(Config),
    SetConfig(Config),
    ResetDevice,
    GetMaxMemSlots,
    AddMemReg(RegionFd),
    RemMemReg(MemoryRegion),
    SetStatus(u8),
    GetStatus,
}

/// Read exactly one `T` from `payload`.
fn exact<T: FromBytes>(req: u32, payload: &[u8]) -> Result<T, WireError> {
    T::read_from_bytes(payload).map_err(|_| WireError::PayloadSize {
        request: req,
        expected: std::mem::size_of::<T>(),
        got: payload.len(),
    })
}

/// Requests without payload: nothing, or one `u64` that is ignored.
fn no_payload(req: u32, payload: &[u8]) -> Result<(), WireError> {
    match payload.len() {
        0 | 8 => Ok(()),
        got => Err(WireError::PayloadSize {
            request: req,
            expected: 0,
            got,
        }),
    }
}

/// Exactly `n` descriptors; any others are closed when `fds` drops.
fn take_fds(req: u32, fds: Vec<OwnedFd>, n: usize) -> Result<Vec<OwnedFd>, WireError> {
    use std::cmp::Ordering::*;
    match fds.len().cmp(&n) {
        Equal => Ok(fds),
        Less => Err(WireError::MissingFds {
            request: req,
            expected: n,
            got: fds.len(),
        }),
        Greater => Err(WireError::UnexpectedFds {
            request: req,
            got: fds.len() - n,
        }),
    }
}

fn one_fd(req: u32, fds: Vec<OwnedFd>) -> Result<OwnedFd, WireError> {
    take_fds(req, fds, 1)?.pop().ok_or(WireError::MissingFds {
        request: req,
        expected: 1,
        got: 0,
    })
}

fn region(index: usize, r: MemoryRegion) -> Result<MemoryRegion, WireError> {
    r.validate()
        .map(|()| r)
        .map_err(|reason| WireError::Region { index, reason })
}

fn vring_file(req: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Result<VringFile, WireError> {
    let v: u64 = exact(req, payload)?;
    if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
        return Err(WireError::InvalidField {
            request: req,
            field: "vring file bits",
            value: v,
        });
    }
    let index = (v & VRING_INDEX_MASK) as u8;
    let fd = if v & VRING_NOFD != 0 {
        take_fds(req, fds, 0)?;
        None
    } else {
        Some(one_fd(req, fds)?)
    };
    Ok(VringFile { index, fd })
}

fn config(req: u32, payload: &[u8]) -> Result<Config, WireError> {
    let (hdr, data) =
        ConfigHeader::read_from_prefix(payload).map_err(|_| WireError::PayloadSize {
            request: req,
            expected: std::mem::size_of::<ConfigHeader>(),
            got: payload.len(),
        })?;
    let size = hdr.size as usize;
    if size > MAX_CONFIG_SIZE {
        return Err(WireError::InvalidField {
            request: req,
            field: "config size",
            value: hdr.size.into(),
        });
    }
    if data.len() != size {
        return Err(WireError::PayloadSize {
            request: req,
            expected: std::mem::size_of::<ConfigHeader>() + size,
            got: payload.len(),
        });
    }
    Ok(Config {
        offset: hdr.offset,
        flags: hdr.flags,
        data: data.to_vec(),
    })
}

fn config_bytes(c: &Config) -> Vec<u8> {
    let hdr = ConfigHeader {
        offset: c.offset,
        size: c.data.len() as u32,
        flags: c.flags,
    };
    let mut out = hdr.as_bytes().to_vec();
    out.extend_from_slice(&c.data);
    out
}

fn bytes_of<T: IntoBytes + Immutable + KnownLayout>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

impl FrontendRequest {
    /// The request code.
    pub fn req(&self) -> FrontendReq {
        use FrontendRequest as R;
        match self {
            R::GetFeatures => FrontendReq::GetFeatures,
            R::SetFeatures(_) => FrontendReq::SetFeatures,
            R::SetOwner => FrontendReq::SetOwner,
            R::ResetOwner => FrontendReq::ResetOwner,
            R::SetMemTable(_) => FrontendReq::SetMemTable,
            R::SetLogBase { .. } => FrontendReq::SetLogBase,
            R::SetLogFd(_) => FrontendReq::SetLogFd,
            R::SetVringNum(_) => FrontendReq::SetVringNum,
            R::SetVringAddr(_) => FrontendReq::SetVringAddr,
            R::SetVringBase(_) => FrontendReq::SetVringBase,
            R::GetVringBase(_) => FrontendReq::GetVringBase,
            R::SetVringKick(_) => FrontendReq::SetVringKick,
            R::SetVringCall(_) => FrontendReq::SetVringCall,
            R::SetVringErr(_) => FrontendReq::SetVringErr,
            R::GetProtocolFeatures => FrontendReq::GetProtocolFeatures,
            R::SetProtocolFeatures(_) => FrontendReq::SetProtocolFeatures,
            R::GetQueueNum => FrontendReq::GetQueueNum,
            R::SetVringEnable(_) => FrontendReq::SetVringEnable,
            R::SetBackendReqFd(_) => FrontendReq::SetBackendReqFd,
            R::IotlbMsg(_) => FrontendReq::IotlbMsg,
            R::GetConfig(_) => FrontendReq::GetConfig,
            R::SetConfig(_) => FrontendReq::SetConfig,
            R::ResetDevice => FrontendReq::ResetDevice,
            R::GetMaxMemSlots => FrontendReq::GetMaxMemSlots,
            R::AddMemReg(_) => FrontendReq::AddMemReg,
            R::RemMemReg(_) => FrontendReq::RemMemReg,
            R::SetStatus(_) => FrontendReq::SetStatus,
            R::GetStatus => FrontendReq::GetStatus,
        }
    }

    /// The requests this type can carry.
    pub const SUPPORTED: &'static [FrontendReq] = &[
        FrontendReq::GetFeatures,
        FrontendReq::SetFeatures,
        FrontendReq::SetOwner,
        FrontendReq::ResetOwner,
        FrontendReq::SetMemTable,
        FrontendReq::SetLogBase,
        FrontendReq::SetLogFd,
        FrontendReq::SetVringNum,
        FrontendReq::SetVringAddr,
        FrontendReq::SetVringBase,
        FrontendReq::GetVringBase,
        FrontendReq::SetVringKick,
        FrontendReq::SetVringCall,
        FrontendReq::SetVringErr,
        FrontendReq::GetProtocolFeatures,
        FrontendReq::SetProtocolFeatures,
        FrontendReq::GetQueueNum,
        FrontendReq::SetVringEnable,
        FrontendReq::SetBackendReqFd,
        FrontendReq::IotlbMsg,
        FrontendReq::GetConfig,
        FrontendReq::SetConfig,
        FrontendReq::ResetDevice,
        FrontendReq::GetMaxMemSlots,
        FrontendReq::AddMemReg,
        FrontendReq::RemMemReg,
        FrontendReq::SetStatus,
        FrontendReq::GetStatus,
    ];

    /// Decode a request from its header, payload and descriptors. Descriptors it does not
    /// take are closed.
    pub fn decode(
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        limits: &DecodeLimits,
    ) -> Result<Self, WireError> {
        use FrontendReq as Q;
        use FrontendRequest as R;
        let code = header.request;
        if header.is_reply() {
            return Err(WireError::InvalidField {
                request: code,
                field: "flags (a reply where a request was expected)",
                value: header.flags.into(),
            });
        }
        let Some(req) = Q::from_code(code).filter(|q| Self::SUPPORTED.contains(q)) else {
            return Err(WireError::UnknownRequest { request: code });
        };
        // Requests that take no descriptor: check that first, uniformly.
        let takes_fds = matches!(
            req,
            Q::SetMemTable
                | Q::SetLogBase
                | Q::SetLogFd
                | Q::SetVringKick
                | Q::SetVringCall
                | Q::SetVringErr
                | Q::SetBackendReqFd
                | Q::AddMemReg
                | Q::RemMemReg
        );
        let fds = if takes_fds {
            fds
        } else {
            take_fds(code, fds, 0)?
        };
        Ok(match req {
            Q::GetFeatures => no_payload(code, payload).map(|()| R::GetFeatures)?,
            Q::SetFeatures => R::SetFeatures(exact(code, payload)?),
            Q::SetOwner => no_payload(code, payload).map(|()| R::SetOwner)?,
            Q::ResetOwner => no_payload(code, payload).map(|()| R::ResetOwner)?,
            Q::SetMemTable => {
                let (hdr, rest) = MemoryTableHeader::read_from_prefix(payload).map_err(|_| {
                    WireError::PayloadSize {
                        request: code,
                        expected: std::mem::size_of::<MemoryTableHeader>(),
                        got: payload.len(),
                    }
                })?;
                let n = hdr.nregions as usize;
                if n == 0 || n > limits.max_mem_regions {
                    return Err(WireError::InvalidField {
                        request: code,
                        field: "nregions",
                        value: hdr.nregions.into(),
                    });
                }
                let regions =
                    <[MemoryRegion]>::ref_from_bytes_with_elems(rest, n).map_err(|_| {
                        WireError::PayloadSize {
                            request: code,
                            expected: std::mem::size_of::<MemoryTableHeader>()
                                + n * std::mem::size_of::<MemoryRegion>(),
                            got: payload.len(),
                        }
                    })?;
                let fds = take_fds(code, fds, n)?;
                let mut out = Vec::with_capacity(n);
                for (i, (r, fd)) in regions.iter().zip(fds).enumerate() {
                    out.push(RegionFd {
                        region: region(i, *r)?,
                        fd,
                    });
                }
                R::SetMemTable(out)
            }
            Q::SetLogBase => R::SetLogBase {
                area: exact(code, payload)?,
                fd: one_fd(code, fds)?,
            },
            Q::SetLogFd => {
                no_payload(code, payload)?;
                R::SetLogFd(one_fd(code, fds)?)
            }
            Q::SetVringNum => R::SetVringNum(exact(code, payload)?),
            Q::SetVringAddr => {
                let a: VringAddr = exact(code, payload)?;
                if a.flags & !VRING_F_LOG != 0 {
                    return Err(WireError::InvalidField {
                        request: code,
                        field: "vring address flags",
                        value: a.flags.into(),
                    });
                }
                R::SetVringAddr(a)
            }
            Q::SetVringBase => R::SetVringBase(exact(code, payload)?),
            Q::GetVringBase => R::GetVringBase(exact(code, payload)?),
            Q::SetVringKick => R::SetVringKick(vring_file(code, payload, fds)?),
            Q::SetVringCall => R::SetVringCall(vring_file(code, payload, fds)?),
            Q::SetVringErr => R::SetVringErr(vring_file(code, payload, fds)?),
            Q::GetProtocolFeatures => no_payload(code, payload).map(|()| R::GetProtocolFeatures)?,
            Q::SetProtocolFeatures => R::SetProtocolFeatures(exact(code, payload)?),
            Q::GetQueueNum => no_payload(code, payload).map(|()| R::GetQueueNum)?,
            Q::SetVringEnable => R::SetVringEnable(exact(code, payload)?),
            Q::SetBackendReqFd => {
                no_payload(code, payload)?;
                R::SetBackendReqFd(one_fd(code, fds)?)
            }
            Q::IotlbMsg => {
                if payload.len() != 32 {
                    return Err(WireError::PayloadSize {
                        request: code,
                        expected: 32,
                        got: payload.len(),
                    });
                }
                R::IotlbMsg(IotlbMsg::decode(payload)?)
            }
            Q::GetConfig => R::GetConfig(config(code, payload)?),
            Q::SetConfig => R::SetConfig(config(code, payload)?),
            Q::ResetDevice => no_payload(code, payload).map(|()| R::ResetDevice)?,
            Q::GetMaxMemSlots => no_payload(code, payload).map(|()| R::GetMaxMemSlots)?,
            Q::AddMemReg => {
                let m: SingleMemoryRegion = exact(code, payload)?;
                R::AddMemReg(RegionFd {
                    region: region(0, m.region)?,
                    fd: one_fd(code, fds)?,
                })
            }
            Q::RemMemReg => {
                let m: SingleMemoryRegion = exact(code, payload)?;
                // Some front-ends attach the region's fd again; it is not needed.
                if fds.len() > 1 {
                    return Err(WireError::UnexpectedFds {
                        request: code,
                        got: fds.len() - 1,
                    });
                }
                R::RemMemReg(region(0, m.region)?)
            }
            Q::SetStatus => {
                let v: u64 = exact(code, payload)?;
                let status = u8::try_from(v).map_err(|_| WireError::InvalidField {
                    request: code,
                    field: "device status",
                    value: v,
                })?;
                R::SetStatus(status)
            }
            Q::GetStatus => no_payload(code, payload).map(|()| R::GetStatus)?,
            // Not in SUPPORTED: refused above.
            _ => return Err(WireError::UnknownRequest { request: code }),
        })
    }

    /// The payload bytes of this request.
    pub fn encode_payload(&self) -> Result<Vec<u8>, WireError> {
        use FrontendRequest as R;
        Ok(match self {
            R::GetFeatures
            | R::SetOwner
            | R::ResetOwner
            | R::GetProtocolFeatures
            | R::GetQueueNum
            | R::ResetDevice
            | R::GetMaxMemSlots
            | R::GetStatus
            | R::SetLogFd(_)
            | R::SetBackendReqFd(_) => Vec::new(),
            R::SetFeatures(v) | R::SetProtocolFeatures(v) => bytes_of(v),
            R::SetMemTable(regions) => {
                let hdr = MemoryTableHeader {
                    nregions: regions.len() as u32,
                    padding: 0,
                };
                let mut out = bytes_of(&hdr);
                for r in regions {
                    out.extend_from_slice(r.region.as_bytes());
                }
                out
            }
            R::SetLogBase { area, .. } => bytes_of(area),
            R::SetVringNum(s) | R::SetVringBase(s) | R::GetVringBase(s) | R::SetVringEnable(s) => {
                bytes_of(s)
            }
            R::SetVringAddr(a) => bytes_of(a),
            R::SetVringKick(f) | R::SetVringCall(f) | R::SetVringErr(f) => {
                let nofd = if f.fd.is_none() { VRING_NOFD } else { 0 };
                bytes_of(&(u64::from(f.index) | nofd))
            }
            R::IotlbMsg(m) => m.encode()?.to_vec(),
            R::GetConfig(c) | R::SetConfig(c) => config_bytes(c),
            R::AddMemReg(r) => bytes_of(&SingleMemoryRegion {
                padding: 0,
                region: r.region,
            }),
            R::RemMemReg(region) => bytes_of(&SingleMemoryRegion {
                padding: 0,
                region: *region,
            }),
            R::SetStatus(s) => bytes_of(&u64::from(*s)),
        })
    }

    /// The descriptors to send with this request.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        use FrontendRequest as R;
        match self {
            R::SetMemTable(regions) => regions.iter().map(|r| r.fd.as_fd()).collect(),
            R::SetLogBase { fd, .. } | R::SetLogFd(fd) | R::SetBackendReqFd(fd) => vec![fd.as_fd()],
            R::SetVringKick(f) | R::SetVringCall(f) | R::SetVringErr(f) => {
                f.fd.iter().map(|fd| fd.as_fd()).collect()
            }
            R::AddMemReg(r) => vec![r.fd.as_fd()],
            _ => Vec::new(),
        }
    }

    /// Whether the protocol always answers this request (GET_* requests), whatever
    /// REPLY_ACK says.
    pub fn has_reply(&self) -> bool {
        reply_kind(self.req()).is_some()
    }
}

/// The kind of answer a request gets when it has one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A `u64`.
    U64,
    /// A `VringState` (GET_VRING_BASE).
    VringState,
    /// A config window (GET_CONFIG).
    Config,
    /// The log area echoed back (SET_LOG_BASE with `LOG_SHMFD`: QEMU waits for this reply
    /// to know the log is mapped).
    Log,
}

/// What `req` is answered with, if it is one of the requests that always get an answer.
/// Others get a `u64` status only when NEED_REPLY (REPLY_ACK) was set.
pub fn reply_kind(req: FrontendReq) -> Option<ReplyKind> {
    use FrontendReq as Q;
    match req {
        Q::GetFeatures
        | Q::GetProtocolFeatures
        | Q::GetQueueNum
        | Q::GetMaxMemSlots
        | Q::GetStatus => Some(ReplyKind::U64),
        Q::GetVringBase => Some(ReplyKind::VringState),
        Q::GetConfig => Some(ReplyKind::Config),
        Q::SetLogBase => Some(ReplyKind::Log),
        _ => None,
    }
}

/// An answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Features, counts, status, or the REPLY_ACK status (0 = success).
    U64(u64),
    /// GET_VRING_BASE.
    VringState(VringState),
    /// GET_CONFIG.
    Config(Config),
    /// SET_LOG_BASE.
    Log(LogArea),
}

impl Reply {
    /// Its kind.
    pub fn kind(&self) -> ReplyKind {
        match self {
            Reply::U64(_) => ReplyKind::U64,
            Reply::VringState(_) => ReplyKind::VringState,
            Reply::Config(_) => ReplyKind::Config,
            Reply::Log(_) => ReplyKind::Log,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::U64(v) => bytes_of(v),
            Reply::VringState(s) => bytes_of(s),
            Reply::Config(c) => config_bytes(c),
            Reply::Log(l) => bytes_of(l),
        }
    }

    /// Check what a peer can accept: a config window of at most [`MAX_CONFIG_SIZE`] bytes.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Reply::Config(c) if c.data.len() > MAX_CONFIG_SIZE => Err(WireError::InvalidField {
                request: FrontendReq::GetConfig.code(),
                field: "config size",
                value: c.data.len() as u64,
            }),
            _ => Ok(()),
        }
    }

    /// Decode the payload of an answer of kind `kind` to request `req`.
    pub fn decode(req: u32, kind: ReplyKind, payload: &[u8]) -> Result<Self, WireError> {
        Ok(match kind {
            ReplyKind::U64 => Reply::U64(exact(req, payload)?),
            ReplyKind::VringState => Reply::VringState(exact(req, payload)?),
            ReplyKind::Config => Reply::Config(config(req, payload)?),
            ReplyKind::Log => Reply::Log(exact(req, payload)?),
        })
    }
}

/// A request the back-end sends on the back-end channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendRequest {
    /// `BACKEND_IOTLB_MSG`: a MISS or an ACCESS_FAIL.
    IotlbMsg(IotlbMsg),
    /// `CONFIG_CHANGE_MSG`: the device config space changed.
    ConfigChange,
}

impl BackendRequest {
    /// The request code.
    pub fn req(&self) -> BackendReq {
        match self {
            BackendRequest::IotlbMsg(_) => BackendReq::IotlbMsg,
            BackendRequest::ConfigChange => BackendReq::ConfigChangeMsg,
        }
    }

    /// Decode; the back-end channel carries no descriptors for these requests.
    pub fn decode(header: &Header, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, WireError> {
        let code = header.request;
        match BackendReq::from_code(code) {
            Some(BackendReq::IotlbMsg) => {
                take_fds(code, fds, 0)?;
                if payload.len() != 32 {
                    return Err(WireError::PayloadSize {
                        request: code,
                        expected: 32,
                        got: payload.len(),
                    });
                }
                Ok(BackendRequest::IotlbMsg(IotlbMsg::decode(payload)?))
            }
            Some(BackendReq::ConfigChangeMsg) => {
                take_fds(code, fds, 0)?;
                no_payload(code, payload)?;
                Ok(BackendRequest::ConfigChange)
            }
            _ => Err(WireError::UnknownRequest { request: code }),
        }
    }

    /// The payload bytes.
    pub fn encode_payload(&self) -> Result<Vec<u8>, WireError> {
        Ok(match self {
            BackendRequest::IotlbMsg(m) => m.encode()?.to_vec(),
            BackendRequest::ConfigChange => Vec::new(),
        })
    }
}
