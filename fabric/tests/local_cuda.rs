//! GPU <-> fabric through the zero-copy local path (feature `cuda`): runs
//! where a CUDA device is present and prints why it skips otherwise. Also
//! prints GB/s through the fabric next to a raw device<->host copy of the
//! same sizes (measured here for the record, never asserted).
#![cfg(feature = "cuda")]

mod common;

use common::{payload, settings, start};
use cudarc::driver::{CudaContext, DevicePtr};
use kvfabric::client::{Durability, LocalClient};
use kvfabric::local::DevicePut;
use std::time::Instant;

fn gpu() -> Option<std::sync::Arc<CudaContext>> {
    // SAFETY: probing for the driver library has no preconditions.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipping: no CUDA driver on this machine");
        return None;
    }
    match CudaContext::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("skipping: no usable CUDA device ({e:?})");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_from_device_and_get_into_device_roundtrip() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (node, _grpc) = start(settings(dir.path(), 1 << 30, 0)).await;
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap()).await.unwrap();
    let link = local.device_link(0).unwrap();
    let stream = ctx.default_stream();
    for &size in &[256usize << 10, 1 << 20, 4 << 20] {
        let n = 32;
        let values: Vec<_> = (0..n).map(|i| payload(i as u64 + size as u64, size)).collect();
        let src: Vec<_> = values.iter().map(|v| stream.clone_htod(&v[..]).unwrap()).collect();
        let dst: Vec<_> = (0..n).map(|_| stream.alloc_zeros::<u8>(size).unwrap()).collect();
        stream.synchronize().unwrap();
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("{size}-{i}").into_bytes()).collect();
        let puts: Vec<DevicePut<'_>> = keys
            .iter()
            .zip(&src)
            .map(|(k, s)| DevicePut {
                key: k,
                ptr: s.device_ptr(&stream).0,
                len: size as u64,
            })
            .collect();
        let t = Instant::now();
        // SAFETY: the source buffers are live device memory of device 0.
        unsafe { link.put_from_device("gpu", &puts, Durability::Memory).await.unwrap() };
        let put_s = t.elapsed().as_secs_f64();
        let krefs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let dests: Vec<(u64, u64)> = dst.iter().map(|d| (d.device_ptr(&stream).0, size as u64)).collect();
        let t = Instant::now();
        // SAFETY: the destinations are live device memory of device 0, unused meanwhile.
        let got = unsafe { link.get_into_device("gpu", &krefs, &dests).await.unwrap() };
        let get_s = t.elapsed().as_secs_f64();
        assert!(got.iter().all(|g| *g == Some(size)));
        for (d, v) in dst.iter().zip(&values) {
            assert_eq!(
                stream.clone_dtoh(d).unwrap(),
                v.to_vec(),
                "device bytes differ after the roundtrip"
            );
        }
        // Raw copies of the same sizes for comparison (pageable host memory
        // here; pinned would be faster still).
        let mut host = vec![0u8; size];
        let t = Instant::now();
        for s in &src {
            stream.memcpy_dtoh(s, &mut host).unwrap();
        }
        stream.synchronize().unwrap();
        let raw_dtoh = t.elapsed().as_secs_f64();
        let mut scratch = stream.alloc_zeros::<u8>(size).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            stream.memcpy_htod(&host, &mut scratch).unwrap();
        }
        stream.synchronize().unwrap();
        let raw_htod = t.elapsed().as_secs_f64();
        let gb = (n * size) as f64 / 1e9;
        println!(
            "size {size}: put_from_device {:.2} GB/s (raw dtoh {:.2}), get_into_device {:.2} GB/s (raw htod {:.2})",
            gb / put_s,
            gb / raw_dtoh,
            gb / get_s,
            gb / raw_htod
        );
    }
    drop(link);
    node.shutdown().await;
}
