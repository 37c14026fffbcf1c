//! vhost-user framing and request decoding, over a real Unix socket with real descriptors.
//!
//! Input: the first byte `b` says how many descriptors to attach, `b % 10` (0..=9, one more
//! than the default cap of 8), and where: with the byte at offset `4 * (b / 10)` of the stream
//! (0 for `b < 10`); the rest is the raw byte stream a peer sends (headers and payloads,
//! possibly several messages, possibly cut short). The bytes go out with `sendmsg` (one call,
//! or two when the descriptors start later) with the descriptors as SCM_RIGHTS, bypassing
//! `Connection::send` (which would refuse a header whose size does not match its payload),
//! and the write side is shut down.
//! The other end is a `Connection` that receives until a fatal error and decodes each message
//! as a front-end request, a back-end request and every kind of reply.
//!
//! Checked: nothing panics; received messages respect the framing rules and limits; anything
//! that decodes re-encodes and decodes to the same thing; the replies are exactly what
//! `Connection::ack` and `Connection::reject` promise, in order (a status for NEED_REPLY, an
//! empty reply to a failed request that always has a reply of its own); descriptors are never
//! leaked (the count in /proc/self/fd stays bounded across runs).

#![no_main]

use std::fs::File;
use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use wire::vhost_user::{
    answer_for, flags, Answer, BackendRequest, Channel, Connection, DecodeLimits, FrontendRequest,
    Header, Limits, Reply, ReplyKind, HEADER_SIZE,
};
use wire::WireError;

/// Most descriptors one input attaches.
const MAX_ATTACHED: usize = 9;
/// Inputs longer than this are cut, so that one `sendmsg` always fits the socket buffer.
const MAX_STREAM: usize = 64 * 1024;
/// How often (in runs) the open descriptors are counted.
const FD_CHECK_EVERY: usize = 1000;
/// How many more open descriptors than at the first count are tolerated.
const FD_SLACK: usize = 32;

fn dev_null() -> BorrowedFd<'static> {
    static DEV_NULL: OnceLock<File> = OnceLock::new();
    DEV_NULL
        .get_or_init(|| File::open("/dev/null").expect("open /dev/null"))
        .as_fd()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

fn check_fd_leak() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static BASELINE: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    if !run.is_multiple_of(FD_CHECK_EVERY) {
        return;
    }
    let now = open_fds();
    if run == 0 {
        BASELINE.store(now, Ordering::Relaxed);
        return;
    }
    let base = BASELINE.load(Ordering::Relaxed);
    assert!(
        now <= base + FD_SLACK,
        "descriptor leak: {now} open after {run} runs, {base} after the first"
    );
}

/// Send `bytes` with `nfds` copies of /dev/null attached to the byte at `fds_at`.
fn send_raw(peer: &UnixStream, bytes: &[u8], nfds: usize, fds_at: usize) {
    let fds_at = fds_at.min(bytes.len());
    if fds_at > 0 && !send_part(peer, &bytes[..fds_at], &[]) {
        return;
    }
    // A stream socket sends no descriptors without at least one byte.
    if fds_at < bytes.len() {
        send_part(peer, &bytes[fds_at..], &vec![dev_null(); nfds]);
    }
}

/// Send `bytes`, `fds` with the first of them; false if the socket buffer filled up.
fn send_part(peer: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED))];
    let mut sent = 0;
    while sent < bytes.len() {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if sent == 0 && !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let iov = [IoSlice::new(&bytes[sent..])];
        match sendmsg(peer, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => continue,
            // The socket buffer is full (the peer is nonblocking): the rest is cut off,
            // which the receiver sees as a truncated stream. Inputs are capped so that this
            // does not happen in practice.
            Err(rustix::io::Errno::AGAIN) => return false,
            Err(e) => panic!("sendmsg: {e}"),
        }
    }
    true
}

/// Read whatever the receiving side has answered so far (the peer is nonblocking).
fn drain(peer: &UnixStream, replies: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match (&*peer).read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => replies.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading replies: {e}"),
        }
    }
}

fn clone_fds<'a>(fds: impl IntoIterator<Item = BorrowedFd<'a>>) -> Vec<OwnedFd> {
    fds.into_iter()
        .map(|fd| fd.try_clone_to_owned().expect("dup a received descriptor"))
        .collect()
}

/// Every reply kind: whatever decodes re-encodes to exactly the payload.
fn check_replies(header: &Header, payload: &[u8]) {
    for kind in [ReplyKind::U64, ReplyKind::VringState, ReplyKind::Config] {
        if let Ok(reply) = Reply::decode(header.request, kind, payload) {
            assert_eq!(
                reply.encode(),
                payload,
                "{kind:?} reply re-encodes differently"
            );
            assert_eq!(
                Reply::decode(header.request, kind, &reply.encode()).unwrap(),
                reply
            );
        }
    }
}

/// Back-end channel decoding, on copies of the descriptors.
fn check_backend(header: &Header, payload: &[u8], fds: Vec<OwnedFd>) {
    match BackendRequest::decode(header, payload, fds) {
        Ok(req) => {
            assert_eq!(req.req().code(), header.request);
            let enc = req
                .encode_payload()
                .expect("a decoded back-end request must re-encode");
            let again = BackendRequest::decode(header, &enc, Vec::new())
                .expect("a re-encoded back-end request must decode");
            assert_eq!(again, req, "back-end request round trip");
        }
        Err(e) => assert!(!e.is_fatal(), "decode returned a fatal error: {e}"),
    }
}

/// Front-end decoding; returns the request or the (non-fatal) error.
fn check_frontend(
    header: &Header,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<FrontendRequest, WireError> {
    let limits = DecodeLimits::default();
    let req = FrontendRequest::decode(header, payload, fds, &limits);
    match &req {
        Ok(r) => {
            assert_eq!(r.req().code(), header.request);
            let enc = r
                .encode_payload()
                .expect("a decoded front-end request must re-encode");
            let again = FrontendRequest::decode(header, &enc, clone_fds(r.fds()), &limits)
                .expect("a re-encoded front-end request must decode");
            assert_eq!(again.req(), r.req());
            assert_eq!(again.fds().len(), r.fds().len());
            assert_eq!(
                again.encode_payload().unwrap(),
                enc,
                "front-end request encoding is not canonical"
            );
        }
        Err(e) => assert!(!e.is_fatal(), "decode returned a fatal error: {e}"),
    }
    req
}

/// A reply the receiving side must have sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// A `u64` status (REPLY_ACK): 0 for success, 1 for failure.
    Status { request: u32, status: u64 },
    /// The failure of a request that always has a reply of its own: an empty payload.
    Empty { request: u32 },
}

/// What `Connection::refuse` answers to the message with `header` (main socket).
fn rejection(header: &Header) -> Option<Expected> {
    if header.is_reply() {
        return None;
    }
    match answer_for(Channel::Frontend, header) {
        Some(Answer::Value) => Some(Expected::Empty {
            request: header.request,
        }),
        Some(Answer::Status) => Some(Expected::Status {
            request: header.request,
            status: 1,
        }),
        None if header.needs_reply() => Some(Expected::Status {
            request: header.request,
            status: 1,
        }),
        None => None,
    }
}

/// Parse the reply stream and compare it with what was expected, in order.
fn check_reply_stream(mut replies: &[u8], expected: &[Expected]) {
    let mut got = Vec::new();
    while !replies.is_empty() {
        assert!(replies.len() >= HEADER_SIZE, "partial reply header");
        let word = |i: usize| u32::from_ne_bytes(replies[i * 4..i * 4 + 4].try_into().unwrap());
        let (request, flags_word, size) = (word(0), word(1), word(2) as usize);
        assert_eq!(flags_word, flags::VERSION_1 | flags::REPLY, "reply flags");
        let payload = &replies[HEADER_SIZE..];
        assert!(payload.len() >= size, "partial reply payload");
        got.push(match size {
            0 => Expected::Empty { request },
            8 => Expected::Status {
                request,
                status: u64::from_ne_bytes(payload[..8].try_into().unwrap()),
            },
            _ => panic!("reply of {size} bytes to request {request}"),
        });
        replies = &payload[size..];
    }
    assert_eq!(got, expected, "replies");
}

fn run(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(first) % (MAX_ATTACHED + 1);
    let fds_at = usize::from(first) / (MAX_ATTACHED + 1) * 4;
    let stream = &stream[..stream.len().min(MAX_STREAM)];

    let (peer, ours) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("nonblocking peer");
    send_raw(&peer, stream, nfds, fds_at);
    peer.shutdown(Shutdown::Write).expect("shutdown");

    let conn = Connection::new(ours);
    let limits: Limits = conn.limits();
    let mut replies = Vec::new();
    let mut expected = Vec::new();
    let mut consumed = 0usize;
    loop {
        match conn.recv() {
            Ok(msg) => {
                let header = msg.header;
                consumed += HEADER_SIZE + msg.payload.len();
                assert_eq!(msg.payload.len(), header.size as usize);
                assert!(msg.payload.len() <= limits.max_payload);
                assert!(msg.fds.len() <= limits.max_fds);
                assert!(msg.fds.len() <= nfds);
                assert_eq!(header.version(), flags::VERSION_1);
                assert_eq!(header.flags & !flags::KNOWN, 0);

                check_replies(&header, &msg.payload);
                check_backend(
                    &header,
                    &msg.payload,
                    clone_fds(msg.fds.iter().map(|f| f.as_fd())),
                );
                let ok = match check_frontend(&header, &msg.payload, msg.fds) {
                    Ok(_req) => {
                        conn.ack(&header, true).expect("ack");
                        true
                    }
                    Err(e) => {
                        let _ = e;
                        conn.refuse(&header).expect("refuse");
                        false
                    }
                };
                if ok {
                    // `ack` answers REPLY_ACK only for requests without an answer of their own.
                    if header.needs_reply() && answer_for(Channel::Frontend, &header).is_none() {
                        expected.push(Expected::Status {
                            request: header.request,
                            status: 0,
                        });
                    }
                } else {
                    expected.extend(rejection(&header));
                }
            }
            Err(e) if e.is_fatal() => {
                assert!(
                    matches!(e, WireError::Disconnected | WireError::Truncated { .. }),
                    "unexpected fatal error {e}"
                );
                if matches!(e, WireError::Disconnected) {
                    assert_eq!(consumed, stream.len(), "disconnected before the end");
                }
                break;
            }
            Err(e) => {
                let header = *e.header().expect("a framing error carries its header");
                consumed += HEADER_SIZE + header.size as usize;
                conn.reject(&e).expect("reject");
                expected.extend(rejection(&header));
            }
        }
        drain(&peer, &mut replies);
    }
    conn.socket().shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        drain(&peer, &mut replies),
        "no end of stream after shutdown"
    );
    check_reply_stream(&replies, &expected);
}

fuzz_target!(|data: &[u8]| {
    run(data);
    check_fd_leak();
});
