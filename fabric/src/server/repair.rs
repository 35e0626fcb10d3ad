//! Repair in cluster mode: a background task on every node that keeps each
//! object it holds where placement says it belongs, with as many copies as
//! its namespace's replication asks for.
//!
//! A pass walks the node's own objects (a snapshot of the stack's index),
//! computes each one's owners over the serving members (as the forwarder
//! and the cluster-aware client do), and asks the other owners which of
//! those objects they hold (`Locate`, batched per node). Then, per object:
//!
//! - **this node is an owner**: if it is the first owner (in placement
//!   order) holding a copy, it copies the object to every owner lacking one.
//!   Exactly one node acts per object, so survivors do not race each other
//!   after a loss.
//! - **this node is not an owner** (a node joined, this node is draining,
//!   or it came back after its objects were re-replicated elsewhere): it
//!   copies the object to the owners lacking it and, once every owner holds
//!   a copy, deletes its own (hand-off). Nothing is deleted before the
//!   owners confirmed their copies.
//!
//! A copy counts only where it is as durable as the local one: an object
//! held on disk (or in the object store) is copied with `disk` durability
//! (falling back to `memory` on an owner without a disk tier) and needs a
//! persistent copy on the owner. Copies travel as ordinary forwarded `Put`s
//! in batches; the bytes moved are paced to `cluster.repair-bytes-per-s`,
//! so foreground traffic keeps its latency. Local reads for copying do not
//! promote (a repair scan must not flush the hot set).
//!
//! Passes run after every membership change (once it settles), every
//! `cluster.repair-interval-ms`, and at once when a drain starts. An owner
//! that does not answer makes its objects wait for the next pass (counted
//! as under-replicated), never deleted.

use super::forward::Forwarder;
use super::{Metrics, Namespaces};
use crate::client::PutObject;
use crate::proto::ErrorKind;
use crate::proto::v1::Durability;
use crate::proto::v1::Tier;
use bytes::Bytes;
use kvfabric_tiers::{ObjectKey, TierKind, TierStack};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// Objects looked up per `Locate` batch.
const BATCH: usize = 256;
/// Payload bytes gathered before a batch of copies is sent.
const FLUSH_BYTES: u64 = 32 << 20;
/// Quiet time after a membership change before a pass starts (changes
/// arrive in bursts: a node's record and its state).
const SETTLE: Duration = Duration::from_millis(300);

/// What a pass needs.
pub(crate) struct Repairer {
    pub(crate) stack: Arc<TierStack>,
    pub(crate) namespaces: Arc<Namespaces>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) metrics: Metrics,
    pub(crate) node_id: String,
    /// Time between passes without a membership change.
    pub(crate) interval: Duration,
    /// Copy rate limit in bytes per second (0 = unlimited).
    pub(crate) bytes_per_s: u64,
    /// Objects found under-replicated and not fixed by the last pass;
    /// shared with the member record.
    pub(crate) under_replicated: Arc<AtomicU64>,
    /// Starts a pass now (a drain began).
    pub(crate) kick: Arc<Notify>,
}

/// What one pass saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PassReport {
    /// Local objects examined.
    pub(crate) scanned: u64,
    /// Copies written to owners.
    pub(crate) copied: u64,
    /// Payload bytes copied.
    pub(crate) bytes: u64,
    /// Local copies deleted after their owners confirmed theirs.
    pub(crate) handed_off: u64,
    /// Objects with fewer copies than wanted that the pass could not fix
    /// (an owner did not answer, a copy failed).
    pub(crate) under_replicated: u64,
}

/// A copy to make: local object `key` onto node `to`.
struct Pending {
    index: usize,
    to: String,
    durable: bool,
}

impl Repairer {
    /// Runs passes until `stop` turns true.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut members = self.forwarder.serving_nodes();
        members.mark_changed();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = members.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Let a burst of changes settle.
                    tokio::time::sleep(SETTLE).await;
                    members.mark_unchanged();
                }
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.kick.notified() => {}
            }
            if *stop.borrow() {
                return;
            }
            let start = Instant::now();
            let r = self.pass().await;
            let m = &self.metrics;
            m.repair_passes.inc();
            m.repair_objects.with_label_values(&["copied"]).inc_by(r.copied);
            m.repair_objects.with_label_values(&["handed_off"]).inc_by(r.handed_off);
            m.repair_bytes.inc_by(r.bytes);
            m.under_replicated.set(r.under_replicated as i64);
            self.under_replicated.store(r.under_replicated, Ordering::Relaxed);
            if r.copied + r.handed_off + r.under_replicated > 0 {
                tracing::info!(
                    scanned = r.scanned,
                    copied = r.copied,
                    bytes = r.bytes,
                    handed_off = r.handed_off,
                    under_replicated = r.under_replicated,
                    ms = start.elapsed().as_millis() as u64,
                    "repair pass"
                );
            }
        }
    }

    /// One pass over every local object.
    pub(crate) async fn pass(&self) -> PassReport {
        let mut report = PassReport::default();
        if self.forwarder.serving_nodes().borrow().is_empty() {
            return report;
        }
        // Local objects by namespace, each with the tiers holding it here.
        let mut by_ns: BTreeMap<Arc<str>, BTreeMap<Bytes, Vec<TierKind>>> = BTreeMap::new();
        for (k, tier) in self.stack.snapshot(|_| true) {
            by_ns
                .entry(k.namespace_arc().clone())
                .or_default()
                .entry(k.key().clone())
                .or_default()
                .push(tier);
        }
        for (ns, objects) in by_ns {
            let Some(tenant) = self.namespaces.owner(&ns) else {
                continue;
            };
            let objects: Vec<(Bytes, Vec<TierKind>)> = objects.into_iter().collect();
            for batch in objects.chunks(BATCH) {
                self.repair_batch(&ns, &tenant, batch, &mut report).await;
            }
        }
        report
    }

    async fn repair_batch(
        &self,
        ns: &Arc<str>,
        tenant: &str,
        batch: &[(Bytes, Vec<TierKind>)],
        report: &mut PassReport,
    ) {
        let me = self.node_id.as_str();
        let client = self.forwarder.client(tenant);
        report.scanned += batch.len() as u64;
        let mut owners = Vec::with_capacity(batch.len());
        for (k, _) in batch {
            match client.owners(ns, k) {
                Ok(o) => owners.push(o),
                // No usable membership: nothing to do this pass.
                Err(_) => return,
            }
        }
        // Ask every other owner which of these it holds.
        let mut per_peer: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, os) in owners.iter().enumerate() {
            for o in os.iter().filter(|o| *o != me) {
                per_peer.entry(o.as_str()).or_default().push(i);
            }
        }
        let asks = per_peer.iter().map(|(peer, idx)| {
            let client = client.clone();
            let keys: Vec<Bytes> = idx.iter().map(|&i| batch[i].0.clone()).collect();
            async move {
                let r = async {
                    let c = client.node_client(peer).await?;
                    c.locate(ns, keys).await
                }
                .await;
                (*peer, r)
            }
        });
        let mut held: HashMap<(&str, usize), Vec<Tier>> = HashMap::new();
        let mut silent: HashSet<&str> = HashSet::new();
        for (peer, r) in futures::future::join_all(asks).await {
            match r {
                Ok(locs) => {
                    for (&i, tiers) in per_peer[peer].iter().zip(locs) {
                        if !tiers.is_empty() {
                            held.insert((peer, i), tiers);
                        }
                    }
                }
                // A node that does not know the namespace holds none of it.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::debug!(peer, error = %e, "repair: owner did not answer Locate");
                    silent.insert(peer);
                }
            }
        }
        let replication = self.namespaces.replication(ns) as usize;
        let mut pending: Vec<Pending> = Vec::new();
        let mut handoff: Vec<usize> = Vec::new();
        for (i, ((_, local), os)) in batch.iter().zip(&owners).enumerate() {
            if os.iter().any(|o| silent.contains(o.as_str())) {
                if replication > 1 {
                    report.under_replicated += 1;
                }
                continue;
            }
            let durable = local.iter().any(|t| t.is_persistent());
            let holds = |o: &str| {
                o == me
                    || held
                        .get(&(o, i))
                        .is_some_and(|ts| !durable || ts.iter().any(|t| matches!(t, Tier::Disk | Tier::Object)))
            };
            let missing: Vec<&String> = os.iter().filter(|o| !holds(o)).collect();
            let owner = os.iter().any(|o| o == me);
            if owner {
                // Only the first owner holding a copy acts.
                if missing.is_empty() || os.iter().find(|o| holds(o)).map(String::as_str) != Some(me) {
                    continue;
                }
            } else if missing.is_empty() {
                handoff.push(i);
                continue;
            } else {
                handoff.push(i);
            }
            for to in missing {
                pending.push(Pending {
                    index: i,
                    to: to.clone(),
                    durable,
                });
            }
        }
        // Copy, in batches per (owner, durability) bounded in bytes.
        let mut failed: HashSet<usize> = HashSet::new();
        let mut groups: BTreeMap<(String, bool), Vec<usize>> = BTreeMap::new();
        for p in &pending {
            groups.entry((p.to.clone(), p.durable)).or_default().push(p.index);
        }
        for ((to, durable), idx) in groups {
            let mut objects: Vec<(usize, PutObject)> = Vec::new();
            let mut bytes = 0u64;
            for (n, &i) in idx.iter().enumerate() {
                let key = ObjectKey::new(ns.clone(), batch[i].0.clone());
                match self.stack.read_for_copy(&key).await {
                    Ok(Some(block)) => {
                        bytes += block.header.length;
                        objects.push((
                            i,
                            PutObject {
                                key: key.key().clone(),
                                value: block.payload,
                                layout: Some(super::service::layout_to_proto(&block.header.layout)),
                            },
                        ));
                    }
                    // Deleted since the snapshot: nothing to copy.
                    Ok(None) => {
                        failed.insert(i);
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "repair: reading the local copy failed");
                        failed.insert(i);
                    }
                }
                if bytes >= FLUSH_BYTES || n + 1 == idx.len() {
                    let batch_objects = std::mem::take(&mut objects);
                    let sent = std::mem::take(&mut bytes);
                    self.copy(&client, ns, &to, durable, batch_objects, sent, &mut failed, report)
                        .await;
                }
            }
        }
        for (i, _) in batch.iter().enumerate() {
            if failed.contains(&i) && replication > 1 && owners[i].iter().any(|o| o == me) {
                report.under_replicated += 1;
            }
        }
        // Hand off: every owner now holds a copy.
        for i in handoff {
            if failed.contains(&i) {
                continue;
            }
            let key = ObjectKey::new(ns.clone(), batch[i].0.clone());
            match self.stack.delete(&key).await {
                Ok(true) => report.handed_off += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%key, error = %e, "repair: deleting a handed-off copy failed"),
            }
        }
    }

    /// Puts `objects` on node `to`; marks the ones that failed.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        client: &crate::client::ClusterClient,
        ns: &str,
        to: &str,
        durable: bool,
        objects: Vec<(usize, PutObject)>,
        bytes: u64,
        failed: &mut HashSet<usize>,
        report: &mut PassReport,
    ) {
        if objects.is_empty() {
            return;
        }
        let (idx, objects): (Vec<usize>, Vec<PutObject>) = objects.into_iter().unzip();
        let r = async {
            let c = client.node_client(to).await?;
            let want = if durable { Durability::Disk } else { Durability::Memory };
            match c.put_many(ns, objects.clone(), want).await {
                // An owner without a disk tier gets a memory copy.
                Err(e) if durable && e.kind() == ErrorKind::FailedPrecondition => {
                    c.put_many(ns, objects, Durability::Memory).await
                }
                r => r,
            }
        }
        .await;
        match r {
            Ok(_) => {
                report.copied += idx.len() as u64;
                report.bytes += bytes;
            }
            Err(e) => {
                tracing::warn!(to, namespace = ns, objects = idx.len(), error = %e, "repair: copying failed");
                failed.extend(idx);
                return;
            }
        }
        if self.bytes_per_s > 0 {
            tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64)).await;
        }
    }
}
