//! [`BenchError`]: why `vhost-iotlb bench` failed, one variant per thing that can go wrong,
//! from the options through our back-end, the front-end session and the data check to the
//! files it writes.
//!
//! The messages are what the user reads after `vhost-iotlb: `, so each one carries its cause
//! inline (the binary prints only the top-level message); the cause is also the variant's
//! `source()`, for callers that walk the chain. This file only defines the type: it must
//! not decide when a run fails.

use std::path::{Path, PathBuf};

use backend::ServeError;
use devices::BlkError;
use frontend::driver::DriverError;
use frontend::vhost_user::FrontendError;

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option is out of its range.
    #[error("{option} must be {rule}")]
    BadOption {
        /// The option, as typed (`--depth`).
        option: &'static str,
        /// What it must be ("within 1..=20").
        rule: &'static str,
    },
    /// `--iotlb-capacity` is outside what the back-end and the cache accept.
    #[error("--iotlb-capacity must be within {min}..={max}")]
    IotlbCapacity {
        /// The back-end's minimum.
        min: usize,
        /// The cache's maximum.
        max: usize,
    },
    /// `--workloads` names a workload the table does not have.
    #[error("unknown workload {0:?}")]
    UnknownWorkload(String),
    /// The scratch directory for the sockets could not be created.
    #[error("{}: {source}", path.display())]
    ScratchDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The in-memory disk of our back-end could not be created.
    #[error("memfd_create: {0}")]
    Memfd(#[source] std::io::Error),
    /// The in-memory disk could not be given its size.
    #[error("disk of {bytes} bytes: {source}")]
    DiskSize {
        /// The size asked for.
        bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The virtio-blk device of our back-end refused its disk or configuration.
    #[error("our back-end's device: {0}")]
    Device(#[from] BlkError),
    /// `dpdk-testpmd` is not installed (`--peer dpdk`).
    #[error("dpdk-testpmd not found on PATH: install it with `apt-get install dpdk-dev` (./scripts/test.sh does)")]
    TestpmdMissing,
    /// `dpdk-testpmd` did not start listening.
    #[error("dpdk-testpmd did not start: {why} (its output: {})", log.display())]
    TestpmdStart {
        /// Its output.
        log: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// `dpdk-testpmd` stopped during the run.
    #[error("dpdk-testpmd stopped during the run (its output: {})", log.display())]
    TestpmdStopped {
        /// Its output.
        log: PathBuf,
    },
    /// A thread could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Spawn {
        /// The thread.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Our back-end's server failed: binding its socket, or accepting on it.
    #[error("our back-end: {0}")]
    Serve(#[from] ServeError),
    /// Our back-end's server thread ended before it listened, without saying why.
    #[error("our back-end stopped before listening on {}", socket.display())]
    BackendStopped {
        /// The socket it was to listen on.
        socket: PathBuf,
    },
    /// Our back-end did not listen within the start-up deadline.
    #[error("the back-end did not bind {}", socket.display())]
    BindTimeout {
        /// The socket it was to listen on.
        socket: PathBuf,
    },
    /// A thread of ours panicked.
    #[error("the {name} panicked")]
    Panicked {
        /// The thread ("back-end").
        name: &'static str,
    },
    /// The guest RAM of the front-end could not be set up.
    #[error("guest RAM: {0}")]
    GuestRam(#[source] FrontendError),
    /// The front-end could not connect to the back-end or set the session up (features,
    /// memory table, the vIOMMU's IOTLB channel).
    #[error("connecting to {}: {source}", socket.display())]
    Connect {
        /// The back-end's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: FrontendError,
    },
    /// GET_CONFIG failed, so the disk's capacity is unknown.
    #[error("cannot read the disk capacity (GET_CONFIG): {0}")]
    DiskCapacity(#[source] FrontendError),
    /// GET_CONFIG answered too few bytes for the capacity field.
    #[error("cannot read the disk capacity (GET_CONFIG): a reply of {len} bytes, not 8")]
    DiskCapacityReply {
        /// The bytes the back-end answered.
        len: usize,
    },
    /// The back-end's capacity (in 512-byte sectors) overflows a byte count.
    #[error("the back-end reports a disk of {sectors} sectors, over 2^64 bytes")]
    DiskTooLarge {
        /// The capacity it answered.
        sectors: u64,
    },
    /// The guest-driver simulator stopped: setting its queue up, a vIOMMU map or unmap, a
    /// stall.
    #[error("{workload}: {source}")]
    Driver {
        /// The workload it was running.
        workload: &'static str,
        /// Why.
        #[source]
        source: DriverError,
    },
    /// The progress bar's template does not parse (a bug here).
    #[error("progress bar: {0}")]
    Progress(#[from] indicatif::style::TemplateError),
    /// The guest-driver simulator read a wrong block, found a freed buffer written after
    /// its unmap, or saw a request fail, in these workloads.
    #[error("data check failed in: {}", workloads.join(", "))]
    DataCheck {
        /// The workloads that failed.
        workloads: Vec<&'static str>,
    },
    /// A workload with dirty logging found its log wrong: no page logged in a round (the
    /// device writes in every round, so an empty log is a bug, not a figure), or another
    /// count of pages taken than our back-end marked.
    #[error("{workload}: the dirty log is wrong: {why}")]
    DirtyLog {
        /// The workload.
        workload: &'static str,
        /// What was wrong.
        why: String,
    },
    /// The micro-benchmark has no row at the headline size (a bug here).
    #[error("no measurement at the headline size")]
    NoHeadline,
    /// The figures could not be encoded as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON or the SVG could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl BenchError {
    /// [`BenchError::Write`] of `path`, for `map_err`.
    pub(crate) fn writing(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
        move |source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before() {
        let e = BenchError::BadOption {
            option: "--rounds",
            rule: "within 1..=20",
        };
        assert_eq!(e.to_string(), "--rounds must be within 1..=20");
        let e = BenchError::DataCheck {
            workloads: vec!["warm", "strict"],
        };
        assert_eq!(e.to_string(), "data check failed in: warm, strict");
        let e = BenchError::Serve(ServeError::Bind {
            path: "/tmp/x.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        });
        assert!(e
            .to_string()
            .starts_with("our back-end: cannot listen on /tmp/x.sock: "));
        assert!(
            std::error::Error::source(&e).is_some(),
            "the server's error is the source"
        );
        let e = BenchError::writing(Path::new("/x/out.json"))(std::io::Error::from(
            std::io::ErrorKind::NotFound,
        ));
        assert!(e.to_string().starts_with("cannot write /x/out.json: "));
    }
}
