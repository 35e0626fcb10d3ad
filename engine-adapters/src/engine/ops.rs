//! Numeric kernels of the reference model, f32 throughout: dot product,
//! matrix multiplication (optionally across threads), RMSNorm, RoPE, SiLU.
//!
//! Exactness rule: every output element is computed by the same sequence of
//! floating-point operations whatever the batch size, the other rows in the
//! batch or the number of threads. Threads only split *which* elements each
//! one computes, never a reduction. So a token's keys, values and logits do
//! not depend on how a sequence was split into prefill chunks.

use std::thread;

/// Work (multiply-adds) below which a matmul stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 21;
/// Lanes of the dot-product accumulator (independent, so LLVM vectorises).
const LANES: usize = 16;

/// `sum(a[i] * b[i])` in a fixed order: 16 lane accumulators, a fixed tree
/// over the lanes, then the tail.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ac = a.chunks_exact(LANES);
    let bc = b.chunks_exact(LANES);
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        let x: &[f32; LANES] = x.try_into().unwrap();
        let y: &[f32; LANES] = y.try_into().unwrap();
        for ((s, &xi), &yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    let mut tail = 0.0f32;
    for (&x, &y) in ar.iter().zip(br) {
        tail += x * y;
    }
    acc[0] + tail
}

/// `y[t][o] = dot(w[o], x[t])` for `o` in `o_lo..o_hi`, written at
/// `y[t * y_stride + (o - o_lo)]`. `w` is row-major `[out][in]` (the HF
/// `Linear` convention), `x` row-major `[n][in]`.
fn matmul_part(x: &[f32], w: &[f32], in_dim: usize, o_lo: usize, o_hi: usize, y: &mut [f32], y_stride: usize) {
    const TILE: usize = 8;
    let n = x.len() / in_dim;
    let mut t0 = 0;
    while t0 < n {
        let t1 = (t0 + TILE).min(n);
        for o in o_lo..o_hi {
            let row = &w[o * in_dim..(o + 1) * in_dim];
            for t in t0..t1 {
                y[t * y_stride + (o - o_lo)] = dot(row, &x[t * in_dim..(t + 1) * in_dim]);
            }
        }
        t0 = t1;
    }
}

/// `x [n][in] * w^T` with `w [out][in]`: returns `[n][out]`. Splits rows (or,
/// for few rows, output columns) across up to `threads` threads when the
/// work is large; the result is bit-identical for any thread count.
pub(crate) fn matmul(x: &[f32], w: &[f32], in_dim: usize, out_dim: usize, threads: usize) -> Vec<f32> {
    let n = x.len() / in_dim;
    debug_assert_eq!(x.len(), n * in_dim);
    debug_assert_eq!(w.len(), out_dim * in_dim);
    let mut y = vec![0.0f32; n * out_dim];
    let threads = threads.max(1);
    if threads == 1 || n * out_dim * in_dim < PAR_MIN_WORK {
        matmul_part(x, w, in_dim, 0, out_dim, &mut y, out_dim);
    } else if n >= 2 * threads {
        let rows = n.div_ceil(threads);
        thread::scope(|s| {
            for (xc, yc) in x.chunks(rows * in_dim).zip(y.chunks_mut(rows * out_dim)) {
                s.spawn(move || matmul_part(xc, w, in_dim, 0, out_dim, yc, out_dim));
            }
        });
    } else {
        let cols = out_dim.div_ceil(threads);
        let parts: Vec<(usize, Vec<f32>)> = thread::scope(|s| {
            let handles: Vec<_> = (0..out_dim)
                .step_by(cols)
                .map(|lo| {
                    let hi = (lo + cols).min(out_dim);
                    s.spawn(move || {
                        let mut part = vec![0.0f32; n * (hi - lo)];
                        matmul_part(x, w, in_dim, lo, hi, &mut part, hi - lo);
                        (lo, part)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (lo, part) in parts {
            let width = part.len() / n;
            for t in 0..n {
                y[t * out_dim + lo..t * out_dim + lo + width].copy_from_slice(&part[t * width..(t + 1) * width]);
            }
        }
    }
    y
}

/// Runs `f(first_row, rows)` over `out` split into row groups of `row_len`
/// values, on up to `threads` threads when `work` (a cost estimate) is
/// large. Each row is computed by `f` alone, so results do not depend on the
/// split.
pub(crate) fn par_rows<F>(out: &mut [f32], row_len: usize, threads: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let n = out.len() / row_len;
    let threads = threads.max(1).min(n.max(1));
    if threads == 1 || work < PAR_MIN_WORK {
        f(0, out);
        return;
    }
    let rows = n.div_ceil(threads);
    let f = &f;
    thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(rows * row_len).enumerate() {
            s.spawn(move || f(i * rows, chunk));
        }
    });
}

/// RMSNorm of each `dim`-wide row of `x`, times `weight`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, dim: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let mean = dot(xr, xr) / dim as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * g;
        }
    }
    y
}

/// SiLU(gate) * up, elementwise, into `gate`.
pub(crate) fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Rotary position embedding tables: `cos[pos][i]`, `sin[pos][i]` for
/// `i < head_dim / 2`, angle `pos * theta^(-2i / head_dim)` (computed in f64,
/// rounded to f32).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, theta: f64, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for i in 0..half {
                let inv_freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every `head_dim`-wide head of `row` (one token) for `pos`,
    /// HF "rotate half" convention: `x[i], x[i + d/2]` is the pair rotated
    /// by angle `i`.
    pub(crate) fn apply(&self, row: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in row.chunks_exact_mut(2 * self.half) {
            let (lo, hi) = head.split_at_mut(self.half);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x2 * c + x1 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], in_dim: usize, out_dim: usize) -> Vec<f64> {
        let n = x.len() / in_dim;
        let mut y = vec![0.0; n * out_dim];
        for t in 0..n {
            for o in 0..out_dim {
                y[t * out_dim + o] = (0..in_dim)
                    .map(|i| f64::from(x[t * in_dim + i]) * f64::from(w[o * in_dim + i]))
                    .sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::engine::rng::SplitMix64::new(seed);
        (0..len).map(|_| r.uniform(1.0)).collect()
    }

    #[test]
    fn matmul_matches_naive_and_is_thread_invariant() {
        for &(n, i, o) in &[(1, 7, 5), (3, 33, 17), (64, 96, 130), (5, 512, 1200)] {
            let x = data(n * i, 1);
            let w = data(o * i, 2);
            let y1 = matmul(&x, &w, i, o, 1);
            for (a, b) in y1.iter().zip(naive(&x, &w, i, o)) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "{a} vs {b}");
            }
            for threads in [2, 3, 8] {
                assert_eq!(matmul(&x, &w, i, o, threads), y1, "n={n} threads={threads}");
            }
            // A row's result does not depend on the other rows.
            let first = matmul(&x[..i], &w, i, o, 1);
            assert_eq!(&y1[..o], &first[..]);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let rope = Rope::new(8, 10_000.0, 16);
        let mut row = data(16, 3);
        let before = dot(&row, &row);
        let orig = row.clone();
        rope.apply(&mut row, 0);
        assert_eq!(row, orig, "position 0 is the identity");
        rope.apply(&mut row, 5);
        assert!((dot(&row, &row) - before).abs() < 1e-4);
        // Pair (0, 4) of the first head rotated by angle 5 * theta^0 = 5.
        let (c, s) = (5f64.cos() as f32, 5f64.sin() as f32);
        assert!((row[0] - (orig[0] * c - orig[4] * s)).abs() < 1e-6);
        assert!((row[4] - (orig[4] * c + orig[0] * s)).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_has_unit_rms() {
        let x = data(64, 4);
        let y = rms_norm(&x, &[1.0; 32], 1e-6, 32);
        for row in y.chunks(32) {
            let rms = (dot(row, row) / 32.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-3, "{rms}");
        }
    }
}
