//! The cost model: for each candidate worker, the prefill it would still pay
//! for a request (tokens to recompute, plus the time to load cached blocks
//! from slower tiers expressed in token-equivalents), plus its load; and the
//! choice among candidates (lowest cost, or a softmax sample with a
//! temperature; ties go to the less loaded worker).
//!
//! By default the model describes engines that load every cached block
//! they find ([`Loads::All`]) while the request waits behind queued prefill
//! (`load_overlaps_queue`): a candidate pays its tokens to recompute plus
//! the larger of its queued prefill and its load time, the load starting
//! behind the loads already routed to that worker
//! ([`Load::loading_tokens`]).
//!
//! What a worker can reach: its own block pool (engine events: HBM, or host
//! memory when the engine offloads), and every fabric node (fabric events:
//! every tier). A fabric node co-located with the worker is read at that
//! tier's bandwidth; any other at most at the network's, or not at all with
//! [`Reach::Colocated`] (single nodes per host, no cluster). Other workers'
//! own pools are not reachable. With [`Scope::HbmOnly`] the model sees only the
//! worker's own HBM blocks, which is what Dynamo's router scores.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::index::{ChainMatch, HolderId, Tier};

/// Which cached blocks the model counts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Every tier of the worker's own pool and of the fabric (default).
    #[default]
    AllTiers,
    /// Only blocks in the worker's own HBM.
    HbmOnly,
}

/// Which cached blocks a worker loads instead of recomputing (what the
/// engine does; the model should match it).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Loads {
    /// Only blocks cheaper to load than to recompute; the others are
    /// priced as recomputed.
    Cheaper,
    /// Every cached block it can reach, whatever the tier (what kvfabric's
    /// reference worker and KV connectors such as LMCache do; default). A
    /// block no cheaper to load than to recompute is still priced as
    /// recomputing it, but as a load: it is not GPU work, which matters
    /// once loads overlap the queue (`load-overlaps-queue`).
    #[default]
    All,
}

/// Which fabric nodes a worker reads from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    /// Every fabric node: the nodes form one cluster, and a node on another
    /// host is read over the network (default).
    #[default]
    Any,
    /// Only the node on the worker's own host: independent single nodes,
    /// one per host (a worker with none reaches no fabric).
    Colocated,
}

/// Read bandwidths in bytes per second, per tier, as seen by a worker on the
/// same host; `network` caps anything read from another host.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Bandwidths {
    /// A fabric node's GPU tier (default 200 GB/s; the worker's own HBM costs nothing).
    pub hbm: f64,
    /// Host memory (default 20 GB/s: PCIe 4 x16 into the GPU).
    pub host: f64,
    /// Local NVMe (default 5 GB/s).
    pub disk: f64,
    /// Object store (default 1 GB/s).
    pub object: f64,
    /// Between hosts (default 12.5 GB/s: 100 Gb/s).
    pub network: f64,
}

impl Default for Bandwidths {
    fn default() -> Self {
        Bandwidths {
            hbm: 200e9,
            host: 20e9,
            disk: 5e9,
            object: 1e9,
            network: 12.5e9,
        }
    }
}

impl Bandwidths {
    fn of(&self, t: Tier) -> f64 {
        match t {
            Tier::Hbm => self.hbm,
            Tier::Host => self.host,
            Tier::Disk => self.disk,
            Tier::Object => self.object,
        }
    }
}

/// Weights of the terms of a worker's cost, all in token-equivalents.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Weights {
    /// Multiplies the request's own prefill cost (default 1.0).
    pub prefill: f64,
    /// Per prefill token already queued or running on the worker (default 1.0).
    pub queued_prefill: f64,
    /// Per active decode block on the worker (default 1.0).
    pub decode_block: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            prefill: 1.0,
            queued_prefill: 1.0,
            decode_block: 1.0,
        }
    }
}

/// The cost model's settings (`[cost]` in the router's config).
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CostSettings {
    /// Tokens per block (default 16; must match the engines').
    pub block_tokens: usize,
    /// KV bytes per token, all layers, K and V (default 131072 = 128 KiB,
    /// an 8B-class model in bf16).
    pub kv_bytes_per_token: u64,
    /// Prefill throughput of a worker, tokens per second (default 20000):
    /// converts load time into token-equivalents.
    pub prefill_tokens_per_s: f64,
    /// Tier read bandwidths.
    pub bandwidth: Bandwidths,
    /// Term weights.
    pub weights: Weights,
    /// 0 (default) picks the lowest cost; above 0, samples with softmax over
    /// costs normalised to [0, 1] divided by the temperature.
    pub temperature: f64,
    /// Which cached blocks count.
    pub scope: Scope,
    /// Which fabric nodes a worker can read.
    pub reach: Reach,
    /// Which cached blocks workers load (default `all`).
    pub loads: Loads,
    /// Whether workers load cached blocks while the request waits behind
    /// queued prefill (asynchronous loading, as kvfabric's reference worker
    /// does; default true): a candidate then pays the larger of its
    /// queued prefill and its load time (behind the loads already routed
    /// to it, [`Load::loading_tokens`]), not their sum.
    pub load_overlaps_queue: bool,
}

impl Default for CostSettings {
    fn default() -> Self {
        CostSettings {
            block_tokens: 16,
            kv_bytes_per_token: 128 * 1024,
            prefill_tokens_per_s: 20_000.0,
            bandwidth: Bandwidths::default(),
            weights: Weights::default(),
            temperature: 0.0,
            scope: Scope::AllTiers,
            reach: Reach::Any,
            loads: Loads::All,
            load_overlaps_queue: true,
        }
    }
}

/// Largest `cost.kv-bytes-per-token` accepted (64 MiB; the largest models
/// need well under 1 MiB).
const MAX_KV_BYTES_PER_TOKEN: u64 = 64 << 20;
/// Largest bandwidth (bytes/s) or prefill rate (tokens/s) accepted.
const MAX_RATE: f64 = 1e15;
/// Largest cost weight accepted: logits stay finite for any load.
const MAX_WEIGHT: f64 = 1e9;

impl CostSettings {
    /// Checks bounds; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_tokens == 0 || self.block_tokens > 1 << 20 {
            return Err(format!(
                "cost.block-tokens must be 1..=1048576, got {}",
                self.block_tokens
            ));
        }
        if self.kv_bytes_per_token == 0 || self.kv_bytes_per_token > MAX_KV_BYTES_PER_TOKEN {
            return Err(format!(
                "cost.kv-bytes-per-token must be 1..={MAX_KV_BYTES_PER_TOKEN}, got {}",
                self.kv_bytes_per_token
            ));
        }
        let pos = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= MAX_RATE {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number up to {MAX_RATE:e}, got {v}"))
            }
        };
        pos("cost.prefill-tokens-per-s", self.prefill_tokens_per_s)?;
        let b = &self.bandwidth;
        for (n, v) in [
            ("hbm", b.hbm),
            ("host", b.host),
            ("disk", b.disk),
            ("object", b.object),
            ("network", b.network),
        ] {
            pos(&format!("cost.bandwidth.{n}"), v)?;
        }
        let w = &self.weights;
        for (n, v) in [
            ("prefill", w.prefill),
            ("queued-prefill", w.queued_prefill),
            ("decode-block", w.decode_block),
        ] {
            if !(v.is_finite() && (0.0..=MAX_WEIGHT).contains(&v)) {
                return Err(format!("cost.weights.{n} must be 0..={MAX_WEIGHT:e}, got {v}"));
            }
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("cost.temperature must be >= 0, got {}", self.temperature));
        }
        Ok(())
    }

    /// When a worker's load path, free at `free_s`, is free again once
    /// `load_tokens` (token-equivalents) more are queued on it at `now_s`
    /// (seconds on one clock). The router service and the trace replay
    /// both track one such path per worker from the router's own decisions
    /// ([`Load::loading_tokens`]).
    pub fn load_path_free_after(&self, free_s: f64, now_s: f64, load_tokens: f64) -> f64 {
        if load_tokens <= 0.0 {
            return free_s;
        }
        free_s.max(now_s) + load_tokens / self.prefill_tokens_per_s
    }

    /// When that load path is free again once `load_tokens` queued on it
    /// earlier are taken back at `now_s` (the request failed or was
    /// cancelled before its first token, so its load never ran or stopped):
    /// the loads queued behind it move up, and nothing ends before `now_s`.
    pub fn load_path_free_without(&self, free_s: f64, now_s: f64, load_tokens: f64) -> f64 {
        if load_tokens <= 0.0 || free_s <= now_s {
            return free_s;
        }
        (free_s - load_tokens / self.prefill_tokens_per_s).max(now_s)
    }

    /// [`Load::loading_tokens`] of a load path free at `free_s`, at `now_s`.
    pub fn load_path_ahead(&self, free_s: f64, now_s: f64) -> u64 {
        ((free_s - now_s).max(0.0) * self.prefill_tokens_per_s) as u64
    }

    /// Token-equivalents to load one block from `tier` (`local`: on the
    /// worker's host), never more than recomputing it.
    pub fn load_cost(&self, tier: Tier, local: bool) -> f64 {
        let bw = if local {
            self.bandwidth.of(tier)
        } else {
            self.bandwidth.of(tier).min(self.bandwidth.network)
        };
        let secs = (self.block_tokens as u64 * self.kv_bytes_per_token) as f64 / bw;
        (secs * self.prefill_tokens_per_s).min(self.block_tokens as f64)
    }
}

/// A worker's current load.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Load {
    /// Prefill tokens queued or running.
    pub active_prefill_tokens: u64,
    /// KV blocks of sequences decoding.
    pub active_decode_blocks: u64,
    /// Loads of cached blocks still ahead of the worker's load path, in
    /// token-equivalents (0 when unknown); with `load-overlaps-queue` a
    /// request's own load starts behind them.
    pub loading_tokens: u64,
}

/// A worker the router may pick.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// The holder id of the worker's own block pool.
    pub worker: HolderId,
    /// The fabric node on the worker's host, if any.
    pub colocated: Option<HolderId>,
    /// Its load now.
    pub load: Load,
}

/// A candidate's cost for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// The worker.
    pub worker: HolderId,
    /// Leading blocks it can reuse (from any source it reaches).
    pub cached_blocks: usize,
    /// Of those, how many come from each tier (index = [`Tier`] as usize;
    /// blocks cheaper to recompute than to load count as not cached).
    pub blocks_by_tier: [u32; 4],
    /// Tokens it would recompute.
    pub prefill_tokens: u64,
    /// Recompute plus load time, in token-equivalents.
    pub prefill_cost: f64,
    /// The total cost the choice minimises.
    pub logit: f64,
    /// Its load term alone (breaks ties).
    pub load: f64,
}

/// Scores `candidates` for a request of `tokens` tokens whose chain of full
/// blocks matched `m`. `fabric` lists the fabric nodes' holder ids, sorted.
pub fn score(
    s: &CostSettings,
    m: &ChainMatch,
    tokens: usize,
    candidates: &[Candidate],
    fabric: &[HolderId],
) -> Vec<Scored> {
    let bt = s.block_tokens as f64;
    candidates
        .iter()
        .map(|c| {
            let mut cached = 0;
            let mut by_tier = [0u32; 4];
            let mut load_cost = 0.0;
            // Every position of a run has the same holders: price one block
            // of it, then the run at once. The match ends at the first run
            // the candidate reaches no copy of.
            for run in &m.runs {
                let mut best: (f64, Option<Tier>) = (f64::INFINITY, None);
                for &(holder, tiers) in m.run_holders(run) {
                    let own = holder == c.worker;
                    let cost = match s.scope {
                        Scope::HbmOnly if own && tiers.contains(Tier::Hbm) => Some((0.0, Tier::Hbm)),
                        Scope::HbmOnly => None,
                        Scope::AllTiers if own => tiers.fastest().map(|t| {
                            let c = if t == Tier::Hbm { 0.0 } else { s.load_cost(t, true) };
                            (c, t)
                        }),
                        Scope::AllTiers if fabric.binary_search(&holder).is_ok() => {
                            let local = c.colocated == Some(holder);
                            (local || s.reach == Reach::Any)
                                .then(|| tiers.fastest().map(|t| (s.load_cost(t, local), t)))
                                .flatten()
                        }
                        Scope::AllTiers => None,
                    };
                    if let Some((cost, t)) = cost
                        && cost < best.0
                    {
                        best = (cost, Some(t));
                    }
                }
                let (cost, Some(t)) = best else { break };
                let n = run.len();
                cached += n as usize;
                // A block no cheaper to load than to recompute is
                // recomputed, unless workers load every block they find.
                if cost < bt || s.loads == Loads::All {
                    by_tier[t as usize] += n;
                    load_cost += cost * n as f64;
                }
            }
            let reused: u64 = by_tier.iter().map(|&n| n as u64).sum::<u64>() * s.block_tokens as u64;
            let prefill_tokens = (tokens as u64).saturating_sub(reused);
            let prefill_cost = prefill_tokens as f64 + load_cost;
            let queue = s.weights.queued_prefill * c.load.active_prefill_tokens as f64;
            let load = queue + s.weights.decode_block * c.load.active_decode_blocks as f64;
            let logit = if s.load_overlaps_queue {
                // Loading runs while the request waits behind the queue,
                // after the loads already ahead of it.
                let behind = if load_cost > 0.0 {
                    c.load.loading_tokens as f64
                } else {
                    0.0
                };
                let loading = s.weights.prefill * (load_cost + behind);
                s.weights.prefill * prefill_tokens as f64 + loading.max(queue) - queue + load
            } else {
                s.weights.prefill * prefill_cost + load
            };
            Scored {
                worker: c.worker,
                cached_blocks: cached,
                blocks_by_tier: by_tier,
                prefill_tokens,
                prefill_cost,
                logit,
                load,
            }
        })
        .collect()
}

impl Scored {
    /// Token-equivalents of the cached blocks it would load.
    pub fn load_tokens(&self) -> f64 {
        (self.prefill_cost - self.prefill_tokens as f64).max(0.0)
    }
}

/// Picks an index into `scored`: the lowest logit at temperature 0 (ties to
/// the lower load, then uniformly at random), else a softmax sample over
/// logits normalised to [0, 1].
pub fn choose(scored: &[Scored], temperature: f64, rng: &mut impl Rng) -> Option<usize> {
    if scored.is_empty() {
        return None;
    }
    if scored.iter().any(|s| !s.logit.is_finite()) {
        // Only settings far outside any real deployment get here (validated
        // weights keep logits finite); pick by load rather than by nothing.
        return (0..scored.len()).min_by(|&a, &b| scored[a].load.total_cmp(&scored[b].load));
    }
    if temperature > 0.0 {
        let lo = scored.iter().map(|s| s.logit).fold(f64::INFINITY, f64::min);
        let hi = scored.iter().map(|s| s.logit).fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        let w: Vec<f64> = scored
            .iter()
            .map(|s| (-(s.logit - lo) / span / temperature).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut x = rng.random::<f64>() * total;
        for (i, wi) in w.iter().enumerate() {
            if x < *wi {
                return Some(i);
            }
            x -= wi;
        }
        return Some(scored.len() - 1);
    }
    let eps = |a: f64| 1e-9 * a.abs().max(1.0);
    let min_logit = scored.iter().map(|s| s.logit).fold(f64::INFINITY, f64::min);
    let tied: Vec<usize> = (0..scored.len())
        .filter(|&i| scored[i].logit - min_logit <= eps(min_logit))
        .collect();
    let min_load = tied.iter().map(|&i| scored[i].load).fold(f64::INFINITY, f64::min);
    let tied: Vec<usize> = tied
        .into_iter()
        .filter(|&i| scored[i].load - min_load <= eps(min_load))
        .collect();
    Some(tied[rng.random_range(0..tied.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{MatchEntry, TierMask};
    use rand::SeedableRng;

    const W1: HolderId = HolderId(1);
    const W2: HolderId = HolderId(2);
    const F: HolderId = HolderId(100);

    fn entry(pos: u32, holder: HolderId, t: Tier) -> MatchEntry {
        MatchEntry {
            pos,
            holder,
            tiers: TierMask::of(t),
        }
    }

    fn cand(worker: HolderId, colocated: Option<HolderId>) -> Candidate {
        Candidate {
            worker,
            colocated,
            load: Load::default(),
        }
    }

    #[test]
    fn a_load_path_queues_loads_and_gives_back_a_cancelled_one() {
        let s = CostSettings::default();
        let tps = s.prefill_tokens_per_s;
        // Free at 10 s; 2 s of loads queued at 12 s start then, not at 10.
        let free = s.load_path_free_after(10.0, 12.0, 2.0 * tps);
        assert!((free - 14.0).abs() < 1e-9);
        assert_eq!(s.load_path_ahead(free, 13.0), tps as u64);
        // Taking 0.5 s back at 13 s leaves 0.5 s; more than is left ends now.
        assert!((s.load_path_free_without(free, 13.0, 0.5 * tps) - 13.5).abs() < 1e-9);
        assert_eq!(s.load_path_free_without(free, 13.0, 5.0 * tps), 13.0);
        // An idle path stays as it is.
        assert_eq!(s.load_path_free_without(free, 20.0, 1.5 * tps), free);
        assert_eq!(s.load_path_free_without(free, 13.0, 0.0), free);
    }

    #[test]
    fn own_hbm_is_free_fabric_tiers_cost_load_time() {
        let s = CostSettings::default();
        // Blocks 0-1 in W1's HBM; blocks 0-3 on the fabric node, host tier.
        let m = ChainMatch::from_entries(vec![
            entry(0, W1, Tier::Hbm),
            entry(0, F, Tier::Host),
            entry(1, W1, Tier::Hbm),
            entry(1, F, Tier::Host),
            entry(2, F, Tier::Host),
            entry(3, F, Tier::Host),
        ]);
        let tokens = 4 * 16 + 5;
        let sc = score(&s, &m, tokens, &[cand(W1, Some(F)), cand(W2, None)], &[F]);
        let host_local = s.load_cost(Tier::Host, true);
        let host_remote = s.load_cost(Tier::Host, false);
        assert!(host_local > 0.0 && host_local < host_remote && host_remote < 16.0);
        assert_eq!(sc[0].cached_blocks, 4);
        assert_eq!(sc[0].blocks_by_tier, [2, 2, 0, 0]);
        assert_eq!(sc[0].prefill_tokens, 5);
        assert!((sc[0].prefill_cost - (5.0 + 2.0 * host_local)).abs() < 1e-9);
        assert_eq!(sc[1].blocks_by_tier, [0, 4, 0, 0]);
        assert!((sc[1].prefill_cost - (5.0 + 4.0 * host_remote)).abs() < 1e-9);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(choose(&sc, 0.0, &mut rng), Some(0));
    }

    #[test]
    fn workers_that_load_every_block_count_slow_tiers_as_loads() {
        let cheaper = CostSettings {
            prefill_tokens_per_s: 1e6, // disk loads cost more than recomputing
            loads: Loads::Cheaper,
            load_overlaps_queue: false,
            ..Default::default()
        };
        let all = CostSettings {
            loads: Loads::All,
            ..cheaper
        };
        assert_eq!(cheaper.load_cost(Tier::Disk, true), 16.0, "priced at recomputing");
        assert_eq!(all.load_cost(Tier::Disk, true), 16.0);
        let m = ChainMatch::from_entries(vec![entry(0, F, Tier::Disk), entry(1, F, Tier::Disk)]);
        let sc = score(&cheaper, &m, 2 * 16 + 3, &[cand(W1, Some(F))], &[F]);
        assert_eq!(
            (sc[0].cached_blocks, sc[0].blocks_by_tier),
            (2, [0, 0, 0, 0]),
            "recomputed"
        );
        assert_eq!(sc[0].prefill_tokens, 35);
        let sc_all = score(&all, &m, 2 * 16 + 3, &[cand(W1, Some(F))], &[F]);
        assert_eq!(sc_all[0].blocks_by_tier, [0, 0, 2, 0], "loaded");
        assert_eq!(sc_all[0].prefill_tokens, 3);
        assert_eq!(sc_all[0].prefill_cost, sc[0].prefill_cost, "at the same price");
        // Behind a queue, the loads hide; recomputing does not.
        let queued = Candidate {
            load: Load {
                active_prefill_tokens: 100,
                active_decode_blocks: 0,
                loading_tokens: 0,
            },
            ..cand(W1, Some(F))
        };
        let overlap = |loads| CostSettings {
            loads,
            load_overlaps_queue: true,
            ..cheaper
        };
        let a = score(&overlap(Loads::All), &m, 35, &[queued], &[F]);
        let c = score(&overlap(Loads::Cheaper), &m, 35, &[queued], &[F]);
        assert_eq!((a[0].logit, c[0].logit), (3.0 + 100.0, 35.0 + 100.0));
    }

    #[test]
    fn loading_behind_a_queue_costs_only_what_the_queue_does_not_hide() {
        let s = CostSettings {
            load_overlaps_queue: true,
            ..Default::default()
        };
        let host = s.load_cost(Tier::Host, true);
        // Blocks 0-3 on W1's node, host tier: W1 loads them (4 * host),
        // W2 (no node) recomputes all 64 tokens.
        let m = ChainMatch::from_entries((0..4).map(|p| entry(p, F, Tier::Host)).collect());
        let busy = |worker, queued| Candidate {
            worker,
            colocated: Some(F),
            load: Load {
                active_prefill_tokens: queued,
                active_decode_blocks: 2,
                loading_tokens: 0,
            },
        };
        // A queue shorter than the load: the load shows through.
        let short = (4.0 * host) as u64 / 2;
        let sc = score(&s, &m, 64, &[busy(W1, short)], &[F]);
        assert!((sc[0].logit - (4.0 * host + 2.0)).abs() < 1e-9, "{sc:?}");
        // A longer queue hides it; the summed model pays both.
        let sc = score(&s, &m, 64, &[busy(W1, 1000)], &[F]);
        assert!((sc[0].logit - (1000.0 + 2.0)).abs() < 1e-9, "{sc:?}");
        let summed = CostSettings {
            load_overlaps_queue: false,
            ..s
        };
        let summed = score(&summed, &m, 64, &[busy(W1, 1000)], &[F]);
        assert!((summed[0].logit - (4.0 * host + 1000.0 + 2.0)).abs() < 1e-9);
        assert_eq!(sc[0].load, summed[0].load, "the load term (tie breaks) is unchanged");
        // Nothing to load: the same as summing.
        let sc = score(&s, &ChainMatch::default(), 64, &[busy(W2, 100)], &[F]);
        assert!((sc[0].logit - (64.0 + 100.0 + 2.0)).abs() < 1e-9);
        // Loads already routed there go first: the queue hides less.
        let behind = |loading| Candidate {
            load: Load {
                loading_tokens: loading,
                ..busy(W1, 1000).load
            },
            ..busy(W1, 1000)
        };
        let sc = score(&s, &m, 64, &[behind(1000)], &[F]);
        assert!((sc[0].logit - (4.0 * host + 1000.0 + 2.0)).abs() < 1e-9, "{sc:?}");
        let sc = score(&s, &ChainMatch::default(), 64, &[behind(1000)], &[F]);
        assert!(
            (sc[0].logit - (64.0 + 1000.0 + 2.0)).abs() < 1e-9,
            "nothing to load: no wait"
        );
    }

    #[test]
    fn colocated_reach_counts_only_the_node_on_the_workers_host() {
        let s = CostSettings {
            reach: Reach::Colocated,
            ..Default::default()
        };
        const G: HolderId = HolderId(101);
        // Blocks 0-2 on node F (W1's host), 0 on node G (W2's host).
        let m = ChainMatch::from_entries(vec![
            entry(0, F, Tier::Host),
            entry(0, G, Tier::Host),
            entry(1, F, Tier::Host),
            entry(2, F, Tier::Host),
        ]);
        let cands = [cand(W1, Some(F)), cand(W2, Some(G)), cand(HolderId(3), None)];
        let sc = score(&s, &m, 3 * 16, &cands, &[F, G]);
        assert_eq!(sc[0].blocks_by_tier, [0, 3, 0, 0]);
        assert_eq!(sc[1].blocks_by_tier, [0, 1, 0, 0], "node F is out of W2's reach");
        assert_eq!(sc[2].cached_blocks, 0, "no node on its host: no fabric");
        let any = score(&CostSettings::default(), &m, 3 * 16, &cands, &[F, G]);
        assert_eq!(any[1].blocks_by_tier, [0, 3, 0, 0]);
        assert_eq!(any[2].blocks_by_tier, [0, 3, 0, 0]);
    }

    #[test]
    fn hbm_only_scope_ignores_the_fabric() {
        let s = CostSettings {
            scope: Scope::HbmOnly,
            ..Default::default()
        };
        let m = ChainMatch::from_entries(vec![
            entry(0, F, Tier::Host),
            entry(0, W2, Tier::Hbm),
            entry(1, F, Tier::Host),
        ]);
        let sc = score(&s, &m, 32, &[cand(W1, Some(F)), cand(W2, None)], &[F]);
        assert_eq!(sc[0].prefill_tokens, 32);
        assert_eq!(sc[1].prefill_tokens, 16);
        assert_eq!(sc[1].cached_blocks, 1);
    }

    #[test]
    fn a_gap_ends_the_reusable_prefix_and_slow_tiers_cost_recompute() {
        let mut s = CostSettings {
            loads: Loads::Cheaper,
            ..Default::default()
        };
        s.bandwidth.object = 1.0; // absurdly slow: loading costs more than recomputing
        let m = ChainMatch::from_entries(vec![
            entry(0, W1, Tier::Hbm),
            entry(1, F, Tier::Object),
            entry(2, W2, Tier::Hbm),
        ]);
        let sc = score(&s, &m, 48, &[cand(W1, None)], &[F]);
        // Block 1 is reachable but recomputed; block 2 (W2's pool) is not reachable.
        assert_eq!(sc[0].cached_blocks, 2);
        assert_eq!(sc[0].blocks_by_tier, [1, 0, 0, 0]);
        assert_eq!(sc[0].prefill_tokens, 32);
        assert!((sc[0].prefill_cost - 32.0).abs() < 1e-9);
    }

    #[test]
    fn load_breaks_ties_and_weights_apply() {
        let s = CostSettings::default();
        let m = ChainMatch::default();
        let mut a = cand(W1, None);
        let mut b = cand(W2, None);
        a.load.active_prefill_tokens = 100;
        b.load.active_decode_blocks = 10;
        let sc = score(&s, &m, 64, &[a, b], &[]);
        assert!((sc[0].logit - 164.0).abs() < 1e-9);
        assert!((sc[1].logit - 74.0).abs() < 1e-9);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        assert_eq!(choose(&sc, 0.0, &mut rng), Some(1));
        // Equal logits: the lower load wins every time.
        let tied = [
            Scored {
                logit: 10.0,
                load: 5.0,
                ..sc[0]
            },
            Scored {
                logit: 10.0,
                load: 1.0,
                ..sc[1]
            },
        ];
        for _ in 0..20 {
            assert_eq!(choose(&tied, 0.0, &mut rng), Some(1));
        }
    }

    /// A bare score: only its logit and load matter to `choose`.
    fn scored(logit: f64, load: f64) -> Scored {
        Scored {
            worker: W1,
            cached_blocks: 0,
            blocks_by_tier: [0; 4],
            prefill_tokens: 0,
            prefill_cost: 0.0,
            logit,
            load,
        }
    }

    #[test]
    fn softmax_prefers_cheaper_but_samples_all() {
        let sc = [scored(0.0, 0.0), scored(100.0, 0.0)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut n = [0; 2];
        for _ in 0..2000 {
            n[choose(&sc, 1.0, &mut rng).unwrap()] += 1;
        }
        // p(cheap) = 1 / (1 + e^-1) ~ 0.73.
        assert!(n[0] > 1300 && n[0] < 1600, "{n:?}");
        assert!(choose(&[], 0.0, &mut rng).is_none());
    }

    #[test]
    fn logits_that_are_not_numbers_fall_back_to_the_least_loaded() {
        let sc = [scored(f64::NAN, 5.0), scored(f64::NAN, 1.0), scored(f64::INFINITY, 3.0)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for t in [0.0, 1.0] {
            assert_eq!(choose(&sc, t, &mut rng), Some(1));
        }
    }

    #[test]
    fn validation_names_the_setting() {
        let mut s = CostSettings::default();
        assert!(s.validate().is_ok());
        s.bandwidth.disk = 0.0;
        assert!(s.validate().unwrap_err().contains("cost.bandwidth.disk"));
        let s = CostSettings {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("temperature"));
    }
}
