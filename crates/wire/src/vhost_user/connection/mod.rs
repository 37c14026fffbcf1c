//! vhost-user framing over a `SOCK_STREAM` Unix socket, with file descriptors as SCM_RIGHTS.
//!
//! Receiving: reads take whatever the socket holds (up to 16 KiB), so a pipelined burst costs
//! one system call, and messages are cut from that buffer: the 12-byte header, then exactly
//! `size` payload bytes, surviving short reads and EINTR. Descriptors (received
//! close-on-exec) belong to the message holding the last byte of the read that brought them
//! (see `ReadAhead` for why). The payload cap is checked before anything is allocated; an
//! oversized payload is read past and dropped, so the stream stays in step and the
//! connection lives. Descriptors over the cap (or cut off by the kernel) are closed and the
//! message is refused, also without losing step.
//!
//! Sending: header, payload and descriptors go in one `sendmsg`; a short write is finished
//! without resending the descriptors; EINTR is retried; SIGPIPE is never raised.
//!
//! Sends and receives each hold their own lock, so one connection can be shared by a thread
//! that reads requests and threads that write (the back-end channel's MISS messages);
//! [`Connection::call`] holds both for a request and its reply, so that concurrent callers
//! cannot take each other's replies. The socket is put in blocking mode; a read timeout set on
//! it (`UnixStream::set_read_timeout`) surfaces as a fatal I/O error. Which requests are
//! answered whatever their flags depends on the channel, front-end requests on the main socket
//! or back-end requests on the back-end channel ([`Channel`]). This file knows nothing else
//! of what messages mean.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use zerocopy::{FromBytes, IntoBytes};

use super::header::{flags, FrontendReq, Header, HEADER_SIZE};
use super::payload::LogArea;
use super::request::{BackendRequest, FrontendRequest, Reply, ReplyKind};
use crate::error::WireError;
use crate::poll::{PollMode, PollWindow, WaitKind};

mod exchange;

/// Caps applied to every received message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload accepted, in bytes (the peer can make us allocate this much).
    pub max_payload: usize,
    /// Most file descriptors accepted with one message (at most [`MAX_FDS`]).
    pub max_fds: usize,
}

/// The kernel's limit of descriptors in one SCM_RIGHTS message (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Which requests travel on a connection, which decides how a refused one is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The main socket: front-end requests (`VHOST_USER_*`), answered by the back-end.
    Frontend,
    /// The back-end channel: back-end requests (`VHOST_USER_BACKEND_*`), answered by the
    /// front-end.
    Backend,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 4096,
            max_fds: 8,
        }
    }
}

/// A message as it came off the socket: checked framing, unchecked meaning.
#[derive(Debug)]
pub struct RawMessage {
    /// The header.
    pub header: Header,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// The descriptors that came with it (at most `Limits::max_fds`).
    pub fds: Vec<OwnedFd>,
}

/// One end of a vhost-user socket.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    limits: Limits,
    channel: Channel,
    send_lock: Mutex<()>,
    /// Held while receiving; what was read ahead of the next message.
    recv_lock: Mutex<ReadAhead>,
    call_lock: Mutex<()>,
    /// The next receive waits for an answer that is on its way (see
    /// [`Connection::expect_answer`]).
    expecting: AtomicBool,
}

/// Bytes read ahead of the next message, and the descriptors that came with them.
///
/// One `recvmsg` takes whatever the socket holds (up to [`READ_AHEAD`] bytes), so a burst
/// of pipelined messages costs one system call instead of two per message. Descriptors need
/// care: Linux ends a stream read right after the first chunk that carries descriptors, so
/// the descriptors a read brings belong to the chunk at its end. Every sender we know attaches
/// descriptors to the `sendmsg` that starts the message (QEMU and ours send header, payload
/// and descriptors together; libvhost-user sends the header with the descriptors, then the
/// payload), so the rule is: **descriptors belong to the message that contains the last byte of the read
/// that brought them**. A peer that attaches descriptors elsewhere only mislabels its own
/// messages; the per-message cap still holds.
#[derive(Debug, Default)]
struct ReadAhead {
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    /// Descriptors received, each batch with the stream offset just past the read that
    /// brought it, and whether that read lost some (over the cap, or cut by the kernel).
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>, bool)>,
    /// How long a receive that finds nothing polls before it blocks (it is tuned by the
    /// receives, which hold this lock).
    poll: PollWindow,
}

/// How much one receive asks the socket for.
const READ_AHEAD: usize = 16 * 1024;
/// Control-message room for the most descriptors a message may carry, plus one.
const RECV_CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS + 1));

impl ReadAhead {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        self.offset += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The descriptors of the message occupying stream bytes up to `msg_end`, and whether
    /// any were lost.
    fn take_fds(&mut self, msg_end: u64, max: usize) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut lost = false;
        while self.fds.front().is_some_and(|(end, _, _)| *end <= msg_end) {
            if let Some((_, batch, cut)) = self.fds.pop_front() {
                lost |= cut;
                for fd in batch {
                    if fds.len() < max + 1 {
                        fds.push(fd);
                    } else {
                        lost = true; // closed here
                    }
                }
            }
        }
        (fds, lost)
    }
}

impl Connection {
    /// The main socket (front-end requests), with the default limits.
    pub fn new(sock: UnixStream) -> Self {
        Self::with_limits(sock, Channel::Frontend, Limits::default())
    }

    /// The back-end channel (back-end requests), with the default limits.
    pub fn backend_channel(sock: UnixStream) -> Self {
        Self::with_limits(sock, Channel::Backend, Limits::default())
    }

    /// A connection carrying `channel`'s requests, with `limits` (`max_fds` is clamped to
    /// [`MAX_FDS`]). The socket is switched to blocking mode.
    pub fn with_limits(sock: UnixStream, channel: Channel, limits: Limits) -> Self {
        if let Err(e) = sock.set_nonblocking(false) {
            tracing::warn!(error = %e, "vhost-user: cannot make the socket blocking");
        }
        Connection {
            sock,
            limits: Limits {
                max_fds: limits.max_fds.min(MAX_FDS),
                ..limits
            },
            channel,
            send_lock: Mutex::new(()),
            recv_lock: Mutex::new(ReadAhead::default()),
            call_lock: Mutex::new(()),
            expecting: AtomicBool::new(false),
        }
    }

    /// Before a receive blocks, poll the socket (yielding the CPU between looks) for the
    /// window `mode` and `cap` give ([`PollWindow`], for waits of an answer: under
    /// [`PollMode::Adaptive`] it follows how long receives wait). A thread that blocks costs
    /// a wake-up when the next message comes, several tens of microseconds on a virtual
    /// machine; one that polls sees it at once, at the price of CPU while it waits. Off (the
    /// default) blocks at once. Takes the receive lock: set it before another thread receives.
    pub fn set_busy_poll(&self, mode: PollMode, cap: Duration) {
        self.recv_lock.lock().poll = PollWindow::new(mode, WaitKind::Answer, cap);
    }

    /// The peer is about to send something (it was asked: a MISS went out on the other
    /// channel, and its UPDATE comes here): the next receive that finds nothing polls for the
    /// whole cap, whatever the adaptive window has learnt from the peer's idle times, and
    /// does not teach it.
    pub fn expect_answer(&self) {
        self.expecting.store(true, Ordering::Relaxed);
    }

    /// Try to read, without blocking, until bytes (or the end of the stream) come or the
    /// busy-poll window is over (at once if it is zero); the caller then reads what it still
    /// needs, blocking if need be. Each look is the read itself: one system call, not a
    /// poll and then a read.
    fn spin_read(&self, ra: &mut ReadAhead, window: Duration) -> Result<(), WireError> {
        if window.is_zero() {
            return Ok(());
        }
        let start = Instant::now();
        loop {
            if self.read_some(ra, HEADER_SIZE, None, false)?.is_some() {
                return Ok(());
            }
            if start.elapsed() >= window {
                return Ok(());
            }
            std::thread::yield_now();
        }
    }

    /// The requests this connection carries.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The socket (to poll it, or shut it down).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// The caps in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// One read from the socket into `ra`, with room for at least `want` unparsed bytes;
    /// `msg_end` is where the message being read ends in the stream, once its header is
    /// known. Returns the number of bytes read (0 at the end of the stream).
    fn read_more(
        &self,
        ra: &mut ReadAhead,
        want: usize,
        msg_end: Option<u64>,
    ) -> Result<usize, WireError> {
        self.read_some(ra, want, msg_end, true)
            .map(|n| n.unwrap_or(0))
    }

    /// [`Self::read_more`], or, with `wait` false, only what can be read without blocking:
    /// `Ok(None)` when nothing can.
    fn read_some(
        &self,
        ra: &mut ReadAhead,
        want: usize,
        msg_end: Option<u64>,
        wait: bool,
    ) -> Result<Option<usize>, WireError> {
        if ra.start > 0 {
            ra.buf.copy_within(ra.start..ra.end, 0);
            ra.end -= ra.start;
            ra.start = 0;
        }
        let room = want.max(READ_AHEAD);
        if ra.buf.len() < room {
            ra.buf.resize(room, 0);
        }
        // One more slot than allowed, so that a surplus is seen rather than cut silently. On
        // the stack: the busy-poll loop calls this for every look.
        let mut space = [MaybeUninit::<u8>::uninit(); RECV_CMSG_SPACE];
        let want_space = rustix::cmsg_space!(ScmRights(self.limits.max_fds + 1));
        let space = &mut space[..want_space.min(RECV_CMSG_SPACE)];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut *space);
            let end = ra.end;
            let mut iov = [IoSliceMut::new(&mut ra.buf[end..])];
            let flags = if wait {
                RecvFlags::CMSG_CLOEXEC
            } else {
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT
            };
            let r = match recvmsg(&self.sock, &mut iov, &mut control, flags) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if !wait => return Ok(None),
                Err(e) => return Err(WireError::Io(e.into())),
            };
            let mut fds = Vec::new();
            let mut lost = r.flags.contains(ReturnFlags::CTRUNC);
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = msg {
                    for fd in received {
                        // Past the cap, descriptors are closed as they come (a peer sending
                        // a few with every byte must not fill our descriptor table).
                        if fds.len() <= self.limits.max_fds {
                            fds.push(fd);
                        } else {
                            lost = true;
                        }
                    }
                }
            }
            ra.end += r.bytes;
            if !fds.is_empty() || lost {
                let read_end = ra.offset + ra.len() as u64;
                // Batches that all belong to the message being read are kept as one, under
                // the cap: a peer sending descriptors with every payload byte holds at most
                // the cap plus one read's worth (with every header byte, 12 reads' worth).
                let current = |e: u64| msg_end.is_some_and(|m| e <= m);
                match ra.fds.back_mut() {
                    Some(back) if current(back.0) && current(read_end) => {
                        back.0 = read_end;
                        back.2 |= lost;
                        for fd in fds {
                            if back.1.len() <= self.limits.max_fds {
                                back.1.push(fd);
                            } else {
                                back.2 = true; // closed here
                            }
                        }
                    }
                    _ => ra.fds.push_back((read_end, fds, lost)),
                }
            }
            return Ok(Some(r.bytes));
        }
    }

    /// Receive one message.
    ///
    /// Errors for which [`WireError::is_fatal`] is false leave the stream in step: the next
    /// call reads the next message.
    pub fn recv(&self) -> Result<RawMessage, WireError> {
        let mut guard = self.recv_lock.lock();
        let ra = &mut *guard;
        // A wait for the next message (nothing read ahead): polled, then timed to tune the
        // window.
        let waiting = (ra.len() == 0 && ra.poll.polls()).then(Instant::now);
        let expected = waiting.is_some() && self.expecting.swap(false, Ordering::Relaxed);
        if waiting.is_some() {
            let window = if expected {
                ra.poll.cap()
            } else {
                ra.poll.window()
            };
            self.spin_read(ra, window)?;
        }
        while ra.len() < HEADER_SIZE {
            if self.read_more(ra, HEADER_SIZE, None)? == 0 {
                return Err(match ra.len() {
                    0 => WireError::Disconnected,
                    got => WireError::Truncated {
                        expected: HEADER_SIZE,
                        got,
                    },
                });
            }
        }
        if let (Some(since), false) = (waiting, expected) {
            ra.poll.waited(since.elapsed());
        }
        let header = Header::read_from_bytes(&ra.bytes()[..HEADER_SIZE]).map_err(|_| {
            WireError::Truncated {
                expected: HEADER_SIZE,
                got: HEADER_SIZE,
            }
        })?;
        let size = header.size as usize;
        let msg_end = ra.offset + HEADER_SIZE as u64 + u64::from(header.size);

        if size > self.limits.max_payload {
            // Read past it without keeping it, so the stream stays in step.
            ra.consume(HEADER_SIZE);
            let mut left = size;
            loop {
                let n = left.min(ra.len());
                ra.consume(n);
                left -= n;
                drop(ra.take_fds(msg_end, self.limits.max_fds)); // closes them
                if left == 0 {
                    break;
                }
                if self.read_more(ra, 0, Some(msg_end))? == 0 {
                    return Err(WireError::Truncated {
                        expected: HEADER_SIZE + size,
                        got: HEADER_SIZE + size - left,
                    });
                }
            }
            return Err(WireError::PayloadTooLarge {
                size: header.size,
                max: self.limits.max_payload,
                header,
            });
        }
        let total = HEADER_SIZE + size;
        while ra.len() < total {
            if self.read_more(ra, total, Some(msg_end))? == 0 {
                return Err(WireError::Truncated {
                    expected: total,
                    got: ra.len(),
                });
            }
        }
        let payload = ra.bytes()[HEADER_SIZE..total].to_vec();
        ra.consume(total);
        let (fds, truncated) = ra.take_fds(msg_end, self.limits.max_fds);
        drop(guard);

        if truncated || fds.len() > self.limits.max_fds {
            let got = fds.len();
            drop(fds); // closes them
            return Err(WireError::TooManyFds {
                got,
                max: self.limits.max_fds,
                header,
            });
        }
        if header.version() != flags::VERSION_1 {
            return Err(WireError::BadVersion {
                request: header.request,
                flags: header.flags,
                header,
            });
        }
        if header.flags & !flags::KNOWN != 0 {
            return Err(WireError::UnknownFlags {
                request: header.request,
                flags: header.flags,
                header,
            });
        }
        tracing::trace!(
            request = header.request,
            flags = %format_args!("{:#x}", header.flags),
            size = header.size,
            fds = fds.len(),
            "vhost-user: received"
        );
        Ok(RawMessage {
            header,
            payload,
            fds,
        })
    }

    /// Send one message: `header` (its size must equal `payload.len()`), `payload`, `fds`.
    pub fn send(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), WireError> {
        self.send_inner(header, payload, fds, false).map(|_| ())
    }

    /// Send one message unless that would block: `Ok(false)` when the socket buffer is full
    /// or another thread has been sending for more than a millisecond (nothing was sent).
    /// Once the first byte is out the rest is sent even if it has to wait, so that the
    /// stream stays framed. For messages whose loss a timeout repairs (MISS) and that must
    /// never block their sender against a peer that is not reading.
    pub fn try_send(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<bool, WireError> {
        self.send_inner(header, payload, fds, true)
    }

    fn send_inner(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        nonblocking: bool,
    ) -> Result<bool, WireError> {
        if header.size as usize != payload.len() {
            return Err(WireError::PayloadSize {
                request: header.request,
                expected: header.size as usize,
                got: payload.len(),
            });
        }
        tracing::trace!(
            request = header.request,
            flags = %format_args!("{:#x}", header.flags),
            size = header.size,
            fds = fds.len(),
            "vhost-user: sending"
        );
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds {
                got: fds.len(),
                max: MAX_FDS,
                header: *header,
            });
        }
        let hbytes = header.as_bytes();
        let total = hbytes.len() + payload.len();
        let Some(_guard) = self.lock_send(nonblocking) else {
            return Ok(false);
        };
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut sent = 0;
        while sent < total {
            let (h, p) = if sent < hbytes.len() {
                (&hbytes[sent..], payload)
            } else {
                (&hbytes[..0], &payload[sent - hbytes.len()..])
            };
            let iov = [IoSlice::new(h), IoSlice::new(p)];
            let mut control = SendAncillaryBuffer::new(&mut space);
            // Descriptors go with the first bytes only. `space` was sized for them, so the
            // push cannot fail; if it did, nothing has been sent yet.
            if sent == 0 && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(WireError::TooManyFds {
                    got: fds.len(),
                    max: MAX_FDS,
                    header: *header,
                });
            }
            let flags = if nonblocking && sent == 0 {
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT
            } else {
                SendFlags::NOSIGNAL
            };
            match sendmsg(&self.sock, &iov, &mut control, flags) {
                Ok(n) => sent += n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if nonblocking && sent == 0 => return Ok(false),
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(true)
    }

    /// Send a front-end request; returns its header.
    pub fn send_request(
        &self,
        req: &FrontendRequest,
        need_reply: bool,
    ) -> Result<Header, WireError> {
        let payload = req.encode_payload()?;
        let header = Header::new(req.req().code(), payload.len() as u32, need_reply);
        self.send(&header, &payload, &req.fds())?;
        Ok(header)
    }

    /// Send a back-end request; returns its header.
    pub fn send_backend_request(
        &self,
        req: &BackendRequest,
        need_reply: bool,
    ) -> Result<Header, WireError> {
        let payload = req.encode_payload()?;
        let header = Header::new(req.req().code(), payload.len() as u32, need_reply);
        self.send(&header, &payload, &[])?;
        Ok(header)
    }

    /// Send a back-end request that needs no reply unless that would block (see
    /// [`Connection::try_send`]); `Ok(false)` when it was not sent.
    pub fn try_send_backend_request(&self, req: &BackendRequest) -> Result<bool, WireError> {
        let payload = req.encode_payload()?;
        let header = Header::new(req.req().code(), payload.len() as u32, false);
        self.try_send(&header, &payload, &[])
    }

    /// Several back-end requests that need no reply, in one write unless that would block
    /// (see [`Connection::try_send`]); `Ok(false)` when none was sent.
    pub fn try_send_backend_requests(&self, reqs: &[BackendRequest]) -> Result<bool, WireError> {
        let mut bytes = Vec::with_capacity(reqs.len() * (HEADER_SIZE + 32));
        for r in reqs {
            let payload = r.encode_payload()?;
            let header = Header::new(r.req().code(), payload.len() as u32, false);
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&payload);
        }
        self.send_raw(&bytes, true)
    }

    /// The send lock; non-blocking senders give up (`None`) after a millisecond.
    fn lock_send(&self, nonblocking: bool) -> Option<parking_lot::MutexGuard<'_, ()>> {
        if nonblocking {
            self.send_lock
                .try_lock_for(std::time::Duration::from_millis(1))
        } else {
            Some(self.send_lock.lock())
        }
    }

    /// Whole messages already framed, in one write (no descriptors).
    fn send_raw(&self, bytes: &[u8], nonblocking: bool) -> Result<bool, WireError> {
        let Some(_guard) = self.lock_send(nonblocking) else {
            return Ok(false);
        };
        let mut sent = 0;
        while sent < bytes.len() {
            let flags = if nonblocking && sent == 0 {
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT
            } else {
                SendFlags::NOSIGNAL
            };
            match rustix::net::send(&self.sock, &bytes[sent..], flags) {
                Ok(n) => sent += n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if nonblocking && sent == 0 => return Ok(false),
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(true)
    }
}

/// How a front-end request is answered whatever NEED_REPLY says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// With a value (features, a count, a config window, a vring base...).
    Value,
    /// With a `u64` status, 0 for success.
    Status,
}

/// How the request with `header` on `channel` is always answered, if it is: [`answer`] for
/// front-end requests, except that SET_LOG_BASE is answered in its shared-memory form (a
/// 16-byte log area) only; the old 8-byte form is not, and a reply would be read as the
/// answer to the next request. Back-end requests are answered only on NEED_REPLY.
pub fn answer_for(channel: Channel, header: &Header) -> Option<Answer> {
    match channel {
        Channel::Frontend
            if header.request == FrontendReq::SetLogBase.code()
                && header.size as usize != std::mem::size_of::<LogArea>() =>
        {
            None
        }
        Channel::Frontend => answer(header.request),
        Channel::Backend => None,
    }
}

/// How the front-end request `code` is always answered, if it is (including requests this
/// crate does not decode); `None` for requests answered only on NEED_REPLY.
pub fn answer(code: u32) -> Option<Answer> {
    use super::header::FrontendReq as Q;
    match Q::from_code(code)? {
        Q::SetLogBase
        | Q::GetFeatures
        | Q::GetVringBase
        | Q::GetProtocolFeatures
        | Q::GetQueueNum
        | Q::GetConfig
        | Q::CreateCryptoSession
        | Q::PostcopyAdvise
        | Q::GetInflightFd
        | Q::GetMaxMemSlots
        | Q::GetStatus
        | Q::GetSharedObject
        | Q::GetShmemConfig => Some(Answer::Value),
        Q::SetDeviceStateFd | Q::CheckDeviceState => Some(Answer::Status),
        _ => None,
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
