//! `vhost-iotlb blk`: serve a disk image as a vhost-user-blk back-end with a device IOTLB.
//!
//! Listens on `--socket`, serves one front-end at a time (reconnecting after a disconnect),
//! stops cleanly on SIGINT or SIGTERM (the socket file is removed) and prints one stats line
//! on exit (and, with `--json FILE`, writes the same counters as JSON). Logs go to stderr through `tracing` (`RUST_LOG=debug` for more).

use std::path::PathBuf;

use backend::Server;
use clap::Args;
use devices::{Blk, BlkConfig};

use crate::engine::{serve_until_signal, EngineArgs};

/// Options of `vhost-iotlb blk`.
#[derive(Args, Debug)]
pub struct BlkArgs {
    /// The vhost-user socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk image or block device to serve.
    #[arg(long, value_name = "FILE")]
    disk: PathBuf,
    /// Number of queues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Largest queue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Engine options.
    #[command(flatten)]
    engine: EngineArgs,
    /// On exit, also write the statistics (the stats line's counters, the miss round trip and
    /// the message service time quantiles) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Run the back-end until SIGINT or SIGTERM.
pub fn run(args: &BlkArgs) -> Result<(), String> {
    let engine = args.engine.config()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!args.read_only)
        .open(&args.disk)
        .map_err(|e| format!("cannot open {}: {e}", args.disk.display()))?;
    let blk = Blk::new(
        file,
        BlkConfig {
            queues: args.queues,
            queue_size: args.queue_size,
            read_only: args.read_only,
            ..BlkConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        disk = %args.disk.display(),
        sectors = blk.sectors(),
        queues = args.queues,
        "vhost-iotlb blk"
    );
    let server = Server::new(blk, engine);
    let result = serve_until_signal(&server, &args.socket, "blk");
    let stats = server.stats();
    println!("{stats}");
    if let Some(path) = &args.json {
        let mut doc = stats_json(&stats);
        // The miss round trip (MISS sent to the queue running again), in whole us.
        add_quantiles(&mut doc, "miss_rtt", server.miss_rtt(), |d| {
            (d.as_micros() as u64).into()
        });
        // How long a front-end message took us to serve (read to reply), in tenths of us:
        // an IOTLB message is served in a few.
        add_quantiles(&mut doc, "service", server.service_time(), |d| {
            ((d.as_secs_f64() * 1e7).round() / 10.0).into()
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    result
}

/// Add `{name}_p50_us` and `{name}_p99_us` of `h`, each written by `us`, to the JSON object
/// `doc` (nothing when `h` recorded nothing).
fn add_quantiles(
    doc: &mut serde_json::Value,
    name: &str,
    h: &iotlb::hist::Histogram,
    us: impl Fn(std::time::Duration) -> serde_json::Value,
) {
    if let (Some(obj), true) = (doc.as_object_mut(), h.count() > 0) {
        for (suffix, q) in [("p50_us", 0.5), ("p99_us", 0.99)] {
            obj.insert(format!("{name}_{suffix}"), us(h.quantile(q)));
        }
    }
}

/// The back-end's counters as a JSON object, by their stats-line names (the file `--json`
/// writes adds the miss round trip's `miss_rtt_p50_us` and `miss_rtt_p99_us`, and the
/// message service time's `service_p50_us` and `service_p99_us`).
pub fn stats_json(stats: &backend::Stats) -> serde_json::Value {
    bench::stats_json_of(&stats.fields())
}
