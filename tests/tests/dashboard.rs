//! The Grafana dashboard (`dashboards/modelpool.json`) and the alert rules against real data:
//! a real Prometheus scrapes two real standalone sidecars (an Aggressive and a Cache pool,
//! each with a `modelpool-memhog` app loading and unloading models that hold real memory) and
//! a real operator reconciling a pool on the test control plane. Every query of the dashboard
//! (panels and template variables, with `$namespace`/`$pool`/`$pod` set to `.*`) and every
//! alert expression must evaluate without error and return data; every rule loaded into that
//! Prometheus must evaluate healthy.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use modelpool_e2e::monitoring::{
    Memhog, Process, Prometheus, Sidecar, Target, free_port, poll, workspace_bin,
};
use modelpool_e2e::{ControlPlane, repo_root};
use serde_json::{Value, json};

fn dashboard() -> Value {
    let path = repo_root().join("dashboards/modelpool.json");
    let text = std::fs::read_to_string(&path).expect("dashboards/modelpool.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p.clone());
        for nested in p["panels"].as_array().into_iter().flatten() {
            out.push(nested.clone());
        }
    }
    out
}

/// `(panel title, expr)` for every query of every panel.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    panels(dashboard)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| {
                    (
                        title.clone(),
                        t["expr"].as_str().unwrap_or_default().to_owned(),
                    )
                })
        })
        .collect()
}

/// Grafana's variables, as a test evaluates them: every template variable matches all.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "5s")
        .replace("${namespace}", ".*")
        .replace("${pool}", ".*")
        .replace("${pod}", ".*")
        .replace("$namespace", ".*")
        .replace("$pool", ".*")
        .replace("$pod", ".*")
}

/// Catches the chart shipping a different dashboard than the one people import by hand.
#[test]
fn chart_copy_of_the_dashboard_is_identical() {
    let root = repo_root();
    let original = std::fs::read(root.join("dashboards/modelpool.json")).expect("dashboard");
    let copy =
        std::fs::read(root.join("charts/modelpool/dashboards/modelpool.json")).expect("copy");
    assert!(
        original == copy,
        "charts/modelpool/dashboards/modelpool.json differs: cp dashboards/modelpool.json charts/modelpool/dashboards/"
    );
}

/// Catches a dashboard Grafana would import wrongly: duplicate panel ids or refIds, panels
/// overlapping or off the 24-column grid, queries not bound to the data source variable, a
/// missing template variable, or a panel without a description.
#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "modelpool");
    assert_eq!(d["title"], "ModelPool");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "pool", "pod"]);

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
    for p in &all {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_i64().expect("id")),
            "duplicate panel id in {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().expect("x"),
            g["y"].as_i64().expect("y"),
            g["w"].as_i64().expect("w"),
            g["h"].as_i64().expect("h"),
        );
        assert!(
            x >= 0 && w > 0 && x + w <= 24,
            "{title} is off the grid: {g}"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_owned()) {
                    panic!("{title} overlaps {other} at ({cx},{cy})");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title} has no description"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: duplicate refId"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("modelpool"), "{title}: {expr}");
            // Sidecar panels honour the three selectors.
            if !expr.contains("modelpool_operator_") && !expr.contains("modelpool-operator") {
                for var in ["$namespace", "$pool", "$pod"] {
                    assert!(expr.contains(var), "{title} ignores {var}: {expr}");
                }
            }
        }
    }
}

/// Catches a core sidecar metric (the starting set every pool exports) the dashboard forgot to show.
#[test]
fn dashboard_shows_every_design_metric() {
    let exprs: String = panel_queries(&dashboard())
        .into_iter()
        .map(|(_, e)| e + "\n")
        .collect();
    for metric in [
        "modelpool_gpu_up",
        "modelpool_vram_total_bytes",
        "modelpool_vram_used_bytes",
        "modelpool_ram_used_bytes",
        "modelpool_ram_limit_bytes",
        "modelpool_pool_bytes",
        "modelpool_ceiling_bytes",
        "modelpool_model_loaded",
        "modelpool_model_bytes",
        "modelpool_model_leases",
        "modelpool_loads_total",
        "modelpool_unloads_total",
        "modelpool_load_duration_seconds_bucket",
        "modelpool_reclaim_duration_seconds_bucket",
        "modelpool_acquire_wait_seconds_bucket",
        "modelpool_acquires_refused_total",
        "modelpool_memory_not_reclaimed_total",
        "modelpool_ceiling_breaches_total",
        "modelpool_pool_info",
        "modelpool_operator_reconciles_total",
        "modelpool_operator_reconcile_duration_seconds_bucket",
        "modelpool_operator_pools",
        "modelpool_operator_pods_managed",
    ] {
        assert!(exprs.contains(metric), "no panel shows {metric}");
    }
}

/// The expression an alert watches, made to return its series whether or not the alert would
/// fire: each comparison becomes a `bool` comparison (0 or 1 instead of a filter), and
/// `absent(x)` becomes `x` (the series it watches for).
fn watched(expr: &str) -> String {
    let expr = expr.replace("absent(", "(");
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let (mut braces, mut brackets, mut quote) = (0i32, 0i32, None::<char>);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if let Some(q) = quote {
            out.push(c);
            if c == '\\' {
                if let Some(n) = next {
                    out.push(n);
                    i += 1;
                }
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ => {}
        }
        let op_len = if braces > 0 || brackets > 0 {
            0
        } else {
            match (c, next) {
                ('=', Some('=')) | ('!', Some('=')) | ('>', Some('=')) | ('<', Some('=')) => 2,
                ('>', _) | ('<', _) => 1,
                _ => 0,
            }
        };
        if op_len == 0 {
            out.push(c);
            i += 1;
            continue;
        }
        out.extend(&chars[i..i + op_len]);
        i += op_len;
        let rest: String = chars[i..].iter().collect();
        if !rest.trim_start().starts_with("bool") {
            out.push_str(" bool");
        }
    }
    out
}

#[test]
fn watched_expressions_keep_their_series() {
    assert_eq!(watched("a{x=\"1\"} > 0.9"), "a{x=\"1\"} > bool 0.9");
    assert_eq!(
        watched("a{x=~\"a|b\",y!=\"z\"}[5m] >= 1"),
        "a{x=~\"a|b\",y!=\"z\"}[5m] >= bool 1"
    );
    assert_eq!(
        watched("absent(up{job=\"o\"} == 1)"),
        "(up{job=\"o\"} == bool 1)"
    );
    assert_eq!(watched("a == bool 0"), "a == bool 0");
    assert_eq!(
        watched("(a > 1) and (b < 2)"),
        "(a > bool 1) and (b < bool 2)"
    );
}

fn rule_exprs() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo_root().join("alerts/modelpool.rules.yaml")).expect("rules");
    let file: Value = serde_saphyr::from_str(&text).expect("rules YAML");
    file["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap_or("?")
                .to_owned();
            (name, r["expr"].as_str().expect("expr").to_owned())
        })
        .collect()
}

/// `label_values(selector, label)` → `(selector, label)`.
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

const PROXIED_POOL: &str = "\
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: e2e-proxied
  namespace: e2e
spec:
  driver: {kind: Http, url: \"http://UPSTREAM\"}
  limits: {ram: 100Mi}
  policy:
    mode: Cache
    idleTTL: 10m
    acquireTimeout: 2s
  models:
    - {name: p, ram: 64Mi, pinned: true}
    - {name: big, ram: 64Mi}
";

/// A plain HTTP/1.1 server on loopback answering every request `200 {}` (keep-alive): the
/// proxied pool's inference server and its Http driver's app.
fn start_plain_server() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end().to_ascii_lowercase();
                        if header.is_empty() {
                            break;
                        }
                        if let Some(v) = header.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err()
                        || writer
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// POSTs a JSON body (HTTP/1.0, one request per connection); the status.
fn post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {text:?}"))?;
    Ok((status, text))
}

const AGGRESSIVE_POOL: &str = "\
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: e2e-aggressive
  namespace: e2e
spec:
  limits: {vram: 8Gi, ram: 256Mi}
  policy:
    mode: Aggressive
    acquireTimeout: 2s
  models:
    - {name: t2v, ram: 48Mi, vram: 1Gi}
    - {name: upscale, ram: 32Mi}
";

const CACHE_POOL: &str = "\
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: e2e-cache
  namespace: e2e
spec:
  limits: {ram: 64Mi}
  policy:
    mode: Cache
    idleTTL: 10m
    eviction: Lru
    acquireTimeout: 2s
  models:
    - {name: a, ram: 40Mi}
    - {name: b, ram: 40Mi}
";

/// Starts the real operator against the test control plane, reconciling one pool.
fn start_operator(dir: &std::path::Path) -> (Process, std::net::SocketAddr) {
    let cp = ControlPlane::shared();
    let crd = repo_root().join("crds/modelpool.yaml");
    cp.kubectl_ok([
        "apply",
        "--server-side",
        "-f",
        crd.to_str().expect("utf-8 path"),
    ]);
    modelpool_e2e::support::wait_crd_established(cp, "modelpools.modelpool.io");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let system = rt.block_on(cp.fresh_namespace("mp-dash-system"));
    let apps = rt.block_on(cp.fresh_namespace("mp-dash-apps"));
    let pool = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: video, namespace: {apps}}}\n\
         spec:\n  selector: {{matchLabels: {{app: video}}}}\n  limits: {{vram: 20Gi, ram: 16Gi}}\n\
         \x20 models:\n  - {{name: t2v, vram: 12Gi, ram: 2Gi}}\n"
    );
    let out = cp.kubectl_stdin(["apply", "-f", "-"], &pool);
    assert!(
        out.status.success(),
        "applying a pool: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut cmd = Command::new(workspace_bin("modelpool-operator"));
    cmd.args(["run", "--namespace", &system, "--identity", "e2e-0"])
        .args([
            "--lease-name",
            "modelpool-leader",
            "--webhook-listen",
            "off",
        ])
        .arg(format!("--metrics-listen={metrics}"))
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "info,kube=warn");
    let mut process =
        Process::spawn("modelpool-operator", cmd, &dir.join("operator.log")).expect("operator");
    process
        .wait_http_ok(metrics, "/healthz", Duration::from_secs(120))
        .expect("the operator serves /healthz");
    (process, metrics)
}

/// Catches dashboard panels and alert rules that query names or labels the sidecar and the
/// operator do not export (a typo, a renamed metric, a join that matches nothing), and PromQL
/// Prometheus refuses. Each expression must return at least one series.
#[test]
fn every_dashboard_and_alert_query_returns_data() {
    let tmp = tempfile::Builder::new()
        .prefix("modelpool-dashboard-")
        .tempdir()
        .expect("a temporary folder");
    let dir = tmp.path();

    let (mut operator, operator_metrics) = start_operator(dir);
    let mut aggressive = Sidecar::start(dir, "aggressive", AGGRESSIVE_POOL).expect("sidecar");
    let mut cache = Sidecar::start(dir, "cache", CACHE_POOL).expect("sidecar");
    // A pool behind the serving proxy, in front of a plain server that is also its Http
    // driver's app.
    let upstream = start_plain_server();
    let proxy_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("an address");
    let mut proxied = Sidecar::start_with(
        dir,
        "proxied",
        &PROXIED_POOL.replace("UPSTREAM", &upstream.to_string()),
        &["--proxy-listen", &proxy_addr.to_string()],
    )
    .expect("sidecar");

    let sidecar_target = |s: &Sidecar, pod: &str| Target {
        job: "modelpool-sidecar".into(),
        addr: s.metrics,
        labels: vec![
            ("namespace".into(), "e2e".into()),
            ("pod".into(), pod.into()),
        ],
    };
    let targets = [
        sidecar_target(&aggressive, "aggressive-0"),
        sidecar_target(&cache, "cache-0"),
        sidecar_target(&proxied, "proxied-0"),
        Target {
            job: "modelpool-operator".into(),
            addr: operator_metrics,
            labels: vec![
                ("namespace".into(), "modelpool-system".into()),
                ("pod".into(), "operator-0".into()),
            ],
        },
    ];
    let rules = repo_root().join("alerts/modelpool.rules.yaml");
    let prometheus = Prometheus::start(dir, &targets, &[rules]).expect("prometheus");
    poll(
        "all targets up",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let t = prometheus.targets()?;
            Ok((t.len() == 4 && t.iter().all(|(_, h, _)| h == "up")).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{:?}", prometheus.targets()));

    // The Aggressive pool: device readings from the app, a model held while Prometheus
    // watches, released (unloaded at once), a refused acquire, another model.
    let mut app = Memhog::start(&aggressive.socket, &["t2v", "upscale"]).expect("memhog");
    let r = app
        .cmd(&format!("readings {} {}", 3u64 << 30, 80u64 << 30))
        .expect("readings");
    assert_eq!(r["status"], 200, "{r}");
    // The app reports the 1 GiB of VRAM its load took; no GPU reading here can see it given
    // back, so its unload is counted unverified (the ModelPoolReclaimUnverified series).
    let r = app.cmd("acquire t2v 48 vram=1024").expect("acquire t2v");
    let lease = r["body"]["lease"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("t2v was not admitted: {r}"));
    let loaded = substitute(
        &panel_queries(&dashboard())
            .into_iter()
            .find(|(title, _)| title == "Models loaded")
            .expect("a Models loaded panel")
            .1,
    );
    poll(
        "the Models loaded panel counts t2v",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let v = prometheus.query_ok(&loaded)?;
            let n: f64 = v
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            Ok((n >= 1.0).then_some(()))
        },
    )
    .expect("the dashboard sees the loaded model");
    let r = app.release(&lease).expect("release");
    assert_eq!(
        r["body"]["unload"], true,
        "Aggressive mode unloads at release: {r}"
    );
    app.wait_event("unloaded", Duration::from_secs(60))
        .expect("the unload command");
    let (refused, r) = app.acquire("not-in-the-pool", 1).expect("acquire");
    assert!(refused.is_none(), "an unknown model must be refused: {r}");
    let (lease, r) = app.acquire("upscale", 32).expect("acquire upscale");
    let lease = lease.unwrap_or_else(|| panic!("upscale was not admitted: {r}"));
    app.release(&lease).expect("release");

    // The Cache pool: two models that do not fit together take turns (evictions).
    let mut cached = Memhog::start(&cache.socket, &["a", "b"]).expect("memhog");
    for model in ["a", "b", "a"] {
        let (lease, r) = cached.acquire(model, 40).expect("acquire");
        let lease = lease.unwrap_or_else(|| panic!("{model} was not admitted: {r}"));
        cached.release(&lease).expect("release");
    }

    // The proxied pool: requests that load the pinned model and are served, then requests for a
    // model that can never fit beside it (503, the refusals the proxy alert counts).
    for (model, status) in [
        ("p", 200),
        ("p", 200),
        ("big", 503),
        ("big", 503),
        ("big", 503),
    ] {
        let got = post_json(
            proxy_addr,
            "/v1/completions",
            &format!(r#"{{"model": "{model}", "prompt": "hi"}}"#),
        )
        .expect("a proxied request");
        assert_eq!(
            got.0, status,
            "POST /v1/completions for {model} through the proxy: {}",
            got.1
        );
    }

    // Everything the dashboard and the rules ask for, evaluated until it all returns data
    // (a few scrapes after the workload) or the time runs out.
    let d = dashboard();
    let mut checks: Vec<(String, String, bool)> = Vec::new(); // (what, expr, must have data)
    for (title, expr) in panel_queries(&d) {
        checks.push((format!("panel {title:?}"), substitute(&expr), true));
    }
    for var in d["templating"]["list"].as_array().expect("variables") {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .expect("query");
        let (selector, label) =
            label_values(query).unwrap_or_else(|| panic!("unsupported variable query {query}"));
        checks.push((
            format!("variable {} ({label})", var["name"]),
            format!("count by ({label}) ({})", substitute(&selector)),
            true,
        ));
    }
    for (alert, expr) in rule_exprs() {
        checks.push((format!("alert {alert} (as written)"), expr.clone(), false));
        checks.push((format!("alert {alert} (its series)"), watched(&expr), true));
    }
    let mut failures = Vec::new();
    let outcome = poll(
        "every query returns data",
        Duration::from_secs(120),
        Duration::from_secs(2),
        || {
            aggressive.process.check_running()?;
            cache.process.check_running()?;
            proxied.process.check_running()?;
            operator.check_running()?;
            failures.clear();
            for (what, expr, need_data) in &checks {
                match prometheus.query_ok(expr) {
                    Ok(result) if *need_data && result.is_empty() => {
                        failures.push(format!("{what}: no data\n    {expr}"));
                    }
                    Ok(_) => {}
                    Err(e) => failures.push(format!("{what}: {e:#}")),
                }
            }
            Ok(failures.is_empty().then_some(()))
        },
    );
    if outcome.is_err() {
        panic!(
            "{} of {} queries failed:\n{}\n--- /metrics of the aggressive sidecar ---\n{}",
            failures.len(),
            checks.len(),
            failures.join("\n"),
            modelpool_e2e::monitoring::http_get(aggressive.metrics, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default()
        );
    }
    for variable in ["namespace", "pool", "pod"] {
        let (selector, label) = label_values(
            d["templating"]["list"]
                .as_array()
                .and_then(|l| l.iter().find(|v| v["name"] == variable))
                .and_then(|v| v["query"]["query"].as_str())
                .expect("variable"),
        )
        .expect("label_values");
        let values: BTreeSet<String> = prometheus
            .query_ok(&substitute(&selector))
            .expect("variable query")
            .iter()
            .filter_map(|s| s["metric"][label.as_str()].as_str().map(str::to_owned))
            .collect();
        let expected: BTreeSet<String> = match variable {
            "namespace" => ["e2e"].map(String::from).into(),
            "pool" => ["e2e-aggressive", "e2e-cache", "e2e-proxied"]
                .map(String::from)
                .into(),
            _ => ["aggressive-0", "cache-0", "proxied-0"]
                .map(String::from)
                .into(),
        };
        assert_eq!(values, expected, "the ${variable} variable's values");
    }

    // The rules, loaded into this Prometheus and evaluated every second, are healthy.
    poll(
        "every rule evaluates healthy",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let (_, body) = modelpool_e2e::monitoring::http_get(prometheus.addr, "/api/v1/rules")?;
            let v: Value = serde_json::from_str(&body)?;
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            anyhow::ensure!(
                rules.len() == rule_exprs().len(),
                "{} rules loaded",
                rules.len()
            );
            let bad: Vec<Value> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| json!({"name": r["name"], "health": r["health"], "lastError": r["lastError"]}))
            .collect();
            anyhow::ensure!(bad.is_empty(), "unhealthy rules: {bad:?}");
            Ok(Some(()))
        },
    )
    .expect("healthy rules");

    drop(app);
    drop(cached);
}
