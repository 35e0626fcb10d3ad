//! A watched prefix of etcd records: lists every record under a prefix,
//! then watches the prefix from the list's revision, keeping a current map
//! (record id -> decoded record) that callers read as a snapshot or wait on
//! through a `watch` channel. Watch errors, cancellation and compaction
//! lead to a fresh list; while etcd is unreachable the last known map stays
//! (with backoff between retries). Malformed records are logged and left
//! out, never guessed at. The membership and the namespace registry are
//! both kept this way.

use super::{ClusterError, EtcdTarget};
use super::{bounded, connect};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A record kept under a prefix, one per id (the key's last segment).
pub trait Record: Clone + Send + Sync + 'static {
    /// What the records are, for logs ("member", "namespace").
    const WHAT: &'static str;
    /// Decodes the value stored at `key`, checking it against the key.
    fn decode(key: &str, value: &[u8]) -> Result<Self, ClusterError>;
    /// The record's id (the last segment of its key).
    fn id(&self) -> &str;
}

/// Decodes a JSON record kept at `<...>/<dir>/<name>`: parses it, runs
/// `validate`, and checks that the key's last segment is the record's
/// `name` (so a record copied under another key is refused).
pub(super) fn decode_named<R: serde::de::DeserializeOwned + Record>(
    key: &str,
    value: &[u8],
    dir: &str,
    validate: impl FnOnce(&R) -> Result<(), String>,
) -> Result<R, ClusterError> {
    let malformed = |reason: String| ClusterError::Malformed {
        key: key.to_string(),
        reason,
    };
    let r: R = serde_json::from_slice(value).map_err(|e| malformed(e.to_string()))?;
    validate(&r).map_err(malformed)?;
    let seg = key.rsplit('/').next().unwrap_or_default();
    if seg != r.id() || !key.contains(&format!("/{dir}/")) {
        return Err(malformed(format!("record is for {} {:?}", R::WHAT, r.id())));
    }
    Ok(r)
}

/// Records by id.
pub type RecordMap<R> = BTreeMap<String, R>;

/// A running watcher of one prefix; stops when dropped.
#[derive(Debug)]
pub struct PrefixWatch<R: Record> {
    rx: watch::Receiver<Arc<RecordMap<R>>>,
    task: JoinHandle<()>,
}

/// Connects and lists the records under `prefix` once (the one-shot
/// `list_members`, `list_namespaces`, `list_workers`).
pub(super) async fn list_once<R: Record>(etcd: &EtcdTarget, prefix: &str) -> Result<RecordMap<R>, ClusterError> {
    let mut c = connect(etcd).await?;
    Ok(list(&mut c, etcd, prefix).await?.0)
}

/// Lists the records under `prefix` once (malformed ones skipped with a
/// warning). Returns the map and the store revision.
pub(super) async fn list<R: Record>(
    client: &mut Client,
    etcd: &EtcdTarget,
    prefix: &str,
) -> Result<(RecordMap<R>, i64), ClusterError> {
    let r = bounded(etcd, client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
    let mut map = RecordMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if key
            .strip_prefix(prefix)
            .is_none_or(|id| id.is_empty() || id.contains('/'))
        {
            tracing::warn!(key = %key, what = R::WHAT, "skipping a key that is not a record");
            continue;
        }
        match R::decode(&key, kv.value()) {
            Ok(m) => {
                map.insert(m.id().to_string(), m);
            }
            Err(e) => tracing::warn!(error = %e, what = R::WHAT, "skipping record"),
        }
    }
    Ok((map, rev))
}

impl<R: Record> PrefixWatch<R> {
    /// Lists the prefix (failing if etcd cannot be reached), then keeps the
    /// map current in the background.
    pub async fn start(etcd: EtcdTarget, prefix: String) -> Result<PrefixWatch<R>, ClusterError> {
        let mut client = connect(&etcd).await?;
        let (map, rev) = list::<R>(&mut client, &etcd, &prefix).await?;
        let (tx, rx) = watch::channel(Arc::new(map));
        let task = tokio::spawn(run(etcd, prefix, client, rev, tx));
        Ok(PrefixWatch { rx, task })
    }

    /// The current records.
    pub fn snapshot(&self) -> Arc<RecordMap<R>> {
        self.rx.borrow().clone()
    }

    /// A receiver notified on every change of the map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RecordMap<R>>> {
        self.rx.clone()
    }

    /// Waits up to `timeout` until `pred` holds for the map; returns the
    /// map that satisfied it, or the last one seen on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RecordMap<R>) -> bool,
    ) -> Result<Arc<RecordMap<R>>, Arc<RecordMap<R>>> {
        let mut rx = self.rx.clone();
        let r = tokio::time::timeout(timeout, async {
            let seen = rx.wait_for(|m| pred(m.as_ref())).await.map(|m| m.clone());
            match seen {
                Ok(m) => m,
                Err(_) => std::future::pending().await,
            }
        })
        .await;
        r.map_err(|_| self.snapshot())
    }
}

impl<R: Record> Drop for PrefixWatch<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why one watch ended.
enum WatchEnd {
    /// Compacted or cancelled by the server: list again.
    Relist,
    /// The connection failed.
    Failed(ClusterError),
}

async fn watch_from<R: Record>(
    client: &mut Client,
    etcd: &EtcdTarget,
    prefix: &str,
    rev: i64,
    tx: &watch::Sender<Arc<RecordMap<R>>>,
) -> WatchEnd {
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let mut stream = match bounded(etcd, client.watch(prefix, Some(opts))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(e),
    };
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return WatchEnd::Failed(ClusterError::Unreachable {
                    endpoints: etcd.to_string(),
                    reason: "watch stream closed".into(),
                });
            }
            Err(e) => return WatchEnd::Failed(e.into()),
        };
        if msg.canceled() || msg.compact_revision() > 0 {
            tracing::info!(
                what = R::WHAT,
                reason = msg.cancel_reason(),
                compact_revision = msg.compact_revision(),
                "watch cancelled; listing again"
            );
            return WatchEnd::Relist;
        }
        if msg.events().is_empty() {
            continue;
        }
        let mut map = (**tx.borrow()).clone();
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            // Records sit exactly one segment under the prefix; anything
            // else there (a stray key, deeper paths) is not one of ours and
            // must not touch the record whose id its last segment happens
            // to be.
            let Some(id) = key
                .strip_prefix(prefix)
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(str::to_string)
            else {
                tracing::warn!(key, what = R::WHAT, "ignoring a key that is not a record");
                continue;
            };
            match ev.event_type() {
                EventType::Delete => {
                    map.remove(&id);
                }
                EventType::Put => match R::decode(&key, kv.value()) {
                    Ok(m) => {
                        map.insert(m.id().to_string(), m);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, what = R::WHAT, "ignoring record");
                        map.remove(&id);
                    }
                },
            }
        }
        tx.send_replace(Arc::new(map));
    }
}

async fn run<R: Record>(
    etcd: EtcdTarget,
    prefix: String,
    mut client: Client,
    mut rev: i64,
    tx: watch::Sender<Arc<RecordMap<R>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_from(&mut client, &etcd, &prefix, rev, &tx).await {
            WatchEnd::Relist => {}
            WatchEnd::Failed(e) => {
                tracing::warn!(error = %e, what = R::WHAT, "watch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        // List again (from a fresh connection) until etcd answers.
        loop {
            let r = async {
                let mut c = connect(&etcd).await?;
                let (map, r) = list::<R>(&mut c, &etcd, &prefix).await?;
                Ok::<_, ClusterError>((c, map, r))
            }
            .await;
            match r {
                Ok((c, map, r)) => {
                    client = c;
                    rev = r;
                    tx.send_replace(Arc::new(map));
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, what = R::WHAT, "listing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
