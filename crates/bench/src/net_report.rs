//! The net benchmark's figures: one [`NetRow`] per workload, peer and round (`row`), the
//! median round with the paired ratios (to `off` of the same peer, and ours over DPDK's in
//! the same round: `summarize`), the table (`print_table`), the JSON (`to_json`) and the
//! chart's panels (`panels`, drawn by `plot.rs`).
//!
//! Pure functions of what was measured: it must not start, connect to or drive anything.
//! The JSON keys and the table's text are a contract: change them only on purpose.

use serde_json::json;

use crate::net::{NetMeasured, NetWorkload, Peer};
use crate::plot::{Bar, Panel, Series};
use crate::report::{fmt_opt, kilo, median, paired_ratios, us};
use crate::testpmd::PortTotals;
use crate::E2eArgs;

/// What one workload measured against one peer.
#[derive(Debug, Clone)]
pub(crate) struct NetRow {
    pub(crate) name: &'static str,
    pub(crate) peer: Peer,
    pub(crate) iommu: bool,
    pub(crate) seconds: f64,
    pub(crate) sent: u64,
    /// Frames back right.
    pub(crate) returned: u64,
    /// Frames back per second (each crossed the device twice).
    pub(crate) pps: f64,
    pub(crate) mbps: f64,
    pub(crate) lat_p50_us: f64,
    pub(crate) lat_p99_us: f64,
    pub(crate) misses_per_s: f64,
    /// MISS received to the buffer's used entry, seen by the driver (any peer).
    pub(crate) miss_rtt_p50_us: Option<f64>,
    pub(crate) miss_rtt_p99_us: Option<f64>,
    /// MISS sent to queue running again, measured inside our back-end (ours only).
    pub(crate) backend_rtt_p50_us: Option<f64>,
    pub(crate) invalidations_per_s: f64,
    /// MISSes for IOVAs no longer mapped (unanswered).
    pub(crate) unmapped_misses: u64,
    /// Frames lost for good, and of those counted lost, the ones that turned up later.
    pub(crate) lost: u64,
    pub(crate) late: u64,
    pub(crate) corrupt: u64,
    pub(crate) poison_violations: u64,
    pub(crate) poison_checks: u64,
    pub(crate) bad_completions: u64,
    /// CPU seconds per million frames back: the device side, the driver side.
    pub(crate) device_cpu_s_per_m: f64,
    pub(crate) driver_cpu_s_per_m: f64,
    /// Share of the machine's CPU time the hypervisor took.
    pub(crate) steal_share: f64,
    /// pps of every round, in order.
    pub(crate) pps_rounds: Vec<f64>,
    /// Device CPU per million frames of every round.
    pub(crate) cpu_rounds: Vec<f64>,
    /// Median over rounds of pps / `off`'s pps (same peer, same round).
    pub(crate) ratio_to_off: f64,
    pub(crate) ratio_rounds: Vec<f64>,
    /// Ours only: median over rounds of our pps / DPDK's, and of our device CPU per frame /
    /// DPDK's (same workload, same round).
    pub(crate) vs_dpdk: Option<f64>,
    pub(crate) cpu_vs_dpdk: Option<f64>,
}

impl NetRow {
    /// Ours got something wrong: a frame changed or lost, a poison broken. (What a peer gets
    /// wrong is a finding about it, reported, not a failure of the run.)
    pub(crate) fn failed(&self) -> bool {
        self.peer == Peer::Ours
            && self.corrupt + self.poison_violations + self.bad_completions + self.lost > 0
    }

    fn spread(&self) -> (f64, f64) {
        let lo = self.pps_rounds.iter().copied().fold(self.pps, f64::min);
        let hi = self.pps_rounds.iter().copied().fold(self.pps, f64::max);
        (lo, hi)
    }
}

/// One round's row.
pub(crate) fn row(
    w: &NetWorkload,
    peer: Peer,
    m: &NetMeasured,
    backend_rtt: Option<(f64, f64)>,
) -> NetRow {
    let r = &m.report;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let good = r.latency.count() + r.late;
    let per_m = |d: std::time::Duration| d.as_secs_f64() / (good.max(1) as f64 / 1e6);
    let cpus = f64::from(crate::cpu::cpus());
    let q = |p| (r.miss_rtt.count() > 0).then(|| us(r.miss_rtt.quantile(p)));
    NetRow {
        name: w.name,
        peer,
        iommu: w.viommu.is_some(),
        seconds: secs,
        sent: r.sent,
        returned: good,
        pps: good as f64 / secs,
        mbps: r.bytes as f64 * 8.0 / secs / 1e6,
        lat_p50_us: us(r.latency.quantile(0.5)),
        lat_p99_us: us(r.latency.quantile(0.99)),
        misses_per_s: m.misses as f64 / secs,
        miss_rtt_p50_us: q(0.5),
        miss_rtt_p99_us: q(0.99),
        backend_rtt_p50_us: backend_rtt.map(|(p50, _)| p50),
        invalidations_per_s: m.invalidations as f64 / secs,
        unmapped_misses: m.unmapped,
        lost: r.missing(),
        late: r.late,
        corrupt: r.corrupt,
        poison_violations: r.poison_violations,
        poison_checks: r.poison_checks,
        bad_completions: r.bad_completions,
        device_cpu_s_per_m: per_m(m.device_cpu),
        driver_cpu_s_per_m: per_m(m.driver_cpu),
        steal_share: m.steal.as_secs_f64() / (secs * cpus),
        pps_rounds: Vec::new(),
        cpu_rounds: Vec::new(),
        ratio_to_off: 1.0,
        ratio_rounds: Vec::new(),
        vs_dpdk: None,
        cpu_vs_dpdk: None,
    }
}

/// The round with the median pps of each workload and peer (`samples` in table order),
/// with every round's pps, the counts of all rounds, and the paired ratios.
pub(crate) fn summarize(samples: Vec<Vec<NetRow>>) -> Vec<NetRow> {
    let mut rows: Vec<NetRow> = samples
        .into_iter()
        .filter_map(|mut rounds| {
            let pps: Vec<f64> = rounds.iter().map(|r| r.pps).collect();
            let cpu: Vec<f64> = rounds.iter().map(|r| r.device_cpu_s_per_m).collect();
            let sum = |f: fn(&NetRow) -> u64, rounds: &[NetRow]| rounds.iter().map(f).sum::<u64>();
            let unmapped = sum(|r| r.unmapped_misses, &rounds);
            let counts = (
                sum(|r| r.lost, &rounds),
                sum(|r| r.late, &rounds),
                sum(|r| r.corrupt, &rounds),
                sum(|r| r.poison_violations, &rounds),
                sum(|r| r.poison_checks, &rounds),
                sum(|r| r.bad_completions, &rounds),
            );
            rounds.sort_by(|a, b| a.pps.total_cmp(&b.pps));
            let mid = rounds.len() / 2;
            let mut r = rounds.into_iter().nth(mid)?;
            (
                r.lost,
                r.late,
                r.corrupt,
                r.poison_violations,
                r.poison_checks,
                r.bad_completions,
            ) = counts;
            r.unmapped_misses = unmapped;
            r.pps_rounds = pps;
            r.cpu_rounds = cpu;
            Some(r)
        })
        .collect();
    let find = |rows: &[NetRow], name: &str, peer: Peer| {
        rows.iter()
            .find(|r| r.name == name && r.peer == peer)
            .map(|r| (r.pps_rounds.clone(), r.cpu_rounds.clone()))
    };
    let snapshot = rows.clone();
    for r in &mut rows {
        if let Some((off, _)) = find(&snapshot, "off", r.peer) {
            r.ratio_rounds = paired_ratios(&r.pps_rounds, &off);
            r.ratio_to_off = median(&r.ratio_rounds).unwrap_or(1.0);
        }
        if r.peer == Peer::Ours {
            if let Some((pps, cpu)) = find(&snapshot, r.name, Peer::Dpdk) {
                r.vs_dpdk = median(&paired_ratios(&r.pps_rounds, &pps));
                r.cpu_vs_dpdk = median(&paired_ratios(&r.cpu_rounds, &cpu));
            }
        }
    }
    rows
}

pub(crate) fn print_table(args: &E2eArgs, rows: &[NetRow], totals: Option<PortTotals>) {
    println!(
        "vhost-iotlb end-to-end: virtio-net, {}-byte frames, {} out at once, {} s per workload \
         and peer in {} interleaved rounds (median round shown), our IOTLB {} entries \
         (DPDK 22.11's holds 2048)",
        args.frame_bytes, args.depth, args.duration, args.rounds, args.iotlb_capacity
    );
    println!(
        "{:<8} {:<5} {:>8} {:>11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7} {:>7} {:>13} {:>11}",
        "workload",
        "peer",
        "kpps",
        "min-max",
        "Mb/s",
        "p50 us",
        "p99 us",
        "misses/s",
        "rtt50 us",
        "lost",
        "vs off",
        "vs dpdk",
        "cpu s/Mpkt",
        "cpu vs dpdk"
    );
    for r in rows {
        let (lo, hi) = r.spread();
        println!(
            "{:<8} {:<5} {:>8.1} {:>11} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>9} {:>9} {:>6.0}% {:>7} {:>13} {:>11}",
            r.name,
            r.peer.name(),
            r.pps / 1e3,
            format!("{}-{}", kilo(lo), kilo(hi)),
            r.mbps,
            r.lat_p50_us,
            r.lat_p99_us,
            r.misses_per_s,
            fmt_opt(r.miss_rtt_p50_us, 1),
            r.lost,
            r.ratio_to_off * 100.0,
            r.vs_dpdk.map_or("-".into(), |v| format!("{:.2}x", v)),
            format!("{:.2}/{:.2}", r.device_cpu_s_per_m, r.driver_cpu_s_per_m),
            r.cpu_vs_dpdk.map_or("-".into(), |v| format!("{:.2}x", v)),
        );
    }
    println!(
        "kpps: thousands of frames back per second (each crossed the device twice: its \
         transmit and its receive queue). min-max: the slowest and fastest round. rtt50: p50 of \
         MISS received by the front-end to the used entry of the buffer it was about, seen by \
         the driver (the same for both peers). lost: frames sent that never came back, all \
         rounds. vs off: median over rounds of pps / the same peer's off in the same round. vs \
         dpdk: ours / DPDK's pps, median of same-round pairs. cpu s/Mpkt: CPU seconds per \
         million frames of the device side (our back-end's threads; testpmd's process) / of \
         the driver simulator, front-end and vIOMMU. cpu vs dpdk: our device CPU per frame / \
         DPDK's (below 1: ours uses less)."
    );
    let checks: u64 = rows.iter().map(|r| r.poison_checks).sum();
    for peer in [Peer::Ours, Peer::Dpdk] {
        let of: Vec<&NetRow> = rows.iter().filter(|r| r.peer == peer).collect();
        if of.is_empty() {
            continue;
        }
        let total = |f: fn(&NetRow) -> u64| of.iter().map(|r| f(r)).sum::<u64>();
        println!(
            "{}: every frame back checked byte for byte: {} wrong; freed buffers poisoned and \
             checked when reused: {} checks, {} broken; {} frames lost, {} late; {} MISSes for \
             IOVAs no longer mapped (unanswered, as QEMU leaves them).",
            peer.name(),
            total(|r| r.corrupt + r.bad_completions),
            total(|r| r.poison_checks),
            total(|r| r.poison_violations),
            total(|r| r.lost),
            total(|r| r.late),
            total(|r| r.unmapped_misses),
        );
    }
    if checks == 0 {
        println!("(no workload mapped buffers per frame: no poison checks)");
    }
    if let Some(t) = totals {
        println!(
            "testpmd's own totals over the run: {} frames taken from the guest, {} given to it, \
             {} dropped on the way in.",
            t.rx, t.tx, t.tx_dropped
        );
    }
    let rtt: Vec<String> = rows
        .iter()
        .filter_map(|r| r.backend_rtt_p50_us.map(|v| format!("{} {v:.1}", r.name)))
        .collect();
    if !rtt.is_empty() {
        println!(
            "ours, MISS sent to queue running again inside the back-end, p50 us: {}",
            rtt.join(", ")
        );
    }
}

pub(crate) fn to_json(
    args: &E2eArgs,
    rows: &[NetRow],
    totals: Option<PortTotals>,
) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "workload": r.name,
                "peer": r.peer.name(),
                "iommu": r.iommu,
                "seconds": r.seconds,
                "sent": r.sent,
                "returned": r.returned,
                "pps": r.pps,
                "mbps": r.mbps,
                "lat_p50_us": r.lat_p50_us,
                "lat_p99_us": r.lat_p99_us,
                "misses_per_s": r.misses_per_s,
                "miss_rtt_p50_us": r.miss_rtt_p50_us,
                "miss_rtt_p99_us": r.miss_rtt_p99_us,
                "backend_miss_rtt_p50_us": r.backend_rtt_p50_us,
                "invalidations_per_s": r.invalidations_per_s,
                "unmapped_misses": r.unmapped_misses,
                "lost": r.lost,
                "late": r.late,
                "corrupt": r.corrupt,
                "poison_violations": r.poison_violations,
                "poison_checks": r.poison_checks,
                "bad_completions": r.bad_completions,
                "cpu_device_s_per_mpkt": r.device_cpu_s_per_m,
                "cpu_driver_s_per_mpkt": r.driver_cpu_s_per_m,
                "steal_share": r.steal_share,
                "pps_rounds": r.pps_rounds,
                "ratio_to_off": r.ratio_to_off,
                "ratio_rounds": r.ratio_rounds,
                "vs_dpdk": r.vs_dpdk,
                "cpu_vs_dpdk": r.cpu_vs_dpdk,
            })
        })
        .collect();
    json!({
        "device": "net",
        "frame_bytes": args.frame_bytes,
        "depth": args.depth,
        "rounds": args.rounds,
        "iotlb_capacity": args.iotlb_capacity,
        "rows": rows,
        "testpmd_totals": totals.map(|t| json!({"rx": t.rx, "tx": t.tx, "tx_dropped": t.tx_dropped})),
    })
}

/// The chart: pps per workload and device CPU per frame, a bar per peer.
pub(crate) fn panels(rows: &[NetRow]) -> Vec<Panel> {
    let mut names: Vec<&'static str> = Vec::new();
    for r in rows {
        if !names.contains(&r.name) {
            names.push(r.name);
        }
    }
    let series = |value: fn(&NetRow) -> (f64, f64, f64, String)| -> Vec<Series> {
        [(Peer::Ours, "#4878a8"), (Peer::Dpdk, "#e08040")]
            .into_iter()
            .filter(|(p, _)| rows.iter().any(|r| r.peer == *p))
            .map(|(peer, color)| Series {
                name: peer.name(),
                color,
                bars: names
                    .iter()
                    .map(|n| {
                        rows.iter()
                            .find(|r| r.name == *n && r.peer == peer)
                            .map(|r| {
                                let (v, lo, hi, label) = value(r);
                                Bar {
                                    value: v,
                                    lo,
                                    hi,
                                    label,
                                }
                            })
                    })
                    .collect(),
            })
            .collect()
    };
    // A peer that moved almost nothing has a CPU per frame that would flatten the rest:
    // the axis stops at 4 times our highest, and bars beyond it say their value.
    let cut = 4.0
        * rows
            .iter()
            .filter(|r| r.peer == Peer::Ours)
            .map(|r| r.device_cpu_s_per_m)
            .fold(1.0, f64::max);
    let series_cut = |cut: f64| -> Vec<Series> {
        let mut out = series(|r| {
            let lo = r
                .cpu_rounds
                .iter()
                .copied()
                .fold(r.device_cpu_s_per_m, f64::min);
            let hi = r
                .cpu_rounds
                .iter()
                .copied()
                .fold(r.device_cpu_s_per_m, f64::max);
            (
                r.device_cpu_s_per_m,
                lo,
                hi,
                format!("{:.1}", r.device_cpu_s_per_m),
            )
        });
        for b in out.iter_mut().flat_map(|x| x.bars.iter_mut().flatten()) {
            if b.value > cut {
                b.label = format!("{:.0} (cut)", b.value);
            }
            b.value = b.value.min(cut);
            b.lo = b.lo.min(cut);
            b.hi = b.hi.min(cut);
        }
        out
    };
    vec![
        Panel {
            title: "Frames back per second (median round; above: ratio to the same peer's off)"
                .into(),
            axis: "frames/s".into(),
            groups: names.iter().map(|s| s.to_string()).collect(),
            series: series(|r| {
                let (lo, hi) = r.spread();
                let label = if r.name == "off" {
                    "base".into()
                } else {
                    format!("{:.0} %", r.ratio_to_off * 100.0)
                };
                (r.pps, lo, hi, label)
            }),
        },
        Panel {
            title: format!("Device CPU per million frames (median round; axis cut at {cut:.0} s)"),
            axis: "CPU s / M frames".into(),
            groups: names.iter().map(|s| s.to_string()).collect(),
            series: series_cut(cut),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &'static str, peer: Peer, pps: f64, cpu: f64) -> NetRow {
        NetRow {
            name,
            peer,
            iommu: name != "off",
            seconds: 1.0,
            sent: 10,
            returned: 10,
            pps,
            mbps: 0.0,
            lat_p50_us: 0.0,
            lat_p99_us: 0.0,
            misses_per_s: 0.0,
            miss_rtt_p50_us: None,
            miss_rtt_p99_us: None,
            backend_rtt_p50_us: None,
            invalidations_per_s: 0.0,
            unmapped_misses: 0,
            lost: 0,
            late: 0,
            corrupt: 0,
            poison_violations: 0,
            poison_checks: 0,
            bad_completions: 0,
            device_cpu_s_per_m: cpu,
            driver_cpu_s_per_m: 0.0,
            steal_share: 0.0,
            pps_rounds: Vec::new(),
            cpu_rounds: Vec::new(),
            ratio_to_off: 1.0,
            ratio_rounds: Vec::new(),
            vs_dpdk: None,
            cpu_vs_dpdk: None,
        }
    }

    #[test]
    fn ratios_are_paired_by_round_and_peer() {
        // Samples in table order: off ours, off dpdk, warm ours, warm dpdk; two rounds.
        let samples = vec![
            vec![
                row("off", Peer::Ours, 100.0, 1.0),
                row("off", Peer::Ours, 200.0, 1.0),
            ],
            vec![
                row("off", Peer::Dpdk, 50.0, 2.0),
                row("off", Peer::Dpdk, 100.0, 2.0),
            ],
            vec![
                row("warm", Peer::Ours, 90.0, 1.0),
                row("warm", Peer::Ours, 180.0, 1.0),
            ],
            vec![
                row("warm", Peer::Dpdk, 30.0, 4.0),
                row("warm", Peer::Dpdk, 90.0, 4.0),
            ],
        ];
        let rows = summarize(samples);
        let warm = rows
            .iter()
            .find(|r| r.name == "warm" && r.peer == Peer::Ours)
            .unwrap();
        assert!((warm.ratio_to_off - 0.9).abs() < 1e-9, "90/100 and 180/200");
        // Ours over DPDK in the same round: 3 and 2; the upper median of two is 3.
        assert_eq!(warm.vs_dpdk, Some(3.0));
        assert_eq!(warm.cpu_vs_dpdk, Some(0.25));
        let dpdk = rows
            .iter()
            .find(|r| r.name == "warm" && r.peer == Peer::Dpdk)
            .unwrap();
        assert_eq!(dpdk.vs_dpdk, None, "only our rows compare");
        assert_eq!(dpdk.pps_rounds, vec![30.0, 90.0]);
    }

    #[test]
    fn only_our_faults_fail_the_run() {
        let mut d = row("strict", Peer::Dpdk, 1.0, 1.0);
        d.lost = 100;
        d.corrupt = 3;
        assert!(!d.failed(), "a peer's losses and wrong frames are findings");
        let mut o = row("strict", Peer::Ours, 1.0, 1.0);
        o.lost = 1;
        assert!(o.failed(), "ours loses nothing");
    }
}
