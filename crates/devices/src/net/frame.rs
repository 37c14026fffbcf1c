//! virtio-net's frame-level facts, for the net device on the engine: the per-packet header
//! (`virtio_net_hdr_v1`, 12 bytes under `VIRTIO_F_VERSION_1`), the config space, where the
//! rx, tx and control queues sit, the control queue's commands, and the loopback's MAC swap.
//!
//! Everything here works on bytes the caller copied out of, or will copy into, guest memory
//! through vm-memory: nothing here reads guest memory, and nothing trusts a length or a
//! count it is given (a short header or command is an error, not a panic).

use virtio_bindings::virtio_net as vn;

/// Bytes of `virtio_net_hdr_v1`, the header before every frame on rx and tx with
/// `VIRTIO_F_VERSION_1` (`num_buffers` included, with or without `MRG_RXBUF`).
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header: how many rx chains a merged frame took.
const NUM_BUFFERS_AT: usize = 10;
/// Bytes of the config space we expose: `mac[6]`, `status`, `max_virtqueue_pairs`, `mtu`
/// (each le16).
pub const CONFIG_LEN: usize = 12;
/// Ethernet addresses: destination, then source.
pub const MAC_LEN: usize = 6;
/// Most queue pairs (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`); with a control queue, a device
/// offers one fewer (its queue count, `2 * pairs + 1`, must fit 16 bits).
pub const MAX_PAIRS: u16 = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX as u16;

/// The header of a received frame with no offloads: only `num_buffers` set.
pub fn rx_header(num_buffers: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[NUM_BUFFERS_AT..].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

/// A transmitted frame's header, as far as a device without offloads reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHeader {
    /// `flags` (`VIRTIO_NET_HDR_F_NEEDS_CSUM` and others).
    pub flags: u8,
    /// `gso_type`: `VIRTIO_NET_HDR_GSO_NONE` (0) unless a GSO feature was negotiated.
    pub gso_type: u8,
}

/// Why a header or a control command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: {got} bytes, at least {need} needed")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes there were.
        got: usize,
        /// Bytes it needs.
        need: usize,
    },
    /// A frame offloaded (its `gso_type`) to a device that offered no offload.
    #[error("tx header asks for segmentation (gso_type {0}), which was not negotiated")]
    Gso(u8),
    /// A control command this device does not know.
    #[error("control command class {class} command {command} not supported")]
    Unsupported {
        /// Its class.
        class: u8,
        /// Its command.
        command: u8,
    },
    /// `VQ_PAIRS_SET` outside 1..=the pairs offered.
    #[error("{asked} queue pairs asked for, 1 to {offered} offered")]
    Pairs {
        /// Pairs the driver asked for.
        asked: u16,
        /// Pairs the device offers.
        offered: u16,
    },
}

impl TxHeader {
    /// Parse the first [`HEADER_LEN`] bytes of a transmitted chain. A device that offered
    /// no GSO feature refuses a segmentation request (the frame would be sent wrong).
    pub fn parse(bytes: &[u8]) -> Result<Self, NetError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(NetError::Short {
                what: "tx header",
                got: bytes.len(),
                need: HEADER_LEN,
            });
        };
        let header = TxHeader {
            flags: h[0],
            gso_type: h[1],
        };
        if header.gso_type != vn::VIRTIO_NET_HDR_GSO_NONE as u8 {
            return Err(NetError::Gso(header.gso_type));
        }
        Ok(header)
    }
}

/// The config space: `mac`, link status (up), `max_virtqueue_pairs` and `mtu`.
pub fn config(mac: [u8; MAC_LEN], pairs: u16, mtu: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..MAC_LEN].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// What a queue index is, for a device of `pairs` queue pairs with a control queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Receive queue of pair `n` (index `2n`).
    Rx(u16),
    /// Transmit queue of pair `n` (index `2n + 1`).
    Tx(u16),
    /// The control queue (index `2 * pairs`).
    Ctrl,
}

/// The role of queue `index` of a device of `pairs` pairs (`None`: past the control queue).
pub fn queue_role(index: u16, pairs: u16) -> Option<QueueRole> {
    let data = u32::from(pairs) * 2;
    match u32::from(index) {
        i if i < data && i % 2 == 0 => Some(QueueRole::Rx(index / 2)),
        i if i < data => Some(QueueRole::Tx(index / 2)),
        i if i == data => Some(QueueRole::Ctrl),
        _ => None,
    }
}

/// A control-queue command the device acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlCommand {
    /// `VIRTIO_NET_CTRL_MQ` / `VQ_PAIRS_SET`: use this many pairs.
    SetPairs(u16),
    /// `VIRTIO_NET_CTRL_RX` (promiscuous, all-multicast, ...): nothing to filter in a
    /// loopback or a tap, acknowledged.
    RxMode,
}

/// Parse a control command (`class`, `command`, then its data: the chain's readable bytes)
/// for a device of `offered` pairs.
pub fn parse_ctrl(bytes: &[u8], offered: u16) -> Result<CtrlCommand, NetError> {
    let short = |need| NetError::Short {
        what: "control command",
        got: bytes.len(),
        need,
    };
    let (&class, &command) = match bytes {
        [class, command, ..] => (class, command),
        _ => return Err(short(2)),
    };
    match (u32::from(class), u32::from(command)) {
        (vn::VIRTIO_NET_CTRL_MQ, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            let Some(&[lo, hi]) = bytes.get(2..4) else {
                return Err(short(4));
            };
            let asked = u16::from_le_bytes([lo, hi]);
            if asked == 0 || asked > offered {
                return Err(NetError::Pairs { asked, offered });
            }
            Ok(CtrlCommand::SetPairs(asked))
        }
        (vn::VIRTIO_NET_CTRL_RX, _) => Ok(CtrlCommand::RxMode),
        _ => Err(NetError::Unsupported { class, command }),
    }
}

/// The control queue's answer byte: `VIRTIO_NET_OK` or `VIRTIO_NET_ERR`.
pub fn ctrl_ack(ok: bool) -> u8 {
    if ok {
        vn::VIRTIO_NET_OK as u8
    } else {
        vn::VIRTIO_NET_ERR as u8
    }
}

/// Swap a frame's destination and source MAC addresses in place (what the loopback does to
/// each frame, as testpmd's `macswap`). A frame shorter than the two addresses is left as
/// it is and reported (false).
pub fn swap_macs(frame: &mut [u8]) -> bool {
    let Some(addrs) = frame.get_mut(..2 * MAC_LEN) else {
        return false;
    };
    let (dst, src) = addrs.split_at_mut(MAC_LEN);
    dst.swap_with_slice(src);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_carries_num_buffers_at_offset_10() {
        let h = rx_header(0x0302);
        assert_eq!(h.len(), std::mem::size_of::<vn::virtio_net_hdr_v1>());
        assert_eq!(h[..10], [0; 10]);
        assert_eq!(h[10..], [2, 3]);
    }

    #[test]
    fn tx_headers_are_checked() {
        let mut h = [0u8; HEADER_LEN];
        h[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        assert_eq!(
            TxHeader::parse(&h),
            Ok(TxHeader {
                flags: 1,
                gso_type: 0
            })
        );
        h[1] = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        assert_eq!(TxHeader::parse(&h), Err(NetError::Gso(1)));
        assert!(matches!(
            TxHeader::parse(&h[..11]),
            Err(NetError::Short {
                got: 11,
                need: 12,
                ..
            })
        ));
    }

    #[test]
    fn config_layout_is_the_specs() {
        let c = config([1, 2, 3, 4, 5, 6], 4, 1500);
        // mac, status (LINK_UP), max_virtqueue_pairs, mtu: the fields of virtio_net_config.
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 1, 0, 4, 0, 0xdc, 0x05]);
        assert_eq!(std::mem::offset_of!(vn::virtio_net_config, mtu), 10);
    }

    #[test]
    fn queues_are_rx_tx_pairs_then_control() {
        assert_eq!(queue_role(0, 2), Some(QueueRole::Rx(0)));
        assert_eq!(queue_role(1, 2), Some(QueueRole::Tx(0)));
        assert_eq!(queue_role(3, 2), Some(QueueRole::Tx(1)));
        assert_eq!(queue_role(4, 2), Some(QueueRole::Ctrl));
        assert_eq!(queue_role(5, 2), None);
        // 32768 pairs fill every u16 index with data queues: the control queue would be
        // queue 65536, so a device offers at most MAX_PAIRS - 1 pairs with it.
        assert_eq!(
            queue_role(u16::MAX, MAX_PAIRS),
            Some(QueueRole::Tx(MAX_PAIRS - 1))
        );
        assert_eq!(
            queue_role(u16::MAX - 1, MAX_PAIRS - 1),
            Some(QueueRole::Ctrl)
        );
        assert_eq!(queue_role(u16::MAX, MAX_PAIRS - 1), None);
    }

    #[test]
    fn control_commands_are_parsed_and_bounded() {
        let mq = vn::VIRTIO_NET_CTRL_MQ as u8;
        assert_eq!(parse_ctrl(&[mq, 0, 2, 0], 4), Ok(CtrlCommand::SetPairs(2)));
        assert_eq!(
            parse_ctrl(&[mq, 0, 5, 0], 4),
            Err(NetError::Pairs {
                asked: 5,
                offered: 4
            })
        );
        assert!(matches!(
            parse_ctrl(&[mq, 0, 0, 0], 4),
            Err(NetError::Pairs { asked: 0, .. })
        ));
        assert!(matches!(
            parse_ctrl(&[mq, 0, 1], 4),
            Err(NetError::Short { need: 4, .. })
        ));
        assert!(matches!(
            parse_ctrl(&[mq], 4),
            Err(NetError::Short { need: 2, .. })
        ));
        assert_eq!(
            parse_ctrl(&[vn::VIRTIO_NET_CTRL_RX as u8, 0, 1], 1),
            Ok(CtrlCommand::RxMode)
        );
        assert_eq!(
            parse_ctrl(&[9, 9], 1),
            Err(NetError::Unsupported {
                class: 9,
                command: 9
            })
        );
        assert_eq!(ctrl_ack(true), 0);
        assert_eq!(ctrl_ack(false), 1);
    }

    #[test]
    fn macswap_swaps_the_addresses_only() {
        let mut f: Vec<u8> = (0..20).collect();
        assert!(swap_macs(&mut f));
        assert_eq!(f[..12], [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]);
        assert_eq!(f[12..], (12..20).collect::<Vec<u8>>()[..]);
        let mut short = [1u8; 11];
        assert!(!swap_macs(&mut short));
        assert_eq!(short, [1; 11]);
    }
}
