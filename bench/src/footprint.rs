//! The `footprint` scenario: what the sidecar itself costs. RSS idle and with 100 model
//! instances loaded (a pool may list at most 64 models, so: 50 models, each loaded by two app
//! sessions), CPU over an idle window (sessions heartbeating, nothing asked), and the time to
//! serve `/metrics`. Baselines, measured in the same run: the bare hyper server's RSS and idle
//! CPU, and the time it takes to serve a fixed reply as large as the metrics page.

use std::{path::Path, time::Duration, time::Instant};

use anyhow::Context;
use hyper::Method;

use crate::{
    admission::{load_once, open_session, pool_yaml},
    http::{Client, Target, free_port},
    process::{Sidecar, clock_ticks_per_second, cpu_ticks, rss_bytes, start_baseline},
    report::{Printer, Row},
};

const MIB: f64 = (1u64 << 20) as f64;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Models in the pool.
    pub models: usize,
    /// Sessions loading every model.
    pub sessions: usize,
    /// Idle window for the CPU reading, seconds.
    pub idle_s: f64,
    /// GETs of /metrics averaged.
    pub gets: usize,
}

async fn mean_get_us(target: &Target, path: &str, gets: usize) -> anyhow::Result<(f64, usize)> {
    let mut client = Client::connect(target).await?;
    let (status, body) = client.raw(Method::GET, path, None).await?;
    anyhow::ensure!(status == 200, "GET {path} answered {status}");
    let start = Instant::now();
    for _ in 0..gets {
        client.raw(Method::GET, path, None).await?;
    }
    Ok((
        start.elapsed().as_secs_f64() * 1e6 / gets.max(1) as f64,
        body.len(),
    ))
}

/// Runs the scenario.
pub async fn run(options: &Options, dir: &Path, printer: &mut Printer) -> anyhow::Result<()> {
    let names: Vec<String> = (0..options.models).map(|i| format!("m{i:03}")).collect();
    let models: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1Mi")).collect();
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, pool_yaml(&models, "Cache"))?;
    let metrics = free_port()?;
    let mut sidecar = Sidecar::start(dir, &pool, None, Some(metrics)).await?;
    let baseline_target = Target::Tcp(free_port()?);
    let baseline = start_baseline(dir, &baseline_target, None)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = sidecar.proc.pid();
    let rss_idle = rss_bytes(pid)?;
    let baseline_rss = rss_bytes(baseline.pid())?;

    let mut client = Client::connect(&sidecar.unix()).await?;
    for _ in 0..options.sessions {
        let session = open_session(&sidecar.unix(), &names).await?;
        for name in &names {
            load_once(&mut client, &session, name, 1 << 20).await?;
        }
    }
    let state = client.ok(Method::GET, "/v1/state", None).await?;
    let instances = state["models"].as_array().map_or(0, Vec::len);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_loaded = rss_bytes(pid)?;

    let hz = clock_ticks_per_second() as f64;
    let (cpu0, base0, t0) = (cpu_ticks(pid)?, cpu_ticks(baseline.pid())?, Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(options.idle_s)).await;
    let (cpu1, base1, elapsed) = (
        cpu_ticks(pid)?,
        cpu_ticks(baseline.pid())?,
        t0.elapsed().as_secs_f64(),
    );
    sidecar.proc.check_alive()?;
    let percent = |ticks: u64| ticks as f64 / hz / elapsed * 100.0;

    let (metrics_us, metrics_bytes) = mean_get_us(&Target::Tcp(metrics), "/metrics", options.gets)
        .await
        .context("GET /metrics on --metrics-listen")?;
    let fixed_target = Target::Tcp(free_port()?);
    let _fixed = start_baseline(dir, &fixed_target, Some(metrics_bytes))?;
    let (fixed_us, _) = mean_get_us(&fixed_target, "/metrics", options.gets).await?;
    printer.row(
        &Row::new("footprint")
            .with("instances", instances)
            .num("rss_idle_mib", rss_idle as f64 / MIB, 3)
            .num("rss_100_models_mib", rss_loaded as f64 / MIB, 3)
            .num("cpu_idle_percent", percent(cpu1 - cpu0), 3)
            .num("idle_window_s", elapsed, 3)
            .num("metrics_render_us", metrics_us, 3)
            .with("metrics_bytes", metrics_bytes)
            .num("baseline_rss_mib", baseline_rss as f64 / MIB, 3)
            .num("baseline_cpu_idle_percent", percent(base1 - base0), 3)
            .num("baseline_fixed_reply_us", fixed_us, 3)
            .num(
                "ratio_rss_to_baseline",
                rss_idle as f64 / baseline_rss as f64,
                3,
            )
            .num("ratio_metrics_to_baseline", metrics_us / fixed_us, 3),
    );
    Ok(())
}
