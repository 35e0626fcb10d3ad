//! `kvfabric demo` (this binary, `kvfabric-demo`): one command that starts a
//! fabric node, the KV-aware router and reference-engine workers in this
//! process on loopback, runs a shared-prefix workload through the router
//! twice — once with the workers and router on the fabric, once without it
//! (each worker keeps only its own block pool, as an engine's own prefix
//! cache does) — and prints, measured in both runs: prefill tokens computed,
//! where the reused tokens came from (the worker's own pool, or the fabric
//! by tier), and time to first token through the router.
//!
//! Workload: `--docs` shared documents of `--doc-blocks` 16-token blocks
//! (think long system prompts or RAG contexts), `--questions` requests per
//! document with a distinct question each, sent round-robin over the
//! documents (so by the time a document comes back, a small worker pool
//! has evicted it; the fabric still holds it). Greedy decoding, so the two
//! runs must produce identical tokens; `outputs_identical` says whether
//! they did.
//!
//! `--json`: the last line is one JSON object with `prefill_tokens_with`,
//! `prefill_tokens_without`, `ttft_p50_ms_with`, `ttft_p50_ms_without`,
//! `outputs_identical` (and more).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings as NodeSettings};
use kvfabric_engine_adapters::engine::ModelConfig;
use kvfabric_engine_adapters::worker::{Worker, WorkerHandle, WorkerSettings};
use kvfabric_router::config::{FabricEndpoint, Settings as RouterSettings, WorkerSettings as RouterWorker};
use kvfabric_router::{RouterHandle, RouterService};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "kvfabric-demo",
    about = "kvfabric demo: shared-prefix workload with and without the fabric"
)]
struct Opts {
    /// Shared documents.
    #[arg(long, default_value_t = 6)]
    docs: usize,
    /// 16-token blocks per document.
    #[arg(long, default_value_t = 16)]
    doc_blocks: usize,
    /// Requests per document.
    #[arg(long, default_value_t = 3)]
    questions: usize,
    /// Aggregated workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// KV blocks in each worker's own pool (small, so documents are evicted).
    #[arg(long, default_value_t = 48)]
    pool_blocks: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Model config TOML [default: the reference engine's default model].
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

const NS: &str = "demo";

/// One request's result.
#[derive(Debug, Clone)]
struct Answer {
    tokens: Vec<u32>,
    ttft_ms: f64,
    computed: u64,
    own_pool: u64,
    fabric: u64,
}

/// One run's totals.
#[derive(Debug)]
struct Run {
    answers: Vec<Answer>,
    prompt_tokens: u64,
    fabric_hits: [u64; 4],
}

impl Run {
    fn computed(&self) -> u64 {
        self.answers.iter().map(|a| a.computed).sum()
    }
    fn own(&self) -> u64 {
        self.answers.iter().map(|a| a.own_pool).sum()
    }
    fn fabric(&self) -> u64 {
        self.answers.iter().map(|a| a.fabric).sum()
    }
    fn ttft_p50(&self) -> f64 {
        let mut v: Vec<f64> = self.answers.iter().map(|a| a.ttft_ms).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
    }
}

/// A deterministic text of about `n` bytes for document `d`.
fn document(d: usize, n: usize) -> String {
    let words = [
        "fabric", "tier", "block", "prefix", "cache", "router", "worker", "decode", "prefill", "object", "memory",
        "disk", "tenant", "chain", "hash", "layout",
    ];
    let mut s = format!("Document {d}. ");
    let mut i = d * 7 + 3;
    while s.len() < n {
        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345) % 65_536;
        s.push_str(words[i % words.len()]);
        s.push(' ');
    }
    s.truncate(n);
    s
}

/// The workload's prompts, in sending order: round-robin over documents.
fn prompts(o: &Opts) -> Vec<String> {
    // BOS takes one token: documents fill `doc_blocks` blocks exactly.
    let docs: Vec<String> = (0..o.docs).map(|d| document(d, o.doc_blocks * 16 - 1)).collect();
    let mut out = Vec::new();
    for q in 0..o.questions {
        for (d, doc) in docs.iter().enumerate() {
            out.push(format!("{doc}Question {q} about document {d}: what does it say?"));
        }
    }
    out
}

async fn start_node(dir: &std::path::Path) -> Result<NodeHandle> {
    let mut s = NodeSettings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    s.host.capacity = ByteSize(256 << 20);
    s.host.prefault = false;
    s.disk.capacity = ByteSize(256 << 20);
    s.disk.file_size = ByteSize(256 << 20);
    Ok(Node::build(s).await?.start().await?)
}

/// Starts workers and a router; `fabric` puts them on the node.
async fn start_cluster(
    o: &Opts,
    model: &ModelConfig,
    fabric: Option<&str>,
) -> Result<(Vec<WorkerHandle>, RouterHandle)> {
    let mut workers = Vec::new();
    for _ in 0..o.workers {
        let s = WorkerSettings {
            listen: "127.0.0.1:0".parse()?,
            fabric: fabric.map(str::to_string),
            namespace: NS.into(),
            model_config: Some(model.clone()),
            pool_blocks: o.pool_blocks,
            kv_events: Some("tcp://127.0.0.1:0".into()),
            log: "warn".into(),
            ..Default::default()
        };
        workers.push(Worker::start(s).await.context("starting a worker")?);
    }
    let mut rs = RouterSettings {
        listen: "127.0.0.1:0".parse()?,
        namespace: NS.into(),
        health_interval_ms: 200,
        ..Default::default()
    };
    rs.cost.block_tokens = model.tokens_per_block;
    if let Some(url) = fabric {
        rs.fabric = vec![FabricEndpoint {
            name: "node".into(),
            url: url.to_string(),
        }];
    }
    rs.workers = workers
        .iter()
        .enumerate()
        .map(|(i, w)| RouterWorker {
            name: format!("w{i}"),
            url: w.url(),
            kv_events: w.kv_events_endpoint().map(str::to_string),
            fabric_node: fabric.map(|_| "node".to_string()),
        })
        .collect();
    let router = RouterService::start(rs).await.context("starting the router")?;
    // Wait until the router has health-checked every worker.
    for _ in 0..500 {
        if router.healthy_workers().len() == workers.len() {
            return Ok((workers, router));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the router never saw every worker healthy")
}

type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One streamed completion through the router: TTFT at the first chunk.
async fn complete(http: &Http, router: &str, model: &str, prompt: &str, max_tokens: usize) -> Result<Answer> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true, "temperature": 0});
    let req = hyper::Request::post(format!("{router}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(120), http.request(req))
        .await
        .context("request timed out")??;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut buf = String::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(120), body.frame())
        .await
        .context("stream stalled")?
    {
        if let Ok(data) = frame?.into_data() {
            if ttft.is_none() && !data.is_empty() {
                ttft = Some(start.elapsed().as_secs_f64() * 1e3);
            }
            buf.push_str(&String::from_utf8_lossy(&data));
        }
    }
    if !status.is_success() {
        bail!("router answered {status}: {buf}");
    }
    let mut a = Answer {
        tokens: Vec::new(),
        ttft_ms: ttft.unwrap_or(0.0),
        computed: 0,
        own_pool: 0,
        fabric: 0,
    };
    for line in buf.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("bad SSE chunk {data}"))?;
        if let Some(ids) = v["choices"][0]["token_ids"].as_array() {
            a.tokens.extend(ids.iter().filter_map(|x| x.as_u64()).map(|x| x as u32));
        }
        let k = &v["kvfabric"];
        if k.is_object() {
            a.computed = k["computed_tokens"].as_u64().unwrap_or(0);
            a.own_pool = k["own_pool_tokens"].as_u64().unwrap_or(0);
            a.fabric = k["fabric_tokens"].as_u64().unwrap_or(0);
        }
    }
    Ok(a)
}

async fn tier_hits(node: &NodeHandle) -> Result<[u64; 4]> {
    let c = kvfabric::client::Client::connect(node.endpoint()).await?;
    let mut out = [0u64; 4];
    for t in c.stats().await?.tiers {
        let i = match t.tier() {
            kvfabric::client::Tier::Hbm => 0,
            kvfabric::client::Tier::Host => 1,
            kvfabric::client::Tier::Disk => 2,
            kvfabric::client::Tier::Object => 3,
            kvfabric::client::Tier::Unspecified => continue,
        };
        out[i] = t.hits;
    }
    Ok(out)
}

async fn run_once(o: &Opts, model: &ModelConfig, node: Option<&NodeHandle>) -> Result<Run> {
    let url = node.map(|n| n.endpoint());
    let (workers, router) = start_cluster(o, model, url.as_deref()).await?;
    let before = match node {
        Some(n) => tier_hits(n).await?,
        None => [0; 4],
    };
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut answers = Vec::new();
    let mut prompt_tokens = 0;
    for p in prompts(o) {
        prompt_tokens += p.len() as u64 + 1;
        answers.push(complete(&http, &router.url(), &model.model_id, &p, o.max_tokens).await?);
    }
    let after = match node {
        Some(n) => tier_hits(n).await?,
        None => [0; 4],
    };
    router.shutdown().await;
    for w in workers {
        w.shutdown().await;
    }
    let mut fabric_hits = [0; 4];
    for i in 0..4 {
        fabric_hits[i] = after[i] - before[i];
    }
    Ok(Run {
        answers,
        prompt_tokens,
        fabric_hits,
    })
}

fn pct(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 * 100.0 / d as f64 }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let o = Opts::parse();
    if o.docs == 0 || o.questions == 0 || o.workers == 0 || o.doc_blocks == 0 {
        bail!("--docs, --questions, --workers and --doc-blocks must be above zero");
    }
    let model = match &o.model {
        Some(p) => ModelConfig::from_toml_file(p).with_context(|| format!("model config {}", p.display()))?,
        None => ModelConfig::default(),
    };
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    eprintln!(
        "# kvfabric demo: model {} ({} layers, hidden {}), {} workers x {} pool blocks, {} documents x {} blocks, {} requests",
        model.model_id,
        model.num_layers,
        model.hidden_size,
        o.workers,
        o.pool_blocks,
        o.docs,
        o.doc_blocks,
        o.docs * o.questions
    );
    let without = run_once(&o, &model, None).await.context("run without the fabric")?;
    let node = start_node(dir.path()).await?;
    let with = run_once(&o, &model, Some(&node)).await.context("run with the fabric")?;
    node.shutdown().await;
    let identical = with.answers.len() == without.answers.len()
        && with
            .answers
            .iter()
            .zip(&without.answers)
            .all(|(a, b)| a.tokens == b.tokens);
    let total = with.prompt_tokens;
    println!(
        "{:<16} {:>14} {:>10} {:>10} {:>10} {:>12}",
        "run", "prefill tokens", "own pool", "fabric", "computed", "ttft p50"
    );
    for (name, r) in [("without fabric", &without), ("with fabric", &with)] {
        println!(
            "{:<16} {:>14} {:>9.1}% {:>9.1}% {:>9.1}% {:>10.1}ms",
            name,
            r.computed(),
            pct(r.own(), total),
            pct(r.fabric(), total),
            pct(r.computed(), total),
            r.ttft_p50()
        );
    }
    let [hbm, host, disk, object] = with.fabric_hits;
    println!(
        "prefill tokens saved by the fabric: {} of {} ({:.1}%); fabric block hits by tier: hbm {hbm}, host {host}, disk {disk}, object {object}; outputs identical: {identical}",
        without.computed().saturating_sub(with.computed()),
        without.computed(),
        pct(without.computed().saturating_sub(with.computed()), without.computed()),
    );
    eprintln!("# demo done in {:.1} s", started.elapsed().as_secs_f64());
    if o.json {
        println!(
            "{}",
            json!({
                "prefill_tokens_with": with.computed(),
                "prefill_tokens_without": without.computed(),
                "ttft_p50_ms_with": with.ttft_p50(),
                "ttft_p50_ms_without": without.ttft_p50(),
                "outputs_identical": identical,
                "prompt_tokens": total,
                "own_pool_tokens_with": with.own(),
                "own_pool_tokens_without": without.own(),
                "fabric_tokens_with": with.fabric(),
                "fabric_block_hits": {"hbm": hbm, "host": host, "disk": disk, "object": object},
                "requests": with.answers.len(),
            })
        );
    }
    if !identical {
        bail!("the runs produced different tokens");
    }
    Ok(())
}
