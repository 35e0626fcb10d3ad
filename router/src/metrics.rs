//! Prometheus metrics of the router (`GET /metrics`, prefix
//! `kvfabric_router_`): requests by route and status with latency, routing
//! decisions per worker with the cached blocks they reuse by tier and the
//! prefill tokens saved, worker health and in-flight requests, event
//! ingestion counters (mirrored from [`EventCounters`] at scrape time),
//! event stream connections, and the index size.

use std::sync::atomic::Ordering::Relaxed;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::events::EventCounters;
use crate::index::PrefixIndex;

/// The `kind` label values of `worker_errors_total`.
pub const WORKER_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "body"];

/// The router's metrics registry and handles.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status code.
    pub requests: IntCounterVec,
    /// HTTP request latency by route (to the response headers).
    pub request_seconds: HistogramVec,
    /// Routing decisions by chosen worker.
    pub decisions: IntCounterVec,
    /// Cached blocks the chosen worker reuses, by worker and tier.
    pub cached_blocks: IntCounterVec,
    /// Prompt tokens not recomputed thanks to cached blocks, by worker.
    pub prefill_saved: IntCounterVec,
    /// Prompt tokens left to compute, by worker.
    pub prefill_tokens: IntCounterVec,
    /// 1 while a worker is healthy, by worker.
    pub worker_healthy: IntGaugeVec,
    /// Requests in flight, by worker.
    pub worker_inflight: IntGaugeVec,
    /// Worker failures seen by forwarded requests, by worker and kind
    /// (`connect`, `timeout`, `body`).
    pub worker_errors: IntCounterVec,
    /// 1 while an event stream is connected, by source (`fabric:NAME`,
    /// `engine:NAME`).
    pub stream_connected: IntGaugeVec,
    /// Event stream (re)connections, by source.
    pub stream_connects: IntCounterVec,
    events: IntCounterVec,
    index_blocks: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric names");
    c
}

impl Metrics {
    /// Drops every series of worker `name` (it was removed): its gauges
    /// would otherwise stay at their last value, and workers coming and
    /// going through the registry would grow the series without bound.
    pub fn forget_worker(&self, name: &str) {
        let _ = self.decisions.remove_label_values(&[name]);
        for t in crate::index::Tier::ALL {
            let _ = self.cached_blocks.remove_label_values(&[name, t.name()]);
        }
        let _ = self.prefill_saved.remove_label_values(&[name]);
        let _ = self.prefill_tokens.remove_label_values(&[name]);
        let _ = self.worker_healthy.remove_label_values(&[name]);
        let _ = self.worker_inflight.remove_label_values(&[name]);
        for kind in WORKER_ERROR_KINDS {
            let _ = self.worker_errors.remove_label_values(&[name, kind]);
        }
        self.forget_source(&format!("engine:{name}"));
    }

    /// Drops the series of event stream `source` (its task was stopped).
    pub fn forget_source(&self, source: &str) {
        let _ = self.stream_connected.remove_label_values(&[source]);
        let _ = self.stream_connects.remove_label_values(&[source]);
    }

    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("kvfabric_router".into()), None).expect("valid prefix");
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let gv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        Metrics {
            requests: cv(
                "requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            ),
            request_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "request_duration_seconds",
                        "HTTP latency to the response headers, by route",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                    &["route"],
                )
                .expect("valid"),
            ),
            decisions: cv("decisions_total", "routing decisions by chosen worker", &["worker"]),
            cached_blocks: cv(
                "cached_blocks_total",
                "cached blocks reused by the chosen worker, by tier",
                &["worker", "tier"],
            ),
            prefill_saved: cv(
                "prefill_tokens_saved_total",
                "prompt tokens served from cache instead of recomputed",
                &["worker"],
            ),
            prefill_tokens: cv(
                "prefill_tokens_total",
                "prompt tokens left to compute by the chosen worker",
                &["worker"],
            ),
            worker_healthy: gv("worker_healthy", "1 while the worker passes health checks", &["worker"]),
            worker_inflight: gv("worker_inflight_requests", "requests in flight", &["worker"]),
            worker_errors: cv(
                "worker_errors_total",
                "forwarded requests that failed at the worker, by kind",
                &["worker", "kind"],
            ),
            stream_connected: gv("event_stream_connected", "1 while the event stream is up", &["source"]),
            stream_connects: cv("event_stream_connects_total", "event stream connections", &["source"]),
            events: cv(
                "events_total",
                "event ingestion: applied, blocks_stored, blocks_removed, malformed, wrong_block_size, missing_tokens, unknown_parent, unknown_medium, gaps",
                &["counter"],
            ),
            index_blocks: reg(
                &r,
                IntGauge::new("index_blocks", "distinct blocks in the prefix index").expect("valid"),
            ),
            registry: r,
        }
    }

    /// Text exposition of every metric, mirroring the event counters and the
    /// index size first (counters move by the difference, so they stay
    /// monotonic).
    pub fn render(&self, counters: &EventCounters, index: &dyn PrefixIndex) -> String {
        let c = counters;
        for (name, v) in [
            ("applied", &c.applied),
            ("blocks_stored", &c.blocks_stored),
            ("blocks_removed", &c.blocks_removed),
            ("malformed", &c.malformed),
            ("wrong_block_size", &c.wrong_block_size),
            ("missing_tokens", &c.missing_tokens),
            ("unknown_parent", &c.unknown_parent),
            ("unknown_medium", &c.unknown_medium),
            ("gaps", &c.gaps),
        ] {
            let m = self.events.with_label_values(&[name]);
            let (cur, now) = (m.get(), v.load(Relaxed));
            if now > cur {
                m.inc_by(now - cur);
            }
        }
        self.index_blocks.set(index.len().min(i64::MAX as usize) as i64);
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding metrics failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
