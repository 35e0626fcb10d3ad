//! The kvfabric node: settings, the gRPC service over the tier stack, the
//! namespace registry, authentication, Prometheus metrics and the node
//! runner.

pub mod auth;
mod config;
mod error;
mod forward;
mod local;
mod metrics;
pub(crate) mod namespaces;
mod node;
mod repair;
mod service;
mod tombstones;

pub use config::{
    AuthSettings, ByteSize, ClusterSettings, DiskSettings, HbmSettings, HostSettings, LimitSettings, LocalSettings,
    ObjectSettings, Settings, TieringSettings, TlsSettings,
};
pub use error::FabricError;
pub use metrics::Metrics;
pub use namespaces::{DEFAULT_TENANT, NamespaceEntry, Namespaces};
pub use node::{Node, NodeHandle};
pub use service::BlockService;
