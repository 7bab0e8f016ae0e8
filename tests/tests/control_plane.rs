//! Smoke tests of the test control plane itself (etcd + kube-apiserver on loopback).

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use modelpool_e2e::ControlPlane;
use serde_json::json;

#[test]
fn kubectl_api_resources() {
    let cp = ControlPlane::shared();
    let out = cp.kubectl_ok(["api-resources", "-o", "name"]);
    let names: Vec<&str> = out.lines().collect();
    for expected in [
        "pods",
        "namespaces",
        "customresourcedefinitions.apiextensions.k8s.io",
        "validatingwebhookconfigurations.admissionregistration.k8s.io",
        "validatingadmissionpolicies.admissionregistration.k8s.io",
    ] {
        assert!(names.contains(&expected), "{expected} missing from:\n{out}");
    }
}

#[tokio::test]
async fn creates_a_namespace() {
    let cp = ControlPlane::shared();
    let ns = cp.fresh_namespace("smoke").await;
    assert!(ns.starts_with("smoke-"), "{ns}");

    let got = Api::<Namespace>::all(cp.client()).get(&ns).await.unwrap();
    assert_eq!(got.metadata.name.as_deref(), Some(ns.as_str()));
    Api::<ServiceAccount>::namespaced(cp.client(), &ns)
        .get("default")
        .await
        .unwrap();
    let out = cp.kubectl_ok(["get", "namespace", &ns, "-o", "name"]);
    assert_eq!(out.trim(), format!("namespace/{ns}"));
}

fn pod(name: &str, privileged: bool) -> Pod {
    let security_context = if privileged {
        json!({"privileged": true})
    } else {
        json!({
            "allowPrivilegeEscalation": false,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    };
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{
            "name": "main",
            "image": "registry.invalid/never-pulled:1",
            "securityContext": security_context,
        }]},
    }))
    .expect("a valid pod")
}

#[tokio::test]
async fn restricted_namespace_refuses_a_privileged_pod() {
    let cp = ControlPlane::shared();
    let restricted = cp.restricted_namespace("psa-restricted").await;
    let pods = Api::<Pod>::namespaced(cp.client(), &restricted);

    let err = pods
        .create(&PostParams::default(), &pod("privileged", true))
        .await
        .expect_err("PodSecurity restricted must refuse a privileged pod");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("violates PodSecurity \"restricted:latest\"")
                    && status.message.contains("privileged"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a PodSecurity refusal, got {other:?}"),
    }

    // A pod that meets `restricted` is admitted (and never runs: no kubelet)...
    pods.create(&PostParams::default(), &pod("compliant", false))
        .await
        .unwrap();
    // ...and a privileged pod is fine where nothing is enforced.
    let plain = cp.fresh_namespace("psa-plain").await;
    Api::<Pod>::namespaced(cp.client(), &plain)
        .create(&PostParams::default(), &pod("privileged", true))
        .await
        .unwrap();
}

/// The apiserver calls `url:` webhooks on loopback directly. The "webhook" here is
/// a bare TCP listener, so the call fails (failurePolicy Fail), but it arrives.
#[tokio::test]
async fn webhooks_reach_loopback() {
    let cp = ControlPlane::shared();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 1];
        conn.read_exact(&mut first).unwrap();
        first[0] // 0x16: a TLS handshake record
    });

    let ns = cp.fresh_namespace("webhook").await;
    let name = format!("{ns}-probe");
    let webhook: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "probe.modelpool.io",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    let webhooks = Api::<ValidatingWebhookConfiguration>::all(cp.client());
    webhooks
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();

    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "probe"}, "data": {"a": "b"}})).unwrap();
    let configmaps = Api::<ConfigMap>::namespaced(cp.client(), &ns);
    // The webhook configuration takes effect asynchronously: retry until it is called.
    let mut refused = None;
    for _ in 0..50 {
        match configmaps.create(&PostParams::default(), &cm).await {
            Err(kube::Error::Api(status)) => {
                refused = Some(status.message);
                break;
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => {
                configmaps
                    .delete("probe", &DeleteParams::default())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    webhooks
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let refused = refused.expect("the webhook was never called");
    assert!(
        refused.contains("failed calling webhook \"probe.modelpool.io\""),
        "{refused}"
    );
    assert_eq!(accepted.join().unwrap(), 0x16);
}
