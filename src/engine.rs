//! The options every back-end command shares (the engine's: IOTLB size, miss timeout,
//! polling, memory sealing, the deliberate bugs of `--broken`), and serving a [`Server`] on a socket until SIGINT or SIGTERM.
//! Device options and what a command prints are the commands' own (`blk.rs`, `net.rs`).

use std::path::Path;
use std::time::Duration;

use backend::dirty::LogMode;
use backend::{Device, EngineConfig, PollMode, Server};
use clap::{Args, ValueEnum};

/// Deliberate bugs, to show that a test catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Broken {
    /// Dirty logging records the addresses the driver gave (IOVAs behind an IOMMU) instead
    /// of the guest-physical pages written, as Linux vhost once did: a migration loses data.
    LogIova,
}

/// The engine's options.
#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Device IOTLB entries.
    #[arg(long, default_value_t = iotlb::DEFAULT_CAPACITY)]
    pub iotlb_capacity: usize,
    /// Milliseconds a MISS may stay unanswered before it is sent again; the request fails
    /// after a second timeout.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub miss_timeout: u64,
    /// Busy-poll cap in microseconds: how long the connection thread may poll for the next
    /// message, a queue parked on a miss for its answer, and (with `--poll adaptive`) an
    /// empty queue for its next chain, before blocking (0: block at once).
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub busy_poll_us: u64,
    /// Which waits poll: `adaptive` (every wait, each window tuned between 0 and the cap to
    /// how long waits turn out to be, as QEMU's poll-max-ns), `misses` (only the connection
    /// thread and a queue waiting for a MISS's answer, for the whole cap), or `off`.
    #[arg(long, value_name = "MODE", default_value_t = PollMode::Adaptive)]
    pub poll: PollMode,
    /// Accept guest memory in a memfd that is not sealed against shrinking (F_SEAL_SHRINK).
    /// By default such a region is refused: a front-end that truncates it would kill the
    /// back-end with SIGBUS. QEMU's memory-backend-memfd seals by default (seal=on).
    #[arg(long)]
    pub allow_unsealed_memory: bool,
    /// Break the back-end on purpose (tests only): `log-iova` logs IOVAs, not guest pages.
    #[arg(long, value_name = "BUG")]
    pub broken: Option<Broken>,
}

impl EngineArgs {
    /// The engine's settings; an IOTLB size outside what the engine is built for is refused.
    pub fn config(&self) -> Result<EngineConfig, String> {
        if !(backend::MIN_IOTLB_CAPACITY..=iotlb::MAX_CAPACITY).contains(&self.iotlb_capacity) {
            return Err(format!(
                "--iotlb-capacity must be within {}..={}",
                backend::MIN_IOTLB_CAPACITY,
                iotlb::MAX_CAPACITY
            ));
        }
        Ok(EngineConfig {
            iotlb_capacity: self.iotlb_capacity,
            miss_timeout: Duration::from_millis(self.miss_timeout.max(1)),
            busy_poll: Duration::from_micros(self.busy_poll_us),
            poll: self.poll,
            allow_unsealed_memory: self.allow_unsealed_memory,
            log_mode: match self.broken {
                Some(Broken::LogIova) => LogMode::BrokenIova,
                None => LogMode::Gpa,
            },
        })
    }
}

/// Serve `server` on `socket` (one front-end at a time) until SIGINT or SIGTERM; `name` is
/// the command's, for the log.
pub fn serve_until_signal<D: Device>(
    server: &Server<D>,
    socket: &Path,
    name: &'static str,
) -> Result<(), String> {
    let handle = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // Detached: it exits with the process.
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, command = name, "vhost-iotlb: shutting down");
            handle.shutdown();
        }
    });
    server.serve(socket).map_err(|e| e.to_string())
}
