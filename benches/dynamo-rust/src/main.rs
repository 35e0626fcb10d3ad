//! Dynamo's Rust prefix index on `kvfabric-bench index`'s workload: the
//! same event stream and lookups (the generator is kvfabric's own
//! `benches/src/index_workload.rs`, included below), applied to
//! `dynamo_kv_router`'s `ConcurrentRadixTreeCompressed` through the
//! `ThreadPoolIndexer` that Dynamo's router uses (sticky per-worker writer
//! threads, lookups inline on the caller's thread).
//!
//! Args: `workers blocks event_blocks depth events lookups seed threads`.
//! Prints one JSON object with the fields of `kvfabric-bench index --json`.
//!
//! Mapping: a block id's low 64 bits are both its `ExternalSequenceBlockHash`
//! and its `LocalBlockHash` (random ids, so both are unique, as in the
//! Python harness); a store event carries its chain parent. Events are
//! converted before the clock starts; the timed phase is enqueueing them
//! all plus `flush()`, which returns once the writer threads have applied
//! every one. A lookup is `find_matches` on the whole chain (inline, so its
//! future completes on the first poll), and is checked to match the full
//! depth for some worker. Events the tree refuses (its metrics' statuses
//! other than `ok`, e.g. a store whose parent it no longer has) are
//! counted in `failed_events`; they count in events/s.

#[path = "../../src/index_workload.rs"]
mod index_workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use dynamo_kv_router::indexer::concurrent_radix_tree_compressed::ConcurrentRadixTreeCompressed;
use dynamo_kv_router::indexer::{KvIndexerInterface, KvIndexerMetrics, METRIC_STATUS_OK, ThreadPoolIndexer};
use dynamo_kv_router::protocols::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use index_workload::{Ev, Workload};
use prometheus::core::Collector;

type Index = ThreadPoolIndexer<ConcurrentRadixTreeCompressed>;

fn convert(evs: &[Ev], next_id: &mut u64) -> Vec<RouterEvent> {
    evs.iter()
        .map(|e| {
            *next_id += 1;
            let (worker, data) = match e {
                Ev::Store { worker, parent, blocks } => (
                    *worker,
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(|p| ExternalSequenceBlockHash(p as u64)),
                        start_position: None,
                        blocks: blocks
                            .iter()
                            .map(|&b| KvCacheStoredBlockData {
                                block_hash: ExternalSequenceBlockHash(b as u64),
                                tokens_hash: LocalBlockHash(b as u64),
                                mm_extra_info: None,
                            })
                            .collect(),
                    }),
                ),
                Ev::Remove { worker, blocks } => (
                    *worker,
                    KvCacheEventData::Removed(KvCacheRemoveData {
                        block_hashes: blocks.iter().map(|&b| ExternalSequenceBlockHash(b as u64)).collect(),
                    }),
                ),
            };
            RouterEvent::new(
                worker as u64,
                KvCacheEvent {
                    event_id: *next_id,
                    data,
                    dp_rank: 0,
                },
            )
        })
        .collect()
}

/// Polls a future that completes without waiting (inline lookups).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an inline lookup waited"),
    }
}

/// `n` timed lookups cycling through `chains`; sorted latencies (ns) and
/// lookups per second.
fn lookups(ix: &Index, chains: &[Vec<LocalBlockHash>], n: usize, depth: usize) -> (Vec<u64>, f64) {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let seq = chains[i % chains.len()].clone();
        let t = Instant::now();
        let scores = now(ix.find_matches(seq)).expect("find_matches");
        lat.push(t.elapsed().as_nanos() as u64);
        let best = scores.scores.values().copied().max().unwrap_or(0) as usize;
        assert_eq!(best, depth, "a resident chain matched only {best} of {depth} blocks");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (lat, rate)
}

fn pct(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("numeric arguments"))
        .collect();
    let [workers, blocks, event_blocks, depth, events, n_lookups, seed, threads] = a[..] else {
        panic!("usage: workers blocks event_blocks depth events lookups seed threads");
    };
    let wl = Workload::new(workers, blocks, depth, event_blocks, events, n_lookups, seed as u64);
    let mut id = 0;
    let fill = convert(&wl.fill, &mut id);
    let timed = convert(&wl.timed, &mut id);
    let churn = convert(&wl.churn, &mut id);
    let timed_blocks: usize = wl.timed.iter().map(|e| e.blocks().len()).sum();
    let chains: Vec<Vec<LocalBlockHash>> = wl
        .chains
        .iter()
        .map(|c| c.iter().map(|&b| LocalBlockHash(b as u64)).collect())
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let metrics = Arc::new(KvIndexerMetrics::new_unregistered());
    let ix = Arc::new(ThreadPoolIndexer::new_with_metrics(
        ConcurrentRadixTreeCompressed::new(),
        threads,
        16,
        Some(metrics.clone()),
    ));
    // Events the tree refused so far (any status but "ok").
    let refused = || -> u64 {
        metrics
            .kv_cache_events_applied
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.value() != METRIC_STATUS_OK && l.name() == "status")
            })
            .map(|m| m.get_counter().value() as u64)
            .sum()
    };
    rt.block_on(async {
        for e in fill {
            ix.apply_event(e).await;
        }
        ix.flush().await;
    });

    let n_timed = timed.len();
    let refused_before = refused();
    let start = Instant::now();
    rt.block_on(async {
        for e in timed {
            ix.apply_event(e).await;
        }
        ix.flush().await;
    });
    let secs = start.elapsed().as_secs_f64();
    let failed = refused() - refused_before;

    let (idle, lookups_per_s) = lookups(&ix, &chains, n_lookups, depth);

    // Lookups while another thread feeds events to the writer threads.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (ix, stop) = (ix.clone(), stop.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            handle.block_on(async {
                for e in churn {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    ix.apply_event(e).await;
                }
            })
        })
    };
    let (busy, _) = lookups(&ix, &chains, n_lookups, depth);
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder thread");
    rt.block_on(ix.flush());
    println!(
        "{}",
        serde_json::json!({
            "resident_pairs": wl.resident_pairs,
            "events_per_s": n_timed as f64 / secs,
            "blocks_per_s": timed_blocks as f64 / secs,
            "lookup_p50_ns": pct(&idle, 0.5),
            "lookup_p99_ns": pct(&idle, 0.99),
            "busy_lookup_p50_ns": pct(&busy, 0.5),
            "busy_lookup_p99_ns": pct(&busy, 0.99),
            "lookups_per_s": lookups_per_s,
            "failed_events": failed,
        })
    );
}
