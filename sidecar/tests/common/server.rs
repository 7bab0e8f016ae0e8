//! Helpers for the server drivers' tests (kserve.rs, ollama.rs): sessions that acquire through
//! the sidecar, the ledger as (model, state) pairs, free ports.

use std::path::{Path, PathBuf};

use modelpool_sidecar::client::Response;
use serde_json::{Value, json};

use super::Sidecar;

pub const NO_PRESSURE: &str = "pressure: {ramPercent: 100, vramPercent: 100}";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `scripts/servers.sh <server>`'s folder (installs or builds on first use).
pub fn server_dir(server: &str) -> PathBuf {
    let out = std::process::Command::new(repo_root().join("scripts/servers.sh"))
        .arg(server)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/servers.sh {server} failed");
    let dir = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(dir.lines().last().unwrap().trim())
}

/// Sends SIGKILL to a whole process group.
pub fn kill_group(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
}

pub fn open_session(sidecar: &Sidecar) -> String {
    let r = sidecar.post(
        "/v1/sessions",
        &json!({"pid": std::process::id(), "app": "router"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session"].as_str().unwrap().to_owned()
}

pub fn acquire(sidecar: &Sidecar, session: &str, model: &str) -> Response {
    sidecar.post("/v1/acquire", &json!({"session": session, "model": model}))
}

/// Acquire + release of a model the sidecar loads (`use`).
pub fn load_through_sidecar(sidecar: &Sidecar, session: &str, model: &str) {
    let r = acquire(sidecar, session, model);
    assert_eq!(r.status, 200, "acquire {model}: {}", r.text());
    let answer = r.json();
    assert_eq!(answer["decision"], "use", "{answer}");
    let r = sidecar.post(
        "/v1/release",
        &json!({"session": session, "lease": answer["lease"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

pub fn states(state: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = state["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

pub fn loaded(models: &[&str]) -> Vec<(String, String)> {
    models
        .iter()
        .map(|m| ((*m).to_owned(), "loaded".to_owned()))
        .collect()
}
