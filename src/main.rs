//! `vhost-iotlb`: the command-line entry point. It parses arguments and dispatches to the
//! subcommands; the work itself lives in the crates and in the subcommand modules.
//!
//! - `bench`: the main job, the end-to-end benchmark (front-end + vIOMMU + back-end over a
//!   real socket); `bench --iotlb` runs the IOTLB micro-benchmark instead.
//! - `blk`: serve a file or block device as a vhost-user-blk back-end with a device IOTLB.
//! - `kernel-net`: drive the kernel's `/dev/vhost-net` behind our vIOMMU (in a throwaway
//!   guest: it creates a tap device); the cases and the measurement live in `kernel-net`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_iotlb;
mod blk;

#[derive(Parser)]
#[command(
    name = "vhost-iotlb",
    version,
    about = "A vhost device IOTLB, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmarks and print a table.
    Bench(BenchArgs),
    /// Serve a disk image as a vhost-user-blk back-end (IOMMU-capable).
    Blk(blk::BlkArgs),
    /// Drive the kernel's /dev/vhost-net device IOTLB from our vIOMMU and check frames
    /// through a tap (needs root, vhost_net and tun; meant for a throwaway VM).
    KernelNet(kernel_net::KernelNetArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Run the IOTLB micro-benchmark (lookup cost, eviction quality) against vm-memory's
    /// IOTLB, a linear list, FIFO and random eviction.
    #[arg(long)]
    iotlb: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    e2e: bench::E2eArgs,
}

/// The benchmarks `bench` can run.
enum BenchKind {
    /// The end-to-end benchmark (the default).
    EndToEnd,
    /// The IOTLB micro-benchmark.
    Iotlb,
}

impl BenchKind {
    fn chosen(args: &BenchArgs) -> BenchKind {
        if args.iotlb {
            BenchKind::Iotlb
        } else {
            BenchKind::EndToEnd
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => match BenchKind::chosen(&args) {
            BenchKind::Iotlb => bench_iotlb::run(args.json.as_deref()),
            BenchKind::EndToEnd => bench::run(&args.e2e, args.json.as_deref()),
        },
        Command::Blk(args) => blk::run(&args),
        Command::KernelNet(args) => kernel_net::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-iotlb: {e}");
            ExitCode::FAILURE
        }
    }
}
