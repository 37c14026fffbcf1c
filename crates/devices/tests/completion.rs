//! A completion is the truth (design invariant 11), end to end over real sockets: every
//! request the device does not serve gets `IOERR` (or `UNSUPP`) in its status byte, which
//! every case checks (each status byte starts as 0xff); a request whose status byte cannot be
//! written never reaches the used ring: the queue stops, the vring error eventfd is
//! signalled and GET_VRING_BASE hands the request back.

mod common;

use std::time::{Duration, Instant};

use backend::EngineConfig;
use common::{blk_request, blk_server, connect, status, Frontend};
use devices::BlkConfig;
use iotlb::{IovaRange, Perm};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtq::testing::{Buf, PAGE};

const DISK: u64 = 4 << 20;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn engine(miss_timeout_ms: u64) -> EngineConfig {
    EngineConfig {
        iotlb_capacity: 256,
        miss_timeout: Duration::from_millis(miss_timeout_ms),
        ..EngineConfig::default()
    }
}

fn blk(read_only: bool) -> BlkConfig {
    BlkConfig {
        queues: 1,
        queue_size: 64,
        read_only,
        ..BlkConfig::default()
    }
}

/// Submit `bufs` on queue 0 (through an indirect table if asked), wait for the one used
/// entry, and return the request's status byte.
fn status_of(f: &mut Frontend, bufs: &[Buf], status_buf: &Buf, indirect: bool) -> u8 {
    if indirect {
        f.submit_indirect(0, bufs);
    } else {
        f.submit(0, bufs);
    }
    let used = f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1);
    status(f, status_buf)
}

#[test]
fn every_request_the_device_does_not_serve_gets_ioerr_in_its_status_byte() {
    let s = blk_server(DISK, blk(false), engine(100));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 31);

    // Outside the disk.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, DISK / 512, &[], 512);
    assert_eq!(
        status_of(&mut f, &[h, d.unwrap(), st], &st, false),
        IOERR,
        "past the end"
    );

    // An unknown request type: UNSUPP.
    let (h, _, st) = blk_request(&mut f, 0x7777, 0, &[], 0);
    assert_eq!(
        status_of(&mut f, &[h, st], &st, false),
        VIRTIO_BLK_S_UNSUPP as u8
    );

    // An access the IOMMU denies: the data buffer of a read is mapped read-only.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d = d.unwrap();
    let (gpa, _) = f.space.translate(d.iova).unwrap();
    f.space.map_page(d.iova, gpa, Perm::ReadOnly);
    assert_eq!(status_of(&mut f, &[h, d, st], &st, false), IOERR, "denied");
    f.serve_misses();
    assert!(
        f.access_fails.iter().any(|&(iova, _)| iova == d.iova),
        "ACCESS_FAIL for the denied page: {:x?}",
        f.access_fails
    );

    // A malformed chain: a driver-to-device buffer after a device-to-driver one.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let extra = f.buf(16, false);
    assert_eq!(
        status_of(&mut f, &[h, d.unwrap(), extra, st], &st, false),
        IOERR,
        "readable after writable"
    );

    // Beyond the advertised limits: a descriptor longer than size_max (1 MiB) ...
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let big = f.buf((1 << 20) + 512, true);
    assert_eq!(
        status_of(&mut f, &[h, big, st], &st, false),
        IOERR,
        "size_max"
    );
    // ... and more than seg_max (62 with 64-entry queues) data segments.
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let mut bufs = vec![h];
    bufs.extend((0..63).map(|_| f.buf(512, true)));
    bufs.push(st);
    assert_eq!(status_of(&mut f, &bufs, &st, true), IOERR, "seg_max");
    // Exactly seg_max is served.
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let mut bufs = vec![h];
    bufs.extend((0..62).map(|_| f.buf(512, true)));
    bufs.push(st);
    assert_eq!(
        status_of(&mut f, &bufs, &st, true),
        VIRTIO_BLK_S_OK as u8,
        "seg_max segments are within the limit"
    );

    // A miss the IOMMU side never answers.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d = d.unwrap();
    f.never_map.push(d.iova);
    assert_eq!(
        status_of(&mut f, &[h, d, st], &st, false),
        IOERR,
        "unanswered"
    );

    // The same, through an indirect table that is unmapped while the queue waits: finding the
    // status byte needs the table again (its miss is answered), and the status is written.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 512);
    let d = d.unwrap();
    f.never_map.push(d.iova);
    let table = f.buf(16 * 3, false);
    f.queues[0]
        .driver
        .add_chain(&f.mem, &f.space, &[h, d, st], Some(table.iova))
        .unwrap();
    f.kick(0);
    let start = Instant::now();
    while !f.ignored.contains(&d.iova) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no miss on the data"
        );
        f.serve_misses();
    }
    f.invalidate(IovaRange::new(table.iova, table.iova + PAGE - 1).unwrap());
    let used = f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1);
    assert_eq!(
        status(&f, &st),
        IOERR,
        "status found through a table missed again"
    );

    drop(f);
    t.join().unwrap();
    let st = s.stats();
    assert_eq!(st.broken_queues, 0, "{st}");
    assert!(st.failed >= 6 && st.invalid_chains >= 3, "{st}");

    // Read-only mode refuses writes.
    let s = blk_server(DISK, blk(true), engine(100));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 32);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &[1u8; 512], 0);
    assert_eq!(
        status_of(&mut f, &[h, d.unwrap(), st], &st, false),
        IOERR,
        "read-only"
    );
    drop(f);
    t.join().unwrap();
}

/// What a test of an unwritable status does: set up, submit, and the check.
struct Unwritable {
    name: &'static str,
    iommu: bool,
    miss_timeout_ms: u64,
    /// Builds the request on a fresh front-end; returns its buffers.
    build: fn(&mut Frontend) -> Vec<Buf>,
}

fn unwritable_cases() -> Vec<Unwritable> {
    vec![
        Unwritable {
            name: "status byte mapped read-only",
            iommu: true,
            miss_timeout_ms: 1000,
            build: |f| {
                let (h, d, st) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 512);
                let (gpa, _) = f.space.translate(st.iova).unwrap();
                f.space
                    .map_page(st.iova - st.iova % PAGE, gpa & !(PAGE - 1), Perm::ReadOnly);
                vec![h, d.unwrap(), st]
            },
        },
        Unwritable {
            name: "no device-writable descriptor",
            iommu: true,
            miss_timeout_ms: 1000,
            build: |f| {
                let (h, d, _) = blk_request(f, VIRTIO_BLK_T_OUT, 0, &[5u8; 512], 0);
                vec![h, d.unwrap()]
            },
        },
        Unwritable {
            name: "status byte never mapped",
            iommu: true,
            miss_timeout_ms: 100,
            build: |f| {
                let (h, d, st) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 512);
                f.never_map.push(st.iova);
                vec![h, d.unwrap(), st]
            },
        },
        Unwritable {
            name: "status byte outside guest memory",
            iommu: false,
            miss_timeout_ms: 1000,
            build: |f| {
                let (h, d, _) = blk_request(f, VIRTIO_BLK_T_IN, 0, &[], 512);
                let outside = Buf {
                    iova: common::MEM + 0x1000,
                    len: 1,
                    write: true,
                };
                vec![h, d.unwrap(), outside]
            },
        },
    ]
}

#[test]
fn a_request_whose_status_cannot_be_written_is_never_completed() {
    for case in unwritable_cases() {
        let s = blk_server(DISK, blk(false), engine(case.miss_timeout_ms));
        let (sock, t) = connect(&s);
        let mut f = Frontend::connect(sock, 1, 64, case.iommu, 33);
        // One request served first: the queue works, and the next one is at index 1.
        let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 8, &[3u8; 512], 0);
        assert_eq!(
            status_of(&mut f, &[h, d.unwrap(), st], &st, false),
            VIRTIO_BLK_S_OK as u8
        );
        let bufs = (case.build)(&mut f);
        f.submit(0, &bufs);
        let start = Instant::now();
        while !f.take_err(0) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{}: the vring error eventfd was not signalled",
                case.name
            );
            f.serve_misses();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            f.take_used(0).is_empty(),
            "{}: a request whose status was not written went on the used ring",
            case.name
        );
        assert_eq!(
            f.stop_queue(0),
            1,
            "{}: GET_VRING_BASE must hand the request back",
            case.name
        );
        drop(f);
        t.join().unwrap();
        let st = s.stats();
        assert_eq!(st.broken_queues, 1, "{}: {st}", case.name);
    }
}

#[test]
fn the_limits_apply_only_to_a_driver_that_acked_them() {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
    // A driver that took neither SIZE_MAX nor SEG_MAX (firmware drivers often put a whole
    // transfer in one descriptor) gets a 2 MiB descriptor and 70 data segments served.
    let s = blk_server(DISK, blk(false), engine(1000));
    let (sock, t) = connect(&s);
    let mask = 0xffff & !(1 << VIRTIO_BLK_F_SIZE_MAX) & !(1 << VIRTIO_BLK_F_SEG_MAX);
    let mut f = Frontend::connect_acking(sock, 1, 64, true, 34, mask);
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let big = f.buf(2 << 20, true);
    assert_eq!(
        status_of(&mut f, &[h, big, st], &st, false),
        VIRTIO_BLK_S_OK as u8,
        "a descriptor over size_max from a driver that did not ack SIZE_MAX"
    );
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let mut bufs = vec![h];
    bufs.extend((0..70).map(|_| f.buf(512, true)));
    bufs.push(st);
    assert_eq!(
        status_of(&mut f, &bufs, &st, true),
        VIRTIO_BLK_S_OK as u8,
        "more than seg_max segments from a driver that did not ack SEG_MAX"
    );
    drop(f);
    t.join().unwrap();
}
