//! Background data movement for a [`TierStack`]: the demoter, which keeps
//! every tier but the last below its high watermark by demoting LRU victims
//! until the tier is down to its low watermark, and the promoter, which
//! copies hits from slower tiers into the fastest one after the read that
//! found them has already returned.
//!
//! The promotion queue holds the payloads it is to copy, so it is bounded
//! twice: by entries ([`BackgroundConfig::promote_queue`]) and by payload
//! bytes ([`BackgroundConfig::promote_queue_bytes`], counting the promotion
//! in progress). A hit that would pass either bound is not promoted.
//!
//! Both are optional: a stack without them evicts and promotes inline (the
//! behaviour the stack's own tests pin down). Puts still evict inline when a
//! tier is full despite the demoter (a burst faster than it), so nothing
//! depends on the background keeping up.

use super::{StackMetrics, TierStack};
use crate::{Block, ObjectKey, TierError, TierResult};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// Settings of the background demoter and promoter.
#[derive(Clone, Debug, PartialEq)]
pub struct BackgroundConfig {
    /// Demotion starts when a tier is fuller than this fraction.
    pub high_watermark: f64,
    /// ... and stops once it is down to this fraction.
    pub low_watermark: f64,
    /// Promotions waiting to run; when full, further ones are skipped.
    /// Default 256; at least 1.
    pub promote_queue: usize,
    /// Payload bytes the promotion queue may hold (waiting promotions and
    /// the one in progress); a hit that would pass it is not promoted, so an
    /// object larger than this is never promoted in the background. Default
    /// 256 MiB; at least 1.
    pub promote_queue_bytes: u64,
    /// How often the demoter looks even when nobody woke it.
    pub interval: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            high_watermark: 0.90,
            low_watermark: 0.80,
            promote_queue: 256,
            promote_queue_bytes: 256 << 20,
            interval: Duration::from_millis(100),
        }
    }
}

impl BackgroundConfig {
    /// Checks the watermarks and sizes.
    pub fn validate(&self) -> TierResult<()> {
        let ok = |w: f64| w > 0.0 && w <= 1.0;
        if !ok(self.high_watermark) || !ok(self.low_watermark) || self.low_watermark > self.high_watermark {
            return Err(TierError::Config(format!(
                "watermarks must satisfy 0 < low ({}) <= high ({}) <= 1",
                self.low_watermark, self.high_watermark
            )));
        }
        if self.promote_queue == 0 {
            return Err(TierError::Config(
                "the promotion queue needs room for at least one entry".into(),
            ));
        }
        if self.promote_queue_bytes == 0 {
            return Err(TierError::Config(
                "the promotion queue needs a positive byte budget".into(),
            ));
        }
        if self.interval.is_zero() {
            return Err(TierError::Config("the demoter interval must be positive".into()));
        }
        Ok(())
    }
}

/// One queued promotion: the hit found in level `from`, and its share of
/// the queue's byte budget, given back when the promotion is dropped (done,
/// refused by a full queue, or discarded with the queue).
#[derive(Debug)]
pub(super) struct Promotion {
    key: ObjectKey,
    from: usize,
    block: Block,
    _bytes: QueuedBytes,
}

#[derive(Debug)]
struct QueuedBytes {
    queued: Arc<AtomicU64>,
    n: u64,
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.n, AcqRel);
    }
}

/// What the foreground uses to hand work to the background tasks.
#[derive(Debug)]
pub(super) struct Channels {
    promote: mpsc::Sender<Promotion>,
    /// Payload bytes of the promotions queued or in progress.
    queued: Arc<AtomicU64>,
    queue_budget: u64,
    pub(super) wake: Notify,
    high: f64,
}

impl Channels {
    pub(super) fn high_mark(&self, capacity: u64) -> u64 {
        (capacity as f64 * self.high) as u64
    }

    /// Queues the promotion of `block`, found in level `from`, unless the
    /// queue is full by entries or by bytes; never waits. Returns whether it
    /// was queued.
    pub(super) fn try_promote(&self, key: &ObjectKey, from: usize, block: &Block) -> bool {
        let n = block.payload.len() as u64;
        let budget = self.queue_budget;
        if self
            .queued
            .fetch_update(AcqRel, Acquire, |q| q.checked_add(n).filter(|&t| t <= budget))
            .is_err()
        {
            return false;
        }
        let p = Promotion {
            key: key.clone(),
            from,
            block: block.clone(),
            _bytes: QueuedBytes {
                queued: self.queued.clone(),
                n,
            },
        };
        // A refused promotion comes back in the error and gives its bytes
        // back as it is dropped.
        self.promote.try_send(p).is_ok()
    }

    /// Payload bytes of the promotions queued or in progress.
    #[cfg(test)]
    pub(super) fn queued_bytes(&self) -> u64 {
        self.queued.load(Acquire)
    }
}

/// The running background tasks. [`Self::stop`] lets each finish the
/// object it is moving and waits; dropping the handle aborts them (a move
/// cut short leaves at worst an unindexed copy, never a lost object).
#[derive(Debug)]
pub struct BackgroundHandle {
    tasks: Vec<JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl BackgroundHandle {
    /// Stops the tasks between two moves and waits for them.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for BackgroundHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl TierStack {
    /// Starts the background demoter and promoter on the current tokio
    /// runtime. Fails if they were already started for this stack.
    pub fn start_background(self: &Arc<Self>, config: BackgroundConfig) -> TierResult<BackgroundHandle> {
        config.validate()?;
        let (tx, mut rx) = mpsc::channel(config.promote_queue);
        let channels = Channels {
            promote: tx,
            queued: Arc::new(AtomicU64::new(0)),
            queue_budget: config.promote_queue_bytes,
            wake: Notify::new(),
            high: config.high_watermark,
        };
        if self.bg.set(channels).is_err() {
            return Err(TierError::Config(
                "background work already started for this stack".into(),
            ));
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // The tasks hold weak references so that dropping the stack ends them.
        let weak = Arc::downgrade(self);
        let mut halt = stopped.clone();
        let promoter = tokio::spawn(async move {
            loop {
                let p = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => return },
                    _ = halt.changed() => return,
                };
                let Some(stack) = weak.upgrade() else { return };
                stack.promote(p.from, &p.key, &p.block).await;
                // Dropping `p` gives its bytes back to the queue's budget.
            }
        });
        let weak = Arc::downgrade(self);
        let mut halt = stopped;
        let demoter = tokio::spawn(async move {
            loop {
                let Some(stack) = weak.upgrade() else { return };
                if *halt.borrow() {
                    return;
                }
                stack.demote_to_watermarks(&config, &halt).await;
                let wake = async {
                    if let Some(bg) = stack.bg.get() {
                        bg.wake.notified().await
                    }
                };
                tokio::select! {
                    _ = wake => {}
                    _ = tokio::time::sleep(config.interval) => {}
                    _ = halt.changed() => return,
                }
            }
        });
        Ok(BackgroundHandle {
            tasks: vec![promoter, demoter],
            stop,
        })
    }

    /// One pass of the demoter over every tier that has a tier below it.
    async fn demote_to_watermarks(&self, config: &BackgroundConfig, halt: &tokio::sync::watch::Receiver<bool>) {
        for i in 0..self.levels.len().saturating_sub(1) {
            let level = &self.levels[i];
            let capacity = level.tier.capacity();
            let high = (capacity as f64 * config.high_watermark) as u64;
            let low = (capacity as f64 * config.low_watermark) as u64;
            if level.tier.used() <= high {
                continue;
            }
            // Each round evicts a batch; stop when under the low mark or when
            // a round made no progress (everything left is leased or busy).
            while level.tier.used() > low && !*halt.borrow() {
                let before = level.metrics.evictions.load(Relaxed);
                match self.make_room(i, capacity - low, None).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(tier = %level.tier.kind(), error = %e, "background demotion failed");
                        break;
                    }
                }
                count_background(&level.metrics, before);
            }
        }
    }
}

fn count_background(m: &StackMetrics, evictions_before: u64) {
    let n = m.evictions.load(Relaxed).saturating_sub(evictions_before);
    m.background_demotions.fetch_add(n, Relaxed);
}
