//! Support for the chart, dashboard and alert tests: workspace binaries, a real Prometheus, a
//! standalone sidecar with a `modelpool-memhog` app driving it, and a tiny blocking HTTP client.
//!
//! ```text
//!   memhog (real mmap'd "models") ──UDS /v1/...──► modelpool-sidecar --pool FILE
//!                                                     │ /metrics (127.0.0.1:<port>)
//!   modelpool-operator run ──► test kube-apiserver    │
//!        │ /metrics                                   ▼
//!        └──────────────────────────────────► prometheus (scrape 1s) ◄── /api/v1/query (tests)
//! ```
//!
//! Every process started here is killed when its handle drops.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::repo_root;

/// A free loopback port (released before returning: bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A binary of this workspace, built by the test command (`cargo build --workspace --bins`)
/// before the tests run: `$MODELPOOL_<NAME>_BIN` (e.g. `MODELPOOL_SIDECAR_BIN` for
/// `modelpool-sidecar`), else `${CARGO_TARGET_DIR:-<repo>/target}/debug/<name>`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!(
        "MODELPOOL_{}_BIN",
        name.trim_start_matches("modelpool-")
            .to_uppercase()
            .replace('-', "_")
    );
    if let Some(path) = std::env::var_os(&var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_relative() {
                repo_root().join(t)
            } else {
                t
            }
        })
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does), or set {var}",
        path.display()
    );
    path
}

/// Polls `f` every `every` until it returns `Ok(Some(_))` or `timeout` passes; the error
/// names `what` and the last failure.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: still failing after {timeout:?}: {last}");
        }
        std::thread::sleep(every);
    }
}

/// A blocking HTTP/1.0 GET (the server closes the connection, so no chunking): status and body.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response from {addr}: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A child process killed (and reaped) on drop, with its output in a log file.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Process {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Process> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({:?})", cmd.get_program()))?;
        Ok(Process {
            child,
            log: log.to_path_buf(),
            what: what.to_owned(),
        })
    }

    /// Fails if the process has exited, with the tail of its log.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.what, self.log_tail(40));
        }
        Ok(())
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `GET http://addr{path}` answers 200 (the process must keep running).
    pub fn wait_http_ok(&mut self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
        let what = format!("{} answering {path} on {addr}", self.what);
        poll(&what, timeout, Duration::from_millis(200), || {
            self.check_running()?;
            match http_get(addr, path) {
                Ok((200, _)) => Ok(Some(())),
                Ok((status, body)) => bail!("HTTP {status}: {}", body.trim()),
                Err(e) => Err(e),
            }
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A standalone `modelpool-sidecar --pool FILE`, its API on a Unix socket and its metrics on
/// a loopback port.
#[derive(Debug)]
pub struct Sidecar {
    /// The process.
    pub process: Process,
    /// The API socket.
    pub socket: PathBuf,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
}

impl Sidecar {
    /// Writes `pool_yaml` to `dir/<name>.yaml` and starts a sidecar enforcing it; returns once
    /// `/readyz` answers. Short tick and reclaim timeout so a test sees results quickly.
    pub fn start(dir: &Path, name: &str, pool_yaml: &str) -> Result<Sidecar> {
        Self::start_with(dir, name, pool_yaml, &[])
    }

    /// [`Sidecar::start`] with `extra` flags.
    pub fn start_with(dir: &Path, name: &str, pool_yaml: &str, extra: &[&str]) -> Result<Sidecar> {
        let pool = dir.join(format!("{name}.yaml"));
        fs::write(&pool, pool_yaml)?;
        let socket = dir.join(format!("{name}.sock"));
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(workspace_bin("modelpool-sidecar"));
        cmd.arg("--pool")
            .arg(&pool)
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(["--tick-ms", "200", "--reclaim-timeout-ms", "5000"])
            .args(["--heartbeat-ms", "1000", "--no-nvml"])
            .args(extra)
            .env("RUST_LOG", "info");
        let mut process = Process::spawn(
            &format!("sidecar {name}"),
            cmd,
            &dir.join(format!("{name}.log")),
        )?;
        process.wait_http_ok(metrics, "/readyz", Duration::from_secs(60))?;
        Ok(Sidecar {
            process,
            socket,
            metrics,
        })
    }
}

/// A `modelpool-memhog` app process in SDK mode: it opens a session on a sidecar and holds
/// real memory for each model it loads; driven line by line (see its `//!`).
#[derive(Debug)]
pub struct Memhog {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    /// Events (unloads the sidecar asked for, the session) seen so far.
    pub events: Vec<Value>,
}

impl Memhog {
    /// Starts memhog on `socket`, registering loaders for `models`; waits for its session.
    pub fn start(socket: &Path, models: &[&str]) -> Result<Memhog> {
        let mut child = Command::new(workspace_bin("modelpool-memhog"))
            .arg("--socket")
            .arg(socket)
            .args(["--app", "e2e", "--models", &models.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting modelpool-memhog")?;
        let stdin = child.stdin.take().context("memhog stdin")?;
        let stdout = child.stdout.take().context("memhog stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"type": "garbage", "line": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut memhog = Memhog {
            child,
            stdin,
            lines: rx,
            events: Vec::new(),
        };
        memhog.wait_event("session", Duration::from_secs(60))?;
        Ok(memhog)
    }

    /// Sends one command line and returns its reply (events seen meanwhile are kept).
    pub fn cmd(&mut self, line: &str) -> Result<Value> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["type"] == "reply" => return Ok(v),
                Ok(v) => self.events.push(v),
                Err(RecvTimeoutError::Timeout) => bail!("memhog: no reply to {line:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("memhog exited during {line:?}"),
            }
        }
    }

    /// Waits for an event `{"event": name}` (or finds one already seen).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == name => return Ok(v),
                Ok(v) => self.events.push(v),
                Err(RecvTimeoutError::Timeout) => bail!("memhog: no {name:?} event in {timeout:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("memhog exited before a {name:?} event")
                }
            }
        }
    }

    /// Acquires `model`; when told to load, maps and touches `mib` MiB and reports it loaded.
    /// Returns the lease (None when refused) and the reply.
    pub fn acquire(&mut self, model: &str, mib: u64) -> Result<(Option<String>, Value)> {
        let reply = self.cmd(&format!("acquire {model} {mib}"))?;
        let lease = reply["body"]["lease"].as_str().map(str::to_owned);
        Ok((lease, reply))
    }

    /// Releases a lease; returns the reply.
    pub fn release(&mut self, lease: &str) -> Result<Value> {
        self.cmd(&format!("release {lease}"))
    }
}

impl Drop for Memhog {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scrape target for [`Prometheus::start`].
#[derive(Clone, Debug)]
pub struct Target {
    /// The job name (the alerts expect `modelpool-sidecar` / `modelpool-operator`).
    pub job: String,
    /// `host:port`.
    pub addr: SocketAddr,
    /// Extra target labels (what the Prometheus Operator's relabeling adds: namespace, pod).
    pub labels: Vec<(String, String)>,
}

/// A real Prometheus scraping `targets` every second, with its TSDB in a temporary folder.
#[derive(Debug)]
pub struct Prometheus {
    /// The process.
    pub process: Process,
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Writes a config for `targets` (and `rule_files`, if any) under `dir` and starts the
    /// pinned Prometheus; returns once `/-/ready` answers.
    pub fn start(dir: &Path, targets: &[Target], rule_files: &[PathBuf]) -> Result<Prometheus> {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                config.push_str(&format!("  - {}\n", serde_json::to_string(f)?));
            }
        }
        config.push_str("scrape_configs:\n");
        let mut jobs: Vec<&str> = targets.iter().map(|t| t.job.as_str()).collect();
        jobs.dedup();
        for job in jobs {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n"));
            for t in targets.iter().filter(|t| t.job == job) {
                let labels: serde_json::Map<String, Value> = t
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                config.push_str(&format!(
                    "      - targets: [\"{}\"]\n        labels: {}\n",
                    t.addr,
                    Value::Object(labels)
                ));
            }
        }
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, &config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(crate::tool("prometheus")?);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut process = Process::spawn("prometheus", cmd, &dir.join("prometheus.log"))?;
        process.wait_http_ok(addr, "/-/ready", Duration::from_secs(120))?;
        Ok(Prometheus { process, addr })
    }

    /// `GET /api/v1/query?query=<expr>` at the current time: the whole JSON answer. Errors on a
    /// transport failure only; a PromQL error comes back as `{"status": "error", ...}`.
    pub fn query(&self, expr: &str) -> Result<Value> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(expr)),
        )?;
        serde_json::from_str(&body)
            .with_context(|| format!("HTTP {status} from /api/v1/query, not JSON: {body}"))
    }

    /// The result vector of an instant query that must succeed without warnings.
    pub fn query_ok(&self, expr: &str) -> Result<Vec<Value>> {
        let answer = self.query(expr)?;
        if answer["status"] != "success" {
            bail!("query failed: {expr}\n{answer}");
        }
        if let Some(w) = answer.get("warnings") {
            bail!("query has warnings: {expr}\n{w}");
        }
        match &answer["data"]["result"] {
            Value::Array(items) => Ok(items.clone()),
            // A scalar or string result: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// The scrape targets' health, by job: `(job, health, last error)`.
    pub fn targets(&self) -> Result<Vec<(String, String, String)>> {
        let (_, body) = http_get(self.addr, "/api/v1/targets?state=active")?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        (
                            t["labels"]["job"].as_str().unwrap_or_default().to_owned(),
                            t["health"].as_str().unwrap_or_default().to_owned(),
                            t["lastError"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
