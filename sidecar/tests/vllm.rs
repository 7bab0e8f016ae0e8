//! The `Vllm` driver against a STAND-IN for vLLM (`tests/servers/vllm/standin.py`, which says
//! so at its top): vLLM cannot run on these machines (see DEPENDENCIES), so the stand-in follows
//! the sleep-mode endpoints vLLM documents (`POST /sleep?level=`, `POST /wake_up`,
//! `GET /is_sleeping`) and holds its "weights" as resident memory while awake. One stand-in per
//! model, as with vLLM; the sidecar finds them all by their command line and proves each sleep
//! on their process trees' RSS.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    MIB, PATIENCE, Sidecar, held_ram,
    server::{
        NO_PRESSURE, acquire, free_port, kill_group, load_through_sidecar, loaded, open_session,
        repo_root, states,
    },
};
use modelpool_sidecar::client::Client;

/// One stand-in vLLM server per model, started from a copy of the script in a folder of this
/// test's own (its path in the command line finds these servers and no other test's).
struct Standins {
    dir: tempfile::TempDir,
    servers: BTreeMap<String, (u16, u64, Option<Child>)>,
}

impl Standins {
    fn start(models: &[(&str, u64)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            repo_root().join("tests/servers/vllm/standin.py"),
            dir.path().join("standin.py"),
        )
        .unwrap();
        let mut standins = Self {
            dir,
            servers: models
                .iter()
                .map(|(m, mib)| ((*m).to_owned(), (free_port(), *mib, None)))
                .collect(),
        };
        for (model, _) in models {
            standins.spawn(model);
        }
        standins
    }

    fn spawn(&mut self, model: &str) {
        let script = self.dir.path().join("standin.py");
        let (port, mib, child) = self.servers.get_mut(model).unwrap();
        *child = Some(
            Command::new("python3")
                .arg(&script)
                .args(["--port", &port.to_string(), "--model", model])
                .args(["--mib", &mib.to_string()])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let client = self.client(model);
        let deadline = Instant::now() + PATIENCE;
        while !client.get("/health").is_ok_and(|r| r.status == 200) {
            assert!(
                Instant::now() < deadline,
                "the stand-in for {model} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self, model: &str) -> Client {
        Client::tcp(format!("127.0.0.1:{}", self.servers[model].0))
            .with_timeout(Duration::from_secs(30))
    }

    fn process_match(&self) -> String {
        self.dir.path().join("standin.py").display().to_string()
    }

    fn servers_yaml(&self) -> String {
        let entries: Vec<String> = self
            .servers
            .iter()
            .map(|(m, (port, ..))| format!("{m}: \"http://127.0.0.1:{port}\""))
            .collect();
        format!("{{{}}}", entries.join(", "))
    }

    fn post(&self, model: &str, path: &str) {
        let r = self
            .client(model)
            .post(path, &serde_json::json!({}))
            .unwrap();
        assert_eq!(r.status, 200, "{model} {path}: {}", r.text());
    }

    fn sleeping(&self, model: &str) -> bool {
        self.client(model).get("/is_sleeping").unwrap().json()["is_sleeping"] == true
    }

    fn kill9(&mut self, model: &str) {
        if let Some(mut child) = self.servers.get_mut(model).unwrap().2.take() {
            kill_group(child.id());
            let _ = child.wait();
        }
    }
}

impl Drop for Standins {
    fn drop(&mut self) {
        let models: Vec<String> = self.servers.keys().cloned().collect();
        for model in models {
            self.kill9(&model);
        }
    }
}

fn sidecar_for(standins: &Standins, limits: &str, policy: &str, models: &[&str]) -> Sidecar {
    sidecar_with(standins, limits, policy, models, &[])
}

fn sidecar_with(
    standins: &Standins,
    limits: &str,
    policy: &str,
    models: &[&str],
    extra: &[&str],
) -> Sidecar {
    sidecar_at_level(standins, 2, limits, policy, models, extra)
}

fn sidecar_at_level(
    standins: &Standins,
    level: u8,
    limits: &str,
    policy: &str,
    models: &[&str],
    extra: &[&str],
) -> Sidecar {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    let yaml = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: vllm}}\nspec:\n  driver: {{kind: Vllm, sleepLevel: {level}, servers: {}, processMatch: \"{}\"}}\n  limits: {limits}\n  policy: {policy}\n  models:\n{models}",
        standins.servers_yaml(),
        standins.process_match()
    );
    let mut args = vec!["--heartbeat-ms", "600000", "--tick-ms", "200"];
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start(&yaml, &args);
    sidecar.wait_state("the sidecar to poll the servers", |s| {
        s["server"]["up"] == true && s["server"]["pid"].is_u64()
    });
    sidecar
}

/// Wake-up through the sidecar, sleep (level 2) at the idle TTL proven on the servers' RSS, a
/// refusal with the numbers, a model put to sleep behind the sidecar's back leaving the ledger,
/// and servers woken behind its back: adopted when they fit, put back to sleep when they do not.
#[test]
fn vllm_driver_keeps_the_ledger_equal_to_the_servers() {
    let standins = Standins::start(&[("p", 64), ("a", 96), ("c", 64), ("big", 8)]);
    // vLLM starts awake: put every server to sleep first, so the ledger starts empty.
    for model in ["p", "a", "c", "big"] {
        standins.post(model, "/sleep?level=2");
    }
    let sidecar = sidecar_for(
        &standins,
        "{ram: 400Mi}",
        &format!("{{mode: Cache, idleTTL: 3s, {NO_PRESSURE}}}"),
        &[
            "{name: p, ram: 64Mi, pinned: true}",
            "{name: a, ram: 96Mi}",
            "{name: c, ram: 64Mi}",
            "{name: big, ram: 350Mi}",
        ],
    );
    assert!(sidecar.state()["models"].as_array().unwrap().is_empty());
    let session = open_session(&sidecar);

    load_through_sidecar(&sidecar, &session, "a");
    assert!(!standins.sleeping("a"));
    assert_eq!(held_ram(&sidecar.state()), 96 * MIB);

    let state = sidecar.wait_state("a put to sleep at the idle TTL", |s| {
        s["models"].as_array().unwrap().is_empty()
    });
    assert!(standins.sleeping("a"));
    assert_eq!(state["server"]["reclaims"]["proc"], 1, "{state}");

    load_through_sidecar(&sidecar, &session, "p");
    let r = acquire(&sidecar, &session, "big");
    assert_eq!(r.status, 409, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(
            "needs 350.0 MiB of ram, above the ceiling of 400.0 MiB less 64.0 MiB held by pinned models"
        ),
        "{message}"
    );

    load_through_sidecar(&sidecar, &session, "c");
    standins.post("c", "/sleep?level=1");
    let state = sidecar.wait_state("c to leave the ledger", |s| states(s) == loaded(&["p"]));
    assert_eq!(state["server"]["dropped"], 1);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"c\",reason=\"server_dropped\"}"),
        Some(1.0)
    );

    standins.post("a", "/wake_up");
    let state = sidecar.wait_state("a adopted", |s| states(s) == loaded(&["a", "p"]));
    assert_eq!(held_ram(&state), (64 + 96) * MIB);
    load_through_sidecar(&sidecar, &session, "a");
    assert_eq!(held_ram(&sidecar.state()), (64 + 96) * MIB);

    standins.post("big", "/wake_up");
    sidecar.wait_until("big put back to sleep", |_| standins.sleeping("big"));
    assert_eq!(states(&sidecar.state()), loaded(&["a", "p"]));
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"big\",reason=\"ceiling\"}"),
        Some(1.0)
    );
}

/// One server killed: its model leaves the ledger within 5 s, the other stays. All killed: the
/// sidecar reports the servers down. Restarted (vLLM starts awake): adopted, counted once.
#[test]
fn vllm_servers_killed_and_restarted() {
    let mut standins = Standins::start(&[("a", 64), ("b", 64)]);
    for model in ["a", "b"] {
        standins.post(model, "/sleep?level=2");
    }
    let sidecar = sidecar_for(
        &standins,
        "{ram: 1Gi}",
        &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    let session = open_session(&sidecar);
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    assert_eq!(held_ram(&sidecar.state()), 128 * MIB);

    standins.kill9("b");
    let killed = Instant::now();
    sidecar.wait_state("b to leave the ledger", |s| states(s) == loaded(&["a"]));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the ledger took {took:?} after the kill"
    );
    standins.kill9("a");
    sidecar.wait_until("readyz to report the servers down", |s| {
        Client::tcp(s.metrics_addr.clone())
            .get("/readyz")
            .is_ok_and(|r| r.status == 503)
    });
    let state = sidecar.wait_state("nothing held", |s| held_ram(s) == 0);
    assert!(state["models"].as_array().unwrap().is_empty(), "{state}");
    assert_eq!(
        sidecar.metric("modelpool_server_up{driver=\"Vllm\"}"),
        Some(0.0)
    );

    standins.spawn("a");
    standins.spawn("b");
    sidecar.wait_state("both adopted", |s| states(s) == loaded(&["a", "b"]));
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a", "b"]));
    assert_eq!(held_ram(&state), 128 * MIB);
}

/// The serving proxy in front of a `Vllm` pool (one server per model, no driver url, no
/// `--upstream`): an unmodified OpenAI request naming a model goes to that model's server,
/// woken through the pool first (the stand-in answers 404 for a model not its own and 503
/// asleep, so a request sent to the wrong server, or before the wake-up, fails); two models that
/// do not fit together take turns (the first put to sleep to wake the second).
#[test]
fn proxied_requests_go_to_their_models_vllm_server() {
    let standins = Standins::start(&[("a", 64), ("b", 64)]);
    for model in ["a", "b"] {
        standins.post(model, "/sleep?level=2");
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sidecar = sidecar_with(
        &standins,
        "{ram: 100Mi}",
        &format!("{{mode: Cache, idleTTL: 10m, acquireTimeout: 10s, {NO_PRESSURE}}}"),
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
        &["--proxy-listen", &listen],
    );
    sidecar.wait_log(
        |line| line.contains("serving proxy listening").then_some(()),
        "the proxy listener",
    );
    let proxy = Client::tcp(listen).with_timeout(Duration::from_secs(30));
    for (model, other) in [("a", "b"), ("b", "a")] {
        let r = proxy
            .post(
                "/v1/completions",
                &serde_json::json!({"model": model, "prompt": "hi"}),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        assert_eq!(r.json()["model"], model, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], format!("hi from {model}"));
        assert!(!standins.sleeping(model));
        assert!(
            standins.sleeping(other),
            "{other} should sleep to make room"
        );
        let state = sidecar.state();
        assert_eq!(states(&state), loaded(&[model]), "{state}");
    }
    // A request naming no model goes to the first server listed; /v1/models is the pool's.
    let r = proxy.get("/health").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = proxy.get("/v1/models").unwrap();
    let models = r.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

/// Sleep level 1 (issue 18): the weights go to host RAM, so a model the sidecar put to sleep
/// counts against the RAM ceiling, shown in /v1/state (`server.asleep_ram_bytes`, and in
/// `held_bytes`); a later load that needs that RAM is refused on RAM with the numbers; waking the
/// model through the pool is admitted net of its own host copy and counted once. (The stand-in
/// keeps the weights in its RSS at level 1, as a CPU holds them; on a GPU they move there.)
#[test]
fn a_model_asleep_at_level_1_counts_against_the_ram_ceiling() {
    let standins = Standins::start(&[("a", 64), ("b", 64)]);
    for model in ["a", "b"] {
        standins.post(model, "/sleep?level=2");
    }
    let sidecar = sidecar_at_level(
        &standins,
        1,
        "{ram: 100Mi}",
        &format!("{{mode: Aggressive, acquireTimeout: 2s, {NO_PRESSURE}}}"),
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
        &[],
    );
    let session = open_session(&sidecar);
    // Woken, used, released: the Aggressive pool puts it to sleep at level 1 at once.
    load_through_sidecar(&sidecar, &session, "a");
    let state = sidecar.wait_state("a asleep at level 1, counted in RAM", |s| {
        s["models"].as_array().unwrap().is_empty()
            && s["server"]["asleep_ram_bytes"]["a"] == 64 * MIB
    });
    assert!(standins.sleeping("a"));
    assert_eq!(held_ram(&state), 64 * MIB, "{state}");
    assert_eq!(state["server"]["reclaims"]["driver"], 1, "{state}");

    // b needs 64 MiB of RAM; 100 MiB less a's 64 MiB asleep leave 36 MiB, and nothing can be
    // evicted: refused at the acquire timeout, naming the RAM ceiling and what holds it.
    let r = acquire(&sidecar, &session, "b");
    let answer = r.json();
    assert_eq!(answer["reason"], "timeout", "{}: {answer}", r.status);
    let message = answer["message"].as_str().unwrap();
    for part in [
        "ram: ceiling 100.0 MiB",
        "64.0 MiB held by a (64.0 MiB asleep)",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    assert!(standins.sleeping("b"), "b was not woken");

    // a itself wakes: admitted net of its own host copy, counted once while awake.
    let r = acquire(&sidecar, &session, "a");
    assert_eq!(r.status, 200, "{}", r.text());
    let lease = r.json()["lease"].clone();
    assert!(!standins.sleeping("a"));
    let state = sidecar.wait_state("a awake, no longer asleep", |s| {
        states(s) == loaded(&["a"]) && s["server"]["asleep_ram_bytes"].is_null()
    });
    assert_eq!(held_ram(&state), 64 * MIB, "{state}");
    let r = sidecar.post(
        "/v1/release",
        &serde_json::json!({"session": session, "lease": lease}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let state = sidecar.wait_state("a asleep again", |s| {
        s["models"].as_array().unwrap().is_empty()
            && s["server"]["asleep_ram_bytes"]["a"] == 64 * MIB
    });
    assert_eq!(held_ram(&state), 64 * MIB, "{state}");
}
