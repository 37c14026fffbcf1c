//! The frames `net-check` sends and expects back: an Ethernet header (destination, source,
//! the experimental ethertype 0x88b5), a sequence number, the frame's length, bytes that
//! follow from both, and an FNV-1a checksum of everything between the MAC addresses and it
//! (the addresses are what the peer rewrites). The loopback under test
//! swaps the two MAC addresses and changes nothing else, so each returned frame is checked
//! byte for byte against [`expected_back`]. Pure functions on bytes, tested on the host.

/// The ethertype of our frames (IEEE 802 local experimental 1).
pub const ETHERTYPE: u16 = 0x88b5;
/// Smallest frame (an Ethernet minimum without its FCS).
pub const MIN_FRAME: usize = 60;
/// Bytes before the pattern: header (14), sequence (4), length (4).
const HEAD: usize = 22;
/// The checksum at the end.
const SUM: usize = 8;

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Frame `seq` of `len` bytes (at least [`MIN_FRAME`]) from `src` to `dst`.
pub fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(MIN_FRAME);
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    f[18..22].copy_from_slice(&(len as u32).to_le_bytes());
    for (i, b) in f[HEAD..len - SUM].iter_mut().enumerate() {
        *b = (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(seq)
            .to_le_bytes()[1];
    }
    let sum = fnv1a(&f[12..len - SUM]);
    f[len - SUM..].copy_from_slice(&sum.to_le_bytes());
    f
}

/// What the loopback sends back for `sent`: the same bytes with the MACs swapped.
pub fn expected_back(sent: &[u8]) -> Vec<u8> {
    let mut b = sent.to_vec();
    if b.len() >= 12 {
        let (d, s) = b[..12].split_at_mut(6);
        d.swap_with_slice(s);
    }
    b
}

/// The sequence number of one of our frames, if it is one (right ethertype and length field,
/// and its checksum holds).
pub fn sequence(f: &[u8]) -> Option<u32> {
    if f.len() < MIN_FRAME || f[12..14] != ETHERTYPE.to_be_bytes() {
        return None;
    }
    let len = u32::from_le_bytes(f[18..22].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(f.get(len.checked_sub(SUM)?..len)?.try_into().ok()?);
    (len == f.len() && fnv1a(&f[12..len - SUM]) == sum)
        .then(|| u32::from_le_bytes([f[14], f[15], f[16], f[17]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    #[test]
    fn frames_carry_their_sequence_and_a_checksum() {
        for len in [0, 60, 61, 1514, 9014] {
            let f = frame(B, A, 7, len);
            assert_eq!(f.len(), len.max(MIN_FRAME));
            assert_eq!(sequence(&f), Some(7));
            let back = expected_back(&f);
            assert_eq!(&back[..6], &A);
            assert_eq!(&back[6..12], &B);
            assert_eq!(sequence(&back), Some(7), "the swap keeps the checksum");
        }
    }

    #[test]
    fn a_changed_byte_or_length_is_not_ours() {
        let mut f = frame(B, A, 3, 200);
        f[100] ^= 1;
        assert_eq!(sequence(&f), None);
        let f = frame(B, A, 3, 200);
        assert_eq!(sequence(&f[..199]), None);
        assert_eq!(sequence(&[0u8; 10]), None);
        assert_ne!(
            frame(B, A, 1, 100),
            frame(B, A, 2, 100),
            "frames differ by sequence"
        );
    }
}
