//! `vhost-iotlb bench`: the end-to-end benchmark, the project's main job.
//!
//! Each workload is one vhost-user connection over a real Unix socket: our front-end and
//! vIOMMU (crate `frontend`) drive a virtio-blk back-end, ours (crate `backend`, started
//! here on a temporary in-memory disk, one fresh server and disk per workload) or an external
//! one (`--socket`). The guest-driver simulator keeps the queue full of 4 KiB random reads
//! and writes and checks every byte it reads back. Workloads:
//!
//! - `off`: no IOMMU (the baseline every ratio is against);
//! - `warm`: behind the IOMMU, buffers mapped once (the IOTLB warms up and stays warm);
//! - `strict`: every request maps its header, data and status and unmaps them on completion,
//!   each unmap an acknowledged INVALIDATE (Linux `iommu.strict=1`);
//! - `lazy`: the same with unmaps batched and flushed 256 at a time (Linux's flush queue);
//! - `thrash`: persistent buffers, a working set of 4x the IOTLB's capacity;
//! - `prepush`: `strict` with UPDATEs pushed at map time, before any miss (none of the
//!   existing stacks does this);
//! - `strict-4k`: `strict` with MISSes answered one page at a time, as QEMU does;
//! - `big`: `strict-4k` with 1 MiB requests (256 pages each, every one a MISS);
//! - `small-tlb`: `big` through an IOTLB of 16 entries, far fewer than one request needs
//!   (the walk keeps what it translated);
//! - `off-1m`: `off` with 1 MiB requests, the baseline of `big` and `small-tlb` (it runs when
//!   either does).
//!
//! Every workload runs `--rounds` times (default 5), interleaved with the others, and the
//! round with the median IOPS is reported: a moment of interference on a shared machine
//! then spoils one sample instead of a ratio. The ratio to `off` is paired: each round's
//! IOPS over `off`'s in the same round (seconds apart), and the median of those, so that a
//! machine whose speed drifts by tens of percent over a minute (shared VMs do) moves both
//! sides of a ratio together.
//!
//! Figures: IOPS, MB/s, latency p50/p99, misses/s, miss round trip p50/p99 (MISS sent to
//! queue running again, measured by our back-end), IOTLB hit rate, invalidations/s, and the
//! ratio to `off`. A progress bar on a terminal, a table at the end, `--json FILE` and
//! `--plot FILE.svg`. Any data-check failure makes the run fail.
//!
//! This module only orchestrates and reports; it does not reach into the back-end's state
//! beyond its public counters.
//!
//! Why this file is over 700 lines: the workload table, the runner, the report (table, JSON)
//! and the SVG plot live together; the report and plot are to move to files of their own
//! when issue 17 reworks the plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server, Stats};
use clap::Args;
use devices::{Blk, BlkConfig};
use frontend::driver::{BlkDriver, DriverConfig, DriverReport, Mapping};
use frontend::vhost_user::{FrontendConfig, GuestRam, VhostUserFrontend};
use frontend::viommu::{Invalidation, Viommu, ViommuConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Options of the end-to-end benchmark.
#[derive(Args, Debug, Clone)]
pub struct E2eArgs {
    /// Seconds per workload.
    #[arg(long, default_value_t = 4.0)]
    pub duration: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub depth: u16,
    /// Request size in KiB (a multiple of 4).
    #[arg(long, default_value_t = 4)]
    pub block_kib: u32,
    /// Percentage of writes.
    #[arg(long, default_value_t = 50)]
    pub write_percent: u8,
    /// Device IOTLB entries of our back-end (the thrash working set is 4x this).
    #[arg(long, default_value_t = iotlb::DEFAULT_CAPACITY)]
    pub iotlb_capacity: usize,
    /// Only these workloads (comma-separated; `off` always runs, for the ratios).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Drive an external vhost-user-blk back-end at this socket instead of starting ours
    /// (its disk is written to; back-end counters are then not available).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Busy-poll window in microseconds of the threads that pass MISS, UPDATE and INVALIDATE
    /// messages on both sides (0: block at once; each message then costs a thread wake-up).
    #[arg(long, value_name = "US", default_value_t = 200)]
    pub busy_poll_us: u64,
    /// Write an SVG chart of throughput and miss round trip per workload.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Rounds: every workload runs this many times, interleaved (off, warm, ..., off, warm,
    /// ...), `--duration` split between them; the round with the median IOPS is reported.
    /// A machine that slows down for a moment then skews one sample, not a ratio. The ratio
    /// to `off` is the median of each round's ratio to `off` in the same round.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

/// One workload's setting.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    viommu: Option<ViommuConfig>,
    mapping: Mapping,
    buffers_per_slot: u32,
    /// Request size in KiB (`--block-kib` when `None`).
    block_kib: Option<u32>,
    /// IOTLB entries of our back-end (`--iotlb-capacity` when `None`).
    capacity: Option<usize>,
    /// The workload its ratio is against: same request size, no IOMMU.
    baseline: &'static str,
}

impl Workload {
    /// A workload of `--block-kib` requests against `off`.
    fn new(
        name: &'static str,
        viommu: Option<ViommuConfig>,
        mapping: Mapping,
        buffers_per_slot: u32,
    ) -> Self {
        Workload {
            name,
            viommu,
            mapping,
            buffers_per_slot,
            block_kib: None,
            capacity: None,
            baseline: "off",
        }
    }

    /// The same with 1 MiB requests, against `off-1m`.
    fn big(self) -> Self {
        Workload {
            block_kib: Some(1024),
            baseline: "off-1m",
            ..self
        }
    }

    fn block_kib(&self, args: &E2eArgs) -> u32 {
        self.block_kib.unwrap_or(args.block_kib)
    }

    fn capacity(&self, args: &E2eArgs) -> usize {
        self.capacity.unwrap_or(args.iotlb_capacity)
    }
}

/// IOTLB entries of the `small-tlb` workload.
const SMALL_TLB: usize = 16;

fn workloads(args: &E2eArgs) -> Vec<Workload> {
    let strict = ViommuConfig::default();
    let depth = u32::from(args.depth.max(1));
    let thrash_buffers = (4 * args.iotlb_capacity as u32).div_ceil(depth);
    let strict_4k = ViommuConfig {
        max_update: 4096,
        ..strict
    };
    let all = vec![
        Workload::new("off", None, Mapping::Persistent, 1),
        Workload::new("warm", Some(strict), Mapping::Persistent, 1),
        Workload::new("strict", Some(strict), Mapping::PerRequest, 1),
        Workload::new(
            "lazy",
            Some(ViommuConfig {
                invalidation: Invalidation::Lazy { batch: 256 },
                ..strict
            }),
            Mapping::PerRequest,
            1,
        ),
        Workload::new("thrash", Some(strict), Mapping::Persistent, thrash_buffers),
        Workload::new(
            "prepush",
            Some(ViommuConfig {
                prepush: true,
                ..strict
            }),
            Mapping::PerRequest,
            1,
        ),
        Workload::new("strict-4k", Some(strict_4k), Mapping::PerRequest, 1),
        Workload::new("off-1m", None, Mapping::Persistent, 1).big(),
        Workload::new("big", Some(strict_4k), Mapping::PerRequest, 1).big(),
        Workload {
            capacity: Some(SMALL_TLB),
            ..Workload::new("small-tlb", Some(strict_4k), Mapping::PerRequest, 1).big()
        },
    ];
    // A baseline runs when a workload measured against it does.
    let chosen = |name: &str| args.workloads.is_empty() || args.workloads.iter().any(|n| n == name);
    let needed: Vec<&'static str> = all
        .iter()
        .filter(|w| chosen(w.name))
        .map(|w| w.baseline)
        .collect();
    all.into_iter()
        .filter(|w| w.name == "off" || chosen(w.name) || needed.contains(&w.name))
        .collect()
}

/// What one workload measured.
#[derive(Debug, Clone)]
struct Row {
    name: &'static str,
    /// The workload the ratio is against.
    baseline: &'static str,
    block_kib: u32,
    /// IOTLB entries (meaningful with the IOMMU only).
    capacity: usize,
    iommu: bool,
    requests: u64,
    seconds: f64,
    iops: f64,
    mbps: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    misses_per_s: f64,
    miss_rtt_p50_us: Option<f64>,
    miss_rtt_p99_us: Option<f64>,
    hit_rate: Option<f64>,
    invalidations_per_s: f64,
    /// The median over rounds of this workload's IOPS over `off`'s in the same round.
    ratio_to_off: f64,
    /// Each round's ratio to `off` (same round), in order.
    ratio_rounds: Vec<f64>,
    /// The median round's IOPS over `off`'s median round's (rounds not paired).
    ratio_of_medians: f64,
    /// IOPS of every round, in order.
    iops_rounds: Vec<f64>,
    /// Front-end side: MISS received to UPDATE acknowledged.
    miss_service_p50_us: Option<f64>,
    misses: u64,
    /// MISSes received per request completed.
    misses_per_request: f64,
    verify_failures: u64,
    poison_violations: u64,
    poison_checks: u64,
    errors: u64,
    /// The back-end's counters of each round (ours only).
    engine: Vec<Stats>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Our back-end for one workload: a fresh in-memory disk and a server on a fresh socket.
struct OwnBackend {
    server: Arc<Server<Blk>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    socket: PathBuf,
}

impl OwnBackend {
    fn start(
        dir: &Path,
        name: &str,
        capacity: usize,
        busy_poll: Duration,
        disk_bytes: u64,
    ) -> Result<Self, String> {
        // In RAM (memfd): the figures are about the IOTLB path, not about a file system
        // allocating blocks on first write, which made the first workload vary by 2x.
        let disk = rustix::fs::memfd_create(
            format!("vhost-iotlb-bench-{name}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(|e| format!("memfd_create: {e}"))?;
        let disk = std::fs::File::from(disk);
        disk.set_len(disk_bytes)
            .map_err(|e| format!("disk of {disk_bytes} bytes: {e}"))?;
        let blk = Blk::new(
            disk,
            BlkConfig {
                queue_size: 256,
                ..BlkConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let server = Arc::new(Server::new(
            blk,
            EngineConfig {
                iotlb_capacity: capacity,
                miss_timeout: Duration::from_secs(1),
                busy_poll,
                ..EngineConfig::default()
            },
        ));
        let socket = dir.join(format!("{name}.sock"));
        let (s, p) = (server.clone(), socket.clone());
        let thread = std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || s.serve(&p).map_err(|e| e.to_string()))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.is_listening() {
            if thread.is_finished() {
                return Err(match thread.join() {
                    Ok(Err(e)) => format!("our back-end: {e}"),
                    _ => format!(
                        "our back-end stopped before listening on {}",
                        socket.display()
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(format!("the back-end did not bind {}", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(OwnBackend {
            server,
            thread: Some(thread),
            socket,
        })
    }

    /// Stop serving; returns the counters of the connection that ran and its miss round
    /// trip (p50, p99) in µs.
    fn stop(mut self) -> Result<(Stats, Option<(f64, f64)>), String> {
        self.server.shutdown_handle().shutdown();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| "the back-end panicked".to_string())??;
        }
        let h = self.server.miss_rtt();
        let rtt = (h.count() > 0).then(|| (us(h.quantile(0.5)), us(h.quantile(0.99))));
        Ok((self.server.stats(), rtt))
    }
}

/// What a workload's measured phase saw from the front-end's side.
struct Measured {
    report: DriverReport,
    /// MISS messages received.
    misses: u64,
    /// INVALIDATEs forwarded.
    invalidations: u64,
    /// MISS received to UPDATE acknowledged, p50 in µs.
    service_p50: Option<f64>,
}

/// Run one workload against the back-end at `socket`: a warm-up, then the measured phase
/// (`at_measure` runs between the two, to reset back-end side histograms).
fn run_workload(
    args: &E2eArgs,
    w: &Workload,
    socket: &Path,
    fresh_disk: bool,
    at_measure: impl FnOnce(),
) -> Result<Measured, String> {
    let block_pages = (w.block_kib(args) / 4).max(1);
    let mut cfg = DriverConfig {
        queue: 0,
        queue_size: 256
            .min((args.depth.saturating_mul(3)).next_power_of_two())
            .max(8),
        inflight: args.depth,
        block_pages,
        mapping: w.mapping,
        buffers_per_slot: w.buffers_per_slot,
        write_percent: args.write_percent,
        disk_blocks: 0,
        verify: true,
        fresh_disk,
        seed: 0x5eed ^ w.name.len() as u64,
    };
    let ram = Arc::new(
        GuestRam::new(BlkDriver::ram_needed(&cfg).div_ceil(2 << 20) * (2 << 20))
            .map_err(|e| e.to_string())?,
    );
    let viommu = w.viommu.map(|c| Arc::new(Viommu::new(c)));
    let fe_cfg = FrontendConfig {
        busy_poll: Duration::from_micros(args.busy_poll_us),
        ..FrontendConfig::default()
    };
    let fe = VhostUserFrontend::connect(socket, ram, fe_cfg, viommu)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let sectors = fe
        .config(0, 8)
        .ok()
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("cannot read the disk capacity (GET_CONFIG)")?;
    cfg.disk_blocks = sectors * 512 / (u64::from(block_pages) * 4096);
    let mut d = BlkDriver::new(&fe, cfg, 0).map_err(|e| e.to_string())?;
    let stall = Duration::from_secs(10);
    // Warm-up: fault the guest RAM and the disk file in, start the threads, fill caches.
    let warmup = Duration::from_secs_f64((args.duration / 4.0).min(0.5));
    d.run(Instant::now() + warmup, None, stall)
        .map_err(|e| format!("{}: {e}", w.name))?;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let inval = |fe: &VhostUserFrontend| fe.viommu().map_or(0, |v| load(&v.stats().invalidations));
    let (misses0, inval0) = (load(&fe.channel_stats().misses), inval(&fe));
    fe.channel_stats().service.reset();
    d.reset_report();
    at_measure();
    d.run(
        Instant::now() + Duration::from_secs_f64(args.duration),
        None,
        stall,
    )
    .map_err(|e| format!("{}: {e}", w.name))?;
    let misses = load(&fe.channel_stats().misses) - misses0;
    let invalidations = inval(&fe) - inval0;
    let service = &fe.channel_stats().service;
    let service_p50 = (service.count() > 0).then(|| us(service.quantile(0.5)));
    let report = d.finish().map_err(|e| format!("{}: {e}", w.name))?;
    drop(fe);
    Ok(Measured {
        report,
        misses,
        invalidations,
        service_p50,
    })
}

/// Run the benchmark, print the table, write `json` and the plot if asked.
pub fn run(args: &E2eArgs, json_path: Option<&Path>) -> Result<(), String> {
    if args.block_kib == 0 || args.block_kib % 4 != 0 || args.block_kib > 1024 {
        return Err("--block-kib must be a multiple of 4 up to 1024".into());
    }
    if args.depth == 0 || args.depth > 85 {
        return Err("--depth must be within 1..=85 (three descriptors each in a 256 ring)".into());
    }
    if !(1..=20).contains(&args.rounds) {
        return Err("--rounds must be within 1..=20".into());
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err("--duration must be within (0, 3600] seconds".into());
    }
    if !(backend::MIN_IOTLB_CAPACITY..=iotlb::MAX_CAPACITY).contains(&args.iotlb_capacity) {
        return Err(format!(
            "--iotlb-capacity must be within {}..={}",
            backend::MIN_IOTLB_CAPACITY,
            iotlb::MAX_CAPACITY
        ));
    }
    let list = workloads(args);
    if let Some(unknown) = args
        .workloads
        .iter()
        .find(|n| !list.iter().any(|w| w.name == n.as_str()))
    {
        return Err(format!("unknown workload {unknown:?}"));
    }
    let dir = std::env::temp_dir().join(format!("vhost-iotlb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_all(args, &list, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;

    print_table(args, &rows);
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&to_json(&rows)).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot(&rows)).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| r.verify_failures + r.poison_violations + r.errors > 0)
        .map(|r| r.name)
        .collect();
    if !bad.is_empty() {
        return Err(format!("data check failed in: {}", bad.join(", ")));
    }
    Ok(())
}

fn run_all(args: &E2eArgs, list: &[Workload], dir: &Path) -> Result<Vec<Row>, String> {
    let rounds = args.rounds.max(1);
    // Each round measures a share of `--duration`.
    let per = E2eArgs {
        duration: args.duration / f64::from(rounds),
        ..args.clone()
    };
    let steps = (rounds as usize * list.len()) as f64;
    let pb = ProgressBar::new((steps * per.duration * 10.0) as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg}")
            .map_err(|e| e.to_string())?,
    );
    let mut samples: Vec<Vec<Row>> = vec![Vec::new(); list.len()];
    let mut step = 0usize;
    for round in 0..rounds {
        for (i, w) in list.iter().enumerate() {
            pb.set_message(format!("{} (round {}/{rounds})", w.name, round + 1));
            let base = (step as f64 * per.duration * 10.0) as u64;
            step += 1;
            let ticker = {
                let pb = pb.clone();
                let secs = per.duration;
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let s2 = stop.clone();
                let t = std::thread::spawn(move || {
                    let start = Instant::now();
                    while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                        let done = (start.elapsed().as_secs_f64().min(secs) * 10.0) as u64;
                        pb.set_position(base + done);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
                (stop, t)
            };
            let outcome = match &per.socket {
                Some(sock) => run_workload(&per, w, sock, false, || {}).map(|m| (m, None, None)),
                None => {
                    // 1 GiB (sparse, in memory): room for every slot's blocks.
                    let own = OwnBackend::start(
                        dir,
                        w.name,
                        w.capacity(&per),
                        Duration::from_micros(per.busy_poll_us),
                        1 << 30,
                    )?;
                    let socket = own.socket.clone();
                    let server = own.server.clone();
                    let r = run_workload(&per, w, &socket, true, || server.miss_rtt().reset());
                    let (stats, rtt) = own.stop()?;
                    r.map(|m| (m, Some(stats), rtt))
                }
            };
            ticker.0.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = ticker.1.join();
            let (measured, stats, rtt) = outcome?;
            samples[i].push(row(w, &measured, stats.as_ref(), rtt, args));
        }
    }
    pb.finish_and_clear();
    let mut rows: Vec<Row> = samples.into_iter().filter_map(median_round).collect();
    let baselines: Vec<(&'static str, f64, Vec<f64>)> = rows
        .iter()
        .map(|r| (r.name, r.iops, r.iops_rounds.clone()))
        .collect();
    for r in &mut rows {
        if let Some((_, off_iops, off_rounds)) = baselines.iter().find(|b| b.0 == r.baseline) {
            r.ratio_rounds = paired_ratios(&r.iops_rounds, off_rounds);
            r.ratio_to_off = median(&r.ratio_rounds).unwrap_or(r.iops / off_iops);
            r.ratio_of_medians = r.iops / off_iops;
        }
    }
    Ok(rows)
}

/// Each round's IOPS over `off`'s in the same round (the two ran within seconds of each
/// other, so a machine that is slower for a while slows both).
fn paired_ratios(rounds: &[f64], off: &[f64]) -> Vec<f64> {
    rounds
        .iter()
        .zip(off)
        .filter(|(_, o)| **o > 0.0)
        .map(|(r, o)| r / o)
        .collect()
}

/// The median (the upper one of an even count); `None` when empty.
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The round with the median IOPS, carrying every round's IOPS and the data-check counts
/// of all rounds (a failure in any round is a failure).
fn median_round(mut rounds: Vec<Row>) -> Option<Row> {
    let iops_rounds: Vec<f64> = rounds.iter().map(|r| r.iops).collect();
    let engine: Vec<Stats> = rounds.iter().flat_map(|r| r.engine.clone()).collect();
    let (checks, verify, poison, errors) = rounds.iter().fold((0, 0, 0, 0), |a, r| {
        (
            a.0 + r.poison_checks,
            a.1 + r.verify_failures,
            a.2 + r.poison_violations,
            a.3 + r.errors,
        )
    });
    rounds.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = rounds.len() / 2;
    let mut r = rounds.into_iter().nth(mid)?;
    r.iops_rounds = iops_rounds;
    r.engine = engine;
    r.poison_checks = checks;
    r.verify_failures = verify;
    r.poison_violations = poison;
    r.errors = errors;
    Some(r)
}

fn row(
    w: &Workload,
    m: &Measured,
    stats: Option<&Stats>,
    rtt: Option<(f64, f64)>,
    args: &E2eArgs,
) -> Row {
    let r = &m.report;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let iops = r.requests as f64 / secs;
    let bytes = f64::from(w.block_kib(args)) * 1024.0;
    let misses = m.misses;
    let (rtt50, rtt99) = (rtt.map(|r| r.0), rtt.map(|r| r.1));
    Row {
        name: w.name,
        baseline: w.baseline,
        block_kib: w.block_kib(args),
        capacity: w.capacity(args),
        iommu: w.viommu.is_some(),
        requests: r.requests,
        seconds: secs,
        iops,
        mbps: iops * bytes / 1e6,
        lat_p50_us: us(r.latency.quantile(0.5)),
        lat_p99_us: us(r.latency.quantile(0.99)),
        misses_per_s: misses as f64 / secs,
        miss_rtt_p50_us: rtt50,
        miss_rtt_p99_us: rtt99,
        hit_rate: stats.and_then(|s| {
            let total = s.hits + s.misses;
            (w.viommu.is_some() && total > 0).then(|| s.hits as f64 / total as f64)
        }),
        invalidations_per_s: m.invalidations as f64 / secs,
        ratio_to_off: 1.0, // set once `off` is known
        ratio_rounds: Vec::new(),
        ratio_of_medians: 1.0,
        iops_rounds: vec![iops],
        miss_service_p50_us: m.service_p50,
        misses,
        misses_per_request: misses as f64 / (r.requests.max(1)) as f64,
        verify_failures: r.verify_failures,
        poison_violations: r.poison_violations,
        poison_checks: r.poison_checks,
        errors: r.errors + r.bad_completions,
        engine: stats.copied().into_iter().collect(),
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn print_table(args: &E2eArgs, rows: &[Row]) {
    println!(
        "vhost-iotlb end-to-end: virtio-blk, {} KiB random I/O (1 MiB for off-1m, big, \
         small-tlb), {}% writes, depth {}, {} s per workload in {} interleaved rounds (median \
         round shown), IOTLB {} entries (small-tlb: 16){}",
        args.block_kib,
        args.write_percent,
        args.depth,
        args.duration,
        args.rounds,
        args.iotlb_capacity,
        args.socket
            .as_ref()
            .map_or(String::new(), |s| format!(", back-end at {}", s.display()))
    );
    println!(
        "{:<10} {:>5} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>7} {:>9} {:>7}",
        "workload",
        "KiB",
        "tlb",
        "IOPS",
        "MB/s",
        "p50 us",
        "p99 us",
        "misses/s",
        "miss/req",
        "rtt50 us",
        "rtt99 us",
        "hit",
        "inval/s",
        "vs off"
    );
    for r in rows {
        let tlb = if r.iommu {
            r.capacity.to_string()
        } else {
            "-".into()
        };
        println!(
            "{:<10} {:>5} {:>5} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>8.1} {:>9} {:>9} {:>7} {:>9.0} {:>6.0}%",
            r.name,
            r.block_kib,
            tlb,
            r.iops,
            r.mbps,
            r.lat_p50_us,
            r.lat_p99_us,
            r.misses_per_s,
            r.misses_per_request,
            fmt_opt(r.miss_rtt_p50_us, 1),
            fmt_opt(r.miss_rtt_p99_us, 1),
            fmt_opt(r.hit_rate.map(|h| h * 100.0), 1),
            r.invalidations_per_s,
            r.ratio_to_off * 100.0
        );
    }
    println!(
        "tlb: IOTLB entries. miss/req: MISSes per request. rtt: MISS sent to the queue running \
         again (back-end side). hit: IOTLB hit rate (%). vs off: median over rounds of IOPS / \
         the IOPS of the baseline with the same request size and no IOMMU (off, or off-1m for \
         1 MiB requests) in the same round. Every read was checked against what was written; \
         freed buffers were poisoned and checked ({} checks, {} violations).",
        rows.iter().map(|r| r.poison_checks).sum::<u64>(),
        rows.iter().map(|r| r.poison_violations).sum::<u64>()
    );
}

fn to_json(rows: &[Row]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for r in rows {
        m.insert(
            r.name.to_string(),
            json!({
                "requests": r.requests,
                "seconds": r.seconds,
                "iops": r.iops,
                "mb_per_s": r.mbps,
                "latency_us": {"p50": r.lat_p50_us, "p99": r.lat_p99_us},
                "misses": r.misses,
                "misses_per_s": r.misses_per_s,
                "misses_per_request": r.misses_per_request,
                "block_kib": r.block_kib,
                "iotlb_capacity": r.iommu.then_some(r.capacity),
                "baseline": r.baseline,
                "miss_rtt_us": {"p50": r.miss_rtt_p50_us, "p99": r.miss_rtt_p99_us},
                "miss_service_us_p50": r.miss_service_p50_us,
                "hit_rate": r.hit_rate,
                "invalidations_per_s": r.invalidations_per_s,
                "ratio_to_off": r.ratio_to_off,
                "ratio_rounds": r.ratio_rounds,
                "ratio_of_medians": r.ratio_of_medians,
                "iops_rounds": r.iops_rounds,
                "verify_failures": r.verify_failures,
                "poison_checks": r.poison_checks,
                "poison_violations": r.poison_violations,
                "errors": r.errors,
                "backend": backend_json(&r.engine),
            }),
        );
    }
    serde_json::Value::Object(m)
}

/// The back-end's counters summed over rounds (the largest request: the largest of any),
/// by their stats-line names; `null` for a peer's back-end.
fn backend_json(rounds: &[Stats]) -> serde_json::Value {
    if rounds.is_empty() {
        return serde_json::Value::Null;
    }
    let mut total: Vec<(&'static str, u64)> = rounds[0].fields().iter().map(|f| (f.0, 0)).collect();
    for s in rounds {
        for (t, (name, v)) in total.iter_mut().zip(s.fields()) {
            t.1 = if name == "largest_request" {
                t.1.max(v)
            } else {
                t.1 + v
            };
        }
    }
    crate::blk::stats_json_of(&total)
}

/// Two bar charts side by side: IOPS, and miss round trip p50/p99, per workload.
fn plot(rows: &[Row]) -> String {
    let (w, h) = (960.0, 420.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panel = |s: &mut String, x0: f64, title: &str, series: &[(&str, Vec<f64>)], unit: &str| {
        let (pw, ph, top) = (420.0, 300.0, 60.0);
        let max = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="30" font-size="15" text-anchor="middle">{title}</text>"#,
            x0 + pw / 2.0
        );
        let _ = writeln!(
            s,
            r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            top + ph,
            x0 + pw,
            top + ph
        );
        let groups = rows.len().max(1) as f64;
        let gw = pw / groups;
        let colors = ["#4878a8", "#e08040"];
        let bw = gw * 0.7 / series.len() as f64;
        for (gi, r) in rows.iter().enumerate() {
            let gx = x0 + gi as f64 * gw + gw * 0.15;
            for (si, (_, vals)) in series.iter().enumerate() {
                let v = vals.get(gi).copied().unwrap_or(0.0);
                let bh = v / max * ph;
                let x = gx + si as f64 * bw;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{bh:.1}" fill="{}"><title>{} {}: {v:.1} {unit}</title></rect>"#,
                    top + ph - bh,
                    colors[si % 2],
                    r.name,
                    series[si].0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + gw * 0.35,
                top + ph + 16.0,
                r.name
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}">max {max:.1} {unit}</text>"#,
            top - 8.0
        );
        for (si, (name, _)) in series.iter().enumerate() {
            let lx = x0 + pw - 120.0;
            let ly = top - 8.0 - 14.0 * (series.len() - 1 - si) as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{ly}">{name}</text>"#,
                ly - 9.0,
                colors[si % 2],
                lx + 14.0
            );
        }
    };
    panel(
        &mut s,
        40.0,
        "Throughput (IOPS)",
        &[("IOPS", rows.iter().map(|r| r.iops).collect())],
        "IOPS",
    );
    panel(
        &mut s,
        520.0,
        "Miss round trip (us)",
        &[
            (
                "p50",
                rows.iter()
                    .map(|r| r.miss_rtt_p50_us.unwrap_or(0.0))
                    .collect(),
            ),
            (
                "p99",
                rows.iter()
                    .map(|r| r.miss_rtt_p99_us.unwrap_or(0.0))
                    .collect(),
            ),
        ],
        "us",
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_paired_by_round() {
        // The machine halves its speed in rounds 2 and 3: paired ratios do not see it.
        let off = [100.0, 50.0, 50.0, 100.0, 100.0];
        let warm = [96.0, 48.0, 48.0, 96.0, 96.0];
        let r = paired_ratios(&warm, &off);
        assert_eq!(r.len(), 5);
        assert!(r.iter().all(|x| (x - 0.96).abs() < 1e-9));
        assert_eq!(median(&r), Some(r[0]));
        // A zero `off` round is left out, and nothing gives no median.
        assert_eq!(paired_ratios(&[1.0, 2.0], &[0.0, 4.0]), vec![0.5]);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }
}
