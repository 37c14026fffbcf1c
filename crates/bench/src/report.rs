//! The end-to-end benchmark's figures: one [`Row`] per workload and round (`row`), the
//! median round and the paired ratios to the baseline (`summarize`), what a dirty log got
//! ([`LogFigures`], and when that shows a broken log), the table on stdout (`print_table`)
//! and the JSON document (`to_json`, with the back-end's counters by their stats-line
//! names, `stats_json_of`).
//!
//! Pure functions of what was measured: it must not start, connect to or drive anything,
//! and the JSON keys and the table text are a contract (scripts/test.sh checks the keys):
//! change them only on purpose.

use std::time::Duration;

use backend::Stats;
use serde_json::json;

use crate::run::{LogTaken, Measured};
use crate::workloads::{Workload, LOG_SYNC};
use crate::E2eArgs;

/// What one workload measured.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    /// The workload the ratio is against.
    pub(crate) baseline: &'static str,
    pub(crate) block_kib: u32,
    /// IOTLB entries (meaningful with the IOMMU only).
    pub(crate) capacity: usize,
    pub(crate) iommu: bool,
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) iops: f64,
    pub(crate) mbps: f64,
    pub(crate) lat_p50_us: f64,
    pub(crate) lat_p99_us: f64,
    pub(crate) misses_per_s: f64,
    pub(crate) miss_rtt_p50_us: Option<f64>,
    pub(crate) miss_rtt_p99_us: Option<f64>,
    pub(crate) hit_rate: Option<f64>,
    pub(crate) invalidations_per_s: f64,
    /// The median over rounds of this workload's IOPS over `off`'s in the same round.
    pub(crate) ratio_to_off: f64,
    /// Each round's ratio to `off` (same round), in order.
    pub(crate) ratio_rounds: Vec<f64>,
    /// The median round's IOPS over `off`'s median round's (rounds not paired).
    pub(crate) ratio_of_medians: f64,
    /// IOPS of every round, in order.
    pub(crate) iops_rounds: Vec<f64>,
    /// Front-end side: MISS received to UPDATE acknowledged.
    pub(crate) miss_service_p50_us: Option<f64>,
    pub(crate) misses: u64,
    /// MISSes received per request completed.
    pub(crate) misses_per_request: f64,
    pub(crate) verify_failures: u64,
    pub(crate) poison_violations: u64,
    pub(crate) poison_checks: u64,
    pub(crate) errors: u64,
    /// The back-end's counters of each round (ours only).
    pub(crate) engine: Vec<Stats>,
    /// CPU time per request of our back-end's threads, µs (ours only).
    pub(crate) cpu_backend_us: Option<f64>,
    /// CPU time per request of the rest (driver simulator, front-end, vIOMMU), µs.
    pub(crate) cpu_frontend_us: f64,
    /// Share of the machine's CPU time the hypervisor took during the round, %.
    pub(crate) steal_pct: f64,
    /// Every round, in order.
    pub(crate) rounds: Vec<Round>,
    /// With dirty logging: what the log got, over every round.
    pub(crate) dirty_log: Option<LogFigures>,
}

/// What the dirty log of a workload got, summed over its rounds (each round one connection,
/// its warm-up included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogFigures {
    /// Pages the front-end took from the log.
    pub(crate) taken: u64,
    /// Takes that found pages.
    pub(crate) syncs: u64,
    /// Pages our back-end marked while they were clear (`logged_pages`); `None` for a
    /// peer's back-end.
    pub(crate) marked: Option<u64>,
    pub(crate) rounds: u32,
    /// Rounds whose log got no page.
    pub(crate) empty_rounds: u32,
    /// Rounds in which the front-end took another count of pages than our back-end marked.
    pub(crate) mismatched_rounds: u32,
}

impl LogFigures {
    /// One round's: what the front-end took, and our back-end's counters if ours.
    pub(crate) fn of(taken: &LogTaken, stats: Option<&Stats>) -> Self {
        let marked = stats.map(|s| s.logged_pages);
        LogFigures {
            taken: taken.pages,
            syncs: taken.syncs,
            marked,
            rounds: 1,
            empty_rounds: u32::from(taken.pages == 0 || marked == Some(0)),
            mismatched_rounds: u32::from(marked.is_some_and(|m| m != taken.pages)),
        }
    }

    fn merge(self, o: LogFigures) -> Self {
        LogFigures {
            taken: self.taken + o.taken,
            syncs: self.syncs + o.syncs,
            marked: self.marked.zip(o.marked).map(|(a, b)| a + b),
            rounds: self.rounds + o.rounds,
            empty_rounds: self.empty_rounds + o.empty_rounds,
            mismatched_rounds: self.mismatched_rounds + o.mismatched_rounds,
        }
    }

    /// Why these figures show a broken log, if they do: a round that logged nothing (the
    /// device wrote in every round, so that is a bug, not a figure), or one whose front-end
    /// took another count of pages than our back-end marked (every page marked while clear
    /// is taken exactly once, so a difference is a page lost or invented).
    pub(crate) fn problem(&self) -> Option<String> {
        if self.empty_rounds > 0 {
            return Some(format!(
                "no page logged in {} of {} rounds",
                self.empty_rounds, self.rounds
            ));
        }
        if self.mismatched_rounds > 0 {
            return Some(format!(
                "the front-end took {} pages and the back-end marked {}, differing in {} of {} \
                 rounds",
                self.taken,
                self.marked.unwrap_or(0),
                self.mismatched_rounds,
                self.rounds
            ));
        }
        None
    }
}

/// What one round of a workload saw, kept to explain a slow one.
#[derive(Debug, Clone)]
pub(crate) struct Round {
    pub(crate) iops: f64,
    pub(crate) steal_pct: f64,
    /// Our back-end's counters for that round's connection.
    pub(crate) engine: Option<Stats>,
}

/// A round under this share of its workload's median IOPS is flagged as a stall.
pub(crate) const STALL_SHARE: f64 = 0.3;

impl Row {
    /// The lowest and highest IOPS over rounds.
    pub(crate) fn iops_spread(&self) -> (f64, f64) {
        let min = self
            .iops_rounds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = self.iops_rounds.iter().copied().fold(0.0, f64::max);
        (min.min(max), max)
    }

    /// The rounds (index from 0, and what they saw) under [`STALL_SHARE`] of the median.
    pub(crate) fn stalls(&self) -> Vec<(usize, &Round)> {
        self.rounds
            .iter()
            .enumerate()
            .filter(|(_, r)| r.iops < STALL_SHARE * self.iops)
            .collect()
    }
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Every workload's median round, with its ratios to its baseline: `samples[i]` holds
/// workload `i`'s rounds, in order.
pub(crate) fn summarize(samples: Vec<Vec<Row>>) -> Vec<Row> {
    let mut rows: Vec<Row> = samples.into_iter().filter_map(median_round).collect();
    let baselines: Vec<(&'static str, f64, Vec<f64>)> = rows
        .iter()
        .map(|r| (r.name, r.iops, r.iops_rounds.clone()))
        .collect();
    for r in &mut rows {
        if let Some((_, off_iops, off_rounds)) = baselines.iter().find(|b| b.0 == r.baseline) {
            r.ratio_rounds = paired_ratios(&r.iops_rounds, off_rounds);
            r.ratio_to_off = median(&r.ratio_rounds).unwrap_or(r.iops / off_iops);
            r.ratio_of_medians = r.iops / off_iops;
        }
    }
    rows
}

/// Each round's IOPS over `off`'s in the same round (the two ran within seconds of each
/// other, so a machine that is slower for a while slows both).
pub(crate) fn paired_ratios(rounds: &[f64], off: &[f64]) -> Vec<f64> {
    rounds
        .iter()
        .zip(off)
        .filter(|(_, o)| **o > 0.0)
        .map(|(r, o)| r / o)
        .collect()
}

/// The median (the upper one of an even count); `None` when empty.
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The round with the median IOPS, carrying every round's IOPS and the data-check counts
/// of all rounds (a failure in any round is a failure).
pub(crate) fn median_round(mut rounds: Vec<Row>) -> Option<Row> {
    let iops_rounds: Vec<f64> = rounds.iter().map(|r| r.iops).collect();
    let engine: Vec<Stats> = rounds.iter().flat_map(|r| r.engine.clone()).collect();
    let all: Vec<Round> = rounds.iter().flat_map(|r| r.rounds.clone()).collect();
    let log = rounds
        .iter()
        .filter_map(|r| r.dirty_log)
        .reduce(LogFigures::merge);
    let (checks, verify, poison, errors) = rounds.iter().fold((0, 0, 0, 0), |a, r| {
        (
            a.0 + r.poison_checks,
            a.1 + r.verify_failures,
            a.2 + r.poison_violations,
            a.3 + r.errors,
        )
    });
    rounds.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = rounds.len() / 2;
    let mut r = rounds.into_iter().nth(mid)?;
    r.iops_rounds = iops_rounds;
    r.engine = engine;
    r.rounds = all;
    r.dirty_log = log;
    r.poison_checks = checks;
    r.verify_failures = verify;
    r.poison_violations = poison;
    r.errors = errors;
    Some(r)
}

pub(crate) fn row(
    w: &Workload,
    m: &Measured,
    stats: Option<&Stats>,
    rtt: Option<(f64, f64)>,
    args: &E2eArgs,
) -> Row {
    let r = &m.report;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let iops = r.requests as f64 / secs;
    let bytes = f64::from(w.block_kib(args)) * 1024.0;
    let misses = m.misses;
    let (rtt50, rtt99) = (rtt.map(|r| r.0), rtt.map(|r| r.1));
    let per_request = |d: Duration| us(d) / r.requests.max(1) as f64;
    let steal_pct = 100.0 * m.cpu.steal.as_secs_f64() / (secs * f64::from(crate::cpu::cpus()));
    Row {
        name: w.name,
        baseline: w.baseline,
        block_kib: w.block_kib(args),
        capacity: w.capacity(args),
        iommu: w.viommu.is_some(),
        requests: r.requests,
        seconds: secs,
        iops,
        mbps: iops * bytes / 1e6,
        lat_p50_us: us(r.latency.quantile(0.5)),
        lat_p99_us: us(r.latency.quantile(0.99)),
        misses_per_s: misses as f64 / secs,
        miss_rtt_p50_us: rtt50,
        miss_rtt_p99_us: rtt99,
        hit_rate: stats.and_then(|s| {
            let total = s.hits + s.misses;
            (w.viommu.is_some() && total > 0).then(|| s.hits as f64 / total as f64)
        }),
        invalidations_per_s: m.invalidations as f64 / secs,
        ratio_to_off: 1.0, // set once `off` is known
        ratio_rounds: Vec::new(),
        ratio_of_medians: 1.0,
        iops_rounds: vec![iops],
        miss_service_p50_us: m.service_p50,
        misses,
        misses_per_request: misses as f64 / (r.requests.max(1)) as f64,
        verify_failures: r.verify_failures,
        poison_violations: r.poison_violations,
        poison_checks: r.poison_checks,
        errors: r.errors + r.bad_completions,
        engine: stats.copied().into_iter().collect(),
        cpu_backend_us: stats.map(|_| per_request(m.cpu.backend)),
        cpu_frontend_us: per_request(m.cpu.frontend),
        steal_pct,
        rounds: vec![Round {
            iops,
            steal_pct,
            engine: stats.copied(),
        }],
        dirty_log: m.log.map(|t| LogFigures::of(&t, stats)),
    }
}

pub(crate) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

pub(crate) fn print_table(args: &E2eArgs, rows: &[Row]) {
    println!(
        "vhost-iotlb end-to-end: virtio-blk, {} KiB random I/O (1 MiB for off-1m, big, \
         small-tlb), {}% writes, depth {}, {} s per workload in {} interleaved rounds (median \
         round shown), IOTLB {} entries (small-tlb: 16){}",
        args.block_kib,
        args.write_percent,
        args.depth,
        args.duration,
        args.rounds,
        args.iotlb_capacity,
        args.socket
            .as_ref()
            .map_or(String::new(), |s| format!(", back-end at {}", s.display()))
    );
    println!(
        "{:<10} {:>5} {:>5} {:>9} {:>11} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>7} {:>9} {:>7} {:>11}",
        "workload",
        "KiB",
        "tlb",
        "IOPS",
        "min-max",
        "MB/s",
        "p50 us",
        "p99 us",
        "misses/s",
        "miss/req",
        "rtt50 us",
        "rtt99 us",
        "hit",
        "inval/s",
        "vs base",
        "cpu us/req"
    );
    for r in rows {
        let tlb = if r.iommu {
            r.capacity.to_string()
        } else {
            "-".into()
        };
        let (lo, hi) = r.iops_spread();
        let cpu = format!("{}/{:.1}", fmt_opt(r.cpu_backend_us, 1), r.cpu_frontend_us);
        println!(
            "{:<10} {:>5} {:>5} {:>9.0} {:>11} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>8.1} {:>9} {:>9} {:>7} {:>9.0} {:>6.0}% {:>11}",
            r.name,
            r.block_kib,
            tlb,
            r.iops,
            format!("{}-{}", kilo(lo), kilo(hi)),
            r.mbps,
            r.lat_p50_us,
            r.lat_p99_us,
            r.misses_per_s,
            r.misses_per_request,
            fmt_opt(r.miss_rtt_p50_us, 1),
            fmt_opt(r.miss_rtt_p99_us, 1),
            fmt_opt(r.hit_rate.map(|h| h * 100.0), 1),
            r.invalidations_per_s,
            r.ratio_to_off * 100.0,
            cpu
        );
    }
    println!(
        "tlb: IOTLB entries. min-max: IOPS of the slowest and fastest round. miss/req: MISSes \
         per request. rtt: MISS sent to the queue running again (back-end side). hit: IOTLB hit rate (%). vs base: median over rounds of IOPS / \
         the IOPS of the workload's baseline in the same round: the same request size with no \
         IOMMU (off, or off-1m for 1 MiB requests), and warm for log (warm with dirty \
         logging). Every read was checked against what was written; freed buffers were \
         poisoned and checked ({} checks, {} violations).",
        rows.iter().map(|r| r.poison_checks).sum::<u64>(),
        rows.iter().map(|r| r.poison_violations).sum::<u64>()
    );
    println!(
        "cpu us/req: CPU time per request of our back-end's threads / of the driver simulator, \
         front-end and vIOMMU (one process; both sides' threads counted separately)."
    );
    print_dirty_logs(rows);
    print_stalls(rows);
}

/// What the dirty log of each workload that has one got.
fn print_dirty_logs(rows: &[Row]) {
    for r in rows {
        let Some(l) = &r.dirty_log else {
            continue;
        };
        let marked = l.marked.map_or_else(
            || "back-end counters not available (a peer's back-end)".to_string(),
            |m| format!("our back-end marked {m}"),
        );
        println!(
            "dirty log ({}): VHOST_F_LOG_ALL on, one bit per 4 KiB guest page in a memfd \
             shared by SET_LOG_BASE, its pages taken every {} ms as a migration's sync does: \
             {} pages taken in {} takes over {} rounds (warm-ups included); {marked}{}.",
            r.name,
            LOG_SYNC.as_millis(),
            l.taken,
            l.syncs,
            l.rounds,
            l.problem()
                .map_or(String::new(), |p| format!("; WRONG: {p}"))
        );
    }
}

/// The rounds under [`STALL_SHARE`] of their workload's median, with what the machine and
/// our back-end were doing in them.
fn print_stalls(rows: &[Row]) {
    let stalls: Vec<(&Row, usize, &Round)> = rows
        .iter()
        .flat_map(|r| r.stalls().into_iter().map(move |(i, round)| (r, i, round)))
        .collect();
    if stalls.is_empty() {
        println!(
            "stalls: none (no round under {:.0}% of its workload's median).",
            STALL_SHARE * 100.0
        );
        return;
    }
    println!(
        "stalls: {} round(s) under {:.0}% of their workload's median:",
        stalls.len(),
        STALL_SHARE * 100.0
    );
    for (r, i, round) in stalls {
        let engine = round.engine.as_ref().map_or_else(
            || "back-end counters not available (a peer's back-end)".to_string(),
            |e| {
                format!(
                    "back-end: {} MISSes sent, {} resent, {} timed out; {} quiescence waits over \
                     1 ms (longest {} us); {} broken queues",
                    e.misses_sent,
                    e.resends,
                    e.timeouts,
                    e.slow_quiesces,
                    e.quiesce_max_us,
                    e.broken_queues
                )
            },
        );
        println!(
            "  STALL {} round {}: {:.0} IOPS ({:.0}% of the median {:.0}); CPU stolen by the \
             hypervisor: {:.1}% of the machine; {engine}",
            r.name,
            i + 1,
            round.iops,
            100.0 * round.iops / r.iops.max(1e-9),
            r.iops,
            round.steal_pct
        );
    }
}

/// `v` in thousands above 10 000 ("95k"), as it is below.
pub(crate) fn kilo(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

pub(crate) fn to_json(rows: &[Row]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for r in rows {
        m.insert(
            r.name.to_string(),
            json!({
                "requests": r.requests,
                "seconds": r.seconds,
                "iops": r.iops,
                "mb_per_s": r.mbps,
                "latency_us": {"p50": r.lat_p50_us, "p99": r.lat_p99_us},
                "misses": r.misses,
                "misses_per_s": r.misses_per_s,
                "misses_per_request": r.misses_per_request,
                "block_kib": r.block_kib,
                "iotlb_capacity": r.iommu.then_some(r.capacity),
                "baseline": r.baseline,
                "miss_rtt_us": {"p50": r.miss_rtt_p50_us, "p99": r.miss_rtt_p99_us},
                "miss_service_us_p50": r.miss_service_p50_us,
                "hit_rate": r.hit_rate,
                "invalidations_per_s": r.invalidations_per_s,
                "ratio_to_off": r.ratio_to_off,
                "ratio_rounds": r.ratio_rounds,
                "ratio_of_medians": r.ratio_of_medians,
                "iops_rounds": r.iops_rounds,
                "verify_failures": r.verify_failures,
                "poison_checks": r.poison_checks,
                "poison_violations": r.poison_violations,
                "errors": r.errors,
                "backend": backend_json(&r.engine),
                "iops_min": r.iops_spread().0,
                "iops_max": r.iops_spread().1,
                "cpu_us_per_request": {"backend": r.cpu_backend_us, "frontend": r.cpu_frontend_us},
                "steal_pct": r.steal_pct,
                "dirty_log": r.dirty_log.map(|l| json!({
                    "pages_taken": l.taken,
                    "takes": l.syncs,
                    "pages_marked": l.marked,
                    "take_every_ms": LOG_SYNC.as_millis() as u64,
                    "rounds": l.rounds,
                    "empty_rounds": l.empty_rounds,
                    "mismatched_rounds": l.mismatched_rounds,
                })),
                "stalled_rounds": r.stalls().iter().map(|(i, round)| json!({
                    "round": i + 1,
                    "iops": round.iops,
                    "steal_pct": round.steal_pct,
                    "backend": round.engine.as_ref().map(|e| stats_json_of(&e.fields())),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    serde_json::Value::Object(m)
}

/// The back-end's counters summed over rounds (the largest request: the largest of any),
/// by their stats-line names; `null` for a peer's back-end.
pub(crate) fn backend_json(rounds: &[Stats]) -> serde_json::Value {
    if rounds.is_empty() {
        return serde_json::Value::Null;
    }
    let mut total: Vec<(&'static str, u64)> = rounds[0].fields().iter().map(|f| (f.0, 0)).collect();
    for s in rounds {
        for (t, (name, v)) in total.iter_mut().zip(s.fields()) {
            t.1 = if name == "largest_request" {
                t.1.max(v)
            } else {
                t.1 + v
            };
        }
    }
    stats_json_of(&total)
}

/// Named counters (the stats line's, `backend::Stats::fields`) as a JSON object.
pub fn stats_json_of(fields: &[(&'static str, u64)]) -> serde_json::Value {
    let fields = fields
        .iter()
        .map(|&(name, value)| (name.to_string(), serde_json::Value::from(value)));
    serde_json::Value::Object(fields.collect())
}

/// A row of `name` at `iops` against `baseline`, every other figure neutral: the
/// fixture of this crate's tests (report and plot), which set what they look at.
#[cfg(test)]
pub(crate) fn neutral_row(name: &'static str, baseline: &'static str, iops: f64) -> Row {
    Row {
        name,
        baseline,
        block_kib: 4,
        capacity: 2048,
        iommu: name != "off",
        requests: 1,
        seconds: 1.0,
        iops,
        mbps: 0.0,
        lat_p50_us: 0.0,
        lat_p99_us: 0.0,
        misses_per_s: 0.0,
        miss_rtt_p50_us: None,
        miss_rtt_p99_us: None,
        hit_rate: None,
        invalidations_per_s: 0.0,
        ratio_to_off: 1.0,
        ratio_rounds: Vec::new(),
        ratio_of_medians: 1.0,
        iops_rounds: vec![iops],
        miss_service_p50_us: None,
        misses: 0,
        misses_per_request: 0.0,
        verify_failures: 0,
        poison_violations: 0,
        poison_checks: 0,
        errors: 0,
        engine: Vec::new(),
        cpu_backend_us: None,
        cpu_frontend_us: 0.0,
        steal_pct: 0.0,
        rounds: Vec::new(),
        dirty_log: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_paired_by_round() {
        // The machine halves its speed in rounds 2 and 3: paired ratios do not see it.
        let off = [100.0, 50.0, 50.0, 100.0, 100.0];
        let warm = [96.0, 48.0, 48.0, 96.0, 96.0];
        let r = paired_ratios(&warm, &off);
        assert_eq!(r.len(), 5);
        assert!(r.iter().all(|x| (x - 0.96).abs() < 1e-9));
        assert_eq!(median(&r), Some(r[0]));
        // A zero `off` round is left out, and nothing gives no median.
        assert_eq!(paired_ratios(&[1.0, 2.0], &[0.0, 4.0]), vec![0.5]);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }

    /// A round of `name` at `iops`, measured against `baseline`; the rest neutral.
    fn round(name: &'static str, baseline: &'static str, iops: f64) -> Row {
        neutral_row(name, baseline, iops)
    }

    #[test]
    fn a_ratio_is_against_the_workloads_own_baseline() {
        let rounds = |name, baseline, iops: &[f64]| -> Vec<Row> {
            iops.iter().map(|&i| round(name, baseline, i)).collect()
        };
        let rows = summarize(vec![
            rounds("off", "off", &[200.0, 100.0, 200.0]),
            rounds("warm", "off", &[100.0, 50.0, 100.0]),
            rounds("log", "warm", &[90.0, 45.0, 90.0]),
        ]);
        let by = |n: &str| rows.iter().find(|r| r.name == n).unwrap();
        assert!(by("warm")
            .ratio_rounds
            .iter()
            .all(|r| (r - 0.5).abs() < 1e-9));
        assert!((by("warm").ratio_to_off - 0.5).abs() < 1e-9);
        // Against warm, round by round, not against off.
        assert!(by("log")
            .ratio_rounds
            .iter()
            .all(|r| (r - 0.9).abs() < 1e-9));
        assert!((by("log").ratio_to_off - 0.9).abs() < 1e-9);
        assert!((by("log").ratio_of_medians - 0.9).abs() < 1e-9);
        assert_eq!(to_json(&rows)["log"]["baseline"], "warm");
        assert!(to_json(&rows)["warm"]["dirty_log"].is_null());
    }

    #[test]
    fn a_log_is_wrong_when_a_round_logs_nothing_or_loses_a_page() {
        let stats = |pages| Stats {
            logged_pages: pages,
            ..Stats::default()
        };
        let taken = |pages| LogTaken { pages, syncs: 3 };
        let good = LogFigures::of(&taken(40), Some(&stats(40)));
        assert_eq!(good.problem(), None);
        // A peer's back-end: only the front-end's count.
        assert_eq!(LogFigures::of(&taken(40), None).problem(), None);
        let empty = LogFigures::of(&taken(0), Some(&stats(0)));
        let lost = LogFigures::of(&taken(39), Some(&stats(40)));
        let of_rounds = |r: &[LogFigures]| {
            let mut rows: Vec<Row> = r
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let mut row = round("log", "warm", 100.0 + i as f64);
                    row.dirty_log = Some(*l);
                    row
                })
                .collect();
            rows.push(round("log", "warm", 0.0));
            rows.last_mut().unwrap().dirty_log = None;
            median_round(rows).unwrap().dirty_log.unwrap()
        };
        let all = of_rounds(&[good, good, good]);
        assert_eq!((all.taken, all.marked, all.syncs), (120, Some(120), 9));
        assert_eq!(all.rounds, 3);
        assert_eq!(all.problem(), None);
        let one_empty = of_rounds(&[good, empty, good]);
        assert_eq!(
            one_empty.problem().as_deref(),
            Some("no page logged in 1 of 3 rounds")
        );
        let one_lost = of_rounds(&[good, lost, good]);
        assert!(
            one_lost.problem().unwrap().contains("differing in 1 of 3"),
            "{one_lost:?}"
        );
        let json = to_json(&[{
            let mut r = round("log", "warm", 1.0);
            r.dirty_log = Some(good);
            r
        }]);
        assert_eq!(json["log"]["dirty_log"]["pages_taken"], 40);
        assert_eq!(json["log"]["dirty_log"]["pages_marked"], 40);
    }
}
