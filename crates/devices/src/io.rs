//! Positioned vectored I/O between a file and guest memory, without copies.
//!
//! The segments of a request become raw `iovec`s pointing straight into the mapped guest
//! memory, handed to `preadv`/`pwritev`: the kernel moves the data, as a DMA engine would,
//! and no Rust reference to guest memory is ever made (which the project forbids: guest
//! memory changes under us). Short transfers are resumed; more than `IOV_MAX` segments are
//! sent in batches. The `iovec` buffer is the caller's, reused from request to request.
//!
//! `unsafe` lives here (the two system calls) and at the two call sites in `blk.rs`, which
//! promise that the memory behind every pushed slice is still mapped.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Segments per system call (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// A reusable list of `iovec`s.
#[derive(Debug, Default)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` are only addresses handed to the kernel while the memory
// they point into is borrowed by the caller (see `push`); the list itself carries no access
// rights and is cleared before reuse, so moving it between threads is sound.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget every segment (keeps the allocation).
    pub fn clear(&mut self) {
        self.iov.clear();
    }

    /// Add a guest memory slice. Only its address is kept: the list does not borrow the
    /// memory, which is why [`IoVecs::preadv`] and [`IoVecs::pwritev`] are `unsafe`.
    pub fn push<B: BitmapSlice>(&mut self, s: &VolatileSlice<'_, B>) {
        // The guest memory here has no dirty bitmap, so the guard has nothing to record when
        // it drops; the pointer stays valid as long as the mapping the slice borrows.
        let base = s.ptr_guard_mut().as_ptr();
        self.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: s.len(),
        });
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }

    /// Whether there is nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read `self.len()` bytes from `file` at `offset` into the segments. Returns the bytes
    /// read, less than asked only at the end of the file.
    ///
    /// # Safety
    ///
    /// Every slice pushed since the last [`IoVecs::clear`] must still be mapped: the memory
    /// (guest memory object) it came from must not have been dropped or unmapped.
    pub unsafe fn preadv(&mut self, file: &File, offset: u64) -> io::Result<usize> {
        // SAFETY: our caller's contract is `transfer`'s.
        unsafe { self.transfer(file, offset, Dir::Read) }
    }

    /// Write the segments to `file` at `offset`, all of them or an error.
    ///
    /// # Safety
    ///
    /// As for [`IoVecs::preadv`].
    pub unsafe fn pwritev(&mut self, file: &File, offset: u64) -> io::Result<usize> {
        // SAFETY: our caller's contract is `transfer`'s.
        unsafe { self.transfer(file, offset, Dir::Write) }
    }

    /// # Safety
    ///
    /// As for [`IoVecs::preadv`]: the segments must still be mapped.
    unsafe fn transfer(&mut self, file: &File, offset: u64, dir: Dir) -> io::Result<usize> {
        let total = self.len();
        let mut done = 0usize;
        let mut first = 0usize; // first iovec not fully transferred
        while done < total {
            let batch_end = (first + IOV_MAX).min(self.iov.len());
            let batch = &self.iov[first..batch_end];
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = match dir {
                // SAFETY: every iovec points into guest memory that is still mapped (this
                // function's contract) and is `iov_len` bytes long; `batch` is a valid array
                // of `batch.len()` iovecs. The kernel writes only inside those ranges.
                Dir::Read => unsafe {
                    libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
                },
                // SAFETY: as above; the kernel only reads the ranges.
                Dir::Write => unsafe {
                    libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
                },
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut n = n as usize;
            if n == 0 {
                if dir == Dir::Read {
                    return Ok(done); // end of file
                }
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n;
            // Skip what was transferred: whole iovecs, then part of one.
            while n > 0 {
                let Some(v) = self.iov.get_mut(first) else {
                    break;
                };
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same
                    // segment of guest memory.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(done)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn temp_file(len: usize) -> File {
        let fd = rustix_memfd();
        let mut f = File::from(fd);
        f.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        f
    }

    fn rustix_memfd() -> std::os::fd::OwnedFd {
        // SAFETY: memfd_create with a valid NUL-terminated name and flags; the result is
        // checked before it is owned.
        let fd = unsafe { libc::memfd_create(c"io-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    #[test]
    fn scattered_reads_and_writes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let file = temp_file(0x4000);
        let mut iov = IoVecs::new();
        // Three pieces of guest memory, out of order.
        let pieces = [(0x3000u64, 100usize), (0x1000, 4000), (0x8000, 2000)];
        for (gpa, len) in pieces {
            for s in GuestMemoryBackend::get_slices(&mem, GuestAddress(gpa), len) {
                iov.push(&s.unwrap());
            }
        }
        assert_eq!(iov.len(), 6100);
        // SAFETY: `mem`, which the slices came from, lives to the end of the test.
        let n = unsafe { iov.preadv(&file, 10) }.unwrap();
        assert_eq!(n, 6100);
        let expect = |off: usize| ((off + 10) % 251) as u8;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), expect(0));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(),
            expect(100)
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x8000 + 1999)).unwrap(),
            expect(6099)
        );

        // Write them back elsewhere and compare.
        mem.write_slice(&[7u8; 100], GuestAddress(0x3000)).unwrap();
        let mut iov2 = IoVecs::new();
        for (gpa, len) in pieces {
            iov2.push(&mem.get_slice(GuestAddress(gpa), len).unwrap());
        }
        // SAFETY: `mem`, which the slices came from, lives to the end of the test.
        let n = unsafe { iov2.pwritev(&file, 0x2000) }.unwrap();
        assert_eq!(n, 6100);
        let mut f = &file;
        f.seek(SeekFrom::Start(0x2000)).unwrap();
        let mut back = vec![0u8; 101];
        f.read_exact(&mut back).unwrap();
        assert_eq!(&back[..100], &[7u8; 100]);
        assert_eq!(back[100], expect(100));

        // Past the end of the file: a short read.
        let mut iov3 = IoVecs::new();
        iov3.push(&mem.get_slice(GuestAddress(0), 0x100).unwrap());
        // SAFETY: `mem`, which the slices came from, lives to the end of the test.
        let n = unsafe { iov3.preadv(&file, 0x4000 - 0x10) }.unwrap();
        assert_eq!(n, 0x10);
    }
}
