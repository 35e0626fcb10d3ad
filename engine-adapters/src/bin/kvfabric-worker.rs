//! The `kvfabric-worker` command: runs one reference-engine worker
//! (aggregated, prefill or decode) serving the OpenAI-compatible API the
//! router forwards to. Settings come from a TOML file, then
//! `KVFABRIC_WORKER_*` environment variables, then flags (later wins); see
//! the crate README's worker settings table. SIGINT or SIGTERM stops it
//! gracefully (requests in flight finish first, for up to
//! `shutdown-timeout-ms`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kvfabric::size::ByteSize;
use kvfabric_engine_adapters::worker::{Overrides, Role, Worker, WorkerSettings};

#[derive(Parser, Debug)]
#[command(
    name = "kvfabric-worker",
    version,
    about = "kvfabric's reference engine worker: OpenAI-compatible completions over a tiny CPU Llama, with KV blocks shared through the fabric"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "KVFABRIC_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// aggregated, prefill or decode.
    #[arg(long, env = "KVFABRIC_WORKER_ROLE")]
    role: Option<Role>,
    /// HTTP listen address (API, /health, /metrics).
    #[arg(long, env = "KVFABRIC_WORKER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Fabric node endpoint, http://host:port (or https://host:port, with --fabric-ca-file).
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC")]
    fabric: Option<String>,
    /// Unix socket of the node's zero-copy local path (co-located node).
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_SOCKET")]
    fabric_socket: Option<PathBuf>,
    /// Time one fabric call may take, ms, before the request goes on without the fabric.
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_TIMEOUT_MS")]
    fabric_timeout_ms: Option<u64>,
    /// Fabric tenant.
    #[arg(long, env = "KVFABRIC_WORKER_TENANT")]
    tenant: Option<String>,
    /// File holding the token sent to a fabric node that authenticates (default: $KVFABRIC_TOKEN).
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_TOKEN_FILE")]
    fabric_token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the certificate of a fabric node speaking TLS (https://).
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_CA_FILE")]
    fabric_ca_file: Option<PathBuf>,
    /// PEM certificate presented to a fabric node that requires one (with --fabric-client-key).
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_CLIENT_CERT")]
    fabric_client_cert: Option<PathBuf>,
    /// PEM private key of --fabric-client-cert.
    #[arg(long, env = "KVFABRIC_WORKER_FABRIC_CLIENT_KEY")]
    fabric_client_key: Option<PathBuf>,
    /// Fabric namespace (its salt seeds the block hashes).
    #[arg(long, env = "KVFABRIC_WORKER_NAMESPACE")]
    namespace: Option<String>,
    /// Model config TOML file.
    #[arg(long, env = "KVFABRIC_WORKER_MODEL")]
    model: Option<PathBuf>,
    /// Safetensors weights for the model.
    #[arg(long, env = "KVFABRIC_WORKER_WEIGHTS")]
    weights: Option<PathBuf>,
    /// KV pool capacity in blocks.
    #[arg(long, env = "KVFABRIC_WORKER_POOL_BLOCKS")]
    pool_blocks: Option<usize>,
    /// Most prompt tokens per prefill batch.
    #[arg(long, env = "KVFABRIC_WORKER_MAX_BATCH_TOKENS")]
    max_batch_tokens: Option<usize>,
    /// Most sequences decoding at once.
    #[arg(long, env = "KVFABRIC_WORKER_MAX_RUNNING")]
    max_running: Option<usize>,
    /// Most requests waiting for prefill (more get 503).
    #[arg(long, env = "KVFABRIC_WORKER_MAX_WAITING")]
    max_waiting: Option<usize>,
    /// Largest max_tokens a request may ask for.
    #[arg(long, env = "KVFABRIC_WORKER_MAX_TOKENS_LIMIT")]
    max_tokens_limit: Option<usize>,
    /// Engine compute threads (0: automatic).
    #[arg(long, env = "KVFABRIC_WORKER_THREADS")]
    threads: Option<usize>,
    /// ZMQ PUB bind address for KV events, tcp://host:port.
    #[arg(long, env = "KVFABRIC_WORKER_KV_EVENTS")]
    kv_events: Option<String>,
    /// Topic frame of KV event messages.
    #[arg(long, env = "KVFABRIC_WORKER_KV_EVENTS_TOPIC")]
    kv_events_topic: Option<String>,
    /// Whether text prompts get a BOS token.
    #[arg(long, env = "KVFABRIC_WORKER_ADD_BOS")]
    add_bos: Option<bool>,
    /// Model name served (default: the model id).
    #[arg(long, env = "KVFABRIC_WORKER_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// A prefill worker URL; repeat, or comma-separate in the environment (replaces the file's list).
    #[arg(
        long = "prefill-worker",
        env = "KVFABRIC_WORKER_PREFILL_WORKERS",
        value_delimiter = ','
    )]
    prefill_workers: Option<Vec<String>>,
    /// Remote prefill only when the uncached part has at least this many tokens.
    #[arg(long, env = "KVFABRIC_WORKER_DISAGG_MIN_UNCACHED_TOKENS")]
    disagg_min_uncached_tokens: Option<usize>,
    /// Remote prefill only when the prefill worker's queue is below this.
    #[arg(long, env = "KVFABRIC_WORKER_DISAGG_MAX_PREFILL_QUEUE")]
    disagg_max_prefill_queue: Option<usize>,
    /// Time a remote prefill may take, ms.
    #[arg(long, env = "KVFABRIC_WORKER_PREFILL_TIMEOUT_MS")]
    prefill_timeout_ms: Option<u64>,
    /// Time a prefill worker's /health may take, ms.
    #[arg(long, env = "KVFABRIC_WORKER_PREFILL_HEALTH_TIMEOUT_MS")]
    prefill_health_timeout_ms: Option<u64>,
    /// Largest request body (e.g. 8MiB).
    #[arg(long, env = "KVFABRIC_WORKER_MAX_BODY_SIZE")]
    max_body_size: Option<ByteSize>,
    /// Time a request body may take to arrive, ms (slower: 408).
    #[arg(long, env = "KVFABRIC_WORKER_BODY_TIMEOUT_MS")]
    body_timeout_ms: Option<u64>,
    /// Time a shutdown waits for requests in flight, ms.
    #[arg(long, env = "KVFABRIC_WORKER_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// Log filter (RUST_LOG overrides).
    #[arg(long, env = "KVFABRIC_WORKER_LOG")]
    log: Option<String>,
    /// Register in this cluster's worker registry, etcd://HOST:PORT[,...] (or etcds:// with TLS).
    #[arg(long, env = "KVFABRIC_WORKER_CLUSTER")]
    cluster: Option<String>,
    /// Cluster id (default kvfabric).
    #[arg(long, env = "KVFABRIC_WORKER_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Name registered (default worker-HOST-PORT).
    #[arg(long, env = "KVFABRIC_WORKER_NAME")]
    name: Option<String>,
    /// URL registered (default http:// plus the listen address).
    #[arg(long, env = "KVFABRIC_WORKER_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Lease TTL of the registration, s (default 10).
    #[arg(long, env = "KVFABRIC_WORKER_REGISTRATION_TTL_S")]
    registration_ttl_s: Option<u64>,
}

async fn terminated() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("waiting for ctrl-c")?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let overrides = Overrides {
        role: cli.role,
        listen: cli.listen,
        fabric: cli.fabric,
        fabric_socket: cli.fabric_socket,
        fabric_timeout_ms: cli.fabric_timeout_ms,
        tenant: cli.tenant,
        fabric_token_file: cli.fabric_token_file,
        fabric_ca_file: cli.fabric_ca_file,
        fabric_client_cert: cli.fabric_client_cert,
        fabric_client_key: cli.fabric_client_key,
        namespace: cli.namespace,
        model: cli.model,
        weights: cli.weights,
        pool_blocks: cli.pool_blocks,
        max_batch_tokens: cli.max_batch_tokens,
        max_running: cli.max_running,
        max_waiting: cli.max_waiting,
        max_tokens_limit: cli.max_tokens_limit,
        threads: cli.threads,
        kv_events: cli.kv_events,
        kv_events_topic: cli.kv_events_topic,
        served_model_name: cli.served_model_name,
        add_bos: cli.add_bos,
        prefill_workers: cli.prefill_workers,
        disagg_min_uncached_tokens: cli.disagg_min_uncached_tokens,
        disagg_max_prefill_queue: cli.disagg_max_prefill_queue,
        prefill_timeout_ms: cli.prefill_timeout_ms,
        prefill_health_timeout_ms: cli.prefill_health_timeout_ms,
        max_body_size: cli.max_body_size,
        body_timeout_ms: cli.body_timeout_ms,
        shutdown_timeout_ms: cli.shutdown_timeout_ms,
        log: cli.log,
        cluster: cli.cluster,
        cluster_id: cli.cluster_id,
        name: cli.name,
        advertise_url: cli.advertise_url,
        registration_ttl_s: cli.registration_ttl_s,
    };
    let settings = WorkerSettings::load(cli.config.as_deref(), overrides).context("loading settings")?;
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
    if settings.cluster.is_some() && settings.role != Role::Prefill {
        // Refused now rather than after binding.
        if let Some(ep) = &settings.kv_events {
            advertised_events(ep, settings.advertise_url.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
        }
        if settings.advertise_url.is_none() && settings.listen.ip().is_unspecified() {
            anyhow::bail!(
                "listen is {}, every address, which routers cannot reach: set advertise-url (the URL registered for this worker) or listen on a reachable address",
                settings.listen
            );
        }
    }
    let registration = settings.clone();
    let handle = Worker::start(settings).await.context("starting the worker")?;
    println!(
        "kvfabric-worker ({}) listening on {}{}",
        handle.role(),
        handle.url(),
        handle
            .kv_events_endpoint()
            .map(|e| format!(", KV events on {e}"))
            .unwrap_or_default()
    );
    let lease = register(&registration, &handle).await?;
    terminated().await?;
    tracing::info!("shutting down");
    // Out of the registry first, so routers stop sending new requests.
    if let Some(l) = lease {
        l.leave().await;
    }
    handle.shutdown().await;
    Ok(())
}

/// Registers the worker in `settings.cluster`'s registry (aggregated and
/// decode workers; prefill workers are reached through decode workers).
async fn register(
    settings: &WorkerSettings,
    handle: &kvfabric_engine_adapters::worker::WorkerHandle,
) -> Result<Option<kvfabric::cluster::WorkerLease>> {
    use kvfabric::cluster::{WorkerLease, WorkerRecord, parse_etcd_url};
    let Some(cluster) = &settings.cluster else {
        return Ok(None);
    };
    if settings.role == Role::Prefill {
        println!(
            "prefill worker: not registering in cluster {} (decode workers reach it)",
            settings.cluster_id
        );
        return Ok(None);
    }
    let endpoints = parse_etcd_url(cluster).map_err(|e| anyhow::anyhow!("cluster: {e}"))?;
    let url = settings.advertise_url.clone().unwrap_or_else(|| handle.url());
    let name = settings.name.clone().unwrap_or_else(|| default_name(&url));
    kvfabric::cluster::validate_id("name", &name).map_err(|e| anyhow::anyhow!(e))?;
    // The fabric node it uses, by node id, so that routers can tell its
    // host's node from others (best effort: a node that cannot say leaves
    // it unset).
    let fabric_node = match &settings.fabric {
        Some(url) => match kvfabric::client::Client::connect_with(
            url.clone(),
            kvfabric::client::ClientOptions {
                token: settings.fabric_token.clone(),
                tls: settings.fabric_tls.clone(),
                ..Default::default()
            },
        )
        .await
        {
            Ok(c) => match c.members().await {
                Ok(m) if !m.node_id.is_empty() => Some(m.node_id),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the fabric node for its id; registering without it");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the fabric node; registering without its id");
                None
            }
        },
        None => None,
    };
    let record = WorkerRecord {
        name,
        url,
        kv_events: handle
            .kv_events_endpoint()
            .map(|e| advertised_events(e, settings.advertise_url.as_deref()))
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?,
        fabric_node,
    };
    let lease = WorkerLease::register(
        endpoints,
        &settings.cluster_id,
        record.clone(),
        settings.registration_ttl_s,
    )
    .await
    .context("registering in the cluster")?;
    println!("registered as {} in cluster {}", record.name, settings.cluster_id);
    Ok(Some(lease))
}

/// The KV event endpoint registered for routers to subscribe to: the
/// bound `tcp://HOST:PORT`, except that a bind host meaning every address
/// (`0.0.0.0`, `::`, `*`) is replaced by the host of `advertise_url`; an
/// error without one (routers cannot reach "every address").
fn advertised_events(bound: &str, advertise_url: Option<&str>) -> Result<String, String> {
    let Some((host, port)) = bound.strip_prefix("tcp://").and_then(|r| r.rsplit_once(':')) else {
        return Err(format!("kv-events {bound:?} is not tcp://host:port"));
    };
    let unspecified = host == "*"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
    if !unspecified {
        return Ok(bound.to_string());
    }
    let advertised = advertise_url
        .and_then(|u| u.strip_prefix("http://"))
        .map(|r| r.trim_end_matches('/'))
        .and_then(|r| r.rsplit_once(':'))
        .map(|(h, _)| h)
        .filter(|h| !h.is_empty());
    match advertised {
        Some(h) => Ok(format!("tcp://{h}:{port}")),
        None => Err(format!(
            "kv-events binds {bound}, every address, which routers cannot subscribe to: set advertise-url (its host is registered for the events) or bind kv-events to a reachable address"
        )),
    }
}

/// Longest name the registry takes.
const MAX_NAME: usize = 64;

/// The name registered when `name` is unset: `worker-HOST-PORT` from the
/// registered URL, every character the registry does not take as `-`; when
/// that is longer than the registry's 64, its first 47 characters, `-` and
/// 16 hex digits of a hash of the URL, so it always fits and different
/// URLs still get different names.
fn default_name(url: &str) -> String {
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    let name: String = format!("worker-{hostport}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.len() <= MAX_NAME {
        return name;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{}-{hash:016x}", &name[..MAX_NAME - 17])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_always_fit_the_registry() {
        assert_eq!(default_name("http://10.0.0.7:8100"), "worker-10.0.0.7-8100");
        assert_eq!(default_name("http://[::1]:8100"), "worker----1--8100");
        let long_host = format!("http://{}.example.internal:8100", "worker-host".repeat(6));
        let v6 = "http://[fd12:3456:789a:1::abcd:ef01:2345]:65535/".to_string();
        let other_port = long_host.replace(":8100", ":8101");
        let mut seen = std::collections::HashSet::new();
        for url in [&long_host, &v6, &other_port] {
            let n = default_name(url);
            assert!(n.len() <= MAX_NAME, "{n}");
            kvfabric::cluster::validate_id("name", &n).unwrap();
            assert!(seen.insert(n.clone()), "distinct: {n}");
        }
        assert_eq!(default_name(&long_host), default_name(&long_host), "stable");
    }

    #[test]
    fn kv_events_bound_to_every_address_advertise_the_url_host() {
        let adv = Some("http://10.1.2.3:8100");
        assert_eq!(
            advertised_events("tcp://10.0.0.5:5557", adv).unwrap(),
            "tcp://10.0.0.5:5557"
        );
        assert_eq!(
            advertised_events("tcp://10.0.0.5:5557", None).unwrap(),
            "tcp://10.0.0.5:5557"
        );
        assert_eq!(
            advertised_events("tcp://0.0.0.0:5557", adv).unwrap(),
            "tcp://10.1.2.3:5557"
        );
        assert_eq!(
            advertised_events("tcp://[::]:5557", adv).unwrap(),
            "tcp://10.1.2.3:5557"
        );
        assert_eq!(advertised_events("tcp://*:5557", adv).unwrap(), "tcp://10.1.2.3:5557");
        assert_eq!(
            advertised_events("tcp://0.0.0.0:5557", Some("http://[fd00::7]:8100/")).unwrap(),
            "tcp://[fd00::7]:5557"
        );
        assert_eq!(
            advertised_events("tcp://0.0.0.0:5557", Some("http://worker-3.lan:8100")).unwrap(),
            "tcp://worker-3.lan:5557"
        );
        let e = advertised_events("tcp://0.0.0.0:5557", None).unwrap_err();
        assert!(e.contains("advertise-url"), "{e}");
    }
}
