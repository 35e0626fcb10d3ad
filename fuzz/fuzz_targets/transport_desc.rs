//! Fuzzes the decoders of the block transport's wire descriptors
//! (`kvfabric::transport::{RegionDescriptor, RemoteSlice, RdmaConnInfo}`),
//! which peers send each other to address registered memory and to connect
//! RDMA queue pairs.
//!
//! Properties: nothing panics on any input; whatever decodes re-encodes to
//! exactly the bytes it came from (the encodings are canonical) and satisfies
//! its invariants (a region is non-empty and does not wrap the address space,
//! a slice lies inside its region, queue pair and packet sequence numbers fit
//! in 24 bits).

#![no_main]

use kvfabric::transport::{RdmaConnInfo, RegionDescriptor, RemoteSlice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = RegionDescriptor::decode(data) {
        assert_eq!(&d.encode()[..], data);
        assert!(d.len() > 0 && d.addr().checked_add(d.len()).is_some());
    }
    if let Ok(s) = RemoteSlice::decode(data) {
        assert_eq!(&s.encode()[..], data);
        assert!(s.offset().checked_add(s.len()).is_some_and(|end| end <= s.region().len()));
        let _ = s.remote_addr();
    }
    if let Ok(c) = RdmaConnInfo::decode(data) {
        assert_eq!(&c.encode()[..], data);
        assert!(c.qp_num() <= RdmaConnInfo::MAX_24BIT && c.psn() <= RdmaConnInfo::MAX_24BIT);
        assert!(c.mtu().bytes() >= 256);
    }
});
