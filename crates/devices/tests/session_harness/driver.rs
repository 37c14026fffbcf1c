//! The guest's virtio-blk driver on queue 0: requests submitted up to the configured depth
//! (reads, writes, flushes, GET_ID and requests past the end of the disk; on scattered pages,
//! on a straddle pair across two regions, or through an indirect table), completions
//! collected (and handed to `checks.rs`), the pages of a completed request released, what is
//! in flight abandoned when its queue or its connection goes, and one round of all that.
//!
//! What it must not do: reuse an IOVA (a stale translation would then read right by luck) or
//! a page still in use; keep in flight two requests whose disk ranges overlap where one of
//! them writes (their outcome would be open); judge a completion itself; block (a round
//! waits at most a fraction of a millisecond for a call or a MISS).

use iotlb::Perm;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::testing::{Buf, PAGE};
use wire::features::device as dev_f;

use super::checks::stale;
use super::memory::is_straddle_page;
use super::{
    Failure, Harness, Kind, Page, Req, CORE_SIZE, DISK, DISK_PAGES, REPAIR_RESERVE, RESERVED_PAGES,
    RING_PAGES, SECTOR,
};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

impl Harness {
    /// Submit requests up to the configured depth.
    fn submit_some(&mut self) -> Result<(), Failure> {
        if self.queue.is_none() || !self.core_present() {
            return Ok(());
        }
        while self.inflight.len() < self.cfg.depth {
            // The longest chain: header, three data pages, status.
            if self
                .queue
                .as_ref()
                .is_some_and(|q| q.driver.free_descriptors() < 5)
                || !self.submit_one()?
            {
                break;
            }
        }
        Ok(())
    }

    fn pick_disk_range(&mut self, n: u64, write: bool) -> Option<u64> {
        for _ in 0..4 {
            let first = self.rng.below(DISK_PAGES - n + 1);
            let clash = self
                .inflight
                .values()
                .any(|r| r.disk_overlaps(first, n) && (write || r.writes_disk()));
            if !clash {
                return Some(first);
            }
        }
        None
    }

    fn submit_one(&mut self) -> Result<bool, Failure> {
        let roll = self.rng.below(100);
        let kind = match roll {
            0..=39 => Kind::In,
            40..=79 => Kind::Out,
            80..=84 => Kind::Flush,
            85..=89 => Kind::GetId,
            90..=94 => Kind::Beyond(T_IN),
            _ => Kind::Beyond(T_OUT),
        };
        let straddle = if matches!(kind, Kind::In | Kind::Out) && self.rng.below(5) == 0 {
            self.straddle_busy.iter().position(|b| !b)
        } else {
            None
        };
        let npages = match (kind, straddle) {
            (Kind::Flush, _) => 0,
            (Kind::GetId | Kind::Beyond(_), _) => 1,
            (_, Some(_)) => 2,
            _ => 1 + self.rng.below(3),
        };
        let indirect = self.features & dev_f::RING_INDIRECT_DESC != 0 && self.rng.below(4) == 0;
        let need = 2 + if straddle.is_some() { 0 } else { npages } + u64::from(indirect);
        if self.free.len() < REPAIR_RESERVE + need as usize {
            return Ok(false);
        }
        let (disk_page, sector) = match kind {
            Kind::In | Kind::Out => {
                let Some(p) = self.pick_disk_range(npages, kind == Kind::Out) else {
                    return Ok(false);
                };
                (p, p * PAGE / SECTOR)
            }
            Kind::Beyond(_) => (0, DISK / SECTOR + self.rng.below(4) * 8),
            _ => (0, 0),
        };
        let id = self.next_id;
        self.next_id += 1;
        let ty = match kind {
            Kind::In => T_IN,
            Kind::Out => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::GetId => T_GET_ID,
            Kind::Beyond(t) => t,
        };
        let writes_data = matches!(kind, Kind::Out | Kind::Beyond(T_OUT));
        let mut data = Vec::new();
        if writes_data {
            data = (0..npages * PAGE)
                .map(|_| self.rng.next_u64() as u8)
                .collect();
        }
        // Header.
        let mut hdr = vec![0u8; PAGE as usize];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let header = self.place(&[hdr], Perm::ReadOnly, None).remove(0);
        // Data.
        let contents: Vec<Vec<u8>> = (0..npages as usize)
            .map(|i| {
                if writes_data {
                    data[i * PAGE as usize..(i + 1) * PAGE as usize].to_vec()
                } else {
                    stale(id, PAGE as usize)
                }
            })
            .collect();
        let data_perm = if writes_data {
            Perm::ReadOnly
        } else {
            Perm::ReadWrite
        };
        let data_pages = if npages > 0 {
            self.place(&contents, data_perm, straddle)
        } else {
            Vec::new()
        };
        if let Some(s) = straddle {
            self.straddle_busy[s] = true;
        }
        let mut st = vec![0u8; PAGE as usize];
        st[0] = 0xff;
        let status = self.place(&[st], Perm::ReadWrite, None).remove(0);
        // Descriptors: with the IOMMU one per buffer; without it one per data page, except
        // across a straddle pair (one descriptor over two regions).
        let mut bufs = vec![Buf {
            iova: header.iova,
            len: 16,
            write: false,
        }];
        if !data_pages.is_empty() {
            let write = !writes_data;
            let len = if kind == Kind::GetId {
                512
            } else {
                (npages * PAGE) as u32
            };
            if self.iommu || straddle.is_some() {
                bufs.push(Buf {
                    iova: data_pages[0].iova,
                    len,
                    write,
                });
            } else {
                for p in &data_pages {
                    bufs.push(Buf {
                        iova: p.iova,
                        len: len.min(PAGE as u32),
                        write,
                    });
                }
            }
        }
        bufs.push(Buf {
            iova: status.iova,
            len: 1,
            write: true,
        });
        let table = if indirect {
            Some(
                self.place(&[vec![0u8; PAGE as usize]], Perm::ReadOnly, None)
                    .remove(0),
            )
        } else {
            None
        };
        let q = self.queue.as_mut().expect("queue");
        let Some(head) = q.driver.add_chain(
            &self.mem,
            &self.space,
            &bufs,
            table.as_ref().map(|t| t.iova),
        ) else {
            return Err("harness: out of descriptors".into());
        };
        q.avail = q.avail.wrapping_add(1);
        let _ = rustix::io::write(&q.kick, &1u64.to_ne_bytes());
        let table = table.map(|mut t| {
            t.init = self.read_mem(t.gpa, PAGE as usize);
            t
        });
        if self.inflight.contains_key(&head) {
            return Err(format!("harness: head {head} reused while in flight"));
        }
        self.inflight.insert(
            head,
            Req {
                id,
                kind,
                disk_page,
                npages,
                data,
                header,
                data_pages,
                status,
                table,
                straddle,
            },
        );
        self.summary.submitted += 1;
        Ok(true)
    }

    /// Place `contents` (one page each) on fresh pages (or a straddle pair) at fresh IOVAs
    /// (with the IOMMU; guest-physical addresses without it).
    fn place(&mut self, contents: &[Vec<u8>], perm: Perm, straddle: Option<usize>) -> Vec<Page> {
        let gpas: Vec<u64> = match straddle {
            Some(s) => vec![
                (s as u64 + 1) * CORE_SIZE - PAGE,
                (s as u64 + 1) * CORE_SIZE,
            ],
            None => contents
                .iter()
                .map(|_| self.alloc_page(0).expect("pages counted"))
                .collect(),
        };
        let start = self.next_iova;
        if self.iommu {
            self.next_iova += (contents.len() as u64 + 1) * PAGE;
        }
        let mut out = Vec::new();
        for (i, (c, &gpa)) in contents.iter().zip(&gpas).enumerate() {
            self.write_page(gpa, c);
            let iova = if self.iommu {
                let iova = start + i as u64 * PAGE;
                self.space.map_page(iova, gpa, perm);
                iova
            } else {
                gpa
            };
            out.push(Page {
                iova,
                gpa,
                init: c.clone(),
                lost: false,
                unmapped: false,
            });
        }
        if self.iommu && straddle.is_some() {
            for p in &out {
                self.extents.insert(p.iova, (start, gpas[0], 2));
            }
        }
        out
    }

    /// Check the completions published so far.
    pub(super) fn collect(&mut self) -> Result<(), Failure> {
        let Some(q) = self.queue.as_mut() else {
            return Ok(());
        };
        let used = q.driver.take_used(&self.mem, &self.space);
        q.used = q.used.wrapping_add(used.len() as u16);
        for (head, _len) in used {
            let Some(req) = self.inflight.remove(&head) else {
                return Err(format!(
                    "used entry for head {head}, which is not in flight (completed twice?)"
                ));
            };
            self.check_completion(&req)?;
            self.release(req);
        }
        Ok(())
    }

    pub(super) fn mark_unknown(&mut self, req: &Req) {
        if req.writes_disk() {
            for p in req.disk_page..req.disk_page + req.npages {
                self.model[p as usize] = None;
            }
        }
    }

    /// A completed request's pages go back to the allocator (its IOVAs are never reused); a
    /// straddle pair is free again unless one of its pages was poisoned.
    fn release(&mut self, req: Req) {
        if let Some(s) = req.straddle {
            let pair = [
                (s as u64 + 1) * CORE_SIZE - PAGE,
                (s as u64 + 1) * CORE_SIZE,
            ];
            let intact = req
                .data_pages
                .iter()
                .zip(pair)
                .all(|(p, g)| !p.lost && p.gpa == g);
            if intact {
                self.straddle_busy[s] = false;
            }
        }
        for p in req.pages() {
            if p.unmapped {
                continue;
            }
            if self.iommu {
                self.space.unmap(p.iova, PAGE);
                self.extents.remove(&p.iova);
            }
            if !is_straddle_page(p.gpa) {
                self.free.push(p.gpa);
            }
        }
    }

    /// Everything in flight is given up (the queue is stopped or the connection gone): its
    /// pages and the rings are poisoned, its writes leave the disk unknown.
    pub(super) fn abandon(&mut self) {
        let reqs: Vec<Req> = std::mem::take(&mut self.inflight).into_values().collect();
        for r in reqs {
            self.mark_unknown(&r);
            for p in r.pages() {
                if !p.unmapped {
                    self.poison(p.gpa);
                }
            }
            // A straddle pair is never handed out again once poisoned.
        }
        if let Some(q) = self.queue.take() {
            let gpa = (RESERVED_PAGES + q.generation * RING_PAGES) * PAGE;
            for p in 0..RING_PAGES {
                self.poison(gpa + p * PAGE);
            }
        }
    }

    pub(super) fn check_err_fd(&mut self) {
        if let Some(q) = self.queue.as_mut() {
            let mut b = [0u8; 8];
            if rustix::io::read(&q.err, &mut b).is_ok() {
                q.broken = true;
                self.summary.broken += 1;
            }
        }
    }

    /// One round of the driver: misses, completions (checked), submissions. Memory is checked
    /// once per step ([`Harness::step`]).
    pub(super) fn round(&mut self) -> Result<(), Failure> {
        self.check_alive()?;
        if self.queue.is_none() && self.core_present() && self.conn.is_some() {
            self.new_queue()?;
        }
        self.serve_misses()?;
        if let Some(q) = self.queue.as_ref() {
            let chan = self.channel.as_ref().map(|c| c.socket());
            let mut fds = vec![PollFd::new(&q.call, PollFlags::IN)];
            if let Some(c) = chan {
                fds.push(PollFd::new(c, PollFlags::IN));
            }
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 250_000,
            };
            let _ = poll(&mut fds, Some(&ts));
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&q.call, &mut b);
        }
        self.serve_misses()?;
        self.collect()?;
        self.check_err_fd();
        self.submit_some()
    }
}
