//! The `drivers` scenario: per server driver, the time from the unload decision to the memory
//! proven back on the server's process tree, against the server's own unload call, measured
//! in the same run on the same server process.
//!
//! ```text
//!  baseline  (no sidecar)  load directly ─► t0 ─► the server's unload call answers ─► t1
//!  ours      (sidecar, Aggressive)  acquire (use: the sidecar loads) ─► release ─► t0
//!            ─► GET /v1/state (every 1 ms) no longer lists the model ─► t1
//!            (it lists it until a poll of the server has seen its tree's RSS fall)
//! ```
//!
//! Servers: MLServer (`$MODELPOOL_MLSERVER_BIN`, with the test runtime holding `--mib` MiB in
//! its worker), Ollama (`$MODELPOOL_OLLAMA_DIR`: `bin/ollama` and `tiny.gguf`; the runner
//! process exits on unload) and the vLLM stand-in (`tests/servers/vllm/standin.py`, sleep level
//! 2, needs `python3`). `scripts/servers.sh mlserver|ollama` installs the first two; a server
//! that is not there is reported `skipped`.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::{
    http::{Client, Target, free_port},
    process::{Proc, Sidecar, percentile, spawn},
    report::{Printer, Row},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds per driver.
    pub rounds: usize,
    /// MiB the MLServer and vLLM stand-in models hold.
    pub mib: u64,
    /// The sidecar's tick (its poll of the server), ms.
    pub tick_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    KServe,
    Ollama,
    Vllm,
}

impl Kind {
    fn driver(self) -> &'static str {
        match self {
            Self::KServe => "KServeV2",
            Self::Ollama => "Ollama",
            Self::Vllm => "Vllm",
        }
    }

    fn server(self) -> &'static str {
        match self {
            Self::KServe => "MLServer 1.7.1",
            Self::Ollama => "Ollama 0.17.4",
            Self::Vllm => "vLLM stand-in",
        }
    }
}

/// A running model server with one model `m`, its process group killed on drop.
struct Server {
    kind: Kind,
    proc: Proc,
    target: Target,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.proc.pid())])
            .status();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn wait_http(target: &Target, path: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        proc.check_alive()?;
        if let Ok(mut client) = Client::connect(target).await
            && let Ok((200, _)) = client.json(Method::GET, path, None).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer GET {path} within 120 s", proc.what);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start(kind: Kind, dir: &Path, mib: u64) -> anyhow::Result<Option<Server>> {
    let addr = free_port()?;
    let port = addr.port().to_string();
    let target = Target::Tcp(addr);
    let url = format!("http://{addr}");
    let dir = dir.join(kind.driver());
    std::fs::create_dir_all(&dir)?;
    let mut command;
    match kind {
        Kind::KServe => {
            let Some(bin) = std::env::var_os("MODELPOOL_MLSERVER_BIN") else {
                return Ok(None);
            };
            let settings = json!({
                "http_port": addr.port(), "grpc_port": free_port()?.port(),
                "metrics_port": free_port()?.port(), "parallel_workers": 1,
                "load_models_at_startup": false,
            });
            std::fs::write(dir.join("settings.json"), settings.to_string())?;
            let model = dir.join("m");
            std::fs::create_dir_all(&model)?;
            let settings = json!({"name": "m", "implementation": "hog_runtime.Hog",
                                  "parameters": {"extra": {"mib": mib}}});
            std::fs::write(model.join("model-settings.json"), settings.to_string())?;
            std::fs::copy(
                repo().join("tests/servers/mlserver/hog_runtime.py"),
                model.join("hog_runtime.py"),
            )?;
            command = Command::new(bin);
            command.arg("start").arg(&dir).current_dir(&dir);
        }
        Kind::Ollama => {
            let Some(install) = std::env::var_os("MODELPOOL_OLLAMA_DIR").map(PathBuf::from) else {
                return Ok(None);
            };
            command = Command::new(install.join("bin/ollama"));
            command
                .arg("serve")
                .env("OLLAMA_HOST", addr.to_string())
                .env("OLLAMA_MODELS", dir.join("models"))
                .env("HOME", &dir)
                .env("OLLAMA_NUM_PARALLEL", "1")
                .env("OLLAMA_CONTEXT_LENGTH", "512");
            std::fs::write(
                dir.join("Modelfile"),
                format!("FROM {}\n", install.join("tiny.gguf").display()),
            )?;
        }
        Kind::Vllm => {
            command = Command::new("python3");
            command
                .arg(repo().join("tests/servers/vllm/standin.py"))
                .args(["--port", &port, "--model", "m", "--mib", &mib.to_string()]);
        }
    }
    command.process_group(0);
    let mut proc = spawn(command, dir.join("server.log"), kind.server())?;
    let health = match kind {
        Kind::KServe => "/v2/health/ready",
        Kind::Ollama => "/api/version",
        Kind::Vllm => "/health",
    };
    wait_http(&target, health, &mut proc).await?;
    if kind == Kind::Ollama {
        let install = PathBuf::from(std::env::var_os("MODELPOOL_OLLAMA_DIR").unwrap_or_default());
        let out = Command::new(install.join("bin/ollama"))
            .args(["create", "m", "-f"])
            .arg(dir.join("Modelfile"))
            .env("OLLAMA_HOST", addr.to_string())
            .env("HOME", &dir)
            .output()?;
        if !out.status.success() {
            bail!("ollama create: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let server = Server {
        kind,
        proc,
        target,
        url,
    };
    if kind == Kind::Vllm {
        // vLLM starts awake: asleep first, like the others start with nothing loaded.
        server.unload().await?;
    }
    Ok(Some(server))
}

impl Server {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<()> {
        let mut client = Client::connect(&self.target).await?;
        client
            .ok(method, path, body.as_ref())
            .await
            .with_context(|| self.kind.server())?;
        Ok(())
    }

    async fn load(&self) -> anyhow::Result<()> {
        match self.kind {
            Kind::KServe => {
                self.call(
                    Method::POST,
                    "/v2/repository/models/m/load",
                    Some(json!({})),
                )
                .await
            }
            Kind::Ollama => {
                self.call(
                    Method::POST,
                    "/api/generate",
                    Some(json!({"model": "m", "keep_alive": -1, "stream": false})),
                )
                .await
            }
            Kind::Vllm => self.call(Method::POST, "/wake_up", None).await,
        }
    }

    async fn unload(&self) -> anyhow::Result<()> {
        match self.kind {
            Kind::KServe => {
                self.call(
                    Method::POST,
                    "/v2/repository/models/m/unload",
                    Some(json!({})),
                )
                .await
            }
            Kind::Ollama => {
                self.call(
                    Method::POST,
                    "/api/generate",
                    Some(json!({"model": "m", "keep_alive": 0, "stream": false})),
                )
                .await
            }
            Kind::Vllm => self.call(Method::POST, "/sleep?level=2", None).await,
        }
    }

    fn driver_yaml(&self) -> String {
        match self.kind {
            Kind::Vllm => format!(
                "{{kind: Vllm, sleepLevel: 2, servers: {{m: \"{}\"}}, processMatch: \"standin.py --port {}\"}}",
                self.url,
                self.url.rsplit(':').next().unwrap_or_default()
            ),
            kind => format!("{{kind: {}, url: \"{}\"}}", kind.driver(), self.url),
        }
    }
}

/// Runs every driver; one row each.
pub async fn run(options: &Options, dir: &Path, printer: &mut Printer) -> anyhow::Result<()> {
    for kind in [Kind::KServe, Kind::Ollama, Kind::Vllm] {
        let Some(server) = start(kind, dir, options.mib).await? else {
            printer.row(&Row::new("drivers").with("driver", kind.driver()).with(
                "skipped",
                format!("{} is not installed (scripts/servers.sh)", kind.server()),
            ));
            continue;
        };
        let row = one(&server, options, dir).await?;
        printer.row(&row);
    }
    Ok(())
}

async fn one(server: &Server, options: &Options, dir: &Path) -> anyhow::Result<Row> {
    // The server's own unload, no sidecar running.
    let mut baseline = Vec::new();
    for _ in 0..options.rounds {
        server.load().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        server.unload().await?;
        baseline.push(started.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ours: the sidecar unloads at the release and lists the model until it is proven back.
    let pool = dir.join(format!("{}.yaml", server.kind.driver()));
    let ram = match server.kind {
        Kind::Ollama => 8,
        _ => options.mib,
    };
    std::fs::write(
        &pool,
        format!(
            "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: bench}}\nspec:\n  driver: {}\n  limits: {{ram: 8Gi}}\n  policy: {{mode: Aggressive, pressure: {{ramPercent: 100, vramPercent: 100}}}}\n  models:\n  - {{name: m, ram: {ram}Mi}}\n",
            server.driver_yaml()
        ),
    )?;
    let sidecar_dir = dir.join(format!("{}-sidecar", server.kind.driver()));
    std::fs::create_dir_all(&sidecar_dir)?;
    let tick = options.tick_ms.to_string();
    let sidecar =
        Sidecar::start_with(&sidecar_dir, &pool, None, None, &["--tick-ms", &tick]).await?;
    let target = sidecar.unix();
    let session = crate::admission::open_session(&target, &["m".to_owned()]).await?;
    let mut api = Client::connect(&target).await?;
    let mut ours = Vec::new();
    for _ in 0..options.rounds {
        let answer = api
            .ok(
                Method::POST,
                "/v1/acquire",
                Some(&json!({"session": session, "model": "m"})),
            )
            .await?;
        if answer["decision"] != "use" {
            bail!("acquire answered {answer}");
        }
        // Polls see the model held (the level its unload must fall from).
        tokio::time::sleep(Duration::from_millis(options.tick_ms * 3)).await;
        let started = Instant::now();
        api.ok(
            Method::POST,
            "/v1/release",
            Some(&json!({"session": session, "lease": answer["lease"]})),
        )
        .await?;
        loop {
            let state = api.ok(Method::GET, "/v1/state", None).await?;
            if state["models"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{}: the unload was not proven within 60 s: {state}",
                    server.kind.driver()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ours.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let state = api.ok(Method::GET, "/v1/state", None).await?;
    let proven = state["server"]["reclaims"]["proc"].as_u64().unwrap_or(0);
    baseline.sort_by(f64::total_cmp);
    ours.sort_by(f64::total_cmp);
    let ours_p50 = percentile(&ours, 0.5);
    let base_p50 = percentile(&baseline, 0.5);
    Ok(Row::new("drivers")
        .with("driver", server.kind.driver())
        .with("server", server.kind.server())
        .with("rounds", options.rounds)
        .with("tick_ms", options.tick_ms)
        .with("proven_by_proc", proven)
        .num("reclaim_ms_p50", ours_p50, 3)
        .num("reclaim_ms_max", ours.last().copied().unwrap_or(0.0), 3)
        .num("server_unload_ms_p50", base_p50, 3)
        .num(
            "server_unload_ms_max",
            baseline.last().copied().unwrap_or(0.0),
            3,
        )
        .num("ratio_to_server", ours_p50 / base_p50.max(1e-9), 2))
}
