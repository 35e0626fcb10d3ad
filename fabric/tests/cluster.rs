//! Cluster membership against a real etcd (Debian's `etcd-server`, started
//! by each test on free loopback ports over a temporary data directory):
//! in-process nodes and the real `kvfabric` binary register under leases, a
//! `Membership` watcher sees them, a graceful shutdown removes a node at
//! once, `kill -9` removes it after the lease TTL, a wrong cluster id and a
//! duplicate node id are refused, and a node keeps serving data while etcd
//! is down and registers again once it is back; the cluster-aware client
//! and forwarding; replicated namespaces surviving `kill -9` (repair) and
//! `kvfabric cluster drain`. Every wait is bounded.

mod common;

use bytes::Bytes;
use kvfabric::client::Durability;
use kvfabric::cluster::{ClusterRecord, MemberMap, MemberState, Membership, cluster_key, list_members};
use kvfabric::server::{Node, Settings};
use kvfabric::testutil::{Etcd, Proc, free_port};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn node_settings(dir: &Path, etcd: &Etcd, cluster: &str, node: &str, ttl_s: u64) -> Settings {
    let mut s = common::settings(dir, 8 << 20, 0);
    s.local.enabled = false;
    s.node_id = node.into();
    s.cluster.etcd = Some(etcd.url());
    s.cluster.id = cluster.into();
    s.cluster.lease_ttl_s = ttl_s;
    s.cluster.refresh_interval_ms = 200;
    s
}

/// `s` with repair passes every `ms` (tests that watch repair work).
fn repairing(mut s: Settings, ms: u64) -> Settings {
    s.cluster.repair_interval_ms = ms;
    s
}

/// `kvfabric cluster SUB --cluster <etcd> --cluster-id ID`, ready for more
/// arguments.
fn cluster_cli(sub: &str, etcd: &Etcd, cluster_id: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfabric"));
    c.args(["cluster", sub, "--cluster", &etcd.url(), "--cluster-id", cluster_id]);
    c
}

fn serving(m: &MemberMap, node: &str) -> bool {
    m.get(node).is_some_and(|m| m.state == MemberState::Serving)
}

async fn watch(etcd: &Etcd, cluster: &str) -> Membership {
    Membership::start(etcd.target(), cluster.into())
        .await
        .expect("membership watcher starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_are_watched_and_leave_on_shutdown() {
    let etcd = Etcd::start().await;
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // A long TTL: a node that disappears within a few seconds was revoked, not expired.
    let (a, ca) = common::start(node_settings(da.path(), &etcd, "c1", "a", 30)).await;
    let (b, _cb) = common::start(node_settings(db.path(), &etcd, "c1", "b", 30)).await;
    let m = watch(&etcd, "c1").await;
    let snap = m
        .wait_for(Duration::from_secs(10), |m| serving(m, "a") && serving(m, "b"))
        .await
        .unwrap_or_else(|last| panic!("both nodes never served: {last:?}"));
    assert_eq!(snap.len(), 2, "{snap:?}");
    for (h, id) in [(&a, "a"), (&b, "b")] {
        let rec = &snap[id];
        assert_eq!(rec.endpoint, h.endpoint());
        assert_eq!(rec.cluster_id, "c1");
        assert_eq!(rec.metrics_endpoint, format!("http://{}/metrics", h.metrics_addr));
        let host = rec.tiers.iter().find(|t| t.tier == "host").expect("host tier listed");
        assert_eq!(host.capacity_bytes, 8 << 20);
        assert!(rec.started_at_ms > 0 && rec.updated_at_ms >= rec.started_at_ms);
    }
    assert_eq!(
        std::fs::read_to_string(da.path().join("cluster-id")).unwrap().trim(),
        "c1"
    );

    // Used bytes are refreshed (a forwards what b owns: count both).
    for i in 0..8u64 {
        ca.put(
            "ns",
            Bytes::from(format!("k{i}")),
            common::payload(i, 64 << 10),
            Durability::Memory,
        )
        .await
        .unwrap();
    }
    m.wait_for(Duration::from_secs(5), |m| {
        let used = |id: &str| m.get(id).map_or(0, |n| n.used_bytes());
        used("a") + used("b") >= 8 * (64 << 10)
    })
    .await
    .unwrap_or_else(|last| panic!("used bytes never refreshed: {last:?}"));

    // A second node with a live node's id is refused, and the first keeps its record.
    let dup = node_settings(dc.path(), &etcd, "c1", "b", 30);
    let err = Node::build(dup).await.unwrap().start().await.unwrap_err().to_string();
    assert!(err.contains("node id \"b\" is already registered"), "{err}");
    assert!(err.contains(&b.endpoint()), "{err}");
    assert_eq!(m.snapshot()["b"].endpoint, b.endpoint());

    // A malformed record under the prefix (someone else's write) is left out,
    // never guessed at; the watcher and the CLI keep working.
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    etc.put("/kvfabric/c1/members/junk", "not json", None).await.unwrap();
    etc.put("/kvfabric/c1/members/zz", "{}", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snap = m.snapshot();
    assert_eq!(snap.keys().collect::<Vec<_>>(), ["a", "b"], "{snap:?}");

    // An identity record naming another cluster is refused.
    let bogus = ClusterRecord {
        id: "zzz".into(),
        created_by: "x".into(),
        created_at_ms: 1,
        version: "0".into(),
    };
    etc.put(cluster_key("c5"), bogus.encode(), None).await.unwrap();
    let dd = tempfile::tempdir().unwrap();
    let err = Node::build(node_settings(dd.path(), &etcd, "c5", "d", 30))
        .await
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds the identity of cluster \"zzz\", expected \"c5\""),
        "{err}"
    );
    assert!(!dd.path().join("cluster-id").exists());

    // `kvfabric cluster status` lists both nodes.
    let out = cluster_cli("status", &etcd, "c1").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("cluster c1: 2 node(s)"), "{text}");
    for (h, id) in [(&a, "a"), (&b, "b")] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}: {text}"));
        assert!(line.contains("serving") && line.contains(&h.endpoint()), "{line}");
        assert!(line.contains("host") && line.contains("8MiB"), "{line}");
    }
    let out = cluster_cli("status", &etcd, "c1").arg("--json").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(|a| a.len()), Some(2), "{v}");

    // Graceful shutdown revokes the lease: gone at once (TTL is 30 s).
    let t = Instant::now();
    a.shutdown().await;
    m.wait_for(Duration::from_secs(3), |m| !m.contains_key("a") && serving(m, "b"))
        .await
        .unwrap_or_else(|last| panic!("a still listed after shutdown: {last:?}"));
    assert!(t.elapsed() < Duration::from_secs(3));

    // Its data directory belongs to c1: starting it for c2 is refused.
    let err = Node::build(node_settings(da.path(), &etcd, "c2", "a", 30))
        .await
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("belongs to cluster \"c1\"") && err.contains("configured for cluster \"c2\""),
        "{err}"
    );
    assert!(list_members(&etcd.target(), "c2").await.unwrap().is_empty());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_binary_expires_after_its_lease_and_wrong_cluster_is_refused() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kvfabric.toml");
    std::fs::write(&config, "[cluster]\nlease-ttl-s = 2\nrefresh-interval-ms = 200\n").unwrap();
    let serve = |cluster_id: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvfabric"));
        c.arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--host-capacity", "8MiB", "--disk-capacity", "0"])
            .args(["--cluster", &etcd.url(), "--cluster-id", cluster_id, "--node-id", "n1"]);
        c
    };
    let mut node = Proc(
        serve("c9")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let m = watch(&etcd, "c9").await;
    m.wait_for(Duration::from_secs(20), |m| serving(m, "n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 never served: {last:?}"));

    // kill -9: nobody revokes the lease; the record goes when the TTL runs out.
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(m.snapshot().contains_key("n1"), "removed before the lease could expire");
    m.wait_for(Duration::from_secs(8), |m| !m.contains_key("n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 still listed 8 s after kill -9: {last:?}"));
    let gone = killed.elapsed();
    assert!(gone <= Duration::from_secs(5), "lease of 2 s took {gone:?}");
    eprintln!("killed node left the member list after {gone:?} (lease TTL 2 s)");

    // The same data directory started for another cluster: refused, non-zero exit.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::from(serve("other")).output(),
    )
    .await
    .expect("a refused node exits within 20 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started for the wrong cluster; stderr: {stderr}");
    assert!(
        stderr.contains("belongs to cluster \"c9\"") && stderr.contains("configured for cluster \"other\""),
        "{stderr}"
    );
    assert!(list_members(&etcd.target(), "other").await.unwrap().is_empty());

    // Started again for its own cluster, then stopped with SIGTERM: the lease
    // is revoked on the way out (gone well before the 30 s TTL).
    std::fs::write(&config, "[cluster]\nlease-ttl-s = 30\n").unwrap();
    let node = Proc(
        serve("c9")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let listed = m
        .wait_for(Duration::from_secs(20), |m| serving(m, "n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 never served again: {last:?}"));
    let endpoint = listed["n1"].endpoint.clone();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) }, 0);
    m.wait_for(Duration::from_secs(5), |m| !m.contains_key("n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 still listed 5 s after SIGTERM (lease TTL 30 s): {last:?}"));
    // It left first and still answers for a moment (peers see it go before
    // its port closes), then exits cleanly.
    let c = kvfabric::client::Client::connect(endpoint)
        .await
        .expect("still listening after leaving");
    c.stats().await.expect("still serving after leaving");
    let status = tokio::task::spawn_blocking(move || {
        let mut node = node;
        node.0.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_through_etcd_outage_and_registers_again() {
    let mut etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (h, client) = common::start(node_settings(dir.path(), &etcd, "c3", "n", 2)).await;
    let m = watch(&etcd, "c3").await;
    m.wait_for(Duration::from_secs(10), |m| serving(m, "n"))
        .await
        .unwrap_or_else(|last| panic!("n never served: {last:?}"));
    let reg = h.registration().expect("cluster mode");

    // The lease disappears behind the node's back: it registers under a new one.
    let first = reg.lease_id();
    assert_ne!(first, 0);
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    etc.lease_revoke(first).await.unwrap();
    let mut leases = reg.lease_changes();
    tokio::time::timeout(Duration::from_secs(5), leases.wait_for(|l| *l != 0 && *l != first))
        .await
        .expect("a new lease within 5 s")
        .unwrap();
    m.wait_for(Duration::from_secs(5), |m| serving(m, "n"))
        .await
        .unwrap_or_else(|last| panic!("n not registered again after losing its lease: {last:?}"));

    // etcd goes away for longer than the lease TTL: data keeps flowing.
    let before = reg.lease_id();
    etcd.kill();
    let outage = Instant::now();
    let mut written = 0u64;
    let mut i = 0u64;
    while outage.elapsed() < Duration::from_secs(3) {
        let key = Bytes::from(format!("outage-{i}"));
        let value = common::payload(i, 32 << 10);
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            client.put("ns", key.clone(), value.clone(), Durability::Memory).await?;
            client.get("ns", key.clone()).await
        })
        .await
        .unwrap_or_else(|_| panic!("request {i} stalled while etcd was down"))
        .unwrap_or_else(|e| panic!("request {i} failed while etcd was down: {e}"));
        assert_eq!(r.expect("just stored").value, value);
        written += value.len() as u64;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(i >= 10, "only {i} requests in 3 s");
    assert_eq!(reg.lease_id(), 0, "the node did not notice etcd was gone");

    // etcd is back (same data, same ports): the node registers again, and its
    // record reflects what was written during the outage.
    etcd.spawn().await;
    let second = tokio::time::timeout(Duration::from_secs(10), leases.wait_for(|l| *l != 0))
        .await
        .expect("registered again within 10 s of etcd's restart")
        .map(|l| *l)
        .unwrap();
    // etcd keeps leases across a restart (renewed when it becomes leader), so
    // the node usually resumes its lease; a new one is as good.
    eprintln!("after etcd's restart the node holds lease {second:x} (before: {before:x})");
    m.wait_for(Duration::from_secs(10), |m| {
        serving(m, "n") && m.get("n").is_some_and(|n| n.used_bytes() >= written)
    })
    .await
    .unwrap_or_else(|last| panic!("watcher never saw n again with {written} bytes used: {last:?}"));

    // etcd loses everything (a new, empty etcd on the same ports): lease,
    // member and identity records are gone; the node recreates them.
    etcd.kill();
    std::fs::remove_dir_all(etcd.data_dir()).unwrap();
    etcd.spawn().await;
    let third = tokio::time::timeout(Duration::from_secs(10), leases.wait_for(|l| *l != 0 && *l != second))
        .await
        .expect("registered under a new lease within 10 s of etcd coming back empty")
        .map(|l| *l)
        .unwrap();
    m.wait_for(Duration::from_secs(10), |m| serving(m, "n"))
        .await
        .unwrap_or_else(|last| panic!("watcher never saw n in the new etcd: {last:?}"));
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let identity = etc.get(cluster_key("c3"), None).await.unwrap();
    assert_eq!(identity.kvs().len(), 1, "identity record not recreated");
    let rec = etc.get(kvfabric::cluster::member_key("c3", "n"), None).await.unwrap();
    assert_eq!(rec.kvs().first().map(|kv| kv.lease()), Some(third));

    h.shutdown().await;
    assert!(list_members(&etcd.target(), "c3").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// The cluster-aware client (`kvfabric::client::ClusterClient`).
// ---------------------------------------------------------------------------

use kvfabric::client::{Client, ClientOptions, ClusterClient, NodeInfo, PutObject, Tier};
use kvfabric::placement::Placement;

/// `n` plain nodes (no etcd), as members `n0`, `n1`, ... of weight 1.
async fn plain_nodes(
    n: usize,
) -> (
    Vec<tempfile::TempDir>,
    Vec<(kvfabric::server::NodeHandle, Client)>,
    Vec<NodeInfo>,
) {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for d in &dirs {
        let mut s = common::settings(d.path(), 64 << 20, 0);
        s.local.enabled = false;
        nodes.push(common::start(s).await);
    }
    let members = nodes
        .iter()
        .enumerate()
        .map(|(i, (h, _))| NodeInfo {
            id: format!("n{i}"),
            endpoint: h.endpoint(),
            weight: 1.0,
        })
        .collect();
    (dirs, nodes, members)
}

fn keys(prefix: &str, n: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("{prefix}-{i}"))).collect()
}

/// Three plain nodes behind a fixed membership: every object lands on the
/// node placement names (and nowhere else), 10k objects spread within 10%,
/// reads come back intact, a chain spread over the nodes is answered in one
/// call, and with replication 2 every read still succeeds after one node is
/// gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_client_places_merges_and_reads_through_a_lost_replica() {
    let (_dirs, mut nodes, members) = plain_nodes(3).await;
    let cc = ClusterClient::fixed(members.clone(), ClientOptions::default());
    let placement = Placement::new(members.iter().map(|m| (m.id.clone(), 1.0))).unwrap();

    // 10k objects, batched.
    let ks = keys("obj", 10_000);
    for chunk in ks.chunks(1000) {
        let objs: Vec<PutObject> = chunk.iter().map(|k| PutObject::new(k.clone(), k.repeat(4))).collect();
        cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    }
    let mut expected = [0usize; 3];
    for k in &ks {
        let owner = placement.owners("ns", k, 1)[0];
        expected[owner[1..].parse::<usize>().unwrap()] += 1;
    }
    let held: Vec<usize> = nodes.iter().map(|(h, _)| h.stack.len()).collect();
    assert_eq!(held, expected, "each node holds exactly what placement assigns it");
    assert_eq!(held.iter().sum::<usize>(), 10_000, "one copy per object");
    let mean = 10_000.0 / 3.0;
    for &n in &held {
        assert!((n as f64 - mean).abs() / mean <= 0.10, "balance within 10%: {held:?}");
    }
    let got = cc.get_many("ns", ks[..2000].to_vec()).await.unwrap();
    for (k, g) in ks.iter().zip(&got) {
        assert_eq!(g.as_ref().expect("stored").value, k.repeat(4));
    }
    assert!(cc.get("ns", "absent").await.unwrap().is_none());

    // A 64-key chain over three nodes, first 40 stored: one call says 40.
    let chain = keys("chain", 64);
    let objs: Vec<PutObject> = chain[..40]
        .iter()
        .map(|k| PutObject::new(k.clone(), vec![1u8; 32]))
        .collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    let owners_used: std::collections::BTreeSet<&str> =
        chain[..40].iter().map(|k| placement.owners("ns", k, 1)[0]).collect();
    assert_eq!(owners_used.len(), 3, "the chain spans every node");
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 40);
    // A hole at 20 (on whichever node owns it) cuts the prefix there.
    assert_eq!(cc.delete("ns", vec![chain[20].clone()]).await.unwrap(), 1);
    let tiers = cc.exists_prefix("ns", chain.clone()).await.unwrap();
    assert_eq!(tiers.len(), 20);
    assert!(tiers.iter().all(|t| *t == kvfabric::client::Tier::Host));

    // Replication 2: two copies of each; reads survive losing a node.
    cc.set_replication("dup", 2).unwrap();
    let dk = keys("dup", 600);
    let objs: Vec<PutObject> = dk.iter().map(|k| PutObject::new(k.clone(), k.repeat(2))).collect();
    cc.put_many("dup", objs, Durability::Memory).await.unwrap();
    let total: usize = nodes.iter().map(|(h, _)| h.stack.len()).sum();
    assert_eq!(total, 10_000 + 39 + 2 * 600, "two copies of each replicated object");
    let (lost, _) = nodes.remove(0);
    lost.shutdown().await;
    let got = cc.get_many("dup", dk.clone()).await.unwrap();
    assert!(
        dk.iter()
            .zip(&got)
            .all(|(k, g)| g.as_ref().is_some_and(|o| o.value == k.repeat(2))),
        "every replicated object is read from its surviving copy"
    );
    let chain2 = keys("dchain", 32);
    let objs: Vec<PutObject> = chain2.iter().map(|k| PutObject::new(k.clone(), vec![2u8; 8])).collect();
    // Writes need every owner: with n0 gone, the objects it owns fail...
    let err = cc.put_many("dup", objs.clone(), Durability::Memory).await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("n0"), "the error names the lost node: {err}");
    // ...but once the membership drops it, they go to the survivors.
    let cc2 = ClusterClient::fixed(members[1..].to_vec(), ClientOptions::default());
    cc2.set_replication("dup", 2).unwrap();
    cc2.put_many("dup", objs, Durability::Memory).await.unwrap();
    assert_eq!(
        cc.exists_prefix("dup", chain2.clone()).await.unwrap().len(),
        32,
        "prefix answered by the next owner"
    );
    // Unreplicated objects owned by the lost node are gone, and a read of
    // them says the node is unavailable rather than "not found".
    let on_lost: Vec<Bytes> = ks
        .iter()
        .filter(|k| placement.owners("ns", k, 1)[0] == "n0")
        .take(3)
        .cloned()
        .collect();
    let err = cc.get_many("ns", on_lost).await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::Unavailable, "{err}");
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// The client fed by the etcd membership watcher: it sees both nodes,
/// spreads objects over them, and after one node leaves (graceful
/// shutdown revokes its lease) sends everything to the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_client_follows_the_etcd_membership() {
    let etcd = Etcd::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ca) = common::start(node_settings(da.path(), &etcd, "cc", "a", 30)).await;
    let (b, cb) = common::start(node_settings(db.path(), &etcd, "cc", "b", 30)).await;
    let m = watch(&etcd, "cc").await;
    let mut nodes = m.serving_nodes();
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.borrow().len() < 2 {
        assert!(Instant::now() < deadline, "never saw both nodes: {:?}", *nodes.borrow());
        let _ = tokio::time::timeout(Duration::from_millis(200), nodes.changed()).await;
    }
    let seen = nodes.borrow().clone();
    assert_eq!(seen.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(seen[0].endpoint, a.endpoint());
    assert_eq!(seen[0].weight, (8 << 20) as f64, "weight = node-local capacity");
    // The nodes forward by their own view: wait until it matches too.
    for h in [&a, &b] {
        wait_view(h, 2).await;
    }
    let cc = ClusterClient::new(nodes.clone(), ClientOptions::default());
    let ks = keys("e", 300);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(3))).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    let (na, nb) = (a.stack.len(), b.stack.len());
    assert_eq!(na + nb, 300);
    assert!(na > 0 && nb > 0, "both nodes hold a share: {na} / {nb}");

    // A namespace with two copies: the client sends each object to both
    // owners itself, and neither passes it on again (before, each owner
    // forwarded it to both, storing every object four times).
    ca.create_namespace("dup", 2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb.describe_namespace("dup").await.map(|n| n.replication).ok() != Some(2) {
        assert!(Instant::now() < deadline, "b never learned dup's replication");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cc.set_replication("dup", 2).unwrap();
    let dk = keys("dup", 100);
    let objs: Vec<PutObject> = dk.iter().map(|k| PutObject::new(k.clone(), k.repeat(2))).collect();
    cc.put_many("dup", objs, Durability::Memory).await.unwrap();
    assert_eq!(
        (a.stack.len(), b.stack.len()),
        (na + 100, nb + 100),
        "a copy on each node"
    );
    let got = cc.get_many("dup", dk.clone()).await.unwrap();
    assert!(
        dk.iter()
            .zip(&got)
            .all(|(k, g)| g.as_ref().is_some_and(|o| o.value == k.repeat(2)))
    );
    assert_eq!(cc.exists_prefix("dup", dk.clone()).await.unwrap().len(), 100);
    assert_eq!(cc.delete("dup", dk[..10].to_vec()).await.unwrap(), 10);
    assert_eq!((a.stack.len(), b.stack.len()), (na + 90, nb + 90));
    for h in [&a, &b] {
        let body = common::http_get(h.metrics_addr, "/metrics").await;
        assert!(
            !body.contains("kvfabric_forwarded_total{"),
            "a node passed a placed request on: {body}"
        );
    }

    b.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.borrow().len() != 1 {
        assert!(Instant::now() < deadline, "b never left: {:?}", *nodes.borrow());
        let _ = tokio::time::timeout(Duration::from_millis(200), nodes.changed()).await;
    }
    wait_view(&a, 1).await;
    let more = keys("after", 50);
    let objs: Vec<PutObject> = more.iter().map(|k| PutObject::new(k.clone(), vec![9u8; 16])).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    assert_eq!(a.stack.len(), na + 90 + 50, "everything goes to the survivor");
    assert!(cc.get_many("ns", more).await.unwrap().iter().all(Option::is_some));
    a.shutdown().await;
}

/// Waits (bounded) until node `h` sees `n` serving members; returns them.
async fn wait_view(h: &kvfabric::server::NodeHandle, n: usize) -> Vec<NodeInfo> {
    let mut view = h.serving_nodes().expect("a cluster node watches the membership");
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.borrow().len() != n {
        assert!(
            Instant::now() < deadline,
            "node {} never saw {n} serving members: {:?}",
            h.endpoint(),
            *view.borrow()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), view.changed()).await;
    }
    view.borrow().clone()
}

/// A plain `Client` pointed at any node of a three-node cluster sees the
/// whole namespace: puts through one node land on their placement owners,
/// reads through another return every object intact (a multi-chunk one
/// too), a chain spread over the nodes is answered through a third, a
/// delete through one node removes objects another holds (and a clear
/// clears every node), tenancy and bad
/// input are answered as on a single node, an owner that does not answer
/// is UNAVAILABLE with its name, and forwarded requests are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_forwards_to_the_owners() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b", "c"]) {
        nodes.push(common::start(node_settings(d.path(), &etcd, "fw", id, 30)).await);
    }
    let mut view = Vec::new();
    for (h, _) in &nodes {
        view = wait_view(h, 3).await;
    }
    let ids: Vec<&str> = view.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let idx = |id: &str| ids.iter().position(|i| *i == id).unwrap();
    let (ca, cb, cc) = (nodes[0].1.clone(), nodes[1].1.clone(), nodes[2].1.clone());

    // 200 objects through a (one of 3 MiB: several chunks each way).
    let ks = keys("fw", 200);
    let value = |i: usize, k: &Bytes| {
        if i == 7 {
            common::payload(7, 3 << 20)
        } else {
            k.repeat(1 + i % 5).into()
        }
    };
    let objs: Vec<PutObject> = ks
        .iter()
        .enumerate()
        .map(|(i, k)| PutObject::new(k.clone(), value(i, k)))
        .collect();
    let tiers = ca.put_many("ns", objs, Durability::Memory).await.unwrap();
    assert_eq!(tiers.len(), 200);
    assert!(tiers.iter().all(|t| *t == kvfabric::client::Tier::Host), "{tiers:?}");
    let mut expected = [0usize; 3];
    for k in &ks {
        expected[idx(placement.owners("ns", k, 1)[0])] += 1;
    }
    let held: Vec<usize> = nodes.iter().map(|(h, _)| h.stack.len()).collect();
    assert_eq!(held, expected, "each object on its placement owner only");
    assert!(expected.iter().all(|&n| n > 0), "every node owns some: {expected:?}");

    // Every object read back through b, intact; a missing key is missing.
    let mut ask = ks.clone();
    ask.push(Bytes::from_static(b"absent"));
    let got = cb.get_many("ns", ask).await.unwrap();
    for (i, (k, g)) in ks.iter().zip(&got).enumerate() {
        assert_eq!(g.as_ref().expect("found through b").value, value(i, k), "object {i}");
    }
    assert!(got[200].is_none());

    // A chain over the nodes, 20 of 30 stored: ExistsPrefix through c says 20.
    let chain = keys("chain", 30);
    let objs: Vec<PutObject> = chain[..20]
        .iter()
        .map(|k| PutObject::new(k.clone(), vec![3u8; 64]))
        .collect();
    ca.put_many("ns", objs, Durability::Memory).await.unwrap();
    let spread: std::collections::BTreeSet<&str> =
        chain[..20].iter().map(|k| placement.owners("ns", k, 1)[0]).collect();
    assert!(spread.len() >= 2, "the chain spans nodes: {spread:?}");
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 20);

    // Delete through a of objects b holds.
    let on_b: Vec<Bytes> = ks
        .iter()
        .filter(|k| placement.owners("ns", k, 1)[0] == "b")
        .take(10)
        .cloned()
        .collect();
    let before = nodes[1].0.stack.len();
    assert_eq!(ca.delete("ns", on_b.clone()).await.unwrap(), 10);
    assert_eq!(nodes[1].0.stack.len(), before - 10, "deleted on their owner");
    assert!(cc.get_many("ns", on_b).await.unwrap().iter().all(Option::is_none));

    // A namespace only some nodes know (they learn it from a put): the
    // others hold none of its keys; a request is NOT_FOUND only when no
    // node it reached knows the namespace.
    let owned_by = |id: &str| {
        keys("solo", 100)
            .into_iter()
            .find(|k| placement.owners("solo", k, 1)[0] == id)
            .unwrap()
    };
    let (kb, kc) = (owned_by("b"), owned_by("c"));
    ca.put("solo", kb.clone(), "only", Durability::Memory).await.unwrap();
    let got = cc.get_many("solo", vec![kb.clone(), kc.clone()]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, "only");
    assert!(got[1].is_none());
    assert_eq!(
        ca.exists_prefix("solo", vec![kb.clone(), kc.clone()])
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(cc.delete("solo", vec![kc.clone(), kb.clone()]).await.unwrap(), 1);
    // The first put claimed "solo" cluster-wide, so c learns it too (from
    // its namespace watch, so not at once): then a delete of a key nobody
    // holds deletes nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cc.describe_namespace("solo").await.is_err() {
        assert!(Instant::now() < deadline, "c never learned the claimed namespace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cb.delete("solo", vec![kc.clone()]).await.unwrap(), 0);
    let err = ca.get_many("nope", vec![kb, kc]).await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::NotFound, "{err}");

    // Tenancy and bad input as on a single node.
    let t1 = ca.clone().with_tenant("t1");
    t1.put_many("t1ns", vec![PutObject::new(ks[0].clone(), "x")], Durability::Memory)
        .await
        .unwrap();
    assert_eq!(
        cb.clone()
            .with_tenant("t1")
            .get("t1ns", ks[0].clone())
            .await
            .unwrap()
            .unwrap()
            .value,
        "x"
    );
    let err = cb
        .clone()
        .with_tenant("t2")
        .get("t1ns", ks[0].clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::PermissionDenied, "{err}");
    // A namespace made by a first put is the tenant's on every node, also
    // on one that holds none of its objects yet: t1's first put into
    // "claimed" lands on a alone, and t2's put into it through c, of a
    // key c owns, is refused (c took the name for t2 before).
    let owned_by = |id: &str| {
        keys("claim", 64)
            .into_iter()
            .find(|k| placement.owners("claimed", k, 1)[0] == id)
            .unwrap()
    };
    t1.put_many("claimed", vec![PutObject::new(owned_by("a"), "1")], Durability::Memory)
        .await
        .unwrap();
    let err = cc
        .clone()
        .with_tenant("t2")
        .put_many("claimed", vec![PutObject::new(owned_by("c"), "2")], Durability::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::PermissionDenied, "{err}");
    cc.clone()
        .with_tenant("t1")
        .put_many("claimed", vec![PutObject::new(owned_by("c"), "3")], Durability::Memory)
        .await
        .unwrap();
    let err = cb
        .raw()
        .get(kvfabric::proto::v1::GetRequest {
            namespace: "ns".into(),
            keys: vec![Bytes::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // An owner that does not answer: UNAVAILABLE, naming it. (A record for
    // a serving node "zz" whose endpoint is a closed port.)
    let mut ghost = list_members(&etcd.target(), "fw").await.unwrap()[0].clone();
    ghost.node_id = "zz".into();
    ghost.endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    etc.put(kvfabric::cluster::member_key("fw", "zz"), ghost.encode(), None)
        .await
        .unwrap();
    let view4 = wait_view(&nodes[0].0, 4).await;
    let p4 = Placement::new(view4.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let lost = keys("lost", 100)
        .into_iter()
        .find(|k| p4.owners("ns", k, 1)[0] == "zz")
        .expect("zz owns some key");
    let err = ca.put("ns", lost.clone(), "v", Durability::Memory).await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("zz"), "the error names the owner: {err}");
    let err = ca.get("ns", lost).await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::Unavailable, "{err}");
    etc.delete(kvfabric::cluster::member_key("fw", "zz"), None)
        .await
        .unwrap();
    // Every node sees zz gone before the namespace-wide clear below.
    for (h, _) in &nodes {
        wait_view(h, 3).await;
    }

    // Clearing a namespace through one node clears it on every node.
    assert_eq!(cc.clear("ns").await.unwrap(), 200 - 10 + 20);
    assert!(ca.get_many("ns", ks.clone()).await.unwrap().iter().all(Option::is_none));

    let body = common::http_get(nodes[0].0.metrics_addr, "/metrics").await;
    assert!(body.contains("kvfabric_forwarded_total{method=\"put\"}"), "{body}");
    let body = common::http_get(nodes[1].0.metrics_addr, "/metrics").await;
    assert!(body.contains("kvfabric_forwarded_total{method=\"get\"}"), "{body}");
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// Many concurrent put streams through one node of a cluster, with an
/// in-flight budget far smaller than their objects together: every stream
/// finishes. (A stream collecting objects for its owners used to wait for
/// more budget while holding what it had collected; eight such streams
/// held it all and waited on each other for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_forwarded_puts_share_a_small_budget_without_deadlock() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b"]) {
        let mut s = node_settings(d.path(), &etcd, "budget", id, 30);
        s.host.capacity = kvfabric::server::ByteSize(64 << 20);
        s.limits.max_object_size = kvfabric::server::ByteSize(1 << 20);
        s.limits.max_inflight_put_bytes = kvfabric::server::ByteSize(1 << 20);
        nodes.push(common::start(s).await);
    }
    for (h, _) in &nodes {
        wait_view(h, 2).await;
    }
    let ca = nodes[0].1.clone();
    let streams = 8;
    let per_stream = 24;
    let puts = (0..streams).map(|s| {
        let ca = ca.clone();
        tokio::spawn(async move {
            let objs: Vec<PutObject> = keys(&format!("budget{s}"), per_stream)
                .into_iter()
                .enumerate()
                .map(|(i, k)| PutObject::new(k, common::payload((s * 100 + i) as u64, 64 << 10)))
                .collect();
            ca.put_many("ns", objs, Durability::Memory).await
        })
    });
    let all = futures::future::join_all(puts);
    let done = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every put stream finishes (no budget deadlock)");
    for r in done {
        assert_eq!(r.unwrap().unwrap().len(), per_stream);
    }
    for s in 0..streams {
        let got = nodes[1]
            .1
            .get_many("ns", keys(&format!("budget{s}"), per_stream))
            .await
            .unwrap();
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g.as_ref().expect("stored").value,
                common::payload((s * 100 + i) as u64, 64 << 10)
            );
        }
    }
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// A cluster whose `limits.max-batch-keys` is above the client library's
/// default (4096): a request of 9000 keys through one node reaches each
/// owner as one batch of ~4500 and succeeds (put, get, exists, delete).
/// (The forwarding client refused any per-node batch over 4096 whatever
/// the node's limit, so such requests failed with INVALID_ARGUMENT.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_batches_follow_the_nodes_batch_limit() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b"]) {
        let mut s = node_settings(d.path(), &etcd, "batch", id, 30);
        s.limits.max_batch_keys = 10_000;
        s.host.capacity = kvfabric::server::ByteSize(64 << 20); // 4 KiB slots
        nodes.push(common::start(s).await);
    }
    let mut view = Vec::new();
    for (h, _) in &nodes {
        view = wait_view(h, 2).await;
    }
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let n = 9000;
    let ks = keys("batch", n);
    let on_a = ks.iter().filter(|k| placement.owners("ns", k, 1)[0] == "a").count();
    assert!(
        on_a > 4096 || n - on_a > 4096,
        "a per-node batch over 4096: {on_a} / {n}"
    );
    // The put as any gRPC client sends it (not limited by this library).
    use kvfabric::proto::v1::{ObjectBegin, PutOpen, PutRequest, put_request::Msg};
    let mut msgs = vec![PutRequest {
        msg: Some(Msg::Open(PutOpen {
            namespace: "ns".into(),
            expected_objects: n as u32,
            ..Default::default()
        })),
    }];
    for k in &ks {
        msgs.push(PutRequest {
            msg: Some(Msg::Begin(ObjectBegin {
                key: k.clone(),
                length: k.len() as u64,
                ..Default::default()
            })),
        });
        msgs.push(PutRequest {
            msg: Some(Msg::Data(k.clone())),
        });
    }
    let ca = nodes[0].1.clone().with_max_batch_keys(10_000);
    let cb = nodes[1].1.clone().with_max_batch_keys(10_000);
    let put = nodes[0].1.raw().put(futures::stream::iter(msgs)).await.unwrap();
    assert_eq!(put.into_inner().results.len(), n);
    let held: Vec<usize> = nodes.iter().map(|(h, _)| h.stack.len()).collect();
    assert_eq!(held, [on_a, n - on_a]);
    let got = cb.get_many("ns", ks.clone()).await.unwrap();
    for (k, g) in ks.iter().zip(&got) {
        assert_eq!(&g.as_ref().expect("found").value, k);
    }
    assert_eq!(cb.delete("ns", ks.clone()).await.unwrap(), n as u64);
    assert!(ca.get_many("ns", ks).await.unwrap().iter().all(Option::is_none));
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// Every node's `Locate` for `ks`: per key, the ids of the nodes holding a
/// copy on a persistent tier (disk or object).
async fn durable_holders(nodes: &[(&str, Client)], ns: &str, ks: &[Bytes]) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); ks.len()];
    for (id, c) in nodes {
        let locs = match c.locate(ns, ks.to_vec()).await {
            Ok(l) => l,
            Err(e) if e.kind() == kvfabric::ErrorKind::NotFound => continue,
            Err(e) => panic!("locate on {id}: {e}"),
        };
        for (o, l) in out.iter_mut().zip(locs) {
            if l.tiers().any(|t| matches!(t, Tier::Disk | Tier::Object)) {
                o.push(id.to_string());
            }
        }
    }
    out
}

/// Polls `durable_holders` until `ok` holds for every key (bounded).
async fn wait_holders(
    nodes: &[(&str, Client)],
    ns: &str,
    ks: &[Bytes],
    what: &str,
    ok: impl Fn(&Bytes, &[String]) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        let h = durable_holders(nodes, ns, ks).await;
        let bad: Vec<_> = ks.iter().zip(&h).filter(|(k, h)| !ok(k, h)).collect();
        if bad.is_empty() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: {} of {} keys still wrong after 60 s, e.g. {:?}",
            bad.len(),
            ks.len(),
            &bad[..bad.len().min(3)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Real `kvfabric serve` processes of one cluster on loopback, each with a
/// fixed port and its own data directory (kept across restarts), a 2 s
/// lease, fast refresh and repair passes, 8 MiB host and 64 MiB disk.
struct RealNodes {
    etcd_url: String,
    cluster: &'static str,
    ids: &'static [&'static str],
    ports: Vec<u16>,
    base: tempfile::TempDir,
}

impl RealNodes {
    /// Starts every node, and a membership watcher that has seen them all
    /// serving.
    async fn serve_all(&self, etcd: &Etcd) -> (Vec<Option<Proc>>, Membership) {
        let procs = (0..self.ids.len()).map(|i| Some(self.serve(i))).collect();
        let m = watch(etcd, self.cluster).await;
        m.wait_for(Duration::from_secs(30), |m| self.ids.iter().all(|id| serving(m, id)))
            .await
            .unwrap_or_else(|last| panic!("nodes never all served: {last:?}"));
        (procs, m)
    }

    fn new(etcd: &Etcd, cluster: &'static str, ids: &'static [&'static str]) -> RealNodes {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(
            base.path().join("kvfabric.toml"),
            "[cluster]\nlease-ttl-s = 2\nrefresh-interval-ms = 200\nrepair-interval-ms = 500\n",
        )
        .unwrap();
        RealNodes {
            etcd_url: etcd.url(),
            cluster,
            ids,
            ports: ids.iter().map(|_| free_port()).collect(),
            base,
        }
    }

    /// Starts node `i` (again).
    fn serve(&self, i: usize) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
            .arg("serve")
            .arg("--config")
            .arg(self.base.path().join("kvfabric.toml"))
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.base.path().join(self.ids[i]))
            .args(["--host-capacity", "8MiB", "--disk-capacity", "64MiB"])
            .args(["--cluster", &self.etcd_url, "--cluster-id", self.cluster])
            .args(["--node-id", self.ids[i]])
            .env(
                "RUST_LOG",
                std::env::var("KVFABRIC_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc(child)
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// A plain client per node, with its id.
    async fn clients(&self) -> Vec<(&'static str, Client)> {
        let mut out = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            out.push((*id, Client::connect(self.endpoint(i)).await.unwrap()));
        }
        out
    }
}

/// Waits until every node answers `DescribeNamespace` with `replication`.
async fn wait_replication(clients: &[(&str, Client)], ns: &str, replication: u32) {
    for (id, c) in clients {
        let t = Instant::now();
        while c.describe_namespace(ns).await.map(|i| i.replication).ok() != Some(replication) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{id} never learned replication {replication}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Three real `kvfabric serve` processes on a real etcd. A namespace
/// created with `kvfabric namespace create --replication 2` is known to
/// every node; 300 objects put with `disk` durability through one node
/// land on exactly their two placement owners, on disk. One owner is
/// killed with `kill -9`: every object reads back byte-identical at once
/// (the next replica answers), and once its lease expires the survivors
/// restore two durable copies of everything (repair). The killed node
/// restarts on its intact data directory and is reconciled: in the end
/// every object has exactly its two placement owners' copies, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_durable_object_and_replication_is_restored() {
    let etcd = Etcd::start().await;
    let nodes = RealNodes::new(&etcd, "rep", &["a", "b", "c"]);
    let (mut procs, m) = nodes.serve_all(&etcd).await;
    let endpoint = |i: usize| nodes.endpoint(i);
    let clients = nodes.clients().await;

    // The namespace, through the CLI; every node learns its replication.
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args([
            "namespace",
            "create",
            "--replication",
            "2",
            "--endpoint",
            &endpoint(0),
            "durable",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("replication 2") && text.contains("cluster-wide"),
        "{text}"
    );
    wait_replication(&clients, "durable", 2).await;
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args(["namespace", "list", "--cluster", &etcd.url(), "--cluster-id", "rep"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["durable", "default", "2"]),
        "{text}"
    );

    // 300 durable objects through a; each on exactly its two owners.
    let view: Vec<NodeInfo> = m.serving_nodes().borrow().clone();
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let owners = |p: &Placement, k: &Bytes| {
        let mut o: Vec<String> = p.owners("durable", k, 2).into_iter().map(str::to_string).collect();
        o.sort();
        o
    };
    let ks = keys("d", 300);
    let value = |k: &Bytes| Bytes::from(k.repeat(40));
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), value(k))).collect();
    let tiers = clients[0].1.put_many("durable", objs, Durability::Disk).await.unwrap();
    assert!(tiers.iter().all(|t| *t == Tier::Disk), "{tiers:?}");
    wait_holders(&clients, "durable", &ks, "placed", |k, h| h == owners(&placement, k)).await;

    // kill -9 b: reads through c succeed at once, byte-identical.
    let victim = 1;
    drop(procs[victim].take());
    let got = clients[2].1.get_many("durable", ks.clone()).await.unwrap();
    for (k, o) in ks.iter().zip(&got) {
        assert_eq!(
            o.as_ref().map(|o| &o.value),
            Some(&value(k)),
            "key {k:?} right after kill -9"
        );
    }
    m.wait_for(Duration::from_secs(10), |m| !m.contains_key("b"))
        .await
        .unwrap_or_else(|last| panic!("b never left: {last:?}"));
    let survivors: Vec<(&str, Client)> = [0, 2].iter().map(|&i| clients[i].clone()).collect();
    let took = wait_holders(&survivors, "durable", &ks, "re-replicated", |_, h| h.len() == 2).await;
    eprintln!("replication 2 restored on the survivors {took:?} after b left");
    let got = clients[0].1.get_many("durable", ks.clone()).await.unwrap();
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, o)| o.as_ref().map(|o| &o.value) == Some(&value(k)))
    );
    // Repair reports nothing left under-replicated.
    let t = Instant::now();
    while !m.snapshot().values().all(|m| m.under_replicated == 0) {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", m.snapshot());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // b comes back on its intact disk: reconciled to exactly the owners.
    procs[victim] = Some(nodes.serve(victim));
    m.wait_for(Duration::from_secs(30), |m| serving(m, "b"))
        .await
        .unwrap_or_else(|last| panic!("b never served again: {last:?}"));
    let took = wait_holders(&clients, "durable", &ks, "reconciled", |k, h| {
        h == owners(&placement, k)
    })
    .await;
    eprintln!("reconciled to the placement owners {took:?} after b rejoined");
    let got = clients[1].1.get_many("durable", ks.clone()).await.unwrap();
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, o)| o.as_ref().map(|o| &o.value) == Some(&value(k)))
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args(["cluster", "status", "--cluster", &etcd.url(), "--cluster-id", "rep"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cluster rep: 3 node(s), 0 under-replicated object(s)"),
        "{text}"
    );
}

/// `kvfabric cluster drain NODE` takes the node out of placement and waits
/// until it has handed every object to its new owner; nothing is lost,
/// and the rest of the cluster serves all of it. Bad drain requests get
/// clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_every_object_to_its_owners() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b", "c"]) {
        let mut s = node_settings(d.path(), &etcd, "dr", id, 30);
        s.cluster.repair_interval_ms = 500;
        nodes.push(common::start(s).await);
    }
    for (h, _) in &nodes {
        wait_view(h, 3).await;
    }
    let ks = keys("dr", 200);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(7))).collect();
    nodes[0].1.put_many("kv", objs, Durability::Memory).await.unwrap();
    let on_b = nodes[1].0.stack.len();
    assert!(on_b > 0, "b holds a share");

    // Bad requests: a wrong node id, an unknown node.
    let err = nodes[1].1.drain("a").await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::InvalidArgument, "{err}");
    let out = cluster_cli("drain", &etcd, "dr").arg("zz").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no node \"zz\""), "{stderr}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args([
            "cluster",
            "drain",
            "--cluster",
            &etcd.url(),
            "--cluster-id",
            "dr",
            "--timeout-s",
            "60",
            "b",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node b holds nothing"), "{text}");
    assert_eq!(nodes[1].0.stack.len(), 0);
    assert_eq!(
        nodes[0].0.stack.len() + nodes[2].0.stack.len(),
        200,
        "moved, not copied twice"
    );
    let m = watch(&etcd, "dr").await;
    assert_eq!(m.snapshot()["b"].state, MemberState::Draining);
    // Every object reads back through every node, b included.
    for (_, c) in &nodes {
        let got = c.get_many("kv", ks.clone()).await.unwrap();
        assert!(
            ks.iter()
                .zip(&got)
                .all(|(k, o)| o.as_ref().map(|o| o.value.to_vec()) == Some(k.repeat(7)))
        );
    }
    // A single node cannot drain.
    let d = tempfile::tempdir().unwrap();
    let (solo, sc) = common::start(common::settings(d.path(), 1 << 20, 0)).await;
    let err = sc.drain("kvfabric-node").await.unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("not in cluster mode"), "{err}");
    solo.shutdown().await;
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// Rolling restart of every node of a three-node cluster (real processes,
/// SIGTERM, restart on the same data directory) while a cluster-aware
/// client following etcd reads a replication-2 namespace in a loop and
/// writes new objects: not one read fails or comes back wrong, and after
/// each restart repair brings every object back to two durable copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_read() {
    let etcd = Etcd::start().await;
    let nodes = RealNodes::new(&etcd, "roll", &["a", "b", "c"]);
    let (mut procs, m) = nodes.serve_all(&etcd).await;
    let clients = nodes.clients().await;
    clients[0].1.create_namespace("roll", 2).await.unwrap();
    wait_replication(&clients, "roll", 2).await;

    // The cluster-aware client follows the membership and the namespace records.
    let ns_watch = kvfabric::cluster::watch_namespaces(etcd.target(), "roll")
        .await
        .unwrap();
    let cc = ClusterClient::new(m.serving_nodes(), ClientOptions::default());
    kvfabric::cluster::follow_replication(&ns_watch, &cc);
    let ks = keys("r", 200);
    let value = |k: &Bytes| Bytes::from(k.repeat(30));
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), value(k))).collect();
    cc.put_many("roll", objs, Durability::Disk).await.unwrap();
    wait_holders(&clients, "roll", &ks, "placed on two nodes", |_, h| h.len() == 2).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (cc, ks, stop) = (cc.clone(), ks.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut reads, mut bad, mut puts, mut put_errors) = (0u64, Vec::new(), 0u64, 0u64);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match cc.get_many("roll", ks.clone()).await {
                    Ok(got) => {
                        for (k, o) in ks.iter().zip(got) {
                            reads += 1;
                            if o.map(|o| o.value) != Some(value(k)) {
                                bad.push(format!("{k:?} missing or wrong"));
                            }
                        }
                    }
                    Err(e) => bad.push(format!("get_many failed: {e}")),
                }
                let k = Bytes::from(format!("w-{n}"));
                n += 1;
                match cc.put("roll", k.clone(), value(&k), Durability::Disk).await {
                    Ok(_) => puts += 1,
                    Err(_) => put_errors += 1,
                }
            }
            (reads, bad, puts, put_errors)
        })
    };

    let survivors_hold_two = |down: Option<usize>| {
        let clients = &clients;
        let ks = &ks;
        async move {
            let up: Vec<(&str, Client)> = (0..3)
                .filter(|&j| Some(j) != down)
                .map(|j| clients[j].clone())
                .collect();
            wait_holders(&up, "roll", ks, "two durable copies", |_, h| h.len() == 2).await
        }
    };
    for (i, slot) in procs.iter_mut().enumerate() {
        let id = nodes.ids[i];
        let mut p = slot.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) }, 0);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = p.0.wait();
            p
        })
        .await;
        m.wait_for(Duration::from_secs(10), |m| !m.contains_key(id))
            .await
            .unwrap_or_else(|last| panic!("{id} still listed after SIGTERM: {last:?}"));
        let took = survivors_hold_two(Some(i)).await;
        eprintln!("{id} down: two copies on the survivors after {took:?}");
        *slot = Some(nodes.serve(i));
        m.wait_for(Duration::from_secs(30), |m| serving(m, id))
            .await
            .unwrap_or_else(|last| panic!("{id} never served again: {last:?}"));
        let took = survivors_hold_two(None).await;
        eprintln!("{id} back: reconciled after {took:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, bad, puts, put_errors) = load.await.unwrap();
    eprintln!(
        "rolling restart: {reads} reads, {} failed; {puts} puts, {put_errors} failed",
        bad.len()
    );
    assert!(reads >= 600, "the workload ran: {reads} reads");
    assert!(
        bad.is_empty(),
        "{} failed reads, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// A node joining a two-node cluster takes its share in the background:
/// the objects placement now gives it are handed to it (and removed from
/// their old holders once it has them), none lost or duplicated. The new
/// node's clock is a day ahead (a skewed clock): membership is etcd's
/// lease, never a comparison of clocks, so it joins and serves like any
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_its_share_even_with_a_skewed_clock() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let settings = |i: usize, id: &str| repairing(node_settings(dirs[i].path(), &etcd, "join", id, 30), 500);
    let (a, ca) = common::start(settings(0, "a")).await;
    let (b, _) = common::start(settings(1, "b")).await;
    for h in [&a, &b] {
        wait_view(h, 2).await;
    }
    let ks = keys("j", 300);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(5))).collect();
    ca.put_many("kv", objs, Durability::Memory).await.unwrap();
    assert_eq!(a.stack.len() + b.stack.len(), 300);

    // c joins with a clock 24 h ahead.
    let real = kvfabric_tiers::SystemClock;
    use kvfabric_tiers::Clock;
    let skewed = std::sync::Arc::new(kvfabric_tiers::ManualClock::new(real.now_ms() + 86_400_000));
    let c = Node::build_with_clock(settings(2, "c"), skewed)
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    let view = wait_view(&c, 3).await;
    for h in [&a, &b] {
        wait_view(h, 3).await;
    }
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let want_c = ks.iter().filter(|k| placement.owners("kv", k, 1)[0] == "c").count();
    assert!(want_c > 50, "c's share by placement: {want_c}");
    let t = Instant::now();
    while c.stack.len() != want_c || a.stack.len() + b.stack.len() + c.stack.len() != 300 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "c holds {} of its {want_c}; a {} b {}",
            c.stack.len(),
            a.stack.len(),
            b.stack.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("c took its share of {want_c} objects in {:?}", t.elapsed());
    // Every object is on its owner and reads back through any node.
    for (id, h) in [("a", &a), ("b", &b), ("c", &c)] {
        let owned = ks.iter().filter(|k| placement.owners("kv", k, 1)[0] == id).count();
        assert_eq!(h.stack.len(), owned, "{id} holds exactly what it owns");
    }
    let got = ca.get_many("kv", ks.clone()).await.unwrap();
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, o)| o.as_ref().map(|o| o.value.to_vec()) == Some(k.repeat(5)))
    );
    for h in [a, b, c] {
        h.shutdown().await;
    }
}

/// A replica that was killed while objects of a replication-2 namespace
/// were deleted and overwritten comes back on its old disk: repair drops
/// its stale copies (the owners' tombstones and newer versions win, by age,
/// never by comparing clocks), so no deleted object comes back, every read
/// through any node returns the new version, and each object ends on
/// exactly its owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_does_not_resurrect_deletes_or_old_versions() {
    let etcd = Etcd::start().await;
    let nodes = RealNodes::new(&etcd, "stale", &["a", "b", "c"]);
    let (mut procs, m) = nodes.serve_all(&etcd).await;
    let clients = nodes.clients().await;
    clients[0].1.create_namespace("w", 2).await.unwrap();
    clients[0].1.create_namespace("w2", 2).await.unwrap();
    wait_replication(&clients, "w", 2).await;
    wait_replication(&clients, "w2", 2).await;
    // A second namespace, cleared whole while b is away.
    let cleared = keys("c", 30);
    let objs: Vec<PutObject> = cleared.iter().map(|k| PutObject::new(k.clone(), k.clone())).collect();
    clients[0].1.put_many("w2", objs, Durability::Disk).await.unwrap();
    let view: Vec<NodeInfo> = m.serving_nodes().borrow().clone();
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let owners = |k: &Bytes| {
        let mut o: Vec<String> = placement.owners("w", k, 2).into_iter().map(str::to_string).collect();
        o.sort();
        o
    };
    let ks = keys("s", 150);
    let v1 = |k: &Bytes| Bytes::from(k.repeat(20));
    let v2 = |k: &Bytes| Bytes::from([&b"version-2 of "[..], k].concat());
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), v1(k))).collect();
    clients[0].1.put_many("w", objs, Durability::Disk).await.unwrap();
    wait_holders(&clients, "w", &ks, "placed", |k, h| h == owners(k)).await;

    // b is killed; meanwhile 20 of its objects are deleted, 20 overwritten.
    let on_b: Vec<Bytes> = ks
        .iter()
        .filter(|k| owners(k).contains(&"b".to_string()))
        .cloned()
        .collect();
    assert!(on_b.len() >= 60, "b holds {} objects", on_b.len());
    let (gone, changed) = (on_b[..20].to_vec(), on_b[20..40].to_vec());
    drop(procs[1].take());
    m.wait_for(Duration::from_secs(10), |m| !m.contains_key("b"))
        .await
        .unwrap_or_else(|last| panic!("b never left: {last:?}"));
    // Writes go to every owner: wait until the survivors' own views agree.
    for (id, c) in [&clients[0], &clients[2]] {
        let t = Instant::now();
        while c.members().await.unwrap().members.iter().any(|n| n.node_id == "b") {
            assert!(t.elapsed() < Duration::from_secs(10), "{id} still sees b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(clients[0].1.delete("w", gone.clone()).await.unwrap(), 20);
    clients[0].1.clear("w2").await.unwrap();
    let objs: Vec<PutObject> = changed.iter().map(|k| PutObject::new(k.clone(), v2(k))).collect();
    clients[2].1.put_many("w", objs, Durability::Disk).await.unwrap();
    let survivors: Vec<(&str, Client)> = [0, 2].iter().map(|&i| clients[i].clone()).collect();
    let kept: Vec<Bytes> = ks.iter().filter(|k| !gone.contains(k)).cloned().collect();
    wait_holders(&survivors, "w", &kept, "re-replicated", |_, h| h.len() == 2).await;
    // Let b's copies grow older than the deletes by more than repair's grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let check_reads = |clients: &[(&'static str, Client)]| {
        let (clients, ks, gone, changed) = (clients.to_vec(), ks.clone(), gone.clone(), changed.clone());
        async move {
            for (id, c) in &clients {
                let got = c.get_many("w", ks.clone()).await.unwrap();
                for (k, o) in ks.iter().zip(got) {
                    let want = if gone.contains(k) {
                        None
                    } else if changed.contains(k) {
                        Some(v2(k))
                    } else {
                        Some(v1(k))
                    };
                    assert_eq!(o.map(|o| o.value), want, "{k:?} read through {id}");
                }
            }
        }
    };

    // b reconciles before it serves: from its first moment serving, no
    // read (through b itself or any other node) sees a stale copy.
    procs[1] = Some(nodes.serve(1));
    m.wait_for(Duration::from_secs(30), |m| serving(m, "b"))
        .await
        .unwrap_or_else(|last| panic!("b never served again: {last:?}"));
    check_reads(&clients).await;
    wait_holders(&clients, "w", &gone, "deleted objects stay deleted", |_, h| {
        h.is_empty()
    })
    .await;
    wait_holders(&clients, "w2", &cleared, "a cleared namespace stays empty", |_, h| {
        h.is_empty()
    })
    .await;
    wait_holders(&clients, "w", &kept, "reconciled", |k, h| h == owners(k)).await;
    // Every copy of a changed object is version 2.
    let t = Instant::now();
    loop {
        let mut old = 0;
        for (_, c) in &clients {
            for (k, l) in changed.iter().zip(c.locate("w", changed.clone()).await.unwrap()) {
                if !l.tiers.is_empty() && l.checksum != xxhash_rust::xxh3::xxh3_64(&v2(k)) {
                    old += 1;
                }
            }
        }
        if old == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{old} old copies left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_reads(&clients).await;
}

/// A delete in a replication-1 namespace while a key's old owner still
/// holds it (a node joined; the hand-off has not run yet) stays a delete:
/// the new owner, which never held the objects, remembers the delete, so
/// the old owner's repair drops its copies instead of handing them over
/// (it used to copy them to the new owner, undoing the delete). A clear
/// at replication 1 leaves a namespace tombstone on every node. The old
/// owner is a real process kept stopped (SIGSTOP, its lease long enough to
/// stay a member) until the delete is done, so its repair cannot run first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_hand_off_is_not_undone_at_replication_1() {
    let etcd = Etcd::start().await;
    let nodes = RealNodes::new(&etcd, "handoff-delete", &["a", "c"]);
    std::fs::write(
        nodes.base.path().join("kvfabric.toml"),
        "[cluster]\nlease-ttl-s = 30\nrefresh-interval-ms = 200\nrepair-interval-ms = 500\n",
    )
    .unwrap();
    let a = nodes.serve(0);
    let m = watch(&etcd, nodes.cluster).await;
    m.wait_for(Duration::from_secs(30), |m| serving(m, "a"))
        .await
        .unwrap_or_else(|last| panic!("a never served: {last:?}"));
    let ca = Client::connect(nodes.endpoint(0)).await.unwrap();
    let ks = keys("h", 200);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(3))).collect();
    ca.put_many("kv", objs, Durability::Memory).await.unwrap();
    // The copies are older than the delete below by more than repair's grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // a stops before c joins: it neither notices c nor hands anything over.
    assert_eq!(unsafe { libc::kill(a.0.id() as i32, libc::SIGSTOP) }, 0);
    let _c = nodes.serve(1);
    m.wait_for(Duration::from_secs(30), |m| serving(m, "a") && serving(m, "c"))
        .await
        .unwrap_or_else(|last| panic!("c never served next to a: {last:?}"));
    let cc = Client::connect(nodes.endpoint(1)).await.unwrap();
    let t = Instant::now();
    while cc.members().await.unwrap().members.len() != 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "c never saw a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_replication(&[("c", cc.clone())], "kv", 1).await;
    let view: Vec<NodeInfo> = m.serving_nodes().borrow().clone();
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let to_c: Vec<Bytes> = ks
        .iter()
        .filter(|k| placement.owners("kv", k, 1)[0] == "c")
        .cloned()
        .collect();
    assert!(to_c.len() >= 40, "c's share by placement: {}", to_c.len());
    let (gone, moved) = to_c.split_at(to_c.len() / 2);
    // c owns them and holds none yet: it deletes nothing, but remembers.
    assert_eq!(cc.delete("kv", gone.to_vec()).await.unwrap(), 0);

    // a goes on and runs its repair passes for the new membership.
    assert_eq!(unsafe { libc::kill(a.0.id() as i32, libc::SIGCONT) }, 0);
    let held = |c: &Client, ks: &[Bytes]| {
        let (c, ks) = (c.clone(), ks.to_vec());
        async move {
            let locs = c.locate("kv", ks.clone()).await.unwrap();
            ks.into_iter()
                .zip(locs)
                .filter(|(_, l)| !l.tiers.is_empty())
                .map(|(k, _)| k)
                .collect::<Vec<Bytes>>()
        }
    };
    // The hand-off of what c owns is done once a holds none of it.
    let t = Instant::now();
    loop {
        let left = held(&ca, &to_c).await;
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "a still holds {} of c's {} objects",
            left.len(),
            to_c.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("hand-off done in {:?}", t.elapsed());
    // A few more passes: nothing deleted comes back, the rest moved to c.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(held(&cc, moved).await.len(), moved.len(), "the kept objects moved to c");
    let back = held(&cc, gone).await;
    assert!(
        back.is_empty(),
        "{} of {} deleted objects came back to c",
        back.len(),
        gone.len()
    );
    for (id, c) in [("a", &ca), ("c", &cc)] {
        let got = c.get_many("kv", gone.to_vec()).await.unwrap();
        assert!(got.iter().all(Option::is_none), "a deleted object read through {id}");
        let got = c.get_many("kv", moved.to_vec()).await.unwrap();
        assert!(
            moved
                .iter()
                .zip(&got)
                .all(|(k, o)| o.as_ref().map(|o| o.value.to_vec()) == Some(k.repeat(3))),
            "a kept object read through {id}"
        );
    }

    // A clear at replication 1 leaves a namespace tombstone on every node.
    cc.clear("kv").await.unwrap();
    for (id, c) in [("a", &ca), ("c", &cc)] {
        let l = c.locate("kv", vec![Bytes::from_static(b"never stored")]).await.unwrap();
        assert!(
            l[0].tombstone_age_ms.is_some(),
            "no clear tombstone on {id}: {:?}",
            l[0]
        );
    }
}

/// A repair copy is an aged put (it keeps its version's age). An owner
/// holding a different version created later, or that deleted the key
/// after the copy's version was created, does not store it and answers
/// `TIER_UNSPECIFIED`; the node that sent it then drops its own copy
/// instead of trying again. Checked directly, and through repair with the
/// versions 0.5 s apart, within the 1 s grace in which repair's own age
/// comparison leaves them alone. A copy of the version held, or one newer
/// than the delete, is stored. (A copy used to be stored whatever it met
/// and to clear the tombstone: the old version replaced the new one and
/// the delete was undone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_copy_never_replaces_a_newer_version_or_undoes_a_delete() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let settings = |i: usize, id: &str| repairing(node_settings(dirs[i].path(), &etcd, "aged", id, 30), 300);
    let (a, ca) = common::start(settings(0, "a")).await;
    let (c, cc) = common::start(settings(1, "c")).await;
    let view = wait_view(&a, 2).await;
    wait_view(&c, 2).await;
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let ks: Vec<Bytes> = keys("g", 200)
        .into_iter()
        .filter(|k| placement.owners("kv", k, 1)[0] == "c")
        .take(4)
        .collect();
    let [newer, deleted, same, undeleted] = <[Bytes; 4]>::try_from(ks).unwrap();
    let v = |tag: &str, k: &Bytes| Bytes::from([tag.as_bytes(), k].concat());
    // What repair does: puts marked forwarded, stored where they land.
    let (fa, fc) = (ca.clone().forwarded(true), cc.clone().forwarded(true));
    let aged = |c: &Client, k: &Bytes, value: Bytes, age_ms: u64| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            let t = c
                .put_many_aged(
                    "kv",
                    vec![PutObject::new(k, value)],
                    vec![Some(age_ms)],
                    Durability::Memory,
                )
                .await
                .unwrap();
            t[0]
        }
    };
    let tombstone = |c: &Client, k: &Bytes| {
        let (c, k) = (c.clone(), k.clone());
        async move { c.locate("kv", vec![k]).await.unwrap()[0].tombstone_age_ms }
    };

    // A copy of the version held is stored, older or not.
    assert_eq!(aged(&fc, &same, v("v1", &same), 5_000).await, Tier::Host);
    assert_eq!(aged(&fc, &same, v("v1", &same), 6_000).await, Tier::Host);
    // An older copy of another version is refused; the newer one stays.
    assert_eq!(aged(&fc, &newer, v("v2", &newer), 10_000).await, Tier::Host);
    assert_eq!(aged(&fc, &newer, v("v1", &newer), 20_000).await, Tier::Unspecified);
    assert_eq!(
        fc.get("kv", newer.clone()).await.unwrap().unwrap().value,
        v("v2", &newer)
    );
    // A copy older than a delete is refused and leaves the tombstone; one
    // newer than it is stored and clears it.
    assert_eq!(
        fc.delete("kv", vec![deleted.clone(), undeleted.clone()]).await.unwrap(),
        0
    );
    let deleted_at = Instant::now();
    assert_eq!(aged(&fc, &deleted, v("v1", &deleted), 5_000).await, Tier::Unspecified);
    assert!(fc.get("kv", deleted.clone()).await.unwrap().is_none());
    assert!(tombstone(&fc, &deleted).await.is_some());
    assert_eq!(aged(&fc, &undeleted, v("v3", &undeleted), 0).await, Tier::Host);
    assert_eq!(tombstone(&fc, &undeleted).await, None);

    // Through repair: a holds copies c's owner must not take, each 0.5 s
    // older than c's version or delete. a's passes send them; c refuses;
    // a drops them.
    assert_eq!(aged(&fa, &newer, v("v1", &newer), 10_500).await, Tier::Host);
    let age = deleted_at.elapsed().as_millis() as u64 + 500;
    assert_eq!(aged(&fa, &deleted, v("v1", &deleted), age).await, Tier::Host);
    let pair = vec![newer.clone(), deleted.clone()];
    let t = Instant::now();
    while !a.stack.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a still holds {:?}",
            ca.locate("kv", pair.clone()).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more passes change nothing.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(a.stack.is_empty());
    for (id, client) in [("a", &ca), ("c", &cc)] {
        let got = client.get("kv", newer.clone()).await.unwrap().map(|o| o.value);
        assert_eq!(got, Some(v("v2", &newer)), "the newer version read through {id}");
        assert!(
            client.get("kv", deleted.clone()).await.unwrap().is_none(),
            "the deleted object read through {id}"
        );
    }
    assert!(tombstone(&fc, &deleted).await.is_some(), "c still remembers the delete");

    // At replication 2 the sender is an owner (the first holding a copy,
    // so the one that acts): refused, it drops its copy rather than send it
    // again every pass; then c's version is copied to it.
    cc.create_namespace("kv2", 2).await.unwrap();
    wait_replication(&[("a", ca.clone()), ("c", cc.clone())], "kv2", 2).await;
    let ks: Vec<Bytes> = keys("r", 200)
        .into_iter()
        .filter(|k| placement.owners("kv2", k, 2)[0] == "a")
        .take(2)
        .collect();
    let [newer, deleted] = <[Bytes; 2]>::try_from(ks).unwrap();
    let aged2 = |c: &Client, k: &Bytes, value: Bytes, age_ms: u64| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            c.put_many_aged(
                "kv2",
                vec![PutObject::new(k, value)],
                vec![Some(age_ms)],
                Durability::Memory,
            )
            .await
            .unwrap()[0]
        }
    };
    assert_eq!(aged2(&fc, &newer, v("v2", &newer), 10_000).await, Tier::Host);
    assert_eq!(fc.delete("kv2", vec![deleted.clone()]).await.unwrap(), 0);
    let deleted_at = Instant::now();
    assert_eq!(aged2(&fa, &newer, v("v1", &newer), 10_500).await, Tier::Host);
    let age = deleted_at.elapsed().as_millis() as u64 + 500;
    assert_eq!(aged2(&fa, &deleted, v("v1", &deleted), age).await, Tier::Host);
    let want = xxhash_rust::xxh3::xxh3_64(&v("v2", &newer));
    let t = Instant::now();
    loop {
        let l = ca.locate("kv2", vec![newer.clone(), deleted.clone()]).await.unwrap();
        if l[0].checksum == want && !l[0].tiers.is_empty() && l[1].tiers.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a's copies were never replaced by c's version and delete: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (id, client) in [("a", &fa), ("c", &fc)] {
        let got = client.get("kv2", newer.clone()).await.unwrap().map(|o| o.value);
        assert_eq!(got, Some(v("v2", &newer)), "{id}'s copy");
        assert!(
            client.get("kv2", deleted.clone()).await.unwrap().is_none(),
            "{id}'s copy"
        );
    }
    for h in [a, c] {
        h.shutdown().await;
    }
}

/// A cluster-aware client with no etcd of its own: it learns the serving
/// members, their placement weights and a namespace's replication from one
/// node (`ClusterClient::discover`, the `Members` call), places every key
/// exactly as the nodes do, and follows a node leaving. A single node is a
/// cluster of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_discovers_the_cluster_through_one_node() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b", "c"]) {
        nodes.push(common::start(node_settings(d.path(), &etcd, "disc", id, 30)).await);
    }
    let mut view = Vec::new();
    for (h, _) in &nodes {
        view = wait_view(h, 3).await;
    }
    nodes[0].1.create_namespace("rep2", 2).await.unwrap();
    let t = Instant::now();
    while nodes[1].1.describe_namespace("rep2").await.map(|i| i.replication).ok() != Some(2) {
        assert!(t.elapsed() < Duration::from_secs(10), "b never learned the namespace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cc = ClusterClient::discover(
        vec!["http://127.0.0.1:1".into(), nodes[1].0.endpoint()],
        ClientOptions::default(),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let ks = keys("d", 300);
    for k in &ks {
        let want: Vec<String> = placement.owners("rep2", k, 2).into_iter().map(str::to_string).collect();
        assert_eq!(cc.owners("rep2", k).unwrap(), want, "placement of {k:?}");
    }
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(2))).collect();
    cc.put_many("rep2", objs, Durability::Memory).await.unwrap();
    for (h, _) in &nodes {
        let id = view.iter().find(|n| n.endpoint == h.endpoint()).unwrap().id.clone();
        let owned = ks
            .iter()
            .filter(|k| placement.owners("rep2", k, 2).contains(&id.as_str()))
            .count();
        assert_eq!(h.stack.len(), owned, "{id} holds exactly the keys it owns");
    }

    // c leaves: the client follows within a few refreshes, reads go on.
    let (c, _) = nodes.pop().unwrap();
    c.shutdown().await;
    let t = Instant::now();
    while ks
        .iter()
        .any(|k| cc.owners("rep2", k).unwrap().contains(&"c".to_string()))
    {
        assert!(t.elapsed() < Duration::from_secs(10), "the client still places on c");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = cc.get_many("rep2", ks.clone()).await.unwrap();
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, o)| o.as_ref().map(|o| o.value.to_vec()) == Some(k.repeat(2)))
    );

    // A single node, and no seed that answers.
    let d = tempfile::tempdir().unwrap();
    let (solo, _) = common::start(common::settings(d.path(), 1 << 20, 0)).await;
    let one = ClusterClient::discover(vec![solo.endpoint()], ClientOptions::default(), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(one.owners("x", b"k").unwrap(), vec!["kvfabric-node".to_string()]);
    one.put("x", "k", "v", Durability::Memory).await.unwrap();
    assert_eq!(one.get("x", "k").await.unwrap().unwrap().value, "v");
    let err = ClusterClient::discover(
        vec!["http://127.0.0.1:1".into()],
        ClientOptions::default(),
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::Unavailable, "{err}");
    solo.shutdown().await;
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// Engine workers register under leases: a router-side watcher sees them
/// come and go; a second worker may not take a live worker's name at
/// another URL, while the same worker restarting (same URL) may; a worker
/// that stops renewing disappears when its lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_under_leases_and_routers_see_them_go() {
    use kvfabric::cluster::{WorkerLease, WorkerRecord, list_workers, watch_workers};
    let etcd = Etcd::start().await;
    let rec = |name: &str, port: u16| WorkerRecord {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}"),
        kv_events: None,
        fabric_node: Some("n1".into()),
    };
    let watch = watch_workers(etcd.target(), "c1").await.unwrap();
    let w1 = WorkerLease::register(etcd.target(), "c1", rec("w1", 8001), 2)
        .await
        .unwrap();
    let seen = watch
        .wait_for(Duration::from_secs(10), |m| m.contains_key("w1"))
        .await
        .expect("the watcher sees w1");
    assert_eq!(seen["w1"], rec("w1", 8001));

    // Another worker at another URL may not take the name.
    let err = WorkerLease::register(etcd.target(), "c1", rec("w1", 9009), 2)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    // Bad records and settings are refused before etcd is touched.
    assert!(
        WorkerLease::register(etcd.target(), "c1", rec("a/b", 1), 2)
            .await
            .is_err()
    );
    assert!(
        WorkerLease::register(etcd.target(), "c1", rec("w3", 1), 1)
            .await
            .is_err()
    );

    // The same worker restarting (same URL) replaces its record.
    let w1_again = WorkerLease::register(etcd.target(), "c1", rec("w1", 8001), 2)
        .await
        .unwrap();
    drop(w1);

    // Leaving removes the record at once.
    w1_again.leave().await;
    watch
        .wait_for(Duration::from_secs(10), |m| !m.contains_key("w1"))
        .await
        .expect("w1 leaves");

    // A worker that stops renewing (dropped: a crash) goes when its 2 s
    // lease expires; renewal keeps one alive well past its TTL.
    let w2 = WorkerLease::register(etcd.target(), "c1", rec("w2", 8002), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(list_workers(&etcd.target(), "c1").await.unwrap().contains_key("w2"));
    drop(w2);
    watch
        .wait_for(Duration::from_secs(10), |m| !m.contains_key("w2"))
        .await
        .expect("w2's lease expires");

    // The CLI: `cluster register-worker` holds a registration until
    // SIGTERM, `cluster workers` lists it.
    let mut sidecar = cluster_cli("register-worker", &etcd, "c1")
        .args([
            "--name",
            "vllm-0",
            "--url",
            "http://127.0.0.1:8100",
            "--kv-events",
            "tcp://127.0.0.1:5557",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let seen = watch
        .wait_for(Duration::from_secs(10), |m| m.contains_key("vllm-0"))
        .await
        .expect("the sidecar registers");
    assert_eq!(seen["vllm-0"].kv_events.as_deref(), Some("tcp://127.0.0.1:5557"));
    let out = cluster_cli("workers", &etcd, "c1").arg("--json").output().unwrap();
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["url"], "http://127.0.0.1:8100");
    // SAFETY: plain FFI call; the pid is our child's.
    unsafe { libc::kill(sidecar.id() as i32, libc::SIGTERM) };
    assert!(
        sidecar.wait().unwrap().success(),
        "the sidecar exits cleanly on SIGTERM"
    );
    assert!(!list_workers(&etcd.target(), "c1").await.unwrap().contains_key("vllm-0"));
    // A bad record is refused with a message, nothing registered.
    let out = cluster_cli("register-worker", &etcd, "c1")
        .args(["--name", "bad", "--url", "ftp://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("url"));
}

fn worker_rec(name: &str) -> kvfabric::cluster::WorkerRecord {
    kvfabric::cluster::WorkerRecord {
        name: name.into(),
        url: "http://127.0.0.1:8001".into(),
        kv_events: None,
        fabric_node: None,
    }
}

/// A registry on an etcd that serves clients over TLS only and requires
/// client certificates: a node joins and a worker registers through an
/// `etcds://` URL naming the CA, certificate and key; without a client
/// certificate, or over plain HTTP, every call fails (promptly) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_works_over_tls_with_client_certificates() {
    use kvfabric::cluster::EtcdTarget;
    let etcd = Etcd::start_tls().await;
    assert!(etcd.url().starts_with("etcds://") && etcd.target().is_tls());
    let dir = tempfile::tempdir().unwrap();
    let s = node_settings(dir.path(), &etcd, "tls", "a", 30);
    let _joined = node_and_worker_join(&etcd.target(), s, "tls", "TLS etcd").await;

    let port = etcd.endpoints()[0].rsplit(':').next().unwrap().to_string();
    let ca = etcd.tls_file("ca.pem").display().to_string();
    let no_cert = EtcdTarget::parse(&format!("etcds://127.0.0.1:{port}?ca={ca}")).unwrap();
    let plain = EtcdTarget::parse(&format!("etcd://127.0.0.1:{port}")).unwrap();
    for (what, t) in [("no client certificate", no_cert), ("plain HTTP", plain)] {
        let started = Instant::now();
        let e = list_members(&t, "tls").await.expect_err(what);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        println!("{what}: {e}");
    }
}

/// Starts node `a` with `s`, waits (through `target`) until it serves in
/// `cluster`, and registers worker `w1` there through `target`: what a
/// secured registry must let a node and a worker do. Keeps them alive
/// while the result lives.
async fn node_and_worker_join(
    target: &kvfabric::cluster::EtcdTarget,
    s: Settings,
    cluster: &str,
    how: &str,
) -> (kvfabric::server::NodeHandle, Client, kvfabric::cluster::WorkerLease) {
    use kvfabric::cluster::{WorkerLease, list_workers};
    let (node, c) = common::start(s).await;
    Membership::start(target.clone(), cluster.into())
        .await
        .unwrap()
        .wait_for(Duration::from_secs(10), |m| serving(m, "a"))
        .await
        .unwrap_or_else(|last| panic!("the node never served through {how}: {last:?}"));
    let lease = WorkerLease::register(target.clone(), cluster, worker_rec("w1"), 5)
        .await
        .unwrap();
    assert!(list_workers(target, cluster).await.unwrap().contains_key("w1"));
    (node, c, lease)
}

/// A registry on an etcd with authentication on: a node and a worker that
/// name a user and a password file get in and work under a role limited to
/// `/kvfabric/`; anonymous clients, a wrong password and a user without
/// that role are refused with etcd's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_authenticates_with_an_etcd_user_and_password() {
    use etcd_client::Permission;
    use kvfabric::cluster::EtcdTarget;
    let etcd = Etcd::start().await;
    let mut admin = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let _ = admin.role_add("root").await;
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("kvfabric").await.unwrap();
    admin
        .role_grant_permission("kvfabric", Permission::read_write("/kvfabric/").with_prefix())
        .await
        .unwrap();
    admin.user_add("kv", "kv-pw", None).await.unwrap();
    admin.user_grant_role("kv", "kvfabric").await.unwrap();
    admin.user_add("nobody", "nobody-pw", None).await.unwrap();
    admin.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pw = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let url = |user: &str, file: &str| format!("{}?user={user}&password-file={file}", etcd.url());
    let kv_url = url("kv", &pw("kv", "kv-pw\n"));
    let kv = EtcdTarget::parse(&kv_url).unwrap();
    assert_eq!(kv.user(), Some("kv"));
    assert!(!format!("{kv:?}").contains("kv-pw"));

    let node_dir = tempfile::tempdir().unwrap();
    let mut s = node_settings(node_dir.path(), &etcd, "auth", "a", 30);
    s.cluster.etcd = Some(kv_url.clone());
    let _joined = node_and_worker_join(&kv, s, "auth", "etcd auth").await;

    let wrong = EtcdTarget::parse(&url("kv", &pw("wrong", "nope"))).unwrap();
    let nobody = EtcdTarget::parse(&url("nobody", &pw("nobody", "nobody-pw"))).unwrap();
    for (what, t, says) in [
        ("anonymous", etcd.target(), "user name"),
        ("wrong password", wrong, "authentication failed"),
        ("no role", nobody, "permission denied"),
    ] {
        let e = list_members(&t, "auth").await.expect_err(what).to_string();
        assert!(e.contains(says), "{what}: {e}");
    }
}

/// Reads across a membership change, before repair has handed anything
/// over: three plain nodes, and a client whose membership first drops one
/// of them (a drain) and then adds a fourth, empty node (a join). Every
/// object stays readable, and chains keep their whole prefix, through the
/// previous owners; with the handoff window off, the moved objects are
/// missed (which shows the previous owners are what found them). Once the
/// dropped node is gone for good, reads of its objects return "missing"
/// (no error, no hang) and it is not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_find_objects_at_their_previous_owners_until_handed_off() {
    let (_dirs, mut nodes, info) = plain_nodes(4).await;
    let (tx, rx) = tokio::sync::watch::channel(info[..3].to_vec());
    let cc = ClusterClient::new(rx, ClientOptions::default());
    let no_window = cc.clone().with_handoff_window(Duration::ZERO);
    let ks = keys("obj", 300);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(3))).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    let chain = keys("chain", 48);
    let objs: Vec<PutObject> = chain.iter().map(|k| PutObject::new(k.clone(), vec![7u8; 16])).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 48);
    let on = |members: &[NodeInfo], id: &str| {
        let p = Placement::new(members.iter().map(|m| (m.id.clone(), 1.0))).unwrap();
        ks.iter().filter(|k| p.owners("ns", k, 1)[0] == id).count()
    };
    let all_intact = |got: &[Option<kvfabric::client::Object>]| {
        ks.iter()
            .zip(got)
            .all(|(k, g)| g.as_ref().is_some_and(|o| o.value == k.repeat(3)))
    };

    // n2 drained: its objects now belong to n0 and n1, which lack them.
    tx.send_replace(info[..2].to_vec());
    let moved = on(&info[..3], "n2");
    assert!(moved > 50, "n2 owned {moved} of 300");
    let got = cc.get_many("ns", ks.clone()).await.unwrap();
    assert!(all_intact(&got), "every object read, n2's from n2");
    assert_eq!(cc.handoff_reads(), moved as u64, "counted");
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 48);
    let missed = no_window.get_many("ns", ks.clone()).await.unwrap();
    assert_eq!(
        missed.iter().filter(|g| g.is_none()).count(),
        moved,
        "without the window n2's are missed"
    );
    assert!(no_window.exists_prefix("ns", chain.clone()).await.unwrap().len() < 48);

    // n3 joins (empty): what it now owns is with its previous owners.
    tx.send_replace(vec![info[0].clone(), info[1].clone(), info[3].clone()]);
    let to_n3 = on(&[info[0].clone(), info[1].clone(), info[3].clone()], "n3");
    assert!(to_n3 > 50, "n3 owns {to_n3} of 300");
    let got = cc.get_many("ns", ks.clone()).await.unwrap();
    let lost = ks.iter().zip(&got).filter(|(_, g)| g.is_none()).count();
    // n2's objects are two changes back now: still found.
    assert_eq!(lost, 0, "every object is found");
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, g)| g.as_ref().is_none_or(|o| o.value == k.repeat(3)))
    );

    // n1 is gone for good and dropped: its objects read as missing, promptly.
    tx.send_replace(vec![info[0].clone(), info[3].clone()]);
    let (n1, _) = nodes.remove(1);
    n1.shutdown().await;
    let started = Instant::now();
    let got = cc.get_many("ns", ks.clone()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(got.iter().any(Option::is_none) && got.iter().any(Option::is_some));
    let _ = cc.exists_prefix("ns", chain.clone()).await.unwrap();
}

/// A chain whose earlier owners include a dead node and a live one (both
/// left the membership): ExistsPrefix skips the dead one and still finds
/// the live one's keys, so the prefix runs up to the dead node's first key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_previous_owner_does_not_hide_the_live_ones() {
    let (_dirs, mut nodes, info) = plain_nodes(3).await;
    let (tx, rx) = tokio::sync::watch::channel(info.clone());
    let cc = ClusterClient::new(rx, ClientOptions::default());
    let chain = keys("dead-chain", 64);
    let objs: Vec<PutObject> = chain.iter().map(|k| PutObject::new(k.clone(), vec![3u8; 16])).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    let p = Placement::new(info.iter().map(|m| (m.id.clone(), 1.0))).unwrap();
    let owner = |k: &Bytes| p.owners("ns", k, 1)[0].to_string();
    // The chain's first key off n0 is on `live`; `dead` is the other one.
    let first_off_n0 = chain.iter().position(|k| owner(k) != "n0").unwrap();
    let live = owner(&chain[first_off_n0]);
    let dead = if live == "n1" { "n2" } else { "n1" };
    let first_dead = chain.iter().position(|k| owner(k) == dead).unwrap();
    assert!(first_dead > first_off_n0);

    // Both leave; `dead` is gone for good, `live` keeps its copies.
    tx.send_replace(info[..1].to_vec());
    let (h, _) = nodes.remove(if dead == "n1" { 1 } else { 2 });
    h.shutdown().await;
    let started = Instant::now();
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), first_dead);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // Again, with `dead` now skipped.
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), first_dead);
}

/// A loopback address where a connect never completes: a listener whose
/// queue (backlog 0: one connection) is full, so the kernel drops further
/// SYNs. Keep both values alive.
fn never_accepting() -> (tokio::net::TcpListener, std::net::TcpStream, std::net::SocketAddr) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (listener, filler, addr)
}

/// A member whose connect never completes holds up the calls to it, not
/// those to other nodes: a read from a healthy node (not connected yet)
/// finishes while a read from the stuck one is still connecting. (The
/// connection pool's lock was held across the connect, so every call to
/// every node waited for it, up to the connect timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_accepts_does_not_hold_up_calls_to_others() {
    let (_dirs, nodes, mut info) = plain_nodes(1).await;
    let (_listener, _filler, addr) = never_accepting();
    info.push(NodeInfo {
        id: "stuck".into(),
        endpoint: format!("http://{addr}"),
        weight: 1.0,
    });
    let placement = Placement::new(info.iter().map(|m| (m.id.clone(), 1.0))).unwrap();
    let on = |id: &str| {
        keys("k", 100)
            .into_iter()
            .find(|k| placement.owners("ns", k, 1)[0] == id)
            .unwrap()
    };
    let (healthy_key, stuck_key) = (on("n0"), on("stuck"));
    nodes[0]
        .1
        .put("ns", healthy_key.clone(), "v", Durability::Memory)
        .await
        .unwrap();
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let cc = ClusterClient::fixed(info, options);
    let stuck = tokio::spawn({
        let cc = cc.clone();
        async move { cc.get("ns", stuck_key).await }
    });
    // Let it start connecting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stuck.is_finished(), "the stuck node's connect is pending");
    let got = cc.get("ns", healthy_key).await.unwrap();
    assert_eq!(got.expect("stored").value, "v");
    assert!(
        !stuck.is_finished(),
        "the healthy read finished while the stuck node's connect was still pending"
    );
    stuck.abort();
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// A call's keys for one node go out in requests of at most the client's
/// batch limit, however many there are: with a limit of 8, put, get,
/// a chain's prefix and delete of tens of keys per node work, and so do
/// reads (and prefixes) from previous owners after a membership change.
/// (Each node's keys went out in one request, which the node-level client
/// refused: INVALID_ARGUMENT, or, from a previous owner, silent misses.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_keys_go_out_in_requests_of_the_batch_limit() {
    let (_dirs, nodes, info) = plain_nodes(3).await;
    let (tx, rx) = tokio::sync::watch::channel(info[..2].to_vec());
    let cc = ClusterClient::new(rx, ClientOptions::default()).with_max_batch_keys(8);
    let p = Placement::new(info[..2].iter().map(|m| (m.id.clone(), 1.0))).unwrap();
    let per_node = |ks: &[Bytes]| {
        let on_n0 = ks.iter().filter(|k| p.owners("ns", k, 1)[0] == "n0").count();
        [on_n0, ks.len() - on_n0]
    };
    let ks = keys("b", 100);
    let chain = keys("bchain", 100);
    for set in [&ks[..], &ks[50..], &chain[..]] {
        let n = per_node(set);
        assert!(n.iter().all(|&n| n > 2 * 8), "several requests per node: {n:?}");
    }
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(2))).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    let held: Vec<usize> = nodes.iter().map(|(h, _)| h.stack.len()).collect();
    assert_eq!(held, [per_node(&ks)[0], per_node(&ks)[1], 0]);
    let intact = |got: &[Option<kvfabric::client::Object>], ks: &[Bytes]| {
        got.len() == ks.len()
            && ks
                .iter()
                .zip(got)
                .all(|(k, g)| g.as_ref().is_some_and(|o| o.value == k.repeat(2)))
    };
    assert!(intact(&cc.get_many("ns", ks.clone()).await.unwrap(), &ks));

    // A chain: the whole of it, then cut at a hole on whichever node owns it.
    let objs: Vec<PutObject> = chain.iter().map(|k| PutObject::new(k.clone(), vec![1u8; 8])).collect();
    cc.put_many("ns", objs, Durability::Memory).await.unwrap();
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 100);
    assert_eq!(cc.delete("ns", vec![chain[60].clone()]).await.unwrap(), 1);
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 60);

    assert_eq!(cc.delete("ns", ks[..50].to_vec()).await.unwrap(), 50);
    let got = cc.get_many("ns", ks.clone()).await.unwrap();
    assert!(got[..50].iter().all(Option::is_none) && intact(&got[50..], &ks[50..]));

    // Only n2 now, which holds nothing: the rest are read from n0 and n1.
    tx.send_replace(info[2..].to_vec());
    let got = cc.get_many("ns", ks[50..].to_vec()).await.unwrap();
    assert!(intact(&got, &ks[50..]), "read from the previous owners");
    assert_eq!(cc.handoff_reads(), 50);
    assert_eq!(cc.exists_prefix("ns", chain.clone()).await.unwrap().len(), 60);
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// A chain in a namespace with replication 2 over three nodes, the first
/// owner of some of its keys down: each of those keys is asked of its own
/// next owner, so the whole chain is reported, and a hole still cuts it.
/// (They were all asked of the next owner of the first one, which lacks
/// those whose next owner is the third node: the prefix came back short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_asks_each_key_of_its_own_next_owner_when_the_first_is_down() {
    let (_dirs, mut nodes, info) = plain_nodes(3).await;
    let cc = ClusterClient::fixed(info.clone(), ClientOptions::default());
    cc.set_replication("dup", 2).unwrap();
    let chain = keys("rchain", 64);
    let objs: Vec<PutObject> = chain.iter().map(|k| PutObject::new(k.clone(), vec![5u8; 16])).collect();
    cc.put_many("dup", objs, Durability::Memory).await.unwrap();
    assert_eq!(cc.exists_prefix("dup", chain.clone()).await.unwrap().len(), 64);
    let p = Placement::new(info.iter().map(|m| (m.id.clone(), 1.0))).unwrap();
    let next_owners: std::collections::BTreeSet<&str> = chain
        .iter()
        .map(|k| p.owners("dup", k, 2))
        .filter(|os| os[0] == "n0")
        .map(|os| os[1])
        .collect();
    assert_eq!(next_owners.len(), 2, "n0's keys have both other nodes as next owner");

    let (n0, _) = nodes.remove(0);
    n0.shutdown().await;
    assert_eq!(
        cc.exists_prefix("dup", chain.clone()).await.unwrap().len(),
        64,
        "each key found at its own next owner"
    );
    // A hole at the last key n0 owned (gone from its survivor) cuts it there.
    let hole = chain.iter().rposition(|k| p.owners("dup", k, 2)[0] == "n0").unwrap();
    assert!(hole > 32, "{hole}");
    for (_, c) in &nodes {
        c.delete("dup", vec![chain[hole].clone()]).await.unwrap();
    }
    assert_eq!(cc.exists_prefix("dup", chain.clone()).await.unwrap().len(), hole);
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// A TCP relay on a loopback port to `upstream`: what comes back from it
/// is passed on at most `rate` bytes a second, and nothing moves either
/// way while `stalled` is set.
struct Relay {
    addr: std::net::SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(upstream: std::net::SocketAddr, rate: f64) -> Relay {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        rate: f64,
        stalled: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            while stalled.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if rate.is_finite() {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate)).await;
            }
        }
        let _ = to.shutdown().await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(AtomicBool::new(false));
    let st = stalled.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::join!(pipe(dr, uw, f64::INFINITY, st.clone()), pipe(ur, dw, rate, st));
            });
        }
    });
    Relay { addr, stalled }
}

/// A previous owner whose object takes longer than
/// `PREVIOUS_OWNER_TIMEOUT` to arrive (3 MiB through a relay passing
/// 1 MiB/s) still delivers it: the timeout bounds its first answer, not the
/// transfer (it was cut off at 1 s, and the object read as missing). And a
/// previous owner that did not answer at all (the relay stalled) is asked
/// again after `PREVIOUS_OWNER_BACKOFF`, not only after the next membership
/// change (until then its objects read as missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_previous_owner_is_read_whole_and_a_silent_one_asked_again_soon() {
    use kvfabric::cluster_client::{PREVIOUS_OWNER_BACKOFF, PREVIOUS_OWNER_TIMEOUT};
    let (_dirs, nodes, info) = plain_nodes(2).await;
    let slow = relay(nodes[1].0.grpc_addr, f64::from(1u32 << 20)).await;
    let old = NodeInfo {
        id: "old".into(),
        endpoint: format!("http://{}", slow.addr),
        weight: 1.0,
    };
    let (tx, rx) = tokio::sync::watch::channel(vec![old]);
    let cc = ClusterClient::new(rx, ClientOptions::default());
    // On the old owner (through its own connection, not the relay).
    let big = common::payload(1, 3 << 20);
    let old_client = &nodes[1].1;
    old_client
        .put("ns", "big", big.clone(), Durability::Memory)
        .await
        .unwrap();
    // Now n0 alone owns everything; it knows the namespace but lacks these.
    tx.send_replace(vec![info[0].clone()]);
    cc.put("ns", "other", "x", Durability::Memory).await.unwrap();

    let started = Instant::now();
    let got = cc.get("ns", "big").await.unwrap();
    assert_eq!(got.expect("read from the previous owner").value, big);
    let took = started.elapsed();
    assert!(
        took > PREVIOUS_OWNER_TIMEOUT,
        "the transfer outlasted the timeout: {took:?}"
    );
    assert_eq!(cc.handoff_reads(), 1);

    // Silent for a moment: the read misses, and the old owner is skipped...
    old_client.put("ns", "later", "v", Durability::Memory).await.unwrap();
    slow.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(cc.get("ns", "later").await.unwrap().is_none());
    slow.stalled.store(false, std::sync::atomic::Ordering::Relaxed);
    // ...for the back-off, then asked again (same membership).
    let deadline = Instant::now() + PREVIOUS_OWNER_BACKOFF + Duration::from_secs(20);
    loop {
        if let Some(o) = cc.get("ns", "later").await.unwrap() {
            assert_eq!(o.value, "v");
            break;
        }
        assert!(Instant::now() < deadline, "the previous owner was never asked again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cc.handoff_reads(), 2);
    for (h, _) in nodes {
        h.shutdown().await;
    }
}

/// The same through a node, in a cluster whose repair is throttled to a
/// byte a second (it hands off one batch of 256 objects per destination,
/// then waits for hours): after a node
/// drains, reads sent to another node of objects it now owns but does not
/// hold yet are answered from the draining node; after a node joins,
/// reads of objects the newcomer now owns are answered from their previous
/// owners. None is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_read_objects_not_handed_off_yet_from_their_previous_owners() {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let settings = |i: usize| {
        let mut s = node_settings(dirs[i].path(), &etcd, "h", &format!("n{i}"), 30);
        s.cluster.repair_bytes_per_s = kvfabric::server::ByteSize(1);
        s
    };
    let (a, ca) = common::start(settings(0)).await;
    let (_b, cb) = common::start(settings(1)).await;
    let (_c, _cc) = common::start(settings(2)).await;
    let m = watch(&etcd, "h").await;
    m.wait_for(Duration::from_secs(10), |m| {
        (0..3).all(|i| serving(m, &format!("n{i}")))
    })
    .await
    .unwrap_or_else(|last| panic!("the nodes never served: {last:?}"));
    let ks = keys("obj", 2000);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(3))).collect();
    ca.put_many("ns", objs, Durability::Memory).await.unwrap();
    let placed = |ids: &[usize]| Placement::new(ids.iter().map(|i| (format!("n{i}"), 1.0))).unwrap();
    let owner = |p: &Placement, k: &Bytes| p.owners("ns", k, 1)[0].to_string();
    let (p012, p02, p023) = (placed(&[0, 1, 2]), placed(&[0, 2]), placed(&[0, 2, 3]));
    // Reads through n0 until its own view has caught up and for a while after.
    let read_all = |what: &'static str| {
        let (ca, ks) = (ca.clone(), ks.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let got = ca.get_many("ns", ks.clone()).await.unwrap();
                let missing = got.iter().filter(|g| g.is_none()).count();
                assert_eq!(missing, 0, "{what}: {missing} of 2000 missed");
                assert!(
                    ks.iter()
                        .zip(&got)
                        .all(|(k, g)| g.as_ref().unwrap().value == k.repeat(3))
                );
                assert_eq!(ca.exists_prefix("ns", ks.clone()).await.unwrap().len(), 2000, "{what}");
                if Instant::now() > deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };

    // n1 drains: n0 now owns some of n1's objects, which it does not hold.
    let to_n0 = ks
        .iter()
        .filter(|k| owner(&p012, k) == "n1" && owner(&p02, k) == "n0")
        .count();
    assert!(to_n0 > 100, "{to_n0} of n1's objects move to n0");
    cb.drain("n1").await.unwrap();
    m.wait_for(Duration::from_secs(10), |m| !serving(m, "n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 never left the serving set: {last:?}"));
    read_all("after n1 drained").await;
    // Only keys n0 owns now: n0 must not answer them from its own store.
    let mine: Vec<Bytes> = ks.iter().filter(|k| owner(&p02, k) == "n0").cloned().collect();
    let got = ca.get_many("ns", mine.clone()).await.unwrap();
    let missing = got.iter().filter(|g| g.is_none()).count();
    assert_eq!(missing, 0, "{missing} of n0's {} missed", mine.len());
    assert_eq!(ca.exists_prefix("ns", mine.clone()).await.unwrap().len(), mine.len());
    let body = common::http_get(a.metrics_addr, "/metrics").await;
    let handoff: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("kvfabric_handoff_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handoff_reads_total in {body}"));
    assert!(handoff > 0, "n0 counted the reads its previous owners answered");

    // n3 joins (empty): what it now owns is with its previous owners.
    let to_n3 = ks
        .iter()
        .filter(|k| owner(&p023, k) == "n3" && owner(&p02, k) != "n1")
        .count();
    assert!(to_n3 > 100, "n3 owns {to_n3} objects");
    let (_d, _cd) = common::start(settings(3)).await;
    m.wait_for(Duration::from_secs(10), |m| serving(m, "n3"))
        .await
        .unwrap_or_else(|last| panic!("n3 never served: {last:?}"));
    read_all("after n3 joined").await;

    // Repair has handed over one batch at most: the hand-off is reported
    // pending everywhere, so nothing stops asking the earlier owners.
    assert_eq!(kvfabric::cluster::settled_epoch(&m.snapshot()), 0);
    assert_eq!(ca.members().await.unwrap().settled_epoch, 0);
    assert_eq!(metric(a.metrics_addr, "kvfabric_handoff_pending").await, 1);
    let out = cluster_cli("status", &etcd, "h").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hand-off pending on "), "{text}");
}

/// One sample of a node's metrics (the first line starting with `name `).
async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let body = common::http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// Once every node's repair pass has left all it holds at its owners after
/// a join, the members report the hand-off done (member records, the
/// `Members` call, `kvfabric_handoff_pending`, `cluster status`), and
/// clients stop asking the earlier owners, long before the window closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_hand_off_is_reported_and_ends_reads_from_earlier_owners() {
    use kvfabric::cluster::{settled_epoch, unsettled_members};
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let settings = |i: usize| {
        let mut s = node_settings(dirs[i].path(), &etcd, "s", &format!("n{i}"), 30);
        s.cluster.repair_interval_ms = 300;
        // Records are rewritten as soon as `settled` changes, not at the
        // next refresh: a minute would outlast every wait below.
        s.cluster.refresh_interval_ms = 60_000;
        s
    };
    let (a, ca) = common::start(settings(0)).await;
    let (_b, _cb) = common::start(settings(1)).await;
    let m = watch(&etcd, "s").await;
    m.wait_for(Duration::from_secs(10), |m| {
        serving(m, "n0") && serving(m, "n1") && settled_epoch(m) != 0
    })
    .await
    .unwrap_or_else(|last| panic!("two idle nodes never settled: {last:?}"));
    let ks = keys("obj", 600);
    let objs: Vec<PutObject> = ks.iter().map(|k| PutObject::new(k.clone(), k.repeat(3))).collect();
    ca.put_many("ns", objs, Durability::Memory).await.unwrap();
    let dc = ClusterClient::discover(vec![a.endpoint()], ClientOptions::default(), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(!dc.handoff_pending());

    // n2 joins: it takes its share from n0 and n1.
    let (_c, cc) = common::start(settings(2)).await;
    let done = m
        .wait_for(Duration::from_secs(10), |m| serving(m, "n2") && settled_epoch(m) != 0)
        .await
        .unwrap_or_else(|last| {
            let waiting: Vec<_> = unsettled_members(&last).iter().map(|r| r.node_id.clone()).collect();
            panic!("the hand-off was never reported done (waiting on {waiting:?}): {last:?}")
        });
    assert_eq!(done.len(), 3);
    let epoch = settled_epoch(&done);
    // Every node's view follows: Members, the metric, the discovered client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answered = ca.members().await.unwrap().settled_epoch;
        let pending = metric(a.metrics_addr, "kvfabric_handoff_pending").await;
        if answered == epoch && pending == 0 && !dc.handoff_pending() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n0 answers {answered} (want {epoch}), pending {pending}, discovered client pending {}",
            dc.handoff_pending()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The data really moved: n2 holds its share, and every read is served
    // by the current owners.
    let n2_objects = cc.stats().await.unwrap().tiers.iter().map(|t| t.objects).sum::<u64>();
    assert!(n2_objects > 100, "n2 holds {n2_objects} objects");
    let before = dc.handoff_reads();
    let got = dc.get_many("ns", ks.clone()).await.unwrap();
    assert!(
        ks.iter()
            .zip(&got)
            .all(|(k, g)| g.as_ref().is_some_and(|o| o.value == k.repeat(3)))
    );
    assert_eq!(dc.handoff_reads(), before, "nothing read from an earlier owner");
    let got = ca.get_many("ns", ks.clone()).await.unwrap();
    assert!(got.iter().all(Option::is_some));
    let out = cluster_cli("status", &etcd, "s").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cluster s: 3 node(s), 0 under-replicated object(s), hand-off done"),
        "{text}"
    );
}

/// A namespace made by a first commit on the zero-copy local path is claimed
/// cluster-wide like one made by a gRPC put: another tenant cannot take the
/// name through a node that has not seen it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_path_commit_claims_its_namespace_cluster_wide() {
    use kvfabric::client::{LocalClient, LocalPut};
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut sa = node_settings(dirs[0].path(), &etcd, "lc", "a", 30);
    sa.local.enabled = true;
    let (a, _ca) = common::start(sa).await;
    let (b, cb) = common::start(node_settings(dirs[1].path(), &etcd, "lc", "b", 30)).await;
    wait_view(&a, 2).await;
    let view = wait_view(&b, 2).await;
    let placement = Placement::new(view.iter().map(|n| (n.id.clone(), n.weight))).unwrap();
    let owned_by_b = keys("lc", 64)
        .into_iter()
        .find(|k| placement.owners("lclaim", k, 1)[0] == "b")
        .unwrap();

    let local = LocalClient::connect_as(a.local_socket.as_ref().unwrap(), "t1")
        .await
        .unwrap();
    local
        .put_many("lclaim", &[LocalPut::new(b"k", b"v")], Durability::Memory)
        .await
        .unwrap();
    let err = cb
        .clone()
        .with_tenant("t2")
        .put_many(
            "lclaim",
            vec![PutObject::new(owned_by_b.clone(), "x")],
            Durability::Memory,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), kvfabric::ErrorKind::PermissionDenied, "{err}");
    cb.clone()
        .with_tenant("t1")
        .put_many("lclaim", vec![PutObject::new(owned_by_b, "y")], Durability::Memory)
        .await
        .unwrap();
    drop(local);
    a.shutdown().await;
    b.shutdown().await;
}

/// `kvfabric serve` as node `n1` of cluster `c` over `dir`'s data directory
/// and config file.
fn serve_n1(dir: &Path, etcd: &Etcd) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfabric"));
    c.arg("serve")
        .arg("--config")
        .arg(dir.join("kvfabric.toml"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--host-capacity", "8MiB", "--disk-capacity", "0"])
        .args(["--cluster", &etcd.url(), "--cluster-id", "c", "--node-id", "n1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Proc(c.spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_within_its_lease_ttl_joins_and_a_live_twin_is_refused() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kvfabric.toml"),
        "[cluster]\nlease-ttl-s = 3\nrefresh-interval-ms = 200\n",
    )
    .unwrap();
    let mut first = serve_n1(dir.path(), &etcd);
    let m = watch(&etcd, "c").await;
    let snap = m
        .wait_for(Duration::from_secs(20), |m| serving(m, "n1"))
        .await
        .unwrap_or_else(|last| panic!("n1 never served: {last:?}"));
    let old = snap["n1"].incarnation.clone();

    // kill -9, then started again at once (as a supervisor would): the old
    // record is still there, under a lease nobody renews.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let mut second = serve_n1(dir.path(), &etcd);
    assert_eq!(
        m.snapshot()["n1"].incarnation,
        old,
        "the old record went before the restart"
    );
    let r = m
        .wait_for(Duration::from_secs(20), |m| {
            m.get("n1")
                .is_some_and(|r| r.state == MemberState::Serving && r.incarnation != old)
        })
        .await;
    let exited = second.0.try_wait().unwrap();
    assert!(
        exited.is_none(),
        "the restarted node exited ({exited:?}) instead of waiting for the old lease"
    );
    r.unwrap_or_else(|last| panic!("the restarted node never served: {last:?}"));
    let new = m.snapshot()["n1"].incarnation.clone();

    // A second live process with the same id is still refused, and the
    // running one keeps its record.
    let twin = tempfile::tempdir().unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        Node::build(node_settings(twin.path(), &etcd, "c", "n1", 3))
            .await
            .unwrap()
            .start(),
    )
    .await
    .expect("a live twin is refused within 20 s")
    .unwrap_err()
    .to_string();
    assert!(err.contains("node id \"n1\" is already registered"), "{err}");
    assert_eq!(m.snapshot()["n1"].incarnation, new);
    assert!(second.0.try_wait().unwrap().is_none(), "the running node exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_after_joining_revokes_its_lease() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The tombstone file is read after the node joined: a directory in its
    // place fails the start there.
    std::fs::create_dir_all(dir.path().join("tombstones")).unwrap();
    // A long TTL: a record gone at once was revoked, not expired.
    let err = Node::build(node_settings(dir.path(), &etcd, "c", "f", 60))
        .await
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("loading tombstones"), "{err}");
    let left = list_members(&etcd.target(), "c").await.unwrap();
    assert!(left.is_empty(), "the failed start left its record: {left:?}");

    // Fixed, it starts (no earlier record to wait out).
    std::fs::remove_dir(dir.path().join("tombstones")).unwrap();
    let (h, _c) = common::start(node_settings(dir.path(), &etcd, "c", "f", 60)).await;
    let snap = watch(&etcd, "c").await.snapshot();
    assert!(snap.contains_key("f"), "{snap:?}");
    h.shutdown().await;
}

/// A stray key deeper under the members prefix (written by hand, another
/// tool) is not a member record: putting or deleting it does not touch the
/// live member whose id its last segment happens to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_key_under_the_members_prefix_leaves_members_alone() {
    let etcd = Etcd::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // a does not rewrite its record meanwhile (which would hide a removal).
    let mut sa = node_settings(da.path(), &etcd, "sk", "a", 30);
    sa.cluster.refresh_interval_ms = 600_000;
    let (a, _) = common::start(sa).await;
    wait_view(&a, 1).await;
    let m = watch(&etcd, "sk").await;
    let mut nodes = m.serving_nodes();
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let stray = format!("{}/a", kvfabric::cluster::member_key("sk", "x"));
    etc.put(stray.clone(), "junk", None).await.unwrap();
    etc.delete(stray, None).await.unwrap();
    // A later change, seen after the stray key's events: the watcher then
    // lists both nodes, a included.
    let (b, _) = common::start(node_settings(db.path(), &etcd, "sk", "b", 30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes.borrow().iter().any(|n| n.id == "b") {
        assert!(Instant::now() < deadline, "never saw b: {:?}", *nodes.borrow());
        let _ = tokio::time::timeout(Duration::from_millis(200), nodes.changed()).await;
    }
    let seen: Vec<String> = nodes.borrow().iter().map(|n| n.id.clone()).collect();
    assert_eq!(seen, ["a", "b"]);
    b.shutdown().await;
    a.shutdown().await;
}

/// The cluster's record of a namespace names another tenant than the one
/// whose objects a node holds in it (the name was taken elsewhere while
/// this node knew it on its own, during an etcd outage say): the node
/// drops those objects before the new owner may use the name, so the new
/// owner never reads the old owner's data, and the old owner is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_handed_to_another_tenant_is_emptied_first() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (h, c) = common::start(node_settings(dir.path(), &etcd, "reassign", "n", 30)).await;
    wait_view(&h, 1).await;
    let a = c.clone().with_tenant("alice");
    let ks = keys("r", 8);
    for (i, k) in ks.iter().enumerate() {
        a.put("n1", k.clone(), common::payload(i as u64, 4096), Durability::Memory)
            .await
            .unwrap();
    }
    // The record now names bob (written as another node would have, had
    // bob claimed the name while this node could not reach etcd).
    let rec = kvfabric::cluster::NamespaceRecord {
        name: "n1".into(),
        owner: "bob".into(),
        replication: 1,
        updated_at_ms: 0,
    };
    let mut etc = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    etc.put(kvfabric::cluster::namespace_key("reassign", "n1"), rec.encode(), None)
        .await
        .unwrap();
    let b = c.clone().with_tenant("bob");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.get_many("n1", ks.clone()).await {
            Ok(got) => {
                assert!(got.iter().all(Option::is_none), "bob read alice's objects");
                break;
            }
            // Before the watch delivers the record: alice's; meanwhile:
            // closed while the node drops them.
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    kvfabric::ErrorKind::PermissionDenied | kvfabric::ErrorKind::Unavailable
                ),
                "{e}"
            ),
        }
        assert!(Instant::now() < deadline, "the namespace was never handed to bob");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = a.get("n1", ks[0].clone()).await.unwrap_err();
    assert_eq!(e.kind(), kvfabric::ErrorKind::PermissionDenied, "{e}");
    assert_eq!(h.stack.len(), 0, "alice's objects are gone from the node");
    b.put("n1", ks[0].clone(), common::payload(99, 10), Durability::Memory)
        .await
        .unwrap();
    h.shutdown().await;
}

/// A namespace first written while etcd is down is known on that node
/// only; once etcd is back the node claims it cluster-wide for its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_made_during_an_etcd_outage_is_claimed_afterwards() {
    let mut etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (h, c) = common::start(node_settings(dir.path(), &etcd, "late", "n", 5)).await;
    wait_view(&h, 1).await;
    etcd.kill();
    let a = c.clone().with_tenant("alice");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        a.put("outage-ns", &b"k"[..], common::payload(1, 100), Durability::Memory),
    )
    .await
    .expect("a put while etcd is down does not hang");
    r.unwrap();
    etcd.spawn().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(recs) = kvfabric::cluster::list_namespaces(&etcd.target(), "late").await
            && let Some(r) = recs.iter().find(|r| r.name == "outage-ns")
        {
            assert_eq!(r.owner, "alice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace made during the outage was never claimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        a.get("outage-ns", &b"k"[..]).await.unwrap().unwrap().value,
        common::payload(1, 100)
    );
    h.shutdown().await;
}
