//! Node settings: TOML file, then `KVFABRIC_*` environment variables, then
//! command-line flags (later wins). Every field's default and bound is in
//! its doc comment and in the README's configuration reference; `validate`
//! runs at load so a bad value stops the node with a message naming it.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::size::ByteSize;

/// Everything a node is configured with.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// gRPC listen address. Default `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address. Default `127.0.0.1:9090`.
    pub metrics_listen: SocketAddr,
    /// Directory for the disk tier and node state. Default `./kvfabric-data`.
    pub data_dir: PathBuf,
    /// Node name reported in events. Default `kvfabric-node`.
    pub node_id: String,
    /// Host-memory tier.
    pub host: HostSettings,
    /// Disk tier.
    pub disk: DiskSettings,
    /// Object-store tier.
    pub object: ObjectSettings,
    /// GPU HBM tier.
    pub hbm: HbmSettings,
    /// Request limits.
    pub limits: LimitSettings,
    /// Zero-copy local path for co-located engines.
    pub local: LocalSettings,
    /// Background demotion and promotion between tiers.
    pub tiering: TieringSettings,
    /// Cluster membership (etcd). Without `cluster.etcd` the node runs alone.
    pub cluster: ClusterSettings,
    /// Client and node authentication (bearer tokens). Off by default.
    pub auth: AuthSettings,
    /// TLS on the gRPC listener and between nodes. Off by default.
    pub tls: TlsSettings,
    /// Log filter (`tracing` env-filter syntax). Default `info`; `RUST_LOG` overrides.
    pub log: String,
}

/// `[cluster]` settings: membership on etcd.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSettings {
    /// etcd endpoints, `etcd://HOST:PORT[,HOST:PORT...]`, or `etcds://`
    /// with TLS and credentials (see [`crate::cluster::EtcdTarget`]);
    /// unset = single node, no etcd (default).
    pub etcd: Option<String>,
    /// Cluster id: 1 to 64 of `A-Z a-z 0-9 . _ -`. Default `kvfabric`. The
    /// data directory remembers it; a node whose data directory belongs to
    /// another cluster refuses to start.
    pub id: String,
    /// gRPC address (`HOST:PORT`) other nodes and clients reach this node
    /// at. Default: the bound listen address, which must then not be a
    /// wildcard (`0.0.0.0`, `::`).
    pub advertise: Option<String>,
    /// Membership lease TTL in seconds: a node that stops renewing (crash,
    /// partition) leaves the member list this long after its last renewal.
    /// Default 10; 2..=300.
    pub lease_ttl_s: u64,
    /// How often the member record's used bytes are rewritten, in ms.
    /// Default 3000; 100..=600000.
    pub refresh_interval_ms: u64,
    /// Time between repair passes (re-replication and hand-off of objects
    /// to their owners) when the membership does not change; a change
    /// starts one at once. Default 10000; 100..=3600000, and at most a
    /// third of `tombstone-ttl-s` (cluster mode).
    pub repair_interval_ms: u64,
    /// Payload bytes per second repair may copy to other nodes, so
    /// foreground traffic keeps its latency; 0 = unlimited. Default 64MiB.
    pub repair_bytes_per_s: ByteSize,
    /// How long a delete is remembered (a tombstone), in seconds: a
    /// replica down for less than this does not bring deleted objects back
    /// when it returns. Default 86400; 60..=31536000, and (cluster mode) at
    /// least 3 x `repair-interval-ms`, so a node still holding a deleted
    /// object sees the tombstone in a pass or two before it expires (one
    /// pass may fail on an owner that does not answer).
    pub tombstone_ttl_s: u64,
    /// Most key tombstones kept; past it the oldest go first (counted in
    /// `kvfabric_tombstones_evicted_total`), so a flood of deletes (of keys
    /// nobody held, say) cannot take the node's memory. About 250 bytes
    /// each. Default 1000000; 1000..=100000000.
    pub max_tombstones: usize,
    /// Longest time after a membership change that reads also ask a key's
    /// earlier owners when its current owners lack it, in seconds; the
    /// members reporting their repair done ends it sooner. 0 = never ask
    /// earlier owners. Default 21600 (6 h: a terabyte at the default
    /// repair rate); 0..=604800.
    pub handoff_window_s: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            etcd: None,
            id: "kvfabric".into(),
            advertise: None,
            lease_ttl_s: 10,
            refresh_interval_ms: 3000,
            repair_interval_ms: 10_000,
            repair_bytes_per_s: ByteSize(64 << 20),
            tombstone_ttl_s: 86_400,
            max_tombstones: 1_000_000,
            handoff_window_s: 6 * 3600,
        }
    }
}

impl ClusterSettings {
    /// The registry's etcd (endpoints, TLS, credentials), or `None` in single-node mode.
    pub fn etcd_endpoints(&self) -> Result<Option<crate::cluster::EtcdTarget>, String> {
        self.etcd
            .as_deref()
            .map(|u| crate::cluster::parse_etcd_url(u).map_err(|e| format!("cluster.etcd: {e}")))
            .transpose()
    }
}

/// `[host]` settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HostSettings {
    /// Arena size; 0 disables the tier. Default `1GiB`. Allocated at start.
    pub capacity: ByteSize,
    /// Commit and map every arena page at start (`fallocate` + populate),
    /// so no put pays for a first-touch page fault and a node that cannot
    /// get its memory fails at start, not under load. Default true.
    pub prefault: bool,
}

/// `[disk]` settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskSettings {
    /// Space preallocated under `data-dir/disk`; 0 disables the tier.
    /// Default `4GiB`; at least `1MiB` when enabled.
    pub capacity: ByteSize,
    /// Largest single data file. Default `8GiB`.
    pub file_size: ByteSize,
    /// io_uring queue depth, 1..=4096. Default 64.
    pub queue_depth: u32,
    /// I/O engine: `auto` (io_uring, falling back to psync), `uring`, `psync`. Default `auto`.
    pub engine: String,
    /// Register bounce buffers with io_uring (falls back if the memlock limit refuses). Default true.
    pub registered_buffers: bool,
}

/// `[object]` settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectSettings {
    /// `file:///abs/dir` or `s3://bucket/prefix`; unset disables the tier. Default unset.
    pub url: Option<String>,
    /// S3 endpoint, e.g. `http://127.0.0.1:8333`. Default: AWS_ENDPOINT_URL or AWS.
    pub endpoint: Option<String>,
    /// S3 region. Default: AWS_REGION / AWS_DEFAULT_REGION, else `us-east-1`.
    pub region: Option<String>,
    /// Access key. Default: AWS_ACCESS_KEY_ID.
    pub access_key_id: Option<String>,
    /// Secret key. Default: AWS_SECRET_ACCESS_KEY.
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints. Default: true when the endpoint is `http://`.
    pub allow_http: Option<bool>,
    /// Capacity budget for the tier; unset = unbounded.
    pub capacity: Option<ByteSize>,
}

/// `[hbm]` settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HbmSettings {
    /// GPU memory to use; 0 disables the tier (default). Needs the `cuda` build.
    pub capacity: ByteSize,
    /// CUDA device ordinal. Default 0.
    pub device: usize,
}

/// `[limits]` settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitSettings {
    /// Largest object accepted. Default `1GiB`; 1 byte..=64GiB.
    pub max_object_size: ByteSize,
    /// Most keys in one request. Default 4096; 1..=1000000, and at least
    /// 256 in cluster mode (the batches cluster repair sends other nodes).
    pub max_batch_keys: usize,
    /// Data chunk size of Get streams. Default `1MiB`; 4KiB..=4MiB-64KiB.
    pub chunk_size: ByteSize,
    /// Payload bytes all Put streams together may hold in memory before they
    /// are stored; further puts wait (backpressure), so many concurrent large
    /// puts cannot exhaust memory. Default `4GiB`; at least `max-object-size`.
    pub max_inflight_put_bytes: ByteSize,
    /// A Put stream that sends nothing for this long fails (`ABORTED`) and
    /// gives back the in-flight budget it held, so stalled clients cannot
    /// hold every other put back. Default 30000; 100..=3600000.
    pub put_idle_timeout_ms: u64,
    /// Most namespaces this node lets clients create (each one rewrites
    /// the registry file, and Stats and Members list every name).
    /// Namespaces found in recovered data or in the cluster's records are
    /// never refused, but count. Default 65536; 1..=1000000.
    pub max_namespaces: usize,
    /// Most namespaces one tenant may create. Default 4096;
    /// 1..=`max-namespaces`.
    pub max_namespaces_per_tenant: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:50051".parse().expect("valid"),
            metrics_listen: "127.0.0.1:9090".parse().expect("valid"),
            data_dir: PathBuf::from("./kvfabric-data"),
            node_id: "kvfabric-node".into(),
            host: HostSettings::default(),
            disk: DiskSettings::default(),
            object: ObjectSettings::default(),
            hbm: HbmSettings::default(),
            limits: LimitSettings::default(),
            local: LocalSettings::default(),
            tiering: TieringSettings::default(),
            cluster: ClusterSettings::default(),
            auth: AuthSettings::default(),
            tls: TlsSettings::default(),
            log: "info".into(),
        }
    }
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            capacity: ByteSize(1 << 30),
            prefault: true,
        }
    }
}

impl Default for DiskSettings {
    fn default() -> Self {
        DiskSettings {
            capacity: ByteSize(4 << 30),
            file_size: ByteSize(8 << 30),
            queue_depth: 64,
            engine: "auto".into(),
            registered_buffers: true,
        }
    }
}

/// `[local]` settings: the zero-copy path (Unix socket + shared arena).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LocalSettings {
    /// Serve the local path (needs a host tier). Default true.
    pub enabled: bool,
    /// Unix socket path. Default `<data-dir>/kvfabric.sock`.
    pub socket: Option<PathBuf>,
    /// A reservation not committed within this many ms can no longer be
    /// committed. Default 30000; 10..=3600000.
    pub reservation_ttl_ms: u64,
    /// A read lease not released within this many ms is dropped (its slot may
    /// be reused; the late release reports it). Default 30000; 10..=3600000.
    pub lease_ttl_ms: u64,
    /// Space of an expired reservation, or of a disconnected client's open
    /// reservations, is held until the client process exits (watched with a
    /// pidfd) or for this many ms, whichever comes first, so a writer that is
    /// still copying does not land in a reused slot. Default 60000; 0..=3600000.
    pub quarantine_ms: u64,
    /// Arena bytes one connection may hold reserved at once. Default `1GiB`.
    pub max_reserved_bytes: ByteSize,
    /// Arena bytes one connection may hold pinned by read leases at once
    /// (more are answered `retry`: the client copies out, releases and
    /// asks again), so one client cannot pin the whole arena against
    /// eviction for a lease TTL. Default `1GiB`; at least 1B.
    pub max_leased_bytes: ByteSize,
    /// Recompute each committed value's xxh3 on the node and refuse a
    /// mismatch (costs one pass over the bytes). Default true.
    pub verify_commits: bool,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            enabled: true,
            socket: None,
            reservation_ttl_ms: 30_000,
            lease_ttl_ms: 30_000,
            quarantine_ms: 60_000,
            max_reserved_bytes: ByteSize(1 << 30),
            max_leased_bytes: ByteSize(1 << 30),
            verify_commits: true,
        }
    }
}

/// `[auth]` settings: who may call the node. Without `tokens-file` (the
/// default) the node authenticates no one: any client may name any tenant,
/// which is only safe on a network where every client is trusted.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthSettings {
    /// TOML file of the client tokens the node accepts, as SHA-256 digests
    /// (`[[token]]` tables: `tenant`, `sha256`, optional `name`, `admin`,
    /// `local`; `kvfabric auth new-token` makes one). Setting it turns
    /// authentication on: every gRPC call and local-path hello must carry a
    /// token, and a token acts only for its tenant. Default unset (off).
    pub tokens_file: Option<PathBuf>,
    /// File holding the tokens nodes of one cluster present to each other
    /// (forwarded requests, repair), one per line: this node sends the
    /// first and accepts every one (a new token is rolled out as a second
    /// line). Needed in cluster mode when `tokens-file` is set; without
    /// `tokens-file` the node sends it but authenticates no one (for
    /// turning authentication on node by node). Default unset.
    pub node_token_file: Option<PathBuf>,
    /// How often the tokens file and the node-token file are re-read, in
    /// seconds (changed ones are swapped in; ones that fail to load are
    /// logged and the tokens in use are kept). 0 = load once at start.
    /// Default 10; 0..=3600.
    pub reload_interval_s: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            tokens_file: None,
            node_token_file: None,
            reload_interval_s: 10,
        }
    }
}

/// `[tls]` settings: TLS on the gRPC listener (PEM files, read at start).
/// Off by default (plain HTTP/2 on a trusted network).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSettings {
    /// The node's certificate chain. With `key-file`, turns TLS on: the
    /// listener speaks only TLS, and in cluster mode the node registers an
    /// `https://` endpoint. Default unset.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key. Default unset.
    pub key_file: Option<PathBuf>,
    /// Require clients to present a certificate this CA signed (mutual
    /// TLS). Default unset: any client may connect.
    pub client_ca_file: Option<PathBuf>,
    /// The CA the node verifies other nodes with (forwarding, repair);
    /// needed in cluster mode with TLS on. The node presents its own
    /// certificate to them, so with `client-ca-file` on every node that
    /// certificate must be good for client authentication too. Default
    /// unset.
    pub ca_file: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// `[tiering]` settings: the background demoter and promoter.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TieringSettings {
    /// Run demotion and promotion in the background (otherwise a put that
    /// finds a tier full demotes inline, and a hit below is promoted before
    /// the get returns). Default true.
    pub background: bool,
    /// Demote when a tier is fuller than this fraction. Default 0.90.
    pub high_watermark: f64,
    /// Demote down to this fraction. Default 0.80; 0 < low <= high <= 1.
    pub low_watermark: f64,
    /// Promotions queued at most; more are skipped. Default 256.
    pub promote_queue: usize,
    /// Payload bytes the promotion queue may hold (queued promotions and
    /// the one in progress); a hit that would pass it is not promoted, so
    /// objects larger than this are never promoted in the background.
    /// Default 256MiB; at least 1B.
    pub promote_queue_bytes: ByteSize,
}

impl Default for TieringSettings {
    fn default() -> Self {
        TieringSettings {
            background: true,
            high_watermark: 0.90,
            low_watermark: 0.80,
            promote_queue: 256,
            promote_queue_bytes: ByteSize(256 << 20),
        }
    }
}

impl Settings {
    /// The local socket path (explicit or under the data directory).
    pub fn local_socket(&self) -> PathBuf {
        self.local
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kvfabric.sock"))
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_object_size: ByteSize(1 << 30),
            max_batch_keys: 4096,
            chunk_size: ByteSize(1 << 20),
            max_inflight_put_bytes: ByteSize(4 << 30),
            put_idle_timeout_ms: 30_000,
            max_namespaces: 65_536,
            max_namespaces_per_tenant: 4096,
        }
    }
}

impl Settings {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| format!("invalid configuration: {e}"))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks bounds; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.host.capacity.0 == 0
            && self.disk.capacity.0 == 0
            && self.object.url.is_none()
            && self.hbm.capacity.0 == 0
        {
            return Err("no tier configured: set host.capacity, disk.capacity or object.url".into());
        }
        if self.host.capacity.0 != 0 && self.host.capacity.0 < 4096 {
            return Err(format!("host.capacity {} is below one 4KiB slot", self.host.capacity));
        }
        if self.disk.capacity.0 != 0 && self.disk.capacity.0 < 1 << 20 {
            return Err(format!(
                "disk.capacity {} is below the 1MiB minimum",
                self.disk.capacity
            ));
        }
        if self.disk.file_size.0 < 1 << 20 {
            return Err(format!(
                "disk.file-size {} is below the 1MiB minimum",
                self.disk.file_size
            ));
        }
        if !(1..=4096).contains(&self.disk.queue_depth) {
            return Err(format!(
                "disk.queue-depth {} is outside 1..=4096",
                self.disk.queue_depth
            ));
        }
        if !["auto", "uring", "psync"].contains(&self.disk.engine.as_str()) {
            return Err(format!(
                "disk.engine {:?} is not one of auto, uring, psync",
                self.disk.engine
            ));
        }
        if let Some(url) = &self.object.url
            && !(url.starts_with("file://") || url.starts_with("s3://"))
        {
            return Err(format!("object.url {url:?} must start with file:// or s3://"));
        }
        let m = self.limits.max_object_size.0;
        if m == 0 || m > 64 << 30 {
            return Err(format!(
                "limits.max-object-size {} is outside 1B..=64GiB",
                self.limits.max_object_size
            ));
        }
        if !(1..=1_000_000).contains(&self.limits.max_batch_keys) {
            return Err(format!(
                "limits.max-batch-keys {} is outside 1..=1000000",
                self.limits.max_batch_keys
            ));
        }
        let c = self.limits.chunk_size.0 as usize;
        if !(4096..=kvfabric_proto::MAX_CHUNK_BYTES).contains(&c) {
            return Err(format!(
                "limits.chunk-size {} is outside 4KiB..=4032KiB",
                self.limits.chunk_size
            ));
        }
        if !(100..=3_600_000).contains(&self.limits.put_idle_timeout_ms) {
            return Err(format!(
                "limits.put-idle-timeout-ms {} is outside 100..=3600000",
                self.limits.put_idle_timeout_ms
            ));
        }
        if !(1..=1_000_000).contains(&self.limits.max_namespaces) {
            return Err(format!(
                "limits.max-namespaces {} is outside 1..=1000000",
                self.limits.max_namespaces
            ));
        }
        if !(1..=self.limits.max_namespaces).contains(&self.limits.max_namespaces_per_tenant) {
            return Err(format!(
                "limits.max-namespaces-per-tenant {} is outside 1..=limits.max-namespaces ({})",
                self.limits.max_namespaces_per_tenant, self.limits.max_namespaces
            ));
        }
        if self.limits.max_inflight_put_bytes < self.limits.max_object_size {
            return Err(format!(
                "limits.max-inflight-put-bytes {} is below limits.max-object-size {}",
                self.limits.max_inflight_put_bytes, self.limits.max_object_size
            ));
        }
        if self.node_id.is_empty() {
            return Err("node-id is empty".into());
        }
        for (name, v, lo) in [
            ("local.reservation-ttl-ms", self.local.reservation_ttl_ms, 10),
            ("local.lease-ttl-ms", self.local.lease_ttl_ms, 10),
            ("local.quarantine-ms", self.local.quarantine_ms, 0),
        ] {
            if !(lo..=3_600_000).contains(&v) {
                return Err(format!("{name} {v} is outside {lo}..=3600000"));
            }
        }
        if self.local.max_reserved_bytes.0 == 0 {
            return Err("local.max-reserved-bytes must be positive".into());
        }
        if self.local.max_leased_bytes.0 == 0 {
            return Err("local.max-leased-bytes must be positive".into());
        }
        let t = &self.tiering;
        if !(t.low_watermark > 0.0 && t.low_watermark <= t.high_watermark && t.high_watermark <= 1.0) {
            return Err(format!(
                "tiering watermarks must satisfy 0 < low-watermark ({}) <= high-watermark ({}) <= 1",
                t.low_watermark, t.high_watermark
            ));
        }
        if !(1..=1_000_000).contains(&t.promote_queue) {
            return Err(format!(
                "tiering.promote-queue {} is outside 1..=1000000",
                t.promote_queue
            ));
        }
        if t.promote_queue_bytes.0 == 0 {
            return Err("tiering.promote-queue-bytes must be positive".into());
        }
        self.validate_auth()?;
        self.validate_tls()?;
        self.validate_cluster()
    }

    fn validate_auth(&self) -> Result<(), String> {
        let a = &self.auth;
        if a.reload_interval_s > 3600 {
            return Err(format!(
                "auth.reload-interval-s {} is outside 0..=3600",
                a.reload_interval_s
            ));
        }
        match (&a.tokens_file, &a.node_token_file) {
            (Some(_), None) if self.cluster.etcd.is_some() => Err(
                "auth.tokens-file is set in cluster mode without auth.node-token-file: nodes \
                 could not forward requests to each other; give every node the same node token"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    fn validate_tls(&self) -> Result<(), String> {
        let t = &self.tls;
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err("tls.cert-file and tls.key-file go together: set both (TLS on) or neither".into());
        }
        if !t.enabled() && (t.client_ca_file.is_some() || t.ca_file.is_some()) {
            return Err("tls.client-ca-file and tls.ca-file need tls.cert-file and tls.key-file (TLS on)".into());
        }
        if t.enabled() && t.ca_file.is_none() && self.cluster.etcd.is_some() {
            return Err(
                "tls.ca-file is needed in cluster mode with TLS on: the CA this node verifies the other nodes with"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), String> {
        let c = &self.cluster;
        crate::cluster::validate_id("cluster.id", &c.id)?;
        if !(2..=300).contains(&c.lease_ttl_s) {
            return Err(format!("cluster.lease-ttl-s {} is outside 2..=300", c.lease_ttl_s));
        }
        if !(100..=600_000).contains(&c.refresh_interval_ms) {
            return Err(format!(
                "cluster.refresh-interval-ms {} is outside 100..=600000",
                c.refresh_interval_ms
            ));
        }
        if !(100..=3_600_000).contains(&c.repair_interval_ms) {
            return Err(format!(
                "cluster.repair-interval-ms {} is outside 100..=3600000",
                c.repair_interval_ms
            ));
        }
        if !(60..=31_536_000).contains(&c.tombstone_ttl_s) {
            return Err(format!(
                "cluster.tombstone-ttl-s {} is outside 60..=31536000",
                c.tombstone_ttl_s
            ));
        }
        if !(1_000..=100_000_000).contains(&c.max_tombstones) {
            return Err(format!(
                "cluster.max-tombstones {} is outside 1000..=100000000",
                c.max_tombstones
            ));
        }
        if c.handoff_window_s > 604_800 {
            return Err(format!(
                "cluster.handoff-window-s {} is outside 0..=604800",
                c.handoff_window_s
            ));
        }
        if c.etcd_endpoints()?.is_none() {
            return Ok(());
        }
        crate::cluster::validate_id("node-id", &self.node_id)?;
        // Repair asks other nodes about, and copies to them, batches of
        // this many keys; a node refusing them would never settle.
        let repair = super::repair::BATCH_KEYS;
        if self.limits.max_batch_keys < repair {
            return Err(format!(
                "limits.max-batch-keys {} is below {repair}, the batch cluster repair sends (cluster.etcd is set): \
                 every node of a cluster must accept at least {repair} keys per request",
                self.limits.max_batch_keys
            ));
        }
        // A tombstone must outlive the passes that look for copies it
        // covers, or a delete missed by a node holding a copy comes back.
        if c.tombstone_ttl_s.saturating_mul(1000) < c.repair_interval_ms.saturating_mul(3) {
            return Err(format!(
                "cluster.tombstone-ttl-s {} is shorter than 3 x cluster.repair-interval-ms {} ({} s): \
                 deletes would be forgotten before repair passes have seen them; raise the TTL or shorten \
                 the interval",
                c.tombstone_ttl_s,
                c.repair_interval_ms,
                c.repair_interval_ms.saturating_mul(3).div_ceil(1000)
            ));
        }
        match &c.advertise {
            Some(a) => {
                let ok = a
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0));
                if !ok {
                    return Err(format!("cluster.advertise {a:?} is not HOST:PORT"));
                }
            }
            None if self.listen.ip().is_unspecified() => {
                return Err(format!(
                    "listen address {} is a wildcard: set cluster.advertise (--advertise HOST:PORT) to the \
                     address other nodes and clients reach this node at",
                    self.listen
                ));
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_validation() {
        let s =
            Settings::from_toml("listen = \"127.0.0.1:7000\"\n[host]\ncapacity = \"64MiB\"\n[disk]\ncapacity = 0\n")
                .unwrap();
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.host.capacity.0, 64 << 20);
        assert_eq!(s.disk.capacity.0, 0);
        assert_eq!(s.limits, LimitSettings::default());
        s.validate().unwrap();
        assert!(Settings::from_toml("bogus = 1").unwrap_err().contains("bogus"));
        let mut bad = Settings::default();
        bad.disk.queue_depth = 0;
        assert!(bad.validate().unwrap_err().contains("disk.queue-depth"));
        let mut bad = Settings::default();
        bad.limits.max_inflight_put_bytes = ByteSize(1 << 20);
        assert!(bad.validate().unwrap_err().contains("max-inflight-put-bytes"));
        let mut bad = Settings::default();
        bad.limits.put_idle_timeout_ms = 0;
        assert!(bad.validate().unwrap_err().contains("put-idle-timeout-ms"));
        let mut bad = Settings::default();
        bad.cluster.max_tombstones = 10;
        assert!(bad.validate().unwrap_err().contains("max-tombstones"));
        let mut bad = Settings::default();
        bad.tiering.low_watermark = 0.95;
        assert!(bad.validate().unwrap_err().contains("watermark"));
        let mut bad = Settings::default();
        bad.tiering.promote_queue_bytes = ByteSize(0);
        assert!(bad.validate().unwrap_err().contains("tiering.promote-queue-bytes"));
        let mut bad = Settings::default();
        bad.local.lease_ttl_ms = 0;
        assert!(bad.validate().unwrap_err().contains("local.lease-ttl-ms"));
        let s = Settings::from_toml(
            "[local]\nsocket = \"/run/kv.sock\"\nverify-commits = false\n[tiering]\nbackground = false\n\
             promote-queue-bytes = \"64MiB\"\n",
        )
        .unwrap();
        assert_eq!(s.local_socket(), PathBuf::from("/run/kv.sock"));
        assert!(!s.local.verify_commits && !s.tiering.background);
        assert_eq!(s.tiering.promote_queue_bytes.0, 64 << 20);
        Settings::default().validate().unwrap();
    }

    #[test]
    fn cluster_settings() {
        let s = Settings::default();
        assert_eq!(s.cluster.etcd_endpoints().unwrap(), None);
        assert_eq!((s.cluster.id.as_str(), s.cluster.lease_ttl_s), ("kvfabric", 10));
        // Single-node mode needs nothing else, even on a wildcard address.
        let single = Settings {
            listen: "0.0.0.0:50051".parse().unwrap(),
            ..Default::default()
        };
        single.validate().unwrap();
        let s = Settings::from_toml(
            "node-id = \"n1\"\n[cluster]\netcd = \"etcd://127.0.0.1:2379,10.0.0.2:2379\"\nid = \"prod\"\n\
             advertise = \"10.0.0.1:50051\"\nlease-ttl-s = 3\nrefresh-interval-ms = 500\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(
            s.cluster.etcd_endpoints().unwrap().unwrap().endpoints(),
            ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!((s.cluster.lease_ttl_s, s.cluster.refresh_interval_ms), (3, 500));
        type Change = fn(&mut Settings);
        let cases: [(Change, &str); 11] = [
            (
                |s| s.limits.max_batch_keys = 255,
                "limits.max-batch-keys 255 is below 256",
            ),
            (
                |s| {
                    s.cluster.tombstone_ttl_s = 60;
                    s.cluster.repair_interval_ms = 30_000;
                },
                "cluster.tombstone-ttl-s 60 is shorter than 3 x cluster.repair-interval-ms 30000",
            ),
            (
                |s| {
                    s.cluster.tombstone_ttl_s = 10_799;
                    s.cluster.repair_interval_ms = 3_600_000;
                },
                "cluster.tombstone-ttl-s 10799 is shorter than 3 x cluster.repair-interval-ms 3600000 (10800 s)",
            ),
            (|s| s.cluster.lease_ttl_s = 1, "cluster.lease-ttl-s"),
            (|s| s.cluster.handoff_window_s = 604_801, "cluster.handoff-window-s"),
            (|s| s.cluster.lease_ttl_s = 301, "cluster.lease-ttl-s"),
            (|s| s.cluster.refresh_interval_ms = 50, "cluster.refresh-interval-ms"),
            (|s| s.cluster.id = "a/b".into(), "cluster.id"),
            (|s| s.cluster.etcd = Some("http://x:1".into()), "cluster.etcd"),
            (|s| s.cluster.advertise = Some("nohost".into()), "cluster.advertise"),
            (|s| s.node_id = "a b".into(), "node-id"),
        ];
        for (change, name) in cases {
            let mut bad = s.clone();
            change(&mut bad);
            let e = bad.validate().unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        }
        // At the bounds the rules allow.
        let mut edge = s.clone();
        edge.limits.max_batch_keys = 256;
        edge.cluster.repair_interval_ms = 20_000;
        edge.cluster.tombstone_ttl_s = 60;
        edge.validate().unwrap();
        // A single node takes any batch limit and any pair of the two.
        let mut single = Settings::default();
        single.limits.max_batch_keys = 1;
        single.cluster.tombstone_ttl_s = 60;
        single.cluster.repair_interval_ms = 3_600_000;
        single.validate().unwrap();
        let mut wild = s.clone();
        wild.listen = "0.0.0.0:50051".parse().unwrap();
        wild.cluster.advertise = None;
        assert!(wild.validate().unwrap_err().contains("--advertise"));
        assert!(
            Settings::from_toml("[cluster]\nlease-ttl = 3\n")
                .unwrap_err()
                .contains("lease-ttl")
        );
    }
}
