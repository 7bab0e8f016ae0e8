//! Runs the proxy scenario through the real binaries (the bench, the sidecar with its serving
//! proxy, the bench's upstream), briefly: every cell has the keys BENCHMARKS.md names, both
//! sides answered, the per-slice added p99 comes with an interval around its median, and
//! the CPU per request of the sidecar and of the upstream are read.

mod common;

use std::process::Command;

use common::sidecar_bin;
use serde_json::Value;

fn num(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row}"))
}

#[test]
fn proxy_scenario_compares_both_sides_slice_by_slice() {
    let output = Command::new(env!("CARGO_BIN_EXE_modelpool-bench"))
        .args([
            "proxy",
            "--json",
            "--seconds",
            "1.2",
            "--slices",
            "6",
            "--clients",
            "1,4",
            "--work-us",
            "500",
        ])
        .env("MODELPOOL_SIDECAR_BIN", sidecar_bin())
        .output()
        .expect("run modelpool-bench");
    assert!(
        output.status.success(),
        "modelpool-bench proxy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let cells: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["scenario"], "proxy");
            (
                r["kind"].as_str().expect("kind").to_owned(),
                r["clients"].as_u64().expect("clients"),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = ["small", "stream"]
        .iter()
        .flat_map(|kind| [1, 4].map(|clients| ((*kind).to_owned(), clients)))
        .collect();
    assert_eq!(cells, expected);
    for row in &rows {
        assert_eq!(row["work_us"], 500, "{row}");
        assert!(num(row, "requests") > 0.0, "{row}");
        // Every answer waited for the upstream's 500 µs of work.
        assert!(num(row, "p50_us") >= 500.0, "{row}");
        assert!(num(row, "direct_p50_us") >= 500.0, "{row}");
        assert!(num(row, "req_per_s") > 0.0, "{row}");
        assert!(num(row, "direct_req_per_s") > 0.0, "{row}");
        assert!(num(row, "p99_us") >= num(row, "p50_us"), "{row}");
        let ratio = num(row, "ratio_to_direct");
        let expected_ratio = num(row, "req_per_s") / num(row, "direct_req_per_s");
        assert!(
            (ratio - expected_ratio).abs() <= 0.01 * expected_ratio,
            "{row}"
        );
        let (low, median, high) = (
            num(row, "added_p99_slice_low_us"),
            num(row, "added_p99_slice_median_us"),
            num(row, "added_p99_slice_high_us"),
        );
        assert!(low <= median && median <= high, "{row}");
        // CPU per request is read from /proc; 10 ms ticks can round a short slice to zero.
        assert!(num(row, "sidecar_cpu_us_per_request") >= 0.0, "{row}");
        assert!(num(row, "upstream_cpu_us_per_request") >= 0.0, "{row}");
        if num(row, "upstream_cpu_us_per_request") > 0.0 {
            let expected =
                num(row, "sidecar_cpu_us_per_request") / num(row, "upstream_cpu_us_per_request");
            let got = num(row, "sidecar_cpu_to_upstream");
            assert!((got - expected).abs() <= 0.01 * expected.max(0.01), "{row}");
        }
    }
    // Over all cells the sidecar parsed, leased and forwarded thousands of requests: that
    // costs CPU time /proc can see.
    let sidecar_cpu: f64 = rows
        .iter()
        .map(|r| num(r, "sidecar_cpu_us_per_request") * num(r, "requests"))
        .sum();
    assert!(sidecar_cpu > 0.0, "no sidecar CPU measured: {rows:?}");
}
