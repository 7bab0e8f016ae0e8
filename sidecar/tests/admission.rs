//! Admission and eviction against the real sidecar, with app processes that hold real memory:
//! loads within ceilings, refusals with the numbers, eviction for room, Aggressive vs Cache,
//! pressure, cleanup and check.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{Hog, MIB, Sidecar, assert_near, held_ram, pool};
use serde_json::json;

const NO_PRESSURE: &str = "pressure: {ramPercent: 100, vramPercent: 100}";

/// Loads that fit the ceiling are admitted (`load`, then `use` for the holder), and the ledger
/// holds what the app measured.
#[test]
fn loads_within_ceilings_are_admitted() {
    let sidecar = Sidecar::start(
        &pool(
            "fit",
            "{ram: 300Mi}",
            &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}", "{name: b, ram: 100Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let a = hog.acquire("a", 100, "load");
    let b = hog.acquire("b", 100, "load");
    let state = sidecar.state();
    assert_near(&state["held_bytes"]["ram"], 200 * MIB, "held");
    assert_eq!(state["ceiling_bytes"]["ram"], 300 * MIB);
    assert!(!hog.release(&a), "Cache mode keeps the model");
    // The holder acquiring again uses what it holds.
    let again = hog.acquire("a", 100, "use");
    assert!(!hog.release(&again));
    assert!(!hog.release(&b));
    let state = sidecar.state();
    for model in ["a", "b"] {
        let instance = &Sidecar::instances(&state, model)[0];
        assert_eq!(instance["state"], "loaded");
        assert_eq!(instance["leases"], 0);
        assert_eq!(instance["session"], hog.session.as_str());
        assert_eq!(instance["pid"], hog.pid);
    }
    assert_eq!(
        sidecar.metric("modelpool_loads_total{model=\"a\",outcome=\"ok\"}"),
        Some(1.0)
    );
    let pool_bytes = sidecar
        .metric("modelpool_pool_bytes{resource=\"ram\"}")
        .unwrap();
    assert_near(&json!(pool_bytes as u64), 200 * MIB, "modelpool_pool_bytes");
}

/// A model that can never fit (the ceiling less what pinned models hold) is refused at once,
/// and the message names the model, its need, the ceiling and what holds the rest.
#[test]
fn over_ceiling_acquire_is_refused_with_the_numbers() {
    let sidecar = Sidecar::start(
        &pool(
            "tight",
            "{ram: 300Mi}",
            &format!("{{mode: Aggressive, acquireTimeout: 2s, {NO_PRESSURE}}}"),
            &[
                "{name: tok, ram: 100Mi, pinned: true}",
                "{name: big, ram: 250Mi}",
            ],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    hog.acquire("tok", 100, "load");
    let reply = hog.send("acquire big 250");
    assert_eq!(reply["status"], 409, "{reply}");
    let body = &reply["body"];
    assert_eq!(body["error"], "refused");
    assert_eq!(body["decision"], "refuse");
    assert_eq!(body["reason"], "exceeds_ceiling");
    assert_eq!(body["need_bytes"]["ram"], 250 * MIB);
    assert_eq!(body["ceiling_bytes"]["ram"], 300 * MIB);
    assert_near(&body["held_bytes"]["ram"], 100 * MIB, "held");
    assert_eq!(body["holders"][0]["model"], "tok");
    let message = body["message"].as_str().unwrap();
    // What the pinned model holds is measured (100 MiB plus the app's allocator noise): the
    // message must carry the same figure as held_bytes.
    let held = modelpool_policy::human_bytes(body["held_bytes"]["ram"].as_u64().unwrap());
    for needle in [
        "\"big\"",
        "250.0 MiB",
        "300.0 MiB",
        "tok",
        held.as_str(),
        "pinned",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from {message:?}"
        );
    }
    assert_eq!(
        sidecar.metric("modelpool_acquires_refused_total{reason=\"exceeds_ceiling\"}"),
        Some(1.0)
    );
}

/// A model that fits once leases end waits, then is refused at acquireTimeout naming the
/// leased holders; `"wait": false` answers `wait` at once.
#[test]
fn acquire_waits_then_times_out_naming_the_holders() {
    let sidecar = Sidecar::start(
        &pool(
            "busy",
            "{ram: 250Mi}",
            &format!("{{mode: Aggressive, acquireTimeout: 2s, {NO_PRESSURE}}}"),
            &["{name: a, ram: 150Mi}", "{name: b, ram: 150Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let _lease = hog.acquire("a", 150, "load");
    let reply = hog.send("acquire b 150 nowait");
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["body"]["decision"], "wait");
    assert!(
        reply["body"]["message"]
            .as_str()
            .unwrap()
            .contains("250.0 MiB")
    );
    let reply = hog.send("acquire b 150");
    assert_eq!(reply["status"], 409, "{reply}");
    assert_eq!(reply["body"]["reason"], "timeout");
    let message = reply["body"]["message"].as_str().unwrap();
    assert!(
        message.contains("a (150.0 MiB loaded, 1 lease)"),
        "{message}"
    );
    assert_eq!(sidecar.state()["queue"], 0);
}

/// Room for a new model is made by evicting idle ones (least recently used first), each
/// unload proven by the app's RSS falling before the new load is admitted.
#[test]
fn idle_models_are_evicted_to_make_room() {
    let sidecar = Sidecar::start(
        &pool(
            "evict",
            "{ram: 260Mi}",
            &format!("{{mode: Cache, idleTTL: 10m, eviction: Lru, {NO_PRESSURE}}}"),
            &[
                "{name: a, ram: 100Mi}",
                "{name: b, ram: 100Mi}",
                "{name: c, ram: 150Mi}",
            ],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let a = hog.acquire("a", 100, "load");
    hog.release(&a);
    let b = hog.acquire("b", 100, "load");
    hog.release(&b);
    // c needs 150 MiB; 60 MiB is free: evicting a (least recently used) makes room.
    let c = hog.acquire("c", 150, "load");
    let event = hog.wait_unloaded("a");
    assert_eq!(event["reason"], "evicted");
    assert!(!hog.saw_unload("b"), "only as much as needed is evicted");
    let state = sidecar.state();
    assert!(Sidecar::instances(&state, "a").is_empty(), "{state}");
    assert_near(&state["held_bytes"]["ram"], 250 * MIB, "held");
    hog.release(&c);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"a\",reason=\"evicted\"}"),
        Some(1.0)
    );
    let reclaims = sidecar
        .metric("modelpool_reclaim_duration_seconds_count")
        .unwrap();
    assert!(reclaims >= 1.0);
}

/// Aggressive mode unloads at the last release (the release says so and the command stream
/// repeats it); Cache mode keeps the model until it has been idle for idleTTL.
#[test]
fn aggressive_unloads_at_release_cache_waits_for_the_ttl() {
    let aggressive = Sidecar::start(
        &pool(
            "aggr",
            "{ram: 1Gi}",
            &format!("{{mode: Aggressive, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&aggressive);
    let first = hog.acquire("a", 100, "load");
    let second = hog.acquire("a", 100, "use");
    assert!(!hog.release(&first), "a lease is still live");
    assert!(
        hog.release(&second),
        "last release in Aggressive mode unloads"
    );
    let event = hog.wait_unloaded("a");
    assert_eq!(event["reason"], "released");
    aggressive.wait_state("a reclaimed", |s| held_ram(s) == 0);

    let cache = Sidecar::start(
        &pool(
            "cache",
            "{ram: 1Gi}",
            &format!("{{mode: Cache, idleTTL: 1s, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&cache);
    let lease = hog.acquire("a", 100, "load");
    assert!(!hog.release(&lease), "Cache mode keeps it");
    let state = cache.state();
    assert_eq!(
        Sidecar::instances(&state, "a")[0]["state"],
        "loaded",
        "{state}"
    );
    let event = hog.wait_unloaded("a");
    assert_eq!(event["reason"], "idle_ttl");
    cache.wait_state("a reclaimed", |s| held_ram(s) == 0);
}

/// Device VRAM above the pressure threshold (here from the app's own readings: no GPU on the
/// test machine) evicts idle models; leased ones stay.
#[test]
fn pressure_evicts_idle_models() {
    let sidecar = Sidecar::start(
        &pool(
            "pressure",
            "{vram: 10Gi, ram: 1Gi}",
            "{mode: Cache, idleTTL: 10m, pressure: {vramPercent: 50, ramPercent: 100}}",
            &[
                "{name: idle, vram: 2Gi, ram: 10Mi}",
                "{name: busy, vram: 2Gi, ram: 10Mi}",
            ],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let reply = hog.send("acquire idle 10 vram=2048");
    let lease = reply["body"]["lease"].as_str().unwrap().to_owned();
    hog.release(&lease);
    let reply = hog.send("acquire busy 10 vram=2048");
    assert_eq!(reply["body"]["decision"], "load");
    // 95 of 100 GiB used on the device: above 50 %.
    let reply = hog.send(&format!("readings {} {}", 95u64 << 30, 100u64 << 30));
    assert_eq!(reply["status"], 200);
    let event = hog.wait_unloaded("idle");
    assert_eq!(event["reason"], "pressure");
    let state = sidecar.wait_state("idle reclaimed", |s| {
        Sidecar::instances(s, "idle").is_empty()
    });
    assert_eq!(Sidecar::instances(&state, "busy")[0]["leases"], 1);
    assert_eq!(state["gpu"]["up"], true, "{state}");
    assert_eq!(state["sources"]["vram"], "app:torch");
    assert!(!hog.saw_unload("busy"));
}

/// Cleanup unloads idle models, leaves leased ones, and only `force` takes pinned ones;
/// check counts what eviction could free.
#[test]
fn cleanup_and_check() {
    let sidecar = Sidecar::start(
        &pool(
            "clean",
            "{ram: 400Mi}",
            &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
            &[
                "{name: pin, ram: 50Mi, pinned: true}",
                "{name: idle, ram: 100Mi}",
                "{name: busy, ram: 100Mi}",
            ],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let pin = hog.acquire("pin", 50, "load");
    hog.release(&pin);
    let idle = hog.acquire("idle", 100, "load");
    hog.release(&idle);
    let _busy = hog.acquire("busy", 100, "load");

    let check = sidecar
        .get(&format!("/v1/check?ram_bytes={}", 200 * MIB))
        .json();
    assert_eq!(check["available"], true, "{check}");
    assert_near(&check["reclaimable"]["ram"], 100 * MIB, "reclaimable");
    assert_near(&check["free"]["ram"], 150 * MIB, "free");
    let check = sidecar
        .get(&format!("/v1/check?ram_bytes={}", 300 * MIB))
        .json();
    assert_eq!(check["available"], false, "{check}");

    let answer = sidecar.post("/v1/cleanup", &json!({"force": false})).json();
    assert_eq!(
        answer["unloading"],
        json!([{"session": hog.session, "model": "idle"}])
    );
    assert_eq!(answer["skipped_leased"], json!(["busy"]));
    assert_eq!(hog.wait_unloaded("idle")["reason"], "cleanup");
    sidecar.wait_state("idle reclaimed", |s| {
        Sidecar::instances(s, "idle").is_empty()
    });

    let answer = sidecar.post("/v1/cleanup", &json!({"force": true})).json();
    assert_eq!(
        answer["unloading"],
        json!([{"session": hog.session, "model": "pin"}])
    );
    hog.wait_unloaded("pin");
    let state = sidecar.wait_state("pin reclaimed", |s| Sidecar::instances(s, "pin").is_empty());
    assert_near(&state["held_bytes"]["ram"], 100 * MIB, "held");
    assert_eq!(Sidecar::instances(&state, "busy")[0]["leases"], 1);
}

/// The `Http` driver: the sidecar itself calls the app's load/unload URLs, answers `use`, and
/// unloads through the app's API at the last release (Aggressive).
#[test]
fn http_driver_loads_and_unloads_through_the_app() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut app = std::process::Command::new(env!("CARGO_BIN_EXE_modelpool-memhog"))
        .args([
            "--serve-http",
            &format!("127.0.0.1:{port}"),
            "--size",
            "a=64",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let yaml = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: http}}\nspec:\n  driver: {{kind: Http, url: \"http://127.0.0.1:{port}\"}}\n  limits: {{ram: 1Gi}}\n  policy: {{mode: Aggressive, {NO_PRESSURE}}}\n  models:\n  - {{name: a, ram: 64Mi}}\n"
    );
    let sidecar = Sidecar::start(&yaml, &[]);
    let client = sidecar.client();
    let session = client
        .post(
            "/v1/sessions",
            &json!({"pid": std::process::id(), "app": "router"}),
        )
        .unwrap()
        .json()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    // The app server may still be starting: retry while the driver cannot connect.
    let mut answer = serde_json::Value::Null;
    sidecar.wait_until("the Http driver's load", |s| {
        let r = s
            .client()
            .post("/v1/acquire", &json!({"session": session, "model": "a"}))
            .unwrap();
        answer = r.json();
        r.status == 200
    });
    assert_eq!(answer["decision"], "use", "{answer}");
    let state = sidecar.state();
    let instance = &Sidecar::instances(&state, "a")[0];
    assert_eq!(instance["session"], "app");
    assert_eq!(instance["reported_by_app"]["ram"], 64 * MIB);
    let release = client
        .post(
            "/v1/release",
            &json!({"session": session, "lease": answer["lease"]}),
        )
        .unwrap()
        .json();
    assert_eq!(
        release["unload"], false,
        "the sidecar unloads, not the client"
    );
    sidecar.wait_state("a unloaded through the app", |s| held_ram(s) == 0);
    let _ = app.kill();
    let _ = app.wait();
}

/// A load measured above the ceiling (the app used more than declared) counts a ceiling
/// breach; once idle, the model is evicted with reason `ceiling` (enforcement Evict).
#[test]
fn measured_usage_above_the_ceiling_is_a_breach_and_evicted() {
    let sidecar = Sidecar::start(
        &pool(
            "breach",
            "{ram: 150Mi}",
            &format!("{{mode: Cache, idleTTL: 10m, enforcement: Evict, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let lease = hog.acquire("a", 200, "load");
    sidecar.wait_until("the breach to be counted", |s| {
        s.metric("modelpool_ceiling_breaches_total{resource=\"ram\"}") == Some(1.0)
    });
    assert!(!hog.saw_unload("a"), "leased: never evicted");
    hog.release(&lease);
    assert_eq!(hog.wait_unloaded("a")["reason"], "ceiling");
    sidecar.wait_state("a reclaimed", |s| held_ram(s) == 0);
}

/// A pool filled to its ceiling by real loads: each app's measured RSS growth is the model
/// plus a few pages of allocator noise, and that noise must not put the accounted total over
/// the ceiling (it did by 16 KiB, counted as a breach, under many clients).
#[test]
fn a_pool_filled_to_its_ceiling_by_real_loads_stays_within_it() {
    let models: Vec<String> = (0..4)
        .map(|i| format!("{{name: m{i}, ram: 10Mi}}"))
        .collect();
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    let sidecar = Sidecar::start(
        &pool(
            "full",
            "{ram: 40Mi}",
            &format!("{{mode: Cache, idleTTL: 1h, {NO_PRESSURE}}}"),
            &models,
        ),
        &[],
    );
    let mut hogs: Vec<Hog> = (0..4).map(|_| Hog::start(&sidecar)).collect();
    for (i, hog) in hogs.iter_mut().enumerate() {
        hog.acquire(&format!("m{i}"), 10, "load");
    }
    let state = sidecar.state();
    assert!(held_ram(&state) <= 40 * MIB, "over the ceiling: {state}");
    assert_eq!(state["counters"]["ceiling_breaches"], json!({}), "{state}");
    assert_eq!(
        sidecar
            .metric("modelpool_ceiling_breaches_total{resource=\"ram\"}")
            .unwrap_or(0.0),
        0.0
    );
}

/// Sizes learned by measuring loads survive a restart (standalone: the learned file beside
/// the pool file, here given with `--learned-file`): a model declared at 10 MiB that measured
/// 40 MiB is refused by the restarted sidecar under a 35 MiB ceiling, with the learned size.
/// Without the file the restarted sidecar would admit it on its declared 10 MiB.
#[test]
fn a_restarted_sidecar_admits_with_the_sizes_it_learned_before() {
    let keep = tempfile::tempdir().unwrap();
    let learned = keep.path().join("learned.json");
    let flag = learned.to_str().unwrap();
    let yaml = pool(
        "learn",
        "{ram: 35Mi}",
        &format!("{{mode: Aggressive, {NO_PRESSURE}}}"),
        &["{name: a, ram: 10Mi}"],
    );
    {
        let sidecar = Sidecar::start(&yaml, &["--learned-file", flag]);
        let mut hog = Hog::start(&sidecar);
        let lease = hog.acquire("a", 40, "load");
        assert!(hog.release(&lease), "Aggressive: unloaded at release");
        hog.wait_unloaded("a");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let written = std::fs::read(&learned)
                .ok()
                .and_then(|bytes| modelpool_sidecar::learned::parse(&bytes).ok());
            if written.is_some_and(|m| m.get("a").is_some_and(|a| a.peak.ram >= 39 * MIB)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the learned file never held a's 40 MiB"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    let sidecar = Sidecar::start(&yaml, &["--learned-file", flag]);
    sidecar.wait_log(
        |l| {
            l.contains("sizes learned before the restart restored")
                .then_some(())
        },
        "the restore to be logged",
    );
    let mut hog = Hog::start(&sidecar);
    let reply = hog.send("acquire a 40");
    assert_eq!(reply["status"], 409, "{reply}");
    assert_eq!(reply["body"]["reason"], "exceeds_ceiling", "{reply}");
    let need = reply["body"]["need_bytes"]["ram"].as_u64().unwrap();
    assert!(
        need >= 39 * MIB,
        "the learned size, not the declared 10 MiB: {reply}"
    );
}

/// A model with no size (nothing declared, no source) is admitted only alone until a load of
/// it is measured (`unsizedModels: Alone`, the default): the idle model beside it is evicted
/// first, nothing is admitted beside it while it is unmeasured; once measured, its measured
/// size counts. With `unsizedModels: Refuse` its acquire is refused, saying what to declare.
#[test]
fn a_model_of_unknown_size_loads_alone_or_is_refused() {
    let sidecar = Sidecar::start(
        &pool(
            "unsized",
            "{ram: 300Mi}",
            &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}", "{name: mystery}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&sidecar);
    let a = hog.acquire("a", 100, "load");
    hog.release(&a);
    // Unknown: it needs the whole 300 MiB, so the idle a is evicted before it loads (it
    // really takes 80 MiB, which the sidecar measures).
    let mystery = hog.acquire("mystery", 80, "load");
    assert_eq!(hog.wait_unloaded("a")["reason"], "evicted");
    hog.release(&mystery);
    // Measured now: a (100 MiB) fits beside it (80 MiB) under 300 MiB.
    let state = sidecar.state();
    assert_near(
        &state["held_bytes"]["ram"],
        80 * MIB,
        "held after the measured load",
    );
    let a = hog.acquire("a", 100, "load");
    assert!(!hog.saw_unload("mystery"), "measured: loaded beside a");
    hog.release(&a);

    let refusing = Sidecar::start(
        &pool(
            "unsized-refuse",
            "{ram: 300Mi}",
            &format!("{{mode: Cache, unsizedModels: Refuse, {NO_PRESSURE}}}"),
            &["{name: a, ram: 100Mi}", "{name: mystery}"],
        ),
        &[],
    );
    let mut hog = Hog::start(&refusing);
    let reply = hog.send("acquire mystery 80");
    assert_eq!(reply["status"], 409, "{reply}");
    assert_eq!(reply["body"]["reason"], "unsized", "{reply}");
    let message = reply["body"]["message"].as_str().unwrap();
    for needle in [
        "\"mystery\"",
        "no known size",
        "unsizedModels: Refuse",
        "vram/ram",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from {message:?}"
        );
    }
    assert_eq!(
        refusing.metric("modelpool_acquires_refused_total{reason=\"unsized\"}"),
        Some(1.0)
    );
    hog.acquire("a", 100, "load");
}
