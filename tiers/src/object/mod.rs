//! G4, the object-store tier: blocks stored as objects in any
//! [`object_store::ObjectStore`] — a local directory (`file:///abs/dir`) or an
//! S3-compatible bucket (`s3://bucket/prefix`).
//!
//! Each block is one object at `{prefix}/{namespace}/{hex key}` (see
//! [`ObjectKey::path`]) whose body is the encoded [`BlockHeader`] followed by
//! the payload, so the store is self-describing: opening the tier lists the
//! prefix and reads each object's header (a ranged read of the first few KiB)
//! to rebuild the in-memory index that answers `contains`, `len` and `used`.
//! Every read is verified (header checksum, key, length, payload xxh3) before
//! any byte is handed out.
//!
//! The tier owns its prefix: the in-memory index is authoritative, so a `get`
//! or `delete` of a key the index does not hold does no I/O. A `get` that
//! finds an indexed object gone from the store (removed behind the tier's
//! back) drops it from the index, unless a put replaced it meanwhile.
//! Objects larger than [`ObjectTierConfig::multipart_threshold`] are uploaded
//! with a multipart upload, several parts in flight, aborted on any error or
//! when the put is dropped part-way (the abort then runs on a spawned task).
//!
//! Recovery retries each list or header read that fails with an error that
//! may be transient (five tries, waiting 100 ms doubling up to 1 s between
//! them); one object that stays unreadable still fails the open, naming the
//! object and the tries.

use crate::{Block, BlockHeader, ObjectKey, Tier, TierError, TierKind, TierResult};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Smallest part S3 accepts (every part but the last).
const S3_MIN_PART: u64 = 5 * MIB;
/// Largest part S3 accepts.
const S3_MAX_PART: u64 = 5 * GIB;
/// Most parts in one S3 multipart upload; larger objects get larger parts.
const MAX_PARTS: u64 = 10_000;
/// Parts uploaded concurrently by one multipart put.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes read from the front of each object during recovery; a header never
/// exceeds 8 KiB (see [`BlockHeader::decode`]).
const HEADER_PROBE: u64 = 8 * KIB;
/// Concurrent header reads during recovery.
const RECOVERY_CONCURRENCY: usize = 16;
/// Per-key lock stripes serialising put/delete of the same key.
const KEY_STRIPES: usize = 64;
/// Tries of each recovery read (the listing, one object's header) before
/// the open fails, when the error may be transient.
const SCAN_ATTEMPTS: u32 = 5;
/// Wait before the second try of a recovery read; doubled for each later one.
const SCAN_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two tries of a recovery read.
const SCAN_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Settings of the object-store tier.
///
/// Deserialised from kebab-case keys; sizes accept a number of bytes or a
/// string such as `"16MiB"`. Call [`ObjectTierConfig::validate`] (done by
/// [`ObjectTier::open`]) before use.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ObjectTierConfig {
    /// Where objects live: `file:///absolute/dir` (created if missing, no
    /// credentials) or `s3://bucket/optional/prefix`. Required.
    pub url: String,
    /// S3 endpoint, e.g. `http://127.0.0.1:8333` for an S3-compatible server.
    /// Setting it switches to path-style requests; an `http://` endpoint also
    /// permits plain HTTP. Default: none (AWS, or `AWS_ENDPOINT` from the
    /// environment).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3 region. Default: none (`AWS_DEFAULT_REGION`/`AWS_REGION` from the
    /// environment, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// S3 access key id; set together with `secret_access_key`. Default: none
    /// (`AWS_ACCESS_KEY_ID` and the other usual AWS sources).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// S3 secret access key; set together with `access_key_id`. Default: none
    /// (`AWS_SECRET_ACCESS_KEY`). Never printed by `Debug`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Permit plain-HTTP endpoints; an `http://` endpoint without it is
    /// refused. Default: false (the node's `[object] allow-http` defaults
    /// to true for an `http://` endpoint).
    #[serde(default)]
    pub allow_http: bool,
    /// Capacity in bytes of payload; `u64::MAX` means unbounded. Must be > 0.
    /// Default: unbounded.
    #[serde(default = "default_capacity", deserialize_with = "size::deserialize")]
    pub capacity: u64,
    /// Objects (header plus payload) larger than this are uploaded in parts.
    /// Must be > 0. Default: 16 MiB.
    #[serde(default = "default_multipart_threshold", deserialize_with = "size::deserialize")]
    pub multipart_threshold: u64,
    /// Size of each part of a multipart upload (the last may be smaller);
    /// grown automatically when an object would need more than 10 000 parts.
    /// Bounds: 5 MiB to 5 GiB for S3, > 0 for a local directory. Default: 8 MiB.
    #[serde(default = "default_part_size", deserialize_with = "size::deserialize")]
    pub part_size: u64,
}

fn default_capacity() -> u64 {
    u64::MAX
}
fn default_multipart_threshold() -> u64 {
    ObjectTierConfig::DEFAULT_MULTIPART_THRESHOLD
}
fn default_part_size() -> u64 {
    ObjectTierConfig::DEFAULT_PART_SIZE
}

impl fmt::Debug for ObjectTierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectTierConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("capacity", &self.capacity)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .finish()
    }
}

/// Where a validated URL points.
enum Location {
    Dir(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl ObjectTierConfig {
    /// Default [`ObjectTierConfig::multipart_threshold`]: 16 MiB.
    pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 16 * MIB;
    /// Default [`ObjectTierConfig::part_size`]: 8 MiB.
    pub const DEFAULT_PART_SIZE: u64 = 8 * MIB;

    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            capacity: default_capacity(),
            multipart_threshold: Self::DEFAULT_MULTIPART_THRESHOLD,
            part_size: Self::DEFAULT_PART_SIZE,
        }
    }

    /// Checks every setting, returning [`TierError::Config`] naming the first
    /// bad one.
    pub fn validate(&self) -> TierResult<()> {
        let loc = self.location()?;
        self.validate_sizes(matches!(loc, Location::S3 { .. }))?;
        if let Some(ep) = &self.endpoint {
            let u = url::Url::parse(ep).map_err(|e| TierError::Config(format!("object tier endpoint {ep:?}: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(TierError::Config(format!(
                    "object tier endpoint {ep:?} must be an http:// or https:// URL with a host"
                )));
            }
            if u.scheme() == "http" && !self.allow_http {
                return Err(TierError::Config(format!(
                    "object tier endpoint {ep:?} is plain HTTP but allow-http is false"
                )));
            }
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(TierError::Config(
                "object tier: access-key-id and secret-access-key must be set together".into(),
            ));
        }
        Ok(())
    }

    fn validate_sizes(&self, s3: bool) -> TierResult<()> {
        if self.capacity == 0 {
            return Err(TierError::Config("object tier capacity must be > 0".into()));
        }
        if self.multipart_threshold == 0 {
            return Err(TierError::Config("object tier multipart-threshold must be > 0".into()));
        }
        if self.part_size == 0 {
            return Err(TierError::Config("object tier part-size must be > 0".into()));
        }
        if s3 && !(S3_MIN_PART..=S3_MAX_PART).contains(&self.part_size) {
            return Err(TierError::Config(format!(
                "object tier part-size {} is outside S3's limits of 5 MiB to 5 GiB",
                self.part_size
            )));
        }
        Ok(())
    }

    fn location(&self) -> TierResult<Location> {
        let bad = |why: String| TierError::Config(format!("object tier url {:?}: {why}", self.url));
        let u = url::Url::parse(&self.url).map_err(|e| bad(e.to_string()))?;
        match u.scheme() {
            "file" => {
                if u.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                    return Err(bad("a file URL names no host: use file:///absolute/dir".into()));
                }
                let dir = u.to_file_path().map_err(|()| bad("not an absolute directory".into()))?;
                Ok(Location::Dir(dir))
            }
            "s3" => {
                let bucket = u.host_str().unwrap_or_default().to_string();
                if bucket.is_empty() {
                    return Err(bad("no bucket: use s3://bucket/prefix".into()));
                }
                let prefix = u.path().trim_matches('/').to_string();
                Path::parse(&prefix).map_err(|e| bad(format!("bad prefix: {e}")))?;
                Ok(Location::S3 { bucket, prefix })
            }
            other => Err(bad(format!("unsupported scheme {other:?}: use file:// or s3://"))),
        }
    }
}

/// What the index knows about one stored object.
#[derive(Debug, Clone)]
struct Entry {
    header: BlockHeader,
    /// Which indexing of the key this is ([`Index::next_version`]): tells a
    /// re-put of an identical block apart from the entry a get looked at.
    version: u64,
}

#[derive(Debug, Default)]
struct Index {
    map: HashMap<ObjectKey, Entry>,
    /// Sum of footprints of indexed objects.
    used: u64,
    /// Footprints reserved by puts in flight.
    reserved: u64,
    /// Version the next inserted entry gets.
    next_version: u64,
}

impl Index {
    /// Indexes `header` for `key` under a fresh version, returning the entry
    /// it replaces.
    fn insert(&mut self, key: ObjectKey, header: BlockHeader) -> Option<Entry> {
        let version = self.next_version;
        self.next_version += 1;
        self.map.insert(key, Entry { header, version })
    }
}

/// Bytes a put has reserved while it uploads; given back when dropped armed.
struct Reserved<'a> {
    index: &'a Mutex<Index>,
    need: u64,
    armed: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.index.lock().reserved -= self.need;
        }
    }
}

/// A multipart upload between its start and its `complete` or `abort`.
/// Dropped before either finished (the put was cancelled part-way), it
/// aborts the upload on a task spawned on the current runtime, so the store
/// is not left holding the parts of an upload nobody will finish.
struct PendingUpload {
    /// `None` once completed or aborted.
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    path: Path,
}

impl PendingUpload {
    fn upload(&mut self) -> &mut dyn object_store::MultipartUpload {
        self.upload
            .as_deref_mut()
            .expect("a pending upload holds its upload until complete or abort consumes it")
    }

    fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
        self.upload().put_part(data)
    }

    /// Completes the upload; on an error it stays armed (to be aborted).
    async fn complete(&mut self) -> object_store::Result<()> {
        self.upload().complete().await?;
        self.upload = None;
        Ok(())
    }

    /// Aborts the upload, logging a failure; disarmed once the abort
    /// returned, whatever it returned.
    async fn abort(mut self) {
        if let Err(e) = self.upload().abort().await {
            tracing::warn!(object = %self.path, error = %e, "object tier: aborting multipart upload failed");
        }
        self.upload = None;
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else { return };
        let path = std::mem::take(&mut self.path);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(object = %path, "object tier: multipart upload of a dropped put left behind: no runtime to abort it on");
            return;
        };
        rt.spawn(async move {
            match upload.abort().await {
                Ok(()) => tracing::debug!(object = %path, "object tier: aborted the multipart upload of a dropped put"),
                Err(e) => tracing::warn!(object = %path, error = %e, "object tier: aborting the multipart upload of a dropped put failed"),
            }
        });
    }
}

/// The object-store tier (G4). See the module documentation.
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    /// Store used for puts with `sync` (a local directory that fsyncs); the
    /// main store otherwise.
    sync_store: Option<Arc<dyn ObjectStore>>,
    prefix: Path,
    cfg: ObjectTierConfig,
    index: Mutex<Index>,
    key_locks: Box<[tokio::sync::Mutex<()>]>,
}

impl fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idx = self.index.lock();
        f.debug_struct("ObjectTier")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix.as_ref())
            .field("objects", &idx.map.len())
            .field("used", &idx.used)
            .field("capacity", &self.cfg.capacity)
            .finish()
    }
}

impl ObjectTier {
    /// Opens the tier described by `cfg` (validated first): creates the
    /// directory of a `file://` URL, or builds an S3 client from the usual
    /// `AWS_*` environment variables overridden by the config's fields. Lists
    /// the prefix and reads every object's header so `contains` and `used` are
    /// right as soon as this returns.
    pub async fn open(cfg: ObjectTierConfig) -> TierResult<Self> {
        cfg.validate()?;
        match cfg.location()? {
            Location::Dir(dir) => {
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| TierError::io(format!("creating object tier directory {}", dir.display()), e))?;
                let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&dir)?);
                let sync: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true));
                Self::build(store, Some(sync), Path::default(), cfg).await
            }
            Location::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if let Some(ep) = &cfg.endpoint {
                    b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                }
                if cfg.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(r) = &cfg.region {
                    b = b.with_region(r);
                }
                if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                }
                let store: Arc<dyn ObjectStore> = Arc::new(
                    b.build()
                        .map_err(|e| TierError::Config(format!("object tier url {:?}: {e}", cfg.url)))?,
                );
                Self::build(store, None, Path::from(prefix.as_str()), cfg).await
            }
        }
    }

    /// Opens the tier over an already-built store (tests, fault injection,
    /// other back ends), keeping objects under `prefix` (may be empty).
    /// `cfg.url` is ignored; the size settings are validated with S3's part
    /// limits. Recovers like [`ObjectTier::open`].
    pub async fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, cfg: ObjectTierConfig) -> TierResult<Self> {
        cfg.validate_sizes(true)?;
        let prefix = Path::parse(prefix.trim_matches('/'))
            .map_err(|e| TierError::Config(format!("object tier prefix {prefix:?}: {e}")))?;
        Self::build(store, None, prefix, cfg).await
    }

    async fn build(
        store: Arc<dyn ObjectStore>,
        sync_store: Option<Arc<dyn ObjectStore>>,
        prefix: Path,
        cfg: ObjectTierConfig,
    ) -> TierResult<Self> {
        let tier = Self {
            store,
            sync_store,
            prefix,
            cfg,
            index: Mutex::new(Index::default()),
            key_locks: (0..KEY_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        };
        tier.scan().await?;
        Ok(tier)
    }

    /// The configuration the tier was opened with.
    pub fn config(&self) -> &ObjectTierConfig {
        &self.cfg
    }

    /// Where `key` lives in the store.
    fn path_for(&self, key: &ObjectKey) -> Path {
        if self.prefix.as_ref().is_empty() {
            Path::from(key.path())
        } else {
            Path::from(format!("{}/{}", self.prefix, key.path()))
        }
    }

    fn key_lock(&self, key: &ObjectKey) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.key_locks[(h.finish() as usize) % self.key_locks.len()]
    }

    fn corrupt(key: &ObjectKey, reason: impl Into<String>) -> TierError {
        TierError::Corrupt {
            tier: TierKind::Object,
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Drops `key` from the index after a read found its object gone from
    /// the store, if the entry is still `version`, the one the read looked
    /// at: a delete may have removed it, or a put replaced it (with an
    /// object that exists) meanwhile. Under the key's lock, so no put or
    /// delete of the key is half done.
    async fn forget_vanished(&self, key: &ObjectKey, version: u64) {
        let _key_guard = self.key_lock(key).lock().await;
        let dropped = {
            let mut idx = self.index.lock();
            match idx.map.get(key) {
                Some(e) if e.version == version => {
                    idx.used -= self.footprint(e.header.length);
                    idx.map.remove(key)
                }
                _ => None,
            }
        };
        if let Some(e) = dropped {
            tracing::warn!(store = %self.store, object = %self.path_for(key), bytes = e.header.length, "object tier: indexed object is gone from the store; dropped from the index");
        }
    }

    /// Lists the prefix and rebuilds the index from the objects' headers.
    async fn scan(&self) -> TierResult<()> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let what = || match prefix {
            Some(p) => format!("listing {} under {p}", self.store),
            None => format!("listing {}", self.store),
        };
        let metas: Vec<ObjectMeta> = retry_transient(what, || self.store.list(prefix).try_collect()).await?;
        let found: Vec<Option<(ObjectKey, BlockHeader)>> = futures::stream::iter(metas)
            .map(|meta| self.probe(meta))
            .buffer_unordered(RECOVERY_CONCURRENCY)
            .try_collect()
            .await?;
        let mut idx = self.index.lock();
        idx.map.clear();
        idx.used = 0;
        for (key, header) in found.into_iter().flatten() {
            idx.used += header.length;
            idx.insert(key, header);
        }
        tracing::info!(store = %self.store, prefix = %self.prefix, objects = idx.map.len(), bytes = idx.used, "object tier recovered");
        Ok(())
    }

    /// Reads and checks one object's header; `None` (logged) when the object
    /// is not a well-formed kvfabric block stored under its own name.
    async fn probe(&self, meta: ObjectMeta) -> TierResult<Option<(ObjectKey, BlockHeader)>> {
        let loc = &meta.location;
        if meta.size == 0 {
            tracing::warn!(object = %loc, "object tier: skipping empty object");
            return Ok(None);
        }
        let read = || async {
            match self.store.get_range(loc, 0..meta.size.min(HEADER_PROBE)).await {
                Ok(b) => Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => Ok(None), // deleted meanwhile
                Err(e) => Err(e),
            }
        };
        let Some(head) = retry_transient(|| format!("reading the header of {loc}"), read).await? else {
            return Ok(None);
        };
        let (header, key, hlen) = match BlockHeader::decode(&head) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(object = %loc, error = %e, "object tier: skipping object whose header does not decode");
                return Ok(None);
            }
        };
        if self.path_for(&key) != *loc {
            tracing::warn!(object = %loc, header_key = %key, "object tier: skipping object stored under another key's name");
            return Ok(None);
        }
        let expect = hlen as u64 + header.length;
        if meta.size != expect {
            tracing::warn!(object = %loc, size = meta.size, expected = expect, "object tier: skipping object whose size disagrees with its header");
            return Ok(None);
        }
        Ok(Some((key, header)))
    }

    /// Writes header + payload to `path`, in parts when large.
    async fn upload(&self, path: &Path, header: Bytes, payload: Bytes, sync: bool) -> TierResult<()> {
        let store = match (&self.sync_store, sync) {
            (Some(s), true) => s,
            _ => &self.store,
        };
        let total = header.len() as u64 + payload.len() as u64;
        if total <= self.cfg.multipart_threshold {
            store.put(path, PutPayload::from_iter([header, payload])).await?;
            return Ok(());
        }
        let part_size = self.cfg.part_size.max(total.div_ceil(MAX_PARTS));
        // Aborted below on an error, or by its drop if this future is
        // dropped before it completes.
        let mut upload = PendingUpload {
            upload: Some(store.put_multipart(path).await?),
            path: path.clone(),
        };
        let mut in_flight = FuturesUnordered::new();
        let mut result: object_store::Result<()> = Ok(());
        let mut off = 0u64;
        while off < total && result.is_ok() {
            let end = (off + part_size).min(total);
            in_flight.push(upload.put_part(slice_concat(&header, &payload, off, end)));
            off = end;
            while in_flight.len() >= PARTS_IN_FLIGHT || (off >= total && !in_flight.is_empty()) {
                if let Some(Err(e)) = in_flight.next().await {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(in_flight);
        let result = match result {
            Ok(()) => upload.complete().await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            upload.abort().await;
            return Err(e.into());
        }
        Ok(())
    }
}

/// Whether an object store error may go away if the request is repeated:
/// not one saying the request itself, the store or the credentials are
/// wrong. Unknown (future) variants count as transient.
fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::InvalidPath { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// Runs the recovery read `op` (described by `what`, for messages) until it
/// succeeds, fails with an error that is not transient, or has been tried
/// [`SCAN_ATTEMPTS`] times, backing off between tries. The error names
/// `what` and the number of tries.
async fn retry_transient<T, F, Fut>(what: impl Fn() -> String, mut op: F) -> TierResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    let mut backoff = SCAN_BACKOFF_FIRST;
    let mut attempt = 1;
    loop {
        let e = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if attempt >= SCAN_ATTEMPTS || !is_transient(&e) {
            let what = what();
            tracing::error!(error = %e, attempts = attempt, "object tier recovery: {what} failed");
            let attempts = if attempt == 1 { "attempt" } else { "attempts" };
            return Err(TierError::io(
                format!("object tier recovery: {what} failed after {attempt} {attempts}"),
                e.into(),
            ));
        }
        tracing::warn!(error = %e, attempt, retry_in = ?backoff, "object tier recovery: {} failed; retrying", what());
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(SCAN_BACKOFF_MAX);
        attempt += 1;
    }
}

/// Bytes `[start, end)` of `a ++ b` as a payload, without copying.
fn slice_concat(a: &Bytes, b: &Bytes, start: u64, end: u64) -> PutPayload {
    let (start, end, alen) = (start as usize, end as usize, a.len());
    let mut parts = Vec::with_capacity(2);
    if start < alen {
        parts.push(a.slice(start..end.min(alen)));
    }
    if end > alen {
        parts.push(b.slice(start.max(alen) - alen..end - alen));
    }
    PutPayload::from_iter(parts)
}

#[async_trait]
impl Tier for ObjectTier {
    fn kind(&self) -> TierKind {
        TierKind::Object
    }

    fn capacity(&self) -> u64 {
        self.cfg.capacity
    }

    fn used(&self) -> u64 {
        self.index.lock().used
    }

    fn len(&self) -> usize {
        self.index.lock().map.len()
    }

    fn footprint(&self, len: u64) -> u64 {
        len
    }

    async fn put(&self, key: &ObjectKey, block: &Block, sync: bool) -> TierResult<()> {
        TierError::check_header(key, &block.header)?;
        let len = block.payload.len() as u64;
        if block.header.length != len {
            return Err(Self::corrupt(
                key,
                format!(
                    "refusing to store: header length {} but payload of {len} bytes",
                    block.header.length
                ),
            ));
        }
        let cap = self.cfg.capacity;
        let need = self.footprint(len);
        if need > cap {
            return Err(TierError::TooLarge {
                tier: TierKind::Object,
                size: len,
                capacity: cap,
            });
        }
        let _key_guard = self.key_lock(key).lock().await;
        {
            let mut idx = self.index.lock();
            let old = idx.map.get(key).map_or(0, |e| self.footprint(e.header.length));
            let committed = idx.used + idx.reserved;
            if committed.saturating_add(need).saturating_sub(old) > cap {
                return Err(TierError::Full {
                    tier: TierKind::Object,
                    needed: need,
                    available: cap.saturating_sub(committed),
                    capacity: cap,
                });
            }
            idx.reserved += need;
        }
        // Given back if this future is dropped mid-upload (a client that
        // went away), or below under the same lock that counts it as used.
        let mut reserved = Reserved {
            index: &self.index,
            need,
            armed: true,
        };
        let path = self.path_for(key);
        let res = match block.header.encode(key) {
            Ok(header) => self.upload(&path, header, block.payload.clone(), sync).await,
            Err(source) => Err(TierError::InvalidHeader {
                key: key.to_string(),
                source,
            }),
        };
        let mut idx = self.index.lock();
        idx.reserved -= need;
        reserved.armed = false;
        res?;
        if let Some(old) = idx.insert(key.clone(), block.header.clone()) {
            idx.used -= self.footprint(old.header.length);
        }
        idx.used += need;
        Ok(())
    }

    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        let Some(version) = self.index.lock().map.get(key).map(|e| e.version) else {
            return Ok(None);
        };
        let path = self.path_for(key);
        let data = match self.store.get(&path).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let data = match data {
            Ok(d) => d,
            Err(object_store::Error::NotFound { .. }) => {
                self.forget_vanished(key, version).await;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let (header, found, hlen) =
            BlockHeader::decode(&data).map_err(|e| Self::corrupt(key, format!("header: {e}")))?;
        if found != *key {
            return Err(Self::corrupt(key, format!("header names object {found}")));
        }
        let block = Block {
            header,
            payload: data.slice(hlen..),
        };
        crate::offload(block.payload.len(), || block.verify()).map_err(|e| Self::corrupt(key, e.to_string()))?;
        Ok(Some(block))
    }

    async fn delete(&self, key: &ObjectKey) -> TierResult<bool> {
        if !self.index.lock().map.contains_key(key) {
            return Ok(false);
        }
        let _key_guard = self.key_lock(key).lock().await;
        if !self.index.lock().map.contains_key(key) {
            return Ok(false);
        }
        match self.store.delete(&self.path_for(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut idx = self.index.lock();
        match idx.map.remove(key) {
            Some(e) => {
                idx.used -= self.footprint(e.header.length);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.index.lock().map.contains_key(key)
    }

    async fn recover(&self) -> TierResult<Vec<(ObjectKey, BlockHeader)>> {
        let idx = self.index.lock();
        Ok(idx.map.iter().map(|(k, e)| (k.clone(), e.header.clone())).collect())
    }
}

/// Serde helper: a size as a number of bytes or a string like `"16MiB"`.
mod size {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes or a string such as \"16MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                parse(v).ok_or_else(|| E::custom(format!("invalid size {v:?}")))
            }
        }
        d.deserialize_any(V)
    }

    pub(super) fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unbounded") {
            return Some(u64::MAX);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

#[cfg(test)]
mod tests;
