//! Round-trip properties: every message we can encode decodes to itself, and every byte
//! string that decodes re-encodes to a message that decodes the same (so decoding is a
//! normalisation, and nothing undefined survives it).

use iotlb::{IovaRange, Perm};
use proptest::prelude::*;
use proptest::strategy::LazyJust;
use wire::iotlb_msg::IotlbMsg;
use wire::linux::{self, MsgFormat};
use wire::vhost_user::{
    reply_kind, Config, DecodeLimits, FrontendReq, FrontendRequest, Header, MemoryRegion, Reply,
    ReplyKind, VringAddr, VringFile, VringState,
};

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![
        Just(Perm::ReadOnly),
        Just(Perm::WriteOnly),
        Just(Perm::ReadWrite)
    ]
}

fn range() -> impl Strategy<Value = IovaRange> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| IovaRange::new(a.min(b), a.max(b)).unwrap())
}

fn iotlb_msg() -> impl Strategy<Value = IotlbMsg> {
    prop_oneof![
        (any::<u64>(), perm()).prop_map(|(iova, perm)| IotlbMsg::Miss { iova, perm }),
        (range(), any::<u64>(), perm())
            .prop_filter("whole-space UPDATE has no size", |(r, _, _)| *r
                != IovaRange::FULL)
            .prop_map(|(range, uaddr, perm)| IotlbMsg::Update { range, uaddr, perm }),
        range().prop_map(|range| IotlbMsg::Invalidate { range }),
        Just(IotlbMsg::Invalidate {
            range: IovaRange::FULL
        }),
        (any::<u64>(), perm()).prop_map(|(iova, perm)| IotlbMsg::AccessFail { iova, perm }),
        Just(IotlbMsg::BatchBegin),
        Just(IotlbMsg::BatchEnd),
    ]
}

fn state() -> impl Strategy<Value = VringState> {
    (any::<u32>(), any::<u32>()).prop_map(|(index, num)| VringState { index, num })
}

fn region() -> impl Strategy<Value = MemoryRegion> {
    (any::<u64>(), 1u64..1 << 40, any::<u64>(), any::<u64>()).prop_map(|(g, s, u, o)| {
        MemoryRegion {
            guest_phys_addr: g >> 2,
            memory_size: s,
            userspace_addr: u >> 2,
            mmap_offset: o >> 2,
        }
    })
}

/// Requests that carry no descriptor.
fn request() -> impl Strategy<Value = FrontendRequest> {
    use FrontendRequest as R;
    prop_oneof![
        LazyJust::new(|| R::GetFeatures),
        any::<u64>().prop_map(R::SetFeatures),
        LazyJust::new(|| R::SetOwner),
        LazyJust::new(|| R::ResetOwner),
        state().prop_map(R::SetVringNum),
        (
            any::<u32>(),
            0u32..2,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(index, flags, descriptor, used, available, log)| R::SetVringAddr(VringAddr {
                    index,
                    flags,
                    descriptor,
                    used,
                    available,
                    log
                })
            ),
        state().prop_map(R::SetVringBase),
        state().prop_map(R::GetVringBase),
        any::<u8>().prop_map(|index| R::SetVringCall(VringFile { index, fd: None })),
        any::<u8>().prop_map(|index| R::SetVringKick(VringFile { index, fd: None })),
        LazyJust::new(|| R::GetProtocolFeatures),
        any::<u64>().prop_map(R::SetProtocolFeatures),
        LazyJust::new(|| R::GetQueueNum),
        state().prop_map(R::SetVringEnable),
        iotlb_msg().prop_map(R::IotlbMsg),
        (
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..=256)
        )
            .prop_map(|(offset, flags, data)| R::SetConfig(Config {
                offset,
                flags,
                data
            })),
        (any::<u32>(), 0usize..=256).prop_map(|(offset, n)| R::GetConfig(Config {
            offset,
            flags: 0,
            data: vec![0; n]
        })),
        LazyJust::new(|| R::ResetDevice),
        LazyJust::new(|| R::GetMaxMemSlots),
        region().prop_map(R::RemMemReg),
        any::<u8>().prop_map(R::SetStatus),
        LazyJust::new(|| R::GetStatus),
    ]
}

fn fmt() -> impl Strategy<Value = MsgFormat> {
    (any::<bool>(), any::<bool>()).prop_map(|(v2, asid)| MsgFormat {
        v2,
        asid: v2 && asid,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn iotlb_msg_round_trips(m in iotlb_msg()) {
        let bytes = m.encode().unwrap();
        prop_assert_eq!(IotlbMsg::decode(&bytes).unwrap(), m);
        prop_assert!(bytes[26..].iter().all(|&b| b == 0));
    }

    #[test]
    fn any_32_bytes_decode_to_a_normal_form(bytes in prop::array::uniform32(any::<u8>())) {
        if let Ok(m) = IotlbMsg::decode(&bytes) {
            let again = m.encode().unwrap();
            prop_assert_eq!(IotlbMsg::decode(&again).unwrap(), m);
        }
    }

    #[test]
    fn linux_messages_round_trip(m in iotlb_msg(), f in fmt(), asid in any::<u32>()) {
        let asid = if f.asid { asid } else { 0 };
        let bytes = linux::encode(&m, asid, f).unwrap();
        let back = linux::decode(&bytes, f).unwrap();
        prop_assert_eq!((back.asid, back.msg), (asid, m));
    }

    #[test]
    fn any_72_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100), f in fmt()) {
        if let Ok(m) = linux::decode(&bytes, f) {
            let again = linux::encode(&m.msg, m.asid, f).unwrap();
            prop_assert_eq!(linux::decode(&again, f).unwrap(), m);
        }
    }

    #[test]
    fn frontend_requests_round_trip(req in request(), need_reply in any::<bool>()) {
        let payload = req.encode_payload().unwrap();
        let h = Header::new(req.req().code(), payload.len() as u32, need_reply);
        let back = FrontendRequest::decode(&h, &payload, Vec::new(), &DecodeLimits::default()).unwrap();
        prop_assert_eq!(back.req(), req.req());
        prop_assert_eq!(back.encode_payload().unwrap(), payload);
    }

    #[test]
    fn arbitrary_payloads_never_panic(code in 0u32..50, flags in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 0..300)) {
        let h = Header { request: code, flags, size: payload.len() as u32 };
        if let Ok(req) = FrontendRequest::decode(&h, &payload, Vec::new(), &DecodeLimits::default()) {
            // What decodes re-encodes to something that decodes the same way.
            let again = req.encode_payload().unwrap();
            let back = FrontendRequest::decode(&h, &again, Vec::new(), &DecodeLimits::default()).unwrap();
            prop_assert_eq!(back.encode_payload().unwrap(), again);
        }
        if let Some(q) = FrontendReq::from_code(code) {
            if let Some(kind) = reply_kind(q) {
                let _ = Reply::decode(code, kind, &payload);
            }
        }
    }

    #[test]
    fn replies_round_trip(v in any::<u64>(), s in state(), data in prop::collection::vec(any::<u8>(), 0..=256)) {
        for (kind, r) in [
            (ReplyKind::U64, Reply::U64(v)),
            (ReplyKind::VringState, Reply::VringState(s)),
            (ReplyKind::Config, Reply::Config(Config { offset: 4, flags: 0, data: data.clone() })),
        ] {
            prop_assert_eq!(Reply::decode(1, kind, &r.encode()).unwrap(), r);
        }
    }
}
