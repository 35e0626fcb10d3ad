//! Block transport: one-sided reads and writes of registered memory between nodes, and between a
//! client and a node.
//!
//! # Model
//!
//! A [`Transport`] owns a set of *registered regions*: host memory its owner exposes to peers.
//! [`Transport::register`] takes an `Arc<dyn RegisteredMemory>` (so the memory provably outlives
//! its registration) and returns a [`RegionHandle`]; [`Transport::descriptor`] turns the handle
//! into a [`RegionDescriptor`], a small value (endpoint, transport instance, region id, base
//! address, length, remote key) that travels to peers through the control plane (gRPC, etcd, ...)
//! in its compact binary encoding. A peer [`connect`](Transport::connect)s to the descriptor's
//! endpoint and issues reads and writes of [`RemoteSlice`]s (a descriptor plus an offset and a
//! length) against it, singly or in batches ([`Connection::read_many`],
//! [`Connection::write_many`]: post every op, then wait for all of them).
//!
//! Two implementations share the trait and one conformance suite:
//!
//! - [`TcpTransport`] (always built): each transport runs a small listener task; the *owner's*
//!   listener serves a peer's read or write by copying from or into the registered memory, after
//!   validating the request against its region registry. One-sided from the caller's point of
//!   view (the owner's application code is not involved), but the owner's CPU does the copy.
//! - `RdmaTransport` (feature `rdma`, system libibverbs through the `rdma-sys` crate): regions are
//!   `ibv_reg_mr` memory regions, connections are RC queue pairs set up over a TCP side channel,
//!   and reads and writes are `IBV_WR_RDMA_READ` / `IBV_WR_RDMA_WRITE` work requests that the
//!   owner's NIC serves without its CPU. It is untested on hardware (no RDMA device on the build
//!   machine or in CI).
//!
//! # Memory and aliasing rules
//!
//! One-sided access to memory the owner may also touch is inherently racy, so:
//!
//! - [`RegisteredMemory`] is an `unsafe trait`: an implementation promises that `as_ptr()` stays
//!   valid for `len()` bytes, at a fixed address, for as long as the object lives. A transport
//!   holds the `Arc` until the region is deregistered *and* every in-flight operation that
//!   references it has finished ([`Transport::deregister`] waits for that).
//! - Transports never form `&` or `&mut` references to registered memory; every access is a raw
//!   `std::ptr::copy_nonoverlapping`. The owner's own accesses ([`HostRegion::read_at`],
//!   [`HostRegion::write_at`]) are `unsafe` for the same reason: the owner must only touch bytes
//!   that no peer is reading or writing at that moment, which it coordinates through the control
//!   plane (e.g. a peer writes a block, then tells the owner over gRPC that it is complete).
//! - Nothing orders concurrent remote operations on overlapping bytes; callers must not issue
//!   them.
//!
//! # Errors
//!
//! [`TransportError`] is detailed; [`TransportError::kind`] gives the crate-wide
//! [`ErrorKind`]. Errors the *peer* reported (or, for RDMA, its NIC) are
//! [`TransportError::Rejected`] with a [`RejectReason`]; [`TransportError::reject_reason`] maps local
//! and remote rejections to the same reason so callers can treat them alike. After an I/O or
//! protocol failure a connection reports [`TransportError::Broken`] and must be replaced; RDMA
//! connections also break on a remote rejection (the queue pair enters the error state).

#[cfg(test)]
mod conformance;
mod desc;
#[cfg(feature = "rdma")]
mod rdma;
mod registry;
mod tcp;

use std::alloc::Layout;
use std::fmt;
use std::net::SocketAddr;
use std::ptr::NonNull;
use std::sync::Arc;

use async_trait::async_trait;

use crate::ErrorKind;

pub use desc::{Mtu, RdmaConnInfo, RegionDescriptor, RemoteSlice};
#[cfg(feature = "rdma")]
pub use rdma::{RdmaConfig, RdmaTransport};
pub use tcp::TcpTransport;
#[doc(hidden)]
pub use tcp::{RawResponse, ServeHarness};

/// Results of this module.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Which implementation a transport (or a descriptor) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// [`TcpTransport`].
    Tcp,
    /// `RdmaTransport` (feature `rdma`).
    Rdma,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        })
    }
}

/// Identifies a registered region within one transport instance. Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A one-sided operation's direction, as seen by the peer that issues it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// The peer copies bytes out of the region.
    Read,
    /// The peer copies bytes into the region.
    Write,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
        })
    }
}

/// What peers may do to a registered region. Local access is always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// Peers may not touch the region (it is registered for local use only, e.g. as the local
    /// side of transfers).
    pub const LOCAL_ONLY: Access = Access(0);
    /// Peers may read the region.
    pub const REMOTE_READ: Access = Access(1);
    /// Peers may write the region.
    pub const REMOTE_WRITE: Access = Access(2);
    /// Peers may read and write the region.
    pub const REMOTE_READ_WRITE: Access = Access(3);

    /// Whether every permission in `other` is in `self`.
    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether a peer may perform `op`.
    pub fn allows(self, op: OpKind) -> bool {
        match op {
            OpKind::Read => self.contains(Access::REMOTE_READ),
            OpKind::Write => self.contains(Access::REMOTE_WRITE),
        }
    }

    /// The raw bits (bit 0: remote read, bit 1: remote write).
    pub fn bits(self) -> u8 {
        self.0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// Why a peer (or, for RDMA, the peer's NIC) refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No such region.
    UnknownRegion,
    /// The region was deregistered.
    Deregistered,
    /// The slice is not inside the region.
    OutOfBounds,
    /// The region does not allow this operation.
    AccessDenied,
    /// The slice names another transport instance (a stale descriptor, or the wrong peer).
    WrongInstance,
    /// The request was malformed.
    Malformed,
    /// RDMA remote access error: a bad rkey, bounds or permission; the NIC does not say which.
    RemoteAccess,
    /// The peer failed for a reason of its own.
    Internal,
}

impl RejectReason {
    /// The crate-wide error kind of this reason.
    pub fn kind(self) -> ErrorKind {
        match self {
            RejectReason::UnknownRegion | RejectReason::Deregistered | RejectReason::WrongInstance => {
                ErrorKind::NotFound
            }
            RejectReason::OutOfBounds | RejectReason::Malformed => ErrorKind::InvalidArgument,
            RejectReason::AccessDenied | RejectReason::RemoteAccess => ErrorKind::PermissionDenied,
            RejectReason::Internal => ErrorKind::Internal,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            RejectReason::UnknownRegion => 1,
            RejectReason::Deregistered => 2,
            RejectReason::OutOfBounds => 3,
            RejectReason::AccessDenied => 4,
            RejectReason::WrongInstance => 5,
            RejectReason::Malformed => 6,
            RejectReason::RemoteAccess => 7,
            RejectReason::Internal => 8,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<RejectReason> {
        Some(match code {
            1 => RejectReason::UnknownRegion,
            2 => RejectReason::Deregistered,
            3 => RejectReason::OutOfBounds,
            4 => RejectReason::AccessDenied,
            5 => RejectReason::WrongInstance,
            6 => RejectReason::Malformed,
            7 => RejectReason::RemoteAccess,
            8 => RejectReason::Internal,
            _ => return None,
        })
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::UnknownRegion => "unknown region",
            RejectReason::Deregistered => "deregistered region",
            RejectReason::OutOfBounds => "out of bounds",
            RejectReason::AccessDenied => "access denied",
            RejectReason::WrongInstance => "wrong transport instance",
            RejectReason::Malformed => "malformed request",
            RejectReason::RemoteAccess => "remote access error",
            RejectReason::Internal => "internal error",
        })
    }
}

/// Errors of the block transports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The transport cannot be used here (no RDMA device, peer unreachable, transport closed).
    #[error("transport unavailable: {0}")]
    Unavailable(String),
    /// An I/O or verbs call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The caller passed something unusable (e.g. an empty region, mismatched buffer lengths).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The region is not registered here.
    #[error("region {0} is not registered")]
    UnknownRegion(RegionId),
    /// The region has been deregistered.
    #[error("region {0} has been deregistered")]
    Deregistered(RegionId),
    /// The slice is not inside the region.
    #[error("bytes [{offset}, {offset} + {len}) are outside region {region} of {region_len} bytes")]
    OutOfBounds {
        /// The region.
        region: RegionId,
        /// Start of the slice within the region.
        offset: u64,
        /// Length of the slice.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
    /// The memory overlaps a region that is already registered.
    #[error("memory [{base:#x}, +{len}) overlaps registered region {existing}")]
    Overlap {
        /// Base address of the rejected memory.
        base: u64,
        /// Its length.
        len: u64,
        /// The region it overlaps.
        existing: RegionId,
    },
    /// The region does not allow this operation.
    #[error("region {region} does not allow remote {op}s")]
    AccessDenied {
        /// The region.
        region: RegionId,
        /// The refused operation.
        op: OpKind,
    },
    /// The slice belongs to another transport instance than this connection's peer.
    #[error("slice addresses transport instance {slice:#018x} but this connection's peer is {peer:#018x}")]
    WrongPeer {
        /// The slice's instance.
        slice: u64,
        /// The peer's instance.
        peer: u64,
    },
    /// The peer (or its NIC) refused the operation.
    #[error("peer rejected the operation ({reason}): {message}")]
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The peer's explanation.
        message: String,
    },
    /// A descriptor or connection info did not decode.
    #[error("malformed encoding: {0}")]
    Decode(String),
    /// The peer broke the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An earlier failure left this connection unusable; open a new one.
    #[error("connection is broken by an earlier failure; reconnect")]
    Broken,
}

impl TransportError {
    /// The crate-wide kind: what the caller should do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Unavailable(_) | TransportError::Io { .. } | TransportError::Broken => {
                ErrorKind::Unavailable
            }
            TransportError::InvalidArgument(_)
            | TransportError::OutOfBounds { .. }
            | TransportError::Overlap { .. }
            | TransportError::WrongPeer { .. }
            | TransportError::Decode(_) => ErrorKind::InvalidArgument,
            TransportError::UnknownRegion(_) | TransportError::Deregistered(_) => ErrorKind::NotFound,
            TransportError::AccessDenied { .. } => ErrorKind::PermissionDenied,
            TransportError::Rejected { reason, .. } => reason.kind(),
            TransportError::Protocol(_) => ErrorKind::Internal,
        }
    }

    /// The rejection reason, whether the check failed here or at the peer; `None` for errors
    /// that are not rejections of a region access.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        Some(match self {
            TransportError::UnknownRegion(_) => RejectReason::UnknownRegion,
            TransportError::Deregistered(_) => RejectReason::Deregistered,
            TransportError::OutOfBounds { .. } => RejectReason::OutOfBounds,
            TransportError::AccessDenied { .. } => RejectReason::AccessDenied,
            TransportError::WrongPeer { .. } => RejectReason::WrongInstance,
            TransportError::Rejected { reason, .. } => *reason,
            _ => return None,
        })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> TransportError {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Memory that a transport may expose to peers.
///
/// # Safety
///
/// Implementations promise that `as_ptr()` returns the same pointer for the object's whole
/// lifetime, valid for reads and writes of `len()` bytes, and that the memory is not freed or
/// moved before the object is dropped. Transports copy into and out of it with raw pointer
/// copies from other threads (and, with RDMA, the NIC does), so the object must be usable from
/// any thread; see the module docs for the aliasing rules.
pub unsafe trait RegisteredMemory: Send + Sync + 'static {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the memory in bytes.
    fn len(&self) -> usize;
    /// Whether the memory is empty (such memory cannot be registered).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for dyn RegisteredMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredMemory")
            .field("ptr", &self.as_ptr())
            .field("len", &self.len())
            .finish()
    }
}

/// Alignment of [`HostRegion`] memory: a page, which is what RDMA registration pins.
pub const HOST_REGION_ALIGN: usize = 4096;

/// Page-aligned, zero-initialised heap memory for registration; the simplest
/// [`RegisteredMemory`].
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is a private heap allocation; every access goes through raw pointer copies
// whose concurrency contract is documented on `read_at`/`write_at` and in the module docs.
unsafe impl Send for HostRegion {}
// SAFETY: as above.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Allocates `len` zeroed bytes, aligned to [`HOST_REGION_ALIGN`].
    pub fn zeroed(len: usize) -> Result<HostRegion> {
        if len == 0 {
            return Err(TransportError::InvalidArgument("a host region cannot be empty".into()));
        }
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Ok(HostRegion { ptr, len })
    }

    fn layout(len: usize) -> Result<Layout> {
        Layout::from_size_align(len, HOST_REGION_ALIGN)
            .map_err(|e| TransportError::InvalidArgument(format!("host region of {len} bytes: {e}")))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: host regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(TransportError::InvalidArgument(format!(
                "bytes [{offset}, {offset} + {len}) are outside a host region of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    ///
    /// # Safety
    ///
    /// No peer may be writing these bytes concurrently (coordinate through the control plane).
    pub unsafe fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: in bounds (checked above); `dst` is a distinct, exclusively borrowed buffer; the
        // caller guarantees no concurrent remote write.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// # Safety
    ///
    /// No peer may be reading or writing these bytes concurrently (coordinate through the
    /// control plane).
    pub unsafe fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: in bounds (checked above); `src` cannot alias the region's private allocation
        // through a reference because no transport hands out references to it; the caller
        // guarantees no concurrent remote access.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) };
        Ok(())
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("layout was valid at allocation");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRegion")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the allocation is fixed for the object's lifetime and `len` bytes long.
unsafe impl RegisteredMemory for HostRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// A registered region, as its owner sees it. Deregister it with [`Transport::deregister`].
#[derive(Debug, PartialEq, Eq, Hash)]
#[must_use = "a region stays registered (and its memory alive) until it is deregistered"]
pub struct RegionHandle {
    instance: u64,
    id: RegionId,
    len: u64,
}

impl RegionHandle {
    pub(crate) fn new(instance: u64, id: RegionId, len: u64) -> RegionHandle {
        RegionHandle { instance, id, len }
    }

    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// The region's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty regions cannot be registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The transport instance that registered the region.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// `Ok` when transport instance `instance` registered this region; a
    /// handle from another transport is an unknown region to it.
    pub(crate) fn check_owner(&self, instance: u64) -> Result<()> {
        if self.instance == instance {
            Ok(())
        } else {
            Err(TransportError::UnknownRegion(self.id))
        }
    }
}

/// One read of a batch: copy `remote` into `local` (same length).
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// Where to read from.
    pub remote: RemoteSlice,
    /// Where the bytes go.
    pub local: &'a mut [u8],
}

/// One write of a batch: copy `local` into `remote` (same length).
#[derive(Debug, Clone, Copy)]
pub struct WriteOp<'a> {
    /// Where to write to.
    pub remote: RemoteSlice,
    /// The bytes to write.
    pub local: &'a [u8],
}

/// A block transport: registers local memory for peers and connects to peers' memory.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> TransportKind;

    /// The address peers [`connect`](Transport::connect) to (also in every descriptor).
    fn endpoint(&self) -> SocketAddr;

    /// Registers `memory` so peers may access it as `access` allows. The transport keeps the
    /// `Arc` until the region is deregistered and no operation references it. Fails on empty
    /// memory and on memory overlapping an already registered region.
    async fn register(&self, memory: Arc<dyn RegisteredMemory>, access: Access) -> Result<RegionHandle>;

    /// Deregisters a region: new operations on it fail at once; the call returns when the
    /// operations already in flight have finished and the transport has released the memory.
    async fn deregister(&self, region: RegionHandle) -> Result<()>;

    /// What a peer needs to address the region.
    fn descriptor(&self, region: &RegionHandle) -> Result<RegionDescriptor>;

    /// Opens a connection to the transport listening at `peer` (a descriptor's endpoint).
    async fn connect(&self, peer: SocketAddr) -> Result<Box<dyn Connection>>;
}

/// A connection to one peer transport, for one-sided reads and writes of its regions.
///
/// Batches are validated before anything is sent (buffer lengths, slice ownership); then every
/// op is posted and the call waits for all of them. On failure the first error is returned and
/// the contents of the other ops' destinations are unspecified.
#[async_trait]
pub trait Connection: Send + Sync + fmt::Debug {
    /// The peer's endpoint.
    fn peer(&self) -> SocketAddr;

    /// Copies each op's remote slice into its local buffer.
    async fn read_many(&self, ops: &mut [ReadOp<'_>]) -> Result<()>;

    /// Copies each op's local buffer into its remote slice.
    async fn write_many(&self, ops: &[WriteOp<'_>]) -> Result<()>;
}

/// Single-op conveniences over [`Connection`].
#[async_trait]
pub trait ConnectionExt: Connection {
    /// Copies `remote` into `local` (same length).
    async fn read(&self, remote: &RemoteSlice, local: &mut [u8]) -> Result<()> {
        self.read_many(&mut [ReadOp { remote: *remote, local }]).await
    }

    /// Copies `local` into `remote` (same length).
    async fn write(&self, remote: &RemoteSlice, local: &[u8]) -> Result<()> {
        self.write_many(&[WriteOp { remote: *remote, local }]).await
    }
}

impl<C: Connection + ?Sized> ConnectionExt for C {}

/// Checks that every op of a batch targets `peer_instance` of `kind` with matching lengths.
pub(crate) fn validate_batch<'a>(
    kind: TransportKind,
    peer_instance: u64,
    ops: impl IntoIterator<Item = (&'a RemoteSlice, usize)>,
) -> Result<()> {
    for (remote, local_len) in ops {
        let region = remote.region();
        if region.kind() != kind {
            return Err(TransportError::InvalidArgument(format!(
                "slice of a {} region used on a {kind} connection",
                region.kind()
            )));
        }
        if region.instance() != peer_instance {
            return Err(TransportError::WrongPeer {
                slice: region.instance(),
                peer: peer_instance,
            });
        }
        if remote.len() != local_len as u64 {
            return Err(TransportError::InvalidArgument(format!(
                "remote slice of {} bytes but local buffer of {local_len} bytes",
                remote.len()
            )));
        }
    }
    Ok(())
}

/// A fresh, non-zero transport instance id. It only tells incarnations apart (so a stale
/// descriptor from before a restart is refused rather than aliasing a new region); nothing's
/// behaviour depends on its value, so it comes from std's per-process random hash keys rather than
/// an injected RNG.
pub(crate) fn new_instance_id() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = std::hash::RandomState::new().hash_one((n, std::process::id()));
    id.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags() {
        assert!(Access::REMOTE_READ_WRITE.allows(OpKind::Read));
        assert!(Access::REMOTE_READ_WRITE.allows(OpKind::Write));
        assert!(Access::REMOTE_READ.allows(OpKind::Read));
        assert!(!Access::REMOTE_READ.allows(OpKind::Write));
        assert!(!Access::LOCAL_ONLY.allows(OpKind::Read));
        assert_eq!(Access::REMOTE_READ | Access::REMOTE_WRITE, Access::REMOTE_READ_WRITE);
    }

    #[test]
    fn reject_codes_roundtrip() {
        for code in 0..=255u8 {
            if let Some(reason) = RejectReason::from_code(code) {
                assert_eq!(reason.code(), code);
            }
        }
        assert_eq!(RejectReason::from_code(0), None);
        assert_eq!(RejectReason::from_code(3), Some(RejectReason::OutOfBounds));
    }

    #[test]
    fn host_region_bounds_and_alignment() {
        let r = HostRegion::zeroed(10_000).unwrap();
        assert_eq!(r.as_ptr() as usize % HOST_REGION_ALIGN, 0);
        assert!(HostRegion::zeroed(0).is_err());
        // SAFETY: no transport has this region.
        unsafe {
            r.write_at(9_990, &[7; 10]).unwrap();
            assert!(r.write_at(9_991, &[7; 10]).is_err());
            assert!(r.write_at(usize::MAX, &[7; 2]).is_err());
            let mut buf = [0u8; 12];
            r.read_at(9_988, &mut buf).unwrap();
            assert_eq!(buf, [0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
            assert!(r.read_at(9_989, &mut buf).is_err());
        }
    }

    #[test]
    fn error_kinds() {
        assert_eq!(TransportError::UnknownRegion(RegionId(1)).kind(), ErrorKind::NotFound);
        assert_eq!(TransportError::Broken.kind(), ErrorKind::Unavailable);
        let e = TransportError::Rejected {
            reason: RejectReason::OutOfBounds,
            message: String::new(),
        };
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.reject_reason(), Some(RejectReason::OutOfBounds));
        assert_eq!(
            TransportError::Deregistered(RegionId(2)).reject_reason(),
            Some(RejectReason::Deregistered)
        );
        assert_eq!(TransportError::Broken.reject_reason(), None);
    }

    #[test]
    fn instance_ids_differ() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
