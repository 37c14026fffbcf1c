//! A net receive queue whose ring holds too few chains for the frame waiting (a 9000-byte
//! frame, mergeable buffers, two 1536-byte chains posted) neither spins nor holds the
//! control path: its worker sleeps until the driver adds chains (a CPU-time check, as in
//! the engine's worker_liveness: a spinning thread uses a whole core), GET_VRING_BASE is
//! answered at once and hands back every chain (none was completed). (That the frame
//! arrives whole once there are enough chains is net_loopback's.) Its own test binary: the CPU check
//! reads the `vq0` thread, which another test would also run.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::testing::CpuMeter;
use backend::{EngineConfig, PollMode, Server};
use common::{connect, Frontend};
use devices::net::HEADER_LEN;
use devices::{Net, NetConfig};

#[test]
fn a_starved_receive_queue_sleeps_and_lets_go() {
    let net = Net::loopback(NetConfig::default());
    let stats = net.stats().clone();
    // Adaptive polling with a large cap: the path that polls an empty ring is live.
    let engine = EngineConfig {
        busy_poll: Duration::from_millis(50),
        poll: PollMode::Adaptive,
        ..EngineConfig::default()
    };
    let s = Arc::new(Server::new(net, engine));
    let (sock, _t) = connect(&s);
    let mut f = Frontend::connect(sock, 3, 256, true, 3);
    for _ in 0..2 {
        let b = f.buf(1536, true);
        f.submit(0, &[b]);
    }
    let hdr = f.buf(HEADER_LEN as u32, false);
    f.space.write(&f.mem, hdr.iova, &[0u8; HEADER_LEN]);
    let body = f.buf(9000, false);
    f.space.write(&f.mem, body.iova, &vec![0x5a; 9000]);
    f.submit(1, &[hdr, body]);
    f.wait_used(1, 1, Duration::from_secs(20));
    let end = Instant::now() + Duration::from_secs(20);
    while stats.rx_retries.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < end,
            "the receive queue never tried the frame"
        );
        f.serve_misses();
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(300));
    let meter = CpuMeter::start("vq0");
    std::thread::sleep(Duration::from_secs(1));
    let busy = meter.ticks();
    assert!(
        busy <= 20,
        "the starved receive worker used {busy} ticks in 1 s: it spins"
    );
    assert!(
        f.take_used(0).is_empty(),
        "no chain of the frame is published"
    );
    let asked = Instant::now();
    let base = f.stop_queue(0);
    assert_eq!(base, 0, "both chains handed back");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "GET_VRING_BASE waited"
    );
}
