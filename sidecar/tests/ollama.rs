//! The `Ollama` driver against a real Ollama (v0.17.4, built from its pinned Go module by
//! `scripts/servers.sh ollama`, or `MODELPOOL_OLLAMA_DIR`) serving tiny llama GGUFs written by
//! `tests/servers/ollama/tiny_gguf.py` in the script's venv (one per model, different seeds:
//! Ollama shares one runner between names of one blob).
//! Each loaded model is a runner child process of `ollama serve`; the sidecar finds the server
//! as the owner of its port (no `processMatch`: the fallback) and proves unloads on the tree.
//!
//! Every wait polls a condition with a generous deadline, except the one the issue sets: after
//! the server is killed, the ledger is right within 5 s.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    MIB, Sidecar, held_ram,
    ollama::Ollama,
    server::{NO_PRESSURE, acquire, load_through_sidecar, loaded, open_session, states},
};
use modelpool_sidecar::client::Client;

fn sidecar_for(server: &Ollama, limits: &str, policy: &str, models: &[&str]) -> Sidecar {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    let yaml = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: ollama}}\nspec:\n  driver: {{kind: Ollama, url: \"{}\"}}\n  limits: {limits}\n  policy: {policy}\n  models:\n{models}",
        server.url(),
    );
    let sidecar = Sidecar::start(&yaml, &["--heartbeat-ms", "600000", "--tick-ms", "200"]);
    sidecar.wait_state("the sidecar to find and poll the server", |s| {
        s["server"]["up"] == true && s["server"]["pid"] == server.pid()
    });
    assert_eq!(sidecar.state()["server"]["found_by"], "port");
    sidecar
}

/// Load through Ollama's API with the server's own size reading, unload at the idle TTL
/// proven on the server's process tree (the runner exits), a refusal with the numbers, a
/// model Ollama dropped leaving the ledger, and models loaded behind the sidecar's back:
/// adopted when they fit, unloaded when they do not.
#[test]
fn ollama_driver_keeps_the_ledger_equal_to_ollama() {
    let server = Ollama::start(&["p", "a", "c", "big"]);
    let sidecar = sidecar_for(
        &server,
        "{ram: 256Mi}",
        &format!("{{mode: Cache, idleTTL: 3s, {NO_PRESSURE}}}"),
        &[
            "{name: p, ram: 64Mi, pinned: true}",
            "{name: a, ram: 64Mi}",
            "{name: c, ram: 64Mi}",
            "{name: big, ram: 200Mi}",
        ],
    );
    let session = open_session(&sidecar);

    // Load: the sidecar calls Ollama with keep_alive -1; Ollama's own size is reported.
    load_through_sidecar(&sidecar, &session, "a");
    assert!(server.holds("a"), "{:?}", server.ps());
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a"]));
    let a = &Sidecar::instances(&state, "a")[0];
    let reported = a["reported_by_app"]["ram"].as_u64().unwrap();
    assert!(reported > MIB, "Ollama's size of a: {a}");
    assert_eq!(held_ram(&state), 64 * MIB);

    // Idle past the TTL: unloaded through Ollama, proven on its process tree.
    let state = sidecar.wait_state("a unloaded at the idle TTL", |s| {
        s["models"].as_array().unwrap().is_empty()
    });
    assert!(!server.holds("a"));
    assert_eq!(state["server"]["reclaims"]["proc"], 1, "{state}");
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"a\",reason=\"idle_ttl\"}"),
        Some(1.0)
    );

    // A refusal with the numbers: big can never fit beside the pinned model.
    load_through_sidecar(&sidecar, &session, "p");
    let r = acquire(&sidecar, &session, "big");
    assert_eq!(r.status, 409, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(
            "needs 200.0 MiB of ram, above the ceiling of 256.0 MiB less 64.0 MiB held by pinned models"
        ),
        "{message}"
    );

    // Ollama drops a model (a client asked keep_alive 0): it leaves the ledger.
    load_through_sidecar(&sidecar, &session, "c");
    server.unload("c");
    let state = sidecar.wait_state("c to leave the ledger", |s| states(s) == loaded(&["p"]));
    assert_eq!(held_ram(&state), 64 * MIB);
    assert_eq!(state["server"]["dropped"], 1);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"c\",reason=\"server_dropped\"}"),
        Some(1.0)
    );

    // Loaded behind the sidecar's back: adopted and counted, with Ollama's size.
    server.load("a");
    let state = sidecar.wait_state("a adopted", |s| states(s) == loaded(&["a", "p"]));
    assert_eq!(held_ram(&state), 128 * MIB);
    assert_eq!(state["server"]["adopted"], 1);
    load_through_sidecar(&sidecar, &session, "a");
    assert_eq!(held_ram(&sidecar.state()), 128 * MIB);

    // Loaded behind the sidecar's back and above the ceiling: unloaded from Ollama.
    server.load("big");
    sidecar.wait_until("big unloaded from Ollama", |_| !server.holds("big"));
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a", "p"]));
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"big\",reason=\"ceiling\"}"),
        Some(1.0)
    );
}

/// Ollama killed with SIGKILL: within 5 s the ledger holds nothing of it, the sidecar is not
/// ready and refuses acquires with the reason; restarted, what it loads is counted once.
#[test]
fn ollama_killed_and_restarted() {
    let mut server = Ollama::start(&["a", "b"]);
    let sidecar = sidecar_for(
        &server,
        "{ram: 1Gi}",
        &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    let session = open_session(&sidecar);
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    assert_eq!(held_ram(&sidecar.state()), 128 * MIB);

    let old_pid = server.pid();
    server.kill9();
    let killed = Instant::now();
    let state = sidecar.wait_state("the ledger to drop what Ollama held", |s| {
        s["models"].as_array().unwrap().is_empty()
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the ledger took {took:?} to be right after the kill"
    );
    assert_eq!(held_ram(&state), 0);
    sidecar.wait_until("readyz to report the server down", |s| {
        Client::tcp(s.metrics_addr.clone())
            .get("/readyz")
            .is_ok_and(|r| r.status == 503)
    });
    assert_eq!(
        sidecar.metric("modelpool_server_up{driver=\"Ollama\"}"),
        Some(0.0)
    );
    let r = acquire(&sidecar, &session, "a");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("does not answer"), "{}", r.text());

    server.spawn();
    let restarted = Instant::now();
    sidecar.wait_state("the restarted server polled", |s| {
        s["server"]["up"] == true && s["server"]["pid"] == server.pid()
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "the sidecar took {:?} to see the restarted server",
        restarted.elapsed()
    );
    assert_ne!(server.pid(), old_pid);
    server.load("a");
    sidecar.wait_state("a adopted", |s| states(s) == loaded(&["a"]));
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a", "b"]));
    assert_eq!(held_ram(&state), 128 * MIB);
}
