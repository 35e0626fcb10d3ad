//! Router settings: the TOML file, then `KVFABRIC_ROUTER_*` environment
//! variables, then command-line flags (later wins; the binary overlays the
//! last two with [`Overrides`]). Every field's default and bound is in its
//! doc comment and in the README's router configuration reference;
//! [`Settings::validate`] runs at load, so a bad value stops the router with a
//! message naming the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kvfabric::auth::Token;
use kvfabric::tls::ClientTls;
use serde::{Deserialize, Deserializer};

use crate::score::CostSettings;

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse into settings (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// A value is out of bounds; the message names the setting.
    #[error("{0}")]
    Invalid(String),
}

pub use kvfabric::size::ByteSize;

/// One fabric node whose `Subscribe` stream the router follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FabricEndpoint {
    /// Name workers refer to in `fabric-node` (default: the URL itself).
    pub name: String,
    /// gRPC endpoint, e.g. `http://127.0.0.1:50051`, or `https://...` for
    /// a node that speaks TLS (needs `fabric-ca-file`).
    pub url: String,
}

impl FromStr for FabricEndpoint {
    type Err = String;
    /// `URL` or `NAME=URL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, url) = match s.split_once('=') {
            Some((n, u)) if !n.contains("://") => (n.trim().to_string(), u.trim().to_string()),
            _ => (s.to_string(), s.to_string()),
        };
        if url.is_empty() || name.is_empty() {
            return Err(format!("invalid fabric endpoint {s:?}: expected URL or NAME=URL"));
        }
        Ok(FabricEndpoint { name, url })
    }
}

impl<'de> Deserialize<'de> for FabricEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            url: String,
            name: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            T(Table),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("a fabric endpoint is \"URL\", \"NAME=URL\" or { url = ..., name = ... }")
        })? {
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::T(t) => Ok(FabricEndpoint {
                name: t.name.unwrap_or_else(|| t.url.clone()),
                url: t.url,
            }),
        }
    }
}

/// Parses a comma-separated list of fabric endpoints (`URL` or `NAME=URL`).
pub fn parse_fabric_list(s: &str) -> Result<Vec<FabricEndpoint>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(FabricEndpoint::from_str)
        .collect()
}

/// One engine worker the router forwards to (`[[workers]]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerSettings {
    /// Unique name, used in metrics and logs. Required.
    pub name: String,
    /// Base URL of its OpenAI-compatible server, `http://host:port`
    /// (plain HTTP). Required.
    pub url: String,
    /// ZMQ endpoint its engine publishes vLLM KV events on, e.g.
    /// `tcp://127.0.0.1:5557`. Unset: the worker publishes no events (see
    /// `approximate`).
    #[serde(default)]
    pub kv_events: Option<String>,
    /// Name of the fabric node on its host (one of `fabric`), read at that
    /// node's tier bandwidths instead of the network's. Unset: none.
    #[serde(default)]
    pub fabric_node: Option<String>,
}

impl FromStr for WorkerSettings {
    type Err = String;
    /// `NAME=URL` (the flag and environment form; events and co-location
    /// are set in the file).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split_once('=') {
            Some((n, u)) if !n.trim().is_empty() && !u.trim().is_empty() => Ok(WorkerSettings {
                name: n.trim().into(),
                url: u.trim().into(),
                kv_events: None,
                fabric_node: None,
            }),
            _ => Err(format!("invalid worker {s:?}: expected NAME=URL")),
        }
    }
}

/// Everything the router is configured with. (Not `PartialEq`: the
/// loaded `fabric_tls` holds key material, never compared.)
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// HTTP listen address of the OpenAI-compatible API, `/health` and
    /// `/metrics`. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Fabric nodes to follow: strings `URL` / `NAME=URL` or tables
    /// `{ url, name }`; a URL is `http://host:port` (plain gRPC: not with
    /// `fabric-ca-file`), `https://host:port` (a node that speaks TLS:
    /// needs `fabric-ca-file`) or `host:port` (`https://` when
    /// `fabric-ca-file` is set, else `http://`). Default none (engine
    /// events only).
    pub fabric: Vec<FabricEndpoint>,
    /// Every this many ms, ask each `fabric` node for the cluster's serving
    /// members (`Members`) and follow every member's events too (a node
    /// joining is subscribed to, a node leaving is forgotten); a single
    /// node answers that it is alone and nothing changes. With `cluster`
    /// set, the members come from the registry's watch instead, as they
    /// change (no `fabric` entry needed). 0 turns discovery off. Default
    /// 2000; 0 or 100..=600000.
    pub fabric_discover_ms: u64,
    /// Fabric tenant the subscriptions act as. Default empty (`default`).
    /// On fabric nodes that authenticate, the token (`fabric-token-file`)
    /// must be this tenant's: a node refuses a token acting for another.
    /// Left empty, the subscriptions act for the token's own tenant.
    pub tenant: String,
    /// File holding the bearer token sent on every call to the fabric
    /// nodes (`Subscribe`, `Members`), for nodes that authenticate (`[auth]`
    /// in the node's settings): the file's content less surrounding
    /// whitespace, 16 to 512 visible ASCII characters. [`Settings::load`]
    /// reads it into `fabric_token`, and a file that is missing or holds
    /// no valid token stops the router. Default unset: the token in
    /// `$KVFABRIC_TOKEN` if that is set and not empty, else none (nodes
    /// that authenticate refuse the router: no fabric events).
    pub fabric_token_file: Option<PathBuf>,
    /// The token itself, as [`Settings::load`] read it from
    /// `fabric-token-file` or `$KVFABRIC_TOKEN`; in-process users may set
    /// it directly. Not a TOML key. When it is unset and
    /// `fabric-token-file` is set (settings not made by `load`), the file
    /// is read at start. Default none.
    #[serde(skip)]
    pub fabric_token: Option<Token>,
    /// PEM file of the CA whose certificates the fabric nodes that speak
    /// TLS present (`[tls]` in the node's settings; endpoints `https://`):
    /// the router trusts that CA and no other (no public roots), and
    /// connects to fabric nodes over TLS only. Required when a `fabric`
    /// URL is `https://`, refused with an `http://` one; a cluster whose nodes use TLS
    /// registers `https://` endpoints, which discovery follows only with
    /// it. [`Settings::load`] reads it into `fabric_tls`, and a file that
    /// is missing or holds no PEM certificate stops the router. Default
    /// unset: plain gRPC only.
    pub fabric_ca_file: Option<PathBuf>,
    /// PEM certificate the router presents to fabric nodes that require
    /// one (`[tls] client-ca-file` on the node), with `fabric-client-key`
    /// (both or neither); needs `fabric-ca-file`. Default unset.
    pub fabric_client_cert: Option<PathBuf>,
    /// PEM private key of `fabric-client-cert`. Default unset.
    pub fabric_client_key: Option<PathBuf>,
    /// The TLS client settings themselves, as [`Settings::load`] read them
    /// from `fabric-ca-file` (and `fabric-client-cert` /
    /// `fabric-client-key`); in-process users may set them directly. Not
    /// a TOML key. When unset and `fabric-ca-file` is set (settings not
    /// made by `load`), the files are read at start. Default none.
    #[serde(skip)]
    pub fabric_tls: Option<ClientTls>,
    /// Fabric namespace whose blocks the router follows; its salt seeds the
    /// canonical block hash, so it must be the engines' namespace. Default
    /// `default`; 1 to 128 of `[A-Za-z0-9._-]`, as on the fabric.
    pub namespace: String,
    /// Model names served. A request naming another model gets 404
    /// `model_not_found`. Default empty: any name is accepted and forwarded;
    /// `/v1/models` lists these.
    pub models: Vec<String>,
    /// A Hugging Face `tokenizer.json` for text prompts. Default unset: text
    /// is tokenised as the reference engine does: BOS (256), then one token
    /// per UTF-8 byte. Token-id prompts never need one.
    pub tokenizer: Option<PathBuf>,
    /// The cost model (tier bandwidths, weights, temperature, block size).
    pub cost: CostSettings,
    /// Workers to forward to. Default none (every request gets 503).
    pub workers: Vec<WorkerSettings>,
    /// The cluster registry to take more workers from,
    /// `etcd://HOST:PORT[,HOST:PORT...]` (or `etcds://` with TLS and
    /// credentials: see `kvfabric::cluster::EtcdTarget`): the fabric nodes
    /// serving in it are followed (see `fabric-discover-ms`), and every worker registered under
    /// `cluster-id` (`kvfabric register-worker`, `kvfabric-worker
    /// --cluster`) is added while its record lives, and removed (its index
    /// entries dropped) when it goes. A registered name equal to a
    /// configured worker's is ignored. Default unset.
    pub cluster: Option<String>,
    /// The cluster whose registry `cluster` names. Default `kvfabric` (the
    /// fabric's default); 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub cluster_id: String,
    /// Interval between health checks (`GET {url}/health`) of every worker,
    /// healthy or not, ms. Default 2000; 10..=600000.
    pub health_interval_ms: u64,
    /// Time a health check may take before it counts as failed, ms.
    /// Default 1000; 10..=600000.
    pub health_timeout_ms: u64,
    /// Time a forwarded request may wait for the worker's response headers,
    /// and then for each piece of its body, ms; past it the client gets 504
    /// (or, mid-stream, an error event). Default 600000; 10..=86400000.
    pub request_timeout_ms: u64,
    /// Approximate mode for workers without `kv-events`: the router records
    /// each of its decisions as that worker holding the request's blocks in
    /// HBM for `approximate-ttl-ms`. Default false.
    pub approximate: bool,
    /// Lifetime of an approximate-mode record, ms. Default 120000;
    /// 1..=86400000.
    pub approximate_ttl_ms: u64,
    /// Largest request body accepted; larger ones get 413. Default `4MiB`;
    /// 1KiB..=1GiB.
    pub max_body_size: ByteSize,
    /// Seed of tie breaks and softmax sampling. Default 0.
    pub seed: u64,
    /// Log filter (`tracing` env-filter syntax). Default `info`; `RUST_LOG`
    /// overrides.
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            fabric: Vec::new(),
            fabric_discover_ms: 2000,
            tenant: String::new(),
            fabric_token_file: None,
            fabric_token: None,
            fabric_ca_file: None,
            fabric_client_cert: None,
            fabric_client_key: None,
            fabric_tls: None,
            namespace: "default".into(),
            models: Vec::new(),
            tokenizer: None,
            cost: CostSettings::default(),
            workers: Vec::new(),
            cluster: None,
            cluster_id: "kvfabric".into(),
            health_interval_ms: 2000,
            health_timeout_ms: 1000,
            request_timeout_ms: 600_000,
            approximate: false,
            approximate_ttl_ms: 120_000,
            max_body_size: ByteSize(4 << 20),
            seed: 0,
            log: "info".into(),
        }
    }
}

/// What the environment and flags may override, applied over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen` / `KVFABRIC_ROUTER_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--fabric` / `KVFABRIC_ROUTER_FABRIC` (replaces the file's list).
    pub fabric: Option<Vec<FabricEndpoint>>,
    /// `--namespace` / `KVFABRIC_ROUTER_NAMESPACE`.
    pub namespace: Option<String>,
    /// `--tenant` / `KVFABRIC_ROUTER_TENANT`.
    pub tenant: Option<String>,
    /// `--fabric-token-file` / `KVFABRIC_ROUTER_FABRIC_TOKEN_FILE`.
    pub fabric_token_file: Option<PathBuf>,
    /// `--fabric-ca-file` / `KVFABRIC_ROUTER_FABRIC_CA_FILE`.
    pub fabric_ca_file: Option<PathBuf>,
    /// `--fabric-client-cert` / `KVFABRIC_ROUTER_FABRIC_CLIENT_CERT`.
    pub fabric_client_cert: Option<PathBuf>,
    /// `--fabric-client-key` / `KVFABRIC_ROUTER_FABRIC_CLIENT_KEY`.
    pub fabric_client_key: Option<PathBuf>,
    /// `--model` / `KVFABRIC_ROUTER_MODELS` (replaces the file's list).
    pub models: Option<Vec<String>>,
    /// `--tokenizer` / `KVFABRIC_ROUTER_TOKENIZER`.
    pub tokenizer: Option<PathBuf>,
    /// `--worker` / `KVFABRIC_ROUTER_WORKERS` (added to the file's list).
    pub workers: Vec<WorkerSettings>,
    /// `--approximate` / `KVFABRIC_ROUTER_APPROXIMATE`.
    pub approximate: Option<bool>,
    /// `--seed` / `KVFABRIC_ROUTER_SEED`.
    pub seed: Option<u64>,
    /// `--cluster` / `KVFABRIC_ROUTER_CLUSTER`.
    pub cluster: Option<String>,
    /// `--cluster-id` / `KVFABRIC_ROUTER_CLUSTER_ID`.
    pub cluster_id: Option<String>,
}

impl Settings {
    /// Parses TOML (unknown keys are errors) and validates.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let s: Settings = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        s.validate().map_err(ConfigError::Invalid)?;
        Ok(s)
    }

    /// Reads and parses a TOML file (`None`: the defaults), applies
    /// `overrides`, validates the result and reads the fabric token
    /// (`fabric-token-file`, else `$KVFABRIC_TOKEN`) and the fabric TLS
    /// files (`fabric-ca-file`, `fabric-client-cert`, `fabric-client-key`).
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Settings, ConfigError> {
        let mut s = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?
            }
            None => Settings::default(),
        };
        s.apply(overrides);
        s.validate().map_err(ConfigError::Invalid)?;
        s.fabric_token =
            Token::from_setting(s.fabric_token_file.as_deref(), "fabric-token-file").map_err(ConfigError::Invalid)?;
        s.fabric_tls = s.tls_to_use().map_err(ConfigError::Invalid)?;
        Ok(s)
    }

    /// The TLS client settings fabric connections use: `fabric_tls` when
    /// set, else those in `fabric-ca-file` (and `fabric-client-cert` +
    /// `fabric-client-key`), read and checked now; the message names the
    /// setting.
    pub(crate) fn tls_to_use(&self) -> Result<Option<ClientTls>, String> {
        if let Some(t) = &self.fabric_tls {
            return Ok(Some(t.clone()));
        }
        ClientTls::from_settings(
            self.fabric_ca_file.as_deref(),
            self.fabric_client_cert.as_deref(),
            self.fabric_client_key.as_deref(),
            ["fabric-ca-file", "fabric-client-cert", "fabric-client-key"],
        )
    }

    /// The token fabric connections send: `fabric_token` when set, else
    /// the one in `fabric-token-file`, read now; the message names the
    /// setting.
    pub(crate) fn token_to_send(&self) -> Result<Option<Token>, String> {
        match (&self.fabric_token, &self.fabric_token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(f)) => Token::from_file(f)
                .map(Some)
                .map_err(|e| format!("fabric-token-file: {e}")),
            (None, None) => Ok(None),
        }
    }

    /// Applies environment / flag overrides.
    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.fabric {
            self.fabric = v;
        }
        if let Some(v) = o.namespace {
            self.namespace = v;
        }
        if let Some(v) = o.tenant {
            self.tenant = v;
        }
        if let Some(v) = o.fabric_token_file {
            self.fabric_token_file = Some(v);
        }
        if let Some(v) = o.fabric_ca_file {
            self.fabric_ca_file = Some(v);
        }
        if let Some(v) = o.fabric_client_cert {
            self.fabric_client_cert = Some(v);
        }
        if let Some(v) = o.fabric_client_key {
            self.fabric_client_key = Some(v);
        }
        if let Some(v) = o.models {
            self.models = v;
        }
        if let Some(v) = o.tokenizer {
            self.tokenizer = Some(v);
        }
        self.workers.extend(o.workers);
        if let Some(v) = o.approximate {
            self.approximate = v;
        }
        if let Some(v) = o.seed {
            self.seed = v;
        }
        if let Some(v) = o.cluster {
            self.cluster = Some(v);
        }
        if let Some(v) = o.cluster_id {
            self.cluster_id = v;
        }
    }

    /// The etcd target `cluster` names (endpoints, TLS, credentials), if set.
    pub fn cluster_endpoints(&self) -> Result<Option<kvfabric::cluster::EtcdTarget>, String> {
        self.cluster
            .as_deref()
            .map(|u| kvfabric::cluster::parse_etcd_url(u).map_err(|e| format!("cluster: {e}")))
            .transpose()
    }

    /// Checks bounds and cross-references; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.cost.validate()?;
        kvfabric::validate::name("namespace", &self.namespace)?;
        if !self.tenant.is_empty() {
            kvfabric::validate::name("tenant", &self.tenant)?;
        }
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be {lo}..={hi}, got {v}"))
            }
        };
        range("health-interval-ms", self.health_interval_ms, 10, 600_000)?;
        if self.fabric_discover_ms != 0 {
            range("fabric-discover-ms", self.fabric_discover_ms, 100, 600_000)?;
        }
        range("health-timeout-ms", self.health_timeout_ms, 10, 600_000)?;
        range("request-timeout-ms", self.request_timeout_ms, 10, 86_400_000)?;
        range("approximate-ttl-ms", self.approximate_ttl_ms, 1, 86_400_000)?;
        range("max-body-size", self.max_body_size.0, 1 << 10, 1 << 30)?;
        self.cluster_endpoints()?;
        kvfabric::cluster::validate_id("cluster-id", &self.cluster_id)?;
        let tls = self.fabric_tls.is_some() || self.fabric_ca_file.is_some();
        if self.fabric_client_cert.is_some() != self.fabric_client_key.is_some() {
            return Err(CERT_AND_KEY.into());
        }
        if self.fabric_client_cert.is_some() && !tls {
            return Err(
                "fabric-client-cert needs fabric-ca-file (the CA that signs the fabric nodes' certificates)".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, f) in self.fabric.iter().enumerate() {
            let what = format!("fabric[{i}] url");
            if f.url.contains("://") {
                kvfabric::validate::grpc_base_url(&what, &f.url)?;
            } else {
                // No scheme: https:// with a CA, as the fabric client reads it.
                kvfabric::validate::grpc_base_url(&what, &format!("http://{}", f.url)).map_err(|_| {
                    format!(
                        "{what} {:?} must be host:port, http://host:port or https://host:port",
                        f.url
                    )
                })?;
            }
            if f.url.starts_with("https://") && !tls {
                return Err(format!(
                    "{what} {:?} is https:// (a node that speaks TLS): set fabric-ca-file to the CA that signs its certificate",
                    f.url
                ));
            }
            if f.url.starts_with("http://") && tls {
                return Err(format!(
                    "{what} {:?} is plain http:// but fabric-ca-file is set: fabric connections then use TLS only \
                     (the token never crosses in the clear); use https://, or unset fabric-ca-file",
                    f.url
                ));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("fabric[{i}] name {:?} is used twice", f.name));
            }
        }
        let mut workers = std::collections::HashSet::new();
        for (i, w) in self.workers.iter().enumerate() {
            if w.name.is_empty() {
                return Err(format!("workers[{i}].name must not be empty"));
            }
            if !workers.insert(w.name.as_str()) {
                return Err(format!("workers[{i}].name {:?} is used twice", w.name));
            }
            kvfabric::validate::http_base_url(&format!("workers[{i}].url"), &w.url)?;
            if let Some(e) = &w.kv_events {
                kvfabric::validate::tcp_endpoint(&format!("workers[{i}].kv-events"), e)?;
            }
            if let Some(n) = &w.fabric_node
                && !names.contains(n.as_str())
            {
                return Err(format!("workers[{i}].fabric-node {n:?} names no entry of fabric"));
            }
        }
        Ok(())
    }
}

/// What a client certificate without its key (or the reverse) is told.
const CERT_AND_KEY: &str = "fabric-client-cert and fabric-client-key go together: set both or neither";

/// Checks a worker's URL: `http://host:port` (plain HTTP, what the router
/// forwards with), no path. Configured workers and registered ones alike.
pub(crate) fn check_worker_url(url: &str) -> Result<(), String> {
    kvfabric::validate::http_base_url("worker url", url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_a_full_file_parses() {
        Settings::default().validate().unwrap();
        let s = Settings::from_toml(
            r#"
            listen = "0.0.0.0:9000"
            fabric = ["http://10.0.0.1:50051", { url = "http://10.0.0.2:50051", name = "b" }]
            namespace = "llama"
            models = ["llama-8b"]
            max-body-size = "1MiB"
            approximate = true
            [cost]
            temperature = 0.5
            reach = "colocated"
            loads = "all"
            load-overlaps-queue = true
            [cost.bandwidth]
            host = 1e10
            [[workers]]
            name = "w1"
            url = "http://10.0.0.3:8000"
            kv-events = "tcp://10.0.0.3:5557"
            fabric-node = "b"
            "#,
        )
        .unwrap();
        assert_eq!(s.fabric[0].name, "http://10.0.0.1:50051");
        assert_eq!(s.fabric[1].name, "b");
        assert_eq!(s.max_body_size, ByteSize(1 << 20));
        assert_eq!(s.cost.temperature, 0.5);
        assert_eq!(s.cost.reach, crate::score::Reach::Colocated);
        assert_eq!(s.cost.loads, crate::score::Loads::All);
        assert!(s.cost.load_overlaps_queue);
        assert_eq!(s.cost.bandwidth.host, 1e10);
        assert_eq!(s.workers[0].fabric_node.as_deref(), Some("b"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (toml, want) in [
            ("bogus = 1", "bogus"),
            ("health-interval-ms = 1", "health-interval-ms"),
            ("max-body-size = \"2GiB\"", "max-body-size"),
            ("[cost]\ntemperature = -1.0", "cost.temperature"),
            ("cluster = \"http://x:1\"", "cluster"),
            ("cluster-id = \"a b\"", "cluster-id"),
            ("namespace = \"my ns\"", "namespace"),
            ("tenant = \"t/1\"", "tenant"),
            ("fabric = [\"grpc://x:1\"]", "fabric[0] url"),
            ("fabric = [\"http://x:1/v1\"]", "fabric[0] url"),
            ("fabric = [\"x\"]", "fabric[0] url"),
            ("fabric = [\"https://x:1\"]", "set fabric-ca-file"),
            (
                "fabric = [\"n=https://x:1\"]",
                "fabric[0] url \"https://x:1\" is https://",
            ),
            (
                "fabric-ca-file = \"/ca.pem\"\nfabric = [\"https://x:1\", \"http://y:1\"]",
                "fabric[1] url \"http://y:1\" is plain http:// but fabric-ca-file is set",
            ),
            ("fabric-client-cert = \"/c.pem\"", "fabric-client-key go together"),
            ("fabric-client-key = \"/k.pem\"", "fabric-client-key go together"),
            (
                "fabric-client-cert = \"/c.pem\"\nfabric-client-key = \"/k.pem\"",
                "fabric-client-cert needs fabric-ca-file",
            ),
            ("[cost]\nkv-bytes-per-token = 1000000000000", "cost.kv-bytes-per-token"),
            ("[cost.weights]\nprefill = 1e300", "cost.weights.prefill"),
            ("[cost.bandwidth]\nhost = 1e300", "cost.bandwidth.host"),
            ("[[workers]]\nname = \"a\"\nurl = \"https://x\"", "workers[0].url"),
            (
                "[[workers]]\nname = \"a\"\nurl = \"http://x:1\"\nfabric-node = \"nope\"",
                "workers[0].fabric-node",
            ),
            (
                "[[workers]]\nname = \"a\"\nurl = \"http://x:1\"\n[[workers]]\nname = \"a\"\nurl = \"http://y:1\"",
                "workers[1].name",
            ),
        ] {
            let e = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut s = Settings::from_toml("namespace = \"a\"\nseed = 3").unwrap();
        s.apply(Overrides {
            namespace: Some("b".into()),
            fabric: Some(parse_fabric_list("n1=http://h:1, http://h:2").unwrap()),
            workers: vec!["w=http://h:3".parse().unwrap()],
            ..Default::default()
        });
        assert_eq!(s.namespace, "b");
        assert_eq!(s.seed, 3);
        assert_eq!(s.fabric[0].name, "n1");
        assert_eq!(s.fabric[1].url, "http://h:2");
        assert_eq!(s.workers[0].url, "http://h:3");
        s.validate().unwrap();
        assert!("noequals".parse::<WorkerSettings>().is_err());
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
        let s = Settings::load(None, with(&good)).unwrap();
        assert_eq!(s.fabric_token.as_ref().unwrap().secret(), "kvf_0123456789abcdef");
        assert_eq!(s.token_to_send().unwrap(), s.fabric_token);
        for bad in [short, dir.path().join("missing")] {
            let e = Settings::load(None, with(&bad)).unwrap_err().to_string();
            assert!(e.starts_with("fabric-token-file: "), "{e}");
            assert!(e.contains(&bad.display().to_string()), "{e}");
        }
        // Settings not made by `load` read the file when started.
        let s = Settings::from_toml(&format!("fabric-token-file = {:?}", good.display().to_string())).unwrap();
        assert_eq!(s.fabric_token, None);
        assert_eq!(s.token_to_send().unwrap().unwrap().secret(), "kvf_0123456789abcdef");
        let s = Settings::from_toml("fabric-token-file = \"/no/such/token\"").unwrap();
        assert!(s.token_to_send().unwrap_err().starts_with("fabric-token-file: "));
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
            fabric: Some(parse_fabric_list("n1=https://127.0.0.1:50051, 127.0.0.1:50052").unwrap()),
            fabric_ca_file: Some(ca.to_path_buf()),
            fabric_client_cert: cert.map(Path::to_path_buf),
            fabric_client_key: key.map(Path::to_path_buf),
            ..Default::default()
        };
        let s = Settings::load(None, with(&ca, None, None)).unwrap();
        assert!(!s.fabric_tls.as_ref().unwrap().has_identity());
        let s = Settings::load(None, with(&ca, Some(&ca), Some(&key))).unwrap();
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
            let e = Settings::load(None, o).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // https:// without a CA, and a certificate without its key, are
        // refused before any file is read.
        let o = Overrides {
            fabric: Some(parse_fabric_list("https://127.0.0.1:50051").unwrap()),
            ..Default::default()
        };
        let e = Settings::load(None, o).unwrap_err().to_string();
        assert!(e.contains("fabric-ca-file"), "{e}");
        let e = Settings::load(None, with(&ca, Some(&ca), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fabric-client-cert and fabric-client-key"), "{e}");
        // Settings not made by `load` read the files when started; TLS
        // settings set in code need no file.
        let s = Settings::from_toml(&format!("fabric-ca-file = {:?}", ca.display().to_string())).unwrap();
        assert!(s.fabric_tls.is_none());
        assert!(s.tls_to_use().unwrap().is_some());
        let s = Settings::from_toml("fabric-ca-file = \"/no/such/ca.pem\"").unwrap();
        assert!(s.tls_to_use().unwrap_err().starts_with("fabric-ca-file "));
        let mut s = Settings {
            fabric: parse_fabric_list("https://127.0.0.1:50051").unwrap(),
            ..Default::default()
        };
        assert!(s.validate().is_err());
        s.fabric_tls = Some(kvfabric::tls::ClientTls::from_files(&ca, None, None).unwrap());
        s.validate().unwrap();
        assert!(s.tls_to_use().unwrap().is_some());
    }
}
