//! A worker's thread: its wait loop. It sleeps on the kick and wake-up eventfds (with the
//! miss timeout while parked, after a busy-poll window), looks at stop and enable, resumes
//! a parked request, serves the ring, and hands back where the queue resumes. Serving and the
//! miss lifecycle are in `serve` and `miss`; this file never touches a ring itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::{Chain, GpaTranslator, IotlbTranslator, Queue, Translator};
use vm_memory::GuestMemoryMmap;

use super::miss::{Next, Parked};
use super::serve::Drained;
use super::wake::{consume, signal};
use super::{QueueState, Runner};
use crate::device::Device;
use crate::quiesce::Section;
use crate::ratelimit::{AccessFailLimit, Limit, WARNINGS_PER_WINDOW};
use crate::stats::EngineCounters;

/// Busy-poll looks at the wake-up flag per look at the kick and wake-up eventfds.
pub(super) const KICK_LOOK_EVERY: u32 = 8;

impl<D: Device> Runner<D> {
    pub(super) fn run(self) {
        let mut queue = Queue::new(self.shared.dev.max_queue_size());
        let configured = queue
            .set_size(self.cfg.size)
            .and_then(|()| queue.set_addresses(self.cfg.desc, self.cfg.avail, self.cfg.used));
        queue.set_next_avail(self.cfg.base);
        queue.set_event_idx(self.cfg.event_idx);
        // The device's limits, and no other: a walk keeps what it translated across misses,
        // so the IOTLB's size limits nothing.
        queue.set_limits(self.shared.dev.chain_limits());
        if let Err(e) = configured {
            tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: queue not started");
            self.wait_for_stop();
            return;
        }
        let mut tr: Box<dyn Translator> = if self.cfg.iommu {
            Box::new(IotlbTranslator::new(self.shared.iotlb.handle()))
        } else {
            Box::new(GpaTranslator)
        };
        let mut w = QueueState {
            queue,
            handler: self.shared.dev.handler(self.cfg.index),
            chain: Chain::new(),
            open: None,
            unnotified: 0,
            held_since: None,
            rtt: None,
            warnings: Limit::new(WARNINGS_PER_WINDOW),
            access_fails: AccessFailLimit::new(),
        };
        let mut parked: Option<Parked> = None;
        let mut broken = false;
        // The last drain yielded with work possibly left: look at the eventfds without
        // blocking, then drain again.
        let mut more = false;
        tracing::debug!(
            queue = self.cfg.index,
            iommu = self.cfg.iommu,
            "vhost-user: worker started"
        );

        loop {
            let enabled = self.cfg.enabled.load(Ordering::SeqCst);
            // A broken or disabled queue waits for nothing but a kick, a wake-up or a stop.
            let timeout = parked.filter(|_| enabled && !broken).map(|p| {
                (p.since + self.shared.miss_timeout).saturating_duration_since(Instant::now())
            });
            // Completions a parked drain left unannounced (see `drain`) are announced before
            // blocking; a wait answered within the busy-poll window goes on without either.
            if std::mem::take(&mut more) && parked.is_none() {
                // Consume the kicks that came meanwhile (their chains are what we drain).
                self.sleep(Some(Duration::ZERO));
            } else if !(timeout.is_some() && self.spin_for_wake()) {
                if w.unnotified > 0 {
                    self.notify(&mut w, &mut *tr);
                }
                self.sleep(timeout);
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if broken || !self.cfg.enabled.load(Ordering::SeqCst) {
                continue;
            }
            let prev = parked.take();
            if let Some(p) = prev {
                match self.resume(&mut w, &mut *tr, p) {
                    Next::Parked(again) => {
                        parked = Some(again);
                        self.publish_base(&w);
                        continue;
                    }
                    Next::Go => {}
                    Next::Broken => {
                        broken = self.break_queue();
                        self.publish_base(&w);
                        continue;
                    }
                }
            }
            match self.serve_ring(&mut w, &mut *tr) {
                Drained::Empty => {}
                Drained::Parked(p) => {
                    // The same miss again (a kick while parked re-walks the chain and misses
                    // where it did): keep its start time, or kicks would postpone the
                    // timeout forever. A miss whose time is up was just dealt with by
                    // `resume`; its retry starts a new wait.
                    parked = Some(match prev {
                        Some(old)
                            if old.iova == p.iova
                                && old.access == p.access
                                && old.unfinished.is_none()
                                && p.unfinished.is_none()
                                && old.since.elapsed() < self.shared.miss_timeout =>
                        {
                            Parked {
                                since: old.since,
                                sent: old.sent,
                                ..p
                            }
                        }
                        _ => p,
                    });
                }
                Drained::Broken => broken = self.break_queue(),
                Drained::Yielded => more = true,
            }
            self.publish_base(&w);
        }
        // Stopping (possibly straight out of a busy-poll): completions held while parked are
        // announced now, or a driver waiting for them would wait for nothing.
        if w.unnotified > 0 {
            self.notify(&mut w, &mut *tr);
        }
        self.publish_base(&w);
    }

    /// Where the queue resumes: a request off the avail ring but not completed is handed back.
    pub(super) fn publish_base(&self, w: &QueueState<D::Handler>) {
        let next = w.queue.next_avail();
        let base = if w.open.is_some() {
            next.wrapping_sub(1)
        } else {
            next
        };
        self.base.store(base, Ordering::SeqCst);
    }

    /// The queue cannot go on (the reason was logged where it was found): drop our misses,
    /// count it and signal the vring error eventfd. Returns true (the new `broken`).
    pub(super) fn break_queue(&self) -> bool {
        self.shared.iotlb.cancel_waiter(&self.cfg.index);
        EngineCounters::add(&self.shared.stats.broken_queues, 1);
        let signalled = match self.cfg.err.lock().as_ref() {
            Some(fd) => {
                signal(fd);
                true
            }
            None => false,
        };
        tracing::warn!(
            queue = self.cfg.index,
            signalled,
            "vhost-user: queue stopped until the front-end restarts it"
        );
        true
    }

    /// Sleep until a kick, a wake-up, or `timeout`.
    pub(super) fn sleep(&self, timeout: Option<Duration>) {
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        if let Err(e) = self.poll_eventfds(ts.as_ref()) {
            if e != rustix::io::Errno::INTR {
                tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Every wake-up that set the flag while we were not polling also wrote the eventfd:
        // the flag is stale (an eventfd write still to come is seen by the next poll).
        self.wake.take();
    }

    /// Wait up to `ts` (`None`: for ever) for a kick or an eventfd wake-up, and consume what
    /// came. True if either did.
    pub(super) fn poll_eventfds(&self, ts: Option<&Timespec>) -> rustix::io::Result<bool> {
        let mut fds = [
            PollFd::new(&*self.cfg.kick, PollFlags::IN),
            PollFd::new(&*self.wake, PollFlags::IN),
        ];
        poll(&mut fds, ts)?;
        let kicked = fds[0].revents().contains(PollFlags::IN);
        let woken = fds[1].revents().contains(PollFlags::IN);
        if kicked {
            consume(&*self.cfg.kick);
        }
        if woken {
            consume(&*self.wake);
        }
        Ok(kicked || woken)
    }

    /// Parked on a miss: poll for the wake-up (or a kick) for up to the busy-poll window
    /// before [`Self::sleep`] blocks, so that an answer coming within it costs no thread
    /// wake-up. True when the wait ended with a wake-up or a kick; false when the window ran
    /// out (or there is none).
    pub(super) fn spin_for_wake(&self) -> bool {
        let window = self.shared.busy_poll;
        if window.is_zero() {
            return false;
        }
        let start = Instant::now();
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // A flag set while we were not polling came with an eventfd write, which look 0
        // reads: taking both would walk the chain twice for one wake-up.
        self.wake.take();
        self.wake.start_polling();
        let mut looks = 0u32;
        let answered = loop {
            if self.wake.take() {
                break true;
            }
            // The eventfds (a kick, or a wake-up from before we polled) every few looks.
            if looks % KICK_LOOK_EVERY == 0 {
                match self.poll_eventfds(Some(&zero)) {
                    Ok(true) => break true,
                    Err(e) if e != rustix::io::Errno::INTR => break false,
                    _ => {}
                }
            }
            looks = looks.wrapping_add(1);
            if start.elapsed() >= window || self.stop.load(Ordering::Relaxed) {
                break false;
            }
            std::thread::yield_now();
        };
        // Not short-circuited: polling must stop either way.
        self.wake.stop_polling() | answered
    }

    pub(super) fn wait_for_stop(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            self.sleep(None);
        }
    }

    /// Run `f` inside the worker's epoch, with the memory table current at its start. The
    /// epoch is entered before the table is read (so a table swap waits for us or is seen by
    /// us) and left when `f` returns or unwinds.
    pub(super) fn section<R>(&self, f: impl FnOnce(&GuestMemoryMmap) -> R) -> R {
        let _section = Section::enter(&self.epoch, || self.shared.iotlb.generation());
        let mem = self.shared.mem.read().clone();
        f(mem.memory())
    }
}
