//! `modelpool-bench SCENARIO [--json]`: see `BENCHMARKS.md`.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use modelpool_bench::{
    admission, eviction, exactness, footprint,
    http::{Target, serve_fixed},
    reclaim,
    report::Printer,
    scale, tables, trace,
};

/// ModelPool benchmarks: each figure comes with the baseline it is divided by, measured in the
/// same run.
#[derive(Debug, Parser)]
#[command(name = "modelpool-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The policy engine against LRU, TTL (Ollama keep_alive), max-N LRU (Ray Serve) and an
    /// offline bound, on synthetic traces or a trace file.
    Eviction(EvictionArgs),
    /// Acquire + release of a loaded model through the real sidecar vs a bare HTTP server.
    Admission(AdmissionArgs),
    /// Release-to-reclaimed time and bytes returned, with a real app process.
    Reclaim(ReclaimArgs),
    /// Requests through the sidecar's serving proxy vs straight to the same upstream (small
    /// and streaming answers, a loaded model).
    Proxy(ProxyArgs),
    /// The sidecar's own RSS, idle CPU and /metrics time.
    Footprint(FootprintArgs),
    /// Server drivers (MLServer, Ollama, the vLLM stand-in): unload to memory proven back on
    /// the server's process tree vs the server's own unload call.
    Drivers(DriversArgs),
    /// The operator at scale against a real kube-apiserver (needs the operator binary and the
    /// control-plane tools).
    Scale(ScaleArgs),
    /// Print a synthetic trace as JSON lines (the format `eviction --trace` reads).
    Trace(TraceArgs),
    /// The baseline server (used by admission and footprint).
    #[command(hide = true)]
    ServeBaseline(ServeArgs),
    /// The app process of the reclaim scenario.
    #[command(hide = true)]
    Child(ChildArgs),
    /// The upstream server of the proxy scenario.
    #[command(hide = true)]
    ProxyUpstream(ProxyUpstreamArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// One JSON object per result line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EvictionArgs {
    #[command(flatten)]
    common: Common,
    /// Replay a trace file (JSON lines {"t", "model", "hold_s"}) instead of the synthetic ones.
    #[arg(long, requires = "pool")]
    trace: Option<PathBuf>,
    /// The ModelPool manifest giving the trace file's models, sizes, load costs, ceilings and
    /// policy (mode, eviction, idleTTL, pressure, priorities: the `manifest` contender).
    #[arg(long, requires = "trace")]
    pool: Option<PathBuf>,
    /// Synthetic trace families to run (zipf-S for any skew S).
    #[arg(long, value_delimiter = ',', default_values_t = trace::SYNTHETIC.map(String::from))]
    traces: Vec<String>,
    /// Requests per synthetic trace.
    #[arg(long, default_value_t = 1_000)]
    requests: usize,
    /// Seeds of the synthetic traces (default: the report seeds, held apart from tuning).
    #[arg(long, value_delimiter = ',', default_values_t = trace::REPORT_SEEDS)]
    seeds: Vec<u64>,
    /// Contenders to run (the offline schedule and the bound are always computed: every cost
    /// is divided by both).
    #[arg(long, value_delimiter = ',', default_values_t = eviction::Contender::ALL.map(|c| c.name().to_owned()))]
    policies: Vec<String>,
    /// Idle TTL of the Cache-mode policies and the keep_alive baseline, seconds (default: the
    /// pool's idleTTL, 300 for synthetic traces).
    #[arg(long)]
    ttl_s: Option<f64>,
    /// Requests per linear program of the lower bound (larger: tighter and slower).
    #[arg(long, default_value_t = 150)]
    bound_window: usize,
    /// Skip the lower bound.
    #[arg(long)]
    no_bound: bool,
    /// Also print cost against memory held for TTL policies at several TTLs.
    #[arg(long)]
    memory: bool,
    /// Check the bound and the offline schedule against the exact optimum on this many random
    /// small instances (where it can be computed), and the bound against every policy.
    #[arg(long)]
    exact: Option<usize>,
    /// Write the result tables (markdown) into this file between the
    /// `<!-- eviction-tables:begin -->` and `<!-- eviction-tables:end -->` lines.
    #[arg(long)]
    update_doc: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DriversArgs {
    #[command(flatten)]
    common: Common,
    /// Rounds per driver.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// MiB the MLServer and vLLM stand-in models hold.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// The sidecar's tick (its poll of the server), ms.
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
}

#[derive(Debug, Args)]
struct AdmissionArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds measured per transport, client count and side.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Slices the seconds are cut in, alternating sidecar and baseline.
    #[arg(long, default_value_t = 6)]
    slices: usize,
    /// Concurrent client counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 32])]
    clients: Vec<usize>,
    /// Models in the pool (each loaded by every session), one sidecar per count.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
    models: Vec<usize>,
    /// Sessions loading every model.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
}

#[derive(Debug, Args)]
struct ProxyArgs {
    #[command(flatten)]
    common: Common,
    /// Seconds measured per kind, client count and side.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// Slices the seconds are cut in, alternating proxy and direct. Each proxied slice's p99
    /// is compared with the direct slice before it: `added_p99_slice_*` is the median of
    /// those differences and its 95 % interval (at least 6 slices).
    #[arg(long, default_value_t = 12)]
    slices: usize,
    /// Concurrent client counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 32])]
    clients: Vec<usize>,
    /// Chunks of a streaming answer.
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    /// Simulated inference time of the upstream per request, µs.
    #[arg(long, default_value_t = 0)]
    work_us: u64,
    /// Bytes of prompt text in each request body (0: a one-word prompt). A chat request with
    /// a long context: the proxy scans every byte of the body for a second `"model"` key.
    #[arg(long, default_value_t = 0)]
    prompt_bytes: usize,
}

#[derive(Debug, Args)]
struct ProxyUpstreamArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    #[arg(long, default_value_t = 0)]
    work_us: u64,
}

#[derive(Debug, Args)]
struct ReclaimArgs {
    #[command(flatten)]
    common: Common,
    /// Model sizes, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 512])]
    model_mib: Vec<u64>,
    /// Rounds per mode and size.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

#[derive(Debug, Args)]
struct FootprintArgs {
    #[command(flatten)]
    common: Common,
    /// Models in the pool (at most 64).
    #[arg(long, default_value_t = 50)]
    models: usize,
    /// App sessions that each load every model.
    #[arg(long, default_value_t = 2)]
    sessions: usize,
    /// Idle window for the CPU reading, seconds.
    #[arg(long, default_value_t = 30.0)]
    idle_s: f64,
    /// GETs of /metrics averaged.
    #[arg(long, default_value_t = 500)]
    gets: usize,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    #[command(flatten)]
    common: Common,
    /// ModelPools.
    #[arg(long, default_value_t = 10)]
    pools: usize,
    /// Pods, spread over the pools.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Concurrent API clients for creates and report patches.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Single-report latency samples.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// The operator's --api-qps.
    #[arg(long, default_value_t = 50)]
    api_qps: u64,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// zipf-S, bursty or pipeline.
    name: String,
    /// Requests.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Unix socket to serve on.
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// TCP address to serve on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Reply with this many bytes instead of an acquire-sized answer.
    #[arg(long)]
    reply_bytes: Option<usize>,
}

#[derive(Debug, Args)]
struct ChildArgs {
    /// The sidecar's API socket.
    #[arg(long)]
    socket: PathBuf,
    /// MiB the model holds once loaded.
    #[arg(long)]
    mib: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Eviction(args) => run_eviction(args),
        Scenario::Admission(args) => {
            let mut printer = Printer::new(args.common.json);
            let dir = tempfile::tempdir()?;
            let options = admission::Options {
                seconds: args.seconds,
                slices: args.slices,
                clients: args.clients,
                models: args.models,
                sessions: args.sessions,
            };
            runtime()?.block_on(admission::run(&options, dir.path(), &mut printer))?;
            printer.finish();
            Ok(())
        }
        Scenario::Proxy(args) => {
            let mut printer = Printer::new(args.common.json);
            let dir = tempfile::tempdir()?;
            let options = modelpool_bench::proxy::Options {
                seconds: args.seconds,
                slices: args.slices,
                clients: args.clients,
                chunks: args.chunks,
                work_us: args.work_us,
                prompt_bytes: args.prompt_bytes,
            };
            runtime()?.block_on(modelpool_bench::proxy::run(
                &options,
                dir.path(),
                &mut printer,
            ))?;
            printer.finish();
            Ok(())
        }
        Scenario::Reclaim(args) => {
            let mut printer = Printer::new(args.common.json);
            let dir = tempfile::tempdir()?;
            let options = reclaim::Options {
                model_mib: args.model_mib,
                rounds: args.rounds.max(1),
            };
            runtime()?.block_on(reclaim::run(&options, dir.path(), &mut printer))?;
            printer.finish();
            Ok(())
        }
        Scenario::Drivers(args) => {
            let mut printer = Printer::new(args.common.json);
            let dir = tempfile::tempdir()?;
            let options = modelpool_bench::drivers::Options {
                rounds: args.rounds.max(1),
                mib: args.mib,
                tick_ms: args.tick_ms.max(10),
            };
            runtime()?.block_on(modelpool_bench::drivers::run(
                &options,
                dir.path(),
                &mut printer,
            ))?;
            printer.finish();
            Ok(())
        }
        Scenario::Footprint(args) => {
            let mut printer = Printer::new(args.common.json);
            let dir = tempfile::tempdir()?;
            let options = footprint::Options {
                models: args.models,
                sessions: args.sessions,
                idle_s: args.idle_s,
                gets: args.gets.max(1),
            };
            runtime()?.block_on(footprint::run(&options, dir.path(), &mut printer))?;
            printer.finish();
            Ok(())
        }
        Scenario::Scale(args) => {
            let mut printer = Printer::new(args.common.json);
            let options = scale::Options {
                pools: args.pools.max(1),
                pods: args.pods.max(1),
                concurrency: args.concurrency.max(1),
                samples: args.samples.max(1),
                api_qps: args.api_qps,
            };
            scale::run(&options, &mut printer)?;
            printer.finish();
            Ok(())
        }
        Scenario::Trace(args) => {
            let w = trace::synthetic(&args.name, args.requests, args.seed)?;
            for line in trace::to_lines(&w) {
                println!("{}", serde_json::to_string(&line)?);
            }
            Ok(())
        }
        Scenario::ServeBaseline(args) => {
            let target = match (args.socket, args.listen) {
                (Some(path), _) => Target::Unix(path),
                (None, Some(addr)) => Target::Tcp(addr),
                (None, None) => bail!("give --socket or --listen"),
            };
            let reply = match args.reply_bytes {
                Some(n) => "#".repeat(n.saturating_sub(1)) + "\n",
                None => r#"{"decision":"use","lease":"l-1","model":"m"}"#.to_owned(),
            };
            runtime()?.block_on(serve_fixed(&target, reply.into()))
        }
        Scenario::ProxyUpstream(args) => runtime()?.block_on(
            modelpool_bench::proxy::serve_upstream(args.listen, args.chunks.max(1), args.work_us),
        ),
        Scenario::Child(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(reclaim::child(&args.socket, args.mib))
        }
    }
}

fn run_eviction(args: EvictionArgs) -> anyhow::Result<()> {
    let mut contenders = Vec::new();
    for name in &args.policies {
        match eviction::Contender::from_name(name) {
            Some(c) => contenders.push(c),
            None => bail!(
                "unknown policy {name:?} (known: {})",
                eviction::Contender::ALL.map(|c| c.name()).join(", ")
            ),
        }
    }
    let mut printer = Printer::new(args.common.json);
    if let Some(instances) = args.exact {
        for row in exactness::check(instances, args.seeds.first().copied().unwrap_or(1))? {
            printer.row(&row);
        }
        printer.finish();
        return Ok(());
    }
    let mut workloads = Vec::new();
    if let (Some(t), Some(p)) = (&args.trace, &args.pool) {
        workloads.push((trace::from_files(t, p)?, None));
    } else {
        for name in &args.traces {
            for &seed in &args.seeds {
                workloads.push((trace::synthetic(name, args.requests, seed)?, Some(seed)));
            }
        }
    }
    if workloads.is_empty() {
        bail!("no traces to run");
    }
    let options = |seed| eviction::RunOptions {
        contenders: contenders.clone(),
        bound_window: (!args.no_bound).then_some(args.bound_window),
        seed,
    };
    let mut all = Vec::new();
    let mut memory = Vec::new();
    for (mut w, seed) in workloads {
        if let Some(ttl) = args.ttl_s {
            w.idle_ttl = std::time::Duration::from_secs_f64(ttl.max(0.0));
        }
        for row in eviction::rows(&w, &options(seed))? {
            printer.row(&row);
            all.push(row);
        }
        if args.memory || args.update_doc.is_some() {
            for row in eviction::pareto_rows(&w, seed) {
                printer.row(&row);
                memory.push(row);
            }
        }
    }
    printer.finish();
    if let Some(path) = &args.update_doc {
        let tables = tables::markdown(&all, &memory);
        tables::splice(path, &tables)?;
        eprintln!("wrote the eviction tables into {}", path.display());
    }
    Ok(())
}
