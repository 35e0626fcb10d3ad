//! The object model of the storage engine: keys, the self-describing block
//! header (length, xxh3-64 checksum, layout, creation time) and its binary
//! encoding, which is what the object tier stores in front of every payload and
//! what is decoded from outside input (so it is fuzzed and never panics).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use std::sync::Arc;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;

/// A key in the store: a namespace plus opaque key bytes (1 to 64).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    namespace: Arc<str>,
    key: Bytes,
}

impl ObjectKey {
    /// Creates a key; callers validate lengths first (see the fabric's checks).
    pub fn new(namespace: impl Into<Arc<str>>, key: impl Into<Bytes>) -> Self {
        Self {
            namespace: namespace.into(),
            key: key.into(),
        }
    }
    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// Shared handle to the namespace string.
    pub fn namespace_arc(&self) -> &Arc<str> {
        &self.namespace
    }
    /// The key bytes.
    pub fn key(&self) -> &Bytes {
        &self.key
    }
    /// A path-safe name, `namespace/hexkey`, used by the object tier.
    pub fn path(&self) -> String {
        format!("{}/{}", self.namespace, hex::encode(&self.key))
    }
    /// Parses [`ObjectKey::path`] back.
    pub fn from_path(path: &str) -> Option<Self> {
        let (ns, hexkey) = path.rsplit_once('/')?;
        let key = hex::decode(hexkey).ok()?;
        if ns.is_empty() || key.is_empty() || key.len() > MAX_KEY_LEN {
            return None;
        }
        Some(Self::new(ns, key))
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, hex::encode(&self.key))
    }
}

/// How the KV tensors inside a block are laid out. All fields are optional
/// (zero / empty = unspecified), so non-KV objects (weights) can omit them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Model identifier.
    pub model: String,
    /// Element type, e.g. `bf16`.
    pub dtype: String,
    /// Number of transformer layers in the block.
    pub num_layers: u32,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// KV heads.
    pub num_kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Tensor-parallel rank.
    pub tp_rank: u32,
    /// Tensor-parallel size.
    pub tp_size: u32,
}

/// The self-describing header every stored object carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Payload length in bytes.
    pub length: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// KV layout.
    pub layout: Layout,
}

/// A stored object: header plus payload.
#[derive(Clone, Debug)]
pub struct Block {
    /// Header.
    pub header: BlockHeader,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Block {
    /// Wraps a payload, computing its checksum.
    pub fn new(payload: Bytes, layout: Layout, created_ms: u64) -> Self {
        let header = BlockHeader {
            length: payload.len() as u64,
            checksum: checksum(&payload),
            created_ms,
            layout,
        };
        Self { header, payload }
    }
    /// Checks the payload against the header's length and checksum.
    pub fn verify(&self) -> Result<(), HeaderError> {
        if self.payload.len() as u64 != self.header.length {
            return Err(HeaderError::LengthMismatch {
                header: self.header.length,
                actual: self.payload.len() as u64,
            });
        }
        let sum = checksum(&self.payload);
        if sum != self.header.checksum {
            return Err(HeaderError::ChecksumMismatch {
                expected: self.header.checksum,
                actual: sum,
            });
        }
        Ok(())
    }
}

/// `BlockHeader::checksum` of an object whose checksum has not been computed
/// yet: only objects committed through the zero-copy local path without one
/// carry it, and only while they are in the host tier, which computes the
/// real checksum the first time the object leaves it (a read through the
/// tier, a demotion). A real xxh3 of 0 is merely recomputed.
pub const CHECKSUM_PENDING: u64 = 0;

/// xxh3-64 of a payload: the checksum used everywhere.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Why a header (or the payload behind it) failed to decode or verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Input shorter than the header claims.
    #[error("truncated header: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Wrong magic number: not a kvfabric object.
    #[error("bad magic {0:#010x}: not a kvfabric object")]
    BadMagic(u32),
    /// Unknown encoding version.
    #[error("unsupported header version {0}")]
    Version(u16),
    /// A field is out of bounds.
    #[error("invalid header field: {0}")]
    Field(&'static str),
    /// The header's own checksum does not match.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Payload length differs from the header.
    #[error("payload length {actual} differs from header length {header}")]
    LengthMismatch {
        /// Header length.
        header: u64,
        /// Actual length.
        actual: u64,
    },
    /// Payload checksum differs from the header.
    #[error("payload checksum {actual:#018x} differs from header checksum {expected:#018x}")]
    ChecksumMismatch {
        /// Header checksum.
        expected: u64,
        /// Computed checksum.
        actual: u64,
    },
    /// A string field is too long (or a key empty) to be encoded in a
    /// header that decodes again: refused before anything is written.
    #[error("{field} is {len} bytes; a stored object's {field} must be {min} to {max} bytes")]
    FieldLength {
        /// The field: namespace, key, layout model or layout dtype.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// Shortest allowed.
        min: usize,
        /// Longest allowed.
        max: usize,
    },
    /// The header names another object.
    #[error("header names object {found}, expected {expected}")]
    KeyMismatch {
        /// Expected key.
        expected: String,
        /// Key found in the header.
        found: String,
    },
}

const MAGIC: u32 = 0x4B56_4642; // "KVFB"
const VERSION: u16 = 1;
const MAX_STR: usize = 256;

/// Longest layout `model` or `dtype` string, in bytes (what a header holds).
pub const MAX_LAYOUT_STR: usize = MAX_STR;

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16_le(s.len() as u16);
    buf.put_slice(s);
}

fn get_str(buf: &mut &[u8], what: &'static str) -> Result<Vec<u8>, HeaderError> {
    if buf.remaining() < 2 {
        return Err(HeaderError::Field(what));
    }
    let n = buf.get_u16_le() as usize;
    if n > MAX_STR || buf.remaining() < n {
        return Err(HeaderError::Field(what));
    }
    let v = buf[..n].to_vec();
    buf.advance(n);
    Ok(v)
}

impl BlockHeader {
    /// Checks that the header for `key` can be encoded and decoded again:
    /// the namespace is 1 to 256 bytes, the key 1 to [`MAX_KEY_LEN`], the
    /// layout's model and dtype at most [`MAX_LAYOUT_STR`]. Tiers call it
    /// before storing anything, so no acknowledged object is undecodable.
    pub fn check(&self, key: &ObjectKey) -> Result<(), HeaderError> {
        for (field, len, min, max) in [
            ("namespace", key.namespace().len(), 1, MAX_STR),
            ("key", key.key().len(), 1, MAX_KEY_LEN),
            ("layout model", self.layout.model.len(), 0, MAX_LAYOUT_STR),
            ("layout dtype", self.layout.dtype.len(), 0, MAX_LAYOUT_STR),
        ] {
            if !(min..=max).contains(&len) {
                return Err(HeaderError::FieldLength { field, len, min, max });
            }
        }
        Ok(())
    }

    /// Encodes the header for `key`: magic, version, total header length,
    /// fields, then an xxh3-64 of everything before it. Refuses (see
    /// [`BlockHeader::check`]) what [`BlockHeader::decode`] would not read back.
    pub fn encode(&self, key: &ObjectKey) -> Result<Bytes, HeaderError> {
        self.check(key)?;
        let mut b = BytesMut::with_capacity(128);
        b.put_u32_le(MAGIC);
        b.put_u16_le(VERSION);
        b.put_u32_le(0); // total header length, patched below
        b.put_u64_le(self.length);
        b.put_u64_le(self.checksum);
        b.put_u64_le(self.created_ms);
        put_str(&mut b, key.namespace().as_bytes());
        put_str(&mut b, key.key());
        put_str(&mut b, self.layout.model.as_bytes());
        put_str(&mut b, self.layout.dtype.as_bytes());
        for v in [
            self.layout.num_layers,
            self.layout.tokens_per_block,
            self.layout.num_kv_heads,
            self.layout.head_dim,
            self.layout.tp_rank,
            self.layout.tp_size,
        ] {
            b.put_u32_le(v);
        }
        let total = (b.len() + 8) as u32;
        b[6..10].copy_from_slice(&total.to_le_bytes());
        let sum = checksum(&b);
        b.put_u64_le(sum);
        Ok(b.freeze())
    }

    /// Decodes a header from the front of `data`, returning it, the key it
    /// names and the header's encoded length. Never panics on any input.
    pub fn decode(data: &[u8]) -> Result<(BlockHeader, ObjectKey, usize), HeaderError> {
        const FIXED: usize = 4 + 2 + 4;
        if data.len() < FIXED {
            return Err(HeaderError::Truncated {
                need: FIXED,
                have: data.len(),
            });
        }
        let mut buf = data;
        let magic = buf.get_u32_le();
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let version = buf.get_u16_le();
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let total = buf.get_u32_le() as usize;
        if !(FIXED + 24 + 8..=8 * 1024).contains(&total) {
            return Err(HeaderError::Field("header length"));
        }
        if data.len() < total {
            return Err(HeaderError::Truncated {
                need: total,
                have: data.len(),
            });
        }
        let body = &data[..total - 8];
        let stored = u64::from_le_bytes(data[total - 8..total].try_into().expect("8 bytes"));
        if checksum(body) != stored {
            return Err(HeaderError::HeaderChecksum);
        }
        let mut buf = &body[FIXED..];
        if buf.remaining() < 24 {
            return Err(HeaderError::Field("fixed fields"));
        }
        let length = buf.get_u64_le();
        let sum = buf.get_u64_le();
        let created_ms = buf.get_u64_le();
        let ns = String::from_utf8(get_str(&mut buf, "namespace")?)
            .map_err(|_| HeaderError::Field("namespace is not UTF-8"))?;
        let key = get_str(&mut buf, "key")?;
        if ns.is_empty() || key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(HeaderError::Field("key length"));
        }
        let model =
            String::from_utf8(get_str(&mut buf, "model")?).map_err(|_| HeaderError::Field("model is not UTF-8"))?;
        let dtype =
            String::from_utf8(get_str(&mut buf, "dtype")?).map_err(|_| HeaderError::Field("dtype is not UTF-8"))?;
        if buf.remaining() < 24 {
            return Err(HeaderError::Field("layout"));
        }
        let layout = Layout {
            model,
            dtype,
            num_layers: buf.get_u32_le(),
            tokens_per_block: buf.get_u32_le(),
            num_kv_heads: buf.get_u32_le(),
            head_dim: buf.get_u32_le(),
            tp_rank: buf.get_u32_le(),
            tp_size: buf.get_u32_le(),
        };
        if buf.has_remaining() {
            return Err(HeaderError::Field("trailing bytes"));
        }
        Ok((
            BlockHeader {
                length,
                checksum: sum,
                created_ms,
                layout,
            },
            ObjectKey::new(ns, key),
            total,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (BlockHeader, ObjectKey) {
        let key = ObjectKey::new("ns", vec![1u8, 2, 3]);
        let b = Block::new(
            Bytes::from_static(b"hello"),
            Layout {
                model: "m".into(),
                dtype: "bf16".into(),
                num_layers: 4,
                ..Default::default()
            },
            7,
        );
        (b.header, key)
    }

    #[test]
    fn header_roundtrip() {
        let (h, k) = sample();
        let enc = h.encode(&k).unwrap();
        let (h2, k2, n) = BlockHeader::decode(&enc).unwrap();
        assert_eq!((h2, k2, n), (h, k, enc.len()));
    }

    #[test]
    fn header_detects_bitflips() {
        let (h, k) = sample();
        let enc = h.encode(&k).unwrap();
        for i in 0..enc.len() {
            let mut bad = enc.to_vec();
            bad[i] ^= 0x40;
            assert!(BlockHeader::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn header_refuses_fields_decode_would_reject() {
        let (h, k) = sample();
        let mut long = h.clone();
        long.layout.model = "m".repeat(MAX_LAYOUT_STR);
        long.layout.dtype = "d".repeat(MAX_LAYOUT_STR);
        let enc = long.encode(&k).unwrap();
        assert_eq!(BlockHeader::decode(&enc).unwrap().0, long, "256 bytes still fit");
        for (field, bad) in [
            ("layout model", {
                let mut b = h.clone();
                b.layout.model = "m".repeat(300);
                b
            }),
            ("layout dtype", {
                let mut b = h.clone();
                b.layout.dtype = "d".repeat(MAX_LAYOUT_STR + 1);
                b
            }),
        ] {
            let e = bad.encode(&k).unwrap_err();
            assert!(
                matches!(e, HeaderError::FieldLength { field: f, .. } if f == field),
                "{field}: {e:?}"
            );
            assert_eq!(bad.check(&k), Err(e));
        }
        let e = h.encode(&ObjectKey::new("ns", vec![0u8; MAX_KEY_LEN + 1])).unwrap_err();
        assert!(matches!(e, HeaderError::FieldLength { field: "key", .. }), "{e:?}");
        let e = h.encode(&ObjectKey::new("n".repeat(257), vec![1u8])).unwrap_err();
        assert!(
            matches!(e, HeaderError::FieldLength { field: "namespace", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn verify_catches_payload_damage() {
        let mut b = Block::new(Bytes::from_static(b"payload"), Layout::default(), 0);
        assert!(b.verify().is_ok());
        b.payload = Bytes::from_static(b"paylaod");
        assert!(matches!(b.verify(), Err(HeaderError::ChecksumMismatch { .. })));
    }

    #[test]
    fn key_path_roundtrip() {
        let k = ObjectKey::new("tenant-a.ns", vec![0u8, 255, 16]);
        assert_eq!(ObjectKey::from_path(&k.path()), Some(k));
        assert_eq!(ObjectKey::from_path("nokey"), None);
        assert_eq!(ObjectKey::from_path("ns/zz"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = BlockHeader::decode(&data);
        }
    }
}
