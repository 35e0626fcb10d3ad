//! The worker registry: the configured workers and those taken from the
//! cluster registry (added and removed while the router runs), whether
//! each is healthy, and the load each carries from requests in flight
//! through this router.
//!
//! Health: every `health-interval-ms` the checker sends `GET {url}/health`
//! to every worker, healthy or not; a 2xx within `health-timeout-ms` is
//! healthy. A worker that goes down (a failed check, or a connection
//! failure seen by a forwarded request) leaves the candidate set and its
//! own entries are cleared from the index (its pool is gone or unknown);
//! it comes back on the first check it passes.
//!
//! Load: a routed request adds the prefill tokens it still needs computed
//! until its response starts, and the KV blocks it will occupy while
//! decoding (prompt plus `max_tokens`) until it ends ([`LoadGuard`]). The
//! cached blocks it will load are queued, as load time, on the worker's
//! one load path, which the router expects free once the loads routed
//! there have had their time (`loading_tokens` of a candidate).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Router;
use crate::index::HolderId;
use crate::metrics::Metrics;
use crate::score::{Candidate, Load};

/// Fabric node names and node ids -> their holders: the configured nodes'
/// names, and the node ids fabric discovery learns (configured nodes' and
/// discovered ones'). A worker's `fabric-node` is looked up here each time
/// it is scored, so a node discovered after the worker registered counts.
pub(crate) type FabricNames = Arc<RwLock<std::collections::HashMap<String, HolderId>>>;

/// The HTTP/1 client the router talks to workers with.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new pooled HTTP/1 client.
pub(crate) fn http_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        // Below the 5 s keep-alive of common engine servers (uvicorn): a
        // pooled connection the server is closing is not reused, which
        // would fail the request and take the worker out.
        .pool_idle_timeout(Duration::from_secs(4))
        .build(conn)
}

/// One worker and its state.
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) name: String,
    /// Base URL without a trailing slash.
    pub(crate) url: String,
    pub(crate) holder: HolderId,
    /// The fabric node on its host (a name or node id in [`FabricNames`]).
    pub(crate) fabric_node: Option<String>,
    /// Its decisions are recorded as cached blocks (approximate mode).
    pub(crate) approximate: bool,
    /// Taken from the cluster registry (not configured).
    pub(crate) registered: bool,
    /// Its engine-event subscription, stopped when it is removed.
    pub(crate) events: Mutex<Option<JoinHandle<()>>>,
    /// Tells its event subscription to subscribe afresh: it came back
    /// after being down.
    pub(crate) resubscribe: Arc<tokio::sync::Notify>,
    /// It has been healthy once.
    was_up: AtomicBool,
    /// Removed: its metrics are gone and are not written again.
    removed: AtomicBool,
    healthy: AtomicBool,
    /// Why it is down, as last logged (empty while healthy): a reason is
    /// logged when it changes, so a worker that never came up says why.
    down_why: Mutex<String>,
    prefill: AtomicU64,
    decode: AtomicU64,
    /// Requests in flight; the gauge is set under this lock, so its last
    /// write is always the latest count (two requests ending at once on
    /// two threads could otherwise leave an older count in the gauge).
    inflight: Mutex<u64>,
    /// When the loads routed to it should be done: the bits of an `f64`
    /// of seconds since [`Workers::epoch`], each decision's load time
    /// queued behind the earlier ones
    /// ([`CostSettings::load_path_free_after`](crate::score::CostSettings::load_path_free_after)).
    load_free_s: AtomicU64,
}

/// Every worker: the configured ones first (holder id = position), then
/// registered ones as they come (fresh holder ids, never reused).
#[derive(Debug)]
pub(crate) struct Workers {
    list: RwLock<Vec<Arc<Worker>>>,
    next_holder: AtomicU32,
    /// Holder ids stay below this (the fabric nodes' start there).
    holder_limit: u32,
    names: FabricNames,
    router: Arc<Router>,
    metrics: Metrics,
    /// Time base of [`Worker::load_free_s`].
    epoch: std::time::Instant,
}

/// What a worker is added with.
#[derive(Clone, Debug)]
pub(crate) struct WorkerSpec {
    pub(crate) name: String,
    pub(crate) url: String,
    /// The fabric node on its host (a name or node id).
    pub(crate) fabric_node: Option<String>,
    /// Approximate mode.
    pub(crate) approximate: bool,
}

impl Workers {
    /// The configured workers; holder ids are the positions, registered
    /// workers get the ids after them, below `holder_limit`.
    pub(crate) fn new(
        specs: Vec<WorkerSpec>,
        holder_limit: u32,
        names: FabricNames,
        router: Arc<Router>,
        metrics: Metrics,
    ) -> Workers {
        let ws = Workers {
            list: RwLock::new(Vec::new()),
            next_holder: AtomicU32::new(0),
            holder_limit,
            names,
            router,
            metrics,
            epoch: std::time::Instant::now(),
        };
        for spec in specs {
            ws.add(spec, false);
        }
        ws
    }

    /// Adds a worker (unhealthy until its first check passes); None when a
    /// worker of that name exists or holder ids ran out.
    pub(crate) fn add(&self, spec: WorkerSpec, registered: bool) -> Option<Arc<Worker>> {
        let mut list = self.list.write();
        if list.iter().any(|w| w.name == spec.name) {
            return None;
        }
        let id = self.next_holder.fetch_add(1, Relaxed);
        if id >= self.holder_limit {
            tracing::error!(worker = %spec.name, "out of worker holder ids; not adding the worker");
            return None;
        }
        self.metrics.worker_healthy.with_label_values(&[&spec.name]).set(0);
        self.metrics.worker_inflight.with_label_values(&[&spec.name]).set(0);
        let w = Arc::new(Worker {
            url: spec.url.trim_end_matches('/').to_string(),
            name: spec.name,
            holder: HolderId(id),
            fabric_node: spec.fabric_node,
            approximate: spec.approximate,
            registered,
            events: Mutex::new(None),
            resubscribe: Arc::default(),
            was_up: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            down_why: Mutex::new(String::new()),
            prefill: AtomicU64::new(0),
            decode: AtomicU64::new(0),
            inflight: Mutex::new(0),
            load_free_s: AtomicU64::new(0f64.to_bits()),
        });
        list.push(w.clone());
        Some(w)
    }

    /// Removes the worker `name`: out of the candidate set, its index
    /// entries dropped, its event subscription stopped. Requests already
    /// forwarded to it finish.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Worker>> {
        // Its events stopped and its entries gone before the list shows it
        // gone, so whoever sees it gone sees them gone too (an event batch
        // being applied at that moment on another thread can still land;
        // its holder id is never reused or scored again).
        let w = self.list.read().iter().find(|w| w.name == name).cloned()?;
        w.healthy.store(false, Relaxed);
        if let Some(t) = w.events.lock().take() {
            t.abort();
        }
        self.router.remove_worker(w.holder);
        self.list.write().retain(|x| !Arc::ptr_eq(x, &w));
        {
            // Under the in-flight lock, so a request ending now does not
            // write its gauge back (LoadGuard checks `removed` under it).
            let _n = w.inflight.lock();
            w.removed.store(true, Relaxed);
            self.metrics.forget_worker(&w.name);
        }
        Some(w)
    }

    /// The fabric node worker `name` is scored as co-located with now.
    pub(crate) fn colocated(&self, name: &str) -> Option<HolderId> {
        let list = self.list.read();
        let w = list.iter().find(|w| w.name == name)?;
        let n = w.fabric_node.as_ref()?;
        self.names.read().get(n).copied()
    }

    /// Every worker now.
    pub(crate) fn all(&self) -> Vec<Arc<Worker>> {
        self.list.read().clone()
    }

    /// The healthy workers with their load, as candidates (same order).
    pub(crate) fn candidates(&self) -> (Vec<Arc<Worker>>, Vec<Candidate>) {
        let healthy: Vec<Arc<Worker>> = self.list.read().iter().filter(|w| w.is_healthy()).cloned().collect();
        let names = self.names.read();
        let now = self.now_s();
        let cost = self.router.settings();
        let cands = healthy
            .iter()
            .map(|w| Candidate {
                worker: w.holder,
                colocated: w.fabric_node.as_ref().and_then(|n| names.get(n).copied()),
                load: Load {
                    active_prefill_tokens: w.prefill.load(Relaxed),
                    active_decode_blocks: w.decode.load(Relaxed),
                    loading_tokens: cost.load_path_ahead(f64::from_bits(w.load_free_s.load(Relaxed)), now),
                },
            })
            .collect();
        (healthy, cands)
    }

    /// Records a health observation; a worker going down is forgotten by
    /// the index.
    pub(crate) fn set_healthy(&self, w: &Worker, up: bool, why: &str) {
        if w.removed.load(Relaxed) || (up && !self.list.read().iter().any(|x| std::ptr::eq(&**x, w))) {
            // Removed while its check was in flight.
            return;
        }
        let was = w.healthy.swap(up, Relaxed);
        let new_why = {
            let mut last = w.down_why.lock();
            let why = if up { "" } else { why };
            let new = *last != why;
            if new {
                *last = why.to_string();
            }
            new
        };
        if was == up {
            if !up && new_why {
                // Down from the start, or down for a new reason.
                tracing::warn!(worker = %w.name, why, "worker is not healthy: out of the candidate set until a health check passes");
            }
            return;
        }
        self.metrics.worker_healthy.with_label_values(&[&w.name]).set(up as i64);
        if up {
            tracing::info!(worker = %w.name, "worker is healthy");
            if w.was_up.swap(true, Relaxed) {
                // Back after being down: its events over a new connection
                // (the old one may be half-open).
                w.resubscribe.notify_one();
            }
        } else {
            tracing::warn!(worker = %w.name, why, "worker is down: out of the candidate set until a health check passes");
            // An event-fed worker's entries stay: a health blip must not
            // hide the prefixes it holds (engines do not announce cached
            // blocks again), and its event sequence tells a restart. A
            // worker scored from the router's own decisions forgets them.
            if w.events.lock().is_none() {
                self.router.remove_worker(w.holder);
            }
        }
    }

    /// Checks one worker once.
    pub(crate) async fn check_one(&self, client: &HttpClient, w: &Worker, timeout: Duration) {
        match probe(client, &w.url, timeout).await {
            Ok(()) => self.set_healthy(w, true, ""),
            Err(e) => self.set_healthy(w, false, &e),
        }
    }

    /// Checks every worker once, concurrently.
    pub(crate) async fn check_all(&self, client: &HttpClient, timeout: Duration) {
        let all = self.all();
        futures::future::join_all(all.iter().map(|w| self.check_one(client, w, timeout))).await;
    }

    fn now_s(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Adds a routed request's load to `w` until the guard is dropped, and
    /// queues its `load_tokens` (token-equivalents of cached blocks to
    /// load) on the worker's load path.
    pub(crate) fn admit(&self, w: &Arc<Worker>, prefill: u64, decode_blocks: u64, load_tokens: f64) -> LoadGuard {
        let load_tokens = load_tokens.max(0.0);
        if load_tokens > 0.0 {
            let cost = self.router.settings();
            w.update_load_path(self.now_s(), |free, now| {
                cost.load_path_free_after(free, now, load_tokens)
            });
        }
        w.prefill.fetch_add(prefill, Relaxed);
        w.decode.fetch_add(decode_blocks, Relaxed);
        w.count_inflight(&self.metrics, true);
        LoadGuard {
            worker: w.clone(),
            metrics: self.metrics.clone(),
            router: self.router.clone(),
            epoch: self.epoch,
            prefill,
            decode_blocks,
            load_tokens,
        }
    }
}

impl Worker {
    /// Whether it is in the candidate set.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// One request more (`up`) or fewer in flight, and the gauge set to the
    /// count under its lock (not written back once the worker is removed).
    fn count_inflight(&self, metrics: &Metrics, up: bool) {
        let mut n = self.inflight.lock();
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
        if !self.removed.load(Relaxed) {
            metrics.worker_inflight.with_label_values(&[&self.name]).set(*n as i64);
        }
    }

    /// Sets its load path's free time to `f(free, now)`, atomically.
    fn update_load_path(&self, now: f64, f: impl Fn(f64, f64) -> f64) {
        let _ = self
            .load_free_s
            .fetch_update(Relaxed, Relaxed, |free| Some(f(f64::from_bits(free), now).to_bits()));
    }
}

async fn probe(client: &HttpClient, url: &str, timeout: Duration) -> Result<(), String> {
    let req = hyper::Request::get(format!("{url}/health"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(format!("health check took over {timeout:?}")),
        Ok(Err(e)) => Err(format!("health check failed: {e}")),
        Ok(Ok(r)) if r.status().is_success() => Ok(()),
        Ok(Ok(r)) => Err(format!("health check returned {}", r.status())),
    }
}

/// A routed request's share of a worker's load (see the module doc).
#[derive(Debug)]
pub(crate) struct LoadGuard {
    worker: Arc<Worker>,
    metrics: Metrics,
    router: Arc<Router>,
    /// [`Workers::epoch`].
    epoch: std::time::Instant,
    prefill: u64,
    decode_blocks: u64,
    /// Its load queued on the worker's load path, until its first token.
    load_tokens: f64,
}

impl LoadGuard {
    /// The response started: its prefill is done, and so is its load.
    pub(crate) fn prefill_done(&mut self) {
        self.worker.prefill.fetch_sub(self.prefill, Relaxed);
        self.prefill = 0;
        self.load_tokens = 0.0;
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let w = &self.worker;
        if self.load_tokens > 0.0 {
            // Ended before its first token (failed or cancelled): its load
            // is taken off the load path rather than left to drain.
            let (cost, load) = (self.router.settings(), self.load_tokens);
            w.update_load_path(self.epoch.elapsed().as_secs_f64(), |free, now| {
                cost.load_path_free_without(free, now, load)
            });
        }
        w.prefill.fetch_sub(self.prefill, Relaxed);
        w.decode.fetch_sub(self.decode_blocks, Relaxed);
        w.count_inflight(&self.metrics, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ShardedIndex;

    fn spec(name: &str, fabric_node: Option<&str>) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            url: format!("http://{name}:1/"),
            fabric_node: fabric_node.map(Into::into),
            approximate: false,
        }
    }

    #[test]
    fn workers_come_and_go_and_find_their_fabric_node_when_it_is_known() {
        let router = Arc::new(Router::new(Default::default(), 0, Arc::new(ShardedIndex::new()), 0));
        let names: FabricNames = Arc::new(RwLock::new([("cfg".to_string(), HolderId(100))].into()));
        let ws = Workers::new(vec![spec("a", Some("cfg"))], 3, names.clone(), router, Metrics::new());
        let b = ws.add(spec("b", Some("node-7")), true).unwrap();
        assert_eq!(b.holder, HolderId(1));
        assert_eq!(b.url, "http://b:1", "trailing slash dropped");
        assert!(ws.add(spec("a", None), true).is_none(), "names are unique");
        for w in ws.all() {
            w.healthy.store(true, Relaxed);
        }
        let colocated = |ws: &Workers| ws.candidates().1.iter().map(|c| c.colocated).collect::<Vec<_>>();
        assert_eq!(colocated(&ws), vec![Some(HolderId(100)), None]);
        // Discovery learns node-7 later: b's next scoring sees it.
        names.write().insert("node-7".into(), HolderId(200));
        assert_eq!(colocated(&ws), vec![Some(HolderId(100)), Some(HolderId(200))]);
        // Removal takes b out; holder ids are not reused, and run out.
        assert_eq!(ws.remove("b").unwrap().holder, HolderId(1));
        assert!(ws.remove("b").is_none());
        assert_eq!(ws.candidates().0.len(), 1);
        assert_eq!(ws.add(spec("c", None), true).unwrap().holder, HolderId(2));
        assert!(
            ws.add(spec("d", None), true).is_none(),
            "holder ids below the limit only"
        );
    }

    #[test]
    fn a_removed_workers_series_go_and_stay_gone() {
        let router = Arc::new(Router::new(Default::default(), 0, Arc::new(ShardedIndex::new()), 0));
        let m = Metrics::new();
        let ws = Workers::new(vec![spec("a", None)], 3, Arc::default(), router.clone(), m.clone());
        let a = ws.all()[0].clone();
        ws.set_healthy(&a, true, "");
        m.decisions.with_label_values(&["a"]).inc();
        m.worker_errors.with_label_values(&["a", "body"]).inc();
        m.stream_connected.with_label_values(&["engine:a"]).set(1);
        let g = ws.admit(&a, 10, 1, 0.0);
        let text = || m.render(&crate::events::EventCounters::default(), router.index().as_ref());
        assert!(text().contains("worker=\"a\""), "{}", text());
        ws.remove("a");
        // A request that ends and a health check that lands after the
        // removal write nothing back.
        drop(g);
        ws.set_healthy(&a, false, "gone");
        let t = text();
        assert!(!t.contains("worker=\"a\"") && !t.contains("engine:a"), "{t}");
    }

    #[test]
    fn routed_loads_queue_on_a_workers_load_path_and_drain_with_time() {
        let router = Arc::new(Router::new(Default::default(), 0, Arc::new(ShardedIndex::new()), 0));
        let names: FabricNames = Arc::default();
        let ws = Workers::new(vec![spec("a", None)], 3, names, router.clone(), Metrics::new());
        let a = ws.all()[0].clone();
        a.healthy.store(true, Relaxed);
        let loading = |ws: &Workers| ws.candidates().1[0].load.loading_tokens;
        assert_eq!(loading(&ws), 0);
        // 10 s of loads at the configured prefill rate, queued back to back.
        let tps = router.settings().prefill_tokens_per_s;
        let g1 = ws.admit(&a, 100, 1, 5.0 * tps);
        let g2 = ws.admit(&a, 100, 1, 5.0 * tps);
        let left = loading(&ws) as f64;
        assert!(left > 9.0 * tps && left <= 10.0 * tps, "{left} of {}", 10.0 * tps);
        // A request that got its first token leaves its load on the path:
        // it drains with time.
        let (mut g1, mut g2) = (g1, g2);
        g1.prefill_done();
        g2.prefill_done();
        drop((g1, g2));
        assert!(loading(&ws) as f64 > 9.0 * tps);
        assert_eq!(ws.candidates().1[0].load.active_prefill_tokens, 0);
        let g3 = ws.admit(&a, 0, 0, 0.0);
        assert!(loading(&ws) as f64 > 9.0 * tps, "nothing to load adds nothing");
        drop(g3);
        // One that ends before its first token (failed, cancelled) takes its
        // load back; the loads queued behind it move up.
        let g4 = ws.admit(&a, 100, 1, 4.0 * tps);
        let g5 = ws.admit(&a, 100, 1, 3.0 * tps);
        let left = loading(&ws) as f64;
        assert!(left > 16.0 * tps && left <= 17.0 * tps, "{left} of {}", 17.0 * tps);
        drop(g4);
        let left = loading(&ws) as f64;
        assert!(left > 12.0 * tps && left <= 13.0 * tps, "{left} of {}", 13.0 * tps);
        drop(g5);
        let left = loading(&ws) as f64;
        assert!(left > 9.0 * tps && left <= 10.0 * tps, "{left} of {}", 10.0 * tps);
        assert_eq!(ws.candidates().1[0].load.active_prefill_tokens, 0);
    }
}
