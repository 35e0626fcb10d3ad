//! The engine thread: one dedicated OS thread owns the [`Engine`] (the
//! forward pass is CPU-bound and never runs on an async worker thread) and
//! the worker's own prefix cache, and runs continuous batching.
//!
//! The async side talks to it through [`EngineHandle`]: [`EngineHandle::lookup`]
//! pins the leading blocks of a prompt found in the own cache (so they
//! cannot be evicted while the request loads the next ones from the
//! fabric), [`EngineHandle::submit`] queues a [`Job`] and returns the
//! channel its [`Out`]put streams back on. Fabric I/O never happens here.
//!
//! Each loop iteration:
//!
//! 1. takes every command waiting (blocking only when there is nothing to
//!    do);
//! 2. admits waiting jobs in arrival order into one prefill batch, bounded
//!    by `max-batch-tokens` (at least one job), `max-running` and the pool:
//!    a job is admitted only when the blocks it may still need (prompt plus
//!    `max_tokens`, minus its pinned prefix) fit beside what the running
//!    sequences may still need, counting free blocks and evictable cached
//!    ones, so a running sequence never runs out of blocks;
//! 3. imports the jobs' fabric blocks, prefills the batch, caches the
//!    prompts' full blocks, exports the newly computed ones for the fabric,
//!    samples each first token;
//! 4. runs one decode step over every running sequence;
//! 5. publishes the step's KV events.
//!
//! A finished sequence's full blocks stay in the own cache; those it
//! computed beyond its prompt are exported for the fabric. A job whose
//! output channel is closed (the client went away) is finished early.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use kvfabric::hash::{BlockHash, chain_hashes};
use tokio::sync::{mpsc, oneshot};

use super::cache::OwnCache;
use super::events::{EventSink, KvEvent};
use super::metrics::Metrics;
use crate::engine::{BlockId, EOS_TOKEN, Engine, EngineError, FinishReason, Sampler, Sampling, SeqId};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_batch_tokens: usize,
    pub(crate) max_running: usize,
    /// Namespace salt of the block keys.
    pub(crate) salt: u64,
}

/// Why a job failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum JobError {
    /// The pool cannot hold it now and nothing will free room.
    #[error("{0}")]
    Capacity(String),
    /// The engine refused or failed.
    #[error("engine error: {0}")]
    Engine(String),
    /// The worker is shutting down.
    #[error("the worker is shutting down")]
    Shutdown,
}

/// What the engine sends back for a job, in order: `Prefilled`, then
/// `Token`s, then `Finished`; or `Failed` at any point.
#[derive(Debug)]
pub(crate) enum Out {
    /// The prompt is computed.
    Prefilled {
        /// Prompt tokens whose KV came from the own cache.
        own_pool_tokens: usize,
        /// ... from fabric blocks.
        fabric_tokens: usize,
        /// ... computed here.
        computed_tokens: usize,
        /// Full prompt blocks to store in the fabric: (index, bytes).
        blocks: Vec<(usize, Vec<u8>)>,
    },
    /// One generated token.
    Token(u32),
    /// Generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Every token of the sequence (prompt and fed-back generated).
        tokens: Vec<u32>,
        /// Full generated blocks to store in the fabric: (index, bytes).
        blocks: Vec<(usize, Vec<u8>)>,
    },
    /// The job failed.
    Failed(JobError),
}

/// A request for the engine.
#[derive(Debug)]
pub(crate) struct Job {
    /// Prompt tokens (validated by the caller).
    pub(crate) tokens: Vec<u32>,
    /// Leading blocks found in the own cache.
    pub(crate) pinned: Pinned,
    /// Bytes of the blocks after the pinned ones, from the fabric.
    pub(crate) fabric: Vec<Bytes>,
    /// Tokens to generate; 0: prefill only.
    pub(crate) max_tokens: usize,
    /// How to sample.
    pub(crate) sampling: Sampling,
    /// Keep going after EOS.
    pub(crate) ignore_eos: bool,
    /// Export full blocks from this index on for the fabric, or from the
    /// first one computed here if that is earlier (`None`: the worker has
    /// no fabric).
    pub(crate) export_from: Option<usize>,
    /// Where the output goes.
    pub(crate) out: mpsc::UnboundedSender<Out>,
}

enum Command {
    Lookup {
        keys: Vec<BlockHash>,
        /// Gets the pins as a guard: one the requester no longer waits for
        /// (the client went away after the reply was sent) unpins when the
        /// channel drops it.
        reply: oneshot::Sender<Pinned>,
        /// Where that guard's unpin goes.
        unpin: std_mpsc::Sender<Command>,
    },
    Unpin(Vec<BlockId>),
    Submit(Box<Job>),
    Shutdown,
}

/// Own-cache blocks pinned for a request until its job is admitted; drop
/// unpins them.
#[derive(Debug)]
pub(crate) struct Pinned {
    blocks: Vec<BlockId>,
    tx: Option<std_mpsc::Sender<Command>>,
}

impl Pinned {
    /// How many blocks.
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }

    fn take(&mut self) -> Vec<BlockId> {
        self.tx = None;
        std::mem::take(&mut self.blocks)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(tx) = &self.tx
            && !self.blocks.is_empty()
        {
            let _ = tx.send(Command::Unpin(std::mem::take(&mut self.blocks)));
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Lookup { keys, .. } => write!(f, "Lookup({} keys)", keys.len()),
            Command::Unpin(b) => write!(f, "Unpin({})", b.len()),
            Command::Submit(_) => f.write_str("Submit"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// The async side's handle on the engine thread. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Pins the leading cached blocks of `keys`.
    pub(crate) async fn lookup(&self, keys: Vec<BlockHash>) -> Result<Pinned, JobError> {
        if keys.is_empty() {
            return Ok(Pinned {
                blocks: Vec::new(),
                tx: None,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Lookup {
                keys,
                reply,
                unpin: self.tx.clone(),
            })
            .map_err(|_| JobError::Shutdown)?;
        rx.await.map_err(|_| JobError::Shutdown)
    }

    /// Queues a job; its output arrives on the returned channel.
    pub(crate) fn submit(&self, mut job: Job) -> Result<(), JobError> {
        // The engine owns the pins from here on.
        let blocks = job.pinned.take();
        job.pinned = Pinned { blocks, tx: None };
        self.tx
            .send(Command::Submit(Box::new(job)))
            .map_err(|_| JobError::Shutdown)
    }

    /// Asks the thread to stop (waiting and running jobs fail with
    /// [`JobError::Shutdown`]).
    pub(crate) fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Spawns the engine thread.
pub(crate) fn spawn(
    engine: Engine,
    limits: Limits,
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::channel();
    let capacity = engine.pool().capacity();
    metrics
        .pool_blocks
        .with_label_values(&["capacity"])
        .set(capacity as i64);
    let mut s = Scheduler {
        tpb: engine.config().tokens_per_block,
        max_context: engine.config().max_context,
        engine,
        cache: OwnCache::default(),
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        events,
        pending: Vec::new(),
        metrics,
        limits,
        pins_in_flight: 0,
        stalled: false,
    };
    s.gauges();
    let thread = std::thread::Builder::new()
        .name("kvfabric-engine".into())
        .spawn(move || s.run())?;
    Ok((EngineHandle { tx }, thread))
}

/// The most blocks a sequence of a `prompt`-token prompt generating
/// `max_tokens` can hold (the last generated token is never fed back).
pub(crate) fn max_blocks(prompt: usize, max_tokens: usize, max_context: usize, tpb: usize) -> usize {
    let len = (prompt + max_tokens.saturating_sub(1)).min(max_context.max(prompt));
    len.div_ceil(tpb)
}

#[derive(Debug)]
struct Running {
    seq: SeqId,
    sampler: Sampler,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    /// The token to feed next.
    next: u32,
    out: mpsc::UnboundedSender<Out>,
    max_blocks: usize,
    prompt_blocks: usize,
    export: bool,
}

struct Scheduler {
    engine: Engine,
    cache: OwnCache,
    rx: std_mpsc::Receiver<Command>,
    waiting: VecDeque<Box<Job>>,
    running: Vec<Running>,
    events: Option<EventSink>,
    pending: Vec<KvEvent>,
    metrics: Arc<Metrics>,
    limits: Limits,
    tpb: usize,
    max_context: usize,
    /// Blocks pinned by lookups whose jobs have not arrived.
    pins_in_flight: usize,
    /// Jobs wait, nothing runs and none could be admitted.
    stalled: bool,
}

impl Scheduler {
    fn run(&mut self) {
        tracing::debug!("engine thread started");
        'outer: loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle {
                match self.rx.recv() {
                    Ok(c) => {
                        if !self.handle(c) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            } else if self.stalled && self.running.is_empty() {
                match self.rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(c) => {
                        if !self.handle(c) {
                            break;
                        }
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(c) => {
                        if !self.handle(c) {
                            break 'outer;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => break 'outer,
                }
            }
            self.admit_and_prefill();
            self.decode();
            self.flush();
        }
        for mut job in self.waiting.drain(..).collect::<Vec<_>>() {
            self.fail_waiting(&mut job, JobError::Shutdown);
        }
        for r in std::mem::take(&mut self.running) {
            let _ = r.out.send(Out::Failed(JobError::Shutdown));
            let _ = self.engine.remove_sequence(r.seq);
        }
        self.cache.clear(&mut self.engine, &mut self.pending);
        self.flush();
        tracing::debug!("engine thread stopped");
    }

    /// Handles one command; false on shutdown.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Lookup { keys, reply, unpin } => {
                let found = self.cache.lookup(&keys);
                // Pin only as far as the running sequences' reserve allows.
                let mut room = self.available().saturating_sub(self.reserved());
                let mut pinned = Vec::with_capacity(found.len());
                for b in found {
                    let evictable = self.engine.pool().ref_count(b) == Some(1);
                    if evictable && room == 0 {
                        break;
                    }
                    if self.engine.retain_block(b).is_err() {
                        break;
                    }
                    if evictable {
                        room -= 1;
                    }
                    pinned.push(b);
                }
                let n = pinned.len();
                let guard = Pinned {
                    blocks: pinned,
                    tx: Some(unpin),
                };
                match reply.send(guard) {
                    Ok(()) => self.pins_in_flight += n,
                    Err(mut guard) => {
                        let blocks = guard.take();
                        self.release(&blocks);
                    }
                }
            }
            Command::Unpin(blocks) => {
                self.pins_in_flight = self.pins_in_flight.saturating_sub(blocks.len());
                self.release(&blocks);
            }
            Command::Submit(job) => {
                self.pins_in_flight = self.pins_in_flight.saturating_sub(job.pinned.len());
                self.stalled = false;
                self.waiting.push_back(job);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let _ = self.engine.release_block(b);
        }
    }

    /// Free blocks plus cached blocks no one uses.
    fn available(&self) -> usize {
        self.engine.pool().num_free() + self.cache.evictable(&self.engine)
    }

    /// Blocks the running sequences may still allocate.
    fn reserved(&self) -> usize {
        self.running
            .iter()
            .map(|r| {
                let held = self.engine.sequence(r.seq).map_or(0, |s| s.blocks().len());
                r.max_blocks.saturating_sub(held)
            })
            .sum()
    }

    /// (own, fabric) prefix blocks a job can use.
    fn usable(&self, job: &Job) -> (usize, usize) {
        let usable = (job.tokens.len().saturating_sub(1)) / self.tpb;
        let own = job.pinned.len().min(usable);
        (own, job.fabric.len().min(usable - own))
    }

    fn job_need(&self, job: &Job) -> usize {
        let (own, _) = self.usable(job);
        max_blocks(job.tokens.len(), job.max_tokens, self.max_context, self.tpb).saturating_sub(own)
    }

    fn fail_waiting(&mut self, job: &mut Job, e: JobError) {
        let pins = job.pinned.take();
        self.release(&pins);
        let _ = job.out.send(Out::Failed(e));
    }

    fn admit_and_prefill(&mut self) {
        let mut batch: Vec<(SeqId, Box<Job>, usize, usize)> = Vec::new();
        let mut batch_tokens = 0usize;
        let mut batch_reserve = 0usize;
        while let Some(job) = self.waiting.front() {
            if self.running.len() + batch.len() >= self.limits.max_running {
                break;
            }
            if job.out.is_closed() {
                let mut job = self.waiting.pop_front().expect("front exists");
                self.fail_waiting(&mut job, JobError::Shutdown);
                continue;
            }
            let (own, fab) = self.usable(job);
            let pending = job.tokens.len() - (own + fab) * self.tpb;
            if !batch.is_empty() && batch_tokens + pending > self.limits.max_batch_tokens {
                break;
            }
            let need = self.job_need(job);
            if need + self.reserved() + batch_reserve > self.available() {
                if self.running.is_empty() && batch.is_empty() {
                    // Nothing will free room by itself: let a job that fits
                    // go first, or fail the head if no pin can come back.
                    if let Some(i) = self.first_other_fitting() {
                        if let Some(j) = self.waiting.remove(i) {
                            self.waiting.push_front(j);
                        }
                        continue;
                    }
                    if self.pins_in_flight == 0 {
                        let mut job = self.waiting.pop_front().expect("front exists");
                        let msg = format!(
                            "the KV pool ({} blocks) cannot hold this request (needs {need} more blocks) beside the blocks other requests hold; retry later",
                            self.engine.pool().capacity()
                        );
                        self.fail_waiting(&mut job, JobError::Capacity(msg));
                        continue;
                    }
                    self.stalled = true;
                }
                break;
            }
            let mut job = self.waiting.pop_front().expect("front exists");
            match self.admit(&mut job, own, fab) {
                Ok((seq, own_t, fab_t)) => {
                    let held = self.engine.sequence(seq).map_or(0, |s| s.blocks().len());
                    batch_reserve +=
                        max_blocks(job.tokens.len(), job.max_tokens, self.max_context, self.tpb).saturating_sub(held);
                    batch_tokens += pending;
                    batch.push((seq, job, own_t, fab_t));
                }
                Err(e) => {
                    let _ = job.out.send(Out::Failed(JobError::Engine(e.to_string())));
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        self.stalled = false;
        let ids: Vec<SeqId> = batch.iter().map(|b| b.0).collect();
        let need: usize = ids
            .iter()
            .filter_map(|&id| self.engine.sequence(id))
            .map(|s| s.tokens().len().div_ceil(self.tpb).saturating_sub(s.blocks().len()))
            .sum();
        self.cache.make_room(&mut self.engine, need, &mut self.pending);
        let before = self.engine.stats();
        let logits = match self.engine.prefill(&ids) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "prefill failed");
                for (seq, job, ..) in batch {
                    let _ = self.engine.remove_sequence(seq);
                    let _ = job.out.send(Out::Failed(JobError::Engine(e.to_string())));
                }
                return;
            }
        };
        let computed = self.engine.stats().prefill_tokens_computed - before.prefill_tokens_computed;
        self.metrics.prefill_batches.inc();
        self.metrics
            .prefill_tokens
            .with_label_values(&["computed"])
            .inc_by(computed);
        for ((seq, job, own_t, fab_t), logits) in batch.into_iter().zip(logits) {
            let job = *job;
            let len = job.tokens.len();
            let computed_tokens = len - own_t - fab_t;
            self.metrics
                .prefill_tokens
                .with_label_values(&["own_pool"])
                .inc_by(own_t as u64);
            self.metrics
                .prefill_tokens
                .with_label_values(&["fabric"])
                .inc_by(fab_t as u64);
            let prompt_blocks = len / self.tpb;
            self.cache_blocks(seq);
            let blocks = match job.export_from {
                // From no later than the first block computed here: a
                // fabric block that did not import was computed, and the
                // fabric's copy is bad.
                Some(from) => self.export(seq, from.min((own_t + fab_t) / self.tpb), prompt_blocks),
                None => Vec::new(),
            };
            let prefilled = Out::Prefilled {
                own_pool_tokens: own_t,
                fabric_tokens: fab_t,
                computed_tokens,
                blocks,
            };
            let mut r = Running {
                seq,
                sampler: match Sampler::new(job.sampling) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.out.send(Out::Failed(JobError::Engine(e.to_string())));
                        let _ = self.engine.remove_sequence(seq);
                        continue;
                    }
                },
                generated: 0,
                max_tokens: job.max_tokens,
                ignore_eos: job.ignore_eos,
                next: 0,
                out: job.out,
                max_blocks: max_blocks(len, job.max_tokens, self.max_context, self.tpb),
                prompt_blocks,
                export: job.export_from.is_some(),
            };
            if r.out.send(prefilled).is_err() {
                self.finish(r, FinishReason::MaxTokens, false);
                continue;
            }
            if r.max_tokens == 0 {
                self.finish(r, FinishReason::MaxTokens, true);
                continue;
            }
            match self.step(&mut r, &logits) {
                Some(reason) => self.finish(r, reason, true),
                None => self.running.push(r),
            }
        }
        self.gauges();
    }

    /// The first waiting job behind the head that fits now.
    fn first_other_fitting(&self) -> Option<usize> {
        let avail = self.available();
        self.waiting
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, j)| self.job_need(j) <= avail)
            .map(|(i, _)| i)
    }

    /// Imports a job's fabric blocks and adds its sequence; releases its
    /// pins. Returns (sequence, own-pool tokens, fabric tokens).
    fn admit(&mut self, job: &mut Job, own: usize, fab: usize) -> Result<(SeqId, usize, usize), EngineError> {
        let pins = job.pinned.take();
        self.cache.make_room(&mut self.engine, fab, &mut self.pending);
        let mut blocks: Vec<BlockId> = pins[..own].to_vec();
        let mut imported = Vec::with_capacity(fab);
        for bytes in &job.fabric[..fab] {
            match self.engine.import_block(bytes) {
                Ok(b) => imported.push(b),
                Err(e) => {
                    // A corrupt block ends the usable prefix; the rest is computed.
                    tracing::warn!(error = %e, "fabric block does not import: computing from there");
                    break;
                }
            }
        }
        blocks.extend_from_slice(&imported);
        let r = self.engine.add_sequence(&job.tokens, &blocks);
        self.release(&pins);
        self.release(&imported);
        job.fabric.clear();
        let seq = r?;
        Ok((seq, own * self.tpb, imported.len() * self.tpb))
    }

    /// Keys of the full blocks of a sequence's tokens.
    fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        chain_hashes(self.limits.salt, tokens, self.tpb, &[])
    }

    /// Caches a sequence's full blocks.
    fn cache_blocks(&mut self, seq: SeqId) {
        let Ok(full) = self.engine.full_blocks(seq) else {
            return;
        };
        let Some(s) = self.engine.sequence(seq) else {
            return;
        };
        let tokens = s.tokens()[..full.len() * self.tpb].to_vec();
        let keys = self.keys(&tokens);
        let blocks: Vec<BlockId> = full.iter().map(|b| b.block).collect();
        self.cache
            .insert(&mut self.engine, &keys, &blocks, &tokens, self.tpb, &mut self.pending);
    }

    /// Bytes of the sequence's full blocks `from..to`.
    fn export(&self, seq: SeqId, from: usize, to: usize) -> Vec<(usize, Vec<u8>)> {
        let Ok(full) = self.engine.full_blocks(seq) else {
            return Vec::new();
        };
        full.iter()
            .filter(|b| b.index >= from && b.index < to)
            .filter_map(|b| self.engine.export_block(b.block).ok().map(|bytes| (b.index, bytes)))
            .collect()
    }

    /// Samples the next token from `logits`, sends it and says whether the
    /// sequence is finished.
    fn step(&mut self, r: &mut Running, logits: &[f32]) -> Option<FinishReason> {
        let tok = match r.sampler.sample(logits) {
            Ok(t) => t,
            Err(e) => {
                let _ = r.out.send(Out::Failed(JobError::Engine(e.to_string())));
                return Some(FinishReason::MaxTokens);
            }
        };
        r.generated += 1;
        if r.out.send(Out::Token(tok)).is_err() {
            // The client went away.
            return Some(FinishReason::MaxTokens);
        }
        let len = self
            .engine
            .sequence(r.seq)
            .map_or(self.max_context, |s| s.tokens().len());
        if tok == EOS_TOKEN && !r.ignore_eos {
            Some(FinishReason::Eos)
        } else if r.generated >= r.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if len >= self.max_context {
            Some(FinishReason::ContextFull)
        } else {
            r.next = tok;
            None
        }
    }

    /// Caches the sequence's blocks, exports its generated full blocks,
    /// reports and removes it.
    fn finish(&mut self, r: Running, reason: FinishReason, report: bool) {
        self.cache_blocks(r.seq);
        let msg = (report && !r.out.is_closed()).then(|| {
            let tokens = self
                .engine
                .sequence(r.seq)
                .map(|s| s.tokens().to_vec())
                .unwrap_or_default();
            let blocks = if r.export {
                self.export(r.seq, r.prompt_blocks, usize::MAX)
            } else {
                Vec::new()
            };
            Out::Finished { reason, tokens, blocks }
        });
        let _ = self.engine.remove_sequence(r.seq);
        // The gauges are current before the client hears of the end.
        self.gauges();
        if let Some(m) = msg {
            let _ = r.out.send(m);
        }
    }

    fn decode(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let need = self
            .running
            .iter()
            .filter_map(|r| self.engine.sequence(r.seq))
            .filter(|s| s.tokens().len() + 1 > s.blocks().len() * self.tpb)
            .count();
        if !self.cache.make_room(&mut self.engine, need, &mut self.pending) {
            // Cannot happen while admission keeps its reserve; if it does,
            // the newest sequence gives way rather than everyone failing.
            if let Some(r) = self.running.pop() {
                let _ = r
                    .out
                    .send(Out::Failed(JobError::Capacity("the KV pool ran out of blocks".into())));
                let _ = self.engine.remove_sequence(r.seq);
            }
            self.gauges();
            return;
        }
        let steps: Vec<(SeqId, u32)> = self.running.iter().map(|r| (r.seq, r.next)).collect();
        let logits = match self.engine.decode_step(&steps) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "decode step failed");
                for r in std::mem::take(&mut self.running) {
                    let _ = r.out.send(Out::Failed(JobError::Engine(e.to_string())));
                    let _ = self.engine.remove_sequence(r.seq);
                }
                self.gauges();
                return;
            }
        };
        self.metrics.decode_steps.inc();
        self.metrics.decode_tokens.inc_by(steps.len() as u64);
        let running = std::mem::take(&mut self.running);
        for (mut r, logits) in running.into_iter().zip(logits) {
            match self.step(&mut r, &logits) {
                Some(reason) => self.finish(r, reason, true),
                None => self.running.push(r),
            }
        }
        self.gauges();
    }

    fn gauges(&self) {
        let m = &self.metrics;
        // Sequences in the engine: running, and a prefill batch's.
        m.running.set(self.engine.sequence_ids().len() as i64);
        m.pool_blocks
            .with_label_values(&["free"])
            .set(self.engine.pool().num_free() as i64);
        m.pool_blocks
            .with_label_values(&["cached"])
            .set(self.cache.len() as i64);
        let ev = self.cache.evicted();
        if ev > m.evictions.get() {
            m.evictions.inc_by(ev - m.evictions.get());
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(sink) = &self.events {
            sink.publish(&self.pending);
        }
        self.pending.clear();
        self.gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Model, ModelConfig};

    fn job(tokens: Vec<u32>, max_tokens: usize) -> (Job, mpsc::UnboundedReceiver<Out>) {
        let (out, rx) = mpsc::unbounded_channel();
        let job = Job {
            tokens,
            pinned: Pinned {
                blocks: Vec::new(),
                tx: None,
            },
            fabric: Vec::new(),
            max_tokens,
            sampling: Sampling::Greedy,
            ignore_eos: true,
            export_from: None,
            out,
        };
        (job, rx)
    }

    /// The last output of a job, waiting up to 10 s.
    fn last(rx: &mut mpsc::UnboundedReceiver<Out>) -> Option<Out> {
        let mut last = None;
        for _ in 0..1000 {
            match rx.try_recv() {
                Ok(o @ (Out::Finished { .. } | Out::Failed(_))) => return Some(o),
                Ok(o) => last = Some(o),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(10)),
                Err(mpsc::error::TryRecvError::Disconnected) => return last,
            }
        }
        None
    }

    /// Pins whose lookup reply was sent but never received (the client
    /// went away meanwhile) are given back: a job that can never fit then
    /// fails instead of waiting for pins that would never come back.
    #[test]
    fn pins_of_an_abandoned_lookup_come_back() {
        let engine = Engine::new(Model::from_seed(&ModelConfig::tiny()).unwrap(), 8).unwrap();
        let tpb = engine.config().tokens_per_block;
        let limits = Limits {
            max_batch_tokens: 2048,
            max_running: 4,
            salt: 0,
        };
        let (h, thread) = spawn(engine, limits, None, Arc::new(Metrics::new())).unwrap();
        let tokens: Vec<u32> = (0..3 * tpb as u32 + 1).map(|t| t % 200).collect();
        let (j, mut rx) = job(tokens.clone(), 1);
        h.submit(j).unwrap();
        assert!(matches!(last(&mut rx), Some(Out::Finished { .. })));

        // A lookup pins the cached blocks; its requester is gone by the
        // time the reply is there.
        let keys = chain_hashes(0, &tokens, tpb, &[]);
        let (reply, abandoned) = oneshot::channel();
        h.tx.send(Command::Lookup {
            keys: keys[..3].to_vec(),
            reply,
            unpin: h.tx.clone(),
        })
        .unwrap();
        let (reply, rx2) = oneshot::channel();
        h.tx.send(Command::Lookup {
            keys: Vec::new(),
            reply,
            unpin: h.tx.clone(),
        })
        .unwrap();
        // Commands run in order: the first reply was sent.
        drop(rx2.blocking_recv().unwrap());
        drop(abandoned);

        // Needs 9 blocks of a pool of 8: fails once no pin is out.
        let (j, mut rx) = job(vec![1; 6 * tpb], 3 * tpb);
        h.submit(j).unwrap();
        match last(&mut rx) {
            Some(Out::Failed(JobError::Capacity(_))) => {}
            other => panic!("expected a capacity failure, got {other:?}"),
        }
        h.shutdown();
        thread.join().unwrap();
    }
}
