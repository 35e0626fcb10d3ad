//! Fuzzes the node's first steps with bytes from a local (Unix socket)
//! client: frame parsing (`kvfabric::local::decode_frame`) into the hello and
//! request messages, then the argument checks the session applies.
//!
//! Properties: nothing panics; a parsed frame never claims more bytes than
//! it was given; accepted namespaces and keys are within bounds.

#![no_main]

use kvfabric::local::decode_frame;
use kvfabric::validate;
use kvfabric_proto::v1::{LocalHello, LocalRequest, local_request::Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, used))) = decode_frame::<LocalHello>(data) {
        assert!(used <= data.len());
        let _ = validate::name("tenant", &h.tenant);
    }
    let mut rest = data;
    while let Ok(Some((req, used))) = decode_frame::<LocalRequest>(rest) {
        assert!(used >= 4 && used <= rest.len());
        rest = &rest[used..];
        match req.op {
            Some(Op::Commit(c)) => {
                if validate::name("namespace", &c.namespace).is_ok() {
                    assert!(!c.namespace.is_empty() && c.namespace.len() <= validate::MAX_NAME_LEN);
                }
                for (i, it) in c.items.iter().enumerate() {
                    if validate::key(i, &it.key).is_ok() {
                        assert!(!it.key.is_empty() && it.key.len() <= kvfabric_proto::MAX_KEY_BYTES);
                    }
                }
            }
            Some(Op::Acquire(a)) => {
                let _ = validate::keys(&a.keys, 4096);
            }
            Some(Op::Reserve(_) | Op::Abort(_) | Op::Release(_)) | None => {}
        }
    }
});
