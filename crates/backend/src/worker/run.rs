//! A worker's thread: its wait loop. It waits for a chain (polling the ring first under
//! adaptive polling) or, parked, for the answer to its miss (polling for it first, then
//! sleeping on the kick and wake-up eventfds with the miss timeout), looks at stop and
//! enable, resumes a parked request, serves the ring, and hands back where the queue
//! resumes. Serving, polling and the miss lifecycle are in `serve`, `poll` and `miss`; this
//! file never touches a ring itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use virtq::{Chain, GpaTranslator, IotlbTranslator, Queue, Translator};
use vm_memory::GuestMemoryMmap;

use super::miss::{Next, Parked};
use super::poll::Polling;
use super::serve::Drained;
use super::wake::{consume, signal};
use super::{Idle, QueueState, Runner};
use crate::device::{Device, QueueWakers};
use crate::quiesce::Section;
use crate::ratelimit::{AccessFailLimit, Limit, WARNINGS_PER_WINDOW};
use crate::stats::EngineCounters;

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
        // Used-ring writes are logged whenever dirty logging is on (the buffers are logged
        // where chains complete, `serve.rs`).
        queue.set_dirty_log(Some(self.shared.log.clone()));
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
            handler: self
                .shared
                .dev
                .handler(self.cfg.index, QueueWakers(self.shared.wakers.clone())),
            chain: Chain::new(),
            extra: Chain::new(),
            taken: Vec::new(),
            device_idle: Idle::No,
            open: None,
            unnotified: 0,
            held_since: None,
            rtt: None,
            warnings: Limit::new(WARNINGS_PER_WINDOW),
            access_fails: AccessFailLimit::new(),
            poll: Polling::new(self.shared.poll, self.shared.busy_poll),
        };
        let mut parked: Option<Parked> = None;
        let mut broken = false;
        // The last drain yielded with work possibly left: look at the eventfds without
        // blocking, then drain again. A queue starts with a drain: chains posted before it
        // started (a restart, a reconnect) need no kick, and a previous worker may have left
        // kicks off.
        let mut more = true;
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
            let for_chain = parked.is_none() && enabled && !broken;
            if std::mem::take(&mut more) && parked.is_none() {
                // Consume the kicks that came meanwhile (their chains are what we drain).
                self.sleep(Some(Duration::ZERO));
            } else if for_chain {
                let since = *w.poll.idle_since.get_or_insert_with(Instant::now);
                let came = if w.poll.kicks_off && w.device_idle == Idle::No {
                    // The drain left kicks off to poll for the next chain. If none comes
                    // within the window, the drain asks for kicks again (and looks at the
                    // ring once more) before the next wait blocks.
                    let came = self.spin_for_chain(&mut w, &mut *tr);
                    w.poll.window_over = !came;
                    came
                } else {
                    if w.unnotified > 0 {
                        self.notify(&mut w, &mut *tr);
                    }
                    // A device with nothing to do (net's receive queue with no frame) polls
                    // for the wake-up that makes it ready for the same window: the queue
                    // that wakes it (its transmit side) then costs it no thread wake-up.
                    (w.device_idle == Idle::Device && self.spin_for_ready(&mut w))
                        || self.sleep(None)
                };
                if came {
                    w.poll.chain_came(since);
                }
            } else {
                let since = Instant::now();
                let answered = timeout.is_some() && self.spin_for_wake(w.poll.answers.window());
                let answered = answered || {
                    if w.unnotified > 0 {
                        self.notify(&mut w, &mut *tr);
                    }
                    self.sleep(timeout)
                };
                if answered && timeout.is_some() {
                    w.poll.answers.waited(since.elapsed());
                }
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
        // Stopping with kicks off: ask for them again, so that whoever runs the ring next
        // (a restarted worker, another back-end) is kicked. Best effort: a used ring we
        // cannot reach now is the next owner's to set up.
        if w.poll.kicks_off && !broken {
            let _ = self.section(|gm| w.queue.set_notification(&mut *tr, gm, true));
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

    /// Sleep until a kick, a wake-up, or `timeout`. True if a kick or a wake-up came.
    pub(super) fn sleep(&self, timeout: Option<Duration>) -> bool {
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let came = match self.poll_eventfds(ts.as_ref()) {
            Ok(came) => came,
            Err(e) => {
                if e != rustix::io::Errno::INTR {
                    tracing::warn!(queue = self.cfg.index, error = %e, "vhost-user: poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            }
        };
        // Every wake-up that set the flag while we were not polling also wrote the eventfd:
        // the flag is stale (an eventfd write still to come is seen by the next poll).
        self.wake.take();
        came
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
