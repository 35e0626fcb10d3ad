//! `kvfabric-bench gpu` (feature `cuda`): GPU memory <-> fabric through the
//! zero-copy local path, side by side with the raw copies that bound it,
//! measured in the same run on the same device.
//!
//! An in-process node (host tier only) serves a `LocalClient`, whose
//! [`DeviceLink`](kvfabric::local::DeviceLink) registers the node's arena
//! for DMA. For every block size, a batch of device buffers (64 MiB in all)
//! is stored with `put_from_device` (device -> arena slots, then commit) and
//! read back with `get_into_device` (lease -> arena -> device), `--rounds`
//! times after `--warmup` rounds; the device bytes are compared with the
//! originals at the end. The limits, on the same stream and sizes:
//!
//! - `raw-pinned`: one `cuMemcpy{DtoH,HtoD}Async` per block between the
//!   device buffers and page-locked host memory, one synchronisation per
//!   batch: what the DMA engine does with no fabric around it;
//! - `raw-pageable`: the same through ordinary (pageable) host memory, what
//!   an engine without pinned buffers gets.
//!
//! Rows report GB/s (median round), batch latency p50/p99 and the ratio to
//! `raw-pinned` for the same direction and size.

use anyhow::{Context, ensure};
use clap::Args;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, sys};
use kvfabric::client::{Durability, LocalClient};
use kvfabric::local::DevicePut;
use kvfabric::server::ByteSize;
use std::time::{Duration, Instant};

use crate::driver::grpc::{LocalNode, NodeTier};

/// Options of `gpu`.
#[derive(Args, Debug, Clone)]
pub(crate) struct GpuOpts {
    /// Block sizes (KiB/MiB = powers of 1024).
    #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB,16MiB")]
    sizes: Vec<ByteSize>,
    /// Bytes moved per batch (one `put_from_device` / `get_into_device` call).
    #[arg(long, default_value = "64MiB")]
    batch_bytes: ByteSize,
    /// Timed rounds per (size, path, direction).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Untimed rounds first (registration, first touch, driver warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

/// One measured row.
struct Row {
    path: &'static str,
    op: &'static str,
    size: usize,
    batch: usize,
    gbps: f64,
    p50: Duration,
    p99: Duration,
}

/// Times `rounds` calls of `f` after `warmup` untimed ones; returns the
/// sorted per-round durations.
fn time_rounds(
    warmup: usize,
    rounds: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

fn row(path: &'static str, op: &'static str, size: usize, batch: usize, times: &[Duration]) -> Row {
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let p50 = pick(0.5);
    Row {
        path,
        op,
        size,
        batch,
        gbps: (size * batch) as f64 / 1e9 / p50.as_secs_f64(),
        p50,
        p99: pick(0.99),
    }
}

/// Raw copies between `dev` buffers and `host` (consecutive `size`-byte
/// blocks), queued on `stream` and synchronised once.
///
/// # Safety
/// `host` must hold `dev.len() * size` bytes, valid for the whole call.
unsafe fn raw_batch(stream: &CudaStream, dev: &[u64], host: *mut u8, size: usize, dtoh: bool) -> anyhow::Result<()> {
    for (i, &d) in dev.iter().enumerate() {
        // SAFETY: per the contract, block i of `host` is valid; `d` is a live
        // device allocation of at least `size` bytes.
        let r = unsafe {
            let h = host.add(i * size);
            if dtoh {
                sys::cuMemcpyDtoHAsync_v2(h.cast(), d, size, stream.cu_stream())
            } else {
                sys::cuMemcpyHtoDAsync_v2(d, h.cast_const().cast(), size, stream.cu_stream())
            }
        };
        r.result().context("queueing a raw copy")?;
    }
    stream.synchronize().context("waiting for raw copies")?;
    Ok(())
}

/// Runs every size and prints the rows.
pub(crate) fn run(o: GpuOpts) -> anyhow::Result<()> {
    ensure!(o.rounds > 0, "--rounds must be above zero");
    ensure!(
        !o.sizes.is_empty() && o.sizes.iter().all(|s| s.0 > 0 && s.0 <= o.batch_bytes.0),
        "--sizes must be above zero and at most --batch-bytes"
    );
    // SAFETY: probing for the driver library has no preconditions.
    ensure!(
        unsafe { sys::is_culib_present() },
        "no CUDA driver (libcuda) on this machine"
    );
    let ctx = CudaContext::new(o.device).map_err(|e| anyhow::anyhow!("opening CUDA device {}: {e:?}", o.device))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let stream = ctx
        .new_stream()
        .map_err(|e| anyhow::anyhow!("creating a stream: {e:?}"))?;
    let batch_bytes = o.batch_bytes.0 as usize;

    let dir = tempfile::tempdir()?;
    // Room for one batch stored plus one batch of overwrites in flight.
    let node = LocalNode::start(
        dir.path(),
        NodeTier::Host,
        (batch_bytes * 3) as u64 + (64 << 20),
        64,
        "auto",
    )?;
    let socket = node.local_socket().context("the node serves no local path")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(LocalClient::connect(&socket))?;
    let link = client.device_link(o.device)?;

    // Page-locked host staging for the raw limit (portable, not write-combined).
    // SAFETY: the memory is written by the copies before anything reads it.
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(batch_bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }
        .map_err(|e| anyhow::anyhow!("allocating pinned host memory: {e:?}"))?;
    let pinned_ptr = pinned
        .as_mut_slice()
        .map_err(|e| anyhow::anyhow!("pinned slice: {e:?}"))?
        .as_mut_ptr();
    let mut pageable = vec![0u8; batch_bytes];

    let mut rows = Vec::new();
    for size in o.sizes.iter().map(|s| s.0 as usize) {
        let n = (batch_bytes / size).max(1);
        let values: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ size as u64;
                (0..size)
                    .map(|j| (seed.wrapping_add(j as u64 * 131) >> 7) as u8)
                    .collect()
            })
            .collect();
        let src: Vec<CudaSlice<u8>> = values
            .iter()
            .map(|v| stream.clone_htod(&v[..]))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("device alloc: {e:?}"))?;
        let dst: Vec<CudaSlice<u8>> = (0..n)
            .map(|_| stream.alloc_zeros::<u8>(size))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("device alloc: {e:?}"))?;
        stream.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let src_ptrs: Vec<u64> = src.iter().map(|s| s.device_ptr(&stream).0).collect();
        let dst_ptrs: Vec<u64> = dst.iter().map(|d| d.device_ptr(&stream).0).collect();
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("gpu-{size}-{i}").into_bytes()).collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let puts: Vec<DevicePut<'_>> = keys
            .iter()
            .zip(&src_ptrs)
            .map(|(k, &ptr)| DevicePut {
                key: k,
                ptr,
                len: size as u64,
            })
            .collect();
        let dests: Vec<(u64, u64)> = dst_ptrs.iter().map(|&p| (p, size as u64)).collect();

        let t = time_rounds(o.warmup, o.rounds, || {
            // SAFETY: the sources are live device memory of this device, unchanged meanwhile.
            rt.block_on(unsafe { link.put_from_device("gpu", &puts, Durability::Memory) })?;
            Ok(())
        })?;
        rows.push(row("fabric", "put_from_device", size, n, &t));
        let t = time_rounds(o.warmup, o.rounds, || {
            // SAFETY: the destinations are live device memory nothing else uses.
            let got = rt.block_on(unsafe { link.get_into_device("gpu", &key_refs, &dests) })?;
            ensure!(got.iter().all(|g| *g == Some(size)), "a block went missing");
            Ok(())
        })?;
        rows.push(row("fabric", "get_into_device", size, n, &t));
        for (d, v) in dst.iter().zip(&values) {
            let back = stream.clone_dtoh(d).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ensure!(
                back == *v,
                "device bytes differ after the fabric roundtrip ({size} B blocks)"
            );
        }

        // SAFETY: `pinned` and `pageable` hold batch_bytes >= n * size bytes.
        let t = time_rounds(o.warmup, o.rounds, || unsafe {
            raw_batch(&stream, &src_ptrs, pinned_ptr, size, true)
        })?;
        rows.push(row("raw-pinned", "dtoh", size, n, &t));
        let t = time_rounds(o.warmup, o.rounds, || unsafe {
            raw_batch(&stream, &dst_ptrs, pinned_ptr, size, false)
        })?;
        rows.push(row("raw-pinned", "htod", size, n, &t));
        let pg = pageable.as_mut_ptr();
        let t = time_rounds(o.warmup, o.rounds, || unsafe {
            raw_batch(&stream, &src_ptrs, pg, size, true)
        })?;
        rows.push(row("raw-pageable", "dtoh", size, n, &t));
        let t = time_rounds(o.warmup, o.rounds, || unsafe {
            raw_batch(&stream, &dst_ptrs, pg, size, false)
        })?;
        rows.push(row("raw-pageable", "htod", size, n, &t));
        // Free this size's keys before the next size (the arena holds ~one batch).
        let delete: Vec<bytes::Bytes> = keys.iter().map(|k| bytes::Bytes::copy_from_slice(k)).collect();
        rt.block_on(async {
            let c = kvfabric::client::Client::connect(node.endpoint()).await?;
            c.delete("gpu", delete).await
        })?;
    }
    drop(link);
    drop(client);
    drop(rt);
    node.shutdown();
    print_rows(&name, &rows, o.json);
    Ok(())
}

/// The limit a row is compared with: raw pinned copy, same direction and size.
fn limit(rows: &[Row], r: &Row) -> Option<f64> {
    let op = match r.op {
        "put_from_device" | "dtoh" => "dtoh",
        _ => "htod",
    };
    rows.iter()
        .find(|x| x.path == "raw-pinned" && x.op == op && x.size == r.size)
        .map(|x| x.gbps)
}

fn print_rows(device: &str, rows: &[Row], json: bool) {
    use kvfabric_bench::latency::format_ns;
    if json {
        for r in rows {
            let ratio = limit(rows, r).map(|l| r.gbps / l);
            println!(
                "{}",
                serde_json::json!({
                    "system": "kvfabric-gpu", "device": device, "path": r.path, "op": r.op,
                    "value_bytes": r.size, "batch": r.batch, "gbps": r.gbps,
                    "p50_us": r.p50.as_secs_f64() * 1e6, "p99_us": r.p99.as_secs_f64() * 1e6,
                    "ratio_to_raw_pinned": ratio,
                })
            );
        }
        return;
    }
    println!("device: {device}; GB/s of the median round; latency per batch");
    println!(
        "{:<13} {:<16} {:>9} {:>6} {:>8} {:>10} {:>10} {:>10}",
        "path", "op", "size", "batch", "GB/s", "p50", "p99", "vs pinned"
    );
    for r in rows {
        let ratio = limit(rows, r).map_or("-".into(), |l| format!("{:.2}x", r.gbps / l));
        println!(
            "{:<13} {:<16} {:>9} {:>6} {:>8.2} {:>10} {:>10} {:>10}",
            r.path,
            r.op,
            ByteSize(r.size as u64).to_string(),
            r.batch,
            r.gbps,
            format_ns(r.p50.as_nanos() as f64),
            format_ns(r.p99.as_nanos() as f64),
            ratio
        );
    }
}
