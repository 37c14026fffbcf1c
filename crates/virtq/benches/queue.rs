//! Criterion bench of the queue engine: pop (walk and translate a chain) plus complete, for
//! chains of 1 and 4 buffers, with the IOMMU off (guest-physical addresses) and on (IOVAs on
//! scattered pages, IOTLB warm), in one run. The driver refills the ring between batches,
//! outside the timed part. Throughput is in chains per second.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iotlb::{Iotlb, Perm, SharedIotlb};
use virtq::testing::{Buf, DriverQueue, IovaSpace, PageAllocator, PAGE};
use virtq::{Chain, GpaTranslator, IotlbTranslator, Queue, Translator};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const SIZE: u16 = 256;
const MEM: u64 = 64 << 20;

struct Setup {
    mem: GuestMemoryMmap<()>,
    space: IovaSpace,
    driver: DriverQueue,
    queue: Queue,
    /// The buffers of each chain the driver keeps re-adding.
    chains: Vec<Vec<Buf>>,
}

fn setup(iommu: bool, buffers: usize) -> (Setup, Box<dyn Translator>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut alloc = PageAllocator::new(PAGE, MEM - PAGE, 7);
    let mut space = if iommu {
        IovaSpace::new()
    } else {
        IovaSpace::identity()
    };
    let base = if iommu { 0x10_0000_0000 } else { 0x10_0000 };
    let driver = DriverQueue::new(&mem, &mut space, &mut alloc, base, SIZE);
    let mut next = if iommu { 0x20_0000_0000 } else { 0x100_0000 };
    let chains = (0..SIZE as usize / buffers)
        .map(|_| {
            (0..buffers)
                .map(|i| {
                    let iova = next;
                    space.map_new(&mut alloc, iova, 1, Perm::ReadWrite);
                    next += PAGE;
                    Buf {
                        iova,
                        len: 512,
                        write: i + 1 == buffers,
                    }
                })
                .collect()
        })
        .collect();
    let mut queue = Queue::new(SIZE);
    queue.set_size(SIZE).unwrap();
    let (d, a, u) = driver.addresses();
    queue.set_addresses(d, a, u).unwrap();
    let tr: Box<dyn Translator> = if iommu {
        let tlb: SharedIotlb<u16> = SharedIotlb::new(Iotlb::new());
        for (range, gpa, perm) in space.mappings() {
            tlb.update(range, gpa, perm).unwrap();
        }
        Box::new(IotlbTranslator::new(tlb.handle()))
    } else {
        Box::new(GpaTranslator)
    };
    (
        Setup {
            mem,
            space,
            driver,
            queue,
            chains,
        },
        tr,
    )
}

fn pop_complete(c: &mut Criterion) {
    let mut g = c.benchmark_group("pop_complete");
    for buffers in [1usize, 4] {
        for iommu in [false, true] {
            let (mut s, mut tr) = setup(iommu, buffers);
            let per_batch = s.chains.len() as u64;
            g.throughput(Throughput::Elements(per_batch));
            let name = if iommu { "iommu_on" } else { "iommu_off" };
            g.bench_function(BenchmarkId::new(name, format!("{buffers}seg")), |b| {
                let mut chain = Chain::new();
                b.iter_custom(|batches| {
                    let mut total = Duration::ZERO;
                    for _ in 0..batches {
                        for bufs in &s.chains {
                            s.driver.add_chain(&s.mem, &s.space, bufs, None).unwrap();
                        }
                        let t = Instant::now();
                        while s.queue.pop(&mut *tr, &s.mem, &mut chain).unwrap() {
                            let head = chain.head();
                            let len = chain.writable_len();
                            s.queue.complete(&mut *tr, &s.mem, head, len).unwrap();
                        }
                        total += t.elapsed();
                        s.driver.take_used(&s.mem, &s.space);
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = pop_complete
}
criterion_main!(benches);
