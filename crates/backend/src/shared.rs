//! What the connection thread and the queue workers share: the engine's settings, the
//! device, the memory table, the IOTLB, the back-end channel, the quiescence epochs, the
//! dirty log, the counters, and the one registry through which a queue is woken. State only: the session
//! (connection thread) and the workers each decide what to do with it; nothing here blocks.

use std::sync::Arc;
use std::time::Duration;

use iotlb::SharedIotlb;
use parking_lot::RwLock;
use wire::poll::PollMode;

use crate::channel::BackendChannel;
use crate::device::Device;
use crate::dirty::{LogMode, SharedLog};
use crate::memory::MemTable;
use crate::quiesce::Epochs;
use crate::stats::EngineCounters;
use crate::worker::Waker;

/// Smallest IOTLB the engine is built and tested for. A chain needs no room in the IOTLB
/// beyond the page it is translating (a walk keeps what it translated), but the answers to
/// several queues' misses must not evict one another before the queues that wait for them
/// look: the IOTLB protects its newest `min(capacity / 2, 32)` entries, and the MISSes a
/// queue sends ahead are kept to a quarter of the capacity shared among the queues.
pub const MIN_IOTLB_CAPACITY: usize = 16;

/// IOTLB entries per queue below which the MISS bound (one per page a request touches) may
/// not hold: the IOTLB protects its newest `min(capacity / 2, 32)` entries, and every queue
/// may have one answer and its MISSes sent ahead arriving at once.
pub(crate) const MIN_ENTRIES_PER_QUEUE: usize = 4;

/// Settings of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// IOTLB entries, within [`MIN_IOTLB_CAPACITY`]`..=`[`iotlb::MAX_CAPACITY`] (a value
    /// outside is brought inside, with a warning).
    pub iotlb_capacity: usize,
    /// How long a MISS may stay unanswered before it is sent again (and, the second time,
    /// before the request fails).
    pub miss_timeout: Duration,
    /// Busy-poll cap: how long the connection thread may poll for the next message, a queue
    /// parked on a miss for its answer, and (adaptive) an empty queue for its next chain,
    /// before blocking. Zero blocks at once (no CPU spent waiting; each message and kick
    /// then costs a thread wake-up).
    pub busy_poll: Duration,
    /// Which waits poll within `busy_poll`, and whether the windows adapt
    /// ([`PollMode::Adaptive`], the default) or stay at the cap ([`PollMode::Misses`]: the
    /// connection thread and parked queues only).
    pub poll: PollMode,
    /// Accept memfd regions not sealed against shrinking (see [`crate::memory`]): a
    /// front-end that truncates one then kills the back-end with SIGBUS.
    pub allow_unsealed_memory: bool,
    /// What dirty logging records: guest-physical pages, or (a deliberate bug, for tests)
    /// the addresses the driver gave.
    pub log_mode: LogMode,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            iotlb_capacity: iotlb::DEFAULT_CAPACITY,
            miss_timeout: Duration::from_secs(1),
            busy_poll: Duration::ZERO,
            poll: PollMode::Adaptive,
            allow_unsealed_memory: false,
            log_mode: LogMode::Gpa,
        }
    }
}

/// What the connection thread shares with the workers.
pub(crate) struct Shared<D: Device> {
    pub dev: Arc<D>,
    pub mem: RwLock<Arc<MemTable>>,
    pub iotlb: SharedIotlb<u16>,
    pub channel: BackendChannel,
    pub epochs: Epochs,
    pub stats: EngineCounters,
    pub miss_timeout: Duration,
    pub busy_poll: Duration,
    pub poll: PollMode,
    pub iotlb_capacity: usize,
    /// The running workers' wake-ups, by queue index: the one registry through which the
    /// connection thread (an UPDATE answered a miss; a queue enabled) and the workers (a
    /// MISS sent ahead that never went out) wake a queue.
    pub wakers: Arc<Wakers>,
    /// The dirty log (live migration), mapped by SET_LOG_BASE, on with `VHOST_F_LOG_ALL`.
    pub log: Arc<SharedLog>,
}

/// Each running worker's [`Waker`], by queue index.
#[derive(Debug)]
pub(crate) struct Wakers(RwLock<Vec<Option<Arc<Waker>>>>);

impl Wakers {
    /// Room for `queues` queues, none running.
    pub(crate) fn new(queues: usize) -> Self {
        Wakers(RwLock::new(vec![None; queues]))
    }

    /// Queue `index` runs with `waker`.
    pub(crate) fn register(&self, index: u16, waker: &Arc<Waker>) {
        if let Some(slot) = self.0.write().get_mut(usize::from(index)) {
            *slot = Some(waker.clone());
        }
    }

    /// The worker of `waker` stops: nobody wakes it any more.
    pub(crate) fn unregister(&self, waker: &Arc<Waker>) {
        for slot in self.0.write().iter_mut() {
            if slot.as_ref().is_some_and(|w| Arc::ptr_eq(w, waker)) {
                *slot = None;
            }
        }
    }

    /// Wake queue `index`, if it runs.
    pub(crate) fn wake(&self, index: u16) {
        if let Some(Some(w)) = self.0.read().get(usize::from(index)) {
            w.wake();
        }
    }
}
