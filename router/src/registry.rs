//! Workers from the cluster registry (`cluster` in the settings): follows
//! the worker records under `/kvfabric/<cluster-id>/workers/` and keeps the
//! router's worker set in step. A new record adds a worker (health-checked
//! at once, its KV events followed if it publishes them); a record that
//! goes (the worker left, or its lease expired) removes it and drops its
//! index entries; a changed record (a worker restarted elsewhere) is a
//! removal then an addition. A record whose name a configured worker
//! already uses is ignored, with one warning.
//!
//! If etcd cannot be reached at start, the follower retries with backoff
//! (configured workers are served meanwhile); once watching, the prefix
//! watcher rides out etcd outages keeping the last known set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kvfabric::cluster::{WorkerRecord, watch_workers};

use crate::workers::{HttpClient, WorkerSpec, Workers};

/// Starts a worker's engine-event subscription.
pub(crate) type SpawnEvents = Arc<dyn Fn(&crate::workers::Worker, String) -> tokio::task::JoinHandle<()> + Send + Sync>;

/// What the follower works with.
pub(crate) struct Registry {
    pub(crate) endpoints: kvfabric::cluster::EtcdTarget,
    pub(crate) cluster_id: String,
    pub(crate) workers: Arc<Workers>,
    /// Approximate mode for registered workers without `kv-events`.
    pub(crate) approximate: bool,
    pub(crate) spawn_events: SpawnEvents,
    pub(crate) client: HttpClient,
    pub(crate) health_timeout: Duration,
}

/// Follows the registry until the task is aborted (see the module doc).
pub(crate) async fn follow(r: Registry) {
    let mut backoff = crate::ingest::Backoff::new();
    let watch = loop {
        match watch_workers(r.endpoints.clone(), &r.cluster_id).await {
            Ok(w) => break w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's worker registry yet; retrying");
                backoff.wait().await;
            }
        }
    };
    tracing::info!(cluster = %r.cluster_id, "following the cluster's worker registry");
    let mut rx = watch.subscribe();
    let mut known: HashMap<String, WorkerRecord> = HashMap::new();
    let mut refused: HashSet<String> = HashSet::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        // Gone or changed: remove.
        let stale: Vec<String> = known
            .iter()
            .filter(|(name, rec)| snap.get(*name) != Some(*rec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            known.remove(&name);
            if r.workers.remove(&name).is_some() {
                tracing::info!(worker = %name, "registered worker left the cluster registry");
            }
        }
        refused.retain(|name| snap.contains_key(name));
        // New: add.
        for (name, rec) in snap.iter() {
            if known.contains_key(name) || refused.contains(name) {
                continue;
            }
            if let Err(e) = crate::config::check_worker_url(&rec.url) {
                tracing::warn!(worker = %name, "ignoring the registered worker: its url {e}");
                refused.insert(name.clone());
                continue;
            }
            let spec = WorkerSpec {
                name: name.clone(),
                url: rec.url.clone(),
                fabric_node: rec.fabric_node.clone(),
                approximate: r.approximate && rec.kv_events.is_none(),
            };
            let Some(w) = r.workers.add(spec, true) else {
                tracing::warn!(worker = %name, "ignoring the registered worker: a worker of that name exists");
                refused.insert(name.clone());
                continue;
            };
            tracing::info!(worker = %name, url = %rec.url, "registered worker joined");
            if let Some(ep) = &rec.kv_events {
                *w.events.lock() = Some((r.spawn_events)(&w, ep.clone()));
            }
            {
                let (workers, client, timeout) = (r.workers.clone(), r.client.clone(), r.health_timeout);
                tokio::spawn(async move { workers.check_one(&client, &w, timeout).await });
            }
            known.insert(name.clone(), rec.clone());
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
