//! Rate limits for what a guest can make a queue do in a loop: log a warning about a chain it
//! built wrong, or send ACCESS_FAIL for an access the IOMMU denied (QEMU logs an error for
//! each one it receives, unthrottled). Each queue's worker owns its limiters, so nothing here
//! locks; what was held back is counted by the caller, and shown in the stats line.
//!
//! This file decides only whether to go ahead; it never logs or sends anything itself.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use iotlb::Access;

/// Warnings a queue logs per [`WINDOW`]; the rest are counted (and logged at debug level).
pub(crate) const WARNINGS_PER_WINDOW: u32 = 10;
/// ACCESS_FAILs a queue sends per [`WINDOW`], whatever the pages.
pub(crate) const ACCESS_FAILS_PER_WINDOW: u32 = 16;
/// The window of both limits, and how long one page and direction gets no second ACCESS_FAIL.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);
/// Pages whose last ACCESS_FAIL a queue remembers.
const RECENT_PAGES: usize = 64;

/// At most `per_window` events per [`WINDOW`] (a fixed window: simple, and the burst at a
/// window's edge is at most twice the rate).
#[derive(Debug)]
pub(crate) struct Limit {
    per_window: u32,
    start: Option<Instant>,
    used: u32,
    /// Events held back since the last one let through.
    held: u64,
}

impl Limit {
    pub(crate) fn new(per_window: u32) -> Self {
        Limit {
            per_window,
            start: None,
            used: 0,
            held: 0,
        }
    }

    /// Whether an event at `now` may go ahead. `Some(held)`: yes, and `held` events were held
    /// back before it (for a "n more suppressed" note); `None`: no (counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
        {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used >= self.per_window {
            self.held += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.held))
    }
}

/// ACCESS_FAIL limits of one queue: one per page and direction per [`WINDOW`], and
/// [`ACCESS_FAILS_PER_WINDOW`] in all.
#[derive(Debug)]
pub(crate) struct AccessFailLimit {
    total: Limit,
    /// (page, direction, when its ACCESS_FAIL went), oldest first.
    recent: VecDeque<(u64, Access, Instant)>,
}

impl AccessFailLimit {
    pub(crate) fn new() -> Self {
        AccessFailLimit {
            total: Limit::new(ACCESS_FAILS_PER_WINDOW),
            recent: VecDeque::with_capacity(RECENT_PAGES),
        }
    }

    /// Whether to send an ACCESS_FAIL for `page` and `access` at `now`.
    pub(crate) fn allow(&mut self, page: u64, access: Access, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|&(_, _, t)| now.saturating_duration_since(t) >= WINDOW)
        {
            self.recent.pop_front();
        }
        if self
            .recent
            .iter()
            .any(|&(p, a, _)| p == page && a == access)
        {
            return false;
        }
        if self.total.allow(now).is_none() {
            return false;
        }
        if self.recent.len() == RECENT_PAGES {
            self.recent.pop_front();
        }
        self.recent.push_back((page, access, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_lets_its_count_through_per_window_and_says_how_many_it_held() {
        let t0 = Instant::now();
        let mut l = Limit::new(3);
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_millis(10)), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(
            l.allow(t0 + WINDOW),
            Some(5),
            "a new window, and the count held"
        );
        assert_eq!(l.allow(t0 + WINDOW), Some(0));
    }

    #[test]
    fn one_access_fail_per_page_and_direction_per_window() {
        let t0 = Instant::now();
        let mut l = AccessFailLimit::new();
        assert!(l.allow(0x1000, Access::Read, t0));
        assert!(!l.allow(0x1000, Access::Read, t0 + Duration::from_millis(999)));
        assert!(l.allow(0x1000, Access::Write, t0), "the other direction");
        assert!(l.allow(0x2000, Access::Read, t0), "another page");
        assert!(l.allow(0x1000, Access::Read, t0 + WINDOW), "a window later");
    }

    #[test]
    fn a_queue_sends_a_bounded_number_of_access_fails_per_window() {
        let t0 = Instant::now();
        let mut l = AccessFailLimit::new();
        let sent = (0..1000u64)
            .filter(|p| l.allow(p << 12, Access::Read, t0))
            .count();
        assert_eq!(sent, ACCESS_FAILS_PER_WINDOW as usize);
        assert!(l.allow(0x99_000, Access::Read, t0 + WINDOW));
    }
}
