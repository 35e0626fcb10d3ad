//! The workload driver behind `kvfabric-bench`: N concurrent workers put
//! then get blocks of one size against a [`Store`] (a kvfabric node over
//! gRPC, or the disk tier called directly), timing every operation.
//!
//! Each worker cycles over its own ring of keys (`ring` keys, so the
//! working set stays bounded however long a phase runs); key `k` of worker
//! `w` always holds the same payload, so every get is checked byte for byte.
//! The submodules own the stores (`grpc`, `disk`), the fio limit (`fio`) and
//! the result table (`report`).

pub(crate) mod cluster;
pub(crate) mod control;
pub(crate) mod disk;
pub(crate) mod fio;
pub(crate) mod grpc;
pub(crate) mod repair;
pub(crate) mod report;

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use kvfabric_bench::latency;
use kvfabric_bench::payload::{Payload, PayloadPool};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a phase runs, per worker.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Budget {
    /// Exactly this many operations per worker.
    Ops(u64),
    /// Operations until this much time has passed (at least one per worker).
    Time(Duration),
}

/// One workload configuration: block size, concurrency, key ring, budget.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    /// Concurrent workers.
    pub(crate) workers: usize,
    /// Keys per worker.
    pub(crate) ring: u64,
    /// Operations (or time) per worker and phase.
    pub(crate) budget: Budget,
    /// The payloads, all of the block size.
    pub(crate) pool: Arc<PayloadPool>,
}

impl Spec {
    /// Keys per worker so that all workers together hold at most
    /// `working_set` bytes (at least one key; no more than the ops budget).
    pub(crate) fn ring_for(size: u64, workers: usize, working_set: u64, budget: Budget) -> u64 {
        let ring = (working_set / (size * workers as u64).max(1)).max(1);
        match budget {
            Budget::Ops(n) => ring.min(n.max(1)),
            Budget::Time(_) => ring,
        }
    }

    /// The payload key `key` of worker `worker` holds.
    pub(crate) fn payload(&self, worker: usize, key: u64) -> &Payload {
        self.pool.pick(worker as u64 * self.ring + key)
    }
}

/// The key bytes of key `key` of worker `worker`: 4 + 8 bytes, big-endian.
pub(crate) fn key_bytes(worker: usize, key: u64) -> Bytes {
    let mut k = Vec::with_capacity(12);
    k.extend_from_slice(&(worker as u32).to_be_bytes());
    k.extend_from_slice(&key.to_be_bytes());
    Bytes::from(k)
}

/// Something blocks can be put into and read back from.
pub(crate) trait Store: Send + Sync + 'static {
    /// Stores `value` under key `key` of worker `worker`.
    fn put(&self, worker: usize, key: u64, value: &Payload) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Reads key `key` of worker `worker`; `None` if absent.
    fn get(&self, worker: usize, key: u64) -> impl Future<Output = anyhow::Result<Option<Bytes>>> + Send;
}

/// What one phase (all workers) measured.
#[derive(Debug, Clone)]
pub(crate) struct PhaseResult {
    /// Operations completed, all workers.
    pub(crate) ops: u64,
    /// Payload bytes moved, all workers.
    pub(crate) bytes: u64,
    /// Wall time from the common start to the last worker's end.
    pub(crate) elapsed: Duration,
    /// Latency of each operation, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
}

impl PhaseResult {
    /// Bytes per second, all workers together.
    pub(crate) fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn done(budget: Budget, ops: u64, start: Instant) -> bool {
    match budget {
        Budget::Ops(n) => ops >= n,
        Budget::Time(d) => ops > 0 && start.elapsed() >= d,
    }
}

/// Runs `op(worker, i)` for every worker concurrently until the budget is
/// spent; returns the merged result and each worker's operation count.
async fn run_phase<F, Fut>(spec: &Spec, op: F) -> anyhow::Result<(PhaseResult, Vec<u64>)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let barrier = Arc::new(tokio::sync::Barrier::new(spec.workers + 1));
    let budget = spec.budget;
    let mut tasks = Vec::with_capacity(spec.workers);
    for w in 0..spec.workers {
        let (op, barrier) = (op.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = latency::histogram();
            let mut ops = 0u64;
            barrier.wait().await;
            let start = Instant::now();
            while !done(budget, ops, start) {
                let t0 = Instant::now();
                op(w, ops).await?;
                latency::record(&mut h, t0.elapsed());
                ops += 1;
            }
            anyhow::Ok((ops, h, Instant::now()))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut latency = latency::histogram();
    let mut per_worker = Vec::with_capacity(spec.workers);
    let mut end = start;
    for t in tasks {
        let (ops, h, finished) = t.await.context("worker task panicked")??;
        latency.add(&h).expect("same histogram layout");
        per_worker.push(ops);
        end = end.max(finished);
    }
    let ops: u64 = per_worker.iter().sum();
    let result = PhaseResult {
        ops,
        bytes: ops * spec.pool.size() as u64,
        elapsed: end - start,
        latency,
    };
    Ok((result, per_worker))
}

/// The put phase: worker `w`'s `i`-th put writes key `i % ring`. Returns the
/// result and, per worker, how many distinct keys it wrote.
pub(crate) async fn put_phase<S: Store>(store: Arc<S>, spec: &Spec) -> anyhow::Result<(PhaseResult, Vec<u64>)> {
    let s = spec.clone();
    let (r, ops) = run_phase(spec, move |w, i| {
        let (store, s) = (store.clone(), s.clone());
        async move {
            let k = i % s.ring;
            store
                .put(w, k, s.payload(w, k))
                .await
                .with_context(|| format!("put of key {k} by worker {w}"))
        }
    })
    .await?;
    let written = ops.iter().map(|&n| n.min(spec.ring)).collect();
    Ok((r, written))
}

/// The get phase: worker `w`'s `i`-th get reads key `i % written[w]` and
/// checks it against the payload that key was written with.
pub(crate) async fn get_phase<S: Store>(store: Arc<S>, spec: &Spec, written: &[u64]) -> anyhow::Result<PhaseResult> {
    let s = spec.clone();
    let written: Arc<[u64]> = written.into();
    let (r, _) = run_phase(spec, move |w, i| {
        let (store, s, written) = (store.clone(), s.clone(), written.clone());
        async move {
            let k = i % written[w].max(1);
            let got = store
                .get(w, k)
                .await
                .with_context(|| format!("get of key {k} by worker {w}"))?;
            let want = &s.payload(w, k).bytes;
            match got {
                None => bail!("key {k} of worker {w} is missing"),
                Some(v) if v != *want => bail!(
                    "key {k} of worker {w}: read {} bytes that differ from the {} written",
                    v.len(),
                    want.len()
                ),
                Some(_) => Ok(()),
            }
        }
    })
    .await?;
    Ok(r)
}
