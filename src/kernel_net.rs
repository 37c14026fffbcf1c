//! `vhost-iotlb kernel-net`: drive the kernel's `/dev/vhost-net` behind our vIOMMU and show
//! its device IOTLB working: frames sent through a tap with no IOTLB entry to start with,
//! every MISS answered from the vIOMMU page tables, each frame checked byte for byte on an
//! `AF_PACKET` socket bound to the tap.
//!
//! Meant to run as root in a throwaway guest (`scripts/kernel-net.sh` runs it in the e2e
//! guest); it creates a tap device and needs the `vhost_net` and `tun` modules. Guest memory
//! is this process's own memory (a memfd mapping); IOVAs differ from its addresses, and the
//! ring pages, contiguous in IOVA, sit at scattered guest-physical pages.
//!
//! This module is the virtio-net *driver* side (rings, buffers, tap); the IOTLB protocol
//! lives in `frontend::kernel` and the page tables in `frontend::viommu`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use frontend::kernel::{serve_misses, MissFilter, VhostKernel, NET_FEATURES};
use frontend::vhost_user::GuestRam;
use frontend::viommu::{Viommu, ViommuConfig};
use iotlb::Perm;
use vm_memory::{Bytes, GuestAddress};
use wire::features::backend as backend_f;

/// Options of `kernel-net`.
#[derive(Args, Debug, Clone)]
pub struct KernelNetArgs {
    /// Frames to send.
    #[arg(long, default_value_t = 32)]
    pub frames: u32,
    /// The vhost-net device node.
    #[arg(long, default_value = "/dev/vhost-net")]
    pub vhost: String,
}

const PAGE: u64 = 4096;
/// Queue size of both rings.
const QSIZE: u16 = 64;
/// `virtio_net_hdr_v1`: 12 bytes with VERSION_1.
const VNET_HDR: usize = 12;
/// The EtherType of our test frames (IEEE local experimental).
const ETHERTYPE: u16 = 0x88b5;
/// IOVA of the first ring page.
const RING_IOVA: u64 = 0x7_0000_0000;
/// Guest RAM size.
const RAM: u64 = 8 << 20;
/// Guest-physical pages of the rings (deliberately out of order): TX desc, avail, used,
/// then RX desc, avail, used. They are mapped at consecutive IOVA pages.
const RING_GPA: [u64; 6] = [0x9000, 0x2000, 0x14000, 0x6000, 0x11000, 0x3000];
/// First guest-physical page for buffers.
const BUF_GPA: u64 = 0x40000;

const TX: u32 = 1;
const RX: u32 = 0;

/// A virtqueue as the driver sees it.
struct Ring {
    desc_gpa: u64,
    avail_gpa: u64,
    used_gpa: u64,
    desc_iova: u64,
    avail_iova: u64,
    used_iova: u64,
    avail_idx: u16,
    kick: OwnedFd,
    call: OwnedFd,
}

fn errno(what: &str) -> impl Fn(rustix::io::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A tap device with a vnet header, up, and a packet socket bound to it.
struct Tap {
    fd: OwnedFd,
    packet: OwnedFd,
    name: String,
}

impl Tap {
    fn create() -> Result<Self, String> {
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun is missing: load the tun module (modprobe tun)".into());
        }
        let fd = rustix::fs::open(
            "/dev/net/tun",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(errno("open /dev/net/tun"))?;
        // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"vhiotlb%d\0") {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()));
        }
        let hdr: libc::c_int = VNET_HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(format!(
                "TUNSETVNETHDRSZ: {}",
                std::io::Error::last_os_error()
            ));
        }
        let name: String = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        // Bring it up, and find its index, through an ordinary socket.
        // SAFETY: plain socket creation; the result is checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `s` is a fresh descriptor we own.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        ifr.ifr_ifru.ifru_flags = 0;
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write one `ifreq`.
        unsafe {
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                return Err(format!(
                    "SIOCGIFFLAGS {name}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
            if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
                return Err(format!(
                    "SIOCSIFFLAGS {name} up: {}",
                    std::io::Error::last_os_error()
                ));
            }
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) < 0 {
                return Err(format!(
                    "SIOCGIFINDEX {name}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        // SAFETY: the union member SIOCGIFINDEX filled in.
        let ifindex = unsafe { ifr.ifr_ifru.ifru_ifindex };
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let p = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(proto),
            )
        };
        if p < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `p` is a fresh descriptor we own.
        let packet = unsafe { OwnedFd::from_raw_fd(p) };
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid `sockaddr_ll` of the length passed.
        let r = unsafe {
            libc::bind(
                packet.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(format!(
                "bind AF_PACKET to {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Tap { fd, packet, name })
    }

    /// Frames of ours that came in on the tap (from vhost-net's TX), waiting up to `wait`
    /// for `n` of them.
    fn receive(&self, n: usize, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        while got.len() < n && Instant::now() < deadline {
            match rustix::net::recv(&self.packet, &mut buf[..], rustix::net::RecvFlags::empty()) {
                Ok((len, _)) => {
                    let f = &buf[..len.min(buf.len())];
                    if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE {
                        got.push(f.to_vec());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => break,
            }
        }
        got
    }
}

/// A test frame: broadcast, our EtherType, `seq` and a pattern.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq.wrapping_mul(31)) as u8);
    }
    f
}

struct Net {
    ram: Arc<GuestRam>,
    viommu: Viommu,
    dev: VhostKernel,
    filter: MissFilter,
    tx: Ring,
    tap: Tap,
    /// MISSes answered so far.
    answered: u64,
}

impl Net {
    fn setup(args: &KernelNetArgs) -> Result<Self, String> {
        if !Path::new(&args.vhost).exists() {
            return Err(format!(
                "{} is missing: load the vhost_net module (modprobe vhost_net)",
                args.vhost
            ));
        }
        let ram = Arc::new(GuestRam::new(RAM).map_err(|e| e.to_string())?);
        let viommu = Viommu::new(ViommuConfig::default());
        let dev =
            VhostKernel::open(Path::new(&args.vhost), ram.va(0)).map_err(|e| e.to_string())?;
        let offered = dev.features().map_err(|e| e.to_string())?;
        if offered & NET_FEATURES != NET_FEATURES {
            return Err(format!(
                "{} offers features {offered:#x}, without {:#x} (ACCESS_PLATFORM, VERSION_1, MRG_RXBUF)",
                args.vhost,
                NET_FEATURES & !offered
            ));
        }
        dev.set_features(NET_FEATURES).map_err(|e| e.to_string())?;
        let acked = dev
            .negotiate_backend(
                backend_f::IOTLB_MSG_V2 | backend_f::IOTLB_BATCH | backend_f::IOTLB_ASID,
            )
            .map_err(|e| e.to_string())?;
        println!(
            "kernel-net: backend features acked {acked:#x} (message v2: {})",
            dev.format().v2
        );
        dev.set_mem_table(RAM).map_err(|e| e.to_string())?;
        let tap = Tap::create()?;
        println!("kernel-net: tap {} up", tap.name);
        // Rings: consecutive IOVA pages over scattered guest pages.
        let perms = [Perm::ReadOnly, Perm::ReadOnly, Perm::ReadWrite];
        for (i, gpa) in RING_GPA.iter().enumerate() {
            viommu
                .map_at(RING_IOVA + i as u64 * PAGE, *gpa, PAGE, perms[i % 3])
                .map_err(|e| e.to_string())?;
        }
        let eventfd = || {
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(errno("eventfd"))
        };
        let mut rings = Vec::new();
        for (q, first) in [(RX, 3usize), (TX, 0usize)] {
            let ring = Ring {
                desc_gpa: RING_GPA[first],
                avail_gpa: RING_GPA[first + 1],
                used_gpa: RING_GPA[first + 2],
                desc_iova: RING_IOVA + first as u64 * PAGE,
                avail_iova: RING_IOVA + (first as u64 + 1) * PAGE,
                used_iova: RING_IOVA + (first as u64 + 2) * PAGE,
                avail_idx: 0,
                kick: eventfd()?,
                call: eventfd()?,
            };
            dev.set_vring(
                q,
                u32::from(QSIZE),
                ring.desc_iova,
                ring.avail_iova,
                ring.used_iova,
                0,
                ring.kick.as_fd(),
                ring.call.as_fd(),
            )
            .map_err(|e| e.to_string())?;
            rings.push(ring);
        }
        let tx = rings.pop().ok_or("no TX ring")?;
        let mut net = Net {
            ram,
            viommu,
            dev,
            filter: MissFilter::default(),
            tx,
            tap,
            answered: 0,
        };
        // SET_BACKEND reads the used index through the IOTLB: with no entry it queues a
        // MISS (RO, although the ring will be written) and fails with EFAULT. Answer, retry.
        for q in [RX, TX] {
            let mut tries = 0;
            loop {
                match net.dev.net_set_backend(q, Some(net.tap.fd.as_fd())) {
                    Ok(()) => break,
                    Err(frontend::kernel::KernelError::Ioctl { errno, .. })
                        if errno == rustix::io::Errno::FAULT && tries < 4 =>
                    {
                        tries += 1;
                        net.serve()?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            println!(
                "kernel-net: queue {q} attached to the tap after {tries} EFAULT(s), {} MISSes answered",
                net.answered
            );
        }
        net.serve()?;
        Ok(net)
    }

    /// Answer whatever MISSes are pending.
    fn serve(&mut self) -> Result<(), String> {
        let (n, unmapped) =
            serve_misses(&self.dev, &self.viommu, &mut self.filter).map_err(|e| e.to_string())?;
        self.answered += n;
        if !unmapped.is_empty() {
            return Err(format!(
                "the kernel missed on unmapped IOVAs {unmapped:#x?}"
            ));
        }
        Ok(())
    }

    fn write<T: vm_memory::ByteValued>(&self, gpa: u64, v: T) -> Result<(), String> {
        self.ram
            .memory()
            .write_obj(v, GuestAddress(gpa))
            .map_err(|e| format!("guest memory at {gpa:#x}: {e}"))
    }

    fn used_idx(&self, r: &Ring) -> Result<u16, String> {
        let idx: u16 = self
            .ram
            .memory()
            .read_obj(GuestAddress(r.used_gpa + 2))
            .map_err(|e| format!("guest memory: {e}"))?;
        Ok(u16::from_le(idx))
    }

    /// Put `bufs` (IOVA, length) on the TX ring as one-descriptor chains and kick.
    fn post_tx(&mut self, bufs: &[(u64, u32)]) -> Result<(), String> {
        for &(iova, len) in bufs {
            let slot = self.tx.avail_idx % QSIZE;
            let d = self.tx.desc_gpa + u64::from(slot) * 16;
            self.write(d, iova.to_le())?;
            self.write(d + 8, len.to_le())?;
            self.write(d + 12, 0u16)?;
            self.write(d + 14, 0u16)?;
            self.write(self.tx.avail_gpa + 4 + 2 * u64::from(slot), slot.to_le())?;
            self.tx.avail_idx = self.tx.avail_idx.wrapping_add(1);
        }
        // The ring entries before the index that publishes them.
        fence(Ordering::Release);
        self.write(self.tx.avail_gpa + 2, self.tx.avail_idx.to_le())?;
        fence(Ordering::SeqCst);
        rustix::io::write(&self.tx.kick, &1u64.to_ne_bytes()).map_err(errno("kick"))?;
        Ok(())
    }

    /// Serve misses until the TX used index reaches the avail index.
    fn wait_tx(&mut self, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            self.serve()?;
            if self.used_idx(&self.tx)? == self.tx.avail_idx {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "TX stalled: used {} of {} after {wait:?} ({} MISSes answered)",
                    self.used_idx(&self.tx)?,
                    self.tx.avail_idx,
                    self.answered
                ));
            }
            let vhost = self.dev.fd();
            let mut fds = [
                rustix::event::PollFd::new(&vhost, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&self.tx.call, rustix::event::PollFlags::IN),
            ];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.tx.call, &mut b);
        }
    }
}

/// Run the checks; print what happened at each step.
pub fn run(args: &KernelNetArgs) -> Result<(), String> {
    if args.frames == 0 || args.frames > u32::from(QSIZE) * 16 {
        return Err(format!(
            "--frames must be within 1..={}",
            u32::from(QSIZE) * 16
        ));
    }
    let mut net = Net::setup(args)?;
    println!(
        "kernel-net: set up, {} MISSes answered so far",
        net.answered
    );

    // TX with no IOTLB entry for the buffers: every page is a miss, answered from the
    // vIOMMU; buffers are mapped at fresh IOVAs per frame (strict), page by page.
    let before = net.answered;
    let mut sent = Vec::new();
    let mut gpa = BUF_GPA;
    for seq in 0..args.frames {
        let f = frame(seq, 60 + (seq as usize * 37) % 1400);
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(&f);
        net.ram
            .memory()
            .write_slice(&buf, GuestAddress(gpa))
            .map_err(|e| format!("guest memory: {e}"))?;
        let iova = net
            .viommu
            .map(gpa, PAGE, Perm::ReadOnly)
            .map_err(|e| e.to_string())?;
        net.post_tx(&[(iova, buf.len() as u32)])?;
        net.wait_tx(Duration::from_secs(5))?;
        sent.push(f);
        gpa += 2 * PAGE;
    }
    let got = net.tap.receive(sent.len(), Duration::from_secs(2));
    let tx_misses = net.answered - before;
    println!(
        "kernel-net: TX {} frames, {} received on {}, {} MISSes answered ({} duplicates dropped)",
        sent.len(),
        got.len(),
        net.tap.name,
        tx_misses,
        net.dev.stats().duplicates.load(Ordering::Relaxed)
    );
    if got.len() != sent.len() {
        return Err(format!(
            "sent {} frames, {} came out of the tap",
            sent.len(),
            got.len()
        ));
    }
    for (i, (s, g)) in sent.iter().zip(&got).enumerate() {
        if s != g {
            return Err(format!(
                "frame {i} differs: sent {} bytes, got {}",
                s.len(),
                g.len()
            ));
        }
    }
    if tx_misses < u64::from(args.frames) {
        return Err(format!(
            "{} frames at fresh IOVAs caused only {tx_misses} MISSes",
            args.frames
        ));
    }
    println!("kernel-net: PASS");
    Ok(())
}
