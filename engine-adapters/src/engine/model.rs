//! The Llama forward pass over a paged KV cache: embedding, per layer
//! RMSNorm -> Q/K/V projections -> RoPE -> grouped-query causal attention ->
//! output projection -> residual -> RMSNorm -> SwiGLU MLP -> residual, then
//! the final norm and the LM head. f32 throughout.
//!
//! A batch is any number of sequences, each contributing the tokens after
//! what its blocks already hold. The new tokens' keys and values are written
//! into the pool first; attention then reads every position, cached or new,
//! from the pool, one query at a time, over positions `0..=pos` in order. A
//! position's output is therefore the same whether its prefix was computed
//! in this batch, an earlier one, or imported as bytes.

use super::config::ModelConfig;
use super::error::WeightError;
use super::kv::{BlockId, BlockPool};
use super::ops::{Rope, dot, matmul, par_rows, rms_norm, swiglu};
use super::weights::Weights;

/// One sequence's share of a forward batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardItem<'a> {
    /// Block table covering every position up to `start + tokens.len()`.
    pub(crate) blocks: &'a [BlockId],
    /// Position of `tokens[0]`; positions `0..start` are already in `blocks`.
    pub(crate) start: usize,
    /// Tokens to compute (at least one).
    pub(crate) tokens: &'a [u32],
}

/// A Llama model ready to run: weights, RoPE tables and a thread count.
#[derive(Debug, Clone)]
pub struct Model {
    weights: Weights,
    rope: Rope,
    threads: usize,
}

impl Model {
    /// A model over `weights` (which carry their config). Runs on
    /// `available_parallelism` threads, at most 8; see [`Model::set_threads`].
    pub fn new(weights: Weights) -> Self {
        let c = weights.config();
        let rope = Rope::new(c.head_dim(), c.rope_theta, c.max_context);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self { weights, rope, threads }
    }

    /// A model with weights generated from `config.seed`.
    pub fn from_seed(config: &ModelConfig) -> Result<Self, WeightError> {
        Ok(Self::new(Weights::generate(config)?))
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.weights.config()
    }

    /// The weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Threads the large matmuls and attention are split across (at least
    /// 1). Results are bit-identical for every thread count.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Sets the thread count (0 is taken as 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Runs the batch, writing each new token's keys and values into its
    /// sequence's blocks, and returns the logits of each item's last token.
    ///
    /// The caller guarantees: every item has at least one token, all token
    /// ids are in the vocabulary, positions stay within `max_context`, the
    /// blocks cover every position and those receiving new tokens are
    /// filling blocks owned by that sequence alone.
    pub(crate) fn forward(&self, pool: &mut BlockPool, items: &[ForwardItem<'_>]) -> Vec<Vec<f32>> {
        let c = self.config();
        let (hidden, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv, inter) = (c.num_attention_heads, c.num_kv_heads, c.intermediate_size);
        let (qw, kvw) = (nh * hd, nkv * hd);
        let tpb = c.tokens_per_block;
        let threads = self.threads;

        // Flatten the batch: row r is token `tokens[j]` of item `owner[r]`
        // at absolute position `pos[r]`.
        let n: usize = items.iter().map(|it| it.tokens.len()).sum();
        let mut owner = Vec::with_capacity(n);
        let mut pos = Vec::with_capacity(n);
        let mut x = Vec::with_capacity(n * hidden);
        let embed = self.weights.embed();
        for (i, it) in items.iter().enumerate() {
            for (j, &tok) in it.tokens.iter().enumerate() {
                owner.push(i);
                pos.push(it.start + j);
                let t = tok as usize;
                x.extend_from_slice(&embed[t * hidden..(t + 1) * hidden]);
            }
        }

        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..c.num_layers {
            let lw = self.weights.layer(l);
            let h = rms_norm(&x, lw.input_norm, c.rms_norm_eps, hidden);
            let mut q = matmul(&h, lw.q, hidden, qw, threads);
            let mut k = matmul(&h, lw.k, hidden, kvw, threads);
            let v = matmul(&h, lw.v, hidden, kvw, threads);
            for r in 0..n {
                self.rope.apply(&mut q[r * qw..(r + 1) * qw], pos[r]);
                self.rope.apply(&mut k[r * kvw..(r + 1) * kvw], pos[r]);
                let p = pos[r];
                let block = items[owner[r]].blocks[p / tpb];
                pool.write_token(
                    block,
                    p % tpb,
                    l,
                    &k[r * kvw..(r + 1) * kvw],
                    &v[r * kvw..(r + 1) * kvw],
                );
            }

            // Attention, one query row at a time.
            let pool_ref: &BlockPool = pool;
            let mut attn = vec![0.0f32; n * qw];
            let work: usize = pos.iter().map(|p| (p + 1) * qw * 2).sum();
            par_rows(&mut attn, qw, threads, work, |first, out| {
                let mut scores = Vec::new();
                for (ri, orow) in out.chunks_exact_mut(qw).enumerate() {
                    let r = first + ri;
                    let p = pos[r];
                    let blocks = items[owner[r]].blocks;
                    for head in 0..nh {
                        let g = head / (nh / nkv);
                        let qv = &q[r * qw + head * hd..r * qw + (head + 1) * hd];
                        scores.clear();
                        let mut max = f32::NEG_INFINITY;
                        for j in 0..=p {
                            let s = dot(qv, pool_ref.read(blocks[j / tpb], l, 0, j % tpb, g)) * scale;
                            max = max.max(s);
                            scores.push(s);
                        }
                        let mut sum = 0.0f32;
                        for s in scores.iter_mut() {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        let inv = 1.0 / sum;
                        let o = &mut orow[head * hd..(head + 1) * hd];
                        o.fill(0.0);
                        for (j, &e) in scores.iter().enumerate() {
                            let w = e * inv;
                            let vv = pool_ref.read(blocks[j / tpb], l, 1, j % tpb, g);
                            for (acc, &val) in o.iter_mut().zip(vv) {
                                *acc += w * val;
                            }
                        }
                    }
                }
            });

            let o = matmul(&attn, lw.o, qw, hidden, threads);
            add_assign(&mut x, &o);
            let h = rms_norm(&x, lw.post_norm, c.rms_norm_eps, hidden);
            let mut gate = matmul(&h, lw.gate, hidden, inter, threads);
            let up = matmul(&h, lw.up, hidden, inter, threads);
            swiglu(&mut gate, &up);
            let down = matmul(&gate, lw.down, inter, hidden, threads);
            add_assign(&mut x, &down);
        }

        // Final norm and LM head for each item's last token only.
        let mut last = Vec::with_capacity(items.len() * hidden);
        let mut row = 0;
        for it in items {
            row += it.tokens.len();
            last.extend_from_slice(&x[(row - 1) * hidden..row * hidden]);
        }
        let normed = rms_norm(&last, self.weights.final_norm(), c.rms_norm_eps, hidden);
        let logits = matmul(&normed, self.weights.lm_head(), hidden, c.vocab_size, threads);
        logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect()
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
