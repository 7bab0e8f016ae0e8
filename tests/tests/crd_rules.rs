//! The CRD's validation on the real apiserver: each CEL rule (and the schema's patterns)
//! refuses its bad pool with its message, through `kubectl apply`; and `status` can only be
//! written through the status subresource.

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use modelpool_crds::ModelPool;
use modelpool_e2e::{ControlPlane, support::install_crd};

fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

#[tokio::test]
async fn each_rule_refuses_its_bad_pool_with_its_message() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("rules").await;
    let cases = [
        (
            "dup",
            "  models:\n    - {name: a}\n    - {name: a}\n",
            "model names must be unique",
        ),
        (
            "badname",
            "  models:\n    - {name: Upscale}\n",
            "model name must be lowercase letters",
        ),
        (
            "vram",
            "  limits: {vram: 10Gi}\n  models:\n    - {name: t2v, vram: 12Gi}\n",
            "each model's vram must fit within limits.vram",
        ),
        (
            "ram",
            "  limits: {ram: 1Gi}\n  models:\n    - {name: a, ram: 2Gi}\n",
            "each model's ram must fit within limits.ram",
        ),
        (
            "http",
            "  driver: {kind: Http}\n  models:\n    - {name: a}\n",
            "driver.url is required when driver.kind is Http",
        ),
        (
            "vllmone",
            "  driver: {kind: Vllm}\n  models:\n    - {name: a}\n    - {name: b}\n",
            "it may be left out only for a pool of one model",
        ),
        (
            "vllm",
            "  driver: {kind: Vllm, servers: {a: 'http://127.0.0.1:8001'}}\n  models:\n    - {name: a}\n    - {name: b}\n",
            "driver.servers must name every model's vLLM server when driver.kind is Vllm",
        ),
        (
            "url",
            "  driver: {kind: Http, url: 'ftp://x'}\n  models:\n    - {name: a}\n",
            "driver.url must start with http://",
        ),
        (
            "https",
            "  driver: {kind: Ollama, url: 'https://127.0.0.1:11434'}\n  models:\n    - {name: a}\n",
            "the sidecar does not speak https",
        ),
        (
            "vrampct",
            "  policy: {pressure: {vramPercent: 0}}\n  models:\n    - {name: a}\n",
            "vramPercent must be between 1 and 100",
        ),
        (
            "rampct",
            "  policy: {pressure: {ramPercent: 101}}\n  models:\n    - {name: a}\n",
            "ramPercent must be between 1 and 100",
        ),
        (
            "loadsecs",
            "  models:\n    - {name: a, loadSeconds: -1}\n",
            "loadSeconds must not be negative",
        ),
        (
            "quantity",
            "  models:\n    - {name: a, vram: 12Gx}\n",
            "spec.models[0].vram",
        ),
        (
            "proxyconns",
            "  driver: {kind: Ollama, url: 'http://127.0.0.1:11434'}\n  proxy: {port: 8080, maxConnections: 0}\n  models:\n    - {name: a}\n",
            "spec.proxy.maxConnections",
        ),
        ("nomodels", "  models: []\n", "spec.models"),
    ];
    for (name, spec, message) in cases {
        let out = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], &manifest(name, spec));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the apiserver accepted it");
        assert!(
            stderr.contains(message),
            "{name}: wanted {message:?} in:\n{stderr}"
        );
    }
    // Nothing was half-created.
    let list = cp.kubectl_ok(["get", "mp", "-n", &ns, "-o", "name"]);
    assert!(list.trim().is_empty(), "{list}");
}

#[tokio::test]
async fn status_is_written_through_the_status_subresource_only() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("status").await;
    let pools: Api<ModelPool> = Api::namespaced(cp.client(), &ns);
    let mut pool: ModelPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
        "metadata": {"name": "p"},
        "spec": {"models": [{"name": "a"}]},
        "status": {"podsMatched": 7}
    }))
    .expect("pool");
    let created = pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create");
    assert_eq!(
        created.status.map(|s| s.pods_matched).unwrap_or_default(),
        0,
        "status ignored on create"
    );

    // A patch of the main resource cannot set status...
    let patch = serde_json::json!({"status": {"podsMatched": 5}});
    let after = pools
        .patch("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    assert_eq!(after.status.map(|s| s.pods_matched).unwrap_or_default(), 0);
    // ...the status subresource can, and cannot change the spec.
    pool.spec.models[0].name = "changed".into();
    let patch = serde_json::json!({"spec": {"models": [{"name": "changed"}]}, "status": {"podsMatched": 5}});
    let after = pools
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch status");
    assert_eq!(after.status.map(|s| s.pods_matched), Some(5));
    assert_eq!(after.spec.models[0].name, "a", "spec untouched by /status");
}
