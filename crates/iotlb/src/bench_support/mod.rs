//! Baselines and workloads for measuring the IOTLB against others, in the same run.
//!
//! Behind the `bench-support` feature; used by the criterion benches and by
//! `vhost-iotlb bench --iotlb`, never by the data path:
//!
//! - [`baselines`]: vm-memory 0.18's `Iotlb` and a DPDK-style linear list, filled with the
//!   same mappings as ours;
//! - [`traces`]: deterministic access traces (Zipf, sequential scan) and the FIFO and random
//!   caches we compare our eviction with;
//! - [`lookup`]: the hit-lookup timing harness that prints ns per lookup.

pub mod baselines;
pub mod lookup;
pub mod traces;
