//! `/metrics` renders whole families of one moment: scraped in a loop during a storm of API
//! calls, a model loaded throughout is never missing and the pool's series are always there.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Sidecar, pool};
use modelpool_sidecar::client::Client;
use serde_json::json;

const AGGRESSIVE: &str =
    "{mode: Aggressive, acquireTimeout: 30s, pressure: {ramPercent: 100, vramPercent: 100}}";

/// The pid of a process that has exited: the sidecar sees an unload's memory back at once.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn scrapes_during_a_storm_of_calls_always_see_whole_families() {
    let models: Vec<String> = (0..8)
        .map(|i| format!("{{name: m{i}, ram: 1Mi}}"))
        .collect();
    let mut all: Vec<&str> = vec!["{name: steady, ram: 1Mi}"];
    all.extend(models.iter().map(String::as_str));
    let sidecar = Sidecar::start(
        &pool("storm", "{ram: 1Gi}", AGGRESSIVE, &all),
        &["--heartbeat-ms", "30000"],
    );
    let open = |pid: u32| -> String {
        let r = sidecar.post("/v1/sessions", &json!({"pid": pid}));
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["session"].as_str().unwrap().to_owned()
    };
    // `steady` is loaded and leased for the whole test.
    let holder = open(std::process::id());
    let r = sidecar.post(
        "/v1/acquire",
        &json!({"session": holder, "model": "steady"}),
    );
    assert_eq!(r.json()["decision"], "load", "{}", r.text());
    let lease = r.json()["lease"].as_str().unwrap().to_owned();
    sidecar.post(
        "/v1/loaded",
        &json!({"session": holder, "lease": lease, "ram_bytes": 1u64 << 20}),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut storm = Vec::new();
    for worker in 0..3 {
        // Each worker loads, releases (Aggressive: unload now) and reports the unload.
        let session = open(dead_pid());
        let socket = sidecar.socket.clone();
        let (stop, calls) = (Arc::clone(&stop), Arc::clone(&calls));
        storm.push(std::thread::spawn(move || {
            let api = Client::unix(&socket).with_timeout(Duration::from_secs(60));
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let model = format!("m{}", i % 8);
                i += 1;
                let r = api
                    .post("/v1/acquire", &json!({"session": session, "model": model}))
                    .unwrap();
                let body = r.json();
                let Some(lease) = body["lease"].as_str() else {
                    continue;
                };
                if body["decision"] == "load" {
                    api.post(
                        "/v1/loaded",
                        &json!({"session": session, "lease": lease, "ram_bytes": 1u64 << 20}),
                    )
                    .unwrap();
                }
                let released = api
                    .post("/v1/release", &json!({"session": session, "lease": lease}))
                    .unwrap();
                if released.json()["unload"] == true {
                    api.post(
                        "/v1/unloaded",
                        &json!({"session": session, "model": model,
                                "generation": body["generation"]}),
                    )
                    .unwrap();
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let ops = Client::tcp(&sidecar.metrics_addr).with_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let mut scrapes = 0;
    // Enough scrapes to meet many calls, bounded in time for a slow machine.
    while scrapes < 300 && started.elapsed() < Duration::from_secs(20) {
        let text = ops.get("/metrics").unwrap().text();
        for series in [
            "modelpool_model_loaded{model=\"steady\"} 1",
            "modelpool_model_leases{model=\"steady\"} 1",
            "modelpool_model_bytes{model=\"steady\",resource=\"ram\"} 1048576",
            "namespace=\"\",pool=\"storm\"} 1",
            "modelpool_ceiling_bytes{resource=\"ram\"} 1073741824",
            "modelpool_sessions 4",
        ] {
            assert!(
                text.contains(series),
                "scrape {scrapes} lacks {series:?}:\n{text}"
            );
        }
        for i in 0..8 {
            let series = format!("modelpool_model_loaded{{model=\"m{i}\"}}");
            assert!(text.contains(&series), "scrape {scrapes} lacks {series}");
        }
        scrapes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for thread in storm {
        thread.join().unwrap();
    }
    assert!(scrapes >= 20, "only {scrapes} scrapes");
    assert!(
        calls.load(Ordering::Relaxed) >= 20,
        "the storm made only {} calls",
        calls.load(Ordering::Relaxed)
    );
}
