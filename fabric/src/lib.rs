//! kvfabric: a storage-centric KV cache fabric.
//!
//! This crate is the KV block service. Without default features it is only
//! the client library ([`client`]), the canonical block hash ([`hash`]),
//! cluster placement ([`placement`]), the cluster-aware client
//! ([`cluster_client`]), bearer tokens ([`auth`]), TLS ([`tls`]) and the argument checks
//! both sides share ([`validate`]): what engines, the
//! router and the planner link. With the `server` feature (default) it is
//! also the node ([`server`]): the gRPC service over the tier stack,
//! Prometheus metrics and the `kvfabric` binary, and cluster membership on
//! etcd ([`cluster`]).

pub mod auth;
pub mod client;
pub mod cluster_client;
pub mod hash;
pub mod local;
pub mod placement;
pub mod size;
pub mod tls;
pub mod transport;
pub mod validate;

#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "test-util")]
pub mod testutil;

pub use kvfabric_proto as proto;
pub use kvfabric_proto::ErrorKind;
