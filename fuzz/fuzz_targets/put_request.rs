//! Fuzzes what the server does first with untrusted request bytes: prost
//! decoding of `PutRequest`, `GetRequest` and `ExistsPrefixRequest`, then the
//! shared argument checks (`kvfabric::validate`) on the decoded fields.
//!
//! Properties: nothing panics; whatever the checks accept really is within
//! the documented bounds (names 1 to 128 of `[A-Za-z0-9._-]`, keys 1 to 64
//! bytes, batches non-empty and at most the limit).

#![no_main]

use kvfabric::validate;
use kvfabric_proto::MAX_KEY_BYTES;
use kvfabric_proto::v1::{ExistsPrefixRequest, GetRequest, PutRequest, put_request::Msg};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The server's default `limits.max-batch-keys`.
const MAX_BATCH_KEYS: usize = 4096;

fn check_name(what: &str, value: &str) {
    if validate::name(what, value).is_ok() {
        assert!(
            (1..=validate::MAX_NAME_LEN).contains(&value.len()),
            "{what} {value:?} accepted"
        );
        assert!(
            value
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')),
            "{what} {value:?} accepted"
        );
    }
}

fn check_key(index: usize, key: &[u8]) {
    if validate::key(index, key).is_ok() {
        assert!(
            (1..=MAX_KEY_BYTES).contains(&key.len()),
            "key of {} bytes accepted",
            key.len()
        );
    }
}

fn check_keys<K: AsRef<[u8]>>(keys: &[K]) {
    for (i, k) in keys.iter().enumerate() {
        check_key(i, k.as_ref());
    }
    if validate::keys(keys, MAX_BATCH_KEYS).is_ok() {
        assert!(
            (1..=MAX_BATCH_KEYS).contains(&keys.len()),
            "batch of {} keys accepted",
            keys.len()
        );
        assert!(
            keys.iter()
                .all(|k| (1..=MAX_KEY_BYTES).contains(&k.as_ref().len()))
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = PutRequest::decode(data) {
        match req.msg {
            Some(Msg::Open(open)) => {
                check_name("tenant", &open.tenant);
                check_name("namespace", &open.namespace);
            }
            Some(Msg::Begin(begin)) => check_key(0, &begin.key),
            Some(Msg::Data(_)) | None => {}
        }
    }
    if let Ok(req) = GetRequest::decode(data) {
        check_name("tenant", &req.tenant);
        check_name("namespace", &req.namespace);
        check_keys(&req.keys);
    }
    if let Ok(req) = ExistsPrefixRequest::decode(data) {
        check_name("tenant", &req.tenant);
        check_name("namespace", &req.namespace);
        check_keys(&req.keys);
    }
});
