//! Reading and writing a chain's buffers.
//!
//! A [`Reader`] walks the readable segments of a chain and a [`Writer`] the writable ones, so
//! a device can parse a request header and fill in a status without caring where mappings
//! end. Bytes move only through vm-memory's volatile accessors. For zero-copy I/O, both hand
//! out the remaining bytes as vm-memory `VolatileSlice`s, from which a device builds the
//! `iovec`s of a positioned vectored read or write (the pointers stay valid while the slices
//! live). No Rust reference to guest memory is ever created here.

use iotlb::Segment;
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

/// A buffer access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// The chain has fewer bytes left than asked for.
    #[error("needs {wanted} bytes, {left} left in the chain")]
    Short {
        /// Bytes asked for.
        wanted: u64,
        /// Bytes left.
        left: u64,
    },
    /// Guest memory refused the access.
    #[error("guest memory access at {gpa:#x} failed: {reason}")]
    Memory {
        /// Guest-physical address.
        gpa: u64,
        /// vm-memory's message.
        reason: String,
    },
}

/// The slices type of guest memory `M`.
pub type Slice<'a, M> =
    VolatileSlice<'a, BS<'a, <<M as GuestMemoryBackend>::R as GuestMemoryRegion>::B>>;

/// A cursor over segments.
#[derive(Debug, Clone)]
struct Cursor<'a> {
    segs: &'a [Segment],
    /// Offset in `segs[0]`.
    off: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        let mut c = Cursor { segs, off: 0 };
        c.skip_empty();
        c
    }

    fn skip_empty(&mut self) {
        while let Some((first, rest)) = self.segs.split_first() {
            if self.off < first.len {
                break;
            }
            self.segs = rest;
            self.off = 0;
        }
    }

    fn left(&self) -> u64 {
        self.segs
            .iter()
            .map(|s| s.len)
            .fold(0u64, u64::saturating_add)
            .saturating_sub(self.off)
    }

    /// The next piece: guest-physical address and length, at most `max` bytes.
    fn next_piece(&mut self, max: u64) -> Option<(u64, u64)> {
        self.skip_empty();
        let seg = self.segs.first()?;
        let n = (seg.len - self.off).min(max);
        let piece = (seg.addr + self.off, n);
        self.off += n;
        self.skip_empty();
        Some(piece)
    }

    /// Walk `n` bytes piece by piece, failing before doing anything if there are fewer.
    fn take(
        &mut self,
        n: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), BufferError>,
    ) -> Result<(), BufferError> {
        let left = self.left();
        if n > left {
            return Err(BufferError::Short { wanted: n, left });
        }
        let mut done = 0;
        while done < n {
            let Some((gpa, len)) = self.next_piece(n - done) else {
                break;
            };
            f(gpa, len, done)?;
            done += len;
        }
        Ok(())
    }
}

fn mem_err(gpa: u64, e: impl std::fmt::Display) -> BufferError {
    BufferError::Memory {
        gpa,
        reason: e.to_string(),
    }
}

/// Reads a chain's driver-to-device bytes.
#[derive(Debug)]
pub struct Reader<'a, M> {
    mem: &'a M,
    cur: Cursor<'a>,
}

impl<'a, M: GuestMemoryBackend> Reader<'a, M> {
    /// A reader over `segs` of `mem`.
    pub fn new(mem: &'a M, segs: &'a [Segment]) -> Self {
        Reader {
            mem,
            cur: Cursor::new(segs),
        }
    }

    /// Bytes left.
    pub fn available(&self) -> u64 {
        self.cur.left()
    }

    /// Fill `buf` from the chain, or fail (consuming nothing) if it is shorter.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), BufferError> {
        let mem = self.mem;
        self.cur.take(buf.len() as u64, |gpa, len, at| {
            let at = at as usize;
            let end = at + len as usize;
            mem.read_slice(&mut buf[at..end], GuestAddress(gpa))
                .map_err(|e| mem_err(gpa, e))
        })
    }

    /// Read `N` bytes.
    pub fn read_array<const N: usize>(&mut self) -> Result<[u8; N], BufferError> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, n: u64) -> Result<(), BufferError> {
        self.cur.take(n, |_, _, _| Ok(()))
    }

    /// The next `n` bytes as volatile slices (for a vectored write to a file), consumed.
    pub fn slices(&mut self, n: u64) -> Result<Vec<Slice<'a, M>>, BufferError> {
        take_slices(self.mem, &mut self.cur, n)
    }

    /// Hand the next `n` bytes to `f` slice by slice, without allocating; consumed.
    pub fn visit_slices(&mut self, n: u64, f: impl FnMut(Slice<'a, M>)) -> Result<(), BufferError> {
        visit_slices(self.mem, &mut self.cur, n, f)
    }
}

/// Writes a chain's device-to-driver bytes.
#[derive(Debug)]
pub struct Writer<'a, M> {
    mem: &'a M,
    cur: Cursor<'a>,
    written: u64,
}

impl<'a, M: GuestMemoryBackend> Writer<'a, M> {
    /// A writer over `segs` of `mem`.
    pub fn new(mem: &'a M, segs: &'a [Segment]) -> Self {
        Writer {
            mem,
            cur: Cursor::new(segs),
            written: 0,
        }
    }

    /// Bytes left.
    pub fn available(&self) -> u64 {
        self.cur.left()
    }

    /// Bytes written (or skipped) so far: the used length to report.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Write all of `buf`, or fail (writing nothing) if the chain is shorter.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), BufferError> {
        let mem = self.mem;
        self.cur.take(buf.len() as u64, |gpa, len, at| {
            let at = at as usize;
            mem.write_slice(&buf[at..at + len as usize], GuestAddress(gpa))
                .map_err(|e| mem_err(gpa, e))
        })?;
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Skip `n` bytes (counted as written: the device filled them by other means).
    pub fn skip(&mut self, n: u64) -> Result<(), BufferError> {
        self.cur.take(n, |_, _, _| Ok(()))?;
        self.written += n;
        Ok(())
    }

    /// The next `n` bytes as volatile slices (for a vectored read from a file), consumed and
    /// counted as written.
    pub fn slices(&mut self, n: u64) -> Result<Vec<Slice<'a, M>>, BufferError> {
        let s = take_slices(self.mem, &mut self.cur, n)?;
        self.written += n;
        Ok(s)
    }

    /// Hand the next `n` bytes to `f` slice by slice, without allocating; consumed and
    /// counted as written.
    pub fn visit_slices(&mut self, n: u64, f: impl FnMut(Slice<'a, M>)) -> Result<(), BufferError> {
        visit_slices(self.mem, &mut self.cur, n, f)?;
        self.written += n;
        Ok(())
    }
}

fn take_slices<'a, M: GuestMemoryBackend>(
    mem: &'a M,
    cur: &mut Cursor<'a>,
    n: u64,
) -> Result<Vec<Slice<'a, M>>, BufferError> {
    let mut out = Vec::new();
    visit_slices(mem, cur, n, |s| out.push(s))?;
    Ok(out)
}

fn visit_slices<'a, M: GuestMemoryBackend>(
    mem: &'a M,
    cur: &mut Cursor<'a>,
    n: u64,
    mut f: impl FnMut(Slice<'a, M>),
) -> Result<(), BufferError> {
    cur.take(n, |gpa, len, _| {
        for s in mem.get_slices(GuestAddress(gpa), len as usize) {
            f(s.map_err(|e| mem_err(gpa, e))?);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn reads_and_writes_across_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [seg(0x100, 3), seg(0x900, 0), seg(0x2000, 5)];
        let mut w = Writer::new(&mem, &segs);
        assert_eq!(w.available(), 8);
        w.write_all(b"abc").unwrap();
        w.write_all(b"de").unwrap();
        assert!(matches!(
            w.write_all(b"fghi"),
            Err(BufferError::Short { wanted: 4, left: 3 })
        ));
        w.write_all(b"fgh").unwrap();
        assert_eq!(w.written(), 8);
        assert_eq!(
            mem.read_obj::<[u8; 3]>(GuestAddress(0x100)).unwrap(),
            *b"abc"
        );
        assert_eq!(
            mem.read_obj::<[u8; 5]>(GuestAddress(0x2000)).unwrap(),
            *b"defgh"
        );

        let mut r = Reader::new(&mem, &segs);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"abcd");
        r.skip(1).unwrap();
        assert_eq!(r.read_array::<3>().unwrap(), *b"fgh");
        assert_eq!(r.available(), 0);
        assert!(r.read_exact(&mut b).is_err());

        let mut r = Reader::new(&mem, &segs);
        let slices = r.slices(6).unwrap();
        assert_eq!(
            slices.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![3, 3]
        );
    }

    #[test]
    fn outside_memory_is_an_error_not_a_panic() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let segs = [seg(0xff8, 16)];
        let mut r = Reader::new(&mem, &segs);
        let mut b = [0u8; 16];
        assert!(matches!(
            r.read_exact(&mut b),
            Err(BufferError::Memory { .. })
        ));
    }
}
