//! The membership watcher: lists a cluster's members, then watches the
//! members prefix from the list's revision, keeping a current map that
//! callers read as a snapshot or wait on through a `watch` channel. Watch
//! errors, cancellation and compaction lead to a fresh list; while etcd is
//! unreachable the last known map stays (with backoff between retries).
//! Malformed records are logged and left out, never guessed at.

use super::registration::{bounded, connect};
use super::{ClusterError, Member, MemberState};
use crate::client::NodeInfo;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Members by node id.
pub type MemberMap = BTreeMap<String, Member>;

/// A running watcher of one cluster's members; stops when dropped.
#[derive(Debug)]
pub struct Membership {
    rx: watch::Receiver<Arc<MemberMap>>,
    task: JoinHandle<()>,
}

/// Lists the members of `cluster_id` once (decoded; malformed records are
/// skipped with a warning). Returns the map and the store revision.
async fn list(client: &mut Client, endpoints: &[String], cluster_id: &str) -> Result<(MemberMap, i64), ClusterError> {
    let prefix = super::members_prefix(cluster_id);
    let r = bounded(endpoints, client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
    let mut map = MemberMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        match Member::decode(&key, kv.value()) {
            Ok(m) => {
                map.insert(m.node_id.clone(), m);
            }
            Err(e) => tracing::warn!(error = %e, "skipping member record"),
        }
    }
    Ok((map, rev))
}

/// Lists the members of a cluster once, sorted by node id.
pub async fn list_members(endpoints: &[String], cluster_id: &str) -> Result<Vec<Member>, ClusterError> {
    let mut c = connect(endpoints).await?;
    let (map, _) = list(&mut c, endpoints, cluster_id).await?;
    Ok(map.into_values().collect())
}

impl Membership {
    /// Lists the members (failing if etcd cannot be reached), then keeps the
    /// map current in the background.
    pub async fn start(endpoints: Vec<String>, cluster_id: String) -> Result<Membership, ClusterError> {
        let mut client = connect(&endpoints).await?;
        let (map, rev) = list(&mut client, &endpoints, &cluster_id).await?;
        let (tx, rx) = watch::channel(Arc::new(map));
        let task = tokio::spawn(run(endpoints, cluster_id, client, rev, tx));
        Ok(Membership { rx, task })
    }

    /// The current members.
    pub fn snapshot(&self) -> Arc<MemberMap> {
        self.rx.borrow().clone()
    }

    /// The serving members as the cluster-aware client wants them
    /// ([`ClusterClient::new`](crate::client::ClusterClient::new)): id,
    /// gRPC endpoint and placement weight (bytes of node-local capacity:
    /// HBM, host and disk; 1 when a node reports none). Kept current by a
    /// task that ends when this watcher is dropped.
    pub fn serving_nodes(&self) -> watch::Receiver<Vec<NodeInfo>> {
        let mut src = self.rx.clone();
        let (tx, rx) = watch::channel(serving(&src.borrow()));
        tokio::spawn(async move {
            while src.changed().await.is_ok() {
                let nodes = serving(&src.borrow_and_update());
                if tx.send(nodes).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// A receiver notified on every change of the map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MemberMap>> {
        self.rx.clone()
    }

    /// Waits up to `timeout` until `pred` holds for the map; returns the
    /// map that satisfied it, or the last one seen on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&MemberMap) -> bool,
    ) -> Result<Arc<MemberMap>, Arc<MemberMap>> {
        let mut rx = self.rx.clone();
        let r = tokio::time::timeout(timeout, async {
            let seen = rx.wait_for(|m| pred(m.as_ref())).await.map(|m| m.clone());
            match seen {
                Ok(m) => m,
                Err(_) => std::future::pending().await,
            }
        })
        .await;
        r.map_err(|_| self.snapshot())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why one watch ended.
enum WatchEnd {
    /// Compacted or cancelled by the server: list again.
    Relist,
    /// The connection failed.
    Failed(ClusterError),
}

async fn watch_from(
    client: &mut Client,
    endpoints: &[String],
    cluster_id: &str,
    rev: i64,
    tx: &watch::Sender<Arc<MemberMap>>,
) -> WatchEnd {
    let prefix = super::members_prefix(cluster_id);
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let mut stream = match bounded(endpoints, client.watch(prefix, Some(opts))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(e),
    };
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return WatchEnd::Failed(ClusterError::Unreachable {
                    endpoints: endpoints.join(","),
                    reason: "watch stream closed".into(),
                });
            }
            Err(e) => return WatchEnd::Failed(e.into()),
        };
        if msg.canceled() || msg.compact_revision() > 0 {
            tracing::info!(
                reason = msg.cancel_reason(),
                compact_revision = msg.compact_revision(),
                "membership watch cancelled; listing again"
            );
            return WatchEnd::Relist;
        }
        if msg.events().is_empty() {
            continue;
        }
        let mut map = (**tx.borrow()).clone();
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let node = key.rsplit('/').next().unwrap_or_default().to_string();
            match ev.event_type() {
                EventType::Delete => {
                    map.remove(&node);
                }
                EventType::Put => match Member::decode(&key, kv.value()) {
                    Ok(m) => {
                        map.insert(m.node_id.clone(), m);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring member record");
                        map.remove(&node);
                    }
                },
            }
        }
        tx.send_replace(Arc::new(map));
    }
}

async fn run(
    endpoints: Vec<String>,
    cluster_id: String,
    mut client: Client,
    mut rev: i64,
    tx: watch::Sender<Arc<MemberMap>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_from(&mut client, &endpoints, &cluster_id, rev, &tx).await {
            WatchEnd::Relist => {}
            WatchEnd::Failed(e) => {
                tracing::warn!(error = %e, "membership watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        // List again (from a fresh connection) until etcd answers.
        loop {
            let r = async {
                let mut c = connect(&endpoints).await?;
                let (map, r) = list(&mut c, &endpoints, &cluster_id).await?;
                Ok::<_, ClusterError>((c, map, r))
            }
            .await;
            match r {
                Ok((c, map, r)) => {
                    client = c;
                    rev = r;
                    tx.send_replace(Arc::new(map));
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "listing members");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Serving members as client nodes, sorted by id.
fn serving(map: &MemberMap) -> Vec<NodeInfo> {
    map.values()
        .filter(|m| m.state == MemberState::Serving)
        .map(|m| {
            let local: u64 = m
                .tiers
                .iter()
                .filter(|t| t.tier != "object" && t.capacity_bytes != u64::MAX)
                .map(|t| t.capacity_bytes)
                .fold(0u64, u64::saturating_add);
            NodeInfo {
                id: m.node_id.clone(),
                endpoint: m.endpoint.clone(),
                weight: if local == 0 { 1.0 } else { local as f64 },
            }
        })
        .collect()
}
