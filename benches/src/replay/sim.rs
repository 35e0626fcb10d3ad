//! The discrete-event simulation: a cluster of simulated workers on one or
//! more hosts, each host with its own fabric node, in virtual time, with the
//! real [`Router`] and its [`ShardedIndex`] in the loop.
//!
//! **Workers.** Each has its own HBM block cache (an LRU of full blocks)
//! and two pipelined stages:
//!
//! 1. a *load* stage (its PCIe / NVMe path; one request at a time, FIFO):
//!    on arrival the worker walks the request's reusable chain (see
//!    [`super::trace`]); blocks in its own HBM are hits, the next ones some
//!    fabric node holds are loaded, and the walk stops at the first block
//!    nobody has. Loading takes `block bytes / bandwidth` per block, at the
//!    tier's bandwidth from the node on the worker's own host, capped at the
//!    network's from any other node (or from every node with
//!    `--remote-fabric`); of several copies the fastest is read. With
//!    [`Reach::Colocated`] (independent single nodes, no cluster) a worker
//!    reads only the node on its own host.
//!    Like the LMCache and Mooncake connectors, a worker loads every hit it
//!    can reach; loads cost the request latency but no GPU time. Loaded
//!    blocks enter the worker's HBM when the load finishes.
//! 2. a *prefill* stage (the GPU; FIFO queue, batched): when idle it takes
//!    queued requests from the head while their uncached tokens fit in
//!    `max_batch_tokens` (at least one request, whole: no chunking). A
//!    request's uncached tokens are counted when the batch forms: its prompt
//!    minus the longest prefix of reusable blocks then in HBM (so blocks a
//!    request earlier in the queue just computed count, and blocks evicted
//!    since arrival do not). The batch takes `a*N^2 + b*N + c` ms for N
//!    uncached tokens in it. The first token of every request in the batch
//!    comes out when it ends (TTFT); all its full blocks then enter the
//!    worker's HBM and every block it computed is written to the fabric node
//!    on its host (as an engine with a fabric connector does; write-local
//!    placement, as Mooncake's preferred segment and LMCache's local
//!    backend do).
//!
//! Decode runs beside prefill (continuous batching on the same GPU is
//! folded into the fixed per-token time): a request finishes
//! `output_length * decode_ms_per_token` after its first token, and until
//! then its blocks (`ceil((input + output) / block_tokens)`) count as active
//! decode blocks. Decode does not slow prefill down and its KV does not
//! take HBM cache room (a cache-only model: the capacity flag is what is
//! left for cached prefixes). With `decode_stalls` (`--decode-stalls`) a
//! worker's decodes stand still while a prefill batch runs on it (prefill
//! first, no chunking): each worker keeps a decode clock that stops during
//! its batches, a decode ends when that clock has advanced by its decode
//! time (a `Decoded` event), and its end-to-end latency is then.
//!
//! **Fabric.** One node per host (`workers_per_host` workers share it), each
//! with host, disk and object tiers, each an LRU holding a block in exactly
//! one tier: a put goes to the fastest enabled tier, an eviction demotes to
//! the next one down (the last one drops), a load from a lower tier promotes
//! the block to that node's host tier. A node's object tier stands for its
//! part of one shared bucket: reading it costs the object bandwidth from
//! any host. Nodes serve each other's workers (one fabric); a read from
//! another host does not copy the block.
//!
//! **Index.** Fed exactly as events would feed it: worker HBM inserts and
//! evictions are `store/remove(worker, Hbm)`, fabric placement changes are
//! `store/remove(fabric, tier)`. Events are applied in order at the end of
//! every simulation step, before the next routing decision.
//!
//! **Policies.** Round-robin and random pick without the router; the two
//! KV-aware ones call [`Router::decide`] with every worker as a
//! [`Candidate`] whose load is its queued-plus-running prefill tokens (the
//! worker's own estimate at arrival), its active decode blocks, and the
//! loads the router itself routed there that should still be ahead of its
//! load path (each decision's priced load time queued behind the earlier
//! ones, as the router service tracks it):
//! `Scope::HbmOnly` counts only the worker's own HBM blocks (what Dynamo's
//! router scores), `Scope::AllTiers` also every fabric node's tiers priced
//! by load time (the node on the candidate's host at tier bandwidth, others
//! network-capped). Everything else (workers, fabric, bandwidths) is
//! identical. `kv-dynamo` is Dynamo's default cost (as of dynamo-kv-router
//! 1.6, HBM blocks only, as Dynamo scores engines without KVBM tiers):
//! queued prefill and the KV of decoding sequences both counted in blocks,
//! so a decoding token weighs as much as a queued prefill token (the
//! router with `Scope::HbmOnly` and a decode-block weight of one block's
//! tokens). In this model decode never slows prefill, so that weight only
//! costs TTFT here; on a GPU shared by both it would buy decode latency.
//! A sixth, `ttft-oracle`, is not a router one could deploy: it
//! sends each request to the worker whose exact simulated state (load
//! backlog, caches, queue, running batch) gives it the lowest TTFT. It
//! shows how much any per-request routing could still gain over the
//! KV-aware policies on the same cluster.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use kvfabric_router::Router;
use kvfabric_router::index::{BlockId, HolderId, PrefixIndex, ShardedIndex, Tier};
use kvfabric_router::score::{Bandwidths, Candidate, CostSettings, Load, Reach, Scope};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::trace::Trace;

/// Prefill time of a batch: `a*N^2 + b*N + c` ms for N uncached tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PrefillModel {
    pub(crate) a: f64,
    pub(crate) b: f64,
    pub(crate) c: f64,
}

impl Default for PrefillModel {
    /// The model (an 8B-class model on one GPU).
    fn default() -> Self {
        PrefillModel {
            a: 4.21e-7,
            b: 0.01518,
            c: 16.5,
        }
    }
}

impl PrefillModel {
    /// Milliseconds to prefill `n` uncached tokens in one batch.
    pub(crate) fn ms(&self, n: u64) -> f64 {
        let n = n as f64;
        self.a * n * n + self.b * n + self.c
    }

    /// The batch size with the best throughput (`sqrt(c / a)`, where the
    /// fixed cost and the quadratic term balance), in tokens.
    pub(crate) fn best_batch_tokens(&self) -> f64 {
        if self.a > 0.0 {
            (self.c / self.a).sqrt()
        } else {
            f64::INFINITY
        }
    }

    /// Throughput at the best batch size, tokens per second: what a busy
    /// worker sustains, so what the router converts load times with.
    pub(crate) fn peak_tokens_per_s(&self) -> f64 {
        let n = self.best_batch_tokens();
        if n.is_finite() {
            n / self.ms(n as u64) * 1e3
        } else {
            1e3 / self.b
        }
    }
}

/// The simulated cluster (the same for every policy).
#[derive(Clone, Debug)]
pub(crate) struct SimConfig {
    /// Workers (GPUs, one engine each).
    pub(crate) workers: usize,
    /// Workers per host; each host has one fabric node.
    pub(crate) workers_per_host: usize,
    /// Tokens per block (the trace's).
    pub(crate) block_tokens: u64,
    /// KV bytes per token.
    pub(crate) kv_bytes_per_token: u64,
    /// Each worker's HBM cache, in blocks.
    pub(crate) hbm_blocks: usize,
    /// Each fabric node's host, disk and object capacities in blocks (`None`: unbounded; 0: no such tier).
    pub(crate) fabric_blocks: [Option<u64>; 3],
    /// Read bandwidths (host, disk, object, network are used).
    pub(crate) bandwidth: Bandwidths,
    /// Whether the fabric nodes run on the workers' hosts (else every read is network-capped).
    pub(crate) colocated: bool,
    /// Which nodes a worker reads (the router's `cost.reach` is set to match).
    pub(crate) reach: Reach,
    /// Decode time per output token.
    pub(crate) decode_ms_per_token: f64,
    /// Decode makes no progress while a prefill batch runs on its worker.
    pub(crate) decode_stalls: bool,
    /// Uncached tokens per prefill batch (a longer request runs alone).
    pub(crate) max_batch_tokens: u64,
    /// Prefill time model.
    pub(crate) prefill: PrefillModel,
    /// The KV-aware router's cost settings (its scope is set per policy).
    pub(crate) cost: CostSettings,
}

impl SimConfig {
    fn block_bytes(&self) -> f64 {
        (self.block_tokens * self.kv_bytes_per_token) as f64
    }

    /// Fabric nodes: one per host.
    pub(crate) fn hosts(&self) -> usize {
        self.workers.div_ceil(self.workers_per_host.max(1))
    }

    /// The host (and fabric node) of worker `w`.
    fn host_of(&self, w: usize) -> usize {
        w / self.workers_per_host.max(1)
    }

    /// Milliseconds to load one block from fabric tier `t` of a node on the
    /// reader's host (`local`) or another.
    fn load_ms(&self, t: Tier, local: bool) -> f64 {
        let b = &self.bandwidth;
        let bw = match t {
            Tier::Hbm => b.hbm,
            Tier::Host => b.host,
            Tier::Disk => b.disk,
            Tier::Object => b.object,
        };
        let bw = if self.colocated && local { bw } else { bw.min(b.network) };
        self.block_bytes() / bw * 1e3
    }
}

/// A routing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Next worker in turn.
    RoundRobin,
    /// A uniformly random worker.
    Random,
    /// The router with `Scope::HbmOnly` (what Dynamo's router scores).
    HbmOnly,
    /// The router with `Scope::AllTiers` (kvfabric's tier-aware scoring).
    TierAware,
    /// Dynamo's default cost, HBM-only: prefill and decode KV both counted
    /// in blocks, so a decoding sequence's KV weighs as much per token as
    /// queued prefill (the router with `Scope::HbmOnly` and a decode-block
    /// weight of one block's tokens).
    Dynamo,
    /// Not a deployable router: the worker with the lowest TTFT for this
    /// request as predicted from every simulated worker's exact queue, load
    /// stage and caches (greedy, request by request). The reference for how
    /// much routing alone could gain here over the KV-aware policies.
    TtftOracle,
}

impl Policy {
    /// Every policy, in report order.
    pub(crate) const ALL: [Policy; 6] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::HbmOnly,
        Policy::TierAware,
        Policy::Dynamo,
        Policy::TtftOracle,
    ];

    /// Name in the table and the JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::HbmOnly => "kv-hbm-only",
            Policy::TierAware => "kv-tier-aware",
            Policy::Dynamo => "kv-dynamo",
            Policy::TtftOracle => "ttft-oracle",
        }
    }
}

/// What one replay under one policy measured.
#[derive(Clone, Debug)]
pub(crate) struct RunResult {
    /// The policy.
    pub(crate) policy: Policy,
    /// Time to first token of every request, in arrival order.
    pub(crate) ttft_ms: Vec<f64>,
    /// End-to-end latency of every request, in arrival order.
    pub(crate) e2e_ms: Vec<f64>,
    /// Prefill tokens computed, per request, in arrival order.
    pub(crate) computed: Vec<u64>,
    /// Prompt tokens served from each tier (index = `Tier as usize`).
    pub(crate) hit_tokens: [u64; 4],
    /// Of the fabric hits, tokens read from a node on another host.
    pub(crate) remote_tokens: u64,
    /// Prompt tokens.
    pub(crate) input_tokens: u64,
    /// GPU time spent in prefill batches, all workers.
    pub(crate) busy_ms: f64,
    /// From the first arrival to the last.
    pub(crate) span_ms: f64,
    /// Workers.
    pub(crate) workers: usize,
}

impl RunResult {
    /// Prefill tokens computed in all.
    pub(crate) fn prefill_tokens(&self) -> u64 {
        self.computed.iter().sum()
    }

    /// Offered prefill load: GPU time in prefill over the workers' time
    /// between the first and the last arrival (above 1: overloaded).
    pub(crate) fn utilization(&self) -> f64 {
        if self.span_ms > 0.0 {
            self.busy_ms / (self.workers as f64 * self.span_ms)
        } else {
            0.0
        }
    }
}

/// Hashes a [`BlockId`] (already a hash) by its low 64 bits.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64 ^ (v >> 64) as u64;
    }
}

type IdMap<V> = HashMap<BlockId, V, BuildHasherDefault<IdHasher>>;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Node {
    key: BlockId,
    prev: u32,
    next: u32,
}

/// A least-recently-used set of blocks: O(1) touch, insert and eviction
/// (a doubly linked list in a slab, most recent at the head).
struct Lru {
    cap: u64,
    map: IdMap<u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Lru {
    fn new(cap: u64) -> Lru {
        Lru {
            cap,
            map: IdMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    fn contains(&self, k: &BlockId) -> bool {
        self.map.contains_key(k)
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = self.head;
        if self.head != NIL {
            self.nodes[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    /// Makes `k` the most recent; false if absent.
    fn touch(&mut self, k: &BlockId) -> bool {
        match self.map.get(k) {
            Some(&i) => {
                if self.head != i {
                    self.unlink(i);
                    self.push_front(i);
                }
                true
            }
            None => false,
        }
    }

    /// Inserts (or touches) `k`: whether it was new, and the block evicted
    /// to make room (possibly `k` itself when the capacity is 0).
    fn insert(&mut self, k: BlockId) -> (bool, Option<BlockId>) {
        if self.touch(&k) {
            return (false, None);
        }
        let node = Node {
            key: k,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.map.insert(k, i);
        self.push_front(i);
        let evicted = if self.map.len() as u64 > self.cap {
            let t = self.tail;
            let key = self.nodes[t as usize].key;
            self.remove(&key);
            Some(key)
        } else {
            None
        };
        (true, evicted)
    }

    fn remove(&mut self, k: &BlockId) -> bool {
        match self.map.remove(k) {
            Some(i) => {
                self.unlink(i);
                self.free.push(i);
                true
            }
            None => false,
        }
    }
}

/// Index events in order, applied in runs of the same kind.
#[derive(Default)]
struct Feed {
    ops: Vec<(bool, HolderId, Tier, BlockId)>,
    run: Vec<BlockId>,
}

impl Feed {
    fn store(&mut self, h: HolderId, t: Tier, b: BlockId) {
        self.ops.push((true, h, t, b));
    }
    fn remove(&mut self, h: HolderId, t: Tier, b: BlockId) {
        self.ops.push((false, h, t, b));
    }
    fn flush(&mut self, index: &dyn PrefixIndex) {
        let mut i = 0;
        while i < self.ops.len() {
            let (store, h, t, _) = self.ops[i];
            self.run.clear();
            while i < self.ops.len() && (self.ops[i].0, self.ops[i].1, self.ops[i].2) == (store, h, t) {
                self.run.push(self.ops[i].3);
                i += 1;
            }
            if store {
                index.store(h, t, &self.run);
            } else {
                index.remove(h, Some(t), &self.run);
            }
        }
        self.ops.clear();
    }
}

const FABRIC_TIERS: [Tier; 3] = [Tier::Host, Tier::Disk, Tier::Object];

/// The fabric node: exclusive host / disk / object LRUs.
struct Fabric {
    holder: HolderId,
    tiers: [Option<Lru>; 3],
}

impl Fabric {
    fn new(holder: HolderId, caps: [Option<u64>; 3]) -> Fabric {
        Fabric {
            holder,
            tiers: caps.map(|c| match c {
                Some(0) => None,
                Some(c) => Some(Lru::new(c)),
                None => Some(Lru::new(u64::MAX)),
            }),
        }
    }

    fn tier_of(&self, b: &BlockId) -> Option<Tier> {
        (0..3).find_map(|l| {
            self.tiers[l]
                .as_ref()
                .filter(|t| t.contains(b))
                .map(|_| FABRIC_TIERS[l])
        })
    }

    /// Inserts `b` at level `from` or the next enabled one below, demoting
    /// evictions down the stack.
    fn insert_from(&mut self, from: usize, b: BlockId, feed: &mut Feed) {
        let mut cur = b;
        let holder = self.holder;
        for (lru, &tier) in self.tiers.iter_mut().zip(&FABRIC_TIERS).skip(from) {
            let Some(lru) = lru.as_mut() else { continue };
            let (new, ev) = lru.insert(cur);
            if new {
                feed.store(holder, tier, cur);
            }
            match ev {
                Some(e) => {
                    feed.remove(holder, tier, e);
                    cur = e;
                }
                None => return,
            }
        }
    }

    /// A worker wrote `b`: kept where it is if present, else put in the fastest tier.
    fn put(&mut self, b: BlockId, feed: &mut Feed) {
        if let Some(t) = self.tier_of(&b) {
            if let Some(lru) = self.tiers[t as usize - 1].as_mut() {
                lru.touch(&b);
            }
            return;
        }
        self.insert_from(0, b, feed);
    }

    /// A worker read `b` from tier `t`: promoted to the fastest tier.
    fn promote(&mut self, b: BlockId, t: Tier, feed: &mut Feed) {
        let l = t as usize - 1;
        let top = (0..3).find(|&l| self.tiers[l].is_some()).unwrap_or(l);
        if l == top {
            if let Some(lru) = self.tiers[l].as_mut() {
                lru.touch(&b);
            }
            return;
        }
        if let Some(lru) = self.tiers[l].as_mut() {
            lru.remove(&b);
            feed.remove(self.holder, t, b);
        }
        self.insert_from(top, b, feed);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tiers.iter().flatten().map(Lru::len).sum()
    }
}

struct Worker {
    holder: HolderId,
    hbm: Lru,
    load_free_at: f64,
    /// When the router expects this worker's load path to be free, in
    /// seconds, from its own decisions (as the router service keeps it).
    est_load_free_s: f64,
    queue: VecDeque<usize>,
    running: Vec<usize>,
    pending_prefill: u64,
    /// Decoding sequences: when their decode ends on this worker's decode
    /// clock ([`Worker::decode_clock`]), their blocks, the request.
    decodes: BinaryHeap<Reverse<(Ms, u64, usize)>>,
    decode_blocks: u64,
    /// The decode clock (ms of decode progress) at real time
    /// `decode_clock_at`: with `decode_stalls` it stands still while a
    /// prefill batch runs; else it is real time.
    decode_clock: f64,
    decode_clock_at: f64,
    busy_ms: f64,
    /// Requests in its load stage (queued or loading).
    loading: Vec<usize>,
    /// When the running batch ends.
    batch_end: f64,
}

impl Worker {
    /// Its decode clock at `now` while no prefill batch runs on it.
    fn running_decode_clock(&self, now: f64) -> f64 {
        self.decode_clock + (now - self.decode_clock_at)
    }
}

/// A time in ms with a total order.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ms(f64);
impl Eq for Ms {}
impl PartialOrd for Ms {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ms {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Loaded(usize),
    Prefilled(usize),
    /// A worker's first decode may have ended (`decode_stalls`).
    Decoded(usize),
}

#[derive(Clone, Default)]
struct ReqState {
    worker: usize,
    estimate: u64,
    /// Chain positions loaded for this request, from which tier, and whether
    /// from another host.
    loaded: Vec<(u32, Tier, bool)>,
    /// Leading blocks found in HBM when its batch formed.
    hits: usize,
    arrival: f64,
    /// When its load stage ends (if it loads anything).
    load_end: f64,
}

/// One replay of `trace` under `policy` on the cluster `cfg`.
pub(crate) fn run(trace: &Trace, cfg: &SimConfig, policy: Policy, time_scale: f64, seed: u64) -> RunResult {
    Sim::new(trace, cfg, policy, time_scale, seed).run()
}

struct Sim<'a> {
    trace: &'a Trace,
    cfg: &'a SimConfig,
    policy: Policy,
    scale: f64,
    router: Router,
    fabric: Vec<Fabric>,
    workers: Vec<Worker>,
    reqs: Vec<ReqState>,
    events: BinaryHeap<Reverse<(Ms, u64, Ev)>>,
    seq: u64,
    feed: Feed,
    rng: StdRng,
    rr: usize,
    res: RunResult,
    cands: Vec<Candidate>,
}

impl<'a> Sim<'a> {
    fn new(trace: &'a Trace, cfg: &'a SimConfig, policy: Policy, scale: f64, seed: u64) -> Sim<'a> {
        let mut cost = cfg.cost;
        cost.reach = cfg.reach;
        cost.scope = if matches!(policy, Policy::HbmOnly | Policy::Dynamo) {
            Scope::HbmOnly
        } else {
            Scope::AllTiers
        };
        if policy == Policy::Dynamo {
            cost.weights.decode_block = cfg.block_tokens as f64;
        }
        let index: Arc<dyn PrefixIndex> = Arc::new(ShardedIndex::new());
        let router = Router::new(cost, 0, index, seed);
        let fabric: Vec<Fabric> = (0..cfg.hosts())
            .map(|h| Fabric::new(HolderId((cfg.workers + h) as u32), cfg.fabric_blocks))
            .collect();
        for f in &fabric {
            router.add_fabric_node(f.holder);
        }
        let n = trace.requests.len();
        Sim {
            trace,
            cfg,
            policy,
            scale,
            router,
            fabric,
            workers: (0..cfg.workers)
                .map(|w| Worker {
                    holder: HolderId(w as u32),
                    hbm: Lru::new(cfg.hbm_blocks as u64),
                    load_free_at: 0.0,
                    est_load_free_s: 0.0,
                    queue: VecDeque::new(),
                    running: Vec::new(),
                    pending_prefill: 0,
                    decodes: BinaryHeap::new(),
                    decode_blocks: 0,
                    decode_clock: 0.0,
                    decode_clock_at: 0.0,
                    busy_ms: 0.0,
                    loading: Vec::new(),
                    batch_end: 0.0,
                })
                .collect(),
            reqs: vec![ReqState::default(); n],
            events: BinaryHeap::new(),
            seq: 0,
            feed: Feed::default(),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            rr: 0,
            res: RunResult {
                policy,
                ttft_ms: vec![0.0; n],
                e2e_ms: vec![0.0; n],
                computed: vec![0; n],
                hit_tokens: [0; 4],
                remote_tokens: 0,
                input_tokens: trace.input_tokens(),
                busy_ms: 0.0,
                span_ms: 0.0,
                workers: cfg.workers,
            },
            cands: Vec::with_capacity(cfg.workers),
        }
    }

    fn push(&mut self, at: f64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((Ms(at), self.seq, ev)));
    }

    fn run(mut self) -> RunResult {
        self.drive();
        self.res
    }

    /// Replays every request to the end.
    fn drive(&mut self) {
        let n = self.trace.requests.len();
        let mut next = 0;
        let mut last = 0.0f64;
        loop {
            let arrival = (next < n).then(|| self.trace.requests[next].timestamp_ms * self.scale);
            let ev_at = self.events.peek().map(|Reverse((t, _, _))| t.0);
            match (arrival, ev_at) {
                (None, None) => break,
                (Some(a), e) if e.is_none_or(|e| a < e) => {
                    self.arrive(next, a);
                    next += 1;
                    last = a;
                }
                _ => {
                    let Some(Reverse((Ms(t), _, ev))) = self.events.pop() else {
                        break;
                    };
                    match ev {
                        Ev::Loaded(i) => self.load_done(i, t),
                        Ev::Prefilled(w) => self.batch_done(w, t),
                        Ev::Decoded(w) => self.decode_done(w, t),
                    }
                }
            }
            self.feed.flush(self.router.index().as_ref());
        }
        self.res.busy_ms = self.workers.iter().map(|w| w.busy_ms).sum();
        self.res.span_ms = last;
    }

    fn pick(&mut self, i: usize, now: f64) -> usize {
        let w = self.cfg.workers;
        match self.policy {
            Policy::RoundRobin => {
                self.rr += 1;
                (self.rr - 1) % w
            }
            Policy::Random => self.rng.random_range(0..w),
            Policy::TtftOracle => (0..w)
                .map(|c| (self.predict_ttft(i, c, now), self.workers[c].pending_prefill, c))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map_or(0, |(_, _, c)| c),
            Policy::HbmOnly | Policy::TierAware | Policy::Dynamo => {
                let r = &self.trace.requests[i];
                let chain = &r.blocks[..r.reusable(self.cfg.block_tokens)];
                self.cands.clear();
                for (w, wk) in self.workers.iter_mut().enumerate() {
                    let colocated = self.cfg.colocated.then(|| self.fabric[self.cfg.host_of(w)].holder);
                    // (With stalls, Decoded events end decodes on time.)
                    while !self.cfg.decode_stalls
                        && let Some(Reverse((Ms(end), blocks, _))) = wk.decodes.peek().copied()
                    {
                        if end > now {
                            break;
                        }
                        wk.decodes.pop();
                        wk.decode_blocks -= blocks;
                    }
                    self.cands.push(Candidate {
                        worker: wk.holder,
                        colocated,
                        load: Load {
                            active_prefill_tokens: wk.pending_prefill,
                            active_decode_blocks: wk.decode_blocks,
                            loading_tokens: self.router.settings().load_path_ahead(wk.est_load_free_s, now / 1000.0),
                        },
                    });
                }
                let d = self.router.decide(chain, r.input as usize, &self.cands);
                // As the router service does: the decision's loads queue on
                // the worker's load path, as the router priced them.
                if let Some(d) = &d {
                    let wk = &mut self.workers[d.index];
                    wk.est_load_free_s = self.router.settings().load_path_free_after(
                        wk.est_load_free_s,
                        now / 1000.0,
                        d.chosen.load_tokens(),
                    );
                }
                d.map_or(0, |d| d.index)
            }
        }
    }

    /// Request `i`'s TTFT if it went to worker `w` now, read off the
    /// simulated worker's exact state (for [`Policy::TtftOracle`]): its load
    /// stage's backlog and this request's load time there, then its prefill
    /// queue drained in FIFO batches (the running batch's end, queued and
    /// still-loading requests at their estimates, in the order they become
    /// ready), until the batch this request would join ends.
    fn predict_ttft(&self, i: usize, w: usize, now: f64) -> f64 {
        let r = &self.trace.requests[i];
        let bt = self.cfg.block_tokens;
        let chain = &r.blocks[..r.reusable(bt)];
        let home = self.cfg.host_of(w);
        let wk = &self.workers[w];
        let mut reused = 0u64;
        let mut load_ms = 0.0;
        for b in chain {
            if !wk.hbm.contains(b) {
                let Some((_, _, ms)) = locate(&self.fabric, self.cfg, home, b) else {
                    break;
                };
                load_ms += ms;
            }
            reused += 1;
        }
        let ready = if load_ms > 0.0 {
            wk.load_free_at.max(now) + load_ms
        } else {
            now
        };
        // (ready at, uncached tokens, is this request)
        let mut pending: Vec<(f64, u64, bool)> =
            wk.queue.iter().map(|&q| (now, self.reqs[q].estimate, false)).collect();
        pending.extend(
            wk.loading
                .iter()
                .map(|&q| (self.reqs[q].load_end, self.reqs[q].estimate, false)),
        );
        pending.push((ready, r.input - reused * bt, true));
        pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut t = if wk.running.is_empty() {
            now
        } else {
            wk.batch_end.max(now)
        };
        let mut k = 0;
        while k < pending.len() {
            t = t.max(pending[k].0);
            let (mut tokens, mut mine) = (0, false);
            let first = k;
            while k < pending.len()
                && pending[k].0 <= t
                && (k == first || tokens + pending[k].1 <= self.cfg.max_batch_tokens)
            {
                tokens += pending[k].1;
                mine |= pending[k].2;
                k += 1;
            }
            t += self.cfg.prefill.ms(tokens);
            if mine {
                return t - now;
            }
        }
        unreachable!("the request is in `pending`")
    }

    fn arrive(&mut self, i: usize, now: f64) {
        let w = self.pick(i, now);
        let trace = self.trace;
        let r = &trace.requests[i];
        let bt = self.cfg.block_tokens;
        let chain = &r.blocks[..r.reusable(bt)];
        let home = self.cfg.host_of(w);
        let wk = &mut self.workers[w];
        let mut loaded = Vec::new();
        let mut sources = Vec::new();
        let mut reused = 0;
        for (pos, b) in chain.iter().enumerate() {
            if wk.hbm.touch(b) {
            } else if let Some((node, t, ms)) = locate(&self.fabric, self.cfg, home, b) {
                loaded.push((pos as u32, t, node != home));
                sources.push((node, ms));
            } else {
                break;
            }
            reused += 1;
        }
        let estimate = r.input - reused as u64 * bt;
        wk.pending_prefill += estimate;
        let st = &mut self.reqs[i];
        st.worker = w;
        st.estimate = estimate;
        st.arrival = now;
        if loaded.is_empty() {
            wk.queue.push_back(i);
            self.try_start(w, now);
            return;
        }
        let mut ms = 0.0;
        for (&(pos, t, _), &(node, load_ms)) in loaded.iter().zip(&sources) {
            ms += load_ms;
            self.fabric[node].promote(chain[pos as usize], t, &mut self.feed);
        }
        let start = wk.load_free_at.max(now);
        wk.load_free_at = start + ms;
        self.workers[w].loading.push(i);
        self.reqs[i].load_end = start + ms;
        self.reqs[i].loaded = loaded;
        self.push(start + ms, Ev::Loaded(i));
    }

    fn load_done(&mut self, i: usize, now: f64) {
        let w = self.reqs[i].worker;
        let trace = self.trace;
        let r = &trace.requests[i];
        let wk = &mut self.workers[w];
        wk.loading.retain(|&q| q != i);
        for &(pos, _, _) in &self.reqs[i].loaded {
            hbm_insert(wk, r.blocks[pos as usize], &mut self.feed);
        }
        wk.queue.push_back(i);
        self.try_start(w, now);
    }

    fn try_start(&mut self, w: usize, now: f64) {
        let bt = self.cfg.block_tokens;
        let trace = self.trace;
        let wk = &mut self.workers[w];
        if !wk.running.is_empty() {
            return;
        }
        let mut tokens = 0;
        while let Some(&i) = wk.queue.front() {
            let r = &trace.requests[i];
            let chain = &r.blocks[..r.reusable(bt)];
            let hits = chain.iter().take_while(|b| wk.hbm.contains(b)).count();
            let computed = r.input - hits as u64 * bt;
            if !wk.running.is_empty() && tokens + computed > self.cfg.max_batch_tokens {
                break;
            }
            wk.queue.pop_front();
            tokens += computed;
            wk.running.push(i);
            let st = &mut self.reqs[i];
            st.hits = hits;
            let mut loaded = st.loaded.iter().peekable();
            for (pos, b) in chain[..hits].iter().enumerate() {
                wk.hbm.touch(b);
                let mut tier = Tier::Hbm;
                while let Some(&&(p, t, remote)) = loaded.peek() {
                    if p as usize > pos {
                        break;
                    }
                    loaded.next();
                    if p as usize == pos {
                        tier = t;
                        if remote {
                            self.res.remote_tokens += bt;
                        }
                    }
                }
                self.res.hit_tokens[tier as usize] += bt;
            }
            self.res.computed[i] = computed;
        }
        if wk.running.is_empty() {
            return;
        }
        if self.cfg.decode_stalls {
            wk.decode_clock = wk.running_decode_clock(now);
            wk.decode_clock_at = now;
        }
        let ms = self.cfg.prefill.ms(tokens);
        wk.batch_end = now + ms;
        wk.busy_ms += ms;
        self.push(now + ms, Ev::Prefilled(w));
    }

    fn batch_done(&mut self, w: usize, now: f64) {
        let bt = self.cfg.block_tokens;
        let trace = self.trace;
        let stalls = self.cfg.decode_stalls;
        // The decode clock stood still during the batch (with stalls).
        self.workers[w].decode_clock_at = now;
        let decode_now = self.workers[w].decode_clock;
        let batch = std::mem::take(&mut self.workers[w].running);
        let home = self.cfg.host_of(w);
        for &i in &batch {
            let r = &trace.requests[i];
            let st = &self.reqs[i];
            let wk = &mut self.workers[w];
            for (pos, &b) in r.blocks.iter().enumerate() {
                hbm_insert(wk, b, &mut self.feed);
                if pos >= st.hits {
                    self.fabric[home].put(b, &mut self.feed);
                }
            }
            wk.pending_prefill -= st.estimate;
            let ttft = now - st.arrival;
            let decode = r.output as f64 * self.cfg.decode_ms_per_token;
            let blocks = (r.input + r.output).div_ceil(bt);
            let end = if stalls { decode_now } else { now } + decode;
            wk.decodes.push(Reverse((Ms(end), blocks, i)));
            wk.decode_blocks += blocks;
            self.res.ttft_ms[i] = ttft;
            if !stalls {
                self.res.e2e_ms[i] = ttft + decode;
            }
        }
        self.workers[w].running = batch;
        self.workers[w].running.clear();
        self.try_start(w, now);
        if stalls {
            self.schedule_decode_done(w, now);
        }
    }

    /// With `decode_stalls`: when worker `w`'s first decode ends if no
    /// prefill batch starts before (one that does stops the clock; its end
    /// schedules again).
    fn schedule_decode_done(&mut self, w: usize, now: f64) {
        let wk = &self.workers[w];
        if !wk.running.is_empty() {
            return;
        }
        if let Some(Reverse((Ms(end), _, _))) = wk.decodes.peek() {
            let clock = wk.running_decode_clock(now);
            self.push(now + (end - clock).max(0.0), Ev::Decoded(w));
        }
    }

    /// With `decode_stalls`: ends the decodes of worker `w` whose decode
    /// clock target has passed (a stale event finds none).
    fn decode_done(&mut self, w: usize, now: f64) {
        let wk = &mut self.workers[w];
        if !wk.running.is_empty() {
            return;
        }
        let clock = wk.running_decode_clock(now);
        while let Some(Reverse((Ms(end), blocks, i))) = wk.decodes.peek().copied() {
            if end > clock + 1e-6 {
                break;
            }
            wk.decodes.pop();
            wk.decode_blocks -= blocks;
            self.res.e2e_ms[i] = now - self.reqs[i].arrival;
        }
        self.schedule_decode_done(w, now);
    }
}

/// The fastest copy of `b` for a worker on host `home`: its node, tier and
/// load time (the home node wins a tie).
fn locate(fabric: &[Fabric], cfg: &SimConfig, home: usize, b: &BlockId) -> Option<(usize, Tier, f64)> {
    let mut best: Option<(usize, Tier, f64)> = None;
    let others = (0..fabric.len()).filter(|&n| n != home && cfg.reach == Reach::Any);
    for n in std::iter::once(home).chain(others) {
        if let Some(t) = fabric[n].tier_of(b) {
            let ms = cfg.load_ms(t, n == home);
            if best.is_none_or(|(_, _, m)| ms < m) {
                best = Some((n, t, ms));
            }
        }
    }
    best
}

fn hbm_insert(wk: &mut Worker, b: BlockId, feed: &mut Feed) {
    let (new, ev) = wk.hbm.insert(b);
    if new {
        feed.store(wk.holder, Tier::Hbm, b);
    }
    if let Some(e) = ev {
        feed.remove(wk.holder, Tier::Hbm, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workers: usize) -> SimConfig {
        let prefill = PrefillModel::default();
        SimConfig {
            workers,
            workers_per_host: workers,
            block_tokens: 512,
            kv_bytes_per_token: 128 << 10,
            hbm_blocks: 64,
            fabric_blocks: [Some(1000), Some(1000), None],
            bandwidth: Bandwidths::default(),
            colocated: true,
            reach: Reach::Any,
            decode_ms_per_token: 10.0,
            decode_stalls: false,
            max_batch_tokens: 8192,
            prefill,
            cost: CostSettings {
                block_tokens: 512,
                prefill_tokens_per_s: prefill.peak_tokens_per_s(),
                ..Default::default()
            },
        }
    }

    fn trace(lines: &[(u64, u64, &[u64])]) -> Trace {
        let lines: Vec<_> = lines.iter().map(|&(t, n, ids)| (t, n, 4, ids)).collect();
        trace_out(&lines)
    }

    /// Lines of (timestamp, input, output, hash ids).
    fn trace_out(lines: &[(u64, u64, u64, &[u64])]) -> Trace {
        let mut s = String::new();
        for (t, n, out, ids) in lines {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            s += &format!(
                "{{\"timestamp\": {t}, \"input_length\": {n}, \"output_length\": {out}, \"hash_ids\": [{}]}}\n",
                ids.join(",")
            );
        }
        Trace::parse(s.as_bytes(), 512, None).unwrap()
    }

    #[test]
    fn lru_evicts_the_least_recent() {
        let mut l = Lru::new(2);
        assert_eq!(l.insert(1), (true, None));
        assert_eq!(l.insert(2), (true, None));
        assert!(l.touch(&1));
        assert_eq!(l.insert(3), (true, Some(2)));
        assert_eq!(l.insert(1), (false, None));
        assert!(l.contains(&1) && l.contains(&3) && !l.contains(&2));
        assert!(l.remove(&3) && !l.remove(&3));
        assert_eq!(l.len(), 1);
        let mut z = Lru::new(0);
        assert_eq!(z.insert(9), (true, Some(9)), "a zero-capacity cache keeps nothing");
        assert_eq!(z.len(), 0);
    }

    #[test]
    fn fabric_demotes_down_and_promotes_on_a_hit() {
        let idx = ShardedIndex::new();
        let mut feed = Feed::default();
        let mut f = Fabric::new(HolderId(9), [Some(1), Some(1), None]);
        for b in [1, 2, 3] {
            f.put(b, &mut feed);
        }
        assert_eq!(
            [f.tier_of(&1), f.tier_of(&2), f.tier_of(&3)],
            [Some(Tier::Object), Some(Tier::Disk), Some(Tier::Host)]
        );
        f.promote(1, Tier::Object, &mut feed);
        assert_eq!(
            [f.tier_of(&1), f.tier_of(&2), f.tier_of(&3)],
            [Some(Tier::Host), Some(Tier::Object), Some(Tier::Disk)]
        );
        feed.flush(&idx);
        assert_eq!(idx.holder_len(HolderId(9)), 3, "exclusive tiers: one entry per block");
        let mut m = kvfabric_router::index::ChainMatch::default();
        idx.lookup(&[1], &mut m);
        assert_eq!(m.entries().len(), 1);
        assert!(m.entries()[0].tiers.contains(Tier::Host) && !m.entries()[0].tiers.contains(Tier::Object));
        // No host tier: puts land on disk.
        let mut g = Fabric::new(HolderId(9), [Some(0), Some(4), None]);
        g.put(5, &mut feed);
        assert_eq!(g.tier_of(&5), Some(Tier::Disk));
    }

    #[test]
    fn a_prefix_in_the_chosen_workers_hbm_computes_only_the_suffix() {
        // One worker, the second request far later shares 3 of its blocks.
        let t = trace(&[(0, 2048, &[1, 2, 3, 4]), (100_000, 2200, &[1, 2, 3, 7, 8])]);
        for p in Policy::ALL {
            let r = run(&t, &cfg(1), p, 1.0, 1);
            assert_eq!(r.computed, vec![2048, 2200 - 3 * 512], "{p:?}");
            assert_eq!(r.hit_tokens, [3 * 512, 0, 0, 0]);
            // Alone on an idle worker: TTFT is exactly its batch.
            let pm = PrefillModel::default();
            assert!((r.ttft_ms[1] - pm.ms(2200 - 3 * 512)).abs() < 1e-9);
            assert!((r.e2e_ms[1] - r.ttft_ms[1] - 40.0).abs() < 1e-9);
        }
    }

    #[test]
    fn with_decode_stalls_a_prefill_on_the_worker_delays_its_decodes() {
        // One worker: request 0 decodes 100 tokens (1000 ms at 10 ms each);
        // request 1 arrives 200 ms after 0's first token and prefills 4096
        // tokens while 0 decodes.
        let pm = PrefillModel::default();
        let first = pm.ms(2048);
        let t = trace_out(&[
            (0, 2048, 100, &[1, 2, 3, 4]),
            ((first + 200.0) as u64, 4096, 10, &[9, 10, 11, 12, 13, 14, 15, 16]),
        ]);
        let mut c = cfg(1);
        let beside = run(&t, &c, Policy::RoundRobin, 1.0, 1);
        assert!((beside.e2e_ms[0] - first - 1000.0).abs() < 1e-6, "{:?}", beside.e2e_ms);
        c.decode_stalls = true;
        let stalls = run(&t, &c, Policy::RoundRobin, 1.0, 1);
        assert_eq!(stalls.ttft_ms, beside.ttft_ms, "prefill goes first either way");
        let batch1 = pm.ms(4096);
        assert!(
            (stalls.e2e_ms[0] - (first + 1000.0 + batch1)).abs() < 1e-6,
            "0 stood still for 1's batch: {:?}",
            stalls.e2e_ms
        );
        // 1 decodes after its own batch, unhindered.
        assert!(
            (stalls.e2e_ms[1] - (batch1 + 100.0)).abs() < 1e-6,
            "{:?}",
            stalls.e2e_ms
        );
    }

    #[test]
    fn another_worker_loads_from_the_fabric_and_pays_the_load_time() {
        // Round-robin puts the second request on worker 1: its prefix comes from host memory.
        let t = trace(&[(0, 2048, &[1, 2, 3, 4]), (100_000, 2200, &[1, 2, 3, 7, 8])]);
        let c = cfg(2);
        let r = run(&t, &c, Policy::RoundRobin, 1.0, 1);
        assert_eq!(r.computed[1], 2200 - 3 * 512);
        assert_eq!(r.hit_tokens, [0, 3 * 512, 0, 0]);
        let want = 3.0 * c.load_ms(Tier::Host, true) + c.prefill.ms(2200 - 3 * 512);
        assert!((r.ttft_ms[1] - want).abs() < 1e-9, "{} vs {want}", r.ttft_ms[1]);
        assert_eq!(r.remote_tokens, 0);
        // The KV-aware router sends it to worker 0, where the prefix is in HBM for free.
        for p in [Policy::HbmOnly, Policy::TierAware] {
            let r = run(&t, &c, p, 1.0, 1);
            assert_eq!(r.hit_tokens, [3 * 512, 0, 0, 0], "{p:?}");
        }
    }

    #[test]
    fn dynamos_cost_weighs_decode_kv_like_queued_prefill() {
        // The first request is still decoding (100k tokens at 10 ms) when
        // the second, sharing its first 3 blocks, arrives.
        let t = trace_out(&[(0, 2048, 100_000, &[1, 2, 3, 4]), (100_000, 2200, 4, &[1, 2, 3, 7, 8])]);
        let c = cfg(2);
        // Our cost counts the decoding sequence's 200 blocks as 200 tokens:
        // the 1536 cached tokens win, the prefix is reused from HBM.
        let r = run(&t, &c, Policy::HbmOnly, 1.0, 1);
        assert_eq!(r.hit_tokens, [3 * 512, 0, 0, 0]);
        // Dynamo's counts them as 200 blocks against 3 cached blocks: the
        // idle worker wins and loads the prefix from the fabric.
        let r = run(&t, &c, Policy::Dynamo, 1.0, 1);
        assert_eq!(r.hit_tokens, [0, 3 * 512, 0, 0]);
        assert_eq!(r.computed[1], 2200 - 3 * 512);
    }

    #[test]
    fn a_worker_on_another_host_reads_at_network_speed() {
        // Two hosts of one worker: round-robin puts the second request on
        // worker 1, whose own node is empty; the prefix comes from node 0.
        let t = trace(&[(0, 2048, &[1, 2, 3, 4]), (100_000, 2200, &[1, 2, 3, 7, 8])]);
        let mut c = cfg(2);
        c.workers_per_host = 1;
        assert_eq!(c.hosts(), 2);
        let r = run(&t, &c, Policy::RoundRobin, 1.0, 1);
        assert_eq!(r.hit_tokens, [0, 3 * 512, 0, 0]);
        assert_eq!(r.remote_tokens, 3 * 512);
        let remote = c.load_ms(Tier::Host, false);
        assert!(remote > c.load_ms(Tier::Host, true), "the network caps remote reads");
        let want = 3.0 * remote + c.prefill.ms(2200 - 3 * 512);
        assert!((r.ttft_ms[1] - want).abs() < 1e-9, "{} vs {want}", r.ttft_ms[1]);
        // A copy on the reader's own host is preferred to a remote one.
        let mut feed = Feed::default();
        let mut nodes = vec![
            Fabric::new(HolderId(2), [Some(8), None, None]),
            Fabric::new(HolderId(3), [Some(8), None, None]),
        ];
        nodes[0].put(5, &mut feed);
        assert_eq!(locate(&nodes, &c, 1, &5).map(|(n, _, _)| n), Some(0));
        nodes[1].put(5, &mut feed);
        assert_eq!(locate(&nodes, &c, 1, &5).map(|(n, _, _)| n), Some(1));
        assert_eq!(locate(&nodes, &c, 1, &6), None);
        // Without a cluster a worker reaches only its own host's node.
        c.reach = Reach::Colocated;
        let mut feed = Feed::default();
        let mut alone = vec![
            Fabric::new(HolderId(2), [Some(8), None, None]),
            Fabric::new(HolderId(3), [Some(8), None, None]),
        ];
        alone[0].put(5, &mut feed);
        assert_eq!(locate(&alone, &c, 1, &5), None);
        assert_eq!(locate(&alone, &c, 0, &5).map(|(n, _, _)| n), Some(0));
        let r = run(&t, &c, Policy::RoundRobin, 1.0, 1);
        assert_eq!(r.computed[1], 2200, "worker 1 cannot read node 0: it recomputes");
    }

    #[test]
    fn the_index_mirrors_every_cache_after_a_replay() {
        let t = super::super::tests::sample(300);
        let mut c = cfg(4);
        c.workers_per_host = 2;
        c.fabric_blocks = [Some(200), Some(400), None];
        for p in Policy::ALL {
            let mut sim = Sim::new(&t, &c, p, 0.05, 3);
            sim.drive();
            let idx = sim.router.index().clone();
            for w in &sim.workers {
                assert_eq!(idx.holder_len(w.holder), w.hbm.len(), "{p:?}");
                assert!(w.hbm.len() <= c.hbm_blocks);
                assert_eq!(w.pending_prefill, 0);
            }
            for f in &sim.fabric {
                assert_eq!(idx.holder_len(f.holder), f.len(), "{p:?}");
            }
            let r = sim.res;
            let bound = t.bound_prefill_tokens(512);
            assert!(
                r.prefill_tokens() >= bound,
                "{p:?}: {} < bound {bound}",
                r.prefill_tokens()
            );
            assert_eq!(
                r.prefill_tokens() + r.hit_tokens.iter().sum::<u64>(),
                r.input_tokens,
                "every prompt token is computed or a hit"
            );
            assert!(r.ttft_ms.iter().all(|&x| x > 0.0));
            assert!(r.utilization() > 0.0);
        }
    }

    #[test]
    fn prefill_model_peak() {
        let m = PrefillModel::default();
        assert!((m.ms(0) - 16.5).abs() < 1e-12);
        let n = m.best_batch_tokens();
        assert!((6000.0..6500.0).contains(&n), "{n}");
        let peak = m.peak_tokens_per_s();
        for k in [1000, 4000, 9000, 20000] {
            assert!(k as f64 / m.ms(k) * 1e3 <= peak * 1.0001);
        }
    }
}
