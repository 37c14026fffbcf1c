//! Reconnects leak nothing: 100 front-ends connect one after another to one server through
//! its socket path (the accept loop of `Server::serve`), each with the full handshake (the
//! IOMMU on every other time), some I/O and a disconnect (some with a queue stopped first,
//! some with a request parked on a miss the IOMMU side never answers), and afterwards this
//! process has as many open file descriptors, threads and memory mappings as after the
//! first one.
//!
//! The figures are taken after cycle 1 and after cycle 100, each time with a probe
//! connection open that got an answer to GET_FEATURES: the server answers it only once the
//! previous session is over and dropped (one front-end at a time), so nothing of that
//! session is still on its way out when we count. The first cycle is the baseline, not the
//! process before it, because the first worker thread leaves things that are reused, not
//! leaked: glibc keeps a dead thread's stack mapped for the next thread, and the malloc
//! arena the thread used. This file holds one test, so that no other test runs in the
//! process meanwhile.

mod common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use backend::EngineConfig;
use common::{blk_request, pattern, status, Frontend};
use devices::BlkConfig;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtq::testing::PAGE;
use wire::vhost_user::{Connection, FrontendRequest, Reply};

const CYCLES: u64 = 100;
const DISK: u64 = 4 << 20;

/// What this process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    fds: usize,
    threads: usize,
    mappings: usize,
}

fn census() -> Census {
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    Census {
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        mappings: std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count(),
    }
}

/// Connect to `path` and get an answer to GET_FEATURES: the previous session is over.
fn probe(path: &PathBuf) -> Connection {
    let conn = Connection::new(UnixStream::connect(path).unwrap());
    conn.socket()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match conn.request(&FrontendRequest::GetFeatures) {
        Ok(Some(Reply::U64(_))) => conn,
        other => panic!("GET_FEATURES on the probe: {other:?}"),
    }
}

/// One front-end's life: handshake, I/O, disconnect.
fn cycle(path: &PathBuf, i: u64) {
    let iommu = i % 2 == 1;
    let sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut f = Frontend::connect(sock, 1, 64, iommu, 500 + i);
    let sector = (i % 64) * 16;
    let data = pattern(i as u8, 8192);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, sector, &data, 0);
    f.submit(0, &[h, d.unwrap(), st]);
    f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8, "cycle {i}: write");
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, sector, &[], 8192);
    let d = d.unwrap();
    f.submit(0, &[h, d, st]);
    f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8, "cycle {i}: read");
    assert_eq!(f.space.read(&f.mem, d.iova, 8192), data, "cycle {i}: data");
    match i % 4 {
        // A queue stopped before the disconnect.
        0 => {
            assert_eq!(f.stop_queue(0), 2, "cycle {i}: GET_VRING_BASE");
        }
        // A request parked on a miss nobody answers when the front-end goes.
        3 => {
            let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
            let d = d.unwrap();
            f.never_map.push(d.iova - d.iova % PAGE);
            f.submit(0, &[h, d, st]);
            let start = Instant::now();
            while f.ignored.is_empty() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "cycle {i}: no MISS for the unmapped page"
                );
                f.serve_misses();
            }
        }
        // Just the disconnect.
        _ => {}
    }
    drop(f);
}

#[test]
fn a_hundred_reconnects_leave_no_fd_thread_or_mapping_behind() {
    let s = common::blk_server(
        DISK,
        BlkConfig {
            queues: 1,
            queue_size: 64,
            ..BlkConfig::default()
        },
        EngineConfig {
            iotlb_capacity: 256,
            // Longer than any cycle: the parked request is still parked at the disconnect.
            miss_timeout: Duration::from_secs(30),
            ..EngineConfig::default()
        },
    );
    let path =
        std::env::temp_dir().join(format!("vhost-iotlb-reconnect-{}.sock", std::process::id()));
    let server = {
        let (s, path) = (s.clone(), path.clone());
        std::thread::spawn(move || s.serve(&path))
    };
    let start = Instant::now();
    while !s.is_listening() {
        assert!(start.elapsed() < Duration::from_secs(10), "never listened");
        std::thread::sleep(Duration::from_millis(1));
    }

    cycle(&path, 0);
    let p = probe(&path);
    let first = census();
    drop(p);
    for i in 1..CYCLES {
        cycle(&path, i);
    }
    let p = probe(&path);
    let last = census();
    drop(p);
    eprintln!("after cycle 1:   {first:?}");
    eprintln!("after cycle {CYCLES}: {last:?}");
    eprintln!("stats: {}", s.stats());

    s.shutdown_handle().shutdown();
    server.join().unwrap().unwrap();
    let after = census();
    eprintln!("after the server stopped: {after:?}");
    let stats = s.stats();
    assert_eq!(stats.broken_queues, 0, "{stats}");
    assert_eq!(last, first, "what {CYCLES} reconnects left behind");
}
