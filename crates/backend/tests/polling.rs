//! Adaptive polling against a driver that kicks only when the device asks (EVENT_IDX, as
//! Linux does): a queue that polls its ring with kicks off must ask for them again before it
//! sleeps, or a request waits for ever; and a stopped queue must leave kicks on for whoever
//! runs the ring next. No timing is asserted: the windows adapt to this machine's speed,
//! and every request must complete whatever they come to.

use std::time::Duration;

use backend::testing::{connect, null_server, request, status, CpuMeter, Frontend};
use backend::{EngineConfig, PollMode};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

/// A cap far above the gaps between requests, so that the windows grow to cover them and
/// the driver's kicks are turned off, however slow this build and machine are.
fn server(poll: PollMode) -> std::sync::Arc<backend::Server<backend::testing::NullDevice>> {
    null_server(
        1,
        EngineConfig {
            iotlb_capacity: 256,
            busy_poll: Duration::from_millis(20),
            poll,
            ..EngineConfig::default()
        },
    )
}

/// Requests one at a time, with gaps from none to a few milliseconds (so that the window
/// grows, is caught and shrinks to zero), each kicked only if the device asks.
fn one_at_a_time(f: &mut Frontend, n: u32) -> (u32, u32) {
    let gaps = [0u64, 0, 5, 20, 100, 400, 3000];
    let (mut kicked, mut quiet) = (0, 0);
    for i in 0..n {
        let (h, d, st) = request(f, VIRTIO_BLK_T_IN, u64::from(i % 64), &[], 512);
        let (_, kick) = f.submit_as_driver(0, &[h, d.unwrap(), st]);
        if kick {
            kicked += 1;
        } else {
            quiet += 1;
        }
        let used = f.wait_used(0, 1, Duration::from_secs(10));
        assert_eq!(
            used.len(),
            1,
            "request {i} never completed (kicked: {kick})"
        );
        assert_eq!(status(f, &st), VIRTIO_BLK_S_OK as u8);
        let gap = gaps[i as usize % gaps.len()];
        if gap > 0 {
            std::thread::sleep(Duration::from_micros(gap));
        }
    }
    (kicked, quiet)
}

#[test]
fn a_driver_that_kicks_only_when_asked_is_always_served() {
    for (iommu, poll) in [
        (false, PollMode::Adaptive),
        (true, PollMode::Adaptive),
        (false, PollMode::Misses),
        (false, PollMode::Off),
    ] {
        let s = server(poll);
        let (sock, t) = connect(&s);
        let mut f = Frontend::connect(sock, 1, 64, iommu, 21);
        let (kicked, quiet) = one_at_a_time(&mut f, 250);
        eprintln!("{poll} iommu={iommu}: {kicked} requests kicked, {quiet} not");
        // Idle now: the window shrinks to nothing and the worker sleeps (a CPU-time check,
        // as in worker_liveness: a spinning thread uses a whole core).
        std::thread::sleep(Duration::from_millis(300));
        let meter = CpuMeter::start("vq0");
        std::thread::sleep(Duration::from_secs(1));
        let idle = meter.ticks();
        drop(f);
        t.join().unwrap();
        if poll == PollMode::Adaptive {
            assert!(quiet > 0, "a polled queue never turned kicks off");
        } else {
            assert_eq!(quiet, 0, "only adaptive polling turns kicks off");
        }
        assert!(
            idle < 20,
            "{poll}: an idle queue's worker spins ({idle} ticks in 1 s)"
        );
    }
}

#[test]
fn a_stopped_queue_asks_for_kicks_again() {
    let s = server(PollMode::Adaptive);
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 22);
    one_at_a_time(&mut f, 200);
    // Stop right after a burst, when the worker is likely polling with kicks off.
    for i in 0..8 {
        let (h, d, st) = request(&mut f, VIRTIO_BLK_T_IN, i, &[], 512);
        f.submit_as_driver(0, &[h, d.unwrap(), st]);
    }
    f.wait_used(0, 8, Duration::from_secs(10));
    let base = f.stop_queue(0);
    assert_eq!(u32::from(f.avail_idx(0)), base, "everything was served");
    assert_eq!(
        f.avail_event(0),
        f.avail_idx(0),
        "a stopped queue asks for a kick at the next chain"
    );
    drop(f);
    t.join().unwrap();
}
