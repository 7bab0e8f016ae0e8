//! The process around the API: pool file reloads, graceful SIGTERM, the `status`
//! subcommand, JSON logs with the seed's memory lines, health endpoints.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{Hog, Sidecar, held_ram, pool};
use modelpool_sidecar::client::Client;
use serde_json::Value;

const POLICY: &str = "{mode: Cache, idleTTL: 10m, pressure: {ramPercent: 100, vramPercent: 100}}";

/// An edited pool file is put in force; an invalid edit is refused with a logged reason and
/// the previous pool stays.
#[test]
fn pool_file_edits_are_applied_and_invalid_ones_refused() {
    let sidecar = Sidecar::start(
        &pool("reload", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
        &[],
    );
    sidecar.write_pool(&pool(
        "reload",
        "{ram: 2Gi}",
        POLICY,
        &["{name: a, ram: 10Mi}", "{name: b, ram: 20Mi}"],
    ));
    let state = sidecar.wait_state("the new pool", |s| {
        s["pool"]["models"].as_array().unwrap().len() == 2
    });
    assert_eq!(state["ceiling_bytes"]["ram"], 2u64 << 30);

    sidecar.write_pool("apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {name: reload}\nspec:\n  models:\n  - {name: a, ram: lots}\n");
    let reason = sidecar.wait_log(
        |l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["message"]
                .as_str()?
                .contains("invalid: refused")
                .then(|| v["error"].as_str().map(str::to_owned))
                .flatten()
        },
        "the refusal of the invalid pool",
    );
    assert!(
        reason.contains("spec.models[0].ram"),
        "names the field: {reason}"
    );
    let state = sidecar.state();
    assert_eq!(
        state["pool"]["models"].as_array().unwrap().len(),
        2,
        "old pool stays"
    );
    assert_eq!(
        sidecar.metric("modelpool_pool_reloads_total{outcome=\"invalid\"}"),
        Some(1.0)
    );
    assert_eq!(
        sidecar.metric("modelpool_pool_reloads_total{outcome=\"ok\"}"),
        Some(1.0)
    );
}

/// SIGTERM: new work is refused, apps are told to unload idle models (reason `shutdown`),
/// the sidecar waits for the memory to come back, removes its socket and exits 0.
#[test]
fn sigterm_unloads_idle_models_and_exits_cleanly() {
    let mut sidecar = Sidecar::start(
        &pool(
            "term",
            "{ram: 1Gi}",
            POLICY,
            &["{name: a, ram: 50Mi}", "{name: b, ram: 50Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let a = hog.acquire("a", 50, "load");
    hog.release(&a);
    let status = sidecar.terminate();
    assert!(status.success(), "{status:?}");
    let event = hog.wait_unloaded("a");
    assert_eq!(event["reason"], "shutdown");
    assert!(!sidecar.socket.exists(), "socket removed");
    // stderr may still be draining after the exit: wait for the lines rather than snapshot.
    sidecar.wait_log(
        |l| (l.contains("Memory at shutdown: RAM ") && l.contains("VRAM no GPU")).then_some(()),
        "the memory line at shutdown",
    );
    sidecar.wait_log(
        |l| l.contains("sidecar stopped").then_some(()),
        "the last log line",
    );
}

/// While it waits for apps to unload, a stopping sidecar refuses new sessions and acquires
/// with 503 `shutting_down`, reports not ready, and still exits once the grace is over.
#[test]
fn stopping_sidecar_refuses_new_work() {
    let mut sidecar = Sidecar::start(
        &pool("stopping", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
        &["--shutdown-grace-ms", "3000"],
    );
    // A session that holds an idle model but never answers commands: the unload stays pending.
    let opened = sidecar.post(
        "/v1/sessions",
        &serde_json::json!({"pid": std::process::id(), "holds": [{"model": "a", "ram_bytes": 1024}]}),
    );
    assert_eq!(opened.status, 201);
    let session = opened.json()["session"].as_str().unwrap().to_owned();
    sidecar.signal_term();
    sidecar.wait_state("shutdown to begin", |s| s["shutting_down"] == true);
    let r = sidecar.post(
        "/v1/sessions",
        &serde_json::json!({"pid": std::process::id()}),
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "shutting_down");
    let r = sidecar.post(
        "/v1/acquire",
        &serde_json::json!({"session": session, "model": "a"}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["reason"], "shutting_down");
    let ready = Client::tcp(sidecar.metrics_addr.clone())
        .get("/readyz")
        .unwrap();
    assert_eq!(ready.status, 503);
    let commands = sidecar
        .get(&format!("/v1/sessions/{session}/commands?wait_ms=0"))
        .json();
    assert_eq!(commands["commands"][0]["reason"], "shutdown", "{commands}");
    let status = sidecar.wait_exit();
    assert!(status.success(), "{status:?}");
}

/// `modelpool-sidecar status` prints the models as a table and the seed's memory line.
#[test]
fn status_subcommand_prints_a_table_and_the_memory_line() {
    let sidecar = Sidecar::start(
        &pool("status", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    hog.acquire("a", 20, "load");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpool-sidecar"))
        .arg("status")
        .arg("--socket")
        .arg(&sidecar.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().find(|l| l.starts_with("MODEL")).expect(&text);
    for column in ["SESSION", "PID", "STATE", "LEASES", "VRAM", "RAM", "IDLE"] {
        assert!(header.contains(column), "{header}");
    }
    let row = text.lines().find(|l| l.starts_with("a ")).expect(&text);
    assert!(
        row.contains(&hog.session) && row.contains(&hog.pid.to_string()) && row.contains("loaded"),
        "{row}"
    );
    let memory = text.lines().last().unwrap();
    let re_ok = memory.starts_with("RAM ")
        && memory.contains(" GiB (")
        && memory.contains("%) | VRAM no GPU (");
    assert!(re_ok, "{memory}");

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_modelpool-sidecar"))
        .args(["status", "--socket", "/nonexistent/sidecar.sock"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/sidecar.sock"));
}

/// JSON logs carry the memory before and after each load and unload, in human units.
#[test]
fn json_logs_carry_memory_before_and_after() {
    let sidecar = Sidecar::start(
        &pool(
            "logs",
            "{ram: 1Gi}",
            "{mode: Aggressive, pressure: {ramPercent: 100, vramPercent: 100}}",
            &["{name: a, ram: 10Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let lease = hog.acquire("a", 10, "load");
    hog.release(&lease);
    hog.wait_unloaded("a");
    sidecar.wait_state("a reclaimed", |s| held_ram(s) == 0);
    for prefix in [
        "Memory before load of a: RAM ",
        "Memory after load of a: RAM ",
        "Memory after unload of a: RAM ",
    ] {
        let line = sidecar.wait_log(
            |l| {
                let v: Value = serde_json::from_str(l).ok()?;
                v["message"]
                    .as_str()?
                    .starts_with(prefix)
                    .then(|| v.clone())
            },
            prefix,
        );
        assert!(
            line["message"].as_str().unwrap().contains(" GiB ("),
            "{line}"
        );
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
}

/// /healthz and /readyz on the metrics port.
#[test]
fn health_endpoints() {
    let sidecar = Sidecar::start(
        &pool("health", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
        &[],
    );
    let ops = Client::tcp(sidecar.metrics_addr.clone());
    assert_eq!(ops.get("/healthz").unwrap().status, 200);
    assert_eq!(ops.get("/readyz").unwrap().status, 200);
    let metrics = ops.get("/metrics").unwrap();
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(
        metrics
            .text()
            .contains("modelpool_pool_info{mode=\"Cache\",namespace=\"\",pool=\"health\"} 1")
    );
}
