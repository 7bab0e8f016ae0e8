//! Command-line arguments (clap): `modelpool-sidecar [serve flags]` runs the sidecar,
//! `modelpool-sidecar status` prints a running sidecar's state.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

/// The default API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/modelpool/sidecar.sock";

/// ModelPool sidecar: admits model loads within the pool's ceilings, unloads idle models,
/// measures real memory and exports metrics.
#[derive(Debug, Parser)]
#[command(
    name = "modelpool-sidecar",
    version,
    args_conflicts_with_subcommands = true
)]
#[command(subcommand_negates_reqs = true)]
pub struct Cli {
    /// A subcommand; none runs the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The sidecar's flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a running sidecar's models, sessions and memory.
    Status(StatusArgs),
    /// Check ModelPool files as the sidecar reads them at startup, for CI pipelines: exit 0
    /// when every file is valid, 1 (with the same messages as startup) when one is not.
    Validate(ValidateArgs),
}

/// `modelpool-sidecar validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// ModelPool manifests (YAML or JSON).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `modelpool-sidecar status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The sidecar's API socket.
    #[arg(long, env = "MODELPOOL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the raw JSON of GET /v1/state instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The sidecar's flags. Every duration flag takes `500ms`, `10s`, `2m` or a bare number of
/// milliseconds (`--tick 500ms` = `--tick-ms 500`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The ModelPool manifest to enforce (standalone mode). Re-read when it changes; an
    /// invalid edit is refused with a logged reason and the previous pool stays in force.
    #[arg(
        long,
        env = "MODELPOOL_POOL",
        required_unless_present = "pool_name",
        conflicts_with = "pool_name"
    )]
    pub pool: Option<PathBuf>,

    /// Standalone: where the sizes learned by measuring loads are kept, so that a restarted
    /// sidecar admits with them (default `.<pool file>.learned.json` beside the pool file;
    /// `none`: keep nothing).
    #[arg(long, env = "MODELPOOL_LEARNED_FILE", requires = "pool")]
    pub learned_file: Option<PathBuf>,

    /// Cluster mode: the ModelPool to follow, by name, in the pod's namespace (the webhook
    /// sets it). The sidecar reads the pool from the API and reports on its own pod.
    #[arg(long, env = "MODELPOOL_POOL_NAME")]
    pub pool_name: Option<String>,

    /// Cluster mode: this pod's name (downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Cluster mode: this pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Cluster mode: at most one report on the pod per this long (only when it changed).
    #[arg(long, visible_alias = "report-interval", env = "MODELPOOL_REPORT_INTERVAL_MS", default_value_t = 2000, value_parser = duration_ms(100))]
    pub report_interval_ms: u64,

    /// Unix socket for the API.
    #[arg(long, env = "MODELPOOL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Group (numeric gid) of the API socket, which gets mode 0660: the pod's containers share
    /// it as a supplemental group (the webhook sets 65532 for both), so the app can connect
    /// and nobody else can. Unset: the sidecar's own primary group.
    #[arg(long, env = "MODELPOOL_SOCKET_GROUP")]
    pub socket_group: Option<u32>,

    /// Also serve the API on this TCP address (loopback only, unless --api-token is set).
    #[arg(long, env = "MODELPOOL_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Bearer token required on the TCP API.
    #[arg(long, env = "MODELPOOL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "MODELPOOL_METRICS_LISTEN", default_value = "0.0.0.0:9464")]
    pub metrics_listen: SocketAddr,

    /// Most connections open at once on the API socket (and, separately, on --listen); more
    /// are answered 503 `too_many_connections` and closed. Lowered at start when the process's
    /// open-file limit cannot hold every listener's cap.
    #[arg(long, env = "MODELPOOL_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Most connections open at once on the metrics port, counted apart from the API's so
    /// that load there never takes the API's room.
    #[arg(long, env = "MODELPOOL_METRICS_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub metrics_max_connections: u32,

    /// Most sessions open at once; more are refused with 429 `too_many_sessions`. Each
    /// session's names and lists are capped too (docs/sidecar-api.md), so /v1/state stays small.
    #[arg(long, env = "MODELPOOL_MAX_SESSIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sessions: u32,

    /// Every listener: a request head must be complete within this long of the connection
    /// opening or of its previous answer (so idle keep-alive connections close after it too).
    #[arg(long, visible_alias = "header-timeout", env = "MODELPOOL_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = duration_ms(100))]
    pub header_timeout_ms: u64,

    /// Every listener: a request body must arrive within this long (else 408), and an answer
    /// the client does not read for this long ends its connection.
    #[arg(long, visible_alias = "body-timeout", env = "MODELPOOL_BODY_TIMEOUT_MS", default_value_t = 10_000, value_parser = duration_ms(100))]
    pub body_timeout_ms: u64,

    /// Log format.
    #[arg(long, env = "MODELPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level or filter (`debug`, `info,modelpool_sidecar=debug`): overrides `RUST_LOG`,
    /// which is used when this is not set (default `info`).
    #[arg(long, env = "MODELPOOL_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Heartbeat interval asked of sessions; two missed heartbeats end a session.
    #[arg(long, visible_alias = "heartbeat", env = "MODELPOOL_HEARTBEAT_MS", default_value_t = 2000, value_parser = duration_ms(50))]
    pub heartbeat_ms: u64,

    /// How long an unload may take to show its memory back before `MemoryNotReclaimed`.
    #[arg(long, visible_alias = "reclaim-timeout", env = "MODELPOOL_RECLAIM_TIMEOUT_MS", default_value_t = 10_000, value_parser = duration_ms(1))]
    pub reclaim_timeout_ms: u64,

    /// How often the sidecar measures, checks sessions and applies the policy's timers.
    #[arg(long, visible_alias = "tick", env = "MODELPOOL_TICK_MS", default_value_t = 500, value_parser = duration_ms(10))]
    pub tick_ms: u64,

    /// How often the pool file's modification time is checked.
    #[arg(long, visible_alias = "pool-poll", env = "MODELPOOL_POOL_POLL_MS", default_value_t = 1000, value_parser = duration_ms(10))]
    pub pool_poll_ms: u64,

    /// On SIGTERM, how long to wait for apps to unload idle models before exiting.
    #[arg(long, visible_alias = "shutdown-grace", env = "MODELPOOL_SHUTDOWN_GRACE_MS", default_value_t = 10_000, value_parser = duration_ms(0))]
    pub shutdown_grace_ms: u64,

    /// Timeout of the driver's load/unload calls to the app or model server.
    #[arg(long, visible_alias = "driver-timeout", env = "MODELPOOL_DRIVER_TIMEOUT_MS", default_value_t = 600_000, value_parser = duration_ms(1))]
    pub driver_timeout_ms: u64,

    /// Server drivers (`KServeV2`, `Ollama`, `Vllm`): the server's URL when the pool gives no
    /// `driver.url` (the operator's injection sets it from the server container's port).
    /// Neither: the server's usual port on 127.0.0.1 (Ollama 11434, KServeV2 8080, Vllm 8000).
    #[arg(long, env = "MODELPOOL_DRIVER_URL")]
    pub driver_url: Option<String>,

    /// Server drivers: a substring of the server's command line that finds its processes, when
    /// the pool gives no `driver.processMatch` (the injection sets it from the server
    /// container's command and args). Neither: the owner of the URL's port.
    #[arg(long, env = "MODELPOOL_PROCESS_MATCH")]
    pub process_match: Option<String>,

    /// Serving proxy: listen here and forward to --upstream, admitting each request that
    /// names a model under a lease on it (docs/proxy.md).
    #[arg(long, env = "MODELPOOL_PROXY_LISTEN")]
    pub proxy_listen: Option<SocketAddr>,

    /// Serving proxy: the inference server, `http://127.0.0.1:PORT` (default: the pool's
    /// driver url). `Vllm` pools: requests naming a model go to that model's server
    /// (`driver.servers`), the rest here (default: the first server listed).
    #[arg(long, env = "MODELPOOL_UPSTREAM")]
    pub upstream: Option<String>,

    /// Serving proxy: the largest request body, in bytes (413 above it).
    #[arg(long, env = "MODELPOOL_PROXY_BODY_LIMIT", default_value_t = crate::proxy::DEFAULT_BODY_LIMIT)]
    pub proxy_body_limit: u64,

    /// Serving proxy: the most requests waiting for admission at once (429 above it).
    #[arg(long, env = "MODELPOOL_PROXY_MAX_QUEUE", default_value_t = crate::proxy::DEFAULT_MAX_QUEUE)]
    pub proxy_max_queue: usize,

    /// Serving proxy: the most requests in flight per model (0: no limit); more wait in the
    /// queue, up to the pool's acquireTimeout.
    #[arg(long, env = "MODELPOOL_PROXY_MODEL_CONCURRENCY", default_value_t = 0)]
    pub proxy_model_concurrency: u32,

    /// Serving proxy: the most client connections open at once, counted apart from the API's.
    /// At the cap a new connection closes the oldest one with no request under way (idle
    /// keep-alive, or a head still arriving); when every one is answering, the new one gets
    /// 503. Lowered to fit the open-file limit (each proxied request also holds a connection
    /// to the server).
    #[arg(long, env = "MODELPOOL_PROXY_MAX_CONNECTIONS", default_value_t = crate::proxy::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub proxy_max_connections: u32,

    /// Serving proxy: worker threads of its own runtime (0: one per core this process may use,
    /// a CPU limit included, at most 4). The API
    /// answers on one thread (its work per request is microseconds); the proxy does a second
    /// HTTP exchange per request, and on one thread 32 clients arriving together queue behind
    /// each other (+1.5 ms p99 at 10 ms of server work on 2 cores).
    #[arg(long, env = "MODELPOOL_PROXY_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub proxy_threads: u16,

    /// Do not use NVML (GPU readings then come only from the apps' heartbeats).
    #[arg(long, env = "MODELPOOL_NO_NVML")]
    pub no_nvml: bool,

    /// When NVML is unavailable, read device memory through the CUDA driver instead. Costs a
    /// CUDA context on device 0 (about 500 MiB of VRAM), so it is off by default.
    #[arg(long, env = "MODELPOOL_CUDA_FALLBACK")]
    pub cuda_fallback: bool,
}

/// A clap parser for a duration flag kept in milliseconds: `500ms`, `10s`, `2m`, `1m 30s` (jiff's
/// friendly format), or a bare number of milliseconds (what the `*-ms` flags always took); at
/// least `min_ms`.
pub fn duration_ms(min_ms: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync {
    move |text: &str| {
        let text = text.trim();
        let ms = match text.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => {
                let duration: jiff::SignedDuration = text.parse().map_err(|_| {
                    format!(
                        "expected a duration like 500ms, 10s or 2m (a bare number is milliseconds), got {text:?}"
                    )
                })?;
                if duration.is_negative() {
                    return Err(format!("{text:?} is negative"));
                }
                u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long"))?
            }
        };
        if ms < min_ms {
            return Err(format!(
                "{text:?} is {ms} ms, under the minimum of {min_ms} ms"
            ));
        }
        Ok(ms)
    }
}

/// Invalid flag combinations clap cannot express.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A non-loopback TCP API without a token.
    #[error(
        "--listen {0} is not a loopback address: the API can load and unload models, so it needs --api-token to listen beyond 127.0.0.1/::1"
    )]
    ExposedWithoutToken(SocketAddr),
    /// An empty token.
    #[error("--api-token must not be empty")]
    EmptyToken,
    /// No pool.
    #[error("--pool FILE (standalone) or --pool-name NAME (cluster mode) is required")]
    NoPool,
    /// Cluster mode without its placement.
    #[error("cluster mode (--pool-name) needs {0} (set by the webhook from the downward API)")]
    NoPlacement(&'static str),
}

impl ServeArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ArgsError> {
        if self.pool.is_none() && self.pool_name.is_none() {
            return Err(ArgsError::NoPool);
        }
        if self.pool.is_none() {
            if self.pod_name.is_none() {
                return Err(ArgsError::NoPlacement("--pod-name (POD_NAME)"));
            }
            if self.pod_namespace.is_none() {
                return Err(ArgsError::NoPlacement("--pod-namespace (POD_NAMESPACE)"));
            }
        }
        if self.api_token.as_deref() == Some("") {
            return Err(ArgsError::EmptyToken);
        }
        if let Some(addr) = self.listen
            && !addr.ip().is_loopback()
            && self.api_token.is_none()
        {
            return Err(ArgsError::ExposedWithoutToken(addr));
        }
        Ok(())
    }

    /// `--heartbeat-ms`.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// `--tick-ms`.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// `--reclaim-timeout-ms`.
    pub fn reclaim_timeout(&self) -> Duration {
        Duration::from_millis(self.reclaim_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("modelpool-sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn serve_needs_a_pool_but_status_does_not() {
        assert!(parse(&[]).is_err());
        let cli = parse(&["--pool", "p.yaml"]).unwrap();
        assert!(cli.command.is_none());
        cli.serve.validate().unwrap();
        let cli = parse(&["status", "--socket", "/tmp/s.sock"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Status(_))));
    }

    #[test]
    fn non_loopback_listen_needs_a_token() {
        let cli = parse(&["--pool", "p", "--listen", "0.0.0.0:8080"]).unwrap();
        assert!(matches!(
            cli.serve.validate(),
            Err(ArgsError::ExposedWithoutToken(_))
        ));
        let cli = parse(&[
            "--pool",
            "p",
            "--listen",
            "0.0.0.0:8080",
            "--api-token",
            "t",
        ])
        .unwrap();
        cli.serve.validate().unwrap();
        let cli = parse(&["--pool", "p", "--listen", "127.0.0.1:8080"]).unwrap();
        cli.serve.validate().unwrap();
    }
}
