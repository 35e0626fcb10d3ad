//! The node's side of the zero-copy local path: a Unix-socket listener that
//! hands each co-located client the host arena's memfd and serves the
//! control protocol of `proto/kvfabric/v1/local.proto` (reserve, commit,
//! abort, acquire, release).
//!
//! Per connection it tracks what the client holds. Reservations and leases
//! expire (`local.reservation-ttl-ms`, `local.lease-ttl-ms`). Arena space
//! that a client might still be writing (an expired reservation, or open
//! reservations of a client that disconnected) is quarantined: returned when
//! the client process exits (watched through a pidfd from the socket's
//! `SO_PEERCRED`) or after `local.quarantine-ms`, whichever comes first. The
//! client library copies synchronously between reserve and commit, so only a
//! process stalled mid-copy for longer than the TTL plus the quarantine could
//! still write into space that has been reused.
//! A lease that expires is simply dropped: readers only read, and the late
//! release tells the client its copy may be stale.

use super::config::LocalSettings;
use super::{FabricError, Metrics, Namespaces};
use crate::local::wire;
use crate::proto::v1::{
    self, LocalAborted, LocalAcquired, LocalCommitResult, LocalCommitted, LocalHello, LocalLease, LocalReleased,
    LocalRequest, LocalReserved, LocalResponse, LocalSlot, LocalStatus, LocalWelcome, local_request, local_response,
};
use crate::proto::{ErrorKind, LOCAL_PROTOCOL_VERSION, status};
use crate::validate;
use kvfabric_tiers::{BlockHeader, Durability, HostLease, HostReservation, Layout, ObjectKey, TierStack};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

/// What every session shares.
#[derive(Debug)]
pub(crate) struct LocalShared {
    pub(crate) stack: Arc<TierStack>,
    pub(crate) namespaces: Arc<Namespaces>,
    pub(crate) metrics: Metrics,
    pub(crate) settings: LocalSettings,
    pub(crate) max_batch_keys: usize,
    pub(crate) max_object_size: u64,
    pub(crate) node_id: String,
    /// The gRPC service, for what a commit shares with its puts (claiming a
    /// new namespace cluster-wide, clearing tombstones).
    pub(crate) service: super::BlockService,
}

/// Binds the socket (replacing a stale one) and serves until `stop` flips.
pub(crate) async fn serve(
    path: PathBuf,
    shared: Arc<LocalShared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, FabricError> {
    if path.exists() {
        // Only a socket left by an earlier run is removed; anything else is
        // the operator's file.
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| FabricError::Internal(format!("local socket {}: {e}", path.display())))?;
        if !meta.file_type().is_socket() {
            return Err(FabricError::Internal(format!(
                "local.socket {} exists and is not a socket",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| FabricError::Internal(format!("binding local socket {}: {e}", path.display())))?;
    tracing::info!(socket = %path.display(), "zero-copy local path serving");
    Ok(tokio::spawn(async move {
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let shared = shared.clone();
                        let stop = stop.clone();
                        sessions.spawn(async move { Session::run(s, shared, stop).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "local socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        sessions.shutdown().await;
        let _ = std::fs::remove_file(&path);
    }))
}

fn local_status(kind: ErrorKind, message: impl Into<String>) -> LocalStatus {
    let s = status(kind, message);
    LocalStatus {
        code: s.code() as i32,
        message: s.message().to_string(),
    }
}

fn from_fabric(e: FabricError) -> LocalStatus {
    local_status(e.kind(), e.to_string())
}

fn from_grpc(s: &tonic::Status) -> LocalStatus {
    LocalStatus {
        code: s.code() as i32,
        message: s.message().to_string(),
    }
}

fn invalid(m: impl Into<String>) -> LocalStatus {
    local_status(ErrorKind::InvalidArgument, m)
}

struct Held<T> {
    item: T,
    deadline: Instant,
}

struct Session {
    shared: Arc<LocalShared>,
    tenant: String,
    /// Whether the hello's token still stands (checked per request).
    standing: super::service::Standing,
    pid: Option<i32>,
    /// Opened at connect time, so the watch follows this very process even
    /// if it has been reaped and its pid reused by the time it matters.
    pidfd: Option<OwnedFd>,
    reservations: HashMap<u64, Held<HostReservation>>,
    /// Expired reservations, still quarantined (see the module doc), with
    /// the time their quarantine ends.
    expired: HashMap<u64, Held<HostReservation>>,
    leases: HashMap<u64, Held<HostLease>>,
    reserved_bytes: u64,
    next_id: u64,
}

fn peer_pid(s: &UnixStream) -> Option<i32> {
    s.peer_cred().ok().and_then(|c| c.pid()).filter(|p| *p > 0)
}

impl Session {
    async fn run(mut s: UnixStream, shared: Arc<LocalShared>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let pid = peer_pid(&s);
        let hello = match tokio::time::timeout(Duration::from_secs(10), wire::read_msg::<LocalHello>(&mut s)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "local client sent a bad hello");
                let _ = refuse(&mut s, invalid(format!("bad hello: {e}"))).await;
                return;
            }
            Err(_) => {
                tracing::debug!("local client sent no hello within 10 s");
                return;
            }
        };
        if hello.version != LOCAL_PROTOCOL_VERSION {
            let m = format!(
                "local protocol {} is not supported; this node speaks {LOCAL_PROTOCOL_VERSION}",
                hello.version
            );
            let _ = refuse(&mut s, local_status(ErrorKind::FailedPrecondition, m)).await;
            return;
        }
        // With authentication on, the hello carries a token that allows
        // the local path (the arena holds every tenant's host-tier bytes)
        // and acts for the tenant named.
        let svc = &shared.service;
        let tenant = svc.who_local(&hello.token).and_then(|who| {
            if !who.may_use_local() {
                return Err(svc.denied(
                    "this token does not allow the local path, whose shared arena exposes every tenant's \
                     host-tier bytes: the tokens file grants it with `local = true`",
                ));
            }
            let t = svc.tenant(&who, &hello.tenant)?.to_string();
            Ok((t, svc.standing(&who)))
        });
        let (tenant, standing) = match tenant {
            Ok(t) => t,
            Err(st) => {
                tracing::debug!(?pid, message = st.message(), "local client refused");
                let _ = refuse(&mut s, from_grpc(&st)).await;
                return;
            }
        };
        let Some(host) = shared.stack.host_tier() else {
            let _ = refuse(
                &mut s,
                local_status(ErrorKind::FailedPrecondition, "this node has no host tier to share"),
            )
            .await;
            return;
        };
        let welcome = LocalWelcome {
            version: LOCAL_PROTOCOL_VERSION,
            node_id: shared.node_id.clone(),
            arena_bytes: host.arena_len(),
            reservation_ttl_ms: shared.settings.reservation_ttl_ms,
            lease_ttl_ms: shared.settings.lease_ttl_ms,
        };
        if let Err(e) = wire::write_msg_with_fd(&s, &welcome, host.arena_fd()).await {
            tracing::debug!(error = %e, "local handshake failed");
            return;
        }
        tracing::debug!(?pid, %tenant, "local client connected");
        let mut session = Session {
            shared,
            tenant,
            standing,
            pid,
            pidfd: pid.and_then(pidfd_open),
            reservations: HashMap::new(),
            expired: HashMap::new(),
            leases: HashMap::new(),
            reserved_bytes: 0,
            next_id: 1,
        };
        let tick = Duration::from_millis(
            (session
                .shared
                .settings
                .reservation_ttl_ms
                .min(session.shared.settings.lease_ttl_ms)
                / 4)
            .max(5),
        );
        let stall = Duration::from_millis(session.shared.settings.lease_ttl_ms.max(100));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut frames = wire::FrameReader::default();
        loop {
            tokio::select! {
                r = frames.next::<LocalRequest>(&mut s) => match r {
                    Ok(Some(req)) => {
                        session.sweep();
                        let resp = session.handle(req).await;
                        // A client that stops reading its responses would
                        // hold this write, and with it the sweep that expires
                        // what it holds: it gets as long as a lease to read.
                        let written = tokio::select! {
                            r = tokio::time::timeout(stall, wire::write_msg(&mut s, &resp)) => r,
                            _ = stop.changed() => break,
                        };
                        match written {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break,
                            Err(_) => {
                                tracing::warn!(pid = ?session.pid, "local client stopped reading its responses; closing");
                                break;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // A malformed frame ends the session; what it held is released below.
                        tracing::debug!(error = %e, "local client sent a bad frame; closing");
                        let resp = LocalResponse { id: 0, error: Some(invalid(e.to_string())), result: None };
                        let _ = wire::write_msg(&mut s, &resp).await;
                        break;
                    }
                },
                _ = ticker.tick() => session.sweep(),
                _ = stop.changed() => break,
            }
        }
        session.close();
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Expires reservations (into quarantine) and leases.
    fn sweep(&mut self) {
        let now = Instant::now();
        let dead: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            let h = self.reservations.remove(&id).expect("listed");
            self.reserved_bytes -= h.item.footprint();
            tracing::debug!(id, pid = ?self.pid, "local reservation expired; quarantined");
            let deadline = now + Duration::from_millis(self.shared.settings.quarantine_ms);
            self.expired.insert(id, Held { item: h.item, deadline });
        }
        self.expired.retain(|_, h| h.deadline > now);
        self.leases.retain(|_, h| h.deadline > now);
    }

    /// Ends the session: leases go now; reservations a live process might
    /// still be writing go to quarantine.
    fn close(mut self) {
        self.leases.clear();
        let mut held: Vec<HostReservation> = self.reservations.drain().map(|(_, h)| h.item).collect();
        held.extend(self.expired.drain().map(|(_, h)| h.item));
        if !held.is_empty() {
            quarantine(
                held,
                self.pid,
                self.pidfd.take(),
                Duration::from_millis(self.shared.settings.quarantine_ms),
            );
        }
    }

    async fn handle(&mut self, req: LocalRequest) -> LocalResponse {
        let start = Instant::now();
        // A client whose token was removed may still give back what it
        // holds (abort, release), and nothing else.
        let takes = matches!(
            req.op,
            Some(local_request::Op::Reserve(_) | local_request::Op::Commit(_) | local_request::Op::Acquire(_))
        );
        if takes && let Err(st) = self.standing.check() {
            return LocalResponse {
                id: req.id,
                error: Some(from_grpc(&st)),
                result: None,
            };
        }
        let (method, r) = match req.op {
            Some(local_request::Op::Reserve(r)) => ("local_reserve", self.reserve(r.lengths).await),
            Some(local_request::Op::Commit(c)) => ("local_commit", self.commit(c).await),
            Some(local_request::Op::Abort(a)) => ("local_abort", Ok(self.abort(a.reservations))),
            Some(local_request::Op::Acquire(a)) => ("local_acquire", self.acquire(a).await),
            Some(local_request::Op::Release(r)) => ("local_release", Ok(self.release(r.leases))),
            None => ("local_unknown", Err(invalid("request without an operation"))),
        };
        let m = &self.shared.metrics;
        m.rpc_seconds
            .with_label_values(&[method])
            .observe(start.elapsed().as_secs_f64());
        match r {
            Ok(result) => LocalResponse {
                id: req.id,
                error: None,
                result: Some(result),
            },
            Err(e) => {
                let code = format!("{:?}", tonic::Code::from(e.code));
                m.rpc_errors.with_label_values(&[method, &code]).inc();
                LocalResponse {
                    id: req.id,
                    error: Some(e),
                    result: None,
                }
            }
        }
    }

    async fn reserve(&mut self, lengths: Vec<u64>) -> Result<local_response::Result, LocalStatus> {
        let sh = self.shared.clone();
        if lengths.is_empty() || lengths.len() > sh.max_batch_keys {
            return Err(invalid(format!(
                "{} slots asked for; between 1 and {} per request",
                lengths.len(),
                sh.max_batch_keys
            )));
        }
        if let Some(l) = lengths.iter().find(|l| **l > sh.max_object_size) {
            return Err(local_status(
                ErrorKind::Capacity,
                format!(
                    "a slot of {l} bytes exceeds limits.max-object-size {}",
                    sh.max_object_size
                ),
            ));
        }
        // What the slots will take in the arena (a page each, empty or not).
        let Some(host) = sh.stack.host_tier() else {
            return Err(local_status(
                ErrorKind::FailedPrecondition,
                "this node has no host tier to share",
            ));
        };
        let want: u64 = lengths.iter().map(|&l| kvfabric_tiers::Tier::footprint(host, l)).sum();
        let cap = sh.settings.max_reserved_bytes.0;
        if self.reserved_bytes + want > cap {
            return Err(local_status(
                ErrorKind::Capacity,
                format!(
                    "this connection holds {} reserved bytes; {want} more would pass local.max-reserved-bytes {cap}",
                    self.reserved_bytes
                ),
            ));
        }
        let mut got = Vec::with_capacity(lengths.len());
        for &len in &lengths {
            match sh.stack.reserve_host(len).await {
                Ok(r) => got.push(r),
                // Dropping `got` returns what this request already reserved.
                Err(e) => return Err(from_fabric(FabricError::from(e))),
            }
        }
        let deadline = Instant::now() + Duration::from_millis(sh.settings.reservation_ttl_ms);
        let mut slots = Vec::with_capacity(got.len());
        for r in got {
            let id = self.id();
            slots.push(LocalSlot {
                id,
                offset: r.offset(),
                length: r.len(),
            });
            self.reserved_bytes += r.footprint();
            self.reservations.insert(id, Held { item: r, deadline });
        }
        Ok(local_response::Result::Reserved(LocalReserved { slots }))
    }

    fn take_reservation(&mut self, id: u64) -> Result<HostReservation, LocalStatus> {
        if let Some(h) = self.reservations.remove(&id) {
            self.reserved_bytes -= h.item.footprint();
            return Ok(h.item);
        }
        if self.expired.remove(&id).is_some() {
            // The writer has finished (it is committing), so the quarantined
            // space can go back now.
            return Err(local_status(
                ErrorKind::FailedPrecondition,
                format!(
                    "reservation {id} expired before its commit (local.reservation-ttl-ms = {}); put again",
                    self.shared.settings.reservation_ttl_ms
                ),
            ));
        }
        Err(local_status(
            ErrorKind::NotFound,
            format!("reservation {id} is not held by this connection"),
        ))
    }

    async fn commit(&mut self, c: v1::LocalCommit) -> Result<local_response::Result, LocalStatus> {
        let sh = self.shared.clone();
        validate::name("namespace", &c.namespace).map_err(invalid)?;
        if c.items.is_empty() || c.items.len() > sh.max_batch_keys {
            return Err(invalid(format!(
                "{} objects in one commit; between 1 and {} per request",
                c.items.len(),
                sh.max_batch_keys
            )));
        }
        let durability = match v1::Durability::try_from(c.durability) {
            Ok(v1::Durability::Memory) => Durability::Memory,
            Ok(v1::Durability::Disk) => Durability::Disk,
            Ok(v1::Durability::Object) => Durability::Object,
            Err(_) => return Err(invalid(format!("unknown durability {}", c.durability))),
        };
        let claimed = sh.service.claim_if_new(&self.tenant, &c.namespace).await;
        if let Err(e) = claimed.and_then(|()| sh.namespaces.for_write(&self.tenant, &c.namespace)) {
            // Give the reservations back: nothing of this commit is stored.
            for it in &c.items {
                let _ = self.take_reservation(it.reservation);
            }
            return Err(from_fabric(e));
        }
        // Held while the objects are stored (see `Namespaces::writing`).
        let _writing = match sh.namespaces.writing(&self.tenant, &c.namespace) {
            Ok(w) => w,
            Err(e) => {
                for it in &c.items {
                    let _ = self.take_reservation(it.reservation);
                }
                return Err(from_fabric(e));
            }
        };
        let ns: Arc<str> = c.namespace.as_str().into();
        let mut results = Vec::with_capacity(c.items.len());
        for (i, it) in c.items.into_iter().enumerate() {
            let r = match self.take_reservation(it.reservation) {
                Ok(r) => r,
                Err(e) => {
                    results.push(LocalCommitResult {
                        tier: 0,
                        error: Some(e),
                    });
                    continue;
                }
            };
            if let Err(m) = validate::key(i, &it.key) {
                results.push(LocalCommitResult {
                    tier: 0,
                    error: Some(invalid(m)),
                });
                continue;
            }
            if let Err(m) = super::service::check_layout(&it.layout) {
                results.push(LocalCommitResult {
                    tier: 0,
                    error: Some(invalid(format!("object {i}: {m}; not stored"))),
                });
                continue;
            }
            if it.has_checksum && sh.settings.verify_commits {
                let sum = kvfabric_tiers::offload(r.len() as usize, || r.checksum());
                if sum != it.checksum {
                    results.push(LocalCommitResult {
                        tier: 0,
                        error: Some(local_status(
                            ErrorKind::DataCorruption,
                            format!(
                                "object {i}: the slot's bytes hash to {sum:#018x}, the client announced {:#018x}; not stored",
                                it.checksum
                            ),
                        )),
                    });
                    continue;
                }
            }
            let header = BlockHeader {
                length: r.len(),
                checksum: if it.has_checksum {
                    it.checksum
                } else {
                    kvfabric_tiers::CHECKSUM_PENDING
                },
                created_ms: sh.stack.clock().now_ms(),
                layout: layout_from_proto(it.layout),
            };
            let key = ObjectKey::new(ns.clone(), it.key.clone());
            let len = header.length;
            match sh.stack.commit_host(&key, r, header, durability).await {
                Ok(tier) => {
                    sh.service.stored(&ns, &it.key);
                    sh.metrics.rpc_bytes.with_label_values(&["in"]).inc_by(len);
                    results.push(LocalCommitResult {
                        tier: super::service::tier_to_proto(tier) as i32,
                        error: None,
                    });
                }
                Err(e) => results.push(LocalCommitResult {
                    tier: 0,
                    error: Some(from_fabric(FabricError::from(e))),
                }),
            }
        }
        Ok(local_response::Result::Committed(LocalCommitted { results }))
    }

    fn abort(&mut self, ids: Vec<u64>) -> local_response::Result {
        for id in ids {
            let _ = self.take_reservation(id);
        }
        local_response::Result::Aborted(LocalAborted {})
    }

    async fn acquire(&mut self, a: v1::LocalAcquire) -> Result<local_response::Result, LocalStatus> {
        let sh = self.shared.clone();
        validate::name("namespace", &a.namespace).map_err(invalid)?;
        validate::keys(&a.keys, sh.max_batch_keys).map_err(invalid)?;
        sh.namespaces
            .for_read(&self.tenant, &a.namespace)
            .map_err(from_fabric)?;
        let ns: Arc<str> = a.namespace.as_str().into();
        let deadline = Instant::now() + Duration::from_millis(sh.settings.lease_ttl_ms);
        let n = a.keys.len();
        let mut leases = Vec::with_capacity(n);
        // Bytes this connection holds pinned: one client may not pin more
        // than `max-leased-bytes` of the arena at once (past it, what did
        // not fit is `retry`, as when the arena has no room; a single
        // object larger than the cap is still leased on its own).
        let mut leased: u64 = self.leases.values().map(|h| h.item.header().length).sum();
        let cap = sh.settings.max_leased_bytes.0;
        for k in a.keys {
            if leased >= cap && !self.leases.is_empty() {
                let rest = n - leases.len();
                leases.extend((0..rest).map(|_| LocalLease {
                    retry: true,
                    ..Default::default()
                }));
                break;
            }
            let key = ObjectKey::new(ns.clone(), k);
            match sh.stack.acquire_host(&key).await {
                Ok(Some(l)) => {
                    let id = self.id();
                    let h = l.header();
                    leased += h.length;
                    sh.metrics.rpc_bytes.with_label_values(&["out"]).inc_by(h.length);
                    leases.push(LocalLease {
                        found: true,
                        lease: id,
                        offset: l.offset(),
                        length: h.length,
                        checksum: h.checksum,
                        layout: Some(layout_to_proto(&h.layout)),
                        retry: false,
                    });
                    self.leases.insert(id, Held { item: l, deadline });
                }
                Ok(None) => leases.push(LocalLease::default()),
                Err(kvfabric_tiers::TierError::Full { .. } | kvfabric_tiers::TierError::CapacityExhausted { .. })
                    if !leases.is_empty() =>
                {
                    // No room to pin this one while the earlier ones are
                    // pinned: the client copies those out, releases, asks again.
                    let rest = n - leases.len();
                    leases.extend((0..rest).map(|_| LocalLease {
                        retry: true,
                        ..Default::default()
                    }));
                    break;
                }
                Err(e) => {
                    // Leases taken by this request so far are released: the
                    // client gets nothing to release.
                    for l in &leases {
                        self.leases.remove(&l.lease);
                    }
                    return Err(from_fabric(FabricError::from(e)));
                }
            }
        }
        Ok(local_response::Result::Acquired(LocalAcquired { leases }))
    }

    fn release(&mut self, ids: Vec<u64>) -> local_response::Result {
        let now = Instant::now();
        let held = ids
            .iter()
            .map(|id| self.leases.remove(id).is_some_and(|h| h.deadline > now))
            .collect();
        local_response::Result::Released(LocalReleased { held })
    }
}

async fn refuse(s: &mut UnixStream, e: LocalStatus) -> std::io::Result<()> {
    wire::write_msg(
        s,
        &LocalResponse {
            id: 0,
            error: Some(e),
            result: None,
        },
    )
    .await
}

fn layout_from_proto(l: Option<v1::Layout>) -> Layout {
    super::service::layout_from_proto(l)
}

fn layout_to_proto(l: &Layout) -> v1::Layout {
    super::service::layout_to_proto(l)
}

/// Holds arena space that a client process might still write until that
/// process exits or `grace` passes, whichever comes first.
pub(crate) fn quarantine(held: Vec<HostReservation>, pid: Option<i32>, pidfd: Option<OwnedFd>, grace: Duration) {
    let bytes: u64 = held.iter().map(|r| r.footprint()).sum();
    tracing::debug!(?pid, bytes, "quarantining reserved arena space of a local client");
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        match pidfd {
            Some(fd) => {
                let _ = tokio::time::timeout(grace, wait_exit(fd)).await;
            }
            None => tokio::time::sleep(grace).await,
        }
        drop(held);
    });
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just returned to us.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Resolves when the process behind `fd` has exited (the pidfd turns readable).
async fn wait_exit(fd: OwnedFd) -> std::io::Result<()> {
    // SAFETY: `fd` is an open pidfd owned by the AsyncFd for its whole life.
    let afd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let _g = afd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_fires_when_the_process_exits() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let fd = pidfd_open(child.id() as i32).expect("pidfd_open works on this kernel");
        assert!(child.try_wait().unwrap().is_none(), "still running before the wait");
        tokio::time::timeout(Duration::from_secs(10), wait_exit(fd))
            .await
            .expect("exit seen")
            .unwrap();
        // The pidfd turned readable because the child exited (a zombie until reaped).
        assert!(child.try_wait().unwrap().is_some());
    }
}
