//! `kvfabric-bench peers`: every system side by side, one command. Installs
//! (when missing) and starts each peer on loopback, runs the same matrix
//! against each (value sizes x concurrent clients; put then get, distinct
//! keys, contents verified) and prints one table, or JSON lines with
//! `--json`:
//!
//! - `memcpy` of the same sizes on as many threads as clients (the limit of
//!   the local path);
//! - `fio` io_uring O_DIRECT at the same block size with clients x batch
//!   I/Os in flight (the limit of the disk tier);
//! - Mooncake Store, CPU build, remote and co-located ([`mooncake`]);
//! - Redis from Debian, driven from this binary ([`redis`]);
//! - kvfabric: the zero-copy local path, the gRPC path, the disk tier
//!   ([`fabric`]; each a `run_*` / `*_rows` function here).
//!
//! A system that cannot be installed or started is a row saying
//! `unavailable: <reason>` and the rest still runs. The submodules own the
//! table ([`row`]), the per-cell workload ([`workload`]) and one system each.

mod fabric;
mod mooncake;
mod redis;
mod row;
mod workload;

use crate::Engine;
use crate::driver::fio::{self, FioError, Rw};
use crate::driver::grpc::{LocalNode, NodeTier};
use anyhow::{Context, bail};
use clap::Args;
use kvfabric::server::ByteSize;
use kvfabric_bench::memcpy;
use row::{Op, Path as PeerPath, PeerRow, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{BatchStore, Cell};

/// Options of `kvfabric-bench peers`. Flags left unset take the full
/// matrix's values, or `--quick`'s.
#[derive(Args, Debug, Clone)]
pub(crate) struct PeersOpts {
    /// Systems to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kvfabric,memcpy,fio,mooncake,redis"
    )]
    systems: Vec<System>,
    /// kvfabric paths to run (with `kvfabric` in --systems).
    #[arg(long, value_delimiter = ',', default_value = "local,grpc,disk")]
    kvfabric_paths: Vec<KvfPath>,
    /// Value sizes [default: 256KiB,1MiB,4MiB; --quick: 1MiB,4MiB].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<ByteSize>>,
    /// Concurrent clients, one cell per value [default: 1,4,16; --quick: 1,4].
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Bytes each cell puts, and then gets, all clients together
    /// [default: 1GiB; --quick: 128MiB].
    #[arg(long, conflicts_with = "ops")]
    total_bytes: Option<ByteSize>,
    /// Values each client puts (and gets) per cell, instead of --total-bytes.
    #[arg(long)]
    ops: Option<u64>,
    /// Values per call (Mooncake batch_put_from / batch_get_into, Redis
    /// pipeline depth, kvfabric put_many / get_many, disk ops in flight per
    /// client).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Reduced matrix, well under two minutes once built and installed.
    #[arg(long)]
    quick: bool,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Where the node's, the disk tier's and fio's files go (a fresh
    /// temporary directory inside it) [default: the system temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Disk tier queue depth.
    #[arg(long, default_value_t = 64)]
    queue_depth: u32,
    /// Disk tier I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: Engine,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: String,
    /// Seconds per fio run [default: 2; --quick: 0.5].
    #[arg(long)]
    fio_seconds: Option<f64>,
    /// Seconds per memcpy measurement [default: 0.5; --quick: 0.2].
    #[arg(long)]
    memcpy_seconds: Option<f64>,
    /// Do not install missing peers (they are reported unavailable).
    #[arg(long)]
    no_install: bool,
    /// Where installed peers are cached [default: ~/.cache/kvfabric/peers].
    #[arg(long, env = "KVFABRIC_PEERS_DIR")]
    peers_dir: Option<PathBuf>,
    /// The crate's scripts (install-peers.sh, mooncake-netns.sh, mooncake_bench.py).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts"))]
    scripts_dir: PathBuf,
    /// Seconds before the Mooncake run is killed [default: 900; --quick: 90].
    #[arg(long)]
    mooncake_timeout: Option<u64>,
}

/// A kvfabric path, for `--kvfabric-paths`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KvfPath {
    /// The zero-copy local client.
    Local,
    /// gRPC over loopback.
    Grpc,
    /// The disk tier, called directly.
    Disk,
}

/// [`PeersOpts`] with every default applied.
#[derive(Debug, Clone)]
struct Plan {
    systems: Vec<System>,
    sizes: Vec<u64>,
    clients: Vec<usize>,
    total_bytes: u64,
    ops: Option<u64>,
    batch: usize,
    fio_seconds: f64,
    memcpy_seconds: f64,
    mooncake_timeout: Duration,
}

impl PeersOpts {
    fn plan(&self) -> anyhow::Result<Plan> {
        let q = self.quick;
        let sizes: Vec<u64> = match &self.sizes {
            Some(v) => v.iter().map(|s| s.0).collect(),
            None if q => vec![1 << 20, 4 << 20],
            None => vec![256 << 10, 1 << 20, 4 << 20],
        };
        let clients = self
            .clients
            .clone()
            .unwrap_or_else(|| if q { vec![1, 4] } else { vec![1, 4, 16] });
        let plan = Plan {
            systems: self.systems.clone(),
            sizes,
            clients,
            total_bytes: self.total_bytes.map_or(if q { 128 << 20 } else { 1 << 30 }, |b| b.0),
            ops: self.ops,
            batch: self.batch,
            fio_seconds: self.fio_seconds.unwrap_or(if q { 0.5 } else { 2.0 }),
            memcpy_seconds: self.memcpy_seconds.unwrap_or(if q { 0.2 } else { 0.5 }),
            mooncake_timeout: Duration::from_secs(self.mooncake_timeout.unwrap_or(if q { 90 } else { 900 })),
        };
        if plan.systems.is_empty() {
            bail!("--systems must name at least one system");
        }
        if plan.sizes.is_empty() || plan.sizes.contains(&0) {
            bail!("--sizes must list sizes above zero");
        }
        if plan.clients.is_empty() || plan.clients.contains(&0) {
            bail!("--clients must list counts above zero");
        }
        if plan.ops == Some(0) || plan.total_bytes == 0 || plan.batch == 0 {
            bail!("--ops, --total-bytes and --batch must be above zero");
        }
        for (name, v) in [
            ("--fio-seconds", plan.fio_seconds),
            ("--memcpy-seconds", plan.memcpy_seconds),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number of seconds");
            }
        }
        Ok(plan)
    }

    fn peers_dir(&self) -> PathBuf {
        self.peers_dir.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
            home.join(".cache/kvfabric/peers")
        })
    }
}

impl Plan {
    fn cells(&self) -> Vec<(u64, usize)> {
        self.sizes
            .iter()
            .flat_map(|&s| self.clients.iter().map(move |&c| (s, c)))
            .collect()
    }

    fn per_client(&self, size: u64, clients: usize) -> u64 {
        self.ops
            .unwrap_or_else(|| Cell::per_client_for(self.total_bytes, size, clients))
    }

    fn cell(&self, size: u64, clients: usize) -> Cell {
        Cell::new(size, clients, self.per_client(size, clients), self.batch)
    }

    /// Bytes of the largest cell.
    fn largest_cell(&self) -> u64 {
        self.cells()
            .into_iter()
            .map(|(s, c)| self.per_client(s, c) * s * c as u64)
            .max()
            .unwrap_or(0)
    }

    /// Capacity a kvfabric tier needs: the largest cell twice (a cell is
    /// cleared before the next), plus slack for rounding and in-flight puts.
    fn capacity(&self) -> u64 {
        2 * self.largest_cell() + (256 << 20)
    }

    fn has(&self, s: System) -> bool {
        self.systems.contains(&s)
    }
}

/// Runs `kvfabric-bench peers`.
pub(crate) fn run(opts: PeersOpts) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = opts.plan()?;
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("kvfabric-peers-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temporary directory in {}", base.display()))?;
    let machine = machine(dir.path());
    let command = command_line();
    eprintln!("# {command}");
    eprintln!(
        "# sizes {}, clients {:?}, {}, batch {}, systems {}",
        plan.sizes
            .iter()
            .map(|&s| ByteSize(s).to_string())
            .collect::<Vec<_>>()
            .join(","),
        plan.clients,
        match plan.ops {
            Some(n) => format!("{n} values per client and cell"),
            None => format!("{} per cell", ByteSize(plan.total_bytes)),
        },
        plan.batch,
        plan.systems.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
    );
    eprintln!("# machine: {machine}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("kvf-peers")
        .enable_all()
        .build()
        .context("starting the client runtime")?;

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if plan.has(System::Memcpy) {
        rows.extend(memcpy_rows(&plan));
    }
    if plan.has(System::Kvfabric) {
        let on = |p| opts.kvfabric_paths.contains(&p);
        if on(KvfPath::Local) {
            rows.extend(run_local(&plan, &rt, dir.path()));
        }
        if on(KvfPath::Grpc) {
            rows.extend(grpc_rows(&plan, &rt, dir.path()));
        }
        if on(KvfPath::Disk) {
            rows.extend(disk_rows(&plan, &rt, dir.path(), opts.queue_depth, opts.engine));
        }
    }
    if plan.has(System::Fio) {
        rows.extend(fio_rows(&plan, &opts.fio, dir.path()));
    }
    if plan.has(System::Redis) {
        let (r, note) = redis_rows(&plan, &opts, &rt, dir.path());
        rows.extend(r);
        notes.extend(note);
    }
    drop(rt);
    if plan.has(System::Mooncake) {
        rows.extend(mooncake_rows(&plan, &opts));
    }
    row::link(&mut rows);
    if opts.json {
        for r in &rows {
            println!("{}", r.to_json_line());
        }
    } else {
        println!("`{command}`\n");
        println!("Machine: {machine}.");
        for n in &notes {
            println!("{n}.");
        }
        println!();
        print!("{}", row::table(&rows));
    }
    eprintln!("# done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One line on stderr per row, so a long run shows where it is.
fn progress(r: &PeerRow) {
    let what = match (&r.unavailable, r.gbps) {
        (Some(u), _) => format!("unavailable: {u}"),
        (None, Some(g)) => format!("{g:.2} GB/s"),
        (None, None) => "-".into(),
    };
    eprintln!(
        "#   {} {} {} {} x{}: {what}",
        r.system.as_str(),
        r.path.as_str(),
        r.op.as_str(),
        ByteSize(r.value_bytes),
        r.clients
    );
}

/// An error, in one line of at most 200 characters, for a table cell.
fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}").replace('\n', " ");
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

/// Unavailable rows for every cell of one system path.
fn unavailable_rows(plan: &Plan, system: System, path: PeerPath, reason: &str) -> Vec<PeerRow> {
    let mut rows = Vec::new();
    row::fill_missing(&mut rows, system, &[path], &plan.sizes, &plan.clients, reason);
    rows.iter().for_each(progress);
    rows
}

/// Runs every cell against a store built per cell by `open`, after one
/// unreported warm-up cell (the largest size, one client) that faults in
/// memory and opens connections the way a long-running store has them;
/// `close` runs after each cell, untimed.
fn matrix<S, O, C>(
    plan: &Plan,
    rt: &tokio::runtime::Runtime,
    system: System,
    path: PeerPath,
    open: O,
    close: C,
) -> Vec<PeerRow>
where
    S: BatchStore,
    O: Fn(&Cell) -> anyhow::Result<Arc<S>>,
    C: Fn(&S, &Cell) -> anyhow::Result<()>,
{
    let max = *plan.sizes.iter().max().expect("sizes checked");
    let warm = Arc::new(plan.cell(max, 1));
    let warmed = open(&warm).and_then(|s| {
        rt.block_on(workload::run_cell(s.clone(), warm.clone()))?;
        close(&s, &warm)
    });
    if let Err(e) = warmed {
        return unavailable_rows(plan, system, path, &short(&e));
    }
    let mut rows = Vec::new();
    for (size, clients) in plan.cells() {
        let cell = Arc::new(plan.cell(size, clients));
        let r = open(&cell).and_then(|s| {
            let r = rt.block_on(workload::run_cell(s.clone(), cell.clone()));
            close(&s, &cell)?;
            r
        });
        match r {
            Ok((put, get)) => {
                rows.push(put.row(system, path, Op::Put, &cell));
                rows.push(get.row(system, path, Op::Get, &cell));
            }
            Err(e) => {
                let why = short(&e);
                for op in [Op::Put, Op::Get] {
                    rows.push(PeerRow::new(system, path, op, size, clients).unavailable(why.clone()));
                }
            }
        }
        rows[rows.len() - 2..].iter().for_each(progress);
    }
    rows
}

/// Destination working set of the memcpy limit: the cell's data, at least
/// 256 MiB (well past the 32 MiB L3 here) and at most 1 GiB.
fn memcpy_working_set(plan: &Plan) -> usize {
    (plan.total_bytes as usize).clamp(256 << 20, 1 << 30)
}

/// memcpy of each size on as many threads as clients, into a destination
/// as large as the cell's data (copies land in DRAM, as a put into the
/// arena or a get out of it does); one measurement is shown against both
/// ops (a copy is a copy).
fn memcpy_rows(plan: &Plan) -> Vec<PeerRow> {
    let d = Duration::from_secs_f64(plan.memcpy_seconds);
    let mut rows = Vec::new();
    for (size, clients) in plan.cells() {
        let r = memcpy::measure_working_set(size as usize, clients, d, memcpy_working_set(plan));
        let q = |x: f64| Some(r.latency.value_at_quantile(x) as f64 / 1e3);
        for op in [Op::Put, Op::Get] {
            let row = PeerRow::new(System::Memcpy, PeerPath::Local, op, size, clients).measured(
                r.bytes_per_sec() / 1e9,
                q(0.5),
                q(0.99),
            );
            progress(&row);
            rows.push(row);
        }
    }
    rows
}

/// The zero-copy local path: an in-process node with a host tier, one
/// `LocalClient` per client over its Unix socket and shared arena.
fn run_local(plan: &Plan, rt: &tokio::runtime::Runtime, dir: &Path) -> Vec<PeerRow> {
    let node = match LocalNode::start(&dir.join("local"), NodeTier::Host, plan.capacity(), 64, "auto") {
        Ok(n) => n,
        Err(e) => return unavailable_rows(plan, System::Kvfabric, PeerPath::Local, &short(&e)),
    };
    let Some(socket) = node.local_socket() else {
        return unavailable_rows(
            plan,
            System::Kvfabric,
            PeerPath::Local,
            "the node serves no local socket",
        );
    };
    let endpoint = node.endpoint();
    let rows = matrix(
        plan,
        rt,
        System::Kvfabric,
        PeerPath::Local,
        |cell| {
            let ns = format!("peers-{}-{}", cell.size, cell.clients);
            let s = rt.block_on(fabric::LocalBatch::connect(&socket, &endpoint, cell, ns))?;
            let _ = rt.block_on(s.clear());
            Ok(Arc::new(s))
        },
        |s, _| rt.block_on(s.clear()),
    );
    node.shutdown();
    rows
}

/// kvfabric over gRPC: an in-process node with a host tier.
fn grpc_rows(plan: &Plan, rt: &tokio::runtime::Runtime, dir: &Path) -> Vec<PeerRow> {
    let node = match LocalNode::start(&dir.join("node"), NodeTier::Host, plan.capacity(), 64, "auto") {
        Ok(n) => n,
        Err(e) => return unavailable_rows(plan, System::Kvfabric, PeerPath::Grpc, &short(&e)),
    };
    let endpoint = node.endpoint();
    let rows = matrix(
        plan,
        rt,
        System::Kvfabric,
        PeerPath::Grpc,
        |cell| {
            let ns = format!("peers-{}-{}", cell.size, cell.clients);
            let s = rt.block_on(fabric::GrpcBatch::connect(&endpoint, cell.clients, ns))?;
            // Leftovers of an earlier run; a fresh namespace does not exist
            // yet, which is fine.
            let _ = rt.block_on(s.clear());
            Ok(Arc::new(s))
        },
        |s, _| rt.block_on(s.clear()),
    );
    node.shutdown();
    rows
}

/// kvfabric's disk tier, called directly.
fn disk_rows(plan: &Plan, rt: &tokio::runtime::Runtime, dir: &Path, queue_depth: u32, engine: Engine) -> Vec<PeerRow> {
    let tier = match crate::driver::disk::open(&dir.join("disk"), plan.capacity(), queue_depth, engine.kind()) {
        Ok(t) => t,
        Err(e) => return unavailable_rows(plan, System::Kvfabric, PeerPath::Disk, &short(&e)),
    };
    eprintln!("# disk tier: {} engine, queue depth {queue_depth}", tier.engine());
    matrix(
        plan,
        rt,
        System::Kvfabric,
        PeerPath::Disk,
        |cell| {
            let ns = format!("peers-{}-{}", cell.size, cell.clients);
            Ok(Arc::new(fabric::DiskBatch(crate::driver::disk::DiskStore::new(
                tier.clone(),
                &ns,
            ))))
        },
        |s, cell| rt.block_on(s.0.clear(&vec![cell.per_client; cell.clients])),
    )
}

/// fio write then read at each cell's size with clients x batch I/Os in
/// flight, on a file as large as the cell's data, in the same directory as
/// the disk tier's files.
fn fio_rows(plan: &Plan, bin: &str, dir: &Path) -> Vec<PeerRow> {
    if let Err(e) = fio::version(bin) {
        let why = match e {
            FioError::NotFound => format!("{bin} not found"),
            FioError::Failed(e) => short(&e),
        };
        return unavailable_rows(plan, System::Fio, PeerPath::Disk, &why);
    }
    let file = dir.join("fio.dat");
    let mut rows = Vec::new();
    for (size, clients) in plan.cells() {
        let job = fio::Job {
            fio: bin,
            file: &file,
            file_size: (plan.per_client(size, clients) * size * clients as u64).max(64 << 20),
            block_size: size,
            iodepth: (clients * plan.batch).clamp(1, 4096) as u32,
            runtime: Duration::from_secs_f64(plan.fio_seconds),
        };
        for (rw, op) in [(Rw::Write, Op::Put), (Rw::Read, Op::Get)] {
            let r = PeerRow::new(System::Fio, PeerPath::Disk, op, size, clients);
            let r = match fio::run(&job, rw) {
                Ok(f) => r.measured(
                    f.bytes_per_sec / 1e9,
                    f.p50_ns.map(|n| n / 1e3),
                    f.p99_ns.map(|n| n / 1e3),
                ),
                Err(FioError::NotFound) => r.unavailable(format!("{bin} not found")),
                Err(FioError::Failed(e)) => r.unavailable(short(&e)),
            };
            progress(&r);
            rows.push(r);
        }
    }
    let _ = std::fs::remove_file(&file);
    rows
}

/// Runs `install-peers.sh <peer>` (unless `--no-install`); returns what its
/// last line of stdout names, or why it failed.
fn install(opts: &PeersOpts, peer: &str) -> Result<String, String> {
    if opts.no_install {
        return Err("not installed (--no-install)".into());
    }
    let script = opts.scripts_dir.join("install-peers.sh");
    eprintln!("# installing {peer} if missing: {}", script.display());
    let out = Command::new("bash")
        .arg(&script)
        .arg(peer)
        .env("KVFABRIC_PEERS_DIR", opts.peers_dir())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let last = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    if out.status.success() {
        Ok(last(&out.stdout))
    } else {
        let why = last(&out.stderr);
        Err(if why.is_empty() {
            format!("install-peers.sh {peer} exited with {}", out.status)
        } else {
            why
        })
    }
}

/// Redis: install if missing, start on a free port, run the matrix, stop.
/// Also returns a note naming the version.
fn redis_rows(
    plan: &Plan,
    opts: &PeersOpts,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
) -> (Vec<PeerRow>, Option<String>) {
    let bin = match install(opts, "redis") {
        Ok(line) => line
            .strip_prefix("redis-server ")
            .map(PathBuf::from)
            .or_else(redis::which),
        Err(e) => redis::which().ok_or(e).map(Some).unwrap_or_else(|e| {
            eprintln!("# redis: {e}");
            None
        }),
    };
    let Some(bin) = bin else {
        return (
            unavailable_rows(plan, System::Redis, PeerPath::Remote, "redis-server not installed"),
            None,
        );
    };
    let server = match redis::Server::start(&bin, &dir.join("redis"), rt) {
        Ok(s) => s,
        Err(e) => {
            return (
                unavailable_rows(plan, System::Redis, PeerPath::Remote, &short(&e)),
                None,
            );
        }
    };
    let note = format!("Redis: {}", server.version());
    eprintln!("# {note}");
    let rows = matrix(
        plan,
        rt,
        System::Redis,
        PeerPath::Remote,
        |cell| Ok(Arc::new(rt.block_on(server.store(cell.clients))?)),
        |_, _| rt.block_on(server.flush_all()),
    );
    drop(server);
    (rows, Some(note))
}

/// Mooncake: install if missing, then the namespace wrapper runs both paths.
fn mooncake_rows(plan: &Plan, opts: &PeersOpts) -> Vec<PeerRow> {
    let paths = [PeerPath::Colocated, PeerPath::Remote];
    let peers_dir = opts.peers_dir();
    let venv = match install(opts, "mooncake") {
        Ok(line) => line
            .strip_prefix("mooncake ")
            .map_or_else(|| mooncake::venv(&peers_dir), PathBuf::from),
        Err(e) if opts.no_install && mooncake::venv(&peers_dir).join("bin/mooncake_master").is_file() => {
            eprintln!("# mooncake: {e}; using {}", mooncake::venv(&peers_dir).display());
            mooncake::venv(&peers_dir)
        }
        Err(e) => {
            return paths
                .iter()
                .flat_map(|&p| unavailable_rows(plan, System::Mooncake, p, &e))
                .collect();
        }
    };
    let log_dir = peers_dir.join("logs/mooncake");
    let _ = std::fs::remove_dir_all(&log_dir);
    eprintln!(
        "# mooncake: running both paths in a private network namespace; logs in {}",
        log_dir.display()
    );
    let run = mooncake::Run {
        scripts: &opts.scripts_dir,
        venv: &venv,
        log_dir: &log_dir,
        paths: &paths,
        sizes: &plan.sizes,
        clients: &plan.clients,
        total_bytes: plan.ops.is_none().then_some(plan.total_bytes),
        per_client: plan.ops,
        batch: plan.batch,
        timeout: plan.mooncake_timeout,
    };
    let rows = run.rows();
    rows.iter().for_each(progress);
    rows
}

/// The command line as run.
fn command_line() -> String {
    let mut args = std::env::args();
    let bin = args.next().map_or_else(
        || "kvfabric-bench".to_string(),
        |b| b.rsplit('/').next().unwrap_or(&b).to_string(),
    );
    std::iter::once(bin).chain(args).collect::<Vec<_>>().join(" ")
}

/// The machine, in one line: CPUs and model, memory, kernel, and the file
/// system `dir` is on.
fn machine(dir: &Path) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or("?".to_string(), |kib| format!("{:.0}", kib as f64 / (1 << 20) as f64));
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let disk = Command::new("df")
        .arg("--output=source,fstype")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).lines().nth(1)?.to_string();
            Some(s.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{cpus} CPUs ({model}), {mem_gib} GiB memory, Linux {kernel}, data dir {} on {disk}",
        dir.parent().unwrap_or(dir).display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Wrap {
        #[command(flatten)]
        o: PeersOpts,
    }

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        let w = Wrap::try_parse_from(std::iter::once("peers").chain(args.iter().copied()))?;
        w.o.plan()
    }

    #[test]
    fn quick_and_full_matrices() {
        let full = plan(&[]).unwrap();
        assert_eq!(full.sizes, [256 << 10, 1 << 20, 4 << 20]);
        assert_eq!(full.clients, [1, 4, 16]);
        assert_eq!(full.cells().len(), 9);
        assert_eq!(full.systems.len(), 5);
        let quick = plan(&["--quick"]).unwrap();
        assert_eq!(quick.cells().len(), 4);
        assert_eq!(quick.total_bytes, 128 << 20);
        // Explicit flags win over --quick.
        let q = plan(&["--quick", "--sizes", "256KiB", "--systems", "redis,fio"]).unwrap();
        assert_eq!(q.sizes, [256 << 10]);
        assert_eq!(q.systems, [System::Redis, System::Fio]);
        assert_eq!(q.clients, [1, 4]);
        // 1 GiB of 4 MiB values over 16 clients: 16 each; --ops overrides.
        assert_eq!(full.per_client(4 << 20, 16), 16);
        assert_eq!(plan(&["--ops", "3"]).unwrap().per_client(4 << 20, 16), 3);
        assert_eq!(full.largest_cell(), 1 << 30);
        assert!(plan(&["--ops", "3", "--total-bytes", "1MiB"]).is_err());
        assert!(plan(&["--clients", "0"]).is_err());
        assert!(plan(&["--systems", "etcd"]).is_err());
        assert!(plan(&["--batch", "0"]).is_err());
    }

    #[test]
    fn describes_the_machine() {
        let m = machine(&std::env::temp_dir());
        assert!(m.contains("CPUs") && m.contains("GiB memory"), "{m}");
    }
}
