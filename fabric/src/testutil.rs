//! Test helpers shared by this crate's and other crates' integration
//! tests (feature `test-util`): a private etcd on loopback ([`Etcd`],
//! Debian's `etcd-server` binary, or `KVFABRIC_TEST_ETCD_BIN`),
//! [`free_port`] and [`Proc`]. Not for production use.

use crate::cluster::list_members;
use std::path::{Path, PathBuf};
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
    /// Serves clients over TLS and requires a client certificate.
    tls: bool,
}

impl Etcd {
    /// Starts etcd on two free ports and waits until it answers.
    pub async fn start() -> Etcd {
        Self::start_with(false).await
    }

    /// Starts etcd serving clients over TLS only, with client certificates
    /// required (`--client-cert-auth`). A fresh CA (made with the `openssl`
    /// command) signs its certificate and a client's: [`Self::url`] names
    /// them, [`Self::tls_file`] finds them.
    pub async fn start_tls() -> Etcd {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            tls,
        };
        if tls {
            write_test_certificates(e.dir.path());
        }
        // A free port can be taken by another test between our pick and
        // etcd's bind: pick again (a few times) rather than fail the test.
        for _ in 0..5 {
            match e.try_spawn().await {
                Ok(()) => return e,
                Err(log) if log.contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(e.dir.path().join("data"));
                    let _ = std::fs::remove_file(e.dir.path().join("etcd.log"));
                    (e.client_port, e.peer_port) = (free_port(), free_port());
                }
                Err(log) => panic!("{log}"),
            }
        }
        panic!("etcd found no free ports in 5 tries; log: {}", e.log())
    }

    /// `name` (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`) in the TLS etcd's directory.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bin() -> PathBuf {
        std::env::var_os("KVFABRIC_TEST_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("etcd"))
    }

    /// Starts etcd (same data dir and ports every time) and waits until it answers.
    pub async fn spawn(&mut self) {
        if let Err(e) = self.try_spawn().await {
            panic!("{e}");
        }
    }

    /// [`Self::spawn`], or why etcd exited (with its log).
    async fn try_spawn(&mut self) -> Result<(), String> {
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new(Self::bin());
        if self.tls {
            cmd.arg("--cert-file")
                .arg(self.tls_file("server.pem"))
                .arg("--key-file")
                .arg(self.tls_file("server.key"))
                .arg("--trusted-ca-file")
                .arg(self.tls_file("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
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
            if list_members(&self.target(), "probe").await.is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!("etcd exited with {status}; log: {}", self.log()));
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

    /// `etcd://127.0.0.1:PORT`, as `--cluster` takes it; with TLS,
    /// `etcds://127.0.0.1:PORT?ca=...&cert=...&key=...` (the client's certificate).
    pub fn url(&self) -> String {
        if self.tls {
            format!(
                "etcds://127.0.0.1:{}?ca={}&cert={}&key={}",
                self.client_port,
                self.tls_file("ca.pem").display(),
                self.tls_file("client.pem").display(),
                self.tls_file("client.key").display()
            )
        } else {
            format!("etcd://127.0.0.1:{}", self.client_port)
        }
    }

    /// Client endpoints, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        vec![format!("{scheme}://127.0.0.1:{}", self.client_port)]
    }

    /// The cluster registry's target: [`Self::url`] parsed.
    pub fn target(&self) -> crate::cluster::EtcdTarget {
        crate::cluster::EtcdTarget::parse(&self.url()).expect("the test etcd's own URL parses")
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

/// Writes a throw-away CA (`ca.pem`, `ca.key`) and two certificates it
/// signs for 127.0.0.1, valid two days, into `d`: `server.pem` /
/// `server.key` (server and client authentication: what a node presents
/// either way) and `client.pem` / `client.key` (client authentication).
/// Uses the `openssl` command.
pub fn write_test_certificates(d: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl ({e}): run scripts/install-test-deps.sh"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = [
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
    ];
    openssl(&[&ca.concat()[..], &["-subj", "/CN=kvfabric-test-ca"]].concat());
    for (who, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        std::fs::write(
            d.join(&ext),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        let subj = format!("/CN={who}");
        openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &subj]].concat());
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}
