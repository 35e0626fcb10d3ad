//! Fuzzes the parsers of OpenAI-style HTTP request bodies: the router's
//! (`/v1/completions`, `/v1/chat/completions`; `kvfabric_router::fuzzing`)
//! and the reference worker's (the same two plus `/v1/prefill`;
//! `kvfabric_engine_adapters::worker::fuzzing`). The first byte picks the
//! endpoint, the rest is the body. `dicts/openai.dict` gives libFuzzer the
//! field names.
//!
//! Properties: nothing panics on any body; a refusal is a 4xx with an
//! OpenAI error body (`error.message` and `error.type` strings); what is
//! accepted is within the bounds the rest of the code relies on (a prompt as
//! text or as ids, never both; a batch of at least one; the router's
//! `max_tokens` at most 2^32-1; the worker's at least 1 and its temperature
//! finite, from 0 to 100).

#![no_main]

use kvfabric_engine_adapters::worker::fuzzing as worker;
use kvfabric_router::fuzzing as router;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check_refusal((status, body): (u16, Value)) {
    assert!((400..500).contains(&status), "status {status} for a bad request");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 5 {
        0 | 1 => match router::parse_request(which % 5 == 1, body) {
            Ok(a) => {
                assert!(a.tokens.is_some() != a.text.is_some());
                assert!(a.batch >= 1);
                assert!(a.max_tokens <= u64::from(u32::MAX));
            }
            Err(e) => check_refusal(e),
        },
        2 | 3 => match worker::parse_generate(which % 5 == 3, body) {
            Ok(a) => {
                assert!(a.tokens.is_some() != a.text.is_some());
                assert!(a.max_tokens >= 1);
                assert!(a.temperature.is_finite() && (0.0..=100.0).contains(&a.temperature));
            }
            Err(e) => check_refusal(e),
        },
        _ => {
            if let Err(e) = worker::parse_prefill(body) {
                check_refusal(e);
            }
        }
    }
});
