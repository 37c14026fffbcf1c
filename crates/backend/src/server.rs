//! The listening side: a Unix socket path serving one front-end at a time, and after a
//! disconnect, the next one (reconnect).
//!
//! [`Server::serve`] binds the path (removing a stale socket file), accepts a connection,
//! runs its session on the calling thread until the front-end goes away, cleans up, and
//! accepts again, until [`ShutdownHandle::shutdown`] is called (from a signal handler thread,
//! say); then it removes the socket file. Statistics of every connection are summed.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::device::Device;
use crate::session::{Session, SessionEnd};
use crate::shared::EngineConfig;
use crate::stats::Stats;
use iotlb::hist::Histogram;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting failed.
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}

/// Stops a running [`Server`] from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl ShutdownHandle {
    /// Stop accepting, and end the current connection.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.current.lock().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A vhost-user back-end serving `D`.
pub struct Server<D: Device> {
    dev: Arc<D>,
    config: EngineConfig,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
    totals: Mutex<Stats>,
    miss_rtt: Arc<Histogram>,
    service: Arc<Histogram>,
    /// Set once [`Server::serve`] listens (the socket file appears a moment earlier, at
    /// bind time, when a connect is still refused).
    listening: AtomicBool,
}

impl<D: Device> Server<D> {
    /// A server for `dev`.
    pub fn new(dev: D, config: EngineConfig) -> Self {
        Server {
            dev: Arc::new(dev),
            config,
            stop: Arc::new(AtomicBool::new(false)),
            current: Arc::new(Mutex::new(None)),
            totals: Mutex::new(Stats::default()),
            miss_rtt: Arc::new(Histogram::new()),
            service: Arc::new(Histogram::new()),
            listening: AtomicBool::new(false),
        }
    }

    /// A handle to stop [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: self.stop.clone(),
            current: self.current.clone(),
        }
    }

    /// Everything counted so far (connections that ended).
    pub fn stats(&self) -> Stats {
        *self.totals.lock()
    }

    /// Miss round trips of every connection (MISS sent to queue running again), recorded
    /// live; [`Histogram::reset`] it between measurements.
    pub fn miss_rtt(&self) -> &Histogram {
        &self.miss_rtt
    }

    /// How long the connection thread takes to serve a front-end message, every connection's:
    /// from the message read to its reply written (our share of a front-end's synchronous
    /// round trip; the rest is the front-end's and the wake-ups'). An acknowledgement held
    /// back to go with the next messages' (more were already readable) is counted in the
    /// message that sends them. Recorded live.
    pub fn service_time(&self) -> &Histogram {
        &self.service
    }

    /// Listen on `path` and serve front-ends one after another until shut down.
    pub fn serve(&self, path: &Path) -> Result<(), ServeError> {
        // A socket left by an earlier run is removed (connecting to it would fail anyway);
        // anything else at that path is left alone and binding fails.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        tracing::info!(socket = %path.display(), "vhost-user: listening");
        self.listening.store(true, Ordering::SeqCst);
        let result = self.accept_loop(&listener);
        self.listening.store(false, Ordering::SeqCst);
        let _ = std::fs::remove_file(path);
        result
    }

    /// Whether [`Server::serve`] is accepting connections (a front-end started in the same
    /// process waits for this rather than for the socket file).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    fn accept_loop(&self, listener: &UnixListener) -> Result<(), ServeError> {
        while !self.stop.load(Ordering::SeqCst) {
            // Poll so that a shutdown is noticed without a connection.
            let mut fds = [PollFd::new(listener, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            match poll(&mut fds, Some(&ts)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(ServeError::Accept(e.into())),
            }
            let (stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServeError::Accept(e)),
            };
            self.serve_connection(stream);
        }
        Ok(())
    }

    /// Serve one connected front-end until it goes away.
    pub fn serve_connection(&self, stream: UnixStream) {
        tracing::info!("vhost-user: front-end connected");
        if let Ok(s) = stream.try_clone() {
            *self.current.lock() = Some(s);
        }
        let mut session = Session::new(
            self.dev.clone(),
            stream,
            &self.config,
            self.miss_rtt.clone(),
            self.service.clone(),
        );
        let end = session.run(&self.stop);
        *self.current.lock() = None;
        let t = session.iotlb().stats();
        self.totals
            .lock()
            .add(&t, session.counters(), session.dirty_log());
        match end {
            SessionEnd::Disconnected => tracing::info!("vhost-user: front-end disconnected"),
            SessionEnd::Error(e) => tracing::warn!(error = %e, "vhost-user: connection failed"),
        }
    }
}

impl<D: Device> std::fmt::Debug for Server<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Give a just-started server time to bind (tests).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
