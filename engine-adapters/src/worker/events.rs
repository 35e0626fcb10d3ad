//! KV events in vLLM's published format (`vllm.distributed.kv_events`), so
//! the router scores this worker as it would a vLLM engine.
//!
//! A ZMQ PUB socket sends three frames per message: the topic, an 8-byte
//! big-endian sequence number (0, 1, 2, ...) and a msgpack payload
//! `[timestamp_f64, [event, ...], dp_rank]` with `dp_rank` 0. Events are
//! tagged arrays:
//!
//! - `["BlockStored", block_hashes, parent_block_hash, token_ids,
//!   block_size, lora_id, medium]`: blocks entered the worker's own cache
//!   (`lora_id` nil, `medium` `"GPU"`; the parent is nil for a chain's
//!   first block);
//! - `["BlockRemoved", block_hashes, medium]`: blocks were evicted;
//! - `["AllBlocksCleared"]`: the cache was dropped (at shutdown).
//!
//! Block hashes are integers: the first 8 bytes (little-endian) of the
//! canonical block hash ([`event_block_hash`]). The router recomputes the
//! canonical identity from `token_ids` anyway.
//!
//! The engine thread hands each step's events to [`EventSink::publish`],
//! which numbers and encodes them and queues them for the publisher task
//! (bounded; a full queue drops the batch, which subscribers see as a
//! sequence gap and resynchronise on). The PUB socket never blocks the
//! engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kvfabric::hash::BlockHash;
use rmpv::Value;
use tokio::sync::mpsc;
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

use super::clock::Clock;
use super::metrics::Metrics;

/// Event batches queued for the socket before new ones are dropped.
const QUEUE: usize = 4096;

/// The integer a KV event names a block by: the first 8 bytes of its
/// canonical hash, little-endian.
pub fn event_block_hash(key: &BlockHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_le_bytes(b)
}

/// One cache change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KvEvent {
    /// Blocks entered the cache (one chain run).
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
        block_size: usize,
    },
    /// Blocks left it.
    Removed { hashes: Vec<u64> },
    /// Everything left it.
    Cleared,
}

const MEDIUM: &str = "GPU";

fn ints(xs: impl IntoIterator<Item = u64>) -> Value {
    Value::Array(xs.into_iter().map(Value::from).collect())
}

impl KvEvent {
    fn to_value(&self) -> Value {
        match self {
            KvEvent::Stored {
                hashes,
                parent,
                tokens,
                block_size,
            } => Value::Array(vec![
                Value::from("BlockStored"),
                ints(hashes.iter().copied()),
                parent.map_or(Value::Nil, Value::from),
                ints(tokens.iter().map(|&t| u64::from(t))),
                Value::from(*block_size as u64),
                Value::Nil,
                Value::from(MEDIUM),
            ]),
            KvEvent::Removed { hashes } => Value::Array(vec![
                Value::from("BlockRemoved"),
                ints(hashes.iter().copied()),
                Value::from(MEDIUM),
            ]),
            KvEvent::Cleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
        }
    }
}

/// The msgpack payload of one batch.
pub(crate) fn encode_batch(ts: f64, events: &[KvEvent]) -> Vec<u8> {
    let v = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(KvEvent::to_value).collect()),
        Value::from(0),
    ]);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

/// Where the engine thread puts its events (see the module doc).
#[derive(Debug)]
pub(crate) struct EventSink {
    tx: mpsc::Sender<(u64, Vec<u8>)>,
    seq: AtomicU64,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// Numbers, encodes and queues a batch (nothing for an empty one).
    pub(crate) fn publish(&self, events: &[KvEvent]) {
        if events.is_empty() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let payload = encode_batch(self.clock.now_secs(), events);
        match self.tx.try_send((seq, payload)) {
            Ok(()) => self.metrics.kv_events.with_label_values(&["queued"]).inc(),
            Err(_) => {
                self.metrics.kv_events.with_label_values(&["dropped"]).inc();
                tracing::warn!(
                    seq,
                    "KV event queue full: batch dropped (subscribers will resynchronise)"
                );
            }
        }
    }
}

/// Binds the PUB socket at `endpoint`; returns the sink, the bound
/// endpoint (the real port when 0 was asked for) and the publisher task.
pub(crate) async fn start(
    endpoint: &str,
    topic: String,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> Result<(EventSink, String, tokio::task::JoinHandle<()>), zeromq::ZmqError> {
    let mut sock = PubSocket::new();
    let bound = sock.bind(endpoint).await?.to_string();
    let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(QUEUE);
    let m = metrics.clone();
    let task = tokio::spawn(async move {
        let topic = Bytes::from(topic);
        while let Some((seq, payload)) = rx.recv().await {
            let frames = vec![
                topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from(payload),
            ];
            let Ok(msg) = ZmqMessage::try_from(frames) else {
                continue;
            };
            match sock.send(msg).await {
                Ok(()) => m.kv_events.with_label_values(&["published"]).inc(),
                Err(e) => {
                    m.kv_events.with_label_values(&["dropped"]).inc();
                    tracing::warn!(seq, error = %e, "publishing KV events failed");
                }
            }
        }
        // Dropping the socket closes it.
    });
    let sink = EventSink {
        tx,
        seq: AtomicU64::new(0),
        clock,
        metrics,
    };
    Ok((sink, bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_a_vllm_event_batch() {
        let p = encode_batch(
            1.5,
            &[
                KvEvent::Stored {
                    hashes: vec![1, 2],
                    parent: Some(9),
                    tokens: vec![5; 8],
                    block_size: 4,
                },
                KvEvent::Removed { hashes: vec![1] },
                KvEvent::Cleared,
            ],
        );
        let v = rmpv::decode::read_value(&mut &p[..]).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a[0].as_f64(), Some(1.5));
        assert_eq!(a[2].as_i64(), Some(0));
        let evs = a[1].as_array().unwrap();
        let stored = evs[0].as_array().unwrap();
        assert_eq!(stored[0].as_str(), Some("BlockStored"));
        assert_eq!(stored.len(), 7);
        assert_eq!(stored[2].as_u64(), Some(9));
        assert!(stored[5].is_nil());
        assert_eq!(stored[6].as_str(), Some("GPU"));
        assert_eq!(evs[1].as_array().unwrap()[2].as_str(), Some("GPU"));
        assert_eq!(evs[2].as_array().unwrap().len(), 1);
        let k = [1u8, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(event_block_hash(&k), 1);
    }
}
