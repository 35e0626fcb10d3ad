//! The synthetic event stream of `kvfabric-bench index`, in plain integers
//! so that one source serves two harnesses: `kvfabric-bench` (module
//! `index`, kvfabric's `ShardedIndex`) and the stand-alone Dynamo harness
//! in `benches/dynamo-rust` (Dynamo's Rust `ConcurrentRadixTreeCompressed`),
//! which includes this file with `#[path]`. Same seed, same events, same
//! lookups, in the same order.
//!
//! Shape: requests are chains of `depth` blocks, a shared prefix of
//! `depth / 2` blocks drawn from [`PREFIXES`] prefixes plus a unique suffix,
//! landing on a random worker, which stores the chain in events of
//! `event_blocks` blocks; once a worker holds more than its share of
//! `blocks` (worker, block) pairs, every new chain evicts its oldest chain's
//! suffix (remove events of the same size): heavy eviction at steady state.
//! Block ids are random 128-bit values, as canonical block hashes are.

use std::collections::{HashSet, VecDeque};

/// Shared prefixes the chains draw from.
pub(crate) const PREFIXES: usize = 1024;

/// splitmix64: fast, seeded, good enough for synthetic hashes.
#[derive(Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A random block id.
    pub(crate) fn id(&mut self) -> u128 {
        (self.next_u64() as u128) << 64 | self.next_u64() as u128
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One index update, as an event source would deliver it.
#[derive(Debug, Clone)]
pub(crate) enum Ev {
    /// `worker` stored `blocks`, which continue the chain after `parent`
    /// (`None`: they start it).
    Store {
        /// The worker.
        worker: u32,
        /// The block before `blocks[0]` in its chain.
        #[allow(
            dead_code,
            reason = "read by the Dynamo harness: its tree links a store to its parent; kvfabric's index keys each block by its own id"
        )]
        parent: Option<u128>,
        /// Consecutive blocks of one chain.
        blocks: Vec<u128>,
    },
    /// `worker` evicted `blocks`.
    Remove {
        /// The worker.
        worker: u32,
        /// Blocks it no longer holds.
        blocks: Vec<u128>,
    },
}

impl Ev {
    /// Blocks the event carries.
    pub(crate) fn blocks(&self) -> &[u128] {
        match self {
            Ev::Store { blocks, .. } | Ev::Remove { blocks, .. } => blocks,
        }
    }
}

/// The synthetic fleet: who holds which chains, oldest first.
#[derive(Debug)]
pub(crate) struct Fleet {
    rng: Rng,
    prefixes: Vec<Vec<u128>>,
    held: Vec<VecDeque<Vec<u128>>>,
    held_blocks: Vec<usize>,
    per_worker: usize,
    depth: usize,
    event_blocks: usize,
}

impl Fleet {
    /// A fleet of `workers` holding nothing yet.
    pub(crate) fn new(workers: usize, blocks: usize, depth: usize, event_blocks: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let prefixes = (0..PREFIXES)
            .map(|_| (0..depth / 2).map(|_| rng.id()).collect())
            .collect();
        Fleet {
            rng,
            prefixes,
            held: vec![VecDeque::new(); workers],
            held_blocks: vec![0; workers],
            per_worker: (blocks / workers).max(depth),
            depth,
            event_blocks,
        }
    }

    /// (worker, block) pairs held now.
    pub(crate) fn resident_pairs(&self) -> usize {
        self.held_blocks.iter().sum()
    }

    /// Appends the events of one request landing on a random worker.
    pub(crate) fn request(&mut self, out: &mut Vec<Ev>) {
        let w = self.rng.below(self.held.len());
        let p = self.rng.below(self.prefixes.len());
        let mut chain = self.prefixes[p].clone();
        chain.extend((0..self.depth - self.depth / 2).map(|_| self.rng.id()));
        let mut parent = None;
        for part in chain.chunks(self.event_blocks) {
            out.push(Ev::Store {
                worker: w as u32,
                parent,
                blocks: part.to_vec(),
            });
            parent = part.last().copied();
        }
        self.held_blocks[w] += chain.len();
        self.held[w].push_back(chain);
        while self.held_blocks[w] > self.per_worker {
            let Some(old) = self.held[w].pop_front() else { break };
            // The shared prefix may back other chains of the worker: evict
            // the unique suffix only (prefix blocks are re-stored by later
            // requests anyway).
            for part in old[self.depth / 2..].chunks(self.event_blocks) {
                out.push(Ev::Remove {
                    worker: w as u32,
                    blocks: part.to_vec(),
                });
            }
            self.held_blocks[w] -= old.len();
        }
    }

    /// A resident chain of a random worker.
    pub(crate) fn resident(&mut self) -> Vec<u128> {
        loop {
            let w = self.rng.below(self.held.len());
            let q = &self.held[w];
            if !q.is_empty() {
                let i = self.rng.below(q.len());
                return q[i].clone();
            }
        }
    }
}

/// One run's whole workload, generated before anything is timed.
#[derive(Debug)]
pub(crate) struct Workload {
    /// Events that bring the index to steady state (about `blocks` pairs).
    pub(crate) fill: Vec<Ev>,
    /// (worker, block) pairs held after `fill`.
    pub(crate) resident_pairs: usize,
    /// The timed events (at least `events`).
    pub(crate) timed: Vec<Ev>,
    /// Resident chains to look up (cycled through).
    pub(crate) chains: Vec<Vec<u128>>,
    /// Events applied while lookups run; removals that would evict a chain
    /// in `chains` are left out, so every lookup matches the full depth.
    pub(crate) churn: Vec<Ev>,
}

impl Workload {
    /// The workload for `workers` workers (see the module doc).
    pub(crate) fn new(
        workers: usize,
        blocks: usize,
        depth: usize,
        event_blocks: usize,
        events: usize,
        lookups: usize,
        seed: u64,
    ) -> Workload {
        let mut fleet = Fleet::new(workers, blocks, depth, event_blocks, seed);
        let mut fill = Vec::new();
        // Each worker stays within a chain of its share, so stop one chain
        // per worker short of the target, then settle every worker.
        while fleet.resident_pairs() + depth * workers < blocks {
            fleet.request(&mut fill);
        }
        for _ in 0..workers * 2 {
            fleet.request(&mut fill);
        }
        let resident_pairs = fleet.resident_pairs();
        let mut timed = Vec::with_capacity(events + 16);
        while timed.len() < events {
            fleet.request(&mut timed);
        }
        let chains: Vec<Vec<u128>> = (0..4096.min(lookups.max(1))).map(|_| fleet.resident()).collect();
        let mut churn = Vec::new();
        while churn.len() < events.min(1_000_000) {
            fleet.request(&mut churn);
        }
        let looked_up: HashSet<u128> = chains.iter().flatten().copied().collect();
        churn.retain(|e| match e {
            Ev::Remove { blocks, .. } => !blocks.iter().any(|b| looked_up.contains(b)),
            Ev::Store { .. } => true,
        });
        Workload {
            fill,
            resident_pairs,
            timed,
            chains,
            churn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_deterministic_linked_and_keeps_looked_up_chains() {
        let a = Workload::new(4, 4000, 8, 3, 500, 50, 7);
        let b = Workload::new(4, 4000, 8, 3, 500, 50, 7);
        assert_eq!(a.chains, b.chains);
        assert_eq!(a.timed.len(), b.timed.len());
        assert!(a.timed.len() >= 500 && a.resident_pairs > 0);
        // A store continues its chain: its parent is the last block of the
        // store before it for the same chain (8 blocks in events of 3).
        let mut last: Option<u128> = None;
        for e in &a.timed {
            if let Ev::Store { parent, blocks, .. } = e {
                match parent {
                    None => assert_eq!(blocks.len(), 3),
                    Some(p) => assert_eq!(Some(*p), last),
                }
                last = blocks.last().copied();
            }
        }
        let looked_up: HashSet<u128> = a.chains.iter().flatten().copied().collect();
        assert!(a.churn.iter().all(|e| match e {
            Ev::Remove { blocks, .. } => blocks.iter().all(|b| !looked_up.contains(b)),
            Ev::Store { .. } => true,
        }));
    }
}
