//! The IOTLB shared by many queue workers and one control thread.
//!
//! [`SharedIotlb`] puts the cache behind a reader-writer lock whose writers are short (one
//! UPDATE or INVALIDATE, O(log n)), plus the pending-miss table and an atomic copy of the
//! cache's generation. Each worker translates through its own [`IotlbHandle`]: a small
//! direct-mapped cache of recently used entries, valid as long as the generation has not
//! changed. A hit there takes no lock and writes no shared memory except an entry's heat
//! counter (and that only until it saturates), so queues scale across cores and a hit never
//! waits for an UPDATE. A handle miss reads the shared cache under the read lock.
//!
//! Why a handle can keep entries the shared cache evicted: the generation changes on every
//! INVALIDATE of mapped bytes and every UPDATE that maps bytes otherwise than they were, where
//! "mapped" includes what the cache evicted (it remembers those translations, see
//! `evicted.rs`), and never on eviction; the handle drops every copy overlapping a changed
//! range. An evicted entry still in a handle is therefore still what the IOMMU maps, so using
//! it is correct. An UPDATE that maps unmapped bytes, or maps bytes again as they were,
//! changes nothing anybody holds and leaves the generation alone. Once
//! [`SharedIotlb::invalidate`] has returned, any translation that *starts* afterwards sees the
//! new generation and cannot use the old entry. A translation already in flight may still
//! finish with it: waiting for those is the backend's quiescence protocol (design invariant 3),
//! which can use the generation returned here.
//!
//! Lost-wake-up freedom: [`SharedIotlb::register_miss`] checks the cache again while holding
//! the pending-table lock, and an UPDATE resolves waiters under that same lock after it has
//! changed the cache. Either the UPDATE sees the registration, or the registration sees the
//! UPDATE. Lock order is pending table, then cache; nothing here takes them the other way.
//!
//! This file never blocks on I/O, never sends messages and never touches guest memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::cache::{Iotlb, Mapping};
use crate::error::UpdateError;
use crate::handle::IotlbHandle;
use crate::lock;
use crate::pending::{PendingMiss, PendingMisses, Registration, Resolution};
use crate::policy::HeatMap;
use crate::range::{Access, IovaRange, Perm};
use crate::stats::{HandleCounters, Stats};

/// What to do after a translation missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissOutcome {
    /// You are the first: send a MISS for `iova`/`access`, then park.
    SendMiss {
        /// The IOVA to put in the MISS.
        iova: u64,
        /// The access to ask for.
        access: Access,
    },
    /// A MISS for this page is outstanding already: park.
    Coalesced,
    /// An UPDATE covered the address in the meantime: translate again now.
    Mapped,
}

pub(crate) struct Inner<W> {
    pub(crate) tlb: RwLock<Iotlb>,
    /// The cache's heat counters, reachable without the lock.
    pub(crate) heat: HeatMap,
    /// Mirror of `tlb.generation()`, stored with release after every change.
    pub(crate) generation: AtomicU64,
    pending: Mutex<PendingMisses<W>>,
    pub(crate) handles: Mutex<Vec<Arc<HandleCounters>>>,
    /// Counters of handles that were dropped.
    pub(crate) retired: HandleCounters,
}

/// The device IOTLB shared between queue workers and the control thread. Cheap to clone.
pub struct SharedIotlb<W> {
    pub(crate) inner: Arc<Inner<W>>,
}

impl<W> Clone for SharedIotlb<W> {
    fn clone(&self) -> Self {
        SharedIotlb {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<W> std::fmt::Debug for SharedIotlb<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedIotlb")
            .field("generation", &self.inner.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<W: Clone + PartialEq> SharedIotlb<W> {
    /// Share `tlb`.
    pub fn new(tlb: Iotlb) -> Self {
        let heat = Arc::clone(tlb.heat());
        let generation = AtomicU64::new(tlb.generation());
        SharedIotlb {
            inner: Arc::new(Inner {
                tlb: RwLock::new(tlb),
                heat,
                generation,
                pending: Mutex::new(PendingMisses::new()),
                handles: Mutex::new(Vec::new()),
                retired: HandleCounters::default(),
            }),
        }
    }

    /// A translation handle for one worker thread.
    pub fn handle(&self) -> IotlbHandle<W> {
        IotlbHandle::new(self.clone())
    }

    /// The current generation (see [`Iotlb::generation`]).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn publish(&self, tlb: &Iotlb) -> u64 {
        let g = tlb.generation();
        self.inner.generation.store(g, Ordering::Release);
        g
    }

    /// Apply an UPDATE. Returns the waiters it wakes (those whose missing byte it covers), any
    /// MISS to send again at once (see [`Resolution::resend`]), and whether it replaced a
    /// translation someone may hold ([`Resolution::replaced`]: quiesce before acknowledging).
    pub fn update(
        &self,
        range: IovaRange,
        target: u64,
        perm: Perm,
    ) -> Result<Resolution<W>, UpdateError> {
        let outcome = {
            let mut tlb = lock::write(&self.inner.tlb);
            let outcome = tlb.update(range, target, perm)?;
            self.publish(&tlb);
            outcome
        };
        let mut res = lock::lock(&self.inner.pending).resolve(range, Instant::now());
        res.replaced = outcome.replaced();
        Ok(res)
    }

    /// Apply an INVALIDATE of `range`. Returns the new generation if a translation handed out
    /// before may have changed (quiesce for it before acknowledging), `None` if no byte of
    /// `range` was mapped (cached, or evicted but maybe still held).
    pub fn invalidate(&self, range: IovaRange) -> Option<u64> {
        let mut tlb = lock::write(&self.inner.tlb);
        let changed = tlb.invalidate(range);
        let g = self.publish(&tlb);
        changed.then_some(g)
    }

    /// Empty the cache. Returns the new generation.
    pub fn invalidate_all(&self) -> u64 {
        let mut tlb = lock::write(&self.inner.tlb);
        tlb.invalidate_all();
        self.publish(&tlb)
    }

    /// The cached entry containing `iova` (not counted as a hit or miss).
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        lock::read(&self.inner.tlb).lookup(iova)
    }

    /// Run `f` on the cache under the read lock (for inspection; keep it short).
    pub fn with_cache<R>(&self, f: impl FnOnce(&Iotlb) -> R) -> R {
        f(&lock::read(&self.inner.tlb))
    }

    /// `waiter`'s translation missed at `iova`: register it and say whether to send a MISS.
    ///
    /// Returns [`MissOutcome::Mapped`] if an UPDATE has covered `iova` since the translation
    /// (the caller retries instead of parking), so a wake-up can never be lost.
    pub fn register_miss(&self, iova: u64, access: Access, waiter: W, now: Instant) -> MissOutcome {
        let mut pending = lock::lock(&self.inner.pending);
        if lock::read(&self.inner.tlb).lookup(iova).is_some() {
            return MissOutcome::Mapped;
        }
        match pending.register(iova, access, waiter, now) {
            Registration::Send { iova, access } => MissOutcome::SendMiss { iova, access },
            Registration::Coalesced => MissOutcome::Coalesced,
        }
    }

    /// Send MISSes ahead of need (see [`PendingMisses::register_ahead`]): keeps in `wanted`
    /// the pages the caller must send, those not mapped now and with no MISS outstanding.
    /// One acquisition of each lock for the whole list (a prefetch registers dozens).
    pub fn register_ahead(&self, wanted: &mut Vec<(u64, Access)>, now: Instant) {
        let mut pending = lock::lock(&self.inner.pending);
        let tlb = lock::read(&self.inner.tlb);
        wanted.retain(|&(iova, access)| {
            tlb.lookup(iova).is_none() && pending.register_ahead(iova, access, now)
        });
    }

    /// See [`PendingMisses::set_ahead_ttl`] (a back-end sets its miss timeout).
    pub fn set_ahead_ttl(&self, ttl: std::time::Duration) {
        lock::lock(&self.inner.pending).set_ahead_ttl(ttl);
    }

    /// A MISS registered ahead was not sent after all; returns the waiters that joined it
    /// (see [`PendingMisses::unregister_ahead`]).
    pub fn unregister_ahead(&self, iova: u64, access: Access) -> Vec<W> {
        lock::lock(&self.inner.pending).unregister_ahead(iova, access)
    }

    /// Drop every pending miss of `waiter` (queue stop or reset). Returns how many.
    pub fn cancel_waiter(&self, waiter: &W) -> usize {
        lock::lock(&self.inner.pending).cancel(waiter)
    }

    /// Pending misses whose MISS was last sent before `deadline`.
    ///
    /// Misses sent ahead that nobody joined are dropped here, not listed.
    pub fn expired_misses(&self, deadline: Instant) -> Vec<PendingMiss<W>> {
        let mut pending = lock::lock(&self.inner.pending);
        pending.expire_unwaited(deadline);
        pending.expired(deadline)
    }

    /// Record that the MISS for `page`/`access` was sent again at `now`.
    pub fn miss_resent(&self, page: u64, access: Access, now: Instant) -> bool {
        lock::lock(&self.inner.pending).resent(page, access, now)
    }

    /// Give up on the miss for `page`/`access`; returns its waiters.
    pub fn fail_miss(&self, page: u64, access: Access) -> Vec<W> {
        lock::lock(&self.inner.pending).remove(page, access)
    }

    /// Drop every pending miss (disconnect).
    pub fn clear_pending(&self) {
        lock::lock(&self.inner.pending).clear();
    }

    /// Everything counted so far.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        {
            let handles = self.inner.handles.lock();
            for h in handles.iter() {
                h.add_to(&mut s);
            }
            self.inner.retired.add_to(&mut s);
        }
        {
            let p = lock::lock(&self.inner.pending);
            s.misses_sent = p.sent();
            s.coalesced_misses = p.coalesced();
            s.pending_misses = p.len() as u64;
        }
        let c = lock::read(&self.inner.tlb).counters();
        s.updates = c.updates;
        s.invalidations = c.invalidations;
        s.evictions = c.evictions;
        s.entries = c.entries;
        s.capacity = c.capacity;
        s.generation = c.generation;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TranslateError;
    use crate::segments::Segment;
    use std::sync::atomic::AtomicBool;
    use std::thread;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange::new(start, last).unwrap()
    }

    fn shared(cap: usize) -> SharedIotlb<u32> {
        SharedIotlb::new(Iotlb::with_capacity(cap).unwrap())
    }

    #[test]
    fn register_ahead_keeps_only_what_must_be_sent() {
        let s = shared(16);
        let t0 = Instant::now();
        s.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite)
            .unwrap();
        assert!(matches!(
            s.register_miss(0x3000, Access::Read, 1, t0),
            MissOutcome::SendMiss { .. }
        ));
        let mut wanted = vec![
            (0x1008, Access::Read),  // mapped
            (0x2000, Access::Write), // new
            (0x3010, Access::Read),  // outstanding (same page)
            (0x4000, Access::Read),  // new
        ];
        s.register_ahead(&mut wanted, t0);
        assert_eq!(
            wanted,
            vec![(0x2000, Access::Write), (0x4000, Access::Read)]
        );
        // Registered: a second prefetch sends nothing, and a queue reaching the page joins.
        let mut again = vec![(0x2ff0, Access::Write), (0x4000, Access::Read)];
        s.register_ahead(&mut again, t0);
        assert!(again.is_empty());
        assert!(matches!(
            s.register_miss(0x4000, Access::Read, 2, t0),
            MissOutcome::Coalesced
        ));
    }

    #[test]
    fn handle_sees_invalidation_immediately() {
        let s = shared(16);
        let mut h = s.handle();
        s.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite)
            .unwrap();
        assert!(h.translate(0x1000, 8, Access::Read).is_ok()); // fills the handle cache
        assert!(h.translate(0x1008, 8, Access::Read).is_ok()); // served by it
        s.invalidate(r(0x1000, 0x1000));
        assert!(matches!(
            h.translate(0x1000, 8, Access::Read),
            Err(TranslateError::Miss { iova: 0x1000, .. })
        ));
        assert_eq!(
            h.translate(0x1008, 8, Access::Read).unwrap().as_slice(),
            &[Segment {
                addr: 0xa008,
                len: 8
            }]
        );
    }

    #[test]
    fn handle_sees_replacing_update() {
        let s = shared(16);
        let mut h = s.handle();
        s.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadWrite)
            .unwrap();
        h.translate(0x1000, 8, Access::Write).unwrap();
        s.update(r(0x1000, 0x1fff), 0xb000, Perm::ReadOnly).unwrap();
        assert!(matches!(
            h.translate(0x1000, 8, Access::Write),
            Err(TranslateError::Denied { .. })
        ));
        assert_eq!(
            h.translate(0x1000, 8, Access::Read).unwrap()[0].addr,
            0xb000
        );
    }

    #[test]
    fn handle_checks_permission_and_length_on_its_cache() {
        let s = shared(16);
        let mut h = s.handle();
        s.update(r(0x1000, 0x1fff), 0xa000, Perm::ReadOnly).unwrap();
        h.translate(0x1000, 8, Access::Read).unwrap();
        assert!(matches!(
            h.translate(0x1000, 8, Access::Write),
            Err(TranslateError::Denied { .. })
        ));
        assert!(matches!(
            h.translate(0x1ff0, 0x20, Access::Read),
            Err(TranslateError::Miss { iova: 0x2000, .. })
        ));
        assert!(matches!(
            h.translate(u64::MAX, 2, Access::Read),
            Err(TranslateError::Overflow { .. })
        ));
        assert!(h.translate(0x1000, 0, Access::Read).unwrap().is_empty());
    }

    #[test]
    fn miss_registration_and_wake() {
        let s = shared(16);
        let now = Instant::now();
        assert_eq!(
            s.register_miss(0x5008, Access::Read, 1, now),
            MissOutcome::SendMiss {
                iova: 0x5008,
                access: Access::Read
            }
        );
        assert_eq!(
            s.register_miss(0x5100, Access::Read, 2, now),
            MissOutcome::Coalesced
        );
        let mut woken = s
            .update(r(0x5000, 0x5fff), 0, Perm::ReadOnly)
            .unwrap()
            .woken;
        woken.sort();
        assert_eq!(woken, vec![1, 2]);
        // Now mapped: registering again says retry.
        assert_eq!(
            s.register_miss(0x5008, Access::Read, 1, now),
            MissOutcome::Mapped
        );
        let st = s.stats();
        assert_eq!(
            (st.misses_sent, st.coalesced_misses, st.pending_misses),
            (1, 1, 0)
        );
    }

    #[test]
    fn stats_sum_live_and_dropped_handles() {
        let s = shared(16);
        s.update(r(0x1000, 0x1fff), 0, Perm::ReadOnly).unwrap();
        {
            let mut h = s.handle();
            for _ in 0..3 {
                h.translate(0x1000, 1, Access::Read).unwrap();
            }
            h.translate(0x9000, 1, Access::Read).unwrap_err();
        }
        let mut h = s.handle();
        h.translate(0x1000, 1, Access::Write).unwrap_err();
        let st = s.stats();
        assert_eq!((st.hits, st.misses, st.denied), (3, 1, 1));
        assert_eq!((st.updates, st.entries, st.capacity), (1, 1, 16));
    }

    /// Readers on other threads never see a translation after the invalidation that removed
    /// it has returned, while a writer keeps remapping.
    #[test]
    fn concurrent_readers_never_see_invalidated_targets() {
        let s = shared(64);
        let stop = Arc::new(AtomicBool::new(false));
        // The writer maps page 0 to an even target, and publishes the target it has just
        // invalidated in `dead` *after* invalidate() returned.
        let dead = Arc::new(AtomicU64::new(u64::MAX));
        let writer = {
            let (s, stop, dead) = (s.clone(), stop.clone(), dead.clone());
            thread::spawn(move || {
                for i in 0..20_000u64 {
                    let target = (i + 1) << 20;
                    s.update(r(0, 0xfff), target, Perm::ReadWrite).unwrap();
                    s.invalidate(r(0, 0xfff));
                    dead.store(target, Ordering::Release);
                }
                stop.store(true, Ordering::Release);
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, stop, dead) = (s.clone(), stop.clone(), dead.clone());
                thread::spawn(move || {
                    let mut h = s.handle();
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let gone = dead.load(Ordering::Acquire);
                        if let Ok(seg) = h.translate(0x10, 8, Access::Read) {
                            assert_ne!(seg[0].addr - 0x10, gone, "used an invalidated mapping");
                            seen += 1;
                        }
                    }
                    seen
                })
            })
            .collect();
        writer.join().unwrap();
        for r in readers {
            r.join().unwrap();
        }
    }
}
