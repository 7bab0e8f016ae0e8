//! The Helm chart (`charts/modelpool/`) against the pinned helm and the test control plane:
//! `helm lint` and `helm template` for the default values and for `ci/all-on-values.yaml`, the
//! values schema refusing bad values, and `helm install` / `helm uninstall` into a namespace
//! with PodSecurity `restricted` enforced, where the API server validates every object for real
//! (pods never run: there is no kubelet). The installed RBAC is exercised for real too: the
//! operator runs with its ServiceAccount's token and must elect itself, manage its webhook
//! certificate and reconcile a pool; the sidecar's "own pod" policy is tried with pod-bound
//! tokens.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use modelpool_e2e::monitoring::{Process, free_port, poll, workspace_bin};
use modelpool_e2e::{ControlPlane, repo_root, success_stdout, tool};
use serde_json::{Value, json};

const RELEASE: &str = "mp";

/// The install tests share release name `mp` and find their objects cluster-wide by its
/// label: one at a time.
static INSTALLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chart_dir() -> PathBuf {
    repo_root().join("charts/modelpool")
}

fn all_on_values() -> PathBuf {
    chart_dir().join("ci/all-on-values.yaml")
}

/// Helm's own folders, shared by the tests of this binary (no repositories are used).
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("modelpool-helm-")
            .tempdir()
            .expect("a temporary folder")
    })
    .path()
}

/// The pinned helm, not bound to any cluster (lint, template).
fn helm(args: &[&str]) -> Output {
    Command::new(tool("helm").expect("the pinned helm"))
        .args(args)
        .env("HELM_CACHE_HOME", helm_home().join("cache"))
        .env("HELM_CONFIG_HOME", helm_home().join("config"))
        .env("HELM_DATA_HOME", helm_home().join("data"))
        .env("KUBECONFIG", helm_home().join("no-kubeconfig"))
        .stdin(Stdio::null())
        .output()
        .expect("running helm")
}

fn helm_ok(args: &[&str]) -> String {
    success_stdout(&format!("helm {}", args.join(" ")), helm(args))
}

/// `helm template` with extra arguments, as parsed objects.
fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8"),
        "--namespace",
        "modelpool",
    ];
    args.extend_from_slice(extra);
    parse_manifests(&helm_ok(&args))
}

fn parse_manifests(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("helm's output is not YAML: {e}\n{text}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// The objects of the default values, every time.
const DEFAULT_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "ConfigMap",
    "Deployment",
    "MutatingWebhookConfiguration",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
];
const MONITORING_KINDS: &[&str] = &["PodMonitor", "PrometheusRule", "ServiceMonitor"];
const POLICY_KINDS: &[&str] = &[
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Asserts PodSecurity `restricted` settings and resources on every container of a pod spec.
fn assert_hardened(what: &str, pod_spec: &Value) {
    let pod_sc = &pod_spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true, "{what}: pod runAsNonRoot");
    assert_eq!(
        pod_sc["seccompProfile"]["type"], "RuntimeDefault",
        "{what}: pod seccomp"
    );
    let containers = pod_spec["containers"]
        .as_array()
        .into_iter()
        .chain(pod_spec["initContainers"].as_array())
        .flatten();
    for c in containers {
        let name = format!("{what}/{}", c["name"].as_str().unwrap_or("?"));
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}: runAsNonRoot");
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{name}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{name}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc["capabilities"]["drop"],
            json!(["ALL"]),
            "{name}: capabilities"
        );
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{name}: seccomp"
        );
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{name}: cpu request"
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{name}: memory request"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{name}: memory limit"
        );
    }
}

/// `(apiGroup, resource, verb, resourceName or "")` granted by a Role/ClusterRole.
fn grants(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let names = strings("resourceNames");
        let names = if names.is_empty() {
            vec![String::new()]
        } else {
            names
        };
        for g in strings("apiGroups") {
            for r in strings("resources") {
                for v in strings("verbs") {
                    for n in &names {
                        out.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn grant(g: &str, r: &str, v: &str, n: &str) -> (String, String, String, String) {
    (g.into(), r.into(), v.into(), n.into())
}

/// Catches the chart installing a CRD other than the one the types generate.
#[test]
fn chart_crd_is_the_generated_crd() {
    let generated =
        std::fs::read(repo_root().join("crds/modelpool.yaml")).expect("crds/modelpool.yaml");
    let copy = std::fs::read(chart_dir().join("crds/modelpool.yaml")).expect("the chart's CRD");
    assert!(
        generated == copy,
        "charts/modelpool/crds/modelpool.yaml is stale: cp crds/modelpool.yaml charts/modelpool/crds/"
    );
}

/// Catches chart errors helm itself reports (templates, Chart.yaml, values vs schema).
#[test]
fn helm_lint_passes_for_default_and_all_on_values() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8");
    helm_ok(&["lint", "--strict", chart]);
    helm_ok(&[
        "lint",
        "--strict",
        chart,
        "--values",
        all_on_values().to_str().expect("utf-8"),
    ]);
}

/// Catches a default install that lacks a piece, runs as root or without limits, grants more
/// than the operator needs, or registers a webhook that could block the cluster.
#[test]
fn default_values_render_a_hardened_least_privilege_install() {
    let objects = template(&[]);
    let expected: BTreeSet<String> = DEFAULT_KINDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        kinds(&objects),
        expected,
        "without the Prometheus Operator's API, no monitoring objects"
    );

    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_hardened("operator", pod);
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "run");
    for expected in [
        "--lease-name=mp-modelpool-operator",
        "--lease-duration-s=15",
        "--lease-retry-s=2",
        "--webhook-listen=0.0.0.0:8443",
        "--webhook-config=mp-modelpool-modelpool",
        "--tls-secret=mp-modelpool-webhook-tls",
        "--tls-names=mp-modelpool-webhook.modelpool.svc,mp-modelpool-webhook.modelpool.svc.cluster.local",
        "--metrics-listen=0.0.0.0:8080",
        "--sidecar-image=ghcr.io/modelpool/modelpool-sidecar:0.1.0",
    ] {
        assert!(
            args.contains(&expected),
            "operator args lack {expected}: {args:?}"
        );
    }
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/modelpool/modelpool-operator:0.1.0"
    );

    // Services: the webhook's 443 → 8443, and metrics.
    let services = find(&objects, "Service");
    let webhook_svc = services
        .iter()
        .find(|s| s["metadata"]["name"] == "mp-modelpool-webhook")
        .expect("the webhook Service");
    assert_eq!(webhook_svc["spec"]["ports"][0]["port"], 443);
    assert_eq!(webhook_svc["spec"]["ports"][0]["targetPort"], "webhook");
    assert!(
        services
            .iter()
            .any(|s| s["spec"]["ports"][0]["name"] == "metrics")
    );

    // The webhook: only labelled pods, never the release namespace, fails open, no side effects.
    let hook = &one(&objects, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate-pods");
    assert_eq!(hook["clientConfig"]["service"]["port"], 443);
    assert!(
        hook["clientConfig"]["caBundle"].is_null(),
        "the operator sets the caBundle, not helm"
    );
    assert_eq!(
        hook["objectSelector"]["matchExpressions"],
        json!([{"key": "modelpool.io/pool", "operator": "Exists"}])
    );
    let ns_expr = &hook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(ns_expr["key"], "kubernetes.io/metadata.name");
    assert_eq!(ns_expr["operator"], "NotIn");
    assert!(
        ns_expr["values"]
            .as_array()
            .expect("values")
            .contains(&json!("modelpool"))
    );
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    // Issue 15: a namespace labelled modelpool.io/fail-closed gets a second webhook that fails
    // closed (a pod there is refused while the webhook is unreachable); the first skips it.
    let hooks = one(&objects, "MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .expect("webhooks")
        .clone();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    let label_rule =
        |hook: &serde_json::Value| hook["namespaceSelector"]["matchExpressions"][1].clone();
    assert_eq!(
        label_rule(&hooks[0]),
        json!({"key": "modelpool.io/fail-closed", "operator": "DoesNotExist"})
    );
    assert_eq!(hooks[1]["name"], "inject-fail-closed.modelpool.io");
    assert_eq!(hooks[1]["failurePolicy"], "Fail");
    assert_eq!(
        label_rule(&hooks[1]),
        json!({"key": "modelpool.io/fail-closed", "operator": "Exists"})
    );
    assert_eq!(hooks[1]["objectSelector"], hook["objectSelector"]);
    assert_eq!(hooks[1]["clientConfig"], hook["clientConfig"]);

    // RBAC: exactly these grants.
    let roles = find(&objects, "ClusterRole");
    let operator_role = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "mp-modelpool-modelpool-operator")
        .expect("the operator ClusterRole");
    let expected: BTreeSet<_> = [
        grant("modelpool.io", "modelpools", "get", ""),
        grant("modelpool.io", "modelpools", "list", ""),
        grant("modelpool.io", "modelpools", "watch", ""),
        grant("modelpool.io", "modelpools", "patch", ""),
        grant("modelpool.io", "modelpools/status", "get", ""),
        grant("modelpool.io", "modelpools/status", "patch", ""),
        grant("modelpool.io", "modelpools/status", "update", ""),
        grant("modelpool.io", "modelpools/finalizers", "update", ""),
        grant("", "pods", "list", ""),
        grant("", "pods", "watch", ""),
        grant("", "pods", "delete", ""),
        grant("events.k8s.io", "events", "create", ""),
        grant("events.k8s.io", "events", "patch", ""),
        grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "get",
            "mp-modelpool-modelpool",
        ),
        grant(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            "mp-modelpool-modelpool",
        ),
    ]
    .into();
    assert_eq!(
        grants(operator_role),
        expected,
        "the operator's cluster-wide grants"
    );
    let role = one(&objects, "Role");
    assert_eq!(role["metadata"]["namespace"], "modelpool");
    let expected: BTreeSet<_> = [
        grant("coordination.k8s.io", "leases", "create", ""),
        grant(
            "coordination.k8s.io",
            "leases",
            "get",
            "mp-modelpool-operator",
        ),
        grant(
            "coordination.k8s.io",
            "leases",
            "update",
            "mp-modelpool-operator",
        ),
        grant(
            "coordination.k8s.io",
            "leases",
            "patch",
            "mp-modelpool-operator",
        ),
        grant("apps", "deployments", "get", "mp-modelpool-operator"),
        grant("", "secrets", "create", ""),
        grant("", "secrets", "get", "mp-modelpool-webhook-tls"),
        grant("", "secrets", "update", "mp-modelpool-webhook-tls"),
        grant("", "secrets", "patch", "mp-modelpool-webhook-tls"),
    ]
    .into();
    assert_eq!(
        grants(role),
        expected,
        "the operator's grants in its namespace"
    );
    let sidecar_role = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "mp-modelpool-modelpool-sidecar")
        .expect("the sidecar ClusterRole");
    let expected: BTreeSet<_> = [
        grant("modelpool.io", "modelpools", "get", ""),
        grant("modelpool.io", "modelpools", "list", ""),
        grant("modelpool.io", "modelpools", "watch", ""),
        grant("", "pods", "get", ""),
        grant("", "pods", "patch", ""),
    ]
    .into();
    assert_eq!(grants(sidecar_role), expected, "the sidecar's grants");
    // No binding for the sidecar role unless asked for.
    assert_eq!(find(&objects, "RoleBinding").len(), 1);

    let pdb = one(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
}

/// Catches optional objects that do not render, or render wrong, when turned on.
#[test]
fn all_on_values_render_every_optional_object() {
    let values = all_on_values();
    let objects = template(&["--values", values.to_str().expect("utf-8")]);
    let mut expected: BTreeSet<String> = DEFAULT_KINDS.iter().map(|k| k.to_string()).collect();
    expected.extend(
        MONITORING_KINDS
            .iter()
            .chain(POLICY_KINDS)
            .map(|k| k.to_string()),
    );
    assert_eq!(kinds(&objects), expected);
    for o in &objects {
        assert_eq!(
            o["metadata"]["labels"]["team"], "ml-platform",
            "commonLabels on {}",
            o["kind"]
        );
    }
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_hardened("operator", &deployment["spec"]["template"]["spec"]);
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--lease-name=modelpool-leader"), "{args}");
    // The injected sidecar's settings reach the operator, which applies them.
    for expected in [
        "--sidecar-cpu-limit=200m",
        "--sidecar-image-pull-policy=Always",
        "--sidecar-log-level=debug",
        "--sidecar-log-format=text",
    ] {
        assert!(
            args.contains(expected),
            "operator args lack {expected}: {args}"
        );
    }
    // extraArgs come last, so they win over the chart's own flags.
    let arg_list: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(arg_list.last(), Some(&"--api-qps=25"), "{arg_list:?}");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "scratch" && m["mountPath"] == "/scratch"),
        "extraVolumeMounts: {container}"
    );
    assert!(
        deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["name"] == "scratch"),
        "extraVolumes"
    );
    assert!(
        args.contains("@sha256:"),
        "the sidecar image by digest: {args}"
    );

    // The sidecar's binding and ServiceAccount in the listed namespace.
    let sa = find(&objects, "ServiceAccount");
    assert!(
        sa.iter().any(|s| s["metadata"]["name"] == "pooled-app"
            && s["metadata"]["namespace"] == "modelpool-apps")
    );
    let binding = find(&objects, "RoleBinding")
        .into_iter()
        .find(|b| b["metadata"]["namespace"] == "modelpool-apps")
        .expect("the sidecar RoleBinding");
    assert_eq!(binding["roleRef"]["name"], "mp-modelpool-modelpool-sidecar");
    assert_eq!(binding["subjects"][0]["name"], "pooled-app");

    // Monitoring: job names the alerts expect.
    let pm = one(&objects, "PodMonitor");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "mp-metrics");
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["replacement"],
        "modelpool-sidecar"
    );
    let sm = one(&objects, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"],
        "modelpool-operator"
    );
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
}

/// Writes `text` as a values file in a temporary folder and returns both (keep the folder).
fn values_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("values.yaml");
    std::fs::write(&path, text).expect("write values");
    (dir, path)
}

/// Catches the escape hatches (security contexts, extra args, env, volumes, pod metadata) not
/// reaching the operator pod, and an override of one security field dropping the other
/// restricted defaults.
#[test]
fn escape_hatches_reach_the_operator_pod() {
    let (_dir, values) = values_file(
        r#"
operator:
  podSecurityContext:
    runAsUser: 1000740000
    fsGroup: 1000740000
  containerSecurityContext:
    runAsUser: 1000740000
  extraArgs: ["--resync-s=60"]
  extraEnv: [{name: HTTPS_PROXY, value: "http://proxy.internal:3128"}]
  extraVolumes: [{name: trust, configMap: {name: corporate-ca}}]
  extraVolumeMounts: [{name: trust, mountPath: /etc/ssl/certs/corporate, readOnly: true}]
  podAnnotations: {example.com/scrape: "false"}
  podLabels: {example.com/team: ml}
"#,
    );
    let objects = template(&["--values", values.to_str().expect("utf-8")]);
    let pod_template = &one(&objects, "Deployment")["spec"]["template"];
    let pod = &pod_template["spec"];
    // Helm merges maps: the fields not overridden keep the restricted defaults.
    assert_hardened("operator", pod);
    assert_eq!(pod["securityContext"]["runAsUser"], 1000740000);
    assert_eq!(pod["securityContext"]["fsGroup"], 1000740000);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["runAsUser"], 1000740000);
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.last(), Some(&"--resync-s=60"));
    assert!(
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "HTTPS_PROXY")
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "trust" && m["readOnly"] == true)
    );
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["configMap"]["name"] == "corporate-ca")
    );
    assert_eq!(
        pod_template["metadata"]["annotations"]["example.com/scrape"],
        "false"
    );
    assert_eq!(pod_template["metadata"]["labels"]["example.com/team"], "ml");

    // A platform that assigns its own IDs (OpenShift) drops the pod security context.
    let objects = template(&["--set", "operator.podSecurityContext=null"]);
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    assert!(
        pod["securityContext"].is_null(),
        "{}",
        pod["securityContext"]
    );
}

/// Catches the cert-manager mode rendering without its Certificate, without the CA-injection
/// annotation, with the operator still managing (and allowed to write) its own certificate, or
/// with the pod not mounting the Secret cert-manager writes.
#[test]
fn cert_manager_mode_hands_the_certificate_to_cert_manager() {
    let objects = template(&["--set", "webhook.certManager.enabled=true"]);
    let kinds = kinds(&objects);
    assert!(
        kinds.contains("Issuer") && kinds.contains("Certificate"),
        "{kinds:?}"
    );
    let cert = one(&objects, "Certificate");
    assert_eq!(cert["spec"]["secretName"], "mp-modelpool-webhook-tls");
    assert_eq!(
        cert["spec"]["dnsNames"],
        json!([
            "mp-modelpool-webhook.modelpool.svc",
            "mp-modelpool-webhook.modelpool.svc.cluster.local"
        ])
    );
    assert_eq!(cert["spec"]["issuerRef"]["name"], "mp-modelpool-webhook");
    assert_eq!(one(&objects, "Issuer")["spec"]["selfSigned"], json!({}));
    let hook = one(&objects, "MutatingWebhookConfiguration");
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "modelpool/mp-modelpool-webhook"
    );
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    let args = pod["containers"][0]["args"].to_string();
    assert!(
        args.contains("--tls-cert-file=/etc/modelpool/webhook-tls/tls.crt")
            && args.contains("--tls-key-file=/etc/modelpool/webhook-tls/tls.key"),
        "{args}"
    );
    for managed in ["--tls-secret", "--webhook-config", "--tls-names"] {
        assert!(
            !args.contains(managed),
            "{managed} with cert-manager: {args}"
        );
    }
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["secret"]["secretName"] == "mp-modelpool-webhook-tls")
    );
    let role = one(&objects, "Role").to_string();
    assert!(
        !role.contains("secrets"),
        "no Secret access with cert-manager: {role}"
    );
    let roles = find(&objects, "ClusterRole");
    let operator_role = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "mp-modelpool-modelpool-operator")
        .expect("the operator ClusterRole");
    assert!(
        !operator_role
            .to_string()
            .contains("mutatingwebhookconfigurations"),
        "cert-manager writes the caBundle: {operator_role}"
    );

    // An existing ClusterIssuer: no Issuer of the chart's own.
    let objects = template(&[
        "--set",
        "webhook.certManager.enabled=true,webhook.certManager.issuerRef.name=corp-ca,webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert!(find(&objects, "Issuer").is_empty());
    let issuer = &one(&objects, "Certificate")["spec"]["issuerRef"];
    assert_eq!(issuer["name"], "corp-ca");
    assert_eq!(issuer["kind"], "ClusterIssuer");
    assert_eq!(issuer["group"], "cert-manager.io");
}

/// Catches `auto` monitoring objects that appear without the Prometheus Operator's API (the
/// install would fail) or do not appear with it; and `false` not turning them off.
#[test]
fn monitoring_objects_follow_the_cluster_capabilities() {
    let apis = [
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PodMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
        "--api-versions",
        "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
    ];
    let with_api = kinds(&template(&apis));
    for k in MONITORING_KINDS.iter().chain(POLICY_KINDS) {
        assert!(
            with_api.contains(*k),
            "auto: {k} missing when the cluster serves it"
        );
    }
    let without = kinds(&template(&[]));
    for k in MONITORING_KINDS.iter().chain(POLICY_KINDS) {
        assert!(!without.contains(*k), "auto: {k} rendered without the API");
    }
    let mut off = apis.to_vec();
    off.extend([
        "--set",
        "monitoring.serviceMonitor.enabled=false,monitoring.podMonitor.enabled=false",
        "--set",
        "monitoring.prometheusRule.enabled=false,monitoring.grafanaDashboard.enabled=false",
        "--set",
        "sidecar.restrictToOwnPod.enabled=false,webhook.enabled=false",
    ]);
    let off = template(&off);
    let kinds_off = kinds(&off);
    for k in MONITORING_KINDS
        .iter()
        .chain(POLICY_KINDS)
        .chain(&["ConfigMap", "MutatingWebhookConfiguration"])
    {
        assert!(!kinds_off.contains(*k), "{k} rendered though turned off");
    }
    let args =
        one(&off, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--webhook-listen=off"), "{args}");
    let role = one(&off, "Role").to_string();
    assert!(
        !role.contains("secrets"),
        "no webhook, no certificate Secret: {role}"
    );
}

/// Catches the chart's PrometheusRule drifting from alerts/modelpool.rules.yaml, and rule
/// labels/annotations options not applied; the rendered rules must pass promtool.
#[test]
fn prometheus_rule_holds_the_alert_rules() {
    let values = all_on_values();
    let objects = template(&[
        "--values",
        values.to_str().expect("utf-8"),
        "--set",
        "monitoring.prometheusRule.runbookBaseUrl=https://runbooks.example.com/modelpool.md",
    ]);
    let rendered = &one(&objects, "PrometheusRule")["spec"];
    let text =
        std::fs::read_to_string(repo_root().join("alerts/modelpool.rules.yaml")).expect("rules");
    let file: Value = serde_saphyr::from_str(&text).expect("rules YAML");
    let groups = file["groups"].as_array().expect("groups");
    assert_eq!(
        rendered["groups"].as_array().map(Vec::len),
        Some(groups.len())
    );
    for (g, r) in groups
        .iter()
        .zip(rendered["groups"].as_array().expect("groups"))
    {
        assert_eq!(g["name"], r["name"]);
        let (rules, rendered_rules) = (
            g["rules"].as_array().expect("rules"),
            r["rules"].as_array().expect("rules"),
        );
        assert_eq!(rules.len(), rendered_rules.len(), "group {}", g["name"]);
        for (rule, got) in rules.iter().zip(rendered_rules) {
            let name = rule["alert"].as_str().expect("alert");
            assert_eq!(got["alert"], rule["alert"]);
            assert_eq!(got["expr"], rule["expr"], "{name}: expr");
            assert_eq!(got["for"], rule["for"], "{name}: for");
            assert_eq!(
                got["labels"]["severity"], rule["labels"]["severity"],
                "{name}"
            );
            assert_eq!(
                got["labels"]["team"], "ml-platform",
                "{name}: additionalRuleLabels"
            );
            assert_eq!(
                got["annotations"]["summary"], rule["annotations"]["summary"],
                "{name}"
            );
            assert_eq!(
                got["annotations"]["runbook_url"],
                format!(
                    "https://runbooks.example.com/modelpool.md#{}",
                    name.to_lowercase()
                ),
                "{name}: runbookBaseUrl"
            );
        }
    }
    // What the Prometheus Operator would load must pass promtool.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("rendered.rules.yaml");
    std::fs::write(&path, serde_json::to_string(rendered).expect("json")).expect("write");
    let out = Command::new(tool("promtool").expect("promtool"))
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool");
    success_stdout("promtool check rules (rendered PrometheusRule)", out);

    let disabled = template(&[
        "--values",
        values.to_str().expect("utf-8"),
        "--set",
        "monitoring.prometheusRule.disabled.ModelPoolModelThrashing=true",
    ]);
    let rule = one(&disabled, "PrometheusRule").to_string();
    assert!(
        !rule.contains("ModelPoolModelThrashing"),
        "a disabled alert is left out"
    );
    assert!(rule.contains("ModelPoolAcquiresRefused"));
}

/// Catches the Grafana ConfigMap not holding the committed dashboard, or not labelled for the
/// Grafana sidecar.
#[test]
fn dashboard_configmap_holds_the_dashboard() {
    let objects = template(&[]);
    let cm = one(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = cm["data"]["modelpool.json"]
        .as_str()
        .expect("modelpool.json");
    let committed =
        std::fs::read_to_string(repo_root().join("dashboards/modelpool.json")).expect("dashboard");
    assert_eq!(
        json_text,
        committed.trim_end(),
        "the ConfigMap holds dashboards/modelpool.json"
    );
    let parsed: Value = serde_json::from_str(json_text).expect("JSON");
    assert_eq!(parsed["uid"], "modelpool");
}

/// Catches values the schema lets through that would break the install or the cluster, and
/// error messages that do not say which value is wrong.
#[test]
fn schema_refuses_bad_values() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8");
    for (set, names) in [
        ("operator.replicas=-1", "/operator/replicas"),
        ("operator.replicas=two", "/operator/replicas"),
        ("operator.replicaz=1", "replicaz"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        (
            "monitoring.podMonitor.enabled=maybe",
            "/monitoring/podMonitor/enabled",
        ),
        (
            "operator.resources.requests.memory=lots",
            "/operator/resources/requests/memory",
        ),
        ("sidecar.image.digest=latest", "/sidecar/image/digest"),
        ("sidecar.logFormat=pretty", "/sidecar/logFormat"),
        (
            "sidecar.image.pullPolicy=Sometimes",
            "/sidecar/image/pullPolicy",
        ),
        (
            "sidecar.resources.limits.cpu=lots",
            "/sidecar/resources/limits/cpu",
        ),
        ("operator.extraArgs[0]=api-qps", "/operator/extraArgs/0"),
        (
            "webhook.certManager.issuerRef.kind=Vault",
            "/webhook/certManager/issuerRef/kind",
        ),
        (
            "operator.leaderElection.leaseDurationSeconds=0",
            "/operator/leaderElection/leaseDurationSeconds",
        ),
    ] {
        let out = helm(&["template", RELEASE, chart, "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(names),
            "--set {set}: the error should name {names}:\n{stderr}"
        );
    }
}

// ---- the cluster -------------------------------------------------------------------------------

fn helm_cluster(cp: &ControlPlane, args: &[&str]) -> Output {
    let mut cmd = cp.helm_command();
    cmd.args(args);
    cmd.output().expect("running helm")
}

fn helm_cluster_ok(cp: &ControlPlane, args: &[&str]) -> String {
    success_stdout(&format!("helm {}", args.join(" ")), helm_cluster(cp, args))
}

/// Names of the objects of a release in a namespace (and cluster-wide), as `kind/name`.
fn release_objects(cp: &ControlPlane, release: &str, ns: &str, kinds: &str) -> BTreeSet<String> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut out = BTreeSet::new();
    for scope in [vec!["-n", ns], vec!["-A"]] {
        let mut args = vec![
            "get",
            kinds,
            "-l",
            &selector,
            "-o",
            "name",
            "--ignore-not-found",
        ];
        args.extend(scope);
        for line in cp.kubectl_ok(&args).lines().filter(|l| !l.is_empty()) {
            out.insert(line.to_owned());
        }
    }
    out
}

const NAMESPACED_KINDS: &str = "deployments.apps,services,serviceaccounts,configmaps,roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,poddisruptionbudgets.policy";
const CLUSTER_KINDS: &str = "clusterroles.rbac.authorization.k8s.io,clusterrolebindings.rbac.authorization.k8s.io,mutatingwebhookconfigurations.admissionregistration.k8s.io,validatingadmissionpolicies.admissionregistration.k8s.io,validatingadmissionpolicybindings.admissionregistration.k8s.io";
const MONITORING_RESOURCES: &str = "servicemonitors.monitoring.coreos.com,podmonitors.monitoring.coreos.com,prometheusrules.monitoring.coreos.com";

fn installed(cp: &ControlPlane, release: &str, ns: &str, monitoring: bool) -> BTreeSet<String> {
    let mut all = release_objects(cp, release, ns, NAMESPACED_KINDS);
    all.extend(release_objects(cp, release, ns, CLUSTER_KINDS));
    if monitoring {
        all.extend(release_objects(cp, release, ns, MONITORING_RESOURCES));
    }
    all
}

/// The operator pod a Deployment would create, submitted for real (server-side dry run):
/// PodSecurity `restricted` in the namespace judges it.
fn admit_operator_pod(cp: &ControlPlane, ns: &str, deployment: &str) {
    let d: Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "deployment",
        deployment,
        "-n",
        ns,
        "-o",
        "json",
    ]))
    .expect("deployment JSON");
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator-pod-check", "namespace": ns, "labels": d["spec"]["template"]["metadata"]["labels"]},
        "spec": d["spec"]["template"]["spec"],
    });
    let out = cp.kubectl_stdin(
        ["create", "--dry-run=server", "-o", "name", "-f", "-"],
        &pod.to_string(),
    );
    assert!(
        out.status.success(),
        "PodSecurity restricted refused the operator pod:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "warnings for the operator pod: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubectl auth can-i VERB RESOURCE` as `who`; `RESOURCE` may be `TYPE/NAME`, and a
/// subresource follows a `#` (`modelpools.modelpool.io#status`).
fn can_i(cp: &ControlPlane, who: &str, ns: &str, verb: &str, resource: &str) -> bool {
    let (resource, subresource) = resource.split_once('#').unwrap_or((resource, ""));
    let mut args = vec!["auth", "can-i", verb, resource, "-n", ns, "--as", who];
    if !subresource.is_empty() {
        args.extend(["--subresource", subresource]);
    }
    let out = cp.kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// A kubeconfig like the admin one, but authenticating with `token`.
fn kubeconfig_with_token(cp: &ControlPlane, token: &str, path: &Path) {
    let text = std::fs::read_to_string(cp.kubeconfig_path()).expect("kubeconfig");
    let mut kc: Value = serde_json::from_str(&text).expect("the test kubeconfig is JSON");
    kc["users"][0]["user"] = json!({"token": token});
    std::fs::write(path, kc.to_string()).expect("writing a kubeconfig");
}

/// The operator, authenticated as the chart's ServiceAccount, does its job with the chart's
/// RBAC: wins the Lease, creates the certificate Secret, patches its webhook's caBundle and
/// reconciles a pool (status and finalizer), without a single "forbidden".
///
/// With `cert_files` (cert-manager mode) it serves those files instead: it must then work
/// without any access to Secrets or to the webhook configuration. With `bind_role`
/// (`sidecar.rbac.autoBind`) it must also bind that ClusterRole for a pooled pod's
/// ServiceAccount in the pool's namespace.
fn operator_works_with_chart_rbac(
    cp: &ControlPlane,
    ns: &str,
    apps: &str,
    dir: &Path,
    cert_files: Option<(&Path, &Path)>,
    bind_role: Option<&str>,
) {
    let sa = format!("{RELEASE}-modelpool-operator");
    let token = cp.kubectl_ok(["create", "token", &sa, "-n", ns, "--duration=2h"]);
    let kubeconfig = dir.join("operator.kubeconfig");
    kubeconfig_with_token(cp, token.trim(), &kubeconfig);
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

    let metrics = free_port();
    let mut cmd = Command::new(workspace_bin("modelpool-operator"));
    cmd.args(["run", "--namespace", ns, "--identity", "chart-test-0"])
        .arg(format!("--lease-name={RELEASE}-modelpool-operator"));
    match cert_files {
        None => {
            cmd.arg(format!("--tls-secret={RELEASE}-modelpool-webhook-tls"))
                .arg(format!("--webhook-config={RELEASE}-modelpool-{ns}"))
                .args(["--tls-names", "127.0.0.1"]);
        }
        Some((cert, key)) => {
            cmd.arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key);
        }
    }
    if let Some(role) = bind_role {
        cmd.arg(format!("--sidecar-cluster-role={role}"));
        // A pooled pod as the webhook leaves it (the annotation names its ServiceAccount).
        cp.kubectl_ok(["create", "serviceaccount", "teamapp", "-n", apps]);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "video-0", "namespace": apps,
                "labels": {"modelpool.io/pool": "video", "app": "video"},
                "annotations": {"modelpool.io/service-account": "teamapp"}},
            "spec": {"serviceAccountName": "teamapp", "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        });
        let out = cp.kubectl_stdin(["create", "-f", "-"], &pod.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cmd.args(["--lease-duration-s", "10", "--lease-retry-s", "1"])
        .arg(format!("--webhook-listen=127.0.0.1:{}", free_port()))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics}"))
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info");
    let mut operator =
        Process::spawn("modelpool-operator", cmd, &dir.join("operator.log")).expect("operator");

    let timeout = Duration::from_secs(120);
    let every = Duration::from_millis(500);
    let result = (|| -> anyhow::Result<()> {
        poll("the operator holds the Lease", timeout, every, || {
            operator.check_running()?;
            let out = cp.kubectl([
                "get",
                "lease",
                &format!("{RELEASE}-modelpool-operator"),
                "-n",
                ns,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ]);
            Ok((String::from_utf8_lossy(&out.stdout) == "chart-test-0").then_some(()))
        })?;
        if cert_files.is_none() {
            poll("the webhook's caBundle is set", timeout, every, || {
                operator.check_running()?;
                let out = cp.kubectl([
                    "get",
                    "mutatingwebhookconfiguration",
                    &format!("{RELEASE}-modelpool-{ns}"),
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ]);
                Ok((!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()))
            })?;
            cp.kubectl_ok([
                "get",
                "secret",
                &format!("{RELEASE}-modelpool-webhook-tls"),
                "-n",
                ns,
            ]);
        } else {
            poll(
                "the webhook serves the certificate files",
                timeout,
                every,
                || {
                    operator.check_running()?;
                    Ok(operator
                        .log_text()
                        .contains("webhook certificate loaded")
                        .then_some(()))
                },
            )?;
        }
        poll("the pool is reconciled", timeout, every, || {
            operator.check_running()?;
            let out = cp.kubectl(["get", "modelpool", "video", "-n", apps, "-o", "json"]);
            let pool: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let done = pool["status"]["observedGeneration"].is_number()
                && pool["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
            Ok(done.then_some(()))
        })?;
        if bind_role.is_some() {
            let who = format!("system:serviceaccount:{apps}:teamapp");
            poll("the sidecar's RoleBinding", timeout, every, || {
                operator.check_running()?;
                Ok(can_i(cp, &who, apps, "get", "modelpools.modelpool.io").then_some(()))
            })?;
        }
        Ok(())
    })();
    let log = operator.log_text();
    if let Err(e) = result {
        panic!("{e:#}\n--- operator log ---\n{}", operator.log_tail(60));
    }
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC refused the operator something:\n{log}"
    );
    drop(operator);
    // Let the pool go without the operator (its finalizer would wait for it).
    cp.kubectl_ok([
        "patch",
        "modelpool",
        "video",
        "-n",
        apps,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    cp.kubectl_ok(["delete", "modelpool", "video", "-n", apps, "--wait=false"]);
}

/// The sidecar's "own pod" policy with real pod-bound tokens: a pooled pod's token may patch
/// its own pod, not another pooled pod.
fn own_pod_policy_holds(cp: &ControlPlane, apps: &str) {
    for name in ["pod-a", "pod-b"] {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": apps, "labels": {"modelpool.io/pool": "video"}},
            "spec": {"serviceAccountName": "pooled-app", "containers": [{
                "name": "app", "image": "registry.invalid/app:1",
                "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            }]},
        });
        let out = cp.kubectl_stdin(["create", "-f", "-"], &pod.to_string());
        assert!(
            out.status.success(),
            "creating {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let who = format!("system:serviceaccount:{apps}:pooled-app");
    for verb in ["get", "watch"] {
        assert!(
            can_i(cp, &who, apps, verb, "modelpools.modelpool.io"),
            "the sidecar follows its pool ({verb})"
        );
    }
    assert!(
        can_i(cp, &who, apps, "patch", "pods"),
        "the sidecar patches (its own) pod"
    );
    for (verb, resource) in [
        ("list", "pods"),
        ("delete", "pods"),
        ("create", "pods"),
        ("update", "modelpools.modelpool.io"),
        ("get", "secrets"),
    ] {
        assert!(
            !can_i(cp, &who, apps, verb, resource),
            "the sidecar must not {verb} {resource}"
        );
    }
    let token = cp.kubectl_ok([
        "create",
        "token",
        "pooled-app",
        "-n",
        apps,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "pod-a",
    ]);
    let patch = |pod: &str| {
        cp.kubectl([
            "--token",
            token.trim(),
            "patch",
            "pod",
            pod,
            "-n",
            apps,
            "--type=merge",
            "-p",
            r#"{"metadata":{"annotations":{"modelpool.io/report":"{}"}}}"#,
        ])
    };
    let own = patch("pod-a");
    assert!(
        own.status.success(),
        "pod-a's token patching pod-a: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    let other = patch("pod-b");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "pod-a's token patched pod-b");
    assert!(
        stderr.contains("only its own pod"),
        "refused by the policy, with its message: {stderr}"
    );
}

/// The Prometheus Operator's real CRDs (from its pinned Go module, via the machine's Go and
/// module proxy), so that the monitoring objects are validated by their real schemas.
fn install_prometheus_operator_crds(cp: &ControlPlane) {
    const MODULE: &str = "github.com/prometheus-operator/prometheus-operator@v0.85.0";
    let out = Command::new("go")
        .args(["mod", "download", "-json", MODULE])
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("running go mod download");
    let info: Value =
        serde_json::from_str(&success_stdout("go mod download", out)).expect("go's JSON");
    let dir = PathBuf::from(info["Dir"].as_str().expect("module dir"))
        .join("example/prometheus-operator-crd");
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let file = dir.join(format!("monitoring.coreos.com_{kind}.yaml"));
        cp.kubectl_ok([
            "apply",
            "--server-side",
            "-f",
            file.to_str().expect("utf-8"),
        ]);
        modelpool_e2e::support::wait_crd_established(cp, &format!("{kind}.monitoring.coreos.com"));
    }
}

/// Catches a chart the API server refuses (schema, PodSecurity, webhook or RBAC validation),
/// RBAC that does not let the operator work, an uninstall that leaves objects behind, and
/// the own-pod policy not holding. Default values first (no Prometheus Operator in the
/// cluster yet), then the all-on values with the Prometheus Operator's CRDs installed.
#[tokio::test(flavor = "multi_thread")]
async fn install_and_uninstall_in_a_restricted_namespace() {
    let _one_at_a_time = INSTALLS.lock().await;
    let cp = ControlPlane::shared();
    let dir = tempfile::Builder::new()
        .prefix("modelpool-chart-")
        .tempdir()
        .expect("tmp");
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8");

    // 1. Default values.
    let ns = cp.restricted_namespace("mp-chart").await;
    let apps = cp.fresh_namespace("mp-chart-apps").await;
    let notes = helm_cluster_ok(cp, &["install", RELEASE, chart, "--namespace", &ns]);
    assert!(
        notes.contains("kubectl apply") || notes.contains("ModelPool"),
        "NOTES say what to do next:\n{notes}"
    );
    cp.kubectl_ok(["get", "crd", "modelpools.modelpool.io"]);
    let objects = installed(cp, RELEASE, &ns, false);
    let hook = format!(
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}"
    );
    for expected in [
        format!("deployment.apps/{RELEASE}-modelpool-operator"),
        format!("service/{RELEASE}-modelpool-webhook"),
        format!("service/{RELEASE}-modelpool-operator-metrics"),
        format!("serviceaccount/{RELEASE}-modelpool-operator"),
        format!("configmap/{RELEASE}-modelpool-dashboard"),
        format!("role.rbac.authorization.k8s.io/{RELEASE}-modelpool-operator"),
        format!("rolebinding.rbac.authorization.k8s.io/{RELEASE}-modelpool-operator"),
        format!("poddisruptionbudget.policy/{RELEASE}-modelpool-operator"),
        format!("clusterrole.rbac.authorization.k8s.io/{RELEASE}-modelpool-{ns}-operator"),
        format!("clusterrole.rbac.authorization.k8s.io/{RELEASE}-modelpool-{ns}-sidecar"),
        format!("clusterrolebinding.rbac.authorization.k8s.io/{RELEASE}-modelpool-{ns}-operator"),
        hook.clone(),
        // auto: this apiserver serves admissionregistration.k8s.io/v1 policies.
        format!(
            "validatingadmissionpolicy.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}-own-pod"
        ),
        format!(
            "validatingadmissionpolicybinding.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}-own-pod"
        ),
    ] {
        assert!(
            objects.contains(&expected),
            "{expected} not installed; got {objects:#?}"
        );
    }
    admit_operator_pod(cp, &ns, &format!("{RELEASE}-modelpool-operator"));

    // The operator's grants, as the API server's authorizer sees them.
    let op = format!("system:serviceaccount:{ns}:{RELEASE}-modelpool-operator");
    for (verb, resource, target_ns, allowed) in [
        ("watch", "modelpools.modelpool.io", apps.as_str(), true),
        (
            "patch",
            "modelpools.modelpool.io#status",
            apps.as_str(),
            true,
        ),
        (
            "update",
            "modelpools.modelpool.io#finalizers",
            apps.as_str(),
            true,
        ),
        ("update", "modelpools.modelpool.io", apps.as_str(), false),
        ("list", "pods", apps.as_str(), true),
        ("delete", "pods", apps.as_str(), true),
        ("create", "events.events.k8s.io", apps.as_str(), true),
        ("create", "leases.coordination.k8s.io", ns.as_str(), true),
        (
            "update",
            &format!("leases.coordination.k8s.io/{RELEASE}-modelpool-operator"),
            ns.as_str(),
            true,
        ),
        (
            "get",
            &format!("secrets/{RELEASE}-modelpool-webhook-tls"),
            ns.as_str(),
            true,
        ),
        (
            "patch",
            &format!(
                "mutatingwebhookconfigurations.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}"
            ),
            ns.as_str(),
            true,
        ),
        ("create", "pods", apps.as_str(), false),
        ("patch", "pods", apps.as_str(), false),
        ("get", "secrets", apps.as_str(), false),
        ("get", "secrets/other", ns.as_str(), false),
        ("create", "leases.coordination.k8s.io", apps.as_str(), false),
        (
            "update",
            "leases.coordination.k8s.io/other",
            ns.as_str(),
            false,
        ),
        (
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/other",
            ns.as_str(),
            false,
        ),
        ("delete", "modelpools.modelpool.io", apps.as_str(), false),
    ] {
        assert_eq!(
            can_i(cp, &op, target_ns, verb, resource),
            allowed,
            "operator: {verb} {resource} in {target_ns}"
        );
    }
    operator_works_with_chart_rbac(cp, &ns, &apps, dir.path(), None, None);

    helm_cluster_ok(cp, &["uninstall", RELEASE, "--namespace", &ns, "--wait"]);
    let left = installed(cp, RELEASE, &ns, false);
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
    // Helm never deletes CRDs from crds/ (that would delete every ModelPool): documented.
    cp.kubectl_ok(["get", "crd", "modelpools.modelpool.io"]);

    // 2. Everything on, with the Prometheus Operator's API in the cluster.
    install_prometheus_operator_crds(cp);
    let ns = cp.restricted_namespace("mp-chart-all").await;
    let apps = cp.fresh_namespace("mp-chart-pooled").await;
    let values = all_on_values();
    let bindings = format!(
        "sidecar.rbac.bindings[0].namespace={apps},sidecar.rbac.bindings[0].serviceAccount=pooled-app,sidecar.rbac.bindings[0].create=true"
    );
    helm_cluster_ok(
        cp,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            &ns,
            "--values",
            values.to_str().expect("utf-8"),
            "--set",
            &bindings,
        ],
    );
    let objects = installed(cp, RELEASE, &ns, true);
    for expected in [
        format!("servicemonitor.monitoring.coreos.com/{RELEASE}-modelpool-operator"),
        format!("podmonitor.monitoring.coreos.com/{RELEASE}-modelpool-sidecar"),
        format!("prometheusrule.monitoring.coreos.com/{RELEASE}-modelpool"),
        format!(
            "validatingadmissionpolicy.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}-own-pod"
        ),
        format!("deployment.apps/{RELEASE}-modelpool-operator"),
    ] {
        assert!(
            objects.contains(&expected),
            "{expected} not installed; got {objects:#?}"
        );
    }
    let sidecar_objects = release_objects(
        cp,
        RELEASE,
        &apps,
        "serviceaccounts,rolebindings.rbac.authorization.k8s.io",
    );
    assert!(
        sidecar_objects.contains("serviceaccount/pooled-app"),
        "{sidecar_objects:?}"
    );
    admit_operator_pod(cp, &ns, &format!("{RELEASE}-modelpool-operator"));
    own_pod_policy_holds(cp, &apps);

    helm_cluster_ok(cp, &["uninstall", RELEASE, "--namespace", &ns, "--wait"]);
    let mut left = installed(cp, RELEASE, &ns, true);
    left.extend(release_objects(
        cp,
        RELEASE,
        &apps,
        "serviceaccounts,rolebindings.rbac.authorization.k8s.io",
    ));
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
}

/// cert-manager's real CRDs (Issuer, Certificate) from its pinned Go module, so that the
/// chart's cert-manager objects are validated by their real schemas.
fn install_cert_manager_crds(cp: &ControlPlane) {
    const MODULE: &str = "github.com/cert-manager/cert-manager@v1.21.2";
    let out = Command::new("go")
        .args(["mod", "download", "-json", MODULE])
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("running go mod download");
    let info: Value =
        serde_json::from_str(&success_stdout("go mod download", out)).expect("go's JSON");
    let dir = PathBuf::from(info["Dir"].as_str().expect("module dir")).join("deploy/crds");
    for kind in ["issuers", "certificates"] {
        let file = dir.join(format!("cert-manager.io_{kind}.yaml"));
        cp.kubectl_ok([
            "apply",
            "--server-side",
            "-f",
            file.to_str().expect("utf-8"),
        ]);
        modelpool_e2e::support::wait_crd_established(cp, &format!("{kind}.cert-manager.io"));
    }
}

/// Catches a cert-manager install the API server refuses (the Issuer and Certificate against
/// cert-manager's real schemas, the operator pod with its Secret volume under PodSecurity
/// `restricted`), an operator that cannot work with the narrower RBAC of that mode (no
/// Secrets, no webhook configuration), and an uninstall that leaves the cert-manager objects.
#[tokio::test(flavor = "multi_thread")]
async fn install_with_cert_manager_in_a_restricted_namespace() {
    let _one_at_a_time = INSTALLS.lock().await;
    let cp = ControlPlane::shared();
    install_cert_manager_crds(cp);
    let dir = tempfile::Builder::new()
        .prefix("modelpool-chart-cm-")
        .tempdir()
        .expect("tmp");
    let chart = chart_dir();
    let ns = cp.restricted_namespace("mp-chart-cm").await;
    let apps = cp.fresh_namespace("mp-chart-cm-apps").await;
    helm_cluster_ok(
        cp,
        &[
            "install",
            RELEASE,
            chart.to_str().expect("utf-8"),
            "--namespace",
            &ns,
            "--set",
            "webhook.certManager.enabled=true,sidecar.rbac.autoBind=true",
        ],
    );
    let cm_kinds = "issuers.cert-manager.io,certificates.cert-manager.io";
    let objects = release_objects(cp, RELEASE, &ns, cm_kinds);
    for expected in [
        format!("issuer.cert-manager.io/{RELEASE}-modelpool-webhook"),
        format!("certificate.cert-manager.io/{RELEASE}-modelpool-webhook"),
    ] {
        assert!(
            objects.contains(&expected),
            "{expected} not installed: {objects:?}"
        );
    }
    let hook: Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "mutatingwebhookconfiguration",
        &format!("{RELEASE}-modelpool-{ns}"),
        "-o",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{ns}/{RELEASE}-modelpool-webhook")
    );
    admit_operator_pod(cp, &ns, &format!("{RELEASE}-modelpool-operator"));

    let op = format!("system:serviceaccount:{ns}:{RELEASE}-modelpool-operator");
    for (verb, resource) in [
        ("get", format!("secrets/{RELEASE}-modelpool-webhook-tls")),
        ("create", "secrets".to_owned()),
        (
            "patch",
            format!(
                "mutatingwebhookconfigurations.admissionregistration.k8s.io/{RELEASE}-modelpool-{ns}"
            ),
        ),
    ] {
        assert!(
            !can_i(cp, &op, &ns, verb, &resource),
            "with cert-manager the operator must not {verb} {resource}"
        );
    }
    // What cert-manager would write, served from files as the pod mounts them.
    let key = rcgen::KeyPair::generate().expect("a key");
    let names = vec![format!("{RELEASE}-modelpool-webhook.{ns}.svc")];
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .self_signed(&key)
        .expect("a self-signed certificate");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    operator_works_with_chart_rbac(
        cp,
        &ns,
        &apps,
        dir.path(),
        Some((&cert_file, &key_file)),
        Some(&format!("{RELEASE}-modelpool-{ns}-sidecar")),
    );
    let binding: Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "rolebinding",
        "modelpool-sidecar-video",
        "-n",
        &apps,
        "-o",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(
        binding["metadata"]["ownerReferences"][0]["kind"],
        "ModelPool"
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "teamapp", "namespace": apps}])
    );
    // Nothing else: the operator may bind only the sidecar's role.
    assert!(!can_i(
        cp,
        &op,
        &apps,
        "bind",
        "clusterroles.rbac.authorization.k8s.io/cluster-admin"
    ));

    helm_cluster_ok(cp, &["uninstall", RELEASE, "--namespace", &ns, "--wait"]);
    let mut left = installed(cp, RELEASE, &ns, false);
    left.extend(release_objects(cp, RELEASE, &ns, cm_kinds));
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
}
