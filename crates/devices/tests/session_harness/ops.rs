//! The operations of a session: [`Op`], what a fuzzer may play, and `Harness::apply`, which
//! plays one and checks the back-end's answer to it (an ack where the protocol requires one,
//! a refusal where it requires one), with the IOMMU side's unmaps, remaps and flushes, the
//! raw IOTLB messages at the edges of the space and the hostile queue's requests. Arguments
//! are raw bytes taken modulo what they pick from, so that every value is an operation:
//! turning bytes or random draws into `Op`s is the callers' business (`fuzz/fuzz_targets/
//! session.rs`, `tests/session_fuzz.rs`, which both build its variants by name).
//!
//! What it must not do: assert what the protocol leaves open (an overflowing INVALIDATE may be
//! acked or not; what the hostile queue's requests get back, but for GET_VRING_BASE of a queue
//! that does not exist); poison a page before the back-end acknowledged; check the data path
//! (the rounds after each step do, and `checks.rs`).

use std::collections::BTreeSet;

use iotlb::IovaRange;
use virtq::testing::PAGE;
use wire::vhost_user::{FrontendRequest, ReplyKind, VringAddr, VringFile, VringState};
use wire::{IotlbMsg, VhostIotlbMsg};

use super::frontend::new_eventfd;
use super::memory::slot_of;
use super::{
    Failure, Harness, CORE_SLOTS, EXTRA_GPA, EXTRA_SIZE, EXTRA_SLOTS, MAX_REGIONS,
    MAX_TABLE_REGIONS, REPAIR_RESERVE, SCRATCH_IOVA, SCRATCH_PAGES, SLOTS, VA_BASE,
};

/// One operation of a session.
#[derive(Debug, Clone)]
pub enum Op {
    /// Let the driver run this many rounds (serve misses, complete, submit).
    Pump(u8),
    /// SET_MEM_TABLE with the slots whose bit is set (bits 0..35; 0 or more than 8 regions
    /// must be refused: more go in with ADD_MEM_REG).
    SetMemTable(u64),
    /// ADD_MEM_REG of slot `n % SLOTS`.
    AddRegion(u8),
    /// REM_MEM_REG of slot `slot % SLOTS`, with its real size or a wrong one.
    RemRegion {
        /// The slot.
        slot: u8,
        /// Send a size that does not match (must be refused).
        wrong_size: bool,
    },
    /// SET_FEATURES while the queue runs; the driver resets its queue if ACCESS_PLATFORM
    /// changed (its ring addresses change meaning).
    SetFeatures {
        /// ACCESS_PLATFORM.
        iommu: bool,
        /// RING_EVENT_IDX.
        event_idx: bool,
    },
    /// GET_VRING_BASE on queue 0, then restart it from there (or leave it stopped).
    StopQueue {
        /// Restart at once.
        restart: bool,
    },
    /// A new kick eventfd for queue 0 while it runs (the worker is replaced).
    NewKick,
    /// SET_VRING_CALL on queue 0: a new eventfd, or none.
    NewCall(bool),
    /// SET_VRING_ERR on queue 0: a new eventfd, or none.
    NewErr(bool),
    /// SET_VRING_ENABLE on queue 0.
    Enable(bool),
    /// IOMMU side: unmap one page of an in-flight request (its I/O page table entry and an
    /// INVALIDATE of a range covering it, chosen by `how`), then poison the old page.
    Unmap {
        /// Which in-flight request.
        req: u8,
        /// Which of its pages.
        page: u8,
        /// The INVALIDATE's range: the page, the page and neighbours, up to 2^64, all.
        how: u8,
    },
    /// IOMMU side: move one page of an in-flight request to a new page (an UPDATE replacing
    /// the mapping), then poison the old page.
    Remap {
        /// Which in-flight request.
        req: u8,
        /// Which of its pages.
        page: u8,
    },
    /// IOTLB-only INVALIDATEs (the page table keeps its mappings; misses are answered again).
    Flush {
        /// Whole space, the rings, a split at `at` (as QEMU's flush), `[at, 2^64)`.
        kind: u8,
        /// A boundary.
        at: u64,
    },
    /// A raw IOTLB message at the edges of the space (may overflow).
    EdgeIotlb {
        /// UPDATE or INVALIDATE.
        update: bool,
        /// Index into the edge IOVAs.
        iova: u8,
        /// Index into the edge sizes.
        size: u8,
        /// Index into the target addresses (a scratch page, across two regions, nowhere).
        uaddr: u8,
        /// Raw permission bits (0 and 4.. are invalid).
        perm: u8,
    },
    /// A vring request on the hostile queue 1 (or a queue that does not exist).
    Hostile {
        /// Which request.
        what: u8,
        /// Its value (an index into edge values).
        value: u64,
    },
    /// Close the connection (requests in flight) and connect again.
    Reconnect,
}

const EDGE_IOVAS: [u64; 8] = [
    u64::MAX,
    u64::MAX - 0xfff,
    u64::MAX - 0x1fff,
    0,
    1 << 63,
    SCRATCH_IOVA,
    u64::MAX - 0x7ff,
    (1 << 63) - 0x1000,
];

impl Harness {
    pub(super) fn apply(&mut self, op: &Op) -> Result<(), Failure> {
        match *op {
            Op::Pump(n) => {
                for _ in 0..n % 32 {
                    self.round()?;
                }
            }
            Op::SetMemTable(mask) => {
                let set: BTreeSet<usize> = (0..SLOTS).filter(|s| mask & (1 << s) != 0).collect();
                let regions = set.iter().map(|&s| self.region_fd(s)).collect();
                let acked = self.ack("SET_MEM_TABLE", FrontendRequest::SetMemTable(regions))?;
                let valid = !set.is_empty() && set.len() <= MAX_TABLE_REGIONS;
                if acked != valid {
                    return Err(format!(
                        "SET_MEM_TABLE of {} regions {}",
                        set.len(),
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    self.set_present(set);
                }
            }
            Op::AddRegion(n) => {
                let s = usize::from(n) % SLOTS;
                let acked =
                    self.ack("ADD_MEM_REG", FrontendRequest::AddMemReg(self.region_fd(s)))?;
                let valid = !self.present.contains(&s) && self.present.len() < MAX_REGIONS;
                if acked != valid {
                    return Err(format!(
                        "ADD_MEM_REG of slot {s} with {} regions in (slot {}) {}",
                        self.present.len(),
                        if self.present.contains(&s) {
                            "in"
                        } else {
                            "out"
                        },
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    let mut set = self.present.clone();
                    set.insert(s);
                    self.set_present(set);
                }
            }
            Op::RemRegion { slot, wrong_size } => {
                let s = usize::from(slot) % SLOTS;
                let mut r = self.region(s);
                if wrong_size {
                    r.memory_size -= PAGE;
                }
                let acked = self.ack("REM_MEM_REG", FrontendRequest::RemMemReg(r))?;
                let valid = self.present.contains(&s) && !wrong_size;
                if acked != valid {
                    return Err(format!(
                        "REM_MEM_REG of slot {s} (wrong size: {wrong_size}) {}",
                        if acked { "accepted" } else { "refused" }
                    ));
                }
                if acked {
                    let mut set = self.present.clone();
                    set.remove(&s);
                    self.set_present(set);
                }
            }
            Op::SetFeatures { iommu, event_idx } => {
                let f = self.wanted_features(iommu, event_idx);
                self.expect_ack("SET_FEATURES", FrontendRequest::SetFeatures(f))?;
                self.event_idx = event_idx;
                if iommu != self.iommu {
                    // The ring addresses change meaning: the driver resets its queue (the
                    // back-end may have stopped or restarted it meanwhile).
                    if self.queue.is_some() {
                        self.stop_queue(false)?;
                    }
                    self.abandon();
                    self.iommu = iommu;
                    if self.core_present() {
                        self.new_queue()?;
                    }
                }
            }
            Op::StopQueue { restart } => {
                if let Some(base) = self.stop_queue(true)? {
                    if restart {
                        self.start_queue(base)?;
                    }
                }
            }
            Op::NewKick => {
                if let Some(q) = self.queue.as_mut() {
                    q.kick = new_eventfd();
                    let kick = q.kick.try_clone().expect("dup");
                    let acked = self.ack(
                        "SET_VRING_KICK",
                        FrontendRequest::SetVringKick(VringFile {
                            index: 0,
                            fd: Some(kick),
                        }),
                    )?;
                    let q = self.queue.as_mut().expect("queue");
                    q.running = acked;
                    q.broken = false;
                    let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
                }
            }
            Op::NewCall(none) | Op::NewErr(none) => {
                if let Some(q) = self.queue.as_mut() {
                    let fd = if none {
                        None
                    } else {
                        let fd = new_eventfd();
                        let dup = fd.try_clone().expect("dup");
                        if matches!(op, Op::NewCall(_)) {
                            q.call = fd;
                        } else {
                            q.err = fd;
                        }
                        Some(dup)
                    };
                    let f = VringFile { index: 0, fd };
                    let req = if matches!(op, Op::NewCall(_)) {
                        FrontendRequest::SetVringCall(f)
                    } else {
                        FrontendRequest::SetVringErr(f)
                    };
                    self.expect_ack("SET_VRING_CALL/ERR", req)?;
                }
            }
            Op::Enable(on) => {
                if self.queue.is_some() {
                    self.expect_ack(
                        "SET_VRING_ENABLE",
                        FrontendRequest::SetVringEnable(VringState {
                            index: 0,
                            num: u32::from(on),
                        }),
                    )?;
                    let q = self.queue.as_mut().expect("queue");
                    q.enabled = on;
                    let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
                }
            }
            Op::Unmap { req, page, how } => self.unmap(req, page, how)?,
            Op::Remap { req, page } => self.remap(req, page)?,
            Op::Flush { kind, at } => self.flush(kind, at)?,
            Op::EdgeIotlb {
                update,
                iova,
                size,
                uaddr,
                perm,
            } => self.edge(update, iova, size, uaddr, perm)?,
            Op::Hostile { what, value } => self.hostile(what, value)?,
            Op::Reconnect => {
                self.disconnect()?;
                self.abandon();
                self.connect()?;
            }
        }
        Ok(())
    }

    /// The in-flight request and page an op names.
    fn target(&self, req: u8, page: u8) -> Option<(u16, usize)> {
        if self.inflight.is_empty() {
            return None;
        }
        let (&head, r) = self
            .inflight
            .iter()
            .nth(usize::from(req) % self.inflight.len())?;
        let n = r.pages().count();
        Some((head, usize::from(page) % n))
    }

    fn unmap(&mut self, req: u8, page: u8, how: u8) -> Result<(), Failure> {
        if !self.iommu {
            return Ok(());
        }
        let Some((head, i)) = self.target(req, page) else {
            return Ok(());
        };
        let r = self.inflight.get_mut(&head).expect("in flight");
        let p = r.pages_mut().nth(i).expect("page");
        if p.unmapped {
            return Ok(());
        }
        p.unmapped = true;
        p.lost = true;
        let (iova, gpa) = (p.iova, p.gpa);
        self.space.unmap(iova, PAGE);
        // What is left of a two-page extent is answered page by page.
        if let Some((start, egpa, n)) = self.extents.remove(&iova) {
            for k in 0..n {
                let other = start + k * PAGE;
                if other != iova {
                    self.extents.insert(other, (other, egpa + k * PAGE, 1));
                }
            }
        }
        let range = match how % 4 {
            0 => IovaRange::from_size(iova, PAGE),
            1 => IovaRange::from_size(iova - 3 * PAGE, 7 * PAGE),
            2 => IovaRange::new(iova, u64::MAX),
            _ => Ok(IovaRange::FULL),
        }
        .expect("range");
        if !self.iotlb("IOTLB INVALIDATE (unmap)", IotlbMsg::Invalidate { range })? {
            return Err(format!("INVALIDATE of {range:?} refused"));
        }
        self.poison(gpa);
        Ok(())
    }

    fn remap(&mut self, req: u8, page: u8) -> Result<(), Failure> {
        if !self.iommu || !self.snapshots.is_empty() || self.free.len() <= REPAIR_RESERVE {
            return Ok(());
        }
        let Some((head, i)) = self.target(req, page) else {
            return Ok(());
        };
        let p = self.inflight[&head].pages().nth(i).expect("page").clone();
        if p.unmapped || self.extents.contains_key(&p.iova) {
            return Ok(());
        }
        let new = self.alloc_page(0).expect("free page");
        let before = self.read_mem(p.gpa, PAGE as usize);
        self.write_page(new, &before);
        let perm = self
            .space
            .translate(p.iova)
            .map(|(_, perm)| perm)
            .expect("mapped");
        self.space.map_page(p.iova, new, perm);
        let range = IovaRange::from_size(p.iova, PAGE).expect("range");
        if !self.iotlb(
            "IOTLB UPDATE (remap)",
            IotlbMsg::Update {
                range,
                uaddr: VA_BASE + new,
                perm,
            },
        )? {
            return Err("UPDATE remapping a page of a present region refused".into());
        }
        // Acknowledged: the old page is frozen. Whatever the device wrote there before moves.
        let old = self.read_mem(p.gpa, PAGE as usize);
        if old != before {
            self.write_page(new, &old);
        }
        let r = self.inflight.get_mut(&head).expect("in flight");
        let q = r.pages_mut().nth(i).expect("page");
        q.gpa = new;
        self.poison(p.gpa);
        Ok(())
    }

    fn flush(&mut self, kind: u8, at: u64) -> Result<(), Failure> {
        let mut ranges = Vec::new();
        match kind % 4 {
            0 => ranges.push(IovaRange::FULL),
            1 => {
                if let Some(q) = self.queue.as_ref() {
                    let (d, _, u) = q.addrs;
                    ranges.push(IovaRange::new(d, u + PAGE - 1).expect("range"));
                }
            }
            2 => {
                // QEMU's full flush: [0, at) and [at, 2^64).
                let at = at.max(1);
                ranges.push(IovaRange::new(0, at - 1).expect("range"));
                ranges.push(IovaRange::new(at, u64::MAX).expect("range"));
            }
            _ => ranges.push(IovaRange::new(at, u64::MAX).expect("range")),
        }
        for range in ranges {
            if !self.iotlb("IOTLB INVALIDATE (flush)", IotlbMsg::Invalidate { range })? {
                return Err(format!("INVALIDATE of {range:?} refused"));
            }
        }
        Ok(())
    }

    fn edge(
        &mut self,
        update: bool,
        iova: u8,
        size: u8,
        uaddr: u8,
        perm: u8,
    ) -> Result<(), Failure> {
        let iova = EDGE_IOVAS[usize::from(iova) % EDGE_IOVAS.len()];
        let to_end = 0u64.wrapping_sub(iova); // 2^64 - iova (0 when iova is 0)
        let size = [
            0,
            1,
            PAGE,
            2 * PAGE,
            u64::MAX,
            1 << 63,
            to_end,
            to_end.wrapping_add(1),
        ][usize::from(size) % 8];
        // Targets: a scratch page, a range across two extra slots, a core slot, nowhere.
        let e = usize::from(uaddr / 4) % EXTRA_SLOTS;
        let extra = self.slots[CORE_SLOTS + e].gpa;
        let uaddr = match uaddr % 4 {
            0 => VA_BASE + extra,
            1 => VA_BASE + extra + EXTRA_SIZE - PAGE,
            // Core slot 0's reserved page 0 (the driver never uses the first pages).
            2 => VA_BASE,
            _ => 0x1000,
        };
        let perm = perm % 5;
        let m = VhostIotlbMsg {
            iova,
            size,
            uaddr,
            perm,
            ty: if update { 2 } else { 3 },
            padding: [0; 6],
        };
        let acked = self.raw_iotlb("raw IOTLB message at the edges", m)?;
        let overflows = size != 0 && iova.checked_add(size - 1).is_none();
        if update {
            // Valid only with a size, no wrap, a permission, and its whole target in the
            // table (the regions it spans adjacent in front-end address space).
            let in_table = !overflows
                && size != 0
                && size < (1 << 32)
                && (0..size.div_ceil(PAGE)).all(|k| {
                    let va = uaddr + k * PAGE;
                    va >= VA_BASE
                        && slot_of(va - VA_BASE).is_some_and(|s| self.present.contains(&s))
                });
            let valid = in_table && (1..=3).contains(&perm);
            if acked && !valid {
                return Err(format!("UPDATE {m:?} accepted (it must be refused)"));
            }
            if !acked && valid {
                return Err(format!("UPDATE {m:?} refused (it is valid)"));
            }
        } else if !overflows && !acked {
            return Err(format!("INVALIDATE {m:?} refused"));
        }
        Ok(())
    }

    fn hostile(&mut self, what: u8, value: u64) -> Result<(), Failure> {
        const NUMS: [u32; 10] = [0, 1, 2, 3, 16, 32, 256, 257, 1024, 65535];
        let addr = |v: u64| -> u64 {
            let extra = EXTRA_GPA + (v / 16 % EXTRA_SLOTS as u64) * EXTRA_SIZE;
            [
                SCRATCH_IOVA + (v / 16 % SCRATCH_PAGES) * PAGE,
                SCRATCH_IOVA + 0x7f0,
                u64::MAX - 0xfff,
                u64::MAX - 0x10,
                u64::MAX,
                0,
                1,
                VA_BASE + extra,
                VA_BASE + extra + EXTRA_SIZE - 0x10,
                VA_BASE + (1 << 40),
                v,
            ][(v % 11) as usize]
        };
        let index = if what >= 200 {
            [2u32, 255, u32::MAX][usize::from(what) % 3]
        } else {
            1
        };
        let idx8 = index as u8;
        match what % 10 {
            0 => {
                let num = if value % 16 == 15 {
                    value as u32
                } else {
                    NUMS[(value % 10) as usize]
                };
                self.ack(
                    "SET_VRING_NUM (hostile)",
                    FrontendRequest::SetVringNum(VringState { index, num }),
                )?;
            }
            1 => {
                let r = value.rotate_left(21);
                self.ack(
                    "SET_VRING_ADDR (hostile)",
                    FrontendRequest::SetVringAddr(VringAddr {
                        index,
                        flags: (value >> 60) as u32 & 1,
                        descriptor: addr(value),
                        available: addr(r),
                        used: addr(r.rotate_left(13)),
                        log: 0,
                    }),
                )?;
            }
            2 => {
                self.ack(
                    "SET_VRING_BASE (hostile)",
                    FrontendRequest::SetVringBase(VringState {
                        index,
                        num: value as u32,
                    }),
                )?;
            }
            3 => {
                let fd = new_eventfd();
                let dup = fd.try_clone().expect("dup");
                self.hostile_fds.push(fd);
                self.ack(
                    "SET_VRING_KICK (hostile)",
                    FrontendRequest::SetVringKick(VringFile {
                        index: idx8,
                        fd: (value & 7 != 0).then_some(dup),
                    }),
                )?;
            }
            4 | 5 => {
                let fd = (value & 3 != 0).then(new_eventfd);
                let f = VringFile { index: idx8, fd };
                let req = if what % 10 == 4 {
                    FrontendRequest::SetVringCall(f)
                } else {
                    FrontendRequest::SetVringErr(f)
                };
                self.ack("SET_VRING_CALL/ERR (hostile)", req)?;
            }
            6 => {
                self.ack(
                    "SET_VRING_ENABLE (hostile)",
                    FrontendRequest::SetVringEnable(VringState {
                        index,
                        num: (value & 1) as u32,
                    }),
                )?;
            }
            7 => {
                let r = self.reply(
                    "GET_VRING_BASE (hostile)",
                    FrontendRequest::GetVringBase(VringState { index, num: 0 }),
                    ReplyKind::VringState,
                )?;
                if index != 1 && r.is_some() {
                    return Err(format!("GET_VRING_BASE of queue {index} answered {r:?}"));
                }
            }
            _ => {
                for fd in &self.hostile_fds {
                    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
                }
            }
        }
        Ok(())
    }
}
