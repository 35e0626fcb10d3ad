//! Builds a node from [`Settings`] (tiers, stack, namespace registry,
//! service) and runs it: the gRPC server and the metrics/health endpoint,
//! both with graceful shutdown. In cluster mode the node registers in etcd
//! before it serves (and refuses to start on an identity conflict), turns
//! `serving` once listening, and revokes its lease on shutdown; it also
//! watches the membership and forwards client requests for keys it does not
//! alone own to their owners, applies the cluster's namespace records
//! (replication) and runs repair (re-replication, hand-off, drain).

use super::auth::{Authenticator, NodeTokens};
use super::forward::{ClusterCtl, Forwarder};
use super::repair::Repairer;
use super::tombstones::Tombstones;
use super::{BlockService, FabricError, Metrics, Namespaces, Settings};
use crate::client::NodeInfo;
use crate::cluster::{MemberState, Membership, Registration, RegistrationConfig, TierUsage, UsageFn, watch_namespaces};
use crate::proto::MAX_MESSAGE_BYTES;
use crate::proto::v1::kv_block_service_server::KvBlockServiceServer;
use kvfabric_tiers::{
    Clock, DiskTier, DiskTierConfig, HostTier, IoEngineKind, ObjectTier, ObjectTierConfig, SystemClock, Tier, TierStack,
};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A built node, not yet listening.
#[derive(Debug)]
pub struct Node {
    settings: Settings,
    stack: Arc<TierStack>,
    namespaces: Arc<Namespaces>,
    metrics: Metrics,
    /// The tokens callers must present (`[auth]`); `None`: off.
    auth: Option<Arc<Authenticator>>,
    /// The token this node sends other nodes (`auth.node-token-file`).
    node_token: Option<crate::auth::Token>,
    /// `[tls]`, read: `None` when off.
    tls: Option<NodeTls>,
}

/// A node's TLS material (`[tls]`), read and checked at build.
#[derive(Clone, Debug)]
struct NodeTls {
    server: tonic::transport::ServerTlsConfig,
    /// What the node verifies its peers with, presenting its own
    /// certificate (`None` without `tls.ca-file`).
    peers: Option<crate::tls::ClientTls>,
}

impl NodeTls {
    fn load(t: &super::TlsSettings) -> Result<Option<NodeTls>, String> {
        use crate::tls::{ClientTls, read_pem};
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
            return Ok(None);
        };
        let cert = read_pem(cert, "CERTIFICATE", "tls.cert-file")?;
        crate::server::auth::warn_if_shared(key);
        let key = read_pem(key, "PRIVATE KEY", "tls.key-file")?;
        // A client that never finishes its handshake is dropped.
        let mut server = ServerTlsConfig::new()
            .identity(Identity::from_pem(&cert, &key))
            .timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = &t.client_ca_file {
            server = server.client_ca_root(Certificate::from_pem(read_pem(
                ca,
                "CERTIFICATE",
                "tls.client-ca-file",
            )?));
        }
        // Built once here, so that a key rustls cannot use (encrypted, say)
        // stops the node at build, before it joins a cluster.
        tonic::transport::Server::builder()
            .tls_config(server.clone())
            .map_err(|e| format!("tls.cert-file / tls.key-file: {e}"))?;
        let peers = match &t.ca_file {
            Some(ca) => Some(ClientTls::from_pem(
                read_pem(ca, "CERTIFICATE", "tls.ca-file")?,
                Some((cert, key)),
            )),
            None => None,
        };
        Ok(Some(NodeTls { server, peers }))
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound metrics address.
    pub metrics_addr: SocketAddr,
    /// The stack, for in-process inspection.
    pub stack: Arc<TierStack>,
    /// Unix socket of the zero-copy local path, when it is served.
    pub local_socket: Option<std::path::PathBuf>,
    /// Whether the gRPC listener speaks TLS.
    tls: bool,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    background: Option<kvfabric_tiers::BackgroundHandle>,
    registration: Option<Registration>,
    forwarder: Option<Arc<Forwarder>>,
    /// Stops the repair task.
    repair_stop: tokio::sync::watch::Sender<bool>,
    /// Cluster background tasks (namespace records, repair).
    cluster_tasks: Vec<JoinHandle<()>>,
}

/// Longest a node that comes back with data spends reconciling with the
/// cluster before it serves.
const RECONCILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest a failed start waits for its cluster lease to be revoked (each
/// etcd call is bounded by 3 s).
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often namespaces created during an etcd outage are claimed again.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

/// Largest HTTP/2 frame either side accepts (the protocol default is 16 KiB).
const MAX_FRAME_BYTES: u32 = 4 << 20;

fn startup(what: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Internal(format!("{what}: {e}"))
}

impl Node {
    /// Opens every configured tier (recovering persistent ones) with the
    /// real clock.
    pub async fn build(settings: Settings) -> Result<Node, FabricError> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Like [`Node::build`] with an injected clock.
    pub async fn build_with_clock(settings: Settings, clock: Arc<dyn Clock>) -> Result<Node, FabricError> {
        settings.validate().map_err(FabricError::InvalidArgument)?;
        let auth = Authenticator::from_settings(&settings.auth).map_err(FabricError::InvalidArgument)?;
        if let Some(a) = &auth {
            tracing::info!(tokens = a.len(), "authentication on: every call needs a token");
        }
        // What this node sends its peers (also with authentication off
        // here: the cluster's nodes may be turning it on one by one).
        let node_token = match &settings.auth.node_token_file {
            Some(p) => Some(NodeTokens::read(p).map_err(FabricError::InvalidArgument)?.send),
            None => None,
        };
        let tls = NodeTls::load(&settings.tls).map_err(FabricError::InvalidArgument)?;
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|e| startup(&format!("creating data dir {}", settings.data_dir.display()), e))?;
        let mut tiers: Vec<Arc<dyn Tier>> = Vec::new();
        let host = if settings.host.capacity.0 > 0 {
            Some(Arc::new(HostTier::with_prefault(
                settings.host.capacity.0,
                settings.host.prefault,
            )?))
        } else {
            None
        };
        if settings.hbm.capacity.0 > 0 {
            match kvfabric_tiers::try_hbm_tier(settings.hbm.capacity.0, settings.hbm.device, host.clone())? {
                Some(t) => tiers.push(t),
                None => tracing::warn!("hbm.capacity is set but no GPU tier could be created; continuing without it"),
            }
        } else {
            tracing::info!("GPU HBM tier disabled (hbm.capacity = 0)");
        }
        if let Some(h) = host {
            tiers.push(h);
        }
        if settings.disk.capacity.0 > 0 {
            let d = &settings.disk;
            let mut cfg = DiskTierConfig::new(settings.data_dir.join("disk"), d.capacity.0);
            cfg.file_size = d.file_size.0;
            cfg.queue_depth = d.queue_depth;
            cfg.registered_buffers = d.registered_buffers;
            cfg.engine = match d.engine.as_str() {
                "uring" => IoEngineKind::Uring,
                "psync" => IoEngineKind::Psync,
                _ => IoEngineKind::Auto,
            };
            let disk = tokio::task::spawn_blocking(move || DiskTier::open(cfg))
                .await
                .map_err(|e| startup("opening disk tier", e))??;
            tiers.push(Arc::new(disk));
        }
        if let Some(url) = &settings.object.url {
            let o = &settings.object;
            let mut cfg = ObjectTierConfig::new(url.clone());
            cfg.endpoint = o.endpoint.clone();
            cfg.region = o.region.clone();
            cfg.access_key_id = o.access_key_id.clone();
            cfg.secret_access_key = o.secret_access_key.clone();
            // Default: allowed for a plain-HTTP endpoint, whether set here
            // or taken from AWS_ENDPOINT_URL (which the S3 client reads).
            let endpoint = o.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
            cfg.allow_http = o
                .allow_http
                .unwrap_or_else(|| endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
            if let Some(c) = o.capacity {
                cfg.capacity = c.0;
            }
            tiers.push(Arc::new(ObjectTier::open(cfg).await?));
        }
        let stack = Arc::new(TierStack::open(tiers, clock).await?);
        let namespaces = Arc::new(
            Namespaces::load(Some(settings.data_dir.join("namespaces")))
                .map_err(|e| startup("loading namespace registry", e))?
                .with_limits(
                    settings.limits.max_namespaces,
                    settings.limits.max_namespaces_per_tenant,
                ),
        );
        namespaces
            .adopt(stack.namespaces())
            .map_err(|e| startup("saving namespace registry", e))?;
        let kinds: Vec<&str> = stack.kinds().iter().map(|k| k.as_str()).collect();
        tracing::info!(tiers = ?kinds, objects = stack.len(), "node built");
        Ok(Node {
            settings,
            stack,
            namespaces,
            metrics: Metrics::new(),
            auth,
            node_token,
            tls,
        })
    }

    /// The stack.
    pub fn stack(&self) -> &Arc<TierStack> {
        &self.stack
    }

    /// Binds both listeners and serves until [`NodeHandle::shutdown`].
    pub async fn start(self) -> Result<NodeHandle, FabricError> {
        let s = &self.settings;
        let grpc = tokio::net::TcpListener::bind(s.listen)
            .await
            .map_err(|e| startup(&format!("binding {}", s.listen), e))?;
        let metrics_l = tokio::net::TcpListener::bind(s.metrics_listen)
            .await
            .map_err(|e| startup(&format!("binding metrics {}", s.metrics_listen), e))?;
        let grpc_addr = grpc.local_addr().map_err(|e| startup("local addr", e))?;
        let metrics_addr = metrics_l.local_addr().map_err(|e| startup("local addr", e))?;
        let repair_status = Arc::new(crate::cluster::RepairStatus::default());
        // Parsed once: an `etcds://` URL reads its certificate files.
        let etcd = s.cluster.etcd_endpoints().map_err(FabricError::InvalidArgument)?;
        let mut registration = self
            .join_cluster(etcd.clone(), grpc_addr, metrics_addr, repair_status.clone())
            .await?;
        match self
            .serve(grpc, metrics_l, etcd, repair_status, &mut registration)
            .await
        {
            Ok(h) => Ok(h),
            Err(e) => {
                // Failed after joining: revoke the lease now, or the record
                // would stay for the TTL and hold up the next start.
                if let Some(r) = registration.take()
                    && tokio::time::timeout(LEAVE_TIMEOUT, r.leave()).await.is_err()
                {
                    tracing::warn!("revoking the cluster lease after a failed start took over {LEAVE_TIMEOUT:?}");
                }
                Err(e)
            }
        }
    }

    /// The rest of [`Node::start`], once joined (`registration` is taken
    /// into the handle on success; left for the caller to revoke otherwise).
    async fn serve(
        self,
        grpc: tokio::net::TcpListener,
        metrics_l: tokio::net::TcpListener,
        etcd: Option<crate::cluster::EtcdTarget>,
        repair_status: Arc<crate::cluster::RepairStatus>,
        registration: &mut Option<Registration>,
    ) -> Result<NodeHandle, FabricError> {
        let s = &self.settings;
        let grpc_addr = grpc.local_addr().map_err(|e| startup("local addr", e))?;
        let metrics_addr = metrics_l.local_addr().map_err(|e| startup("local addr", e))?;
        let (repair_stop, repair_stop_rx) = tokio::sync::watch::channel(false);
        let mut cluster_tasks = Vec::new();
        let mut repairer_slot = None;
        let forwarder = match (registration.as_ref(), etcd) {
            (Some(reg), Some(etcd)) => {
                let membership = Membership::start(etcd.clone(), s.cluster.id.clone())
                    .await
                    .map_err(|e| startup("watching the cluster membership", e))?;
                let ns_watch = watch_namespaces(etcd.clone(), &s.cluster.id)
                    .await
                    .map_err(|e| startup("watching the cluster's namespaces", e))?;
                let mut ns_rx = ns_watch.subscribe();
                let ctl = ClusterCtl {
                    etcd,
                    cluster_id: s.cluster.id.clone(),
                    state: reg.state_handle(),
                    kick: Arc::new(tokio::sync::Notify::new()),
                };
                // Requests to other nodes carry the node token.
                let options = crate::client::ClientOptions {
                    token: self.node_token.clone(),
                    tls: self.tls.as_ref().and_then(|t| t.peers.clone()),
                    ..Default::default()
                };
                let f = Arc::new(Forwarder::new(
                    membership,
                    Some(ns_watch),
                    s.node_id.clone(),
                    ctl,
                    std::time::Duration::from_secs(s.cluster.handoff_window_s),
                    s.limits.max_batch_keys,
                    options,
                ));
                // Apply the cluster's namespace records to the registry and
                // the forwarding client, now and on every change.
                let apply = {
                    let (f, namespaces, stack) = (f.clone(), self.namespaces.clone(), self.stack.clone());
                    let stop = repair_stop.subscribe();
                    move |map: &crate::cluster::NamespaceMap| {
                        let crate::server::namespaces::Applied { changed, reassigning } =
                            namespaces.apply_cluster(map.values());
                        // Taken by another tenant elsewhere (while this
                        // node knew the name locally): what this node
                        // holds in it is the old owner's; drop it, then
                        // hand the namespace over.
                        for n in reassigning {
                            let (namespaces, stack, kick) = (namespaces.clone(), stack.clone(), f.ctl.kick.clone());
                            let mut stop = stop.clone();
                            let purge = async move {
                                // Writes already past their check finish first.
                                namespaces.writes_done(&n).await;
                                let mut backoff = std::time::Duration::from_secs(1);
                                // Until done, or the hand-over is called off.
                                while namespaces.is_reassigning(&n) {
                                    match stack.clear_namespace(&n).await {
                                        Ok(dropped) => {
                                            tracing::warn!(namespace = %n, dropped, "dropped the previous owner's objects");
                                            if namespaces.finish_reassign(&n) {
                                                kick.notify_one();
                                            }
                                            return;
                                        }
                                        Err(e) => tracing::error!(namespace = %n, error = %e,
                                            "could not drop the previous owner's objects; the namespace stays closed, retrying"),
                                    }
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                                }
                            };
                            // Ends with the node (a restart applies the
                            // records again and starts over).
                            tokio::spawn(async move {
                                tokio::select! {
                                    _ = purge => {}
                                    _ = stop.changed() => {}
                                }
                            });
                        }
                        // Every record (the registry may have known them
                        // from its file, unchanged), and the retired ones.
                        for r in map.values() {
                            f.set_replication(&r.name, r.replication);
                        }
                        for n in &changed {
                            f.set_replication(n, namespaces.replication(n));
                        }
                        if !changed.is_empty() {
                            f.ctl.kick.notify_one();
                        }
                    }
                };
                apply(&ns_rx.borrow_and_update());
                cluster_tasks.push(tokio::spawn(async move {
                    while ns_rx.changed().await.is_ok() {
                        let map = ns_rx.borrow_and_update().clone();
                        apply(&map);
                    }
                }));
                let repairer = Repairer {
                    stack: self.stack.clone(),
                    namespaces: self.namespaces.clone(),
                    forwarder: f.clone(),
                    metrics: self.metrics.clone(),
                    node_id: s.node_id.clone(),
                    interval: std::time::Duration::from_millis(s.cluster.repair_interval_ms),
                    bytes_per_s: s.cluster.repair_bytes_per_s.0,
                    status: repair_status,
                    kick: f.ctl.kick.clone(),
                };
                repairer_slot = Some(repairer);
                Some(f)
            }
            _ => None,
        };
        let tombstones = Arc::new(
            Tombstones::load(
                Some(s.data_dir.join("tombstones")),
                s.cluster.tombstone_ttl_s * 1000,
                self.stack.clock().now_ms(),
            )
            .map_err(|e| startup("loading tombstones", e))?
            .with_max_entries(s.cluster.max_tombstones),
        );
        let service = BlockService::with_forwarder(
            self.stack.clone(),
            self.namespaces.clone(),
            self.metrics.clone(),
            s.limits.clone(),
            s.node_id.clone(),
            forwarder.clone(),
            tombstones,
        )
        .with_auth(self.auth.clone());
        if forwarder.is_some() {
            // Namespaces created alone during an etcd outage: claimed once
            // etcd answers again.
            let (svc, mut stop) = (service.clone(), repair_stop.subscribe());
            cluster_tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(CLAIM_RETRY) => svc.retry_claims().await,
                        _ = stop.changed() => return,
                    }
                }
            }));
        }
        if let Some(a) = &self.auth
            && s.auth.reload_interval_s > 0
        {
            let m = self.metrics.clone();
            cluster_tasks.push(a.spawn_reloader(
                std::time::Duration::from_secs(s.auth.reload_interval_s),
                repair_stop.subscribe(),
                move |ok| {
                    m.auth_reloads
                        .with_label_values(&[if ok { "ok" } else { "error" }])
                        .inc()
                },
            ));
        }
        let streams = service.clone();
        let background = if s.tiering.background {
            let t = &s.tiering;
            let cfg = kvfabric_tiers::BackgroundConfig {
                high_watermark: t.high_watermark,
                low_watermark: t.low_watermark,
                promote_queue: t.promote_queue,
                promote_queue_bytes: t.promote_queue_bytes.0,
                ..Default::default()
            };
            Some(self.stack.start_background(cfg)?)
        } else {
            None
        };
        let (local_stop, local_stop_rx) = tokio::sync::watch::channel(false);
        let mut local_socket = None;
        let mut local_task = None;
        if s.local.enabled && self.stack.host_tier().is_some() {
            let path = s.local_socket();
            let shared = Arc::new(super::local::LocalShared {
                stack: self.stack.clone(),
                namespaces: self.namespaces.clone(),
                metrics: self.metrics.clone(),
                settings: s.local.clone(),
                max_batch_keys: s.limits.max_batch_keys,
                max_object_size: s.limits.max_object_size.0,
                node_id: s.node_id.clone(),
                service: service.clone(),
            });
            local_task = Some(super::local::serve(path.clone(), shared, local_stop_rx).await?);
            local_socket = Some(path);
        } else if s.local.enabled {
            tracing::info!("zero-copy local path off: it needs a host tier (host.capacity > 0)");
        }
        let (tx, rx) = oneshot::channel::<()>();
        let (mtx, mrx) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = &self.tls {
            builder = builder
                .tls_config(t.server.clone())
                .map_err(|e| startup("setting up TLS from tls.cert-file and tls.key-file", e))?;
        }
        let server = builder
            .tcp_nodelay(true)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            // Bigger DATA frames from clients: a 1 MiB chunk is one frame, not 64 of 16 KiB.
            .max_frame_size(MAX_FRAME_BYTES)
            .add_service(
                KvBlockServiceServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        // Accepted sockets need TCP_NODELAY set here: the builder's `tcp_nodelay` does
        // not apply to a caller-supplied listener, and Nagle adds ~40 ms stalls.
        let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
        let grpc_task = tokio::spawn(async move {
            let r = server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                    streams.stop_streams();
                    local_stop.send_replace(true);
                    let _ = mtx.send(());
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        let stack = self.stack.clone();
        let metrics = self.metrics.clone();
        let fwd = forwarder.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let (stack, metrics) = (stack.clone(), metrics.clone());
                    if let Some(f) = &fwd {
                        metrics.mirror_handoff_reads(f.handoff_reads());
                        metrics.handoff_pending.set(i64::from(f.handoff_pending()));
                    }
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            metrics.render(&stack),
                        )
                    }
                }),
            )
            .route("/health", axum::routing::get(|| async { "ok\n" }));
        let metrics_task = tokio::spawn(async move {
            let r = axum::serve(metrics_l, app)
                .with_graceful_shutdown(async {
                    let _ = mrx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        if let Some(repairer) = repairer_slot {
            // Back with data: drop what was deleted or replaced meanwhile
            // before anyone is sent here (bounded: peers may not answer).
            if !self.stack.is_empty()
                && tokio::time::timeout(RECONCILE_TIMEOUT, repairer.reconcile())
                    .await
                    .is_err()
            {
                tracing::warn!(
                    "reconciling with the cluster took over {RECONCILE_TIMEOUT:?}; serving anyway (repair goes on)"
                );
            }
            cluster_tasks.push(tokio::spawn(repairer.run(repair_stop_rx)));
        }
        tracing::info!(%grpc_addr, %metrics_addr, "kvfabric node serving");
        if let Some(r) = registration.as_ref() {
            r.set_state(MemberState::Serving);
        }
        let mut tasks = vec![grpc_task, metrics_task];
        tasks.extend(local_task);
        Ok(NodeHandle {
            grpc_addr,
            metrics_addr,
            tls: self.tls.is_some(),
            stack: self.stack,
            local_socket,
            shutdown: Some(tx),
            tasks,
            background,
            registration: registration.take(),
            forwarder,
            repair_stop,
            cluster_tasks,
        })
    }

    /// In cluster mode (`etcd` set), registers the node (state `joining`)
    /// under the advertised endpoints; `None` for a single node.
    async fn join_cluster(
        &self,
        etcd: Option<crate::cluster::EtcdTarget>,
        grpc_addr: SocketAddr,
        metrics_addr: SocketAddr,
        repair: Arc<crate::cluster::RepairStatus>,
    ) -> Result<Option<Registration>, FabricError> {
        let s = &self.settings;
        let Some(etcd) = etcd else {
            return Ok(None);
        };
        let advertise = s.cluster.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());
        let metrics_endpoint = if metrics_addr.ip().is_unspecified() {
            let host = advertise.rsplit_once(':').map_or(advertise.as_str(), |(h, _)| h);
            format!("http://{host}:{}/metrics", metrics_addr.port())
        } else {
            format!("http://{metrics_addr}/metrics")
        };
        let stack = self.stack.clone();
        let usage: UsageFn = Arc::new(move || {
            stack
                .stats()
                .iter()
                .map(|t| TierUsage {
                    tier: t.kind.map_or("unknown", |k| k.as_str()).to_string(),
                    capacity_bytes: t.capacity,
                    used_bytes: t.used,
                    objects: t.objects,
                })
                .collect()
        });
        let cfg = RegistrationConfig {
            etcd,
            cluster_id: s.cluster.id.clone(),
            node_id: s.node_id.clone(),
            endpoint: format!("{}://{advertise}", if self.tls.is_some() { "https" } else { "http" }),
            metrics_endpoint,
            lease_ttl_s: s.cluster.lease_ttl_s,
            refresh_interval: std::time::Duration::from_millis(s.cluster.refresh_interval_ms),
            data_dir: s.data_dir.clone(),
            repair,
        };
        Ok(Some(Registration::join(cfg, usage, self.stack.clock().clone()).await?))
    }
}

impl NodeHandle {
    /// URL of the gRPC endpoint: `http://`, or `https://` with TLS on.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// Stops serving, waits for in-flight requests, then stops background
    /// data movement between two moves.
    pub async fn shutdown(mut self) {
        self.stop_cluster_tasks().await;
        // Leave the cluster first, so clients stop choosing this node.
        if let Some(r) = self.registration.take() {
            r.leave().await;
        }
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(bg) = self.background.take() {
            bg.stop().await;
        }
    }

    async fn stop_cluster_tasks(&mut self) {
        self.repair_stop.send_replace(true);
        for t in self.cluster_tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Stops the background demoter and promoter (for tests that inspect the
    /// stack at rest); serving goes on, with inline demotion and promotion.
    pub async fn stop_background(&mut self) {
        if let Some(bg) = self.background.take() {
            bg.stop().await;
        }
    }

    /// Waits until the servers stop (after a shutdown or a failure).
    pub async fn wait(mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.stop_cluster_tasks().await;
        if let Some(r) = self.registration.take() {
            r.leave().await;
        }
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
    }

    /// The serving members this node forwards to, as it sees them (cluster
    /// mode only).
    pub fn serving_nodes(&self) -> Option<tokio::sync::watch::Receiver<Vec<NodeInfo>>> {
        self.forwarder.as_ref().map(|f| f.serving_nodes())
    }

    /// The cluster registration (cluster mode only).
    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// A sender that triggers shutdown, for signal handlers.
    pub fn take_shutdown(&mut self) -> Option<oneshot::Sender<()>> {
        self.shutdown.take()
    }

    /// The cluster registration, for a signal handler that leaves the
    /// cluster before it stops the server ([`Self::wait`] then does not
    /// leave again). Cluster mode only.
    pub fn take_registration(&mut self) -> Option<Registration> {
        self.registration.take()
    }
}
