//! What can go wrong in a `kernel-net` run ([`KernelNetError`]): a call into the system, the
//! kernel device or another crate of ours that failed; the kernel answering otherwise than
//! a case expects (a write's return, a MISS count, a MISS's bytes, a frame); a wait that
//! ran out; and which case it was.
//!
//! One enum for the crate, so that a case, the device setup and the measurement compose
//! with `?`. Variants carry what was asked and what came back, not sentences: the sentence
//! is the `Display`, which is what the run prints after `case NAME FAILED:`. Nothing here
//! does I/O.

use std::fmt;
use std::time::Duration;

use frontend::kernel::KernelError;
use frontend::vhost_user::FrontendError;
use frontend::viommu::{ForwardError, ViommuError};
use iotlb::{Access, RangeError};
use rustix::io::Errno;

/// Why a `kernel-net` step, case or measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelNetError {
    /// A named case failed: the first failure ends the run.
    #[error("case {name} FAILED: {source}")]
    Case {
        /// The case's name, as in [`crate::cases::CASES`].
        name: &'static str,
        /// What went wrong in it.
        source: Box<KernelNetError>,
    },
    /// `--frames` out of range.
    #[error("--frames must be within 1..=1024 (got {0})")]
    Frames(u32),
    /// A device node is absent: its module is not loaded.
    #[error("{node} is missing: load the {module} module (modprobe {module})")]
    MissingNode {
        /// The node (`/dev/vhost-net`, `/dev/net/tun`).
        node: String,
        /// The module that provides it.
        module: &'static str,
    },
    /// The kernel device does not offer a feature the run needs.
    #[error(
        "{node} offers features {offered:#x}, without {missing:#x} (ACCESS_PLATFORM, \
         VERSION_1, MRG_RXBUF)"
    )]
    MissingFeatures {
        /// The device node.
        node: String,
        /// What it offered.
        offered: u64,
        /// What we want and it lacks.
        missing: u64,
    },
    /// A system call made through rustix failed.
    #[error("{op}: {source}")]
    Sys {
        /// The call and what it was for.
        op: String,
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// A system call made through libc or `std` failed.
    #[error("{op}: {source}")]
    Io {
        /// The call and what it was for.
        op: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The kernel vhost device refused a request of ours.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The vIOMMU refused a map, an unmap or a fault.
    #[error(transparent)]
    Viommu(#[from] ViommuError),
    /// A device IOTLB did not take an UPDATE or INVALIDATE written to it directly.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// An IOVA range that cannot be represented.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Reading or writing guest memory failed.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The guest RAM (a memfd mapping) could not be set up.
    #[error("guest RAM: {0}")]
    GuestRam(#[source] FrontendError),
    /// Our own vhost-user front-end could not connect to our back-end.
    #[error("connecting to our vhost-user back-end: {0}")]
    Connect(#[source] FrontendError),
    /// Our virtio-blk device (behind the vhost-user back-end) could not be built.
    #[error("virtio-blk back-end: {0}")]
    Blk(#[from] devices::BlkError),
    /// The measurement's JSON could not be produced.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A ring had too few free descriptors for the buffers posted.
    #[error("queue {queue}: no free descriptors for {wanted}")]
    NoDescriptors {
        /// The queue index.
        queue: u32,
        /// How many one-descriptor chains were posted.
        wanted: usize,
    },
    /// The kernel missed on IOVAs the vIOMMU has nothing mapped at.
    #[error("the kernel missed on unmapped IOVAs {0:#x?}")]
    UnmappedMiss(Vec<u64>),
    /// A fault the case made found nothing mapped to answer with.
    #[error("{device}: the fault at {iova:#x} found no mapping to answer with")]
    NoMapping {
        /// Which device IOTLB the fault was for.
        device: &'static str,
        /// The IOVA.
        iova: u64,
    },
    /// A queue's used index did not reach its avail index in time.
    #[error(
        "queue {queue} stalled: used {used} of {avail} after {waited:?} ({answered} MISSes \
         answered, last MISSes {last_misses:#x?})"
    )]
    Stalled {
        /// The queue index.
        queue: u32,
        /// Its used index.
        used: u16,
        /// Its avail index.
        avail: u16,
        /// How long we served MISSes and waited.
        waited: Duration,
        /// MISSes answered over the run.
        answered: u64,
        /// The last (up to four) MISSes read.
        last_misses: Vec<(u64, Access)>,
    },
    /// Something we wait for did not happen in time.
    #[error("no {what} after {waited:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// A `write()` of a raw message returned otherwise than the case expects.
    #[error("{what}: write returned {}, expected {}", show(got), show(expected))]
    WriteAnswer {
        /// The message written.
        what: String,
        /// What `write()` returned.
        got: Result<usize, Errno>,
        /// What it should have returned.
        expected: Result<usize, Errno>,
    },
    /// The kernel answered otherwise than the case expects (a read, a counter, an ioctl).
    #[error("{what}: {got}, expected {expected}")]
    Unexpected {
        /// What was asked or looked at.
        what: &'static str,
        /// What the case expects.
        expected: String,
        /// What came back.
        got: String,
    },
    /// A MISS count that shows the kernel's IOTLB did not hold, or did not drop, an entry.
    #[error("{on}: {got} MISSes, expected {expected} ({meaning})")]
    Misses {
        /// The page or pages the count is for, and after what.
        on: String,
        /// MISSes read.
        got: usize,
        /// What the case expects.
        expected: MissCount,
        /// What the wrong count means.
        meaning: &'static str,
    },
    /// The MISSes read lack one the case expects.
    #[error("expected {expected}; MISSes read: {log:#x?}")]
    MissLog {
        /// The MISS or MISSes expected.
        expected: String,
        /// The MISSes read.
        log: Vec<(u64, Access)>,
    },
    /// The MISS the kernel wrote is not the bytes the case expects.
    #[error("MISS bytes {got:02x?} (read {read}), expected {expected:02x?}")]
    MissBytes {
        /// What `read()` returned.
        read: usize,
        /// The bytes read (at most one message).
        got: Vec<u8>,
        /// The message expected.
        expected: Vec<u8>,
    },
    /// Fewer (or more) of our frames came out of the tap than were sent.
    #[error("sent {sent} frames, {received} came out of the tap")]
    TapCount {
        /// Frames sent.
        sent: usize,
        /// Our frames received on the tap.
        received: usize,
    },
    /// A frame that came out of the tap is not the one sent.
    #[error(
        "frame {index} differs: sent {sent_len} bytes (sequence {sent_seq:?}), got {got_len} \
         (sequence {got_seq:?}){}",
        if *poisoned { " of poison: the device read a page after its INVALIDATE" } else { "" }
    )]
    FrameDiffers {
        /// Its position among the frames sent.
        index: usize,
        /// Length of the frame sent.
        sent_len: usize,
        /// Its sequence number.
        sent_seq: Option<u32>,
        /// Length of the frame received.
        got_len: usize,
        /// Its sequence number, if any.
        got_seq: Option<u32>,
        /// Whether it carries poison.
        poisoned: bool,
    },
    /// The device completed a descriptor head the case never posted.
    #[error("queue {queue}: used id {id} is not one of ours")]
    ForeignUsed {
        /// The queue index.
        queue: u32,
        /// The head.
        id: u16,
    },
    /// Not all the frames injected on the tap reached the RX buffers.
    #[error(
        "{arrived} of {injected} injected frames arrived after {waited:?} (used index {used}, \
         {misses} MISSes)"
    )]
    RxLost {
        /// Our frames found in the used buffers.
        arrived: usize,
        /// Frames injected.
        injected: usize,
        /// How long we waited.
        waited: Duration,
        /// The RX used index at the last look.
        used: u16,
        /// MISSes read meanwhile.
        misses: usize,
    },
    /// The device wrote guest memory outside the buffers and the used ring.
    #[error("guest memory changed outside the RX buffers at {0:#x}")]
    StrayWrite(u64),
    /// A check whose failure is one sentence of its own.
    #[error("{0}")]
    Check(&'static str),
    /// A failure, with what the case was showing when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What the failure means for the case.
        context: &'static str,
        /// The failure.
        source: Box<KernelNetError>,
    },
}

impl KernelNetError {
    /// A rustix call failed: for `map_err(KernelNetError::sys("kick"))`.
    pub fn sys(op: impl Into<String>) -> impl FnOnce(Errno) -> Self {
        let op = op.into();
        move |source| KernelNetError::Sys { op, source }
    }

    /// A `std` call failed: for `map_err(KernelNetError::io("..."))`.
    pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let op = op.into();
        move |source| KernelNetError::Io { op, source }
    }

    /// A libc call just failed: its errno, read from the OS before anything else runs.
    pub fn last_os(op: impl Into<String>) -> Self {
        let source = std::io::Error::last_os_error();
        KernelNetError::Io {
            op: op.into(),
            source,
        }
    }

    /// This failure, with what it means for the case.
    pub fn context(self, context: &'static str) -> Self {
        KernelNetError::Context {
            context,
            source: Box::new(self),
        }
    }
}

/// How many MISSes a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissCount {
    /// None: the kernel's IOTLB holds the entry.
    None,
    /// At least this many: the entry was never there, or is gone.
    AtLeast(usize),
}

impl MissCount {
    /// Whether `got` MISSes are what was expected.
    pub fn admits(self, got: usize) -> bool {
        match self {
            MissCount::None => got == 0,
            MissCount::AtLeast(n) => got >= n,
        }
    }
}

impl fmt::Display for MissCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MissCount::None => f.write_str("none"),
            MissCount::AtLeast(n) => write!(f, "at least {n}"),
        }
    }
}

/// `got` MISSes on `on` are what `expected` says, or a [`KernelNetError::Misses`] that says
/// what the wrong count means.
pub fn expect_misses(
    on: impl Into<String>,
    got: usize,
    expected: MissCount,
    meaning: &'static str,
) -> Result<(), KernelNetError> {
    if expected.admits(got) {
        return Ok(());
    }
    Err(KernelNetError::Misses {
        on: on.into(),
        got,
        expected,
        meaning,
    })
}

/// A `write()` result as a person reads it: the byte count, or the errno.
fn show(r: &Result<usize, Errno>) -> String {
    match r {
        Ok(n) => n.to_string(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miss_counts() {
        assert!(MissCount::None.admits(0));
        assert!(!MissCount::None.admits(1));
        assert!(MissCount::AtLeast(2).admits(2));
        assert!(!MissCount::AtLeast(2).admits(1));
        let e = expect_misses(
            "a pushed page",
            1,
            MissCount::None,
            "the UPDATE did not hold",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a pushed page: 1 MISSes, expected none (the UPDATE did not hold)"
        );
    }

    #[test]
    fn case_failure_reads_as_before() {
        let e = KernelNetError::Case {
            name: "tx-cold",
            source: Box::new(KernelNetError::TapCount {
                sent: 3,
                received: 2,
            }),
        };
        assert_eq!(
            e.to_string(),
            "case tx-cold FAILED: sent 3 frames, 2 came out of the tap"
        );
    }

    #[test]
    fn write_answers_show_counts_and_errnos() {
        let e = KernelNetError::WriteAnswer {
            what: "a 40-byte UPDATE".into(),
            got: Ok(40),
            expected: Ok(72),
        };
        assert_eq!(
            e.to_string(),
            "a 40-byte UPDATE: write returned 40, expected 72"
        );
        let e = KernelNetError::WriteAnswer {
            what: "unknown IOTLB type".into(),
            got: Ok(72),
            expected: Err(Errno::FAULT),
        };
        assert!(e
            .to_string()
            .starts_with("unknown IOTLB type: write returned 72, expected "));
    }

    #[test]
    fn poison_is_named() {
        let e = KernelNetError::FrameDiffers {
            index: 0,
            sent_len: 300,
            sent_seq: Some(0xb),
            got_len: 300,
            got_seq: Some(0xdede_dede),
            poisoned: true,
        };
        assert!(e.to_string().ends_with("read a page after its INVALIDATE"));
    }
}
