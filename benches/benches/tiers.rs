//! Criterion micro-benchmarks of every tier's `put` and `get` (host arena,
//! disk with io_uring, disk with psync, object store on a `file://`
//! directory) for 64 KiB to 4 MiB blocks, with throughput in bytes, next to
//! a `memcpy` group of the same sizes: the ceiling any of them could reach
//! (page-aligned buffers, plus the destination 16 bytes off, a layout some
//! CPUs copy far slower).
//!
//! Each tier is opened once in a temporary directory; puts cycle over a
//! small ring of keys (32 MiB per size) so the tier never fills, and gets
//! read keys written beforehand. Run with `cargo bench -p kvfabric-bench`;
//! the whole suite takes a few minutes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvfabric_bench::memcpy::PageBuf;
use kvfabric_bench::payload::payload;
use kvfabric_tiers::{
    Block, DiskTier, DiskTierConfig, HostTier, IoEngineKind, Layout, ObjectKey, ObjectTier, ObjectTierConfig, Tier,
};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Block sizes benchmarked.
const SIZES: [usize; 4] = [64 * KIB, 256 * KIB, MIB, 4 * MIB];
/// Bytes of keys each size cycles over.
const RING_BYTES: usize = 32 * MIB;
/// Tier capacity: every size's ring plus room for overwrites.
const CAPACITY: u64 = (SIZES.len() * RING_BYTES + 32 * MIB) as u64;

fn label(size: usize) -> String {
    if size >= MIB {
        format!("{}MiB", size / MIB)
    } else {
        format!("{}KiB", size / KIB)
    }
}

fn ring(size: usize) -> u64 {
    (RING_BYTES / size).max(4) as u64
}

fn key(size: usize, i: u64) -> ObjectKey {
    ObjectKey::new(format!("s{size}"), i.to_be_bytes().to_vec())
}

/// Put and get benchmarks of one tier, in a group named `name`.
fn bench_tier(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, tier: Arc<dyn Tier>) {
    let mut g = c.benchmark_group(name);
    for size in SIZES {
        let block = Block::new(payload(size as u64, size), Layout::default(), 0);
        let n = ring(size);
        g.throughput(Throughput::Bytes(size as u64));
        let mut next = 0u64;
        g.bench_function(BenchmarkId::new("put", label(size)), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        tier.put(&key(size, next % n), &block, false).await.expect("put");
                        next += 1;
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(async {
            for i in 0..n {
                tier.put(&key(size, i), &block, false).await.expect("put");
            }
        });
        let mut next = 0u64;
        g.bench_function(BenchmarkId::new("get", label(size)), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let got = tier.get(&key(size, next % n)).await.expect("get");
                        assert_eq!(black_box(got).map(|b| b.payload.len()), Some(size));
                        next += 1;
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(async {
            for i in 0..n {
                tier.delete(&key(size, i)).await.expect("delete");
            }
        });
    }
    g.finish();
}

fn disk(dir: &std::path::Path, engine: IoEngineKind) -> Option<Arc<dyn Tier>> {
    let mut cfg = DiskTierConfig::new(dir, CAPACITY);
    cfg.engine = engine;
    match DiskTier::open(cfg) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            eprintln!("skipping the disk tier with {engine}: {e}");
            None
        }
    }
}

fn tiers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temporary directory");

    let host: Arc<dyn Tier> = Arc::new(HostTier::new(CAPACITY).expect("host tier"));
    bench_tier(c, &rt, "host", host);

    for (engine, name) in [
        (IoEngineKind::Uring, "disk-io_uring"),
        (IoEngineKind::Psync, "disk-psync"),
    ] {
        if let Some(t) = disk(&dir.path().join(name), engine) {
            bench_tier(c, &rt, name, t);
        }
    }

    let url = format!("file://{}", dir.path().join("object").display());
    let object: Arc<dyn Tier> = Arc::new(
        rt.block_on(ObjectTier::open(ObjectTierConfig::new(url)))
            .expect("object tier"),
    );
    bench_tier(c, &rt, "object-file", object);
}

/// The ceiling: copying a block between two page-aligned buffers; and the
/// same with the destination 16 bytes past a page boundary, which some
/// CPU/libc pairs copy many times slower (see `kvfabric_bench::memcpy`).
fn memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for (name, skew) in [("aligned", 0), ("dst+16", 16)] {
            let src = PageBuf::new(size, 0, 1);
            let mut dst = PageBuf::new(size, skew, 2);
            g.bench_function(BenchmarkId::new(name, label(size)), |b| {
                b.iter(|| {
                    dst.as_mut_slice().copy_from_slice(black_box(src.as_slice()));
                    black_box(dst.as_mut_slice());
                })
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = memcpy, tiers
}
criterion_main!(benches);
