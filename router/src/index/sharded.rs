//! [`ShardedIndex`]: the router's prefix index. Blocks live in 16 shards of
//! `RwLock<`[`BlockTable`]`>` picked by hash bits. A lookup takes
//! the read lock of each shard its chain touches once (at most 16 lock
//! round trips for any depth) and never a global lock; a writer holds one
//! shard's write lock for one block at a time, so it never waits on a
//! lookup for long and never deadlocks with one. Before it takes any, it
//! prefetches the home tags and slots of all of an event's blocks (through
//! each shard's [`SlotHint`]), so an event of many blocks pays about one
//! cache miss, not one per block.
//!
//! There is no per-holder block list: event application (the hot write
//! path) touches exactly one map entry per block, and the rare whole-holder
//! operations (`clear`, a holder leaving or resynchronising, `holder_len`)
//! scan the shards instead.

use parking_lot::{RwLock, RwLockReadGuard};
use smallvec::SmallVec;

use super::table::{BlockTable, SlotHint, mix};
use super::{BlockId, ChainMatch, HolderId, PrefixIndex, Tier, TierMask};

const SHARDS: usize = 16;

#[inline]
fn shard_of(hash: u64) -> usize {
    // Top bits of the mix: the table itself uses the low ones.
    (hash >> 60) as usize % SHARDS
}

type BlockMap = BlockTable;

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
    /// Each shard's slot array, for prefetching before locking.
    hints: Box<[SlotHint]>,
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
            hints: (0..SHARDS).map(|_| SlotHint::default()).collect(),
        }
    }

    /// Applies `f` to `holder`'s tiers of block `b` (absent = empty); an
    /// empty result removes the holder, and the block once nobody holds it.
    #[inline]
    fn update(&self, b: BlockId, hash: u64, holder: HolderId, f: impl FnOnce(TierMask) -> TierMask) {
        let s = shard_of(hash);
        let mut g = write_spinning(&self.shards[s]);
        g.update_hashed(b, hash, holder, f);
        self.hints[s].refresh(&g);
    }

    /// Applies `f` to `holder`'s tiers of every block of an event. The home
    /// slots of all its blocks are prefetched first (no lock needed, see
    /// [`SlotHint`]), so their cache misses overlap instead of each update
    /// waiting for its own under a lock.
    fn update_all(&self, blocks: &[BlockId], holder: HolderId, f: impl Fn(TierMask) -> TierMask) {
        let hashes: SmallVec<[u64; 32]> = blocks.iter().map(|&b| mix(b)).collect();
        // Even for one block: its tag and slot lines then load together,
        // and while the lock is taken.
        for &h in &hashes {
            self.hints[shard_of(h)].prefetch(h, true);
        }
        for (&b, &h) in blocks.iter().zip(&hashes) {
            self.update(b, h, holder, &f);
        }
    }
}

impl PrefixIndex for ShardedIndex {
    fn store(&self, holder: HolderId, tier: Tier, blocks: &[BlockId]) {
        self.update_all(blocks, holder, |m| m.with(tier));
    }

    fn remove(&self, holder: HolderId, tier: Option<Tier>, blocks: &[BlockId]) {
        let drop = TierMask::tier_or_all(tier);
        self.update_all(blocks, holder, |m| m.without(drop));
    }

    fn clear(&self, holder: HolderId, tier: Option<Tier>) {
        let drop = TierMask::tier_or_all(tier);
        for shard in self.shards.iter() {
            shard.write().retain(|hs| {
                if let Ok(i) = hs.binary_search_by_key(&holder, |e| e.0) {
                    let new = hs[i].1.without(drop);
                    if new.is_empty() {
                        hs.remove(i);
                    } else {
                        hs[i].1 = new;
                    }
                }
            });
        }
    }

    fn lookup(&self, chain: &[BlockId], out: &mut ChainMatch) {
        /// How far ahead of the probe the pipeline prefetches.
        const AHEAD: usize = 16;
        out.clear();
        // Read-lock each shard the chain touches once, up front (at most
        // `SHARDS` lock round trips whatever the depth). `read_recursive`
        // does not queue behind a waiting writer, only an active one (which
        // holds the lock for one block): under a steady event stream a
        // fair read lock would park the lookup behind every queued writer.
        let mut guards: [Option<RwLockReadGuard<'_, BlockMap>>; SHARDS] = Default::default();
        let hashes: SmallVec<[u64; 128]> = chain.iter().map(|&b| mix(b)).collect();
        // The first AHEAD positions' tags start loading while the locks
        // are taken (through the lock-free hints; the pipeline below
        // prefetches the rest through the locked tables).
        for &h in hashes.iter().take(AHEAD) {
            self.hints[shard_of(h)].prefetch(h, false);
        }
        for &h in &hashes {
            let s = shard_of(h);
            if guards[s].is_none() {
                guards[s] = Some(self.shards[s].read_recursive());
            }
        }
        let tables: [Option<&BlockMap>; SHARDS] = std::array::from_fn(|s| guards[s].as_deref());
        // Every shard the chain touches is locked above.
        let table = |h: u64| tables[shard_of(h)].expect("the shard's read lock is held");
        // A software pipeline over the positions, reading tags (16 bytes
        // per block: hash and holder fingerprint) until a run of identical
        // holders ends. Position i + AHEAD's home tag is prefetched while
        // position i is probed, so about AHEAD misses are in flight at
        // once. A position that starts a run (its fingerprint differs from
        // the one before) needs its slot, for the holders: the slot is
        // prefetched when probed, its spilled holder list MID positions
        // later, and the position is appended LAG positions after it was
        // probed, so those loads overlap with later probes. Inside a run
        // nothing but the tag is read (see `table`).
        const MID: usize = 3;
        const LAG: usize = 6;
        let n = chain.len();
        // Per position in flight: its table, slot and whether it starts a run.
        let mut probed: [Option<(&BlockMap, usize, bool)>; LAG] = [None; LAG];
        let mut run_fp: Option<u64> = None;
        // Positions below `end` are held (or not yet probed).
        let mut end = n;
        for i in 0..n + LAG {
            // Append position i - LAG first: its ring entry is position i's.
            if i >= LAG {
                let j = i - LAG;
                if j >= end {
                    return;
                }
                let Some((t, slot, starts)) = probed[j % LAG] else {
                    return;
                };
                if starts {
                    let (key, hs) = t.slot(slot);
                    if key != chain[j] {
                        // Another block with the same 64-bit hash: this
                        // one is not held.
                        return;
                    }
                    out.push(hs);
                } else {
                    out.extend_last();
                }
            }
            if i >= MID
                && let Some((t, slot, true)) = probed[(i - MID) % LAG]
                && i - MID < end
            {
                BlockTable::prefetch_holders(t.slot(slot).1);
            }
            if i < end {
                if let Some(&h) = hashes.get(i + AHEAD) {
                    table(h).prefetch(h);
                }
                let h = hashes[i];
                let t = table(h);
                probed[i % LAG] = match t.probe(h) {
                    None => {
                        end = i;
                        None
                    }
                    Some((slot, fp)) => {
                        let starts = run_fp != Some(fp);
                        if starts {
                            t.prefetch_slot(slot);
                            run_fp = Some(fp);
                        }
                        Some((t, slot, starts))
                    }
                };
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
            seen.insert(shard_of(mix(i)));
        }
        assert_eq!(seen.len(), SHARDS, "every shard used");
    }
}
