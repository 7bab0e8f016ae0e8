//! The `scale` scenario: the real operator against a real kube-apiserver + etcd (the test
//! control plane of `tests/`, built from pinned Go modules), with many pods in several pools.
//!
//! Measured, each against the apiserver's own figure for the same thing in the same run:
//! - pod creation through the injection webhook vs creating pods the webhook does not select;
//! - a report storm (every pod's sidecar report annotation patched at once): time until every
//!   pool's status counts every pod, vs time until a plain watch on pods has seen every patch
//!   (the operator learns by watching, so it cannot be faster than that);
//! - one report: time until the pool's status shows it, vs time until a watch sees it;
//! - the operator's RSS and CPU, its status writes and reconciles.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use modelpool_crds::{
    ModelPool,
    report::{ModelReport, PodReport, REPORT_ANNOTATION},
};
use modelpool_e2e::{ControlPlane, support::webhook_config};
use tokio::sync::mpsc;

use crate::{
    http::{Client, Target, free_port},
    process::{Proc, clock_ticks_per_second, cpu_ticks, percentile, rss_bytes},
    report::{Printer, Row},
};

const GIB: u64 = 1 << 30;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Pools.
    pub pools: usize,
    /// Pods, spread over the pools.
    pub pods: usize,
    /// Concurrent API clients for creates and patches.
    pub concurrency: usize,
    /// Single-report latency samples.
    pub samples: usize,
    /// The operator's `--api-qps`.
    pub api_qps: u64,
}

/// The operator binary: `$MODELPOOL_OPERATOR_BIN`, else next to this binary, else
/// `${CARGO_TARGET_DIR:-target}/release/modelpool-operator`.
pub fn operator_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MODELPOOL_OPERATOR_BIN") {
        return Some(PathBuf::from(path));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        tried.push(dir.join("modelpool-operator"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    tried.push(target.join("release/modelpool-operator"));
    tried.into_iter().find(|p| p.is_file())
}

/// Why the scenario cannot run here, if it cannot: no operator binary, or no control-plane
/// tools (they are built by `scripts/build-tools.sh`, which takes a long while the first time,
/// so the bench does not start that build itself).
pub fn unavailable() -> Option<String> {
    if operator_bin().is_none() {
        return Some(
            "operator not available: build it with `cargo build --release -p modelpool-operator` or set MODELPOOL_OPERATOR_BIN".to_owned(),
        );
    }
    let tools_ready = std::env::var_os("MODELPOOL_TOOLS_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = Command::new("bash")
                .arg(root.join("scripts/build-tools.sh"))
                .arg("--stamp")
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let stamp = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("modelpool/tools").join(stamp).join("bin"))
        })
        .is_some_and(|bin| {
            ["kube-apiserver", "etcd"]
                .iter()
                .all(|t| bin.join(t).is_file())
        });
    if !tools_ready {
        return Some(
            "control plane not available: build kube-apiserver and etcd with scripts/build-tools.sh".to_owned(),
        );
    }
    None
}

fn pool_manifest(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"modelpool.io/pool": name}},
            "limits": {"vram": "20Gi", "ram": "16Gi"},
            "models": [
                {"name": "t2v", "vram": "12Gi", "ram": "2Gi"},
                {"name": "upscale", "vram": "4Gi", "ram": "12Gi"},
                {"name": "frame_interpolation", "vram": "2Gi", "ram": "9Gi"}
            ]
        }
    })
}

fn pod(name: &str, pool: Option<&str>) -> anyhow::Result<Pod> {
    let mut labels = serde_json::json!({"app": "bench"});
    if let Some(pool) = pool {
        labels["modelpool.io/pool"] = pool.into();
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "python:3.12-slim",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))?)
}

fn report(pool: &str, v: u64, loads: u64) -> PodReport {
    PodReport {
        v,
        pool: pool.to_owned(),
        models: vec![ModelReport {
            name: "t2v".into(),
            vram: 12 * GIB,
            ram: 2 * GIB,
            loads,
            ..ModelReport::default()
        }],
        vram: 12 * GIB,
        ram: 2 * GIB,
        loads,
        ..PodReport::default()
    }
}

async fn patch_report(pods: &Api<Pod>, name: &str, report: &PodReport) -> anyhow::Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": {REPORT_ANNOTATION: report.to_annotation()}}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching the report of {name}"))?;
    Ok(())
}

/// Creates pods `concurrency` at a time; sorted latencies, ms.
async fn create_all(
    pods: &Api<Pod>,
    items: Vec<Pod>,
    concurrency: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut latencies: Vec<f64> = stream::iter(items)
        .map(|p| async move {
            let start = Instant::now();
            pods.create(&PostParams::default(), &p).await?;
            anyhow::Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

async fn metric(client: &mut Client, name: &str) -> f64 {
    let Ok((200, body)) = client.raw(hyper::Method::GET, "/metrics", None).await else {
        return f64::NAN;
    };
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Every pool's status counts all its pods with the given total loads.
async fn converged(pools: &Api<ModelPool>, expect: &HashMap<String, (usize, i64)>) -> bool {
    let Ok(list) = pools.list(&ListParams::default()).await else {
        return false;
    };
    list.items.iter().all(|p| {
        let name = p.metadata.name.clone().unwrap_or_default();
        let Some(&(pods, loads)) = expect.get(&name) else {
            return true;
        };
        p.status.as_ref().is_some_and(|s| {
            s.pods_ready.as_deref() == Some(format!("{pods}/{pods}").as_str()) && s.loads == loads
        })
    })
}

/// Runs the scenario (the control plane is started here, outside any async runtime).
pub fn run(options: &Options, printer: &mut Printer) -> anyhow::Result<()> {
    if let Some(reason) = unavailable() {
        printer.row(&Row::new("scale").with("skipped", reason));
        return Ok(());
    }
    let operator = operator_bin().context("no operator binary")?;
    let started = Instant::now();
    let cp = ControlPlane::shared();
    let control_plane_s = started.elapsed().as_secs_f64();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(options, cp, &operator, control_plane_s, printer))
}

async fn run_async(
    options: &Options,
    cp: &'static ControlPlane,
    operator: &std::path::Path,
    control_plane_s: f64,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/modelpool.yaml");
    cp.kubectl_ok(
        ["apply", "--server-side", "--force-conflicts", "-f"]
            .into_iter()
            .chain(crd.to_str()),
    );
    cp.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/modelpools.modelpool.io",
    ]);
    let ns = cp.fresh_namespace("scale").await;
    let client = cp.client();

    // The operator, with its webhook registered for this namespace's labelled pods.
    let webhook_port = free_port()?;
    let metrics = free_port()?;
    let webhook_name = format!("modelpool-{ns}");
    let webhook = webhook_config(&webhook_name, &ns, &webhook_port.to_string());
    cp.kubectl_stdin(["apply", "-f", "-"], &webhook.to_string());
    let log = std::env::temp_dir().join(format!("modelpool-bench-operator-{ns}.log"));
    let child = Command::new(operator)
        .args(["run", "--watch-namespace", &ns, "--namespace", &ns])
        .args(["--identity", "bench", "--lease-name", "modelpool-leader"])
        .args(["--lease-duration-s", "15", "--lease-retry-s", "2"])
        .arg("--api-qps")
        .arg(options.api_qps.to_string())
        .arg("--webhook-listen")
        .arg(webhook_port.to_string())
        .args([
            "--tls-names",
            "127.0.0.1",
            "--webhook-config",
            &webhook_name,
        ])
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting modelpool-operator")?;
    let mut proc = Proc {
        child,
        log,
        what: "the operator".to_owned(),
    };
    let mut op_metrics = Client::connect(&Target::Tcp(metrics)).await;
    for _ in 0..600 {
        proc.check_alive()?;
        if op_metrics.is_err() {
            op_metrics = Client::connect(&Target::Tcp(metrics)).await;
        }
        if let Ok(m) = op_metrics.as_mut()
            && metric(m, "modelpool_operator_leader").await == 1.0
            && let Ok((200, body)) = m.raw(hyper::Method::GET, "/readyz", None).await
            && body.as_ref() == b"ok"
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut op_metrics = op_metrics.context("the operator's metrics port never answered")?;
    eventually(
        "the webhook caBundle",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let out = cp.kubectl([
                "get",
                "mutatingwebhookconfiguration",
                &webhook_name,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ]);
            (!out.stdout.is_empty()).then_some(())
        },
    )
    .await?;

    let pools: Api<ModelPool> = Api::namespaced(client.clone(), &ns);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pool_names: Vec<String> = (0..options.pools).map(|i| format!("pool-{i}")).collect();
    for name in &pool_names {
        let manifest: ModelPool = serde_json::from_value(pool_manifest(name))?;
        pools.create(&PostParams::default(), &manifest).await?;
    }

    // Creation: pods the webhook does not select (the apiserver alone), then injected ones.
    let plain: Vec<Pod> = (0..options.pods)
        .map(|i| pod(&format!("plain-{i}"), None))
        .collect::<anyhow::Result<_>>()?;
    let base_create = create_all(&pod_api, plain, options.concurrency).await?;
    let members: Vec<(String, String)> = (0..options.pods)
        .map(|i| (format!("app-{i}"), pool_names[i % options.pools].clone()))
        .collect();
    let injected: Vec<Pod> = members
        .iter()
        .map(|(name, pool)| pod(name, Some(pool)))
        .collect::<anyhow::Result<_>>()?;
    let create = create_all(&pod_api, injected, options.concurrency).await?;
    let sample = pod_api.get("app-0").await?;
    let was_injected = sample
        .spec
        .and_then(|s| s.init_containers)
        .is_some_and(|c| c.iter().any(|c| c.name == "modelpool-sidecar"));
    if !was_injected {
        bail!("app-0 was not injected by the operator's webhook");
    }

    // A watch on the pods, telling when it sees each report version.
    let rv = pod_api
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, u64, Instant)>();
    let watch_api = pod_api.clone();
    let watcher = tokio::spawn(async move {
        let mut events = watch_api
            .watch(&WatchParams::default().timeout(290), &rv)
            .await?
            .boxed();
        while let Some(event) = events.try_next().await? {
            if let WatchEvent::Modified(p) | WatchEvent::Added(p) = event {
                let v = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REPORT_ANNOTATION))
                    .and_then(|t| PodReport::from_annotation(t).ok())
                    .map(|r| r.v);
                if let (Some(v), Some(name)) = (v, p.metadata.name) {
                    let _ = seen_tx.send((name, v, Instant::now()));
                }
            }
        }
        anyhow::Ok(())
    });

    // The storm: every pod reports at once.
    let per_pool: HashMap<String, usize> = members.iter().fold(HashMap::new(), |mut m, (_, p)| {
        *m.entry(p.clone()).or_default() += 1;
        m
    });
    let mut expect: HashMap<String, (usize, i64)> = per_pool
        .iter()
        .map(|(p, n)| (p.clone(), (*n, *n as i64)))
        .collect();
    let hz = clock_ticks_per_second() as f64;
    let cpu_before = cpu_ticks(proc.pid())?;
    let writes_before = metric(&mut op_metrics, "modelpool_operator_status_writes_total").await;
    let reconciles_before = metric(&mut op_metrics, "modelpool_operator_reconciles_total").await;
    let storm = Instant::now();
    let members_arc = Arc::new(members.clone());
    stream::iter(0..members_arc.len())
        .map(|i| {
            let members = Arc::clone(&members_arc);
            let api = pod_api.clone();
            async move {
                let (name, pool) = &members[i];
                patch_report(&api, name, &report(pool, 1, 1)).await
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let patched_ms = storm.elapsed().as_secs_f64() * 1e3;
    let mut watched = std::collections::HashSet::new();
    let mut watch_done = None;
    let converge_deadline = storm + Duration::from_secs(120);
    let mut converge_ms = None;
    while converge_ms.is_none() || watch_done.is_none() {
        while let Ok((name, v, at)) = seen.try_recv() {
            if v >= 1 && watched.insert(name) && watched.len() == members.len() {
                watch_done = Some(at.duration_since(storm).as_secs_f64() * 1e3);
            }
        }
        if converge_ms.is_none() && converged(&pools, &expect).await {
            converge_ms = Some(storm.elapsed().as_secs_f64() * 1e3);
        }
        if Instant::now() > converge_deadline {
            bail!(
                "after 120 s the pools' status does not count every report (watch saw {} of {}); operator log: {}",
                watched.len(),
                members.len(),
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let storm_cpu_s = (cpu_ticks(proc.pid())? - cpu_before) as f64 / hz;
    let writes =
        metric(&mut op_metrics, "modelpool_operator_status_writes_total").await - writes_before;
    let reconciles =
        metric(&mut op_metrics, "modelpool_operator_reconciles_total").await - reconciles_before;

    // Single reports, one at a time.
    let (mut to_status, mut to_event) = (Vec::new(), Vec::new());
    for s in 0..options.samples {
        let (name, pool) = &members[s % members.len()];
        let v = 2 + s as u64;
        let loads = v;
        let entry = expect.get_mut(pool).context("pool of a member")?;
        // The pod's loads go from its previous figure to `loads`.
        let previous = if s < members.len() {
            1
        } else {
            v - members.len() as u64
        };
        entry.1 += loads as i64 - previous as i64;
        let expect_now = expect.clone();
        let start = Instant::now();
        patch_report(&pod_api, name, &report(pool, v, loads)).await?;
        let mut event = None;
        let mut status = None;
        while event.is_none() || status.is_none() {
            while let Ok((seen_name, seen_v, at)) = seen.try_recv() {
                if &seen_name == name && seen_v == v {
                    event = Some(at.duration_since(start).as_secs_f64() * 1e3);
                }
            }
            if status.is_none() && converged(&pools, &expect_now).await {
                status = Some(start.elapsed().as_secs_f64() * 1e3);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("report {v} of {name} not in the status after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        to_event.extend(event);
        to_status.extend(status);
    }
    to_event.sort_by(f64::total_cmp);
    to_status.sort_by(f64::total_cmp);
    let rss = rss_bytes(proc.pid())?;
    watcher.abort();
    let _ = cp.kubectl(["delete", "mutatingwebhookconfiguration", &webhook_name]);

    let (create_p50, base_p50) = (percentile(&create, 50.0), percentile(&base_create, 50.0));
    let converge = converge_ms.unwrap_or(f64::NAN);
    let watch = watch_done.unwrap_or(f64::NAN);
    let (status_p50, event_p50) = (percentile(&to_status, 50.0), percentile(&to_event, 50.0));
    printer.row(
        &Row::new("scale")
            .with("pools", options.pools)
            .with("pods", options.pods)
            .with("api_qps", options.api_qps)
            .num("create_p50_ms", create_p50, 3)
            .num("create_p99_ms", percentile(&create, 99.0), 3)
            .num("baseline_create_p50_ms", base_p50, 3)
            .num("baseline_create_p99_ms", percentile(&base_create, 99.0), 3)
            .num("create_ratio_to_baseline", create_p50 / base_p50, 3)
            .num("storm_patch_ms", patched_ms, 4)
            .num("converge_ms", converge, 4)
            .num("baseline_watch_ms", watch, 4)
            .num("ratio_to_baseline", converge / watch, 3)
            .num("report_to_status_ms_p50", status_p50, 3)
            // Under 100 samples a "p99" is the largest sample: say so.
            .num(
                if to_status.len() < 100 {
                    "report_to_status_ms_max"
                } else {
                    "report_to_status_ms_p99"
                },
                percentile(&to_status, 99.0),
                3,
            )
            .num("baseline_event_ms_p50", event_p50, 3)
            .num("report_ratio_to_baseline", status_p50 / event_p50, 3)
            .with("status_writes", writes)
            .with("reconciles", reconciles)
            .num("operator_storm_cpu_s", storm_cpu_s, 3)
            .num("operator_rss_mib", rss as f64 / (1u64 << 20) as f64, 3)
            .num("control_plane_start_s", control_plane_s, 3),
    );
    drop(proc);
    Ok(())
}
