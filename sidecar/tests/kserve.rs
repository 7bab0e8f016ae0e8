//! The `KServeV2` driver against a real MLServer (1.7.1, pinned; installed by
//! `scripts/servers.sh mlserver` into a cached venv, or `MODELPOOL_MLSERVER_BIN`), with a
//! runtime that really holds each model's bytes in MLServer's worker process
//! (`tests/servers/mlserver/hog_runtime.py`). The sidecar finds the server by its command line
//! and proves unloads on the whole process tree's RSS.
//!
//! Every wait polls a condition with a generous deadline, except the one the issue sets: after
//! the server is killed, the ledger is right within 5 s.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    MIB, PATIENCE, Sidecar, held_ram,
    server::{
        NO_PRESSURE, acquire, free_port, kill_group, load_through_sidecar, loaded, open_session,
        repo_root, server_dir, states,
    },
};
use modelpool_sidecar::client::{Client, Response};
use serde_json::json;

/// The pinned `mlserver` executable (installed on first use).
fn mlserver_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MODELPOOL_MLSERVER_BIN") {
        return PathBuf::from(bin);
    }
    server_dir("mlserver").join("mlserver")
}

/// A real MLServer serving a repository of hog models, in its own process group.
struct MlServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl MlServer {
    /// A repository with `models` (name, MiB each holds when loaded), served at once.
    fn start(models: &[(&str, u64)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let settings = json!({
            "http_port": port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 1,
            "load_models_at_startup": false,
        });
        std::fs::write(dir.path().join("settings.json"), settings.to_string()).unwrap();
        let runtime = repo_root().join("tests/servers/mlserver/hog_runtime.py");
        for (name, mib) in models {
            let model = dir.path().join(name);
            std::fs::create_dir(&model).unwrap();
            let settings = json!({
                "name": name,
                "implementation": "hog_runtime.Hog",
                "parameters": {"extra": {"mib": mib}},
            });
            std::fs::write(model.join("model-settings.json"), settings.to_string()).unwrap();
            std::fs::copy(&runtime, model.join("hog_runtime.py")).unwrap();
        }
        let mut server = Self {
            dir,
            port,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mlserver.log"))
            .unwrap();
        let child = Command::new(mlserver_bin())
            .arg("start")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            if self
                .client()
                .get("/v2/health/ready")
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "MLServer did not get ready; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self) -> Client {
        Client::tcp(format!("127.0.0.1:{}", self.port)).with_timeout(Duration::from_secs(60))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What finds this server (and no other test's) in /proc.
    fn process_match(&self) -> String {
        format!("start {}", self.dir.path().display())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mlserver.log")).unwrap_or_default()
    }

    fn post(&self, path: &str) -> Response {
        self.client().post(path, &json!({})).unwrap()
    }

    /// Loads behind the sidecar's back.
    fn load(&self, model: &str) {
        let r = self.post(&format!("/v2/repository/models/{model}/load"));
        assert_eq!(r.status, 200, "load {model}: {}\n{}", r.text(), self.log());
    }

    /// Unloads behind the sidecar's back.
    fn unload(&self, model: &str) {
        let r = self.post(&format!("/v2/repository/models/{model}/unload"));
        assert_eq!(r.status, 200, "unload {model}: {}", r.text());
    }

    fn ready(&self, model: &str) -> bool {
        let index = self.post("/v2/repository/index").json();
        index
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == model && m["state"] == "READY")
    }

    /// SIGKILL to the whole process group (the server and its workers), and reaps it.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id());
            let _ = child.wait();
        }
    }
}

impl Drop for MlServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn sidecar_for(server: &MlServer, limits: &str, policy: &str, models: &[&str]) -> Sidecar {
    sidecar_with(server, limits, policy, models, &[])
}

fn sidecar_with(
    server: &MlServer,
    limits: &str,
    policy: &str,
    models: &[&str],
    extra: &[&str],
) -> Sidecar {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    let yaml = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: kserve}}\nspec:\n  driver: {{kind: KServeV2, url: \"{}\", processMatch: \"{}\"}}\n  limits: {limits}\n  policy: {policy}\n  models:\n{models}",
        server.url(),
        server.process_match()
    );
    let mut args = vec!["--heartbeat-ms", "600000", "--tick-ms", "200"];
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start(&yaml, &args);
    sidecar.wait_state("the sidecar to find and poll the server", |s| {
        s["server"]["up"] == true && s["server"]["pid"] == server.pid()
    });
    sidecar
}

/// Load through the server's API, unload at the idle TTL proven on the server's process tree,
/// a refusal with the numbers, a model the server dropped by itself leaving the ledger, and
/// models loaded behind the sidecar's back: adopted when they fit, unloaded when they do not.
#[test]
fn kserve_driver_keeps_the_ledger_equal_to_mlserver() {
    let server = MlServer::start(&[("p", 96), ("a", 128), ("c", 96), ("big", 8)]);
    let sidecar = sidecar_for(
        &server,
        "{ram: 400Mi}",
        &format!("{{mode: Cache, idleTTL: 3s, {NO_PRESSURE}}}"),
        &[
            "{name: p, ram: 96Mi, pinned: true}",
            "{name: a, ram: 128Mi}",
            "{name: c, ram: 96Mi}",
            "{name: big, ram: 320Mi}",
        ],
    );
    let session = open_session(&sidecar);

    // Load: the sidecar calls the server; the model's bytes show in the server's tree.
    let before = sidecar.state()["server"]["rss_bytes"].as_u64().unwrap();
    load_through_sidecar(&sidecar, &session, "a");
    assert!(server.ready("a"));
    let state = sidecar.wait_state("a counted, the tree grown by it", |s| {
        s["server"]["rss_bytes"].as_u64().unwrap() > before + 100 * MIB
    });
    assert_eq!(states(&state), loaded(&["a"]));
    assert_eq!(held_ram(&state), 128 * MIB);

    // Idle past the TTL: unloaded through the server, proven on its process tree.
    let state = sidecar.wait_state("a unloaded at the idle TTL", |s| {
        s["models"].as_array().unwrap().is_empty()
    });
    assert!(!server.ready("a"));
    assert_eq!(state["server"]["reclaims"]["proc"], 1, "{state}");
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"a\",reason=\"idle_ttl\"}"),
        Some(1.0)
    );
    assert_eq!(
        sidecar.metric("modelpool_reclaims_total{seen_by=\"proc\"}"),
        Some(1.0)
    );

    // A refusal with the numbers: big can never fit beside the pinned model.
    load_through_sidecar(&sidecar, &session, "p");
    let r = acquire(&sidecar, &session, "big");
    assert_eq!(r.status, 409, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(
            "needs 320.0 MiB of ram, above the ceiling of 400.0 MiB less 96.0 MiB held by pinned models"
        ),
        "{message}"
    );

    // The server drops a model by itself: it leaves the ledger, with the reason.
    load_through_sidecar(&sidecar, &session, "c");
    server.unload("c");
    let state = sidecar.wait_state("c to leave the ledger", |s| states(s) == loaded(&["p"]));
    assert_eq!(held_ram(&state), 96 * MIB);
    assert_eq!(state["server"]["dropped"], 1);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"c\",reason=\"server_dropped\"}"),
        Some(1.0)
    );

    // Loaded behind the sidecar's back: adopted and counted.
    server.load("a");
    let state = sidecar.wait_state("a adopted", |s| states(s) == loaded(&["a", "p"]));
    assert_eq!(held_ram(&state), (96 + 128) * MIB);
    assert_eq!(state["server"]["adopted"], 1);
    // An acquire now uses the adopted instance: nothing is loaded twice.
    load_through_sidecar(&sidecar, &session, "a");
    assert_eq!(held_ram(&sidecar.state()), (96 + 128) * MIB);

    // Loaded behind the sidecar's back and above the ceiling: unloaded from the server.
    server.load("big");
    sidecar.wait_until("big unloaded from the server", |_| !server.ready("big"));
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a", "p"]));
    assert_eq!(held_ram(&state), (96 + 128) * MIB);
    assert_eq!(
        sidecar.metric("modelpool_unloads_total{model=\"big\",reason=\"ceiling\"}"),
        Some(1.0)
    );
}

/// The server killed with SIGKILL: within 5 s the ledger holds nothing of it, the sidecar is
/// not ready and refuses acquires with the reason; restarted, what it loads is counted once.
#[test]
fn kserve_server_killed_and_restarted() {
    let mut server = MlServer::start(&[("a", 96), ("b", 96)]);
    let sidecar = sidecar_for(
        &server,
        "{ram: 1Gi}",
        &format!("{{mode: Cache, idleTTL: 10m, {NO_PRESSURE}}}"),
        &["{name: a, ram: 96Mi}", "{name: b, ram: 96Mi}"],
    );
    let session = open_session(&sidecar);
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    assert_eq!(held_ram(&sidecar.state()), 192 * MIB);

    let old_pid = server.pid();
    server.kill9();
    let killed = Instant::now();
    let state = sidecar.wait_state("the ledger to drop what the server held", |s| {
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
            .is_ok_and(|r| r.status == 503 && r.text().contains("model server does not answer"))
    });
    assert_eq!(
        sidecar.metric("modelpool_server_up{driver=\"KServeV2\"}"),
        Some(0.0)
    );
    let r = acquire(&sidecar, &session, "a");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("does not answer"), "{}", r.text());

    server.spawn();
    let restarted = Instant::now();
    let state = sidecar.wait_state("the restarted server polled", |s| {
        s["server"]["up"] == true && s["server"]["pid"] == server.pid()
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "the sidecar took {:?} to see the restarted server",
        restarted.elapsed()
    );
    assert_ne!(server.pid(), old_pid);
    assert_eq!(held_ram(&state), 0, "{state}");
    // Loaded behind its back on the new server, then acquired: counted once.
    server.load("a");
    sidecar.wait_state("a adopted", |s| states(s) == loaded(&["a"]));
    load_through_sidecar(&sidecar, &session, "a");
    load_through_sidecar(&sidecar, &session, "b");
    let state = sidecar.state();
    assert_eq!(states(&state), loaded(&["a", "b"]));
    assert_eq!(held_ram(&state), 192 * MIB);
    assert!(
        Client::tcp(sidecar.metrics_addr.clone())
            .get("/readyz")
            .unwrap()
            .status
            == 200
    );
}

/// The serving proxy in front of MLServer: unmodified KServe v2 infer requests to models that
/// are not loaded get them loaded through the repository API and answered (the hog model
/// answers how many bytes it holds), and two models that do not fit together are served one
/// after the other, neither the ledger nor MLServer ever holding both.
#[test]
fn proxied_infer_requests_load_their_model_and_take_turns() {
    let server = MlServer::start(&[("a", 64), ("b", 64)]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sidecar = sidecar_with(
        &server,
        "{ram: 100Mi}",
        &format!("{{mode: Cache, idleTTL: 10m, acquireTimeout: 2m, {NO_PRESSURE}}}"),
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
        &["--proxy-listen", &listen],
    );
    let proxy = Client::tcp(listen).with_timeout(Duration::from_secs(40));
    let infer =
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]});
    for model in ["a", "b", "a"] {
        let r = proxy
            .post(&format!("/v2/models/{model}/infer"), &infer)
            .unwrap_or_else(|error| {
                panic!(
                    "infer {model}: {error}\nstate: {}\nsidecar logs:\n{}",
                    sidecar.state(),
                    sidecar.logs().join("\n")
                )
            });
        assert_eq!(
            r.status,
            200,
            "infer {model}: {}\n{}",
            r.text(),
            server.log()
        );
        let answer = r.json();
        assert_eq!(answer["model_name"], model, "{answer}");
        assert_eq!(
            answer["outputs"][0]["data"][0],
            (64u64 << 20).to_string(),
            "{answer}"
        );
        // Only the model just served is loaded, in the ledger and in MLServer. Two polls of the
        // server first: an unload is proven against the tree's RSS read while the model was
        // held, and a model evicted before any poll saw it loaded is never seen reclaimed
        // (MemoryNotReclaimed; reported to the decision core's owner, not fixed here).
        let polls = sidecar.state()["server"]["polls"].as_u64().unwrap();
        let state = sidecar.wait_state("two polls with the model loaded", |s| {
            s["server"]["polls"].as_u64().unwrap() >= polls + 2
        });
        assert_eq!(states(&state), loaded(&[model]), "{state}");
        assert!(held_ram(&state) <= 100 * MIB);
        let index = server
            .client()
            .post("/v2/repository/index", &json!({}))
            .unwrap()
            .json();
        let ready: Vec<&str> = index
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "READY")
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(ready, [model], "{index}");
    }
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"ok\"}"),
        Some(2.0)
    );
    // A model MLServer's repository has but the pool does not list: 404 in KServe's shape.
    let r = proxy.post("/v2/models/c/infer", &infer).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not in the pool")
    );
}
