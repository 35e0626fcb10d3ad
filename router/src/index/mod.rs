//! The prefix index: which holder (an engine worker's own block pool, or a
//! fabric node) holds which block of a hash chain, in which tier.
//!
//! A block is named by its *chained* hash ([`BlockId`], the fabric's
//! canonical block hash): the hash of block `i` already covers blocks
//! `0..i`, so the radix tree over token prefixes is implicit in the keys.
//! Each tree node is one map entry, and walking a request's chain from the
//! root is a sequence of independent lookups (which the CPU overlaps, unlike
//! pointer chasing down an explicit tree). [`PrefixIndex::lookup`] stops at
//! the first block nobody holds.
//!
//! [`PrefixIndex`] is the seam; [`ShardedIndex`] is the implementation the
//! router uses, and `NaiveIndex` (feature `test-util`) the reference model
//! that the conformance suite and the proptests compare it against.

mod sharded;
mod table;
pub use sharded::ShardedIndex;

#[cfg(any(test, feature = "test-util"))]
mod naive;
#[cfg(any(test, feature = "test-util"))]
pub use naive::NaiveIndex;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

use std::fmt;

/// A block's identity: its 16-byte chained block hash, as a little-endian
/// integer ([`block_id`] converts).
pub type BlockId = u128;

/// Converts a fabric key or [`kvfabric::hash::BlockHash`] into a [`BlockId`];
/// `None` unless it is exactly 16 bytes.
pub fn block_id(key: &[u8]) -> Option<BlockId> {
    let b: [u8; 16] = key.try_into().ok()?;
    Some(u128::from_le_bytes(b))
}

/// Something that holds blocks: a worker's own KV pool or a fabric node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct HolderId(pub u32);

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "holder#{}", self.0)
    }
}

/// Storage tiers, fastest first.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[repr(u8)]
pub enum Tier {
    /// GPU memory.
    Hbm = 0,
    /// Host DRAM.
    Host = 1,
    /// Local NVMe.
    Disk = 2,
    /// Object storage.
    Object = 3,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 4] = [Tier::Hbm, Tier::Host, Tier::Disk, Tier::Object];

    /// Lower-case name (`hbm`, `host`, `disk`, `object`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Hbm => "hbm",
            Tier::Host => "host",
            Tier::Disk => "disk",
            Tier::Object => "object",
        }
    }

    /// The tier of a fabric event (`None` for an unspecified tier).
    pub fn from_proto(t: kvfabric_proto::v1::Tier) -> Option<Tier> {
        use kvfabric_proto::v1::Tier as P;
        match t {
            P::Hbm => Some(Tier::Hbm),
            P::Host => Some(Tier::Host),
            P::Disk => Some(Tier::Disk),
            P::Object => Some(Tier::Object),
            P::Unspecified => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of tiers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct TierMask(pub u8);

impl TierMask {
    /// No tier.
    pub const EMPTY: TierMask = TierMask(0);
    /// Every tier.
    pub const ALL: TierMask = TierMask(0b1111);

    /// Just `t`.
    pub fn of(t: Tier) -> TierMask {
        TierMask(1 << t as u8)
    }
    /// Whether `t` is in the set.
    pub fn contains(self, t: Tier) -> bool {
        self.0 & (1 << t as u8) != 0
    }
    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The fastest tier in the set.
    pub fn fastest(self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| self.contains(*t))
    }
    /// Union.
    pub fn with(self, t: Tier) -> TierMask {
        TierMask(self.0 | 1 << t as u8)
    }
    /// Difference.
    pub fn without(self, other: TierMask) -> TierMask {
        TierMask(self.0 & !other.0)
    }
    /// The set for "this tier, or every tier" (`None`).
    pub fn tier_or_all(t: Option<Tier>) -> TierMask {
        t.map_or(TierMask::ALL, TierMask::of)
    }
}

impl fmt::Debug for TierMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Tier::ALL
            .iter()
            .filter(|t| self.contains(**t))
            .map(|t| t.name())
            .collect();
        write!(f, "{{{}}}", names.join(","))
    }
}

/// One holder's copies of the block at position `pos` of a looked-up chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub struct MatchEntry {
    /// Position in the chain (0 = first block).
    pub pos: u32,
    /// Who holds it.
    pub holder: HolderId,
    /// In which tiers.
    pub tiers: TierMask,
}

/// One holder's tiers of a block.
pub type Holding = (HolderId, TierMask);

/// Positions `start..end` of a looked-up chain, every one held by the same
/// holders in the same tiers (`ChainMatch::holders[holders_at..][..holders_len]`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MatchRun {
    /// First position.
    pub start: u32,
    /// One past the last position.
    pub end: u32,
    /// Where the run's holders start in [`ChainMatch::holders`].
    pub holders_at: u32,
    /// How many holders the run has (at least one).
    pub holders_len: u32,
}

impl MatchRun {
    /// Positions in the run.
    pub fn len(&self) -> u32 {
        self.end - self.start
    }
    /// Whether the run covers no position (never, in a built match).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What [`PrefixIndex::lookup`] found for a chain: positions `0..depth`,
/// run-length encoded. Consecutive positions with identical holders (a
/// shared prefix that many workers hold whole) form one [`MatchRun`], so a
/// lookup's output and the scoring over it grow with the number of distinct
/// holder sets along the chain, not with depth times holders. Built only by
/// [`ChainMatch::push`] (and `extend_last`, where the holders are known to
/// be the last run's), so two indexes that agree produce equal matches.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct ChainMatch {
    /// Leading blocks of the chain that somebody holds.
    pub depth: usize,
    /// The runs covering `0..depth`, in order.
    pub runs: Vec<MatchRun>,
    /// Holders of every run, each run's sorted by holder id.
    pub holders: Vec<Holding>,
}

impl ChainMatch {
    /// Empties it for reuse (keeps the allocations).
    pub fn clear(&mut self) {
        self.depth = 0;
        self.runs.clear();
        self.holders.clear();
    }

    /// Appends position `depth`, held by `hs` (non-empty, sorted by holder
    /// id); extends the last run when its holders are the same.
    #[inline]
    pub fn push(&mut self, hs: &[Holding]) {
        debug_assert!(!hs.is_empty());
        if let Some(last) = self.runs.last_mut() {
            let at = last.holders_at as usize;
            if self.holders[at..at + last.holders_len as usize] == *hs {
                last.end += 1;
                self.depth += 1;
                return;
            }
        }
        self.runs.push(MatchRun {
            start: self.depth as u32,
            end: self.depth as u32 + 1,
            holders_at: self.holders.len() as u32,
            holders_len: hs.len() as u32,
        });
        self.holders.extend_from_slice(hs);
        self.depth += 1;
    }

    /// Appends position `depth` with the same holders as the last run (the
    /// caller knows they are the same; `push` would have merged them too).
    #[inline]
    pub(crate) fn extend_last(&mut self) {
        let last = self.runs.last_mut().expect("a run to extend");
        last.end += 1;
        self.depth += 1;
    }

    /// The holders of `run`.
    pub fn run_holders(&self, run: &MatchRun) -> &[Holding] {
        &self.holders[run.holders_at as usize..][..run.holders_len as usize]
    }

    /// Every (position, holder) pair, sorted by position then holder.
    pub fn entries(&self) -> Vec<MatchEntry> {
        let mut out = Vec::new();
        for r in &self.runs {
            for pos in r.start..r.end {
                out.extend(
                    self.run_holders(r)
                        .iter()
                        .map(|&(holder, tiers)| MatchEntry { pos, holder, tiers }),
                );
            }
        }
        out
    }

    /// The match with these entries (any order; positions must run from 0
    /// without a gap, or the match ends at the first gap).
    pub fn from_entries(mut entries: Vec<MatchEntry>) -> ChainMatch {
        entries.sort();
        let mut m = ChainMatch::default();
        let mut hs: Vec<Holding> = Vec::new();
        let mut i = 0;
        while i < entries.len() && entries[i].pos as usize == m.depth {
            hs.clear();
            while i < entries.len() && entries[i].pos as usize == m.depth {
                hs.push((entries[i].holder, entries[i].tiers));
                i += 1;
            }
            m.push(&hs);
        }
        m
    }
}

/// The index seam. Writers (event application) and readers (routing
/// decisions) run concurrently; implementations must not take a global lock
/// on the read path.
///
/// Semantics every implementation shares (the conformance suite checks
/// them): a holder holds a block in a set of tiers; `store` adds a tier,
/// `remove` takes tiers away (the block is gone from the holder once no tier
/// is left), `clear` removes tiers from every block of the holder. Storing a
/// block already held, or removing one not held, is not an error.
pub trait PrefixIndex: Send + Sync + fmt::Debug {
    /// `holder` now holds `blocks` in `tier`.
    fn store(&self, holder: HolderId, tier: Tier, blocks: &[BlockId]);
    /// `holder` dropped `blocks` from `tier` (`None`: from every tier).
    fn remove(&self, holder: HolderId, tier: Option<Tier>, blocks: &[BlockId]);
    /// `holder` dropped everything in `tier` (`None`: everything; also what
    /// a holder leaving or resynchronising does).
    fn clear(&self, holder: HolderId, tier: Option<Tier>);
    /// Fills `out` with who holds the leading blocks of `chain`.
    fn lookup(&self, chain: &[BlockId], out: &mut ChainMatch);
    /// Blocks `holder` holds (in any tier). May scan the whole index: for
    /// metrics and tests, not the request path.
    fn holder_len(&self, holder: HolderId) -> usize;
    /// Distinct blocks held by anyone.
    fn len(&self) -> usize;
    /// Whether nobody holds anything.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
