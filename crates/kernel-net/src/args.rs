//! The options of `kernel-net` (a clap `Args` the binary flattens into its subcommand) and the
//! deliberately wrong behaviours `--broken` selects. Declarations only: nothing here runs.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Options of `kernel-net`.
#[derive(Args, Debug, Clone)]
pub struct KernelNetArgs {
    /// Frames per case, and per second of measurement.
    #[arg(long, default_value_t = 32)]
    pub frames: u32,
    /// Frames per measured mode.
    #[arg(long, default_value_t = 20000)]
    pub measure_frames: u32,
    /// Measurement rounds (interleaved; the median round of each mode is shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The vhost-net device node.
    #[arg(long, default_value = "/dev/vhost-net")]
    pub vhost: String,
    /// Answer wrongly on purpose (a named case must then fail).
    #[arg(long, value_enum)]
    pub broken: Option<Broken>,
    /// Also write the figures as JSON to this file (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Deliberately wrong IOMMU-side behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Broken {
    /// Answer a MISS with the permission asked for, not the mapping's.
    RequestedPerm,
    /// Unmap without sending the INVALIDATE (then remap the IOVA).
    NoInvalidate,
}
