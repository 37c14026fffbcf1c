//! A virtio-blk device whose handlers stop at a gate the test opens: it holds a request in
//! flight at a chosen point (inside `serve`, in the engine's quiescence section; or in
//! `run_deferred`, outside it) while the test sends IOTLB messages and looks at what is
//! acknowledged. Test support only: nothing here checks anything.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::{Device, QueueHandler, Served, Unreported};
use devices::{Blk, BlkQueue};
use virtq::{Chain, ChainLimits};
use vm_memory::GuestMemoryMmap;

use super::Frontend;

/// Where the next request stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    Nowhere = 0,
    /// In `serve`: inside the quiescence section, with the chain translated.
    InServe = 1,
    /// In `run_deferred`: a FLUSH, DISCARD or WRITE_ZEROES between its two sections.
    InDeferred = 2,
}

/// Holds the next request at [`Stop`] until released.
pub struct Gate {
    armed: AtomicU8,
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

/// The test's side of a gate.
pub struct GateControl {
    gate: Arc<Gate>,
    entered: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl GateControl {
    pub fn new() -> Self {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        GateControl {
            gate: Arc::new(Gate {
                armed: AtomicU8::new(Stop::Nowhere as u8),
                entered: Mutex::new(entered_tx),
                release: Mutex::new(release_rx),
            }),
            entered,
            release,
        }
    }

    /// The next request stops at `at`.
    pub fn arm(&self, at: Stop) {
        self.gate.armed.store(at as u8, Ordering::SeqCst);
    }

    /// Let the stopped request go on.
    pub fn release(&self) {
        self.release.send(()).unwrap();
    }

    /// Serve misses until the armed request is at its stop.
    pub fn wait_stopped(&self, f: &mut Frontend) {
        let start = Instant::now();
        while self.entered.try_recv().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never reached the gate"
            );
            f.serve_misses();
        }
    }

    /// `blk`, stopping at this gate.
    pub fn device(&self, blk: Blk) -> Gated {
        Gated {
            blk,
            gate: self.gate.clone(),
        }
    }
}

impl Gate {
    fn pass(&self, at: Stop) {
        if self
            .armed
            .compare_exchange(
                at as u8,
                Stop::Nowhere as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.release.lock().unwrap().recv();
        }
    }
}

/// virtio-blk whose handlers stop at the gate.
pub struct Gated {
    blk: Blk,
    gate: Arc<Gate>,
}

pub struct GatedQueue {
    inner: BlkQueue,
    gate: Arc<Gate>,
}

impl Device for Gated {
    type Handler = GatedQueue;
    fn features(&self) -> u64 {
        self.blk.features()
    }
    fn protocol_features(&self) -> u64 {
        self.blk.protocol_features()
    }
    fn queues(&self) -> u16 {
        self.blk.queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.blk.max_queue_size()
    }
    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        self.blk.read_config(offset, buf)
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> bool {
        self.blk.write_config(offset, data)
    }
    fn set_features(&self, acked: u64) {
        self.blk.set_features(acked)
    }
    fn chain_limits(&self) -> ChainLimits {
        self.blk.chain_limits()
    }
    fn handler(&self, index: u16, wake: backend::QueueWakers) -> GatedQueue {
        GatedQueue {
            inner: self.blk.handler(index, wake),
            gate: self.gate.clone(),
        }
    }
}

impl QueueHandler for GatedQueue {
    fn serve(
        &mut self,
        chain: &Chain,
        more: &mut dyn backend::MoreChains,
        mem: &GuestMemoryMmap,
    ) -> Result<Served, Unreported> {
        self.gate.pass(Stop::InServe);
        self.inner.serve(chain, more, mem)
    }
    fn run_deferred(&mut self) {
        self.gate.pass(Stop::InDeferred);
        self.inner.run_deferred()
    }
    fn report_deferred(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        self.inner.report_deferred(status, mem)
    }
    fn fail(&mut self, status: u64, mem: &GuestMemoryMmap) -> Result<u32, Unreported> {
        self.inner.fail(status, mem)
    }
}
