//! Host-memory tier (G2): one fixed-capacity arena of 4 KiB-aligned slots,
//! allocated once at start-up in a memfd (so a later zero-copy path can share
//! it with co-located engines). A put reserves a slot from the
//! [`ExtentAllocator`] and copies the payload in; nothing is allocated per put
//! for the bytes themselves. Slots are reference-counted guards: a reader
//! holding a slot keeps it from being reused until its copy finishes.
//!
//! The same arena backs the zero-copy path for co-located engines: the node
//! passes the memfd to a local client, which writes into a
//! [`HostReservation`] (an extent allocated but not yet published) and reads
//! from a [`HostLease`] (a published slot pinned against reuse). Blocks read
//! through [`Tier::get`] are zero-copy views of their slot as well.

use crate::slots::SlotIndex;
use crate::{
    Block, BlockHeader, CHECKSUM_PENDING, Extent, ExtentAllocator, ObjectKey, Tier, TierError, TierKind, TierResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// Slot alignment (and allocation unit) of the host arena.
pub(crate) const HOST_ALIGN: u64 = 4096;

/// The arena mapping.
#[derive(Debug)]
struct Arena {
    ptr: *mut u8,
    len: usize,
    fd: libc::c_int,
    alloc: Mutex<ExtentAllocator>,
}

// SAFETY: the mapping is plain shared memory; access to any byte range is
// serialised by slot ownership (one writer before publish, readers after).
unsafe impl Send for Arena {}
// SAFETY: see above.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(capacity: u64, prefault: bool) -> TierResult<Arena> {
        let len = (capacity / HOST_ALIGN * HOST_ALIGN) as usize;
        if len == 0 {
            return Err(TierError::Config(format!(
                "host tier capacity {capacity} is below one 4 KiB slot"
            )));
        }
        let name = c"kvfabric-host-arena";
        // SAFETY: FFI calls with valid arguments; results are checked.
        unsafe {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
            if fd < 0 {
                return Err(TierError::io(
                    "memfd_create for host arena",
                    std::io::Error::last_os_error(),
                ));
            }
            if libc::ftruncate(fd, len as libc::off_t) != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(TierError::io(format!("sizing host arena to {len} bytes"), e));
            }
            // Commit every page now: no first-touch fault (and zeroing) on the
            // put path, here or in a co-located client's mapping, and a
            // machine without the memory fails at start instead of under load.
            if prefault && libc::fallocate(fd, 0, 0, len as libc::off_t) != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(TierError::io(format!("allocating the {len}-byte host arena"), e));
            }
            // Co-located clients get this file read-write. Sealed, none of
            // them can shrink it under the node's mapping (which would make
            // the node's next access past the new end a SIGBUS) or grow it.
            if libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) != 0
            {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(TierError::io("sealing the host arena's size", e));
            }
            let populate = if prefault { libc::MAP_POPULATE } else { 0 };
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | populate,
                fd,
                0,
            );
            if ptr == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(TierError::io(format!("mapping host arena of {len} bytes"), e));
            }
            Ok(Arena {
                ptr: ptr as *mut u8,
                len,
                fd,
                alloc: Mutex::new(ExtentAllocator::new(len as u64, HOST_ALIGN)),
            })
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: ptr/len/fd come from a successful mmap/memfd_create above.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
            libc::close(self.fd);
        }
    }
}

/// A committed slot: returns its extent to the arena when the last holder
/// drops it.
#[derive(Debug)]
struct Slot {
    arena: Arc<Arena>,
    extent: Extent,
    header: BlockHeader,
    /// The checksum, computed on first need when `header.checksum` is
    /// [`CHECKSUM_PENDING`].
    sum: std::sync::OnceLock<u64>,
}

impl Slot {
    /// The header with a real checksum (computing it once if pending).
    fn full_header(&self) -> BlockHeader {
        let mut h = self.header.clone();
        if h.checksum == CHECKSUM_PENDING {
            h.checksum = *self
                .sum
                .get_or_init(|| crate::offload(self.bytes().len(), || crate::checksum(self.bytes())));
        }
        h
    }
}

impl Slot {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the extent lies inside the mapping and was fully written
        // before the slot was published; nobody writes it while it is alive.
        unsafe {
            std::slice::from_raw_parts(
                self.arena.ptr.add(self.extent.offset as usize),
                self.header.length as usize,
            )
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.arena.alloc.lock().free_extent(self.extent);
    }
}

/// Owner that lets a [`Bytes`] borrow a slot without copying it.
struct SlotBytes(Arc<Slot>);

impl AsRef<[u8]> for SlotBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Arena space reserved for a writer that is not the tier itself (a
/// co-located client writing through its own mapping). It is not visible to
/// readers until [`HostTier::commit`] publishes it; dropping it returns the
/// space.
#[derive(Debug)]
pub struct HostReservation {
    arena: Arc<Arena>,
    extent: Option<Extent>,
    len: u64,
}

impl HostReservation {
    /// Byte offset of the reserved space in the arena.
    pub fn offset(&self) -> u64 {
        self.extent.map_or(0, |e| e.offset)
    }
    /// Payload length the space was reserved for.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the reservation is for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of arena the reservation occupies (its footprint).
    pub fn footprint(&self) -> u64 {
        self.extent.map_or(0, |e| e.len)
    }
    /// Copies `data` into the reserved space (for in-process writers and
    /// tests; a co-located client writes through its own mapping instead).
    ///
    /// # Panics
    /// When `data` is longer than the reservation.
    pub fn write(&mut self, data: &[u8]) {
        assert!(data.len() as u64 <= self.len, "write past the end of a reservation");
        let e = self.extent.expect("live reservation");
        // SAFETY: the extent is ours alone until commit and lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.arena.ptr.add(e.offset as usize), data.len()) }
    }
    /// The reserved bytes as they are now. Another process may still be
    /// writing them (a misbehaving client); the caller only hashes or copies
    /// them, and a concurrent write shows up as a checksum mismatch.
    pub fn snapshot(&self) -> Bytes {
        let e = self.extent.expect("live reservation");
        // SAFETY: the extent lies inside the mapping and stays allocated
        // while `self` lives; the bytes are copied out at once.
        Bytes::copy_from_slice(unsafe {
            std::slice::from_raw_parts(self.arena.ptr.add(e.offset as usize), self.len as usize)
        })
    }
    /// xxh3-64 of the reserved bytes, computed in place (see [`Self::snapshot`]).
    pub fn checksum(&self) -> u64 {
        let e = self.extent.expect("live reservation");
        // SAFETY: as in `snapshot`.
        crate::checksum(unsafe { std::slice::from_raw_parts(self.arena.ptr.add(e.offset as usize), self.len as usize) })
    }
}

impl Drop for HostReservation {
    fn drop(&mut self) {
        if let Some(e) = self.extent.take() {
            self.arena.alloc.lock().free_extent(e);
        }
    }
}

/// A read pin on a published slot: its bytes stay where they are, unchanged,
/// until the lease is dropped, even if the object is overwritten, evicted or
/// deleted meanwhile.
#[derive(Clone, Debug)]
pub struct HostLease(Arc<Slot>);

impl HostLease {
    /// Byte offset of the payload in the arena.
    pub fn offset(&self) -> u64 {
        self.0.extent.offset
    }
    /// The object's header as committed: its checksum is
    /// [`CHECKSUM_PENDING`] when none was given and none computed yet.
    pub fn header(&self) -> &BlockHeader {
        &self.0.header
    }
    /// The payload, without copying.
    pub fn payload(&self) -> Bytes {
        Bytes::from_owner(SlotBytes(self.0.clone()))
    }
}

/// The host-memory tier.
#[derive(Debug)]
pub struct HostTier {
    arena: Arc<Arena>,
    index: SlotIndex<Slot>,
}

impl HostTier {
    /// Creates an arena of `capacity` bytes (rounded down to 4 KiB), its
    /// pages allocated lazily.
    pub fn new(capacity: u64) -> TierResult<HostTier> {
        Self::with_prefault(capacity, false)
    }

    /// Like [`HostTier::new`]; with `prefault`, every page is allocated and
    /// mapped up front (the node's default).
    pub fn with_prefault(capacity: u64, prefault: bool) -> TierResult<HostTier> {
        let arena = Arc::new(Arena::new(capacity, prefault)?);
        tracing::info!(capacity = arena.len, "host tier: memfd arena of 4 KiB-aligned slots");
        Ok(HostTier {
            arena,
            index: SlotIndex::new(),
        })
    }

    /// The memfd behind the arena, to share with co-located clients.
    pub fn arena_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open for the arena's lifetime, which `self` outlives the borrow of.
        unsafe { BorrowedFd::borrow_raw(self.arena.fd) }
    }

    /// Length of the arena mapping in bytes.
    pub fn arena_len(&self) -> u64 {
        self.arena.len as u64
    }

    /// Base address of the arena mapping in this process (for pinning it
    /// with a GPU driver).
    pub fn arena_ptr(&self) -> *mut u8 {
        self.arena.ptr
    }

    /// Reserves space for a payload of `len` bytes that someone else will
    /// write; fails with [`TierError::Full`] when there is no room right now.
    pub fn reserve(&self, len: u64) -> TierResult<HostReservation> {
        let need = self.footprint(len);
        let extent = self.arena.alloc.lock().alloc_for(TierKind::Host, need)?;
        Ok(HostReservation {
            arena: self.arena.clone(),
            extent: Some(extent),
            len,
        })
    }

    /// Publishes reserved space as `key` (replacing any older version).
    /// `header.length` must equal the reservation's length.
    pub fn commit(&self, key: &ObjectKey, reservation: HostReservation, header: BlockHeader) -> TierResult<HostLease> {
        let slot = self.seal(reservation, header)?;
        self.index.insert(key, slot.clone());
        Ok(HostLease(slot))
    }

    /// Turns reserved space into a read lease that no key points at (a
    /// bounce slot for an object served from a slower tier). Its space
    /// returns when the lease drops.
    pub fn detach(&self, reservation: HostReservation, header: BlockHeader) -> TierResult<HostLease> {
        Ok(HostLease(self.seal(reservation, header)?))
    }

    fn seal(&self, mut reservation: HostReservation, header: BlockHeader) -> TierResult<Arc<Slot>> {
        if !Arc::ptr_eq(&reservation.arena, &self.arena) {
            return Err(TierError::Invalid("a reservation of another host arena".into()));
        }
        if header.length != reservation.len {
            return Err(TierError::Invalid(format!(
                "header says {} bytes but {} were reserved",
                header.length, reservation.len
            )));
        }
        let extent = reservation.extent.take().expect("live reservation");
        Ok(Arc::new(Slot {
            arena: self.arena.clone(),
            extent,
            header,
            sum: std::sync::OnceLock::new(),
        }))
    }

    /// Free arena bytes right now.
    pub fn capacity_left(&self) -> u64 {
        self.arena.alloc.lock().free()
    }

    /// Unpublishes `key` (its space returns once the last lease drops).
    pub(crate) fn delete_slot(&self, key: &ObjectKey) -> bool {
        self.index.remove(key)
    }

    /// Pins the current version of `key` for reading.
    pub fn lease(&self, key: &ObjectKey) -> Option<HostLease> {
        self.index.get(key).map(HostLease)
    }
}

#[async_trait]
impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
    }
    fn as_host(&self) -> Option<&HostTier> {
        Some(self)
    }
    fn capacity(&self) -> u64 {
        self.arena.len as u64
    }
    fn used(&self) -> u64 {
        self.arena.alloc.lock().used()
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn footprint(&self, len: u64) -> u64 {
        len.max(1).div_ceil(HOST_ALIGN) * HOST_ALIGN
    }

    async fn put(&self, key: &ObjectKey, block: &Block, _sync: bool) -> TierResult<()> {
        let need = self.footprint(block.payload.len() as u64);
        let extent = self.arena.alloc.lock().alloc_for(TierKind::Host, need)?;
        let dst = self.arena.ptr as usize + extent.offset as usize;
        crate::offload(block.payload.len(), || {
            // SAFETY: the extent was just allocated to us and is not yet
            // reachable by anyone else; it lies inside the mapping.
            unsafe { std::ptr::copy_nonoverlapping(block.payload.as_ptr(), dst as *mut u8, block.payload.len()) }
        });
        let slot = Arc::new(Slot {
            arena: self.arena.clone(),
            extent,
            header: block.header.clone(),
            sum: std::sync::OnceLock::new(),
        });
        self.index.insert(key, slot);
        Ok(())
    }

    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        let Some(slot) = self.index.get(key) else {
            return Ok(None);
        };
        Ok(Some(Block {
            header: slot.full_header(),
            payload: Bytes::from_owner(SlotBytes(slot)),
        }))
    }

    async fn delete(&self, key: &ObjectKey) -> TierResult<bool> {
        Ok(self.index.remove(key))
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.index.contains(key)
    }

    async fn recover(&self) -> TierResult<Vec<(ObjectKey, BlockHeader)>> {
        Ok(self.index.headers())
    }
}

impl crate::slots::HasHeader for Slot {
    fn header(&self) -> &BlockHeader {
        &self.header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn host_conformance() {
        let tier = Arc::new(HostTier::new(4 << 20).unwrap());
        crate::conformance::run_all(
            || {
                let t = tier.clone();
                async move { t }
            },
            false,
        )
        .await;
    }

    #[tokio::test]
    async fn reader_keeps_slot_alive_across_overwrite() {
        let t = HostTier::new(1 << 20).unwrap();
        let k = ObjectKey::new("ns", vec![1u8]);
        t.put(&k, &crate::conformance::block(1, 8192), false).await.unwrap();
        let held = t.index.get(&k).unwrap();
        t.put(&k, &crate::conformance::block(2, 8192), false).await.unwrap();
        // Old slot still allocated while held, so both count.
        assert_eq!(t.used(), 2 * 8192);
        assert_eq!(held.bytes(), &crate::conformance::payload(1, 8192)[..]);
        drop(held);
        assert_eq!(t.used(), 8192);
    }

    /// A client that holds the arena file cannot change its size under the
    /// node's mapping.
    #[test]
    fn the_shared_arena_file_cannot_be_resized() {
        use std::os::fd::AsRawFd;
        let t = HostTier::new(1 << 20).unwrap();
        let fd = t.arena_fd().try_clone_to_owned().unwrap();
        for len in [0, 4096, 2 << 20] {
            // SAFETY: plain FFI on an fd we own.
            let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
            assert_eq!(rc, -1, "resizing to {len} bytes was allowed");
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
        // SAFETY: as above.
        let rc = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, 4 << 20) };
        assert_eq!(rc, -1, "growing by fallocate was allowed");
    }

    #[test]
    fn zero_capacity_is_a_config_error() {
        assert!(matches!(HostTier::new(100), Err(TierError::Config(_))));
    }
}
