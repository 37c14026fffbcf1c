//! DPDK's vhost library as a peer: `dpdk-testpmd` with one vhost-user port
//! (`net_vhost0,iommu-support=1`) forwarding in `macswap` mode, the same job as our
//! loopback. [`Testpmd::start`] runs it on a socket in the scratch directory and waits for
//! the socket to appear; [`Testpmd::cpu`] reads the CPU time of all its threads (as
//! `cpu.rs` reads ours); dropping it stops it with SIGINT (testpmd then prints its port
//! totals, which [`Testpmd::stop`] returns).
//!
//! `VHOST_IOTLB_TESTPMD_EAL` adds EAL arguments (e.g. `--log-level=lib.vhost.*:debug`), and
//! `VHOST_IOTLB_BENCH_KEEP` keeps the scratch directory with its log, for a post-mortem.
//!
//! It only runs the program and reads its counters; it must not drive the socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// The program, looked up on `PATH`.
pub(crate) const PROGRAM: &str = "dpdk-testpmd";

/// A running testpmd with one vhost-user port.
#[derive(Debug)]
pub(crate) struct Testpmd {
    child: Option<Child>,
    /// Its vhost-user socket (it is the server).
    pub(crate) socket: PathBuf,
    log: PathBuf,
}

/// Port totals testpmd printed when it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortTotals {
    /// Frames it took from the guest's transmit ring.
    pub(crate) rx: u64,
    /// Frames it put on the guest's receive ring.
    pub(crate) tx: u64,
    /// Frames it could not put there (dropped).
    pub(crate) tx_dropped: u64,
}

impl Testpmd {
    /// Start testpmd in `dir` (its socket and log there). Fails with how to install it when
    /// the program is missing.
    pub(crate) fn start(dir: &Path) -> Result<Self, BenchError> {
        let socket = dir.join("testpmd.sock");
        let log = dir.join("testpmd.log");
        let out = std::fs::File::create(&log).map_err(BenchError::writing(&log))?;
        let err = out.try_clone().map_err(BenchError::writing(&log))?;
        let prefix = format!("vhost-iotlb-bench-{}", std::process::id());
        let child = Command::new(PROGRAM)
            .args([
                "--no-huge",
                "-m",
                "1024",
                "--no-pci",
                "--file-prefix",
                &prefix,
            ])
            .arg("--vdev")
            .arg(format!(
                "net_vhost0,iface={},iommu-support=1,queues=1",
                socket.display()
            ))
            // Without -i and with a stats period it runs until SIGINT and reads no stdin.
            .args([
                "--",
                "--total-num-mbufs=8192",
                "--forward-mode=macswap",
                "--auto-start",
                "--stats-period",
                "1000",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => BenchError::TestpmdMissing,
                _ => BenchError::TestpmdStart {
                    log: log.clone(),
                    why: source.to_string(),
                },
            })?;
        let mut t = Testpmd {
            child: Some(child),
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !t.socket.exists() {
            if let Some(child) = &mut t.child {
                if let Ok(Some(status)) = child.try_wait() {
                    t.child = None;
                    return Err(BenchError::TestpmdStart {
                        log: t.log.clone(),
                        why: format!("it exited ({status}) before listening"),
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::TestpmdStart {
                    log: t.log.clone(),
                    why: "no socket after 60 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }

    /// CPU time of all its threads so far (`/proc/PID/task/*/schedstat`).
    pub(crate) fn cpu(&self) -> Duration {
        self.child
            .as_ref()
            .map_or(Duration::ZERO, |c| crate::cpu::process_cpu(c.id()))
    }

    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Where its output goes.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Stop it (SIGINT, then SIGKILL after 10 s) and read the totals it printed.
    pub(crate) fn stop(mut self) -> Option<PortTotals> {
        self.halt();
        std::fs::read_to_string(&self.log)
            .ok()
            .and_then(|t| parse_totals(&t))
    }

    fn halt(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The last `RX-packets:` and `TX-packets: ... TX-dropped:` figures in testpmd's output (its
/// totals at exit).
pub(crate) fn parse_totals(text: &str) -> Option<PortTotals> {
    let field = |line: &str, key: &str| -> Option<u64> {
        let at = line.find(key)? + key.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let rx = text.lines().rev().find_map(|l| field(l, "RX-packets:"))?;
    let tx_line = text.lines().rev().find(|l| l.contains("TX-packets:"))?;
    Some(PortTotals {
        rx,
        tx: field(tx_line, "TX-packets:")?,
        tx_dropped: field(tx_line, "TX-dropped:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_the_last_ones_printed() {
        let text = "\
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 5              RX-dropped: 0             RX-total: 5
  TX-packets: 3              TX-dropped: 2             TX-total: 5
  ---------------------------------------------------------------------------
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 36             RX-dropped: 0             RX-total: 36
  TX-packets: 11             TX-dropped: 25            TX-total: 36
";
        assert_eq!(
            parse_totals(text),
            Some(PortTotals {
                rx: 36,
                tx: 11,
                tx_dropped: 25
            })
        );
        assert_eq!(parse_totals("EAL: nothing\n"), None);
    }
}
