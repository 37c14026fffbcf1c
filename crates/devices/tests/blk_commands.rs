//! FLUSH, DISCARD and WRITE_ZEROES through the engine behind the IOMMU: what they do to the
//! disk, every limit the config space advertises for them, and their system call made
//! outside the quiescence section (an INVALIDATE arriving during a FLUSH is acknowledged at
//! once, and the status byte is translated again afterwards).

mod common;

use std::sync::Arc;
use std::time::Duration;

use backend::{EngineConfig, Server};
use common::gated::{GateControl, Stop};
use common::{blk_request, blk_server, connect, disk, pattern, status, Frontend};
use devices::{Blk, BlkConfig};
use iotlb::IovaRange;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtq::testing::PAGE;
use wire::IotlbMsg;

const DISK: u64 = 1 << 20;
const FLAG_UNMAP: u32 = 1;

/// One `{ le64 sector; le32 num_sectors; le32 flags }` segment.
fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&num.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// Run one request on queue 0 and wait for it: its status.
fn run(f: &mut Frontend, ty: u32, sector: u64, data: &[u8], read_len: u32) -> (u8, Vec<u8>) {
    let (h, d, s) = blk_request(f, ty, sector, data, read_len);
    let mut bufs = vec![h];
    bufs.extend(d);
    bufs.push(s);
    f.submit(0, &bufs);
    f.wait_used(0, 1, Duration::from_secs(10));
    let read = match d {
        Some(d) if d.write => f.space.read(&f.mem, d.iova, d.len as usize),
        _ => Vec::new(),
    };
    (status(f, &s), read)
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn flush_discard_and_write_zeroes_do_what_they_say() {
    let s = blk_server(DISK, BlkConfig::default(), EngineConfig::default());
    let (sock, _t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 3);
    let data = pattern(9, 3 * 4096);
    assert_eq!(run(&mut f, VIRTIO_BLK_T_OUT, 0, &data, 0).0, OK);
    assert_eq!(run(&mut f, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
    // Sectors 0..8 discarded, 16..24 zeroed; 8..16 untouched.
    assert_eq!(
        run(&mut f, VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 0), 0).0,
        OK
    );
    let zero = segment(16, 8, FLAG_UNMAP);
    assert_eq!(run(&mut f, VIRTIO_BLK_T_WRITE_ZEROES, 0, &zero, 0).0, OK);
    let (st, read) = run(&mut f, VIRTIO_BLK_T_IN, 0, &[], 3 * 4096);
    assert_eq!(st, OK);
    assert!(read[..4096].iter().all(|&b| b == 0), "discarded range");
    assert_eq!(read[4096..8192], data[4096..8192], "untouched range");
    assert!(read[8192..].iter().all(|&b| b == 0), "zeroed range");
}

#[test]
fn discard_and_write_zeroes_beyond_what_the_config_space_says_fail() {
    let s = blk_server(DISK, BlkConfig::default(), EngineConfig::default());
    let (sock, _t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 4);
    let sectors = DISK / 512;
    let two = [segment(0, 1, 0), segment(8, 1, 0)].concat();
    let cases: [(&str, u32, Vec<u8>, u8); 9] = [
        (
            "two segments (max_discard_seg = 1)",
            VIRTIO_BLK_T_DISCARD,
            two.clone(),
            IOERR,
        ),
        (
            "two segments (max_write_zeroes_seg = 1)",
            VIRTIO_BLK_T_WRITE_ZEROES,
            two,
            IOERR,
        ),
        ("no segment", VIRTIO_BLK_T_DISCARD, Vec::new(), IOERR),
        (
            "a segment and a piece",
            VIRTIO_BLK_T_DISCARD,
            [segment(0, 1, 0), vec![0; 4]].concat(),
            IOERR,
        ),
        (
            "past the end of the disk",
            VIRTIO_BLK_T_DISCARD,
            segment(sectors - 1, 2, 0),
            IOERR,
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(u64::MAX, 1, 0),
            IOERR,
        ),
        (
            "unmap on a discard",
            VIRTIO_BLK_T_DISCARD,
            segment(0, 1, FLAG_UNMAP),
            UNSUPP,
        ),
        (
            "an unknown flag",
            VIRTIO_BLK_T_WRITE_ZEROES,
            segment(0, 1, 2),
            UNSUPP,
        ),
        (
            "the last sector",
            VIRTIO_BLK_T_DISCARD,
            segment(sectors - 1, 1, 0),
            OK,
        ),
    ];
    for (what, ty, seg, want) in cases {
        assert_eq!(run(&mut f, ty, 0, &seg, 0).0, want, "{what}");
    }
}

#[test]
fn an_invalidate_during_a_flush_is_acknowledged_at_once_and_the_status_is_translated_again() {
    let gate = GateControl::new();
    let blk = Blk::new(disk(DISK), BlkConfig::default()).unwrap();
    let s = Arc::new(Server::new(gate.device(blk), EngineConfig::default()));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 5);
    let (h, _, st) = blk_request(&mut f, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    gate.arm(Stop::InDeferred);
    f.submit(0, &[h, st]);
    gate.wait_stopped(&mut f);
    // The FLUSH is in its system call. The guest unmaps its status byte and maps the page
    // elsewhere: the INVALIDATE is acknowledged without waiting for the disk.
    let page = st.iova & !(PAGE - 1);
    let range = IovaRange::from_size(page, PAGE).unwrap();
    let sent = f.iotlb_nowait(IotlbMsg::Invalidate { range });
    assert!(
        f.reply_within(Duration::from_secs(5)),
        "an INVALIDATE waited for a FLUSH in progress"
    );
    f.conn.recv_ack(&sent).unwrap();
    let fresh = f.alloc.page();
    f.space.map_page(page, fresh, iotlb::Perm::ReadWrite);
    f.space.write(&f.mem, st.iova, &[0xff]);
    gate.release();
    // The status goes where the byte is mapped now, through a new MISS, not to the old page.
    f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(status(&f, &st), OK);
    drop(f);
    t.join().unwrap();
    assert_eq!(s.stats().requests, 1);
}
