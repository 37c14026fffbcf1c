//! No descriptor is ever leaked: whatever a peer attaches (too many, to a request that takes
//! none, to a message that fails to decode), every descriptor that arrived is closed once the
//! message has been handled. A test binary of its own, so the process's descriptor count is
//! not disturbed by other tests; its tests take turns (`SERIAL`) for the same reason.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::fs::{memfd_create, MemfdFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use wire::vhost_user::{Connection, DecodeLimits, FrontendRequest, Header};
use zerocopy::IntoBytes;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn send(sock: &UnixStream, request: u32, payload: &[u8], nfds: usize) {
    let fds: Vec<OwnedFd> = (0..nfds)
        .map(|_| memfd_create("leak", MemfdFlags::CLOEXEC).unwrap())
        .collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut bytes = Header::new(request, payload.len() as u32, true)
        .as_bytes()
        .to_vec();
    bytes.extend_from_slice(payload);
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(nfds.max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if nfds > 0 {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    sendmsg(
        sock,
        &[std::io::IoSlice::new(&bytes)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
}

#[test]
fn no_descriptor_outlives_its_message() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = UnixStream::pair().unwrap();
    let conn = Connection::new(a);
    let before = open_fds();
    for round in 0..50 {
        // Over the cap (the kernel may truncate; both paths must close what arrived).
        send(&b, 5, &[], 9 + round % 4);
        assert!(conn.recv().is_err());
        // Descriptors on a request that takes none.
        send(&b, 1, &[], 3);
        let m = conn.recv().unwrap();
        assert!(
            FrontendRequest::decode(&m.header, &m.payload, m.fds, &DecodeLimits::default())
                .is_err()
        );
        // A descriptor on a request that takes one but is malformed.
        send(&b, 37, &[0u8; 40], 1);
        let m = conn.recv().unwrap();
        assert!(
            FrontendRequest::decode(&m.header, &m.payload, m.fds, &DecodeLimits::default())
                .is_err()
        );
        // Oversized payload with descriptors.
        send(&b, 25, &vec![0u8; 8192], 2);
        assert!(conn.recv().is_err());
        // An unknown request with descriptors.
        send(&b, 77, &[], 2);
        let m = conn.recv().unwrap();
        assert!(
            FrontendRequest::decode(&m.header, &m.payload, m.fds, &DecodeLimits::default())
                .is_err()
        );
    }
    // Every reply the connection owes went to `b`; drop nothing else.
    assert_eq!(open_fds(), before, "descriptors leaked");
}

/// A peer that attaches descriptors to every byte of a message it never finishes cannot
/// make us hold more than the cap: past it, they are closed as they arrive.
#[test]
fn descriptors_past_the_cap_are_closed_as_they_arrive() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = UnixStream::pair().unwrap();
    let conn = std::sync::Arc::new(Connection::new(a));
    let receiver = {
        let conn = conn.clone();
        std::thread::spawn(move || conn.recv())
    };
    let held: Vec<OwnedFd> = (0..4)
        .map(|_| memfd_create("hoard", MemfdFlags::CLOEXEC).unwrap())
        .collect();
    let borrowed: Vec<_> = held.iter().map(|f| f.as_fd()).collect();
    let before = open_fds();
    let header = Header::new(25, 300, false);
    b.set_nonblocking(false).unwrap();
    sendmsg(
        &b,
        &[std::io::IoSlice::new(header.as_bytes())],
        &mut SendAncillaryBuffer::new(&mut []),
        SendFlags::empty(),
    )
    .unwrap();
    // 299 of the 300 payload bytes, one per send, each with 4 descriptors.
    for _ in 0..299 {
        let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        sendmsg(
            &b,
            &[std::io::IoSlice::new(&[0])],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
    }
    // Let the receiver take in everything sent so far.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut peak = 0;
    while std::time::Instant::now() < deadline {
        peak = peak.max(open_fds().saturating_sub(before));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let pending: i32 = {
            let mut n = 0i32;
            // Bytes the receiver has not read yet.
            rustix::io::ioctl_fionread(conn.socket())
                .map(|v| n = v as i32)
                .ok();
            n
        };
        if pending == 0 {
            break;
        }
    }
    peak = peak.max(open_fds().saturating_sub(before));
    // The cap plus one kept, plus the batch of one `recvmsg` in flight before it is dropped;
    // without the cap this would be 4 per byte, about 1200.
    assert!(
        peak <= 9 + 4,
        "held {peak} descriptors for an unfinished message (cap 8)"
    );
    sendmsg(
        &b,
        &[std::io::IoSlice::new(&[0])],
        &mut SendAncillaryBuffer::new(&mut []),
        SendFlags::empty(),
    )
    .unwrap();
    let r = receiver.join().unwrap();
    assert!(
        matches!(r, Err(wire::WireError::TooManyFds { .. })),
        "{r:?}"
    );
    assert_eq!(open_fds(), before);
}
