//! The control path against a hostile front-end: descriptors that are not eventfds, an
//! eventfd whose counter is full, guest memory that could shrink, and changes under a
//! running queue (SET_FEATURES, SET_VRING_BASE). Each test is the regression test of one
//! fix of the control-path issue; none measures time beyond a generous liveness bound.

mod common;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::EngineConfig;
use common::{blk_request, blk_server, connect, status, Frontend, MEM};
use devices::BlkConfig;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{memfd_create, MemfdFlags};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use wire::features::device;
use wire::vhost_user::{
    BackendRequest, FrontendRequest, MemoryRegion, RegionFd, VringFile, VringState,
};
use wire::IotlbMsg;

const DISK: u64 = 1 << 20;

/// Ends the test process if it is still running after `secs` (a hang must fail, not wait
/// for CI's timeout). Cancelled when dropped.
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(what: &'static str, secs: u64) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{what}: still blocked after {secs} s");
            std::process::exit(101);
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn frontend(iommu: bool) -> (Frontend, std::thread::JoinHandle<()>) {
    let s = blk_server(DISK, BlkConfig::default(), EngineConfig::default());
    let (sock, t) = connect(&s);
    (Frontend::connect(sock, 1, 64, iommu, 7), t)
}

/// A request with NEED_REPLY: whether the back-end accepted it.
fn accepted(f: &mut Frontend, req: FrontendRequest) -> bool {
    let h = f.conn.send_request(&req, true).unwrap();
    f.conn.recv_ack(&h).is_ok()
}

/// Read 4 KiB from sector 0 on queue 0 and wait for it; its status.
fn read_one(f: &mut Frontend) -> u8 {
    let (h, d, s) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 4096);
    let d = d.unwrap();
    f.submit(0, &[h, d, s]);
    f.wait_used(0, 1, Duration::from_secs(10));
    status(f, &s)
}

#[test]
fn kick_call_and_err_fds_that_are_not_eventfds_are_refused() {
    let (mut f, _t) = frontend(false);
    let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
    let file = std::fs::File::open("/dev/null").unwrap();
    let memfd = memfd_create("not-an-eventfd", MemfdFlags::CLOEXEC).unwrap();
    let file_fd = |f: &std::fs::File| OwnedFd::from(f.try_clone().unwrap());
    let refused = [
        // The write end of a pipe nobody reads: signalling it would block once it is full.
        FrontendRequest::SetVringCall(VringFile {
            index: 0,
            fd: Some(pipe_w),
        }),
        // A regular file is always readable: polling it as a kick would spin.
        FrontendRequest::SetVringKick(VringFile {
            index: 0,
            fd: Some(file_fd(&file)),
        }),
        FrontendRequest::SetVringKick(VringFile {
            index: 0,
            fd: Some(pipe_r),
        }),
        FrontendRequest::SetVringErr(VringFile {
            index: 0,
            fd: Some(memfd),
        }),
    ];
    for req in refused {
        let what = format!("{:?}", req.req());
        assert!(
            !accepted(&mut f, req),
            "{what} with a descriptor that is not an eventfd"
        );
    }
    // The queue goes on with the eventfds it had.
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    // NOFD for the call (no interrupts) is still accepted.
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringCall(VringFile { index: 0, fd: None })
    ));
}

#[test]
fn a_call_eventfd_whose_counter_is_full_blocks_nothing() {
    let (mut f, _t) = frontend(false);
    // A blocking eventfd at its largest count: a blocking write of 1 would wait for a read
    // that never comes, with the call fd's lock held.
    let call = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&call, &(u64::MAX - 1).to_ne_bytes()).unwrap();
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringCall(VringFile {
            index: 0,
            fd: Some(call.try_clone().unwrap()),
        })
    ));
    let _dog = Watchdog::new("a signal to a full call eventfd", 20);
    // Requests complete (the driver looks at the used ring; the call eventfd stays full).
    for _ in 0..4 {
        let (h, d, s) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 4096);
        f.submit(0, &[h, d.unwrap(), s]);
        let start = Instant::now();
        while f.take_used(0).is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(status(&f, &s), VIRTIO_BLK_S_OK as u8);
    }
    // And the control thread, which takes the same lock to replace the fd or to stop the
    // queue, answers.
    let start = Instant::now();
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringCall(VringFile { index: 0, fd: None })
    ));
    assert_eq!(f.stop_queue(0), 4);
    eprintln!(
        "SET_VRING_CALL + GET_VRING_BASE after signals to a full eventfd: {:?}",
        start.elapsed()
    );
}

#[test]
fn guest_memory_in_an_unsealed_memfd_is_refused() {
    let (mut f, _t) = frontend(false);
    let fd = memfd_create("unsealed", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
    let region = MemoryRegion {
        guest_phys_addr: MEM,
        memory_size: 1 << 20,
        userspace_addr: 0x7e00_0000_0000,
        mmap_offset: 0,
    };
    assert!(
        !accepted(
            &mut f,
            FrontendRequest::AddMemReg(RegionFd {
                region,
                fd: fd.try_clone().unwrap(),
            })
        ),
        "an unsealed memfd was mapped: truncating it now would kill the back-end"
    );
    // What the front-end does to it now concerns nobody else.
    rustix::fs::ftruncate(&fd, 0).unwrap();
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    // Sealed against shrinking, the same region is accepted.
    let sealed = memfd_create("sealed", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&sealed, 1 << 20).unwrap();
    rustix::fs::fcntl_add_seals(&sealed, rustix::fs::SealFlags::SHRINK).unwrap();
    assert!(accepted(
        &mut f,
        FrontendRequest::AddMemReg(RegionFd { region, fd: sealed })
    ));
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn switching_the_iommu_on_under_a_running_queue_restarts_it_behind_the_iotlb() {
    let (mut f, _t) = frontend(false);
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    let feats = device::VERSION_1
        | device::PROTOCOL_FEATURES
        | device::RING_EVENT_IDX
        | device::ACCESS_PLATFORM;
    assert!(accepted(&mut f, FrontendRequest::SetFeatures(feats)));
    // The queue's addresses are IOVAs now: using them as guest-physical addresses would
    // bypass the IOMMU. The restarted worker asks for their translation instead.
    let (h, d, s) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 4096);
    f.submit(0, &[h, d.unwrap(), s]);
    let start = Instant::now();
    let mut missed = false;
    while start.elapsed() < Duration::from_secs(2) && !missed {
        if let Ok(msg) = f.channel.recv() {
            let req = BackendRequest::decode(&msg.header, &msg.payload, msg.fds).unwrap();
            missed = matches!(req, BackendRequest::IotlbMsg(IotlbMsg::Miss { .. }));
        }
    }
    assert!(missed, "no MISS after ACCESS_PLATFORM was switched on");
    assert!(
        f.take_used(0).is_empty(),
        "a request was served through untranslated addresses"
    );
}

#[test]
fn set_vring_base_on_a_running_queue_is_where_the_next_kick_starts_it() {
    let (mut f, _t) = frontend(false);
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    // The worker is at 2. The front-end disables the ring, moves its base and restarts it.
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringEnable(VringState { index: 0, num: 0 })
    ));
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringBase(VringState { index: 0, num: 0 })
    ));
    let kick = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
    assert!(accepted(
        &mut f,
        FrontendRequest::SetVringKick(VringFile {
            index: 0,
            fd: Some(kick),
        })
    ));
    assert_eq!(
        f.stop_queue(0),
        0,
        "the base the front-end set, not the old worker's"
    );
}

#[test]
fn a_guest_looping_on_a_denied_access_gets_few_access_fails_and_every_request_fails() {
    let s = blk_server(DISK, BlkConfig::default(), EngineConfig::default());
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 9);
    // One page the IOMMU maps read-only, used again and again as a device-writable buffer.
    let iova = 0x30_0000_0000;
    let gpa = f.alloc.page();
    f.space.map_page(iova, gpa, iotlb::Perm::ReadOnly);
    let start = Instant::now();
    let (rounds, per_round) = (5, 16);
    for _ in 0..rounds {
        let mut statuses = Vec::new();
        for _ in 0..per_round {
            let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
            let data = virtq::testing::Buf {
                iova,
                len: 4096,
                write: true,
            };
            f.submit(0, &[h, data, st]);
            statuses.push(st);
        }
        f.wait_used(0, per_round, Duration::from_secs(10));
        for st in statuses {
            assert_eq!(status(&f, &st), VIRTIO_BLK_S_IOERR as u8);
        }
    }
    let secs = start.elapsed().as_secs() + 1;
    f.serve_misses();
    let denied = (rounds * per_round) as u64;
    // One per page and direction a second (the test may straddle a few seconds).
    assert!(
        (1..=secs as usize + 1).contains(&f.access_fails.len()),
        "{} ACCESS_FAILs for {denied} denied accesses in {secs} s",
        f.access_fails.len()
    );
    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!(st.access_failures, denied);
    assert_eq!(st.access_fails_sent + st.access_fails_suppressed, denied);
    assert!(st.access_fails_suppressed >= denied - secs - 1, "{st}");
    // Each denied access is a warning too: at most 10 a second of them are logged.
    assert!(st.warnings_suppressed >= denied - 10 * (secs + 1), "{st}");
}

#[test]
fn switching_event_idx_off_under_a_running_queue_restarts_it_in_the_new_mode() {
    let (mut f, _t) = frontend(false);
    let (_, _, used) = f.queues[0].driver.addresses();
    // avail_event: the u16 after the used ring's 64 elements (size 64 here).
    let avail_event = used + 4 + 8 * 64;
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    let written = |f: &Frontend| {
        let b = f.space.read(&f.mem, avail_event, 2);
        u16::from_le_bytes([b[0], b[1]])
    };
    assert_eq!(
        written(&f),
        1,
        "with EVENT_IDX the device asks for a kick at index 1"
    );
    let feats = device::VERSION_1 | device::PROTOCOL_FEATURES;
    assert!(accepted(&mut f, FrontendRequest::SetFeatures(feats)));
    // Without EVENT_IDX the device never writes avail_event: a queue left in the old mode
    // would write it again after the next request.
    f.space.write(&f.mem, avail_event, &[0, 0]);
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    assert_eq!(read_one(&mut f), VIRTIO_BLK_S_OK as u8);
    assert_eq!(written(&f), 0, "the queue still runs with EVENT_IDX");
}
