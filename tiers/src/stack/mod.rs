//! The tier stack: one index over every tier of a node, fastest first.
//!
//! - **Admission**: a put lands in the fastest tier the object can fit in;
//!   `disk`/`object` durability also writes the durable copy (synced) before
//!   acknowledging.
//! - **Eviction and demotion**: when a tier is full, the eviction policy
//!   picks victims (skipping leased objects); each victim moves to the next
//!   tier with room and is dropped only when no lower tier can take it.
//! - **Promotion**: a hit in a slower tier is copied into the fastest tier;
//!   the slower copy stays (so a later eviction from the fast tier is free).
//! - **Verification**: a read that fails its checksum is counted, logged,
//!   deleted from that tier and treated as a miss there.
//! - **Missing copies**: a tier that no longer has a copy the index places
//!   there (removed behind the stack's back, e.g. an object deleted from the
//!   bucket) is a miss there, and the index forgets that copy (and the key,
//!   if it was the last one), so listings and later reads stop naming it.
//! - **Events and counters** for every placement and removal.
//!
//! With [`TierStack::start_background`], demotion and promotion move off the
//! request path: a demoter per stack keeps each tier below a high watermark
//! (so puts rarely find a tier full and evict inline), and hits in slower
//! tiers queue their promotion instead of waiting for it.
//!
//! Per-key operations are serialised by striped async locks; victims whose
//! stripe is busy are skipped rather than waited for, so eviction can never
//! deadlock against the put that triggered it.

use crate::{
    Block, BlockHeader, CHECKSUM_PENDING, Clock, EvictionPolicy, LruPolicy, ObjectKey, Tier, TierError, TierKind,
    TierResult,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::broadcast;

const STRIPES: usize = 1024;
const EVICT_BATCH: usize = 64;

/// How durable a put must be before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged once in the fastest tier with room (default).
    #[default]
    Memory,
    /// Acknowledged once synced to the disk tier.
    Disk,
    /// Acknowledged once in the object store.
    Object,
}

impl Durability {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::Disk => "disk",
            Durability::Object => "object",
        }
    }
}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackEventKind {
    /// Stored in a tier.
    Stored,
    /// Removed from a tier.
    Removed,
    /// A whole namespace was cleared (key is empty).
    Cleared,
}

/// One placement change.
#[derive(Clone, Debug)]
pub struct StackEvent {
    /// Kind.
    pub kind: StackEventKind,
    /// Object (for `Cleared`, a key with empty bytes in the namespace).
    pub key: ObjectKey,
    /// Tier concerned (for `Cleared`, the fastest tier).
    pub tier: TierKind,
}

/// `exists_prefix` answer for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistsEntry {
    /// Fastest tier holding the key.
    pub tier: TierKind,
    /// Payload length.
    pub len: u64,
}

/// Counters of one tier.
#[derive(Debug, Default)]
pub struct StackMetrics {
    /// Reads served by this tier.
    pub hits: AtomicU64,
    /// Reads that looked in this tier and did not find the object.
    pub misses: AtomicU64,
    /// Objects evicted from this tier for capacity.
    pub evictions: AtomicU64,
    /// Evicted objects moved to a lower tier.
    pub demotions: AtomicU64,
    /// Objects copied into this tier after a hit below.
    pub promotions: AtomicU64,
    /// Reads from this tier that failed verification.
    pub checksum_failures: AtomicU64,
    /// Payload bytes written into this tier.
    pub bytes_in: AtomicU64,
    /// Payload bytes read from this tier.
    pub bytes_out: AtomicU64,
    /// Evicted objects that no lower tier could take.
    pub dropped: AtomicU64,
    /// Evictions from this tier abandoned because the lower tier failed
    /// (not for lack of room: an object store that is down, an I/O error);
    /// the object stays here.
    pub demote_errors: AtomicU64,
    /// Promotions out of this tier skipped: the background queue was full
    /// (by entries or by payload bytes), or the object can never fit in the
    /// fastest tier.
    pub promotions_skipped: AtomicU64,
    /// Evictions from this tier done by the background demoter (the rest
    /// were done inline by a put that found the tier full).
    pub background_demotions: AtomicU64,
}

/// Where one object lives in a stack ([`TierStack::locate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// Tiers holding a copy, fastest first.
    pub tiers: Vec<TierKind>,
    /// Payload length.
    pub len: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// When this version was first stored, ms since the epoch (this node's
    /// clock, or carried over when the object was copied here).
    pub created_ms: u64,
}

/// Point-in-time view of one tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Medium.
    pub kind: Option<TierKind>,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes used.
    pub used: u64,
    /// Objects stored.
    pub objects: u64,
    /// See [`StackMetrics`].
    pub promotions_skipped: u64,
    /// See [`StackMetrics`].
    pub background_demotions: u64,
    /// See [`StackMetrics`].
    pub hits: u64,
    /// See [`StackMetrics`].
    pub misses: u64,
    /// See [`StackMetrics`].
    pub evictions: u64,
    /// See [`StackMetrics`].
    pub demotions: u64,
    /// See [`StackMetrics`].
    pub promotions: u64,
    /// See [`StackMetrics`].
    pub checksum_failures: u64,
    /// See [`StackMetrics`].
    pub bytes_in: u64,
    /// See [`StackMetrics`].
    pub bytes_out: u64,
    /// See [`StackMetrics`].
    pub dropped: u64,
    /// See [`StackMetrics`].
    pub demote_errors: u64,
}

#[derive(Debug)]
struct Level {
    tier: Arc<dyn Tier>,
    policy: Mutex<Box<dyn EvictionPolicy>>,
    evict_lock: tokio::sync::Mutex<()>,
    metrics: StackMetrics,
}

#[derive(Clone, Debug)]
struct Entry {
    /// Bit i set = a copy lives in level i.
    mask: u8,
    len: u64,
    checksum: u64,
    lease_until_ms: u64,
    /// When this version was first stored (its header's `created_ms`).
    created_ms: u64,
}

/// The stack of tiers of one node.
#[derive(Debug)]
pub struct TierStack {
    levels: Vec<Level>,
    index: Mutex<HashMap<ObjectKey, Entry>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<StackEvent>,
    /// Set once background work is started.
    bg: std::sync::OnceLock<background::Channels>,
}

fn bit(i: usize) -> u8 {
    1 << i
}

impl TierStack {
    /// Builds a stack over `tiers` (any order; sorted fastest first) and
    /// rebuilds the index from what persistent tiers recovered. At most one
    /// tier per kind.
    pub async fn open(mut tiers: Vec<Arc<dyn Tier>>, clock: Arc<dyn Clock>) -> TierResult<TierStack> {
        if tiers.is_empty() {
            return Err(TierError::Config("the tier stack needs at least one tier".into()));
        }
        tiers.sort_by_key(|t| t.kind());
        for w in tiers.windows(2) {
            if w[0].kind() == w[1].kind() {
                return Err(TierError::Config(format!("two {} tiers configured", w[0].kind())));
            }
        }
        let levels: Vec<Level> = tiers
            .into_iter()
            .map(|tier| Level {
                tier,
                policy: Mutex::new(Box::new(LruPolicy::new())),
                evict_lock: tokio::sync::Mutex::new(()),
                metrics: StackMetrics::default(),
            })
            .collect();
        let (events, _) = broadcast::channel(65_536);
        let stack = TierStack {
            levels,
            index: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            clock,
            events,
            bg: std::sync::OnceLock::new(),
        };
        stack.recover().await?;
        Ok(stack)
    }

    async fn recover(&self) -> TierResult<()> {
        // Newest copy wins when tiers disagree (a crash between writing a new
        // version and deleting the old one).
        let mut best: HashMap<ObjectKey, (BlockHeader, u8)> = HashMap::new();
        let mut stale: Vec<(usize, ObjectKey)> = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            for (key, header) in level.tier.recover().await? {
                match best.get_mut(&key) {
                    None => {
                        best.insert(key, (header, bit(i)));
                    }
                    Some((h, mask)) if h.checksum == header.checksum && h.length == header.length => *mask |= bit(i),
                    Some((h, mask)) => {
                        if header.created_ms > h.created_ms {
                            for j in 0..self.levels.len() {
                                if *mask & bit(j) != 0 {
                                    stale.push((j, key.clone()));
                                }
                            }
                            *h = header;
                            *mask = bit(i);
                        } else {
                            stale.push((i, key));
                        }
                    }
                }
            }
        }
        for (i, key) in stale {
            tracing::warn!(%key, tier = %self.levels[i].tier.kind(), "recovery: removing an older copy");
            self.levels[i].tier.delete(&key).await?;
        }
        let mut index = self.index.lock();
        let n = best.len();
        for (key, (h, mask)) in best {
            for (i, level) in self.levels.iter().enumerate() {
                if mask & bit(i) != 0 {
                    level.policy.lock().insert(&key);
                }
            }
            index.insert(
                key,
                Entry {
                    mask,
                    len: h.length,
                    checksum: h.checksum,
                    lease_until_ms: 0,
                    created_ms: h.created_ms,
                },
            );
        }
        if n > 0 {
            tracing::info!(objects = n, "tier stack: index rebuilt from persistent tiers");
        }
        Ok(())
    }

    fn stripe(&self, key: &ObjectKey) -> &tokio::sync::Mutex<()> {
        let h = xxhash_rust::xxh3::xxh3_64(key.key()) ^ xxhash_rust::xxh3::xxh3_64(key.namespace().as_bytes());
        &self.stripes[(h % STRIPES as u64) as usize]
    }

    fn level_of(&self, kind: TierKind) -> Option<usize> {
        self.levels.iter().position(|l| l.tier.kind() == kind)
    }

    /// Kinds of the configured tiers, fastest first.
    pub fn kinds(&self) -> Vec<TierKind> {
        self.levels.iter().map(|l| l.tier.kind()).collect()
    }

    /// Subscribes to placement events.
    pub fn subscribe(&self) -> broadcast::Receiver<StackEvent> {
        self.events.subscribe()
    }

    fn emit(&self, kind: StackEventKind, key: &ObjectKey, level: usize) {
        let _ = self.events.send(StackEvent {
            kind,
            key: key.clone(),
            tier: self.levels[level].tier.kind(),
        });
    }

    /// The clock this stack uses.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Stores an object with the requested durability; returns the tier the
    /// acknowledged copy lives in (the durable one for `disk`/`object`).
    pub async fn put(&self, key: &ObjectKey, block: &Block, durability: Durability) -> TierResult<TierKind> {
        TierError::check_header(key, &block.header)?;
        let _g = self.stripe(key).lock().await;
        let durable_level = match durability {
            Durability::Memory => None,
            Durability::Disk => Some(self.level_of(TierKind::Disk).ok_or(TierError::DurabilityUnavailable {
                durability: "disk",
                needed: TierKind::Disk,
            })?),
            Durability::Object => Some(
                self.level_of(TierKind::Object)
                    .ok_or(TierError::DurabilityUnavailable {
                        durability: "object",
                        needed: TierKind::Object,
                    })?,
            ),
        };
        let mut placed: u8 = 0;
        let ack_level = match durable_level {
            Some(d) => {
                self.place(d, key, block, true).await?;
                placed |= bit(d);
                // Also cache it in the fastest tier, best effort.
                if d > 0 {
                    match self.place(0, key, block, false).await {
                        Ok(()) => placed |= bit(0),
                        Err(e) => tracing::debug!(%key, error = %e, "durable put: no fast copy cached"),
                    }
                }
                d
            }
            None => {
                let l = self.place_first_fit(0, key, block, false).await?;
                placed |= bit(l);
                l
            }
        };
        self.commit_placement(key, &block.header, placed).await;
        self.after_placement(placed);
        Ok(self.levels[ack_level].tier.kind())
    }

    /// Wakes the background demoter when a level that just took data is
    /// above its high watermark.
    fn after_placement(&self, placed: u8) {
        let Some(bg) = self.bg.get() else { return };
        for (i, level) in self.levels.iter().enumerate().take(self.levels.len().saturating_sub(1)) {
            if placed & bit(i) != 0 && level.tier.used() > bg.high_mark(level.tier.capacity()) {
                bg.wake.notify_one();
                return;
            }
        }
    }

    /// Records new copies in `placed`; removes copies of an older, different
    /// version from the other tiers.
    async fn commit_placement(&self, key: &ObjectKey, header: &BlockHeader, placed: u8) {
        let old = {
            let mut index = self.index.lock();
            let e = index.entry(key.clone()).or_insert(Entry {
                mask: 0,
                len: header.length,
                checksum: header.checksum,
                lease_until_ms: 0,
                created_ms: header.created_ms,
            });
            // A pending checksum (local-path commit) never proves two
            // versions equal: the older copies go.
            let same = e.checksum != CHECKSUM_PENDING && e.checksum == header.checksum && e.len == header.length;
            let stale = if same { 0 } else { e.mask & !placed };
            e.mask = if same { e.mask | placed } else { placed };
            if !same {
                e.created_ms = header.created_ms;
            }
            e.len = header.length;
            e.checksum = header.checksum;
            stale
        };
        for (i, level) in self.levels.iter().enumerate() {
            if placed & bit(i) != 0 {
                level.policy.lock().insert(key);
                level.metrics.bytes_in.fetch_add(header.length, Relaxed);
                self.emit(StackEventKind::Stored, key, i);
            }
            if old & bit(i) != 0 {
                if let Err(e) = level.tier.delete(key).await {
                    tracing::warn!(%key, tier = %level.tier.kind(), error = %e, "could not delete an outdated copy");
                }
                level.policy.lock().remove(key);
                self.emit(StackEventKind::Removed, key, i);
            }
        }
    }

    /// Places into the first level at or below `from` that can take it.
    async fn place_first_fit(&self, from: usize, key: &ObjectKey, block: &Block, sync: bool) -> TierResult<usize> {
        let mut why = Vec::new();
        for i in from..self.levels.len() {
            match self.place(i, key, block, sync).await {
                Ok(()) => return Ok(i),
                Err(
                    e @ (TierError::TooLarge { .. } | TierError::Full { .. } | TierError::CapacityExhausted { .. }),
                ) => {
                    why.push(format!("{}: {e}", self.levels[i].tier.kind()));
                }
                Err(e) => return Err(e),
            }
        }
        Err(TierError::CapacityExhausted {
            size: block.header.length,
            detail: why.join("; "),
        })
    }

    /// Places into level `i`, evicting (demoting) from it as needed.
    async fn place(&self, i: usize, key: &ObjectKey, block: &Block, sync: bool) -> TierResult<()> {
        let tier = &self.levels[i].tier;
        loop {
            match tier.put(key, block, sync).await {
                Err(TierError::Full { needed, .. }) => {
                    if !self.make_room(i, needed, Some(key)).await? {
                        return Err(TierError::Full {
                            tier: tier.kind(),
                            needed,
                            available: tier.capacity().saturating_sub(tier.used()),
                            capacity: tier.capacity(),
                        });
                    }
                }
                other => return other,
            }
        }
    }

    /// Evicts from level `i` until `needed` bytes are free (or at least one
    /// victim went). Returns false when nothing could be evicted.
    async fn make_room(&self, i: usize, needed: u64, except: Option<&ObjectKey>) -> TierResult<bool> {
        let level = &self.levels[i];
        let _g = level.evict_lock.lock().await;
        let mut evicted_any = false;
        let now = self.clock.now_ms();
        let candidates = level.policy.lock().candidates(EVICT_BATCH.max(1));
        for victim in candidates {
            let free = level.tier.capacity().saturating_sub(level.tier.used());
            if evicted_any && free >= needed {
                break;
            }
            if Some(&victim) == except {
                continue;
            }
            let leased = self.index.lock().get(&victim).is_some_and(|e| e.lease_until_ms > now);
            if leased {
                continue;
            }
            let Ok(_vg) = self.stripe(&victim).try_lock() else {
                continue; // someone is working on it; pick another
            };
            if self.demote(i, &victim).await? {
                evicted_any = true;
            }
        }
        Ok(evicted_any)
    }

    /// Moves `key` out of level `i`, to the next lower level with room unless
    /// a lower copy already exists. Caller holds the key's stripe.
    async fn demote(&self, i: usize, key: &ObjectKey) -> TierResult<bool> {
        let level = &self.levels[i];
        let Some(entry) = self.index.lock().get(key).cloned() else {
            level.policy.lock().remove(key);
            return Ok(false);
        };
        if entry.mask & bit(i) == 0 {
            level.policy.lock().remove(key);
            return Ok(false);
        }
        let has_lower = (i + 1..self.levels.len()).any(|j| entry.mask & bit(j) != 0);
        let mut new_level = None;
        if !has_lower && i + 1 < self.levels.len() {
            match level.tier.get(key).await {
                Ok(Some(block)) => {
                    // Under the key's stripe the index entry is this very
                    // version: record a checksum the tier just computed.
                    if entry.checksum == CHECKSUM_PENDING
                        && let Some(e) = self.index.lock().get_mut(key)
                        && e.len == block.header.length
                    {
                        e.checksum = block.header.checksum;
                    }
                    // Out of a persistent tier the copy must be as durable
                    // as the one it replaces (a local-directory object store
                    // then fsyncs it before the disk copy goes).
                    let sync = level.tier.kind().is_persistent();
                    match Box::pin(self.place_first_fit(i + 1, key, &block, sync)).await {
                        Ok(j) => {
                            // Publish the lower copy before the upper one goes,
                            // so readers always find one of them.
                            if let Some(e) = self.index.lock().get_mut(key) {
                                e.mask |= bit(j);
                            }
                            new_level = Some(j);
                        }
                        Err(
                            e @ (TierError::TooLarge { .. }
                            | TierError::Full { .. }
                            | TierError::CapacityExhausted { .. }),
                        ) => tracing::warn!(%key, error = %e, "eviction: no lower tier has room; dropping"),
                        Err(e) => {
                            // A lower tier failed (an object store that is
                            // down, an I/O error): keep this copy rather
                            // than lose the object; the caller picks
                            // another victim or reports the tier full.
                            tracing::warn!(%key, error = %e, "eviction: could not write to a lower tier; keeping");
                            level.metrics.demote_errors.fetch_add(1, Relaxed);
                            return Ok(false);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%key, error = %e, "eviction: could not read victim; dropping"),
            }
        }
        level.tier.delete(key).await?;
        level.policy.lock().remove(key);
        level.metrics.evictions.fetch_add(1, Relaxed);
        let gone = {
            let mut index = self.index.lock();
            let mut gone = false;
            if let Some(e) = index.get_mut(key) {
                e.mask &= !bit(i);
                if let Some(j) = new_level {
                    e.mask |= bit(j);
                }
                if e.mask == 0 {
                    index.remove(key);
                    gone = true;
                }
            }
            gone
        };
        if let Some(j) = new_level {
            level.metrics.demotions.fetch_add(1, Relaxed);
            self.levels[j].policy.lock().insert(key);
            self.levels[j].metrics.bytes_in.fetch_add(entry.len, Relaxed);
            self.emit(StackEventKind::Stored, key, j);
        } else if gone {
            level.metrics.dropped.fetch_add(1, Relaxed);
        }
        self.emit(StackEventKind::Removed, key, i);
        Ok(true)
    }

    /// Reads an object from the fastest tier holding a good copy; promotes a
    /// hit below the fastest tier.
    pub async fn get(&self, key: &ObjectKey) -> TierResult<Option<(Block, TierKind)>> {
        self.get_with(key, true).await
    }

    /// Reads an object like [`TierStack::get`] (verified, bad copies
    /// dropped) without promoting it or touching its eviction rank: for
    /// copying objects elsewhere (cluster repair), which must not flush the
    /// hot set.
    pub async fn read_for_copy(&self, key: &ObjectKey) -> TierResult<Option<Block>> {
        Ok(self.get_with(key, false).await?.map(|(b, _)| b))
    }

    async fn get_with(&self, key: &ObjectKey, promote: bool) -> TierResult<Option<(Block, TierKind)>> {
        let mut mask = self.index.lock().get(key).map(|e| e.mask).unwrap_or(0);
        // A concurrent demotion can move the object between reading the
        // index and reading the tier; one retry with the new placement
        // turns that race into a hit instead of a spurious miss.
        for _attempt in 0..2 {
            match self.get_from(key, mask, promote).await? {
                Some(hit) => return Ok(Some(hit)),
                None => {
                    let now = self.index.lock().get(key).map(|e| e.mask).unwrap_or(0);
                    if now == 0 || now == mask {
                        return Ok(None);
                    }
                    mask = now;
                }
            }
        }
        Ok(None)
    }

    async fn get_from(&self, key: &ObjectKey, mask: u8, promote: bool) -> TierResult<Option<(Block, TierKind)>> {
        let mut last_err = None;
        for (i, level) in self.levels.iter().enumerate() {
            if mask & bit(i) == 0 {
                level.metrics.misses.fetch_add(1, Relaxed);
                continue;
            }
            match level.tier.get(key).await {
                Ok(Some(block)) => {
                    level.metrics.hits.fetch_add(1, Relaxed);
                    level.metrics.bytes_out.fetch_add(block.header.length, Relaxed);
                    if promote {
                        level.policy.lock().touch(key);
                    }
                    if i > 0 && promote {
                        match self.bg.get() {
                            // An object the fastest tier can never hold is
                            // not worth queueing (or copying inline).
                            _ if !self.fits_fastest(block.header.length) => {
                                level.metrics.promotions_skipped.fetch_add(1, Relaxed);
                            }
                            // Foreground gets never wait for a promotion;
                            // a full queue skips it (promotion is a hint).
                            Some(bg) => {
                                if !bg.try_promote(key, i, &block) {
                                    level.metrics.promotions_skipped.fetch_add(1, Relaxed);
                                }
                            }
                            None => self.promote(i, key, &block).await,
                        }
                    }
                    return Ok(Some((block, level.tier.kind())));
                }
                Ok(None) => {
                    // The index places a copy here but the tier has none
                    // (removed behind the stack's back, e.g. an object
                    // deleted from the bucket): a miss, and the index must
                    // stop placing it here.
                    level.metrics.misses.fetch_add(1, Relaxed);
                    self.drop_copy(i, key).await;
                }
                Err(TierError::Corrupt { reason, .. }) => {
                    level.metrics.checksum_failures.fetch_add(1, Relaxed);
                    level.metrics.misses.fetch_add(1, Relaxed);
                    tracing::error!(%key, tier = %level.tier.kind(), %reason, "checksum failure: deleting the bad copy");
                    self.drop_copy(i, key).await;
                }
                Err(e) => {
                    tracing::warn!(%key, tier = %level.tier.kind(), error = %e, "read failed; trying slower tiers");
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Drops level `i`'s copy of `key` after a read found it bad: it failed
    /// verification, or the tier no longer had it although the index placed
    /// it there (removed behind the stack's back). The read was not under
    /// the key's stripe, so a put may have replaced the copy since (and a
    /// demotion may have moved it): under the stripe, the copy is read
    /// again and dropped only if the index still places one there and it is
    /// still bad or still missing (a newer, acknowledged copy stays). The
    /// index stops placing it there, and when that was the last copy the key
    /// is gone from the stack; a `Removed` event tells subscribers either way.
    async fn drop_copy(&self, i: usize, key: &ObjectKey) {
        let level = &self.levels[i];
        let _g = self.stripe(key).lock().await;
        if self.index.lock().get(key).is_none_or(|e| e.mask & bit(i) == 0) {
            return; // deleted or moved meanwhile
        }
        match level.tier.get(key).await {
            Err(TierError::Corrupt { .. }) => {}
            Ok(None) => {
                tracing::warn!(%key, tier = %level.tier.kind(), "copy missing from its tier (removed behind the stack's back); forgetting it");
            }
            Ok(Some(_)) => {
                tracing::info!(%key, tier = %level.tier.kind(), "bad copy replaced meanwhile; keeping the new one");
                return;
            }
            Err(_) => return,
        }
        // Best effort: for a missing copy, this only makes sure the tier's
        // own accounting forgets it too.
        let _ = level.tier.delete(key).await;
        level.policy.lock().remove(key);
        {
            let mut index = self.index.lock();
            if let Some(e) = index.get_mut(key) {
                e.mask &= !bit(i);
                if e.mask == 0 {
                    index.remove(key);
                }
            }
        }
        self.emit(StackEventKind::Removed, key, i);
    }

    /// Whether an object of `len` payload bytes could ever fit in the
    /// fastest tier (when empty).
    fn fits_fastest(&self, len: u64) -> bool {
        let t = &self.levels[0].tier;
        t.footprint(len) <= t.capacity()
    }

    async fn promote(&self, from: usize, key: &ObjectKey, block: &Block) {
        let Ok(_g) = self.stripe(key).try_lock() else { return };
        let target = 0;
        let current = self.index.lock().get(key).map(|e| (e.mask, e.checksum));
        match current {
            Some((mask, sum)) if mask & bit(target) == 0 && sum == block.header.checksum => {}
            _ => return,
        }
        if self.place(target, key, block, false).await.is_ok() {
            let ok = {
                let mut index = self.index.lock();
                match index.get_mut(key) {
                    Some(e) => {
                        e.mask |= bit(target);
                        true
                    }
                    None => false,
                }
            };
            if ok {
                let l = &self.levels[target];
                l.policy.lock().insert(key);
                l.metrics.promotions.fetch_add(1, Relaxed);
                l.metrics.bytes_in.fetch_add(block.header.length, Relaxed);
                self.emit(StackEventKind::Stored, key, target);
            } else {
                let _ = self.levels[target].tier.delete(key).await;
            }
        } else {
            tracing::debug!(%key, from = %self.levels[from].tier.kind(), "promotion skipped: no room");
        }
    }

    /// Deletes an object from every tier; returns whether it existed.
    pub async fn delete(&self, key: &ObjectKey) -> TierResult<bool> {
        let _g = self.stripe(key).lock().await;
        let Some(entry) = self.index.lock().remove(key) else {
            return Ok(false);
        };
        self.drop_copies(key, &entry).await
    }

    /// Deletes `key` only if the version held is the one with `checksum`
    /// (a newer version stored meanwhile stays); returns whether it went.
    pub async fn delete_version(&self, key: &ObjectKey, checksum: u64) -> TierResult<bool> {
        let _g = self.stripe(key).lock().await;
        let entry = {
            let mut index = self.index.lock();
            match index.get(key) {
                Some(e) if e.checksum == checksum => index.remove(key),
                _ => None,
            }
        };
        match entry {
            Some(e) => self.drop_copies(key, &e).await,
            None => Ok(false),
        }
    }

    /// Removes every copy of an entry already taken out of the index.
    async fn drop_copies(&self, key: &ObjectKey, entry: &Entry) -> TierResult<bool> {
        let mut first_err = None;
        for (i, level) in self.levels.iter().enumerate() {
            if entry.mask & bit(i) != 0 {
                if let Err(e) = level.tier.delete(key).await {
                    first_err.get_or_insert(e);
                }
                level.policy.lock().remove(key);
                self.emit(StackEventKind::Removed, key, i);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// Deletes every object of a namespace; returns how many went.
    pub async fn clear_namespace(&self, namespace: &str) -> TierResult<u64> {
        let keys: Vec<ObjectKey> = self
            .index
            .lock()
            .keys()
            .filter(|k| k.namespace() == namespace)
            .cloned()
            .collect();
        let mut n = 0;
        for k in &keys {
            if self.delete(k).await? {
                n += 1;
            }
        }
        let _ = self.events.send(StackEvent {
            kind: StackEventKind::Cleared,
            key: ObjectKey::new(namespace, bytes::Bytes::new()),
            tier: self.levels[0].tier.kind(),
        });
        Ok(n)
    }

    /// For a chain of keys: the fastest tier of each leading key present,
    /// stopping at the first missing one.
    pub fn exists_prefix(&self, keys: &[ObjectKey]) -> Vec<ExistsEntry> {
        let index = self.index.lock();
        let mut out = Vec::new();
        for k in keys {
            let Some(e) = index.get(k) else { break };
            let i = e.mask.trailing_zeros() as usize;
            out.push(ExistsEntry {
                tier: self.levels[i].tier.kind(),
                len: e.len,
            });
        }
        out
    }

    /// For each key, the tiers holding a copy (fastest first), its length
    /// and checksum; `None` for a key not held.
    pub fn locate(&self, keys: &[ObjectKey]) -> Vec<Option<Located>> {
        let index = self.index.lock();
        keys.iter()
            .map(|k| {
                index.get(k).map(|e| Located {
                    tiers: (0..self.levels.len())
                        .filter(|&i| e.mask & bit(i) != 0)
                        .map(|i| self.levels[i].tier.kind())
                        .collect(),
                    len: e.len,
                    checksum: e.checksum,
                    created_ms: e.created_ms,
                })
            })
            .collect()
    }

    /// Whether a key is present in any tier.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.index.lock().contains_key(key)
    }

    /// Pins keys against eviction until now + `ttl_ms` (extends, never
    /// shortens; `ttl_ms == 0` releases). Returns, per key, whether it exists.
    pub fn lease(&self, keys: &[ObjectKey], ttl_ms: u64) -> Vec<bool> {
        let now = self.clock.now_ms();
        let mut index = self.index.lock();
        keys.iter()
            .map(|k| match index.get_mut(k) {
                Some(e) => {
                    e.lease_until_ms = if ttl_ms == 0 {
                        0
                    } else {
                        e.lease_until_ms.max(now.saturating_add(ttl_ms))
                    };
                    true
                }
                None => false,
            })
            .collect()
    }

    /// Every object held now in the namespaces `wanted` accepts, with each
    /// tier holding a copy: what a subscriber that joins late needs to
    /// know. A consistent cut of the index (taken under its lock); the
    /// events after it tell the rest.
    /// `wanted` is asked once per namespace, not per object, since the
    /// index's lock is held meanwhile.
    pub fn snapshot(&self, wanted: impl Fn(&str) -> bool) -> Vec<(ObjectKey, TierKind)> {
        let index = self.index.lock();
        let mut out = Vec::new();
        let mut verdicts: HashMap<&str, bool> = HashMap::new();
        for (k, e) in index.iter() {
            let ns = k.namespace();
            if !*verdicts.entry(ns).or_insert_with(|| wanted(ns)) {
                continue;
            }
            for (i, level) in self.levels.iter().enumerate() {
                if e.mask & bit(i) != 0 {
                    out.push((k.clone(), level.tier.kind()));
                }
            }
        }
        out
    }

    /// Namespaces that currently hold objects.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.lock().keys().map(|k| k.namespace().to_string()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Number of distinct objects.
    pub fn len(&self) -> usize {
        self.index.lock().len()
    }

    /// Whether the stack is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per-tier statistics, fastest first.
    pub fn stats(&self) -> Vec<TierStats> {
        self.levels
            .iter()
            .map(|l| {
                let m = &l.metrics;
                TierStats {
                    kind: Some(l.tier.kind()),
                    capacity: l.tier.capacity(),
                    used: l.tier.used(),
                    objects: l.tier.len() as u64,
                    hits: m.hits.load(Relaxed),
                    misses: m.misses.load(Relaxed),
                    evictions: m.evictions.load(Relaxed),
                    demotions: m.demotions.load(Relaxed),
                    promotions: m.promotions.load(Relaxed),
                    checksum_failures: m.checksum_failures.load(Relaxed),
                    bytes_in: m.bytes_in.load(Relaxed),
                    bytes_out: m.bytes_out.load(Relaxed),
                    dropped: m.dropped.load(Relaxed),
                    demote_errors: m.demote_errors.load(Relaxed),
                    promotions_skipped: m.promotions_skipped.load(Relaxed),
                    background_demotions: m.background_demotions.load(Relaxed),
                }
            })
            .collect()
    }

    /// Checks that the index and every tier agree: each tier holds exactly
    /// the keys the index places there, and its used bytes equal the sum of
    /// their footprints. For tests; returns a description of the first
    /// disagreement.
    pub fn check_consistency(&self) -> Result<(), String> {
        let index = self.index.lock();
        for (i, level) in self.levels.iter().enumerate() {
            let mut expect_used = 0;
            let mut n = 0;
            for (k, e) in index.iter() {
                let here = e.mask & bit(i) != 0;
                if here != level.tier.contains(k) {
                    return Err(format!(
                        "{k}: index says {here} for {} tier, tier disagrees",
                        level.tier.kind()
                    ));
                }
                if here {
                    expect_used += level.tier.footprint(e.len);
                    n += 1;
                }
            }
            if level.tier.used() != expect_used {
                return Err(format!(
                    "{} tier: used {} but index footprints sum to {}",
                    level.tier.kind(),
                    level.tier.used(),
                    expect_used
                ));
            }
            if level.tier.len() != n {
                return Err(format!(
                    "{} tier: holds {} objects, index says {}",
                    level.tier.kind(),
                    level.tier.len(),
                    n
                ));
            }
            if level.policy.lock().len() != n {
                return Err(format!(
                    "{} tier: policy tracks {} objects, index says {n}",
                    level.tier.kind(),
                    level.policy.lock().len()
                ));
            }
        }
        Ok(())
    }
}

mod background;
mod local;
#[cfg(test)]
mod tests;

pub use background::{BackgroundConfig, BackgroundHandle};
