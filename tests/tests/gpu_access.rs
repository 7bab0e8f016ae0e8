//! How the injected sidecar reads the app's GPU (`spec.gpu.access`, docs/gpu.md), against the
//! real apiserver: the DRA claim the webhook copies onto the sidecar must be a spec the
//! apiserver's own DRA validation accepts (a container claim must name one of the pod's
//! `resourceClaims`, and a ResourceClaim must validate as `resource.k8s.io/v1`), and a pool's
//! `gpu.access` must win over the operator's default.
//!
//! No pod runs here (no kubelet, no DRA driver): the claim is never allocated. What is proven is
//! the shape of the injected pod, which is what the kubelet and the DRA driver then act on.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use modelpool_e2e::{
    ControlPlane,
    support::{eventually, free_port, install_crd, operator_command, webhook_config},
};

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POOLS: &str = r#"
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: dra
spec:
  limits: {vram: 20Gi}
  models:
    - {name: t2v, vram: 12Gi}
---
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: blind
spec:
  gpu: {access: None}
  limits: {vram: 20Gi}
  models:
    - {name: t2v, vram: 12Gi}
---
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: plugin
spec:
  gpu: {access: VisibleDevices}
  limits: {vram: 20Gi}
  models:
    - {name: t2v, vram: 12Gi}
"#;

const CLAIM: &str = r#"
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata:
  name: app-gpu
spec:
  devices:
    requests:
      - name: gpu
        exactly:
          deviceClassName: gpu.nvidia.com
"#;

/// A pod that PodSecurity `restricted` admits, using the `app-gpu` claim when `claim`.
fn app_pod(name: &str, pool: &str, claim: bool) -> Pod {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"modelpool.io/pool": pool}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "python:3.12-slim",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    });
    if claim {
        pod["spec"]["resourceClaims"] =
            serde_json::json!([{"name": "gpu", "resourceClaimName": "app-gpu"}]);
        pod["spec"]["containers"][0]["resources"] =
            serde_json::json!({"claims": [{"name": "gpu"}]});
    }
    serde_json::from_value(pod).expect("pod JSON")
}

fn sidecar(pod: &Pod) -> k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "modelpool-sidecar"))
        .cloned()
        .unwrap_or_else(|| panic!("{:?} was not injected", pod.metadata.name))
}

fn reading(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("modelpool.io/gpu-reading"))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_joins_the_apps_dra_claim_and_pools_choose_the_gpu_access() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.restricted_namespace("gpu-access").await;
    let webhook_name = format!("modelpool-{ns}");
    let port = free_port();
    cp.kubectl_stdin(
        ["apply", "-f", "-"],
        &webhook_config(&webhook_name, &ns, &format!("127.0.0.1:{port}")).to_string(),
    );
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{ns}-operator.log")))
        .expect("log file");
    let _operator = Operator(
        operator_command(cp, &ns, "gpu-op", free_port())
            .args(["--webhook-listen", &format!("127.0.0.1:{port}")])
            .args([
                "--tls-names",
                "127.0.0.1",
                "--webhook-config",
                &webhook_name,
            ])
            .args(["--sidecar-gpu-access", "Auto"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting modelpool-operator"),
    );
    let applied = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], POOLS);
    assert!(
        applied.status.success(),
        "pools with spec.gpu: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let claim = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], CLAIM);
    assert!(
        claim.status.success(),
        "the resource.k8s.io/v1 ResourceClaim: {}",
        String::from_utf8_lossy(&claim.stderr)
    );

    let pods: Api<Pod> = Api::namespaced(cp.client(), &ns);
    // The webhook serves once the operator has its certificate: retry the first create.
    let with_claim = eventually(
        "an injected pod using a DRA claim",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let created = pods
                    .create(&PostParams::default(), &app_pod("dra-app", "dra", true))
                    .await
                    .ok()?;
                let injected = created
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.name == "modelpool-sidecar"));
                if !injected {
                    // Admitted before the webhook served: try again with the webhook up.
                    let _ = pods.delete("dra-app", &Default::default()).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
                Some(created)
            }
        },
    )
    .await;
    // The apiserver accepted the sidecar's claim reference (it validates that every container
    // claim names a pod resourceClaim) and kept it.
    let claims = sidecar(&with_claim)
        .resources
        .and_then(|r| r.claims)
        .expect("the sidecar lists the app's claim");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].name, "gpu");
    assert_eq!(reading(&with_claim), "dra-claim");

    // Auto without a claim: nothing extra for the sidecar, and the pod says so.
    let plain = pods
        .create(&PostParams::default(), &app_pod("plain-app", "dra", false))
        .await
        .expect("plain pod");
    assert!(sidecar(&plain).resources.and_then(|r| r.claims).is_none());
    assert_eq!(reading(&plain), "app-reported");

    // A pool's gpu.access: None wins over the operator's Auto, even with a claim.
    let blind = pods
        .create(&PostParams::default(), &app_pod("blind-app", "blind", true))
        .await
        .expect("blind pod");
    let blind_sidecar = sidecar(&blind);
    assert!(
        blind_sidecar
            .args
            .unwrap_or_default()
            .iter()
            .any(|a| a == "--no-nvml")
    );
    assert!(blind_sidecar.resources.and_then(|r| r.claims).is_none());
    assert_eq!(reading(&blind), "app-reported");

    // VisibleDevices: NVML-only capabilities for every GPU of the node.
    let plugin = pods
        .create(
            &PostParams::default(),
            &app_pod("plugin-app", "plugin", false),
        )
        .await
        .expect("plugin pod");
    let env = sidecar(&plugin).env.unwrap_or_default();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("NVIDIA_VISIBLE_DEVICES"), "all");
    assert_eq!(value("NVIDIA_DRIVER_CAPABILITIES"), "utility");
    assert_eq!(reading(&plugin), "visible-devices");

    // A bad access value is refused by the CRD's schema, naming the field.
    let bad = cp.kubectl_stdin(
        ["apply", "-n", &ns, "-f", "-"],
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {name: bad}\nspec:\n  gpu: {access: Dra}\n  models: [{name: m, vram: 1Gi}]\n",
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "gpu.access: Dra was accepted");
    assert!(stderr.contains("spec.gpu.access"), "{stderr}");

    cp.kubectl(["delete", "mutatingwebhookconfiguration", &webhook_name]);
}
