//! Wire descriptors: [`RegionDescriptor`] (what a peer needs to address a registered region),
//! [`RemoteSlice`] (a byte range of one) and [`RdmaConnInfo`] (what two RDMA queue pairs exchange
//! over the side channel to connect).
//!
//! Each has a compact, versioned, little-endian binary encoding: `encode() -> Bytes` and
//! `decode(&[u8]) -> Result<_, TransportError>`. Decoders check every length, tag and bound,
//! reject trailing bytes, and never panic on any input. The first byte is the format version;
//! a decoder refuses versions it does not know.
//!
//! ```text
//! RegionDescriptor v1: version u8 = 1 | kind u8 (1 tcp, 2 rdma) | family u8 (4, 6)
//!                      | ip [4 or 16] | port u16 | instance u64 | region u64 | addr u64
//!                      | len u64 | rkey u32                        (45 bytes for IPv4)
//! RemoteSlice v1:      version u8 = 1 | RegionDescriptor | offset u64 | len u64
//! RdmaConnInfo v1:     version u8 = 1 | instance u64 | qp_num u32 | lid u16 | gid [16]
//!                      | psn u32 | mtu u8 (1 = 256 ... 5 = 4096)   (36 bytes)
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::{RegionId, Result, TransportError, TransportKind};

/// Version byte of the v1 encodings.
const VERSION: u8 = 1;

/// Addresses one registered region of one transport instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionDescriptor {
    kind: TransportKind,
    endpoint: SocketAddr,
    instance: u64,
    region: RegionId,
    addr: u64,
    len: u64,
    rkey: u32,
}

impl RegionDescriptor {
    /// Builds a descriptor; `len` must be non-zero and `addr + len` must not overflow.
    pub(crate) fn new(
        kind: TransportKind,
        endpoint: SocketAddr,
        instance: u64,
        region: RegionId,
        addr: u64,
        len: u64,
        rkey: u32,
    ) -> Result<RegionDescriptor> {
        if len == 0 {
            return Err(TransportError::InvalidArgument(
                "a region descriptor cannot be empty".into(),
            ));
        }
        if addr.checked_add(len).is_none() {
            return Err(TransportError::InvalidArgument(format!(
                "region at {addr:#x} of {len} bytes wraps the address space"
            )));
        }
        Ok(RegionDescriptor {
            kind,
            endpoint,
            instance,
            region,
            addr,
            len,
            rkey,
        })
    }

    /// The transport the region belongs to.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// Where to connect to reach the region's owner.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The owning transport instance.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The region's id at its owner.
    pub fn region(&self) -> RegionId {
        self.region
    }

    /// The region's base virtual address at the owner (RDMA addresses memory by it; TCP by
    /// region id and offset).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The region's length in bytes (never zero).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: descriptors of empty regions do not exist.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The remote key (RDMA; zero for TCP).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// The slice `[offset, offset + len)` of the region; fails unless it lies inside.
    pub fn slice(&self, offset: u64, len: u64) -> Result<RemoteSlice> {
        RemoteSlice::new(*self, offset, len)
    }

    /// The whole region as a slice.
    pub fn whole(&self) -> RemoteSlice {
        RemoteSlice {
            region: *self,
            offset: 0,
            len: self.len,
        }
    }

    /// The v1 encoding.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(57);
        self.put(&mut out);
        out.freeze()
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(bytes: &[u8]) -> Result<RegionDescriptor> {
        let mut r = Reader::new(bytes, "region descriptor");
        let d = RegionDescriptor::take(&mut r)?;
        r.finish()?;
        Ok(d)
    }

    fn put(&self, out: &mut BytesMut) {
        out.put_u8(VERSION);
        out.put_u8(match self.kind {
            TransportKind::Tcp => 1,
            TransportKind::Rdma => 2,
        });
        match self.endpoint.ip() {
            IpAddr::V4(ip) => {
                out.put_u8(4);
                out.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.put_u8(6);
                out.put_slice(&ip.octets());
            }
        }
        out.put_u16_le(self.endpoint.port());
        out.put_u64_le(self.instance);
        out.put_u64_le(self.region.0);
        out.put_u64_le(self.addr);
        out.put_u64_le(self.len);
        out.put_u32_le(self.rkey);
    }

    fn take(r: &mut Reader<'_>) -> Result<RegionDescriptor> {
        r.version()?;
        let kind = match r.u8()? {
            1 => TransportKind::Tcp,
            2 => TransportKind::Rdma,
            other => return Err(r.error(format!("unknown transport kind {other}"))),
        };
        let ip = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            other => return Err(r.error(format!("unknown address family {other}"))),
        };
        let port = r.u16()?;
        let instance = r.u64()?;
        let region = RegionId(r.u64()?);
        let addr = r.u64()?;
        let len = r.u64()?;
        let rkey = r.u32()?;
        RegionDescriptor::new(kind, SocketAddr::new(ip, port), instance, region, addr, len, rkey)
            .map_err(|e| r.error(e.to_string()))
    }
}

/// A byte range of a peer's registered region: `[offset, offset + len)`, always inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteSlice {
    region: RegionDescriptor,
    offset: u64,
    len: u64,
}

impl RemoteSlice {
    /// The slice `[offset, offset + len)` of `region`; fails unless it lies inside (an empty slice
    /// may sit at the region's end).
    pub fn new(region: RegionDescriptor, offset: u64, len: u64) -> Result<RemoteSlice> {
        match offset.checked_add(len) {
            Some(end) if end <= region.len => Ok(RemoteSlice { region, offset, len }),
            _ => Err(TransportError::OutOfBounds {
                region: region.region,
                offset,
                len,
                region_len: region.len,
            }),
        }
    }

    /// The region.
    pub fn region(&self) -> &RegionDescriptor {
        &self.region
    }

    /// Start within the region.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The owner's virtual address of the slice's first byte (cannot overflow: the slice lies
    /// inside the region, whose end does not overflow).
    pub fn remote_addr(&self) -> u64 {
        self.region.addr + self.offset
    }

    /// The v1 encoding.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(74);
        out.put_u8(VERSION);
        self.region.put(&mut out);
        out.put_u64_le(self.offset);
        out.put_u64_le(self.len);
        out.freeze()
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(bytes: &[u8]) -> Result<RemoteSlice> {
        let mut r = Reader::new(bytes, "remote slice");
        r.version()?;
        let region = RegionDescriptor::take(&mut r)?;
        let offset = r.u64()?;
        let len = r.u64()?;
        r.finish()?;
        RemoteSlice::new(region, offset, len).map_err(|e| r.error(e.to_string()))
    }
}

/// Path MTU of an RDMA connection (the `ibv_mtu` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256 = 1,
    /// 512 bytes.
    Mtu512 = 2,
    /// 1024 bytes.
    Mtu1024 = 3,
    /// 2048 bytes.
    Mtu2048 = 4,
    /// 4096 bytes.
    Mtu4096 = 5,
}

impl Mtu {
    /// The `ibv_mtu` enum value.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From an `ibv_mtu` enum value.
    pub fn from_code(code: u32) -> Option<Mtu> {
        Some(match code {
            1 => Mtu::Mtu256,
            2 => Mtu::Mtu512,
            3 => Mtu::Mtu1024,
            4 => Mtu::Mtu2048,
            5 => Mtu::Mtu4096,
            _ => return None,
        })
    }

    /// The MTU in bytes.
    pub fn bytes(self) -> u32 {
        128 << (self as u32)
    }
}

/// What one side of an RDMA reliable connection tells the other: its queue pair number, port
/// LID, GID (RoCE / routed InfiniBand), starting packet sequence number and path MTU, plus its
/// transport instance id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaConnInfo {
    instance: u64,
    qp_num: u32,
    lid: u16,
    gid: [u8; 16],
    psn: u32,
    mtu: Mtu,
}

impl RdmaConnInfo {
    /// Largest queue pair number and packet sequence number (both are 24-bit).
    pub const MAX_24BIT: u32 = 0x00ff_ffff;

    /// Builds connection info; `qp_num` and `psn` must fit in 24 bits.
    pub fn new(instance: u64, qp_num: u32, lid: u16, gid: [u8; 16], psn: u32, mtu: Mtu) -> Result<RdmaConnInfo> {
        if qp_num > Self::MAX_24BIT || psn > Self::MAX_24BIT {
            return Err(TransportError::InvalidArgument(format!(
                "qp number {qp_num:#x} and psn {psn:#x} must fit in 24 bits"
            )));
        }
        Ok(RdmaConnInfo {
            instance,
            qp_num,
            lid,
            gid,
            psn,
            mtu,
        })
    }

    /// The sender's transport instance.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Queue pair number.
    pub fn qp_num(&self) -> u32 {
        self.qp_num
    }

    /// Port LID (InfiniBand; zero on RoCE).
    pub fn lid(&self) -> u16 {
        self.lid
    }

    /// Port GID (all zero when unused).
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }

    /// Starting packet sequence number.
    pub fn psn(&self) -> u32 {
        self.psn
    }

    /// Active path MTU.
    pub fn mtu(&self) -> Mtu {
        self.mtu
    }

    /// The v1 encoding (36 bytes).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(36);
        out.put_u8(VERSION);
        out.put_u64_le(self.instance);
        out.put_u32_le(self.qp_num);
        out.put_u16_le(self.lid);
        out.put_slice(&self.gid);
        out.put_u32_le(self.psn);
        out.put_u8(self.mtu.code());
        out.freeze()
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(bytes: &[u8]) -> Result<RdmaConnInfo> {
        let mut r = Reader::new(bytes, "rdma connection info");
        r.version()?;
        let instance = r.u64()?;
        let qp_num = r.u32()?;
        let lid = r.u16()?;
        let gid = r.array::<16>()?;
        let psn = r.u32()?;
        let code = r.u8()?;
        let mtu = Mtu::from_code(u32::from(code)).ok_or_else(|| r.error(format!("unknown mtu code {code}")))?;
        r.finish()?;
        RdmaConnInfo::new(instance, qp_num, lid, gid, psn, mtu).map_err(|e| r.error(e.to_string()))
    }
}

/// A bounds-checked little-endian cursor: every read fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    fn error(&self, reason: impl fmt::Display) -> TransportError {
        TransportError::Decode(format!("{} (byte {}): {reason}", self.what, self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(self.error(format!("truncated: need {n} more bytes, have {}", rest.len())));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn version(&mut self) -> Result<()> {
        match self.u8()? {
            VERSION => Ok(()),
            v => Err(self.error(format!("unsupported version {v} (this build reads {VERSION})"))),
        }
    }

    fn finish(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.buf.len() - self.pos)))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn descriptor() -> impl Strategy<Value = RegionDescriptor> {
        let ip = prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        ];
        (
            prop_oneof![Just(TransportKind::Tcp), Just(TransportKind::Rdma)],
            ip,
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            1..=u64::MAX,
            any::<u32>(),
        )
            .prop_map(|(kind, ip, port, instance, region, addr, len, rkey)| {
                let len = len.min(u64::MAX - addr).max(1);
                let addr = addr.min(u64::MAX - len);
                RegionDescriptor::new(
                    kind,
                    SocketAddr::new(ip, port),
                    instance,
                    RegionId(region),
                    addr,
                    len,
                    rkey,
                )
                .unwrap()
            })
    }

    fn mtu() -> impl Strategy<Value = Mtu> {
        (1u32..=5).prop_map(|c| Mtu::from_code(c).unwrap())
    }

    fn sample() -> RegionDescriptor {
        RegionDescriptor::new(
            TransportKind::Tcp,
            "127.0.0.1:7000".parse().unwrap(),
            42,
            RegionId(7),
            0x1000,
            4096,
            0,
        )
        .unwrap()
    }

    #[test]
    fn descriptor_layout_is_compact_and_versioned() {
        let d = sample();
        let bytes = d.encode();
        assert_eq!(bytes.len(), 45);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(RegionDescriptor::decode(&bytes).unwrap(), d);
        let mut bad = bytes.to_vec();
        bad[0] = 2;
        assert!(matches!(RegionDescriptor::decode(&bad), Err(TransportError::Decode(_))));
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(RegionDescriptor::decode(&trailing).is_err());
        assert!(RegionDescriptor::decode(&bytes[..44]).is_err());
        assert!(RegionDescriptor::decode(&[]).is_err());
    }

    #[test]
    fn descriptor_rejects_empty_and_wrapping_regions() {
        let ep: SocketAddr = "[::1]:1".parse().unwrap();
        assert!(RegionDescriptor::new(TransportKind::Rdma, ep, 1, RegionId(1), 0, 0, 0).is_err());
        assert!(RegionDescriptor::new(TransportKind::Rdma, ep, 1, RegionId(1), u64::MAX, 2, 0).is_err());
        assert!(RegionDescriptor::new(TransportKind::Rdma, ep, 1, RegionId(1), u64::MAX - 2, 2, 0).is_ok());
        // A wrapping region smuggled in through the encoding is refused too.
        let ok = RegionDescriptor::new(TransportKind::Rdma, ep, 1, RegionId(1), u64::MAX - 2, 2, 0).unwrap();
        let mut bytes = ok.encode().to_vec();
        let len_at = bytes.len() - 4 - 8;
        bytes[len_at..len_at + 8].copy_from_slice(&3u64.to_le_bytes());
        assert!(RegionDescriptor::decode(&bytes).is_err());
    }

    #[test]
    fn slices_stay_inside_their_region() {
        let d = sample();
        assert!(d.slice(0, 4096).is_ok());
        assert!(d.slice(4096, 0).is_ok());
        assert!(d.slice(4000, 96).is_ok());
        assert!(matches!(d.slice(4000, 97), Err(TransportError::OutOfBounds { .. })));
        assert!(d.slice(4097, 0).is_err());
        assert!(d.slice(u64::MAX, 2).is_err());
        assert!(d.slice(1, u64::MAX).is_err());
        assert_eq!(d.slice(16, 1).unwrap().remote_addr(), 0x1010);
        assert_eq!(d.whole().len(), 4096);
        // An out-of-bounds slice smuggled in through the encoding is refused.
        let mut bytes = d.slice(0, 16).unwrap().encode().to_vec();
        let n = bytes.len();
        bytes[n - 16..n - 8].copy_from_slice(&4090u64.to_le_bytes());
        assert!(RemoteSlice::decode(&bytes).is_err());
    }

    #[test]
    fn conn_info_checks_24_bit_fields_and_mtu() {
        let gid = [3u8; 16];
        assert!(RdmaConnInfo::new(1, 0x0100_0000, 1, gid, 0, Mtu::Mtu1024).is_err());
        assert!(RdmaConnInfo::new(1, 1, 1, gid, 0x0100_0000, Mtu::Mtu1024).is_err());
        let info = RdmaConnInfo::new(9, 0xabcdef, 5, gid, 0x123456, Mtu::Mtu4096).unwrap();
        let bytes = info.encode();
        assert_eq!(bytes.len(), 36);
        assert_eq!(RdmaConnInfo::decode(&bytes).unwrap(), info);
        let mut bad = bytes.to_vec();
        *bad.last_mut().unwrap() = 6;
        assert!(RdmaConnInfo::decode(&bad).is_err());
        assert_eq!(Mtu::Mtu256.bytes(), 256);
        assert_eq!(Mtu::Mtu4096.bytes(), 4096);
    }

    proptest! {
        #[test]
        fn descriptor_roundtrip(d in descriptor()) {
            prop_assert_eq!(RegionDescriptor::decode(&d.encode()).unwrap(), d);
        }

        #[test]
        fn slice_roundtrip(d in descriptor(), a in any::<u64>(), b in any::<u64>()) {
            let offset = a % (d.len() + 1);
            let len = b % (d.len() - offset + 1);
            let s = d.slice(offset, len).unwrap();
            prop_assert_eq!(RemoteSlice::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn conn_info_roundtrip(
            instance in any::<u64>(),
            qp in 0..=RdmaConnInfo::MAX_24BIT,
            lid in any::<u16>(),
            gid in any::<[u8; 16]>(),
            psn in 0..=RdmaConnInfo::MAX_24BIT,
            mtu in mtu(),
        ) {
            let info = RdmaConnInfo::new(instance, qp, lid, gid, psn, mtu).unwrap();
            prop_assert_eq!(RdmaConnInfo::decode(&info.encode()).unwrap(), info);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = RegionDescriptor::decode(&bytes);
            let _ = RemoteSlice::decode(&bytes);
            let _ = RdmaConnInfo::decode(&bytes);
        }

        #[test]
        fn decoding_mutated_encodings_never_panics_and_keeps_bounds(
            d in descriptor(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut bytes = d.whole().encode().to_vec();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] ^= v;
            }
            bytes.truncate(cut % (bytes.len() + 1) + bytes.len() / 2);
            if let Ok(s) = RemoteSlice::decode(&bytes) {
                prop_assert!(s.offset().checked_add(s.len()).is_some_and(|end| end <= s.region().len()));
                prop_assert!(s.region().addr().checked_add(s.region().len()).is_some());
            }
        }
    }
}
