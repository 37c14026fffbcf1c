//! The measurement: frames per second through vhost-net with ACCESS_PLATFORM off, on with
//! warm mappings, strict (map and unmap per frame) and pre-push (UPDATE before the kick), and
//! the MISS round trip, in interleaved rounds with the median round of each mode reported
//! (a TCG guest's speed drifts); printed as a table and optionally as JSON.
//!
//! Each round sets up a device of its own. Nothing here checks behaviour: the cases do.

use std::time::{Duration, Instant};

use frontend::viommu::DeviceIotlb;
use iotlb::hist::Histogram;
use iotlb::{IovaRange, Perm};
use serde_json::json;

use crate::args::KernelNetArgs;
use crate::error::KernelNetError;
use crate::frames::{frame, SRC_TX, VNET_HDR};
use crate::layout::{BUF_GPA, PAGE, TX};
use crate::net::Net;

/// One measured mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No ACCESS_PLATFORM: guest-physical addresses.
    Off,
    /// The IOMMU on, 16 buffers mapped once.
    Warm,
    /// Map and unmap each buffer per frame.
    Strict,
    /// As strict, with the UPDATE written before the kick.
    Prepush,
}

impl Mode {
    /// Its name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Warm => "warm",
            Mode::Strict => "strict",
            Mode::Prepush => "prepush",
        }
    }
}

/// The modes, in the order measured and shown (the first is the baseline of the ratios).
const MODES: [Mode; 4] = [Mode::Off, Mode::Warm, Mode::Strict, Mode::Prepush];

/// Frames per second through vhost-net in `mode`, up to 16 in flight, 256-byte frames; the
/// MISSes read and their round trips.
pub fn measure(args: &KernelNetArgs, mode: Mode) -> Result<(f64, u64, Histogram), KernelNetError> {
    let mut net = Net::setup(args, mode != Mode::Off)?;
    const INFLIGHT: u64 = 16;
    let n = u64::from(args.measure_frames.max(INFLIGHT as u32));
    // Warm: 16 buffers mapped once.
    let warm: Vec<(u64, u64)> = (0..INFLIGHT)
        .map(|i| {
            let gpa = BUF_GPA + i * 2 * PAGE;
            net.map(gpa, PAGE, Perm::ReadOnly).map(|iova| (iova, gpa))
        })
        .collect::<Result<_, _>>()?;
    for (i, &(_, gpa)) in warm.iter().enumerate() {
        net.put_frame(gpa, &frame(SRC_TX, i as u32, 256))?;
    }
    let len = (VNET_HDR + 256) as u32;
    let misses0 = net.misses();
    net.rtt = Histogram::new();
    let start = Instant::now();
    let mut done = 0u64;
    while done < n {
        let batch = INFLIGHT.min(n - done);
        let mut bufs = Vec::new();
        let mut mapped = Vec::new();
        for i in 0..batch {
            let (iova, gpa) = warm[i as usize];
            match mode {
                Mode::Off | Mode::Warm => bufs.push((net.dev_addr(iova, gpa), len)),
                Mode::Strict | Mode::Prepush => {
                    let iova = net.map(gpa, PAGE, Perm::ReadOnly)?;
                    if mode == Mode::Prepush {
                        let range = IovaRange::from_size(iova, PAGE)?;
                        net.dev.update(range, gpa, Perm::ReadOnly)?;
                    }
                    mapped.push(iova);
                    bufs.push((iova, len));
                }
            }
        }
        net.post(TX, &bufs, false)?;
        net.wait(TX, Duration::from_secs(10))?;
        for iova in mapped {
            net.unmap(iova, PAGE)?;
        }
        done += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    let misses = (net.misses() - misses0) as u64;
    Ok((n as f64 / secs, misses, std::mem::take(&mut net.rtt)))
}

/// Measure every mode `--rounds` times, interleaved; print the median round of each, and
/// write the JSON if `--json` asks for it.
pub fn run(args: &KernelNetArgs) -> Result<(), KernelNetError> {
    let mut rounds: Vec<Vec<(f64, u64, Histogram)>> = MODES.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds.max(1) {
        for (i, mode) in MODES.iter().enumerate() {
            rounds[i].push(measure(args, *mode)?);
        }
    }
    let mut results = Vec::new();
    for (mode, mut r) in MODES.into_iter().zip(rounds) {
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mid = r.len() / 2;
        let (fps, misses, rtt) = r.swap_remove(mid);
        results.push((mode, fps, misses, rtt));
    }
    let off = results[0].1;
    println!(
        "{:<9} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "mode", "frames/s", "vs off", "misses", "rtt50 us", "rtt99 us"
    );
    let us = |h: &Histogram, q| (h.count() > 0).then(|| h.quantile(q).as_secs_f64() * 1e6);
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let mut out = serde_json::Map::new();
    for (mode, fps, misses, rtt) in &results {
        println!(
            "{:<9} {:>10.0} {:>6.0}% {:>9} {:>9} {:>9}",
            mode.name(),
            fps,
            fps / off * 100.0,
            misses,
            fmt(us(rtt, 0.5)),
            fmt(us(rtt, 0.99))
        );
        out.insert(
            mode.name().into(),
            json!({
                "frames_per_s": fps,
                "ratio_to_off": fps / off,
                "misses": misses,
                "miss_rtt_us": {"p50": us(rtt, 0.5), "p99": us(rtt, 0.99)},
            }),
        );
    }
    println!(
        "rtt: from reading a MISS on the vhost fd to the frame it held up being done \
         (TCG guest: compare ratios, not absolute figures)"
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(out))?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text)
                .map_err(KernelNetError::io(format!("writing {}", path.display())))?;
        }
    }
    Ok(())
}
