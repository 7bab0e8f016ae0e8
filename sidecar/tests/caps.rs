//! A hostile client against the sidecar's caps (issue 15): the number of sessions, the size of
//! every name and list it sends, and what that leaves `/v1/state` to carry.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{sync::Arc, time::Instant};

use common::{Sidecar, pool};
use serde_json::{Value, json};

const POLICY: &str =
    "{mode: Cache, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}";

fn start() -> Sidecar {
    Sidecar::start(
        &pool(
            "caps",
            "{ram: 1Gi}",
            POLICY,
            &["{name: a, ram: 1Mi}", "{name: b, ram: 1Mi}"],
        ),
        // Sessions live for a minute without heartbeats: the cap, not the timeout, bounds them.
        &["--max-sessions", "8", "--heartbeat-ms", "30000"],
    )
}

fn refusal(r: &modelpool_sidecar::client::Response, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], code, "{body}");
    body["message"].as_str().unwrap().to_owned()
}

/// Sessions beyond `--max-sessions` are refused with 429 `too_many_sessions` naming the
/// limit, also when 32 clients open them at once; a closed session makes room again. Before
/// issue 15 nothing bounded them.
#[test]
fn sessions_beyond_the_cap_are_refused_naming_the_limit() {
    let sidecar = Arc::new(start());
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let sidecar = Arc::clone(&sidecar);
            std::thread::spawn(move || {
                sidecar
                    .post(
                        "/v1/sessions",
                        &json!({"pid": std::process::id(), "app": "flood", "models": ["a", "b"]}),
                    )
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        8,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        24,
        "{statuses:?}"
    );
    let state = sidecar.state();
    assert_eq!(state["sessions"].as_array().unwrap().len(), 8);

    let r = sidecar.post("/v1/sessions", &json!({"pid": std::process::id()}));
    let message = refusal(&r, 429, "too_many_sessions");
    assert!(
        message.contains("--max-sessions") && message.contains('8'),
        "{message}"
    );
    assert_eq!(r.json()["limit"], 8);

    let first = state["sessions"][0]["session"].as_str().unwrap().to_owned();
    let r = sidecar
        .client()
        .request("DELETE", &format!("/v1/sessions/{first}"), None)
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    let r = sidecar.post("/v1/sessions", &json!({"pid": std::process::id()}));
    assert_eq!(r.status, 201, "room after a close: {}", r.text());
}

/// Every name and list a client sends has a size limit, and a refusal names the field, its
/// size and the limit; `/v1/state` with the hostile client at every cap stays small. Before
/// issue 15 a 60 000-byte model name came back twice in a 120 KB error, and an `app` name,
/// a heartbeat's `source` or a session's `models` list could be as long as the 64 KiB body.
#[test]
fn oversized_names_and_lists_are_refused_and_state_stays_small() {
    let sidecar = start();
    let pid = std::process::id();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/sessions",
            json!({"pid": pid, "app": "x".repeat(300)}),
            "app",
        ),
        (
            "/v1/sessions",
            json!({"pid": pid, "models": ["z".repeat(60_000)]}),
            "models[0]",
        ),
        (
            "/v1/sessions",
            json!({"pid": pid, "models": vec!["a"; 3000]}),
            "models",
        ),
        (
            "/v1/sessions",
            json!({"pid": pid, "holds": [{"model": "a"}, {"model": "a"}]}),
            "holds[1].model",
        ),
        (
            "/v1/acquire",
            json!({"session": "s".repeat(60_000), "model": "a"}),
            "session",
        ),
        (
            "/v1/acquire",
            json!({"session": "s-1", "model": "m".repeat(64)}),
            "model",
        ),
        (
            "/v1/release",
            json!({"session": "s-1", "lease": "l".repeat(65)}),
            "lease",
        ),
        (
            "/v1/unloaded",
            json!({"session": "s-1", "model": "m".repeat(100), "generation": 1}),
            "model",
        ),
    ];
    for (path, body, field) in &cases {
        let r = sidecar.post(path, body);
        let message = refusal(&r, 400, "bad_request");
        assert_eq!(r.json()["field"], *field, "{path}: {message}");
        assert!(
            message.contains("over the limit") || message.contains("twice"),
            "{message}"
        );
        assert!(r.body.len() < 1024, "{path}: a {} byte error", r.body.len());
    }
    let long_path = format!("/v1/sessions/{}/commands?wait_ms=0", "s".repeat(7000));
    let message = refusal(&sidecar.get(&long_path), 400, "bad_request");
    assert!(message.contains("7000 bytes"), "{message}");

    // A real session: its heartbeat's `source` is capped, a failed load's error text is cut.
    let r = sidecar.post(
        "/v1/sessions",
        &json!({"pid": pid, "app": "h".repeat(256), "models": ["a", "b"]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let session = r.json()["session"].as_str().unwrap().to_owned();
    let r = sidecar.post(
        &format!("/v1/sessions/{session}/heartbeat"),
        &json!({"readings": {"source": "q".repeat(100), "process_vram_bytes": 1}}),
    );
    assert!(refusal(&r, 400, "bad_request").contains("readings.source"));
    let r = sidecar.post("/v1/acquire", &json!({"session": session, "model": "a"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let lease = r.json()["lease"].as_str().unwrap().to_owned();
    let r = sidecar.post(
        "/v1/loaded",
        &json!({"session": session, "lease": lease, "ok": false, "error": "e".repeat(60_000)}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let logged = sidecar.wait_log(
        |l| l.contains("[cut at 1024 bytes]").then_some(l.len()),
        "the cut load error in the logs",
    );
    assert!(logged < 4096, "a {logged} byte log line");

    // The hostile client fills every session with the longest names and lists allowed.
    loop {
        let r = sidecar.post(
            "/v1/sessions",
            &json!({"pid": pid, "app": "h".repeat(256), "models": ["a", "b"]}),
        );
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..21 {
        let started = Instant::now();
        let r = sidecar.get("/v1/state");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200);
        size = r.body.len();
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "/v1/state at the caps: {size} bytes, median {:.2} ms",
        times[10]
    );
    // 8 sessions of 256-byte app names and 2 models: a few KiB (bound: 64 KiB).
    assert!(size < 64 * 1024, "/v1/state is {size} bytes");
}
