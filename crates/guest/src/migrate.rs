//! What `blk-migrate` puts on the disk, the order of its requests, and how it judges what its
//! buffers hold after a live migration.
//!
//! During a live migration QEMU copies guest RAM to the destination while the guest runs,
//! then copies again the pages dirtied since. It sees the guest CPU's stores, not a vhost-user
//! back-end's: the back-end writes guest memory directly (a read request's data, by "DMA"), so
//! it must log every page it writes in the shared dirty log, by guest-physical address. A
//! page it writes but does not log reaches the destination with the content it had when QEMU
//! last copied it: stale.
//!
//! The check makes such a page visible. `B` buffers of one 4 KiB page each are filled once by
//! the CPU with a [`fill_marker`] marker; from then on only the device writes them: read `i`
//! goes into buffer `i % B` from block [`block_of`] of region R, a different block every
//! round, so every read changes its page. After the switch-over each buffer must hold exactly
//! the block its last read fetched; one that holds its marker, or the block of an earlier
//! round, is a write the source's back-end did not log. A write every [`READS_PER_WRITE`]
//! reads (to region W) checks the other direction across the switch-over.
//!
//! The disk ([`DISK`], 64 MiB):
//! - region R, `[0, 32 MiB)`: [`R_BLOCKS`] blocks of `guest::layout`'s pattern, filled by the
//!   host; only ever read;
//! - the control sector at [`CONTROL`] (32 MiB): zero, until the host writes [`signal`] there
//!   once the migration has completed;
//! - region W, `[33 MiB, 64 MiB)`: [`W_SLOTS`] slots the guest writes in turn, each write a
//!   new version of its slot ([`fill_slot`]).
//!
//! Plain arithmetic on bytes: no I/O and no clock here (the binary does those).

use std::fmt;

use crate::layout::{fill, first_mismatch, word};

/// Bytes of a block, a buffer, a slot and a page.
pub const BLOCK: usize = 4096;
/// [`BLOCK`] as a disk length.
const BLOCK_BYTES: u64 = BLOCK as u64;
/// Blocks of region R.
pub const R_BLOCKS: u64 = 8192;
/// Bytes of region R, at the start of the disk.
pub const REGION_R: u64 = R_BLOCKS * BLOCK_BYTES;
/// Disk offset of the control sector (one block).
pub const CONTROL: u64 = REGION_R;
/// Disk offset of region W: 1 MiB after the control sector.
pub const REGION_W: u64 = CONTROL + (1 << 20);
/// Bytes of the disk image.
pub const DISK: u64 = 64 << 20;
/// Slots of region W (31 MiB of blocks).
pub const W_SLOTS: u64 = (DISK - REGION_W) / BLOCK_BYTES;
/// Buffers a run uses unless told otherwise (8 MiB).
pub const DEFAULT_BUFFERS: usize = 2048;
/// Most buffers: one per block of region R, so that the blocks of one round are all different
/// (each names one buffer) and stale content says which buffer's read it came from.
pub const MAX_BUFFERS: usize = R_BLOCKS as usize;
/// A write after this many reads.
pub const READS_PER_WRITE: u64 = 8;
/// A look at the control sector after this many reads and writes.
pub const OPS_PER_POLL: u64 = 32;
/// The first 8 bytes of the control sector once the host says the migration is over.
pub const SIGNAL: [u8; 8] = *b"MIGRATED";

/// Multiplier of the buffer index in [`block_of`] (prime, so odd: a permutation of region R).
const BUFFER_STRIDE: u64 = 7919;
/// Multiplier of the round in [`block_of`] (prime; 6425 modulo [`R_BLOCKS`], not 0, so each
/// round moves every buffer to another block).
const ROUND_STRIDE: u64 = 104_729;
/// The high half of every marker word (the low half is the buffer's index).
const MARKER_TAG: u64 = 0xeeee_eeee_0000_0000;
/// Keys the slots' seeds apart from region R's.
const SLOT_KEY: u64 = 0x5752_4954_4553_4c54;

/// One 4 KiB page of memory, aligned as O_DIRECT needs. A `Vec<Page>` is one page per
/// element: every buffer is a page of its own, and nothing else lives in it.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct Page(pub [u8; BLOCK]);

impl Page {
    /// A page of zeros.
    pub fn zeroed() -> Page {
        Page([0; BLOCK])
    }

    /// Buffer `buffer`'s marker.
    pub fn marker(buffer: usize) -> Page {
        let mut p = Page::zeroed();
        fill_marker(&mut p.0, buffer);
        p
    }
}

/// The block of region R that read `round * B + buffer` fetches (`buffer < B`): a permutation
/// of the blocks in each round, and a different block for the buffer in the next round.
pub fn block_of(buffer: usize, round: u64) -> u64 {
    // Reduced before multiplying: no product exceeds R_BLOCKS squared.
    let k = (buffer as u64 % R_BLOCKS) * BUFFER_STRIDE % R_BLOCKS;
    let r = (round % R_BLOCKS) * (ROUND_STRIDE % R_BLOCKS) % R_BLOCKS;
    (k + r) % R_BLOCKS
}

/// The disk offset of block `block` of region R.
pub fn block_offset(block: u64) -> u64 {
    (block % R_BLOCKS) * BLOCK_BYTES
}

/// The disk offset of slot `slot` of region W.
pub fn slot_offset(slot: u64) -> u64 {
    REGION_W + (slot % W_SLOTS) * BLOCK_BYTES
}

/// Fill `buf` with block `block` of region R for `seed`.
pub fn fill_block(buf: &mut [u8], seed: u64, block: u64) {
    fill(buf, seed, block_offset(block));
}

/// The seed of version `version` of every slot: the slot's offset does the rest.
fn slot_seed(seed: u64, version: u64) -> u64 {
    word(seed ^ SLOT_KEY, version.wrapping_mul(8))
}

/// Fill `buf` with version `version` of slot `slot` for `seed`.
pub fn fill_slot(buf: &mut [u8], seed: u64, slot: u64, version: u64) {
    fill(buf, slot_seed(seed, version), slot_offset(slot));
}

/// Fill `buf` with buffer `buffer`'s marker: 0xee bytes, the low half of each 8-byte word the
/// buffer's index (little-endian). Not a pattern word: a buffer the device never wrote says so.
pub fn fill_marker(buf: &mut [u8], buffer: usize) {
    let w = (MARKER_TAG | (buffer as u64 & 0xffff_ffff)).to_le_bytes();
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// What the host writes at [`CONTROL`]: [`SIGNAL`], then the seed (little-endian), so a
/// signal left from a run with another seed does not count.
pub fn signal(seed: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&SIGNAL);
    s[8..].copy_from_slice(&seed.to_le_bytes());
    s
}

/// Whether the control sector's bytes `sector` carry the signal for `seed`.
pub fn is_signal(sector: &[u8], seed: u64) -> bool {
    sector.get(..16) == Some(&signal(seed)[..])
}

/// What a buffer holds: the block its last read fetched, and in which round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The round of that read.
    pub round: u64,
    /// The block of region R it fetched.
    pub block: u64,
}

/// The next request of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read block `block` of region R into buffer `buffer` (round `round`).
    Read {
        /// The buffer.
        buffer: usize,
        /// Its round.
        round: u64,
        /// The block.
        block: u64,
    },
    /// Write version `version` of slot `slot` of region W (from a buffer of its own).
    Write {
        /// The slot.
        slot: u64,
        /// Its version: how many writes went to the slot, this one included.
        version: u64,
    },
    /// Read the control sector and stop if it carries the signal.
    Poll,
}

/// The order of a run's requests, and what each buffer and slot holds once they are done.
///
/// [`Schedule::next_op`] records an operation as done when it hands it out: the caller performs
/// it before asking for the next, and a failed one ends the run without a check.
#[derive(Debug)]
pub struct Schedule {
    reads: u64,
    writes: u64,
    since_poll: u64,
    held: Vec<Option<Held>>,
    /// The last version written, per slot (0: never written).
    versions: Vec<u64>,
}

impl Schedule {
    /// A run over `buffers` buffers (at least one).
    pub fn new(buffers: usize) -> Schedule {
        Schedule {
            reads: 0,
            writes: 0,
            since_poll: 0,
            held: vec![None; buffers.max(1)],
            versions: vec![0; W_SLOTS as usize],
        }
    }

    /// The next operation: reads in turn, a write after every [`READS_PER_WRITE`] reads, a
    /// poll after every [`OPS_PER_POLL`] reads and writes.
    pub fn next_op(&mut self) -> Op {
        if self.since_poll >= OPS_PER_POLL {
            self.since_poll = 0;
            return Op::Poll;
        }
        self.since_poll += 1;
        if self.writes < self.reads / READS_PER_WRITE {
            let slot = self.writes % W_SLOTS;
            let version = match self.versions.get_mut(slot as usize) {
                Some(v) => {
                    *v += 1;
                    *v
                }
                None => 1,
            };
            self.writes += 1;
            return Op::Write { slot, version };
        }
        let n = self.held.len() as u64;
        let buffer = (self.reads % n) as usize;
        let round = self.reads / n;
        let block = block_of(buffer, round);
        if let Some(h) = self.held.get_mut(buffer) {
            *h = Some(Held { round, block });
        }
        self.reads += 1;
        Op::Read {
            buffer,
            round,
            block,
        }
    }

    /// Reads handed out.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Writes handed out.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Rounds begun.
    pub fn rounds(&self) -> u64 {
        self.reads.div_ceil(self.held.len() as u64)
    }

    /// What buffer `buffer` holds (`None`: never read, so its marker).
    pub fn held(&self, buffer: usize) -> Option<Held> {
        self.held.get(buffer).copied().flatten()
    }

    /// Every slot written, with its last version.
    pub fn written(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0u64..)
            .zip(self.versions.iter().copied())
            .filter(|&(_, v)| v > 0)
    }
}

/// The inverse of odd `a` modulo 2^64 (Newton's iteration doubles the correct low bits).
const fn inverse(a: u64) -> u64 {
    let mut x = a; // right to 3 bits: a * a = 1 modulo 8 for odd a
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

/// The latest round before `before` in which buffer `buffer` read block `block`, if any.
pub fn round_holding(buffer: usize, block: u64, before: u64) -> Option<u64> {
    // block = buffer * BUFFER_STRIDE + round * ROUND_STRIDE (mod R_BLOCKS, a power of two):
    // ROUND_STRIDE is odd, so invertible, and the rounds that read `block` into this buffer
    // are `first` plus multiples of R_BLOCKS.
    let k = block_of(buffer, 0);
    let d = (block % R_BLOCKS + R_BLOCKS - k) % R_BLOCKS;
    let first = d.wrapping_mul(inverse(ROUND_STRIDE)) % R_BLOCKS;
    let last = before.checked_sub(1)?;
    let since = last.checked_sub(first)?;
    Some(first + since / R_BLOCKS * R_BLOCKS)
}

/// What a wrong buffer or slot holds instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A buffer's marker, in full: buffer `buffer`'s.
    Marker {
        /// Whose.
        buffer: usize,
    },
    /// A whole block of region R.
    Block {
        /// Which.
        block: u64,
        /// The latest round before the expected one in which this buffer read it.
        round: Option<u64>,
    },
    /// A whole earlier version of the slot.
    Version {
        /// Which.
        version: u64,
    },
    /// Zeros only.
    Zeros,
    /// None of those.
    Unknown,
}

/// What a buffer should hold, given what its last read fetched.
pub fn expected_buffer(out: &mut [u8], seed: u64, buffer: usize, held: Option<Held>) {
    match held {
        Some(h) => fill_block(out, seed, h.block),
        None => fill_marker(out, buffer),
    }
}

/// What buffer `buffer` holds, when it is not what it should (`held`, from [`Schedule`]).
pub fn classify_buffer(got: &[u8], seed: u64, buffer: usize, held: Option<Held>) -> Seen {
    if got.iter().all(|&b| b == 0) {
        return Seen::Zeros;
    }
    let w = got
        .get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes);
    if w & !0xffff_ffff == MARKER_TAG {
        let whose = (w & 0xffff_ffff) as usize;
        let mut m = Page::zeroed();
        fill_marker(&mut m.0, whose);
        if m.0.get(..got.len()) == Some(got) {
            return Seen::Marker { buffer: whose };
        }
    }
    // Every block's first word is different (a unit test checks it for a few seeds): the
    // first word names the only candidate.
    let found = (0..R_BLOCKS).find(|&b| word(seed, block_offset(b)) == w);
    match found {
        Some(block) if first_mismatch(got, seed, block_offset(block)).is_none() => Seen::Block {
            block,
            round: held.and_then(|h| round_holding(buffer, block, h.round)),
        },
        _ => Seen::Unknown,
    }
}

/// What slot `slot` holds, when it is not version `version`.
pub fn classify_slot(got: &[u8], seed: u64, slot: u64, version: u64) -> Seen {
    if got.iter().all(|&b| b == 0) {
        return Seen::Zeros;
    }
    let mut want = Page::zeroed();
    for v in (1..version).rev() {
        fill_slot(&mut want.0, seed, slot, v);
        if want.0.get(..got.len()) == Some(got) {
            return Seen::Version { version: v };
        }
    }
    Seen::Unknown
}

/// The first byte where `got` and `want` differ, over the shorter: `(index, wanted, got)`.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<(usize, u8, u8)> {
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| g != w)
        .map(|(i, (&g, &w))| (i, w, g))
}

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A buffer and what its last read fetched (`None`: never read).
    Buffer {
        /// Its index.
        index: usize,
        /// Its last read.
        held: Option<Held>,
    },
    /// A slot of region W and its last version.
    Slot {
        /// Its index.
        slot: u64,
        /// The version it should hold.
        version: u64,
    },
}

/// One wrong buffer or slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Which.
    pub item: Item,
    /// The first wrong byte, from the start of the buffer or slot.
    pub at: usize,
    /// The byte expected there.
    pub want: u8,
    /// The byte found.
    pub got: u8,
    /// What it holds instead.
    pub seen: Seen,
}

/// Buffers or slots checked, how many were wrong, and the first wrong one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many were checked.
    pub checked: u64,
    /// How many were wrong.
    pub wrong: u64,
    /// The first wrong one.
    pub first: Option<Finding>,
}

impl Tally {
    /// Check buffer `index`, which holds `got`.
    pub fn check_buffer(&mut self, got: &[u8], seed: u64, index: usize, held: Option<Held>) {
        let mut want = Page::zeroed();
        expected_buffer(&mut want.0, seed, index, held);
        let item = Item::Buffer { index, held };
        self.record(item, got, &want.0, || {
            classify_buffer(got, seed, index, held)
        });
    }

    /// Check slot `slot`, read back as `got`, against version `version`.
    pub fn check_slot(&mut self, got: &[u8], seed: u64, slot: u64, version: u64) {
        let mut want = Page::zeroed();
        fill_slot(&mut want.0, seed, slot, version);
        let item = Item::Slot { slot, version };
        self.record(item, got, &want.0, || {
            classify_slot(got, seed, slot, version)
        });
    }

    /// Count one check; classify only the first wrong one (the rest are only counted).
    fn record(&mut self, item: Item, got: &[u8], want: &[u8], seen: impl FnOnce() -> Seen) {
        self.checked += 1;
        let Some((at, want, got)) = first_difference(got, want) else {
            return;
        };
        self.wrong += 1;
        if self.first.is_none() {
            self.first = Some(Finding {
                item,
                at,
                want,
                got,
                seen: seen(),
            });
        }
    }
}

/// The verdict of a run: its buffers, then its slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The buffers.
    pub buffers: Tally,
    /// The slots of region W.
    pub slots: Tally,
}

impl Report {
    /// Whether everything was right.
    pub fn passed(&self) -> bool {
        self.buffers.wrong == 0 && self.slots.wrong == 0
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Item::Buffer {
                index,
                held: Some(h),
            } => write!(
                f,
                "buffer {index} (round {}, block {:#x} at disk {:#x})",
                h.round,
                h.block,
                block_offset(h.block)
            )?,
            Item::Buffer { index, held: None } => {
                write!(f, "buffer {index} (never read: should hold its marker)")?
            }
            Item::Slot { slot, version } => write!(
                f,
                "slot {slot} (version {version} at disk {:#x})",
                slot_offset(slot)
            )?,
        }
        write!(
            f,
            ": byte {:#x} is {:#04x}, expected {:#04x}; it holds ",
            self.at, self.got, self.want
        )?;
        match (self.item, self.seen) {
            (Item::Buffer { index, held }, Seen::Marker { buffer }) if buffer == index => {
                if held.is_some() {
                    write!(f, "its own marker (the page from before its first read)")
                } else {
                    write!(f, "its own marker")
                }
            }
            (_, Seen::Marker { buffer }) => write!(f, "the marker of buffer {buffer}"),
            (Item::Buffer { held, .. }, Seen::Block { block, round }) => {
                write!(f, "block {block:#x}")?;
                match (round, held) {
                    (Some(r), Some(h)) if r + 1 == h.round => {
                        write!(f, ", which it read in the previous round ({r}): stale")
                    }
                    (Some(r), _) => write!(f, ", which it read in round {r}: stale"),
                    (None, _) => write!(f, ", which it never read"),
                }
            }
            (Item::Slot { .. }, Seen::Block { block, .. }) => write!(f, "block {block:#x}"),
            (Item::Slot { version, .. }, Seen::Version { version: v }) if v + 1 == version => {
                write!(f, "the previous version ({v}): stale")
            }
            (_, Seen::Version { version }) => write!(f, "version {version}: stale"),
            (_, Seen::Zeros) => write!(f, "zeros"),
            (_, Seen::Unknown) => write!(f, "unknown content"),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} buffers and {} of {} slots wrong",
            self.buffers.wrong, self.buffers.checked, self.slots.wrong, self.slots.checked
        )?;
        if let Some(b) = &self.buffers.first {
            write!(f, "; first {b}")?;
        }
        if let Some(s) = &self.slots.first {
            write!(f, "; first {s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_is_laid_out_as_the_host_and_the_guest_expect() {
        assert_eq!(REGION_R, 32 << 20);
        assert_eq!(CONTROL, 32 << 20);
        assert_eq!(REGION_W, 33 << 20);
        assert_eq!(W_SLOTS, 7936);
        assert_eq!(slot_offset(0), REGION_W);
        assert_eq!(slot_offset(W_SLOTS - 1) + BLOCK_BYTES, DISK);
        assert_eq!(slot_offset(W_SLOTS), REGION_W);
        assert_eq!(block_offset(R_BLOCKS - 1) + BLOCK_BYTES, REGION_R);
        assert_eq!(std::mem::align_of::<Page>(), BLOCK);
        assert_eq!(std::mem::size_of::<Page>(), BLOCK);
        let v: Vec<Page> = (0..3).map(Page::marker).collect();
        assert!(v.iter().all(|p| p.0.as_ptr() as usize % BLOCK == 0));
    }

    #[test]
    fn each_round_reads_every_block_once_and_moves_every_buffer() {
        for round in [0, 1, 2, 8191, 8192, u64::MAX] {
            let mut seen = vec![false; R_BLOCKS as usize];
            for k in 0..MAX_BUFFERS {
                let b = block_of(k, round);
                assert!(b < R_BLOCKS);
                assert!(!std::mem::replace(&mut seen[b as usize], true));
                assert_ne!(b, block_of(k, round.wrapping_add(1)));
            }
        }
        assert!(block_of(usize::MAX, u64::MAX) < R_BLOCKS);
        assert_eq!(block_of(1, 1), (7919 + 104_729) % 8192);
    }

    #[test]
    fn the_pattern_differs_per_block_per_seed_and_per_slot_version() {
        let (mut a, mut b) = (Page::zeroed(), Page::zeroed());
        fill_block(&mut a.0, 7, 3);
        fill_block(&mut b.0, 7, 4);
        assert!(a.0 != b.0);
        fill_block(&mut b.0, 8, 3);
        assert!(a.0 != b.0);
        // Every 8-byte word of a block is different.
        let mut words: Vec<&[u8]> = a.0.chunks(8).collect();
        words.sort();
        words.dedup();
        assert_eq!(words.len(), BLOCK / 8);
        // The first word names the block: no two blocks share it.
        for seed in [0, 1, 7, u64::MAX] {
            let mut first: Vec<u64> = (0..R_BLOCKS).map(|b| word(seed, block_offset(b))).collect();
            first.sort_unstable();
            first.dedup();
            assert_eq!(first.len(), R_BLOCKS as usize);
        }
        fill_slot(&mut a.0, 7, 5, 1);
        fill_slot(&mut b.0, 7, 5, 2);
        assert!(a.0 != b.0);
        fill_slot(&mut b.0, 7, 6, 1);
        assert!(a.0 != b.0);
        fill_slot(&mut b.0, 8, 5, 1);
        assert!(a.0 != b.0);
        fill(&mut b.0, 7, slot_offset(5));
        assert!(
            a.0 != b.0,
            "a slot's data is not the host's pattern at that offset"
        );
    }

    #[test]
    fn the_signal_carries_the_seed() {
        let mut sector = Page::zeroed();
        assert!(!is_signal(&sector.0, 7));
        sector.0[..16].copy_from_slice(&signal(7));
        assert!(is_signal(&sector.0, 7));
        assert!(!is_signal(&sector.0, 8));
        assert!(!is_signal(&sector.0[..8], 7));
        assert_eq!(&sector.0[..8], b"MIGRATED");
        assert_eq!(sector.0[8..16], 7u64.to_le_bytes());
    }

    #[test]
    fn the_schedule_writes_every_8_reads_polls_every_32_and_cycles_the_buffers() {
        let mut s = Schedule::new(5);
        let ops: Vec<Op> = (0..200).map(|_| s.next_op()).collect();
        let mut reads = 0u64;
        let mut since_write = 0;
        let mut since_poll = 0;
        for op in &ops {
            match *op {
                Op::Read {
                    buffer,
                    round,
                    block,
                } => {
                    assert_eq!((buffer as u64, round), (reads % 5, reads / 5));
                    assert_eq!(block, block_of(buffer, round));
                    reads += 1;
                    since_write += 1;
                    since_poll += 1;
                    assert!(since_write <= 8);
                }
                Op::Write { .. } => {
                    assert_eq!(since_write, 8);
                    since_write = 0;
                    since_poll += 1;
                }
                Op::Poll => {
                    assert_eq!(since_poll, 32);
                    since_poll = 0;
                }
            }
        }
        assert_eq!(s.reads(), reads);
        assert_eq!(s.writes(), reads / 8);
        assert_eq!(s.rounds(), reads.div_ceil(5));
        let last = (reads - 1) % 5;
        assert_eq!(
            s.held(last as usize).map(|h| h.round),
            Some((reads - 1) / 5)
        );
        assert_eq!(Schedule::new(3).held(0), None);
        assert_eq!(s.held(5), None);
        // Slots in turn; a slot's version counts its writes.
        let mut s = Schedule::new(1);
        let mut versions = Vec::new();
        while versions.len() < W_SLOTS as usize + 2 {
            if let Op::Write { slot, version } = s.next_op() {
                versions.push((slot, version));
            }
        }
        assert_eq!(versions[0], (0, 1));
        assert_eq!(versions[W_SLOTS as usize], (0, 2));
        assert_eq!(versions[W_SLOTS as usize + 1], (1, 2));
        let written: Vec<_> = s.written().collect();
        assert_eq!(written.len(), W_SLOTS as usize);
        assert_eq!(written[..3], [(0, 2), (1, 2), (2, 1)]);
    }

    #[test]
    fn the_round_holding_a_block_is_the_latest_before_the_asked_one() {
        assert_eq!(inverse(ROUND_STRIDE).wrapping_mul(ROUND_STRIDE), 1);
        for k in [0, 1, 77, 2047, 8191] {
            for before in [0u64, 1, 2, 9, 8193, 20_000] {
                for block in [block_of(k, 0), block_of(k, 1), block_of(k, 8), 12, 4095] {
                    let brute = (0..before).rev().find(|&r| block_of(k, r) == block);
                    assert_eq!(
                        round_holding(k, block, before),
                        brute,
                        "{k} {block} {before}"
                    );
                }
            }
        }
    }

    /// A run of `reads` reads over `n` buffers, the buffers as a correct device leaves them.
    fn run(n: usize, reads: u64, seed: u64) -> (Schedule, Vec<Page>) {
        let mut s = Schedule::new(n);
        let mut bufs: Vec<Page> = (0..n).map(Page::marker).collect();
        while s.reads() < reads {
            if let Op::Read { buffer, block, .. } = s.next_op() {
                fill_block(&mut bufs[buffer].0, seed, block);
            }
        }
        (s, bufs)
    }

    fn check(s: &Schedule, bufs: &[Page], seed: u64) -> Tally {
        let mut t = Tally::default();
        for (k, p) in bufs.iter().enumerate() {
            t.check_buffer(&p.0, seed, k, s.held(k));
        }
        t
    }

    #[test]
    fn a_correct_run_passes_and_unread_buffers_keep_their_marker() {
        let (s, bufs) = run(16, 16 * 3 + 5, 9);
        let t = check(&s, &bufs, 9);
        assert_eq!((t.checked, t.wrong, t.first), (16, 0, None));
        assert!(Report::default().passed());
        // Fewer reads than buffers: the rest still hold their markers, and that is right.
        let (s, bufs) = run(16, 5, 9);
        assert_eq!(check(&s, &bufs, 9).wrong, 0);
        assert_eq!(bufs[9].0[..8], Page::marker(9).0[..8]);
    }

    #[test]
    fn a_stale_buffer_is_recognised_as_its_previous_round_or_its_marker() {
        let seed = 9;
        let (s, mut bufs) = run(16, 16 * 3 + 5, seed);
        // Buffer 7 keeps what it read in round 1 (a write the destination never got), buffer 2
        // what it read in round 0, buffer 3 its marker, buffer 4 zeros, buffer 5 garbage.
        fill_block(&mut bufs[7].0, seed, block_of(7, 1));
        fill_block(&mut bufs[2].0, seed, block_of(2, 0));
        bufs[3] = Page::marker(3);
        bufs[4] = Page::zeroed();
        bufs[5].0[100] ^= 0x40;
        let t = check(&s, &bufs, seed);
        assert_eq!((t.checked, t.wrong), (16, 5));
        let first = t.first.unwrap();
        assert_eq!(
            first.seen,
            Seen::Block {
                block: block_of(2, 0),
                round: Some(0)
            }
        );
        assert_eq!(
            classify_buffer(&bufs[7].0, seed, 7, s.held(7)),
            Seen::Block {
                block: block_of(7, 1),
                round: Some(1)
            }
        );
        assert_eq!(
            classify_buffer(&bufs[3].0, seed, 3, s.held(3)),
            Seen::Marker { buffer: 3 }
        );
        assert_eq!(classify_buffer(&bufs[4].0, seed, 4, s.held(4)), Seen::Zeros);
        assert_eq!(
            classify_buffer(&bufs[5].0, seed, 5, s.held(5)),
            Seen::Unknown
        );
        // A block this buffer never read, another buffer's marker.
        let other = block_of(8, 0);
        let mut p = Page::zeroed();
        fill_block(&mut p.0, seed, other);
        let held = s.held(6);
        assert!(
            matches!(classify_buffer(&p.0, seed, 6, held), Seen::Block { round, .. } if round == round_holding(6, other, 3))
        );
        assert_eq!(
            classify_buffer(&Page::marker(11).0, seed, 6, held),
            Seen::Marker { buffer: 11 }
        );
        // The first wrong byte of a stale block is byte 0; of the flipped bit, byte 100.
        assert_eq!(first.at, 0);
        let mut t = Tally::default();
        t.check_buffer(&bufs[5].0, seed, 5, s.held(5));
        assert_eq!(t.first.map(|f| f.at), Some(100));
    }

    #[test]
    fn a_stale_slot_is_recognised_as_an_older_version_or_zeros() {
        let mut p = Page::zeroed();
        assert_eq!(classify_slot(&p.0, 3, 10, 3), Seen::Zeros);
        fill_slot(&mut p.0, 3, 10, 2);
        assert_eq!(classify_slot(&p.0, 3, 10, 3), Seen::Version { version: 2 });
        fill_slot(&mut p.0, 3, 10, 1);
        assert_eq!(classify_slot(&p.0, 3, 10, 3), Seen::Version { version: 1 });
        fill_slot(&mut p.0, 3, 11, 1);
        assert_eq!(classify_slot(&p.0, 3, 10, 3), Seen::Unknown);
        let mut t = Tally::default();
        fill_slot(&mut p.0, 3, 10, 3);
        t.check_slot(&p.0, 3, 10, 3);
        assert_eq!((t.checked, t.wrong), (1, 0));
        fill_slot(&mut p.0, 3, 10, 2);
        t.check_slot(&p.0, 3, 10, 3);
        assert_eq!((t.checked, t.wrong), (2, 1));
    }

    #[test]
    fn the_failure_line_names_counts_the_first_wrong_one_and_what_it_holds() {
        let held = Some(Held {
            round: 5,
            block: 0x1a2b,
        });
        let r = Report {
            buffers: Tally {
                checked: 2048,
                wrong: 37,
                first: Some(Finding {
                    item: Item::Buffer { index: 12, held },
                    at: 0,
                    want: 0x7f,
                    got: 0x3c,
                    seen: Seen::Block {
                        block: 0x0bc1,
                        round: Some(4),
                    },
                }),
            },
            slots: Tally {
                checked: 900,
                wrong: 1,
                first: Some(Finding {
                    item: Item::Slot {
                        slot: 3,
                        version: 2,
                    },
                    at: 8,
                    want: 1,
                    got: 0,
                    seen: Seen::Version { version: 1 },
                }),
            },
        };
        assert!(!r.passed());
        assert_eq!(
            r.to_string(),
            "37 of 2048 buffers and 1 of 900 slots wrong; \
             first buffer 12 (round 5, block 0x1a2b at disk 0x1a2b000): byte 0x0 is 0x3c, \
             expected 0x7f; it holds block 0xbc1, which it read in the previous round (4): \
             stale; first slot 3 (version 2 at disk 0x2103000): byte 0x8 is 0x00, expected \
             0x01; it holds the previous version (1): stale"
        );
        let f = Finding {
            item: Item::Buffer { index: 3, held },
            at: 0,
            want: 1,
            got: 0xee,
            seen: Seen::Marker { buffer: 3 },
        };
        assert!(f
            .to_string()
            .ends_with("its own marker (the page from before its first read)"));
        let f = Finding {
            item: Item::Buffer {
                index: 3,
                held: None,
            },
            seen: Seen::Unknown,
            ..f
        };
        assert_eq!(
            f.to_string(),
            "buffer 3 (never read: should hold its marker): byte 0x0 is 0xee, expected 0x01; \
             it holds unknown content"
        );
    }
}
