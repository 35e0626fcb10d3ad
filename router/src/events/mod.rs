//! Events in: what engines and fabric nodes say they store and drop, turned
//! into [`PrefixIndex`] updates.
//!
//! - [`EngineTracker`] (one per engine worker) applies vLLM KV events
//!   ([`vllm`]). Block identity is recomputed from `token_ids` with the
//!   fabric's canonical chained hash, so an engine's own hash scheme never
//!   matters; the tracker maps the engine's hashes to ours (parents and
//!   removals name only engine hashes).
//! - [`FabricTracker`] (one per fabric node) applies the node's `Subscribe`
//!   stream, whose keys are already canonical block hashes.
//! - [`SeqTracker`] watches sequence numbers; a gap means lost events, and
//!   the holder is resynchronised (its entries dropped, so the router never
//!   routes on blocks that may be gone) and counted.
//!
//! Malformed events are counted in [`EventCounters`] and logged, and never
//! touch the index.

pub mod vllm;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kvfabric::hash::{BlockHash, block_hash};
use kvfabric_proto::v1::{Event as FabricEvent, EventKind};

use crate::index::{BlockId, HolderId, PrefixIndex, Tier, TierMask, block_id};
use vllm::{EngineEvent, EngineHash};

/// Counters of event ingestion, shared by every tracker of a router.
#[derive(Debug, Default)]
pub struct EventCounters {
    /// Events applied.
    pub applied: AtomicU64,
    /// Blocks stored by applied events.
    pub blocks_stored: AtomicU64,
    /// Blocks removed by applied events.
    pub blocks_removed: AtomicU64,
    /// Payloads or events that did not decode.
    pub malformed: AtomicU64,
    /// Stored events whose block size is not the router's.
    pub wrong_block_size: AtomicU64,
    /// Stored events without the tokens their hashes need.
    pub missing_tokens: AtomicU64,
    /// Stored events whose parent the router never saw.
    pub unknown_parent: AtomicU64,
    /// Events for a medium the router does not know.
    pub unknown_medium: AtomicU64,
    /// Sequence gaps and lagged streams (each one resynchronises a holder).
    pub gaps: AtomicU64,
}

impl EventCounters {
    fn bump(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// Why an engine event was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The event's block size differs from the router's.
    #[error("block size {got} differs from the router's {want}")]
    WrongBlockSize {
        /// In the event.
        got: usize,
        /// Configured.
        want: usize,
    },
    /// Token count does not match `hashes x block_size`.
    #[error("{hashes} block hashes need {need} token ids, got {got}")]
    MissingTokens {
        /// Hashes in the event.
        hashes: usize,
        /// Tokens needed.
        need: usize,
        /// Tokens given.
        got: usize,
    },
    /// The parent hash was never stored (or was evicted): identity unknown.
    #[error("parent block {0:#x} is unknown")]
    UnknownParent(EngineHash),
    /// `medium` is not one the router maps to a tier.
    #[error("unknown medium {0:?}")]
    UnknownMedium(String),
}

/// The tier an engine's `medium` names (`None`/`GPU` = HBM).
pub fn medium_tier(medium: Option<&str>) -> Result<Tier, ApplyError> {
    match medium.map(|m| m.to_ascii_lowercase()) {
        None => Ok(Tier::Hbm),
        Some(m) => match m.as_str() {
            "gpu" | "hbm" | "cuda" => Ok(Tier::Hbm),
            "cpu" | "host" | "cpu_pinned" => Ok(Tier::Host),
            "disk" | "nvme" | "ssd" => Ok(Tier::Disk),
            "object" | "s3" => Ok(Tier::Object),
            _ => Err(ApplyError::UnknownMedium(m)),
        },
    }
}

/// What a sequence number says about the stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SeqStatus {
    /// The first message, or the one after the last.
    InOrder,
    /// `missed` messages were lost in between.
    Gap {
        /// How many.
        missed: u64,
    },
    /// A repeat or an older message (dropped), or the publisher restarted
    /// (a lower number after a long run: treated as a gap by the caller).
    Stale,
}

/// Sequence-number bookkeeping for one stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTracker {
    last: Option<u64>,
}

impl SeqTracker {
    /// Records `seq` and says how it relates to the previous one.
    pub fn observe(&mut self, seq: u64) -> SeqStatus {
        let st = match self.last {
            None => SeqStatus::InOrder,
            Some(l) if seq == l.wrapping_add(1) => SeqStatus::InOrder,
            Some(l) if seq > l => SeqStatus::Gap { missed: seq - l - 1 },
            Some(_) => return SeqStatus::Stale,
        };
        self.last = Some(seq);
        st
    }

    /// Forgets the stream (after a publisher restart).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

/// Applies one engine worker's events to the index.
#[derive(Debug)]
pub struct EngineTracker {
    holder: HolderId,
    salt: u64,
    block_tokens: usize,
    index: Arc<dyn PrefixIndex>,
    counters: Arc<EventCounters>,
    /// Engine hash -> canonical id, for every block the engine holds.
    /// The engine's hash of each block it holds: our id, and the tiers
    /// its copies are in (the mapping goes with the last copy).
    ids: HashMap<EngineHash, (BlockHash, TierMask)>,
    seq: SeqTracker,
}

impl EngineTracker {
    /// A tracker for `holder`, hashing with `salt` (the fabric namespace's)
    /// at `block_tokens` tokens per block.
    pub fn new(
        holder: HolderId,
        salt: u64,
        block_tokens: usize,
        index: Arc<dyn PrefixIndex>,
        counters: Arc<EventCounters>,
    ) -> Self {
        EngineTracker {
            holder,
            salt,
            block_tokens,
            index,
            counters,
            ids: HashMap::new(),
            seq: SeqTracker::default(),
        }
    }

    /// The holder this tracker feeds.
    pub fn holder(&self) -> HolderId {
        self.holder
    }

    /// Handles one published message: checks its sequence number
    /// (resynchronising on a gap), decodes the payload and applies it.
    /// Returns the sequence status.
    pub fn on_message(&mut self, seq: u64, payload: &[u8]) -> SeqStatus {
        let st = self.seq.observe(seq);
        match st {
            SeqStatus::Stale => return st,
            SeqStatus::Gap { missed } => {
                tracing::warn!(holder = %self.holder, missed, "engine events lost: resynchronising");
                self.resync();
            }
            SeqStatus::InOrder => {}
        }
        match vllm::decode_batch(payload) {
            Ok(batch) => {
                for e in &batch.errors {
                    tracing::warn!(holder = %self.holder, error = %e, "malformed engine event skipped");
                }
                self.counters.bump(&self.counters.malformed, batch.errors.len() as u64);
                for ev in &batch.events {
                    if let Err(e) = self.apply(ev) {
                        tracing::warn!(holder = %self.holder, error = %e, "engine event not applied");
                    }
                }
            }
            Err(e) => {
                self.counters.bump(&self.counters.malformed, 1);
                tracing::warn!(holder = %self.holder, error = %e, "malformed engine payload skipped");
            }
        }
        st
    }

    /// The publisher restarted (its sequence went backwards) or the
    /// connection was re-established: resynchronises and forgets the
    /// sequence, so the next message starts a new stream.
    pub fn restart(&mut self) {
        self.resync();
        self.seq.reset();
    }

    /// Drops everything known about the engine (lost events, restart).
    pub fn resync(&mut self) {
        self.counters.bump(&self.counters.gaps, 1);
        self.ids.clear();
        self.index.clear(self.holder, None);
    }

    /// Applies one decoded event.
    pub fn apply(&mut self, ev: &EngineEvent) -> Result<(), ApplyError> {
        let r = self.apply_inner(ev);
        let c = &self.counters;
        match &r {
            Ok(()) => c.bump(&c.applied, 1),
            Err(ApplyError::WrongBlockSize { .. }) => c.bump(&c.wrong_block_size, 1),
            Err(ApplyError::MissingTokens { .. }) => c.bump(&c.missing_tokens, 1),
            Err(ApplyError::UnknownParent(_)) => c.bump(&c.unknown_parent, 1),
            Err(ApplyError::UnknownMedium(_)) => c.bump(&c.unknown_medium, 1),
        }
        r
    }

    fn apply_inner(&mut self, ev: &EngineEvent) -> Result<(), ApplyError> {
        match ev {
            EngineEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
            } => {
                let tier = medium_tier(medium.as_deref())?;
                if *block_size != self.block_tokens {
                    return Err(ApplyError::WrongBlockSize {
                        got: *block_size,
                        want: self.block_tokens,
                    });
                }
                let need = block_hashes.len() * block_size;
                if token_ids.len() != need {
                    return Err(ApplyError::MissingTokens {
                        hashes: block_hashes.len(),
                        need,
                        got: token_ids.len(),
                    });
                }
                let mut parent = match parent_block_hash {
                    None => None,
                    Some(p) => Some(self.ids.get(p).ok_or(ApplyError::UnknownParent(*p))?.0),
                };
                let lora = lora_id.map(|l| l.to_le_bytes());
                let extra: Vec<&[u8]> = lora.iter().map(|l| &l[..]).collect();
                let mut ids = Vec::with_capacity(block_hashes.len());
                for (h, toks) in block_hashes.iter().zip(token_ids.chunks_exact(*block_size)) {
                    let id = block_hash(self.salt, parent.as_ref(), toks, &extra);
                    let e = self.ids.entry(*h).or_insert((id, TierMask::EMPTY));
                    // A hash reused for other tokens (the engine's choice)
                    // names the new block in every tier it is stored in now.
                    if e.0 != id {
                        *e = (id, TierMask::EMPTY);
                    }
                    e.1 = e.1.with(tier);
                    ids.push(u128::from_le_bytes(id));
                    parent = Some(id);
                }
                self.counters.bump(&self.counters.blocks_stored, ids.len() as u64);
                self.index.store(self.holder, tier, &ids);
                Ok(())
            }
            EngineEvent::BlockRemoved { block_hashes, medium } => {
                let tier = medium_tier(medium.as_deref())?;
                // The engine-hash mapping stays while any tier holds the
                // block: a CPU-offloaded copy can outlive the GPU one.
                let ids: Vec<BlockId> = block_hashes
                    .iter()
                    .filter_map(|h| {
                        let e = self.ids.get_mut(h)?;
                        let id = u128::from_le_bytes(e.0);
                        e.1 = e.1.without(TierMask::of(tier));
                        if e.1.is_empty() {
                            self.ids.remove(h);
                        }
                        Some(id)
                    })
                    .collect();
                self.counters.bump(&self.counters.blocks_removed, ids.len() as u64);
                self.index.remove(self.holder, Some(tier), &ids);
                Ok(())
            }
            EngineEvent::AllBlocksCleared { medium } => {
                let tier = match medium {
                    None => None,
                    Some(m) => Some(medium_tier(Some(m))?),
                };
                match tier {
                    None => self.ids.clear(),
                    Some(t) => self.ids.retain(|_, e| {
                        e.1 = e.1.without(TierMask::of(t));
                        !e.1.is_empty()
                    }),
                }
                self.index.clear(self.holder, tier);
                Ok(())
            }
        }
    }
}

/// Applies one fabric node's `Subscribe` stream to the index.
#[derive(Debug)]
pub struct FabricTracker {
    holder: HolderId,
    namespace: String,
    index: Arc<dyn PrefixIndex>,
    counters: Arc<EventCounters>,
}

impl FabricTracker {
    /// A tracker for fabric node `holder`, following `namespace`.
    pub fn new(holder: HolderId, namespace: String, index: Arc<dyn PrefixIndex>, counters: Arc<EventCounters>) -> Self {
        FabricTracker {
            holder,
            namespace,
            index,
            counters,
        }
    }

    /// The holder this tracker feeds.
    pub fn holder(&self) -> HolderId {
        self.holder
    }

    /// Applies one event. Keys that are not 16-byte block hashes and events
    /// of other namespaces are skipped (counted as malformed when the key
    /// is the problem). Returns false when the stream lost events (LAGGED):
    /// the node's blocks are dropped, and the caller should subscribe again
    /// from a snapshot.
    pub fn apply(&self, ev: &FabricEvent) -> bool {
        let c = &self.counters;
        let kind = EventKind::try_from(ev.kind).unwrap_or(EventKind::Unspecified);
        if kind == EventKind::Lagged {
            tracing::warn!(holder = %self.holder, lost = ev.lagged, "fabric events lost: resynchronising");
            self.resync();
            return false;
        }
        if kind == EventKind::SnapshotDone {
            tracing::debug!(holder = %self.holder, "fabric snapshot applied");
            return true;
        }
        if ev.namespace != self.namespace {
            return true;
        }
        let tier = kvfabric_proto::v1::Tier::try_from(ev.tier)
            .ok()
            .and_then(Tier::from_proto);
        let mut ids = Vec::with_capacity(ev.keys.len());
        for k in &ev.keys {
            match block_id(k) {
                Some(id) => ids.push(id),
                None => c.bump(&c.malformed, 1),
            }
        }
        match (kind, tier) {
            (EventKind::Stored, Some(t)) => {
                c.bump(&c.blocks_stored, ids.len() as u64);
                self.index.store(self.holder, t, &ids);
            }
            (EventKind::Removed, t) => {
                c.bump(&c.blocks_removed, ids.len() as u64);
                self.index.remove(self.holder, t, &ids);
            }
            (EventKind::Cleared, _) => self.index.clear(self.holder, None),
            _ => {
                c.bump(&c.malformed, 1);
                return true;
            }
        }
        c.bump(&c.applied, 1);
        true
    }

    /// Drops everything known about the node (lagged stream, reconnect).
    pub fn resync(&self) {
        self.counters.bump(&self.counters.gaps, 1);
        self.index.clear(self.holder, None);
    }
}

#[cfg(test)]
mod tests;
