//! The drivers' per-request buffers: a pool of guest-physical buffers (one unit each, a
//! whole number of pages) handed out for per-request mappings, poisoned once their unmap is
//! complete (strict: acknowledged; lazy: flushed) and checked intact when handed out again.
//! A device that wrote through a translation after acknowledging its invalidation breaks the
//! poison. Shared by the blk and net simulators; nothing here builds or reads a ring.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::DriverError;
use crate::vhost_user::GuestRam;
use crate::viommu::{Invalidation, Viommu};

/// Fill of freed pages.
pub(super) const POISON: u64 = 0xdead_beef_0bad_f00d;

pub(super) fn poison_page(out: &mut [u8]) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&POISON.to_le_bytes());
    }
}

/// What the poison checks found.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PoisonCount {
    /// Buffers checked when handed out again.
    pub(super) checks: u64,
    /// Of which found written after their unmap was complete.
    pub(super) violations: u64,
}

/// Buffers for per-request mappings, with poison checks.
#[derive(Debug)]
pub(super) struct PagePool {
    free: Vec<u64>,
    /// Buffers whose unmap is not complete yet (lazy): the invalidation count before it.
    deferred: Vec<(u64, u64)>,
    poisoned: HashSet<u64>,
    verify: bool,
    buf: Vec<u8>,
    expect: Vec<u8>,
    /// What the checks found so far.
    pub(super) count: PoisonCount,
}

impl PagePool {
    /// A pool of the buffers at `free`, `unit` bytes each; poison is kept only if `verify`.
    pub(super) fn new(free: Vec<u64>, unit: usize, verify: bool) -> Self {
        let mut expect = vec![0; unit];
        poison_page(&mut expect);
        PagePool {
            free,
            deferred: Vec::new(),
            poisoned: HashSet::new(),
            verify,
            buf: vec![0; unit],
            expect,
            count: PoisonCount::default(),
        }
    }

    /// Take a buffer, checking its poison. A lazy vIOMMU whose batch has not filled when the
    /// pool runs dry is flushed, as a guest's flush timer would.
    pub(super) fn take(
        &mut self,
        ram: &GuestRam,
        viommu: Option<&Viommu>,
    ) -> Result<u64, DriverError> {
        self.release_deferred(ram, viommu);
        if self.free.is_empty() && !self.deferred.is_empty() {
            if let Some(v) = viommu {
                v.flush()?;
            }
            self.release_deferred(ram, viommu);
        }
        let gpa = self
            .free
            .pop()
            .ok_or_else(|| DriverError::Config("per-request page pool empty".into()))?;
        if self.verify && self.poisoned.remove(&gpa) {
            ram.memory()
                .read_slice(&mut self.buf, GuestAddress(gpa))
                .map_err(|e| DriverError::Memory(e.to_string()))?;
            self.count.checks += 1;
            if self.buf != self.expect {
                self.count.violations += 1;
                tracing::error!(
                    gpa = %format_args!("{gpa:#x}"),
                    "driver: a page was written after its unmap was acknowledged"
                );
            }
        }
        Ok(gpa)
    }

    /// A buffer whose mappings are being torn down (`invalidations_before`: the vIOMMU's
    /// invalidation count before the unmap): poison it once no device may reach it.
    pub(super) fn put(
        &mut self,
        gpa: u64,
        invalidations_before: u64,
        ram: &GuestRam,
        viommu: Option<&Viommu>,
    ) {
        self.deferred.push((gpa, invalidations_before));
        self.release_deferred(ram, viommu);
    }

    /// Poison and free the buffers whose unmap is complete.
    pub(super) fn release_deferred(&mut self, ram: &GuestRam, viommu: Option<&Viommu>) {
        let done = viommu.map_or(u64::MAX, |v| {
            v.stats().invalidations.load(Ordering::Relaxed)
        });
        let strict = viommu.is_none_or(|v| v.config().invalidation == Invalidation::Strict);
        let mut i = 0;
        while i < self.deferred.len() {
            let (gpa, before) = self.deferred[i];
            // Strict: the unmap returned after the acknowledgement. Lazy: wait for a flush.
            if strict || done > before {
                self.deferred.swap_remove(i);
                if self.verify
                    && ram
                        .memory()
                        .write_slice(&self.expect, GuestAddress(gpa))
                        .is_ok()
                {
                    self.poisoned.insert(gpa);
                }
                self.free.push(gpa);
            } else {
                i += 1;
            }
        }
    }
}
