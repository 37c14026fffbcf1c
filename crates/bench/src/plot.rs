//! The SVG chart of the end-to-end benchmark (`--plot FILE.svg`): two bar charts side by
//! side, throughput and miss round trip p50/p99, one group of bars per workload.
//!
//! It draws what the rows hold and nothing else: it must not compute or change figures
//! (that is `report.rs`), and its output is compared as text, so keep it deterministic.

use std::fmt::Write as _;

use crate::report::Row;

/// Two bar charts side by side: IOPS, and miss round trip p50/p99, per workload.
pub(crate) fn plot(rows: &[Row]) -> String {
    let (w, h) = (960.0, 420.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panel = |s: &mut String, x0: f64, title: &str, series: &[(&str, Vec<f64>)], unit: &str| {
        let (pw, ph, top) = (420.0, 300.0, 60.0);
        let max = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="30" font-size="15" text-anchor="middle">{title}</text>"#,
            x0 + pw / 2.0
        );
        let _ = writeln!(
            s,
            r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            top + ph,
            x0 + pw,
            top + ph
        );
        let groups = rows.len().max(1) as f64;
        let gw = pw / groups;
        let colors = ["#4878a8", "#e08040"];
        let bw = gw * 0.7 / series.len() as f64;
        for (gi, r) in rows.iter().enumerate() {
            let gx = x0 + gi as f64 * gw + gw * 0.15;
            for (si, (_, vals)) in series.iter().enumerate() {
                let v = vals.get(gi).copied().unwrap_or(0.0);
                let bh = v / max * ph;
                let x = gx + si as f64 * bw;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{bh:.1}" fill="{}"><title>{} {}: {v:.1} {unit}</title></rect>"#,
                    top + ph - bh,
                    colors[si % 2],
                    r.name,
                    series[si].0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + gw * 0.35,
                top + ph + 16.0,
                r.name
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}">max {max:.1} {unit}</text>"#,
            top - 8.0
        );
        for (si, (name, _)) in series.iter().enumerate() {
            let lx = x0 + pw - 120.0;
            let ly = top - 8.0 - 14.0 * (series.len() - 1 - si) as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{ly}">{name}</text>"#,
                ly - 9.0,
                colors[si % 2],
                lx + 14.0
            );
        }
    };
    panel(
        &mut s,
        40.0,
        "Throughput (IOPS)",
        &[("IOPS", rows.iter().map(|r| r.iops).collect())],
        "IOPS",
    );
    panel(
        &mut s,
        520.0,
        "Miss round trip (us)",
        &[
            (
                "p50",
                rows.iter()
                    .map(|r| r.miss_rtt_p50_us.unwrap_or(0.0))
                    .collect(),
            ),
            (
                "p99",
                rows.iter()
                    .map(|r| r.miss_rtt_p99_us.unwrap_or(0.0))
                    .collect(),
            ),
        ],
        "us",
    );
    s.push_str("</svg>\n");
    s
}
