//! The serving API: an [`Engine`] owns a [`Model`], a [`BlockPool`] and its
//! sequences; it runs batched prefill (each sequence may start from KV
//! blocks that are already in the pool or imported as bytes, so only the
//! tokens after the cached prefix are computed), batched decode steps and a
//! generation loop that samples until EOS or `max_tokens`.
//!
//! Every operation validates its whole batch before changing anything, and
//! block allocation is all-or-nothing per call, so an error leaves the engine
//! as it was.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::config::ModelConfig;
use super::error::{EngineError, KvError};
use super::kv::{BlockId, BlockPool, KvLayout};
use super::model::{ForwardItem, Model};
use super::sampler::{Sampler, Sampling};
use super::tokenizer::EOS_TOKEN;

/// Identifies a sequence within its [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The raw id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One sequence: its tokens, block table and how far its KV is computed.
#[derive(Debug, Clone)]
pub struct Sequence {
    id: SeqId,
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    computed: usize,
    cached: usize,
}

impl Sequence {
    /// Its id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Every token fed to the sequence (prompt, appended and decoded).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens whose keys and values are in the sequence's blocks.
    pub fn num_computed(&self) -> usize {
        self.computed
    }

    /// Tokens waiting for prefill.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Leading tokens whose KV came from blocks given at creation (shared or
    /// imported) rather than being computed here.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// The block table: block `i` holds positions `i * tokens_per_block ..`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
}

/// A full block of a sequence, as [`Engine::full_blocks`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullBlock {
    /// Index of the block in the sequence (`0` holds the first
    /// `tokens_per_block` tokens).
    pub index: usize,
    /// The block in the pool (for [`Engine::export_block`]).
    pub block: BlockId,
    /// The tokens whose KV it holds.
    pub tokens: Vec<u32>,
}

/// Counters since the engine was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Tokens computed by [`Engine::prefill`] (cached prefixes excluded).
    pub prefill_tokens_computed: u64,
    /// Tokens computed by [`Engine::decode_step`].
    pub decode_tokens_computed: u64,
    /// Prompt tokens whose KV came from given blocks instead.
    pub cached_prefix_tokens: u64,
    /// Prefill batches run.
    pub prefill_batches: u64,
    /// Decode steps run.
    pub decode_steps: u64,
}

/// What a generation does after the prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    /// Most tokens to generate (0: only prefill).
    pub max_tokens: usize,
    /// How to pick them.
    pub sampling: Sampling,
}

impl GenerationParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            sampling: Sampling::Greedy,
        }
    }
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS was sampled (it is the last generated token).
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence reached `max_context`.
    ContextFull,
}

/// The result of [`Engine::generate`] for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The sequence (still in the engine; remove it when done).
    pub seq: SeqId,
    /// Generated tokens, EOS included when sampled. Every token but the last
    /// was fed back into the sequence.
    pub tokens: Vec<u32>,
    /// Logits after the prompt (what the first token was sampled from).
    pub first_logits: Vec<f32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// The reference engine: a model, a pool of KV blocks and the sequences
/// using them.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    pool: BlockPool,
    seqs: BTreeMap<SeqId, Sequence>,
    next_seq: u64,
    stats: EngineStats,
}

impl Engine {
    /// An engine running `model` with a pool of `capacity_blocks` KV blocks.
    pub fn new(model: Model, capacity_blocks: usize) -> Result<Self, EngineError> {
        let pool = BlockPool::new(model.config().kv_layout(), capacity_blocks)?;
        Ok(Self {
            model,
            pool,
            seqs: BTreeMap::new(),
            next_seq: 0,
            stats: EngineStats::default(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Layout of every KV block.
    pub fn kv_layout(&self) -> &KvLayout {
        self.pool.layout()
    }

    /// The block pool (read-only: blocks change through the engine).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Sets the compute thread count; results do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.model.set_threads(threads);
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Tokens computed by prefill so far (cached prefixes excluded).
    pub fn prefill_tokens_computed(&self) -> u64 {
        self.stats.prefill_tokens_computed
    }

    /// A sequence by id.
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Ids of all sequences, ascending.
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// Adds a sequence with `prompt` waiting for prefill. `cached_prefix`
    /// are full blocks already in the pool holding the KV of the prompt's
    /// first `cached_prefix.len() * tokens_per_block` tokens, in order (the
    /// caller vouches that they match those tokens); each gets one more
    /// reference. At least the last prompt token is always computed (its
    /// logits are needed), so blocks beyond `(prompt.len() - 1) /
    /// tokens_per_block` are not used.
    pub fn add_sequence(&mut self, prompt: &[u32], cached_prefix: &[BlockId]) -> Result<SeqId, EngineError> {
        self.check_prompt(prompt)?;
        let usable = cached_prefix.len().min(self.max_cached_blocks(prompt.len()));
        let prefix = &cached_prefix[..usable];
        for &b in prefix {
            match self.pool.is_full(b) {
                None => return Err(KvError::UnknownBlock(b.index()).into()),
                Some(false) => return Err(KvError::BlockNotFull(b.index()).into()),
                Some(true) => {}
            }
        }
        for &b in prefix {
            self.pool.retain(b)?;
        }
        Ok(self.insert(prompt, prefix.to_vec()))
    }

    /// Adds a sequence like [`Engine::add_sequence`], its prefix given as
    /// exported block bytes (imported into the pool, owned by the sequence).
    /// If any block fails to import, none stays imported.
    pub fn add_sequence_from_bytes<B: AsRef<[u8]>>(
        &mut self,
        prompt: &[u32],
        cached_prefix: &[B],
    ) -> Result<SeqId, EngineError> {
        self.check_prompt(prompt)?;
        let usable = cached_prefix.len().min(self.max_cached_blocks(prompt.len()));
        let mut blocks = Vec::with_capacity(usable);
        for bytes in &cached_prefix[..usable] {
            match self.pool.import_block(bytes.as_ref()) {
                Ok(b) => blocks.push(b),
                Err(e) => {
                    self.release_all(&blocks);
                    return Err(e.into());
                }
            }
        }
        Ok(self.insert(prompt, blocks))
    }

    /// Appends tokens to a sequence, waiting for the next prefill (chunked
    /// prefill, or a further turn).
    pub fn append_tokens(&mut self, id: SeqId, tokens: &[u32]) -> Result<(), EngineError> {
        let max_context = self.config().max_context;
        let vocab_size = self.config().vocab_size;
        let seq = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        check_tokens(tokens, vocab_size)?;
        let len = seq.tokens.len() + tokens.len();
        if len > max_context {
            return Err(EngineError::ContextExceeded { len, max_context });
        }
        seq.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Computes every waiting token of each sequence, in one batch, and
    /// returns the logits (one per vocabulary entry) after each sequence's
    /// last token, in the order of `ids`.
    pub fn prefill(&mut self, ids: &[SeqId]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.check_batch(ids.iter().copied())?;
        for id in ids {
            if self.seqs[id].num_pending() == 0 {
                return Err(EngineError::NothingToPrefill(id.0));
            }
        }
        self.ensure_blocks(ids)?;
        let computed: usize = ids.iter().map(|id| self.seqs[id].num_pending()).sum();
        let logits = self.run(ids);
        self.stats.prefill_tokens_computed += computed as u64;
        self.stats.prefill_batches += 1;
        Ok(logits)
    }

    /// One decode step: appends each token to its (fully computed)
    /// sequence, computes them in one batch and returns the logits after
    /// each, in order.
    pub fn decode_step(&mut self, steps: &[(SeqId, u32)]) -> Result<Vec<Vec<f32>>, EngineError> {
        let ids: Vec<SeqId> = steps.iter().map(|&(id, _)| id).collect();
        self.check_batch(ids.iter().copied())?;
        let (max_context, vocab_size) = (self.config().max_context, self.config().vocab_size);
        for &(id, tok) in steps {
            let seq = &self.seqs[&id];
            if seq.num_pending() > 0 {
                return Err(EngineError::NotPrefilled(id.0));
            }
            check_tokens(&[tok], vocab_size)?;
            if seq.tokens.len() + 1 > max_context {
                return Err(EngineError::ContextExceeded {
                    len: seq.tokens.len() + 1,
                    max_context,
                });
            }
        }
        for &(id, tok) in steps {
            self.seqs.get_mut(&id).unwrap().tokens.push(tok);
        }
        if let Err(e) = self.ensure_blocks(&ids) {
            for id in &ids {
                self.seqs.get_mut(id).unwrap().tokens.pop();
            }
            return Err(e);
        }
        let logits = self.run(&ids);
        self.stats.decode_tokens_computed += steps.len() as u64;
        self.stats.decode_steps += 1;
        Ok(logits)
    }

    /// Prefills the given sequences together, then decodes them together,
    /// each sampling with its own parameters, until each samples EOS,
    /// reaches its `max_tokens` or fills the context. Sequences stay in the
    /// engine (their full blocks can be exported) until removed. An error
    /// part-way (pool exhausted) leaves what was computed so far.
    pub fn generate(&mut self, requests: &[(SeqId, GenerationParams)]) -> Result<Vec<Generation>, EngineError> {
        let ids: Vec<SeqId> = requests.iter().map(|&(id, _)| id).collect();
        self.check_batch(ids.iter().copied())?;
        let mut samplers = requests
            .iter()
            .map(|(_, p)| Sampler::new(p.sampling))
            .collect::<Result<Vec<_>, _>>()?;
        let first = self.prefill(&ids)?;
        let max_context = self.config().max_context;
        let mut out: Vec<Generation> = ids
            .iter()
            .zip(first)
            .map(|(&seq, first_logits)| Generation {
                seq,
                tokens: Vec::new(),
                first_logits,
                finish_reason: FinishReason::MaxTokens,
            })
            .collect();
        // (index into requests, logits to sample from next)
        let mut active: Vec<(usize, Vec<f32>)> = out
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| requests[*i].1.max_tokens > 0)
            .map(|(i, g)| (i, g.first_logits.clone()))
            .collect();
        while !active.is_empty() {
            let mut steps = Vec::with_capacity(active.len());
            let mut stepping = Vec::with_capacity(active.len());
            for (i, logits) in &active {
                let tok = samplers[*i].sample(logits)?;
                let g = &mut out[*i];
                g.tokens.push(tok);
                let len = self.seqs[&g.seq].tokens.len();
                if tok == EOS_TOKEN {
                    g.finish_reason = FinishReason::Eos;
                } else if g.tokens.len() >= requests[*i].1.max_tokens {
                    g.finish_reason = FinishReason::MaxTokens;
                } else if len >= max_context {
                    g.finish_reason = FinishReason::ContextFull;
                } else {
                    steps.push((g.seq, tok));
                    stepping.push(*i);
                }
            }
            if steps.is_empty() {
                break;
            }
            let logits = self.decode_step(&steps)?;
            active = stepping.into_iter().zip(logits).collect();
        }
        Ok(out)
    }

    /// The full blocks of a sequence (every token computed), in order, with
    /// their tokens, so a caller can key and store them.
    pub fn full_blocks(&self, id: SeqId) -> Result<Vec<FullBlock>, EngineError> {
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        let tpb = self.config().tokens_per_block;
        Ok((0..seq.computed / tpb)
            .map(|index| FullBlock {
                index,
                block: seq.blocks[index],
                tokens: seq.tokens[index * tpb..(index + 1) * tpb].to_vec(),
            })
            .collect())
    }

    /// Bytes of a full block (layout in the `kv` module doc).
    pub fn export_block(&self, block: BlockId) -> Result<Vec<u8>, EngineError> {
        Ok(self.pool.export_block(block)?)
    }

    /// Imports a full block from bytes; the caller holds its one reference
    /// (pass it to [`Engine::add_sequence`], then [`Engine::release_block`]).
    pub fn import_block(&mut self, bytes: &[u8]) -> Result<BlockId, EngineError> {
        Ok(self.pool.import_block(bytes)?)
    }

    /// Adds a reference to a full block that the caller keeps (a prefix
    /// cache keeping a finished sequence's blocks); drop it with
    /// [`Engine::release_block`]. Only full blocks can be shared.
    pub fn retain_block(&mut self, block: BlockId) -> Result<(), EngineError> {
        match self.pool.is_full(block) {
            None => Err(KvError::UnknownBlock(block.index()).into()),
            Some(false) => Err(KvError::BlockNotFull(block.index()).into()),
            Some(true) => Ok(self.pool.retain(block)?),
        }
    }

    /// Drops a reference the caller holds (from [`Engine::import_block`]
    /// or [`Engine::retain_block`]).
    pub fn release_block(&mut self, block: BlockId) -> Result<(), EngineError> {
        self.pool.release(block)?;
        Ok(())
    }

    /// Removes a sequence, dropping its block references.
    pub fn remove_sequence(&mut self, id: SeqId) -> Result<(), EngineError> {
        let seq = self.seqs.remove(&id).ok_or(EngineError::UnknownSequence(id.0))?;
        self.release_all(&seq.blocks);
        Ok(())
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let max_context = self.config().max_context;
        if prompt.len() > max_context {
            return Err(EngineError::ContextExceeded {
                len: prompt.len(),
                max_context,
            });
        }
        check_tokens(prompt, self.config().vocab_size)
    }

    fn max_cached_blocks(&self, prompt_len: usize) -> usize {
        (prompt_len - 1) / self.config().tokens_per_block
    }

    fn insert(&mut self, prompt: &[u32], blocks: Vec<BlockId>) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let cached = blocks.len() * self.config().tokens_per_block;
        self.stats.cached_prefix_tokens += cached as u64;
        self.seqs.insert(
            id,
            Sequence {
                id,
                tokens: prompt.to_vec(),
                blocks,
                computed: cached,
                cached,
            },
        );
        id
    }

    fn check_batch(&self, ids: impl Iterator<Item = SeqId>) -> Result<(), EngineError> {
        let mut seen = HashSet::new();
        for id in ids {
            if !self.seqs.contains_key(&id) {
                return Err(EngineError::UnknownSequence(id.0));
            }
            if !seen.insert(id) {
                return Err(EngineError::DuplicateSequence(id.0));
            }
        }
        Ok(())
    }

    /// Gives every sequence enough blocks for all its tokens, all or none.
    fn ensure_blocks(&mut self, ids: &[SeqId]) -> Result<(), EngineError> {
        let tpb = self.config().tokens_per_block;
        let needed: usize = ids
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                s.tokens.len().div_ceil(tpb).saturating_sub(s.blocks.len())
            })
            .sum();
        if needed > self.pool.num_free() {
            return Err(KvError::PoolExhausted {
                needed,
                free: self.pool.num_free(),
                capacity: self.pool.capacity(),
            }
            .into());
        }
        for id in ids {
            let seq = self.seqs.get_mut(id).unwrap();
            while seq.blocks.len() * tpb < seq.tokens.len() {
                seq.blocks.push(self.pool.allocate()?);
            }
        }
        Ok(())
    }

    /// Runs the forward pass over every waiting token of `ids` (validated,
    /// blocks ensured), marks the blocks that became full, returns logits.
    fn run(&mut self, ids: &[SeqId]) -> Vec<Vec<f32>> {
        let tpb = self.config().tokens_per_block;
        let logits = {
            let items: Vec<ForwardItem<'_>> = ids
                .iter()
                .map(|id| {
                    let s = &self.seqs[id];
                    ForwardItem {
                        blocks: &s.blocks,
                        start: s.computed,
                        tokens: &s.tokens[s.computed..],
                    }
                })
                .collect();
            self.model.forward(&mut self.pool, &items)
        };
        for id in ids {
            let seq = self.seqs.get_mut(id).unwrap();
            let before = seq.computed / tpb;
            seq.computed = seq.tokens.len();
            for &b in &seq.blocks[before..seq.computed / tpb] {
                self.pool.seal(b);
            }
        }
        logits
    }

    fn release_all(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            // Blocks held by the engine are live by construction.
            let _ = self.pool.release(b);
        }
    }
}

fn check_tokens(tokens: &[u32], vocab_size: usize) -> Result<(), EngineError> {
    match tokens.iter().find(|&&t| t as usize >= vocab_size) {
        Some(&token) => Err(EngineError::InvalidToken { token, vocab_size }),
        None => Ok(()),
    }
}
