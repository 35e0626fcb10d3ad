//! Worker settings: the TOML file, then `KVFABRIC_WORKER_*` environment
//! variables, then command-line flags (later wins; the binary overlays the
//! last two with [`Overrides`]). Every field's default and bound is in its
//! doc comment and in the README's worker settings table;
//! [`WorkerSettings::validate`] runs at load, so a bad value stops the
//! worker with a message naming the setting.
//!
//! The model is either the default [`ModelConfig`], a model config TOML
//! file (`model`) or a `[model-config]` table inline (in-process users such
//! as tests and the demo set [`WorkerSettings::model_config`] directly).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kvfabric::auth::Token;
use kvfabric::size::ByteSize;
use kvfabric::tls::ClientTls;
use serde::Deserialize;

use crate::engine::ModelConfig;

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse into settings (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// A value is out of bounds; the message names the setting.
    #[error("invalid worker settings: {0}")]
    Invalid(String),
}

/// What a worker does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Prefills and decodes its own requests (default).
    #[default]
    Aggregated,
    /// Computes KV for decode workers (`POST /v1/prefill`) and stores it in
    /// the fabric; also serves completions.
    Prefill,
    /// Decodes; prefills a request on a prefill worker when its uncached
    /// part is long and the prefill worker's queue is short (conditional
    /// disaggregation), else locally.
    Decode,
}

impl Role {
    /// The name in settings and `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "aggregated" => Ok(Role::Aggregated),
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            other => Err(format!("role {other:?}: expected aggregated, prefill or decode")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a worker is configured with (TOML: kebab-case keys; every
/// key optional). (Not `PartialEq`: the loaded `fabric_tls` holds key
/// material, never compared.)
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerSettings {
    /// `aggregated`, `prefill` or `decode`. Default `aggregated`.
    pub role: Role,
    /// HTTP listen address (API, `/health`, `/metrics`). Default
    /// `127.0.0.1:8100`; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Fabric node endpoint, `http://host:port` (plain gRPC: not with
    /// `fabric-ca-file`), or `https://host:port` for a node that speaks
    /// TLS (`[tls]` in the node's settings; needs `fabric-ca-file`).
    /// Default unset: the worker uses only its own pool (no loads, no
    /// stores, no disaggregation).
    pub fabric: Option<String>,
    /// Unix socket of that node's zero-copy local path (`data-dir/kvfabric.sock`
    /// on the node), for a worker on the same host: block bytes then move
    /// through the node's shared arena instead of over gRPC. Default unset
    /// (gRPC only). A socket that cannot be opened is logged and the worker
    /// falls back to gRPC.
    pub fabric_socket: Option<PathBuf>,
    /// Time one fabric call (the connect, an `ExistsPrefix`, a request's
    /// block load or store) may take, ms. A call that runs out of it, or
    /// finds the node unreachable, leaves the request to go on without the
    /// fabric (computing what it would have loaded) and the node alone for
    /// a cooldown (1 s, doubling up to 30 s while it keeps failing).
    /// Default 5000; 1 to 600 000.
    pub fabric_timeout_ms: u64,
    /// Fabric tenant the worker acts as. Default empty (the node's default
    /// tenant). On a node that authenticates, the token
    /// (`fabric-token-file`) must be this tenant's; left empty, the worker
    /// acts for the token's own tenant.
    pub tenant: String,
    /// File holding the bearer token sent to the fabric node, on gRPC and
    /// in the local path's hello, for a node that authenticates (`[auth]`
    /// in the node's settings): the file's content less surrounding
    /// whitespace, 16 to 512 visible ASCII characters. The local path
    /// (`fabric-socket`) also needs the token to allow it (`local = true`
    /// in the node's tokens file). [`WorkerSettings::load`] reads it into
    /// `fabric_token`, and a file that is missing or holds no valid token
    /// stops the worker. Default unset: the token in `$KVFABRIC_TOKEN` if
    /// that is set and not empty, else none.
    pub fabric_token_file: Option<PathBuf>,
    /// The token itself, as [`WorkerSettings::load`] read it from
    /// `fabric-token-file` or `$KVFABRIC_TOKEN`; in-process users may set
    /// it directly. Not a TOML key. When it is unset and
    /// `fabric-token-file` is set (settings not made by `load`), the file
    /// is read at start. Default none.
    #[serde(skip)]
    pub fabric_token: Option<Token>,
    /// PEM file of the CA whose certificate the fabric node presents when
    /// it speaks TLS (`https://` in `fabric`): the worker trusts that CA
    /// and no other (no public roots). Required when `fabric` is
    /// `https://`, refused when it is `http://`. [`WorkerSettings::load`] reads it into `fabric_tls`,
    /// and a file that is missing or holds no PEM certificate stops the
    /// worker. The local path (`fabric-socket`) does not use it. Default
    /// unset: plain gRPC only.
    pub fabric_ca_file: Option<PathBuf>,
    /// PEM certificate the worker presents to a fabric node that requires
    /// one (`[tls] client-ca-file` on the node), with `fabric-client-key`
    /// (both or neither); needs `fabric-ca-file`. Default unset.
    pub fabric_client_cert: Option<PathBuf>,
    /// PEM private key of `fabric-client-cert`. Default unset.
    pub fabric_client_key: Option<PathBuf>,
    /// The TLS client settings themselves, as [`WorkerSettings::load`]
    /// read them from `fabric-ca-file` (and `fabric-client-cert` /
    /// `fabric-client-key`); in-process users may set them directly. Not
    /// a TOML key. When unset and `fabric-ca-file` is set (settings not
    /// made by `load`), the files are read at start. Default none.
    #[serde(skip)]
    pub fabric_tls: Option<ClientTls>,
    /// Fabric namespace of its KV blocks; its salt seeds the block hashes,
    /// so the router and every worker sharing blocks must use the same one.
    /// Default `default`; 1..=128 of `[A-Za-z0-9._-]`.
    pub namespace: String,
    /// Model config TOML file ([`ModelConfig`]). Default unset: the inline
    /// `model-config`, else `ModelConfig::default()` (`kvfabric-ref-tiny`).
    /// Not together with `model-config`.
    pub model: Option<PathBuf>,
    /// The model config inline (a `[model-config]` table). Default unset.
    pub model_config: Option<ModelConfig>,
    /// Safetensors weights (Hugging Face Llama names) for the model.
    /// Default unset: weights generated from the config's seed.
    pub weights: Option<PathBuf>,
    /// KV pool capacity in blocks (running sequences plus the worker's own
    /// prefix cache). Default 4096 (128 MiB for the default model); 1 to
    /// 16 777 216.
    pub pool_blocks: usize,
    /// Most prompt tokens computed in one prefill batch; a longer prompt
    /// still runs, alone. Default 2048; 1 to 1 048 576.
    pub max_batch_tokens: usize,
    /// Most sequences decoding at once; more requests wait. Default 64; 1
    /// to 4096.
    pub max_running: usize,
    /// Most requests waiting for prefill; more get 503. Default 1024; 1 to
    /// 1 048 576.
    pub max_waiting: usize,
    /// Largest `max_tokens` a request may ask for. Default 2048; 1 to
    /// 1 048 576 (the model's context bounds it too).
    pub max_tokens_limit: usize,
    /// Compute threads of the engine. Default 0: `available_parallelism`,
    /// at most 8; 0 to 256.
    pub threads: usize,
    /// ZMQ PUB bind address for vLLM-format KV events, `tcp://host:port`
    /// (port 0 picks a free one). Default unset: no events. A registered
    /// worker (`cluster`) bound to every address (`0.0.0.0`, `::`)
    /// registers `advertise-url`'s host for its events, and needs one.
    pub kv_events: Option<String>,
    /// Topic frame of every KV event message. Default `kv-events`; at most
    /// 255 bytes.
    pub kv_events_topic: String,
    /// Model name served (`/v1/models`, the `model` field). Default unset:
    /// the model id.
    pub served_model_name: Option<String>,
    /// Text prompts get a BOS token before their bytes. Default true.
    pub add_bos: bool,
    /// Prefill workers a decode worker may hand prompts to, base URLs
    /// `http://host:port`. Default none.
    pub prefill_workers: Vec<String>,
    /// A decode worker prefills remotely only when the prompt's uncached
    /// part (tokens neither in its own pool nor in the fabric) is at least
    /// this many tokens. Default 256; 1 to 1 048 576.
    pub disagg_min_uncached_tokens: usize,
    /// ... and only when the chosen prefill worker's queue depth (its
    /// `/health`) is below this. Default 8; 1 to 1 048 576.
    pub disagg_max_prefill_queue: usize,
    /// Time a remote prefill may take before the decode worker prefills
    /// locally, ms. Default 30000; 1 to 3 600 000.
    pub prefill_timeout_ms: u64,
    /// Time a prefill worker's `/health` may take, ms. Default 1000; 1 to
    /// 60 000.
    pub prefill_health_timeout_ms: u64,
    /// Largest request body accepted; larger ones get 413. Default `8MiB`;
    /// 1KiB..=1GiB.
    pub max_body_size: ByteSize,
    /// Time a request's body may take to arrive, ms; a slower one gets 408.
    /// Default 30000; 1 to 3 600 000.
    pub body_timeout_ms: u64,
    /// Time a shutdown waits for the requests in flight to finish, ms;
    /// those still running then are cut off. Default 30000; 0 to
    /// 3 600 000.
    pub shutdown_timeout_ms: u64,
    /// Log filter (`tracing` env-filter syntax) of the binary. Default
    /// `info`; `RUST_LOG` overrides.
    pub log: String,
    /// Cluster registry to register in, `etcd://HOST:PORT[,...]` (or `etcds://` with TLS and credentials), so that
    /// routers with the same `cluster` route to this worker (the
    /// `kvfabric-worker` binary registers an aggregated or decode worker
    /// once serving, under a lease, and removes it on shutdown; prefill
    /// workers are reached through decode workers and do not register).
    /// Default unset.
    pub cluster: Option<String>,
    /// The cluster's id. Default `kvfabric`.
    pub cluster_id: String,
    /// Name registered; unique in the cluster, 1 to 64 of
    /// `A-Z a-z 0-9 . _ -`. Default `worker-HOST-PORT` from the
    /// registered URL (cut to 47 characters plus a hash when longer than
    /// 64).
    pub name: Option<String>,
    /// Base URL registered, `http://host:port` (`https://` is refused).
    /// Default `http://` plus the
    /// bound listen address (set it when that is not reachable from the
    /// routers, e.g. when listening on 0.0.0.0).
    pub advertise_url: Option<String>,
    /// TTL of the registration's lease, s: how long routers keep a crashed
    /// worker's record. Default 10; 2..=3600.
    pub registration_ttl_s: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            role: Role::Aggregated,
            listen: SocketAddr::from(([127, 0, 0, 1], 8100)),
            fabric: None,
            fabric_socket: None,
            fabric_timeout_ms: 5000,
            tenant: String::new(),
            fabric_token_file: None,
            fabric_token: None,
            fabric_ca_file: None,
            fabric_client_cert: None,
            fabric_client_key: None,
            fabric_tls: None,
            namespace: "default".into(),
            model: None,
            model_config: None,
            weights: None,
            pool_blocks: 4096,
            max_batch_tokens: 2048,
            max_running: 64,
            max_waiting: 1024,
            max_tokens_limit: 2048,
            threads: 0,
            kv_events: None,
            kv_events_topic: "kv-events".into(),
            served_model_name: None,
            add_bos: true,
            prefill_workers: Vec::new(),
            disagg_min_uncached_tokens: 256,
            disagg_max_prefill_queue: 8,
            prefill_timeout_ms: 30_000,
            prefill_health_timeout_ms: 1000,
            max_body_size: ByteSize(8 << 20),
            body_timeout_ms: 30_000,
            shutdown_timeout_ms: 30_000,
            log: "info".into(),
            cluster: None,
            cluster_id: "kvfabric".into(),
            name: None,
            advertise_url: None,
            registration_ttl_s: 10,
        }
    }
}

/// What the environment and flags may override, applied over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--role` / `KVFABRIC_WORKER_ROLE`.
    pub role: Option<Role>,
    /// `--listen` / `KVFABRIC_WORKER_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--fabric` / `KVFABRIC_WORKER_FABRIC`.
    pub fabric: Option<String>,
    /// `--fabric-socket` / `KVFABRIC_WORKER_FABRIC_SOCKET`.
    pub fabric_socket: Option<PathBuf>,
    /// `--fabric-timeout-ms` / `KVFABRIC_WORKER_FABRIC_TIMEOUT_MS`.
    pub fabric_timeout_ms: Option<u64>,
    /// `--tenant` / `KVFABRIC_WORKER_TENANT`.
    pub tenant: Option<String>,
    /// `--fabric-token-file` / `KVFABRIC_WORKER_FABRIC_TOKEN_FILE`.
    pub fabric_token_file: Option<PathBuf>,
    /// `--fabric-ca-file` / `KVFABRIC_WORKER_FABRIC_CA_FILE`.
    pub fabric_ca_file: Option<PathBuf>,
    /// `--fabric-client-cert` / `KVFABRIC_WORKER_FABRIC_CLIENT_CERT`.
    pub fabric_client_cert: Option<PathBuf>,
    /// `--fabric-client-key` / `KVFABRIC_WORKER_FABRIC_CLIENT_KEY`.
    pub fabric_client_key: Option<PathBuf>,
    /// `--namespace` / `KVFABRIC_WORKER_NAMESPACE`.
    pub namespace: Option<String>,
    /// `--model` / `KVFABRIC_WORKER_MODEL`.
    pub model: Option<PathBuf>,
    /// `--weights` / `KVFABRIC_WORKER_WEIGHTS`.
    pub weights: Option<PathBuf>,
    /// `--pool-blocks` / `KVFABRIC_WORKER_POOL_BLOCKS`.
    pub pool_blocks: Option<usize>,
    /// `--max-batch-tokens` / `KVFABRIC_WORKER_MAX_BATCH_TOKENS`.
    pub max_batch_tokens: Option<usize>,
    /// `--max-running` / `KVFABRIC_WORKER_MAX_RUNNING`.
    pub max_running: Option<usize>,
    /// `--max-waiting` / `KVFABRIC_WORKER_MAX_WAITING`.
    pub max_waiting: Option<usize>,
    /// `--max-tokens-limit` / `KVFABRIC_WORKER_MAX_TOKENS_LIMIT`.
    pub max_tokens_limit: Option<usize>,
    /// `--threads` / `KVFABRIC_WORKER_THREADS`.
    pub threads: Option<usize>,
    /// `--kv-events` / `KVFABRIC_WORKER_KV_EVENTS`.
    pub kv_events: Option<String>,
    /// `--kv-events-topic` / `KVFABRIC_WORKER_KV_EVENTS_TOPIC`.
    pub kv_events_topic: Option<String>,
    /// `--served-model-name` / `KVFABRIC_WORKER_SERVED_MODEL_NAME`.
    pub served_model_name: Option<String>,
    /// `--add-bos` / `KVFABRIC_WORKER_ADD_BOS`.
    pub add_bos: Option<bool>,
    /// `--prefill-worker` / `KVFABRIC_WORKER_PREFILL_WORKERS` (replaces the
    /// file's list).
    pub prefill_workers: Option<Vec<String>>,
    /// `--disagg-min-uncached-tokens` / `KVFABRIC_WORKER_DISAGG_MIN_UNCACHED_TOKENS`.
    pub disagg_min_uncached_tokens: Option<usize>,
    /// `--disagg-max-prefill-queue` / `KVFABRIC_WORKER_DISAGG_MAX_PREFILL_QUEUE`.
    pub disagg_max_prefill_queue: Option<usize>,
    /// `--prefill-timeout-ms` / `KVFABRIC_WORKER_PREFILL_TIMEOUT_MS`.
    pub prefill_timeout_ms: Option<u64>,
    /// `--prefill-health-timeout-ms` / `KVFABRIC_WORKER_PREFILL_HEALTH_TIMEOUT_MS`.
    pub prefill_health_timeout_ms: Option<u64>,
    /// `--max-body-size` / `KVFABRIC_WORKER_MAX_BODY_SIZE`.
    pub max_body_size: Option<ByteSize>,
    /// `--body-timeout-ms` / `KVFABRIC_WORKER_BODY_TIMEOUT_MS`.
    pub body_timeout_ms: Option<u64>,
    /// `--shutdown-timeout-ms` / `KVFABRIC_WORKER_SHUTDOWN_TIMEOUT_MS`.
    pub shutdown_timeout_ms: Option<u64>,
    /// `--cluster` / `KVFABRIC_WORKER_CLUSTER`.
    pub cluster: Option<String>,
    /// `--cluster-id` / `KVFABRIC_WORKER_CLUSTER_ID`.
    pub cluster_id: Option<String>,
    /// `--name` / `KVFABRIC_WORKER_NAME`.
    pub name: Option<String>,
    /// `--advertise-url` / `KVFABRIC_WORKER_ADVERTISE_URL`.
    pub advertise_url: Option<String>,
    /// `--registration-ttl-s` / `KVFABRIC_WORKER_REGISTRATION_TTL_S`.
    pub registration_ttl_s: Option<u64>,
    /// `--log` / `KVFABRIC_WORKER_LOG`.
    pub log: Option<String>,
}

impl WorkerSettings {
    /// Parses TOML (unknown keys are errors) and validates.
    pub fn from_toml(text: &str) -> Result<WorkerSettings, SettingsError> {
        let s: WorkerSettings = toml::from_str(text).map_err(|e| SettingsError::Parse(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Reads and parses a TOML file (`None`: the defaults), applies
    /// `overrides`, validates the result and reads the fabric token
    /// (`fabric-token-file`, else `$KVFABRIC_TOKEN`) and the fabric TLS
    /// files (`fabric-ca-file`, `fabric-client-cert`, `fabric-client-key`).
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<WorkerSettings, SettingsError> {
        let mut s = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| SettingsError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| SettingsError::Parse(format!("{}: {e}", p.display())))?
            }
            None => WorkerSettings::default(),
        };
        s.apply(overrides);
        s.validate()?;
        s.fabric_token =
            Token::from_setting(s.fabric_token_file.as_deref(), "fabric-token-file").map_err(SettingsError::Invalid)?;
        s.fabric_tls = s.tls_to_use()?;
        Ok(s)
    }

    /// The TLS client settings fabric gRPC connections use: `fabric_tls`
    /// when set, else those in `fabric-ca-file` (and `fabric-client-cert`
    /// with `fabric-client-key`), read and checked now; the message names
    /// the setting.
    pub(crate) fn tls_to_use(&self) -> Result<Option<ClientTls>, SettingsError> {
        if let Some(t) = &self.fabric_tls {
            return Ok(Some(t.clone()));
        }
        ClientTls::from_settings(
            self.fabric_ca_file.as_deref(),
            self.fabric_client_cert.as_deref(),
            self.fabric_client_key.as_deref(),
            ["fabric-ca-file", "fabric-client-cert", "fabric-client-key"],
        )
        .map_err(SettingsError::Invalid)
    }

    /// The token fabric connections send: `fabric_token` when set, else
    /// the one in `fabric-token-file`, read now.
    pub(crate) fn token_to_send(&self) -> Result<Option<Token>, SettingsError> {
        match (&self.fabric_token, &self.fabric_token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(f)) => Token::from_file(f)
                .map(Some)
                .map_err(|e| SettingsError::Invalid(format!("fabric-token-file: {e}"))),
            (None, None) => Ok(None),
        }
    }

    /// Applies environment / flag overrides.
    pub fn apply(&mut self, o: Overrides) {
        macro_rules! set {
            ($($f:ident),*) => {$(
                if let Some(v) = o.$f {
                    self.$f = v;
                }
            )*};
        }
        macro_rules! set_opt {
            ($($f:ident),*) => {$(
                if let Some(v) = o.$f {
                    self.$f = Some(v);
                }
            )*};
        }
        set!(
            role,
            listen,
            fabric_timeout_ms,
            tenant,
            namespace,
            pool_blocks,
            max_batch_tokens,
            max_running,
            max_waiting,
            max_tokens_limit,
            threads,
            kv_events_topic,
            add_bos,
            prefill_workers,
            disagg_min_uncached_tokens,
            disagg_max_prefill_queue,
            prefill_timeout_ms,
            prefill_health_timeout_ms,
            max_body_size,
            body_timeout_ms,
            shutdown_timeout_ms,
            log,
            cluster_id,
            registration_ttl_s
        );
        set_opt!(
            fabric,
            fabric_socket,
            fabric_token_file,
            fabric_ca_file,
            fabric_client_cert,
            fabric_client_key,
            weights,
            kv_events,
            served_model_name,
            cluster,
            name,
            advertise_url
        );
        if let Some(m) = o.model {
            self.model = Some(m);
            self.model_config = None;
        }
    }

    /// The model config: `model-config`, else the `model` file, else the
    /// default; validated.
    pub fn resolve_model(&self) -> Result<ModelConfig, SettingsError> {
        let c = match (&self.model_config, &self.model) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => {
                ModelConfig::from_toml_file(p).map_err(|e| SettingsError::Invalid(format!("model: {e}")))?
            }
            (None, None) => ModelConfig::default(),
        };
        c.validate()
            .map_err(|e| SettingsError::Invalid(format!("model-config: {e}")))?;
        Ok(c)
    }

    /// Checks bounds and cross-references; the message names the setting.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: String| Err(SettingsError::Invalid(m));
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(SettingsError::Invalid(format!("{name} must be {lo}..={hi}, got {v}")))
            }
        };
        range("pool-blocks", self.pool_blocks as u64, 1, 1 << 24)?;
        range("max-batch-tokens", self.max_batch_tokens as u64, 1, 1 << 20)?;
        range("max-running", self.max_running as u64, 1, 4096)?;
        range("max-waiting", self.max_waiting as u64, 1, 1 << 20)?;
        range("max-tokens-limit", self.max_tokens_limit as u64, 1, 1 << 20)?;
        range("threads", self.threads as u64, 0, 256)?;
        range(
            "disagg-min-uncached-tokens",
            self.disagg_min_uncached_tokens as u64,
            1,
            1 << 20,
        )?;
        range(
            "disagg-max-prefill-queue",
            self.disagg_max_prefill_queue as u64,
            1,
            1 << 20,
        )?;
        range("fabric-timeout-ms", self.fabric_timeout_ms, 1, 600_000)?;
        range("prefill-timeout-ms", self.prefill_timeout_ms, 1, 3_600_000)?;
        range("prefill-health-timeout-ms", self.prefill_health_timeout_ms, 1, 60_000)?;
        range("max-body-size", self.max_body_size.0, 1 << 10, 1 << 30)?;
        range("body-timeout-ms", self.body_timeout_ms, 1, 3_600_000)?;
        range("shutdown-timeout-ms", self.shutdown_timeout_ms, 0, 3_600_000)?;
        if let Err(e) = kvfabric::validate::name("namespace", &self.namespace) {
            return invalid(e);
        }
        if !self.tenant.is_empty()
            && let Err(e) = kvfabric::validate::name("tenant", &self.tenant)
        {
            return invalid(e);
        }
        if let Some(f) = &self.fabric
            && let Err(e) = kvfabric::validate::grpc_base_url("fabric", f)
        {
            return invalid(e);
        }
        let tls = self.fabric_tls.is_some() || self.fabric_ca_file.is_some();
        match &self.fabric {
            Some(f) if f.starts_with("https://") && !tls => {
                return invalid(format!(
                    "fabric {f:?} is https:// (a node that speaks TLS): set fabric-ca-file to the CA that signs its certificate"
                ));
            }
            Some(f) if f.starts_with("http://") && tls => {
                return invalid(format!(
                    "fabric {f:?} is plain http:// but fabric-ca-file is set: the worker then reaches the node over \
                     TLS only (the token never crosses in the clear); use https://, or unset fabric-ca-file"
                ));
            }
            _ => {}
        }
        if self.fabric_client_cert.is_some() != self.fabric_client_key.is_some() {
            return invalid(CERT_AND_KEY.into());
        }
        if self.fabric_client_cert.is_some() && !tls {
            return invalid(
                "fabric-client-cert needs fabric-ca-file (the CA that signs the fabric node's certificate)".into(),
            );
        }
        if self.fabric_socket.is_some() && self.fabric.is_none() {
            return invalid("fabric-socket needs fabric (the node's gRPC endpoint answers ExistsPrefix)".into());
        }
        if self.model.is_some() && self.model_config.is_some() {
            return invalid("model and model-config are both set; use one".into());
        }
        if let Some(c) = &self.model_config
            && let Err(e) = c.validate()
        {
            return invalid(format!("model-config: {e}"));
        }
        if let Some(e) = &self.kv_events {
            let ok = e
                .strip_prefix("tcp://")
                .and_then(|r| r.rsplit_once(':'))
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return invalid(format!("kv-events {e:?} must be tcp://host:port"));
            }
        }
        if self.kv_events_topic.len() > 255 {
            return invalid("kv-events-topic must be at most 255 bytes".into());
        }
        if let Some(n) = &self.served_model_name
            && (n.is_empty() || n.len() > 256)
        {
            return invalid(format!("served-model-name must be 1..=256 bytes, got {n:?}"));
        }
        for (i, w) in self.prefill_workers.iter().enumerate() {
            if let Err(e) = check_base_url(w) {
                return invalid(format!("prefill-workers[{i}] {e}"));
            }
        }
        if let Some(c) = &self.cluster
            && let Err(e) = kvfabric::cluster::parse_etcd_url(c)
        {
            return invalid(format!("cluster: {e}"));
        }
        if let Err(e) = kvfabric::cluster::validate_id("cluster-id", &self.cluster_id) {
            return invalid(e);
        }
        if let Some(n) = &self.name
            && let Err(e) = kvfabric::cluster::validate_id("name", n)
        {
            return invalid(e);
        }
        if let Some(u) = &self.advertise_url
            && let Err(e) = check_base_url(u)
        {
            return invalid(format!("advertise-url {e}"));
        }
        if !(2..=3600).contains(&self.registration_ttl_s) {
            return invalid(format!(
                "registration-ttl-s must be 2..=3600, got {}",
                self.registration_ttl_s
            ));
        }
        Ok(())
    }

    /// Whether this worker may hand prefills to prefill workers: a decode
    /// worker with a fabric and at least one prefill worker.
    pub fn disaggregates(&self) -> bool {
        self.role == Role::Decode && self.fabric.is_some() && !self.prefill_workers.is_empty()
    }
}

/// What a client certificate without its key (or the reverse) is told.
const CERT_AND_KEY: &str = "fabric-client-cert and fabric-client-key go together: set both or neither";

/// `http://host:port`, no path, for workers' URLs (`prefill-workers`,
/// `advertise-url`). `https://` is refused by name: workers serve, and
/// reach each other over, plain HTTP. (The fabric's URL is checked with
/// [`kvfabric::validate::grpc_base_url`].)
fn check_base_url(u: &str) -> Result<(), String> {
    let rest = match u.strip_prefix("http://") {
        Some(r) => r,
        None if u.starts_with("https://") => {
            return Err(format!(
                "{u:?}: https is not supported (no TLS on this link); use http://host:port"
            ));
        }
        None => return Err(format!("{u:?} must be http://host:port (plain HTTP)")),
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !rest.contains('/') && p.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{u:?} must be a base URL with host and port and no path")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_a_full_file_parses() {
        WorkerSettings::default().validate().unwrap();
        let s = WorkerSettings::from_toml(
            r#"
            role = "decode"
            listen = "0.0.0.0:9100"
            fabric = "http://10.0.0.1:50051"
            namespace = "llama"
            pool-blocks = 128
            kv-events = "tcp://0.0.0.0:5557"
            prefill-workers = ["http://10.0.0.2:8100"]
            disagg-min-uncached-tokens = 64
            max-body-size = "1MiB"
            [model-config]
            num-layers = 2
            "#,
        )
        .unwrap();
        assert_eq!(s.role, Role::Decode);
        assert!(s.disaggregates());
        assert_eq!(s.max_body_size, ByteSize(1 << 20));
        assert_eq!(s.resolve_model().unwrap().num_layers, 2);
        assert_eq!(
            WorkerSettings::default().resolve_model().unwrap(),
            ModelConfig::default()
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (toml, want) in [
            ("bogus = 1", "bogus"),
            ("role = \"both\"", "role"),
            ("pool-blocks = 0", "pool-blocks"),
            ("max-running = 0", "max-running"),
            ("namespace = \"a b\"", "namespace"),
            ("fabric = \"grpc://x:1\"", "fabric"),
            ("fabric-socket = \"/run/kvfabric.sock\"", "fabric-socket"),
            ("kv-events = \"ipc:///tmp/x\"", "kv-events"),
            ("prefill-workers = [\"http://x\"]", "prefill-workers[0]"),
            ("prefill-timeout-ms = 0", "prefill-timeout-ms"),
            ("fabric-timeout-ms = 0", "fabric-timeout-ms"),
            ("body-timeout-ms = 0", "body-timeout-ms"),
            ("shutdown-timeout-ms = 3600001", "shutdown-timeout-ms"),
            ("max-body-size = \"2GiB\"", "max-body-size"),
            ("[model-config]\nnum-kv-heads = 3", "model-config"),
            ("model = \"/x.toml\"\n[model-config]\nseed = 1", "model-config"),
            ("cluster = \"http://x:1\"", "cluster"),
            ("cluster-id = \"a/b\"", "cluster-id"),
            ("name = \"\"", "name"),
            ("advertise-url = \"x:1\"", "advertise-url"),
            (
                "fabric = \"x:1\"",
                "fabric \"x:1\" must be http://host:port or https://host:port",
            ),
            (
                "fabric = \"http://x:1/v1\"",
                "fabric \"http://x:1/v1\" must be a base URL",
            ),
            ("fabric = \"https://x:1\"", "fabric \"https://x:1\" is https://"),
            (
                "fabric = \"http://x:1\"\nfabric-ca-file = \"/ca.pem\"",
                "fabric \"http://x:1\" is plain http:// but fabric-ca-file is set",
            ),
            ("fabric-client-cert = \"/c.pem\"", "fabric-client-key go together"),
            ("fabric-client-key = \"/k.pem\"", "fabric-client-key go together"),
            (
                "fabric-client-cert = \"/c.pem\"\nfabric-client-key = \"/k.pem\"",
                "fabric-client-cert needs fabric-ca-file",
            ),
            (
                "advertise-url = \"https://x:1\"",
                "advertise-url \"https://x:1\": https is not supported",
            ),
            ("registration-ttl-s = 1", "registration-ttl-s"),
        ] {
            let e = WorkerSettings::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut s = WorkerSettings::from_toml("namespace = \"a\"\npool-blocks = 3").unwrap();
        s.apply(Overrides {
            namespace: Some("b".into()),
            role: Some("prefill".parse().unwrap()),
            prefill_workers: Some(vec!["http://h:1".into()]),
            ..Default::default()
        });
        assert_eq!(s.namespace, "b");
        assert_eq!(s.pool_blocks, 3);
        assert_eq!(s.role, Role::Prefill);
        assert!(!s.disaggregates());
        s.validate().unwrap();
        assert!("x".parse::<Role>().is_err());
    }

    #[test]
    fn the_fabric_token_file_is_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("token");
        std::fs::write(&good, "kvf_0123456789abcdef\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "kvf_0123\n").unwrap();
        let with = |f: &Path| Overrides {
            fabric_token_file: Some(f.to_path_buf()),
            ..Default::default()
        };
        let s = WorkerSettings::load(None, with(&good)).unwrap();
        assert_eq!(s.fabric_token.as_ref().unwrap().secret(), "kvf_0123456789abcdef");
        assert_eq!(s.token_to_send().unwrap(), s.fabric_token);
        for bad in [short, dir.path().join("missing")] {
            let e = WorkerSettings::load(None, with(&bad)).unwrap_err().to_string();
            assert!(e.contains("fabric-token-file: "), "{e}");
            assert!(e.contains(&bad.display().to_string()), "{e}");
        }
        // Settings not made by `load` read the file when started.
        let s = WorkerSettings::from_toml(&format!("fabric-token-file = {:?}", good.display().to_string())).unwrap();
        assert_eq!(s.fabric_token, None);
        assert_eq!(s.token_to_send().unwrap().unwrap().secret(), "kvf_0123456789abcdef");
        let s = WorkerSettings::from_toml("fabric-token-file = \"/no/such/token\"").unwrap();
        assert!(
            s.token_to_send()
                .unwrap_err()
                .to_string()
                .contains("fabric-token-file: ")
        );
    }

    #[test]
    fn the_fabric_tls_files_are_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = file(
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        );
        let key = file("k.pem", "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n");
        let missing = dir.path().join("missing.pem");
        let with = |ca: &Path, cert: Option<&Path>, key: Option<&Path>| Overrides {
            fabric: Some("https://127.0.0.1:50051".into()),
            fabric_ca_file: Some(ca.to_path_buf()),
            fabric_client_cert: cert.map(Path::to_path_buf),
            fabric_client_key: key.map(Path::to_path_buf),
            ..Default::default()
        };
        let s = WorkerSettings::load(None, with(&ca, None, None)).unwrap();
        assert!(!s.fabric_tls.as_ref().unwrap().has_identity());
        let s = WorkerSettings::load(None, with(&ca, Some(&ca), Some(&key))).unwrap();
        assert!(s.fabric_tls.as_ref().unwrap().has_identity());
        assert!(s.tls_to_use().unwrap().unwrap().has_identity());
        // A bad file stops the load, naming its setting and the file.
        for (o, want, path) in [
            (with(&missing, None, None), "fabric-ca-file ", &missing),
            (with(&key, None, None), "fabric-ca-file ", &key),
            (with(&ca, Some(&key), Some(&key)), "fabric-client-cert ", &key),
            (with(&ca, Some(&ca), Some(&ca)), "fabric-client-key ", &ca),
            (with(&ca, Some(&ca), Some(&missing)), "fabric-client-key ", &missing),
        ] {
            let e = WorkerSettings::load(None, o).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // https:// without a CA, and a certificate without its key, are
        // refused before any file is read.
        let o = Overrides {
            fabric: Some("https://127.0.0.1:50051".into()),
            ..Default::default()
        };
        let e = WorkerSettings::load(None, o).unwrap_err().to_string();
        assert!(e.contains("fabric-ca-file"), "{e}");
        let e = WorkerSettings::load(None, with(&ca, Some(&ca), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fabric-client-cert and fabric-client-key"), "{e}");
        // Settings not made by `load` read the files when started; TLS
        // settings set in code need no file.
        let s = WorkerSettings::from_toml(&format!("fabric-ca-file = {:?}", ca.display().to_string())).unwrap();
        assert!(s.fabric_tls.is_none());
        assert!(s.tls_to_use().unwrap().is_some());
        let s = WorkerSettings::from_toml("fabric-ca-file = \"/no/such/ca.pem\"").unwrap();
        assert!(s.tls_to_use().unwrap_err().to_string().contains("fabric-ca-file "));
        let mut s = WorkerSettings {
            fabric: Some("https://127.0.0.1:50051".into()),
            ..Default::default()
        };
        assert!(s.validate().is_err());
        s.fabric_tls = Some(ClientTls::from_files(&ca, None, None).unwrap());
        s.validate().unwrap();
    }
}
