//! The `admission` scenario: acquire + release of an already-loaded model through the real
//! sidecar, with 1 and 32 concurrent clients, over the Unix socket and loopback TCP; the limit
//! is a bare hyper server on the same transport answering a fixed reply, measured in the same
//! run with the same client. One op is two requests on both sides. `--models` runs it again
//! with that many models in the pool, each loaded by every one of `--sessions` sessions, so
//! the cost of a larger ledger shows (the op is always on the first model of the first
//! session).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::{
    http::{Client, Target, free_port},
    process::{Sidecar, percentile, start_baseline},
    report::{Printer, Row},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds measured per (transport, clients, side).
    pub seconds: f64,
    /// Alternating slices the seconds are cut in.
    pub slices: usize,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Pool sizes (models), one sidecar each.
    pub models: Vec<usize>,
    /// Sessions loading every model.
    pub sessions: usize,
}

/// A pool of one small model, kept loaded (Cache mode, long idle TTL).
pub fn pool_yaml(models: &[(&str, &str)], mode: &str) -> String {
    let mut text = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata:\n  name: bench\nspec:\n  policy:\n    mode: {mode}\n    idleTTL: 1h\n  models:\n"
    );
    for (name, ram) in models {
        text.push_str(&format!("    - name: {name}\n      ram: {ram}\n"));
    }
    text
}

/// Opens a session and keeps it alive with heartbeats (a background task on its own
/// connection). Returns the session id.
pub async fn open_session(target: &Target, models: &[String]) -> anyhow::Result<String> {
    let mut client = Client::connect(target).await?;
    let answer = client
        .ok(
            Method::POST,
            "/v1/sessions",
            Some(&json!({"pid": std::process::id(), "app": "modelpool-bench", "models": models})),
        )
        .await?;
    let session = answer["session"]
        .as_str()
        .context("POST /v1/sessions: no session in the answer")?
        .to_owned();
    let every = Duration::from_millis(answer["heartbeat_ms"].as_u64().unwrap_or(2000) / 2);
    let path = format!("/v1/sessions/{session}/heartbeat");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if client
                .ok(Method::POST, &path, Some(&json!({})))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Ok(session)
}

/// Acquires `model` for `session`, loads it (reporting `ram_bytes`) if asked, releases.
pub async fn load_once(
    client: &mut Client,
    session: &str,
    model: &str,
    ram_bytes: u64,
) -> anyhow::Result<()> {
    let answer = client
        .ok(
            Method::POST,
            "/v1/acquire",
            Some(&json!({"session": session, "model": model, "wait": true})),
        )
        .await?;
    let lease = answer["lease"].clone();
    if answer["decision"] == "load" {
        client
            .ok(
                Method::POST,
                "/v1/loaded",
                Some(&json!({"session": session, "lease": lease, "ok": true,
                    "load_seconds": 0.01, "vram_bytes": 0, "ram_bytes": ram_bytes})),
            )
            .await?;
    }
    client
        .ok(
            Method::POST,
            "/v1/release",
            Some(&json!({"session": session, "lease": lease})),
        )
        .await?;
    Ok(())
}

/// One op: acquire (parse the lease from the answer) then release it.
async fn op(
    client: &mut Client,
    acquire: &hyper::body::Bytes,
    session: &str,
) -> anyhow::Result<()> {
    let (status, body) = client
        .raw(Method::POST, "/v1/acquire", Some(acquire.clone()))
        .await?;
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status != 200 {
        bail!("acquire answered {status}: {answer}");
    }
    let release = json!({"session": session, "lease": answer["lease"]}).to_string();
    let (status, body) = client
        .raw(Method::POST, "/v1/release", Some(release.into()))
        .await?;
    if status != 200 {
        bail!(
            "release answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Ops per second and sorted latencies (µs) of `clients` concurrent clients for `seconds`.
async fn measure(
    target: &Target,
    clients: usize,
    seconds: f64,
    session: &str,
    model: &str,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let acquire: hyper::body::Bytes = json!({"session": session, "model": model, "wait": true})
        .to_string()
        .into();
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(Client::connect(target).await?);
    }
    // Warm up every connection.
    for c in &mut connections {
        op(c, &acquire, session).await?;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for mut client in connections {
        let acquire = acquire.clone();
        let session = session.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                op(&mut client, &acquire, &session).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((all.len() as f64 / elapsed, all))
}

/// Runs the scenario.
pub async fn run(options: &Options, dir: &Path, printer: &mut Printer) -> anyhow::Result<()> {
    for &models in &options.models {
        let run_dir = dir.join(format!("models-{models}"));
        std::fs::create_dir_all(&run_dir)?;
        run_one(options, models.max(1), &run_dir, printer).await?;
    }
    Ok(())
}

async fn run_one(
    options: &Options,
    models: usize,
    dir: &Path,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let names: Vec<String> = (0..models).map(|i| format!("m{i:03}")).collect();
    let sizes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1Mi")).collect();
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, pool_yaml(&sizes, "Cache"))?;
    let tcp = free_port()?;
    let sidecar = Sidecar::start(dir, &pool, Some(tcp), None).await?;
    let mut setup = Client::connect(&sidecar.unix()).await?;
    let mut session = String::new();
    for index in 0..options.sessions.max(1) {
        let opened = open_session(&sidecar.unix(), &names).await?;
        for name in &names {
            load_once(&mut setup, &opened, name, 1 << 20).await?;
        }
        if index == 0 {
            session = opened;
        }
    }
    let model = names[0].as_str();

    let baseline_unix = Target::Unix(dir.join("baseline.sock"));
    let baseline_tcp = Target::Tcp(free_port()?);
    let _baselines = [
        start_baseline(dir, &baseline_unix, None)?,
        start_baseline(dir, &baseline_tcp, None)?,
    ];
    let sides = [
        (sidecar.unix(), baseline_unix),
        (Target::Tcp(tcp), baseline_tcp),
    ];
    // The two sides alternate in slices, so that load from elsewhere on a shared machine
    // falls on both alike.
    let slices = options.slices.max(1);
    let slice = options.seconds / slices as f64;
    for (ours, bare) in &sides {
        for &clients in &options.clients {
            let (mut base_n, mut base_lat, mut n, mut lat) = (0.0, Vec::new(), 0.0, Vec::new());
            for _ in 0..slices {
                let (ops, l) = measure(bare, clients, slice, &session, model).await?;
                base_n += ops * slice;
                base_lat.extend(l);
                let (ops, l) = measure(ours, clients, slice, &session, model).await?;
                n += ops * slice;
                lat.extend(l);
            }
            base_lat.sort_by(f64::total_cmp);
            lat.sort_by(f64::total_cmp);
            let base_ops = base_n / options.seconds;
            let ops = n / options.seconds;
            printer.row(
                &Row::new("admission")
                    .with("transport", ours.transport())
                    .with("clients", clients)
                    .with("models", models)
                    .with("sessions", options.sessions.max(1))
                    .num("ops_per_s", ops, 4)
                    .num("p50_us", percentile(&lat, 50.0), 3)
                    .num("p99_us", percentile(&lat, 99.0), 3)
                    .num("baseline_ops_per_s", base_ops, 4)
                    .num("baseline_p50_us", percentile(&base_lat, 50.0), 3)
                    .num("baseline_p99_us", percentile(&base_lat, 99.0), 3)
                    .num("ratio_to_baseline", ops / base_ops, 3)
                    .with("ops", lat.len()),
            );
        }
    }
    drop(sidecar);
    Ok(())
}
