//! `kvfabric-bench`, the workload driver: puts then gets blocks of several
//! sizes from N concurrent clients against kvfabric (over gRPC, and its disk
//! tier directly) and, in the same run, measures the physical limits they
//! are compared with: `memcpy` (one thread and N threads) and `fio`
//! (io_uring, O_DIRECT, same block size and queue depth, same file system).
//! Prints one table (or one JSON object per row with `--json`): workload,
//! size, clients, GB/s, p50, p99, and the ratio kvfabric / limit.
//!
//! ```text
//! cargo run --release -p kvfabric-bench -- [grpc|disk|all] [--sizes 256KiB,1MiB,4MiB]
//!     [--clients 1,4,16] [--ops N | --seconds S] [--endpoint URL] [--json] [--smoke]
//! ```
//!
//! `kvfabric-bench peers [--quick] [--json] [--systems ...]` puts kvfabric
//! side by side with its peers (Mooncake Store, Redis) and limits (memcpy,
//! fio), installing the peers when missing (module `peers`). It is opt-in:
//! nothing else installs or starts a peer.
//!
//! `kvfabric-bench replay --trace FILE` replays a Mooncake-format trace in
//! virtual time with the real router in the loop (module `replay`); `--smoke`
//! includes a short replay of the committed sample.

mod driver;
#[cfg(feature = "cuda")]
mod gpu;
mod index;
mod index_workload;
mod peers;
mod placement;
mod replay;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use driver::fio::{self, FioError, Rw};
use driver::grpc::{GrpcStore, LocalNode, NodeTier};
use driver::report::{Kind, Op, Row};
use driver::{Budget, Spec, Store};
use kvfabric::server::ByteSize;
use kvfabric_bench::memcpy;
use kvfabric_bench::payload::PayloadPool;
use kvfabric_tiers::IoEngineKind;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of distinct payloads made per block size (the pool cycles beyond).
const PAYLOAD_BUDGET: u64 = 64 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "kvfabric-bench",
    version,
    about = "kvfabric workload driver: put/get throughput and latency over gRPC and on the disk tier, \
             side by side with memcpy and fio measured in the same run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// kvfabric over gRPC (an in-process node, or --endpoint), with the memcpy and fio limits.
    Grpc(Opts),
    /// kvfabric's disk tier called directly, with the memcpy and fio limits.
    Disk(Opts),
    /// Both workloads and both limits (the default).
    All(Opts),
    /// kvfabric side by side with Mooncake Store, Redis, memcpy and fio
    /// (installs and starts the peers; opt-in, never part of --smoke).
    Peers(peers::PeersOpts),
    /// ExistsPrefix latency on an idle node and while bulk transfers saturate it.
    Control(driver::control::ControlOpts),
    /// The router's prefix index: event throughput and lookup latency under
    /// heavy eviction (optionally next to Dynamo's RadixTree).
    Index(index::IndexOpts),
    /// Trace replay in virtual time against simulated workers, with the real
    /// router in the loop: round-robin, random, HBM-only, tier-aware and
    /// Dynamo-cost routing, and a TTFT oracle.
    Replay(replay::ReplayOpts),
    /// The same client load against 1, 2 and 3 in-process nodes through the
    /// cluster-aware client: aggregate put/get GB/s and ExistsPrefix latency.
    Cluster(driver::cluster::ClusterOpts),
    /// Re-replication after a node leaves (real etcd, three in-process
    /// nodes): its duration and the foreground read latency before and
    /// during it, per repair rate limit. Opt-in (starts etcd).
    Repair(driver::repair::RepairOpts),
    /// Cluster placement simulated for 100 and 1,000 nodes: balance,
    /// re-replication after a node loss, a node joining.
    Placement(placement::PlacementOpts),
    /// GPU memory <-> fabric through the zero-copy local path next to raw
    /// pinned and pageable cuMemcpy of the same sizes (needs `--features cuda`
    /// and a GPU).
    #[cfg(feature = "cuda")]
    Gpu(gpu::GpuOpts),
}

/// The disk tier's I/O engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// io_uring, falling back to psync.
    Auto,
    /// io_uring only.
    Uring,
    /// pread/pwrite threads.
    Psync,
}

impl Engine {
    fn kind(self) -> IoEngineKind {
        match self {
            Engine::Auto => IoEngineKind::Auto,
            Engine::Uring => IoEngineKind::Uring,
            Engine::Psync => IoEngineKind::Psync,
        }
    }
    fn setting(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Uring => "uring",
            Engine::Psync => "psync",
        }
    }
}

#[derive(Args, Debug, Clone)]
struct Opts {
    /// Block sizes (KiB/MiB/GiB = powers of 1024).
    #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB,4MiB")]
    sizes: Vec<ByteSize>,
    /// Concurrent clients (each its own connection / task); one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Operations per client and phase (put, then get).
    #[arg(long, conflicts_with = "seconds")]
    ops: Option<u64>,
    /// Seconds per phase instead of --ops [default: 2].
    #[arg(long)]
    seconds: Option<f64>,
    /// Target an existing node (`http://host:port`) instead of starting one in-process.
    #[arg(long)]
    endpoint: Option<String>,
    /// The tier the in-process node stores in.
    #[arg(long, value_enum, default_value = "host")]
    node_tier: NodeTier,
    /// Disk tier queue depth, also fio's iodepth.
    #[arg(long, default_value_t = 64)]
    queue_depth: u32,
    /// Disk tier I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: Engine,
    /// Where the data directories and fio's file go (a fresh temporary
    /// directory inside it) [default: the system temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bytes held at once per configuration (all clients' key rings together).
    #[arg(long, default_value = "512MiB")]
    working_set: ByteSize,
    /// Seconds per memcpy measurement.
    #[arg(long, default_value_t = 1.0)]
    memcpy_seconds: f64,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: String,
    /// Size of fio's file.
    #[arg(long, default_value = "256MiB")]
    fio_size: ByteSize,
    /// Seconds per fio direction.
    #[arg(long, default_value_t = 2.0)]
    fio_seconds: f64,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Tiny run for CI (one size, one client, a few ops, small fio), well under 30 s;
    /// overrides the sizes, clients, budgets and working set.
    #[arg(long)]
    smoke: bool,
}

impl Opts {
    /// Applies `--smoke` and checks bounds.
    fn resolve(mut self) -> anyhow::Result<Opts> {
        if self.smoke {
            self.sizes = vec![ByteSize(256 << 10)];
            self.clients = vec![1];
            self.ops = Some(16);
            self.seconds = None;
            self.working_set = ByteSize(16 << 20);
            self.memcpy_seconds = 0.2;
            self.fio_size = ByteSize(16 << 20);
            self.fio_seconds = 0.3;
        }
        if self.sizes.is_empty() || self.sizes.iter().any(|s| s.0 == 0) {
            bail!("--sizes must list sizes above zero");
        }
        if self.clients.is_empty() || self.clients.contains(&0) {
            bail!("--clients must list counts above zero");
        }
        if self.ops == Some(0) {
            bail!("--ops must be above zero");
        }
        for (name, v) in [
            ("--seconds", self.seconds.unwrap_or(1.0)),
            ("--memcpy-seconds", self.memcpy_seconds),
            ("--fio-seconds", self.fio_seconds),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number of seconds");
            }
        }
        if !(1..=4096).contains(&self.queue_depth) {
            bail!("--queue-depth must be 1..=4096");
        }
        Ok(self)
    }

    fn budget(&self) -> Budget {
        match self.ops {
            Some(n) => Budget::Ops(n),
            None => Budget::Time(Duration::from_secs_f64(self.seconds.unwrap_or(2.0))),
        }
    }

    fn budget_text(&self) -> String {
        match self.budget() {
            Budget::Ops(n) => format!("{n} ops per client and phase"),
            Budget::Time(d) => format!("{:.1} s per phase", d.as_secs_f64()),
        }
    }

    /// Every (size, clients) pair, smallest size first.
    fn configs(&self) -> Vec<(u64, usize)> {
        let mut v = Vec::new();
        for s in &self.sizes {
            for &c in &self.clients {
                v.push((s.0, c));
            }
        }
        v
    }

    fn spec(&self, size: u64, clients: usize) -> Spec {
        let budget = self.budget();
        let ring = Spec::ring_for(size, clients, self.working_set.0, budget);
        let pool = PayloadPool::within(
            size as usize,
            ring * clients as u64,
            PAYLOAD_BUDGET,
            size ^ clients as u64,
        );
        Spec {
            workers: clients,
            ring,
            budget,
            pool: Arc::new(pool),
        }
    }

    /// Capacity a single-tier store needs for every configuration: the
    /// largest key ring set plus room for overwrites in flight.
    fn capacity(&self) -> u64 {
        let budget = self.budget();
        let held = self
            .configs()
            .iter()
            .map(|&(s, c)| Spec::ring_for(s, c, self.working_set.0, budget) * s * c as u64)
            .max()
            .unwrap_or(0);
        let max_size = self.sizes.iter().map(|s| s.0).max().unwrap_or(0);
        let max_clients = *self.clients.iter().max().unwrap_or(&1) as u64;
        // 4 KiB rounding per object, overwrites in flight, allocator slack.
        let per_obj_round = held / max_size.max(1) * 4096;
        held + per_obj_round + 3 * max_clients * max_size + (64 << 20)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, opts) = match cli.mode {
        None => ("all", cli.opts),
        Some(Mode::Grpc(o)) => ("grpc", o),
        Some(Mode::Disk(o)) => ("disk", o),
        Some(Mode::All(o)) => ("all", o),
        Some(Mode::Replay(r)) => {
            return match replay::run(r) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench replay: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Index(i)) => {
            return match index::run(i) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench index: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Control(c)) => {
            return match driver::control::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench control: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Cluster(c)) => {
            return match driver::cluster::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench cluster: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Repair(r)) => {
            return match driver::repair::run(r) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench repair: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Placement(p)) => {
            return match placement::run(p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench placement: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        #[cfg(feature = "cuda")]
        Some(Mode::Gpu(g)) => {
            return match gpu::run(g) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench gpu: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Mode::Peers(p)) => {
            return match peers::run(p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvfabric-bench peers: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match run(mode, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvfabric-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(mode: &str, opts: Opts) -> anyhow::Result<()> {
    let started = Instant::now();
    let o = opts.resolve()?;
    let base = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("kvfabric-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temporary directory in {}", base.display()))?;
    let fio_version = match fio::version(&o.fio) {
        Ok(v) => v,
        Err(FioError::NotFound) => "fio not found".into(),
        Err(FioError::Failed(e)) => format!("fio unusable: {e:#}"),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "# kvfabric-bench {mode}{}: sizes {}, clients {:?}, {}, working set {}, dir {}, {} CPUs, {}",
        if o.smoke { " --smoke" } else { "" },
        o.sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        o.clients,
        o.budget_text(),
        o.working_set,
        dir.path().display(),
        cpus,
        fio_version,
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("kvf-bench")
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let mut rows = memcpy_rows(&o);
    if mode != "disk" {
        rows.extend(grpc_rows(&o, &rt, dir.path())?);
    }
    rows.extend(fio_rows(&o, dir.path()));
    if mode != "grpc" {
        rows.extend(disk_rows(&o, &rt, dir.path())?);
    }
    drop(rt);
    driver::report::link_limits(&mut rows);
    if o.json {
        for r in &rows {
            println!("{}", r.to_json());
        }
    } else {
        print!("{}", driver::report::table(&rows));
    }
    if o.smoke {
        replay::smoke().context("replay smoke run")?;
        index::smoke().context("index smoke run")?;
        placement::smoke().context("placement smoke run")?;
        driver::cluster::smoke().context("cluster smoke run")?;
    }
    eprintln!("# done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// memcpy of every size on one thread and on as many threads as each
/// `--clients` value.
fn memcpy_rows(o: &Opts) -> Vec<Row> {
    let threads: BTreeSet<usize> = std::iter::once(1).chain(o.clients.iter().copied()).collect();
    let d = Duration::from_secs_f64(o.memcpy_seconds);
    let mut rows = Vec::new();
    for s in &o.sizes {
        for &t in &threads {
            let r = memcpy::measure(s.0 as usize, t, d);
            let mut row = Row::new(Kind::Memcpy, Op::Write, "memcpy", s.0).with_latency(&r.latency);
            row.clients = Some(t);
            row.ops = r.copies;
            row.seconds = r.elapsed.as_secs_f64();
            row.bytes_per_sec = Some(r.bytes_per_sec());
            progress(&row);
            rows.push(row);
        }
    }
    rows
}

/// Put then get over gRPC for every (size, clients).
fn grpc_rows(o: &Opts, rt: &tokio::runtime::Runtime, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let (node, endpoint, where_) = match &o.endpoint {
        Some(e) => (None, e.clone(), "remote".to_string()),
        None => {
            let node = LocalNode::start(
                &dir.join("node"),
                o.node_tier,
                o.capacity(),
                o.queue_depth,
                o.engine.setting(),
            )?;
            let e = node.endpoint();
            (Some(node), e, o.node_tier.as_str().to_string())
        }
    };
    let mut rows = Vec::new();
    for (size, clients) in o.configs() {
        let spec = o.spec(size, clients);
        let ns = format!("kvfabric-bench-{size}-{clients}");
        let (put, get) = rt.block_on(async {
            let store = Arc::new(GrpcStore::connect(&endpoint, clients, ns).await?);
            // Leftovers of an earlier run against --endpoint; the namespace
            // does not exist yet on a fresh node, which is fine.
            let _ = store.clear().await;
            let r = put_get(store.clone(), &spec).await;
            store.clear().await?;
            r
        })?;
        for (op, name, r) in [(Op::Write, "put", put), (Op::Read, "get", get)] {
            let row = phase_row(Kind::Grpc, op, format!("grpc {name} [{where_}]"), size, clients, &r);
            progress(&row);
            rows.push(row);
        }
    }
    if let Some(n) = node {
        n.shutdown();
    }
    Ok(rows)
}

/// Put then get on the disk tier directly for every (size, clients).
fn disk_rows(o: &Opts, rt: &tokio::runtime::Runtime, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let tier = driver::disk::open(&dir.join("disk"), o.capacity(), o.queue_depth, o.engine.kind())?;
    let engine = tier.engine();
    let mut rows = Vec::new();
    for (size, clients) in o.configs() {
        let spec = o.spec(size, clients);
        let store = Arc::new(driver::disk::DiskStore::new(
            tier.clone(),
            &format!("kvfabric-bench-{size}-{clients}"),
        ));
        let (put, get) = rt.block_on(async {
            let (put, written) = driver::put_phase(store.clone(), &spec).await?;
            let get = driver::get_phase(store.clone(), &spec, &written).await?;
            store.clear(&written).await?;
            anyhow::Ok((put, get))
        })?;
        for (op, name, r) in [(Op::Write, "put", put), (Op::Read, "get", get)] {
            let label = format!("disk {name} [{engine} qd{}]", o.queue_depth);
            let row = phase_row(Kind::Disk, op, label, size, clients, &r);
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

async fn put_get<S: Store>(store: Arc<S>, spec: &Spec) -> anyhow::Result<(driver::PhaseResult, driver::PhaseResult)> {
    let (put, written) = driver::put_phase(store.clone(), spec).await?;
    let get = driver::get_phase(store, spec, &written).await?;
    Ok((put, get))
}

fn phase_row(kind: Kind, op: Op, label: String, size: u64, clients: usize, r: &driver::PhaseResult) -> Row {
    let mut row = Row::new(kind, op, label, size).with_latency(&r.latency);
    row.clients = Some(clients);
    row.ops = r.ops;
    row.seconds = r.elapsed.as_secs_f64();
    row.bytes_per_sec = Some(r.bytes_per_sec());
    row
}

/// fio write then read for every size; a row with a note when fio is
/// missing or fails.
fn fio_rows(o: &Opts, dir: &Path) -> Vec<Row> {
    let file = dir.join("fio.dat");
    let mut rows = Vec::new();
    let mut missing = false;
    for s in &o.sizes {
        let job = fio::Job {
            fio: &o.fio,
            file: &file,
            file_size: o.fio_size.0,
            block_size: s.0,
            iodepth: o.queue_depth,
            runtime: Duration::from_secs_f64(o.fio_seconds),
        };
        for (rw, op) in [(Rw::Write, Op::Write), (Rw::Read, Op::Read)] {
            let mut row = Row::new(Kind::Fio, op, format!("fio {}", rw.as_str()), s.0);
            row.iodepth = Some(o.queue_depth);
            if missing {
                row.note = Some("fio not found".into());
            } else {
                match fio::run(&job, rw) {
                    Ok(r) => {
                        row.ops = r.ios;
                        row.seconds = r.elapsed.as_secs_f64();
                        row.bytes_per_sec = Some(r.bytes_per_sec);
                        row.p50_ns = r.p50_ns;
                        row.p99_ns = r.p99_ns;
                    }
                    Err(FioError::NotFound) => {
                        missing = true;
                        row.note = Some("fio not found".into());
                    }
                    Err(FioError::Failed(e)) => {
                        eprintln!("# fio {} {}: {e:#}", rw.as_str(), s);
                        row.note = Some("fio failed".into());
                    }
                }
            }
            progress(&row);
            rows.push(row);
        }
    }
    let _ = std::fs::remove_file(&file);
    rows
}

/// One line on stderr per measurement, so a long run shows where it is.
fn progress(r: &Row) {
    let gbps = r
        .bytes_per_sec
        .map(|b| format!("{:.2} GB/s", b / 1e9))
        .or_else(|| r.note.clone())
        .unwrap_or_default();
    let who = match (r.clients, r.iodepth) {
        (Some(c), _) => format!("x{c}"),
        (None, Some(q)) => format!("qd{q}"),
        _ => String::new(),
    };
    eprintln!("#   {} {} {}: {}", r.label, ByteSize(r.size), who, gbps);
}
