//! `vhost-iotlb kernel-net`: drive the kernel's `/dev/vhost-net` behind our vIOMMU and show
//! its device IOTLB working, case by case, then measure it.
//!
//! Cases (each named; the first that fails ends the run with its name; the table is
//! [`cases::CASES`]):
//! - `used-ring`: attaching the tap makes the kernel ask for the used ring read-only; we
//!   answer with the mapping's permission (read-write), so its later writes go through;
//! - `tx-cold`: frames at fresh IOVAs, no IOTLB entry to start with, every MISS answered,
//!   frames checked byte for byte on an `AF_PACKET` socket bound to the tap, each buffer
//!   unmapped (an INVALIDATE) after use;
//! - `cross-page`: a buffer crossing into a page with no entry yet, its second page at a
//!   guest page far from the first: a second MISS at exactly the page boundary;
//! - `rx`: frames injected on the tap land in translated buffers; nothing else in guest
//!   memory changes but those buffers and the used ring;
//! - `poison`: INVALIDATE a data page, poison its old page, map the IOVA to another page
//!   with new content: the new content goes out, never the old;
//! - `prepush`: UPDATEs written before the kick: no MISS at all;
//! - the kernel's side of the API, each shown on this kernel: `msg-format`, `write-rules`,
//!   `update-no-replace`, `invalidate-whole`, `capacity`, `set-features`, `invalidate-all`,
//!   `no-mem-table`;
//! - `both-transports`: one vIOMMU serving this kernel device and a vhost-user back-end (ours,
//!   in this process) through one interface: one IOVA range mapped, faulted into both,
//!   unmapped from both.
//!
//! Then frames per second with ACCESS_PLATFORM off, on with warm mappings, strict (map and
//! unmap per frame) and pre-push, and the MISS round trip (MISS read to the frame done).
//!
//! `--broken requested-perm|no-invalidate` answers wrongly on purpose, to show that a named
//! case catches it. Meant to run as root in a throwaway guest (`scripts/kernel-net.sh`): it
//! creates tap devices. Guest memory is this process's own (a memfd mapping); IOVAs differ
//! from its addresses, and ring pages contiguous in IOVA sit at scattered guest pages.
//!
//! This crate is the virtio-net *driver* side (rings, buffers, tap, checks). It must not
//! speak the IOTLB protocol itself nor keep page tables: the protocol lives in
//! `frontend::kernel`, the page tables in `frontend::viommu`, the driver ring in
//! `virtq::testing`, the message layouts in `wire`. The one exception is [`msg`]: raw
//! messages the cases write on purpose to see how the kernel takes them.
//!
//! - [`args`]: the command-line options; [`layout`]: guest memory, ring and IOVA layout;
//! - [`frames`]: the test frames; [`sys`]: the tap, its packet socket, eventfds (all the
//!   `unsafe` of the crate);
//! - [`net`]: one vhost-net device with its rings, tap and vIOMMU; [`msg`]: raw messages;
//! - [`cases`]: the table of named cases; [`measure`]: the measurement;
//! - [`error`]: what can go wrong ([`KernelNetError`]).

#![deny(unsafe_code)]

pub mod args;
pub mod cases;
pub mod error;
pub mod frames;
pub mod layout;
pub mod measure;
pub mod msg;
pub mod net;
#[allow(unsafe_code)]
pub mod sys;

pub use args::{Broken, KernelNetArgs};
pub use error::KernelNetError;

/// Run the cases, then the measurements; print what happened at each step.
pub fn run(args: &KernelNetArgs) -> Result<(), KernelNetError> {
    if args.frames == 0 || args.frames > 1024 {
        return Err(KernelNetError::Frames(args.frames));
    }
    let net = net::Net::setup(args, true)?;
    println!(
        "kernel-net: /dev/vhost-net up on tap {}, message format v2={}, MISSes while \
         attaching, in order: {}",
        net.tap.name,
        net.dev.format().v2,
        net.attach_order().join(" ")
    );
    let mut ctx = cases::Ctx {
        args,
        net,
        pages: layout::Pages::new(),
    };
    cases::run_all(&mut ctx)?;
    measure::run(args)?;
    println!("kernel-net: PASS");
    Ok(())
}
