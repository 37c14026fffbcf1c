//! `vhost-iotlb bench`: the end-to-end benchmark, the project's main job: its options
//! ([`E2eArgs`]) and its entry point (`run`: check the options, run the workloads, print the
//! table, write the JSON and the plot, fail on any data-check failure).
//!
//! Each workload is one vhost-user connection over a real Unix socket: our front-end and
//! vIOMMU (crate `frontend`) drive a virtio-blk back-end, ours (crate `backend`, started
//! here on a temporary in-memory disk, one fresh server and disk per workload) or an external
//! one (`--socket`). The guest-driver simulator keeps the queue full of 4 KiB random reads
//! and writes and checks every byte it reads back. Workloads:
//!
//! - `off`: no IOMMU (the baseline of the other 4 KiB workloads but `log`);
//! - `warm`: behind the IOMMU, buffers mapped once (the IOTLB warms up and stays warm);
//! - `log`: `warm` with dirty logging on, as while migrating (`VHOST_F_LOG_ALL`, a log in
//!   a memfd shared with `LOG_SHMFD`, its pages taken every 20 ms by a thread playing the
//!   migration); its ratio is against `warm`, which runs when it does. A round that logs no
//!   page, or whose front-end takes another count of pages than our back-end marked, fails
//!   the run;
//! - `strict`: every request maps its header, data and status and unmaps them on completion,
//!   each unmap an acknowledged INVALIDATE (Linux `iommu.strict=1`);
//! - `lazy`: the same with unmaps batched and flushed 256 at a time (Linux's flush queue);
//! - `thrash`: persistent buffers, a working set of 4x the IOTLB's capacity;
//! - `prepush`: `strict` with UPDATEs pushed at map time, before any miss (none of the
//!   existing stacks does this);
//! - `strict-4k`: `strict` with MISSes answered as QEMU does: one page per UPDATE, each
//!   acknowledged (the other workloads' answers are posted, up to 2 MiB each);
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
//! ratio to the baseline, and for `log` the pages its log got. A progress bar on a terminal,
//! a table at the end, `--json FILE` and `--plot FILE.svg`. Any data-check failure makes the
//! run fail, and so does a wrong dirty log.
//!
//! Where things live: the workload table in `workloads.rs`, running them in `run.rs`, the
//! figures, table and JSON in `report.rs`, the SVG in `plot.rs`. This file only checks
//! options and sequences those; it must not measure or format figures itself, nor reach
//! into the back-end's state beyond its public counters.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::{net, net_report, plot, report, workloads, BenchError};

/// The bench's busy-poll cap in microseconds (`vhost-iotlb blk` and `net` default to 50).
const BENCH_BUSY_POLL_US: u64 = 1000;

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
    /// Only these workloads (comma-separated; `off` always runs, and so does each one's
    /// baseline, for the ratios: `warm` with `log`, `off-1m` with `big`).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Drive an external vhost-user-blk back-end at this socket instead of starting ours
    /// (its disk is written to; back-end counters are then not available).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Busy-poll window in microseconds of the threads that pass MISS, UPDATE and INVALIDATE
    /// messages on both sides (0: block at once; each message then costs a thread wake-up).
    /// The default is 1 ms: with four busy threads on two cores a message now and then comes
    /// a few hundred microseconds late, and a smaller cap lets such a wait halve the window,
    /// after which the thread sleeps and pays wake-ups (README: "The bench's cap").
    #[arg(long, value_name = "US", default_value_t = BENCH_BUSY_POLL_US)]
    pub busy_poll_us: u64,
    /// Which waits poll within `--busy-poll-us`, on both sides: `adaptive` (every wait, the
    /// windows tuned to how long waits turn out to be; queues poll for the next chain too),
    /// `misses` (only waits for a MISS's answer and for the next message on a channel, for
    /// the whole window) or `off`.
    #[arg(long, value_name = "MODE", default_value_t = backend::PollMode::Adaptive)]
    pub poll: backend::PollMode,
    /// Write an SVG chart of throughput and miss round trip per workload.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Rounds: every workload runs this many times, interleaved (off, warm, ..., off, warm,
    /// ...), `--duration` split between them; the round with the median IOPS is reported.
    /// A machine that slows down for a moment then skews one sample, not a ratio. The ratio
    /// to `off` is the median of each round's ratio to `off` in the same round.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// The device: `blk` (virtio-blk on an in-memory disk) or `net` (virtio-net, each frame
    /// sent back with its MAC addresses swapped; see `net.rs`).
    #[arg(long, value_enum, default_value_t = DeviceKind::Blk)]
    pub device: DeviceKind,
    /// With `--device net`: also run every workload against this peer in the same run
    /// (`dpdk`: DPDK's vhost library in `dpdk-testpmd`, macswap; `apt-get install dpdk-dev`).
    #[arg(long, value_enum)]
    pub peer: Option<PeerKind>,
    /// With `--device net`: bytes per frame, Ethernet header included.
    #[arg(long, default_value_t = 64)]
    pub frame_bytes: u32,
}

/// The devices `bench` drives.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
}

/// The peers `bench --device net` can compare ours with.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// DPDK's vhost library (`dpdk-testpmd`).
    Dpdk,
}

/// Run the benchmark, print the table, write `json` and the plot if asked.
pub(crate) fn run(args: &E2eArgs, json_path: Option<&Path>) -> Result<(), BenchError> {
    let bad = |option, rule| Err(BenchError::BadOption { option, rule });
    check_common(args)?;
    if args.device == DeviceKind::Net {
        return run_net(args, json_path);
    }
    if args.peer.is_some() {
        return bad("--peer", "used with --device net");
    }
    if args.block_kib == 0 || args.block_kib % 4 != 0 || args.block_kib > 1024 {
        return bad("--block-kib", "a multiple of 4 up to 1024");
    }
    if args.depth == 0 || args.depth > 85 {
        return bad(
            "--depth",
            "within 1..=85 (three descriptors each in a 256 ring)",
        );
    }
    let list = workloads::workloads(args);
    if let Some(unknown) = args
        .workloads
        .iter()
        .find(|n| !list.iter().any(|w| w.name == n.as_str()))
    {
        return Err(BenchError::UnknownWorkload(unknown.clone()));
    }
    let rows = in_scratch_dir(|dir| crate::run::run_all(args, &list, dir))?;

    report::print_table(args, &rows);
    write_outputs(json_path, &report::to_json(&rows), args, || {
        plot::plot(&rows)
    })?;
    let failed: Vec<&'static str> = rows
        .iter()
        .filter(|r| r.verify_failures + r.poison_violations + r.errors > 0)
        .map(|r| r.name)
        .collect();
    if !failed.is_empty() {
        return Err(BenchError::DataCheck { workloads: failed });
    }
    if let Some((workload, why)) = rows
        .iter()
        .find_map(|r| Some((r.name, r.dirty_log?.problem()?)))
    {
        return Err(BenchError::DirtyLog { workload, why });
    }
    Ok(())
}

/// The options both devices check the same way.
fn check_common(args: &E2eArgs) -> Result<(), BenchError> {
    let bad = |option, rule| Err(BenchError::BadOption { option, rule });
    if !(1..=20).contains(&args.rounds) {
        return bad("--rounds", "within 1..=20");
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return bad("--duration", "within (0, 3600] seconds");
    }
    if !(backend::MIN_IOTLB_CAPACITY..=iotlb::MAX_CAPACITY).contains(&args.iotlb_capacity) {
        return Err(BenchError::IotlbCapacity {
            min: backend::MIN_IOTLB_CAPACITY,
            max: iotlb::MAX_CAPACITY,
        });
    }
    Ok(())
}

/// Run `f` with a fresh scratch directory (sockets, testpmd's log), removed afterwards
/// unless `VHOST_IOTLB_BENCH_KEEP` is set (then its path is printed, for a post-mortem).
fn in_scratch_dir<T>(f: impl FnOnce(&Path) -> Result<T, BenchError>) -> Result<T, BenchError> {
    let dir = std::env::temp_dir().join(format!("vhost-iotlb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::ScratchDir {
        path: dir.clone(),
        source,
    })?;
    let result = f(&dir);
    if std::env::var_os("VHOST_IOTLB_BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Write the JSON and the plot where asked.
fn write_outputs(
    json_path: Option<&Path>,
    json: &serde_json::Value,
    args: &E2eArgs,
    svg: impl FnOnce() -> String,
) -> Result<(), BenchError> {
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(json)?;
        std::fs::write(path, text + "\n").map_err(BenchError::writing(path))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg()).map_err(BenchError::writing(path))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `--device net`: check its options, run ours (and the peer) and report.
fn run_net(args: &E2eArgs, json_path: Option<&Path>) -> Result<(), BenchError> {
    let bad = |option, rule| Err(BenchError::BadOption { option, rule });
    if args.socket.is_some() {
        return bad(
            "--socket",
            "left out with --device net (it starts its back-ends)",
        );
    }
    if !(60..=frontend::driver::MAX_FRAME).contains(&args.frame_bytes) {
        return bad("--frame-bytes", "within 60..=4084");
    }
    if args.depth == 0 || args.depth > 256 {
        return bad(
            "--depth",
            "within 1..=256 (frames out, a 256-entry ring each way)",
        );
    }
    let list = net::workloads(args);
    let names = net::workload_names(args);
    if let Some(unknown) = args.workloads.iter().find(|n| !names.contains(&n.as_str())) {
        return Err(BenchError::UnknownWorkload(unknown.clone()));
    }
    let peers: Vec<net::Peer> = match args.peer {
        Some(PeerKind::Dpdk) => vec![net::Peer::Ours, net::Peer::Dpdk],
        None => vec![net::Peer::Ours],
    };
    let (rows, totals) = in_scratch_dir(|dir| net::run_all(args, &list, &peers, dir))?;
    net_report::print_table(args, &rows, totals);
    write_outputs(
        json_path,
        &net_report::to_json(args, &rows, totals),
        args,
        || {
            plot::grouped_bars(
            &net_report::panels(&rows),
            &[
                "Bars: the median round; whiskers: min–max over rounds.".to_string(),
                "Frames back per second: each frame crossed the device twice (transmit, receive)."
                    .to_string(),
            ],
        )
        },
    )?;
    let failed: Vec<&'static str> = rows.iter().filter(|r| r.failed()).map(|r| r.name).collect();
    if !failed.is_empty() {
        return Err(BenchError::DataCheck { workloads: failed });
    }
    Ok(())
}
