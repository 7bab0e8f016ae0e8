//! The server drivers' injection defaults on the real apiserver (issue 18): the example pools
//! (`examples/pools/{ollama,mlserver,vllm}.yaml`) and the pods of the example Deployments
//! (`examples/*-deployment.yaml`) go through the operator's webhook as a user would apply them.
//! A pod with just an Ollama container and a pool with `driver.kind: Ollama` and no url gets
//! the sidecar's `MODELPOOL_DRIVER_URL` / `MODELPOOL_PROCESS_MATCH` from that container and a
//! shared process namespace; a pod whose server container cannot be told gets a warning that
//! names `spec.driver.container`.
//!
//! No pod runs here (no kubelet): what is proven is the injected pod the apiserver stored.

use std::{process::Stdio, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use modelpool_e2e::{
    ControlPlane, repo_root,
    support::{Killed, eventually, free_port, install_crd, operator_command, webhook_config},
};
use serde_json::Value;

/// An example file, with its `namespace: inference` moved to `ns`.
fn example(path: &str, ns: &str) -> String {
    let text =
        std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        text.contains("namespace: inference"),
        "{path} no longer names the inference namespace"
    );
    text.replace("namespace: inference", &format!("namespace: {ns}"))
}

/// The pod a Deployment example would create (its template), named `name`.
fn deployment_pod(path: &str, name: &str) -> Pod {
    let text =
        std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let deployment: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let template = &deployment["spec"]["template"];
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }))
    .unwrap_or_else(|e| panic!("{path}'s pod template: {e}"))
}

fn sidecar_env(pod: &Pod) -> Vec<(String, String)> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "modelpool-sidecar"))
        .unwrap_or_else(|| panic!("{:?} was not injected", pod.metadata.name))
        .env
        .iter()
        .flatten()
        .filter(|e| e.name == "MODELPOOL_DRIVER_URL" || e.name == "MODELPOOL_PROCESS_MATCH")
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

fn server_container(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("modelpool.io/server-container"))
        .cloned()
}

fn pair(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_pools_get_the_server_containers_url_and_process_match() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.fresh_namespace("servers").await;
    let webhook_name = format!("modelpool-{ns}");
    let port = free_port();
    cp.kubectl_stdin(
        ["apply", "-f", "-"],
        &webhook_config(&webhook_name, &ns, &format!("127.0.0.1:{port}")).to_string(),
    );
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{ns}-operator.log")))
        .expect("log file");
    let _operator = Killed(
        operator_command(cp, &ns, "servers-op", free_port())
            .args(["--webhook-listen", &format!("127.0.0.1:{port}")])
            .args([
                "--tls-names",
                "127.0.0.1",
                "--webhook-config",
                &webhook_name,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting modelpool-operator"),
    );
    for account in ["ollama", "mlserver", "vllm"] {
        cp.kubectl_ok(["create", "serviceaccount", "-n", &ns, account]);
    }
    for pool in [
        "examples/pools/ollama.yaml",
        "examples/pools/mlserver.yaml",
        "examples/pools/vllm.yaml",
    ] {
        let applied = cp.kubectl_stdin(["apply", "-f", "-"], &example(pool, &ns));
        assert!(
            applied.status.success(),
            "{pool}: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    let pods: Api<Pod> = Api::namespaced(cp.client(), &ns);
    // The webhook serves once the operator has its certificate: retry the first create.
    let ollama = eventually(
        "the Ollama example's pod, injected",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let pod = deployment_pod("examples/ollama-deployment.yaml", "ollama");
                let created = pods.create(&PostParams::default(), &pod).await.ok()?;
                let injected = created
                    .spec
                    .as_ref()
                    .and_then(|s| s.init_containers.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.name == "modelpool-sidecar"));
                if !injected {
                    let _ = pods.delete("ollama", &Default::default()).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
                Some(created)
            }
        },
    )
    .await;
    // Just an Ollama container, a pool with kind Ollama and no url: the container's port and
    // Ollama's usual command line, and the process namespace shared to see its runners.
    assert_eq!(
        sidecar_env(&ollama),
        [
            pair("MODELPOOL_DRIVER_URL", "http://127.0.0.1:11434"),
            pair("MODELPOOL_PROCESS_MATCH", "ollama serve"),
        ]
    );
    assert_eq!(server_container(&ollama).as_deref(), Some("ollama"));
    assert_eq!(
        ollama.spec.as_ref().and_then(|s| s.share_process_namespace),
        Some(true)
    );

    // MLServer beside a log shipper: `driver.container` picks it; its args are the match.
    let mlserver = pods
        .create(
            &PostParams::default(),
            &deployment_pod("examples/mlserver-deployment.yaml", "mlserver"),
        )
        .await
        .expect("the MLServer example's pod");
    assert_eq!(
        sidecar_env(&mlserver),
        [
            pair("MODELPOOL_DRIVER_URL", "http://127.0.0.1:8080"),
            pair("MODELPOOL_PROCESS_MATCH", "mlserver start /models"),
        ]
    );
    assert_eq!(server_container(&mlserver).as_deref(), Some("mlserver"));

    // vLLM: the pool lists its servers and processMatch: nothing to fill in.
    let vllm = pods
        .create(
            &PostParams::default(),
            &deployment_pod("examples/vllm-deployment.yaml", "vllm"),
        )
        .await
        .expect("the vLLM example's pod");
    assert_eq!(sidecar_env(&vllm), []);
    assert_eq!(server_container(&vllm), None);

    // Two Ollama-looking containers and no driver.container: admitted, with a warning the user
    // sees in kubectl that names the field to set.
    let ambiguous = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: twins\n  namespace: {ns}\n  labels: {{modelpool.io/pool: ollama}}\nspec:\n  containers:\n    - {{name: a, image: ollama/ollama}}\n    - {{name: b, image: ollama/ollama}}\n"
    );
    let created = cp.kubectl_stdin(["create", "-f", "-"], &ambiguous);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot tell which of this pod's containers (a, b) runs the server; set spec.driver.container"),
        "{stderr}"
    );
    let twins = pods.get("twins").await.expect("the twins pod");
    assert_eq!(sidecar_env(&twins), []);

    cp.kubectl(["delete", "mutatingwebhookconfiguration", &webhook_name]);
}
