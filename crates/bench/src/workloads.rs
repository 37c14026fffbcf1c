//! The workload table of the end-to-end benchmark: what each workload sets (IOMMU or not,
//! the vIOMMU's configuration, how buffers are mapped, request size, IOTLB capacity, the
//! baseline its ratio is against) and which of them `--workloads` selects.
//!
//! This is data only: it must not start a back-end, connect, measure or report anything
//! (that is `run.rs` and `report.rs`).

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
    /// The workload its ratio is against: same request size, no IOMMU.
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
    // A baseline runs when a workload measured against it does.
    let chosen = |name: &str| args.workloads.is_empty() || args.workloads.iter().any(|n| n == name);
    let needed: Vec<&'static str> = all
        .iter()
        .filter(|w| chosen(w.name))
        .map(|w| w.baseline)
        .collect();
    all.into_iter()
        .filter(|w| w.name == "off" || chosen(w.name) || needed.contains(&w.name))
        .collect()
}
