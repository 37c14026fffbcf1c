//! The front-end side, as QEMU plays it: the vhost-user connection and the back-end channel,
//! requests and their replies, the handshake of each connection, queue 0's setup, stop and
//! restart (on the driver's rings), and the disconnect.
//!
//! Every request that is answered goes through `ack`, `reply` or `raw_iotlb`, which report an
//! answer not given within [`REPLY_TIMEOUT`] as a liveness failure, and the disconnect waits for
//! the server thread no longer than that. What it must not do: wait on the back-end in any
//! other way (an unbounded wait hangs the fuzzer instead of reporting); treat a refusal as a
//! failure where the protocol allows one (`ack` and `reply` hand it to the caller;
//! `expect_ack` is for requests that must be accepted); check the data path beyond what
//! GET_VRING_BASE answers (`checks.rs` does).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use virtq::testing::{DriverQueue, IovaSpace, PageAllocator, PAGE};
use wire::features::{device as dev_f, protocol};
use wire::vhost_user::{
    Connection, FrontendRequest, Header, Reply, ReplyKind, VringAddr, VringFile, VringState,
};
use wire::{IotlbMsg, VhostIotlbMsg, WireError};

use super::{
    Failure, Harness, Queue0, CORE_SLOTS, QSIZE, REPLY_TIMEOUT, RESERVED_PAGES, RING_GENERATIONS,
    RING_IOVA, RING_PAGES, VA_BASE,
};

pub(super) fn new_eventfd() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).expect("eventfd")
}

pub(super) fn is_timeout(e: &WireError) -> bool {
    matches!(e, WireError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}

impl Harness {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("connected")
    }

    pub(super) fn connect(&mut self) -> Result<(), Failure> {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let server = self.server.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name("session-fuzz-server".into())
                .spawn(move || server.serve_connection(theirs))
                .expect("spawn"),
        );
        ours.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        self.conn = Some(Connection::new(ours));
        self.summary.connections += 1;

        let offered = self.get_u64("GET_FEATURES", FrontendRequest::GetFeatures)?;
        let want = dev_f::ACCESS_PLATFORM | dev_f::RING_EVENT_IDX | dev_f::PROTOCOL_FEATURES;
        if offered & want != want {
            return Err(format!("the back-end offers {offered:#x}"));
        }
        self.features = (offered & 0xff_ffff)
            | dev_f::VERSION_1
            | dev_f::PROTOCOL_FEATURES
            | (offered & dev_f::RING_INDIRECT_DESC);
        let f = self.wanted_features(self.iommu, self.event_idx);
        self.expect_ack("SET_FEATURES", FrontendRequest::SetFeatures(f))?;
        let proto = self.get_u64(
            "GET_PROTOCOL_FEATURES",
            FrontendRequest::GetProtocolFeatures,
        )?;
        let want_p = protocol::REPLY_ACK
            | protocol::BACKEND_REQ
            | protocol::CONFIG
            | protocol::MQ
            | protocol::CONFIGURE_MEM_SLOTS;
        if proto & want_p != want_p {
            return Err(format!("the back-end offers protocol features {proto:#x}"));
        }
        self.conn()
            .send_request(&FrontendRequest::SetProtocolFeatures(want_p), false)
            .map_err(|e| format!("SET_PROTOCOL_FEATURES: {e}"))?;
        self.expect_ack("SET_OWNER", FrontendRequest::SetOwner)?;
        let (chan_ours, chan_theirs) = UnixStream::pair().expect("socketpair");
        let channel = Connection::backend_channel(chan_ours);
        // `backend_channel` makes it blocking; misses are read without waiting.
        channel.socket().set_nonblocking(true).expect("nonblocking");
        self.channel = Some(channel);
        self.expect_ack(
            "SET_BACKEND_REQ_FD",
            FrontendRequest::SetBackendReqFd(OwnedFd::from(chan_theirs)),
        )?;
        let regions = (0..CORE_SLOTS).map(|s| self.region_fd(s)).collect();
        self.expect_ack("SET_MEM_TABLE", FrontendRequest::SetMemTable(regions))?;
        self.present = (0..CORE_SLOTS).collect();
        self.snapshots.clear();
        self.new_queue()
    }

    pub(super) fn wanted_features(&self, iommu: bool, event_idx: bool) -> u64 {
        let mut f = self.features & !(dev_f::ACCESS_PLATFORM | dev_f::RING_EVENT_IDX);
        if iommu {
            f |= dev_f::ACCESS_PLATFORM;
        }
        if event_idx {
            f |= dev_f::RING_EVENT_IDX;
        }
        f
    }

    /// Send `req` with NEED_REPLY; `Ok(true)` if acked with 0, `Ok(false)` if refused.
    pub(super) fn ack(&mut self, what: &str, req: FrontendRequest) -> Result<bool, Failure> {
        let sent = Instant::now();
        let h = self
            .conn()
            .send_request(&req, true)
            .map_err(|e| format!("{what}: send failed: {e} (back-end gone?)"))?;
        match self.conn().recv_ack(&h) {
            Ok(()) => Ok(true),
            Err(WireError::PeerFailed { .. } | WireError::PeerRefused { .. }) => Ok(false),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} (NEED_REPLY) not answered within {:?}",
                sent.elapsed()
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    pub(super) fn expect_ack(&mut self, what: &str, req: FrontendRequest) -> Result<(), Failure> {
        if self.ack(what, req)? {
            Ok(())
        } else {
            Err(format!("{what} refused"))
        }
    }

    pub(super) fn reply(
        &mut self,
        what: &str,
        req: FrontendRequest,
        kind: ReplyKind,
    ) -> Result<Option<Reply>, Failure> {
        let h = self
            .conn()
            .send_request(&req, false)
            .map_err(|e| format!("{what}: send failed: {e}"))?;
        match self.conn().recv_reply(&h, kind) {
            Ok(r) => Ok(Some(r)),
            Err(WireError::PeerRefused { .. }) => Ok(None),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} not answered within {REPLY_TIMEOUT:?}"
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    fn get_u64(&mut self, what: &str, req: FrontendRequest) -> Result<u64, Failure> {
        match self.reply(what, req, ReplyKind::U64)? {
            Some(Reply::U64(v)) => Ok(v),
            other => Err(format!("{what}: {other:?}")),
        }
    }

    fn get_vring_base(&mut self, index: u32) -> Result<Option<u32>, Failure> {
        let r = self.reply(
            "GET_VRING_BASE",
            FrontendRequest::GetVringBase(VringState { index, num: 0 }),
            ReplyKind::VringState,
        )?;
        Ok(match r {
            Some(Reply::VringState(v)) => Some(v.num),
            _ => None,
        })
    }

    /// A raw IOTLB message (any iova/size/perm, even invalid ones) with NEED_REPLY.
    pub(super) fn raw_iotlb(&mut self, what: &str, m: VhostIotlbMsg) -> Result<bool, Failure> {
        use zerocopy_free::as_bytes;
        let payload = as_bytes(&m);
        let header = Header::new(22, payload.len() as u32, true);
        self.conn()
            .send(&header, &payload, &[])
            .map_err(|e| format!("{what}: send failed: {e}"))?;
        match self.conn().recv_ack(&header) {
            Ok(()) => Ok(true),
            Err(WireError::PeerFailed { .. } | WireError::PeerRefused { .. }) => Ok(false),
            Err(e) if is_timeout(&e) => Err(format!(
                "liveness: {what} (NEED_REPLY) not answered within {REPLY_TIMEOUT:?}"
            )),
            Err(e) => Err(format!("{what}: bad reply: {e}")),
        }
    }

    pub(super) fn iotlb(&mut self, what: &str, m: IotlbMsg) -> Result<bool, Failure> {
        self.ack(what, FrontendRequest::IotlbMsg(m))
    }

    /// Build queue 0 on fresh ring pages in the current mode and start it.
    pub(super) fn new_queue(&mut self) -> Result<(), Failure> {
        if self.next_generation >= RING_GENERATIONS {
            self.queue = None;
            return Ok(());
        }
        let g = self.next_generation;
        self.next_generation += 1;
        let gpa = (RESERVED_PAGES + g * RING_PAGES) * PAGE;
        let (space, base) = if self.iommu {
            (IovaSpace::new(), RING_IOVA + g * 0x10_0000)
        } else {
            (IovaSpace::identity(), gpa)
        };
        self.space = space;
        self.extents.clear();
        let mut alloc = PageAllocator::new(0, 0, 0);
        for p in (0..RING_PAGES).rev() {
            alloc.free(gpa + p * PAGE);
        }
        let driver = DriverQueue::new(&self.mem, &mut self.space, &mut alloc, base, QSIZE);
        let addrs = driver.addresses();
        self.queue = Some(Queue0 {
            driver,
            kick: new_eventfd(),
            call: new_eventfd(),
            err: new_eventfd(),
            generation: g,
            addrs,
            running: false,
            enabled: false,
            broken: false,
            used: 0,
            avail: 0,
        });
        self.start_queue(0)
    }

    /// Set up and start queue 0 from `base`.
    pub(super) fn start_queue(&mut self, base: u16) -> Result<(), Failure> {
        let Some(q) = self.queue.as_ref() else {
            return Ok(());
        };
        let (d, a, u) = q.addrs;
        let va = |x: u64| if self.iommu { x } else { VA_BASE + x };
        let (d, a, u) = (va(d), va(a), va(u));
        let err = q.err.try_clone().expect("dup");
        let call = q.call.try_clone().expect("dup");
        let kick = q.kick.try_clone().expect("dup");
        self.expect_ack(
            "SET_VRING_NUM",
            FrontendRequest::SetVringNum(VringState {
                index: 0,
                num: u32::from(QSIZE),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_BASE",
            FrontendRequest::SetVringBase(VringState {
                index: 0,
                num: u32::from(base),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_ADDR",
            FrontendRequest::SetVringAddr(VringAddr {
                index: 0,
                flags: 0,
                descriptor: d,
                used: u,
                available: a,
                log: 0,
            }),
        )?;
        self.expect_ack(
            "SET_VRING_ERR",
            FrontendRequest::SetVringErr(VringFile {
                index: 0,
                fd: Some(err),
            }),
        )?;
        self.expect_ack(
            "SET_VRING_CALL",
            FrontendRequest::SetVringCall(VringFile {
                index: 0,
                fd: Some(call),
            }),
        )?;
        let started = self.ack(
            "SET_VRING_KICK",
            FrontendRequest::SetVringKick(VringFile {
                index: 0,
                fd: Some(kick),
            }),
        )?;
        // Without the IOMMU the ring addresses are resolved at start: refused only if their
        // memory is out of the table.
        if !started && (self.iommu || self.core_present()) {
            return Err("SET_VRING_KICK of a valid ring refused".into());
        }
        self.expect_ack(
            "SET_VRING_ENABLE",
            FrontendRequest::SetVringEnable(VringState { index: 0, num: 1 }),
        )?;
        let q = self.queue.as_mut().expect("queue");
        q.running = started;
        q.enabled = true;
        q.broken = false;
        // Whatever was published and not handed to the device yet is there for it.
        let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
        Ok(())
    }

    /// GET_VRING_BASE on queue 0; checks that every request not completed is handed back.
    pub(super) fn stop_queue(&mut self, strict: bool) -> Result<Option<u16>, Failure> {
        if self.queue.is_none() {
            return Ok(None);
        }
        let base = self.get_vring_base(0)?;
        // Completions published before the stop are checked as usual.
        self.collect()?;
        let q = self.queue.as_mut().expect("queue");
        q.running = false;
        q.enabled = false;
        let Some(base) = base else {
            return Err("GET_VRING_BASE of queue 0 refused".into());
        };
        let base = u16::try_from(base).map_err(|_| format!("GET_VRING_BASE answered {base}"))?;
        if strict && base != q.used {
            let lost = base.wrapping_sub(q.used);
            return Err(format!(
                "GET_VRING_BASE answered {base} but the driver saw {} completions of {} \
                 published: {} request(s) consumed and neither completed nor handed back",
                q.used, q.avail, lost
            ));
        }
        Ok(Some(base))
    }

    /// Stop queue 0 and restart it where it stopped.
    pub(super) fn restart_queue(&mut self) -> Result<(), Failure> {
        if let Some(base) = self.stop_queue(true)? {
            self.start_queue(base)?;
        }
        Ok(())
    }

    /// Close the connection and wait for the server thread to end.
    pub(super) fn disconnect(&mut self) -> Result<(), Failure> {
        self.conn = None;
        self.channel = None;
        self.hostile_fds.clear();
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let end = Instant::now() + REPLY_TIMEOUT;
        while !t.is_finished() {
            if Instant::now() > end {
                return Err(format!(
                    "liveness: serve_connection did not return within {REPLY_TIMEOUT:?} of \
                     a disconnect"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join()
            .map_err(|_| "the server thread panicked".to_string())
    }
}

/// `VhostIotlbMsg` to bytes without depending on zerocopy here (the fuzz crate does not).
mod zerocopy_free {
    use wire::VhostIotlbMsg;

    pub fn as_bytes(m: &VhostIotlbMsg) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&m.iova.to_ne_bytes());
        v.extend_from_slice(&m.size.to_ne_bytes());
        v.extend_from_slice(&m.uaddr.to_ne_bytes());
        v.push(m.perm);
        v.push(m.ty);
        v.extend_from_slice(&m.padding);
        v
    }
}
