//! Latency recording: one histogram layout (nanoseconds, 3 significant
//! digits, up to 10 minutes) so histograms from different workers and
//! workloads merge.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Largest latency recorded, in nanoseconds (longer ones are clamped).
const MAX_NS: u64 = 600_000_000_000;

/// An empty latency histogram in nanoseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records one latency (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(MAX_NS).clamp(1, MAX_NS);
    h.record(ns).expect("value within bounds");
}

/// Formats nanoseconds for a table: `850 ns`, `12.3 us`, `4.56 ms`, `1.20 s`.
pub fn format_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}
