//! Authentication (`[auth]`) against real nodes on loopback: calls without
//! a token or with an unknown one are UNAUTHENTICATED; a tenant token acts
//! only for its tenant, cannot send forwarded requests or drain, and sees
//! only its namespaces in Stats; the local path needs a token that grants
//! it; a rotated tokens file is reloaded; the CLI sends `--token-file`; and
//! in a cluster on a real etcd the nodes forward to each other with the
//! node token.

mod common;

use bytes::Bytes;
use common::{http_get, payload, settings, start};
use kvfabric::ErrorKind;
use kvfabric::auth::Token;
use kvfabric::client::{Client, ClientError, ClientOptions, Durability, LocalClient, LocalPut};
use kvfabric::local::LocalOptions;
use kvfabric::proto::v1::{LocateRequest, ObjectBegin, PutOpen, PutRequest, put_request::Msg};
use kvfabric::server::NodeHandle;
use kvfabric::server::auth::{new_token, token_sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn entry(tenant: &str, t: &Token, extra: &str) -> String {
    format!(
        "[[token]]\ntenant = {tenant:?}\nsha256 = {:?}\n{extra}\n",
        token_sha256(t)
    )
}

struct Tokens {
    acme: Token,
    globex: Token,
    ops: Token,
    engine: Token,
    file: PathBuf,
}

fn tokens(dir: &Path) -> Tokens {
    let t = Tokens {
        acme: new_token(),
        globex: new_token(),
        ops: new_token(),
        engine: new_token(),
        file: dir.join("tokens.toml"),
    };
    let text = entry("acme", &t.acme, "")
        + &entry("globex", &t.globex, "")
        + &entry("ops", &t.ops, "admin = true\nname = \"ops-cli\"")
        + &entry("acme", &t.engine, "local = true\nname = \"acme-vllm\"");
    std::fs::write(&t.file, text).unwrap();
    t
}

async fn client(node: &NodeHandle, token: Option<&Token>, tenant: &str) -> Client {
    let o = ClientOptions {
        token: token.cloned(),
        ..Default::default()
    };
    Client::connect_with(node.endpoint(), o)
        .await
        .unwrap()
        .with_tenant(tenant)
}

fn kind<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorKind, String) {
    let e = r.expect_err("expected an error");
    (e.kind(), e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_confine_callers_to_their_tenant_and_role() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(dir.path());
    let mut s = settings(&dir.path().join("data"), 8 << 20, 0);
    s.auth.tokens_file = Some(t.file.clone());
    let (node, anon) = start(s).await;

    // No token, an unknown one, a digest in place of the token.
    for r in [
        kind(anon.put("ns", &b"k"[..], payload(1, 100), Durability::Memory).await),
        kind(anon.stats().await),
        kind(anon.members().await),
        kind(
            client(&node, Some(&new_token()), "acme")
                .await
                .get("ns", &b"k"[..])
                .await,
        ),
        kind(
            client(&node, Some(&Token::new(token_sha256(&t.acme)).unwrap()), "acme")
                .await
                .stats()
                .await,
        ),
    ] {
        assert_eq!(r.0, ErrorKind::Unauthenticated, "{}", r.1);
    }
    assert!(kind(anon.stats().await).1.contains("send a token"));

    // A tenant's token works for its tenant, and only for it.
    let acme = client(&node, Some(&t.acme), "acme").await;
    acme.put("docs", &b"k1"[..], payload(1, 5000), Durability::Memory)
        .await
        .unwrap();
    assert_eq!(
        acme.get("docs", &b"k1"[..]).await.unwrap().unwrap().value,
        payload(1, 5000)
    );
    let globex = client(&node, Some(&t.globex), "globex").await;
    globex
        .put("plans", &b"k"[..], payload(2, 100), Durability::Memory)
        .await
        .unwrap();
    for (c, what) in [
        (client(&node, Some(&t.acme), "globex").await, "another tenant"),
        (client(&node, Some(&t.acme), "default").await, "the default tenant"),
    ] {
        let (k, m) = kind(c.get("plans", &b"k"[..]).await);
        assert_eq!(k, ErrorKind::PermissionDenied, "{what}: {m}");
        assert!(m.contains("acts for tenant \"acme\""), "{m}");
        let (k, _) = kind(c.put("plans", &b"x"[..], payload(3, 10), Durability::Memory).await);
        assert_eq!(k, ErrorKind::PermissionDenied, "{what}");
    }
    // globex's object is untouched.
    assert_eq!(
        globex.get("plans", &b"k"[..]).await.unwrap().unwrap().value,
        payload(2, 100)
    );

    // A request naming no tenant acts for the token's.
    let unnamed = client(&node, Some(&t.acme), "").await;
    assert_eq!(
        unnamed.get("docs", &b"k1"[..]).await.unwrap().unwrap().value,
        payload(1, 5000)
    );

    // `forwarded` from a tenant (a cluster client that placed the request
    // itself) stores here, but the age it claims is a node's privilege:
    // ignored, the object is new.
    let aged_put = |tenant: &str, key: &'static [u8]| {
        vec![
            PutRequest {
                msg: Some(Msg::Open(PutOpen {
                    tenant: tenant.into(),
                    namespace: "docs".into(),
                    durability: 0,
                    expected_objects: 1,
                    forwarded: true,
                })),
            },
            PutRequest {
                msg: Some(Msg::Begin(ObjectBegin {
                    key: Bytes::from_static(key),
                    length: 4,
                    layout: None,
                    checksum: None,
                    age_ms: Some(3_600_000),
                })),
            },
            PutRequest {
                msg: Some(Msg::Data(Bytes::from_static(b"aged"))),
            },
        ]
    };
    acme.raw()
        .put(futures::stream::iter(aged_put("acme", b"aged")))
        .await
        .unwrap();
    let age = |c: &Client, key: &'static [u8]| {
        let c = c.clone();
        async move {
            let l = c
                .raw()
                .locate(LocateRequest {
                    tenant: "acme".into(),
                    namespace: "docs".into(),
                    keys: vec![Bytes::from_static(key)],
                })
                .await
                .unwrap()
                .into_inner();
            l.locations[0].age_ms
        }
    };
    assert!(age(&acme, b"aged").await < 600_000, "a tenant backdated an object");
    // Stats: a tenant sees its namespaces, an admin every one.
    assert_eq!(acme.stats().await.unwrap().namespaces, vec!["docs".to_string()]);
    let ops = client(&node, Some(&t.ops), "ops").await;
    let mut all = ops.stats().await.unwrap().namespaces;
    all.sort();
    assert_eq!(all, vec!["docs".to_string(), "plans".to_string()]);
    // Drain: refused to a tenant; an admin gets past authorization (and is
    // told the node is not in a cluster).
    let (k, m) = kind(acme.drain("kvfabric-node").await);
    assert_eq!(k, ErrorKind::PermissionDenied, "{m}");
    let (k, m) = kind(ops.drain("kvfabric-node").await);
    assert_eq!(k, ErrorKind::FailedPrecondition, "{m}");

    // The local path: only a token that grants it, for its own tenant.
    let sock = node.local_socket.clone().unwrap();
    let local = |token: Option<&Token>, tenant: &str| {
        let o = LocalOptions {
            tenant: tenant.into(),
            token: token.cloned(),
            ..Default::default()
        };
        LocalClient::connect_with(sock.clone(), o)
    };
    assert_eq!(kind(local(None, "acme").await).0, ErrorKind::Unauthenticated);
    assert_eq!(
        kind(local(Some(&new_token()), "acme").await).0,
        ErrorKind::Unauthenticated
    );
    let (k, m) = kind(local(Some(&t.acme), "acme").await);
    assert_eq!(k, ErrorKind::PermissionDenied, "{m}");
    assert!(m.contains("local = true"), "{m}");
    assert_eq!(
        kind(local(Some(&t.engine), "globex").await).0,
        ErrorKind::PermissionDenied
    );
    let engine = local(Some(&t.engine), "acme").await.unwrap();
    let v = payload(4, 8192);
    engine
        .put_many("docs", &[LocalPut::new(b"k2", &v)], Durability::Memory)
        .await
        .unwrap();
    assert_eq!(acme.get("docs", &b"k2"[..]).await.unwrap().unwrap().value, v);

    // Every refusal is counted, by reason.
    let m = http_get(node.metrics_addr, "/metrics").await;
    for reason in ["missing", "unknown", "denied"] {
        let line = m
            .lines()
            .find(|l| l.starts_with(&format!("kvfabric_auth_failures_total{{reason=\"{reason}\"}}")))
            .unwrap_or_else(|| panic!("no {reason} count in\n{m}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0, "{line}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_tokens_file_is_reloaded_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(dir.path());
    let mut s = settings(&dir.path().join("data"), 8 << 20, 0);
    s.auth.tokens_file = Some(t.file.clone());
    s.auth.reload_interval_s = 1;
    let (node, _) = start(s).await;
    let old = client(&node, Some(&t.acme), "acme").await;
    old.stats().await.unwrap();
    // Sessions open with tokens about to go: an event stream, a put stream
    // (open sent, objects to come), a local-path connection.
    let mut events = old.subscribe(None).await.unwrap();
    let (ptx, prx) = tokio::sync::mpsc::channel::<PutRequest>(8);
    ptx.send(PutRequest {
        msg: Some(Msg::Open(PutOpen {
            tenant: "acme".into(),
            namespace: "docs".into(),
            durability: 0,
            expected_objects: 0,
            forwarded: false,
        })),
    })
    .await
    .unwrap();
    let put = tokio::spawn({
        let mut raw = old.raw();
        async move { raw.put(tokio_stream::wrappers::ReceiverStream::new(prx)).await }
    });
    let engine = LocalClient::connect_with(
        node.local_socket.clone().unwrap(),
        LocalOptions {
            tenant: "acme".into(),
            token: Some(t.engine.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    engine.reserve(&[4096]).await.unwrap();
    // Replace acme's token. The modification time is set past the old one:
    // two writes within the file system's granularity look unchanged.
    let fresh = new_token();
    let bump = |secs: u64| {
        let f = std::fs::File::options().write(true).open(&t.file).unwrap();
        let now = f.metadata().unwrap().modified().unwrap();
        f.set_modified(now + Duration::from_secs(secs)).unwrap();
    };
    std::fs::write(&t.file, entry("acme", &fresh, "")).unwrap();
    bump(5);
    let new = client(&node, Some(&fresh), "acme").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while new.stats().await.is_err() {
        assert!(Instant::now() < deadline, "the rotated token was never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kind(old.stats().await).0, ErrorKind::Unauthenticated);
    // What the removed tokens had open ends too.
    let e = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("the event stream ends")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    for m in [
        PutRequest {
            msg: Some(Msg::Begin(ObjectBegin {
                key: Bytes::from_static(b"late"),
                length: 4,
                layout: None,
                checksum: None,
                age_ms: None,
            })),
        },
        PutRequest {
            msg: Some(Msg::Data(Bytes::from_static(b"late"))),
        },
    ] {
        let _ = ptx.send(m).await;
    }
    let e = tokio::time::timeout(Duration::from_secs(10), put)
        .await
        .expect("the put stream ends")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = engine.reserve(&[4096]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(
        new.get("docs", &b"late"[..]).await.unwrap().is_none(),
        "a revoked stream stored"
    );
    // A broken file is refused and the tokens in use stay.
    std::fs::write(&t.file, "[[token]]\ntenant = \"acme\"\n").unwrap();
    bump(10);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = http_get(node.metrics_addr, "/metrics").await;
        if m.contains("kvfabric_auth_reloads_total{result=\"error\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "the broken file was never tried:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    new.stats().await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_auth_settings_stop_the_node_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(dir.path());
    let base = settings(&dir.path().join("data"), 8 << 20, 0);
    // A node-token file that is not one (here: the tokens file).
    let mut s = base.clone();
    s.auth.node_token_file = Some(t.file.clone());
    let e = kvfabric::server::Node::build(s).await.unwrap_err().to_string();
    assert!(e.contains("auth.node-token-file") && e.contains("line 1"), "{e}");
    let mut s = base.clone();
    s.auth.tokens_file = Some(dir.path().join("missing.toml"));
    let e = kvfabric::server::Node::build(s).await.unwrap_err().to_string();
    assert!(e.contains("missing.toml"), "{e}");
    let mut s = base.clone();
    s.auth.tokens_file = Some(t.file.clone());
    s.cluster.etcd = Some("etcd://127.0.0.1:1".into());
    let e = s.validate().unwrap_err();
    assert!(e.contains("auth.node-token-file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(dir.path());
    let mut s = settings(&dir.path().join("data"), 8 << 20, 0);
    s.auth.tokens_file = Some(t.file.clone());
    let (node, _) = start(s).await;
    let token_file = dir.path().join("acme.token");
    std::fs::write(&token_file, format!("{}\n", t.acme.secret())).unwrap();
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kvfabric"));
        c.args(args)
            .args(["--endpoint", &node.endpoint()])
            .env_remove("KVFABRIC_TOKEN")
            .env_remove("KVFABRIC_TOKEN_FILE");
        c
    };
    let tf = token_file.to_str().unwrap();
    let out = tokio::task::spawn_blocking({
        let mut c = cli(&["stats", "--tenant", "acme", "--token-file", tf]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::spawn_blocking({
        let mut c = cli(&["stats", "--tenant", "acme"]);
        c.env("KVFABRIC_TOKEN", t.acme.secret());
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::spawn_blocking({
        let mut c = cli(&["stats"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("send a token"));
    node.shutdown().await;
}

#[test]
fn auth_new_token_prints_a_token_and_the_entry_that_accepts_it() {
    let bin = env!("CARGO_BIN_EXE_kvfabric");
    let out = std::process::Command::new(bin)
        .args(["auth", "new-token", "--tenant", "acme", "--local"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (token, rest) = text.split_once('\n').unwrap();
    let token = Token::new(token).unwrap();
    assert!(
        rest.contains(&format!("sha256 = \"{}\"", token_sha256(&token))),
        "{rest}"
    );
    assert!(
        rest.contains("tenant = \"acme\"") && rest.contains("local = true"),
        "{rest}"
    );
    assert!(!rest.contains(token.secret()));
    // `auth hash` agrees.
    let mut child = std::process::Command::new(bin)
        .args(["auth", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", token.secret()).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), token_sha256(&token));
}

/// Two nodes on a real etcd that authenticate: a tenant's client reaches
/// every object through either node (the nodes forward to each other with
/// the node token), and a node holding another node token is refused by
/// its peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_forward_to_each_other_with_the_node_token() {
    let etcd = kvfabric::testutil::Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(dir.path());
    let node_token = dir.path().join("node.token");
    std::fs::write(&node_token, new_token().secret()).unwrap();
    let node = |id: &str, node_token: &Path| {
        let mut s = settings(&dir.path().join(id), 8 << 20, 0);
        s.local.enabled = false;
        s.node_id = id.into();
        s.cluster.etcd = Some(etcd.url());
        s.cluster.id = "authc".into();
        s.cluster.refresh_interval_ms = 200;
        s.auth.tokens_file = Some(t.file.clone());
        s.auth.node_token_file = Some(node_token.to_path_buf());
        s
    };
    let (a, _) = start(node("a", &node_token)).await;
    let (b, _) = start(node("b", &node_token)).await;
    for h in [&a, &b] {
        let mut view = h.serving_nodes().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while view.borrow().len() != 2 {
            assert!(Instant::now() < deadline, "{} never saw both nodes", h.endpoint());
            let _ = tokio::time::timeout(Duration::from_millis(200), view.changed()).await;
        }
    }
    let (ca, cb) = (
        client(&a, Some(&t.acme), "acme").await,
        client(&b, Some(&t.acme), "acme").await,
    );
    let keys: Vec<Bytes> = (0..64u32).map(|i| Bytes::from(format!("k{i}"))).collect();
    let objects = keys
        .iter()
        .enumerate()
        .map(|(i, k)| kvfabric::client::PutObject::new(k.clone(), payload(i as u64, 1000)))
        .collect();
    ca.put_many("docs", objects, Durability::Memory).await.unwrap();
    let got = cb.get_many("docs", keys.clone()).await.unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.as_ref().map(|o| &o.value), Some(&payload(i as u64, 1000)), "key {i}");
    }
    // A tenant's cluster client places requests itself (marked forwarded):
    // on a replicated namespace too, and its clear reaches every node.
    client(&a, Some(&t.acme), "acme")
        .await
        .create_namespace("shared", 2)
        .await
        .unwrap();
    let cc = kvfabric::client::ClusterClient::discover(
        vec![a.endpoint()],
        ClientOptions {
            token: Some(t.acme.clone()),
            ..Default::default()
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_tenant("acme");
    let objects = keys
        .iter()
        .enumerate()
        .map(|(i, k)| kvfabric::client::PutObject::new(k.clone(), payload(i as u64, 500)))
        .collect();
    cc.put_many("shared", objects, Durability::Memory).await.unwrap();
    let got = cc.get_many("shared", keys.clone()).await.unwrap();
    assert!(
        got.iter().all(Option::is_some),
        "replicated reads through the tenant's cluster client"
    );
    assert_eq!(
        cc.exists_prefix("shared", keys.clone()).await.unwrap().len(),
        keys.len()
    );
    // Members tells a tenant about its own namespaces only.
    client(&b, Some(&t.globex), "globex")
        .await
        .create_namespace("globex-only", 2)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = client(&a, Some(&t.ops), "ops").await.members().await.unwrap();
        if m.namespaces.iter().any(|n| n.namespace == "globex-only") {
            break;
        }
        assert!(Instant::now() < deadline, "a never learned globex's namespace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mine = client(&a, Some(&t.acme), "acme").await.members().await.unwrap();
    let names: Vec<&str> = mine.namespaces.iter().map(|n| n.namespace.as_str()).collect();
    assert_eq!(names, ["docs", "shared"], "acme learns only its own namespaces");
    assert_eq!(cc.clear("shared").await.unwrap(), 2 * keys.len() as u64);

    // Both nodes sent some of it to the other (64 keys over two owners).
    for h in [&a, &b] {
        let m = http_get(h.metrics_addr, "/metrics").await;
        assert!(
            m.lines()
                .any(|l| l.starts_with("kvfabric_forwarded_total{") && !l.ends_with(" 0")),
            "{} forwarded nothing:\n{m}",
            h.endpoint()
        );
    }
    // A third node with another node token: its forwards are refused.
    let other = dir.path().join("other.token");
    std::fs::write(&other, new_token().secret()).unwrap();
    let (c, _) = start(node("c", &other)).await;
    let mut view = c.serving_nodes().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.borrow().len() != 3 {
        assert!(Instant::now() < deadline, "c never saw the cluster");
        let _ = tokio::time::timeout(Duration::from_millis(200), view.changed()).await;
    }
    let cc = client(&c, Some(&t.acme), "acme").await;
    // Keys c does not own are read from a and b, which refuse its token.
    let r = cc.get_many("docs", keys.clone()).await;
    let e = r.expect_err("a node with the wrong node token is refused by its peers");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("same auth.node-token-file"), "{e}");
    for h in [c, b, a] {
        h.shutdown().await;
    }
}
