//! Pending-miss table: which queues wait for which IOVA, and whether a MISS must be sent.
//!
//! A queue whose translation missed registers `(iova, access, waiter)`. Misses are keyed by
//! 4 KiB page and access direction, so any number of queues missing on the same page produce
//! **one** MISS (the first registration is told to send it; the others are coalesced), and no
//! second MISS goes out for that page until the caller decides the first one timed out.
//!
//! An UPDATE wakes every waiter whose own missing byte it covers, with an inclusive end: an
//! UPDATE whose last byte is the missing byte covers it (Linux once compared with an exclusive
//! end and left queues stalled forever). Waking does not look at the UPDATE's permission: a
//! woken queue walks its chain again and gets a hit, a denial, or a miss further on.
//!
//! The table only keeps books. It never sends, never sleeps and never reads the clock: the
//! caller passes `now`, which keeps timeouts testable.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::range::{Access, IovaRange};

/// Granule of miss coalescing: the smallest IOMMU page.
pub const MISS_PAGE_SIZE: u64 = 4096;

/// What the caller must do after registering a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// First waiter for this page and access: send a MISS for `iova` now.
    Send {
        /// The IOVA to put in the MISS (the exact byte that missed).
        iova: u64,
        /// The access the MISS asks for.
        access: Access,
    },
    /// A MISS for this page and access is already outstanding: just park.
    Coalesced,
}

/// One outstanding miss, as reported by [`PendingMisses::expired`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMiss<W> {
    /// The page (aligned to [`MISS_PAGE_SIZE`]) the miss is keyed by.
    pub page: u64,
    /// The access direction.
    pub access: Access,
    /// The IOVA sent in the MISS.
    pub miss_iova: u64,
    /// When the MISS was last sent.
    pub sent_at: Instant,
    /// How many MISS messages went out for it so far.
    pub sends: u32,
    /// Who waits.
    pub waiters: Vec<W>,
}

#[derive(Debug)]
struct Entry<W> {
    miss_iova: u64,
    sent_at: Instant,
    sends: u32,
    /// Each waiter with the byte it missed on.
    waiters: Vec<(W, u64)>,
}

/// The pending-miss table. `W` identifies a waiter (a queue, say).
#[derive(Debug)]
pub struct PendingMisses<W> {
    entries: BTreeMap<(u64, Access), Entry<W>>,
    sent: u64,
    coalesced: u64,
}

impl<W> Default for PendingMisses<W> {
    fn default() -> Self {
        PendingMisses {
            entries: BTreeMap::new(),
            sent: 0,
            coalesced: 0,
        }
    }
}

fn page_of(iova: u64) -> u64 {
    iova & !(MISS_PAGE_SIZE - 1)
}

impl<W: Clone + PartialEq> PendingMisses<W> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// `waiter` missed on `iova` for `access`. Tells whether to send a MISS or just park.
    ///
    /// The same waiter registering again for the same page and access is not added twice.
    pub fn register(&mut self, iova: u64, access: Access, waiter: W, now: Instant) -> Registration {
        let key = (page_of(iova), access);
        match self.entries.get_mut(&key) {
            Some(e) => {
                if !e.waiters.iter().any(|(w, _)| *w == waiter) {
                    e.waiters.push((waiter, iova));
                }
                self.coalesced += 1;
                Registration::Coalesced
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        miss_iova: iova,
                        sent_at: now,
                        sends: 1,
                        waiters: vec![(waiter, iova)],
                    },
                );
                self.sent += 1;
                Registration::Send { iova, access }
            }
        }
    }

    /// An UPDATE of `range` arrived: remove and return every waiter whose missing byte it
    /// covers (inclusive end). Entries left without waiters are dropped.
    pub fn resolve(&mut self, range: IovaRange) -> Vec<W> {
        let mut woken = Vec::new();
        let lo = (page_of(range.start()), Access::Read);
        let hi = (page_of(range.last()), Access::Write);
        let mut emptied = Vec::new();
        for (key, e) in self.entries.range_mut(lo..=hi) {
            e.waiters.retain(|(w, iova)| {
                let hit = range.contains(*iova);
                if hit {
                    woken.push(w.clone());
                }
                !hit
            });
            if e.waiters.is_empty() {
                emptied.push(*key);
            }
        }
        for key in emptied {
            self.entries.remove(&key);
        }
        woken
    }

    /// Forget every registration of `waiter` (its queue was stopped or reset). Returns how
    /// many were dropped.
    pub fn cancel(&mut self, waiter: &W) -> usize {
        let mut dropped = 0;
        self.entries.retain(|_, e| {
            let before = e.waiters.len();
            e.waiters.retain(|(w, _)| w != waiter);
            dropped += before - e.waiters.len();
            !e.waiters.is_empty()
        });
        dropped
    }

    /// Every outstanding miss whose MISS was last sent before `deadline`, oldest page first.
    /// The caller resends ([`PendingMisses::resent`]) or fails ([`PendingMisses::remove`]) them.
    pub fn expired(&self, deadline: Instant) -> Vec<PendingMiss<W>> {
        self.entries
            .iter()
            .filter(|(_, e)| e.sent_at < deadline)
            .map(|(&(page, access), e)| PendingMiss {
                page,
                access,
                miss_iova: e.miss_iova,
                sent_at: e.sent_at,
                sends: e.sends,
                waiters: e.waiters.iter().map(|(w, _)| w.clone()).collect(),
            })
            .collect()
    }

    /// The MISS for `page`/`access` was sent again at `now`. Returns false if it is no longer
    /// pending.
    pub fn resent(&mut self, page: u64, access: Access, now: Instant) -> bool {
        match self.entries.get_mut(&(page_of(page), access)) {
            Some(e) => {
                e.sent_at = now;
                e.sends = e.sends.saturating_add(1);
                self.sent += 1;
                true
            }
            None => false,
        }
    }

    /// Give up on `page`/`access`: remove it and return its waiters (to fail their requests).
    pub fn remove(&mut self, page: u64, access: Access) -> Vec<W> {
        self.entries
            .remove(&(page_of(page), access))
            .map(|e| e.waiters.into_iter().map(|(w, _)| w).collect())
            .unwrap_or_default()
    }

    /// Forget everything (disconnect).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Outstanding misses (page and access pairs).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// MISS messages the caller was told to send (first registrations and resends).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Registrations that joined an outstanding miss instead of sending one.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    #[test]
    fn first_waiter_sends_others_coalesce() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        assert_eq!(
            p.register(0x1234, Access::Read, 1u16, now),
            Registration::Send {
                iova: 0x1234,
                access: Access::Read
            }
        );
        assert_eq!(
            p.register(0x1ff0, Access::Read, 2, now),
            Registration::Coalesced
        );
        assert_eq!(
            p.register(0x1ff0, Access::Read, 2, now),
            Registration::Coalesced
        );
        // Other direction, other page: separate misses.
        assert!(matches!(
            p.register(0x1000, Access::Write, 3, now),
            Registration::Send { .. }
        ));
        assert!(matches!(
            p.register(0x2000, Access::Read, 4, now),
            Registration::Send { .. }
        ));
        assert_eq!((p.len(), p.sent(), p.coalesced()), (3, 3, 2));
    }

    #[test]
    fn update_wakes_with_inclusive_end() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x1fff, Access::Read, 'a', now);
        p.register(0x1800, Access::Write, 'b', now);
        p.register(0x3000, Access::Read, 'c', now);
        // Ends exactly on a's byte: covers it. Starts after b's byte: does not.
        let mut woken = p.resolve(r(0x1900, 0x1fff));
        woken.sort();
        assert_eq!(woken, vec!['a']);
        assert_eq!(p.resolve(r(0x0, 0x17ff)), Vec::<char>::new());
        assert_eq!(p.resolve(r(0x1800, 0x1800)), vec!['b']);
        assert_eq!(p.len(), 1);
        assert_eq!(p.resolve(IovaRange::FULL), vec!['c']);
        assert!(p.is_empty());
    }

    #[test]
    fn top_of_space_waiter() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(u64::MAX, Access::Write, 7u8, now);
        assert_eq!(p.resolve(r(u64::MAX - 0xfff, u64::MAX)), vec![7]);
    }

    #[test]
    fn coalesced_waiter_on_another_byte_waits_for_its_own_byte() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x1000, Access::Read, 1u8, now);
        p.register(0x1f00, Access::Read, 2, now);
        assert_eq!(p.resolve(r(0x1000, 0x17ff)), vec![1]);
        assert_eq!(p.len(), 1, "waiter 2 still pending");
        assert_eq!(p.resolve(r(0x1800, 0x1fff)), vec![2]);
    }

    #[test]
    fn cancel_drops_only_that_waiter() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x1000, Access::Read, 1u8, now);
        p.register(0x1000, Access::Read, 2, now);
        p.register(0x5000, Access::Write, 1, now);
        assert_eq!(p.cancel(&1), 2);
        assert_eq!(p.len(), 1);
        assert_eq!(p.resolve(IovaRange::FULL), vec![2]);
        assert_eq!(p.cancel(&9), 0);
    }

    #[test]
    fn expired_resent_and_removed() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        let t2 = t0 + Duration::from_millis(1500);
        let mut p = PendingMisses::new();
        p.register(0x1000, Access::Read, 1u8, t0);
        p.register(0x2000, Access::Read, 2, t1);
        let old = p.expired(t0 + Duration::from_millis(400));
        assert_eq!(old.len(), 1);
        assert_eq!(
            (old[0].page, old[0].miss_iova, old[0].sends),
            (0x1000, 0x1000, 1)
        );
        assert!(p.resent(0x1000, Access::Read, t2));
        // Resent at t2: no longer older than the first deadline; 0x2000 (sent at t1) now is.
        let old = p.expired(t0 + Duration::from_millis(1000));
        assert_eq!(old.iter().map(|m| m.page).collect::<Vec<_>>(), vec![0x2000]);
        let old = p.expired(t2);
        assert_eq!(old.iter().map(|m| m.page).collect::<Vec<_>>(), vec![0x2000]);
        assert_eq!(p.remove(0x2000, Access::Read), vec![2]);
        assert!(!p.resent(0x2000, Access::Read, t2));
        assert_eq!(p.remove(0x2000, Access::Read), Vec::<u8>::new());
        p.clear();
        assert!(p.is_empty());
    }
}
