//! The `Tier` trait: the one seam every storage medium implements (host
//! arena, disk, object store, GPU memory). Tiers are simple keyed stores with
//! a hard capacity; placement, eviction, demotion, promotion and leases live
//! in the tier stack above them.

use crate::{Block, BlockHeader, ObjectKey, TierResult};
use async_trait::async_trait;
use std::fmt;

/// Which medium a tier stores on; also its rank (fastest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// G1: GPU HBM.
    Hbm,
    /// G2: host memory.
    Host,
    /// G3: local NVMe.
    Disk,
    /// G4: object store.
    Object,
}

impl TierKind {
    /// All kinds, fastest first.
    pub const ALL: [TierKind; 4] = [TierKind::Hbm, TierKind::Host, TierKind::Disk, TierKind::Object];
    /// Lower-case name used in metrics labels, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TierKind::Hbm => "hbm",
            TierKind::Host => "host",
            TierKind::Disk => "disk",
            TierKind::Object => "object",
        }
    }
    /// Whether the medium survives a process restart.
    pub fn is_persistent(self) -> bool {
        matches!(self, TierKind::Disk | TierKind::Object)
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A storage medium with a fixed capacity.
///
/// Contract (checked by [`crate::conformance`]):
/// - `put` stores or replaces the object atomically: a concurrent `get` sees
///   the old or the new object, never a mix; it fails with
///   [`crate::TierError::Full`] when there is no room right now and
///   [`crate::TierError::TooLarge`] when there never will be; a failed put
///   leaves the tier as it was. `put` must not keep `block.payload` (or a
///   slice of it) once it returns: payloads read from the host tier are
///   zero-copy views of arena slots, and a retained view would pin that
///   arena space for good.
/// - `get` returns exactly the bytes put; persistent tiers verify the
///   checksum and return [`crate::TierError::Corrupt`] on mismatch.
/// - `used` is the sum of `footprint` over stored objects.
/// - persistent tiers return their objects from `recover` after a restart.
#[async_trait]
pub trait Tier: Send + Sync + fmt::Debug + 'static {
    /// The medium.
    fn kind(&self) -> TierKind;
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// Bytes occupied (sum of footprints).
    fn used(&self) -> u64;
    /// Number of objects stored.
    fn len(&self) -> usize;
    /// Whether the tier holds no objects.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes an object with a payload of `len` bytes would occupy here.
    fn footprint(&self, len: u64) -> u64;
    /// Stores `block` under `key`; with `sync`, returns only once the bytes
    /// are durable on the medium (meaningful for persistent tiers).
    async fn put(&self, key: &ObjectKey, block: &Block, sync: bool) -> TierResult<()>;
    /// Reads an object.
    async fn get(&self, key: &ObjectKey) -> TierResult<Option<Block>>;
    /// Removes an object; returns whether it existed.
    async fn delete(&self, key: &ObjectKey) -> TierResult<bool>;
    /// Whether the object is present (from the in-memory index, no I/O).
    fn contains(&self, key: &ObjectKey) -> bool;
    /// The host-memory tier behind this trait object, if it is one (the
    /// zero-copy local path needs its arena).
    fn as_host(&self) -> Option<&crate::HostTier> {
        None
    }
    /// Objects present when the tier was opened (persistent tiers), with their
    /// headers, so the stack can rebuild its index after a restart.
    async fn recover(&self) -> TierResult<Vec<(ObjectKey, BlockHeader)>>;
}
