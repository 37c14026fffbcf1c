//! Property tests: the IOTLB against a reference model that is obviously right.
//!
//! The model keeps the list of operations. The translation of a byte is decided by the newest
//! operation covering it: an UPDATE maps it, an INVALIDATE unmaps it. Between any two
//! consecutive operation boundaries the model is linear, so a request of any length (up to the
//! whole 64-bit space) is checked piece by piece, not byte by byte.
//!
//! - With a capacity that eviction cannot reach, every translation must equal the model's:
//!   the same bytes to the same targets, or the same first failing byte and kind.
//! - With a tiny capacity, every hit must still be right, every denial must be a real one,
//!   and the entry count must never exceed the bound.

use iotlb::{
    Access, Iotlb, IotlbHandle, IovaRange, Perm, Segment, Segments, SharedIotlb, TranslateError,
};
use proptest::prelude::*;

const MAX: u64 = u64::MAX;

#[derive(Debug, Clone)]
enum Op {
    Update(IovaRange, u64, Perm),
    Invalidate(IovaRange),
    InvalidateAll,
    Translate(u64, u64, Access),
}

/// Addresses clustered where things go wrong: near 0, near page edges, near 2^64.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x6000,
        2 => (0u64..6).prop_flat_map(|p| (p * 0x1000).saturating_sub(1)..=(p * 0x1000 + 1)),
        3 => (MAX - 0x6000)..=MAX,
        1 => Just(0u64),
        1 => Just(MAX),
        1 => any::<u64>(),
    ]
}

fn range() -> impl Strategy<Value = IovaRange> {
    prop_oneof![
        12 => (addr(), addr()).prop_map(|(a, b)| IovaRange::new(a.min(b), a.max(b)).unwrap()),
        4 => (addr(), 1u64..0x3000).prop_filter_map("overflow", |(a, s)| IovaRange::from_size(a, s).ok()),
        1 => Just(IovaRange::FULL),
        1 => Just(IovaRange::new(0, MAX - 1).unwrap()),
        1 => Just(IovaRange::new(1, MAX).unwrap()),
    ]
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![
        Just(Perm::ReadOnly),
        Just(Perm::WriteOnly),
        Just(Perm::ReadWrite)
    ]
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Read), Just(Access::Write)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), prop_oneof![0u64..0x10_0000, (MAX - 0x8000)..=MAX, any::<u64>()], perm())
            .prop_map(|(r, t, p)| Op::Update(r, t, p)),
        // One fixed IOVA-to-target offset: ranges mapped, evicted and mapped again the same
        // way (which must not count as a change), or with another permission.
        4 => (range(), perm())
            .prop_map(|(r, p)| Op::Update(r, r.start().wrapping_sub(0x4000_0000), p)),
        // Single aligned 4 KiB pages, as QEMU answers misses (the evicted set keeps those in
        // a tier of their own), mapped and remapped, and whole pages invalidated.
        4 => (0u64..8, perm(), any::<bool>()).prop_map(|(p, perm, moved)| {
            let r = IovaRange::from_size(p * 0x1000, 0x1000).unwrap();
            let target = p * 0x1000 + if moved { 0x7000_0000 } else { 0x4000_0000 };
            Op::Update(r, target, perm)
        }),
        1 => (0u64..8).prop_map(|p| Op::Invalidate(IovaRange::from_size(p * 0x1000, 0x1000).unwrap())),
        3 => range().prop_map(Op::Invalidate),
        1 => Just(Op::InvalidateAll),
        // Up to 17 pages: a handle serves at most 16 from its per-page copies.
        8 => (addr(), prop_oneof![1u64..=64, 0u64..0x8000, 0x1000u64..0x11001, any::<u64>()], access())
            .prop_map(|(a, l, x)| Op::Translate(a, l, x)),
    ]
}

/// The reference: every applied UPDATE and INVALIDATE, oldest first.
#[derive(Default)]
struct Model {
    ops: Vec<(IovaRange, Option<(u64, Perm)>)>,
}

impl Model {
    fn update(&mut self, r: IovaRange, target: u64, perm: Perm) -> bool {
        if target.checked_add(r.last() - r.start()).is_none() {
            return false;
        }
        self.ops.push((r, Some((target, perm))));
        true
    }

    fn invalidate(&mut self, r: IovaRange) {
        self.ops.push((r, None));
    }

    /// Target and permission of byte `x`.
    fn at(&self, x: u64) -> Option<(u64, Perm)> {
        for (r, m) in self.ops.iter().rev() {
            if r.contains(x) {
                return m.map(|(t, p)| (t + (x - r.start()), p));
            }
        }
        None
    }

    /// The translation of `[iova, last]`: pieces `(iova, target, len_minus_one)` or the
    /// first failure.
    fn translate(
        &self,
        iova: u64,
        last: u64,
        access: Access,
    ) -> Result<Vec<(u64, u64, u64)>, TranslateError> {
        let mut cuts: Vec<u64> = vec![iova];
        for (r, _) in &self.ops {
            for b in [Some(r.start()), r.last().checked_add(1)]
                .into_iter()
                .flatten()
            {
                if b > iova && b <= last {
                    cuts.push(b);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        for (i, &from) in cuts.iter().enumerate() {
            let to = cuts.get(i + 1).map_or(last, |n| n - 1);
            match self.at(from) {
                None => return Err(TranslateError::Miss { iova: from, access }),
                Some((_, p)) if !p.allows(access) => {
                    return Err(TranslateError::Denied { iova: from, access })
                }
                Some((t, _)) => pieces.push((from, t, to - from)),
            }
        }
        Ok(pieces)
    }
}

/// Merge pieces that continue each other in both IOVA and target.
fn normalize(pieces: Vec<(u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (i, t, lm1) in pieces {
        if let Some(prev) = out.last_mut() {
            let next_i = prev.0.checked_add(prev.2).and_then(|v| v.checked_add(1));
            let next_t = prev.1.checked_add(prev.2).and_then(|v| v.checked_add(1));
            if next_i == Some(i) && next_t == Some(t) {
                prev.2 += lm1 + 1;
                continue;
            }
        }
        out.push((i, t, lm1));
    }
    out
}

/// Our segments as pieces along the IOVA range starting at `iova`.
fn pieces_of(iova: u64, segs: &[Segment]) -> Vec<(u64, u64, u64)> {
    let mut at = iova;
    let mut out = Vec::new();
    for s in segs {
        assert!(s.len > 0, "empty segment");
        out.push((at, s.addr, s.len - 1));
        at = at.wrapping_add(s.len);
    }
    out
}

fn check_translate(
    ours: Result<Segments, TranslateError>,
    m: &Model,
    iova: u64,
    len: u64,
    access: Access,
    exact: bool,
) {
    if len == 0 {
        assert!(ours.unwrap().is_empty());
        return;
    }
    let Some(last) = iova.checked_add(len - 1) else {
        assert_eq!(ours, Err(TranslateError::Overflow { iova, len }));
        return;
    };
    let want = m.translate(iova, last, access);
    match (ours, want) {
        (Ok(segs), Ok(pieces)) => {
            assert_eq!(segs.total_len(), len);
            assert_eq!(normalize(pieces_of(iova, &segs)), normalize(pieces));
        }
        (Err(e), want) if exact => assert_eq!(Err(e), want.map(|_| ())),
        (Ok(segs), Err(e)) => panic!("translated {segs:?} where the model fails with {e:?}"),
        // With eviction, a miss is always allowed; a denial must be a real one.
        (Err(TranslateError::Denied { iova: d, .. }), _) => {
            let (_, p) = m.at(d).expect("denied on an unmapped byte");
            assert!(
                !p.allows(access),
                "denied at {d:#x} though the mapping allows it"
            );
        }
        (Err(_), _) => {}
    }
}

/// What the ops are applied to: the cache itself, or a shared cache read through a handle.
trait UnderTest {
    fn update(&mut self, r: IovaRange, target: u64, perm: Perm) -> bool;
    fn invalidate(&mut self, r: IovaRange);
    fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, TranslateError>;
    /// Check what can be checked after every op; the cache is at most `cap` entries.
    fn check(&self, m: &Model, cap: usize);
}

impl UnderTest for Iotlb {
    fn update(&mut self, r: IovaRange, target: u64, perm: Perm) -> bool {
        Iotlb::update(self, r, target, perm).is_ok()
    }
    fn invalidate(&mut self, r: IovaRange) {
        Iotlb::invalidate(self, r);
    }
    fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, TranslateError> {
        Iotlb::translate(self, iova, len, access)
    }
    fn check(&self, m: &Model, cap: usize) {
        self.check_invariants().unwrap();
        assert!(self.len() <= cap);
        // Every cached entry agrees with the model at both of its ends.
        for e in self.iter() {
            for x in [e.range.start(), e.range.last()] {
                assert_eq!(
                    m.at(x),
                    Some((e.target_of(x).unwrap(), e.perm)),
                    "entry {e:?} at {x:#x}"
                );
            }
        }
    }
}

/// Worker handles of a shared IOTLB, whose private copies must never outlive an INVALIDATE
/// or a replacing UPDATE. The second one translates only every 7th time, so it often has
/// many changes to catch up with.
struct ThroughHandle {
    shared: SharedIotlb<u8>,
    handle: IotlbHandle<u8>,
    lagging: IotlbHandle<u8>,
    translations: u64,
}

impl UnderTest for ThroughHandle {
    fn update(&mut self, r: IovaRange, target: u64, perm: Perm) -> bool {
        self.shared.update(r, target, perm).is_ok()
    }
    fn invalidate(&mut self, r: IovaRange) {
        self.shared.invalidate(r);
    }
    fn translate(
        &mut self,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, TranslateError> {
        self.translations += 1;
        if self.translations % 7 == 0 {
            self.lagging.translate(iova, len, access)
        } else {
            self.handle.translate(iova, len, access)
        }
    }
    fn check(&self, m: &Model, cap: usize) {
        self.shared.with_cache(|t| t.check(m, cap));
    }
}

fn run(mut t: impl UnderTest, cap: usize, ops: &[Op], exact: bool) {
    let mut m = Model::default();
    for op in ops {
        match *op {
            Op::Update(r, target, perm) => {
                let ok = m.update(r, target, perm);
                assert_eq!(t.update(r, target, perm), ok);
            }
            Op::Invalidate(r) => {
                m.invalidate(r);
                t.invalidate(r);
            }
            Op::InvalidateAll => {
                m.invalidate(IovaRange::FULL);
                t.invalidate(IovaRange::FULL);
            }
            Op::Translate(a, l, x) => check_translate(t.translate(a, l, x), &m, a, l, x, exact),
        }
        t.check(&m, cap);
    }
}

fn cache(cap: usize) -> Iotlb {
    Iotlb::with_capacity(cap).unwrap()
}

fn through_handle(cap: usize) -> ThroughHandle {
    let shared = SharedIotlb::new(cache(cap));
    let handle = shared.handle();
    let lagging = shared.handle();
    ThroughHandle {
        shared,
        handle,
        lagging,
        translations: 0,
    }
}

proptest! {
    // 512 cases by default; PROPTEST_CASES overrides (for long soak runs).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn agrees_with_model_without_eviction(ops in prop::collection::vec(op(), 1..80)) {
        run(cache(1024), 1024, &ops, true);
    }

    #[test]
    fn handle_agrees_with_model_without_eviction(ops in prop::collection::vec(op(), 1..80)) {
        run(through_handle(1024), 1024, &ops, true);
    }

    #[test]
    fn handle_hits_stay_right_under_eviction(cap in 1usize..6, ops in prop::collection::vec(op(), 1..120)) {
        run(through_handle(cap), cap, &ops, false);
    }

    #[test]
    fn hits_stay_right_under_eviction(cap in 1usize..6, ops in prop::collection::vec(op(), 1..120)) {
        run(cache(cap), cap, &ops, false);
    }
}

#[test]
fn model_self_check() {
    let mut m = Model::default();
    m.update(IovaRange::new(0, 0xfff).unwrap(), 0x1000, Perm::ReadOnly);
    m.update(
        IovaRange::new(0x800, 0x8ff).unwrap(),
        0x9000,
        Perm::ReadWrite,
    );
    assert_eq!(m.at(0x10), Some((0x1010, Perm::ReadOnly)));
    assert_eq!(m.at(0x810), Some((0x9010, Perm::ReadWrite)));
    assert_eq!(
        m.translate(0x7ff, 0x900, Access::Read).unwrap(),
        vec![
            (0x7ff, 0x17ff, 0),
            (0x800, 0x9000, 0xff),
            (0x900, 0x1900, 0)
        ]
    );
    m.invalidate(IovaRange::new(0x900, 0x900).unwrap());
    assert_eq!(
        m.translate(0x7ff, 0x900, Access::Read),
        Err(TranslateError::Miss {
            iova: 0x900,
            access: Access::Read
        })
    );
}
