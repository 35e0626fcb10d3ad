//! Forwarding in cluster mode: a request that reaches a node which is not
//! the only owner of its keys is carried out on the owners (placement over
//! the serving members, as [`ClusterClient`] does) and answered with what
//! they say. Requests a node sends this way are marked `forwarded`, so the
//! owners serve them locally and never forward them again.

use crate::client::{ClientError, ClientOptions, ClusterClient, NodeInfo};
use crate::cluster::{MemberState, Membership, NamespaceWatch};
use crate::proto::{ErrorKind, status};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

/// The node's view of the cluster and its client of the other nodes.
pub(crate) struct Forwarder {
    client: ClusterClient,
    /// What `client` connects with (the node token among them).
    options: ClientOptions,
    members: watch::Receiver<Vec<NodeInfo>>,
    /// See [`Membership::settled_epoch`].
    settled: watch::Receiver<u64>,
    node_id: String,
    /// The etcd watchers feeding `members` and the namespace registry;
    /// dropped (stopped) at shutdown.
    membership: std::sync::Mutex<Option<(Membership, Option<NamespaceWatch>)>>,
    /// What the node's cluster-wide operations need.
    pub(crate) ctl: ClusterCtl,
}

/// A cluster node's handles for cluster-wide operations: publishing
/// namespaces, changing its own state, starting a repair pass.
#[derive(Clone, Debug)]
pub(crate) struct ClusterCtl {
    /// The registry's etcd.
    pub(crate) etcd: crate::cluster::EtcdTarget,
    /// Cluster id.
    pub(crate) cluster_id: String,
    /// The node's advertised state.
    pub(crate) state: Arc<tokio::sync::watch::Sender<MemberState>>,
    /// Starts a repair pass now.
    pub(crate) kick: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("node_id", &self.node_id).finish()
    }
}

impl Forwarder {
    /// Forwards over the serving members `membership` watches; `node_id`
    /// is this node's id in it. Reads also ask a key's earlier owners for
    /// up to `handoff_window` after a membership change, until the members
    /// report the hand-off done. Requests to the owners carry up to
    /// `max_batch_keys` keys, this node's own limit, with `options`' token
    /// (the node token, when the cluster authenticates).
    pub(crate) fn new(
        membership: Membership,
        namespaces: Option<NamespaceWatch>,
        node_id: String,
        ctl: ClusterCtl,
        handoff_window: std::time::Duration,
        max_batch_keys: usize,
        options: ClientOptions,
    ) -> Forwarder {
        let members = membership.serving_nodes();
        let settled = membership.settled_epoch();
        Forwarder {
            options: options.clone(),
            client: ClusterClient::new(members.clone(), options)
                .with_max_batch_keys(max_batch_keys)
                .with_handoff_window(handoff_window)
                .with_handoff_settlement(settled.clone()),
            members,
            settled,
            node_id,
            membership: std::sync::Mutex::new(Some((membership, namespaces))),
            ctl,
        }
    }

    /// The options (node token included) this node's requests to other
    /// nodes use.
    pub(crate) fn client_options(&self) -> ClientOptions {
        self.options.clone()
    }

    /// Sets the replication the forwarding client places `namespace` with.
    pub(crate) fn set_replication(&self, namespace: &str, replicas: u32) {
        if let Err(e) = self.client.set_replication(namespace, replicas as usize) {
            tracing::warn!(namespace, error = %e, "ignoring replication");
        }
    }

    /// Whether this node alone owns every key (serve locally).
    pub(crate) fn is_local(&self, namespace: &str, keys: &[Bytes]) -> bool {
        self.client.owned_only_by(&self.node_id, namespace, keys)
    }

    /// Whether this node may answer reads of `keys` from its own store:
    /// it alone owns them now, and did before the last membership change
    /// (within the handoff window), so no previous owner may hold one it
    /// lacks.
    pub(crate) fn reads_local(&self, namespace: &str, keys: &[Bytes]) -> bool {
        self.client.reads_only_from(&self.node_id, namespace, keys)
    }

    /// Objects and chain keys this node's forwarded reads found only at a
    /// previous owner (see [`ClusterClient::handoff_reads`]).
    pub(crate) fn handoff_reads(&self) -> u64 {
        self.client.handoff_reads()
    }

    /// The placement epoch the members report settled, or 0 (see
    /// [`Membership::settled_epoch`]).
    pub(crate) fn settled_epoch(&self) -> u64 {
        *self.settled.borrow()
    }

    /// Whether this node's reads still ask earlier owners (see
    /// [`ClusterClient::handoff_pending`]).
    pub(crate) fn handoff_pending(&self) -> bool {
        self.client.handoff_pending()
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

    /// The serving members plus this node (while it is still joining).
    pub(crate) fn serving_and_me(&self) -> Vec<NodeInfo> {
        let g = self.membership.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .map(|(m, _)| m.serving_with(&self.node_id))
            .unwrap_or_default()
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
        // The owner refused this node's own token, not the client's: the
        // cluster's nodes hold different node tokens.
        ClientError::Status {
            kind: ErrorKind::Unauthenticated,
            message,
            ..
        } => status(
            ErrorKind::Unavailable,
            format!(
                "{message} (a peer refused this node's node token: every node of a cluster needs the same \
                 auth.node-token-file)"
            ),
        ),
        ClientError::Status { code, message, .. } => Status::new(code, message),
        ClientError::InvalidArgument(m) => status(ErrorKind::InvalidArgument, format!("forwarding: {m}")),
        e => status(e.kind(), format!("forwarding to the owners: {e}")),
    }
}
