//! The front-end, vIOMMU and driver against the real back-end (our vhost-user-blk engine),
//! over real sockets: every mapping and invalidation mode moves data that is checked end to
//! end, freed pages are poisoned and checked, and nothing is lost across GET_VRING_BASE.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server, Stats};
use devices::{Blk, BlkConfig};
use frontend::driver::{BlkDriver, DriverConfig, DriverReport, Mapping};
use frontend::vhost_user::{FrontendConfig, GuestRam, VhostUserFrontend};
use frontend::viommu::{Invalidation, Viommu, ViommuConfig};

const DISK: u64 = 8 << 20;

fn server(capacity: usize) -> Arc<Server<Blk>> {
    let blk = BlkConfig {
        queue_size: 128,
        ..BlkConfig::default()
    };
    let engine = EngineConfig {
        iotlb_capacity: capacity,
        miss_timeout: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    devices::testing::blk_server(DISK, blk, engine)
}

/// One connection: run `requests` requests with `cfg` behind `viommu` (or none) and return
/// the driver's report and the back-end's counters for that connection.
fn run(
    capacity: usize,
    viommu: Option<ViommuConfig>,
    cfg: DriverConfig,
    requests: u64,
) -> (DriverReport, Stats) {
    run_with(capacity, viommu, cfg, requests, |_| {})
}

/// [`run`], with `beside` running on another thread against the vIOMMU meanwhile.
fn run_with(
    capacity: usize,
    viommu: Option<ViommuConfig>,
    mut cfg: DriverConfig,
    requests: u64,
    beside: impl Fn(&Viommu) + Send + Sync,
) -> (DriverReport, Stats) {
    // A fresh (zeroed) disk each time: the driver expects never-written blocks to read zero.
    let s = &server(capacity);
    let before = s.stats();
    let (a, b) = UnixStream::pair().unwrap();
    let srv = s.clone();
    let t = std::thread::spawn(move || srv.serve_connection(b));
    let ram = Arc::new(GuestRam::new(BlkDriver::ram_needed(&cfg) + (1 << 20)).unwrap());
    let viommu = viommu.map(|c| Arc::new(Viommu::new(c)));
    let fe = VhostUserFrontend::with_stream(a, ram, FrontendConfig::default(), viommu).unwrap();
    let sectors = u64::from_le_bytes(fe.config(0, 8).unwrap().try_into().unwrap());
    // Few blocks per slot, so that reads often check data written in this run.
    cfg.disk_blocks = (sectors * 512 / (4096 * u64::from(cfg.block_pages))).min(256);
    let mut d = BlkDriver::new(&fe, cfg, 0).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        if let Some(v) = fe.viommu() {
            let (v, done, beside) = (v.clone(), &done, &beside);
            sc.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    beside(&v);
                }
            });
        }
        let r = d.run(
            Instant::now() + Duration::from_secs(60),
            Some(requests),
            Duration::from_secs(10),
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r.unwrap();
    });
    let report = d.finish().unwrap();
    drop(fe);
    t.join().unwrap();
    let after = s.stats();
    let delta = Stats {
        requests: after.requests - before.requests,
        misses_sent: after.misses_sent - before.misses_sent,
        invalidations: after.invalidations - before.invalidations,
        timeouts: after.timeouts - before.timeouts,
        access_failures: after.access_failures - before.access_failures,
        invalid_chains: after.invalid_chains - before.invalid_chains,
        evictions: after.evictions - before.evictions,
        updates: after.updates - before.updates,
        prefetched: after.prefetched - before.prefetched,
        failed: after.failed - before.failed,
        broken_queues: after.broken_queues - before.broken_queues,
        ..Stats::default()
    };
    (report, delta)
}

fn check(name: &str, r: &DriverReport, st: &Stats, requests: u64) {
    assert!(r.clean(), "{name}: {r:?}");
    assert_eq!(r.requests, requests, "{name}");
    assert!(r.reads > 0 && r.writes > 0, "{name}: {r:?}");
    assert_eq!(st.requests, requests, "{name}: {st:?}");
    assert_eq!(
        st.timeouts + st.access_failures + st.invalid_chains + st.failed + st.broken_queues,
        0,
        "{name}: {st:?}"
    );
}

#[test]
fn every_mode_moves_checked_data() {
    let base = DriverConfig {
        queue_size: 64,
        inflight: 16,
        ..DriverConfig::default()
    };
    let n = 1500;

    let (r, st) = run(2048, None, base, n);
    check("no IOMMU", &r, &st, n);
    assert_eq!(st.misses_sent, 0);

    let persistent = DriverConfig {
        mapping: Mapping::Persistent,
        ..base
    };
    let (r, st) = run(2048, Some(ViommuConfig::default()), persistent, n);
    check("persistent", &r, &st, n);
    assert!(st.misses_sent > 0, "the IOTLB starts cold");
    assert!(
        st.misses_sent < n / 10,
        "a warm IOTLB barely misses: {st:?}"
    );

    let (r, st) = run(2048, Some(ViommuConfig::default()), base, n);
    check("per-request strict", &r, &st, n);
    // Every unmap is invalidated before its IOVA is reused (the driver's poison checks
    // above would catch a stale translation); a completion batch's adjacent unmaps go as
    // one INVALIDATE, so there are fewer than the 3 unmaps per request.
    assert!(
        st.invalidations > 0 && st.invalidations < 3 * n,
        "strict invalidates, adjacent unmaps together: {st:?}"
    );

    let lazy = ViommuConfig {
        invalidation: Invalidation::Lazy { batch: 64 },
        ..ViommuConfig::default()
    };
    let (r, st) = run(2048, Some(lazy), base, n);
    check("per-request lazy", &r, &st, n);
    assert!(
        st.invalidations < n,
        "lazy batches its invalidations: {st:?}"
    );

    let prepush = ViommuConfig {
        prepush: true,
        ..ViommuConfig::default()
    };
    let (r, st) = run(2048, Some(prepush), base, n);
    check("per-request strict, pre-pushed", &r, &st, n);
    assert!(
        st.misses_sent < n / 10,
        "pre-pushed mappings do not miss: {st:?}"
    );

    // QEMU-like answers: one page per UPDATE.
    let one_page = ViommuConfig {
        max_update: 4096,
        ..ViommuConfig::default()
    };
    let (r, st) = run(2048, Some(one_page), base, n);
    check("per-request strict, page-sized updates", &r, &st, n);
}

#[test]
fn a_working_set_larger_than_the_iotlb_thrashes_but_stays_correct() {
    // 16 slots x 128 pages = 2048 single-page mappings, against 64 shared entries plus the
    // worker's private copies (1024).
    let cfg = DriverConfig {
        queue_size: 64,
        inflight: 16,
        mapping: Mapping::Persistent,
        buffers_per_slot: 128,
        ..DriverConfig::default()
    };
    let n = 4000;
    let (r, st) = run(64, Some(ViommuConfig::default()), cfg, n);
    check("thrash", &r, &st, n);
    assert!(st.evictions > 0, "{st:?}");
    assert!(
        st.misses_sent > n / 4,
        "the working set cannot stay cached: {st:?}"
    );
}

#[test]
fn multi_page_requests_with_page_sized_updates() {
    let cfg = DriverConfig {
        queue_size: 64,
        inflight: 8,
        block_pages: 4,
        ..DriverConfig::default()
    };
    let n = 600;
    let (r, st_runs) = run(2048, Some(ViommuConfig::default()), cfg, n);
    check("16 KiB, run-sized updates", &r, &st_runs, n);
    let one_page = ViommuConfig {
        max_update: 4096,
        ..ViommuConfig::default()
    };
    let (r, st_pages) = run(2048, Some(one_page), cfg, n);
    check("16 KiB, page-sized updates", &r, &st_pages, n);
    // The back-end asks for every page of the next chains ahead either way; an answer with
    // the whole run makes the MISSes for its other pages redundant (the front-end answers
    // those it already covered once), one page at a time each needs its own UPDATE.
    assert!(st_runs.prefetched > 0, "{st_runs:?}");
    assert!(
        st_pages.updates > st_runs.updates * 3 / 2,
        "a 4-page buffer takes 4 UPDATEs one page at a time: {st_pages:?} vs {st_runs:?}"
    );
}

/// Strict per-request mappings at depth 21 while another thread maps and unmaps unrelated
/// buffers as fast as it can (INVALIDATEs racing MISS answers): every freed buffer is
/// poisoned once its INVALIDATE is acknowledged and checked when reused; none may be
/// touched, and all data must check.
#[test]
fn invalidation_storm_never_touches_freed_pages() {
    let cfg = DriverConfig {
        queue_size: 64,
        inflight: 21,
        ..DriverConfig::default()
    };
    let n = 3000;
    let storm = |v: &Viommu| {
        // Guest-physical pages nobody uses for I/O (past the driver's layout), mapped and
        // unmapped: each unmap is an INVALIDATE the back-end must quiesce.
        let gpa = BlkDriver::ram_needed(&cfg) + 4096;
        let iova = v.map(gpa, 4096, iotlb::Perm::ReadWrite).unwrap();
        v.unmap(iova, 4096).unwrap();
    };
    let (r, st) = run_with(2048, Some(ViommuConfig::default()), cfg, n, storm);
    check("storm", &r, &st, n);
    assert!(r.poison_checks > n / 2, "freed buffers were checked: {r:?}");
    assert_eq!(r.poison_violations, 0);
    assert!(st.invalidations > 3 * n, "{st:?}");
}
