//! The test frames: what they look like (broadcast, our EtherType, a sequence number and a
//! pattern), the two source MACs that tell our TX frames from our RX ones, the vnet header
//! in front of them in guest buffers, and the poison byte. Pure data: no I/O.

/// `virtio_net_hdr_v1`: 12 bytes with VERSION_1.
pub const VNET_HDR: usize = 12;
/// The EtherType of our test frames (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// Source MAC of frames we transmit through vhost-net.
pub const SRC_TX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC of frames we inject for RX.
pub const SRC_RX: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The byte poisoned pages are filled with.
pub const POISON: u8 = 0xde;

/// A test frame: broadcast, our EtherType, `seq` and a pattern.
pub fn frame(src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq.wrapping_mul(31)) as u8);
    }
    f
}

/// Whether `f` is one of our frames from `src` (not something the stack sent).
pub fn is_ours(f: &[u8], src: [u8; 6]) -> bool {
    f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE && f[6..12] == src
}

/// The sequence number of frame `f`, if it is long enough.
pub fn seq(f: &[u8]) -> Option<u32> {
    f.get(14..18)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether `f` carries poison where its sequence number and pattern should be.
pub fn is_poisoned(f: &[u8]) -> bool {
    f.len() > 20 && f[14..20].iter().all(|&b| b == POISON)
}
