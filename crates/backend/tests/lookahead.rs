//! The MISSes a queue sends ahead for a chain longer than its look-ahead: a Linux guest
//! behind a strict IOMMU maps each 4 KiB segment of a 1 MiB request on its own, and QEMU
//! answers a page per MISS, so a chain of a few hundred buffers must be asked for in a few
//! bursts, not page by page once the first bursts are answered. The device is the engine's
//! null device; what is counted is the engine's MISSes: those the walk sent itself (each
//! costs a round trip before the walk goes on) against those sent ahead.

use std::time::Duration;

use backend::testing::{connect, null_server, status, Frontend};
use backend::EngineConfig;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

/// Data buffers of one page each: several times the look-ahead's 64 buffers per chain.
const BUFFERS: u32 = 300;

#[test]
fn a_long_chain_is_asked_for_in_bursts() {
    let s = null_server(1, EngineConfig::default());
    let (sock, t) = connect(&s);
    let mut f = Frontend::connect(sock, 1, 64, true, 23);
    let (h, _, st) = backend::testing::request(&mut f, VIRTIO_BLK_T_IN, 0, &[], 0);
    let mut bufs = vec![h];
    bufs.extend((0..BUFFERS).map(|_| f.buf(4096, true)));
    bufs.push(st);
    f.submit_indirect(0, &bufs);
    let used = f.wait_used(0, 1, Duration::from_secs(20));
    assert_eq!(used.len(), 1);
    assert_eq!(status(&f, &st), VIRTIO_BLK_S_OK as u8);
    drop(f);
    t.join().unwrap();
    let stats = s.stats();
    let by_walk = stats.misses_sent - stats.prefetched;
    eprintln!(
        "MISSes: {} sent, {} of them ahead, {by_walk} by the walk",
        stats.misses_sent, stats.prefetched
    );
    // Every page of the chain was asked for once (the rings and the indirect table too).
    assert!(stats.misses_sent >= u64::from(BUFFERS));
    // About one walk MISS per 64 buffers, plus the rings', the table's and the header's.
    // Asked for only among the first 64 buffers, the rest would be one walk MISS per page.
    assert!(
        by_walk <= 20,
        "{by_walk} MISSes sent by the walk for a chain of {BUFFERS} pages: the look-ahead \
         does not reach past the buffers it already walked"
    );
    // Each UPDATE the connection thread applied was timed (read to reply).
    assert!(s.service_time().count() >= stats.misses_sent);
}
