//! Hit-lookup timing: ours, vm-memory's and a linear list, on the same mappings and queries.
//!
//! Each implementation holds `entries` mappings of 4 KiB pages (every other page, so that
//! there are gaps) and translates the same pseudo-random 16-byte reads, all hits. Used by the
//! criterion bench (for statistics) and by `vhost-iotlb bench --iotlb` (for a quick table).

use std::hint::black_box;
use std::time::Instant;

use super::baselines::{LinearIotlb, VmMemoryIotlb};
use super::traces::SplitMix;
use crate::{Access, Iotlb, IovaRange, Mapping, Perm};

/// Bytes per lookup.
pub const LOOKUP_LEN: u64 = 16;
/// First IOVA of the benchmark's mappings.
const BASE: u64 = 0x1_0000_0000;

/// The same mappings in each implementation, and the queries to run.
pub struct LookupSetup {
    /// Ours (capacity = number of entries, so nothing is evicted).
    pub ours: Iotlb,
    /// vm-memory 0.18.
    pub vm_memory: VmMemoryIotlb,
    /// DPDK-style linear list.
    pub linear: LinearIotlb,
    /// IOVAs to translate, each a hit in all three.
    pub queries: Vec<u64>,
}

impl LookupSetup {
    /// `entries` mappings (>= 1) and `nqueries` queries.
    pub fn new(entries: usize, nqueries: usize, seed: u64) -> Self {
        let entries = entries.max(1);
        let mut ours = Iotlb::with_capacity(entries).unwrap_or_default();
        let mut vm_memory = VmMemoryIotlb::new();
        let mut linear = LinearIotlb::new();
        for i in 0..entries as u64 {
            let start = BASE + i * 0x2000;
            let Ok(range) = IovaRange::new(start, start + 0xfff) else {
                continue;
            };
            let m = Mapping {
                range,
                target: 0x7f00_0000_0000 + i * 0x1000,
                perm: Perm::ReadWrite,
            };
            // The target range is small and far from 2^64: cannot fail.
            let _ = ours.update(m.range, m.target, m.perm);
            vm_memory.update(&m);
            linear.update(&m);
        }
        let mut rng = SplitMix::new(seed);
        let queries = (0..nqueries.max(1))
            .map(|_| {
                let i = rng.below(entries as u64);
                BASE + i * 0x2000 + rng.below(0x1000 - LOOKUP_LEN)
            })
            .collect();
        LookupSetup {
            ours,
            vm_memory,
            linear,
            queries,
        }
    }
}

/// Which implementation to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// Our `Iotlb::translate`.
    Ours,
    /// Our cache with its hint table bypassed: the ordered-index path alone.
    OursIndexOnly,
    /// vm-memory's `Iotlb::lookup` plus the first segment.
    VmMemory,
    /// The linear list.
    Linear,
}

/// One lookup of `iova` in `which`; returns the target so the work cannot be optimised out.
#[inline]
pub fn lookup_once(setup: &LookupSetup, which: Impl, iova: u64) -> u64 {
    match which {
        Impl::Ours => setup
            .ours
            .translate(iova, LOOKUP_LEN, Access::Read)
            .map_or(0, |s| s.as_slice().first().map_or(0, |s| s.addr)),
        Impl::OursIndexOnly => setup
            .ours
            .translate_index_only(iova, LOOKUP_LEN, Access::Read)
            .map_or(0, |s| s.addr),
        Impl::VmMemory => setup
            .vm_memory
            .translate_first(iova, LOOKUP_LEN as usize, Access::Read)
            .map_or(0, |s| s.addr),
        Impl::Linear => setup
            .linear
            .translate_first(iova, LOOKUP_LEN, Access::Read)
            .map_or(0, |s| s.addr),
    }
}

/// Nanoseconds per lookup: the best of `repeats` passes of at least `min_lookups` lookups.
pub fn ns_per_lookup(setup: &LookupSetup, which: Impl, min_lookups: usize, repeats: usize) -> f64 {
    let q = &setup.queries;
    let passes = min_lookups.div_ceil(q.len()).max(1);
    let mut sink = 0u64;
    for &iova in q {
        sink = sink.wrapping_add(lookup_once(setup, which, iova));
    }
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        for _ in 0..passes {
            for &iova in q {
                sink = sink.wrapping_add(lookup_once(setup, which, black_box(iova)));
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (passes * q.len()) as f64;
        best = best.min(ns);
    }
    black_box(sink);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_agree_on_every_query() {
        let s = LookupSetup::new(256, 2000, 9);
        for &q in &s.queries {
            let a = lookup_once(&s, Impl::Ours, q);
            assert_ne!(a, 0);
            assert_eq!(a, lookup_once(&s, Impl::OursIndexOnly, q));
            assert_eq!(a, lookup_once(&s, Impl::VmMemory, q));
            assert_eq!(a, lookup_once(&s, Impl::Linear, q));
        }
    }
}
