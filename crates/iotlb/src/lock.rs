//! Taking a short-held lock without falling asleep on it.
//!
//! The IOTLB's locks are held for well under a microsecond at a time (a lookup, an insert, a
//! pending-table change). `parking_lot` spins a handful of times on a taken lock and then
//! parks the thread in the kernel, and the holder then pays a futex wake-up to hand it over:
//! tens of microseconds on a virtual machine, where waking a halted vCPU is a VM exit. A
//! worker taking the shared cache's read lock while the connection thread applies a burst of
//! UPDATEs used to park so, and those wake-ups were most of the miss round trip's tail.
//!
//! [`read`], [`write()`] and [`lock()`] poll the lock instead: a few spins, then yielding the CPU
//! between attempts, and only after [`POLL_WINDOW`] (a holder that lost its CPU) they block
//! like the plain methods, so a waiter never burns a CPU for long. Readers poll with
//! `try_read`, which fails once a writer that stopped polling is waiting: readers whose
//! sections overlap cannot hold an INVALIDATE off for longer than one poll window (with
//! `try_read_recursive` three busy workers kept it waiting for milliseconds).
//!
//! Only for locks whose holders never wait for anything (no I/O, no other thread) while
//! holding them: a lock held across a reply would just be polled for its whole window.

use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How long a waiter polls before it blocks.
pub const POLL_WINDOW: Duration = Duration::from_micros(100);

/// Busy spins before the first yield.
const SPINS: u32 = 64;

fn acquire<G>(mut attempt: impl FnMut() -> Option<G>, block: impl FnOnce() -> G) -> G {
    if let Some(g) = attempt() {
        return g;
    }
    for _ in 0..SPINS {
        std::hint::spin_loop();
        if let Some(g) = attempt() {
            return g;
        }
    }
    let start = Instant::now();
    loop {
        std::thread::yield_now();
        if let Some(g) = attempt() {
            return g;
        }
        if start.elapsed() >= POLL_WINDOW {
            return block();
        }
    }
}

/// Shared access to `l` (see the module doc).
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    acquire(|| l.try_read(), || l.read())
}

/// Exclusive access to `l` (see the module doc).
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    acquire(|| l.try_write(), || l.write())
}

/// The mutex `l` (see the module doc).
pub fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    acquire(|| l.try_lock(), || l.lock())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn uncontended_locks_are_taken_at_once() {
        let rw = RwLock::new(1);
        {
            let a = read(&rw);
            let b = read(&rw);
            assert_eq!(*a + *b, 2);
        }
        *write(&rw) += 1;
        assert_eq!(*read(&rw), 2);
        let m = Mutex::new(5);
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 6);
    }

    #[test]
    fn waiters_get_the_lock_after_a_short_and_after_a_long_hold() {
        // A hold shorter than the poll window is waited out by polling, a longer one by
        // blocking; either way the waiter ends up with the lock and sees the holder's write.
        for hold in [Duration::from_micros(20), Duration::from_millis(5)] {
            let rw = Arc::new(RwLock::new(0u32));
            let m = Arc::new(Mutex::new(0u32));
            let mut g = rw.write();
            let mut mg = m.lock();
            let t = {
                let (rw, m) = (rw.clone(), m.clone());
                std::thread::spawn(move || {
                    let r = *read(&rw);
                    let l = *lock(&m);
                    *write(&rw) += 1;
                    (r, l)
                })
            };
            std::thread::sleep(hold);
            *g = 7;
            *mg = 9;
            drop(g);
            drop(mg);
            assert_eq!(t.join().unwrap(), (7, 9));
            assert_eq!(*rw.read(), 8);
        }
    }

    #[test]
    fn a_blocked_writer_goes_before_new_readers() {
        // A reader holds the lock; a writer polls past its window and blocks; a reader that
        // comes after that must wait for the writer, or busy readers could starve writers.
        let rw = Arc::new(RwLock::new(Vec::new()));
        let held = rw.read();
        let writer = {
            let rw = rw.clone();
            std::thread::spawn(move || write(&rw).push("writer"))
        };
        // Until the writer blocks (no sleep of a fixed length: on a loaded machine its
        // thread may not have run yet): a waiting writer makes `try_read` fail.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rw.try_read().is_some() {
            assert!(Instant::now() < deadline, "the writer never blocked");
            std::thread::sleep(POLL_WINDOW);
        }
        let asking = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (rw, asking) = (rw.clone(), asking.clone());
            std::thread::spawn(move || {
                asking.store(true, std::sync::atomic::Ordering::SeqCst);
                let seen = read(&rw).clone();
                seen
            })
        };
        while !asking.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the reader never ran");
            std::thread::yield_now();
        }
        // Past its poll window: blocked behind the writer, if it honours it.
        std::thread::sleep(POLL_WINDOW * 50);
        drop(held);
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), vec!["writer"]);
    }

    #[test]
    fn many_threads_count_exactly() {
        let m = Arc::new(Mutex::new(0u64));
        let rw = Arc::new(RwLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (m, rw) = (m.clone(), rw.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *lock(&m) += 1;
                        *write(&rw) += 1;
                        let _ = *read(&rw);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*m.lock(), 40_000);
        assert_eq!(*rw.read(), 40_000);
    }
}
