//! Event transports: the tasks that feed the trackers of [`crate::events`].
//!
//! - [`engine_events`]: one ZMQ SUB connection per engine worker with
//!   `kv-events` (the pure-Rust `zeromq` crate), receiving vLLM's
//!   `[topic, sequence, payload]` messages. A sequence gap resynchronises
//!   the worker (inside [`EngineTracker::on_message`]); a sequence that goes
//!   backwards means the publisher restarted ([`EngineTracker::restart`]).
//!   A broken or closed connection is made again, and the next message's
//!   sequence number tells which of those, if any, happened meanwhile.
//! - [`fabric_events`]: one `Subscribe` stream per fabric node, asked to
//!   start from a snapshot (STORED events for everything the node holds,
//!   then live events), so blocks stored before the router started are
//!   known at once. A `LAGGED` event or a broken stream drops the node's
//!   entries ([`FabricTracker::apply`], [`FabricTracker::resync`]) and
//!   subscribes again, refilling from a fresh snapshot.
//!
//! - [`discover_fabric`]: learns the fabric cluster's serving members,
//!   from the cluster registry's watch on etcd when `cluster` is set, else
//!   by asking the configured fabric nodes every `fabric-discover-ms`, and
//!   runs a [`fabric_events`] task per member not configured, under a
//!   holder id of its own; a member that leaves is forgotten (its task
//!   stopped, its blocks dropped from the index). So one configured node of
//!   a cluster, or the registry alone, is enough for the router to see
//!   every node's stored / removed events, each with its node and tier.
//!
//! Both reconnect for ever with exponential backoff (100 ms doubling to
//! 5 s, reset by a successful connection). Malformed frames are counted in
//! [`EventCounters`](crate::events::EventCounters) and logged; nothing here
//! panics on what a publisher sends.
//!
//! Every fabric connection is made with the router's [`ClientOptions`]
//! (its bearer token, `fabric-token-file`; the CA it verifies `https://`
//! nodes with and the certificate it presents, `fabric-ca-file`,
//! `fabric-client-cert`, `fabric-client-key`), configured nodes and
//! discovered ones alike: a cluster whose nodes speak TLS registers
//! `https://` endpoints. A node that refuses it
//! (`UNAUTHENTICATED`, `PERMISSION_DENIED`) is logged as a warning saying
//! why ([`refusal`]), and asked again with the same backoff: a node whose
//! tokens file gains the router's token is followed without a restart.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use kvfabric::client::{Client, ClientError, ClientOptions};
use zeromq::{Socket, SocketOptions, SocketRecv, SubSocket, ZmqMessage};

use crate::events::vllm::split_frames;
use crate::events::{EngineTracker, EventCounters, FabricTracker, SeqStatus};
use crate::metrics::Metrics;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Reconnection delay: 100 ms, doubling to 5 s, reset by a success.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Handles one ZMQ message for `tracker`.
pub(crate) fn on_zmq_message(tracker: &mut EngineTracker, counters: &EventCounters, msg: &ZmqMessage) {
    let frames: Vec<&[u8]> = msg.iter().map(|b| &b[..]).collect();
    match split_frames(&frames) {
        Ok((_topic, seq, payload)) => {
            if tracker.on_message(seq, &payload) == SeqStatus::Stale {
                tracing::warn!(holder = %tracker.holder(), seq, "engine event sequence went backwards: publisher restarted, resynchronising");
                tracker.restart();
                tracker.on_message(seq, &payload);
            }
        }
        Err(e) => {
            counters.malformed.fetch_add(1, Relaxed);
            tracing::warn!(holder = %tracker.holder(), error = %e, "malformed engine event message skipped");
        }
    }
}

/// Follows the vLLM publisher at `endpoint` (`tcp://host:port`) for ever.
/// Subscribes afresh when the connection breaks or closes, and when
/// `resubscribe` is notified: the worker came back after being down, and a
/// publisher whose host died without closing the connection would
/// otherwise never be heard from again (a SUB socket sends nothing once
/// subscribed, so a half-open connection goes unseen). The next message's
/// sequence number then says whether anything was lost or the publisher
/// restarted.
pub(crate) async fn engine_events(
    source: String,
    endpoint: String,
    mut tracker: EngineTracker,
    counters: Arc<EventCounters>,
    metrics: Metrics,
    resubscribe: Arc<tokio::sync::Notify>,
) {
    let connected = metrics.stream_connected.with_label_values(&[&source]);
    let connects = metrics.stream_connects.with_label_values(&[&source]);
    let mut backoff = Backoff::new();
    loop {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(Duration::from_secs(5));
        let mut sock = SubSocket::with_options(opts);
        let mut monitor = sock.monitor();
        let up = async {
            sock.connect(&endpoint).await?;
            sock.subscribe("").await
        };
        if let Err(e) = up.await {
            tracing::debug!(%source, %endpoint, error = %e, "engine event publisher unreachable; retrying");
            backoff.wait().await;
            continue;
        }
        // A new connection keeps what is known: the next message's sequence
        // number tells a stream that goes on (kept), events lost while
        // disconnected (a gap: resynchronised) and a restarted publisher
        // (numbering went back: restarted).
        backoff.reset();
        connected.set(1);
        connects.inc();
        tracing::info!(%source, %endpoint, "subscribed to engine KV events");
        loop {
            tokio::select! {
                r = sock.recv() => match r {
                    Ok(msg) => on_zmq_message(&mut tracker, &counters, &msg),
                    Err(e) => {
                        tracing::warn!(%source, error = %e, "engine event stream broke; reconnecting");
                        break;
                    }
                },
                ev = futures::StreamExt::next(&mut monitor) => match ev {
                    // A clean close (the engine exited) ends no `recv`.
                    Some(zeromq::SocketEvent::Disconnected(_)) | None => {
                        tracing::warn!(%source, "engine event publisher disconnected; reconnecting");
                        break;
                    }
                    Some(_) => {}
                },
                () = resubscribe.notified() => {
                    tracing::info!(%source, "worker is back after being down; resubscribing to its events");
                    break;
                }
            }
        }
        connected.set(0);
        drop(sock);
        backoff.wait().await;
    }
}

/// Why a fabric node refused the router, for operators, when `e` is an
/// authentication or authorisation refusal; `None` for other errors.
pub(crate) fn refusal(e: &ClientError, tenant: &str) -> Option<String> {
    match e.kind() {
        kvfabric::ErrorKind::Unauthenticated => Some(
            "the fabric node authenticates and refused the router's token (none, or one it does not accept): \
             set fabric-token-file (or $KVFABRIC_TOKEN) to a token in the node's tokens file; no events from it until then"
                .to_string(),
        ),
        kvfabric::ErrorKind::PermissionDenied if tenant.is_empty() => Some(
            "the fabric node refused the router's tenant (unset: the token's own, or without authentication \
             the default): the namespace is another tenant's; no events from it until then"
                .to_string(),
        ),
        kvfabric::ErrorKind::PermissionDenied => Some(format!(
            "the fabric node refused tenant {tenant:?}: on a node that authenticates, the token must be that \
             tenant's (fabric-token-file and tenant must agree); else the namespace is another tenant's; no events from it until then"
        )),
        _ => None,
    }
}

/// What a run of failed subscriptions is failing with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failing {
    /// The node refused the router's token ([`refusal`]).
    Refused,
    /// Anything else (unreachable, ...).
    Other,
}

/// Connects to `url` with the router's options (its token, its TLS).
/// With TLS, a plain `http://` node (one discovery found) is refused: the
/// router never falls back to plain text, where its token would cross in
/// the clear.
async fn connect(url: &str, options: &ClientOptions) -> Result<Client, ClientError> {
    if options.tls.is_some() && url.starts_with("http://") {
        return Err(ClientError::InvalidArgument(format!(
            "endpoint {url:?} is plain http:// but fabric-ca-file is set: the router reaches fabric nodes over TLS only"
        )));
    }
    Client::connect_with(url.to_string(), options.clone()).await
}

/// Follows fabric node `url`'s `Subscribe` stream for `namespace` for ever.
pub(crate) async fn fabric_events(
    source: String,
    url: String,
    tenant: String,
    namespace: String,
    options: ClientOptions,
    tracker: FabricTracker,
    metrics: Metrics,
) {
    let connected = metrics.stream_connected.with_label_values(&[&source]);
    let connects = metrics.stream_connects.with_label_values(&[&source]);
    let mut backoff = Backoff::new();
    // The first failure of a run is a warning (a node down or misnamed
    // shows at the default log level), and so is the first refusal of the
    // router's token, even after other failures (the reason no events
    // arrive, and a setting to fix); the retries after it are debug.
    let mut failing: Option<Failing> = None;
    loop {
        let sub = async {
            let c = connect(&url, &options).await?.with_tenant(tenant.clone());
            c.subscribe_from_snapshot(Some(&namespace)).await
        };
        let mut stream = match sub.await {
            Ok(s) => s,
            Err(e) => {
                let why = refusal(&e, &tenant);
                let now = if why.is_some() {
                    Failing::Refused
                } else {
                    Failing::Other
                };
                if failing == Some(now) {
                    tracing::debug!(%source, %url, error = %e, "fabric subscription failed; retrying");
                } else if let Some(why) = why {
                    tracing::warn!(%source, %url, error = %e, "fabric subscription refused: {why}");
                } else if url.starts_with("https://") && options.tls.is_none() {
                    // A discovered node of a cluster that uses TLS.
                    tracing::warn!(%source, %url, error = %e,
                        "fabric subscription failed: the node speaks TLS (https://) and fabric-ca-file is unset; \
                         set it to the CA that signs the nodes' certificates; no events from it until then");
                } else {
                    tracing::warn!(%source, %url, error = %e, "fabric subscription failed; retrying with backoff");
                }
                failing = Some(now);
                backoff.wait().await;
                continue;
            }
        };
        failing = None;
        backoff.reset();
        connected.set(1);
        connects.inc();
        tracing::info!(%source, %url, %namespace, "subscribed to fabric events");
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    if !tracker.apply(&ev) {
                        tracing::warn!(%source, "fell behind the fabric event stream; subscribing again from a snapshot");
                        break;
                    }
                }
                Ok(None) => {
                    tracing::warn!(%source, "fabric event stream ended; reconnecting");
                    break;
                }
                Err(s) => {
                    tracing::warn!(%source, error = %s, "fabric event stream broke; reconnecting");
                    break;
                }
            }
        }
        connected.set(0);
        // What happened while disconnected is unknown.
        tracker.resync();
        backoff.wait().await;
    }
}

/// What [`discover_fabric`] needs to follow a discovered node.
pub(crate) struct Discovery {
    /// Configured fabric nodes: (name, url, holder).
    pub(crate) entries: Vec<(String, String, crate::index::HolderId)>,
    /// The cluster registry (etcd target, cluster id): when set, members
    /// come from its watch instead of polling `entries` with `Members`.
    pub(crate) registry: Option<(kvfabric::cluster::EtcdTarget, String)>,
    /// Where node ids are recorded for workers' `fabric-node`.
    pub(crate) names: crate::workers::FabricNames,
    pub(crate) interval: Duration,
    pub(crate) tenant: String,
    /// How fabric nodes are connected to (the router's token and TLS).
    pub(crate) options: ClientOptions,
    pub(crate) namespace: String,
    pub(crate) router: Arc<crate::Router>,
    pub(crate) index: Arc<dyn crate::index::PrefixIndex>,
    pub(crate) counters: Arc<EventCounters>,
    pub(crate) metrics: Metrics,
    /// First holder id for discovered nodes.
    pub(crate) first_holder: u32,
}

/// The discovered nodes being followed, by node id.
struct Following {
    configured: std::collections::HashMap<String, crate::index::HolderId>,
    /// Node id -> holder, stable for the router's lifetime.
    holders: std::collections::HashMap<String, crate::index::HolderId>,
    tasks: std::collections::BTreeMap<String, tokio::task::JoinHandle<()>>,
}

impl Following {
    /// Takes the cluster's serving members `(node id, endpoint)`: a
    /// configured node is recorded under its id, others are followed (new
    /// ones start, ones that left are forgotten with their blocks).
    fn reconcile(&mut self, d: &Discovery, members: impl IntoIterator<Item = (String, String)>) {
        let mut seen = std::collections::BTreeMap::new();
        for (id, endpoint) in members {
            if endpoint.is_empty() {
                continue;
            }
            match self.configured.get(&norm(&endpoint)) {
                // A configured node: known by its node id too.
                Some(h) => {
                    d.names.write().insert(id, *h);
                }
                None => {
                    seen.insert(id, endpoint);
                }
            }
        }
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|id| !seen.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(t) = self.tasks.remove(&id) {
                t.abort();
                d.metrics.forget_source(&format!("fabric:{id}"));
            }
            if let Some(h) = self.holders.get(&id) {
                d.router.remove_fabric_node(*h);
            }
            d.names.write().remove(&id);
            tracing::info!(node = %id, "fabric node left the cluster; forgetting its blocks");
        }
        for (id, endpoint) in seen {
            if self.tasks.contains_key(&id) {
                continue;
            }
            let next = d.first_holder + self.holders.len() as u32;
            let holder = *self.holders.entry(id.clone()).or_insert(crate::index::HolderId(next));
            d.router.add_fabric_node(holder);
            d.names.write().insert(id.clone(), holder);
            let tracker = FabricTracker::new(holder, d.namespace.clone(), d.index.clone(), d.counters.clone());
            tracing::info!(node = %id, %endpoint, %holder, "following a discovered fabric node");
            self.tasks.insert(
                id.clone(),
                tokio::spawn(fabric_events(
                    format!("fabric:{id}"),
                    endpoint,
                    d.tenant.clone(),
                    d.namespace.clone(),
                    d.options.clone(),
                    tracker,
                    d.metrics.clone(),
                )),
            );
        }
    }
}

/// Follows the members of the fabric cluster (see the module doc): from
/// the cluster registry's watch when one is set, else by asking the
/// configured nodes. Runs for ever.
pub(crate) async fn discover_fabric(d: Discovery) {
    let mut f = Following {
        configured: d.entries.iter().map(|(_, u, h)| (norm(u), *h)).collect(),
        holders: Default::default(),
        tasks: Default::default(),
    };
    match d.registry.clone() {
        Some((etcd, cluster_id)) => {
            tokio::join!(follow_registry(&d, &mut f, etcd, cluster_id), learn_configured_ids(&d));
        }
        None => poll_members(&d, &mut f).await,
    }
}

/// How long a node may take to answer `Members`.
const MEMBERS_TIMEOUT: Duration = Duration::from_secs(5);

/// `Members` of one node within [`MEMBERS_TIMEOUT`]: a node that accepts
/// the connection but never answers does not stall discovery of the rest.
async fn members_of(c: &Client) -> Result<kvfabric_proto::v1::MembersResponse, ClientError> {
    tokio::time::timeout(MEMBERS_TIMEOUT, c.members())
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Status {
                kind: kvfabric::ErrorKind::Unavailable,
                code: tonic::Code::DeadlineExceeded,
                message: format!("no Members answer within {MEMBERS_TIMEOUT:?}"),
            })
        })
}

/// Asks each configured node its node id (`Members`) every `interval`
/// until it has answered, so that workers may name it by id even when it
/// is not in the registry (a single node).
async fn learn_configured_ids(d: &Discovery) {
    let mut left: Vec<&(String, String, crate::index::HolderId)> = d.entries.iter().collect();
    let mut refused = Refused::default();
    let mut tick = tokio::time::interval(d.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !left.is_empty() {
        tick.tick().await;
        let mut still = Vec::new();
        for entry in left {
            let (name, url, holder) = entry;
            let answer = match connect(url, &d.options).await {
                Ok(c) => members_of(&c).await,
                Err(e) => Err(e),
            };
            refused.note(d, name, &answer);
            match answer {
                Ok(m) => {
                    if !m.node_id.is_empty() {
                        d.names.write().insert(m.node_id, *holder);
                    }
                }
                // A node without the call (older version) has no id to learn.
                Err(ClientError::Status {
                    code: tonic::Code::Unimplemented,
                    ..
                }) => {}
                Err(e) => {
                    tracing::debug!(fabric = %name, error = %e, "fabric discovery: cannot ask the node its id");
                    still.push(entry);
                }
            }
        }
        left = still;
    }
}

/// Members from the registry's watch on etcd, as they change; a watch that
/// cannot start is retried with backoff (the nodes followed so far stay).
async fn follow_registry(d: &Discovery, f: &mut Following, etcd: kvfabric::cluster::EtcdTarget, cluster_id: String) {
    let mut backoff = Backoff::new();
    loop {
        let membership = match kvfabric::cluster::Membership::start(etcd.clone(), cluster_id.clone()).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(cluster = %etcd, error = %e, "fabric discovery: cannot watch the cluster registry");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        let mut serving = membership.serving_nodes();
        loop {
            let members: Vec<(String, String)> = serving
                .borrow_and_update()
                .iter()
                .map(|n| (n.id.clone(), n.endpoint.clone()))
                .collect();
            f.reconcile(d, members);
            if serving.changed().await.is_err() {
                break;
            }
        }
        tracing::warn!(cluster = %etcd, "fabric discovery: the registry watch ended; restarting it");
        backoff.wait().await;
    }
}

/// The configured nodes that refused the router's token on `Members`,
/// each warned about once until it answers again.
#[derive(Debug, Default)]
struct Refused(std::collections::HashSet<String>);

impl Refused {
    /// Warns the first time `name` refuses the router's token.
    fn note<T>(&mut self, d: &Discovery, name: &str, answer: &Result<T, ClientError>) {
        match answer
            .as_ref()
            .err()
            .and_then(|e| refusal(e, &d.tenant).map(|w| (e, w)))
        {
            Some((e, why)) => {
                if self.0.insert(name.to_string()) {
                    tracing::warn!(fabric = %name, error = %e, "fabric discovery refused: {why}");
                }
            }
            None => {
                self.0.remove(name);
            }
        }
    }
}

/// Members asked of the configured nodes every `interval`.
async fn poll_members(d: &Discovery, f: &mut Following) {
    use std::collections::HashMap;
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mut refused = Refused::default();
    let mut tick = tokio::time::interval(d.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Members (node id, endpoint) from every entry that answers; an
        // entry that does not answer changes nothing this round.
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut answered = false;
        for (name, url, holder) in &d.entries {
            let c = match clients.get(url) {
                Some(c) => c.clone(),
                None => match connect(url, &d.options).await {
                    Ok(c) => {
                        clients.insert(url.clone(), c.clone());
                        c
                    }
                    Err(e) => {
                        tracing::debug!(fabric = %name, error = %e, "fabric discovery: cannot connect");
                        continue;
                    }
                },
            };
            let answer = members_of(&c).await;
            refused.note(d, name, &answer);
            match answer {
                Ok(m) => {
                    answered = true;
                    // The configured node itself, by its id (older nodes
                    // leave it empty).
                    if !m.node_id.is_empty() {
                        d.names.write().insert(m.node_id.clone(), *holder);
                    }
                    if m.cluster {
                        seen.extend(m.members.into_iter().map(|n| (n.node_id, n.endpoint)));
                    }
                }
                // A node without the call (older version) is a single node.
                Err(ClientError::Status {
                    code: tonic::Code::Unimplemented,
                    ..
                }) => answered = true,
                Err(e) => tracing::debug!(fabric = %name, error = %e, "fabric discovery: Members failed"),
            }
        }
        if answered {
            f.reconcile(d, seen);
        }
    }
}

/// An endpoint compared loosely: without a trailing slash.
fn norm(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(kind: kvfabric::ErrorKind, code: tonic::Code) -> ClientError {
        ClientError::Status {
            kind,
            code,
            message: "m".into(),
        }
    }

    #[tokio::test]
    async fn with_tls_a_plain_node_is_refused() {
        let options = ClientOptions {
            tls: Some(kvfabric::tls::ClientTls::from_pem(b"ca".to_vec(), None)),
            ..Default::default()
        };
        let e = connect("http://127.0.0.1:1", &options).await.unwrap_err();
        assert_eq!(e.kind(), kvfabric::ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("fabric-ca-file"), "{e}");
    }

    #[test]
    fn refusals_name_the_setting_to_fix() {
        let e = status(kvfabric::ErrorKind::Unauthenticated, tonic::Code::Unauthenticated);
        assert!(refusal(&e, "acme").unwrap().contains("fabric-token-file"));
        let e = status(kvfabric::ErrorKind::PermissionDenied, tonic::Code::PermissionDenied);
        let why = refusal(&e, "acme").unwrap();
        assert!(why.contains("fabric-token-file") && why.contains("\"acme\""), "{why}");
        assert!(refusal(&e, "").unwrap().contains("another tenant's"));
        let e = status(kvfabric::ErrorKind::Unavailable, tonic::Code::Unavailable);
        assert_eq!(refusal(&e, "acme"), None);
    }
}
