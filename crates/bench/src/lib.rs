//! `bench`: the benchmarks behind `vhost-iotlb bench`, as a library the binary calls once.
//!
//! - the end-to-end benchmark (the default, the project's main job): our front-end and
//!   vIOMMU driving a virtio-blk back-end over a real socket, workload by workload, in
//!   interleaved rounds; a table, `--json FILE` and `--plot FILE.svg` (see `e2e.rs`);
//! - `--iotlb`: the IOTLB micro-benchmark (lookup cost and eviction quality against
//!   baselines; see `iotlb.rs`).
//!
//! Layout: `e2e.rs` (options and the entry point), `workloads.rs` (the workload table),
//! `run.rs` (our back-end, the front-end, the rounds), `report.rs` (rows, medians, ratios,
//! the table, the JSON), `plot.rs` (the SVG), `cpu.rs` (CPU time by side, stolen time),
//! `iotlb.rs` (the micro-benchmark), `error.rs` ([`BenchError`], why a run failed).
//!
//! This file only holds the command's options and dispatches; it must not measure or
//! report anything itself.

use std::path::PathBuf;

use clap::Args;

mod cpu;
mod e2e;
mod error;
mod iotlb;
mod net;
mod net_report;
mod plot;
mod report;
mod run;
mod testpmd;
mod workloads;

pub use e2e::{DeviceKind, E2eArgs, PeerKind};
pub use error::BenchError;
pub use report::stats_json_of;

/// Options of `vhost-iotlb bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run the IOTLB micro-benchmark (lookup cost, eviction quality) against vm-memory's
    /// IOTLB, a linear list, FIFO and random eviction.
    #[arg(long)]
    pub iotlb: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Options of the end-to-end benchmark.
    #[command(flatten)]
    pub e2e: E2eArgs,
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

/// Run the benchmark `args` chose: print its table and write what it was asked to write.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    match BenchKind::chosen(args) {
        BenchKind::Iotlb => iotlb::run(args.json.as_deref()),
        BenchKind::EndToEnd => e2e::run(&args.e2e, args.json.as_deref()),
    }
}
