//! Cluster-membership errors: identity mismatches and duplicate node ids
//! (fix the configuration), etcd being unreachable (retry), malformed
//! records (someone else wrote under our prefix).

use kvfabric_proto::ErrorKind;
use std::path::PathBuf;

/// What can go wrong joining or watching a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Bad setting (endpoints, ids).
    #[error("{0}")]
    InvalidSettings(String),
    /// etcd did not answer (in time).
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What failed.
        reason: String,
    },
    /// An etcd request failed (other than by etcd being unreachable).
    #[error("etcd request failed: {0}")]
    Etcd(String),
    /// The data directory belongs to another cluster.
    #[error(
        "data directory {dir} belongs to cluster {dir_cluster:?}, but this node is configured for cluster \
         {configured:?}; refusing to join (use the right cluster.id, or another data directory)"
    )]
    DataDirMismatch {
        /// The data directory.
        dir: PathBuf,
        /// Cluster recorded in the data directory.
        dir_cluster: String,
        /// Cluster in the settings.
        configured: String,
    },
    /// etcd's identity record names another cluster.
    #[error("etcd key {key} holds the identity of cluster {found:?}, expected {expected:?}; refusing to join")]
    IdentityMismatch {
        /// The identity key.
        key: String,
        /// Cluster found there.
        found: String,
        /// Cluster in the settings.
        expected: String,
    },
    /// Another live node registered the same node id.
    #[error(
        "node id {node_id:?} is already registered in cluster {cluster_id:?} by a live node at {endpoint} \
         (started at {started_at_ms} ms); refusing to start a second node with the same id"
    )]
    NodeIdTaken {
        /// The node id.
        node_id: String,
        /// The cluster.
        cluster_id: String,
        /// The other node's endpoint.
        endpoint: String,
        /// When the other node started (ms since the epoch).
        started_at_ms: u64,
    },
    /// A record in etcd could not be decoded.
    #[error("malformed record at etcd key {key}: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The lease was lost (expired or revoked) while the node was running.
    #[error("etcd lease {0:x} is gone")]
    LeaseLost(i64),
    /// Reading or writing the data directory's cluster file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl From<etcd_client::Error> for ClusterError {
    fn from(e: etcd_client::Error) -> Self {
        ClusterError::Etcd(e.to_string())
    }
}

impl ClusterError {
    /// Classifies an etcd client error: connection-level failures become
    /// [`ClusterError::Unreachable`] with the innermost cause (e.g.
    /// "Connection refused"), the rest [`ClusterError::Etcd`].
    pub(crate) fn from_etcd(etcd: &super::EtcdTarget, e: etcd_client::Error) -> ClusterError {
        use etcd_client::Error as E;
        let unreachable = match &e {
            E::TransportError(_) | E::IoError(_) => true,
            E::GRpcStatus(s) => {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) || (s.code() == tonic::Code::Unknown && s.message() == "transport error")
            }
            _ => false,
        };
        if !unreachable {
            return e.into();
        }
        // The innermost cause says what happened ("Connection refused ...").
        let mut cause: &dyn std::error::Error = match &e {
            E::GRpcStatus(s) => s,
            other => other,
        };
        while let Some(next) = cause.source() {
            cause = next;
        }
        let reason = match &e {
            E::GRpcStatus(s) if cause.to_string() == s.to_string() => s.message().to_string(),
            _ => cause.to_string(),
        };
        ClusterError::Unreachable {
            endpoints: etcd.to_string(),
            reason,
        }
    }

    /// The public kind: unavailable errors are worth retrying, the others
    /// need a configuration fix.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClusterError::InvalidSettings(_) => ErrorKind::InvalidArgument,
            ClusterError::Unreachable { .. } | ClusterError::Etcd(_) | ClusterError::LeaseLost(_) => {
                ErrorKind::Unavailable
            }
            ClusterError::DataDirMismatch { .. }
            | ClusterError::IdentityMismatch { .. }
            | ClusterError::NodeIdTaken { .. } => ErrorKind::FailedPrecondition,
            ClusterError::Malformed { .. } => ErrorKind::DataCorruption,
            ClusterError::Io { .. } => ErrorKind::Internal,
        }
    }
}
