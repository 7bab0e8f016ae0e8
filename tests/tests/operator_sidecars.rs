//! The operator with real sidecars in cluster mode: a pool and three pods on the real
//! apiserver, three `modelpool-sidecar` processes playing those pods (they read the pool from
//! the API and report on their own pod), app processes (`modelpool-memhog`) holding real
//! memory acquiring through them, and the pool's status and `kubectl get mp` showing it.
//! Deleting the pool makes the sidecars unload everything before the finalizer lets it go.
//! A sidecar in cluster mode sizes an undeclared model from weights read through the app's
//! process (`/proc/<pid>/root`), never its own filesystem.

use std::{process::Stdio, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use modelpool_crds::{ModelPool, report::PodReport};
use modelpool_e2e::{
    ControlPlane,
    support::{
        Killed, MemhogApp, cluster_sidecar, eventually, free_port, install_crd, log_file,
        operator_command, workspace_bin,
    },
};

const POOL: &str = r#"
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: video
spec:
  limits: {ram: 512Mi}
  policy: {mode: Cache, idleTTL: 10m}
  models:
    - {name: t2v, ram: 48Mi}
    - {name: upscale, ram: 64Mi}
    - {name: frame_interpolation, ram: 32Mi}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_report_through_their_pods_and_drain_on_delete() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("sidecars").await;
    let client = cp.client();
    let dir = tempfile::tempdir().expect("temp dir");

    cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], POOL);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pools: Api<ModelPool> = Api::namespaced(client.clone(), &ns);
    for i in 0..3 {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{i}"), "labels": {"modelpool.io/pool": "video"}},
            "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }

    let _operator = Killed(
        operator_command(cp, &ns, "op", free_port())
            .args(["--webhook-listen", "off"])
            .stdout(log_file(dir.path(), "operator"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the operator"),
    );

    // Three sidecars in cluster mode, each "in" its pod.
    let mut sidecars = Vec::new();
    let mut apps = Vec::new();
    for i in 0..3 {
        let socket = dir.path().join(format!("sidecar-{i}.sock"));
        sidecars.push(cluster_sidecar(
            cp,
            &ns,
            "video",
            &format!("app-{i}"),
            &socket,
            dir.path(),
        ));
        apps.push(MemhogApp::start(
            &socket,
            dir.path(),
            &format!("app-{i}"),
            "t2v,upscale,frame_interpolation",
        ));
    }

    // Real loads: t2v in every pod, upscale in one.
    for app in &mut apps {
        app.use_model("t2v", 48);
    }
    apps[1].use_model("upscale", 64);

    let status = eventually(
        "the loads in the pool's status",
        Duration::from_secs(90),
        || async {
            let status = pools.get("video").await.ok()?.status?;
            let t2v = status.models.iter().find(|m| m.name == "t2v")?;
            let upscale = status.models.iter().find(|m| m.name == "upscale")?;
            let loads: i64 = status.models.iter().map(|m| m.loads).sum();
            (status.pods_ready.as_deref() == Some("3/3")
                && t2v.loaded_in == 3
                && upscale.loaded_in == 1
                && loads == 4)
                .then_some(status)
        },
    )
    .await;
    assert_eq!(status.models_loaded.as_deref(), Some("2/3"));
    let upscale = status
        .models
        .iter()
        .find(|m| m.name == "upscale")
        .expect("upscale");
    assert_eq!((upscale.loaded_in, upscale.loads), (1, 1));
    // Its sizes side by side in the status (`kubectl describe mp`): declared 64 MiB, measured
    // and peak the load's real 64 MiB (within what the RSS adds), nothing estimated.
    let sizes = eventually(
        "upscale's sizes in the pool's status",
        Duration::from_secs(60),
        || async {
            let status = pools.get("video").await.ok()?.status?;
            let upscale = status.models.into_iter().find(|m| m.name == "upscale")?;
            upscale
                .sizes
                .filter(|s| s.peak.is_some() && s.measured.is_some())
        },
    )
    .await;
    assert_eq!(
        sizes.declared.map(|d| d.ram_bytes),
        Some(64 << 20),
        "{sizes:?}"
    );
    assert!(sizes.estimated.is_none(), "{sizes:?}");
    for (what, size) in [("measured", sizes.measured), ("peak", sizes.peak)] {
        let ram = size.map_or(0, |s| s.ram_bytes);
        assert!(
            (64 << 20..80 << 20).contains(&ram),
            "{what} {ram} B should be the load's 64 MiB: {sizes:?}"
        );
    }
    let described = cp.kubectl_ok(["describe", "mp", "video", "-n", &ns]);
    assert!(
        ["Sizes:", "Declared:", "Measured:", "Peak:"]
            .iter()
            .all(|k| described.contains(k)),
        "kubectl describe mp shows the sizes:\n{described}"
    );
    // 3 x 48 MiB + 64 MiB of RAM held, as measured (the larger of what the apps report and
    // what the sidecars see their RSS grow by).
    let ram = status
        .ram_used
        .as_ref()
        .and_then(|q| q.bytes().ok())
        .expect("ramUsed");
    let expected = 208u64 << 20;
    assert!(
        ram >= expected && ram < expected + expected / 20,
        "ramUsed {ram} B should be 208 MiB within 5 %"
    );
    let table = cp.kubectl_ok(["get", "mp", "video", "-n", &ns]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["video", "2/3", "3/3"], "{table}");
    // No VRAM ceiling in this pool: that column is blank, so look for the mode by value.
    assert!(row.contains(&"Cache") && row.contains(&"True"), "{table}");

    // The report on a pod is compact and names what it holds.
    let pod = pods.get("app-1").await.expect("app-1");
    let text = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("modelpool.io/report"))
        .expect("a report annotation");
    assert!(text.len() < 1024, "compact: {} bytes", text.len());
    let report = PodReport::from_annotation(text).expect("a report");
    let mut held: Vec<&str> = report.models.iter().map(|m| m.name.as_str()).collect();
    held.sort_unstable();
    assert_eq!(held, ["t2v", "upscale"]);

    // Delete: the sidecars unload every model (the apps free the memory), report drained,
    // and only then does the finalizer let the pool go.
    pools
        .delete("video", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the pool to be gone", Duration::from_secs(90), || async {
        matches!(pools.get_opt("video").await, Ok(None)).then_some(())
    })
    .await;
    for i in 0..3 {
        let pod = pods.get(&format!("app-{i}")).await.expect("pod");
        let report = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("modelpool.io/report"))
            .and_then(|t| PodReport::from_annotation(t).ok())
            .expect("a report");
        assert!(
            report.drained && report.models.is_empty(),
            "app-{i}: {report:?}"
        );
    }
    for app in &mut apps {
        let rss = app.send("rss");
        assert_eq!(rss["held"], 0, "the app freed every model: {rss}");
    }
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
    assert!(!events.trim().is_empty(), "Drained event");
}

/// Cluster mode: the weights are a path as the app sees it. The sidecar reads nothing at start
/// (the app is not there yet); once the app's session names its pid, the model is estimated
/// through `/proc/<pid>/root` and admitted under `unsizedModels: Refuse` with that size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_sidecar_estimates_through_the_apps_process() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("estimate").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let weights = dir.path().join("weights/model.safetensors");
    std::fs::create_dir_all(weights.parent().expect("a parent")).expect("mkdir");
    let header = r#"{"w":{"dtype":"F16","shape":[4194304],"data_offsets":[0,8388608]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + (8 << 20), 0);
    std::fs::write(&weights, bytes).expect("write weights");
    let pool = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: est}}\nspec:\n  limits: {{ram: 512Mi}}\n  policy: {{mode: Cache, unsizedModels: Refuse}}\n  models:\n    - {{name: st, source: {{uri: \"file://{}\"}}}}\n",
        weights.display()
    );
    cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], &pool);
    let socket = dir.path().join("sidecar.sock");
    let _sidecar = cluster_sidecar(cp, &ns, "est", "app-0", &socket, dir.path());
    let state = || {
        let out = std::process::Command::new(workspace_bin("modelpool-sidecar"))
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()
            .expect("modelpool-sidecar status");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let before = eventually("the sidecar's state", Duration::from_secs(30), || async {
        state()
    })
    .await;
    assert!(
        before["pool"]["models"][0]["estimate"].is_null()
            && before["pool"]["models"][0]["ram_bytes"] == 0,
        "nothing is read before the app is known: {}",
        before["pool"]
    );

    let mut app = MemhogApp::start(&socket, dir.path(), "app-0", "st");
    let state = eventually(
        "the model estimated through the app's process",
        Duration::from_secs(60),
        || async {
            state().filter(|s| {
                s["pool"]["models"][0]["estimate"].is_object()
                    && s["sessions"].as_array().is_some_and(|v| !v.is_empty())
            })
        },
    )
    .await;
    let pid = &state["sessions"][0]["pid"];
    let model = &state["pool"]["models"][0];
    assert_eq!(
        model["estimate"]["through"],
        format!("/proc/{pid}/root"),
        "{model}"
    );
    assert_eq!(model["estimate"]["format"], "safetensors", "{model}");
    assert_eq!(model["ram_bytes"], 8 << 20, "{model}");
    let sizes = &model["sizes"];
    assert!(
        sizes["declared"].is_null()
            && sizes["estimated"]["ram"] == 8 << 20
            && sizes["need"]["ram"] == 8 << 20,
        "{sizes}"
    );
    // Sized now: `Refuse` lets it in.
    app.use_model("st", 8);
}
