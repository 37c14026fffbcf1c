//! Dirty logging on the block device's fast path: a read is a `preadv` straight into guest
//! memory (the kernel writes the pages, not our code), and the log must still get exactly
//! the guest-physical pages of the buffer and of the status byte, behind the IOMMU where the
//! IOVAs differ from them; a write request logs only its status byte.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use backend::dirty::LOG_PAGE;
use backend::testing::MEM;
use backend::EngineConfig;
use common::{blk_request, connect, pattern, status, Frontend};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtq::testing::{Buf, PAGE};

const LOG_BYTES: u64 = MEM / LOG_PAGE / 8;

fn marked(log: &std::fs::File) -> BTreeSet<u64> {
    let mut b = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut b, 0).unwrap();
    (0..LOG_BYTES * 8)
        .filter(|&p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

fn pages_of(f: &Frontend, b: &Buf) -> BTreeSet<u64> {
    let last = b.iova + u64::from(b.len).max(1) - 1;
    (b.iova / PAGE..=last / PAGE)
        .map(|p| f.space.translate(p * PAGE).unwrap().0 / LOG_PAGE)
        .collect()
}

fn used_ring_pages(f: &Frontend) -> BTreeSet<u64> {
    let (_, _, used) = f.queues[0].driver.addresses();
    let size = u64::from(f.queues[0].driver.size());
    (used / PAGE..=(used + 6 + 8 * size - 1) / PAGE)
        .map(|p| f.space.translate(p * PAGE).unwrap().0 / LOG_PAGE)
        .collect()
}

#[test]
fn a_positioned_read_into_guest_memory_logs_the_pages_it_filled() {
    let engine = EngineConfig {
        iotlb_capacity: 256,
        ..EngineConfig::default()
    };
    let s = common::blk_queues(4 << 20, 1, engine);
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 17);
    let log = f.set_log_base(LOG_BYTES);
    f.set_log_all(true);
    let data = pattern(9, 3 * 4096);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 8, &data, 0);
    f.submit(0, &[h, d.unwrap(), st]);
    f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
    let ring = used_ring_pages(&f);
    let outside =
        |got: BTreeSet<u64>| -> BTreeSet<u64> { got.difference(&ring).copied().collect() };
    assert_eq!(
        outside(marked(&log)),
        pages_of(&f, &st),
        "a write: its status only"
    );

    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0).unwrap();
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 8, &[], 3 * 4096);
    let d = d.unwrap();
    f.submit(0, &[h, d, st]);
    f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.space.read(&f.mem, d.iova, data.len()), data);
    let want: BTreeSet<u64> = pages_of(&f, &d)
        .union(&pages_of(&f, &st))
        .copied()
        .collect();
    assert_eq!(
        want.len(),
        4,
        "three scattered data pages and the status page"
    );
    assert_eq!(
        outside(marked(&log)),
        want,
        "the pages preadv filled, and the status"
    );
    drop(f);
    t.join().unwrap();
    let stats = s.stats();
    assert!(
        stats.logged_pages >= 4 && stats.log_beyond == 0,
        "{stats:?}"
    );
    assert_eq!(stats.logged_requests, 2);
}
