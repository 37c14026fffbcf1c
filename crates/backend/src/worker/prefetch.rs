//! Look-ahead: when a queue misses, the MISSes of the next available chains are sent at once
//! (without consuming them), so that the front-end answers a burst in one round trip; a
//! bounded share of the IOTLB, so that the answers do not evict one another.

use std::time::Instant;

use iotlb::{Access, IovaRange};
use virtq::{Fault, Translator};

use super::{QueueState, Runner, PAGE};
use crate::device::Device;

/// Available chains looked at for misses to send ahead.
pub(super) const PREFETCH_CHAINS: u16 = 32;
/// Buffers of one chain looked at (those the walk already translated not counted).
pub(super) const PREFETCH_BUFFERS: usize = 64;
/// Most MISSes sent ahead at once.
pub(super) const PREFETCH_MISSES: usize = 96;
/// Of the IOTLB's entries, the share one queue's MISSes sent ahead may fill: their answers
/// must not evict one another (or the page the queue waits for) before the queue gets there.
/// The IOTLB protects its newest `min(capacity / 2, 32)` entries.
pub(super) const PREFETCH_SHARE: usize = 4;

/// MISSes one of `queues` queues may send ahead with an IOTLB of `capacity` entries.
pub(super) fn prefetch_budget(capacity: usize, queues: u16) -> usize {
    (capacity / (PREFETCH_SHARE * usize::from(queues.max(1)))).clamp(1, PREFETCH_MISSES)
}

/// The IOVA ranges a walk translated and keeps, sorted and merged, to be looked up by
/// address (a chain of a few hundred buffers is looked at on each of its misses).
pub(super) struct Walked {
    ranges: Vec<IovaRange>,
}

impl Walked {
    /// Nothing walked.
    pub(super) const NONE: Walked = Walked { ranges: Vec::new() };

    pub(super) fn new(walked: &[IovaRange]) -> Self {
        let mut sorted = walked.to_vec();
        sorted.sort_unstable_by_key(IovaRange::start);
        let mut ranges: Vec<IovaRange> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match ranges.last_mut() {
                // Overlapping or adjacent: one range (saturating: nothing lies after a
                // range that ends at the top of the address space).
                Some(prev) if r.start() <= prev.last().saturating_add(1) => {
                    if r.last() > prev.last() {
                        *prev = IovaRange::new(prev.start(), r.last()).unwrap_or(*prev);
                    }
                }
                _ => ranges.push(r),
            }
        }
        Walked { ranges }
    }

    /// The walked range holding `iova`, if any.
    pub(super) fn covering(&self, iova: u64) -> Option<&IovaRange> {
        let after = self.ranges.partition_point(|r| r.start() <= iova);
        after
            .checked_sub(1)
            .map(|i| &self.ranges[i])
            .filter(|r| r.contains(iova))
    }

    /// Whether the walk translated all `len` bytes at `addr` (an empty buffer: nothing to
    /// ask for either).
    pub(super) fn covers(&self, addr: u64, len: u32) -> bool {
        let Some(last) = u64::from(len).checked_sub(1) else {
            return true;
        };
        match (self.covering(addr), addr.checked_add(last)) {
            (Some(r), Some(end)) => r.last() >= end,
            _ => false,
        }
    }
}

impl<D: Device> Runner<D> {
    /// Find the pages the next [`PREFETCH_CHAINS`] available chains (the one that just
    /// missed first) will miss on, without consuming anything, and send their MISSes now:
    /// the front-end answers a burst in one round trip where walking chain by chain would
    /// cost one round trip per missing page. At most [`prefetch_budget`] pages; the page of
    /// `first` (already sent) is skipped. The pages are registered *ahead* (no waiter: their
    /// UPDATEs wake nobody, the queue still waits for `first` only), so when the queue reaches
    /// one it joins the outstanding MISS instead of sending a second; one that is never
    /// answered times out like any other once the queue reaches it.
    pub(super) fn prefetch(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
        first: u64,
    ) {
        if !self.cfg.iommu {
            return;
        }
        let page = |a: u64| a & !(PAGE - 1);
        let budget = prefetch_budget(self.shared.iotlb_capacity, self.shared.dev.queues());
        let mut wanted: Vec<(u64, Access)> = Vec::new();
        self.section(|gm| {
            let mut seg = Vec::new();
            let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
            // What the walk of the chain that missed already translated and keeps: never
            // asked for again (its entries may be evicted by now; asking would evict the
            // pages still ahead).
            let walked = Walked::new(w.queue.walked());
            for ahead in 0..PREFETCH_CHAINS {
                let Ok(Some(head)) = w.queue.peek_head(tr, gm, ahead) else {
                    break;
                };
                // (Only the chain being walked kept anything.)
                let walked = if ahead == 0 { &walked } else { &Walked::NONE };
                bufs.clear();
                // Buffers the walk already translated do not count: a chain longer than
                // the look-ahead gets its next buffers asked for at each miss, not its
                // first ones again.
                let visited = w.queue.visit_buffers(tr, gm, head, |addr, len, write| {
                    if !walked.covers(addr, len) {
                        bufs.push((addr, len, write));
                    }
                    bufs.len() < PREFETCH_BUFFERS
                });
                for &(addr, len, write) in &bufs {
                    let access = if write { Access::Write } else { Access::Read };
                    let Some(last) = u64::from(len)
                        .checked_sub(1)
                        .and_then(|l| addr.checked_add(l))
                    else {
                        continue;
                    };
                    let mut cur = addr;
                    while wanted.len() < budget {
                        if let Some(r) = walked.covering(cur) {
                            match r.last().checked_add(1) {
                                Some(next) if next <= last => {
                                    cur = next;
                                    continue;
                                }
                                _ => break,
                            }
                        }
                        seg.clear();
                        let Err(Fault::Miss { iova, access }) =
                            tr.translate(cur, last - cur + 1, access, &mut seg)
                        else {
                            break;
                        };
                        if walked.covering(iova).is_some() {
                            cur = iova;
                            continue;
                        }
                        if page(iova) != page(first)
                            && !wanted
                                .iter()
                                .any(|&(i, a)| page(i) == page(iova) && a == access)
                        {
                            wanted.push((iova, access));
                        }
                        match (iova | (PAGE - 1)).checked_add(1) {
                            Some(next) if next <= last => cur = next,
                            _ => break,
                        }
                    }
                }
                if visited.is_err() || wanted.len() >= budget {
                    break;
                }
            }
        });
        // The front-end has not read our MISS yet, after all that scanning (a socket
        // hand-off takes a few microseconds): its thread is likely waiting for this CPU. Let
        // it have it now, not after registering and sending the rest. On the 2-core bench
        // this takes the round trip p50 from about 30 us to under 20 us in the runs where
        // the scheduler put the two threads together, for about 5 % of lazy and thrash IOPS.
        if self.shared.channel.peer_behind() {
            std::thread::yield_now();
        }
        let now = Instant::now();
        let found = wanted.len();
        self.shared.iotlb.register_ahead(&mut wanted, now);
        tracing::trace!(
            queue = self.cfg.index,
            found,
            new = wanted.len(),
            "vhost-user: misses ahead"
        );
        if wanted.is_empty() {
            return;
        }
        // One write for all of them, never blocking. A batch that did not go out is
        // forgotten, so the queue sends each MISS itself when it reaches the page.
        let sent = self
            .shared
            .channel
            .misses_ahead(&self.shared.stats, self.cfg.index, &wanted);
        if !sent {
            // A queue that joined one of them meanwhile waits for a MISS that never went
            // out: wake it to walk again and send its own.
            for &(iova, access) in &wanted {
                for q in self.shared.iotlb.unregister_ahead(iova, access) {
                    self.shared.wakers.wake(q);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    #[test]
    fn walked_ranges_are_merged_and_found_by_address() {
        // Out of order (a driver's IOVAs go down), overlapping and adjacent.
        let w = Walked::new(&[
            r(0x5000, 0x5fff),
            r(0x1000, 0x1fff),
            r(0x2000, 0x2fff),
            r(0x1800, 0x27ff),
        ]);
        assert_eq!(w.ranges, vec![r(0x1000, 0x2fff), r(0x5000, 0x5fff)]);
        assert_eq!(w.covering(0x2abc), Some(&r(0x1000, 0x2fff)));
        assert_eq!(w.covering(0x5fff), Some(&r(0x5000, 0x5fff)));
        assert_eq!(w.covering(0xfff), None);
        assert_eq!(w.covering(0x3000), None);
        assert_eq!(w.covering(u64::MAX), None);
    }

    #[test]
    fn a_buffer_is_covered_only_when_every_byte_was_walked() {
        let w = Walked::new(&[r(0x1000, 0x2fff), r(u64::MAX - 0xfff, u64::MAX)]);
        assert!(w.covers(0x1000, 0x2000));
        assert!(!w.covers(0x1000, 0x2001));
        assert!(!w.covers(0xfff, 2));
        assert!(w.covers(u64::MAX - 0xff, 0x100));
        // Past the end of the address space: never covered (and no overflow).
        assert!(!w.covers(u64::MAX, 2));
        // Nothing to ask for in an empty buffer.
        assert!(w.covers(0x9000, 0));
        assert!(!Walked::NONE.covers(0x1000, 1));
    }
}
