//! The reference engine against a real in-process fabric node: blocks one
//! engine computed are loaded by another, which computes only the rest and
//! produces the same logits and tokens; a block of another model's layout
//! under the same key is never loaded.

use anyhow::Result;
use kvfabric::client::Client;
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use kvfabric_engine_adapters::engine::{Engine, GenerationParams, Model, ModelConfig, encode};
use kvfabric_engine_adapters::fabric_kv::FabricKv;

async fn node(dir: &std::path::Path) -> Result<NodeHandle> {
    let mut s = Settings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    s.host.capacity = ByteSize(64 << 20);
    s.disk.capacity = ByteSize(0);
    Ok(Node::build(s).await?.start().await?)
}

/// Largest absolute difference between two logit vectors.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// The first `full` full blocks of sequence `seq`, exported as bytes.
fn export_full(e: &Engine, seq: kvfabric_engine_adapters::engine::SeqId, full: usize) -> Result<Vec<(usize, Vec<u8>)>> {
    e.full_blocks(seq)?
        .into_iter()
        .filter(|b| b.index < full)
        .map(|b| Ok((b.index, e.export_block(b.block)?)))
        .collect()
}

fn prompt() -> Vec<u32> {
    encode(
        "The fabric keeps every block an engine computed, so the next request with the same prefix skips it.",
        true,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_loads_the_prefix_and_matches_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let client = Client::connect(node.endpoint()).await?;
    let cfg = ModelConfig::tiny();
    let tpb = cfg.tokens_per_block;
    let tokens = prompt();
    let full = tokens.len() / tpb;
    assert!(full >= 4, "the prompt spans several blocks");

    // Engine A: cold, then its full blocks go into the fabric.
    let mut a = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_a = FabricKv::new(client.clone(), "tenant-a", a.kv_layout().clone());
    assert!(
        kv_a.load_prefix(&tokens).await?.is_empty(),
        "unknown namespace: nothing cached"
    );
    let sa = a.add_sequence(&tokens, &[])?;
    let ga = a.generate(&[(sa, GenerationParams::greedy(12))])?;
    let blocks = export_full(&a, sa, full)?;
    assert_eq!(kv_a.store(&tokens, blocks).await?, full);
    let cold = a.prefill_tokens_computed();
    assert_eq!(cold as usize, tokens.len());

    // Engine B, fresh pool: loads the prefix, computes the tail only.
    let mut b = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_b = FabricKv::new(client.clone(), "tenant-a", b.kv_layout().clone());
    let loaded = kv_b.load_prefix(&tokens).await?;
    assert_eq!(loaded.len(), full);
    let sb = b.add_sequence_from_bytes(&tokens, &loaded)?;
    let gb = b.generate(&[(sb, GenerationParams::greedy(12))])?;
    assert_eq!(gb[0].tokens, ga[0].tokens, "same generation");
    let diff = max_abs_diff(&ga[0].first_logits, &gb[0].first_logits);
    assert!(diff <= 1e-4, "first-step logits differ by {diff}");
    let cached = b.sequence(sb).unwrap().cached_tokens();
    assert!(cached > 0);
    assert_eq!(b.prefill_tokens_computed() as usize, tokens.len() - cached);
    assert_eq!(
        kv_b.counters().blocks_loaded.load(std::sync::atomic::Ordering::Relaxed),
        full as u64
    );

    // Another namespace has its own salt: nothing shared.
    let other = FabricKv::new(client.clone(), "tenant-b", b.kv_layout().clone());
    assert_ne!(other.keys(&tokens), kv_b.keys(&tokens));
    assert!(other.load_prefix(&tokens).await?.is_empty());
    node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_models_blocks_are_never_loaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let client = Client::connect(node.endpoint()).await?;
    let tokens = prompt();
    let mut cfg = ModelConfig::tiny();
    let mut a = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_a = FabricKv::new(client.clone(), "shared", a.kv_layout().clone());
    let sa = a.add_sequence(&tokens, &[])?;
    a.prefill(&[sa])?;
    let blocks = a
        .full_blocks(sa)?
        .into_iter()
        .map(|b| Ok((b.index, a.export_block(b.block)?)))
        .collect::<Result<Vec<_>>>()?;
    kv_a.store(&tokens, blocks).await?;

    // Same shapes, another model id: same keys, other layout header.
    cfg.model_id = "another-model".into();
    let b = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_b = FabricKv::new(client, "shared", b.kv_layout().clone());
    assert_eq!(kv_b.keys(&tokens), kv_a.keys(&tokens));
    assert!(kv_b.load_prefix(&tokens).await?.is_empty());
    assert_eq!(
        kv_b.counters()
            .layout_mismatches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    node.shutdown().await;
    Ok(())
}

/// Co-located engines through the zero-copy local path: engine A stores its
/// blocks through the node's shared arena, engine B (its own local
/// connection) loads them the same way, with the same logits and tokens as
/// A; a gRPC-only reader sees the same blocks (one store, two paths); an
/// engine of another model is refused the blocks on the local path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn co_located_engines_share_blocks_through_the_local_path() -> Result<()> {
    use kvfabric::client::LocalClient;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let socket = node.local_socket.clone().expect("the node serves the local path");
    let client = Client::connect(node.endpoint()).await?;
    let cfg = ModelConfig::tiny();
    let tokens = prompt();
    let full = tokens.len() / cfg.tokens_per_block;

    let mut a = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_a =
        FabricKv::new(client.clone(), "colo", a.kv_layout().clone()).with_local(LocalClient::connect(&socket).await?);
    assert!(kv_a.is_local());
    let sa = a.add_sequence(&tokens, &[])?;
    let ga = a.generate(&[(sa, GenerationParams::greedy(12))])?;
    let blocks = export_full(&a, sa, full)?;
    assert_eq!(kv_a.store(&tokens, blocks).await?, full);
    assert_eq!(kv_a.counters().blocks_stored_local.load(Relaxed), full as u64);

    let mut b = Engine::new(Model::from_seed(&cfg)?, 64)?;
    let kv_b =
        FabricKv::new(client.clone(), "colo", b.kv_layout().clone()).with_local(LocalClient::connect(&socket).await?);
    let loaded = kv_b.load_prefix(&tokens).await?;
    assert_eq!(loaded.len(), full);
    assert_eq!(
        kv_b.counters().blocks_loaded_local.load(Relaxed),
        full as u64,
        "every block came through the arena"
    );
    let sb = b.add_sequence_from_bytes(&tokens, &loaded)?;
    let gb = b.generate(&[(sb, GenerationParams::greedy(12))])?;
    assert_eq!(gb[0].tokens, ga[0].tokens, "same generation");
    let diff = max_abs_diff(&ga[0].first_logits, &gb[0].first_logits);
    assert!(diff <= 1e-4, "first-step logits differ by {diff}");
    assert_eq!(
        b.prefill_tokens_computed() as usize,
        tokens.len() - full * cfg.tokens_per_block
    );

    // The same objects over gRPC, byte for byte.
    let kv_grpc = FabricKv::new(client.clone(), "colo", b.kv_layout().clone());
    let over_grpc = kv_grpc.load_prefix(&tokens).await?;
    assert_eq!(over_grpc, loaded);
    assert_eq!(kv_grpc.counters().blocks_loaded_local.load(Relaxed), 0);

    // Another model's engine is refused them on the local path as well.
    let mut other = cfg.clone();
    other.model_id = "another-model".into();
    let c = Engine::new(Model::from_seed(&other)?, 64)?;
    let kv_c = FabricKv::new(client, "colo", c.kv_layout().clone()).with_local(LocalClient::connect(&socket).await?);
    assert!(kv_c.load_prefix(&tokens).await?.is_empty());
    assert_eq!(kv_c.counters().layout_mismatches.load(Relaxed), 1);
    node.shutdown().await;
    Ok(())
}

/// A chain longer than one request may carry (`MAX_BATCH_KEYS` keys) is
/// stored, found and loaded whole, batch by batch; a gap stops the prefix
/// there even in a later batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_longer_than_one_batch_are_stored_and_loaded() -> Result<()> {
    use kvfabric::client::MAX_BATCH_KEYS;
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let client = Client::connect(node.endpoint()).await?;
    let cfg = ModelConfig::tiny();
    let tpb = cfg.tokens_per_block;
    let layout = Engine::new(Model::from_seed(&cfg)?, 4)?.kv_layout().clone();
    let kv = FabricKv::new(client.clone(), "long", layout.clone());
    let blocks = MAX_BATCH_KEYS + 5;
    let tokens: Vec<u32> = (0..blocks * tpb).map(|i| (i % 250) as u32).collect();
    let block = |i: usize| (i as f32).to_le_bytes().repeat(layout.block_bytes() / 4);
    // Leave out one block of the second batch.
    let gap = MAX_BATCH_KEYS + 2;
    let stored = kv
        .store(
            &tokens,
            (0..blocks).filter(|&i| i != gap).map(|i| (i, block(i))).collect(),
        )
        .await?;
    assert_eq!(stored, blocks - 1);
    assert_eq!(kv.present_blocks(&tokens, 0..usize::MAX).await?, gap);
    assert_eq!(kv.present_blocks(&tokens, gap + 1..usize::MAX).await?, blocks - gap - 1);
    let loaded = kv.load_prefix(&tokens).await?;
    assert_eq!(loaded.len(), gap);
    for i in [0, MAX_BATCH_KEYS - 1, MAX_BATCH_KEYS, gap - 1] {
        assert_eq!(&loaded[i][..], &block(i)[..], "block {i}");
    }
    node.shutdown().await;
    Ok(())
}
