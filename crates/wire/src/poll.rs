//! How long a thread that waits for work polls before it blocks: the busy-poll window of a
//! connection's receive ([`crate::vhost_user::Connection`]) and of the back-end's queue
//! workers, fixed or tuned to what the waits turn out to be.
//!
//! A thread that blocks pays a wake-up when work comes (tens of microseconds on a virtual
//! machine); one that polls sees the work at once but burns CPU while it waits. The adaptive
//! window follows the waits, as QEMU's event loop does with `poll-max-ns`: a wait that polling
//! would have covered (it ended after the window but within the cap) doubles the window, a
//! wait longer than the cap halves it, and a wait that polling covered leaves it alone. So a
//! queue fed at a steady rate polls just long enough, and an idle one soon blocks at once.
//!
//! This file only decides the window: it never polls, sleeps or reads a clock itself.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Which waits poll, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PollMode {
    /// Never poll: every wait blocks at once.
    Off,
    /// Poll for the whole cap, but only where an answer is expected soon: a queue waiting
    /// for a MISS's UPDATE and a channel's receive. A queue waiting for a kick blocks.
    Misses,
    /// Every wait polls (a queue waiting for a kick too), for a window tuned between zero and
    /// the cap.
    #[default]
    Adaptive,
}

impl PollMode {
    /// The names [`FromStr`] takes.
    pub const NAMES: [&'static str; 3] = ["off", "misses", "adaptive"];
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollMode::Off => "off",
            PollMode::Misses => "misses",
            PollMode::Adaptive => "adaptive",
        })
    }
}

/// A [`PollMode`] name that is none of [`PollMode::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown polling mode {0:?} (expected off, misses or adaptive)")]
pub struct UnknownPollMode(pub String);

impl FromStr for PollMode {
    type Err = UnknownPollMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(PollMode::Off),
            "misses" => Ok(PollMode::Misses),
            "adaptive" => Ok(PollMode::Adaptive),
            _ => Err(UnknownPollMode(s.to_owned())),
        }
    }
}

/// What kind of wait a window is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// For an answer that is on its way (a MISS's UPDATE, the next message on a channel).
    Answer,
    /// For work that may or may not come (a queue's next kick).
    Work,
}

/// The smallest window an adaptive window grows to from zero.
pub const GROW_FROM: Duration = Duration::from_micros(4);

/// One waiter's busy-poll window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    mode: PollMode,
    kind: WaitKind,
    cap: Duration,
    window: Duration,
}

impl PollWindow {
    /// A window for waits of `kind` under `mode`, never over `cap`. An adaptive window for
    /// an answer starts at the cap (an answer is on its way: the window only costs when it
    /// is late, and then shrinks); one for work starts at [`GROW_FROM`] (at once useful on
    /// a busy queue, soon zero on an idle one).
    pub fn new(mode: PollMode, kind: WaitKind, cap: Duration) -> Self {
        let window = match (mode, kind) {
            (PollMode::Off, _) | (PollMode::Misses, WaitKind::Work) => Duration::ZERO,
            (PollMode::Misses | PollMode::Adaptive, WaitKind::Answer) => cap,
            (PollMode::Adaptive, WaitKind::Work) => GROW_FROM.min(cap),
        };
        PollWindow {
            mode,
            kind,
            cap,
            window,
        }
    }

    /// A window that never polls.
    pub fn off() -> Self {
        PollWindow::new(PollMode::Off, WaitKind::Answer, Duration::ZERO)
    }

    /// How long the next wait polls before it blocks (zero: it blocks at once).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The cap the window stays under.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Whether this window ever polls.
    pub fn polls(&self) -> bool {
        !self.cap.is_zero()
            && match self.mode {
                PollMode::Off => false,
                PollMode::Misses => self.kind == WaitKind::Answer,
                PollMode::Adaptive => true,
            }
    }

    /// A wait that polled for [`Self::window`] (then blocked, if nothing came) ended after
    /// `waited` because work came. Tunes an adaptive window; a fixed one stays.
    pub fn waited(&mut self, waited: Duration) {
        if self.mode != PollMode::Adaptive {
            return;
        }
        if waited <= self.window {
            // Polling caught it: the window is right.
        } else if waited > self.cap {
            // Polling would have had to last too long: poll less (down to not at all).
            self.window /= 2;
            if self.window < GROW_FROM {
                self.window = Duration::ZERO;
            }
        } else {
            // Polling for a little longer would have caught it.
            self.window = (self.window * 2).max(GROW_FROM).min(self.cap);
        }
    }
}

impl Default for PollWindow {
    fn default() -> Self {
        PollWindow::off()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_micros(64);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn waits_a_little_longer_than_the_window_grow_it_up_to_the_cap() {
        let mut w = PollWindow::new(PollMode::Adaptive, WaitKind::Work, CAP);
        assert_eq!(w.window(), GROW_FROM);
        for expect in [8, 16, 32, 64, 64] {
            w.waited(us(60));
            assert_eq!(w.window(), us(expect));
        }
    }

    #[test]
    fn waits_polling_covered_leave_it_alone() {
        let mut w = PollWindow::new(PollMode::Adaptive, WaitKind::Work, CAP);
        w.waited(us(10));
        w.waited(us(10));
        assert_eq!(w.window(), us(16));
        w.waited(us(3));
        w.waited(us(16));
        assert_eq!(w.window(), us(16));
    }

    #[test]
    fn waits_over_the_cap_shrink_it_to_zero() {
        let mut w = PollWindow::new(PollMode::Adaptive, WaitKind::Work, CAP);
        for _ in 0..4 {
            w.waited(us(50));
        }
        assert_eq!(w.window(), us(64));
        for expect in [32, 16, 8, 4, 0, 0] {
            w.waited(Duration::from_millis(5));
            assert_eq!(w.window(), us(expect));
        }
        // And grows back once waits are short again.
        w.waited(us(50));
        assert_eq!(w.window(), GROW_FROM);
    }

    #[test]
    fn fixed_modes_do_not_move() {
        let mut misses = PollWindow::new(PollMode::Misses, WaitKind::Answer, CAP);
        let mut kicks = PollWindow::new(PollMode::Misses, WaitKind::Work, CAP);
        let mut off = PollWindow::new(PollMode::Off, WaitKind::Answer, CAP);
        for d in [us(1), us(100), Duration::from_secs(1)] {
            misses.waited(d);
            kicks.waited(d);
            off.waited(d);
        }
        assert_eq!(misses.window(), CAP);
        assert!(misses.polls());
        assert_eq!(kicks.window(), Duration::ZERO);
        assert!(!kicks.polls());
        assert_eq!(off.window(), Duration::ZERO);
        assert!(!off.polls());
    }

    #[test]
    fn an_answer_window_starts_at_the_cap_and_shrinks_when_answers_are_late() {
        let mut w = PollWindow::new(PollMode::Adaptive, WaitKind::Answer, CAP);
        assert_eq!(w.window(), CAP);
        w.waited(us(20));
        assert_eq!(w.window(), CAP);
        w.waited(Duration::from_millis(1));
        assert_eq!(w.window(), us(32));
    }

    #[test]
    fn a_zero_cap_never_polls() {
        let mut w = PollWindow::new(PollMode::Adaptive, WaitKind::Work, Duration::ZERO);
        w.waited(us(1));
        assert_eq!(w.window(), Duration::ZERO);
        assert!(!w.polls());
    }

    #[test]
    fn names_round_trip() {
        for name in PollMode::NAMES {
            assert_eq!(name.parse::<PollMode>().unwrap().to_string(), name);
        }
        assert!("sometimes".parse::<PollMode>().is_err());
    }
}
