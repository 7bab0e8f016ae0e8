//! `bench/device/proxy.sh`, the proxy check meant for a machine with cores to spare, run here
//! briefly with the debug binaries: it must run every configuration it names, pin the
//! sidecar where it says it does, and write a summary whose verdicts follow from the rows. The
//! device machine's few minutes are no place to find an orchestration bug.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::sidecar_bin;
use serde_json::Value;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("device/proxy.sh")
}

fn run(out: &Path, bench: &Path, sidecar: &Path) -> Output {
    Command::new("bash")
        .arg(script())
        .env("OUT", out)
        .env("MODELPOOL_BENCH_BIN", bench)
        .env("MODELPOOL_SIDECAR_BIN", sidecar)
        .env("PROXY_CHECK_SECONDS", "0.6")
        .env("PROXY_CHECK_SLICES", "6")
        .env("PROXY_CHECK_CLIENTS", "2")
        .env("PROXY_CHECK_WORKS", "300")
        .env("PROXY_CHECK_SIDECAR_CORES", "1")
        .output()
        .expect("run bash")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[test]
fn the_device_proxy_check_runs_shared_and_pinned_and_summarises_every_cell() {
    let out = tempfile::tempdir().expect("tempdir");
    let output = run(
        out.path(),
        Path::new(env!("CARGO_BIN_EXE_modelpool-bench")),
        &sidecar_bin(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "proxy.sh failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("summary.json")).expect("summary.json"),
    )
    .expect("summary.json is JSON");
    let pinned = cores() >= 2 && Command::new("taskset").arg("-V").output().is_ok();
    let cells = summary["cells"].as_array().expect("cells");
    let runs: Vec<(&str, &str)> = cells
        .iter()
        .map(|c| {
            (
                c["run"].as_str().expect("run"),
                c["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    let mut expected = vec![("shared-300", "small"), ("shared-300", "stream")];
    if pinned {
        expected.extend([("pinned-300", "small"), ("pinned-300", "stream")]);
    }
    assert_eq!(runs, expected, "{stdout}");
    if pinned {
        // The sidecar ran on core 0 alone, as the wrapper asked.
        assert_eq!(summary["pinned_sidecar_cores"], "0", "{summary}");
    } else {
        let skipped = summary["skipped"].as_array().expect("skipped");
        assert_eq!(
            skipped.len(),
            1,
            "the pinned run's absence is explained: {summary}"
        );
    }
    for cell in cells {
        assert_eq!(cell["work_us"], 300, "{cell}");
        assert_eq!(cell["clients"], 2, "{cell}");
        let ratio = cell["ratio_to_direct"].as_f64().expect("ratio");
        assert_eq!(cell["throughput_met"], ratio >= 0.9, "{cell}");
        let median = cell["added_p99_slice_median_us"].as_f64().expect("median");
        assert_eq!(cell["p99_met"], median <= 1000.0, "{cell}");
        let (low, high) = (
            cell["added_p99_slice_low_us"].as_f64().expect("low"),
            cell["added_p99_slice_high_us"].as_f64().expect("high"),
        );
        let interval = if high <= 1000.0 {
            "below"
        } else if low > 1000.0 {
            "above"
        } else {
            "straddles"
        };
        assert_eq!(cell["p99_interval"], interval, "{cell}");
        assert!(
            cell["sidecar_cpu_us_per_request"].as_f64().expect("cpu") > 0.0,
            "{cell}"
        );
    }
    // One line per cell on stdout, for the device tool's output tail.
    assert_eq!(
        stdout.matches(" clients  2: ratio ").count(),
        cells.len(),
        "{stdout}"
    );
}

#[test]
fn the_device_proxy_check_names_a_missing_binary_and_runs_nothing() {
    let out = tempfile::tempdir().expect("tempdir");
    let missing = out.path().join("no-such-bench");
    let output = run(out.path(), &missing, &sidecar_bin());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("missing binary {}", missing.display()))
            && stderr.contains("bench/device/prepare.sh"),
        "{stderr}"
    );
    assert!(!out.path().join("summary.json").exists());
}
