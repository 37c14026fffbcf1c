//! Chain walks that outgrow the IOTLB: a walk keeps what it translated across misses, so a
//! chain needing more entries than the cache holds finishes, with one MISS per page; segments
//! adjacent in guest memory merge; a change to what a walk kept starts it over; the device's
//! limits refuse a chain before any of its buffers is translated.

mod common;

use common::Rig;
use iotlb::{Access, IovaRange, Perm};
use virtq::testing::{Buf, PAGE};
use virtq::{Chain, ChainError, ChainLimits, PopError};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 5) as u8).wrapping_mul(7))
        .collect()
}

/// Pop, answering each miss with its page; returns the result and the misses, in order.
/// `between` runs before every retry (a change of the IOMMU side, a look at other chains).
fn pop_counting(
    rig: &mut Rig,
    chain: &mut Chain,
    mut between: impl FnMut(&mut Rig, usize),
) -> (Result<bool, PopError>, Vec<(u64, Access)>) {
    let mut misses = Vec::new();
    loop {
        assert!(misses.len() < 5000, "the walk does not finish");
        match rig.queue.pop(rig.tr.get(), &rig.mem, chain) {
            Err(PopError::Miss { iova, access }) => {
                misses.push((iova, access));
                assert!(rig.answer(iova), "miss at unmapped {iova:#x}");
                between(rig, misses.len());
            }
            other => return (other, misses),
        }
    }
}

/// Distinct (page, access) pairs among `misses`.
fn distinct(misses: &[(u64, Access)]) -> usize {
    let mut pages: Vec<(u64, Access)> = misses.iter().map(|&(i, a)| (i & !(PAGE - 1), a)).collect();
    pages.sort_by_key(|&(p, a)| (p, a == Access::Write));
    pages.dedup();
    pages.len()
}

#[test]
fn a_300_page_walk_with_a_16_entry_iotlb_finishes_with_one_miss_per_page() {
    // Header, 300 scattered data pages, status: 302 buffer pages plus 3 ring pages, with an
    // IOTLB of 16 entries. Walking again from the head after each miss would evict the pages
    // it needs and never finish.
    let mut rig = Rig::new(8, true, 16, 21);
    let header = rig.buf(16, false);
    let data = rig.buf(300 * PAGE as u32, false);
    let status = rig.buf(1, true);
    let bytes = pattern(4, 300 * PAGE as usize);
    rig.space.write(&rig.mem, data.iova, &bytes);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[header, data, status], None)
        .unwrap();
    let mut chain = Chain::new();
    let (r, misses) = pop_counting(&mut rig, &mut chain, |_, _| {});
    assert_eq!(r, Ok(true));
    assert_eq!(chain.head(), head);
    // The bound: one MISS per page and direction the request touches (ring pages included),
    // never the same one twice.
    let pages = 1 + 300 + 1 + 3;
    assert_eq!(misses.len(), distinct(&misses), "a page missed twice");
    assert!(
        misses.len() <= pages,
        "{} misses for {pages} pages",
        misses.len()
    );
    assert!(
        rig.iotlb.stats().evictions > 250,
        "the IOTLB was too small to hold it"
    );
    let mut got = vec![0u8; bytes.len()];
    let mut r = chain.reader(&rig.mem);
    r.skip(16).unwrap();
    r.read_exact(&mut got).unwrap();
    assert!(got == bytes, "the data read through kept segments differs");
}

#[test]
fn an_indirect_walk_survives_looks_at_other_chains_between_misses() {
    // The prefetch looks at the next chains (their indirect tables too) while a walk is
    // parked: that must not disturb the walk's own indirect table.
    let mut rig = Rig::new(8, true, 16, 22);
    let mut chains = Vec::new();
    for seed in 0..2u8 {
        let table = rig.buf(16 * 4, false);
        let bufs = [
            rig.buf(16, false),
            rig.buf(20 * PAGE as u32, false),
            rig.buf(1, true),
        ];
        let bytes = pattern(seed, 20 * PAGE as usize);
        rig.space.write(&rig.mem, bufs[1].iova, &bytes);
        rig.driver
            .add_chain(&rig.mem, &rig.space, &bufs, Some(table.iova))
            .unwrap();
        chains.push(bytes);
    }
    let mut chain = Chain::new();
    let (r, _) = pop_counting(&mut rig, &mut chain, |rig, _| {
        // What the back-end's look-ahead does after a miss.
        if let Ok(Some(next)) = rig.queue.peek_head(rig.tr.get(), &rig.mem, 1) {
            let _ = rig
                .queue
                .visit_buffers(rig.tr.get(), &rig.mem, next, |_, _, _| true);
        }
    });
    assert_eq!(r, Ok(true));
    assert_eq!(chain.descriptors(), 3);
    let mut got = vec![0u8; 20 * PAGE as usize];
    let mut rd = chain.reader(&rig.mem);
    rd.skip(16).unwrap();
    rd.read_exact(&mut got).unwrap();
    assert!(got == chains[0]);
}

#[test]
fn pages_contiguous_in_guest_memory_are_one_segment() {
    // 4 MiB mapped page by page (1024 IOTLB entries) onto contiguous guest memory, plus a
    // header and a status byte: the walk hands out one data segment, not 1024.
    let mut rig = Rig::new(8, true, 2048, 23);
    let header = rig.buf(16, false);
    let iova = rig.next_buf;
    let pages = 1024;
    let base = rig
        .space
        .map_contiguous(&mut rig.alloc, iova, pages, Perm::ReadWrite);
    rig.next_buf += (pages + 1) * PAGE;
    let data = Buf {
        iova,
        len: (pages * PAGE) as u32,
        write: true,
    };
    let status = rig.buf(1, true);
    rig.driver
        .add_chain(&rig.mem, &rig.space, &[header, data, status], None)
        .unwrap();
    let mut chain = Chain::new();
    let (r, _) = pop_counting(&mut rig, &mut chain, |_, _| {});
    assert_eq!(r, Ok(true));
    let w = chain.writable();
    assert_eq!(w[0].addr, base);
    assert_eq!(w[0].len, pages * PAGE, "merged: {} segments", w.len());
    assert!(
        w.len() <= 2,
        "data and (separate) status: {} segments",
        w.len()
    );
}

#[test]
fn a_change_to_what_a_walk_kept_starts_it_over() {
    let mut rig = Rig::new(8, true, 16, 24);
    let header = rig.buf(16, false);
    let data = rig.buf(40 * PAGE as u32, false);
    let status = rig.buf(1, true);
    rig.space
        .write(&rig.mem, data.iova, &pattern(1, 40 * PAGE as usize));
    rig.driver
        .add_chain(&rig.mem, &rig.space, &[header, data, status], None)
        .unwrap();
    let mut chain = Chain::new();
    // After 20 answered misses the walk has translated the data's first page long ago (and
    // the IOTLB has evicted it): the IOMMU side now remaps that page elsewhere, with other
    // bytes there. The walk must not use its old translation.
    let fresh = rig.alloc.page();
    let new_first = pattern(9, PAGE as usize);
    let mut unrelated_misses = 0;
    let (r, misses) = pop_counting(&mut rig, &mut chain, |rig, n| {
        if n == 10 {
            // An INVALIDATE of bytes the walk never touched changes nothing for it.
            rig.iotlb
                .invalidate(IovaRange::from_size(0x7777_0000_0000, PAGE).unwrap());
            unrelated_misses = n;
        }
        if n == 20 {
            rig.space.map_page(data.iova, fresh, Perm::ReadWrite);
            rig.space.write(&rig.mem, data.iova, &new_first);
            let (range, gpa, perm) = rig.space.update_for(data.iova).unwrap();
            rig.iotlb.update(range, gpa, perm).unwrap();
        }
    });
    assert_eq!(r, Ok(true));
    assert!(unrelated_misses > 0);
    let mut first = vec![0u8; PAGE as usize];
    let mut rd = chain.reader(&rig.mem);
    rd.skip(16).unwrap();
    rd.read_exact(&mut first).unwrap();
    assert!(
        first == new_first,
        "the walk used a translation replaced meanwhile"
    );
    // Started over once: pages before the remap were missed again (evicted), but only once.
    assert!(misses.len() > 44, "no restart: {} misses", misses.len());
    assert!(misses.len() < 2 * 45, "{} misses", misses.len());
}

#[test]
fn the_device_limits_refuse_a_chain_before_translating_its_buffers() {
    for (limits, want) in [
        (
            ChainLimits {
                max_descriptors: 3,
                max_descriptor_len: u32::MAX,
            },
            ChainError::TooManyDescriptors { limit: 3 },
        ),
        (
            ChainLimits {
                max_descriptors: 8,
                max_descriptor_len: 2 * PAGE as u32,
            },
            ChainError::DescriptorTooLong {
                index: 1,
                len: 3 * PAGE as u32,
                limit: 2 * PAGE as u32,
            },
        ),
    ] {
        let mut rig = Rig::new(8, true, 64, 25);
        rig.queue.set_limits(limits);
        let header = rig.buf(16, false);
        let data = rig.buf(3 * PAGE as u32, false);
        let more = rig.buf(16, false);
        let status = rig.buf(1, true);
        let head = rig
            .driver
            .add_chain(&rig.mem, &rig.space, &[header, data, more, status], None)
            .unwrap();
        let mut chain = Chain::new();
        let (r, misses) = pop_counting(&mut rig, &mut chain, |_, _| {});
        match r {
            Err(PopError::Invalid { head: h, reason }) => assert_eq!((h, reason), (head, want)),
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.queue.next_avail(), 1, "consumed, to be failed");
        // The buffer past the limit was never asked for.
        let far = if want == (ChainError::TooManyDescriptors { limit: 3 }) {
            status.iova
        } else {
            data.iova
        };
        assert!(
            !misses.iter().any(|&(i, _)| i & !(PAGE - 1) == far),
            "a MISS for a buffer of a refused chain"
        );
    }
}

/// Make the indirect descriptor at `head` say its table has `entries` entries.
fn widen_indirect(rig: &mut Rig, head: u16, entries: u32) {
    let at = rig.driver.addresses().0 + 16 * u64::from(head);
    let raw: [u8; 16] = rig.space.read(&rig.mem, at, 16).try_into().unwrap();
    let mut d = virtq::Descriptor::from_bytes(&raw);
    d.len = 16 * entries;
    rig.driver.write_desc(&rig.mem, &rig.space, head, d);
}

#[test]
fn ring_areas_and_indirect_tables_larger_than_the_iotlb() {
    // 8192 entries: the descriptor table is 32 pages, the used ring 17, the avail ring 5;
    // with 16 IOTLB entries none of them can be cached whole at once. An indirect table of
    // 2048 entries (8 pages) whose chain uses three, walked three times over.
    let mut rig = Rig::new(8192, true, 16, 26);
    let table = rig.buf(16 * 2048, false);
    let header = rig.buf(16, false);
    let data = rig.buf(3 * PAGE as u32, true);
    let status = rig.buf(1, true);
    let mut chain = Chain::new();
    for round in 0..3 {
        let head = rig
            .driver
            .add_chain(
                &rig.mem,
                &rig.space,
                &[header, data, status],
                Some(table.iova),
            )
            .unwrap();
        // The table's length says 2048 entries although three are used.
        widen_indirect(&mut rig, head, 2048);
        let (r, misses) = pop_counting(&mut rig, &mut chain, |_, _| {});
        assert_eq!(r, Ok(true), "round {round}");
        assert_eq!(chain.head(), head);
        assert_eq!(
            misses.len(),
            distinct(&misses),
            "round {round}: a page missed twice"
        );
        rig.complete(head, 0);
        rig.driver.take_used(&rig.mem, &rig.space);
    }
    assert!(rig.iotlb.stats().evictions > 40);
    // The same table refused before it is translated where the device allows 8 descriptors.
    rig.queue.set_limits(ChainLimits {
        max_descriptors: 8,
        max_descriptor_len: u32::MAX,
    });
    let fresh = rig.buf(16 * 2048, false);
    let head = rig
        .driver
        .add_chain(
            &rig.mem,
            &rig.space,
            &[header, data, status],
            Some(fresh.iova),
        )
        .unwrap();
    widen_indirect(&mut rig, head, 2048);
    let (r, misses) = pop_counting(&mut rig, &mut chain, |_, _| {});
    assert!(
        matches!(
            r,
            Err(PopError::Invalid {
                reason: ChainError::TooManyDescriptors { limit: 8 },
                ..
            })
        ),
        "{r:?}"
    );
    let table_pages = fresh.iova..fresh.iova + 16 * 2048;
    assert!(
        !misses.iter().any(|(i, _)| table_pages.contains(i)),
        "the refused table was translated"
    );
}
