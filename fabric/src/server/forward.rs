//! Forwarding in cluster mode: a request that reaches a node which is not
//! the only owner of its keys is carried out on the owners (placement over
//! the serving members, as [`ClusterClient`] does) and answered with what
//! they say. Requests a node sends this way are marked `forwarded`, so the
//! owners serve them locally and never forward them again.

use crate::client::{ClientError, ClientOptions, ClusterClient, NodeInfo};
use crate::cluster::Membership;
use crate::proto::{ErrorKind, status};
use bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;

/// The node's view of the cluster and its client of the other nodes.
pub(crate) struct Forwarder {
    client: ClusterClient,
    members: watch::Receiver<Vec<NodeInfo>>,
    node_id: String,
    /// The etcd watcher feeding `members`; dropped (stopped) at shutdown.
    membership: std::sync::Mutex<Option<Membership>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("node_id", &self.node_id).finish()
    }
}

impl Forwarder {
    /// Forwards over the serving members `membership` watches; `node_id`
    /// is this node's id in it.
    pub(crate) fn new(membership: Membership, node_id: String) -> Forwarder {
        let members = membership.serving_nodes();
        Forwarder {
            client: ClusterClient::new(members.clone(), ClientOptions::default()),
            members,
            node_id,
            membership: std::sync::Mutex::new(Some(membership)),
        }
    }

    /// Whether this node alone owns every key (serve locally).
    pub(crate) fn is_local(&self, namespace: &str, keys: &[Bytes]) -> bool {
        self.client.owned_only_by(&self.node_id, namespace, keys)
    }

    /// Whether this node knows no serving node but itself.
    pub(crate) fn alone(&self) -> bool {
        let m = self.members.borrow();
        m.is_empty() || (m.len() == 1 && m[0].id == self.node_id)
    }

    /// The cluster client acting for `tenant`, its requests marked
    /// forwarded.
    pub(crate) fn client(&self, tenant: &str) -> ClusterClient {
        self.client.forwarding_for(tenant)
    }

    /// The serving members as this node sees them.
    pub(crate) fn serving_nodes(&self) -> watch::Receiver<Vec<NodeInfo>> {
        self.members.clone()
    }

    /// Stops watching the membership.
    pub(crate) fn stop(&self) {
        drop(self.membership.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The status a client gets for a forwarded request that failed (the
/// owner's own code and message, which names the owner).
pub(crate) fn to_status(e: ClientError) -> Status {
    match e {
        ClientError::Status { code, message, .. } => Status::new(code, message),
        ClientError::InvalidArgument(m) => status(ErrorKind::InvalidArgument, format!("forwarding: {m}")),
        e => status(e.kind(), format!("forwarding to the owners: {e}")),
    }
}
