//! [`ShardedIndex`]: the router's prefix index. Blocks live in 256 shards of
//! `RwLock<HashMap<BlockId, holders>>` picked by hash bits, so a lookup takes
//! only the read locks of the shards its chain touches and never a global
//! lock; writers of different blocks rarely meet. Each holder also keeps the
//! set of its own blocks (for `clear` and holder departure) behind its own
//! mutex, which is taken before any shard lock, so one holder's events apply
//! atomically with respect to each other.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use super::{BlockId, ChainMatch, HolderId, MatchEntry, PrefixIndex, Tier, TierMask};

const SHARDS: usize = 256;

/// Holders of one block, sorted by holder id; most blocks have one or two.
type Holders = SmallVec<[(HolderId, TierMask); 3]>;

/// Hasher for keys that are (mostly) hashes already: one multiply mixes in
/// both halves, in case an engine's keys are not uniformly distributed.
#[derive(Clone, Copy, Default, Debug)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ *b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = mix(v);
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = mix(v as u128);
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct IdBuild;

impl BuildHasher for IdBuild {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[inline]
fn mix(v: u128) -> u64 {
    let x = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
    let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 32)
}

type BlockMap = HashMap<BlockId, Holders, IdBuild>;
type HolderBlocks = HashMap<BlockId, TierMask, IdBuild>;

/// The concurrent prefix index (see the module doc).
pub struct ShardedIndex {
    shards: Box<[RwLock<BlockMap>]>,
    holders: RwLock<HashMap<HolderId, Arc<Mutex<HolderBlocks>>>>,
}

impl std::fmt::Debug for ShardedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedIndex")
            .field("blocks", &self.len())
            .field("holders", &self.holders.read().len())
            .finish()
    }
}

impl Default for ShardedIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardedIndex {
    /// An empty index.
    pub fn new() -> Self {
        ShardedIndex {
            shards: (0..SHARDS).map(|_| RwLock::new(BlockMap::default())).collect(),
            holders: RwLock::new(HashMap::new()),
        }
    }

    #[inline]
    fn shard(&self, b: BlockId) -> &RwLock<BlockMap> {
        // Top bits of the mix: the map itself uses the low ones.
        &self.shards[(mix(b) >> 56) as usize % SHARDS]
    }

    fn holder_blocks(&self, holder: HolderId) -> Arc<Mutex<HolderBlocks>> {
        if let Some(h) = self.holders.read().get(&holder) {
            return h.clone();
        }
        self.holders.write().entry(holder).or_default().clone()
    }

    /// Sets `holder`'s tiers for block `b` in its shard (empty = gone).
    fn set(&self, b: BlockId, holder: HolderId, tiers: TierMask) {
        let mut shard = self.shard(b).write();
        if tiers.is_empty() {
            if let Some(hs) = shard.get_mut(&b) {
                if let Ok(i) = hs.binary_search_by_key(&holder, |e| e.0) {
                    hs.remove(i);
                }
                if hs.is_empty() {
                    shard.remove(&b);
                }
            }
            return;
        }
        let hs = shard.entry(b).or_default();
        match hs.binary_search_by_key(&holder, |e| e.0) {
            Ok(i) => hs[i].1 = tiers,
            Err(i) => hs.insert(i, (holder, tiers)),
        }
    }
}

impl PrefixIndex for ShardedIndex {
    fn store(&self, holder: HolderId, tier: Tier, blocks: &[BlockId]) {
        let hb = self.holder_blocks(holder);
        let mut hb = hb.lock();
        for &b in blocks {
            let m = hb.entry(b).or_default();
            if m.contains(tier) {
                continue;
            }
            *m = m.with(tier);
            let m = *m;
            self.set(b, holder, m);
        }
    }

    fn remove(&self, holder: HolderId, tier: Option<Tier>, blocks: &[BlockId]) {
        let Some(hb) = self.holders.read().get(&holder).cloned() else {
            return;
        };
        let mut hb = hb.lock();
        let drop = TierMask::tier_or_all(tier);
        for &b in blocks {
            let Some(m) = hb.get_mut(&b) else { continue };
            let new = m.without(drop);
            if new == *m {
                continue;
            }
            *m = new;
            if new.is_empty() {
                hb.remove(&b);
            }
            self.set(b, holder, new);
        }
    }

    fn clear(&self, holder: HolderId, tier: Option<Tier>) {
        let Some(hb) = self.holders.read().get(&holder).cloned() else {
            return;
        };
        let mut hb = hb.lock();
        let drop = TierMask::tier_or_all(tier);
        hb.retain(|&b, m| {
            let new = m.without(drop);
            if new != *m {
                *m = new;
                self.set(b, holder, new);
            }
            !new.is_empty()
        });
    }

    fn lookup(&self, chain: &[BlockId], out: &mut ChainMatch) {
        out.clear();
        for (pos, &b) in chain.iter().enumerate() {
            let shard = self.shard(b).read();
            let Some(hs) = shard.get(&b) else { break };
            if hs.is_empty() {
                break;
            }
            out.entries.extend(hs.iter().map(|&(holder, tiers)| MatchEntry {
                pos: pos as u32,
                holder,
                tiers,
            }));
            out.depth = pos + 1;
        }
    }

    fn holder_len(&self, holder: HolderId) -> usize {
        self.holders.read().get(&holder).map_or(0, |h| h.lock().len())
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::conformance;

    #[test]
    fn sharded_index_conformance() {
        conformance::run_all(&ShardedIndex::new);
    }

    #[test]
    fn mix_spreads_sequential_ids_over_shards() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u128 {
            seen.insert((mix(i) >> 56) as usize % SHARDS);
        }
        assert!(seen.len() > SHARDS * 9 / 10, "only {} shards used", seen.len());
    }
}
