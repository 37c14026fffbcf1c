//! A small vhost-user front-end for tests: it plays QEMU and the guest's virtio-blk driver
//! over real sockets, with its guest memory in a memfd shared with the back-end, rings and
//! buffers at IOVAs on scattered pages, and an IOMMU side that answers MISS messages from its
//! page table (or deliberately not).

#![allow(dead_code)]

pub mod gated;
pub mod liveness;

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
pub const RING_IOVA: u64 = 0x10_0000_0000;
pub const BUF_IOVA: u64 = 0x20_0000_0000;
/// Where buffers live without the IOMMU (guest-physical).
pub const BUF_GPA: u64 = 48 << 20;
/// Guest-physical pages below this are handed out scattered (IOMMU buffers and rings);
/// from here to [`BUF_GPA`] contiguous runs are ([`Frontend::contiguous_buf`]).
pub const CONTIG_GPA: u64 = 32 << 20;

pub struct Queue {
    pub driver: DriverQueue,
    pub kick: OwnedFd,
    pub call: OwnedFd,
    /// The vring error eventfd given with SET_VRING_ERR.
    pub err: OwnedFd,
}

pub struct Frontend {
    pub conn: Connection,
    /// Our end of the back-end channel: MISS and ACCESS_FAIL arrive here.
    pub channel: Connection,
    pub mem: GuestMemoryMmap,
    pub space: IovaSpace,
    pub alloc: PageAllocator,
    pub queues: Vec<Queue>,
    pub iommu: bool,
    next_buf: u64,
    /// The next free guest-physical page of the contiguous area.
    next_contig: u64,
    /// IOVAs (pages) whose misses we do not answer.
    pub never_map: Vec<u64>,
    /// Misses we received and did not answer.
    pub ignored: Vec<u64>,
    pub misses_seen: u64,
    /// ACCESS_FAIL messages received: `(iova, perm)`.
    pub access_fails: Vec<(u64, Perm)>,
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
        };
        let feats = f.get_u64(FrontendRequest::GetFeatures);
        let mut want = device::VERSION_1 | device::PROTOCOL_FEATURES | device::RING_EVENT_IDX;
        if iommu {
            want |= device::ACCESS_PLATFORM;
        }
        assert_eq!(feats & want, want, "the back-end offers {feats:#x}");
        f.request(FrontendRequest::SetFeatures(want | (feats & device_mask)));
        let proto = f.get_u64(FrontendRequest::GetProtocolFeatures);
        let want_p = protocol::REPLY_ACK | protocol::BACKEND_REQ | protocol::CONFIG | protocol::MQ;
        assert_eq!(proto & want_p, want_p);
        f.request_plain(FrontendRequest::SetProtocolFeatures(want_p));
        f.request(FrontendRequest::SetOwner);
        f.request(FrontendRequest::SetBackendReqFd(OwnedFd::from(theirs)));
        f.request(FrontendRequest::SetMemTable(vec![RegionFd {
            region: MemoryRegion {
                guest_phys_addr: 0,
                memory_size: MEM,
                userspace_addr: VA_BASE,
                mmap_offset: 0,
            },
            fd: ram,
        }]));
        for q in 0..queues {
            let base = if iommu {
                RING_IOVA + u64::from(q) * 0x10_0000
            } else {
                (4 << 20) + u64::from(q) * 0x2_0000
            };
            let driver = DriverQueue::new(&f.mem, &mut f.space, &mut f.alloc, base, size);
            let (d, a, u) = driver.addresses();
            // Without the IOMMU, ring addresses are front-end virtual addresses.
            let va = |x: u64| if iommu { x } else { VA_BASE + x };
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
                            uaddr: VA_BASE + gpa,
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

/// A virtio-blk request: header + data + status, returning the buffers.
pub fn blk_request(
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

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(3))
        .collect()
}

/// A disk of `len` bytes in memory.
pub fn disk(len: u64) -> std::fs::File {
    let fd = rustix::fs::memfd_create("disk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    std::fs::File::from(fd)
}

/// A block back-end on a fresh in-memory disk of `disk_len` bytes.
pub fn blk_server(
    disk_len: u64,
    blk: devices::BlkConfig,
    engine: backend::EngineConfig,
) -> std::sync::Arc<backend::Server<devices::Blk>> {
    // `RUST_LOG=backend=trace` shows the back-end's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dev = devices::Blk::new(disk(disk_len), blk).unwrap();
    std::sync::Arc::new(backend::Server::new(dev, engine))
}

/// A block back-end on a fresh in-memory disk of `disk_len` bytes with `queues` queues of 64
/// entries and `engine`.
pub fn blk_queues(
    disk_len: u64,
    queues: u16,
    engine: backend::EngineConfig,
) -> std::sync::Arc<backend::Server<devices::Blk>> {
    let blk = devices::BlkConfig {
        queues,
        queue_size: 64,
        ..devices::BlkConfig::default()
    };
    blk_server(disk_len, blk, engine)
}

/// Serve one connection of `s` on a thread; returns our end.
pub fn connect<D: backend::Device>(
    s: &std::sync::Arc<backend::Server<D>>,
) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let s = s.clone();
    let t = std::thread::spawn(move || s.serve_connection(b));
    (a, t)
}
