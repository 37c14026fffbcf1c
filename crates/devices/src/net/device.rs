//! The virtio-net device: its features and config space, and a handler per queue.
//!
//! - **Transmit** (queue `2n + 1`): the chain's readable bytes are the 12-byte header and a
//!   frame. The frame is copied out (the guest may change its buffer the moment it is
//!   completed), its MACs swapped, and queued for pair `n`'s receive queue. The chain is
//!   completed with used length 0 (nothing written). A frame the device cannot send (a
//!   header asking for segmentation, which is not offered; shorter than its header; longer
//!   than [`MAX_FRAME`]) is dropped and counted: virtio-net is lossy, a transmit completion
//!   says the buffer is given back, not that a frame arrived.
//! - **Receive** (queue `2n`): ready while a frame waits. Its chains are buffers the device
//!   fills: the header (`num_buffers` counting the chains used) and the frame. Without
//!   `MRG_RXBUF` a frame takes one chain, and a frame larger than the chain is dropped and
//!   counted (the chain stays on the ring). With it, a frame spreads over as many chains as
//!   it needs, and all of them are published at once; if the ring runs out of chains
//!   midway, or the next chain's translation is missing, every chain goes back and the
//!   frame waits. The used length is what was written: header and frame.
//! - **Control** (queue `2 * pairs`): `MQ VQ_PAIRS_SET` and `RX` modes are acknowledged
//!   (every pair is served, and there is nothing to filter); anything else gets
//!   `VIRTIO_NET_ERR`.
//!
//! A failed request (an access the IOMMU denied, a malformed chain) on the receive or
//! transmit queue is completed with used length 0 and no byte written: there is no status
//! byte in a net chain ([`QueueHandler::status_in_chain`]); a received frame is never lost
//! to one (it waits for the next chain).
//!
//! Frames go to one of two links ([`Net::loopback`], [`Net::tap`]): the loopback swaps the
//! MACs and queues the frame for the same pair's receive queue (a transmit queue whose pair
//! is full waits); the tap writes it to the interface, and its reader queues what comes in.
//!
//! Each side wakes the other on the change that makes it ready (a frame queued for an empty
//! receive side, room made on a full one): no polling between queues, no lost wake-up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backend::{Device, MoreChains, QueueHandler, QueueWakers, Served, Unreported};
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtq::Chain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wire::features::protocol;

use super::frame::{
    config, ctrl_ack, parse_ctrl, queue_role, rx_header, swap_macs, QueueRole, TxHeader,
    CONFIG_LEN, HEADER_LEN, MAC_LEN, MAX_PAIRS,
};
use super::packets::{Edge, Packets};
use super::tap::{Tap, TapError, TapLink, TapShared};

/// Largest frame sent or received (without the header): a 64 KiB IP packet and its
/// Ethernet header, as Linux's virtio-net allows with a large MTU.
pub const MAX_FRAME: usize = 65_535 + 14;

/// A net device's settings.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// Queue pairs offered (1 to [`MAX_PAIRS`]).
    pub pairs: u16,
    /// The MAC address in the config space.
    pub mac: [u8; MAC_LEN],
    /// The MTU in the config space (`VIRTIO_NET_F_MTU`).
    pub mtu: u16,
    /// Largest queue size accepted.
    pub queue_size: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            pairs: 1,
            // A locally administered unicast address.
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 9000,
            queue_size: 1024,
        }
    }
}

/// What a net device did, since it was made.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames taken from transmit queues and passed on.
    pub tx_frames: AtomicU64,
    /// Their bytes (frames, not headers).
    pub tx_bytes: AtomicU64,
    /// Transmitted frames dropped (malformed, segmentation asked for, too long).
    pub tx_dropped: AtomicU64,
    /// Frames delivered on receive queues.
    pub rx_frames: AtomicU64,
    /// Their bytes (frames, not headers).
    pub rx_bytes: AtomicU64,
    /// Of those, frames that took more than one chain (`MRG_RXBUF`).
    pub rx_merged: AtomicU64,
    /// Frames dropped on receive: larger than the chain without `MRG_RXBUF`, or a chain
    /// that could not be written.
    pub rx_dropped: AtomicU64,
    /// Receive attempts given back because the ring ran out of chains or a translation was
    /// missing midway through a merged frame (the frame waited, nothing lost).
    pub rx_retries: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// virtio-net with a loopback (every transmitted frame comes back on the same pair's
/// receive queue with its MAC addresses swapped) or a tap.
#[derive(Debug)]
pub struct Net {
    cfg: NetConfig,
    acked: AtomicU64,
    packets: Arc<Packets>,
    stats: Arc<NetStats>,
    /// The tap link, if the device has one (else: the loopback).
    tap: Option<TapLink>,
}

impl Net {
    /// A loopback device; `cfg.pairs` is brought within 1 to [`MAX_PAIRS`].
    pub fn loopback(mut cfg: NetConfig) -> Self {
        cfg.pairs = cfg.pairs.clamp(1, MAX_PAIRS);
        Net {
            packets: Arc::new(Packets::new(cfg.pairs)),
            cfg,
            acked: AtomicU64::new(0),
            stats: Arc::new(NetStats::default()),
            tap: None,
        }
    }

    /// A device whose one queue pair is linked to `tap` (`cfg.pairs` is taken as 1).
    pub fn tap(mut cfg: NetConfig, tap: Tap) -> Result<Self, TapError> {
        cfg.pairs = 1;
        let packets = Arc::new(Packets::new(1));
        let stats = Arc::new(NetStats::default());
        let link = TapLink::start(tap, packets.clone(), stats.clone())?;
        Ok(Net {
            packets,
            cfg,
            acked: AtomicU64::new(0),
            stats,
            tap: Some(link),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked.load(Ordering::SeqCst) & (1 << bit) != 0
    }
}

impl Device for Net {
    type Handler = NetQueue;

    fn features(&self) -> u64 {
        let mut f = [
            vn::VIRTIO_NET_F_MAC,
            vn::VIRTIO_NET_F_MTU,
            vn::VIRTIO_NET_F_STATUS,
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .fold(0u64, |f, bit| f | (1 << bit));
        if self.cfg.pairs > 1 {
            f |= 1 << vn::VIRTIO_NET_F_MQ;
        }
        f
    }

    fn protocol_features(&self) -> u64 {
        // Not CONFIG: QEMU keeps a vhost-user-net device's config space itself (and warns
        // about a back-end that offers it).
        protocol::MQ
    }

    fn queues(&self) -> u16 {
        2 * self.cfg.pairs + 1
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        let c = config(self.cfg.mac, self.cfg.pairs, self.cfg.mtu);
        buf.fill(0);
        let start = (offset as usize).min(CONFIG_LEN);
        let n = buf.len().min(CONFIG_LEN - start);
        buf[..n].copy_from_slice(&c[start..start + n]);
    }

    fn write_config(&self, _offset: u32, _data: &[u8]) -> bool {
        // Read-only for the driver: a VERSION_1 driver changes the MAC through the control
        // queue's MAC_ADDR_SET, which needs VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
        false
    }

    fn set_features(&self, acked: u64) {
        self.acked.store(acked, Ordering::SeqCst);
    }

    fn handler(&self, index: u16, wake: QueueWakers) -> NetQueue {
        // The engine asks only for indices below `queues()`: the last is the control queue.
        let role = queue_role(index, self.cfg.pairs).unwrap_or(QueueRole::Ctrl);
        let tap = self.tap.as_ref().map(|t| t.shared.clone());
        if let (Some(t), QueueRole::Rx(0)) = (&tap, role) {
            t.set_waker(wake.clone());
        }
        NetQueue {
            tap,
            role,
            pairs: self.cfg.pairs,
            merge: self.acked(vn::VIRTIO_NET_F_MRG_RXBUF),
            packets: self.packets.clone(),
            stats: self.stats.clone(),
            wake,
            frame: None,
            first: Chain::new(),
        }
    }
}

/// One queue's handler.
#[derive(Debug)]
pub struct NetQueue {
    role: QueueRole,
    /// The tap transmitted frames go to (else the loopback).
    tap: Option<Arc<TapShared>>,
    pairs: u16,
    merge: bool,
    packets: Arc<Packets>,
    stats: Arc<NetStats>,
    wake: QueueWakers,
    /// Receive: the frame being delivered, taken off the pair's queue.
    frame: Option<Vec<u8>>,
    /// Receive with `MRG_RXBUF`: the first chain of a frame spread over several, whose
    /// header is written last (it counts them).
    first: Chain,
}

impl NetQueue {
    /// Copy a transmitted frame out of `chain` into a buffer of `pair`'s, or say why it
    /// cannot be sent.
    fn tx_frame(&self, pair: u16, chain: &Chain, mem: &GuestMemoryMmap) -> Result<Vec<u8>, String> {
        let total = chain.readable_len() as usize;
        let len = total
            .checked_sub(HEADER_LEN)
            .filter(|&l| l <= MAX_FRAME)
            .ok_or_else(|| format!("{total} bytes: shorter than its header or too long"))?;
        let mut r = chain.reader(mem);
        let header = r
            .read_array::<HEADER_LEN>()
            .map_err(|e| format!("header unreadable: {e}"))?;
        TxHeader::parse(&header).map_err(|e| e.to_string())?;
        let mut frame = self.packets.buffer(pair);
        frame.resize(len, 0);
        if let Err(e) = r.read_exact(&mut frame) {
            self.packets.recycle(pair, frame);
            return Err(format!("frame unreadable: {e}"));
        }
        Ok(frame)
    }

    fn transmit(&mut self, pair: u16, chain: &Chain, mem: &GuestMemoryMmap) {
        let mut frame = match self.tx_frame(pair, chain, mem) {
            Ok(f) => f,
            Err(why) => {
                add(&self.stats.tx_dropped, 1);
                tracing::debug!(reason = %why, "net: tx frame dropped");
                return;
            }
        };
        let len = frame.len();
        if let Some(tap) = &self.tap {
            let sent = tap.send(&frame);
            self.packets.recycle(pair, frame);
            add(
                if sent {
                    &self.stats.tx_frames
                } else {
                    &self.stats.tx_dropped
                },
                1,
            );
            if sent {
                add(&self.stats.tx_bytes, len as u64);
            }
            return;
        }
        // Too short for two addresses: passed on as it is (a peer's problem, not ours).
        swap_macs(&mut frame);
        let (edge, queued) = self.packets.push(pair, frame);
        if queued {
            add(&self.stats.tx_frames, 1);
            add(&self.stats.tx_bytes, len as u64);
        } else {
            add(&self.stats.tx_dropped, 1);
        }
        if edge == Edge::Crossed {
            self.wake.wake(2 * pair);
        }
    }

    fn receive(
        &mut self,
        pair: u16,
        chain: &Chain,
        more: &mut dyn MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Served {
        let Some(frame) = self.frame.take() else {
            return Served::Retry;
        };
        let total = HEADER_LEN + frame.len();
        if !self.merge {
            if (chain.writable_len() as usize) < total {
                add(&self.stats.rx_dropped, 1);
                tracing::debug!(
                    frame = frame.len(),
                    buffer = chain.writable_len(),
                    "net: rx frame larger than the buffer without MRG_RXBUF; dropped"
                );
                self.packets.recycle(pair, frame);
                return Served::Retry;
            }
            let mut w = chain.writer(mem);
            let written = w
                .write_all(&rx_header(1))
                .and_then(|()| w.write_all(&frame));
            return self.delivered(pair, frame, written.is_ok(), 1, total as u32);
        }
        // Mergeable: the header in the first chain, then the frame across as many as needed.
        if (chain.writable_len() as usize) < HEADER_LEN {
            // The driver broke the spec's rule (each buffer holds at least a header): the
            // chain is given back empty, the frame waits for the next.
            self.frame = Some(frame);
            add(&self.stats.rx_retries, 1);
            return Served::Done(0);
        }
        let mut w = chain.writer(mem);
        let mut ok = w.write_all(&rx_header(1)).is_ok();
        let mut at = (w.available() as usize).min(frame.len());
        ok &= w.write_all(&frame[..at]).is_ok();
        let mut used = (HEADER_LEN + at) as u32;
        let mut chains: u16 = 1;
        while at < frame.len() && ok {
            if chains == 1 {
                self.first.clone_from(chain);
            }
            let Some(next) = more.next(used) else {
                add(&self.stats.rx_retries, 1);
                self.frame = Some(frame);
                return Served::Retry;
            };
            let mut w = next.writer(mem);
            let n = (w.available() as usize).min(frame.len() - at);
            if n == 0 {
                // An empty buffer: it counts, and the frame goes on in the next.
                used = 0;
            } else {
                ok &= w.write_all(&frame[at..at + n]).is_ok();
                used = n as u32;
            }
            at += n;
            chains = chains.saturating_add(1);
        }
        if ok && chains > 1 {
            ok = self.first.writer(mem).write_all(&rx_header(chains)).is_ok();
        }
        let last = used;
        self.delivered(pair, frame, ok, chains, last)
    }

    /// The frame was written (`ok`) over `chains` chains, the last given `last` bytes.
    fn delivered(&mut self, pair: u16, frame: Vec<u8>, ok: bool, chains: u16, last: u32) -> Served {
        if ok {
            add(&self.stats.rx_frames, 1);
            add(&self.stats.rx_bytes, frame.len() as u64);
            if chains > 1 {
                add(&self.stats.rx_merged, 1);
            }
        } else {
            // Translated and checked, yet not written: the frame is lost, the chains go back
            // saying nothing was written.
            add(&self.stats.rx_dropped, 1);
            tracing::warn!("net: rx buffer could not be written; frame dropped");
        }
        self.packets.recycle(pair, frame);
        Served::Done(if ok { last } else { 0 })
    }

    fn control(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> Result<Served, Unreported> {
        let mut cmd = [0u8; 64];
        let n = (chain.readable_len() as usize).min(cmd.len());
        let read = chain.reader(mem).read_exact(&mut cmd[..n]);
        let ok = match read
            .map_err(|e| e.to_string())
            .and_then(|()| parse_ctrl(&cmd[..n], self.pairs).map_err(|e| e.to_string()))
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "net: control command refused");
                false
            }
        };
        let Some(at) = u64::from(chain.writable_len()).checked_sub(1) else {
            return Err(Unreported);
        };
        let mut w = chain.writer(mem);
        w.skip(at)
            .and_then(|()| w.write_all(&[ctrl_ack(ok)]))
            .map(|()| Served::Done(1))
            .map_err(|_| Unreported)
    }
}

impl QueueHandler for NetQueue {
    fn serve(
        &mut self,
        chain: &Chain,
        more: &mut dyn MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Result<Served, Unreported> {
        match self.role {
            QueueRole::Tx(pair) => {
                self.transmit(pair, chain, mem);
                Ok(Served::Done(0))
            }
            QueueRole::Rx(pair) => Ok(self.receive(pair, chain, more, mem)),
            QueueRole::Ctrl => self.control(chain, mem),
        }
    }

    fn ready(&mut self) -> bool {
        match self.role {
            // A tap takes frames whenever they come.
            QueueRole::Tx(pair) => self.tap.is_some() || self.packets.has_room(pair),
            QueueRole::Rx(pair) => {
                if self.frame.is_none() {
                    if let Some((frame, edge)) = self.packets.pop(pair) {
                        self.frame = Some(frame);
                        if edge == Edge::Crossed {
                            self.wake.wake(2 * pair + 1);
                        }
                    }
                }
                self.frame.is_some()
            }
            QueueRole::Ctrl => true,
        }
    }

    fn status_in_chain(&self) -> bool {
        self.role == QueueRole::Ctrl
    }

    fn fail(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        // Only the control queue has a status byte.
        mem.write_obj(ctrl_ack(false), GuestAddress(status))
            .map(|()| 1)
            .map_err(|_| Unreported)
    }
}
