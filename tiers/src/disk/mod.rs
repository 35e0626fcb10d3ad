//! G3, the local NVMe tier: objects in preallocated data files read and
//! written with O_DIRECT through an I/O engine (io_uring, or pread/pwrite
//! threads), an index in RocksDB that survives restarts, and an in-memory map
//! for lookups. This file owns the configuration and the [`Tier`]
//! implementation; the submodules own the pieces:
//!
//! - `files`: the data files (split, O_DIRECT, preallocation);
//! - `space`: per-file extent allocators and the extent guard lifecycle;
//! - `index`: the RocksDB index and its value encoding;
//! - `buf`: aligned buffers and the registered bounce-buffer pool;
//! - `engine`, `uring`, `psync`: the I/O engines behind one small trait.
//!
//! Ordering, for crash safety: a put writes the payload into a fresh extent,
//! waits for the write (and, for a durable put, an `fdatasync` of the file),
//! then writes the index entry (WAL synced for a durable put), then swaps the
//! in-memory entry and only then frees the old extent. An acknowledged put
//! therefore survives `kill -9`, and a durable one survives power loss. Reads
//! hold the extent they read until their I/O is done, so a concurrent delete
//! or overwrite can never hand that extent to another write while it is read.
//! Every read verifies length and xxh3 checksum.

mod buf;
mod engine;
mod files;
mod index;
mod psync;
mod space;
mod uring;

#[cfg(test)]
mod tests;

use crate::{Block, BlockHeader, ObjectKey, Tier, TierError, TierKind, TierResult};
use async_trait::async_trait;
use buf::{AlignedBuf, IoBuf};
use engine::{IoEngine, IoOp, RegisterMode};
use files::DataFiles;
use index::{Index, IndexRecord};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use space::{ExtentGuard, Space};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Smallest accepted capacity and data file size.
const MIN_SIZE: u64 = 1 << 20;
/// Largest accepted queue depth.
const MAX_QUEUE_DEPTH: u32 = 4096;
/// Stripes of the commit lock (index write + map swap per key).
const STRIPES: usize = 64;

/// How the disk tier issues I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngineKind {
    /// io_uring on a dedicated thread; opening fails if io_uring is unavailable.
    Uring,
    /// `pread` / `pwrite` on a few dedicated threads.
    Psync,
    /// io_uring where the kernel allows it, else psync (with a warning).
    #[default]
    Auto,
}

impl fmt::Display for IoEngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngineKind::Uring => "io_uring",
            IoEngineKind::Psync => "psync",
            IoEngineKind::Auto => "auto",
        })
    }
}

fn default_file_size() -> u64 {
    8 << 30
}
fn default_queue_depth() -> u32 {
    64
}
fn default_true() -> bool {
    true
}

/// Settings of the disk tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskTierConfig {
    /// Directory holding the data files (`data-NNNN.kvf`) and the index
    /// (`index/`); created if missing.
    pub dir: PathBuf,
    /// Bytes of object data the tier may hold; at least 1 MiB, rounded down
    /// to whole 4 KiB pages. Preallocated on open.
    pub capacity: u64,
    /// Largest data file, in bytes; at least 1 MiB; default 8 GiB. The
    /// capacity is split into files of this size (the last one smaller). An
    /// object must fit in one file.
    #[serde(default = "default_file_size")]
    pub file_size: u64,
    /// I/O requests in flight at once (the io_uring submission queue size);
    /// 1 to 4096; default 64. 32 or more keeps an NVMe device busy.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Which I/O engine to use; default `auto`.
    #[serde(default)]
    pub engine: IoEngineKind,
    /// Whether io_uring writes go through registered bounce buffers (2 MiB,
    /// pinned against RLIMIT_MEMLOCK; plain writes if the kernel refuses);
    /// default true.
    #[serde(default = "default_true")]
    pub registered_buffers: bool,
}

impl DiskTierConfig {
    /// A configuration with every default: 8 GiB files, queue depth 64,
    /// `Auto` engine, registered buffers on.
    pub fn new(dir: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            dir: dir.into(),
            capacity,
            file_size: default_file_size(),
            queue_depth: default_queue_depth(),
            engine: IoEngineKind::Auto,
            registered_buffers: true,
        }
    }

    /// Checks every bound; [`TierError::Config`] names the first one broken.
    pub fn validate(&self) -> TierResult<()> {
        let bad = |m: String| Err(TierError::Config(format!("disk tier: {m}")));
        if self.dir.as_os_str().is_empty() {
            return bad("dir is empty".into());
        }
        if self.capacity < MIN_SIZE {
            return bad(format!("capacity {} is below the minimum of 1 MiB", self.capacity));
        }
        if self.file_size < MIN_SIZE {
            return bad(format!("file-size {} is below the minimum of 1 MiB", self.file_size));
        }
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return bad(format!(
                "queue-depth {} is outside 1..={MAX_QUEUE_DEPTH}",
                self.queue_depth
            ));
        }
        Ok(())
    }
}

/// A committed object: its header and the extent holding its payload. Reads
/// clone the `Arc`, which keeps the extent allocated until they finish.
#[derive(Debug)]
struct Stored {
    header: BlockHeader,
    extent: Arc<ExtentGuard>,
    /// Its index entry is on stable storage (put with `sync`, or found at
    /// open). Replacing or removing it is then synced too, before its
    /// extent can be reused: otherwise a crash could bring the entry back
    /// pointing at another object's bytes.
    durable: bool,
}

struct Inner {
    dir: PathBuf,
    space: Arc<Space>,
    files: Arc<DataFiles>,
    index: Index,
    map: RwLock<HashMap<ObjectKey, Arc<Stored>>>,
    /// Serialises index write + map swap per key, so the index and the map
    /// always agree on which extent a key owns.
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
    /// Declared last: dropped (threads joined) after nothing else needs it.
    engine: Box<dyn IoEngine>,
}

/// The local-disk tier (G3). See the module docs for its layout and ordering.
pub struct DiskTier {
    inner: Arc<Inner>,
}

impl fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.inner.dir)
            .field("engine", &self.inner.engine.kind())
            .field("o_direct", &self.inner.files.direct())
            .field("registered_buffers", &self.inner.engine.registered_buffers())
            .field("capacity", &self.inner.space.capacity())
            .field("used", &self.inner.space.used())
            .field("objects", &self.inner.map.read().len())
            .finish()
    }
}

impl DiskTier {
    /// Opens the tier in `cfg.dir`: creates and preallocates the data files,
    /// opens the index, rebuilds the in-memory map from it (dropping, with a
    /// warning, entries that cannot be decoded, are out of range or overlap
    /// another) and starts the I/O engine.
    pub fn open(cfg: DiskTierConfig) -> TierResult<DiskTier> {
        let register = if cfg.registered_buffers {
            RegisterMode::On
        } else {
            RegisterMode::Off
        };
        Self::open_with(cfg, register, true)
    }

    /// `open` with the fallbacks forced where tests ask: `register` says how
    /// to register bounce buffers, `try_direct: false` skips O_DIRECT.
    fn open_with(cfg: DiskTierConfig, register: RegisterMode, try_direct: bool) -> TierResult<DiskTier> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.dir).map_err(|e| TierError::io(format!("creating {}", cfg.dir.display()), e))?;
        // The index first: its lock file keeps a second process (or tier)
        // off this directory before any data file is touched.
        let index = Index::open(&cfg.dir.join("index"))?;
        let files = Arc::new(DataFiles::open(&cfg.dir, cfg.capacity, cfg.file_size, try_direct)?);
        let space = Space::new(files.sizes());
        let map = recover_map(&index, &space)?;
        let engine = engine::start(cfg.engine, files.clone(), cfg.queue_depth, register)?;
        tracing::info!(
            dir = %cfg.dir.display(),
            engine = %engine.kind(),
            o_direct = files.direct(),
            registered_buffers = engine.registered_buffers(),
            queue_depth = cfg.queue_depth,
            capacity = space.capacity(),
            files = files.count(),
            objects = map.len(),
            used = space.used(),
            "disk tier open"
        );
        let inner = Inner {
            dir: cfg.dir,
            space,
            files,
            index,
            map: RwLock::new(map),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
            engine,
        };
        Ok(DiskTier { inner: Arc::new(inner) })
    }

    /// The engine in use (`Uring` or `Psync`, never `Auto`).
    pub fn engine(&self) -> IoEngineKind {
        self.inner.engine.kind()
    }

    /// Whether the data files are open with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.inner.files.direct()
    }

    /// Whether writes use buffers registered with the io_uring ring.
    pub fn registered_buffers(&self) -> bool {
        self.inner.engine.registered_buffers()
    }

    /// The tier's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    #[cfg(test)]
    fn location(&self, key: &ObjectKey) -> Option<(PathBuf, crate::Extent)> {
        let map = self.inner.map.read();
        let s = map.get(key)?;
        Some((files::data_path(&self.inner.dir, s.extent.file()), s.extent.extent()))
    }
}

/// Rebuilds the map from the index, re-claiming every extent.
fn recover_map(index: &Index, space: &Arc<Space>) -> TierResult<HashMap<ObjectKey, Arc<Stored>>> {
    let mut map = HashMap::new();
    let mut dropped = 0usize;
    let mut outside = Vec::new();
    for (raw, rec) in index.load()? {
        // An entry past the configured space is not damage: the space was
        // configured smaller than when it was written. Its data is still
        // in the files, so it is kept and the tier refuses to open below.
        if let Ok((_, r)) = &rec
            && !space.contains(r.file as usize, r.extent)
        {
            outside.push((r.file, r.extent));
            continue;
        }
        let claimed = rec.and_then(|(key, rec)| {
            if rec.extent.len != Space::footprint(rec.header.length) {
                return Err(format!(
                    "extent of {} bytes does not fit a payload of {}",
                    rec.extent.len, rec.header.length
                ));
            }
            match space.reserve(rec.file as usize, rec.extent) {
                Some(g) => Ok((
                    key,
                    Stored {
                        header: rec.header,
                        extent: Arc::new(g),
                        durable: true,
                    },
                )),
                None => Err(format!(
                    "extent {:?} in file {} is out of range or overlaps another object",
                    rec.extent, rec.file
                )),
            }
        });
        match claimed {
            Ok((key, stored)) => {
                map.insert(key, Arc::new(stored));
            }
            Err(reason) => {
                tracing::warn!(index_key = %hex::encode(&raw), %reason, "dropping disk index entry");
                index.delete_raw(&raw)?;
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, kept = map.len(), "disk index recovered with dropped entries");
    }
    if let Some((file, extent)) = outside.first() {
        return Err(TierError::Config(format!(
            "{} stored objects lie beyond the configured disk space (the first in data file {file} at \
             bytes {}..{}): disk.capacity or disk.file-size is smaller than when they were written. \
             Restore the earlier settings, or empty the disk tier's directory to start afresh; \
             nothing was deleted",
            outside.len(),
            extent.offset,
            extent.offset + extent.len
        )));
    }
    Ok(map)
}

impl Inner {
    fn stripe(&self, key: &ObjectKey) -> &Mutex<()> {
        &self.stripes[self.hasher.hash_one(key) as usize % self.stripes.len()]
    }

    fn data_path(&self, file: usize) -> String {
        files::data_path(&self.dir, file).display().to_string()
    }

    /// Index write, then map swap, then (after the locks) the old extent is
    /// released. Runs on a blocking thread, and runs to the end even if the
    /// put that started it is dropped, so index and map never disagree.
    fn commit(&self, key: ObjectKey, header: BlockHeader, extent: Arc<ExtentGuard>, sync: bool) -> TierResult<()> {
        let rec = IndexRecord {
            file: extent.file() as u32,
            extent: extent.extent(),
            header,
        };
        let stripe = self.stripe(&key).lock();
        let replaces_durable = self.map.read().get(&key).is_some_and(|s| s.durable);
        self.index.put(&key, &rec, sync || replaces_durable)?;
        let old = self.map.write().insert(
            key,
            Arc::new(Stored {
                header: rec.header,
                extent,
                durable: sync || replaces_durable,
            }),
        );
        drop(stripe);
        drop(old);
        Ok(())
    }

    /// Index delete (synced when the entry was durable), then map removal;
    /// `false` if the key is absent.
    fn remove(&self, key: &ObjectKey) -> TierResult<bool> {
        let stripe = self.stripe(key).lock();
        let Some(durable) = self.map.read().get(key).map(|s| s.durable) else {
            return Ok(false);
        };
        self.index.delete(key, durable)?;
        let old = self.map.write().remove(key);
        drop(stripe);
        drop(old);
        Ok(true)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> TierResult<T> + Send + 'static) -> TierResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TierError::Unavailable(format!("disk index task failed: {e}")))?
}

#[async_trait]
impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }

    fn capacity(&self) -> u64 {
        self.inner.space.capacity()
    }

    fn used(&self) -> u64 {
        self.inner.space.used()
    }

    fn len(&self) -> usize {
        self.inner.map.read().len()
    }

    fn footprint(&self, len: u64) -> u64 {
        Space::footprint(len)
    }

    async fn put(&self, key: &ObjectKey, block: &Block, sync: bool) -> TierResult<()> {
        TierError::check_header(key, &block.header)?;
        let inner = &self.inner;
        let len = block.payload.len() as u64;
        if block.header.length != len {
            return Err(TierError::Corrupt {
                tier: TierKind::Disk,
                key: key.to_string(),
                reason: format!("header says {} bytes, payload has {len}", block.header.length),
            });
        }
        let need = Space::footprint(len);
        let capacity = inner.space.capacity();
        if need > inner.space.max_extent() {
            return Err(TierError::TooLarge {
                tier: TierKind::Disk,
                size: len,
                capacity,
            });
        }
        let Some(extent) = inner.space.alloc(need) else {
            return Err(TierError::Full {
                tier: TierKind::Disk,
                needed: need,
                available: capacity.saturating_sub(inner.space.used()),
                capacity,
            });
        };
        let extent = Arc::new(extent);
        let (file, offset) = (extent.file(), extent.extent().offset);
        // A page-aligned, whole-page payload (a host-arena slot on its way
        // down) goes to the device as is; anything else through a bounce buffer.
        let buf = match IoBuf::shared(&block.payload) {
            Some(b) => b,
            None => {
                let mut b = inner.engine.write_buf(need as usize);
                crate::offload(need as usize, || b.fill(&block.payload, need as usize));
                b
            }
        };
        // The write request keeps its own clone of the extent: if this future
        // is dropped mid-write, the extent stays allocated until the kernel is done.
        let done = inner
            .engine
            .submit(IoOp::write(file, offset, need as usize, buf, extent.clone()))
            .await?;
        done.result
            .map_err(|e| TierError::io(format!("writing {key} to {}", inner.data_path(file)), e))?;
        drop(done.op); // the write request's extent clone and buffer
        if sync {
            let done = inner.engine.submit(IoOp::data_sync(file)).await?;
            done.result
                .map_err(|e| TierError::io(format!("syncing {}", inner.data_path(file)), e))?;
        }
        let (inner, key, header) = (self.inner.clone(), key.clone(), block.header.clone());
        blocking(move || inner.commit(key, header, extent, sync)).await
    }

    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        let inner = &self.inner;
        let Some(stored) = inner.map.read().get(key).cloned() else {
            return Ok(None);
        };
        let (file, ext) = (stored.extent.file(), stored.extent.extent());
        let buf = IoBuf::Owned(AlignedBuf::uninit(ext.len as usize));
        // The read keeps the entry (and so its extent) alive until it is done.
        let done = inner
            .engine
            .submit(IoOp::read(file, ext.offset, buf, stored.clone()))
            .await?;
        done.result
            .map_err(|e| TierError::io(format!("reading {key} from {}", inner.data_path(file)), e))?;
        let buf = done
            .op
            .buf
            .and_then(IoBuf::into_owned)
            .ok_or_else(|| TierError::Unavailable("disk engine lost a read buffer".into()))?;
        // SAFETY: the engine reported all `ext.len` bytes (the buffer's
        // length) read, so every byte is initialised.
        let payload = unsafe { buf.into_bytes((stored.header.length as usize).min(ext.len as usize)) };
        let block = Block {
            header: stored.header.clone(),
            payload,
        };
        crate::offload(block.payload.len(), || block.verify()).map_err(|e| TierError::Corrupt {
            tier: TierKind::Disk,
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(block))
    }

    async fn delete(&self, key: &ObjectKey) -> TierResult<bool> {
        if !self.contains(key) {
            return Ok(false);
        }
        let (inner, key) = (self.inner.clone(), key.clone());
        blocking(move || inner.remove(&key)).await
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.inner.map.read().contains_key(key)
    }

    /// Everything in the tier now: right after `open`, exactly what the
    /// index held (less the entries dropped as invalid).
    async fn recover(&self) -> TierResult<Vec<(ObjectKey, BlockHeader)>> {
        Ok(self
            .inner
            .map
            .read()
            .iter()
            .map(|(k, s)| (k.clone(), s.header.clone()))
            .collect())
    }
}
