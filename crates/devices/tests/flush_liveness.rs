//! Control-path liveness during a long FLUSH (design invariant 13: the control path never
//! waits on the data path for more than one request): an INVALIDATE sent while a FLUSH runs
//! `fdatasync` on a real file on disk, with a lot of dirty data, is acknowledged within 1 s.
//! The `fdatasync` is a blocking syscall that must not run where an invalidation waits for it.
//!
//! The disk is a file of [`FLUSH_DISK`] bytes in the temporary directory (a real file system:
//! a memfd or tmpfs has nothing to write back), written in full, then every other page of it
//! dirtied before the FLUSH; it is removed when the test ends, which takes about 20 s. The
//! test prints what it measured (`--nocapture`), with what `fdatasync` takes here without the
//! back-end for comparison. A blocking wait has a deadline ([`HUNG`]), so that a hang is a
//! failed assertion with the time measured; the bound and the deadline are those of
//! `full_ring_liveness.rs` (`common/liveness.rs`).

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server};
use common::liveness::{show, BOUND, HUNG};
use common::{blk_request, status, Frontend};
use devices::{Blk, BlkConfig};
use iotlb::IovaRange;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
use virtq::testing::PAGE;
use wire::IotlbMsg;

/// Bytes of data of the read that maps the page to invalidate.
const IO: u32 = 16 << 10;

/// The flush test's disk: a file in the temporary directory (on a real file system), removed
/// when this drops.
struct TempDisk {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl TempDisk {
    fn new(name: &str, len: u64) -> TempDisk {
        let path =
            std::env::temp_dir().join(format!("vhost-iotlb-{name}-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // Written, not sparse: dirtying it later allocates nothing.
        let zeros = vec![0u8; 8 << 20];
        let mut w = &file;
        for _ in 0..len / zeros.len() as u64 {
            w.write_all(&zeros).unwrap();
        }
        file.sync_data().unwrap();
        TempDisk { path, file }
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The flush test's disk size. Its every other 4 KiB page is dirtied (through the page cache,
/// no sync), [`FLUSH_DIRTY`] bytes in as many separate 4 KiB writes for `fdatasync` to issue:
/// on the 2-core test VM (ext4 on a virtio disk the host caches) 64 MiB written in one run
/// is written back in 40 to 60 ms, too fast to tell a wait for it from none, and scattered
/// 4 KiB pages take about 10 us each, so this makes a FLUSH of about 3 s there. Scattered
/// over an allocated file rather than a sparse one: as many extents would make removing the
/// file take several times as long as the fsync.
const FLUSH_DISK: u64 = 2 << 30;
const FLUSH_DIRTY: u64 = FLUSH_DISK / 2;

/// Dirty every other page of `file` (through the page cache): returns how long it took.
fn dirty(file: &std::fs::File, seed: u8) -> Duration {
    let start = Instant::now();
    let mut page = vec![seed; PAGE as usize];
    for (i, off) in (0..FLUSH_DISK).step_by(2 * PAGE as usize).enumerate() {
        page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        file.write_at(&page, off).unwrap();
    }
    start.elapsed()
}

/// Whether the thread named `name` is in `fdatasync` (or, where the syscall cannot be
/// seen, in an uninterruptible sleep).
fn in_fdatasync(name: &str) -> bool {
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(p.join("syscall")) {
            if let Some(Ok(n)) = s.split_whitespace().next().map(str::parse::<i64>) {
                return n == libc::SYS_fdatasync;
            }
            if s.starts_with("running") {
                return false;
            }
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        return stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].chars().next())
            .is_some_and(|c| c == 'D');
    }
    false
}

/// The INVALIDATE of a page no request uses, sent while a FLUSH is in `fdatasync` with
/// [`FLUSH_DIRTY`] bytes to write back, is acknowledged within 1 s.
#[test]
fn invalidate_is_acknowledged_within_1s_during_a_long_flush() {
    // How long writing back 64 MiB written in one run takes here, for the record.
    {
        let small = TempDisk::new("flush-64m", 0);
        let data = vec![0x5au8; 8 << 20];
        for i in 0..8u64 {
            small.file.write_at(&data, i * (8 << 20)).unwrap();
        }
        let start = Instant::now();
        small.file.sync_data().unwrap();
        eprintln!(
            "fdatasync of 64 MiB written sequentially: {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    let start = Instant::now();
    let disk = TempDisk::new("flush", FLUSH_DISK);
    eprintln!(
        "disk {} ({} MiB) written and synced in {:.3} s",
        disk.path.display(),
        FLUSH_DISK >> 20,
        start.elapsed().as_secs_f64()
    );
    // The fsync alone, with the same amount of dirty data as the FLUSH will have.
    let took = dirty(&disk.file, 1);
    let start = Instant::now();
    disk.file.sync_data().unwrap();
    let fsync_alone = start.elapsed();
    eprintln!(
        "fdatasync alone of {} MiB dirty in 4 KiB pages (dirtied in {:.3} s): {:.3} ms",
        FLUSH_DIRTY >> 20,
        took.as_secs_f64(),
        fsync_alone.as_secs_f64() * 1e3
    );

    let blk = Blk::new(
        disk.file.try_clone().unwrap(),
        BlkConfig {
            queues: 1,
            queue_size: 64,
            ..BlkConfig::default()
        },
    )
    .unwrap();
    let s = Arc::new(Server::new(
        blk,
        EngineConfig {
            iotlb_capacity: 256,
            miss_timeout: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    ));
    let (sock, server) = common::connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 401);
    // A read maps its data page in the back-end's IOTLB: the page to invalidate later.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], IO);
    let unrelated = d.unwrap();
    f.submit(0, &[h, unrelated, st]);
    f.wait_used(0, 1, HUNG);
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);

    let took = dirty(&disk.file, 2);
    if let Ok(m) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = m.lines().find(|l| l.starts_with("Dirty:")) {
            eprintln!("dirtied again in {:.3} s; {l}", took.as_secs_f64());
        }
    }
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    let submitted = Instant::now();
    f.submit(0, &[h, st]);
    // Until the worker is in fdatasync (answering the misses of the request's pages).
    while !in_fdatasync("vq0") {
        f.serve_misses();
        assert!(
            f.take_used(0).is_empty(),
            "the FLUSH was over before the INVALIDATE could be sent (after {:.3} ms): the \
             test needs a longer fsync",
            submitted.elapsed().as_secs_f64() * 1e3
        );
        assert!(
            submitted.elapsed() < HUNG,
            "the worker never got to fdatasync"
        );
    }
    eprintln!(
        "worker in fdatasync {:.3} ms after the FLUSH was submitted",
        submitted.elapsed().as_secs_f64() * 1e3
    );
    let range = IovaRange::new(unrelated.iova, unrelated.iova + PAGE - 1).unwrap();
    let sent = Instant::now();
    let hd = f.iotlb_nowait(IotlbMsg::Invalidate { range });
    let answered = f.reply_within(HUNG);
    let ack_latency = sent.elapsed();
    let flush_done_at_ack = !f.take_used(0).is_empty();
    if answered {
        f.conn.recv_ack(&hd).expect("INVALIDATE acknowledged");
    }
    eprintln!(
        "{} (the FLUSH was {} when it came)",
        show(
            "INVALIDATE ack during the FLUSH",
            answered.then_some(ack_latency)
        ),
        if flush_done_at_ack {
            "over"
        } else {
            "still running"
        }
    );
    if !flush_done_at_ack {
        f.wait_used(0, 1, Duration::from_secs(60));
    }
    let flush_took = submitted.elapsed();
    eprintln!(
        "FLUSH request completed {:.3} ms after it was submitted",
        flush_took.as_secs_f64() * 1e3
    );
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8, "FLUSH status");
    if !answered {
        // The acknowledgement is still owed; take it so the stream stays in step.
        f.conn
            .socket()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        f.conn.recv_ack(&hd).expect("INVALIDATE acknowledged late");
    }
    drop(f);
    server.join().unwrap();
    assert!(
        answered && ack_latency < BOUND,
        "{}, over the 1 s bound (fdatasync alone took {:.3} ms)",
        show(
            "INVALIDATE ack during the FLUSH",
            answered.then_some(ack_latency)
        ),
        fsync_alone.as_secs_f64() * 1e3
    );
}
