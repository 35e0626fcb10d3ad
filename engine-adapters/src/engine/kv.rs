//! The paged KV cache: a [`BlockPool`] of fixed-size blocks, each holding the
//! keys and values of `tokens_per_block` consecutive tokens for every layer,
//! with reference counts (prefix sharing), and the byte layout
//! ([`KvLayout`]) blocks are exported in and imported from.
//!
//! # Block lifecycle
//!
//! A block is *free*, then *filling* once [`BlockPool::allocate`]d (writable
//! by the one sequence that owns it), then *full* once the engine has
//! computed all of its tokens (or once it was [`BlockPool::import_block`]ed).
//! A full block is immutable: only full blocks can be exported or shared
//! between sequences. Releasing the last reference frees the block.
//!
//! # Byte layout of an exported block
//!
//! `num_layers * 2 * tokens_per_block * num_kv_heads * head_dim` f32 values,
//! little-endian, in the order `[layer][K, V][token][kv_head][head_dim]`:
//! the element `(layer, part, token, head, d)` (part 0 = K, 1 = V) is at
//! f32 index
//! `(((layer * 2 + part) * tokens_per_block + token) * num_kv_heads + head) * head_dim + d`.
//! Keys are stored after RoPE, exactly as attention reads them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::KvError;

/// Index of a block in its [`BlockPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(u32);

impl BlockId {
    /// The index within the pool, `0..capacity`.
    pub fn index(self) -> u32 {
        self.0
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Everything that decides how a KV block's bytes are laid out; two engines
/// may exchange blocks only when their layouts are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    /// Model identifier.
    pub model_id: String,
    /// Element type; the reference engine stores `"f32"`.
    pub dtype: String,
    /// Transformer layers in a block.
    pub num_layers: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// KV heads.
    pub num_kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
}

impl KvLayout {
    /// The only dtype the reference engine stores.
    pub const DTYPE_F32: &'static str = "f32";

    /// f32 values in one block.
    pub fn block_floats(&self) -> usize {
        self.num_layers as usize
            * 2
            * self.tokens_per_block as usize
            * self.num_kv_heads as usize
            * self.head_dim as usize
    }

    /// Bytes of one exported block: `block_floats() * 4`.
    pub fn block_bytes(&self) -> usize {
        self.block_floats() * 4
    }

    /// f32 index within a block of the first element of
    /// `(layer, part, token, head)` (part 0 = K, 1 = V); see the module doc.
    pub fn offset(&self, layer: usize, part: usize, token: usize, head: usize) -> usize {
        (((layer * 2 + part) * self.tokens_per_block as usize + token) * self.num_kv_heads as usize + head)
            * self.head_dim as usize
    }
}

/// A fixed-capacity pool of KV blocks with reference counts.
///
/// Never panics on bad ids or exhaustion: those are [`KvError`]s.
#[derive(Debug)]
pub struct BlockPool {
    layout: KvLayout,
    block_floats: usize,
    capacity: usize,
    data: Vec<f32>,
    refs: Vec<u32>,
    full: Vec<bool>,
    /// Free block indices; allocation pops from the end.
    free: Vec<u32>,
}

impl BlockPool {
    /// A pool of `capacity` blocks of `layout`, all free. The memory
    /// (`capacity * layout.block_bytes()`) is reserved up front; a failed
    /// reservation is an error, not an abort.
    pub fn new(layout: KvLayout, capacity: usize) -> Result<Self, KvError> {
        if layout.dtype != KvLayout::DTYPE_F32 {
            return Err(KvError::InvalidLayout(format!(
                "dtype {:?}: the reference engine stores f32",
                layout.dtype
            )));
        }
        let block_floats = layout.block_floats();
        if block_floats == 0 {
            return Err(KvError::InvalidLayout(format!("{layout:?} has an empty block")));
        }
        if capacity == 0 || capacity > u32::MAX as usize {
            return Err(KvError::InvalidLayout(format!(
                "pool capacity {capacity} must be 1 to {}",
                u32::MAX
            )));
        }
        let total = block_floats
            .checked_mul(capacity)
            .ok_or_else(|| KvError::InvalidLayout(format!("{capacity} blocks of {block_floats} f32 overflow")))?;
        let mut data = Vec::new();
        data.try_reserve_exact(total).map_err(|e| {
            KvError::InvalidLayout(format!("cannot reserve {capacity} blocks ({} bytes): {e}", total * 4))
        })?;
        data.resize(total, 0.0);
        Ok(Self {
            layout,
            block_floats,
            capacity,
            data,
            refs: vec![0; capacity],
            full: vec![false; capacity],
            free: (0..capacity as u32).rev().collect(),
        })
    }

    /// The layout of every block.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Free blocks.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use (referenced at least once).
    pub fn num_used(&self) -> usize {
        self.capacity - self.free.len()
    }

    /// Allocates a zeroed, writable block with one reference.
    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        let Some(index) = self.free.pop() else {
            return Err(KvError::PoolExhausted {
                needed: 1,
                free: 0,
                capacity: self.capacity,
            });
        };
        let i = index as usize;
        self.refs[i] = 1;
        self.full[i] = false;
        self.block_data_mut(i).fill(0.0);
        Ok(BlockId(index))
    }

    /// Adds a reference to an allocated block.
    pub fn retain(&mut self, id: BlockId) -> Result<(), KvError> {
        let i = self.live(id)?;
        self.refs[i] = self.refs[i].checked_add(1).ok_or(KvError::UnknownBlock(id.0))?;
        Ok(())
    }

    /// Drops a reference; returns whether that freed the block.
    pub fn release(&mut self, id: BlockId) -> Result<bool, KvError> {
        let i = self.live(id)?;
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.full[i] = false;
            self.free.push(id.0);
            return Ok(true);
        }
        Ok(false)
    }

    /// References held on the block, `None` if it is free or out of range.
    pub fn ref_count(&self, id: BlockId) -> Option<u32> {
        self.refs.get(id.0 as usize).copied().filter(|&r| r > 0)
    }

    /// Whether the block is full (immutable, exportable, shareable); `None`
    /// if it is free or out of range.
    pub fn is_full(&self, id: BlockId) -> Option<bool> {
        self.ref_count(id).map(|_| self.full[id.0 as usize])
    }

    /// The bytes of a full block in the layout of the module doc.
    pub fn export_block(&self, id: BlockId) -> Result<Vec<u8>, KvError> {
        let mut out = vec![0u8; self.layout.block_bytes()];
        self.export_block_into(id, &mut out)?;
        Ok(out)
    }

    /// Writes the bytes of a full block into `out`, which must be exactly
    /// `layout().block_bytes()` long.
    pub fn export_block_into(&self, id: BlockId, out: &mut [u8]) -> Result<(), KvError> {
        let i = self.live(id)?;
        if !self.full[i] {
            return Err(KvError::BlockNotFull(id.0));
        }
        if out.len() != self.layout.block_bytes() {
            return Err(KvError::WrongBlockLength {
                expected: self.layout.block_bytes(),
                actual: out.len(),
            });
        }
        for (dst, v) in out.chunks_exact_mut(4).zip(self.block_data(i)) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Creates a full block with one reference from exported bytes. The
    /// length must be `layout().block_bytes()` and every value finite; the
    /// block then holds exactly what the exporting engine computed.
    pub fn import_block(&mut self, bytes: &[u8]) -> Result<BlockId, KvError> {
        if bytes.len() != self.layout.block_bytes() {
            return Err(KvError::WrongBlockLength {
                expected: self.layout.block_bytes(),
                actual: bytes.len(),
            });
        }
        if let Some(index) = bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        {
            return Err(KvError::NonFiniteBlock { index });
        }
        let id = self.allocate()?;
        let i = id.0 as usize;
        for (dst, src) in self.block_data_mut(i).iter_mut().zip(bytes.chunks_exact(4)) {
            *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
        self.full[i] = true;
        Ok(id)
    }

    /// Marks a block full (immutable). Engine use only.
    pub(crate) fn seal(&mut self, id: BlockId) {
        self.full[id.0 as usize] = true;
    }

    /// Writes the key and value of one token of one layer into a filling
    /// block. `k` and `v` are `num_kv_heads * head_dim` long.
    pub(crate) fn write_token(&mut self, id: BlockId, slot: usize, layer: usize, k: &[f32], v: &[f32]) {
        let i = id.0 as usize;
        debug_assert!(
            !self.full[i] && self.refs[i] == 1,
            "writing into shared or full block {i}"
        );
        let ko = self.layout.offset(layer, 0, slot, 0);
        let vo = self.layout.offset(layer, 1, slot, 0);
        let block = self.block_data_mut(i);
        block[ko..ko + k.len()].copy_from_slice(k);
        block[vo..vo + v.len()].copy_from_slice(v);
    }

    /// The `head_dim` values of `(layer, part, slot, head)` in a block.
    #[inline]
    pub(crate) fn read(&self, id: BlockId, layer: usize, part: usize, slot: usize, head: usize) -> &[f32] {
        let base = id.0 as usize * self.block_floats + self.layout.offset(layer, part, slot, head);
        &self.data[base..base + self.layout.head_dim as usize]
    }

    fn live(&self, id: BlockId) -> Result<usize, KvError> {
        match self.refs.get(id.0 as usize) {
            Some(&r) if r > 0 => Ok(id.0 as usize),
            _ => Err(KvError::UnknownBlock(id.0)),
        }
    }

    fn block_data(&self, i: usize) -> &[f32] {
        &self.data[i * self.block_floats..(i + 1) * self.block_floats]
    }

    fn block_data_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.block_floats..(i + 1) * self.block_floats]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            model_id: "m".into(),
            dtype: "f32".into(),
            num_layers: 2,
            tokens_per_block: 4,
            num_kv_heads: 2,
            head_dim: 3,
        }
    }

    #[test]
    fn layout_offsets_follow_the_documented_order() {
        let l = layout();
        assert_eq!(l.block_floats(), 2 * 2 * 4 * 2 * 3);
        assert_eq!(l.block_bytes(), l.block_floats() * 4);
        assert_eq!(l.offset(0, 0, 0, 1), 3);
        assert_eq!(l.offset(0, 0, 1, 0), 6);
        assert_eq!(l.offset(0, 1, 0, 0), 4 * 2 * 3);
        assert_eq!(l.offset(1, 0, 0, 0), 2 * 4 * 2 * 3);
    }

    #[test]
    fn export_import_round_trip_and_rules() {
        let mut pool = BlockPool::new(layout(), 3).unwrap();
        let a = pool.allocate().unwrap();
        for slot in 0..4 {
            let k: Vec<f32> = (0..6).map(|i| (slot * 10 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            pool.write_token(a, slot, 1, &k, &v);
        }
        assert!(matches!(pool.export_block(a), Err(KvError::BlockNotFull(_))));
        pool.seal(a);
        let bytes = pool.export_block(a).unwrap();
        assert_eq!(bytes.len(), pool.layout().block_bytes());
        // Layer 1, K, token 2, head 1, d 0 = 2 * 10 + 3.
        let idx = pool.layout().offset(1, 0, 2, 1);
        assert_eq!(
            f32::from_le_bytes(bytes[idx * 4..idx * 4 + 4].try_into().unwrap()),
            23.0
        );
        let b = pool.import_block(&bytes).unwrap();
        assert_eq!(pool.is_full(b), Some(true));
        assert_eq!(pool.export_block(b).unwrap(), bytes);
        assert_eq!(pool.read(b, 1, 1, 2, 1), &[-23.0, -24.0, -25.0]);

        assert!(matches!(
            pool.import_block(&bytes[1..]),
            Err(KvError::WrongBlockLength { .. })
        ));
        let mut nan = bytes.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            pool.import_block(&nan),
            Err(KvError::NonFiniteBlock { index: 2 })
        ));
        let mut small = vec![0u8; 4];
        assert!(matches!(
            pool.export_block_into(a, &mut small),
            Err(KvError::WrongBlockLength { .. })
        ));
        assert_eq!(pool.num_free(), 1, "failed imports allocate nothing");
    }

    #[test]
    fn exhaustion_and_bad_ids_are_errors() {
        let mut pool = BlockPool::new(layout(), 2).unwrap();
        let a = pool.allocate().unwrap();
        let _b = pool.allocate().unwrap();
        assert!(matches!(pool.allocate(), Err(KvError::PoolExhausted { .. })));
        pool.retain(a).unwrap();
        assert!(!pool.release(a).unwrap());
        assert!(pool.release(a).unwrap());
        assert!(matches!(pool.release(a), Err(KvError::UnknownBlock(_))));
        assert!(matches!(pool.retain(BlockId(99)), Err(KvError::UnknownBlock(99))));
        assert_eq!(pool.ref_count(BlockId(99)), None);
        assert!(BlockPool::new(layout(), 0).is_err());
        let bad = KvLayout {
            dtype: "bf16".into(),
            ..layout()
        };
        assert!(BlockPool::new(bad, 1).is_err());
    }
}
