//! The kernel transport of the IOMMU side: a Linux `/dev/vhost-*` device driven through its
//! file descriptor, the API the seed reviews.
//!
//! The owner process (us) sets the device up with ioctls (owner, features, backend features,
//! memory table, vrings at IOVAs, kick/call eventfds, for vhost-net a tap as backend), then
//! talks IOTLB through `read()`/`write()` of 72-byte `vhost_msg`/`vhost_msg_v2` messages:
//! the kernel writes MISS, we write UPDATE and INVALIDATE. A `write()` is applied before it
//! returns, so it is its own acknowledgement: [`VhostKernel`] implements
//! [`DeviceIotlb`] with one `write()` per message, and the vIOMMU serves a kernel device
//! exactly as it serves a vhost-user back-end.
//!
//! Kernel behaviour this file relies on, observed on 6.12: a MISS carries the exact IOVA and
//! only the access needed (RO or WO); the kernel does not deduplicate (each retry is another
//! identical MISS), so [`MissFilter`] answers a `(page, access)` once until the next
//! invalidation; an UPDATE over an existing entry does not replace it, so the vIOMMU must
//! INVALIDATE before remapping (its strict mode does); the answer must carry the mapping's
//! permission, not the one asked for (a RO entry for the used ring would stall the later
//! write silently). UPDATE and INVALIDATE payloads are validated by `wire` before they are
//! written: the kernel reports success for some malformed ones (size 0, overflow).
//!
//! This file owns the fd and the message format; it does not walk rings or touch guest
//! memory (the caller does), and it never panics on anything read from the fd.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use iotlb::{Access, IovaRange, Perm};
use parking_lot::Mutex;
use rustix::io::Errno;
use rustix::ioctl::{ioctl, Getter, NoArg, Opcode, Setter};
use wire::ioctl as uapi;
use wire::linux::{self, MsgFormat, VHOST_MSG_SIZE};
use wire::{features, IotlbMsg};

use crate::viommu::{DeviceIotlb, ForwardError, Viommu, ViommuError};

/// What went wrong with a kernel vhost device. Every variant carries the errno the kernel
/// returned and what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The device node could not be opened.
    #[error("cannot open {path}: {errno} (is the module loaded and the node present?)")]
    Open {
        /// The node.
        path: String,
        /// What `open` said.
        errno: Errno,
    },
    /// An ioctl failed.
    #[error("{what}: {errno}")]
    Ioctl {
        /// The ioctl and its argument.
        what: String,
        /// What the kernel said.
        errno: Errno,
    },
    /// The kernel refused an IOTLB message.
    #[error("writing {msg:?}: {errno}")]
    Write {
        /// The message.
        msg: IotlbMsg,
        /// What the kernel said.
        errno: Errno,
    },
    /// A message could not be encoded (out of what the format allows).
    #[error("encoding {msg:?}: {error}")]
    Encode {
        /// The message.
        msg: IotlbMsg,
        /// Why.
        error: wire::error::IotlbError,
    },
    /// Reading from the fd failed.
    #[error("reading an IOTLB message: {0}")]
    Read(Errno),
    /// The kernel wrote something we cannot decode.
    #[error("undecodable IOTLB message from the kernel ({error}): {bytes:02x?}")]
    Decode {
        /// The bytes.
        bytes: Vec<u8>,
        /// Why.
        error: wire::error::IotlbError,
    },
    /// A short write (the kernel takes whole messages or nothing).
    #[error("short write of an IOTLB message: {0} of 72 bytes")]
    ShortWrite(usize),
}

/// Counters of one device.
#[derive(Debug, Default)]
pub struct KernelStats {
    /// MISS messages read.
    pub misses: AtomicU64,
    /// Of those, repeats of a miss already answered (dropped).
    pub duplicates: AtomicU64,
    /// UPDATEs written.
    pub updates: AtomicU64,
    /// INVALIDATEs written.
    pub invalidations: AtomicU64,
}

/// A kernel vhost device (`/dev/vhost-net`, ...) with its IOTLB message format.
#[derive(Debug)]
pub struct VhostKernel {
    fd: OwnedFd,
    fmt: Mutex<MsgFormat>,
    /// Our virtual address of guest-physical 0 (UPDATEs carry user addresses).
    va_base: u64,
    stats: KernelStats,
    /// Bumped by every INVALIDATE written (a [`MissFilter`] forgets its answers then).
    inval_gen: AtomicU64,
}

/// An ioctl opcode from the UAPI constants (which are `_IOC` values, below 2^32).
const fn op(v: u64) -> Opcode {
    v as Opcode
}

impl VhostKernel {
    /// Open `path` non-blocking and take ownership of the device (`VHOST_SET_OWNER`).
    /// `va_base` is the address in this process of guest-physical 0.
    pub fn open(path: &Path, va_base: u64) -> Result<Self, KernelError> {
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|errno| KernelError::Open {
            path: path.display().to_string(),
            errno,
        })?;
        let dev = VhostKernel {
            fd,
            fmt: Mutex::new(MsgFormat::default()),
            va_base,
            stats: KernelStats::default(),
            inval_gen: AtomicU64::new(0),
        };
        // SAFETY: VHOST_SET_OWNER takes no argument.
        unsafe { ioctl(&dev.fd, NoArg::<{ op(uapi::VHOST_SET_OWNER) }>::new()) }
            .map_err(|errno| dev.err("VHOST_SET_OWNER", errno))?;
        Ok(dev)
    }

    fn err(&self, what: impl Into<String>, errno: Errno) -> KernelError {
        KernelError::Ioctl {
            what: what.into(),
            errno,
        }
    }

    /// The fd, to poll for MISS messages.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Counters.
    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }

    /// INVALIDATEs written so far through [`VhostKernel::write_msg`].
    pub fn invalidations(&self) -> u64 {
        self.inval_gen.load(Ordering::SeqCst)
    }

    /// The message format in use.
    pub fn format(&self) -> MsgFormat {
        *self.fmt.lock()
    }

    /// `VHOST_GET_FEATURES`.
    pub fn features(&self) -> Result<u64, KernelError> {
        // SAFETY: VHOST_GET_FEATURES writes one u64.
        unsafe {
            ioctl(
                &self.fd,
                Getter::<{ op(uapi::VHOST_GET_FEATURES) }, u64>::new(),
            )
        }
        .map_err(|e| self.err("VHOST_GET_FEATURES", e))
    }

    /// `VHOST_SET_FEATURES` with `want`, which must be offered. The kernel empties its IOTLB
    /// on every SET_FEATURES.
    pub fn set_features(&self, want: u64) -> Result<(), KernelError> {
        let offered = self.features()?;
        if want & !offered != 0 {
            return Err(self.err(
                format!(
                    "VHOST_SET_FEATURES({want:#x}): not offered: {:#x}",
                    want & !offered
                ),
                Errno::NOTSUP,
            ));
        }
        // SAFETY: VHOST_SET_FEATURES reads one u64.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_FEATURES) }, u64>::new(want),
            )
        }
        .map_err(|e| self.err(format!("VHOST_SET_FEATURES({want:#x})"), e))
    }

    /// Negotiate backend features: ask for `want` (IOTLB_MSG_V2, BATCH, ASID, ...), drop
    /// what the kernel does not offer (`VHOST_GET_BACKEND_FEATURES`; vhost-net offers only
    /// IOTLB_MSG_V2 and refuses the rest with EOPNOTSUPP), and set what remains. Returns it.
    pub fn negotiate_backend(&self, want: u64) -> Result<u64, KernelError> {
        // SAFETY: VHOST_GET_BACKEND_FEATURES writes one u64.
        let offered = unsafe {
            ioctl(
                &self.fd,
                Getter::<{ op(uapi::VHOST_GET_BACKEND_FEATURES) }, u64>::new(),
            )
        }
        .map_err(|e| self.err("VHOST_GET_BACKEND_FEATURES", e))?;
        let acked = want & offered;
        // SAFETY: VHOST_SET_BACKEND_FEATURES reads one u64.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_BACKEND_FEATURES) }, u64>::new(acked),
            )
        }
        .map_err(|e| self.err(format!("VHOST_SET_BACKEND_FEATURES({acked:#x})"), e))?;
        *self.fmt.lock() = MsgFormat::from_backend_features(acked);
        Ok(acked)
    }

    /// `VHOST_SET_MEM_TABLE` with one region: guest-physical `0..size` at our `va_base`.
    pub fn set_mem_table(&self, size: u64) -> Result<(), KernelError> {
        #[repr(C)]
        struct OneRegion {
            head: uapi::VhostMemory,
            region: uapi::VhostMemoryRegion,
        }
        let table = OneRegion {
            head: uapi::VhostMemory {
                nregions: 1,
                padding: 0,
            },
            region: uapi::VhostMemoryRegion {
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: self.va_base,
                flags_padding: 0,
            },
        };
        // SAFETY: VHOST_SET_MEM_TABLE reads a `vhost_memory` followed by `nregions` (1)
        // regions; the setter passes a pointer to its copy of `table`, which is exactly
        // that (`repr(C)`, no padding between the two parts), alive for the call.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_MEM_TABLE) }, OneRegion>::new(table),
            )
        }
        .map_err(|e| self.err(format!("VHOST_SET_MEM_TABLE(0..{size:#x})"), e))
    }

    /// Set up vring `index`: `num` entries, rings at the IOVAs `desc`/`avail`/`used`
    /// (addresses are IOVAs once ACCESS_PLATFORM is acked), starting at `base`, with the
    /// `kick` and `call` eventfds.
    #[allow(clippy::too_many_arguments)]
    pub fn set_vring(
        &self,
        index: u32,
        num: u32,
        desc: u64,
        avail: u64,
        used: u64,
        base: u32,
        kick: BorrowedFd<'_>,
        call: BorrowedFd<'_>,
    ) -> Result<(), KernelError> {
        let state = |num| uapi::VhostVringState { index, num };
        // SAFETY: each ioctl reads the one struct passed by value, as the UAPI defines it.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_VRING_NUM) }, uapi::VhostVringState>::new(state(num)),
            )
            .map_err(|e| self.err(format!("VHOST_SET_VRING_NUM({index}, {num})"), e))?;
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_VRING_BASE) }, uapi::VhostVringState>::new(state(
                    base,
                )),
            )
            .map_err(|e| self.err(format!("VHOST_SET_VRING_BASE({index}, {base})"), e))?;
            let addr = uapi::VhostVringAddr {
                index,
                flags: 0,
                descriptor: desc,
                used,
                available: avail,
                log: 0,
            };
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_VRING_ADDR) }, uapi::VhostVringAddr>::new(addr),
            )
            .map_err(|e| {
                self.err(
                    format!("VHOST_SET_VRING_ADDR({index}, desc {desc:#x} avail {avail:#x} used {used:#x})"),
                    e,
                )
            })?;
            let file = |fd: BorrowedFd<'_>| uapi::VhostVringFile {
                index,
                fd: fd.as_raw_fd(),
            };
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_VRING_KICK) }, uapi::VhostVringFile>::new(file(kick)),
            )
            .map_err(|e| self.err(format!("VHOST_SET_VRING_KICK({index})"), e))?;
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_SET_VRING_CALL) }, uapi::VhostVringFile>::new(file(call)),
            )
            .map_err(|e| self.err(format!("VHOST_SET_VRING_CALL({index})"), e))?;
        }
        Ok(())
    }

    /// `VHOST_NET_SET_BACKEND`: vring `index` sends to and receives from `tap` (`None`:
    /// detach).
    pub fn net_set_backend(
        &self,
        index: u32,
        tap: Option<BorrowedFd<'_>>,
    ) -> Result<(), KernelError> {
        let file = uapi::VhostVringFile {
            index,
            fd: tap.map_or(-1, |f| f.as_raw_fd()),
        };
        // SAFETY: VHOST_NET_SET_BACKEND reads one `vhost_vring_file`.
        unsafe {
            ioctl(
                &self.fd,
                Setter::<{ op(uapi::VHOST_NET_SET_BACKEND) }, uapi::VhostVringFile>::new(file),
            )
        }
        .map_err(|e| self.err(format!("VHOST_NET_SET_BACKEND({index}, fd {})", file.fd), e))
    }

    /// Write one IOTLB message (UPDATE or INVALIDATE) in the negotiated format. The kernel
    /// has applied it when this returns.
    pub fn write_msg(&self, msg: IotlbMsg) -> Result<(), KernelError> {
        let fmt = self.format();
        let bytes =
            linux::encode(&msg, 0, fmt).map_err(|error| KernelError::Encode { msg, error })?;
        loop {
            match rustix::io::write(&self.fd, &bytes) {
                Ok(n) if n == VHOST_MSG_SIZE => break,
                Ok(n) => return Err(KernelError::ShortWrite(n)),
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(KernelError::Write { msg, errno }),
            }
        }
        match msg {
            IotlbMsg::Invalidate { .. } => {
                self.inval_gen.fetch_add(1, Ordering::SeqCst);
                self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.stats.updates.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Write `bytes` as they are, for probing how the kernel treats malformed messages:
    /// returns what `write()` returned. Nothing is validated or counted.
    pub fn write_raw(&self, bytes: &[u8]) -> Result<usize, Errno> {
        loop {
            match rustix::io::write(&self.fd, bytes) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// Read into `buf` as it is (`EAGAIN` when empty), for probing; nothing is decoded or
    /// counted.
    pub fn read_raw(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// Read one message if there is one (the fd is non-blocking): `Ok(None)` when empty.
    pub fn read_msg(&self) -> Result<Option<IotlbMsg>, KernelError> {
        let mut buf = [0u8; VHOST_MSG_SIZE];
        let n = loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(e) => return Err(KernelError::Read(e)),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let bytes = &buf[..n];
        let m = linux::decode(bytes, self.format()).map_err(|error| KernelError::Decode {
            bytes: bytes.to_vec(),
            error,
        })?;
        if matches!(m.msg, IotlbMsg::Miss { .. }) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(m.msg))
    }
}

impl DeviceIotlb for VhostKernel {
    fn update(&self, range: IovaRange, gpa: u64, perm: Perm) -> Result<(), ForwardError> {
        let uaddr = self
            .va_base
            .checked_add(gpa)
            .ok_or(ForwardError::NoAddress(gpa))?;
        Ok(self.write_msg(IotlbMsg::Update { range, uaddr, perm })?)
    }

    fn invalidate(&self, range: IovaRange) -> Result<(), ForwardError> {
        // The kernel reports success for size 0 and overflowing ranges without doing
        // anything: never send the whole space as "size 0", split it instead.
        if range.size().is_none() {
            let low = IovaRange::new(0, u64::MAX / 2)?;
            let high = IovaRange::new(u64::MAX / 2 + 1, u64::MAX)?;
            self.write_msg(IotlbMsg::Invalidate { range: low })?;
            Ok(self.write_msg(IotlbMsg::Invalidate { range: high })?)
        } else {
            Ok(self.write_msg(IotlbMsg::Invalidate { range })?)
        }
    }
}

/// The kernel repeats a MISS on every retry; answer each `(page, access)` once until an
/// INVALIDATE may have taken the answer away. Also keeps the log of every MISS read.
#[derive(Debug, Default)]
pub struct MissFilter {
    answered: HashSet<(u64, Access)>,
    /// The device's invalidation count `answered` is valid for.
    gen: u64,
    /// Every MISS read, duplicates included, in order.
    pub log: Vec<(u64, Access)>,
}

impl MissFilter {
    /// Whether a MISS for `iova`/`access` still needs an answer (and remember it will have
    /// one); `gen` is the device's [`VhostKernel::invalidations`] count now.
    pub fn first(&mut self, gen: u64, iova: u64, access: Access) -> bool {
        self.log.push((iova, access));
        if gen != self.gen {
            self.answered.clear();
            self.gen = gen;
        }
        self.answered.insert((iova & !0xfff, access))
    }

    /// Forget every answer (after INVALIDATEs written behind the device's back, e.g. with
    /// [`VhostKernel::write_raw`]).
    pub fn forget(&mut self) {
        self.answered.clear();
    }
}

/// Read every pending message from `dev` and answer each new MISS with `answer(iova,
/// access)` (true: answered; false: nothing mapped there). Returns the number answered and
/// the IOVAs left unanswered.
pub fn serve_misses_with(
    dev: &VhostKernel,
    filter: &mut MissFilter,
    mut answer: impl FnMut(u64, Access) -> Result<bool, ViommuError>,
) -> Result<(u64, Vec<u64>), KernelError> {
    let mut answered = 0;
    let mut unmapped = Vec::new();
    while let Some(msg) = dev.read_msg()? {
        match msg {
            IotlbMsg::Miss { iova, perm } => {
                let access = if perm == Perm::WriteOnly {
                    Access::Write
                } else {
                    Access::Read
                };
                if !filter.first(dev.invalidations(), iova, access) {
                    dev.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match answer(iova, access) {
                    Ok(true) => answered += 1,
                    Ok(false) => unmapped.push(iova),
                    Err(e) => {
                        tracing::warn!(iova = %format_args!("{iova:#x}"), error = %e, "kernel vhost: MISS not answered");
                        unmapped.push(iova);
                    }
                }
            }
            other => {
                tracing::warn!(msg = ?other, "kernel vhost: unexpected message from the kernel");
            }
        }
    }
    Ok((answered, unmapped))
}

/// [`serve_misses_with`], answering from `viommu`'s page tables (the mapping's permission,
/// the largest run the vIOMMU allows).
pub fn serve_misses(
    dev: &VhostKernel,
    viommu: &Viommu,
    filter: &mut MissFilter,
) -> Result<(u64, Vec<u64>), KernelError> {
    serve_misses_with(dev, filter, |iova, access| viommu.fault(dev, iova, access))
}

/// Feature bits a vhost-net client behind an IOMMU acks.
pub const NET_FEATURES: u64 =
    features::device::ACCESS_PLATFORM | features::device::VERSION_1 | (1 << 15); // MRG_RXBUF

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_is_answered_once_per_page_and_access_until_an_invalidation() {
        let mut f = MissFilter::default();
        assert!(f.first(0, 0x1234, Access::Read));
        // The kernel's retry, another byte of the page: dropped.
        assert!(!f.first(0, 0x1234, Access::Read));
        assert!(!f.first(0, 0x1ff0, Access::Read));
        // Other access or other page: new.
        assert!(f.first(0, 0x1234, Access::Write));
        assert!(f.first(0, 0x2000, Access::Read));
        // After an INVALIDATE the same MISS needs an answer again.
        assert!(f.first(1, 0x1234, Access::Read));
        assert!(!f.first(1, 0x1234, Access::Read));
        f.forget();
        assert!(f.first(1, 0x1234, Access::Read));
        assert_eq!(f.log.len(), 8);
    }

    #[test]
    fn opening_a_missing_node_says_which() {
        let e = VhostKernel::open(Path::new("/nonexistent/vhost-net"), 0).unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::Open {
                    errno: Errno::NOENT,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/vhost-net"));
    }
}
