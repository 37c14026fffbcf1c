//! The net driver simulator against our vhost-user-net loopback over a real socket: frames
//! go out, come back with their MACs swapped and are checked, with and without the IOMMU,
//! with buffers mapped once or per frame (strict and lazy), through an IOTLB far smaller
//! than the working set; nothing is lost, no poison is broken, and MISSes are timed.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server};
use devices::{Net, NetConfig};
use frontend::driver::{Mapping, NetDriver, NetDriverConfig, NetReport};
use frontend::vhost_user::{FrontendConfig, GuestRam, VhostUserFrontend};
use frontend::viommu::{Invalidation, Viommu, ViommuConfig};

fn run(
    capacity: usize,
    viommu: Option<ViommuConfig>,
    cfg: NetDriverConfig,
    frames: u64,
) -> NetReport {
    let net = Net::loopback(NetConfig {
        queue_size: cfg.queue_size,
        ..NetConfig::default()
    });
    let stats = net.stats().clone();
    let s = Arc::new(Server::new(
        net,
        EngineConfig {
            iotlb_capacity: capacity,
            miss_timeout: Duration::from_secs(2),
            ..EngineConfig::default()
        },
    ));
    let (a, b) = UnixStream::pair().unwrap();
    let srv = s.clone();
    let t = std::thread::spawn(move || srv.serve_connection(b));
    let ram =
        Arc::new(GuestRam::new(NetDriver::ram_needed(&cfg).next_multiple_of(2 << 20)).unwrap());
    let viommu = viommu.map(|c| Arc::new(Viommu::new(c)));
    let fe_cfg = FrontendConfig {
        queues: 2,
        ..FrontendConfig::default()
    };
    let fe = VhostUserFrontend::with_stream(a, ram, fe_cfg, viommu).unwrap();
    let mut d = NetDriver::new(&fe, cfg, 0).unwrap();
    d.run(
        Instant::now() + Duration::from_secs(60),
        Some(frames),
        Duration::from_secs(10),
    )
    .unwrap();
    let report = d.finish().unwrap();
    drop(fe);
    t.join().unwrap();
    let rx = stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        rx, report.returned,
        "the device's count of frames delivered"
    );
    report
}

fn check(r: &NetReport, frames: u64) {
    assert!(r.clean(), "{r:?}");
    assert_eq!(r.sent, frames, "{r:?}");
    assert_eq!(r.returned, frames, "every frame back: {r:?}");
    assert_eq!(r.missing(), 0, "{r:?}");
    assert_eq!(r.bytes, frames * 64, "{r:?}");
    assert_eq!(r.latency.count(), frames - r.late, "{r:?}");
}

#[test]
fn frames_come_back_without_an_iommu() {
    let r = run(64, None, NetDriverConfig::default(), 2000);
    check(&r, 2000);
    assert_eq!(r.miss_rtt.count(), 0);
}

#[test]
fn frames_come_back_with_buffers_mapped_once() {
    let cfg = NetDriverConfig {
        mapping: Mapping::Persistent,
        ..NetDriverConfig::default()
    };
    let r = run(2048, Some(ViommuConfig::default()), cfg, 2000);
    check(&r, 2000);
    assert!(r.miss_rtt.count() > 0, "first uses miss, and are timed");
}

#[test]
fn frames_come_back_with_buffers_mapped_per_frame_strict_and_lazy() {
    for invalidation in [Invalidation::Strict, Invalidation::Lazy { batch: 64 }] {
        let v = ViommuConfig {
            invalidation,
            ..ViommuConfig::default()
        };
        let r = run(256, Some(v), NetDriverConfig::default(), 1500);
        check(&r, 1500);
        assert!(
            r.poison_checks > 0,
            "freed buffers were reused and checked: {r:?}"
        );
    }
}

#[test]
fn a_working_set_far_beyond_the_iotlb_thrashes_but_loses_nothing() {
    let cfg = NetDriverConfig {
        mapping: Mapping::Persistent,
        buffers: 512,
        frame_bytes: 1514,
        ..NetDriverConfig::default()
    };
    let r = run(32, Some(ViommuConfig::default()), cfg, 1500);
    assert!(r.clean() && r.missing() == 0 && r.returned == 1500, "{r:?}");
    assert!(r.miss_rtt.count() > 1000, "most buffers miss: {r:?}");
}
