//! [`Router`]: the index, the cost model and the choice, put together.
//!
//! It owns no notion of time or transport: callers pass the candidates with
//! their current load (the HTTP front tracks in-flight requests, the
//! simulator its virtual workers) and, in approximate mode, the current
//! time in milliseconds, so the same code runs live and in virtual time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::index::{BlockId, ChainMatch, HolderId, PrefixIndex, Tier};
use crate::score::{Candidate, CostSettings, Scored, choose, score};

/// A worker as the front end registers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Name (from config or the cluster registry).
    pub name: String,
    /// Holder id of its own block pool.
    pub holder: HolderId,
    /// The fabric node on its host, if any.
    pub colocated: Option<HolderId>,
}

/// The outcome of one routing decision.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Index into the candidates passed in.
    pub index: usize,
    /// The chosen worker.
    pub worker: HolderId,
    /// Its score.
    pub chosen: Scored,
    /// Every candidate's score, in candidate order.
    pub scores: Vec<Scored>,
    /// Leading blocks held by anyone at all.
    pub depth: usize,
}

/// Blocks the router assumed cached by a decision (approximate mode).
#[derive(Debug)]
struct Assumed {
    until_ms: u64,
    holder: HolderId,
    blocks: Vec<BlockId>,
}

/// Routes requests over an event-fed index (see the module doc).
#[derive(Debug)]
pub struct Router {
    settings: CostSettings,
    salt: u64,
    index: Arc<dyn PrefixIndex>,
    fabric: RwLock<Vec<HolderId>>,
    rng: Mutex<StdRng>,
    assumed: Mutex<Assumptions>,
}

/// Approximate mode's records: in decision order, and each (holder, block)
/// with the expiry of its latest record, so expiring a record costs its
/// own blocks only.
#[derive(Debug, Default)]
struct Assumptions {
    queue: VecDeque<Assumed>,
    latest: HashMap<(HolderId, BlockId), u64>,
}

impl Router {
    /// A router over `index`, hashing tokens with `salt` (the fabric
    /// namespace's, [`kvfabric::hash::namespace_salt`]); `seed` drives tie
    /// breaks and softmax sampling.
    pub fn new(settings: CostSettings, salt: u64, index: Arc<dyn PrefixIndex>, seed: u64) -> Self {
        Router {
            settings,
            salt,
            index,
            fabric: RwLock::new(Vec::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            assumed: Mutex::new(Assumptions::default()),
        }
    }

    /// The cost settings.
    pub fn settings(&self) -> &CostSettings {
        &self.settings
    }

    /// The index it routes on.
    pub fn index(&self) -> &Arc<dyn PrefixIndex> {
        &self.index
    }

    /// The salt it hashes with.
    pub fn salt(&self) -> u64 {
        self.salt
    }

    /// Declares `holder` a fabric node: every worker can read its blocks.
    pub fn add_fabric_node(&self, holder: HolderId) {
        let mut f = self.fabric.write();
        if let Err(i) = f.binary_search(&holder) {
            f.insert(i, holder);
        }
    }

    /// Forgets a fabric node and everything it held.
    pub fn remove_fabric_node(&self, holder: HolderId) {
        self.fabric.write().retain(|h| *h != holder);
        self.index.clear(holder, None);
    }

    /// Forgets a worker's own blocks (it left, or restarted).
    pub fn remove_worker(&self, holder: HolderId) {
        self.index.clear(holder, None);
        let mut a = self.assumed.lock();
        a.queue.retain(|r| r.holder != holder);
        a.latest.retain(|&(h, _), _| h != holder);
    }

    /// Canonical block ids of the full blocks of `tokens`.
    pub fn chain(&self, tokens: &[u32]) -> Vec<BlockId> {
        kvfabric::hash::chain_hashes(self.salt, tokens, self.settings.block_tokens, &[])
            .into_iter()
            .map(u128::from_le_bytes)
            .collect()
    }

    /// Picks among `candidates` for a request of `tokens` tokens whose full
    /// blocks are `chain`. `None` only when there are no candidates.
    pub fn decide(&self, chain: &[BlockId], tokens: usize, candidates: &[Candidate]) -> Option<Decision> {
        let mut m = ChainMatch::default();
        self.index.lookup(chain, &mut m);
        let scores = {
            let fabric = self.fabric.read();
            score(&self.settings, &m, tokens, candidates, &fabric)
        };
        let index = choose(&scores, self.settings.temperature, &mut *self.rng.lock())?;
        Some(Decision {
            index,
            worker: scores[index].worker,
            chosen: scores[index],
            scores,
            depth: m.depth,
        })
    }

    /// Approximate mode, for engines that publish no events: records that
    /// `holder` now holds `chain` in HBM until `now_ms + ttl_ms`.
    pub fn assume_cached(&self, holder: HolderId, chain: &[BlockId], now_ms: u64, ttl_ms: u64) {
        self.expire(now_ms);
        self.index.store(holder, Tier::Hbm, chain);
        let until_ms = now_ms.saturating_add(ttl_ms);
        let mut a = self.assumed.lock();
        for &b in chain {
            let t = a.latest.entry((holder, b)).or_insert(until_ms);
            *t = (*t).max(until_ms);
        }
        a.queue.push_back(Assumed {
            until_ms,
            holder,
            blocks: chain.to_vec(),
        });
    }

    /// Drops approximate-mode records that ended by `now_ms`. A block
    /// assumed again by a later decision stays (only its latest record
    /// expires it).
    pub fn expire(&self, now_ms: u64) {
        let mut a = self.assumed.lock();
        let Assumptions { queue, latest } = &mut *a;
        while queue.front().is_some_and(|r| r.until_ms <= now_ms) {
            let r = queue.pop_front().expect("checked above");
            let ended: Vec<BlockId> = r
                .blocks
                .iter()
                .copied()
                .filter(|&b| match latest.get(&(r.holder, b)) {
                    Some(&t) if t <= r.until_ms => latest.remove(&(r.holder, b)).is_some(),
                    _ => false,
                })
                .collect();
            if !ended.is_empty() {
                self.index.remove(r.holder, Some(Tier::Hbm), &ended);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ShardedIndex;
    use crate::score::Load;

    fn router() -> Router {
        Router::new(CostSettings::default(), 7, Arc::new(ShardedIndex::new()), 1)
    }

    fn cand(w: u32, colocated: Option<u32>, queued: u64) -> Candidate {
        Candidate {
            worker: HolderId(w),
            colocated: colocated.map(HolderId),
            load: Load {
                active_prefill_tokens: queued,
                active_decode_blocks: 0,
                loading_tokens: 0,
            },
        }
    }

    #[test]
    fn routes_to_the_worker_with_the_prefix_unless_it_is_drowning() {
        let r = router();
        let toks: Vec<u32> = (0..160).collect();
        let chain = r.chain(&toks);
        assert_eq!(chain.len(), 10);
        r.index().store(HolderId(2), Tier::Hbm, &chain[..8]);
        let d = r
            .decide(&chain, toks.len(), &[cand(1, None, 0), cand(2, None, 0)])
            .unwrap();
        assert_eq!(d.worker, HolderId(2));
        assert_eq!(d.chosen.prefill_tokens, 32);
        assert_eq!(d.depth, 8);
        // Worker 2 has 1000 tokens queued: recomputing 160 elsewhere is cheaper.
        let d = r
            .decide(&chain, toks.len(), &[cand(1, None, 0), cand(2, None, 1000)])
            .unwrap();
        assert_eq!(d.worker, HolderId(1));
        assert!(r.decide(&chain, 1, &[]).is_none());
    }

    #[test]
    fn fabric_blocks_help_every_worker_most_the_colocated_one() {
        let r = router();
        let toks: Vec<u32> = (0..64).collect();
        let chain = r.chain(&toks);
        r.add_fabric_node(HolderId(100));
        r.add_fabric_node(HolderId(101));
        r.index().store(HolderId(101), Tier::Host, &chain);
        let d = r
            .decide(&chain, toks.len(), &[cand(1, Some(100), 0), cand(2, Some(101), 0)])
            .unwrap();
        assert_eq!(d.worker, HolderId(2), "co-located host memory beats the network");
        assert_eq!(d.scores[0].prefill_tokens, 0);
        assert!(d.scores[0].prefill_cost > d.scores[1].prefill_cost);
        r.remove_fabric_node(HolderId(101));
        let d = r.decide(&chain, toks.len(), &[cand(1, Some(100), 0)]).unwrap();
        assert_eq!(d.chosen.prefill_tokens, 64);
    }

    #[test]
    fn approximate_mode_expires_assumptions() {
        let r = router();
        let chain = r.chain(&(0..64).collect::<Vec<u32>>());
        r.assume_cached(HolderId(1), &chain[..2], 0, 100);
        r.assume_cached(HolderId(1), &chain, 50, 100);
        r.expire(120);
        assert_eq!(
            r.index().holder_len(HolderId(1)),
            4,
            "renewed blocks survive the first expiry"
        );
        r.expire(150);
        assert!(r.index().is_empty());
        // Another holder's record of the same blocks is its own.
        r.assume_cached(HolderId(1), &chain[..2], 200, 100);
        r.assume_cached(HolderId(2), &chain[..2], 250, 100);
        r.expire(300);
        assert_eq!(r.index().holder_len(HolderId(1)), 0);
        assert_eq!(r.index().holder_len(HolderId(2)), 2);
        r.expire(350);
        assert!(r.index().is_empty());
        r.assume_cached(HolderId(3), &chain, 400, 10);
        r.remove_worker(HolderId(3));
        assert!(r.index().is_empty());
        let a = r.assumed.lock();
        assert!(a.latest.is_empty() && a.queue.is_empty(), "its records go with it");
    }
}
