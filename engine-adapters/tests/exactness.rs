//! Exactness through the fabric: for a set of prompts, the generated tokens
//! are identical and the first-step logits agree to within 1e-4 (max
//! absolute difference) across
//!
//! - (a) a cold engine without any cache,
//! - (b) a full-prefix hit from the host tier,
//! - (c) a hit after the blocks were demoted to disk, and again after they
//!   were demoted to the object store,
//! - (d) a prefill-only engine -> fabric -> a decode engine,
//! - (e) a partial hit (half the prefix cached),
//!
//! with real nodes (host arena, io_uring disk tier, `file://` object store),
//! and the engine's own counter proves that (b)-(e) computed fewer prefill
//! tokens than (a), by exactly the cached count. The tiers a hit came from
//! are checked with `ExistsPrefix` before loading, so the test cannot pass
//! by reading host memory where it claims disk or object storage.

use anyhow::{Result, ensure};
use kvfabric::client::{Client, Durability, PutObject, Tier};
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use kvfabric_engine_adapters::engine::{Engine, GenerationParams, Model, ModelConfig, encode};
use kvfabric_engine_adapters::fabric_kv::FabricKv;

const NEW_TOKENS: usize = 8;
const NS: &str = "exact";

/// Prompts of several lengths: with and without a partial last block, and
/// one that is an exact multiple of the block size.
fn prompts() -> Vec<Vec<u32>> {
    let mut p = vec![
        encode(
            "A long shared system prompt: you are a careful assistant who answers briefly.",
            true,
        ),
        encode(
            "Tenant two asks about tiered KV caches, HBM, host memory, NVMe and object stores in one fabric.",
            true,
        ),
    ];
    let mut exact: Vec<u32> = encode("sixty-four tokens exactly, padded with a repeated phrase: ", true);
    exact.resize(64, u32::from(b'x'));
    p.push(exact);
    p
}

/// What one way of serving a prompt produced.
#[derive(Debug)]
struct Outcome {
    tokens: Vec<u32>,
    first_logits: Vec<f32>,
    computed: u64,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn engine(cfg: &ModelConfig) -> Result<Engine> {
    Ok(Engine::new(Model::from_seed(cfg)?, 256)?)
}

/// Serves `tokens` on a fresh engine from `cached` block bytes.
fn serve(cfg: &ModelConfig, tokens: &[u32], cached: &[bytes::Bytes]) -> Result<Outcome> {
    let mut e = engine(cfg)?;
    let s = e.add_sequence_from_bytes(tokens, cached)?;
    let g = e.generate(&[(s, GenerationParams::greedy(NEW_TOKENS))])?;
    Ok(Outcome {
        tokens: g[0].tokens.clone(),
        first_logits: g[0].first_logits.clone(),
        computed: e.prefill_tokens_computed(),
    })
}

/// Prefills `tokens` on a fresh engine (no decode) and stores its first
/// `n` full blocks in the fabric.
async fn prefill_and_store(cfg: &ModelConfig, kv: &FabricKv, tokens: &[u32], n: usize) -> Result<()> {
    let mut e = engine(cfg)?;
    let s = e.add_sequence(tokens, &[])?;
    e.prefill(&[s])?;
    let blocks = e
        .full_blocks(s)?
        .into_iter()
        .filter(|b| b.index < n)
        .map(|b| Ok((b.index, e.export_block(b.block)?)))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        blocks.len() == n,
        "the prompt has {} full blocks, wanted {n}",
        blocks.len()
    );
    kv.store(tokens, blocks).await?;
    Ok(())
}

/// Checks `got` against the cold run and that it computed exactly the
/// tokens the cache did not cover.
fn check(case: &str, cold: &Outcome, got: &Outcome, tokens: &[u32], cached_blocks: usize, tpb: usize) -> Result<()> {
    ensure!(
        got.tokens == cold.tokens,
        "{case}: generated {:?}, cold {:?}",
        got.tokens,
        cold.tokens
    );
    let d = max_abs_diff(&got.first_logits, &cold.first_logits);
    ensure!(d <= 1e-4, "{case}: first-step logits differ by {d}");
    // A prompt that is all full blocks still computes its last token.
    let cached = (cached_blocks * tpb).min(tokens.len() - 1) / tpb * tpb;
    ensure!(cached > 0, "{case}: nothing was cached");
    ensure!(
        got.computed == (tokens.len() - cached) as u64,
        "{case}: computed {} prefill tokens, expected {} ({} - {cached} cached)",
        got.computed,
        tokens.len() - cached,
        tokens.len()
    );
    ensure!(got.computed < cold.computed, "{case}: no prefill saved");
    println!(
        "{case}: {} prompt tokens, {} computed (cold {}), max |dlogit| {d}",
        tokens.len(),
        got.computed,
        cold.computed
    );
    Ok(())
}

async fn start(dir: &std::path::Path, host: u64, disk: u64, object: bool) -> Result<NodeHandle> {
    let mut s = Settings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join("data"),
        ..Default::default()
    };
    s.host.capacity = ByteSize(host);
    s.host.prefault = false;
    s.disk.capacity = ByteSize(disk);
    s.disk.file_size = ByteSize(disk.max(1 << 20));
    if object {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        s.object.url = Some(format!("file://{}", objects.display()));
    }
    // Demote inline, so the tiers are settled when a put returns.
    s.tiering.background = false;
    Ok(Node::build(s).await?.start().await?)
}

async fn tiers(client: &Client, kv: &FabricKv, tokens: &[u32]) -> Result<Vec<Tier>> {
    let keys = kv
        .keys(tokens)
        .iter()
        .map(|k| bytes::Bytes::copy_from_slice(k))
        .collect();
    Ok(client.exists_prefix(NS, keys).await?)
}

/// Puts filler objects of `size` bytes until every full block of `prompt`
/// sits in a tier `pred` accepts (or gives up). Small batches, so blocks do
/// not overshoot through the wanted tier.
async fn push_down(
    client: &Client,
    kv: &FabricKv,
    prompt: &[u32],
    size: usize,
    round: &mut u32,
    pred: impl Fn(Tier) -> bool,
) -> Result<Vec<Tier>> {
    for _ in 0..1024 {
        let t = tiers(client, kv, prompt).await?;
        if t.len() == kv.keys(prompt).len() && t.iter().all(|&t| pred(t)) {
            return Ok(t);
        }
        let filler: Vec<PutObject> = (0..8)
            .map(|i| {
                *round += 1;
                PutObject::new(format!("filler-{round}-{i}").into_bytes(), vec![7u8; size])
            })
            .collect();
        client.put_many(NS, filler, Durability::Memory).await?;
    }
    anyhow::bail!(
        "blocks never reached the wanted tier: {:?}",
        tiers(client, kv, prompt).await?
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_outputs_from_every_tier_disaggregation_and_partial_hits() -> Result<()> {
    let cfg = ModelConfig::tiny();
    let tpb = cfg.tokens_per_block;
    let prompts = prompts();
    let cold: Vec<Outcome> = prompts.iter().map(|p| serve(&cfg, p, &[])).collect::<Result<_>>()?;
    for (p, c) in prompts.iter().zip(&cold) {
        assert_eq!(c.computed as usize, p.len(), "(a) computes the whole prompt");
    }
    let full = |p: &[u32]| p.len() / tpb;

    // (b) host tier.
    let dir = tempfile::tempdir()?;
    let node = start(dir.path(), 16 << 20, 0, false).await?;
    let client = Client::connect(node.endpoint()).await?;
    let layout = engine(&cfg)?.kv_layout().clone();
    let kv = FabricKv::new(client.clone(), NS, layout.clone());
    for (p, c) in prompts.iter().zip(&cold) {
        prefill_and_store(&cfg, &kv, p, full(p)).await?;
        let t = tiers(&client, &kv, p).await?;
        assert!(
            t.len() == full(p) && t.iter().all(|&t| t == Tier::Host),
            "(b) tiers {t:?}"
        );
        let got = serve(&cfg, p, &kv.load_prefix(p).await?)?;
        check("(b) host", c, &got, p, full(p), tpb)?;
    }

    // (d) a prefill-only engine and a decode engine, through the fabric
    // (a namespace of their own, so nothing from (b) is reused).
    let kv_d = FabricKv::new(client.clone(), "disagg", layout.clone());
    for (p, c) in prompts.iter().zip(&cold) {
        prefill_and_store(&cfg, &kv_d, p, full(p)).await?;
        let got = serve(&cfg, p, &kv_d.load_prefix(p).await?)?;
        check("(d) disaggregated", c, &got, p, full(p), tpb)?;
    }

    // (e) half the prefix cached.
    let kv_e = FabricKv::new(client.clone(), "partial", layout.clone());
    for (p, c) in prompts.iter().zip(&cold) {
        let half = full(p) / 2;
        prefill_and_store(&cfg, &kv_e, p, half).await?;
        let loaded = kv_e.load_prefix(p).await?;
        assert_eq!(loaded.len(), half, "(e) only the stored half is found");
        let got = serve(&cfg, p, &loaded)?;
        check("(e) partial", c, &got, p, half, tpb)?;
    }
    node.shutdown().await;

    // (c) a node with a small host tier, a small disk tier and an object
    // store: filler pushes the blocks down to disk, then to the objects.
    let dir = tempfile::tempdir()?;
    let node = start(dir.path(), 256 << 10, 1 << 20, true).await?;
    let client = Client::connect(node.endpoint()).await?;
    let kv = FabricKv::new(client.clone(), NS, layout);
    for p in &prompts {
        prefill_and_store(&cfg, &kv, p, full(p)).await?;
    }
    let size = cfg.kv_layout().block_bytes();
    let mut round = 0;
    for (p, c) in prompts.iter().zip(&cold) {
        let t = push_down(&client, &kv, p, size, &mut round, |t| t == Tier::Disk).await?;
        assert!(
            t.iter().all(|&t| t == Tier::Disk),
            "(c) tiers before the disk read {t:?}"
        );
        let got = serve(&cfg, p, &kv.load_prefix(p).await?)?;
        check("(c) disk", c, &got, p, full(p), tpb)?;
    }
    for (p, c) in prompts.iter().zip(&cold) {
        let t = push_down(&client, &kv, p, size, &mut round, |t| t == Tier::Object).await?;
        assert!(
            t.iter().all(|&t| t == Tier::Object),
            "(c) tiers before the object read {t:?}"
        );
        let got = serve(&cfg, p, &kv.load_prefix(p).await?)?;
        check("(c) object", c, &got, p, full(p), tpb)?;
    }
    node.shutdown().await;
    Ok(())
}
