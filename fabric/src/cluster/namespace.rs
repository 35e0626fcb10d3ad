//! Cluster-wide namespaces: one JSON [`NamespaceRecord`] per namespace
//! created with `CreateNamespace` (`kvfabric namespace create`), at
//! `/kvfabric/<cluster-id>/namespaces/<name>`, holding its owner tenant and
//! replication factor. Every node watches the prefix ([`NamespaceWatch`])
//! and applies the records to its registry, so all nodes (and their
//! forwarding clients) agree on a namespace's replication. A namespace
//! that comes into being implicitly on a first put is [`claim`]ed: its
//! record is created with replication 1 unless one exists, so one tenant
//! owns a name on every node. [`publish`] creates or updates a record with
//! a compare-and-swap that refuses another tenant's namespace.

use super::watch::{PrefixWatch, Record, RecordMap, decode_named};
use super::{ClusterError, EtcdTarget, KEY_ROOT};
use super::{bounded, connect};
use crate::client::ClusterClient;
use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Largest replication factor a namespace may ask for.
pub const MAX_REPLICATION: u32 = 16;

/// `/kvfabric/<cluster-id>/namespaces/`: prefix of every namespace record.
pub fn namespaces_prefix(cluster_id: &str) -> String {
    format!("{KEY_ROOT}/{cluster_id}/namespaces/")
}

/// `/kvfabric/<cluster-id>/namespaces/<name>`.
pub fn namespace_key(cluster_id: &str, name: &str) -> String {
    format!("{}{name}", namespaces_prefix(cluster_id))
}

/// One namespace's cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NamespaceRecord {
    /// Namespace name (the key's last segment).
    pub name: String,
    /// Tenant that owns it.
    pub owner: String,
    /// Copies of each object, 1 to [`MAX_REPLICATION`].
    pub replication: u32,
    /// When the record was last written, ms since the Unix epoch (the
    /// writing node's clock; informational).
    #[serde(default)]
    pub updated_at_ms: u64,
}

impl NamespaceRecord {
    /// JSON bytes for etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a namespace record always serializes")
    }

    /// Checks the record's fields (names, replication).
    pub fn validate(&self) -> Result<(), String> {
        crate::validate::name("namespace", &self.name)?;
        crate::validate::name("tenant", &self.owner)?;
        check_replication(&self.name, self.replication)
    }
}

/// Checks a replication factor.
pub fn check_replication(namespace: &str, replication: u32) -> Result<(), String> {
    if (1..=MAX_REPLICATION).contains(&replication) {
        Ok(())
    } else {
        Err(format!(
            "replication for namespace {namespace:?} must be 1 to {MAX_REPLICATION}, got {replication}"
        ))
    }
}

impl Record for NamespaceRecord {
    const WHAT: &'static str = "namespace";

    fn decode(key: &str, value: &[u8]) -> Result<Self, ClusterError> {
        decode_named(key, value, "namespaces", NamespaceRecord::validate)
    }

    fn id(&self) -> &str {
        &self.name
    }
}

/// Namespace records by name.
pub type NamespaceMap = RecordMap<NamespaceRecord>;

/// A running watcher of a cluster's namespace records; stops when dropped.
pub type NamespaceWatch = PrefixWatch<NamespaceRecord>;

/// Starts watching the namespace records of `cluster_id`.
pub async fn watch_namespaces(etcd: EtcdTarget, cluster_id: &str) -> Result<NamespaceWatch, ClusterError> {
    PrefixWatch::start(etcd, namespaces_prefix(cluster_id)).await
}

/// Lists the namespace records of a cluster once, sorted by name.
pub async fn list_namespaces(etcd: &EtcdTarget, cluster_id: &str) -> Result<Vec<NamespaceRecord>, ClusterError> {
    let map = super::watch::list_once::<NamespaceRecord>(etcd, &namespaces_prefix(cluster_id)).await?;
    Ok(map.into_values().collect())
}

/// Why [`publish`] refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The namespace belongs to another tenant.
    #[error("namespace {namespace:?} belongs to tenant {owner:?}")]
    OtherOwner {
        /// The namespace.
        namespace: String,
        /// Its owner.
        owner: String,
    },
    /// etcd failed or the record is malformed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What [`create_or_read`] found.
enum Found {
    /// No record was there: `rec` was written.
    Written,
    /// One was there but went before it could be read (retry).
    Gone,
    /// The record there, of the same tenant, and its mod revision.
    Owned(NamespaceRecord, i64),
}

/// Writes `rec` at `key` if no record is there; else reads the one that
/// is, refusing it when another tenant owns it.
async fn create_or_read(
    c: &mut etcd_client::Client,
    etcd: &EtcdTarget,
    key: &str,
    rec: &NamespaceRecord,
) -> Result<Found, PublishError> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, rec.encode(), None)])
        .or_else([TxnOp::get(key, None)]);
    let r = bounded(etcd, c.txn(txn)).await?;
    if r.succeeded() {
        return Ok(Found::Written);
    }
    let existing = r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    });
    let Some((value, rev)) = existing else {
        return Ok(Found::Gone);
    };
    // A malformed record is replaced only by... nobody: report it.
    let old = NamespaceRecord::decode(key, &value)?;
    if old.owner != rec.owner {
        return Err(PublishError::OtherOwner {
            namespace: rec.name.clone(),
            owner: old.owner,
        });
    }
    Ok(Found::Owned(old, rev))
}

/// Creates the namespace record, or updates its replication when the same
/// tenant owns it; refuses another tenant's namespace. Retries a lost
/// compare-and-swap a few times.
pub async fn publish(etcd: &EtcdTarget, cluster_id: &str, rec: &NamespaceRecord) -> Result<(), PublishError> {
    rec.validate().map_err(ClusterError::InvalidSettings)?;
    let key = namespace_key(cluster_id, &rec.name);
    let mut c = connect(etcd).await?;
    for _ in 0..5 {
        let rev = match create_or_read(&mut c, etcd, &key, rec).await? {
            Found::Written => return Ok(()),
            Found::Gone => continue,
            Found::Owned(_, rev) => rev,
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.clone(), rec.encode(), None)]);
        if bounded(etcd, c.txn(txn)).await?.succeeded() {
            return Ok(());
        }
    }
    Err(ClusterError::Etcd(format!("namespace record {key} kept changing; try again")).into())
}

/// Claims `name` for `owner` (a first put into a namespace this node does
/// not know): creates its record with replication 1 if there is none, and
/// returns the record that stands, which may be one another node wrote
/// (with its replication). Refuses a name another tenant owns.
pub async fn claim(
    etcd: &EtcdTarget,
    cluster_id: &str,
    name: &str,
    owner: &str,
    now_ms: u64,
) -> Result<NamespaceRecord, PublishError> {
    let rec = NamespaceRecord {
        name: name.to_string(),
        owner: owner.to_string(),
        replication: 1,
        updated_at_ms: now_ms,
    };
    rec.validate().map_err(ClusterError::InvalidSettings)?;
    let key = namespace_key(cluster_id, name);
    let mut c = connect(etcd).await?;
    // A record deleted between the compare and the read is claimed again.
    for _ in 0..5 {
        match create_or_read(&mut c, etcd, &key, &rec).await? {
            Found::Written => return Ok(rec),
            Found::Gone => continue,
            Found::Owned(old, _) => return Ok(old),
        }
    }
    Err(ClusterError::Etcd(format!("namespace record {key} kept changing; try again")).into())
}

/// Keeps `client`'s replication per namespace in step with `watch` (until
/// the watch is dropped): what a cluster-aware client outside the nodes
/// uses to place replicated namespaces the way the nodes do.
pub fn follow_replication(watch: &NamespaceWatch, client: &ClusterClient) {
    let mut rx = watch.subscribe();
    let client = client.clone();
    apply_replication(&rx.borrow(), &client);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let map: Arc<NamespaceMap> = rx.borrow_and_update().clone();
            apply_replication(&map, &client);
        }
    });
}

fn apply_replication(map: &NamespaceMap, client: &ClusterClient) {
    for r in map.values() {
        if let Err(e) = client.set_replication(&r.name, r.replication as usize) {
            tracing::warn!(error = %e, namespace = %r.name, "ignoring namespace replication");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> NamespaceRecord {
        NamespaceRecord {
            name: "weights".into(),
            owner: "default".into(),
            replication: 2,
            updated_at_ms: 7,
        }
    }

    #[test]
    fn roundtrip_and_checks() {
        let r = rec();
        let key = namespace_key("c", "weights");
        assert_eq!(key, "/kvfabric/c/namespaces/weights");
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.contains("\"replication\":2"), "{text}");
        assert_eq!(NamespaceRecord::decode(&key, &r.encode()).unwrap(), r);
        // Key and record disagree.
        assert!(NamespaceRecord::decode("/kvfabric/c/namespaces/other", &r.encode()).is_err());
        assert!(NamespaceRecord::decode(&key, b"[]").is_err());
        for bad in [0, MAX_REPLICATION + 1] {
            let mut b = rec();
            b.replication = bad;
            let e = NamespaceRecord::decode(&key, &b.encode()).unwrap_err();
            assert!(e.to_string().contains("replication"), "{e}");
        }
        // Missing updated-at-ms is fine (older writers); unknown fields too.
        let v = serde_json::json!({"name": "weights", "owner": "default", "replication": 3, "x": 1});
        assert_eq!(
            NamespaceRecord::decode(&key, &serde_json::to_vec(&v).unwrap())
                .unwrap()
                .replication,
            3
        );
    }
}
