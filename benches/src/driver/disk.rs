//! The disk-tier workload: kvfabric's [`DiskTier`] called directly (no
//! gRPC, no tier stack), so its throughput can be set against fio's on the
//! same file system with the same block size and queue depth. Puts are not
//! synced (like fio's `direct=1` without fsync); every get is checksummed by
//! the tier and compared byte for byte by the driver.

use super::{Store, key_bytes};
use anyhow::Context;
use bytes::Bytes;
use kvfabric_bench::payload::Payload;
use kvfabric_tiers::{Block, BlockHeader, DiskTier, DiskTierConfig, IoEngineKind, Layout, ObjectKey, Tier};
use std::path::Path;
use std::sync::Arc;

/// The disk tier under one namespace.
#[derive(Debug)]
pub(crate) struct DiskStore {
    tier: Arc<DiskTier>,
    namespace: Arc<str>,
}

/// Opens a disk tier of `capacity` bytes in `dir` (blocking: preallocates).
pub(crate) fn open(dir: &Path, capacity: u64, queue_depth: u32, engine: IoEngineKind) -> anyhow::Result<Arc<DiskTier>> {
    let mut cfg = DiskTierConfig::new(dir, capacity);
    cfg.queue_depth = queue_depth;
    cfg.engine = engine;
    let tier = DiskTier::open(cfg).with_context(|| format!("opening the disk tier in {}", dir.display()))?;
    Ok(Arc::new(tier))
}

impl DiskStore {
    /// Uses `tier` with keys in `namespace`.
    pub(crate) fn new(tier: Arc<DiskTier>, namespace: &str) -> Self {
        Self {
            tier,
            namespace: namespace.into(),
        }
    }

    fn key(&self, worker: usize, key: u64) -> ObjectKey {
        ObjectKey::new(self.namespace.clone(), key_bytes(worker, key))
    }

    /// Deletes keys `0..written[w]` of every worker `w`.
    pub(crate) async fn clear(&self, written: &[u64]) -> anyhow::Result<()> {
        for (w, &n) in written.iter().enumerate() {
            for k in 0..n {
                self.tier.delete(&self.key(w, k)).await?;
            }
        }
        Ok(())
    }
}

impl Store for DiskStore {
    async fn put(&self, worker: usize, key: u64, value: &Payload) -> anyhow::Result<()> {
        let block = Block {
            header: BlockHeader {
                length: value.bytes.len() as u64,
                checksum: value.checksum,
                created_ms: 0,
                layout: Layout::default(),
            },
            payload: value.bytes.clone(),
        };
        self.tier.put(&self.key(worker, key), &block, false).await?;
        Ok(())
    }

    async fn get(&self, worker: usize, key: u64) -> anyhow::Result<Option<Bytes>> {
        Ok(self.tier.get(&self.key(worker, key)).await?.map(|b| b.payload))
    }
}
