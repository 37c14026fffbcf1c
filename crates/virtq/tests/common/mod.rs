//! A test rig shared by the virtq integration tests: guest memory, an I/O page table, the
//! driver's ring, the device's queue and IOTLB, and the IOMMU side that answers misses.

#![allow(dead_code)]

use iotlb::{Iotlb, SharedIotlb};
use virtq::testing::{Buf, DriverQueue, IovaSpace, PageAllocator, PAGE};
use virtq::{Chain, GpaTranslator, IotlbTranslator, PopError, Queue, Translator};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: u64 = 8 << 20;
/// Where the rings live in IOVA space.
pub const RING_IOVA: u64 = 0x10_0000_0000;
/// Where buffers are allocated in IOVA space.
pub const BUF_IOVA: u64 = 0x20_0000_0000;

pub enum Tr {
    Gpa(GpaTranslator),
    Iotlb(IotlbTranslator<u16>),
}

impl Tr {
    pub fn get(&mut self) -> &mut dyn Translator {
        match self {
            Tr::Gpa(t) => t,
            Tr::Iotlb(t) => t,
        }
    }
}

pub struct Rig {
    pub mem: GuestMemoryMmap<()>,
    pub space: IovaSpace,
    pub alloc: PageAllocator,
    pub driver: DriverQueue,
    pub queue: Queue,
    pub iotlb: SharedIotlb<u16>,
    pub tr: Tr,
    pub next_buf: u64,
    pub misses_answered: u64,
}

impl Rig {
    /// A queue of `size`; with `iommu`, addresses are IOVAs on scattered pages and the IOTLB
    /// starts empty (every first access misses).
    pub fn new(size: u16, iommu: bool, capacity: usize, seed: u64) -> Self {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut alloc = PageAllocator::new(PAGE, MEM_SIZE - PAGE, seed);
        let mut space = if iommu {
            IovaSpace::new()
        } else {
            IovaSpace::identity()
        };
        let ring_base = if iommu { RING_IOVA } else { 0x10_0000 };
        let driver = DriverQueue::new(&mem, &mut space, &mut alloc, ring_base, size);
        let mut queue = Queue::new(size);
        queue.set_size(size).unwrap();
        let (d, a, u) = driver.addresses();
        queue.set_addresses(d, a, u).unwrap();
        let iotlb = SharedIotlb::new(Iotlb::with_capacity(capacity).unwrap());
        let tr = if iommu {
            Tr::Iotlb(IotlbTranslator::new(iotlb.handle()))
        } else {
            Tr::Gpa(GpaTranslator)
        };
        Rig {
            mem,
            space,
            alloc,
            driver,
            queue,
            iotlb,
            tr,
            next_buf: if iommu { BUF_IOVA } else { 0x40_0000 },
            misses_answered: 0,
        }
    }

    /// A buffer of `len` bytes at a fresh address, mapped read-write.
    pub fn buf(&mut self, len: u32, write: bool) -> Buf {
        let iova = self.next_buf;
        let pages = u64::from(len).div_ceil(PAGE).max(1);
        self.space
            .map_new(&mut self.alloc, iova, pages, iotlb::Perm::ReadWrite);
        self.next_buf += pages * PAGE + PAGE; // a hole between buffers
        Buf { iova, len, write }
    }

    /// The IOMMU side: answer a miss at `iova` with the UPDATE of its page.
    pub fn answer(&mut self, iova: u64) -> bool {
        match self.space.update_for(iova) {
            Some((range, gpa, perm)) => {
                self.iotlb.update(range, gpa, perm).unwrap();
                self.misses_answered += 1;
                true
            }
            None => false,
        }
    }

    /// Pop, answering misses as the IOMMU side would (at most `budget` of them).
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool, PopError> {
        for _ in 0..200 {
            match self.queue.pop(self.tr.get(), &self.mem, chain) {
                Err(PopError::Miss { iova, .. }) => {
                    assert!(self.answer(iova), "miss at unmapped IOVA {iova:#x}");
                }
                other => return other,
            }
        }
        panic!("still missing after 200 answered misses");
    }

    pub fn complete(&mut self, head: u16, len: u32) {
        for _ in 0..10 {
            match self.queue.complete(self.tr.get(), &self.mem, head, len) {
                Err(PopError::Miss { iova, .. }) => {
                    assert!(self.answer(iova));
                }
                other => return other.unwrap(),
            }
        }
        panic!("complete kept missing");
    }
}
