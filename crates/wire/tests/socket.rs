//! Framing over real Unix socket pairs: descriptors passed both ways, short reads and writes,
//! and a table of malformed inputs, each mapped to its error. After every non-fatal error the
//! same connection must carry the next message, and a request that asked for a reply must
//! get a failure status instead of silence.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::thread;

use rustix::fs::{memfd_create, MemfdFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use wire::error::IotlbError;
use wire::vhost_user::{
    Channel, Connection, DecodeLimits, FrontendRequest, Header, Limits, MemoryRegion, RawMessage,
    RegionFd, Reply, ReplyKind, VringFile,
};
use wire::WireError;
use zerocopy::IntoBytes;

fn pair() -> (Connection, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Connection::new(a), b)
}

fn memfd_with(pattern: &[u8]) -> OwnedFd {
    let fd = memfd_create("wire-test", MemfdFlags::CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(4096).unwrap();
    f.write_all_at(pattern, 0).unwrap();
    OwnedFd::from(f)
}

fn read_fd(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// Raw bytes and descriptors on the wire, bypassing our encoder.
fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    let n = sendmsg(
        sock,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Header {
        request,
        flags,
        size: payload.len() as u32,
    }
    .as_bytes()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

fn decode(m: RawMessage) -> Result<FrontendRequest, WireError> {
    FrontendRequest::decode(&m.header, &m.payload, m.fds, &DecodeLimits::default())
}

/// A well-formed GET_QUEUE_NUM, used after each error to show the stream is in step.
fn still_in_step(conn: &Connection, peer: &UnixStream) {
    send_raw(peer, &msg(17, 1, &[]), &[]);
    let m = conn.recv().unwrap();
    assert!(matches!(decode(m).unwrap(), FrontendRequest::GetQueueNum));
}

#[test]
fn descriptors_travel_both_ways() {
    let (a, b) = UnixStream::pair().unwrap();
    let (front, back) = (Connection::new(a), Connection::new(b));
    let region = MemoryRegion {
        guest_phys_addr: 0,
        memory_size: 4096,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
    };
    let req = FrontendRequest::SetMemTable(vec![RegionFd {
        region,
        fd: memfd_with(b"front-end memory"),
    }]);
    let sent = front.send_request(&req, true).unwrap();
    let m = back.recv().unwrap();
    let h = m.header;
    match decode(m).unwrap() {
        FrontendRequest::SetMemTable(regions) => {
            assert_eq!(regions.len(), 1);
            assert_eq!(regions[0].region, region);
            assert_eq!(read_fd(&regions[0].fd, 16), b"front-end memory");
        }
        other => panic!("decoded {other:?}"),
    }
    back.ack(&h, true).unwrap();
    front.recv_ack(&sent).unwrap();

    // The other way: the back-end side sends a descriptor (as a front-end would on its own
    // channel; the framing is the same).
    let req = FrontendRequest::SetLogFd(memfd_with(b"log"));
    back.send_request(&req, false).unwrap();
    let m = front.recv().unwrap();
    match decode(m).unwrap() {
        FrontendRequest::SetLogFd(fd) => assert_eq!(read_fd(&fd, 3), b"log"),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn short_writes_are_reassembled() {
    let (conn, peer) = pair();
    let payload = 0x1_0000_0000u64.to_ne_bytes();
    let bytes = msg(2, 1, &payload);
    let writer = thread::spawn(move || {
        let mut peer = peer;
        for b in bytes {
            peer.write_all(&[b]).unwrap();
            thread::yield_now();
        }
        peer
    });
    let m = conn.recv().unwrap();
    assert!(matches!(
        decode(m).unwrap(),
        FrontendRequest::SetFeatures(0x1_0000_0000)
    ));
    drop(writer.join().unwrap());
    assert!(matches!(conn.recv(), Err(WireError::Disconnected)));
}

#[test]
fn large_payloads_round_trip() {
    let (a, b) = UnixStream::pair().unwrap();
    let limits = Limits {
        max_payload: 1 << 20,
        max_fds: 8,
    };
    let (tx, rx) = (
        Connection::with_limits(a, Channel::Frontend, limits),
        Connection::with_limits(b, Channel::Frontend, limits),
    );
    let payload: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7) as u8).collect();
    let h = Header::new(99, payload.len() as u32, false);
    let p2 = payload.clone();
    let t = thread::spawn(move || tx.send(&h, &p2, &[]).unwrap());
    let m = rx.recv().unwrap();
    t.join().unwrap();
    assert_eq!(m.payload, payload);
}

#[test]
fn malformed_inputs_map_to_errors() {
    let (conn, peer) = pair();
    let limits = DecodeLimits::default();
    let fd = || memfd_with(b"x");

    // Wrong version, unknown flag bits: refused, stream in step.
    send_raw(&peer, &msg(1, 2, &[]), &[]);
    assert!(matches!(
        conn.recv(),
        Err(WireError::BadVersion { flags: 2, .. })
    ));
    still_in_step(&conn, &peer);
    send_raw(&peer, &msg(1, 0x11, &[]), &[]);
    assert!(matches!(conn.recv(), Err(WireError::UnknownFlags { .. })));
    still_in_step(&conn, &peer);

    // A payload over the cap is read and dropped, never allocated.
    send_raw(&peer, &msg(25, 1, &vec![0u8; 5000]), &[]);
    assert!(matches!(
        conn.recv(),
        Err(WireError::PayloadTooLarge {
            size: 5000,
            max: 4096,
            ..
        })
    ));
    still_in_step(&conn, &peer);

    // More descriptors than the cap: all closed, message refused.
    let many: Vec<OwnedFd> = (0..9).map(|_| fd()).collect();
    send_raw(&peer, &msg(5, 1, &[]), &many);
    assert!(matches!(
        conn.recv(),
        Err(WireError::TooManyFds { max: 8, .. })
    ));
    still_in_step(&conn, &peer);

    // Decode-level errors: one table, each message read whole.
    let region = MemoryRegion {
        guest_phys_addr: 0,
        memory_size: 4096,
        userspace_addr: 0x1000,
        mmap_offset: 0,
    };
    let table = |n: u32, regions: usize| {
        let mut p = [n, 0u32].as_bytes().to_vec();
        for _ in 0..regions {
            p.extend_from_slice(region.as_bytes());
        }
        p
    };
    let iotlb = |ty: u8, iova: u64, size: u64, perm: u8| {
        let mut p = [iova, size, 0u64].as_bytes().to_vec();
        p.extend_from_slice(&[perm, ty, 0, 0, 0, 0, 0, 0]);
        p
    };
    type Check = fn(&WireError) -> bool;
    let cases: Vec<(&str, Vec<u8>, usize, Check)> = vec![
        ("SET_VRING_ADDR short", msg(9, 1, &[0u8; 39]), 0, |e| {
            matches!(
                e,
                WireError::PayloadSize {
                    request: 9,
                    expected: 40,
                    got: 39
                }
            )
        }),
        ("SET_FEATURES odd size", msg(2, 1, &[0u8; 7]), 0, |e| {
            matches!(e, WireError::PayloadSize { request: 2, .. })
        }),
        ("GET_FEATURES odd size", msg(1, 1, &[0u8; 3]), 0, |e| {
            matches!(e, WireError::PayloadSize { request: 1, .. })
        }),
        ("GET_FEATURES with a descriptor", msg(1, 1, &[]), 1, |e| {
            matches!(e, WireError::UnexpectedFds { request: 1, got: 1 })
        }),
        (
            "SET_MEM_TABLE fewer fds than regions",
            msg(5, 1, &table(2, 2)),
            1,
            |e| {
                matches!(
                    e,
                    WireError::MissingFds {
                        request: 5,
                        expected: 2,
                        got: 1
                    }
                )
            },
        ),
        (
            "SET_MEM_TABLE too many regions",
            msg(5, 1, &table(9, 9)),
            0,
            |e| {
                matches!(
                    e,
                    WireError::InvalidField {
                        field: "nregions",
                        ..
                    }
                )
            },
        ),
        (
            "SET_MEM_TABLE zero regions",
            msg(5, 1, &table(0, 0)),
            0,
            |e| {
                matches!(
                    e,
                    WireError::InvalidField {
                        field: "nregions",
                        ..
                    }
                )
            },
        ),
        (
            "SET_MEM_TABLE payload cut short",
            msg(5, 1, &table(1, 1)[..39]),
            1,
            |e| matches!(e, WireError::PayloadSize { request: 5, .. }),
        ),
        (
            "SET_VRING_KICK without fd or NOFD",
            msg(12, 1, &0u64.to_ne_bytes()),
            0,
            |e| matches!(e, WireError::MissingFds { request: 12, .. }),
        ),
        (
            "SET_VRING_CALL NOFD with an fd",
            msg(13, 1, &0x100u64.to_ne_bytes()),
            1,
            |e| matches!(e, WireError::UnexpectedFds { request: 13, .. }),
        ),
        (
            "SET_VRING_ERR stray bits",
            msg(14, 1, &0x1_0100u64.to_ne_bytes()),
            0,
            |e| matches!(e, WireError::InvalidField { request: 14, .. }),
        ),
        (
            "SET_VRING_ADDR unknown flags",
            msg(9, 1, [0u32, 2, 0, 0, 0, 0, 0, 0, 0, 0].as_bytes()),
            0,
            |e| matches!(e, WireError::InvalidField { request: 9, .. }),
        ),
        (
            "IOTLB_MSG unknown type",
            msg(22, 9, &iotlb(9, 0, 1, 3)),
            0,
            |e| matches!(e, WireError::Iotlb(IotlbError::UnknownType(9))),
        ),
        (
            "IOTLB_MSG update size 0",
            msg(22, 9, &iotlb(2, 0x1000, 0, 3)),
            0,
            |e| matches!(e, WireError::Iotlb(IotlbError::Range { ty: 2, .. })),
        ),
        (
            "IOTLB_MSG update overflow",
            msg(22, 9, &iotlb(2, u64::MAX, 2, 3)),
            0,
            |e| matches!(e, WireError::Iotlb(IotlbError::Range { ty: 2, .. })),
        ),
        (
            "IOTLB_MSG update perm 0",
            msg(22, 9, &iotlb(2, 0x1000, 0x1000, 0)),
            0,
            |e| matches!(e, WireError::Iotlb(IotlbError::BadPerm { ty: 2, .. })),
        ),
        (
            "IOTLB_MSG 31 bytes",
            msg(22, 9, &iotlb(2, 0, 1, 3)[..31]),
            0,
            |e| {
                matches!(
                    e,
                    WireError::PayloadSize {
                        request: 22,
                        expected: 32,
                        got: 31
                    }
                )
            },
        ),
        (
            "SET_STATUS over a byte",
            msg(39, 1, &0x100u64.to_ne_bytes()),
            0,
            |e| matches!(e, WireError::InvalidField { request: 39, .. }),
        ),
        (
            "SET_CONFIG size over 256",
            msg(25, 1, [0u32, 257, 0].as_bytes()),
            0,
            |e| matches!(e, WireError::InvalidField { request: 25, .. }),
        ),
        (
            "SET_CONFIG data shorter than size",
            msg(25, 1, [0u32, 8, 0, 0].as_bytes()),
            0,
            |e| matches!(e, WireError::PayloadSize { request: 25, .. }),
        ),
        (
            "ADD_MEM_REG size 0 region",
            msg(37, 1, [0u64; 5].as_bytes()),
            1,
            |e| matches!(e, WireError::Region { index: 0, .. }),
        ),
        (
            "ADD_MEM_REG region past 2^64",
            msg(37, 1, [0u64, u64::MAX, 2, 0, 0].as_bytes()),
            1,
            |e| matches!(e, WireError::Region { index: 0, .. }),
        ),
        ("request 0", msg(0, 1, &[]), 0, |e| {
            matches!(e, WireError::UnknownRequest { request: 0 })
        }),
        ("SEND_RARP (not supported)", msg(19, 1, &[0u8; 8]), 0, |e| {
            matches!(e, WireError::UnknownRequest { request: 19 })
        }),
    ];
    for (name, bytes, nfds, check) in cases {
        let fds: Vec<OwnedFd> = (0..nfds).map(|_| fd()).collect();
        send_raw(&peer, &bytes, &fds);
        let m = conn
            .recv()
            .unwrap_or_else(|e| panic!("{name}: framing refused it: {e}"));
        let err = FrontendRequest::decode(&m.header, &m.payload, m.fds, &limits).expect_err(name);
        assert!(check(&err), "{name}: got {err:?}");
        assert!(!err.is_fatal(), "{name}");
        still_in_step(&conn, &peer);
    }
}

#[test]
fn unknown_request_with_need_reply_gets_a_failure_and_the_connection_lives() {
    let (conn, mut peer) = pair();
    send_raw(&peer, &msg(99, 0x9, &[1, 2, 3]), &[]);
    let m = conn.recv().unwrap();
    let h = m.header;
    let err = decode(m).unwrap_err();
    assert!(matches!(err, WireError::UnknownRequest { request: 99 }));
    conn.refuse(&h).unwrap();
    let mut reply = [0u8; 20];
    peer.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..12], Header::new(99, 0, false).reply(8).as_bytes());
    assert_eq!(u64::from_ne_bytes(reply[12..].try_into().unwrap()), 1);
    still_in_step(&conn, &peer);

    // Without NEED_REPLY nothing is sent back.
    send_raw(&peer, &msg(99, 0x1, &[]), &[]);
    let m = conn.recv().unwrap();
    let h = m.header;
    assert!(matches!(
        decode(m),
        Err(WireError::UnknownRequest { request: 99 })
    ));
    conn.refuse(&h).unwrap();
    assert_nothing_to_read(&mut peer);

    // Framing errors carry their header. A request that always has a reply of its own
    // (GET_CONFIG here) gets the empty-payload failure reply, even without NEED_REPLY.
    send_raw(&peer, &msg(24, 0x1, &vec![0u8; 5000]), &[]);
    let err = conn.recv().unwrap_err();
    conn.reject(&err).unwrap();
    let mut empty = [0u8; 12];
    peer.read_exact(&mut empty).unwrap();
    assert_eq!(&empty, Header::new(24, 0, false).reply(0).as_bytes());
    still_in_step(&conn, &peer);
    // One this crate does not even decode, answered with a status of its own
    // (CHECK_DEVICE_STATE, 43): a failure status, even without NEED_REPLY.
    send_raw(&peer, &msg(43, 0x1, &[]), &[]);
    let m = conn.recv().unwrap();
    let h = m.header;
    decode(m).unwrap_err();
    conn.refuse(&h).unwrap();
    peer.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..12], Header::new(43, 0, false).reply(8).as_bytes());
    assert_eq!(u64::from_ne_bytes(reply[12..].try_into().unwrap()), 1);
    still_in_step(&conn, &peer);
}

fn assert_nothing_to_read(peer: &mut UnixStream) {
    let mut b = [0u8; 1];
    peer.set_nonblocking(true).unwrap();
    assert!(peer.read(&mut b).is_err(), "no reply expected");
    peer.set_nonblocking(false).unwrap();
}

#[test]
fn reply_policy_per_request_and_channel() {
    // SET_LOG_BASE in its shared-memory form is always answered; refused, it gets the empty
    // failure reply. In the old 8-byte form nobody waits: nothing is sent.
    let (conn, mut peer) = pair();
    conn.refuse(&Header::new(6, 16, false)).unwrap();
    let mut r = [0u8; 12];
    peer.read_exact(&mut r).unwrap();
    assert_eq!(&r, Header::new(6, 0, false).reply(0).as_bytes());
    conn.refuse(&Header::new(6, 8, false)).unwrap();
    assert_nothing_to_read(&mut peer);
    // A request with an answer of its own is not acked a second time.
    conn.ack(&Header::new(1, 0, true), true).unwrap();
    assert_nothing_to_read(&mut peer);
    // A message flagged as a reply is never answered.
    conn.refuse(&Header::new(22, 32, true).reply(32)).unwrap();
    assert_nothing_to_read(&mut peer);

    // On the back-end channel, code 1 is BACKEND_IOTLB_MSG, not GET_FEATURES: refused, it
    // gets a status only if it asked for one.
    let (a, mut peer) = UnixStream::pair().unwrap();
    let chan = Connection::backend_channel(a);
    chan.refuse(&Header::new(1, 32, false)).unwrap();
    assert_nothing_to_read(&mut peer);
    chan.refuse(&Header::new(1, 32, true)).unwrap();
    let mut r = [0u8; 20];
    peer.read_exact(&mut r).unwrap();
    assert_eq!(&r[..12], Header::new(1, 0, false).reply(8).as_bytes());
    assert_eq!(u64::from_ne_bytes(r[12..].try_into().unwrap()), 1);
}

#[test]
fn end_of_stream() {
    // Between messages: Disconnected. Inside a header or a payload: Truncated (fatal).
    let (conn, peer) = pair();
    drop(peer);
    assert!(matches!(conn.recv(), Err(WireError::Disconnected)));

    let (conn, mut peer) = pair();
    peer.write_all(&[1, 0, 0, 0, 1]).unwrap();
    drop(peer);
    let err = conn.recv().unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Truncated {
                expected: 12,
                got: 5
            }
        ) && err.is_fatal()
    );

    let (conn, mut peer) = pair();
    peer.write_all(&msg(2, 1, &[0u8; 8])[..15]).unwrap();
    drop(peer);
    assert!(matches!(
        conn.recv(),
        Err(WireError::Truncated {
            expected: 20,
            got: 15
        })
    ));
}

#[test]
fn replies_are_matched_to_their_request() {
    let (a, b) = UnixStream::pair().unwrap();
    let (front, back) = (Connection::new(a), Connection::new(b));
    let sent = front
        .send_request(&FrontendRequest::GetFeatures, false)
        .unwrap();
    let m = back.recv().unwrap();
    back.send_reply(&m.header, &Reply::U64(0xabc)).unwrap();
    assert_eq!(
        front.recv_reply(&sent, ReplyKind::U64).unwrap(),
        Reply::U64(0xabc)
    );

    // A reply to something else, or a request where a reply was due, is refused.
    let sent = front
        .send_request(&FrontendRequest::GetQueueNum, false)
        .unwrap();
    back.recv().unwrap();
    back.send_reply(&Header::new(1, 0, false), &Reply::U64(1))
        .unwrap();
    assert!(matches!(
        front.recv_reply(&sent, ReplyKind::U64),
        Err(WireError::UnexpectedReply {
            expected: 17,
            got: 1,
            ..
        })
    ));
    // The empty failure reply of a request with a reply of its own.
    let sent = front
        .send_request(&FrontendRequest::GetStatus, false)
        .unwrap();
    let m = back.recv().unwrap();
    back.send(&m.header.reply(0), &[], &[]).unwrap();
    assert!(matches!(
        front.recv_reply(&sent, ReplyKind::U64),
        Err(WireError::PeerRefused { request: 40 })
    ));
    // A failure status.
    let sent = front
        .send_request(
            &FrontendRequest::SetVringKick(VringFile { index: 0, fd: None }),
            true,
        )
        .unwrap();
    let m = back.recv().unwrap();
    back.ack(&m.header, false).unwrap();
    assert!(matches!(
        front.recv_ack(&sent),
        Err(WireError::PeerFailed {
            request: 12,
            status: 1
        })
    ));
}

#[test]
fn try_send_never_blocks_and_keeps_the_stream_framed() {
    use wire::iotlb_msg::IotlbMsg;
    use wire::vhost_user::BackendRequest;
    let (a, b) = UnixStream::pair().unwrap();
    let conn = Connection::backend_channel(a);
    let miss = BackendRequest::IotlbMsg(IotlbMsg::Miss {
        iova: 0x1000,
        perm: iotlb::Perm::ReadOnly,
    });
    // Nobody reads `b`: the buffer fills and try_send reports it instead of blocking.
    let mut sent = 0usize;
    while conn.try_send_backend_request(&miss).unwrap() {
        sent += 1;
        assert!(sent < 1_000_000, "the socket buffer never filled");
    }
    assert!(sent > 0);
    // Every message that was reported sent arrives whole, and nothing else.
    let reader = Connection::backend_channel(b);
    for _ in 0..sent {
        let m = reader.recv().unwrap();
        assert_eq!(m.header.request, 1);
        assert_eq!(m.payload.len(), 32);
    }
    reader.socket().set_nonblocking(true).unwrap();
    assert!(reader.recv().is_err(), "a message reported unsent arrived");
}

/// Messages sent back to back are read ahead together; descriptors still go with the message
/// they were sent with, wherever it falls in the burst.
#[test]
fn descriptors_keep_their_message_in_a_burst_read_in_one_go() {
    let (conn, b) = pair();
    let msg = |request: u32, payload: &[u8]| {
        let mut m = Header::new(request, payload.len() as u32, false)
            .as_bytes()
            .to_vec();
        m.extend_from_slice(payload);
        m
    };
    // No descriptor, one, none, two, none: each message its own sendmsg, all of them in
    // the socket before the first receive.
    let kick = 0u64.to_le_bytes();
    send_raw(&b, &msg(1, &[]), &[]);
    send_raw(&b, &msg(12, &kick), &[memfd_with(b"first")]);
    send_raw(&b, &msg(3, &[]), &[]);
    send_raw(
        &b,
        &msg(13, &kick),
        &[memfd_with(b"second"), memfd_with(b"third")],
    );
    // The last three in one sendmsg without descriptors: a pipelined batch.
    let mut batch = msg(1, &[]);
    batch.extend(msg(1, &[]));
    batch.extend(msg(3, &[]));
    send_raw(&b, &batch, &[]);
    let got: Vec<RawMessage> = (0..7).map(|_| conn.recv().unwrap()).collect();
    let shape: Vec<(u32, usize)> = got
        .iter()
        .map(|m| (m.header.request, m.fds.len()))
        .collect();
    assert_eq!(
        shape,
        vec![(1, 0), (12, 1), (3, 0), (13, 2), (1, 0), (1, 0), (3, 0)]
    );
    assert_eq!(read_fd(&got[1].fds[0], 5), b"first");
    assert_eq!(read_fd(&got[3].fds[0], 6), b"second");
    assert_eq!(read_fd(&got[3].fds[1], 5), b"third");
    assert!(!conn.readable_now());
    send_raw(&b, &msg(1, &[]), &[]);
    assert!(conn.readable_now());
}
