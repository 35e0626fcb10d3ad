//! Fuzzes `BlockHeader::decode`, the one decoder in the storage engine that
//! reads bytes from outside (object-store objects, disk files).
//!
//! Properties: decode never panics on any input; when it succeeds, the
//! consumed prefix is within the input and is exactly the canonical encoding
//! of the decoded header and key, and re-encoding decodes to the same value.
//!
//! The first input byte picks how the rest is used, so the fuzzer also gets
//! past the header checksum (which it could never forge by mutation):
//! - `0`: the rest is fed to `decode` as is;
//! - `1`: the rest is a header body; the target frames it (magic, version,
//!   total length) and appends the right checksum, exercising field parsing;
//! - `2`: the rest drives arbitrary header fields and a key, which are
//!   encoded and must decode back unchanged.

#![no_main]

use kvfabric_tiers::{BlockHeader, Layout, MAX_KEY_LEN, ObjectKey, checksum};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Framing constants of the header encoding (mirrors `tiers/src/block.rs`).
const MAGIC: u32 = 0x4B56_4642;
const VERSION: u16 = 1;

fn check_decoded(data: &[u8]) {
    let Ok((header, key, len)) = BlockHeader::decode(data) else {
        return;
    };
    assert!(
        len <= data.len(),
        "decode consumed {len} of {} bytes",
        data.len()
    );
    let enc = header.encode(&key).expect("a decoded header encodes");
    assert_eq!(
        &enc[..],
        &data[..len],
        "decoded header does not re-encode to its input bytes"
    );
    let (h2, k2, n2) = BlockHeader::decode(&enc).expect("re-encoded header must decode");
    assert_eq!((h2, k2, n2), (header, key, enc.len()));
}

fn framed(body: &[u8]) -> Vec<u8> {
    let total = (4 + 2 + 4 + body.len() + 8) as u32;
    let mut v = Vec::with_capacity(total as usize);
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&total.to_le_bytes());
    v.extend_from_slice(body);
    let sum = checksum(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

fn short_string(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s: String = u.arbitrary()?;
    while s.len() > 256 {
        s.pop();
    }
    Ok(s)
}

fn roundtrip(u: &mut Unstructured<'_>) -> Result<()> {
    let mut ns = short_string(u)?;
    if ns.is_empty() {
        ns.push('n');
    }
    let key_len = u.int_in_range(1..=MAX_KEY_LEN)?;
    let key_bytes = u.bytes(key_len)?.to_vec();
    let key = ObjectKey::new(ns, key_bytes);
    let header = BlockHeader {
        length: u.arbitrary()?,
        checksum: u.arbitrary()?,
        created_ms: u.arbitrary()?,
        layout: Layout {
            model: short_string(u)?,
            dtype: short_string(u)?,
            num_layers: u.arbitrary()?,
            tokens_per_block: u.arbitrary()?,
            num_kv_heads: u.arbitrary()?,
            head_dim: u.arbitrary()?,
            tp_rank: u.arbitrary()?,
            tp_size: u.arbitrary()?,
        },
    };
    let enc = header.encode(&key).expect("fields within the limits encode");
    let (h2, k2, n) = BlockHeader::decode(&enc).expect("an encoded header must decode");
    assert_eq!((h2, k2, n), (header, key, enc.len()));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = BlockHeader::decode(data);
        return;
    };
    match mode % 3 {
        0 => check_decoded(rest),
        1 => check_decoded(&framed(rest)),
        _ => {
            let _ = roundtrip(&mut Unstructured::new(rest));
        }
    }
});
