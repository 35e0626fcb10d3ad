//! The replay's results as text: per-policy summaries (nearest-rank
//! percentiles of TTFT and end-to-end latency, prefill tokens against the
//! infinite-cache bound, token hit rates overall and per tier), as a table
//! or as one JSON object per policy.
//!
//! Hit rates are fractions of all prompt tokens: `hit_rate` = 1 -
//! prefill tokens / prompt tokens, and `hit_rate_<tier>` the tokens served
//! from that tier (HBM: already in the chosen worker's GPU; host / disk /
//! object: loaded from the fabric for this request); `remote` the part of
//! those fabric hits read from a node on another host.

use std::fmt::Write;

use kvfabric_router::index::Tier;
use serde_json::json;

use super::Outcome;
use super::sim::RunResult;

/// Nearest-rank percentile `p` (0..=1) of `v`; 0 when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// One policy's numbers.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Summary {
    pub(crate) ttft: [f64; 3],
    pub(crate) e2e: [f64; 2],
    pub(crate) hit_rate: f64,
    pub(crate) tier_rates: [f64; 4],
    pub(crate) remote_rate: f64,
}

pub(crate) fn summary(r: &RunResult) -> Summary {
    let t = sorted(&r.ttft_ms);
    let e = sorted(&r.e2e_ms);
    let total = r.input_tokens.max(1) as f64;
    Summary {
        ttft: [percentile(&t, 0.5), percentile(&t, 0.9), percentile(&t, 0.99)],
        e2e: [percentile(&e, 0.5), percentile(&e, 0.99)],
        hit_rate: 1.0 - r.prefill_tokens() as f64 / total,
        tier_rates: r.hit_tokens.map(|n| n as f64 / total),
        remote_rate: r.remote_tokens as f64 / total,
    }
}

/// The line naming the time scale.
pub(crate) fn scale_line(o: &Outcome) -> String {
    let rr = o.runs.iter().find(|r| r.policy == super::sim::Policy::RoundRobin);
    let how = match o.calibration_runs {
        Some(n) => format!("calibrated in {n} round-robin runs"),
        None => "given by --time-scale".into(),
    };
    format!(
        "time scale {:.4} (arrivals {:.2}x {} than the trace; {how}): round-robin prefill {:.1}% busy",
        o.time_scale,
        if o.time_scale <= 1.0 {
            1.0 / o.time_scale
        } else {
            o.time_scale
        },
        if o.time_scale <= 1.0 { "faster" } else { "slower" },
        rr.map_or(0.0, |r| r.utilization() * 100.0),
    )
}

fn bound_hit_rate(o: &Outcome) -> f64 {
    1.0 - o.bound_prefill_tokens as f64 / o.input_tokens.max(1) as f64
}

/// One JSON object (one line) for policy `r`.
pub(crate) fn json(r: &RunResult, o: &Outcome) -> String {
    let s = summary(r);
    json!({
        "policy": r.policy.name(),
        "requests": r.ttft_ms.len(),
        "workers": r.workers,
        "time_scale": o.time_scale,
        "prefill_utilization": r.utilization(),
        "ttft_p50_ms": s.ttft[0],
        "ttft_p90_ms": s.ttft[1],
        "ttft_p99_ms": s.ttft[2],
        "e2e_p50_ms": s.e2e[0],
        "e2e_p99_ms": s.e2e[1],
        "prefill_tokens": r.prefill_tokens(),
        "bound_prefill_tokens": o.bound_prefill_tokens,
        "input_tokens": o.input_tokens,
        "hit_rate": s.hit_rate,
        "bound_hit_rate": bound_hit_rate(o),
        "hit_rate_hbm": s.tier_rates[Tier::Hbm as usize],
        "hit_rate_host": s.tier_rates[Tier::Host as usize],
        "hit_rate_disk": s.tier_rates[Tier::Disk as usize],
        "hit_rate_object": s.tier_rates[Tier::Object as usize],
        "hit_rate_remote": s.remote_rate,
    })
    .to_string()
}

/// The table: one row per policy, then the bound.
pub(crate) fn table(o: &Outcome) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "policy",
        "ttft p50",
        "p90",
        "p99",
        "e2e p50",
        "p99",
        "prefill tok",
        "/bound",
        "hit",
        "hbm",
        "host",
        "disk",
        "object",
        "remote",
        "busy",
    );
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let ms = |x: f64| {
        if x >= 1e4 {
            format!("{:.1}s", x / 1e3)
        } else {
            format!("{x:.0}ms")
        }
    };
    for r in &o.runs {
        let s = summary(r);
        let _ = writeln!(
            t,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
            r.policy.name(),
            ms(s.ttft[0]),
            ms(s.ttft[1]),
            ms(s.ttft[2]),
            ms(s.e2e[0]),
            ms(s.e2e[1]),
            r.prefill_tokens(),
            format!(
                "{:.3}",
                r.prefill_tokens() as f64 / o.bound_prefill_tokens.max(1) as f64
            ),
            pct(s.hit_rate),
            pct(s.tier_rates[0]),
            pct(s.tier_rates[1]),
            pct(s.tier_rates[2]),
            pct(s.tier_rates[3]),
            pct(s.remote_rate),
            pct(r.utilization()),
        );
    }
    let _ = writeln!(
        t,
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14} {:>8} {:>6}",
        "inf-cache",
        "",
        "",
        "",
        "",
        "",
        o.bound_prefill_tokens,
        "1.000",
        pct(bound_hit_rate(o)),
    );
    t
}

#[cfg(test)]
mod tests {
    use super::super::sim::Policy;
    use super::*;

    fn result(policy: Policy) -> RunResult {
        RunResult {
            policy,
            ttft_ms: (1..=100).map(f64::from).collect(),
            e2e_ms: (1..=100).map(|x| f64::from(x) * 2.0).collect(),
            computed: vec![10; 100],
            hit_tokens: [500, 250, 250, 0],
            remote_tokens: 100,
            input_tokens: 2000,
            busy_ms: 80.0,
            span_ms: 100.0,
            workers: 1,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v, 0.99), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn json_has_the_required_fields_and_table_every_policy() {
        let o = Outcome {
            runs: vec![result(Policy::RoundRobin), result(Policy::TierAware)],
            input_tokens: 2000,
            bound_prefill_tokens: 900,
            time_scale: 0.5,
            calibration_runs: Some(3),
        };
        let v: serde_json::Value = serde_json::from_str(&json(&o.runs[1], &o)).unwrap();
        assert_eq!(v["policy"], "kv-tier-aware");
        assert_eq!(v["ttft_p50_ms"], 50.0);
        assert_eq!(v["ttft_p90_ms"], 90.0);
        assert_eq!(v["prefill_tokens"], 1000);
        assert_eq!(v["bound_prefill_tokens"], 900);
        assert_eq!(v["hit_rate"], 0.5);
        assert_eq!(v["hit_rate_host"], 0.125);
        assert_eq!(v["hit_rate_remote"], 0.05);
        let t = table(&o);
        assert!(t.contains("round-robin") && t.contains("kv-tier-aware") && t.contains("inf-cache"));
        assert!(scale_line(&o).contains("time scale 0.5000") && scale_line(&o).contains("80.0% busy"));
    }
}
