//! Where a net device's frames go and come from: one bounded queue of frames per queue
//! pair, waiting for the pair's receive queue, and the loopback that fills it from the
//! pair's transmit queue. Flow control, not loss: a transmit queue whose pair is full waits
//! (its handler is not ready) until the receive side has taken a frame, and each side wakes
//! the other's worker on the change that makes it ready.
//!
//! No guest memory here: frames are bytes the handlers copied.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Frames a pair holds for its receive queue before its transmit side waits.
pub const PAIR_FRAMES: usize = 256;

/// Frames waiting for one pair's receive queue, and spent buffers kept for reuse (no
/// allocation per frame once warm).
#[derive(Debug, Default)]
struct Pair {
    frames: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

/// What happened to the pair's queue, for whom to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Edge {
    /// It was empty (the receive side may sleep on it) or full (the transmit side may).
    Crossed,
    /// Nobody waits on this change.
    None,
}

/// One pair's queue, and its length readable without the lock (a receive worker polling
/// for a frame looks at it in a loop; taking the lock there would contend with the
/// transmit side pushing).
#[derive(Debug, Default)]
struct Slot {
    pair: Mutex<Pair>,
    /// `pair.frames.len()`, stored under the lock.
    queued: AtomicUsize,
}

/// The frames of every pair of one device.
#[derive(Debug)]
pub struct Packets {
    pairs: Vec<Slot>,
}

impl Packets {
    /// Queues for `pairs` pairs.
    pub fn new(pairs: u16) -> Self {
        Packets {
            pairs: (0..pairs).map(|_| Slot::default()).collect(),
        }
    }

    /// Whether `pair` has room for another frame.
    pub(super) fn has_room(&self, pair: u16) -> bool {
        self.pairs
            .get(usize::from(pair))
            .is_some_and(|p| p.queued.load(Ordering::Acquire) < PAIR_FRAMES)
    }

    /// A buffer to copy a frame into (a spent one if there is one).
    pub(super) fn buffer(&self, pair: u16) -> Vec<u8> {
        let mut b = self
            .pairs
            .get(usize::from(pair))
            .and_then(|p| p.pair.lock().spare.pop())
            .unwrap_or_default();
        b.clear();
        b
    }

    /// Queue `frame` for `pair`'s receive queue; `Crossed` if it was empty. A frame beyond
    /// the bound (a caller that did not ask [`Packets::has_room`]) is dropped: `None` and
    /// false.
    pub(super) fn push(&self, pair: u16, frame: Vec<u8>) -> (Edge, bool) {
        let Some(slot) = self.pairs.get(usize::from(pair)) else {
            return (Edge::None, false);
        };
        let mut p = slot.pair.lock();
        if p.frames.len() >= PAIR_FRAMES {
            return (Edge::None, false);
        }
        p.frames.push_back(frame);
        slot.queued.store(p.frames.len(), Ordering::Release);
        let edge = if p.frames.len() == 1 {
            Edge::Crossed
        } else {
            Edge::None
        };
        (edge, true)
    }

    /// The next frame for `pair`'s receive queue; `Crossed` if the queue was full.
    pub(super) fn pop(&self, pair: u16) -> Option<(Vec<u8>, Edge)> {
        let slot = self.pairs.get(usize::from(pair))?;
        // Nothing queued: no lock. A frame pushed just after is seen at the next look (its
        // push reports the edge, and the receive side is woken).
        if slot.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut p = slot.pair.lock();
        let full = p.frames.len() >= PAIR_FRAMES;
        let frame = p.frames.pop_front()?;
        slot.queued.store(p.frames.len(), Ordering::Release);
        Some((frame, if full { Edge::Crossed } else { Edge::None }))
    }

    /// Give a spent buffer back for reuse.
    pub(super) fn recycle(&self, pair: u16, buf: Vec<u8>) {
        if let Some(p) = self.pairs.get(usize::from(pair)) {
            let mut p = p.pair.lock();
            if p.spare.len() < PAIR_FRAMES {
                p.spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edges_are_reported_where_a_side_may_sleep() {
        let p = Packets::new(1);
        assert_eq!(p.push(0, vec![1]), (Edge::Crossed, true));
        assert_eq!(p.push(0, vec![2]), (Edge::None, true));
        assert_eq!(p.pop(0), Some((vec![1], Edge::None)));
        assert_eq!(p.pop(0), Some((vec![2], Edge::None)));
        assert_eq!(p.pop(0), None);
        for i in 0..PAIR_FRAMES {
            assert!(p.has_room(0));
            p.push(0, vec![i as u8]);
        }
        assert!(!p.has_room(0));
        assert_eq!(
            p.push(0, vec![0]),
            (Edge::None, false),
            "past the bound: refused"
        );
        assert_eq!(p.pop(0).map(|(_, e)| e), Some(Edge::Crossed), "was full");
        assert!(p.has_room(0));
    }

    #[test]
    fn an_unknown_pair_is_refused_not_a_panic() {
        let p = Packets::new(1);
        assert!(!p.has_room(3));
        assert_eq!(p.push(3, vec![1]), (Edge::None, false));
        assert_eq!(p.pop(3), None);
        p.recycle(3, vec![]);
    }
}
