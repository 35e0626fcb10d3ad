//! Fuzzes the owner's side of the TCP block transport
//! (`kvfabric::transport::TcpTransport`'s connection server, through
//! `ServeHarness`): the bytes a peer sends over a connection — hello, request
//! headers, write payloads — against two registered regions, one read-only
//! and one read-write.
//!
//! The first byte picks a mode: raw bytes as the whole connection, or
//! requests built from the input (a valid hello, then per request an op,
//! region, instance, offset, length and payload chosen by the fuzzer, mostly
//! in or near bounds), so the fuzzer reaches the copy paths behind the
//! checks.
//!
//! Properties: nothing panics; the read-only region is never written; an
//! answer that ends cleanly is a whole hello reply plus responses, with
//! request ids in order; a successful read returns the region's bytes.

#![no_main]

use std::sync::OnceLock;

use kvfabric::transport::{Access, RegionId, ServeHarness};
use libfuzzer_sys::fuzz_target;

const INSTANCE: u64 = 0x5eed;
const REGION_LEN: usize = 8192;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

/// Reads little-endian integers off the input, zero once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
}

/// Builds a connection's bytes from structured input; returns them, the ids
/// of the requests that read the read-only region, and whether every write
/// carries exactly the payload it claims (else later headers are read out of
/// step, and ids are whatever those bytes say).
fn build(mut inp: Input<'_>) -> (Vec<u8>, Vec<u64>, bool) {
    let mut reads_of_ro = Vec::new();
    let mut aligned = true;
    let mut wire = b"KVFT".to_vec();
    wire.extend_from_slice(&1u16.to_le_bytes());
    let mut id = 0u64;
    while !inp.0.is_empty() {
        let ctl = inp.u8();
        let op = match ctl & 3 {
            0 => 1, // read
            1 => 2, // write
            2 => inp.u8(),
            _ => 1,
        };
        let region = match (ctl >> 2) & 3 {
            0 => 1u64,
            1 => 2,
            2 => 3, // unknown
            _ => u64::from(inp.u8()),
        };
        let instance = if ctl & 0x10 == 0 { INSTANCE } else { INSTANCE + 1 };
        let offset = u64::from(inp.u16()) % (REGION_LEN as u64 + 64);
        let len = if ctl & 0x20 == 0 {
            u64::from(inp.u16()) % 600
        } else {
            u64::MAX - u64::from(inp.u8())
        };
        id += 1;
        if op == 1 && region == 1 {
            reads_of_ro.push(id);
        }
        wire.push(op);
        for v in [id, instance, region, offset, len] {
            wire.extend_from_slice(&v.to_le_bytes());
        }
        if op == 2 {
            // A write's payload: as long as claimed, unless the fuzzer cuts it short.
            let n = if ctl & 0x40 == 0 { len.min(600) as usize } else { usize::from(inp.u8()) };
            let fill = inp.u8();
            wire.extend(std::iter::repeat_n(fill, n));
            aligned &= n as u64 == len;
        }
    }
    (wire, reads_of_ro, aligned)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let harness = ServeHarness::new(
        INSTANCE,
        &[(REGION_LEN, Access::REMOTE_READ), (REGION_LEN, Access::REMOTE_READ_WRITE)],
    )
    .expect("harness");
    harness.fill(0, 0xa5);
    assert_eq!(harness.region(0), RegionId(1));
    let (wire, reads_of_ro, aligned) =
        if mode & 1 == 0 { (rest.to_vec(), Vec::new(), false) } else { build(Input(rest)) };
    let (out, ended) = runtime().block_on(harness.serve(&wire));
    assert!(harness.contents(0).iter().all(|&b| b == 0xa5), "the read-only region was written");
    if ended.is_ok() && !out.is_empty() {
        let (_, responses) = ServeHarness::responses(&out).expect("a clean end leaves a whole answer");
        let mut last = None;
        for (status, id, body) in responses {
            if aligned {
                // Ids come back in request order (the structured mode numbers them 1, 2, ...).
                assert!(last.is_none_or(|l| id > l), "response {id} after {last:?}");
                if status == 0 && reads_of_ro.contains(&id) {
                    assert!(body.iter().all(|&b| b == 0xa5), "read {id} returned other bytes");
                }
            }
            last = Some(id);
        }
    }
});
