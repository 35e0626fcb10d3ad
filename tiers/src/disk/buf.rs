//! Aligned I/O memory of the disk tier: [`AlignedBuf`] (one page-aligned heap
//! allocation, what O_DIRECT needs), the small [`BufferPool`] of bounce buffers
//! that the io_uring engine registers with its ring, and [`IoBuf`], the buffer
//! an I/O request owns while the kernel may touch it.
//!
//! Reads land in a fresh [`AlignedBuf`] that becomes the payload `Bytes`
//! without a copy ([`AlignedBuf::into_bytes`]); writes copy the (unaligned)
//! payload into a pool slot when one is free and the object fits, else into a
//! fresh aligned allocation; a payload that is already page-aligned and a
//! whole number of pages long (a host-arena slot being demoted) is written
//! straight from its own memory. Freed aligned allocations are kept in a small
//! [`Recycler`] and handed out again, so steady-state I/O does not pay for
//! fresh pages (allocation, page faults, zeroing by the kernel) on every
//! request.

use bytes::Bytes;
use parking_lot::Mutex;
use std::alloc::{self, Layout as AllocLayout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer, file offset and I/O length (O_DIRECT's unit on
/// any device with a logical block size up to 4 KiB).
pub(super) const ALIGN: usize = 4096;

/// Size of one slot of the bounce-buffer pool.
pub(super) const POOL_SLOT_SIZE: usize = 256 * 1024;

/// Slots in the pool: 8 x 256 KiB = 2 MiB registered, a quarter of an 8 MiB
/// RLIMIT_MEMLOCK, so a couple of tiers (or test processes) fit beside each
/// other before registration starts failing (which only costs the fixed-buffer
/// fast path).
pub(super) const POOL_SLOTS: usize = 8;

/// One page-aligned heap allocation. Its bytes start out unspecified: they are
/// written only through raw pointers (by a copy or by the kernel) and viewed
/// as a slice only once fully written.
pub(super) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read through `as_ptr`; mutation needs `&mut`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> AllocLayout {
        // The size is rounded up to the alignment so O_DIRECT can always
        // transfer whole pages; `len` > 0 is checked by the callers.
        AllocLayout::from_size_align(len.div_ceil(ALIGN).max(1) * ALIGN, ALIGN)
            .expect("I/O buffer size overflows the address space")
    }

    /// Allocates `len` bytes (rounded up to whole pages) without initialising
    /// them, reusing a recycled allocation of the same size when there is one.
    pub(super) fn uninit(len: usize) -> Self {
        let layout = Self::layout(len);
        if let Some(ptr) = RECYCLER.take(layout.size()) {
            return Self { ptr, len };
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// Allocates `len` zeroed bytes.
    pub(super) fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// Length requested at allocation.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Start of the buffer.
    pub(super) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for writing.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Turns a fully written buffer into `Bytes` holding its first
    /// `payload_len` bytes, without copying: the `Bytes` owns the allocation.
    ///
    /// # Safety
    /// Every one of the buffer's `len()` bytes must have been written.
    pub(super) unsafe fn into_bytes(self, payload_len: usize) -> Bytes {
        assert!(payload_len <= self.len, "payload longer than its buffer");
        Bytes::from_owner(Filled(self)).slice(..payload_len)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Self::layout(self.len);
        if RECYCLER.give(layout.size(), self.ptr) {
            return;
        }
        // SAFETY: allocated in `uninit`/`zeroed` (or recycled from an
        // allocation of the same size) with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Most bytes of idle aligned allocations kept for reuse (process-wide).
const RECYCLE_BYTES: usize = 128 << 20;

/// Idle page-aligned allocations by size: KV blocks come in a few fixed
/// sizes, so exact-size reuse hits almost always.
struct Recycler {
    inner: Mutex<(usize, Vec<(usize, Idle)>)>,
}

/// An idle allocation (owned by the recycler).
struct Idle(NonNull<u8>);

// SAFETY: an idle allocation is plain memory owned by nobody else.
unsafe impl Send for Idle {}

static RECYCLER: Recycler = Recycler {
    inner: Mutex::new((0, Vec::new())),
};

impl Recycler {
    fn take(&self, size: usize) -> Option<NonNull<u8>> {
        let mut g = self.inner.lock();
        let pos = g.1.iter().rposition(|(s, _)| *s == size)?;
        let (s, p) = g.1.swap_remove(pos);
        g.0 -= s;
        Some(p.0)
    }

    /// Keeps `ptr` (of `size` bytes) for reuse; `false` when full.
    fn give(&self, size: usize, ptr: NonNull<u8>) -> bool {
        let mut g = self.inner.lock();
        if g.0 + size > RECYCLE_BYTES {
            return false;
        }
        g.0 += size;
        g.1.push((size, Idle(ptr)));
        true
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// An [`AlignedBuf`] whose bytes are all initialised: what `Bytes` owns.
struct Filled(AlignedBuf);

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `into_bytes`' contract says every byte was written.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

/// A fixed set of equal, page-aligned bounce buffers carved out of one
/// allocation, so the io_uring engine can register them with its ring once
/// and write from them with `WriteFixed`.
pub(super) struct BufferPool {
    mem: AlignedBuf,
    slot_size: usize,
    slots: usize,
    free: Mutex<Vec<u16>>,
}

impl BufferPool {
    /// A pool of `slots` buffers of `slot_size` bytes (a multiple of [`ALIGN`]).
    pub(super) fn new(slots: usize, slot_size: usize) -> Arc<Self> {
        assert!(slot_size.is_multiple_of(ALIGN) && slots > 0 && slots <= usize::from(u16::MAX));
        Arc::new(Self {
            mem: AlignedBuf::zeroed(slots * slot_size),
            slot_size,
            slots,
            free: Mutex::new((0..slots as u16).rev().collect()),
        })
    }

    /// Size of each slot.
    pub(super) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// One `iovec` per slot, in slot order (the registration table).
    pub(super) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .map(|i| libc::iovec {
                // SAFETY: in bounds of the pool's allocation.
                iov_base: unsafe { self.mem.as_ptr().add(i * self.slot_size) } as *mut libc::c_void,
                iov_len: self.slot_size,
            })
            .collect()
    }

    /// Takes a free slot, if any.
    pub(super) fn try_acquire(self: &Arc<Self>) -> Option<PooledBuf> {
        let slot = self.free.lock().pop()?;
        Some(PooledBuf {
            pool: self.clone(),
            slot,
        })
    }

    /// Free slots right now.
    #[cfg(test)]
    pub(super) fn available(&self) -> usize {
        self.free.lock().len()
    }
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .field("free", &self.free.lock().len())
            .finish()
    }
}

/// A slot of a [`BufferPool`], returned to the pool on drop.
#[derive(Debug)]
pub(super) struct PooledBuf {
    pool: Arc<BufferPool>,
    slot: u16,
}

impl PooledBuf {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: in bounds; the slot is owned exclusively by this value.
        unsafe { self.pool.mem.as_ptr().add(usize::from(self.slot) * self.pool.slot_size) as *mut u8 }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.free.lock().push(self.slot);
    }
}

/// The memory an I/O request reads into or writes from. Owned by the request
/// until the kernel is done with it.
#[derive(Debug)]
pub(super) enum IoBuf {
    /// A fresh allocation sized to the I/O.
    Owned(AlignedBuf),
    /// A bounce-buffer slot (registered with the ring when that succeeded).
    Pooled(PooledBuf),
    /// The caller's own page-aligned, whole-page payload, written without a
    /// copy (writes only: the kernel reads it, nobody writes it).
    Shared(Bytes),
}

impl IoBuf {
    /// Bytes this buffer can hold.
    pub(super) fn capacity(&self) -> usize {
        match self {
            IoBuf::Owned(b) => b.len(),
            IoBuf::Pooled(p) => p.pool.slot_size,
            IoBuf::Shared(b) => b.len(),
        }
    }

    /// Start of the buffer.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            IoBuf::Owned(b) => b.as_mut_ptr(),
            IoBuf::Pooled(p) => p.ptr(),
            // Only ever the source of a write: the kernel reads through it.
            IoBuf::Shared(b) => b.as_ptr() as *mut u8,
        }
    }

    /// The pool slot, which is also the index in the ring's registered-buffer
    /// table when the pool is registered.
    pub(super) fn pool_slot(&self) -> Option<u16> {
        match self {
            IoBuf::Owned(_) | IoBuf::Shared(_) => None,
            IoBuf::Pooled(p) => Some(p.slot),
        }
    }

    /// `data` itself as a write buffer when it is page-aligned and a whole
    /// number of pages long (so O_DIRECT can take it as is).
    pub(super) fn shared(data: &Bytes) -> Option<IoBuf> {
        (!data.is_empty() && (data.as_ptr() as usize).is_multiple_of(ALIGN) && data.len().is_multiple_of(ALIGN))
            .then(|| IoBuf::Shared(data.clone()))
    }

    /// Copies `data` to the front and zeroes the rest up to `io_len`, so the
    /// first `io_len` bytes are initialised and no stale bytes reach the disk.
    pub(super) fn fill(&mut self, data: &[u8], io_len: usize) {
        assert!(
            data.len() <= io_len && io_len <= self.capacity(),
            "write larger than its buffer"
        );
        let dst = self.as_mut_ptr();
        // SAFETY: `dst` is valid for `io_len` bytes (checked above) and does
        // not overlap `data`, which lives in caller-owned memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
            std::ptr::write_bytes(dst.add(data.len()), 0, io_len - data.len());
        }
    }

    /// The owned allocation, for reads (always `Owned`).
    pub(super) fn into_owned(self) -> Option<AlignedBuf> {
        match self {
            IoBuf::Owned(b) => Some(b),
            IoBuf::Pooled(_) | IoBuf::Shared(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zero_copy() {
        let mut b = AlignedBuf::uninit(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        // SAFETY: writes exactly the buffer's 5000 bytes.
        unsafe { std::ptr::write_bytes(b.as_mut_ptr(), 7, 5000) };
        let ptr = b.as_ptr();
        // SAFETY: every byte written above.
        let bytes = unsafe { b.into_bytes(10) };
        assert_eq!(&bytes[..], &[7u8; 10]);
        assert_eq!(bytes.as_ptr(), ptr, "must not copy");
    }

    #[test]
    fn pool_slots_return_on_drop() {
        let pool = BufferPool::new(2, ALIGN);
        let a = pool.try_acquire().unwrap();
        let b = pool.try_acquire().unwrap();
        assert!(pool.try_acquire().is_none());
        assert_ne!(a.slot, b.slot);
        let mut io = IoBuf::Pooled(a);
        io.fill(b"abc", ALIGN);
        assert_eq!(io.pool_slot(), Some(0));
        drop(io);
        assert_eq!(pool.available(), 1);
        drop(b);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.iovecs().len(), 2);
    }

    #[test]
    fn freed_buffers_are_reused_by_size() {
        // A size no other test uses, so parallel tests cannot take it first.
        let len = 3 * ALIGN + 17;
        let a = AlignedBuf::uninit(len);
        let p = a.as_ptr();
        drop(a);
        let b = AlignedBuf::uninit(len);
        assert_eq!(b.as_ptr(), p, "a freed buffer of the same size comes back");
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        // A different size never gets it.
        let c = AlignedBuf::uninit(len + ALIGN);
        assert_ne!(c.as_ptr(), p);
    }

    #[test]
    fn only_aligned_whole_page_payloads_are_written_in_place() {
        let mut a = AlignedBuf::uninit(2 * ALIGN);
        // SAFETY: writes exactly the buffer's bytes.
        unsafe { std::ptr::write_bytes(a.as_mut_ptr(), 1, 2 * ALIGN) };
        // SAFETY: every byte written.
        let page_aligned = unsafe { a.into_bytes(2 * ALIGN) };
        assert!(matches!(IoBuf::shared(&page_aligned), Some(IoBuf::Shared(_))));
        assert!(
            IoBuf::shared(&page_aligned.slice(..ALIGN + 1)).is_none(),
            "not whole pages"
        );
        assert!(
            IoBuf::shared(&page_aligned.slice(1..ALIGN + 1)).is_none(),
            "not aligned"
        );
        assert!(IoBuf::shared(&Bytes::new()).is_none());
    }
}
