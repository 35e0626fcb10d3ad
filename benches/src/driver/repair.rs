//! `kvfabric-bench repair`: what re-replication costs the foreground. A
//! real etcd (Debian's `etcd-server`, or `KVFABRIC_TEST_ETCD_BIN`) and three
//! in-process cluster nodes; a replication-2 namespace filled with
//! `--objects` values of `--size` bytes; one client reading random keys in
//! a loop. After a baseline, one node leaves and the survivors restore the
//! second copy of everything it held, paced by `cluster.repair-bytes-per-s`;
//! the run reports how long that took and the foreground read latency
//! before and during it, once per `--rates` value (0 = unlimited).
//!
//! Opt-in (starts etcd), never part of `--smoke`. On a 2-core machine the
//! nodes, etcd and the client share the cores, so the unthrottled row shows
//! repair competing for CPU as much as for bandwidth.

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use kvfabric::client::{Client, ClientOptions, ClusterClient, Durability, PutObject, Tier};
use kvfabric::server::{ByteSize, Node, NodeHandle, Settings};
use kvfabric::testutil::Etcd;
use kvfabric_bench::latency;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Options of `repair`.
#[derive(Args, Debug, Clone)]
pub(crate) struct RepairOpts {
    /// Repair rate limits to compare (bytes per second; 0 = unlimited).
    #[arg(long, value_delimiter = ',', default_value = "0,64MiB")]
    rates: Vec<ByteSize>,
    /// Objects in the replicated namespace.
    #[arg(long, default_value_t = 2000)]
    objects: usize,
    /// Object size in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    size: usize,
    /// Seconds of baseline reads before the node leaves.
    #[arg(long, default_value_t = 2.0)]
    baseline_s: f64,
}

struct Row {
    rate: u64,
    moved_mib: f64,
    repair_s: f64,
    base_p50_us: f64,
    base_p99_us: f64,
    during_p50_us: f64,
    during_p99_us: f64,
}

/// Runs one row per rate and prints them.
pub(crate) fn run(o: RepairOpts) -> anyhow::Result<()> {
    anyhow::ensure!(
        o.objects > 0 && o.size > 0 && o.baseline_s > 0.0,
        "--objects, --size and --baseline-s must be positive"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rows = Vec::new();
    for rate in &o.rates {
        rows.push(
            rt.block_on(run_one(&o, rate.0))
                .with_context(|| format!("rate {rate}"))?,
        );
    }
    println!(
        "{:>10} {:>9} {:>9} {:>12} {:>12} {:>12} {:>12}",
        "rate", "moved", "repair", "base p50", "base p99", "during p50", "during p99"
    );
    for r in &rows {
        let rate = if r.rate == 0 {
            "unlimited".to_string()
        } else {
            format!("{}/s", ByteSize(r.rate))
        };
        println!(
            "{:>10} {:>6.1}MiB {:>8.2}s {:>10.0}us {:>10.0}us {:>10.0}us {:>10.0}us",
            rate, r.moved_mib, r.repair_s, r.base_p50_us, r.base_p99_us, r.during_p50_us, r.during_p99_us
        );
    }
    println!(
        "({} objects of {} B, replication 2, 3 in-process nodes; one leaves; reads of random keys throughout)",
        o.objects, o.size
    );
    Ok(())
}

async fn start_node(
    etcd: &Etcd,
    dir: &std::path::Path,
    id: &str,
    rate: u64,
    capacity: u64,
) -> anyhow::Result<NodeHandle> {
    let mut s = Settings {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        node_id: id.into(),
        ..Settings::default()
    };
    s.host.capacity = ByteSize(capacity);
    s.disk.capacity = ByteSize(0);
    s.local.enabled = false;
    s.cluster.etcd = Some(etcd.url());
    s.cluster.id = "bench".into();
    s.cluster.lease_ttl_s = 2;
    s.cluster.refresh_interval_ms = 200;
    s.cluster.repair_interval_ms = 500;
    s.cluster.repair_bytes_per_s = ByteSize(rate);
    Ok(Node::build(s).await?.start().await?)
}

/// Copies of each key held by `clients` (host tier or any).
async fn copies(clients: &[Client], keys: &[Bytes]) -> anyhow::Result<Vec<usize>> {
    let mut n = vec![0; keys.len()];
    for c in clients {
        for chunk_start in (0..keys.len()).step_by(1024) {
            let end = (chunk_start + 1024).min(keys.len());
            let locs = c.locate("bench", keys[chunk_start..end].to_vec()).await?;
            for (i, l) in locs.iter().enumerate() {
                if l.tiers().any(|t| t != Tier::Unspecified) {
                    n[chunk_start + i] += 1;
                }
            }
        }
    }
    Ok(n)
}

async fn run_one(o: &RepairOpts, rate: u64) -> anyhow::Result<Row> {
    let etcd = Etcd::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let capacity = (o.objects * o.size * 2) as u64 + (64 << 20);
    let mut nodes = Vec::new();
    for (d, id) in dirs.iter().zip(["a", "b", "c"]) {
        nodes.push(start_node(&etcd, d.path(), id, rate, capacity).await?);
    }
    let seed = Client::connect(nodes[0].endpoint()).await?;
    seed.create_namespace("bench", 2).await?;
    // Every node knows the factor before data goes in.
    for n in &nodes {
        let c = Client::connect(n.endpoint()).await?;
        let t = Instant::now();
        while c.describe_namespace("bench").await.map(|i| i.replication).ok() != Some(2) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "a node never learned the namespace"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let cc = ClusterClient::discover(
        vec![nodes[0].endpoint()],
        ClientOptions::default(),
        Duration::from_millis(200),
    )
    .await?;
    let t = Instant::now();
    while cc.nodes().len() < 3 || cc.owners("bench", b"k")?.len() != 2 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the client never saw three nodes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Vec<Bytes> = (0..o.objects).map(|i| Bytes::from(format!("obj-{i}"))).collect();
    let value = Bytes::from(vec![7u8; o.size]);
    for chunk in keys.chunks(256) {
        let objs = chunk.iter().map(|k| PutObject::new(k.clone(), value.clone())).collect();
        cc.put_many("bench", objs, Durability::Memory).await?;
    }
    let leaving = nodes.pop().context("three nodes")?;
    let moved = copies(&[Client::connect(leaving.endpoint()).await?], &keys)
        .await?
        .iter()
        .sum::<usize>();

    // Foreground reads, timed into the histogram of the current phase.
    let phase = Arc::new(std::sync::Mutex::new((latency::histogram(), latency::histogram())));
    let during = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cc, keys, phase, during, stop) = (cc.clone(), keys.clone(), phase.clone(), during.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i = (i * 7919 + 13) % keys.len();
                let t = Instant::now();
                let got = cc.get("bench", keys[i].clone()).await;
                let d = t.elapsed();
                if matches!(got, Ok(Some(_))) {
                    let mut p = phase.lock().unwrap_or_else(|e| e.into_inner());
                    let h = if during.load(Ordering::Relaxed) {
                        &mut p.1
                    } else {
                        &mut p.0
                    };
                    latency::record(h, d);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(o.baseline_s)).await;
    during.store(true, Ordering::Relaxed);
    let start = Instant::now();
    leaving.shutdown().await;
    let survivors = [
        Client::connect(nodes[0].endpoint()).await?,
        Client::connect(nodes[1].endpoint()).await?,
    ];
    loop {
        if copies(&survivors, &keys).await?.iter().all(|&n| n == 2) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "replication not restored within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let repair_s = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    reader.await?;
    for n in nodes {
        n.shutdown().await;
    }
    let p = phase.lock().unwrap_or_else(|e| e.into_inner());
    let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Ok(Row {
        rate,
        moved_mib: (moved * o.size) as f64 / (1 << 20) as f64,
        repair_s,
        base_p50_us: us(&p.0, 0.5),
        base_p99_us: us(&p.0, 0.99),
        during_p50_us: us(&p.1, 0.5),
        during_p99_us: us(&p.1, 0.99),
    })
}
