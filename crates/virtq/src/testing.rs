//! Test support (feature `testing`): the driver's side of a split ring, in guest memory reached
//! through an I/O page table, for the tests of this crate and of the crates above it.
//!
//! - [`IovaSpace`]: 4 KiB pages of IOVA mapped to guest-physical pages with a permission: the
//!   page table of a simulated IOMMU. The driver writes and reads through it; the IOMMU side of
//!   a test answers misses from it ([`IovaSpace::update_for`]).
//! - [`PageAllocator`]: hands out guest-physical pages, shuffled, so mappings are
//!   non-identity and fragmented.
//! - [`DriverQueue`]: lays out the three ring areas (or takes areas the caller placed,
//!   [`DriverQueue::at`]), builds chains (direct or indirect, one at a time or several
//!   published together) and reads back the used ring, like a virtio driver would. Raw setters
//!   let hostile-ring tests write anything.
//!
//! Test code: it panics on misuse rather than returning errors.

use std::collections::BTreeMap;

use iotlb::{Access, IovaRange, Perm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::{Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::ring::{avail_ring_len, desc_table_len, used_ring_len};

/// Page size of the test IOMMU.
pub const PAGE: u64 = 4096;

/// A tiny deterministic generator for tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Next 64 bits (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Guest-physical pages, handed out in a shuffled order.
#[derive(Debug)]
pub struct PageAllocator {
    free: Vec<u64>,
}

impl PageAllocator {
    /// The pages of `[base, base + len)`, shuffled with `seed`.
    pub fn new(base: u64, len: u64, seed: u64) -> Self {
        let mut free: Vec<u64> = (0..len / PAGE).map(|i| base + i * PAGE).collect();
        let mut rng = Rng::new(seed);
        for i in (1..free.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            free.swap(i, j);
        }
        PageAllocator { free }
    }

    /// One page.
    pub fn page(&mut self) -> u64 {
        self.free.pop().expect("test guest memory exhausted")
    }

    /// `n` physically contiguous pages are not needed: each page is independent.
    pub fn pages(&mut self, n: u64) -> Vec<u64> {
        (0..n).map(|_| self.page()).collect()
    }

    /// `n` physically contiguous free pages (the first such run in address order); returns
    /// the first one's address.
    pub fn contiguous(&mut self, n: u64) -> u64 {
        let mut sorted = self.free.clone();
        sorted.sort_unstable();
        let n = n.max(1) as usize;
        let start = sorted
            .windows(n)
            .find(|w| w[n - 1] - w[0] == (n as u64 - 1) * PAGE)
            .map(|w| w[0])
            .expect("no run of contiguous free pages that long");
        self.free
            .retain(|&p| p < start || p >= start + n as u64 * PAGE);
        start
    }

    /// Give a page back.
    pub fn free(&mut self, gpa: u64) {
        self.free.push(gpa);
    }
}

/// An I/O page table of 4 KiB pages.
#[derive(Debug, Default, Clone)]
pub struct IovaSpace {
    pages: BTreeMap<u64, (u64, Perm)>,
    identity: bool,
}

impl IovaSpace {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Addresses are guest-physical (no IOMMU): every address maps to itself, RW.
    pub fn identity() -> Self {
        IovaSpace {
            pages: BTreeMap::new(),
            identity: true,
        }
    }

    /// Map the page at `iova` to the page at `gpa`.
    pub fn map_page(&mut self, iova: u64, gpa: u64, perm: Perm) {
        assert!(iova % PAGE == 0 && gpa % PAGE == 0);
        self.pages.insert(iova, (gpa, perm));
    }

    /// Map `n` pages from `iova` to freshly allocated (scattered) pages; returns their gpas.
    pub fn map_new(
        &mut self,
        alloc: &mut PageAllocator,
        iova: u64,
        n: u64,
        perm: Perm,
    ) -> Vec<u64> {
        let gpas = if self.identity {
            (0..n).map(|i| iova + i * PAGE).collect()
        } else {
            alloc.pages(n)
        };
        if !self.identity {
            for (i, gpa) in gpas.iter().enumerate() {
                self.map_page(iova + i as u64 * PAGE, *gpa, perm);
            }
        }
        gpas
    }

    /// Map `n` pages from `iova` to `n` physically contiguous fresh pages, each its own 4 KiB
    /// mapping (as an IOMMU side answering page by page does); returns the first gpa.
    pub fn map_contiguous(
        &mut self,
        alloc: &mut PageAllocator,
        iova: u64,
        n: u64,
        perm: Perm,
    ) -> u64 {
        let base = if self.identity {
            iova
        } else {
            alloc.contiguous(n)
        };
        if !self.identity {
            for i in 0..n {
                self.map_page(iova + i * PAGE, base + i * PAGE, perm);
            }
        }
        base
    }

    /// Unmap the pages of `[iova, iova + len)`; returns their gpas.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Vec<u64> {
        let first = iova - iova % PAGE;
        let mut out = Vec::new();
        let mut p = first;
        while p < iova + len {
            if let Some((gpa, _)) = self.pages.remove(&p) {
                out.push(gpa);
            }
            p += PAGE;
        }
        out
    }

    /// Where `iova` is, and with which permission.
    pub fn translate(&self, iova: u64) -> Option<(u64, Perm)> {
        if self.identity {
            return Some((iova, Perm::ReadWrite));
        }
        let page = iova - iova % PAGE;
        self.pages
            .get(&page)
            .map(|&(gpa, perm)| (gpa + iova % PAGE, perm))
    }

    /// The UPDATE that answers a miss at `iova`: its page (the IOMMU side of a test).
    pub fn update_for(&self, iova: u64) -> Option<(IovaRange, u64, Perm)> {
        let page = iova - iova % PAGE;
        let (gpa, perm) = self.translate(page)?;
        Some((IovaRange::from_size(page, PAGE).ok()?, gpa, perm))
    }

    /// Every mapping, page by page.
    pub fn mappings(&self) -> impl Iterator<Item = (IovaRange, u64, Perm)> + '_ {
        self.pages.iter().filter_map(|(&iova, &(gpa, perm))| {
            Some((IovaRange::from_size(iova, PAGE).ok()?, gpa, perm))
        })
    }

    fn pieces(&self, iova: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let a = iova + done;
            let n = (PAGE - a % PAGE).min(len - done);
            let (gpa, _) = self
                .translate(a)
                .unwrap_or_else(|| panic!("driver access to unmapped IOVA {a:#x}"));
            f(gpa, done as usize, n as usize);
            done += n;
        }
    }

    /// The driver writes `data` at `iova` (it may write anything it mapped).
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M, iova: u64, data: &[u8]) {
        self.pieces(iova, data.len() as u64, |gpa, at, n| {
            mem.write_slice(&data[at..at + n], GuestAddress(gpa))
                .unwrap();
        });
    }

    /// The driver reads `len` bytes at `iova`.
    pub fn read<M: GuestMemoryBackend>(&self, mem: &M, iova: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.pieces(iova, len as u64, |gpa, at, n| {
            mem.read_slice(&mut out[at..at + n], GuestAddress(gpa))
                .unwrap();
        });
        out
    }
}

/// One buffer of a chain the driver builds.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Its IOVA.
    pub iova: u64,
    /// Its length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The driver side of a split ring.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    /// Descriptors of each outstanding head (to free them on completion).
    outstanding: BTreeMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
}

impl DriverQueue {
    /// Rings of `size` entries at `base` in `space` (mapped RW onto scattered pages): the
    /// descriptor table first, then the avail ring, then the used ring, each page-aligned.
    pub fn new<M: GuestMemoryBackend>(
        mem: &M,
        space: &mut IovaSpace,
        alloc: &mut PageAllocator,
        base: u64,
        size: u16,
    ) -> Self {
        let pages = |len: u64| len.div_ceil(PAGE);
        let desc = base;
        let avail = desc + pages(desc_table_len(size)) * PAGE;
        let used = avail + pages(avail_ring_len(size)) * PAGE;
        space.map_new(alloc, desc, pages(desc_table_len(size)), Perm::ReadWrite);
        space.map_new(alloc, avail, pages(avail_ring_len(size)), Perm::ReadWrite);
        space.map_new(alloc, used, pages(used_ring_len(size)), Perm::ReadWrite);
        let q = DriverQueue::at(size, desc, avail, used);
        // Zeroed rings.
        space.write(mem, desc, &vec![0u8; desc_table_len(size) as usize]);
        space.write(mem, avail, &vec![0u8; avail_ring_len(size) as usize]);
        space.write(mem, used, &vec![0u8; used_ring_len(size) as usize]);
        q
    }

    /// Rings of `size` entries over areas the caller placed, mapped in the driver's space and
    /// zeroed: the descriptor table at `desc`, the avail ring at `avail`, the used ring at
    /// `used`, anywhere (for a device that must see them at chosen addresses). Writes nothing.
    pub fn at(size: u16, desc: u64, avail: u64, used: u64) -> Self {
        DriverQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            outstanding: BTreeMap::new(),
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
        }
    }

    /// Descriptor table, avail and used ring addresses.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Use event indices (the driver writes used_event; the device writes avail_event).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Write descriptor `index` raw.
    pub fn write_desc<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        space: &IovaSpace,
        index: u16,
        d: Descriptor,
    ) {
        space.write(mem, self.desc + 16 * u64::from(index), &d.to_bytes());
    }

    /// Put `head` in the next avail slot and publish it.
    pub fn publish<M: GuestMemoryBackend>(&mut self, mem: &M, space: &IovaSpace, head: u16) {
        self.publish_all(mem, space, &[head]);
    }

    /// Put `heads` in the next avail slots, in order, and publish them with one index write
    /// (after a release fence: the device sees all of them or none).
    pub fn publish_all<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        space: &IovaSpace,
        heads: &[u16],
    ) {
        for &head in heads {
            let slot = u64::from(self.avail_idx % self.size);
            space.write(mem, self.avail + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        space.write(mem, self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// The avail index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The device's used index as it is now in memory.
    pub fn used_idx<M: GuestMemoryBackend>(&self, mem: &M, space: &IovaSpace) -> u16 {
        let b = space.read(mem, self.used + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Set the avail index raw (for hostile rings).
    pub fn set_avail_idx<M: GuestMemoryBackend>(&mut self, mem: &M, space: &IovaSpace, idx: u16) {
        self.avail_idx = idx;
        space.write(mem, self.avail + 2, &idx.to_le_bytes());
    }

    /// Set the avail flags (NO_INTERRUPT).
    pub fn set_avail_flags<M: GuestMemoryBackend>(&self, mem: &M, space: &IovaSpace, flags: u16) {
        space.write(mem, self.avail, &flags.to_le_bytes());
    }

    /// Set used_event (event index mode).
    pub fn set_used_event<M: GuestMemoryBackend>(&self, mem: &M, space: &IovaSpace, v: u16) {
        space.write(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            &v.to_le_bytes(),
        );
    }

    /// The device's used ring flags.
    pub fn used_flags<M: GuestMemoryBackend>(&self, mem: &M, space: &IovaSpace) -> u16 {
        let b = space.read(mem, self.used, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The device's avail_event (event index mode).
    pub fn avail_event<M: GuestMemoryBackend>(&self, mem: &M, space: &IovaSpace) -> u16 {
        let b = space.read(mem, self.used + 4 + 8 * u64::from(self.size), 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Build a chain of `bufs` (readable ones first), directly in the table or through an
    /// indirect table placed at `indirect_at` (an IOVA the caller mapped). Publishes it and
    /// returns its head, or `None` if descriptors ran out.
    pub fn add_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        space: &IovaSpace,
        bufs: &[Buf],
        indirect_at: Option<u64>,
    ) -> Option<u16> {
        let head = self.build_chain(mem, space, bufs, indirect_at)?;
        self.publish(mem, space, head);
        Some(head)
    }

    /// Build direct chains, one per element of `chains`, and publish them all with one avail
    /// index write, in order; returns their heads, or `None` (having written nothing) if the
    /// free descriptors do not cover them all or a chain is empty.
    pub fn add_chains<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        space: &IovaSpace,
        chains: &[&[Buf]],
    ) -> Option<Vec<u16>> {
        let needed: usize = chains.iter().map(|c| c.len()).sum();
        if needed > self.free.len() || chains.iter().any(|c| c.is_empty()) {
            return None;
        }
        let heads = chains
            .iter()
            .map(|bufs| self.build_chain(mem, space, bufs, None))
            .collect::<Option<Vec<u16>>>()?;
        self.publish_all(mem, space, &heads);
        Some(heads)
    }

    /// Write the descriptors of a chain (see [`DriverQueue::add_chain`]) without publishing
    /// it; returns its head.
    fn build_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        space: &IovaSpace,
        bufs: &[Buf],
        indirect_at: Option<u64>,
    ) -> Option<u16> {
        let descs: Vec<Descriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| Descriptor {
                addr: b.iova,
                len: b.len,
                flags: if b.write { DESC_F_WRITE } else { 0 }
                    | if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 },
                next: 0,
            })
            .collect();
        let head = match indirect_at {
            Some(table) => {
                let index = self.free.pop()?;
                for (i, mut d) in descs.into_iter().enumerate() {
                    if d.has_next() {
                        d.next = i as u16 + 1;
                    }
                    space.write(mem, table + 16 * i as u64, &d.to_bytes());
                }
                let d = Descriptor {
                    addr: table,
                    len: 16 * bufs.len() as u32,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                };
                self.write_desc(mem, space, index, d);
                self.outstanding.insert(index, vec![index]);
                index
            }
            None => {
                if self.free.len() < descs.len() || descs.is_empty() {
                    return None;
                }
                let indices: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
                for (i, mut d) in descs.into_iter().enumerate() {
                    if d.has_next() {
                        d.next = indices[i + 1];
                    }
                    self.write_desc(mem, space, indices[i], d);
                }
                self.outstanding.insert(indices[0], indices.clone());
                indices[0]
            }
        };
        Some(head)
    }

    /// Used entries the device added since the last call: `(head, len)`, in order. Frees
    /// their descriptors.
    pub fn take_used<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        space: &IovaSpace,
    ) -> Vec<(u16, u32)> {
        let used_idx = self.used_idx(mem, space);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size);
            let e = space.read(mem, self.used + 4 + 8 * slot, 8);
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            if let Some(descs) = self.outstanding.remove(&(id as u16)) {
                self.free.extend(descs);
            }
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Whether the device asks not to be kicked (no event index).
    pub fn device_suppresses_kicks<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        space: &IovaSpace,
    ) -> bool {
        self.used_flags(mem, space) & 1 != 0
    }
}

/// Access needed by a buffer.
pub fn access_of(b: &Buf) -> Access {
    if b.write {
        Access::Write
    } else {
        Access::Read
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Rings at chosen addresses; several chains published with one index write; the used
    /// entries read back and their descriptors freed.
    #[test]
    fn rings_at_chosen_addresses_and_batches() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let space = IovaSpace::identity();
        let (desc, avail, used) = (0x6000, 0x11000, 0x3000);
        let mut q = DriverQueue::at(8, desc, avail, used);
        assert_eq!(q.addresses(), (desc, avail, used));
        let a = [Buf {
            iova: 0x1000,
            len: 64,
            write: false,
        }];
        let b = [
            Buf {
                iova: 0x2000,
                len: 16,
                write: false,
            },
            Buf {
                iova: 0x4000,
                len: 32,
                write: true,
            },
        ];
        let heads = q.add_chains(&mem, &space, &[&a, &b]).unwrap();
        assert_eq!(heads, vec![0, 1]);
        assert_eq!(q.avail_idx(), 2);
        assert_eq!(space.read(&mem, avail + 2, 2), 2u16.to_le_bytes());
        assert_eq!(space.read(&mem, avail + 4, 4), [0, 0, 1, 0]);
        let d = space.read(&mem, desc + 16, 16);
        assert_eq!(d[..8], 0x2000u64.to_le_bytes());
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), DESC_F_NEXT);
        assert_eq!(u16::from_le_bytes([d[14], d[15]]), 2);
        assert_eq!(q.free_descriptors(), 5);
        // Too many descriptors: nothing written.
        let big = [a[0]; 6];
        assert!(q.add_chains(&mem, &space, &[&big]).is_none());
        assert!(q.add_chains(&mem, &space, &[&[]]).is_none());
        assert_eq!(q.avail_idx(), 2);
        // The device completes the second chain.
        space.write(&mem, used + 4, &[1, 0, 0, 0, 32, 0, 0, 0]);
        space.write(&mem, used + 2, &1u16.to_le_bytes());
        assert_eq!(q.used_idx(&mem, &space), 1);
        assert_eq!(q.take_used(&mem, &space), vec![(1, 32)]);
        assert_eq!(q.free_descriptors(), 7);
    }
}
