//! One split ring as the driver side sees it: its three areas laid out in guest RAM (and
//! mapped for good behind the IOMMU, as a guest driver maps its rings), descriptors written
//! and heads put on the available ring, the index published with release ordering (and a
//! kick unless the device asked for none), used entries taken in order. It knows nothing of
//! what the descriptors carry.

use std::sync::atomic::{fence, Ordering};

use iotlb::Perm;
use vm_memory::{Bytes, GuestAddress};

use super::{Bump, DriverError};
use crate::vhost_user::{GuestRam, Notifiers, RingSetup, VhostUserFrontend};
use crate::viommu::PAGE;

/// `VIRTQ_DESC_F_NEXT`.
pub(super) const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub(super) const F_WRITE: u16 = 2;
/// `VIRTQ_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;

/// A started split ring, driver side (addresses guest-physical).
#[derive(Debug)]
pub(super) struct DriverRing {
    pub(super) index: u16,
    pub(super) size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Heads put on the available ring so far (wrapping).
    pub(super) avail_idx: u16,
    last_used: u16,
    pub(super) notifiers: Notifiers,
}

fn mem_err(e: impl std::fmt::Display) -> DriverError {
    DriverError::Memory(e.to_string())
}

/// Bytes of each area of a ring of `n` entries, whole pages.
fn areas(n: u64) -> [u64; 3] {
    [16 * n, 6 + 2 * n, 6 + 8 * n].map(|b| b.div_ceil(PAGE) * PAGE)
}

impl DriverRing {
    /// Guest RAM a ring of `size` entries takes.
    pub(super) fn ram_needed(size: u16) -> u64 {
        areas(u64::from(size)).iter().sum()
    }

    /// Lay ring `index` of `size` entries out from `bump`, map it behind the IOMMU and start
    /// it on the device. All three areas are mapped read-write, as Linux maps a ring (coherent
    /// DMA memory is bidirectional); a device needs only read access to the descriptors and
    /// the available ring, but DPDK's vhost library asks for read-write and would miss for
    /// ever on a read-only mapping.
    pub(super) fn start(
        fe: &VhostUserFrontend,
        bump: &mut Bump,
        index: u16,
        size: u16,
    ) -> Result<Self, DriverError> {
        let [d, a, u] = areas(u64::from(size));
        let (desc, avail, used) = (
            bump.pages(d / PAGE)?,
            bump.pages(a / PAGE)?,
            bump.pages(u / PAGE)?,
        );
        let (desc_dev, avail_dev, used_dev) = match fe.viommu() {
            Some(v) => (
                v.map(desc, d, Perm::ReadWrite)?,
                v.map(avail, a, Perm::ReadWrite)?,
                v.map(used, u, Perm::ReadWrite)?,
            ),
            None => (desc, avail, used),
        };
        let notifiers = fe.start_queue(RingSetup {
            index,
            size,
            desc: desc_dev,
            avail: avail_dev,
            used: used_dev,
        })?;
        Ok(DriverRing {
            index,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            notifiers,
        })
    }

    /// Write descriptor `i`.
    pub(super) fn write_desc(
        &self,
        ram: &GuestRam,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let m = ram.memory();
        m.write_obj(addr.to_le(), at).map_err(mem_err)?;
        m.write_obj(len.to_le(), GuestAddress(at.0 + 8))
            .map_err(mem_err)?;
        m.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .map_err(mem_err)?;
        m.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .map_err(mem_err)
    }

    /// Put the chain at `head` on the available ring (seen by the device once published).
    pub(super) fn push(&mut self, ram: &GuestRam, head: u16) -> Result<(), DriverError> {
        let slot = u64::from(self.avail_idx % self.size);
        ram.memory()
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .map_err(mem_err)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publish the available index (descriptors and entries before it: release), and kick,
    /// always or (`honour_no_notify`) unless the device set `VIRTQ_USED_F_NO_NOTIFY`.
    pub(super) fn publish(
        &self,
        ram: &GuestRam,
        honour_no_notify: bool,
    ) -> Result<(), DriverError> {
        let m = ram.memory();
        m.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .map_err(mem_err)?;
        if honour_no_notify {
            // The index store before the flags load, as a driver's mb() before it reads the
            // suppression flags: otherwise a device going to sleep could miss both.
            fence(Ordering::SeqCst);
            let flags = u16::from_le(
                m.load::<u16>(GuestAddress(self.used), Ordering::Acquire)
                    .map_err(mem_err)?,
            );
            if flags & USED_F_NO_NOTIFY != 0 {
                return Ok(());
            }
        }
        self.notifiers.kick();
        Ok(())
    }

    /// The used index the device published.
    pub(super) fn used_idx(&self, ram: &GuestRam) -> Result<u16, DriverError> {
        ram.memory()
            .load::<u16>(GuestAddress(self.used + 2), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)
    }

    /// The next used entry (id, length) below `used_idx`, if any.
    pub(super) fn next_used(
        &mut self,
        ram: &GuestRam,
        used_idx: u16,
    ) -> Result<Option<(u32, u32)>, DriverError> {
        if self.last_used == used_idx {
            return Ok(None);
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let m = ram.memory();
        let id: u32 = m.read_obj(GuestAddress(at)).map_err(mem_err)?;
        let len: u32 = m.read_obj(GuestAddress(at + 4)).map_err(mem_err)?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((u32::from_le(id), u32::from_le(len))))
    }
}
