//! GPU side of the zero-copy local path (feature `cuda`): KV blocks move
//! between an engine's device memory and the node's host arena with async
//! copies on one CUDA stream, batched per call, with no bounce buffer.
//!
//! [`LocalClient::device_link`] loads the CUDA driver at run time (an error,
//! not a crash, without one), maps the arena a second time writable and
//! registers that mapping with `cuMemHostRegister`, so device-to-host copies
//! DMA straight into reserved slots and host-to-device copies read leased
//! slots at full PCIe speed. The CPU never writes through the second
//! mapping; only the GPU does, and only into slots this client reserved.

use super::mapping::DmaMapping;
use super::{LocalClient, Reservation, RoundSink};
use crate::client::{ClientError, Result};
use crate::proto::v1::{self, Durability, Tier};
use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys};
use std::sync::Arc;

/// One object to put from device memory.
#[derive(Clone, Copy, Debug)]
pub struct DevicePut<'a> {
    /// Key, 1 to 64 bytes.
    pub key: &'a [u8],
    /// Device address of the value (`CUdeviceptr`).
    pub ptr: u64,
    /// Value length in bytes.
    pub len: u64,
}

/// A client's link to one GPU: the context, the stream copies go on, and
/// the registered DMA mapping of the arena.
#[derive(Debug)]
pub struct DeviceLink {
    client: LocalClient,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    dma: Arc<DmaMapping>,
}

fn gpu_err(what: &str, e: impl std::fmt::Debug) -> ClientError {
    ClientError::Status {
        kind: crate::ErrorKind::Unavailable,
        code: tonic::Code::Unavailable,
        message: format!("{what}: {e:?}"),
    }
}

impl LocalClient {
    /// Opens CUDA device `ordinal` and registers the arena for DMA.
    pub fn device_link(&self, ordinal: usize) -> Result<DeviceLink> {
        // SAFETY: probing for the driver library has no preconditions.
        if !unsafe { sys::is_culib_present() } {
            return Err(gpu_err("CUDA driver", "libcuda is not present on this machine"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| gpu_err("opening the CUDA device", e))?;
        let stream = ctx.new_stream().map_err(|e| gpu_err("creating a CUDA stream", e))?;
        let dma = self
            .inner
            .map
            .map_writable_for_dma()
            .map_err(|e| gpu_err("mapping the arena for DMA", e))?;
        ctx.bind_to_thread()
            .map_err(|e| gpu_err("binding the CUDA context", e))?;
        // SAFETY: a valid, page-aligned mapping that outlives the registration
        // (unregistered in `Drop` before it is unmapped).
        unsafe {
            sys::cuMemHostRegister_v2(dma.ptr as *mut _, dma.len as usize, sys::CU_MEMHOSTREGISTER_PORTABLE)
                .result()
                .map_err(|e| gpu_err("cuMemHostRegister of the arena", e))?;
        }
        Ok(DeviceLink {
            client: self.clone(),
            ctx,
            stream,
            dma: Arc::new(dma),
        })
    }
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: registered in `device_link`; the mapping is still alive.
        unsafe {
            let _ = sys::cuMemHostUnregister(self.dma.ptr as *mut _).result();
        }
    }
}

/// Copies queued on the link's stream, run and awaited on the blocking pool.
struct Batch {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// (host address, device address, bytes, device-to-host?)
    ops: Vec<(usize, u64, usize, bool)>,
}

/// Queues one async copy per op on `stream` (the context bound to this thread).
fn enqueue(stream: &CudaStream, ops: &[(usize, u64, usize, bool)]) -> Result<()> {
    for &(host, dev, len, dtoh) in ops {
        // SAFETY: host ranges are reserved or leased slots of the registered
        // mapping; device ranges are the caller's (see the safety notes of
        // the public methods).
        let r = unsafe {
            if dtoh {
                sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev, len, stream.cu_stream())
            } else {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, len, stream.cu_stream())
            }
        };
        r.result().map_err(|e| gpu_err("queueing a copy", e))?;
    }
    Ok(())
}

impl Batch {
    async fn run(&mut self) -> Result<()> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.ops);
        let (ctx, stream) = (self.ctx.clone(), self.stream.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            ctx.bind_to_thread()
                .map_err(|e| gpu_err("binding the CUDA context", e))?;
            enqueue(&stream, &ops)?;
            stream.synchronize().map_err(|e| gpu_err("waiting for copies", e))
        })
        .await
        .map_err(|e| gpu_err("copy task", e))?
    }
}

impl Batch {
    /// Queues `ops` without waiting, recording an event after each chunk
    /// (`ends`: exclusive end index of each chunk, ascending, the last one
    /// `ops.len()`). Returns the events, one per chunk.
    async fn queue_with_events(&self, ops: Vec<(usize, u64, usize, bool)>, ends: Vec<usize>) -> Result<Vec<CudaEvent>> {
        let (ctx, stream) = (self.ctx.clone(), self.stream.clone());
        tokio::task::spawn_blocking(move || -> Result<Vec<CudaEvent>> {
            ctx.bind_to_thread()
                .map_err(|e| gpu_err("binding the CUDA context", e))?;
            let mut events = Vec::with_capacity(ends.len());
            let mut start = 0;
            for end in ends {
                enqueue(&stream, &ops[start..end])?;
                events.push(
                    stream
                        .record_event(None)
                        .map_err(|e| gpu_err("recording a CUDA event", e))?,
                );
                start = end;
            }
            Ok(events)
        })
        .await
        .map_err(|e| gpu_err("copy task", e))?
    }
}

/// Bytes of device puts committed together while later copies still run
/// (see [`DeviceLink::put_from_device`]): large enough that a commit's fixed
/// cost is amortised over several blocks, small enough that the first
/// commit starts early in a batch.
pub const PUT_CHUNK_BYTES: u64 = 8 << 20;

/// Splits objects of `lengths` into consecutive chunks of at least `target`
/// bytes (the last may be smaller); returns each chunk's exclusive end.
fn chunk_ends(lengths: &[u64], target: u64) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut acc = 0u64;
    for (i, &l) in lengths.iter().enumerate() {
        acc = acc.saturating_add(l);
        if acc >= target {
            ends.push(i + 1);
            acc = 0;
        }
    }
    if ends.last() != Some(&lengths.len()) {
        ends.push(lengths.len());
    }
    ends
}

impl DeviceLink {
    fn batch(&self) -> Batch {
        Batch {
            ctx: self.ctx.clone(),
            stream: self.stream.clone(),
            ops: Vec::new(),
        }
    }

    /// Stores objects straight from device memory: reserve, one async
    /// device-to-host copy per object into its slot, hash (when checksums
    /// are on), commit.
    ///
    /// Pipelined: every copy is queued at once, with a CUDA event after each
    /// chunk of about [`PUT_CHUNK_BYTES`]; a chunk is committed as soon as its
    /// event fires, while the DMA engine goes on with the next chunks, so
    /// the node's commit work overlaps the copies instead of following them.
    /// Objects are committed atomically one by one: when an error stops the
    /// call part-way, chunks already committed stay stored and the rest are
    /// given back.
    ///
    /// # Safety
    /// Every `ptr .. ptr + len` must be readable device memory of this
    /// link's device, unchanged until the call returns.
    pub async unsafe fn put_from_device(
        &self,
        namespace: &str,
        objects: &[DevicePut<'_>],
        durability: Durability,
    ) -> Result<Vec<Tier>> {
        crate::validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)?;
        for (i, o) in objects.iter().enumerate() {
            crate::validate::key(i, o.key).map_err(ClientError::InvalidArgument)?;
        }
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let lengths: Vec<u64> = objects.iter().map(|o| o.len).collect();
        let slots: Vec<Reservation> = self.client.reserve(&lengths).await?;
        let ends = chunk_ends(&lengths, PUT_CHUNK_BYTES);
        let ops: Vec<(usize, u64, usize, bool)> = objects
            .iter()
            .zip(&slots)
            .map(|(o, r)| (self.dma.ptr as usize + r.offset as usize, o.ptr, o.len as usize, true))
            .collect();
        let events = match self.batch().queue_with_events(ops, ends.clone()).await {
            Ok(ev) => ev,
            Err(e) => {
                self.give_back(slots).await;
                return Err(e);
            }
        };
        let checksums = self.client.inner.checksums.load(std::sync::atomic::Ordering::Relaxed);
        let mut tiers = Vec::with_capacity(objects.len());
        let mut first_err = None;
        let mut slots = slots.into_iter();
        let mut start = 0;
        for (end, event) in ends.into_iter().zip(events) {
            let chunk: Vec<Reservation> = slots.by_ref().take(end - start).collect();
            if let Err(e) = self.wait(event).await {
                self.give_back(chunk.into_iter().chain(slots).collect()).await;
                return Err(e);
            }
            let mut items = Vec::with_capacity(chunk.len());
            for (o, r) in objects[start..end].iter().zip(chunk) {
                // With checksums on, hash what landed in the slot.
                let sum = checksums.then(|| {
                    // SAFETY: the slot is ours and the copy into it has completed (its event fired).
                    let bytes =
                        unsafe { std::slice::from_raw_parts(self.client.inner.map.ptr_at(r.offset), r.len as usize) };
                    kvfabric_checksum(bytes)
                });
                items.push((r, Bytes::copy_from_slice(o.key), sum, None));
            }
            match self.client.commit(namespace, items, durability).await {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(t) => tiers.push(t),
                            Err(e) => {
                                first_err.get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    self.give_back(slots.collect()).await;
                    return Err(e);
                }
            }
            start = end;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(tiers),
        }
    }

    /// Gives reservations back once no copy queued on the link's stream can
    /// still write into them. When that cannot be known (the stream
    /// failed), they are left to expire into the node's quarantine instead.
    async fn give_back(&self, slots: Vec<Reservation>) {
        let (ctx, stream) = (self.ctx.clone(), self.stream.clone());
        let settled = tokio::task::spawn_blocking(move || ctx.bind_to_thread().is_ok() && stream.synchronize().is_ok())
            .await
            .unwrap_or(false);
        if settled {
            let _ = self.client.abort(slots).await;
        } else {
            tracing::warn!(
                slots = slots.len(),
                "device copies could not be confirmed finished; leaving the reservations to expire"
            );
        }
    }

    /// Waits (on the blocking pool) until `event`'s work has completed.
    async fn wait(&self, event: CudaEvent) -> Result<()> {
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            ctx.bind_to_thread()
                .map_err(|e| gpu_err("binding the CUDA context", e))?;
            event.synchronize().map_err(|e| gpu_err("waiting for copies", e))
        })
        .await
        .map_err(|e| gpu_err("copy task", e))?
    }

    /// Reads objects straight into device memory: acquire leases, one
    /// async host-to-device copy per object, one synchronisation, release.
    /// Returns, per key, the object's length (`None`: not stored).
    ///
    /// # Safety
    /// Every destination `(ptr, capacity)` must be writable device memory
    /// of this link's device that nothing else uses during the call.
    pub async unsafe fn get_into_device(
        &self,
        namespace: &str,
        keys: &[&[u8]],
        destinations: &[(u64, u64)],
    ) -> Result<Vec<Option<usize>>> {
        if keys.len() != destinations.len() {
            return Err(ClientError::InvalidArgument(format!(
                "{} keys but {} destinations",
                keys.len(),
                destinations.len()
            )));
        }
        struct ToDevice<'a> {
            dma: &'a DmaMapping,
            dst: &'a [(u64, u64)],
            lens: Vec<usize>,
            batch: Batch,
        }
        impl RoundSink for ToDevice<'_> {
            fn copy(&mut self, i: usize, l: &v1::LocalLease) -> Result<()> {
                let (ptr, cap) = self.dst[i];
                if l.length > cap {
                    return Err(ClientError::InvalidArgument(format!(
                        "destination {i} holds {cap} bytes; the object has {}",
                        l.length
                    )));
                }
                self.batch
                    .ops
                    .push((self.dma.ptr as usize + l.offset as usize, ptr, l.length as usize, false));
                self.lens[i] = l.length as usize;
                Ok(())
            }
            fn flush(&mut self) -> impl std::future::Future<Output = Result<()>> + Send {
                self.batch.run()
            }
        }
        let mut sink = ToDevice {
            dma: &self.dma,
            dst: destinations,
            lens: vec![0; keys.len()],
            batch: self.batch(),
        };
        let found = self.client.read_rounds(namespace, keys, &mut sink).await?;
        Ok(found.iter().zip(sink.lens).map(|(f, n)| f.then_some(n)).collect())
    }
}

fn kvfabric_checksum(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

#[cfg(test)]
mod tests {
    use super::chunk_ends;

    #[test]
    fn chunks_cover_every_object_in_order() {
        assert_eq!(chunk_ends(&[4, 4, 4, 4, 4], 8), vec![2, 4, 5]);
        assert_eq!(chunk_ends(&[16, 1, 1], 8), vec![1, 3]);
        assert_eq!(chunk_ends(&[1, 1], 8), vec![2]);
        assert_eq!(chunk_ends(&[8, 8], 8), vec![1, 2]);
        assert_eq!(chunk_ends(&[u64::MAX, 1], 8), vec![1, 2]);
    }
}
