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
//! wrong byte and exits 1. A bad command line prints its usage error on stderr and exits 2.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::num::ParseIntError;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

use guest::direct::Buffers;
use guest::layout::{
    extents, fill, first_mismatch, guest_seed, Region, DISK, MAX_THREADS, REGION, SIZES,
};

/// A command line `parse` refuses (exit status 2), or a command `main` does not know.
#[derive(Debug)]
enum Usage {
    /// No command at all.
    NoCommand,
    /// A flag was the last word.
    NeedsValue(String),
    /// A flag's value is not a number.
    Number {
        /// The flag.
        flag: &'static str,
        /// Why.
        source: ParseIntError,
    },
    /// `--threads` out of 1..=[`MAX_THREADS`].
    Threads,
    /// A flag we do not have.
    UnknownOption(String),
    /// `fill` or `verify` without `--disk`.
    NoDisk,
    /// A command other than fill, run and verify.
    UnknownCommand(String),
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Usage::NoCommand => write!(f, "usage: blk-check fill|run|verify [options]"),
            Usage::NeedsValue(flag) => write!(f, "{flag} needs a value"),
            Usage::Number { flag, source } => write!(f, "{flag}: {source}"),
            Usage::Threads => write!(f, "--threads must be 1..={MAX_THREADS}"),
            Usage::UnknownOption(flag) => write!(f, "unknown option {flag}"),
            Usage::NoDisk => write!(f, "--disk is required"),
            Usage::UnknownCommand(cmd) => write!(f, "unknown command {cmd}"),
        }
    }
}

impl std::error::Error for Usage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Usage::Number { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why a command failed (printed as `blk-check: FAIL ...`, exit status 1).
#[derive(Debug)]
enum CheckError {
    /// The command is not one we have.
    Usage(Usage),
    /// A system call on the image, the device or our buffers failed.
    Io {
        /// What was being done, on what.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// A byte read is not the one the pattern says: the first wrong byte of a check.
    Mismatch {
        /// The check (`region A (host data) changed`, `read 4 KiB at 0x0 (scattered)`).
        what: String,
        /// The disk offset of that byte.
        at: u64,
        /// The byte the pattern has there.
        want: u8,
        /// The byte read.
        got: u8,
    },
    /// A guest thread panicked.
    Panicked {
        /// Its index.
        thread: usize,
    },
    /// A guest thread failed.
    Thread {
        /// Its index.
        thread: usize,
        /// Why.
        source: Box<CheckError>,
    },
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Usage(u) => write!(f, "{u}"),
            CheckError::Io { what, source } => write!(f, "{what}: {source}"),
            CheckError::Mismatch {
                what,
                at,
                want,
                got,
            } => write!(
                f,
                "{what}: byte {at:#x} is {got:#04x}, expected {want:#04x}"
            ),
            CheckError::Panicked { thread } => write!(f, "thread {thread} panicked"),
            CheckError::Thread { thread, source } => write!(f, "thread {thread}: {source}"),
        }
    }
}

impl std::error::Error for CheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckError::Usage(u) => Some(u),
            CheckError::Io { source, .. } => Some(source),
            CheckError::Thread { source, .. } => Some(source.as_ref()),
            CheckError::Mismatch { .. } | CheckError::Panicked { .. } => None,
        }
    }
}

/// [`CheckError::Io`] of `what`, for `map_err` (where `what` is cheap, outside loops).
fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CheckError {
    let what = what.into();
    move |source| CheckError::Io { what, source }
}

/// [`CheckError::Mismatch`] of `what` if `found` (from `first_mismatch`) names a byte.
fn mismatch(found: Option<(u64, u8, u8)>, what: impl FnOnce() -> String) -> Result<(), CheckError> {
    match found {
        None => Ok(()),
        Some((at, want, got)) => Err(CheckError::Mismatch {
            what: what(),
            at,
            want,
            got,
        }),
    }
}

struct Args {
    cmd: String,
    path: String,
    seed: u64,
    threads: usize,
}

fn parse() -> Result<Args, Usage> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or(Usage::NoCommand)?;
    let mut args = Args {
        path: if cmd == "run" { "/dev/vda" } else { "" }.to_string(),
        cmd,
        seed: 1,
        threads: 1,
    };
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            return Err(Usage::NeedsValue(flag));
        };
        match flag.as_str() {
            "--disk" | "--dev" => args.path = value,
            "--seed" => {
                args.seed = value.parse().map_err(|source| Usage::Number {
                    flag: "--seed",
                    source,
                })?
            }
            "--threads" => {
                args.threads = value.parse().map_err(|source| Usage::Number {
                    flag: "--threads",
                    source,
                })?;
                if !(1..=MAX_THREADS).contains(&args.threads) {
                    return Err(Usage::Threads);
                }
            }
            _ => return Err(Usage::UnknownOption(flag)),
        }
    }
    if args.path.is_empty() {
        return Err(Usage::NoDisk);
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
        other => Err(CheckError::Usage(Usage::UnknownCommand(other.to_string()))),
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
fn host_fill(a: &Args) -> Result<String, CheckError> {
    let f = File::create(&a.path).map_err(io_err(&a.path))?;
    f.set_len(DISK)
        .map_err(io_err(format!("{}: set_len {DISK}", a.path)))?;
    let mut buf = vec![0u8; 1 << 20];
    for (base, seed) in [(0, a.seed), (REGION, a.seed)] {
        for off in (0..REGION).step_by(buf.len()) {
            fill(&mut buf, seed, base + off);
            f.write_all_at(&buf, base + off)
                .map_err(|source| CheckError::Io {
                    what: format!("{}: write at {:#x}", a.path, base + off),
                    source,
                })?;
        }
    }
    f.sync_all().map_err(io_err(format!("{}: fsync", a.path)))?;
    Ok(format!("filled {} MiB", DISK >> 20))
}

/// Check region A untouched, region B holds the guest's data where it wrote.
fn host_verify(a: &Args) -> Result<String, CheckError> {
    let f = File::open(&a.path).map_err(io_err(&a.path))?;
    let check = |offset: u64, len: u64, seed: u64, what: &str| -> Result<(), CheckError> {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|source| CheckError::Io {
                what: format!("{}: read {len} bytes at {offset:#x}", a.path),
                source,
            })?;
        mismatch(first_mismatch(&buf, seed, offset), || what.to_string())
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

fn guest_run(a: &Args) -> Result<String, CheckError> {
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
            .map_err(|_| CheckError::Panicked { thread: t })?
            .map_err(|e| CheckError::Thread {
                thread: t,
                source: Box::new(e),
            })?;
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

fn thread_run(path: &str, seed: u64, t: usize) -> Result<Done, CheckError> {
    let f = open_direct(path).map_err(io_err(path))?;
    let fd = f.as_fd();
    let mut b = Buffers::new(seed ^ ((t as u64 + 1) * 0x9e37_79b9))
        .map_err(io_err("mapping the I/O buffers"))?;
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
        b.read(fd, &c, e.offset).map_err(|source| CheckError::Io {
            what: what("read", &e),
            source,
        })?;
        mismatch(b.mismatch(&c, seed, e.offset), || what("read", &e))?;
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    // Guest to device, then back in the other layout.
    let gseed = guest_seed(seed);
    let region_b = extents(Region::B, t);
    for e in &region_b {
        let c = b.take(e.layout, e.len);
        b.fill(&c, gseed, e.offset);
        b.write(fd, &c, e.offset).map_err(|source| CheckError::Io {
            what: what("write", e),
            source,
        })?;
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    f.sync_data().map_err(io_err("fdatasync"))?;
    for e in &region_b {
        let layout = e.layout.other();
        let c = b.take(layout, e.len);
        b.poison(&c);
        let back = guest::layout::Extent { layout, ..*e };
        b.read(fd, &c, e.offset).map_err(|source| CheckError::Io {
            what: what("read back", &back),
            source,
        })?;
        mismatch(b.mismatch(&c, gseed, e.offset), || what("read back", &back))?;
        done.requests += 1;
        done.bytes += e.len as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_the_scripts_and_people_expect() {
        let e = CheckError::Thread {
            thread: 1,
            source: Box::new(CheckError::Mismatch {
                what: "read 4 KiB at 0x1000 (scattered)".into(),
                at: 0x1008,
                want: 0xab,
                got: 0,
            }),
        };
        assert_eq!(
            e.to_string(),
            "thread 1: read 4 KiB at 0x1000 (scattered): byte 0x1008 is 0x00, expected 0xab"
        );
        let e = CheckError::Io {
            what: "/dev/vda".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(e.to_string().starts_with("/dev/vda: "));
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            Usage::NoCommand.to_string(),
            "usage: blk-check fill|run|verify [options]"
        );
        assert_eq!(Usage::Threads.to_string(), "--threads must be 1..=4");
        let n = Usage::Number {
            flag: "--seed",
            source: "x".parse::<u64>().unwrap_err(),
        };
        assert_eq!(n.to_string(), "--seed: invalid digit found in string");
    }
}
