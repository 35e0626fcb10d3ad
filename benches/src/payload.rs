//! Deterministic payloads. Benchmarks make every payload before the clock
//! starts, so generating bytes is never what is measured, and a read can be
//! checked byte for byte against what was written.

use bytes::Bytes;

/// Fills `buf` with a pseudo-random pattern derived from `seed` (xorshift64,
/// eight bytes a step). Different seeds give different bytes.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()
    };
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&next());
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&next()[..n]);
}

/// A payload of `len` bytes derived from `seed`.
pub fn payload(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    fill(seed, &mut v);
    Bytes::from(v)
}

/// One payload and its xxh3-64 checksum (what a block header carries).
#[derive(Clone, Debug)]
pub struct Payload {
    /// The bytes.
    pub bytes: Bytes,
    /// xxh3-64 of `bytes`, computed once.
    pub checksum: u64,
}

/// A fixed set of distinct payloads of one size. Key `i` of a workload is
/// written with [`PayloadPool::pick`]`(i)`, so a read that returns another
/// key's bytes is caught unless both keys map to the same payload.
#[derive(Clone, Debug)]
pub struct PayloadPool {
    size: usize,
    items: Vec<Payload>,
}

impl PayloadPool {
    /// `count` (at least one) distinct payloads of `size` bytes; `seed` picks
    /// the family.
    pub fn new(size: usize, count: usize, seed: u64) -> Self {
        let items = (0..count.max(1) as u64)
            .map(|i| {
                let bytes = payload(seed.wrapping_mul(1_000_003).wrapping_add(i), size);
                let checksum = kvfabric_tiers::checksum(&bytes);
                Payload { bytes, checksum }
            })
            .collect();
        Self { size, items }
    }

    /// A pool whose payloads take at most `budget` bytes in all, but no more
    /// payloads than `wanted` and at least one.
    pub fn within(size: usize, wanted: u64, budget: u64, seed: u64) -> Self {
        let fit = (budget / size.max(1) as u64).max(1);
        Self::new(size, wanted.clamp(1, fit) as usize, seed)
    }

    /// Payload size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of distinct payloads.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Always false: a pool holds at least one payload.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The payload for index `i` (wrapping around the pool).
    pub fn pick(&self, i: u64) -> &Payload {
        &self.items[(i % self.items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_deterministic_and_distinct() {
        assert_eq!(payload(3, 1001), payload(3, 1001));
        assert_ne!(payload(3, 1001), payload(4, 1001));
        let pool = PayloadPool::within(4096, 100, 4 * 4096, 7);
        assert_eq!(pool.len(), 4);
        assert_ne!(pool.pick(0).bytes, pool.pick(1).bytes);
        assert_eq!(pool.pick(5).bytes, pool.pick(1).bytes);
        assert_eq!(pool.pick(2).checksum, kvfabric_tiers::checksum(&pool.pick(2).bytes));
    }
}
