//! Deterministic access traces and the FIFO and random caches our eviction is compared with.
//!
//! A trace is a sequence of page numbers. Every policy replays the same trace: a hit when the
//! page is cached, otherwise the page is inserted (as the UPDATE answering a MISS would).
//! Our IOTLB replays it for real (translate, then update on a miss); FIFO and random are
//! small reference caches written here. Hit rates are counted after a warm-up.

use std::collections::{HashMap, VecDeque};

use crate::{Access, Iotlb, IovaRange, Perm};

/// A small, fast, seeded generator (SplitMix64): same seed, same trace, on every machine.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `len` accesses to `items` pages with Zipf popularity of exponent `skew`; the popularity
/// ranks are shuffled over the pages so that hot pages are not adjacent.
pub fn zipf(items: usize, skew: f64, len: usize, seed: u64) -> Vec<u64> {
    let items = items.max(1);
    let mut rng = SplitMix::new(seed);
    let mut cdf = Vec::with_capacity(items);
    let mut acc = 0.0;
    for k in 1..=items {
        acc += 1.0 / (k as f64).powf(skew);
        cdf.push(acc);
    }
    let mut page_of_rank: Vec<u64> = (0..items as u64).collect();
    for i in (1..items).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        page_of_rank.swap(i, j);
    }
    (0..len)
        .map(|_| {
            let u = rng.next_f64() * acc;
            let rank = cdf.partition_point(|&c| c < u).min(items - 1);
            page_of_rank[rank]
        })
        .collect()
}

/// `len` accesses sweeping `items` pages in order, over and over.
pub fn scan(items: usize, len: usize) -> Vec<u64> {
    let items = items.max(1) as u64;
    (0..len as u64).map(|i| i % items).collect()
}

/// Half the accesses sweep `items` pages in order, the other half hit a hot set of `hot`
/// other pages at random (rings and metadata in use while a large transfer streams by).
pub fn scan_with_hot(items: usize, hot: usize, len: usize, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix::new(seed);
    let items = items.max(1) as u64;
    (0..len as u64)
        .map(|i| {
            if i % 2 == 0 {
                items + rng.below(hot as u64)
            } else {
                (i / 2) % items
            }
        })
        .collect()
}

/// A cache replaying a trace of pages.
pub trait PageCache {
    /// Access `page`; true on a hit. A miss inserts it.
    fn access(&mut self, page: u64) -> bool;
}

/// First in, first out, as Linux evicts.
#[derive(Debug)]
pub struct FifoCache {
    cap: usize,
    order: VecDeque<u64>,
    present: HashMap<u64, ()>,
}

impl FifoCache {
    /// Empty, holding at most `cap` pages.
    pub fn new(cap: usize) -> Self {
        FifoCache {
            cap: cap.max(1),
            order: VecDeque::new(),
            present: HashMap::new(),
        }
    }
}

impl PageCache for FifoCache {
    fn access(&mut self, page: u64) -> bool {
        if self.present.contains_key(&page) {
            return true;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.present.remove(&old);
            }
        }
        self.order.push_back(page);
        self.present.insert(page, ());
        false
    }
}

/// Random eviction, as DPDK does.
#[derive(Debug)]
pub struct RandomCache {
    cap: usize,
    pages: Vec<u64>,
    slot_of: HashMap<u64, usize>,
    rng: SplitMix,
}

impl RandomCache {
    /// Empty, holding at most `cap` pages.
    pub fn new(cap: usize, seed: u64) -> Self {
        RandomCache {
            cap: cap.max(1),
            pages: Vec::new(),
            slot_of: HashMap::new(),
            rng: SplitMix::new(seed),
        }
    }
}

impl PageCache for RandomCache {
    fn access(&mut self, page: u64) -> bool {
        if self.slot_of.contains_key(&page) {
            return true;
        }
        if self.pages.len() < self.cap {
            self.slot_of.insert(page, self.pages.len());
            self.pages.push(page);
        } else {
            let i = self.rng.below(self.cap as u64) as usize;
            self.slot_of.remove(&self.pages[i]);
            self.pages[i] = page;
            self.slot_of.insert(page, i);
        }
        false
    }
}

/// Our IOTLB replaying a trace of 4 KiB pages: translate, and UPDATE the page on a miss.
#[derive(Debug)]
pub struct OurCache {
    tlb: Iotlb,
}

impl OurCache {
    /// Empty, holding at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        OurCache {
            tlb: Iotlb::with_capacity(cap.max(1)).unwrap_or_default(),
        }
    }

    /// The IOTLB inside.
    pub fn iotlb(&self) -> &Iotlb {
        &self.tlb
    }
}

impl PageCache for OurCache {
    fn access(&mut self, page: u64) -> bool {
        let iova = page << 12;
        if self.tlb.translate(iova, 8, Access::Read).is_ok() {
            return true;
        }
        if let Ok(range) = IovaRange::new(iova, iova | 0xfff) {
            // Cannot fail: the target range is the IOVA range itself.
            let _ = self.tlb.update(range, iova, Perm::ReadWrite);
        }
        false
    }
}

/// Hit rate of `cache` over `trace`, not counting the first `warmup` accesses.
pub fn hit_rate(cache: &mut dyn PageCache, trace: &[u64], warmup: usize) -> f64 {
    let mut hits = 0usize;
    for (i, &page) in trace.iter().enumerate() {
        if cache.access(page) && i >= warmup {
            hits += 1;
        }
    }
    let counted = trace.len().saturating_sub(warmup);
    if counted == 0 {
        0.0
    } else {
        hits as f64 / counted as f64
    }
}

/// Hit rates of ours, FIFO and random on one trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HitRates {
    /// Our IOTLB.
    pub ours: f64,
    /// FIFO eviction (Linux).
    pub fifo: f64,
    /// Random eviction (DPDK).
    pub random: f64,
}

/// Replay `trace` through all three policies at capacity `cap`.
pub fn compare(cap: usize, trace: &[u64], warmup: usize) -> HitRates {
    HitRates {
        ours: hit_rate(&mut OurCache::new(cap), trace, warmup),
        fifo: hit_rate(&mut FifoCache::new(cap), trace, warmup),
        random: hit_rate(&mut RandomCache::new(cap, 0x5eed), trace, warmup),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_deterministic_and_in_range() {
        let a = zipf(100, 0.9, 1000, 1);
        assert_eq!(a, zipf(100, 0.9, 1000, 1));
        assert!(a.iter().all(|&p| p < 100));
        assert_ne!(a, zipf(100, 0.9, 1000, 2));
        assert_eq!(scan(3, 7), vec![0, 1, 2, 0, 1, 2, 0]);
        let h = scan_with_hot(10, 4, 100, 3);
        assert!(h.iter().step_by(2).all(|&p| (10..14).contains(&p)));
    }

    #[test]
    fn reference_caches_behave() {
        let mut f = FifoCache::new(2);
        assert!(!f.access(1) && !f.access(2) && f.access(1));
        assert!(!f.access(3)); // evicts 1 (first in), not 2
        assert!(!f.access(1) && !f.access(2));
        let mut r = RandomCache::new(2, 1);
        assert!(!r.access(1) && r.access(1));
        let mut o = OurCache::new(2);
        assert!(!o.access(5) && o.access(5));
        assert_eq!(hit_rate(&mut FifoCache::new(4), &scan(3, 30), 3), 1.0);
    }
}
