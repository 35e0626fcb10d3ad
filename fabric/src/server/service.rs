//! The `kvfabric.v1.KvBlockService` implementation over the tier stack.
//! Every call validates its arguments first (names, keys, sizes, batch
//! limits, stream framing) and answers a precise status; nothing a client
//! sends can panic the node or touch data it did not name.

use super::auth::{AuthFailure, Authenticator, Principal};
use super::forward::{Forwarder, to_status};
use super::tombstones::{DEFAULT_TOMBSTONE_TTL_MS, Tombstones};
use super::{FabricError, LimitSettings, Metrics, Namespaces, namespaces::DEFAULT_TENANT};
use crate::client::PutObject;
use crate::cluster::{MemberState, NamespaceRecord, PublishError, check_replication, claim, publish};
use crate::proto::v1::{
    self, CreateNamespaceRequest, DeleteRequest, DeleteResponse, DescribeNamespaceRequest, DrainRequest, DrainResponse,
    Event, EventKind, ExistsPrefixRequest, ExistsPrefixResponse, GetRequest, GetResponse, KeyLocation, LeaseRequest,
    LeaseResponse, LocateRequest, LocateResponse, MembersRequest, MembersResponse, NamespaceInfo, NamespaceReplication,
    NodeMember, PutRequest, PutResponse, PutResult, StatsRequest, StatsResponse, SubscribeRequest, get_response,
    kv_block_service_server::KvBlockService, put_request,
};
use crate::proto::{ErrorKind, MAX_CHUNK_BYTES, status};
use crate::validate;
use bytes::{Bytes, BytesMut};
use kvfabric_tiers::{Block, Durability, Layout, ObjectKey, StackEventKind, TierKind, TierStack};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{TryAcquireError, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Longest lease a client may ask for (one day).
pub(crate) const MAX_LEASE_SECONDS: u32 = 86_400;

/// Converts a tier kind to its wire enum.
pub(crate) fn tier_to_proto(k: TierKind) -> v1::Tier {
    match k {
        TierKind::Hbm => v1::Tier::Hbm,
        TierKind::Host => v1::Tier::Host,
        TierKind::Disk => v1::Tier::Disk,
        TierKind::Object => v1::Tier::Object,
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    status(ErrorKind::InvalidArgument, msg)
}

pub(crate) fn layout_from_proto(l: Option<v1::Layout>) -> Layout {
    let l = l.unwrap_or_default();
    Layout {
        model: l.model,
        dtype: l.dtype,
        num_layers: l.num_layers,
        tokens_per_block: l.tokens_per_block,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        tp_rank: l.tp_rank,
        tp_size: l.tp_size,
    }
}

pub(crate) fn layout_to_proto(l: &Layout) -> v1::Layout {
    v1::Layout {
        model: l.model.clone(),
        dtype: l.dtype.clone(),
        num_layers: l.num_layers,
        tokens_per_block: l.tokens_per_block,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        tp_rank: l.tp_rank,
        tp_size: l.tp_size,
    }
}

/// Layout strings are limited to what a stored header holds (same limit on
/// the gRPC and the local path).
pub(super) fn check_layout(l: &Option<v1::Layout>) -> Result<(), String> {
    if let Some(l) = l
        && (l.model.len() > kvfabric_tiers::MAX_LAYOUT_STR || l.dtype.len() > kvfabric_tiers::MAX_LAYOUT_STR)
    {
        return Err("layout model and dtype are limited to 256 bytes".into());
    }
    Ok(())
}

struct Shared {
    stack: Arc<TierStack>,
    namespaces: Arc<Namespaces>,
    metrics: Metrics,
    limits: LimitSettings,
    node_id: String,
    /// Flips to true when the node shuts down; ends open event streams.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Budget of payload bytes buffered by Put streams, in 64 KiB units.
    inflight: Arc<tokio::sync::Semaphore>,
    /// Cluster mode: carries out client requests on the keys' owners.
    forwarder: Option<Arc<Forwarder>>,
    /// Deletes and clears (cluster mode), remembered for repair.
    tombstones: Arc<Tombstones>,
    /// The tokens callers must present; `None`: authentication off.
    auth: Option<Arc<Authenticator>>,
}

/// Whether a long-lived session's token still stands (Subscribe and Put
/// streams, local-path connections): checked again after every reload of
/// the tokens ([`Authenticator::still_valid`]), so that removing a token
/// also ends what it has open.
pub(crate) struct Standing {
    auth: Option<(Arc<Authenticator>, tokio::sync::watch::Receiver<u64>)>,
    who: Principal,
}

/// What a session whose token was removed gets.
fn revoked() -> Status {
    status(
        ErrorKind::Unauthenticated,
        "this session's token is no longer accepted (removed from the node's tokens file); what it stored before stays",
    )
}

impl Standing {
    /// Cheap when nothing was reloaded.
    pub(crate) fn check(&mut self) -> Result<(), Status> {
        let Some((auth, generation)) = &mut self.auth else {
            return Ok(());
        };
        if generation.has_changed().unwrap_or(false) {
            generation.mark_unchanged();
            if !auth.still_valid(&self.who) {
                return Err(revoked());
            }
        }
        Ok(())
    }

    /// Resolves once a reload has removed the token (never without
    /// authentication).
    pub(crate) async fn revoked(&mut self) -> Status {
        match &mut self.auth {
            Some((auth, generation)) => {
                while generation.changed().await.is_ok() {
                    if !auth.still_valid(&self.who) {
                        return revoked();
                    }
                }
                std::future::pending().await
            }
            None => std::future::pending().await,
        }
    }
}

/// A refused namespace record as the service's error.
fn publish_error(e: PublishError, tenant: &str, namespace: &str) -> FabricError {
    match e {
        PublishError::OtherOwner { .. } => FabricError::PermissionDenied {
            tenant: tenant.into(),
            namespace: namespace.into(),
        },
        PublishError::Cluster(c) => FabricError::Cluster(c),
    }
}

/// Whether a repair copy (`block`, created when its header says, on this
/// node's clock) must not be stored at `now_ms`: this node holds another
/// version created strictly later, or deleted the key (or cleared its
/// namespace) after the copy's version was created. A copy of the version
/// held here is stored (it may raise its durability).
fn newer_here(stack: &TierStack, tombstones: &Tombstones, key: &ObjectKey, block: &Block, now_ms: u64) -> bool {
    let created = block.header.created_ms;
    match stack.locate(std::slice::from_ref(key)).pop().flatten() {
        Some(held) => held.checksum != block.header.checksum && held.created_ms > created,
        None => tombstones
            .age(key.namespace_arc(), key.key(), now_ms)
            .is_some_and(|age| now_ms.saturating_sub(age) > created),
    }
}

/// Unit of the in-flight put budget.
const INFLIGHT_UNIT: u64 = 64 << 10;

fn inflight_units(bytes: u64) -> u32 {
    bytes.div_ceil(INFLIGHT_UNIT).clamp(1, u64::from(u32::MAX)) as u32
}

/// The gRPC block service.
#[derive(Clone)]
pub struct BlockService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockService")
            .field("node_id", &self.shared.node_id)
            .finish()
    }
}

struct Pending {
    key: Bytes,
    length: u64,
    layout: Layout,
    checksum: Option<u64>,
    /// Age to keep (a node's copy in a forwarded put), ms.
    age_ms: Option<u64>,
    buf: BytesMut,
    single: Option<Bytes>,
    /// Share of the in-flight budget, returned when the object is stored or dropped.
    _budget: tokio::sync::OwnedSemaphorePermit,
}

impl Pending {
    fn received(&self) -> u64 {
        self.single.as_ref().map_or(self.buf.len(), |b| b.len()) as u64
    }
}

impl BlockService {
    /// Cluster mode: a put into a namespace this node does not know claims
    /// it cluster-wide first ([`claim`]), so another tenant cannot take the
    /// same name on a node that has not seen it yet. A name another tenant
    /// owns is refused; one the same tenant owns elsewhere is adopted with
    /// its replication. While etcd cannot be reached the put goes on and
    /// the name is known on this node only, as without a cluster (data
    /// keeps flowing through an etcd outage; the gap is logged).
    pub(crate) async fn claim_if_new(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        // Over the namespace limits: refused before anything is claimed.
        self.shared.namespaces.check_room(tenant, namespace)?;
        let (Some(f), false) = (&self.shared.forwarder, self.shared.namespaces.knows(namespace)) else {
            return Ok(());
        };
        let now = self.shared.stack.clock().now_ms();
        match claim(&f.ctl.etcd, &f.ctl.cluster_id, namespace, tenant, now).await {
            Ok(rec) => {
                self.shared
                    .namespaces
                    .create(tenant, namespace, rec.replication, true)?;
                f.set_replication(namespace, rec.replication);
                Ok(())
            }
            Err(PublishError::Cluster(e)) => {
                tracing::warn!(namespace, tenant, error = %e,
                    "cannot claim the new namespace cluster-wide (etcd unreachable); it is known on this node only \
                     until a later claim succeeds");
                // Made here now, so that it is remembered (across restarts
                // too) as one to claim later.
                self.shared.namespaces.for_write(tenant, namespace)?;
                self.shared.namespaces.mark_unclaimed(namespace);
                Ok(())
            }
            Err(e) => Err(publish_error(e, tenant, namespace)),
        }
    }

    /// Claims cluster-wide the namespaces this node created alone while
    /// etcd was unreachable. One that another tenant claimed meanwhile is
    /// left to the namespace watch, which empties it on this node and
    /// hands it over ([`super::namespaces::Applied::reassigning`]).
    pub(crate) async fn retry_claims(&self) {
        let Some(f) = &self.shared.forwarder else { return };
        for (ns, tenant) in self.shared.namespaces.unclaimed() {
            let now = self.shared.stack.clock().now_ms();
            match claim(&f.ctl.etcd, &f.ctl.cluster_id, &ns, &tenant, now).await {
                Ok(rec) => match self.shared.namespaces.create(&tenant, &ns, rec.replication, true) {
                    Ok(_) => {
                        f.set_replication(&ns, rec.replication);
                        tracing::info!(namespace = %ns, tenant = %tenant, "namespace claimed cluster-wide after the outage");
                    }
                    Err(e) => tracing::warn!(namespace = %ns, error = %e, "claimed, but not recorded here"),
                },
                Err(PublishError::Cluster(_)) => return, // etcd still away: next time
                Err(e) => {
                    // Left to the namespace watch (it stays listed until
                    // the record arrives and closes it).
                    tracing::warn!(namespace = %ns, tenant = %tenant, error = %e,
                        "another tenant claimed this node's namespace during the outage; the cluster's record wins");
                }
            }
        }
    }

    /// Bookkeeping after `key` of `ns` was stored by another path (the
    /// local path's commit): it is no longer deleted.
    pub(crate) fn stored(&self, ns: &Arc<str>, key: &Bytes) {
        self.shared
            .tombstones
            .clear(ns, key, self.shared.stack.clock().now_ms());
    }

    /// A service over `stack`.
    pub fn new(
        stack: Arc<TierStack>,
        namespaces: Arc<Namespaces>,
        metrics: Metrics,
        limits: LimitSettings,
        node_id: String,
    ) -> Self {
        let tombstones = Arc::new(
            Tombstones::load(None, DEFAULT_TOMBSTONE_TTL_MS, 0).expect("in-memory tombstones cannot fail to load"),
        );
        Self::with_forwarder(stack, namespaces, metrics, limits, node_id, None, tombstones)
    }

    /// A service that, in cluster mode, forwards client requests for keys
    /// this node does not alone own to their owners.
    pub(crate) fn with_forwarder(
        stack: Arc<TierStack>,
        namespaces: Arc<Namespaces>,
        metrics: Metrics,
        limits: LimitSettings,
        node_id: String,
        forwarder: Option<Arc<Forwarder>>,
        tombstones: Arc<Tombstones>,
    ) -> Self {
        let (stopping, _) = tokio::sync::watch::channel(false);
        let budget = inflight_units(limits.max_inflight_put_bytes.0) as usize;
        let inflight = Arc::new(tokio::sync::Semaphore::new(
            budget.min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        BlockService {
            shared: Arc::new(Shared {
                stack,
                namespaces,
                metrics,
                limits,
                node_id,
                stopping,
                inflight,
                forwarder,
                tombstones,
                auth: None,
            }),
        }
    }

    /// The service requiring the tokens `auth` accepts (`None`: off). Set
    /// before the service is shared.
    pub(crate) fn with_auth(mut self, auth: Option<Arc<Authenticator>>) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("authentication is set before the service is shared")
            .auth = auth;
        self
    }

    /// Who sent a call: its bearer token checked against `[auth]`
    /// ([`Principal::Open`] when authentication is off).
    pub(crate) fn who(&self, md: &tonic::metadata::MetadataMap) -> Result<Principal, Status> {
        if self.shared.auth.is_none() {
            return Ok(Principal::Open); // the header is not even read
        }
        let token = crate::auth::bearer(md).map_err(|m| self.unauthenticated(AuthFailure::Unknown, m))?;
        self.presenting(token)
    }

    /// Who presents `token` on the local path (its hello).
    pub(crate) fn who_local(&self, token: &str) -> Result<Principal, Status> {
        self.presenting((!token.is_empty()).then_some(token))
    }

    /// Who presents `token` (none: no token), by `[auth]`.
    fn presenting(&self, token: Option<&str>) -> Result<Principal, Status> {
        let Some(auth) = &self.shared.auth else {
            return Ok(Principal::Open);
        };
        auth.authenticate(token)
            .map_err(|f| self.unauthenticated(f, f.message()))
    }

    /// Watches that `who`'s token still stands, for a long-lived session.
    pub(crate) fn standing(&self, who: &Principal) -> Standing {
        Standing {
            auth: self.shared.auth.as_ref().map(|a| (a.clone(), a.generation())),
            who: who.clone(),
        }
    }

    fn unauthenticated(&self, f: AuthFailure, message: &str) -> Status {
        self.shared.metrics.auth_failures.with_label_values(&[f.label()]).inc();
        status(ErrorKind::Unauthenticated, message)
    }

    /// A call the caller's token does not allow.
    pub(crate) fn denied(&self, message: impl Into<String>) -> Status {
        self.shared.metrics.auth_failures.with_label_values(&["denied"]).inc();
        status(ErrorKind::PermissionDenied, message)
    }

    /// Ends every open `Subscribe` stream (called on shutdown, so a graceful
    /// stop does not wait forever on subscribers).
    pub fn stop_streams(&self) {
        self.shared.stopping.send_replace(true);
    }

    fn observe<T>(&self, method: &str, start: Instant, r: &Result<T, Status>) {
        self.shared
            .metrics
            .rpc_seconds
            .with_label_values(&[method])
            .observe(start.elapsed().as_secs_f64());
        if let Err(s) = r {
            let code = format!("{:?}", s.code());
            self.shared.metrics.rpc_errors.with_label_values(&[method, &code]).inc();
            tracing::debug!(method, code, message = s.message(), "request failed");
        }
    }

    /// A request's tenant, checked, and one the caller may act for. Empty
    /// is the token's tenant, or without one the default tenant.
    pub(crate) fn tenant<'a>(&self, who: &'a Principal, t: &'a str) -> Result<&'a str, Status> {
        let t = if t.is_empty() {
            // A tenant's token names its tenant.
            who.tenant().unwrap_or(DEFAULT_TENANT)
        } else {
            validate::name("tenant", t).map_err(invalid)?;
            t
        };
        if !who.may_act_for(t) {
            return Err(self.denied(format!(
                "this token acts for tenant {:?}; the request names tenant {t:?}",
                who.tenant().unwrap_or_default()
            )));
        }
        Ok(t)
    }

    /// Checks a request's tenant (against the caller's token too),
    /// namespace name and keys (not whether this node knows the
    /// namespace); returns the tenant.
    fn check_args(
        &self,
        who: &Principal,
        tenant: &str,
        namespace: &str,
        keys: Option<&[Bytes]>,
    ) -> Result<String, Status> {
        let tenant = self.tenant(who, tenant)?;
        validate::name("namespace", namespace).map_err(invalid)?;
        if let Some(keys) = keys {
            validate::keys(keys, self.shared.limits.max_batch_keys).map_err(invalid)?;
        }
        Ok(tenant.to_string())
    }

    fn check_read(
        &self,
        who: &Principal,
        tenant: &str,
        namespace: &str,
        keys: Option<&[Bytes]>,
    ) -> Result<String, Status> {
        let tenant = self.check_args(who, tenant, namespace, keys)?;
        self.shared.namespaces.for_read(&tenant, namespace)?;
        Ok(tenant)
    }

    /// The forwarder for a request a client sent (cluster mode; `None` for
    /// a single node and for a request another node forwarded).
    fn forwarder(&self, forwarded: bool) -> Option<&Arc<Forwarder>> {
        if forwarded {
            None
        } else {
            self.shared.forwarder.as_ref()
        }
    }

    /// The forwarder when `keys` must be carried out elsewhere: this node
    /// is not the only owner of all of them.
    fn forward_keys(&self, forwarded: bool, namespace: &str, keys: &[Bytes]) -> Option<Arc<Forwarder>> {
        self.forwarder(forwarded)
            .filter(|f| !f.is_local(namespace, keys))
            .cloned()
    }

    /// [`Self::forward_keys`] for reads: also when a key's owners changed
    /// with the last membership change (the previous ones are asked for
    /// what the new ones lack).
    fn forward_reads(&self, forwarded: bool, namespace: &str, keys: &[Bytes]) -> Option<Arc<Forwarder>> {
        self.forwarder(forwarded)
            .filter(|f| !f.reads_local(namespace, keys))
            .cloned()
    }

    /// Whether deletes and clears leave tombstones: in cluster mode, at
    /// any replication. Another node may hold a copy this node never saw
    /// (an earlier owner still handing it over, a draining node, a replica
    /// that was away), and repair would copy it back without one.
    fn remembers_deletes(&self) -> bool {
        self.shared.forwarder.is_some()
    }

    fn count_forwarded(&self, method: &str) {
        self.shared.metrics.forwarded.with_label_values(&[method]).inc();
    }

    /// Stores a batch a client streamed to this node in cluster mode: here
    /// when this node alone owns every key, else on the owners.
    async fn flush(
        &self,
        f: &Forwarder,
        tenant: &str,
        ns: &Arc<str>,
        durability: Durability,
        batch: Vec<Pending>,
    ) -> Result<Vec<PutResult>, Status> {
        let keys: Vec<Bytes> = batch.iter().map(|p| p.key.clone()).collect();
        if f.is_local(ns, &keys) {
            let mut out = Vec::with_capacity(batch.len());
            for p in batch {
                out.push(self.commit(tenant, ns, p, durability).await?);
            }
            return Ok(out);
        }
        // The batch's share of the in-flight budget is returned before the
        // owners are called: one node's budget never waits on another's
        // (two nodes forwarding to each other could otherwise deadlock).
        let mut objects = Vec::with_capacity(batch.len());
        for p in batch {
            let value = match p.single {
                Some(b) => b,
                None => p.buf.freeze(),
            };
            if let Some(sum) = p.checksum {
                let got = kvfabric_tiers::offload(value.len(), || xxhash_rust::xxh3::xxh3_64(&value));
                if got != sum {
                    return Err(status(
                        ErrorKind::DataCorruption,
                        format!(
                            "object {}: checksum {got:#018x} computed over the received bytes differs from the client's {sum:#018x}; not stored",
                            hex(&p.key)
                        ),
                    ));
                }
            }
            objects.push(PutObject {
                key: p.key,
                value,
                layout: Some(layout_to_proto(&p.layout)),
            });
        }
        self.count_forwarded("put");
        let wire = match durability {
            Durability::Memory => v1::Durability::Memory,
            Durability::Disk => v1::Durability::Disk,
            Durability::Object => v1::Durability::Object,
        };
        let tiers = f.client(tenant).put_many(ns, objects, wire).await.map_err(to_status)?;
        Ok(keys
            .into_iter()
            .zip(tiers)
            .map(|(key, t)| PutResult { key, tier: t as i32 })
            .collect())
    }

    async fn commit(
        &self,
        tenant: &str,
        ns: &Arc<str>,
        p: Pending,
        durability: Durability,
    ) -> Result<PutResult, Status> {
        // Held until the object is stored: a hand-over of the namespace to
        // another tenant waits for it before dropping what is here.
        let writing = self.shared.namespaces.writing(tenant, ns)?;
        let payload = match p.single {
            Some(b) => b,
            None => p.buf.freeze(),
        };
        let now = self.shared.stack.clock().now_ms();
        let created = p.age_ms.map_or(now, |age| now.saturating_sub(age));
        let block = kvfabric_tiers::offload(payload.len(), || Block::new(payload, p.layout, created));
        if let Some(sum) = p.checksum
            && sum != block.header.checksum
        {
            return Err(status(
                ErrorKind::DataCorruption,
                format!(
                    "object {}: checksum {:#018x} computed over the received bytes differs from the client's {sum:#018x}; not stored",
                    hex(&p.key),
                    block.header.checksum
                ),
            ));
        }
        let key = ObjectKey::new(ns.clone(), p.key.clone());
        let len = block.header.length;
        let aged = p.age_ms.is_some();
        // The put runs to its end even if this request is dropped (the
        // client went away): stopped half-way, a tier could keep a copy the
        // stack's index never learns of, which nothing evicts or deletes
        // and a restart brings back.
        let (stack, tombstones) = (self.shared.stack.clone(), self.shared.tombstones.clone());
        let (tns, tkey) = (ns.clone(), p.key.clone());
        let stored = tokio::spawn(async move {
            let _writing = writing;
            let now = stack.clock().now_ms();
            if aged && newer_here(&stack, &tombstones, &key, &block, now) {
                return Ok(None);
            }
            let tier = stack.put(&key, &block, durability).await?;
            // A copy clears only a delete older than its version.
            let bound = if aged { block.header.created_ms } else { u64::MAX };
            tombstones.clear_older(&tns, &tkey, bound, stack.clock().now_ms());
            Ok::<_, kvfabric_tiers::TierError>(Some(tier))
        })
        .await
        .map_err(|e| status(ErrorKind::Internal, format!("object {}: put task: {e}", hex(&p.key))))?;
        let tier = stored.map_err(|e| {
            let e = FabricError::from(e);
            status(e.kind(), format!("object {}: {e}", hex(&p.key)))
        })?;
        let Some(tier) = tier else {
            tracing::debug!(namespace = %ns, key = hex(&p.key), "a repair copy older than what this node holds or deleted was not stored");
            return Ok(PutResult {
                key: p.key,
                tier: v1::Tier::Unspecified as i32,
            });
        };
        self.shared.metrics.rpc_bytes.with_label_values(&["in"]).inc_by(len);
        Ok(PutResult {
            key: p.key,
            tier: tier_to_proto(tier) as i32,
        })
    }

    async fn do_put(
        &self,
        who: Result<Principal, Status>,
        mut stream: Streaming<PutRequest>,
    ) -> Result<PutResponse, Status> {
        let who = who?;
        let idle = Duration::from_millis(self.shared.limits.put_idle_timeout_ms);
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| put_idle_error(idle, "nothing was stored"))?
            .map_err(|s| put_stream_error(&s, "nothing was stored"))?
            .ok_or_else(|| invalid("empty put stream: the first message must be `open`"))?;
        let Some(put_request::Msg::Open(open)) = first.msg else {
            return Err(invalid("the first message of a put stream must be `open`"));
        };
        let tenant = self.tenant(&who, &open.tenant)?.to_string();
        validate::name("namespace", &open.namespace).map_err(invalid)?;
        // Only a node copying its own objects may carry their age over. A
        // client's `forwarded` (a cluster client that placed the request
        // on an owner itself) only means "store here, do not forward".
        let keep_age = open.forwarded && who.is_node();
        let durability = match v1::Durability::try_from(open.durability) {
            Ok(v1::Durability::Memory) => Durability::Memory,
            Ok(v1::Durability::Disk) => Durability::Disk,
            Ok(v1::Durability::Object) => Durability::Object,
            Err(_) => return Err(invalid(format!("unknown durability {}", open.durability))),
        };
        let expected = open.expected_objects as usize;
        let limits = &self.shared.limits;
        if expected > limits.max_batch_keys {
            return Err(invalid(format!(
                "{expected} objects in one put; the limit is {}",
                limits.max_batch_keys
            )));
        }
        self.claim_if_new(&tenant, &open.namespace).await?;
        self.shared.namespaces.for_write(&tenant, &open.namespace)?;
        // Cluster mode: objects are collected (validated, holding their
        // share of the in-flight budget) and stored by `flush`, here or on
        // their owners, whenever they hold half the budget, before waiting
        // for more budget, and at the end.
        let fwd = self.forwarder(open.forwarded).cloned();
        let half_budget = u64::from(inflight_units(limits.max_inflight_put_bytes.0)) / 2;
        let mut collected: Vec<Pending> = Vec::new();
        let mut held: u64 = 0;
        let ns: Arc<str> = open.namespace.into();
        let mut results: Vec<PutResult> = Vec::new();
        let mut cur: Option<Pending> = None;
        let committed = |n: usize| format!("{n} earlier object(s) of this stream were stored");
        let mut standing = self.standing(&who);
        loop {
            standing.check().map_err(|s| {
                let m = format!("{}; {}", s.message(), committed(results.len()));
                Status::new(s.code(), m)
            })?;
            let Ok(next) = tokio::time::timeout(idle, stream.message()).await else {
                return Err(put_idle_error(
                    idle,
                    &format!("the incomplete object was not stored; {}", committed(results.len())),
                ));
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => {
                    return Err(put_stream_error(
                        &s,
                        &format!("the incomplete object was not stored; {}", committed(results.len())),
                    ));
                }
            };
            match msg.msg {
                Some(put_request::Msg::Begin(b)) => {
                    if let Some(p) = &cur {
                        return Err(invalid(format!(
                            "object {} incomplete: {} of {} bytes before the next begin; not stored; {}",
                            hex(&p.key),
                            p.received(),
                            p.length,
                            committed(results.len())
                        )));
                    }
                    let index = results.len() + collected.len();
                    validate::key(index, &b.key).map_err(invalid)?;
                    if index >= limits.max_batch_keys || (expected != 0 && index >= expected) {
                        let cap = if expected != 0 { expected } else { limits.max_batch_keys };
                        return Err(invalid(format!(
                            "more than {cap} objects in one put stream; {}",
                            committed(results.len())
                        )));
                    }
                    if b.length > limits.max_object_size.0 {
                        let e = FabricError::ObjectTooLarge {
                            key: hex(&b.key),
                            size: b.length,
                            max: limits.max_object_size.0,
                        };
                        return Err(status(e.kind(), format!("{e}; {}", committed(results.len()))));
                    }
                    check_layout(&b.layout).map_err(invalid)?;
                    // Wait for room in the in-flight budget (backpressure).
                    let units = inflight_units(b.length).min(inflight_units(limits.max_inflight_put_bytes.0));
                    // A stream never holds more than half the budget.
                    if let Some(f) = &fwd
                        && !collected.is_empty()
                        && held + u64::from(units) > half_budget
                    {
                        let batch = std::mem::take(&mut collected);
                        results.extend(self.flush(f, &tenant, &ns, durability, batch).await?);
                        held = 0;
                    }
                    let shutting_down = || status(ErrorKind::Unavailable, "node is shutting down");
                    let inflight = &self.shared.inflight;
                    let budget = match inflight.clone().try_acquire_many_owned(units) {
                        Ok(b) => b,
                        Err(TryAcquireError::Closed) => return Err(shutting_down()),
                        Err(TryAcquireError::NoPermits) => {
                            // Never wait while holding budget: streams
                            // waiting on each other's collected objects
                            // would wait for good (the semaphore is FIFO,
                            // so every later put would hang behind them).
                            if let Some(f) = &fwd
                                && !collected.is_empty()
                            {
                                let batch = std::mem::take(&mut collected);
                                results.extend(self.flush(f, &tenant, &ns, durability, batch).await?);
                                held = 0;
                            }
                            inflight
                                .clone()
                                .acquire_many_owned(units)
                                .await
                                .map_err(|_| shutting_down())?
                        }
                    };
                    if fwd.is_some() {
                        held += u64::from(units);
                    }
                    let p = Pending {
                        _budget: budget,
                        key: b.key,
                        length: b.length,
                        layout: layout_from_proto(b.layout),
                        checksum: b.checksum,
                        age_ms: if keep_age { b.age_ms } else { None },
                        buf: BytesMut::new(),
                        single: None,
                    };
                    if p.length == 0 && fwd.is_some() {
                        collected.push(p);
                    } else if p.length == 0 {
                        results.push(self.commit(&tenant, &ns, p, durability).await?);
                    } else {
                        cur = Some(p);
                    }
                }
                Some(put_request::Msg::Data(d)) => {
                    let Some(p) = cur.as_mut() else {
                        return Err(invalid("data chunk without a preceding begin"));
                    };
                    let got = p.received() + d.len() as u64;
                    if got > p.length {
                        return Err(invalid(format!(
                            "object {}: {got} bytes received, more than its declared length {}; not stored; {}",
                            hex(&p.key),
                            p.length,
                            committed(results.len())
                        )));
                    }
                    if got == p.length && p.received() == 0 {
                        p.single = Some(d); // whole object in one chunk: no copy
                    } else {
                        if let Some(s) = p.single.take() {
                            p.buf.extend_from_slice(&s);
                        }
                        if p.buf.capacity() == 0 {
                            p.buf.reserve(p.length.min(64 << 20) as usize);
                        }
                        p.buf.extend_from_slice(&d);
                    }
                    if got == p.length {
                        let p = cur.take().expect("pending object");
                        if fwd.is_some() {
                            collected.push(p);
                        } else {
                            results.push(self.commit(&tenant, &ns, p, durability).await?);
                        }
                    }
                }
                Some(put_request::Msg::Open(_)) => {
                    return Err(invalid("`open` may only be the first message of a put stream"));
                }
                None => return Err(invalid("put message with no content")),
            }
        }
        if let Some(p) = cur {
            return Err(invalid(format!(
                "put stream ended mid-object: object {} got {} of {} bytes and was not stored; {}",
                hex(&p.key),
                p.received(),
                p.length,
                committed(results.len())
            )));
        }
        let count = results.len() + collected.len();
        if expected != 0 && count != expected {
            return Err(invalid(format!(
                "put stream carried {count} object(s) but `open` announced {expected}; {}",
                committed(results.len())
            )));
        }
        if let Some(f) = &fwd
            && !collected.is_empty()
        {
            results.extend(self.flush(f, &tenant, &ns, durability, collected).await?);
        }
        Ok(PutResponse { results })
    }
}

/// The status for a Put stream that failed to deliver its next message.
/// A message the client sent but that cannot be read (over the size limit,
/// not valid protobuf, bad framing or compression) is the client's error:
/// INVALID_ARGUMENT, which it should not retry as is. Anything else (the
/// connection or stream cut, reset, timed out) is ABORTED: retry.
/// A put stream that sent nothing for `idle` (`limits.put-idle-timeout-ms`).
fn put_idle_error(idle: Duration, what_happened: &str) -> Status {
    status(
        ErrorKind::Aborted,
        format!(
            "no message on this put stream for {} ms (limits.put-idle-timeout-ms); {what_happened}",
            idle.as_millis()
        ),
    )
}

fn put_stream_error(s: &Status, what_happened: &str) -> Status {
    let m = s.message();
    let bad_request = match s.code() {
        // Over the message size limit (as sent, or once decompressed).
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => true,
        // tonic reports both undecodable messages and transport failures as
        // INTERNAL; only the decoder's own errors are the client's fault.
        tonic::Code::Internal => {
            m.starts_with("failed to decode Protobuf message")
                || m.starts_with("protocol error: received message with")
                || m.starts_with("Error decompressing")
        }
        _ => false,
    };
    if bad_request {
        invalid(format!(
            "put stream carried an unreadable message ({m}); {what_happened}"
        ))
    } else {
        status(ErrorKind::Aborted, format!("put stream broke ({m}); {what_happened}"))
    }
}

/// Keys of a forwarded Get's first round (see [`forward_get_round`]).
const FORWARD_GET_FIRST_KEYS: usize = 4;

/// Object bytes a forwarded Get's round aims at.
const FORWARD_GET_BYTES: u64 = 64 << 20;

/// Keys of a forwarded Get's next round, after one of `n` keys brought
/// `bytes`: as many as fit [`FORWARD_GET_BYTES`] at that size, 1 to 256.
fn forward_get_round(bytes: u64, n: usize) -> usize {
    let per_key = (bytes / n.max(1) as u64).max(1);
    (FORWARD_GET_BYTES / per_key).clamp(1, 256) as usize
}

/// Streams objects the owners returned, in the Get response format
/// (found + data chunks of at most `chunk` bytes, or missing, per key), as
/// the answers to keys `first..first + found.len()`; false when the
/// receiver is gone.
async fn send_found(
    tx: &mpsc::Sender<Result<GetResponse, Status>>,
    first: usize,
    found: Vec<Option<crate::client::Object>>,
    chunk: usize,
) -> bool {
    let msg = |m| Ok(GetResponse { msg: Some(m) });
    for (i, o) in found.into_iter().enumerate() {
        let i = first + i;
        let Some(o) = o else {
            if tx.send(msg(get_response::Msg::Missing(i as u32))).await.is_err() {
                return false;
            }
            continue;
        };
        let f = v1::ObjectFound {
            index: i as u32,
            length: o.value.len() as u64,
            layout: Some(o.layout),
            checksum: o.checksum,
            created_ms: o.created_ms,
            tier: o.tier as i32,
        };
        if !send_object(tx, f, o.value, chunk).await {
            return false;
        }
    }
    true
}

/// Sends one found object: its `ObjectFound`, then its payload in data
/// chunks of at most `chunk` bytes (zero-copy slices). False when the
/// receiver is gone.
async fn send_object(
    tx: &mpsc::Sender<Result<GetResponse, Status>>,
    found: v1::ObjectFound,
    payload: Bytes,
    chunk: usize,
) -> bool {
    let msg = |m| Ok(GetResponse { msg: Some(m) });
    if tx.send(msg(get_response::Msg::Found(found))).await.is_err() {
        return false;
    }
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        if tx
            .send(msg(get_response::Msg::Data(payload.slice(off..end))))
            .await
            .is_err()
        {
            return false;
        }
        off = end;
    }
    true
}

/// The wire form of a registry entry.
fn namespace_info(namespace: String, e: super::NamespaceEntry) -> NamespaceInfo {
    NamespaceInfo {
        namespace,
        owner: e.owner,
        replication: e.replication,
        cluster_wide: e.cluster_wide,
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn to_event(e: &kvfabric_tiers::StackEvent, node: &str) -> Event {
    let kind = match e.kind {
        StackEventKind::Stored => EventKind::Stored,
        StackEventKind::Removed => EventKind::Removed,
        StackEventKind::Cleared => EventKind::Cleared,
    };
    Event {
        kind: kind as i32,
        namespace: e.key.namespace().to_string(),
        keys: if e.key.key().is_empty() {
            vec![]
        } else {
            vec![e.key.key().clone()]
        },
        tier: tier_to_proto(e.tier) as i32,
        lagged: 0,
        node: node.to_string(),
    }
}

/// A snapshot as STORED events: one per (namespace, tier), keys in batches
/// of 256 (like the live stream's coalesced runs).
fn snapshot_events(objects: &[(kvfabric_tiers::ObjectKey, kvfabric_tiers::TierKind)], node: &str) -> Vec<Event> {
    let mut groups: std::collections::BTreeMap<(&str, i32), Vec<bytes::Bytes>> = Default::default();
    for (k, t) in objects {
        groups
            .entry((k.namespace(), tier_to_proto(*t) as i32))
            .or_default()
            .push(k.key().clone());
    }
    let mut out = Vec::new();
    for ((ns, tier), keys) in groups {
        for part in keys.chunks(256) {
            out.push(Event {
                kind: EventKind::Stored as i32,
                namespace: ns.to_string(),
                keys: part.to_vec(),
                tier,
                lagged: 0,
                node: node.to_string(),
            });
        }
    }
    out
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl KvBlockService for BlockService {
    async fn put(&self, request: Request<Streaming<PutRequest>>) -> Result<Response<PutResponse>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let r = self.do_put(who, request.into_inner()).await;
        self.observe("put", start, &r);
        r.map(Response::new)
    }

    type GetStream = BoxStream<GetResponse>;

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = (|| {
            let who = who?;
            let tenant = self.check_args(&who, &req.tenant, &req.namespace, Some(&req.keys))?;
            let fwd = self.forward_reads(req.forwarded, &req.namespace, &req.keys);
            if fwd.is_none() {
                self.shared.namespaces.for_read(&tenant, &req.namespace)?;
            }
            let chunk = match req.chunk_size as usize {
                0 => self.shared.limits.chunk_size.0 as usize,
                c if (4096..=MAX_CHUNK_BYTES).contains(&c) => c,
                c => {
                    return Err(invalid(format!("chunk_size {c} is outside 4096..={MAX_CHUNK_BYTES}")));
                }
            };
            Ok((chunk, tenant, fwd))
        })();
        self.observe("get", start, &r);
        let (chunk, tenant, fwd) = r?;
        let (tx, rx) = mpsc::channel::<Result<GetResponse, Status>>(8);
        if let Some(f) = fwd {
            self.count_forwarded("get");
            tokio::spawn(async move {
                // In rounds, each streamed back before the next is fetched,
                // so this node holds about FORWARD_GET_BYTES of objects at a
                // time (at least one round's keys), not the whole batch.
                let client = f.client(&tenant);
                let (mut at, mut round) = (0, FORWARD_GET_FIRST_KEYS);
                while at < req.keys.len() {
                    let keys = req.keys[at..(at + round).min(req.keys.len())].to_vec();
                    let n = keys.len();
                    match client.get_many(&req.namespace, keys).await {
                        Ok(found) => {
                            let bytes: u64 = found.iter().flatten().map(|o| o.value.len() as u64).sum();
                            if !send_found(&tx, at, found, chunk).await {
                                return;
                            }
                            round = forward_get_round(bytes, n);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(to_status(e))).await;
                            return;
                        }
                    }
                    at += n;
                }
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let shared = self.shared.clone();
        let ns: Arc<str> = req.namespace.into();
        tokio::spawn(async move {
            for (i, k) in req.keys.into_iter().enumerate() {
                let key = ObjectKey::new(ns.clone(), k);
                let msg = |m| Ok(GetResponse { msg: Some(m) });
                match shared.stack.get(&key).await {
                    Ok(Some((block, tier))) => {
                        let h = &block.header;
                        let found = v1::ObjectFound {
                            index: i as u32,
                            length: h.length,
                            layout: Some(layout_to_proto(&h.layout)),
                            checksum: h.checksum,
                            created_ms: h.created_ms,
                            tier: tier_to_proto(tier) as i32,
                        };
                        let sent = block.payload.len() as u64;
                        if !send_object(&tx, found, block.payload, chunk).await {
                            return;
                        }
                        shared.metrics.rpc_bytes.with_label_values(&["out"]).inc_by(sent);
                    }
                    Ok(None) => {
                        if tx.send(msg(get_response::Msg::Missing(i as u32))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let e = FabricError::from(e);
                        let _ = tx.send(Err(status(e.kind(), format!("key {i}: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn exists_prefix(
        &self,
        request: Request<ExistsPrefixRequest>,
    ) -> Result<Response<ExistsPrefixResponse>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = async {
            let who = who?;
            let tenant = self.check_args(&who, &req.tenant, &req.namespace, Some(&req.keys))?;
            if let Some(f) = self.forward_reads(req.forwarded, &req.namespace, &req.keys) {
                self.count_forwarded("exists_prefix");
                let tiers = f
                    .client(&tenant)
                    .exists_prefix(&req.namespace, req.keys)
                    .await
                    .map_err(to_status)?;
                return Ok(ExistsPrefixResponse {
                    count: tiers.len() as u32,
                    tiers: tiers.into_iter().map(|t| t as i32).collect(),
                });
            }
            self.shared.namespaces.for_read(&tenant, &req.namespace)?;
            let ns: Arc<str> = req.namespace.into();
            let keys: Vec<ObjectKey> = req.keys.into_iter().map(|k| ObjectKey::new(ns.clone(), k)).collect();
            let found = self.shared.stack.exists_prefix(&keys);
            Ok(ExistsPrefixResponse {
                count: found.len() as u32,
                tiers: found.iter().map(|e| tier_to_proto(e.tier) as i32).collect(),
            })
        }
        .await;
        self.observe("exists_prefix", start, &r);
        r.map(Response::new)
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = async {
            let who = who?;
            if req.all {
                if !req.keys.is_empty() {
                    return Err(invalid("delete with `all` must not list keys"));
                }
                let tenant = self.check_args(&who, &req.tenant, &req.namespace, None)?;
                if let Some(f) = self.forwarder(req.forwarded)
                    && !f.alone()
                {
                    self.count_forwarded("delete");
                    let n = f.client(&tenant).clear(&req.namespace).await.map_err(to_status)?;
                    return Ok(DeleteResponse { deleted: n });
                }
                self.shared.namespaces.for_read(&tenant, &req.namespace)?;
                if self.remembers_deletes() {
                    let ns: Arc<str> = req.namespace.as_str().into();
                    self.shared
                        .tombstones
                        .record_clear(&ns, self.shared.stack.clock().now_ms());
                }
                let n = self
                    .shared
                    .stack
                    .clear_namespace(&req.namespace)
                    .await
                    .map_err(FabricError::from)?;
                return Ok(DeleteResponse { deleted: n });
            }
            let tenant = self.check_args(&who, &req.tenant, &req.namespace, Some(&req.keys))?;
            if let Some(f) = self.forward_keys(req.forwarded, &req.namespace, &req.keys) {
                self.count_forwarded("delete");
                let n = f
                    .client(&tenant)
                    .delete(&req.namespace, req.keys)
                    .await
                    .map_err(to_status)?;
                return Ok(DeleteResponse { deleted: n });
            }
            self.shared.namespaces.for_read(&tenant, &req.namespace)?;
            let ns: Arc<str> = req.namespace.into();
            let now = self.shared.stack.clock().now_ms();
            let mut deleted = 0;
            // Remembered whether or not this node held them, before any is
            // deleted: a replica that was away, or a node still handing
            // them over, must not bring them back.
            if self.remembers_deletes() {
                let evicted = self.shared.tombstones.record(&ns, &req.keys, now);
                self.shared.metrics.tombstones_evicted.inc_by(evicted as u64);
            }
            for k in req.keys {
                if self
                    .shared
                    .stack
                    .delete(&ObjectKey::new(ns.clone(), k))
                    .await
                    .map_err(FabricError::from)?
                {
                    deleted += 1;
                }
            }
            Ok(DeleteResponse { deleted })
        }
        .await;
        self.observe("delete", start, &r);
        r.map(Response::new)
    }

    async fn lease(&self, request: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = (|| {
            self.check_read(&who?, &req.tenant, &req.namespace, Some(&req.keys))?;
            if req.ttl_seconds > MAX_LEASE_SECONDS {
                return Err(invalid(format!(
                    "ttl_seconds {} exceeds the maximum lease of {MAX_LEASE_SECONDS}",
                    req.ttl_seconds
                )));
            }
            let ns: Arc<str> = req.namespace.into();
            let keys: Vec<ObjectKey> = req.keys.into_iter().map(|k| ObjectKey::new(ns.clone(), k)).collect();
            Ok(LeaseResponse {
                leased: self.shared.stack.lease(&keys, u64::from(req.ttl_seconds) * 1000),
            })
        })();
        self.observe("lease", start, &r);
        r.map(Response::new)
    }

    async fn locate(&self, request: Request<LocateRequest>) -> Result<Response<LocateResponse>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = (|| {
            self.check_read(&who?, &req.tenant, &req.namespace, Some(&req.keys))?;
            let ns: Arc<str> = req.namespace.into();
            let keys: Vec<ObjectKey> = req.keys.into_iter().map(|k| ObjectKey::new(ns.clone(), k)).collect();
            let now = self.shared.stack.clock().now_ms();
            let locations = self
                .shared
                .stack
                .locate(&keys)
                .into_iter()
                .zip(&keys)
                .map(|(l, k)| match l {
                    Some(l) => KeyLocation {
                        tiers: l.tiers.into_iter().map(|t| tier_to_proto(t) as i32).collect(),
                        length: l.len,
                        checksum: l.checksum,
                        age_ms: now.saturating_sub(l.created_ms),
                        tombstone_age_ms: None,
                    },
                    None => KeyLocation {
                        tombstone_age_ms: self.shared.tombstones.age(&ns, k.key(), now),
                        ..KeyLocation::default()
                    },
                })
                .collect();
            Ok(LocateResponse { locations })
        })();
        self.observe("locate", start, &r);
        r.map(Response::new)
    }

    async fn create_namespace(
        &self,
        request: Request<CreateNamespaceRequest>,
    ) -> Result<Response<NamespaceInfo>, Status> {
        let start = Instant::now();
        let who = self.who(request.metadata());
        let req = request.into_inner();
        let r = async {
            let tenant = self.check_args(&who?, &req.tenant, &req.namespace, None)?;
            let replication = req.replication.max(1);
            check_replication(&req.namespace, replication).map_err(invalid)?;
            let ns = &self.shared.namespaces;
            // Another tenant's namespace, as far as this node knows.
            // Another tenant's namespace as far as this node knows, or one
            // being handed over: refused before the cluster's record is
            // touched.
            if let Err(e @ (FabricError::PermissionDenied { .. } | FabricError::Reassigning(_))) =
                ns.describe(&tenant, &req.namespace)
            {
                return Err(e.into());
            }
            ns.check_room(&tenant, &req.namespace)?;
            let cluster_wide = match &self.shared.forwarder {
                Some(f) => {
                    let rec = NamespaceRecord {
                        name: req.namespace.clone(),
                        owner: tenant.clone(),
                        replication,
                        updated_at_ms: self.shared.stack.clock().now_ms(),
                    };
                    publish(&f.ctl.etcd, &f.ctl.cluster_id, &rec)
                        .await
                        .map_err(|e| publish_error(e, &tenant, &req.namespace))?;
                    f.set_replication(&req.namespace, replication);
                    f.ctl.kick.notify_one();
                    true
                }
                None => false,
            };
            let e = ns.create(&tenant, &req.namespace, replication, cluster_wide)?;
            Ok(namespace_info(req.namespace.clone(), e))
        }
        .await;
        self.observe("create_namespace", start, &r);
        r.map(Response::new)
    }

    async fn describe_namespace(
        &self,
        request: Request<DescribeNamespaceRequest>,
    ) -> Result<Response<NamespaceInfo>, Status> {
        let who = self.who(request.metadata())?;
        let req = request.into_inner();
        let tenant = self.check_args(&who, &req.tenant, &req.namespace, None)?;
        let e = self.shared.namespaces.describe(&tenant, &req.namespace)?;
        Ok(Response::new(namespace_info(req.namespace, e)))
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        if !self.who(request.metadata())?.is_admin() {
            return Err(self.denied("drain is a node operation: it needs an admin token"));
        }
        let req = request.into_inner();
        let me = &self.shared.node_id;
        if req.node_id != *me {
            return Err(invalid(format!(
                "this is node {me:?}, not {:?}: send the drain to the node being drained",
                req.node_id
            )));
        }
        let Some(f) = &self.shared.forwarder else {
            return Err(status(
                ErrorKind::FailedPrecondition,
                format!("node {me:?} is not in cluster mode: there is nowhere to drain to"),
            ));
        };
        if *f.ctl.state.borrow() != MemberState::Draining {
            tracing::info!(node = %me, "draining: leaving placement and handing every object to its owners");
            f.ctl.state.send_replace(MemberState::Draining);
        }
        f.ctl.kick.notify_one();
        let stats = self.shared.stack.stats();
        Ok(Response::new(DrainResponse {
            state: MemberState::Draining.as_str().to_string(),
            objects_left: self.shared.stack.len() as u64,
            bytes_left: stats.iter().map(|t| t.used).sum(),
        }))
    }

    async fn members(&self, request: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        let who = self.who(request.metadata())?;
        let r = match &self.shared.forwarder {
            Some(f) => MembersResponse {
                members: f
                    .serving_nodes()
                    .borrow()
                    .iter()
                    .map(|n| NodeMember {
                        node_id: n.id.clone(),
                        endpoint: n.endpoint.clone(),
                        weight: n.weight,
                    })
                    .collect(),
                cluster: true,
                // A tenant's token learns the replication of its own
                // namespaces only.
                namespaces: self
                    .shared
                    .namespaces
                    .cluster_wide()
                    .into_iter()
                    .filter(|(ns, _)| {
                        who.is_admin() || who.tenant().is_none_or(|t| self.shared.namespaces.visible(t, ns))
                    })
                    .map(|(namespace, replication)| NamespaceReplication { namespace, replication })
                    .collect(),
                node_id: self.shared.node_id.clone(),
                settled_epoch: f.settled_epoch(),
            },
            None => MembersResponse {
                members: vec![NodeMember {
                    node_id: self.shared.node_id.clone(),
                    endpoint: String::new(),
                    weight: 1.0,
                }],
                cluster: false,
                namespaces: Vec::new(),
                node_id: self.shared.node_id.clone(),
                settled_epoch: 0,
            },
        };
        Ok(Response::new(r))
    }

    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let who = self.who(request.metadata())?;
        let s = &self.shared;
        // A tenant's token sees the namespaces its tenant may use; an
        // admin's, every one.
        let mut namespaces = s.namespaces.names();
        if let Some(t) = who.tenant().filter(|_| !who.is_admin()) {
            namespaces.retain(|ns| s.namespaces.visible(t, ns));
        }
        let tiers = s
            .stack
            .stats()
            .into_iter()
            .map(|t| v1::TierStats {
                tier: t.kind.map(tier_to_proto).unwrap_or(v1::Tier::Unspecified) as i32,
                capacity_bytes: t.capacity,
                used_bytes: t.used,
                objects: t.objects,
                hits: t.hits,
                misses: t.misses,
                evictions: t.evictions,
                demotions: t.demotions,
                promotions: t.promotions,
                checksum_failures: t.checksum_failures,
                bytes_in: t.bytes_in,
                bytes_out: t.bytes_out,
                dropped: t.dropped,
            })
            .collect();
        Ok(Response::new(StatsResponse {
            tiers,
            objects: s.stack.len() as u64,
            namespaces,
            max_object_bytes: s.limits.max_object_size.0,
        }))
    }

    type SubscribeStream = BoxStream<Event>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = self.who(request.metadata())?;
        let req = request.into_inner();
        let tenant = self.tenant(&who, &req.tenant)?.to_string();
        let filter = if req.namespace.is_empty() {
            None
        } else {
            self.check_read(&who, &tenant, &req.namespace, None)?;
            Some(req.namespace)
        };
        // Subscribe before the snapshot is taken: what changes while it is
        // sent waits in `rx` and follows it.
        let mut rx = self.shared.stack.subscribe();
        let (tx, out) = mpsc::channel::<Result<Event, Status>>(64);
        let shared = self.shared.clone();
        let mut stopping = self.shared.stopping.subscribe();
        let snapshot = req.snapshot;
        let mut standing = self.standing(&who);
        tokio::spawn(async move {
            let wanted = |ns: &str| filter.as_deref().is_none_or(|f| f == ns) && shared.namespaces.visible(&tenant, ns);
            if snapshot {
                // A cut of the whole index: off the async workers.
                let (sh, f, t) = (shared.clone(), filter.clone(), tenant.clone());
                let events = tokio::task::spawn_blocking(move || {
                    let objects = sh
                        .stack
                        .snapshot(|ns| f.as_deref().is_none_or(|x| x == ns) && sh.namespaces.visible(&t, ns));
                    snapshot_events(&objects, &sh.node_id)
                })
                .await
                .unwrap_or_default();
                for ev in events {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                let done = Event {
                    kind: EventKind::SnapshotDone as i32,
                    node: shared.node_id.clone(),
                    ..Default::default()
                };
                if tx.send(Ok(done)).await.is_err() {
                    return;
                }
            }
            loop {
                let first = tokio::select! {
                    _ = tx.closed() => return,
                    _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                        let _ = tx.send(Err(status(ErrorKind::Unavailable, "node is shutting down"))).await;
                        return;
                    }
                    s = standing.revoked() => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    r = rx.recv() => r,
                };
                let ev = match first {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        if tx.send(Ok(lagged_event(n, &shared.node_id))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !wanted(ev.key.namespace()) {
                    continue;
                }
                let mut out_ev = to_event(&ev, &shared.node_id);
                let kind = out_ev.kind();
                // Coalesce a run of like events into one message.
                let mut held = None;
                // Events lost while coalescing: told after what was read.
                let mut lagged = None;
                while out_ev.keys.len() < 256 && kind != EventKind::Cleared {
                    match rx.try_recv() {
                        Ok(e) if e.kind == ev.kind && e.tier == ev.tier && e.key.namespace() == ev.key.namespace() => {
                            out_ev.keys.push(e.key.key().clone());
                        }
                        Ok(e) => {
                            held = Some(e);
                            break;
                        }
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            lagged = Some(n);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if tx.send(Ok(out_ev)).await.is_err() {
                    return;
                }
                if let Some(e) = held
                    && wanted(e.key.namespace())
                {
                    let one = to_event(&e, &shared.node_id);
                    if tx.send(Ok(one)).await.is_err() {
                        return;
                    }
                }
                if let Some(n) = lagged
                    && tx.send(Ok(lagged_event(n, &shared.node_id))).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// The event telling a subscriber that `n` events were lost.
fn lagged_event(n: u64, node: &str) -> Event {
    Event {
        kind: EventKind::Lagged as i32,
        lagged: n,
        node: node.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_get_rounds_hold_about_64_mib() {
        assert_eq!(forward_get_round(4 << 20, 4), 64); // 1 MiB objects
        assert_eq!(forward_get_round(4 << 30, 4), 1); // 1 GiB objects: one at a time
        assert_eq!(forward_get_round(0, 4), 256); // misses and empty objects
        assert_eq!(forward_get_round(400, 4), 256);
    }

    #[test]
    fn unreadable_put_messages_are_invalid_and_broken_streams_aborted() {
        // Field 3 (`data`, bytes) sent as a varint.
        let decode = <PutRequest as prost::Message>::decode(&[0x18u8, 0x01][..])
            .unwrap_err()
            .to_string();
        for s in [
            Status::out_of_range("Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes"),
            Status::resource_exhausted(
                "Error decompressing: size limit, of 4 bytes, exceeded while decompressing message",
            ),
            Status::internal(decode.clone()),
            Status::internal(
                "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
            ),
        ] {
            let got = put_stream_error(&s, "nothing was stored");
            assert_eq!(got.code(), tonic::Code::InvalidArgument, "{s:?}: {got:?}");
            assert!(got.message().contains(s.message()), "{got:?}");
            assert!(got.message().ends_with("nothing was stored"), "{got:?}");
        }
        for s in [
            Status::internal("h2 protocol error: stream error received: unexpected internal error encountered"),
            Status::internal("Unexpected EOF decoding stream."),
            Status::cancelled("operation was canceled"),
            Status::unavailable("connection reset"),
            Status::unknown("h2 protocol error: something else"),
        ] {
            let got = put_stream_error(&s, "x");
            assert_eq!(got.code(), tonic::Code::Aborted, "{s:?}: {got:?}");
            assert!(got.message().contains(s.message()), "{got:?}");
        }
    }
}
