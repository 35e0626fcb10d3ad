//! The `kvfabric` command: `serve` runs a node; `put`, `get` and `stats` are
//! a small client for operators and scripts; `namespace create|describe|list`
//! sets and shows namespaces' replication; `cluster status` lists a
//! cluster's members from etcd and `cluster drain` empties a node before it
//! leaves. Settings come from a TOML file,
//! then `KVFABRIC_*` environment variables, then flags (later wins).
//! `auth new-token` and `auth hash` make the entries of a node's tokens
//! file; client subcommands send a token from `--token-file` or
//! `$KVFABRIC_TOKEN`.
//!
//! `kvfabric router|worker|demo ARGS...` runs the `kvfabric-router`,
//! `kvfabric-worker` or `kvfabric-demo` binary with ARGS (git-style: those
//! live in crates that depend on this one, so they cannot be linked in). It
//! is looked up in `$KVFABRIC_LIBEXEC_DIR`, then beside this executable,
//! then on `PATH`.

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use kvfabric::auth::Token;
use kvfabric::client::{Client, ClientError, ClientOptions, Durability};
use kvfabric::server::{ByteSize, Node, Settings};
use kvfabric::tls::ClientTls;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Writes a line to stdout; a stdout that is gone or full ends the process
/// with exit code 1 and a message (or quietly with 141, as SIGPIPE would,
/// when the reader left: `kvfabric stats | head -1`), instead of the
/// standard `println!`'s panic.
macro_rules! println {
    () => { out_line(format_args!("")) };
    ($($t:tt)*) => { out_line(format_args!($($t)*)) };
}

fn out_line(args: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        stdout_failed(&e);
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("kvfabric: writing to stdout: {e}");
    std::process::exit(1);
}

#[derive(Parser, Debug)]
#[command(
    name = "kvfabric",
    version,
    about = "kvfabric: a tiered KV cache block store for LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node (defaults: gRPC 127.0.0.1:50051, metrics 127.0.0.1:9090,
    /// 1GiB host tier, 4GiB disk tier under ./kvfabric-data, no object store).
    Serve(ServeArgs),
    /// Store one object from FILE (or stdin).
    Put(PutArgs),
    /// Read one object to FILE (or stdout). Exit 2 if it does not exist.
    Get(GetArgs),
    /// Per-tier capacity, usage, objects, hits and misses.
    Stats(StatsArgs),
    /// Cluster membership (etcd): status, drain.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Namespaces: create (with a replication factor), describe, list.
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Tokens for nodes that authenticate (`[auth] tokens-file`): make
    /// one, or print a token's digest.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// `router`, `worker` or `demo`: runs `kvfabric-router`,
    /// `kvfabric-worker` or `kvfabric-demo` with the remaining arguments.
    #[command(external_subcommand)]
    External(Vec<OsString>),
}

/// Subcommands served by other binaries of the workspace, and their crates.
const EXTERNAL: [(&str, &str); 3] = [
    ("router", "kvfabric-router"),
    ("worker", "kvfabric-engine-adapters"),
    ("demo", "kvfabric-bench"),
];

/// Where `kvfabric-NAME` is: `$KVFABRIC_LIBEXEC_DIR`, this executable's
/// directory, then `PATH`.
fn find_external(bin: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("KVFABRIC_LIBEXEC_DIR") {
        dirs.push(d.into());
    }
    if let Some(d) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
        dirs.push(d);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(bin)).find(|p| p.is_file())
}

/// Replaces this process with the binary behind an external subcommand.
fn run_external(args: Vec<OsString>) -> i32 {
    use std::os::unix::process::CommandExt;
    let name = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(&(_, krate)) = EXTERNAL.iter().find(|(n, _)| *n == name) else {
        eprintln!(
            "error: unrecognized subcommand '{name}' (commands: serve, put, get, stats, cluster, namespace, {}; see kvfabric --help)",
            EXTERNAL.map(|(n, _)| n).join(", ")
        );
        return 2;
    };
    let bin = format!("kvfabric-{name}");
    let Some(path) = find_external(&bin) else {
        eprintln!(
            "error: `kvfabric {name}` runs the `{bin}` binary, which is not in $KVFABRIC_LIBEXEC_DIR, \
             beside this executable or on PATH; build it with `cargo build --release -p {krate}`"
        );
        return 127;
    };
    let err = std::process::Command::new(&path).args(&args[1..]).exec();
    eprintln!("error: cannot run {}: {err}", path.display());
    126
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "KVFABRIC_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "KVFABRIC_LISTEN")]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long, env = "KVFABRIC_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Data directory (disk tier, namespace registry).
    #[arg(long, env = "KVFABRIC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Host-memory tier size, e.g. 64MiB, 2GiB (0 disables).
    #[arg(long, env = "KVFABRIC_HOST_CAPACITY")]
    host_capacity: Option<ByteSize>,
    /// Disk tier size (0 disables).
    #[arg(long, env = "KVFABRIC_DISK_CAPACITY")]
    disk_capacity: Option<ByteSize>,
    /// Object store URL: file:///dir or s3://bucket/prefix.
    #[arg(long, env = "KVFABRIC_OBJECT_STORE")]
    object_store: Option<String>,
    /// S3 endpoint for the object store, e.g. http://127.0.0.1:8333.
    #[arg(long, env = "KVFABRIC_OBJECT_ENDPOINT")]
    object_endpoint: Option<String>,
    /// Node id reported in events (and the member name in cluster mode).
    #[arg(long, env = "KVFABRIC_NODE_ID")]
    node_id: Option<String>,
    /// Join a cluster: etcd://HOST:PORT[,HOST:PORT...] (etcds://...?ca=PATH for TLS; see README, `[cluster] etcd`). Without it the node runs alone.
    #[arg(long, env = "KVFABRIC_CLUSTER")]
    cluster: Option<String>,
    /// Cluster id (default kvfabric).
    #[arg(long, env = "KVFABRIC_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// gRPC HOST:PORT advertised to the cluster (default: the listen address).
    #[arg(long, env = "KVFABRIC_ADVERTISE")]
    advertise: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Nodes, state, endpoint, capacity and used bytes per tier,
    /// under-replicated objects.
    Status(ClusterStatusArgs),
    /// Takes NODE out of placement and waits until it has handed every
    /// object to its owners (then stop it).
    Drain(ClusterDrainArgs),
    /// Registers an engine worker for routers (`kvfabric-router
    /// --cluster`) and keeps it registered until interrupted (SIGINT or
    /// SIGTERM), then removes it: run it beside an engine (vLLM, SGLang)
    /// that does not register itself.
    RegisterWorker(RegisterWorkerArgs),
    /// The engine workers registered now.
    Workers(ClusterWorkersArgs),
}

#[derive(clap::Args, Debug)]
struct RegisterWorkerArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Worker name, unique in the cluster (A-Z a-z 0-9 . _ -, 1 to 64).
    #[arg(long)]
    name: String,
    /// Base URL of its OpenAI-compatible API, e.g. http://10.0.0.5:8000.
    #[arg(long)]
    url: String,
    /// Its KV event publisher (vLLM's kv-events ZMQ PUB), tcp://HOST:PORT.
    #[arg(long)]
    kv_events: Option<String>,
    /// The fabric node on its host (a router's fabric name).
    #[arg(long)]
    fabric_node: Option<String>,
    /// Lease TTL: how long a crashed registrant's record outlives it.
    #[arg(long, default_value_t = 10)]
    ttl_s: u64,
}

#[derive(clap::Args, Debug)]
struct ClusterWorkersArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// One JSON object per worker.
    #[arg(long)]
    json: bool,
}

/// Where a cluster's registry is: `--cluster` and `--cluster-id`.
#[derive(clap::Args, Debug)]
struct EtcdArgs {
    /// The registry's etcd: etcd://HOST:PORT[,HOST:PORT...], or etcds://...?ca=PATH
    /// with TLS; optional cert=PATH&key=PATH and user=NAME&password-file=PATH.
    #[arg(long, env = "KVFABRIC_CLUSTER")]
    cluster: String,
    /// Cluster id.
    #[arg(long, env = "KVFABRIC_CLUSTER_ID", default_value = "kvfabric")]
    cluster_id: String,
}

impl EtcdArgs {
    /// The etcd target, once both flags are checked.
    fn endpoints(&self) -> Result<kvfabric::cluster::EtcdTarget> {
        let endpoints = kvfabric::cluster::parse_etcd_url(&self.cluster).map_err(|e| anyhow::anyhow!(e))?;
        kvfabric::cluster::validate_id("--cluster-id", &self.cluster_id).map_err(|e| anyhow::anyhow!(e))?;
        Ok(endpoints)
    }
}

#[derive(clap::Args, Debug)]
struct ClusterDrainArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    token: TokenArgs,
    /// Give up waiting after this many seconds (the node keeps draining).
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Start the drain and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Node id.
    node: String,
}

#[derive(Subcommand, Debug)]
enum NamespaceCmd {
    /// Creates NAME for the tenant, or changes its replication factor
    /// (cluster-wide in cluster mode).
    Create(NamespaceCreateArgs),
    /// Owner and replication factor of NAME.
    Describe(NamespaceDescribeArgs),
    /// The cluster's namespace records in etcd.
    List(NamespaceListArgs),
}

#[derive(clap::Args, Debug)]
struct NamespaceCreateArgs {
    #[command(flatten)]
    conn: Conn,
    /// Copies of each object, 1 to 16.
    #[arg(long, default_value_t = 1)]
    replication: u32,
    /// Namespace.
    name: String,
}

#[derive(clap::Args, Debug)]
struct NamespaceDescribeArgs {
    #[command(flatten)]
    conn: Conn,
    /// Namespace.
    name: String,
}

#[derive(clap::Args, Debug)]
struct NamespaceListArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(clap::Args, Debug)]
struct ClusterStatusArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// One JSON array of member records instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct Conn {
    /// Node endpoint (http:// or https://; without a scheme, https:// when
    /// --ca-file is given).
    #[arg(long, env = "KVFABRIC_ENDPOINT", default_value = "127.0.0.1:50051")]
    endpoint: String,
    /// Tenant to act as (empty: the node's default tenant).
    #[arg(long, env = "KVFABRIC_TENANT", default_value = "")]
    tenant: String,
    #[command(flatten)]
    token: TokenArgs,
}

/// What a client shows nodes that authenticate or speak TLS.
#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// File holding the token to send; without it, $KVFABRIC_TOKEN if set.
    #[arg(long, env = "KVFABRIC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA that signs the node's certificate: needed for https:// nodes.
    #[arg(long, env = "KVFABRIC_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate, for nodes that require one (with --client-key).
    #[arg(long, env = "KVFABRIC_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "KVFABRIC_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl TokenArgs {
    fn options(&self) -> Result<ClientOptions, ClientError> {
        let token = Token::from_file_or_env(self.token_file.as_deref()).map_err(ClientError::InvalidArgument)?;
        let tls = match &self.ca_file {
            Some(ca) => Some(
                ClientTls::from_files(ca, self.client_cert.as_deref(), self.client_key.as_deref())
                    .map_err(ClientError::InvalidArgument)?,
            ),
            None if self.client_cert.is_some() => {
                return Err(ClientError::InvalidArgument(
                    "--client-cert needs --ca-file (the CA that signs the node's certificate)".into(),
                ));
            }
            None => None,
        };
        Ok(ClientOptions {
            token,
            tls,
            ..Default::default()
        })
    }
}

#[derive(Subcommand, Debug)]
enum AuthCmd {
    /// Makes a random token: prints it on the first line, then the
    /// `[[token]]` entry (its digest, not the token) to add to the node's
    /// tokens file. Keep the token secret; the entry may be shared.
    NewToken(NewTokenArgs),
    /// Reads a token from stdin and prints its SHA-256, the `sha256` of a
    /// tokens-file entry.
    Hash,
}

#[derive(clap::Args, Debug)]
struct NewTokenArgs {
    /// Tenant the token acts for.
    #[arg(long)]
    tenant: String,
    /// Label in the node's logs (default: the tenant).
    #[arg(long)]
    name: Option<String>,
    /// Also node operations: drain, every namespace in stats.
    #[arg(long)]
    admin: bool,
    /// Also the zero-copy local path (its shared arena exposes every
    /// tenant's host-tier bytes to the engine that maps it).
    #[arg(long)]
    local: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DurabilityArg {
    Memory,
    Disk,
    Object,
}

#[derive(clap::Args, Debug)]
struct PutArgs {
    #[command(flatten)]
    conn: Conn,
    /// Namespace.
    #[arg(long)]
    namespace: String,
    /// How durable the put must be before it is acknowledged.
    #[arg(long, value_enum, default_value = "memory")]
    durability: DurabilityArg,
    /// Treat KEY as hex instead of UTF-8 text.
    #[arg(long)]
    hex_key: bool,
    /// Key (1 to 64 bytes).
    key: String,
    /// File to read; stdin when absent.
    file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct GetArgs {
    #[command(flatten)]
    conn: Conn,
    /// Namespace.
    #[arg(long)]
    namespace: String,
    /// Treat KEY as hex instead of UTF-8 text.
    #[arg(long)]
    hex_key: bool,
    /// Key.
    key: String,
    /// Output file; stdout when absent.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct StatsArgs {
    #[command(flatten)]
    conn: Conn,
}

fn key_bytes(key: &str, hex_key: bool) -> Result<Bytes> {
    if hex_key {
        // Bytes, not chars: any non-hex-digit (a sign, non-ASCII) is refused,
        // never sliced through.
        let s = key.trim().as_bytes();
        if !s.iter().all(u8::is_ascii_hexdigit) {
            anyhow::bail!("key is not valid hex: only 0-9, a-f and A-F are allowed");
        }
        if !s.len().is_multiple_of(2) {
            anyhow::bail!("hex key has an odd number of digits");
        }
        let digit = |c: u8| (c as char).to_digit(16).expect("checked hex digit") as u8;
        Ok(s.chunks_exact(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect())
    } else {
        Ok(Bytes::copy_from_slice(key.as_bytes()))
    }
}

fn settings(args: ServeArgs) -> Result<Settings, String> {
    let mut s = match &args.config {
        Some(p) => Settings::from_file(p)?,
        None => Settings::default(),
    };
    if let Some(v) = args.listen {
        s.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        s.metrics_listen = v;
    }
    if let Some(v) = args.data_dir {
        s.data_dir = v;
    }
    if let Some(v) = args.host_capacity {
        s.host.capacity = v;
    }
    if let Some(v) = args.disk_capacity {
        s.disk.capacity = v;
    }
    if let Some(v) = args.object_store {
        s.object.url = Some(v);
    }
    if let Some(v) = args.object_endpoint {
        s.object.endpoint = Some(v);
    }
    if let Some(v) = args.node_id {
        s.node_id = v;
    }
    if let Some(v) = args.cluster {
        s.cluster.etcd = Some(v);
    }
    if let Some(v) = args.cluster_id {
        s.cluster.id = v;
    }
    if let Some(v) = args.advertise {
        s.cluster.advertise = Some(v);
    }
    s.validate()?;
    Ok(s)
}

/// How long a node that left its cluster on a signal keeps serving before
/// its listener closes, so that watches elsewhere see it go first.
const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn serve(args: ServeArgs) -> Result<()> {
    let s = settings(args).map_err(|e| anyhow::anyhow!(e))?;
    // An unreadable RUST_LOG or `log` stops the start (it used to be
    // dropped without a word).
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).with_context(|| format!("RUST_LOG {v:?}"))?
        }
        _ => tracing_subscriber::EnvFilter::try_new(&s.log).with_context(|| format!("log {:?}", s.log))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let node = Node::build(s).await?;
    let mut handle = node.start().await?;
    let stop = handle.take_shutdown();
    let registration = handle.take_registration();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("shutting down");
        // Cluster mode: leave first (the record goes), and give the other
        // nodes' and clients' watches a moment to see it, while this node
        // still serves; only then close the listener. Closed first, peers
        // kept sending to a closed port until the record went.
        if let Some(r) = registration {
            r.leave().await;
            tokio::time::sleep(LEAVE_GRACE).await;
        }
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
    });
    handle.wait().await;
    Ok(())
}

async fn connect(c: &Conn) -> Result<Client, ClientError> {
    let options = c.token.options()?;
    Ok(Client::connect_with(c.endpoint.clone(), options)
        .await?
        .with_tenant(c.tenant.clone()))
}

/// `kvfabric auth new-token` and `kvfabric auth hash`.
fn auth(cmd: AuthCmd) -> Result<()> {
    use kvfabric::server::auth::{new_token, token_sha256};
    match cmd {
        AuthCmd::NewToken(a) => {
            kvfabric::validate::name("tenant", &a.tenant).map_err(|e| anyhow::anyhow!(e))?;
            if let Some(n) = &a.name
                && (n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_graphic()))
            {
                anyhow::bail!("--name must be 1 to 64 visible ASCII characters");
            }
            let t = new_token();
            println!("{}", t.secret());
            println!();
            println!("[[token]]");
            println!("tenant = {:?}", a.tenant);
            if let Some(n) = &a.name {
                println!("name = {n:?}");
            }
            println!("sha256 = {:?}", token_sha256(&t));
            if a.admin {
                println!("admin = true");
            }
            if a.local {
                println!("local = true");
            }
        }
        AuthCmd::Hash => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the token from stdin")?;
            let t = Token::new(s.trim()).map_err(|e| anyhow::anyhow!(e))?;
            println!("{}", token_sha256(&t));
        }
    }
    Ok(())
}

async fn run_client(cmd: Cmd) -> Result<i32, ClientError> {
    match cmd {
        Cmd::Put(a) => {
            let data = match &a.file {
                Some(p) => {
                    std::fs::read(p).map_err(|e| ClientError::InvalidArgument(format!("{}: {e}", p.display())))?
                }
                None => {
                    let mut v = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut v)
                        .map_err(|e| ClientError::InvalidArgument(format!("stdin: {e}")))?;
                    v
                }
            };
            let key = key_bytes(&a.key, a.hex_key).map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            let d = match a.durability {
                DurabilityArg::Memory => Durability::Memory,
                DurabilityArg::Disk => Durability::Disk,
                DurabilityArg::Object => Durability::Object,
            };
            let client = connect(&a.conn).await?;
            let n = data.len();
            let tier = client.put(&a.namespace, key, data, d).await?;
            eprintln!(
                "stored {n} bytes in {} tier",
                tier.as_str_name().trim_start_matches("TIER_").to_lowercase()
            );
            Ok(0)
        }
        Cmd::Get(a) => {
            let key = key_bytes(&a.key, a.hex_key).map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
            let client = connect(&a.conn).await?;
            match client.get(&a.namespace, key).await? {
                None => {
                    eprintln!("not found");
                    Ok(2)
                }
                Some(o) => {
                    let r = match &a.output {
                        Some(p) => std::fs::write(p, &o.value),
                        None => {
                            let mut out = std::io::stdout().lock();
                            if let Err(e) = out.write_all(&o.value).and_then(|()| out.flush()) {
                                stdout_failed(&e);
                            }
                            Ok(())
                        }
                    };
                    r.map_err(|e| ClientError::InvalidArgument(format!("writing output: {e}")))?;
                    Ok(0)
                }
            }
        }
        Cmd::Stats(a) => {
            let client = connect(&a.conn).await?;
            let s = client.stats().await?;
            println!(
                "{:<7} {:>15} {:>15} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10}",
                "tier", "capacity", "used", "objects", "hits", "misses", "evictions", "demotions", "promotions"
            );
            for t in &s.tiers {
                let name = t.tier().as_str_name().trim_start_matches("TIER_").to_lowercase();
                let cap = if t.capacity_bytes == u64::MAX {
                    "unbounded".to_string()
                } else {
                    ByteSize(t.capacity_bytes).to_string()
                };
                println!(
                    "{:<7} {:>15} {:>15} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10}",
                    name,
                    cap,
                    ByteSize(t.used_bytes).to_string(),
                    t.objects,
                    t.hits,
                    t.misses,
                    t.evictions,
                    t.demotions,
                    t.promotions
                );
            }
            println!("objects: {}  namespaces: {}", s.objects, s.namespaces.join(","));
            Ok(0)
        }
        Cmd::Namespace(NamespaceCmd::Create(a)) => {
            let client = connect(&a.conn).await?;
            let info = client.create_namespace(&a.name, a.replication).await?;
            print_namespace(&info);
            Ok(0)
        }
        Cmd::Namespace(NamespaceCmd::Describe(a)) => {
            let client = connect(&a.conn).await?;
            let info = client.describe_namespace(&a.name).await?;
            print_namespace(&info);
            Ok(0)
        }
        Cmd::Serve(_) | Cmd::External(_) | Cmd::Cluster(_) | Cmd::Auth(_) | Cmd::Namespace(NamespaceCmd::List(_)) => {
            unreachable!("handled in main")
        }
    }
}

fn print_namespace(info: &kvfabric::client::NamespaceInfo) {
    println!(
        "namespace {} owner {} replication {} ({})",
        info.namespace,
        info.owner,
        info.replication,
        if info.cluster_wide { "cluster-wide" } else { "this node" }
    );
}

/// `kvfabric namespace list`: the cluster's namespace records.
async fn namespace_list(a: NamespaceListArgs) -> Result<()> {
    use kvfabric::cluster;
    let endpoints = a.etcd.endpoints()?;
    println!("{:<32} {:<20} {:>11}", "namespace", "owner", "replication");
    for r in cluster::list_namespaces(&endpoints, &a.etcd.cluster_id).await? {
        println!("{:<32} {:<20} {:>11}", r.name, r.owner, r.replication);
    }
    Ok(())
}

/// `kvfabric cluster drain NODE`: asks the node (found in etcd) to drain,
/// then follows it until it holds nothing.
async fn register_worker(a: RegisterWorkerArgs) -> Result<()> {
    use kvfabric::cluster::{WorkerLease, WorkerRecord};
    let endpoints = a.etcd.endpoints()?;
    let record = WorkerRecord {
        name: a.name,
        url: a.url,
        kv_events: a.kv_events,
        fabric_node: a.fabric_node,
    };
    let lease = WorkerLease::register(endpoints, &a.etcd.cluster_id, record.clone(), a.ttl_s).await?;
    println!(
        "registered worker {} ({}) in cluster {}; interrupt to remove it",
        record.name, record.url, a.etcd.cluster_id
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    lease.leave().await;
    println!("removed worker {}", record.name);
    Ok(())
}

async fn cluster_workers(a: ClusterWorkersArgs) -> Result<()> {
    use kvfabric::cluster;
    let endpoints = a.etcd.endpoints()?;
    let workers = cluster::list_workers(&endpoints, &a.etcd.cluster_id).await?;
    if a.json {
        for w in workers.values() {
            println!("{}", serde_json::to_string(w)?);
        }
        return Ok(());
    }
    println!("{:<24} {:<32} {:<28} FABRIC-NODE", "WORKER", "URL", "KV-EVENTS");
    for w in workers.values() {
        println!(
            "{:<24} {:<32} {:<28} {}",
            w.name,
            w.url,
            w.kv_events.as_deref().unwrap_or("-"),
            w.fabric_node.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

async fn cluster_drain(a: ClusterDrainArgs) -> Result<()> {
    use kvfabric::cluster;
    let endpoints = a.etcd.endpoints()?;
    let members = cluster::list_members(&endpoints, &a.etcd.cluster_id).await?;
    let Some(m) = members.iter().find(|m| m.node_id == a.node) else {
        let known: Vec<&str> = members.iter().map(|m| m.node_id.as_str()).collect();
        anyhow::bail!(
            "no node {:?} in cluster {:?} (members: {})",
            a.node,
            a.etcd.cluster_id,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let client = Client::connect_with(m.endpoint.clone(), a.token.options()?).await?;
    // A timeout past what the clock can add is as good as none.
    let deadline = std::time::Instant::now().checked_add(std::time::Duration::from_secs(a.timeout_s));
    loop {
        let r = client.drain(&a.node).await?;
        println!(
            "node {} {}: {} object(s), {} left",
            a.node,
            r.state,
            r.objects_left,
            ByteSize(r.bytes_left)
        );
        if r.objects_left == 0 {
            println!("node {} holds nothing; it can be stopped", a.node);
            return Ok(());
        }
        if a.no_wait {
            return Ok(());
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            anyhow::bail!(
                "node {} still holds {} object(s) after {} s (it keeps draining)",
                a.node,
                r.objects_left,
                a.timeout_s
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `kvfabric cluster status`: one listing of the members from etcd.
async fn cluster_status(a: ClusterStatusArgs) -> Result<()> {
    use kvfabric::cluster;
    let endpoints = a.etcd.endpoints()?;
    let members = cluster::list_members(&endpoints, &a.etcd.cluster_id).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let under: u64 = members.iter().map(|m| m.under_replicated).sum();
    let map: cluster::MemberMap = members.iter().map(|m| (m.node_id.clone(), m.clone())).collect();
    let waiting: Vec<&str> = cluster::unsettled_members(&map)
        .into_iter()
        .map(|m| m.node_id.as_str())
        .collect();
    let handoff = if waiting.is_empty() {
        "hand-off done".to_string()
    } else {
        format!("hand-off pending on {}", waiting.join(", "))
    };
    println!(
        "cluster {}: {} node(s), {under} under-replicated object(s), {handoff}",
        a.etcd.cluster_id,
        members.len()
    );
    println!(
        "{:<20} {:<9} {:<28} {:<7} {:>12} {:>12} {:>10} {:>10}",
        "node", "state", "endpoint", "tier", "capacity", "used", "objects", "under-rep"
    );
    for m in &members {
        let tiers: Vec<_> = if m.tiers.is_empty() {
            vec![None]
        } else {
            m.tiers.iter().map(Some).collect()
        };
        for (i, t) in tiers.into_iter().enumerate() {
            let (node, state, endpoint, under) = if i == 0 {
                (
                    m.node_id.as_str(),
                    m.state.as_str(),
                    m.endpoint.as_str(),
                    m.under_replicated.to_string(),
                )
            } else {
                ("", "", "", String::new())
            };
            let (tier, cap, used, objects) = match t {
                Some(t) => (
                    t.tier.clone(),
                    if t.capacity_bytes == u64::MAX {
                        "unbounded".to_string()
                    } else {
                        ByteSize(t.capacity_bytes).to_string()
                    },
                    ByteSize(t.used_bytes).to_string(),
                    t.objects.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            println!("{node:<20} {state:<9} {endpoint:<28} {tier:<7} {cap:>12} {used:>12} {objects:>10} {under:>10}");
        }
    }
    Ok(())
}

/// 0, or 1 after printing `kvfabric WHAT: error` with its causes.
fn exit_code(what: &str, r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kvfabric {what}: {e:#}");
            1
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::External(args) => run_external(args),
        Cmd::Serve(a) => exit_code("serve", serve(a).await),
        Cmd::Cluster(ClusterCmd::Status(a)) => exit_code("cluster status", cluster_status(a).await),
        Cmd::Cluster(ClusterCmd::Drain(a)) => exit_code("cluster drain", cluster_drain(a).await),
        Cmd::Cluster(ClusterCmd::RegisterWorker(a)) => exit_code("cluster register-worker", register_worker(a).await),
        Cmd::Cluster(ClusterCmd::Workers(a)) => exit_code("cluster workers", cluster_workers(a).await),
        Cmd::Namespace(NamespaceCmd::List(a)) => exit_code("namespace list", namespace_list(a).await),
        Cmd::Auth(a) => exit_code("auth", auth(a)),
        cmd => match run_client(cmd).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_are_decoded_and_bad_ones_refused_without_panicking() {
        assert_eq!(
            key_bytes(" 00fFa1 ", true).unwrap(),
            Bytes::from_static(&[0, 0xff, 0xa1])
        );
        assert_eq!(key_bytes("", true).unwrap(), Bytes::new());
        for bad in ["aé0", "é0", "0é", "+f", "-1", "0x", "zz", "abc"] {
            assert!(key_bytes(bad, true).is_err(), "{bad:?} accepted");
        }
        assert_eq!(key_bytes("aé0", false).unwrap(), Bytes::from("aé0"));
    }
}
