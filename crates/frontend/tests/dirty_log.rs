//! The front-end's dirty log against the real back-end (our vhost-user-blk engine), over a
//! real socket, as a migration uses it: the driver keeps requests in flight while another
//! thread takes the marked pages every millisecond (QEMU's log sync), and a last take after
//! the queue stopped. Every page the back-end newly marked is taken exactly once, all of
//! them guest-physical pages of the guest's RAM (the IOVAs the driver gives lie far above
//! it), and the data is still checked end to end.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::dirty::LogMode;
use backend::{EngineConfig, Stats};
use devices::BlkConfig;
use frontend::driver::{BlkDriver, DriverConfig, DriverReport, Mapping};
use frontend::vhost_user::{FrontendConfig, GuestRam, VhostUserFrontend, LOG_PAGE};
use frontend::viommu::{Viommu, ViommuConfig};

const DISK: u64 = 8 << 20;
const REQUESTS: u64 = 1200;

/// What one logged connection saw.
struct Logged {
    report: DriverReport,
    /// The back-end's counters, the connection ended.
    stats: Stats,
    /// Pages taken from the log, over every take.
    taken: u64,
    /// The distinct pages among them.
    pages: BTreeSet<u64>,
    /// Pages of guest RAM.
    ram_pages: u64,
}

/// Run [`REQUESTS`] requests of `cfg` with dirty logging on, behind `viommu` (or none),
/// against a fresh back-end that logs `mode`'s addresses.
fn logged_run(viommu: Option<ViommuConfig>, mut cfg: DriverConfig, mode: LogMode) -> Logged {
    let engine = EngineConfig {
        iotlb_capacity: 2048,
        miss_timeout: Duration::from_secs(2),
        log_mode: mode,
        ..EngineConfig::default()
    };
    let blk = BlkConfig {
        queue_size: 128,
        ..BlkConfig::default()
    };
    let s = devices::testing::blk_server(DISK, blk, engine);
    let (a, b) = UnixStream::pair().unwrap();
    let srv = s.clone();
    let t = std::thread::spawn(move || srv.serve_connection(b));
    let ram = Arc::new(GuestRam::new(BlkDriver::ram_needed(&cfg) + (1 << 20)).unwrap());
    let ram_pages = ram.size() / LOG_PAGE;
    let config = FrontendConfig {
        dirty_log: true,
        ..FrontendConfig::default()
    };
    let viommu = viommu.map(|c| Arc::new(Viommu::new(c)));
    let fe = VhostUserFrontend::with_stream(a, ram, config, viommu).unwrap();
    let log = fe.dirty_log().expect("a dirty log").clone();
    assert_eq!(log.bytes(), ram_pages.div_ceil(64) * 8);
    let sectors = u64::from_le_bytes(fe.config(0, 8).unwrap().try_into().unwrap());
    cfg.disk_blocks = (sectors * 512 / (4096 * u64::from(cfg.block_pages))).min(256);
    let mut d = BlkDriver::new(&fe, cfg, 0).unwrap();
    let done = AtomicBool::new(false);
    let mut pages = BTreeSet::new();
    let mut taken = std::thread::scope(|sc| {
        let syncer = sc.spawn(|| {
            let mut pages = BTreeSet::new();
            let mut taken = 0;
            while !done.load(Ordering::SeqCst) {
                taken += log.take_pages(|p| {
                    pages.insert(p);
                });
                std::thread::sleep(Duration::from_millis(1));
            }
            (taken, pages)
        });
        let r = d.run(
            Instant::now() + Duration::from_secs(60),
            Some(REQUESTS),
            Duration::from_secs(10),
        );
        done.store(true, Ordering::SeqCst);
        r.unwrap();
        let (taken, p) = syncer.join().unwrap();
        pages = p;
        taken
    });
    // The queue stops (GET_VRING_BASE) before the last take: nothing is written after it.
    let report = d.finish().unwrap();
    taken += log.take_pages(|p| {
        pages.insert(p);
    });
    drop(fe);
    t.join().unwrap();
    assert_eq!(
        log.count_pages(),
        0,
        "nothing marked after the queue stopped"
    );
    Logged {
        report,
        stats: s.stats(),
        taken,
        pages,
        ram_pages,
    }
}

fn driver(write_percent: u8) -> DriverConfig {
    DriverConfig {
        queue_size: 64,
        inflight: 16,
        mapping: Mapping::Persistent,
        write_percent,
        ..DriverConfig::default()
    }
}

fn check_logged(name: &str, l: &Logged) {
    assert!(l.report.clean(), "{name}: {:?}", l.report);
    assert_eq!(l.report.requests, REQUESTS, "{name}");
    assert!(l.taken > 0, "{name}: nothing logged");
    // Each page the back-end marked while it was clear was taken once, however the takes
    // fell between its marks.
    assert_eq!(l.taken, l.stats.logged_pages, "{name}: {:?}", l.stats);
    assert_eq!(l.stats.log_beyond, 0, "{name}: {:?}", l.stats);
    let last = l.pages.last().copied().unwrap_or(0);
    assert!(last < l.ram_pages, "{name}: page {last} beyond RAM");
}

#[test]
fn pages_the_device_wrote_are_logged_and_taken_once() {
    for (name, viommu) in [("warm", Some(ViommuConfig::default())), ("no IOMMU", None)] {
        let mixed = logged_run(viommu, driver(50), LogMode::Gpa);
        check_logged(name, &mixed);
        assert!(mixed.report.reads > 0 && mixed.report.writes > 0, "{name}");
        // Reads only: the device writes every slot's data buffer (a page each, one buffer
        // per slot), besides statuses and the used ring.
        let reads = logged_run(viommu, driver(0), LogMode::Gpa);
        check_logged(name, &reads);
        assert_eq!(reads.report.writes, 0);
        assert!(reads.pages.len() > 16, "{name}: {:?}", reads.pages);
    }
}

#[test]
fn a_backend_logging_iovas_leaves_the_log_empty() {
    // Design invariant 10: IOVAs (from `IOVA_BASE`, far above the guest's RAM) logged as if
    // they were guest-physical land beyond the log, and the front-end sees nothing: what the
    // bench's `log` workload refuses as a bug.
    let l = logged_run(
        Some(ViommuConfig::default()),
        driver(50),
        LogMode::BrokenIova,
    );
    assert!(l.report.clean(), "{:?}", l.report);
    assert_eq!(l.taken, 0, "{:?}", l.pages);
    assert!(l.stats.log_beyond > 0, "{:?}", l.stats);
}
