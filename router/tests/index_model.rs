//! Property test: on random event streams (stores, removes, clears, workers
//! joining and leaving, in any tier), [`ShardedIndex`] answers every lookup
//! exactly as the naive reference model does.

use std::sync::Arc;

use kvfabric_router::index::{BlockId, ChainMatch, HolderId, NaiveIndex, PrefixIndex, ShardedIndex, Tier};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Store(u32, Tier, Vec<BlockId>),
    Remove(u32, Option<Tier>, Vec<BlockId>),
    Clear(u32, Option<Tier>),
    /// A worker leaves: everything it held goes.
    Leave(u32),
    Lookup(Vec<BlockId>),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Hbm), Just(Tier::Host), Just(Tier::Disk), Just(Tier::Object)]
}

/// Blocks from a small universe, so operations collide often; chains are
/// prefixes of a few fixed sequences so lookups find real prefixes.
fn blocks() -> impl Strategy<Value = Vec<BlockId>> {
    (0u128..4, 0usize..12, 1usize..6)
        .prop_map(|(seq, start, len)| (start..start + len).map(|i| seq * 1000 + i as u128).collect())
}

fn op() -> impl Strategy<Value = Op> {
    let holder = 0u32..6;
    prop_oneof![
        5 => (holder.clone(), tier(), blocks()).prop_map(|(h, t, b)| Op::Store(h, t, b)),
        3 => (holder.clone(), proptest::option::of(tier()), blocks()).prop_map(|(h, t, b)| Op::Remove(h, t, b)),
        1 => (holder.clone(), proptest::option::of(tier())).prop_map(|(h, t)| Op::Clear(h, t)),
        1 => holder.prop_map(Op::Leave),
        3 => (0u128..4, 1usize..16).prop_map(|(seq, n)| Op::Lookup((0..n).map(|i| seq * 1000 + i as u128).collect())),
    ]
}

fn apply(ix: &dyn PrefixIndex, op: &Op) {
    match op {
        Op::Store(h, t, b) => ix.store(HolderId(*h), *t, b),
        Op::Remove(h, t, b) => ix.remove(HolderId(*h), *t, b),
        Op::Clear(h, t) => ix.clear(HolderId(*h), *t),
        Op::Leave(h) => ix.clear(HolderId(*h), None),
        Op::Lookup(_) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sharded_matches_the_reference(ops in proptest::collection::vec(op(), 1..120)) {
        let real: Arc<dyn PrefixIndex> = Arc::new(ShardedIndex::new());
        let model = NaiveIndex::new();
        let (mut a, mut b) = (ChainMatch::default(), ChainMatch::default());
        for op in &ops {
            apply(&*real, op);
            apply(&model, op);
            if let Op::Lookup(chain) = op {
                real.lookup(chain, &mut a);
                model.lookup(chain, &mut b);
                prop_assert_eq!(&a, &b, "lookup {:?}", chain);
            }
        }
        prop_assert_eq!(real.len(), model.len());
        for h in 0..6 {
            prop_assert_eq!(real.holder_len(HolderId(h)), model.holder_len(HolderId(h)), "holder {}", h);
        }
        // Every chain, after the whole stream.
        for seq in 0u128..4 {
            let chain: Vec<BlockId> = (0..20).map(|i| seq * 1000 + i).collect();
            real.lookup(&chain, &mut a);
            model.lookup(&chain, &mut b);
            prop_assert_eq!(&a, &b);
        }
    }
}
