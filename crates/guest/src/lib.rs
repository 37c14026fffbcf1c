//! Programs that run inside the end-to-end guest, a Linux VM under QEMU, to check the device
//! side of the project through a real driver.
//!
//! `blk-check` drives a virtio-blk disk as an application would: O_DIRECT reads and writes of
//! 4 KiB to 4 MiB, from scattered 4 KiB pages and from physically contiguous huge pages, on
//! one thread per CPU (so a multi-queue device gets requests on every queue), and checks every
//! byte both ways. The same binary fills the disk image on the host before the run and
//! verifies it after.
//!
//! `net-check` sends frames of 60 bytes up to the MTU on an AF_PACKET socket through the
//! guest's virtio_net and checks that each comes back from a loopback peer byte for byte,
//! with its MAC addresses swapped.
//!
//! `blk-migrate` checks a back-end's dirty logging through a live migration: it keeps O_DIRECT
//! reads going into 2048 buffers (the device writes them, QEMU cannot see it) while the host
//! migrates the VM, and on the destination checks that every buffer holds the block it last
//! read and every block it wrote reads back. The same binary fills the image, signals the
//! end of the migration, and checks on the host that the read region was never written.
//!
//! - [`layout`]: where each check lives on the disk, and the data pattern (a function of a
//!   seed and the disk offset, so both sides compute it);
//! - [`direct`]: O_DIRECT I/O from page-aligned memory: pools of 4 KiB pages and huge pages;
//! - [`frames`]: the frames `net-check` sends, and the check of what comes back;
//! - [`migrate`]: `blk-migrate`'s disk, the order of its requests, and the verdict on what its
//!   buffers and slots hold after the switch-over.
//!
//! This crate depends on none of the project's other crates: it is the driver's side, and it
//! runs where they do not. It must stay a static binary with no runtime dependency (the guest
//! has no libc).

pub mod direct;
pub mod frames;
pub mod layout;
pub mod migrate;
