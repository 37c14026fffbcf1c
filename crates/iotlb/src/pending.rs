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
//! woken queue walks its chain again and gets a hit, a denial, or a miss further on. If the
//! UPDATE answered the outstanding MISS but left other waiters of that page uncovered (an
//! IOMMU side that answers with less than a page), the table asks for a MISS for one of their
//! bytes right away instead of letting them wait for the timeout.
//!
//! A waiter (a queue) waits for one miss at a time: registering again replaces its previous
//! registration, so a stale byte can neither hide a wake-up nor fail a later request.
//!
//! A MISS may also be sent **ahead**, for a page a queue will need soon but does not wait
//! for yet ([`PendingMisses::register_ahead`]): the entry has no waiter, so it neither wakes
//! nor fails anybody, but it keeps a second MISS for that page from going out while the first
//! is outstanding. A queue that reaches the page joins the entry as its waiter. An entry
//! that nobody joined is dropped when an UPDATE covers it or when its time is up
//! ([`PendingMisses::expire_unwaited`]); a waiter that leaves never takes it with it.
//!
//! The table only keeps books. It never sends, never sleeps and never reads the clock: the
//! caller passes `now`, which keeps timeouts testable.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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

/// What an UPDATE did to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution<W> {
    /// Waiters whose missing byte the UPDATE covers: wake them.
    pub woken: Vec<W>,
    /// MISS messages to send now, `(iova, access)`: the UPDATE answered a page's outstanding
    /// MISS without covering all of its waiters. Already recorded as sent.
    pub resend: Vec<(u64, Access)>,
    /// Set by [`crate::SharedIotlb::update`]: the UPDATE changed a translation someone may
    /// hold ([`crate::UpdateOutcome::Replaced`]), so it must not be acknowledged before the
    /// workers have quiesced.
    pub replaced: bool,
}

impl<W> Default for Resolution<W> {
    fn default() -> Self {
        Resolution {
            woken: Vec::new(),
            resend: Vec::new(),
            replaced: false,
        }
    }
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
    /// The byte the outstanding MISS asks for: always one of the waiters' bytes.
    miss_iova: u64,
    sent_at: Instant,
    sends: u32,
    /// Each waiter with the byte it missed on.
    waiters: Vec<(W, u64)>,
}

impl<W> Entry<W> {
    /// After waiters left: if none waits on `miss_iova` any more, pick a remaining waiter's
    /// byte. Returns whether it changed (the outstanding MISS no longer helps anyone).
    fn retarget(&mut self) -> bool {
        if self.waiters.iter().any(|&(_, b)| b == self.miss_iova) {
            return false;
        }
        match self.waiters.first() {
            Some(&(_, b)) => {
                self.miss_iova = b;
                true
            }
            None => false,
        }
    }
}

/// The pending-miss table. `W` identifies a waiter (a queue, say).
#[derive(Debug)]
pub struct PendingMisses<W> {
    entries: BTreeMap<(u64, Access), Entry<W>>,
    sent: u64,
    coalesced: u64,
    /// How long a MISS sent ahead that nobody joined stays worth joining (see
    /// [`PendingMisses::set_ahead_ttl`]).
    ahead_ttl: Option<Duration>,
}

impl<W> Default for PendingMisses<W> {
    fn default() -> Self {
        PendingMisses {
            entries: BTreeMap::new(),
            sent: 0,
            coalesced: 0,
            ahead_ttl: None,
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

    /// A MISS sent ahead that nobody joined within `ttl` is taken as lost (never answered:
    /// an unmapped page, a front-end that dropped it): a queue reaching its page sends its
    /// own MISS instead of joining it, and it no longer keeps the page from being sent
    /// ahead again. Without a ttl (the default) such entries stay until answered or
    /// expired by [`PendingMisses::expire_unwaited`].
    pub fn set_ahead_ttl(&mut self, ttl: Duration) {
        self.ahead_ttl = Some(ttl);
    }

    /// Drop the entry of `key` if it is a MISS sent ahead that went stale by `now`.
    fn drop_if_stale(&mut self, key: (u64, Access), now: Instant) {
        let Some(ttl) = self.ahead_ttl else { return };
        if self.entries.get(&key).is_some_and(|e| {
            e.waiters.is_empty() && now.saturating_duration_since(e.sent_at) >= ttl
        }) {
            self.entries.remove(&key);
        }
    }

    /// A new entry for `key`, its MISS (for `iova`) sent at `now`.
    fn insert_sent(&mut self, key: (u64, Access), iova: u64, now: Instant, waiters: Vec<(W, u64)>) {
        self.entries.insert(
            key,
            Entry {
                miss_iova: iova,
                sent_at: now,
                sends: 1,
                waiters,
            },
        );
        self.sent += 1;
    }

    /// `waiter` missed on `iova` for `access`. Tells whether to send a MISS or just park.
    ///
    /// Replaces any earlier registration of `waiter`. Re-registering on the page it already
    /// waits for keeps the outstanding MISS (no second MISS before the timeout).
    pub fn register(&mut self, iova: u64, access: Access, waiter: W, now: Instant) -> Registration {
        let key = (page_of(iova), access);
        self.drop_if_stale(key, now);
        let already_here = self
            .entries
            .get(&key)
            .is_some_and(|e| e.waiters.iter().any(|(w, _)| *w == waiter));
        if already_here {
            self.cancel_except(&waiter, Some(key));
        } else {
            self.cancel(&waiter);
        }
        match self.entries.get_mut(&key) {
            Some(e) => {
                // Joining a MISS sent ahead: it still asks for the byte sent ahead, so keep
                // that as the outstanding byte (an UPDATE that answers it without covering
                // this waiter then asks again at once, see `resolve`).
                let ahead = e.waiters.is_empty();
                match e.waiters.iter_mut().find(|(w, _)| *w == waiter) {
                    Some(mine) => mine.1 = iova,
                    None => e.waiters.push((waiter, iova)),
                }
                if !ahead {
                    e.retarget();
                }
                self.coalesced += 1;
                Registration::Coalesced
            }
            None => {
                self.insert_sent(key, iova, now, vec![(waiter, iova)]);
                Registration::Send { iova, access }
            }
        }
    }

    /// Send a MISS for `iova` ahead of need, with no waiter. Returns false (send nothing) if
    /// a MISS for that page and access is already outstanding.
    pub fn register_ahead(&mut self, iova: u64, access: Access, now: Instant) -> bool {
        let key = (page_of(iova), access);
        self.drop_if_stale(key, now);
        if self.entries.contains_key(&key) {
            return false;
        }
        self.insert_sent(key, iova, now, Vec::new());
        true
    }

    /// A MISS registered ahead could not be sent after all: forget it, and return the
    /// waiters that joined it meanwhile (nothing was sent for them: wake them, and they
    /// register and send their own).
    pub fn unregister_ahead(&mut self, iova: u64, access: Access) -> Vec<W> {
        let key = (page_of(iova), access);
        if self.entries.get(&key).is_none_or(|e| e.sends != 1) {
            return Vec::new(); // answered, or sent again since: not ours to drop
        }
        self.entries
            .remove(&key)
            .map(|e| e.waiters.into_iter().map(|(w, _)| w).collect())
            .unwrap_or_default()
    }

    /// Drop the entries sent ahead that nobody joined and whose MISS went out before
    /// `deadline` (unanswered: the queue that reaches the page sends its own). Returns how
    /// many.
    pub fn expire_unwaited(&mut self, deadline: Instant) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| !(e.waiters.is_empty() && e.sent_at < deadline));
        before - self.entries.len()
    }

    /// An UPDATE of `range` arrived at `now`: remove and return every waiter whose missing
    /// byte it covers (inclusive end), and the MISS messages to send again right away (see
    /// [`Resolution::resend`]). Entries left without waiters are dropped.
    pub fn resolve(&mut self, range: IovaRange, now: Instant) -> Resolution<W> {
        let mut out = Resolution::default();
        let lo = (page_of(range.start()), Access::Read);
        let hi = (page_of(range.last()), Access::Write);
        let mut emptied = Vec::new();
        for (key, e) in self.entries.range_mut(lo..=hi) {
            e.waiters.retain(|(w, iova)| {
                let hit = range.contains(*iova);
                if hit {
                    out.woken.push(w.clone());
                }
                !hit
            });
            if e.waiters.is_empty() {
                emptied.push(*key);
            } else if e.retarget() {
                e.sent_at = now;
                e.sends = e.sends.saturating_add(1);
                self.sent += 1;
                out.resend.push((e.miss_iova, key.1));
            }
        }
        for key in emptied {
            self.entries.remove(&key);
        }
        out
    }

    /// Forget every registration of `waiter` (its queue was stopped or reset). Returns how
    /// many were dropped.
    pub fn cancel(&mut self, waiter: &W) -> usize {
        self.cancel_except(waiter, None)
    }

    fn cancel_except(&mut self, waiter: &W, keep: Option<(u64, Access)>) -> usize {
        let mut dropped = 0;
        self.entries.retain(|key, e| {
            if Some(*key) == keep {
                return true;
            }
            let before = e.waiters.len();
            e.waiters.retain(|(w, _)| w != waiter);
            let gone = before - e.waiters.len();
            dropped += gone;
            // A MISS is outstanding for the entry; if it was for the cancelled waiter's byte,
            // a resend after the timeout asks for a remaining waiter's byte instead.
            e.retarget();
            // An entry sent ahead (never had a waiter) stays until answered or expired.
            gone == 0 || !e.waiters.is_empty()
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
        let mut woken = p.resolve(r(0x1900, 0x1fff), now).woken;
        woken.sort();
        assert_eq!(woken, vec!['a']);
        assert_eq!(p.resolve(r(0x0, 0x17ff), now).woken, Vec::<char>::new());
        assert_eq!(p.resolve(r(0x1800, 0x1800), now).woken, vec!['b']);
        assert_eq!(p.len(), 1);
        assert_eq!(p.resolve(IovaRange::FULL, now).woken, vec!['c']);
        assert!(p.is_empty());
    }

    #[test]
    fn top_of_space_waiter() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(u64::MAX, Access::Write, 7u8, now);
        assert_eq!(p.resolve(r(u64::MAX - 0xfff, u64::MAX), now).woken, vec![7]);
    }

    #[test]
    fn coalesced_waiter_on_another_byte_waits_for_its_own_byte() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x1000, Access::Read, 1u8, now);
        p.register(0x1f00, Access::Read, 2, now);
        let res = p.resolve(r(0x1000, 0x17ff), now);
        assert_eq!(res.woken, vec![1]);
        assert_eq!(p.len(), 1, "waiter 2 still pending");
        // The outstanding MISS (for 0x1000) was answered without covering 0x1f00: ask again.
        assert_eq!(res.resend, vec![(0x1f00, Access::Read)]);
        assert_eq!(p.expired(now + Duration::from_secs(1))[0].miss_iova, 0x1f00);
        assert_eq!(p.sent(), 2);
        assert_eq!(p.resolve(r(0x1800, 0x1fff), now).woken, vec![2]);
    }

    #[test]
    fn a_waiter_waits_for_its_latest_miss_only() {
        let now = Instant::now();
        let later = now + Duration::from_millis(10);
        let mut p = PendingMisses::new();
        assert!(matches!(
            p.register(0x1f00, Access::Read, 7u8, now),
            Registration::Send { .. }
        ));
        // Same page, another byte: no second MISS, but the new byte is what wakes it.
        assert_eq!(
            p.register(0x1000, Access::Read, 7, later),
            Registration::Coalesced
        );
        assert_eq!(p.sent(), 1);
        assert_eq!(p.resolve(r(0x1000, 0x17ff), now).woken, vec![7]);
        assert!(p.is_empty());
        // Another page: the old registration goes, with its entry.
        p.register(0x5000, Access::Read, 7, now);
        p.register(0x9000, Access::Write, 7, now);
        assert_eq!(p.len(), 1);
        assert_eq!(p.remove(0x5000, Access::Read), Vec::<u8>::new());
        assert_eq!(p.remove(0x9000, Access::Write), vec![7]);
    }

    #[test]
    fn cancelling_the_missed_byte_retargets_the_resend() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x5000, Access::Read, 1u8, now);
        p.register(0x5f00, Access::Read, 2, now);
        p.cancel(&1);
        let e = p.expired(now + Duration::from_secs(1));
        assert_eq!((e[0].miss_iova, e[0].waiters.clone()), (0x5f00, vec![2]));
    }

    #[test]
    fn cancel_drops_only_that_waiter() {
        let now = Instant::now();
        let mut p = PendingMisses::new();
        p.register(0x1000, Access::Read, 1u8, now);
        p.register(0x1000, Access::Read, 2, now);
        p.register(0x5000, Access::Write, 3, now);
        assert_eq!(p.cancel(&1), 1);
        assert_eq!(p.cancel(&3), 1);
        assert_eq!(p.len(), 1);
        assert_eq!(p.resolve(IovaRange::FULL, now).woken, vec![2]);
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

    #[test]
    fn misses_sent_ahead_are_joined_not_sent_twice_and_survive_other_registrations() {
        let t0 = Instant::now();
        let mut p = PendingMisses::new();
        // Queue 1 waits on 0x1000 and sends 0x5000 and 0x9000 ahead.
        assert!(matches!(
            p.register(0x1000, Access::Read, 1u16, t0),
            Registration::Send { .. }
        ));
        assert!(p.register_ahead(0x5010, Access::Write, t0));
        assert!(p.register_ahead(0x9000, Access::Read, t0));
        assert!(!p.register_ahead(0x5ff0, Access::Write, t0), "already out");
        assert!(!p.register_ahead(0x1000, Access::Read, t0), "already out");
        assert_eq!(p.len(), 3);
        // The UPDATE for 0x1000 wakes queue 1, which walks on and reaches 0x5020: it joins
        // the MISS sent ahead (no second MISS), and that did not drop 0x9000.
        assert_eq!(p.resolve(r(0x1000, 0x1fff), t0).woken, vec![1]);
        assert_eq!(
            p.register(0x5020, Access::Write, 1, t0),
            Registration::Coalesced
        );
        assert_eq!(p.len(), 2);
        // Its UPDATE wakes it.
        assert_eq!(p.resolve(r(0x5000, 0x5fff), t0).woken, vec![1]);
        // A waiter leaving (queue reset) leaves the entry sent ahead alone; an UPDATE that
        // covers it drops it and wakes nobody.
        assert_eq!(p.cancel(&1), 0);
        assert_eq!(p.len(), 1);
        assert!(p.resolve(r(0x9000, 0x9fff), t0).woken.is_empty());
        assert!(p.is_empty());
        assert_eq!(p.sent(), 3);
    }

    #[test]
    fn misses_sent_ahead_that_nobody_joined_expire_and_can_be_taken_back() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(10);
        let mut p = PendingMisses::new();
        assert!(p.register_ahead(0x1000, Access::Read, t0));
        assert!(p.register_ahead(0x2000, Access::Read, t0));
        assert!(p.register_ahead(0x3000, Access::Read, t1));
        assert_eq!(
            p.register(0x2000, Access::Read, 7u8, t1),
            Registration::Coalesced
        );
        // Only the entry nobody joined and sent before the deadline goes.
        assert_eq!(p.expire_unwaited(t1), 1);
        assert_eq!(p.len(), 2);
        let expired = p.expired(t1);
        assert_eq!(expired.len(), 1);
        assert_eq!(
            (expired[0].page, expired[0].waiters.clone()),
            (0x2000, vec![7])
        );
        // Not sent after all: forgotten, and whoever joined meanwhile is handed back to be
        // woken (nothing went out for it).
        assert!(p.unregister_ahead(0x3000, Access::Read).is_empty());
        assert_eq!(p.unregister_ahead(0x2000, Access::Read), vec![7]);
        assert!(p.is_empty());
        assert!(
            p.register_ahead(0x3000, Access::Read, t1),
            "may be sent again"
        );
    }

    #[test]
    fn a_waiter_joining_a_miss_sent_ahead_is_asked_for_again_after_a_partial_update() {
        let t0 = Instant::now();
        let mut p = PendingMisses::new();
        assert!(p.register_ahead(0x5000, Access::Read, t0));
        assert_eq!(
            p.register(0x5f00, Access::Read, 1u8, t0),
            Registration::Coalesced
        );
        // The answer to the MISS sent ahead covers its byte but not the waiter's.
        let res = p.resolve(r(0x5000, 0x57ff), t0);
        assert!(res.woken.is_empty());
        assert_eq!(res.resend, vec![(0x5f00, Access::Read)]);
        assert_eq!(p.resolve(r(0x5800, 0x5fff), t0).woken, vec![1]);
        assert!(p.is_empty());
    }

    #[test]
    fn a_stale_miss_sent_ahead_is_neither_joined_nor_blocking() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(2);
        let mut p = PendingMisses::new();
        p.set_ahead_ttl(Duration::from_secs(1));
        assert!(p.register_ahead(0x1000, Access::Read, t0));
        assert!(p.register_ahead(0x2000, Access::Read, t0));
        // Still fresh: joined, and not sent ahead twice.
        assert!(!p.register_ahead(0x2000, Access::Read, t0 + Duration::from_millis(10)));
        // Gone stale: a queue reaching it sends its own MISS, and it may be sent ahead again.
        assert_eq!(
            p.register(0x1010, Access::Read, 3u8, later),
            Registration::Send {
                iova: 0x1010,
                access: Access::Read
            }
        );
        assert!(p.register_ahead(0x2000, Access::Read, later));
    }
}
