//! Guest memory and the IOMMU side's bookkeeping: the slots (sealed memfds: the core slots
//! holding the driver's rings and buffers, the extra ones for region-limit play and UPDATE
//! targets) and the regions describing them, which slots the back-end's table holds (and the
//! snapshots of core slots out of it), the free pages, reading, writing and poisoning guest
//! pages, and the answers to MISSes (from the driver's I/O page table, its multi-page extents
//! and the scratch pages).
//!
//! What it must not do: poison a page before the back-end acknowledged losing it (callers poison
//! after the ack); hand out from the free pages one of a straddle pair or of the ring zone;
//! answer a MISS for a page the IOMMU side unmapped (it stays unanswered until repaired); take
//! a core slot out of the model without its snapshot (`set_present` is the one way in).

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use iotlb::{IovaRange, Perm};
use rustix::fs::{MemfdFlags, SealFlags};
use virtq::testing::PAGE;
use vm_memory::{Bytes, GuestAddress};
use wire::vhost_user::{BackendRequest, MemoryRegion, RegionFd};
use wire::{IotlbMsg, WireError};

use super::checks::canary;
use super::frontend::is_timeout;
use super::{
    Failure, Harness, CORE_SIZE, CORE_SLOTS, EXTRA_GPA, EXTRA_SIZE, EXTRA_SLOTS, SCRATCH_IOVA,
    SCRATCH_PAGES, VA_BASE,
};

pub(super) fn sealed_memfd(name: &str, len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .expect("memfd");
    rustix::fs::ftruncate(&fd, len).expect("ftruncate");
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).expect("seals");
    fd
}

/// A page of a straddle pair (never in the allocator).
pub(super) fn is_straddle_page(gpa: u64) -> bool {
    gpa < CORE_SLOTS as u64 * CORE_SIZE
        && gpa > 0
        && (gpa & (CORE_SIZE - 1) == 0 || gpa & (CORE_SIZE - 1) == CORE_SIZE - PAGE)
        && gpa != CORE_SLOTS as u64 * CORE_SIZE - PAGE
}

pub(super) fn slot_of(gpa: u64) -> Option<usize> {
    if gpa < CORE_SLOTS as u64 * CORE_SIZE {
        return Some((gpa / CORE_SIZE) as usize);
    }
    if (EXTRA_GPA..EXTRA_GPA + EXTRA_SLOTS as u64 * EXTRA_SIZE).contains(&gpa) {
        return Some(CORE_SLOTS + ((gpa - EXTRA_GPA) / EXTRA_SIZE) as usize);
    }
    None
}

impl Harness {
    pub(super) fn region(&self, s: usize) -> MemoryRegion {
        let slot = &self.slots[s];
        MemoryRegion {
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: VA_BASE + slot.gpa,
            mmap_offset: 0,
        }
    }

    pub(super) fn region_fd(&self, s: usize) -> RegionFd {
        RegionFd {
            region: self.region(s),
            fd: self.slots[s].fd.try_clone().expect("dup"),
        }
    }

    pub(super) fn core_present(&self) -> bool {
        (0..CORE_SLOTS).all(|s| self.present.contains(&s))
    }

    /// The back-end's table is now `set`: snapshot the core slots that went out.
    pub(super) fn set_present(&mut self, set: BTreeSet<usize>) {
        for s in 0..CORE_SLOTS {
            if set.contains(&s) {
                self.snapshots.remove(&s);
            } else if !self.snapshots.contains_key(&s) {
                let slot = &self.slots[s];
                let snap = self.read_mem(slot.gpa, slot.size as usize);
                self.snapshots.insert(s, snap);
            }
        }
        self.present = set;
    }

    /// Answer the MISSes that have arrived.
    pub(super) fn serve_misses(&mut self) -> Result<(), Failure> {
        loop {
            let Some(chan) = self.channel.as_ref() else {
                return Ok(());
            };
            let msg = match chan.recv() {
                Ok(m) => m,
                Err(e) if is_timeout(&e) => return Ok(()),
                Err(WireError::Disconnected) => return Ok(()),
                Err(e) => return Err(format!("back-end channel: {e}")),
            };
            let req = BackendRequest::decode(&msg.header, &msg.payload, msg.fds)
                .map_err(|e| format!("back-end channel: undecodable request: {e}"))?;
            let iova = match req {
                BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, .. }) => iova,
                BackendRequest::IotlbMsg(IotlbMsg::AccessFail { .. }) => continue,
                other => return Err(format!("back-end channel: unexpected {other:?}")),
            };
            let page = iova & !(PAGE - 1);
            let answer = if let Some(&(start, gpa, n)) = self.extents.get(&page) {
                Some((start, gpa, n * PAGE, Perm::ReadWrite))
            } else if let Some((range, gpa, perm)) =
                self.space.update_for(iova).filter(|_| self.iommu)
            {
                range.size().map(|s| (range.start(), gpa, s, perm))
            } else if (SCRATCH_IOVA..SCRATCH_IOVA + SCRATCH_PAGES * PAGE).contains(&iova) {
                let i = (page - SCRATCH_IOVA) / PAGE;
                Some((page, EXTRA_GPA + i * PAGE, PAGE, Perm::ReadWrite))
            } else {
                None
            };
            if let Some((start, gpa, size, perm)) = answer {
                let range = IovaRange::from_size(start, size).expect("range");
                self.summary.misses += 1;
                // Refused when the target's region is out of the table: fine.
                self.iotlb(
                    "IOTLB UPDATE (miss answer)",
                    IotlbMsg::Update {
                        range,
                        uaddr: VA_BASE + gpa,
                        perm,
                    },
                )?;
            }
        }
    }

    pub(super) fn alloc_page(&mut self, reserve: usize) -> Option<u64> {
        if self.free.len() <= reserve {
            return None;
        }
        self.free.pop()
    }

    pub(super) fn write_page(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("guest write");
    }

    pub(super) fn read_mem(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("guest read");
        v
    }

    /// Poison `gpa` (the back-end acknowledged it can no longer reach it).
    pub(super) fn poison(&mut self, gpa: u64) {
        self.write_page(gpa, &canary(gpa));
        self.quarantine.push(gpa);
        self.summary.poisoned += 1;
        // A core slot out of the table: its snapshot follows our own writes.
        if let Some(s) = slot_of(gpa) {
            if let Some(snap) = self.snapshots.get_mut(&s) {
                let off = (gpa - self.slots[s].gpa) as usize;
                snap[off..off + PAGE as usize].copy_from_slice(&canary(gpa));
            }
        }
    }
}
