//! Engine workers in the cluster registry: a worker (an inference engine
//! the router forwards to) publishes a [`WorkerRecord`] under
//! `/kvfabric/<cluster-id>/workers/<name>`, attached to a lease it keeps
//! alive ([`WorkerLease`]), so the record disappears when the worker leaves
//! (lease revoked) or dies (lease expired). Routers watch the prefix
//! ([`watch_workers`]) and take workers in and out of their candidate set.
//!
//! The lease task re-registers on its own after etcd was unreachable or the
//! lease was lost (a new lease, the record put again), with capped
//! exponential backoff; a name already registered by a live worker at
//! another URL is refused at start.

use super::watch::{PrefixWatch, Record, RecordMap, decode_named};
use super::{ClusterError, EtcdTarget, KEY_ROOT, validate_id};
use super::{bounded, connect};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::task::JoinHandle;

/// `/kvfabric/<cluster-id>/workers/`: prefix of every worker record.
pub fn workers_prefix(cluster_id: &str) -> String {
    format!("{KEY_ROOT}/{cluster_id}/workers/")
}

/// `/kvfabric/<cluster-id>/workers/<name>`.
pub fn worker_key(cluster_id: &str, name: &str) -> String {
    format!("{}{name}", workers_prefix(cluster_id))
}

/// One engine worker, as routers need it.
/// Unknown fields are ignored, as in member records, so a newer worker's
/// record still reads on an older router.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique in the cluster; the key's last segment (`A-Z a-z 0-9 . _ -`,
    /// 1 to 64 characters).
    pub name: String,
    /// Base URL of its OpenAI-compatible API (`http://` or `https://`).
    pub url: String,
    /// Its KV event publisher (vLLM's ZMQ PUB, `tcp://HOST:PORT`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<String>,
    /// The fabric node on its host (a node id or a router's fabric name),
    /// if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_node: Option<String>,
}

impl WorkerRecord {
    /// Checks every field; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        validate_id("worker name", &self.name)?;
        // What routers forward to: plain HTTP, host and port, no path (a
        // record they cannot use would be registered and then ignored).
        if self.url.len() > 2048 {
            return Err("worker url is longer than 2048 bytes".into());
        }
        crate::validate::http_base_url("worker url", &self.url)?;
        if let Some(ep) = &self.kv_events {
            if ep.len() > 2048 {
                return Err("worker kv-events is longer than 2048 bytes".into());
            }
            crate::validate::tcp_endpoint("worker kv-events", ep)?;
        }
        if let Some(n) = &self.fabric_node
            && (n.is_empty() || n.len() > 255)
        {
            return Err(format!("worker fabric-node {n:?} must be 1 to 255 bytes"));
        }
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a worker record serialises")
    }
}

impl Record for WorkerRecord {
    const WHAT: &'static str = "worker";

    fn decode(key: &str, value: &[u8]) -> Result<Self, ClusterError> {
        decode_named(key, value, "workers", WorkerRecord::validate)
    }

    fn id(&self) -> &str {
        &self.name
    }
}

/// Watches a cluster's worker records (see [`PrefixWatch`]).
pub async fn watch_workers(etcd: EtcdTarget, cluster_id: &str) -> Result<PrefixWatch<WorkerRecord>, ClusterError> {
    PrefixWatch::start(etcd, workers_prefix(cluster_id)).await
}

/// Workers registered in the cluster now (one read).
pub async fn list_workers(etcd: &EtcdTarget, cluster_id: &str) -> Result<RecordMap<WorkerRecord>, ClusterError> {
    super::watch::list_once(etcd, &workers_prefix(cluster_id)).await
}

/// A worker's registration: its record, kept alive under a lease by a
/// background task until [`WorkerLease::leave`] (or drop, which stops
/// renewing, so the record goes when the lease expires).
pub struct WorkerLease {
    task: Option<JoinHandle<()>>,
    client: Client,
    etcd: EtcdTarget,
    lease: tokio::sync::watch::Receiver<i64>,
}

impl std::fmt::Debug for WorkerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerLease")
            .field("lease", &*self.lease.borrow())
            .finish()
    }
}

impl WorkerLease {
    /// The lease the record is under now (it changes when the task has to
    /// register again).
    pub fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Registers `record` in `cluster_id` under a lease of `ttl_s` seconds
    /// (2..=3600). Fails if etcd cannot be reached or another live worker
    /// registered the same name at another URL.
    pub async fn register(
        etcd: EtcdTarget,
        cluster_id: &str,
        record: WorkerRecord,
        ttl_s: u64,
    ) -> Result<WorkerLease, ClusterError> {
        validate_id("cluster id", cluster_id).map_err(ClusterError::InvalidSettings)?;
        record.validate().map_err(ClusterError::InvalidSettings)?;
        if !(2..=3600).contains(&ttl_s) {
            return Err(ClusterError::InvalidSettings(format!(
                "worker lease ttl must be 2..=3600 s, got {ttl_s}"
            )));
        }
        let client = connect(&etcd).await?;
        let key = worker_key(cluster_id, &record.name);
        let first = put(&client, &etcd, &key, &record, ttl_s).await?;
        let (tx, rx) = tokio::sync::watch::channel(first);
        let task = {
            let (client, etcd) = (client.clone(), etcd.clone());
            tokio::spawn(async move {
                let mut lease = first;
                let mut backoff = Duration::from_millis(100);
                loop {
                    let e = keep(&client, &etcd, lease, ttl_s).await;
                    tracing::warn!(error = %e, worker = %record.name, "worker registration lost; registering again");
                    loop {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        match put(&client, &etcd, &key, &record, ttl_s).await {
                            Ok(l) => {
                                lease = l;
                                tx.send_replace(l);
                                backoff = Duration::from_millis(100);
                                tracing::info!(worker = %record.name, "worker registered again");
                                break;
                            }
                            Err(e) => tracing::debug!(error = %e, "registering the worker again"),
                        }
                    }
                }
            })
        };
        Ok(WorkerLease {
            task: Some(task),
            client,
            etcd,
            lease: rx,
        })
    }

    /// Stops renewing and revokes the lease: the record is gone at once.
    pub async fn leave(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let lease = *self.lease.borrow();
        let mut c = self.client.clone();
        if let Err(e) = bounded(&self.etcd, c.lease_revoke(lease)).await {
            tracing::warn!(error = %e, "revoking the worker's lease; its record goes when the lease expires");
        }
    }
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Grants a lease and puts `record` under it, unless a record of a worker
/// at another URL holds the name. Returns the lease.
async fn put(
    client: &Client,
    etcd: &EtcdTarget,
    key: &str,
    record: &WorkerRecord,
    ttl_s: u64,
) -> Result<i64, ClusterError> {
    let mut c = client.clone();
    let lease = bounded(etcd, c.lease_grant(ttl_s as i64, None)).await?.id();
    let put = TxnOp::put(key, record.encode(), Some(PutOptions::new().with_lease(lease)));
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([put.clone()])
        .or_else([TxnOp::get(key, None)]);
    let result = async {
        let r = bounded(etcd, c.txn(txn)).await?;
        if r.succeeded() {
            return Ok(());
        }
        let existing = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        let Some((value, rev)) = existing else {
            return Err(ClusterError::LeaseLost(lease));
        };
        if let Ok(other) = WorkerRecord::decode(key, &value)
            && other.url != record.url
        {
            return Err(ClusterError::InvalidSettings(format!(
                "worker name {:?} is already registered by a live worker at {}",
                record.name, other.url
            )));
        }
        // Our own earlier record (same URL: a restart), or one nobody can
        // read: replace it if nothing changed since.
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([put]);
        if bounded(etcd, c.txn(txn)).await?.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::LeaseLost(lease))
        }
    }
    .await;
    match result {
        Ok(()) => Ok(lease),
        Err(e) => {
            let _ = bounded(etcd, c.lease_revoke(lease)).await;
            Err(e)
        }
    }
}

/// Renews `lease` every third of its TTL until that fails; returns why.
async fn keep(client: &Client, etcd: &EtcdTarget, lease: i64, ttl_s: u64) -> ClusterError {
    let mut c = client.clone();
    let (mut keeper, mut stream) = match bounded(etcd, c.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return e,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(ttl_s) / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = keeper.keep_alive().await {
            return ClusterError::from_etcd(etcd, e);
        }
        match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(_)) => return ClusterError::LeaseLost(lease),
            Ok(Err(e)) => return ClusterError::from_etcd(etcd, e),
            Err(_) => {
                return ClusterError::Unreachable {
                    endpoints: etcd.to_string(),
                    reason: "lease keep-alive unanswered".into(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> WorkerRecord {
        WorkerRecord {
            name: name.into(),
            url: "http://127.0.0.1:8001".into(),
            kv_events: Some("tcp://127.0.0.1:5557".into()),
            fabric_node: None,
        }
    }

    #[test]
    fn records_roundtrip_and_bad_ones_are_refused() {
        let r = rec("w1");
        let key = worker_key("c1", "w1");
        assert_eq!(WorkerRecord::decode(&key, &r.encode()).unwrap(), r);
        // The key names another worker.
        assert!(WorkerRecord::decode(&worker_key("c1", "w2"), &r.encode()).is_err());
        // Not JSON, bad fields; unknown fields are a newer writer's, read.
        assert!(WorkerRecord::decode(&key, b"{").is_err());
        assert!(WorkerRecord::decode(&key, br#"{"name":"w1","url":"http://a:1","x":1}"#).is_ok());
        for url in ["https://a:1", "http://a:1/v1", "http://a"] {
            let mut bad = rec("w1");
            bad.url = url.into();
            assert!(bad.validate().unwrap_err().contains("url"), "{url}");
        }
        let mut bad = rec("w1");
        bad.url = "ftp://x".into();
        assert!(bad.validate().unwrap_err().contains("url"));
        let mut bad = rec("w1");
        bad.kv_events = Some("ipc:///tmp/x".into());
        assert!(bad.validate().unwrap_err().contains("kv-events"));
        assert!(rec("a/b").validate().is_err());
    }
}
