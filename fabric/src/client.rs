//! The fabric client library: what engines, the router and the planner link
//! (no server code). One [`Client`] holds a small pool of HTTP/2
//! connections (bulk data round-robin over a few, control calls on their
//! own; cheap to clone, clones share them), batches keys per call and moves
//! bulk data as zero-copy `Bytes` chunks of at most 4 MiB. Co-located
//! engines use [`LocalClient`] instead, which moves no bytes over a socket.

use crate::auth::{Bearer, Token};
use crate::proto::v1::{
    self, CreateNamespaceRequest, DeleteRequest, DescribeNamespaceRequest, DrainRequest, ExistsPrefixRequest,
    GetRequest, LeaseRequest, LocateRequest, MembersRequest, ObjectBegin, PutOpen, PutRequest, StatsRequest,
    StatsResponse, SubscribeRequest, get_response, kv_block_service_client::KvBlockServiceClient, put_request,
};
use crate::proto::{DEFAULT_CHUNK_BYTES, ErrorKind, MAX_MESSAGE_BYTES, from_status};
use crate::tls::ClientTls;
use crate::validate;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// One connection's generated gRPC client, with the caller's token (if
/// any) on every call: what [`Client::raw`] returns.
pub type Grpc = KvBlockServiceClient<InterceptedService<Channel, Bearer>>;

pub use crate::cluster_client::{ClusterClient, NodeInfo, placement_epoch};
pub use crate::local::{LocalClient, LocalPut};
pub use crate::proto::v1::{
    DrainResponse, Durability, Event, EventKind, KeyLocation, Layout, MembersResponse, NamespaceInfo, NodeMember, Tier,
};

/// Most keys the client sends in one request, unless raised with
/// [`Client::with_max_batch_keys`] (matches the server default).
pub const MAX_BATCH_KEYS: usize = 4096;

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{message}")]
    Status {
        /// What to do about it.
        kind: ErrorKind,
        /// gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// Could not connect.
    #[error("cannot connect to {endpoint}: {}", causes(source))]
    Connect {
        /// Endpoint tried.
        endpoint: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The request was rejected before sending.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The server's reply broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The local (Unix socket) path failed.
    #[error("{context}: {source}")]
    Local {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An error and its causes, `a: b: c` (tonic's transport error alone says
/// only "transport error").
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        out.push_str(": ");
        out.push_str(&c.to_string());
        next = c.source();
    }
    out
}

impl ClientError {
    /// The kind of failure (retry, fix input, ...).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Status { kind, .. } => *kind,
            ClientError::Connect { .. } => ErrorKind::Unavailable,
            ClientError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ClientError::Protocol(_) => ErrorKind::Internal,
            ClientError::Local { .. } => ErrorKind::Unavailable,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status {
            kind: from_status(&s),
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An object to put.
#[derive(Clone, Debug)]
pub struct PutObject {
    /// Key, 1 to 64 bytes.
    pub key: Bytes,
    /// Payload.
    pub value: Bytes,
    /// Layout (optional).
    pub layout: Option<Layout>,
}

impl PutObject {
    /// An object without layout.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            layout: None,
        }
    }
}

/// An object read back.
#[derive(Clone, Debug)]
pub struct Object {
    /// Payload.
    pub value: Bytes,
    /// Layout stored with it.
    pub layout: Layout,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// Tier it was served from.
    pub tier: Tier,
}

/// An object's bytes as they arrive: a single chunk is kept as-is (no
/// copy); several are gathered into one buffer.
#[derive(Debug, Default)]
struct Incoming {
    single: Option<Bytes>,
    buf: BytesMut,
}

impl Incoming {
    fn len(&self) -> usize {
        self.single.as_ref().map_or(self.buf.len(), Bytes::len)
    }

    fn push(&mut self, chunk: Bytes, total: u64) {
        if self.len() == 0 && chunk.len() as u64 == total {
            self.single = Some(chunk);
            return;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve((total as usize).min(64 << 20));
        }
        if let Some(s) = self.single.take() {
            self.buf.extend_from_slice(&s);
        }
        self.buf.extend_from_slice(&chunk);
    }

    fn freeze(self) -> Bytes {
        self.single.unwrap_or_else(|| self.buf.freeze())
    }
}

/// How a [`Client`] connects.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// HTTP/2 connections that carry bulk data (Put and Get streams),
    /// used round-robin. One connection's flow-control windows and its
    /// single socket cap what one client can move; several spread the
    /// load over the node's cores. Default 2; 1..=64.
    pub data_connections: usize,
    /// Per-stream HTTP/2 receive window. Default 8 MiB.
    pub stream_window: u32,
    /// Per-connection HTTP/2 receive window. Default 32 MiB.
    pub connection_window: u32,
    /// Connect timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive: a PING this often, also while idle, and the
    /// connection is dropped when one goes unanswered this long. A node
    /// whose host died silently then fails a waiting call or an idle
    /// `Subscribe` stream instead of leaving it open for good. Default
    /// 20 s; zero turns it off.
    pub keepalive: Duration,
    /// Bearer token sent on every call, for nodes that authenticate
    /// (`[auth]` in the node's settings). Default none.
    pub token: Option<Token>,
    /// The CA `https://` nodes are verified with (and a certificate to
    /// present, for nodes that require one). Needed for `https://`
    /// endpoints; with it, an endpoint without a scheme is `https://`.
    /// Default none.
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            data_connections: 2,
            stream_window: 8 << 20,
            connection_window: 32 << 20,
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(20),
            token: None,
            tls: None,
        }
    }
}

/// A connection pool to one kvfabric node: a few connections for bulk data
/// and one of its own for small control calls (ExistsPrefix, Lease, Stats,
/// Delete, Subscribe), so those never queue behind a bulk transfer's
/// HTTP/2 flow control. Cheap to clone; clones share the connections.
#[derive(Clone, Debug)]
pub struct Client {
    data: Arc<[Grpc]>,
    next: Arc<AtomicUsize>,
    control: Grpc,
    tenant: String,
    chunk: usize,
    forwarded: bool,
    /// Most keys sent in one request.
    max_batch_keys: usize,
}

/// Which keys of a Get the node has answered, found or missing: each
/// exactly once. An answer that ends early (the node's task died mid-batch,
/// the stream still closing cleanly) is an error, not a run of misses.
#[derive(Debug)]
struct Answered {
    seen: Vec<bool>,
    count: usize,
}

impl Answered {
    fn new(n: usize) -> Self {
        Answered {
            seen: vec![false; n],
            count: 0,
        }
    }

    fn mark(&mut self, i: usize) -> Result<()> {
        let n = self.seen.len();
        match self.seen.get_mut(i) {
            None => Err(ClientError::Protocol(format!("server named key index {i} of {n}"))),
            Some(true) => Err(ClientError::Protocol(format!("server answered key {i} twice"))),
            Some(seen) => {
                *seen = true;
                self.count += 1;
                Ok(())
            }
        }
    }

    fn all(&self) -> Result<()> {
        match self.seen.iter().position(|s| !s) {
            None => Ok(()),
            Some(i) => Err(ClientError::Protocol(format!(
                "the node's answer ended without key {i} ({} of {} answered)",
                self.count,
                self.seen.len()
            ))),
        }
    }
}

impl Client {
    /// Connects to `endpoint` (`http://host:port` or `host:port`) with
    /// default [`ClientOptions`].
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client> {
        Self::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(endpoint: impl Into<String>, options: ClientOptions) -> Result<Client> {
        let mut endpoint = endpoint.into();
        if !endpoint.contains("://") {
            let scheme = if options.tls.is_some() { "https" } else { "http" };
            endpoint = format!("{scheme}://{endpoint}");
        }
        let https = endpoint.starts_with("https://");
        if !https && options.tls.is_some() {
            // Given a CA, a client never falls back to plain text (its
            // token would cross in the clear).
            return Err(ClientError::InvalidArgument(format!(
                "endpoint {endpoint:?} is plain http:// but TLS was asked for (a CA was given): use https://"
            )));
        }
        if https && options.tls.is_none() {
            return Err(ClientError::InvalidArgument(format!(
                "endpoint {endpoint:?} is https:// but no CA to verify it was given (ClientOptions::tls; \
                 the CLI's --ca-file)"
            )));
        }
        if !(1..=64).contains(&options.data_connections) {
            return Err(ClientError::InvalidArgument(format!(
                "data_connections {} is outside 1..=64",
                options.data_connections
            )));
        }
        let mut ep = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| ClientError::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(false)
            .initial_stream_window_size(options.stream_window)
            .initial_connection_window_size(options.connection_window)
            // Bigger DATA frames from the node: a 1 MiB chunk is one frame, not 64 of 16 KiB.
            .max_frame_size(4u32 << 20);
        if let Some(tls) = &options.tls {
            ep = ep.tls_config(tls.config()).map_err(|source| ClientError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        }
        if !options.keepalive.is_zero() {
            ep = ep
                .http2_keep_alive_interval(options.keepalive)
                .keep_alive_timeout(options.keepalive)
                .keep_alive_while_idle(true);
        }
        let bearer = Bearer::new(options.token.as_ref());
        let make = |channel: Channel| {
            KvBlockServiceClient::with_interceptor(channel, bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        };
        let mut conns = Vec::with_capacity(options.data_connections + 1);
        for _ in 0..=options.data_connections {
            let channel = ep.connect().await.map_err(|source| ClientError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
            conns.push(make(channel));
        }
        let control = conns.pop().expect("at least two connections");
        Ok(Client {
            data: conns.into(),
            next: Arc::new(AtomicUsize::new(0)),
            control,
            tenant: String::new(),
            chunk: DEFAULT_CHUNK_BYTES,
            forwarded: false,
            max_batch_keys: MAX_BATCH_KEYS,
        })
    }

    /// The next data connection, round-robin.
    fn data(&self) -> Grpc {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.data.len();
        self.data[i].clone()
    }

    /// Acts as `tenant` (default: the node's default tenant).
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Marks every Put, Get, ExistsPrefix and Delete as forwarded by a
    /// node (the receiving node serves it locally and never forwards it
    /// again). For the node's own forwarding, not for applications.
    #[doc(hidden)]
    pub fn forwarded(mut self, forwarded: bool) -> Self {
        self.forwarded = forwarded;
        self
    }

    /// Sends up to `keys` keys in one request (at least 1; default
    /// [`MAX_BATCH_KEYS`]): for nodes whose `limits.max-batch-keys` is
    /// higher (a node forwarding in cluster mode uses its own).
    pub fn with_max_batch_keys(mut self, keys: usize) -> Self {
        self.max_batch_keys = keys.max(1);
        self
    }

    /// Uses data chunks of `bytes` (clamped to 4 KiB ..= 4 MiB - 64 KiB).
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk = bytes.clamp(4096, crate::proto::MAX_CHUNK_BYTES);
        self
    }

    fn check_ns(namespace: &str) -> Result<()> {
        validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)
    }

    /// Stores one object; returns the tier holding the acknowledged copy.
    pub async fn put(
        &self,
        namespace: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        durability: Durability,
    ) -> Result<Tier> {
        let r = self
            .put_many(namespace, vec![PutObject::new(key, value)], durability)
            .await?;
        r.into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("empty put response".into()))
    }

    /// Stores a batch of objects in one stream.
    pub async fn put_many(
        &self,
        namespace: &str,
        objects: Vec<PutObject>,
        durability: Durability,
    ) -> Result<Vec<Tier>> {
        let ages = vec![None; objects.len()];
        self.put_many_aged(namespace, objects, ages, durability).await
    }

    /// Like [`Client::put_many`], with each object's age in ms (how long
    /// ago it was first stored), which a node honours only on a forwarded
    /// put: what a node copying its own objects (cluster repair) uses. An
    /// aged object the node holds a newer version of, or deleted after
    /// that age, is not stored: its tier is [`Tier::Unspecified`].
    #[doc(hidden)]
    pub async fn put_many_aged(
        &self,
        namespace: &str,
        objects: Vec<PutObject>,
        ages: Vec<Option<u64>>,
        durability: Durability,
    ) -> Result<Vec<Tier>> {
        if ages.len() != objects.len() {
            return Err(ClientError::InvalidArgument(format!(
                "{} ages for {} objects",
                ages.len(),
                objects.len()
            )));
        }
        Self::check_ns(namespace)?;
        validate::keys(
            &objects.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
            self.max_batch_keys,
        )
        .map_err(ClientError::InvalidArgument)?;
        let open = PutRequest {
            msg: Some(put_request::Msg::Open(PutOpen {
                tenant: self.tenant.clone(),
                namespace: namespace.to_string(),
                durability: durability as i32,
                expected_objects: objects.len() as u32,
                forwarded: self.forwarded,
            })),
        };
        let chunk = self.chunk;
        let n = objects.len();
        let msgs = std::iter::once(open).chain(objects.into_iter().zip(ages).flat_map(move |(o, age_ms)| {
            let begin = PutRequest {
                msg: Some(put_request::Msg::Begin(ObjectBegin {
                    key: o.key,
                    length: o.value.len() as u64,
                    layout: o.layout,
                    checksum: Some(xxhash_rust::xxh3::xxh3_64(&o.value)),
                    age_ms,
                })),
            };
            let v = o.value;
            let chunks = (0..v.len().div_ceil(chunk)).map(move |i| PutRequest {
                msg: Some(put_request::Msg::Data(
                    v.slice(i * chunk..((i + 1) * chunk).min(v.len())),
                )),
            });
            std::iter::once(begin).chain(chunks)
        }));
        let resp = self.data().put(futures::stream::iter(msgs)).await?.into_inner();
        if resp.results.len() != n {
            return Err(ClientError::Protocol(format!(
                "put of {n} objects answered {} results",
                resp.results.len()
            )));
        }
        Ok(resp.results.iter().map(|r| r.tier()).collect())
    }

    /// Reads one object.
    pub async fn get(&self, namespace: &str, key: impl Into<Bytes>) -> Result<Option<Object>> {
        Ok(self.get_many(namespace, vec![key.into()]).await?.pop().flatten())
    }

    /// Reads a batch; the result has one entry per key, in order.
    pub async fn get_many(&self, namespace: &str, keys: Vec<Bytes>) -> Result<Vec<Option<Object>>> {
        Self::check_ns(namespace)?;
        validate::keys(&keys, self.max_batch_keys).map_err(ClientError::InvalidArgument)?;
        let n = keys.len();
        let req = GetRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            keys,
            chunk_size: self.chunk as u32,
            forwarded: self.forwarded,
        };
        let mut stream = self.data().get(req).await?.into_inner();
        let mut out: Vec<Option<Object>> = (0..n).map(|_| None).collect();
        let mut answered = Answered::new(n);
        let mut cur: Option<(usize, v1::ObjectFound, Incoming)> = None;
        let finish =
            |cur: &mut Option<(usize, v1::ObjectFound, Incoming)>, out: &mut Vec<Option<Object>>| -> Result<()> {
                if let Some((i, f, buf)) = cur.take() {
                    if buf.len() as u64 != f.length {
                        return Err(ClientError::Protocol(format!(
                            "object {i}: got {} of {} bytes",
                            buf.len(),
                            f.length
                        )));
                    }
                    let value = buf.freeze();
                    if xxhash_rust::xxh3::xxh3_64(&value) != f.checksum {
                        return Err(ClientError::Status {
                            kind: ErrorKind::DataCorruption,
                            code: tonic::Code::DataLoss,
                            message: format!("object {i}: checksum mismatch in transit"),
                        });
                    }
                    let tier = f.tier();
                    out[i] = Some(Object {
                        value,
                        layout: f.layout.unwrap_or_default(),
                        created_ms: f.created_ms,
                        checksum: f.checksum,
                        tier,
                    });
                }
                Ok(())
            };
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(get_response::Msg::Found(f)) => {
                    finish(&mut cur, &mut out)?;
                    let i = f.index as usize;
                    answered.mark(i)?;
                    cur = Some((i, f, Incoming::default()));
                }
                Some(get_response::Msg::Missing(i)) => {
                    finish(&mut cur, &mut out)?;
                    answered.mark(i as usize)?;
                }
                Some(get_response::Msg::Data(d)) => match cur.as_mut() {
                    Some((_, f, buf)) if buf.len() as u64 + d.len() as u64 <= f.length => buf.push(d, f.length),
                    _ => return Err(ClientError::Protocol("unexpected data chunk".into())),
                },
                None => return Err(ClientError::Protocol("empty message".into())),
            }
        }
        finish(&mut cur, &mut out)?;
        answered.all()?;
        Ok(out)
    }

    /// For a chain of keys: the tier of each leading key present (the
    /// length is how many leading keys the node holds).
    pub async fn exists_prefix(&self, namespace: &str, keys: Vec<Bytes>) -> Result<Vec<Tier>> {
        Self::check_ns(namespace)?;
        validate::keys(&keys, self.max_batch_keys).map_err(ClientError::InvalidArgument)?;
        let n = keys.len();
        let r = self
            .control
            .clone()
            .exists_prefix(ExistsPrefixRequest {
                tenant: self.tenant.clone(),
                namespace: namespace.into(),
                keys,
                forwarded: self.forwarded,
            })
            .await?
            .into_inner();
        let tiers: Vec<Tier> = r.tiers().collect();
        if tiers.len() > n {
            return Err(ClientError::Protocol(format!(
                "the node reported a prefix of {} keys of {n}",
                tiers.len()
            )));
        }
        Ok(tiers)
    }

    /// Deletes keys; returns how many existed.
    pub async fn delete(&self, namespace: &str, keys: Vec<Bytes>) -> Result<u64> {
        Self::check_ns(namespace)?;
        validate::keys(&keys, self.max_batch_keys).map_err(ClientError::InvalidArgument)?;
        let req = DeleteRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            keys,
            all: false,
            forwarded: self.forwarded,
        };
        Ok(self.control.clone().delete(req).await?.into_inner().deleted)
    }

    /// Deletes every object of a namespace.
    pub async fn clear(&self, namespace: &str) -> Result<u64> {
        Self::check_ns(namespace)?;
        let req = DeleteRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            keys: vec![],
            all: true,
            forwarded: self.forwarded,
        };
        Ok(self.control.clone().delete(req).await?.into_inner().deleted)
    }

    /// Pins keys against eviction for `ttl` (zero releases); per key,
    /// whether it exists.
    pub async fn lease(&self, namespace: &str, keys: Vec<Bytes>, ttl: Duration) -> Result<Vec<bool>> {
        Self::check_ns(namespace)?;
        validate::keys(&keys, self.max_batch_keys).map_err(ClientError::InvalidArgument)?;
        let ttl_seconds =
            u32::try_from(ttl.as_secs()).map_err(|_| ClientError::InvalidArgument("lease too long".into()))?;
        let req = LeaseRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            keys,
            ttl_seconds,
        };
        let n = req.keys.len();
        let leased = self.control.clone().lease(req).await?.into_inner().leased;
        if leased.len() != n {
            return Err(ClientError::Protocol(format!(
                "lease answered {} keys of {n}",
                leased.len()
            )));
        }
        Ok(leased)
    }

    /// Where the node asked holds each key: tiers (empty for a key it
    /// lacks), length, checksum, age, and the age of a tombstone; never
    /// forwarded.
    pub async fn locate(&self, namespace: &str, keys: Vec<Bytes>) -> Result<Vec<KeyLocation>> {
        Self::check_ns(namespace)?;
        validate::keys(&keys, self.max_batch_keys).map_err(ClientError::InvalidArgument)?;
        let n = keys.len();
        let req = LocateRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            keys,
        };
        let r = self.control.clone().locate(req).await?.into_inner();
        if r.locations.len() != n {
            return Err(ClientError::Protocol(format!(
                "locate of {n} keys answered {} locations",
                r.locations.len()
            )));
        }
        Ok(r.locations)
    }

    /// Creates `namespace` for this client's tenant with `replication`
    /// copies per object, or changes the replication of a namespace the
    /// tenant owns (cluster-wide in cluster mode).
    pub async fn create_namespace(&self, namespace: &str, replication: u32) -> Result<NamespaceInfo> {
        Self::check_ns(namespace)?;
        let req = CreateNamespaceRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
            replication,
        };
        Ok(self.control.clone().create_namespace(req).await?.into_inner())
    }

    /// A namespace's owner and replication factor.
    pub async fn describe_namespace(&self, namespace: &str) -> Result<NamespaceInfo> {
        Self::check_ns(namespace)?;
        let req = DescribeNamespaceRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.into(),
        };
        Ok(self.control.clone().describe_namespace(req).await?.into_inner())
    }

    /// Starts (or follows) draining node `node_id`, which must be the node
    /// this client talks to.
    pub async fn drain(&self, node_id: &str) -> Result<DrainResponse> {
        let req = DrainRequest {
            node_id: node_id.into(),
        };
        Ok(self.control.clone().drain(req).await?.into_inner())
    }

    /// The serving nodes as the node asked sees them (`cluster` false and
    /// only itself, with an empty endpoint, for a single node).
    pub async fn members(&self) -> Result<MembersResponse> {
        Ok(self.control.clone().members(MembersRequest {}).await?.into_inner())
    }

    /// Node statistics.
    pub async fn stats(&self) -> Result<StatsResponse> {
        Ok(self.control.clone().stats(StatsRequest {}).await?.into_inner())
    }

    /// Subscribes to stored / removed / cleared events (all namespaces when
    /// `namespace` is `None`).
    pub async fn subscribe(&self, namespace: Option<&str>) -> Result<tonic::Streaming<Event>> {
        self.subscribe_with(namespace, false).await
    }

    /// Like [`Client::subscribe`], but the stream starts with a snapshot:
    /// STORED events for everything held now, then one `SnapshotDone`, then
    /// live events (so a subscriber that joins late, or reconnects, learns
    /// what was stored before).
    pub async fn subscribe_from_snapshot(&self, namespace: Option<&str>) -> Result<tonic::Streaming<Event>> {
        self.subscribe_with(namespace, true).await
    }

    async fn subscribe_with(&self, namespace: Option<&str>, snapshot: bool) -> Result<tonic::Streaming<Event>> {
        if let Some(ns) = namespace {
            Self::check_ns(ns)?;
        }
        let req = SubscribeRequest {
            tenant: self.tenant.clone(),
            namespace: namespace.unwrap_or("").into(),
            snapshot,
        };
        Ok(self.control.clone().subscribe(req).await?.into_inner())
    }

    /// The raw generated client, for callers that need the wire API.
    pub fn raw(&self) -> Grpc {
        self.control.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_answer_names_every_key_once() {
        let mut a = Answered::new(3);
        a.mark(2).unwrap();
        a.mark(0).unwrap();
        let e = a.all().unwrap_err();
        assert!(e.to_string().contains("without key 1 (2 of 3"), "{e}");
        assert!(a.mark(2).unwrap_err().to_string().contains("twice"));
        assert!(a.mark(3).unwrap_err().to_string().contains("index 3 of 3"));
        a.mark(1).unwrap();
        a.all().unwrap();
    }
}
