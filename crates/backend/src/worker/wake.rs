//! How a worker is woken: a flag it polls while it busy-polls, and an eventfd it sleeps on
//! otherwise, so that a wake-up during the busy-poll window costs the waker no system call.
//! Also the two eventfd calls every signal and wait is made of. Nothing here knows about
//! queues or misses.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{eventfd, EventfdFlags};

/// How a worker is woken: an eventfd it sleeps on, and a flag it looks at while it
/// busy-polls, so that a wake-up during the busy-poll window costs the waker no system call
/// and the worker only a load.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
    /// The worker is busy-polling: it will see `woken` without the eventfd.
    polling: AtomicBool,
    woken: AtomicBool,
}

impl Waker {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Waker {
            fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
        })
    }

    /// Wake the worker. The flag is set before `polling` is read and the worker clears
    /// `polling` before it reads the flag a last time (both sequentially consistent), so
    /// either we see it is not polling and write the eventfd, or it sees the flag.
    pub(crate) fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            signal(&self.fd);
        }
    }

    /// Take a wake-up given through the flag.
    pub(super) fn take(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }

    /// From now on wakers set the flag only; look at it with [`Waker::take`].
    pub(super) fn start_polling(&self) {
        self.polling.store(true, Ordering::SeqCst);
    }

    /// Wakers write the eventfd again. True if a wake-up came through the flag meanwhile (a
    /// waker that saw us polling did not write the eventfd: its flag is all there is).
    pub(super) fn stop_polling(&self) -> bool {
        self.polling.store(false, Ordering::SeqCst);
        self.take()
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

pub(super) fn signal(fd: &OwnedFd) {
    // An eventfd counter; a failure (overflow) still leaves it readable, which is all we need.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

pub(super) fn consume(fd: &impl AsFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::sync::Arc;

    /// Whether the eventfd has a wake-up, waiting up to `ms`; drains it.
    fn eventfd_woken(w: &Waker, ms: i64) -> bool {
        let mut fds = [PollFd::new(w, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        let got = matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0);
        if got {
            consume(w);
        }
        got
    }

    #[test]
    fn a_wake_up_is_never_lost_between_the_flag_and_the_eventfd() {
        // Each round the "worker" polls the flag for a few looks, stops polling, and then
        // blocks on the eventfd, while the waker wakes it once at a random moment: the
        // wake-up must arrive through the flag or the eventfd, every time.
        let w = Arc::new(Waker::new().unwrap());
        let rounds = 20_000u32;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let waker = {
            let (w, barrier) = (w.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_u32;
                for _ in 0..rounds {
                    barrier.wait();
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    for _ in 0..(x % 64) {
                        std::hint::spin_loop();
                    }
                    w.wake();
                    barrier.wait();
                }
            })
        };
        let (mut by_flag, mut by_fd) = (0u32, 0u32);
        for round in 0..rounds {
            barrier.wait();
            w.start_polling();
            let mut got = false;
            for _ in 0..(round % 8) {
                if w.take() {
                    got = true;
                    break;
                }
                std::hint::spin_loop();
            }
            got |= w.stop_polling();
            if got {
                by_flag += 1;
            } else {
                assert!(eventfd_woken(&w, 5000), "round {round}: wake-up lost");
                by_fd += 1;
            }
            barrier.wait();
            // Leave nothing behind for the next round: a stale flag or eventfd count.
            w.take();
            eventfd_woken(&w, 0);
        }
        waker.join().unwrap();
        assert_eq!(by_flag + by_fd, rounds);
    }

    #[test]
    fn a_worker_not_polling_is_woken_through_the_eventfd() {
        let w = Waker::new().unwrap();
        w.wake();
        assert!(eventfd_woken(&w, 1000));
        w.start_polling();
        w.wake();
        assert!(!eventfd_woken(&w, 0), "while polling, the flag only");
        assert!(w.stop_polling());
    }
}
