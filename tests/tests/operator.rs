//! The operator against the real control plane: two replicas with leader election, the
//! injection webhook over TLS (certificate managed by the operator), status aggregation from
//! pod reports, no writes when nothing changes, leader failover, and drain on delete.
//!
//! Pods never run here (no kubelet); the sidecars' side of the protocol (the report
//! annotation on their own pod) is written by the test in this file, and by real sidecar
//! processes in `operator_sidecars.rs`.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use modelpool_crds::{
    ModelPool,
    report::{ModelReport, PodReport, REPORT_ANNOTATION},
};
use modelpool_e2e::{
    ControlPlane,
    support::{self, eventually, free_port, install_crd, operator_command, webhook_config},
};

struct Operator {
    child: Child,
    metrics_port: u16,
    identity: String,
}

impl Operator {
    fn start(
        cp: &ControlPlane,
        ns: &str,
        identity: &str,
        webhook_port: u16,
        webhook_config: &str,
    ) -> Self {
        Self::start_with(cp, ns, identity, webhook_port, webhook_config, &[])
    }

    fn start_with(
        cp: &ControlPlane,
        ns: &str,
        identity: &str,
        webhook_port: u16,
        webhook_config: &str,
        extra: &[&str],
    ) -> Self {
        let metrics_port = free_port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{ns}-{identity}.log")))
            .expect("log file");
        let child = operator_command(cp, ns, identity, metrics_port)
            .args(["--drain-timeout-s", "60", "--resync-s", "300"])
            .arg("--webhook-listen")
            .arg(format!("127.0.0.1:{webhook_port}"))
            .args([
                "--tls-names",
                "127.0.0.1",
                "--webhook-config",
                webhook_config,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting modelpool-operator");
        Self {
            child,
            metrics_port,
            identity: identity.to_owned(),
        }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.metrics_port, "/metrics")?;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .reduce(|a, b| a + b)
    }

    fn is_leader(&self) -> bool {
        self.metric("modelpool_operator_leader") == Some(1.0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// A pod that PodSecurity `restricted` admits.
fn app_pod(name: &str, pool: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"modelpool.io/pool": pool, "app": "video"}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "python:3.12-slim",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))
    .expect("pod JSON")
}

const POOL: &str = r#"
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: video
spec:
  limits: {vram: 20Gi, ram: 16Gi}
  models:
    - {name: t2v, vram: 12Gi, ram: 2Gi}
    - {name: upscale, vram: 4Gi, ram: 12Gi}
    - {name: frame_interpolation, vram: 2Gi, ram: 9Gi}
"#;

async fn report(pods: &Api<Pod>, pod: &str, report: &PodReport) {
    let patch = serde_json::json!({"metadata": {"annotations": {REPORT_ANNOTATION: report.to_annotation()}}});
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("annotating {pod}: {e}"));
}

fn loaded(models: &[(&str, u64)], v: u64) -> PodReport {
    PodReport {
        v,
        pool: "video".into(),
        models: models
            .iter()
            .map(|(name, gib)| ModelReport {
                name: (*name).into(),
                vram: gib << 30,
                ram: gib << 28,
                loads: 1,
                ..ModelReport::default()
            })
            .collect(),
        vram: models.iter().map(|(_, gib)| gib << 30).sum(),
        ram: models.iter().map(|(_, gib)| gib << 28).sum(),
        loads: models.len() as u64,
        ..PodReport::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_injects_aggregates_fails_over_and_drains() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.restricted_namespace("operator").await;
    let client = cp.client();

    let webhook_name = format!("modelpool-{ns}");
    let port_a = free_port();
    cp.kubectl_stdin(
        ["apply", "-f", "-"],
        &webhook_config(&webhook_name, &ns, &format!("127.0.0.1:{port_a}")).to_string(),
    );
    let operator_a = Operator::start(cp, &ns, "op-a", port_a, &webhook_name);
    // Replica B only takes over the controller; its webhook port is not in the config.
    let operator_b = Operator::start(cp, &ns, "op-b", free_port(), &webhook_name);

    // One of them leads, and the leader puts its CA into the webhook configuration.
    let first_leader = eventually("a leader", Duration::from_secs(60), || async {
        [&operator_a, &operator_b]
            .into_iter()
            .find(|o| o.is_leader())
            .map(|o| o.identity.clone())
    })
    .await;
    eventually("the caBundle", Duration::from_secs(60), || async {
        let out = cp.kubectl([
            "get",
            "mutatingwebhookconfiguration",
            &webhook_name,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ]);
        (!out.stdout.is_empty()).then_some(())
    })
    .await;
    // Replica A serves once it has loaded the certificate from the Secret.
    eventually("operator A ready", Duration::from_secs(60), || async {
        http_get(operator_a.metrics_port, "/readyz").filter(|b| b == "ok")
    })
    .await;

    cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], POOL);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pools: Api<ModelPool> = Api::namespaced(client.clone(), &ns);

    // Pods created through the API come back injected, and PodSecurity restricted admits
    // the sidecar too.
    for name in ["app-0", "app-1", "app-2"] {
        let created = pods
            .create(&PostParams::default(), &app_pod(name, "video"))
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        let spec = created.spec.expect("spec");
        let sidecar = spec
            .init_containers
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.name == "modelpool-sidecar"))
            .unwrap_or_else(|| panic!("{name} was not injected"));
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.share_process_namespace, Some(true));
        // Issue 15: the app reaches the socket through the pod's shared group, and the
        // sidecar has a liveness probe (PodSecurity restricted admits both).
        let groups = spec
            .security_context
            .as_ref()
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default();
        assert!(groups.contains(&65532), "supplementalGroups: {groups:?}");
        assert!(sidecar.liveness_probe.is_some());
        let app_env = spec.containers[0].env.clone().unwrap_or_default();
        assert!(app_env.iter().any(|e| e.name == "MODELPOOL_SOCKET"));
    }
    // A pod naming an unknown pool is admitted unchanged, with a warning.
    let out = cp.kubectl_stdin(
        ["create", "-n", &ns, "-f", "-"],
        &serde_json::to_string(&app_pod("stray", "nonexistent")).expect("json"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pool")
            && String::from_utf8_lossy(&out.stderr).contains("not found"),
        "expected a warning, got {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stray = pods.get("stray").await.expect("stray pod");
    assert!(
        stray.spec.expect("spec").init_containers.is_none(),
        "not injected"
    );

    // Sidecars report through their pods; the pool's status sums them.
    report(&pods, "app-0", &loaded(&[("t2v", 12)], 1)).await;
    report(&pods, "app-1", &loaded(&[("t2v", 12), ("upscale", 4)], 1)).await;
    let status = eventually(
        "status with 2/3 pods reporting",
        Duration::from_secs(60),
        || async {
            let pool = pools.get("video").await.ok()?;
            let status = pool.status?;
            (status.pods_ready.as_deref() == Some("2/3")).then_some(status)
        },
    )
    .await;
    assert_eq!(status.models_loaded.as_deref(), Some("2/3"));
    assert_eq!(
        status.vram_used.as_ref().map(|q| q.0.as_str()),
        Some("28Gi")
    );
    let t2v = status
        .models
        .iter()
        .find(|m| m.name == "t2v")
        .expect("t2v status");
    assert_eq!(t2v.loaded_in, 2);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PodsNotReporting")
    );

    report(&pods, "app-2", &loaded(&[], 1)).await;
    eventually("Ready=True", Duration::from_secs(60), || async {
        let status = pools.get("video").await.ok()?.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "True").then_some(())
    })
    .await;
    let table = cp.kubectl_ok(["get", "mp", "-n", &ns]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, support::GET_MP_COLUMNS, "{table}");
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..8],
        [
            "video",
            "2/3",
            "3/3",
            "28Gi",
            "20Gi",
            "7Gi",
            "Aggressive",
            "True"
        ],
        "{table}"
    );

    // Nothing changes: nothing is written, even when reconciles happen (a report with the
    // same content re-triggers one).
    let leader = if operator_a.is_leader() {
        &operator_a
    } else {
        &operator_b
    };
    let writes_before = leader
        .metric("modelpool_operator_status_writes_total")
        .unwrap_or(0.0);
    let patches_before = leader
        .metric("modelpool_operator_api_requests_total{verb=\"patch\"}")
        .unwrap_or(0.0);
    let reconciles_before = leader
        .metric("modelpool_operator_reconciles_total")
        .unwrap_or(0.0);
    let same = pods.get("app-2").await.expect("app-2");
    let mut annotations = same.metadata.annotations.unwrap_or_default();
    annotations.insert("touch".into(), "1".into());
    pods.patch(
        "app-2",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {"touch": "1"}}})),
    )
    .await
    .expect("touch");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconciles_after = leader
        .metric("modelpool_operator_reconciles_total")
        .unwrap_or(0.0);
    assert!(
        reconciles_after > reconciles_before,
        "the pod change triggered a reconcile"
    );
    assert_eq!(
        leader
            .metric("modelpool_operator_status_writes_total")
            .unwrap_or(0.0),
        writes_before,
        "a reconcile that changes nothing writes nothing"
    );
    assert_eq!(
        leader
            .metric("modelpool_operator_api_requests_total{verb=\"patch\"}")
            .unwrap_or(0.0),
        patches_before,
        "no apiserver writes at all"
    );
    eprintln!(
        "operator e2e: {reconciles_after} reconciles, {writes_before} status writes, {patches_before} patch requests so far"
    );

    // Kill the leader: the other replica takes over and keeps the status current.
    let (mut dead, survivor) = if operator_a.identity == first_leader {
        (operator_a, operator_b)
    } else {
        (operator_b, operator_a)
    };
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    eventually("the survivor to lead", Duration::from_secs(60), || async {
        survivor.is_leader().then_some(())
    })
    .await;
    report(&pods, "app-2", &loaded(&[("frame_interpolation", 2)], 2)).await;
    eventually("status after failover", Duration::from_secs(60), || async {
        let status = pools.get("video").await.ok()?.status?;
        (status.models_loaded.as_deref() == Some("3/3")).then_some(())
    })
    .await;

    // Delete: the finalizer holds the pool until every sidecar reports it drained.
    pools
        .delete("video", &DeleteParams::default())
        .await
        .expect("delete the pool");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = pools
        .get("video")
        .await
        .expect("still there while draining");
    assert!(held.metadata.deletion_timestamp.is_some());
    for pod in ["app-0", "app-1", "app-2"] {
        let drained = PodReport {
            v: 9,
            pool: "video".into(),
            drained: true,
            ..PodReport::default()
        };
        report(&pods, pod, &drained).await;
    }
    eventually("the pool to be gone", Duration::from_secs(60), || async {
        matches!(pools.get_opt("video").await, Ok(None)).then_some(())
    })
    .await;
    let events = cp.kubectl_ok([
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "reason=Drained",
        "-o",
        "name",
    ]);
    assert!(!events.trim().is_empty(), "a Drained event was recorded");
    cp.kubectl(["delete", "mutatingwebhookconfiguration", &webhook_name]);
}

/// `enforcement: Restart`: a pod whose sidecar reports memory not reclaimed after an unload is
/// deleted (its controller recreates it); a pod without a controller is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_enforcement_deletes_a_pod_whose_memory_was_not_reclaimed() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("restart").await;
    let client = cp.client();
    let metrics_port = free_port();
    let _operator = Operator {
        child: operator_command(cp, &ns, "op", metrics_port)
            .args(["--webhook-listen", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the operator"),
        metrics_port,
        identity: "op".into(),
    };
    cp.kubectl_stdin(
        ["apply", "-n", &ns, "-f", "-"],
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {name: video}\nspec:\n  policy: {enforcement: Restart}\n  models: [{name: t2v}]\n",
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (name, controlled) in [("owned", true), ("bare", false)] {
        let mut pod = app_pod(name, "video");
        if controlled {
            // No controller manager runs here: the owner need not exist for the reference.
            pod.metadata.owner_references = Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: "video-7d4b9".into(),
                    uid: "00000000-0000-0000-0000-000000000001".into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                },
            ]);
        }
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        let leaking = PodReport {
            v: 1,
            pool: "video".into(),
            lost: 512 << 20,
            err: Some("MemoryNotReclaimed: t2v".into()),
            ..PodReport::default()
        };
        report(&pods, name, &leaking).await;
    }
    eventually(
        "the owned pod to be restarted",
        Duration::from_secs(60),
        || async { matches!(pods.get_opt("owned").await, Ok(None)).then_some(()) },
    )
    .await;
    let events = cp.kubectl_ok([
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "reason=RestartedPod",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("512.0 MiB not reclaimed"), "{events}");
    // Nothing would bring a pod without a controller back: it stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pods.get_opt("bare").await.expect("get").is_some());

    // Issue 15: no webhook ran here, so these pods run without the sidecar. The pool names
    // them in a condition, each gets a Warning Event, and the operator counts them.
    let pools: Api<ModelPool> = Api::namespaced(client.clone(), &ns);
    let condition = eventually(
        "SidecarsInjected=False",
        Duration::from_secs(60),
        || async {
            let status = pools.get("video").await.ok()?.status?;
            let c = status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "SidecarsInjected")?;
            (c.status == "False").then_some(c)
        },
    )
    .await;
    assert_eq!(condition.reason, "PodsWithoutSidecar");
    assert!(condition.message.contains("bare"), "{}", condition.message);
    let events = cp.kubectl_ok([
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "reason=PodsWithoutSidecar,involvedObject.kind=Pod",
        "-o",
        "jsonpath={.items[*].involvedObject.name}",
    ]);
    assert!(
        events.contains("bare"),
        "a Warning Event on the pod: {events:?}"
    );
    let metrics = eventually("the metric", Duration::from_secs(30), || async {
        http_get(metrics_port, "/metrics")
    })
    .await;
    let series =
        format!("modelpool_operator_pods_without_sidecar{{namespace=\"{ns}\",pool=\"video\"}}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
        "{series} in:\n{metrics}"
    );
}

/// What the chart's sidecar values and `sidecar.rbac.autoBind` become, through the real
/// webhook: the injected container's pull policy, CPU limit and log format, and a RoleBinding
/// in the pool's namespace that lets the pod's ServiceAccount (and no other) read its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sidecar_settings_and_the_sidecar_role_binding() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.restricted_namespace("operator-bind").await;
    let client = cp.client();
    let role = format!("modelpool-sidecar-{ns}");
    let cluster_role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role},
        "rules": [
            {"apiGroups": ["modelpool.io"], "resources": ["modelpools"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
        ],
    });
    let out = cp.kubectl_stdin(["apply", "-f", "-"], &cluster_role.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.kubectl_ok(["create", "serviceaccount", "cogvideo", "-n", &ns]);
    cp.kubectl_ok(["create", "serviceaccount", "bystander", "-n", &ns]);

    let webhook_name = format!("modelpool-{ns}");
    let port = free_port();
    cp.kubectl_stdin(
        ["apply", "-f", "-"],
        &webhook_config(&webhook_name, &ns, &format!("127.0.0.1:{port}")).to_string(),
    );
    let role_arg = format!("--sidecar-cluster-role={role}");
    let operator = Operator::start_with(
        cp,
        &ns,
        "op-bind",
        port,
        &webhook_name,
        &[
            &role_arg,
            "--sidecar-cpu-limit=250m",
            "--sidecar-image-pull-policy=Always",
            "--sidecar-log-format=text",
        ],
    );
    eventually("the operator serving", Duration::from_secs(60), || async {
        (operator.is_leader()
            && http_get(operator.metrics_port, "/readyz").as_deref() == Some("ok"))
        .then_some(())
    })
    .await;
    eventually("the caBundle", Duration::from_secs(60), || async {
        let out = cp.kubectl([
            "get",
            "mutatingwebhookconfiguration",
            &webhook_name,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ]);
        (!out.stdout.is_empty()).then_some(())
    })
    .await;
    cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], POOL);

    let who = format!("system:serviceaccount:{ns}:cogvideo");
    let can_read_pools = |who: &str| {
        let out = cp.kubectl([
            "auth",
            "can-i",
            "get",
            "modelpools.modelpool.io",
            "-n",
            &ns,
            "--as",
            who,
        ]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(!can_read_pools(&who), "no binding before a pod runs as it");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut pod = app_pod("app-0", "video");
    pod.spec.as_mut().expect("spec").service_account_name = Some("cogvideo".into());
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("creating a pooled pod");
    assert_eq!(
        created
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("modelpool.io/service-account"))
            .map(String::as_str),
        Some("cogvideo")
    );
    let spec = created.spec.expect("spec");
    let sidecar = spec
        .init_containers
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.name == "modelpool-sidecar"))
        .expect("injected");
    assert_eq!(sidecar.image_pull_policy.as_deref(), Some("Always"));
    let limits = sidecar
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(limits.get("cpu").map(|q| q.0.as_str()), Some("250m"));
    let log_format = sidecar
        .env
        .as_ref()
        .and_then(|env| env.iter().find(|e| e.name == "MODELPOOL_LOG_FORMAT"))
        .and_then(|e| e.value.clone());
    assert_eq!(log_format.as_deref(), Some("text"));

    eventually(
        "the sidecar's RoleBinding",
        Duration::from_secs(60),
        || async { can_read_pools(&who).then_some(()) },
    )
    .await;
    assert!(
        !can_read_pools(&format!("system:serviceaccount:{ns}:bystander")),
        "only the pool's pods' ServiceAccounts are bound"
    );
    let binding: serde_json::Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "rolebinding",
        "modelpool-sidecar-video",
        "-n",
        &ns,
        "-o",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(binding["roleRef"]["name"], role.as_str());
    assert_eq!(
        binding["metadata"]["ownerReferences"][0]["kind"],
        "ModelPool"
    );
    assert_eq!(binding["metadata"]["ownerReferences"][0]["name"], "video");
    cp.kubectl(["delete", "mutatingwebhookconfiguration", &webhook_name]);
    cp.kubectl(["delete", "clusterrole", &role]);
}

/// The owner UIDs in `kubectl get KIND NAME -n NS` (empty when it has none or is missing).
fn owner_uids(cp: &ControlPlane, ns: &str, kind: &str, name: &str) -> Vec<String> {
    let out = cp.kubectl([
        "get",
        kind,
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.ownerReferences[*].uid}",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `--owner-deployment` (what the chart sets): the leader Lease and the managed webhook Secret
/// get an owner reference to the operator's Deployment, so that `helm uninstall` garbage-collects
/// them (shown on a real node in `node.rs`). An upgrade from a version without it adopts the
/// Lease and Secret it finds; a Deployment that cannot be read stops the operator with the flag
/// named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_owns_its_lease_and_secret_by_its_deployment() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("owner").await;
    let webhook_name = format!("modelpool-{ns}");
    let port = free_port();
    cp.kubectl_stdin(
        ["apply", "-f", "-"],
        &webhook_config(&webhook_name, &ns, &format!("127.0.0.1:{port}")).to_string(),
    );
    let lease = "modelpool-leader";
    let secret = "modelpool-webhook-tls";

    // An operator without the flag (an older version) makes both without an owner.
    let old = Operator::start(cp, &ns, "op-old", port, &webhook_name);
    eventually(
        "the Secret and the Lease",
        Duration::from_secs(60),
        || async {
            let exist = ["secret", "lease"]
                .iter()
                .zip([secret, lease])
                .all(|(k, n)| {
                    cp.kubectl(["get", k, n, "-n", &ns, "-o", "name"])
                        .status
                        .success()
                });
            (exist && old.is_leader()).then_some(())
        },
    )
    .await;
    assert!(owner_uids(cp, &ns, "secret", secret).is_empty());
    assert!(owner_uids(cp, &ns, "lease", lease).is_empty());
    drop(old);

    // No controller manager runs here: the Deployment is only an object to own them.
    cp.kubectl_stdin(
        ["apply", "-n", &ns, "-f", "-"],
        r#"{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "modelpool-operator"},
            "spec": {"selector": {"matchLabels": {"app": "op"}},
                     "template": {"metadata": {"labels": {"app": "op"}},
                                  "spec": {"containers": [{"name": "op", "image": "op"}]}}}}"#,
    );
    let uid = cp.kubectl_ok([
        "get",
        "deployment",
        "modelpool-operator",
        "-n",
        &ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    assert!(!uid.trim().is_empty());
    let new = Operator::start_with(
        cp,
        &ns,
        "op-new",
        port,
        &webhook_name,
        &["--owner-deployment", "modelpool-operator"],
    );
    // The old leader's Lease expires (4 s); the new leader takes it and adopts both.
    eventually(
        "the Lease and the Secret owned by the Deployment",
        Duration::from_secs(60),
        || async {
            let owned = [("secret", secret), ("lease", lease)]
                .iter()
                .all(|(k, n)| owner_uids(cp, &ns, k, n) == [uid.trim()]);
            (owned && new.is_leader()).then_some(())
        },
    )
    .await;
    drop(new);

    // A Deployment that cannot be read: the operator exits, naming the flag and the object.
    let mut child = operator_command(cp, &ns, "op-missing", free_port())
        .args(["--webhook-listen", "off", "--owner-deployment", "nowhere"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the operator");
    let status = eventually("the operator to exit", Duration::from_secs(60), || {
        let exited = child.try_wait().expect("try_wait");
        async move { exited }
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("deployment {ns}/nowhere"))
            && stderr.contains("--owner-deployment"),
        "{stderr}"
    );
}
