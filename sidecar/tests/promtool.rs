//! `promtool check metrics` accepts the sidecar's /metrics output (names, HELP, TYPE, units).
//!
//! promtool comes from `scripts/build-tools.sh` (which prints its bin folder as the last line
//! of stdout); `MODELPOOL_TOOLS_BIN` points at an already built folder. Without either the test
//! fails: metric lint is part of the suite, not optional.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use common::{Hog, Sidecar, pool};

fn promtool() -> PathBuf {
    if let Some(bin) = std::env::var_os("MODELPOOL_TOOLS_BIN") {
        let candidate = Path::new(&bin).join("promtool");
        if candidate.is_file() {
            return candidate;
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-tools.sh");
    assert!(
        script.is_file(),
        "promtool is needed: set MODELPOOL_TOOLS_BIN to a folder holding promtool, or provide {} (it builds the pinned tools and prints their folder)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-tools.sh");
    assert!(
        out.status.success(),
        "scripts/build-tools.sh failed ({}); set MODELPOOL_TOOLS_BIN to a folder holding promtool",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/build-tools.sh printed no bin folder"));
    let promtool = Path::new(bin.trim()).join("promtool");
    assert!(
        promtool.is_file(),
        "scripts/build-tools.sh printed {bin:?} but there is no promtool in it"
    );
    promtool
}

/// Every metric family the sidecar exports, after a run that fills most of them, passes
/// `promtool check metrics`.
#[test]
fn promtool_accepts_the_metrics() {
    let promtool = promtool();
    let sidecar = Sidecar::start(
        &pool(
            "lint",
            "{ram: 300Mi}",
            "{mode: Aggressive, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}",
            &[
                "{name: a, ram: 20Mi}",
                "{name: pin, ram: 100Mi, pinned: true}",
                "{name: big, ram: 250Mi}",
            ],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let lease = hog.acquire("a", 20, "load");
    hog.release(&lease);
    hog.wait_unloaded("a");
    hog.acquire("pin", 100, "load");
    let refused = hog.send("acquire big 250");
    assert_eq!(refused["status"], 409);
    let text = sidecar.metrics();
    for family in [
        "modelpool_gpu_up",
        "modelpool_ram_used_bytes",
        "modelpool_ram_limit_bytes",
        "modelpool_pool_bytes",
        "modelpool_ceiling_bytes",
        "modelpool_model_loaded",
        "modelpool_model_bytes",
        "modelpool_model_leases",
        "modelpool_loads_total",
        "modelpool_unloads_total",
        "modelpool_load_duration_seconds",
        "modelpool_reclaim_duration_seconds",
        "modelpool_acquire_wait_seconds",
        "modelpool_acquires_refused_total",
        "modelpool_memory_not_reclaimed_total",
        "modelpool_ceiling_breaches_total",
        "modelpool_pool_info",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} missing from /metrics:\n{text}"
        );
    }
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused /metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
