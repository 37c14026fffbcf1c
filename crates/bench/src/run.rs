//! Running the end-to-end workloads: our back-end on a fresh in-memory disk and socket
//! (`OwnBackend`, one per workload and round), the front-end and vIOMMU driving it through
//! the guest-driver simulator (`run_workload`: warm-up, then the measured phase; with dirty
//! logging, a thread playing the migration that takes the log's pages, `LogSync`), and the
//! interleaved rounds with their progress bar (`run_all`).
//!
//! It produces one [`Row`] per workload and round and hands them to `report.rs`; it must not
//! format, print or write figures, and it must not reach into the back-end's state beyond
//! its public counters (`Server::stats`, `Server::miss_rtt`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backend::{Device, EngineConfig, ServeError, Server, Stats};
use devices::{Blk, BlkConfig};
use frontend::driver::{BlkDriver, DriverConfig, DriverReport};
use frontend::vhost_user::{DirtyLog, FrontendConfig, GuestRam, VhostUserFrontend};
use frontend::viommu::{Viommu, ViommuConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cpu::CpuSample;
use crate::report::{self, us, Row};
use crate::workloads::{Workload, LOG_SYNC};
use crate::{BenchError, E2eArgs};

/// Our back-end for one workload: a server of a fresh device on a fresh socket.
pub(crate) struct OwnBackend<D: Device> {
    pub(crate) server: Arc<Server<D>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
    pub(crate) socket: PathBuf,
}

/// The engine settings of the bench's back-ends.
pub(crate) fn engine_config(
    capacity: usize,
    busy_poll: Duration,
    poll: backend::PollMode,
) -> EngineConfig {
    EngineConfig {
        iotlb_capacity: capacity,
        miss_timeout: Duration::from_secs(1),
        busy_poll,
        poll,
        ..EngineConfig::default()
    }
}

impl OwnBackend<Blk> {
    fn start(
        dir: &Path,
        name: &str,
        engine: EngineConfig,
        disk_bytes: u64,
    ) -> Result<Self, BenchError> {
        // In RAM (memfd): the figures are about the IOTLB path, not about a file system
        // allocating blocks on first write, which made the first workload vary by 2x.
        let disk = rustix::fs::memfd_create(
            format!("vhost-iotlb-bench-{name}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(|e| BenchError::Memfd(e.into()))?;
        let disk = std::fs::File::from(disk);
        disk.set_len(disk_bytes)
            .map_err(|source| BenchError::DiskSize {
                bytes: disk_bytes,
                source,
            })?;
        let blk = Blk::new(
            disk,
            BlkConfig {
                queue_size: 256,
                ..BlkConfig::default()
            },
        )?;
        OwnBackend::serve(dir, name, blk, engine)
    }
}

impl<D: Device> OwnBackend<D> {
    /// Serve `dev` on `DIR/NAME.sock`, once it listens.
    pub(crate) fn serve(
        dir: &Path,
        name: &str,
        dev: D,
        engine: EngineConfig,
    ) -> Result<Self, BenchError> {
        let server = Arc::new(Server::new(dev, engine));
        let socket = dir.join(format!("{name}.sock"));
        let (s, p) = (server.clone(), socket.clone());
        let thread = std::thread::Builder::new()
            .name("backend".into())
            .spawn(move || s.serve(&p))
            .map_err(|source| BenchError::Spawn {
                name: "backend",
                source,
            })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.is_listening() {
            if thread.is_finished() {
                return Err(match thread.join() {
                    Ok(Err(e)) => BenchError::Serve(e),
                    _ => BenchError::BackendStopped { socket },
                });
            }
            if Instant::now() > deadline {
                return Err(BenchError::BindTimeout { socket });
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
    pub(crate) fn stop(mut self) -> Result<(Stats, Option<(f64, f64)>), BenchError> {
        self.server.shutdown_handle().shutdown();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| BenchError::Panicked { name: "back-end" })??;
        }
        let h = self.server.miss_rtt();
        let rtt = (h.count() > 0).then(|| (us(h.quantile(0.5)), us(h.quantile(0.99))));
        Ok((self.server.stats(), rtt))
    }
}

/// Connect our front-end to the back-end at `socket`: guest RAM of at least `ram_bytes` (in
/// 2 MiB steps), behind a vIOMMU of `viommu` (or none), able to start `queues` queues, with
/// the bench's polling options, and with a dirty log if `dirty_log`.
pub(crate) fn connect(
    args: &E2eArgs,
    socket: &Path,
    ram_bytes: u64,
    viommu: Option<ViommuConfig>,
    queues: u16,
    dirty_log: bool,
) -> Result<VhostUserFrontend, BenchError> {
    let ram = Arc::new(
        GuestRam::new(ram_bytes.div_ceil(2 << 20) * (2 << 20)).map_err(BenchError::GuestRam)?,
    );
    let viommu = viommu.map(|c| Arc::new(Viommu::new(c)));
    let fe_cfg = FrontendConfig {
        queues,
        busy_poll: Duration::from_micros(args.busy_poll_us),
        poll: args.poll,
        dirty_log,
        ..FrontendConfig::default()
    };
    VhostUserFrontend::connect(socket, ram, fe_cfg, viommu).map_err(|source| BenchError::Connect {
        socket: socket.to_path_buf(),
        source,
    })
}

/// What a workload's measured phase saw from the front-end's side.
pub(crate) struct Measured {
    pub(crate) report: DriverReport,
    /// MISS messages received.
    pub(crate) misses: u64,
    /// INVALIDATEs forwarded.
    pub(crate) invalidations: u64,
    /// MISS received to UPDATE acknowledged, p50 in µs.
    pub(crate) service_p50: Option<f64>,
    /// CPU time used over the measured phase, by side, and stolen by the hypervisor.
    pub(crate) cpu: CpuSample,
    /// With dirty logging: what the front-end took from the log over the connection.
    pub(crate) log: Option<LogTaken>,
}

/// The pages a connection's front-end took from its dirty log.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogTaken {
    /// Pages taken, over every sync (the warm-up's included) and a last one after the queue
    /// stopped: as many as the back-end marked while they were clear.
    pub(crate) pages: u64,
    /// Syncs that found at least one page (the last one included).
    pub(crate) syncs: u64,
}

/// The migration's side of dirty logging: a thread taking the log's pages every
/// [`LOG_SYNC`], as QEMU's log sync does once per pass over guest memory. Stopped when
/// dropped, on any path out of the workload.
struct LogSync {
    log: Arc<DirtyLog>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<LogTaken>>,
    /// What the thread took, once stopped.
    taken: LogTaken,
}

impl LogSync {
    fn start(log: &Arc<DirtyLog>) -> Result<Self, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || {
                let mut taken = LogTaken::default();
                let next = || Instant::now() + LOG_SYNC;
                let mut at = next();
                while !s.load(Ordering::Relaxed) {
                    // Woken early by `stop`.
                    std::thread::park_timeout(at.saturating_duration_since(Instant::now()));
                    if Instant::now() >= at {
                        taken.add(l.take_pages(|_| ()));
                        at = next();
                    }
                }
                taken
            })
            .map_err(|source| BenchError::Spawn {
                name: "log-sync",
                source,
            })?;
        Ok(LogSync {
            log: log.clone(),
            stop,
            thread: Some(thread),
            taken: LogTaken::default(),
        })
    }

    /// Stop the thread (a second call does nothing).
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        if let Some(t) = self.thread.take().and_then(|t| t.join().ok()) {
            self.taken.pages += t.pages;
            self.taken.syncs += t.syncs;
        }
    }

    /// Stop, and take what is left: call it once the queue stopped (nothing is written
    /// after that).
    fn finish(mut self) -> LogTaken {
        self.stop();
        let last = self.log.take_pages(|_| ());
        self.taken.add(last);
        self.taken
    }
}

impl Drop for LogSync {
    fn drop(&mut self) {
        self.stop();
    }
}

impl LogTaken {
    fn add(&mut self, pages: u64) {
        if pages > 0 {
            self.pages += pages;
            self.syncs += 1;
        }
    }
}

/// Run one workload against the back-end at `socket`: a warm-up, then the measured phase
/// (`at_measure` runs between the two, to reset back-end side histograms).
pub(crate) fn run_workload(
    args: &E2eArgs,
    w: &Workload,
    socket: &Path,
    fresh_disk: bool,
    at_measure: impl FnOnce(),
) -> Result<Measured, BenchError> {
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
    let fe = connect(
        args,
        socket,
        BlkDriver::ram_needed(&cfg),
        w.viommu,
        1,
        w.dirty_log,
    )?;
    // From the connection on: the back-end logs from SET_LOG_BASE, the warm-up included.
    let mut log_sync = fe.dirty_log().map(LogSync::start).transpose()?;
    // The first field of the virtio-blk config space: the capacity in 512-byte sectors.
    let reply = fe.config(0, 8).map_err(BenchError::DiskCapacity)?;
    let sectors = <[u8; 8]>::try_from(reply.as_slice())
        .map(u64::from_le_bytes)
        .map_err(|_| BenchError::DiskCapacityReply { len: reply.len() })?;
    // From the peer: an external back-end may answer anything.
    let disk_bytes = sectors
        .checked_mul(512)
        .ok_or(BenchError::DiskTooLarge { sectors })?;
    cfg.disk_blocks = disk_bytes / (u64::from(block_pages) * 4096);
    let driver = |source| BenchError::Driver {
        workload: w.name,
        source,
    };
    let mut d = BlkDriver::new(&fe, cfg, 0).map_err(driver)?;
    let stall = Duration::from_secs(10);
    // Warm-up: fault the guest RAM and the disk file in, start the threads, fill caches.
    let warmup = Duration::from_secs_f64((args.duration / 4.0).min(0.5));
    d.run(Instant::now() + warmup, None, stall)
        .map_err(driver)?;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let inval = |fe: &VhostUserFrontend| fe.viommu().map_or(0, |v| load(&v.stats().invalidations));
    let (misses0, inval0) = (load(&fe.channel_stats().misses), inval(&fe));
    fe.channel_stats().service.reset();
    d.reset_report();
    at_measure();
    let cpu0 = CpuSample::now();
    d.run(
        Instant::now() + Duration::from_secs_f64(args.duration),
        None,
        stall,
    )
    .map_err(driver)?;
    let cpu = CpuSample::now().since(&cpu0);
    // Its CPU time is counted above (it lives through the measured phase).
    if let Some(s) = log_sync.as_mut() {
        s.stop();
    }
    let misses = load(&fe.channel_stats().misses) - misses0;
    let invalidations = inval(&fe) - inval0;
    let service = &fe.channel_stats().service;
    let service_p50 = (service.count() > 0).then(|| us(service.quantile(0.5)));
    let report = d.finish().map_err(driver)?;
    // The queue stopped (GET_VRING_BASE): the last take finds every page still marked.
    let log = log_sync.map(LogSync::finish);
    drop(fe);
    Ok(Measured {
        report,
        misses,
        invalidations,
        service_p50,
        cpu,
        log,
    })
}

pub(crate) fn run_all(
    args: &E2eArgs,
    list: &[Workload],
    dir: &Path,
) -> Result<Vec<Row>, BenchError> {
    let rounds = args.rounds.max(1);
    // Each round measures a share of `--duration`.
    let per = E2eArgs {
        duration: args.duration / f64::from(rounds),
        ..args.clone()
    };
    let steps = (rounds as usize * list.len()) as f64;
    let pb = ProgressBar::new((steps * per.duration * 10.0) as u64);
    pb.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {msg}",
    )?);
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
                    let engine = engine_config(
                        w.capacity(&per),
                        Duration::from_micros(per.busy_poll_us),
                        per.poll,
                    );
                    let own = OwnBackend::start(dir, w.name, engine, 1 << 30)?;
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
            samples[i].push(report::row(w, &measured, stats.as_ref(), rtt, args));
        }
    }
    pb.finish_and_clear();
    Ok(report::summarize(samples))
}
