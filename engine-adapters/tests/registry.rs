//! `kvfabric-worker --cluster`: the real binary registers itself in a real
//! etcd's worker registry once serving (its URL and KV event endpoint, as
//! bound, and the id of the fabric node it uses), and removes itself on
//! SIGTERM; a prefill worker does not
//! register; a bad cluster setting stops it with a message. Every wait is
//! bounded.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvfabric::cluster::list_workers;
use kvfabric::server::{ByteSize, Node, Settings};
use kvfabric::testutil::Etcd;

/// The child, its URL and its second line (what it did about the registry).
fn spawn(etcd: &Etcd, extra: &[&str]) -> (std::process::Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvfabric-worker"))
        .args(["--listen", "127.0.0.1:0", "--kv-events", "tcp://127.0.0.1:0"])
        .args(["--cluster", &etcd.url(), "--cluster-id", "c1", "--pool-blocks", "64"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvfabric-worker starts");
    // First line: `kvfabric-worker (ROLE) listening on URL, KV events on EP`.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim()
        .to_string();
    let mut second = String::new();
    out.read_line(&mut second).unwrap();
    std::thread::spawn(move || for _ in out.lines() {});
    (child, url, second)
}

fn term(c: &std::process::Child) {
    let st = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

async fn wait_until(
    what: &str,
    etcd: &Etcd,
    mut f: impl FnMut(&kvfabric::cluster::RecordMap<kvfabric::cluster::WorkerRecord>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = list_workers(&etcd.target(), "c1").await.unwrap();
        if f(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_registers_itself_and_leaves_on_sigterm() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ns = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        node_id: "node-a".into(),
        ..Default::default()
    };
    ns.host.capacity = ByteSize(16 << 20);
    ns.disk.capacity = ByteSize(0);
    let node = Node::build(ns).await.unwrap().start().await.unwrap();
    let fabric = node.endpoint();
    let (mut w, url, said) = spawn(&etcd, &["--name", "ref-0", "--fabric", &fabric]);
    assert!(said.starts_with("registered as ref-0"), "{said:?}");
    // Registered before it said so.
    wait_until("ref-0 registers", &etcd, |m| m.contains_key("ref-0")).await;
    let rec = list_workers(&etcd.target(), "c1").await.unwrap()["ref-0"].clone();
    assert_eq!(rec.url, url);
    assert!(
        rec.kv_events
            .as_deref()
            .is_some_and(|e| e.starts_with("tcp://127.0.0.1:") && !e.ends_with(":0")),
        "the bound event endpoint is registered: {rec:?}"
    );

    // A prefill worker does not register.
    let (mut p, _, said) = spawn(&etcd, &["--name", "pre-0", "--role", "prefill"]);
    assert!(said.contains("not registering"), "{said:?}");

    term(&w);
    assert!(w.wait().unwrap().success());
    wait_until("ref-0 leaves", &etcd, |m| !m.contains_key("ref-0")).await;
    assert!(!list_workers(&etcd.target(), "c1").await.unwrap().contains_key("pre-0"));
    term(&p);
    let _ = p.wait();

    // A bad cluster URL is refused at load, naming the setting.
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric-worker"))
        .args(["--listen", "127.0.0.1:0", "--cluster", "http://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster"), "{out:?}");
    // Registering a worker that listens on every address, without
    // advertise-url, would register an address routers cannot reach.
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric-worker"))
        .args(["--listen", "0.0.0.0:0", "--cluster", &etcd.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("advertise-url"),
        "{out:?}"
    );
    node.shutdown().await;
}
