//! The driver's per-request buffer pages: a pool of guest-physical pages handed out for
//! per-request mappings, poisoned once their unmap is complete (strict: acknowledged; lazy:
//! flushed) and checked intact when handed out again. Nothing here builds or reads the ring.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::{BlkDriver, DriverError};
use crate::viommu::Invalidation;

/// Fill of freed pages.
pub(super) const POISON: u64 = 0xdead_beef_0bad_f00d;

pub(super) fn poison_page(out: &mut [u8]) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&POISON.to_le_bytes());
    }
}

/// Buffers for per-request mappings, with poison checks.
#[derive(Debug)]
pub(super) struct PagePool {
    pub(super) free: Vec<u64>,
    /// Pages whose unmap is not complete yet (lazy): the invalidation count before it.
    pub(super) deferred: Vec<(u64, u64)>,
    pub(super) poisoned: std::collections::HashSet<u64>,
}

impl BlkDriver<'_> {
    /// Take a page for a per-request buffer, checking its poison.
    pub(super) fn take_page(&mut self) -> Result<u64, DriverError> {
        self.release_deferred();
        if self.pool.free.is_empty() && !self.pool.deferred.is_empty() {
            // Lazy mode ran the pool dry before a batch filled: flush now, as a guest's
            // flush timer would.
            if let Some(v) = &self.viommu {
                v.flush()?;
            }
            self.release_deferred();
        }
        let gpa = self
            .pool
            .free
            .pop()
            .ok_or_else(|| DriverError::Config("per-request page pool empty".into()))?;
        if self.cfg.verify && self.pool.poisoned.remove(&gpa) {
            self.ram
                .memory()
                .read_slice(&mut self.buf, GuestAddress(gpa))
                .map_err(Self::mem_err)?;
            poison_page(&mut self.expect);
            self.report.poison_checks += 1;
            if self.buf != self.expect {
                self.report.poison_violations += 1;
                tracing::error!(
                    gpa = %format_args!("{gpa:#x}"),
                    "driver: a page was written after its unmap was acknowledged"
                );
            }
        }
        Ok(gpa)
    }

    /// A page whose mappings are being torn down: poison it once no device may reach it.
    pub(super) fn put_page(&mut self, gpa: u64, invalidations_before: u64) {
        self.pool.deferred.push((gpa, invalidations_before));
        self.release_deferred();
    }

    pub(super) fn release_deferred(&mut self) {
        let done = match &self.viommu {
            Some(v) => v.stats().invalidations.load(Ordering::Relaxed),
            None => u64::MAX,
        };
        let strict = self
            .viommu
            .as_ref()
            .is_none_or(|v| v.config().invalidation == Invalidation::Strict);
        let mut i = 0;
        while i < self.pool.deferred.len() {
            let (gpa, before) = self.pool.deferred[i];
            // Strict: the unmap returned after the acknowledgement. Lazy: wait for a flush.
            if strict || done > before {
                self.pool.deferred.swap_remove(i);
                if self.cfg.verify {
                    poison_page(&mut self.buf);
                    if self
                        .ram
                        .memory()
                        .write_slice(&self.buf, GuestAddress(gpa))
                        .is_ok()
                    {
                        self.pool.poisoned.insert(gpa);
                    }
                }
                self.pool.free.push(gpa);
            } else {
                i += 1;
            }
        }
    }
}
