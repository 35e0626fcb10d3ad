//! [`ShardedIndex`]: the router's prefix index. Blocks live in 16 shards of
//! `RwLock<HashMap<BlockId, holders>>` picked by hash bits. A lookup takes
//! the read lock of each shard its chain touches once (at most 16 lock
//! round trips for any depth) and never a global lock; a writer holds one
//! shard's write lock for one block at a time, so it never waits on a
//! lookup for long and never deadlocks with one.
//!
//! There is no per-holder block list: event application (the hot write
//! path) touches exactly one map entry per block, and the rare whole-holder
//! operations (`clear`, a holder leaving or resynchronising, `holder_len`)
//! scan the shards instead.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use parking_lot::{RwLock, RwLockReadGuard};
use smallvec::SmallVec;

use super::{BlockId, ChainMatch, HolderId, MatchEntry, PrefixIndex, Tier, TierMask};

const SHARDS: usize = 16;

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

#[inline]
fn shard_of(b: BlockId) -> usize {
    // Top bits of the mix: the map itself uses the low ones.
    (mix(b) >> 60) as usize % SHARDS
}

type BlockMap = HashMap<BlockId, Holders, IdBuild>;

/// Takes a shard's write lock without ever parking: a writer that parked
/// behind a lookup would make that lookup pay a futex wake-up (tens of
/// microseconds) when it releases its read locks. Lookups hold them for a
/// few microseconds, so spinning, then yielding, costs the writer less.
#[inline]
fn write_spinning(lock: &RwLock<BlockMap>) -> parking_lot::RwLockWriteGuard<'_, BlockMap> {
    let mut spins = 0u32;
    loop {
        if let Some(g) = lock.try_write() {
            return g;
        }
        spins += 1;
        if spins < 128 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The concurrent prefix index (see the module doc).
pub struct ShardedIndex {
    shards: Box<[RwLock<BlockMap>]>,
}

impl std::fmt::Debug for ShardedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedIndex").field("blocks", &self.len()).finish()
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
        }
    }

    /// Applies `f` to `holder`'s tiers of block `b` (absent = empty); an
    /// empty result removes the holder, and the block once nobody holds it.
    #[inline]
    fn update(&self, b: BlockId, holder: HolderId, f: impl FnOnce(TierMask) -> TierMask) {
        let mut shard = write_spinning(&self.shards[shard_of(b)]);
        match shard.get_mut(&b) {
            Some(hs) => match hs.binary_search_by_key(&holder, |e| e.0) {
                Ok(i) => {
                    let new = f(hs[i].1);
                    if new.is_empty() {
                        hs.remove(i);
                        if hs.is_empty() {
                            shard.remove(&b);
                        }
                    } else {
                        hs[i].1 = new;
                    }
                }
                Err(i) => {
                    let new = f(TierMask::EMPTY);
                    if !new.is_empty() {
                        hs.insert(i, (holder, new));
                    }
                }
            },
            None => {
                let new = f(TierMask::EMPTY);
                if !new.is_empty() {
                    let mut hs = Holders::new();
                    hs.push((holder, new));
                    shard.insert(b, hs);
                }
            }
        }
    }
}

impl PrefixIndex for ShardedIndex {
    fn store(&self, holder: HolderId, tier: Tier, blocks: &[BlockId]) {
        for &b in blocks {
            self.update(b, holder, |m| m.with(tier));
        }
    }

    fn remove(&self, holder: HolderId, tier: Option<Tier>, blocks: &[BlockId]) {
        let drop = TierMask::tier_or_all(tier);
        for &b in blocks {
            self.update(b, holder, |m| m.without(drop));
        }
    }

    fn clear(&self, holder: HolderId, tier: Option<Tier>) {
        let drop = TierMask::tier_or_all(tier);
        for shard in self.shards.iter() {
            shard.write().retain(|_, hs| {
                if let Ok(i) = hs.binary_search_by_key(&holder, |e| e.0) {
                    let new = hs[i].1.without(drop);
                    if new.is_empty() {
                        hs.remove(i);
                    } else {
                        hs[i].1 = new;
                    }
                }
                !hs.is_empty()
            });
        }
    }

    fn lookup(&self, chain: &[BlockId], out: &mut ChainMatch) {
        out.clear();
        // Read-lock each shard the chain touches once, up front (at most
        // `SHARDS` lock round trips whatever the depth). `read_recursive`
        // does not queue behind a waiting writer, only an active one (which
        // holds the lock for one block): under a steady event stream a
        // fair read lock would park the lookup behind every queued writer.
        let mut guards: [Option<RwLockReadGuard<'_, BlockMap>>; SHARDS] = Default::default();
        for &b in chain {
            let s = shard_of(b);
            if guards[s].is_none() {
                guards[s] = Some(self.shards[s].read_recursive());
            }
        }
        // Probe a chunk of positions with no data dependency between them,
        // so the CPU overlaps their cache misses, then consume the chunk.
        const CHUNK: usize = 16;
        let mut found: [Option<&Holders>; CHUNK] = [None; CHUNK];
        for (c, part) in chain.chunks(CHUNK).enumerate() {
            for (slot, &b) in found.iter_mut().zip(part) {
                *slot = guards[shard_of(b)].as_ref().and_then(|g| g.get(&b));
            }
            for (i, hs) in found.iter().take(part.len()).enumerate() {
                let Some(hs) = hs else { return };
                let pos = c * CHUNK + i;
                out.entries.extend(hs.iter().map(|&(holder, tiers)| MatchEntry {
                    pos: pos as u32,
                    holder,
                    tiers,
                }));
                out.depth = pos + 1;
            }
        }
    }

    fn holder_len(&self, holder: HolderId) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .values()
                    .filter(|hs| hs.binary_search_by_key(&holder, |e| e.0).is_ok())
                    .count()
            })
            .sum()
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
            seen.insert(shard_of(i));
        }
        assert_eq!(seen.len(), SHARDS, "every shard used");
    }
}
