//! The checks: liveness of the process and the server thread (no panic anywhere, the thread
//! still serving while connected), a completion against its request and the disk (a
//! completion is the truth), and, after every step, the poisoned pages, the core slots out of
//! the back-end's table and the disk against the model; and the fills they recognise (a
//! poisoned page's canary, a read buffer's stale fill).
//!
//! What it must not do: talk to the back-end or wait for it (a check looks at guest memory,
//! the disk and the thread, nothing else); change anything but the summary's counters, the
//! disk model and the handle of a server thread found ended (joined to say how); panic on a
//! violation (each is an `Err`); fail on what the protocol leaves open (IOERR for a request
//! whose memory or mapping went away; the outcome of a request whose status page was
//! unmapped is not checked).

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use virtq::testing::PAGE;

use super::{Failure, Harness, Kind, Req, DISK, DISK_PAGES, PANICS, SERIAL};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const CANARY_SIG: [u8; 8] = *b"CANARY\xc3\x3c";
const STALE_SIG: [u8; 8] = *b"STALE!\x5a\xa5";

pub(super) fn canary(gpa: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGE as usize);
    while v.len() < PAGE as usize {
        v.extend_from_slice(&CANARY_SIG);
        v.extend_from_slice(&gpa.to_le_bytes());
    }
    v
}

pub(super) fn stale(id: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&STALE_SIG);
        v.extend_from_slice(&id.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Whether `data` holds a canary or a stale-buffer block at a 16-byte boundary.
fn poisoned(data: &[u8]) -> Option<&'static str> {
    for b in data.chunks(16) {
        if b.starts_with(&CANARY_SIG) {
            return Some("a canary (a poisoned page)");
        }
        if b.starts_with(&STALE_SIG) {
            return Some("a read buffer's stale fill");
        }
    }
    None
}

impl Harness {
    pub(super) fn check_completion(&mut self, req: &Req) -> Result<(), Failure> {
        let what = format!("request #{} ({:?})", req.id, req.kind);
        if req.status.lost {
            self.summary.unchecked += 1;
            self.mark_unknown(req);
            return Ok(());
        }
        let status = self.read_mem(req.status.gpa, 1)[0];
        let data_lost = req.data_pages.iter().any(|p| p.lost);
        match status {
            S_OK => {
                self.summary.ok += 1;
                match req.kind {
                    Kind::Beyond(_) => {
                        return Err(format!("{what}: completed OK beyond the end of the disk"))
                    }
                    Kind::In if !data_lost => {
                        let len = (req.npages * PAGE) as usize;
                        let mut got = Vec::with_capacity(len);
                        for p in &req.data_pages {
                            got.extend(self.read_mem(p.gpa, PAGE as usize));
                        }
                        let mut disk = vec![0u8; len];
                        self.disk
                            .read_exact_at(&mut disk, req.disk_page * PAGE)
                            .expect("disk");
                        if got != disk {
                            let at = got.iter().zip(&disk).position(|(a, b)| a != b).unwrap_or(0);
                            let why = poisoned(&got[at - at % 16..])
                                .map(|p| format!(" (the buffer holds {p})"))
                                .unwrap_or_default();
                            return Err(format!(
                                "{what}: completed OK but its data differs from the disk at \
                                 byte {at} of {len} (disk page {}){why}",
                                req.disk_page
                            ));
                        }
                    }
                    Kind::Out => {
                        for i in 0..req.npages {
                            let a = (i * PAGE) as usize;
                            self.model[(req.disk_page + i) as usize] =
                                Some(req.data[a..a + PAGE as usize].to_vec());
                        }
                    }
                    Kind::GetId if !data_lost => {
                        let got = self.read_mem(req.data_pages[0].gpa, SERIAL.len());
                        if got != SERIAL.as_bytes() {
                            return Err(format!("{what}: completed OK with id {got:?}"));
                        }
                    }
                    _ => {}
                }
            }
            S_IOERR | S_UNSUPP => {
                self.summary.errors += 1;
                if status == S_UNSUPP
                    && !req.header.lost
                    && matches!(req.kind, Kind::In | Kind::Out | Kind::GetId)
                {
                    return Err(format!("{what}: UNSUPP for a supported request"));
                }
                self.mark_unknown(req);
            }
            0xff => {
                return Err(format!(
                    "{what}: on the used ring without its status byte written"
                ))
            }
            s => return Err(format!("{what}: status byte {s}")),
        }
        Ok(())
    }

    pub(super) fn check_alive(&mut self) -> Result<(), Failure> {
        let panics = PANICS.load(Ordering::SeqCst);
        if panics != self.panics_at_start {
            return Err(format!(
                "{} panic(s) in the process (a back-end worker or the session)",
                panics - self.panics_at_start
            ));
        }
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let t = self.thread.take().expect("thread");
            let how = match t.join() {
                Ok(()) => "returned",
                Err(_) => "panicked",
            };
            return Err(format!("the server thread {how} while connected"));
        }
        Ok(())
    }

    pub(super) fn check_memory(&mut self) -> Result<(), Failure> {
        for &gpa in &self.quarantine {
            let got = self.read_mem(gpa, PAGE as usize);
            if got != canary(gpa) {
                let at = got
                    .iter()
                    .zip(canary(gpa))
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "poison: the back-end wrote into page {gpa:#x} (offset {at:#x}) after it \
                     acknowledged losing access to it"
                ));
            }
        }
        for (&s, snap) in &self.snapshots {
            let got = self.read_mem(self.slots[s].gpa, snap.len());
            if &got != snap {
                let at = got.iter().zip(snap).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "removed region: slot {s} (guest-physical {:#x}) changed at offset {at:#x} \
                     after the back-end acknowledged its removal",
                    self.slots[s].gpa
                ));
            }
        }
        let mut disk = vec![0u8; DISK as usize];
        self.disk.read_exact_at(&mut disk, 0).expect("disk");
        for p in 0..DISK_PAGES {
            if self
                .inflight
                .values()
                .any(|r| r.writes_disk() && r.disk_overlaps(p, 1))
            {
                continue;
            }
            let got = &disk[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            match &self.model[p as usize] {
                Some(want) if got != want.as_slice() => {
                    let why = poisoned(got)
                        .map(|w| format!(": it holds {w}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "disk page {p} differs from what was last written with OK{why}"
                    ));
                }
                None => {
                    if let Some(w) = poisoned(got) {
                        return Err(format!("disk page {p} holds {w}"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}
