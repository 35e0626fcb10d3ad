//! `kvfabric-bench replay --trace FILE`: replays a Mooncake-format trace
//! in virtual time against simulated workers, with the real router code
//! (`kvfabric_router::Router` over a `ShardedIndex`) in the loop, and
//! compares routing policies on the same simulated cluster: round-robin,
//! random, HBM-only KV-aware (what Dynamo's router scores) and kvfabric's
//! tier-aware scoring, beside a TTFT oracle that reads the simulated
//! workers' exact state (a reference, not a router: see [`sim`]).
//!
//! ```text
//! cargo run --release -p kvfabric-bench -- replay --trace ../shared/data/conversation_trace.jsonl
//!     [--workers 8] [--workers-per-host 8] [--reach any|colocated] [--time-scale X]
//!     [--limit N] [--seed S] [--json] [--plot FILE.png | --no-plot]
//! ```
//!
//! - [`trace`]: parsing, block identity, the infinite-cache bound;
//! - [`sim`]: the discrete-event simulation (its module doc is the model);
//! - [`report`]: percentiles, the table and the JSON lines;
//! - [`plot`]: the PNG of TTFT CDFs.
//!
//! **Time scale.** Arrival timestamps are multiplied by one factor for every
//! policy. Unless `--time-scale` is given it is calibrated so that
//! round-robin keeps prefill `--target-utilization` (80%) busy, busy meaning
//! the offered load: GPU time round-robin spends in prefill batches over
//! workers times the span from the first arrival to the last (the fraction
//! of time the GPUs would be busy if work were done as it arrives; a mean
//! over the span of the drain instead cannot reach 80% once queues build
//! unevenly). Far from the target the load is nearly inversely
//! proportional to the scale, so `s <- s * u / target` (overshooting by
//! 5%) finds a bracket in a run or two; then bisection (geometric) narrows
//! it to 1%, and the scale whose load came closest is used. Bisection, not
//! the proportional update, because round-robin's load is not smooth near
//! the target: once its queues grow, later turns of a conversation arrive
//! before the earlier turn's blocks are written and recompute them, which
//! adds load (the calibration runs print this).
//!
//! **Defaults** describe one 8-GPU host serving an 8B-class model (128 KiB
//! of KV per token in bf16), not the shipped trace: 300k tokens (~37 GiB)
//! of HBM per GPU left for cached prefixes, 1 TiB of host memory and 16 TiB
//! of NVMe for the fabric node co-located with all eight workers (DGX-class
//! hosts carry 2 TiB of DRAM and ~30 TB of NVMe; with `--workers-per-host`
//! each host's node gets 128 GiB and 2 TiB per worker on it), an unbounded
//! object tier,
//! the router's default bandwidths (host 20 GB/s, disk 5 GB/s, object
//! 1 GB/s, network 12.5 GB/s), 20 ms per output token, 8192-token prefill
//! batches (vLLM's default batch budget). The router converts load times
//! with the prefill model's peak throughput (see `PrefillModel`), and
//! counts blocks of 512 tokens: the trace's blocks are the router's.

mod plot;
mod report;
mod sim;
mod trace;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use kvfabric::server::ByteSize;
use kvfabric_router::score::{Bandwidths, CostSettings, Loads, Reach};

use sim::{Policy, PrefillModel, RunResult, SimConfig};
use trace::Trace;

/// Default workers per host (see the module doc).
const DEFAULT_WORKERS_PER_HOST: usize = 8;
/// Default host-memory tier per worker on a host: 128 GiB.
const HOST_BYTES_PER_WORKER: u64 = 128 << 30;
/// Default NVMe tier per worker on a host: 2 TiB.
const DISK_BYTES_PER_WORKER: u64 = 2 << 40;

/// Where the smoke run finds its trace: the committed sample.
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/conversation_trace_sample.jsonl");

/// `--reach`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReachArg {
    /// Every node.
    Any,
    /// The node on the worker's host.
    Colocated,
}

/// `--loads`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LoadsArg {
    /// Only blocks cheaper to load than to recompute.
    Cheaper,
    /// Every block found (what the simulated workers do; the router's default).
    All,
}

/// Options of `kvfabric-bench replay`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ReplayOpts {
    /// The trace: JSON lines with timestamp (ms), input_length, output_length, hash_ids.
    #[arg(long)]
    trace: PathBuf,
    /// Replay only the first N requests of the file.
    #[arg(long)]
    limit: Option<usize>,
    /// Simulated workers (one GPU and engine each).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Workers (GPUs) per host; each host runs one fabric node its workers share.
    #[arg(long, default_value_t = DEFAULT_WORKERS_PER_HOST)]
    workers_per_host: usize,
    /// Tokens per trace block (hash id); also the router's block size.
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// KV cache bytes per token (all layers, K and V); 128KiB is an 8B-class model in bf16.
    #[arg(long, default_value = "128KiB")]
    kv_bytes_per_token: ByteSize,
    /// Each worker's HBM left for cached prefixes, in tokens (300k x 128 KiB ~ 37 GiB).
    #[arg(long, default_value_t = 300_000)]
    hbm_tokens: u64,
    /// Host-memory tier of each fabric node (0 disables the tier) [default:
    /// 128GiB per worker on the host].
    #[arg(long)]
    host_capacity: Option<ByteSize>,
    /// NVMe tier of each fabric node (0 disables the tier) [default: 2TiB
    /// per worker on the host].
    #[arg(long)]
    disk_capacity: Option<ByteSize>,
    /// Object tier capacity of each fabric node [default: unbounded] (0 disables the tier).
    #[arg(long)]
    object_capacity: Option<ByteSize>,
    /// Host-memory read bandwidth into a GPU, GB/s.
    #[arg(long, default_value_t = Bandwidths::default().host / 1e9)]
    host_gbps: f64,
    /// NVMe read bandwidth per worker, GB/s.
    #[arg(long, default_value_t = Bandwidths::default().disk / 1e9)]
    disk_gbps: f64,
    /// Object store read bandwidth per worker, GB/s.
    #[arg(long, default_value_t = Bandwidths::default().object / 1e9)]
    object_gbps: f64,
    /// Network bandwidth between hosts, GB/s (caps reads with --remote-fabric).
    #[arg(long, default_value_t = Bandwidths::default().network / 1e9)]
    network_gbps: f64,
    /// Put the fabric nodes on other hosts: every read is capped at the network bandwidth.
    #[arg(long)]
    remote_fabric: bool,
    /// Which fabric nodes a worker reads: `any` (one cluster; other hosts'
    /// nodes over the network) or `colocated` (independent single nodes:
    /// only the one on its host).
    #[arg(long, value_enum, default_value_t = ReachArg::Any)]
    reach: ReachArg,
    /// The router's `[cost] loads`: which cached blocks it assumes workers
    /// load (the simulated ones load every block they can reach).
    #[arg(long, value_enum, default_value_t = LoadsArg::All)]
    loads: LoadsArg,
    /// The router's `[cost] load-overlaps-queue`: price a candidate's load
    /// time and queued prefill as overlapping (the simulated workers load
    /// beside the GPU; the router's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    load_overlaps_queue: bool,
    /// Decode time per output token, ms.
    #[arg(long, default_value_t = 20.0)]
    decode_ms_per_token: f64,
    /// Decode and prefill share each worker's GPU: decoding sequences
    /// make no progress while a prefill batch runs on their worker
    /// (prefill first, as engines without chunked prefill schedule), so a
    /// worker's prefills lengthen its decodes' end-to-end latency. Off:
    /// decode runs beside prefill (the issue's model).
    #[arg(long)]
    decode_stalls: bool,
    /// Uncached tokens per prefill batch (a longer request runs alone).
    #[arg(long, default_value_t = 8192)]
    max_batch_tokens: u64,
    /// Prefill throughput the router converts load time with [default: the
    /// prefill model's peak, ~48.9k tokens/s].
    #[arg(long)]
    prefill_tokens_per_s: Option<f64>,
    /// Multiply arrival timestamps by this instead of calibrating it.
    #[arg(long)]
    time_scale: Option<f64>,
    /// Round-robin prefill utilization the calibration aims at.
    #[arg(long, default_value_t = 0.8)]
    target_utilization: f64,
    /// Seed for random routing and the router's tie breaks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per policy per line instead of the table.
    #[arg(long)]
    json: bool,
    /// PNG of the TTFT CDFs.
    #[arg(long, default_value = "replay-ttft.png")]
    plot: PathBuf,
    /// Write no plot.
    #[arg(long)]
    no_plot: bool,
    /// TrueType font for the plot's text (without it the plot has no labels).
    #[arg(long, default_value = plot::DEFAULT_FONT)]
    font: PathBuf,
}

impl ReplayOpts {
    /// Options for `trace` with every default.
    pub(crate) fn for_trace(trace: &Path) -> ReplayOpts {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            o: ReplayOpts,
        }
        let arg = trace.as_os_str().to_os_string();
        P::parse_from([std::ffi::OsString::from("replay"), "--trace".into(), arg]).o
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.workers == 0 || self.workers > 4096 {
            bail!("--workers must be 1..=4096");
        }
        if self.workers_per_host == 0 || self.workers_per_host > self.workers {
            bail!("--workers-per-host must be 1..=--workers ({})", self.workers);
        }
        if self.block_tokens == 0 {
            bail!("--block-tokens must be above zero");
        }
        if self.kv_bytes_per_token.0 == 0 {
            bail!("--kv-bytes-per-token must be above zero");
        }
        if self.hbm_tokens < self.block_tokens {
            bail!(
                "--hbm-tokens must hold at least one block ({} tokens)",
                self.block_tokens
            );
        }
        if self.max_batch_tokens == 0 {
            bail!("--max-batch-tokens must be above zero");
        }
        if self.limit == Some(0) {
            bail!("--limit must be above zero");
        }
        for (name, v) in [
            ("--host-gbps", self.host_gbps),
            ("--disk-gbps", self.disk_gbps),
            ("--object-gbps", self.object_gbps),
            ("--network-gbps", self.network_gbps),
            ("--time-scale", self.time_scale.unwrap_or(1.0)),
            ("--prefill-tokens-per-s", self.prefill_tokens_per_s.unwrap_or(1.0)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number, got {v}");
            }
        }
        if !(self.decode_ms_per_token.is_finite() && self.decode_ms_per_token >= 0.0) {
            bail!("--decode-ms-per-token must be a non-negative number");
        }
        if !(self.target_utilization > 0.0 && self.target_utilization < 1.0) {
            bail!("--target-utilization must be in (0, 1)");
        }
        Ok(())
    }

    /// Each fabric node's host-memory and NVMe capacities.
    fn node_capacities(&self) -> (ByteSize, ByteSize) {
        let per_host = self.workers_per_host as u64;
        (
            self.host_capacity.unwrap_or(ByteSize(HOST_BYTES_PER_WORKER * per_host)),
            self.disk_capacity.unwrap_or(ByteSize(DISK_BYTES_PER_WORKER * per_host)),
        )
    }

    fn config(&self) -> anyhow::Result<SimConfig> {
        let prefill = PrefillModel::default();
        let block_bytes = self.block_tokens * self.kv_bytes_per_token.0;
        let blocks = |b: ByteSize| b.0 / block_bytes;
        let bandwidth = Bandwidths {
            host: self.host_gbps * 1e9,
            disk: self.disk_gbps * 1e9,
            object: self.object_gbps * 1e9,
            network: self.network_gbps * 1e9,
            ..Bandwidths::default()
        };
        let cost = CostSettings {
            block_tokens: self.block_tokens as usize,
            kv_bytes_per_token: self.kv_bytes_per_token.0,
            prefill_tokens_per_s: self.prefill_tokens_per_s.unwrap_or_else(|| prefill.peak_tokens_per_s()),
            bandwidth,
            loads: match self.loads {
                LoadsArg::Cheaper => Loads::Cheaper,
                LoadsArg::All => Loads::All,
            },
            load_overlaps_queue: self.load_overlaps_queue,
            ..CostSettings::default()
        };
        cost.validate()
            .map_err(anyhow::Error::msg)
            .context("router cost settings")?;
        let (host, disk) = self.node_capacities();
        Ok(SimConfig {
            workers: self.workers,
            workers_per_host: self.workers_per_host,
            block_tokens: self.block_tokens,
            kv_bytes_per_token: self.kv_bytes_per_token.0,
            hbm_blocks: (self.hbm_tokens / self.block_tokens) as usize,
            fabric_blocks: [Some(blocks(host)), Some(blocks(disk)), self.object_capacity.map(blocks)],
            bandwidth,
            colocated: !self.remote_fabric,
            reach: match self.reach {
                ReachArg::Any => Reach::Any,
                ReachArg::Colocated => Reach::Colocated,
            },
            decode_ms_per_token: self.decode_ms_per_token,
            decode_stalls: self.decode_stalls,
            max_batch_tokens: self.max_batch_tokens,
            prefill,
            cost,
        })
    }
}

/// Every policy's result and what they are compared with.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// One per policy, in [`Policy::ALL`] order.
    pub(crate) runs: Vec<RunResult>,
    /// Prompt tokens of the trace.
    pub(crate) input_tokens: u64,
    /// Infinite-cache prefill tokens.
    pub(crate) bound_prefill_tokens: u64,
    /// The time scale used, and whether it was calibrated (round-robin runs it took).
    pub(crate) time_scale: f64,
    pub(crate) calibration_runs: Option<usize>,
}

/// Runs the replay: prints the table (or JSON) to stdout, progress and the
/// time scale to stderr, and writes the plot.
pub(crate) fn run(o: ReplayOpts) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    o.validate()?;
    let cfg = o.config()?;
    let trace = Trace::load(&o.trace, o.block_tokens, o.limit)?;
    let block_bytes = (o.block_tokens * o.kv_bytes_per_token.0) as f64;
    let distinct = trace.distinct_blocks();
    let (host, disk) = o.node_capacities();
    let fabric_bytes = (host.0 as f64 + disk.0 as f64) * cfg.hosts() as f64;
    eprintln!(
        "# replay {}: {} requests over {:.1} min, {} prompt tokens; working set {} blocks = {:.2} TB \
         (host+disk {:.2} TB over {} fabric nodes: {}); {} workers ({} per host) x {} HBM tokens",
        o.trace.display(),
        trace.requests.len(),
        trace.duration_ms() / 60e3,
        trace.input_tokens(),
        distinct,
        distinct as f64 * block_bytes / 1e12,
        fabric_bytes / 1e12,
        cfg.hosts(),
        if fabric_bytes >= distinct as f64 * block_bytes {
            "holds it"
        } else {
            "smaller"
        },
        o.workers,
        o.workers_per_host,
        o.hbm_tokens,
    );
    if trace.length_mismatches > 0 {
        eprintln!(
            "# note: {} lines have len(hash_ids) != ceil(input_length / {}); replayed with the full blocks they name",
            trace.length_mismatches, o.block_tokens
        );
    }
    let out = replay(&trace, &cfg, o.time_scale, o.target_utilization, o.seed, true)?;
    let scale_line = report::scale_line(&out);
    eprintln!("# {scale_line}");
    if o.json {
        for r in &out.runs {
            println!("{}", report::json(r, &out));
        }
    } else {
        println!("# {scale_line}");
        print!("{}", report::table(&out));
    }
    if !o.no_plot {
        match plot::ttft_cdf(&o.plot, &out, &o.font) {
            Ok(note) => eprintln!("# plot: {}{note}", o.plot.display()),
            Err(e) => eprintln!("# plot not written: {e:#}"),
        }
    }
    eprintln!("# replay done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Calibrates the time scale (unless given) and replays every policy at it.
pub(crate) fn replay(
    trace: &Trace,
    cfg: &SimConfig,
    time_scale: Option<f64>,
    target: f64,
    seed: u64,
    verbose: bool,
) -> anyhow::Result<Outcome> {
    let (scale, calibration_runs) = match time_scale {
        Some(s) => (s, None),
        None => {
            let (s, n) = calibrate(trace, cfg, target, seed, verbose);
            (s, Some(n))
        }
    };
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = Policy::ALL
            .iter()
            .map(|&p| s.spawn(move || sim::run(trace, cfg, p, scale, seed)))
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Result<Vec<_>, _>>()
    })
    .map_err(|_| anyhow::anyhow!("a replay thread panicked"))?;
    Ok(Outcome {
        runs,
        input_tokens: trace.input_tokens(),
        bound_prefill_tokens: trace.bound_prefill_tokens(cfg.block_tokens),
        time_scale: scale,
        calibration_runs,
    })
}

/// The time scale at which round-robin keeps prefill `target` busy, and
/// the round-robin runs it took (see the module doc).
fn calibrate(trace: &Trace, cfg: &SimConfig, target: f64, seed: u64, verbose: bool) -> (f64, usize) {
    if trace.duration_ms() <= 0.0 {
        return (1.0, 0);
    }
    let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
    let mut s = 1.0;
    let mut best = (f64::INFINITY, 1.0);
    for n in 1..=16 {
        let u = sim::run(trace, cfg, Policy::RoundRobin, s, seed).utilization();
        if verbose {
            eprintln!(
                "#   calibration run {n}: time scale {s:.5} -> round-robin prefill {:.1}% busy",
                u * 100.0
            );
        }
        if (u - target).abs() < best.0 {
            best = ((u - target).abs(), s);
        }
        if (u - target).abs() <= 0.005 || u <= 0.0 {
            return (s, n);
        }
        if u > target {
            lo = lo.max(s);
        } else {
            hi = hi.min(s);
        }
        // The load can jump across the target (where queues start to cost
        // round-robin its hits): once the bracket is 1% wide, take the
        // closer of the scales tried.
        if hi / lo < 1.01 {
            return (best.1, n);
        }
        s = if lo > 0.0 && hi.is_finite() {
            (lo * hi).sqrt()
        } else {
            // No bracket yet: the load is nearly inversely proportional to
            // the scale; overshoot a little so the next run brackets.
            let guess = s * u / target;
            if u > target {
                guess.max(s * 1.05) * 1.05
            } else {
                guess.min(s / 1.05) / 1.05
            }
        };
    }
    (best.1, 16)
}

/// `--smoke`: a short replay of the committed sample (skipped with a note
/// when the sample is absent, e.g. in a packaged build).
pub(crate) fn smoke() -> anyhow::Result<()> {
    let path = Path::new(SAMPLE);
    if !path.exists() {
        eprintln!("# replay smoke skipped: {} not found", path.display());
        return Ok(());
    }
    let mut o = ReplayOpts::for_trace(path);
    o.limit = Some(300);
    o.plot = std::env::temp_dir().join("kvfabric-replay-smoke.png");
    run(o)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first `n` requests of the committed sample.
    pub(crate) fn sample(n: usize) -> Trace {
        Trace::load(Path::new(SAMPLE), 512, Some(n)).unwrap()
    }

    #[test]
    fn defaults_parse_and_validate() {
        let o = ReplayOpts::for_trace(Path::new(SAMPLE));
        o.validate().unwrap();
        let c = o.config().unwrap();
        assert_eq!(c.hbm_blocks, 585);
        assert_eq!(c.fabric_blocks[0], Some((1u64 << 40) / (64 << 20)));
        assert_eq!(c.fabric_blocks[2], None);
        let mut bad = o.clone();
        bad.workers = 0;
        assert!(bad.validate().unwrap_err().to_string().contains("--workers"));
        let mut bad = o;
        bad.time_scale = Some(-1.0);
        assert!(bad.validate().unwrap_err().to_string().contains("--time-scale"));
    }

    #[test]
    fn calibration_hits_its_target_and_tier_aware_beats_round_robin() {
        let t = sample(600);
        let o = ReplayOpts::for_trace(Path::new(SAMPLE));
        let cfg = o.config().unwrap();
        let out = replay(&t, &cfg, None, 0.8, 1, false).unwrap();
        let rr = &out.runs[0];
        assert_eq!(rr.policy, Policy::RoundRobin);
        assert!((rr.utilization() - 0.8).abs() < 0.03, "{}", rr.utilization());
        let tier = out.runs.iter().find(|r| r.policy == Policy::TierAware).unwrap();
        assert!(tier.prefill_tokens() <= rr.prefill_tokens());
        for r in &out.runs {
            assert!(r.prefill_tokens() >= out.bound_prefill_tokens, "{:?}", r.policy);
            assert_eq!(r.ttft_ms.len(), 600);
        }
        // A fixed scale is used as given.
        let fixed = replay(&t, &cfg, Some(0.5), 0.8, 1, false).unwrap();
        assert_eq!(fixed.time_scale, 0.5);
        assert!(fixed.calibration_runs.is_none());
    }
}
