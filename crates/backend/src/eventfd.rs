//! The front-end's signalling descriptors (a vring's kick, call and error fds): accepted only
//! if they are eventfds, and made non-blocking.
//!
//! Why refuse rather than cope: every front-end we know (QEMU, cloud-hypervisor, DPDK's
//! virtio-user, the kernel's own vhost) signals with eventfds, and the protocol says so. Other
//! descriptors break the worker in ways that are costly to defend against one by one: a pipe
//! nobody reads makes a write block, a regular file is always readable and makes a poll spin.
//! Making the accepted eventfd non-blocking covers the one way an eventfd can still block us:
//! a counter the front-end drove to its maximum (a write then waits for a read), or a kick
//! that another reader took between our poll and our read.
//!
//! How an eventfd is recognised: the kernel names the inode of every eventfd
//! `anon_inode:[eventfd]`, which `readlink` of `/proc/self/fd/N` shows (the same test as
//! `lsof` and systemd use). Without `/proc` nothing can be told, and the fd is refused. This
//! file never reads or writes the counter.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// What `/proc/self/fd/N` reads for an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// Why a signalling descriptor was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignalFdError {
    /// Not an eventfd (what it is instead, as `/proc` names it).
    #[error("the {what} fd is not an eventfd (it is {link})")]
    NotEventfd {
        /// Which descriptor (kick, call, err).
        what: &'static str,
        /// Its `/proc/self/fd` link.
        link: String,
    },
    /// `/proc/self/fd` could not be read, or the flags could not be set.
    #[error("the {what} fd cannot be checked: {source}")]
    Check {
        /// Which descriptor.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// What `fd` is if it is not an eventfd (its `/proc/self/fd` link); `None` for an eventfd.
pub(crate) fn not_an_eventfd(fd: &impl AsFd) -> std::io::Result<Option<String>> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))?;
    let link = link.to_string_lossy();
    Ok((link != EVENTFD_LINK).then(|| link.into_owned()))
}

/// Check that `fd`, the vring's `what` descriptor, is an eventfd, and make it non-blocking.
pub(crate) fn checked_eventfd(fd: OwnedFd, what: &'static str) -> Result<OwnedFd, SignalFdError> {
    let check = |source: std::io::Error| SignalFdError::Check { what, source };
    if let Some(link) = not_an_eventfd(&fd).map_err(check)? {
        return Err(SignalFdError::NotEventfd { what, link });
    }
    let flags = fcntl_getfl(&fd).map_err(|e| check(e.into()))?;
    if !flags.contains(OFlags::NONBLOCK) {
        // The flag belongs to the open file, which the front-end shares: QEMU creates its
        // eventfds non-blocking already, and a front-end that polls before it reads (as it
        // must, to wait for several) is not affected.
        fcntl_setfl(&fd, flags | OFlags::NONBLOCK).map_err(|e| check(e.into()))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    #[test]
    fn an_eventfd_is_accepted_and_made_non_blocking() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let fd = checked_eventfd(fd, "call").unwrap();
        assert!(fcntl_getfl(&fd).unwrap().contains(OFlags::NONBLOCK));
        // A read of an empty non-blocking eventfd returns at once.
        let mut b = [0u8; 8];
        assert_eq!(
            rustix::io::read(&fd, &mut b).unwrap_err(),
            rustix::io::Errno::AGAIN
        );
    }

    #[test]
    fn pipes_files_and_sockets_are_refused() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let memfd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let epoll =
            rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).unwrap();
        for (fd, kind) in [
            (w, "pipe"),
            (r, "pipe"),
            (OwnedFd::from(file), "/dev/null"),
            (OwnedFd::from(a), "socket"),
            (memfd, "memfd"),
            (epoll, "[eventpoll]"),
        ] {
            match checked_eventfd(fd, "kick") {
                Err(SignalFdError::NotEventfd { link, .. }) => {
                    assert!(link.contains(kind), "{link} for a {kind}")
                }
                other => panic!("a {kind} was not refused: {other:?}"),
            }
        }
    }
}
