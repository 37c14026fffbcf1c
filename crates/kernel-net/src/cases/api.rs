//! The kernel's side of the device-IOTLB API, each rule shown on this kernel: the MISS as it
//! is written (`msg-format`), what `write()` returns (`write-rules`), an UPDATE over an entry
//! (`update-no-replace`), an INVALIDATE inside an entry (`invalidate-whole`), the entry limit
//! (`capacity`), SET_FEATURES (`set-features`), the whole-space INVALIDATE
//! (`invalidate-all`) and SET_BACKEND without a memory table (`no-mem-table`).
//!
//! These cases write raw messages ([`crate::msg`]) behind the vIOMMU's back on purpose; each
//! removes what it wrote before it returns. They test the kernel, not our transport.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use frontend::kernel::{KernelError, VhostKernel, NET_FEATURES};
use frontend::vhost_user::GuestRam;
use frontend::viommu::DeviceIotlb;
use iotlb::{Access, IovaRange, Perm};
use rustix::io::Errno;
use wire::features::backend as backend_f;

use super::Ctx;
use crate::error::{expect_misses, KernelNetError, MissCount};
use crate::frames::{frame, SRC_TX};
use crate::layout::{PAGE, QSIZE, RAM, RING_IOVA, TX};
use crate::msg::{
    expect_whole, raw, INVALIDATE, MISS, RO, UPDATE, V1, V2, VHOST_MSG_MIN_SIZE, VHOST_MSG_SIZE,
};
use crate::sys::{eventfd, Tap};

/// Wait until the vhost fd has a message to read, for at most `timeout` (zero: only look);
/// whether it has one. The error is a failed poll.
fn wait_readable(dev: &VhostKernel, timeout: Duration) -> Result<bool, KernelNetError> {
    let deadline = std::time::Instant::now() + timeout;
    let fd = dev.fd();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 && fds[0].revents().contains(rustix::event::PollFlags::IN) => {
                return Ok(true)
            }
            Ok(_) if left.is_zero() => return Ok(false),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                return Err(KernelNetError::Sys {
                    op: "poll on the vhost fd".into(),
                    source: e,
                })
            }
        }
    }
}

/// `msg-format`: the MISS as the kernel writes it, how a short read treats it, its repeats.
pub fn msg_format(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let gpa = ctx.pages.next_page();
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let f = frame(SRC_TX, 0x2000, 100);
    let len = net.put_frame(gpa + 0x123, &f)?;
    let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
    let addr = iova + 0x123;
    net.tap.drain();
    net.post(TX, &[(addr, len)], false)?;
    // Wait for the kernel's MISS without answering it. poll(), not a short read: the kernel
    // answers a read shorter than a message with 0 before it looks at its queue, so a short
    // read says nothing about whether the MISS is there yet (the vhost worker may not have
    // run).
    let wait = Duration::from_secs(5);
    if !wait_readable(&dev, wait)? {
        return Err(KernelNetError::Timeout {
            what: "MISS to read on the vhost fd",
            waited: wait,
        });
    }
    // With the MISS queued, a read shorter than a message returns 0 ...
    let mut small = [0u8; 40];
    match dev.read_raw(&mut small) {
        Ok(0) => {}
        Ok(n) => {
            return Err(KernelNetError::Unexpected {
                what: "a 40-byte read with the MISS queued",
                expected: "0".into(),
                got: n.to_string(),
            })
        }
        Err(e) => {
            return Err(KernelNetError::Sys {
                op: "a 40-byte read".into(),
                source: e,
            })
        }
    }
    // ... and consumes nothing: the message is still there, whole.
    if !wait_readable(&dev, Duration::ZERO)? {
        return Err(KernelNetError::Unexpected {
            what: "after the 40-byte read",
            expected: "the MISS still queued".into(),
            got: "nothing to read (the MISS is gone)".into(),
        });
    }
    let mut m = [0u8; 128];
    let n = dev
        .read_raw(&mut m)
        .map_err(KernelNetError::sys("read of the MISS"))?;
    let want = raw(V2, MISS, addr, 0, 0, RO);
    let got = &m[..n.min(VHOST_MSG_SIZE)];
    if n != VHOST_MSG_SIZE || got != want {
        return Err(KernelNetError::MissBytes {
            read: n,
            got: got.to_vec(),
            expected: want.to_vec(),
        });
    }
    // Retries repeat it identically; then EAGAIN.
    let mut repeats = 0;
    loop {
        match dev.read_raw(&mut m) {
            Ok(VHOST_MSG_SIZE) if m[..VHOST_MSG_SIZE] == want[..] => repeats += 1,
            Ok(n) => {
                return Err(KernelNetError::Unexpected {
                    what: "a read after the MISS",
                    expected: "the MISS repeated or EAGAIN".into(),
                    got: format!("{:02x?}", m.get(..n).unwrap_or(&m[..])),
                })
            }
            Err(Errno::AGAIN) => break,
            Err(e) => {
                return Err(KernelNetError::Sys {
                    op: "read after the MISS".into(),
                    source: e,
                })
            }
        }
    }
    net.filter.log.push((addr, Access::Read));
    if !net.viommu.fault(&*dev, addr, Access::Read)? {
        return Err(KernelNetError::NoMapping {
            device: "kernel",
            iova: addr,
        });
    }
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(&[f])?;
    net.unmap(iova, PAGE)?;
    Ok(format!(
        "72 bytes, v2, exact IOVA not page-aligned, size 0, uaddr 0, RO, zero tail; a 40-byte \
         read returns 0 and takes nothing; {repeats} identical repeats, then EAGAIN"
    ))
}

/// `write-rules`: what `write()` returns for short, malformed and odd messages.
pub fn write_rules(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let gpa = ctx.pages.next_page();
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let iova = 0x7_2000_0000;
    net.map_ro_at(iova, gpa, PAGE)?;
    let uaddr = net.ram.va(gpa);
    // 40 bytes (header and payload, no padding) are enough; 72 is reported.
    expect_whole(
        "a 40-byte UPDATE",
        dev.write_raw(&raw(V2, UPDATE, iova, PAGE, uaddr, RO)[..VHOST_MSG_MIN_SIZE]),
    )?;
    let f = frame(SRC_TX, 0x2001, 120);
    let m = net.send_check(gpa, iova, &f, &f)?;
    expect_misses(
        "the page after a 40-byte UPDATE",
        m,
        MissCount::None,
        "the UPDATE was not applied",
    )?;
    let expect_err = |what: &str, r: Result<usize, Errno>, e: Errno| match r {
        Err(got) if got == e => Ok(()),
        got => Err(KernelNetError::WriteAnswer {
            what: what.into(),
            got,
            expected: Err(e),
        }),
    };
    let mut bad = raw(V2, UPDATE, iova, PAGE, uaddr, RO);
    bad[0] = 99;
    expect_err("unknown header type", dev.write_raw(&bad), Errno::INVAL)?;
    expect_err(
        "UPDATE of size 0",
        dev.write_raw(&raw(V2, UPDATE, iova, 0, uaddr, RO)),
        Errno::INVAL,
    )?;
    expect_err(
        "unknown IOTLB type",
        dev.write_raw(&raw(V2, 77, iova, PAGE, uaddr, RO)),
        Errno::FAULT,
    )?;
    // INVALIDATE of size 0, and one past the top of the address space: success, and nothing
    // removed.
    expect_whole(
        "INVALIDATE size 0",
        dev.write_raw(&raw(V2, INVALIDATE, iova, 0, 0, 0)),
    )?;
    expect_whole(
        "INVALIDATE overflowing",
        dev.write_raw(&raw(V2, INVALIDATE, u64::MAX - 0xfff, 0x10000, 0, 0)),
    )?;
    let m = net.send_check(gpa, iova, &f, &f)?;
    expect_misses(
        "the page after a size-0 and an overflowing INVALIDATE",
        m,
        MissCount::None,
        "one of them removed the entry",
    )?;
    // v1 is accepted on a v2 device: a v1 INVALIDATE removes it.
    expect_whole(
        "v1 INVALIDATE",
        dev.write_raw(&raw(V1, INVALIDATE, iova, PAGE, 0, 0)),
    )?;
    net.filter.forget(); // the next MISS must be answered again
    let m = net.send_check(gpa, iova, &f, &f)?;
    expect_misses(
        "the page after a v1 INVALIDATE of it",
        m,
        MissCount::AtLeast(1),
        "the v1 INVALIDATE was not applied",
    )?;
    net.viommu.unmap(iova, PAGE)?;
    Ok(
        "72 for 40 bytes; EINVAL for an unknown type word and an UPDATE of size 0; EFAULT for \
        an unknown IOTLB type; size-0 and overflowing INVALIDATEs succeed and remove nothing; \
        v1 accepted on a v2 device"
            .into(),
    )
}

/// `update-no-replace`: an UPDATE over an entry does not replace it; an INVALIDATE does.
pub fn update_no_replace(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let (a, b) = (ctx.pages.next_page(), ctx.pages.next_page());
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let iova = 0x7_3000_0000;
    let fa = frame(SRC_TX, 0xa0, 150);
    let fb = frame(SRC_TX, 0xb0, 150);
    net.put_frame(b, &fb)?;
    net.push_raw("UPDATE to A", iova, a, PAGE)?;
    net.send_check(a, iova, &fa, &fa)?;
    net.push_raw("UPDATE to B over it", iova, b, PAGE)?;
    // Page A now holds fa again; the kernel still reads A.
    let len = net.put_frame(a, &fa)?;
    net.tap.drain();
    net.post(TX, &[(iova, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&fa))
        .map_err(|e| e.context("the newer UPDATE replaced the older entry"))?;
    expect_whole(
        "INVALIDATE",
        dev.write_raw(&raw(V2, INVALIDATE, iova, PAGE, 0, 0)),
    )?;
    net.push_raw("UPDATE to B", iova, b, PAGE)?;
    net.tap.drain();
    net.post(TX, &[(iova, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&fb))?;
    expect_whole(
        "INVALIDATE",
        dev.write_raw(&raw(V2, INVALIDATE, iova, PAGE, 0, 0)),
    )?;
    Ok("the older entry kept winning until an INVALIDATE".into())
}

/// `invalidate-whole`: an INVALIDATE of one page removes a two-page entry whole.
pub fn invalidate_whole(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let c = ctx.pages.next_page(); // with the page after it (Pages leaves it unused)
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let iova = 0x7_4000_0000;
    net.map_ro_at(iova, c, 2 * PAGE)?;
    net.push_raw("two-page UPDATE", iova, c, 2 * PAGE)?;
    let f = frame(SRC_TX, 0xc0, 200);
    expect_misses(
        "the second page of a two-page UPDATE",
        net.send_check(c + PAGE, iova + PAGE, &f, &f)?,
        MissCount::None,
        "the UPDATE did not cover it",
    )?;
    expect_whole(
        "INVALIDATE of the first page",
        dev.write_raw(&raw(V2, INVALIDATE, iova, PAGE, 0, 0)),
    )?;
    net.filter.forget();
    let m = net.send_check(c + PAGE, iova + PAGE, &f, &f)?;
    expect_misses(
        "the second page after an INVALIDATE of the first",
        m,
        MissCount::AtLeast(1),
        "the second page survived",
    )?;
    net.viommu.unmap(iova, 2 * PAGE)?;
    Ok("INVALIDATE of one page took the whole two-page entry".into())
}

/// `capacity`: at most 2048 entries, the oldest evicted silently.
pub fn capacity(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let gpa = ctx.pages.next_page();
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let base = 0x7_5000_0000u64;
    let n = 2048 + 64;
    for i in 0..n {
        net.push_raw("UPDATE", base + i * PAGE, gpa, PAGE)?;
    }
    net.map_ro_at(base, gpa, PAGE)?;
    let last = base + (n - 1) * PAGE;
    net.map_ro_at(last, gpa, PAGE)?;
    let f = frame(SRC_TX, 0xd0, 90);
    net.filter.forget();
    let m_last = net.send_check(gpa, last, &f, &f)?;
    let m_first = net.send_check(gpa, base, &f, &f)?;
    expect_whole(
        "INVALIDATE",
        dev.write_raw(&raw(V2, INVALIDATE, base, n * PAGE, 0, 0)),
    )?;
    net.viommu.unmap(base, PAGE)?;
    net.viommu.unmap(last, PAGE)?;
    expect_misses(
        format!("the newest of {n} UPDATEs ({m_first} MISSes on the oldest)"),
        m_last,
        MissCount::None,
        "the newest entry was not kept",
    )?;
    expect_misses(
        format!("the oldest of {n} UPDATEs"),
        m_first,
        MissCount::AtLeast(1),
        "it was not evicted",
    )?;
    Ok(format!(
        "{n} UPDATEs: the newest hit, the oldest was evicted silently"
    ))
}

/// `set-features`: SET_FEATURES again empties the kernel's IOTLB.
pub fn set_features(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let gpa = ctx.pages.next_page();
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let iova = 0x7_6000_0000;
    net.map_ro_at(iova, gpa, PAGE)?;
    net.push_raw("UPDATE", iova, gpa, PAGE)?;
    let f = frame(SRC_TX, 0xe0, 80);
    expect_misses(
        "a pushed page",
        net.send_check(gpa, iova, &f, &f)?,
        MissCount::None,
        "the raw UPDATE was not applied",
    )?;
    dev.set_features(NET_FEATURES)?;
    net.filter.forget(); // everything (rings too) must be answered again
    let m = net.send_check(gpa, iova, &f, &f)?;
    net.viommu.unmap(iova, PAGE)?;
    expect_misses(
        "the pushed page after SET_FEATURES",
        m,
        MissCount::AtLeast(1),
        "the entry survived SET_FEATURES",
    )?;
    Ok("SET_FEATURES again emptied the kernel's IOTLB".into())
}

/// `invalidate-all`: the vIOMMU's whole-space INVALIDATE reaches the kernel (it ignores size
/// 0, so the transport sends it as two halves).
pub fn invalidate_all(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let gpa = ctx.pages.next_page();
    let net = &mut ctx.net;
    let dev = net.dev.clone();
    let (lo, hi) = (0x7_7000_0000u64, 0xffff_ffff_ffff_0000u64);
    let f = frame(SRC_TX, 0xf0, 70);
    for iova in [lo, hi] {
        net.map_ro_at(iova, gpa, PAGE)?;
        net.push_raw("UPDATE", iova, gpa, PAGE)?;
        expect_misses(
            format!("the pushed page {iova:#x}"),
            net.send_check(gpa, iova, &f, &f)?,
            MissCount::None,
            "the raw UPDATE was not applied",
        )?;
    }
    DeviceIotlb::invalidate(&*dev, IovaRange::FULL)?;
    for iova in [lo, hi] {
        expect_misses(
            format!("{iova:#x} after the whole-space INVALIDATE"),
            net.send_check(gpa, iova, &f, &f)?,
            MissCount::AtLeast(1),
            "it survived the whole-space INVALIDATE",
        )?;
        net.viommu.unmap(iova, PAGE)?;
    }
    Ok("a whole-space INVALIDATE emptied both halves".into())
}

/// `no-mem-table`: on a device of its own, without a memory table, attaching the backend
/// fails with EFAULT and queues no MISS.
pub fn no_mem_table(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let ram = GuestRam::new(RAM).map_err(KernelNetError::GuestRam)?;
    let dev = VhostKernel::open(Path::new(&ctx.args.vhost), ram.va(0))?;
    dev.set_features(NET_FEATURES)?;
    dev.negotiate_backend(backend_f::IOTLB_MSG_V2)?;
    let (kick, call) = (eventfd()?, eventfd()?);
    dev.set_vring(
        TX,
        u32::from(QSIZE),
        RING_IOVA,
        RING_IOVA + PAGE,
        RING_IOVA + 2 * PAGE,
        0,
        kick.as_fd(),
        call.as_fd(),
    )?;
    let tap = Tap::create()?;
    match dev.net_set_backend(TX, Some(tap.fd.as_fd())) {
        Err(KernelError::Ioctl { errno, .. }) if errno == Errno::FAULT => {}
        other => {
            return Err(KernelNetError::Unexpected {
                what: "SET_BACKEND without a memory table",
                expected: format!("{}", Errno::FAULT),
                got: format!("{other:?}"),
            })
        }
    }
    let mut m = [0u8; VHOST_MSG_SIZE];
    match dev.read_raw(&mut m) {
        Err(Errno::AGAIN) => Ok("SET_BACKEND without a memory table: EFAULT, no MISS".into()),
        other => Err(KernelNetError::Unexpected {
            what: "a read after the failed SET_BACKEND",
            expected: format!("no message ({})", Errno::AGAIN),
            got: format!("{other:?}"),
        }),
    }
}
