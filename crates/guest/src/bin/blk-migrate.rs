//! `blk-migrate`: a vhost-user-blk back-end's dirty logging, checked through a live migration.
//!
//! ```text
//! blk-migrate fill   --disk IMAGE --seed N                          (host, before)
//! blk-migrate run    [--dev /dev/vda] --seed N [--buffers B] [--timeout S]   (guest)
//! blk-migrate signal --disk IMAGE --seed N                          (host, after the switch-over)
//! blk-migrate verify --disk IMAGE --seed N                          (host, at the end)
//! ```
//!
//! `fill` creates the 64 MiB image of `guest::migrate`: region R holds the pattern, the
//! control sector and region W zeros. `run`, in the guest, fills B page-sized buffers with
//! their markers, says `blk-migrate: ready buffers=B`, then reads region R into them in turn
//! with O_DIRECT (a new block each round) and writes a slot of region W every 8 reads, until
//! the control sector carries the signal; then it checks every buffer and every slot written
//! and prints one PASS or FAIL line. After the markers, this program's CPU never stores into
//! the buffers: only the device does, so a page the source's back-end wrote without logging
//! it reaches the destination stale, and the check names it. `signal` writes the signal;
//! `verify` checks that region R was never written.
//!
//! Exit status: 0 pass, 1 a check or a system call failed (one `blk-migrate: FAIL` line on
//! stdout), 2 a bad command line (its usage error on stderr), 3 no signal before `--timeout`.
//! This file parses, performs the I/O and prints; what the bytes should be, and what wrong
//! ones mean, is `guest::migrate`'s.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::num::ParseIntError;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use guest::layout::{fill, first_mismatch};
use guest::migrate::{
    block_offset, fill_slot, is_signal, signal, slot_offset, Op, Page, Report, Schedule, BLOCK,
    CONTROL, DEFAULT_BUFFERS, DISK, MAX_BUFFERS, REGION_R, R_BLOCKS,
};

/// How long `run` waits for the device node to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// `run`'s `--timeout` unless told otherwise, in seconds.
const DEFAULT_TIMEOUT: u64 = 600;

/// The four commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Fill,
    Run,
    Signal,
    Verify,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Fill => "fill",
            Command::Run => "run",
            Command::Signal => "signal",
            Command::Verify => "verify",
        }
    }
}

/// A command line `parse` refuses (exit status 2).
#[derive(Debug)]
enum Usage {
    /// No command at all.
    NoCommand,
    /// A command other than fill, run, signal and verify.
    UnknownCommand(String),
    /// A flag was the last word.
    NeedsValue(String),
    /// A flag's value is not a number.
    Number {
        /// The flag.
        flag: &'static str,
        /// Why.
        source: ParseIntError,
    },
    /// `--buffers` out of 1..=[`MAX_BUFFERS`].
    Buffers,
    /// `--timeout 0`.
    Timeout,
    /// A flag we do not have.
    UnknownOption(String),
    /// A flag of another command.
    NotFor {
        /// The flag.
        flag: String,
        /// The command.
        cmd: Command,
    },
    /// A flag the command needs is missing.
    Missing {
        /// The flag.
        flag: &'static str,
        /// The command.
        cmd: Command,
    },
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Usage::NoCommand => write!(f, "usage: blk-migrate fill|run|signal|verify [options]"),
            Usage::UnknownCommand(cmd) => write!(
                f,
                "unknown command {cmd} (usage: blk-migrate fill|run|signal|verify [options])"
            ),
            Usage::NeedsValue(flag) => write!(f, "{flag} needs a value"),
            Usage::Number { flag, source } => write!(f, "{flag}: {source}"),
            Usage::Buffers => write!(f, "--buffers must be 1..={MAX_BUFFERS}"),
            Usage::Timeout => write!(f, "--timeout must be at least 1 (seconds)"),
            Usage::UnknownOption(flag) => write!(f, "unknown option {flag}"),
            Usage::NotFor { flag, cmd } => write!(f, "{flag} is not an option of {}", cmd.name()),
            Usage::Missing { flag, cmd } => write!(f, "{} needs {flag}", cmd.name()),
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

/// Why a command failed: a `blk-migrate: FAIL` line, exit status 1 (3 for [`Fail::NoSignal`]).
#[derive(Debug)]
enum Fail {
    /// A system call on the image or the device failed.
    Io {
        /// What was being done, on what.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// The image or device is shorter than the layout.
    TooSmall {
        /// Which.
        path: String,
        /// Its length in bytes.
        len: u64,
    },
    /// The schedule named a buffer we do not have (a bug here, not in the device).
    NoBuffer(usize),
    /// The control sector never carried the signal.
    NoSignal {
        /// Seconds waited.
        secs: u64,
    },
    /// Buffers or slots wrong after the run.
    Wrong {
        /// Which, and the first of each (boxed: the other failures are small).
        report: Box<Report>,
        /// Reads done.
        reads: u64,
        /// Writes done.
        writes: u64,
    },
    /// Region R changed on the host.
    Changed {
        /// The disk offset of the first wrong byte.
        at: u64,
        /// The byte the pattern has there.
        want: u8,
        /// The byte found.
        got: u8,
        /// Blocks of region R that differ.
        blocks: u64,
    },
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Io { what, source } => write!(f, "{what}: {source}"),
            Fail::TooSmall { path, len } => write!(
                f,
                "{path}: {len} bytes, the layout needs {DISK} (made by blk-migrate fill)"
            ),
            Fail::NoBuffer(k) => write!(f, "internal: no buffer {k}"),
            Fail::NoSignal { secs } => write!(f, "no migration signal after {secs} s"),
            Fail::Wrong {
                report,
                reads,
                writes,
            } => write!(f, "{report} (after reads={reads} writes={writes})"),
            Fail::Changed {
                at,
                want,
                got,
                blocks,
            } => write!(
                f,
                "host: region R changed: byte {at:#x} is {got:#04x}, expected {want:#04x} \
                 ({blocks} of {R_BLOCKS} blocks differ)"
            ),
        }
    }
}

impl std::error::Error for Fail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Fail::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// [`Fail::Io`] of `what`, for `map_err` (where `what` is cheap, outside loops).
fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Fail {
    let what = what.into();
    move |source| Fail::Io { what, source }
}

#[derive(Debug)]
struct Args {
    cmd: Command,
    path: String,
    seed: u64,
    buffers: usize,
    timeout: u64,
}

fn number<T: std::str::FromStr<Err = ParseIntError>>(
    flag: &'static str,
    value: &str,
) -> Result<T, Usage> {
    value
        .parse()
        .map_err(|source| Usage::Number { flag, source })
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, Usage> {
    let cmd = match it.next().as_deref() {
        None => return Err(Usage::NoCommand),
        Some("fill") => Command::Fill,
        Some("run") => Command::Run,
        Some("signal") => Command::Signal,
        Some("verify") => Command::Verify,
        Some(other) => return Err(Usage::UnknownCommand(other.to_string())),
    };
    let guest = cmd == Command::Run;
    let mut path = guest.then(|| "/dev/vda".to_string());
    let mut seed = None;
    let mut buffers = DEFAULT_BUFFERS;
    let mut timeout = DEFAULT_TIMEOUT;
    while let Some(flag) = it.next() {
        let ours = match flag.as_str() {
            "--seed" => true,
            "--disk" => !guest,
            "--dev" | "--buffers" | "--timeout" => guest,
            _ => return Err(Usage::UnknownOption(flag)),
        };
        if !ours {
            return Err(Usage::NotFor { flag, cmd });
        }
        let Some(value) = it.next() else {
            return Err(Usage::NeedsValue(flag));
        };
        match flag.as_str() {
            "--seed" => seed = Some(number("--seed", &value)?),
            "--buffers" => {
                buffers = number("--buffers", &value)?;
                if !(1..=MAX_BUFFERS).contains(&buffers) {
                    return Err(Usage::Buffers);
                }
            }
            "--timeout" => {
                timeout = number("--timeout", &value)?;
                if timeout == 0 {
                    return Err(Usage::Timeout);
                }
            }
            _ => path = Some(value),
        }
    }
    Ok(Args {
        cmd,
        path: path.ok_or(Usage::Missing {
            flag: "--disk",
            cmd,
        })?,
        seed: seed.ok_or(Usage::Missing {
            flag: "--seed",
            cmd,
        })?,
        buffers,
        timeout,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blk-migrate: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.cmd {
        Command::Fill => host_fill(&args),
        Command::Run => guest_run(&args),
        Command::Signal => host_signal(&args),
        Command::Verify => host_verify(&args),
    };
    match result {
        Ok(line) => {
            println!("blk-migrate: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("blk-migrate: FAIL {e}");
            match e {
                Fail::NoSignal { .. } => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// A new image: region R's pattern, zeros elsewhere.
fn host_fill(a: &Args) -> Result<String, Fail> {
    let f = File::create(&a.path).map_err(io_err(&a.path))?;
    // Truncated by create, so everything past region R reads as zeros.
    f.set_len(DISK)
        .map_err(io_err(format!("{}: set_len {DISK}", a.path)))?;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..REGION_R).step_by(buf.len()) {
        fill(&mut buf, a.seed, off);
        f.write_all_at(&buf, off).map_err(|source| Fail::Io {
            what: format!("{}: write at {off:#x}", a.path),
            source,
        })?;
    }
    f.sync_all().map_err(io_err(format!("{}: fsync", a.path)))?;
    Ok(format!("filled {}", a.path))
}

/// The length of `f` (a file or a block device) must hold the layout.
fn check_len(f: &mut File, path: &str) -> Result<(), Fail> {
    let len = f
        .seek(SeekFrom::End(0))
        .map_err(io_err(format!("{path}: seek to the end")))?;
    if len < DISK {
        return Err(Fail::TooSmall {
            path: path.to_string(),
            len,
        });
    }
    Ok(())
}

/// Write the signal into the control sector of an existing image, durably.
fn host_signal(a: &Args) -> Result<String, Fail> {
    // Never created: a wrong path must fail, not leave a new file behind.
    let mut f = OpenOptions::new()
        .write(true)
        .open(&a.path)
        .map_err(io_err(&a.path))?;
    check_len(&mut f, &a.path)?;
    f.write_all_at(&signal(a.seed), CONTROL)
        .map_err(io_err(format!("{}: write at {CONTROL:#x}", a.path)))?;
    f.sync_data()
        .map_err(io_err(format!("{}: fdatasync", a.path)))?;
    Ok("signalled".to_string())
}

/// Region R must still be the pattern: the guest only ever read it.
fn host_verify(a: &Args) -> Result<String, Fail> {
    let mut f = File::open(&a.path).map_err(io_err(&a.path))?;
    check_len(&mut f, &a.path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut first = None;
    let mut blocks = 0u64;
    for off in (0..REGION_R).step_by(buf.len()) {
        f.read_exact_at(&mut buf, off).map_err(|source| Fail::Io {
            what: format!("{}: read at {off:#x}", a.path),
            source,
        })?;
        for (at, block) in (off..).step_by(BLOCK).zip(buf.chunks(BLOCK)) {
            if let Some(m) = first_mismatch(block, a.seed, at) {
                first = first.or(Some(m));
                blocks += 1;
            }
        }
    }
    match first {
        None => Ok("host PASS".to_string()),
        Some((at, want, got)) => Err(Fail::Changed {
            at,
            want,
            got,
            blocks,
        }),
    }
}

/// Open the device for O_DIRECT reads and writes, once its node exists (the driver may still
/// be probing when the program starts).
fn open_device(path: &str) -> Result<File, Fail> {
    let start = Instant::now();
    while !Path::new(path).exists() && start.elapsed() < DEVICE_WAIT {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(io_err(format!("{path}: open O_RDWR|O_DIRECT")))?;
    check_len(&mut f, path)?;
    Ok(f)
}

fn read_block(f: &File, page: &mut Page, offset: u64, what: &str) -> Result<(), Fail> {
    f.read_exact_at(&mut page.0, offset)
        .map_err(|source| Fail::Io {
            what: format!("{what} at {offset:#x}"),
            source,
        })
}

fn guest_run(a: &Args) -> Result<String, Fail> {
    let f = open_device(&a.path)?;
    // The only CPU stores into the buffers: the markers, before the host starts migrating.
    let mut buffers: Vec<Page> = (0..a.buffers).map(Page::marker).collect();
    // The pages the CPU fills (writes) or the device fills and nobody checks for staleness.
    let mut out = Box::new(Page::zeroed());
    let mut control = Box::new(Page::zeroed());
    println!("blk-migrate: ready buffers={}", a.buffers);
    io::stdout().flush().map_err(io_err("stdout: flush"))?;

    let start = Instant::now();
    let timeout = Duration::from_secs(a.timeout);
    let mut plan = Schedule::new(a.buffers);
    loop {
        if start.elapsed() >= timeout {
            return Err(Fail::NoSignal { secs: a.timeout });
        }
        match plan.next_op() {
            Op::Read { buffer, block, .. } => {
                let page = buffers.get_mut(buffer).ok_or(Fail::NoBuffer(buffer))?;
                read_block(&f, page, block_offset(block), "read into a buffer")?;
            }
            Op::Write { slot, version } => {
                fill_slot(&mut out.0, a.seed, slot, version);
                let at = slot_offset(slot);
                f.write_all_at(&out.0, at).map_err(|source| Fail::Io {
                    what: format!("write slot {slot} at {at:#x}"),
                    source,
                })?;
            }
            Op::Poll => {
                read_block(&f, &mut control, CONTROL, "read the control sector")?;
                if is_signal(&control.0, a.seed) {
                    break;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();

    let mut report = Report::default();
    for (k, page) in buffers.iter().enumerate() {
        report
            .buffers
            .check_buffer(&page.0, a.seed, k, plan.held(k));
    }
    for (slot, version) in plan.written() {
        // Poisoned first: a read that does not land leaves this, not the last slot written.
        out.0.fill(0xa5);
        read_block(&f, &mut out, slot_offset(slot), "read back slot")?;
        report.slots.check_slot(&out.0, a.seed, slot, version);
    }
    if !report.passed() {
        return Err(Fail::Wrong {
            report: Box::new(report),
            reads: plan.reads(),
            writes: plan.writes(),
        });
    }
    Ok(format!(
        "PASS buffers={} reads={} writes={} rounds={} seconds={secs:.1}",
        a.buffers,
        plan.reads(),
        plan.writes(),
        plan.rounds()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Args, Usage> {
        parse(line.split_whitespace().map(str::to_string))
    }

    #[test]
    fn command_lines_parse_or_say_why_not() {
        let a = args("run --seed 5").unwrap();
        assert_eq!(
            (a.cmd, a.path.as_str(), a.seed),
            (Command::Run, "/dev/vda", 5)
        );
        assert_eq!((a.buffers, a.timeout), (DEFAULT_BUFFERS, DEFAULT_TIMEOUT));
        let a = args("run --dev /dev/vdb --seed 1 --buffers 8192 --timeout 30").unwrap();
        assert_eq!(
            (a.path.as_str(), a.buffers, a.timeout),
            ("/dev/vdb", 8192, 30)
        );
        let a = args("signal --disk x.img --seed 3").unwrap();
        assert_eq!((a.cmd, a.path.as_str()), (Command::Signal, "x.img"));
        let err = |line: &str| args(line).unwrap_err().to_string();
        assert_eq!(
            err(""),
            "usage: blk-migrate fill|run|signal|verify [options]"
        );
        assert!(err("check").starts_with("unknown command check"));
        assert_eq!(err("fill --seed 1"), "fill needs --disk");
        assert_eq!(err("verify --disk x"), "verify needs --seed");
        assert_eq!(err("run --seed"), "--seed needs a value");
        assert_eq!(err("run --seed x"), "--seed: invalid digit found in string");
        assert_eq!(
            err("run --seed 1 --buffers 0"),
            "--buffers must be 1..=8192"
        );
        assert_eq!(
            err("run --seed 1 --buffers 8193"),
            "--buffers must be 1..=8192"
        );
        assert_eq!(
            err("run --seed 1 --timeout 0"),
            "--timeout must be at least 1 (seconds)"
        );
        assert_eq!(err("run --disk x"), "--disk is not an option of run");
        assert_eq!(
            err("fill --buffers 3"),
            "--buffers is not an option of fill"
        );
        assert_eq!(err("fill --quick"), "unknown option --quick");
    }

    #[test]
    fn failures_read_as_the_script_expects() {
        assert_eq!(
            Fail::NoSignal { secs: 600 }.to_string(),
            "no migration signal after 600 s"
        );
        let e = Fail::Io {
            what: "read into a buffer at 0x1000".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(e.to_string().starts_with("read into a buffer at 0x1000: "));
        assert!(std::error::Error::source(&e).is_some());
        let e = Fail::Changed {
            at: 0x2008,
            want: 1,
            got: 0,
            blocks: 1,
        };
        assert_eq!(
            e.to_string(),
            "host: region R changed: byte 0x2008 is 0x00, expected 0x01 (1 of 8192 blocks differ)"
        );
    }
}
