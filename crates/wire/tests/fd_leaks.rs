//! No descriptor is ever leaked: whatever a peer attaches (too many, to a request that takes
//! none, to a message that fails to decode), every descriptor that arrived is closed once the
//! message has been handled. A test binary of its own, so the process's descriptor count is
//! not disturbed by other tests.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::fs::{memfd_create, MemfdFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use wire::vhost_user::{Connection, DecodeLimits, FrontendRequest, Header};
use zerocopy::IntoBytes;

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
