//! The membership watcher: the members prefix kept current by a
//! [`PrefixWatch`] (list, then watch from the list's revision; relist on
//! errors and compaction; the last known map stays while etcd is down;
//! malformed records left out), and what the cluster-aware client derives
//! from it: the serving members, and the placement epoch the nodes have
//! finished handing objects over for.

use super::watch::{PrefixWatch, Record, list_once};
use super::{ClusterError, EtcdTarget, Member, MemberState};
use crate::client::{NodeInfo, placement_epoch};
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
        self.derive(serving)
    }

    /// The placement epoch of the serving members once every serving and
    /// draining member reports it settled (its last repair pass left each
    /// object it holds at all of its owners under that placement); 0 until
    /// then. What [`ClusterClient::with_handoff_settlement`](crate::client::ClusterClient::with_handoff_settlement)
    /// follows. Kept current like [`Self::serving_nodes`].
    pub fn settled_epoch(&self) -> watch::Receiver<u64> {
        self.derive(settled_epoch)
    }

    /// A receiver of `f` of the map, updated (by a task that ends when
    /// this watcher or every receiver is dropped) only when its value
    /// changes: a record's used bytes change at every refresh.
    fn derive<T>(&self, f: fn(&MemberMap) -> T) -> watch::Receiver<T>
    where
        T: PartialEq + Send + Sync + 'static,
    {
        let mut src = self.inner.subscribe();
        let (tx, rx) = watch::channel(f(&src.borrow()));
        tokio::spawn(async move {
            while src.changed().await.is_ok() {
                let v = f(&src.borrow_and_update());
                let changed = *tx.borrow() != v;
                if changed && tx.send(v).is_err() {
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

/// See [`Membership::settled_epoch`].
pub fn settled_epoch(map: &MemberMap) -> u64 {
    let (epoch, unsettled) = handoff(map);
    if unsettled.is_empty() { epoch } else { 0 }
}

/// The serving and draining members whose last repair pass has not
/// settled the current placement (all of them when nothing serves): the
/// ones a hand-off waits for.
pub fn unsettled_members(map: &MemberMap) -> Vec<&Member> {
    handoff(map).1
}

/// The current placement epoch (0 when nothing serves) and the members a
/// hand-off to it waits for.
fn handoff(map: &MemberMap) -> (u64, Vec<&Member>) {
    let nodes = serving(map);
    let epoch = if nodes.is_empty() { 0 } else { placement_epoch(&nodes) };
    let unsettled = map
        .values()
        .filter(|m| matches!(m.state, MemberState::Serving | MemberState::Draining))
        .filter(|m| epoch == 0 || m.settled != epoch)
        .collect();
    (epoch, unsettled)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::TierUsage;

    fn member(id: &str, state: MemberState, settled: u64) -> Member {
        Member {
            node_id: id.into(),
            cluster_id: "c".into(),
            endpoint: format!("http://{id}:1"),
            metrics_endpoint: String::new(),
            state,
            tiers: vec![TierUsage {
                tier: "host".into(),
                capacity_bytes: 1 << 30,
                used_bytes: 0,
                objects: 0,
            }],
            started_at_ms: 0,
            updated_at_ms: 0,
            version: String::new(),
            incarnation: String::new(),
            under_replicated: 0,
            settled,
        }
    }

    fn map(ms: Vec<Member>) -> MemberMap {
        ms.into_iter().map(|m| (m.node_id.clone(), m)).collect()
    }

    #[test]
    fn the_hand_off_is_done_when_every_serving_and_draining_member_settled_the_placement() {
        use MemberState::*;
        let e = placement_epoch(&serving(&map(vec![member("a", Serving, 0), member("b", Serving, 0)])));
        let ids = |m: &MemberMap| {
            unsettled_members(m)
                .iter()
                .map(|m| m.node_id.clone())
                .collect::<Vec<_>>()
        };
        let done = map(vec![member("a", Serving, e), member("b", Serving, e)]);
        assert_eq!(settled_epoch(&done), e);
        assert!(ids(&done).is_empty());
        // A draining node still handing over holds it up; a joining one does not.
        let draining = map(vec![
            member("a", Serving, e),
            member("b", Serving, e),
            member("c", Draining, 0),
        ]);
        assert_eq!(settled_epoch(&draining), 0);
        assert_eq!(ids(&draining), ["c"]);
        let joining = map(vec![
            member("a", Serving, e),
            member("b", Serving, e),
            member("c", Joining, 0),
        ]);
        assert_eq!(settled_epoch(&joining), e);
        // Settled under another placement (before c joined) is not settled.
        let joined = map(vec![
            member("a", Serving, e),
            member("b", Serving, e),
            member("c", Serving, e),
        ]);
        assert_eq!(settled_epoch(&joined), 0);
        assert_eq!(ids(&joined), ["a", "b", "c"]);
        assert_eq!(settled_epoch(&MemberMap::new()), 0);
    }
}
