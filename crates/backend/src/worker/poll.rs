//! A worker's busy-polling: for the UPDATE that answers its miss (the wake-up flag, then the
//! eventfds), and, under adaptive polling, for the driver's next chain (the avail index,
//! with kicks turned off meanwhile, as QEMU's virtqueue polling does, so that a driver adding
//! chains to a polled queue makes no notification at all) or for the device to have work
//! for the queue again (the handler's `ready`, which another queue's wake-up changes). Each kind of wait has its own
//! window ([`PollWindow`]), tuned by how long the waits turn out to be.
//!
//! This file only polls: it never serves a chain, parks or blocks (the wait loop in `run`
//! decides when to poll and when to sleep).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::event::Timespec;
use virtq::Translator;
use wire::poll::{PollMode, PollWindow, WaitKind};

use super::wake::Polled;
use super::{QueueState, Runner};
use crate::device::{Device, QueueHandler};

/// Busy-poll looks at the wake-up flag (or the avail index) per look at the kick and wake-up
/// eventfds.
pub(super) const KICK_LOOK_EVERY: u32 = 8;

/// A queue's polling state.
#[derive(Debug)]
pub(super) struct Polling {
    /// For the next chain, while the queue is empty.
    pub kicks: PollWindow,
    /// For the UPDATE that answers a miss.
    pub answers: PollWindow,
    /// The driver was asked not to kick (the queue went empty with a window to poll): the
    /// wait polls the avail index, and must ask for kicks again before it blocks.
    pub kicks_off: bool,
    /// The last poll for a chain ran out: the next time the queue goes empty it asks for
    /// kicks again and blocks.
    pub window_over: bool,
    /// Since when the queue waits for a chain (tunes `kicks`).
    pub idle_since: Option<Instant>,
}

impl Polling {
    pub(super) fn new(mode: PollMode, cap: Duration) -> Self {
        Polling {
            kicks: PollWindow::new(mode, WaitKind::Work, cap),
            answers: PollWindow::new(mode, WaitKind::Answer, cap),
            kicks_off: false,
            window_over: false,
            idle_since: None,
        }
    }

    /// Whether a queue that just went empty should leave kicks off and poll for its next
    /// chain.
    pub(super) fn poll_for_chains(&self) -> bool {
        !self.window_over && !self.kicks.window().is_zero()
    }

    /// Work came after a wait for a chain that started at `since`.
    pub(super) fn chain_came(&mut self, since: Instant) {
        self.idle_since = None;
        self.window_over = false;
        self.kicks.waited(since.elapsed());
    }
}

const ZERO: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

impl<D: Device> Runner<D> {
    /// Parked on a miss: poll for the wake-up (or a kick) for up to the answer window before
    /// the wait loop blocks, so that an answer coming within it costs no thread wake-up.
    /// True when the wait ended with a wake-up, a kick or a stop; false when the window ran
    /// out (or there is none).
    pub(super) fn spin_for_wake(&self, window: Duration) -> bool {
        if window.is_zero() {
            return false;
        }
        self.spin(window, || self.stop.load(Ordering::Relaxed))
    }

    /// The queue is empty with kicks off: poll the avail index (and the wake-up flag, and
    /// every few looks the eventfds) for up to the chain window. True when something came
    /// (a chain, a kick, a wake-up, a stop or a disable: the wait loop looks at which);
    /// false when the window ran out.
    pub(super) fn spin_for_chain(
        &self,
        w: &mut QueueState<D::Handler>,
        tr: &mut dyn Translator,
    ) -> bool {
        self.spin(w.poll.kicks.window(), || {
            self.stop.load(Ordering::Relaxed)
                || !self.cfg.enabled.load(Ordering::Relaxed)
                // An error (the avail ring unmapped meanwhile, say) is for the drain to meet.
                || !matches!(self.section(|gm| w.queue.has_available(tr, gm)), Ok(false))
        })
    }

    /// The device had nothing to do for the queue (`QueueHandler::ready` false): poll the
    /// wake-up flag and the handler for up to the chain window. True when it became ready
    /// or something else came (a kick, a stop, a disable); false when the window ran out.
    pub(super) fn spin_for_ready(&self, w: &mut QueueState<D::Handler>) -> bool {
        let window = w.poll.kicks.window();
        self.spin(window, || {
            self.stop.load(Ordering::Relaxed)
                || !self.cfg.enabled.load(Ordering::Relaxed)
                || w.handler.ready()
        })
    }

    /// Poll for up to `window`: the wake-up flag and `came` every look, the kick and wake-up
    /// eventfds every [`KICK_LOOK_EVERY`] looks, yielding the CPU in between. True when any
    /// of them had something.
    fn spin(&self, window: Duration, mut came: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        let mut looks = 0u32;
        let polled = self.wake.poll(|| {
            if came() {
                return Some(true);
            }
            // The eventfds (a kick, or a wake-up from before we polled) every few looks.
            if looks % KICK_LOOK_EVERY == 0 {
                match self.poll_eventfds(Some(&ZERO)) {
                    Ok(true) => return Some(true),
                    Err(e) if e != rustix::io::Errno::INTR => return Some(false),
                    _ => {}
                }
            }
            looks = looks.wrapping_add(1);
            if start.elapsed() >= window {
                return Some(false);
            }
            std::thread::yield_now();
            None
        });
        if polled == Polled::Stale {
            // Most likely a wake-up from before we polled, which also wrote the eventfd:
            // take that too, or it would end the next wait for nothing.
            let _ = self.poll_eventfds(Some(&ZERO));
        }
        polled.came()
    }
}
