//! `vhost-iotlb`: the command-line entry point. It parses arguments and dispatches to the
//! subcommands; the work itself lives in the crates (`bench`, `kernel-net`, `devices`) and
//! in `blk.rs` and `net.rs` (the engine options they share are in `engine.rs`).
//!
//! - `bench`: the main job, the end-to-end benchmark (front-end + vIOMMU + back-end over a
//!   real socket); `bench --iotlb` runs the IOTLB micro-benchmark instead; both live in
//!   `bench`.
//! - `blk`: serve a file or block device as a vhost-user-blk back-end with a device IOTLB.
//! - `net`: serve a vhost-user-net back-end with a device IOTLB (loopback).
//! - `kernel-net`: drive the kernel's `/dev/vhost-net` behind our vIOMMU (in a throwaway
//!   guest: it creates a tap device); the cases and the measurement live in `kernel-net`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod blk;
mod engine;
mod net;

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
    Bench(bench::BenchArgs),
    /// Serve a disk image as a vhost-user-blk back-end (IOMMU-capable).
    Blk(blk::BlkArgs),
    /// Serve a vhost-user-net back-end (IOMMU-capable) that loops frames back.
    Net(net::NetArgs),
    /// Drive the kernel's /dev/vhost-net device IOTLB from our vIOMMU and check frames
    /// through a tap (needs root, vhost_net and tun; meant for a throwaway VM).
    KernelNet(kernel_net::KernelNetArgs),
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
        Command::Bench(args) => bench::run(&args).map_err(|e| e.to_string()),
        Command::Blk(args) => blk::run(&args),
        Command::Net(args) => net::run(&args),
        Command::KernelNet(args) => kernel_net::run(&args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-iotlb: {e}");
            ExitCode::FAILURE
        }
    }
}
