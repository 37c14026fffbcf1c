//! Property test: random requests through fragmented, non-identity IOVA mappings, with random
//! INVALIDATEs and a small IOTLB (so entries are evicted) between steps. Every chain must be
//! processed exactly once and in order, its data intact, its used length right, whatever
//! misses happened on the way.

mod common;

use common::Rig;
use iotlb::IovaRange;
use proptest::prelude::*;
use virtq::testing::{Buf, PAGE};
use virtq::Chain;

#[derive(Debug, Clone)]
enum Step {
    /// The driver adds a request: readable then writable buffer lengths, and whether it goes
    /// through an indirect table.
    Add {
        readable: Vec<u32>,
        writable: Vec<u32>,
        indirect: bool,
    },
    /// The device serves up to this many chains.
    Serve(usize),
    /// The IOMMU side invalidates IOVA pages (the driver keeps them mapped: the device just
    /// misses again).
    Invalidate { page: u64, pages: u64 },
    /// The IOMMU side moves one mapped page (ring or buffer) to another guest-physical page:
    /// the content is copied, the old page is poisoned, and the IOTLB entry invalidated. A
    /// device that kept using the old translation would read poison or lose its writes.
    Remap { pick: u64 },
    /// The driver collects completions.
    Harvest,
}

fn step() -> impl Strategy<Value = Step> {
    let lens = || prop::collection::vec(1u32..6000, 0..4);
    prop_oneof![
        4 => (lens(), lens(), any::<bool>())
            .prop_filter("a request has a buffer", |(r, w, _)| !r.is_empty() || !w.is_empty())
            .prop_map(|(readable, writable, indirect)| Step::Add { readable, writable, indirect }),
        3 => (1usize..4).prop_map(Step::Serve),
        2 => (0u64..64, 1u64..8).prop_map(|(page, pages)| Step::Invalidate { page, pages }),
        2 => any::<u64>().prop_map(|pick| Step::Remap { pick }),
        1 => Just(Step::Harvest),
    ]
}

/// What the driver expects back for one request.
struct Pending {
    head: u16,
    readable: Vec<Buf>,
    writable: Vec<Buf>,
    seed: u8,
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn run(steps: Vec<Step>, capacity: usize, iommu: bool, seed: u64) {
    let mut rig = Rig::new(16, iommu, capacity, seed);
    let mut chain = Chain::new();
    let mut in_flight: std::collections::VecDeque<Pending> = Default::default();
    let mut served: std::collections::VecDeque<u16> = Default::default();
    let mut next_seed = 0u8;
    for step in steps {
        match step {
            Step::Add {
                readable,
                writable,
                indirect,
            } => {
                let nbufs = (readable.len() + writable.len()) as u32;
                let r: Vec<Buf> = readable.iter().map(|&l| rig.buf(l, false)).collect();
                let w: Vec<Buf> = writable.iter().map(|&l| rig.buf(l, true)).collect();
                next_seed = next_seed.wrapping_add(1);
                let mut at = 0;
                let data = fill(next_seed, readable.iter().sum::<u32>() as usize);
                for b in &r {
                    rig.space
                        .write(&rig.mem, b.iova, &data[at..at + b.len as usize]);
                    at += b.len as usize;
                }
                let table = indirect.then(|| rig.buf(16 * nbufs, false).iova);
                let all: Vec<Buf> = r.iter().chain(&w).copied().collect();
                if let Some(head) = rig.driver.add_chain(&rig.mem, &rig.space, &all, table) {
                    in_flight.push_back(Pending {
                        head,
                        readable: r,
                        writable: w,
                        seed: next_seed,
                    });
                }
            }
            Step::Serve(n) => {
                for _ in 0..n {
                    if !rig.pop(&mut chain).unwrap() {
                        break;
                    }
                    // The device checks what it reads and answers with its own pattern.
                    let p = &in_flight[served.len()];
                    assert_eq!(chain.head(), p.head, "chains out of order");
                    let rlen: u32 = p.readable.iter().map(|b| b.len).sum();
                    let wlen: u32 = p.writable.iter().map(|b| b.len).sum();
                    assert_eq!((chain.readable_len(), chain.writable_len()), (rlen, wlen));
                    let mut got = vec![0u8; rlen as usize];
                    chain.reader(&rig.mem).read_exact(&mut got).unwrap();
                    assert_eq!(got, fill(p.seed, rlen as usize), "readable data");
                    let mut w = chain.writer(&rig.mem);
                    w.write_all(&fill(p.seed ^ 0xff, wlen as usize)).unwrap();
                    let used = w.written() as u32;
                    let head = chain.head();
                    served.push_back(head);
                    rig.complete(head, used);
                }
            }
            Step::Invalidate { page, pages } => {
                let base = if iommu { common::BUF_IOVA } else { 0 };
                rig.iotlb
                    .invalidate(IovaRange::from_size(base + page * PAGE, pages * PAGE).unwrap());
            }
            Step::Remap { pick } => {
                if !iommu {
                    continue;
                }
                let pages: Vec<(IovaRange, u64, iotlb::Perm)> = rig.space.mappings().collect();
                let (range, old, perm) = pages[(pick % pages.len() as u64) as usize];
                let new = rig.alloc.page();
                let content = rig.space.read(&rig.mem, range.start(), PAGE as usize);
                rig.space.map_page(range.start(), new, perm);
                rig.space.write(&rig.mem, range.start(), &content);
                vm_memory::Bytes::write_slice(
                    &rig.mem,
                    &[0xa5; PAGE as usize],
                    vm_memory::GuestAddress(old),
                )
                .unwrap();
                rig.iotlb.invalidate(range);
            }
            Step::Harvest => {
                for (head, len) in rig.driver.take_used(&rig.mem, &rig.space) {
                    let p = in_flight
                        .pop_front()
                        .expect("a completion nobody asked for");
                    assert_eq!(served.pop_front(), Some(head));
                    assert_eq!(head, p.head, "completions out of order");
                    let wlen: u32 = p.writable.iter().map(|b| b.len).sum();
                    assert_eq!(len, wlen, "used length");
                    let mut at = 0usize;
                    let want = fill(p.seed ^ 0xff, wlen as usize);
                    for b in &p.writable {
                        let got = rig.space.read(&rig.mem, b.iova, b.len as usize);
                        assert_eq!(got, want[at..at + b.len as usize], "writable data");
                        at += b.len as usize;
                    }
                }
            }
        }
    }
    // Drain: everything still available gets served, then completed, exactly once.
    while rig.pop(&mut chain).unwrap() {
        let head = chain.head();
        served.push_back(head);
        let w = chain.writable_len();
        let mut wr = chain.writer(&rig.mem);
        let p = &in_flight[served.len() - 1];
        wr.write_all(&fill(p.seed ^ 0xff, w as usize)).unwrap();
        rig.complete(head, w);
    }
    let used = rig.driver.take_used(&rig.mem, &rig.space);
    assert_eq!(used.len(), in_flight.len(), "every chain completed once");
    for ((head, _), p) in used.iter().zip(&in_flight) {
        assert_eq!(*head, p.head);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_chain_once_in_order_through_the_iotlb(
        steps in prop::collection::vec(step(), 1..60),
        capacity in prop_oneof![Just(48usize), Just(2048)],
        seed in any::<u64>(),
    ) {
        run(steps, capacity, true, seed);
    }

    #[test]
    fn every_chain_once_in_order_without_iommu(
        steps in prop::collection::vec(step(), 1..40),
        seed in any::<u64>(),
    ) {
        run(steps, 16, false, seed);
    }
}
