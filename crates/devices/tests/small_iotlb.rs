//! No limit follows from the IOTLB's size (design invariant 12), through the whole back-end:
//! with 16 entries a request of 300 scattered pages is served, data checked both ways, with
//! at most one MISS per page it touches; four queues do it at once; a 4 MiB request of 4 KiB
//! mappings over contiguous memory is served at the default capacity.

mod common;

use std::time::{Duration, Instant};

use backend::EngineConfig;
use common::{blk_request, blk_server, connect, pattern, status, Frontend};
use devices::BlkConfig;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtq::testing::{Buf, PAGE};

const DISK: u64 = 16 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

fn server(queues: u16, capacity: usize) -> std::sync::Arc<backend::Server<devices::Blk>> {
    blk_server(
        DISK,
        BlkConfig {
            queues,
            queue_size: 64,
            ..BlkConfig::default()
        },
        EngineConfig {
            iotlb_capacity: capacity,
            miss_timeout: Duration::from_secs(5),
            ..EngineConfig::default()
        },
    )
}

/// `len` bytes of data split into descriptors of at most 1 MiB (`size_max`).
fn data_bufs(f: &mut Frontend, len: usize, write: bool, contiguous: bool) -> Vec<Buf> {
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(1 << 20);
        out.push(if contiguous {
            f.contiguous_buf(n as u32, write)
        } else {
            f.buf(n as u32, write)
        });
        left -= n;
    }
    out
}

/// Write `data` at `sector` through queue `q`, read it back into fresh buffers, compare.
/// Returns the MISSes the back-end sent for the two requests.
fn write_then_read(f: &mut Frontend, q: usize, sector: u64, data: &[u8], contiguous: bool) -> u64 {
    let before = f.misses_seen;
    let (h, _, st) = blk_request(f, VIRTIO_BLK_T_OUT, sector, &[], 0);
    let bufs = data_bufs(f, data.len(), false, contiguous);
    let mut at = 0;
    for b in &bufs {
        f.space
            .write(&f.mem, b.iova, &data[at..at + b.len as usize]);
        at += b.len as usize;
    }
    let mut chain = vec![h];
    chain.extend(&bufs);
    chain.push(st);
    f.submit(q, &chain);
    f.wait_used(q, 1, Duration::from_secs(30));
    assert_eq!(status(f, &st), OK, "write of {} bytes", data.len());

    let (h, _, st) = blk_request(f, VIRTIO_BLK_T_IN, sector, &[], 0);
    let bufs = data_bufs(f, data.len(), true, contiguous);
    let mut chain = vec![h];
    chain.extend(&bufs);
    chain.push(st);
    f.submit(q, &chain);
    f.wait_used(q, 1, Duration::from_secs(30));
    assert_eq!(status(f, &st), OK, "read of {} bytes", data.len());
    let mut got = Vec::with_capacity(data.len());
    for b in &bufs {
        got.extend(f.space.read(&f.mem, b.iova, b.len as usize));
    }
    assert!(got == data, "data read back differs ({} bytes)", data.len());
    f.misses_seen - before
}

#[test]
fn a_300_page_request_through_a_16_entry_iotlb_with_one_miss_per_page() {
    let s = server(1, 16);
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 51);
    let data = pattern(8, 300 * PAGE as usize);
    let misses = write_then_read(&mut f, 0, 0, &data, false);
    // The bound: one MISS per page the two requests touch (header, 300 data pages, status,
    // each of them twice), plus the three ring pages.
    let bound = 2 * (1 + 300 + 1) + 3;
    eprintln!("{misses} MISSes for a 300-page write and read back (bound {bound})");
    assert!(
        misses <= bound,
        "{misses} MISSes for two 300-page requests (bound {bound})"
    );
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!(
        (st.failed, st.broken_queues, st.timeouts),
        (0, 0, 0),
        "{st}"
    );
    assert!(st.evictions > 500, "{st}");
}

#[test]
fn four_queues_share_a_16_entry_iotlb() {
    let s = server(4, 16);
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 4, 64, true, 52);
    // Every queue has a 100-page write in flight at once; then each reads its data back.
    let mut reqs = Vec::new();
    for q in 0..4usize {
        let data = pattern(q as u8 + 1, 100 * PAGE as usize);
        let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, q as u64 * 2048, &[], 0);
        let bufs = data_bufs(&mut f, data.len(), false, false);
        f.space.write(&f.mem, bufs[0].iova, &data);
        let mut chain = vec![h];
        chain.extend(&bufs);
        chain.push(st);
        f.submit(q, &chain);
        reqs.push((q, st, data));
    }
    let start = Instant::now();
    let mut done = [false; 4];
    while done.iter().any(|d| !d) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not all queues finished"
        );
        f.serve_misses();
        for (q, _, _) in &reqs {
            if !f.take_used(*q).is_empty() {
                done[*q] = true;
            }
        }
    }
    for (q, st, data) in &reqs {
        assert_eq!(status(&f, st), OK, "queue {q}");
        let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, *q as u64 * 2048, &[], 0);
        let bufs = data_bufs(&mut f, data.len(), true, false);
        let mut chain = vec![h];
        chain.extend(&bufs);
        chain.push(st);
        f.submit(*q, &chain);
        f.wait_used(*q, 1, Duration::from_secs(30));
        assert_eq!(status(&f, &st), OK, "queue {q} read");
        assert!(
            f.space.read(&f.mem, bufs[0].iova, data.len()) == *data,
            "queue {q} data"
        );
    }
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!((st.failed, st.broken_queues), (0, 0), "{st}");
}

#[test]
fn a_4_mib_request_of_4_kib_mappings_at_the_default_capacity() {
    let s = server(1, iotlb::DEFAULT_CAPACITY);
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 53);
    let data = pattern(2, 4 << 20);
    // Scattered pages: 1024 mappings, 1024 segments; contiguous: 1024 mappings, merged.
    write_then_read(&mut f, 0, 0, &data, false);
    write_then_read(&mut f, 0, 16384, &data, true);
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!((st.failed, st.broken_queues), (0, 0), "{st}");
}
