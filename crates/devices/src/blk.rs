//! virtio-blk on a file or a block device.
//!
//! Requests are `{ le32 type; le32 reserved; le64 sector }` (driver-to-device), data, and a
//! status byte (the last device-writable byte). Served: IN, OUT, FLUSH, GET_ID, DISCARD and
//! WRITE_ZEROES (both with `fallocate`, offered only when the backing file supports them).
//! Data moves with positioned vectored I/O between the file and the translated guest
//! segments (see [`crate::io`]), with no allocation per request once a queue is warm. The
//! status byte is written last. Each queue has its own handler; all share the file
//! (positioned I/O needs no lock).
//!
//! FLUSH, DISCARD and WRITE_ZEROES are parsed and checked inside the engine's quiescence
//! section, and their system call (`fdatasync`, `fallocate`), which touches no guest memory
//! and may take seconds, runs outside it ([`Served::Deferred`]): an INVALIDATE, an UPDATE or a
//! new memory table is never acknowledged late because of one. Reads and writes move data
//! into and out of guest memory, so theirs run inside.
//!
//! # What the driver is told
//!
//! The rule, from the virtio spec's device requirements (virtio 1.2, 5.2.6 and 2.1.2) and
//! design invariant 11: **a request goes on the used ring only with its status byte written,
//! and `VIRTIO_BLK_S_OK` only if it was served in full.**
//! - Served: `OK`, after the data moved in full (a short read or write is `IOERR`).
//! - An unknown request type, or DISCARD / WRITE_ZEROES with a flag we do not know (or
//!   `unmap` on a DISCARD): `UNSUPP`, as the spec requires.
//! - Every other request not served is `IOERR`: outside the disk, a write in read-only mode
//!   (the spec's "MUST set IOERR ... and MUST NOT write any data"), an I/O error, a
//!   malformed chain, a chain beyond the limits below, an access the IOMMU denied, a miss the
//!   IOMMU side never answered (the engine finds the status byte and has [`BlkQueue`] write
//!   it).
//! - When the status byte itself cannot be written (the chain has no device-writable byte,
//!   or the byte is unmapped, read-only or outside guest memory), the request is not
//!   completed at all: the engine stops the queue and signals the vring error eventfd (see
//!   the back-end's worker). Completing it with any used length would let Linux, which
//!   ignores the used length and reads the status byte, take stale memory for success.
//!
//! # Limits
//!
//! The config space advertises `seg_max` (queue size - 2) and `size_max` (1 MiB); the chain
//! limits given to the engine ([`Device::chain_limits`]) are exactly those, each only when the
//! driver acked its feature (`VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_SIZE_MAX`): at most
//! `seg_max + 2` descriptors (the data segments, the header and the status byte), none longer
//! than `size_max`. So the largest request is `seg_max` MiB (254 MiB with 256-entry queues;
//! Linux sends 1280 KiB by default, more once `max_sectors_kb` is raised). The IOTLB's size
//! limits nothing. DISCARD and WRITE_ZEROES take exactly one segment (`max_discard_seg`,
//! `max_write_zeroes_seg`) of at most `max_discard_sectors` / `max_write_zeroes_sectors`,
//! inside the disk; anything else is `IOERR`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backend::{Device, QueueHandler, Served, Unreported};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtq::{Chain, ChainLimits};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wire::features::protocol;

use crate::io::IoVecs;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Bytes of the request header.
const HEADER: u64 = 16;
/// Bytes of a GET_ID answer.
const ID_BYTES: usize = 20;
/// Size of the config space we describe (`struct virtio_blk_config` up to the secure-erase
/// fields).
const CONFIG_SIZE: usize = 72;
/// Largest segment we advertise (`size_max`): the longest descriptor we accept.
const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD and WRITE_ZEROES we advertise, in sectors.
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR as u32;
/// Bytes of one DISCARD / WRITE_ZEROES segment.
const SEGMENT: u64 = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`, the one flag of a DISCARD / WRITE_ZEROES segment.
const FLAG_UNMAP: u32 = 1;

/// How to build a block device.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// Queues.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            queues: 1,
            queue_size: 256,
            read_only: false,
            serial: "vhost-iotlb-blk".into(),
        }
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    file: Arc<File>,
    sectors: u64,
    config: BlkConfig,
    discard: bool,
    /// The features the driver acked (the limits apply only to a driver that took them).
    acked: AtomicU64,
}

/// Why a block device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The backing file failed.
    #[error("backing file: {0}")]
    Io(#[from] std::io::Error),
    /// Zero queues, or a bad queue size.
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn size_of_file(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // A block device: its size is where seeking to the end lands.
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl Blk {
    /// Serve `file` (a regular file or a block device) with `config`.
    pub fn new(file: File, config: BlkConfig) -> Result<Self, BlkError> {
        if config.queues == 0 || config.queue_size == 0 || !config.queue_size.is_power_of_two() {
            return Err(BlkError::Config(format!(
                "{} queues of {} (queues >= 1, a power-of-two size)",
                config.queues, config.queue_size
            )));
        }
        let sectors = size_of_file(&file)? / SECTOR;
        let discard = file.metadata()?.file_type().is_file();
        Ok(Blk {
            file: Arc::new(file),
            sectors,
            config,
            discard,
            acked: AtomicU64::new(0),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// `seg_max`: data segments per request (the header and the status byte take two more
    /// descriptors).
    fn seg_max(&self) -> u32 {
        u32::from(self.config.queue_size).saturating_sub(2).max(1)
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let seg_max = self.seg_max();
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.config.queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

impl Device for Blk {
    type Handler = BlkQueue;

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.config.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else if self.discard {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> u64 {
        protocol::CONFIG | protocol::MQ
    }

    fn queues(&self) -> u16 {
        self.config.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, _offset: u32, _data: &[u8]) -> bool {
        // Only `writeback` is writable in virtio-blk, and we do not offer CONFIG_WCE.
        false
    }

    fn set_features(&self, acked: u64) {
        self.acked.store(acked, Ordering::SeqCst);
    }

    fn chain_limits(&self) -> ChainLimits {
        // A driver that did not take SEG_MAX or SIZE_MAX never heard of that limit (firmware
        // drivers often put a whole transfer in one descriptor): it is not enforced on it.
        let acked = self.acked.load(Ordering::SeqCst);
        let has = |bit: u32| acked & (1 << bit) != 0;
        ChainLimits {
            max_descriptors: if has(VIRTIO_BLK_F_SEG_MAX) {
                self.seg_max() + 2
            } else {
                u32::MAX
            },
            max_descriptor_len: if has(VIRTIO_BLK_F_SIZE_MAX) {
                SIZE_MAX
            } else {
                u32::MAX
            },
        }
    }

    fn handler(&self, _index: u16, _wake: backend::QueueWakers) -> BlkQueue {
        BlkQueue {
            file: self.file.clone(),
            sectors: self.sectors,
            read_only: self.config.read_only,
            serial: self.config.serial.clone(),
            iov: IoVecs::new(),
            pending: None,
        }
    }
}

/// One queue's request handler.
#[derive(Debug)]
pub struct BlkQueue {
    file: Arc<File>,
    sectors: u64,
    read_only: bool,
    serial: String,
    iov: IoVecs,
    /// The request [`QueueHandler::serve`] deferred, until its status is written.
    pending: Option<Pending>,
}

/// A request parsed from its header.
struct Request {
    ty: u32,
    sector: u64,
}

/// What [`BlkQueue::run`] came to.
enum Run {
    /// Served (or refused) now: the status, and the bytes written before the status byte.
    Now(u8, u32),
    /// Checked; the call that does it touches no guest memory and may take long, so it runs
    /// outside the engine's quiescence section ([`Served::Deferred`]).
    Later(Op),
}

/// A request's work that runs outside the quiescence section.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// FLUSH: `fdatasync`.
    Flush,
    /// DISCARD or WRITE_ZEROES: one `fallocate`, of bytes checked to lie on the disk.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// A deferred request of a queue: its work, then its status.
#[derive(Debug, Clone, Copy)]
enum Pending {
    ToRun(Op),
    Ran(u8),
}

impl BlkQueue {
    fn header(chain: &Chain, mem: &GuestMemoryMmap) -> Option<Request> {
        let mut r = chain.reader(mem);
        let h = r.read_array::<16>().ok()?;
        Some(Request {
            ty: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            sector: u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        })
    }

    /// Whether `len` bytes at `sector` lie on the disk.
    fn in_range(&self, sector: u64, len: u64) -> bool {
        len % SECTOR == 0
            && sector
                .checked_add(len / SECTOR)
                .is_some_and(|end| end <= self.sectors)
    }

    /// Serve the request, or check it and say what to do outside the section.
    fn run(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> Run {
        let ioerr = Run::Now(VIRTIO_BLK_S_IOERR as u8, 0);
        let Some(req) = Self::header(chain, mem) else {
            return ioerr;
        };
        // The status byte is the last writable byte; data ends just before it.
        let writable = u64::from(chain.writable_len());
        let readable = u64::from(chain.readable_len());
        match req.ty {
            VIRTIO_BLK_T_IN => {
                let len = writable - 1;
                if !self.in_range(req.sector, len) {
                    return ioerr;
                }
                self.iov.clear();
                let mut w = chain.writer(mem);
                let iov = &mut self.iov;
                if w.visit_slices(len, |s| iov.push(&s)).is_err() {
                    return ioerr;
                }
                // SAFETY: the slices were pushed just above from `mem`, which this call
                // borrows for its whole duration, so their memory is still mapped.
                match unsafe { self.iov.preadv(&self.file, req.sector * SECTOR) } {
                    Ok(n) if n as u64 == len => Run::Now(VIRTIO_BLK_S_OK as u8, len as u32),
                    Ok(_) | Err(_) => ioerr,
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = readable - HEADER;
                if self.read_only || !self.in_range(req.sector, len) {
                    return ioerr;
                }
                self.iov.clear();
                let mut r = chain.reader(mem);
                let iov = &mut self.iov;
                if r.skip(HEADER).is_err() || r.visit_slices(len, |s| iov.push(&s)).is_err() {
                    return ioerr;
                }
                // SAFETY: as for the read: pushed just above from the borrowed `mem`.
                match unsafe { self.iov.pwritev(&self.file, req.sector * SECTOR) } {
                    Ok(n) if n as u64 == len => Run::Now(VIRTIO_BLK_S_OK as u8, 0),
                    _ => ioerr,
                }
            }
            VIRTIO_BLK_T_FLUSH => Run::Later(Op::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let s = self.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let len = (writable - 1).min(ID_BYTES as u64) as usize;
                match chain.writer(mem).write_all(&id[..len]) {
                    Ok(()) => Run::Now(VIRTIO_BLK_S_OK as u8, len as u32),
                    Err(_) => ioerr,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return ioerr;
                }
                self.range_op(chain, mem, req.ty == VIRTIO_BLK_T_DISCARD)
            }
            _ => Run::Now(VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    /// Check a DISCARD or WRITE_ZEROES against everything the config space advertises and
    /// say which `fallocate` does it.
    fn range_op(&self, chain: &Chain, mem: &GuestMemoryMmap, discard: bool) -> Run {
        let ioerr = Run::Now(VIRTIO_BLK_S_IOERR as u8, 0);
        let mut r = chain.reader(mem);
        if r.skip(HEADER).is_err() {
            return ioerr;
        }
        // Segments of { le64 sector; le32 num_sectors; le32 flags }: a whole number of them,
        // and exactly one, as advertised (max_discard_seg = max_write_zeroes_seg = 1).
        if r.available() != SEGMENT {
            return ioerr;
        }
        let Ok(seg) = r.read_array::<16>() else {
            return ioerr;
        };
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(s);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        if flags & !FLAG_UNMAP != 0 || (discard && flags & FLAG_UNMAP != 0) {
            return Run::Now(VIRTIO_BLK_S_UNSUPP as u8, 0);
        }
        // max_discard_sectors / max_write_zeroes_sectors; discard_sector_alignment is one
        // sector, which every segment meets.
        let num = u64::from(num);
        if num > u64::from(MAX_DISCARD_SECTORS) || !self.in_range(sector, num * SECTOR) {
            return ioerr;
        }
        let mode = if discard {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        Run::Later(Op::Fallocate {
            mode,
            offset: sector * SECTOR,
            len: num * SECTOR,
        })
    }

    /// Do `op`: its status.
    fn execute(&self, op: Op) -> u8 {
        let ok = match op {
            Op::Flush => self.file.sync_data().is_ok(),
            Op::Fallocate { mode, offset, len } => match fallocate(&self.file, mode, offset, len) {
                // A file system without ZERO_RANGE (tmpfs, a memfd) zeroes by punching a
                // hole: the range reads back as zeros all the same.
                Err(libc::EOPNOTSUPP) if mode & libc::FALLOC_FL_ZERO_RANGE != 0 => {
                    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    fallocate(&self.file, punch, offset, len).is_ok()
                }
                r => r.is_ok(),
            },
        };
        if ok {
            VIRTIO_BLK_S_OK as u8
        } else {
            VIRTIO_BLK_S_IOERR as u8
        }
    }
}

/// `fallocate(2)`; the errno on failure.
fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(libc::EINVAL);
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an fd we own, with plain integer arguments; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

impl QueueHandler for BlkQueue {
    fn serve(
        &mut self,
        chain: &Chain,
        _more: &mut dyn backend::MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Result<Served, Unreported> {
        if chain.writable_len() == 0 {
            // No status byte: nothing can be reported, so nothing is done.
            tracing::warn!(
                head = chain.head(),
                "virtio-blk: request without a status byte"
            );
            return Err(Unreported);
        }
        let (status, written) = match self.run(chain, mem) {
            Run::Now(status, written) => (status, written),
            Run::Later(op) => {
                self.pending = Some(Pending::ToRun(op));
                return Ok(Served::Deferred);
            }
        };
        // The status byte, last, at the end of the writable bytes.
        let mut w = chain.writer(mem);
        let data = u64::from(chain.writable_len()) - 1;
        if w.skip(data).is_err() || w.write_all(&[status]).is_err() {
            return Err(Unreported);
        }
        if status != VIRTIO_BLK_S_OK as u8 {
            tracing::debug!(head = chain.head(), status, "virtio-blk: request failed");
        }
        Ok(Served::Done(written + 1))
    }

    fn run_deferred(&mut self) {
        if let Some(Pending::ToRun(op)) = self.pending {
            self.pending = Some(Pending::Ran(self.execute(op)));
        }
    }

    fn report_deferred(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        // Never ran (the engine calls run_deferred first): the request was not served.
        let value = match self.pending.take() {
            Some(Pending::Ran(value)) => value,
            Some(Pending::ToRun(_)) | None => VIRTIO_BLK_S_IOERR as u8,
        };
        mem.write_obj(value, GuestAddress(status))
            .map(|()| 1)
            .map_err(|_| Unreported)
    }

    fn fail(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        mem.write_obj(VIRTIO_BLK_S_IOERR as u8, GuestAddress(status))
            .map(|()| 1)
            .map_err(|_| Unreported)
    }
}
