//! The back-end channel (SET_BACKEND_REQ_FD): the one place MISS and ACCESS_FAIL messages
//! are sent from, and counted.
//!
//! Nothing here ever blocks: the front-end may be busy waiting for one of our replies and not
//! reading, so a message that does not fit in the socket now is dropped (a MISS is sent again
//! on the miss timeout; an ACCESS_FAIL is only news). ACCESS_FAILs go through the sending
//! queue's rate limit ([`AccessFailLimit`]). This file decides nothing about misses: when to
//! send one is the worker's business.
//!
//! One exception to "at once": a MISS raised while the front-end's own messages wait unread
//! on the connection (a pre-pushed UPDATE sent just before the chain that needs it, say) is
//! held ([`BackendChannel::miss_unless_pending`]) until the connection thread has read them
//! ([`BackendChannel::release_held`]), and not sent at all if one of them answered it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use iotlb::Access;
use parking_lot::{Mutex, RwLock};
use wire::vhost_user::{BackendRequest, Connection};
use wire::IotlbMsg;

use crate::ratelimit::AccessFailLimit;
use crate::stats::EngineCounters;

/// IOTLB pages (ACCESS_FAILs are limited per page, as MISSes are keyed).
const PAGE: u64 = iotlb::MISS_PAGE_SIZE;

/// How long a MISS may be held for the front-end's unread messages before it goes anyway
/// (a front-end that keeps the connection busy must not starve it).
pub(crate) const HOLD_AT_MOST: Duration = Duration::from_micros(200);

/// A MISS held until the connection thread has read what the front-end sent.
#[derive(Debug, Clone, Copy)]
struct HeldMiss {
    queue: u16,
    iova: u64,
    access: Access,
    since: Instant,
}

/// The back-end channel of a connection, once the front-end has given one.
#[derive(Debug, Default)]
pub(crate) struct BackendChannel {
    conn: RwLock<Option<Arc<Connection>>>,
    /// The front-end's connection, only to ask whether it has unread messages.
    frontend: OnceLock<Arc<Connection>>,
    held: Mutex<Vec<HeldMiss>>,
    any_held: AtomicBool,
}

impl BackendChannel {
    /// SET_BACKEND_REQ_FD: from now on, messages go to `sock` (a new one replaces the old).
    pub(crate) fn connect(&self, sock: UnixStream) {
        *self.conn.write() = Some(Arc::new(Connection::backend_channel(sock)));
    }

    /// The front-end's connection, whose unread messages a MISS may wait for.
    pub(crate) fn watch_frontend(&self, conn: Arc<Connection>) {
        let _ = self.frontend.set(conn);
    }

    /// A worker's MISS: sent now ([`BackendChannel::miss`]), unless the front-end has sent
    /// messages the connection thread has not read yet: one of them may be the UPDATE (a
    /// pre-pushed mapping races the chain that uses it), so the MISS is held until the
    /// connection thread has read them, and then sent only if still unanswered. True if it
    /// was held.
    ///
    /// The MISS is put in the held list first and the front-end's connection looked at
    /// after: the connection thread reads a message and only then looks whether anything is
    /// held (both sequentially consistent). So either it sees ours, or it looked before we
    /// put it there, and then it had already read what it was reading when we look, and we
    /// see nothing unread (unless the front-end sent more, which it reads and then looks
    /// again) and send the MISS ourselves. Looking first and holding after would leave a
    /// window in which the connection thread reads the last message, finds nothing held and
    /// blocks, and the MISS waits for the miss timeout.
    pub(crate) fn miss_unless_pending(
        &self,
        stats: &EngineCounters,
        queue: u16,
        iova: u64,
        access: Access,
    ) -> bool {
        let Some(frontend) = self.frontend.get() else {
            self.miss(stats, Some(queue), iova, access);
            return false;
        };
        let since = Instant::now();
        self.held.lock().push(HeldMiss {
            queue,
            iova,
            access,
            since,
        });
        self.any_held.store(true, Ordering::SeqCst);
        if frontend.readable_now() {
            EngineCounters::add(&stats.held_misses, 1);
            return true;
        }
        // Nothing unread: take it back (unless the connection thread already released it)
        // and send it now.
        let mine = {
            let mut held = self.held.lock();
            let at = held.iter().position(|h| {
                h.queue == queue && h.iova == iova && h.access == access && h.since == since
            });
            let mine = at.map(|i| held.swap_remove(i));
            self.any_held.store(!held.is_empty(), Ordering::SeqCst);
            mine
        };
        if mine.is_none() {
            // The connection thread saw it in the list and released it meanwhile.
            EngineCounters::add(&stats.held_misses, 1);
            return true;
        }
        self.miss(stats, Some(queue), iova, access);
        false
    }

    /// A MISS went out: its UPDATE comes on the front-end's connection, whose next wait
    /// polls for it.
    fn answer_due(&self) {
        if let Some(c) = self.frontend.get() {
            c.expect_answer();
        }
    }

    /// Whether MISSes are held (a load: the connection thread asks after every message).
    pub(crate) fn has_held(&self) -> bool {
        self.any_held.load(Ordering::SeqCst)
    }

    /// The connection thread has read what was readable (or a held MISS waited
    /// [`HOLD_AT_MOST`]: `caught_up` false): send the held MISSes that `answered` does not
    /// say were answered meanwhile; count those that were.
    pub(crate) fn release_held(
        &self,
        stats: &EngineCounters,
        caught_up: bool,
        answered: impl Fn(u64, Access) -> bool,
    ) {
        let due: Vec<HeldMiss> = {
            let mut held = self.held.lock();
            let now = Instant::now();
            let (due, keep): (Vec<HeldMiss>, Vec<HeldMiss>) = held
                .drain(..)
                .partition(|h| caught_up || now.duration_since(h.since) >= HOLD_AT_MOST);
            *held = keep;
            self.any_held.store(!held.is_empty(), Ordering::SeqCst);
            due
        };
        for h in due {
            if answered(h.iova, h.access) {
                EngineCounters::add(&stats.held_answered, 1);
            } else {
                self.miss(stats, Some(h.queue), h.iova, h.access);
            }
        }
    }

    /// The connection ended.
    pub(crate) fn disconnect(&self) {
        *self.conn.write() = None;
    }

    /// Send a MISS for `iova` (counted in `misses_sent` whether or not it fitted: the miss
    /// timeout sends a dropped one again). `queue` is for the logs.
    pub(crate) fn miss(
        &self,
        stats: &EngineCounters,
        queue: Option<u16>,
        iova: u64,
        access: Access,
    ) {
        EngineCounters::add(&stats.misses_sent, 1);
        let msg = IotlbMsg::Miss {
            iova,
            perm: access.as_perm(),
        };
        self.send(queue, &msg, "a miss");
        self.answer_due();
    }

    /// Send MISSes for the chains ahead of the one that missed, in one write. True if they
    /// went out (then counted in `misses_sent` and `prefetched`); false if the socket had no
    /// room for all of them, or there is no channel (nothing sent).
    pub(crate) fn misses_ahead(
        &self,
        stats: &EngineCounters,
        queue: u16,
        misses: &[(u64, Access)],
    ) -> bool {
        let msgs: Vec<BackendRequest> = misses
            .iter()
            .map(|&(iova, access)| {
                BackendRequest::IotlbMsg(IotlbMsg::Miss {
                    iova,
                    perm: access.as_perm(),
                })
            })
            .collect();
        let Some(conn) = self.conn.read().clone() else {
            return false;
        };
        let sent = match conn.try_send_backend_requests(&msgs) {
            Ok(true) => true,
            Ok(false) => {
                tracing::debug!(
                    queue,
                    "vhost-user: back-end channel full; MISSes not sent ahead"
                );
                false
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "vhost-user: back-end channel send failed");
                false
            }
        };
        if sent {
            self.answer_due();
            let n = msgs.len() as u64;
            EngineCounters::add(&stats.misses_sent, n);
            EngineCounters::add(&stats.prefetched, n);
        }
        sent
    }

    /// An access the IOMMU denied to `queue`: send ACCESS_FAIL unless the queue's `limit`
    /// holds it back (one per page and direction a second, a bounded number in all); counted
    /// in `access_fails_sent` or `access_fails_suppressed`.
    pub(crate) fn access_fail(
        &self,
        stats: &EngineCounters,
        queue: u16,
        limit: &mut AccessFailLimit,
        iova: u64,
        access: Access,
    ) {
        if !limit.allow(iova & !(PAGE - 1), access, std::time::Instant::now()) {
            EngineCounters::add(&stats.access_fails_suppressed, 1);
            return;
        }
        EngineCounters::add(&stats.access_fails_sent, 1);
        let msg = IotlbMsg::AccessFail {
            iova,
            perm: access.as_perm(),
        };
        self.send(Some(queue), &msg, "an access failure");
    }

    /// Whether the front-end has not read everything we sent it yet.
    pub(crate) fn peer_behind(&self) -> bool {
        self.conn
            .read()
            .as_ref()
            .is_some_and(|c| unread_by_peer(c.as_fd()).is_some_and(|n| n > 0))
    }

    fn send(&self, queue: Option<u16>, msg: &IotlbMsg, what: &str) {
        let Some(conn) = self.conn.read().clone() else {
            tracing::warn!(
                queue,
                "vhost-user: no back-end channel (SET_BACKEND_REQ_FD) to report {what} on"
            );
            return;
        };
        match conn.try_send_backend_request(&BackendRequest::IotlbMsg(*msg)) {
            Ok(true) => {}
            Ok(false) => tracing::debug!(
                queue,
                "vhost-user: back-end channel full; {what} not reported (a MISS goes again on timeout)"
            ),
            Err(e) => tracing::warn!(queue, error = %e, "vhost-user: back-end channel send failed"),
        }
    }
}

/// What we sent on a socket that the peer has not read yet (`SIOCOUTQ`; for a Unix stream
/// socket the size of the buffers holding it, not the byte count: zero exactly when the
/// peer has read everything); `None` if the socket cannot tell.
fn unread_by_peer(sock: BorrowedFd<'_>) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket writes one int through the pointer, which
    // points to `n`, live and writable for the call; the fd is borrowed, so it is open.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0).then(|| usize::try_from(n).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unread_by_peer_is_zero_once_the_peer_has_read() {
        use std::io::{Read, Write};
        let (mut a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(unread_by_peer(a.as_fd()), Some(0));
        a.write_all(&[7u8; 60]).unwrap();
        assert!(unread_by_peer(a.as_fd()).is_some_and(|n| n > 0));
        let mut buf = [0u8; 60];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(unread_by_peer(a.as_fd()), Some(0));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(unread_by_peer(f.as_fd()), None, "not a socket");
    }

    /// A channel whose front-end connection is `fe` (its peer end returned, to write "unread
    /// messages" into), and the front-end's end of the back-end channel.
    fn channel() -> (BackendChannel, UnixStream, Connection) {
        let ch = BackendChannel::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        ch.connect(ours);
        let (fe, fe_peer) = UnixStream::pair().unwrap();
        ch.watch_frontend(Arc::new(Connection::new(fe)));
        (ch, fe_peer, Connection::backend_channel(theirs))
    }

    fn next_miss(chan: &Connection) -> Option<u64> {
        if !chan.readable_now() {
            return None;
        }
        let m = chan.recv().unwrap();
        match BackendRequest::decode(&m.header, &m.payload, m.fds).unwrap() {
            BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, .. }) => Some(iova),
            other => panic!("not a MISS: {other:?}"),
        }
    }

    #[test]
    fn a_miss_is_held_only_while_the_front_end_has_unread_messages() {
        use std::io::Write;
        let stats = EngineCounters::default();
        let (ch, mut fe_peer, chan) = channel();
        // Nothing unread: sent at once, nothing left held.
        assert!(!ch.miss_unless_pending(&stats, 0, 0x1000, Access::Read));
        assert_eq!(next_miss(&chan), Some(0x1000));
        assert!(!ch.has_held());
        // A message unread (the UPDATE may be in it): held, sent once the connection thread
        // has read it and found it did not answer the MISS.
        fe_peer.write_all(&[0u8; 12]).unwrap();
        assert!(ch.miss_unless_pending(&stats, 0, 0x2000, Access::Write));
        assert_eq!(next_miss(&chan), None);
        assert!(ch.has_held());
        ch.release_held(&stats, true, |_, _| false);
        assert_eq!(next_miss(&chan), Some(0x2000));
        assert!(!ch.has_held());
        // One it did answer is not sent at all.
        assert!(ch.miss_unless_pending(&stats, 1, 0x3000, Access::Read));
        ch.release_held(&stats, true, |iova, _| iova == 0x3000);
        assert_eq!(next_miss(&chan), None);
        assert_eq!(stats.held_misses.load(Ordering::Relaxed), 2);
        assert_eq!(stats.held_answered.load(Ordering::Relaxed), 1);
    }
}
