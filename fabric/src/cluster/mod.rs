//! Cluster membership on etcd: the member and cluster records and their key
//! layout ([`Member`], [`ClusterRecord`]), a node's registration under a
//! lease ([`Registration`]) and the membership watcher ([`Membership`]).
//!
//! Key layout, all under `/kvfabric/<cluster-id>/`:
//!
//! - `cluster`: the cluster's identity record, created by the first node
//!   with a put-if-absent transaction;
//! - `members/<node-id>`: one JSON [`Member`] per live node, attached to
//!   that node's lease, so it disappears when the node revokes the lease
//!   (graceful shutdown) or stops renewing it (crash, partition);
//! - `namespaces/<name>`: one JSON [`NamespaceRecord`] per namespace created
//!   with `CreateNamespace`: owner tenant and replication factor;
//! - `workers/<name>`: one JSON [`WorkerRecord`] per live engine worker,
//!   under that worker's lease ([`WorkerLease`]); routers follow them.
//!
//! A node's data directory remembers the cluster it joined (the
//! `cluster-id` file); a node pointed at another cluster refuses to start.

mod error;
mod member;
mod membership;
mod namespace;
#[cfg(feature = "server")]
mod registration;
mod target;
mod watch;
mod worker;

pub use error::ClusterError;
pub use member::{ClusterRecord, Member, MemberState, TierUsage};
pub use membership::{MemberMap, Membership, list_members, settled_epoch, unsettled_members};
pub use namespace::{
    MAX_REPLICATION, NamespaceMap, NamespaceRecord, NamespaceWatch, PublishError, check_replication, claim,
    follow_replication, list_namespaces, namespace_key, namespaces_prefix, publish, watch_namespaces,
};
#[cfg(feature = "server")]
pub use registration::{Registration, RegistrationConfig, RepairStatus, UsageFn};
pub use target::EtcdTarget;
pub use watch::{PrefixWatch, Record, RecordMap};
pub use worker::{WorkerLease, WorkerRecord, list_workers, watch_workers, worker_key, workers_prefix};

/// Longest wait for one etcd request.
pub(crate) const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Connects a client to `etcd` (no request is made yet, except the
/// authentication when the target names a user).
pub(crate) async fn connect(etcd: &EtcdTarget) -> Result<etcd_client::Client, ClusterError> {
    bounded(
        etcd,
        etcd_client::Client::connect(etcd.endpoints(), Some(etcd.connect_options())),
    )
    .await
}

/// Runs one etcd call under [`REQUEST_TIMEOUT`].
pub(crate) async fn bounded<T>(
    etcd: &EtcdTarget,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| ClusterError::from_etcd(etcd, e)),
        Err(_) => Err(ClusterError::Unreachable {
            endpoints: etcd.to_string(),
            reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

/// Root of every key kvfabric writes to etcd.
pub const KEY_ROOT: &str = "/kvfabric";

/// Name of the file in a node's data directory that records the cluster id.
pub const DATA_DIR_CLUSTER_FILE: &str = "cluster-id";

/// `/kvfabric/<cluster-id>/cluster`: the cluster's identity record.
pub fn cluster_key(cluster_id: &str) -> String {
    format!("{KEY_ROOT}/{cluster_id}/cluster")
}

/// `/kvfabric/<cluster-id>/members/`: prefix of every member record.
pub fn members_prefix(cluster_id: &str) -> String {
    format!("{KEY_ROOT}/{cluster_id}/members/")
}

/// `/kvfabric/<cluster-id>/members/<node-id>`.
pub fn member_key(cluster_id: &str, node_id: &str) -> String {
    format!("{}{node_id}", members_prefix(cluster_id))
}

/// Checks a cluster or node id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`
/// (it becomes one segment of an etcd key). `what` names the setting.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("{what} {id:?} must be 1 to 64 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {id:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    if id == "." || id == ".." {
        return Err(format!("{what} {id:?} is not a valid id"));
    }
    Ok(())
}

/// Parses a `--cluster` URL: `etcd://HOST:PORT[,HOST:PORT...]`, or
/// `etcds://` with TLS and credentials (see [`EtcdTarget`]).
pub fn parse_etcd_url(url: &str) -> Result<EtcdTarget, String> {
    EtcdTarget::parse(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        assert_eq!(cluster_key("c1"), "/kvfabric/c1/cluster");
        assert_eq!(member_key("c1", "n-2"), "/kvfabric/c1/members/n-2");
        assert!(member_key("c1", "n").starts_with(&members_prefix("c1")));
    }

    #[test]
    fn ids_and_urls() {
        validate_id("cluster.id", "prod-eu_1.a").unwrap();
        assert!(validate_id("node-id", "").unwrap_err().contains("node-id"));
        assert!(validate_id("node-id", "a/b").unwrap_err().contains("'/'"));
        assert!(validate_id("node-id", "..").is_err());
        assert!(validate_id("node-id", &"x".repeat(65)).is_err());
        assert!(
            parse_etcd_url("http://a:1").is_err(),
            "the URL grammar is tested in target.rs"
        );
    }
}
