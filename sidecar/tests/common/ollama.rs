//! A real `ollama serve` for the tests (ollama.rs, proxy.rs): v0.17.4, built from its pinned Go
//! module by `scripts/servers.sh ollama` (or `MODELPOOL_OLLAMA_DIR`), serving tiny llama GGUFs
//! written by `tests/servers/ollama/tiny_gguf.py` in the script's venv (one per model,
//! different seeds: Ollama shares one runner between names of one blob).

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use modelpool_sidecar::client::{Client, Response};
use serde_json::{Value, json};

use super::{
    PATIENCE,
    server::{free_port, kill_group, repo_root, server_dir},
};

/// The folder with `bin/ollama`, `tiny.gguf` and the GGUF writer's `venv` (built on first use).
pub fn ollama_dir() -> PathBuf {
    match std::env::var_os("MODELPOOL_OLLAMA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => server_dir("ollama"),
    }
}

/// A real `ollama serve`, in its own process group, with its own model store.
pub struct Ollama {
    pub dir: tempfile::TempDir,
    pub install: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Ollama {
    /// A server with the tiny model registered as each of `models`.
    pub fn start(models: &[&str]) -> Self {
        let mut server = Self {
            dir: tempfile::tempdir().unwrap(),
            install: ollama_dir(),
            port: free_port(),
            child: None,
        };
        server.spawn();
        for (seed, model) in models.iter().enumerate() {
            // A GGUF of its own per model: Ollama shares one runner between names of one blob.
            let gguf = server.dir.path().join(format!("{model}.gguf"));
            let status = Command::new(server.install.join("venv/bin/python"))
                .arg(repo_root().join("tests/servers/ollama/tiny_gguf.py"))
                .arg(&gguf)
                .arg(seed.to_string())
                .status()
                .unwrap();
            assert!(status.success(), "tiny_gguf.py for {model}");
            let modelfile = server.dir.path().join(format!("{model}.Modelfile"));
            std::fs::write(&modelfile, format!("FROM {}\n", gguf.display())).unwrap();
            let out = server
                .command()
                .args(["create", model, "-f"])
                .arg(&modelfile)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ollama create {model}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        server
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(self.install.join("bin/ollama"));
        command
            .env("OLLAMA_HOST", format!("127.0.0.1:{}", self.port))
            .env("OLLAMA_MODELS", self.dir.path().join("models"))
            .env("HOME", self.dir.path())
            .env("OLLAMA_NUM_PARALLEL", "1")
            .env("OLLAMA_CONTEXT_LENGTH", "512")
            .env("OLLAMA_MAX_LOADED_MODELS", "4");
        command
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ollama.log"))
            .unwrap();
        let child = self
            .command()
            .arg("serve")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self
                .client()
                .get("/api/version")
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ollama serve did not answer; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn client(&self) -> Client {
        Client::tcp(format!("127.0.0.1:{}", self.port)).with_timeout(Duration::from_secs(60))
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ollama.log")).unwrap_or_default()
    }

    pub fn generate(&self, model: &str, keep_alive: i64) -> Response {
        self.client()
            .post(
                "/api/generate",
                &json!({"model": model, "keep_alive": keep_alive, "stream": false}),
            )
            .unwrap()
    }

    /// Loads behind the sidecar's back.
    pub fn load(&self, model: &str) {
        let r = self.generate(model, -1);
        assert_eq!(r.status, 200, "load {model}: {}\n{}", r.text(), self.log());
    }

    /// Unloads behind the sidecar's back.
    pub fn unload(&self, model: &str) {
        let r = self.generate(model, 0);
        assert_eq!(r.status, 200, "unload {model}: {}", r.text());
    }

    pub fn ps(&self) -> Vec<String> {
        let ps: Value = self.client().get("/api/ps").unwrap().json();
        ps["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn holds(&self, model: &str) -> bool {
        self.ps().contains(&format!("{model}:latest"))
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id());
            let _ = child.wait();
        }
    }
}

impl Drop for Ollama {
    fn drop(&mut self) {
        self.kill9();
    }
}
