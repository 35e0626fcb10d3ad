//! The result table: one [`Row`] per measured configuration, each kvfabric
//! row linked to the physical limit it is compared with (gRPC rows to a
//! memcpy with as many threads as clients, disk-tier rows to fio in the same
//! direction), printed as a Markdown table or as one JSON object per row.

use kvfabric::server::ByteSize;
use kvfabric_bench::latency::format_ns;
use serde_json::json;

/// What a row measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// The memcpy limit.
    Memcpy,
    /// kvfabric over gRPC.
    Grpc,
    /// The fio limit.
    Fio,
    /// kvfabric's disk tier, called directly.
    Disk,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Memcpy => "memcpy",
            Kind::Grpc => "grpc",
            Kind::Fio => "fio",
            Kind::Disk => "disk",
        }
    }
}

/// Which direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Op {
    /// Writes (put, fio write, memcpy).
    Write,
    /// Reads (get, fio read).
    Read,
}

/// One line of the table.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    /// What was measured.
    pub(crate) kind: Kind,
    /// Direction.
    pub(crate) op: Op,
    /// Label shown in the table, e.g. `grpc put [host]`.
    pub(crate) label: String,
    /// Block size in bytes.
    pub(crate) size: u64,
    /// Concurrent clients / threads; `None` for fio.
    pub(crate) clients: Option<usize>,
    /// I/O queue depth (fio).
    pub(crate) iodepth: Option<u32>,
    /// Operations completed.
    pub(crate) ops: u64,
    /// Seconds measured.
    pub(crate) seconds: f64,
    /// Throughput, bytes per second; `None` if not measured.
    pub(crate) bytes_per_sec: Option<f64>,
    /// Median latency, ns.
    pub(crate) p50_ns: Option<f64>,
    /// 99th percentile latency, ns.
    pub(crate) p99_ns: Option<f64>,
    /// The limit row's label, once linked.
    pub(crate) limit: Option<String>,
    /// This row's throughput over the limit's.
    pub(crate) ratio: Option<f64>,
    /// Why a number is missing (e.g. `fio not found`).
    pub(crate) note: Option<String>,
}

impl Row {
    /// A row with no numbers yet.
    pub(crate) fn new(kind: Kind, op: Op, label: impl Into<String>, size: u64) -> Row {
        Row {
            kind,
            op,
            label: label.into(),
            size,
            clients: None,
            iodepth: None,
            ops: 0,
            seconds: 0.0,
            bytes_per_sec: None,
            p50_ns: None,
            p99_ns: None,
            limit: None,
            ratio: None,
            note: None,
        }
    }

    /// Sets the numbers from a latency histogram in ns.
    pub(crate) fn with_latency(mut self, h: &hdrhistogram::Histogram<u64>) -> Row {
        if !h.is_empty() {
            self.p50_ns = Some(h.value_at_quantile(0.5) as f64);
            self.p99_ns = Some(h.value_at_quantile(0.99) as f64);
        }
        self
    }

    fn gbps(&self) -> Option<f64> {
        self.bytes_per_sec.map(|b| b / 1e9)
    }

    fn clients_cell(&self) -> String {
        match (self.clients, self.iodepth) {
            (Some(c), _) => c.to_string(),
            (None, Some(qd)) => format!("qd{qd}"),
            (None, None) => "-".into(),
        }
    }

    /// The row as one JSON object.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        json!({
            "workload": self.label,
            "kind": self.kind.as_str(),
            "op": match self.op { Op::Write => "write", Op::Read => "read" },
            "size": ByteSize(self.size).to_string(),
            "size_bytes": self.size,
            "clients": self.clients,
            "iodepth": self.iodepth,
            "ops": self.ops,
            "seconds": self.seconds,
            "gb_per_s": self.gbps(),
            "p50_us": self.p50_ns.map(|n| n / 1e3),
            "p99_us": self.p99_ns.map(|n| n / 1e3),
            "limit": self.limit,
            "ratio": self.ratio,
            "note": self.note,
        })
    }
}

/// Sorts rows (by size, then limit before kvfabric, then clients) and links
/// each kvfabric row to its limit: a gRPC row to the memcpy row of the same
/// size with as many threads as it has clients, a disk row to the fio row of
/// the same size and direction.
pub(crate) fn link_limits(rows: &mut [Row]) {
    rows.sort_by_key(|r| (r.size, r.kind, r.clients, r.op));
    let limits: Vec<Row> = rows
        .iter()
        .filter(|r| matches!(r.kind, Kind::Memcpy | Kind::Fio))
        .cloned()
        .collect();
    for r in rows.iter_mut() {
        let limit = match r.kind {
            Kind::Grpc => limits
                .iter()
                .find(|l| l.kind == Kind::Memcpy && l.size == r.size && l.clients == r.clients),
            Kind::Disk => limits
                .iter()
                .find(|l| l.kind == Kind::Fio && l.size == r.size && l.op == r.op),
            Kind::Memcpy | Kind::Fio => None,
        };
        if let Some(l) = limit {
            r.limit = Some(match l.kind {
                Kind::Memcpy => format!("{} x{}", l.label, l.clients_cell()),
                _ => l.label.clone(),
            });
            r.ratio = match (r.bytes_per_sec, l.bytes_per_sec) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
        }
    }
}

/// The rows as a Markdown table.
pub(crate) fn table(rows: &[Row]) -> String {
    let header = ["workload", "size", "clients", "GB/s", "p50", "p99", "limit", "ratio"];
    let body: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let dash = || "-".to_string();
            [
                r.label.clone(),
                ByteSize(r.size).to_string(),
                r.clients_cell(),
                r.gbps()
                    .map(|g| format!("{g:.2}"))
                    .or_else(|| r.note.clone())
                    .unwrap_or_else(dash),
                r.p50_ns.map(format_ns).unwrap_or_else(dash),
                r.p99_ns.map(format_ns).unwrap_or_else(dash),
                r.limit.clone().unwrap_or_else(dash),
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &body {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(width)
            .enumerate()
            .map(|(i, (c, w))| {
                // Text left, numbers right.
                if i == 0 || i == 6 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header.map(String::from));
    // Markdown alignment row: text columns left, numbers right.
    let rule: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if i == 0 || i == 6 {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", rule.join("|")));
    for row in &body {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_grpc_to_memcpy_and_disk_to_fio() {
        let mut memcpy = Row::new(Kind::Memcpy, Op::Write, "memcpy", 4096);
        memcpy.clients = Some(4);
        memcpy.bytes_per_sec = Some(10e9);
        let mut grpc = Row::new(Kind::Grpc, Op::Read, "grpc get", 4096);
        grpc.clients = Some(4);
        grpc.bytes_per_sec = Some(2.5e9);
        let mut fio = Row::new(Kind::Fio, Op::Read, "fio read", 4096);
        fio.iodepth = Some(64);
        fio.note = Some("fio not found".into());
        let mut disk = Row::new(Kind::Disk, Op::Read, "disk get", 4096);
        disk.clients = Some(1);
        disk.bytes_per_sec = Some(1e9);
        let mut rows = vec![disk, grpc, fio, memcpy];
        link_limits(&mut rows);
        assert_eq!(rows[0].kind, Kind::Memcpy);
        assert_eq!(rows[1].ratio, Some(0.25));
        assert_eq!(rows[1].limit.as_deref(), Some("memcpy x4"));
        assert_eq!(rows[3].limit.as_deref(), Some("fio read"));
        assert_eq!(rows[3].ratio, None);
        let t = table(&rows);
        assert!(t.contains("fio not found"), "{t}");
        assert_eq!(t.lines().count(), 6);
        assert!(rows[1].to_json()["ratio"].as_f64() == Some(0.25));
    }
}
