//! Path (c) of docs/gpu.md on the real apiserver: a pod whose sidecar has no GPU reading (no
//! NVML here, as under the device plugin without `gpu.access: VisibleDevices`) unloads a model
//! that declared VRAM. Its RAM comes back, but nothing proves its VRAM did, so the unload is
//! counted `unverified`: in the pod's report, the pool's `status.unverifiedUnloads`, the
//! `ReclaimVerified` condition naming the pod, and the `Unverified` column of `kubectl get mp`.
//! A model with no VRAM, unloaded the same way, is proven by its RSS and not counted.

use std::{process::Stdio, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use modelpool_crds::{ModelPool, report::PodReport};
use modelpool_e2e::{
    ControlPlane,
    support::{
        Killed, MemhogApp, cluster_sidecar, eventually, free_port, install_crd, log_file,
        operator_command,
    },
};

const POOL: &str = r#"
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: gpu-less
spec:
  limits: {vram: 8Gi, ram: 512Mi}
  policy: {mode: Aggressive}
  models:
    - {name: on-gpu, vram: 2Gi, ram: 32Mi}
    - {name: on-cpu, ram: 32Mi}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloads_no_reading_proves_are_counted_unverified_and_shown() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("unverified").await;
    let client = cp.client();
    let dir = tempfile::tempdir().expect("temp dir");

    cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], POOL);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pools: Api<ModelPool> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-0", "labels": {"modelpool.io/pool": "gpu-less"}},
        "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let _operator = Killed(
        operator_command(cp, &ns, "op", free_port())
            .args(["--webhook-listen", "off"])
            .stdout(log_file(dir.path(), "operator"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the operator"),
    );
    let socket = dir.path().join("sidecar.sock");
    let _sidecar = cluster_sidecar(cp, &ns, "gpu-less", "app-0", &socket, dir.path());
    let mut app = MemhogApp::start(&socket, dir.path(), "app-0", "on-gpu,on-cpu");

    // Aggressive: each model is unloaded at its release, and the app frees its RAM. The app
    // reports the 2 GiB of VRAM its load took (as the SDK does from torch); nothing here can
    // read VRAM to see it given back.
    app.use_model("on-cpu", 32);
    let reply = app.send("acquire on-gpu 32 vram=2048");
    assert_eq!(reply["status"], 200, "acquire on-gpu: {reply}");
    let lease = reply["body"]["lease"].as_str().expect("a lease").to_owned();
    let released = app.send(&format!("release {lease}"));
    assert_eq!(released["status"], 200, "release on-gpu: {released}");

    let status = eventually(
        "the unverified unload in the pool's status",
        Duration::from_secs(90),
        || async {
            let status = pools.get("gpu-less").await.ok()?.status?;
            (status.unverified_unloads >= 1 && status.models.iter().all(|m| m.loaded_in == 0))
                .then_some(status)
        },
    )
    .await;
    assert_eq!(
        status.unverified_unloads, 1,
        "only the model with VRAM is unverified: {status:?}"
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "ReclaimVerified")
        .expect("a ReclaimVerified condition");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "UnloadsUnverified"),
        "{condition:?}"
    );
    assert!(condition.message.contains("app-0 (1)"), "{condition:?}");

    // The pod's own report says the same.
    let pod = pods.get("app-0").await.expect("app-0");
    let report = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("modelpool.io/report"))
        .and_then(|t| PodReport::from_annotation(t).ok())
        .expect("a report");
    assert_eq!(report.unverified, 1, "{report:?}");

    // And `kubectl get mp` shows it in its own column.
    let table = cp.kubectl_ok(["get", "mp", "gpu-less", "-n", &ns]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "UNVERIFIED")
        .unwrap_or_else(|| panic!("an UNVERIFIED column: {table}"));
    assert_eq!(header.len(), row.len(), "no blank cells: {table}");
    assert_eq!(row[column], "1", "{table}");
}
