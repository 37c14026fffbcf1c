//! Where `blk-check` puts each check on the disk, and what the bytes are.
//!
//! The disk has two regions of [`REGION`] bytes, each split into one slot of [`SLOT`] bytes
//! per thread (at most [`MAX_THREADS`]):
//! - region A (`[0, REGION)`) is filled by the host before the run; the guest only reads it
//!   (host to guest);
//! - region B (`[REGION, 2 * REGION)`) holds filler the guest overwrites; the host checks
//!   afterwards that exactly the guest's data is there (guest to device).
//!
//! In a slot, every size of [`SIZES`] appears once per buffer layout ([`Layout`]), one after
//! the other. The bytes of every extent are [`word`]s of a seed and the absolute disk offset,
//! so the guest and the host compute the same expectation independently. Plain arithmetic:
//! no I/O here.

/// Request sizes checked: 4 KiB to 4 MiB, doubling.
pub const SIZES: [usize; 11] = [
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

/// Bytes of one thread's slot in a region (every size, both layouts, fits with room).
pub const SLOT: u64 = 16 << 20;
/// Most threads (and so queues) a run may use.
pub const MAX_THREADS: usize = 4;
/// Bytes of each region.
pub const REGION: u64 = SLOT * MAX_THREADS as u64;
/// Bytes of the disk image.
pub const DISK: u64 = 2 * REGION;

/// How a request's buffer lies in the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One 4 KiB page per iovec, pages taken from all over a pool in a shuffled order: the
    /// device sees one guest-physical segment per page.
    Scattered,
    /// One virtually contiguous buffer in huge pages: physically contiguous per 2 MiB, so
    /// the driver sends few long segments.
    Contiguous,
}

impl Layout {
    /// The other one.
    pub fn other(self) -> Layout {
        match self {
            Layout::Scattered => Layout::Contiguous,
            Layout::Contiguous => Layout::Scattered,
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Scattered => "scattered",
            Layout::Contiguous => "contiguous",
        }
    }
}

/// One checked request: `len` bytes at disk offset `offset`, from a buffer laid out so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Disk offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// Layout of the buffer it is written from or read into.
    pub layout: Layout,
}

/// Which region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Host to guest.
    A,
    /// Guest to device.
    B,
}

impl Region {
    fn base(self) -> u64 {
        match self {
            Region::A => 0,
            Region::B => REGION,
        }
    }
}

/// The extents of `thread`'s slot in `region`, in the order they are checked.
pub fn extents(region: Region, thread: usize) -> Vec<Extent> {
    let mut at = region.base() + SLOT * thread as u64;
    let mut out = Vec::new();
    for &len in &SIZES {
        for layout in [Layout::Scattered, Layout::Contiguous] {
            out.push(Extent {
                offset: at,
                len,
                layout,
            });
            at += len as u64;
        }
    }
    out
}

/// The seed of region B's data (the host's filler there uses `seed` itself).
pub fn guest_seed(seed: u64) -> u64 {
    seed ^ 0x5bd1_e995_9e37_79b9
}

/// The 8-byte word at disk offset `offset` (a multiple of 8) for `seed`.
pub fn word(seed: u64, offset: u64) -> u64 {
    // splitmix64 of the word index, keyed by the seed.
    let mut z = seed
        .wrapping_add((offset >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` with the bytes of disk offset `offset` onwards (`offset` a multiple of 8).
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = word(seed, offset + 8 * i as u64).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// The first byte of `buf` that differs from what disk offset `offset` should hold:
/// `(offset of the byte, expected, found)`.
pub fn first_mismatch(buf: &[u8], seed: u64, offset: u64) -> Option<(u64, u8, u8)> {
    for (i, chunk) in buf.chunks(8).enumerate() {
        let at = offset + 8 * i as u64;
        let w = word(seed, at).to_le_bytes();
        if chunk != &w[..chunk.len()] {
            let j = chunk.iter().zip(w).position(|(a, b)| *a != b).unwrap_or(0);
            return Some((at + j as u64, w[j], chunk[j]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_every_extent_without_overlap() {
        for region in [Region::A, Region::B] {
            for t in 0..MAX_THREADS {
                let e = extents(region, t);
                assert_eq!(e.len(), 2 * SIZES.len());
                let start = region.base() + SLOT * t as u64;
                let end = e.last().map(|x| x.offset + x.len as u64).unwrap();
                assert!(e[0].offset == start && end <= start + SLOT);
                for w in e.windows(2) {
                    assert_eq!(w[0].offset + w[0].len as u64, w[1].offset);
                }
                assert!(e.iter().all(|x| x.offset % 4096 == 0));
            }
        }
        assert_eq!(DISK, 128 << 20);
    }

    #[test]
    fn the_pattern_depends_on_seed_and_offset_and_mismatches_are_found() {
        let mut a = vec![0u8; 4096];
        fill(&mut a, 7, 8192);
        assert_eq!(first_mismatch(&a, 7, 8192), None);
        assert!(first_mismatch(&a, 8, 8192).is_some());
        assert!(first_mismatch(&a, 7, 8192 + 4096).is_some());
        // The same bytes whatever the chunking.
        let mut b = vec![0u8; 4096];
        fill(&mut b[..1024], 7, 8192);
        fill(&mut b[1024..], 7, 8192 + 1024);
        assert_eq!(a, b);
        a[1234] ^= 1;
        assert_eq!(first_mismatch(&a, 7, 8192).map(|m| m.0), Some(8192 + 1234));
    }
}
