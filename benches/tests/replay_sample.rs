//! `kvfabric-bench replay` end to end on the committed trace sample
//! (`benches/data/conversation_trace_sample.jsonl`, the first 1000 lines of
//! the Mooncake conversation trace): the binary runs, prints one JSON object
//! per policy with the fields scripts compare, the KV-aware policies
//! compute no more prefill than round-robin and none beats the bound, and
//! the plot is a PNG, with or without a font. Behaviour only, never speed.

use std::path::Path;
use std::process::Command;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/conversation_trace_sample.jsonl");

fn replay(extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric-bench"))
        .args(["replay", "--trace", SAMPLE, "--json"])
        .args(extra)
        .output()
        .expect("running kvfabric-bench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed: {stderr}");
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    (rows, stderr)
}

#[test]
fn sample_replay_reports_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("ttft.png");
    let (rows, stderr) = replay(&["--limit", "500", "--plot", png.to_str().unwrap()]);
    assert!(stderr.contains("time scale"), "{stderr}");
    let names: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "round-robin",
            "random",
            "kv-hbm-only",
            "kv-tier-aware",
            "kv-dynamo",
            "ttft-oracle"
        ]
    );
    for r in &rows {
        for f in [
            "ttft_p50_ms",
            "ttft_p90_ms",
            "prefill_tokens",
            "bound_prefill_tokens",
            "hit_rate",
        ] {
            assert!(r[f].is_number(), "{f} missing in {r}");
        }
        assert_eq!(r["requests"], 500);
        assert!(r["prefill_tokens"].as_u64() >= r["bound_prefill_tokens"].as_u64());
    }
    let prefill = |name: &str| {
        rows.iter().find(|r| r["policy"] == name).unwrap()["prefill_tokens"]
            .as_u64()
            .unwrap()
    };
    assert!(prefill("kv-tier-aware") <= prefill("round-robin"));
    assert!(prefill("kv-hbm-only") <= prefill("round-robin"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}

#[test]
fn a_missing_font_still_plots_and_a_bad_trace_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("nofont.png");
    let (rows, stderr) = replay(&[
        "--limit",
        "100",
        "--time-scale",
        "0.1",
        "--plot",
        png.to_str().unwrap(),
        "--font",
        "/nonexistent/font.ttf",
    ]);
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0]["time_scale"], 0.1);
    assert!(stderr.contains("no text"), "{stderr}");
    assert!(Path::new(&png).exists());

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}\n{\"timestamp\": 1}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric-bench"))
        .args(["replay", "--no-plot", "--trace"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
}
