//! Prometheus metrics of a worker (`GET /metrics`, prefix
//! `kvfabric_worker_`), one registry per worker so several can run in one
//! process, and the [`WorkerStats`] snapshot tests and the demo read.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `queue_depth` | gauge | requests accepted but not yet prefilled |
//! | `running_sequences` | gauge | sequences decoding |
//! | `prefill_tokens_total` | counter | `source`: `computed`, `own_pool`, `fabric` |
//! | `decode_tokens_total` | counter | |
//! | `prefill_batches_total`, `decode_steps_total` | counter | |
//! | `requests_total` | counter | `endpoint`, `status` |
//! | `ttft_seconds`, `itl_seconds`, `request_seconds` | histogram | |
//! | `remote_prefill_total` | counter | `outcome`: `attempted`, `succeeded`, `fell_back` |
//! | `pool_blocks` | gauge | `state`: `free`, `cached` (own prefix cache), `capacity` |
//! | `own_cache_evictions_total` | counter | |
//! | `fabric_blocks_total` | counter | `op`: `loaded`, `stored` (from the fabric connector) |
//! | `fabric_local_blocks_total` | counter | `op`: `loaded`, `stored`: of those, the blocks moved through the node's zero-copy local path (`fabric-socket`) |
//! | `fabric_layout_mismatches_total`, `fabric_bad_lengths_total` | counter | (from the fabric connector) |
//! | `fabric_errors_total` | counter | `op`: `connect`, `exists`, `load`, `store` |
//! | `kv_events_total` | counter | `state`: `queued`, `published`, `dropped` |

use std::sync::atomic::Ordering::Relaxed;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::fabric_kv::FabricKvCounters;

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric names");
    c
}

/// The worker's metrics registry and handles (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) queue_depth: IntGauge,
    pub(crate) running: IntGauge,
    pub(crate) prefill_tokens: IntCounterVec,
    pub(crate) decode_tokens: IntCounter,
    pub(crate) prefill_batches: IntCounter,
    pub(crate) decode_steps: IntCounter,
    pub(crate) requests: IntCounterVec,
    pub(crate) ttft: Histogram,
    pub(crate) itl: Histogram,
    pub(crate) request_seconds: Histogram,
    pub(crate) remote_prefill: IntCounterVec,
    pub(crate) pool_blocks: IntGaugeVec,
    pub(crate) evictions: IntCounter,
    pub(crate) fabric_blocks: IntCounterVec,
    pub(crate) fabric_local_blocks: IntCounterVec,
    pub(crate) layout_mismatches: IntCounter,
    pub(crate) bad_lengths: IntCounter,
    pub(crate) fabric_errors: IntCounterVec,
    pub(crate) kv_events: IntCounterVec,
    /// Held while the fabric counters are mirrored: two scrapes at once
    /// would each add the same difference.
    mirroring: std::sync::Arc<std::sync::Mutex<()>>,
}

/// Latency buckets, seconds: 1 ms to 60 s.
const BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub(crate) fn new() -> Metrics {
        let r = Registry::new_custom(Some("kvfabric_worker".into()), None).expect("valid prefix");
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let c = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        let g = |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid"));
        let h = |name: &str, help: &str| {
            reg(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec())).expect("valid"),
            )
        };
        let m = Metrics {
            mirroring: Default::default(),
            queue_depth: g("queue_depth", "Requests accepted but not yet prefilled."),
            running: g("running_sequences", "Sequences decoding."),
            prefill_tokens: cv(
                "prefill_tokens_total",
                "Prompt tokens by where their KV came from: computed, own_pool, fabric.",
                &["source"],
            ),
            decode_tokens: c("decode_tokens_total", "Tokens computed by decode steps."),
            prefill_batches: c("prefill_batches_total", "Prefill batches run."),
            decode_steps: c("decode_steps_total", "Decode steps run."),
            requests: cv(
                "requests_total",
                "HTTP requests by endpoint and status code.",
                &["endpoint", "status"],
            ),
            ttft: h("ttft_seconds", "Time to first token, from request arrival."),
            itl: h("itl_seconds", "Time between consecutive tokens of a request."),
            request_seconds: h("request_seconds", "Time from request arrival to its last byte."),
            remote_prefill: cv(
                "remote_prefill_total",
                "Remote prefills: attempted, succeeded, fell_back (prefilled locally after a failure).",
                &["outcome"],
            ),
            pool_blocks: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "pool_blocks",
                        "KV pool blocks: free, cached (own prefix cache), capacity.",
                    ),
                    &["state"],
                )
                .expect("valid"),
            ),
            evictions: c("own_cache_evictions_total", "Blocks evicted from the own prefix cache."),
            fabric_blocks: cv(
                "fabric_blocks_total",
                "KV blocks loaded from and stored into the fabric.",
                &["op"],
            ),
            fabric_local_blocks: cv(
                "fabric_local_blocks_total",
                "KV blocks loaded from and stored into the fabric through its zero-copy local path.",
                &["op"],
            ),
            layout_mismatches: c(
                "fabric_layout_mismatches_total",
                "Fabric blocks not loaded: another model's layout.",
            ),
            bad_lengths: c("fabric_bad_lengths_total", "Fabric blocks not loaded: wrong length."),
            fabric_errors: cv("fabric_errors_total", "Failed fabric calls by operation.", &["op"]),
            kv_events: cv(
                "kv_events_total",
                "KV event batches: queued, published, dropped.",
                &["state"],
            ),
            registry: r,
        };
        for s in ["computed", "own_pool", "fabric"] {
            m.prefill_tokens.with_label_values(&[s]);
        }
        for o in ["attempted", "succeeded", "fell_back"] {
            m.remote_prefill.with_label_values(&[o]);
        }
        for op in ["loaded", "stored"] {
            m.fabric_blocks.with_label_values(&[op]);
            m.fabric_local_blocks.with_label_values(&[op]);
        }
        m
    }

    /// Mirrors the fabric connector's counters.
    pub(crate) fn mirror_fabric(&self, c: &FabricKvCounters) {
        let _one_at_a_time = self.mirroring.lock().unwrap_or_else(|e| e.into_inner());
        let up = |m: &IntCounter, v: u64| {
            let cur = m.get();
            if v > cur {
                m.inc_by(v - cur);
            }
        };
        up(
            &self.fabric_blocks.with_label_values(&["loaded"]),
            c.blocks_loaded.load(Relaxed),
        );
        up(
            &self.fabric_blocks.with_label_values(&["stored"]),
            c.blocks_stored.load(Relaxed),
        );
        up(
            &self.fabric_local_blocks.with_label_values(&["loaded"]),
            c.blocks_loaded_local.load(Relaxed),
        );
        up(
            &self.fabric_local_blocks.with_label_values(&["stored"]),
            c.blocks_stored_local.load(Relaxed),
        );
        up(&self.layout_mismatches, c.layout_mismatches.load(Relaxed));
        up(&self.bad_lengths, c.bad_lengths.load(Relaxed));
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The snapshot.
    pub(crate) fn stats(&self) -> WorkerStats {
        let count = |v: &IntCounterVec, l: &str| v.with_label_values(&[l]).get();
        let requests = |ok: bool| {
            self.requests
                .collect()
                .iter()
                .flat_map(|f| f.get_metric().iter())
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "status" && l.value().starts_with('2') == ok)
                })
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        };
        WorkerStats {
            queue_depth: self.queue_depth.get().max(0) as u64,
            running: self.running.get().max(0) as u64,
            prefill_tokens_computed: count(&self.prefill_tokens, "computed"),
            prefill_tokens_own_pool: count(&self.prefill_tokens, "own_pool"),
            prefill_tokens_fabric: count(&self.prefill_tokens, "fabric"),
            decode_tokens: self.decode_tokens.get(),
            requests_ok: requests(true),
            requests_failed: requests(false),
            remote_prefill_attempts: count(&self.remote_prefill, "attempted"),
            remote_prefill_successes: count(&self.remote_prefill, "succeeded"),
            remote_prefill_fallbacks: count(&self.remote_prefill, "fell_back"),
            cached_blocks: self.pool_blocks.with_label_values(&["cached"]).get().max(0) as u64,
            free_blocks: self.pool_blocks.with_label_values(&["free"]).get().max(0) as u64,
            evicted_blocks: self.evictions.get(),
            fabric_blocks_loaded: count(&self.fabric_blocks, "loaded"),
            fabric_blocks_stored: count(&self.fabric_blocks, "stored"),
            fabric_local_blocks_loaded: count(&self.fabric_local_blocks, "loaded"),
            fabric_local_blocks_stored: count(&self.fabric_local_blocks, "stored"),
            fabric_layout_mismatches: self.layout_mismatches.get(),
            kv_event_batches_published: count(&self.kv_events, "published"),
            kv_event_batches_dropped: count(&self.kv_events, "dropped"),
        }
    }
}

/// A snapshot of a worker's counters and gauges (the same numbers as
/// `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Requests accepted but not yet prefilled.
    pub queue_depth: u64,
    /// Sequences decoding.
    pub running: u64,
    /// Prompt tokens computed by this worker's prefills.
    pub prefill_tokens_computed: u64,
    /// Prompt tokens whose KV came from the worker's own pool.
    pub prefill_tokens_own_pool: u64,
    /// Prompt tokens whose KV was loaded from the fabric.
    pub prefill_tokens_fabric: u64,
    /// Tokens computed by decode steps.
    pub decode_tokens: u64,
    /// Requests answered with a 2xx status.
    pub requests_ok: u64,
    /// Requests answered with another status.
    pub requests_failed: u64,
    /// Remote prefills attempted.
    pub remote_prefill_attempts: u64,
    /// Remote prefills that succeeded.
    pub remote_prefill_successes: u64,
    /// Remote prefills that failed (the request was prefilled locally).
    pub remote_prefill_fallbacks: u64,
    /// Blocks in the own prefix cache.
    pub cached_blocks: u64,
    /// Free blocks in the pool.
    pub free_blocks: u64,
    /// Blocks evicted from the own prefix cache.
    pub evicted_blocks: u64,
    /// Blocks loaded from the fabric.
    pub fabric_blocks_loaded: u64,
    /// Blocks stored into the fabric.
    pub fabric_blocks_stored: u64,
    /// Of `fabric_blocks_loaded`, those read through the zero-copy local path.
    pub fabric_local_blocks_loaded: u64,
    /// Of `fabric_blocks_stored`, those written through the zero-copy local path.
    pub fabric_local_blocks_stored: u64,
    /// Fabric blocks refused for another model's layout.
    pub fabric_layout_mismatches: u64,
    /// KV event batches sent on the PUB socket.
    pub kv_event_batches_published: u64,
    /// KV event batches dropped (queue full or send failure).
    pub kv_event_batches_dropped: u64,
}
