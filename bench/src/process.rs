//! Processes under test: the real sidecar binary and the baseline server (this binary's
//! `serve-baseline`), started in a temporary directory, killed on drop; and what /proc says
//! about them.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::http::{Client, Target};

/// The sidecar binary: `$MODELPOOL_SIDECAR_BIN`, else next to this binary, else
/// `${CARGO_TARGET_DIR:-target}/release/modelpool-sidecar`.
pub fn sidecar_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MODELPOOL_SIDECAR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        tried.push(dir.join("modelpool-sidecar"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    tried.push(target.join("release/modelpool-sidecar"));
    for path in &tried {
        if path.is_file() {
            return Ok(path.clone());
        }
    }
    bail!(
        "the sidecar binary was not found (tried {}); build it with `cargo build --release -p modelpool-sidecar` or set MODELPOOL_SIDECAR_BIN",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A child process killed (and reaped) on drop, with its output in a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// What it is, for messages.
    pub what: String,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails with its log when it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.what,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` with its output in `log`, killed on drop.
pub fn spawn(mut command: Command, log: PathBuf, what: &str) -> anyhow::Result<Proc> {
    let file = fs::File::create(&log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = command
        .spawn()
        .with_context(|| format!("failed to start {what}"))?;
    Ok(Proc {
        child,
        log,
        what: what.to_owned(),
    })
}

/// A running sidecar.
pub struct Sidecar {
    /// The process.
    pub proc: Proc,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its TCP API, when asked for.
    pub tcp: Option<SocketAddr>,
    /// Its metrics address, when given.
    pub metrics: Option<SocketAddr>,
}

impl Sidecar {
    /// Starts the sidecar on `pool` in `dir` (`--metrics-listen 127.0.0.1:0` unless `metrics` is
    /// given; `--listen` when `tcp` is) and waits until its API answers.
    pub async fn start(
        dir: &Path,
        pool: &Path,
        tcp: Option<SocketAddr>,
        metrics: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        Self::start_with(dir, pool, tcp, metrics, &[]).await
    }

    /// [`Sidecar::start`] with `extra` flags.
    pub async fn start_with(
        dir: &Path,
        pool: &Path,
        tcp: Option<SocketAddr>,
        metrics: Option<SocketAddr>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let bin = sidecar_bin()?;
        let socket = dir.join("sidecar.sock");
        let mut command = Command::new(&bin);
        command
            .arg("--pool")
            .arg(pool)
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-listen")
            .arg(metrics.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()));
        if let Some(addr) = tcp {
            command.arg("--listen").arg(addr.to_string());
        }
        command.args(extra);
        command.env("RUST_LOG", "warn");
        let mut proc = spawn(command, dir.join("sidecar.log"), "the sidecar")?;
        let target = Target::Unix(socket.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            proc.check_alive()?;
            if let Ok(mut client) = Client::connect(&target).await
                && let Ok((200, _)) = client.json(hyper::Method::GET, "/v1/state", None).await
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the sidecar ({}) did not answer GET /v1/state within 20 s; its log:\n{}",
                    bin.display(),
                    proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(addr) = tcp {
            crate::http::wait_connectable(&Target::Tcp(addr), Duration::from_secs(10)).await?;
        }
        Ok(Self {
            proc,
            socket,
            tcp,
            metrics,
        })
    }

    /// Its API over the Unix socket.
    pub fn unix(&self) -> Target {
        Target::Unix(self.socket.clone())
    }
}

/// Starts this binary's bare baseline server on `target`, answering `reply_bytes` bytes of
/// JSON (or the acquire-sized default), and waits until it is bound.
pub fn start_baseline(
    dir: &Path,
    target: &Target,
    reply_bytes: Option<usize>,
) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command.arg("serve-baseline");
    match target {
        Target::Unix(path) => command.arg("--socket").arg(path),
        Target::Tcp(addr) => command.arg("--listen").arg(addr.to_string()),
    };
    if let Some(n) = reply_bytes {
        command.arg("--reply-bytes").arg(n.to_string());
    }
    let log = dir.join(format!("baseline-{}.log", target.transport()));
    let file = fs::File::create(&log)?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file);
    let mut child = command
        .spawn()
        .context("failed to start the baseline server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let mut proc = Proc {
        child,
        log,
        what: "the baseline server".to_owned(),
    };
    if line.trim() != "ready" {
        proc.check_alive()?;
        bail!("the baseline server said {line:?} instead of ready");
    }
    Ok(proc)
}

/// Resident set size of a process, bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("failed to read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no VmRSS in /proc/PID/status")
}

/// User plus system CPU time of a process, clock ticks (/proc/PID/stat utime + stime).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that fails).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The machine, for result lines: CPU count and model name.
pub fn machine() -> (usize, String) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    (cpus, model)
}

/// Percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
