#![doc = include_str!("../README.md")]

mod alloc;
mod block;
mod clock;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
mod cpu;
mod disk;
mod error;
#[cfg(feature = "cuda")]
mod hbm;
mod host;
mod object;
mod policy;
mod slots;
mod stack;
mod tier;

pub use alloc::{Extent, ExtentAllocator};
pub use block::{
    Block, BlockHeader, CHECKSUM_PENDING, HeaderError, Layout, MAX_KEY_LEN, MAX_LAYOUT_STR, ObjectKey, checksum,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use cpu::{OFFLOAD_BYTES, offload};
pub use disk::{DiskTier, DiskTierConfig, IoEngineKind};
pub use error::{TierError, TierResult};
#[cfg(feature = "cuda")]
pub use hbm::HbmTier;
pub use host::{HostLease, HostReservation, HostTier};
pub use object::{ObjectTier, ObjectTierConfig};
pub use policy::{EvictionPolicy, LruPolicy};
pub use stack::{
    BackgroundConfig, BackgroundHandle, Durability, ExistsEntry, Located, StackEvent, StackEventKind, StackMetrics,
    TierStack, TierStats,
};
pub use tier::{Tier, TierKind};

/// Tries to create the GPU HBM tier: `Ok(None)` when this build has no `cuda`
/// feature or the machine has no usable GPU (the reason is logged), so a node
/// without a GPU starts normally. With a GPU, `pin` (the host tier) is
/// page-locked for DMA; a failure to pin is logged and the tier still works.
pub fn try_hbm_tier(
    capacity: u64,
    device: usize,
    pin: Option<std::sync::Arc<HostTier>>,
) -> TierResult<Option<std::sync::Arc<dyn Tier>>> {
    #[cfg(feature = "cuda")]
    {
        match hbm::HbmTier::try_new(capacity, device)? {
            Some(t) => {
                if let Some(host) = pin
                    && let Err(e) = t.pin_host_arena(host)
                {
                    tracing::warn!(error = %e, "host arena not page-locked; GPU copies go through staging");
                }
                Ok(Some(std::sync::Arc::new(t)))
            }
            None => Ok(None),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (capacity, device, pin);
        tracing::info!("GPU HBM tier not available: kvfabric was built without the `cuda` feature");
        Ok(None)
    }
}
