//! The device side of one split virtqueue: pop a chain, complete it, decide on notifications.
//!
//! Every address goes through the queue's [`Translator`]: ring areas once per change of
//! their translation (see [`crate::ring`]), descriptor buffers and indirect tables per chain.
//!
//! **Miss semantics.** [`Queue::pop`] translates the whole chain at the head of the avail ring
//! before consuming it. If an address misses, nothing is consumed and nothing is written: the
//! caller gets [`PopError::Miss`] and parks the queue, and after an UPDATE calls `pop` again,
//! which goes on from where the walk stopped, keeping what it translated (see
//! [`crate::walk`]; the walk starts over only if a change touched what it kept). A permission
//! failure ([`PopError::Denied`]) or a malformed chain, or one beyond the device's
//! [`ChainLimits`] ([`PopError::Invalid`]), consumes the entry: the device completes that
//! head with an error status and moves on. A ring that cannot be used at all (a ring area
//! refused, an avail index that jumps by more than the queue size, a head outside the table)
//! is [`PopError::Broken`]: the queue serves nothing until it is reset, and the entry is not
//! consumed.
//!
//! **Ordering.** The avail index is loaded with acquire before any ring entry or descriptor is
//! read; the used index is stored with release after the used element; a full fence separates
//! publishing the used index (or the avail event) from reading the driver's event index (or
//! the avail index again), as the virtio specification requires for event suppression.
//!
//! This file never blocks and never sends anything: misses are reported, not resolved.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use iotlb::{Access, IovaRange};
use vm_memory::GuestMemoryBackend;

use crate::chain::{Chain, ChainError, Descriptor};
use crate::log::DirtyLog;
use crate::ring::{
    avail_ring_len, desc_table_len, used_ring_len, RingArea, RingError, DESC_SIZE, MAX_QUEUE_SIZE,
};
use crate::translate::{Fault, Translator};
use crate::walk::{Areas, ChainLimits, Stop, Walk, MAX_INDIRECT};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY`.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Why a queue's configuration is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Size 0, not a power of two, or over the maximum.
    #[error("queue size {size} (must be a power of two up to {max})")]
    Size {
        /// Requested size.
        size: u16,
        /// The maximum.
        max: u16,
    },
    /// A ring area not aligned as the specification requires.
    #[error("{area} at {addr:#x} is not {align}-byte aligned")]
    Alignment {
        /// Which area.
        area: &'static str,
        /// Its address.
        addr: u64,
        /// The alignment required.
        align: u64,
    },
    /// The queue has no addresses yet.
    #[error("queue addresses are not set")]
    NotConfigured,
}

/// What popping a chain ran into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PopError {
    /// An address is not translated yet. Nothing was consumed: park, then pop again after an
    /// UPDATE covers `iova`.
    #[error("IOTLB miss at {iova:#x} for {access}")]
    Miss {
        /// First byte that missed.
        iova: u64,
        /// Direction needed.
        access: Access,
    },
    /// A buffer's mapping forbids the access. The entry is consumed: complete `head` with an
    /// error and report the failure (ACCESS_FAIL).
    #[error("chain {head}: access denied at {iova:#x} for {access}")]
    Denied {
        /// The chain's head.
        head: u16,
        /// First byte refused.
        iova: u64,
        /// Direction refused.
        access: Access,
    },
    /// The chain is malformed, or beyond the device's limits. The entry is consumed; complete
    /// `head` with an error.
    #[error("chain {head}: {reason}")]
    Invalid {
        /// The chain's head.
        head: u16,
        /// What is wrong.
        reason: ChainError,
    },
    /// The ring itself is unusable; the queue needs a reset.
    #[error("queue broken: {0}")]
    Broken(String),
}

/// One split virtqueue, device side.
#[derive(Debug)]
pub struct Queue {
    max_size: u16,
    size: u16,
    desc: RingArea,
    avail: RingArea,
    used: RingArea,
    configured: bool,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The used index when the driver was last notified (event index suppression).
    signalled_used: Option<Wrapping<u16>>,
    event_idx: bool,
    broken: Option<String>,
    /// The indirect table of the chain being walked.
    indirect: RingArea,
    /// The indirect table of a chain looked at without consuming it ([`Queue::visit_buffers`]):
    /// not the walk's, which must survive a look at other chains between two resumptions.
    peek: RingArea,
    /// The chain walk in progress, kept across misses.
    walk: Walk,
    /// Segments of the buffer being translated.
    scratch: Vec<iotlb::Segment>,
    /// The device's limits on one chain.
    limits: ChainLimits,
    /// Whether `next_used` was read from the ring since the last `set_next_avail`.
    used_synced: bool,
    /// Where writes to the used ring are logged (live migration), if anywhere.
    log: Option<Arc<dyn DirtyLog>>,
}

impl Queue {
    /// A queue that accepts sizes up to `max_size` (clamped to 32768).
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size: max_size.min(MAX_QUEUE_SIZE),
            size: 0,
            desc: RingArea::new(Access::Read),
            avail: RingArea::new(Access::Read),
            used: RingArea::new(Access::Write),
            configured: false,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            signalled_used: None,
            event_idx: false,
            broken: None,
            indirect: RingArea::new(Access::Read),
            peek: RingArea::new(Access::Read),
            walk: Walk::new(),
            scratch: Vec::new(),
            limits: ChainLimits::NONE,
            used_synced: false,
            log: None,
        }
    }

    /// Log every write to the used ring in `log` while it is [`DirtyLog::active`].
    pub fn set_dirty_log(&mut self, log: Option<Arc<dyn DirtyLog>>) {
        self.log = log;
    }

    /// Log `len` bytes at `off` of the used ring, if logging is on.
    fn log_used(&self, off: u64, len: u64) {
        if let Some(log) = self.log.as_deref().filter(|l| l.active()) {
            self.used.log_written(off, len, log);
        }
    }

    /// The largest size accepted.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The size in use.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Set the size (SET_VRING_NUM).
    pub fn set_size(&mut self, size: u16) -> Result<(), ConfigError> {
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(ConfigError::Size {
                size,
                max: self.max_size,
            });
        }
        self.size = size;
        self.configured = false;
        self.walk.cancel();
        Ok(())
    }

    /// Set the three ring addresses (SET_VRING_ADDR), in the translator's address space.
    pub fn set_addresses(&mut self, desc: u64, avail: u64, used: u64) -> Result<(), ConfigError> {
        for (area, addr, align) in [
            ("descriptor table", desc, 16),
            ("avail ring", avail, 2),
            ("used ring", used, 4),
        ] {
            if addr % align != 0 {
                return Err(ConfigError::Alignment { area, addr, align });
            }
        }
        if self.size == 0 {
            return Err(ConfigError::NotConfigured);
        }
        self.desc.set(desc, desc_table_len(self.size));
        self.avail.set(avail, avail_ring_len(self.size));
        self.used.set(used, used_ring_len(self.size));
        self.configured = true;
        self.broken = None;
        self.walk.cancel();
        Ok(())
    }

    /// The ring addresses (descriptor table, avail, used).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc.addr(), self.avail.addr(), self.used.addr())
    }

    /// Use `VIRTIO_RING_F_EVENT_IDX` (from the negotiated features).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Set where the next avail entry is (SET_VRING_BASE). The used index is read from the
    /// used ring on the next access, as Linux vhost does (chains may still be in flight).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = Wrapping(idx);
        self.next_used = Wrapping(idx);
        self.used_synced = false;
        self.signalled_used = None;
        self.walk.cancel();
    }

    /// Refuse chains beyond `limits` (the device's; by default only the ring's own limits
    /// apply). Nothing else bounds a chain: not the IOTLB's size, since a walk keeps what it
    /// translated across misses.
    pub fn set_limits(&mut self, limits: ChainLimits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> ChainLimits {
        self.limits
    }

    /// The next avail entry to consume (GET_VRING_BASE).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// The next used slot.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Why the queue is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Forget the ring translations and the walk in progress (the memory table changed, say).
    pub fn invalidate_translations(&mut self) {
        self.desc.invalidate();
        self.avail.invalidate();
        self.used.invalidate();
        self.indirect.invalidate();
        self.peek.invalidate();
        self.walk.cancel();
    }

    /// Back to the unconfigured state.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    fn ready(&self) -> Result<(), PopError> {
        if let Some(why) = &self.broken {
            return Err(PopError::Broken(why.clone()));
        }
        if !self.configured {
            return Err(PopError::Broken(ConfigError::NotConfigured.to_string()));
        }
        Ok(())
    }

    /// A ring error: a miss parks the queue, anything else breaks it.
    fn ring_error(&mut self, e: RingError) -> PopError {
        match e {
            RingError::Fault {
                fault: Fault::Miss { iova, access },
                ..
            } => PopError::Miss { iova, access },
            other => {
                let why = other.to_string();
                tracing::warn!(error = %why, "virtq: ring unusable, queue stops until reset");
                self.broken = Some(why.clone());
                PopError::Broken(why)
            }
        }
    }

    fn ensure<T: Translator + ?Sized, M: GuestMemoryBackend>(
        area: &mut RingArea,
        tr: &mut T,
        mem: &M,
    ) -> Result<(), RingError> {
        area.ensure(tr, mem)
    }

    /// The driver's avail index (acquire).
    fn avail_idx<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
    ) -> Result<Wrapping<u16>, PopError> {
        let r = Self::ensure(&mut self.avail, tr, mem)
            .and_then(|()| self.avail.load_u16(mem, 2, Ordering::Acquire));
        r.map(Wrapping).map_err(|e| self.ring_error(e))
    }

    /// Whether the driver has made chains available that were not popped yet.
    pub fn has_available<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
    ) -> Result<bool, PopError> {
        self.ready()?;
        Ok(self.avail_idx(tr, mem)? != self.next_avail)
    }

    /// Pop the chain at the head of the avail ring into `chain`: `Ok(false)` if there is none.
    ///
    /// See the module documentation for what each error means for the avail entry. After a
    /// [`PopError::Miss`], calling again goes on with the same chain from where it stopped.
    pub fn pop<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        chain: &mut Chain,
    ) -> Result<bool, PopError> {
        self.ready()?;
        let avail_idx = self.avail_idx(tr, mem)?;
        let pending = (avail_idx - self.next_avail).0;
        if pending == 0 {
            // (A driver that moved its index back took the chain being walked away.)
            self.walk.cancel();
            return Ok(false);
        }
        if pending > self.size {
            let why = format!(
                "avail index {} is {} entries ahead of {} in a queue of {}",
                avail_idx.0, pending, self.next_avail.0, self.size
            );
            tracing::warn!(error = %why, "virtq: ring broken");
            self.broken = Some(why.clone());
            self.walk.cancel();
            return Err(PopError::Broken(why));
        }
        // The used ring too: completing must not miss once the request has had effects.
        let r = Self::ensure(&mut self.desc, tr, mem)
            .and_then(|()| Self::ensure(&mut self.used, tr, mem))
            .and_then(|()| self.sync_used(mem));
        r.map_err(|e| self.ring_error(e))?;
        // The generation before anything is translated in this pass: a change after it is
        // either seen at the next pass or waited for by the back-end's quiescence.
        let generation = tr.generation();
        let resume =
            self.walk.is_walking(self.next_avail) && self.walk.still_valid(&*tr, generation);
        if !resume {
            let head = self.next_head(mem)?;
            let table = IovaRange::from_size(self.desc.addr(), desc_table_len(self.size)).ok();
            self.walk.start(self.next_avail, head, generation, table);
        }
        let head = self.walk.head();
        let mut areas = Areas {
            desc: &self.desc,
            indirect: &mut self.indirect,
            size: self.size,
            limits: self.limits,
            scratch: &mut self.scratch,
        };
        let stop = match self.walk.run(&mut areas, tr, mem) {
            Ok(()) => {
                self.walk.finish(chain);
                self.next_avail += 1;
                return Ok(true);
            }
            Err(stop) => stop,
        };
        let consumed = match stop {
            // The walk stays where it is.
            Stop::Fault(Fault::Miss { iova, access }) => {
                return Err(PopError::Miss { iova, access })
            }
            Stop::Ring(RingError::Fault {
                fault: Fault::Miss { iova, access },
                ..
            }) => return Err(PopError::Miss { iova, access }),
            Stop::Ring(e) => {
                self.walk.cancel();
                return Err(self.ring_error(e));
            }
            Stop::Fault(Fault::Denied { iova, access }) => PopError::Denied { head, iova, access },
            Stop::Fault(Fault::BadAddress { addr, len }) => PopError::Invalid {
                head,
                reason: ChainError::BadAddress { addr, len },
            },
            Stop::Invalid(reason) => PopError::Invalid { head, reason },
        };
        self.walk.cancel();
        self.next_avail += 1;
        Err(consumed)
    }

    /// The head in the avail slot of `next_avail`. One outside the descriptor table breaks the
    /// queue: there is nothing to complete with an error, the ring itself is wrong.
    fn next_head<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<u16, PopError> {
        let slot = u64::from(self.next_avail.0 % self.size);
        let head = self
            .avail
            .load_u16(mem, 4 + 2 * slot, Ordering::Relaxed)
            .map_err(|e| self.ring_error(e))?;
        if head >= self.size {
            let why = ChainError::HeadOutOfRange {
                head,
                size: self.size,
            }
            .to_string();
            tracing::warn!(error = %why, "virtq: ring broken");
            self.broken = Some(why.clone());
            self.walk.cancel();
            return Err(PopError::Broken(why));
        }
        Ok(head)
    }

    /// Give up on the chain at the head of the avail ring without translating its buffers
    /// (its miss was never answered): consume the entry and return its head, or `None` if
    /// nothing is available. A head outside the table breaks the queue (nothing to complete;
    /// the entry is not consumed), as in [`Queue::pop`].
    pub fn skip<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
    ) -> Result<Option<u16>, PopError> {
        self.ready()?;
        let avail_idx = self.avail_idx(tr, mem)?;
        if avail_idx == self.next_avail {
            return Ok(None);
        }
        let head = self.next_head(mem)?;
        self.walk.cancel();
        self.next_avail += 1;
        Ok(Some(head))
    }

    /// The address and length of the last device-writable buffer of the chain at `head`,
    /// found without translating any buffer (an indirect table is translated). For a device
    /// completing a request it could not serve: a status byte lives there.
    pub fn last_writable<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        head: u16,
    ) -> Result<Option<(u64, u32)>, PopError> {
        let mut last = None;
        self.visit_buffers(tr, mem, head, |addr, len, write| {
            if write && len > 0 {
                last = Some((addr, len));
            }
            true
        })?;
        Ok(last)
    }

    /// The IOVA ranges the walk of the next chain has translated and keeps (after a miss;
    /// empty otherwise): a look-ahead for pages to ask for need not ask for these again.
    pub fn walked(&self) -> &[iotlb::IovaRange] {
        if self.walk.is_walking(self.next_avail) {
            self.walk.translated()
        } else {
            &[]
        }
    }

    /// The head of the avail entry `ahead` places after the next one to pop, if the driver
    /// has published it (`ahead == 0`: the next chain). Nothing is consumed.
    pub fn peek_head<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        ahead: u16,
    ) -> Result<Option<u16>, PopError> {
        self.ready()?;
        let avail_idx = self.avail_idx(tr, mem)?;
        if (avail_idx - self.next_avail).0 <= ahead {
            return Ok(None);
        }
        let slot = u64::from((self.next_avail.0.wrapping_add(ahead)) % self.size);
        let head = self
            .avail
            .load_u16(mem, 4 + 2 * slot, Ordering::Relaxed)
            .map_err(|e| self.ring_error(e))?;
        Ok((head < self.size).then_some(head))
    }

    /// Call `f(addr, len, device_writable)` for each buffer of the chain at `head`, in order,
    /// without translating any buffer (an indirect table is translated: a miss on it is
    /// returned); `f` returns false to stop. A malformed chain simply ends the walk (the
    /// buffers before it were visited); a loop ends after as many descriptors as its table
    /// holds (the ring's `size`, or the indirect table's entries). For looking at a
    /// chain without consuming it: finding a status byte, or the pages a request will need.
    pub fn visit_buffers<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        head: u16,
        mut f: impl FnMut(u64, u32, bool) -> bool,
    ) -> Result<(), PopError> {
        self.ready()?;
        Self::ensure(&mut self.desc, tr, mem).map_err(|e| self.ring_error(e))?;
        let size = self.size;
        let mut index = head;
        let mut table: Option<(u64, u64)> = None; // (entries, current) inside an indirect table
                                                  // Descriptors looked at in the current table: a loop ends after as many as it holds.
        let mut seen: u64 = 0;
        loop {
            seen += 1;
            let mut raw = [0u8; 16];
            let read = match table {
                None if index < size && seen <= u64::from(size) => {
                    self.desc.read(mem, u64::from(index) * DESC_SIZE, &mut raw)
                }
                Some((entries, i)) if i < entries && seen <= entries => {
                    self.peek.read(mem, i * DESC_SIZE, &mut raw)
                }
                _ => return Ok(()),
            };
            if read.is_err() {
                return Ok(());
            }
            let d = Descriptor::from_bytes(&raw);
            if d.is_indirect() {
                let entries = u64::from(d.len) / DESC_SIZE;
                if table.is_some()
                    || d.len == 0
                    || u64::from(d.len) % DESC_SIZE != 0
                    || entries > MAX_INDIRECT
                {
                    return Ok(());
                }
                self.peek.set(d.addr, u64::from(d.len));
                if let Err(e) = self.peek.ensure(tr, mem) {
                    return match e {
                        RingError::Fault {
                            fault: Fault::Miss { iova, access },
                            ..
                        } => Err(PopError::Miss { iova, access }),
                        _ => Ok(()),
                    };
                }
                table = Some((entries, 0));
                seen = 0;
                continue;
            }
            if !f(d.addr, d.len, d.is_write()) || !d.has_next() {
                return Ok(());
            }
            match &mut table {
                Some((_, i)) => *i = u64::from(d.next),
                None => index = d.next,
            }
        }
    }

    /// Take the used index from the ring once after the queue (re)starts.
    fn sync_used<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<(), RingError> {
        if !self.used_synced {
            self.next_used = Wrapping(self.used.load_u16(mem, 2, Ordering::Relaxed)?);
            self.used_synced = true;
        }
        Ok(())
    }

    /// Put `head` in the used ring with `len` bytes written, and publish it (release).
    pub fn complete<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), PopError> {
        self.ready()?;
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        let r = Self::ensure(&mut self.used, tr, mem).and_then(|()| self.sync_used(mem));
        r.map_err(|e| self.ring_error(e))?;
        let slot = u64::from(self.next_used.0 % self.size);
        let next = self.next_used + Wrapping(1);
        let r = self.used.write(mem, 4 + 8 * slot, &elem);
        r.map_err(|e| self.ring_error(e))?;
        // Logged before the index that publishes it, and the index once stored.
        self.log_used(4 + 8 * slot, 8);
        let r = self.used.store_u16(mem, 2, next.0, Ordering::Release);
        r.map_err(|e| self.ring_error(e))?;
        self.log_used(2, 2);
        self.next_used = next;
        Ok(())
    }

    /// Put `heads` (in the order they were popped) in the used ring with their lengths and
    /// publish them with one used index store (release): the driver sees all of them or
    /// none, as a frame spread over several receive chains needs (its first chain's header
    /// counts them).
    pub fn complete_all<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        heads: &[(u16, u32)],
    ) -> Result<(), PopError> {
        self.ready()?;
        let r = Self::ensure(&mut self.used, tr, mem).and_then(|()| self.sync_used(mem));
        r.map_err(|e| self.ring_error(e))?;
        let mut next = self.next_used;
        for &(head, len) in heads {
            let mut elem = [0u8; 8];
            elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..8].copy_from_slice(&len.to_le_bytes());
            let slot = u64::from(next.0 % self.size);
            let r = self.used.write(mem, 4 + 8 * slot, &elem);
            r.map_err(|e| self.ring_error(e))?;
            self.log_used(4 + 8 * slot, 8);
            next += Wrapping(1);
        }
        let r = self.used.store_u16(mem, 2, next.0, Ordering::Release);
        r.map_err(|e| self.ring_error(e))?;
        self.log_used(2, 2);
        self.next_used = next;
        Ok(())
    }

    /// Give back the last `n` chains popped and not completed: the next [`Queue::pop`]
    /// takes them again, walked anew (for a device that could not use them now).
    pub fn unpop(&mut self, n: u16) {
        self.walk.cancel();
        self.next_avail -= Wrapping(n);
    }

    /// Whether the driver wants an interrupt for what was completed since the last time this
    /// returned true (honours `VIRTQ_AVAIL_F_NO_INTERRUPT` or the used event index).
    pub fn needs_notification<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
    ) -> Result<bool, PopError> {
        self.ready()?;
        // The used index we published must be visible before we read the driver's wishes.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let r = if self.event_idx {
            let off = 4 + 2 * u64::from(self.size);
            let used_event = Self::ensure(&mut self.avail, tr, mem)
                .and_then(|()| self.avail.load_u16(mem, off, Ordering::Relaxed))
                .map(Wrapping);
            // Only a decision made moves the mark: after an error the next call still sees
            // everything completed since the last notification.
            used_event.map(|event| match self.signalled_used.replace(new) {
                None => true,
                // vring_need_event: notify if `event` lies in (old, new].
                Some(old) => (new - event - Wrapping(1)) < (new - old),
            })
        } else {
            Self::ensure(&mut self.avail, tr, mem)
                .and_then(|()| self.avail.load_u16(mem, 0, Ordering::Relaxed))
                .map(|flags| flags & AVAIL_F_NO_INTERRUPT == 0)
        };
        r.map_err(|e| self.ring_error(e))
    }

    /// Ask the driver for kicks (or not). When enabling, returns whether chains arrived in the
    /// meantime (the caller must then pop them rather than wait for a kick).
    pub fn set_notification<T: Translator + ?Sized, M: GuestMemoryBackend>(
        &mut self,
        tr: &mut T,
        mem: &M,
        enable: bool,
    ) -> Result<bool, PopError> {
        self.ready()?;
        let r = Self::ensure(&mut self.used, tr, mem).and_then(|()| {
            if self.event_idx {
                if enable {
                    let off = 4 + 8 * u64::from(self.size);
                    self.used
                        .store_u16(mem, off, self.next_avail.0, Ordering::Relaxed)
                        .map(|()| Some(off))
                } else {
                    Ok(None)
                }
            } else {
                let flags = if enable { 0 } else { USED_F_NO_NOTIFY };
                self.used
                    .store_u16(mem, 0, flags, Ordering::Relaxed)
                    .map(|()| Some(0))
            }
        });
        if let Some(off) = r.map_err(|e| self.ring_error(e))? {
            self.log_used(off, 2);
        }
        if !enable {
            return Ok(false);
        }
        // Our wish must be visible before we look at the avail index again.
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(tr, mem)? != self.next_avail)
    }
}
