//! The membership watcher: the members prefix kept current by a
//! [`PrefixWatch`] (list, then watch from the list's revision; relist on
//! errors and compaction; the last known map stays while etcd is down;
//! malformed records left out), and the serving members derived from it
//! as the cluster-aware client wants them.

use super::watch::{PrefixWatch, Record, list_once};
use super::{ClusterError, EtcdTarget, Member, MemberState};
use crate::client::NodeInfo;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Members by node id.
pub type MemberMap = BTreeMap<String, Member>;

impl Record for Member {
    const WHAT: &'static str = "member";

    fn decode(key: &str, value: &[u8]) -> Result<Self, ClusterError> {
        Member::decode(key, value)
    }

    fn id(&self) -> &str {
        &self.node_id
    }
}

/// A running watcher of one cluster's members; stops when dropped.
#[derive(Debug)]
pub struct Membership {
    inner: PrefixWatch<Member>,
}

/// Lists the members of a cluster once, sorted by node id.
pub async fn list_members(etcd: &EtcdTarget, cluster_id: &str) -> Result<Vec<Member>, ClusterError> {
    let map = list_once::<Member>(etcd, &super::members_prefix(cluster_id)).await?;
    Ok(map.into_values().collect())
}

impl Membership {
    /// Lists the members (failing if etcd cannot be reached), then keeps the
    /// map current in the background.
    pub async fn start(etcd: EtcdTarget, cluster_id: String) -> Result<Membership, ClusterError> {
        let inner = PrefixWatch::start(etcd, super::members_prefix(&cluster_id)).await?;
        Ok(Membership { inner })
    }

    /// The current members.
    pub fn snapshot(&self) -> Arc<MemberMap> {
        self.inner.snapshot()
    }

    /// The serving members as the cluster-aware client wants them
    /// ([`ClusterClient::new`](crate::client::ClusterClient::new)): id,
    /// gRPC endpoint and placement weight (bytes of node-local capacity:
    /// HBM, host and disk; 1 when a node reports none). Kept current by a
    /// task that ends when this watcher is dropped.
    pub fn serving_nodes(&self) -> watch::Receiver<Vec<NodeInfo>> {
        let mut src = self.inner.subscribe();
        let (tx, rx) = watch::channel(serving(&src.borrow()));
        tokio::spawn(async move {
            while src.changed().await.is_ok() {
                let nodes = serving(&src.borrow_and_update());
                // Wake receivers only when the serving set changed (a
                // record's used bytes change every refresh).
                let changed = *tx.borrow() != nodes;
                if changed && tx.send(nodes).is_err() {
                    break;
                }
                if tx.is_closed() {
                    break;
                }
            }
        });
        rx
    }

    /// The serving members plus member `id` whatever its state (a node
    /// still joining): the placement it will serve under once it turns
    /// serving.
    pub fn serving_with(&self, id: &str) -> Vec<NodeInfo> {
        let map = self.snapshot();
        map.values()
            .filter(|m| m.state == MemberState::Serving || m.node_id == id)
            .map(node_info)
            .collect()
    }

    /// A receiver notified on every change of the map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MemberMap>> {
        self.inner.subscribe()
    }

    /// Waits up to `timeout` until `pred` holds for the map; returns the
    /// map that satisfied it, or the last one seen on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&MemberMap) -> bool,
    ) -> Result<Arc<MemberMap>, Arc<MemberMap>> {
        self.inner.wait_for(timeout, pred).await
    }
}

/// Serving members as client nodes, sorted by id.
fn serving(map: &MemberMap) -> Vec<NodeInfo> {
    map.values()
        .filter(|m| m.state == MemberState::Serving)
        .map(node_info)
        .collect()
}

/// A member as the client sees it: id, endpoint and placement weight.
fn node_info(m: &Member) -> NodeInfo {
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
}
