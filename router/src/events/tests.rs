//! Tests of event application: identity from tokens, malformed events,
//! sequence gaps, fabric streams.

use super::*;
use crate::index::{ChainMatch, ShardedIndex, TierMask};
use kvfabric::hash::{chain_hashes, namespace_salt};
use rmpv::Value as V;

const BS: usize = 4;

fn setup() -> (Arc<dyn PrefixIndex>, Arc<EventCounters>, u64) {
    (
        Arc::new(ShardedIndex::new()),
        Arc::new(EventCounters::default()),
        namespace_salt("kv"),
    )
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> V {
    V::Array(vec![
        V::from("BlockStored"),
        V::Array(hashes.iter().map(|&h| V::from(h)).collect()),
        parent.map_or(V::Nil, V::from),
        V::Array(tokens.iter().map(|&t| V::from(t)).collect()),
        V::from(BS as u64),
    ])
}

fn batch(events: Vec<V>) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &V::Array(vec![V::F64(0.0), V::Array(events)])).unwrap();
    out
}

fn chain(salt: u64, tokens: &[u32]) -> Vec<BlockId> {
    chain_hashes(salt, tokens, BS, &[])
        .into_iter()
        .map(u128::from_le_bytes)
        .collect()
}

fn depth_for(ix: &dyn PrefixIndex, chain: &[BlockId], holder: HolderId) -> usize {
    let mut m = ChainMatch::default();
    ix.lookup(chain, &mut m);
    let mut d = 0;
    while m.entries().iter().any(|e| e.pos as usize == d && e.holder == holder) {
        d += 1;
    }
    d
}

#[test]
fn engines_with_different_hashes_share_identity_by_tokens() {
    let (ix, c, salt) = setup();
    let toks: Vec<u32> = (0..12).collect();
    let mut a = EngineTracker::new(HolderId(1), salt, BS, ix.clone(), c.clone());
    let mut b = EngineTracker::new(HolderId(2), salt, BS, ix.clone(), c.clone());
    // Engine A stores all three blocks in one event; engine B in two events
    // chained by parent, with unrelated hash values.
    a.on_message(0, &batch(vec![stored(&[1, 2, 3], None, &toks)]));
    b.on_message(0, &batch(vec![stored(&[900], None, &toks[..4])]));
    b.on_message(1, &batch(vec![stored(&[901, 902], Some(900), &toks[4..])]));
    let ch = chain(salt, &toks);
    assert_eq!(depth_for(&*ix, &ch, HolderId(1)), 3);
    assert_eq!(depth_for(&*ix, &ch, HolderId(2)), 3);
    assert_eq!(ix.len(), 3, "same tokens, same blocks");
    assert_eq!(c.applied.load(Relaxed), 3);
    assert_eq!(c.blocks_stored.load(Relaxed), 6);
    // Removal names engine hashes.
    b.on_message(
        2,
        &batch(vec![V::Array(vec![
            V::from("BlockRemoved"),
            V::Array(vec![V::from(902u64)]),
        ])]),
    );
    assert_eq!(depth_for(&*ix, &ch, HolderId(2)), 2);
    assert_eq!(depth_for(&*ix, &ch, HolderId(1)), 3);
}

#[test]
fn lora_and_salt_change_identity() {
    let (ix, c, salt) = setup();
    let toks: Vec<u32> = (0..4).collect();
    let mut t = EngineTracker::new(HolderId(1), salt, BS, ix.clone(), c.clone());
    t.apply(&EngineEvent::BlockStored {
        block_hashes: vec![1],
        parent_block_hash: None,
        token_ids: toks.clone(),
        block_size: BS,
        lora_id: Some(5),
        medium: None,
    })
    .unwrap();
    assert_eq!(
        depth_for(&*ix, &chain(salt, &toks), HolderId(1)),
        0,
        "a LoRA block is not the base block"
    );
    let lora = 5i64.to_le_bytes();
    let with_lora: Vec<BlockId> = chain_hashes(salt, &toks, BS, &[&lora])
        .into_iter()
        .map(u128::from_le_bytes)
        .collect();
    assert_eq!(depth_for(&*ix, &with_lora, HolderId(1)), 1);
}

#[test]
fn malformed_events_are_counted_and_leave_the_index_alone() {
    let (ix, c, salt) = setup();
    let mut t = EngineTracker::new(HolderId(1), salt, BS, ix.clone(), c.clone());
    let wrong_size = V::Array(vec![
        V::from("BlockStored"),
        V::Array(vec![V::from(1u64)]),
        V::Nil,
        V::Array((0..8u32).map(V::from).collect()),
        V::from(8u64),
    ]);
    t.on_message(
        0,
        &batch(vec![
            wrong_size,
            stored(&[1, 2], None, &[1, 2, 3, 4]), // tokens for one block only
            V::Array(vec![
                V::from("BlockStored"),
                V::Array(vec![V::from(3u64)]),
                V::Nil,
                V::Array(vec![]),
                V::from(4u64),
            ]),
            stored(&[4], Some(77), &[1, 2, 3, 4]), // parent never seen
            V::Array(vec![V::from("Nope")]),
            V::Array(vec![
                V::from("BlockRemoved"),
                V::Array(vec![V::from(1u64)]),
                V::from("QUANTUM"),
            ]),
        ]),
    );
    t.on_message(1, b"\xc1 not msgpack");
    assert!(ix.is_empty());
    assert_eq!(c.wrong_block_size.load(Relaxed), 1);
    assert_eq!(
        c.missing_tokens.load(Relaxed),
        2,
        "short tokens and hashes without tokens"
    );
    assert_eq!(c.unknown_parent.load(Relaxed), 1);
    assert_eq!(c.unknown_medium.load(Relaxed), 1);
    assert_eq!(c.malformed.load(Relaxed), 2, "unknown type and undecodable payload");
    assert_eq!(c.applied.load(Relaxed), 0);
}

#[test]
fn a_sequence_gap_resynchronises_the_holder() {
    let (ix, c, salt) = setup();
    let toks: Vec<u32> = (0..8).collect();
    let mut t = EngineTracker::new(HolderId(1), salt, BS, ix.clone(), c.clone());
    assert_eq!(
        t.on_message(10, &batch(vec![stored(&[1, 2], None, &toks)])),
        SeqStatus::InOrder
    );
    assert_eq!(ix.holder_len(HolderId(1)), 2);
    // 11 and 12 lost: whatever they removed may be gone, so drop and rebuild.
    assert_eq!(
        t.on_message(13, &batch(vec![stored(&[5], None, &[9, 9, 9, 9])])),
        SeqStatus::Gap { missed: 2 }
    );
    assert_eq!(ix.holder_len(HolderId(1)), 1);
    assert_eq!(c.gaps.load(Relaxed), 1);
    // A repeat is ignored.
    assert_eq!(
        t.on_message(13, &batch(vec![stored(&[6], None, &[8, 8, 8, 8])])),
        SeqStatus::Stale
    );
    assert_eq!(ix.holder_len(HolderId(1)), 1);
    // After the gap the parent mapping is gone too: a child of block 1 is unknown.
    t.on_message(14, &batch(vec![stored(&[3], Some(2), &[1, 1, 1, 1])]));
    assert_eq!(c.unknown_parent.load(Relaxed), 1);
}

#[test]
fn offloaded_copies_and_clears_by_medium() {
    let (ix, c, salt) = setup();
    let toks: Vec<u32> = (0..4).collect();
    let ch = chain(salt, &toks);
    let mut t = EngineTracker::new(HolderId(1), salt, BS, ix.clone(), c.clone());
    let ev = |medium: Option<&str>| EngineEvent::BlockStored {
        block_hashes: vec![1],
        parent_block_hash: None,
        token_ids: toks.clone(),
        block_size: BS,
        lora_id: None,
        medium: medium.map(str::to_owned),
    };
    t.apply(&ev(None)).unwrap();
    t.apply(&ev(Some("CPU"))).unwrap();
    let mut m = ChainMatch::default();
    ix.lookup(&ch, &mut m);
    assert_eq!(m.entries()[0].tiers, TierMask::of(Tier::Hbm).with(Tier::Host));
    t.apply(&EngineEvent::BlockRemoved {
        block_hashes: vec![1],
        medium: Some("GPU".into()),
    })
    .unwrap();
    ix.lookup(&ch, &mut m);
    assert_eq!(m.entries()[0].tiers, TierMask::of(Tier::Host));
    // The CPU copy outlived the GPU one: its removal still finds it.
    t.apply(&EngineEvent::BlockRemoved {
        block_hashes: vec![1],
        medium: Some("cpu".into()),
    })
    .unwrap();
    assert!(ix.is_empty());
    // Clearing one medium keeps the others' copies, and their mapping.
    t.apply(&ev(None)).unwrap();
    t.apply(&ev(Some("CPU"))).unwrap();
    t.apply(&EngineEvent::AllBlocksCleared {
        medium: Some("cpu".into()),
    })
    .unwrap();
    ix.lookup(&ch, &mut m);
    assert_eq!(m.entries()[0].tiers, TierMask::of(Tier::Hbm));
    t.apply(&EngineEvent::BlockRemoved {
        block_hashes: vec![1],
        medium: Some("GPU".into()),
    })
    .unwrap();
    assert!(ix.is_empty());
    assert_eq!(c.unknown_parent.load(Relaxed), 0);
}

#[test]
fn fabric_events_apply_by_key_and_tier() {
    let (ix, c, salt) = setup();
    let toks: Vec<u32> = (0..8).collect();
    let ch = chain(salt, &toks);
    let f = FabricTracker::new(HolderId(100), "kv".into(), ix.clone(), c.clone());
    let ev = |kind: EventKind, ns: &str, keys: Vec<Vec<u8>>, tier: kvfabric_proto::v1::Tier| FabricEvent {
        kind: kind as i32,
        namespace: ns.into(),
        keys: keys.into_iter().map(Into::into).collect(),
        tier: tier as i32,
        lagged: 0,
        node: "n".into(),
    };
    let keys: Vec<Vec<u8>> = ch.iter().map(|id| id.to_le_bytes().to_vec()).collect();
    use kvfabric_proto::v1::Tier as P;
    f.apply(&ev(EventKind::Stored, "kv", keys.clone(), P::Host));
    f.apply(&ev(EventKind::Stored, "kv", vec![keys[0].clone()], P::Disk));
    f.apply(&ev(EventKind::Stored, "other", keys.clone(), P::Host));
    f.apply(&ev(EventKind::Stored, "kv", vec![b"short".to_vec()], P::Host));
    assert_eq!(depth_for(&*ix, &ch, HolderId(100)), 2);
    assert_eq!(c.malformed.load(Relaxed), 1);
    f.apply(&ev(EventKind::Removed, "kv", vec![keys[0].clone()], P::Host));
    let mut m = ChainMatch::default();
    ix.lookup(&ch, &mut m);
    assert_eq!(m.entries()[0].tiers, TierMask::of(Tier::Disk));
    f.apply(&ev(EventKind::Cleared, "kv", vec![], P::Unspecified));
    assert!(ix.is_empty());
    assert!(f.apply(&ev(EventKind::Stored, "kv", keys.clone(), P::Host)));
    assert!(f.apply(&FabricEvent {
        kind: EventKind::SnapshotDone as i32,
        ..Default::default()
    }));
    assert_eq!(
        depth_for(&*ix, &ch, HolderId(100)),
        2,
        "the end of a snapshot changes nothing"
    );
    let keep_going = f.apply(&FabricEvent {
        kind: EventKind::Lagged as i32,
        lagged: 10,
        ..Default::default()
    });
    assert!(!keep_going, "a lagged stream asks for a new subscription");
    assert!(ix.is_empty(), "a lagged stream drops what may be stale");
    assert_eq!(c.gaps.load(Relaxed), 1);
}

#[test]
fn seq_tracker() {
    let mut s = SeqTracker::default();
    assert_eq!(s.observe(5), SeqStatus::InOrder);
    assert_eq!(s.observe(6), SeqStatus::InOrder);
    assert_eq!(s.observe(9), SeqStatus::Gap { missed: 2 });
    assert_eq!(s.observe(3), SeqStatus::Stale);
    s.reset();
    assert_eq!(s.observe(3), SeqStatus::InOrder);
}
