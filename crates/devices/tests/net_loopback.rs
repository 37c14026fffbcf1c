//! virtio-net's loopback over real sockets, behind the IOMMU and without: every frame sent
//! on a transmit queue comes back on the pair's receive queue, byte for byte with its MAC
//! addresses swapped, in order, none lost; with `MRG_RXBUF` a large frame spreads over
//! several receive chains published together; a transmit queue whose receive side is full
//! waits instead of dropping; a receive ring that runs out midway through a frame gives
//! every chain back and delivers the frame whole later; a receive buffer the IOMMU maps
//! read-only is given back empty and the frame goes to the next; a frame the device cannot
//! send (shorter than its header, asking for segmentation) is dropped and counted, and its
//! buffer given back. And the tap link, over a real tap interface: a datagram each way.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server};
use common::{connect, Frontend};
use devices::net::{HEADER_LEN, PAIR_FRAMES};
use devices::{Net, NetConfig};
use iotlb::Perm;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtq::testing::{Buf, PAGE};

const RX: usize = 0;
const TX: usize = 1;
const WAIT: Duration = Duration::from_secs(20);

fn server(capacity: usize) -> (Arc<Server<Net>>, Arc<devices::NetStats>) {
    let net = Net::loopback(NetConfig::default());
    let stats = net.stats().clone();
    let engine = EngineConfig {
        iotlb_capacity: capacity,
        ..EngineConfig::default()
    };
    (Arc::new(Server::new(net, engine)), stats)
}

/// Connect with 3 queues (rx, tx, control) of `size`, acking `MRG_RXBUF` or not.
fn frontend(s: &Arc<Server<Net>>, iommu: bool, merge: bool, size: u16) -> Frontend {
    let (sock, _t) = connect(s);
    let mut mask = 0xffff;
    if !merge {
        mask &= !(1u64 << VIRTIO_NET_F_MRG_RXBUF);
    }
    Frontend::connect_acking(sock, 3, size, iommu, 7, mask)
}

/// Frame `seq` of `len` bytes: destination and source MACs, ethertype 0x88b5, the sequence
/// number, then bytes that differ with it.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seq) as u8;
    }
    f
}

fn swapped(f: &[u8]) -> Vec<u8> {
    let mut g = f.to_vec();
    let (d, s) = g[..12].split_at_mut(6);
    d.swap_with_slice(s);
    g
}

/// The guest side of one pair: tx buffers in flight, rx buffers posted by head, and what
/// came back.
struct Pair {
    f: Frontend,
    rx_bufs: HashMap<u16, Buf>,
    rx_len: u32,
    /// Received data of a merged frame still missing chains: the bytes and chains to come.
    partial: Option<(Vec<u8>, u16)>,
    got: Vec<Vec<u8>>,
    tx_done: usize,
}

impl Pair {
    fn new(f: Frontend, rx_len: u32) -> Self {
        Pair {
            f,
            rx_bufs: HashMap::new(),
            rx_len,
            partial: None,
            got: Vec::new(),
            tx_done: 0,
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let b = self.f.buf(self.rx_len, true);
            let head = self.f.submit(RX, &[b]);
            self.rx_bufs.insert(head, b);
        }
    }

    fn send(&mut self, data: &[u8]) {
        let hdr = self.f.buf(HEADER_LEN as u32, false);
        self.f
            .space
            .write(&self.f.mem, hdr.iova, &[0u8; HEADER_LEN]);
        let body = self.f.buf(data.len() as u32, false);
        self.f.space.write(&self.f.mem, body.iova, data);
        self.f.submit(TX, &[hdr, body]);
    }

    /// Take what the device completed; re-post each rx buffer used (when `repost`).
    fn collect(&mut self, repost: bool) {
        self.f.serve_misses();
        let tx = self.f.take_used(TX);
        assert!(
            tx.iter().all(|&(_, len)| len == 0),
            "tx used length is 0: {tx:?}"
        );
        self.tx_done += tx.len();
        let mut spent = Vec::new();
        for (head, len) in self.f.take_used(RX) {
            let b = self.rx_bufs.remove(&head).expect("a posted rx head");
            let bytes = self.f.space.read(&self.f.mem, b.iova, len as usize);
            match self.partial.take() {
                None => {
                    assert!(bytes.len() >= HEADER_LEN, "rx used length {len} < header");
                    let n = u16::from_le_bytes([bytes[10], bytes[11]]);
                    assert!(n >= 1, "num_buffers is at least 1");
                    let data = bytes[HEADER_LEN..].to_vec();
                    if n == 1 {
                        self.got.push(data);
                    } else {
                        self.partial = Some((data, n - 1));
                    }
                }
                Some((mut data, left)) => {
                    data.extend_from_slice(&bytes);
                    if left == 1 {
                        self.got.push(data);
                    } else {
                        self.partial = Some((data, left - 1));
                    }
                }
            }
            spent.push(b);
        }
        // After every entry was read: a head freed by this batch may be reused at once.
        if repost {
            for b in spent {
                let head = self.f.submit(RX, &[b]);
                self.rx_bufs.insert(head, b);
            }
        }
    }

    fn wait_for(&mut self, frames: usize, tx: usize) {
        let end = Instant::now() + WAIT;
        while self.got.len() < frames || self.tx_done < tx {
            assert!(
                Instant::now() < end,
                "got {} of {frames} frames, {} of {tx} tx completions",
                self.got.len(),
                self.tx_done
            );
            self.collect(true);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn round_trip(iommu: bool, merge: bool, capacity: usize) {
    let (s, stats) = server(capacity);
    // Without MRG_RXBUF a buffer holds the largest frame; with it, a page each.
    let rx_len = if merge { 1536 } else { 9100 };
    let mut p = Pair::new(frontend(&s, iommu, merge, 256), rx_len);
    p.post_rx(64);
    let lens = [60usize, 64, 1514, 1515, 4000, 9000, 8999, 100];
    let sent: Vec<Vec<u8>> = (0..48u32)
        .map(|i| frame(i, lens[i as usize % lens.len()]))
        .collect();
    for chunk in sent.chunks(16) {
        for f in chunk {
            p.send(f);
        }
        p.wait_for(p.got.len() + chunk.len(), p.tx_done + chunk.len());
    }
    assert_eq!(p.got.len(), sent.len());
    for (i, (got, want)) in p.got.iter().zip(&sent).enumerate() {
        assert!(
            got == &swapped(want),
            "frame {i} (len {}) came back changed ({} bytes)",
            want.len(),
            got.len()
        );
    }
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
    let merged = stats.rx_merged.load(Ordering::Relaxed);
    if merge {
        assert!(
            merged >= 18,
            "large frames spread over several chains: {merged}"
        );
    } else {
        assert_eq!(merged, 0);
    }
}

#[test]
fn frames_come_back_byte_for_byte_behind_the_iommu() {
    round_trip(true, false, 256);
}

#[test]
fn merged_frames_come_back_byte_for_byte_behind_the_iommu() {
    round_trip(true, true, 256);
}

#[test]
fn frames_come_back_byte_for_byte_without_an_iommu() {
    round_trip(false, false, 256);
    round_trip(false, true, 256);
}

#[test]
fn merged_frames_come_back_with_the_smallest_iotlb() {
    round_trip(true, true, backend::MIN_IOTLB_CAPACITY);
}

#[test]
fn a_full_receive_side_holds_transmit_back_instead_of_dropping() {
    let (s, stats) = server(256);
    let mut p = Pair::new(frontend(&s, true, false, 1024), 2048);
    let total = PAIR_FRAMES + 200;
    let sent: Vec<Vec<u8>> = (0..total as u32).map(|i| frame(i, 200)).collect();
    for f in &sent {
        p.send(f);
    }
    // No receive buffers: the pair fills up, and transmit stops there.
    let end = Instant::now() + WAIT;
    // The pair's frames, and the one the receive handler took to deliver.
    let held = PAIR_FRAMES + 1;
    while p.tx_done < held {
        assert!(Instant::now() < end, "tx completions: {}", p.tx_done);
        p.collect(false);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(100));
    p.collect(false);
    assert_eq!(p.tx_done, held, "transmit waits for room, it does not drop");
    assert!(p.got.is_empty());
    p.post_rx(128);
    p.wait_for(total, total);
    for (i, (got, want)) in p.got.iter().zip(&sent).enumerate() {
        assert!(got == &swapped(want), "frame {i}");
    }
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn a_frame_the_ring_cannot_hold_yet_waits_whole() {
    let (s, stats) = server(256);
    let mut p = Pair::new(frontend(&s, true, true, 256), 1536);
    // 9000 bytes and a header need 6 chains of 1536; 3 are there.
    p.post_rx(3);
    let want = frame(1, 9000);
    p.send(&want);
    let end = Instant::now() + WAIT;
    while p.tx_done < 1 {
        assert!(Instant::now() < end);
        p.collect(false);
    }
    std::thread::sleep(Duration::from_millis(100));
    p.collect(false);
    assert!(
        p.got.is_empty() && p.partial.is_none(),
        "no chain of a partial frame is published"
    );
    assert!(stats.rx_retries.load(Ordering::Relaxed) >= 1);
    p.post_rx(3);
    p.wait_for(1, 1);
    assert!(p.got[0] == swapped(&want), "the frame came back changed");
    assert_eq!(stats.rx_merged.load(Ordering::Relaxed), 1);
}

#[test]
fn a_read_only_receive_buffer_is_given_back_empty_and_the_frame_goes_on() {
    let (s, stats) = server(256);
    let mut p = Pair::new(frontend(&s, true, false, 256), 2048);
    // A buffer the IOMMU lets the device read only.
    let iova = 0x30_0000_0000;
    p.f.space.map_new(&mut p.f.alloc, iova, 1, Perm::ReadOnly);
    let bad = Buf {
        iova,
        len: PAGE as u32,
        write: true,
    };
    let bad_head = p.f.submit(RX, &[bad]);
    p.post_rx(1);
    let want = frame(9, 1000);
    p.send(&want);
    let end = Instant::now() + WAIT;
    let mut bad_len = None;
    while p.got.is_empty() {
        assert!(Instant::now() < end, "the frame did not arrive");
        p.f.serve_misses();
        for (head, len) in p.f.take_used(RX) {
            if head == bad_head {
                bad_len = Some(len);
            } else {
                let b = p.rx_bufs[&head];
                let bytes = p.f.space.read(&p.f.mem, b.iova, len as usize);
                p.got.push(bytes[HEADER_LEN..].to_vec());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        bad_len,
        Some(0),
        "the denied buffer is completed with nothing written"
    );
    assert!(p.got[0] == swapped(&want), "the frame came back changed");
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(
        p.f.access_fails.len(),
        1,
        "the front-end heard of the denied write"
    );
}

#[test]
fn a_frame_the_device_cannot_send_is_dropped_counted_and_its_buffer_given_back() {
    let (s, stats) = server(256);
    let mut p = Pair::new(frontend(&s, true, false, 256), 2048);
    p.post_rx(4);
    // Shorter than its header.
    let short = p.f.buf(8, false);
    p.f.submit(TX, &[short]);
    // A header asking for segmentation (gso_type TCPV4), which was not offered.
    let hdr = p.f.buf(HEADER_LEN as u32, false);
    let mut h = [0u8; HEADER_LEN];
    h[1] = 1;
    p.f.space.write(&p.f.mem, hdr.iova, &h);
    let body = p.f.buf(100, false);
    p.f.space.write(&p.f.mem, body.iova, &frame(1, 100));
    p.f.submit(TX, &[hdr, body]);
    // Then a good one, which must come back alone.
    let good = frame(2, 100);
    p.send(&good);
    p.wait_for(1, 3);
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 2);
    assert!(p.got[0] == swapped(&good));
    std::thread::sleep(Duration::from_millis(100));
    p.collect(true);
    assert_eq!(p.got.len(), 1, "nothing else was delivered");
}

/// A UDP datagram from `src` to `dst` (port 4000 to `port`) in an Ethernet frame from
/// `smac` to `dmac` (IPv4 header checksummed, UDP checksum left out, as IPv4 allows).
fn udp_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

/// The tap link over a real tap interface in this (test) host's network namespace, with
/// an address of its own: a UDP datagram the guest transmits reaches a host socket, and
/// one the host sends arrives on the receive queue, byte for byte. Needs root and
/// /dev/net/tun, as the test suite's CI has.
#[test]
fn a_tap_carries_frames_both_ways() {
    let pid = std::process::id();
    let name = format!("vhit{}", pid % 100_000);
    let subnet = (pid % 250) as u8 + 1;
    let (host, guest) = ([10, 78, subnet, 1], [10, 78, subnet, 2]);
    let tap = devices::net::Tap::open(&name).expect("open a tap: root and /dev/net/tun needed");
    let net = Net::tap(NetConfig::default(), tap).unwrap();
    let stats = net.stats().clone();
    let s = Arc::new(Server::new(net, EngineConfig::default()));
    let mut p = Pair::new(frontend(&s, true, false, 256), 9100);
    p.post_rx(16);
    let host_ip = std::net::Ipv4Addr::from(host);
    let guest_ip = std::net::Ipv4Addr::from(guest);
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    let guest_mac = NetConfig::default().mac;
    let mac_text = guest_mac.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "neigh",
        "replace",
        &guest_ip.to_string(),
        "lladdr",
        &mac_text,
        "dev",
        &name,
    ]);
    let tap_mac: Vec<u8> = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .unwrap()
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let sock = std::net::UdpSocket::bind((host_ip, 0)).unwrap();
    sock.set_nonblocking(true).unwrap();
    let port = sock.local_addr().unwrap().port();

    // Guest to host.
    let out = b"from the guest, through the tap";
    p.send(&udp_frame(
        tap_mac.clone().try_into().unwrap(),
        guest_mac,
        guest,
        host,
        port,
        out,
    ));
    let mut buf = [0u8; 256];
    let end = Instant::now() + WAIT;
    // The device may be waiting on a MISS, which the test front-end serves in `collect`.
    let (n, from) = loop {
        p.collect(true);
        match sock.recv_from(&mut buf) {
            Ok(r) => break r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("receiving on the host: {e}"),
        }
        assert!(
            Instant::now() < end,
            "the datagram never reached the host: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(&buf[..n], out);
    assert_eq!(from, std::net::SocketAddr::from((guest_ip, 4000)));

    // Host to guest: the kernel sends it out of the tap (the neighbour entry says where).
    let back = b"from the host, into the receive queue";
    sock.send_to(back, (guest_ip, 4000)).unwrap();
    let end = Instant::now() + WAIT;
    let got = loop {
        p.collect(true);
        if let Some(f) = p
            .got
            .iter()
            .find(|f| f.windows(back.len()).any(|w| w == back))
        {
            break f.clone();
        }
        assert!(
            Instant::now() < end,
            "the host's datagram never arrived: {:?}",
            p.got
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(&got[..6], &guest_mac, "to the guest's MAC");
    assert_eq!(&got[6..12], &tap_mac[..], "from the tap's");
    assert!(stats.tx_frames.load(Ordering::Relaxed) >= 1);
    assert!(stats.rx_frames.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 0);
}
