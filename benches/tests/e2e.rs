//! End to end, as real processes on loopback: one fabric node
//! (`kvfabric serve`), the KV-aware router (`kvfabric-router`), two
//! aggregated workers and a prefill/decode pair (`kvfabric-worker`), each
//! started from its binary with its command-line flags (the router from a
//! TOML file, as an operator would: workers with their ZMQ KV-event
//! endpoints, the fabric node whose `Subscribe` stream it follows). The
//! model is the reference engine's small test model (`ModelConfig::tiny()`
//! with a longer context), given to the workers as a model config file.
//!
//! What it checks, all on numbers the processes report (response headers,
//! the responses' `kvfabric` objects, `/metrics`), never on wall-clock
//! speed:
//!
//! 1. **Routing by prefix.** Several long documents, each followed by
//!    different questions. The first request of each document goes through
//!    the router wherever it likes (in-flight load spreads them over both
//!    workers); every later request with that document's prefix must land
//!    on the worker that served it (`x-kvfabric-worker`) and reuse the
//!    document's blocks from that worker's own pool.
//! 2. **Prefill tokens computed drop accordingly.** Each response's
//!    `computed_tokens` / `own_pool_tokens` / `fabric_tokens` equal what the
//!    workload's shared prefixes predict (16-token blocks of the longest
//!    prefix shared with anything served before); their sum, the workers'
//!    `prefill_tokens_total` counters and the router's
//!    `prefill_tokens_saved_total` all show the same saving: exactly the
//!    repeated requests times the document blocks times 16 tokens below
//!    computing every prompt from scratch. A document sent to the worker
//!    that does not hold it loads its blocks from the fabric instead. Every
//!    output equals a from-scratch greedy generation in this process.
//! 3. **Disaggregation.** A long uncached prompt sent to the decode worker
//!    is prefilled on the prefill worker (`"prefill": "remote"`, its blocks
//!    loaded from the fabric, the prefill worker's counters show the
//!    compute), and its tokens equal those of an aggregated worker and of
//!    the from-scratch reference; a short prompt stays local.
//! 4. **A worker killed mid-run.** Long generations in flight on both
//!    aggregated workers (streams, whose `x-kvfabric-worker` header says
//!    where each went, plus two non-streamed requests located through the
//!    router's in-flight gauges); SIGKILL one worker: exactly its in-flight
//!    requests fail, with the router's error naming it (an SSE error event
//!    for streams, a 502 otherwise) and none hangs; the other worker's
//!    requests complete in full, and requests sent afterwards all go to the
//!    survivor and succeed.
//!
//! The decode worker is not behind the router (the router has no notion of
//! roles; a decode worker behind it would be one more aggregated-looking
//! candidate), so the disaggregated request goes to it directly.
//!
//! Ordering, as it is with these binaries: a fabric namespace exists from
//! its first put, so one request goes straight to worker `a` before the
//! router starts (its `Subscribe` stream would otherwise retry with backoff
//! until then); a ZMQ subscriber only gets what is published after its
//! subscription reached the publisher, so a short warm-up request per worker
//! is repeated until the router has applied its events. Between routed
//! requests the test waits (bounded) until the router's
//! `events_total{counter="blocks_stored"}` has grown by the blocks the
//! workers report cached (one `BlockStored` each) plus those they put into
//! the fabric (one STORED event each), so every decision sees the blocks
//! placed before it.
//!
//! The binaries are taken from the directory of this package's own binary
//! (`cargo test --workspace` builds them there); a missing one is built with
//! `$CARGO build` in the same profile. Every wait is bounded and every child
//! process is killed and reaped when the test ends, panics included.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kvfabric_engine_adapters::engine::{EOS_TOKEN, Engine, Model, ModelConfig, argmax, encode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Fabric namespace of every worker and the router.
const NS: &str = "e2e";
/// Tokens per KV block (the model's).
const TPB: usize = 16;
/// Shared documents, 16-token blocks per document (BOS included), requests
/// per document.
const DOCS: usize = 4;
const DOC_BLOCKS: usize = 8;
const QUESTIONS: usize = 3;
/// Tokens generated by each document's first request: long enough that it
/// is still running when the next document is routed (its load steers that
/// one to the other worker).
const FIRST_TOKENS: usize = 1000;
/// Tokens generated by the later requests.
const SHORT_TOKENS: usize = 8;
/// Tokens asked of each request in flight when a worker is killed: seconds
/// of decoding, so the kill lands well inside every one of them.
const LONG_TOKENS: usize = 3000;
/// Context of the test model (`ModelConfig::tiny()` has 512).
const MAX_CONTEXT: usize = 4096;
/// The decode worker prefills remotely from this many uncached tokens.
const DISAGG_MIN_UNCACHED: usize = 64;

// ---------------------------------------------------------------- binaries

/// The workspace binary `name` of `package`, next to this package's own
/// binary; built there (same profile) when missing.
fn binary(name: &str, package: &str) -> PathBuf {
    let own = PathBuf::from(env!("CARGO_BIN_EXE_kvfabric-bench"));
    let dir = own.parent().expect("the binary directory").to_path_buf();
    let exe = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if exe.is_file() {
        return exe;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = dir.parent().expect("the target directory");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", package, "--bin", name, "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match dir.file_name().and_then(|s| s.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    eprintln!("# {} is missing: running {cmd:?}", exe.display());
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run {cargo} to build {name} (package {package}): {e}"));
    assert!(
        status.success() && exe.is_file(),
        "building {name} (package {package}) into {} failed ({status}); build it first with \
         `cargo build -p {package} --bin {name}` (or run `cargo test --workspace`)",
        dir.display()
    );
    exe
}

// ---------------------------------------------------------------- processes

/// A child process, killed and reaped when dropped; its stderr goes to a
/// log file whose tail is printed when the test is failing.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    first_line: Option<mpsc::Receiver<String>>,
}

impl Proc {
    /// Starts `bin args...`; stdout is read for the first line (the address
    /// the process prints), stderr goes to `<dir>/<name>.log`.
    fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info");
        // Flags say everything; settings from this environment must not leak in.
        for (k, _) in std::env::vars() {
            if k.starts_with("KVFABRIC_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line.trim().to_string());
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        Ok(Proc {
            name: name.into(),
            child,
            log,
            first_line: Some(rx),
        })
    }

    /// The first line the process printed on stdout, within `limit`.
    fn first_line(&mut self, limit: Duration) -> Result<String> {
        let rx = self.first_line.take().context("first line already read")?;
        match rx.recv_timeout(limit) {
            Ok(l) if !l.is_empty() => Ok(l),
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.try_wait().ok().flatten();
                bail!(
                    "{} printed no address (exit: {st:?}); log:\n{}",
                    self.name,
                    self.log_tail(40)
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "{} printed no address within {limit:?}; log:\n{}",
                    self.name,
                    self.log_tail(40)
                )
            }
        }
    }

    /// Whether it has exited.
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every child of the test. Dropping it kills and reaps them all and, unless
/// the test passed, prints the end of each one's log.
#[derive(Default)]
struct Procs {
    list: Vec<Proc>,
    passed: bool,
}

impl Procs {
    fn named(&mut self, name: &str) -> &mut Proc {
        self.list.iter_mut().find(|p| p.name == name).expect("a known process")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.list {
            p.kill();
        }
        if !self.passed {
            for p in &self.list {
                eprintln!(
                    "----- {} (last lines of {})\n{}",
                    p.name,
                    p.log.display(),
                    p.log_tail(30)
                );
            }
        }
    }
}

/// A free loopback port (bound and released; the node takes it right away).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One started worker.
#[derive(Debug, Clone)]
struct WorkerInfo {
    /// Name (the router's, for the aggregated ones).
    name: String,
    /// `http://127.0.0.1:PORT`.
    url: String,
    /// Its ZMQ PUB endpoint, when it publishes KV events.
    events: Option<String>,
}

/// Where everything runs.
struct Cluster {
    node_url: String,
    router_url: String,
    /// Aggregated workers `a` and `b`, then `prefill`, then `decode`.
    workers: Vec<WorkerInfo>,
    model: ModelConfig,
}

/// `kvfabric-worker (ROLE) listening on URL[, KV events on ENDPOINT]`.
fn parse_worker_line(name: &str, line: &str) -> Result<WorkerInfo> {
    let rest = line
        .split_once("listening on ")
        .with_context(|| format!("unexpected first line from {name}: {line:?}"))?
        .1;
    let (url, events) = match rest.split_once(", KV events on ") {
        Some((u, e)) => (u.trim(), Some(e.trim().to_string())),
        None => (rest.trim(), None),
    };
    ensure!(url.starts_with("http://127.0.0.1:"), "{name}: bad URL in {line:?}");
    Ok(WorkerInfo {
        name: name.into(),
        url: url.into(),
        events,
    })
}

impl Cluster {
    /// Starts every process (into `procs`, files under `dir`). The first
    /// request, straight to worker `a`, creates the fabric namespace (a
    /// namespace exists from its first put; the router's subscription to it
    /// retries until then), so the router starts after it.
    async fn start(c: &Http, procs: &mut Procs, dir: &Path, history: &mut History) -> Result<Cluster> {
        let fabric_bin = binary("kvfabric", "kvfabric");
        let router_bin = binary("kvfabric-router", "kvfabric-router");
        let worker_bin = binary("kvfabric-worker", "kvfabric-engine-adapters");
        let model = ModelConfig {
            max_context: MAX_CONTEXT,
            ..ModelConfig::tiny()
        };
        let model_file = dir.join("model.toml");
        std::fs::write(&model_file, model.to_toml_string()?)?;

        // The fabric node: host memory only, on a free port (retried if the
        // port was taken in between).
        let mut node_url = None;
        for attempt in 0..3 {
            let port = free_port()?;
            let url = format!("http://127.0.0.1:{port}");
            let args: Vec<String> = [
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
                &dir.join("node").display().to_string(),
                "--host-capacity",
                "64MiB",
                "--disk-capacity",
                "0",
                "--node-id",
                "e2e-node",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs
                .list
                .push(Proc::spawn(&format!("node-{attempt}"), &fabric_bin, &args, dir)?);
            let p = procs.list.last_mut().expect("just pushed");
            let deadline = Instant::now() + Duration::from_secs(30);
            let up = loop {
                if p.exited() {
                    break false;
                }
                let ok = async {
                    let cl = kvfabric::client::Client::connect(url.clone()).await.ok()?;
                    cl.stats().await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break true;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the fabric node never answered on {url}; log:\n{}",
                    p.log_tail(40)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if up {
                node_url = Some(url);
                break;
            }
        }
        let node_url = node_url.context("the fabric node did not start (3 attempts)")?;

        // Workers: all on the node, same namespace and model.
        let common = |role: &str| -> Vec<String> {
            [
                "--role",
                role,
                "--listen",
                "127.0.0.1:0",
                "--fabric",
                &node_url,
                "--namespace",
                NS,
                "--model",
                &model_file.display().to_string(),
                "--pool-blocks",
                "2048",
                "--threads",
                "1",
                "--max-tokens-limit",
                &MAX_CONTEXT.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let up = Duration::from_secs(60);
        for name in ["a", "b"] {
            let mut args = common("aggregated");
            args.extend(["--kv-events".into(), "tcp://127.0.0.1:0".into()]);
            procs
                .list
                .push(Proc::spawn(&format!("worker-{name}"), &worker_bin, &args, dir)?);
        }
        procs
            .list
            .push(Proc::spawn("worker-prefill", &worker_bin, &common("prefill"), dir)?);
        let prefill = parse_worker_line("prefill", &procs.named("worker-prefill").first_line(up)?)?;
        let mut args = common("decode");
        args.extend([
            "--prefill-worker".into(),
            prefill.url.clone(),
            "--disagg-min-uncached-tokens".into(),
            DISAGG_MIN_UNCACHED.to_string(),
        ]);
        procs.list.push(Proc::spawn("worker-decode", &worker_bin, &args, dir)?);
        let decode = parse_worker_line("decode", &procs.named("worker-decode").first_line(up)?)?;
        let mut workers = Vec::new();
        for name in ["a", "b"] {
            let line = procs.named(&format!("worker-{name}")).first_line(up)?;
            let w = parse_worker_line(name, &line)?;
            ensure!(w.events.is_some(), "worker {name} publishes no KV events: {w:?}");
            workers.push(w);
        }
        workers.push(prefill);
        workers.push(decode);

        // The router, from a config file: the aggregated workers with their
        // event publishers, co-located with the fabric node it follows.
        let kv_bytes_per_token = model.num_layers * 2 * model.num_kv_heads * model.head_dim() * 4;
        let mut cfg = format!(
            "listen = \"127.0.0.1:0\"\nnamespace = \"{NS}\"\nmodels = [\"{}\"]\n\
             health-interval-ms = 200\nhealth-timeout-ms = 2000\nrequest-timeout-ms = 60000\n\
             fabric = [{{ url = \"{node_url}\", name = \"node\" }}]\n\
             [cost]\nblock-tokens = {TPB}\nkv-bytes-per-token = {kv_bytes_per_token}\n",
            model.model_id
        );
        for w in &workers[..2] {
            cfg.push_str(&format!(
                "[[workers]]\nname = \"{}\"\nurl = \"{}\"\nkv-events = \"{}\"\nfabric-node = \"node\"\n",
                w.name,
                w.url,
                w.events.as_deref().unwrap_or_default()
            ));
        }
        // The namespace's first blocks.
        let prompt: Vec<u32> = (0..40).map(|i| (i * 5 % 200) as u32).collect();
        let r = complete(c, &workers[0].url, &json!({"prompt": prompt, "max_tokens": 2})).await?;
        history.record("a", &prompt, &r.ids());

        let cfg_file = dir.join("router.toml");
        std::fs::write(&cfg_file, cfg)?;
        let args = vec!["--config".to_string(), cfg_file.display().to_string()];
        procs.list.push(Proc::spawn("router", &router_bin, &args, dir)?);
        let line = procs.named("router").first_line(up)?;
        let router_url = line
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .with_context(|| format!("unexpected first line from the router: {line:?}"))?
            .to_string();

        let cluster = Cluster {
            node_url,
            router_url,
            workers,
            model,
        };
        cluster.wait_router_ready(c).await?;
        Ok(cluster)
    }

    fn worker(&self, name: &str) -> &WorkerInfo {
        self.workers.iter().find(|w| w.name == name).expect("a known worker")
    }

    /// Both workers healthy, both event publishers and the fabric stream
    /// connected, the fabric's snapshot applied.
    async fn wait_router_ready(&self, c: &Http) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, m) = get(c, &format!("{}/metrics", self.router_url)).await?;
            let in_fabric = event_mark(c, self).await?.fabric_stored;
            let ready = status == 200
                && metric(&m, "kvfabric_router_events_total", &[("counter", "blocks_stored")]) >= in_fabric
                && ["a", "b"]
                    .iter()
                    .all(|w| metric(&m, "kvfabric_router_worker_healthy", &[("worker", w)]) == 1.0)
                && ["engine:a", "engine:b", "fabric:node"]
                    .iter()
                    .all(|s| metric(&m, "kvfabric_router_event_stream_connected", &[("source", s)]) == 1.0);
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the router never saw both workers healthy and every event stream connected:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------- HTTP

type Http = Client<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A whole (non-streamed) answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// `x-kvfabric-worker`, set by the router.
    worker: Option<String>,
    body: Value,
}

impl Reply {
    fn ids(&self) -> Vec<u32> {
        token_ids(&self.body["choices"][0]["token_ids"])
    }
    fn ext(&self, field: &str) -> u64 {
        self.body["kvfabric"][field].as_u64().unwrap_or(u64::MAX)
    }
    fn prompt_tokens(&self) -> u64 {
        self.body["usage"]["prompt_tokens"].as_u64().unwrap_or(u64::MAX)
    }
}

fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect())
        .unwrap_or_default()
}

/// POSTs JSON, reads the whole answer (bounded).
async fn post(c: &Http, url: &str, body: &Value, limit: Duration) -> Result<Reply> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let fut = async {
        let r = c.request(req).await?;
        let status = r.status().as_u16();
        let worker = r
            .headers()
            .get("x-kvfabric-worker")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let b = r.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&b)
            .with_context(|| format!("not JSON ({status}): {}", String::from_utf8_lossy(&b)))?;
        anyhow::Ok(Reply { status, worker, body })
    };
    tokio::time::timeout(limit, fut)
        .await
        .with_context(|| format!("POST {url} got no answer within {limit:?}"))?
}

/// A successful completion.
async fn complete(c: &Http, url: &str, body: &Value) -> Result<Reply> {
    let r = post(c, &format!("{url}/v1/completions"), body, Duration::from_secs(60)).await?;
    ensure!(r.status == 200, "{url}: status {}: {}", r.status, r.body);
    Ok(r)
}

async fn get(c: &Http, url: &str) -> Result<(u16, String)> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new()))?;
    let fut = async {
        let r = c.request(req).await?;
        let status = r.status().as_u16();
        let b = r.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&b).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("GET {url} got no answer within 10 s"))?
}

async fn metrics(c: &Http, base: &str) -> Result<String> {
    let (status, m) = get(c, &format!("{base}/metrics")).await?;
    ensure!(status == 200, "{base}/metrics: {status}");
    Ok(m)
}

/// Sum of the samples of `name` whose labels include `labels` (0 if none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some(x) => x,
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let has = |k: &str, v: &str| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
        if labels.iter().all(|(k, v)| has(k, v)) {
            sum += value.trim().parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    sum
}

/// How a streamed completion ended.
#[derive(Debug, Default)]
struct StreamEnd {
    token_ids: Vec<u32>,
    /// The chunk with `finish_reason` (it carries `usage` and `kvfabric`).
    last: Option<Value>,
    /// An `{"error": ...}` event.
    error: Option<Value>,
    /// `data: [DONE]` came.
    done: bool,
    /// The connection broke or stalled (never expected: the router turns
    /// worker failures into error events).
    broken: Option<String>,
}

/// A streamed completion in flight.
struct Streamed {
    worker: String,
    first_token: oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<StreamEnd>,
}

/// Sends a streamed completion through the router; returns once the
/// response headers (which name the worker) are in.
async fn stream(c: &Http, router: &str, body: &Value) -> Result<Streamed> {
    let req = hyper::Request::post(format!("{router}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .context("no response headers within 30 s")??;
    let status = resp.status().as_u16();
    let worker = resp
        .headers()
        .get("x-kvfabric-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status != 200 {
        let b = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await;
        let text = match b {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            _ => String::new(),
        };
        bail!("streamed request answered {status}: {text}");
    }
    let (tx, first_token) = oneshot::channel();
    let task = tokio::spawn(read_sse(resp.into_body(), tx));
    Ok(Streamed {
        worker,
        first_token,
        task,
    })
}

async fn read_sse(mut body: hyper::body::Incoming, first: oneshot::Sender<()>) -> StreamEnd {
    let mut first = Some(first);
    let mut buf: Vec<u8> = Vec::new();
    let mut end = StreamEnd::default();
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
            Err(_) => {
                end.broken = Some("no data for 60 s".into());
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                end.broken = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..i + 2).collect();
            let ev = String::from_utf8_lossy(&ev);
            for d in ev.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if d == "[DONE]" {
                    end.done = true;
                    continue;
                }
                match serde_json::from_str::<Value>(d) {
                    Ok(v) if v.get("error").is_some() => end.error = Some(v),
                    Ok(v) => {
                        let ids = token_ids(&v["choices"][0]["token_ids"]);
                        if !ids.is_empty()
                            && let Some(tx) = first.take()
                        {
                            let _ = tx.send(());
                        }
                        end.token_ids.extend(ids);
                        if !v["choices"][0]["finish_reason"].is_null() {
                            end.last = Some(v);
                        }
                    }
                    Err(e) => end.broken = Some(format!("bad SSE data {d:?}: {e}")),
                }
            }
        }
    }
    end
}

async fn finish(s: Streamed) -> Result<StreamEnd> {
    tokio::time::timeout(Duration::from_secs(120), s.task)
        .await
        .context("a stream did not end within 120 s")?
        .context("the stream reader panicked")
}

// ---------------------------------------------------------------- workload

/// A deterministic text of exactly `n` bytes for document `d` (its first
/// block differs from every other document's).
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

/// Document `d` (BOS plus its bytes fill `DOC_BLOCKS` blocks exactly) and
/// question `q`.
fn doc_prompt(d: usize, q: usize) -> String {
    let doc = document(d, DOC_BLOCKS * TPB - 1);
    format!("{doc}Question {q}: what does part {q} of document {d} say about caching?")
}

/// What a lone engine generates greedily for `prompt` from scratch (up to
/// `n` tokens; stopping after EOS unless `ignore_eos`), as the workers'
/// `ignore_eos` and greedy sampling do.
fn reference(model: &ModelConfig, prompt: &[u32], n: usize, ignore_eos: bool) -> Result<Vec<u32>> {
    let blocks = (prompt.len() + n).div_ceil(TPB) + 1;
    let mut e = Engine::new(Model::from_seed(model)?, blocks)?;
    let s = e.add_sequence(prompt, &[])?;
    let mut logits = e.prefill(&[s])?.remove(0);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let t = argmax(&logits)?;
        out.push(t);
        if (t == EOS_TOKEN && !ignore_eos) || out.len() == n {
            break;
        }
        logits = e.decode_step(&[(s, t)])?.remove(0);
    }
    Ok(out)
}

/// Everything served so far, per worker, as the token sequences whose full
/// blocks the worker cached and stored in the fabric (prompt plus generated
/// tokens but the last, which is never fed back).
#[derive(Debug, Default)]
struct History {
    by_worker: HashMap<String, Vec<Vec<u32>>>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl History {
    fn record(&mut self, worker: &str, prompt: &[u32], generated: &[u32]) {
        let mut s = prompt.to_vec();
        s.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
        self.by_worker.entry(worker.into()).or_default().push(s);
    }

    /// Leading full blocks of `prompt` found in `seqs` (at most the blocks
    /// a prefill may reuse: the last prompt token is always computed).
    fn blocks<'a>(prompt: &[u32], seqs: impl Iterator<Item = &'a Vec<u32>>) -> usize {
        let usable = prompt.len().saturating_sub(1) / TPB;
        let best = seqs
            .map(|s| common_prefix(prompt, s).min(s.len() / TPB * TPB) / TPB)
            .max()
            .unwrap_or(0);
        best.min(usable)
    }

    /// (tokens from `worker`'s own pool, tokens from the fabric) that a
    /// request of `prompt` on `worker` should reuse: its own pool first,
    /// then the fabric, which holds every block anyone computed.
    fn expect(&self, worker: &str, prompt: &[u32]) -> (u64, u64) {
        let own = Self::blocks(prompt, self.by_worker.get(worker).into_iter().flatten());
        let all = Self::blocks(prompt, self.by_worker.values().flatten());
        ((own * TPB) as u64, ((all - own.min(all)) * TPB) as u64)
    }
}

/// One answered completion, as checked by [`check_completion`].
struct Served<'a> {
    what: String,
    worker: &'a str,
    prompt: &'a [u32],
    max_tokens: usize,
    ignore_eos: bool,
    ids: Vec<u32>,
    /// The response's `kvfabric` object.
    ext: &'a Value,
    /// The response's `usage` object.
    usage: &'a Value,
}

/// Checks a completion's accounting against `history` (the tokens its
/// worker's own pool and the fabric should have supplied, the rest
/// computed) and its tokens against the from-scratch reference, then
/// records it.
fn check_completion(model: &ModelConfig, history: &mut History, s: Served<'_>) -> Result<()> {
    let (what, worker, prompt) = (&s.what, s.worker, s.prompt);
    let (own, fabric) = history.expect(worker, prompt);
    let p = prompt.len() as u64;
    ensure!(
        s.usage["prompt_tokens"].as_u64() == Some(p),
        "{what}: prompt_tokens {} but the prompt has {p} tokens (BOS + bytes)",
        s.usage["prompt_tokens"]
    );
    let got = (
        s.ext["own_pool_tokens"].as_u64(),
        s.ext["fabric_tokens"].as_u64(),
        s.ext["computed_tokens"].as_u64(),
    );
    ensure!(
        got == (Some(own), Some(fabric), Some(p - own - fabric)),
        "{what} on worker {worker}: (own pool, fabric, computed) = {got:?}, expected ({own}, {fabric}, {})",
        p - own - fabric
    );
    let want = reference(model, prompt, s.max_tokens, s.ignore_eos)?;
    ensure!(s.ids == want, "{what}: tokens differ from a from-scratch generation");
    history.record(worker, prompt, &s.ids);
    Ok(())
}

// ---------------------------------------------------------------- events

/// What the router's event counter should reach once it has applied every
/// KV event the aggregated workers published and every fabric event the
/// node emitted since a snapshot.
#[derive(Debug, Clone, Copy)]
struct EventMark {
    /// The router's `events_total{counter="blocks_stored"}`.
    router_stored: f64,
    /// Blocks in the aggregated workers' own caches (each entered with a
    /// `BlockStored` event; nothing is evicted here: the pools are large).
    cached: f64,
    /// Blocks every worker put into the fabric (one STORED event each).
    fabric_stored: f64,
}

async fn event_mark(c: &Http, cl: &Cluster) -> Result<EventMark> {
    let r = metrics(c, &cl.router_url).await?;
    let mut cached = 0.0;
    let mut fabric_stored = 0.0;
    for (i, w) in cl.workers.iter().enumerate() {
        let m = metrics(c, &w.url).await?;
        if i < 2 {
            cached += metric(&m, "kvfabric_worker_pool_blocks", &[("state", "cached")]);
        }
        fabric_stored += metric(&m, "kvfabric_worker_fabric_blocks_total", &[("op", "stored")]);
    }
    Ok(EventMark {
        router_stored: metric(&r, "kvfabric_router_events_total", &[("counter", "blocks_stored")]),
        cached,
        fabric_stored,
    })
}

/// Waits (at most `limit`) until the router has applied the events of
/// everything served since `before` and has no request in flight, so the
/// next routing decision sees every block placed so far.
async fn wait_events(c: &Http, cl: &Cluster, before: EventMark, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let now = event_mark(c, cl).await?;
        let target = before.router_stored + (now.cached - before.cached) + (now.fabric_stored - before.fabric_stored);
        let r = metrics(c, &cl.router_url).await?;
        let inflight = metric(&r, "kvfabric_router_worker_inflight_requests", &[]);
        if now.router_stored >= target && inflight == 0.0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the router applied {} stored blocks, expected {target} (before {before:?}, now {now:?}; {inflight} in flight)",
            now.router_stored
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a short token-id prompt straight to each aggregated worker until
/// the router has its KV events (a ZMQ subscriber only receives what is
/// published after its subscription reached the publisher).
async fn warm_up(c: &Http, cl: &Cluster, history: &mut History) -> Result<()> {
    for (wi, name) in ["a", "b"].into_iter().enumerate() {
        let url = cl.worker(name).url.clone();
        let mut ok = false;
        for attempt in 0..5 {
            let before = event_mark(c, cl).await?;
            // Token ids below the byte range's BOS: no prefix shared with text prompts.
            let head = (10 * wi + attempt + 1) as u32;
            let prompt: Vec<u32> = std::iter::once(head)
                .chain((0..39).map(|i| (i * 7 % 200) as u32))
                .collect();
            let r = complete(c, &url, &json!({"prompt": prompt, "max_tokens": 2})).await?;
            history.record(name, &prompt, &r.ids());
            if wait_events(c, cl, before, Duration::from_secs(3)).await.is_ok() {
                ok = true;
                break;
            }
        }
        ensure!(ok, "the router never received worker {name}'s KV events (5 attempts)");
    }
    Ok(())
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_router_and_workers_as_processes() {
    let t0 = Instant::now();
    // Builds any missing binary first, outside the time limit below.
    for (b, p) in [
        ("kvfabric", "kvfabric"),
        ("kvfabric-router", "kvfabric-router"),
        ("kvfabric-worker", "kvfabric-engine-adapters"),
    ] {
        binary(b, p);
    }
    match tokio::time::timeout(Duration::from_secs(300), run()).await {
        Ok(Ok(())) => eprintln!("# e2e passed in {:.1} s", t0.elapsed().as_secs_f64()),
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the end-to-end test did not finish within 300 s"),
    }
}

async fn run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut procs = Procs::default();
    let r = run_in(&mut procs, dir.path()).await;
    procs.passed = r.is_ok();
    drop(procs);
    r
}

async fn run_in(procs: &mut Procs, dir: &Path) -> Result<()> {
    let c = http();
    let t = Instant::now();
    let mut history = History::default();
    let cl = Cluster::start(&c, procs, dir, &mut history).await?;
    eprintln!(
        "# started node {}, router {}, workers {:?} in {:.1} s",
        cl.node_url,
        cl.router_url,
        cl.workers.iter().map(|w| (&w.name, &w.url)).collect::<Vec<_>>(),
        t.elapsed().as_secs_f64()
    );
    warm_up(&c, &cl, &mut history).await?;
    routing_and_savings(&c, &cl, &mut history).await?;
    disaggregation(&c, &cl, &mut history).await?;
    kill_a_worker(&c, &cl, procs).await?;
    Ok(())
}

/// Checks 1 and 2 (see the module doc).
async fn routing_and_savings(c: &Http, cl: &Cluster, history: &mut History) -> Result<()> {
    let model = cl.model.clone();
    let r0 = metrics(c, &cl.router_url).await?;
    let mut w0 = Vec::new();
    for name in ["a", "b"] {
        w0.push(metrics(c, &cl.worker(name).url).await?);
    }

    // Round 0: each document's first request, streamed, each sent once the
    // previous one is running, so in-flight load spreads them.
    let mut holder: Vec<String> = Vec::new();
    let mut prompt_total = 0u64;
    let mut computed_total = 0u64;
    let before = event_mark(c, cl).await?;
    let mut first = Vec::new();
    for d in 0..DOCS {
        let text = doc_prompt(d, 0);
        let body = json!({"model": model.model_id, "prompt": text, "max_tokens": FIRST_TOKENS,
                          "ignore_eos": true, "stream": true});
        let s = stream(c, &cl.router_url, &body).await?;
        ensure!(
            s.worker == "a" || s.worker == "b",
            "document {d}: routed to {:?}",
            s.worker
        );
        holder.push(s.worker.clone());
        first.push((d, text, s));
    }
    for (d, text, s) in first {
        let worker = s.worker.clone();
        let end = finish(s).await?;
        ensure!(
            end.error.is_none() && end.broken.is_none() && end.done,
            "document {d}'s first request failed: {end:?}"
        );
        let last = end.last.clone().context("no finish chunk")?;
        let prompt = encode(&text, true);
        check_completion(
            &model,
            history,
            Served {
                what: format!("document {d}, first request"),
                worker: &worker,
                prompt: &prompt,
                max_tokens: FIRST_TOKENS,
                ignore_eos: true,
                ids: end.token_ids.clone(),
                ext: &last["kvfabric"],
                usage: &last["usage"],
            },
        )?;
        prompt_total += prompt.len() as u64;
        computed_total += last["kvfabric"]["computed_tokens"].as_u64().unwrap_or(0);
    }
    ensure!(
        holder.iter().any(|h| h == "a") && holder.iter().any(|h| h == "b"),
        "the router put every document on one worker ({holder:?}), although each was sent while the one before was still generating"
    );
    wait_events(c, cl, before, Duration::from_secs(10)).await?;

    // Later rounds, one request at a time: each must land where its
    // document is and reuse the whole document from that worker's pool.
    let mut repeats = 0u64;
    for q in 1..QUESTIONS {
        for (d, held_by) in holder.iter().enumerate() {
            let before = event_mark(c, cl).await?;
            let text = doc_prompt(d, q);
            let prompt = encode(&text, true);
            let body = json!({"model": model.model_id, "prompt": text, "max_tokens": SHORT_TOKENS});
            let r = complete(c, &cl.router_url, &body).await?;
            let w = r.worker.clone().unwrap_or_default();
            ensure!(
                w == *held_by,
                "document {d}, question {q}: routed to {w:?}, but worker {held_by} holds the document"
            );
            let (own, fabric) = history.expect(&w, &prompt);
            ensure!(
                own == (DOC_BLOCKS * TPB) as u64 && fabric == 0,
                "workload: expected the whole document cached on its holder, got ({own}, {fabric})"
            );
            check_completion(
                &model,
                history,
                Served {
                    what: format!("document {d}, question {q}"),
                    worker: &w,
                    prompt: &prompt,
                    max_tokens: SHORT_TOKENS,
                    ignore_eos: false,
                    ids: r.ids(),
                    ext: &r.body["kvfabric"],
                    usage: &r.body["usage"],
                },
            )?;
            prompt_total += r.prompt_tokens();
            computed_total += r.ext("computed_tokens");
            repeats += 1;
            wait_events(c, cl, before, Duration::from_secs(10)).await?;
        }
    }

    // The saving: the repeated requests times the document's tokens.
    let saved = repeats * (DOC_BLOCKS * TPB) as u64;
    ensure!(
        computed_total == prompt_total - saved,
        "prefill tokens computed {computed_total}, expected {prompt_total} from scratch minus {saved}"
    );
    let r1 = metrics(c, &cl.router_url).await?;
    let delta =
        |a: &str, b: &str, name: &str, labels: &[(&str, &str)]| metric(b, name, labels) - metric(a, name, labels);
    let mut computed_metric = 0.0;
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let m = metrics(c, &cl.worker(name).url).await?;
        let n = "kvfabric_worker_prefill_tokens_total";
        computed_metric += delta(&w0[i], &m, n, &[("source", "computed")]);
        let own = delta(&w0[i], &m, n, &[("source", "own_pool")]);
        let fab = delta(&w0[i], &m, n, &[("source", "fabric")]);
        let served = holder.iter().filter(|h| *h == name).count() as f64 * (QUESTIONS - 1) as f64;
        ensure!(
            own == served * (DOC_BLOCKS * TPB) as f64 && fab == 0.0,
            "worker {name}'s metrics: {own} tokens from its own pool and {fab} from the fabric, expected {} and 0",
            served * (DOC_BLOCKS * TPB) as f64
        );
        let decisions = delta(&r0, &r1, "kvfabric_router_decisions_total", &[("worker", name)]);
        ensure!(
            decisions == served + holder.iter().filter(|h| *h == name).count() as f64,
            "router decisions for {name}: {decisions}"
        );
    }
    ensure!(
        computed_metric == computed_total as f64,
        "the workers' prefill_tokens_total{{source=computed}} grew by {computed_metric}, the responses say {computed_total}"
    );
    let router_saved = delta(&r0, &r1, "kvfabric_router_prefill_tokens_saved_total", &[]);
    let router_hbm = delta(&r0, &r1, "kvfabric_router_cached_blocks_total", &[("tier", "hbm")]);
    ensure!(
        router_saved == saved as f64 && router_hbm == (repeats as usize * DOC_BLOCKS) as f64,
        "the router predicted {router_saved} tokens saved and {router_hbm} own-pool blocks, the workers reused {saved} tokens"
    );
    eprintln!(
        "# routing: documents on {holder:?}; {} requests, {prompt_total} prompt tokens, {computed_total} computed ({saved} reused from the holders' own pools)",
        DOCS * QUESTIONS
    );

    // The same document on the worker that does not hold it: loaded from
    // the fabric instead of computed.
    let other = if holder[0] == "a" { "b" } else { "a" };
    let text = doc_prompt(0, QUESTIONS);
    let prompt = encode(&text, true);
    let m0 = metrics(c, &cl.worker(other).url).await?;
    let r = complete(
        c,
        &cl.worker(other).url,
        &json!({"prompt": text, "max_tokens": SHORT_TOKENS}),
    )
    .await?;
    ensure!(
        r.ext("fabric_tokens") == (DOC_BLOCKS * TPB) as u64 && r.ext("own_pool_tokens") == 0,
        "document 0 on worker {other}: {}",
        r.body["kvfabric"]
    );
    check_completion(
        &model,
        history,
        Served {
            what: "document 0 on the worker that does not hold it".into(),
            worker: other,
            prompt: &prompt,
            max_tokens: SHORT_TOKENS,
            ignore_eos: false,
            ids: r.ids(),
            ext: &r.body["kvfabric"],
            usage: &r.body["usage"],
        },
    )?;
    let m1 = metrics(c, &cl.worker(other).url).await?;
    let n = "kvfabric_worker_prefill_tokens_total";
    let fab = metric(&m1, n, &[("source", "fabric")]) - metric(&m0, n, &[("source", "fabric")]);
    ensure!(
        fab == (DOC_BLOCKS * TPB) as f64,
        "worker {other}'s prefill_tokens_total{{source=fabric}} grew by {fab}"
    );
    Ok(())
}

/// Check 3 (see the module doc).
async fn disaggregation(c: &Http, cl: &Cluster, history: &mut History) -> Result<()> {
    let model = cl.model.clone();
    let (prefill, decode) = (cl.worker("prefill"), cl.worker("decode"));
    let p0 = metrics(c, &prefill.url).await?;
    let d0 = metrics(c, &decode.url).await?;
    let mut text = String::from("[disaggregated] A long context nobody has seen yet. ");
    while text.len() < 300 {
        text.push_str("Prefill runs on one worker, decode on another, KV through the fabric. ");
    }
    text.truncate(300);
    let prompt = encode(&text, true);
    let (own, fabric) = history.expect("decode", &prompt);
    ensure!(own == 0 && fabric == 0, "the disaggregated prompt must be new");
    let body = json!({"model": model.model_id, "prompt": text, "max_tokens": 16});
    let r = complete(c, &decode.url, &body).await?;
    let usable = ((prompt.len() - 1) / TPB * TPB) as u64;
    ensure!(
        r.body["kvfabric"]["prefill"] == "remote"
            && r.ext("fabric_tokens") == usable
            && r.ext("own_pool_tokens") == 0
            && r.ext("computed_tokens") == prompt.len() as u64 - usable,
        "decode worker: expected a remote prefill with {usable} tokens from the fabric: {}",
        r.body["kvfabric"]
    );
    let want = reference(&model, &prompt, 16, false)?;
    ensure!(
        r.ids() == want,
        "the disaggregated request's tokens differ from a from-scratch generation"
    );
    let p1 = metrics(c, &prefill.url).await?;
    let d1 = metrics(c, &decode.url).await?;
    let n = "kvfabric_worker_prefill_tokens_total";
    let prefill_computed = metric(&p1, n, &[("source", "computed")]) - metric(&p0, n, &[("source", "computed")]);
    ensure!(
        prefill_computed == prompt.len() as f64,
        "the prefill worker computed {prefill_computed} tokens, expected the whole prompt ({})",
        prompt.len()
    );
    let n = "kvfabric_worker_remote_prefill_total";
    let ok = metric(&d1, n, &[("outcome", "succeeded")]) - metric(&d0, n, &[("outcome", "succeeded")]);
    ensure!(ok == 1.0, "the decode worker counted {ok} successful remote prefills");
    // The prefill worker holds the prompt's blocks now; the decode worker
    // both them (fabric) and its own.
    history.record("prefill", &prompt[..prompt.len() / TPB * TPB], &[]);
    history.record("decode", &prompt, &r.ids());

    // The same prompt on an aggregated worker: the blocks come from the
    // fabric, the tokens are the same.
    let a = complete(c, &cl.worker("a").url, &json!({"prompt": text, "max_tokens": 16})).await?;
    ensure!(
        a.ids() == r.ids() && a.ext("fabric_tokens") == usable,
        "aggregated worker a: {} tokens {:?}, decode worker {:?}",
        a.body["kvfabric"],
        a.ids(),
        r.ids()
    );
    history.record("a", &prompt, &a.ids());

    // A short prompt stays on the decode worker.
    let short = "[short] decode this locally.";
    let sp = encode(short, true);
    let s = complete(c, &decode.url, &json!({"prompt": short, "max_tokens": 8})).await?;
    ensure!(
        s.body["kvfabric"]["prefill"] == "local" && s.ext("computed_tokens") == sp.len() as u64,
        "short prompt on the decode worker: {}",
        s.body["kvfabric"]
    );
    ensure!(
        s.ids() == reference(&model, &sp, 8, false)?,
        "short prompt: tokens differ"
    );
    eprintln!(
        "# disaggregation: {} prompt tokens prefilled on the prefill worker, {usable} loaded by the decode worker, {} computed there",
        prompt.len(),
        prompt.len() as u64 - usable
    );
    Ok(())
}

/// Check 4 (see the module doc): kills worker `a`.
async fn kill_a_worker(c: &Http, cl: &Cluster, procs: &mut Procs) -> Result<()> {
    let model = cl.model.clone();
    let router = cl.router_url.clone();
    // Long generations, each sent once the previous one is running.
    let mut streams = Vec::new();
    for i in 0..4 {
        let prompt = format!("[long {i}] keep generating until told otherwise.");
        let body = json!({"model": model.model_id, "prompt": prompt, "max_tokens": LONG_TOKENS,
                          "ignore_eos": true, "stream": true});
        streams.push(stream(c, &router, &body).await?);
    }
    for s in &mut streams {
        tokio::time::timeout(Duration::from_secs(30), &mut s.first_token)
            .await
            .context("a long request produced no token within 30 s")?
            .context("a long request ended before its first token")?;
    }
    // Two non-streamed requests: no header until they end, so each is
    // located by the router's in-flight gauges, one at a time (the first
    // one's load steers the second to the other worker).
    let inflight = |m: &str, w: &str| metric(m, "kvfabric_router_worker_inflight_requests", &[("worker", w)]);
    let mut plains = Vec::new();
    for i in 0..2 {
        let m0 = metrics(c, &router).await?;
        let body = json!({"model": model.model_id, "prompt": format!("[long plain {i}] generate plenty."),
                          "max_tokens": LONG_TOKENS, "ignore_eos": true});
        let task = {
            let (c, url) = (c.clone(), format!("{router}/v1/completions"));
            tokio::spawn(async move { post(&c, &url, &body, Duration::from_secs(120)).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let worker = loop {
            let m = metrics(c, &router).await?;
            let grew: Vec<&str> = ["a", "b"]
                .into_iter()
                .filter(|w| inflight(&m, w) > inflight(&m0, w))
                .collect();
            if let [w] = grew.as_slice() {
                break w.to_string();
            }
            ensure!(
                Instant::now() < deadline,
                "non-streamed request {i} never showed in flight:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        plains.push((worker, task));
    }
    let on = |w: &str| streams.iter().filter(|s| s.worker == w).count();
    ensure!(
        on("a") >= 1 && on("b") >= 1,
        "the long requests did not spread over both workers: {:?}",
        streams.iter().map(|s| &s.worker).collect::<Vec<_>>()
    );
    for s in &streams {
        ensure!(
            !s.task.is_finished(),
            "a long request ended before the kill: it was not in flight"
        );
    }
    let plain_on = |w: &str| plains.iter().filter(|(x, _)| x == w).count();
    ensure!(
        plain_on("a") == 1 && plain_on("b") == 1,
        "the non-streamed requests did not spread over both workers: {:?}",
        plains.iter().map(|(w, _)| w).collect::<Vec<_>>()
    );
    let doomed = on("a") + plain_on("a");

    // SIGKILL worker a mid-run.
    procs.named("worker-a").kill();
    let killed_at = Instant::now();

    let mut ended = Vec::new();
    for s in streams {
        let w = s.worker.clone();
        ended.push((w, finish(s).await?));
    }
    for (w, e) in &ended {
        ensure!(
            e.broken.is_none(),
            "a stream broke off without the router's error event: {e:?}"
        );
        if w == "a" {
            let msg = e
                .error
                .as_ref()
                .map(|v| v["error"]["message"].to_string())
                .unwrap_or_default();
            ensure!(
                e.error.is_some() && msg.contains("worker a") && e.last.is_none() && !e.done,
                "a stream on the killed worker: expected the router's error event naming worker a, got {e:?}"
            );
            ensure!(e.token_ids.len() < LONG_TOKENS, "the killed worker finished a request");
        } else {
            let done = e.last.as_ref().map(|v| v["usage"]["completion_tokens"].clone());
            ensure!(
                e.error.is_none() && e.done && done == Some(json!(LONG_TOKENS)) && e.token_ids.len() == LONG_TOKENS,
                "a stream on the surviving worker did not complete: error {:?}, done {}, {} tokens",
                e.error,
                e.done,
                e.token_ids.len()
            );
        }
    }
    for (w, task) in plains {
        let plain = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .context("a non-streamed request did not end")???;
        if w == "a" {
            ensure!(
                plain.status == 502
                    && plain.body["error"]["code"] == "worker_error"
                    && plain.body["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("worker a"),
                "the non-streamed request on the killed worker: {} {}",
                plain.status,
                plain.body
            );
        } else {
            ensure!(
                plain.status == 200 && plain.body["usage"]["completion_tokens"] == json!(LONG_TOKENS),
                "the non-streamed request on the surviving worker: {} {}",
                plain.status,
                plain.body["usage"]
            );
        }
    }
    eprintln!(
        "# kill: {doomed} requests in flight on a failed, {} on b completed, all within {:.1} s of the kill",
        ended.len() + 2 - doomed,
        killed_at.elapsed().as_secs_f64()
    );

    // The router took a out; what comes next goes to b and succeeds.
    let m = metrics(c, &router).await?;
    ensure!(
        metric(&m, "kvfabric_router_worker_healthy", &[("worker", "a")]) == 0.0
            && metric(&m, "kvfabric_router_worker_healthy", &[("worker", "b")]) == 1.0,
        "worker health after the kill:\n{m}"
    );
    let errors_a = metric(&m, "kvfabric_router_worker_errors_total", &[("worker", "a")]);
    let errors_b = metric(&m, "kvfabric_router_worker_errors_total", &[("worker", "b")]);
    ensure!(
        errors_a == doomed as f64 && errors_b == 0.0,
        "router worker errors: a {errors_a} (expected {doomed}), b {errors_b}"
    );
    for i in 0..4 {
        let text = doc_prompt(i % DOCS, 10 + i);
        let r = complete(
            c,
            &router,
            &json!({"model": model.model_id, "prompt": text, "max_tokens": SHORT_TOKENS}),
        )
        .await?;
        ensure!(
            r.worker.as_deref() == Some("b"),
            "after the kill, request {i} went to {:?}",
            r.worker
        );
        ensure!(
            r.ids() == reference(&model, &encode(&text, true), SHORT_TOKENS, false)?,
            "after the kill: tokens differ"
        );
    }
    let (status, h) = get(c, &format!("{router}/health")).await?;
    ensure!(
        status == 200 && h.contains("\"healthy_workers\":1"),
        "router health: {status} {h}"
    );
    Ok(())
}
