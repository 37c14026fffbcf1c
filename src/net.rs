//! `vhost-iotlb net`: serve a vhost-user-net back-end with a device IOTLB.
//!
//! `--loopback` sends every frame the guest transmits back to it on the same queue pair
//! with its MAC addresses swapped (what DPDK's testpmd does in `macswap` mode); `--tap NAME`
//! links the (one) queue pair to a Linux tap interface instead. Listens on
//! `--socket`, serves one front-end at a time, stops on SIGINT or SIGTERM and prints the
//! engine's stats line and the device's frame counters on exit.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use backend::Server;
use clap::Args;
use devices::net::MAX_PAIRS;
use devices::{Net, NetConfig};

use crate::engine::{serve_until_signal, EngineArgs};

/// Options of `vhost-iotlb net`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("link").required(true).args(["loopback", "tap"])))]
pub struct NetArgs {
    /// The vhost-user socket to listen on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Send each transmitted frame back to the guest, MAC addresses swapped.
    #[arg(long)]
    loopback: bool,
    /// Link the device to this tap interface (created if missing; needs CAP_NET_ADMIN).
    /// One queue pair.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Queue pairs (rx and tx each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Largest queue size.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// The MTU offered (VIRTIO_NET_F_MTU).
    #[arg(long, default_value_t = 9000)]
    mtu: u16,
    /// Engine options.
    #[command(flatten)]
    engine: EngineArgs,
}

/// Run the back-end until SIGINT or SIGTERM.
pub fn run(args: &NetArgs) -> Result<(), String> {
    let engine = args.engine.config()?;
    if !(1..=MAX_PAIRS - 1).contains(&args.queues) {
        return Err(format!("--queues must be within 1..={}", MAX_PAIRS - 1));
    }
    if !(68..=9216).contains(&args.mtu) {
        return Err("--mtu must be within 68..=9216".into());
    }
    if !args.queue_size.is_power_of_two() {
        return Err("--queue-size must be a power of two".into());
    }
    let cfg = NetConfig {
        pairs: args.queues,
        mtu: args.mtu,
        queue_size: args.queue_size,
        ..NetConfig::default()
    };
    let net = match &args.tap {
        Some(name) => {
            if args.queues != 1 {
                return Err("--tap serves one queue pair: leave --queues at 1".into());
            }
            let tap = devices::net::Tap::open(name).map_err(|e| format!("tap {name}: {e}"))?;
            Net::tap(cfg, tap).map_err(|e| format!("tap {name}: {e}"))?
        }
        None => Net::loopback(cfg),
    };
    let counters = net.stats().clone();
    tracing::info!(
        pairs = args.queues,
        mtu = args.mtu,
        tap = args.tap.as_deref().unwrap_or("-"),
        "vhost-iotlb net: {}",
        if args.tap.is_some() {
            "tap"
        } else {
            "loopback"
        }
    );
    let server = Server::new(net, engine);
    let result = serve_until_signal(&server, &args.socket, "net");
    println!("{}", server.stats());
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "net: tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_merged={} rx_dropped={} rx_retries={}",
        c(&counters.tx_frames),
        c(&counters.tx_bytes),
        c(&counters.tx_dropped),
        c(&counters.rx_frames),
        c(&counters.rx_bytes),
        c(&counters.rx_merged),
        c(&counters.rx_dropped),
        c(&counters.rx_retries),
    );
    result
}
