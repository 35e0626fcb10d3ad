//! Space accounting of the disk tier: one [`ExtentAllocator`] per data file
//! (4096-byte units) and the [`ExtentGuard`] that owns an allocated extent.
//!
//! An extent's lifecycle is carried by types: `Space::alloc` hands out a
//! guard (reserved), the write request keeps a clone while the kernel writes
//! it, the committed index entry keeps one, and every read clones the entry
//! (and so the guard) for as long as its I/O runs. Only when the last holder
//! lets go does `Drop` give the extent back, so a delete or overwrite can
//! never let an extent be reused while a read or write of it is in flight.

use super::buf::ALIGN;
use crate::{Extent, ExtentAllocator};
use parking_lot::Mutex;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The allocators of all data files.
pub(super) struct Space {
    files: Vec<Mutex<ExtentAllocator>>,
    capacity: u64,
    largest_file: u64,
    used: AtomicU64,
}

impl Space {
    /// One allocator per file of the given sizes.
    pub(super) fn new(sizes: &[u64]) -> Arc<Self> {
        let files: Vec<_> = sizes
            .iter()
            .map(|&s| Mutex::new(ExtentAllocator::new(s, ALIGN as u64)))
            .collect();
        let capacity = files.iter().map(|a| a.lock().capacity()).sum();
        let largest_file = files.iter().map(|a| a.lock().capacity()).max().unwrap_or(0);
        Arc::new(Self {
            files,
            capacity,
            largest_file,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes an object with a `len`-byte payload occupies: whole pages, at least one.
    pub(super) fn footprint(len: u64) -> u64 {
        len.max(1).div_ceil(ALIGN as u64) * ALIGN as u64
    }

    /// Total usable bytes.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest extent that could ever be allocated (an extent lives in one file).
    pub(super) fn max_extent(&self) -> u64 {
        self.largest_file
    }

    /// Bytes in live extents.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Allocates `need` bytes (a footprint) in the first file with room.
    pub(super) fn alloc(self: &Arc<Self>, need: u64) -> Option<ExtentGuard> {
        for (file, a) in self.files.iter().enumerate() {
            let got = a.lock().alloc(need);
            if let Some(extent) = got {
                self.used.fetch_add(extent.len, Ordering::AcqRel);
                return Some(ExtentGuard {
                    space: self.clone(),
                    file,
                    extent,
                });
            }
        }
        None
    }

    /// Claims a specific extent (index recovery); `None` if it is out of
    /// range or overlaps one already claimed.
    /// Whether `extent` of `file` lies inside the configured space.
    pub(super) fn contains(&self, file: usize, extent: Extent) -> bool {
        self.files.get(file).is_some_and(|a| {
            extent
                .offset
                .checked_add(extent.len)
                .is_some_and(|end| end <= a.lock().capacity())
        })
    }

    pub(super) fn reserve(self: &Arc<Self>, file: usize, extent: Extent) -> Option<ExtentGuard> {
        let ok = self.files.get(file)?.lock().reserve(extent);
        if !ok {
            return None;
        }
        self.used.fetch_add(extent.len, Ordering::AcqRel);
        Some(ExtentGuard {
            space: self.clone(),
            file,
            extent,
        })
    }
}

impl fmt::Debug for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Space")
            .field("files", &self.files.len())
            .field("capacity", &self.capacity)
            .field("used", &self.used())
            .finish()
    }
}

/// An allocated extent in one data file; dropping it frees the extent.
pub(super) struct ExtentGuard {
    space: Arc<Space>,
    file: usize,
    extent: Extent,
}

impl ExtentGuard {
    /// Data file index.
    pub(super) fn file(&self) -> usize {
        self.file
    }
    /// The extent.
    pub(super) fn extent(&self) -> Extent {
        self.extent
    }
}

impl Drop for ExtentGuard {
    fn drop(&mut self) {
        self.space.files[self.file].lock().free_extent(self.extent);
        self.space.used.fetch_sub(self.extent.len, Ordering::AcqRel);
    }
}

impl fmt::Debug for ExtentGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtentGuard")
            .field("file", &self.file)
            .field("extent", &self.extent)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_free_on_last_drop() {
        let s = Space::new(&[8192, 16384]);
        assert_eq!(s.capacity(), 24576);
        assert_eq!(s.max_extent(), 16384);
        let a = Arc::new(s.alloc(8192).unwrap());
        assert_eq!(a.file(), 0);
        let b = s.alloc(1).unwrap();
        assert_eq!(b.file(), 1, "file 0 is full, so the next file is used");
        assert!(s.alloc(16384).is_none());
        let reader = a.clone();
        drop(a);
        assert_eq!(s.used(), 8192 + 4096, "a reader still holds the extent");
        drop(reader);
        assert_eq!(s.used(), 4096);
        assert!(s.reserve(1, b.extent()).is_none(), "overlap refused");
        assert!(s.reserve(5, b.extent()).is_none(), "unknown file refused");
        drop(b);
        assert_eq!(s.used(), 0);
        assert_eq!(Space::footprint(0), 4096);
        assert_eq!(Space::footprint(4097), 8192);
    }
}
