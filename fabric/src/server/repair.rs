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
//! Before that, a copy is dropped as **stale** when an owner reports a
//! tombstone (it deleted the key, at any replication) younger than
//! the copy, or holds a different version younger than it: what a replica
//! that was away finds when it comes back. Ages, not timestamps, are
//! compared (each measured on its own node's clock), and a copy keeps its
//! age when repair moves it (`age_ms` on the forwarded put).
//!
//! A copy counts only where it is as durable as the local one (and the
//! same version): an object
//! held on disk (or in the object store) is copied with `disk` durability
//! (falling back to `memory` on an owner without a disk tier) and needs a
//! persistent copy on the owner. Copies travel as ordinary forwarded `Put`s
//! in batches; the bytes moved are paced to `cluster.repair-bytes-per-s`,
//! so foreground traffic keeps its latency. Local reads for copying do not
//! promote (a repair scan must not flush the hot set).
//!
//! A node that comes back with data first **reconciles** (while still
//! `joining`, so no request reaches it): it drops its stale copies (of
//! every namespace), judged against the placement it is about to serve
//! under, and only then turns `serving`.
//!
//! A pass that ran whole under one serving set and left every object this
//! node holds at all of its owners (nothing `unsettled`) records that
//! set's placement epoch as **settled** in the member record; once every
//! serving and draining member reports the current epoch, the hand-off
//! after a membership change is done and readers stop asking earlier
//! owners (`Membership::settled_epoch`). A change resets it to 0 at once.
//!
//! Passes run after every membership change (once it settles), every
//! `cluster.repair-interval-ms`, and at once when a drain starts. An owner
//! that does not answer makes its objects wait for the next pass (counted
//! as under-replicated), never deleted.

use super::forward::Forwarder;
use super::{Metrics, Namespaces};
use crate::client::{ClientError, ClusterClient, KeyLocation, PutObject, placement_epoch};
use crate::cluster::RepairStatus;
use crate::proto::ErrorKind;
use crate::proto::v1::Durability;
use crate::proto::v1::Tier;
use bytes::Bytes;
use kvfabric_tiers::{ObjectKey, TierStack};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// Objects looked up per `Locate` batch, and most keys in one batch of
/// copies: a node in cluster mode must accept this many keys per request
/// (`limits.max-batch-keys`, checked at load).
pub(crate) const BATCH_KEYS: usize = 256;
/// Payload bytes gathered before a batch of copies is sent.
const FLUSH_BYTES: u64 = 32 << 20;
/// How much older than a tombstone (or than another owner's different
/// version) a local copy must be before it counts as stale: a put racing a
/// delete (or another put) within this window is left alone.
const GRACE_MS: u64 = 1000;
/// Longest wait for one `Locate` (and the base of a copy's limit).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// What the last pass found (under-replicated objects, the epoch it
    /// settled); shared with the member record.
    pub(crate) status: Arc<RepairStatus>,
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
    /// Local copies dropped as stale: an owner deleted the object after
    /// this copy was stored (tombstone), or holds a newer version.
    pub(crate) stale: u64,
    /// Local objects that an owner may still lack after the pass (an
    /// owner did not answer, a copy failed, no usable membership), at any
    /// replication: while there are any, this node's part of a hand-off
    /// is not done.
    pub(crate) unsettled: u64,
}

/// Where [`Repairer::copy`] marks the objects it could not place: copies
/// that failed (retried next pass), and copies an owner refused because it
/// holds a newer version or deleted the key after this version (stale).
struct Marks<'a> {
    failed: &'a mut HashSet<usize>,
    refused: &'a mut HashSet<usize>,
}

/// A copy to make: local object `key` onto node `to`.
struct Pending {
    index: usize,
    to: String,
    durable: bool,
}

/// Runs a call to node `node` under `limit`.
async fn bounded<T>(
    limit: Duration,
    node: &str,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(ClientError::Status {
            kind: ErrorKind::Unavailable,
            code: tonic::Code::DeadlineExceeded,
            message: format!("node {node} did not answer within {limit:?}"),
        })
    })
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
                    // The last pass judged another placement.
                    self.status.set_settled(0);
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
            let epoch = self.epoch();
            let r = self.pass().await;
            let m = &self.metrics;
            m.repair_passes.inc();
            m.repair_objects.with_label_values(&["copied"]).inc_by(r.copied);
            m.repair_objects.with_label_values(&["handed_off"]).inc_by(r.handed_off);
            m.repair_objects.with_label_values(&["dropped_stale"]).inc_by(r.stale);
            m.repair_bytes.inc_by(r.bytes);
            m.under_replicated.set(r.under_replicated as i64);
            self.status
                .under_replicated
                .store(r.under_replicated, Ordering::Relaxed);
            // Settled: every object this node holds is at all of its owners
            // under the placement the whole pass ran against.
            let settled = if r.unsettled == 0 && epoch != 0 && self.epoch() == epoch {
                epoch
            } else {
                0
            };
            self.status.set_settled(settled);
            if r.copied + r.handed_off + r.under_replicated + r.stale > 0 {
                tracing::info!(
                    scanned = r.scanned,
                    copied = r.copied,
                    bytes = r.bytes,
                    handed_off = r.handed_off,
                    stale = r.stale,
                    under_replicated = r.under_replicated,
                    ms = start.elapsed().as_millis() as u64,
                    "repair pass"
                );
            }
        }
    }

    /// The placement epoch of the serving members (0 when there are none).
    fn epoch(&self) -> u64 {
        let nodes = self.forwarder.serving_nodes().borrow().clone();
        if nodes.is_empty() { 0 } else { placement_epoch(&nodes) }
    }

    /// One pass over every local object.
    pub(crate) async fn pass(&self) -> PassReport {
        if self.forwarder.serving_nodes().borrow().is_empty() {
            return PassReport::default();
        }
        self.walk(None, |_| true).await
    }

    /// Before a node that came back with data turns serving: drops the
    /// copies (of any namespace) that were deleted or replaced while it
    /// was away, judged against the placement it is about to serve under
    /// (the serving members plus itself), so it never serves them. Copies
    /// nothing and hands nothing off (the regular passes do, once it
    /// serves).
    pub(crate) async fn reconcile(&self) -> PassReport {
        let members = self.forwarder.serving_and_me();
        if members.len() < 2 || !members.iter().any(|m| m.id == self.node_id) {
            return PassReport::default();
        }
        let placement = ClusterClient::fixed(members, self.forwarder.client_options());
        // Every namespace: at replication 1 too, a copy this node holds
        // for another owner may have been deleted there while it was away.
        let r = self.walk(Some(&placement), |_| true).await;
        if r.stale > 0 {
            tracing::info!(stale = r.stale, scanned = r.scanned, "reconciled before serving");
        }
        r
    }

    /// Walks the local objects of the namespaces `wanted` accepts, batch by
    /// batch; with `placement`, only drops stale copies (see `reconcile`).
    async fn walk(&self, placement: Option<&ClusterClient>, wanted: impl Fn(&str) -> bool) -> PassReport {
        let mut report = PassReport::default();
        // Local keys by namespace.
        let mut by_ns: BTreeMap<Arc<str>, BTreeSet<Bytes>> = BTreeMap::new();
        for (k, _) in self.stack.snapshot(&wanted) {
            by_ns
                .entry(k.namespace_arc().clone())
                .or_default()
                .insert(k.key().clone());
        }
        for (ns, keys) in by_ns {
            // A namespace being handed to another tenant: what is here is
            // about to be dropped, not copied.
            let Some(tenant) = self
                .namespaces
                .owner(&ns)
                .filter(|_| !self.namespaces.is_reassigning(&ns))
            else {
                continue;
            };
            let client = match placement {
                Some(p) => {
                    let c = p.forwarding_for(&tenant);
                    if c.set_replication(&ns, self.namespaces.replication(&ns) as usize)
                        .is_err()
                    {
                        continue;
                    }
                    c
                }
                None => self.forwarder.client(&tenant),
            };
            let keys: Vec<Bytes> = keys.into_iter().collect();
            for batch in keys.chunks(BATCH_KEYS) {
                self.repair_batch(&ns, &client, batch, placement.is_some(), &mut report)
                    .await;
            }
        }
        report
    }

    async fn repair_batch(
        &self,
        ns: &Arc<str>,
        client: &ClusterClient,
        batch: &[Bytes],
        stale_only: bool,
        report: &mut PassReport,
    ) {
        let me = self.node_id.as_str();
        report.scanned += batch.len() as u64;
        let object_keys: Vec<ObjectKey> = batch.iter().map(|k| ObjectKey::new(ns.clone(), k.clone())).collect();
        let mut owners = Vec::with_capacity(batch.len());
        for k in batch {
            match client.owners(ns, k) {
                Ok(o) => owners.push(o),
                // No usable membership: nothing to do this pass.
                Err(_) => {
                    report.unsettled += batch.len() as u64;
                    return;
                }
            }
        }
        // Ask every other owner what it holds of these (or deleted).
        let mut per_peer: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, os) in owners.iter().enumerate() {
            for o in os.iter().filter(|o| *o != me) {
                per_peer.entry(o.as_str()).or_default().push(i);
            }
        }
        let asks = per_peer.iter().map(|(peer, idx)| {
            let client = client.clone();
            let keys: Vec<Bytes> = idx.iter().map(|&i| batch[i].clone()).collect();
            async move {
                let r = bounded(CALL_TIMEOUT, peer, async {
                    let c = client.node_client(peer).await?;
                    c.locate(ns, keys).await
                })
                .await;
                (*peer, r)
            }
        });
        let mut seen: HashMap<(String, usize), KeyLocation> = HashMap::new();
        let mut silent: HashSet<&str> = HashSet::new();
        for (peer, r) in futures::future::join_all(asks).await {
            match r {
                Ok(locs) => {
                    for (&i, l) in per_peer[peer].iter().zip(locs) {
                        seen.insert((peer.to_string(), i), l);
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
        // What this node holds now (the snapshot may be stale).
        let local = self.stack.locate(&object_keys);
        let now = self.stack.clock().now_ms();
        let replication = self.namespaces.replication(ns) as usize;
        let mut pending: Vec<Pending> = Vec::new();
        let mut handoff: Vec<usize> = Vec::new();
        let mut stale: Vec<usize> = Vec::new();
        for (i, (mine, os)) in local.iter().zip(&owners).enumerate() {
            let Some(mine) = mine else { continue };
            if os.iter().any(|o| silent.contains(o.as_str())) {
                if replication > 1 {
                    report.under_replicated += 1;
                }
                report.unsettled += 1;
                continue;
            }
            let my_age = now.saturating_sub(mine.created_ms);
            let at = |o: &str| seen.get(&(o.to_string(), i));
            let other = |o: &str| at(o).filter(|l| !l.tiers.is_empty());
            // Deleted (by an owner's tombstone) after this copy was stored,
            // or replaced by a newer version: this copy is stale.
            let deleted = os.iter().filter(|o| *o != me).any(|o| {
                other(o).is_none()
                    && at(o)
                        .and_then(|l| l.tombstone_age_ms)
                        .is_some_and(|t| my_age > t.saturating_add(GRACE_MS))
            });
            let superseded = os.iter().filter(|o| *o != me).any(|o| {
                other(o).is_some_and(|l| l.checksum != mine.checksum && l.age_ms.saturating_add(GRACE_MS) < my_age)
            });
            if deleted || superseded {
                stale.push(i);
                continue;
            }
            let durable = mine.tiers.iter().any(|t| t.is_persistent());
            let holds = |o: &str| {
                o == me
                    || other(o).is_some_and(|l| {
                        l.checksum == mine.checksum
                            && (!durable || l.tiers().any(|t| matches!(t, Tier::Disk | Tier::Object)))
                    })
            };
            let missing: Vec<&String> = os.iter().filter(|o| !holds(o)).collect();
            let owner = os.iter().any(|o| o == me);
            if owner {
                // Only the first owner holding a copy acts.
                if missing.is_empty() || os.iter().find(|o| holds(o)).map(String::as_str) != Some(me) {
                    continue;
                }
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
        // Hand off only while this node sees itself serving (or draining):
        // a node whose own record is gone from its view (lease lost, etcd
        // unreachable) may be the one others count on for these copies.
        if stale_only {
            pending.clear();
            handoff.clear();
        } else if !handoff.is_empty() && !self.may_hand_off() {
            // Copies still go to the owners; nothing is deleted here.
            tracing::debug!(
                objects = handoff.len(),
                "repair: not serving in its own view; no hand-off this pass"
            );
            handoff.clear();
        }
        // Copy, in batches per (owner, durability) bounded in bytes.
        let mut failed: HashSet<usize> = HashSet::new();
        let mut refused: HashSet<usize> = HashSet::new();
        let mut groups: BTreeMap<(String, bool), Vec<usize>> = BTreeMap::new();
        for p in &pending {
            groups.entry((p.to.clone(), p.durable)).or_default().push(p.index);
        }
        for ((to, durable), idx) in groups {
            let mut objects: Vec<(usize, PutObject, Option<u64>)> = Vec::new();
            let mut bytes = 0u64;
            for (n, &i) in idx.iter().enumerate() {
                let key = &object_keys[i];
                match self.stack.read_for_copy(key).await {
                    Ok(Some(block)) => {
                        bytes += block.header.length;
                        let age = self.stack.clock().now_ms().saturating_sub(block.header.created_ms);
                        objects.push((
                            i,
                            PutObject {
                                key: key.key().clone(),
                                value: block.payload,
                                layout: Some(super::service::layout_to_proto(&block.header.layout)),
                            },
                            Some(age),
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
                    let marks = Marks {
                        failed: &mut failed,
                        refused: &mut refused,
                    };
                    self.copy(client, ns, &to, durable, batch_objects, sent, marks, report)
                        .await;
                }
            }
        }
        for (i, os) in owners.iter().enumerate() {
            if failed.contains(&i) {
                report.unsettled += 1;
                if replication > 1 && os.iter().any(|o| o == me) {
                    report.under_replicated += 1;
                }
            }
        }
        // An owner that refused a copy holds a newer version, or deleted
        // the key after this version was created: this copy is stale too.
        // (Objects found stale earlier were never copied.)
        handoff.retain(|i| !refused.contains(i));
        stale.extend(refused.iter().copied());
        // Hand off (every owner now holds this version) and drop stale
        // copies; a newer version stored here meanwhile stays.
        for (i, stale) in handoff
            .into_iter()
            .map(|i| (i, false))
            .chain(stale.into_iter().map(|i| (i, true)))
        {
            if failed.contains(&i) {
                continue;
            }
            let Some(mine) = &local[i] else { continue };
            let key = &object_keys[i];
            match self.stack.delete_version(key, mine.checksum).await {
                Ok(true) if stale => {
                    tracing::info!(%key, "repair: dropped a stale copy (an owner deleted it or holds a newer version)");
                    report.stale += 1;
                }
                Ok(true) => report.handed_off += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%key, error = %e, "repair: deleting a copy failed"),
            }
        }
    }

    /// Whether this node may delete copies it no longer owns: it is
    /// draining, or it is serving in its own view of the membership.
    fn may_hand_off(&self) -> bool {
        *self.forwarder.ctl.state.borrow() == crate::cluster::MemberState::Draining
            || self
                .forwarder
                .serving_nodes()
                .borrow()
                .iter()
                .any(|n| n.id == self.node_id)
    }

    /// Puts `objects` on node `to`; marks the ones that failed and the ones
    /// it refused (it holds a newer version or deleted them later).
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        client: &ClusterClient,
        ns: &str,
        to: &str,
        durable: bool,
        objects: Vec<(usize, PutObject, Option<u64>)>,
        bytes: u64,
        marks: Marks<'_>,
        report: &mut PassReport,
    ) {
        if objects.is_empty() {
            return;
        }
        let mut idx = Vec::with_capacity(objects.len());
        let mut ages = Vec::with_capacity(objects.len());
        let objects: Vec<PutObject> = objects
            .into_iter()
            .map(|(i, o, age)| {
                idx.push(i);
                ages.push(age);
                o
            })
            .collect();
        // Time for the bytes at 1 MB/s on top of the base: a stuck stream
        // must not stall repair, a slow link must not fail it.
        let limit = CALL_TIMEOUT + Duration::from_micros(bytes);
        let r = bounded(limit, to, async {
            let c = client.node_client(to).await?;
            let want = if durable { Durability::Disk } else { Durability::Memory };
            match c.put_many_aged(ns, objects.clone(), ages.clone(), want).await {
                // An owner without a disk tier gets a memory copy.
                Err(e) if durable && e.kind() == ErrorKind::FailedPrecondition => {
                    c.put_many_aged(ns, objects, ages, Durability::Memory).await
                }
                r => r,
            }
        })
        .await;
        match r {
            Ok(tiers) => {
                for (i, t) in idx.into_iter().zip(tiers) {
                    if t == Tier::Unspecified {
                        marks.refused.insert(i);
                    } else {
                        report.copied += 1;
                    }
                }
                report.bytes += bytes;
            }
            Err(e) => {
                tracing::warn!(to, namespace = ns, objects = idx.len(), error = %e, "repair: copying failed");
                marks.failed.extend(idx);
                return;
            }
        }
        if self.bytes_per_s > 0 {
            tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64)).await;
        }
    }
}
