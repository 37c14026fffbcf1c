//! `both-transports`: one vIOMMU, two transports. A vhost-user back-end of ours (a
//! virtio-blk over a memfd disk) is served in this process and attached to the same vIOMMU as
//! the kernel device; one range is faulted into both through the one `DeviceIotlb`
//! interface and unmapped from both. The case owns the back-end it starts and shuts it down;
//! it does not look inside it beyond its counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::{EngineConfig, Server};
use devices::{Blk, BlkConfig};
use frontend::vhost_user::{FrontendConfig, VhostUserFrontend};
use frontend::viommu::DeviceIotlb;
use iotlb::{Access, Perm};

use super::Ctx;
use crate::error::{expect_misses, KernelNetError, MissCount};
use crate::frames::{frame, SRC_TX};
use crate::layout::{PAGE, RAM, TX};

/// Map a range, fault it into the kernel device and into the vhost-user back-end, unmap it:
/// both get the INVALIDATE, and the kernel misses on it again.
pub fn both_transports(ctx: &mut Ctx<'_>) -> Result<String, KernelNetError> {
    let net = &mut ctx.net;
    let disk = rustix::fs::memfd_create("kernel-net-disk", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(KernelNetError::sys("memfd_create"))?;
    let disk = std::fs::File::from(disk);
    disk.set_len(1 << 20)
        .map_err(KernelNetError::io("sizing the disk memfd"))?;
    let blk = Blk::new(disk, BlkConfig::default())?;
    let server = Arc::new(Server::new(blk, EngineConfig::default()));
    let dir = std::env::temp_dir().join(format!("kernel-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(KernelNetError::io(format!("creating {}", dir.display())))?;
    let sock = dir.join("blk.sock");
    let serving = {
        let (s, p) = (server.clone(), sock.clone());
        std::thread::spawn(move || s.serve(&p))
    };
    let wait = Duration::from_secs(5);
    let deadline = Instant::now() + wait;
    while !server.is_listening() {
        if serving.is_finished() || Instant::now() > deadline {
            return Err(KernelNetError::Timeout {
                what: "vhost-user back-end of ours listening",
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The same vIOMMU: the front-end attaches its device IOTLB next to the kernel's.
    let fe = VhostUserFrontend::connect(
        &sock,
        net.ram.clone(),
        FrontendConfig::default(),
        Some(net.viommu.clone()),
    )
    .map_err(KernelNetError::Connect)?;
    let vu = fe.device_iotlb();
    let gpa = RAM - 4 * PAGE;
    let f = frame(SRC_TX, 0xb0b, 400);
    let len = net.put_frame(gpa, &f)?;
    let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
    // Fault it into both, through the one interface.
    let kernel: &dyn DeviceIotlb = &*net.dev;
    for (name, dev) in [("kernel", kernel), ("vhost-user", &*vu)] {
        if !net.viommu.fault(dev, iova, Access::Read)? {
            return Err(KernelNetError::NoMapping { device: name, iova });
        }
    }
    let k0 = net.dev.stats().invalidations.load(Ordering::Relaxed);
    // The kernel uses its entry without a MISS.
    let m0 = net.misses();
    net.tap.drain();
    net.post(TX, &[(iova, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&f))?;
    expect_misses(
        "a range already faulted into the kernel",
        net.misses_on(m0, &[iova]),
        MissCount::None,
        "the kernel did not keep the UPDATE",
    )?;
    // Unmap: an INVALIDATE to each, each acknowledged before `unmap` returns (a write the
    // kernel applied; a REPLY_ACK from the back-end).
    net.viommu.unmap(iova, PAGE)?;
    let k1 = net.dev.stats().invalidations.load(Ordering::Relaxed);
    if k1 != k0 + 1 {
        return Err(KernelNetError::Unexpected {
            what: "INVALIDATEs written to the kernel by one unmap",
            expected: "1".into(),
            got: format!("{} ({k0} -> {k1})", k1.wrapping_sub(k0)),
        });
    }
    // The kernel lost it: the same IOVA, mapped again, misses again.
    let again = net.map(gpa, PAGE, Perm::ReadOnly)?;
    let m1 = net.misses();
    net.post(TX, &[(again, len)], false)?;
    net.wait(TX, Duration::from_secs(5))?;
    net.check_tap(std::slice::from_ref(&f))?;
    if again == iova {
        expect_misses(
            "the range mapped again after its INVALIDATE",
            net.misses_on(m1, &[iova]),
            MissCount::AtLeast(1),
            "the kernel used the old entry",
        )?;
    }
    net.unmap(again, PAGE)?;
    // The back-end's counters are folded in when its connection ends.
    drop(fe);
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = server.stats();
        if st.updates > 0 || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if st.updates == 0 || st.invalidations == 0 {
        return Err(KernelNetError::Unexpected {
            what: "the vhost-user back-end's counters",
            expected: "at least one UPDATE and one INVALIDATE".into(),
            got: st.to_string(),
        });
    }
    server.shutdown_handle().shutdown();
    let _ = serving.join();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(
        "one vIOMMU: UPDATE to the kernel and to vhost-user, the kernel used it without a \
        MISS, the unmap reached both"
            .into(),
    )
}
