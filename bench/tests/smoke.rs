//! Runs the eviction scenario on small traces through the real binary: every result line has
//! the documented keys, and the offline bound costs no more than any policy (a property of the
//! bound, not a timing).

use std::{path::Path, process::Command};

use serde_json::Value;

const KEYS: [&str; 7] = [
    "trace",
    "policy",
    "reload_bytes",
    "reload_seconds",
    "hit_ratio",
    "ratio_to_offline",
    "offline_reload_seconds",
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

fn check(rows: &[Value], traces: usize) {
    assert_eq!(
        rows.len(),
        traces * 7,
        "seven contenders per trace: {rows:?}"
    );
    for row in rows {
        assert_eq!(row["scenario"], "eviction");
        for key in KEYS {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        assert!(num(row, "reload_seconds") > 0.0, "{row}");
        let hit = num(row, "hit_ratio");
        assert!((0.0..=1.0).contains(&hit), "{row}");
    }
    for trace in rows.iter().map(|r| r["trace"].clone()) {
        let of_trace: Vec<&Value> = rows.iter().filter(|r| r["trace"] == trace).collect();
        let offline = num(
            of_trace
                .iter()
                .find(|r| r["policy"] == "offline")
                .expect("an offline line"),
            "reload_seconds",
        );
        for row in &of_trace {
            let cost = num(row, "reload_seconds");
            assert!(
                offline <= cost + 1e-9,
                "offline bound {offline} above {} ({cost}) on {trace}",
                row["policy"]
            );
            assert!(num(row, "ratio_to_offline") >= 1.0 - 1e-9);
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
    // Aggressive mode loads at every request that does not overlap another.
    let aggressive = rows.iter().find(|r| r["policy"] == "aggressive").unwrap();
    let cache = rows
        .iter()
        .find(|r| r["policy"] == "costaware_cache")
        .unwrap();
    assert!(aggressive["hit_ratio"].as_f64() <= cache["hit_ratio"].as_f64());
}

#[test]
fn tiny_synthetic_traces() {
    let rows = run(&[
        "eviction",
        "--traces",
        "zipf-0.6,zipf-1.2,bursty,pipeline",
        "--requests",
        "400",
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
