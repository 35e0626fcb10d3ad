//! Property test of the KV block pool's allocator against a plain model:
//! random allocate / retain / release / import sequences never hand out a
//! live block twice, keep the free count consistent and never panic.

use std::collections::BTreeMap;

use kvfabric_engine_adapters::engine::{BlockId, BlockPool, KvError, KvLayout};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

#[derive(Debug, Clone)]
enum Op {
    Allocate,
    Import,
    /// Retain the n-th live block (mod live count).
    Retain(usize),
    /// Release the n-th live block (mod live count).
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Allocate),
        1 => Just(Op::Import),
        2 => any::<usize>().prop_map(Op::Retain),
        4 => any::<usize>().prop_map(Op::Release),
    ]
}

fn layout() -> KvLayout {
    KvLayout {
        model_id: "prop".into(),
        dtype: "f32".into(),
        num_layers: 1,
        tokens_per_block: 2,
        num_kv_heads: 1,
        head_dim: 2,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Regressions go to tests/block_pool_props.proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pool_matches_a_refcount_model(capacity in 1usize..12, ops in prop::collection::vec(op(), 0..200)) {
        let mut pool = BlockPool::new(layout(), capacity).unwrap();
        let block = vec![0u8; pool.layout().block_bytes()];
        // Model: live block -> references.
        let mut model: BTreeMap<BlockId, u32> = BTreeMap::new();
        // Blocks released to zero, to check that stale ids are rejected.
        let mut freed: Vec<BlockId> = Vec::new();
        for op in ops {
            match op {
                Op::Allocate | Op::Import => {
                    let got = if matches!(op, Op::Allocate) { pool.allocate() } else { pool.import_block(&block) };
                    if model.len() == capacity {
                        let exhausted = matches!(got, Err(KvError::PoolExhausted { .. }));
                        prop_assert!(exhausted, "full pool allocated: {:?}", got);
                    } else {
                        let id = got.unwrap();
                        prop_assert!((id.index() as usize) < capacity);
                        prop_assert!(!model.contains_key(&id), "block {} handed out twice", id);
                        prop_assert_eq!(pool.is_full(id), Some(matches!(op, Op::Import)));
                        model.insert(id, 1);
                        freed.retain(|&f| f != id);
                    }
                }
                Op::Retain(n) => {
                    if let Some((&id, _)) = model.iter().nth(n % model.len().max(1)) {
                        pool.retain(id).unwrap();
                        *model.get_mut(&id).unwrap() += 1;
                    } else if let Some(&stale) = freed.last() {
                        prop_assert!(pool.retain(stale).is_err());
                    }
                }
                Op::Release(n) => {
                    if let Some((&id, _)) = model.iter().nth(n % model.len().max(1)) {
                        let was_freed = pool.release(id).unwrap();
                        let r = model.get_mut(&id).unwrap();
                        *r -= 1;
                        prop_assert_eq!(was_freed, *r == 0);
                        if *r == 0 {
                            model.remove(&id);
                            freed.push(id);
                        }
                    } else if let Some(&stale) = freed.last() {
                        prop_assert!(pool.release(stale).is_err());
                    }
                }
            }
            prop_assert_eq!(pool.num_free(), capacity - model.len());
            prop_assert_eq!(pool.num_used(), model.len());
            for (&id, &r) in &model {
                prop_assert_eq!(pool.ref_count(id), Some(r));
            }
            for &id in &freed {
                prop_assert_eq!(pool.ref_count(id), None);
            }
        }
    }
}
