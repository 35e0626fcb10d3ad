//! The client's mapping of the node's arena: read-only as a whole, with
//! page ranges made writable only while a value is copied into a slot the
//! client reserved (so a stray write faults instead of corrupting a
//! committed block).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const PAGE: u64 = 4096;

/// A shared mapping of the arena memfd: read-only with page ranges made
/// writable per copy (`guarded`), or writable throughout.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: u64,
    guarded: bool,
    _fd: OwnedFd,
}

// SAFETY: the mapping is process-wide shared memory; all access goes through
// raw-pointer copies on ranges the node granted (reservations, leases).
unsafe impl Send for Mapping {}
// SAFETY: see above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn map(fd: OwnedFd, len: u64, guarded: bool) -> io::Result<Mapping> {
        // SAFETY: fstat on an fd we own.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(io::Error::last_os_error());
            }
            st.st_size as u64
        };
        if len == 0 || len > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the node announced an arena of {len} bytes but passed a file of {size}"),
            ));
        }
        // SAFETY: mapping a shared fd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                if guarded {
                    libc::PROT_READ
                } else {
                    libc::PROT_READ | libc::PROT_WRITE
                },
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Map every page now rather than fault them in one at a time on the
        // first puts and gets; best effort (older kernels lack these).
        let advice = if guarded {
            libc::MADV_POPULATE_READ
        } else {
            libc::MADV_POPULATE_WRITE
        };
        // SAFETY: advice on our own mapping; it only pre-faults pages.
        unsafe { libc::madvise(ptr, len as usize, advice) };
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
            guarded,
            _fd: fd,
        })
    }

    /// Address of arena offset `at` in the read-only mapping.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ptr_at(&self, at: u64) -> *const u8 {
        debug_assert!(at <= self.len);
        // SAFETY: in bounds of the mapping (checked by callers).
        unsafe { self.ptr.add(at as usize) }
    }

    /// A second, writable mapping of the same arena, for DMA by a GPU into
    /// reserved slots (the CPU never writes through it).
    #[cfg(feature = "cuda")]
    pub(crate) fn map_writable_for_dma(&self) -> io::Result<DmaMapping> {
        // SAFETY: mapping our own fd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self._fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DmaMapping {
            ptr: ptr as *mut u8,
            len: self.len,
        })
    }

    /// Checks that a range the node granted lies inside the mapping.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len && offset.is_multiple_of(PAGE) => Ok(()),
            _ => Err(format!(
                "the node granted bytes [{offset}, +{len}) outside the {}-byte arena",
                self.len
            )),
        }
    }

    /// Makes `[offset, offset + len)` (rounded out to pages) writable until
    /// the guard drops (a no-op for an unguarded mapping, which is writable
    /// throughout).
    pub(crate) fn writable(&self, offset: u64, len: u64) -> io::Result<WriteWindow<'_>> {
        let start = offset / PAGE * PAGE;
        let end = (offset + len).div_ceil(PAGE) * PAGE;
        let end = end.min(self.len);
        let w = WriteWindow {
            map: self,
            start,
            len: if self.guarded { end - start } else { 0 },
        };
        if w.len > 0 {
            w.protect(libc::PROT_READ | libc::PROT_WRITE)?;
        }
        Ok(w)
    }

    /// Copies `src` to arena offset `at`.
    ///
    /// # Safety
    /// `[at, at + src.len())` must be inside the mapping and writable (a
    /// [`WriteWindow`] is alive over it).
    pub(crate) unsafe fn copy_in(&self, at: u64, src: &[u8]) {
        // SAFETY: per the contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at as usize), src.len()) }
    }

    /// Copies from arena offset `at` into `dst`.
    ///
    /// # Safety
    /// `[at, at + dst.len())` must be inside the mapping.
    pub(crate) unsafe fn copy_out(&self, at: u64, dst: &mut [u8]) {
        // SAFETY: per the contract.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at as usize), dst.as_mut_ptr(), dst.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len from the successful mmap above.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len as usize);
        }
    }
}

/// Pages made writable; back to read-only on drop.
#[derive(Debug)]
pub(crate) struct WriteWindow<'a> {
    map: &'a Mapping,
    start: u64,
    len: u64,
}

impl WriteWindow<'_> {
    fn protect(&self, prot: libc::c_int) -> io::Result<()> {
        // SAFETY: a page-aligned range inside our mapping.
        let r = unsafe {
            libc::mprotect(
                self.map.ptr.add(self.start as usize) as *mut libc::c_void,
                self.len as usize,
                prot,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for WriteWindow<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            let _ = self.protect(libc::PROT_READ);
        }
    }
}

/// A writable mapping of the arena used only as a GPU DMA target.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub(crate) struct DmaMapping {
    pub(crate) ptr: *mut u8,
    pub(crate) len: u64,
}

// SAFETY: only handed to the GPU driver as a DMA address range.
#[cfg(feature = "cuda")]
unsafe impl Send for DmaMapping {}
// SAFETY: see above.
#[cfg(feature = "cuda")]
unsafe impl Sync for DmaMapping {}

#[cfg(feature = "cuda")]
impl Drop for DmaMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len from the successful mmap.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len as usize);
        }
    }
}
