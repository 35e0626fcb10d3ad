//! One cell of the peers matrix, the same for every Rust-driven system:
//! N clients, each puts its share of values under distinct keys, `batch`
//! values per call, then gets them all back; every value read is compared
//! byte for byte with what was written, after the timed region. GB/s is all
//! clients' bytes over the wall time from the common start to the last
//! client's end; the latency of an op is the latency of the call that
//! carried it (a batch completes as a whole).

use super::row::{Op, Path, PeerRow, System};
use crate::driver::key_bytes;
use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use kvfabric_bench::latency;
use kvfabric_bench::payload::{Payload, PayloadPool};
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of distinct payloads made per cell (values cycle through them;
/// the key is part of what is checked, so a read of the wrong key is caught
/// unless both keys map to the same payload).
const PAYLOAD_BUDGET: u64 = 64 << 20;

/// One (value size, clients) cell.
#[derive(Debug)]
pub(crate) struct Cell {
    /// Value size, bytes.
    pub(crate) size: u64,
    /// Concurrent clients.
    pub(crate) clients: usize,
    /// Values each client puts (distinct keys), then gets.
    pub(crate) per_client: u64,
    /// Values per call.
    pub(crate) batch: usize,
    pool: PayloadPool,
}

impl Cell {
    /// A cell; makes its payloads (before anything is timed).
    pub(crate) fn new(size: u64, clients: usize, per_client: u64, batch: usize) -> Cell {
        let pool = PayloadPool::within(
            size as usize,
            per_client * clients as u64,
            PAYLOAD_BUDGET,
            size ^ (clients as u64) << 32,
        );
        Cell {
            size,
            clients,
            per_client,
            batch: batch.max(1),
            pool,
        }
    }

    /// Values per client for `total` bytes in all (at least one).
    pub(crate) fn per_client_for(total: u64, size: u64, clients: usize) -> u64 {
        (total / (size * clients as u64).max(1)).max(1)
    }

    /// The value key `key` of client `client` holds.
    pub(crate) fn payload(&self, client: usize, key: u64) -> &Payload {
        self.pool.pick(client as u64 * self.per_client + key)
    }

    /// The key bytes of key `key` of client `client`.
    pub(crate) fn key(&self, client: usize, key: u64) -> Bytes {
        key_bytes(client, key)
    }

    /// Bytes each phase moves, all clients.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.size * self.per_client * self.clients as u64
    }

    /// The batches of one client: key ranges of at most `batch`.
    fn batches(&self) -> impl Iterator<Item = Range<u64>> + use<> {
        let (n, b) = (self.per_client, self.batch as u64);
        (0..n.div_ceil(b)).map(move |i| i * b..((i + 1) * b).min(n))
    }
}

/// A store the cell runner drives: batched puts and gets of one client.
pub(crate) trait BatchStore: Send + Sync + 'static {
    /// Puts keys `keys` of client `client` (values from `cell`).
    fn put_batch(
        &self,
        cell: &Cell,
        client: usize,
        keys: Range<u64>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Gets keys `keys` of client `client`, in order; a missing key is an error.
    fn get_batch(
        &self,
        cell: &Cell,
        client: usize,
        keys: Range<u64>,
    ) -> impl Future<Output = anyhow::Result<Vec<Bytes>>> + Send;
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// Bytes moved, all clients.
    pub(crate) bytes: u64,
    /// Common start to the last client's end.
    pub(crate) elapsed: Duration,
    /// Per-op latency, ns.
    pub(crate) latency: Histogram<u64>,
}

impl Phase {
    /// GB/s (10^9 bytes per second).
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }

    /// The row for this phase.
    pub(crate) fn row(&self, system: System, path: Path, op: Op, cell: &Cell) -> PeerRow {
        let q = |x: f64| (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(x) as f64 / 1e3);
        PeerRow::new(system, path, op, cell.size, cell.clients).measured(self.gbps(), q(0.5), q(0.99))
    }
}

/// Runs `body(client)` for every client concurrently, all released at once.
async fn phase<T, F, Fut>(cell: &Arc<Cell>, body: F) -> anyhow::Result<(Phase, Vec<T>)>
where
    T: Send + 'static,
    F: Fn(usize, Arc<Cell>) -> Fut,
    Fut: Future<Output = anyhow::Result<(Histogram<u64>, T)>> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(cell.clients + 1));
    let mut tasks = Vec::with_capacity(cell.clients);
    for c in 0..cell.clients {
        let (barrier, fut) = (barrier.clone(), body(c, cell.clone()));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = fut.await?;
            anyhow::Ok((r, Instant::now()))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut end = start;
    let mut hist = latency::histogram();
    let mut outs = Vec::with_capacity(cell.clients);
    for t in tasks {
        let ((h, out), finished) = t.await.context("client task panicked")??;
        hist.add(&h).expect("same histogram layout");
        outs.push(out);
        end = end.max(finished);
    }
    let p = Phase {
        bytes: cell.total_bytes(),
        elapsed: end - start,
        latency: hist,
    };
    Ok((p, outs))
}

fn record(h: &mut Histogram<u64>, d: Duration, ops: u64) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).clamp(1, h.high());
    h.record_n(ns, ops).expect("value within bounds");
}

/// Puts every value of `cell`, then gets them all back and checks them.
pub(crate) async fn run_cell<S: BatchStore>(store: Arc<S>, cell: Arc<Cell>) -> anyhow::Result<(Phase, Phase)> {
    let (put, _) = phase(&cell, |c, cell| {
        let store = store.clone();
        async move {
            let mut h = latency::histogram();
            for keys in cell.batches() {
                let n = keys.end - keys.start;
                let t0 = Instant::now();
                store
                    .put_batch(&cell, c, keys.clone())
                    .await
                    .with_context(|| format!("put of keys {keys:?} by client {c}"))?;
                record(&mut h, t0.elapsed(), n);
            }
            Ok((h, ()))
        }
    })
    .await?;
    let (get, values) = phase(&cell, |c, cell| {
        let store = store.clone();
        async move {
            let mut h = latency::histogram();
            let mut got = Vec::with_capacity(cell.per_client as usize);
            for keys in cell.batches() {
                let n = keys.end - keys.start;
                let t0 = Instant::now();
                let vs = store
                    .get_batch(&cell, c, keys.clone())
                    .await
                    .with_context(|| format!("get of keys {keys:?} by client {c}"))?;
                record(&mut h, t0.elapsed(), n);
                if vs.len() as u64 != n {
                    bail!("get of keys {keys:?} by client {c} returned {} values", vs.len());
                }
                got.extend(vs);
            }
            Ok((h, got))
        }
    })
    .await?;
    verify(&cell, &values)?;
    Ok((put, get))
}

/// Checks every value read (`values[client][key]`) against what was put.
pub(crate) fn verify(cell: &Cell, values: &[Vec<Bytes>]) -> anyhow::Result<()> {
    for (c, vs) in values.iter().enumerate() {
        if vs.len() as u64 != cell.per_client {
            bail!("client {c} read {} values, not {}", vs.len(), cell.per_client);
        }
        for (k, v) in vs.iter().enumerate() {
            let want = &cell.payload(c, k as u64).bytes;
            if v != want {
                bail!(
                    "key {k} of client {c}: read {} bytes that differ from the {} written",
                    v.len(),
                    want.len()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory store; optionally returns another key's value.
    #[derive(Default)]
    struct Mem {
        map: Mutex<HashMap<Bytes, Bytes>>,
        swap: bool,
    }

    impl BatchStore for Mem {
        async fn put_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<()> {
            let mut m = self.map.lock().unwrap();
            for k in keys {
                m.insert(cell.key(client, k), cell.payload(client, k).bytes.clone());
            }
            Ok(())
        }

        async fn get_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<Vec<Bytes>> {
            let m = self.map.lock().unwrap();
            keys.map(|k| {
                let k = if self.swap && k == 1 { 0 } else { k };
                m.get(&cell.key(client, k)).cloned().context("missing")
            })
            .collect()
        }
    }

    #[test]
    fn batches_cover_every_key_once() {
        let cell = Cell::new(4096, 1, 10, 4);
        let b: Vec<_> = cell.batches().collect();
        assert_eq!(b, [0..4, 4..8, 8..10]);
        assert_eq!(Cell::per_client_for(1 << 20, 4096, 4), 64);
        assert_eq!(Cell::per_client_for(1, 4096, 4), 1);
    }

    #[tokio::test]
    async fn runs_a_cell_and_catches_a_wrong_value() {
        let cell = Arc::new(Cell::new(4096, 3, 5, 2));
        let (put, get) = run_cell(Arc::new(Mem::default()), cell.clone()).await.unwrap();
        assert_eq!(put.bytes, 3 * 5 * 4096);
        assert_eq!(put.latency.len(), 15);
        assert_eq!(get.latency.len(), 15);
        let row = get.row(System::Redis, Path::Remote, Op::Get, &cell);
        assert!(row.gbps.unwrap() > 0.0 && row.p99_us.unwrap() >= row.p50_us.unwrap());

        let swapping = Arc::new(Mem {
            swap: true,
            ..Mem::default()
        });
        let err = run_cell(swapping, cell).await.unwrap_err();
        assert!(format!("{err:#}").contains("key 1 of client 0"), "{err:#}");
    }
}
