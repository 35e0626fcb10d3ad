//! The side-by-side table: one [`PeerRow`] per (system, path, op, value
//! size, clients), each linked to the kvfabric row it is judged against, the
//! targets the table is read with, the JSON-lines form (printed with
//! `--json`, and spoken by `scripts/mooncake_bench.py`), and the Markdown
//! table.

use kvfabric::server::ByteSize;
use serde_json::{Value, json};
use std::fmt;

/// The systems measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub(crate) enum System {
    /// kvfabric: zero-copy local client, gRPC, disk tier.
    Kvfabric,
    /// memcpy, the limit of the local path.
    Memcpy,
    /// fio io_uring O_DIRECT, the limit of the disk tier.
    Fio,
    /// Mooncake Store (CPU build), remote and co-located.
    Mooncake,
    /// Redis 7 over loopback TCP.
    Redis,
}

impl System {
    /// The name used in the table, the JSON and `--systems`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            System::Kvfabric => "kvfabric",
            System::Memcpy => "memcpy",
            System::Fio => "fio",
            System::Mooncake => "mooncake",
            System::Redis => "redis",
        }
    }

    fn parse(s: &str) -> Option<System> {
        [
            System::Kvfabric,
            System::Memcpy,
            System::Fio,
            System::Mooncake,
            System::Redis,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// How a system was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Path {
    /// In the client's own address space (kvfabric's zero-copy client, memcpy).
    Local,
    /// kvfabric over gRPC on loopback.
    Grpc,
    /// The disk tier (kvfabric's, or fio on the same file system).
    Disk,
    /// A peer reached over loopback TCP (Mooncake with a separate
    /// `mooncake_client` holding the memory, Redis).
    Remote,
    /// Mooncake with the benchmark process holding the memory.
    Colocated,
}

impl Path {
    /// The name used in the table and the JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::Grpc => "grpc",
            Path::Disk => "disk",
            Path::Remote => "remote",
            Path::Colocated => "colocated",
        }
    }

    fn parse(s: &str) -> Option<Path> {
        [Path::Local, Path::Grpc, Path::Disk, Path::Remote, Path::Colocated]
            .into_iter()
            .find(|x| x.as_str() == s)
    }

    /// Where the path sits in the table: the local group, the remote group,
    /// the disk group.
    fn group(self) -> u8 {
        match self {
            Path::Local | Path::Colocated => 0,
            Path::Grpc | Path::Remote => 1,
            Path::Disk => 2,
        }
    }
}

/// Put or get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Op {
    /// Values written (memcpy: a copy; fio: `rw=write`).
    Put,
    /// Values read back (memcpy: the same copy; fio: `rw=read`).
    Get,
}

impl Op {
    /// The name used in the table and the JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        match s {
            "put" => Some(Op::Put),
            "get" => Some(Op::Get),
            _ => None,
        }
    }
}

/// One measured (or unavailable) cell of one system.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PeerRow {
    /// Which system.
    pub(crate) system: System,
    /// How it was reached.
    pub(crate) path: Path,
    /// Put or get.
    pub(crate) op: Op,
    /// Value size, bytes.
    pub(crate) value_bytes: u64,
    /// Concurrent clients (memcpy: threads; fio: the cell it is the limit
    /// for, at an iodepth of clients x batch).
    pub(crate) clients: usize,
    /// Aggregate throughput, 10^9 bytes per second.
    pub(crate) gbps: Option<f64>,
    /// Median per-op latency, microseconds.
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile per-op latency, microseconds.
    pub(crate) p99_us: Option<f64>,
    /// Why there are no numbers.
    pub(crate) unavailable: Option<String>,
    /// The GB/s of the kvfabric row this row is compared with, once linked.
    pub(crate) kvfabric_gbps: Option<f64>,
}

impl PeerRow {
    /// A row for one cell, no numbers yet.
    pub(crate) fn new(system: System, path: Path, op: Op, value_bytes: u64, clients: usize) -> PeerRow {
        PeerRow {
            system,
            path,
            op,
            value_bytes,
            clients,
            gbps: None,
            p50_us: None,
            p99_us: None,
            unavailable: None,
            kvfabric_gbps: None,
        }
    }

    /// With throughput (GB/s) and latency percentiles (us).
    pub(crate) fn measured(mut self, gbps: f64, p50_us: Option<f64>, p99_us: Option<f64>) -> PeerRow {
        self.gbps = Some(gbps);
        self.p50_us = p50_us;
        self.p99_us = p99_us;
        self
    }

    /// Saying why this cell has no numbers.
    pub(crate) fn unavailable(mut self, reason: impl Into<String>) -> PeerRow {
        self.unavailable = Some(reason.into());
        self
    }

    fn cell(&self) -> (u64, usize, Op) {
        (self.value_bytes, self.clients, self.op)
    }

    /// This row's GB/s over its kvfabric row's (the ratio to kvfabric).
    pub(crate) fn vs_kvfabric(&self) -> Option<f64> {
        match (self.gbps, self.kvfabric_gbps) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    /// kvfabric's GB/s over this row's: for a limit, the fraction of it
    /// kvfabric reaches; for a peer, how many times faster kvfabric is.
    pub(crate) fn kvfabric_over_this(&self) -> Option<f64> {
        match (self.kvfabric_gbps, self.gbps) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    /// The target this row is judged by, and whether it is met.
    pub(crate) fn verdict(&self) -> Option<(Target, Option<bool>)> {
        let t = target(self.system, self.path, self.value_bytes)?;
        // Ratios are printed to two decimals; judge them the same way.
        Some((t, self.kvfabric_over_this().map(|x| x >= t.min - 5e-3)))
    }

    /// The row as one JSON object (the schema `--json` prints and
    /// `mooncake_bench.py` writes, plus the linked ratios).
    pub(crate) fn to_json(&self) -> Value {
        let mut v = json!({
            "system": self.system.as_str(),
            "path": self.path.as_str(),
            "op": self.op.as_str(),
            "value_bytes": self.value_bytes,
            "clients": self.clients,
            "gbps": self.gbps,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "ratio_to_kvfabric": self.vs_kvfabric(),
            "kvfabric_over_this": self.kvfabric_over_this(),
        });
        if let Some((t, met)) = self.verdict() {
            v["target"] = json!(t.to_string());
            v["target_met"] = json!(met);
        }
        if let Some(u) = &self.unavailable {
            v["unavailable"] = json!(u);
        }
        v
    }

    /// [`PeerRow::to_json`] as one line, keys in schema order (`system`,
    /// `path`, `op`, `value_bytes`, `clients`, `gbps`, `p50_us`, `p99_us`,
    /// then the ratios, the target and any reason).
    pub(crate) fn to_json_line(&self) -> String {
        const ORDER: [&str; 13] = [
            "system",
            "path",
            "op",
            "value_bytes",
            "clients",
            "gbps",
            "p50_us",
            "p99_us",
            "ratio_to_kvfabric",
            "kvfabric_over_this",
            "target",
            "target_met",
            "unavailable",
        ];
        let v = self.to_json();
        let fields: Vec<String> = ORDER
            .iter()
            .filter_map(|&k| v.get(k).map(|x| format!("{}:{x}", Value::from(k))))
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    /// Reads one JSON line in the same schema (`gbps`, `p50_us`, `p99_us`
    /// may be null; `unavailable` says why).
    pub(crate) fn from_json(line: &str) -> Result<PeerRow, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let s = |k: &str| v[k].as_str().ok_or_else(|| format!("no string \"{k}\""));
        let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no integer \"{k}\""));
        let f = |k: &str| v[k].as_f64();
        let system = System::parse(s("system")?).ok_or("unknown system")?;
        let path = Path::parse(s("path")?).ok_or("unknown path")?;
        let op = Op::parse(s("op")?).ok_or("op is neither put nor get")?;
        let clients = usize::try_from(n("clients")?).map_err(|e| e.to_string())?;
        let mut row = PeerRow::new(system, path, op, n("value_bytes")?, clients);
        row.unavailable = v["unavailable"].as_str().map(str::to_string);
        row.gbps = f("gbps");
        row.p50_us = f("p50_us");
        row.p99_us = f("p99_us");
        if row.gbps.is_none() && row.unavailable.is_none() {
            row.unavailable = Some("no throughput reported".into());
        }
        Ok(row)
    }
}

/// What kvfabric must reach against a row: `kvfabric / this >= min`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Target {
    /// The least ratio that meets it.
    pub(crate) min: f64,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ">={}x", self.min)
    }
}

/// The targets the table is judged against (issue text): gRPC >= 2x
/// Mooncake remote and >= 2x Redis for 1 and 4 MiB; disk >= 0.9x fio; local
/// zero-copy >= 0.7x memcpy and >= 1.5x co-located Mooncake.
pub(crate) fn target(system: System, path: Path, value_bytes: u64) -> Option<Target> {
    let min = match (system, path) {
        (System::Mooncake, Path::Remote) | (System::Redis, Path::Remote)
            if value_bytes == 1 << 20 || value_bytes == 4 << 20 =>
        {
            2.0
        }
        (System::Fio, Path::Disk) => 0.9,
        (System::Memcpy, Path::Local) => 0.7,
        (System::Mooncake, Path::Colocated) => 1.5,
        _ => return None,
    };
    Some(Target { min })
}

/// The kvfabric path a row of another system is compared with.
pub(crate) fn kvfabric_path(system: System, path: Path) -> Option<Path> {
    match (system, path) {
        (System::Kvfabric, _) => None,
        (System::Memcpy, _) | (System::Mooncake, Path::Colocated) => Some(Path::Local),
        (System::Fio, _) => Some(Path::Disk),
        (System::Mooncake, _) | (System::Redis, _) => Some(Path::Grpc),
    }
}

/// Reads the JSON lines in `output` (other lines are skipped); returns the
/// rows and a message per line that looked like JSON but did not parse.
pub(crate) fn parse_lines(output: &str) -> (Vec<PeerRow>, Vec<String>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        match PeerRow::from_json(line) {
            Ok(r) => rows.push(r),
            Err(e) => errors.push(format!("{e}: {line}")),
        }
    }
    (rows, errors)
}

/// Adds an unavailable row, saying `reason`, for every expected cell
/// (`path`, op, size, clients) of `system` that `rows` lacks.
pub(crate) fn fill_missing(
    rows: &mut Vec<PeerRow>,
    system: System,
    paths: &[Path],
    sizes: &[u64],
    clients: &[usize],
    reason: &str,
) {
    for &path in paths {
        for &size in sizes {
            for &c in clients {
                for op in [Op::Put, Op::Get] {
                    let have = rows.iter().any(|r| {
                        r.system == system && r.path == path && r.op == op && r.value_bytes == size && r.clients == c
                    });
                    if !have {
                        rows.push(PeerRow::new(system, path, op, size, c).unavailable(reason));
                    }
                }
            }
        }
    }
}

/// Sorts rows (by size, clients, op, then local / remote / disk groups) and
/// sets each non-kvfabric row's ratio to its kvfabric row.
pub(crate) fn link(rows: &mut [PeerRow]) {
    rows.sort_by_key(|r| (r.value_bytes, r.clients, r.op, r.path.group(), r.system, r.path));
    let kvf: Vec<PeerRow> = rows.iter().filter(|r| r.system == System::Kvfabric).cloned().collect();
    for r in rows.iter_mut() {
        r.kvfabric_gbps = kvfabric_path(r.system, r.path)
            .and_then(|p| kvf.iter().find(|k| k.path == p && k.cell() == r.cell()))
            .and_then(|k| k.gbps);
    }
}

/// The rows as a Markdown table. A system path unavailable in every cell
/// for the same reason is one row (`all` sizes and clients).
pub(crate) fn table(rows: &[PeerRow]) -> String {
    let header = [
        "system",
        "path",
        "op",
        "size",
        "clients",
        "GB/s",
        "p50 us",
        "p99 us",
        "vs kvfabric",
        "kvfabric/this",
        "target",
        "note",
    ];
    let dash = || "-".to_string();
    let num = |x: Option<f64>, digits: usize| x.map(|v| format!("{v:.digits$}")).unwrap_or_else(dash);
    let mut measured: Vec<[String; 12]> = Vec::new();
    let mut collapsed: Vec<[String; 12]> = Vec::new();
    let mut seen: Vec<(System, Path)> = Vec::new();
    for r in rows {
        if let Some(reason) = &r.unavailable {
            let same: Vec<&PeerRow> = rows
                .iter()
                .filter(|x| (x.system, x.path) == (r.system, r.path))
                .collect();
            if same.len() > 1 && same.iter().all(|x| x.unavailable.as_ref() == Some(reason)) {
                if !seen.contains(&(r.system, r.path)) {
                    seen.push((r.system, r.path));
                    let mut cells = [(); 12].map(|_| dash());
                    cells[0] = r.system.as_str().into();
                    cells[1] = r.path.as_str().into();
                    cells[2..5].fill("all".into());
                    cells[5] = "unavailable".into();
                    cells[11] = reason.clone();
                    collapsed.push(cells);
                }
                continue;
            }
        }
        let verdict = r
            .verdict()
            .map(|(t, met)| match met {
                Some(true) => format!("{t} met"),
                Some(false) => format!("{t} MISSED"),
                None => format!("{t} n/a"),
            })
            .unwrap_or_else(dash);
        measured.push([
            r.system.as_str().into(),
            r.path.as_str().into(),
            r.op.as_str().into(),
            ByteSize(r.value_bytes).to_string(),
            r.clients.to_string(),
            if r.unavailable.is_some() {
                "unavailable".into()
            } else {
                num(r.gbps, 2)
            },
            num(r.p50_us, 0),
            num(r.p99_us, 0),
            num(r.vs_kvfabric(), 2),
            num(r.kvfabric_over_this(), 2),
            verdict,
            r.unavailable.clone().unwrap_or_default(),
        ]);
    }
    // Collapsed rows go last, so the measured cells read as one block.
    measured.extend(collapsed);
    let mut header: Vec<String> = header.map(String::from).into();
    let mut body: Vec<Vec<String>> = measured.into_iter().map(Vec::from).collect();
    if body.iter().all(|r| r[11].is_empty()) {
        header.pop();
        body.iter_mut().for_each(|r| {
            r.pop();
        });
    }
    render(&header, &body)
}

/// Pads cells into a Markdown table: the first three columns and a last
/// `note` column left-aligned, the rest right-aligned.
fn render(header: &[String], body: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in body {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let left = |i: usize| i < 3 || header[i] == "note";
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, &w))| {
                if left(i) {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header);
    let rule: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if left(i) {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", rule.join("|")));
    for row in body {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn row(system: System, path: Path, op: Op, size: u64, clients: usize, gbps: f64) -> PeerRow {
        PeerRow::new(system, path, op, size, clients).measured(gbps, Some(10.0), Some(20.0))
    }

    #[test]
    fn json_round_trips_and_reads_the_script_schema() {
        let r = row(System::Redis, Path::Remote, Op::Get, MIB, 4, 1.5);
        let back = PeerRow::from_json(&r.to_json().to_string()).unwrap();
        assert_eq!(back, r);
        let line = r.to_json_line();
        assert!(
            line.starts_with(
                r#"{"system":"redis","path":"remote","op":"get","value_bytes":1048576,"clients":4,"gbps":1.5,"#
            ),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), r.to_json());

        let line = r#"{"system": "mooncake", "path": "colocated", "value_bytes": 4194304, "clients": 16,
            "op": "put", "gbps": 6.5, "p50_us": 2357.7, "p99_us": 4260.5, "ops": 64, "seconds": 0.04}"#;
        let m = PeerRow::from_json(&line.replace('\n', " ")).unwrap();
        assert_eq!((m.system, m.path, m.op), (System::Mooncake, Path::Colocated, Op::Put));
        assert_eq!((m.value_bytes, m.clients, m.gbps), (4 * MIB, 16, Some(6.5)));
        assert_eq!(m.unavailable, None);

        let u = r#"{"system":"mooncake","path":"remote","op":"get","value_bytes":1,"clients":1,"gbps":null,"p50_us":null,"p99_us":null,"unavailable":"setup returned -1"}"#;
        let u = PeerRow::from_json(u).unwrap();
        assert_eq!(u.unavailable.as_deref(), Some("setup returned -1"));
        assert_eq!(u.gbps, None);

        for bad in [
            "{",
            r#"{"system":"etcd","path":"remote","op":"get","value_bytes":1,"clients":1}"#,
            r#"{"system":"redis","path":"remote","op":"scan","value_bytes":1,"clients":1}"#,
            r#"{"system":"redis","path":"remote","op":"get","clients":1}"#,
        ] {
            assert!(PeerRow::from_json(bad).is_err(), "{bad}");
        }
        // A row without numbers or a reason still says something.
        let empty = r#"{"system":"redis","path":"remote","op":"get","value_bytes":1,"clients":1}"#;
        assert!(PeerRow::from_json(empty).unwrap().unavailable.is_some());
    }

    #[test]
    fn parses_lines_among_noise_and_fills_what_is_missing() {
        let out = "WARNING: Logging before InitGoogleLogging()\n\
            {\"system\":\"mooncake\",\"path\":\"remote\",\"op\":\"put\",\"value_bytes\":1048576,\"clients\":1,\"gbps\":1.0}\n\
            {\"system\":\"mooncake\",\"path\":\"remote\",\"op\":\"get\",\"value_bytes\":1048576,\"clients\":1,\"gbps\":1.2}\n\
            {\"broken\n\
            # mooncake remote 1048576 B x1: 1.2 s\n";
        let (mut rows, errors) = parse_lines(out);
        assert_eq!(rows.len(), 2);
        assert_eq!(errors.len(), 1);
        fill_missing(
            &mut rows,
            System::Mooncake,
            &[Path::Remote, Path::Colocated],
            &[MIB],
            &[1, 4],
            "timed out",
        );
        assert_eq!(rows.len(), 8);
        assert_eq!(rows.iter().filter(|r| r.unavailable.is_none()).count(), 2);
        assert!(
            rows.iter()
                .filter(|r| r.unavailable.is_some())
                .all(|r| r.unavailable.as_deref() == Some("timed out"))
        );
    }

    #[test]
    fn links_each_row_to_its_kvfabric_path_and_judges_targets() {
        let mut rows = vec![
            row(System::Mooncake, Path::Remote, Op::Put, MIB, 4, 1.0),
            row(System::Redis, Path::Remote, Op::Put, MIB, 4, 0.25),
            row(System::Kvfabric, Path::Grpc, Op::Put, MIB, 4, 0.5),
            row(System::Kvfabric, Path::Disk, Op::Put, MIB, 4, 1.8),
            row(System::Fio, Path::Disk, Op::Put, MIB, 4, 2.0),
            row(System::Memcpy, Path::Local, Op::Put, MIB, 4, 40.0),
            PeerRow::new(System::Kvfabric, Path::Local, Op::Put, MIB, 4).unavailable("not built"),
            row(System::Mooncake, Path::Colocated, Op::Put, MIB, 4, 8.0),
            // Another cell: must not be linked to the 4-client kvfabric rows.
            row(System::Redis, Path::Remote, Op::Put, MIB, 1, 0.3),
            row(System::Redis, Path::Remote, Op::Get, MIB, 4, 0.3),
        ];
        link(&mut rows);
        let find = |s: System, p: Path, c: usize, op: Op| {
            rows.iter()
                .find(|r| (r.system, r.path, r.clients, r.op) == (s, p, c, op))
                .unwrap()
        };
        let mc = find(System::Mooncake, Path::Remote, 4, Op::Put);
        assert_eq!(mc.vs_kvfabric(), Some(2.0));
        assert_eq!(mc.kvfabric_over_this(), Some(0.5));
        assert_eq!(mc.verdict(), Some((Target { min: 2.0 }, Some(false))));
        let redis = find(System::Redis, Path::Remote, 4, Op::Put);
        assert_eq!(redis.kvfabric_over_this(), Some(2.0));
        assert_eq!(redis.verdict().unwrap().1, Some(true));
        let fio = find(System::Fio, Path::Disk, 4, Op::Put);
        assert!((fio.kvfabric_over_this().unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(fio.verdict().unwrap().1, Some(true));
        // No kvfabric local numbers: no ratio, target not judged.
        let memcpy = find(System::Memcpy, Path::Local, 4, Op::Put);
        assert_eq!(memcpy.vs_kvfabric(), None);
        assert_eq!(memcpy.verdict(), Some((Target { min: 0.7 }, None)));
        assert_eq!(find(System::Redis, Path::Remote, 1, Op::Put).vs_kvfabric(), None);
        assert_eq!(find(System::Redis, Path::Remote, 4, Op::Get).vs_kvfabric(), None);
        // 256 KiB has no remote target.
        assert_eq!(target(System::Redis, Path::Remote, 256 << 10), None);

        // Sorted: clients 1 first; within a cell local group, remote group, disk group.
        assert_eq!(rows[0].clients, 1);
        let cell: Vec<(System, Path)> = rows
            .iter()
            .filter(|r| r.clients == 4 && r.op == Op::Put)
            .map(|r| (r.system, r.path))
            .collect();
        assert_eq!(
            cell,
            [
                (System::Kvfabric, Path::Local),
                (System::Memcpy, Path::Local),
                (System::Mooncake, Path::Colocated),
                (System::Kvfabric, Path::Grpc),
                (System::Mooncake, Path::Remote),
                (System::Redis, Path::Remote),
                (System::Kvfabric, Path::Disk),
                (System::Fio, Path::Disk),
            ]
        );
        let j = mc.to_json();
        assert_eq!(j["ratio_to_kvfabric"].as_f64(), Some(2.0));
        assert_eq!(j["target"].as_str(), Some(">=2x"));
        assert_eq!(j["target_met"].as_bool(), Some(false));
    }

    #[test]
    fn table_formats_numbers_and_collapses_unavailable_systems() {
        let mut rows = vec![
            row(System::Kvfabric, Path::Grpc, Op::Put, MIB, 1, 0.5),
            row(System::Redis, Path::Remote, Op::Put, MIB, 1, 1.0),
            PeerRow::new(System::Kvfabric, Path::Local, Op::Put, MIB, 1).unavailable("not built"),
            PeerRow::new(System::Kvfabric, Path::Local, Op::Get, MIB, 1).unavailable("not built"),
            PeerRow::new(System::Mooncake, Path::Remote, Op::Put, MIB, 1).unavailable("cell failed"),
            row(System::Mooncake, Path::Remote, Op::Get, MIB, 1, 1.0),
        ];
        link(&mut rows);
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        // Header, rule, 4 measured or per-cell rows (the mooncake failure
        // is per cell so it stays), and one collapsed local row last.
        assert_eq!(lines.len(), 7, "{t}");
        assert!(lines[0].starts_with("| system "), "{t}");
        assert!(lines[1].starts_with("|---") && lines[1].contains(":|"), "{t}");
        let redis = lines.iter().find(|l| l.contains("redis")).unwrap();
        assert!(redis.contains("| 1MiB |") && redis.contains(" 1.00 ") && redis.contains(" 2.00 "));
        assert!(redis.contains(" 0.50 ") && redis.contains(">=2x MISSED"), "{redis}");
        assert!(
            lines[6].contains("| all ") && lines[6].contains("| unavailable |"),
            "{t}"
        );
        assert!(lines[6].contains("| not built "), "{t}");
        let failed = lines.iter().find(|l| l.contains("cell failed")).unwrap();
        assert!(failed.contains("| unavailable |") && failed.contains("| put "), "{t}");
        // Every line has the same width.
        assert!(
            lines.iter().all(|l| l.chars().count() == lines[0].chars().count()),
            "{t}"
        );
        // Without anything unavailable there is no note column.
        let measured: Vec<PeerRow> = rows.iter().filter(|r| r.unavailable.is_none()).cloned().collect();
        let t = table(&measured);
        assert!(
            !t.contains("note") && t.lines().next().unwrap().ends_with("target |"),
            "{t}"
        );
    }
}
