//! Golden byte vectors, written by hand from the C layouts (host byte order, little-endian
//! here), for every IOTLB message kind in `vhost_msg` and `vhost_msg_v2`, and for vhost-user
//! messages of both channels. Each vector is checked both ways: our encoding must produce
//! exactly these bytes (padding, holes and unused union bytes zero), and decoding them must
//! give the typed message back.

use iotlb::{IovaRange, Perm};
use wire::iotlb_msg::IotlbMsg;
use wire::linux::{self, MsgFormat};
use wire::vhost_user::{
    BackendRequest, DecodeLimits, FrontendRequest, Header, Reply, ReplyKind, VringAddr, VringFile,
    VringState,
};

/// Bytes from a hex string with spaces and `|` as separators.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

const V1: MsgFormat = MsgFormat::V1;
const V2: MsgFormat = MsgFormat::V2;

/// The 32-byte `vhost_iotlb_msg` of each kind, and the typed message.
fn iotlb_cases() -> Vec<(&'static str, IotlbMsg, &'static str)> {
    vec![
        (
            "miss",
            IotlbMsg::Miss {
                iova: 0xdead_b000,
                perm: Perm::WriteOnly,
            },
            // iova                    size                    uaddr                   perm type pad
            "00 b0 ad de 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 02 01 000000000000",
        ),
        (
            "update",
            IotlbMsg::Update {
                range: IovaRange::from_size(0x1000, 0x2000).unwrap(),
                uaddr: 0x7f00_0000_1000,
                perm: Perm::ReadWrite,
            },
            "00 10 00 00 00 00 00 00 | 00 20 00 00 00 00 00 00 | 00 10 00 00 00 7f 00 00 | 03 02 000000000000",
        ),
        (
            "invalidate",
            IotlbMsg::Invalidate {
                range: IovaRange::from_size(0xfef0_0000, 0x1000).unwrap(),
            },
            "00 00 f0 fe 00 00 00 00 | 00 10 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 03 000000000000",
        ),
        (
            "invalidate-all",
            IotlbMsg::Invalidate {
                range: IovaRange::FULL,
            },
            "00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 03 000000000000",
        ),
        (
            "access-fail",
            IotlbMsg::AccessFail {
                iova: 0xbeef,
                perm: Perm::ReadOnly,
            },
            "ef be 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 01 04 000000000000",
        ),
        (
            "batch-begin",
            IotlbMsg::BatchBegin,
            "00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 05 000000000000",
        ),
        (
            "batch-end",
            IotlbMsg::BatchEnd,
            "00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 00 00 00 00 00 00 00 | 00 06 000000000000",
        ),
    ]
}

#[test]
fn vhost_iotlb_msg_every_kind() {
    for (name, msg, bytes) in iotlb_cases() {
        let want = hex(bytes);
        assert_eq!(want.len(), 32, "{name}");
        assert_eq!(msg.encode().unwrap().to_vec(), want, "{name}: encode");
        assert_eq!(IotlbMsg::decode(&want).unwrap(), msg, "{name}: decode");
    }
}

#[test]
fn vhost_msg_v1_and_v2_every_kind() {
    for (name, msg, bytes) in iotlb_cases() {
        let body = hex(bytes);
        // v1: i32 type 1, a 4-byte hole, the union (iotlb message, then 32 zero bytes).
        let mut v1 = hex("01 00 00 00 | 00 00 00 00");
        v1.extend_from_slice(&body);
        v1.extend_from_slice(&[0; 32]);
        // v2: u32 type 2, u32 asid, the union.
        let mut v2 = hex("02 00 00 00 | 00 00 00 00");
        v2.extend_from_slice(&body);
        v2.extend_from_slice(&[0; 32]);
        assert_eq!(
            linux::encode(&msg, 0, V1).unwrap().to_vec(),
            v1,
            "{name} v1"
        );
        assert_eq!(
            linux::encode(&msg, 0, V2).unwrap().to_vec(),
            v2,
            "{name} v2"
        );
        assert_eq!(linux::decode(&v1, V1).unwrap().msg, msg, "{name} v1");
        assert_eq!(linux::decode(&v2, V2).unwrap().msg, msg, "{name} v2");
    }
    // An ASID when negotiated lands at offset 4.
    let asid = MsgFormat {
        v2: true,
        asid: true,
    };
    let b = linux::encode(&IotlbMsg::BatchBegin, 0x0102_0304, asid).unwrap();
    assert_eq!(&b[..8], &hex("02 00 00 00 | 04 03 02 01")[..]);
}

#[test]
fn encoding_never_leaks_a_nonzero_byte_outside_the_fields() {
    // Field bytes of vhost_iotlb_msg: iova 0..8, size 8..16, uaddr 16..24, perm 24, type 25.
    for (name, msg, _) in iotlb_cases() {
        for fmt in [V1, V2] {
            let b = linux::encode(&msg, 0, fmt).unwrap();
            assert_eq!(b.len(), 72);
            if !fmt.v2 {
                assert_eq!(&b[4..8], &[0; 4], "{name}: the v1 hole");
            }
            assert!(
                b[8 + 26..].iter().all(|&x| x == 0),
                "{name}: padding and union tail"
            );
        }
    }
}

fn frame(req: &FrontendRequest, need_reply: bool) -> Vec<u8> {
    let payload = req.encode_payload().unwrap();
    let h = Header::new(req.req().code(), payload.len() as u32, need_reply);
    let mut out = zerocopy::IntoBytes::as_bytes(&h).to_vec();
    out.extend_from_slice(&payload);
    out
}

fn decode_frame(bytes: &[u8]) -> FrontendRequest {
    let (h, payload) = bytes.split_at(12);
    let h: Header = zerocopy::FromBytes::read_from_bytes(h).unwrap();
    assert_eq!(h.size as usize, payload.len());
    FrontendRequest::decode(&h, payload, Vec::new(), &DecodeLimits::default()).unwrap()
}

#[test]
fn vhost_user_frontend_messages() {
    // GET_FEATURES: request 1, version 1, no payload.
    let b = frame(&FrontendRequest::GetFeatures, false);
    assert_eq!(b, hex("01000000 | 01000000 | 00000000"));
    assert!(matches!(decode_frame(&b), FrontendRequest::GetFeatures));

    // SET_FEATURES with VERSION_1 | PROTOCOL_FEATURES | ACCESS_PLATFORM.
    let feats = (1u64 << 32) | (1 << 30) | (1 << 33);
    let b = frame(&FrontendRequest::SetFeatures(feats), false);
    assert_eq!(b, hex("02000000 | 01000000 | 08000000 | 00000040 03000000"));
    assert!(matches!(decode_frame(&b), FrontendRequest::SetFeatures(f) if f == feats));

    // SET_VRING_ADDR: index, flags, then descriptor, used, available, log.
    let addr = VringAddr {
        index: 1,
        flags: 0,
        descriptor: 0x1_0000,
        used: 0x2_0000,
        available: 0x3_0000,
        log: 0,
    };
    let b = frame(&FrontendRequest::SetVringAddr(addr), true);
    assert_eq!(
        b,
        hex(
            "09000000 | 09000000 | 28000000 | 01000000 00000000 | 0000010000000000 | \
             0000020000000000 | 0000030000000000 | 0000000000000000"
        )
    );
    assert!(matches!(decode_frame(&b), FrontendRequest::SetVringAddr(a) if a == addr));

    // IOTLB_MSG (22) carrying an UPDATE, with NEED_REPLY as QEMU always sets it.
    let update = IotlbMsg::Update {
        range: IovaRange::from_size(0x1000, 0x2000).unwrap(),
        uaddr: 0x7f00_0000_1000,
        perm: Perm::ReadWrite,
    };
    let b = frame(&FrontendRequest::IotlbMsg(update), true);
    let mut want = hex("16000000 | 09000000 | 20000000");
    want.extend_from_slice(&update.encode().unwrap());
    assert_eq!(b, want);
    assert!(matches!(decode_frame(&b), FrontendRequest::IotlbMsg(m) if m == update));

    // SET_VRING_CALL for queue 2 with the NOFD bit.
    let b = frame(
        &FrontendRequest::SetVringCall(VringFile { index: 2, fd: None }),
        false,
    );
    assert_eq!(b, hex("0d000000 | 01000000 | 08000000 | 0201000000000000"));
    assert!(matches!(
        decode_frame(&b),
        FrontendRequest::SetVringCall(VringFile { index: 2, fd: None })
    ));

    // GET_VRING_BASE for queue 0.
    let b = frame(
        &FrontendRequest::GetVringBase(VringState { index: 0, num: 0 }),
        false,
    );
    assert_eq!(b, hex("0b000000 | 01000000 | 08000000 | 00000000 00000000"));

    // SET_STATUS: the status byte in a u64.
    let b = frame(&FrontendRequest::SetStatus(0x0f), true);
    assert_eq!(b, hex("27000000 | 09000000 | 08000000 | 0f00000000000000"));
}

#[test]
fn vhost_user_replies_and_backend_channel() {
    // Reply to GET_FEATURES: same request, version 1 | REPLY, a u64.
    let h = Header::new(1, 0, false).reply(8);
    assert_eq!(
        zerocopy::IntoBytes::as_bytes(&h),
        &hex("01000000 | 05000000 | 08000000")[..]
    );
    let r = Reply::U64(0x1_4000_0000);
    assert_eq!(r.encode(), hex("0000004001000000"));
    assert_eq!(
        Reply::decode(1, ReplyKind::U64, &hex("0000004001000000")).unwrap(),
        r
    );
    assert_eq!(
        Reply::decode(11, ReplyKind::VringState, &hex("00000000 2a000000")).unwrap(),
        Reply::VringState(VringState { index: 0, num: 42 })
    );

    // BACKEND_IOTLB_MSG (1) with a MISS, as our back-end sends it.
    let miss = BackendRequest::IotlbMsg(IotlbMsg::Miss {
        iova: 0x8000_0000,
        perm: Perm::ReadOnly,
    });
    let payload = miss.encode_payload().unwrap();
    assert_eq!(
        payload,
        hex("0000008000000000 | 0000000000000000 | 0000000000000000 | 01 01 000000000000")
    );
    let h = Header::new(1, 32, false);
    assert_eq!(
        BackendRequest::decode(&h, &payload, Vec::new()).unwrap(),
        miss
    );
    // CONFIG_CHANGE_MSG (2) has no payload.
    let h = Header::new(2, 0, true);
    assert_eq!(
        BackendRequest::decode(&h, &[], Vec::new()).unwrap(),
        BackendRequest::ConfigChange
    );
}
