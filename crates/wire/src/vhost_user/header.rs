//! The vhost-user message header and the request codes of both channels.
//!
//! Every message starts with `u32 request; u32 flags; u32 size` (host byte order), then `size`
//! bytes of payload; file descriptors travel as SCM_RIGHTS ancillary data. Flags: bits 0-1
//! the version (always 1), bit 2 REPLY, bit 3 NEED_REPLY; other bits are undefined and
//! rejected. Request codes of the front-end channel and of the back-end channel
//! (`SET_BACKEND_REQ_FD`) are separate number spaces.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes of a header.
pub const HEADER_SIZE: usize = 12;

/// Header flag bits.
pub mod flags {
    /// The version field.
    pub const VERSION_MASK: u32 = 0x3;
    /// The only version.
    pub const VERSION_1: u32 = 0x1;
    /// This message is a reply.
    pub const REPLY: u32 = 0x4;
    /// The sender wants a reply (REPLY_ACK, or a request that always has one).
    pub const NEED_REPLY: u32 = 0x8;
    /// Every defined bit.
    pub const KNOWN: u32 = VERSION_MASK | REPLY | NEED_REPLY;
}

/// A vhost-user header.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// `flags::*`.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);

impl Header {
    /// A version-1 header for `request` with `size` bytes of payload.
    pub const fn new(request: u32, size: u32, need_reply: bool) -> Self {
        Header {
            request,
            flags: flags::VERSION_1 | if need_reply { flags::NEED_REPLY } else { 0 },
            size,
        }
    }

    /// The header of a reply to `self` with `size` bytes of payload.
    pub const fn reply(&self, size: u32) -> Self {
        Header {
            request: self.request,
            flags: flags::VERSION_1 | flags::REPLY,
            size,
        }
    }

    /// Whether the sender asked for a reply.
    pub const fn needs_reply(&self) -> bool {
        self.flags & flags::NEED_REPLY != 0
    }

    /// Whether this is a reply.
    pub const fn is_reply(&self) -> bool {
        self.flags & flags::REPLY != 0
    }

    /// The version field.
    pub const fn version(&self) -> u32 {
        self.flags & flags::VERSION_MASK
    }
}

macro_rules! request_codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:expr,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        #[allow(missing_docs)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $code,)*
        }

        impl $name {
            /// The request with this code, if the protocol defines one.
            pub const fn from_code(code: u32) -> Option<Self> {
                match code {
                    $($code => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// Its code.
            pub const fn code(self) -> u32 {
                self as u32
            }
        }
    };
}

request_codes! {
    /// Requests the front-end sends on the main socket (`VHOST_USER_*`).
    FrontendReq {
        GetFeatures = 1,
        SetFeatures = 2,
        SetOwner = 3,
        ResetOwner = 4,
        SetMemTable = 5,
        SetLogBase = 6,
        SetLogFd = 7,
        SetVringNum = 8,
        SetVringAddr = 9,
        SetVringBase = 10,
        GetVringBase = 11,
        SetVringKick = 12,
        SetVringCall = 13,
        SetVringErr = 14,
        GetProtocolFeatures = 15,
        SetProtocolFeatures = 16,
        GetQueueNum = 17,
        SetVringEnable = 18,
        SendRarp = 19,
        NetSetMtu = 20,
        SetBackendReqFd = 21,
        IotlbMsg = 22,
        SetVringEndian = 23,
        GetConfig = 24,
        SetConfig = 25,
        CreateCryptoSession = 26,
        CloseCryptoSession = 27,
        PostcopyAdvise = 28,
        PostcopyListen = 29,
        PostcopyEnd = 30,
        GetInflightFd = 31,
        SetInflightFd = 32,
        GpuSetSocket = 33,
        ResetDevice = 34,
        VringKick = 35,
        GetMaxMemSlots = 36,
        AddMemReg = 37,
        RemMemReg = 38,
        SetStatus = 39,
        GetStatus = 40,
        GetSharedObject = 41,
        SetDeviceStateFd = 42,
        CheckDeviceState = 43,
        GetShmemConfig = 44,
    }
}

request_codes! {
    /// Requests the back-end sends on the back-end channel (`VHOST_USER_BACKEND_*`).
    BackendReq {
        IotlbMsg = 1,
        ConfigChangeMsg = 2,
        VringHostNotifierMsg = 3,
        VringCall = 4,
        VringErr = 5,
        SharedObjectAdd = 6,
        SharedObjectRemove = 7,
        SharedObjectLookup = 8,
        ShmemMap = 9,
        ShmemUnmap = 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_the_spec_numbers() {
        assert_eq!(FrontendReq::IotlbMsg.code(), 22);
        assert_eq!(BackendReq::IotlbMsg.code(), 1);
        assert_eq!(FrontendReq::GetMaxMemSlots.code(), 36);
        assert_eq!(FrontendReq::SetBackendReqFd.code(), 21);
        for code in 0..64 {
            if let Some(r) = FrontendReq::from_code(code) {
                assert_eq!(r.code(), code);
            }
        }
        assert_eq!(FrontendReq::from_code(0), None);
        assert_eq!(FrontendReq::from_code(45), None);
        assert_eq!(BackendReq::from_code(11), None);
    }

    #[test]
    fn header_flags() {
        let h = Header::new(22, 32, true);
        assert_eq!(h.flags, 0x9);
        assert!(h.needs_reply() && !h.is_reply() && h.version() == 1);
        let r = h.reply(8);
        assert_eq!((r.request, r.flags, r.size), (22, 0x5, 8));
        assert!(r.is_reply() && !r.needs_reply());
    }
}
