//! `kvfabric-bench control`: how fast the node answers small control calls
//! while bulk transfers saturate it. An in-process node (host tier); a
//! chain of 64 keys stored up front; one client measures `ExistsPrefix` over
//! the whole chain, first on an idle node, then while `--bulk-clients`
//! clients put and get `--bulk-size` values as fast as they can. Prints
//! p50/p99/max per phase and the bulk throughput reached meanwhile.

use super::grpc::{LocalNode, NodeTier};
use bytes::Bytes;
use clap::Args;
use kvfabric::client::{Client, Durability};
use kvfabric_bench::latency;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Options of `control`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ControlOpts {
    /// Seconds per phase (idle, then under load).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Clients moving bulk data during the loaded phase.
    #[arg(long, default_value_t = 4)]
    bulk_clients: usize,
    /// Value size of the bulk transfers, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    bulk_size: usize,
    /// Keys in the ExistsPrefix chain.
    #[arg(long, default_value_t = 64)]
    chain: usize,
    /// Print one JSON object per phase instead of a table.
    #[arg(long)]
    json: bool,
}

struct Phase {
    name: &'static str,
    calls: u64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    bulk_gbps: f64,
}

/// Runs both phases and prints them.
pub(crate) fn run(o: ControlOpts) -> anyhow::Result<()> {
    anyhow::ensure!(o.seconds > 0.0 && o.chain > 0, "--seconds and --chain must be positive");
    let dir = tempfile::tempdir()?;
    let capacity = (o.bulk_clients.max(1) * o.bulk_size * 64 + (256 << 20)) as u64;
    let node = LocalNode::start(dir.path(), NodeTier::Host, capacity, 64, "auto")?;
    let endpoint = node.endpoint();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let phases = rt.block_on(async {
        let probe = Client::connect(endpoint.clone()).await?;
        let keys: Vec<Bytes> = (0..o.chain as u64)
            .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
            .collect();
        for k in &keys {
            probe
                .put("chain", k.clone(), vec![7u8; 4096], Durability::Memory)
                .await?;
        }
        let dur = Duration::from_secs_f64(o.seconds);
        // The probe runs on its own thread and runtime, as a router would
        // in its own process: what is measured is the node, not the bulk
        // clients' executor.
        let chain = o.chain;
        let ep = endpoint.clone();
        let on_own_thread = move |moved: Option<Arc<AtomicU64>>| {
            let (keys, ep) = (keys.clone(), ep.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    // Connected here, so its HTTP/2 connection runs on this runtime too.
                    let probe = Client::connect(ep).await?;
                    measure(&probe, &keys, dur, chain, moved.as_deref()).await
                })
            })
        };
        let idle = on_own_thread(None)
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
        let stop = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));
        let mut bulk = Vec::new();
        for w in 0..o.bulk_clients {
            let c = Client::connect(endpoint.clone()).await?;
            let (stop, moved, size) = (stop.clone(), moved.clone(), o.bulk_size);
            bulk.push(tokio::spawn(async move {
                let value = Bytes::from(vec![w as u8; size]);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = Bytes::from(format!("{w}-{}", i % 16).into_bytes());
                    c.put("bulk", key.clone(), value.clone(), Durability::Memory).await?;
                    let got = c.get("bulk", key).await?;
                    anyhow::ensure!(got.is_some_and(|o| o.value == value), "bulk value read back wrong");
                    moved.fetch_add(2 * size as u64, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }));
        }
        // Let the bulk clients reach full speed first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = moved.clone();
        let loaded = tokio::task::spawn_blocking(move || on_own_thread(Some(m)).join())
            .await?
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
        stop.store(true, Ordering::Relaxed);
        for b in bulk {
            b.await??;
        }
        anyhow::Ok(vec![idle, loaded])
    })?;
    if o.json {
        for p in &phases {
            println!(
                "{{\"system\":\"kvfabric\",\"path\":\"grpc\",\"op\":\"exists_prefix\",\"phase\":\"{}\",\"chain\":{},\"calls\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"bulk_gbps\":{:.3}}}",
                p.name, o.chain, p.calls, p.p50_us, p.p99_us, p.max_us, p.bulk_gbps
            );
        }
    } else {
        println!(
            "ExistsPrefix over a {}-key chain; bulk: {} clients, {} B values, put+get",
            o.chain, o.bulk_clients, o.bulk_size
        );
        println!("| phase  |  calls | p50 us | p99 us | max us | bulk GB/s |");
        println!("|--------|-------:|-------:|-------:|-------:|----------:|");
        for p in &phases {
            println!(
                "| {:<6} | {:>6} | {:>6.0} | {:>6.0} | {:>6.0} | {:>9.2} |",
                p.name, p.calls, p.p50_us, p.p99_us, p.max_us, p.bulk_gbps
            );
        }
    }
    node.shutdown();
    Ok(())
}

async fn measure(
    probe: &Client,
    keys: &[Bytes],
    dur: Duration,
    chain: usize,
    moved: Option<&AtomicU64>,
) -> anyhow::Result<Phase> {
    let mut h = latency::histogram();
    let before = moved.map(|m| m.load(Ordering::Relaxed));
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed() < dur {
        let t = Instant::now();
        let r = probe.exists_prefix("chain", keys.to_vec()).await?;
        latency::record(&mut h, t.elapsed());
        anyhow::ensure!(r.len() == chain, "chain of {chain} keys answered {} present", r.len());
        calls += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1e3;
    Ok(Phase {
        name: if moved.is_some() { "loaded" } else { "idle" },
        calls,
        p50_us: q(0.5),
        p99_us: q(0.99),
        max_us: h.max() as f64 / 1e3,
        bulk_gbps: match (moved, before) {
            (Some(m), Some(b)) => (m.load(Ordering::Relaxed) - b) as f64 / secs / 1e9,
            _ => 0.0,
        },
    })
}
