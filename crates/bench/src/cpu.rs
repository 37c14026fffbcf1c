//! Where the bench's CPU time goes: the CPU time of this process's threads, split between
//! our back-end's (the server thread `backend` and the queue workers `vq*`) and the rest
//! (the guest-driver simulator, the front-end and its back-end channel thread), read from
//! `/proc/self/task/*/schedstat` (nanoseconds on a CPU); and the time the hypervisor took the
//! machine's CPUs away (`steal` in `/proc/stat`), which tells a slow round caused by the host
//! from one caused by us.
//!
//! It only reads counters: it must not start, stop or pin anything.

use std::time::Duration;

/// CPU time so far, split by side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuSample {
    /// Our back-end's threads.
    pub(crate) backend: Duration,
    /// Every other thread of the process.
    pub(crate) frontend: Duration,
    /// CPU time stolen from this machine by the hypervisor, all CPUs.
    pub(crate) steal: Duration,
}

impl CpuSample {
    /// Now. Threads that ended before now are not counted (the workloads' threads live for
    /// the whole measured phase).
    pub(crate) fn now() -> Self {
        let mut s = CpuSample {
            steal: steal().unwrap_or_default(),
            ..CpuSample::default()
        };
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return s;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let Some(ns) = task_ns(&dir) else {
                continue;
            };
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let t = Duration::from_nanos(ns);
            if is_backend_thread(comm.trim()) {
                s.backend += t;
            } else {
                s.frontend += t;
            }
        }
        s
    }

    /// What was used from `earlier` to `self`.
    pub(crate) fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            backend: self.backend.saturating_sub(earlier.backend),
            frontend: self.frontend.saturating_sub(earlier.frontend),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// CPU time of every thread of process `pid` so far (`/proc/PID/task/*/schedstat`), e.g. a
/// peer back-end the bench runs.
pub(crate) fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| task_ns(&t.path()))
        .map(Duration::from_nanos)
        .sum()
}

/// Nanoseconds on a CPU of the task at `dir` (`/proc/.../task/TID`): `schedstat`'s first
/// value.
fn task_ns(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Our back-end's threads, by name: the server thread the bench starts, and the queue
/// workers (`vq0`, `vq1`, ...).
fn is_backend_thread(name: &str) -> bool {
    name == "backend"
        || name
            .strip_prefix("vq")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Stolen time of all CPUs, from the `cpu` line of `/proc/stat` (its eighth value, in clock
/// ticks).
fn steal() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = parse_steal(&stat)?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000 / hz),
    ))
}

fn parse_steal(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

/// CPUs online (for a steal share).
pub(crate) fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_threads_are_the_server_and_the_workers() {
        for name in ["backend", "vq0", "vq17"] {
            assert!(is_backend_thread(name), "{name}");
        }
        for name in ["vq", "vqx", "vu-backend-chan", "main", "bench"] {
            assert!(!is_backend_thread(name), "{name}");
        }
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  100 2 30 4000 5 0 6 77 0 0\ncpu0 50 1 15 2000 2 0 3 40 0 0\n";
        assert_eq!(parse_steal(stat), Some(77));
        assert_eq!(parse_steal("intr 1 2 3\n"), None);
    }

    #[test]
    fn a_busy_thread_is_counted_on_its_side() {
        use rustix::time::{clock_gettime, ClockId};
        let before = CpuSample::now();
        let (spun, sampled) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let spin = std::thread::Builder::new()
            .name("vq9".into())
            .spawn(move || {
                // 30 ms of this thread's own CPU time, however long that takes.
                let cpu = || {
                    let t = clock_gettime(ClockId::ThreadCPUTime);
                    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
                };
                while cpu() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
                spun.0.send(()).unwrap();
                // Alive until sampled.
                let _ = sampled.1.recv();
            })
            .unwrap();
        spun.1.recv().unwrap();
        let used = CpuSample::now().since(&before);
        sampled.0.send(()).unwrap();
        spin.join().unwrap();
        assert!(
            used.backend >= Duration::from_millis(30),
            "30 ms of CPU on vq9 counted as {:?}",
            used.backend
        );
    }
}
