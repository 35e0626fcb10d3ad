//! The running router: [`RouterService::start`] builds the index, the cost
//! model, the worker registry and the tokenizer from [`Settings`], starts
//! the event ingestion tasks (a `Subscribe` stream per fabric node, a ZMQ
//! SUB per engine worker with `kv-events`), runs a first round of health
//! checks, then the periodic checker, and serves the HTTP front end.
//!
//! With `cluster` set, workers registered in the cluster registry come and
//! go as their records do (module `registry`).
//!
//! Holder ids: worker `i` of `workers` is `HolderId(i)`, registered workers
//! take the next ones as they come; fabric node `j`
//! of `fabric` is `HolderId(FABRIC_HOLDER_BASE + j)`; cluster members found
//! through them (`fabric-discover-ms`) count up from
//! `FABRIC_HOLDER_BASE + DISCOVERED_HOLDER_OFFSET`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::events::{EngineTracker, EventCounters, FabricTracker};
use crate::http::{AppState, app};
use crate::index::{HolderId, PrefixIndex, ShardedIndex};
use crate::metrics::Metrics;
use crate::registry::{self, Registry, SpawnEvents};
use crate::tokenize::{TokenizeError, Tokenizer};
use crate::workers::{FabricNames, Worker, WorkerSpec, Workers, http_client};
use crate::{Router, ingest};

/// Holder id of the first fabric node.
pub const FABRIC_HOLDER_BASE: u32 = 1 << 20;
/// Discovered fabric nodes (cluster members not configured) get holder ids
/// from `FABRIC_HOLDER_BASE + DISCOVERED_HOLDER_OFFSET` on.
pub const DISCOVERED_HOLDER_OFFSET: u32 = 1 << 16;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The settings are invalid (the message names the setting).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// The tokenizer did not load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizeError),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Starts routers.
#[derive(Debug)]
pub struct RouterService;

/// A running router; dropping it stops its tasks, [`RouterHandle::shutdown`]
/// also waits for the HTTP server.
#[derive(Debug)]
pub struct RouterHandle {
    addr: SocketAddr,
    state: Arc<AppState>,
    tasks: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RouterService {
    /// Binds `settings.listen` and starts everything (see the module doc).
    pub async fn start(settings: Settings) -> Result<RouterHandle, ServeError> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: settings.listen,
                source,
            })?;
        Self::start_on(listener, settings).await
    }

    /// Starts on an already bound listener.
    pub async fn start_on(listener: TcpListener, settings: Settings) -> Result<RouterHandle, ServeError> {
        settings.validate().map_err(ServeError::Settings)?;
        let fabric_options = kvfabric::client::ClientOptions {
            token: settings.token_to_send().map_err(ServeError::Settings)?,
            tls: settings.tls_to_use().map_err(ServeError::Settings)?,
            ..Default::default()
        };
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
        let tokenizer = Tokenizer::load(settings.tokenizer.as_deref())?;
        let salt = kvfabric::hash::namespace_salt(&settings.namespace);
        let index: Arc<dyn PrefixIndex> = Arc::new(ShardedIndex::new());
        let router = Arc::new(Router::new(settings.cost, salt, index.clone(), settings.seed));
        let counters = Arc::new(EventCounters::default());
        let metrics = Metrics::new();
        let mut tasks = Vec::new();

        // Configured names now; discovery adds node ids.
        let names: FabricNames = Arc::new(parking_lot::RwLock::new(
            settings
                .fabric
                .iter()
                .enumerate()
                .map(|(j, f)| (f.name.clone(), HolderId(FABRIC_HOLDER_BASE + j as u32)))
                .collect(),
        ));
        for (j, f) in settings.fabric.iter().enumerate() {
            let holder = HolderId(FABRIC_HOLDER_BASE + j as u32);
            router.add_fabric_node(holder);
            let tracker = FabricTracker::new(holder, settings.namespace.clone(), index.clone(), counters.clone());
            tasks.push(tokio::spawn(ingest::fabric_events(
                format!("fabric:{}", f.name),
                f.url.clone(),
                settings.tenant.clone(),
                settings.namespace.clone(),
                fabric_options.clone(),
                tracker,
                metrics.clone(),
            )));
        }
        let registry_target = settings.cluster_endpoints().map_err(ServeError::Settings)?;
        if settings.fabric_discover_ms > 0 && (!settings.fabric.is_empty() || registry_target.is_some()) {
            tasks.push(tokio::spawn(ingest::discover_fabric(ingest::Discovery {
                registry: registry_target.clone().map(|t| (t, settings.cluster_id.clone())),
                entries: settings
                    .fabric
                    .iter()
                    .enumerate()
                    .map(|(j, f)| (f.name.clone(), f.url.clone(), HolderId(FABRIC_HOLDER_BASE + j as u32)))
                    .collect(),
                names: names.clone(),
                interval: Duration::from_millis(settings.fabric_discover_ms),
                tenant: settings.tenant.clone(),
                options: fabric_options.clone(),
                namespace: settings.namespace.clone(),
                router: router.clone(),
                index: index.clone(),
                counters: counters.clone(),
                metrics: metrics.clone(),
                first_holder: FABRIC_HOLDER_BASE + DISCOVERED_HOLDER_OFFSET,
            })));
        }
        let specs = settings
            .workers
            .iter()
            .map(|w| WorkerSpec {
                name: w.name.clone(),
                url: w.url.clone(),
                fabric_node: w.fabric_node.clone(),
                approximate: settings.approximate && w.kv_events.is_none(),
            })
            .collect();
        let workers = Arc::new(Workers::new(
            specs,
            FABRIC_HOLDER_BASE,
            names.clone(),
            router.clone(),
            metrics.clone(),
        ));
        let spawn_events: SpawnEvents = {
            let (index, counters, metrics) = (index.clone(), counters.clone(), metrics.clone());
            let block_tokens = settings.cost.block_tokens;
            Arc::new(move |w: &Worker, endpoint: String| {
                let tracker = EngineTracker::new(w.holder, salt, block_tokens, index.clone(), counters.clone());
                tokio::spawn(ingest::engine_events(
                    format!("engine:{}", w.name),
                    endpoint,
                    tracker,
                    counters.clone(),
                    metrics.clone(),
                    w.resubscribe.clone(),
                ))
            })
        };
        for (w, cfg) in workers.all().iter().zip(&settings.workers) {
            if let Some(ep) = &cfg.kv_events {
                *w.events.lock() = Some(spawn_events(w, ep.clone()));
            }
        }

        let client = http_client();
        let health_timeout = Duration::from_millis(settings.health_timeout_ms);
        workers.check_all(&client, health_timeout).await;
        if let Some(endpoints) = registry_target {
            tasks.push(tokio::spawn(registry::follow(Registry {
                endpoints,
                cluster_id: settings.cluster_id.clone(),
                workers: workers.clone(),
                approximate: settings.approximate,
                spawn_events,
                client: client.clone(),
                health_timeout,
            })));
        }
        {
            let (workers, client) = (workers.clone(), client.clone());
            let every = Duration::from_millis(settings.health_interval_ms);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    workers.check_all(&client, health_timeout).await;
                }
            }));
        }

        let state = Arc::new(AppState {
            router,
            workers,
            tokenizer,
            metrics,
            counters,
            client,
            models: settings.models.clone(),
            max_body: settings.max_body_size.0 as usize,
            timeout: Duration::from_millis(settings.request_timeout_ms),
            approximate_ttl_ms: settings.approximate_ttl_ms,
            started: Instant::now(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = app(state.clone());
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
        tracing::info!(%addr, workers = settings.workers.len(), fabric = settings.fabric.len(), "router serving");
        Ok(RouterHandle {
            addr,
            state,
            tasks,
            server: Some(server),
            stop: Some(stop),
        })
    }
}

impl RouterHandle {
    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The router it routes with.
    pub fn router(&self) -> &Arc<Router> {
        &self.state.router
    }

    /// Event ingestion counters.
    pub fn event_counters(&self) -> &EventCounters {
        &self.state.counters
    }

    /// Names of the workers now healthy.
    pub fn healthy_workers(&self) -> Vec<String> {
        let ws = self.state.workers.all();
        ws.iter().filter(|w| w.is_healthy()).map(|w| w.name.clone()).collect()
    }

    /// The holder of the fabric node worker `name` is scored as co-located
    /// with, if any (its `fabric-node`, once known by name or node id).
    pub fn colocated_node(&self, name: &str) -> Option<HolderId> {
        self.state.workers.colocated(name)
    }

    /// Stops every worker's engine-event subscription.
    fn stop_event_tasks(&self) {
        for w in self.state.workers.all() {
            if let Some(t) = w.events.lock().take() {
                t.abort();
            }
        }
    }

    /// Stops the tasks and the server (in-flight requests finish first).
    pub async fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.stop_event_tasks();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.stop_event_tasks();
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}
