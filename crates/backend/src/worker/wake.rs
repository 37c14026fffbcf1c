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

    /// Wake the worker. The flag is set before `polling` is read, and the worker sets
    /// `polling` before it first reads the flag and clears it before it reads the flag a
    /// last time (all sequentially consistent), so either we see it is not polling and write
    /// the eventfd, or it sees the flag (see [`Waker::poll`]).
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

    /// Busy-poll: from now on wakers set the flag only. Look at the flag, then call `look`,
    /// until either has something: `look` returns `Some(true)` when work came another way,
    /// `Some(false)` when the window is over, `None` to go on. Returns [`Polled::Flag`] for a
    /// wake-up seen through the flag, [`Polled::Stale`] if it was there before the first
    /// look, [`Polled::Look`] with what `look` said otherwise.
    ///
    /// A flag already set when polling starts is never dropped: it may be a waker's only
    /// trace. A waker that set it before we started polling also wrote the eventfd; one that
    /// set it and then read `polling` after we set it did not (its load comes after our
    /// store), and nothing else would ever wake us for it. Which of the two it was cannot be
    /// told, so it counts as a wake-up ([`Polled::Stale`]: the caller may drain the eventfd
    /// so that the same wake-up does not end its next wait too).
    pub(super) fn poll(&self, mut look: impl FnMut() -> Option<bool>) -> Polled {
        self.polling.store(true, Ordering::SeqCst);
        let mut first = true;
        let polled = loop {
            if self.take() {
                break if first { Polled::Stale } else { Polled::Flag };
            }
            first = false;
            if let Some(came) = look() {
                break Polled::Look(came);
            }
        };
        // Wakers write the eventfd again. A wake-up that came through the flag meanwhile (a
        // waker that saw us polling did not write the eventfd) is all there is of it.
        self.polling.store(false, Ordering::SeqCst);
        match (self.take(), polled) {
            (true, Polled::Look(_)) => Polled::Flag,
            (_, p) => p,
        }
    }
}

/// How a [`Waker::poll`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Polled {
    /// A wake-up through the flag while polling.
    Flag,
    /// The flag was already set when polling started (a wake-up from before, whose eventfd
    /// write may still be pending, or one whose waker saw us polling: see [`Waker::poll`]).
    Stale,
    /// What the look said: work came another way (`true`) or the window is over.
    Look(bool),
}

impl Polled {
    /// Whether the poll found something.
    pub(super) fn came(self) -> bool {
        !matches!(self, Polled::Look(false))
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
        // Each round the "worker" starts polling at a random moment, looks a few times,
        // stops, and then blocks on the eventfd, as a worker parked on a miss does; the
        // waker wakes it once at another random moment (before, during or after the poll).
        // The wake-up must arrive through the flag or the eventfd, every time.
        let w = Arc::new(Waker::new().unwrap());
        let rounds = 20_000u32;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let spin = |x: u32| {
            for _ in 0..x {
                std::hint::spin_loop();
            }
        };
        let waker = {
            let (w, barrier) = (w.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_u32;
                for _ in 0..rounds {
                    barrier.wait();
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    spin(x % 64);
                    w.wake();
                    barrier.wait();
                }
            })
        };
        let (mut by_flag, mut by_fd) = (0u32, 0u32);
        for round in 0..rounds {
            barrier.wait();
            spin(round.wrapping_mul(7) % 48);
            let mut looks = round % 8;
            let polled = w.poll(|| {
                if looks == 0 {
                    return Some(false);
                }
                looks -= 1;
                std::hint::spin_loop();
                None
            });
            if polled.came() {
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
    fn a_flag_set_before_polling_starts_is_a_wake_up() {
        // The race a worker lost in 2026 (a queue parked for the whole miss timeout, 1 s,
        // in about one `bench` round in five of small-tlb): a waker sets the flag, the
        // worker starts polling, the waker then reads `polling` (true) and writes no
        // eventfd. The flag is all there is; polling must take it, not drop it as stale.
        let w = Waker::new().unwrap();
        w.woken.store(true, Ordering::SeqCst);
        let polled = w.poll(|| Some(false));
        assert_eq!(polled, Polled::Stale);
        assert!(polled.came());
        // And one set while polling is a plain wake-up.
        let mut once = true;
        let polled = w.poll(|| {
            if std::mem::take(&mut once) {
                w.wake();
                None
            } else {
                Some(false)
            }
        });
        assert_eq!(polled, Polled::Flag);
        assert!(!eventfd_woken(&w, 0), "while polling, the flag only");
        // A poll that finds nothing says so.
        assert_eq!(w.poll(|| Some(false)), Polled::Look(false));
        assert_eq!(w.poll(|| Some(true)), Polled::Look(true));
    }

    #[test]
    fn a_worker_not_polling_is_woken_through_the_eventfd() {
        let w = Waker::new().unwrap();
        w.wake();
        assert!(eventfd_woken(&w, 1000));
    }
}
