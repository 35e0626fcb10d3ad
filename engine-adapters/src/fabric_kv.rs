//! KV blocks in the fabric: how the reference engine stores its full
//! blocks as fabric objects and finds them again.
//!
//! - **Keys**: block `i` of a token sequence is keyed by the canonical
//!   chained block hash ([`kvfabric::hash::chain_hashes`], salted by the
//!   namespace, no extra keys), so the router, which hashes prompts the
//!   same way, sees the engine's blocks under the same names.
//! - **Objects**: one object per full block, all layers, K and V, in the
//!   byte layout of [`crate::engine::BlockPool::export_block`], stored with
//!   the layout header (model id, dtype, layers, tokens per block, KV
//!   heads, head dim).
//! - **Loading a prefix**: `ExistsPrefix` over the prompt's chain says how
//!   many leading blocks the fabric holds; those are fetched in batched
//!   gets. Every call carries at most [`MAX_BATCH_KEYS`] keys (a node's
//!   default limit): longer chains are asked about, read and stored batch
//!   by batch, `ExistsPrefix` stopping at the first batch not all present. The prefix ends at the first block that is gone by then, has a
//!   layout that is not this engine's (logged and counted, never loaded) or
//!   has the wrong length. A namespace the node has never seen holds
//!   nothing. A worker that already holds the first blocks in its own pool
//!   asks about and loads only the ones after them
//!   ([`FabricKv::present_blocks`], [`FabricKv::load_blocks`]).
//!
//! - **Co-located engines** ([`FabricKv::with_local`]): block bytes move
//!   through the node's zero-copy local path (one copy into or out of the
//!   node's shared arena, no socket), with the same layout checks; only
//!   `ExistsPrefix` (a control call) still goes over gRPC. Blocks the node
//!   no longer holds in host memory are not visible there, so a local read
//!   that comes back short is completed over gRPC (which reaches every
//!   tier).
//!
//! [`FabricKv`] is the seam the workers use; its counters feed their
//! metrics.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kvfabric::ErrorKind as FabricErrorKind;
use kvfabric::client::{Client, ClientError, Durability, Layout, LocalClient, LocalPut, MAX_BATCH_KEYS, PutObject};
use kvfabric::hash::{BlockHash, chain_hashes, namespace_salt};

use crate::engine::KvLayout;

/// What the connector counted since it was made.
#[derive(Debug, Default)]
pub struct FabricKvCounters {
    /// Blocks loaded from the fabric.
    pub blocks_loaded: AtomicU64,
    /// Blocks stored into the fabric.
    pub blocks_stored: AtomicU64,
    /// Blocks found under a key whose layout header is not this engine's.
    pub layout_mismatches: AtomicU64,
    /// Blocks found with the right layout but the wrong payload length.
    pub bad_lengths: AtomicU64,
    /// Of `blocks_loaded`, those read through the zero-copy local path.
    pub blocks_loaded_local: AtomicU64,
    /// Of `blocks_stored`, those written through the zero-copy local path.
    pub blocks_stored_local: AtomicU64,
}

/// The engine's view of the fabric (see the module doc).
#[derive(Debug)]
pub struct FabricKv {
    client: Client,
    local: Option<LocalClient>,
    namespace: String,
    salt: u64,
    layout: KvLayout,
    wire_layout: Layout,
    durability: Durability,
    counters: FabricKvCounters,
}

/// The header a block of `l` carries in the fabric.
pub fn wire_layout(l: &KvLayout) -> Layout {
    Layout {
        model: l.model_id.clone(),
        dtype: l.dtype.clone(),
        num_layers: l.num_layers,
        tokens_per_block: l.tokens_per_block,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        tp_rank: 0,
        tp_size: 1,
    }
}

impl FabricKv {
    /// A connector storing blocks of `layout` in `namespace` through `client`.
    pub fn new(client: Client, namespace: impl Into<String>, layout: KvLayout) -> Self {
        let namespace = namespace.into();
        FabricKv {
            client,
            local: None,
            salt: namespace_salt(&namespace),
            namespace,
            wire_layout: wire_layout(&layout),
            layout,
            durability: Durability::Memory,
            counters: FabricKvCounters::default(),
        }
    }

    /// Stores with `durability` instead of `memory`.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Moves block bytes through the node's zero-copy local path (`local`
    /// connected to the same node as the gRPC client, acting for the same
    /// tenant).
    pub fn with_local(mut self, local: LocalClient) -> Self {
        self.local = Some(local);
        self
    }

    /// Whether block bytes go through the zero-copy local path.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Its counters.
    pub fn counters(&self) -> &FabricKvCounters {
        &self.counters
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The keys of every full block of `tokens`.
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        chain_hashes(self.salt, tokens, self.layout.tokens_per_block as usize, &[])
    }

    /// The leading full blocks of `tokens` the fabric holds for this
    /// engine's layout, as bytes ready for
    /// [`crate::engine::Engine::add_sequence_from_bytes`].
    pub async fn load_prefix(&self, tokens: &[u32]) -> Result<Vec<Bytes>, ClientError> {
        self.load_blocks(tokens, 0..usize::MAX).await
    }

    /// How many of the full blocks `range` of `tokens` the fabric holds,
    /// counting from `range.start` up to the first missing one
    /// (`ExistsPrefix` over their keys; the range is clipped to the full
    /// blocks). A namespace the node has never seen holds nothing.
    pub async fn present_blocks(&self, tokens: &[u32], range: Range<usize>) -> Result<usize, ClientError> {
        let keys = self.range_keys(tokens, range);
        self.present(&keys).await
    }

    /// Like [`FabricKv::load_prefix`], for the full blocks `range` of
    /// `tokens` (clipped to the full blocks): the leading ones of the range
    /// that the fabric holds with this engine's layout, in order, starting
    /// at block `range.start`. Workers use it to load what follows the
    /// blocks they already hold.
    pub async fn load_blocks(&self, tokens: &[u32], range: Range<usize>) -> Result<Vec<Bytes>, ClientError> {
        let keys = self.range_keys(tokens, range);
        let present = self.present(&keys).await?;
        if present == 0 {
            return Ok(Vec::new());
        }
        let objects = self.fetch(&keys[..present]).await?;
        let want = self.layout.block_bytes();
        let mut out = Vec::with_capacity(present);
        let mut local = 0u64;
        for (i, o) in objects.into_iter().enumerate() {
            let Some((value, layout, via_local)) = o else { break };
            if layout != self.wire_layout {
                self.counters.layout_mismatches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    namespace = %self.namespace,
                    block = i,
                    found = ?layout,
                    expected = ?self.wire_layout,
                    "fabric block has another model's layout: not loaded"
                );
                break;
            }
            if value.len() != want {
                self.counters.bad_lengths.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    namespace = %self.namespace,
                    block = i,
                    len = value.len(),
                    want,
                    "fabric block has the wrong length: not loaded"
                );
                break;
            }
            local += u64::from(via_local);
            out.push(value);
        }
        self.counters
            .blocks_loaded
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.counters.blocks_loaded_local.fetch_add(local, Ordering::Relaxed);
        Ok(out)
    }

    /// Reads `keys`: through the local path when there is one, completing
    /// what it did not find over gRPC. Per key: (bytes, layout, via local).
    async fn fetch(&self, keys: &[Bytes]) -> Result<Vec<Option<(Bytes, Layout, bool)>>, ClientError> {
        let mut out: Vec<Option<(Bytes, Layout, bool)>> = vec![None; keys.len()];
        if let Some(local) = &self.local {
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_ref()).collect();
            for (slots, batch) in out.chunks_mut(MAX_BATCH_KEYS).zip(refs.chunks(MAX_BATCH_KEYS)) {
                for (slot, got) in slots
                    .iter_mut()
                    .zip(local.get_many_with_layout(&self.namespace, batch).await?)
                {
                    *slot = got.map(|(v, l)| (Bytes::from(v), l, true));
                }
            }
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        for batch in missing.chunks(MAX_BATCH_KEYS) {
            let ks: Vec<Bytes> = batch.iter().map(|&i| keys[i].clone()).collect();
            for (&i, o) in batch.iter().zip(self.client.get_many(&self.namespace, ks).await?) {
                out[i] = o.map(|o| (o.value, o.layout, false));
            }
        }
        Ok(out)
    }

    fn range_keys(&self, tokens: &[u32], range: Range<usize>) -> Vec<Bytes> {
        let keys = self.keys(tokens);
        let end = range.end.min(keys.len());
        let start = range.start.min(end);
        keys[start..end].iter().map(|k| Bytes::copy_from_slice(k)).collect()
    }

    async fn present(&self, keys: &[Bytes]) -> Result<usize, ClientError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // Batch by batch, up to the first that is not all present.
        let mut present = 0;
        for batch in keys.chunks(MAX_BATCH_KEYS) {
            let n = match self.client.exists_prefix(&self.namespace, batch.to_vec()).await {
                Ok(tiers) => prefix_answer(batch.len(), tiers.len())?,
                Err(e) if e.kind() == FabricErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            present += n;
            if n < batch.len() {
                break;
            }
        }
        Ok(present)
    }

    /// Stores full blocks of `tokens`: `(index in the sequence, bytes)`.
    /// Returns how many were stored.
    pub async fn store(&self, tokens: &[u32], blocks: Vec<(usize, Vec<u8>)>) -> Result<usize, ClientError> {
        let keys = self.keys(tokens);
        let objects: Vec<PutObject> = blocks
            .into_iter()
            .filter_map(|(i, bytes)| {
                keys.get(i).map(|k| PutObject {
                    key: Bytes::copy_from_slice(k),
                    value: Bytes::from(bytes),
                    layout: Some(self.wire_layout.clone()),
                })
            })
            .collect();
        if objects.is_empty() {
            return Ok(0);
        }
        let n = objects.len();
        // In batches of at most MAX_BATCH_KEYS, each counted once stored.
        for batch in objects.chunks(MAX_BATCH_KEYS) {
            let m = batch.len() as u64;
            match &self.local {
                Some(local) => {
                    let puts: Vec<LocalPut<'_>> = batch
                        .iter()
                        .map(|o| LocalPut {
                            key: &o.key,
                            value: &o.value,
                            layout: Some(&self.wire_layout),
                        })
                        .collect();
                    local.put_many(&self.namespace, &puts, self.durability).await?;
                    self.counters.blocks_stored_local.fetch_add(m, Ordering::Relaxed);
                }
                None => {
                    self.client
                        .put_many(&self.namespace, batch.to_vec(), self.durability)
                        .await?;
                }
            }
            self.counters.blocks_stored.fetch_add(m, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// How many of `sent` chained keys an `ExistsPrefix` that answered
/// `answered` tiers says are present: more than were sent breaks the
/// protocol (and would index past the keys), an error the caller treats
/// like any failed call (it computes instead).
fn prefix_answer(sent: usize, answered: usize) -> Result<usize, ClientError> {
    if answered > sent {
        return Err(ClientError::Protocol(format!(
            "ExistsPrefix of {sent} keys answered {answered} present"
        )));
    }
    Ok(answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_exists_prefix_answer_is_a_protocol_error() {
        assert_eq!(prefix_answer(4, 0).unwrap(), 0);
        assert_eq!(prefix_answer(4, 4).unwrap(), 4);
        let e = prefix_answer(4, 5).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");
        assert_ne!(
            e.kind(),
            FabricErrorKind::Unavailable,
            "not taken for a node that is down"
        );
    }
}
