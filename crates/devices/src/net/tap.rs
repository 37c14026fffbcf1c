//! The tap link of a net device: frames the guest transmits are written to a Linux tap
//! interface, and frames the host sends on it are read by a thread of their own
//! (`tap-rx`) and queued for the receive queue ([`Packets`], pair 0), which it wakes.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI` and no vnet header: what crosses it is a
//! bare Ethernet frame (the device offers no offload, so a virtio-net header says nothing
//! a tap would need). One queue pair: a multi-queue tap (`IFF_MULTI_QUEUE`) is not done.
//! Flow control, not loss, towards the guest: when the pair's queue is full the reader
//! stops reading (the kernel's tap queue holds or drops, as for any slow reader).
//!
//! No guest memory here, and nothing that blocks the engine: the reader polls with a
//! timeout and stops when the device is dropped.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use backend::QueueWakers;
use parking_lot::Mutex;

use super::device::{NetStats, MAX_FRAME};
use super::packets::{Edge, Packets};

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name (1 to 15 bytes, no NUL).
    #[error("tap name {0:?}: 1 to 15 bytes, no NUL or '/'")]
    Name(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Open (or create) the tap interface `name`. Needs `CAP_NET_ADMIN` unless the interface
    /// exists and belongs to the caller.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= libc::IFNAMSIZ
            || bytes.iter().any(|&b| b == 0 || b == b'/')
        {
            return Err(TapError::Name(name.to_string()));
        }
        let sys = |what| move |source| TapError::Sys { what, source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(sys("open /dev/net/tun (is the tun module loaded?)"))?;
        let fd = OwnedFd::from(file);
        // SAFETY: `ifreq` is a C struct of a char array and a union of integers, socket
        // addresses and a pointer: all-zero is a valid value of each (a null pointer).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, &s) in ifr.ifr_name.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a valid, exclusively
        // borrowed `ifreq` alive across the call, and `fd` is a live descriptor.
        if unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF,
                std::ptr::from_mut(&mut ifr),
            )
        } < 0
        {
            return Err(sys("TUNSETIFF")(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What the reader thread and the handlers share.
#[derive(Debug)]
pub(super) struct TapShared {
    fd: OwnedFd,
    stop: AtomicBool,
    /// The receive queue's wakers of the connection being served (none between two).
    waker: Mutex<Option<QueueWakers>>,
}

impl TapShared {
    /// Send one frame out of the tap; false if the kernel refused it.
    pub(super) fn send(&self, frame: &[u8]) -> bool {
        match rustix::io::write(self.fd.as_fd(), frame) {
            Ok(n) => n == frame.len(),
            Err(e) => {
                tracing::debug!(error = %e, len = frame.len(), "net: tap write failed");
                false
            }
        }
    }

    /// The connection's receive queue 0 is served with these wakers.
    pub(super) fn set_waker(&self, wake: QueueWakers) {
        *self.waker.lock() = Some(wake);
    }
}

/// The tap link: the shared state and the reader thread, stopped on drop.
#[derive(Debug)]
pub(super) struct TapLink {
    pub(super) shared: Arc<TapShared>,
    reader: Option<JoinHandle<()>>,
}

/// How long the reader waits for a frame before it looks at `stop`.
const READ_WAIT_MS: i32 = 100;
/// How long it waits for room in a full queue between looks.
const ROOM_WAIT: Duration = Duration::from_micros(50);

impl TapLink {
    pub(super) fn start(
        tap: Tap,
        packets: Arc<Packets>,
        stats: Arc<NetStats>,
    ) -> Result<Self, TapError> {
        let shared = Arc::new(TapShared {
            fd: tap.fd,
            stop: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("tap-rx".into())
            .spawn(move || read_loop(&s, &packets, &stats))
            .map_err(|source| TapError::Sys {
                what: "spawning the tap reader",
                source,
            })?;
        Ok(TapLink {
            shared,
            reader: Some(reader),
        })
    }
}

impl Drop for TapLink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// Read frames off the tap into pair 0's queue until stopped.
fn read_loop(s: &TapShared, packets: &Packets, stats: &NetStats) {
    while !s.stop.load(Ordering::SeqCst) {
        let mut fds = [rustix::event::PollFd::new(
            &s.fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(READ_WAIT_MS) * 1_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "net: polling the tap failed; the reader stops");
                return;
            }
        }
        // Room first: a full queue means the guest is slow; wait rather than drop.
        while !packets.has_room(0) {
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(ROOM_WAIT);
        }
        let mut buf = packets.buffer(0);
        buf.resize(MAX_FRAME, 0);
        let n = match rustix::io::read(s.fd.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {
                packets.recycle(0, buf);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "net: reading the tap failed; the reader stops");
                return;
            }
        };
        buf.truncate(n);
        let (edge, queued) = packets.push(0, buf);
        if !queued {
            stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        if edge == Edge::Crossed {
            if let Some(w) = s.waker.lock().as_ref() {
                w.wake(0);
            }
        }
    }
}
