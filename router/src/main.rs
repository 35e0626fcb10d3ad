//! The `kvfabric-router` command: runs the KV-aware router (OpenAI-compatible
//! HTTP front end, event ingestion, health checks). Settings come from a TOML
//! file, then `KVFABRIC_ROUTER_*` environment variables, then flags (later
//! wins); see the README's router configuration reference.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kvfabric_router::RouterService;
use kvfabric_router::config::{FabricEndpoint, Overrides, Settings, WorkerSettings};

#[derive(Parser, Debug)]
#[command(
    name = "kvfabric-router",
    version,
    about = "kvfabric's KV-aware router: an OpenAI-compatible front end that routes each request to the worker with the cheapest prefill"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "KVFABRIC_ROUTER_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address (API, /health, /metrics).
    #[arg(long, env = "KVFABRIC_ROUTER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Fabric nodes to follow: URL or NAME=URL, comma-separated (replaces the file's list).
    #[arg(long, env = "KVFABRIC_ROUTER_FABRIC", value_delimiter = ',')]
    fabric: Option<Vec<FabricEndpoint>>,
    /// Fabric namespace (its salt seeds the block hash).
    #[arg(long, env = "KVFABRIC_ROUTER_NAMESPACE")]
    namespace: Option<String>,
    /// Fabric tenant.
    #[arg(long, env = "KVFABRIC_ROUTER_TENANT")]
    tenant: Option<String>,
    /// File holding the token sent to fabric nodes that authenticate (default: $KVFABRIC_TOKEN).
    #[arg(long, env = "KVFABRIC_ROUTER_FABRIC_TOKEN_FILE")]
    fabric_token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the certificates of fabric nodes speaking TLS (https:// URLs).
    #[arg(long, env = "KVFABRIC_ROUTER_FABRIC_CA_FILE")]
    fabric_ca_file: Option<PathBuf>,
    /// PEM certificate presented to fabric nodes that require one (with --fabric-client-key).
    #[arg(long, env = "KVFABRIC_ROUTER_FABRIC_CLIENT_CERT")]
    fabric_client_cert: Option<PathBuf>,
    /// PEM private key of --fabric-client-cert.
    #[arg(long, env = "KVFABRIC_ROUTER_FABRIC_CLIENT_KEY")]
    fabric_client_key: Option<PathBuf>,
    /// Model names served, comma-separated (replaces the file's list).
    #[arg(long = "model", env = "KVFABRIC_ROUTER_MODELS", value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Hugging Face tokenizer.json for text prompts.
    #[arg(long, env = "KVFABRIC_ROUTER_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// A worker, NAME=URL; repeat, or comma-separate in the environment (added to the file's list).
    #[arg(long = "worker", env = "KVFABRIC_ROUTER_WORKERS", value_delimiter = ',')]
    workers: Vec<WorkerSettings>,
    /// Approximate mode for workers without kv-events.
    #[arg(long, env = "KVFABRIC_ROUTER_APPROXIMATE")]
    approximate: Option<bool>,
    /// Seed of tie breaks and softmax sampling.
    #[arg(long, env = "KVFABRIC_ROUTER_SEED")]
    seed: Option<u64>,
    /// Cluster registry to take fabric nodes and workers from, etcd://HOST:PORT[,...] (or etcds:// with TLS).
    #[arg(long, env = "KVFABRIC_ROUTER_CLUSTER")]
    cluster: Option<String>,
    /// Cluster id of that registry (default kvfabric).
    #[arg(long, env = "KVFABRIC_ROUTER_CLUSTER_ID")]
    cluster_id: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        fabric: cli.fabric,
        namespace: cli.namespace,
        tenant: cli.tenant,
        fabric_token_file: cli.fabric_token_file,
        fabric_ca_file: cli.fabric_ca_file,
        fabric_client_cert: cli.fabric_client_cert,
        fabric_client_key: cli.fabric_client_key,
        models: cli.models,
        tokenizer: cli.tokenizer,
        workers: cli.workers,
        approximate: cli.approximate,
        seed: cli.seed,
        cluster: cli.cluster,
        cluster_id: cli.cluster_id,
    };
    let settings = Settings::load(cli.config.as_deref(), overrides).context("loading settings")?;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).with_context(|| format!("RUST_LOG {v:?}"))?
        }
        _ => tracing_subscriber::EnvFilter::try_new(&settings.log).context("log filter")?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let handle = RouterService::start(settings).await?;
    println!("kvfabric-router listening on {}", handle.url());
    // SIGTERM (systemd, Kubernetes) stops it as gracefully as Ctrl-C.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}
