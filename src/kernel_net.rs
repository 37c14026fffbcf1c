//! `vhost-iotlb kernel-net`: drive the kernel's `/dev/vhost-net` behind our vIOMMU and show
//! its device IOTLB working, case by case, then measure it.
//!
//! Cases (each named; the first that fails ends the run with its name):
//! - `used-ring`: attaching the tap makes the kernel ask for the used ring read-only; we
//!   answer with the mapping's permission (read-write), so its later writes go through;
//! - `tx-cold`: frames at fresh IOVAs, no IOTLB entry to start with, every MISS answered,
//!   frames checked byte for byte on an `AF_PACKET` socket bound to the tap, each buffer
//!   unmapped (an INVALIDATE) after use;
//! - `cross-page`: a buffer crossing into a page with no entry yet, its second page at a
//!   guest page far from the first: a second MISS at exactly the page boundary;
//! - `rx`: frames injected on the tap land in translated buffers; nothing else in guest
//!   memory changes but those buffers and the used ring;
//! - `poison`: INVALIDATE a data page, poison its old page, map the IOVA to another page
//!   with new content: the new content goes out, never the old;
//! - `prepush`: UPDATEs written before the kick: no MISS at all;
//! - `both-transports`: one vIOMMU serving this kernel device and a vhost-user back-end (ours,
//!   in this process) through one interface: one IOVA range mapped, faulted into both,
//!   unmapped from both.
//!
//! Then frames per second with ACCESS_PLATFORM off, on with warm mappings, strict (map and
//! unmap per frame) and pre-push, and the MISS round trip (MISS read to the frame done).
//!
//! `--broken requested-perm|no-invalidate` answers wrongly on purpose, to show that a named
//! case catches it. Meant to run as root in a throwaway guest (`scripts/kernel-net.sh`): it
//! creates tap devices. Guest memory is this process's own (a memfd mapping); IOVAs differ
//! from its addresses, and ring pages contiguous in IOVA sit at scattered guest pages.
//!
//! This module is the virtio-net *driver* side (rings, buffers, tap, checks); the IOTLB
//! protocol lives in `frontend::kernel`, the page tables in `frontend::viommu`.
//!
//! Why this file is long: the cases, the measurement, its tap code and its driver ring are
//! still one file; moving them into a module tree of their own is issue 16.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use frontend::kernel::{serve_misses_with, KernelError, MissFilter, VhostKernel, NET_FEATURES};
use frontend::vhost_user::{FrontendConfig, GuestRam, VhostUserFrontend};
use frontend::viommu::{DeviceIotlb, Viommu, ViommuConfig};
use iotlb::hist::Histogram;
use iotlb::{Access, IovaRange, Perm};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress};
use wire::features::backend as backend_f;

/// Options of `kernel-net`.
#[derive(Args, Debug, Clone)]
pub struct KernelNetArgs {
    /// Frames per case, and per second of measurement.
    #[arg(long, default_value_t = 32)]
    pub frames: u32,
    /// Frames per measured mode.
    #[arg(long, default_value_t = 20000)]
    pub measure_frames: u32,
    /// Measurement rounds (interleaved; the median round of each mode is shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The vhost-net device node.
    #[arg(long, default_value = "/dev/vhost-net")]
    pub vhost: String,
    /// Answer wrongly on purpose (a named case must then fail).
    #[arg(long, value_enum)]
    pub broken: Option<Broken>,
    /// Also write the figures as JSON to this file (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Deliberately wrong IOMMU-side behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Broken {
    /// Answer a MISS with the permission asked for, not the mapping's.
    RequestedPerm,
    /// Unmap without sending the INVALIDATE (then remap the IOVA).
    NoInvalidate,
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
/// IOVA of the cross-page buffer.
const CROSS_IOVA: u64 = 0x7_1000_0000;
/// Guest RAM size.
const RAM: u64 = 8 << 20;
/// Guest-physical pages of the rings (deliberately out of order): RX desc, avail, used,
/// then TX desc, avail, used. They are mapped at consecutive IOVA pages.
const RING_GPA: [u64; 6] = [0x6000, 0x11000, 0x3000, 0x9000, 0x2000, 0x14000];
/// Guest-physical pages for buffers: `BUF_GPA..RAM`.
const BUF_GPA: u64 = 0x40000;

const RX: u32 = 0;
const TX: u32 = 1;

fn errno(what: &str) -> impl Fn(rustix::io::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
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
            return Err(os_err("TUNSETIFF"));
        }
        let hdr = VNET_HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(os_err("TUNSETVNETHDRSZ"));
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
            return Err(os_err("socket"));
        }
        // SAFETY: `s` is a fresh descriptor nobody else owns.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write one `ifreq`, alive
        // across each call; the union member read last is the one SIOCGIFINDEX wrote.
        let ifindex = unsafe {
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                return Err(os_err(&format!("SIOCGIFFLAGS {name}")));
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
            if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
                return Err(os_err(&format!("SIOCSIFFLAGS {name} up")));
            }
            if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) < 0 {
                return Err(os_err(&format!("SIOCGIFINDEX {name}")));
            }
            ifr.ifr_ifru.ifru_ifindex
        };
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
            return Err(os_err("AF_PACKET socket"));
        }
        // SAFETY: `p` is a fresh descriptor nobody else owns.
        let packet = unsafe { OwnedFd::from_raw_fd(p) };
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid `sockaddr_ll` of exactly the length passed.
        let r = unsafe {
            libc::bind(
                packet.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os_err(&format!("bind AF_PACKET to {name}")));
        }
        Ok(Tap { fd, packet, name })
    }

    /// Our frames that came in on the tap (vhost-net's TX), waiting up to `wait` for `n`.
    fn receive(&self, n: usize, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        while got.len() < n && Instant::now() < deadline {
            match rustix::net::recv(&self.packet, &mut buf[..], rustix::net::RecvFlags::empty()) {
                Ok((len, _)) => {
                    let f = &buf[..len.min(buf.len())];
                    if f.len() >= 14
                        && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE
                        && f[6..12] == SRC_TX
                    {
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
    fn drain(&self) {
        let mut buf = vec![0u8; 2048];
        while rustix::net::recv(&self.packet, &mut buf[..], rustix::net::RecvFlags::empty()).is_ok()
        {
        }
    }

    /// Send `frame` out of the tap interface: it reaches whoever reads the tap (vhost-net's
    /// RX).
    fn inject(&self, frame: &[u8]) -> Result<(), String> {
        rustix::net::send(&self.packet, frame, rustix::net::SendFlags::empty())
            .map_err(errno("AF_PACKET send"))
            .map(|_| ())
    }
}

/// Source MAC of frames we transmit through vhost-net.
const SRC_TX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC of frames we inject for RX.
const SRC_RX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A test frame: broadcast, our EtherType, `seq` and a pattern.
fn frame(src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq.wrapping_mul(31)) as u8);
    }
    f
}

/// A virtqueue as the driver sees it.
struct Ring {
    desc_gpa: u64,
    avail_gpa: u64,
    used_gpa: u64,
    avail_idx: u16,
    kick: OwnedFd,
    call: OwnedFd,
}

/// Drops INVALIDATEs (`--broken no-invalidate`).
struct NoInvalidate(Arc<VhostKernel>);

impl DeviceIotlb for NoInvalidate {
    fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), String> {
        self.0.update(range, gpa, perm)
    }
    fn invalidate(&self, _range: IovaRange) -> Result<(), String> {
        Ok(())
    }
}

/// Answers with the permission asked for (`--broken requested-perm`).
struct RequestedPerm<'a>(&'a VhostKernel, Access);

impl DeviceIotlb for RequestedPerm<'_> {
    fn update(&self, range: IovaRange, gpa: u64, _perm: Perm) -> Result<(), String> {
        self.0.update(range, gpa, self.1.as_perm())
    }
    fn invalidate(&self, range: IovaRange) -> Result<(), String> {
        self.0.invalidate(range)
    }
}

/// One vhost-net device, its rings, its tap, and the vIOMMU serving it.
struct Net {
    ram: Arc<GuestRam>,
    viommu: Arc<Viommu>,
    dev: Arc<VhostKernel>,
    iommu: bool,
    broken: Option<Broken>,
    filter: MissFilter,
    rx: Ring,
    tx: Ring,
    tap: Tap,
    /// MISSes answered so far.
    answered: u64,
    /// When the last unanswered MISS was read (for the round trip).
    miss_seen: Option<Instant>,
    rtt: Histogram,
}

impl Net {
    fn setup(args: &KernelNetArgs, iommu: bool) -> Result<Self, String> {
        if !Path::new(&args.vhost).exists() {
            return Err(format!(
                "{} is missing: load the vhost_net module (modprobe vhost_net)",
                args.vhost
            ));
        }
        let ram = Arc::new(GuestRam::new(RAM).map_err(|e| e.to_string())?);
        let viommu = Arc::new(Viommu::new(ViommuConfig::default()));
        let dev = Arc::new(
            VhostKernel::open(Path::new(&args.vhost), ram.va(0)).map_err(|e| e.to_string())?,
        );
        let want = if iommu {
            NET_FEATURES
        } else {
            NET_FEATURES & !wire::features::device::ACCESS_PLATFORM
        };
        let offered = dev.features().map_err(|e| e.to_string())?;
        if offered & want != want {
            return Err(format!(
                "{} offers features {offered:#x}, without {:#x} (ACCESS_PLATFORM, VERSION_1, \
                 MRG_RXBUF)",
                args.vhost,
                want & !offered
            ));
        }
        dev.set_features(want).map_err(|e| e.to_string())?;
        // BATCH and ASID are asked for and dropped when not offered (vhost-net offers v2
        // only).
        dev.negotiate_backend(
            backend_f::IOTLB_MSG_V2 | backend_f::IOTLB_BATCH | backend_f::IOTLB_ASID,
        )
        .map_err(|e| e.to_string())?;
        dev.set_mem_table(RAM).map_err(|e| e.to_string())?;
        let tap = Tap::create()?;
        // Rings: consecutive IOVA pages over scattered guest pages (or their plain
        // addresses without the IOMMU).
        let perms = [Perm::ReadOnly, Perm::ReadOnly, Perm::ReadWrite];
        if iommu {
            for (i, gpa) in RING_GPA.iter().enumerate() {
                viommu
                    .map_at(RING_IOVA + i as u64 * PAGE, *gpa, PAGE, perms[i % 3])
                    .map_err(|e| e.to_string())?;
            }
        }
        let answerer: Arc<dyn DeviceIotlb> = match args.broken {
            Some(Broken::NoInvalidate) => Arc::new(NoInvalidate(dev.clone())),
            _ => dev.clone(),
        };
        viommu.attach(answerer);
        let eventfd = || {
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(errno("eventfd"))
        };
        let addr = |i: usize| {
            if iommu {
                RING_IOVA + i as u64 * PAGE
            } else {
                ram.va(RING_GPA[i])
            }
        };
        let mut rings = Vec::new();
        for (q, first) in [(RX, 0usize), (TX, 3usize)] {
            let ring = Ring {
                desc_gpa: RING_GPA[first],
                avail_gpa: RING_GPA[first + 1],
                used_gpa: RING_GPA[first + 2],
                avail_idx: 0,
                kick: eventfd()?,
                call: eventfd()?,
            };
            dev.set_vring(
                q,
                u32::from(QSIZE),
                addr(first),
                addr(first + 1),
                addr(first + 2),
                0,
                ring.kick.as_fd(),
                ring.call.as_fd(),
            )
            .map_err(|e| e.to_string())?;
            rings.push(ring);
        }
        let tx = rings.pop().ok_or("no TX ring")?;
        let rx = rings.pop().ok_or("no RX ring")?;
        let mut net = Net {
            ram,
            viommu,
            dev,
            iommu,
            broken: args.broken,
            filter: MissFilter::default(),
            rx,
            tx,
            tap,
            answered: 0,
            miss_seen: None,
            rtt: Histogram::new(),
        };
        // SET_BACKEND reads the used index through the IOTLB: with no entry it queues a
        // MISS (read-only, although the ring will be written) and fails with EFAULT.
        // Answer, retry.
        for q in [RX, TX] {
            let mut tries = 0;
            loop {
                match net.dev.net_set_backend(q, Some(net.tap.fd.as_fd())) {
                    Ok(()) => break,
                    Err(KernelError::Ioctl { errno, .. })
                        if iommu && errno == rustix::io::Errno::FAULT && tries < 4 =>
                    {
                        tries += 1;
                        net.serve()?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        net.serve()?;
        Ok(net)
    }

    /// The address a descriptor holds for guest-physical `gpa` mapped at `iova`: the IOVA
    /// behind the IOMMU, the guest-physical address without (ring addresses, unlike
    /// descriptors, are our own virtual addresses then).
    fn dev_addr(&self, iova: u64, gpa: u64) -> u64 {
        if self.iommu {
            iova
        } else {
            gpa
        }
    }

    /// Answer whatever MISSes are pending.
    fn serve(&mut self) -> Result<(), String> {
        let viommu = self.viommu.clone();
        let dev = self.dev.clone();
        let broken = self.broken;
        let before = self.filter.log.len();
        let (n, unmapped) = serve_misses_with(&dev, &mut self.filter, |iova, access| {
            if broken == Some(Broken::RequestedPerm) {
                viommu.fault(&RequestedPerm(&dev, access), iova, access)
            } else {
                viommu.fault(&*dev, iova, access)
            }
        })
        .map_err(|e| e.to_string())?;
        if self.filter.log.len() > before && self.miss_seen.is_none() {
            self.miss_seen = Some(Instant::now());
        }
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

    fn read<T: vm_memory::ByteValued>(&self, gpa: u64) -> Result<T, String> {
        self.ram
            .memory()
            .read_obj(GuestAddress(gpa))
            .map_err(|e| format!("guest memory at {gpa:#x}: {e}"))
    }

    fn used_idx(&self, q: u32) -> Result<u16, String> {
        let r = if q == TX { &self.tx } else { &self.rx };
        self.read::<u16>(r.used_gpa + 2).map(u16::from_le)
    }

    /// Put one-descriptor chains `(device address, length)` on ring `q` and kick.
    fn post(&mut self, q: u32, bufs: &[(u64, u32)], write: bool) -> Result<(), String> {
        let flags: u16 = if write { 2 } else { 0 }; // VIRTQ_DESC_F_WRITE
        let (desc, avail, mut idx) = {
            let r = if q == TX { &self.tx } else { &self.rx };
            (r.desc_gpa, r.avail_gpa, r.avail_idx)
        };
        for &(addr, len) in bufs {
            let slot = idx % QSIZE;
            let d = desc + u64::from(slot) * 16;
            self.write(d, addr.to_le())?;
            self.write(d + 8, len.to_le())?;
            self.write(d + 12, flags.to_le())?;
            self.write(d + 14, 0u16)?;
            self.write(avail + 4 + 2 * u64::from(slot), slot.to_le())?;
            idx = idx.wrapping_add(1);
        }
        // The ring entries before the index that publishes them.
        fence(Ordering::Release);
        self.write(avail + 2, idx.to_le())?;
        fence(Ordering::SeqCst);
        let r = if q == TX { &mut self.tx } else { &mut self.rx };
        r.avail_idx = idx;
        rustix::io::write(&r.kick, &1u64.to_ne_bytes()).map_err(errno("kick"))?;
        Ok(())
    }

    /// Serve misses until ring `q`'s used index reaches its avail index.
    fn wait(&mut self, q: u32, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            self.serve()?;
            let target = if q == TX {
                self.tx.avail_idx
            } else {
                self.rx.avail_idx
            };
            if self.used_idx(q)? == target {
                if let Some(t) = self.miss_seen.take() {
                    self.rtt.record(t.elapsed());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "queue {q} stalled: used {} of {} after {wait:?} ({} MISSes answered, last \
                     MISSes {:#x?})",
                    self.used_idx(q)?,
                    target,
                    self.answered,
                    &self.filter.log[self.filter.log.len().saturating_sub(4)..]
                ));
            }
            let vhost = self.dev.fd();
            let call = if q == TX {
                &self.tx.call
            } else {
                &self.rx.call
            };
            let mut fds = [
                rustix::event::PollFd::new(&vhost, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(call, rustix::event::PollFlags::IN),
            ];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
            let mut b = [0u8; 8];
            let _ = rustix::io::read(call, &mut b);
        }
    }

    /// Write `f` (after a zero vnet header) at `gpa`.
    fn put_frame(&self, gpa: u64, f: &[u8]) -> Result<u32, String> {
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(f);
        self.ram
            .memory()
            .write_slice(&buf, GuestAddress(gpa))
            .map_err(|e| format!("guest memory: {e}"))?;
        Ok(buf.len() as u32)
    }

    /// Send `frames`, one at a time, each from a fresh one-page buffer mapped read-only and
    /// unmapped after use; check them on the tap.
    fn tx_fresh(&mut self, frames: &[Vec<u8>], pages: &mut Pages) -> Result<(), String> {
        self.tap.drain();
        for f in frames {
            let gpa = pages.next()?;
            let len = self.put_frame(gpa, f)?;
            let iova = self.map(gpa, PAGE, Perm::ReadOnly)?;
            self.post(TX, &[(self.dev_addr(iova, gpa), len)], false)?;
            self.wait(TX, Duration::from_secs(5))?;
            self.unmap(iova, PAGE)?;
        }
        self.check_tap(frames)
    }

    fn check_tap(&self, frames: &[Vec<u8>]) -> Result<(), String> {
        let got = self.tap.receive(frames.len(), Duration::from_secs(2));
        if got.len() != frames.len() {
            return Err(format!(
                "sent {} frames, {} came out of the tap",
                frames.len(),
                got.len()
            ));
        }
        for (i, (s, g)) in frames.iter().zip(&got).enumerate() {
            if s != g {
                let poisoned = g.len() > 20 && g[14..20].iter().all(|&b| b == POISON);
                let seq = |f: &[u8]| {
                    f.get(14..18)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                };
                return Err(format!(
                    "frame {i} differs: sent {} bytes (sequence {:?}), got {} (sequence {:?}){}",
                    s.len(),
                    seq(s),
                    g.len(),
                    seq(g),
                    if poisoned {
                        " of poison: the device read a page after its INVALIDATE"
                    } else {
                        ""
                    }
                ));
            }
        }
        Ok(())
    }

    fn map(&self, gpa: u64, len: u64, perm: Perm) -> Result<u64, String> {
        if !self.iommu {
            return Ok(gpa);
        }
        self.viommu.map(gpa, len, perm).map_err(|e| e.to_string())
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<(), String> {
        if !self.iommu {
            return Ok(());
        }
        self.viommu.unmap(iova, len).map_err(|e| e.to_string())
    }

    /// Map `len` bytes of `gpa` read-only at the chosen `iova` in the vIOMMU.
    fn map_ro_at(&self, iova: u64, gpa: u64, len: u64) -> Result<(), String> {
        self.viommu
            .map_at(iova, gpa, len, Perm::ReadOnly)
            .map_err(|e| e.to_string())
    }

    /// Write a read-only UPDATE of `iova..+len` -> `gpa` straight to the kernel (behind the
    /// vIOMMU's back), checking that it took the whole message.
    fn push_raw(&self, what: &str, iova: u64, gpa: u64, len: u64) -> Result<(), String> {
        match self
            .dev
            .write_raw(&raw_msg(false, UPDATE, iova, len, self.ram.va(gpa), RO))
        {
            Ok(72) => Ok(()),
            other => Err(format!("{what}: write returned {other:?}, not 72")),
        }
    }

    fn misses(&self) -> usize {
        self.filter.log.len()
    }

    /// MISSes read since log position `from` for the pages of `iovas` (other queues, such
    /// as RX taking a frame the stack sent, may miss meanwhile).
    fn misses_on(&self, from: usize, iovas: &[u64]) -> usize {
        self.filter.log[from..]
            .iter()
            .filter(|(i, _)| iovas.contains(&(i & !(PAGE - 1))))
            .count()
    }
}

/// Buffer pages, handed out round-robin, two apart (the pages between stay untouched).
struct Pages(u64);

impl Pages {
    fn next(&mut self) -> Result<u64, String> {
        let p = self.0;
        self.0 = if p + 4 * PAGE > RAM {
            BUF_GPA
        } else {
            p + 2 * PAGE
        };
        Ok(p)
    }
}

/// The byte poisoned pages are filled with.
const POISON: u8 = 0xde;

fn case<T>(name: &str, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| format!("case {name} FAILED: {e}"))
}

/// One measured mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Warm,
    Strict,
    Prepush,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Warm => "warm",
            Mode::Strict => "strict",
            Mode::Prepush => "prepush",
        }
    }
}

/// Frames per second through vhost-net in `mode`, up to 16 in flight, 256-byte frames.
fn measure(args: &KernelNetArgs, mode: Mode) -> Result<(f64, u64, Histogram), String> {
    let mut net = Net::setup(args, mode != Mode::Off)?;
    const INFLIGHT: u64 = 16;
    let n = u64::from(args.measure_frames.max(INFLIGHT as u32));
    // Warm: 16 buffers mapped once.
    let warm: Vec<(u64, u64)> = (0..INFLIGHT)
        .map(|i| {
            let gpa = BUF_GPA + i * 2 * PAGE;
            net.map(gpa, PAGE, Perm::ReadOnly).map(|iova| (iova, gpa))
        })
        .collect::<Result<_, _>>()?;
    for (i, &(_, gpa)) in warm.iter().enumerate() {
        net.put_frame(gpa, &frame(SRC_TX, i as u32, 256))?;
    }
    let len = (VNET_HDR + 256) as u32;
    let misses0 = net.misses();
    net.rtt = Histogram::new();
    let start = Instant::now();
    let mut done = 0u64;
    while done < n {
        let batch = INFLIGHT.min(n - done);
        let mut bufs = Vec::new();
        let mut mapped = Vec::new();
        for i in 0..batch {
            let (iova, gpa) = warm[i as usize];
            match mode {
                Mode::Off | Mode::Warm => bufs.push((net.dev_addr(iova, gpa), len)),
                Mode::Strict | Mode::Prepush => {
                    let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
                    if mode == Mode::Prepush {
                        let range = IovaRange::from_size(iova, PAGE).map_err(|e| e.to_string())?;
                        net.dev.update(range, gpa, Perm::ReadOnly)?;
                    }
                    mapped.push(iova);
                    bufs.push((iova, len));
                }
            }
        }
        net.post(TX, &bufs, false)?;
        net.wait(TX, Duration::from_secs(10))?;
        for iova in mapped {
            net.unmap(iova, PAGE)?;
        }
        done += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    let misses = (net.misses() - misses0) as u64;
    Ok((n as f64 / secs, misses, std::mem::take(&mut net.rtt)))
}

/// Run the cases, then the measurements; print what happened at each step.
pub fn run(args: &KernelNetArgs) -> Result<(), String> {
    if args.frames == 0 || args.frames > 1024 {
        return Err("--frames must be within 1..=1024".into());
    }
    let mut net = Net::setup(args, true)?;
    let mut pages = Pages(BUF_GPA);
    let order: Vec<String> = net
        .filter
        .log
        .iter()
        .map(|&(iova, a)| {
            let names = [
                "rx-desc", "rx-avail", "rx-used", "tx-desc", "tx-avail", "tx-used",
            ];
            let i = iova.wrapping_sub(RING_IOVA) / PAGE;
            format!(
                "{}({})",
                names.get(i as usize).copied().unwrap_or("other"),
                if a == Access::Read { "RO" } else { "WO" }
            )
        })
        .collect();
    println!(
        "kernel-net: /dev/vhost-net up on tap {}, message format v2={}, MISSes while \
         attaching, in order: {}",
        net.tap.name,
        net.dev.format().v2,
        order.join(" ")
    );

    // used-ring: the kernel asked for the used ring read-only while attaching.
    let used_iova = RING_IOVA + 5 * PAGE;
    let asked_ro = net
        .filter
        .log
        .iter()
        .any(|&(i, a)| i & !(PAGE - 1) == used_iova && a == Access::Read);
    case(
        "used-ring",
        (|| {
            if !asked_ro {
                return Err(format!(
                    "no read-only MISS for the TX used ring at attach time: {:#x?}",
                    net.filter.log
                ));
            }
            // The first frame makes the kernel write the used ring: with a read-only answer
            // it would stall here, silently.
            let f = vec![frame(SRC_TX, 0, 60)];
            net.tx_fresh(&f, &mut pages)
        })(),
    )?;
    println!("case used-ring: ok (asked RO for the used ring, answered RW, a frame completed)");

    // tx-cold
    let m0 = net.misses();
    let frames: Vec<Vec<u8>> = (1..=args.frames)
        .map(|s| frame(SRC_TX, s, 60 + (s as usize * 37) % 1400))
        .collect();
    case("tx-cold", net.tx_fresh(&frames, &mut pages))?;
    let cold = net.misses() - m0;
    case(
        "tx-cold",
        if cold >= frames.len() {
            Ok(())
        } else {
            Err(format!(
                "{} frames at fresh IOVAs caused only {cold} MISSes",
                frames.len()
            ))
        },
    )?;
    println!(
        "case tx-cold: ok ({} frames checked on the tap, {cold} MISSes, {} duplicates dropped)",
        frames.len(),
        net.dev.stats().duplicates.load(Ordering::Relaxed)
    );

    // cross-page: IOVA pages CROSS and CROSS+1 over guest pages far apart.
    let (p1, p2) = (pages.next()?, RAM - 2 * PAGE);
    case(
        "cross-page",
        (|| {
            net.map_ro_at(CROSS_IOVA, p1, PAGE)?;
            net.map_ro_at(CROSS_IOVA + PAGE, p2, PAGE)?;
            let f = frame(SRC_TX, 9999, 1200);
            let mut buf = vec![0u8; VNET_HDR];
            buf.extend_from_slice(&f);
            let off = PAGE - 500;
            let mem = net.ram.memory();
            mem.write_slice(&buf[..500], GuestAddress(p1 + off))
                .map_err(|e| e.to_string())?;
            mem.write_slice(&buf[500..], GuestAddress(p2))
                .map_err(|e| e.to_string())?;
            let m0 = net.filter.log.len();
            net.tap.drain();
            net.post(TX, &[(CROSS_IOVA + off, buf.len() as u32)], false)?;
            net.wait(TX, Duration::from_secs(5))?;
            net.check_tap(&[f])?;
            let log = &net.filter.log[m0..];
            if !log.contains(&(CROSS_IOVA + off, Access::Read))
                || !log.contains(&(CROSS_IOVA + PAGE, Access::Read))
            {
                return Err(format!(
                    "expected MISSes at {:#x} and at the page boundary {:#x}: {log:#x?}",
                    CROSS_IOVA + off,
                    CROSS_IOVA + PAGE
                ));
            }
            Ok(log.len())
        })(),
    )
    .map(|n| {
        println!(
            "case cross-page: ok ({n} MISSes: the buffer start, then exactly the page boundary)"
        )
    })?;

    // rx: the stack may send frames of its own out of the tap too (IPv6 neighbour
    // discovery): post spare buffers and look for ours among the used entries.
    case(
        "rx",
        (|| {
            let n = args.frames.min(u32::from(QSIZE) / 4) as usize;
            let nbufs = 2 * n;
            let mut bufs = Vec::new();
            let mut gpas = Vec::new();
            for _ in 0..nbufs {
                let gpa = pages.next()?;
                net.ram
                    .memory()
                    .write_slice(&[0u8; PAGE as usize], GuestAddress(gpa))
                    .map_err(|e| e.to_string())?;
                let iova = net.map(gpa, PAGE, Perm::WriteOnly)?;
                bufs.push((iova, PAGE as u32));
                gpas.push(gpa);
            }
            let first_slot = net.rx.avail_idx;
            net.post(RX, &bufs, true)?;
            // Let the kernel look at the new buffers, then freeze the picture of memory.
            std::thread::sleep(Duration::from_millis(50));
            net.serve()?;
            let snapshot = |net: &Net| -> Result<Vec<u8>, String> {
                let mut m = vec![0u8; RAM as usize];
                net.ram
                    .memory()
                    .read_slice(&mut m, GuestAddress(0))
                    .map_err(|e| e.to_string())?;
                Ok(m)
            };
            let before = snapshot(&net)?;
            let used_before = net.used_idx(RX)?;
            let frames: Vec<Vec<u8>> = (0..n as u32)
                .map(|s| frame(SRC_RX, s, 64 + (s as usize * 53) % 1000))
                .collect();
            let m0 = net.misses();
            for f in &frames {
                net.tap.inject(f)?;
            }
            // Collect our frames from the used ring as they land.
            let mut found: Vec<Vec<u8>> = Vec::new();
            let mut seen = used_before;
            let deadline = Instant::now() + Duration::from_secs(5);
            while found.len() < n {
                net.serve()?;
                let used = net.used_idx(RX)?;
                while seen != used {
                    let e = net.rx.used_gpa + 4 + 8 * u64::from(seen % QSIZE);
                    let id = u32::from_le(net.read::<u32>(e)?);
                    let len = u32::from_le(net.read::<u32>(e + 4)?) as usize;
                    let k = (id as usize + usize::from(QSIZE) - usize::from(first_slot % QSIZE))
                        % usize::from(QSIZE);
                    let gpa = *gpas
                        .get(k)
                        .ok_or(format!("used id {id} is not one of ours"))?;
                    if len > VNET_HDR && len <= PAGE as usize {
                        let mut b = vec![0u8; len - VNET_HDR];
                        net.ram
                            .memory()
                            .read_slice(&mut b, GuestAddress(gpa + VNET_HDR as u64))
                            .map_err(|e| e.to_string())?;
                        if b.len() >= 14
                            && u16::from_be_bytes([b[12], b[13]]) == ETHERTYPE
                            && b[6..12] == SRC_RX
                        {
                            found.push(b);
                        }
                    }
                    seen = seen.wrapping_add(1);
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} of {n} injected frames arrived (used index {used}, {} MISSes)",
                        found.len(),
                        net.misses() - m0
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if found != frames {
                return Err("the frames in the RX buffers differ from those injected".into());
            }
            let after = snapshot(&net)?;
            // Nothing changed but the buffers and the RX used ring page.
            let allowed = |a: u64| {
                let page = a & !(PAGE - 1);
                page == net.rx.used_gpa || gpas.contains(&page)
            };
            if let Some(a) =
                (0..RAM).find(|&a| before[a as usize] != after[a as usize] && !allowed(a))
            {
                return Err(format!(
                    "guest memory changed outside the RX buffers at {a:#x}"
                ));
            }
            Ok((n, net.misses() - m0))
        })(),
    )
    .map(|(n, m)| {
        println!(
            "case rx: ok ({n} frames injected and found in translated buffers, {m} MISSes, \
             nothing else in memory changed)"
        )
    })?;

    // poison: IOVA X over page A sends frame A; INVALIDATE (unmap), poison A, map X over
    // page B with frame B: B goes out.
    case("poison", (|| {
        let (a, b) = (pages.next()?, pages.next()?);
        let fa = frame(SRC_TX, 0xa, 300);
        let fb = frame(SRC_TX, 0xb, 300);
        let len = net.put_frame(a, &fa)?;
        net.put_frame(b, &fb)?;
        net.tap.drain();
        let x = net.map(a, PAGE, Perm::ReadOnly)?;
        net.post(TX, &[(x, len)], false)?;
        net.wait(TX, Duration::from_secs(5))?;
        net.check_tap(std::slice::from_ref(&fa))?;
        let m0 = net.misses();
        net.unmap(x, PAGE)?;
        net.ram
            .memory()
            .write_slice(&[POISON; PAGE as usize], GuestAddress(a))
            .map_err(|e| e.to_string())?;
        let y = net.map(b, PAGE, Perm::ReadOnly)?;
        if y != x {
            // The allocator hands a freed IOVA out again at once; if it did not, remap by
            // hand.
            net.unmap(y, PAGE)?;
            net.map_ro_at(x, b, PAGE)?;
        }
        net.post(TX, &[(x, len)], false)?;
        net.wait(TX, Duration::from_secs(5))?;
        net.check_tap(std::slice::from_ref(&fb))?;
        Ok(net.misses_on(m0, &[x]))
    })())
    .map(|m| println!("case poison: ok (after the INVALIDATE the new page went out; {m} MISS for the remapped IOVA)"))?;

    // prepush: UPDATEs before the kick: no MISS.
    case(
        "prepush",
        (|| {
            let frames: Vec<Vec<u8>> = (0..args.frames.min(16))
                .map(|s| frame(SRC_TX, 0x1000 + s, 200))
                .collect();
            let mut bufs = Vec::new();
            let mut iovas = Vec::new();
            for f in &frames {
                let gpa = pages.next()?;
                let len = net.put_frame(gpa, f)?;
                let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
                let range = IovaRange::from_size(iova, PAGE).map_err(|e| e.to_string())?;
                net.dev.update(range, gpa, Perm::ReadOnly)?;
                bufs.push((iova, len));
                iovas.push(iova);
            }
            net.tap.drain();
            let m0 = net.misses();
            net.post(TX, &bufs, false)?;
            net.wait(TX, Duration::from_secs(5))?;
            net.check_tap(&frames)?;
            let m = net.misses_on(m0, &iovas);
            for iova in iovas {
                net.unmap(iova, PAGE)?;
            }
            if m != 0 {
                return Err(format!(
                    "{m} MISSes although every buffer was pushed before the kick"
                ));
            }
            Ok(frames.len())
        })(),
    )
    .map(|n| println!("case prepush: ok ({n} frames, 0 MISSes)"))?;

    kernel_behaviour(args, &mut net, &mut pages)?;
    case("both-transports", both_transports(&mut net))?;

    // Measurements.
    // Interleaved rounds, the median round of each mode reported: a TCG guest's speed
    // drifts.
    const MODES: [Mode; 4] = [Mode::Off, Mode::Warm, Mode::Strict, Mode::Prepush];
    let mut rounds: Vec<Vec<(f64, u64, Histogram)>> = MODES.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds.max(1) {
        for (i, mode) in MODES.iter().enumerate() {
            rounds[i].push(measure(args, *mode)?);
        }
    }
    let mut results = Vec::new();
    for (mode, mut r) in MODES.into_iter().zip(rounds) {
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mid = r.len() / 2;
        let (fps, misses, rtt) = r.swap_remove(mid);
        results.push((mode, fps, misses, rtt));
    }
    let off = results[0].1;
    println!(
        "{:<9} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "mode", "frames/s", "vs off", "misses", "rtt50 us", "rtt99 us"
    );
    let us = |h: &Histogram, q| (h.count() > 0).then(|| h.quantile(q).as_secs_f64() * 1e6);
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let mut out = serde_json::Map::new();
    for (mode, fps, misses, rtt) in &results {
        println!(
            "{:<9} {:>10.0} {:>6.0}% {:>9} {:>9} {:>9}",
            mode.name(),
            fps,
            fps / off * 100.0,
            misses,
            fmt(us(rtt, 0.5)),
            fmt(us(rtt, 0.99))
        );
        out.insert(
            mode.name().into(),
            json!({
                "frames_per_s": fps,
                "ratio_to_off": fps / off,
                "misses": misses,
                "miss_rtt_us": {"p50": us(rtt, 0.5), "p99": us(rtt, 0.99)},
            }),
        );
    }
    println!(
        "rtt: from reading a MISS on the vhost fd to the frame it held up being done \
         (TCG guest: compare ratios, not absolute figures)"
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(out))
            .map_err(|e| e.to_string())?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    println!("kernel-net: PASS");
    Ok(())
}

/// One vIOMMU, two transports: map a range, fault it into the kernel device and into a
/// vhost-user back-end (ours, served in this process), unmap it: both get the INVALIDATE,
/// and the kernel misses on it again.
fn both_transports(net: &mut Net) -> Result<(), String> {
    use backend::{EngineConfig, Server};
    use devices::{Blk, BlkConfig};
    let disk = rustix::fs::memfd_create("kernel-net-disk", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(errno("memfd_create"))?;
    let disk = std::fs::File::from(disk);
    disk.set_len(1 << 20).map_err(|e| e.to_string())?;
    let blk = Blk::new(disk, BlkConfig::default()).map_err(|e| e.to_string())?;
    let server = Arc::new(Server::new(blk, EngineConfig::default()));
    let dir = std::env::temp_dir().join(format!("kernel-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("blk.sock");
    let serving = {
        let (s, p) = (server.clone(), sock.clone());
        std::thread::spawn(move || s.serve(&p))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.is_listening() {
        if serving.is_finished() || Instant::now() > deadline {
            return Err("the vhost-user back-end did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The same vIOMMU: the front-end attaches its device IOTLB next to the kernel's.
    let fe = VhostUserFrontend::connect(
        &sock,
        net.ram.clone(),
        FrontendConfig::default(),
        Some(net.viommu.clone()),
    )
    .map_err(|e| format!("connecting to our vhost-user back-end: {e}"))?;
    let vu = fe.device_iotlb();
    let gpa = RAM - 4 * PAGE;
    let f = frame(SRC_TX, 0xb0b, 400);
    let len = net.put_frame(gpa, &f)?;
    let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
    // Fault it into both, through the one interface.
    let kernel: &dyn DeviceIotlb = &*net.dev;
    for (name, dev) in [("kernel", kernel), ("vhost-user", &*vu)] {
        if !net
            .viommu
            .fault(dev, iova, Access::Read)
            .map_err(|e| e.to_string())?
        {
            return Err(format!("{name}: the fault found no mapping"));
        }
    }
    let k0 = net.dev.stats().invalidations.load(Ordering::Relaxed);
    // The kernel uses its entry without a MISS.
    let m0 = net.misses();
    net.tap.drain();
    net.post(TX, &[(iova, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&f))?;
    if net.misses_on(m0, &[iova]) != 0 {
        return Err("the kernel missed on a range already faulted in".into());
    }
    // Unmap: an INVALIDATE to each, each acknowledged before `unmap` returns (a write the
    // kernel applied; a REPLY_ACK from the back-end).
    net.viommu.unmap(iova, PAGE).map_err(|e| e.to_string())?;
    let k1 = net.dev.stats().invalidations.load(Ordering::Relaxed);
    if k1 != k0 + 1 {
        return Err(format!("INVALIDATEs written to the kernel: {k0} -> {k1}"));
    }
    // The kernel lost it: the same IOVA, mapped again, misses again.
    let again = net.map(gpa, PAGE, Perm::ReadOnly)?;
    let m1 = net.misses();
    net.post(TX, &[(again, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&f))?;
    if again == iova && net.misses_on(m1, &[iova]) == 0 {
        return Err("the kernel used the range after its INVALIDATE without a MISS".into());
    }
    net.unmap(again, PAGE)?;
    // The back-end's counters are folded in when its connection ends.
    drop(fe);
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = server.stats();
        if st.updates > 0 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if st.updates == 0 || st.invalidations == 0 {
        return Err(format!(
            "the vhost-user back-end saw no UPDATE or no INVALIDATE: {st}"
        ));
    }
    server.shutdown_handle().shutdown();
    let _ = serving.join();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "case both-transports: ok (one vIOMMU: UPDATE to the kernel and to vhost-user, the \
         kernel used it without a MISS, the unmap reached both)"
    );
    Ok(())
}

/// A raw `vhost_msg_v2` (or v1 with `v1`): type word, then the 32-byte iotlb payload with
/// `iova`, `size`, `uaddr`, `perm`, `ty`; zero elsewhere.
fn raw_msg(v1: bool, ty: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> [u8; 72] {
    let mut m = [0u8; 72];
    m[0..4].copy_from_slice(&(if v1 { 1u32 } else { 2u32 }).to_ne_bytes());
    m[8..16].copy_from_slice(&iova.to_ne_bytes());
    m[16..24].copy_from_slice(&size.to_ne_bytes());
    m[24..32].copy_from_slice(&uaddr.to_ne_bytes());
    m[32] = perm;
    m[33] = ty;
    m
}

const MISS: u8 = 1;
const UPDATE: u8 = 2;
const INVALIDATE: u8 = 3;
const RO: u8 = 1;

/// Put `f` at `gpa`, send it from device address `addr`, check it on the tap (or that
/// `expect` came out instead); returns the MISSes read for `addr`'s page meanwhile.
fn send_check(
    net: &mut Net,
    gpa: u64,
    addr: u64,
    f: &[u8],
    expect: &[u8],
) -> Result<usize, String> {
    let len = net.put_frame(gpa, f)?;
    net.tap.drain();
    let m0 = net.misses();
    net.post(TX, &[(addr, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(&[expect.to_vec()])?;
    Ok(net.misses_on(m0, &[addr & !(PAGE - 1)]))
}

/// Wait until the vhost fd has a message to read, for at most `timeout`
/// (zero: only look). Errors name a timeout or the poll failure.
fn wait_readable(dev: &VhostKernel, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let fd = dev.fd();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 && fds[0].revents().contains(rustix::event::PollFlags::IN) => {
                return Ok(())
            }
            Ok(_) if left.is_zero() => return Err(format!("nothing to read after {timeout:?}")),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
}

/// The kernel's side of the API, as the issue lists it, each shown on this kernel.
fn kernel_behaviour(args: &KernelNetArgs, net: &mut Net, pages: &mut Pages) -> Result<(), String> {
    let dev = net.dev.clone();
    let ok72 = |what: &str, r: Result<usize, rustix::io::Errno>| match r {
        Ok(72) => Ok(()),
        other => Err(format!("{what}: write returned {other:?}, not 72")),
    };

    // msg-format: the MISS as the kernel writes it.
    case("msg-format", (|| {
        let gpa = pages.next()?;
        let f = frame(SRC_TX, 0x2000, 100);
        let len = net.put_frame(gpa + 0x123, &f)?;
        let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
        let addr = iova + 0x123;
        net.tap.drain();
        net.post(TX, &[(addr, len)], false)?;
        // Wait for the kernel's MISS without answering it. poll(), not a short
        // read: the kernel answers a read shorter than a message with 0 before
        // it looks at its queue, so a short read says nothing about whether the
        // MISS is there yet (the vhost worker may not have run).
        wait_readable(&dev, Duration::from_secs(5))
            .map_err(|e| format!("waiting for the MISS: {e}"))?;
        // With the MISS queued, a read shorter than a message returns 0 ...
        let mut small = [0u8; 40];
        match dev.read_raw(&mut small) {
            Ok(0) => {}
            Ok(n) => return Err(format!("a 40-byte read returned {n}, not 0")),
            Err(e) => return Err(format!("a 40-byte read failed: {e}")),
        }
        // ... and consumes nothing: the message is still there, whole.
        wait_readable(&dev, Duration::ZERO)
            .map_err(|e| format!("after the 40-byte read, the MISS is gone: {e}"))?;
        let mut m = [0u8; 128];
        let n = dev.read_raw(&mut m).map_err(|e| format!("read: {e}"))?;
        let want = raw_msg(false, MISS, addr, 0, 0, RO);
        if n != 72 || m[..72] != want[..] {
            return Err(format!(
                "MISS bytes {:02x?} (read {n}), expected {:02x?}",
                &m[..n.min(72)],
                &want[..]
            ));
        }
        // Retries repeat it identically; then EAGAIN.
        let mut repeats = 0;
        loop {
            match dev.read_raw(&mut m) {
                Ok(72) if m[..72] == want[..] => repeats += 1,
                Ok(n) => return Err(format!("after the MISS: {:02x?}", &m[..n])),
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        net.filter.log.push((addr, Access::Read));
        if !net.viommu.fault(&*dev, addr, Access::Read).map_err(|e| e.to_string())? {
            return Err("no mapping to answer with".into());
        }
        net.wait(TX, Duration::from_secs(5))?;
        net.check_tap(&[f])?;
        net.unmap(iova, PAGE)?;
        Ok(repeats)
    })())
    .map(|r| println!("case msg-format: ok (72 bytes, v2, exact IOVA not page-aligned, size 0, uaddr 0, RO, zero tail; a 40-byte read returns 0 and takes nothing; {r} identical repeats, then EAGAIN)"))?;

    // write-rules: what write() returns.
    case(
        "write-rules",
        (|| {
            let gpa = pages.next()?;
            let iova = 0x7_2000_0000;
            net.map_ro_at(iova, gpa, PAGE)?;
            let uaddr = net.ram.va(gpa);
            // 40 bytes (header and payload, no padding) are enough; 72 is reported.
            ok72(
                "a 40-byte UPDATE",
                dev.write_raw(&raw_msg(false, UPDATE, iova, PAGE, uaddr, RO)[..40]),
            )?;
            let f = frame(SRC_TX, 0x2001, 120);
            let m = send_check(net, gpa, iova, &f, &f)?;
            if m != 0 {
                return Err(format!("{m} MISSes after a 40-byte UPDATE"));
            }
            let expect_err =
                |what: &str, r: Result<usize, rustix::io::Errno>, e: rustix::io::Errno| match r {
                    Err(got) if got == e => Ok(()),
                    other => Err(format!("{what}: {other:?}, expected {e}")),
                };
            use rustix::io::Errno;
            let mut bad = raw_msg(false, UPDATE, iova, PAGE, uaddr, RO);
            bad[0] = 99;
            expect_err("unknown header type", dev.write_raw(&bad), Errno::INVAL)?;
            expect_err(
                "UPDATE of size 0",
                dev.write_raw(&raw_msg(false, UPDATE, iova, 0, uaddr, RO)),
                Errno::INVAL,
            )?;
            expect_err(
                "unknown IOTLB type",
                dev.write_raw(&raw_msg(false, 77, iova, PAGE, uaddr, RO)),
                Errno::FAULT,
            )?;
            // INVALIDATE of size 0, and one past the top of the address space: success, and
            // nothing removed.
            ok72(
                "INVALIDATE size 0",
                dev.write_raw(&raw_msg(false, INVALIDATE, iova, 0, 0, 0)),
            )?;
            ok72(
                "INVALIDATE overflowing",
                dev.write_raw(&raw_msg(false, INVALIDATE, u64::MAX - 0xfff, 0x10000, 0, 0)),
            )?;
            let m = send_check(net, gpa, iova, &f, &f)?;
            if m != 0 {
                return Err(format!(
                    "{m} MISSes: a size-0 or overflowing INVALIDATE removed the entry"
                ));
            }
            // v1 is accepted on a v2 device: a v1 INVALIDATE removes it.
            ok72(
                "v1 INVALIDATE",
                dev.write_raw(&raw_msg(true, INVALIDATE, iova, PAGE, 0, 0)),
            )?;
            net.filter.forget(); // the next MISS must be answered again
            let m = send_check(net, gpa, iova, &f, &f)?;
            if m == 0 {
                return Err("no MISS after a v1 INVALIDATE: not applied".into());
            }
            net.viommu.unmap(iova, PAGE).map_err(|e| e.to_string())?;
            Ok(())
        })(),
    )?;
    println!("case write-rules: ok (72 for 40 bytes; EINVAL for an unknown type word and an UPDATE of size 0; EFAULT for an unknown IOTLB type; size-0 and overflowing INVALIDATEs succeed and remove nothing; v1 accepted on a v2 device)");

    // update-no-replace: an UPDATE over an entry does not replace it.
    case(
        "update-no-replace",
        (|| {
            let (a, b) = (pages.next()?, pages.next()?);
            let iova = 0x7_3000_0000;
            let fa = frame(SRC_TX, 0xa0, 150);
            let fb = frame(SRC_TX, 0xb0, 150);
            net.put_frame(b, &fb)?;
            net.push_raw("UPDATE to A", iova, a, PAGE)?;
            send_check(net, a, iova, &fa, &fa)?;
            net.push_raw("UPDATE to B over it", iova, b, PAGE)?;
            // Page A now holds fa again; the kernel still reads A.
            let len = net.put_frame(a, &fa)?;
            net.tap.drain();
            net.post(TX, &[(iova, len)], false)?;
            net.wait(TX, Duration::from_secs(5))?;
            net.check_tap(std::slice::from_ref(&fa))
                .map_err(|e| format!("the newer UPDATE replaced the older entry ({e})"))?;
            ok72(
                "INVALIDATE",
                dev.write_raw(&raw_msg(false, INVALIDATE, iova, PAGE, 0, 0)),
            )?;
            net.push_raw("UPDATE to B", iova, b, PAGE)?;
            net.tap.drain();
            net.post(TX, &[(iova, len)], false)?;
            net.wait(TX, Duration::from_secs(5))?;
            net.check_tap(std::slice::from_ref(&fb))?;
            ok72(
                "INVALIDATE",
                dev.write_raw(&raw_msg(false, INVALIDATE, iova, PAGE, 0, 0)),
            )?;
            Ok(())
        })(),
    )?;
    println!("case update-no-replace: ok (the older entry kept winning until an INVALIDATE)");

    // invalidate-whole: an INVALIDATE of one page removes a two-page entry whole.
    case(
        "invalidate-whole",
        (|| {
            let c = pages.next()?; // with the page after it (Pages leaves it unused)
            let iova = 0x7_4000_0000;
            net.map_ro_at(iova, c, 2 * PAGE)?;
            net.push_raw("two-page UPDATE", iova, c, 2 * PAGE)?;
            let f = frame(SRC_TX, 0xc0, 200);
            if send_check(net, c + PAGE, iova + PAGE, &f, &f)? != 0 {
                return Err("a MISS on a page the UPDATE covered".into());
            }
            ok72(
                "INVALIDATE of the first page",
                dev.write_raw(&raw_msg(false, INVALIDATE, iova, PAGE, 0, 0)),
            )?;
            net.filter.forget();
            let m = send_check(net, c + PAGE, iova + PAGE, &f, &f)?;
            if m == 0 {
                return Err("the second page survived an INVALIDATE of the first".into());
            }
            net.viommu
                .unmap(iova, 2 * PAGE)
                .map_err(|e| e.to_string())?;
            Ok(m)
        })(),
    )?;
    println!("case invalidate-whole: ok (INVALIDATE of one page took the whole two-page entry)");

    // capacity: at most 2048 entries, the oldest evicted silently.
    case(
        "capacity",
        (|| {
            let gpa = pages.next()?;
            let base = 0x7_5000_0000u64;
            let n = 2048 + 64;
            for i in 0..n {
                net.push_raw("UPDATE", base + i * PAGE, gpa, PAGE)?;
            }
            net.map_ro_at(base, gpa, PAGE)?;
            let last = base + (n - 1) * PAGE;
            net.map_ro_at(last, gpa, PAGE)?;
            let f = frame(SRC_TX, 0xd0, 90);
            net.filter.forget();
            let m_last = send_check(net, gpa, last, &f, &f)?;
            let m_first = send_check(net, gpa, base, &f, &f)?;
            ok72(
                "INVALIDATE",
                dev.write_raw(&raw_msg(false, INVALIDATE, base, n * PAGE, 0, 0)),
            )?;
            net.viommu.unmap(base, PAGE).map_err(|e| e.to_string())?;
            net.viommu.unmap(last, PAGE).map_err(|e| e.to_string())?;
            if m_last != 0 || m_first == 0 {
                return Err(format!(
                    "after {n} UPDATEs: {m_last} MISSes on the newest, {m_first} on the oldest"
                ));
            }
            Ok(n)
        })(),
    )
    .map(|n| {
        println!("case capacity: ok ({n} UPDATEs: the newest hit, the oldest was evicted silently)")
    })?;

    // set-features: SET_FEATURES again empties the kernel's IOTLB.
    case(
        "set-features",
        (|| {
            let gpa = pages.next()?;
            let iova = 0x7_6000_0000;
            net.map_ro_at(iova, gpa, PAGE)?;
            net.push_raw("UPDATE", iova, gpa, PAGE)?;
            let f = frame(SRC_TX, 0xe0, 80);
            if send_check(net, gpa, iova, &f, &f)? != 0 {
                return Err("a MISS on a pushed page".into());
            }
            dev.set_features(NET_FEATURES).map_err(|e| e.to_string())?;
            net.filter.forget(); // everything (rings too) must be answered again
            let m = send_check(net, gpa, iova, &f, &f)?;
            net.viommu.unmap(iova, PAGE).map_err(|e| e.to_string())?;
            if m == 0 {
                return Err("the entry survived SET_FEATURES".into());
            }
            Ok(())
        })(),
    )?;
    println!("case set-features: ok (SET_FEATURES again emptied the kernel's IOTLB)");

    // invalidate-all: the vIOMMU's whole-space INVALIDATE reaches the kernel (it ignores
    // size 0, so the transport sends it as two halves).
    case(
        "invalidate-all",
        (|| {
            let gpa = pages.next()?;
            let (lo, hi) = (0x7_7000_0000u64, 0xffff_ffff_ffff_0000u64);
            let f = frame(SRC_TX, 0xf0, 70);
            for iova in [lo, hi] {
                net.map_ro_at(iova, gpa, PAGE)?;
                net.push_raw("UPDATE", iova, gpa, PAGE)?;
                if send_check(net, gpa, iova, &f, &f)? != 0 {
                    return Err(format!("a MISS on the pushed page {iova:#x}"));
                }
            }
            DeviceIotlb::invalidate(&*dev, IovaRange::FULL)?;
            for iova in [lo, hi] {
                if send_check(net, gpa, iova, &f, &f)? == 0 {
                    return Err(format!("{iova:#x} survived the whole-space INVALIDATE"));
                }
                net.viommu.unmap(iova, PAGE).map_err(|e| e.to_string())?;
            }
            Ok(())
        })(),
    )?;
    println!("case invalidate-all: ok (a whole-space INVALIDATE emptied both halves)");

    case("no-mem-table", no_mem_table(args))?;
    println!("case no-mem-table: ok (SET_BACKEND without a memory table: EFAULT, no MISS)");
    Ok(())
}

/// Without a memory table, attaching the backend fails with EFAULT and queues no MISS.
fn no_mem_table(args: &KernelNetArgs) -> Result<(), String> {
    let ram = GuestRam::new(RAM).map_err(|e| e.to_string())?;
    let dev = VhostKernel::open(Path::new(&args.vhost), ram.va(0)).map_err(|e| e.to_string())?;
    dev.set_features(NET_FEATURES).map_err(|e| e.to_string())?;
    dev.negotiate_backend(backend_f::IOTLB_MSG_V2)
        .map_err(|e| e.to_string())?;
    let efd = || {
        rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(errno("eventfd"))
    };
    let (kick, call) = (efd()?, efd()?);
    dev.set_vring(
        TX,
        u32::from(QSIZE),
        RING_IOVA,
        RING_IOVA + PAGE,
        RING_IOVA + 2 * PAGE,
        0,
        kick.as_fd(),
        call.as_fd(),
    )
    .map_err(|e| e.to_string())?;
    let tap = Tap::create()?;
    match dev.net_set_backend(TX, Some(tap.fd.as_fd())) {
        Err(KernelError::Ioctl { errno, .. }) if errno == rustix::io::Errno::FAULT => {}
        other => return Err(format!("SET_BACKEND without a memory table: {other:?}")),
    }
    let mut m = [0u8; 72];
    match dev.read_raw(&mut m) {
        Err(rustix::io::Errno::AGAIN) => Ok(()),
        other => Err(format!("a message after the failed SET_BACKEND: {other:?}")),
    }
}
