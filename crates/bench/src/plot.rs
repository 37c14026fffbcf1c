//! The SVG chart of the end-to-end benchmark (`--plot FILE.svg`): two panels, one above
//! the other.
//!
//! - Throughput: one bar per workload at its median round's IOPS (grey: no IOMMU, blue:
//!   vIOMMU), a whisker from the lowest to the highest round's IOPS, and the ratio to its
//!   baseline written above it (`97 %`, the row's median paired ratio; `base` for a
//!   baseline itself). Workloads are split by request size into side-by-side sub-panels,
//!   each with its own linear IOPS axis (1 MiB requests run at a small fraction of the IOPS
//!   of 4 KiB ones and would be invisible on a shared axis): every bar is compared with its
//!   baseline, which has the same request size, on the same axis. A sub-panel's header
//!   names its baseline and any workload measured against another (`log to warm`).
//! - Miss round trip: the median round's p50 and p99 bars per workload on a linear µs axis,
//!   their values written above them when they fit, with a legend; a workload without
//!   misses shows "no misses".
//!
//! Every y axis has 4 to 6 round ticks (a step of 1, 2 or 5 × 10^k, [`ticks`]) with light
//! grid lines; x labels are the workload names, rotated when they would overlap; a footer
//! says what bars, whiskers and ratios are.
//!
//! It draws what the rows hold and nothing else: it must not compute or change figures
//! (that is `report.rs`) beyond scaling and ticks, and its output is compared as text, so
//! keep it deterministic (fixed float precision, rows in their order).

use std::fmt::Write as _;

use crate::report::Row;

const WIDTH: f64 = 960.0;
/// Room left of each y axis for its tick labels and title.
const AXIS_MARGIN: f64 = 76.0;
const RIGHT_MARGIN: f64 = 16.0;
/// Rough width of a character of the 12 px sans-serif text, to tell when labels overlap.
const CHAR_W: f64 = 7.0;

const NO_IOMMU: &str = "#9aa5b1";
const VIOMMU: &str = "#4878a8";
const P50: &str = "#4878a8";
const P99: &str = "#e08040";
const GRID: &str = "#e4e4e4";

/// The ticks of a y axis from 0: `0, step, 2 step, .. n step`, with `n step >= max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ticks {
    pub(crate) step: f64,
    pub(crate) n: u32,
    /// `step` is 1, 2 or 5 × 10^`exp`.
    pub(crate) exp: i32,
}

impl Ticks {
    /// The top of the axis.
    pub(crate) fn top(&self) -> f64 {
        self.step * f64::from(self.n)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = f64> + '_ {
        (0..=self.n).map(|i| self.step * f64::from(i))
    }
}

/// The smallest "nice" step (1, 2 or 5 × 10^k) that covers `max` in at most 5 steps: that
/// is 3 to 5 steps, so 4 to 6 tick values with 0. A `max` that is not positive and finite
/// gets the axis of 1.
pub(crate) fn ticks(max: f64) -> Ticks {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let mut exp = max.log10().floor() as i32 - 1;
    loop {
        for m in [1.0, 2.0, 5.0] {
            let step = m * 10f64.powi(exp);
            // The tolerance keeps a max that is itself a round value (100 = 5 × 20) at its
            // step despite the rounding of 10^exp.
            let n = (max / step - 1e-9).ceil().max(1.0);
            if n <= 5.0 {
                return Ticks {
                    step,
                    n: n as u32,
                    exp,
                };
            }
        }
        exp += 1;
    }
}

/// A tick label: `0`, else with a k or M suffix when the axis goes that far (`50k`,
/// `1.5M`), with as many decimals as the step needs.
fn tick_label(v: f64, t: &Ticks, suffixes: bool) -> String {
    let (unit_exp, suffix) = match t.top() {
        top if suffixes && top >= 1e6 => (6, "M"),
        top if suffixes && top >= 1e3 => (3, "k"),
        _ => (0, ""),
    };
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (unit_exp - t.exp).max(0) as usize;
    let v = v / 10f64.powi(unit_exp);
    format!("{v:.decimals$}{suffix}")
}

/// `&`, `<`, `>` and `"` as XML entities.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plot area: `x`, `top`, width `w`, height `h`, values from 0 to `t.top()`.
struct Frame {
    x: f64,
    top: f64,
    w: f64,
    h: f64,
    t: Ticks,
}

impl Frame {
    fn y(&self, v: f64) -> f64 {
        self.top + self.h - (v / self.t.top()).clamp(0.0, 1.0) * self.h
    }

    fn bottom(&self) -> f64 {
        self.top + self.h
    }

    /// Grid lines, tick labels, the axis lines and the rotated axis title.
    fn axes(&self, s: &mut String, title: &str, suffixes: bool) {
        for v in self.t.values() {
            let y = self.y(v);
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{GRID}"/>"#,
                self.x,
                self.x + self.w
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                self.x - 6.0,
                y + 4.0,
                tick_label(v, &self.t, suffixes)
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{b:.1}" stroke="black"/><line x1="{x:.1}" y1="{b:.1}" x2="{:.1}" y2="{b:.1}" stroke="black"/>"#,
            self.top,
            self.x + self.w,
            x = self.x,
            b = self.bottom()
        );
        let (tx, ty) = (self.x - 54.0, self.top + self.h / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{tx:.1}" y="{ty:.1}" text-anchor="middle" transform="rotate(-90 {tx:.1} {ty:.1})">{}</text>"#,
            esc(title)
        );
    }

    /// The workload names under the slots of width `slot`, rotated if they would overlap;
    /// returns how far down they go.
    fn x_labels(&self, s: &mut String, names: &[&str], slot: f64) -> f64 {
        let widest = names.iter().map(|n| n.len()).max().unwrap_or(0) as f64 * CHAR_W;
        let rotate = widest > slot - 4.0;
        for (i, name) in names.iter().enumerate() {
            let cx = self.x + (i as f64 + 0.5) * slot;
            let y = self.bottom() + 16.0;
            if rotate {
                let x = cx + 4.0;
                let _ = writeln!(
                    s,
                    r#"<text x="{x:.1}" y="{y:.1}" text-anchor="end" transform="rotate(-35 {x:.1} {y:.1})">{}</text>"#,
                    esc(name)
                );
            } else {
                let _ = writeln!(
                    s,
                    r#"<text x="{cx:.1}" y="{y:.1}" text-anchor="middle">{}</text>"#,
                    esc(name)
                );
            }
        }
        // 35°: sin 0.57, and the glyphs' height.
        self.bottom() + if rotate { 26.0 + widest * 0.57 } else { 20.0 }
    }
}

/// Coloured squares with names, right-aligned to `right` on the line `y`.
fn legend(s: &mut String, right: f64, y: f64, items: &[(&str, &str)]) {
    let mut x = right;
    for (name, color) in items.iter().rev() {
        x -= name.len() as f64 * CHAR_W + 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 9.0,
            x + 14.0,
            esc(name)
        );
        x -= 10.0;
    }
}

/// "4 KiB", "1 MiB".
fn size(kib: u32) -> String {
    if kib >= 1024 && kib % 1024 == 0 {
        format!("{} MiB", kib / 1024)
    } else {
        format!("{kib} KiB")
    }
}

/// The rows by request size, in the order the sizes first appear.
fn by_block_size(rows: &[Row]) -> Vec<Vec<&Row>> {
    let mut groups: Vec<Vec<&Row>> = Vec::new();
    for r in rows {
        match groups.iter_mut().find(|g| g[0].block_kib == r.block_kib) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// What a sub-panel's ratios are against: its first row's baseline, and the workloads
/// measured against another one by name ("(ratio to off; log to warm)").
fn against(g: &[&Row]) -> String {
    let Some(first) = g.first() else {
        return String::new();
    };
    let others: Vec<String> = g
        .iter()
        .filter(|r| r.baseline != first.baseline && r.name != r.baseline)
        .map(|r| format!("{} to {}", r.name, r.baseline))
        .collect();
    if others.is_empty() {
        format!("(ratio to {})", first.baseline)
    } else {
        format!("(ratio to {}; {})", first.baseline, others.join(", "))
    }
}

/// The lowest and highest round's IOPS (the median round's when there are no rounds).
fn spread(r: &Row) -> (f64, f64) {
    let (lo, hi) = r.iops_spread();
    (lo.min(r.iops), hi.max(r.iops))
}

/// A whisker at `cx` from `ylo` to `yhi` (SVG y), capped a fifth of `bar_w` each side.
fn whisker(s: &mut String, cx: f64, ylo: f64, yhi: f64, bar_w: f64) {
    let cap = bar_w * 0.2;
    let _ = writeln!(
        s,
        r##"<path d="M{:.1} {ylo:.1}H{:.1}M{cx:.1} {ylo:.1}V{yhi:.1}M{:.1} {yhi:.1}H{:.1}" stroke="#222" fill="none"/>"##,
        cx - cap,
        cx + cap,
        cx - cap,
        cx + cap
    );
}

/// A panel's title at `y`, with its legend at the right.
fn panel_title(s: &mut String, title: &str, y: f64, entries: &[(&str, &str)]) {
    let _ = writeln!(
        s,
        r#"<text x="{AXIS_MARGIN}" y="{y:.1}" font-size="15" font-weight="bold">{title}</text>"#
    );
    legend(s, WIDTH - RIGHT_MARGIN, y, entries);
}

/// The throughput panel: a sub-panel per request size, side by side, between `top` and
/// `bottom` (the bottom of the plot areas); returns the bottom of its x labels.
fn throughput(s: &mut String, rows: &[Row], top: f64, bottom: f64) -> f64 {
    panel_title(
        s,
        "Throughput per workload",
        top - 56.0,
        &[("no IOMMU", NO_IOMMU), ("vIOMMU", VIOMMU)],
    );
    let groups = by_block_size(rows);
    // A sub-panel of one workload is as wide as two, for its header.
    let width = |g: &Vec<&Row>| g.len().max(2) as f64;
    let slot = (WIDTH - RIGHT_MARGIN - AXIS_MARGIN * groups.len() as f64)
        / groups.iter().map(width).sum::<f64>();
    let bw = slot * 0.6;
    let mut x = 0.0;
    let mut labels_bottom = bottom;
    for g in &groups {
        let hi = g.iter().map(|r| spread(r).1).fold(0.0, f64::max);
        // Room above the highest whisker for its ratio.
        let f = Frame {
            x: x + AXIS_MARGIN,
            top,
            w: slot * width(g),
            h: bottom - top,
            t: ticks(hi * 1.12),
        };
        x = f.x + f.w;
        let (requests, against) = (format!("{} requests", size(g[0].block_kib)), against(g));
        let header = if (requests.len() + against.len() + 1) as f64 * CHAR_W <= f.w {
            vec![format!("{requests} {against}")]
        } else {
            vec![requests, against]
        };
        for (i, line) in header.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{}</text>"#,
                f.x + 4.0,
                top - 22.0 - 14.0 * (header.len() - 1 - i) as f64,
                esc(line)
            );
        }
        f.axes(s, "IOPS (median round)", true);
        let group_slot = f.w / g.len() as f64;
        for (i, r) in g.iter().enumerate() {
            let cx = f.x + (i as f64 + 0.5) * group_slot;
            let y = f.y(r.iops);
            let ratio = if r.name == r.baseline {
                "base".to_string()
            } else {
                format!("{:.0} %", r.ratio_to_off * 100.0)
            };
            let (lo, hi) = spread(r);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{bw:.1}" height="{:.1}" fill="{}"><title>{}: {:.0} IOPS (median of {} rounds, min {lo:.0}, max {hi:.0}), {} of {}</title></rect>"#,
                cx - bw / 2.0,
                f.bottom() - y,
                if r.iommu { VIOMMU } else { NO_IOMMU },
                esc(r.name),
                r.iops,
                r.iops_rounds.len(),
                ratio,
                esc(r.baseline)
            );
            let (ylo, yhi) = (f.y(lo), f.y(hi));
            if r.iops_rounds.len() > 1 {
                whisker(s, cx, ylo, yhi, bw);
            }
            let _ = writeln!(
                s,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="11" font-weight="bold">{ratio}</text>"#,
                yhi.min(y) - 5.0
            );
        }
        let names: Vec<&str> = g.iter().map(|r| r.name).collect();
        labels_bottom = labels_bottom.max(f.x_labels(s, &names, group_slot));
    }
    labels_bottom
}

/// The miss round trip panel: p50 and p99 bars per workload; returns the bottom of its x
/// labels.
fn miss_rtt(s: &mut String, rows: &[Row], top: f64, bottom: f64) -> f64 {
    panel_title(
        s,
        "Miss round trip (back-end: MISS sent to the queue running again)",
        top - 22.0,
        &[("p50", P50), ("p99", P99)],
    );
    let hi = rows
        .iter()
        .flat_map(|r| [r.miss_rtt_p50_us, r.miss_rtt_p99_us])
        .flatten()
        .fold(0.0, f64::max);
    let f = Frame {
        x: AXIS_MARGIN,
        top,
        w: WIDTH - RIGHT_MARGIN - AXIS_MARGIN,
        h: bottom - top,
        t: ticks(hi * 1.08),
    };
    f.axes(s, "µs (median round)", false);
    let slot = f.w / rows.len() as f64;
    let bw = slot * 0.34;
    for (i, r) in rows.iter().enumerate() {
        let cx = f.x + (i as f64 + 0.5) * slot;
        let bars = [
            ("p50", r.miss_rtt_p50_us, P50),
            ("p99", r.miss_rtt_p99_us, P99),
        ];
        if bars.iter().all(|b| b.1.is_none()) {
            let text = "no misses";
            let y = f.bottom() - 8.0;
            if text.len() as f64 * 6.0 > slot - 4.0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{y:.1}" font-size="11" font-style="italic" fill="#777" transform="rotate(-90 {:.1} {y:.1})">{text}</text>"##,
                    cx + 4.0,
                    cx + 4.0
                );
            } else {
                let _ = writeln!(
                    s,
                    r##"<text x="{cx:.1}" y="{y:.1}" text-anchor="middle" font-size="11" font-style="italic" fill="#777">{text}</text>"##
                );
            }
            continue;
        }
        for (bi, (name, v, color)) in bars.iter().enumerate() {
            let Some(v) = *v else { continue };
            let x = cx - bw + bi as f64 * bw;
            let y = f.y(v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{:.1}" fill="{color}"><title>{} {name}: {v:.1} µs</title></rect>"#,
                f.bottom() - y,
                esc(r.name)
            );
            let label = if v < 100.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            };
            if label.len() as f64 * 5.6 <= bw + 6.0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{label}</text>"#,
                    x + bw / 2.0,
                    y - 3.0
                );
            }
        }
    }
    let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
    f.x_labels(s, &names, slot)
}

/// The throughput panel above the miss round trip panel, and the footer.
pub(crate) fn plot(rows: &[Row]) -> String {
    let mut body = String::new();
    let height = if rows.is_empty() {
        let _ = writeln!(
            body,
            r#"<text x="{}" y="60" text-anchor="middle">no workloads</text>"#,
            WIDTH / 2.0
        );
        120.0
    } else {
        let below = throughput(&mut body, rows, 80.0, 310.0);
        let top = below + 70.0;
        let below = miss_rtt(&mut body, rows, top, top + 200.0);
        let lo = rows.iter().map(|r| r.iops_rounds.len()).min().unwrap_or(0);
        let hi = rows.iter().map(|r| r.iops_rounds.len()).max().unwrap_or(0);
        let whiskers = match (lo, hi) {
            (_, 0 | 1) => "no whiskers: one round".to_string(),
            _ if lo == hi => format!("whiskers: min–max over {hi} rounds"),
            _ => format!("whiskers: min–max over {lo}–{hi} rounds"),
        };
        let footer = [
            format!(
                "Throughput: bars at the median round's IOPS; {whiskers}; each request size \
                 has its own IOPS axis."
            ),
            "Above the bars: median over rounds of IOPS / its baseline's IOPS in the same round \
             (the baseline: same request size, no IOMMU, unless the header names another; \
             base: the baseline itself)."
                .to_string(),
            "Miss round trip: p50 and p99 of the median round; no misses: the workload had none."
                .to_string(),
        ];
        let first = below + 30.0;
        for (i, line) in footer.iter().enumerate() {
            let _ = writeln!(
                body,
                r##"<text x="16" y="{:.1}" font-size="11" fill="#444">{}</text>"##,
                first + 16.0 * i as f64,
                esc(line)
            );
        }
        first + 16.0 * footer.len() as f64
    };
    document(&body, height)
}

/// The SVG document around `body`, `height` tall.
fn document(body: &str, height: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    s.push_str(body);
    s.push_str("</svg>\n");
    s
}

/// One bar of a grouped-bar panel: its value, whisker and the text above it.
#[derive(Debug, Clone)]
pub(crate) struct Bar {
    pub(crate) value: f64,
    pub(crate) lo: f64,
    pub(crate) hi: f64,
    pub(crate) label: String,
}

/// A series of a grouped-bar panel: a bar (or none) per group, in one colour.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: &'static str,
    pub(crate) color: &'static str,
    pub(crate) bars: Vec<Option<Bar>>,
}

/// A panel of bars grouped by workload, a bar per series in each group.
#[derive(Debug, Clone)]
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) axis: String,
    pub(crate) groups: Vec<String>,
    pub(crate) series: Vec<Series>,
}

/// Panels one above the other, each with its axis, legend, whiskers (min–max) and the
/// labels above the bars, then `footer`.
pub(crate) fn grouped_bars(panels: &[Panel], footer: &[String]) -> String {
    let mut s = String::new();
    let mut top = 80.0;
    for p in panels {
        let legend_items: Vec<(&str, &str)> = p.series.iter().map(|x| (x.name, x.color)).collect();
        panel_title(&mut s, &esc(&p.title), top - 40.0, &legend_items);
        let hi = p
            .series
            .iter()
            .flat_map(|x| x.bars.iter().flatten())
            .map(|b| b.hi.max(b.value))
            .fold(0.0, f64::max);
        let f = Frame {
            x: AXIS_MARGIN,
            top,
            w: WIDTH - AXIS_MARGIN - RIGHT_MARGIN,
            h: 220.0,
            t: ticks(hi * 1.12),
        };
        f.axes(&mut s, &p.axis, true);
        let slot = f.w / p.groups.len().max(1) as f64;
        let n = p.series.len().max(1) as f64;
        let bw = slot * 0.7 / n;
        for (k, x) in p.series.iter().enumerate() {
            for (i, bar) in x.bars.iter().enumerate() {
                let Some(b) = bar else { continue };
                let left = f.x + i as f64 * slot + slot * 0.15 + k as f64 * bw;
                let cx = left + bw / 2.0;
                let y = f.y(b.value);
                let _ = writeln!(
                    s,
                    r#"<rect x="{left:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {:.1} (min {:.1}, max {:.1})</title></rect>"#,
                    bw * 0.92,
                    f.bottom() - y,
                    x.color,
                    esc(&p.groups[i]),
                    x.name,
                    b.value,
                    b.lo,
                    b.hi
                );
                let (ylo, yhi) = (f.y(b.lo), f.y(b.hi));
                if yhi < ylo {
                    whisker(&mut s, cx, ylo, yhi, bw);
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    yhi.min(y) - 4.0,
                    esc(&b.label)
                );
            }
        }
        let names: Vec<&str> = p.groups.iter().map(String::as_str).collect();
        top = f.x_labels(&mut s, &names, slot) + 80.0;
    }
    let first = top - 40.0;
    for (i, line) in footer.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="16" y="{:.1}" font-size="11" fill="#444">{}</text>"##,
            first + 16.0 * i as f64,
            esc(line)
        );
    }
    document(&s, first + 16.0 * footer.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row with what the plot reads; the rest neutral.
    fn row(name: &'static str, baseline: &'static str, block_kib: u32, rounds: &[f64]) -> Row {
        let mut sorted = rounds.to_vec();
        sorted.sort_by(f64::total_cmp);
        Row {
            block_kib,
            capacity: 256,
            iommu: name != baseline,
            requests: 0,
            iops_rounds: rounds.to_vec(),
            ..crate::report::neutral_row(name, baseline, sorted[sorted.len() / 2])
        }
    }

    #[test]
    fn ticks_are_nice_and_cover_the_max() {
        for max in [
            1e-4,
            0.003,
            0.7,
            1.0,
            2.0,
            4.9,
            7.0,
            9.9,
            10.0,
            12.0,
            99.0,
            100.0,
            101.0,
            250.0,
            999.0,
            4321.0,
            123_456.0,
            1_000_001.0,
            3.3e7,
        ] {
            let t = ticks(max);
            assert!((3..=5).contains(&t.n), "{max}: {t:?}");
            assert!(t.top() >= max * (1.0 - 1e-12), "{max}: {t:?}");
            // A step of 1, 2 or 5 × 10^exp.
            let mantissa = t.step / 10f64.powi(t.exp);
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-9),
                "{max}: {t:?}"
            );
            let values: Vec<f64> = t.values().collect();
            assert_eq!(values.len() as u32, t.n + 1);
            assert_eq!(values[0], 0.0);
        }
        assert_eq!(ticks(100.0).step, 20.0);
        assert_eq!(ticks(100.0).n, 5);
        assert_eq!(ticks(101.0).step, 50.0);
        assert_eq!(ticks(0.0), ticks(1.0));
        assert_eq!(ticks(f64::NAN), ticks(1.0));
        let t = ticks(123_456.0);
        let labels: Vec<String> = t.values().map(|v| tick_label(v, &t, true)).collect();
        assert_eq!(labels, ["0", "50k", "100k", "150k"]);
        let t = ticks(2_400.0);
        let labels: Vec<String> = t.values().map(|v| tick_label(v, &t, true)).collect();
        assert_eq!(labels, ["0", "0.5k", "1.0k", "1.5k", "2.0k", "2.5k"]);
        let t = ticks(3.2e6);
        assert_eq!(tick_label(t.top(), &t, true), "4M");
        let t = ticks(0.7);
        assert_eq!(tick_label(t.top(), &t, false), "0.8");
    }

    /// Every tag closed in order (a check of the shape, not a parser).
    fn balanced(svg: &str) -> bool {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let Some(len) = rest[start..].find('>') else {
                return false;
            };
            let tag = &rest[start + 1..start + len];
            rest = &rest[start + len + 1..];
            if let Some(closing) = tag.strip_prefix('/') {
                if open.pop() != Some(closing.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
        }
        open.is_empty() && !rest.contains('>')
    }

    #[test]
    fn plot_is_well_formed_with_ratios_ticks_and_misses() {
        let off = row("off", "off", 4, &[100_000.0, 104_000.0, 98_000.0]);
        let mut warm = row("warm", "off", 4, &[96_000.0, 99_000.0, 93_000.0]);
        warm.ratio_to_off = 0.97;
        warm.miss_rtt_p50_us = Some(12.5);
        warm.miss_rtt_p99_us = Some(48.0);
        let mut log = row("log", "warm", 4, &[94_000.0, 95_000.0, 90_000.0]);
        log.ratio_to_off = 0.96;
        let mut big = row("off-1m", "off-1m", 1024, &[2_000.0, 2_100.0, 1_900.0]);
        big.iommu = false;
        let rows = [off, warm, log, big];
        let svg = plot(&rows);
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.ends_with("</svg>\n"));
        assert!(balanced(&svg), "{svg}");
        for text in [
            ">97 %<",
            ">base<",
            ">no misses<",
            ">50k<",
            ">100k<",
            ">0.5k<",
            ">IOPS (median round)<",
            ">96 %<",
            "log: 94000 IOPS",
            "96 % of warm<",
            "(ratio to off; log to warm)<",
            ">1 MiB requests (ratio to off-1m)<",
            ">p99<",
            ">48.0<",
            "over 3 rounds",
        ] {
            assert!(svg.contains(text), "{text} missing in {svg}");
        }
        // Same rows, same text; no rows still a picture.
        assert_eq!(svg, plot(&rows));
        assert!(balanced(&plot(&[])));
        assert!(!balanced("<svg><text></svg>"));
    }
}
