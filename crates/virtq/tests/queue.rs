//! The split-ring engine against a driver in guest memory, with and without the IOMMU: data
//! paths, miss rewind, denials, indirect tables, hostile rings, notification suppression and
//! ring-translation revalidation.

mod common;

use common::Rig;
use iotlb::{Access, IovaRange, Perm};
use virtq::testing::{Buf, PAGE};
use virtq::{Chain, ChainError, Descriptor, PopError, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
}

/// A request/response round trip: the device reads what the driver wrote and answers.
fn round_trip(iommu: bool) {
    let mut rig = Rig::new(64, iommu, 2048, 1);
    let req = rig.buf(5000, false);
    let resp = rig.buf(300, true);
    rig.space.write(&rig.mem, req.iova, &pattern(3, 5000));
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[req, resp], None)
        .unwrap();
    let mut chain = Chain::new();
    assert!(rig.pop(&mut chain).unwrap());
    assert_eq!(chain.head(), head);
    assert_eq!((chain.readable_len(), chain.writable_len()), (5000, 300));
    if iommu {
        // 5000 bytes over scattered pages: more than one segment.
        assert!(chain.readable().len() >= 2);
    }
    let mut got = vec![0u8; 5000];
    chain.reader(&rig.mem).read_exact(&mut got).unwrap();
    assert_eq!(got, pattern(3, 5000));
    let mut w = chain.writer(&rig.mem);
    w.write_all(&pattern(9, 300)).unwrap();
    let used = w.written() as u32;
    rig.complete(head, used);
    assert!(!rig.pop(&mut chain).unwrap(), "nothing else available");
    assert_eq!(
        rig.driver.take_used(&rig.mem, &rig.space),
        vec![(head, 300)]
    );
    assert_eq!(rig.space.read(&rig.mem, resp.iova, 300), pattern(9, 300));
}

#[test]
fn round_trip_without_iommu() {
    round_trip(false);
}

#[test]
fn round_trip_through_the_iotlb() {
    round_trip(true);
}

#[test]
fn a_miss_consumes_nothing_and_the_same_chain_comes_back() {
    let mut rig = Rig::new(16, true, 2048, 2);
    let a = rig.buf(64, false);
    let b = rig.buf(64, true);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[a, b], None)
        .unwrap();
    let mut chain = Chain::new();
    let mut misses = Vec::new();
    loop {
        match rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain) {
            Err(PopError::Miss { iova, access }) => {
                // Nothing consumed, nothing written.
                assert_eq!(rig.queue.next_avail(), 0);
                assert!(rig.driver.take_used(&rig.mem, &rig.space).is_empty());
                misses.push((iova, access));
                rig.answer(iova);
            }
            Ok(true) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(chain.head(), head);
    assert_eq!(rig.queue.next_avail(), 1);
    // Rings (read), then each buffer in the direction it is used.
    let (_, avail, _) = rig.driver.addresses();
    assert_eq!(misses[0], (avail, Access::Read));
    assert!(misses.contains(&(a.iova, Access::Read)));
    assert!(misses.contains(&(b.iova, Access::Write)));
}

#[test]
fn a_denied_buffer_consumes_the_entry() {
    let mut rig = Rig::new(16, true, 2048, 3);
    let a = rig.buf(64, false);
    let b = rig.buf(64, true);
    // The IOMMU maps the device-writable buffer read-only.
    let (range, gpa, _) = rig.space.update_for(b.iova).unwrap();
    rig.iotlb.update(range, gpa, Perm::ReadOnly).unwrap();
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[a, b], None)
        .unwrap();
    let mut chain = Chain::new();
    match rig.pop(&mut chain) {
        Err(PopError::Denied {
            head: h,
            iova,
            access,
        }) => {
            assert_eq!((h, iova, access), (head, b.iova, Access::Write));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.queue.next_avail(), 1);
    rig.complete(head, 0);
    assert_eq!(rig.driver.take_used(&rig.mem, &rig.space), vec![(head, 0)]);
}

#[test]
fn indirect_chains() {
    for iommu in [false, true] {
        let mut rig = Rig::new(16, iommu, 2048, 4);
        let table = rig.buf(16 * 3, false);
        let bufs = [
            rig.buf(100, false),
            rig.buf(2000, false),
            rig.buf(7000, true),
        ];
        rig.space.write(&rig.mem, bufs[1].iova, &pattern(5, 2000));
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &bufs, Some(table.iova))
            .unwrap();
        let mut chain = Chain::new();
        assert!(rig.pop(&mut chain).unwrap());
        assert_eq!(chain.head(), head);
        assert_eq!(chain.descriptors(), 3);
        assert_eq!((chain.readable_len(), chain.writable_len()), (2100, 7000));
        let mut r = chain.reader(&rig.mem);
        r.skip(100).unwrap();
        let mut got = vec![0u8; 2000];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, pattern(5, 2000));
    }
}

/// Descriptors to write raw, by table index.
type RawChain = Vec<(u16, Descriptor)>;

/// Write a raw chain and pop it: the error it gives.
fn pop_raw(rig: &mut Rig, descs: &[(u16, Descriptor)], head: u16) -> Result<bool, PopError> {
    for &(i, d) in descs {
        rig.driver.write_desc(&rig.mem, &rig.space, i, d);
    }
    rig.driver.publish(&rig.mem, &rig.space, head);
    let mut chain = Chain::new();
    rig.pop(&mut chain)
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor {
        addr,
        len,
        flags,
        next,
    }
}

#[test]
fn hostile_chains_are_refused_and_the_queue_goes_on() {
    for iommu in [false, true] {
        let mut rig = Rig::new(8, iommu, 2048, 5);
        let b = rig.buf(64, false);
        let w = rig.buf(64, true);
        let t = rig.buf(4096, false);
        let n = DESC_F_NEXT;
        let cases: Vec<(RawChain, u16, ChainError)> = vec![
            // 0 -> 1 -> 0: a loop.
            (
                vec![(0, d(b.iova, 8, n, 1)), (1, d(b.iova, 8, n, 0))],
                0,
                ChainError::TooLong { limit: 8 },
            ),
            (
                vec![(2, d(b.iova, 8, n, 8))],
                2,
                ChainError::NextOutOfRange {
                    index: 2,
                    next: 8,
                    table: 8,
                },
            ),
            (
                vec![
                    (3, d(w.iova, 8, n | DESC_F_WRITE, 4)),
                    (4, d(b.iova, 8, 0, 0)),
                ],
                3,
                ChainError::ReadableAfterWritable { index: 4 },
            ),
            (
                vec![(5, d(t.iova, 32, DESC_F_INDIRECT | n, 6))],
                5,
                ChainError::IndirectWithNext { index: 5 },
            ),
            (
                vec![(6, d(t.iova, 24, DESC_F_INDIRECT, 0))],
                6,
                ChainError::IndirectLength { len: 24 },
            ),
            (
                vec![(7, d(t.iova, 0, DESC_F_INDIRECT, 0))],
                7,
                ChainError::IndirectLength { len: 0 },
            ),
        ];
        for (descs, head, want) in cases {
            match pop_raw(&mut rig, &descs, head) {
                Err(PopError::Invalid { reason, .. }) => assert_eq!(reason, want, "iommu {iommu}"),
                other => panic!("{want:?}: got {other:?}"),
            }
        }
        // Nested indirect: an indirect table holding an indirect descriptor.
        rig.space.write(
            &rig.mem,
            t.iova,
            &d(t.iova, 16, DESC_F_INDIRECT, 0).to_bytes(),
        );
        match pop_raw(&mut rig, &[(0, d(t.iova, 16, DESC_F_INDIRECT, 0))], 0) {
            Err(PopError::Invalid { reason, .. }) => assert_eq!(reason, ChainError::NestedIndirect),
            other => panic!("{other:?}"),
        }
        // A loop inside an indirect table: limited by the table's 2 entries.
        rig.space
            .write(&rig.mem, t.iova, &d(b.iova, 8, n, 1).to_bytes());
        rig.space
            .write(&rig.mem, t.iova + 16, &d(b.iova, 8, n, 0).to_bytes());
        match pop_raw(&mut rig, &[(0, d(t.iova, 32, DESC_F_INDIRECT, 0))], 0) {
            Err(PopError::Invalid { reason, .. }) => {
                assert_eq!(reason, ChainError::TooLong { limit: 2 })
            }
            other => panic!("{other:?}"),
        }
        // An address outside every mapping (IOMMU: a miss nobody answers) or outside memory.
        let far = 0x7000_0000_0000;
        rig.driver
            .write_desc(&rig.mem, &rig.space, 0, d(far, 8, 0, 0));
        rig.driver.publish(&rig.mem, &rig.space, 0);
        let mut chain = Chain::new();
        match rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain) {
            Err(PopError::Miss { iova, .. }) if iommu => assert_eq!(iova, far),
            Err(PopError::Invalid {
                reason: ChainError::BadAddress { .. },
                ..
            }) if !iommu => {}
            other => panic!("{other:?}"),
        }
        if iommu {
            // The device gives up on it (after its miss timeout) by skipping the entry:
            // simulated here by mapping it to memory that does not exist.
            rig.iotlb
                .update(
                    IovaRange::from_size(far, PAGE).unwrap(),
                    1 << 40,
                    Perm::ReadWrite,
                )
                .unwrap();
            assert!(matches!(
                rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain),
                Err(PopError::Invalid {
                    reason: ChainError::BadAddress { .. },
                    ..
                })
            ));
        }
        // Still serving: a good chain goes through.
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &[b, w], None)
            .unwrap();
        let mut chain = Chain::new();
        assert!(rig.pop(&mut chain).unwrap());
        assert_eq!(chain.head(), head);
    }
}

#[test]
fn huge_lengths_are_refused() {
    // Two descriptors adding up past 4 GiB. Buffers over 1 MiB translate to nothing (rings
    // translate as they are), so that only the length rule can stop them.
    struct Nothing;
    impl virtq::Translator for Nothing {
        fn translate(
            &mut self,
            addr: u64,
            len: u64,
            access: Access,
            out: &mut Vec<iotlb::Segment>,
        ) -> Result<(), virtq::Fault> {
            if len > 1 << 20 {
                return Ok(());
            }
            virtq::GpaTranslator.translate(addr, len, access, out)
        }
        fn generation(&self) -> u64 {
            0
        }
        fn stale(&self, _: u64, _: IovaRange) -> bool {
            false
        }
        fn is_iommu(&self) -> bool {
            false
        }
    }
    let mut rig = Rig::new(8, false, 16, 6);
    let b = rig.buf(8, false);
    rig.driver
        .write_desc(&rig.mem, &rig.space, 0, d(b.iova, u32::MAX, DESC_F_NEXT, 1));
    rig.driver
        .write_desc(&rig.mem, &rig.space, 1, d(b.iova, 2, DESC_F_WRITE, 0));
    rig.driver.publish(&rig.mem, &rig.space, 0);
    let mut chain = Chain::new();
    let r = rig.queue.pop(&mut Nothing, &rig.mem, &mut chain);
    assert_eq!(
        r,
        Err(PopError::Invalid {
            head: 0,
            reason: ChainError::LengthOverflow
        })
    );
}

#[test]
fn an_avail_index_jumping_ahead_breaks_the_queue_until_reset() {
    let mut rig = Rig::new(8, true, 2048, 7);
    rig.driver.set_avail_idx(&rig.mem, &rig.space, 9);
    let mut chain = Chain::new();
    assert!(matches!(rig.pop(&mut chain), Err(PopError::Broken(_))));
    assert!(rig.queue.broken().is_some());
    assert!(matches!(rig.pop(&mut chain), Err(PopError::Broken(_))));
    rig.queue.reset();
    assert!(rig.queue.broken().is_none());
}

#[test]
fn notification_suppression_without_event_idx() {
    let mut rig = Rig::new(8, true, 2048, 8);
    let b = rig.buf(8, true);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    let mut chain = Chain::new();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 8);
    assert!(rig
        .queue
        .needs_notification(rig.tr.get(), &rig.mem)
        .unwrap());
    rig.driver
        .set_avail_flags(&rig.mem, &rig.space, virtq::AVAIL_F_NO_INTERRUPT);
    assert!(!rig
        .queue
        .needs_notification(rig.tr.get(), &rig.mem)
        .unwrap());
    // The device asks not to be kicked, then again to be kicked.
    assert!(!rig
        .queue
        .set_notification(rig.tr.get(), &rig.mem, false)
        .unwrap());
    assert!(rig.driver.device_suppresses_kicks(&rig.mem, &rig.space));
    rig.driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    // Enabling again reports the chain that came in the meantime.
    assert!(rig
        .queue
        .set_notification(rig.tr.get(), &rig.mem, true)
        .unwrap());
    assert!(!rig.driver.device_suppresses_kicks(&rig.mem, &rig.space));
}

#[test]
fn notification_suppression_with_event_idx() {
    let mut rig = Rig::new(8, true, 2048, 9);
    rig.queue.set_event_idx(true);
    let b = rig.buf(8, true);
    let mut chain = Chain::new();
    // The driver wants an interrupt when the used index passes 0 (first completion) ...
    rig.driver.set_used_event(&rig.mem, &rig.space, 0);
    for i in 0..3u16 {
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &[b], None)
            .unwrap();
        assert!(rig.pop(&mut chain).unwrap());
        rig.complete(head, 8);
        let notify = rig
            .queue
            .needs_notification(rig.tr.get(), &rig.mem)
            .unwrap();
        // ... and not again until it moves used_event.
        assert_eq!(notify, i == 0, "completion {i}");
        rig.driver.take_used(&rig.mem, &rig.space);
    }
    rig.driver.set_used_event(&rig.mem, &rig.space, 3);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 8);
    assert!(rig
        .queue
        .needs_notification(rig.tr.get(), &rig.mem)
        .unwrap());
    // avail_event tells the driver where to kick.
    assert!(!rig
        .queue
        .set_notification(rig.tr.get(), &rig.mem, true)
        .unwrap());
    assert_eq!(rig.driver.avail_event(&rig.mem, &rig.space), 4);
}

#[test]
fn ring_translations_are_revalidated_only_when_their_range_changes() {
    let mut rig = Rig::new(8, true, 2048, 10);
    let b = rig.buf(8, false);
    let mut chain = Chain::new();
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 0);
    let misses = rig.iotlb.stats().misses;
    // An INVALIDATE elsewhere: the rings keep their translations.
    rig.iotlb
        .invalidate(IovaRange::from_size(0x7700_0000, PAGE).unwrap());
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 0);
    assert_eq!(rig.iotlb.stats().misses, misses);
    // An INVALIDATE of the avail ring: the next pop misses on it first.
    let (_, avail, _) = rig.driver.addresses();
    rig.iotlb
        .invalidate(IovaRange::from_size(avail, 2).unwrap());
    rig.driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert_eq!(
        rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain),
        Err(PopError::Miss {
            iova: avail,
            access: Access::Read
        })
    );
    assert!(rig.pop(&mut chain).unwrap());
}

#[test]
fn configuration_is_checked() {
    let mut q = virtq::Queue::new(256);
    assert!(q.set_size(0).is_err());
    assert!(q.set_size(100).is_err());
    assert!(q.set_size(512).is_err());
    assert!(
        q.set_addresses(0x1000, 0x2000, 0x3000).is_err(),
        "no size yet"
    );
    q.set_size(256).unwrap();
    assert!(q.set_addresses(0x1008, 0x2000, 0x3000).is_err());
    assert!(q.set_addresses(0x1000, 0x2001, 0x3000).is_err());
    assert!(q.set_addresses(0x1000, 0x2000, 0x3002).is_err());
    q.set_addresses(0x1000, 0x2000, 0x3000).unwrap();
    let _ = Buf {
        iova: 0,
        len: 0,
        write: false,
    };
}

mod random_rings {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

        /// Whatever bytes the driver puts in its descriptor table and avail ring, popping
        /// gives chains inside guest memory or errors, and never panics.
        #[test]
        fn random_ring_bytes_never_panic(
            table in prop::collection::vec(any::<u8>(), 16 * 16),
            ring in prop::collection::vec(any::<u16>(), 16),
            idx in any::<u16>(),
            iommu in any::<bool>(),
        ) {
            let mut rig = Rig::new(16, iommu, 64, 11);
            let (desc, avail, _) = rig.driver.addresses();
            rig.space.write(&rig.mem, desc, &table);
            for (i, h) in ring.iter().enumerate() {
                rig.space.write(&rig.mem, avail + 4 + 2 * i as u64, &h.to_le_bytes());
            }
            rig.driver.set_avail_idx(&rig.mem, &rig.space, idx);
            let mut chain = Chain::new();
            for _ in 0..20 {
                match rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain) {
                    Ok(false) | Err(PopError::Broken(_)) => break,
                    Ok(true) => {
                        for s in chain.readable().iter().chain(chain.writable()) {
                            prop_assert!(s.addr + s.len <= common::MEM_SIZE);
                        }
                        let head = chain.head();
                        let _ = rig.queue.complete(rig.tr.get(), &rig.mem, head, 0);
                    }
                    // Misses on random addresses are left unanswered; the queue just stays.
                    Err(PopError::Miss { iova, .. }) => {
                        if !rig.answer(iova) {
                            break;
                        }
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

#[test]
fn giving_up_on_a_chain_and_finding_its_status_byte() {
    for indirect in [false, true] {
        let mut rig = Rig::new(16, true, 2048, 12);
        let r = rig.buf(16, false);
        let data = rig.buf(512, true);
        let status = rig.buf(1, true);
        let table = indirect.then(|| rig.buf(48, false).iova);
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &[r, data, status], table)
            .unwrap();
        // The buffers are never translated: the chain's miss is never answered. The ring
        // and (if any) the table are.
        for (range, gpa, perm) in rig.space.mappings().collect::<Vec<_>>() {
            let buffer = [r.iova, data.iova, status.iova].contains(&range.start());
            if !buffer {
                rig.iotlb.update(range, gpa, perm).unwrap();
            }
        }
        let mut chain = Chain::new();
        assert!(matches!(
            rig.queue.pop(rig.tr.get(), &rig.mem, &mut chain),
            Err(PopError::Miss { .. })
        ));
        assert_eq!(
            rig.queue
                .last_writable(rig.tr.get(), &rig.mem, head)
                .unwrap(),
            Some((status.iova, 1))
        );
        assert_eq!(rig.queue.skip(rig.tr.get(), &rig.mem).unwrap(), Some(head));
        assert_eq!(rig.queue.next_avail(), 1);
        assert_eq!(rig.queue.skip(rig.tr.get(), &rig.mem).unwrap(), None);
        rig.complete(head, 0);
        assert_eq!(rig.driver.take_used(&rig.mem, &rig.space), vec![(head, 0)]);
    }
}

#[test]
fn an_indirect_table_of_queue_size_entries_is_accepted() {
    // header + seg_max (= size - 2) buffers + status: `size` entries, as QEMU allows.
    let mut rig = Rig::new(8, true, 2048, 13);
    let table = rig.buf(16 * 8, false);
    let mut bufs = vec![rig.buf(16, false)];
    bufs.extend((0..6).map(|_| rig.buf(512, true)));
    bufs.push(rig.buf(1, true));
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &bufs, Some(table.iova))
        .unwrap();
    let mut chain = Chain::new();
    assert!(rig.pop(&mut chain).unwrap());
    assert_eq!((chain.head(), chain.descriptors()), (head, 8));
}

#[test]
fn a_head_outside_the_table_breaks_the_queue_without_consuming_the_entry() {
    // Nothing names a descriptor to complete with an error: the ring itself is wrong.
    for iommu in [false, true] {
        let mut rig = Rig::new(8, iommu, 2048, 14);
        rig.driver.publish(&rig.mem, &rig.space, 9);
        let mut chain = Chain::new();
        match rig.pop(&mut chain) {
            Err(PopError::Broken(why)) => assert!(why.contains("head 9"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.queue.next_avail(), 0, "the entry is handed back");
        assert!(rig.queue.broken().is_some());
    }
}

#[test]
fn the_used_index_is_taken_from_the_ring_after_a_restart() {
    let mut rig = Rig::new(8, false, 16, 15);
    let b = rig.buf(8, true);
    let mut chain = Chain::new();
    for _ in 0..3 {
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &[b], None)
            .unwrap();
        assert!(rig.pop(&mut chain).unwrap());
        rig.complete(head, 8);
        rig.driver.take_used(&rig.mem, &rig.space);
    }
    // One more popped but not completed, then the queue stops (GET_VRING_BASE says 4) and
    // restarts: the used index continues from the ring's 3, not from the base.
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    let base = rig.queue.next_avail();
    assert_eq!(base, 4);
    let (d, a, u) = rig.driver.addresses();
    rig.queue = virtq::Queue::new(8);
    rig.queue.set_size(8).unwrap();
    rig.queue.set_addresses(d, a, u).unwrap();
    rig.queue.set_next_avail(base);
    assert!(!rig.pop(&mut chain).unwrap());
    rig.complete(head, 8);
    assert_eq!(rig.driver.take_used(&rig.mem, &rig.space), vec![(head, 8)]);
    assert_eq!(rig.queue.next_used(), 4);
}

#[test]
fn a_notification_decision_survives_a_miss() {
    let mut rig = Rig::new(8, true, 2048, 16);
    rig.queue.set_event_idx(true);
    let b = rig.buf(8, true);
    let mut chain = Chain::new();
    rig.driver.set_used_event(&rig.mem, &rig.space, 0);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 8);
    assert!(rig
        .queue
        .needs_notification(rig.tr.get(), &rig.mem)
        .unwrap());
    rig.driver.set_used_event(&rig.mem, &rig.space, 1);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[b], None)
        .unwrap();
    assert!(rig.pop(&mut chain).unwrap());
    rig.complete(head, 8);
    // The avail ring is invalidated before the decision: the check misses ...
    let (_, avail, _) = rig.driver.addresses();
    rig.iotlb
        .invalidate(IovaRange::from_size(avail, 2).unwrap());
    let r = rig.queue.needs_notification(rig.tr.get(), &rig.mem);
    let Err(PopError::Miss { iova, .. }) = r else {
        panic!("{r:?}");
    };
    // ... and once answered, the interrupt is still due.
    rig.answer(iova);
    assert!(rig
        .queue
        .needs_notification(rig.tr.get(), &rig.mem)
        .unwrap());
}
