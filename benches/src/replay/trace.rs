//! Mooncake-format traces: parsing (one JSON object per line, errors name
//! the line), the block chains the simulator and the router see, and the
//! trace's infinite-cache bound.
//!
//! A line is `{"timestamp": ms, "input_length": tokens, "output_length":
//! tokens, "hash_ids": [..]}`, one hash id per `block_tokens`-token block of
//! the prompt (the last one possibly partial); equal ids mean an equal
//! prefix up to and including that block. Other fields are ignored, blank
//! lines skipped. Requests are replayed in timestamp order (ties keep file
//! order).
//!
//! Block identity: only *full* blocks are cacheable (as in every paged
//! engine), and the router's block id for hash id `h` is xxh3-128 of `h`'s
//! little-endian bytes: the trace already guarantees the chained property,
//! so no parent hash is folded in. An engine always computes at least the
//! prompt's last token (it needs its logits), so a request can reuse at most
//! `(input_length - 1) / block_tokens` leading blocks: [`TraceRequest::reusable`].

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, bail};
use kvfabric_router::index::BlockId;
use serde::Deserialize;

/// One request of a trace, ready for the simulator.
#[derive(Clone, Debug)]
pub(crate) struct TraceRequest {
    /// Arrival, in trace milliseconds (before time scaling).
    pub(crate) timestamp_ms: f64,
    /// Prompt tokens.
    pub(crate) input: u64,
    /// Generated tokens.
    pub(crate) output: u64,
    /// Block ids of the prompt's full blocks.
    pub(crate) blocks: Vec<BlockId>,
}

impl TraceRequest {
    /// Leading blocks a cache may supply (the last prompt token is always computed).
    pub(crate) fn reusable(&self, block_tokens: u64) -> usize {
        let cap = (self.input.saturating_sub(1) / block_tokens) as usize;
        self.blocks.len().min(cap)
    }
}

/// A parsed trace.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trace {
    /// Requests in arrival order.
    pub(crate) requests: Vec<TraceRequest>,
    /// Lines whose `hash_ids` length differed from `ceil(input_length / block_tokens)`
    /// (they are replayed with the full blocks they do name).
    pub(crate) length_mismatches: usize,
}

#[derive(Deserialize)]
struct Line {
    timestamp: f64,
    input_length: u64,
    output_length: u64,
    hash_ids: Vec<u64>,
}

/// The router's block id for trace hash id `h`.
pub(crate) fn block_id(h: u64) -> BlockId {
    xxhash_rust::xxh3::xxh3_128(&h.to_le_bytes())
}

impl Trace {
    /// Reads `path` (see the module doc); `limit` keeps the first N requests of the file.
    pub(crate) fn load(path: &Path, block_tokens: u64, limit: Option<usize>) -> anyhow::Result<Trace> {
        let f = std::fs::File::open(path).with_context(|| format!("opening trace {}", path.display()))?;
        Trace::parse(std::io::BufReader::new(f), block_tokens, limit)
            .with_context(|| format!("reading trace {}", path.display()))
    }

    /// Parses a trace from `r` (see [`Trace::load`]).
    pub(crate) fn parse(r: impl BufRead, block_tokens: u64, limit: Option<usize>) -> anyhow::Result<Trace> {
        let mut t = Trace::default();
        for (i, line) in r.lines().enumerate() {
            if limit.is_some_and(|n| t.requests.len() >= n) {
                break;
            }
            let n = i + 1;
            let line = line.with_context(|| format!("line {n}: not readable text"))?;
            let s = line.trim();
            if s.is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(s).with_context(|| format!("line {n}: not a trace record"))?;
            if !(l.timestamp.is_finite() && l.timestamp >= 0.0) {
                bail!(
                    "line {n}: timestamp must be a non-negative number of ms, got {}",
                    l.timestamp
                );
            }
            let full = (l.input_length / block_tokens) as usize;
            if l.hash_ids.len() as u64 != l.input_length.div_ceil(block_tokens) {
                t.length_mismatches += 1;
            }
            let blocks = l.hash_ids.iter().take(full).map(|&h| block_id(h)).collect();
            t.requests.push(TraceRequest {
                timestamp_ms: l.timestamp,
                input: l.input_length,
                output: l.output_length,
                blocks,
            });
        }
        if t.requests.is_empty() {
            bail!("no requests");
        }
        // Stable: equal timestamps keep file order.
        t.requests.sort_by(|a, b| a.timestamp_ms.total_cmp(&b.timestamp_ms));
        let t0 = t.requests[0].timestamp_ms;
        for r in &mut t.requests {
            r.timestamp_ms -= t0;
        }
        Ok(t)
    }

    /// Milliseconds from the first arrival to the last.
    pub(crate) fn duration_ms(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.timestamp_ms)
    }

    /// Prompt tokens of every request.
    pub(crate) fn input_tokens(&self) -> u64 {
        self.requests.iter().map(|r| r.input).sum()
    }

    /// Distinct full blocks (the working set of an infinite cache).
    pub(crate) fn distinct_blocks(&self) -> usize {
        let mut seen = HashSet::new();
        for r in &self.requests {
            seen.extend(r.blocks.iter().copied());
        }
        seen.len()
    }

    /// Prefill tokens computed if every full block ever computed stayed
    /// cached and reachable by every worker, in arrival order: the least
    /// any policy over any cache can compute.
    pub(crate) fn bound_prefill_tokens(&self, block_tokens: u64) -> u64 {
        let mut seen: HashSet<BlockId> = HashSet::new();
        let mut computed = 0;
        for r in &self.requests {
            let reusable = r.reusable(block_tokens);
            let hits = r.blocks[..reusable].iter().take_while(|b| seen.contains(b)).count();
            computed += r.input - hits as u64 * block_tokens;
            seen.extend(r.blocks.iter().copied());
        }
        computed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<Trace> {
        Trace::parse(s.as_bytes(), 512, None)
    }

    #[test]
    fn parses_sorts_and_keeps_full_blocks() {
        let t = parse(concat!(
            "{\"timestamp\": 20, \"input_length\": 1024, \"output_length\": 3, \"hash_ids\": [0, 1]}\n",
            "\n",
            "{\"timestamp\": 10, \"input_length\": 1100, \"output_length\": 0, \"hash_ids\": [0, 1, 2], \"x\": 1}\n",
        ))
        .unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].input, 1100, "sorted by timestamp");
        assert_eq!(t.requests[0].timestamp_ms, 0.0);
        assert_eq!(t.requests[1].timestamp_ms, 10.0);
        // 1100 tokens: two full blocks, the third (76 tokens) is not cacheable.
        assert_eq!(t.requests[0].blocks, vec![block_id(0), block_id(1)]);
        assert_eq!(t.requests[0].reusable(512), 2);
        // Exactly two blocks: the last token is always computed, so one is reusable.
        assert_eq!(t.requests[1].reusable(512), 1);
        assert_eq!(t.length_mismatches, 0);
        assert_eq!(t.duration_ms(), 10.0);
    }

    #[test]
    fn malformed_lines_are_named() {
        let ok = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\n";
        for (bad, want) in [
            ("{\"timestamp\": 0}", "line 2"),
            ("not json", "line 2"),
            (
                "{\"timestamp\": -5, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}",
                "timestamp",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": -1, \"output_length\": 1, \"hash_ids\": [0]}",
                "line 2",
            ),
        ] {
            let e = format!("{:#}", parse(&format!("{ok}{bad}\n")).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(format!("{:#}", parse("\n\n").unwrap_err()).contains("no requests"));
    }

    #[test]
    fn length_mismatch_is_counted_not_fatal() {
        let t = parse("{\"timestamp\": 0, \"input_length\": 2048, \"output_length\": 1, \"hash_ids\": [7]}\n").unwrap();
        assert_eq!(t.length_mismatches, 1);
        assert_eq!(t.requests[0].blocks.len(), 1);
    }

    #[test]
    fn bound_on_a_hand_made_trace() {
        let t = parse(concat!(
            // 3 blocks + 100 tokens, nothing cached: all 1636 computed.
            "{\"timestamp\": 0, \"input_length\": 1636, \"output_length\": 1, \"hash_ids\": [1, 2, 3, 4]}\n",
            // Shares blocks 1, 2; diverges at the third: 2 * 512 reused.
            "{\"timestamp\": 1, \"input_length\": 2000, \"output_length\": 1, \"hash_ids\": [1, 2, 9, 10]}\n",
            // Exactly blocks 1, 2, 3 again: the last block holds the last token, so 1024 reused.
            "{\"timestamp\": 2, \"input_length\": 1536, \"output_length\": 1, \"hash_ids\": [1, 2, 3]}\n",
            // Different first block: nothing reused even though block 2's id reappears later.
            "{\"timestamp\": 3, \"input_length\": 1024, \"output_length\": 1, \"hash_ids\": [5, 2]}\n",
        ))
        .unwrap();
        assert_eq!(t.input_tokens(), 1636 + 2000 + 1536 + 1024);
        assert_eq!(t.bound_prefill_tokens(512), 1636 + (2000 - 1024) + (1536 - 1024) + 1024);
        // Full blocks {1, 2, 3}, {1, 2, 9}, {1, 2, 3}, {5, 2}.
        assert_eq!(t.distinct_blocks(), 5);
        let limited = Trace::parse(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\nnot json\n".as_bytes(),
            512,
            Some(1),
        )
        .unwrap();
        assert_eq!(limited.requests.len(), 1, "--limit stops before later lines");
    }
}
