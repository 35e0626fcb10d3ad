//! End-to-end tests of the serving side: a real router (HTTP front end,
//! health checks, event ingestion) on a free loopback port, in front of
//! stand-in workers that publish vLLM KV events over real ZMQ PUB sockets,
//! and a real in-process fabric node for `Subscribe` streams.
//!
//! The stand-in worker ([`StandIn`]) is a test double of an OpenAI-compatible
//! engine worker, to be replaced by the reference engine worker when issue 5
//! lands: it answers completions with a fixed body naming itself, streams a
//! fixed SSE sequence, hangs on prompts containing `hang` (so a test can kill
//! it mid-request), and publishes whatever events the test hands it.
//!
//! Tests assert behaviour only; every wait is a bounded poll.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvfabric_router::config::{FabricEndpoint, Settings, WorkerSettings};
use kvfabric_router::index::HolderId;
use kvfabric_router::{FABRIC_HOLDER_BASE, RouterHandle, RouterService};
use parking_lot::Mutex;
use rmpv::Value as V;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

const SSE: &[&str] = &[
    "data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
    "data: {\"choices\":[{\"text\":\"b\"}]}\n\n",
    "data: [DONE]\n\n",
];

/// Test double of an engine worker (see the module doc).
struct StandIn {
    name: String,
    url: String,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    publisher: PubSocket,
    events: String,
    seq: u64,
}

impl StandIn {
    /// Starts on a free port; `entered` gets the name on every `hang` request.
    async fn start(name: &str, entered: mpsc::UnboundedSender<String>) -> Result<StandIn> {
        Self::start_at(name, entered, "127.0.0.1:0", "tcp://127.0.0.1:0").await
    }

    /// Starts serving on `http` and publishing on `events` (a worker coming
    /// back where it was).
    async fn start_at(name: &str, entered: mpsc::UnboundedSender<String>, http: &str, events: &str) -> Result<StandIn> {
        let listener = tokio::net::TcpListener::bind(http).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let me = name.to_string();
        let complete = move |body: Bytes| {
            let (me, entered) = (me.clone(), entered.clone());
            async move {
                let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if body.windows(4).any(|w| w == b"hang") {
                    let _ = entered.send(me.clone());
                    std::future::pending::<()>().await;
                }
                if req["stream"] == json!(true) {
                    let chunks = SSE
                        .iter()
                        .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from_static(c.as_bytes())));
                    return axum::http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(futures::stream::iter(chunks)))
                        .unwrap();
                }
                let out = json!({"object": "text_completion", "worker": me, "choices": [{"text": "ok"}]});
                axum::http::Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(out.to_string()))
                    .unwrap()
            }
        };
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route("/v1/completions", axum::routing::post(complete.clone()))
            .route("/v1/chat/completions", axum::routing::post(complete));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let c2 = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let t = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
                c2.lock().push(t.abort_handle());
            }
        });
        let mut publisher = PubSocket::new();
        let events = publisher.bind(events).await?.to_string();
        Ok(StandIn {
            name: name.into(),
            url,
            accept,
            conns,
            publisher,
            events,
            seq: 0,
        })
    }

    fn settings(&self, with_events: bool) -> WorkerSettings {
        WorkerSettings {
            name: self.name.clone(),
            url: self.url.clone(),
            kv_events: with_events.then(|| self.events.clone()),
            fabric_node: None,
        }
    }

    /// Kills the worker: the listener and every connection close at once.
    fn kill(&self) {
        self.accept.abort();
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }

    /// Kills the worker and its event publisher, and waits until the HTTP
    /// port is free again; returns its HTTP address and events endpoint.
    async fn kill_all(self) -> Result<(String, String)> {
        self.kill();
        let _ = self.publisher.close().await;
        let http = self.url.trim_start_matches("http://").to_string();
        for _ in 0..500 {
            if std::net::TcpListener::bind(&http).is_ok() {
                return Ok((http, self.events));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("{http} never came free")
    }

    /// Publishes raw frames.
    async fn send_frames(&mut self, frames: Vec<Bytes>) -> Result<()> {
        let msg = ZmqMessage::try_from(frames).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.publisher.send(msg).await?;
        Ok(())
    }

    /// Publishes `payload` with sequence `seq`.
    async fn publish_seq(&mut self, seq: u64, payload: Vec<u8>) -> Result<()> {
        self.seq = seq;
        let frames = vec![
            Bytes::from_static(b"kv-events"),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            Bytes::from(payload),
        ];
        self.send_frames(frames).await
    }

    /// Publishes `payload` with the next sequence number.
    async fn publish(&mut self, payload: Vec<u8>) -> Result<()> {
        let seq = self.seq + 1;
        self.publish_seq(seq, payload).await
    }
}

/// A vLLM `EventBatch` with one `BlockStored` of `tokens` (16 per block).
fn stored(tokens: &[u32]) -> Vec<u8> {
    let n = tokens.len() / 16;
    let ev = V::Array(vec![
        V::from("BlockStored"),
        V::Array((0..n as u64).map(|h| V::from(1000 + h)).collect()),
        V::Nil,
        V::Array(tokens[..n * 16].iter().map(|&t| V::from(t)).collect()),
        V::from(16u64),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &V::Array(vec![V::F64(0.0), V::Array(vec![ev]), V::Nil])).unwrap();
    out
}

/// Publishes `tokens` as stored by `w` until the router's index shows them
/// (a new ZMQ subscription misses what was sent before it was up).
async fn publish_until_seen(w: &mut StandIn, r: &RouterHandle, holder: HolderId, tokens: &[u32]) -> Result<()> {
    let chain = r.router().chain(tokens);
    for _ in 0..500 {
        w.publish(stored(tokens)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if held_by(r, holder, &chain) == chain.len() {
            return Ok(());
        }
    }
    bail!("router never saw {}'s events", w.name)
}

/// Leading blocks of `chain` the index says `holder` holds.
fn held_by(r: &RouterHandle, holder: HolderId, chain: &[u128]) -> usize {
    let mut m = kvfabric_router::index::ChainMatch::default();
    r.router().index().lookup(chain, &mut m);
    let entries = m.entries();
    (0..chain.len())
        .take_while(|&d| entries.iter().any(|e| e.pos as usize == d && e.holder == holder))
        .count()
}

/// A small in-process fabric node's settings: loopback, free ports, 8 MiB
/// of host memory, no disk tier, data under `dir`.
fn node_settings(dir: &std::path::Path, node_id: &str) -> kvfabric::server::Settings {
    let mut ns = kvfabric::server::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        node_id: node_id.into(),
        ..Default::default()
    };
    ns.host.capacity = kvfabric::server::ByteSize(8 << 20);
    ns.disk.capacity = kvfabric::server::ByteSize(0);
    ns
}

/// Starts a node (see [`node_settings`]) and a client of it, with namespace
/// `ns` created (a namespace exists once something is put in it).
async fn probed_node(
    dir: &std::path::Path,
    node_id: &str,
) -> Result<(kvfabric::server::NodeHandle, kvfabric::client::Client)> {
    let node = kvfabric::server::Node::build(node_settings(dir, node_id))
        .await?
        .start()
        .await?;
    let fc = kvfabric::client::Client::connect(node.endpoint()).await?;
    fc.put("ns", &b"probe"[..], &b"p"[..], kvfabric::client::Durability::Memory)
        .await?;
    Ok((node, fc))
}

fn base_settings(workers: Vec<WorkerSettings>) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: "ns".into(),
        workers,
        health_interval_ms: 100,
        health_timeout_ms: 500,
        request_timeout_ms: 30_000,
        ..Default::default()
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request, bounded so a hang fails the test instead of stalling it.
async fn call(
    c: &HttpClient,
    method: Method,
    url: String,
    body: impl Into<Bytes>,
) -> Result<(StatusCode, HeaderMap, String)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))?;
    let fut = async {
        let r = c.request(req).await?;
        let (parts, body) = r.into_parts();
        let bytes = body.collect().await?.to_bytes();
        anyhow::Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .context("request hung")?
}

async fn complete(c: &HttpClient, r: &RouterHandle, body: Value) -> Result<(StatusCode, String, String)> {
    let (s, h, b) = call(c, Method::POST, format!("{}/v1/completions", r.url()), body.to_string()).await?;
    let worker = h
        .get("x-kvfabric-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((s, worker, b))
}

async fn metrics(c: &HttpClient, r: &RouterHandle) -> Result<String> {
    Ok(call(c, Method::GET, format!("{}/metrics", r.url()), "").await?.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_to_the_worker_whose_events_show_the_prefix() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut a = StandIn::start("a", tx.clone()).await?;
    let mut b = StandIn::start("b", tx).await?;
    let r = RouterService::start(base_settings(vec![a.settings(true), b.settings(true)])).await?;
    let c = client();

    // Token-id prompt whose four blocks only b holds.
    let ids: Vec<u32> = (0..64).collect();
    publish_until_seen(&mut b, &r, HolderId(1), &ids).await?;
    for _ in 0..5 {
        let (s, w, body) = complete(&c, &r, json!({"model": "m", "prompt": ids, "max_tokens": 4})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"), "{body}");
        assert!(
            body.contains("\"worker\":\"b\""),
            "the worker's body comes back: {body}"
        );
    }
    // Text prompt, tokenised like the reference engine (BOS + bytes) without a tokenizer file: a holds it.
    let text = "x".repeat(64);
    let bytes: Vec<u32> = std::iter::once(256).chain(text.bytes().map(u32::from)).collect();
    publish_until_seen(&mut a, &r, HolderId(0), &bytes).await?;
    for _ in 0..5 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": text})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "a"));
    }
    let m = metrics(&c, &r).await?;
    assert!(m.contains("kvfabric_router_decisions_total{worker=\"b\"} 5"), "{m}");
    assert!(
        m.contains("kvfabric_router_cached_blocks_total{tier=\"hbm\",worker=\"b\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("kvfabric_router_prefill_tokens_saved_total{worker=\"a\"} 320"),
        "{m}"
    );
    assert!(
        m.contains("kvfabric_router_requests_total{route=\"/v1/completions\",status=\"200\"} 10"),
        "{m}"
    );
    assert!(m.contains("kvfabric_router_worker_healthy{worker=\"a\"} 1"), "{m}");
    assert!(
        m.contains("kvfabric_router_event_stream_connected{source=\"engine:b\"} 1"),
        "{m}"
    );
    r.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_events_are_counted_and_gaps_resynchronise() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut a = StandIn::start("a", tx).await?;
    let r = RouterService::start(base_settings(vec![a.settings(true)])).await?;
    let c = client();
    let ids: Vec<u32> = (0..32).collect();
    publish_until_seen(&mut a, &r, HolderId(0), &ids).await?;
    let counters = r.event_counters();
    let malformed0 = counters.malformed.load(std::sync::atomic::Ordering::Relaxed);
    // Not msgpack; two frames instead of three; a 3-byte sequence frame.
    a.publish(b"\xc1\xc1garbage".to_vec()).await?;
    a.send_frames(vec![Bytes::from_static(b"t"), Bytes::from_static(b"x")])
        .await?;
    a.send_frames(vec![
        Bytes::from_static(b"t"),
        Bytes::from_static(b"abc"),
        Bytes::from_static(b"x"),
    ])
    .await?;
    let mut seen = false;
    for _ in 0..500 {
        if counters.malformed.load(std::sync::atomic::Ordering::Relaxed) >= malformed0 + 3 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "three malformed messages counted");
    assert_eq!(r.router().index().holder_len(HolderId(0)), 2, "the index is untouched");
    let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "a"), "still serving");

    // Skip five sequence numbers: the worker's entries are dropped, then the
    // new message applies.
    let gaps0 = counters.gaps.load(std::sync::atomic::Ordering::Relaxed);
    let other: Vec<u32> = (500..516).collect();
    let next = a.seq + 6;
    a.publish_seq(next, stored(&other)).await?;
    let mut resynced = false;
    for _ in 0..500 {
        if counters.gaps.load(std::sync::atomic::Ordering::Relaxed) > gaps0 {
            resynced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(resynced, "the gap was detected");
    assert_eq!(
        r.router().index().holder_len(HolderId(0)),
        1,
        "old blocks dropped, new one applied"
    );
    let m = metrics(&c, &r).await?;
    assert!(m.contains("kvfabric_router_events_total{counter=\"gaps\"} 1"), "{m}");
    assert!(
        m.contains("kvfabric_router_events_total{counter=\"malformed\"} 3"),
        "{m}"
    );
    r.shutdown().await;
    a.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fabric_events_through_a_real_node_influence_routing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (node, fc) = probed_node(dir.path(), "kvfabric-node").await?;

    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let mut s = base_settings(vec![a.settings(false), b.settings(false)]);
    s.fabric = vec![FabricEndpoint {
        name: "n1".into(),
        url: node.endpoint(),
    }];
    s.workers[1].fabric_node = Some("n1".into());
    let r = RouterService::start(s).await?;
    let c = client();

    // Blocks stored in the node under their canonical keys.
    let ids: Vec<u32> = (0..64).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &ids, 16, &[]);
    let fabric = HolderId(FABRIC_HOLDER_BASE);
    let mut seen = false;
    for _ in 0..200 {
        let objs = keys
            .iter()
            .map(|k| kvfabric::client::PutObject::new(k.to_vec(), vec![7u8; 1024]))
            .collect();
        fc.put_many("ns", objs, kvfabric::client::Durability::Memory).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if r.router().index().holder_len(fabric) >= 4 {
            seen = true;
            break;
        }
    }
    assert!(seen, "the router saw the node's stored events");
    // b is co-located with the node (host-memory bandwidth), a reads over
    // the network: both reuse the blocks, b more cheaply.
    for _ in 0..3 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    }
    let m = metrics(&c, &r).await?;
    assert!(
        m.contains("kvfabric_router_cached_blocks_total{tier=\"host\",worker=\"b\"} 12"),
        "{m}"
    );
    assert!(
        m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 1"),
        "{m}"
    );
    // Deleting the blocks removes them from the index.
    fc.clear("ns").await?;
    for _ in 0..500 {
        if r.router().index().holder_len(fabric) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.router().index().holder_len(fabric),
        0,
        "removed blocks leave the index"
    );
    r.shutdown().await;
    node.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

/// A fabric node that authenticates (`[auth] tokens-file`): the router
/// with its tenant's token (`fabric-token-file`) follows the node's events
/// and routes by them; routers with no token, an unknown one, or another
/// tenant's are refused at the node (counted there), never see a block,
/// and keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authenticating_fabric_node_is_followed_with_the_routers_token() -> Result<()> {
    use kvfabric::client::{ClientOptions, Durability};
    use kvfabric::server::auth::{new_token, token_sha256};
    let dir = tempfile::tempdir()?;
    let (acme, globex) = (new_token(), new_token());
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\ntenant = \"acme\"\nsha256 = {:?}\n[[token]]\ntenant = \"globex\"\nsha256 = {:?}\n",
            token_sha256(&acme),
            token_sha256(&globex)
        ),
    )?;
    let acme_file = dir.path().join("acme.token");
    std::fs::write(&acme_file, format!("{}\n", acme.secret()))?;
    let mut ns = node_settings(&dir.path().join("data"), "kvfabric-node");
    ns.auth.tokens_file = Some(tokens);
    let node = kvfabric::server::Node::build(ns).await?.start().await?;
    let options = ClientOptions {
        token: Some(acme.clone()),
        ..Default::default()
    };
    let fc = kvfabric::client::Client::connect_with(node.endpoint(), options)
        .await?
        .with_tenant("acme");
    fc.put("ns", &b"probe"[..], &b"p"[..], Durability::Memory).await?;

    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let router = |file: Option<std::path::PathBuf>, token: Option<kvfabric::auth::Token>| {
        let mut s = base_settings(vec![a.settings(false), b.settings(false)]);
        s.fabric = vec![FabricEndpoint {
            name: "n1".into(),
            url: node.endpoint(),
        }];
        s.workers[1].fabric_node = Some("n1".into());
        s.tenant = "acme".into();
        s.fabric_token_file = file;
        s.fabric_token = token;
        RouterService::start(s)
    };
    let r = router(Some(acme_file), None).await?;
    let refused = [
        router(None, None).await?,
        router(None, Some(new_token())).await?,
        router(None, Some(globex)).await?,
    ];
    let c = client();

    // The router with acme's token sees the blocks stored and routes by them.
    let ids: Vec<u32> = (0..64).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &ids, 16, &[]);
    let fabric = HolderId(FABRIC_HOLDER_BASE);
    let objs = || {
        keys.iter()
            .map(|k| kvfabric::client::PutObject::new(k.to_vec(), vec![7u8; 1024]))
            .collect()
    };
    fc.put_many("ns", objs(), Durability::Memory).await?;
    eventually("the router with the tenant's token sees the node's blocks", || {
        r.router().index().holder_len(fabric) >= 4
    })
    .await?;
    for _ in 0..3 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    }
    let m = metrics(&c, &r).await?;
    assert!(
        m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 1"),
        "{m}"
    );

    // The others were refused at the node: no token, an unknown one, and
    // one acting for another tenant.
    let node_metrics = format!("http://{}/metrics", node.metrics_addr);
    for reason in ["missing", "unknown", "denied"] {
        let want = format!("kvfabric_auth_failures_total{{reason=\"{reason}\"}}");
        let mut seen = false;
        for _ in 0..500 {
            let (_, _, m) = call(&c, Method::GET, node_metrics.clone(), "").await?;
            if m.lines().any(|l| l.starts_with(&want) && !l.ends_with(" 0")) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "the node refused a router ({reason})");
    }
    // More blocks now, live: still nothing reaches the refused routers,
    // which serve on without the fabric.
    fc.put_many("ns", objs(), Durability::Memory).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for rr in &refused {
        assert_eq!(rr.router().index().holder_len(fabric), 0, "a refused router saw blocks");
        let m = metrics(&c, rr).await?;
        assert!(
            m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 0"),
            "{m}"
        );
        assert!(
            !m.contains("kvfabric_router_event_stream_connects_total{source=\"fabric:n1\"} 1"),
            "{m}"
        );
        let (s, _, _) = call(&c, Method::GET, format!("{}/health", rr.url()), "").await?;
        assert_eq!(s, StatusCode::OK);
        let (s, _, _) = complete(&c, rr, json!({"prompt": ids})).await?;
        assert_eq!(s, StatusCode::OK);
    }
    r.shutdown().await;
    for rr in refused {
        rr.shutdown().await;
    }
    node.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

/// TLS options trusting the CA in `certs`, presenting its client
/// certificate when `client_cert` (files of `write_test_certificates`).
fn tls_options(certs: &std::path::Path, client_cert: bool) -> Result<kvfabric::client::ClientOptions> {
    let (cert, key) = (certs.join("client.pem"), certs.join("client.key"));
    let tls = match client_cert {
        true => kvfabric::tls::ClientTls::from_files(&certs.join("ca.pem"), Some(&cert), Some(&key)),
        false => kvfabric::tls::ClientTls::from_files(&certs.join("ca.pem"), None, None),
    };
    Ok(kvfabric::client::ClientOptions {
        tls: Some(tls.map_err(anyhow::Error::msg)?),
        ..Default::default()
    })
}

/// A fabric node that speaks TLS and wants client certificates (`[tls]`
/// with `client-ca-file`): the router trusting its CA (`fabric-ca-file`)
/// and presenting a certificate (`fabric-client-cert`, `fabric-client-key`)
/// follows its events over `https://` and routes by them; routers without
/// a certificate, or trusting another CA, fail the handshake, never see a
/// block, and keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_fabric_node_is_followed_with_the_routers_ca() -> Result<()> {
    use kvfabric::client::Durability;
    use kvfabric::testutil::write_test_certificates;
    let dir = tempfile::tempdir()?;
    let (certs, other) = (dir.path().join("certs"), dir.path().join("other"));
    for d in [&certs, &other] {
        std::fs::create_dir_all(d)?;
        write_test_certificates(d);
    }
    let mut ns = node_settings(&dir.path().join("data"), "kvfabric-node");
    ns.tls.cert_file = Some(certs.join("server.pem"));
    ns.tls.key_file = Some(certs.join("server.key"));
    ns.tls.client_ca_file = Some(certs.join("ca.pem"));
    let node = kvfabric::server::Node::build(ns).await?.start().await?;
    assert!(node.endpoint().starts_with("https://127.0.0.1:"), "{}", node.endpoint());
    let fc = kvfabric::client::Client::connect_with(node.endpoint(), tls_options(&certs, true)?).await?;
    fc.put("ns", &b"probe"[..], &b"p"[..], Durability::Memory).await?;

    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let router = |ca: &std::path::Path, client_cert: bool| {
        let mut s = base_settings(vec![a.settings(false), b.settings(false)]);
        s.fabric = vec![FabricEndpoint {
            name: "n1".into(),
            url: node.endpoint(),
        }];
        s.workers[1].fabric_node = Some("n1".into());
        // The files, read at start (settings not made by `load`).
        s.fabric_ca_file = Some(ca.join("ca.pem"));
        if client_cert {
            s.fabric_client_cert = Some(ca.join("client.pem"));
            s.fabric_client_key = Some(ca.join("client.key"));
        }
        RouterService::start(s)
    };
    let r = router(&certs, true).await?;
    let refused = [router(&certs, false).await?, router(&other, true).await?];
    let c = client();

    // The router with the CA and a certificate sees the blocks stored and
    // routes by them.
    let ids: Vec<u32> = (0..64).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &ids, 16, &[]);
    let fabric = HolderId(FABRIC_HOLDER_BASE);
    let objs = || {
        keys.iter()
            .map(|k| kvfabric::client::PutObject::new(k.to_vec(), vec![7u8; 1024]))
            .collect()
    };
    fc.put_many("ns", objs(), Durability::Memory).await?;
    eventually("the router trusting the node's CA sees its blocks", || {
        r.router().index().holder_len(fabric) >= 4
    })
    .await?;
    for _ in 0..3 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    }
    let m = metrics(&c, &r).await?;
    assert!(
        m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 1"),
        "{m}"
    );

    // Without a client certificate, or trusting another CA: no stream, no
    // block, and the router serves on without the fabric.
    fc.put_many("ns", objs(), Durability::Memory).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for rr in &refused {
        assert_eq!(rr.router().index().holder_len(fabric), 0, "a refused router saw blocks");
        let m = metrics(&c, rr).await?;
        assert!(
            m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 0"),
            "{m}"
        );
        assert!(
            !m.contains("kvfabric_router_event_stream_connects_total{source=\"fabric:n1\"} 1"),
            "{m}"
        );
        let (s, _, _) = call(&c, Method::GET, format!("{}/health", rr.url()), "").await?;
        assert_eq!(s, StatusCode::OK);
        let (s, _, _) = complete(&c, rr, json!({"prompt": ids})).await?;
        assert_eq!(s, StatusCode::OK);
    }
    r.shutdown().await;
    for rr in refused {
        rr.shutdown().await;
    }
    node.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streaming_sse_passes_through_unchanged() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx).await?;
    let r = RouterService::start(base_settings(vec![a.settings(false)])).await?;
    let c = client();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "stream": true});
        let (s, h, b) = call(&c, Method::POST, format!("{}{path}", r.url()), body.to_string()).await?;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(b, SSE.concat(), "{path}");
    }
    r.shutdown().await;
    a.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_request_gives_502_and_later_requests_go_to_the_healthy_one() -> Result<()> {
    let (tx, mut entered) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let r = Arc::new(RouterService::start(base_settings(vec![a.settings(false), b.settings(false)])).await?);
    let c = client();
    let (r2, c2) = (r.clone(), c.clone());
    let pending = tokio::spawn(async move { complete(&c2, &r2, json!({"prompt": "please hang"})).await });
    let victim = tokio::time::timeout(Duration::from_secs(30), entered.recv())
        .await?
        .context("a worker got the request")?;
    let (dead, alive) = if victim == "a" { (&a, &b) } else { (&b, &a) };
    dead.kill();
    let (s, _, body) = pending.await??;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    let e: Value = serde_json::from_str(&body)?;
    assert_eq!(e["error"]["code"], "worker_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("worker {victim}")),
        "{body}"
    );
    for i in 0..6 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": format!("request {i}")})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, alive.name.as_str()));
    }
    assert_eq!(r.healthy_workers(), vec![alive.name.clone()]);
    // With both gone there is nobody to route to.
    alive.kill();
    let mut down = false;
    for _ in 0..300 {
        if r.healthy_workers().is_empty() {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down, "the health checker took the last worker out");
    let (s, _, body) = complete(&c, &r, json!({"prompt": "x"})).await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no_healthy_worker"));
    let (s, _, _) = call(&c, Method::GET, format!("{}/health", r.url()), "").await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    Ok(())
}

/// Polls `f` for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..1000 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("timed out waiting until {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_was_down_is_routed_to_again_once_healthy() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let mut b = StandIn::start("b", tx.clone()).await?;
    let r = RouterService::start(base_settings(vec![a.settings(true), b.settings(true)])).await?;
    let c = client();
    let ids: Vec<u32> = (0..64).collect();
    publish_until_seen(&mut b, &r, HolderId(1), &ids).await?;
    let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));

    // b goes down: out of the candidate set; what its events said stays
    // (a health blip must not hide its prefixes) until its events say more.
    let (http, events) = b.kill_all().await?;
    eventually("b is taken out", || r.healthy_workers() == vec!["a".to_string()]).await?;
    assert_eq!(r.router().index().holder_len(HolderId(1)), 4, "kept while down");
    for _ in 0..3 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "a"));
    }

    // b comes back on the same addresses: health checks bring it back, the
    // event stream is followed again, and its prefix wins again.
    let mut b = StandIn::start_at("b", tx, &http, &events).await?;
    eventually("b is healthy again", || r.healthy_workers().len() == 2).await?;
    let other: Vec<u32> = (1000..1064).collect();
    publish_until_seen(&mut b, &r, HolderId(1), &other).await?;
    // Its numbering started over: a restart, so what the old process
    // announced is forgotten.
    assert_eq!(held_by(&r, HolderId(1), &r.router().chain(&ids)), 0);
    let (s, w, _) = complete(&c, &r, json!({"prompt": other})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    let m = metrics(&c, &r).await?;
    assert!(m.contains("kvfabric_router_worker_healthy{worker=\"b\"} 1"), "{m}");
    r.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

/// A worker back from being down is subscribed to afresh even though its
/// publisher's connection never closed (it may be half-open), and a
/// publisher that closes cleanly is noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_subscriptions_follow_worker_health_and_publisher_closes() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut a = StandIn::start("a", tx.clone()).await?;
    let mut s = base_settings(vec![a.settings(true)]);
    s.health_interval_ms = 50;
    let r = RouterService::start(s).await?;
    let c = client();
    let ids: Vec<u32> = (0..64).collect();
    publish_until_seen(&mut a, &r, HolderId(0), &ids).await?;
    let line = |m: &str, name: &str| {
        m.lines()
            .find(|l| l.starts_with(&format!("kvfabric_router_{name}{{source=\"engine:a\"}}")))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(line(&metrics(&c, &r).await?, "event_stream_connects_total"), "1");

    // Its HTTP side goes down and comes back on the same address; the
    // publisher (and its connection) stays up all along.
    a.kill();
    let http = a.url.trim_start_matches("http://").to_string();
    eventually("a is taken out", || r.healthy_workers().is_empty()).await?;
    let mut back = None;
    for _ in 0..500 {
        if let Ok(w) = StandIn::start_at("a", tx.clone(), &http, "tcp://127.0.0.1:0").await {
            back = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back = back.context("a's HTTP address came free")?;
    eventually("a is healthy again", || r.healthy_workers().len() == 1).await?;
    let mut m = String::new();
    for _ in 0..500 {
        m = metrics(&c, &r).await?;
        if line(&m, "event_stream_connects_total") == "2" && line(&m, "event_stream_connected") == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(line(&m, "event_stream_connects_total"), "2", "resubscribed: {m}");
    // The fresh subscription is followed, numbering going on where it
    // was, and what the worker announced before the blip is still known.
    let more: Vec<u32> = (3000..3064).collect();
    publish_until_seen(&mut a, &r, HolderId(0), &more).await?;
    assert_eq!(
        held_by(&r, HolderId(0), &r.router().chain(&ids)),
        4,
        "kept across the blip"
    );

    // The publisher closes cleanly: the stream is seen to be down.
    let _ = std::mem::replace(&mut a.publisher, PubSocket::new()).close().await;
    for _ in 0..500 {
        m = metrics(&c, &r).await?;
        if line(&m, "event_stream_connected") == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(line(&m, "event_stream_connected"), "0", "{m}");
    r.shutdown().await;
    back.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_event_publisher_is_followed_and_resynchronised() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut a = StandIn::start("a", tx).await?;
    let r = RouterService::start(base_settings(vec![a.settings(true)])).await?;
    let c = client();
    let old: Vec<u32> = (0..64).collect();
    publish_until_seen(&mut a, &r, HolderId(0), &old).await?;
    assert_eq!(r.router().index().holder_len(HolderId(0)), 4);
    let counters = r.event_counters();
    let gaps0 = counters.gaps.load(std::sync::atomic::Ordering::Relaxed);

    // The engine restarts: a new publisher on the same endpoint, numbering
    // from 1 again. What the old one announced is no longer known to hold.
    let events = a.events.clone();
    let _ = std::mem::replace(&mut a.publisher, PubSocket::new()).close().await;
    let mut bound = None;
    for _ in 0..500 {
        match a.publisher.bind(&events).await {
            Ok(e) => {
                bound = Some(e);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(bound.is_some(), "the endpoint came free");
    a.seq = 0;
    let new: Vec<u32> = (5000..5032).collect();
    let mut seen = false;
    for _ in 0..500 {
        // Every message restarts the numbering until the router is back.
        a.seq = 0;
        a.publish(stored(&new)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let idx = r.router().index();
        if idx.holder_len(HolderId(0)) == 2 {
            seen = true;
            break;
        }
    }
    assert!(seen, "the router follows the new publisher and holds only its blocks");
    assert!(
        counters.gaps.load(std::sync::atomic::Ordering::Relaxed) > gaps0,
        "the restart resynchronised"
    );
    let (s, w, _) = complete(&c, &r, json!({"prompt": new})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "a"));
    r.shutdown().await;
    a.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fabric_blocks_from_before_the_router_and_after_a_node_restart_are_known() -> Result<()> {
    use kvfabric::client::{Client as FabricClient, Durability, PutObject};
    use kvfabric::server::{Node, Settings as NodeSettings};
    async fn node_at(dir: &std::path::Path, listen: std::net::SocketAddr) -> Result<kvfabric::server::NodeHandle> {
        let ns = NodeSettings {
            listen,
            ..node_settings(dir, "kvfabric-node")
        };
        Ok(Node::build(ns).await?.start().await?)
    }
    async fn put_until_seen(fc: &FabricClient, r: &RouterHandle, tokens: &[u32], want: usize) -> Result<()> {
        let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), tokens, 16, &[]);
        for _ in 0..300 {
            let objs = keys
                .iter()
                .map(|k| PutObject::new(k.to_vec(), vec![7u8; 512]))
                .collect();
            fc.put_many("ns", objs, Durability::Memory).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if r.router().index().holder_len(HolderId(FABRIC_HOLDER_BASE)) == want {
                return Ok(());
            }
        }
        bail!("the router never saw the node's blocks")
    }
    let dir = tempfile::tempdir()?;
    let node = node_at(&dir.path().join("1"), "127.0.0.1:0".parse()?).await?;
    let endpoint = node.endpoint();
    let listen: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse()?;
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx).await?;
    let mut s = base_settings(vec![a.settings(false)]);
    s.fabric = vec![FabricEndpoint {
        name: "n1".into(),
        url: endpoint.clone(),
    }];
    // Blocks stored before the router starts: the snapshot brings them.
    let fc = FabricClient::connect(endpoint.clone()).await?;
    let old: Vec<u32> = (0..64).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &old, 16, &[]);
    let objs = keys
        .iter()
        .map(|k| PutObject::new(k.to_vec(), vec![7u8; 512]))
        .collect();
    fc.put_many("ns", objs, Durability::Memory).await?;
    let r = RouterService::start(s).await?;
    let c = client();
    eventually("the snapshot is applied", || {
        r.router().index().holder_len(HolderId(FABRIC_HOLDER_BASE)) == 4
    })
    .await?;

    // The node restarts empty on the same address: the router reconnects,
    // forgets what the old process held, and follows the new one.
    node.shutdown().await;
    let mut back = None;
    for _ in 0..500 {
        match node_at(&dir.path().join("2"), listen).await {
            Ok(n) => {
                back = Some(n);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let node = back.context("the node's port never came free")?;
    let fc = FabricClient::connect(endpoint).await?;
    let new: Vec<u32> = (7000..7032).collect();
    put_until_seen(&fc, &r, &new, 2).await?;
    let m = metrics(&c, &r).await?;
    assert!(
        m.contains("kvfabric_router_event_stream_connected{source=\"fabric:n1\"} 1"),
        "{m}"
    );
    let connects = m
        .lines()
        .find(|l| l.starts_with("kvfabric_router_event_stream_connects_total{source=\"fabric:n1\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(connects >= 2.0, "reconnected: {m}");
    r.shutdown().await;
    node.shutdown().await;
    a.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_http_requests_get_openai_style_4xx() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx).await?;
    let mut s = base_settings(vec![a.settings(false)]);
    s.models = vec!["tiny".into()];
    s.max_body_size = kvfabric_router::config::ByteSize(1024);
    s.request_timeout_ms = 2000;
    let r = RouterService::start(s).await?;
    let c = client();
    let url = |p: &str| format!("{}{p}", r.url());
    let big = json!({"model": "tiny", "prompt": "y".repeat(2000)}).to_string();
    for (path, body, status, param, code) in [
        (
            "/v1/completions",
            "{not json".to_string(),
            400,
            Value::Null,
            Value::Null,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny"}).to_string(),
            400,
            json!("prompt"),
            Value::Null,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": {"a": 1}}).to_string(),
            400,
            json!("prompt"),
            Value::Null,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "stream": 1}).to_string(),
            400,
            json!("stream"),
            Value::Null,
        ),
        (
            "/v1/completions",
            json!({"prompt": "x"}).to_string(),
            400,
            json!("model"),
            Value::Null,
        ),
        (
            "/v1/completions",
            json!({"model": "huge", "prompt": "x"}).to_string(),
            404,
            json!("model"),
            json!("model_not_found"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": 3}).to_string(),
            400,
            json!("messages"),
            Value::Null,
        ),
        ("/v1/completions", big, 413, Value::Null, json!("request_too_large")),
        ("/v2/nothing", "{}".to_string(), 404, Value::Null, json!("unknown_url")),
        (
            "/v1/models",
            "{}".to_string(),
            405,
            Value::Null,
            json!("method_not_allowed"),
        ),
    ] {
        let (s, h, b) = call(&c, Method::POST, url(path), body.clone()).await?;
        assert_eq!(s.as_u16(), status, "{path} {b}");
        assert_eq!(h["content-type"], "application/json");
        let e: Value = serde_json::from_str(&b).with_context(|| b.clone())?;
        assert_eq!(e["error"]["type"], "invalid_request_error", "{b}");
        assert_eq!(e["error"]["param"], param, "{b}");
        assert_eq!(e["error"]["code"], code, "{b}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A client that stops sending its body gets 408 once the request
    // timeout passes, not a connection held for good.
    let mut tcp = tokio::net::TcpStream::connect(r.local_addr()).await?;
    tcp.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"",
    )
    .await?;
    let mut head = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), tcp.read_exact(&mut head)).await??;
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    let (s, _, b) = call(&c, Method::GET, url("/v1/models"), "").await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&b)?["data"][0]["id"], "tiny");
    let (s, _, _) = complete(&c, &r, json!({"model": "tiny", "prompt": "fine"})).await?;
    assert_eq!(s, StatusCode::OK, "the router still serves");
    let m = metrics(&c, &r).await?;
    assert!(
        m.contains("kvfabric_router_requests_total{route=\"/v1/completions\",status=\"400\"} 5"),
        "{m}"
    );
    r.shutdown().await;
    a.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approximate_mode_follows_its_own_decisions() -> Result<()> {
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let mut s = base_settings(vec![a.settings(false), b.settings(false)]);
    s.approximate = true;
    let r = RouterService::start(s).await?;
    let c = client();
    let ids: Vec<u32> = (0..160).collect();
    let (_, first, _) = complete(&c, &r, json!({"prompt": ids})).await?;
    let holder = HolderId(if first == "a" { 0 } else { 1 });
    assert_eq!(
        r.router().index().holder_len(holder),
        10,
        "the decision is recorded as cached"
    );
    for _ in 0..5 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w), (StatusCode::OK, first.clone()));
    }
    r.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_prompts_use_the_configured_tokenizer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tokenizer.json");
    std::fs::write(
        &path,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#,
    )?;
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let mut b = StandIn::start("b", tx).await?;
    let mut s = base_settings(vec![a.settings(true), b.settings(true)]);
    s.tokenizer = Some(path);
    let r = RouterService::start(s).await?;
    let c = client();
    // 32 words = two blocks of ids [1, 2, 1, 2, ...].
    let ids: Vec<u32> = (0..32).map(|i| 1 + (i % 2)).collect();
    publish_until_seen(&mut b, &r, HolderId(1), &ids).await?;
    let text = vec!["hello world"; 16].join(" ");
    for _ in 0..4 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": text})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    }
    r.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_serves_and_rejects_bad_settings() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_kvfabric-router");
    // A bad value stops it with a message naming the setting.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("router.toml");
    std::fs::write(&cfg, "health-interval-ms = 1\n")?;
    let out = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("health-interval-ms"),
        "{out:?}"
    );
    // So does a fabric token that cannot be read or is not a token, from
    // the setting's file or from $KVFABRIC_TOKEN.
    for (args, env, want) in [
        (&["--fabric-token-file", "/no/such/token"][..], "", "fabric-token-file"),
        (&[][..], "too-short", "$KVFABRIC_TOKEN"),
    ] {
        let out = tokio::process::Command::new(bin)
            .args(args)
            .env("KVFABRIC_TOKEN", env)
            .env_remove("RUST_LOG")
            .output()
            .await?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{out:?}");
    }
    // And fabric TLS settings that cannot work: an https:// node without
    // a CA, a CA file that is missing or holds no certificate, a client
    // certificate without its key.
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n")?;
    let key = key.to_str().context("utf-8 path")?;
    for (args, env, want) in [
        (&["--fabric", "https://127.0.0.1:1"][..], "", "set fabric-ca-file"),
        (&[][..], "/no/such/ca.pem", "fabric-ca-file /no/such/ca.pem"),
        (&[][..], key, "fabric-ca-file"),
        (&["--fabric-client-cert", key][..], "", "fabric-client-key go together"),
    ] {
        let mut cmd = tokio::process::Command::new(bin);
        match env {
            "" => cmd.env_remove("KVFABRIC_ROUTER_FABRIC_CA_FILE"),
            ca => cmd.env("KVFABRIC_ROUTER_FABRIC_CA_FILE", ca),
        };
        cmd.args(args)
            .env_remove("KVFABRIC_TOKEN")
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .context("the router did not stop")??;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(want), "{out:?}");
    }

    // A good one serves: flags add a worker and a fabric node (unreachable:
    // the subscription retries in the background without blocking serving).
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx).await?;
    let mut child = tokio::process::Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--fabric",
            "n1=http://127.0.0.1:1",
            "--worker",
        ])
        .arg(format!("a={}", a.url))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("the router printed its address")?;
    let url = line.rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let c = client();
    let (s, _, b) = call(&c, Method::GET, format!("{url}/health"), "").await?;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, h, _) = call(
        &c,
        Method::POST,
        format!("{url}/v1/completions"),
        json!({"prompt": [1, 2]}).to_string(),
    )
    .await?;
    assert_eq!(
        (s, &h["x-kvfabric-worker"]),
        (StatusCode::OK, &"a".parse::<axum::http::HeaderValue>()?)
    );
    child.kill().await?;
    a.kill();
    Ok(())
}

/// A three-node fabric cluster on a real etcd, of which the router is told
/// one node: it asks that node for the members (`Members`), follows every
/// node's events under a holder of its own (snapshot first, so blocks put
/// before the router started count), and forgets a node that leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_node_is_followed_through_one_configured_node() -> Result<()> {
    every_cluster_node_is_followed(false, false).await
}

/// The same with nodes that speak TLS and want client certificates: the
/// configured node is `https://`, the members it names register
/// `https://` endpoints, and the router reaches them all with its CA and
/// certificate (`fabric-ca-file`, `fabric-client-cert`, `fabric-client-key`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tls_cluster_node_is_followed_through_one_configured_node() -> Result<()> {
    every_cluster_node_is_followed(false, true).await
}

/// The same with no fabric node configured, only the cluster registry:
/// the members come from etcd's watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_node_is_followed_through_the_registry() -> Result<()> {
    every_cluster_node_is_followed(true, false).await
}

async fn every_cluster_node_is_followed(via_registry: bool, tls: bool) -> Result<()> {
    use kvfabric::server::Node;
    use kvfabric_router::DISCOVERED_HOLDER_OFFSET;
    let etcd = kvfabric::testutil::Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let certs = tempfile::tempdir()?;
    if tls {
        kvfabric::testutil::write_test_certificates(certs.path());
    }
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b", "c"]) {
        let mut ns = node_settings(d.path(), id);
        ns.local.enabled = false;
        ns.cluster.etcd = Some(etcd.url());
        ns.cluster.id = "rt".into();
        ns.cluster.refresh_interval_ms = 200;
        if tls {
            ns.tls.cert_file = Some(certs.path().join("server.pem"));
            ns.tls.key_file = Some(certs.path().join("server.key"));
            ns.tls.client_ca_file = Some(certs.path().join("ca.pem"));
            ns.tls.ca_file = Some(certs.path().join("ca.pem"));
        }
        nodes.push(Node::build(ns).await?.start().await?);
    }
    for n in &nodes {
        let view = n.serving_nodes().context("cluster mode")?;
        eventually("every node sees three members", || view.borrow().len() == 3).await?;
        let scheme = if tls { "https://" } else { "http://" };
        assert!(view.borrow().iter().all(|m| m.endpoint.starts_with(scheme)));
    }
    // 64 blocks put through a: the nodes forward them to their owners.
    let options = match tls {
        true => tls_options(certs.path(), true)?,
        false => Default::default(),
    };
    let fc = kvfabric::client::Client::connect_with(nodes[0].endpoint(), options).await?;
    let ids: Vec<u32> = (0..1024).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &ids, 16, &[]);
    let objs = keys
        .iter()
        .map(|k| kvfabric::client::PutObject::new(k.to_vec(), vec![7u8; 256]))
        .collect();
    fc.put_many("ns", objs, kvfabric::client::Durability::Memory).await?;
    let held: Vec<usize> = nodes.iter().map(|n| n.stack.len()).collect();
    assert!(held.iter().all(|&h| h > 0), "every node holds a share: {held:?}");

    let mut s = base_settings(vec![]);
    s.fabric_discover_ms = 100;
    if tls {
        // Read as the binary reads them, at load.
        let loaded = Settings::load(
            None,
            kvfabric_router::config::Overrides {
                fabric_ca_file: Some(certs.path().join("ca.pem")),
                fabric_client_cert: Some(certs.path().join("client.pem")),
                fabric_client_key: Some(certs.path().join("client.key")),
                ..Default::default()
            },
        )?;
        s.fabric_tls = loaded.fabric_tls;
        assert!(s.fabric_tls.as_ref().is_some_and(|t| t.has_identity()));
    }
    let discovered = |i: u32| HolderId(FABRIC_HOLDER_BASE + DISCOVERED_HOLDER_OFFSET + i);
    let holders = if via_registry {
        s.cluster = Some(etcd.url());
        s.cluster_id = "rt".into();
        [discovered(0), discovered(1), discovered(2)]
    } else {
        s.fabric = vec![FabricEndpoint {
            name: "a".into(),
            url: nodes[0].endpoint(),
        }];
        [HolderId(FABRIC_HOLDER_BASE), discovered(0), discovered(1)]
    };
    let r = RouterService::start(s).await?;
    let index = r.router().index().clone();
    let seen = || holders.map(|h| index.holder_len(h));
    for _ in 0..1000 {
        if seen().iter().zip(&held).all(|(s, h)| s == h) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen().to_vec(),
        held,
        "a's blocks, then b's and c's (discovered in id order; a too through the registry)"
    );
    let m = metrics(&client(), &r).await?;
    for src in ["fabric:a", "fabric:b", "fabric:c"] {
        assert!(
            m.contains(&format!("kvfabric_router_event_stream_connected{{source=\"{src}\"}} 1")),
            "{src}: {m}"
        );
    }

    // c leaves: its blocks are forgotten.
    let c = nodes.pop().context("three nodes")?;
    c.shutdown().await;
    eventually("c's blocks forgotten", || index.holder_len(holders[2]) == 0).await?;
    assert_eq!(index.holder_len(holders[1]), held[1], "b's blocks stay");
    r.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

/// Workers registered in the cluster registry (real etcd) are taken in,
/// their events followed and requests routed to them, and taken out (their
/// blocks forgotten) when their record goes; a registered name that a
/// configured worker uses is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_registered_in_the_cluster_come_and_go() -> Result<()> {
    use kvfabric::cluster::{WorkerLease, WorkerRecord};
    let etcd = kvfabric::testutil::Etcd::start().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let mut b = StandIn::start("b", tx.clone()).await?;
    let mut settings = base_settings(vec![a.settings(true)]);
    settings.cluster = Some(etcd.url());
    settings.cluster_id = "c1".into();
    let r = RouterService::start(settings).await?;
    let c = client();
    eventually("a is healthy", || r.healthy_workers() == vec!["a".to_string()]).await?;

    let record = |w: &StandIn| {
        let s = w.settings(true);
        WorkerRecord {
            name: s.name,
            url: s.url,
            kv_events: s.kv_events,
            fabric_node: None,
        }
    };
    // A record the router could not forward to (TLS) is refused when it is
    // registered, so it never reaches the router (which would drop it too).
    let mut tls = record(&b);
    tls.name = "tls".into();
    tls.url = "https://127.0.0.1:1".into();
    let refused = WorkerLease::register(etcd.target(), "c1", tls, 5).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("url")));
    let lease_b = WorkerLease::register(etcd.target(), "c1", record(&b), 5).await?;
    // A record under a configured worker's name (at another URL) is ignored.
    let mut clash = record(&b);
    clash.name = "a".into();
    let lease_clash = WorkerLease::register(etcd.target(), "c1", clash, 5).await?;
    eventually("b joins", || r.healthy_workers().len() == 2).await?;

    // b is holder 1 (after the configured a): its events are followed.
    let ids: Vec<u32> = (0..64).collect();
    publish_until_seen(&mut b, &r, HolderId(1), &ids).await?;
    let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    let (_, _, health) = call(&c, Method::GET, format!("{}/health", r.url()), "").await?;
    let health: Value = serde_json::from_str(&health)?;
    assert_eq!(health["workers"], 2, "{health}");
    assert_eq!(
        health["registered_workers"], 1,
        "tls and the clash are not taken in: {health}"
    );

    // b leaves the registry: out of the candidate set, its blocks dropped.
    lease_b.leave().await;
    eventually("b is taken out", || r.healthy_workers() == vec!["a".to_string()]).await?;
    eventually("b's blocks are dropped", || {
        r.router().index().holder_len(HolderId(1)) == 0
    })
    .await?;
    let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
    assert_eq!((s, w.as_str()), (StatusCode::OK, "a"));
    lease_clash.leave().await;
    r.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}

/// A registered worker that names its host's fabric node by node id (as
/// `kvfabric-worker --cluster --fabric` registers) is scored as co-located
/// with it once discovery has asked the configured node for its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registered_worker_is_colocated_with_its_node_by_node_id() -> Result<()> {
    use kvfabric::cluster::{WorkerLease, WorkerRecord};
    let etcd = kvfabric::testutil::Etcd::start().await;
    let dir = tempfile::tempdir()?;
    let (node, fc) = probed_node(dir.path(), "node-a").await?;

    let (tx, _rx) = mpsc::unbounded_channel();
    let a = StandIn::start("a", tx.clone()).await?;
    let b = StandIn::start("b", tx).await?;
    let mut s = base_settings(vec![a.settings(false)]);
    s.fabric = vec![FabricEndpoint {
        name: "n1".into(),
        url: node.endpoint(),
    }];
    s.fabric_discover_ms = 100;
    s.cluster = Some(etcd.url());
    s.cluster_id = "c1".into();
    let r = RouterService::start(s).await?;
    let lease = WorkerLease::register(
        etcd.target(),
        "c1",
        WorkerRecord {
            name: "b".into(),
            url: b.settings(false).url,
            kv_events: None,
            fabric_node: Some("node-a".into()),
        },
        5,
    )
    .await?;
    eventually("b joins", || r.healthy_workers().len() == 2).await?;

    let ids: Vec<u32> = (0..64).collect();
    let keys = kvfabric::hash::chain_hashes(kvfabric::hash::namespace_salt("ns"), &ids, 16, &[]);
    let objs = keys
        .iter()
        .map(|k| kvfabric::client::PutObject::new(k.to_vec(), vec![7u8; 1024]))
        .collect();
    fc.put_many("ns", objs, kvfabric::client::Durability::Memory).await?;
    eventually("the router sees the node's blocks", || {
        r.router().index().holder_len(HolderId(FABRIC_HOLDER_BASE)) >= 4
    })
    .await?;
    // Discovery asks every 100 ms; once it knows node-a is n1, b reads the
    // blocks at host bandwidth and a over the network: b wins every time.
    eventually("node-a is known as n1", || {
        r.colocated_node("b") == Some(HolderId(FABRIC_HOLDER_BASE))
    })
    .await?;
    assert_eq!(r.colocated_node("a"), None);
    let c = client();
    for _ in 0..5 {
        let (s, w, _) = complete(&c, &r, json!({"prompt": ids})).await?;
        assert_eq!((s, w.as_str()), (StatusCode::OK, "b"));
    }
    lease.leave().await;
    r.shutdown().await;
    node.shutdown().await;
    a.kill();
    b.kill();
    Ok(())
}
