//! Session lifecycle against the real sidecar: a killed client, a hung client, a closed
//! session, re-announced holdings, RSS measurement and unloads whose memory never comes back.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Hog, MIB, Sidecar, assert_near, held_ram, pool};
use serde_json::json;

const POLICY: &str = "{mode: Cache, idleTTL: 10m, pressure: {ramPercent: 100, vramPercent: 100}}";

/// `kill -9` of an app: its leases are freed and its bytes leave the accounting within two
/// heartbeats (the sidecar sees the pid gone).
#[test]
fn killed_client_is_cleaned_up_within_two_heartbeats() {
    let heartbeat = Duration::from_millis(3000);
    let sidecar = Sidecar::start(
        &pool(
            "kill",
            "{ram: 1Gi}",
            POLICY,
            &["{name: a, ram: 100Mi}", "{name: b, ram: 50Mi}"],
        ),
        &["--heartbeat-ms", "3000"],
    );
    let mut hog = Hog::start(&sidecar);
    let _a = hog.acquire("a", 100, "load");
    let b = hog.acquire("b", 50, "load");
    hog.release(&b);
    let state = sidecar.state();
    assert_eq!(state["sessions"].as_array().unwrap().len(), 1);
    assert!(held_ram(&state) >= 150 * MIB);

    hog.kill9();
    let killed = Instant::now();
    let state = sidecar.wait_state("the killed app's models to leave the ledger", |s| {
        held_ram(s) == 0 && s["sessions"].as_array().unwrap().is_empty()
    });
    let took = killed.elapsed();
    assert!(
        took < heartbeat * 2,
        "took {took:?}, more than two heartbeats ({:?})",
        heartbeat * 2
    );
    assert!(state["models"].as_array().unwrap().is_empty(), "{state}");
    assert_eq!(
        sidecar.metric("modelpool_model_leases{model=\"a\"}"),
        Some(0.0)
    );
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"a\",reason=\"session_gone\"}"),
        Some(1.0)
    );
    // Its session is gone for good.
    let r = sidecar.post(
        &format!("/v1/sessions/{}/heartbeat", hog.session),
        &json!({}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "unknown_session");
}

/// An app that stops heartbeating (but still runs and holds its memory) loses its session
/// after two missed heartbeats; its leases end, and its bytes stay counted until the
/// process is gone: they are not seen freed before that.
#[test]
fn missed_heartbeats_end_the_session_but_memory_counts_until_freed() {
    let sidecar = Sidecar::start(
        &pool("hung", "{ram: 1Gi}", POLICY, &["{name: a, ram: 100Mi}"]),
        &["--heartbeat-ms", "300", "--reclaim-timeout-ms", "600000"],
    );
    let mut hog = Hog::start(&sidecar);
    hog.acquire("a", 100, "load");
    hog.send("stop-heartbeat");
    let state = sidecar.wait_state("the session to end", |s| {
        s["sessions"].as_array().unwrap().is_empty()
    });
    let instance = &Sidecar::instances(&state, "a")[0];
    assert_eq!(instance["leases"], 0, "{state}");
    assert_eq!(instance["state"], "reclaiming", "{state}");
    assert!(held_ram(&state) >= 100 * MIB, "still held: {state}");
    sidecar.wait_log(
        |l| l.contains("missed heartbeats").then_some(()),
        "the log saying why the session ended",
    );
    hog.kill9();
    sidecar.wait_state("the memory to be seen freed", |s| held_ram(s) == 0);
}

/// Closing a session (after the app freed its models) ends its leases, and the models leave
/// the accounting once the process's RSS has dropped: the process is still alive.
#[test]
fn closed_session_leaves_once_rss_drops() {
    let sidecar = Sidecar::start(
        &pool("close", "{ram: 1Gi}", POLICY, &["{name: a, ram: 100Mi}"]),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    hog.acquire("a", 100, "load");
    let reply = hog.send("close");
    assert_eq!(reply["status"], 204);
    sidecar.wait_state("the closed session's model to leave", |s| {
        held_ram(s) == 0 && s["sessions"].as_array().unwrap().is_empty()
    });
    let reclaimed = sidecar.wait_log(
        |l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["message"]
                .as_str()?
                .starts_with("Memory after unload of a")
                .then(|| v["seen_by"].as_str().map(str::to_owned))
                .flatten()
        },
        "the reclaim log line",
    );
    assert_eq!(reclaimed, "proc", "seen by the RSS drop of a live process");
}

/// The bytes the sidecar measures from /proc (VmRSS before and after the load) agree with
/// what the app holds within 5 %.
#[test]
fn rss_measured_from_proc_matches_what_the_app_holds() {
    let sidecar = Sidecar::start(
        &pool("rss", "{ram: 2Gi}", POLICY, &["{name: a, ram: 100Mi}"]),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    hog.acquire("a", 256, "load");
    let held = hog.send("rss");
    assert_eq!(held["held"], 256 * MIB);
    let state = sidecar.state();
    let instance = &Sidecar::instances(&state, "a")[0];
    assert_near(
        &instance["measured_by_sidecar"]["ram"],
        256 * MIB,
        "sidecar's RSS delta",
    );
    assert_eq!(instance["reported_by_app"]["ram"], 256 * MIB);
    // The ledger learns the measurement (above the declared 100 MiB).
    assert_near(&instance["ram_bytes"], 256 * MIB, "ledger");
    assert_near(&instance["measured"]["ram"], 256 * MIB, "measured");
    // And the process's whole RSS is what it holds plus a small runtime.
    let rss = held["rss"].as_u64().unwrap();
    assert!(
        (256 * MIB..256 * MIB + 256 * MIB / 20).contains(&rss),
        "rss {rss}"
    );
}

/// An app that reports an unload but keeps the memory: after the reclaim timeout the sidecar
/// raises MemoryNotReclaimed (log + metric) and keeps the bytes counted as lost.
#[test]
fn unload_without_freeing_raises_memory_not_reclaimed() {
    let sidecar = Sidecar::start(
        &pool("leak", "{ram: 1Gi}", POLICY, &["{name: a, ram: 100Mi}"]),
        &["--reclaim-timeout-ms", "500"],
    );
    let mut hog = Hog::start(&sidecar);
    let lease = hog.acquire("a", 100, "load");
    hog.release(&lease);
    let reply = hog.send("unload a keep");
    assert_eq!(reply["status"], 200);
    let state = sidecar.wait_state("the reclaim timeout", |s| {
        Sidecar::instances(s, "a")
            .first()
            .is_some_and(|m| m["state"] == "not_reclaimed")
    });
    assert!(
        state["lost_bytes"]["ram"].as_u64().unwrap() >= 100 * MIB,
        "{state}"
    );
    assert_eq!(
        sidecar.metric("modelpool_memory_not_reclaimed_total"),
        Some(1.0)
    );
    sidecar.wait_log(
        |l| l.contains("MemoryNotReclaimed").then_some(()),
        "the MemoryNotReclaimed log line",
    );
    // Once the process is gone the memory is back and the loss is cleared.
    hog.kill9();
    sidecar.wait_state("lost bytes cleared", |s| s["lost_bytes"]["ram"] == 0);
}

/// A process that outlived a sidecar restart re-announces what it holds; the models enter
/// the ledger as loaded without leases (Cache mode keeps them).
#[test]
fn holdings_are_reannounced_on_session_open() {
    let sidecar = Sidecar::start(
        &pool("holds", "{ram: 1Gi}", POLICY, &["{name: a, ram: 100Mi}"]),
        &[],
    );
    let client = sidecar.client();
    let r = client
        .post(
            "/v1/sessions",
            &json!({"pid": std::process::id(), "app": "restarted", "models": ["a"],
                    "holds": [{"model": "a", "vram_bytes": 0, "ram_bytes": 120 * MIB}]}),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let session = r.json()["session"].as_str().unwrap().to_owned();
    let state = sidecar.state();
    let instance = &Sidecar::instances(&state, "a")[0];
    assert_eq!(instance["state"], "loaded");
    assert_eq!(instance["leases"], 0);
    assert_eq!(instance["ram_bytes"], 120 * MIB);
    // An acquire now uses it.
    let r = client
        .post("/v1/acquire", &json!({"session": session, "model": "a"}))
        .unwrap();
    assert_eq!(r.json()["decision"], "use");
}

/// In Aggressive mode a re-announced model still in use (`leases > 0`) is kept until the
/// session's next release of it, then unloaded at once.
#[test]
fn a_reannounced_model_in_use_is_kept_until_released() {
    let sidecar = Sidecar::start(
        &pool(
            "inuse",
            "{ram: 1Gi}",
            "{mode: Aggressive}",
            &["{name: a, ram: 100Mi}"],
        ),
        &[],
    );
    let client = sidecar.client();
    let r = client
        .post(
            "/v1/sessions",
            &json!({"pid": std::process::id(), "app": "restarted", "models": ["a"],
                    "holds": [{"model": "a", "ram_bytes": 100 * MIB, "leases": 1}]}),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let session = r.json()["session"].as_str().unwrap().to_owned();
    let state = sidecar.state();
    let instance = &Sidecar::instances(&state, "a")[0];
    assert_eq!(instance["state"], "loaded", "kept while in use: {instance}");
    // The running block renews its lease (which replaces the placeholder), then ends: the
    // model goes.
    let r = client
        .post("/v1/acquire", &json!({"session": session, "model": "a"}))
        .unwrap();
    assert_eq!(r.json()["decision"], "use", "{}", r.text());
    let state = sidecar.state();
    assert_eq!(Sidecar::instances(&state, "a")[0]["leases"], 1);
    let lease = r.json()["lease"].as_str().unwrap().to_owned();
    let r = client
        .post("/v1/release", &json!({"session": session, "lease": lease}))
        .unwrap();
    assert_eq!(r.json()["unload"], true, "{}", r.text());
}
