//! The workload table of the end-to-end benchmark: what each workload sets (IOMMU or not,
//! the vIOMMU's configuration, how buffers are mapped, request size, IOTLB capacity, dirty
//! logging, the baseline its ratio is against) and which of them `--workloads` selects
//! (with the baselines of those, and theirs).
//!
//! This is data only: it must not start a back-end, connect, measure or report anything
//! (that is `run.rs` and `report.rs`).

use std::time::Duration;

use frontend::driver::Mapping;
use frontend::viommu::{Invalidation, ViommuConfig};

use crate::E2eArgs;

/// One workload's setting.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) viommu: Option<ViommuConfig>,
    pub(crate) mapping: Mapping,
    pub(crate) buffers_per_slot: u32,
    /// Request size in KiB (`--block-kib` when `None`).
    pub(crate) block_kib: Option<u32>,
    /// IOTLB entries of our back-end (`--iotlb-capacity` when `None`).
    pub(crate) capacity: Option<usize>,
    /// Dirty logging on, as while migrating: the front-end shares a log and takes its pages
    /// every [`LOG_SYNC`].
    pub(crate) dirty_log: bool,
    /// The workload its ratio is against: the same without what this one measures (no
    /// IOMMU, same request size; `warm` for `log`).
    pub(crate) baseline: &'static str,
}

impl Workload {
    /// A workload of `--block-kib` requests against `off`.
    pub(crate) fn new(
        name: &'static str,
        viommu: Option<ViommuConfig>,
        mapping: Mapping,
        buffers_per_slot: u32,
    ) -> Self {
        Workload {
            name,
            viommu,
            mapping,
            buffers_per_slot,
            block_kib: None,
            capacity: None,
            dirty_log: false,
            baseline: "off",
        }
    }

    /// The same with 1 MiB requests, against `off-1m`.
    pub(crate) fn big(self) -> Self {
        Workload {
            block_kib: Some(1024),
            baseline: "off-1m",
            ..self
        }
    }

    pub(crate) fn block_kib(&self, args: &E2eArgs) -> u32 {
        self.block_kib.unwrap_or(args.block_kib)
    }

    pub(crate) fn capacity(&self, args: &E2eArgs) -> usize {
        self.capacity.unwrap_or(args.iotlb_capacity)
    }
}

/// IOTLB entries of the `small-tlb` workload.
pub(crate) const SMALL_TLB: usize = 16;

/// How often the front-end takes the pages of the dirty log in `log` (a migration syncs the
/// log once per pass over guest memory; QEMU's passes over a small guest take milliseconds
/// to tens of them).
pub(crate) const LOG_SYNC: Duration = Duration::from_millis(20);

pub(crate) fn workloads(args: &E2eArgs) -> Vec<Workload> {
    let strict = ViommuConfig::default();
    let depth = u32::from(args.depth.max(1));
    let thrash_buffers = (4 * args.iotlb_capacity as u32).div_ceil(depth);
    // As QEMU answers: one page per UPDATE, each acknowledged before the next goes.
    let strict_4k = ViommuConfig {
        max_update: 4096,
        ack_answers: true,
        ..strict
    };
    let all = vec![
        Workload::new("off", None, Mapping::Persistent, 1),
        Workload::new("warm", Some(strict), Mapping::Persistent, 1),
        // Next to `warm`, its baseline, so that their rounds run seconds apart.
        Workload {
            dirty_log: true,
            baseline: "warm",
            ..Workload::new("log", Some(strict), Mapping::Persistent, 1)
        },
        Workload::new("strict", Some(strict), Mapping::PerRequest, 1),
        Workload::new(
            "lazy",
            Some(ViommuConfig {
                invalidation: Invalidation::Lazy { batch: 256 },
                ..strict
            }),
            Mapping::PerRequest,
            1,
        ),
        Workload::new("thrash", Some(strict), Mapping::Persistent, thrash_buffers),
        Workload::new(
            "prepush",
            Some(ViommuConfig {
                prepush: true,
                ..strict
            }),
            Mapping::PerRequest,
            1,
        ),
        Workload::new("strict-4k", Some(strict_4k), Mapping::PerRequest, 1),
        Workload::new("off-1m", None, Mapping::Persistent, 1).big(),
        Workload::new("big", Some(strict_4k), Mapping::PerRequest, 1).big(),
        Workload {
            capacity: Some(SMALL_TLB),
            ..Workload::new("small-tlb", Some(strict_4k), Mapping::PerRequest, 1).big()
        },
    ];
    // `off` always runs, and a baseline runs when a workload measured against it does, and
    // so does its own baseline (`log` brings `warm`, which brings `off`).
    let chosen = |name: &str| args.workloads.is_empty() || args.workloads.iter().any(|n| n == name);
    let mut needed: Vec<&'static str> = std::iter::once("off")
        .chain(all.iter().filter(|w| chosen(w.name)).map(|w| w.name))
        .collect();
    let mut i = 0;
    while let Some(&name) = needed.get(i) {
        let baseline = all.iter().find(|w| w.name == name).map(|w| w.baseline);
        if let Some(b) = baseline.filter(|b| !needed.contains(b)) {
            needed.push(b);
        }
        i += 1;
    }
    all.into_iter()
        .filter(|w| needed.contains(&w.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        e2e: E2eArgs,
    }

    fn names(argv: &[&str]) -> Vec<&'static str> {
        let args = Cli::parse_from(std::iter::once("bench").chain(argv.iter().copied())).e2e;
        workloads(&args).iter().map(|w| w.name).collect()
    }

    #[test]
    fn a_workload_brings_its_baseline_and_the_baseline_its_own() {
        assert_eq!(names(&["--workloads", "log"]), ["off", "warm", "log"]);
        assert_eq!(names(&["--workloads", "warm,log"]), ["off", "warm", "log"]);
        assert_eq!(names(&["--workloads", "big"]), ["off", "off-1m", "big"]);
        assert_eq!(names(&["--workloads", "off"]), ["off"]);
        let all = names(&[]);
        assert!(all.contains(&"log") && all.len() == 11, "{all:?}");
        // Every baseline is a workload of the table, of the same request size.
        let args = Cli::parse_from(["bench"]).e2e;
        let table = workloads(&args);
        for w in &table {
            let b = table.iter().find(|b| b.name == w.baseline).unwrap();
            assert_eq!(b.block_kib(&args), w.block_kib(&args), "{}", w.name);
        }
        let log = table.iter().find(|w| w.name == "log").unwrap();
        let warm = table.iter().find(|w| w.name == "warm").unwrap();
        assert!(log.dirty_log && !warm.dirty_log && log.baseline == "warm");
        assert_eq!((log.mapping, log.buffers_per_slot), (warm.mapping, 1));
        assert_eq!(format!("{:?}", log.viommu), format!("{:?}", warm.viommu));
    }
}
