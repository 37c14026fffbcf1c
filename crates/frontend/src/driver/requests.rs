//! The driver's requests on the split ring: building a virtio-blk request (header, data,
//! status) in a slot, publishing the avail index, harvesting used entries and checking each
//! completion against what was written. Nothing here hands out or poisons buffer pages.

use std::sync::atomic::Ordering;
use std::time::Instant;

use iotlb::Perm;
use vm_memory::{Bytes, GuestAddress};

use super::ring::{F_NEXT, F_WRITE};
use super::{BlkDriver, DriverError, Mapping};
use crate::viommu::PAGE;

/// `VIRTIO_BLK_T_IN`.
pub(super) const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub(super) const T_OUT: u32 = 1;
/// Sector size.
pub(super) const SECTOR: u64 = 512;
/// Status byte before the device writes it.
pub(super) const STATUS_UNSET: u8 = 0xff;
/// A block whose content is unknown (a write that failed).
pub(super) const UNKNOWN: u32 = u32::MAX;

/// The content of `block` at `version` (version 0: a fresh, zeroed disk).
pub(super) fn pattern(block: u64, version: u32, out: &mut [u8]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    let seed = (block << 32) ^ u64::from(version);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = (seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xff51_afd7_ed55_8ccd);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// A request in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub(super) submitted: Instant,
    pub(super) write: bool,
    pub(super) block: u64,
    pub(super) version: u32,
    pub(super) data_gpa: u64,
    /// Per-request mappings to tear down: header, status, data.
    pub(super) maps: [u64; 3],
}

#[derive(Debug)]
pub(super) struct Slot {
    /// Header at +0, status at +16.
    pub(super) meta_gpa: u64,
    /// Persistent mappings of the header and status (device addresses).
    pub(super) hdr_dev: u64,
    pub(super) status_dev: u64,
    /// Persistent data pages: guest-physical, device address.
    pub(super) data: Vec<(u64, u64)>,
    /// First disk block of the slot's share and how many.
    pub(super) first_block: u64,
    pub(super) blocks: u64,
    pub(super) busy: Option<InFlight>,
}

impl BlkDriver<'_> {
    pub(super) fn submit(&mut self, s: usize) -> Result<(), DriverError> {
        let write = self.rng.below(100) < u64::from(self.cfg.write_percent);
        let (first, blocks, meta) = {
            let slot = &self.slots[s];
            (slot.first_block, slot.blocks, slot.meta_gpa)
        };
        let block = first + self.rng.below(blocks);
        let current = self.versions[block as usize];
        let version = if write {
            if current == UNKNOWN {
                1
            } else {
                current.wrapping_add(1).max(1)
            }
        } else {
            current
        };
        let per_request = self.viommu.is_some() && self.cfg.mapping == Mapping::PerRequest;
        let data_gpa = if per_request {
            self.pool.take(&self.ram, self.viommu.as_deref())?
        } else {
            let slot = &self.slots[s];
            slot.data[self.rng.below(slot.data.len() as u64) as usize].0
        };
        if write {
            pattern(block, version, &mut self.buf);
        } else {
            // Garbage, so that a read the device did not do is noticed.
            self.buf.fill(0xa5);
        }
        if write || self.cfg.verify {
            self.ram
                .memory()
                .write_slice(&self.buf, GuestAddress(data_gpa))
                .map_err(Self::mem_err)?;
        }
        // virtio_blk_outhdr, then the status byte.
        self.write(meta, if write { T_OUT } else { T_IN }.to_le())?;
        self.write(meta + 4, 0u32)?;
        self.write(meta + 8, (block * (self.bytes / SECTOR)).to_le())?;
        self.write(meta + 16, STATUS_UNSET)?;
        let data_perm = if write {
            Perm::ReadOnly
        } else {
            Perm::WriteOnly
        };
        let (hdr, status, data, maps) = if per_request {
            let v = self
                .viommu
                .as_ref()
                .ok_or_else(|| DriverError::Config("per-request mapping needs a vIOMMU".into()))?;
            let m = v.map_all(&[
                (meta, PAGE, Perm::ReadOnly),
                (meta, PAGE, Perm::WriteOnly),
                (data_gpa, self.bytes, data_perm),
            ])?;
            (m[0], m[1], m[2], [m[0], m[1], m[2]])
        } else {
            let slot = &self.slots[s];
            let dev = slot
                .data
                .iter()
                .find(|(g, _)| *g == data_gpa)
                .map_or(data_gpa, |&(_, d)| d);
            (slot.hdr_dev, slot.status_dev, dev, [0; 3])
        };
        let head = (s * 3) as u16;
        let descs: [(u64, u32, u16); 3] = [
            (hdr, 16, F_NEXT),
            (
                data,
                self.bytes as u32,
                F_NEXT | if write { 0 } else { F_WRITE },
            ),
            (status + 16, 1, F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let i = i as u16;
            self.ring
                .write_desc(&self.ram, head + i, addr, len, flags, head + i + 1)?;
        }
        self.ring.push(&self.ram, head)?;
        self.slots[s].busy = Some(InFlight {
            submitted: Instant::now(),
            write,
            block,
            version,
            data_gpa,
            maps,
        });
        Ok(())
    }

    pub(super) fn publish(&self) -> Result<(), DriverError> {
        self.ring.publish(&self.ram, false)
    }

    /// Take every completion the device published; returns how many.
    pub(super) fn harvest(&mut self) -> Result<usize, DriverError> {
        let used_idx = self.ring.used_idx(&self.ram)?;
        let mut n = 0;
        let mut teardown = Vec::new();
        while let Some((id, _)) = self.ring.next_used(&self.ram, used_idx)? {
            self.complete(id, &mut teardown)?;
            n += 1;
        }
        // Unmap the batch's buffers together, as a guest's completion handler does: their
        // INVALIDATEs go out pipelined, and the pages are freed once all are acknowledged.
        if let (Some(v), false) = (&self.viommu, teardown.is_empty()) {
            let before = v.stats().invalidations.load(Ordering::Relaxed);
            let mut ranges = Vec::with_capacity(3 * teardown.len());
            for (maps, _) in &teardown {
                let [h, st, d] = *maps;
                ranges.extend([(h, PAGE), (st, PAGE), (d, self.bytes)]);
            }
            v.unmap_all(&ranges)?;
            for (_, page) in teardown {
                self.pool.put(page, before, &self.ram, Some(v));
            }
        }
        Ok(n)
    }

    pub(super) fn complete(
        &mut self,
        id: u32,
        teardown: &mut Vec<([u64; 3], u64)>,
    ) -> Result<(), DriverError> {
        let s = (id / 3) as usize;
        let busy = if id % 3 == 0 {
            self.slots.get_mut(s).and_then(|slot| slot.busy.take())
        } else {
            None
        };
        let Some(r) = busy else {
            self.report.bad_completions += 1;
            tracing::error!(id, "driver: used entry for no request in flight");
            return Ok(());
        };
        let meta = self.slots[s].meta_gpa;
        let status: u8 = self
            .ram
            .memory()
            .read_obj(GuestAddress(meta + 16))
            .map_err(Self::mem_err)?;
        let ok = status == 0;
        if !ok {
            self.report.errors += 1;
            tracing::warn!(
                status,
                block = r.block,
                write = r.write,
                "driver: request failed"
            );
        }
        if r.write {
            self.report.writes += 1;
            self.versions[r.block as usize] = if ok { r.version } else { UNKNOWN };
        } else {
            self.report.reads += 1;
            if ok && self.cfg.verify && r.version != UNKNOWN {
                self.ram
                    .memory()
                    .read_slice(&mut self.buf, GuestAddress(r.data_gpa))
                    .map_err(Self::mem_err)?;
                pattern(r.block, r.version, &mut self.expect);
                if self.buf != self.expect {
                    self.report.verify_failures += 1;
                    tracing::error!(
                        block = r.block,
                        version = r.version,
                        gpa = %format_args!("{:#x}", r.data_gpa),
                        got = ?&self.buf[..16],
                        want = ?&self.expect[..16],
                        "driver: read returned wrong data"
                    );
                }
            }
        }
        if self.viommu.is_some() && self.cfg.mapping == Mapping::PerRequest {
            teardown.push((r.maps, r.data_gpa));
        }
        self.report.latency.record(r.submitted.elapsed());
        self.report.requests += 1;
        self.free_slots.push(s);
        Ok(())
    }
}
