//! Dirty logging, as the queue engine sees it: a sink for the guest-physical bytes the
//! device wrote ([`DirtyLog`]), so that a live migration copies them again.
//!
//! The queue logs its own writes to the used ring through this (the used elements, the used
//! index, the flags and the avail event), by the guest-physical pieces the ring area was
//! translated to: never by the address the driver gave, which is an IOVA behind an IOMMU.
//! The device's writes into buffers are logged by whoever completes a chain, from the
//! chain's writable segments ([`crate::Chain::writable`]), which are guest-physical too.
//!
//! What a log does with the bytes (a bitmap shared with the front-end, a test model) is the
//! implementor's business; nothing here touches guest memory or blocks.

/// Where the device's writes to guest memory are recorded.
pub trait DirtyLog: Send + Sync + std::fmt::Debug {
    /// Whether writes are being logged now (when not, callers may skip the work of
    /// finding what to log).
    fn active(&self) -> bool;

    /// `len` bytes at guest-physical `gpa` were written. Called after the write, and for a
    /// buffer before the used index that hands it to the driver.
    fn log(&self, gpa: u64, len: u64);

    /// A deliberately wrong log for tests (the CLI's `--broken log-iova`): the used ring is
    /// logged at the address the driver gave for it (an IOVA behind an IOMMU), as Linux
    /// vhost once did. Never true in production.
    fn logs_iovas(&self) -> bool {
        false
    }
}
