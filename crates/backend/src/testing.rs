//! Test support (feature `testing`): a scripted vhost-user front-end that plays QEMU and a
//! guest driver over real sockets ([`Frontend`]: guest memory in a sealed memfd shared with
//! the back-end, rings and buffers at IOVAs on scattered pages, an IOMMU side that answers
//! MISS messages from its page table, or deliberately not), a device that only reports
//! ([`NullDevice`]), and the helpers every engine test needs. For tests and benchmarks only:
//! it panics on anything unexpected, which is what a test wants.

#![allow(clippy::missing_panics_doc)]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use iotlb::{IovaRange, Perm};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use virtq::testing::{Buf, DriverQueue, IovaSpace, PageAllocator, PAGE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use wire::features::{device, protocol};
use wire::vhost_user::{
    BackendRequest, Connection, FrontendRequest, MemoryRegion, RegionFd, Reply, ReplyKind,
    VringAddr, VringFile, VringState,
};
use wire::IotlbMsg;

/// Guest memory size.
pub const MEM: u64 = 64 << 20;
/// The front-end virtual address of guest-physical 0 (what UPDATEs carry as `uaddr`).
pub const VA_BASE: u64 = 0x7f00_0000_0000;
/// Where the rings live with the IOMMU (one 1 MiB window per queue).
pub const RING_IOVA: u64 = 0x10_0000_0000;
/// Where buffers are handed out from with the IOMMU.
pub const BUF_IOVA: u64 = 0x20_0000_0000;
/// Where buffers live without the IOMMU (guest-physical).
pub const BUF_GPA: u64 = 48 << 20;
/// Guest-physical pages below this are handed out scattered (IOMMU buffers and rings);
/// from here to [`BUF_GPA`] contiguous runs are ([`Frontend::contiguous_buf`]).
pub const CONTIG_GPA: u64 = 32 << 20;

/// Front-end virtual addresses between two memory regions of a table split in several
/// ([`Frontend::connect_regions`]): a region's `uaddr` is not the one after the last's end.
pub const REGION_VA_GAP: u64 = 1 << 30;

/// One queue as the driver sees it.
pub struct Queue {
    /// Its ring, driver side.
    pub driver: DriverQueue,
    /// The kick eventfd (we write it).
    pub kick: OwnedFd,
    /// The call eventfd (the back-end writes it).
    pub call: OwnedFd,
    /// The vring error eventfd given with SET_VRING_ERR.
    pub err: OwnedFd,
}

/// The scripted front-end, guest driver and IOMMU side.
pub struct Frontend {
    /// The vhost-user connection.
    pub conn: Connection,
    /// Our end of the back-end channel: MISS and ACCESS_FAIL arrive here.
    pub channel: Connection,
    /// The guest's memory (the memfd shared with the back-end).
    pub mem: GuestMemoryMmap,
    /// The I/O page table (identity without the IOMMU).
    pub space: IovaSpace,
    /// Free guest-physical pages.
    pub alloc: PageAllocator,
    /// The queues set up.
    pub queues: Vec<Queue>,
    /// Whether ACCESS_PLATFORM was negotiated.
    pub iommu: bool,
    next_buf: u64,
    /// The next free guest-physical page of the contiguous area.
    next_contig: u64,
    /// IOVAs (pages) whose misses we do not answer.
    pub never_map: Vec<u64>,
    /// Misses we received and did not answer.
    pub ignored: Vec<u64>,
    /// MISS messages received.
    pub misses_seen: u64,
    /// ACCESS_FAIL messages received: `(iova, perm)`.
    pub access_fails: Vec<(u64, Perm)>,
    /// Regions the memory table has (guest-physical `0..MEM` cut in equal parts).
    regions: u64,
    /// Features and protocol features negotiated.
    features: u64,
    protocol: u64,
}

/// The front-end virtual address of guest-physical `gpa` with `regions` memory regions.
fn va_in(regions: u64, gpa: u64) -> u64 {
    VA_BASE + gpa + (gpa / (MEM / regions)) * REGION_VA_GAP
}

/// Guest RAM: a memfd sealed as QEMU seals its own (the back-end refuses unsealed ones).
fn memfd(len: u64) -> OwnedFd {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create("guest-ram", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    fd
}

impl Frontend {
    /// Connect over `sock` and set up `queues` queues of `size`, acking every device feature
    /// offered (bits 0 to 15).
    pub fn connect(sock: UnixStream, queues: u16, size: u16, iommu: bool, seed: u64) -> Self {
        Self::connect_acking(sock, queues, size, iommu, seed, 0xffff)
    }

    /// [`Frontend::connect`], acking only the offered device features in `device_mask`.
    pub fn connect_acking(
        sock: UnixStream,
        queues: u16,
        size: u16,
        iommu: bool,
        seed: u64,
        device_mask: u64,
    ) -> Self {
        Self::connect_full(sock, queues, size, iommu, seed, device_mask, 1)
    }

    /// [`Frontend::connect`] with guest memory given as `regions` memory regions (of one
    /// memfd, at guest-physical addresses one after the other, at front-end virtual
    /// addresses [`REGION_VA_GAP`] apart).
    pub fn connect_regions(
        sock: UnixStream,
        queues: u16,
        size: u16,
        iommu: bool,
        seed: u64,
        regions: u64,
    ) -> Self {
        Self::connect_full(sock, queues, size, iommu, seed, 0xffff, regions)
    }

    fn connect_full(
        sock: UnixStream,
        queues: u16,
        size: u16,
        iommu: bool,
        seed: u64,
        device_mask: u64,
        regions: u64,
    ) -> Self {
        assert!(regions >= 1 && MEM % (regions * PAGE) == 0);
        let conn = Connection::new(sock);
        let ram = memfd(MEM);
        let region = MmapRegion::build(
            Some(FileOffset::new(
                std::fs::File::from(ram.try_clone().unwrap()),
                0,
            )),
            MEM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_read_timeout(None).unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let channel = Connection::backend_channel(ours);
        // `backend_channel` makes the socket blocking; the read timeout stays.
        let mut f = Frontend {
            conn,
            channel,
            mem,
            space: if iommu {
                IovaSpace::new()
            } else {
                IovaSpace::identity()
            },
            alloc: PageAllocator::new(PAGE, CONTIG_GPA - PAGE, seed),
            next_contig: CONTIG_GPA,
            queues: Vec::new(),
            iommu,
            next_buf: if iommu { BUF_IOVA } else { BUF_GPA },
            never_map: Vec::new(),
            ignored: Vec::new(),
            misses_seen: 0,
            access_fails: Vec::new(),
            regions,
            features: 0,
            protocol: 0,
        };
        let feats = f.get_u64(FrontendRequest::GetFeatures);
        let mut want = device::VERSION_1 | device::PROTOCOL_FEATURES | device::RING_EVENT_IDX;
        if iommu {
            want |= device::ACCESS_PLATFORM;
        }
        assert_eq!(feats & want, want, "the back-end offers {feats:#x}");
        f.features = want | (feats & device_mask);
        f.request(FrontendRequest::SetFeatures(f.features));
        let proto = f.get_u64(FrontendRequest::GetProtocolFeatures);
        let need_p = protocol::REPLY_ACK | protocol::BACKEND_REQ | protocol::MQ;
        assert_eq!(proto & need_p, need_p);
        // CONFIG when offered (virtio-net's config space is the front-end's).
        let want_p = need_p | (proto & protocol::CONFIG);
        f.protocol = want_p;
        f.request_plain(FrontendRequest::SetProtocolFeatures(want_p));
        f.request(FrontendRequest::SetOwner);
        f.request(FrontendRequest::SetBackendReqFd(OwnedFd::from(theirs)));
        let part = MEM / regions;
        let table = (0..regions)
            .map(|i| RegionFd {
                region: MemoryRegion {
                    guest_phys_addr: i * part,
                    memory_size: part,
                    userspace_addr: f.va(i * part),
                    mmap_offset: i * part,
                },
                fd: ram.try_clone().unwrap(),
            })
            .collect();
        f.request(FrontendRequest::SetMemTable(table));
        for q in 0..queues {
            let base = if iommu {
                RING_IOVA + u64::from(q) * 0x10_0000
            } else {
                (4 << 20) + u64::from(q) * 0x2_0000
            };
            let driver = DriverQueue::new(&f.mem, &mut f.space, &mut f.alloc, base, size);
            let (d, a, u) = driver.addresses();
            // Without the IOMMU, ring addresses are front-end virtual addresses.
            let regions = f.regions;
            let va = |x: u64| {
                if iommu {
                    x
                } else {
                    va_in(regions, x)
                }
            };
            let idx = u32::from(q);
            f.request(FrontendRequest::SetVringNum(VringState {
                index: idx,
                num: u32::from(size),
            }));
            f.request(FrontendRequest::SetVringBase(VringState {
                index: idx,
                num: 0,
            }));
            f.request(FrontendRequest::SetVringAddr(VringAddr {
                index: idx,
                flags: 0,
                descriptor: va(d),
                used: va(u),
                available: va(a),
                log: 0,
            }));
            let kick = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
            let call = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
            let err = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
            f.request(FrontendRequest::SetVringErr(VringFile {
                index: q as u8,
                fd: Some(err.try_clone().unwrap()),
            }));
            f.request(FrontendRequest::SetVringCall(VringFile {
                index: q as u8,
                fd: Some(call.try_clone().unwrap()),
            }));
            f.request(FrontendRequest::SetVringKick(VringFile {
                index: q as u8,
                fd: Some(kick.try_clone().unwrap()),
            }));
            f.request(FrontendRequest::SetVringEnable(VringState {
                index: idx,
                num: 1,
            }));
            f.queues.push(Queue {
                driver,
                kick,
                call,
                err,
            });
        }
        f
    }

    /// The front-end virtual address of guest-physical `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        va_in(self.regions, gpa)
    }

    /// Negotiate `LOG_SHMFD` and hand the back-end a dirty log of `bytes` (SET_LOG_BASE, in
    /// a sealed memfd, as QEMU does); returns the log's file, which the test reads.
    pub fn set_log_base(&mut self, bytes: u64) -> std::fs::File {
        self.protocol |= protocol::LOG_SHMFD;
        self.request_plain(FrontendRequest::SetProtocolFeatures(self.protocol));
        let fd = memfd(bytes);
        let area = wire::vhost_user::LogArea {
            mmap_size: bytes,
            mmap_offset: 0,
        };
        let req = FrontendRequest::SetLogBase {
            area,
            fd: fd.try_clone().unwrap(),
        };
        let h = self.conn.send_request(&req, false).unwrap();
        match self.conn.recv_reply(&h, ReplyKind::Log).unwrap() {
            Reply::Log(a) => assert_eq!(a, area),
            other => panic!("{other:?}"),
        }
        std::fs::File::from(fd)
    }

    /// Switch dirty logging on or off (SET_FEATURES with or without `VHOST_F_LOG_ALL`).
    pub fn set_log_all(&mut self, on: bool) {
        if on {
            self.features |= device::LOG_ALL;
        } else {
            self.features &= !device::LOG_ALL;
        }
        self.request(FrontendRequest::SetFeatures(self.features));
    }

    fn get_u64(&mut self, req: FrontendRequest) -> u64 {
        let h = self.conn.send_request(&req, false).unwrap();
        match self.conn.recv_reply(&h, ReplyKind::U64).unwrap() {
            Reply::U64(v) => v,
            other => panic!("{other:?}"),
        }
    }

    /// A request acknowledged with REPLY_ACK.
    pub fn request(&mut self, req: FrontendRequest) {
        let h = self.conn.send_request(&req, true).unwrap();
        self.conn.recv_ack(&h).unwrap();
    }

    fn request_plain(&mut self, req: FrontendRequest) {
        self.conn.send_request(&req, false).unwrap();
    }

    /// Send an IOTLB message and wait for its acknowledgement.
    pub fn iotlb(&mut self, m: IotlbMsg) -> Result<(), wire::WireError> {
        let h = self
            .conn
            .send_request(&FrontendRequest::IotlbMsg(m), true)?;
        self.conn.recv_ack(&h)
    }

    /// Invalidate `range` in the back-end's IOTLB.
    pub fn invalidate(&mut self, range: IovaRange) {
        self.iotlb(IotlbMsg::Invalidate { range }).unwrap();
    }

    /// A buffer of `len` bytes at a fresh address.
    pub fn buf(&mut self, len: u32, write: bool) -> Buf {
        let iova = self.next_buf;
        let pages = u64::from(len).div_ceil(PAGE).max(1);
        self.space
            .map_new(&mut self.alloc, iova, pages, Perm::ReadWrite);
        self.next_buf += (pages + 1) * PAGE;
        Buf { iova, len, write }
    }

    /// Answer pending misses (one pass over what has arrived). Returns how many.
    pub fn serve_misses(&mut self) -> u64 {
        let mut n = 0;
        loop {
            let msg = match self.channel.recv() {
                Ok(m) => m,
                Err(wire::WireError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return n;
                }
                Err(e) => panic!("back-end channel: {e}"),
            };
            match BackendRequest::decode(&msg.header, &msg.payload, msg.fds).unwrap() {
                BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, .. }) => {
                    self.misses_seen += 1;
                    let page = iova - iova % PAGE;
                    if self.never_map.contains(&page) {
                        self.ignored.push(iova);
                        continue;
                    }
                    if let Some((range, gpa, perm)) = self.space.update_for(iova) {
                        self.iotlb(IotlbMsg::Update {
                            range,
                            uaddr: self.va(gpa),
                            perm,
                        })
                        .unwrap();
                        n += 1;
                    }
                }
                BackendRequest::IotlbMsg(IotlbMsg::AccessFail { iova, perm }) => {
                    self.access_fails.push((iova, perm));
                }
                other => panic!("unexpected back-end request {other:?}"),
            }
        }
    }

    /// Stop queue `q` (GET_VRING_BASE); returns where it resumes.
    pub fn stop_queue(&mut self, q: usize) -> u32 {
        let req = FrontendRequest::GetVringBase(VringState {
            index: q as u32,
            num: 0,
        });
        let h = self.conn.send_request(&req, false).unwrap();
        match self.conn.recv_reply(&h, ReplyKind::VringState).unwrap() {
            Reply::VringState(v) => v.num,
            other => panic!("{other:?}"),
        }
    }

    /// Used entries published on queue `q` since the last look, without waiting.
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        self.queues[q].driver.take_used(&self.mem, &self.space)
    }

    /// Kick queue `q` again (a driver that notifies on every submission does this).
    pub fn kick(&mut self, q: usize) {
        rustix::io::write(&self.queues[q].kick, &1u64.to_ne_bytes()).unwrap();
    }

    /// Whether the back-end signalled queue `q`'s call eventfd since the last look (reads
    /// it, so the next look starts afresh).
    pub fn take_call(&mut self, q: usize) -> bool {
        let mut b = [0u8; 8];
        rustix::io::read(&self.queues[q].call, &mut b).is_ok()
    }

    /// Whether the back-end signalled queue `q`'s vring error eventfd since the last look.
    pub fn take_err(&mut self, q: usize) -> bool {
        let mut b = [0u8; 8];
        rustix::io::read(&self.queues[q].err, &mut b).is_ok()
    }

    /// Serve misses for `d` (at least once), then: whether the back-end has sent anything on
    /// the front-end socket (an acknowledgement) by then.
    pub fn reply_within(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            let mut fds = [PollFd::new(self.conn.socket(), PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000,
            };
            if matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
        }
    }

    /// Send an IOTLB message without waiting for its acknowledgement.
    pub fn iotlb_nowait(&mut self, m: IotlbMsg) -> wire::vhost_user::Header {
        self.conn
            .send_request(&FrontendRequest::IotlbMsg(m), true)
            .unwrap()
    }

    /// A buffer of `len` bytes at a fresh IOVA mapped page by page onto contiguous guest
    /// memory (with the IOMMU; without it, any buffer is contiguous).
    pub fn contiguous_buf(&mut self, len: u32, write: bool) -> Buf {
        if !self.iommu {
            return self.buf(len, write);
        }
        let iova = self.next_buf;
        let pages = u64::from(len).div_ceil(PAGE).max(1);
        assert!(
            self.next_contig + pages * PAGE <= BUF_GPA,
            "contiguous test memory exhausted"
        );
        for i in 0..pages {
            self.space.map_page(
                iova + i * PAGE,
                self.next_contig + i * PAGE,
                Perm::ReadWrite,
            );
        }
        self.next_contig += pages * PAGE;
        self.next_buf += (pages + 1) * PAGE;
        Buf { iova, len, write }
    }

    /// Submit a chain on queue `q` through an indirect table (mapped at a fresh IOVA).
    pub fn submit_indirect(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let table = self.buf(16 * bufs.len() as u32, false);
        let head = self.queues[q]
            .driver
            .add_chain(&self.mem, &self.space, bufs, Some(table.iova))
            .expect("descriptors");
        rustix::io::write(&self.queues[q].kick, &1u64.to_ne_bytes()).unwrap();
        head
    }

    /// Submit a chain on queue `q` and kick.
    pub fn submit(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.queues[q]
            .driver
            .add_chain(&self.mem, &self.space, bufs, None)
            .expect("descriptors");
        rustix::io::write(&self.queues[q].kick, &1u64.to_ne_bytes()).unwrap();
        head
    }

    /// Submit a chain on queue `q` and kick only if the device asks for it, as a Linux
    /// driver does: the queues here use EVENT_IDX, so only when the new avail index passes
    /// the device's `avail_event`. Returns the head and whether it kicked.
    pub fn submit_as_driver(&mut self, q: usize, bufs: &[Buf]) -> (u16, bool) {
        let old = self.queues[q].driver.avail_idx();
        let head = self.queues[q]
            .driver
            .add_chain(&self.mem, &self.space, bufs, None)
            .expect("descriptors");
        let new = self.queues[q].driver.avail_idx();
        // The avail index before avail_event (a driver's `virtqueue_kick_prepare`).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let event = self.avail_event(q);
        let kick = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if kick {
            rustix::io::write(&self.queues[q].kick, &1u64.to_ne_bytes()).unwrap();
        }
        (head, kick)
    }

    /// The device's `avail_event` on queue `q` (where it asks for the next kick).
    pub fn avail_event(&self, q: usize) -> u16 {
        self.queues[q].driver.avail_event(&self.mem, &self.space)
    }

    /// The driver's avail index on queue `q`.
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].driver.avail_idx()
    }

    /// Wait for used entries on queue `q`, answering misses meanwhile.
    pub fn wait_used(&mut self, q: usize, want: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {want} completions (got {})",
                got.len()
            );
            self.serve_misses();
            let mut fds = [PollFd::new(&self.queues[q].call, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.queues[q].call, &mut b);
            got.extend(self.queues[q].driver.take_used(&self.mem, &self.space));
        }
        got
    }
}

/// A request laid out as virtio-blk's: a 16-byte header (`ty`, `sector`), data (`data` to
/// send, or `read_len` bytes to receive), and a status byte (set to 0xff beforehand),
/// returning the buffers.
pub fn request(
    f: &mut Frontend,
    ty: u32,
    sector: u64,
    data: &[u8],
    read_len: u32,
) -> (Buf, Option<Buf>, Buf) {
    let header = f.buf(16, false);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    f.space.write(&f.mem, header.iova, &h);
    let data_buf = if !data.is_empty() {
        let b = f.buf(data.len() as u32, false);
        f.space.write(&f.mem, b.iova, data);
        Some(b)
    } else if read_len > 0 {
        Some(f.buf(read_len, true))
    } else {
        None
    };
    let status = f.buf(1, true);
    f.space.write(&f.mem, status.iova, &[0xff]);
    (header, data_buf, status)
}

/// The status byte of a request.
pub fn status(f: &Frontend, s: &Buf) -> u8 {
    f.space.read(&f.mem, s.iova, 1)[0]
}

/// `len` bytes of a pattern that differs with `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(3))
        .collect()
}

/// Serve one connection of `s` on a thread; returns our end.
pub fn connect<D: crate::Device>(
    s: &std::sync::Arc<crate::Server<D>>,
) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let s = s.clone();
    let t = std::thread::spawn(move || s.serve_connection(b));
    (a, t)
}

/// A device that serves every request by reporting success: it writes 0 into the chain's
/// last device-writable byte (the status byte of the [`request`] layout) and the used length
/// is the chain's writable length; a failed request gets 1. Both are virtio-blk's `OK` and
/// `IOERR`. For testing the engine without a backing store.
#[derive(Debug, Default)]
pub struct NullDevice {
    /// Queues offered (1 when 0).
    pub queues: u16,
}

/// [`NullDevice`]'s handler.
#[derive(Debug)]
pub struct NullQueue;

impl crate::Device for NullDevice {
    type Handler = NullQueue;
    fn features(&self) -> u64 {
        // Indirect descriptors and EVENT_IDX, as the ring code supports them.
        (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    }
    fn protocol_features(&self) -> u64 {
        protocol::CONFIG | protocol::MQ
    }
    fn queues(&self) -> u16 {
        self.queues.max(1)
    }
    fn max_queue_size(&self) -> u16 {
        1024
    }
    fn read_config(&self, _offset: u32, buf: &mut [u8]) {
        buf.fill(0);
    }
    fn write_config(&self, _offset: u32, _data: &[u8]) -> bool {
        false
    }
    fn handler(&self, _index: u16, _wake: crate::QueueWakers) -> NullQueue {
        NullQueue
    }
}

impl crate::QueueHandler for NullQueue {
    fn serve(
        &mut self,
        chain: &virtq::Chain,
        _more: &mut dyn crate::MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Result<crate::Served, crate::Unreported> {
        let writable = u64::from(chain.writable_len());
        let Some(data) = writable.checked_sub(1) else {
            return Err(crate::Unreported);
        };
        let mut w = chain.writer(mem);
        match w.skip(data).and_then(|()| w.write_all(&[0])) {
            Ok(()) => Ok(crate::Served::Done(chain.writable_len())),
            Err(_) => Err(crate::Unreported),
        }
    }
    fn fail(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, crate::Unreported> {
        use vm_memory::Bytes;
        mem.write_obj(1u8, GuestAddress(status))
            .map(|()| 1)
            .map_err(|_| crate::Unreported)
    }
}

/// A back-end serving a [`NullDevice`] of `queues` queues with `engine`.
pub fn null_server(
    queues: u16,
    engine: crate::EngineConfig,
) -> std::sync::Arc<crate::Server<NullDevice>> {
    std::sync::Arc::new(crate::Server::new(NullDevice { queues }, engine))
}

/// CPU ticks (utime + stime, in clock ticks) of each thread of this process named `name`
/// (a worker is `vq<index>`), by thread id.
fn thread_ticks(name: &str) -> std::collections::HashMap<String, u64> {
    let mut ticks = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let p = e.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        // A thread that exited since the directory was read has no stat any more.
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields after ')' start at field 3; utime is field 14, stime field 15.
        let t = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks.insert(p.file_name().unwrap().to_string_lossy().into_owned(), t);
    }
    ticks
}

/// CPU time used by this process's threads named `name` (a worker is `vq<index>`) from
/// [`CpuMeter::start`] on: a spinning thread shows, a sleeping one does not. Threads are
/// told apart by id, so one that exits meanwhile (another test's, running in parallel)
/// takes nothing away; one that starts meanwhile counts whole.
pub struct CpuMeter {
    name: String,
    start: std::collections::HashMap<String, u64>,
}

impl CpuMeter {
    /// Start measuring the threads named `name`.
    pub fn start(name: &str) -> Self {
        CpuMeter {
            name: name.to_owned(),
            start: thread_ticks(name),
        }
    }

    /// Clock ticks they used since the start.
    pub fn ticks(&self) -> u64 {
        thread_ticks(&self.name)
            .iter()
            .map(|(tid, &now)| now.saturating_sub(self.start.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}
