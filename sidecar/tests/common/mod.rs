//! Test harness: the real `modelpool-sidecar` binary on a temp socket with a pool file, and
//! `modelpool-memhog` app processes that hold real memory, driven over stdin/stdout.
//!
//! Nothing here sleeps as an assertion: every wait polls a condition with a generous deadline
//! (the CI machine is small and shared).
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use modelpool_sidecar::client::{Client, Response};

pub mod ollama;
pub mod server;
use serde_json::Value;

/// How long any condition may take on a slow, shared machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1 << 20;

/// A running sidecar.
pub struct Sidecar {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pool_path: PathBuf,
    pub metrics_addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    /// Starts a sidecar for `pool_yaml` with 100 ms ticks, 1 s heartbeats and `extra` flags.
    pub fn start(pool_yaml: &str, extra: &[&str]) -> Self {
        Self::start_wrapped(pool_yaml, extra, &[])
    }

    /// [`Sidecar::start`] through a wrapper that execs it (`prlimit --nofile=256:256`,
    /// `setpriv --reuid 65532 ...`), so the pid stays the sidecar's.
    pub fn start_wrapped(pool_yaml: &str, extra: &[&str], wrapper: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sidecar.sock");
        let pool_path = dir.path().join("pool.yaml");
        std::fs::write(&pool_path, pool_yaml).expect("write pool");
        let mut args: Vec<String> = vec![
            "--pool".into(),
            pool_path.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--log-format".into(),
            "json".into(),
            "--no-nvml".into(),
        ];
        let has = |flag: &str| extra.contains(&flag);
        for (flag, default) in [
            ("--tick-ms", "100"),
            ("--heartbeat-ms", "1000"),
            ("--pool-poll-ms", "100"),
            ("--reclaim-timeout-ms", "10000"),
            ("--shutdown-grace-ms", "10000"),
        ] {
            if !has(flag) {
                args.push(flag.into());
                args.push(default.into());
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let sidecar = env!("CARGO_BIN_EXE_modelpool-sidecar");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(sidecar);
                command
            }
            None => Command::new(sidecar),
        };
        let mut child = command
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sidecar");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("SIDECAR_TEST_LOGS").is_some() {
                        eprintln!("sidecar: {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut sidecar = Self {
            child: Some(child),
            dir,
            socket,
            pool_path,
            metrics_addr: String::new(),
            logs,
        };
        let addr = sidecar.wait_log(
            |line| {
                let v: Value = serde_json::from_str(line).ok()?;
                (v["message"] == "metrics, healthz and readyz listening")
                    .then(|| v["addr"].as_str().map(str::to_owned))
                    .flatten()
            },
            "the metrics listener",
        );
        sidecar.metrics_addr = addr;
        sidecar.wait_until("the API answers", |s| {
            s.client().get("/v1/state").is_ok_and(|r| r.status == 200)
        });
        sidecar
    }

    pub fn client(&self) -> Client {
        Client::unix(&self.socket).with_timeout(Duration::from_secs(90))
    }

    pub fn get(&self, path: &str) -> Response {
        self.client().get(path).expect("GET")
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.client().post(path, body).expect("POST")
    }

    pub fn state(&self) -> Value {
        let r = self.get("/v1/state");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    pub fn metrics(&self) -> String {
        let r = Client::tcp(self.metrics_addr.clone())
            .get("/metrics")
            .expect("GET /metrics");
        assert_eq!(r.status, 200);
        r.text()
    }

    /// A metric's value (first sample whose name+labels start with `series`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.trim().parse().ok()
        })
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line `f` maps to `Some`, returning it.
    pub fn wait_log<T>(&self, mut f: impl FnMut(&str) -> Option<T>, what: &str) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(found) = self.logs.lock().unwrap().iter().find_map(|l| f(l)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until `f` holds.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; state: {}\nlogs:\n{}",
                self.client()
                    .get("/v1/state")
                    .map(|r| r.text())
                    .unwrap_or_default(),
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the state until `f` holds; returns that state.
    pub fn wait_state(&self, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        self.wait_until(what, |s| {
            last = s.state();
            f(&last)
        });
        last
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_term();
        self.wait_exit()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the pool file.
    pub fn write_pool(&self, yaml: &str) {
        // Write then rename, so the watcher never reads half a file.
        let tmp = self.dir.path().join("pool.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.pool_path).unwrap();
    }

    /// The model entries of a state for `model`.
    pub fn instances(state: &Value, model: &str) -> Vec<Value> {
        state["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["model"] == model)
            .cloned()
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A memhog app process.
pub struct Hog {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    events: Vec<Value>,
    pub session: String,
    pub pid: u32,
}

impl Hog {
    /// Starts one in SDK mode against `sidecar`.
    pub fn start(sidecar: &Sidecar) -> Self {
        Self::start_with(&sidecar.socket, &[])
    }

    pub fn start_with(socket: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_modelpool-memhog"))
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memhog");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        let pid = child.id();
        let mut hog = Self {
            stdin: child.stdin.take(),
            child: Some(child),
            lines: rx,
            events: Vec::new(),
            session: String::new(),
            pid,
        };
        let opened = hog.wait_event("session opened", |e| e["event"] == "session");
        hog.session = opened["session"].as_str().unwrap().to_owned();
        hog
    }

    fn next_line(&mut self, deadline: Instant, what: &str) -> Value {
        match self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(value) => value,
            Err(RecvTimeoutError::Timeout) => panic!("memhog: timed out waiting for {what}"),
            Err(RecvTimeoutError::Disconnected) => panic!("memhog exited while waiting for {what}"),
        }
    }

    /// Sends a command line and returns its reply (events seen meanwhile are kept).
    pub fn send(&mut self, command: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("write to memhog");
        stdin.flush().expect("flush");
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let line = self.next_line(deadline, command);
            if line["type"] == "reply" {
                return line;
            }
            self.events.push(line);
        }
    }

    /// Waits for an event matching `f` (already seen or new), removing it.
    pub fn wait_event(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.events.iter().position(&f) {
            return self.events.remove(index);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let line = self.next_line(deadline, what);
            if line["type"] == "event" && f(&line) {
                return line;
            }
            self.events.push(line);
        }
    }

    /// Waits for an `unloaded` event of `model`.
    pub fn wait_unloaded(&mut self, model: &str) -> Value {
        let model = model.to_owned();
        self.wait_event(&format!("unload of {model}"), move |e| {
            e["event"] == "unloaded" && e["model"] == model.as_str()
        })
    }

    /// Whether an `unloaded` event for `model` has been seen (without waiting).
    pub fn saw_unload(&mut self, model: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.events.push(line);
        }
        self.events
            .iter()
            .any(|e| e["event"] == "unloaded" && e["model"] == model)
    }

    /// `acquire` that must be granted with `decision`; returns the lease.
    pub fn acquire(&mut self, model: &str, mib: u64, decision: &str) -> String {
        let reply = self.send(&format!("acquire {model} {mib}"));
        assert_eq!(reply["status"], 200, "acquire {model}: {reply}");
        assert_eq!(
            reply["body"]["decision"], decision,
            "acquire {model}: {reply}"
        );
        if decision == "load" {
            assert_eq!(reply["loaded_status"], 200, "loaded {model}: {reply}");
        }
        reply["body"]["lease"].as_str().unwrap().to_owned()
    }

    /// `release`; returns the `unload` flag.
    pub fn release(&mut self, lease: &str) -> bool {
        let reply = self.send(&format!("release {lease}"));
        assert_eq!(reply["status"], 200, "release {lease}: {reply}");
        reply["body"]["unload"].as_bool().unwrap()
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stdin.take();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pool manifest with RAM-only models.
pub fn pool(name: &str, limits: &str, policy: &str, models: &[&str]) -> String {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata:\n  name: {name}\nspec:\n  limits: {limits}\n  policy: {policy}\n  models:\n{models}"
    )
}

/// The held RAM bytes of a state.
pub fn held_ram(state: &Value) -> u64 {
    state["held_bytes"]["ram"].as_u64().unwrap()
}

/// `actual` within 5 % of `expected` (RSS deltas include a few pages of bookkeeping).
pub fn assert_near(actual: &serde_json::Value, expected: u64, what: &str) {
    let actual = actual
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: {actual} is not a byte count"));
    let tolerance = expected / 20;
    assert!(
        actual.abs_diff(expected) <= tolerance,
        "{what}: {actual} is not within 5 % of {expected}"
    );
}
