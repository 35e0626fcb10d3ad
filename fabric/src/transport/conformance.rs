//! The one conformance suite every [`Transport`] implementation passes: registration rules,
//! one-sided writes and reads in both directions (checked against the owner's own view of its
//! memory), batches, zero-length ops, bounds / unknown / deregistered / access rejections, misuse
//! caught before anything is sent, concurrent use of one connection, and a 64 MiB transfer.
//!
//! `run_all(a, b)` exercises `a` and `b` as owners and peers of each other. Remote rejections
//! must carry the exact [`RejectReason`] on TCP; RDMA NICs report them all as a remote access
//! error, which is accepted there. Every negative test uses a fresh connection, because an RDMA
//! connection breaks on a remote rejection.

use std::ptr::NonNull;
use std::sync::Arc;

use super::{
    Access, ConnectionExt, HostRegion, ReadOp, RegionDescriptor, RegionHandle, RegionId, RegisteredMemory,
    RejectReason, Transport, TransportError, TransportKind, WriteOp,
};

/// Runs every check with `a` and `b` in both roles.
pub(crate) async fn run_all(a: &dyn Transport, b: &dyn Transport) {
    registration_rules(a, b).await;
    write_then_read(a, b).await;
    write_then_read(b, a).await;
    batches(a, b).await;
    zero_length_ops(a, b).await;
    out_of_bounds(a, b).await;
    unknown_region(a, b).await;
    deregistered_region(a, b).await;
    access_rules(a, b).await;
    misuse_is_caught_locally(a, b).await;
    concurrent_use_of_one_connection(a, b).await;
    large_transfer(a, b).await;
}

/// Deterministic test bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Owned {
    mem: Arc<HostRegion>,
    handle: RegionHandle,
    desc: RegionDescriptor,
}

async fn host(t: &dyn Transport, len: usize, access: Access) -> Owned {
    let mem = Arc::new(HostRegion::zeroed(len).unwrap());
    let handle = t.register(mem.clone(), access).await.unwrap();
    let desc = t.descriptor(&handle).unwrap();
    Owned { mem, handle, desc }
}

/// The owner's own view of its memory.
fn owner_view(mem: &HostRegion, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: called only between operations, when no peer is accessing the region.
    unsafe { mem.read_at(offset, &mut out).unwrap() };
    out
}

/// Checks a rejection: exactly `want` on TCP; `want` or a remote access error on RDMA.
fn expect_rejected(kind: TransportKind, got: Result<(), TransportError>, want: RejectReason) {
    let e = got.expect_err("operation should have been rejected");
    let reason = e.reject_reason();
    let ok = reason == Some(want) || (kind == TransportKind::Rdma && reason == Some(RejectReason::RemoteAccess));
    assert!(ok, "expected a {want} rejection, got {e:?}");
}

/// `desc` with other fields, as a stale or malicious peer might present it.
fn forged(desc: &RegionDescriptor, region: RegionId, addr: u64, len: u64, rkey: u32) -> RegionDescriptor {
    RegionDescriptor::new(desc.kind(), desc.endpoint(), desc.instance(), region, addr, len, rkey).unwrap()
}

/// Memory that claims to be empty.
struct Empty;

// SAFETY: zero bytes at a dangling, well-aligned pointer are trivially valid.
unsafe impl RegisteredMemory for Empty {
    fn as_ptr(&self) -> *mut u8 {
        NonNull::dangling().as_ptr()
    }

    fn len(&self) -> usize {
        0
    }
}

async fn registration_rules(a: &dyn Transport, b: &dyn Transport) {
    let e = a
        .register(Arc::new(Empty), Access::REMOTE_READ_WRITE)
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::InvalidArgument(_)), "{e:?}");

    let owned = host(a, 8192, Access::REMOTE_READ_WRITE).await;
    assert_eq!(owned.handle.len(), 8192);
    assert_eq!(owned.desc.len(), 8192);
    assert_eq!(owned.desc.kind(), a.kind());
    assert_eq!(owned.desc.endpoint(), a.endpoint());
    assert_eq!(RegionDescriptor::decode(&owned.desc.encode()).unwrap(), owned.desc);

    // The same memory cannot be registered twice.
    let e = a.register(owned.mem.clone(), Access::REMOTE_READ).await.unwrap_err();
    assert!(
        matches!(e, TransportError::Overlap { existing, .. } if existing == owned.handle.id()),
        "{e:?}"
    );

    // Another transport's handle means nothing here.
    let other = host(b, 4096, Access::REMOTE_READ).await;
    assert!(a.descriptor(&other.handle).is_err());
    b.deregister(other.handle).await.unwrap();

    // Deregistration releases the transport's hold on the memory, and the range can be
    // registered again.
    a.deregister(owned.handle).await.unwrap();
    assert_eq!(Arc::strong_count(&owned.mem), 1);
    let again = a.register(owned.mem.clone(), Access::REMOTE_READ).await.unwrap();
    a.deregister(again).await.unwrap();
}

async fn write_then_read(owner: &dyn Transport, peer: &dyn Transport) {
    let owned = host(owner, 1 << 20, Access::REMOTE_READ_WRITE).await;
    let conn = peer.connect(owned.desc.endpoint()).await.unwrap();
    assert_eq!(conn.peer(), owned.desc.endpoint());

    let data = pattern(1, 8192);
    let slice = owned.desc.slice(4096, 8192).unwrap();
    conn.write(&slice, &data).await.unwrap();
    let mut back = vec![0u8; 8192];
    conn.read(&slice, &mut back).await.unwrap();
    assert_eq!(back, data);
    // The owner sees the bytes in its memory, and nothing else changed.
    assert_eq!(owner_view(&owned.mem, 4096, 8192), data);
    assert!(owner_view(&owned.mem, 0, 4096).iter().all(|&b| b == 0));
    assert!(owner_view(&owned.mem, 12288, 4096).iter().all(|&b| b == 0));

    // Unaligned, at the very end of the region.
    let last = owned.desc.slice((1 << 20) - 3, 3).unwrap();
    conn.write(&last, &[7, 8, 9]).await.unwrap();
    let mut three = [0u8; 3];
    conn.read(&last, &mut three).await.unwrap();
    assert_eq!(three, [7, 8, 9]);

    // Bytes the owner writes itself are what the peer reads.
    let mine = pattern(2, 100);
    // SAFETY: no peer operation is in flight.
    unsafe { owned.mem.write_at(500_000, &mine).unwrap() };
    let mut seen = vec![0u8; 100];
    conn.read(&owned.desc.slice(500_000, 100).unwrap(), &mut seen)
        .await
        .unwrap();
    assert_eq!(seen, mine);

    drop(conn);
    owner.deregister(owned.handle).await.unwrap();
}

async fn batches(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 4 << 20, Access::REMOTE_READ_WRITE).await;
    let conn = b.connect(owned.desc.endpoint()).await.unwrap();

    // 64 writes of assorted sizes at assorted offsets, then read them all back in one batch.
    let mut layout = Vec::new();
    let mut at = 0u64;
    for i in 0..64u64 {
        let len = 1 + (i * 7919) % 20_000;
        at += (i * 131) % 512;
        layout.push((at, len, pattern(100 + i, len as usize)));
        at += len;
    }
    let writes: Vec<WriteOp<'_>> = layout
        .iter()
        .map(|(off, len, data)| WriteOp {
            remote: owned.desc.slice(*off, *len).unwrap(),
            local: data,
        })
        .collect();
    conn.write_many(&writes).await.unwrap();
    let mut bufs: Vec<Vec<u8>> = layout.iter().map(|(_, len, _)| vec![0u8; *len as usize]).collect();
    let mut reads: Vec<ReadOp<'_>> = layout
        .iter()
        .zip(bufs.iter_mut())
        .map(|((off, len, _), buf)| ReadOp {
            remote: owned.desc.slice(*off, *len).unwrap(),
            local: buf,
        })
        .collect();
    conn.read_many(&mut reads).await.unwrap();
    drop(reads);
    for ((off, len, data), buf) in layout.iter().zip(&bufs) {
        assert_eq!(buf, data, "op at {off}");
        assert_eq!(&owner_view(&owned.mem, *off as usize, *len as usize), data);
    }

    // A deep batch of small reads (pipelining, and RDMA send-queue windows).
    let mut small = vec![[0u8; 16]; 2000];
    let mut reads: Vec<ReadOp<'_>> = small
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| ReadOp {
            remote: owned.desc.slice(i as u64 * 16, 16).unwrap(),
            local: buf,
        })
        .collect();
    conn.read_many(&mut reads).await.unwrap();
    drop(reads);
    let flat: Vec<u8> = small.iter().flatten().copied().collect();
    assert_eq!(flat, owner_view(&owned.mem, 0, 32_000));

    // Empty batches are fine.
    conn.write_many(&[]).await.unwrap();
    conn.read_many(&mut []).await.unwrap();

    drop(conn);
    a.deregister(owned.handle).await.unwrap();
}

async fn zero_length_ops(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 4096, Access::REMOTE_READ_WRITE).await;
    let conn = b.connect(owned.desc.endpoint()).await.unwrap();
    conn.write(&owned.desc.slice(0, 0).unwrap(), &[]).await.unwrap();
    conn.write(&owned.desc.slice(4096, 0).unwrap(), &[]).await.unwrap();
    conn.read(&owned.desc.slice(4096, 0).unwrap(), &mut []).await.unwrap();
    let data = [5u8; 10];
    let mut back = [0u8; 10];
    conn.write_many(&[
        WriteOp {
            remote: owned.desc.slice(100, 0).unwrap(),
            local: &[],
        },
        WriteOp {
            remote: owned.desc.slice(100, 10).unwrap(),
            local: &data,
        },
        WriteOp {
            remote: owned.desc.slice(4096, 0).unwrap(),
            local: &[],
        },
    ])
    .await
    .unwrap();
    conn.read_many(&mut [
        ReadOp {
            remote: owned.desc.slice(0, 0).unwrap(),
            local: &mut [],
        },
        ReadOp {
            remote: owned.desc.slice(100, 10).unwrap(),
            local: &mut back,
        },
    ])
    .await
    .unwrap();
    assert_eq!(back, data);
    drop(conn);
    a.deregister(owned.handle).await.unwrap();
}

async fn out_of_bounds(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 4096, Access::REMOTE_READ_WRITE).await;
    let d = owned.desc;
    // Out-of-bounds slices cannot be built from an honest descriptor.
    for (offset, len) in [(4090, 7), (4097, 0), (u64::MAX, 1), (1, u64::MAX)] {
        let e = d.slice(offset, len).unwrap_err();
        assert_eq!(e.reject_reason(), Some(RejectReason::OutOfBounds), "{e:?}");
    }
    // A descriptor that lies about the length is refused by the owner.
    let lying = forged(&d, d.region(), d.addr(), 8192, d.rkey());
    let conn = b.connect(d.endpoint()).await.unwrap();
    let mut buf = [0u8; 16];
    expect_rejected(
        a.kind(),
        conn.read(&lying.slice(4090, 16).unwrap(), &mut buf).await,
        RejectReason::OutOfBounds,
    );
    let conn = b.connect(d.endpoint()).await.unwrap();
    expect_rejected(
        a.kind(),
        conn.write(&lying.slice(4096, 16).unwrap(), &buf).await,
        RejectReason::OutOfBounds,
    );
    // The owner's memory next to the refused write is untouched.
    assert!(owner_view(&owned.mem, 0, 4096).iter().all(|&b| b == 0));
    drop(conn);
    a.deregister(owned.handle).await.unwrap();
}

async fn unknown_region(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 4096, Access::REMOTE_READ_WRITE).await;
    let d = owned.desc;
    let bogus = forged(
        &d,
        RegionId(d.region().0 + 1_000_000),
        d.addr().wrapping_add(1 << 40) & !0xfff,
        4096,
        d.rkey() ^ 0x5a5a_5a5a,
    );
    let conn = b.connect(d.endpoint()).await.unwrap();
    let mut buf = [0u8; 64];
    expect_rejected(
        a.kind(),
        conn.read(&bogus.slice(0, 64).unwrap(), &mut buf).await,
        RejectReason::UnknownRegion,
    );
    let conn = b.connect(d.endpoint()).await.unwrap();
    expect_rejected(
        a.kind(),
        conn.write(&bogus.slice(0, 64).unwrap(), &buf).await,
        RejectReason::UnknownRegion,
    );
    drop(conn);
    a.deregister(owned.handle).await.unwrap();
}

async fn deregistered_region(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 4096, Access::REMOTE_READ_WRITE).await;
    let d = owned.desc;
    let conn = b.connect(d.endpoint()).await.unwrap();
    conn.write(&d.slice(0, 4).unwrap(), &[1, 2, 3, 4]).await.unwrap();
    a.deregister(owned.handle).await.unwrap();
    assert_eq!(Arc::strong_count(&owned.mem), 1, "the transport let go of the memory");
    let mut buf = [0u8; 4];
    expect_rejected(
        a.kind(),
        conn.read(&d.slice(0, 4).unwrap(), &mut buf).await,
        RejectReason::Deregistered,
    );
    let conn = b.connect(d.endpoint()).await.unwrap();
    expect_rejected(
        a.kind(),
        conn.write(&d.slice(0, 4).unwrap(), &buf).await,
        RejectReason::Deregistered,
    );
}

async fn access_rules(a: &dyn Transport, b: &dyn Transport) {
    let mut buf = [0u8; 8];
    let read_only = host(a, 4096, Access::REMOTE_READ).await;
    let write_only = host(a, 4096, Access::REMOTE_WRITE).await;
    let local_only = host(a, 4096, Access::LOCAL_ONLY).await;

    let conn = b.connect(a.endpoint()).await.unwrap();
    conn.read(&read_only.desc.slice(0, 8).unwrap(), &mut buf).await.unwrap();
    conn.write(&write_only.desc.slice(0, 8).unwrap(), &[9; 8])
        .await
        .unwrap();
    assert_eq!(owner_view(&write_only.mem, 0, 8), [9; 8]);
    expect_rejected(
        a.kind(),
        conn.write(&read_only.desc.slice(0, 8).unwrap(), &buf).await,
        RejectReason::AccessDenied,
    );
    let conn = b.connect(a.endpoint()).await.unwrap();
    expect_rejected(
        a.kind(),
        conn.read(&write_only.desc.slice(0, 8).unwrap(), &mut buf).await,
        RejectReason::AccessDenied,
    );
    for op in 0..2 {
        let conn = b.connect(a.endpoint()).await.unwrap();
        let slice = local_only.desc.slice(0, 8).unwrap();
        let got = if op == 0 {
            conn.read(&slice, &mut buf).await
        } else {
            conn.write(&slice, &buf).await
        };
        expect_rejected(a.kind(), got, RejectReason::AccessDenied);
    }
    assert!(owner_view(&read_only.mem, 0, 4096).iter().all(|&b| b == 0));
    for owned in [read_only, write_only, local_only] {
        a.deregister(owned.handle).await.unwrap();
    }
}

async fn misuse_is_caught_locally(a: &dyn Transport, b: &dyn Transport) {
    let at_a = host(a, 4096, Access::REMOTE_READ_WRITE).await;
    let at_b = host(b, 4096, Access::REMOTE_READ_WRITE).await;
    let conn = b.connect(a.endpoint()).await.unwrap();

    // Buffer and slice lengths differ: refused before anything is sent, connection still fine.
    let mut buf = [0u8; 8];
    let e = conn.read(&at_a.desc.slice(0, 4).unwrap(), &mut buf).await.unwrap_err();
    assert!(matches!(e, TransportError::InvalidArgument(_)), "{e:?}");
    let e = conn
        .write_many(&[WriteOp {
            remote: at_a.desc.slice(0, 9).unwrap(),
            local: &buf,
        }])
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::InvalidArgument(_)), "{e:?}");

    // A slice of another transport's region on this connection.
    let e = conn.read(&at_b.desc.slice(0, 8).unwrap(), &mut buf).await.unwrap_err();
    assert!(matches!(e, TransportError::WrongPeer { .. }), "{e:?}");
    assert_eq!(e.reject_reason(), Some(RejectReason::WrongInstance));

    // A slice of the other transport kind.
    let other_kind = match a.kind() {
        TransportKind::Tcp => TransportKind::Rdma,
        TransportKind::Rdma => TransportKind::Tcp,
    };
    let d = at_a.desc;
    let alien = RegionDescriptor::new(
        other_kind,
        d.endpoint(),
        d.instance(),
        d.region(),
        d.addr(),
        d.len(),
        d.rkey(),
    )
    .unwrap();
    let e = conn.read(&alien.slice(0, 8).unwrap(), &mut buf).await.unwrap_err();
    assert!(matches!(e, TransportError::InvalidArgument(_)), "{e:?}");

    // None of that broke the connection.
    conn.write(&at_a.desc.slice(0, 8).unwrap(), &[3; 8]).await.unwrap();
    conn.read(&at_a.desc.slice(0, 8).unwrap(), &mut buf).await.unwrap();
    assert_eq!(buf, [3; 8]);

    drop(conn);
    a.deregister(at_a.handle).await.unwrap();
    b.deregister(at_b.handle).await.unwrap();
}

async fn concurrent_use_of_one_connection(a: &dyn Transport, b: &dyn Transport) {
    let owned = host(a, 1 << 20, Access::REMOTE_READ_WRITE).await;
    let conn = b.connect(a.endpoint()).await.unwrap();
    let chunks: Vec<Vec<u8>> = (0..8).map(|i| pattern(500 + i, 100_000)).collect();
    let writes = chunks.iter().enumerate().map(|(i, data)| {
        let slice = owned.desc.slice(i as u64 * 100_000, 100_000).unwrap();
        let conn = &conn;
        async move { conn.write(&slice, data).await }
    });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let mut backs = vec![vec![0u8; 100_000]; 8];
    let reads = backs.iter_mut().enumerate().map(|(i, buf)| {
        let slice = owned.desc.slice(i as u64 * 100_000, 100_000).unwrap();
        let conn = &conn;
        async move { conn.read(&slice, buf).await }
    });
    for r in futures::future::join_all(reads).await {
        r.unwrap();
    }
    assert_eq!(backs, chunks);
    drop(conn);
    a.deregister(owned.handle).await.unwrap();
}

async fn large_transfer(a: &dyn Transport, b: &dyn Transport) {
    const LEN: usize = 64 << 20;
    let owned = host(b, LEN, Access::REMOTE_READ_WRITE).await;
    let conn = a.connect(b.endpoint()).await.unwrap();
    let data = pattern(64, LEN);
    conn.write(&owned.desc.whole(), &data).await.unwrap();
    assert!(owner_view(&owned.mem, 0, LEN) == data, "owner's 64 MiB differ");
    let mut back = vec![0u8; LEN];
    conn.read(&owned.desc.whole(), &mut back).await.unwrap();
    assert!(back == data, "64 MiB read back differs");
    drop(conn);
    b.deregister(owned.handle).await.unwrap();
}
