//! Runs the eviction scenario on small traces through the real binary: every result line has
//! the documented keys, and no policy costs less than the lower bound (a property of the
//! bound, not a timing).

use std::{path::Path, process::Command};

use serde_json::Value;

const KEYS: [&str; 12] = [
    "trace",
    "seed",
    "policy",
    "kind",
    "reload_seconds",
    "refused_load_s",
    "queue_wait_s",
    "cost_s",
    "hit_ratio",
    "ratio_to_offline",
    "ratio_to_bound",
    "bound_cost_s",
];

fn run(args: &[&str]) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(env!("CARGO_BIN_EXE_modelpool-bench"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("run modelpool-bench");
    assert!(
        output.status.success(),
        "modelpool-bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

fn num(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row}"))
}

/// Checks the rows of `traces` workloads; returns the policies seen per workload.
fn check(rows: &[Value], traces: usize) {
    let mut workloads: Vec<(Value, Value)> = Vec::new();
    for row in rows {
        assert_eq!(row["scenario"], "eviction");
        let key = (row["trace"].clone(), row["seed"].clone());
        if !workloads.contains(&key) {
            workloads.push(key);
        }
    }
    assert_eq!(workloads.len(), traces, "{workloads:?}");
    for (trace, seed) in workloads {
        let of: Vec<&Value> = rows
            .iter()
            .filter(|r| r["trace"] == trace && r["seed"] == seed)
            .collect();
        let bound = of
            .iter()
            .find(|r| r["policy"] == "bound")
            .unwrap_or_else(|| panic!("a bound line for {trace}"));
        let bound = num(bound, "cost_s");
        assert!(bound > 0.0, "{trace}: bound {bound}");
        let policies: Vec<&str> = of.iter().filter_map(|r| r["policy"].as_str()).collect();
        for p in [
            "costaware_cache",
            "costaware_keep",
            "lru",
            "ttl_keepalive",
            "max_n_lru",
            "offline",
            "offline_ttl",
        ] {
            assert!(
                policies.contains(&p),
                "{p} missing on {trace}: {policies:?}"
            );
        }
        for row in of.iter().filter(|r| r["policy"] != "bound") {
            for key in KEYS {
                assert!(row.get(key).is_some(), "{key} missing in {row}");
            }
            let cost = num(row, "cost_s");
            let parts =
                num(row, "reload_seconds") + num(row, "refused_load_s") + num(row, "queue_wait_s");
            assert!((cost - parts).abs() <= 1e-3 * cost.max(1.0), "{row}");
            assert!(
                bound <= cost + 1e-6,
                "bound {bound} above {} ({cost}) on {trace}",
                row["policy"]
            );
            assert!(num(row, "ratio_to_bound") >= 1.0 - 1e-6, "{row}");
            let hit = num(row, "hit_ratio");
            assert!((0.0..=1.0).contains(&hit), "{row}");
        }
    }
}

#[test]
fn sample_trace_file_on_the_cogvideo_pool() {
    let rows = run(&[
        "eviction",
        "--trace",
        "bench/traces/sample.jsonl",
        "--pool",
        "examples/pools/cogvideo.yaml",
        "--json",
    ]);
    check(&rows, 1);
    assert_eq!(rows[0]["trace"], "sample");
    // The manifest's own policy (Aggressive) runs as `manifest`, and loads at every request
    // that does not overlap another.
    let manifest = rows
        .iter()
        .find(|r| r["policy"] == "manifest")
        .expect("a manifest line");
    let cache = rows
        .iter()
        .find(|r| r["policy"] == "costaware_cache")
        .unwrap();
    assert!(manifest["hit_ratio"].as_f64() <= cache["hit_ratio"].as_f64());
}

#[test]
fn tiny_synthetic_traces() {
    let rows = run(&[
        "eviction",
        "--traces",
        "zipf-0.9,pipeline,phases,small-huge",
        "--requests",
        "120",
        "--seeds",
        "1",
        "--json",
    ]);
    check(&rows, 4);
}

#[test]
fn bad_trace_line_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"t\": 0, \"model\": \"t2v\", \"hold_s\": 1}\n{\"t\": 1, \"model\": \"nope\", \"hold_s\": 1}\n",
    )
    .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(env!("CARGO_BIN_EXE_modelpool-bench"))
        .args([
            "eviction",
            "--pool",
            "examples/pools/cogvideo.yaml",
            "--trace",
        ])
        .arg(&trace)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.jsonl:2"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
}
