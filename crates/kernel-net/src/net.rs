//! One vhost-net device as the driver sees it ([`Net`]): guest RAM, the vIOMMU serving the
//! device, its RX and TX rings (`virtq::testing::DriverQueue` over guest-physical ring pages),
//! its tap, and the MISSes answered so far. The cases and the measurement are built from
//! its steps: post buffers and kick, serve MISSes until a queue is done, check what came out
//! of the tap, map and unmap through the vIOMMU.
//!
//! It must not decide what a case expects (that is `cases`), nor speak the IOTLB protocol
//! (`frontend::kernel` reads MISSes and writes UPDATEs and INVALIDATEs; the one raw write,
//! [`Net::push_raw`], is there for cases that go behind the vIOMMU's back on purpose).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frontend::kernel::{serve_misses_with, KernelError, MissFilter, VhostKernel, NET_FEATURES};
use frontend::vhost_user::GuestRam;
use frontend::viommu::{DeviceIotlb, ForwardError, Viommu, ViommuConfig};
use iotlb::hist::Histogram;
use iotlb::{Access, IovaRange, Perm};
use virtq::testing::{Buf, DriverQueue, IovaSpace};
use vm_memory::{Bytes, GuestAddress};
use wire::features::backend as backend_f;

use crate::args::{Broken, KernelNetArgs};
use crate::error::KernelNetError;
use crate::frames::{is_ours, is_poisoned, seq, SRC_TX, VNET_HDR};
use crate::layout::{page_of, PAGE, QSIZE, RAM, RING_GPA, RING_IOVA, RING_NAMES, RX, TX};
use crate::msg;
use crate::sys::{eventfd, Tap};

/// A virtqueue as the driver sees it: the ring, and its kick and call eventfds.
#[derive(Debug)]
pub struct Ring {
    /// The driver's side of the split ring (addresses guest-physical).
    pub queue: DriverQueue,
    kick: OwnedFd,
    call: OwnedFd,
}

/// Drops INVALIDATEs (`--broken no-invalidate`).
struct NoInvalidate(Arc<VhostKernel>);

impl DeviceIotlb for NoInvalidate {
    fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), ForwardError> {
        self.0.update(range, gpa, perm)
    }
    fn invalidate(&self, _range: IovaRange) -> Result<(), ForwardError> {
        Ok(())
    }
}

/// Answers with the permission asked for (`--broken requested-perm`).
struct RequestedPerm<'a>(&'a VhostKernel, Access);

impl DeviceIotlb for RequestedPerm<'_> {
    fn update(&self, range: IovaRange, gpa: u64, _perm: Perm) -> Result<(), ForwardError> {
        self.0.update(range, gpa, self.1.as_perm())
    }
    fn invalidate(&self, range: IovaRange) -> Result<(), ForwardError> {
        self.0.invalidate(range)
    }
}

/// One vhost-net device, its rings, its tap, and the vIOMMU serving it.
pub struct Net {
    /// Guest RAM (this process's memfd mapping).
    pub ram: Arc<GuestRam>,
    /// The vIOMMU.
    pub viommu: Arc<Viommu>,
    /// The kernel device.
    pub dev: Arc<VhostKernel>,
    iommu: bool,
    broken: Option<Broken>,
    /// MISSes read (its log) and the dedup of those already answered.
    pub filter: MissFilter,
    /// How the driver reaches its rings: guest-physical addresses as they are.
    space: IovaSpace,
    /// Queue 0.
    pub rx: Ring,
    /// Queue 1.
    pub tx: Ring,
    /// The tap the device is attached to.
    pub tap: Tap,
    /// MISSes answered so far.
    answered: u64,
    /// When the last unanswered MISS was read (for the round trip).
    miss_seen: Option<Instant>,
    /// MISS round trips: from reading a MISS to the frame it held up being done.
    pub rtt: Histogram,
}

impl Net {
    /// Open the device, negotiate (ACCESS_PLATFORM if `iommu`), set the memory table and the
    /// rings, create the tap and attach it to both queues, answering the MISSes that brings.
    pub fn setup(args: &KernelNetArgs, iommu: bool) -> Result<Self, KernelNetError> {
        if !Path::new(&args.vhost).exists() {
            return Err(KernelNetError::MissingNode {
                node: args.vhost.clone(),
                module: "vhost_net",
            });
        }
        let ram = Arc::new(GuestRam::new(RAM).map_err(KernelNetError::GuestRam)?);
        let viommu = Arc::new(Viommu::new(ViommuConfig::default()));
        let dev = Arc::new(VhostKernel::open(Path::new(&args.vhost), ram.va(0))?);
        let want = if iommu {
            NET_FEATURES
        } else {
            NET_FEATURES & !wire::features::device::ACCESS_PLATFORM
        };
        let offered = dev.features()?;
        if offered & want != want {
            return Err(KernelNetError::MissingFeatures {
                node: args.vhost.clone(),
                offered,
                missing: want & !offered,
            });
        }
        dev.set_features(want)?;
        // BATCH and ASID are asked for and dropped when not offered (vhost-net offers v2
        // only).
        dev.negotiate_backend(
            backend_f::IOTLB_MSG_V2 | backend_f::IOTLB_BATCH | backend_f::IOTLB_ASID,
        )?;
        dev.set_mem_table(RAM)?;
        let tap = Tap::create()?;
        // Rings: consecutive IOVA pages over scattered guest pages (or their plain
        // addresses without the IOMMU).
        let perms = [Perm::ReadOnly, Perm::ReadOnly, Perm::ReadWrite];
        if iommu {
            for (i, gpa) in RING_GPA.iter().enumerate() {
                viommu.map_at(RING_IOVA + i as u64 * PAGE, *gpa, PAGE, perms[i % 3])?;
            }
        }
        let answerer: Arc<dyn DeviceIotlb> = match args.broken {
            Some(Broken::NoInvalidate) => Arc::new(NoInvalidate(dev.clone())),
            _ => dev.clone(),
        };
        viommu.attach(answerer);
        let addr = |i: usize| {
            if iommu {
                RING_IOVA + i as u64 * PAGE
            } else {
                ram.va(RING_GPA[i])
            }
        };
        let ring = |q: u32, first: usize| -> Result<Ring, KernelNetError> {
            let ring = Ring {
                queue: DriverQueue::at(
                    QSIZE,
                    RING_GPA[first],
                    RING_GPA[first + 1],
                    RING_GPA[first + 2],
                ),
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
            )?;
            Ok(ring)
        };
        let rx = ring(RX, 0)?;
        let tx = ring(TX, 3)?;
        let mut net = Net {
            ram,
            viommu,
            dev,
            iommu,
            broken: args.broken,
            filter: MissFilter::default(),
            space: IovaSpace::identity(),
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
                    Err(e) => return Err(e.into()),
                }
            }
        }
        net.serve()?;
        Ok(net)
    }

    /// The MISSes read so far, named by ring page (`rx-used(RO)` ...).
    pub fn attach_order(&self) -> Vec<String> {
        self.filter
            .log
            .iter()
            .map(|&(iova, a)| {
                let i = iova.wrapping_sub(RING_IOVA) / PAGE;
                format!(
                    "{}({})",
                    RING_NAMES.get(i as usize).copied().unwrap_or("other"),
                    if a == Access::Read { "RO" } else { "WO" }
                )
            })
            .collect()
    }

    /// The address a descriptor holds for guest-physical `gpa` mapped at `iova`: the IOVA
    /// behind the IOMMU, the guest-physical address without (ring addresses, unlike
    /// descriptors, are our own virtual addresses then).
    pub fn dev_addr(&self, iova: u64, gpa: u64) -> u64 {
        if self.iommu {
            iova
        } else {
            gpa
        }
    }

    /// Answer whatever MISSes are pending.
    pub fn serve(&mut self) -> Result<(), KernelNetError> {
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
        })?;
        if self.filter.log.len() > before && self.miss_seen.is_none() {
            self.miss_seen = Some(Instant::now());
        }
        self.answered += n;
        if !unmapped.is_empty() {
            return Err(KernelNetError::UnmappedMiss(unmapped));
        }
        Ok(())
    }

    fn ring(&self, q: u32) -> &Ring {
        if q == TX {
            &self.tx
        } else {
            &self.rx
        }
    }

    /// Ring `q`'s used index, as the device left it.
    pub fn used_idx(&self, q: u32) -> u16 {
        self.ring(q).queue.used_idx(self.ram.memory(), &self.space)
    }

    /// The used entries of ring `q` since the last call, `(head, len)`; frees their
    /// descriptors.
    pub fn take_used(&mut self, q: u32) -> Vec<(u16, u32)> {
        let r = if q == TX { &mut self.tx } else { &mut self.rx };
        r.queue.take_used(self.ram.memory(), &self.space)
    }

    /// Put one-descriptor chains `(device address, length)` on ring `q` (device-writable if
    /// `write`), publish them with one index write, and kick; returns their heads.
    pub fn post(
        &mut self,
        q: u32,
        bufs: &[(u64, u32)],
        write: bool,
    ) -> Result<Vec<u16>, KernelNetError> {
        let chains: Vec<[Buf; 1]> = bufs
            .iter()
            .map(|&(iova, len)| [Buf { iova, len, write }])
            .collect();
        let chains: Vec<&[Buf]> = chains.iter().map(|c| &c[..]).collect();
        let r = if q == TX { &mut self.tx } else { &mut self.rx };
        let heads = r
            .queue
            .add_chains(self.ram.memory(), &self.space, &chains)
            .ok_or(KernelNetError::NoDescriptors {
                queue: q,
                wanted: bufs.len(),
            })?;
        fence(Ordering::SeqCst);
        rustix::io::write(&r.kick, &1u64.to_ne_bytes()).map_err(KernelNetError::sys("kick"))?;
        Ok(heads)
    }

    /// Serve misses until ring `q`'s used index reaches its avail index; then take its used
    /// entries (freeing the descriptors).
    pub fn wait(&mut self, q: u32, wait: Duration) -> Result<(), KernelNetError> {
        let deadline = Instant::now() + wait;
        loop {
            self.serve()?;
            let target = self.ring(q).queue.avail_idx();
            if self.used_idx(q) == target {
                if let Some(t) = self.miss_seen.take() {
                    self.rtt.record(t.elapsed());
                }
                self.take_used(q);
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = &self.filter.log;
                return Err(KernelNetError::Stalled {
                    queue: q,
                    used: self.used_idx(q),
                    avail: target,
                    waited: wait,
                    answered: self.answered,
                    last_misses: log[log.len().saturating_sub(4)..].to_vec(),
                });
            }
            let vhost = self.dev.fd();
            let call = &self.ring(q).call;
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

    /// Write `f` (after a zero vnet header) at `gpa`; returns the buffer's length.
    pub fn put_frame(&self, gpa: u64, f: &[u8]) -> Result<u32, KernelNetError> {
        let mut buf = vec![0u8; VNET_HDR];
        buf.extend_from_slice(f);
        self.ram.memory().write_slice(&buf, GuestAddress(gpa))?;
        Ok(buf.len() as u32)
    }

    /// Send `frames`, one at a time, each from a fresh one-page buffer mapped read-only and
    /// unmapped after use; check them on the tap.
    pub fn tx_fresh(
        &mut self,
        frames: &[Vec<u8>],
        pages: &mut crate::layout::Pages,
    ) -> Result<(), KernelNetError> {
        self.tap.drain();
        for f in frames {
            let gpa = pages.next_page();
            let len = self.put_frame(gpa, f)?;
            let iova = self.map(gpa, PAGE, Perm::ReadOnly)?;
            self.post(TX, &[(self.dev_addr(iova, gpa), len)], false)?;
            self.wait(TX, Duration::from_secs(5))?;
            self.unmap(iova, PAGE)?;
        }
        self.check_tap(frames)
    }

    /// Our frames came out of the tap, exactly `frames`, in order.
    pub fn check_tap(&self, frames: &[Vec<u8>]) -> Result<(), KernelNetError> {
        let got = self
            .tap
            .receive(frames.len(), Duration::from_secs(2), |f| is_ours(f, SRC_TX));
        if got.len() != frames.len() {
            return Err(KernelNetError::TapCount {
                sent: frames.len(),
                received: got.len(),
            });
        }
        for (i, (s, g)) in frames.iter().zip(&got).enumerate() {
            if s != g {
                return Err(KernelNetError::FrameDiffers {
                    index: i,
                    sent_len: s.len(),
                    sent_seq: seq(s),
                    got_len: g.len(),
                    got_seq: seq(g),
                    poisoned: is_poisoned(g),
                });
            }
        }
        Ok(())
    }

    /// Map `len` bytes of `gpa` in the vIOMMU at an IOVA it chooses (the address itself
    /// without the IOMMU).
    pub fn map(&self, gpa: u64, len: u64, perm: Perm) -> Result<u64, KernelNetError> {
        if !self.iommu {
            return Ok(gpa);
        }
        Ok(self.viommu.map(gpa, len, perm)?)
    }

    /// Unmap `iova..+len` from the vIOMMU (nothing without the IOMMU).
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), KernelNetError> {
        if !self.iommu {
            return Ok(());
        }
        Ok(self.viommu.unmap(iova, len)?)
    }

    /// Map `len` bytes of `gpa` read-only at the chosen `iova` in the vIOMMU.
    pub fn map_ro_at(&self, iova: u64, gpa: u64, len: u64) -> Result<(), KernelNetError> {
        Ok(self.viommu.map_at(iova, gpa, len, Perm::ReadOnly)?)
    }

    /// Write a read-only UPDATE of `iova..+len` -> `gpa` straight to the kernel (behind the
    /// vIOMMU's back), checking that it took the whole message.
    pub fn push_raw(
        &self,
        what: &str,
        iova: u64,
        gpa: u64,
        len: u64,
    ) -> Result<(), KernelNetError> {
        let m = msg::raw(msg::V2, msg::UPDATE, iova, len, self.ram.va(gpa), msg::RO);
        msg::expect_whole(what, self.dev.write_raw(&m))
    }

    /// MISSes read so far.
    pub fn misses(&self) -> usize {
        self.filter.log.len()
    }

    /// MISSes read since log position `from` for the pages of `iovas` (other queues, such
    /// as RX taking a frame the stack sent, may miss meanwhile).
    pub fn misses_on(&self, from: usize, iovas: &[u64]) -> usize {
        self.filter.log[from..]
            .iter()
            .filter(|(i, _)| iovas.contains(&page_of(*i)))
            .count()
    }

    /// Put `f` at `gpa`, send it from device address `addr`, check it on the tap (or that
    /// `expect` came out instead); returns the MISSes read for `addr`'s page meanwhile.
    pub fn send_check(
        &mut self,
        gpa: u64,
        addr: u64,
        f: &[u8],
        expect: &[u8],
    ) -> Result<usize, KernelNetError> {
        let len = self.put_frame(gpa, f)?;
        self.tap.drain();
        let m0 = self.misses();
        self.post(TX, &[(addr, len)], false)?;
        self.wait(TX, Duration::from_secs(5))?;
        self.check_tap(&[expect.to_vec()])?;
        Ok(self.misses_on(m0, &[page_of(addr)]))
    }
}
