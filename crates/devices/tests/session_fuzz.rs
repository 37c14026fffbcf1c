//! Session fuzzing with proptest: random sequences of vhost-user operations (memory table and
//! regions past the 32-region limit, SET_FEATURES toggles, vring stop/restart, IOTLB messages
//! at the 2^64 edges and across regions, a hostile second queue, reconnects) played against a
//! real in-process back-end while a virtio-blk driver keeps I/O in flight and checks its data,
//! the poison of every page the back-end gave up, and that every request is answered in time.
//!
//! The harness (`session_harness/`, shared with the cargo-fuzz target `fuzz/fuzz_targets/
//! session.rs`) does the work; this file only says how operations are drawn. It must stay
//! within about 20 s on two cores (`CASES` sequences of at most `MAX_OPS` operations) and must
//! not assert anything itself: a failure is the harness's description of the first violation.

mod session_harness;

use proptest::prelude::*;
use session_harness::{Config, Op, SLOTS};

/// Sequences per run (`PROPTEST_CASES` overrides).
const CASES: u32 = 40;
/// Operations per sequence.
const MAX_OPS: usize = 40;

fn op() -> impl Strategy<Value = Op> {
    let slot = 0u8..SLOTS as u8;
    prop_oneof![
        4 => (1u8..8).prop_map(Op::Pump),
        // Around the core slots (bits 0..3) and past the 32-region limit.
        2 => prop_oneof![
            Just(0b111u64),
            Just((1u64 << SLOTS) - 1),
            Just((1u64 << 32) - 1),
            Just(0xffu64),
            Just(0x1ffu64),
            Just(0u64),
            any::<u64>().prop_map(|m| (m & ((1 << SLOTS) - 1)) | 0b111),
            any::<u64>(),
        ]
        .prop_map(Op::SetMemTable),
        3 => slot.clone().prop_map(Op::AddRegion),
        3 => (slot, any::<bool>()).prop_map(|(slot, w)| Op::RemRegion {
            slot,
            wrong_size: w && slot % 4 == 0,
        }),
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(iommu, event_idx)| Op::SetFeatures { iommu, event_idx }),
        2 => any::<bool>().prop_map(|restart| Op::StopQueue { restart }),
        1 => Just(Op::NewKick),
        1 => any::<bool>().prop_map(Op::NewCall),
        1 => any::<bool>().prop_map(Op::NewErr),
        1 => any::<bool>().prop_map(Op::Enable),
        4 => (any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(req, page, how)| Op::Unmap { req, page, how }),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(req, page)| Op::Remap { req, page }),
        2 => (
            any::<u8>(),
            prop_oneof![
                Just(0xfee0_0000u64),
                Just(u64::MAX),
                Just(u64::MAX - 0xfff),
                any::<u64>()
            ]
        )
            .prop_map(|(kind, at)| Op::Flush { kind, at }),
        3 => (any::<bool>(), any::<u8>(), any::<u8>(), any::<u8>(), 0u8..5).prop_map(
            |(update, iova, size, uaddr, perm)| Op::EdgeIotlb {
                update,
                iova,
                size,
                uaddr,
                perm,
            }
        ),
        3 => (any::<u8>(), any::<u64>()).prop_map(|(what, value)| Op::Hostile { what, value }),
        1 => Just(Op::Reconnect),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        any::<u64>(),
        prop::bool::weighted(0.75),
        any::<bool>(),
        prop_oneof![Just(16usize), Just(64), Just(2048)],
        1usize..=8,
    )
        .prop_map(|(seed, iommu, event_idx, iotlb_capacity, depth)| Config {
            seed,
            iommu,
            event_idx,
            iotlb_capacity,
            depth,
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn session_survives_any_operation_sequence(
        cfg in config(),
        ops in prop::collection::vec(op(), 1..MAX_OPS),
    ) {
        session_harness::count_panics();
        let r = session_harness::run(cfg, &ops);
        prop_assert!(r.is_ok(), "{}", r.err().unwrap_or_default());
    }
}
