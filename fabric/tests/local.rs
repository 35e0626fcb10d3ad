//! The zero-copy local path against a real node: put/get through the shared
//! arena, interplay with gRPC and with lower tiers, and bad clients (never
//! commits, commits a slot it does not own, lies about its bytes, sends
//! garbage, disconnects mid-request) — each leaves committed blocks intact
//! and the arena space accounted for.

mod common;

use bytes::Bytes;
use common::{payload, settings, start};
use kvfabric::ErrorKind;
use kvfabric::client::{Durability, LocalClient, LocalPut, Tier};
use kvfabric::proto::v1;
use kvfabric_tiers::Tier as _;
use prost::Message;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_put_and_get_roundtrip_and_mix_with_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let (node, grpc) = start(settings(dir.path(), 64 << 20, 64 << 20)).await;
    for (checksums, write_guard) in [(false, false), (true, false), (false, true), (true, true)] {
        roundtrip(&node, &grpc, checksums, write_guard).await;
    }
    node.shutdown().await;
}

async fn roundtrip(
    node: &kvfabric::server::NodeHandle,
    grpc: &kvfabric::client::Client,
    checksums: bool,
    write_guard: bool,
) {
    let ns = format!("ns-{checksums}-{write_guard}");
    let ns = ns.as_str();
    let opts = kvfabric::local::LocalOptions {
        checksums,
        write_guard,
        ..Default::default()
    };
    let local = LocalClient::connect_with(node.local_socket.as_ref().unwrap(), opts)
        .await
        .unwrap();
    assert_eq!(local.welcome().arena_bytes, 64 << 20);
    let sizes = [1usize, 4095, 4096, 100_000, 1 << 20, 3 << 20];
    let values: Vec<Bytes> = sizes.iter().enumerate().map(|(i, &n)| payload(i as u64, n)).collect();
    let keys: Vec<Vec<u8>> = (0..sizes.len() as u64).map(key).collect();
    let puts: Vec<LocalPut<'_>> = keys.iter().zip(&values).map(|(k, v)| LocalPut::new(k, v)).collect();
    let tiers = local.put_many(ns, &puts, Durability::Memory).await.unwrap();
    assert!(tiers.iter().all(|t| *t == Tier::Host), "{tiers:?}");

    // Read back into caller buffers.
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let krefs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let got = local.get_many_into(ns, &krefs, &mut views).await.unwrap();
    assert_eq!(got, sizes.iter().map(|&n| Some(n)).collect::<Vec<_>>());
    for (b, v) in bufs.iter().zip(&values) {
        assert_eq!(&b[..], &v[..]);
    }
    // gRPC sees what the local path stored, and the other way round.
    let o = grpc.get(ns, keys[4].clone()).await.unwrap().unwrap();
    assert_eq!(o.value, values[4]);
    grpc.put(ns, key(100), payload(100, 5000), Durability::Memory)
        .await
        .unwrap();
    let r = local.get_many(ns, &[&key(100), &key(101)]).await.unwrap();
    assert_eq!(r[0].as_deref(), Some(&payload(100, 5000)[..]));
    assert_eq!(r[1], None, "missing keys are None");
    // A buffer too small is an error, not a truncated copy.
    let mut small = [0u8; 10];
    let e = local
        .get_many_into(ns, &[&keys[3]], &mut [&mut small[..]])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // The gRPC client checks the checksum the node reports against the
    // bytes; computed lazily or given, it matches.
    assert_eq!(o.checksum, xxhash_rust::xxh3::xxh3_64(&values[4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_get_brings_blocks_up_from_disk_and_durable_put_reaches_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20, 64 << 20);
    s.tiering.background = false;
    let (node, _grpc) = start(s).await;
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap()).await.unwrap();
    let vals: Vec<Bytes> = (0..8).map(|i| payload(i, 256 << 10)).collect();
    let keys: Vec<Vec<u8>> = (0..8).map(key).collect();
    for (k, v) in keys.iter().zip(&vals) {
        local
            .put_many("ns", &[LocalPut::new(k, v)], Durability::Memory)
            .await
            .unwrap();
    }
    // The first ones were demoted to disk to make room; reading them works.
    assert_eq!(
        node.stack
            .exists_prefix(&[kvfabric_tiers::ObjectKey::new("ns", key(0))])[0]
            .tier,
        kvfabric_tiers::TierKind::Disk
    );
    let krefs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let got = local.get_many("ns", &krefs).await.unwrap();
    for (g, v) in got.iter().zip(&vals) {
        assert_eq!(g.as_deref(), Some(&v[..]));
    }
    // Disk durability is acknowledged by the disk tier.
    let v = payload(50, 70_000);
    let t = local
        .put_many("ns", &[LocalPut::new(&key(50), &v)], Durability::Disk)
        .await
        .unwrap();
    assert_eq!(t, vec![Tier::Disk]);
    node.stack.check_consistency().unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_never_committed_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.reservation_ttl_ms = 100;
    s.local.quarantine_ms = 2_000;
    let (node, _grpc) = start(s).await;
    let host = || node.stack.host_tier().unwrap().used();
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap()).await.unwrap();
    let r = local.reserve(&[1 << 20, 1 << 20]).await.unwrap();
    assert_eq!(host(), 2 << 20, "reserved space is held");
    // Expired: the client refuses to write into it (the node may have given
    // the space away)...
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut r = r.into_iter();
    let first = r.next().unwrap();
    let e = local.write(&first, &payload(1, 1 << 20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("TTL"), "{e}");
    // ... and the node refuses the commit with a clear status...
    let res = local
        .commit("ns", vec![(first, Bytes::from(key(1)), None, None)], Durability::Memory)
        .await
        .unwrap();
    let e = res.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(!node.stack.contains(&kvfabric_tiers::ObjectKey::new("ns", key(1))));
    // ... and once the client is gone, the untouched reservation's space
    // comes back too (after the quarantine, since this process lives on).
    drop(r);
    drop(local);
    wait_until("reserved space to return", || host() == 0).await;
    node.shutdown().await;
}

/// `local.max-reserved-bytes` counts what slots take, a page each even when
/// empty, so empty slots cannot pile up past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_slots_count_against_the_reservation_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.max_reserved_bytes = kvfabric::server::ByteSize(3 * 4096);
    let (node, _grpc) = start(s).await;
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap()).await.unwrap();
    let e = local.reserve(&[0; 4]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Capacity, "{e}");
    let held = local.reserve(&[0; 3]).await.unwrap();
    assert_eq!(node.stack.host_tier().unwrap().used(), 3 * 4096);
    local.abort(held).await.unwrap();
    node.shutdown().await;
}

/// A hand-rolled client speaking the wire protocol directly (length-prefixed
/// protobuf frames), for sending what the library never would.
struct Raw(tokio::net::UnixStream);

impl Raw {
    async fn connect(sock: &std::path::Path) -> Raw {
        let mut r = Raw(tokio::net::UnixStream::connect(sock).await.unwrap());
        r.send(&v1::LocalHello {
            version: 1,
            tenant: String::new(),
            token: String::new(),
        })
        .await;
        // The welcome's fd rides as ancillary data; a plain read drops it.
        let _welcome: v1::LocalWelcome = r.recv().await;
        r
    }
    async fn send(&mut self, m: &impl Message) {
        let body = m.encode_to_vec();
        self.0.write_all(&(body.len() as u32).to_le_bytes()).await.unwrap();
        self.0.write_all(&body).await.unwrap();
    }
    async fn recv<M: Message + Default>(&mut self) -> M {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.0.read_exact(&mut body).await.unwrap();
        M::decode(&body[..]).unwrap()
    }
}

/// A client that sends requests but never reads the responses cannot keep
/// its session (and what it pins) alive: once a response waits unread for a
/// lease TTL, the node hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.lease_ttl_ms = 300;
    let (node, _grpc) = start(s).await;
    let sock = node.local_socket.clone().unwrap();
    let good = LocalClient::connect(&sock).await.unwrap();
    let keys: Vec<Vec<u8>> = (0..64).map(key).collect();
    let values: Vec<Bytes> = (0..64).map(|i| payload(i, 4096)).collect();
    let puts: Vec<LocalPut<'_>> = keys.iter().zip(&values).map(|(k, v)| LocalPut::new(k, v)).collect();
    good.put_many("ns", &puts, Durability::Memory).await.unwrap();

    let raw = Raw::connect(&sock).await;
    let (mut rd, mut wr) = raw.0.into_split();
    // Acquires of 64 keys each: their answers fill the socket long before
    // the requests run out. Sending stops when the node hangs up.
    let acquire = v1::LocalRequest {
        id: 1,
        op: Some(v1::local_request::Op::Acquire(v1::LocalAcquire {
            namespace: "ns".into(),
            keys: keys.iter().map(|k| Bytes::from(k.clone())).collect(),
        })),
    };
    let body = acquire.encode_to_vec();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let sender = tokio::spawn(async move {
        for _ in 0..20_000 {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
        // Keep the connection open, as a stuck client would.
        std::future::pending::<()>().await;
        drop(wr);
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Whatever was answered, the stream ends: the node closed the session.
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        let mut sink = Vec::new();
        rd.read_to_end(&mut sink).await.map(|_| sink.len())
    })
    .await;
    assert!(
        drained.is_ok(),
        "the node kept the session of a client that stopped reading"
    );
    sender.abort();
    // Other clients were served all along, and still are.
    let got = good.get_many("ns", &[&keys[0]]).await.unwrap();
    assert_eq!(got[0].as_deref(), Some(&values[0][..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_a_slot_another_client_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _grpc) = start(settings(dir.path(), 8 << 20, 0)).await;
    let sock = node.local_socket.clone().unwrap();
    let a = LocalClient::connect(&sock).await.unwrap();
    let stored = payload(9, 20_000);
    a.put_many("ns", &[LocalPut::new(&key(9), &stored)], Durability::Memory)
        .await
        .unwrap();
    let ra = a.reserve(&[10_000]).await.unwrap().pop().unwrap();
    // Another client (connection) cannot write into it, even through the library.
    let other = LocalClient::connect(&sock).await.unwrap();
    let e = other.write(&ra, &payload(2, 10_000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let sum = a.write(&ra, &payload(1, 10_000)).unwrap();
    // Another connection names a's reservation id in its commit.
    let mut b = Raw::connect(&sock).await;
    let commit = v1::LocalRequest {
        id: 7,
        op: Some(v1::local_request::Op::Commit(v1::LocalCommit {
            namespace: "ns".into(),
            durability: 0,
            items: vec![v1::LocalCommitItem {
                reservation: ra.id(),
                key: Bytes::from(key(9)),
                checksum: sum.unwrap_or(0),
                layout: None,
                has_checksum: sum.is_some(),
            }],
        })),
    };
    b.send(&commit).await;
    let resp: v1::LocalResponse = b.recv().await;
    assert_eq!(resp.id, 7);
    let Some(v1::local_response::Result::Committed(c)) = resp.result else {
        panic!("{resp:?}")
    };
    let err = c.results[0].error.as_ref().expect("refused");
    assert_eq!(err.code, tonic::Code::NotFound as i32, "{err:?}");
    // a's reservation is untouched and still commits; the earlier block is intact.
    let t = a
        .commit("ns", vec![(ra, Bytes::from(key(1)), sum, None)], Durability::Memory)
        .await
        .unwrap();
    assert!(t[0].is_ok());
    let got = a.get_many("ns", &[&key(9), &key(1)]).await.unwrap();
    assert_eq!(got[0].as_deref(), Some(&stored[..]));
    assert_eq!(got[1].as_deref(), Some(&payload(1, 10_000)[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_match_their_checksum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _grpc) = start(settings(dir.path(), 8 << 20, 0)).await;
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap())
        .await
        .unwrap()
        .with_checksums(true);
    let r = local.reserve(&[8192]).await.unwrap().pop().unwrap();
    let sum = local.write(&r, &payload(3, 8192)).unwrap().expect("checksums on");
    let res = local
        .commit(
            "ns",
            vec![(r, Bytes::from(key(3)), Some(sum ^ 1), None)],
            Durability::Memory,
        )
        .await
        .unwrap();
    let e = res.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataCorruption, "{e}");
    assert!(!node.stack.contains(&kvfabric_tiers::ObjectKey::new("ns", key(3))));
    assert_eq!(node.stack.host_tier().unwrap().used(), 0, "the refused slot went back");
    node.shutdown().await;
}

/// A layout string longer than a stored header holds (256 bytes) is refused
/// on the local path as on gRPC, and nothing of it is stored; one of exactly
/// 256 bytes is stored durably and reads back with its layout. (The local
/// path used to store and acknowledge a 300-byte model, whose durable copy
/// could then not be decoded again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_strings_over_256_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _grpc) = start(settings(dir.path(), 8 << 20, 8 << 20)).await;
    let local = LocalClient::connect(node.local_socket.as_ref().unwrap()).await.unwrap();
    let layout = |model: usize, dtype: usize| v1::Layout {
        model: "m".repeat(model),
        dtype: "d".repeat(dtype),
        num_layers: 2,
        ..Default::default()
    };
    let rs = local.reserve(&[8192, 8192, 8192]).await.unwrap();
    let mut items = Vec::new();
    for (i, (r, l)) in rs
        .into_iter()
        .zip([layout(300, 4), layout(1, 257), layout(256, 256)])
        .enumerate()
    {
        let sum = local.write(&r, &payload(i as u64, 8192)).unwrap();
        items.push((r, Bytes::from(key(i as u64)), sum, Some(l)));
    }
    let res = local.commit("ns", items, Durability::Disk).await.unwrap();
    for e in [&res[0], &res[1]] {
        let e = e.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("256 bytes"), "{e}");
    }
    assert_eq!(*res[2].as_ref().unwrap(), Tier::Disk);
    for i in 0..2 {
        assert!(!node.stack.contains(&kvfabric_tiers::ObjectKey::new("ns", key(i))));
    }
    assert_eq!(
        node.stack.host_tier().unwrap().used(),
        8192,
        "the refused slots went back"
    );
    let got = local.get_many_with_layout("ns", &[&key(2)]).await.unwrap();
    let (bytes, l) = got[0].clone().expect("stored");
    assert_eq!(bytes, payload(2, 8192));
    assert_eq!(l, layout(256, 256));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_disconnects_mid_request_harm_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.quarantine_ms = 50;
    let (node, _grpc) = start(s).await;
    let sock = node.local_socket.clone().unwrap();
    let good = LocalClient::connect(&sock).await.unwrap();
    let v = payload(5, 100_000);
    good.put_many("ns", &[LocalPut::new(&key(5), &v)], Durability::Memory)
        .await
        .unwrap();
    // Garbage instead of a hello.
    let mut raw = tokio::net::UnixStream::connect(&sock).await.unwrap();
    raw.write_all(b"\xff\xff\xff\xffnot a frame").await.unwrap();
    drop(raw);
    // After a valid handshake and a reservation: an oversized length
    // prefix, then a frame cut off mid-body, then a plain disconnect.
    for tail in [&b"\xff\xff\xff\x7f"[..], &b"\x40\x00\x00\x00\x08\x01"[..], &b""[..]] {
        let mut c = Raw::connect(&sock).await;
        c.send(&v1::LocalRequest {
            id: 1,
            op: Some(v1::local_request::Op::Reserve(v1::LocalReserve {
                lengths: vec![1 << 20],
            })),
        })
        .await;
        let r: v1::LocalResponse = c.recv().await;
        assert!(
            matches!(r.result, Some(v1::local_response::Result::Reserved(_))),
            "{r:?}"
        );
        c.0.write_all(tail).await.unwrap();
        drop(c);
    }
    // Wrong protocol version and bad tenant are refused at the handshake.
    let e = LocalClient::connect_as(&sock, "bad tenant!").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // The node still serves, the stored block is intact, and the abandoned
    // reservations come back.
    let got = good.get_many("ns", &[&key(5)]).await.unwrap();
    assert_eq!(got[0].as_deref(), Some(&v[..]));
    let host = node.stack.host_tier().unwrap();
    wait_until("abandoned reservations to return", || host.used() == 102_400).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_the_local_path() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _grpc) = start(settings(dir.path(), 8 << 20, 0)).await;
    let sock = node.local_socket.clone().unwrap();
    let alice = LocalClient::connect_as(&sock, "alice").await.unwrap();
    let bob = LocalClient::connect_as(&sock, "bob").await.unwrap();
    let v = payload(1, 1000);
    alice
        .put_many("alice-ns", &[LocalPut::new(&key(1), &v)], Durability::Memory)
        .await
        .unwrap();
    let e = bob
        .put_many(
            "alice-ns",
            &[LocalPut::new(&key(1), &payload(2, 1000))],
            Durability::Memory,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = bob.get_many("alice-ns", &[&key(1)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert_eq!(
        alice.get_many("alice-ns", &[&key(1)]).await.unwrap()[0].as_deref(),
        Some(&v[..])
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expired_before_release_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.lease_ttl_ms = 50;
    let (node, _grpc) = start(s).await;
    let sock = node.local_socket.clone().unwrap();
    let good = LocalClient::connect(&sock).await.unwrap();
    good.put_many("ns", &[LocalPut::new(&key(1), &payload(1, 4096))], Durability::Memory)
        .await
        .unwrap();
    let mut raw = Raw::connect(&sock).await;
    raw.send(&v1::LocalRequest {
        id: 1,
        op: Some(v1::local_request::Op::Acquire(v1::LocalAcquire {
            namespace: "ns".into(),
            keys: vec![Bytes::from(key(1))],
        })),
    })
    .await;
    let r: v1::LocalResponse = raw.recv().await;
    let Some(v1::local_response::Result::Acquired(a)) = r.result else {
        panic!("{r:?}")
    };
    assert!(a.leases[0].found);
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.send(&v1::LocalRequest {
        id: 2,
        op: Some(v1::local_request::Op::Release(v1::LocalRelease {
            leases: vec![a.leases[0].lease, 999],
        })),
    })
    .await;
    let r: v1::LocalResponse = raw.recv().await;
    let Some(v1::local_response::Result::Released(rel)) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(
        rel.held,
        vec![false, false],
        "expired and unknown leases are reported as not held"
    );
    node.shutdown().await;
}

const CHILD_SOCKET: &str = "KVFABRIC_TEST_LOCAL_SOCKET";

/// Run by `crashed_client_space_returns_when_the_process_dies` in a child
/// process: reserves arena space, says so, then waits to be killed.
#[tokio::test]
#[ignore = "run in a child process by crashed_client_space_returns_when_the_process_dies"]
async fn crashing_child() {
    let Ok(sock) = std::env::var(CHILD_SOCKET) else { return };
    let c = LocalClient::connect(&sock).await.unwrap();
    let _held = c.reserve(&[2 << 20]).await.unwrap();
    println!("RESERVED");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_client_space_returns_when_the_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    // Long enough that only the process-exit watch can explain a quick return.
    s.local.quarantine_ms = 600_000;
    s.local.reservation_ttl_ms = 600_000;
    let (node, _grpc) = start(s).await;
    let sock = node.local_socket.clone().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "crashing_child", "--nocapture"])
        .env(CHILD_SOCKET, &sock)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        use tokio::io::AsyncBufReadExt;
        assert!(
            out.read_line(&mut line).await.unwrap() > 0,
            "child exited before reserving"
        );
        if line.contains("RESERVED") {
            break;
        }
    }
    let host = node.stack.host_tier().unwrap();
    assert_eq!(host.used(), 2 << 20);
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    wait_until("the dead client's space to return", || host.used() == 0).await;
    node.shutdown().await;
}

/// One connection may pin at most `local.max-leased-bytes` of the arena
/// with read leases: past it, the rest of an acquire is `retry`, and
/// `get_many` still reads everything, in rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_pins_at_most_max_leased_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 8 << 20, 0);
    s.local.max_leased_bytes = kvfabric::server::ByteSize(64 << 10);
    let (node, _grpc) = start(s).await;
    let sock = node.local_socket.clone().unwrap();
    let c = LocalClient::connect(&sock).await.unwrap();
    let values: Vec<Vec<u8>> = (0..8u64).map(|i| payload(i, 16 << 10).to_vec()).collect();
    let keys: Vec<Vec<u8>> = (0..8u64).map(key).collect();
    let puts: Vec<LocalPut<'_>> = keys.iter().zip(&values).map(|(k, v)| LocalPut::new(k, v)).collect();
    c.put_many("ns", &puts, Durability::Memory).await.unwrap();
    let mut raw = Raw::connect(&sock).await;
    raw.send(&v1::LocalRequest {
        id: 1,
        op: Some(v1::local_request::Op::Acquire(v1::LocalAcquire {
            namespace: "ns".into(),
            keys: keys.iter().map(|k| Bytes::from(k.clone())).collect(),
        })),
    })
    .await;
    let r: v1::LocalResponse = raw.recv().await;
    let Some(v1::local_response::Result::Acquired(a)) = r.result else {
        panic!("{r:?}")
    };
    let granted = a.leases.iter().filter(|l| l.found).count();
    assert_eq!(granted, 4, "64 KiB of 16 KiB objects: {:?}", a.leases);
    assert!(a.leases[4..].iter().all(|l| l.retry));
    // Nothing more while those are held.
    raw.send(&v1::LocalRequest {
        id: 2,
        op: Some(v1::local_request::Op::Acquire(v1::LocalAcquire {
            namespace: "ns".into(),
            keys: vec![Bytes::from(keys[7].clone())],
        })),
    })
    .await;
    let r: v1::LocalResponse = raw.recv().await;
    let Some(v1::local_response::Result::Acquired(b)) = r.result else {
        panic!("{r:?}")
    };
    assert!(b.leases[0].retry, "{b:?}");
    // The client library reads all eight, in rounds.
    let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
    let got = c.get_many("ns", &refs).await.unwrap();
    for (g, v) in got.iter().zip(&values) {
        assert_eq!(g.as_deref(), Some(&v[..]));
    }
    node.shutdown().await;
}
