//! Mooncake Store as a peer. Its transfer engine binds 0.0.0.0 whatever it
//! is told, so everything Mooncake runs inside a private network namespace
//! with only loopback: `scripts/mooncake-netns.sh` (`unshare --net`, `ip
//! link set lo up`) starts `mooncake_master`, then runs
//! `scripts/mooncake_bench.py` with the venv's Python for the co-located
//! path (the benchmark process holds the memory) and, with a separate
//! `mooncake_client` holding the memory, for the remote path. The script
//! prints JSON lines in the peers schema; they are parsed and merged here,
//! and every expected cell that did not come back is reported unavailable
//! with the reason the script or the wrapper gave.

use super::row::{self, Path as PeerPath, PeerRow, System};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The master's object lease (ms): a get leases its objects this long, and
/// they can be removed only after it (the default, 10 s, would idle each cell
/// for 10 s; much shorter and a slow batch's lease ends mid-transfer, which
/// Mooncake reports as LEASE_EXPIRED).
const LEASE_MS: u64 = 2000;

/// One Mooncake run: what to measure and where things are.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    /// `scripts/` of the benchmark crate.
    pub(crate) scripts: &'a Path,
    /// The venv `install-peers.sh mooncake` made.
    pub(crate) venv: &'a Path,
    /// Where the servers' logs go.
    pub(crate) log_dir: &'a Path,
    /// `remote`, `colocated`, or both.
    pub(crate) paths: &'a [PeerPath],
    /// Value sizes, bytes.
    pub(crate) sizes: &'a [u64],
    /// Client counts.
    pub(crate) clients: &'a [usize],
    /// Bytes per cell, or `None` with `per_client`.
    pub(crate) total_bytes: Option<u64>,
    /// Values per client (with `--ops`).
    pub(crate) per_client: Option<u64>,
    /// Values per batch call.
    pub(crate) batch: usize,
    /// The whole run is killed after this long.
    pub(crate) timeout: Duration,
}

impl Run<'_> {
    /// Memory the store holding the data contributes: room for the largest
    /// cell twice over (gets lease objects briefly, and eviction starts at
    /// 90% full), plus slack.
    fn segment_bytes(&self) -> u64 {
        let largest = self
            .sizes
            .iter()
            .flat_map(|&s| self.clients.iter().map(move |&c| (s, c)))
            .map(|(s, c)| match (self.per_client, self.total_bytes) {
                (Some(n), _) => n * s * c as u64,
                (None, Some(t)) => super::workload::Cell::per_client_for(t, s, c) * s * c as u64,
                (None, None) => 0,
            })
            .max()
            .unwrap_or(0);
        (2 * largest + (256 << 20)).next_multiple_of(1 << 20)
    }

    fn command(&self) -> Command {
        let join = |v: Vec<String>| v.join(",");
        let mut cmd = Command::new("bash");
        cmd.arg(self.scripts.join("mooncake-netns.sh"))
            .arg(self.venv)
            .arg(self.log_dir)
            .arg(join(self.paths.iter().map(|p| p.as_str().to_string()).collect()))
            .arg(self.segment_bytes().to_string())
            .arg(LEASE_MS.to_string())
            .arg("--")
            .arg("--sizes")
            .arg(join(self.sizes.iter().map(u64::to_string).collect()))
            .arg("--clients")
            .arg(join(self.clients.iter().map(usize::to_string).collect()))
            .arg("--batch")
            .arg(self.batch.to_string());
        match (self.per_client, self.total_bytes) {
            (Some(n), _) => cmd.arg("--per-client").arg(n.to_string()).arg("--total-bytes").arg("0"),
            (None, t) => cmd.arg("--total-bytes").arg(t.unwrap_or(0).to_string()),
        };
        cmd
    }

    /// Runs the wrapper, parses its JSON lines, and fills in every cell it
    /// did not report.
    pub(crate) fn rows(&self) -> Vec<PeerRow> {
        let (stdout, failure) = match run_with_timeout(self.command(), self.timeout) {
            Ok((out, None)) => (out, None),
            Ok((out, Some(why))) => (out, Some(why)),
            Err(e) => (String::new(), Some(e)),
        };
        let (mut rows, errors) = row::parse_lines(&stdout);
        for e in &errors {
            eprintln!("# mooncake: unparsable line: {e}");
        }
        rows.retain(|r| r.system == System::Mooncake && self.paths.contains(&r.path));
        let reason = failure.unwrap_or_else(|| format!("no result (see {})", self.log_dir.display()));
        row::fill_missing(
            &mut rows,
            System::Mooncake,
            self.paths,
            self.sizes,
            self.clients,
            &reason,
        );
        rows
    }
}

/// Runs `cmd` in its own process group, killing the group after `timeout`.
/// Returns stdout and, when it failed, why (the last line of stderr).
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<(String, Option<String>), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("starting mooncake-netns.sh: {e}"))?;
    let pgid = child.id() as i32;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill(2) on the process group we created; no memory is touched.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for mooncake-netns.sh: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let why = match status {
        None => Some(format!("timed out after {} s", timeout.as_secs())),
        Some(s) if !s.success() => Some(if last.is_empty() {
            format!("mooncake-netns.sh exited with {s}")
        } else {
            last.to_string()
        }),
        Some(_) => None,
    };
    Ok((stdout, why))
}

/// The venv `install-peers.sh` makes under `peers_dir`.
pub(crate) fn venv(peers_dir: &Path) -> PathBuf {
    peers_dir.join("mooncake-venv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_failing_wrapper_per_cell() {
        let r = run_with_timeout(
            {
                let mut c = Command::new("bash");
                c.arg("-c").arg(
                    "echo '{\"system\":\"mooncake\",\"path\":\"remote\",\"op\":\"put\",\"value_bytes\":1,\"clients\":1,\"gbps\":2.0}'; \
                     echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1",
                );
                c
            },
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(r.0.contains("\"gbps\":2.0"));
        assert_eq!(r.1.as_deref(), Some("unshare: unshare failed: Operation not permitted"));

        let t = run_with_timeout(
            {
                let mut c = Command::new("bash");
                c.arg("-c").arg("sleep 30");
                c
            },
            Duration::from_millis(300),
        )
        .unwrap();
        assert_eq!(t.1.as_deref(), Some("timed out after 0 s"));
    }

    #[test]
    fn segment_holds_the_largest_cell_twice() {
        let run = Run {
            scripts: Path::new("."),
            venv: Path::new("."),
            log_dir: Path::new("."),
            paths: &[PeerPath::Remote],
            sizes: &[1 << 20, 4 << 20],
            clients: &[1, 16],
            total_bytes: Some(1 << 30),
            per_client: None,
            batch: 4,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(run.segment_bytes(), (2 << 30) + (256 << 20));
    }
}
