//! The node's typed errors and their public kind; the conversion to a gRPC
//! status goes through `kvfabric_proto::status`, the one mapping.

use kvfabric_proto::ErrorKind;
use kvfabric_tiers::TierError;

/// Errors the node reports to clients.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// Bad request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Namespace does not exist.
    #[error("namespace {0:?} does not exist")]
    NamespaceNotFound(String),
    /// Tenant may not use the namespace.
    #[error("tenant {tenant:?} may not use namespace {namespace:?} (owned by another tenant)")]
    PermissionDenied {
        /// Tenant.
        tenant: String,
        /// Namespace.
        namespace: String,
    },
    /// Object over the configured maximum.
    #[error("object {key} is {size} bytes; this node's maximum object size is {max} bytes")]
    ObjectTooLarge {
        /// Key, hex.
        key: String,
        /// Declared size.
        size: u64,
        /// Limit.
        max: u64,
    },
    /// The namespace is being handed to the tenant the cluster's records
    /// name (this node drops what it held for the previous owner first).
    #[error(
        "namespace {0:?} is being handed to the tenant the cluster's records name; this node first drops \
         the objects it held for the previous owner: retry shortly"
    )]
    Reassigning(String),
    /// Creating one more namespace would pass a limit.
    #[error("cannot create another namespace: {0}")]
    TooManyNamespaces(String),
    /// Storage engine error.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// Joining the cluster failed.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// Something unexpected.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FabricError {
    /// The public kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FabricError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            FabricError::Reassigning(_) => ErrorKind::Unavailable,
            FabricError::NamespaceNotFound(_) => ErrorKind::NotFound,
            FabricError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            FabricError::ObjectTooLarge { .. } | FabricError::TooManyNamespaces(_) => ErrorKind::Capacity,
            FabricError::Internal(_) => ErrorKind::Internal,
            FabricError::Cluster(c) => c.kind(),
            FabricError::Tier(t) => match t {
                TierError::Full { .. } | TierError::TooLarge { .. } | TierError::CapacityExhausted { .. } => {
                    ErrorKind::Capacity
                }
                TierError::Corrupt { .. } => ErrorKind::DataCorruption,
                TierError::DurabilityUnavailable { .. } => ErrorKind::FailedPrecondition,
                TierError::Io { .. } | TierError::Index(_) | TierError::ObjectStore(_) | TierError::Unavailable(_) => {
                    ErrorKind::Unavailable
                }
                TierError::Config(_) => ErrorKind::Internal,
                TierError::Invalid(_) | TierError::InvalidHeader { .. } => ErrorKind::InvalidArgument,
            },
        }
    }
}

impl From<FabricError> for tonic::Status {
    fn from(e: FabricError) -> Self {
        kvfabric_proto::status(e.kind(), e.to_string())
    }
}
