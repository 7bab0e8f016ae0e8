//! The `reclaim` scenario: a real app process (this binary's `child` mode, speaking the SDK
//! protocol) loads N MiB per model (an anonymous mapping, every page touched) and frees it when
//! told to unload. Measured: the time from the release (Aggressive mode) or the cleanup call
//! (Cache mode, `POST /v1/cleanup`) to the sidecar no longer listing the model in
//! `GET /v1/state` (it lists it until it has seen the memory back), and the share of the
//! loaded bytes the process's RSS gave back. The limit is the app's own unload: the time the
//! child's `munmap` took, measured in the same round.

use std::{
    io::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hyper::Method;
use memmap2::MmapMut;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{ChildStdin, ChildStdout},
    sync::mpsc,
};

use crate::{
    admission::pool_yaml,
    http::{Client, Target},
    process::{Sidecar, percentile, rss_bytes},
    report::{Printer, Row},
};

const MIB: u64 = 1 << 20;
const MODEL: &str = "m";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Model sizes, MiB.
    pub model_mib: Vec<u64>,
    /// Rounds per (mode, size).
    pub rounds: usize,
}

/// The child app: `child --socket PATH --mib N`, driven by lines on stdin (`load`,
/// `release`, `exit`), answering one JSON line each; unload commands from the sidecar's
/// command stream are carried out and reported with an `{"event": "unloaded"}` line.
///
/// It follows the protocol: it remembers the instance (model + generation) each acquire
/// answered, frees only on a command naming that instance, and names it in `/v1/unloaded`.
/// A stale command (for an instance already unloaded, e.g. one queued at the previous
/// release and delivered late) is ignored: it must not free the next load.
pub async fn child(socket: &Path, mib: u64) -> anyhow::Result<()> {
    let target = Target::Unix(socket.to_owned());
    let mut api = Client::connect(&target).await?;
    let session = crate::admission::open_session(&target, &[MODEL.to_owned()]).await?;
    // The session names this process's pid: the sidecar watches its RSS.
    let (tx, mut commands) = mpsc::channel::<Value>(16);
    {
        let mut poller = Client::connect(&target).await?;
        let path = format!("/v1/sessions/{session}/commands?wait_ms=25000");
        tokio::spawn(async move {
            while let Ok(answer) = poller.ok(Method::GET, &path, None).await {
                for command in answer["commands"].as_array().cloned().unwrap_or_default() {
                    if tx.send(command).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    // Lines from stdin, read on a thread (tokio's stdin is not among the workspace's features).
    let (line_tx, mut stdin) = mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    // The instance this process holds: its generation and its memory.
    let mut held: Option<(u64, MmapMut)> = None;
    let mut lease: Option<Value> = None;
    let say = |value: Value| -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{value}")?;
        stdout.flush()?;
        Ok(())
    };
    loop {
        tokio::select! {
            line = stdin.recv() => {
                let Some(line) = line else { break };
                match line.trim() {
                    "load" => {
                        let answer = api.ok(Method::POST, "/v1/acquire",
                            Some(&json!({"session": session, "model": MODEL, "wait": true}))).await?;
                        lease = Some(answer["lease"].clone());
                        if answer["decision"] == "load" {
                            let instance = answer["generation"].as_u64()
                                .context("no generation in the acquire answer")?;
                            let start = Instant::now();
                            let bytes = (mib * MIB) as usize;
                            let mut map = MmapMut::map_anon(bytes)?;
                            for page in map.chunks_mut(4096) {
                                page[0] = 1;
                            }
                            held = Some((instance, map));
                            api.ok(Method::POST, "/v1/loaded", Some(&json!({
                                "session": session, "lease": answer["lease"], "ok": true,
                                "load_seconds": start.elapsed().as_secs_f64(),
                                "vram_bytes": 0, "ram_bytes": bytes}))).await?;
                        }
                        say(json!({"ok": true, "decision": answer["decision"]}))?;
                    }
                    "release" => {
                        let lease = lease.take().context("release without a lease")?;
                        let answer = api.ok(Method::POST, "/v1/release",
                            Some(&json!({"session": session, "lease": lease}))).await?;
                        let mut munmap_ms = Value::Null;
                        if answer["unload"] == true && let Some((instance, map)) = held.take() {
                            let start = Instant::now();
                            drop(map);
                            munmap_ms = json!(start.elapsed().as_secs_f64() * 1e3);
                            api.ok(Method::POST, "/v1/unloaded", Some(&json!({
                                "session": session, "model": MODEL, "generation": instance}))).await?;
                        }
                        say(json!({"ok": true, "unload": answer["unload"], "munmap_ms": munmap_ms}))?;
                    }
                    "exit" => break,
                    other => say(json!({"ok": false, "error": format!("unknown line {other:?}")}))?,
                }
            }
            Some(command) = commands.recv() => {
                if command["kind"] != "unload" {
                    continue;
                }
                let wanted = command["generation"].as_u64();
                let Some((instance, map)) = held.take_if(|(instance, _)| Some(*instance) == wanted) else {
                    // Stale: its instance is already gone (this process freed it at the
                    // release); the sidecar drops the command once that unload is seen.
                    continue;
                };
                let start = Instant::now();
                drop(map);
                let munmap_ms = json!(start.elapsed().as_secs_f64() * 1e3);
                api.ok(Method::POST, "/v1/unloaded", Some(&json!({
                    "session": session, "model": command["model"], "generation": instance,
                    "command": command["id"]}))).await?;
                say(json!({"event": "unloaded", "munmap_ms": munmap_ms}))?;
            }
        }
    }
    let _ = api
        .json(Method::DELETE, &format!("/v1/sessions/{session}"), None)
        .await;
    Ok(())
}

struct ChildApp {
    proc: tokio::process::Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ChildApp {
    async fn start(socket: &Path, mib: u64) -> anyhow::Result<Self> {
        let mut proc = tokio::process::Command::new(std::env::current_exe()?)
            .arg("child")
            .arg("--socket")
            .arg(socket)
            .arg("--mib")
            .arg(mib.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start the child app")?;
        let stdin = proc.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(proc.stdout.take().context("no stdout")?).lines();
        Ok(Self {
            proc,
            stdin,
            stdout,
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.proc.id().context("the child app exited")
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn read(&mut self) -> anyhow::Result<Value> {
        let line = tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line())
            .await
            .context("the child app did not answer within 30 s")??
            .context("the child app exited")?;
        let value: Value = serde_json::from_str(&line)?;
        if value["ok"] == false {
            bail!("the child app failed: {value}");
        }
        Ok(value)
    }
}

/// Polls `GET /v1/state` until no instance of the model is listed; the time it took.
async fn wait_gone(client: &mut Client, since: Instant) -> anyhow::Result<Duration> {
    loop {
        let state = client.ok(Method::GET, "/v1/state", None).await?;
        let listed = state["models"]
            .as_array()
            .is_some_and(|models| models.iter().any(|m| m["model"] == MODEL));
        if !listed {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(20) {
            bail!("the sidecar still lists model {MODEL} 20 s after it was released: {state}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs the scenario.
pub async fn run(options: &Options, dir: &Path, printer: &mut Printer) -> anyhow::Result<()> {
    for (mode, pool_mode) in [("aggressive", "Aggressive"), ("cleanup", "Cache")] {
        for &mib in &options.model_mib {
            let run_dir = dir.join(format!("{mode}-{mib}"));
            std::fs::create_dir_all(&run_dir)?;
            let pool = run_dir.join("pool.yaml");
            std::fs::write(&pool, pool_yaml(&[(MODEL, &format!("{mib}Mi"))], pool_mode))?;
            let sidecar = Sidecar::start(&run_dir, &pool, None, None).await?;
            let mut api = Client::connect(&sidecar.unix()).await?;
            let mut app = ChildApp::start(&sidecar.socket, mib).await?;
            let (mut reclaim_ms, mut munmap_ms, mut returned) =
                (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..options.rounds {
                let before = rss_bytes(app.pid()?)?;
                app.send("load").await?;
                app.read().await?;
                let loaded = rss_bytes(app.pid()?)?;
                let since;
                let freed;
                if mode == "aggressive" {
                    since = Instant::now();
                    app.send("release").await?;
                    let gone = wait_gone(&mut api, since).await?;
                    reclaim_ms.push(gone.as_secs_f64() * 1e3);
                    freed = app.read().await?;
                } else {
                    app.send("release").await?;
                    app.read().await?;
                    since = Instant::now();
                    api.ok(Method::POST, "/v1/cleanup", Some(&json!({"force": false})))
                        .await?;
                    let gone = wait_gone(&mut api, since).await?;
                    reclaim_ms.push(gone.as_secs_f64() * 1e3);
                    freed = app.read().await?;
                }
                if let Some(ms) = freed["munmap_ms"].as_f64() {
                    munmap_ms.push(ms);
                }
                let after = rss_bytes(app.pid()?)?;
                let grown = loaded.saturating_sub(before).max(1) as f64;
                returned.push(loaded.saturating_sub(after) as f64 / grown);
            }
            app.send("exit").await?;
            reclaim_ms.sort_by(f64::total_cmp);
            munmap_ms.sort_by(f64::total_cmp);
            let p50 = percentile(&reclaim_ms, 50.0);
            let base = percentile(&munmap_ms, 50.0);
            printer.row(
                &Row::new("reclaim")
                    .with("mode", mode)
                    .with("model_mib", mib)
                    .with("rounds", options.rounds)
                    .num("reclaim_ms_p50", p50, 3)
                    // Under 100 samples a "p99" is the largest sample: say so.
                    .num(
                        if reclaim_ms.len() < 100 {
                            "reclaim_ms_max"
                        } else {
                            "reclaim_ms_p99"
                        },
                        percentile(&reclaim_ms, 99.0),
                        3,
                    )
                    .num(
                        "returned_fraction",
                        returned.iter().sum::<f64>() / returned.len().max(1) as f64,
                        4,
                    )
                    .num("baseline_munmap_ms_p50", base, 3)
                    .num("ratio_to_baseline", p50 / base, 3),
            );
            drop(sidecar);
        }
    }
    Ok(())
}
