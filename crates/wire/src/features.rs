//! Feature negotiation: virtio device feature bits, vhost-user protocol features, Linux vhost
//! backend features, and the rules that tie IOMMU support to them.
//!
//! There is no IOTLB protocol feature in vhost-user. A back-end supports a device behind an
//! IOMMU by offering `VIRTIO_F_ACCESS_PLATFORM` together with the protocol features
//! `REPLY_ACK` (the front-end waits for each IOTLB_MSG to be acknowledged) and `BACKEND_REQ`
//! (the channel misses go out on); QEMU refuses a back-end that offers the first without both
//! of the others. [`check_iommu_offer`] enforces that on what we offer, [`iommu_negotiated`]
//! tells whether a connection runs with the IOTLB. Pure functions; no I/O.

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Device feature bits used across the project, as masks.
pub mod device {
    use super::*;
    /// `VIRTIO_F_VERSION_1` (bit 32).
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// `VIRTIO_F_ACCESS_PLATFORM` (bit 33): addresses are IOVAs, translated by an IOMMU.
    pub const ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
    /// `VIRTIO_RING_F_INDIRECT_DESC` (bit 28).
    pub const RING_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_RING_F_EVENT_IDX` (bit 29).
    pub const RING_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): protocol features may be negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// `VHOST_F_LOG_ALL` (bit 26): dirty logging for migration.
    pub const LOG_ALL: u64 = 1 << 26;
}

/// vhost-user protocol feature bits (`VHOST_USER_PROTOCOL_F_*`), as masks.
pub mod protocol {
    /// Multiple queues (bit 0).
    pub const MQ: u64 = 1 << 0;
    /// Dirty log in shared memory (bit 1).
    pub const LOG_SHMFD: u64 = 1 << 1;
    /// RARP after migration (bit 2).
    pub const RARP: u64 = 1 << 2;
    /// NEED_REPLY is honoured with a status (bit 3).
    pub const REPLY_ACK: u64 = 1 << 3;
    /// Net MTU (bit 4).
    pub const MTU: u64 = 1 << 4;
    /// The back-end channel (bit 5).
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// Cross-endian rings (bit 6).
    pub const CROSS_ENDIAN: u64 = 1 << 6;
    /// Crypto sessions (bit 7).
    pub const CRYPTO_SESSION: u64 = 1 << 7;
    /// Postcopy page faults (bit 8).
    pub const PAGEFAULT: u64 = 1 << 8;
    /// GET/SET_CONFIG (bit 9).
    pub const CONFIG: u64 = 1 << 9;
    /// Descriptors on the back-end channel (bit 10).
    pub const BACKEND_SEND_FD: u64 = 1 << 10;
    /// Host notifiers (bit 11).
    pub const HOST_NOTIFIER: u64 = 1 << 11;
    /// Inflight tracking (bit 12).
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    /// RESET_DEVICE (bit 13).
    pub const RESET_DEVICE: u64 = 1 << 13;
    /// In-band notifications (bit 14).
    pub const INBAND_NOTIFICATIONS: u64 = 1 << 14;
    /// ADD/REM_MEM_REG and GET_MAX_MEM_SLOTS (bit 15).
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// SET/GET_STATUS (bit 16).
    pub const STATUS: u64 = 1 << 16;
    /// Xen mmap (bit 17).
    pub const XEN_MMAP: u64 = 1 << 17;
    /// Shared objects (bit 18).
    pub const SHARED_OBJECT: u64 = 1 << 18;
    /// Device state transfer (bit 19).
    pub const DEVICE_STATE: u64 = 1 << 19;
    /// GET_VRING_BASE reports inflight descriptors (bit 20).
    pub const GET_VRING_BASE_INFLIGHT: u64 = 1 << 20;
    /// Addresses are guest-physical (bit 21).
    pub const GPA_ADDRESSES: u64 = 1 << 21;
    /// Shared memory regions (bit 22).
    pub const SHMEM: u64 = 1 << 22;
}

/// Linux vhost backend features (`VHOST_BACKEND_F_*`), as masks for
/// `VHOST_GET/SET_BACKEND_FEATURES`.
pub mod backend {
    /// `struct vhost_msg_v2` on the fd (bit 1).
    pub const IOTLB_MSG_V2: u64 = 1 << 1;
    /// BATCH_BEGIN/BATCH_END (bit 2, vDPA only).
    pub const IOTLB_BATCH: u64 = 1 << 2;
    /// Address space ids (bit 3, vDPA only).
    pub const IOTLB_ASID: u64 = 1 << 3;
}

/// Why a feature offer or negotiation is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// ACCESS_PLATFORM is offered without the protocol features the IOTLB needs.
    #[error(
        "VIRTIO_F_ACCESS_PLATFORM offered without protocol features {missing:#x} \
         (an IOMMU-capable back-end needs PROTOCOL_FEATURES, REPLY_ACK and BACKEND_REQ)"
    )]
    IommuWithoutChannel {
        /// The protocol feature masks (and PROTOCOL_FEATURES, as bit 30) that are missing.
        missing: u64,
    },
    /// The peer acked features that were not offered.
    #[error("acked features {extra:#x} were never offered")]
    NotOffered {
        /// The extra bits.
        extra: u64,
    },
}

/// Check what a back-end offers: with ACCESS_PLATFORM, it must offer PROTOCOL_FEATURES (so that
/// protocol features exist at all), REPLY_ACK and BACKEND_REQ.
pub fn check_iommu_offer(
    device_features: u64,
    protocol_features: u64,
) -> Result<(), NegotiationError> {
    if device_features & device::ACCESS_PLATFORM == 0 {
        return Ok(());
    }
    let mut missing = 0;
    if device_features & device::PROTOCOL_FEATURES == 0 {
        missing |= device::PROTOCOL_FEATURES;
    }
    missing |= (protocol::REPLY_ACK | protocol::BACKEND_REQ) & !protocol_features;
    if missing == 0 {
        Ok(())
    } else {
        Err(NegotiationError::IommuWithoutChannel { missing })
    }
}

/// Check that `acked` only holds bits of `offered`.
pub fn check_acked(offered: u64, acked: u64) -> Result<(), NegotiationError> {
    match acked & !offered {
        0 => Ok(()),
        extra => Err(NegotiationError::NotOffered { extra }),
    }
}

/// Whether a connection with these acked features runs behind the IOMMU: ACCESS_PLATFORM was
/// acked and the channel the IOTLB needs is there.
pub fn iommu_negotiated(acked_features: u64, acked_protocol: u64) -> bool {
    acked_features & device::ACCESS_PLATFORM != 0
        && acked_protocol & protocol::REPLY_ACK != 0
        && acked_protocol & protocol::BACKEND_REQ != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_numbers() {
        assert_eq!(device::VERSION_1, 1 << 32);
        assert_eq!(device::ACCESS_PLATFORM, 1 << 33);
        assert_eq!(protocol::REPLY_ACK, 0x8);
        assert_eq!(protocol::BACKEND_REQ, 0x20);
        assert_eq!(protocol::CONFIG, 0x200);
        assert_eq!(protocol::CONFIGURE_MEM_SLOTS, 0x8000);
        assert_eq!(protocol::STATUS, 0x1_0000);
        assert_eq!(backend::IOTLB_MSG_V2, 0x2);
    }

    #[test]
    fn iommu_offer_needs_the_channel() {
        let all = protocol::REPLY_ACK | protocol::BACKEND_REQ;
        let feats = device::ACCESS_PLATFORM | device::PROTOCOL_FEATURES | device::VERSION_1;
        assert_eq!(check_iommu_offer(feats, all), Ok(()));
        assert_eq!(check_iommu_offer(device::VERSION_1, 0), Ok(()));
        assert_eq!(
            check_iommu_offer(feats, protocol::REPLY_ACK),
            Err(NegotiationError::IommuWithoutChannel {
                missing: protocol::BACKEND_REQ
            })
        );
        assert_eq!(
            check_iommu_offer(device::ACCESS_PLATFORM, all),
            Err(NegotiationError::IommuWithoutChannel {
                missing: device::PROTOCOL_FEATURES
            })
        );
        assert!(iommu_negotiated(feats, all));
        assert!(!iommu_negotiated(feats, protocol::REPLY_ACK));
        assert!(!iommu_negotiated(device::VERSION_1, all));
        assert_eq!(check_acked(0b1010, 0b0010), Ok(()));
        assert_eq!(
            check_acked(0b1010, 0b0110),
            Err(NegotiationError::NotOffered { extra: 0b0100 })
        );
    }
}
