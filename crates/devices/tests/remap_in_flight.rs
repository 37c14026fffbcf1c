//! R4: an UPDATE that remaps bytes a request in flight has translated is not acknowledged
//! before that request is done with them, even when the IOTLB evicted their entry long ago
//! and the translation lives only in the request's kept segments. A device whose `serve`
//! blocks until the test lets it go holds the request in flight.

mod common;

use std::sync::Arc;
use std::time::Duration;

use backend::{EngineConfig, Server};
use common::gated::{GateControl, Stop};
use common::{blk_request, connect, disk, pattern, status, Frontend, VA_BASE};
use devices::{Blk, BlkConfig};
use iotlb::Perm;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use virtq::testing::PAGE;
use wire::IotlbMsg;

/// The IOMMU side maps the page at `iova` to a fresh guest page and sends the UPDATE
/// without waiting for its acknowledgement.
fn remap(f: &mut Frontend, iova: u64) -> wire::vhost_user::Header {
    let fresh = f.alloc.page();
    f.space.map_page(iova, fresh, Perm::ReadWrite);
    let (range, gpa, perm) = f.space.update_for(iova).unwrap();
    f.iotlb_nowait(IotlbMsg::Update {
        range,
        uaddr: VA_BASE + gpa,
        perm,
    })
}

#[test]
fn a_remap_of_evicted_bytes_a_request_holds_waits_for_the_request() {
    let gate = GateControl::new();
    let blk = Blk::new(
        disk(4 << 20),
        BlkConfig {
            queue_size: 64,
            ..BlkConfig::default()
        },
    )
    .unwrap();
    let s = Arc::new(Server::new(
        gate.device(blk),
        EngineConfig {
            iotlb_capacity: backend::MIN_IOTLB_CAPACITY,
            miss_timeout: Duration::from_secs(10),
            ..EngineConfig::default()
        },
    ));
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 41);

    // A write of 40 scattered pages through a 16-entry IOTLB: by the time the walk is done,
    // the entries of the pages in the middle are evicted (whatever the eviction order, only
    // 16 of the request's 45 pages fit), their translations kept in the chain's segments.
    let data = pattern(6, 40 * PAGE as usize);
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &data, 0);
    let d = d.unwrap();
    gate.arm(Stop::InServe);
    f.submit(0, &[h, d, st]);
    gate.wait_stopped(&mut f);

    // The IOMMU side remaps data page 20 to another guest page while the write is in flight.
    let sent = remap(&mut f, d.iova + 20 * PAGE);
    assert!(
        !f.reply_within(Duration::from_millis(300)),
        "the remap was acknowledged while a request holding the old translation was in flight"
    );
    gate.release();
    f.conn.recv_ack(&sent).unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1);
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);

    // An UPDATE of bytes nobody ever had mapped waits for nothing, even while a request is in
    // flight.
    let (h, d, st) = blk_request(&mut f, VIRTIO_BLK_T_OUT, 0, &pattern(1, 512), 0);
    gate.arm(Stop::InServe);
    f.submit(0, &[h, d.unwrap(), st]);
    gate.wait_stopped(&mut f);
    let sent = remap(&mut f, 0x6000_0000_0000);
    f.conn
        .socket()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let acked = f.conn.recv_ack(&sent);
    gate.release();
    acked.expect("an UPDATE of fresh bytes waited for the request in flight");
    f.wait_used(0, 1, Duration::from_secs(10));
    drop(f);
    t.join().unwrap();
    assert!(s.stats().evictions > 20, "{}", s.stats());
}
