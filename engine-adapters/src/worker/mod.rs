//! The engine worker: the reference engine served over an OpenAI-compatible
//! HTTP API, as the router forwards to it, in one of three roles
//! (aggregated, prefill, decode), with the fabric as its shared KV store.
//!
//! - [`Worker::start`] builds the model, binds the HTTP listener and the KV
//!   event publisher, and spawns the engine thread; [`WorkerHandle`] names
//!   what it bound and stops it. Usable in-process (tests, `kvfabric demo`)
//!   and from the `kvfabric-worker` binary.
//! - Settings: [`WorkerSettings`] (TOML, `KVFABRIC_WORKER_*`, flags).
//! - Pieces (private): `scheduler` (the engine thread, continuous
//!   batching), `cache` (the own prefix cache, the worker's "GPU tier"),
//!   `pipeline` (a request's way: own pool, fabric, remote prefill, engine,
//!   stores), `disagg` (the decode worker's remote prefill), `http` and
//!   `openai` (the API), `events` (vLLM KV events over ZMQ PUB), `metrics`.
//!
//! A request reuses the leading blocks of its prompt found in the worker's
//! own pool (no fabric I/O), loads the next ones from the fabric, and
//! computes the rest; the blocks it computed are stored in the fabric
//! before its response completes.

mod cache;
mod clock;
mod config;
mod disagg;
mod events;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod metrics;
mod openai;
mod pipeline;
mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use clock::{Clock, FixedClock, SystemClock};
pub use config::{Overrides, Role, SettingsError, WorkerSettings};
pub use events::event_block_hash;
pub use kvfabric::size::ByteSize;
pub use metrics::WorkerStats;

use crate::engine::{EngineError, Model, ModelConfig, Weights};
use metrics::Metrics;
use pipeline::{AppState, FabricConn};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The settings are invalid (the message names the setting).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The model or its weights did not load, or the pool could not be
    /// reserved.
    #[error("model: {0}")]
    Model(#[from] EngineError),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The KV event socket could not be bound.
    #[error("binding KV events at {endpoint}: {message}")]
    Events {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The engine thread could not be spawned.
    #[error("spawning the engine thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What a worker is built with besides its settings.
#[derive(Debug, Clone)]
pub struct Components {
    /// Wall clock of response times and KV event timestamps.
    pub clock: Arc<dyn Clock>,
}

impl Default for Components {
    fn default() -> Self {
        Components {
            clock: Arc::new(SystemClock),
        }
    }
}

/// Starts workers.
#[derive(Debug)]
pub struct Worker;

/// A running worker; dropping it stops its tasks and the engine thread,
/// [`WorkerHandle::shutdown`] also waits for them.
#[derive(Debug)]
pub struct WorkerHandle {
    addr: SocketAddr,
    kv_events: Option<String>,
    state: Arc<AppState>,
    server: Option<JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
}

impl Worker {
    /// Builds the model, binds `settings.listen` (and `kv-events`), spawns
    /// the engine thread and serves.
    pub async fn start(settings: WorkerSettings) -> Result<WorkerHandle, WorkerError> {
        Self::start_with(settings, Components::default()).await
    }

    /// [`Worker::start`] with explicit components.
    pub async fn start_with(mut settings: WorkerSettings, components: Components) -> Result<WorkerHandle, WorkerError> {
        settings.validate()?;
        // A token file, or TLS files, named but not read yet (settings not
        // made by `load`).
        settings.fabric_token = settings.token_to_send()?;
        settings.fabric_tls = settings.tls_to_use()?;
        let config = settings.resolve_model()?;
        let (weights_path, threads, pool_blocks) = (settings.weights.clone(), settings.threads, settings.pool_blocks);
        let cfg = config.clone();
        // Generating or reading weights and reserving the pool take a while
        // for big configs: not on an async worker thread.
        let engine = tokio::task::spawn_blocking(move || -> Result<crate::engine::Engine, EngineError> {
            let weights = match weights_path {
                Some(p) => Weights::load_safetensors(&cfg, p)?,
                None => Weights::generate(&cfg)?,
            };
            let mut engine = crate::engine::Engine::new(Model::new(weights), pool_blocks)?;
            if threads > 0 {
                engine.set_threads(threads);
            }
            Ok(engine)
        })
        .await
        .map_err(|e| WorkerError::Thread(std::io::Error::other(e.to_string())))??;

        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| WorkerError::Bind {
                addr: settings.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| WorkerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let (sink, kv_events, publisher) = match &settings.kv_events {
            Some(ep) => {
                let (sink, bound, task) = events::start(
                    ep,
                    settings.kv_events_topic.clone(),
                    components.clock.clone(),
                    metrics.clone(),
                )
                .await
                .map_err(|e| WorkerError::Events {
                    endpoint: ep.clone(),
                    message: e.to_string(),
                })?;
                (Some(sink), Some(bound), Some(task))
            }
            None => (None, None, None),
        };
        let salt = kvfabric::hash::namespace_salt(&settings.namespace);
        let pool_capacity = engine.pool().capacity();
        let layout = engine.kv_layout().clone();
        let limits = scheduler::Limits {
            max_batch_tokens: settings.max_batch_tokens,
            max_running: settings.max_running,
            salt,
        };
        let (handle, thread) = scheduler::spawn(engine, limits, sink, metrics.clone()).map_err(WorkerError::Thread)?;
        let fabric = settings
            .fabric
            .clone()
            .map(|url| Arc::new(FabricConn::new(&settings, url, layout, metrics.clone())));
        if let Some(f) = &fabric {
            // Connect now when possible; a node that is down is retried
            // after a cooldown.
            let _ = f.get().await;
        }
        if settings.role == Role::Decode && !settings.disaggregates() {
            tracing::info!("decode worker without a fabric or prefill workers: every prefill is local");
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        let model_name = settings
            .served_model_name
            .clone()
            .unwrap_or_else(|| config.model_id.clone());
        let role = settings.role;
        let state = Arc::new(AppState {
            settings,
            model: config,
            model_name,
            engine: handle,
            fabric,
            salt,
            pool_capacity,
            metrics,
            client,
            clock: components.clock,
            next_id: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = http::app(state.clone());
        let server = tokio::spawn(async move {
            let r = axum::serve(listener, svc)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracing::info!(%addr, %role, model = %state.model_name, kv_events = ?kv_events, "worker serving");
        Ok(WorkerHandle {
            addr,
            kv_events,
            state,
            server: Some(server),
            stop: Some(stop),
            engine: Some(thread),
            publisher,
        })
    }
}

impl WorkerHandle {
    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound KV event endpoint (`tcp://host:port`), when publishing.
    pub fn kv_events_endpoint(&self) -> Option<&str> {
        self.kv_events.as_deref()
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.state.settings.role
    }

    /// The model name it serves.
    pub fn model_name(&self) -> &str {
        &self.state.model_name
    }

    /// Its model config.
    pub fn model_config(&self) -> &ModelConfig {
        &self.state.model
    }

    /// Its settings.
    pub fn settings(&self) -> &WorkerSettings {
        &self.state.settings
    }

    /// A snapshot of its counters.
    pub fn stats(&self) -> WorkerStats {
        if let Some(kv) = self.state.fabric.as_ref().and_then(|f| f.connected()) {
            self.state.metrics.mirror_fabric(kv.counters());
        }
        self.state.metrics.stats()
    }

    /// Its `/metrics` text.
    pub fn metrics_text(&self) -> String {
        if let Some(kv) = self.state.fabric.as_ref().and_then(|f| f.connected()) {
            self.state.metrics.mirror_fabric(kv.counters());
        }
        self.state.metrics.render()
    }

    /// Stops serving (requests in flight finish first, for up to
    /// `shutdown-timeout-ms`; the engine thread's stop then fails those
    /// still running), then the engine thread (publishing
    /// `AllBlocksCleared`) and the event publisher.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.server.take() {
            let grace = Duration::from_millis(self.state.settings.shutdown_timeout_ms);
            let abort = s.abort_handle();
            if tokio::time::timeout(grace, s).await.is_err() {
                tracing::warn!(
                    shutdown_timeout_ms = self.state.settings.shutdown_timeout_ms,
                    "requests still in flight at the end of shutdown-timeout-ms: cutting them off"
                );
                abort.abort();
            }
        }
        self.state.engine.shutdown();
        if let Some(t) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(p) = self.publisher.take() {
            // The engine thread dropped its sink: the task ends once the
            // queue is sent.
            let abort = p.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), p).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!(addr = %self.addr, "worker stopped");
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
        if self.engine.is_some() {
            self.state.engine.shutdown();
        }
        if let Some(p) = &self.publisher {
            p.abort();
        }
    }
}
