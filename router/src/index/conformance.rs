//! The conformance suite every [`PrefixIndex`] runs (feature `test-util`):
//! each check builds a fresh index from the factory and panics with a
//! message naming what broke.

use std::sync::Arc;

use super::{BlockId, ChainMatch, HolderId, MatchEntry, PrefixIndex, Tier, TierMask};

const A: HolderId = HolderId(1);
const B: HolderId = HolderId(2);

fn look(ix: &dyn PrefixIndex, chain: &[BlockId]) -> ChainMatch {
    let mut m = ChainMatch::default();
    ix.lookup(chain, &mut m);
    m
}

fn e(pos: u32, holder: HolderId, tiers: TierMask) -> MatchEntry {
    MatchEntry { pos, holder, tiers }
}

/// Runs every check against indexes made by `make`.
pub fn run_all<I: PrefixIndex + 'static>(make: &dyn Fn() -> I) {
    prefix_stops_at_first_gap(&make());
    tiers_accumulate_and_remove_separately(&make());
    clear_by_tier_and_whole_holder(&make());
    idempotent_and_unknown_operations(&make());
    entries_sorted_by_position_then_holder(&make());
    identical_positions_form_one_run(&make());
    concurrent_readers_and_writers(Arc::new(make()));
}

/// A chain matches up to the first block nobody holds, whoever holds the rest.
pub fn prefix_stops_at_first_gap(ix: &dyn PrefixIndex) {
    ix.store(A, Tier::Hbm, &[10, 11, 13]);
    ix.store(B, Tier::Host, &[10]);
    let m = look(ix, &[10, 11, 12, 13]);
    assert_eq!(m.depth, 2, "12 is held by nobody: the match ends before it");
    assert_eq!(
        m.entries(),
        vec![
            e(0, A, TierMask::of(Tier::Hbm)),
            e(0, B, TierMask::of(Tier::Host)),
            e(1, A, TierMask::of(Tier::Hbm))
        ]
    );
    assert_eq!(look(ix, &[99, 10]).depth, 0, "a miss at the root matches nothing");
    assert_eq!(look(ix, &[]).depth, 0);
    assert_eq!(ix.len(), 3);
    assert_eq!(ix.holder_len(A), 3);
    assert_eq!(ix.holder_len(B), 1);
}

/// A block held in two tiers stays held until both are removed.
pub fn tiers_accumulate_and_remove_separately(ix: &dyn PrefixIndex) {
    ix.store(A, Tier::Host, &[1]);
    ix.store(A, Tier::Disk, &[1]);
    assert_eq!(
        look(ix, &[1]).entries(),
        vec![e(0, A, TierMask::of(Tier::Host).with(Tier::Disk))]
    );
    ix.remove(A, Some(Tier::Host), &[1]);
    assert_eq!(look(ix, &[1]).entries(), vec![e(0, A, TierMask::of(Tier::Disk))]);
    ix.remove(A, Some(Tier::Disk), &[1]);
    assert_eq!(look(ix, &[1]).depth, 0);
    assert_eq!(ix.len(), 0, "a block with no holder left is gone");
    assert_eq!(ix.holder_len(A), 0);
    ix.store(A, Tier::Hbm, &[2]);
    ix.store(A, Tier::Object, &[2]);
    ix.remove(A, None, &[2]);
    assert!(ix.is_empty(), "remove without a tier drops every tier");
}

/// `clear` with a tier keeps the holder's other tiers; without one it drops
/// everything, and never touches other holders.
pub fn clear_by_tier_and_whole_holder(ix: &dyn PrefixIndex) {
    ix.store(A, Tier::Hbm, &[1, 2, 3]);
    ix.store(A, Tier::Host, &[2]);
    ix.store(B, Tier::Hbm, &[1, 2, 3]);
    ix.clear(A, Some(Tier::Hbm));
    assert_eq!(ix.holder_len(A), 1);
    assert_eq!(
        look(ix, &[1, 2]).entries(),
        vec![
            e(0, B, TierMask::of(Tier::Hbm)),
            e(1, A, TierMask::of(Tier::Host)),
            e(1, B, TierMask::of(Tier::Hbm))
        ]
    );
    ix.clear(A, None);
    assert_eq!(ix.holder_len(A), 0);
    assert_eq!(ix.holder_len(B), 3, "clearing A leaves B alone");
    assert_eq!(look(ix, &[1, 2, 3]).depth, 3);
    ix.clear(B, None);
    assert!(ix.is_empty());
}

/// Repeats and unknowns are no-ops, never errors or panics.
pub fn idempotent_and_unknown_operations(ix: &dyn PrefixIndex) {
    ix.remove(A, None, &[5]);
    ix.clear(HolderId(77), None);
    ix.store(A, Tier::Hbm, &[5, 5]);
    ix.store(A, Tier::Hbm, &[5]);
    assert_eq!(ix.holder_len(A), 1);
    assert_eq!(look(ix, &[5]).entries(), vec![e(0, A, TierMask::of(Tier::Hbm))]);
    ix.remove(A, Some(Tier::Disk), &[5]);
    assert_eq!(look(ix, &[5]).entries(), vec![e(0, A, TierMask::of(Tier::Hbm))]);
    ix.store(A, Tier::Host, &[]);
    assert_eq!(ix.len(), 1);
}

/// Entries come sorted by position, then holder, whatever the store order.
pub fn entries_sorted_by_position_then_holder(ix: &dyn PrefixIndex) {
    for h in [9, 3, 7, 1, 5] {
        ix.store(HolderId(h), Tier::Hbm, &[2, 1]);
    }
    let m = look(ix, &[1, 2]);
    let got: Vec<(u32, u32)> = m.entries().iter().map(|e| (e.pos, e.holder.0)).collect();
    let mut want = got.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(got.len(), 10);
}

/// Consecutive positions with the same holders in the same tiers are one
/// run; a change of holder or tier starts the next.
pub fn identical_positions_form_one_run(ix: &dyn PrefixIndex) {
    let chain: Vec<BlockId> = (100..110).collect();
    ix.store(A, Tier::Hbm, &chain);
    ix.store(B, Tier::Host, &chain[..6]);
    ix.store(B, Tier::Disk, &chain[4..6]);
    let m = look(ix, &chain);
    assert_eq!(m.depth, 10);
    let runs: Vec<(u32, u32, usize)> = m
        .runs
        .iter()
        .map(|r| (r.start, r.end, m.run_holders(r).len()))
        .collect();
    assert_eq!(runs, vec![(0, 4, 2), (4, 6, 2), (6, 10, 1)]);
    assert_eq!(
        m.run_holders(&m.runs[1]),
        &[
            (A, TierMask::of(Tier::Hbm)),
            (B, TierMask::of(Tier::Host).with(Tier::Disk))
        ]
    );
    assert_eq!(m.entries().len(), 6 * 2 + 4);
    assert_eq!(ChainMatch::from_entries(m.entries()), m, "entries round-trip");
}

/// Readers run while writers churn; afterwards the index agrees with what
/// the writers left.
pub fn concurrent_readers_and_writers(ix: Arc<dyn PrefixIndex>) {
    let chain: Vec<BlockId> = (0..64).map(|i| 1000 + i).collect();
    std::thread::scope(|s| {
        for w in 0..4u32 {
            let ix = ix.clone();
            let chain = chain.clone();
            s.spawn(move || {
                for round in 0..200 {
                    ix.store(HolderId(w), Tier::Hbm, &chain);
                    if round % 3 == 0 {
                        ix.remove(HolderId(w), None, &chain[32..]);
                    } else if round % 7 == 0 {
                        ix.clear(HolderId(w), None);
                    }
                }
                ix.store(HolderId(w), Tier::Hbm, &chain[..40]);
                ix.remove(HolderId(w), None, &chain[40..]);
            });
        }
        for _ in 0..2 {
            let ix = ix.clone();
            let chain = chain.clone();
            s.spawn(move || {
                let mut m = ChainMatch::default();
                for _ in 0..500 {
                    ix.lookup(&chain, &mut m);
                    assert!(m.depth <= 64);
                    assert!(
                        m.entries()
                            .windows(2)
                            .all(|w| (w[0].pos, w[0].holder) < (w[1].pos, w[1].holder))
                    );
                    assert!(m.entries().iter().all(|e| (e.pos as usize) < m.depth));
                }
            });
        }
    });
    let m = look(&*ix, &chain);
    assert_eq!(m.depth, 40);
    assert_eq!(m.entries().len(), 160);
    for w in 0..4 {
        assert_eq!(ix.holder_len(HolderId(w)), 40);
    }
}
