//! rust-vmm interop: virtio-queue 0.18's device-side `Queue`, unmodified, running over our
//! device IOTLB through `IotlbMemory` (vm-memory 0.18's IOMMU-aware `GuestMemory`). It pops and
//! reads a chain whose rings and buffers are IOVAs on scattered guest pages; a buffer the
//! IOTLB has no translation for yet fails with an IOMMU error naming its IOVA, and reads
//! once the UPDATE is in.

mod common;

use common::Rig;
use virtio_queue::{Queue as VqQueue, QueueOwnedT, QueueT};
use virtq::IotlbMemory;
use vm_memory::guest_memory::Error as GuestMemoryError;
use vm_memory::iommu::Error as IommuError;
use vm_memory::{Bytes, GuestAddress};

fn vq_queue(rig: &Rig, size: u16) -> VqQueue {
    let mut q = VqQueue::new(size).unwrap();
    q.set_size(size);
    let (desc, avail, used) = rig.driver.addresses();
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(desc);
    q.set_desc_table_address(l, h);
    let (l, h) = split(avail);
    q.set_avail_ring_address(l, h);
    let (l, h) = split(used);
    q.set_used_ring_address(l, h);
    q.set_ready(true);
    q
}

fn iova_of(err: &GuestMemoryError) -> u64 {
    match err {
        GuestMemoryError::IommuError(IommuError::CannotResolve { iova_range, .. }) => {
            iova_range.base.0
        }
        other => panic!("not an IOMMU error: {other:?}"),
    }
}

#[test]
fn virtio_queue_pops_and_reads_through_our_iotlb() {
    let mut rig = Rig::new(16, true, 2048, 21);
    let data: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let req = rig.buf(6000, false);
    let resp = rig.buf(16, true);
    rig.space.write(&rig.mem, req.iova, &data);
    let head = rig
        .driver
        .add_chain(&rig.mem, &rig.space, &[req, resp], None)
        .unwrap();
    let mem = IotlbMemory::new(rig.mem.clone(), rig.iotlb.clone());
    let mut q = vq_queue(&rig, 16);

    // No ring is translated yet: the queue cannot even read the avail index, and the error
    // names the avail ring's IOVA.
    let (_, avail, _) = rig.driver.addresses();
    let err = match q.iter(&mem) {
        Err(virtio_queue::Error::GuestMemory(e)) => e,
        other => panic!("{:?}", other.map(|_| ())),
    };
    assert_eq!(iova_of(&err), avail + 2);

    // The IOMMU side answers for the ring pages; buffers stay untranslated.
    let ring_pages: Vec<_> = rig
        .space
        .mappings()
        .filter(|(r, _, _)| r.start() < common::BUF_IOVA)
        .collect();
    for (range, gpa, perm) in ring_pages {
        rig.iotlb.update(range, gpa, perm).unwrap();
    }
    let chain = q.pop_descriptor_chain(&mem).expect("a chain");
    assert_eq!(chain.head_index(), head);
    let descs: Vec<_> = chain.collect();
    assert_eq!(descs.len(), 2);
    assert_eq!(descs[0].addr(), GuestAddress(req.iova));
    assert!(descs[1].is_write_only());

    // Reading the buffer misses, with its IOVA.
    let mut buf = vec![0u8; 6000];
    let err = mem.read_slice(&mut buf, descs[0].addr()).unwrap_err();
    assert_eq!(iova_of(&err), req.iova);

    // Answered, it reads (over scattered pages: several backend slices).
    rig.answer(req.iova);
    let err = mem.read_slice(&mut buf, descs[0].addr()).unwrap_err();
    assert_eq!(
        iova_of(&err),
        req.iova + 4096,
        "the second page misses next"
    );
    rig.answer(req.iova + 4096);
    mem.read_slice(&mut buf, descs[0].addr()).unwrap();
    assert_eq!(buf, data);

    // A write to the response buffer, and the used entry through virtio-queue.
    rig.answer(resp.iova);
    mem.write_slice(b"virtio-queue ok!", descs[1].addr())
        .unwrap();
    q.add_used(&mem, head, 16).unwrap();
    assert_eq!(rig.driver.take_used(&rig.mem, &rig.space), vec![(head, 16)]);
    assert_eq!(rig.space.read(&rig.mem, resp.iova, 16), b"virtio-queue ok!");
}
