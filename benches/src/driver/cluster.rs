//! `kvfabric-bench cluster`: the same client load against 1, 2 and 3 nodes
//! on loopback. For each node count it starts that many in-process nodes
//! (host tier, each on its own runtime) and drives them through one
//! cluster-aware client over a fixed membership (`ClusterClient::fixed`:
//! rendezvous placement, one batch per node, no forwarding hop): `--workers`
//! concurrent workers put, then get (verified byte for byte), values of
//! `--size` bytes for `--seconds` each, then one caller measures
//! `ExistsPrefix` over a chain of `--chain` keys spread across the nodes
//! (one fan-out call per node, merged). Prints aggregate GB/s, operation
//! latencies and the ratio to one node.
//!
//! On a 2-core machine every node and the client share the same two cores,
//! so the aggregate cannot grow with nodes here; what the rows show is the
//! cost of spreading the same load (more connections, per-node batches,
//! the fan-out of a chain), not the scaling of a real cluster, where each
//! node brings its own cores, memory bandwidth and NIC.

use super::grpc::{LocalNode, NodeTier};
use super::{Budget, Spec, Store, get_phase, key_bytes, put_phase};
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use kvfabric::client::{ClientOptions, ClusterClient, Durability, NodeInfo, PutObject};
use kvfabric_bench::latency;
use kvfabric_bench::payload::{Payload, PayloadPool};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `cluster`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClusterOpts {
    /// Node counts; one run each, same client load.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    nodes: Vec<usize>,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256 << 10)]
    size: usize,
    /// Concurrent client workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Seconds per phase (put, get, ExistsPrefix).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Keys in the ExistsPrefix chain.
    #[arg(long, default_value_t = 64)]
    chain: usize,
    /// Host tier per node.
    #[arg(long, default_value_t = 512 << 20)]
    node_capacity: u64,
    /// Tiny run for CI.
    #[arg(long)]
    smoke: bool,
    /// One JSON object per node count instead of a table.
    #[arg(long)]
    json: bool,
}

/// The cluster-aware client as a workload store.
struct ClusterStore {
    client: ClusterClient,
}

impl Store for ClusterStore {
    async fn put(&self, worker: usize, key: u64, value: &Payload) -> anyhow::Result<()> {
        let o = PutObject::new(key_bytes(worker, key), value.bytes.clone());
        self.client.put_many("bench", vec![o], Durability::Memory).await?;
        Ok(())
    }

    async fn get(&self, worker: usize, key: u64) -> anyhow::Result<Option<Bytes>> {
        Ok(self.client.get("bench", key_bytes(worker, key)).await?.map(|o| o.value))
    }
}

/// What one node count measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    nodes: usize,
    put_gbps: f64,
    put_p50_us: f64,
    get_gbps: f64,
    get_p50_us: f64,
    exists_p50_us: f64,
    exists_p99_us: f64,
    /// Share of the chain's keys held by the busiest node.
    busiest_share: f64,
}

/// The tiny run `--smoke` includes: 1 and 2 nodes, fractions of a second.
pub(crate) fn smoke() -> anyhow::Result<()> {
    run(ClusterOpts {
        nodes: vec![1, 2],
        size: 16 << 10,
        workers: 2,
        seconds: 0.2,
        chain: 16,
        node_capacity: 64 << 20,
        smoke: true,
        json: false,
    })
}

/// Runs every node count and prints the rows.
pub(crate) fn run(mut o: ClusterOpts) -> anyhow::Result<()> {
    if o.smoke {
        o.seconds = o.seconds.min(0.2);
        o.size = o.size.min(16 << 10);
        o.workers = o.workers.min(2);
        o.node_capacity = o.node_capacity.min(64 << 20);
    }
    anyhow::ensure!(
        o.seconds > 0.0 && o.chain > 0 && o.workers > 0 && o.size > 0,
        "--seconds, --chain, --workers and --size must be positive"
    );
    anyhow::ensure!(
        o.nodes.iter().all(|&n| (1..=16).contains(&n)),
        "--nodes must be 1 to 16 each"
    );
    let mut rows = Vec::new();
    for &n in &o.nodes {
        rows.push(run_one(&o, n).with_context(|| format!("{n} node(s)"))?);
    }
    if o.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>8} {:>8}",
        "nodes",
        "put GB/s",
        "put p50",
        "get GB/s",
        "get p50",
        "x1 put",
        "exists p50",
        "exists p99",
        "x1 get",
        "busiest"
    );
    let base = rows.first().cloned();
    for r in &rows {
        let (xp, xg) = base
            .as_ref()
            .map_or((1.0, 1.0), |b| (r.put_gbps / b.put_gbps, r.get_gbps / b.get_gbps));
        println!(
            "{:>5} {:>9.2} {:>7.0}us {:>9.2} {:>7.0}us {:>8.2}x {:>9.0}us {:>9.0}us {:>7.2}x {:>7.0}%",
            r.nodes,
            r.put_gbps,
            r.put_p50_us,
            r.get_gbps,
            r.get_p50_us,
            xp,
            r.exists_p50_us,
            r.exists_p99_us,
            xg,
            r.busiest_share * 100.0
        );
    }
    println!(
        "({} workers, {} B values, {:.1} s per phase, ExistsPrefix over {} keys; \
         nodes and client share this machine's cores)",
        o.workers, o.size, o.seconds, o.chain
    );
    Ok(())
}

fn run_one(o: &ClusterOpts, n: usize) -> anyhow::Result<Row> {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let nodes: Vec<LocalNode> = dirs
        .iter()
        .map(|d| LocalNode::start(d.path(), NodeTier::Host, o.node_capacity, 64, "auto"))
        .collect::<anyhow::Result<_>>()?;
    let members: Vec<NodeInfo> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| NodeInfo {
            id: format!("n{i}"),
            endpoint: node.endpoint(),
            weight: 1.0,
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let row = rt.block_on(async {
        let client = ClusterClient::fixed(members, ClientOptions::default());
        let budget = Budget::Time(Duration::from_secs_f64(o.seconds));
        // Bounded working set: at most half of the cluster's smallest share.
        let working_set = (o.node_capacity / 2).max(o.size as u64);
        let ring = Spec::ring_for(o.size as u64, o.workers, working_set, budget);
        let pool = PayloadPool::within(o.size, ring * o.workers as u64, 64 << 20, 7);
        let spec = Spec {
            workers: o.workers,
            ring,
            budget,
            pool: Arc::new(pool),
        };
        let store = Arc::new(ClusterStore { client: client.clone() });
        let (put, written) = put_phase(store.clone(), &spec).await?;
        let get = get_phase(store, &spec, &written).await?;

        // A chain spread over the nodes.
        let chain: Vec<Bytes> = (0..o.chain as u64).map(|i| Bytes::from(format!("chain-{i}"))).collect();
        let objs = chain.iter().map(|k| PutObject::new(k.clone(), vec![1u8; 64])).collect();
        client.put_many("chain", objs, Durability::Memory).await?;
        let mut per_node = std::collections::HashMap::<String, usize>::new();
        for k in &chain {
            *per_node.entry(client.owners("chain", k)?[0].clone()).or_default() += 1;
        }
        let busiest = per_node.values().copied().max().unwrap_or(0);
        let mut h = latency::histogram();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < o.seconds {
            let t = Instant::now();
            let r = client.exists_prefix("chain", chain.clone()).await?;
            latency::record(&mut h, t.elapsed());
            anyhow::ensure!(r.len() == chain.len(), "chain answered {} of {}", r.len(), chain.len());
        }
        let us = |x: f64| h.value_at_quantile(x) as f64 / 1e3;
        anyhow::Ok(Row {
            nodes: n,
            put_gbps: put.bytes_per_sec() / 1e9,
            put_p50_us: put.latency.value_at_quantile(0.5) as f64 / 1e3,
            get_gbps: get.bytes_per_sec() / 1e9,
            get_p50_us: get.latency.value_at_quantile(0.5) as f64 / 1e3,
            exists_p50_us: us(0.5),
            exists_p99_us: us(0.99),
            busiest_share: busiest as f64 / chain.len() as f64,
        })
    })?;
    drop(rt);
    for node in nodes {
        node.shutdown();
    }
    Ok(row)
}
