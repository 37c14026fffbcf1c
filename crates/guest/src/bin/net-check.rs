//! `net-check`: frames through the guest's virtio_net to a loopback peer and back, checked
//! byte for byte.
//!
//! ```text
//! net-check [--if eth0] [--count N] [--tries T] [--allow-loss]
//! ```
//!
//! Brings the interface up, opens an AF_PACKET socket bound to it for ethertype 0x88b5, and
//! for each size from 60 bytes to the interface's MTU plus the Ethernet header (60, 61, 64,
//! 128, 1514, 1515, 4000, 8000 and the largest) sends `N` frames one at a time
//! (`guest::frames`: sequence number, length, pattern, checksum) and waits for each to come
//! back with its MACs swapped, sending it again after 2 s without it, `T` sends in all at
//! most (default 3). Every frame that
//! comes back must equal the one sent, MACs swapped, byte for byte (a wrong one is a
//! failure at once); a frame that never came back is lost (a failure unless `--allow-loss`,
//! for a reference peer that drops). Prints one `NET-CHECK` line with the counts. Exit 0 on
//! success, 1 on a failure, 2 on a bad command line.

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest::frames::{expected_back, frame, sequence, ETHERTYPE};

/// The peer's MAC (any unicast address: the loopback swaps it into the source).
const PEER: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
/// How long one frame may take to come back before it is sent again.
const WAIT: Duration = Duration::from_secs(2);

struct Args {
    ifname: String,
    count: u32,
    /// Sends of one frame at most.
    tries: u32,
    allow_loss: bool,
}

/// The number after `flag`.
fn number(it: &mut impl Iterator<Item = String>, flag: &str) -> Result<u32, String> {
    let w = it.next().ok_or(format!("{flag} needs a number"))?;
    w.parse().map_err(|e| format!("{flag}: {e}"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        ifname: "eth0".into(),
        count: 10,
        tries: 3,
        allow_loss: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "--if" => a.ifname = it.next().ok_or("--if needs a name")?,
            "--count" => a.count = number(&mut it, "--count")?,
            "--tries" => a.tries = number(&mut it, "--tries")?,
            "--allow-loss" => a.allow_loss = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.tries == 0 {
        return Err("--tries must be at least 1".into());
    }
    if a.ifname.len() >= libc::IFNAMSIZ {
        return Err("--if: name too long".into());
    }
    Ok(a)
}

/// An `ifreq` naming `ifname`.
fn ifreq(ifname: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers and sockaddrs); all zeros
    // is a valid value of it.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

/// `ioctl(fd, req, r)` for the interface requests (SIOCGIF*, SIOCSIFFLAGS).
fn ifioctl(fd: libc::c_int, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `r` is a valid, writable ifreq for the whole call, which is what these requests
    // read and write; the name in it is NUL-terminated (ifreq() leaves the last byte 0).
    if unsafe { libc::ioctl(fd, req, r as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// The interface's index, MAC and MTU, with the interface up; and a packet socket bound to
/// it for our ethertype.
fn open(ifname: &str) -> io::Result<(Socket, [u8; 6], usize)> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: a plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = Socket(fd);
    let mut r = ifreq(ifname);
    ifioctl(fd, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ifioctl(fd, libc::SIOCSIFFLAGS, &mut r)?;
    let mut r = ifreq(ifname);
    ifioctl(fd, libc::SIOCGIFINDEX, &mut r)?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member.
    let index = unsafe { r.ifr_ifru.ifru_ifindex };
    let mut r = ifreq(ifname);
    ifioctl(fd, libc::SIOCGIFHWADDR, &mut r)?;
    let mut mac = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member (a sockaddr whose data starts with the
    // 6-byte Ethernet address).
    let data = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    let mut r = ifreq(ifname);
    ifioctl(fd, libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the mtu member.
    let mtu = unsafe { r.ifr_ifru.ifru_mtu } as usize;
    // SAFETY: sockaddr_ll is plain data; all zeros is valid, and the fields we need are set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index;
    // SAFETY: `sll` is a valid sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: `tv` is a valid timeval of the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((s, mac, mtu))
}

fn send(s: &Socket, f: &[u8]) -> io::Result<()> {
    // SAFETY: `f` is valid for reading `f.len()` bytes during the call.
    let n = unsafe { libc::send(s.0, f.as_ptr().cast(), f.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != f.len() {
        return Err(io::Error::other(format!("sent {n} of {} bytes", f.len())));
    }
    Ok(())
}

/// One received frame into `buf`; `None` on the receive timeout.
fn recv(s: &Socket, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writing `buf.len()` bytes during the call.
    let n = unsafe { libc::recv(s.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

#[derive(Default)]
struct Counts {
    frames: u32,
    resent: u32,
    lost: u32,
    late: u32,
}

fn run(a: &Args) -> Result<Counts, String> {
    let (s, mac, mtu) = open(&a.ifname).map_err(|e| format!("{}: {e}", a.ifname))?;
    let largest = mtu + 14;
    let mut sizes: Vec<usize> = [60, 61, 64, 128, 1514, 1515, 4000, 8000]
        .into_iter()
        .filter(|&l| l < largest)
        .collect();
    sizes.push(largest);
    println!(
        "net-check: {} mtu {mtu}, sizes {sizes:?}, {} each",
        a.ifname, a.count
    );
    let mut c = Counts::default();
    let mut buf = vec![0u8; 65_536];
    let mut seq = 0u32;
    for &len in &sizes {
        for _ in 0..a.count {
            seq += 1;
            let f = frame(PEER, mac, seq, len);
            let want = expected_back(&f);
            let mut back = false;
            'tries: for t in 0..a.tries {
                if t > 0 {
                    c.resent += 1;
                }
                send(&s, &f).map_err(|e| format!("send: {e}"))?;
                let sent = Instant::now();
                while sent.elapsed() < WAIT {
                    let Some(n) = recv(&s, &mut buf).map_err(|e| format!("recv: {e}"))? else {
                        continue;
                    };
                    let got = &buf[..n];
                    match sequence(got) {
                        Some(q) if q == seq => {
                            if got != want.as_slice() {
                                let at = got.iter().zip(&want).position(|(x, y)| x != y);
                                return Err(format!(
                                    "frame {seq} ({len} bytes) came back as {n} bytes, first difference at {at:?}"
                                ));
                            }
                            back = true;
                            break 'tries;
                        }
                        // An earlier frame's late copy (it was sent again).
                        Some(q) if q < seq => c.late += 1,
                        _ => {
                            return Err(format!(
                                "a frame that is not one we sent, or changed ({n} bytes), while waiting for {seq}"
                            ))
                        }
                    }
                }
            }
            c.frames += 1;
            if !back {
                c.lost += 1;
            }
        }
    }
    Ok(c)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("net-check: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(c) => {
            println!(
                "NET-CHECK frames={} back={} lost={} resent={} late={}",
                c.frames,
                c.frames - c.lost,
                c.lost,
                c.resent,
                c.late
            );
            if c.lost > 0 && !a.allow_loss {
                eprintln!("net-check: {} frames never came back", c.lost);
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("NET-CHECK failed: {e}");
            ExitCode::FAILURE
        }
    }
}
