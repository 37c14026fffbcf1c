//! Other IOTLBs, filled with the same mappings as ours, for side-by-side measurements.
//!
//! - [`VmMemoryIotlb`]: rust-vmm vm-memory 0.18's `Iotlb` (a `rangemap` `RangeMap`, unbounded);
//! - [`LinearIotlb`]: the DPDK algorithm: entries sorted by IOVA, searched linearly from the
//!   front until one starts past the address. DPDK walks a linked list; a `Vec` is cheaper to
//!   walk, so this is a lower bound on DPDK's cost.
//!
//! Only for benchmarks: these are not hardened against hostile input (vm-memory's panics on
//! a zero length and at the top of the address space, which is one reason we have our own).

use vm_memory::{GuestAddress, Permissions};

use crate::{Access, Mapping, Perm, Segment};

fn vm_perm(p: Perm) -> Permissions {
    match p {
        Perm::ReadOnly => Permissions::Read,
        Perm::WriteOnly => Permissions::Write,
        Perm::ReadWrite => Permissions::ReadWrite,
    }
}

fn vm_access(a: Access) -> Permissions {
    match a {
        Access::Read => Permissions::Read,
        Access::Write => Permissions::Write,
    }
}

/// vm-memory's `Iotlb` behind the same minimal interface as ours.
#[derive(Debug, Default)]
pub struct VmMemoryIotlb {
    tlb: vm_memory::Iotlb,
}

impl VmMemoryIotlb {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a mapping. It must not reach the last byte of the space (vm-memory panics there).
    pub fn update(&mut self, m: &Mapping) {
        let len = m.range.size().unwrap_or(u64::MAX) as usize;
        // Errors are impossible for vm-memory's `set_mapping` today; a benchmark must not
        // silently lose entries if that changes, so it is checked.
        if let Err(e) = self.tlb.set_mapping(
            GuestAddress(m.range.start()),
            GuestAddress(m.target),
            len,
            vm_perm(m.perm),
        ) {
            panic!("vm-memory refused a mapping: {e}");
        }
    }

    /// The first segment of a translation of `len` bytes at `iova`, as a caller would consume it.
    #[inline]
    pub fn translate_first(&self, iova: u64, len: usize, access: Access) -> Option<Segment> {
        let mut it =
            vm_memory::Iotlb::lookup(&self.tlb, GuestAddress(iova), len, vm_access(access)).ok()?;
        it.next().map(|r| Segment {
            addr: r.base.0,
            len: r.length as u64,
        })
    }
}

/// DPDK's IOTLB search: a sorted list scanned from the front.
#[derive(Debug, Default)]
pub struct LinearIotlb {
    entries: Vec<Mapping>,
}

impl LinearIotlb {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a mapping that overlaps none of the present ones (as DPDK, no overlap handling).
    pub fn update(&mut self, m: &Mapping) {
        let at = self
            .entries
            .partition_point(|e| e.range.start() < m.range.start());
        self.entries.insert(at, *m);
    }

    /// The first segment of a translation of `len` bytes at `iova`.
    #[inline]
    pub fn translate_first(&self, iova: u64, len: u64, access: Access) -> Option<Segment> {
        for e in &self.entries {
            if e.range.start() > iova {
                return None;
            }
            if e.range.contains(iova) {
                if !e.perm.allows(access) {
                    return None;
                }
                let end = e.range.last().min(iova.checked_add(len.checked_sub(1)?)?);
                return Some(Segment {
                    addr: e.target_of(iova)?,
                    len: end - iova + 1,
                });
            }
        }
        None
    }
}
