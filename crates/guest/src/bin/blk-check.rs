//! `blk-check`: data integrity of a virtio-blk disk through the guest's driver, both ways.
//!
//! ```text
//! blk-check fill   --disk IMAGE --seed N              (host, before the run)
//! blk-check run    --dev /dev/vda --seed N [--threads T]   (in the guest)
//! blk-check verify --disk IMAGE --seed N [--threads T]     (host, after the run)
//! ```
//!
//! `fill` creates the image (see `guest::layout`): region A holds the host's pattern,
//! region B filler. `run`, in the guest, lets the driver send requests of up to 4 MiB
//! (`max_sectors_kb`), reserves huge pages, then on each of T threads (pinned to CPU
//! `t % cpus`, so that each drives its own queue of a multi-queue device) reads every extent
//! of region A with O_DIRECT and checks it byte for byte, writes every extent of region B,
//! and reads each back in the other buffer layout and checks it. `verify` checks that
//! region A is untouched and region B holds exactly the guest's data where the threads
//! wrote, and the filler elsewhere. Each prints one line and exits 0, or names the first
//! wrong byte and exits 1.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

use guest::direct::Buffers;
use guest::layout::{
    extents, fill, first_mismatch, guest_seed, Region, DISK, MAX_THREADS, REGION, SIZES,
};

struct Args {
    cmd: String,
    path: String,
    seed: u64,
    threads: usize,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let cmd = it
        .next()
        .ok_or("usage: blk-check fill|run|verify [options]")?;
    let mut args = Args {
        path: if cmd == "run" { "/dev/vda" } else { "" }.to_string(),
        cmd,
        seed: 1,
        threads: 1,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--disk" | "--dev" => args.path = value,
            "--seed" => args.seed = value.parse().map_err(|e| format!("--seed: {e}"))?,
            "--threads" => {
                args.threads = value.parse().map_err(|e| format!("--threads: {e}"))?;
                if !(1..=MAX_THREADS).contains(&args.threads) {
                    return Err(format!("--threads must be 1..={MAX_THREADS}"));
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.path.is_empty() {
        return Err("--disk is required".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blk-check: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.cmd.as_str() {
        "fill" => host_fill(&args),
        "run" => guest_run(&args),
        "verify" => host_verify(&args),
        other => Err(format!("unknown command {other}")),
    };
    match result {
        Ok(line) => {
            println!("blk-check: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("blk-check: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}

/// Write region A's pattern and region B's filler into a new image.
fn host_fill(a: &Args) -> Result<String, String> {
    let f = File::create(&a.path).map_err(|e| format!("{}: {e}", a.path))?;
    f.set_len(DISK).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for (base, seed) in [(0, a.seed), (REGION, a.seed)] {
        for off in (0..REGION).step_by(buf.len()) {
            fill(&mut buf, seed, base + off);
            f.write_all_at(&buf, base + off)
                .map_err(|e| e.to_string())?;
        }
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(format!("filled {} MiB", DISK >> 20))
}

/// Check region A untouched, region B holds the guest's data where it wrote.
fn host_verify(a: &Args) -> Result<String, String> {
    let f = File::open(&a.path).map_err(|e| format!("{}: {e}", a.path))?;
    let check = |offset: u64, len: u64, seed: u64, what: &str| -> Result<(), String> {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| e.to_string())?;
        match first_mismatch(&buf, seed, offset) {
            None => Ok(()),
            Some((at, want, got)) => Err(format!(
                "{what}: byte {at:#x} is {got:#04x}, expected {want:#04x}"
            )),
        }
    };
    check(0, REGION, a.seed, "region A (host data) changed")?;
    let mut written = 0u64;
    let mut at = REGION;
    for t in 0..MAX_THREADS {
        for e in extents(Region::B, t) {
            if e.offset > at {
                check(at, e.offset - at, a.seed, "region B filler overwritten")?;
            }
            if t < a.threads {
                check(e.offset, e.len as u64, guest_seed(a.seed), "guest data")?;
                written += e.len as u64;
            } else {
                check(
                    e.offset,
                    e.len as u64,
                    a.seed,
                    "region B filler overwritten",
                )?;
            }
            at = e.offset + e.len as u64;
        }
    }
    check(at, 2 * REGION - at, a.seed, "region B filler overwritten")?;
    Ok(format!(
        "PASS verify: host data intact, {} MiB of guest data in place",
        written >> 20
    ))
}

/// The value of a sysfs or procfs file.
fn get(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

/// Write `value` to a sysfs or procfs file; the value read back.
fn set(path: &str, value: &str) -> String {
    let _ = std::fs::write(path, value);
    get(path)
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; the call
    // reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// What one thread did.
struct Done {
    requests: u64,
    bytes: u64,
    huge: &'static str,
}

fn guest_run(a: &Args) -> Result<String, String> {
    let dev = a.path.rsplit('/').next().unwrap_or("vda").to_string();
    let queue = format!("/sys/block/{dev}/queue");
    let hw = get(&format!("{queue}/max_hw_sectors_kb"));
    // Let the driver send the largest size checked as one request (Linux caps it at 1280
    // KiB by default); the device limits (seg_max, size_max) still split what they must.
    let largest = (SIZES[SIZES.len() - 1] >> 10).to_string();
    let max_kb = set(&format!("{queue}/max_sectors_kb"), &largest);
    let segs = get(&format!("{queue}/max_segments"));
    let seg_kb = get(&format!("{queue}/max_segment_size"));
    let huge = set(
        "/proc/sys/vm/nr_hugepages",
        &(2 * a.threads + 2).to_string(),
    );
    let nq = std::fs::read_dir(format!("/sys/block/{dev}/mq"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "blk-check: {dev}: max_hw_sectors_kb={hw} max_sectors_kb={max_kb} max_segments={segs} \
         max_segment_size={seg_kb} hw_queues={nq} nr_hugepages={huge}"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let threads: Vec<_> = (0..a.threads)
        .map(|t| {
            let (path, seed) = (a.path.clone(), a.seed);
            std::thread::spawn(move || {
                pin(t % cpus);
                thread_run(&path, seed, t)
            })
        })
        .collect();
    let mut total = Done {
        requests: 0,
        bytes: 0,
        huge: "",
    };
    for (t, h) in threads.into_iter().enumerate() {
        let d = h
            .join()
            .map_err(|_| format!("thread {t} panicked"))?
            .map_err(|e| format!("thread {t}: {e}"))?;
        total.requests += d.requests;
        total.bytes += d.bytes;
        total.huge = d.huge;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "PASS run: threads={} requests={} MiB={} sizes=4K..4M layouts=scattered,contiguous({}) \
         s={secs:.1}",
        a.threads,
        total.requests,
        total.bytes >> 20,
        total.huge
    ))
}

fn open_direct(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn thread_run(path: &str, seed: u64, t: usize) -> Result<Done, String> {
    let f = open_direct(path).map_err(|e| format!("{path}: {e}"))?;
    let fd = f.as_fd();
    let mut b = Buffers::new(seed ^ ((t as u64 + 1) * 0x9e37_79b9)).map_err(|e| e.to_string())?;
    let mut done = Done {
        requests: 0,
        bytes: 0,
        huge: b.huge_kind(),
    };
    let what = |op: &str, e: &guest::layout::Extent| {
        format!(
            "{op} {} KiB at {:#x} ({})",
            e.len >> 10,
            e.offset,
            e.layout.name()
        )
    };
    // Host to guest.
    for e in extents(Region::A, t) {
        let c = b.take(e.layout, e.len);
        b.poison(&c);
        b.read(fd, &c, e.offset)
            .map_err(|err| format!("{}: {err}", what("read", &e)))?;
        if let Some((at, want, got)) = b.mismatch(&c, seed, e.offset) {
            return Err(format!(
                "{}: byte {at:#x} is {got:#04x}, expected {want:#04x}",
                what("read", &e)
            ));
        }
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    // Guest to device, then back in the other layout.
    let gseed = guest_seed(seed);
    let region_b = extents(Region::B, t);
    for e in &region_b {
        let c = b.take(e.layout, e.len);
        b.fill(&c, gseed, e.offset);
        b.write(fd, &c, e.offset)
            .map_err(|err| format!("{}: {err}", what("write", e)))?;
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    for e in &region_b {
        let layout = e.layout.other();
        let c = b.take(layout, e.len);
        b.poison(&c);
        let back = guest::layout::Extent { layout, ..*e };
        b.read(fd, &c, e.offset)
            .map_err(|err| format!("{}: {err}", what("read back", &back)))?;
        if let Some((at, want, got)) = b.mismatch(&c, gseed, e.offset) {
            return Err(format!(
                "{}: byte {at:#x} is {got:#04x}, expected {want:#04x}",
                what("read back", &back)
            ));
        }
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    Ok(done)
}
