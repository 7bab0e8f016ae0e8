//! Commands are tied to the instance they are for (model + generation): an acknowledgement of
//! an instance the session no longer holds, or one already taken, is refused and changes
//! nothing. This is the reclaim benchmark's old miscount: its child freed "whatever it held" on
//! an unload command queued at the previous release and delivered late, and the sidecar counted
//! that as the unload of the next load.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{Sidecar, pool};
use serde_json::{Value, json};

const AGGRESSIVE: &str =
    "{mode: Aggressive, acquireTimeout: 5s, pressure: {ramPercent: 100, vramPercent: 100}}";

/// The pid of a process that has exited: the sidecar sees its memory as given back at once.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn open(sidecar: &Sidecar, pid: u32) -> String {
    let r = sidecar.post("/v1/sessions", &json!({"pid": pid, "models": ["m"]}));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session"].as_str().unwrap().to_owned()
}

/// Acquires and loads `m`: (lease, generation).
fn load(sidecar: &Sidecar, session: &str) -> (String, u64) {
    let r = sidecar.post("/v1/acquire", &json!({"session": session, "model": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["decision"], "load", "{body}");
    let lease = body["lease"].as_str().unwrap().to_owned();
    let generation = body["generation"].as_u64().expect("a generation");
    let r = sidecar.post(
        "/v1/loaded",
        &json!({"session": session, "lease": lease, "ok": true, "ram_bytes": 10u64 << 20}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    (lease, generation)
}

fn instance(state: &Value) -> Option<Value> {
    Sidecar::instances(state, "m").first().cloned()
}

#[test]
fn a_stale_unload_acknowledgement_is_refused_and_changes_nothing() {
    let sidecar = Sidecar::start(
        &pool("cmds", "{ram: 1Gi}", AGGRESSIVE, &["{name: m, ram: 10Mi}"]),
        &["--heartbeat-ms", "30000"],
    );
    let session = open(&sidecar, dead_pid());

    // Load, release: the app is told to unload (answer and command, both for generation 1).
    let (lease, first) = load(&sidecar, &session);
    let r = sidecar.post("/v1/release", &json!({"session": session, "lease": lease}));
    assert_eq!(r.json()["unload"], true, "{}", r.text());
    let polled = sidecar
        .get(&format!("/v1/sessions/{session}/commands?wait_ms=0"))
        .json();
    let command = polled["commands"][0].clone();
    assert_eq!(command["model"], "m", "{polled}");
    assert_eq!(
        command["generation"], first,
        "the command names its instance"
    );

    // The app unloads at the release answer and says so: that instance is gone.
    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": first}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    sidecar.wait_state("the first instance reclaimed", |s| instance(s).is_none());

    // The model is loaded again: a new instance.
    let (_lease, second) = load(&sidecar, &session);
    assert_ne!(second, first, "a new load is a new generation");
    let before = sidecar.state();
    assert_eq!(instance(&before).unwrap()["generation"], second);

    // The late command is no longer pending: its instance is gone.
    let polled = sidecar
        .get(&format!("/v1/sessions/{session}/commands?wait_ms=0"))
        .json();
    assert_eq!(polled["commands"], json!([]), "stale command dropped");

    // Its acknowledgement arrives late: refused, naming both generations; nothing changed.
    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": first, "command": command["id"]}),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "stale_instance", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("generation {first}"))
            && message.contains(&format!("generation {second}"))
            && message.contains("nothing changed"),
        "{message}"
    );
    let after = sidecar.state();
    let now = instance(&after).unwrap();
    assert_eq!(now["generation"], second);
    assert_eq!(now["state"], "loaded", "the new load is untouched: {now}");
    assert_eq!(now["leases"], 1);
    assert_eq!(after["counters"], before["counters"], "no unload counted");
    assert_eq!(after["held_bytes"], before["held_bytes"]);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"m\",reason=\"cleanup\"}"),
        None,
        "no cleanup unload counted"
    );
}

#[test]
fn a_duplicate_or_early_acknowledgement_is_refused_and_changes_nothing() {
    let sidecar = Sidecar::start(
        &pool("dups", "{ram: 1Gi}", AGGRESSIVE, &["{name: m, ram: 10Mi}"]),
        &["--heartbeat-ms", "30000", "--reclaim-timeout-ms", "60000"],
    );
    // This test process: alive, and its RSS does not fall, so the instance stays reclaiming.
    let session = open(&sidecar, std::process::id());
    let (lease, generation) = load(&sidecar, &session);

    // Leased: it cannot have been unloaded.
    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": generation}),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "not_unloadable", "{}", r.text());
    assert!(r.text().contains("1 lease(s)"), "{}", r.text());
    assert_eq!(instance(&sidecar.state()).unwrap()["state"], "loaded");

    sidecar.post("/v1/release", &json!({"session": session, "lease": lease}));
    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": generation}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let before = sidecar.state();
    assert_eq!(instance(&before).unwrap()["state"], "reclaiming");

    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": generation}),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "already_unloaded", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("reclaiming"),
        "{body}"
    );
    let after = sidecar.state();
    assert_eq!(after["counters"], before["counters"]);
    assert_eq!(instance(&after).unwrap()["state"], "reclaiming");

    // A generation that never existed, and a missing one.
    let r = sidecar.post(
        "/v1/unloaded",
        &json!({"session": session, "model": "m", "generation": generation + 100}),
    );
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"], "stale_instance");
    let r = sidecar.post("/v1/unloaded", &json!({"session": session, "model": "m"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("generation"), "{}", r.text());
}
