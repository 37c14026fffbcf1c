//! O_DIRECT I/O between a block device and page-aligned memory, in the two buffer layouts of
//! [`crate::layout::Layout`].
//!
//! Each thread owns [`Buffers`]: a pool of 4 KiB pages used in a shuffled order (a scattered
//! request takes the next pages of that order, one iovec each), and one 4 MiB buffer in huge
//! pages (hugetlbfs if the kernel has some, else transparent huge pages, else plain pages,
//! which [`Buffers::huge_kind`] says). O_DIRECT makes every request go to the device as the
//! driver builds it from these pages; nothing is cached. The memory is this program's own
//! anonymous memory: ordinary references to it are fine once the system call that filled it
//! has returned.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::layout::{fill, first_mismatch, Layout};

/// Bytes of a page.
pub const PAGE: usize = 4096;
/// Pages of the scattered pool (8 MiB: twice the largest request).
const POOL_PAGES: usize = 2048;
/// Bytes of the contiguous buffer: the largest request.
const HUGE_LEN: usize = 4 << 20;
/// Bytes of a huge page.
const HUGE_PAGE: usize = 2 << 20;

/// An anonymous private mapping, unmapped when dropped.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn anonymous(len: usize, flags: libc::c_int) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choice: no
        // existing memory is affected; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr + len` is a live read-write mapping owned by `self` alone (it is
        // unmapped only on drop), and `&mut self` makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns; no reference to it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

// SAFETY: the mapping is plain memory owned by one value; moving it to another thread moves
// that ownership.
unsafe impl Send for Mapping {}

/// The memory a request's buffer is made of.
#[derive(Debug, Clone)]
pub enum Chunks {
    /// Page numbers in the pool, in buffer order.
    Pages(Vec<usize>),
    /// The first `len` bytes of the contiguous buffer.
    Contiguous(usize),
}

/// One thread's buffers.
pub struct Buffers {
    pool: Mapping,
    order: Vec<usize>,
    next: usize,
    huge: Mapping,
    /// The offset of the 2 MiB-aligned contiguous buffer inside `huge`.
    huge_at: usize,
    kind: &'static str,
}

impl Buffers {
    /// A pool and a contiguous buffer; `seed` shuffles the pool's pages.
    pub fn new(seed: u64) -> io::Result<Self> {
        let mut pool = Mapping::anonymous(POOL_PAGES * PAGE, 0)?;
        // Fault the pages in, in a shuffled order, so neighbours in the pool are not
        // neighbours in physical memory either.
        let mut order: Vec<usize> = (0..POOL_PAGES).collect();
        let mut x = seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for &p in &order {
            pool.bytes()[p * PAGE] = 1;
        }
        let (huge, huge_at, kind) = match Mapping::anonymous(HUGE_LEN, libc::MAP_HUGETLB) {
            Ok(m) => (m, 0, "hugetlb"),
            Err(_) => {
                // Transparent huge pages in a 2 MiB-aligned window, if the kernel gives them.
                let mut m = Mapping::anonymous(HUGE_LEN + HUGE_PAGE, 0)?;
                let at = (HUGE_PAGE - (m.ptr as usize) % HUGE_PAGE) % HUGE_PAGE;
                // SAFETY: advice on a range inside our own mapping; it changes no content.
                let thp = unsafe {
                    libc::madvise(m.ptr.add(at).cast(), HUGE_LEN, libc::MADV_HUGEPAGE) == 0
                };
                m.bytes()[at..at + HUGE_LEN].fill(0);
                (m, at, if thp { "thp" } else { "pages" })
            }
        };
        Ok(Buffers {
            pool,
            order,
            next: 0,
            huge,
            huge_at,
            kind,
        })
    }

    /// What backs the contiguous buffer: `hugetlb`, `thp` (asked for) or `pages`.
    pub fn huge_kind(&self) -> &'static str {
        self.kind
    }

    /// The memory for a request of `len` bytes (a multiple of [`PAGE`], at most 4 MiB).
    pub fn take(&mut self, layout: Layout, len: usize) -> Chunks {
        match layout {
            Layout::Contiguous => Chunks::Contiguous(len.min(HUGE_LEN)),
            Layout::Scattered => {
                let n = len / PAGE;
                let pages = (0..n)
                    .map(|i| self.order[(self.next + i) % POOL_PAGES])
                    .collect();
                self.next = (self.next + n) % POOL_PAGES;
                Chunks::Pages(pages)
            }
        }
    }

    /// The byte slices of `c`, in buffer order.
    fn slices(&mut self, c: &Chunks) -> Vec<&mut [u8]> {
        match c {
            Chunks::Contiguous(len) => {
                let at = self.huge_at;
                vec![&mut self.huge.bytes()[at..at + len]]
            }
            Chunks::Pages(pages) => {
                let mut by_page: Vec<Option<&mut [u8]>> =
                    self.pool.bytes().chunks_mut(PAGE).map(Some).collect();
                pages
                    .iter()
                    .filter_map(|&p| by_page.get_mut(p).and_then(Option::take))
                    .collect()
            }
        }
    }

    /// Fill `c` with the bytes disk offset `offset` should hold for `seed`.
    pub fn fill(&mut self, c: &Chunks, seed: u64, offset: u64) {
        let mut at = offset;
        for s in self.slices(c) {
            fill(s, seed, at);
            at += s.len() as u64;
        }
    }

    /// Overwrite `c` with a byte no pattern word is made of only, so that a read that does
    /// not land is caught.
    pub fn poison(&mut self, c: &Chunks) {
        for s in self.slices(c) {
            s.fill(0xa5);
        }
    }

    /// The first byte of `c` that is not what disk offset `offset` should hold.
    pub fn mismatch(&mut self, c: &Chunks, seed: u64, offset: u64) -> Option<(u64, u8, u8)> {
        let mut at = offset;
        for s in self.slices(c) {
            if let Some(m) = first_mismatch(s, seed, at) {
                return Some(m);
            }
            at += s.len() as u64;
        }
        None
    }

    /// Read `c`'s length at `offset` into it, all of it.
    pub fn read(&mut self, fd: BorrowedFd<'_>, c: &Chunks, offset: u64) -> io::Result<()> {
        self.transfer(fd, c, offset, false)
    }

    /// Write `c` at `offset`, all of it.
    pub fn write(&mut self, fd: BorrowedFd<'_>, c: &Chunks, offset: u64) -> io::Result<()> {
        self.transfer(fd, c, offset, true)
    }

    fn transfer(
        &mut self,
        fd: BorrowedFd<'_>,
        c: &Chunks,
        offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = self
            .slices(c)
            .into_iter()
            .map(|s| libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let batch = &iov[first..iov.len().min(first + 1024)];
            let pos = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec points into memory this value owns (the pool or the huge
            // buffer), `iov_len` bytes each, live for the call; `batch` is a valid array of
            // `batch.len()` (at most 1024, IOV_MAX) iovecs.
            let n = unsafe {
                if write {
                    libc::pwritev(fd.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
                } else {
                    libc::preadv(fd.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} bytes of {total} at {offset:#x}", done),
                ));
            }
            let mut n = n as usize;
            done += n;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n < iov_len`: the pointer stays inside the same buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}
