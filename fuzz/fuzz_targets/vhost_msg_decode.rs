//! Linux `vhost_msg` / `vhost_msg_v2` and bare `vhost_iotlb_msg` decoding.
//!
//! Input: the bytes as read from a `/dev/vhost-*` fd (or a vhost-user IOTLB payload). Every
//! decode that succeeds is checked against the input fields, re-encoded (which must succeed,
//! with every unused byte zero) and decoded again to the same typed value.

#![no_main]

use iotlb::{IovaRange, Perm};
use libfuzzer_sys::fuzz_target;
use wire::linux::{self, MsgFormat, VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_V2, VHOST_MSG_SIZE};
use wire::{IotlbError, IotlbMsg};

const FORMATS: [MsgFormat; 4] = [
    MsgFormat {
        v2: false,
        asid: false,
    },
    MsgFormat {
        v2: false,
        asid: true,
    },
    MsgFormat {
        v2: true,
        asid: false,
    },
    MsgFormat {
        v2: true,
        asid: true,
    },
];

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

/// The decoded message says what the 32 input bytes say.
fn check_against_input(m: &IotlbMsg, raw: &[u8]) {
    let (iova, size, uaddr, perm, ty) = (
        u64_at(raw, 0),
        u64_at(raw, 8),
        u64_at(raw, 16),
        raw[24],
        raw[25],
    );
    match *m {
        IotlbMsg::Miss { iova: i, perm: p } => {
            assert_eq!(ty, 1);
            assert_eq!((i, p.bits()), (iova, perm));
        }
        IotlbMsg::Update {
            range,
            uaddr: u,
            perm: p,
        } => {
            assert_eq!(ty, 2);
            assert_eq!(range.start(), iova);
            assert_eq!(range.size(), Some(size));
            assert_eq!((u, p.bits()), (uaddr, perm));
        }
        IotlbMsg::Invalidate { range } => {
            assert_eq!(ty, 3);
            if size == 0 {
                assert_eq!(range, IovaRange::FULL);
            } else {
                assert_eq!(range.start(), iova);
                assert_eq!(range.last(), iova.saturating_add(size - 1));
            }
        }
        IotlbMsg::AccessFail { iova: i, perm: p } => {
            assert_eq!(ty, 4);
            assert_eq!((i, p.bits()), (iova, perm));
        }
        IotlbMsg::BatchBegin => assert_eq!(ty, 5),
        IotlbMsg::BatchEnd => assert_eq!(ty, 6),
    }
}

/// Re-encode `m`: it must encode (decoded messages are never the unencodable full-space
/// UPDATE), every byte it does not use must be zero, and it must decode back to itself.
fn check_iotlb_round_trip(m: &IotlbMsg) -> [u8; 32] {
    let enc = m.encode().expect("a decoded IOTLB message must re-encode");
    assert_eq!(&enc[26..], &[0u8; 6], "tail padding must be zero");
    let zero_u64 = |off: usize, what: &str| assert_eq!(u64_at(&enc, off), 0, "{what} must be zero");
    match m {
        IotlbMsg::Miss { .. } | IotlbMsg::AccessFail { .. } => {
            zero_u64(8, "size");
            zero_u64(16, "uaddr");
        }
        IotlbMsg::Update { .. } => {}
        IotlbMsg::Invalidate { range } => {
            zero_u64(16, "uaddr");
            assert_eq!(enc[24], 0, "INVALIDATE perm must be zero");
            if *range == IovaRange::FULL {
                zero_u64(0, "iova of a full INVALIDATE");
                zero_u64(8, "size of a full INVALIDATE");
            }
        }
        IotlbMsg::BatchBegin | IotlbMsg::BatchEnd => {
            assert!(
                enc[..25].iter().all(|&b| b == 0),
                "batch markers carry nothing"
            );
        }
    }
    let again = IotlbMsg::decode(&enc).expect("an encoded IOTLB message must decode");
    assert_eq!(&again, m, "IOTLB round trip");
    check_against_input(&again, &enc);
    enc
}

fn check_linux(data: &[u8], fmt: MsgFormat) {
    let decoded = match linux::decode(data, fmt) {
        Ok(d) => d,
        Err(e) => {
            // Errors must be consistent with the input.
            match e {
                IotlbError::Short { expected, got } => {
                    assert_eq!(got, data.len());
                    assert!(got < expected);
                }
                IotlbError::AsidNotNegotiated(asid) => {
                    assert!(fmt.v2 && !fmt.asid && asid != 0);
                }
                IotlbError::UnknownMsgType(ty) => assert_eq!(ty, u32_at(data, 0)),
                IotlbError::FullSpaceUpdate => panic!("decode returned an encode error"),
                _ => {}
            }
            return;
        }
    };
    let ty = u32_at(data, 0);
    assert_eq!(
        ty,
        if fmt.v2 {
            VHOST_IOTLB_MSG_V2
        } else {
            VHOST_IOTLB_MSG
        }
    );
    if fmt.v2 {
        assert_eq!(decoded.asid, u32_at(data, 4));
    } else {
        assert_eq!(decoded.asid, 0);
    }
    check_against_input(&decoded.msg, &data[8..40]);
    check_iotlb_round_trip(&decoded.msg);

    let enc = linux::encode(&decoded.msg, decoded.asid, fmt)
        .expect("a decoded vhost message must re-encode in the same format");
    assert_eq!(enc.len(), VHOST_MSG_SIZE);
    assert_eq!(u32_at(&enc, 0), ty);
    if !fmt.v2 {
        assert_eq!(&enc[4..8], &[0u8; 4], "the v1 hole must be zero");
    }
    assert!(
        enc[8 + 26..].iter().all(|&b| b == 0),
        "the iotlb padding and the union tail must be zero"
    );
    assert_eq!(enc[8..40], decoded.msg.encode().unwrap());
    let again = linux::decode(&enc, fmt).expect("an encoded vhost message must decode");
    assert_eq!(again, decoded, "vhost message round trip");
    // Encoding is canonical: the re-encoding of the re-decoded message is the same bytes.
    assert_eq!(linux::encode(&again.msg, again.asid, fmt).unwrap(), enc);
}

fuzz_target!(|data: &[u8]| {
    for fmt in FORMATS {
        check_linux(data, fmt);
    }
    match IotlbMsg::decode(data) {
        Ok(m) => {
            check_against_input(&m, &data[..32]);
            let enc = check_iotlb_round_trip(&m);
            assert_eq!(
                check_iotlb_round_trip(&IotlbMsg::decode(&enc).unwrap()),
                enc
            );
        }
        Err(IotlbError::Short { expected, got }) => {
            assert_eq!((expected, got), (32, data.len()));
            assert!(data.len() < 32);
        }
        Err(IotlbError::UnknownType(ty)) => assert!(!(1..=6).contains(&ty)),
        Err(IotlbError::BadPerm { ty, perm }) => {
            assert!(matches!(ty, 1 | 2 | 4));
            assert!(Perm::from_bits(perm.0).is_err());
        }
        Err(IotlbError::Range { ty, .. }) => assert_eq!(ty, 2),
        Err(e) => panic!("IotlbMsg::decode returned {e:?}"),
    }
});
