//! A node's registration: joins the cluster (data-dir and etcd identity
//! checks, duplicate node ids refused), keeps its [`Member`] record alive
//! under a lease, refreshes the record's usage, and revokes the lease on a
//! graceful leave.
//!
//! A node restarted within its lease TTL (`kill -9`, an OOM kill, a fast
//! reboot) finds its previous process's record still there. At join it
//! waits for that record's lease to run out (at most the remaining TTL etcd
//! reports, plus [`EXPIRY_MARGIN`]) and then registers; only a record still
//! kept alive (its lease renewed, or still live past the wait) is another
//! live process with the same node id, and is refused.
//!
//! Registration never stands in the way of serving data: once joined, a
//! background task renews the lease; when etcd is unreachable it retries
//! with capped exponential backoff, and when etcd is back it resumes the
//! old lease if that and the record survived, or else (the lease expired or
//! was revoked, or etcd lost it) grants a new lease and registers again.
//! Every etcd call is bounded by a timeout, because the client's balanced
//! channel waits (rather than fails) while no endpoint is up.

use super::{
    ClusterError, ClusterRecord, EtcdTarget, Member, MemberState, REQUEST_TIMEOUT, TierUsage, bounded, connect,
};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use kvfabric_tiers::Clock;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Reports the node's tiers for its member record.
pub type UsageFn = Arc<dyn Fn() -> Vec<TierUsage> + Send + Sync>;

/// First and longest pause between attempts to reach etcd again (the
/// longest is also at most a quarter of the lease TTL, so a node retries
/// several times before a surviving lease would expire).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long past a previous process's lease's remaining TTL a joining node
/// waits for etcd to expire it (etcd revokes expired leases in batches,
/// every 500 ms, through a raft proposal).
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// How often a joining node looks again at a previous process's record.
const EXPIRY_POLL: Duration = Duration::from_millis(500);

/// What a node registers with.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The registry's etcd.
    pub etcd: EtcdTarget,
    /// Cluster id.
    pub cluster_id: String,
    /// Node id.
    pub node_id: String,
    /// gRPC endpoint advertised to others, `http://HOST:PORT` (`https://` with TLS on).
    pub endpoint: String,
    /// Metrics endpoint, `http://HOST:PORT/metrics`.
    pub metrics_endpoint: String,
    /// Lease TTL in seconds.
    pub lease_ttl_s: u64,
    /// How often the record's usage is rewritten.
    pub refresh_interval: Duration,
    /// The node's data directory (holds the `cluster-id` file).
    pub data_dir: PathBuf,
    /// What the node's repair last found (written into the record at
    /// each refresh).
    pub repair: Arc<RepairStatus>,
}

/// What a node's repair last found, published in its member record.
#[derive(Debug, Default)]
pub struct RepairStatus {
    /// Objects with fewer copies than wanted that the last pass could not
    /// fix ([`Member::under_replicated`]).
    pub under_replicated: AtomicU64,
    /// The placement epoch the last pass left settled, or 0
    /// ([`Member::settled`]).
    pub settled: AtomicU64,
    /// Notified when `settled` changes: the record is rewritten at once,
    /// not at the next refresh, so readers learn promptly both that a
    /// hand-off is done and that a change has reopened it.
    pub changed: tokio::sync::Notify,
}

impl RepairStatus {
    /// Sets `settled`, and has the record rewritten if it changed.
    pub fn set_settled(&self, epoch: u64) {
        if self.settled.swap(epoch, Ordering::Relaxed) != epoch {
            self.changed.notify_one();
        }
    }
}

/// A live registration; dropping it without [`Registration::leave`] stops
/// renewing the lease, so the record disappears after the TTL (as on a crash).
#[derive(Debug)]
pub struct Registration {
    state: Arc<watch::Sender<MemberState>>,
    lease: watch::Receiver<i64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Reads the data directory's cluster id, if it has one, and refuses a
/// directory that belongs to another cluster.
fn check_data_dir(dir: &Path, cluster_id: &str) -> Result<bool, ClusterError> {
    let path = dir.join(super::DATA_DIR_CLUSTER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim();
            if found != cluster_id {
                return Err(ClusterError::DataDirMismatch {
                    dir: dir.to_path_buf(),
                    dir_cluster: found.to_string(),
                    configured: cluster_id.to_string(),
                });
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ClusterError::Io { path, source }),
    }
}

/// Records the cluster id in the data directory (write, then rename).
fn remember_cluster(dir: &Path, cluster_id: &str) -> Result<(), ClusterError> {
    let path = dir.join(super::DATA_DIR_CLUSTER_FILE);
    let tmp = dir.join(format!("{}.tmp", super::DATA_DIR_CLUSTER_FILE));
    let io = |source| ClusterError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(&tmp, format!("{cluster_id}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// A per-process unique incarnation: pid, start time and a counter (two
/// in-process nodes may start in the same millisecond).
fn incarnation(started_at_ms: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{started_at_ms}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// State of the background task.
struct Worker {
    cfg: RegistrationConfig,
    usage: UsageFn,
    clock: Arc<dyn Clock>,
    client: Client,
    started_at_ms: u64,
    incarnation: String,
    state: watch::Receiver<MemberState>,
    lease_tx: watch::Sender<i64>,
}

/// The record of another process that holds this node's id, and its lease.
#[derive(Debug)]
struct Holder {
    member: Member,
    /// 0 when the record lives under no lease.
    lease: i64,
    /// The record's mod revision: a live holder rewrites it every
    /// `refresh-interval-ms`.
    rev: i64,
}

impl Registration {
    /// Joins the cluster as `joining`: checks the data directory's cluster
    /// id, creates or checks the cluster's identity record, grants a lease
    /// and registers the member (refusing a node id held by a live node;
    /// one held by a previous process whose lease is running out is waited
    /// for, see the module docs), then keeps the registration alive in the
    /// background. Fails when etcd cannot be reached: a node that never
    /// joined cannot check its identity.
    pub async fn join(
        cfg: RegistrationConfig,
        usage: UsageFn,
        clock: Arc<dyn Clock>,
    ) -> Result<Registration, ClusterError> {
        let known = check_data_dir(&cfg.data_dir, &cfg.cluster_id)?;
        let client = connect(&cfg.etcd).await?;
        let started_at_ms = clock.now_ms();
        let (state_tx, state_rx) = watch::channel(MemberState::Joining);
        let (lease_tx, lease_rx) = watch::channel(0);
        let mut w = Worker {
            incarnation: incarnation(started_at_ms),
            cfg,
            usage,
            clock,
            client,
            started_at_ms,
            state: state_rx,
            lease_tx,
        };
        let lease = match w.try_register().await? {
            Ok(lease) => lease,
            Err(holder) => w.outwait(holder).await?,
        };
        if !known {
            remember_cluster(&w.cfg.data_dir, &w.cfg.cluster_id)?;
        }
        tracing::info!(
            cluster = %w.cfg.cluster_id, node = %w.cfg.node_id, endpoint = %w.cfg.endpoint,
            lease = format_args!("{lease:x}"), "joined cluster"
        );
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(w.run(lease, stop_rx));
        Ok(Registration {
            state: Arc::new(state_tx),
            lease: lease_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Changes the advertised state; the record is rewritten at once (or as
    /// soon as etcd answers).
    pub fn set_state(&self, state: MemberState) {
        self.state.send_replace(state);
    }

    /// A handle that changes the advertised state (see [`Registration::set_state`]).
    pub fn state_handle(&self) -> Arc<watch::Sender<MemberState>> {
        self.state.clone()
    }

    /// The lease the record currently lives under (0 while re-registering).
    pub fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// A receiver of lease changes (a new lease after a re-registration).
    pub fn lease_changes(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }

    /// Leaves the cluster: stops renewing and revokes the lease, so the
    /// member disappears at once (bounded wait when etcd is unreachable).
    pub async fn leave(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Worker {
    fn record(&self) -> Member {
        Member {
            node_id: self.cfg.node_id.clone(),
            cluster_id: self.cfg.cluster_id.clone(),
            endpoint: self.cfg.endpoint.clone(),
            metrics_endpoint: self.cfg.metrics_endpoint.clone(),
            state: *self.state.borrow(),
            tiers: (self.usage)(),
            started_at_ms: self.started_at_ms,
            updated_at_ms: self.clock.now_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            incarnation: self.incarnation.clone(),
            under_replicated: self.cfg.repair.under_replicated.load(Ordering::Relaxed),
            settled: self.cfg.repair.settled.load(Ordering::Relaxed),
        }
    }

    async fn call<T>(&self, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, ClusterError> {
        bounded(&self.cfg.etcd, f).await
    }

    /// Creates the cluster's identity record if absent; checks it otherwise.
    async fn ensure_identity(&self) -> Result<(), ClusterError> {
        let key = super::cluster_key(&self.cfg.cluster_id);
        let rec = ClusterRecord {
            id: self.cfg.cluster_id.clone(),
            created_by: self.cfg.node_id.clone(),
            created_at_ms: self.clock.now_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), rec.encode(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let r = self.call(c.txn(txn)).await?;
        if r.succeeded() {
            tracing::info!(cluster = %self.cfg.cluster_id, "created the cluster's identity record");
            return Ok(());
        }
        for op in r.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                let found = ClusterRecord::decode(&key, kv.value())?;
                if found.id != self.cfg.cluster_id {
                    return Err(ClusterError::IdentityMismatch {
                        key,
                        found: found.id,
                        expected: self.cfg.cluster_id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Grants a lease and puts the member record under it, unless a live
    /// record of another process holds the node id. Returns the lease.
    async fn register(&mut self) -> Result<i64, ClusterError> {
        match self.try_register().await? {
            Ok(lease) => Ok(lease),
            Err(holder) => Err(self.taken(holder)),
        }
    }

    /// The error for a node id held by another process.
    fn taken(&self, holder: Holder) -> ClusterError {
        ClusterError::NodeIdTaken {
            node_id: self.cfg.node_id.clone(),
            cluster_id: self.cfg.cluster_id.clone(),
            endpoint: holder.member.endpoint,
            started_at_ms: holder.member.started_at_ms,
        }
    }

    /// Like [`Worker::register`], but a record of another process is handed
    /// back (the lease granted for this attempt revoked).
    async fn try_register(&mut self) -> Result<Result<i64, Holder>, ClusterError> {
        self.ensure_identity().await?;
        let mut c = self.client.clone();
        let lease = self.call(c.lease_grant(self.cfg.lease_ttl_s as i64, None)).await?.id();
        let key = super::member_key(&self.cfg.cluster_id, &self.cfg.node_id);
        let put = || {
            TxnOp::put(
                key.clone(),
                self.record().encode(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = match self.call(c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(lease).await;
                return Err(e);
            }
        };
        if !r.succeeded() {
            let existing = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision(), kv.lease())),
                _ => None,
            });
            let Some((value, rev, holder_lease)) = existing else {
                // Deleted between the compare and the get: try again later.
                self.revoke(lease).await;
                return Err(ClusterError::LeaseLost(lease));
            };
            match Member::decode(&key, &value) {
                Ok(m) if m.incarnation != self.incarnation => {
                    self.revoke(lease).await;
                    return Ok(Err(Holder {
                        member: m,
                        lease: holder_lease,
                        rev,
                    }));
                }
                // Our own earlier record (its lease may be about to go), or a
                // record nobody can read: replace it, if nothing changed since.
                Ok(_) | Err(_) => {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                        .and_then([put()]);
                    let replaced = match self.call(c.txn(txn)).await {
                        Ok(r) => r.succeeded(),
                        Err(e) => {
                            self.revoke(lease).await;
                            return Err(e);
                        }
                    };
                    if !replaced {
                        self.revoke(lease).await;
                        return Err(ClusterError::LeaseLost(lease));
                    }
                }
            }
        }
        self.lease_tx.send_replace(lease);
        Ok(Ok(lease))
    }

    /// At join, with the node id held by another process: waits for its
    /// lease to run out (at most its remaining TTL plus [`EXPIRY_MARGIN`]),
    /// then registers. A holder still kept alive (its lease renewed, another
    /// lease put in its place, or a lease still live after the wait) is a
    /// live process with this node id: refused with `NodeIdTaken`.
    async fn outwait(&mut self, mut holder: Holder) -> Result<i64, ClusterError> {
        if holder.lease == 0 {
            // Nothing will make it go: someone else's write.
            return Err(self.taken(holder));
        }
        let mut ttl = self.lease_ttl(holder.lease).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(ttl.max(0) as u64) + EXPIRY_MARGIN;
        tracing::warn!(
            cluster = %self.cfg.cluster_id, node = %self.cfg.node_id,
            endpoint = %holder.member.endpoint, started_at_ms = holder.member.started_at_ms,
            incarnation = %holder.member.incarnation, lease = format_args!("{:x}", holder.lease),
            remaining_ttl_s = ttl, max_wait_s = ttl.max(0) as u64 + EXPIRY_MARGIN.as_secs(),
            "node id is registered by another process (a restart within the lease TTL?); waiting for its \
             lease to expire (refused if it is kept alive)"
        );
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.taken(holder));
            }
            tokio::time::sleep(EXPIRY_POLL.min(deadline - now)).await;
            let next = match self.holder().await? {
                Some(h) => h,
                None => match self.try_register().await? {
                    Ok(lease) => {
                        tracing::info!(
                            node = %self.cfg.node_id, previous = %holder.member.incarnation,
                            "the previous process's registration expired"
                        );
                        return Ok(lease);
                    }
                    Err(h) => h,
                },
            };
            let next_ttl = if next.lease == 0 {
                i64::MAX
            } else {
                self.lease_ttl(next.lease).await?
            };
            // Kept alive: the record rewritten since (a live node rewrites it
            // every refresh interval; a dead one never), or its lease renewed
            // (etcd reports whole seconds, counting down: more than before).
            // An etcd leader change also extends leases; that refuses a
            // restart the supervisor then retries.
            let rewritten = next.rev != holder.rev;
            let renewed = next.lease == holder.lease && next_ttl > ttl;
            if (rewritten || renewed) && next_ttl > 0 {
                return Err(self.taken(next));
            }
            (holder, ttl) = (next, next_ttl);
        }
    }

    /// The record of another process holding this node's id, if any (none
    /// when absent, this process's own, or unreadable: registering replaces it).
    async fn holder(&self) -> Result<Option<Holder>, ClusterError> {
        let key = super::member_key(&self.cfg.cluster_id, &self.cfg.node_id);
        let mut c = self.client.clone();
        let r = self.call(c.get(key.clone(), None)).await?;
        Ok(r.kvs().first().and_then(|kv| match Member::decode(&key, kv.value()) {
            Ok(m) if m.incarnation != self.incarnation => Some(Holder {
                member: m,
                lease: kv.lease(),
                rev: kv.mod_revision(),
            }),
            _ => None,
        }))
    }

    /// A lease's remaining TTL in seconds as etcd reports it; -1 (or 0) for
    /// a lease that expired or that etcd does not know.
    async fn lease_ttl(&self, lease: i64) -> Result<i64, ClusterError> {
        let mut c = self.client.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, c.lease_time_to_live(lease, None)).await {
            Ok(Ok(r)) => Ok(r.ttl()),
            // etcd answers "not found" (or TTL -1, depending on version) for a lease it lost.
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => Ok(-1),
            Ok(Err(e)) => Err(ClusterError::from_etcd(&self.cfg.etcd, e)),
            Err(_) => Err(ClusterError::Unreachable {
                endpoints: self.cfg.etcd.to_string(),
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            }),
        }
    }

    async fn revoke(&self, lease: i64) {
        let mut c = self.client.clone();
        if let Err(e) = self.call(c.lease_revoke(lease)).await {
            tracing::debug!(error = %e, "revoking lease {lease:x}");
        }
    }

    /// Renews `lease` and rewrites the record until something fails.
    async fn keep(&mut self, lease: i64) -> ClusterError {
        let mut c = self.client.clone();
        let (mut keeper, mut stream) = match self.call(c.lease_keep_alive(lease)).await {
            Ok(k) => k,
            Err(e) => return e,
        };
        let ttl = Duration::from_secs(self.cfg.lease_ttl_s);
        let mut renew = tokio::time::interval(ttl / 3);
        let mut refresh = tokio::time::interval(self.cfg.refresh_interval);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let key = super::member_key(&self.cfg.cluster_id, &self.cfg.node_id);
        loop {
            // Past the select: the record is rewritten (refresh tick or state change).
            tokio::select! {
                _ = renew.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return e.into();
                    }
                    match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(_)) => return ClusterError::LeaseLost(lease),
                        Ok(Err(e)) => return e.into(),
                        Err(_) => return ClusterError::Unreachable {
                            endpoints: self.cfg.etcd.to_string(),
                            reason: "lease keep-alive unanswered".into(),
                        },
                    }
                    continue;
                }
                _ = refresh.tick() => {}
                _ = self.cfg.repair.changed.notified() => {}
                r = self.state.changed() => {
                    if r.is_err() {
                        // The handle is gone; its Drop aborts this task.
                        std::future::pending::<()>().await;
                    }
                }
            }
            {
                // Only while the key is still ours: a put must not resurrect a
                // record whose lease expired.
                let txn = Txn::new()
                    .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        self.record().encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                match self.call(c.txn(txn)).await {
                    Ok(r) if r.succeeded() => {}
                    Ok(_) => return ClusterError::LeaseLost(lease),
                    Err(e) => return e,
                }
            }
        }
    }

    /// The background task: keep the registration, re-register after any
    /// failure, revoke on stop.
    async fn run(mut self, first: i64, mut stop: oneshot::Receiver<()>) {
        let mut lease = Some(first);
        // A lease that may still be alive (etcd was unreachable, not the lease gone).
        let mut previous: Option<i64> = None;
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some(id) = lease {
                let e = tokio::select! {
                    _ = &mut stop => {
                        self.revoke(id).await;
                        tracing::info!(node = %self.cfg.node_id, "left cluster (lease revoked)");
                        return;
                    }
                    e = self.keep(id) => e,
                };
                tracing::warn!(node = %self.cfg.node_id, error = %e, "cluster registration interrupted; retrying");
                self.lease_tx.send_replace(0);
                previous = (!matches!(e, ClusterError::LeaseLost(_))).then_some(id);
                lease = None;
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2)
                .min(BACKOFF_MAX)
                .min(Duration::from_secs(self.cfg.lease_ttl_s) / 4);
            let attempt = async {
                self.client = connect(&self.cfg.etcd).await?;
                if let Some(old) = previous {
                    // Resume the old lease when it and the record survived
                    // (a short outage, or an etcd restart that kept it).
                    if self.still_ours(old).await? {
                        self.lease_tx.send_replace(old);
                        return Ok((old, true));
                    }
                    self.revoke(old).await;
                }
                self.register().await.map(|id| (id, false))
            };
            let r = tokio::select! {
                _ = &mut stop => {
                    if let Some(old) = previous {
                        let _ = tokio::time::timeout(Duration::from_millis(500), self.revoke(old)).await;
                    }
                    return;
                }
                r = attempt => r,
            };
            match r {
                Ok((id, resumed)) => {
                    let how = if resumed {
                        "resumed its lease"
                    } else {
                        "registered again"
                    };
                    tracing::info!(node = %self.cfg.node_id, lease = format_args!("{id:x}"), "{how}");
                    lease = Some(id);
                    previous = None;
                }
                Err(e) => tracing::warn!(node = %self.cfg.node_id, error = %e, "cluster registration failed; retrying"),
            }
        }
    }

    /// Whether `lease` is alive and still holds this node's record.
    async fn still_ours(&self, lease: i64) -> Result<bool, ClusterError> {
        if self.lease_ttl(lease).await? <= 0 {
            return Ok(false);
        }
        let mut c = self.client.clone();
        let key = super::member_key(&self.cfg.cluster_id, &self.cfg.node_id);
        let r = self.call(c.get(key, None)).await?;
        Ok(r.kvs().first().is_some_and(|kv| {
            kv.lease() == lease
                && Member::decode(&String::from_utf8_lossy(kv.key()), kv.value())
                    .is_ok_and(|m| m.incarnation == self.incarnation)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_remembers_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!check_data_dir(dir.path(), "a").unwrap());
        remember_cluster(dir.path(), "a").unwrap();
        assert!(check_data_dir(dir.path(), "a").unwrap());
        let e = check_data_dir(dir.path(), "b").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("\"a\"") && msg.contains("\"b\""), "{msg}");
        assert!(matches!(e, ClusterError::DataDirMismatch { .. }));
    }

    #[test]
    fn incarnations_differ() {
        assert_ne!(incarnation(5), incarnation(5));
    }
}
