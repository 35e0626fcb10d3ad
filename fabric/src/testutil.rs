//! Test helpers shared by this crate's and other crates' integration
//! tests (feature `test-util`): a private etcd on loopback ([`Etcd`],
//! Debian's `etcd-server` binary, or `KVFABRIC_TEST_ETCD_BIN`),
//! [`free_port`] and [`Proc`]. Not for production use.

use crate::cluster::list_members;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process (a real `kvfabric serve`, say), killed and reaped on
/// drop. The field is public for tests that signal or wait on it.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private single-member etcd on loopback over a temporary data
/// directory; killed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd on two free ports and waits until it answers.
    pub async fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.spawn().await;
        e
    }

    fn bin() -> PathBuf {
        std::env::var_os("KVFABRIC_TEST_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("etcd"))
    }

    /// Starts etcd (same data dir and ports every time) and waits until it answers.
    pub async fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new(Self::bin())
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run etcd ({}: {e}); the cluster tests need a real etcd: run \
                     scripts/install-test-deps.sh (installs Debian's etcd-server), or point \
                     KVFABRIC_TEST_ETCD_BIN at an etcd binary",
                    Self::bin().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if list_members(&self.endpoints(), "probe").await.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd exited with {status}; log: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within 20 s; log: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcd://127.0.0.1:PORT`, as `--cluster` takes it.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Client endpoints, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![format!("http://127.0.0.1:{}", self.client_port)]
    }

    /// The data directory etcd keeps its state in.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
