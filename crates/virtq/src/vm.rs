//! rust-vmm interop: the device IOTLB as vm-memory 0.18's IOMMU-aware `GuestMemory`.
//!
//! [`IotlbMemory`] pairs the guest-physical memory (any vm-memory `GuestMemoryBackend`, a
//! `GuestMemoryMmap` for instance) with a [`SharedIotlb`] whose targets are guest-physical
//! addresses. Every access a rust-vmm crate makes through it (virtio-queue reading rings and
//! descriptors, a device reading buffers) is an IOVA access: translated by our IOTLB with the
//! access direction checked, then served by the backend's volatile slices. A miss or a
//! permission failure is a `GuestMemoryError::IommuError` that names the IOVA, which is what
//! such a device needs to report a MISS. With the IOMMU switched off, accesses go straight to
//! the backend. This file only adapts; it never sends misses itself.
//!
//! A limit of virtio-queue, not of the adapter: it consumes an avail entry before walking
//! the chain and ends a chain silently when a descriptor read fails, so a miss on the
//! descriptor table or an indirect table loses that chain instead of reporting the IOVA. Only
//! misses on buffers (read by the device through this memory) surface. Our own engine
//! ([`crate::Queue`]) does not have that limit: it translates the whole chain first.

use std::iter::FusedIterator;

use iotlb::{Access, Segment, SharedIotlb, TranslateError};
use vm_memory::bitmap::MS;
use vm_memory::guest_memory::{
    Error as GuestMemoryError, GuestMemoryBackendSliceIterator, GuestMemorySliceIterator,
};
use vm_memory::iommu::{Error as IommuError, IovaRange as VmIovaRange};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions, VolatileSlice,
};

/// Guest-physical memory seen through the device IOTLB.
#[derive(Debug)]
pub struct IotlbMemory<M, W> {
    mem: M,
    iotlb: SharedIotlb<W>,
    enabled: bool,
}

impl<M: GuestMemoryBackend, W: Clone + PartialEq> IotlbMemory<M, W> {
    /// IOVA accesses to `mem` through `iotlb` (whose targets are guest-physical addresses).
    pub fn new(mem: M, iotlb: SharedIotlb<W>) -> Self {
        IotlbMemory {
            mem,
            iotlb,
            enabled: true,
        }
    }

    /// Switch translation on (IOVAs) or off (guest-physical addresses).
    pub fn set_iommu_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// The IOTLB.
    pub fn iotlb(&self) -> &SharedIotlb<W> {
        &self.iotlb
    }

    /// The guest-physical memory.
    pub fn backend(&self) -> &M {
        &self.mem
    }

    /// Translate for every access `perm` asks for; the segments of the last one.
    fn translate(
        &self,
        addr: u64,
        count: usize,
        perm: Permissions,
    ) -> Result<Vec<Segment>, GuestMemoryError> {
        let accesses: &[Access] = match perm {
            Permissions::Write => &[Access::Write],
            Permissions::ReadWrite => &[Access::Read, Access::Write],
            // `No` asks for no right; a translation must still exist.
            Permissions::Read | Permissions::No => &[Access::Read],
        };
        let mut segs = Vec::new();
        for &access in accesses {
            segs.clear();
            self.iotlb
                .with_cache(|tlb| tlb.translate_into(addr, count as u64, access, &mut segs))
                .map_err(|e| to_vm_error(e, count))?;
        }
        Ok(segs)
    }
}

/// Our translation error as vm-memory's, carrying the IOVA.
fn to_vm_error(e: TranslateError, count: usize) -> GuestMemoryError {
    let (iova, reason) = match e {
        TranslateError::Miss { iova, access } => (iova, format!("IOTLB miss for {access}")),
        TranslateError::Denied { iova, access } => {
            (iova, format!("IOTLB permission denied for {access}"))
        }
        TranslateError::Overflow { iova, .. } => (iova, "range runs past 2^64".to_string()),
    };
    GuestMemoryError::IommuError(IommuError::CannotResolve {
        iova_range: VmIovaRange {
            base: GuestAddress(iova),
            length: count,
        },
        reason,
    })
}

impl<M: GuestMemoryBackend, W: Clone + PartialEq> GuestMemory for IotlbMemory<M, W> {
    type PhysicalMemory = M;
    type Bitmap = <M::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.get_slices(addr, count, access) {
            Ok(mut it) => it.all(|s| s.is_ok()),
            Err(_) => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<
        impl GuestMemorySliceIterator<'a, vm_memory::bitmap::BS<'a, Self::Bitmap>>,
    > {
        let segs = if self.enabled {
            self.translate(addr.0, count, access)?
        } else if count == 0 {
            Vec::new()
        } else {
            vec![Segment {
                addr: addr.0,
                len: count as u64,
            }]
        };
        Ok(IotlbSlices {
            mem: &self.mem,
            segs,
            next: 0,
            cur: None,
            done: false,
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        (!self.enabled).then_some(&self.mem)
    }
}

/// The backend's slices of each translated segment, in order.
pub struct IotlbSlices<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    segs: Vec<Segment>,
    next: usize,
    cur: Option<GuestMemoryBackendSliceIterator<'a, M>>,
    done: bool,
}

impl<'a, M: GuestMemoryBackend> Iterator for IotlbSlices<'a, M> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, MS<'a, M>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if let Some(it) = &mut self.cur {
                match it.next() {
                    Some(Ok(s)) => return Some(Ok(s)),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => self.cur = None,
                }
            }
            let Some(seg) = self.segs.get(self.next) else {
                self.done = true;
                return None;
            };
            self.next += 1;
            self.cur = Some(
                self.mem
                    .get_slices(GuestAddress(seg.addr), seg.len as usize),
            );
        }
    }
}

impl<M: GuestMemoryBackend> FusedIterator for IotlbSlices<'_, M> {}

impl<'a, M: GuestMemoryBackend> GuestMemorySliceIterator<'a, MS<'a, M>> for IotlbSlices<'a, M> {}

#[cfg(test)]
mod tests {
    use super::*;
    use iotlb::{Iotlb, IovaRange, Perm};
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn iova_reads_and_writes_go_through_the_iotlb() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let tlb: SharedIotlb<u8> = SharedIotlb::new(Iotlb::new());
        // IOVA 0x10_0000..+0x1000 -> GPA 0x3000 (RW), 0x10_1000..+0x1000 -> GPA 0x1000 (RO).
        tlb.update(
            IovaRange::from_size(0x10_0000, 0x1000).unwrap(),
            0x3000,
            Perm::ReadWrite,
        )
        .unwrap();
        tlb.update(
            IovaRange::from_size(0x10_1000, 0x1000).unwrap(),
            0x1000,
            Perm::ReadOnly,
        )
        .unwrap();
        let m = IotlbMemory::new(mem, tlb);
        // A write spanning both mappings: the second is read-only.
        let err = m
            .write_slice(&[1u8; 16], GuestAddress(0x10_0ff8))
            .unwrap_err();
        match err {
            GuestMemoryError::IommuError(IommuError::CannotResolve { iova_range, .. }) => {
                assert_eq!(iova_range.base, GuestAddress(0x10_1000));
            }
            other => panic!("{other:?}"),
        }
        m.write_slice(&[7u8; 8], GuestAddress(0x10_0ff8)).unwrap();
        assert_eq!(
            m.backend()
                .read_obj::<[u8; 8]>(GuestAddress(0x3ff8))
                .unwrap(),
            [7; 8]
        );
        // A read spanning both: two backend slices.
        let mut buf = [0u8; 16];
        m.read_slice(&mut buf, GuestAddress(0x10_0ff8)).unwrap();
        assert_eq!(&buf[..8], &[7; 8]);
        // A miss names the IOVA.
        match m.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap_err() {
            GuestMemoryError::IommuError(IommuError::CannotResolve { iova_range, reason }) => {
                assert_eq!(iova_range.base, GuestAddress(0x20_0000));
                assert!(reason.contains("miss"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
