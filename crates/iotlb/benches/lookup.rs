//! Criterion benchmarks of the IOTLB, each beside its baselines in the same run:
//!
//! - `hit_lookup/{entries}/{impl}`: a 16-byte hit at 16, 256 and 2048 entries in our `Iotlb`
//!   (with and without its hint table), vm-memory 0.18's `Iotlb`, and a DPDK-style linear list;
//! - `update`: an UPDATE plus INVALIDATE pair in a cache of 2048 entries, and an UPDATE into
//!   a full cache (with eviction);
//! - `concurrent/{readers}`: hits through worker handles on 1 and 2 threads while a writer
//!   applies an UPDATE or INVALIDATE every 20 us (each INVALIDATE empties the handles'
//!   caches); time per lookup per reader thread.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use iotlb::bench_support::lookup::{lookup_once, Impl, LookupSetup, LOOKUP_LEN};
use iotlb::bench_support::traces::SplitMix;
use iotlb::{Access, Iotlb, IovaRange, Perm, SharedIotlb};

/// Pause between two writer operations in the concurrent benchmark.
const WRITER_PERIOD: Duration = Duration::from_micros(20);

fn page(i: u64) -> IovaRange {
    IovaRange::from_size(0x1_0000_0000 + i * 0x2000, 0x1000).unwrap()
}

fn hit_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit_lookup");
    for entries in [16usize, 256, 2048] {
        let setup = LookupSetup::new(entries, 4096, 0xb0b);
        for (name, which) in [
            ("ours", Impl::Ours),
            ("ours_index_only", Impl::OursIndexOnly),
            ("vm_memory", Impl::VmMemory),
            ("linear", Impl::Linear),
        ] {
            g.bench_with_input(BenchmarkId::new(name, entries), &which, |b, &which| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) & 4095;
                    lookup_once(&setup, which, black_box(setup.queries[i]))
                })
            });
        }
    }
    g.finish();
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    let mut t = Iotlb::with_capacity(4096).unwrap();
    for i in 0..2048 {
        t.update(page(i), i << 12, Perm::ReadWrite).unwrap();
    }
    let mut rng = SplitMix::new(1);
    g.bench_function("update_invalidate_2048", |b| {
        b.iter(|| {
            let p = page(4096 + rng.below(2048));
            t.update(p, 0x1000, Perm::ReadOnly).unwrap();
            t.invalidate(p);
        })
    });
    let mut full = Iotlb::with_capacity(2048).unwrap();
    let mut next = 0u64;
    g.bench_function("update_with_eviction_2048", |b| {
        b.iter(|| {
            next += 1;
            full.update(page(next), next << 12, Perm::ReadWrite)
                .unwrap();
        })
    });
    g.finish();
}

fn concurrent(c: &mut Criterion) {
    let mut g = c.benchmark_group("concurrent");
    for readers in [1usize, 2] {
        g.bench_function(BenchmarkId::from_parameter(readers), |b| {
            b.iter_custom(|iters| {
                let shared: SharedIotlb<u32> = SharedIotlb::new(Iotlb::new());
                for i in 0..2048 {
                    shared.update(page(i), i << 12, Perm::ReadWrite).unwrap();
                }
                let stop = Arc::new(AtomicBool::new(false));
                let writer = {
                    let (shared, stop) = (shared.clone(), stop.clone());
                    thread::spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let p = page(1_000_000 + n % 64);
                            if n % 2 == 0 {
                                shared.update(p, 0x1000, Perm::ReadOnly).unwrap();
                            } else {
                                shared.invalidate(p);
                            }
                            n += 1;
                            thread::sleep(WRITER_PERIOD);
                        }
                    })
                };
                let start = Arc::new(Barrier::new(readers));
                let handles: Vec<_> = (0..readers)
                    .map(|r| {
                        let (shared, start) = (shared.clone(), start.clone());
                        thread::spawn(move || {
                            let mut h = shared.handle();
                            let mut rng = SplitMix::new(r as u64);
                            // Each reader works on a hot set, as a queue does.
                            let q: Vec<u64> = (0..256)
                                .map(|_| {
                                    page(rng.below(2048)).start() + rng.below(0x1000 - LOOKUP_LEN)
                                })
                                .collect();
                            start.wait();
                            let t = Instant::now();
                            for i in 0..iters as usize {
                                let _ =
                                    black_box(h.translate(q[i & 255], LOOKUP_LEN, Access::Read));
                            }
                            t.elapsed()
                        })
                    })
                    .collect();
                let slowest = handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .max()
                    .unwrap_or_default();
                stop.store(true, Ordering::Relaxed);
                writer.join().unwrap();
                slowest
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = hit_lookup, update, concurrent
}
criterion_main!(benches);
