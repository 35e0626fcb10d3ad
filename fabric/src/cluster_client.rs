//! The cluster-aware client: one object namespace over many nodes, with no
//! extra hop. [`ClusterClient`] follows a membership (the serving nodes with
//! their endpoints and weights, fed through a `tokio::sync::watch` channel by
//! whatever watches the cluster: etcd in a deployment, a fixed list in
//! tests), places every key with weighted rendezvous hashing
//! ([`Placement`]) and sends each request straight to the key's owners,
//! batching keys per node (in requests of at most
//! [`ClusterClient::with_max_batch_keys`] keys, one after another) and
//! calling the nodes concurrently:
//!
//! - **put**: every owner (the namespace's replication factor, default 1)
//!   stores the object; the call succeeds when all of them acknowledged;
//! - **get**: the first owner is asked; a key it does not hold, or a node
//!   that does not answer, is retried on the next owner in order, so a read
//!   succeeds while any replica is up; a key no owner holds is then asked
//!   of its owners in the memberships replaced within the handoff window
//!   (a draining node, the owner before a join: what repair has not handed
//!   over yet; see [`ClusterClient::with_handoff_window`]) until the
//!   nodes report the hand-off done ([`ClusterClient::with_handoff_settlement`]);
//! - **exists_prefix**: a chain spread over nodes is answered in one call:
//!   each node is asked for the keys of the chain it owns (in chain order),
//!   and the answers are merged: the prefix ends at the first key any node
//!   reports missing;
//! - **delete**: every owner deletes.
//!
//! Where it reaches every node concerned itself (each owner of a replicated
//! namespace, every node for a clear, a previous owner asked for what it
//! holds) its requests are marked `forwarded`, so no node passes them on
//! again; with one owner the node is left to place it (it knows the
//! namespace's replication even when this client does not).
//!
//! Namespaces are known per node (created by a node's first put in them),
//! so a node that never stored one answers NOT_FOUND for it: that node is
//! taken to hold none of the keys asked, and a call is NOT_FOUND only when
//! every node that answered said so.
//!
//! Connections are pooled per endpoint ([`Client`]) and reused across calls
//! and membership changes, for as long as the endpoint is a member's (or a
//! previous owner's that reads still ask, within the handoff window): when
//! the client sees a new membership the others are dropped. Concurrent
//! calls to an endpoint not connected yet share one connect; one that fails
//! is tried again by the next call.
//!
//! [`ClusterClient::discover`] needs no etcd: given any node(s), it learns
//! the serving members (with the weights the nodes place by) and the
//! cluster-wide namespaces' replication from the `Members` call, and keeps
//! them current by asking again every `refresh`, and whether the nodes
//! have finished handing objects over after the last change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::watch;

use crate::client::{Client, ClientError, ClientOptions, Durability, Object, PutObject, Result, Tier};
use crate::placement::{Placement, object_hash};
use crate::{ErrorKind, validate};

/// A serving node as the client sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    /// Node id (unique in the cluster; placement hashes it).
    pub id: String,
    /// gRPC endpoint, `http://host:port` (`https://` with TLS on).
    pub endpoint: String,
    /// Relative capacity (placement weight), positive.
    pub weight: f64,
}

/// Identifies the placement a serving set gives: a hash of its node ids
/// and weights, whatever their order (endpoints do not place). Never 0, so
/// 0 can mean "none". Nodes publish the epoch their last repair pass
/// settled (see [`ClusterClient::with_handoff_settlement`]).
pub fn placement_epoch(nodes: &[NodeInfo]) -> u64 {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for n in sorted {
        h.update(&(n.id.len() as u64).to_le_bytes());
        h.update(n.id.as_bytes());
        h.update(&n.weight.to_bits().to_le_bytes());
    }
    h.digest().max(1)
}

/// One membership, placed.
#[derive(Debug)]
struct View {
    placement: Placement,
    endpoints: HashMap<String, String>,
    /// [`placement_epoch`] of the membership.
    epoch: u64,
    /// Unique in the process, rising with each view built: which
    /// membership the pool last followed (see [`Pool::follow`]).
    serial: u64,
}

impl View {
    fn build(members: &[NodeInfo]) -> Result<View> {
        let placement = Placement::new(members.iter().map(|m| (m.id.clone(), m.weight)))
            .map_err(|e| ClientError::InvalidArgument(format!("membership: {e}")))?;
        let endpoints = members.iter().map(|m| (m.id.clone(), m.endpoint.clone())).collect();
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(View {
            placement,
            endpoints,
            epoch: placement_epoch(members),
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// A client of a whole cluster (see the module doc). Cheap to clone; clones
/// share connections and settings.
#[derive(Clone, Debug)]
pub struct ClusterClient {
    members: watch::Receiver<Vec<NodeInfo>>,
    view: Arc<cache::Cached>,
    /// Connections by endpoint (see [`Pool`]).
    pool: Arc<Pool>,
    options: ClientOptions,
    tenant: Option<String>,
    forwarded: bool,
    /// Most keys sent to one node in one request.
    max_batch_keys: usize,
    replication: ReplicationMap,
    default_replication: usize,
    handoff_window: std::time::Duration,
    /// The placement epoch the nodes have finished handing objects over
    /// for (0: none), when something reports it.
    settled: Option<watch::Receiver<u64>>,
    /// Objects and prefix keys previous owners answered (shared by clones).
    handoff_reads: Arc<std::sync::atomic::AtomicU64>,
}

/// Longest wait for one previous owner to start answering (see
/// [`ClusterClient::with_handoff_window`]): connecting, and its answer to
/// which of the keys it holds (`Locate`) or to a chain's prefix, both
/// small. Reading the objects it holds is not cut short: data that flows
/// is not thrown away (a node that dies mid-transfer fails it like any
/// read, by its connection's keepalive at worst).
pub const PREVIOUS_OWNER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a previous owner that failed or did not answer within
/// [`PREVIOUS_OWNER_TIMEOUT`] is skipped (5 s, the client's default
/// connect timeout): a dead node then costs reads one timeout every 5 s,
/// not one per read, and a node that was only slow, or restarting, is
/// asked again soon rather than after the next membership change (its
/// keys would read as misses until then).
pub const PREVIOUS_OWNER_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// How long after a membership change reads may still ask the earlier
/// memberships' owners of a key its new owners do not hold (see
/// [`ClusterClient::with_handoff_window`]): 6 hours, about what repair
/// needs to hand over a terabyte at its default 64 MiB/s. The nodes
/// reporting the hand-off done ends it sooner
/// ([`ClusterClient::with_handoff_settlement`]).
pub const DEFAULT_HANDOFF_WINDOW: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// The placement of the last membership seen, rebuilt only when the
/// membership changes, and those of up to four earlier memberships with
/// when each was replaced (std locks: the client build has no parking_lot).
mod cache {
    use super::{NodeInfo, PREVIOUS_OWNER_BACKOFF, Result, View};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// Previous views kept at most (newest first).
    const KEEP: usize = 4;

    /// Earlier views, newest first, each with when it was replaced.
    type History = Vec<(Arc<View>, Instant)>;

    #[derive(Debug)]
    struct State {
        members: Vec<NodeInfo>,
        view: Arc<View>,
        previous: History,
        /// Previous owners that failed to answer since the change, each
        /// with when it may be asked again.
        down: HashMap<String, Instant>,
    }

    #[derive(Debug, Default)]
    pub(super) struct Cached(Mutex<Option<State>>);

    impl Cached {
        /// The view of `members`, and up to [`KEEP`] earlier memberships'
        /// views, newest first, each with when it was replaced.
        pub(super) fn get(&self, members: &[NodeInfo]) -> Result<(Arc<View>, History)> {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = g.as_ref()
                && st.members.as_slice() == members
            {
                return Ok((st.view.clone(), st.previous.clone()));
            }
            let view = Arc::new(View::build(members)?);
            let previous: History = match g.take() {
                Some(st) => std::iter::once((st.view, Instant::now()))
                    .chain(st.previous)
                    .take(KEEP)
                    .collect(),
                None => Vec::new(),
            };
            *g = Some(State {
                members: members.to_vec(),
                view: view.clone(),
                previous: previous.clone(),
                down: HashMap::new(),
            });
            Ok((view, previous))
        }

        /// Forgets the earlier views, if `view` is still the current one:
        /// the nodes have handed every object over to its owners in it.
        pub(super) fn retire_previous(&self, view: &Arc<View>) {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = g.as_mut()
                && Arc::ptr_eq(&st.view, view)
            {
                st.previous.clear();
            }
        }

        /// Skips previous owner `id` for [`PREVIOUS_OWNER_BACKOFF`], or
        /// until the next membership change if that comes first.
        pub(super) fn mark_down(&self, id: &str) {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = g.as_mut() {
                st.down.insert(id.to_string(), Instant::now() + PREVIOUS_OWNER_BACKOFF);
            }
        }

        /// Whether previous owner `id` is being skipped now.
        pub(super) fn is_down(&self, id: &str) -> bool {
            self.is_down_at(id, Instant::now())
        }

        /// Whether previous owner `id` is being skipped at `now`.
        pub(super) fn is_down_at(&self, id: &str, now: Instant) -> bool {
            let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            g.as_ref()
                .and_then(|st| st.down.get(id))
                .is_some_and(|&until| now < until)
        }
    }
}

/// A connect in progress, shared by every call waiting for it; its error
/// as text (a [`ClientError`] does not clone).
type Connecting = futures::future::Shared<futures::future::BoxFuture<'static, std::result::Result<Client, String>>>;

/// An endpoint's place in the [`Pool`].
enum Slot {
    /// Connected (boxed: a client is ten times a connect's size).
    Ready(Box<Client>),
    /// Being connected by the call that started `done` (number `id`, so
    /// the waiter that sees it end updates this slot, not a later one).
    Connecting { id: u64, done: Connecting },
}

#[derive(Default)]
struct PoolState {
    slots: HashMap<String, Slot>,
    /// The endpoints of the membership followed and of the earlier ones
    /// reads still ask (`None` before the first): only these are pooled.
    wanted: Option<std::collections::HashSet<String>>,
    /// The [`View::serial`] and count of earlier views followed.
    followed: (u64, usize),
    next_id: u64,
}

/// The connections of a client and its clones, one per endpoint. A std
/// lock, held only to look up, insert or drop entries: never across a
/// connect, which can take the whole connect timeout for a host that does
/// not answer, so a slow endpoint holds up only the calls to it.
#[derive(Default)]
struct Pool {
    state: std::sync::Mutex<PoolState>,
    /// `followed` packed ([`Pool::key`]), read without the lock.
    followed: std::sync::atomic::AtomicU64,
    /// Connects started (a test hook).
    #[cfg(test)]
    connects: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        let mut m = f.debug_map();
        for (ep, slot) in &st.slots {
            let state = match slot {
                Slot::Ready(_) => "connected",
                Slot::Connecting { .. } => "connecting",
            };
            m.entry(ep, &state);
        }
        m.finish()
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `followed` in one word (never 0: serials start at 1; a client keeps
    /// at most four earlier views).
    fn key((serial, previous): (u64, usize)) -> u64 {
        serial << 8 | previous.min(0xff) as u64
    }

    /// Keeps only the connections to `view`'s endpoints and `previous`'
    /// (the earlier memberships reads still ask), and pools only those
    /// from now on. Done once per membership (and per earlier view
    /// retired): a load of an atomic otherwise. A view older than the one
    /// followed (a call that read the membership just before it changed)
    /// changes nothing.
    fn follow(&self, view: &View, previous: &[Arc<View>]) {
        let followed = (view.serial, previous.len());
        let key = Pool::key(followed);
        if self.followed.load(std::sync::atomic::Ordering::Acquire) == key {
            return;
        }
        let dropped: Vec<Slot> = {
            let mut st = self.lock();
            if followed.0 < st.followed.0 || followed == st.followed {
                return;
            }
            let wanted: std::collections::HashSet<String> = std::iter::once(view)
                .chain(previous.iter().map(|v| &**v))
                .flat_map(|v| v.endpoints.values().cloned())
                .collect();
            let gone: Vec<String> = st.slots.keys().filter(|ep| !wanted.contains(*ep)).cloned().collect();
            let dropped = gone.iter().filter_map(|ep| st.slots.remove(ep)).collect();
            st.wanted = Some(wanted);
            st.followed = followed;
            self.followed.store(key, std::sync::atomic::Ordering::Release);
            dropped
        };
        if !dropped.is_empty() {
            tracing::debug!(connections = dropped.len(), "dropped connections to departed nodes");
        }
    }

    /// Starts a connect to `endpoint`.
    fn connect(
        &self,
        endpoint: &str,
        options: &ClientOptions,
    ) -> impl std::future::Future<Output = std::result::Result<Client, String>> + Send + 'static {
        #[cfg(test)]
        self.connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (endpoint, options) = (endpoint.to_string(), options.clone());
        async move { Client::connect_with(endpoint, options).await.map_err(|e| e.to_string()) }
    }

    /// The client of `endpoint`: the pooled one, or a new connection,
    /// pooled when the endpoint is wanted. Calls that find it being
    /// connected wait for that connect and share its outcome; a failed one
    /// leaves the endpoint unconnected, for the next call to try again.
    async fn client(&self, endpoint: &str, options: &ClientOptions) -> std::result::Result<Client, String> {
        use futures::FutureExt;
        let (id, done) = {
            let mut st = self.lock();
            match st.slots.get(endpoint) {
                Some(Slot::Ready(c)) => return Ok(Client::clone(c)),
                Some(Slot::Connecting { id, done }) => (*id, done.clone()),
                None if st.wanted.as_ref().is_some_and(|w| !w.contains(endpoint)) => {
                    // A node that left since the caller read the
                    // membership: served, not pooled (nothing would drop
                    // it). Id 0 names no slot.
                    (0, self.connect(endpoint, options).boxed().shared())
                }
                None => {
                    st.next_id += 1;
                    let id = st.next_id;
                    let done = self.connect(endpoint, options).boxed().shared();
                    st.slots
                        .insert(endpoint.to_string(), Slot::Connecting { id, done: done.clone() });
                    (id, done)
                }
            }
        };
        let r = done.await;
        let mut st = self.lock();
        if let Some(Slot::Connecting { id: current, .. }) = st.slots.get(endpoint)
            && *current == id
        {
            match &r {
                Ok(c) => {
                    st.slots.insert(endpoint.to_string(), Slot::Ready(Box::new(c.clone())));
                }
                Err(_) => {
                    st.slots.remove(endpoint);
                }
            }
        }
        r
    }
}

/// Replication per namespace, shared by a client's clones.
type ReplicationMap = Arc<std::sync::RwLock<HashMap<String, usize>>>;

/// Checks and records `namespace`'s replication in `map`.
fn set_replication_in(map: &ReplicationMap, namespace: &str, replicas: usize) -> Result<()> {
    validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)?;
    if !(1..=16).contains(&replicas) {
        return Err(ClientError::InvalidArgument(format!(
            "replication for {namespace} must be 1..=16, got {replicas}"
        )));
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(namespace.to_string(), replicas);
    Ok(())
}

/// What a node's `Members` answer tells a client.
struct MembersAnswer {
    members: Vec<NodeInfo>,
    replication: Vec<(String, usize)>,
    /// See [`ClusterClient::with_handoff_settlement`].
    settled: u64,
}

/// Asks the node at `endpoint` (connecting once, then reusing the
/// connection from `pool`) for the serving members, the cluster-wide
/// namespaces' replication and the settled placement epoch.
async fn ask_members(
    pool: &mut HashMap<String, Client>,
    endpoint: &str,
    options: &ClientOptions,
) -> Result<MembersAnswer> {
    let c = match pool.get(endpoint) {
        Some(c) => c.clone(),
        None => {
            let c = Client::connect_with(endpoint.to_string(), options.clone()).await?;
            pool.insert(endpoint.to_string(), c.clone());
            c
        }
    };
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), c.members())
        .await
        .map_err(|_| unavailable(format!("{endpoint} did not answer Members within 5 s")))??;
    let members = if r.cluster {
        r.members
            .into_iter()
            .map(|m| NodeInfo {
                id: m.node_id,
                endpoint: m.endpoint,
                weight: if m.weight > 0.0 && m.weight.is_finite() {
                    m.weight
                } else {
                    1.0
                },
            })
            .collect()
    } else {
        // A single node: itself, at the endpoint asked.
        r.members
            .into_iter()
            .take(1)
            .map(|m| NodeInfo {
                id: m.node_id,
                endpoint: endpoint.to_string(),
                weight: 1.0,
            })
            .collect()
    };
    let replication = r
        .namespaces
        .into_iter()
        .map(|n| (n.namespace, n.replication as usize))
        .collect();
    Ok(MembersAnswer {
        members,
        replication,
        settled: r.settled_epoch,
    })
}

/// Keys of one call grouped by node: node id -> (position in the call, key).
type Groups = BTreeMap<String, Vec<(usize, Bytes)>>;

fn unavailable(message: String) -> ClientError {
    ClientError::Status {
        kind: ErrorKind::Unavailable,
        code: tonic::Code::Unavailable,
        message,
    }
}

/// Whether a read should try another replica: on anything but a problem
/// with the request itself (bad argument, tenancy, a token every node
/// refuses alike) or an unknown namespace
/// (handled apart). A node going away fails in-flight calls in several ways
/// (refused connection: UNAVAILABLE; a stream cut by its GOAWAY: an h2
/// error, INTERNAL or CANCELLED), and a replica answering DATA_LOSS has a
/// bad copy that another may not.
fn retryable(e: &ClientError) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::InvalidArgument | ErrorKind::PermissionDenied | ErrorKind::Unauthenticated | ErrorKind::NotFound
    )
}

/// Asks one node about `items` in requests of at most `max` keys, one
/// after another (`call` sends one and answers once per item): the answers,
/// in order, up to the first request that failed, and its error (the items
/// past the answers were not answered). A node refuses a request of more
/// keys than its limit, and a call's keys for one node can be any number.
async fn batched<I, A, F, Fut>(items: &[I], max: usize, mut call: F) -> (Vec<A>, Option<ClientError>)
where
    F: FnMut(&[I]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<A>>>,
{
    let mut out = Vec::with_capacity(items.len());
    for part in items.chunks(max.max(1)) {
        match call(part).await {
            Ok(a) => out.extend(a),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

impl ClusterClient {
    /// A client following `members` (the serving nodes; updates are picked
    /// up at the next call).
    pub fn new(members: watch::Receiver<Vec<NodeInfo>>, options: ClientOptions) -> ClusterClient {
        // Placed now, so a change before the first call still counts as
        // one (its earlier owners are asked).
        let view = Arc::new(cache::Cached::default());
        let initial = members.borrow().clone();
        if !initial.is_empty() {
            let _ = view.get(&initial);
        }
        ClusterClient {
            members,
            view,
            pool: Arc::default(),
            options,
            tenant: None,
            forwarded: false,
            max_batch_keys: crate::client::MAX_BATCH_KEYS,
            replication: Arc::default(),
            default_replication: 1,
            handoff_window: DEFAULT_HANDOFF_WINDOW,
            settled: None,
            handoff_reads: Arc::default(),
        }
    }

    /// Objects (`get`) and chain keys (`exists_prefix`) that only a
    /// previous owner held, read so far by this client and its clones: a
    /// count that keeps rising long after a membership change means repair
    /// is slow to hand objects over.
    pub fn handoff_reads(&self) -> u64 {
        self.handoff_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads of keys whose owners changed with a membership change (a node
    /// joined, drained or left) also ask the owners before it for what the
    /// new ones do not hold, for at most `window` after each change, up to
    /// four changes back (0 turns it off; default
    /// [`DEFAULT_HANDOFF_WINDOW`]): until repair has handed an object to
    /// its new owners, a drained node or the owner before a join still has
    /// it. The nodes reporting the hand-off done ends it sooner (see
    /// [`Self::with_handoff_settlement`]).
    pub fn with_handoff_window(mut self, window: std::time::Duration) -> Self {
        self.handoff_window = window;
        self
    }

    /// Follows `settled`: the [`placement_epoch`] every serving and
    /// draining node has finished repairing for (each object it holds is
    /// at all of its owners there), or 0. Once it equals the current
    /// membership's epoch, reads stop asking earlier memberships' owners
    /// (and forget those memberships) without waiting out the handoff
    /// window. Nodes derive it from the member records in etcd
    /// (`Membership::settled_epoch`); [`Self::discover`] gets it from the
    /// `Members` call. Without it only the window ends hand-off reads.
    pub fn with_handoff_settlement(mut self, settled: watch::Receiver<u64>) -> Self {
        self.settled = Some(settled);
        self
    }

    /// Whether reads ask earlier memberships' owners now: a membership
    /// change within the handoff window that the nodes have not reported
    /// handed over yet.
    pub fn handoff_pending(&self) -> bool {
        self.views().is_ok_and(|(_, previous)| !previous.is_empty())
    }

    /// A client that learns the cluster through `seeds` (any of its nodes):
    /// the serving members and the cluster-wide namespaces' replication,
    /// asked again every `refresh` (from a seed or any member known) until
    /// the last clone of the client is dropped, with whether the nodes
    /// have handed objects over since the last membership change (see
    /// [`Self::with_handoff_settlement`]). A single node (not in cluster
    /// mode) is a cluster of one. Fails when no seed answers.
    pub async fn discover(
        seeds: Vec<String>,
        options: ClientOptions,
        refresh: std::time::Duration,
    ) -> Result<ClusterClient> {
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no seed endpoint to discover the cluster from".into(),
            ));
        }
        let mut pool = HashMap::new();
        let mut last = None;
        let mut first = None;
        for seed in &seeds {
            match ask_members(&mut pool, seed, &options).await {
                Ok(m) => {
                    first = Some(m);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(first) = first else {
            return Err(last.unwrap_or_else(|| unavailable("no seed answered".into())));
        };
        let (tx, rx) = watch::channel(first.members);
        let (settled_tx, settled_rx) = watch::channel(first.settled);
        let client = ClusterClient::new(rx, options.clone()).with_handoff_settlement(settled_rx);
        for (ns, r) in &first.replication {
            client.set_replication(ns, *r)?;
        }
        // The task holds the map, not a client: a client would keep the
        // membership channel open, and the task would never see the last
        // clone go.
        let replication_map = client.replication.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh.max(std::time::Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if tx.is_closed() {
                    return;
                }
                // The seeds, then every member known.
                let known: Vec<String> = tx.borrow().iter().map(|n| n.endpoint.clone()).collect();
                for ep in seeds.iter().chain(&known) {
                    if let Ok(a) = ask_members(&mut pool, ep, &options).await {
                        for (ns, r) in a.replication {
                            // A record the nodes hold is valid; skip one that is not.
                            let _ = set_replication_in(&replication_map, &ns, r);
                        }
                        // The membership first: a settled epoch is only
                        // compared with the membership it was sent with.
                        if *tx.borrow() != a.members {
                            tx.send_replace(a.members);
                        }
                        settled_tx.send_if_modified(|s| std::mem::replace(s, a.settled) != a.settled);
                        break;
                    }
                }
                // Keep connections only to the seeds and current members.
                let keep: Vec<String> = tx.borrow().iter().map(|n| n.endpoint.clone()).collect();
                pool.retain(|ep, _| seeds.contains(ep) || keep.contains(ep));
            }
        });
        Ok(client)
    }

    /// The serving nodes this client places over now.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.members.borrow().clone()
    }

    /// A client over a fixed membership.
    pub fn fixed(members: Vec<NodeInfo>, options: ClientOptions) -> ClusterClient {
        let (_tx, rx) = watch::channel(members);
        Self::new(rx, options)
    }

    /// Sends up to `keys` keys to one node in one request (at least 1;
    /// default [`crate::client::MAX_BATCH_KEYS`], the nodes' default
    /// `limits.max-batch-keys`; see [`Client::with_max_batch_keys`]). A
    /// call with more keys for one node sends them in several requests, one
    /// after another.
    pub fn with_max_batch_keys(mut self, keys: usize) -> Self {
        self.max_batch_keys = keys.max(1);
        self
    }

    /// Acts for `tenant` on every node.
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// A clone (sharing connections and settings) that acts for `tenant`
    /// and marks its requests forwarded: what a node uses to carry out a
    /// client's request on the keys' owners. Not for applications.
    #[doc(hidden)]
    pub fn forwarding_for(&self, tenant: &str) -> ClusterClient {
        let mut c = self.clone();
        c.tenant = Some(tenant.to_string());
        c.forwarded = true;
        c
    }

    /// Whether node `id` alone owns every key (each key's only owner).
    /// Also true when the membership is empty or unusable: a node that
    /// knows no serving node serves locally.
    #[doc(hidden)]
    pub fn owned_only_by(&self, id: &str, namespace: &str, keys: &[Bytes]) -> bool {
        let Ok(v) = self.view() else { return true };
        let r = self.replicas(namespace);
        keys.iter().all(|k| {
            let os = v.placement.owners_of_hash(object_hash(namespace, k), r);
            os.len() == 1 && os[0] == id
        })
    }

    /// Copies of each object in `namespace` (1 to the number of nodes; more
    /// than there are nodes places one copy per node). Shared by clones.
    pub fn set_replication(&self, namespace: &str, replicas: usize) -> Result<()> {
        set_replication_in(&self.replication, namespace, replicas)
    }

    fn replicas(&self, namespace: &str) -> usize {
        self.replication
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .copied()
            .unwrap_or(self.default_replication)
    }

    fn view(&self) -> Result<Arc<View>> {
        Ok(self.views()?.0)
    }

    /// The current view, and the earlier ones (newest first) replaced
    /// within the handoff window, none once the nodes report the current
    /// one settled.
    fn views(&self) -> Result<(Arc<View>, Vec<Arc<View>>)> {
        let members = self.members.borrow().clone();
        if members.is_empty() {
            return Err(unavailable("no serving node in the cluster membership".into()));
        }
        let (view, previous) = self.view.get(&members)?;
        let previous = if !previous.is_empty() && self.settled.as_ref().is_some_and(|s| *s.borrow() == view.epoch) {
            self.view.retire_previous(&view);
            Vec::new()
        } else {
            previous
                .into_iter()
                .take_while(|(_, since)| since.elapsed() < self.handoff_window)
                .map(|(v, _)| v)
                .collect()
        };
        self.pool.follow(&view, &previous);
        Ok((view, previous))
    }

    /// Whether node `id` may answer reads of `keys` from its own store
    /// alone: it is each key's only owner, and was in every membership
    /// replaced within the handoff window. Else a read goes through
    /// [`Self::get_many`], which also asks the previous owners.
    #[doc(hidden)]
    pub fn reads_only_from(&self, id: &str, namespace: &str, keys: &[Bytes]) -> bool {
        let Ok((v, previous)) = self.views() else {
            return true;
        };
        let r = self.replicas(namespace);
        let only = |v: &View, k: &Bytes| {
            let os = v.placement.owners_of_hash(object_hash(namespace, k), r);
            os.len() == 1 && os[0] == id
        };
        keys.iter().all(|k| only(&v, k) && previous.iter().all(|p| only(p, k)))
    }

    /// The owners of `namespace`/`key`, best first (ids).
    pub fn owners(&self, namespace: &str, key: &[u8]) -> Result<Vec<String>> {
        let v = self.view()?;
        Ok(v.placement
            .owners(namespace, key, self.replicas(namespace))
            .into_iter()
            .map(str::to_string)
            .collect())
    }

    /// Whether requests for `namespace` go out as placed (marked
    /// forwarded, so the node serves them itself): when this client sends
    /// to every owner itself, i.e. the namespace has more than one, or it
    /// is a node's own forwarding client. With one owner the node is asked
    /// to place it (it knows the namespace's replication even when this
    /// client does not); a placed request to each of several owners keeps
    /// every owner from forwarding it to all the others again.
    fn placed(&self, namespace: &str) -> bool {
        self.forwarded || self.replicas(namespace) > 1
    }

    /// The pooled client of serving node `id`, with this client's tenant
    /// and forwarding flag (what cluster repair uses to reach one node).
    #[doc(hidden)]
    pub async fn node_client(&self, id: &str) -> Result<Client> {
        let view = self.view()?;
        self.node(&view, id).await
    }

    /// The pooled client of node `id`.
    async fn node(&self, view: &View, id: &str) -> Result<Client> {
        let endpoint = view
            .endpoints
            .get(id)
            .ok_or_else(|| unavailable(format!("node {id} left the membership")))?;
        let c = self
            .pool
            .client(endpoint, &self.options)
            .await
            .map_err(|e| unavailable(format!("node {id} ({endpoint}): {e}")))?;
        // Pooled clients are shared by every tenant; this call's settings
        // apply to its copy.
        let c = match &self.tenant {
            Some(t) => c.with_tenant(t.clone()),
            None => c,
        };
        Ok(c.forwarded(self.forwarded).with_max_batch_keys(self.max_batch_keys))
    }

    /// Owners of each key, best first.
    fn place(&self, view: &View, namespace: &str, keys: &[Bytes]) -> Vec<Vec<String>> {
        let r = self.replicas(namespace);
        keys.iter()
            .map(|k| {
                view.placement
                    .owners_of_hash(object_hash(namespace, k), r)
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }

    /// Stores a batch on every owner of each object; returns, per object,
    /// the tier of its first owner's copy.
    pub async fn put_many(
        &self,
        namespace: &str,
        objects: Vec<PutObject>,
        durability: Durability,
    ) -> Result<Vec<Tier>> {
        let view = self.view()?;
        let keys: Vec<Bytes> = objects.iter().map(|o| o.key.clone()).collect();
        validate::keys(&keys, usize::MAX).map_err(ClientError::InvalidArgument)?;
        let owners = self.place(&view, namespace, &keys);
        // (node, rank) -> positions; rank 0 answers the tier.
        let mut batches: BTreeMap<(String, usize), Vec<usize>> = BTreeMap::new();
        for (i, os) in owners.iter().enumerate() {
            for (rank, id) in os.iter().enumerate() {
                batches.entry((id.clone(), rank.min(1))).or_default().push(i);
            }
        }
        let objects = &objects;
        let calls = batches.into_iter().map(|((id, rank), pos)| {
            let view = view.clone();
            async move {
                let c = self.node(&view, &id).await?.forwarded(self.placed(namespace));
                let (tiers, err) = batched(&pos, self.max_batch_keys, |part| {
                    let batch: Vec<PutObject> = part.iter().map(|&i| objects[i].clone()).collect();
                    c.put_many(namespace, batch, durability)
                })
                .await;
                if let Some(e) = err {
                    return Err(with_node(&id, e));
                }
                Ok::<_, ClientError>((rank, pos, tiers))
            }
        });
        let mut out = vec![Tier::Unspecified; objects.len()];
        for r in join_all(calls).await {
            let (rank, pos, tiers) = r?;
            if rank == 0 {
                for (i, t) in pos.into_iter().zip(tiers) {
                    out[i] = t;
                }
            }
        }
        Ok(out)
    }

    /// Stores one object.
    pub async fn put(
        &self,
        namespace: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        durability: Durability,
    ) -> Result<Tier> {
        let mut t = self
            .put_many(namespace, vec![PutObject::new(key, value)], durability)
            .await?;
        Ok(t.pop().unwrap_or(Tier::Unspecified))
    }

    /// Reads a batch; one entry per key, in order. Keys a node does not
    /// hold, or whose node does not answer, are asked of their next owner;
    /// a key is `None` when an owner answered and none holds it, and the
    /// call fails only when no owner of some key answered.
    pub async fn get_many(&self, namespace: &str, keys: Vec<Bytes>) -> Result<Vec<Option<Object>>> {
        let (view, previous) = self.views()?;
        validate::keys(&keys, usize::MAX).map_err(ClientError::InvalidArgument)?;
        let owners = self.place(&view, namespace, &keys);
        let mut out: Vec<Option<Object>> = (0..keys.len()).map(|_| None).collect();
        let mut answered = vec![false; keys.len()];
        let mut last_err: Vec<Option<ClientError>> = (0..keys.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let (mut known_ns, mut unknown_ns) = (false, None);
        let max_rank = owners.iter().map(Vec::len).max().unwrap_or(0);
        for rank in 0..max_rank {
            let mut groups: Groups = BTreeMap::new();
            for &i in &pending {
                if let Some(id) = owners[i].get(rank) {
                    groups.entry(id.clone()).or_default().push((i, keys[i].clone()));
                }
            }
            if groups.is_empty() {
                break;
            }
            let calls = groups.into_iter().map(|(id, items)| {
                let view = view.clone();
                async move {
                    let (found, err) = match self.node(&view, &id).await {
                        Ok(c) => {
                            let c = c.forwarded(self.placed(namespace));
                            let (found, err) = batched(&items, self.max_batch_keys, |part| {
                                let ks: Vec<Bytes> = part.iter().map(|(_, k)| k.clone()).collect();
                                c.get_many(namespace, ks)
                            })
                            .await;
                            (found, err.map(|e| with_node(&id, e)))
                        }
                        Err(e) => (Vec::new(), Some(e)),
                    };
                    (items, found, err)
                }
            });
            let mut next = Vec::new();
            for (mut items, found, err) in join_all(calls).await {
                known_ns |= !found.is_empty();
                // The keys past the answers: the request that failed and
                // those after it.
                let rest = items.split_off(found.len());
                for ((i, _), f) in items.into_iter().zip(found) {
                    answered[i] = true;
                    match f {
                        Some(o) => out[i] = Some(o),
                        None => next.push(i),
                    }
                }
                match err {
                    None => {}
                    Some(e) if retryable(&e) => {
                        let msg = e.to_string();
                        for (i, _) in rest {
                            next.push(i);
                            last_err[i] = Some(unavailable(msg.clone()));
                        }
                    }
                    // A node that never stored the namespace does not know
                    // it: it holds none of these keys.
                    Some(e) if e.kind() == ErrorKind::NotFound => {
                        for (i, _) in rest {
                            answered[i] = true;
                            next.push(i);
                        }
                        unknown_ns = Some(e);
                    }
                    Some(e) => return Err(e),
                }
            }
            pending = next;
        }
        for &i in &pending {
            if !answered[i]
                && let Some(e) = last_err[i].take()
            {
                return Err(e);
            }
        }
        if !previous.is_empty() && !pending.is_empty() {
            let found = self
                .get_from_previous(&previous, namespace, &keys, &owners, pending)
                .await;
            known_ns |= !found.is_empty();
            self.handoff_reads
                .fetch_add(found.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for (i, o) in found {
                out[i] = Some(o);
            }
        }
        match unknown_ns {
            Some(e) if !known_ns => Err(e),
            _ => Ok(out),
        }
    }

    /// Asks the earlier memberships' owners (newest membership first, in
    /// owner order; those not asked already and still answering) for keys
    /// `pending` the current owners do not hold: which of them it holds
    /// (`Locate`), then those. Best effort: a previous owner that fails,
    /// or does not tell what it holds within [`PREVIOUS_OWNER_TIMEOUT`],
    /// is skipped for [`PREVIOUS_OWNER_BACKOFF`]; the objects' transfer is
    /// not timed.
    async fn get_from_previous(
        &self,
        previous: &[Arc<View>],
        namespace: &str,
        keys: &[Bytes],
        owners: &[Vec<String>],
        mut pending: Vec<usize>,
    ) -> Vec<(usize, Object)> {
        let r = self.replicas(namespace);
        // Per key: (view, node) to ask, in order.
        let candidates: HashMap<usize, Vec<(usize, String)>> = pending
            .iter()
            .map(|&i| {
                let h = object_hash(namespace, &keys[i]);
                let mut c: Vec<(usize, String)> = Vec::new();
                for (v, prev) in previous.iter().enumerate() {
                    for id in prev.placement.owners_of_hash(h, r) {
                        if !owners[i].iter().any(|o| o == id) && !c.iter().any(|(_, x)| x == id) {
                            c.push((v, id.to_string()));
                        }
                    }
                }
                (i, c)
            })
            .collect();
        let most = candidates.values().map(Vec::len).max().unwrap_or(0);
        let mut found = Vec::new();
        for rank in 0..most {
            // node -> (the view that names it, keys)
            let mut groups: BTreeMap<String, (usize, Vec<(usize, Bytes)>)> = BTreeMap::new();
            for &i in &pending {
                if let Some((v, id)) = candidates[&i].get(rank)
                    && !self.view.is_down(id)
                {
                    groups
                        .entry(id.clone())
                        .or_insert((*v, Vec::new()))
                        .1
                        .push((i, keys[i].clone()));
                }
            }
            if groups.is_empty() {
                // This rank's candidates are all down; a later one may not be.
                continue;
            }
            let calls = groups.into_iter().map(|(id, (v, items))| async move {
                // Per key answered, what the node holds; the keys past
                // them (a request it did not answer, and those after it)
                // go to the next candidates.
                let mut objects = Vec::with_capacity(items.len());
                for part in items.chunks(self.max_batch_keys) {
                    let ks: Vec<Bytes> = part.iter().map(|(_, k)| k.clone()).collect();
                    // Whether it answers at all is timed; the transfer of
                    // what it holds is not, so a big read is not cut off.
                    let located = tokio::time::timeout(PREVIOUS_OWNER_TIMEOUT, async {
                        // What this node holds itself (Locate is never
                        // forwarded; the read is marked so): it is asked
                        // as a previous owner, not to find the key again.
                        let c = self.node(&previous[v], &id).await?.forwarded(true);
                        let held = c.locate(namespace, ks.clone()).await?;
                        Ok((c, held))
                    })
                    .await;
                    let Some((c, held)) = self.previous_answer(&id, "read", located) else {
                        break;
                    };
                    let held: Vec<usize> = (0..part.len()).filter(|&j| !held[j].tiers.is_empty()).collect();
                    let mut got: Vec<Option<Object>> = (0..part.len()).map(|_| None).collect();
                    if !held.is_empty() {
                        let read = c
                            .get_many(namespace, held.iter().map(|&j| ks[j].clone()).collect())
                            .await;
                        let Some(read) = self.previous_answer(&id, "read", Ok(read)) else {
                            break;
                        };
                        for (&j, o) in held.iter().zip(read) {
                            got[j] = o;
                        }
                    }
                    objects.extend(got);
                }
                (items, objects)
            });
            let mut next = Vec::new();
            for (mut items, objects) in join_all(calls).await {
                let rest = items.split_off(objects.len());
                for ((i, _), o) in items.into_iter().zip(objects) {
                    match o {
                        Some(o) => found.push((i, o)),
                        None => next.push(i),
                    }
                }
                next.extend(rest.into_iter().map(|(i, _)| i));
            }
            pending = next;
        }
        if !found.is_empty() {
            tracing::debug!(namespace, objects = found.len(), "read from previous owners");
        }
        found
    }

    /// Reads one object.
    pub async fn get(&self, namespace: &str, key: impl Into<Bytes>) -> Result<Option<Object>> {
        Ok(self.get_many(namespace, vec![key.into()]).await?.pop().flatten())
    }

    /// For a chain of keys spread over nodes: the tier of each leading key
    /// present (see the module doc), in one call. Within the handoff window
    /// after membership changes, the earlier memberships' owners are asked
    /// (newest first) for the rest of the chain from the first key the
    /// owners asked so far lack.
    pub async fn exists_prefix(&self, namespace: &str, keys: Vec<Bytes>) -> Result<Vec<Tier>> {
        let (view, previous) = self.views()?;
        validate::keys(&keys, usize::MAX).map_err(ClientError::InvalidArgument)?;
        let (mut tiers, mut known_ns, unknown_ns) = self.prefix_in(&view, namespace, &keys).await?;
        let first_gap = |t: &[Option<Tier>]| t.iter().position(Option::is_none).unwrap_or(t.len());
        let mut end = first_gap(&tiers);
        let r = self.replicas(namespace);
        for prev in &previous {
            if end == keys.len() {
                break;
            }
            let rest = &keys[end..];
            let moved = rest.iter().any(|k| {
                let h = object_hash(namespace, k);
                view.placement.owners_of_hash(h, r) != prev.placement.owners_of_hash(h, r)
            });
            if !moved {
                continue;
            }
            let (pt, pk) = self.prefix_from_previous(prev, namespace, rest).await;
            known_ns |= pk;
            for (t, p) in tiers[end..].iter_mut().zip(pt) {
                if t.is_none() {
                    *t = p;
                }
            }
            let before = end;
            end = first_gap(&tiers);
            self.handoff_reads
                .fetch_add((end - before) as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(e) = unknown_ns
            && !known_ns
        {
            return Err(e);
        }
        Ok(tiers[..end].iter().map(|t| t.unwrap_or(Tier::Unspecified)).collect())
    }

    /// `exists_prefix` of `keys` (what follows a chain's first gap) at
    /// their owners in the earlier view `prev`: each key's first owner
    /// there not marked down, every node asked once for its keys in chain
    /// order, for at most [`PREVIOUS_OWNER_TIMEOUT`] (the answers are
    /// small). A node that fails or does not answer is skipped for
    /// [`PREVIOUS_OWNER_BACKOFF`] (one that refuses the request, or does not
    /// know the namespace, is not). Per
    /// key its tier where a node reported it in its leading run, and
    /// whether any node knew the namespace.
    async fn prefix_from_previous(
        &self,
        prev: &Arc<View>,
        namespace: &str,
        keys: &[Bytes],
    ) -> (Vec<Option<Tier>>, bool) {
        let r = self.replicas(namespace);
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            let owners = prev.placement.owners_of_hash(object_hash(namespace, k), r);
            if let Some(id) = owners.into_iter().find(|id| !self.view.is_down(id)) {
                groups.entry(id.to_string()).or_default().push(i);
            }
        }
        let calls = groups.into_iter().map(|(id, pos)| async move {
            let ks: Vec<Bytes> = pos.iter().map(|&i| keys[i].clone()).collect();
            let answer = tokio::time::timeout(PREVIOUS_OWNER_TIMEOUT, async {
                let c = self.node(prev, &id).await?.forwarded(true);
                self.prefix_at(&c, namespace, &ks).await
            })
            .await;
            (id, pos, answer)
        });
        let mut tiers: Vec<Option<Tier>> = vec![None; keys.len()];
        let mut known_ns = false;
        for (id, pos, answer) in join_all(calls).await {
            if let Some(t) = self.previous_answer(&id, "prefix read", answer) {
                known_ns = true;
                for (&i, tier) in pos.iter().zip(t) {
                    tiers[i] = Some(tier);
                }
            }
        }
        (tiers, known_ns)
    }

    /// What previous owner `id` answered to a `what` within
    /// [`PREVIOUS_OWNER_TIMEOUT`], if it did. A node that does not know the
    /// namespace holds none of the keys; one that refuses this request (a
    /// tenant's rights, say) stays up for others; one that fails or does
    /// not answer is skipped for [`PREVIOUS_OWNER_BACKOFF`].
    fn previous_answer<T>(
        &self,
        id: &str,
        what: &str,
        answer: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let why = match answer {
            Ok(Ok(t)) => return Some(t),
            Ok(Err(e)) if e.kind() == ErrorKind::NotFound => return None,
            Ok(Err(e)) if !retryable(&e) => {
                tracing::debug!(node = %id, error = %e, "previous owner refused a {what}");
                return None;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {PREVIOUS_OWNER_TIMEOUT:?}"),
        };
        tracing::debug!(node = %id, error = %why, backoff = ?PREVIOUS_OWNER_BACKOFF, "previous owner skipped ({what})");
        self.view.mark_down(id);
        None
    }

    /// `exists_prefix` of `keys` (a node's keys of a chain, in chain order)
    /// at `c`, in requests of at most `max_batch_keys` keys: the tiers of
    /// the node's leading run. A request answered short ends the run, so
    /// the keys after it are not asked.
    async fn prefix_at(&self, c: &Client, namespace: &str, keys: &[Bytes]) -> Result<Vec<Tier>> {
        let mut out = Vec::new();
        for part in keys.chunks(self.max_batch_keys) {
            let t = c.exists_prefix(namespace, part.to_vec()).await?;
            let short = t.len() < part.len();
            out.extend(t);
            if short {
                break;
            }
        }
        Ok(out)
    }

    /// `exists_prefix` over the owners in `view`: per key its tier where
    /// its first owner reported it in that owner's leading run (`None`
    /// past it), whether any node knew the namespace, and the NOT_FOUND of
    /// one that did not. Keys whose first owner does not answer (or does
    /// not know the namespace) are asked of their own next owners, each
    /// node being asked its keys in chain order; the call fails when a key
    /// had no owner that answered.
    async fn prefix_in(
        &self,
        view: &Arc<View>,
        namespace: &str,
        keys: &[Bytes],
    ) -> Result<(Vec<Option<Tier>>, bool, Option<ClientError>)> {
        let owners = self.place(view, namespace, keys);
        let mut tiers: Vec<Option<Tier>> = vec![None; keys.len()];
        let (mut known_ns, mut unknown_ns) = (false, None);
        // Per key: whether an owner answered for it, and the error of the
        // last one that failed (an index into `errors`).
        let mut answered = vec![false; keys.len()];
        let mut failed: Vec<Option<usize>> = vec![None; keys.len()];
        let mut errors: Vec<ClientError> = Vec::new();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let max_rank = owners.iter().map(Vec::len).max().unwrap_or(0);
        for rank in 0..max_rank {
            // Each key at its owner of this rank, in chain order.
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for &i in &pending {
                if let Some(id) = owners[i].get(rank) {
                    groups.entry(id.clone()).or_default().push(i);
                }
            }
            if groups.is_empty() {
                break;
            }
            let calls = groups.into_iter().map(|(id, pos)| {
                let view = view.clone();
                async move {
                    let ks: Vec<Bytes> = pos.iter().map(|&i| keys[i].clone()).collect();
                    let r = match self.node(&view, &id).await {
                        Ok(c) => self
                            .prefix_at(&c.forwarded(self.placed(namespace)), namespace, &ks)
                            .await
                            .map_err(|e| with_node(&id, e)),
                        Err(e) => Err(e),
                    };
                    (pos, r)
                }
            });
            let mut next = Vec::new();
            for (pos, r) in join_all(calls).await {
                match r {
                    Ok(t) => {
                        known_ns = true;
                        for &i in &pos {
                            answered[i] = true;
                        }
                        for (&i, tier) in pos.iter().zip(t) {
                            tiers[i] = Some(tier);
                        }
                    }
                    Err(e) if retryable(&e) => {
                        for &i in &pos {
                            failed[i] = Some(errors.len());
                        }
                        errors.push(e);
                        next.extend(pos);
                    }
                    // Does not know the namespace: holds none of these keys.
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        for &i in &pos {
                            answered[i] = true;
                        }
                        unknown_ns = Some(e);
                        next.extend(pos);
                    }
                    Err(e) => return Err(e),
                }
            }
            // Chain order again: each next owner's keys go out in order.
            next.sort_unstable();
            pending = next;
        }
        // A key no owner answered for.
        if let Some(f) = (0..keys.len()).find_map(|i| failed[i].filter(|_| !answered[i])) {
            return Err(errors.swap_remove(f));
        }
        Ok((tiers, known_ns, unknown_ns))
    }

    /// Deletes every object of `namespace` on every serving node; returns
    /// how many there were.
    pub async fn clear(&self, namespace: &str) -> Result<u64> {
        let view = self.view()?;
        validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)?;
        let calls = view.endpoints.keys().map(|id| {
            let view = view.clone();
            async move {
                // Every serving node is asked here: none needs to pass it on.
                let c = self.node(&view, id).await?.forwarded(true);
                c.clear(namespace).await.map_err(|e| with_node(id, e))
            }
        });
        // A node that never stored the namespace does not know it: that is
        // NOT_FOUND only when no node knows it.
        let mut total = 0;
        let mut not_found = None;
        let mut known = false;
        for r in join_all(calls).await {
            match r {
                Ok(n) => {
                    total += n;
                    known = true;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => not_found = Some(e),
                Err(e) => return Err(e),
            }
        }
        match not_found {
            Some(e) if !known => Err(e),
            _ => Ok(total),
        }
    }

    /// Deletes keys on every owner; returns how many keys existed on their
    /// first owner.
    pub async fn delete(&self, namespace: &str, keys: Vec<Bytes>) -> Result<u64> {
        let view = self.view()?;
        validate::keys(&keys, usize::MAX).map_err(ClientError::InvalidArgument)?;
        let owners = self.place(&view, namespace, &keys);
        let mut batches: BTreeMap<(String, bool), Vec<Bytes>> = BTreeMap::new();
        for (k, os) in keys.iter().zip(&owners) {
            for (rank, id) in os.iter().enumerate() {
                batches.entry((id.clone(), rank == 0)).or_default().push(k.clone());
            }
        }
        let calls = batches.into_iter().map(|((id, first), ks)| {
            let view = view.clone();
            async move {
                let c = self.node(&view, &id).await?.forwarded(self.placed(namespace));
                let mut n = 0;
                for part in ks.chunks(self.max_batch_keys) {
                    n += c
                        .delete(namespace, part.to_vec())
                        .await
                        .map_err(|e| with_node(&id, e))?;
                }
                Ok::<_, ClientError>(if first { n } else { 0 })
            }
        });
        let mut total = 0;
        let (mut known_ns, mut unknown_ns) = (false, None);
        for r in join_all(calls).await {
            match r {
                Ok(n) => {
                    total += n;
                    known_ns = true;
                }
                // Does not know the namespace: held none of these keys.
                Err(e) if e.kind() == ErrorKind::NotFound => unknown_ns = Some(e),
                Err(e) => return Err(e),
            }
        }
        match unknown_ns {
            Some(e) if !known_ns => Err(e),
            _ => Ok(total),
        }
    }
}

/// Names the node in an error's message (keeps its kind and code).
fn with_node(id: &str, e: ClientError) -> ClientError {
    match e {
        ClientError::Status { kind, code, message } => ClientError::Status {
            kind,
            code,
            message: format!("node {id}: {message}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<NodeInfo> {
        (0..n)
            .map(|i| NodeInfo {
                id: format!("n{i}"),
                endpoint: format!("http://127.0.0.1:{}", 1 + i),
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn owners_follow_the_membership() {
        let (tx, rx) = watch::channel(members(3));
        let c = ClusterClient::new(rx, ClientOptions::default());
        c.set_replication("ns", 2).unwrap();
        let before = c.owners("ns", b"k").unwrap();
        assert_eq!(before.len(), 2);
        assert_ne!(before[0], before[1]);
        // Drop the first owner: the second becomes first.
        let left: Vec<NodeInfo> = members(3).into_iter().filter(|m| m.id != before[0]).collect();
        tx.send(left).unwrap();
        assert_eq!(c.owners("ns", b"k").unwrap()[0], before[1]);
        assert_eq!(c.owners("other", b"k").unwrap().len(), 1, "default replication is 1");
    }

    #[test]
    fn the_placement_epoch_names_ids_and_weights_not_order_or_endpoints() {
        let m = members(3);
        let e = placement_epoch(&m);
        assert_ne!(e, 0);
        let mut reversed = m.clone();
        reversed.reverse();
        assert_eq!(placement_epoch(&reversed), e, "order does not place");
        let mut moved = m.clone();
        moved[1].endpoint = "http://10.0.0.9:1".into();
        assert_eq!(placement_epoch(&moved), e, "endpoints do not place");
        let mut heavier = m.clone();
        heavier[1].weight = 2.0;
        assert_ne!(placement_epoch(&heavier), e);
        assert_ne!(placement_epoch(&m[..2]), e);
        let mut renamed = m.clone();
        renamed[2].id = "n9".into();
        assert_ne!(placement_epoch(&renamed), e);
        // Ids are length-prefixed: ("ab", "c") is not ("a", "bc").
        let two = |a: &str, b: &str| {
            let mut v = members(2);
            v[0].id = a.into();
            v[1].id = b.into();
            placement_epoch(&v)
        };
        assert_ne!(two("ab", "c"), two("a", "bc"));
    }

    #[test]
    fn a_settled_membership_retires_the_earlier_ones() {
        let (tx, rx) = watch::channel(members(3));
        let (settled_tx, settled_rx) = watch::channel(0u64);
        let c = ClusterClient::new(rx, ClientOptions::default()).with_handoff_settlement(settled_rx);
        assert!(!c.handoff_pending(), "no change yet");
        tx.send_replace(members(4));
        assert!(c.handoff_pending(), "a node joined");
        // Settled for another placement (the one before): still pending.
        settled_tx.send_replace(placement_epoch(&members(3)));
        assert!(c.handoff_pending());
        settled_tx.send_replace(placement_epoch(&members(4)));
        assert!(!c.handoff_pending(), "the nodes reported the hand-off done");
        // The retired memberships stay forgotten: after the next change
        // only the settled one is earlier, even when settlement goes back
        // to 0.
        settled_tx.send_replace(0);
        tx.send_replace(members(5));
        let (_, previous) = c.views().unwrap();
        assert_eq!(previous.len(), 1);
        assert_eq!(previous[0].epoch, placement_epoch(&members(4)));
        // Without settlement, only the window ends it.
        let (tx, rx) = watch::channel(members(3));
        let c = ClusterClient::new(rx, ClientOptions::default());
        tx.send_replace(members(4));
        assert!(c.handoff_pending());
        assert!(
            !c.clone()
                .with_handoff_window(std::time::Duration::ZERO)
                .handoff_pending()
        );
    }

    #[test]
    fn a_previous_owner_that_failed_is_skipped_for_the_backoff_only() {
        let (tx, rx) = watch::channel(members(3));
        let c = ClusterClient::new(rx, ClientOptions::default());
        c.view.mark_down("n1");
        let now = std::time::Instant::now();
        assert!(c.view.is_down_at("n1", now));
        assert!(!c.view.is_down_at("n2", now));
        assert!(
            !c.view.is_down_at("n1", now + PREVIOUS_OWNER_BACKOFF),
            "asked again after the back-off"
        );
        // A membership change ends it sooner.
        c.view.mark_down("n1");
        tx.send_replace(members(4));
        c.views().unwrap();
        assert!(!c.view.is_down("n1"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let c = ClusterClient::fixed(members(1), ClientOptions::default());
        assert!(c.set_replication("ns", 0).is_err());
        assert!(c.set_replication("", 1).is_err());
        let empty = ClusterClient::fixed(Vec::new(), ClientOptions::default());
        assert!(matches!(empty.owners("ns", b"k"), Err(e) if e.kind() == ErrorKind::Unavailable));
        let mut dup = members(2);
        dup[1].id = dup[0].id.clone();
        let c = ClusterClient::fixed(dup, ClientOptions::default());
        assert!(matches!(c.owners("ns", b"k"), Err(ClientError::InvalidArgument(_))));
    }

    /// An endpoint that accepts connections and never answers: enough for
    /// a client to connect (HTTP/2 does not wait for the server's
    /// settings), and to count connects.
    async fn silent_endpoint() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        ep
    }

    fn options() -> ClientOptions {
        ClientOptions {
            data_connections: 1,
            ..ClientOptions::default()
        }
    }

    fn nodes_at(endpoints: &[&String]) -> Vec<NodeInfo> {
        endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| NodeInfo {
                id: format!("n{i}"),
                endpoint: ep.to_string(),
                weight: 1.0,
            })
            .collect()
    }

    impl ClusterClient {
        /// The endpoints pooled (connected or connecting), sorted.
        fn pooled(&self) -> Vec<String> {
            let mut eps: Vec<String> = self.pool.lock().slots.keys().cloned().collect();
            eps.sort();
            eps
        }

        fn connects(&self) -> usize {
            self.pool.connects.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn sorted(eps: &[&String]) -> Vec<String> {
        let mut v: Vec<String> = eps.iter().map(|e| e.to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn departed_nodes_connections_are_dropped_on_the_next_membership() {
        let (a, b, c) = (
            silent_endpoint().await,
            silent_endpoint().await,
            silent_endpoint().await,
        );
        let all = nodes_at(&[&a, &b, &c]);
        let (tx, rx) = watch::channel(all.clone());
        let cc = ClusterClient::new(rx, options()).with_handoff_window(std::time::Duration::ZERO);
        for n in &all {
            cc.node_client(&n.id).await.unwrap();
        }
        assert_eq!(cc.pooled(), sorted(&[&a, &b, &c]));
        assert_eq!(cc.connects(), 3);
        // n1 leaves: any call that reads the membership drops its
        // connection, and keeps the others'.
        let old = cc.view().unwrap();
        tx.send_replace(vec![all[0].clone(), all[2].clone()]);
        cc.owners("ns", b"k").unwrap();
        assert_eq!(cc.pooled(), sorted(&[&a, &c]));
        cc.node_client("n0").await.unwrap();
        cc.node_client("n2").await.unwrap();
        assert_eq!(cc.connects(), 3, "the members' connections were kept");
        assert!(cc.node_client("n1").await.is_err(), "n1 left");
        // A call that placed by the membership before (read just before
        // the change) still reaches n1, without pooling it again.
        cc.node(&old, "n1").await.unwrap();
        assert_eq!(cc.connects(), 4);
        assert_eq!(cc.pooled(), sorted(&[&a, &c]));
        // A node that comes back is pooled again; a moved one at its new
        // endpoint only.
        let d = silent_endpoint().await;
        let mut moved = all.clone();
        moved[2].endpoint = d.clone();
        tx.send_replace(moved);
        cc.node_client("n1").await.unwrap();
        cc.node_client("n2").await.unwrap();
        assert_eq!(cc.pooled(), sorted(&[&a, &b, &d]));
        assert_eq!(cc.connects(), 6);
    }

    #[tokio::test]
    async fn previous_owners_stay_pooled_until_the_hand_off_is_done() {
        let (a, b) = (silent_endpoint().await, silent_endpoint().await);
        let all = nodes_at(&[&a, &b]);
        let (tx, rx) = watch::channel(all.clone());
        let (settled_tx, settled_rx) = watch::channel(0u64);
        let cc = ClusterClient::new(rx, options()).with_handoff_settlement(settled_rx);
        for n in &all {
            cc.node_client(&n.id).await.unwrap();
        }
        // n1 drains: reads still ask it for what it has not handed over.
        tx.send_replace(all[..1].to_vec());
        let (_, previous) = cc.views().unwrap();
        assert_eq!(previous.len(), 1);
        assert_eq!(cc.pooled(), sorted(&[&a, &b]));
        cc.node(&previous[0], "n1").await.unwrap();
        assert_eq!(cc.connects(), 2, "the previous owner's connection is reused");
        // Handed over: it is asked no more, and its connection goes.
        settled_tx.send_replace(placement_epoch(&all[..1]));
        assert!(!cc.handoff_pending());
        assert_eq!(cc.pooled(), sorted(&[&a]));
    }

    #[tokio::test]
    async fn concurrent_calls_to_a_new_node_share_one_connect() {
        let (a, b) = (silent_endpoint().await, silent_endpoint().await);
        let cc = ClusterClient::fixed(nodes_at(&[&a, &b]), options());
        // Every call starts before any connect ends (one thread: the
        // connects' sockets are only seen ready once all have waited).
        let calls = (0..8).map(|i| cc.node_client(if i % 2 == 0 { "n0" } else { "n1" }));
        for r in join_all(calls).await {
            r.unwrap();
        }
        assert_eq!(cc.connects(), 2, "one connect per endpoint");
        assert_eq!(cc.pooled(), sorted(&[&a, &b]));
        cc.node_client("n0").await.unwrap();
        assert_eq!(cc.connects(), 2);
    }

    #[tokio::test]
    async fn a_failed_connect_is_tried_again_by_the_next_call() {
        // A port nothing listens on (refused), then listened on again.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ep = format!("http://{addr}");
        let cc = ClusterClient::fixed(nodes_at(&[&ep]), options());
        let calls = (0..4).map(|_| cc.node_client("n0"));
        for r in join_all(calls).await {
            assert!(matches!(r, Err(e) if e.kind() == ErrorKind::Unavailable));
        }
        assert_eq!(cc.connects(), 1, "the waiting calls shared the failure");
        assert!(cc.pooled().is_empty());
        assert!(cc.node_client("n0").await.is_err());
        assert_eq!(cc.connects(), 2, "tried again");
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        cc.node_client("n0").await.unwrap();
        assert_eq!(cc.connects(), 3);
        cc.node_client("n0").await.unwrap();
        assert_eq!(cc.connects(), 3, "pooled once connected");
    }

    #[tokio::test]
    async fn a_connect_that_hangs_holds_up_only_its_endpoint() {
        use futures::FutureExt;
        let (a, b) = (silent_endpoint().await, silent_endpoint().await);
        let cc = ClusterClient::fixed(nodes_at(&[&a, &b]), options());
        cc.owners("ns", b"k").unwrap();
        // n0's connect never ends (a host that does not answer).
        cc.pool.lock().slots.insert(
            a.clone(),
            Slot::Connecting {
                id: u64::MAX,
                done: futures::future::pending().boxed().shared(),
            },
        );
        let mut stuck = Box::pin(cc.node_client("n0"));
        assert!(futures::poll!(stuck.as_mut()).is_pending());
        cc.node_client("n1").await.unwrap();
        assert!(futures::poll!(stuck.as_mut()).is_pending());
        assert_eq!(cc.connects(), 1, "n0's callers wait for its connect");
    }

    #[test]
    fn reads_retry_on_node_failures_not_on_request_errors() {
        let st = |code| ClientError::from(tonic::Status::new(code, "m"));
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::Cancelled,
            tonic::Code::DataLoss,
        ] {
            assert!(retryable(&st(code)), "{code:?}");
        }
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::PermissionDenied,
            tonic::Code::NotFound,
        ] {
            assert!(!retryable(&st(code)), "{code:?}");
        }
    }
}
