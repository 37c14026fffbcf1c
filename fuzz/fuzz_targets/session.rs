//! Session fuzzing: bytes decoded into a sequence of vhost-user operations, played against a
//! real in-process back-end (`backend::Server` serving `devices::Blk`) while a virtio-blk
//! driver keeps I/O in flight and checks data, poison and liveness after every step.
//!
//! The harness is `crates/devices/tests/session_harness/mod.rs` (shared with the proptest
//! `crates/devices/tests/session_fuzz.rs`); this file only decodes bytes into its [`Op`]s. A
//! violation the harness reports is turned into a panic, which libFuzzer records as a crash.
//! It must not check anything itself, nor keep state between inputs (each input builds its own
//! back-end, disk and guest memory, and ends its connection).
//!
//! Input layout (short inputs read as zeros past their end):
//! - byte 0: bit 0 ACCESS_PLATFORM, bit 1 RING_EVENT_IDX, bits 2-3 the IOTLB capacity
//!   (16, 64, 256, 2048), bits 4-6 the depth minus one;
//! - bytes 1-8: the driver's seed (little-endian);
//! - then operations, at most [`MAX_OPS`]: an opcode byte (modulo the number of kinds) and its
//!   arguments, each a byte unless said otherwise (see [`decode`]).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/devices/tests/session_harness/mod.rs"]
mod session_harness;

use session_harness::{Config, Op};

/// Operations per input.
const MAX_OPS: usize = 48;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        u64::from_le_bytes(v)
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// The configuration and operations `data` spells.
fn decode(data: &[u8]) -> (Config, Vec<Op>) {
    let mut b = Bytes(data);
    let flags = b.u8();
    let cfg = Config {
        iommu: flags & 1 != 0,
        event_idx: flags & 2 != 0,
        iotlb_capacity: [16, 64, 256, 2048][usize::from(flags >> 2 & 3)],
        depth: usize::from(flags >> 4 & 7) + 1,
        seed: b.u64(),
    };
    let mut ops = Vec::new();
    while !b.0.is_empty() && ops.len() < MAX_OPS {
        let op = match b.u8() % 16 {
            0 => Op::Pump(b.u8() % 8),
            // SET_MEM_TABLE: a mask of the 35 slots (8 bytes).
            1 => Op::SetMemTable(b.u64()),
            2 => Op::AddRegion(b.u8()),
            3 => {
                let slot = b.u8();
                Op::RemRegion {
                    slot: slot & 0x7f,
                    wrong_size: slot & 0x80 != 0,
                }
            }
            4 => {
                let f = b.u8();
                Op::SetFeatures {
                    iommu: f & 1 != 0,
                    event_idx: f & 2 != 0,
                }
            }
            5 => Op::StopQueue { restart: b.bool() },
            6 => match b.u8() % 4 {
                0 => Op::NewKick,
                1 => Op::NewCall(b.bool()),
                2 => Op::NewErr(b.bool()),
                _ => Op::Enable(b.bool()),
            },
            7 | 8 => Op::Unmap {
                req: b.u8(),
                page: b.u8(),
                how: b.u8(),
            },
            9 => Op::Remap {
                req: b.u8(),
                page: b.u8(),
            },
            // Flush: a kind and a boundary (8 bytes).
            10 => Op::Flush {
                kind: b.u8(),
                at: b.u64(),
            },
            11 | 12 => Op::EdgeIotlb {
                update: b.bool(),
                iova: b.u8(),
                size: b.u8(),
                uaddr: b.u8(),
                perm: b.u8(),
            },
            // Hostile: a request byte and a value (8 bytes).
            13 | 14 => Op::Hostile {
                what: b.u8(),
                value: b.u64(),
            },
            _ => Op::Reconnect,
        };
        ops.push(op);
    }
    (cfg, ops)
}

fuzz_target!(|data: &[u8]| {
    let (cfg, ops) = decode(data);
    if let Err(e) = session_harness::run(cfg, &ops) {
        panic!("session fuzz violation: {e}\n  config {cfg:?}\n  ops {ops:#?}");
    }
});
