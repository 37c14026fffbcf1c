//! Invalidation quiescence: an INVALIDATE is acknowledged only when no worker can still use a
//! translation it removed (design invariant 3).
//!
//! Each queue worker owns a [`WorkerEpoch`]. Around each unit of work that translates and
//! touches guest memory (pop, serve, complete) it marks itself active and records the IOTLB
//! generation it started at. After changing the IOTLB to generation `G`, the control thread
//! calls [`Epochs::wait`]: it waits for every worker that is active at an older generation to
//! finish that unit. A worker that starts later sees `G` (its translations go through the
//! changed IOTLB), and a worker that is idle or parked on a miss is not active, so the
//! control thread never waits for a worker that is itself waiting for a miss reply, and
//! queues that are between requests are never stopped.
//!
//! The protocol is a Dekker pair: the worker stores `active`, then a sequentially consistent
//! fence, then loads the generation; the control thread stores the generation, then a fence,
//! then loads `active`. Either the worker sees the new generation, or the control thread sees
//! it active and waits. The worker's fence matters: without it the generation load (an
//! acquire load in the IOTLB) could be satisfied before the `active` store is visible, on
//! weakly ordered machines. [`Section`] leaves the epoch on every path out, unwinding
//! included, so a panicking device cannot leave the control thread waiting forever.
//! Nothing here touches guest memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One worker's state as the control thread sees it.
#[derive(Debug, Default)]
pub struct WorkerEpoch {
    active: AtomicBool,
    generation: AtomicU64,
}

impl WorkerEpoch {
    /// Start a unit of work at the current IOTLB `generation` (read after this call marks the
    /// worker active: pass a closure that reads it).
    #[inline]
    pub fn enter(&self, generation: impl FnOnce() -> u64) {
        self.active.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.generation.store(generation(), Ordering::SeqCst);
    }

    /// The unit of work is over: no translation from it is used any more.
    #[inline]
    pub fn exit(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    fn blocks(&self, generation: u64) -> bool {
        self.active.load(Ordering::SeqCst) && self.generation.load(Ordering::SeqCst) < generation
    }
}

/// A unit of work in progress: the epoch is left when this drops.
pub struct Section<'a>(&'a WorkerEpoch);

impl<'a> Section<'a> {
    /// Enter `epoch` (see [`WorkerEpoch::enter`]).
    #[inline]
    pub fn enter(epoch: &'a WorkerEpoch, generation: impl FnOnce() -> u64) -> Self {
        epoch.enter(generation);
        Section(epoch)
    }
}

impl Drop for Section<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.exit();
    }
}

/// The epochs of all workers of a connection.
#[derive(Debug, Default)]
pub struct Epochs {
    workers: Mutex<Vec<Arc<WorkerEpoch>>>,
}

impl Epochs {
    /// A new worker's epoch.
    pub fn register(&self) -> Arc<WorkerEpoch> {
        let e = Arc::new(WorkerEpoch::default());
        self.workers.lock().push(e.clone());
        e
    }

    /// Forget a worker that stopped.
    pub fn unregister(&self, e: &Arc<WorkerEpoch>) {
        self.workers.lock().retain(|w| !Arc::ptr_eq(w, e));
    }

    /// Wait until no worker is in a unit of work started before `generation`. Returns how
    /// long it waited (for statistics).
    pub fn wait(&self, generation: u64) -> Duration {
        std::sync::atomic::fence(Ordering::SeqCst);
        let start = Instant::now();
        let workers: Vec<Arc<WorkerEpoch>> = self.workers.lock().clone();
        for w in &workers {
            let mut spins = 0u32;
            while w.blocks(generation) {
                // Units of work are short (one request); spin briefly, then sleep a little.
                if spins < 100 {
                    std::hint::spin_loop();
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
                spins = spins.saturating_add(1);
            }
        }
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn waits_only_for_older_active_units() {
        let epochs = Arc::new(Epochs::default());
        let a = epochs.register();
        let b = epochs.register();
        a.enter(|| 5);
        b.enter(|| 7);
        b.exit();
        // `a` is active at 5: waiting for 5 or less returns at once.
        epochs.wait(5);
        let done = Arc::new(AtomicUsize::new(0));
        let t = {
            let (epochs, done) = (epochs.clone(), done.clone());
            std::thread::spawn(move || {
                epochs.wait(6);
                done.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(done.load(Ordering::SeqCst), 0, "must wait for a");
        a.exit();
        t.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 1);
        epochs.unregister(&a);
        a.enter(|| 0);
        epochs.wait(100); // unregistered: not waited for
    }

    #[test]
    fn a_section_is_left_even_when_its_work_panics() {
        let epochs = Epochs::default();
        let e = epochs.register();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _s = Section::enter(&e, || 1);
            panic!("device bug");
        }));
        assert!(r.is_err());
        assert!(
            !e.blocks(2),
            "a panicked section must not hold up invalidations"
        );
        epochs.wait(2);
    }
}
