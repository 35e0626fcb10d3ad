//! The real `kvfabric` binary: objects acknowledged with `disk` or `object`
//! durability read back byte-identical after `kill -9` and a restart; the
//! CLI's put/get/stats spellings and exit codes.

mod common;

use bytes::Bytes;
use common::payload;
use kvfabric::client::{Client, Durability};
use kvfabric::testutil::{Proc, free_port};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spawn(dir: &Path, port: u16) -> Proc {
    let obj = dir.join("objects");
    std::fs::create_dir_all(&obj).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--host-capacity", "8MiB", "--disk-capacity", "64MiB"])
        .arg("--object-store")
        .arg(format!("file://{}", obj.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kvfabric");
    Proc(child)
}

async fn connect(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) if c.stats().await.is_ok() => return c,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => panic!("node never answered"),
            Err(e) => panic!("node never came up: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_objects_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut node = spawn(dir.path(), port);
    let c = connect(port).await;
    let key = |d: &str, i: u64| Bytes::from(format!("{d}-{i}"));
    for i in 0..20u64 {
        let len = 1000 + (i as usize * 37_111) % 3_000_000;
        c.put("ns", key("disk", i), payload(i, len), Durability::Disk)
            .await
            .unwrap();
        c.put("ns", key("object", i), payload(100 + i, len), Durability::Object)
            .await
            .unwrap();
    }
    // Overwrite and delete are durable too.
    c.put("ns", key("disk", 0), payload(999, 5000), Durability::Disk)
        .await
        .unwrap();
    c.delete("ns", vec![key("disk", 1)]).await.unwrap();
    // Memory-only objects that overflow the host tier are demoted, not lost.
    for i in 0..12u64 {
        c.put("mem", key("m", i), payload(500 + i, 1 << 20), Durability::Memory)
            .await
            .unwrap();
    }
    node.0.kill().unwrap(); // SIGKILL
    node.0.wait().unwrap();
    drop(node);

    let _node = spawn(dir.path(), port);
    let c = connect(port).await;
    for i in 0..20u64 {
        let len = 1000 + (i as usize * 37_111) % 3_000_000;
        let d = c.get("ns", key("disk", i)).await.unwrap();
        match i {
            0 => assert_eq!(d.unwrap().value, payload(999, 5000)),
            1 => assert!(d.is_none(), "deleted object came back"),
            _ => assert!(
                d.expect("disk object survived").value == payload(i, len),
                "disk-{i} differs"
            ),
        }
        let o = c
            .get("ns", key("object", i))
            .await
            .unwrap()
            .expect("object-durable object survived");
        assert!(o.value == payload(100 + i, len), "object-{i} differs");
    }
    // The demoted memory objects that reached the disk tier are back too.
    let on_disk = c
        .exists_prefix("mem", (0..4u64).map(|i| key("m", i)).collect())
        .await
        .unwrap();
    assert_eq!(
        on_disk.len(),
        4,
        "the oldest memory objects were demoted to disk before the kill"
    );
    let s = c.stats().await.unwrap();
    assert!(s.namespaces.contains(&"ns".to_string()));
}

fn cli(args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut i = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            i.write_all(b).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_get_stats_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _node = spawn(dir.path(), port);
    connect(port).await;
    let ep = format!("http://127.0.0.1:{port}");
    let (code, _, err) = cli(
        &["put", "--endpoint", &ep, "--namespace", "cli", "k1"],
        Some(b"from stdin"),
    );
    assert_eq!(code, 0, "{err}");
    let f = dir.path().join("in.bin");
    std::fs::write(&f, payload(3, 2_000_000)).unwrap();
    let (code, _, err) = cli(
        &[
            "put",
            "--endpoint",
            &ep,
            "--namespace",
            "cli",
            "--durability",
            "disk",
            "k2",
            f.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&["get", "--endpoint", &ep, "--namespace", "cli", "k1"], None);
    assert_eq!((code, out.as_slice()), (0, &b"from stdin"[..]));
    let o = dir.path().join("out.bin");
    let (code, _, _) = cli(
        &[
            "get",
            "--endpoint",
            &ep,
            "--namespace",
            "cli",
            "k2",
            "-o",
            o.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(std::fs::read(&o).unwrap() == payload(3, 2_000_000));
    let (code, out, err) = cli(&["get", "--endpoint", &ep, "--namespace", "cli", "absent"], None);
    assert_eq!((code, out.len()), (2, 0));
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = cli(&["get", "--endpoint", &ep, "--namespace", "nope", "k"], None);
    assert_eq!(code, 1);
    assert!(err.contains("namespace \"nope\" does not exist"), "{err}");
    let (code, _, err) = cli(
        &["put", "--endpoint", &ep, "--namespace", "cli", &"x".repeat(65)],
        Some(b"v"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("65 bytes"), "{err}");
    let (code, out, _) = cli(&["stats", "--endpoint", &ep], None);
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0);
    for w in [
        "host", "disk", "object", "capacity", "used", "objects", "hits", "misses",
    ] {
        assert!(out.contains(w), "stats lack {w}:\n{out}");
    }
    let (code, _, err) = cli(
        &["get", "--endpoint", "http://127.0.0.1:1", "--namespace", "cli", "k1"],
        None,
    );
    assert_eq!(code, 1, "{err}");
}

#[test]
fn serve_rejects_bad_settings_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .args(["serve", "--host-capacity", "12 parsecs"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[disk]\nqueue-depth = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk.queue-depth"));
}
