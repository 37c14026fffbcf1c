//! Worker liveness against a front-end or guest that never lets a request finish: the worker
//! must neither spin nor hang, kicks must not postpone a miss's timeout, a broken chain must
//! not wedge invalidations, and GET_VRING_BASE must hand back a request it could not
//! complete. A spinning worker is caught by its CPU time: an idle thread uses none, a
//! spinning one a whole core. The device is the engine's null device: these are the
//! engine's properties, whatever serves the requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::testing::{
    connect, null_server, pattern, request as blk_request, status, CpuMeter, Frontend, NullDevice,
};
use backend::{EngineConfig, Server};
use iotlb::IovaRange;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtq::testing::PAGE;

/// The null device reports as virtio-blk does (`OK` 0, `IOERR` 1), so the requests are
/// written in virtio-blk's layout.
fn server(queues: u16, miss_timeout: Duration) -> Arc<Server<NullDevice>> {
    let engine = EngineConfig {
        iotlb_capacity: 256,
        miss_timeout,
        ..EngineConfig::default()
    };
    null_server(queues, engine)
}

/// One queue of 64 behind the IOMMU, with `miss_timeout`, and the server's thread.
fn start(miss_timeout: Duration, seed: u64) -> (Frontend, std::thread::JoinHandle<()>) {
    let s = server(1, miss_timeout);
    let (sock, t) = connect(&s);
    (Frontend::connect(sock, 1, 64, true, seed), t)
}

/// Submit a read whose data buffer the IOMMU side never maps (its MISSes go unanswered);
/// returns its status buffer.
fn submit_unanswered_read(f: &mut Frontend) -> virtq::testing::Buf {
    let (h, d, st) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d = d.unwrap();
    f.never_map.push(d.iova);
    f.submit(0, &[h, d, st]);
    st
}

/// CPU ticks the `vq0` worker uses while `work` runs.
fn vq0_ticks_during(work: impl FnOnce()) -> u64 {
    let meter = CpuMeter::start("vq0");
    work();
    meter.ticks()
}

/// Close the front-end, join the server, and check that `ticks` over 1 s (from
/// [`vq0_ticks_during`]) are a sleeping thread's, not a spinning one's.
fn assert_slept(f: Frontend, server: std::thread::JoinHandle<()>, ticks: u64, while_: &str) {
    eprintln!("vq0 cpu ticks over 1 s {while_}: {ticks}");
    drop(f);
    server.join().unwrap();
    assert!(ticks < 20, "worker spins {while_}: {ticks} ticks in 1 s");
}

fn serve_for(f: &mut Frontend, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        f.serve_misses();
    }
}

/// The avail ring's page is never mapped: after the timeout the queue is broken, and sleeps.
#[test]
fn a_broken_queue_sleeps() {
    let (mut f, t) = start(Duration::from_millis(100), 11);
    let (_, a, _) = f.queues[0].driver.addresses();
    f.never_map.push(a - a % PAGE);
    // The worker misses, resends, gives up and breaks.
    serve_for(&mut f, Duration::from_millis(600));
    let ticks = vq0_ticks_during(|| std::thread::sleep(Duration::from_secs(1)));
    assert_slept(f, t, ticks, "idle");
}

/// The used ring becomes unmapped for good while a request is served: its completion waits,
/// times out, and the queue breaks and sleeps.
#[test]
fn an_unreachable_used_ring_breaks_the_queue_without_spinning() {
    let (mut f, t) = start(Duration::from_millis(100), 12);
    // One normal request first (maps the rings).
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &pattern(1, 512), 0);
    f.submit(0, &[h, d.unwrap(), st]);
    f.wait_used(0, 1, Duration::from_secs(5));
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
    let (_, _, u) = f.queues[0].driver.addresses();
    let upage = u - u % PAGE;
    f.never_map.push(upage);
    f.invalidate(IovaRange::new(upage, upage + PAGE - 1).unwrap());
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    f.submit(0, &[h, d.unwrap(), st]);
    serve_for(&mut f, Duration::from_millis(800));
    let ticks = vq0_ticks_during(|| serve_for(&mut f, Duration::from_secs(1)));
    assert_slept(f, t, ticks, "while serving");
}

/// A driver that kicks while the queue waits for a miss does not postpone the timeout: the
/// request fails (miss, resend, give up) although the kicks never stop.
#[test]
fn kicks_while_parked_do_not_postpone_the_timeout() {
    let (mut f, t) = start(Duration::from_millis(200), 13);
    let st = submit_unanswered_read(&mut f);
    let start = Instant::now();
    let mut completed_at = None;
    while start.elapsed() < Duration::from_secs(3) && completed_at.is_none() {
        f.serve_misses();
        rustix::io::write(&f.queues[0].kick, &1u64.to_ne_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let used = f.queues[0].driver.take_used(&f.mem, &f.space);
        if !used.is_empty() && completed_at.is_none() {
            completed_at = Some(start.elapsed());
        }
    }
    eprintln!(
        "ignored misses: {}, completed at {:?}",
        f.ignored.len(),
        completed_at
    );
    let failed_with = status(&f, &st);
    drop(f);
    t.join().unwrap();
    assert!(
        completed_at.is_some(),
        "kicks every 50 ms kept a 200 ms miss timeout from ever expiring"
    );
    assert_eq!(
        failed_with, VIRTIO_BLK_S_IOERR as u8,
        "failed without IOERR"
    );
}

/// SET_VRING_ENABLE 0 while parked on a miss: the disabled queue sleeps past the timeout.
#[test]
fn a_queue_disabled_while_parked_sleeps() {
    use wire::vhost_user::{FrontendRequest, VringState};
    let (mut f, t) = start(Duration::from_millis(100), 14);
    submit_unanswered_read(&mut f);
    serve_for(&mut f, Duration::from_millis(50));
    assert_eq!(f.ignored.len(), 1);
    f.request(FrontendRequest::SetVringEnable(VringState {
        index: 0,
        num: 0,
    }));
    serve_for(&mut f, Duration::from_millis(200));
    let ticks = vq0_ticks_during(|| serve_for(&mut f, Duration::from_secs(1)));
    assert_slept(f, t, ticks, "disabled");
}

/// A writable descriptor running past 2^64 in a request that fails: finding its status byte
/// must not overflow; the byte cannot be written, so the request is not completed (the queue
/// stops and signals its error eventfd), and the next INVALIDATE is acknowledged.
#[test]
fn a_status_byte_past_the_end_of_the_space_is_handled() {
    let (mut f, t) = start(Duration::from_millis(100), 15);
    let (h, _, _) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let bad = virtq::testing::Buf {
        iova: u64::MAX - 0xff,
        len: 0x200,
        write: true,
    };
    f.submit(0, &[h, bad]);
    serve_for(&mut f, Duration::from_millis(500));
    assert!(f.take_err(0), "the vring error eventfd was not signalled");
    assert!(f.take_used(0).is_empty(), "completed without a status byte");
    f.conn
        .socket()
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let r = f.iotlb(wire::IotlbMsg::Invalidate {
        range: IovaRange::new(0, 0xfff).unwrap(),
    });
    eprintln!("INVALIDATE ack: {r:?}");
    assert!(r.is_ok(), "INVALIDATE not acknowledged");
    drop(f);
    t.join().unwrap();
}

/// GET_VRING_BASE while a consumed request waits to be completed: the base hands it back
/// (equal to the used index), so it is served again after a restart.
#[test]
fn get_vring_base_hands_back_an_unfinished_request() {
    use wire::vhost_user::{FrontendRequest, Reply, ReplyKind, VringState};
    let (mut f, t) = start(Duration::from_millis(100), 16);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &pattern(1, 512), 0);
    f.submit(0, &[h, d.unwrap(), st]);
    f.wait_used(0, 1, Duration::from_secs(5));
    let (_, _, u) = f.queues[0].driver.addresses();
    let upage = u - u % PAGE;
    f.never_map.push(upage);
    f.invalidate(IovaRange::new(upage, upage + PAGE - 1).unwrap());
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    f.submit(0, &[h, d.unwrap(), st]);
    serve_for(&mut f, Duration::from_millis(500));
    let hd = f
        .conn
        .send_request(
            &FrontendRequest::GetVringBase(VringState { index: 0, num: 0 }),
            false,
        )
        .unwrap();
    let base = match f.conn.recv_reply(&hd, ReplyKind::VringState).unwrap() {
        Reply::VringState(v) => v.num,
        other => panic!("{other:?}"),
    };
    // The used index as the guest sees it.
    let used_idx = {
        let b = f.space.read(&f.mem, u + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    };
    eprintln!("GET_VRING_BASE = {base}, used idx = {used_idx}");
    drop(f);
    t.join().unwrap();
    assert_eq!(u32::from(used_idx), base, "a consumed request was lost");
}
