//! The chart's injection webhook with the operator unreachable (issue 15): in a namespace
//! labelled `modelpool.io/fail-closed` a pod asking for a pool is refused, elsewhere it is
//! admitted without its sidecar (fail open, the default). The chart's own
//! MutatingWebhookConfiguration, rendered by the pinned Helm, on the real apiserver; its
//! Service has no operator behind it.
//!
//! Its own test binary: the webhook it registers would stop other tests' pool-labelled pods.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use modelpool_e2e::{ControlPlane, repo_root, success_stdout};

fn pod() -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": {"modelpool.io/pool": "video"}},
        "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
    }))
    .expect("pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_closed_namespace_refuses_pods_while_the_webhook_is_unreachable() {
    let cp = ControlPlane::shared();
    let release_ns = cp.fresh_namespace("modelpool").await;
    let rendered = success_stdout(
        "helm template",
        cp.helm_command()
            .args(["template", "mp"])
            .arg(repo_root().join("charts/modelpool"))
            .args(["--namespace", &release_ns])
            .args(["--show-only", "templates/webhook.yaml"])
            .output()
            .expect("running helm"),
    );
    let applied = cp.kubectl_stdin(["apply", "-f", "-"], &rendered);
    assert!(applied.status.success(), "{applied:?}");

    let closed = cp
        .namespace_with_labels("closed", &[("modelpool.io/fail-closed", "true")])
        .await;
    let open = cp.fresh_namespace("open").await;
    let client = cp.client();

    // Fail open (the default): admitted, unchanged (no sidecar).
    let admitted = Api::<Pod>::namespaced(client.clone(), &open)
        .create(&PostParams::default(), &pod())
        .await
        .expect("admitted in a namespace without the label");
    let containers = admitted.spec.expect("spec").containers;
    assert_eq!(containers.len(), 1, "no sidecar without the operator");

    // Fail closed: refused, naming the webhook.
    let refused = Api::<Pod>::namespaced(client, &closed)
        .create(&PostParams::default(), &pod())
        .await
        .expect_err("refused in a fail-closed namespace");
    let message = refused.to_string();
    assert!(
        message.contains("inject-fail-closed.modelpool.io"),
        "{message}"
    );

    let deleted = cp.kubectl_stdin(["delete", "-f", "-"], &rendered);
    assert!(deleted.status.success(), "{deleted:?}");
}
