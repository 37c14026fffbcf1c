//! The vIOMMU's data structures: the I/O page table ([`PageTable`]: 4 KiB and 2 MiB pages,
//! and the runs a MISS is answered with), the IOVA allocator ([`IovaAllocator`]), and
//! [`coalesce`], the range arithmetic that merges a batch of unmaps. Plain data: nothing
//! here talks to a device or takes a lock; the policy (strict, lazy, pre-push, answers) is
//! the parent module's.

use std::collections::BTreeMap;

use iotlb::{IovaRange, Perm};

use super::{ViommuError, HUGE_PAGE, PAGE};

/// `ranges` sorted, with those that overlap or touch merged: the same IOVAs in as few
/// ranges as possible.
pub fn coalesce(ranges: &[IovaRange]) -> Vec<IovaRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.start());
    let mut out: Vec<IovaRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        if let Some(cur) = out.last_mut() {
            // `cur` ends at the top of the space, or `r` starts at or before the byte after it.
            if cur
                .last()
                .checked_add(1)
                .is_none_or(|next| r.start() <= next)
            {
                if r.last() > cur.last() {
                    *cur = IovaRange::new(cur.start(), r.last()).unwrap_or(*cur);
                }
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// One page table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pte {
    gpa: u64,
    perm: Perm,
    size: u64,
}

/// The I/O page table.
#[derive(Debug, Default)]
pub struct PageTable {
    ptes: BTreeMap<u64, Pte>,
}

impl PageTable {
    /// The entry holding `iova`: its IOVA and contents.
    fn entry(&self, iova: u64) -> Option<(u64, Pte)> {
        let (&start, pte) = self.ptes.range(..=iova).next_back()?;
        (iova - start < pte.size).then_some((start, *pte))
    }

    fn overlaps(&self, r: IovaRange) -> bool {
        self.entry(r.start()).is_some() || self.ptes.range(r.start()..=r.last()).next().is_some()
    }

    /// Map `len` bytes from `iova` to `gpa`, with 2 MiB pages where both are aligned.
    pub fn map(&mut self, iova: u64, gpa: u64, len: u64, perm: Perm) -> Result<(), ViommuError> {
        let unaligned = || ViommuError::Unaligned { iova, gpa, len };
        if len == 0 || (iova | gpa | len) % PAGE != 0 {
            return Err(unaligned());
        }
        let range = IovaRange::from_size(iova, len).map_err(|_| unaligned())?;
        gpa.checked_add(len - 1).ok_or_else(unaligned)?;
        if self.overlaps(range) {
            return Err(ViommuError::Busy(range));
        }
        let mut off = 0;
        while off < len {
            let (i, g) = (iova + off, gpa + off);
            let size = if i % HUGE_PAGE == 0 && g % HUGE_PAGE == 0 && len - off >= HUGE_PAGE {
                HUGE_PAGE
            } else {
                PAGE
            };
            self.ptes.insert(i, Pte { gpa: g, perm, size });
            off += size;
        }
        Ok(())
    }

    /// Unmap every page of `range` (which must not cut a large page).
    pub fn unmap(&mut self, range: IovaRange) -> Result<u64, ViommuError> {
        if let Some((start, _)) = self.entry(range.start()) {
            if start < range.start() {
                return Err(ViommuError::Unmap(range, "cuts a page"));
            }
        }
        let pages: Vec<(u64, Pte)> = self
            .ptes
            .range(range.start()..=range.last())
            .map(|(&i, p)| (i, *p))
            .collect();
        if let Some(&(i, p)) = pages.last() {
            if i + (p.size - 1) > range.last() {
                return Err(ViommuError::Unmap(range, "cuts a page"));
            }
        }
        if pages.is_empty() {
            return Err(ViommuError::Unmap(range, "nothing mapped"));
        }
        let mut bytes = 0;
        for (i, p) in pages {
            self.ptes.remove(&i);
            bytes += p.size;
        }
        Ok(bytes)
    }

    /// Guest-physical address and permission of `iova`.
    pub fn translate(&self, iova: u64) -> Option<(u64, Perm)> {
        self.entry(iova)
            .map(|(start, p)| (p.gpa + (iova - start), p.perm))
    }

    /// The UPDATE answering a miss at `iova`: the entry holding it and the entries after it
    /// that are contiguous in IOVA and guest-physical space with one permission, at most
    /// `limit` bytes (but always the whole entry holding `iova`).
    ///
    /// It starts at that entry, as a hardware IOMMU's translation does, never before it:
    /// answers to misses on one region then start where each miss was. DPDK's vhost library
    /// (22.11) takes an UPDATE whose start it already holds for the same entry, whatever its
    /// size, and drops it; an answer reaching back to an earlier start left its miss
    /// unanswered for ever (a MISS storm, the queue stalled).
    pub fn run(&self, iova: u64, limit: u64) -> Option<(IovaRange, u64, Perm)> {
        let (lo, pte) = self.entry(iova)?;
        let mut hi = lo + pte.size; // [lo, hi)
                                    // Accesses mostly walk upwards: what follows is likely next.
        while hi - lo < limit {
            match self.ptes.get(&hi) {
                Some(n)
                    if n.perm == pte.perm
                        && n.gpa == pte.gpa + (hi - lo)
                        && hi - lo + n.size <= limit =>
                {
                    hi += n.size
                }
                _ => break,
            }
        }
        Some((IovaRange::from_size(lo, hi - lo).ok()?, pte.gpa, pte.perm))
    }

    /// Entries mapped.
    pub fn len(&self) -> usize {
        self.ptes.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.ptes.is_empty()
    }
}

/// Hands out IOVA ranges; freed ranges are reused, exact size first.
#[derive(Debug)]
pub struct IovaAllocator {
    next: u64,
    end: u64,
    free: BTreeMap<u64, Vec<u64>>,
}

impl IovaAllocator {
    /// IOVAs from `base` to `end` (exclusive).
    pub fn new(base: u64, end: u64) -> Self {
        IovaAllocator {
            next: base,
            end,
            free: BTreeMap::new(),
        }
    }

    /// `len` bytes (rounded up to 4 KiB; 2 MiB-aligned from 2 MiB on).
    pub fn alloc(&mut self, len: u64) -> Result<u64, ViommuError> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        if let Some(list) = self.free.get_mut(&len) {
            if let Some(iova) = list.pop() {
                return Ok(iova);
            }
        }
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { PAGE };
        let iova = self.next.div_ceil(align) * align;
        let end = iova.checked_add(len).ok_or(ViommuError::NoSpace)?;
        if end > self.end {
            return Err(ViommuError::NoSpace);
        }
        self.next = end;
        Ok(iova)
    }

    /// Give `len` bytes at `iova` back.
    pub fn free(&mut self, iova: u64, len: u64) {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        self.free.entry(len).or_default().push(iova);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> IovaRange {
        IovaRange::from_size(start, len).unwrap()
    }

    #[test]
    fn coalesce_merges_what_touches_and_keeps_gaps() {
        let got = coalesce(&[
            r(0x3000, PAGE),
            r(0x1000, PAGE),
            r(0x2000, PAGE),
            r(0x9000, PAGE),
            r(0x8000, 2 * PAGE),
            r(0x20000, PAGE),
        ]);
        assert_eq!(
            got,
            vec![r(0x1000, 3 * PAGE), r(0x8000, 2 * PAGE), r(0x20000, PAGE)]
        );
        assert!(coalesce(&[]).is_empty());
        // The top of the space: no wrap, and everything after it is inside.
        let top = IovaRange::new(u64::MAX - 0xfff, u64::MAX).unwrap();
        assert_eq!(
            coalesce(&[
                top,
                IovaRange::new(u64::MAX - 0x1fff, u64::MAX - 0x1000).unwrap()
            ]),
            vec![IovaRange::new(u64::MAX - 0x1fff, u64::MAX).unwrap()]
        );
        assert_eq!(
            coalesce(&[IovaRange::FULL, r(0x1000, PAGE)]),
            vec![IovaRange::FULL]
        );
    }

    #[test]
    fn huge_and_small_pages() {
        let mut t = PageTable::default();
        t.map(
            HUGE_PAGE,
            4 * HUGE_PAGE,
            HUGE_PAGE + 2 * PAGE,
            Perm::ReadWrite,
        )
        .unwrap();
        assert_eq!(t.len(), 3, "one 2 MiB page, two 4 KiB pages");
        assert_eq!(
            t.translate(HUGE_PAGE + 0x1234),
            Some((4 * HUGE_PAGE + 0x1234, Perm::ReadWrite))
        );
        assert!(matches!(
            t.map(HUGE_PAGE + HUGE_PAGE, 0, PAGE, Perm::ReadOnly),
            Err(ViommuError::Busy(_))
        ));
        assert!(matches!(
            t.unmap(r(HUGE_PAGE + PAGE, PAGE)),
            Err(ViommuError::Unmap(_, "cuts a page"))
        ));
        assert_eq!(t.unmap(r(2 * HUGE_PAGE, 2 * PAGE)).unwrap(), 2 * PAGE);
        assert!(t.map(3, 0, PAGE, Perm::ReadOnly).is_err());
        assert!(t
            .map(u64::MAX - PAGE + 1, 0, 2 * PAGE, Perm::ReadOnly)
            .is_err());
    }

    #[test]
    fn runs_are_contiguous_in_both_spaces_with_one_permission() {
        let mut t = PageTable::default();
        // 0x10000.. -> 0x90000.. (4 pages), then a gap in GPA, then another permission.
        t.map(0x10000, 0x90000, 4 * PAGE, Perm::ReadWrite).unwrap();
        t.map(0x14000, 0xf0000, PAGE, Perm::ReadWrite).unwrap();
        t.map(0xf000, 0x8f000, PAGE, Perm::ReadOnly).unwrap();
        // From the faulting page forward, never back.
        assert_eq!(
            t.run(0x11234, 1 << 20),
            Some((r(0x11000, 3 * PAGE), 0x91000, Perm::ReadWrite))
        );
        assert_eq!(
            t.run(0x10000, 1 << 20),
            Some((r(0x10000, 4 * PAGE), 0x90000, Perm::ReadWrite))
        );
        // Limited.
        assert_eq!(
            t.run(0x11234, 2 * PAGE),
            Some((r(0x11000, 2 * PAGE), 0x91000, Perm::ReadWrite))
        );
        assert_eq!(
            t.run(0x11234, PAGE),
            Some((r(0x11000, PAGE), 0x91000, Perm::ReadWrite))
        );
        // Not backward when forward is exhausted.
        assert_eq!(
            t.run(0x13000, 3 * PAGE),
            Some((r(0x13000, PAGE), 0x93000, Perm::ReadWrite))
        );
        assert_eq!(t.run(0x20000, 1 << 20), None);
    }

    #[test]
    fn allocator_reuses_freed_ranges() {
        let mut a = IovaAllocator::new(0x1000_0000, 0x2000_0000);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(PAGE * 3).unwrap();
        assert_eq!(y, x + PAGE);
        let big = a.alloc(HUGE_PAGE).unwrap();
        assert_eq!(big % HUGE_PAGE, 0);
        a.free(x, 100);
        assert_eq!(a.alloc(PAGE).unwrap(), x);
        let mut small = IovaAllocator::new(0, 2 * PAGE);
        small.alloc(2 * PAGE).unwrap();
        assert!(matches!(small.alloc(PAGE), Err(ViommuError::NoSpace)));
    }
}
