//! Prometheus metrics of a node: per-tier counters and gauges mirrored from
//! the tier stack at scrape time, plus RPC latency histograms, error counts,
//! bytes in/out and forwarded requests recorded by the service.

use kvfabric_tiers::TierStack;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The node's metrics registry and handles.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// RPC latency by method.
    pub rpc_seconds: HistogramVec,
    /// RPC errors by method and gRPC code.
    pub rpc_errors: IntCounterVec,
    /// Payload bytes received (`in`) and sent (`out`) over gRPC.
    pub rpc_bytes: IntCounterVec,
    /// Requests a cluster node carried out on other nodes (the keys'
    /// owners), by method.
    pub forwarded: IntCounterVec,
    /// Repair passes run (cluster mode).
    pub repair_passes: IntCounter,
    /// Objects repair copied to owners (`copied`), removed here once
    /// their owners held them (`handed_off`), or dropped as stale
    /// (`dropped_stale`).
    pub repair_objects: IntCounterVec,
    /// Payload bytes repair copied to other nodes.
    pub repair_bytes: IntCounter,
    /// Key tombstones dropped, oldest first, to stay within
    /// `cluster.max-tombstones`.
    pub tombstones_evicted: IntCounter,
    /// Objects and chain keys this node's forwarded reads found only at a
    /// previous owner (mirrored at scrape time, see [`Self::mirror_handoff_reads`]).
    pub handoff_reads: IntCounter,
    /// 1 while this node's reads still ask earlier owners after a
    /// membership change (the members have not all reported the hand-off
    /// done, and the window is open), else 0; set at scrape time.
    pub handoff_pending: IntGauge,
    /// Objects this node is responsible for with fewer copies than their
    /// namespace asks for, after the last repair pass.
    pub under_replicated: IntGauge,
    /// Calls refused by authentication: no token (`missing`), a token the
    /// node does not accept (`unknown`), or one that does not allow the
    /// call (`denied`).
    pub auth_failures: IntCounterVec,
    /// Reloads of the tokens file, by result (`ok`, `error`).
    pub auth_reloads: IntCounterVec,
    tier_counters: IntCounterVec,
    tier_gauges: IntGaugeVec,
}

const COUNTERS: [&str; 12] = [
    "hits",
    "misses",
    "evictions",
    "demotions",
    "promotions",
    "checksum_failures",
    "bytes_in",
    "bytes_out",
    "dropped",
    "promotions_skipped",
    "background_demotions",
    "demote_errors",
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("kvfabric".into()), None).expect("valid prefix");
        let rpc_seconds = HistogramVec::new(
            HistogramOpts::new("rpc_duration_seconds", "gRPC call latency by method").buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0,
            ]),
            &["method"],
        )
        .expect("valid");
        let rpc_errors = IntCounterVec::new(
            Opts::new("rpc_errors_total", "gRPC calls that failed, by method and code"),
            &["method", "code"],
        )
        .expect("valid");
        let rpc_bytes = IntCounterVec::new(
            Opts::new("rpc_payload_bytes_total", "object payload bytes moved over gRPC"),
            &["direction"],
        )
        .expect("valid");
        let forwarded = IntCounterVec::new(
            Opts::new(
                "forwarded_total",
                "requests carried out on the keys' owners (cluster mode), by method",
            ),
            &["method"],
        )
        .expect("valid");
        let repair_passes = IntCounter::new("repair_passes_total", "cluster repair passes run").expect("valid");
        let repair_objects = IntCounterVec::new(
            Opts::new(
                "repair_objects_total",
                "objects cluster repair copied to their owners (copied), removed here once the owners held them (handed_off), or dropped here as stale (dropped_stale: deleted or replaced while this node was away)",
            ),
            &["action"],
        )
        .expect("valid");
        let repair_bytes = IntCounter::new(
            "repair_bytes_total",
            "payload bytes cluster repair copied to other nodes",
        )
        .expect("valid");
        let tombstones_evicted = IntCounter::new(
            "tombstones_evicted_total",
            "key tombstones dropped, oldest first, to stay within cluster.max-tombstones (deletes forgotten before their TTL)",
        )
        .expect("valid");
        let handoff_reads = IntCounter::new(
            "handoff_reads_total",
            "objects and chain keys this node's forwarded reads found only at an owner from before the last membership changes (not handed over yet)",
        )
        .expect("valid");
        let handoff_pending = IntGauge::new(
            "handoff_pending",
            "1 while this node's reads also ask owners from before the last membership change (not every member has reported its repair done since), else 0",
        )
        .expect("valid");
        let under_replicated = IntGauge::new(
            "under_replicated_objects",
            "objects this node is responsible for with fewer copies than their namespace's replication, after the last repair pass",
        )
        .expect("valid");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "auth_failures_total",
                "calls refused by authentication: no token (missing), a token the node does not accept (unknown), or one that does not allow the call (denied)",
            ),
            &["reason"],
        )
        .expect("valid");
        let auth_reloads = IntCounterVec::new(
            Opts::new(
                "auth_reloads_total",
                "reloads of auth.tokens-file, by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid");
        let tier_counters = IntCounterVec::new(
            Opts::new("tier_events_total", "per-tier counters: hits, misses, evictions, demotions, promotions, checksum_failures, bytes_in, bytes_out, dropped, promotions_skipped, background_demotions, demote_errors"),
            &["tier", "event"],
        )
        .expect("valid");
        let tier_gauges = IntGaugeVec::new(
            Opts::new("tier_state", "per-tier capacity_bytes, used_bytes, objects"),
            &["tier", "what"],
        )
        .expect("valid");
        for c in [
            Box::new(rpc_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rpc_errors.clone()),
            Box::new(rpc_bytes.clone()),
            Box::new(forwarded.clone()),
            Box::new(repair_passes.clone()),
            Box::new(repair_objects.clone()),
            Box::new(repair_bytes.clone()),
            Box::new(tombstones_evicted.clone()),
            Box::new(handoff_reads.clone()),
            Box::new(handoff_pending.clone()),
            Box::new(under_replicated.clone()),
            Box::new(auth_failures.clone()),
            Box::new(auth_reloads.clone()),
            Box::new(tier_counters.clone()),
            Box::new(tier_gauges.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            rpc_seconds,
            rpc_errors,
            rpc_bytes,
            forwarded,
            repair_passes,
            repair_objects,
            repair_bytes,
            tombstones_evicted,
            handoff_reads,
            handoff_pending,
            under_replicated,
            auth_failures,
            auth_reloads,
            tier_counters,
            tier_gauges,
        }
    }

    /// Mirrors the stack's counters into the registry (counters only move
    /// forward by the difference, so they stay monotonic).
    pub fn refresh(&self, stack: &TierStack) {
        for t in stack.stats() {
            let tier = t.kind.map(|k| k.as_str()).unwrap_or("unknown");
            let values = [
                t.hits,
                t.misses,
                t.evictions,
                t.demotions,
                t.promotions,
                t.checksum_failures,
                t.bytes_in,
                t.bytes_out,
                t.dropped,
                t.promotions_skipped,
                t.background_demotions,
                t.demote_errors,
            ];
            for (name, v) in COUNTERS.iter().zip(values) {
                let c = self.tier_counters.with_label_values(&[tier, name]);
                let cur = c.get();
                if v > cur {
                    c.inc_by(v - cur);
                }
            }
            self.tier_gauges
                .with_label_values(&[tier, "capacity_bytes"])
                .set(t.capacity.min(i64::MAX as u64) as i64);
            self.tier_gauges
                .with_label_values(&[tier, "used_bytes"])
                .set(t.used as i64);
            self.tier_gauges
                .with_label_values(&[tier, "objects"])
                .set(t.objects as i64);
        }
    }

    /// Moves `handoff_reads_total` up to `total` (the forwarding client's
    /// own count).
    pub fn mirror_handoff_reads(&self, total: u64) {
        let cur = self.handoff_reads.get();
        if total > cur {
            self.handoff_reads.inc_by(total - cur);
        }
    }

    /// Text exposition of every metric.
    pub fn render(&self, stack: &TierStack) -> String {
        self.refresh(stack);
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
