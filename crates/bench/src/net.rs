//! `vhost-iotlb bench --device net`: the virtio-net benchmark. Our front-end and vIOMMU
//! drive a virtio-net back-end through the net driver simulator (`frontend::driver::
//! NetDriver`): frames of `--frame-bytes` go out on the transmit queue, come back on the
//! receive queue with their MACs swapped and are checked byte for byte, with `--depth`
//! frames out at once.
//!
//! Peers: ours (`vhost-iotlb net --loopback`'s device, a fresh server per workload and
//! round) and, with `--peer dpdk`, DPDK's vhost library (`dpdk-testpmd` in `macswap` mode,
//! started once for the run, a fresh connection per workload and round; `testpmd.rs`). Each
//! workload runs against each peer in interleaved rounds (round 1: off ours, off dpdk, warm
//! ours, ...), so a machine that drifts moves both sides of every ratio together.
//!
//! The workloads are blk's IOMMU workloads in net terms (`WORKLOADS`): `off` (no IOMMU),
//! `warm` (buffers mapped once), `strict` and `lazy` (every buffer mapped when posted or
//! sent and unmapped when it comes back, unmaps acknowledged one batch at a time or flushed
//! 256 at a time), `thrash` (buffers mapped once, a working set of 4x `--iotlb-capacity`),
//! `prepush` (`strict` with UPDATEs pushed at map time).
//!
//! This file runs workloads and hands one [`NetRow`] per workload, peer and round to
//! `net_report.rs`; it must not format or print figures.

use std::path::Path;
use std::sync::atomic::Ordering;

use std::time::{Duration, Instant};

use devices::{Net, NetConfig};
use frontend::driver::{Mapping, NetDriver, NetDriverConfig, NetReport};
use frontend::vhost_user::VhostUserFrontend;
use frontend::viommu::{Invalidation, ViommuConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cpu::CpuSample;
use crate::net_report::{self, NetRow};
use crate::run::{connect, engine_config, OwnBackend};
use crate::testpmd::Testpmd;
use crate::{BenchError, E2eArgs};

/// Ring entries of both queues.
const QUEUE_SIZE: u16 = 256;

/// Which back-end a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// Our engine and virtio-net loopback.
    Ours,
    /// `dpdk-testpmd` (macswap) on DPDK's vhost library.
    Dpdk,
}

impl Peer {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Ours => "ours",
            Peer::Dpdk => "dpdk",
        }
    }
}

/// One net workload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetWorkload {
    pub(crate) name: &'static str,
    pub(crate) viommu: Option<ViommuConfig>,
    pub(crate) mapping: Mapping,
    /// Buffers of each direction when mapped once.
    pub(crate) buffers: u32,
}

/// The workload table, filtered by `--workloads` (`off` always runs, for the ratios).
pub(crate) fn workloads(args: &E2eArgs) -> Vec<NetWorkload> {
    let strict = ViommuConfig::default();
    let ring = u32::from(QUEUE_SIZE);
    let w = |name, viommu, mapping, buffers| NetWorkload {
        name,
        viommu,
        mapping,
        buffers,
    };
    // Two directions of 2x the IOTLB each: a working set of 4x its capacity.
    let thrash = (2 * args.iotlb_capacity).min(1 << 20) as u32;
    let all = [
        w("off", None, Mapping::Persistent, ring),
        w("warm", Some(strict), Mapping::Persistent, ring),
        w("strict", Some(strict), Mapping::PerRequest, ring),
        w(
            "lazy",
            Some(ViommuConfig {
                invalidation: Invalidation::Lazy { batch: 256 },
                ..strict
            }),
            Mapping::PerRequest,
            ring,
        ),
        w("thrash", Some(strict), Mapping::Persistent, thrash),
        w(
            "prepush",
            Some(ViommuConfig {
                prepush: true,
                ..strict
            }),
            Mapping::PerRequest,
            ring,
        ),
    ];
    all.into_iter()
        .filter(|w| {
            w.name == "off"
                || args.workloads.is_empty()
                || args.workloads.iter().any(|n| n == w.name)
        })
        .collect()
}

/// The names `--workloads` may use with `--device net`.
pub(crate) fn workload_names(args: &E2eArgs) -> Vec<&'static str> {
    let all = E2eArgs {
        workloads: Vec::new(),
        ..args.clone()
    };
    workloads(&all).iter().map(|w| w.name).collect()
}

/// What one measured phase saw.
pub(crate) struct NetMeasured {
    pub(crate) report: NetReport,
    pub(crate) misses: u64,
    /// MISSes for an IOVA the vIOMMU no longer maps (left unanswered, as QEMU does).
    pub(crate) unmapped: u64,
    pub(crate) invalidations: u64,
    /// CPU of the device side (our back-end's threads, or testpmd's process).
    pub(crate) device_cpu: Duration,
    /// CPU of this process's other threads: the driver, the front-end, its channel.
    pub(crate) driver_cpu: Duration,
    pub(crate) steal: Duration,
}

/// Run `w` against the back-end at `socket`: a warm-up, then the measured phase.
/// `device_cpu` reads the device side's CPU time so far.
fn run_workload(
    args: &E2eArgs,
    w: &NetWorkload,
    socket: &Path,
    at_measure: impl FnOnce(),
    device_cpu: &dyn Fn() -> Duration,
) -> Result<NetMeasured, BenchError> {
    let cfg = NetDriverConfig {
        queue_size: QUEUE_SIZE,
        inflight: args.depth,
        frame_bytes: args.frame_bytes,
        mapping: w.mapping,
        buffers: w.buffers,
        verify: true,
        loss_timeout: Duration::from_millis(5),
        busy_poll: Duration::from_micros(args.busy_poll_us),
        seed: 0x5eed ^ w.name.len() as u64,
    };
    let fe = connect(
        args,
        socket,
        NetDriver::ram_needed(&cfg),
        w.viommu,
        2,
        false,
    )?;
    let driver = |source| BenchError::Driver {
        workload: w.name,
        source,
    };
    let mut d = NetDriver::new(&fe, cfg, 0).map_err(driver)?;
    let stall = Duration::from_secs(10);
    let warmup = Duration::from_secs_f64((args.duration / 4.0).min(0.5));
    d.run(Instant::now() + warmup, None, stall)
        .map_err(driver)?;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let inval = |fe: &VhostUserFrontend| fe.viommu().map_or(0, |v| load(&v.stats().invalidations));
    let (misses0, inval0) = (load(&fe.channel_stats().misses), inval(&fe));
    let unmapped0 = load(&fe.channel_stats().unmapped);
    d.reset_report();
    at_measure();
    let (cpu0, dev0) = (CpuSample::now(), device_cpu());
    d.run(
        Instant::now() + Duration::from_secs_f64(args.duration),
        None,
        stall,
    )
    .map_err(driver)?;
    let cpu = CpuSample::now().since(&cpu0);
    let device = device_cpu().saturating_sub(dev0);
    let misses = load(&fe.channel_stats().misses) - misses0;
    let unmapped = load(&fe.channel_stats().unmapped) - unmapped0;
    let invalidations = inval(&fe) - inval0;
    let report = d.finish().map_err(driver)?;
    drop(fe);
    Ok(NetMeasured {
        report,
        misses,
        unmapped,
        invalidations,
        device_cpu: device,
        // In-process, our back-end's threads are the device side; the rest is the driver.
        driver_cpu: cpu.frontend,
        steal: cpu.steal,
    })
}

/// One workload against one peer, one round.
fn run_one(
    args: &E2eArgs,
    w: &NetWorkload,
    peer: Peer,
    dir: &Path,
    testpmd: Option<&mut Testpmd>,
) -> Result<NetRow, BenchError> {
    match (peer, testpmd) {
        (Peer::Dpdk, Some(t)) => {
            if !t.running() {
                return Err(BenchError::TestpmdStopped {
                    log: t.log().to_path_buf(),
                });
            }
            let m = run_workload(args, w, &t.socket, || {}, &|| t.cpu());
            Ok(net_report::row(w, peer, &m?, None))
        }
        _ => {
            let net = Net::loopback(NetConfig {
                queue_size: QUEUE_SIZE,
                ..NetConfig::default()
            });
            let engine = engine_config(
                args.iotlb_capacity,
                Duration::from_micros(args.busy_poll_us),
                args.poll,
            );
            let own = OwnBackend::serve(dir, w.name, net, engine)?;
            let server = own.server.clone();
            let cpu = || CpuSample::now().backend;
            let m = run_workload(args, w, &own.socket, || server.miss_rtt().reset(), &cpu);
            let (_, rtt) = own.stop()?;
            Ok(net_report::row(w, peer, &m?, rtt))
        }
    }
}

/// Every workload against every peer, `--rounds` times interleaved; one row per workload
/// and peer (the median round), in table order.
pub(crate) fn run_all(
    args: &E2eArgs,
    list: &[NetWorkload],
    peers: &[Peer],
    dir: &Path,
) -> Result<(Vec<NetRow>, Option<crate::testpmd::PortTotals>), BenchError> {
    let mut testpmd = if peers.contains(&Peer::Dpdk) {
        Some(Testpmd::start(dir)?)
    } else {
        None
    };
    let rounds = args.rounds.max(1);
    let per = E2eArgs {
        duration: args.duration / f64::from(rounds),
        ..args.clone()
    };
    let steps = u64::from(rounds) * (list.len() * peers.len()) as u64;
    let pb = ProgressBar::new(steps);
    pb.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {msg}",
    )?);
    let mut samples: Vec<Vec<NetRow>> = vec![Vec::new(); list.len() * peers.len()];
    for round in 0..rounds {
        for (i, w) in list.iter().enumerate() {
            for (j, &peer) in peers.iter().enumerate() {
                pb.set_message(format!(
                    "{} {} (round {}/{rounds})",
                    w.name,
                    peer.name(),
                    round + 1
                ));
                let row = run_one(&per, w, peer, dir, testpmd.as_mut())?;
                samples[i * peers.len() + j].push(row);
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let totals = testpmd.take().and_then(Testpmd::stop);
    Ok((net_report::summarize(samples), totals))
}
