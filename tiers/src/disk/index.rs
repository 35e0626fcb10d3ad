//! The disk tier's persistent index: key -> (data file, extent, header) in a
//! RocksDB database under `dir/index`, and the versioned binary encoding of
//! its values. The in-memory map in `mod.rs` is rebuilt from it on open.
//!
//! Value format, version 1 (all integers little-endian):
//!
//! ```text
//! u8  version = 1
//! u32 data file index
//! u64 extent offset
//! u64 extent length
//! ..  BlockHeader::encode(key)  (self-delimiting, carries the key and its own checksum)
//! u64 xxh3-64 of everything above
//! ```
//!
//! Keys are `b'o'`, the namespace length as a big-endian u16, the namespace
//! and the key bytes, so every object key maps to exactly one index key.

use crate::block::checksum;
use crate::{BlockHeader, Extent, ObjectKey, TierError, TierResult};
use rocksdb::{DB, IteratorMode, Options, WriteOptions};
use std::fmt;
use std::path::Path;

const OBJECT_PREFIX: u8 = b'o';
const VALUE_VERSION: u8 = 1;
const FIXED: usize = 1 + 4 + 8 + 8;

/// Where an object lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IndexRecord {
    /// Data file index.
    pub(super) file: u32,
    /// Extent in that file holding the payload.
    pub(super) extent: Extent,
    /// The object's header.
    pub(super) header: BlockHeader,
}

/// The index key of an object.
pub(super) fn db_key(key: &ObjectKey) -> Vec<u8> {
    let ns = key.namespace().as_bytes();
    let mut k = Vec::with_capacity(3 + ns.len() + key.key().len());
    k.push(OBJECT_PREFIX);
    k.extend_from_slice(&(ns.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    k.extend_from_slice(ns);
    k.extend_from_slice(key.key());
    k
}

/// Encodes a record for `key`; refuses a header that would not decode.
pub(super) fn encode_value(key: &ObjectKey, rec: &IndexRecord) -> TierResult<Vec<u8>> {
    let header = rec.header.encode(key).map_err(|source| TierError::InvalidHeader {
        key: key.to_string(),
        source,
    })?;
    let mut v = Vec::with_capacity(FIXED + header.len() + 8);
    v.push(VALUE_VERSION);
    v.extend_from_slice(&rec.file.to_le_bytes());
    v.extend_from_slice(&rec.extent.offset.to_le_bytes());
    v.extend_from_slice(&rec.extent.len.to_le_bytes());
    v.extend_from_slice(&header);
    let sum = checksum(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    Ok(v)
}

/// Decodes a value; never panics on any input.
pub(super) fn decode_value(data: &[u8]) -> Result<(ObjectKey, IndexRecord), String> {
    if data.len() < FIXED + 8 {
        return Err(format!("value of {} bytes is too short", data.len()));
    }
    if data[0] != VALUE_VERSION {
        return Err(format!("unsupported index value version {}", data[0]));
    }
    let (body, sum) = data.split_at(data.len() - 8);
    let sum = u64::from_le_bytes(sum.try_into().map_err(|_| "checksum field".to_string())?);
    if checksum(body) != sum {
        return Err("index value checksum mismatch".into());
    }
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    let file = u32::from_le_bytes(body[1..5].try_into().unwrap_or([0; 4]));
    let extent = Extent {
        offset: u64_at(5),
        len: u64_at(13),
    };
    let (header, key, used) = BlockHeader::decode(&body[FIXED..]).map_err(|e| e.to_string())?;
    if FIXED + used != body.len() {
        return Err(format!("{} trailing bytes after the header", body.len() - FIXED - used));
    }
    Ok((key, IndexRecord { file, extent, header }))
}

/// One entry read back on open: its raw index key and the decoded record, or
/// why it could not be decoded.
pub(super) type LoadedEntry = (Box<[u8]>, Result<(ObjectKey, IndexRecord), String>);

/// The RocksDB-backed index.
pub(super) struct Index {
    db: DB,
}

fn index_err(what: &str, e: rocksdb::Error) -> TierError {
    TierError::Index(format!("{what}: {e}"))
}

impl Index {
    /// Opens (creating if needed) the index at `path`.
    pub(super) fn open(path: &Path) -> TierResult<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(64 << 20);
        let db = DB::open(&opts, path).map_err(|e| index_err(&format!("opening {}", path.display()), e))?;
        Ok(Self { db })
    }

    /// Every object entry, decoded where possible.
    pub(super) fn load(&self) -> TierResult<Vec<LoadedEntry>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, v) = item.map_err(|e| index_err("scanning", e))?;
            if k.first() != Some(&OBJECT_PREFIX) {
                continue;
            }
            let rec = decode_value(&v).and_then(|(key, rec)| {
                if db_key(&key).as_slice() == &*k {
                    Ok((key, rec))
                } else {
                    Err(format!(
                        "value names object {key}, which is stored under another index key"
                    ))
                }
            });
            out.push((k, rec));
        }
        Ok(out)
    }

    /// Stores `rec` for `key`; with `sync`, the WAL is synced before returning.
    pub(super) fn put(&self, key: &ObjectKey, rec: &IndexRecord, sync: bool) -> TierResult<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .put_opt(db_key(key), encode_value(key, rec)?, &wo)
            .map_err(|e| index_err("writing an entry", e))
    }

    /// Removes `key`'s entry; with `sync`, the WAL is synced before returning.
    pub(super) fn delete(&self, key: &ObjectKey, sync: bool) -> TierResult<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .delete_opt(db_key(key), &wo)
            .map_err(|e| index_err("deleting an entry", e))
    }

    /// Removes an entry by its raw index key.
    pub(super) fn delete_raw(&self, k: &[u8]) -> TierResult<()> {
        self.db
            .delete_opt(k, &WriteOptions::default())
            .map_err(|e| index_err("deleting an entry", e))
    }

    /// Writes a raw entry, bypassing the encoding (tests of recovery).
    #[cfg(test)]
    pub(super) fn put_raw(&self, k: &[u8], v: &[u8]) -> TierResult<()> {
        self.db.put(k, v).map_err(|e| index_err("writing an entry", e))
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index").field("path", &self.db.path()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Layout;

    fn sample() -> (ObjectKey, IndexRecord) {
        let key = ObjectKey::new("ns", vec![1u8, 2, 3]);
        let header = BlockHeader {
            length: 5000,
            checksum: 42,
            created_ms: 7,
            layout: Layout {
                model: "m".into(),
                num_layers: 3,
                ..Default::default()
            },
        };
        (
            key,
            IndexRecord {
                file: 2,
                extent: Extent {
                    offset: 8192,
                    len: 8192,
                },
                header,
            },
        )
    }

    #[test]
    fn value_roundtrip_and_damage() {
        let (key, rec) = sample();
        let v = encode_value(&key, &rec).unwrap();
        assert_eq!(decode_value(&v).unwrap(), (key, rec));
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            assert!(decode_value(&bad).is_err(), "flip at {i} went unnoticed");
        }
        for n in 0..v.len() {
            assert!(decode_value(&v[..n]).is_err());
        }
    }

    #[test]
    fn keys_are_injective() {
        let a = db_key(&ObjectKey::new("ab", b"c".to_vec()));
        let b = db_key(&ObjectKey::new("a", b"bc".to_vec()));
        assert_ne!(a, b);
    }

    #[test]
    fn index_persists() {
        let dir = tempfile::tempdir().unwrap();
        let (key, rec) = sample();
        {
            let idx = Index::open(dir.path()).unwrap();
            idx.put(&key, &rec, true).unwrap();
            idx.put_raw(b"ojunk", b"not a value").unwrap();
        }
        let idx = Index::open(dir.path()).unwrap();
        let mut got = idx.load().unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .any(|(_, r)| r.as_ref().ok() == Some(&(key.clone(), rec.clone())))
        );
        assert!(got.iter().any(|(_, r)| r.is_err()));
        idx.delete(&key, false).unwrap();
        assert_eq!(idx.load().unwrap().len(), 1);
    }
}
