//! TLS (`[tls]`) against real nodes on loopback, with a throw-away CA made
//! by `openssl`: a TLS node serves clients that trust its CA and no one
//! else (plain HTTP/2, no CA, another CA); with `client-ca-file` it also
//! wants a client certificate; the CLI takes `--ca-file`; and a cluster on
//! a real etcd registers `https://` endpoints and forwards over TLS, nodes
//! presenting their own certificates to each other.

mod common;

use bytes::Bytes;
use common::{payload, settings};
use kvfabric::ErrorKind;
use kvfabric::client::{Client, ClientOptions, Durability, PutObject};
use kvfabric::server::{Node, NodeHandle, Settings};
use kvfabric::testutil::write_test_certificates;
use kvfabric::tls::ClientTls;
use std::path::Path;
use std::time::{Duration, Instant};

fn tls_settings(data: &Path, certs: &Path) -> Settings {
    let mut s = settings(data, 8 << 20, 0);
    s.local.enabled = false;
    s.tls.cert_file = Some(certs.join("server.pem"));
    s.tls.key_file = Some(certs.join("server.key"));
    s
}

async fn node(s: Settings) -> NodeHandle {
    Node::build(s)
        .await
        .expect("node builds")
        .start()
        .await
        .expect("node starts")
}

fn trusting(certs: &Path, client_cert: bool) -> ClientOptions {
    let (c, k) = (certs.join("client.pem"), certs.join("client.key"));
    let tls = if client_cert {
        ClientTls::from_files(&certs.join("ca.pem"), Some(&c), Some(&k))
    } else {
        ClientTls::from_files(&certs.join("ca.pem"), None, None)
    };
    ClientOptions {
        tls: Some(tls.unwrap()),
        ..Default::default()
    }
}

/// A call's outcome, bounded: a refused TLS handshake must fail, not hang.
async fn stats(c: Result<Client, kvfabric::client::ClientError>) -> Result<(), String> {
    let c = c.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), c.stats())
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_serves_only_clients_that_trust_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, other) = (dir.path().join("certs"), dir.path().join("other"));
    for d in [&certs, &other] {
        std::fs::create_dir_all(d).unwrap();
        write_test_certificates(d);
    }
    let h = node(tls_settings(&dir.path().join("data"), &certs)).await;
    assert!(h.endpoint().starts_with("https://127.0.0.1:"), "{}", h.endpoint());

    let c = Client::connect_with(h.endpoint(), trusting(&certs, false))
        .await
        .unwrap();
    c.put("ns", &b"k"[..], payload(1, 300_000), Durability::Memory)
        .await
        .unwrap();
    assert_eq!(
        c.get("ns", &b"k"[..]).await.unwrap().unwrap().value,
        payload(1, 300_000)
    );
    // No scheme: https:// when a CA is given.
    let bare = h.endpoint().trim_start_matches("https://").to_string();
    stats(Client::connect_with(bare, trusting(&certs, false)).await)
        .await
        .unwrap();

    // https:// without a CA is refused before connecting.
    let e = Client::connect(h.endpoint()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("CA"), "{e}");
    // Given a CA, a client never falls back to plain text.
    let e = Client::connect_with(format!("http://{}", h.grpc_addr), trusting(&certs, false))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // Plain HTTP/2 to the TLS port, and TLS trusting another CA, fail.
    let plain = format!("http://{}", h.grpc_addr);
    assert!(stats(Client::connect(plain).await).await.is_err());
    assert!(
        stats(Client::connect_with(h.endpoint(), trusting(&other, false)).await)
            .await
            .is_err()
    );
    // What was stored is intact.
    assert_eq!(
        c.get("ns", &b"k"[..]).await.unwrap().unwrap().value,
        payload(1, 300_000)
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_the_node_wants_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    write_test_certificates(&certs);
    let mut s = tls_settings(&dir.path().join("data"), &certs);
    s.tls.client_ca_file = Some(certs.join("ca.pem"));
    let h = node(s).await;
    assert!(
        stats(Client::connect_with(h.endpoint(), trusting(&certs, false)).await)
            .await
            .is_err()
    );
    stats(Client::connect_with(h.endpoint(), trusting(&certs, true)).await)
        .await
        .unwrap();

    // The CLI: --ca-file and a client certificate.
    let cli = |extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kvfabric"));
        c.args(["stats", "--endpoint", &h.endpoint()]).args(extra);
        c
    };
    let (ca, cc, ck) = (certs.join("ca.pem"), certs.join("client.pem"), certs.join("client.key"));
    let (ca, cc, ck) = (ca.to_str().unwrap(), cc.to_str().unwrap(), ck.to_str().unwrap());
    let run = |mut c: std::process::Command| async move {
        tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap()
    };
    let ok = run(cli(&["--ca-file", ca, "--client-cert", cc, "--client-key", ck])).await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let no_ca = run(cli(&[])).await;
    assert_eq!(no_ca.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("--ca-file"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_node_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    write_test_certificates(&certs);
    let base = settings(&dir.path().join("data"), 8 << 20, 0);
    let mut s = base.clone();
    s.tls.cert_file = Some(certs.join("server.pem"));
    assert!(s.validate().unwrap_err().contains("go together"));
    let mut s = tls_settings(&dir.path().join("data"), &certs);
    s.tls.key_file = Some(certs.join("server.pem")); // a certificate, not a key
    let e = Node::build(s).await.unwrap_err().to_string();
    assert!(e.contains("tls.key-file") && e.contains("PRIVATE KEY"), "{e}");
    let mut s = base.clone();
    s.tls.ca_file = Some(certs.join("ca.pem"));
    assert!(s.validate().unwrap_err().contains("need tls.cert-file"));
    let mut s = tls_settings(&dir.path().join("data"), &certs);
    s.cluster.etcd = Some("etcd://127.0.0.1:1".into());
    assert!(s.validate().unwrap_err().contains("tls.ca-file"));
}

/// Two TLS nodes on a real etcd, each requiring client certificates:
/// they register `https://` endpoints, a cluster client that trusts the CA
/// reaches every object through either node, and forwarding between them
/// works with each node presenting its own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_forwards_between_its_nodes() {
    let etcd = kvfabric::testutil::Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    write_test_certificates(&certs);
    let cluster_node = |id: &str| {
        let mut s = tls_settings(&dir.path().join(id), &certs);
        s.node_id = id.into();
        s.cluster.etcd = Some(etcd.url());
        s.cluster.id = "tlsc".into();
        s.cluster.refresh_interval_ms = 200;
        s.tls.client_ca_file = Some(certs.join("ca.pem"));
        s.tls.ca_file = Some(certs.join("ca.pem"));
        s
    };
    let a = node(cluster_node("a")).await;
    let b = node(cluster_node("b")).await;
    for h in [&a, &b] {
        let mut view = h.serving_nodes().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while view.borrow().len() != 2 {
            assert!(Instant::now() < deadline, "{} never saw both nodes", h.endpoint());
            let _ = tokio::time::timeout(Duration::from_millis(200), view.changed()).await;
        }
        assert!(view.borrow().iter().all(|n| n.endpoint.starts_with("https://")));
    }
    let keys: Vec<Bytes> = (0..64u32).map(|i| Bytes::from(format!("k{i}"))).collect();
    let objects = keys
        .iter()
        .enumerate()
        .map(|(i, k)| PutObject::new(k.clone(), payload(i as u64, 2000)))
        .collect();
    // Through node a with a plain client: a forwards what b owns.
    let ca = Client::connect_with(a.endpoint(), trusting(&certs, true))
        .await
        .unwrap();
    ca.put_many("ns", objects, Durability::Memory).await.unwrap();
    let cb = Client::connect_with(b.endpoint(), trusting(&certs, true))
        .await
        .unwrap();
    let got = cb.get_many("ns", keys.clone()).await.unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.as_ref().map(|o| &o.value), Some(&payload(i as u64, 2000)), "key {i}");
    }
    // A cluster client placing requests itself, found through one node.
    let cc =
        kvfabric::client::ClusterClient::discover(vec![a.endpoint()], trusting(&certs, true), Duration::from_secs(60))
            .await
            .unwrap();
    assert!(
        cc.get_many("ns", keys.clone())
            .await
            .unwrap()
            .iter()
            .all(Option::is_some)
    );
    for h in [b, a] {
        h.shutdown().await;
    }
}
