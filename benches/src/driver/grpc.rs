//! The gRPC workload: a kvfabric node (started in this process on a free
//! loopback port, on its own tokio runtime, or reached at `--endpoint`) and
//! one [`Client`] connection per worker, putting with `memory` durability
//! and reading back through the public client API.

use super::{Store, key_bytes};
use anyhow::Context;
use bytes::Bytes;
use kvfabric::client::{Client, Durability};
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use kvfabric_bench::payload::Payload;
use std::path::Path;

/// Which tier the in-process node stores blocks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum NodeTier {
    /// Host memory only.
    Host,
    /// The disk tier only.
    Disk,
}

impl NodeTier {
    /// Lower-case name, for row labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeTier::Host => "host",
            NodeTier::Disk => "disk",
        }
    }
}

/// A node running in this process on its own runtime; shut down by
/// [`LocalNode::shutdown`] (or when dropped).
#[derive(Debug)]
pub(crate) struct LocalNode {
    rt: tokio::runtime::Runtime,
    handle: Option<NodeHandle>,
}

impl LocalNode {
    /// Starts a node on `127.0.0.1:0` with data under `dir` and a single
    /// tier of `capacity` bytes. Call from outside any runtime.
    pub(crate) fn start(
        dir: &Path,
        tier: NodeTier,
        capacity: u64,
        queue_depth: u32,
        engine: &str,
    ) -> anyhow::Result<LocalNode> {
        let (host, disk) = match tier {
            NodeTier::Host => (capacity, 0),
            NodeTier::Disk => (0, capacity),
        };
        let mut s = Settings {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            metrics_listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: dir.to_path_buf(),
            node_id: "kvfabric-bench".into(),
            ..Settings::default()
        };
        s.host.capacity = ByteSize(host);
        s.disk.capacity = ByteSize(disk);
        s.disk.queue_depth = queue_depth;
        s.disk.engine = engine.into();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("kvf-node")
            .enable_all()
            .build()
            .context("starting the node's runtime")?;
        let handle = rt
            .block_on(async { Node::build(s).await?.start().await })
            .context("starting the in-process node")?;
        Ok(LocalNode {
            rt,
            handle: Some(handle),
        })
    }

    /// The node's `http://` endpoint.
    pub(crate) fn endpoint(&self) -> String {
        self.handle.as_ref().map(NodeHandle::endpoint).unwrap_or_default()
    }

    /// The Unix socket of the node's zero-copy local path, when it serves one.
    pub(crate) fn local_socket(&self) -> Option<std::path::PathBuf> {
        self.handle.as_ref().and_then(|h| h.local_socket.clone())
    }

    /// Stops serving and waits for in-flight requests.
    pub(crate) fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

/// One client connection per worker, all in one namespace.
#[derive(Debug)]
pub(crate) struct GrpcStore {
    clients: Vec<Client>,
    namespace: String,
}

impl GrpcStore {
    /// Connects `workers` clients to `endpoint`, using `namespace`.
    pub(crate) async fn connect(endpoint: &str, workers: usize, namespace: String) -> anyhow::Result<GrpcStore> {
        let mut clients = Vec::with_capacity(workers);
        for _ in 0..workers {
            clients.push(
                Client::connect(endpoint)
                    .await
                    .with_context(|| format!("connecting to {endpoint}"))?,
            );
        }
        Ok(GrpcStore { clients, namespace })
    }

    /// Deletes everything this run wrote.
    pub(crate) async fn clear(&self) -> anyhow::Result<()> {
        self.clients[0]
            .clear(&self.namespace)
            .await
            .with_context(|| format!("clearing namespace {}", self.namespace))?;
        Ok(())
    }
}

impl Store for GrpcStore {
    async fn put(&self, worker: usize, key: u64, value: &Payload) -> anyhow::Result<()> {
        self.clients[worker]
            .put(
                &self.namespace,
                key_bytes(worker, key),
                value.bytes.clone(),
                Durability::Memory,
            )
            .await?;
        Ok(())
    }

    async fn get(&self, worker: usize, key: u64) -> anyhow::Result<Option<Bytes>> {
        Ok(self.clients[worker]
            .get(&self.namespace, key_bytes(worker, key))
            .await?
            .map(|o| o.value))
    }
}
