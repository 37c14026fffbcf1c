//! Linux vhost IOTLB messages on a `/dev/vhost-*` fd: `struct vhost_msg` and `vhost_msg_v2`.
//!
//! ```text
//! vhost_msg    { i32 type;  [4-byte hole]; union { vhost_iotlb_msg iotlb; u8 padding[64]; } }
//! vhost_msg_v2 { u32 type;  u32 asid;      union { vhost_iotlb_msg iotlb; u8 padding[64]; } }
//! ```
//! Both are 72 bytes with the union at offset 8. The kernel reads and writes one message per
//! `read()`/`write()`; which format it uses depends on `VHOST_BACKEND_F_IOTLB_MSG_V2` having
//! been set with `VHOST_SET_BACKEND_FEATURES`. Encoding zeroes the hole, the union's unused
//! bytes and the padding; decoding checks the type, the ASID against negotiation and the IOTLB
//! message itself (see [`crate::iotlb_msg`]). [`encode_raw`] writes a raw message without
//! validating it, for tests of how a peer checks what it is sent. No I/O here.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::IotlbError;
use crate::features::backend;
use crate::iotlb_msg::{IotlbMsg, VhostIotlbMsg};

/// `VHOST_IOTLB_MSG`: a `struct vhost_msg`.
pub const VHOST_IOTLB_MSG: u32 = 1;
/// `VHOST_IOTLB_MSG_V2`: a `struct vhost_msg_v2`.
pub const VHOST_IOTLB_MSG_V2: u32 = 2;
/// Bytes of either message.
pub const VHOST_MSG_SIZE: usize = 72;
/// Bytes the kernel needs at least on `write()` (type, hole or asid, and the iotlb message).
pub const VHOST_MSG_MIN_SIZE: usize = 8 + 32;

/// `struct vhost_msg`, byte for byte.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VhostMsg {
    /// `VHOST_IOTLB_MSG`.
    pub ty: i32,
    /// The hole before the 8-byte-aligned union; zero on send.
    pub hole: [u8; 4],
    /// The union: a `vhost_iotlb_msg` in the first 32 bytes, zero after.
    pub payload: [u8; 64],
}

/// `struct vhost_msg_v2`, byte for byte.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VhostMsgV2 {
    /// `VHOST_IOTLB_MSG_V2`.
    pub ty: u32,
    /// Address space id (0 unless `VHOST_BACKEND_F_IOTLB_ASID`).
    pub asid: u32,
    /// The union, as in [`VhostMsg`].
    pub payload: [u8; 64],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<VhostMsg>() == VHOST_MSG_SIZE);
    assert!(size_of::<VhostMsgV2>() == VHOST_MSG_SIZE);
    assert!(offset_of!(VhostMsg, payload) == 8);
    assert!(offset_of!(VhostMsgV2, asid) == 4);
    assert!(offset_of!(VhostMsgV2, payload) == 8);
};

/// What was negotiated with `VHOST_SET_BACKEND_FEATURES`, as far as messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsgFormat {
    /// `vhost_msg_v2` is in use.
    pub v2: bool,
    /// Address space ids may be nonzero.
    pub asid: bool,
}

impl MsgFormat {
    /// `vhost_msg` (no `VHOST_BACKEND_F_IOTLB_MSG_V2`), address space 0 only.
    pub const V1: MsgFormat = MsgFormat {
        v2: false,
        asid: false,
    };
    /// `vhost_msg_v2`, address space 0 only.
    pub const V2: MsgFormat = MsgFormat {
        v2: true,
        asid: false,
    };

    /// The format for the acked backend features.
    pub const fn from_backend_features(acked: u64) -> Self {
        MsgFormat {
            v2: acked & backend::IOTLB_MSG_V2 != 0,
            asid: acked & backend::IOTLB_ASID != 0,
        }
    }
}

/// An IOTLB message with its address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxIotlbMsg {
    /// Address space id (0 in v1).
    pub asid: u32,
    /// The message.
    pub msg: IotlbMsg,
}

/// Decode a message read from (or written to) a vhost fd in format `fmt`.
pub fn decode(bytes: &[u8], fmt: MsgFormat) -> Result<LinuxIotlbMsg, IotlbError> {
    if bytes.len() < VHOST_MSG_MIN_SIZE {
        return Err(IotlbError::Short {
            expected: VHOST_MSG_MIN_SIZE,
            got: bytes.len(),
        });
    }
    let ty = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = if fmt.v2 {
        VHOST_IOTLB_MSG_V2
    } else {
        VHOST_IOTLB_MSG
    };
    if ty != expected {
        return Err(IotlbError::UnknownMsgType(ty));
    }
    let asid = if fmt.v2 {
        u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]])
    } else {
        0
    };
    if asid != 0 && !fmt.asid {
        return Err(IotlbError::AsidNotNegotiated(asid));
    }
    let msg = IotlbMsg::decode(&bytes[8..])?;
    Ok(LinuxIotlbMsg { asid, msg })
}

/// Encode `msg` for address space `asid` in format `fmt`: 72 bytes, every unused byte zero.
pub fn encode(
    msg: &IotlbMsg,
    asid: u32,
    fmt: MsgFormat,
) -> Result<[u8; VHOST_MSG_SIZE], IotlbError> {
    if asid != 0 && !(fmt.v2 && fmt.asid) {
        return Err(IotlbError::AsidNotNegotiated(asid));
    }
    Ok(encode_raw(&msg.to_raw()?, asid, fmt))
}

/// Encode `raw` as it is, unchecked: the message type word for `fmt`, `asid` (v2 only; v1
/// has a zero hole there), the 32 bytes of `raw`, zeroes after. Nothing is validated (an
/// UPDATE of size 0 or an unknown IOTLB type go out as given), nor is `asid` checked
/// against `fmt.asid`: for tests of how a peer treats messages [`encode`] refuses to build.
pub fn encode_raw(raw: &VhostIotlbMsg, asid: u32, fmt: MsgFormat) -> [u8; VHOST_MSG_SIZE] {
    let mut payload = [0u8; 64];
    payload[..32].copy_from_slice(raw.as_bytes());
    let mut out = [0u8; VHOST_MSG_SIZE];
    if fmt.v2 {
        let m = VhostMsgV2 {
            ty: VHOST_IOTLB_MSG_V2,
            asid,
            payload,
        };
        out.copy_from_slice(m.as_bytes());
    } else {
        let m = VhostMsg {
            ty: VHOST_IOTLB_MSG as i32,
            hole: [0; 4],
            payload,
        };
        out.copy_from_slice(m.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotlb::{IovaRange, Perm};

    const V1: MsgFormat = MsgFormat::V1;
    const V2: MsgFormat = MsgFormat::V2;

    #[test]
    fn format_from_backend_features() {
        assert_eq!(MsgFormat::from_backend_features(0), V1);
        assert_eq!(MsgFormat::from_backend_features(0x2), V2);
        assert_eq!(
            MsgFormat::from_backend_features(0xa),
            MsgFormat {
                v2: true,
                asid: true
            }
        );
    }

    #[test]
    fn type_and_asid_are_checked() {
        let m = IotlbMsg::Invalidate {
            range: IovaRange::FULL,
        };
        let v1 = encode(&m, 0, V1).unwrap();
        let v2 = encode(&m, 0, V2).unwrap();
        assert_eq!(decode(&v1, V1).unwrap().msg, m);
        assert_eq!(decode(&v2, V2).unwrap().msg, m);
        assert_eq!(decode(&v1, V2), Err(IotlbError::UnknownMsgType(1)));
        assert_eq!(decode(&v2, V1), Err(IotlbError::UnknownMsgType(2)));
        let mut with_asid = v2;
        with_asid[4] = 7;
        assert_eq!(
            decode(&with_asid, V2),
            Err(IotlbError::AsidNotNegotiated(7))
        );
        let asid_ok = MsgFormat {
            v2: true,
            asid: true,
        };
        assert_eq!(decode(&with_asid, asid_ok).unwrap().asid, 7);
        assert_eq!(encode(&m, 7, V2), Err(IotlbError::AsidNotNegotiated(7)));
        assert_eq!(
            decode(&v1[..39], V1),
            Err(IotlbError::Short {
                expected: 40,
                got: 39
            })
        );
    }

    #[test]
    fn encode_raw_writes_what_it_is_given() {
        let raw = VhostIotlbMsg {
            iova: 0x1234_5678,
            size: 0,
            uaddr: 0x7f00_0000_1000,
            perm: 1,
            ty: 77,
            padding: [0; 6],
        };
        let v1 = encode_raw(&raw, 9, V1);
        let mut want = [0u8; VHOST_MSG_SIZE];
        want[0..4].copy_from_slice(&1u32.to_ne_bytes());
        want[8..16].copy_from_slice(&0x1234_5678u64.to_ne_bytes());
        want[24..32].copy_from_slice(&0x7f00_0000_1000u64.to_ne_bytes());
        want[32] = 1;
        want[33] = 77;
        assert_eq!(v1, want, "v1: no asid, an unknown type and size 0 as given");
        let v2 = encode_raw(&raw, 9, V2);
        want[0..4].copy_from_slice(&2u32.to_ne_bytes());
        want[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(v2, want, "v2: the asid, unchecked");
        // For a valid message it is `encode`.
        let m = IotlbMsg::Update {
            range: IovaRange::from_size(0x1000, 0x2000).unwrap(),
            uaddr: 0x7f00,
            perm: Perm::ReadOnly,
        };
        for fmt in [V1, V2] {
            assert_eq!(
                encode_raw(&m.to_raw().unwrap(), 0, fmt),
                encode(&m, 0, fmt).unwrap()
            );
        }
    }

    #[test]
    fn v1_hole_is_ignored_on_decode_and_zero_on_encode() {
        let m = IotlbMsg::Miss {
            iova: 0x1234,
            perm: Perm::WriteOnly,
        };
        let mut b = encode(&m, 0, V1).unwrap();
        assert_eq!(&b[4..8], &[0; 4]);
        assert!(b[8 + 26..].iter().all(|&x| x == 0));
        b[4..8].copy_from_slice(&[0xaa; 4]);
        assert_eq!(decode(&b, V1).unwrap().msg, m);
    }
}
