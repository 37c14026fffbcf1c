//! Control-path liveness while a driver keeps the ring full (design invariant 13: the
//! control path never waits on the data path for more than one request).
//!
//! A driver thread re-posts every virtio-blk request (16 KiB reads and writes, one indirect
//! descriptor each, so that all 32768 entries of the largest split ring are in flight) as
//! soon as it completes, so the worker never finds its queue empty: it is the slower side
//! (16 KiB of data per request against the driver's few descriptor writes, and its thread
//! at nice 19, so that the driver thread losing its CPU for a moment does not let it catch
//! up), and the driver records the fewest requests the worker had left at any of its looks.
//! Meanwhile the test thread, which holds the front-end's vhost-user socket, checks that
//! each of these is over within 1 s, with and without the IOMMU:
//! - GET_VRING_BASE is answered;
//! - SET_VRING_ENABLE(0) and the request after it are answered, and the worker stops
//!   serving within 1 s of the acknowledgement;
//! - after the front-end closes its socket, `serve_connection` returns.
//!
//! The same bound for an INVALIDATE sent while a FLUSH is in `fdatasync` is tested in
//! `flush_liveness.rs`.
//!
//! Every blocking request runs on a helper thread and is waited for with a deadline of 10 s,
//! so a hang is a failed assertion with the time measured, and once the measurement is over
//! the driver stops re-posting, which lets a stuck worker drain the ring and everything end.
//! Each test prints what it measured (`--nocapture`). The tests of this file run one at a
//! time (they compete for the CPU with their own driver and worker threads otherwise).

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server};
use common::liveness::{show, BOUND, HUNG};
use common::{pattern, status, Frontend};
use devices::{Blk, BlkConfig};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtq::testing::{Buf, IovaSpace};
use vm_memory::GuestMemoryMmap;
use wire::vhost_user::{Connection, FrontendRequest, Reply, VringFile, VringState};

/// What a test says when its premise failed.
const DRY: &str = "the ring ran dry while the test measured (the driver did not keep up): \
                   the measurement says nothing";

/// Queue size, and requests kept in flight (one indirect descriptor each): the largest a
/// split ring may have, so that the worker needs a while to serve them all (0.5 to 2 s on
/// the 2-core test VM) should the driver thread lose its CPU.
const QSIZE: u16 = 32768;
/// Places on the disk the requests read and write.
const SPOTS: u64 = 256;
/// Bytes of data per request.
const IO: u32 = 16 << 10;
const DISK: u64 = SPOTS * IO as u64;

/// One test of this file at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request the driver posts again and again: its buffers and its indirect table.
struct Slot {
    bufs: [Buf; 3],
    table: u64,
}

/// What the driver thread and the test share.
#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    posted: AtomicU64,
    completed: AtomicU64,
    /// Completions whose status byte was not `VIRTIO_BLK_S_OK`.
    bad: AtomicU64,
    /// The fewest requests the device had left to serve at any look of the driver (before
    /// each re-post, and at each look that found nothing to re-post) since the test last
    /// reset it: zero if the worker caught up with the driver.
    min_in_flight: AtomicU64,
}

/// A front-end whose driver side runs on a thread of its own, re-posting every request as
/// soon as it completes, while the test holds the vhost-user socket.
struct Busy {
    /// The front-end's socket to the back-end (taken out of the `Frontend`).
    conn: Option<Arc<Connection>>,
    /// Our end of the back-end channel (taken out of the `Frontend` too).
    channel: Option<Connection>,
    /// Queue 0's call eventfd, as given to the back-end.
    call: std::os::fd::OwnedFd,
    /// The guest memory and the I/O page table, to read the used index from here.
    mem: GuestMemoryMmap,
    space: IovaSpace,
    used_ring: u64,
    counters: Arc<Counters>,
    driver: Option<JoinHandle<Frontend>>,
    server: Option<JoinHandle<()>>,
}

fn server() -> Arc<Server<Blk>> {
    common::blk_server(
        DISK,
        BlkConfig {
            queues: 1,
            queue_size: QSIZE,
            ..BlkConfig::default()
        },
        EngineConfig {
            // Every page the requests use stays mapped: no miss once warm.
            iotlb_capacity: 4096,
            miss_timeout: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    )
}

/// A dummy connection to leave in the `Frontend` in place of one taken out.
fn dummy_connection() -> Connection {
    let (a, _b) = UnixStream::pair().unwrap();
    Connection::new(a)
}

/// Give every thread of this process named `name` the nice value `nice` (raising one's own
/// threads' nice value needs no privilege). Returns how many.
fn renice(name: &str, nice: i32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let tid = p
            .file_name()
            .and_then(|t| t.to_str()?.parse::<libc::id_t>().ok());
        if let (true, Some(tid)) = (comm.trim() == name, tid) {
            // SAFETY: setpriority takes plain integers and touches no memory of ours; on
            // Linux PRIO_PROCESS with a thread id sets that thread's nice value.
            let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
            assert_eq!(r, 0, "setpriority: {}", std::io::Error::last_os_error());
            n += 1;
        }
    }
    n
}

/// The used index of the ring whose used ring is at `used`.
fn used_idx(mem: &GuestMemoryMmap, space: &IovaSpace, used: u64) -> u16 {
    let b = space.read(mem, used + 2, 2);
    u16::from_le_bytes([b[0], b[1]])
}

impl Busy {
    /// Connect, post [`QSIZE`] requests and serve them once (every page gets mapped), then
    /// start the driver thread and wait until it has re-posted the whole ring once.
    fn start(iommu: bool, seed: u64) -> Busy {
        let s = server();
        let (sock, server) = common::connect(&s);
        let mut f = Frontend::connect(sock, 1, QSIZE, iommu, seed);
        let mut slots = HashMap::new();
        // Per request: its status byte and its indirect table (64 bytes each, so that none
        // straddles a page). The writes all write one buffer, the reads all read into
        // another (the data is not the point here), at one of `SPOTS` places on the disk,
        // whose headers are shared too.
        let statuses = f.buf(u32::from(QSIZE), true).iova;
        let tables = f.buf(u32::from(QSIZE) * 64, false).iova;
        let headers = f.buf(SPOTS as u32 * 16, false).iova;
        let out = f.buf(IO, false).iova;
        f.space.write(&f.mem, out, &pattern(7, IO as usize));
        let into = f.buf(IO, true).iova;
        let sectors = u64::from(IO) / 512;
        for spot in 0..SPOTS {
            // Even spots are written, odd ones read back the one before.
            let (ty, sector) = if spot % 2 == 0 {
                (VIRTIO_BLK_T_OUT, spot * sectors)
            } else {
                (VIRTIO_BLK_T_IN, (spot - 1) * sectors)
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            f.space.write(&f.mem, headers + spot * 16, &h);
        }
        for i in 0..u64::from(QSIZE) {
            let spot = i % SPOTS;
            let write = spot % 2 == 0;
            let h = Buf {
                iova: headers + spot * 16,
                len: 16,
                write: false,
            };
            let d = Buf {
                iova: if write { out } else { into },
                len: IO,
                write: !write,
            };
            let st = Buf {
                iova: statuses + i,
                len: 1,
                write: true,
            };
            f.space.write(&f.mem, st.iova, &[0xff]);
            let table = tables + i * 64;
            let bufs = [h, d, st];
            let head = f.queues[0]
                .driver
                .add_chain(&f.mem, &f.space, &bufs, Some(table))
                .expect("a free descriptor");
            slots.insert(head, Slot { bufs, table });
        }
        f.kick(0);
        // The warm-up round answers every miss (with the IOMMU); none comes after it.
        let used = f.wait_used(0, usize::from(QSIZE), HUNG);
        for (head, _) in &used {
            let st = slots[head].bufs[2];
            assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8, "warm-up request");
        }
        let (_, _, used_ring) = f.queues[0].driver.addresses();
        // The device is the slower side, as with a guest that keeps a disk saturated: a
        // driver thread that loses its CPU for a moment (to anything else on the machine)
        // must not let the worker run dry.
        assert!(renice("vq0", 19) > 0, "no worker thread vq0");
        let conn = std::mem::replace(&mut f.conn, dummy_connection());
        let channel = std::mem::replace(&mut f.channel, dummy_connection());
        let call = f.queues[0].call.try_clone().unwrap();
        let (mem, space) = (f.mem.clone(), f.space.clone());
        let counters = Arc::new(Counters::default());
        let driver = {
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("driver".into())
                .spawn(move || drive(f, slots, used, &counters))
                .unwrap()
        };
        let busy = Busy {
            conn: Some(Arc::new(conn)),
            channel: Some(channel),
            call,
            mem,
            space,
            used_ring,
            counters,
            driver: Some(driver),
            server: Some(server),
        };
        // The ring is kept full: the driver has re-posted every request several times.
        let start = Instant::now();
        while busy.counters.completed.load(Ordering::SeqCst) < 2 * u64::from(QSIZE) {
            assert!(
                start.elapsed() < HUNG,
                "the driver got {} completions in 10 s",
                busy.counters.completed.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        busy
    }

    fn conn(&self) -> Arc<Connection> {
        self.conn.clone().expect("connected")
    }

    fn used(&self) -> u16 {
        used_idx(&self.mem, &self.space, self.used_ring)
    }

    /// Completions the device publishes over `d` (the used index looked at every 10 ms, so
    /// that it cannot wrap unseen, and not more often, so as not to slow the driver).
    fn count_used(&self, d: Duration) -> u64 {
        let end = Instant::now() + d;
        let mut last = self.used();
        let mut n = 0u64;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.used();
            n += u64::from(now.wrapping_sub(last));
            last = now;
        }
        n
    }

    /// Start counting the fewest requests in flight afresh.
    fn reset_min(&self) {
        self.counters
            .min_in_flight
            .store(u64::MAX, Ordering::SeqCst);
    }

    /// The fewest requests the device had to serve at any look of the driver since
    /// [`Busy::reset_min`] (`u64::MAX` if the driver did not look meanwhile: see [`looked`]).
    fn min_in_flight(&self) -> u64 {
        self.counters.min_in_flight.load(Ordering::SeqCst)
    }

    /// Requests posted whose completion the driver has not seen yet.
    fn in_flight(&self) -> u64 {
        self.counters.posted.load(Ordering::SeqCst) - self.counters.completed.load(Ordering::SeqCst)
    }

    /// Stop re-posting; returns the front-end (its driver side).
    fn stop_driver(&mut self) -> Option<Frontend> {
        self.counters.stop.store(true, Ordering::SeqCst);
        self.driver.take().map(|d| d.join().unwrap())
    }

    /// Close the socket and wait (up to [`HUNG`]) for `serve_connection` to return: how
    /// long it took, or `None`.
    fn disconnect(&mut self) -> Option<Duration> {
        let start = Instant::now();
        if let Some(conn) = self.conn.take() {
            // The helper threads of the requests waited for are done with it, or hung: a
            // shutdown ends those too.
            let _ = conn.socket().shutdown(std::net::Shutdown::Both);
        }
        self.channel = None;
        let Some(server) = self.server.as_ref() else {
            return Some(Duration::ZERO); // gone already
        };
        // Not too often: every wake-up of ours may take the driver's CPU for a moment.
        while !server.is_finished() {
            if start.elapsed() >= HUNG {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = start.elapsed();
        self.server.take().unwrap().join().unwrap();
        Some(took)
    }

    /// Stop everything; returns the requests completed with a status other than OK.
    fn finish(mut self) -> u64 {
        let f = self.stop_driver();
        let gone = self.disconnect();
        assert!(
            gone.is_some(),
            "serve_connection did not return within 10 s once the driver stopped"
        );
        drop(f);
        self.counters.bad.load(Ordering::SeqCst)
    }
}

/// The driver thread: look at the used ring without pause (yielding the CPU between
/// looks), and re-post each completed request at once (through its indirect table, its
/// status byte reset), and kick.
fn drive(
    mut f: Frontend,
    mut slots: HashMap<u16, Slot>,
    mut used: Vec<(u16, u32)>,
    c: &Counters,
) -> Frontend {
    c.posted.store(u64::from(QSIZE), Ordering::SeqCst);
    c.min_in_flight.store(u64::MAX, Ordering::SeqCst);
    let (_, _, used_ring) = f.queues[0].driver.addresses();
    while !c.stop.load(Ordering::SeqCst) {
        if used.is_empty() {
            let posted = c.posted.load(Ordering::SeqCst) as u16;
            let left = posted.wrapping_sub(used_idx(&f.mem, &f.space, used_ring));
            c.min_in_flight.fetch_min(u64::from(left), Ordering::SeqCst);
            std::thread::yield_now();
            used = f.take_used(0);
            continue;
        }
        // All of them first: a re-posted request may get the head of another one just used.
        let done: Vec<Slot> = used
            .drain(..)
            .map(|(head, _)| slots.remove(&head).expect("a posted head"))
            .collect();
        for slot in done {
            c.completed.fetch_add(1, Ordering::SeqCst);
            // (Not reset: a failure later writes IOERR over the OK.)
            if status(&f, &slot.bufs[2]) != VIRTIO_BLK_S_OK as u8 {
                c.bad.fetch_add(1, Ordering::SeqCst);
            }
            // What the device has left to serve, just before this one is posted.
            let posted = c.posted.load(Ordering::SeqCst) as u16;
            let left = posted.wrapping_sub(used_idx(&f.mem, &f.space, used_ring));
            c.min_in_flight.fetch_min(u64::from(left), Ordering::SeqCst);
            let head = f.queues[0]
                .driver
                .add_chain(&f.mem, &f.space, &slot.bufs, Some(slot.table))
                .expect("the descriptor just freed");
            slots.insert(head, slot);
            c.posted.fetch_add(1, Ordering::SeqCst);
        }
        f.kick(0);
        used = f.take_used(0);
    }
    f
}

/// A result and how long it took.
type Timed<T> = (T, Duration);

/// Run `call` on a helper thread; its result and how long it took, or `None` if it did not
/// return within [`HUNG`] (then the receiver gets it later).
fn timed<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> (Option<Timed<T>>, mpsc::Receiver<Timed<T>>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let r = call();
        let _ = tx.send((r, start.elapsed()));
    });
    (rx.recv_timeout(HUNG).ok(), rx)
}

fn get_vring_base(iommu: bool) {
    let _serial = serial();
    let mut busy = Busy::start(iommu, 101 + u64::from(iommu));
    let in_flight = busy.in_flight();
    let conn = busy.conn();
    busy.reset_min();
    let (got, late) = timed(move || {
        conn.request(&FrontendRequest::GetVringBase(VringState {
            index: 0,
            num: 0,
        }))
    });
    let min = busy.min_in_flight();
    let latency = got.as_ref().map(|(_, d)| *d);
    eprintln!(
        "iommu={iommu}: {} ({in_flight} requests in flight when sent, at least {} at every \
         look of the driver meanwhile)",
        show("GET_VRING_BASE with the ring kept full", latency),
        looked(min)
    );
    let f = busy.stop_driver();
    let (reply, _) = match got {
        Some(r) => r,
        None => {
            let r = late
                .recv_timeout(HUNG)
                .expect("GET_VRING_BASE after the driver stopped");
            eprintln!(
                "iommu={iommu}: GET_VRING_BASE returned {:.3} ms after it was sent, once the \
                 driver stopped re-posting",
                r.1.as_secs_f64() * 1e3
            );
            r
        }
    };
    let base = match reply {
        Ok(Some(Reply::VringState(v))) => v.num,
        other => panic!("GET_VRING_BASE: {other:?}"),
    };
    // Once stopped, the queue serves nothing more, and every request it consumed is either
    // completed or handed back.
    let used = busy.used();
    drop(f);
    let bad = busy.finish();
    assert_eq!(bad, 0, "requests failed");
    assert_eq!(u32::from(used), base, "used index against GET_VRING_BASE");
    assert!(min > 0, "{DRY}");
    assert!(
        latency.is_some_and(|d| d < BOUND),
        "iommu={iommu}: {}, over the 1 s bound",
        show("GET_VRING_BASE with the ring kept full", latency)
    );
}

#[test]
fn get_vring_base_returns_while_the_ring_is_kept_full() {
    get_vring_base(false);
}

#[test]
fn get_vring_base_returns_while_the_ring_is_kept_full_with_iommu() {
    get_vring_base(true);
}

fn disable(iommu: bool) {
    let _serial = serial();
    let mut busy = Busy::start(iommu, 201 + u64::from(iommu));
    let in_flight = busy.in_flight();
    let conn = busy.conn();
    let call = busy.call.try_clone().unwrap();
    busy.reset_min();
    // SET_VRING_ENABLE(0), then a request QEMU may send at any time (a new call eventfd, here
    // the same one), both with NEED_REPLY: the second is answered only by a free control
    // thread.
    let (got, late) = timed(move || {
        let start = Instant::now();
        let off = conn.request(&FrontendRequest::SetVringEnable(VringState {
            index: 0,
            num: 0,
        }));
        let off_at = start.elapsed();
        let next = conn.request(&FrontendRequest::SetVringCall(VringFile {
            index: 0,
            fd: Some(call),
        }));
        (off, off_at, next)
    });
    let acked = Instant::now();
    let (enable_latency, both_latency) = match &got {
        Some(((off, off_at, next), all)) => {
            assert!(off.is_ok(), "SET_VRING_ENABLE(0): {off:?}");
            assert!(next.is_ok(), "SET_VRING_CALL: {next:?}");
            (Some(*off_at), Some(*all))
        }
        None => (None, None),
    };
    eprintln!(
        "iommu={iommu}: {}; {} ({in_flight} requests in flight when sent)",
        show(
            "SET_VRING_ENABLE(0) with the ring kept full",
            enable_latency
        ),
        show("it and the SET_VRING_CALL after it", both_latency)
    );
    // The worker may finish what it is doing; 1 s after the acknowledgement it serves
    // nothing more, while the driver keeps the ring full.
    let mut served_after = None;
    if got.is_some() {
        let settling = busy.count_used((acked + BOUND).saturating_duration_since(Instant::now()));
        let after = busy.count_used(BOUND);
        eprintln!(
            "iommu={iommu}: completions after the acknowledgement: {settling} in the first \
             second, {after} in the next ({} in flight now)",
            busy.in_flight()
        );
        served_after = Some(after);
        eprintln!(
            "iommu={iommu}: at least {} requests in flight at every look of the driver since \
             SET_VRING_ENABLE(0) was sent",
            looked(busy.min_in_flight())
        );
    }
    let f = busy.stop_driver();
    if got.is_none() {
        let _ = late.recv_timeout(HUNG);
    }
    drop(f);
    let bad = busy.finish();
    assert_eq!(bad, 0, "requests failed");
    assert!(
        both_latency.is_some_and(|d| d < BOUND),
        "iommu={iommu}: {}, over the 1 s bound",
        show("SET_VRING_ENABLE(0) and the next request", both_latency)
    );
    assert_eq!(
        served_after,
        Some(0),
        "iommu={iommu}: the disabled queue still served requests more than 1 s after \
         SET_VRING_ENABLE(0) was acknowledged"
    );
}

#[test]
fn a_queue_disabled_while_the_ring_is_kept_full_stops_serving() {
    disable(false);
}

#[test]
fn a_queue_disabled_while_the_ring_is_kept_full_stops_serving_with_iommu() {
    disable(true);
}

/// [`Busy::min_in_flight`] as text.
fn looked(min: u64) -> String {
    match min {
        u64::MAX => "(no look)".into(),
        n => n.to_string(),
    }
}

fn disconnect(iommu: bool) {
    let _serial = serial();
    let mut busy = Busy::start(iommu, 301 + u64::from(iommu));
    let in_flight = busy.in_flight();
    // The front-end goes away; the guest's driver goes on re-posting.
    busy.reset_min();
    let took = busy.disconnect();
    let min = busy.min_in_flight();
    eprintln!(
        "iommu={iommu}: {} ({in_flight} requests in flight at the disconnect, at least {} \
         at every look of the driver meanwhile)",
        show("serve_connection returning after the disconnect", took),
        looked(min)
    );
    let f = busy.stop_driver();
    if took.is_none() {
        let start = Instant::now();
        let late = busy.disconnect();
        eprintln!(
            "iommu={iommu}: {}",
            show(
                "serve_connection returning once the driver stopped re-posting",
                late.map(|_| start.elapsed())
            )
        );
    }
    drop(f);
    let bad = busy.finish();
    assert_eq!(bad, 0, "requests failed");
    assert!(min > 0, "{DRY}");
    assert!(
        took.is_some_and(|d| d < BOUND),
        "iommu={iommu}: {}, over the 1 s bound",
        show("serve_connection returning after the disconnect", took)
    );
}

#[test]
fn serve_connection_returns_after_a_disconnect_while_the_ring_is_kept_full() {
    disconnect(false);
}

#[test]
fn serve_connection_returns_after_a_disconnect_while_the_ring_is_kept_full_with_iommu() {
    disconnect(true);
}
