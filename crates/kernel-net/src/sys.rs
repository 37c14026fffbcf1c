//! The system side of the driver: a tap device with a vnet header, brought up, with an
//! `AF_PACKET` socket bound to it (what vhost-net transmits comes out there; what we send on
//! it is what vhost-net receives), and eventfds.
//!
//! Every `unsafe` of the crate is here, each one call on plain C structs with its own
//! `// SAFETY:`. Nothing here knows about vhost, virtqueues or the IOTLB, nor what a test
//! frame looks like (callers pass a filter).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::error::KernelNetError;
use crate::frames::VNET_HDR;

/// A non-blocking, close-on-exec eventfd (a kick or a call).
pub fn eventfd() -> Result<OwnedFd, KernelNetError> {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .map_err(KernelNetError::sys("eventfd"))
}

/// `ioctl(fd, request, ifr)` for a request whose argument is one `struct ifreq`.
fn ifreq_ioctl(
    fd: BorrowedFd<'_>,
    request: libc::Ioctl,
    ifr: &mut libc::ifreq,
    what: &str,
) -> Result<(), KernelNetError> {
    // SAFETY: the callers pass only TUNSETIFF, SIOCGIFFLAGS, SIOCSIFFLAGS and SIOCGIFINDEX,
    // each of which reads and writes at most one `struct ifreq`; `ifr` is a valid, exclusively
    // borrowed `ifreq` that outlives the call. `fd` is a live descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(ifr)) } < 0 {
        return Err(KernelNetError::last_os(what));
    }
    Ok(())
}

/// A tap device with a vnet header, up, and a packet socket bound to it.
#[derive(Debug)]
pub struct Tap {
    /// The tap's file descriptor (what vhost-net's SET_BACKEND takes).
    pub fd: OwnedFd,
    /// The non-blocking `AF_PACKET` socket bound to the tap interface.
    packet: OwnedFd,
    /// The interface's name (`vhiotlbN`).
    pub name: String,
}

impl Tap {
    /// Create the tap, set its vnet header size, bring it up and bind a packet socket to it.
    pub fn create() -> Result<Self, KernelNetError> {
        if !Path::new("/dev/net/tun").exists() {
            return Err(KernelNetError::MissingNode {
                node: "/dev/net/tun".into(),
                module: "tun",
            });
        }
        let fd = rustix::fs::open(
            "/dev/net/tun",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(KernelNetError::sys("open /dev/net/tun"))?;
        // SAFETY: `ifreq` is a C struct of a char array and a union of integers, socket
        // addresses and a pointer: all-zero is a valid value of each (a null pointer).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"vhiotlb%d\0") {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifreq_ioctl(fd.as_fd(), libc::TUNSETIFF, &mut ifr, "TUNSETIFF")?;
        let hdr = VNET_HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `hdr` is, alive across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(KernelNetError::last_os("TUNSETVNETHDRSZ"));
        }
        let name: String = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        // Bring it up, and find its index, through an ordinary socket.
        let s = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(KernelNetError::sys("socket"))?;
        ifreq_ioctl(
            s.as_fd(),
            libc::SIOCGIFFLAGS,
            &mut ifr,
            &format!("SIOCGIFFLAGS {name}"),
        )?;
        // SAFETY: reading a union member of plain integers: every bit pattern is a valid
        // `c_short`, and SIOCGIFFLAGS has just written this one.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as i16;
        ifreq_ioctl(
            s.as_fd(),
            libc::SIOCSIFFLAGS,
            &mut ifr,
            &format!("SIOCSIFFLAGS {name} up"),
        )?;
        ifreq_ioctl(
            s.as_fd(),
            libc::SIOCGIFINDEX,
            &mut ifr,
            &format!("SIOCGIFINDEX {name}"),
        )?;
        // SAFETY: as above, an integer union member; SIOCGIFINDEX has just written it.
        let ifindex = unsafe { ifr.ifr_ifru.ifru_ifindex };
        let packet = rustix::net::socket_with(
            AddressFamily::PACKET,
            SocketType::RAW,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(rustix::net::eth::ALL),
        )
        .map_err(KernelNetError::sys("AF_PACKET socket"))?;
        // SAFETY: `sockaddr_ll` is a C struct of integers and a byte array: all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid `sockaddr_ll`, alive across the call, and the length passed
        // is exactly its size; `packet` is a live socket.
        let r = unsafe {
            libc::bind(
                packet.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            let source = std::io::Error::last_os_error();
            return Err(KernelNetError::Io {
                op: format!("bind AF_PACKET to {name}"),
                source,
            });
        }
        Ok(Tap { fd, packet, name })
    }

    /// Frames that came in on the tap (vhost-net's TX) and that `keep` accepts, waiting up
    /// to `wait` for `n` of them.
    pub fn receive(&self, n: usize, wait: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        while got.len() < n && Instant::now() < deadline {
            match rustix::net::recv(&self.packet, &mut buf[..], rustix::net::RecvFlags::empty()) {
                Ok((len, _)) => {
                    let f = &buf[..len.min(buf.len())];
                    if keep(f) {
                        got.push(f.to_vec());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => break,
            }
        }
        got
    }

    /// Drop whatever our packet socket holds.
    pub fn drain(&self) {
        let mut buf = vec![0u8; 2048];
        while rustix::net::recv(&self.packet, &mut buf[..], rustix::net::RecvFlags::empty()).is_ok()
        {
        }
    }

    /// Send `frame` out of the tap interface: it reaches whoever reads the tap (vhost-net's
    /// RX).
    pub fn inject(&self, frame: &[u8]) -> Result<(), KernelNetError> {
        rustix::net::send(&self.packet, frame, rustix::net::SendFlags::empty())
            .map_err(KernelNetError::sys("AF_PACKET send"))
            .map(|_| ())
    }
}
