//! Raw `vhost_msg` / `vhost_msg_v2` bytes for the cases that test how the kernel takes what
//! it is written (sizes, bad types, size-0 and overflowing INVALIDATEs, v1 on a v2 device)
//! and for UPDATEs written behind the vIOMMU's back. Layouts, type and permission values
//! come from `wire`; this file only fills them in.
//!
//! Not the IOTLB protocol: answering MISSes and forwarding unmaps is `frontend::kernel`'s
//! job, and nothing here may be used for it.

use wire::linux::{encode_raw, MsgFormat};
use wire::VhostIotlbMsg;

use crate::error::KernelNetError;

pub use wire::iotlb_msg::access::RO;
pub use wire::iotlb_msg::iotlb_type::{INVALIDATE, MISS, UPDATE};
pub use wire::linux::{VHOST_MSG_MIN_SIZE, VHOST_MSG_SIZE};

/// Message formats: a `vhost_msg_v2` (what the device negotiated) or a v1 `vhost_msg`.
pub const V2: MsgFormat = MsgFormat::V2;
/// A v1 `vhost_msg`.
pub const V1: MsgFormat = MsgFormat::V1;

/// A raw message in `fmt`, address space 0: the type word, then the iotlb payload with
/// `iova`, `size`, `uaddr`, `perm`, `ty`, as given (unvalidated); zero elsewhere.
pub fn raw(fmt: MsgFormat, ty: u8, iova: u64, size: u64, uaddr: u64, perm: u8) -> [u8; 72] {
    encode_raw(&VhostIotlbMsg::raw(ty, iova, size, uaddr, perm), 0, fmt)
}

/// What a whole-message write must return.
pub fn expect_whole(what: &str, r: Result<usize, rustix::io::Errno>) -> Result<(), KernelNetError> {
    match r {
        Ok(VHOST_MSG_SIZE) => Ok(()),
        got => Err(KernelNetError::WriteAnswer {
            what: what.into(),
            got,
            expected: Ok(VHOST_MSG_SIZE),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the cases compare the kernel's MISS with, laid out by hand.
    #[test]
    fn raw_v2_miss_layout() {
        let m = raw(V2, MISS, 0x1234, 0, 0, RO);
        let mut want = [0u8; 72];
        want[0..4].copy_from_slice(&2u32.to_ne_bytes());
        want[8..16].copy_from_slice(&0x1234u64.to_ne_bytes());
        want[32] = 1;
        want[33] = 1;
        assert_eq!(m, want);
        let v1 = raw(V1, INVALIDATE, 0x1000, 0x1000, 0, 0);
        assert_eq!(v1[0..4], 1u32.to_ne_bytes());
        assert_eq!(v1[33], 3);
    }
}
