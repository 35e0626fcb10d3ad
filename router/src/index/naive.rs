//! [`NaiveIndex`]: the reference model of [`PrefixIndex`] — one mutex over
//! an ordered map, written for obviousness, not speed. The conformance suite
//! and the proptests hold [`super::ShardedIndex`] to its answers.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::{BlockId, ChainMatch, HolderId, PrefixIndex, Tier, TierMask};

/// The reference prefix index (see the module doc).
#[derive(Debug, Default)]
pub struct NaiveIndex {
    held: Mutex<BTreeMap<(BlockId, HolderId), TierMask>>,
}

impl NaiveIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PrefixIndex for NaiveIndex {
    fn store(&self, holder: HolderId, tier: Tier, blocks: &[BlockId]) {
        let mut held = self.held.lock();
        for &b in blocks {
            let m = held.entry((b, holder)).or_default();
            *m = m.with(tier);
        }
    }

    fn remove(&self, holder: HolderId, tier: Option<Tier>, blocks: &[BlockId]) {
        let mut held = self.held.lock();
        for &b in blocks {
            if let Some(m) = held.get_mut(&(b, holder)) {
                *m = m.without(TierMask::tier_or_all(tier));
                if m.is_empty() {
                    held.remove(&(b, holder));
                }
            }
        }
    }

    fn clear(&self, holder: HolderId, tier: Option<Tier>) {
        let mut held = self.held.lock();
        held.retain(|(_, h), m| {
            if *h == holder {
                *m = m.without(TierMask::tier_or_all(tier));
            }
            !m.is_empty()
        });
    }

    fn lookup(&self, chain: &[BlockId], out: &mut ChainMatch) {
        out.clear();
        let held = self.held.lock();
        for &b in chain {
            let here: Vec<(HolderId, TierMask)> = held
                .range((b, HolderId(0))..=(b, HolderId(u32::MAX)))
                .map(|(&(_, holder), &tiers)| (holder, tiers))
                .collect();
            if here.is_empty() {
                break;
            }
            out.push(&here);
        }
    }

    fn holder_len(&self, holder: HolderId) -> usize {
        self.held.lock().keys().filter(|(_, h)| *h == holder).count()
    }

    fn len(&self) -> usize {
        let held = self.held.lock();
        let mut n = 0;
        let mut last = None;
        for (b, _) in held.keys() {
            if last != Some(*b) {
                n += 1;
                last = Some(*b);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naive_index_conformance() {
        crate::index::conformance::run_all(&NaiveIndex::new);
    }
}
