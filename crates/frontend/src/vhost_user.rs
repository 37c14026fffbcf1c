//! A vhost-user front-end (the VMM's side of the socket), with the vIOMMU behind it.
//!
//! [`GuestRam`] is the guest's memory: a memfd mapped here and shared with the back-end by
//! `SET_MEM_TABLE`, its front-end virtual address being the mapping's real address (UPDATEs
//! carry `uaddr` in that space, as QEMU's do). [`VhostUserFrontend::connect`] negotiates the
//! way QEMU does (features, protocol features with `REPLY_ACK` and `BACKEND_REQ`, owner,
//! back-end channel, `ACCESS_PLATFORM` when there is an IOMMU, memory table), then
//! [`VhostUserFrontend::start_queue`] starts rings whose addresses are IOVAs behind the IOMMU
//! or guest-physical addresses (sent as front-end virtual ones) without.
//!
//! The back-end channel is served on a thread of its own, never by a thread that waits for a
//! reply on the main socket: a MISS is answered by [`Viommu::fault`], whose UPDATE goes out on
//! the main socket with `NEED_REPLY`. [`VhostUserIotlb`] is the vIOMMU's view of this
//! back-end: UPDATE and INVALIDATE, each acknowledged before it returns. The channel thread itself, and
//! what it counts, is [`channel`].
//!
//! With [`FrontendConfig::dirty_log`] the front-end also plays a VMM migrating its guest:
//! it negotiates `VHOST_F_LOG_ALL` and `LOG_SHMFD`, hands the back-end a [`DirtyLog`] (a
//! bitmap of guest-physical pages in a sealed memfd, as QEMU's `vhost_log_alloc` makes one)
//! with SET_LOG_BASE, and takes the pages the back-end marked as QEMU's log sync does.
//!
//! This module speaks the protocol and moves no data; the driver lives in [`crate::driver`].

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use crate::dirty_log::{DirtyLog, LOG_PAGE};
use iotlb::{IovaRange, Perm};
use rustix::event::{eventfd, EventfdFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use wire::features::{device, protocol};
use wire::poll::PollMode;
use wire::vhost_user::{
    Config, Connection, FrontendRequest, LogArea, MemoryRegion, RegionFd, Reply, VringAddr,
    VringFile, VringState, VRING_F_LOG,
};
use wire::{IotlbMsg, WireError};

pub mod channel;
use channel::serve_channel;
pub use channel::{ChannelStats, MissLog};

use crate::viommu::{DeviceIotlb, ForwardError, Viommu, ViommuError};

/// Why the front-end failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The protocol failed (the back-end refused a request, closed the socket, ...).
    #[error("vhost-user: {0}")]
    Wire(#[from] WireError),
    /// The back-end lacks a feature we need.
    #[error("the back-end does not offer {what} (offered {offered:#x})")]
    Missing {
        /// The feature.
        what: &'static str,
        /// What it offered.
        offered: u64,
    },
    /// A request we made does not fit the device (queue index, size, ...).
    #[error("{0}")]
    Invalid(String),
    /// The vIOMMU refused.
    #[error("vIOMMU: {0}")]
    Viommu(#[from] ViommuError),
    /// A reply of the wrong kind.
    #[error("unexpected reply to {0}")]
    Reply(&'static str),
    /// Dirty logging was asked for ([`FrontendConfig::dirty_log`]) and the back-end cannot
    /// do it: it lacks `VHOST_F_LOG_ALL` or `VHOST_USER_PROTOCOL_F_LOG_SHMFD`.
    #[error(
        "dirty logging asked for, but the back-end does not offer {what} (offered {offered:#x})"
    )]
    NoDirtyLog {
        /// The feature it lacks.
        what: &'static str,
        /// What it offered (device or protocol features, as `what` is).
        offered: u64,
    },
    /// SET_LOG_BASE was answered with another log area than the one sent.
    #[error("SET_LOG_BASE of {sent:?} answered with {got:?}")]
    LogReply {
        /// The area sent.
        sent: LogArea,
        /// The area the back-end answered.
        got: LogArea,
    },
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> FrontendError {
    move |source| FrontendError::Io { what, source }
}

/// The guest's RAM: a memfd mapped shared, guest-physical 0 at its start.
#[derive(Debug)]
pub struct GuestRam {
    fd: OwnedFd,
    mem: GuestMemoryMmap,
    size: u64,
    va: u64,
}

impl GuestRam {
    /// `size` bytes (a multiple of 4 KiB), zeroed.
    pub fn new(size: u64) -> Result<Self, FrontendError> {
        if size == 0 || size % 4096 != 0 {
            return Err(FrontendError::Invalid(format!(
                "guest RAM of {size:#x} bytes: not a positive multiple of 4 KiB"
            )));
        }
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(
            "vhost-iotlb-guest-ram",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| FrontendError::Io {
            what: "memfd_create",
            source: e.into(),
        })?;
        rustix::fs::ftruncate(&fd, size).map_err(|e| FrontendError::Io {
            what: "ftruncate guest RAM",
            source: e.into(),
        })?;
        // Sealed as QEMU seals its memfds: the back-end refuses memory that could shrink
        // under it.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).map_err(|e| {
            FrontendError::Io {
                what: "seal guest RAM",
                source: e.into(),
            }
        })?;
        let file = std::fs::File::from(fd.try_clone().map_err(io("dup guest RAM fd"))?);
        let len = usize::try_from(size).map_err(|e| FrontendError::Invalid(e.to_string()))?;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| FrontendError::Invalid(format!("mapping guest RAM: {e}")))?;
        // Only the address's value is kept (as the front-end virtual address the back-end
        // translates UPDATEs from); memory is reached through `mem`.
        let va = region.as_ptr() as u64;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| FrontendError::Invalid("guest RAM region".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| FrontendError::Invalid(format!("guest RAM: {e}")))?;
        Ok(GuestRam { fd, mem, size, va })
    }

    /// The memory, for volatile access.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The front-end virtual address of `gpa` (what `SET_VRING_ADDR` without an IOMMU and
    /// UPDATEs carry).
    pub fn va(&self, gpa: u64) -> u64 {
        self.va + gpa
    }

    fn region(&self) -> Result<RegionFd, FrontendError> {
        Ok(RegionFd {
            region: MemoryRegion {
                guest_phys_addr: 0,
                memory_size: self.size,
                userspace_addr: self.va,
                mmap_offset: 0,
            },
            fd: self.fd.try_clone().map_err(io("dup guest RAM fd"))?,
        })
    }
}

/// How the front-end is set up.
#[derive(Debug, Clone, Copy)]
pub struct FrontendConfig {
    /// Queues to be able to start.
    pub queues: u16,
    /// Device feature bits to ack when offered (beyond `VERSION_1`, `PROTOCOL_FEATURES` and,
    /// with an IOMMU, `ACCESS_PLATFORM`).
    pub device_features: u64,
    /// Busy-poll cap of the back-end channel thread (for the next MISS) and of replies
    /// (see [`Connection::set_busy_poll`]). Zero blocks at once.
    pub busy_poll: std::time::Duration,
    /// Whether those windows adapt within the cap or stay at it.
    pub poll: PollMode,
    /// Log the device's writes, as while migrating: negotiate `VHOST_F_LOG_ALL` and
    /// `LOG_SHMFD` (refused with [`FrontendError::NoDirtyLog`] by a back-end that lacks
    /// either), hand the back-end a [`DirtyLog`] of the guest RAM before any queue starts,
    /// and set `VRING_F_LOG` with the used ring's address on every ring. Off, nothing of this
    /// is sent.
    pub dirty_log: bool,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            queues: 1,
            device_features: 0,
            busy_poll: std::time::Duration::ZERO,
            poll: PollMode::Adaptive,
            dirty_log: false,
        }
    }
}

/// A ring to start. Addresses are in the device's space: IOVAs behind the IOMMU,
/// guest-physical addresses without.
#[derive(Debug, Clone, Copy)]
pub struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// A started queue's notifiers: write `kick` to notify the device, read `call` for its
/// interrupts.
#[derive(Debug)]
pub struct Notifiers {
    /// Driver-to-device.
    pub kick: OwnedFd,
    /// Device-to-driver.
    pub call: OwnedFd,
}

/// The vIOMMU's handle on a vhost-user back-end's IOTLB: UPDATE and INVALIDATE on the main
/// socket, each with `NEED_REPLY`, so they return once the back-end applied them (for an
/// INVALIDATE: once no queue can still use the old translation).
#[derive(Debug)]
pub struct VhostUserIotlb {
    conn: Arc<Connection>,
    va_base: u64,
}

impl VhostUserIotlb {
    fn send(&self, msg: IotlbMsg) -> Result<(), ForwardError> {
        self.conn.request(&FrontendRequest::IotlbMsg(msg))?;
        Ok(())
    }

    /// UPDATE requests for `updates` (guest-physical addresses made front-end addresses).
    fn update_requests(
        &self,
        updates: &[(IovaRange, u64, Perm)],
    ) -> Result<Vec<FrontendRequest>, ForwardError> {
        updates
            .iter()
            .map(|&(range, gpa, perm)| {
                let uaddr = self
                    .va_base
                    .checked_add(gpa)
                    .ok_or(ForwardError::NoAddress(gpa))?;
                Ok(FrontendRequest::IotlbMsg(IotlbMsg::Update {
                    range,
                    uaddr,
                    perm,
                }))
            })
            .collect()
    }
}

impl DeviceIotlb for VhostUserIotlb {
    fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), ForwardError> {
        let uaddr = self
            .va_base
            .checked_add(gpa)
            .ok_or(ForwardError::NoAddress(gpa))?;
        self.send(IotlbMsg::Update { range, uaddr, perm })
    }

    fn invalidate(&self, range: IovaRange) -> Result<(), ForwardError> {
        self.send(IotlbMsg::Invalidate { range })
    }

    fn update_all(&self, updates: &[(IovaRange, u64, Perm)]) -> Result<(), ForwardError> {
        Ok(self.conn.request_all(&self.update_requests(updates)?)?)
    }

    /// Posted: the back-end applies them before anything sent later on this connection (the
    /// kick that follows, an INVALIDATE), and a chain it reaches first misses as usual.
    fn push_all(&self, updates: &[(IovaRange, u64, Perm)]) -> Result<(), ForwardError> {
        Ok(self.conn.post_all(&self.update_requests(updates)?)?)
    }

    fn invalidate_all(&self, ranges: &[IovaRange]) -> Result<(), ForwardError> {
        let reqs: Vec<FrontendRequest> = ranges
            .iter()
            .map(|&range| FrontendRequest::IotlbMsg(IotlbMsg::Invalidate { range }))
            .collect();
        Ok(self.conn.request_all(&reqs)?)
    }
}

/// A connected vhost-user front-end.
pub struct VhostUserFrontend {
    conn: Arc<Connection>,
    ram: Arc<GuestRam>,
    viommu: Option<Arc<Viommu>>,
    iotlb: Arc<VhostUserIotlb>,
    features: u64,
    protocol: u64,
    queues: u16,
    channel: Option<(UnixStream, JoinHandle<()>)>,
    channel_stats: Arc<ChannelStats>,
    dirty_log: Option<Arc<DirtyLog>>,
}

impl std::fmt::Debug for VhostUserFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontend")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &format_args!("{:#x}", self.protocol))
            .field("iommu", &self.viommu.is_some())
            .field("dirty_log", &self.dirty_log.as_ref().map(|l| l.bytes()))
            .finish_non_exhaustive()
    }
}

impl VhostUserFrontend {
    /// Connect to the back-end listening at `path`.
    pub fn connect(
        path: &Path,
        ram: Arc<GuestRam>,
        config: FrontendConfig,
        viommu: Option<Arc<Viommu>>,
    ) -> Result<Self, FrontendError> {
        let sock = UnixStream::connect(path).map_err(io("connecting to the back-end"))?;
        Self::with_stream(sock, ram, config, viommu)
    }

    /// Set up over an already connected socket.
    pub fn with_stream(
        sock: UnixStream,
        ram: Arc<GuestRam>,
        config: FrontendConfig,
        viommu: Option<Arc<Viommu>>,
    ) -> Result<Self, FrontendError> {
        let conn = Arc::new(Connection::new(sock));
        conn.set_busy_poll(config.poll, config.busy_poll);
        let offered = u64_reply(conn.request(&FrontendRequest::GetFeatures)?, "GET_FEATURES")?;
        let mut need = device::VERSION_1 | device::PROTOCOL_FEATURES;
        if viommu.is_some() {
            need |= device::ACCESS_PLATFORM;
        }
        for (bit, what) in [
            (device::VERSION_1, "VIRTIO_F_VERSION_1"),
            (device::PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"),
            (device::ACCESS_PLATFORM, "VIRTIO_F_ACCESS_PLATFORM"),
        ] {
            if need & bit != 0 && offered & bit == 0 {
                return Err(FrontendError::Missing { what, offered });
            }
        }
        // Logging is what a migration needs; a back-end that cannot log cannot migrate.
        let log_all = if config.dirty_log { device::LOG_ALL } else { 0 };
        if offered & log_all != log_all {
            return Err(FrontendError::NoDirtyLog {
                what: "VHOST_F_LOG_ALL",
                offered,
            });
        }
        let features = need | log_all | (offered & config.device_features);

        let offered_p = u64_reply(
            conn.request(&FrontendRequest::GetProtocolFeatures)?,
            "GET_PROTOCOL_FEATURES",
        )?;
        let mut need_p = protocol::REPLY_ACK;
        if viommu.is_some() {
            need_p |= protocol::BACKEND_REQ;
        }
        if config.queues > 1 {
            need_p |= protocol::MQ;
        }
        for (bit, what) in [
            (protocol::REPLY_ACK, "VHOST_USER_PROTOCOL_F_REPLY_ACK"),
            (protocol::BACKEND_REQ, "VHOST_USER_PROTOCOL_F_BACKEND_REQ"),
            (protocol::MQ, "VHOST_USER_PROTOCOL_F_MQ"),
        ] {
            if need_p & bit != 0 && offered_p & bit == 0 {
                return Err(FrontendError::Missing {
                    what,
                    offered: offered_p,
                });
            }
        }
        let log_shmfd = if config.dirty_log {
            protocol::LOG_SHMFD
        } else {
            0
        };
        if offered_p & log_shmfd != log_shmfd {
            return Err(FrontendError::NoDirtyLog {
                what: "VHOST_USER_PROTOCOL_F_LOG_SHMFD",
                offered: offered_p,
            });
        }
        let protocol_features = need_p | log_shmfd | (offered_p & protocol::CONFIG);
        // REPLY_ACK is not in force until this is applied: no NEED_REPLY on it.
        conn.send_request(
            &FrontendRequest::SetProtocolFeatures(protocol_features),
            false,
        )?;
        if protocol_features & protocol::MQ != 0 {
            let n = u64_reply(
                conn.request(&FrontendRequest::GetQueueNum)?,
                "GET_QUEUE_NUM",
            )?;
            if u64::from(config.queues) > n {
                return Err(FrontendError::Invalid(format!(
                    "{} queues asked, the back-end has {n}",
                    config.queues
                )));
            }
        }
        conn.request(&FrontendRequest::SetOwner)?;

        let iotlb = Arc::new(VhostUserIotlb {
            conn: conn.clone(),
            va_base: ram.va(0),
        });
        let channel_stats = Arc::new(ChannelStats::default());
        let mut channel = None;
        if let Some(v) = &viommu {
            let (ours, theirs) = UnixStream::pair().map_err(io("socketpair"))?;
            conn.request(&FrontendRequest::SetBackendReqFd(OwnedFd::from(theirs)))?;
            let shutdown = ours.try_clone().map_err(io("dup back-end channel"))?;
            let chan = Connection::backend_channel(ours);
            chan.set_busy_poll(config.poll, config.busy_poll);
            let (v, dev, stats) = (v.clone(), iotlb.clone(), channel_stats.clone());
            let thread = std::thread::Builder::new()
                .name("vu-backend-chan".into())
                .spawn(move || serve_channel(&chan, &v, &*dev, &stats))
                .map_err(io("spawning the back-end channel thread"))?;
            channel = Some((shutdown, thread));
        }
        conn.request(&FrontendRequest::SetFeatures(features))?;
        conn.request(&FrontendRequest::SetMemTable(vec![ram.region()?]))?;
        // As QEMU's `vhost_dev_start` with logging on: features with LOG_ALL, the memory
        // table, then the log, whose reply says the back-end mapped it. No queue runs yet, so
        // no write goes unlogged.
        let dirty_log = if config.dirty_log {
            let log = Arc::new(DirtyLog::new(ram.size())?);
            let sent = log.area();
            let req = FrontendRequest::SetLogBase {
                area: sent,
                fd: log.fd()?,
            };
            match conn.request(&req)? {
                Some(Reply::Log(got)) if got == sent => {}
                Some(Reply::Log(got)) => return Err(FrontendError::LogReply { sent, got }),
                _ => return Err(FrontendError::Reply("SET_LOG_BASE")),
            }
            tracing::debug!(
                bytes = sent.mmap_size,
                "vhost-user front-end: dirty log mapped"
            );
            Some(log)
        } else {
            None
        };

        let fe = VhostUserFrontend {
            conn,
            ram,
            viommu,
            iotlb,
            features,
            protocol: protocol_features,
            queues: config.queues,
            channel,
            channel_stats,
            dirty_log,
        };
        if let Some(v) = &fe.viommu {
            v.attach(fe.iotlb.clone());
        }
        tracing::debug!(?fe, "vhost-user front-end: connected");
        Ok(fe)
    }

    /// The back-end's device IOTLB as the vIOMMU sees it (UPDATE and INVALIDATE over this
    /// connection), e.g. to answer a fault by hand.
    pub fn device_iotlb(&self) -> Arc<dyn DeviceIotlb> {
        self.iotlb.clone()
    }

    /// The guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The vIOMMU, if the device is behind one.
    pub fn viommu(&self) -> Option<&Arc<Viommu>> {
        self.viommu.as_ref()
    }

    /// Device features acked.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// What the back-end channel thread saw so far.
    pub fn channel_stats(&self) -> &ChannelStats {
        &self.channel_stats
    }

    /// The dirty log the back-end writes, with [`FrontendConfig::dirty_log`]. It stays
    /// readable after the connection ends (a last take once the queues stopped).
    pub fn dirty_log(&self) -> Option<&Arc<DirtyLog>> {
        self.dirty_log.as_ref()
    }

    /// Read `len` bytes of the device's config space from `offset` (needs the `CONFIG`
    /// protocol feature).
    pub fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, FrontendError> {
        if self.protocol & protocol::CONFIG == 0 {
            return Err(FrontendError::Missing {
                what: "VHOST_USER_PROTOCOL_F_CONFIG",
                offered: self.protocol,
            });
        }
        let req = FrontendRequest::GetConfig(Config {
            offset,
            flags: 0,
            data: vec![0; len as usize],
        });
        match self.conn.request(&req)? {
            Some(Reply::Config(c)) => Ok(c.data),
            _ => Err(FrontendError::Reply("GET_CONFIG")),
        }
    }

    /// Start a ring (size, base 0, addresses, kick, call, enable).
    pub fn start_queue(&self, ring: RingSetup) -> Result<Notifiers, FrontendError> {
        if ring.index >= self.queues {
            return Err(FrontendError::Invalid(format!(
                "queue {} of {}",
                ring.index, self.queues
            )));
        }
        let index = u32::from(ring.index);
        let to_device = |a: u64| {
            if self.viommu.is_some() {
                a
            } else {
                self.ram.va(a)
            }
        };
        self.conn
            .request(&FrontendRequest::SetVringNum(VringState {
                index,
                num: u32::from(ring.size),
            }))?;
        self.conn
            .request(&FrontendRequest::SetVringBase(VringState { index, num: 0 }))?;
        self.conn
            .request(&FrontendRequest::SetVringAddr(VringAddr {
                index,
                // With logging on, QEMU also asks for used-ring writes to be logged and names
                // the ring by the guest's address of it (`used_phys`: an IOVA behind the
                // IOMMU). Our back-end logs every used-ring write by guest-physical page
                // whatever these say.
                flags: if self.dirty_log.is_some() {
                    VRING_F_LOG
                } else {
                    0
                },
                descriptor: to_device(ring.desc),
                used: to_device(ring.used),
                available: to_device(ring.avail),
                log: if self.dirty_log.is_some() {
                    ring.used
                } else {
                    0
                },
            }))?;
        let new_eventfd = || {
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| {
                FrontendError::Io {
                    what: "eventfd",
                    source: e.into(),
                }
            })
        };
        let kick = new_eventfd()?;
        let call = new_eventfd()?;
        let idx8 = u8::try_from(ring.index)
            .map_err(|_| FrontendError::Invalid(format!("queue index {}", ring.index)))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(io("dup eventfd"));
        self.conn
            .request(&FrontendRequest::SetVringCall(VringFile {
                index: idx8,
                fd: Some(dup(&call)?),
            }))?;
        self.conn
            .request(&FrontendRequest::SetVringKick(VringFile {
                index: idx8,
                fd: Some(dup(&kick)?),
            }))?;
        self.conn
            .request(&FrontendRequest::SetVringEnable(VringState {
                index,
                num: 1,
            }))?;
        Ok(Notifiers { kick, call })
    }

    /// Stop a ring; returns where the back-end would resume (GET_VRING_BASE).
    pub fn stop_queue(&self, index: u16) -> Result<u16, FrontendError> {
        let reply = self
            .conn
            .request(&FrontendRequest::GetVringBase(VringState {
                index: u32::from(index),
                num: 0,
            }))?;
        match reply {
            Some(Reply::VringState(s)) => u16::try_from(s.num)
                .map_err(|_| FrontendError::Invalid(format!("vring base {}", s.num))),
            _ => Err(FrontendError::Reply("GET_VRING_BASE")),
        }
    }
}

impl Drop for VhostUserFrontend {
    fn drop(&mut self) {
        if let Some(v) = &self.viommu {
            v.detach_all();
        }
        // Closing the channel ends its thread; closing the main socket ends the session.
        if let Some((sock, thread)) = self.channel.take() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        let _ = self.conn.socket().shutdown(std::net::Shutdown::Both);
    }
}

fn u64_reply(r: Option<Reply>, what: &'static str) -> Result<u64, FrontendError> {
    match r {
        Some(Reply::U64(v)) => Ok(v),
        _ => Err(FrontendError::Reply(what)),
    }
}

impl Notifiers {
    /// Notify the device.
    pub fn kick(&self) {
        // An eventfd counter; overflow still leaves it readable, which is all that matters.
        let _ = rustix::io::write(&self.kick, &1u64.to_ne_bytes());
    }

    /// Consume pending interrupts; true if there was one.
    pub fn take_call(&self) -> bool {
        let mut b = [0u8; 8];
        matches!(rustix::io::read(self.call.as_fd(), &mut b), Ok(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::vhost_user::DecodeLimits;

    /// A scripted back-end on the other end of `sock`: it offers `features` and
    /// `protocol`, answers what has an answer, acknowledges the rest, and returns every
    /// request it got once the front-end hangs up.
    fn scripted_backend(
        sock: UnixStream,
        features: u64,
        protocol: u64,
    ) -> JoinHandle<Vec<FrontendRequest>> {
        std::thread::spawn(move || {
            let conn = Connection::new(sock);
            let mut got = Vec::new();
            while let Ok(raw) = conn.recv() {
                let h = raw.header;
                let req =
                    FrontendRequest::decode(&h, &raw.payload, raw.fds, &DecodeLimits::default())
                        .unwrap();
                let reply = match &req {
                    FrontendRequest::GetFeatures => Some(Reply::U64(features)),
                    FrontendRequest::GetProtocolFeatures => Some(Reply::U64(protocol)),
                    FrontendRequest::SetLogBase { area, .. } => Some(Reply::Log(*area)),
                    _ => None,
                };
                match reply {
                    Some(r) => conn.send_reply(&h, &r).unwrap(),
                    None => conn.ack(&h, true).unwrap(),
                }
                got.push(req);
            }
            got
        })
    }

    const LOGGING: u64 = device::VERSION_1 | device::PROTOCOL_FEATURES | device::LOG_ALL;
    const LOGGING_P: u64 = protocol::REPLY_ACK | protocol::LOG_SHMFD;

    /// Connect to the scripted back-end, start queue 0, hang up; what it got.
    fn session(dirty_log: bool) -> (Result<u64, FrontendError>, Vec<FrontendRequest>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = scripted_backend(theirs, LOGGING, LOGGING_P);
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let config = FrontendConfig {
            dirty_log,
            ..FrontendConfig::default()
        };
        let result = VhostUserFrontend::with_stream(ours, ram, config, None).and_then(|fe| {
            assert_eq!(fe.dirty_log().is_some(), dirty_log);
            fe.start_queue(RingSetup {
                index: 0,
                size: 8,
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
            })?;
            Ok(fe.features())
        });
        (result, backend.join().unwrap())
    }

    #[test]
    fn without_dirty_log_nothing_of_it_is_sent() {
        let (features, got) = session(false);
        assert_eq!(features.unwrap() & device::LOG_ALL, 0);
        for req in &got {
            match req {
                FrontendRequest::SetFeatures(f) => assert_eq!(f & device::LOG_ALL, 0),
                FrontendRequest::SetProtocolFeatures(p) => assert_eq!(p & protocol::LOG_SHMFD, 0),
                FrontendRequest::SetLogBase { .. } | FrontendRequest::SetLogFd(_) => {
                    panic!("{req:?}")
                }
                FrontendRequest::SetVringAddr(a) => assert_eq!((a.flags, a.log), (0, 0)),
                _ => {}
            }
        }
    }

    #[test]
    fn with_dirty_log_the_log_is_mapped_before_any_queue_starts() {
        let (features, got) = session(true);
        assert_ne!(features.unwrap() & device::LOG_ALL, 0);
        let at = |want: fn(&FrontendRequest) -> bool| got.iter().position(want).unwrap();
        let log = at(|r| matches!(r, FrontendRequest::SetLogBase { .. }));
        let table = at(|r| matches!(r, FrontendRequest::SetMemTable(_)));
        let features =
            at(|r| matches!(r, FrontendRequest::SetFeatures(f) if f & device::LOG_ALL != 0));
        let kick = at(|r| matches!(r, FrontendRequest::SetVringKick(_)));
        assert!(features < table && table < log && log < kick, "{got:?}");
        assert!(got.iter().any(
            |r| matches!(r, FrontendRequest::SetProtocolFeatures(p) if p & protocol::LOG_SHMFD != 0)
        ));
        let FrontendRequest::SetLogBase { area, fd } = &got[log] else {
            unreachable!()
        };
        // 1 MiB of RAM: 256 pages, 32 bytes of log, the whole sealed memfd.
        assert_eq!(
            *area,
            LogArea {
                mmap_size: 32,
                mmap_offset: 0
            }
        );
        assert_eq!(rustix::fs::fstat(fd).unwrap().st_size, 32);
        let addr = got
            .iter()
            .find_map(|r| match r {
                FrontendRequest::SetVringAddr(a) => Some(*a),
                _ => None,
            })
            .unwrap();
        assert_eq!((addr.flags, addr.log), (VRING_F_LOG, 0x3000));
    }

    #[test]
    fn dirty_log_is_refused_by_a_backend_that_cannot_log() {
        for (features, protocol, what) in [
            (LOGGING & !device::LOG_ALL, LOGGING_P, "VHOST_F_LOG_ALL"),
            (
                LOGGING,
                LOGGING_P & !protocol::LOG_SHMFD,
                "VHOST_USER_PROTOCOL_F_LOG_SHMFD",
            ),
        ] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let backend = scripted_backend(theirs, features, protocol);
            let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
            let config = FrontendConfig {
                dirty_log: true,
                ..FrontendConfig::default()
            };
            let err = VhostUserFrontend::with_stream(ours, ram, config, None).unwrap_err();
            assert!(
                matches!(err, FrontendError::NoDirtyLog { what: w, .. } if w == what),
                "{err}"
            );
            assert!(err.to_string().contains(what), "{err}");
            // Refused before anything was set: only the two GETs went out.
            let got = backend.join().unwrap();
            assert!(
                got.iter().all(|r| matches!(
                    r,
                    FrontendRequest::GetFeatures | FrontendRequest::GetProtocolFeatures
                )),
                "{got:?}"
            );
            // The same back-end without logging asked for is fine.
            let (ours, theirs) = UnixStream::pair().unwrap();
            let backend = scripted_backend(theirs, features, protocol);
            let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
            VhostUserFrontend::with_stream(ours, ram, FrontendConfig::default(), None).unwrap();
            backend.join().unwrap();
        }
    }
}
