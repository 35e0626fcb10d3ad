//! The canonical block hash: chained xxh3-128 over (parent hash, token ids as
//! little-endian u32, extra keys such as a LoRA id or media hash), seeded by
//! the namespace's salt. The same tokens therefore hash differently in two
//! namespaces, so tenants never share a key unless they share a namespace.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// A 16-byte block hash, usable directly as a fabric key.
pub type BlockHash = [u8; 16];

/// The salt of a namespace: xxh3-64 of its name under a fixed domain tag.
pub fn namespace_salt(namespace: &str) -> u64 {
    let mut v = b"kvfabric.v1.namespace:".to_vec();
    v.extend_from_slice(namespace.as_bytes());
    xxh3_64(&v)
}

/// Hash of one block given its parent's hash (`None` for the first block).
/// Extra keys are length-prefixed so `["ab","c"]` and `["a","bc"]` differ.
pub fn block_hash(salt: u64, parent: Option<&BlockHash>, tokens: &[u32], extra: &[&[u8]]) -> BlockHash {
    let mut h = Xxh3::with_seed(salt);
    h.update(&[parent.is_some() as u8]);
    h.update(parent.unwrap_or(&[0u8; 16]));
    h.update(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.update(&(extra.len() as u32).to_le_bytes());
    for e in extra {
        h.update(&(e.len() as u32).to_le_bytes());
        h.update(e);
    }
    h.digest128().to_le_bytes()
}

/// Hashes of every *full* block of `tokens` (a trailing partial block gets no
/// hash), each chained to the one before.
pub fn chain_hashes(salt: u64, tokens: &[u32], block_size: usize, extra: &[&[u8]]) -> Vec<BlockHash> {
    assert!(block_size > 0, "block size must be positive");
    let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
    for chunk in tokens.chunks_exact(block_size) {
        let h = block_hash(salt, out.last(), chunk, extra);
        out.push(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_is_prefix_stable_and_salted() {
        let toks: Vec<u32> = (0..100).collect();
        let s = namespace_salt("a");
        let full = chain_hashes(s, &toks, 16, &[]);
        assert_eq!(full.len(), 6);
        assert_eq!(chain_hashes(s, &toks[..48], 16, &[]), full[..3].to_vec());
        assert_ne!(chain_hashes(namespace_salt("b"), &toks, 16, &[])[0], full[0]);
        let mut other = toks.clone();
        other[0] = 999; // changing an early token changes every later hash
        let changed = chain_hashes(s, &other, 16, &[]);
        assert!(changed.iter().zip(&full).all(|(a, b)| a != b));
    }

    #[test]
    fn extra_keys_are_unambiguous() {
        let s = namespace_salt("n");
        let a = block_hash(s, None, &[1, 2], &[b"ab", b"c"]);
        let b = block_hash(s, None, &[1, 2], &[b"a", b"bc"]);
        let c = block_hash(s, None, &[1, 2], &[]);
        assert!(a != b && a != c && b != c);
    }
}
