//! The engine worker end to end, in-process: real workers on free loopback
//! ports over HTTP, a real fabric node, real ZMQ KV events decoded and
//! applied by the router's own decoder and tracker.
//!
//! - completions with text, token ids and chat; streaming assembles to the
//!   same tokens; concurrent (batched) requests give what a lone engine
//!   gives;
//! - the same long prompt twice on one worker: the second computes only
//!   the tail (own pool); on a fresh worker it loads from the fabric
//!   instead, with identical output;
//! - KV events name the blocks a worker holds, stored and evicted;
//! - disaggregated decode + prefill: long prompt remote, short local, a
//!   dead prefill worker `remote-failed-local`, always the right tokens;
//! - bad input: 4xx bodies, and the worker keeps serving.
//!
//! Every wait is bounded.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvfabric::hash::{chain_hashes, namespace_salt};
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use kvfabric_engine_adapters::engine::{Engine, GenerationParams, Model, ModelConfig, decode, encode};
use kvfabric_engine_adapters::worker::{Role, Worker, WorkerHandle, WorkerSettings, event_block_hash};
use kvfabric_router::events::vllm::{EngineEvent, decode_batch, split_frames};
use kvfabric_router::events::{EngineTracker, EventCounters};
use kvfabric_router::index::{ChainMatch, HolderId, PrefixIndex, ShardedIndex};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use zeromq::{Socket, SocketRecv, SubSocket};

const NS: &str = "wtest";
const TPB: usize = 16;

async fn node(dir: &std::path::Path) -> Result<NodeHandle> {
    node_with(dir, |_| {}).await
}

/// [`node`] with settings changed by `f`.
async fn node_with(dir: &std::path::Path, f: impl FnOnce(&mut Settings)) -> Result<NodeHandle> {
    let mut s = Settings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    s.host.capacity = ByteSize(64 << 20);
    s.disk.capacity = ByteSize(0);
    f(&mut s);
    Ok(Node::build(s).await?.start().await?)
}

fn settings(fabric: Option<&NodeHandle>) -> WorkerSettings {
    WorkerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        fabric: fabric.map(|n| n.endpoint().to_string()),
        namespace: NS.into(),
        model_config: Some(ModelConfig::tiny()),
        pool_blocks: 256,
        threads: 1,
        ..Default::default()
    }
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs raw bytes; (status, body text), bounded.
async fn post_raw(c: &Http, url: &str, body: impl Into<Bytes>) -> Result<(u16, String)> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))?;
    let fut = async {
        let r = c.request(req).await?;
        let status = r.status().as_u16();
        let b = r.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&b).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .context("request timed out")?
}

async fn post(c: &Http, url: &str, body: &Value) -> Result<(u16, Value)> {
    let (status, text) = post_raw(c, url, body.to_string()).await?;
    let v = serde_json::from_str(&text).with_context(|| format!("not JSON ({status}): {text}"))?;
    Ok((status, v))
}

async fn get(c: &Http, url: &str) -> Result<(u16, String)> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new()))?;
    let r = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await??;
    let status = r.status().as_u16();
    let b = r.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&b).into_owned()))
}

/// A successful completion.
async fn complete(c: &Http, w: &WorkerHandle, body: Value) -> Result<Value> {
    let (status, v) = post(c, &format!("{}/v1/completions", w.url()), &body).await?;
    ensure!(status == 200, "status {status}: {v}");
    Ok(v)
}

fn ids(v: &Value) -> Vec<u32> {
    v["choices"][0]["token_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect())
        .unwrap_or_default()
}

fn ext(v: &Value, field: &str) -> u64 {
    v["kvfabric"][field].as_u64().unwrap_or(u64::MAX)
}

/// What a lone engine generates greedily for `prompt`, ignoring EOS the
/// way `ignore_eos` does only when it never samples it.
fn reference(prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut e = Engine::new(Model::from_seed(&ModelConfig::tiny())?, 128)?;
    let s = e.add_sequence(prompt, &[])?;
    Ok(e.generate(&[(s, GenerationParams::greedy(n))])?.remove(0).tokens)
}

/// A long text prompt (several blocks) with a distinct head.
fn long_text(tag: &str, bytes: usize) -> String {
    let mut s = format!("[{tag}] The fabric keeps every KV block an engine computed. ");
    while s.len() < bytes {
        s.push_str("Requests that share a prefix skip its prefill. ");
    }
    s.truncate(bytes);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_streaming_chat_and_batching() -> Result<()> {
    let w = Worker::start(settings(None)).await?;
    let c = http();
    let prompt = encode("hello, worker", true);
    let want = reference(&prompt, 8)?;

    let text = complete(&c, &w, json!({"prompt": "hello, worker", "max_tokens": 8})).await?;
    assert_eq!(text["object"], "text_completion");
    assert_eq!(text["model"], "kvfabric-ref-debug");
    assert_eq!(text["usage"]["prompt_tokens"], prompt.len());
    let got = ids(&text);
    assert_eq!(got, want, "the worker generates what the engine does");
    assert_eq!(text["choices"][0]["text"], decode(&got));
    assert_eq!(text["usage"]["completion_tokens"], got.len());
    assert_eq!(text["kvfabric"]["prefill"], "local");
    assert_eq!(ext(&text, "computed_tokens") as usize, prompt.len());

    let toks = complete(
        &c,
        &w,
        json!({"model": "kvfabric-ref-debug", "prompt": prompt, "max_tokens": 8}),
    )
    .await?;
    assert_eq!(ids(&toks), want, "token ids as the prompt");
    let nested = complete(&c, &w, json!({"prompt": [prompt], "max_tokens": 8})).await?;
    assert_eq!(ids(&nested), want);

    // Streaming assembles to the same tokens and text.
    let (status, body) = post_raw(
        &c,
        &format!("{}/v1/completions", w.url()),
        json!({"prompt": "hello, worker", "max_tokens": 8, "stream": true}).to_string(),
    )
    .await?;
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut streamed = Vec::new();
    let mut streamed_text = String::new();
    let mut last = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e)?;
        streamed.extend(ids(&v));
        streamed_text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        last = v;
    }
    assert_eq!(streamed, want);
    assert_eq!(streamed_text, decode(&want));
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], want.len());

    // Chat: the router's template over byte tokens with BOS.
    let (status, chat) = post(
        &c,
        &format!("{}/v1/chat/completions", w.url()),
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    )
    .await?;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    let chat_prompt = encode("<|user|>\nhi\n<|assistant|>\n", true);
    assert_eq!(ids(&chat), reference(&chat_prompt, 4)?);
    assert_eq!(chat["choices"][0]["message"]["content"], decode(&ids(&chat)));

    // Concurrent requests are batched and each gets what a lone engine gives.
    let prompts: Vec<String> = (0..4).map(|i| long_text(&format!("batch {i}"), 40 + 20 * i)).collect();
    let futs = prompts.iter().map(|p| {
        let (c, url) = (c.clone(), w.url());
        let body = json!({"prompt": p, "max_tokens": 6, "ignore_eos": true});
        async move { post(&c, &format!("{url}/v1/completions"), &body).await }
    });
    let outs = futures::future::join_all(futs).await;
    for (p, o) in prompts.iter().zip(outs) {
        let (status, v) = o?;
        assert_eq!(status, 200, "{v}");
        let toks = ids(&v);
        assert_eq!(toks.len(), 6, "ignore_eos generates max_tokens");
        let want = reference(&encode(p, true), 6)?;
        if !want.contains(&kvfabric_engine_adapters::engine::EOS_TOKEN) {
            assert_eq!(toks, want);
        } else {
            assert_eq!(toks[..want.len()], want[..]);
        }
    }

    let (status, models) = get(&c, &format!("{}/v1/models", w.url())).await?;
    assert_eq!(status, 200);
    assert!(models.contains("kvfabric-ref-debug"));
    let (status, health) = get(&c, &format!("{}/health", w.url())).await?;
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&health)?;
    assert_eq!(h["role"], "aggregated");
    assert_eq!(h["queue_depth"], 0);
    let (_, metrics) = get(&c, &format!("{}/metrics", w.url())).await?;
    for name in [
        "kvfabric_worker_queue_depth",
        "kvfabric_worker_running_sequences",
        "kvfabric_worker_prefill_tokens_total{source=\"computed\"}",
        "kvfabric_worker_ttft_seconds_bucket",
        "kvfabric_worker_itl_seconds_bucket",
        "kvfabric_worker_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "kvfabric_worker_remote_prefill_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    let st = w.stats();
    assert_eq!(st.running, 0);
    assert!(st.requests_ok >= 9);
    w.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pool_first_then_the_fabric() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let c = http();
    let a = Worker::start(settings(Some(&node))).await?;
    let text = long_text("shared", 200);
    let prompt = encode(&text, true);
    let len = prompt.len();
    let usable = (len - 1) / TPB * TPB;
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});

    let first = complete(&c, &a, body.clone()).await?;
    assert_eq!(ext(&first, "computed_tokens") as usize, len, "cold: all computed");
    assert_eq!(ext(&first, "own_pool_tokens"), 0);
    assert_eq!(ext(&first, "fabric_tokens"), 0);
    let st = a.stats();
    assert!(
        st.fabric_blocks_stored >= (len / TPB) as u64,
        "prompt blocks stored: {st:?}"
    );

    // Same worker: the leading blocks come from its own pool.
    let second = complete(&c, &a, body.clone()).await?;
    assert_eq!(ids(&second), ids(&first));
    assert_eq!(ext(&second, "own_pool_tokens") as usize, usable);
    assert_eq!(ext(&second, "fabric_tokens"), 0, "no fabric I/O for own-pool hits");
    assert_eq!(ext(&second, "computed_tokens") as usize, len - usable);
    assert_eq!(second["usage"]["prompt_tokens_details"]["cached_tokens"], usable);
    let st = a.stats();
    assert_eq!(st.prefill_tokens_own_pool as usize, usable);
    assert_eq!(st.prefill_tokens_computed as usize, len + len - usable);
    assert_eq!(st.fabric_blocks_loaded, 0);

    // A fresh worker: the same blocks come from the fabric.
    let b = Worker::start(settings(Some(&node))).await?;
    let third = complete(&c, &b, body.clone()).await?;
    assert_eq!(ids(&third), ids(&first), "identical output from fabric blocks");
    assert_eq!(ext(&third, "fabric_tokens") as usize, usable);
    assert_eq!(ext(&third, "own_pool_tokens"), 0);
    assert_eq!(ext(&third, "computed_tokens") as usize, len - usable);
    let st = b.stats();
    assert_eq!(st.prefill_tokens_fabric as usize, usable);
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB);
    assert_eq!(st.fabric_layout_mismatches, 0);
    let (_, metrics) = get(&c, &format!("{}/metrics", b.url())).await?;
    assert!(
        metrics.contains(&format!(
            "kvfabric_worker_prefill_tokens_total{{source=\"fabric\"}} {usable}"
        )),
        "{metrics}"
    );

    // And a third time on b: now its own pool.
    let fourth = complete(&c, &b, body).await?;
    assert_eq!(ext(&fourth, "own_pool_tokens") as usize, usable);
    assert_eq!(ids(&fourth), ids(&first));
    a.shutdown().await;
    b.shutdown().await;
    node.shutdown().await;
    Ok(())
}

/// Receives KV event messages until `done` holds for what was applied.
struct Events {
    sub: SubSocket,
    tracker: EngineTracker,
    index: Arc<ShardedIndex>,
    counters: Arc<EventCounters>,
    stored: Vec<u64>,
    removed: Vec<u64>,
    cleared: bool,
}

impl Events {
    async fn connect(endpoint: &str) -> Result<Events> {
        let mut sub = SubSocket::new();
        sub.connect(endpoint).await?;
        sub.subscribe("").await?;
        let index = Arc::new(ShardedIndex::new());
        let counters = Arc::new(EventCounters::default());
        let tracker = EngineTracker::new(
            HolderId(0),
            namespace_salt(NS),
            TPB,
            index.clone() as Arc<dyn PrefixIndex>,
            counters.clone(),
        );
        Ok(Events {
            sub,
            tracker,
            index,
            counters,
            stored: Vec::new(),
            removed: Vec::new(),
            cleared: false,
        })
    }

    /// Takes one message within `wait`; false if none came.
    async fn take(&mut self, wait: Duration) -> Result<bool> {
        let Ok(msg) = tokio::time::timeout(wait, self.sub.recv()).await else {
            return Ok(false);
        };
        let msg = msg?;
        let frames: Vec<&[u8]> = msg.iter().map(|b| &b[..]).collect();
        let (topic, seq, payload) = split_frames(&frames)?;
        assert_eq!(topic, b"kv-events");
        let batch = decode_batch(&payload)?;
        assert!(batch.errors.is_empty(), "{:?}", batch.errors);
        assert_eq!(batch.dp_rank, Some(0));
        for e in &batch.events {
            match e {
                EngineEvent::BlockStored {
                    block_hashes,
                    block_size,
                    medium,
                    lora_id,
                    ..
                } => {
                    assert_eq!(*block_size, TPB);
                    assert_eq!(medium.as_deref(), Some("GPU"));
                    assert_eq!(*lora_id, None);
                    self.stored.extend(block_hashes.iter().map(|&h| h as u64));
                }
                EngineEvent::BlockRemoved { block_hashes, .. } => {
                    self.removed.extend(block_hashes.iter().map(|&h| h as u64))
                }
                EngineEvent::AllBlocksCleared { .. } => self.cleared = true,
            }
        }
        self.tracker.on_message(seq, &payload);
        Ok(true)
    }

    async fn until(&mut self, what: &str, mut done: impl FnMut(&Events) -> bool) -> Result<()> {
        for _ in 0..200 {
            if done(self) {
                return Ok(());
            }
            self.take(Duration::from_millis(50)).await?;
        }
        bail!("never saw {what}: stored {:?} removed {:?}", self.stored, self.removed)
    }

    /// Leading blocks of `tokens` the router's index holds for the worker.
    fn depth(&self, tokens: &[u32]) -> usize {
        let chain: Vec<u128> = chain_hashes(namespace_salt(NS), tokens, TPB, &[])
            .iter()
            .map(|k| u128::from_le_bytes(*k))
            .collect();
        let mut m = ChainMatch::default();
        self.index.lookup(&chain, &mut m);
        m.depth
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_name_the_blocks_the_worker_holds() -> Result<()> {
    let mut s = settings(None);
    s.kv_events = Some("tcp://127.0.0.1:0".into());
    s.pool_blocks = 24;
    let w = Worker::start(s).await?;
    let endpoint = w.kv_events_endpoint().context("events bound")?.to_string();
    assert!(endpoint.starts_with("tcp://127.0.0.1:") && !endpoint.ends_with(":0"));
    let c = http();
    let mut ev = Events::connect(&endpoint).await?;

    // A new subscription misses what was published before it was up:
    // warm up with throwaway prompts until events arrive.
    let mut up = false;
    for i in 0..50 {
        complete(
            &c,
            &w,
            json!({"prompt": long_text(&format!("warm {i}"), 20), "max_tokens": 1}),
        )
        .await?;
        if ev.take(Duration::from_millis(100)).await? {
            up = true;
            break;
        }
    }
    ensure!(up, "no KV events arrived");
    // Drain the warm-up's events; start from a cleared view.
    while ev.take(Duration::from_millis(100)).await? {}
    ev.stored.clear();
    ev.removed.clear();

    let text = long_text("events", 99);
    let prompt = encode(&text, true);
    let full = prompt.len() / TPB;
    let keys = chain_hashes(namespace_salt(NS), &prompt, TPB, &[]);
    let names: Vec<u64> = keys.iter().map(event_block_hash).collect();
    complete(&c, &w, json!({"prompt": text, "max_tokens": 8, "ignore_eos": true})).await?;
    ev.until("the prompt's blocks stored", |e| {
        names.iter().all(|n| e.stored.contains(n))
    })
    .await?;
    assert_eq!(
        ev.depth(&prompt),
        full,
        "the router's index holds the whole prompt chain"
    );
    assert_eq!(ev.counters.unknown_parent.load(Relaxed), 0);
    assert_eq!(ev.counters.malformed.load(Relaxed), 0);

    // Fill the small pool with other prompts: the oldest chain is evicted.
    for i in 0..4 {
        complete(
            &c,
            &w,
            json!({"prompt": long_text(&format!("evict {i}"), 99), "max_tokens": 8, "ignore_eos": true}),
        )
        .await?;
    }
    ev.until("the prompt's blocks removed", |e| {
        names.iter().all(|n| e.removed.contains(n))
    })
    .await?;
    let st = w.stats();
    assert!(st.evicted_blocks >= full as u64, "{st:?}");
    ev.until("the router's view to match the worker's pool", |e| {
        e.index.holder_len(HolderId(0)) == st.cached_blocks as usize
    })
    .await?;
    assert_eq!(ev.depth(&prompt), 0, "evicted blocks left the router's index");
    assert_eq!(ev.counters.unknown_parent.load(Relaxed), 0);
    assert_eq!(ev.counters.gaps.load(Relaxed), 0, "no sequence gaps");

    w.shutdown().await;
    ev.until("AllBlocksCleared at shutdown", |e| e.cleared).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_prefill_and_its_fallback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let c = http();
    let reference_worker = Worker::start(settings(None)).await?;
    let prefill = Worker::start(WorkerSettings {
        role: Role::Prefill,
        ..settings(Some(&node))
    })
    .await?;
    let decode_w = Worker::start(WorkerSettings {
        role: Role::Decode,
        prefill_workers: vec![prefill.url()],
        disagg_min_uncached_tokens: 64,
        prefill_timeout_ms: 5_000,
        ..settings(Some(&node))
    })
    .await?;

    // Long prompt: prefilled remotely, decoded here from fabric blocks.
    let text = long_text("disagg", 180);
    let prompt = encode(&text, true);
    let (len, usable) = (prompt.len(), (prompt.len() - 1) / TPB * TPB);
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});
    let want = ids(&complete(&c, &reference_worker, body.clone()).await?);
    let out = complete(&c, &decode_w, body).await?;
    assert_eq!(out["kvfabric"]["prefill"], "remote", "{out}");
    assert_eq!(ids(&out), want, "same tokens as an aggregated worker");
    assert_eq!(ext(&out, "fabric_tokens") as usize, usable);
    assert_eq!(ext(&out, "computed_tokens") as usize, len - usable);
    assert_eq!(
        prefill.stats().prefill_tokens_computed as usize,
        len,
        "the prefill worker computed it"
    );
    assert!(prefill.stats().fabric_blocks_stored as usize >= len / TPB);

    // The internal endpoint directly: block keys of every full block.
    let (status, p) = post(
        &c,
        &format!("{}/v1/prefill", prefill.url()),
        &json!({"prompt": prompt, "namespace": NS}),
    )
    .await?;
    assert_eq!(status, 200, "{p}");
    let keys: Vec<String> = chain_hashes(namespace_salt(NS), &prompt, TPB, &[])
        .iter()
        .map(hex::encode)
        .collect();
    assert_eq!(p["block_keys"], json!(keys));
    assert_eq!(
        p["cached_tokens"].as_u64(),
        Some(usable as u64),
        "its own pool this time"
    );

    // Short prompt: local.
    let short = json!({"prompt": "short one", "max_tokens": 4});
    let out = complete(&c, &decode_w, short.clone()).await?;
    assert_eq!(out["kvfabric"]["prefill"], "local");
    assert_eq!(ids(&out), ids(&complete(&c, &reference_worker, short).await?));

    // The prefill worker goes away: prefilled locally, still right.
    prefill.shutdown().await;
    let text = long_text("after the prefill worker died", 180);
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});
    let out = complete(&c, &decode_w, body.clone()).await?;
    assert_eq!(out["kvfabric"]["prefill"], "remote-failed-local", "{out}");
    assert_eq!(ids(&out), ids(&complete(&c, &reference_worker, body).await?));
    assert_eq!(ext(&out, "computed_tokens") as usize, encode(&text, true).len());

    // A prefill worker that answers errors (no fabric): the same fallback.
    let broken = Worker::start(WorkerSettings {
        role: Role::Prefill,
        ..settings(None)
    })
    .await?;
    let decode2 = Worker::start(WorkerSettings {
        role: Role::Decode,
        prefill_workers: vec![broken.url()],
        disagg_min_uncached_tokens: 64,
        ..settings(Some(&node))
    })
    .await?;
    let text = long_text("broken prefill worker", 180);
    let body = json!({"prompt": text, "max_tokens": 4});
    let out = complete(&c, &decode2, body.clone()).await?;
    assert_eq!(out["kvfabric"]["prefill"], "remote-failed-local", "{out}");
    assert_eq!(ids(&out), ids(&complete(&c, &reference_worker, body).await?));

    let st = decode_w.stats();
    assert_eq!(
        (
            st.remote_prefill_attempts,
            st.remote_prefill_successes,
            st.remote_prefill_fallbacks
        ),
        (2, 1, 1),
        "{st:?}"
    );
    decode2.shutdown().await;
    broken.shutdown().await;
    decode_w.shutdown().await;
    reference_worker.shutdown().await;
    node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_queues_requests_and_shares_prefixes() -> Result<()> {
    // 16 blocks; each request may need 8 (100 prompt + 24 generated tokens):
    // at most two run at once, the rest wait for room instead of failing.
    let w = Worker::start(WorkerSettings {
        pool_blocks: 16,
        max_batch_tokens: 128,
        ..settings(None)
    })
    .await?;
    let c = http();
    let prompts: Vec<String> = (0..6).map(|i| long_text(&format!("queue {}", i % 4), 99)).collect();
    let futs = prompts.iter().map(|p| {
        let (c, url) = (c.clone(), w.url());
        let body = json!({"prompt": p, "max_tokens": 24, "ignore_eos": true});
        async move { post(&c, &format!("{url}/v1/completions"), &body).await }
    });
    let outs = futures::future::join_all(futs).await;
    for (p, o) in prompts.iter().zip(outs) {
        let (status, v) = o?;
        assert_eq!(status, 200, "{v}");
        let want = reference(&encode(p, true), 24)?;
        assert_eq!(ids(&v)[..want.len()], want[..]);
    }
    let st = w.stats();
    assert_eq!((st.running, st.queue_depth), (0, 0));
    assert!(st.cached_blocks <= 16);
    w.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_and_the_worker_keeps_serving() -> Result<()> {
    let w = Worker::start(WorkerSettings {
        max_tokens_limit: 64,
        max_body_size: ByteSize(64 << 10),
        ..settings(None)
    })
    .await?;
    let c = http();
    let url = format!("{}/v1/completions", w.url());
    let long: Vec<u32> = vec![65; 600];
    let near: Vec<u32> = vec![65; 500];
    let cases: Vec<(String, u16, &str)> = vec![
        ("{".into(), 400, "parse the JSON"),
        ("[1,2]".into(), 400, "JSON object"),
        ("{}".into(), 400, "prompt"),
        (json!({"prompt": ""}).to_string(), 400, "empty"),
        (json!({"prompt": []}).to_string(), 400, "empty"),
        (json!({"prompt": [1, 9999]}).to_string(), 400, "vocabulary"),
        (json!({"prompt": [1, -1]}).to_string(), 400, "token ids"),
        (json!({"prompt": long}).to_string(), 400, "maximum context length"),
        (
            json!({"prompt": near, "max_tokens": 20}).to_string(),
            400,
            "maximum context length",
        ),
        (json!({"prompt": "x", "max_tokens": 65}).to_string(), 400, "at most 64"),
        (
            json!({"prompt": "x", "model": "gpt-9"}).to_string(),
            404,
            "does not exist",
        ),
        (
            json!({"prompt": "x", "temperature": "hot"}).to_string(),
            400,
            "temperature",
        ),
        (json!({"prompt": ["a", "b"]}).to_string(), 400, "one prompt"),
        (json!({"prompt": "x".repeat(100 << 10)}).to_string(), 413, "exceeds"),
    ];
    for (body, want, message) in cases {
        let (status, text) = post_raw(&c, &url, body.clone()).await?;
        assert_eq!(status, want, "{}: {text}", &body[..body.len().min(80)]);
        let v: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(message), "{}: {m}", &body[..body.len().min(80)]);
        assert!(v["error"]["type"].is_string());
    }
    let (status, text) = post_raw(&c, &format!("{}/v1/nope", w.url()), "{}").await?;
    assert_eq!(status, 404, "{text}");
    let (status, text) = post_raw(
        &c,
        &format!("{}/v1/prefill", w.url()),
        json!({"prompt": [1, 2]}).to_string(),
    )
    .await?;
    assert_eq!(status, 503, "no fabric to prefill into: {text}");
    let (status, _) = post_raw(
        &c,
        &format!("{}/v1/prefill", w.url()),
        json!({"prompt": [1, 2], "namespace": "other"}).to_string(),
    )
    .await?;
    assert_eq!(status, 400);

    // A streaming client that goes away mid-generation: its sequence ends.
    let req = hyper::Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"prompt": "going away", "max_tokens": 64, "ignore_eos": true, "stream": true}).to_string(),
        )))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await??;
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame()).await?;
    assert!(first.is_some(), "a first chunk");
    drop(body);
    let mut idle = false;
    for _ in 0..200 {
        let st = w.stats();
        if st.running == 0 && st.queue_depth == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(idle, "the abandoned sequence was dropped: {:?}", w.stats());

    // Still serving.
    let ok = complete(&c, &w, json!({"prompt": "still here", "max_tokens": 3})).await?;
    assert_eq!(ids(&ok), reference(&encode("still here", true), 3)?);
    let st = w.stats();
    assert!(st.requests_failed >= 14, "{st:?}");
    assert_eq!(st.running, 0);
    w.shutdown().await;
    Ok(())
}

/// Workers co-located with the node (`fabric-socket`): blocks are stored
/// and loaded through the node's zero-copy local path, with the same
/// output as over gRPC; a socket that does not exist falls back to gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn co_located_workers_use_the_local_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let socket = node.local_socket.clone().expect("the node serves the local path");
    let c = http();
    let local = |sock: std::path::PathBuf| WorkerSettings {
        fabric_socket: Some(sock),
        ..settings(Some(&node))
    };
    let a = Worker::start(local(socket.clone())).await?;
    let text = long_text("colocated", 200);
    let prompt = encode(&text, true);
    let usable = (prompt.len() - 1) / TPB * TPB;
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});
    let first = complete(&c, &a, body.clone()).await?;
    let st = a.stats();
    assert!(st.fabric_blocks_stored >= (prompt.len() / TPB) as u64, "{st:?}");
    assert_eq!(
        st.fabric_local_blocks_stored, st.fabric_blocks_stored,
        "stored through the arena: {st:?}"
    );

    let b = Worker::start(local(socket)).await?;
    let second = complete(&c, &b, body.clone()).await?;
    assert_eq!(
        ids(&second),
        ids(&first),
        "identical output from blocks read through the arena"
    );
    assert_eq!(ext(&second, "fabric_tokens") as usize, usable);
    let st = b.stats();
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB);
    assert_eq!(st.fabric_local_blocks_loaded, st.fabric_blocks_loaded, "{st:?}");
    let (_, metrics) = get(&c, &format!("{}/metrics", b.url())).await?;
    assert!(
        metrics.contains(&format!(
            "kvfabric_worker_fabric_local_blocks_total{{op=\"loaded\"}} {}",
            usable / TPB
        )),
        "{metrics}"
    );

    // A socket that is not there: logged, and the worker goes over gRPC.
    let d = Worker::start(local(dir.path().join("no-such.sock"))).await?;
    let third = complete(&c, &d, body).await?;
    assert_eq!(ids(&third), ids(&first));
    assert_eq!(ext(&third, "fabric_tokens") as usize, usable);
    let st = d.stats();
    assert_eq!(st.fabric_local_blocks_loaded, 0);
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB);
    for w in [a, b, d] {
        w.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

/// A fabric node that authenticates (`[auth] tokens-file`): workers acting
/// for their tenant with its token store and load KV blocks through it,
/// over gRPC (token from `fabric-token-file`) and, with a token that allows
/// it, the local path; a token without `local` gets gRPC only; a worker
/// without a token is refused, computes everything and still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticating_fabric_node_takes_the_workers_token() -> Result<()> {
    use kvfabric::auth::Token;
    use kvfabric::server::auth::{new_token, token_sha256};
    let dir = tempfile::tempdir()?;
    let (grpc, engine) = (new_token(), new_token());
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\ntenant = \"acme\"\nsha256 = {:?}\n[[token]]\ntenant = \"acme\"\nsha256 = {:?}\nlocal = true\n",
            token_sha256(&grpc),
            token_sha256(&engine)
        ),
    )?;
    let grpc_file = dir.path().join("grpc.token");
    std::fs::write(&grpc_file, format!("{}\n", grpc.secret()))?;
    let node = node_with(&dir.path().join("data"), |s| s.auth.tokens_file = Some(tokens)).await?;
    let socket = node.local_socket.clone().expect("the node serves the local path");
    let acme =
        |token: Option<Token>, file: Option<std::path::PathBuf>, sock: Option<std::path::PathBuf>| WorkerSettings {
            tenant: "acme".into(),
            fabric_token: token,
            fabric_token_file: file,
            fabric_socket: sock,
            ..settings(Some(&node))
        };
    let c = http();
    let text = long_text("auth", 200);
    let prompt = encode(&text, true);
    let (len, usable) = (prompt.len(), (prompt.len() - 1) / TPB * TPB);
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});

    // No token: every fabric call is refused; the request is computed.
    let none = Worker::start(acme(None, None, None)).await?;
    let first = complete(&c, &none, body.clone()).await?;
    assert_eq!(ext(&first, "computed_tokens") as usize, len);
    let st = none.stats();
    assert_eq!((st.fabric_blocks_stored, st.fabric_blocks_loaded), (0, 0), "{st:?}");
    let (_, m) = get(&c, &format!("{}/metrics", none.url())).await?;
    // The first refusal leaves the node alone for a cooldown (no warning
    // per request), so which calls were tried is not fixed: one was.
    assert!(
        m.lines()
            .any(|l| l.starts_with("kvfabric_worker_fabric_errors_total{op=") && !l.ends_with(" 0")),
        "{m}"
    );

    // The token that allows the local path: stored through the arena.
    let a = Worker::start(acme(Some(engine), None, Some(socket.clone()))).await?;
    let second = complete(&c, &a, body.clone()).await?;
    assert_eq!(ids(&second), ids(&first));
    let st = a.stats();
    assert!(st.fabric_blocks_stored >= (len / TPB) as u64, "{st:?}");
    assert_eq!(st.fabric_local_blocks_stored, st.fabric_blocks_stored, "{st:?}");

    // The gRPC token, from its file: loaded over gRPC.
    let b = Worker::start(acme(None, Some(grpc_file), None)).await?;
    let third = complete(&c, &b, body.clone()).await?;
    assert_eq!(ids(&third), ids(&first), "identical output from fabric blocks");
    assert_eq!(ext(&third, "fabric_tokens") as usize, usable);
    let st = b.stats();
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB, "{st:?}");

    // The gRPC token with the socket: the node refuses it the local path,
    // and the worker moves blocks over gRPC.
    let d = Worker::start(acme(Some(grpc), None, Some(socket))).await?;
    let fourth = complete(&c, &d, body).await?;
    assert_eq!(ids(&fourth), ids(&first));
    assert_eq!(ext(&fourth, "fabric_tokens") as usize, usable);
    let st = d.stats();
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB, "{st:?}");
    assert_eq!(st.fabric_local_blocks_loaded, 0, "{st:?}");
    for w in [none, a, b, d] {
        w.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

/// A fabric node that speaks TLS and wants client certificates (`[tls]`
/// with `client-ca-file`): workers trusting its CA (`fabric-ca-file`) and
/// presenting a certificate (`fabric-client-cert`, `fabric-client-key`)
/// store and load KV blocks through it over gRPC on `https://`, with
/// identical output; the local path beside it is unaffected; a worker
/// without a certificate fails the handshake, computes everything and
/// still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_fabric_node_takes_the_workers_certificate() -> Result<()> {
    use kvfabric::testutil::write_test_certificates;
    use kvfabric::tls::ClientTls;
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    write_test_certificates(&certs);
    let node = node_with(&dir.path().join("data"), |s| {
        s.tls.cert_file = Some(certs.join("server.pem"));
        s.tls.key_file = Some(certs.join("server.key"));
        s.tls.client_ca_file = Some(certs.join("ca.pem"));
    })
    .await?;
    ensure!(node.endpoint().starts_with("https://"), "{}", node.endpoint());
    let socket = node.local_socket.clone().expect("the node serves the local path");
    let (ca, cert, key) = (certs.join("ca.pem"), certs.join("client.pem"), certs.join("client.key"));
    // The files, read at start (settings not made by `load`).
    let with_files = |client_cert: bool| WorkerSettings {
        fabric_ca_file: Some(ca.clone()),
        fabric_client_cert: client_cert.then(|| cert.clone()),
        fabric_client_key: client_cert.then(|| key.clone()),
        ..settings(Some(&node))
    };
    let c = http();
    let text = long_text("tls", 200);
    let prompt = encode(&text, true);
    let (len, usable) = (prompt.len(), (prompt.len() - 1) / TPB * TPB);
    let body = json!({"prompt": text, "max_tokens": 8, "ignore_eos": true});

    // No client certificate: the handshake fails, the request is computed.
    let none = Worker::start(with_files(false)).await?;
    let first = complete(&c, &none, body.clone()).await?;
    assert_eq!(ext(&first, "computed_tokens") as usize, len);
    let st = none.stats();
    assert_eq!((st.fabric_blocks_stored, st.fabric_blocks_loaded), (0, 0), "{st:?}");
    let (_, m) = get(&c, &format!("{}/metrics", none.url())).await?;
    assert!(
        m.lines()
            .any(|l| l.starts_with("kvfabric_worker_fabric_errors_total{op=") && !l.ends_with(" 0")),
        "{m}"
    );

    // With a certificate: stored over gRPC.
    let a = Worker::start(with_files(true)).await?;
    let second = complete(&c, &a, body.clone()).await?;
    assert_eq!(ids(&second), ids(&first));
    let st = a.stats();
    assert!(st.fabric_blocks_stored >= (len / TPB) as u64, "{st:?}");
    assert_eq!(st.fabric_local_blocks_stored, 0, "{st:?}");

    // TLS settings made in code: loaded over gRPC, identical output.
    let tls = ClientTls::from_files(&ca, Some(&cert), Some(&key)).map_err(anyhow::Error::msg)?;
    let b = Worker::start(WorkerSettings {
        fabric_tls: Some(tls.clone()),
        ..settings(Some(&node))
    })
    .await?;
    let third = complete(&c, &b, body.clone()).await?;
    assert_eq!(ids(&third), ids(&first), "identical output from fabric blocks");
    assert_eq!(ext(&third, "fabric_tokens") as usize, usable);
    let st = b.stats();
    assert_eq!(st.fabric_blocks_loaded as usize, usable / TPB, "{st:?}");

    // With the node's socket too: the bytes move through the local path,
    // which TLS leaves alone (`ExistsPrefix` still on gRPC, over TLS).
    let d = Worker::start(WorkerSettings {
        fabric_tls: Some(tls),
        fabric_socket: Some(socket),
        ..settings(Some(&node))
    })
    .await?;
    let fourth = complete(&c, &d, body).await?;
    assert_eq!(ids(&fourth), ids(&first));
    assert_eq!(ext(&fourth, "fabric_tokens") as usize, usable);
    let st = d.stats();
    assert_eq!(st.fabric_local_blocks_loaded as usize, usable / TPB, "{st:?}");
    for w in [none, a, b, d] {
        w.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

/// The binary reads the fabric TLS files at load: an `https://` fabric
/// without `--fabric-ca-file`, a CA file that is missing or holds no
/// certificate, and a client certificate without its key stop it with a
/// message naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fabric_tls_settings_stop_the_binary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n")?;
    let key = key.to_str().context("utf-8 path")?;
    for (args, ca, want) in [
        (&["--fabric", "https://127.0.0.1:1"][..], "", "set fabric-ca-file"),
        (&[][..], "/no/such/ca.pem", "fabric-ca-file /no/such/ca.pem"),
        (&[][..], key, "fabric-ca-file"),
        (&["--fabric-client-cert", key][..], "", "fabric-client-key go together"),
    ] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfabric-worker"));
        match ca {
            "" => cmd.env_remove("KVFABRIC_WORKER_FABRIC_CA_FILE"),
            ca => cmd.env("KVFABRIC_WORKER_FABRIC_CA_FILE", ca),
        };
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("KVFABRIC_TOKEN")
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .context("the worker did not stop")??;
        ensure!(!out.status.success(), "{out:?}");
        ensure!(String::from_utf8_lossy(&out.stderr).contains(want), "{out:?}");
    }
    Ok(())
}

/// The binary reads the fabric token at load: a `--fabric-token-file` that
/// is missing, or a `$KVFABRIC_TOKEN` that is no token, stops it with a
/// message naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_fabric_token_stops_the_binary() -> Result<()> {
    for (args, env, want) in [
        (&["--fabric-token-file", "/no/such/token"][..], "", "fabric-token-file"),
        (&[][..], "too-short", "$KVFABRIC_TOKEN"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfabric-worker"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("KVFABRIC_TOKEN", env)
            .env_remove("RUST_LOG")
            .output()
            .await?;
        ensure!(!out.status.success(), "{out:?}");
        ensure!(String::from_utf8_lossy(&out.stderr).contains(want), "{out:?}");
    }
    Ok(())
}

/// A fabric node that accepts connections but never answers (stuck, or a
/// half-dead host) does not stall the worker: each fabric call gives up
/// after `fabric-timeout-ms`, the node is then left alone for a cooldown,
/// and every request is answered, computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_fabric_node_does_not_stall_requests() -> Result<()> {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = silent.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let start = Worker::start(WorkerSettings {
        fabric: Some(format!("http://{addr}")),
        fabric_timeout_ms: 300,
        ..settings(None)
    });
    let w = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .context("the worker starts beside a silent node")??;
    let c = http();
    for i in 0..4 {
        if i == 2 {
            // Past the first cooldown: the node is tried (and waited for) again.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let text = long_text(&format!("silent node {i}"), 100);
        let body = json!({"prompt": text, "max_tokens": 4, "ignore_eos": true});
        let out = tokio::time::timeout(Duration::from_secs(20), complete(&c, &w, body))
            .await
            .with_context(|| format!("request {i} was not answered"))??;
        assert_eq!(ids(&out), reference(&encode(&text, true), 4)?);
        assert_eq!(ext(&out, "fabric_tokens"), 0, "{out}");
    }
    let (_, metrics) = get(&c, &format!("{}/metrics", w.url())).await?;
    assert!(
        metrics.contains("kvfabric_worker_fabric_errors_total{op="),
        "the timeouts are counted: {metrics}"
    );
    w.shutdown().await;
    holder.abort();
    Ok(())
}

/// `/v1/prefill` answers 503 `fabric_unavailable` when the prefill
/// worker's fabric node cannot be reached, instead of block keys of blocks
/// it never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_without_a_reachable_fabric_is_503() -> Result<()> {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let w = Worker::start(WorkerSettings {
        role: Role::Prefill,
        fabric: Some(format!("http://{closed}")),
        fabric_timeout_ms: 1000,
        ..settings(None)
    })
    .await?;
    let c = http();
    let prompt = encode(&long_text("unreachable", 100), true);
    let (status, v) = post(
        &c,
        &format!("{}/v1/prefill", w.url()),
        &json!({"prompt": prompt, "namespace": NS}),
    )
    .await?;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "fabric_unavailable", "{v}");
    // Completions are still served, computed here.
    let out = complete(&c, &w, json!({"prompt": prompt, "max_tokens": 2})).await?;
    assert_eq!(ids(&out), reference(&prompt, 2)?);
    w.shutdown().await;
    Ok(())
}

/// A fabric block that is found but does not import (here: NaNs) is
/// computed, and the computed block replaces the bad copy in the fabric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fabric_block_that_does_not_import_is_stored_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node(dir.path()).await?;
    let client = kvfabric::client::Client::connect(node.endpoint()).await?;
    let layout = Engine::new(Model::from_seed(&ModelConfig::tiny())?, 4)?
        .kv_layout()
        .clone();
    let text = long_text("bad block", 100);
    let prompt = encode(&text, true);
    let key0 = Bytes::copy_from_slice(&chain_hashes(namespace_salt(NS), &prompt, TPB, &[])[0]);
    let nan = f32::NAN.to_le_bytes().repeat(layout.block_bytes() / 4);
    client
        .put_many(
            NS,
            vec![kvfabric::client::PutObject {
                key: key0.clone(),
                value: Bytes::from(nan.clone()),
                layout: Some(kvfabric_engine_adapters::fabric_kv::wire_layout(&layout)),
            }],
            kvfabric::client::Durability::Memory,
        )
        .await?;
    let w = Worker::start(settings(Some(&node))).await?;
    let c = http();
    let out = complete(&c, &w, json!({"prompt": text, "max_tokens": 2})).await?;
    assert_eq!(ids(&out), reference(&prompt, 2)?);
    assert_eq!(ext(&out, "fabric_tokens"), 0, "the bad block was not used: {out}");
    let got = client.get(NS, key0).await?.context("block 0 is in the fabric")?;
    assert!(got.value[..] != nan[..], "the bad copy was replaced");
    assert!(
        got.value
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        "by the computed block"
    );
    w.shutdown().await;
    node.shutdown().await;
    Ok(())
}

/// Sends a request's head and the start of its body, then nothing.
async fn stalled_body(addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: w\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\":",
    )
    .await?;
    Ok(s)
}

/// A body that stops arriving gets 408 after `body-timeout-ms`, with an
/// OpenAI error body; and a shutdown waits for such a client (or any
/// request) no longer than `shutdown-timeout-ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_and_do_not_hold_up_shutdown() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let w = Worker::start(WorkerSettings {
        body_timeout_ms: 300,
        ..settings(None)
    })
    .await?;
    let mut s = stalled_body(w.local_addr()).await?;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            got.extend_from_slice(&buf[..n]);
            if n == 0 || String::from_utf8_lossy(&got).contains("request_timeout") {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .context("no answer to a stalled body")??;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or_default()).with_context(|| text.to_string())?;
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let still = complete(&http(), &w, json!({"prompt": "after", "max_tokens": 2})).await?;
    assert_eq!(ids(&still), reference(&encode("after", true), 2)?);
    w.shutdown().await;

    let w = Worker::start(WorkerSettings {
        body_timeout_ms: 600_000,
        shutdown_timeout_ms: 300,
        ..settings(None)
    })
    .await?;
    let _held = stalled_body(w.local_addr()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(20), w.shutdown())
        .await
        .context("shutdown waited on the stalled request")?;
    Ok(())
}
