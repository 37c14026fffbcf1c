//! The back-end channel, front-end side: the thread that reads MISS and ACCESS_FAIL messages
//! and answers MISSes from the vIOMMU (`serve_channel`), and what it counts
//! ([`ChannelStats`], [`MissLog`]). It runs on a thread of its own, never one that waits for
//! a reply on the main socket; it never touches guest memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use iotlb::hist::Histogram;
use iotlb::Access;
use wire::vhost_user::{BackendRequest, Connection, Reply};
use wire::IotlbMsg;

use crate::viommu::{DeviceIotlb, Viommu};

/// What the back-end channel thread saw.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// MISS messages received.
    pub misses: AtomicU64,
    /// MISSes for an IOVA the vIOMMU has not mapped (left unanswered, as QEMU does).
    pub unmapped: AtomicU64,
    /// MISSes that could not be answered (the main socket failed).
    pub failed: AtomicU64,
    /// ACCESS_FAIL messages received.
    pub access_fails: AtomicU64,
    /// Other or malformed messages.
    pub other: AtomicU64,
    /// Time from a MISS received to its UPDATE acknowledged.
    pub service: Histogram,
    /// The pages MISSes asked for and when they came, for a driver that measures how long a
    /// device waits on one (off until [`MissLog::enable`]).
    pub miss_log: MissLog,
}

/// MISSes by IOVA page and arrival time, kept once a driver asks for them: the driver then
/// sees when the buffer a MISS was about completes, which times the device's whole round
/// trip the same way for any back-end.
#[derive(Debug, Default)]
pub struct MissLog {
    on: std::sync::atomic::AtomicBool,
    entries: parking_lot::Mutex<Vec<(u64, Instant)>>,
}

impl MissLog {
    /// Start keeping MISSes.
    pub fn enable(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    /// The MISSes kept since the last call: (IOVA page, when it was received).
    pub fn take(&self) -> Vec<(u64, Instant)> {
        std::mem::take(&mut *self.entries.lock())
    }

    fn record(&self, iova: u64, at: Instant) {
        if self.on.load(Ordering::Relaxed) {
            self.entries
                .lock()
                .push((iova & !(crate::viommu::PAGE - 1), at));
        }
    }
}

/// Most back-end messages taken in one go.
const CHANNEL_BATCH: usize = 64;

/// The back-end channel thread: answer MISSes until the channel closes. Messages that are
/// already waiting are taken together (up to [`CHANNEL_BATCH`]), and their MISSes answered
/// with UPDATEs pipelined on the main socket: one round trip for a burst (a back-end that
/// reports every missing page of a request at once) instead of one per page.
pub(super) fn serve_channel(
    chan: &Connection,
    viommu: &Viommu,
    dev: &dyn DeviceIotlb,
    stats: &ChannelStats,
) {
    let add = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    let mut batch: Vec<(wire::vhost_user::Header, BackendRequest, Instant)> = Vec::new();
    loop {
        batch.clear();
        while batch.len() < CHANNEL_BATCH && (batch.is_empty() || chan.readable_now()) {
            let raw = match chan.recv() {
                Ok(m) => m,
                Err(e) if e.is_fatal() => {
                    tracing::debug!(error = %e, "vhost-user front-end: back-end channel closed");
                    return;
                }
                Err(e) => {
                    add(&stats.other);
                    tracing::warn!(error = %e, "vhost-user front-end: bad back-end message");
                    let _ = chan.reject(&e);
                    continue;
                }
            };
            let header = raw.header;
            match BackendRequest::decode(&header, &raw.payload, raw.fds) {
                Ok(r) => batch.push((header, r, Instant::now())),
                Err(e) => {
                    add(&stats.other);
                    tracing::warn!(error = %e, "vhost-user front-end: bad back-end request");
                    let _ = chan.refuse(&header);
                }
            }
        }
        let misses: Vec<(u64, Access)> = batch
            .iter()
            .filter_map(|(_, r, _)| match r {
                BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, perm }) => {
                    tracing::trace!(iova = %format_args!("{iova:#x}"), ?perm, "vhost-user front-end: MISS");
                    let access = if perm.allows(Access::Write) {
                        Access::Write
                    } else {
                        Access::Read
                    };
                    Some((*iova, access))
                }
                _ => None,
            })
            .collect();
        let misses_ok = if misses.is_empty() {
            true
        } else {
            match viommu.fault_all(dev, &misses) {
                Ok(n) => {
                    let unmapped = misses.len() - n;
                    if unmapped > 0 {
                        stats.unmapped.fetch_add(unmapped as u64, Ordering::Relaxed);
                        tracing::debug!(
                            unmapped,
                            "vhost-user front-end: MISS for an unmapped IOVA, not answered"
                        );
                    }
                    true
                }
                Err(e) => {
                    stats
                        .failed
                        .fetch_add(misses.len() as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, "vhost-user front-end: cannot answer MISSes");
                    false
                }
            }
        };
        for (header, req, received) in &batch {
            let ok = match req {
                BackendRequest::IotlbMsg(IotlbMsg::Miss { iova, .. }) => {
                    add(&stats.misses);
                    stats.miss_log.record(*iova, *received);
                    if misses_ok {
                        stats.service.record(received.elapsed());
                    }
                    misses_ok
                }
                BackendRequest::IotlbMsg(IotlbMsg::AccessFail { iova, perm }) => {
                    add(&stats.access_fails);
                    tracing::info!(
                        iova = %format_args!("{iova:#x}"),
                        ?perm,
                        "vhost-user front-end: the device reported a denied access"
                    );
                    true
                }
                other => {
                    add(&stats.other);
                    tracing::debug!(?other, "vhost-user front-end: back-end request ignored");
                    false
                }
            };
            if header.needs_reply() {
                let _ = chan.send_reply(header, &Reply::U64(u64::from(!ok)));
            }
        }
    }
}
