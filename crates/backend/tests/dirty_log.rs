//! Dirty logging through the engine, behind the IOMMU: the log the front-end shares with
//! SET_LOG_BASE gets the guest-physical pages the device wrote (its writable buffers and the
//! used ring), never the IOVAs the driver gave, which differ (the scripted front-end maps
//! IOVAs far above guest memory onto scattered pages), and never a page only read. The
//! device is the engine's null device, which writes each chain's status byte: the engine
//! logs every writable byte of a completed chain, whatever the device wrote of it.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use backend::dirty::{LogMode, LOG_PAGE};
use backend::testing::{connect, null_server, pattern, request as blk_request, Frontend, MEM};
use backend::EngineConfig;
use proptest::prelude::*;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtq::testing::{Buf, PAGE};

/// The log's size for the scripted guest's memory: one bit per page.
const LOG_BYTES: u64 = MEM / LOG_PAGE / 8;
const QUEUE: u16 = 64;

fn start(mode: LogMode, regions: u64, seed: u64) -> (Frontend, std::thread::JoinHandle<()>) {
    let engine = EngineConfig {
        iotlb_capacity: 256,
        log_mode: mode,
        ..EngineConfig::default()
    };
    let s = null_server(1, engine);
    let (sock, t) = connect(&s);
    (
        Frontend::connect_regions(sock, 1, QUEUE, true, seed, regions),
        t,
    )
}

/// The pages marked in the log file.
fn marked(log: &std::fs::File) -> BTreeSet<u64> {
    let mut b = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut b, 0).unwrap();
    let mut out = BTreeSet::new();
    for (i, byte) in b.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                out.insert(i as u64 * 8 + bit);
            }
        }
    }
    out
}

fn clear(log: &std::fs::File) {
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0).unwrap();
}

/// The guest-physical pages behind `len` bytes at `iova`.
fn gpa_pages(f: &Frontend, iova: u64, len: u64) -> BTreeSet<u64> {
    (iova / PAGE..=(iova + len.max(1) - 1) / PAGE)
        .map(|p| f.space.translate(p * PAGE).expect("mapped").0 / LOG_PAGE)
        .collect()
}

fn pages_of(f: &Frontend, b: &Buf) -> BTreeSet<u64> {
    gpa_pages(f, b.iova, u64::from(b.len))
}

/// The guest-physical pages of the used ring.
fn used_ring_pages(f: &Frontend) -> BTreeSet<u64> {
    let (_, _, used) = f.queues[0].driver.addresses();
    gpa_pages(f, used, 6 + 8 * u64::from(QUEUE))
}

/// The page of the used index.
fn used_idx_page(f: &Frontend) -> u64 {
    let (_, _, used) = f.queues[0].driver.addresses();
    f.space.translate(used + 2).unwrap().0 / LOG_PAGE
}

fn run(f: &mut Frontend, bufs: &[Buf]) {
    f.submit(0, bufs);
    f.wait_used(0, 1, Duration::from_secs(10));
}

#[test]
fn a_write_through_an_iova_sets_exactly_its_guest_physical_pages() {
    let (mut f, t) = start(LogMode::Gpa, 1, 3);
    let log = f.set_log_base(LOG_BYTES);
    // Served before LOG_ALL: nothing logged.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 3 * 4096);
    run(&mut f, &[h, d.unwrap(), st]);
    assert!(marked(&log).is_empty(), "logging is off until LOG_ALL");

    f.set_log_all(true);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 8, &[], 3 * 4096);
    let d = d.unwrap();
    // The IOVAs are nowhere near the pages behind them.
    assert!(d.iova / LOG_PAGE > MEM / LOG_PAGE);
    run(&mut f, &[h, d, st]);
    let want: BTreeSet<u64> = pages_of(&f, &d)
        .union(&pages_of(&f, &st))
        .copied()
        .collect();
    let got = marked(&log);
    let ring = used_ring_pages(&f);
    assert!(got.contains(&used_idx_page(&f)), "the used index's page");
    let buffers: BTreeSet<u64> = got.difference(&ring).copied().collect();
    assert_eq!(
        buffers, want,
        "exactly the written buffers' pages, besides the used ring"
    );
    assert!(
        pages_of(&f, &h).is_disjoint(&got),
        "the header, only read, is not logged"
    );

    // A write request: only its status byte is device-writable.
    clear(&log);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &pattern(1, 8192), 0);
    let d = d.unwrap();
    run(&mut f, &[h, d, st]);
    let got = marked(&log);
    let buffers: BTreeSet<u64> = got.difference(&ring).copied().collect();
    assert_eq!(buffers, pages_of(&f, &st));

    // Off again: nothing more.
    f.set_log_all(false);
    clear(&log);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 4096);
    run(&mut f, &[h, d.unwrap(), st]);
    assert!(marked(&log).is_empty());
    drop(f);
    t.join().unwrap();
}

#[test]
fn the_broken_mode_logs_iovas_and_misses_the_pages_written() {
    let (mut f, t) = start(LogMode::BrokenIova, 1, 5);
    let log = f.set_log_base(LOG_BYTES);
    f.set_log_all(true);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 4096);
    let d = d.unwrap();
    run(&mut f, &[h, d, st]);
    // The IOVAs lie past the end of the log: nothing at all is marked.
    let got = marked(&log);
    assert!(
        pages_of(&f, &d).is_disjoint(&got),
        "the page written is not logged: {got:?}"
    );
    assert!(used_ring_pages(&f).is_disjoint(&got));
    drop(f);
    t.join().unwrap();
}

/// One buffer of a random chain: its length, whether the device writes it, whether its
/// pages are contiguous in guest memory.
fn buf_strategy() -> impl Strategy<Value = (u32, bool, bool)> {
    (1u32..3 * 4096 + 100, any::<bool>(), any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random chains over a memory table of several regions, checked against a model: after
    /// each batch, the log's pages outside the used ring are exactly the pages of the
    /// writable buffers of the chains completed, and the used index's page is marked.
    #[test]
    fn random_chains_over_several_regions_match_a_model_bitmap(
        regions in prop::sample::select(vec![1u64, 2, 4, 8]),
        seed in any::<u64>(),
        chains in prop::collection::vec(prop::collection::vec(buf_strategy(), 1..5), 1..6),
        indirect in any::<bool>(),
    ) {
        let (mut f, t) = start(LogMode::Gpa, regions, seed);
        let log = f.set_log_base(LOG_BYTES);
        f.set_log_all(true);
        let mut model = BTreeSet::new();
        for chain in &chains {
            // Readable buffers first, as a virtio driver lays them out; the last is always
            // writable (the null device writes its last writable byte).
            let mut bufs: Vec<Buf> = Vec::new();
            let mut specs = chain.clone();
            specs.sort_by_key(|s| s.1);
            specs.last_mut().unwrap().1 = true;
            for &(len, write, contiguous) in &specs {
                let b = if contiguous { f.contiguous_buf(len, write) } else { f.buf(len, write) };
                if write {
                    model.extend(pages_of(&f, &b));
                }
                bufs.push(b);
            }
            if indirect {
                f.submit_indirect(0, &bufs);
            } else {
                f.submit(0, &bufs);
            }
            f.wait_used(0, 1, Duration::from_secs(10));
        }
        let got = marked(&log);
        let ring = used_ring_pages(&f);
        prop_assert!(got.contains(&used_idx_page(&f)));
        let buffers: BTreeSet<u64> = got.difference(&ring).copied().collect();
        let model_outside_ring: BTreeSet<u64> = model.difference(&ring).copied().collect();
        prop_assert_eq!(buffers, model_outside_ring);
        drop(f);
        t.join().unwrap();
    }
}
