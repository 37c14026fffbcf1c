//! What the liveness tests share (`full_ring_liveness.rs` and `flush_liveness.rs`, which
//! include this file with `#[path]`): the bound a control request must meet, the deadline
//! after which a blocking call counts as hung, and how a measured latency is printed. Nothing
//! here waits or asserts; each test file keeps its own set-up and helpers.

use std::time::Duration;

/// The liveness bound of every control request (and of a disconnect).
pub const BOUND: Duration = Duration::from_secs(1);
/// How long a blocking call is waited for before the test calls it hung.
pub const HUNG: Duration = Duration::from_secs(10);

/// `what` and how long it took (`None`: it did not return within [`HUNG`]), as text.
pub fn show(what: &str, d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{what}: {:.3} ms", d.as_secs_f64() * 1e3),
        None => format!("{what}: did not return within 10 s"),
    }
}
