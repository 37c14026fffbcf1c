//! The vhost-user-blk back-end over real sockets, without QEMU: a test front-end does the
//! handshake, shares its memory as a memfd, puts rings and buffers at IOVAs and answers
//! misses. Covered: MISS then UPDATE then completion; INVALIDATE during I/O; an unanswered
//! MISS failing its request after the timeout while another queue keeps serving; a
//! disconnect during a miss, then a new connection served correctly; a queue parked on a
//! miss announcing the completions before it once its busy-poll window is over, when kicks
//! keep coming, and when the queue is stopped.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use backend::{EngineConfig, Server};
use common::{blk_request, connect, pattern, status, Frontend};
use devices::Blk;
use iotlb::IovaRange;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtq::testing::PAGE;

const DISK: u64 = 4 << 20;

fn server(queues: u16, miss_timeout: Duration) -> Arc<Server<Blk>> {
    server_polling(queues, miss_timeout, Duration::ZERO)
}

/// With the threads busy-polling for `busy_poll` before they block.
fn server_polling(queues: u16, miss_timeout: Duration, busy_poll: Duration) -> Arc<Server<Blk>> {
    let engine = EngineConfig {
        iotlb_capacity: 256,
        miss_timeout,
        busy_poll,
        ..EngineConfig::default()
    };
    common::blk_queues(DISK, queues, engine)
}

/// Write `data` at `sector` then read it back, through queue `q`.
fn write_then_read(f: &mut Frontend, q: usize, sector: u64, data: &[u8]) {
    let (h, d, st) = blk_request(f, VIRTIO_BLK_T_OUT, sector, data, 0);
    f.submit(q, &[h, d.unwrap(), st]);
    let used = f.wait_used(q, 1, Duration::from_secs(10));
    assert_eq!(used[0].1, 1, "OUT writes only the status byte");
    assert_eq!(status(f, &st), VIRTIO_BLK_S_OK as u8);
    let (h, d, st) = blk_request(f, VIRTIO_BLK_T_IN, sector, &[], data.len() as u32);
    let d = d.unwrap();
    f.submit(q, &[h, d, st]);
    let used = f.wait_used(q, 1, Duration::from_secs(10));
    assert_eq!(used[0].1, data.len() as u32 + 1);
    assert_eq!(status(f, &st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.space.read(&f.mem, d.iova, data.len()), data);
}

#[test]
fn miss_update_completion_through_iovas() {
    let s = server(1, Duration::from_secs(1));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 1);
    // 3 pages of data: the request needs MISS/UPDATE round trips for rings and buffers.
    write_then_read(&mut f, 0, 8, &pattern(1, 3 * PAGE as usize));
    assert!(f.misses_seen >= 5, "misses seen: {}", f.misses_seen);
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!(st.requests, 2);
    assert!(st.misses_sent >= 5 && st.updates >= 5, "{st}");
}

#[test]
fn without_the_iommu_addresses_are_guest_physical() {
    let s = server(1, Duration::from_secs(1));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, false, 2);
    write_then_read(&mut f, 0, 0, &pattern(2, 40 * 512));
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!((st.requests, st.misses_sent), (2, 0));
}

#[test]
fn invalidations_during_io_keep_data_intact() {
    let s = server(1, Duration::from_secs(1));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 3);
    for round in 0..20u64 {
        let data = pattern(round as u8, 512 * (9 + round as usize));
        let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, round * 16, &data, 0);
        f.submit(0, &[h, d.unwrap(), st]);
        // Invalidate the whole buffer window and the rings while the request is in flight:
        // the back-end misses again and gets the same answers.
        f.invalidate(IovaRange::new(common::BUF_IOVA, common::BUF_IOVA + (1 << 30)).unwrap());
        if round % 3 == 0 {
            f.invalidate(IovaRange::new(common::RING_IOVA, common::RING_IOVA + (1 << 20)).unwrap());
        }
        f.wait_used(0, 1, Duration::from_secs(10));
        assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
        let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, round * 16, &[], data.len() as u32);
        let d = d.unwrap();
        f.submit(0, &[h, d, st]);
        f.invalidate(IovaRange::FULL);
        f.wait_used(0, 1, Duration::from_secs(10));
        assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            f.space.read(&f.mem, d.iova, data.len()),
            data,
            "round {round}"
        );
    }
    drop(f);
    t.join().unwrap();
    assert!(s.stats().invalidations >= 40);
}

#[test]
fn an_unanswered_miss_fails_its_request_while_another_queue_serves() {
    let s = server(2, Duration::from_millis(100));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 2, 64, true, 4);
    // Queue 0 reads into a buffer whose page the IOMMU side never maps.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d = d.unwrap();
    f.never_map.push(d.iova);
    f.submit(0, &[h, d, st]);
    // Meanwhile queue 1 is served normally.
    for i in 0..3u64 {
        write_then_read(&mut f, 1, 100 + i * 8, &pattern(9, 4096));
    }
    // The MISS is sent twice, then the request fails with IOERR in its status byte.
    let used = f.wait_used(0, 1, Duration::from_secs(5));
    assert_eq!(
        f.ignored.len(),
        2,
        "the MISS went out twice: {:x?}",
        f.ignored
    );
    assert_eq!(used[0].1, 1);
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_IOERR as u8);
    // Queue 0 moves on.
    write_then_read(&mut f, 0, 200, &pattern(5, 1024));
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!(st.timeouts, 1, "{st}");
}

#[test]
fn a_disconnect_during_a_miss_then_a_new_connection_is_served() {
    let s = server(1, Duration::from_secs(5));
    let dir = std::env::temp_dir().join(format!("vhost-iotlb-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("blk.sock");
    let serving = {
        let (s, path) = (s.clone(), path.clone());
        std::thread::spawn(move || s.serve(&path).unwrap())
    };
    assert!(backend::wait_for_socket(&path, Duration::from_secs(5)));
    // The probe connection above was accepted and closed; now the real ones.
    {
        let mut f = Frontend::connect(UnixStream::connect(&path).unwrap(), 1, 64, true, 5);
        let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
        f.never_map.push(d.unwrap().iova);
        f.submit(0, &[h, d.unwrap(), st]);
        // Wait until the back-end is parked on the miss nobody answers, then hang up.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while f.ignored.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no miss on the unmapped page"
            );
            f.serve_misses();
        }
    }
    let mut g = Frontend::connect(UnixStream::connect(&path).unwrap(), 1, 64, true, 6);
    write_then_read(&mut g, 0, 64, &pattern(7, 8192));
    drop(g);
    s.shutdown_handle().shutdown();
    serving.join().unwrap();
    assert!(!path.exists(), "the socket file is removed on shutdown");
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn a_parked_queue_announces_earlier_completions_before_it_blocks() {
    // A parked queue holds the interrupt for what it completed before the miss while it
    // busy-polls for the answer (20 ms here); it must send it before blocking, not hold it
    // until the miss is answered or times out (10 s here).
    let s = server_polling(1, Duration::from_secs(10), Duration::from_millis(20));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 8);
    let data = pattern(3, 1024);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 40, &data, 0);
    let first = f.submit(0, &[h, d.unwrap(), st]);
    let (h2, d2, st2) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d2 = d2.unwrap();
    f.never_map.push(d2.iova);
    f.submit(0, &[h2, d2, st2]);
    let start = std::time::Instant::now();
    while !f.take_call(0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no interrupt for the completed request while the next one waits for its miss"
        );
        f.serve_misses();
        std::thread::sleep(Duration::from_millis(1));
    }
    let used = f.wait_used(0, 1, Duration::from_secs(1));
    assert_eq!(used, vec![(first, 1)], "only the first request is done");
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
    assert!(
        f.ignored.contains(&d2.iova),
        "the second request missed: {:x?}",
        f.ignored
    );
    drop(f);
    t.join().unwrap();
}

/// Submit a write that completes and a read whose data page is never mapped; serve misses
/// (answering `kick` times meanwhile, if asked) until the write is done and the read has
/// missed. Returns the write's head and the used entries seen.
fn one_done_one_parked(f: &mut Frontend, kick: bool) -> (u16, Vec<(u16, u32)>) {
    let (h, d, st) = blk_request(f, VIRTIO_BLK_T_OUT, 40, &pattern(4, 1024), 0);
    let first = f.submit(0, &[h, d.unwrap(), st]);
    let (h2, d2, st2) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d2 = d2.unwrap();
    f.never_map.push(d2.iova);
    f.submit(0, &[h2, d2, st2]);
    let start = std::time::Instant::now();
    let mut used = Vec::new();
    while used.is_empty() || !f.ignored.contains(&d2.iova) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the write did not complete"
        );
        f.serve_misses();
        used.extend(f.take_used(0));
        if kick {
            f.kick(0);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (first, used)
}

#[test]
fn stopping_a_parked_queue_announces_the_completions_it_held() {
    // A busy-poll window far longer than the test: the interrupt for the write is held
    // while the queue waits for the read's miss, until GET_VRING_BASE stops the queue.
    let s = server_polling(1, Duration::from_secs(30), Duration::from_secs(20));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 9);
    let (first, used) = one_done_one_parked(&mut f, false);
    assert_eq!(used, vec![(first, 1)]);
    assert!(
        !f.take_call(0),
        "held while the queue busy-polls for its miss"
    );
    let base = f.stop_queue(0);
    assert_eq!(
        base, 1,
        "the parked read goes back to the driver's side of the ring"
    );
    assert!(
        f.take_call(0),
        "no interrupt for the completed write after the stop"
    );
    drop(f);
    t.join().unwrap();
}

#[test]
fn kicks_do_not_hold_back_completions_past_one_busy_poll_window() {
    // Every kick ends a busy-poll early (the chain is walked again and parks on the same
    // miss); the held interrupt must still go out about one window (100 ms) after the
    // write completed, not when the miss times out (30 s).
    let s = server_polling(1, Duration::from_secs(30), Duration::from_millis(100));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 10);
    let (first, used) = one_done_one_parked(&mut f, true);
    assert_eq!(used, vec![(first, 1)]);
    let start = std::time::Instant::now();
    while !f.take_call(0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "completion held back while kicks keep coming"
        );
        f.kick(0);
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(f);
    t.join().unwrap();
}
