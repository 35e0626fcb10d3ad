//! Decoder for vLLM's published KV events (`vllm.distributed.kv_events`).
//!
//! On the wire a ZMQ PUB socket sends three frames: topic, an 8-byte
//! big-endian sequence number, and a msgpack payload. The payload is an
//! `EventBatch` `[ts, [event, ...], dp_rank?]`. msgspec encodes each event
//! as a tagged array (`["BlockStored", block_hashes, parent_block_hash,
//! token_ids, block_size, lora_id, medium]`, trailing defaults omitted) or,
//! in versions and forks that disable `array_like`, as a map with a `type`
//! field; both are accepted, as are batches encoded as maps. Block hashes
//! are integers in older versions and bytes (sha256) in newer ones.
//!
//! Everything here is outside input: every malformation is a
//! [`DecodeError`], never a panic (`fuzz/` has a target for it).

use rmpv::Value;

/// An engine's own block hash, normalised (integers as two's complement,
/// byte strings by xxh3-128, so the two never need comparing).
pub type EngineHash = u128;

/// Deepest nesting a payload may have (a batch is 4 levels deep).
const MAX_DEPTH: usize = 16;

/// Why a payload or frame could not be decoded.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not msgpack.
    #[error("payload is not valid msgpack: {0}")]
    Msgpack(String),
    /// msgpack, but not the shape of an event batch or event.
    #[error("malformed event: {0}")]
    Shape(String),
    /// An event type this decoder does not know.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The multipart message does not have the topic/sequence/payload frames.
    #[error("bad frames: {0}")]
    Frames(String),
}

/// One engine KV event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// Blocks became cached (full blocks, in chain order).
    BlockStored {
        /// The engine's hashes, one per block.
        block_hashes: Vec<EngineHash>,
        /// The engine's hash of the block before the first one.
        parent_block_hash: Option<EngineHash>,
        /// Tokens of all the blocks, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: usize,
        /// LoRA adapter id, when one applies.
        lora_id: Option<i64>,
        /// Where (`GPU` when absent; `CPU` for offloaded blocks).
        medium: Option<String>,
    },
    /// Blocks were evicted.
    BlockRemoved {
        /// The engine's hashes.
        block_hashes: Vec<EngineHash>,
        /// From where (`GPU` when absent).
        medium: Option<String>,
    },
    /// The engine dropped its whole cache.
    AllBlocksCleared {
        /// From where (every medium when absent).
        medium: Option<String>,
    },
}

/// A decoded `EventBatch`.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    /// Engine timestamp (seconds).
    pub ts: f64,
    /// Events that decoded.
    pub events: Vec<EngineEvent>,
    /// Events that did not, with why (the rest of the batch still applies).
    pub errors: Vec<DecodeError>,
    /// Data-parallel rank, when the engine sends one.
    pub dp_rank: Option<i64>,
}

/// Splits a ZMQ multipart message into (topic, sequence, payload).
pub fn split_frames(frames: &[&[u8]]) -> Result<(Vec<u8>, u64, Vec<u8>), DecodeError> {
    match frames {
        [topic, seq, payload] => {
            let seq: [u8; 8] = (*seq)
                .try_into()
                .map_err(|_| DecodeError::Frames(format!("sequence frame is {} bytes, not 8", seq.len())))?;
            Ok((topic.to_vec(), u64::from_be_bytes(seq), payload.to_vec()))
        }
        _ => Err(DecodeError::Frames(format!(
            "expected 3 frames (topic, sequence, payload), got {}",
            frames.len()
        ))),
    }
}

/// Decodes one msgpack `EventBatch` payload.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| DecodeError::Msgpack(e.to_string()))?
        .to_owned();
    if !rd.is_empty() {
        return Err(DecodeError::Msgpack(format!(
            "{} trailing bytes after the batch",
            rd.len()
        )));
    }
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (field(&v, "ts"), field(&v, "events"), field(&v, "data_parallel_rank")),
        _ => return Err(DecodeError::Shape("batch is neither an array nor a map".into())),
    };
    let ts = match ts {
        Some(Value::F64(f)) => *f,
        Some(Value::F32(f)) => *f as f64,
        Some(v @ Value::Integer(_)) => v.as_i64().map(|i| i as f64).unwrap_or(0.0),
        other => {
            return Err(DecodeError::Shape(format!(
                "batch timestamp is not a number: {other:?}"
            )));
        }
    };
    let Some(Value::Array(raw)) = events else {
        return Err(DecodeError::Shape("batch has no event list".into()));
    };
    let dp_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| DecodeError::Shape("dp rank is not an integer".into()))?,
        ),
    };
    let mut out = EventBatch {
        ts,
        events: Vec::with_capacity(raw.len()),
        errors: Vec::new(),
        dp_rank,
    };
    for e in raw {
        match decode_event(e) {
            Ok(ev) => out.events.push(ev),
            Err(err) => out.errors.push(err),
        }
    }
    Ok(out)
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// Field `i` of an array event, or `name` of a map event.
fn get<'a>(v: &'a Value, i: usize, name: &str) -> Option<&'a Value> {
    match v {
        Value::Array(a) => a.get(i).filter(|x| !x.is_nil()),
        Value::Map(_) => field(v, name).filter(|x| !x.is_nil()),
        _ => None,
    }
}

fn decode_event(v: &Value) -> Result<EngineEvent, DecodeError> {
    let tag = match v {
        Value::Array(a) => a.first().and_then(|t| t.as_str()),
        Value::Map(_) => field(v, "type").and_then(|t| t.as_str()),
        _ => return Err(DecodeError::Shape("event is neither an array nor a map".into())),
    }
    .ok_or_else(|| DecodeError::Shape("event has no type tag".into()))?;
    match tag {
        "BlockStored" => {
            let block_hashes = hashes(get(v, 1, "block_hashes"), "block_hashes")?;
            let parent_block_hash = get(v, 2, "parent_block_hash").map(hash).transpose()?;
            let token_ids = match get(v, 3, "token_ids") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| {
                        t.as_u64()
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or_else(|| DecodeError::Shape(format!("token id {t} is not a u32")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
                Some(other) => return Err(DecodeError::Shape(format!("token_ids is not a list: {other}"))),
            };
            let block_size = get(v, 4, "block_size")
                .and_then(|b| b.as_u64())
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| DecodeError::Shape("BlockStored without an integer block_size".into()))?;
            let lora_id = match get(v, 5, "lora_id") {
                None => None,
                Some(l) => Some(
                    l.as_i64()
                        .ok_or_else(|| DecodeError::Shape("lora_id is not an integer".into()))?,
                ),
            };
            let medium = medium(get(v, 6, "medium"))?;
            Ok(EngineEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
            })
        }
        "BlockRemoved" => Ok(EngineEvent::BlockRemoved {
            block_hashes: hashes(get(v, 1, "block_hashes"), "block_hashes")?,
            medium: medium(get(v, 2, "medium"))?,
        }),
        "AllBlocksCleared" => Ok(EngineEvent::AllBlocksCleared {
            medium: medium(get(v, 1, "medium"))?,
        }),
        other => Err(DecodeError::UnknownType(other.chars().take(64).collect())),
    }
}

fn medium(v: Option<&Value>) -> Result<Option<String>, DecodeError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(s.as_str().map(str::to_owned)),
        Some(other) => Err(DecodeError::Shape(format!("medium is not a string: {other}"))),
    }
}

fn hashes(v: Option<&Value>, name: &str) -> Result<Vec<EngineHash>, DecodeError> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash).collect(),
        _ => Err(DecodeError::Shape(format!("{name} is not a list"))),
    }
}

fn hash(v: &Value) -> Result<EngineHash, DecodeError> {
    match v {
        Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Ok(u as u128)
            } else {
                Ok(i.as_i64().map(|s| s as i128 as u128).unwrap_or(0))
            }
        }
        Value::Binary(b) => Ok(xxhash_rust::xxh3::xxh3_128(b)),
        Value::String(s) => Ok(xxhash_rust::xxh3::xxh3_128(s.as_bytes())),
        other => Err(DecodeError::Shape(format!(
            "block hash is neither an integer nor bytes: {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn enc(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }
    fn s(x: &str) -> V {
        V::from(x)
    }
    fn ints(xs: &[u64]) -> V {
        V::Array(xs.iter().map(|&x| V::from(x)).collect())
    }

    #[test]
    fn array_encoding_with_trailing_defaults_omitted() {
        let stored = V::Array(vec![
            s("BlockStored"),
            ints(&[11, 12]),
            V::Nil,
            ints(&[1, 2, 3, 4]),
            V::from(2),
        ]);
        let removed = V::Array(vec![s("BlockRemoved"), ints(&[11])]);
        let cleared = V::Array(vec![s("AllBlocksCleared")]);
        let batch = V::Array(vec![V::F64(1.5), V::Array(vec![stored, removed, cleared])]);
        let b = decode_batch(&enc(&batch)).unwrap();
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.dp_rank, None);
        assert!(b.errors.is_empty());
        assert_eq!(
            b.events,
            vec![
                EngineEvent::BlockStored {
                    block_hashes: vec![11, 12],
                    parent_block_hash: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                    lora_id: None,
                    medium: None
                },
                EngineEvent::BlockRemoved {
                    block_hashes: vec![11],
                    medium: None
                },
                EngineEvent::AllBlocksCleared { medium: None },
            ]
        );
    }

    #[test]
    fn map_encoding_bytes_hashes_and_medium() {
        let stored = V::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), V::Array(vec![V::Binary(vec![1; 32])])),
            (s("parent_block_hash"), V::Binary(vec![2; 32])),
            (s("token_ids"), ints(&[5, 6])),
            (s("block_size"), V::from(2)),
            (s("lora_id"), V::from(3)),
            (s("medium"), s("CPU")),
        ]);
        let batch = V::Map(vec![
            (s("ts"), V::F64(2.0)),
            (s("events"), V::Array(vec![stored])),
            (s("data_parallel_rank"), V::from(1)),
        ]);
        let b = decode_batch(&enc(&batch)).unwrap();
        assert_eq!(b.dp_rank, Some(1));
        match &b.events[0] {
            EngineEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                lora_id,
                medium,
                ..
            } => {
                assert_eq!(block_hashes, &vec![xxhash_rust::xxh3::xxh3_128(&[1; 32])]);
                assert_eq!(parent_block_hash, &Some(xxhash_rust::xxh3::xxh3_128(&[2; 32])));
                assert_eq!(lora_id, &Some(3));
                assert_eq!(medium.as_deref(), Some("CPU"));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn bad_events_are_reported_and_the_rest_applies() {
        let batch = V::Array(vec![
            V::F64(0.0),
            V::Array(vec![
                V::Array(vec![s("BlockExploded"), ints(&[1])]),
                V::Array(vec![s("BlockRemoved"), s("not a list")]),
                V::from(7),
                V::Array(vec![s("BlockRemoved"), ints(&[9])]),
                V::Array(vec![s("BlockStored"), ints(&[1]), V::Nil, ints(&[1 << 40]), V::from(1)]),
            ]),
        ]);
        let b = decode_batch(&enc(&batch)).unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.errors.len(), 4);
        assert_eq!(b.errors[0], DecodeError::UnknownType("BlockExploded".into()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // 0xc1 is msgpack's reserved marker (decodes as nil: not a batch).
        assert!(matches!(decode_batch(&[0xc1]), Err(DecodeError::Shape(_))));
        assert!(
            matches!(decode_batch(&[0x92, 0xcb]), Err(DecodeError::Msgpack(_))),
            "truncated"
        );
        let deep = [0x91u8; 100];
        assert!(matches!(decode_batch(&deep), Err(DecodeError::Msgpack(_))), "too deep");
        assert!(matches!(decode_batch(&[]), Err(DecodeError::Msgpack(_))));
        assert!(matches!(decode_batch(&enc(&V::from(3))), Err(DecodeError::Shape(_))));
        assert!(matches!(
            decode_batch(&enc(&V::Array(vec![s("x"), V::Array(vec![])]))),
            Err(DecodeError::Shape(_))
        ));
        let mut two = enc(&V::Array(vec![V::F64(0.0), V::Array(vec![])]));
        two.push(0);
        assert!(matches!(decode_batch(&two), Err(DecodeError::Msgpack(_))));
    }

    #[test]
    fn frames() {
        let seq = 42u64.to_be_bytes();
        let (t, n, p) = split_frames(&[b"kv", &seq, b"x"]).unwrap();
        assert_eq!((t.as_slice(), n, p.as_slice()), (&b"kv"[..], 42, &b"x"[..]));
        assert!(split_frames(&[b"kv", b"123", b"x"]).is_err());
        assert!(split_frames(&[b"x"]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_batch(&bytes);
        }
    }
}
