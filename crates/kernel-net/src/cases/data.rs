//! The data-path cases: frames through vhost-net's TX and RX queues with the device IOTLB in
//! the way (`used-ring`, `tx-cold`, `cross-page`, `rx`, `poison`, `prepush`). Each checks
//! frames byte for byte and counts MISSes; each undoes its mappings. No raw messages here:
//! every UPDATE and INVALIDATE goes through the vIOMMU or `frontend::kernel`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use frontend::viommu::DeviceIotlb;
use iotlb::{Access, IovaRange, Perm};
use vm_memory::{Bytes, GuestAddress};

use super::Ctx;
use crate::error::{expect_misses, KernelNetError, MissCount};
use crate::frames::{frame, is_ours, POISON, SRC_RX, SRC_TX, VNET_HDR};
use crate::layout::{page_of, CROSS_IOVA, PAGE, QSIZE, RAM, RING_IOVA, RX, TX};
use crate::net::Net;

/// `used-ring`: the kernel asked for the used ring read-only while attaching; answered with
/// the mapping's permission (read-write), its writes to it go through.
pub fn used_ring(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let net = &mut ctx.net;
    let used_iova = RING_IOVA + 5 * PAGE;
    let asked_ro = net
        .filter
        .log
        .iter()
        .any(|&(i, a)| page_of(i) == used_iova && a == Access::Read);
    if !asked_ro {
        return Err(KernelNetError::MissLog {
            expected: format!(
                "a read-only MISS for the TX used ring ({used_iova:#x}) at attach time"
            ),
            log: net.filter.log.clone(),
        });
    }
    // The first frame makes the kernel write the used ring: with a read-only answer it
    // would stall here, silently.
    let f = vec![frame(SRC_TX, 0, 60)];
    net.tx_fresh(&f, &mut ctx.pages)?;
    Ok("asked RO for the used ring, answered RW, a frame completed".into())
}

/// `tx-cold`: frames at fresh IOVAs, every one a MISS, each checked on the tap.
pub fn tx_cold(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let net = &mut ctx.net;
    let m0 = net.misses();
    let frames: Vec<Vec<u8>> = (1..=ctx.args.frames)
        .map(|s| frame(SRC_TX, s, 60 + (s as usize * 37) % 1400))
        .collect();
    net.tx_fresh(&frames, &mut ctx.pages)?;
    let cold = net.misses() - m0;
    expect_misses(
        format!("{} frames at fresh IOVAs", frames.len()),
        cold,
        MissCount::AtLeast(frames.len()),
        "the kernel used entries it was never given",
    )?;
    Ok(format!(
        "{} frames checked on the tap, {cold} MISSes, {} duplicates dropped",
        frames.len(),
        net.dev.stats().duplicates.load(Ordering::Relaxed)
    ))
}

/// `cross-page`: IOVA pages CROSS and CROSS+1 over guest pages far apart; a buffer across
/// them misses at its start, then exactly at the page boundary.
pub fn cross_page(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let (p1, p2) = (ctx.pages.next_page(), RAM - 2 * PAGE);
    let net = &mut ctx.net;
    net.map_ro_at(CROSS_IOVA, p1, PAGE)?;
    net.map_ro_at(CROSS_IOVA + PAGE, p2, PAGE)?;
    let f = frame(SRC_TX, 9999, 1200);
    let mut buf = vec![0u8; VNET_HDR];
    buf.extend_from_slice(&f);
    let off = PAGE - 500;
    let mem = net.ram.memory();
    mem.write_slice(&buf[..500], GuestAddress(p1 + off))?;
    mem.write_slice(&buf[500..], GuestAddress(p2))?;
    let m0 = net.filter.log.len();
    net.tap.drain();
    net.post(TX, &[(CROSS_IOVA + off, buf.len() as u32)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(&[f])?;
    let log = &net.filter.log[m0..];
    if !log.contains(&(CROSS_IOVA + off, Access::Read))
        || !log.contains(&(CROSS_IOVA + PAGE, Access::Read))
    {
        return Err(KernelNetError::MissLog {
            expected: format!(
                "read MISSes at {:#x} and at the page boundary {:#x}",
                CROSS_IOVA + off,
                CROSS_IOVA + PAGE
            ),
            log: log.to_vec(),
        });
    }
    Ok(format!(
        "{} MISSes: the buffer start, then exactly the page boundary",
        log.len()
    ))
}

/// A copy of the whole of guest memory.
fn snapshot(net: &Net) -> Result<Vec<u8>, KernelNetError> {
    let mut m = vec![0u8; RAM as usize];
    net.ram.memory().read_slice(&mut m, GuestAddress(0))?;
    Ok(m)
}

/// `rx`: frames injected on the tap land in translated buffers, and nothing else in guest
/// memory changes. The stack may send frames of its own out of the tap too (IPv6 neighbour
/// discovery): post spare buffers and look for ours among the used entries.
pub fn rx(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let n = ctx.args.frames.min(u32::from(QSIZE) / 4) as usize;
    let net = &mut ctx.net;
    let nbufs = 2 * n;
    let mut bufs = Vec::new();
    let mut gpas = Vec::new();
    for _ in 0..nbufs {
        let gpa = ctx.pages.next_page();
        net.ram
            .memory()
            .write_slice(&[0u8; PAGE as usize], GuestAddress(gpa))?;
        let iova = net.map(gpa, PAGE, Perm::WriteOnly)?;
        bufs.push((iova, PAGE as u32));
        gpas.push(gpa);
    }
    let heads = net.post(RX, &bufs, true)?;
    // Which buffer each head is.
    let buffer_of = |id: u16| heads.iter().position(|&h| h == id).map(|k| gpas[k]);
    // Let the kernel look at the new buffers, then freeze the picture of memory.
    std::thread::sleep(Duration::from_millis(50));
    net.serve()?;
    let before = snapshot(net)?;
    let frames: Vec<Vec<u8>> = (0..n as u32)
        .map(|s| frame(SRC_RX, s, 64 + (s as usize * 53) % 1000))
        .collect();
    let m0 = net.misses();
    for f in &frames {
        net.tap.inject(f)?;
    }
    // Collect our frames from the used ring as they land.
    let mut found: Vec<Vec<u8>> = Vec::new();
    let wait = Duration::from_secs(5);
    let deadline = Instant::now() + wait;
    while found.len() < n {
        net.serve()?;
        let used = net.used_idx(RX);
        for (id, len) in net.take_used(RX) {
            let gpa = buffer_of(id).ok_or(KernelNetError::ForeignUsed { queue: RX, id })?;
            let len = len as usize;
            if len > VNET_HDR && len <= PAGE as usize {
                let mut b = vec![0u8; len - VNET_HDR];
                net.ram
                    .memory()
                    .read_slice(&mut b, GuestAddress(gpa + VNET_HDR as u64))?;
                if is_ours(&b, SRC_RX) {
                    found.push(b);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(KernelNetError::RxLost {
                arrived: found.len(),
                injected: n,
                waited: wait,
                used,
                misses: net.misses() - m0,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if found != frames {
        return Err(KernelNetError::Check(
            "the frames in the RX buffers differ from those injected",
        ));
    }
    let after = snapshot(net)?;
    // Nothing changed but the buffers and the RX used ring page.
    let used_ring = net.rx.queue.addresses().2;
    let allowed = |a: u64| {
        let page = page_of(a);
        page == used_ring || gpas.contains(&page)
    };
    if let Some(a) = (0..RAM).find(|&a| before[a as usize] != after[a as usize] && !allowed(a)) {
        return Err(KernelNetError::StrayWrite(a));
    }
    Ok(format!(
        "{n} frames injected and found in translated buffers, {} MISSes, nothing else in \
         memory changed",
        net.misses() - m0
    ))
}

/// `poison`: IOVA X over page A sends frame A; INVALIDATE (unmap), poison A, map X over page
/// B with frame B: B goes out.
pub fn poison(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let (a, b) = (ctx.pages.next_page(), ctx.pages.next_page());
    let net = &mut ctx.net;
    let fa = frame(SRC_TX, 0xa, 300);
    let fb = frame(SRC_TX, 0xb, 300);
    let len = net.put_frame(a, &fa)?;
    net.put_frame(b, &fb)?;
    net.tap.drain();
    let x = net.map(a, PAGE, Perm::ReadOnly)?;
    net.post(TX, &[(x, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&fa))?;
    let m0 = net.misses();
    net.unmap(x, PAGE)?;
    net.ram
        .memory()
        .write_slice(&[POISON; PAGE as usize], GuestAddress(a))?;
    let y = net.map(b, PAGE, Perm::ReadOnly)?;
    if y != x {
        // The allocator hands a freed IOVA out again at once; if it did not, remap by hand.
        net.unmap(y, PAGE)?;
        net.map_ro_at(x, b, PAGE)?;
    }
    net.post(TX, &[(x, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&fb))?;
    Ok(format!(
        "after the INVALIDATE the new page went out; {} MISS for the remapped IOVA",
        net.misses_on(m0, &[x])
    ))
}

/// `prepush`: UPDATEs before the kick: no MISS.
pub fn prepush(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let net = &mut ctx.net;
    let frames: Vec<Vec<u8>> = (0..ctx.args.frames.min(16))
        .map(|s| frame(SRC_TX, 0x1000 + s, 200))
        .collect();
    let mut bufs = Vec::new();
    let mut iovas = Vec::new();
    for f in &frames {
        let gpa = ctx.pages.next_page();
        let len = net.put_frame(gpa, f)?;
        let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
        let range = IovaRange::from_size(iova, PAGE)?;
        net.dev.update(range, gpa, Perm::ReadOnly)?;
        bufs.push((iova, len));
        iovas.push(iova);
    }
    net.tap.drain();
    let m0 = net.misses();
    net.post(TX, &bufs, false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(&frames)?;
    let m = net.misses_on(m0, &iovas);
    for iova in iovas {
        net.unmap(iova, PAGE)?;
    }
    expect_misses(
        format!("{} buffers pushed before the kick", frames.len()),
        m,
        MissCount::None,
        "the UPDATEs written before the kick did not hold",
    )?;
    Ok(format!("{} frames, 0 MISSes", frames.len()))
}
