//! `kvfabric-demo --json` end to end (small sizes, the tiny model): both
//! runs complete, the outputs are identical, the fabric saves prefill, and
//! the last line carries the fields scripts read.

use std::process::Command;

use kvfabric_engine_adapters::engine::ModelConfig;

#[test]
fn the_demo_measures_the_fabric_saving_prefill_with_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.toml");
    std::fs::write(&model, ModelConfig::tiny().to_toml_string().unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvfabric-demo"))
        .args([
            "--json",
            "--docs",
            "4",
            "--doc-blocks",
            "8",
            "--questions",
            "2",
            "--pool-blocks",
            "20",
        ])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["outputs_identical"], true, "{v}");
    let with = v["prefill_tokens_with"].as_u64().unwrap();
    let without = v["prefill_tokens_without"].as_u64().unwrap();
    assert!(with < without, "the fabric saves prefill: {v}");
    let prompt = v["prompt_tokens"].as_u64().unwrap();
    let own_with = v["own_pool_tokens_with"].as_u64().unwrap();
    let own_without = v["own_pool_tokens_without"].as_u64().unwrap();
    let fabric = v["fabric_tokens_with"].as_u64().unwrap();
    assert!(fabric > 0, "{v}");
    assert_eq!(
        with + own_with + fabric,
        prompt,
        "every prompt token computed or reused: {v}"
    );
    assert_eq!(
        without + own_without,
        prompt,
        "without the fabric only the own pool reuses: {v}"
    );
    assert!(v["ttft_p50_ms_with"].as_f64().unwrap() > 0.0);
    assert!(v["ttft_p50_ms_without"].as_f64().unwrap() > 0.0);
    assert!(v["fabric_block_hits"]["host"].as_u64().unwrap() > 0, "{v}");
}
