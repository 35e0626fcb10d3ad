//! The storage limit: `fio` with `ioengine=io_uring`, `direct=1`, one job,
//! the disk tier's block size and queue depth, sequential write then read of
//! a small file in the benchmark directory (so on the same file system as
//! the disk tier's data files). Bandwidth and completion-latency percentiles
//! come from fio's JSON output.

use anyhow::{Context, anyhow, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Whether fio writes or reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rw {
    /// `rw=write`.
    Write,
    /// `rw=read`.
    Read,
}

impl Rw {
    /// fio's name for it (also the key of its JSON section).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Rw::Write => "write",
            Rw::Read => "read",
        }
    }
}

/// One fio job to run.
#[derive(Clone, Debug)]
pub(crate) struct Job<'a> {
    /// The fio binary.
    pub(crate) fio: &'a str,
    /// The file to write then read (created by fio).
    pub(crate) file: &'a Path,
    /// File size in bytes.
    pub(crate) file_size: u64,
    /// Block size in bytes.
    pub(crate) block_size: u64,
    /// I/Os in flight.
    pub(crate) iodepth: u32,
    /// How long each direction runs (looping over the file).
    pub(crate) runtime: Duration,
}

/// What fio measured.
#[derive(Clone, Debug)]
pub(crate) struct FioResult {
    /// Bytes per second.
    pub(crate) bytes_per_sec: f64,
    /// I/Os completed.
    pub(crate) ios: u64,
    /// Wall time of the job.
    pub(crate) elapsed: Duration,
    /// Median completion latency, ns.
    pub(crate) p50_ns: Option<f64>,
    /// 99th percentile completion latency, ns.
    pub(crate) p99_ns: Option<f64>,
}

/// Why there is no fio number.
#[derive(Debug)]
pub(crate) enum FioError {
    /// The binary is not installed.
    NotFound,
    /// It ran and failed (io_uring refused, O_DIRECT unsupported, ...).
    Failed(anyhow::Error),
}

/// The version fio reports, or [`FioError::NotFound`].
pub(crate) fn version(fio: &str) -> Result<String, FioError> {
    match Command::new(fio).arg("--version").output() {
        Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FioError::NotFound),
        Err(e) => Err(FioError::Failed(anyhow!("running {fio} --version: {e}"))),
    }
}

/// Runs one direction of `job`.
pub(crate) fn run(job: &Job<'_>, rw: Rw) -> Result<FioResult, FioError> {
    let runtime_ms = job.runtime.as_millis().max(1);
    let mut cmd = Command::new(job.fio);
    cmd.arg("--name=kvfabric-limit")
        .arg(format!("--filename={}", job.file.display()))
        .arg(format!("--size={}", job.file_size.max(job.block_size)))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={}", rw.as_str()))
        .arg("--numjobs=1")
        .arg("--time_based=1")
        .arg(format!("--runtime={runtime_ms}ms"))
        .arg("--output-format=json");
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FioError::NotFound),
        Err(e) => return Err(FioError::Failed(anyhow!("running {}: {e}", job.fio))),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let msg = stderr.lines().chain(stdout.lines()).find(|l| !l.trim().is_empty());
        return Err(FioError::Failed(anyhow!(
            "fio exited with {}: {}",
            out.status,
            msg.unwrap_or("no output")
        )));
    }
    parse(&stdout, rw).map_err(FioError::Failed)
}

/// Reads one direction's numbers from fio's JSON (which may follow
/// warning lines).
fn parse(stdout: &str, rw: Rw) -> anyhow::Result<FioResult> {
    let start = stdout.find('{').context("no JSON in fio's output")?;
    let v: serde_json::Value = serde_json::from_str(&stdout[start..]).context("parsing fio's JSON output")?;
    let job = v["jobs"].get(0).context("fio's JSON has no job")?;
    if let Some(e) = job["error"].as_i64().filter(|&e| e != 0) {
        bail!("fio job error {e}");
    }
    let s = &job[rw.as_str()];
    let bytes_per_sec = s["bw_bytes"]
        .as_f64()
        .with_context(|| format!("fio's JSON has no {}.bw_bytes", rw.as_str()))?;
    let pct = |p: &str| s["clat_ns"]["percentile"][p].as_f64();
    Ok(FioResult {
        bytes_per_sec,
        ios: s["total_ios"].as_u64().unwrap_or(0),
        elapsed: Duration::from_millis(s["runtime"].as_u64().unwrap_or(0)),
        p50_ns: pct("50.000000"),
        p99_ns: pct("99.000000"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_warnings() {
        let out = r#"fio: some warning
{"jobs":[{"error":0,"write":{"bw_bytes":1000,"io_bytes":5000,"total_ios":5,"runtime":5,
"clat_ns":{"percentile":{"50.000000":100,"99.000000":900}}}}]}"#;
        let r = parse(out, Rw::Write).unwrap();
        assert_eq!(r.bytes_per_sec, 1000.0);
        assert_eq!(r.ios, 5);
        assert_eq!((r.p50_ns, r.p99_ns), (Some(100.0), Some(900.0)));
        assert!(parse(out, Rw::Read).is_err());
        assert!(parse("nothing", Rw::Read).is_err());
    }
}
