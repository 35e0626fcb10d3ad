//! The worker's own prefix cache, its "GPU tier": full KV blocks kept in
//! the engine's pool after their sequences, keyed by the canonical block
//! hash (the keys of [`crate::fabric_kv::FabricKv::keys`]), evicted least
//! recently used when the pool needs room.
//!
//! The cache holds one pool reference per block. A block is evictable only
//! while that is its only reference (no running sequence and no pending
//! request uses it). Every lookup and insert touches a chain's blocks from
//! the last to the first, so a parent is never older than its children and
//! eviction drops a chain from its tail: a published `BlockStored` always
//! names a parent that is still cached (the router needs it to place the
//! children).
//!
//! Changes are reported as [`KvEvent`]s for the KV event publisher.

use std::collections::{BTreeMap, HashMap};

use kvfabric::hash::BlockHash;

use super::events::{KvEvent, event_block_hash};
use crate::engine::{BlockId, Engine};

#[derive(Debug, Clone, Copy)]
struct Entry {
    block: BlockId,
    tick: u64,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct OwnCache {
    entries: HashMap<BlockHash, Entry>,
    /// tick -> key, oldest first.
    lru: BTreeMap<u64, BlockHash>,
    tick: u64,
    evicted: u64,
}

impl OwnCache {
    /// Blocks cached.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Blocks evicted so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Whether `key` is cached.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &BlockHash) -> bool {
        self.entries.contains_key(key)
    }

    fn touch(&mut self, key: &BlockHash) {
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&e.tick);
            self.tick += 1;
            e.tick = self.tick;
            self.lru.insert(self.tick, *key);
        }
    }

    /// The cached blocks of the leading `keys`, up to the first one not
    /// cached (touched).
    pub(crate) fn lookup(&mut self, keys: &[BlockHash]) -> Vec<BlockId> {
        let blocks: Vec<BlockId> = keys
            .iter()
            .map_while(|k| self.entries.get(k).map(|e| e.block))
            .collect();
        for k in keys[..blocks.len()].iter().rev() {
            self.touch(k);
        }
        blocks
    }

    /// Caches the full blocks of a chain: `keys[i]` is the key of
    /// `blocks[i]`, the chain's block `i`, whose tokens are
    /// `tokens[i * block_size..]`. Blocks whose key is cached already are
    /// skipped (the cached copy stays); each run of new blocks becomes one
    /// `BlockStored` whose parent is the block before the run.
    pub(crate) fn insert(
        &mut self,
        engine: &mut Engine,
        keys: &[BlockHash],
        blocks: &[BlockId],
        tokens: &[u32],
        block_size: usize,
        events: &mut Vec<KvEvent>,
    ) {
        let n = keys.len().min(blocks.len()).min(tokens.len() / block_size);
        let mut run: Option<(usize, Vec<u64>)> = None;
        let flush = |run: &mut Option<(usize, Vec<u64>)>, end: usize, events: &mut Vec<KvEvent>| {
            if let Some((start, hashes)) = run.take() {
                events.push(KvEvent::Stored {
                    hashes,
                    parent: start.checked_sub(1).map(|p| event_block_hash(&keys[p])),
                    tokens: tokens[start * block_size..end * block_size].to_vec(),
                    block_size,
                });
            }
        };
        for i in 0..n {
            if self.entries.contains_key(&keys[i]) {
                flush(&mut run, i, events);
                continue;
            }
            if engine.retain_block(blocks[i]).is_err() {
                // Not a full block of the pool: the chain cannot go on.
                flush(&mut run, i, events);
                break;
            }
            self.entries.insert(
                keys[i],
                Entry {
                    block: blocks[i],
                    tick: 0,
                },
            );
            run.get_or_insert_with(|| (i, Vec::new()))
                .1
                .push(event_block_hash(&keys[i]));
            // Cached entries need an lru slot before `touch` moves it.
            self.tick += 1;
            self.lru.insert(self.tick, keys[i]);
            if let Some(e) = self.entries.get_mut(&keys[i]) {
                e.tick = self.tick;
            }
        }
        let end = run.as_ref().map(|(s, h)| s + h.len()).unwrap_or(0);
        flush(&mut run, end, events);
        for k in keys[..n].iter().rev() {
            self.touch(k);
        }
    }

    /// Cached blocks no one else references (evictable now).
    pub(crate) fn evictable(&self, engine: &Engine) -> usize {
        self.entries
            .values()
            .filter(|e| engine.pool().ref_count(e.block) == Some(1))
            .count()
    }

    /// Evicts the least recently used evictable block; false when none is.
    pub(crate) fn evict_one(&mut self, engine: &mut Engine, events: &mut Vec<KvEvent>) -> bool {
        let victim = self
            .lru
            .iter()
            .find(|(_, k)| {
                self.entries
                    .get(*k)
                    .is_some_and(|e| engine.pool().ref_count(e.block) == Some(1))
            })
            .map(|(t, k)| (*t, *k));
        let Some((tick, key)) = victim else {
            return false;
        };
        self.lru.remove(&tick);
        if let Some(e) = self.entries.remove(&key) {
            let _ = engine.release_block(e.block);
        }
        self.evicted += 1;
        match events.last_mut() {
            Some(KvEvent::Removed { hashes }) => hashes.push(event_block_hash(&key)),
            _ => events.push(KvEvent::Removed {
                hashes: vec![event_block_hash(&key)],
            }),
        }
        true
    }

    /// Evicts until the pool has `free` free blocks; false if it cannot.
    pub(crate) fn make_room(&mut self, engine: &mut Engine, free: usize, events: &mut Vec<KvEvent>) -> bool {
        while engine.pool().num_free() < free {
            if !self.evict_one(engine, events) {
                return false;
            }
        }
        true
    }

    /// Drops every cached reference (shutdown).
    pub(crate) fn clear(&mut self, engine: &mut Engine, events: &mut Vec<KvEvent>) {
        for (_, e) in self.entries.drain() {
            let _ = engine.release_block(e.block);
        }
        self.lru.clear();
        events.push(KvEvent::Cleared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Model, ModelConfig};
    use kvfabric::hash::chain_hashes;

    fn engine(blocks: usize) -> Engine {
        let cfg = ModelConfig {
            tokens_per_block: 4,
            ..ModelConfig::tiny()
        };
        Engine::new(Model::from_seed(&cfg).unwrap(), blocks).unwrap()
    }

    /// Prefills `tokens` and returns (keys, full blocks) with the sequence removed.
    fn computed(e: &mut Engine, c: &mut OwnCache, tokens: &[u32], ev: &mut Vec<KvEvent>) -> Vec<BlockHash> {
        let s = e.add_sequence(tokens, &[]).unwrap();
        e.prefill(&[s]).unwrap();
        let blocks: Vec<BlockId> = e.full_blocks(s).unwrap().iter().map(|b| b.block).collect();
        let keys = chain_hashes(7, tokens, 4, &[]);
        c.insert(e, &keys, &blocks, tokens, 4, ev);
        e.remove_sequence(s).unwrap();
        keys
    }

    #[test]
    fn insert_lookup_and_events() {
        let mut e = engine(16);
        let mut c = OwnCache::default();
        let mut ev = Vec::new();
        let a: Vec<u32> = (0..10).collect();
        let ka = computed(&mut e, &mut c, &a, &mut ev);
        assert_eq!(c.len(), 2);
        assert_eq!(ev.len(), 1);
        match &ev[0] {
            KvEvent::Stored {
                hashes,
                parent,
                tokens,
                block_size,
            } => {
                assert_eq!(hashes, &vec![event_block_hash(&ka[0]), event_block_hash(&ka[1])]);
                assert_eq!(*parent, None);
                assert_eq!(tokens, &a[..8].to_vec());
                assert_eq!(*block_size, 4);
            }
            other => panic!("{other:?}"),
        }
        // A longer chain sharing the first block: one new run, parent = block 1.
        let mut b = a.clone();
        b.extend(10..14);
        ev.clear();
        let kb = computed(&mut e, &mut c, &b, &mut ev);
        assert_eq!(c.len(), 3);
        match &ev[..] {
            [KvEvent::Stored { hashes, parent, .. }] => {
                assert_eq!(hashes, &vec![event_block_hash(&kb[2])]);
                assert_eq!(*parent, Some(event_block_hash(&kb[1])));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.lookup(&kb).len(), 3);
        assert_eq!(c.lookup(&chain_hashes(7, &[9, 9, 9, 9], 4, &[])).len(), 0);
        assert_eq!(c.evictable(&e), 3);
        assert_eq!(e.pool().num_used(), 3, "only the cache holds blocks");
    }

    #[test]
    fn eviction_is_lru_tail_first_and_skips_blocks_in_use() {
        let mut e = engine(8);
        let mut c = OwnCache::default();
        let mut ev = Vec::new();
        let a: Vec<u32> = (0..12).collect();
        let ka = computed(&mut e, &mut c, &a, &mut ev);
        let b: Vec<u32> = (100..108).collect();
        let kb = computed(&mut e, &mut c, &b, &mut ev);
        assert_eq!(c.len(), 5);
        // Touch a: b is now the oldest chain.
        assert_eq!(c.lookup(&ka).len(), 3);
        ev.clear();
        assert!(c.evict_one(&mut e, &mut ev));
        assert!(!c.contains(&kb[1]), "the tail of the oldest chain goes first");
        assert!(c.contains(&kb[0]));
        // A block in use by a sequence is not evictable.
        let pinned = c.lookup(&ka[..1]);
        let s = e.add_sequence(&a, &pinned).unwrap();
        assert!(c.make_room(&mut e, 8 - 1, &mut ev), "everything but the used block");
        assert!(c.contains(&ka[0]));
        assert!(!c.contains(&kb[0]) && !c.contains(&ka[1]) && !c.contains(&ka[2]));
        assert!(!c.evict_one(&mut e, &mut ev));
        match &ev[..] {
            [KvEvent::Removed { hashes }] => assert_eq!(hashes.len(), 4),
            other => panic!("{other:?}"),
        }
        e.remove_sequence(s).unwrap();
        c.clear(&mut e, &mut ev);
        assert_eq!(e.pool().num_free(), 8);
        assert!(matches!(ev.last(), Some(KvEvent::Cleared)));
    }
}
