//! End-to-end tests of the block service against a real node on loopback:
//! every RPC's happy path, large streamed objects, events, metrics, and many
//! concurrent clients with verified contents.

mod common;

use bytes::Bytes;
use common::{http_get, payload, settings, start};
use kvfabric::client::{Durability, EventKind, PutObject, Tier};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_get_exists_lease_delete_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start(settings(dir.path(), 8 << 20, 32 << 20)).await;
    let objs: Vec<PutObject> = (0..8u64)
        .map(|i| PutObject::new(i.to_be_bytes().to_vec(), payload(i, 100_000 + i as usize)))
        .collect();
    let tiers = c.put_many("ns", objs, Durability::Memory).await.unwrap();
    assert_eq!(tiers, vec![Tier::Host; 8]);
    let keys: Vec<Bytes> = (0..10u64).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    let got = c.get_many("ns", keys.clone()).await.unwrap();
    for (i, g) in got.iter().enumerate() {
        match g {
            Some(o) => assert_eq!(o.value, payload(i as u64, 100_000 + i)),
            None => assert!(i >= 8, "key {i} missing"),
        }
    }
    // Chain of 10 where 0..8 exist.
    assert_eq!(c.exists_prefix("ns", keys.clone()).await.unwrap().len(), 8);
    let mut gap = keys.clone();
    gap.swap(2, 9);
    assert_eq!(c.exists_prefix("ns", gap).await.unwrap().len(), 2);
    assert_eq!(
        c.lease("ns", keys[..3].to_vec(), Duration::from_secs(30))
            .await
            .unwrap(),
        vec![true; 3]
    );
    assert_eq!(c.delete("ns", keys[..2].to_vec()).await.unwrap(), 2);
    assert!(c.get("ns", keys[0].clone()).await.unwrap().is_none());
    assert_eq!(c.clear("ns").await.unwrap(), 6);
    let s = c.stats().await.unwrap();
    assert_eq!(s.objects, 0);
    assert_eq!(s.tiers.len(), 2);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicted_blocks_demote_to_disk_and_promote_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, c) = start(settings(dir.path(), 1 << 20, 16 << 20)).await;
    for i in 0..8u64 {
        c.put(
            "ns",
            i.to_be_bytes().to_vec(),
            payload(i, 256 << 10),
            Durability::Memory,
        )
        .await
        .unwrap();
    }
    let keys: Vec<Bytes> = (0..8u64).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    let tiers = c.exists_prefix("ns", keys.clone()).await.unwrap();
    assert_eq!(tiers.len(), 8, "nothing dropped while the disk tier has room");
    assert_eq!(tiers[0], Tier::Disk);
    assert_eq!(tiers[7], Tier::Host);
    let o = c.get("ns", keys[0].clone()).await.unwrap().unwrap();
    assert_eq!((o.value, o.tier), (payload(0, 256 << 10), Tier::Disk));
    // Promotion runs in the background, after the get has returned.
    let mut promoted = false;
    for _ in 0..500 {
        if c.exists_prefix("ns", keys[..1].to_vec()).await.unwrap() == vec![Tier::Host] {
            promoted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(promoted, "promoted on hit");
    let s = c.stats().await.unwrap();
    assert!(s.tiers[0].demotions >= 4 && s.tiers[0].promotions >= 1, "{s:?}");
    node.stop_background().await;
    node.stack.check_consistency().unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gib_object_streams_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1100 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(1 << 30);
    let (node, c) = start(s).await;
    let big = payload(42, 1 << 30);
    c.put("big", &b"one-gib"[..], big.clone(), Durability::Memory)
        .await
        .unwrap();
    let back = c.get("big", &b"one-gib"[..]).await.unwrap().unwrap();
    assert!(back.value == big, "1 GiB object differs after the round trip");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribe_sees_stored_and_removed_events() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start(settings(dir.path(), 8 << 20, 0)).await;
    c.put("ev", &b"first"[..], &b"x"[..], Durability::Memory).await.unwrap();
    // The subscriber forwards every (kind, key, tier) it sees.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c2 = c.clone();
    tokio::spawn(async move {
        let mut sub = c2.subscribe(Some("ev")).await.expect("subscribe");
        while let Ok(Some(e)) = sub.message().await {
            for k in &e.keys {
                if tx.send((e.kind(), k.clone(), e.tier())).is_err() {
                    return;
                }
            }
        }
    });
    // Wait until the subscription is live: probe puts until one is seen.
    let probe = Bytes::from_static(b"probe");
    for attempt in 0.. {
        assert!(attempt < 100, "subscription never delivered an event");
        c.put("ev", probe.clone(), &b"p"[..], Durability::Memory).await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            break;
        }
    }
    c.put("ev", &b"k1"[..], &b"v"[..], Durability::Memory).await.unwrap();
    c.delete("ev", vec![Bytes::from_static(b"k1")]).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("event in time")
            .unwrap();
        if e.1 != probe {
            seen.push(e);
        }
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Stored, Bytes::from_static(b"k1"), Tier::Host),
            (EventKind::Removed, Bytes::from_static(b"k1"), Tier::Host)
        ]
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_subscription_starts_with_what_is_held_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    // Small host tier over a disk tier: some objects sit on disk.
    let (node, c) = start(settings(dir.path(), 64 << 10, 8 << 20)).await;
    let value = vec![5u8; 16 << 10];
    let keys: Vec<Bytes> = (0..300u32).map(|i| Bytes::from(format!("k{i}"))).collect();
    let objs = keys
        .iter()
        .map(|k| kvfabric::client::PutObject::new(k.clone(), value.clone()))
        .collect();
    c.put_many("snap", objs, Durability::Memory).await.unwrap();
    c.put("other", &b"elsewhere"[..], &b"x"[..], Durability::Memory)
        .await
        .unwrap();
    let mut sub = c.subscribe_from_snapshot(Some("snap")).await.unwrap();
    let mut held: std::collections::HashMap<Bytes, Vec<Tier>> = Default::default();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.message())
            .await
            .expect("snapshot in time")
            .unwrap()
            .expect("stream open");
        if e.kind() == EventKind::SnapshotDone {
            break;
        }
        assert_eq!(e.kind(), EventKind::Stored, "a snapshot is stored events");
        assert_eq!(e.namespace, "snap", "only the namespace asked for");
        assert!(e.keys.len() <= 256);
        let tier = e.tier();
        for k in e.keys {
            held.entry(k).or_default().push(tier);
        }
    }
    assert_eq!(held.len(), 300, "every object is in the snapshot");
    // It agrees with ExistsPrefix key by key (fastest tier first).
    for k in &keys {
        let fastest = c.exists_prefix("snap", vec![k.clone()]).await.unwrap();
        let tiers = &held[k];
        assert!(
            tiers.contains(&fastest[0]),
            "{k:?}: snapshot {tiers:?}, exists {fastest:?}"
        );
    }
    assert!(held.values().flatten().any(|t| *t == Tier::Disk), "some were on disk");
    // Then live events follow.
    c.delete("snap", vec![keys[0].clone()]).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .expect("live event in time")
        .unwrap()
        .unwrap();
    assert_eq!(e.kind(), EventKind::Removed);
    assert_eq!(e.keys[0], keys[0]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_endpoint_reports_tiers_and_rpcs() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c) = start(settings(dir.path(), 8 << 20, 8 << 20)).await;
    c.put("m", &b"k"[..], &b"v"[..], Durability::Disk).await.unwrap();
    c.get("m", &b"k"[..]).await.unwrap().unwrap();
    c.get("m", &b"nope"[..]).await.unwrap();
    let body = http_get(node.metrics_addr, "/metrics").await;
    for needle in [
        "kvfabric_tier_events_total{event=\"hits\",tier=\"host\"} 1",
        "kvfabric_tier_events_total{event=\"bytes_in\",tier=\"disk\"} 1",
        "kvfabric_tier_state{tier=\"disk\",what=\"objects\"} 1",
        "kvfabric_rpc_duration_seconds_count{method=\"get\"} 2",
        "kvfabric_tier_events_total{event=\"checksum_failures\",tier=\"disk\"} 0",
    ] {
        assert!(body.contains(needle), "metrics lack {needle}:\n{body}");
    }
    assert_eq!(http_get(node.metrics_addr, "/health").await.trim(), "ok");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_clients_mixed_operations() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, c0) = start(settings(dir.path(), 4 << 20, 64 << 20)).await;
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let c = if w % 2 == 0 {
            c0.clone()
        } else {
            kvfabric::client::Client::connect(node.endpoint()).await.unwrap()
        };
        tasks.push(tokio::spawn(async move {
            let ns = format!("t{}", w % 4);
            for i in 0..30u64 {
                // Keys shared between workers of a namespace; content is a
                // function of the key, so any read can be verified.
                let id = (w * 13 + i) % 20;
                let key = id.to_be_bytes().to_vec();
                let len = 10_000 + (id as usize * 7919) % 200_000;
                match i % 5 {
                    0 | 1 => {
                        let d = if i % 10 == 0 {
                            Durability::Disk
                        } else {
                            Durability::Memory
                        };
                        c.put(&ns, key, payload(id, len), d).await.unwrap();
                    }
                    2 | 3 => {
                        match c.get(&ns, key).await {
                            Ok(Some(o)) => assert_eq!(o.value, payload(id, len), "worker {w} read wrong bytes"),
                            Ok(None) => {}
                            // Only possible before the namespace's first put.
                            Err(e) => assert_eq!(e.kind(), kvfabric::ErrorKind::NotFound, "{e}"),
                        }
                    }
                    _ => {
                        if let Err(e) = c.delete(&ns, vec![Bytes::from(key)]).await {
                            assert_eq!(e.kind(), kvfabric::ErrorKind::NotFound, "{e}");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    node.stop_background().await;
    node.stack.check_consistency().unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inflight_put_budget_applies_backpressure_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 64 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(1 << 20);
    s.limits.max_inflight_put_bytes = kvfabric::server::ByteSize(2 << 20);
    let (node, c) = start(s).await;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let objs = (0..3u64)
                .map(|j| PutObject::new(vec![i as u8, j as u8], payload(i * 10 + j, 1 << 20)))
                .collect();
            c.put_many("bp", objs, Durability::Memory).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..12u64 {
        for j in 0..3u64 {
            let o = c.get("bp", vec![i as u8, j as u8]).await.unwrap().unwrap();
            assert_eq!(o.value, payload(i * 10 + j, 1 << 20));
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_calls_are_answered_while_bulk_transfers_run() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _c) = start(settings(dir.path(), 256 << 20, 0)).await;
    let opts = kvfabric::client::ClientOptions {
        data_connections: 3,
        ..Default::default()
    };
    let c = kvfabric::client::Client::connect_with(node.endpoint(), opts)
        .await
        .unwrap();
    c.put("ns", vec![1u8], payload(1, 100), Durability::Memory)
        .await
        .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut bulk = Vec::new();
    for w in 0..3u64 {
        let c = c.clone();
        bulk.push(tokio::spawn(async move {
            for i in 0..6u64 {
                let v = payload(w * 100 + i, 8 << 20);
                c.put("ns", vec![2, w as u8, i as u8], v.clone(), Durability::Memory)
                    .await
                    .unwrap();
                assert_eq!(c.get("ns", vec![2, w as u8, i as u8]).await.unwrap().unwrap().value, v);
            }
        }));
    }
    let mut answered_during_bulk = 0;
    for _ in 0..200 {
        let t = c.exists_prefix("ns", vec![Bytes::from(vec![1u8])]).await.unwrap();
        assert_eq!(t, vec![Tier::Host]);
        if !done.load(std::sync::atomic::Ordering::Relaxed) && bulk.iter().any(|b| !b.is_finished()) {
            answered_during_bulk += 1;
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in bulk {
        b.await.unwrap();
    }
    assert!(
        answered_during_bulk > 0,
        "no control call overlapped the bulk transfers"
    );
    let e = kvfabric::client::Client::connect_with(
        node.endpoint(),
        kvfabric::client::ClientOptions {
            data_connections: 0,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), kvfabric::ErrorKind::InvalidArgument);
    node.shutdown().await;
}

/// Puts whose clients give up at every point of the way (the request is
/// dropped mid-stream, mid-store, mid-eviction) leave the node consistent:
/// every copy a tier holds is one the stack's index knows of, so nothing is
/// stranded on disk to come back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_abandoned_at_any_point_leave_no_stray_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start(settings(dir.path(), 4 << 20, 64 << 20)).await;
    let value = payload(7, 1 << 20);
    for i in 0u64..60 {
        let put = client.put(
            "ns",
            Bytes::from(i.to_be_bytes().to_vec()),
            value.clone(),
            Durability::Disk,
        );
        // From cancelled before it starts to (mostly) finished.
        let _ = tokio::time::timeout(Duration::from_micros(200 * (i % 30)), put).await;
    }
    // Let work the node was still doing finish.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match node.stack.check_consistency() {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    node.shutdown().await;
}
