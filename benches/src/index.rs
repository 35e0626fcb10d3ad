//! `kvfabric-bench index`: the router's prefix index under an engine-like
//! event load, side by side with Dynamo's Python-exposed `RadixTree` when
//! `--with-dynamo` is given.
//!
//! Workload, per worker count W (default 16, 64, 256): requests are chains
//! of `--depth` blocks (default 64), a shared prefix of depth/2 blocks drawn
//! from 1024 prefixes plus a unique suffix. Each worker stores the chains
//! routed to it in events of `--event-blocks` blocks (default 16); once it holds more than its share
//! of `--blocks` (default 1M (worker, block) pairs in all), every new chain
//! evicts its oldest chain's suffix (remove events of the same size): heavy
//! eviction at steady state. The index is first filled to ~`--blocks`
//! pairs, then:
//!
//! - **events**: `--events` pre-generated store/remove events are applied on
//!   one thread, timed as a whole (events/s and blocks/s);
//! - **lookup**: `--lookups` lookups of resident chains at full depth, each
//!   timed, on an idle index and again while another thread applies events
//!   (p50/p99).
//!
//! Block ids are random 128-bit values, as canonical block hashes are.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use kvfabric_bench::latency::{format_ns, histogram, record};
use kvfabric_router::index::{BlockId, ChainMatch, HolderId, PrefixIndex, ShardedIndex, Tier};

const PREFIXES: usize = 1024;

/// Options of `kvfabric-bench index`.
#[derive(Args, Debug, Clone)]
pub(crate) struct IndexOpts {
    /// Worker counts; one run each.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    workers: Vec<usize>,
    /// Resident (worker, block) pairs to hold at steady state.
    #[arg(long, default_value_t = 1_000_000)]
    blocks: usize,
    /// Blocks per request chain (also the lookup depth); even, >= 2.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Blocks per store/remove event (vLLM sends a request's new blocks in
    /// one event; 1 makes every block its own event).
    #[arg(long, default_value_t = 16)]
    event_blocks: usize,
    /// Timed events per run.
    #[arg(long, default_value_t = 2_000_000)]
    events: usize,
    /// Timed lookups per run and phase.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// Also run Dynamo's `RadixTree` (pip `ai-dynamo-runtime`, installed into
    /// a venv under ~/.cache/kvfabric/bench-deps when missing) on the same
    /// workload shape.
    #[arg(long)]
    with_dynamo: bool,
    /// One JSON object per row.
    #[arg(long)]
    json: bool,
    /// Tiny run for CI.
    #[arg(long)]
    smoke: bool,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// splitmix64: fast, seeded, good enough for synthetic hashes.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn id(&mut self) -> BlockId {
        (self.next() as u128) << 64 | self.next() as u128
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One index update, as an event source would deliver it.
#[derive(Debug)]
enum Ev {
    Store(HolderId, Vec<BlockId>),
    Remove(HolderId, Vec<BlockId>),
}

impl Ev {
    fn apply(&self, ix: &dyn PrefixIndex) -> usize {
        match self {
            Ev::Store(h, b) => {
                ix.store(*h, Tier::Hbm, b);
                b.len()
            }
            Ev::Remove(h, b) => {
                ix.remove(*h, Some(Tier::Hbm), b);
                b.len()
            }
        }
    }
}

/// The synthetic fleet: who holds which chains, oldest first.
#[derive(Debug)]
struct Fleet {
    rng: Rng,
    prefixes: Vec<Vec<BlockId>>,
    held: Vec<VecDeque<Vec<BlockId>>>,
    held_blocks: Vec<usize>,
    per_worker: usize,
    depth: usize,
    event_blocks: usize,
}

impl Fleet {
    fn new(workers: usize, blocks: usize, depth: usize, event_blocks: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let prefixes = (0..PREFIXES)
            .map(|_| (0..depth / 2).map(|_| rng.id()).collect())
            .collect();
        Fleet {
            rng,
            prefixes,
            held: vec![VecDeque::new(); workers],
            held_blocks: vec![0; workers],
            per_worker: (blocks / workers).max(depth),
            depth,
            event_blocks,
        }
    }

    /// The events of one request landing on a random worker.
    fn request(&mut self, out: &mut Vec<Ev>) {
        let w = self.rng.below(self.held.len());
        let p = self.rng.below(self.prefixes.len());
        let mut chain = self.prefixes[p].clone();
        chain.extend((0..self.depth - self.depth / 2).map(|_| self.rng.id()));
        for part in chain.chunks(self.event_blocks) {
            out.push(Ev::Store(HolderId(w as u32), part.to_vec()));
        }
        self.held_blocks[w] += chain.len();
        self.held[w].push_back(chain);
        while self.held_blocks[w] > self.per_worker {
            let Some(old) = self.held[w].pop_front() else { break };
            // The shared prefix may back other chains of the worker: evict
            // the unique suffix only (prefix blocks are re-stored by later
            // requests anyway).
            let suffix = &old[self.depth / 2..];
            for part in suffix.chunks(self.event_blocks) {
                out.push(Ev::Remove(HolderId(w as u32), part.to_vec()));
            }
            self.held_blocks[w] -= old.len();
        }
    }

    /// A resident chain of a random worker.
    fn resident(&mut self) -> Vec<BlockId> {
        loop {
            let w = self.rng.below(self.held.len());
            let q = &self.held[w];
            if !q.is_empty() {
                let i = self.rng.below(q.len());
                return q[i].clone();
            }
        }
    }
}

/// One result row.
#[derive(Debug)]
struct Row {
    system: &'static str,
    workers: usize,
    resident_pairs: usize,
    events_per_s: f64,
    blocks_per_s: f64,
    idle_p50_ns: f64,
    idle_p99_ns: f64,
    busy_p50_ns: f64,
    busy_p99_ns: f64,
    lookups_per_s: f64,
}

fn lookups(
    ix: &dyn PrefixIndex,
    chains: &[Vec<BlockId>],
    n: usize,
    depth: usize,
) -> anyhow::Result<(Histogram<u64>, f64)> {
    let mut h = histogram();
    let mut m = ChainMatch::default();
    let start = Instant::now();
    for i in 0..n {
        let chain = &chains[i % chains.len()];
        let t = Instant::now();
        ix.lookup(chain, &mut m);
        record(&mut h, t.elapsed());
        if m.depth != depth {
            bail!("a resident chain matched only {} of {depth} blocks", m.depth);
        }
    }
    Ok((h, n as f64 / start.elapsed().as_secs_f64()))
}

fn run_ours(o: &IndexOpts, workers: usize) -> anyhow::Result<Row> {
    let ix: Arc<ShardedIndex> = Arc::new(ShardedIndex::new());
    let mut fleet = Fleet::new(workers, o.blocks, o.depth, o.event_blocks, o.seed);
    // Fill to steady state (every worker at its share).
    let mut evs = Vec::new();
    // (Each worker stays within a chain of its share, so stop one chain per
    // worker short of the target.)
    while fleet.held_blocks.iter().sum::<usize>() + o.depth * workers < o.blocks {
        fleet.request(&mut evs);
        for e in evs.drain(..) {
            e.apply(&*ix);
        }
    }
    for _ in 0..workers * 2 {
        fleet.request(&mut evs);
    }
    for e in evs.drain(..) {
        e.apply(&*ix);
    }
    let resident_pairs: usize = fleet.held_blocks.iter().sum();

    // Timed event application.
    let mut timed = Vec::with_capacity(o.events + 16);
    while timed.len() < o.events {
        fleet.request(&mut timed);
    }
    let start = Instant::now();
    let mut blocks = 0;
    for e in &timed {
        blocks += e.apply(&*ix);
    }
    let secs = start.elapsed().as_secs_f64();
    let events_per_s = timed.len() as f64 / secs;
    let blocks_per_s = blocks as f64 / secs;

    // Lookups of resident chains, idle.
    let chains: Vec<Vec<BlockId>> = (0..4096.min(o.lookups.max(1))).map(|_| fleet.resident()).collect();
    let (idle, lookups_per_s) = lookups(&*ix, &chains, o.lookups, o.depth)?;

    // Lookups while another thread applies events to other chains.
    let mut churn = Vec::new();
    while churn.len() < o.events.min(1_000_000) {
        fleet.request(&mut churn);
    }
    // Keep the looked-up chains resident: drop removals that would evict
    // them (a small fraction).
    let looked_up: std::collections::HashSet<BlockId> = chains.iter().flatten().copied().collect();
    let churn: Vec<Ev> = churn
        .into_iter()
        .filter(|e| match e {
            Ev::Remove(_, b) => !b.iter().any(|id| looked_up.contains(id)),
            Ev::Store(..) => true,
        })
        .collect();
    let stop = AtomicBool::new(false);
    let busy = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < churn.len() {
                churn[i].apply(&*ix);
                i += 1;
            }
        });
        let r = lookups(&*ix, &chains, o.lookups, o.depth);
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
        r
    })?;
    Ok(Row {
        system: "kvfabric",
        workers,
        resident_pairs,
        events_per_s,
        blocks_per_s,
        idle_p50_ns: idle.value_at_quantile(0.5) as f64,
        idle_p99_ns: idle.value_at_quantile(0.99) as f64,
        busy_p50_ns: busy.0.value_at_quantile(0.5) as f64,
        busy_p99_ns: busy.0.value_at_quantile(0.99) as f64,
        lookups_per_s,
    })
}

const DYNAMO_SCRIPT: &str = include_str!("../scripts/dynamo_radix.py");

fn dynamo_python() -> anyhow::Result<std::path::PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = std::path::Path::new(&home).join(".cache/kvfabric/bench-deps/dynamo-venv");
    let py = venv.join("bin/python");
    let ok = std::process::Command::new(&py)
        .args(["-c", "import dynamo._core"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("installing ai-dynamo-runtime into {}", venv.display());
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !st.success() {
            bail!("python3 -m venv failed");
        }
        let st = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "ai-dynamo-runtime"])
            .status()?;
        if !st.success() {
            bail!("pip install ai-dynamo-runtime failed");
        }
    }
    Ok(py)
}

fn run_dynamo(o: &IndexOpts, workers: usize) -> anyhow::Result<Row> {
    let py = dynamo_python()?;
    // Python is ~50x slower: scale the event and lookup counts down so a
    // run takes seconds, and say so in the row (rates are per second).
    let events = (o.events / 20).max(1000);
    let lookups = (o.lookups / 20).max(200);
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(DYNAMO_SCRIPT)
        .args([
            workers.to_string(),
            o.blocks.to_string(),
            o.event_blocks.to_string(),
            o.depth.to_string(),
            events.to_string(),
            lookups.to_string(),
            o.seed.to_string(),
        ])
        .env("RUST_LOG", "error")
        .env("DYN_LOG", "error")
        .output()
        .context("running the Dynamo RadixTree script")?;
    if !out.status.success() {
        bail!("Dynamo script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("Dynamo script output is not JSON")?;
    let f = |k: &str| v[k].as_f64().with_context(|| format!("Dynamo script output lacks {k}"));
    let failed = f("failed_events")?;
    if failed > 0.0 {
        eprintln!(
            "# dynamo-py, {workers} workers: the tree refused {failed} of {events} timed events \
             (stores whose parent it had dropped); they count in events/s"
        );
    }
    Ok(Row {
        system: "dynamo-py",
        workers,
        resident_pairs: f("resident_pairs")? as usize,
        events_per_s: f("events_per_s")?,
        blocks_per_s: f("blocks_per_s")?,
        idle_p50_ns: f("lookup_p50_ns")?,
        idle_p99_ns: f("lookup_p99_ns")?,
        busy_p50_ns: f64::NAN,
        busy_p99_ns: f64::NAN,
        lookups_per_s: f("lookups_per_s")?,
    })
}

/// The tiny index run of `kvfabric-bench --smoke`.
pub(crate) fn smoke() -> anyhow::Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        o: IndexOpts,
    }
    run(Wrap::parse_from(["index", "--smoke"]).o)
}

/// Runs `kvfabric-bench index`.
pub(crate) fn run(mut o: IndexOpts) -> anyhow::Result<()> {
    if o.smoke {
        o.workers = vec![4];
        o.blocks = 20_000;
        o.events = 20_000;
        o.lookups = 2_000;
    }
    if o.depth < 2 || !o.depth.is_multiple_of(2) {
        bail!("--depth must be even and >= 2");
    }
    if o.workers.is_empty() || o.workers.contains(&0) {
        bail!("--workers must list counts above zero");
    }
    if o.event_blocks == 0 {
        bail!("--event-blocks must be above zero");
    }
    if o.events == 0 || o.lookups == 0 {
        bail!("--events and --lookups must be above zero");
    }
    let mut first = true;
    for &w in &o.workers {
        print_row(&run_ours(&o, w)?, o.json, std::mem::take(&mut first));
        if o.with_dynamo {
            match run_dynamo(&o, w) {
                Ok(r) => print_row(&r, o.json, false),
                Err(e) => eprintln!("dynamo-py, {w} workers: skipped: {e:#}"),
            }
        }
    }
    if !o.json {
        println!(
            "(depth {}, {} events of {} blocks timed per run, lookups of resident chains; busy = while another thread applies events)",
            o.depth, o.events, o.event_blocks
        );
    }
    Ok(())
}

fn print_row(r: &Row, json: bool, header: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "system": r.system, "workers": r.workers, "resident_pairs": r.resident_pairs,
                "events_per_s": r.events_per_s, "blocks_per_s": r.blocks_per_s,
                "lookup_p50_ns": r.idle_p50_ns, "lookup_p99_ns": r.idle_p99_ns,
                "busy_lookup_p50_ns": if r.busy_p50_ns.is_nan() { None } else { Some(r.busy_p50_ns) },
                "busy_lookup_p99_ns": if r.busy_p99_ns.is_nan() { None } else { Some(r.busy_p99_ns) },
                "lookups_per_s": r.lookups_per_s,
            })
        );
        return;
    }
    if header {
        println!(
            "{:<10} {:>7} {:>9} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>11}",
            "system", "workers", "resident", "events/s", "blocks/s", "p50", "p99", "busy p50", "busy p99", "lookups/s"
        );
    }
    let f = |ns: f64| if ns.is_nan() { "-".to_string() } else { format_ns(ns) };
    println!(
        "{:<10} {:>7} {:>9} {:>12.0} {:>12.0} {:>10} {:>10} {:>10} {:>10} {:>11.0}",
        r.system,
        r.workers,
        r.resident_pairs,
        r.events_per_s,
        r.blocks_per_s,
        f(r.idle_p50_ns),
        f(r.idle_p99_ns),
        f(r.busy_p50_ns),
        f(r.busy_p99_ns),
        r.lookups_per_s
    );
}
