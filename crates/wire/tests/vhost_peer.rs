//! Interoperability with an independent implementation: rust-vmm's `vhost` crate (0.18, feature
//! `vhost-user-frontend`) drives a listener that is built only on this crate's codec
//! (`Connection`, `FrontendRequest::decode`, `reply_kind`, `Reply`), over real Unix sockets.
//!
//! What it proves:
//! - every message of a full handshake as the `vhost` crate writes it (features with
//!   ACCESS_PLATFORM, protocol features with REPLY_ACK and BACKEND_REQ, SET_OWNER,
//!   GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD, SET_MEM_TABLE with a memfd,
//!   ADD/REM_MEM_REG, the vring setup of queue 0, GET_CONFIG and GET_VRING_BASE) decodes to
//!   exactly the values the front-end passed, with the descriptors intact: the region fd is
//!   the front-end's memfd (same inode, memory shared both ways), the kick and call fds are
//!   its eventfds;
//! - our replies (`send_reply`) and REPLY_ACK statuses (`ack`) are read by the `vhost` crate
//!   as it expects, with NEED_REPLY on every request, GET_* ones included (answered once);
//! - a CONFIG_CHANGE sent with our `send_backend_request` on the back-end channel is
//!   handled and acked by the `vhost` crate's `FrontendReqHandler`, and `recv_ack` reads it;
//! - requests the codec refuses (a legacy SET_LOG_BASE, SET_INFLIGHT_FD, CHECK_DEVICE_STATE)
//!   get the answer the peer waits for, or none when it waits for none, and the connection
//!   stays in step;
//! - a limit of the `vhost` crate: a GET_CONFIG the codec refuses (a window over 256 bytes,
//!   which the `vhost` crate allows) is answered by `Connection::reject` with the empty
//!   failure reply QEMU understands; the `vhost` crate cannot read any reply shorter than the
//!   window it asked for and waits until the socket closes. The last test pins both down.

use std::ffi::c_void;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use rustix::fs::{fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use wire::features::{check_acked, device, iommu_negotiated, protocol, NegotiationError};
use wire::vhost_user::{
    flags, reply_kind, BackendRequest, Config, Connection, DecodeLimits, FrontendReq,
    FrontendRequest, Header, MemoryRegion, Reply, ReplyKind, VringAddr, VringState,
    MAX_CONFIG_SIZE,
};
use wire::WireError;

/// Device features the listener offers.
const OFFERED_FEATURES: u64 = device::VERSION_1
    | device::ACCESS_PLATFORM
    | device::PROTOCOL_FEATURES
    | device::RING_EVENT_IDX;
/// Protocol features the listener offers.
const OFFERED_PROTOCOL: u64 = protocol::REPLY_ACK
    | protocol::BACKEND_REQ
    | protocol::CONFIG
    | protocol::CONFIGURE_MEM_SLOTS
    | protocol::MQ;
const QUEUES: u64 = 2;
const MEM_SLOTS: u64 = 8;
/// The device config space the listener serves.
const CONFIG_SPACE: [u8; 16] = *b"vhost-peer-cfg!\0";

/// Flags of a request sent without / with NEED_REPLY.
const PLAIN: u32 = flags::VERSION_1;
const NEED_REPLY: u32 = flags::VERSION_1 | flags::NEED_REPLY;

/// What the listener received, in order.
#[derive(Debug)]
enum Seen {
    /// A request that decoded, with its header (it owns the descriptors that came with it).
    Request(Header, FrontendRequest),
    /// A request the decoder refused, and why.
    Rejected(Header, WireError),
    /// The result of a CONFIG_CHANGE the listener sent on the back-end channel.
    BackendChannel(Result<(), WireError>),
}

/// The listener: decode each message with our codec, answer it, record it. Refused requests
/// are answered with `Connection::reject`. Ends when the front-end hangs up, or after
/// refusing a GET_CONFIG, whose empty failure reply the `vhost` crate cannot read: closing
/// frees it.
fn serve(conn: Connection) -> Vec<Seen> {
    let limits = DecodeLimits::default();
    let mut bases = std::collections::HashMap::new();
    let mut seen = Vec::new();
    loop {
        let msg = match conn.recv() {
            Ok(msg) => msg,
            Err(WireError::Disconnected) => return seen,
            Err(e) => panic!("framing error on a vhost-crate message: {e}"),
        };
        let header = msg.header;
        let req = match FrontendRequest::decode(&header, &msg.payload, msg.fds, &limits) {
            Ok(req) => req,
            Err(error) => {
                conn.refuse(&header).unwrap();
                let own = FrontendReq::from_code(header.request).and_then(reply_kind);
                seen.push(Seen::Rejected(header, error));
                // `reject` answers a refused GET_CONFIG with an empty reply (QEMU's and
                // libvhost-user's failure form), which the `vhost` crate cannot read: it
                // waits for the whole window. Hang up to free it.
                if own == Some(ReplyKind::Config) {
                    return seen;
                }
                continue;
            }
        };
        let reply = match &req {
            FrontendRequest::GetFeatures => Some(Reply::U64(OFFERED_FEATURES)),
            FrontendRequest::GetProtocolFeatures => Some(Reply::U64(OFFERED_PROTOCOL)),
            FrontendRequest::GetQueueNum => Some(Reply::U64(QUEUES)),
            FrontendRequest::GetMaxMemSlots => Some(Reply::U64(MEM_SLOTS)),
            FrontendRequest::GetVringBase(s) => Some(Reply::VringState(VringState {
                index: s.index,
                num: bases.get(&s.index).copied().unwrap_or(0),
            })),
            FrontendRequest::GetConfig(c) => {
                let start = c.offset as usize;
                let data = CONFIG_SPACE
                    .get(start..start + c.data.len())
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                Some(Reply::Config(Config {
                    offset: c.offset,
                    flags: c.flags,
                    data,
                }))
            }
            FrontendRequest::SetVringBase(s) => {
                bases.insert(s.index, s.num);
                None
            }
            _ => None,
        };
        // Our table of answers and the codec's must agree.
        assert_eq!(
            reply.as_ref().map(Reply::kind),
            reply_kind(req.req()),
            "{req:?}"
        );
        match &reply {
            // A request with a reply of its own gets that reply only, NEED_REPLY or not.
            Some(r) => conn.send_reply(&header, r).unwrap(),
            None => conn.ack(&header, true).unwrap(),
        }
        let channel = match &req {
            FrontendRequest::SetBackendReqFd(fd) => Some(fd.try_clone().unwrap()),
            _ => None,
        };
        seen.push(Seen::Request(header, req));
        if let Some(fd) = channel {
            // Use the back-end channel at once: REPLY_ACK is negotiated, so ask for an ack.
            let channel = Connection::new(UnixStream::from(fd));
            let sent = channel
                .send_backend_request(&BackendRequest::ConfigChange, true)
                .unwrap();
            seen.push(Seen::BackendChannel(channel.recv_ack(&sent)));
        }
    }
}

/// The front-end's handler for back-end requests: counts CONFIG_CHANGE notifications.
#[derive(Default)]
struct ConfigChanges(AtomicUsize);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// A memfd of `len` bytes, mapped shared in this process (the front-end's guest memory).
struct SharedMem {
    fd: OwnedFd,
    ptr: *mut c_void,
    len: usize,
}

impl SharedMem {
    fn new(name: &str, len: usize) -> Self {
        let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, len as u64).unwrap();
        // SAFETY: a new shared mapping at an address the kernel picks, so it replaces
        // nothing; `fd` is a memfd of exactly `len` bytes. Unmapped in `Drop`.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap();
        SharedMem { fd, ptr, len }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Write `data` at `offset` of the mapping, byte by byte with volatile stores: the memory
    /// is shared with the other side, so no Rust reference is ever made over it.
    fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: `offset + i < len`, inside the mapping made in `new` (readable and
            // writable, alive until `Drop`).
            unsafe { self.ptr.cast::<u8>().add(offset + i).write_volatile(b) }
        }
    }

    /// Read `len` bytes at `offset` of the mapping with volatile loads.
    fn read_at(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        (0..len)
            // SAFETY: `offset + i < self.len`, inside the live mapping.
            .map(|i| unsafe { self.ptr.cast::<u8>().add(offset + i).read_volatile() })
            .collect()
    }

    fn region(&self, guest_phys_addr: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr,
            memory_size: self.len as u64,
            userspace_addr: self.addr(),
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, whose only slices borrowed `self` and are gone.
        unsafe { munmap(self.ptr, self.len) }.unwrap();
    }
}

/// A socket path of our own in the temp directory.
fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "wire-vhost-peer-{}-{name}.sock",
        std::process::id()
    ))
}

/// The request codes and flags of `seen`, with the back-end channel shown as code 0.
fn codes(seen: &[Seen]) -> Vec<(u32, u32)> {
    seen.iter()
        .map(|s| match s {
            Seen::Request(h, _) | Seen::Rejected(h, _) => (h.request, h.flags),
            Seen::BackendChannel(_) => (0, 0),
        })
        .collect()
}

fn request(seen: &[Seen], i: usize) -> &FrontendRequest {
    match &seen[i] {
        Seen::Request(_, req) => req,
        other => panic!("message {i}: expected a decoded request, got {other:?}"),
    }
}

fn rejected(seen: &[Seen], i: usize) -> (&Header, &WireError) {
    match &seen[i] {
        Seen::Rejected(h, e) => (h, e),
        other => panic!("message {i}: expected a rejected request, got {other:?}"),
    }
}

/// The payload of decoded request `i` of `seen`, which must match `pat`.
macro_rules! expect {
    ($seen:expr, $i:expr, $pat:pat => $out:expr) => {
        match request(&$seen, $i) {
            $pat => $out,
            other => panic!("message {}: unexpected {other:?}", $i),
        }
    };
}

fn is_backend_failure(err: &vhost::Error) -> bool {
    matches!(
        err,
        vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError)
    )
}

const RAM_GPA: u64 = 0;
const RAM_SIZE: usize = 1 << 20;
const HOTPLUG_GPA: u64 = 0x1_0000_0000;
const HOTPLUG_SIZE: usize = 64 << 10;
const QUEUE_SIZE: u16 = 256;
const AVAIL_BASE: u16 = 0x1234;
/// Ring addresses: IOVAs, as ACCESS_PLATFORM is acked.
const DESC_IOVA: u64 = 0x4000_0000;
const AVAIL_IOVA: u64 = 0x4000_1000;
const USED_IOVA: u64 = 0x4000_2000;

#[test]
fn vhost_frontend_handshake_against_our_listener() {
    let path = socket_path("handshake");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || serve(Connection::new(listener.accept().unwrap().0)));
    let mut fe = Frontend::connect(&path, 1).unwrap();
    std::fs::remove_file(&path).unwrap();

    let ram = SharedMem::new("vhost-peer-ram", RAM_SIZE);
    let hotplug = SharedMem::new("vhost-peer-hotplug", HOTPLUG_SIZE);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let changes = Arc::new(ConfigChanges::default());
    let mut backend_channel = FrontendReqHandler::new(changes.clone()).unwrap();
    backend_channel.set_reply_ack_flag(true);
    let acked_features = device::VERSION_1 | device::ACCESS_PLATFORM | device::PROTOCOL_FEATURES;
    let vring = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: DESC_IOVA,
        used_ring_addr: USED_IOVA,
        avail_ring_addr: AVAIL_IOVA,
        log_addr: None,
    };

    // The front-end side, in the order QEMU uses. Every call must return Ok.
    assert_eq!(fe.get_features().unwrap(), OFFERED_FEATURES);
    let proto = fe.get_protocol_features().unwrap();
    assert_eq!(proto.bits(), OFFERED_PROTOCOL);
    fe.set_protocol_features(proto).unwrap();
    // From here on every request asks for a reply, and the crate waits for each REPLY_ACK.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), QUEUES);
    fe.set_owner().unwrap();
    fe.set_backend_request_fd(&backend_channel.get_tx_raw_fd())
        .unwrap();
    assert_eq!(backend_channel.handle_request().unwrap(), 0);
    assert_eq!(changes.0.load(Ordering::SeqCst), 1);
    assert_eq!(fe.get_max_mem_slots().unwrap(), MEM_SLOTS);
    fe.set_features(acked_features).unwrap();
    assert!(fe.set_mem_table(&[ram.region(RAM_GPA)]).unwrap().is_none());
    fe.set_vring_num(0, QUEUE_SIZE).unwrap();
    fe.set_vring_base(0, AVAIL_BASE).unwrap();
    fe.set_vring_addr(0, &vring).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    assert!(fe
        .add_mem_region(&hotplug.region(HOTPLUG_GPA))
        .unwrap()
        .is_none());
    fe.remove_mem_region(&hotplug.region(HOTPLUG_GPA)).unwrap();
    let (cfg, data) = fe
        .get_config(0, 16, VhostUserConfigFlags::empty(), &[0; 16])
        .unwrap();
    assert_eq!({ cfg.size }, 16);
    assert_eq!(data, CONFIG_SPACE);
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(AVAIL_BASE));

    // Guest memory written by the front-end, to be read through the listener's descriptor.
    ram.write_at(0x1000, b"front-end wrote!");
    drop(fe);
    let seen = server.join().unwrap();

    // The exact sequence, with NEED_REPLY on everything after SET_PROTOCOL_FEATURES.
    use FrontendReq as Q;
    let expected = [
        (Q::GetFeatures.code(), PLAIN),
        (Q::GetProtocolFeatures.code(), PLAIN),
        (Q::SetProtocolFeatures.code(), PLAIN),
        (Q::GetQueueNum.code(), NEED_REPLY),
        (Q::SetOwner.code(), NEED_REPLY),
        (Q::SetBackendReqFd.code(), NEED_REPLY),
        (0, 0), // CONFIG_CHANGE on the back-end channel
        (Q::GetMaxMemSlots.code(), NEED_REPLY),
        (Q::SetFeatures.code(), NEED_REPLY),
        (Q::SetMemTable.code(), NEED_REPLY),
        (Q::SetVringNum.code(), NEED_REPLY),
        (Q::SetVringBase.code(), NEED_REPLY),
        (Q::SetVringAddr.code(), NEED_REPLY),
        (Q::SetVringKick.code(), NEED_REPLY),
        (Q::SetVringCall.code(), NEED_REPLY),
        (Q::SetVringEnable.code(), NEED_REPLY),
        (Q::AddMemReg.code(), NEED_REPLY),
        (Q::RemMemReg.code(), NEED_REPLY),
        (Q::GetConfig.code(), NEED_REPLY),
        (Q::GetVringBase.code(), NEED_REPLY),
    ];
    assert_eq!(codes(&seen), expected);

    // Features: exactly what the front-end acked, and the IOTLB is on.
    let acked_proto = expect!(seen, 2, FrontendRequest::SetProtocolFeatures(v) => *v);
    assert_eq!(acked_proto, OFFERED_PROTOCOL);
    let acked = expect!(seen, 8, FrontendRequest::SetFeatures(v) => *v);
    assert_eq!(acked, acked_features);
    assert_eq!(check_acked(OFFERED_FEATURES, acked), Ok(()));
    assert_eq!(check_acked(OFFERED_PROTOCOL, acked_proto), Ok(()));
    assert!(iommu_negotiated(acked, acked_proto));
    assert!(
        matches!(seen[6], Seen::BackendChannel(Ok(()))),
        "{:?}",
        seen[6]
    );
    let channel = expect!(seen, 5, FrontendRequest::SetBackendReqFd(fd) => fd);
    assert!(
        rustix::fs::FileType::from_raw_mode(fstat(channel).unwrap().st_mode)
            .eq(&rustix::fs::FileType::Socket)
    );

    // The memory table: the front-end's addresses, and its memfd.
    let regions = expect!(seen, 9, FrontendRequest::SetMemTable(r) => r);
    assert_eq!(regions.len(), 1);
    assert_eq!(
        regions[0].region,
        MemoryRegion {
            guest_phys_addr: RAM_GPA,
            memory_size: RAM_SIZE as u64,
            userspace_addr: ram.addr(),
            mmap_offset: 0,
        }
    );
    let got = &regions[0].fd;
    let (ours, theirs) = (fstat(&ram.fd).unwrap(), fstat(got).unwrap());
    assert_eq!((theirs.st_dev, theirs.st_ino), (ours.st_dev, ours.st_ino));
    assert_eq!(theirs.st_size, RAM_SIZE as i64);
    // Only memfds answer F_GET_SEALS (a regular file or a socket gives EINVAL).
    assert_eq!(fcntl_get_seals(got).unwrap(), SealFlags::empty());
    let file = std::fs::File::from(got.try_clone().unwrap());
    let mut buf = [0u8; 16];
    file.read_exact_at(&mut buf, regions[0].region.mmap_offset + 0x1000)
        .unwrap();
    assert_eq!(&buf, b"front-end wrote!");
    file.write_all_at(b"back-end wrote!!", 0x2000).unwrap();
    assert_eq!(ram.read_at(0x2000, 16), b"back-end wrote!!");

    // Queue 0.
    assert_eq!(
        expect!(seen, 10, FrontendRequest::SetVringNum(s) => *s),
        VringState {
            index: 0,
            num: QUEUE_SIZE.into()
        }
    );
    assert_eq!(
        expect!(seen, 11, FrontendRequest::SetVringBase(s) => *s),
        VringState {
            index: 0,
            num: AVAIL_BASE.into()
        }
    );
    assert_eq!(
        expect!(seen, 12, FrontendRequest::SetVringAddr(a) => *a),
        VringAddr {
            index: 0,
            flags: 0,
            descriptor: DESC_IOVA,
            used: USED_IOVA,
            available: AVAIL_IOVA,
            log: 0,
        }
    );
    let kick_file = expect!(seen, 13, FrontendRequest::SetVringKick(f) => f);
    let call_file = expect!(seen, 14, FrontendRequest::SetVringCall(f) => f);
    assert_eq!((kick_file.index, call_file.index), (0, 0));
    // The descriptors are the front-end's eventfds: a kick written by it is read by us, a
    // call written by us is read by it.
    kick.write(3).unwrap();
    let mut count = [0u8; 8];
    rustix::io::read(kick_file.fd.as_ref().unwrap(), &mut count).unwrap();
    assert_eq!(u64::from_ne_bytes(count), 3);
    rustix::io::write(call_file.fd.as_ref().unwrap(), &5u64.to_ne_bytes()).unwrap();
    assert_eq!(call.read().unwrap(), 5);
    assert_eq!(
        expect!(seen, 15, FrontendRequest::SetVringEnable(s) => *s),
        VringState { index: 0, num: 1 }
    );

    // The hot-plugged region, added and removed.
    let hotplug_region = MemoryRegion {
        guest_phys_addr: HOTPLUG_GPA,
        memory_size: HOTPLUG_SIZE as u64,
        userspace_addr: hotplug.addr(),
        mmap_offset: 0,
    };
    let added = expect!(seen, 16, FrontendRequest::AddMemReg(r) => r);
    assert_eq!(added.region, hotplug_region);
    let (ours, theirs) = (fstat(&hotplug.fd).unwrap(), fstat(&added.fd).unwrap());
    assert_eq!((theirs.st_dev, theirs.st_ino), (ours.st_dev, ours.st_ino));
    assert_eq!(
        expect!(seen, 17, FrontendRequest::RemMemReg(r) => *r),
        hotplug_region
    );

    assert_eq!(
        expect!(seen, 18, FrontendRequest::GetConfig(c) => c.clone()),
        Config {
            offset: 0,
            flags: 0,
            data: vec![0; 16]
        }
    );
    assert_eq!(
        expect!(seen, 19, FrontendRequest::GetVringBase(s) => *s),
        VringState { index: 0, num: 0 }
    );
}

#[test]
fn refused_requests_are_answered_and_the_connection_stays_in_step() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || serve(Connection::new(b)));
    let mut fe = Frontend::from_stream(a, 1);

    assert_eq!(fe.get_features().unwrap(), OFFERED_FEATURES);
    fe.set_features(device::VERSION_1 | device::PROTOCOL_FEATURES)
        .unwrap();
    let proto = fe.get_protocol_features().unwrap();
    // The front-end acks two protocol features that were not offered; the `vhost` crate
    // does not check, and it then sends their requests, which our codec does not support.
    let beyond =
        VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::DEVICE_STATE;
    fe.set_protocol_features(proto | beyond).unwrap();

    // 1. SET_LOG_BASE in its legacy form (no LOG_SHMFD): a bare u64, no descriptor, and the
    //    crate waits for nothing. We refuse it (we take the LOG_SHMFD form only) and, as no
    //    reply was asked for, send nothing.
    fe.set_log_base(0x8000, None).unwrap();
    assert_eq!(fe.get_features().unwrap(), OFFERED_FEATURES);

    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // 2. SET_INFLIGHT_FD (32), with a memfd: refused, the fd closed, a failure status sent.
    let inflight = SharedMem::new("vhost-peer-inflight", 4096);
    let err = fe
        .set_inflight_fd(
            &VhostUserInflight::new(4096, 0, 1, QUEUE_SIZE),
            inflight.fd.as_raw_fd(),
        )
        .unwrap_err();
    assert!(is_backend_failure(&err), "{err:?}");
    assert_eq!(fe.get_queue_num().unwrap(), QUEUES);
    // 3. CHECK_DEVICE_STATE (43), which has a u64 reply of its own: the failure status is
    //    that reply.
    let err = fe.check_device_state().unwrap_err();
    assert!(is_backend_failure(&err), "{err:?}");
    // Still in step.
    let (_, data) = fe
        .get_config(4, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap();
    assert_eq!(data, CONFIG_SPACE[4..12]);
    assert_eq!(fe.get_features().unwrap(), OFFERED_FEATURES);
    drop(fe);
    let seen = server.join().unwrap();

    use FrontendReq as Q;
    let expected = [
        (Q::GetFeatures.code(), PLAIN),
        (Q::SetFeatures.code(), PLAIN),
        (Q::GetProtocolFeatures.code(), PLAIN),
        (Q::SetProtocolFeatures.code(), PLAIN),
        (Q::SetLogBase.code(), PLAIN),
        (Q::GetFeatures.code(), PLAIN),
        (Q::SetInflightFd.code(), NEED_REPLY),
        (Q::GetQueueNum.code(), NEED_REPLY),
        (Q::CheckDeviceState.code(), NEED_REPLY),
        (Q::GetConfig.code(), NEED_REPLY),
        (Q::GetFeatures.code(), NEED_REPLY),
    ];
    assert_eq!(codes(&seen), expected);

    let acked_proto = expect!(seen, 3, FrontendRequest::SetProtocolFeatures(v) => *v);
    assert_eq!(
        check_acked(OFFERED_PROTOCOL, acked_proto),
        Err(NegotiationError::NotOffered {
            extra: protocol::INFLIGHT_SHMFD | protocol::DEVICE_STATE
        })
    );

    let (h, e) = rejected(&seen, 4);
    assert_eq!(h.size, 8);
    assert!(
        matches!(
            e,
            WireError::PayloadSize {
                request: 6,
                expected: 16,
                got: 8
            }
        ),
        "{e:?}"
    );
    let (h, e) = rejected(&seen, 6);
    // VhostUserInflight is 24 bytes in the `vhost` crate (repr(C): 8 + 8 + 2 + 2 + padding).
    assert_eq!(h.size, 24);
    // Unsupported requests are refused as such, whatever they carry (the descriptor is
    // closed with the message).
    assert!(
        matches!(e, WireError::UnknownRequest { request: 32 }),
        "{e:?}"
    );
    let (h, e) = rejected(&seen, 8);
    assert_eq!(h.size, 0);
    assert!(
        matches!(e, WireError::UnknownRequest { request: 43 }),
        "{e:?}"
    );
}

/// What `Connection::refuse(header)` writes to the peer.
fn what_refuse_sends(header: &Header) -> Vec<u8> {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    Connection::new(ours).refuse(header).unwrap();
    // The connection is dropped: the read ends.
    let mut out = Vec::new();
    peer.read_to_end(&mut out).unwrap();
    out
}

/// The `vhost` crate accepts GET_CONFIG windows up to 4 KiB (`VHOST_USER_CONFIG_SIZE`); our
/// codec caps them at `MAX_CONFIG_SIZE` (256, QEMU's `VHOST_USER_MAX_CONFIG_SIZE`).
/// `Connection::reject` answers the refusal with a reply whose payload is empty, with or
/// without NEED_REPLY: the failure form QEMU understands. The `vhost` crate (0.18) cannot take
/// it: it reads header + 12 + window bytes before looking at the header, so it stays waiting
/// until the socket closes (the listener hangs up). This test pins both sides down.
#[test]
fn a_refused_get_config_gets_the_empty_failure_reply() {
    const WINDOW: u32 = MAX_CONFIG_SIZE as u32 + 44; // 300
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || serve(Connection::new(b)));
    let mut fe = Frontend::from_stream(a, 1);
    assert_eq!(fe.get_features().unwrap(), OFFERED_FEATURES);
    fe.set_features(device::VERSION_1 | device::PROTOCOL_FEATURES)
        .unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    // Sent without NEED_REPLY, as the crate does by default.
    let Err(err) = fe.get_config(
        0,
        WINDOW,
        VhostUserConfigFlags::empty(),
        &[0; WINDOW as usize],
    ) else {
        panic!("a GET_CONFIG of {WINDOW} bytes succeeded");
    };
    // Not the crate's "back-end failed" (BackendInternalError): the socket was closed.
    assert!(!is_backend_failure(&err), "{err:?}");
    assert!(
        matches!(
            err,
            vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::PartialMessage | vhost::vhost_user::Error::Disconnected
            )
        ),
        "{err:?}"
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 5);
    let (h, e) = rejected(&seen, 4);
    assert_eq!(
        *h,
        Header {
            request: FrontendReq::GetConfig.code(),
            flags: PLAIN,
            size: 12 + WINDOW,
        }
    );
    assert!(
        matches!(
            e,
            WireError::InvalidField {
                request: 24,
                field: "config size",
                value: 300
            }
        ),
        "{e:?}"
    );
    assert_eq!(reply_kind(FrontendReq::GetConfig), Some(ReplyKind::Config));
    // With or without NEED_REPLY: a header-only reply (REPLY flag, size 0).
    let mut expected = Vec::new();
    for word in [24u32, flags::VERSION_1 | flags::REPLY, 0] {
        expected.extend_from_slice(&word.to_ne_bytes());
    }
    assert_eq!(what_refuse_sends(h), expected);
    let with_need_reply = Header {
        flags: NEED_REPLY,
        ..*h
    };
    assert_eq!(what_refuse_sends(&with_need_reply), expected);
}
