//! Look-ahead: when a queue misses, the MISSes of the next available chains are sent at once
//! (without consuming them), so that the front-end answers a burst in one round trip; a
//! bounded share of the IOTLB, so that the answers do not evict one another.

use std::time::Instant;

use iotlb::Access;
use virtq::{Fault, Translator};

use super::{QueueState, Runner, PAGE};
use crate::device::Device;

/// Available chains looked at for misses to send ahead.
pub(super) const PREFETCH_CHAINS: u16 = 32;
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
            let walked: Vec<iotlb::IovaRange> = w.queue.walked().to_vec();
            for ahead in 0..PREFETCH_CHAINS {
                let Ok(Some(head)) = w.queue.peek_head(tr, gm, ahead) else {
                    break;
                };
                bufs.clear();
                let visited = w.queue.visit_buffers(tr, gm, head, |addr, len, write| {
                    bufs.push((addr, len, write));
                    bufs.len() < 64
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
                    // (Only the chain being walked kept anything.)
                    let walked: &[iotlb::IovaRange] = if ahead == 0 { &walked } else { &[] };
                    while wanted.len() < budget {
                        if let Some(r) = walked.iter().find(|r| r.contains(cur)) {
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
                        if walked.iter().any(|r| r.contains(iova)) {
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
