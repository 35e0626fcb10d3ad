//! One request's way through the worker, on the async side: the own-pool
//! lookup (pinning what it finds), the disaggregation decision and remote
//! prefill (decode role), loading the next blocks from the fabric, the job
//! on the engine thread, and storing the blocks the engine computed into
//! the fabric, all of it awaited before the request's last answer, so a
//! following request can hit them.
//!
//! Fabric failures never fail a request: a load that fails computes, a
//! store that fails is logged and counted (only `/v1/prefill`, whose whole
//! point is the store, reports it to its caller). Every fabric call runs
//! under `fabric-timeout-ms`, and a node that is down or does not answer
//! is left alone for a cooldown ([`FabricConn`]), so a dead or stuck node
//! delays a request by at most that much and the requests after it not at
//! all.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use kvfabric::ErrorKind as FabricErrorKind;
use kvfabric::auth::Token;
use kvfabric::client::{Client, ClientError, ClientOptions, LocalClient};
use kvfabric::hash::{BlockHash, chain_hashes};
use kvfabric::local::LocalOptions;
use kvfabric::tls::ClientTls;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::clock::Clock;
use super::config::WorkerSettings;
use super::disagg;
use super::metrics::Metrics;
use super::openai::ApiError;
use super::scheduler::{EngineHandle, Job, JobError, Out};
use crate::engine::{FinishReason, KvLayout, ModelConfig, Sampling};
use crate::fabric_kv::FabricKv;

/// The HTTP/1 client towards prefill workers.
pub(crate) type HttpClient = HyperClient<HttpConnector, Full<Bytes>>;

/// Where a request's prompt was prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefillPlace {
    /// Here.
    Local,
    /// On a prefill worker (its blocks came through the fabric).
    Remote,
    /// A remote prefill failed; prefilled here.
    RemoteFailedLocal,
}

impl PrefillPlace {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PrefillPlace::Local => "local",
            PrefillPlace::Remote => "remote",
            PrefillPlace::RemoteFailedLocal => "remote-failed-local",
        }
    }
}

/// How long a worker serves without the fabric after a failed connect or
/// a call that timed out or found the node unreachable: from this ...
const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
/// ... doubling with each failure in a row, up to this.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// Why a fabric call came back without a result.
#[derive(Debug)]
pub(crate) struct FabricFailure {
    /// The node is unreachable or too slow (a timeout, or an error of kind
    /// `Unavailable`): the request goes on without the fabric.
    pub(crate) down: bool,
    /// Why, when the node refused the worker's token ([`refusal`]).
    pub(crate) refused: Option<String>,
    /// What happened.
    pub(crate) message: String,
}

/// What to fix when the node refused the worker (`UNAUTHENTICATED`,
/// `PERMISSION_DENIED`: its token, or its tenant); `None` for other
/// errors. A request refused goes on without the fabric, as for any
/// failed call.
pub(crate) fn refusal(e: &ClientError, tenant: &str) -> Option<String> {
    match e.kind() {
        FabricErrorKind::Unauthenticated => Some(
            "the fabric node authenticates and refused the worker's token (none, or one it does not accept): \
             set fabric-token-file (or $KVFABRIC_TOKEN) to a token in the node's tokens file"
                .to_string(),
        ),
        FabricErrorKind::PermissionDenied if tenant.is_empty() => Some(
            "the fabric node refused the worker's tenant (unset: the token's own, or without authentication \
             the default): the namespace is another tenant's"
                .to_string(),
        ),
        FabricErrorKind::PermissionDenied => Some(format!(
            "the fabric node refused tenant {tenant:?}: on a node that authenticates, the token must be that \
             tenant's (fabric-token-file and tenant must agree); else the namespace is another tenant's"
        )),
        _ => None,
    }
}

#[derive(Debug)]
struct Cooldown {
    /// No connect or call before this.
    until: Option<Instant>,
    /// The next cooldown's length.
    next: Duration,
}

/// The fabric connection, made on first use. A node that cannot be
/// reached, or that does not answer within `fabric-timeout-ms`, is left
/// alone for a cooldown (1 s, doubling up to 30 s while it keeps failing):
/// requests meanwhile are served without the fabric instead of each
/// waiting for it.
#[derive(Debug)]
pub(crate) struct FabricConn {
    url: String,
    socket: Option<std::path::PathBuf>,
    tenant: String,
    /// Sent on gRPC and in the local path's hello (`fabric-token-file`).
    token: Option<Token>,
    /// What gRPC verifies an `https://` node with, and the certificate it
    /// presents (`fabric-ca-file`, ...); the local path has no TLS.
    tls: Option<ClientTls>,
    namespace: String,
    layout: KvLayout,
    timeout: Duration,
    kv: OnceLock<Arc<FabricKv>>,
    /// Held by the one request connecting; others go on without waiting.
    connecting: tokio::sync::Mutex<()>,
    cooldown: Mutex<Cooldown>,
    metrics: Arc<Metrics>,
}

impl FabricConn {
    pub(crate) fn new(settings: &WorkerSettings, url: String, layout: KvLayout, metrics: Arc<Metrics>) -> Self {
        FabricConn {
            url,
            socket: settings.fabric_socket.clone(),
            tenant: settings.tenant.clone(),
            token: settings.fabric_token.clone(),
            tls: settings.fabric_tls.clone(),
            namespace: settings.namespace.clone(),
            layout,
            timeout: Duration::from_millis(settings.fabric_timeout_ms),
            kv: OnceLock::new(),
            connecting: tokio::sync::Mutex::new(()),
            cooldown: Mutex::new(Cooldown {
                until: None,
                next: FIRST_COOLDOWN,
            }),
            metrics,
        }
    }

    /// The connector, connecting if needed; `None` while the node is in
    /// its cooldown, while another request is connecting, or when the
    /// connect fails or times out (logged, counted, starting a cooldown).
    pub(crate) async fn get(&self) -> Option<Arc<FabricKv>> {
        if self.cooling() {
            return None;
        }
        if let Some(kv) = self.kv.get() {
            return Some(kv.clone());
        }
        let Ok(_connecting) = self.connecting.try_lock() else {
            return None;
        };
        if let Some(kv) = self.kv.get() {
            return Some(kv.clone());
        }
        match self.call("connect", self.connect()).await {
            Ok(kv) => Some(self.kv.get_or_init(|| kv).clone()),
            Err(_) => None,
        }
    }

    async fn connect(&self) -> Result<Arc<FabricKv>, ClientError> {
        let opts = ClientOptions {
            connect_timeout: self.timeout.min(Duration::from_secs(2)),
            token: self.token.clone(),
            tls: self.tls.clone(),
            ..ClientOptions::default()
        };
        let mut c = Client::connect_with(self.url.clone(), opts).await?;
        if !self.tenant.is_empty() {
            c = c.with_tenant(self.tenant.clone());
        }
        let mut kv = FabricKv::new(c, self.namespace.clone(), self.layout.clone());
        if let Some(socket) = &self.socket {
            let local = LocalClient::connect_with(
                socket,
                LocalOptions {
                    tenant: self.tenant.clone(),
                    token: self.token.clone(),
                    ..LocalOptions::default()
                },
            )
            .await;
            match local {
                Ok(l) => kv = kv.with_local(l),
                Err(e) => {
                    self.metrics.fabric_errors.with_label_values(&["connect"]).inc();
                    tracing::warn!(socket = %socket.display(), error = %e, "fabric local path unavailable: moving blocks over gRPC");
                }
            }
        }
        tracing::info!(url = %self.url, namespace = %self.namespace, local = kv.is_local(), "connected to the fabric");
        Ok(Arc::new(kv))
    }

    /// Runs one fabric call (`op` names it in logs and in
    /// `fabric_errors_total`) under `fabric-timeout-ms`. A timeout, an
    /// unreachable node or a refused token starts a cooldown; any failure
    /// is logged and counted.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, FabricFailure> {
        let failure = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => {
                self.recovered();
                return Ok(v);
            }
            Ok(Err(e)) => FabricFailure {
                down: e.kind() == FabricErrorKind::Unavailable,
                refused: refusal(&e, &self.tenant),
                message: e.to_string(),
            },
            Err(_) => FabricFailure {
                down: true,
                refused: None,
                message: format!("no answer within fabric-timeout-ms ({} ms)", self.timeout.as_millis()),
            },
        };
        self.metrics.fabric_errors.with_label_values(&[op]).inc();
        if let Some(why) = &failure.refused {
            // A token the node refuses stays refused until someone fixes a
            // setting: leave the node alone for a while as for an outage,
            // instead of a warning on every request.
            let pause = self.trip();
            tracing::warn!(url = %self.url, op, error = %failure.message, cooldown_ms = pause.as_millis() as u64,
                "fabric call refused: {why}; serving without the fabric for a while");
        } else if failure.down {
            let pause = self.trip();
            tracing::warn!(url = %self.url, op, error = %failure.message, cooldown_ms = pause.as_millis() as u64, "fabric unreachable: serving without it for a while");
        } else {
            tracing::warn!(url = %self.url, op, error = %failure.message, "fabric call failed");
        }
        Err(failure)
    }

    fn cooling(&self) -> bool {
        let c = self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        c.until.is_some_and(|t| Instant::now() < t)
    }

    /// Starts a cooldown; returns its length.
    fn trip(&self) -> Duration {
        let mut c = self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        let pause = c.next;
        c.until = Some(Instant::now() + pause);
        c.next = (pause * 2).min(MAX_COOLDOWN);
        pause
    }

    fn recovered(&self) {
        let mut c = self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        c.until = None;
        c.next = FIRST_COOLDOWN;
    }

    /// The connector if connected.
    pub(crate) fn connected(&self) -> Option<&Arc<FabricKv>> {
        self.kv.get()
    }
}

/// Everything a request handler needs.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) settings: WorkerSettings,
    pub(crate) model: ModelConfig,
    pub(crate) model_name: String,
    pub(crate) engine: EngineHandle,
    pub(crate) fabric: Option<Arc<FabricConn>>,
    pub(crate) salt: u64,
    pub(crate) pool_capacity: usize,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) client: HttpClient,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) next_id: AtomicU64,
}

impl AppState {
    /// A fresh request id.
    pub(crate) fn request_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Keys of the full blocks of `tokens`.
    pub(crate) fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        chain_hashes(self.salt, tokens, self.model.tokens_per_block, &[])
    }
}

/// Holds a request in the queue-depth gauge until its prefill is done.
#[derive(Debug)]
struct QueueGuard(Option<Arc<Metrics>>);

impl QueueGuard {
    fn new(m: &Arc<Metrics>) -> Self {
        m.queue_depth.inc();
        QueueGuard(Some(m.clone()))
    }
    fn done(&mut self) {
        if let Some(m) = self.0.take() {
            m.queue_depth.dec();
        }
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.done();
    }
}

/// What a request asks the engine for.
#[derive(Debug, Clone)]
pub(crate) struct GenRequest {
    pub(crate) tokens: Vec<u32>,
    /// 0: prefill only (`/v1/prefill`).
    pub(crate) max_tokens: usize,
    pub(crate) sampling: Sampling,
    pub(crate) ignore_eos: bool,
}

/// How a finished request went.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) finish: FinishReason,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) own_pool_tokens: usize,
    pub(crate) fabric_tokens: usize,
    pub(crate) computed_tokens: usize,
    pub(crate) place: PrefillPlace,
    /// Blocks stored into the fabric.
    pub(crate) stored_blocks: usize,
    /// Why a store failed, if one did.
    pub(crate) store_error: Option<String>,
}

impl Summary {
    /// `finish_reason` as OpenAI names it.
    pub(crate) fn finish_reason(&self) -> &'static str {
        match self.finish {
            FinishReason::Eos => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        }
    }

    /// The `kvfabric` extension object.
    pub(crate) fn extension(&self) -> serde_json::Value {
        serde_json::json!({
            "computed_tokens": self.computed_tokens,
            "own_pool_tokens": self.own_pool_tokens,
            "fabric_tokens": self.fabric_tokens,
            "prefill": self.place.as_str(),
        })
    }

    /// The `usage` object.
    pub(crate) fn usage(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.own_pool_tokens + self.fabric_tokens},
        })
    }
}

/// One step of a running request.
#[derive(Debug)]
pub(crate) enum Step {
    Token(u32),
    Done(Summary),
}

type StoreTask = JoinHandle<Result<usize, String>>;

/// A request in the engine (see the module doc).
#[derive(Debug)]
pub(crate) struct Generation {
    rx: mpsc::UnboundedReceiver<Out>,
    metrics: Arc<Metrics>,
    conn: Option<Arc<FabricConn>>,
    kv: Option<Arc<FabricKv>>,
    /// Why a store was not even tried.
    store_error: Option<String>,
    prompt: Vec<u32>,
    place: PrefillPlace,
    t0: Instant,
    last: Option<Instant>,
    queue: QueueGuard,
    stores: Vec<StoreTask>,
    own_pool_tokens: usize,
    fabric_tokens: usize,
    computed_tokens: usize,
    generated: usize,
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Capacity(m) => ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "capacity", m),
        JobError::Shutdown => ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the worker is shutting down",
        ),
        JobError::Engine(m) => ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", m),
    }
}

/// Starts a request (validated by the caller) that arrived at `t0`.
pub(crate) async fn start(state: &Arc<AppState>, req: GenRequest, t0: Instant) -> Result<Generation, ApiError> {
    if state.metrics.queue_depth.get() >= state.settings.max_waiting as i64 {
        return Err(ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{} requests are waiting for prefill (max-waiting); retry later",
                state.settings.max_waiting
            ),
        ));
    }
    let queue = QueueGuard::new(&state.metrics);
    let tpb = state.model.tokens_per_block;
    let len = req.tokens.len();
    let usable = len.saturating_sub(1) / tpb;
    let keys = state.keys(&req.tokens);
    let pinned = state.engine.lookup(keys[..usable].to_vec()).await.map_err(job_error)?;
    let own = pinned.len();
    let conn = state.fabric.clone();
    let mut kv = match &conn {
        Some(f) => f.get().await,
        None => None,
    };
    let prefill_only = req.max_tokens == 0;
    let mut place = PrefillPlace::Local;
    // Every fabric call below runs under `fabric-timeout-ms`; one that
    // finds the node down or too slow ends the fabric's part in this
    // request (`kv = None`), which then computes and stores nothing.
    if let (Some(f), Some(k)) = (&conn, kv.clone())
        && state.settings.disaggregates()
        && !prefill_only
    {
        match f.call("exists", k.present_blocks(&req.tokens, own..usable)).await {
            Err(e) if e.down => kv = None,
            r => {
                let present = r.unwrap_or(0);
                let uncached = len - (own + present) * tpb;
                if uncached >= state.settings.disagg_min_uncached_tokens {
                    place = disagg::remote_prefill(state, &req.tokens).await;
                } else {
                    tracing::debug!(uncached, "prefilling locally: short uncached part");
                }
            }
        }
    }
    let mut fabric = Vec::new();
    if let (Some(f), Some(k)) = (&conn, kv.clone())
        && own < usable
    {
        match f.call("load", k.load_blocks(&req.tokens, own..usable)).await {
            Ok(b) => fabric = b,
            Err(e) if e.down => kv = None,
            // Computed instead.
            Err(_) => {}
        }
    }
    if place == PrefillPlace::Remote && fabric.len() < usable - own {
        tracing::warn!(
            expected = usable - own,
            loaded = fabric.len(),
            "the prefill worker's blocks are not all in the fabric: computing the rest"
        );
    }
    let export_from = match (&conn, kv.clone()) {
        // A prefill worker makes sure every full block ends up in the
        // fabric, also those it had in its own pool.
        (Some(f), Some(k)) if prefill_only && own > 0 => {
            match f.call("exists", k.present_blocks(&req.tokens, 0..own)).await {
                Ok(n) => Some(n),
                Err(e) if e.down => {
                    kv = None;
                    None
                }
                Err(_) => Some(0),
            }
        }
        (_, Some(_)) => Some(own + fabric.len()),
        _ => None,
    };
    if prefill_only && conn.is_some() && kv.is_none() {
        // `/v1/prefill` exists to put the blocks into the fabric: without
        // it, the caller had better prefill locally.
        return Err(ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "fabric_unavailable",
            "the fabric node is unreachable: the prefilled blocks could not be stored",
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    state
        .engine
        .submit(Job {
            tokens: req.tokens.clone(),
            pinned,
            fabric,
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            ignore_eos: req.ignore_eos,
            export_from,
            out: tx,
        })
        .map_err(job_error)?;
    Ok(Generation {
        rx,
        metrics: state.metrics.clone(),
        conn,
        kv,
        store_error: None,
        prompt: req.tokens,
        place,
        t0,
        last: None,
        queue,
        stores: Vec::new(),
        own_pool_tokens: 0,
        fabric_tokens: 0,
        computed_tokens: 0,
        generated: 0,
    })
}

impl Generation {
    fn store(&mut self, tokens: Vec<u32>, blocks: Vec<(usize, Vec<u8>)>) {
        let (Some(conn), Some(kv)) = (self.conn.clone(), self.kv.clone()) else {
            return;
        };
        if blocks.is_empty() {
            return;
        }
        if conn.cooling() {
            // An earlier call of this request found the node down.
            self.store_error = Some("the fabric node is unreachable".into());
            return;
        }
        self.stores.push(tokio::spawn(async move {
            conn.call("store", kv.store(&tokens, blocks))
                .await
                .map_err(|e| e.message)
        }));
    }

    /// The next token, or the end.
    pub(crate) async fn next(&mut self) -> Result<Step, ApiError> {
        loop {
            let Some(out) = self.rx.recv().await else {
                return Err(job_error(JobError::Shutdown));
            };
            match out {
                Out::Prefilled {
                    own_pool_tokens,
                    fabric_tokens,
                    computed_tokens,
                    blocks,
                } => {
                    self.queue.done();
                    self.own_pool_tokens = own_pool_tokens;
                    self.fabric_tokens = fabric_tokens;
                    self.computed_tokens = computed_tokens;
                    let prompt = self.prompt.clone();
                    self.store(prompt, blocks);
                }
                Out::Token(t) => {
                    let now = Instant::now();
                    match self.last {
                        None => self.metrics.ttft.observe((now - self.t0).as_secs_f64()),
                        Some(l) => self.metrics.itl.observe((now - l).as_secs_f64()),
                    }
                    self.last = Some(now);
                    self.generated += 1;
                    return Ok(Step::Token(t));
                }
                Out::Finished { reason, tokens, blocks } => {
                    self.store(tokens, blocks);
                    let mut stored_blocks = 0;
                    let mut store_error = self.store_error.take();
                    for t in self.stores.drain(..) {
                        match t.await {
                            Ok(Ok(n)) => stored_blocks += n,
                            Ok(Err(e)) => store_error = Some(e),
                            Err(e) => store_error = Some(e.to_string()),
                        }
                    }
                    return Ok(Step::Done(Summary {
                        finish: reason,
                        prompt_tokens: self.prompt.len(),
                        completion_tokens: self.generated,
                        own_pool_tokens: self.own_pool_tokens,
                        fabric_tokens: self.fabric_tokens,
                        computed_tokens: self.computed_tokens,
                        place: self.place,
                        stored_blocks,
                        store_error,
                    }));
                }
                Out::Failed(e) => return Err(job_error(e)),
            }
        }
    }
}
