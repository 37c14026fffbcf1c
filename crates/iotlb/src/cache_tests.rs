//! Unit tests of the IOTLB core: every edge of ranges, overlap, permissions and the bound.

use super::*;

const MAX: u64 = u64::MAX;

fn r(start: u64, last: u64) -> IovaRange {
    IovaRange::new(start, last).unwrap()
}

fn seg(addr: u64, len: u64) -> Segment {
    Segment { addr, len }
}

fn entries(t: &Iotlb) -> Vec<(u64, u64, u64, Perm)> {
    t.iter()
        .map(|m| (m.range.start(), m.range.last(), m.target, m.perm))
        .collect()
}

fn tlb(cap: usize) -> Iotlb {
    Iotlb::with_capacity(cap).unwrap()
}

#[test]
fn capacity_bounds() {
    assert!(Iotlb::with_capacity(0).is_err());
    assert!(Iotlb::with_capacity(MAX_CAPACITY + 1).is_err());
    assert_eq!(Iotlb::new().capacity(), DEFAULT_CAPACITY);
    assert_eq!(tlb(1).capacity(), 1);
}

#[test]
fn zero_length_translation_is_empty() {
    let t = tlb(4);
    assert!(t.translate(0x1234, 0, Access::Read).unwrap().is_empty());
    assert!(t.translate(MAX, 0, Access::Write).unwrap().is_empty());
}

#[test]
fn miss_reports_first_untranslated_byte() {
    let mut t = tlb(4);
    assert_eq!(
        t.translate(0x1000, 16, Access::Read),
        Err(TranslateError::Miss {
            iova: 0x1000,
            access: Access::Read
        })
    );
    t.update(r(0x1000, 0x1fff), 0x10_0000, Perm::ReadWrite)
        .unwrap();
    // Runs off the end of the entry into a gap.
    assert_eq!(
        t.translate(0x1ff0, 0x20, Access::Write),
        Err(TranslateError::Miss {
            iova: 0x2000,
            access: Access::Write
        })
    );
    assert_eq!(
        t.translate(0xff0, 0x20, Access::Read),
        Err(TranslateError::Miss {
            iova: 0xff0,
            access: Access::Read
        })
    );
}

#[test]
fn last_byte_of_the_space() {
    let mut t = tlb(4);
    t.update(r(MAX - 0xfff, MAX), 0x4000, Perm::ReadOnly)
        .unwrap();
    assert_eq!(
        t.translate(MAX, 1, Access::Read).unwrap().as_slice(),
        &[seg(0x4fff, 1)]
    );
    assert_eq!(
        t.translate(MAX - 0xfff, 0x1000, Access::Read)
            .unwrap()
            .as_slice(),
        &[seg(0x4000, 0x1000)]
    );
    assert_eq!(
        t.translate(MAX, 2, Access::Read),
        Err(TranslateError::Overflow { iova: MAX, len: 2 })
    );
    // The inclusive last byte can be invalidated alone.
    t.invalidate(IovaRange::byte(MAX));
    assert_eq!(
        entries(&t),
        vec![(MAX - 0xfff, MAX - 1, 0x4000, Perm::ReadOnly)]
    );
    assert!(matches!(
        t.translate(MAX, 1, Access::Read),
        Err(TranslateError::Miss { iova: MAX, .. })
    ));
}

#[test]
fn whole_space_update_and_invalidate() {
    let mut t = tlb(4);
    t.update(IovaRange::FULL, 0, Perm::ReadWrite).unwrap();
    assert_eq!(
        t.translate(0, MAX, Access::Write).unwrap().as_slice(),
        &[seg(0, MAX)]
    );
    assert_eq!(
        t.translate(MAX, 1, Access::Read).unwrap().as_slice(),
        &[seg(MAX, 1)]
    );
    // A hole in the middle splits it in two.
    t.invalidate(r(0x1000, 0x1fff));
    assert_eq!(
        entries(&t),
        vec![
            (0, 0xfff, 0, Perm::ReadWrite),
            (0x2000, MAX, 0x2000, Perm::ReadWrite)
        ]
    );
    t.invalidate_all();
    assert!(t.is_empty());
    assert!(t.translate(0, 1, Access::Read).is_err());
    t.check_invariants().unwrap();
}

#[test]
fn full_space_target_must_not_overflow() {
    let mut t = tlb(4);
    assert_eq!(
        t.update(IovaRange::FULL, 1, Perm::ReadOnly),
        Err(UpdateError::TargetOverflow {
            range: IovaRange::FULL,
            target: 1
        })
    );
    assert_eq!(
        t.update(r(0, 0xfff), MAX - 0xffe, Perm::ReadOnly),
        Err(UpdateError::TargetOverflow {
            range: r(0, 0xfff),
            target: MAX - 0xffe
        })
    );
    assert!(t.is_empty());
    t.update(r(0, 0xfff), MAX - 0xfff, Perm::ReadOnly).unwrap();
    assert_eq!(
        t.translate(0xfff, 1, Access::Read).unwrap().as_slice(),
        &[seg(MAX, 1)]
    );
}

#[test]
fn adjacent_entries_give_one_segment_each() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite)
        .unwrap();
    t.update(r(0x2000, 0x2fff), 0x5000, Perm::ReadWrite)
        .unwrap();
    t.update(r(0x3000, 0x3fff), 0x6000, Perm::ReadOnly).unwrap();
    assert_eq!(
        t.translate(0x1ff8, 0x1010, Access::Read)
            .unwrap()
            .as_slice(),
        &[seg(0xaff8, 8), seg(0x5000, 0x1000), seg(0x6000, 8)]
    );
    // Contiguous targets are still separate entries, hence separate segments.
    t.update(r(0x4000, 0x4fff), 0x7000, Perm::ReadOnly).unwrap();
    assert_eq!(t.translate(0x3800, 0x1000, Access::Read).unwrap().len(), 2);
    let mut v = vec![seg(1, 1)];
    t.translate_into(0x1000, 0x3000, Access::Read, &mut v)
        .unwrap();
    assert_eq!(v.len(), 4);
    // On error nothing is appended.
    assert!(t
        .translate_into(0x1000, 0x3000, Access::Write, &mut v)
        .is_err());
    assert_eq!(v.len(), 4);
}

#[test]
fn newer_update_trims_and_splits_older_entries() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x4fff), 0x10000, Perm::ReadOnly)
        .unwrap();
    // Into the middle: split.
    t.update(r(0x2000, 0x2fff), 0x90000, Perm::ReadWrite)
        .unwrap();
    assert_eq!(
        entries(&t),
        vec![
            (0x1000, 0x1fff, 0x10000, Perm::ReadOnly),
            (0x2000, 0x2fff, 0x90000, Perm::ReadWrite),
            (0x3000, 0x4fff, 0x12000, Perm::ReadOnly),
        ]
    );
    // Over the head of one and the tail of another: both trimmed, the middle one dropped.
    t.update(r(0x1800, 0x37ff), 0x50000, Perm::WriteOnly)
        .unwrap();
    assert_eq!(
        entries(&t),
        vec![
            (0x1000, 0x17ff, 0x10000, Perm::ReadOnly),
            (0x1800, 0x37ff, 0x50000, Perm::WriteOnly),
            (0x3800, 0x4fff, 0x12800, Perm::ReadOnly),
        ]
    );
    // Covering everything: one entry left.
    t.update(r(0, 0xffff), 0, Perm::ReadWrite).unwrap();
    assert_eq!(entries(&t), vec![(0, 0xffff, 0, Perm::ReadWrite)]);
    t.check_invariants().unwrap();
}

#[test]
fn invalidate_removes_exactly_the_range() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x1fff), 0x1000, Perm::ReadWrite)
        .unwrap();
    t.update(r(0x2000, 0x2fff), 0x2000, Perm::ReadWrite)
        .unwrap();
    t.update(r(0x3000, 0x3fff), 0x3000, Perm::ReadWrite)
        .unwrap();
    t.invalidate(r(0x1800, 0x37ff));
    assert_eq!(
        entries(&t),
        vec![
            (0x1000, 0x17ff, 0x1000, Perm::ReadWrite),
            (0x3800, 0x3fff, 0x3800, Perm::ReadWrite),
        ]
    );
    // Invalidating a gap changes no entry.
    t.invalidate(r(0x9000, 0x9fff));
    assert_eq!(t.len(), 2);
    // Inclusive end: the last byte of the range goes, the next stays.
    t.invalidate(r(0x3800, 0x3800));
    assert_eq!(entries(&t)[1].0, 0x3801);
    t.check_invariants().unwrap();
}

#[test]
fn permission_mismatch_is_denied_at_first_byte() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x1fff), 0x1000, Perm::ReadWrite)
        .unwrap();
    t.update(r(0x2000, 0x2fff), 0x2000, Perm::ReadOnly).unwrap();
    t.update(r(0x3000, 0x3fff), 0x3000, Perm::WriteOnly)
        .unwrap();
    assert_eq!(
        t.translate(0x1f00, 0x200, Access::Write),
        Err(TranslateError::Denied {
            iova: 0x2000,
            access: Access::Write
        })
    );
    assert_eq!(
        t.translate(0x3000, 1, Access::Read),
        Err(TranslateError::Denied {
            iova: 0x3000,
            access: Access::Read
        })
    );
    assert!(t.translate(0x2000, 0x1000, Access::Read).is_ok());
    assert!(t.translate(0x3000, 0x1000, Access::Write).is_ok());
    // A gap before the denied byte is reported first.
    t.invalidate(r(0x1800, 0x18ff));
    assert_eq!(
        t.translate(0x1700, 0x1000, Access::Write),
        Err(TranslateError::Miss {
            iova: 0x1800,
            access: Access::Write
        })
    );
}

#[test]
fn split_at_capacity_stays_bounded() {
    let mut t = tlb(2);
    t.update(r(0, 0x2fff), 0x10_0000, Perm::ReadWrite).unwrap();
    t.update(r(0x10000, 0x10fff), 0x20_0000, Perm::ReadWrite)
        .unwrap();
    // A hole in the middle of a full cache: a split would make three entries.
    t.invalidate(r(0x1000, 0x1fff));
    assert_eq!(t.len(), 2);
    t.check_invariants().unwrap();
    assert!(t.translate(0x1000, 1, Access::Read).is_err());
    // An UPDATE in the middle of an entry at capacity 2: also bounded, new mapping present.
    let mut t = tlb(2);
    t.update(r(0, 0x2fff), 0, Perm::ReadWrite).unwrap();
    t.update(r(0x1000, 0x1fff), 0x9000, Perm::ReadOnly).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(
        t.translate(0x1000, 1, Access::Read).unwrap().as_slice(),
        &[seg(0x9000, 1)]
    );
    t.check_invariants().unwrap();
    // Capacity 1: the fragment is dropped, the new mapping kept.
    let mut t = tlb(1);
    t.update(r(0, 0x2fff), 0, Perm::ReadWrite).unwrap();
    t.update(r(0x1000, 0x1fff), 0x9000, Perm::ReadOnly).unwrap();
    assert_eq!(entries(&t), vec![(0x1000, 0x1fff, 0x9000, Perm::ReadOnly)]);
    assert_eq!(t.counters().dropped_fragments, 1);
    // Capacity 1, hole in the middle: one of the two pieces stays, never both.
    let mut t = tlb(1);
    t.update(r(0, 0x2fff), 0, Perm::ReadWrite).unwrap();
    t.invalidate(r(0x1000, 0x1fff));
    assert_eq!(t.len(), 1);
    assert!(t.translate(0x1000, 1, Access::Read).is_err());
    t.check_invariants().unwrap();
}

#[test]
fn generation_changes_when_a_held_translation_may_change() {
    let mut t = tlb(8);
    let g0 = t.generation();
    let out = t.update(r(0x1000, 0x1fff), 0x1000, Perm::ReadOnly).unwrap();
    assert_eq!(out, UpdateOutcome::Added);
    assert_eq!(
        t.generation(),
        g0,
        "mapping unmapped bytes takes nothing from anybody"
    );
    t.update(r(0x1000, 0x1fff), 0x1000, Perm::ReadOnly).unwrap();
    assert_eq!(t.generation(), g0, "the same UPDATE again changes nothing");
    let out = t.update(r(0x1000, 0x2fff), 0x1000, Perm::ReadOnly).unwrap();
    assert_eq!(
        (out, t.generation()),
        (UpdateOutcome::Added, g0),
        "extends it the same way"
    );
    let out = t.update(r(0x1000, 0x1fff), 0x9000, Perm::ReadOnly).unwrap();
    assert_eq!(out, UpdateOutcome::Replaced, "another target");
    assert_ne!(t.generation(), g0);
    let g1 = t.generation();
    let out = t
        .update(r(0x1000, 0x1fff), 0x9000, Perm::ReadWrite)
        .unwrap();
    assert_eq!(out, UpdateOutcome::Replaced, "another permission");
    assert_ne!(t.generation(), g1);
    let g2 = t.generation();
    assert!(
        !t.invalidate(r(0x9000_0000, 0x9000_0fff)),
        "nothing mapped there"
    );
    assert_eq!(t.generation(), g2);
    assert!(t.invalidate(r(0x1800, 0x18ff)));
    assert_ne!(
        t.generation(),
        g2,
        "an INVALIDATE of mapped bytes changes it"
    );
    // Eviction does not, but the evicted translation is remembered: remapping it otherwise
    // is a change, mapping it again the same way is not.
    let mut small = tlb(1);
    small.update(r(0, 0xfff), 0, Perm::ReadOnly).unwrap();
    small
        .update(r(0x1000, 0x1fff), 0x5000, Perm::ReadOnly)
        .unwrap();
    let g = small.generation();
    small.update(r(0x2000, 0x2fff), 0, Perm::ReadOnly).unwrap();
    assert_eq!(small.counters().evictions, 2);
    assert_eq!(small.generation(), g);
    assert_eq!(
        small
            .update(r(0x1000, 0x1fff), 0x5000, Perm::ReadOnly)
            .unwrap(),
        UpdateOutcome::Added,
        "the evicted page mapped again as it was"
    );
    assert_eq!(
        small.update(r(0, 0xfff), 0x7000, Perm::ReadOnly).unwrap(),
        UpdateOutcome::Replaced,
        "an evicted page remapped: a worker may still hold the old translation"
    );
    assert_eq!(small.generation(), g + 1);
    assert!(
        small.invalidate(r(0x2000, 0x2fff)),
        "an evicted page unmapped"
    );
    assert!(!small.invalidate(r(0x2000, 0x2fff)), "twice");
    assert!(small.invalidate(IovaRange::FULL));
    assert_eq!(small.evicted_ranges(), 0);
}

#[test]
fn changes_since_replays_the_log() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x1fff), 0, Perm::ReadOnly).unwrap();
    t.update(r(0x5000, 0x5fff), 0, Perm::ReadOnly).unwrap();
    let g0 = t.generation();
    t.update(r(0x1000, 0x1fff), 0x8000, Perm::ReadOnly).unwrap();
    t.invalidate(r(0x5000, 0x5fff));
    let all: Vec<IovaRange> = t.changes_since(g0).unwrap().collect();
    assert_eq!(all, vec![r(0x1000, 0x1fff), r(0x5000, 0x5fff)]);
    let last: Vec<IovaRange> = t.changes_since(g0 + 1).unwrap().collect();
    assert_eq!(last, vec![r(0x5000, 0x5fff)]);
    assert_eq!(t.changes_since(t.generation()).unwrap().count(), 0);
    assert!(
        t.changes_since(t.generation() + 1).is_none(),
        "from the future"
    );
    for i in 0..CHANGE_LOG_LEN as u64 {
        t.invalidate(IovaRange::byte(0x1000 + i));
    }
    assert!(t.changes_since(g0).is_none(), "older than the log");
    assert_eq!(
        t.changes_since(t.generation() - CHANGE_LOG_LEN as u64)
            .unwrap()
            .count(),
        CHANGE_LOG_LEN
    );
}

#[test]
fn stale_hints_never_translate() {
    let mut t = tlb(4);
    t.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite)
        .unwrap();
    assert!(t.translate(0x1800, 8, Access::Read).is_ok());
    t.invalidate(r(0x1800, 0x1fff));
    assert!(t.translate(0x1800, 8, Access::Read).is_err());
    // Free the slot, then reuse it for another page: the old page's hint must not follow it.
    t.invalidate_all();
    t.update(r(0x7000, 0x7fff), 0xb000, Perm::ReadWrite)
        .unwrap();
    assert!(t.translate(0x1000, 8, Access::Read).is_err());
    assert_eq!(
        t.translate(0x7000, 8, Access::Read).unwrap().as_slice(),
        &[seg(0xb000, 8)]
    );
}

#[test]
fn hot_entries_survive_eviction() {
    let mut t = tlb(64);
    let page = |i: u64| r(i << 12, (i << 12) | 0xfff);
    for i in 0..64 {
        t.update(page(i), i << 20, Perm::ReadWrite).unwrap();
    }
    for _ in 0..20 {
        for hot in 0..8 {
            t.translate(hot << 12, 8, Access::Read).unwrap();
        }
    }
    for i in 100..400 {
        t.update(page(i), i << 20, Perm::ReadWrite).unwrap();
        // Keep the hot set in use while the cold stream passes.
        t.translate((i % 8) << 12, 8, Access::Read).ok();
        assert!(t.len() <= 64);
    }
    for hot in 0..8 {
        assert!(
            t.translate(hot << 12, 8, Access::Read).is_ok(),
            "hot page {hot} was evicted"
        );
    }
    assert!(t.counters().evictions > 0);
    t.check_invariants().unwrap();
}

#[test]
fn new_entry_survives_the_next_insertions() {
    // The queue that missed must find its entry when it retries, even under churn.
    let mut t = tlb(16);
    for i in 0..16u64 {
        t.update(r(i << 12, (i << 12) | 0xfff), 0, Perm::ReadOnly)
            .unwrap();
    }
    t.update(r(0x100_0000, 0x100_0fff), 0, Perm::ReadOnly)
        .unwrap();
    for i in 100..108u64 {
        t.update(r(i << 12, (i << 12) | 0xfff), 0, Perm::ReadOnly)
            .unwrap();
    }
    assert!(t.translate(0x100_0000, 1, Access::Read).is_ok());
}

#[test]
fn counters_count() {
    let mut t = tlb(2);
    for i in 0..5u64 {
        t.update(r(i << 12, (i << 12) | 0xfff), 0, Perm::ReadOnly)
            .unwrap();
    }
    t.invalidate(r(0, 0xfff));
    let c = t.counters();
    assert_eq!((c.updates, c.invalidations, c.evictions), (5, 1, 3));
    assert_eq!((c.entries, c.capacity), (t.len() as u64, 2));
}

#[test]
fn a_cache_full_of_fragments_still_evicts_within_bounds() {
    // One large mapping cut page by page (strict-mode unmaps inside a region-sized UPDATE):
    // every fragment inherits the same age. Eviction must still work and stay bounded.
    let mut t = tlb(256);
    t.update(r(0, (1 << 40) - 1), 0, Perm::ReadWrite).unwrap();
    let mut i = 1u64;
    while t.len() < 256 {
        t.invalidate(IovaRange::byte(i << 12));
        i += 1;
    }
    for k in 0..1000u64 {
        t.invalidate(IovaRange::byte(((i + k) << 12) + 0x10));
        assert!(t.len() <= 256);
    }
    t.update(r(1 << 41, (1 << 41) | 0xfff), 0x9000, Perm::ReadOnly)
        .unwrap();
    assert!(t.translate(1 << 41, 1, Access::Read).is_ok());
    t.check_invariants().unwrap();
}

#[test]
fn overlaps_sees_entries_on_either_side() {
    let mut t = tlb(8);
    t.update(r(0x1000, 0x1fff), 0, Perm::ReadOnly).unwrap();
    assert!(t.overlaps(r(0x1fff, 0x2fff)));
    assert!(t.overlaps(r(0, 0x1000)));
    assert!(t.overlaps(r(0x1800, 0x1800)));
    assert!(!t.overlaps(r(0x2000, 0x2fff)));
    assert!(!t.overlaps(r(0, 0xfff)));
    assert!(t.overlaps(IovaRange::FULL));
}
