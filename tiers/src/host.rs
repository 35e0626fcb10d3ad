//! Host-memory tier (G2): one fixed-capacity arena of 4 KiB-aligned slots,
//! allocated once at start-up in a memfd (so a later zero-copy path can share
//! it with co-located engines). A put reserves a slot from the
//! [`ExtentAllocator`] and copies the payload in; nothing is allocated per put
//! for the bytes themselves. Slots are reference-counted guards: a reader
//! holding a slot keeps it from being reused until its copy finishes.

use crate::slots::SlotIndex;
use crate::{Block, BlockHeader, Extent, ExtentAllocator, ObjectKey, Tier, TierError, TierKind, TierResult};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
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
    fn new(capacity: u64) -> TierResult<Arena> {
        let len = (capacity / HOST_ALIGN * HOST_ALIGN) as usize;
        if len == 0 {
            return Err(TierError::Config(format!(
                "host tier capacity {capacity} is below one 4 KiB slot"
            )));
        }
        let name = c"kvfabric-host-arena";
        // SAFETY: FFI calls with valid arguments; results are checked.
        unsafe {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
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
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
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

/// The host-memory tier.
#[derive(Debug)]
pub struct HostTier {
    arena: Arc<Arena>,
    index: SlotIndex<Slot>,
}

impl HostTier {
    /// Creates an arena of `capacity` bytes (rounded down to 4 KiB).
    pub fn new(capacity: u64) -> TierResult<HostTier> {
        let arena = Arc::new(Arena::new(capacity)?);
        tracing::info!(capacity = arena.len, "host tier: memfd arena of 4 KiB-aligned slots");
        Ok(HostTier {
            arena,
            index: SlotIndex::new(),
        })
    }
}

#[async_trait]
impl Tier for HostTier {
    fn kind(&self) -> TierKind {
        TierKind::Host
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
        // SAFETY: the extent was just allocated to us and is not yet
        // reachable by anyone else; it lies inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                block.payload.as_ptr(),
                self.arena.ptr.add(extent.offset as usize),
                block.payload.len(),
            );
        }
        let slot = Arc::new(Slot {
            arena: self.arena.clone(),
            extent,
            header: block.header.clone(),
        });
        self.index.insert(key, slot);
        Ok(())
    }

    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        let Some(slot) = self.index.get(key) else {
            return Ok(None);
        };
        let payload = Bytes::copy_from_slice(slot.bytes());
        Ok(Some(Block {
            header: slot.header.clone(),
            payload,
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

    #[test]
    fn zero_capacity_is_a_config_error() {
        assert!(matches!(HostTier::new(100), Err(TierError::Config(_))));
    }
}
