//! Where things sit: the guest RAM size, the guest-physical pages of the rings and buffers,
//! the IOVAs the cases use, the queue size, and the round-robin buffer pages ([`Pages`]).
//! Constants and page arithmetic only: no I/O, no device.

/// Page size (the vIOMMU's and the kernel's granule here).
pub use virtq::testing::PAGE;

/// Queue size of both rings.
pub const QSIZE: u16 = 64;
/// IOVA of the first ring page.
pub const RING_IOVA: u64 = 0x7_0000_0000;
/// IOVA of the cross-page buffer.
pub const CROSS_IOVA: u64 = 0x7_1000_0000;
/// Guest RAM size.
pub const RAM: u64 = 8 << 20;
/// Guest-physical pages of the rings (deliberately out of order): RX desc, avail, used,
/// then TX desc, avail, used. They are mapped at consecutive IOVA pages.
pub const RING_GPA: [u64; 6] = [0x6000, 0x11000, 0x3000, 0x9000, 0x2000, 0x14000];
/// What each page of [`RING_GPA`] holds (for messages).
pub const RING_NAMES: [&str; 6] = [
    "rx-desc", "rx-avail", "rx-used", "tx-desc", "tx-avail", "tx-used",
];
/// Guest-physical pages for buffers: `BUF_GPA..RAM`.
pub const BUF_GPA: u64 = 0x40000;

/// The RX queue's index.
pub const RX: u32 = 0;
/// The TX queue's index.
pub const TX: u32 = 1;

/// The page of `addr`.
pub const fn page_of(addr: u64) -> u64 {
    addr & !(PAGE - 1)
}

/// Buffer pages, handed out round-robin, two apart (the pages between stay untouched).
#[derive(Debug)]
pub struct Pages(u64);

impl Pages {
    /// From the first buffer page.
    pub fn new() -> Self {
        Pages(BUF_GPA)
    }

    /// The next buffer page.
    pub fn next_page(&mut self) -> u64 {
        let p = self.0;
        self.0 = if p + 4 * PAGE > RAM {
            BUF_GPA
        } else {
            p + 2 * PAGE
        };
        p
    }
}

impl Default for Pages {
    fn default() -> Self {
        Self::new()
    }
}
