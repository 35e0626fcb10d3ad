//! GPU HBM tier (G1), built only with the `cuda` feature: one device
//! allocation of `capacity` bytes made once at start-up through cudarc (the
//! CUDA driver is loaded at run time, so the binary starts on machines
//! without one), carved into 4 KiB-aligned extents by the shared
//! [`ExtentAllocator`], exactly like the host arena.
//!
//! A put reserves an extent, copies the payload host→device on the tier's own
//! CUDA stream and synchronises before publishing the slot; a get copies
//! device→host into a fresh buffer. Slots are reference-counted guards, so a
//! reader's in-flight copy keeps its extent from being reused by a later put.
//! Every CUDA call that can block runs on tokio's blocking pool, never on an
//! executor thread. Device memory does not survive the process, so `recover`
//! only reports what is stored now.

use crate::slots::SlotIndex;
use crate::{Block, BlockHeader, Extent, ExtentAllocator, ObjectKey, Tier, TierError, TierKind, TierResult};
use async_trait::async_trait;
use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};
use parking_lot::{Mutex, RwLock};
use std::fmt;
use std::sync::Arc;

/// Extent alignment (and allocation unit) in GPU memory; the same as the
/// host arena's, so an object occupies the same footprint in G1 and G2.
pub(crate) const HBM_ALIGN: u64 = 4096;

/// The device allocation, the stream all copies are issued on, and the
/// allocator of extents inside it.
struct Gpu {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    /// The one allocation. Writers take the lock exclusively while they
    /// enqueue (cudarc needs `&mut` for a mutable view), readers shared;
    /// extent ownership keeps concurrent copies on disjoint bytes.
    mem: RwLock<CudaSlice<u8>>,
    len: u64,
    alloc: Mutex<ExtentAllocator>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Copies `data` into device bytes `[offset, offset + data.len())` and
    /// waits for the copy to finish. Blocking.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DriverError> {
        if data.is_empty() {
            return Ok(());
        }
        let start = offset as usize;
        {
            let mut mem = self.mem.write();
            let mut view = mem.slice_mut(start..start + data.len());
            self.stream.memcpy_htod(data, &mut view)?;
        }
        // `data` outlives this call, so the source stays valid until the copy
        // has completed, whatever the driver does with pageable memory.
        self.stream.synchronize()?;
        self.stream.context().check_err()
    }

    /// Copies device bytes `[offset, offset + len)` into a new buffer. Blocking.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DriverError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let start = offset as usize;
        let out = {
            let mem = self.mem.read();
            let view = mem.slice(start..start + len);
            self.stream.clone_dtoh(&view)?
        };
        self.stream.synchronize()?;
        self.stream.context().check_err()?;
        Ok(out)
    }
}

/// A committed extent: returns itself to the allocator when the last holder
/// (the index or an in-flight read) drops it.
#[derive(Debug)]
struct Slot {
    gpu: Arc<Gpu>,
    extent: Extent,
    header: BlockHeader,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gpu.alloc.lock().free_extent(self.extent);
    }
}

/// The GPU-memory tier: a fixed region of one CUDA device's memory.
///
/// Create it with [`HbmTier::try_new`], which returns `Ok(None)` on machines
/// without a usable GPU. Dropping it frees the device memory (a short
/// blocking driver call, once, at shutdown).
#[derive(Debug)]
pub struct HbmTier {
    gpu: Arc<Gpu>,
    index: SlotIndex<Slot>,
    pinned: Mutex<Option<HostPin>>,
}

/// The host arena registered with the driver (page-locked, DMA-able), so
/// copies between it and the GPU run at full PCIe speed without a staging
/// buffer. Unregistered before the arena it keeps alive can be unmapped.
struct HostPin {
    gpu: Arc<Gpu>,
    host: Arc<crate::HostTier>,
}

impl fmt::Debug for HostPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPin")
            .field("bytes", &self.host.arena_len())
            .finish()
    }
}

impl Drop for HostPin {
    fn drop(&mut self) {
        let _ = self.gpu.stream.context().bind_to_thread();
        // SAFETY: registered in `pin_host_arena`; `self.host` keeps the
        // mapping alive until after this call.
        unsafe {
            let _ = cudarc::driver::sys::cuMemHostUnregister(self.host.arena_ptr() as *mut _).result();
        }
    }
}

/// Runs blocking CUDA set-up off the async executor when called from a
/// multi-threaded runtime; runs it inline otherwise (start-up code, tests).
fn run_blocking_inline<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs a blocking copy on tokio's blocking pool. A panic inside is a bug and
/// is propagated to the caller.
async fn run_blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> TierResult<R> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(TierError::Unavailable(format!("GPU copy task did not run: {e}"))),
    }
}

impl HbmTier {
    /// Opens CUDA device `device` and allocates `capacity` bytes (rounded
    /// down to 4 KiB) of its memory for the tier.
    ///
    /// Returns `Ok(None)`, after logging why, when the CUDA driver library is
    /// missing, the machine has no CUDA device, `device` is out of range, or
    /// the driver fails to initialise, so a node without a GPU starts
    /// normally. Errors: [`TierError::Config`] when `capacity` is below 4 KiB;
    /// [`TierError::Unavailable`] when the device exists but the allocation
    /// (or stream creation) fails, e.g. too little free GPU memory.
    ///
    /// Blocks while the driver initialises (hundreds of milliseconds); inside
    /// a multi-threaded tokio runtime it moves off the executor with
    /// `block_in_place`.
    pub fn try_new(capacity: u64, device: usize) -> TierResult<Option<HbmTier>> {
        let len = capacity / HBM_ALIGN * HBM_ALIGN;
        if len == 0 {
            return Err(TierError::Config(format!(
                "hbm tier capacity {capacity} is below one 4 KiB extent"
            )));
        }
        // SAFETY: only tries to dlopen the driver library by its usual names;
        // cudarc's other entry points panic when it is missing, hence the check.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            tracing::info!("no CUDA driver found: GPU HBM tier disabled");
            return Ok(None);
        }
        run_blocking_inline(|| {
            // A driver too old for the symbols cudarc binds makes it panic
            // rather than return an error; treat that as "no usable GPU".
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::open(len, device))) {
                Ok(r) => r,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown panic");
                    tracing::warn!(error = msg, "CUDA driver unusable: GPU HBM tier disabled");
                    Ok(None)
                }
            }
        })
    }

    fn open(len: u64, device: usize) -> TierResult<Option<HbmTier>> {
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) => {
                // cuInit reports a machine without a GPU as CUDA_ERROR_NO_DEVICE.
                tracing::info!(error = %e, "CUDA driver failed to initialise: GPU HBM tier disabled");
                return Ok(None);
            }
        };
        if count == 0 {
            tracing::info!("no CUDA device found: GPU HBM tier disabled");
            return Ok(None);
        }
        if device >= count {
            tracing::warn!(device, count, "CUDA device index out of range: GPU HBM tier disabled");
            return Ok(None);
        }
        let ctx = match CudaContext::new(device) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(device, error = %e, "creating a CUDA context failed: GPU HBM tier disabled");
                return Ok(None);
            }
        };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_owned());
        let unavailable =
            |what: &str, e: DriverError| TierError::Unavailable(format!("GPU {device} ({name}): {what}: {e}"));
        let stream = ctx.new_stream().map_err(|e| unavailable("creating a CUDA stream", e))?;
        let mem = stream.alloc_zeros::<u8>(len as usize).map_err(|e| {
            let free = ctx
                .mem_get_info()
                .map(|(free, total)| format!(" ({free} of {total} bytes free)"));
            unavailable(&format!("allocating {len} bytes{}", free.unwrap_or_default()), e)
        })?;
        stream
            .synchronize()
            .map_err(|e| unavailable("zeroing the allocation", e))?;
        tracing::info!(device, gpu = %name, capacity = len, "hbm tier: one device allocation of 4 KiB-aligned extents");
        let gpu = Gpu {
            ordinal: device,
            name,
            stream,
            mem: RwLock::new(mem),
            len,
            alloc: Mutex::new(ExtentAllocator::new(len, HBM_ALIGN)),
        };
        Ok(Some(HbmTier {
            gpu: Arc::new(gpu),
            index: SlotIndex::new(),
            pinned: Mutex::new(None),
        }))
    }

    /// Page-locks the host tier's arena with `cuMemHostRegister`, so
    /// promotions and demotions between host memory and the GPU (and the
    /// local path's device copies) DMA straight from and to arena slots.
    pub fn pin_host_arena(&self, host: Arc<crate::HostTier>) -> TierResult<()> {
        let ctx = self.gpu.stream.context();
        ctx.bind_to_thread()
            .map_err(|e| TierError::Unavailable(format!("binding the CUDA context: {e}")))?;
        // SAFETY: the arena is a live, page-aligned mapping; `HostPin` keeps
        // it alive until it is unregistered.
        unsafe {
            cudarc::driver::sys::cuMemHostRegister_v2(
                host.arena_ptr() as *mut _,
                host.arena_len() as usize,
                cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
            .result()
            .map_err(|e| TierError::Unavailable(format!("cuMemHostRegister of the host arena: {e}")))?;
        }
        tracing::info!(bytes = host.arena_len(), "host arena page-locked for GPU DMA");
        *self.pinned.lock() = Some(HostPin {
            gpu: self.gpu.clone(),
            host,
        });
        Ok(())
    }

    /// The CUDA device ordinal the tier lives on.
    pub fn device(&self) -> usize {
        self.gpu.ordinal
    }

    fn copy_error(&self, what: &str, key: &ObjectKey, e: DriverError) -> TierError {
        TierError::Unavailable(format!(
            "GPU {} ({}): {what} {key}: {e}",
            self.gpu.ordinal, self.gpu.name
        ))
    }
}

#[async_trait]
impl Tier for HbmTier {
    fn kind(&self) -> TierKind {
        TierKind::Hbm
    }
    fn capacity(&self) -> u64 {
        self.gpu.len
    }
    fn used(&self) -> u64 {
        self.gpu.alloc.lock().used()
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn footprint(&self, len: u64) -> u64 {
        len.max(1).div_ceil(HBM_ALIGN) * HBM_ALIGN
    }

    async fn put(&self, key: &ObjectKey, block: &Block, _sync: bool) -> TierResult<()> {
        let need = self.footprint(block.payload.len() as u64);
        let extent = self.gpu.alloc.lock().alloc_for(TierKind::Hbm, need)?;
        // The guard owns the extent from here on: if the copy fails, panics
        // or this future is dropped, the extent goes back to the allocator.
        let slot = Slot {
            gpu: self.gpu.clone(),
            extent,
            header: block.header.clone(),
        };
        let payload = block.payload.clone();
        let slot = run_blocking(move || slot.gpu.write(slot.extent.offset, &payload).map(|()| slot))
            .await?
            .map_err(|e| self.copy_error("copying to device", key, e))?;
        self.index.insert(key, Arc::new(slot));
        Ok(())
    }

    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        let Some(slot) = self.index.get(key) else {
            return Ok(None);
        };
        let header = slot.header.clone();
        // The closure holds the slot until the copy is done, so the extent
        // cannot be reused under it even if the key is overwritten meanwhile.
        let data = run_blocking(move || slot.gpu.read(slot.extent.offset, slot.header.length as usize))
            .await?
            .map_err(|e| self.copy_error("copying from device", key, e))?;
        Ok(Some(Block {
            header,
            payload: Bytes::from(data),
        }))
    }

    async fn delete(&self, key: &ObjectKey) -> TierResult<bool> {
        Ok(self.index.remove(key))
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.index.contains(key)
    }

    /// Device memory does not survive a restart: this lists what the tier
    /// holds now.
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

    /// Opens a tier on device 0, or prints why the test is skipped.
    fn gpu_tier(capacity: u64) -> Option<HbmTier> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            println!("skipping: no CUDA driver");
            return None;
        }
        let t = HbmTier::try_new(capacity, 0).unwrap();
        if t.is_none() {
            println!("skipping: CUDA driver present but no usable device");
        }
        t
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hbm_conformance() {
        let Some(tier) = gpu_tier(4 << 20) else {
            return;
        };
        let tier = Arc::new(tier);
        crate::conformance::run_all(
            || {
                let t = tier.clone();
                async move { t }
            },
            false,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hbm_pins_the_host_arena_and_moves_blocks_between_them() {
        let Some(t) = gpu_tier(8 << 20) else { return };
        let host = Arc::new(crate::HostTier::new(8 << 20).unwrap());
        t.pin_host_arena(host.clone()).unwrap();
        // A host-tier block (a view of the pinned arena) goes to the GPU and back.
        let k = ObjectKey::new("ns", vec![7u8]);
        host.put(&k, &crate::conformance::block(7, 1 << 20), false)
            .await
            .unwrap();
        let b = host.get(&k).await.unwrap().unwrap();
        t.put(&k, &b, false).await.unwrap();
        assert_eq!(t.get(&k).await.unwrap().unwrap().payload, b.payload);
        drop(t); // unregisters before the arena goes
        assert_eq!(host.get(&k).await.unwrap().unwrap().payload, b.payload);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hbm_reader_keeps_extent_alive_across_overwrite() {
        let Some(t) = gpu_tier(1 << 20) else { return };
        let k = ObjectKey::new("ns", vec![1u8]);
        t.put(&k, &crate::conformance::block(1, 8192), false).await.unwrap();
        let held = t.index.get(&k).unwrap();
        t.put(&k, &crate::conformance::block(2, 8192), false).await.unwrap();
        assert_eq!(t.used(), 2 * 8192);
        assert_eq!(
            held.gpu.read(held.extent.offset, 8192).unwrap(),
            crate::conformance::payload(1, 8192)
        );
        drop(held);
        assert_eq!(t.used(), 8192);
        let got = t.get(&k).await.unwrap().unwrap();
        assert_eq!(got.payload, crate::conformance::payload(2, 8192));
        got.verify().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hbm_out_of_range_device_is_none() {
        if gpu_tier(1 << 20).is_none() {
            return;
        }
        assert!(HbmTier::try_new(1 << 20, 4096).unwrap().is_none());
    }

    #[test]
    fn hbm_zero_capacity_is_a_config_error() {
        assert!(matches!(HbmTier::try_new(100, 0), Err(TierError::Config(_))));
    }

    #[test]
    fn hbm_without_driver_is_none() {
        // SAFETY: only tries to dlopen the driver library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            println!("skipping: a CUDA driver is present");
            return;
        }
        assert!(HbmTier::try_new(1 << 20, 0).unwrap().is_none());
    }
}
