//! The chart on a real node: `helm install` with the images of `scripts/build-images.sh`
//! (imported into containerd, no registry) runs the operator pods on a kubelet; a pooled
//! Deployment's pod is injected, its app (`modelpool-memhog`, holding real memory) acquires
//! through the sidecar running beside it as a native sidecar; `kubectl get mp`,
//! `kubectl exec ... modelpool-sidecar status`, a real Prometheus scraping the pod (the
//! dashboard's queries return its series), the `Restart` enforcement recreating a pod, the
//! pool's drain on delete, and `helm uninstall`. A model with no declared size is estimated
//! from weights that exist only in the app's container, read through the app's process
//! (`/proc/<pid>/root`, the pod's shared process namespace).
//!
//! The node lives in private namespaces (`modelpool_e2e::node`): the test re-runs itself inside
//! them, so its network, mounts and processes are gone when it ends, pass or fail.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use modelpool_e2e::monitoring::{Prometheus, Target};
use modelpool_e2e::node::{self, Node, wait_for};
use modelpool_e2e::{ControlPlane, repo_root};
use serde_json::Value;

const TEST: &str = "helm_install_runs_pods_on_a_real_node";
const RELEASE: &str = "mp";
const SYSTEM_NS: &str = "modelpool-system";
const APPS_NS: &str = "video";
const POOL_NAME: &str = "video";
const APP_IMAGE_PREFIX: &str = "modelpool.local/modelpool-testapp:";
/// What the operator creates at run time in its namespace (not helm's templates).
const OPERATOR_RUNTIME_OBJECTS: [(&str, &str); 2] = [
    ("secret", "mp-modelpool-webhook-tls"),
    ("lease", "mp-modelpool-operator"),
];
/// The release's label (`app.kubernetes.io/instance`).
const RELEASE_SELECTOR: &str = "app.kubernetes.io/instance=mp";

#[test]
fn helm_install_runs_pods_on_a_real_node() {
    if node::inside() {
        if let Err(e) = inner() {
            panic!("{e:#}");
        }
        return;
    }
    let began = Instant::now();
    // Built outside the namespaces: they need the Go module proxy and Debian's packages.
    let bin = node::node_tools().unwrap_or_else(|e| panic!("the node tools: {e:#}"));
    let scratch = tempfile::Builder::new()
        .prefix("modelpool-images-")
        .tempdir()
        .expect("a temporary folder");
    let images = node::images(scratch.path()).unwrap_or_else(|e| panic!("the images: {e:#}"));
    for i in &images {
        eprintln!(
            "image {} {} {:.1} MB ({})",
            i.reference,
            i.digest,
            i.size as f64 / 1048576.0,
            i.archive.display()
        );
    }
    let images_dir: PathBuf = images[0]
        .archive
        .parent()
        .expect("an archive folder")
        .to_path_buf();
    node::run_isolated(
        TEST,
        Duration::from_secs(25 * 60),
        &[
            ("MODELPOOL_NODE_TOOLS_BIN", bin.as_os_str()),
            ("MODELPOOL_IMAGES_DIR", images_dir.as_os_str()),
            (
                "MODELPOOL_TOOLS_BIN",
                modelpool_e2e::tools_bin().expect("tools").as_os_str(),
            ),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("node test passed in {:.0} s", began.elapsed().as_secs_f64());
}

fn kubectl_json(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<Value> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cp.kubectl(&all);
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The app pods of the Deployment (not being deleted).
fn app_pods(cp: &ControlPlane) -> anyhow::Result<Vec<Value>> {
    let list = kubectl_json(cp, &["get", "pods", "-n", APPS_NS, "-l", "app=pooled"])?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect())
}

fn all_ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["ready"] == true))
        && pod["status"]["initContainerStatuses"]
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["ready"] == true))
}

/// The app in a pod: memhog reading commands from a FIFO, replying on stdout (the pod log).
struct App<'a> {
    cp: &'a ControlPlane,
    pod: String,
}

impl App<'_> {
    fn replies(&self) -> anyhow::Result<Vec<Value>> {
        let out = self
            .cp
            .kubectl(["logs", "-n", APPS_NS, &self.pod, "-c", "app"]);
        if !out.status.success() {
            anyhow::bail!("kubectl logs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "reply")
            .collect())
    }

    fn send(&self, command: &str) -> anyhow::Result<Value> {
        let before = self.replies()?.len();
        self.cp.kubectl_ok([
            "exec",
            "-n",
            APPS_NS,
            &self.pod,
            "-c",
            "app",
            "--",
            "/bin/sh",
            "-c",
            "echo \"$1\" > /tmp/in",
            "sh",
            command,
        ]);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let replies = self.replies()?;
            if replies.len() > before {
                return Ok(replies[before].clone());
            }
            if Instant::now() > deadline {
                anyhow::bail!("memhog in {} did not answer {command:?}", self.pod);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn use_model(&self, model: &str, mib: u64) -> anyhow::Result<()> {
        let reply = self.send(&format!("acquire {model} {mib}"))?;
        anyhow::ensure!(reply["status"] == 200, "acquire {model}: {reply}");
        let lease = reply["body"]["lease"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no lease in {reply}"))?
            .to_owned();
        let released = self.send(&format!("release {lease}"))?;
        anyhow::ensure!(released["status"] == 200, "release {model}: {released}");
        Ok(())
    }

    fn exec(&self, container: &str, command: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["exec", "-n", APPS_NS, &self.pod, "-c", container, "--"];
        args.extend_from_slice(command);
        let out = self.cp.kubectl(&args);
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

const POOL: &str = r#"
apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata:
  name: video
spec:
  limits: {ram: 512Mi}
  policy: {mode: Cache, idleTTL: 10m, enforcement: Restart}
  models:
    - {name: t2v, ram: 48Mi}
    - {name: upscale, ram: 64Mi}
    - {name: sized-in-app, source: {uri: "file:///tmp/weights/model.safetensors"}}
"#;

/// `sized-in-app`'s weights: one F32 tensor of 1 Mi values, written by the app into its own
/// `/tmp` (an emptyDir only the app mounts): the sidecar sees them only through the app's
/// process.
const APP_WEIGHTS_BYTES: u64 = 4 << 20;

/// The app: writes `sized-in-app`'s weights, waits for the sidecar's socket, then runs memhog
/// fed from a FIFO that `kubectl exec` writes commands into.
const APP_SCRIPT: &str = r#"set -e
busybox mkdir -p /tmp/weights
busybox printf '\102\000\000\000\000\000\000\000{"w":{"dtype":"F32","shape":[1048576],"data_offsets":[0,4194304]}}' > /tmp/weights/model.safetensors
busybox head -c 4194304 /dev/zero >> /tmp/weights/model.safetensors
while [ ! -S "$MODELPOOL_SOCKET" ]; do busybox sleep 0.2; done
busybox rm -f /tmp/in
busybox mkfifo /tmp/in
busybox sleep 2147483647 > /tmp/in &
exec modelpool-memhog --socket "$MODELPOOL_SOCKET" --app pooled --models t2v,upscale < /tmp/in
"#;

fn deployment(image: &str) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "pooled", "namespace": APPS_NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "pooled"}},
            "template": {
                "metadata": {"labels": {"app": "pooled", "modelpool.io/pool": "video"}},
                "spec": {
                    "serviceAccountName": "pooled-app",
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "app",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", APP_SCRIPT],
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "64Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    })
    .to_string()
}

fn inner() -> anyhow::Result<()> {
    let began = Instant::now();
    let bin = node::node_tools()?;
    let images = node::images(&std::env::temp_dir())?;
    let (cp, node) = Node::start(&bin, &images)?;
    eprintln!(
        "node test: node Ready ({:.0} s)",
        began.elapsed().as_secs_f64()
    );
    scenario(cp, &node, &images, began).map_err(|e| {
        let pods = cp.kubectl(["get", "pods", "-A", "-o", "wide"]);
        let events = cp.kubectl(["get", "events", "-A"]);
        e.context(format!(
            "--- kubectl get pods -A ---\n{}\n--- events ---\n{}\n--- kubelet.log ---\n{}\n--- containerd.log ---\n{}",
            String::from_utf8_lossy(&pods.stdout),
            String::from_utf8_lossy(&events.stdout),
            node.log_tail("kubelet"),
            node.log_tail("containerd"),
        ))
    })
}

fn scenario(
    cp: &'static ControlPlane,
    node: &Node,
    images: &[node::Image],
    began: Instant,
) -> anyhow::Result<()> {
    let step = |what: &str| eprintln!("node test: {what} ({:.0} s)", began.elapsed().as_secs_f64());
    let app_image = images
        .iter()
        .find(|i| i.reference.starts_with(APP_IMAGE_PREFIX))
        .ok_or_else(|| anyhow::anyhow!("no test app image"))?
        .reference
        .clone();

    // 1. helm install: both operator replicas Ready, one leader, the webhook serving.
    cp.kubectl_ok(["create", "namespace", SYSTEM_NS]);
    cp.kubectl_ok([
        "label",
        "namespace",
        SYSTEM_NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    cp.kubectl_ok(["create", "namespace", APPS_NS]);
    let chart = repo_root().join("charts/modelpool");
    let install = cp
        .helm_command()
        .args(["install", RELEASE])
        .arg(&chart)
        .args([
            "--namespace",
            SYSTEM_NS,
            "--set",
            &format!("sidecar.rbac.bindings[0].namespace={APPS_NS}"),
            "--set",
            "sidecar.rbac.bindings[0].serviceAccount=pooled-app",
            "--set",
            "sidecar.rbac.bindings[0].create=true",
            "--set",
            "operator.logFormat=text",
            "--set",
            "operator.drainTimeoutSeconds=120",
            "--wait",
            "--timeout",
            "6m",
        ])
        .output()?;
    if !install.status.success() {
        anyhow::bail!(
            "helm install failed: {}\n--- kubectl get pods ---\n{}\n--- kubelet ---\n{}",
            String::from_utf8_lossy(&install.stderr),
            String::from_utf8_lossy(&cp.kubectl(["get", "pods", "-A", "-o", "wide"]).stdout),
            node.log_tail("kubelet")
        );
    }
    step("helm install --wait done");
    let operator = kubectl_json(
        cp,
        &[
            "get",
            "deployment",
            "-n",
            SYSTEM_NS,
            "mp-modelpool-operator",
        ],
    )?;
    anyhow::ensure!(
        operator["status"]["readyReplicas"] == 2,
        "both operator replicas Ready: {}",
        operator["status"]
    );
    let operator_pods = kubectl_json(
        cp,
        &[
            "get",
            "pods",
            "-n",
            SYSTEM_NS,
            "-l",
            "app.kubernetes.io/component=operator",
        ],
    )?;
    let names: Vec<String> = operator_pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(names.len() == 2, "two operator pods: {names:?}");
    let holder = wait_for(
        "an operator leader",
        Duration::from_secs(120),
        &node.dir.join("kubelet.log"),
        || {
            let lease = kubectl_json(
                cp,
                &["get", "lease", "-n", SYSTEM_NS, "mp-modelpool-operator"],
            )?;
            Ok(lease["spec"]["holderIdentity"].as_str().map(str::to_owned))
        },
    )?;
    anyhow::ensure!(
        names.iter().any(|n| holder.contains(n.as_str())),
        "the leader {holder:?} is one of the operator pods {names:?}"
    );

    // 2. A pool and a pooled Deployment: injected, Running, the sidecar a native sidecar.
    cp.kubectl_stdin(["apply", "-n", APPS_NS, "-f", "-"], POOL);
    cp.kubectl_stdin(["apply", "-f", "-"], &deployment(&app_image));
    let pod = wait_for(
        "the pooled pod Running and Ready",
        Duration::from_secs(240),
        &node.dir.join("kubelet.log"),
        || Ok(app_pods(cp)?.into_iter().find(all_ready)),
    )
    .map_err(|e| {
        let pods = cp.kubectl(["describe", "pods", "-n", APPS_NS]);
        e.context(String::from_utf8_lossy(&pods.stdout).into_owned())
    })?;
    step("pooled pod Ready");
    let spec = &pod["spec"];
    anyhow::ensure!(
        spec["shareProcessNamespace"] == true,
        "shareProcessNamespace: {spec}"
    );
    let sidecar = &spec["initContainers"][0];
    anyhow::ensure!(
        sidecar["name"] == "modelpool-sidecar" && sidecar["restartPolicy"] == "Always",
        "the sidecar is a native sidecar: {sidecar}"
    );
    let pod_name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let app = App {
        cp,
        pod: pod_name.clone(),
    };

    // Real loads through the SDK protocol: memory held in the app process.
    app.use_model("t2v", 48)?;
    app.use_model("upscale", 64)?;
    step("loads done");

    // The sidecar sees the app's pid (shared process namespace) and its RSS, and the cgroup.
    let memhog_pid: u64 = app
        .exec("app", &["busybox", "pidof", "modelpool-memhog"])?
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("pidof modelpool-memhog: {e}"))?;
    let state: Value = wait_for(
        "the sidecar's state to show the app's RSS",
        Duration::from_secs(60),
        &node.dir.join("kubelet.log"),
        || {
            let text = app.exec(
                "modelpool-sidecar",
                &["modelpool-sidecar", "status", "--json"],
            )?;
            let state: Value = serde_json::from_str(&text)?;
            let ok = state["sessions"].as_array().is_some_and(|ss| {
                ss.iter().any(|s| {
                    s["pid"] == memhog_pid
                        && s["pid_visible"] == true
                        && s["rss_bytes"].as_u64().unwrap_or(0) >= 112 << 20
                })
            });
            Ok(ok.then_some(state))
        },
    )?;
    anyhow::ensure!(
        state["sources"]["ram"]
            .as_str()
            .is_some_and(|s| s.contains("cgroup")),
        "the sidecar reads the pod's memory from its cgroup: {}",
        state["sources"]
    );
    anyhow::ensure!(
        state["ram_used_bytes"].as_u64().unwrap_or(0) > 0,
        "cgroup usage: {state}"
    );
    // The weights only the app's container has: estimated through its process's root.
    let sized = state["pool"]["models"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "sized-in-app")
        .cloned()
        .unwrap_or_default();
    anyhow::ensure!(
        sized["estimate"]["through"] == format!("/proc/{memhog_pid}/root")
            && sized["estimate"]["format"] == "safetensors"
            && sized["ram_bytes"] == APP_WEIGHTS_BYTES,
        "the sidecar estimated sized-in-app from the app's own /tmp through /proc/{memhog_pid}/root: {sized}"
    );
    let table = app.exec("modelpool-sidecar", &["modelpool-sidecar", "status"])?;
    for expected in ["MODEL", "t2v", "upscale", &memhog_pid.to_string()] {
        anyhow::ensure!(
            table.contains(expected),
            "status lacks {expected}:\n{table}"
        );
    }
    eprintln!("{table}");

    // 3. kubectl get mp shows the pod and the bytes.
    let status = wait_for(
        "the pool's status",
        Duration::from_secs(90),
        &node.dir.join("kubelet.log"),
        || {
            let pool = kubectl_json(cp, &["get", "mp", "-n", APPS_NS, "video"])?;
            let loads: i64 = pool["status"]["models"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["loads"].as_i64())
                .sum();
            Ok((pool["status"]["podsReady"] == "1/1" && loads >= 2)
                .then_some(pool["status"].clone()))
        },
    )?;
    let table = cp.kubectl_ok(["get", "mp", "-n", APPS_NS]);
    anyhow::ensure!(
        table.contains("video") && table.contains("1/1"),
        "{table}\n{status}"
    );
    eprintln!("{table}");

    // 4. A real Prometheus scrapes the sidecar in the pod; the dashboard's queries see it.
    step4_prometheus(node, &pod, &pod_name)?;
    step("Prometheus scraped the pod; the dashboard's queries return its series");

    // 5. enforcement: Restart: the app reports an unload without freeing; the sidecar sees the
    // memory not come back; the operator deletes the pod and the ReplicaSet recreates it.
    let reply = app.send("unload upscale keep")?;
    anyhow::ensure!(reply["status"] == 200, "unload keep: {reply}");
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let replacement = wait_for(
        "the pod to be restarted (deleted and recreated)",
        Duration::from_secs(180),
        &node.dir.join("kubelet.log"),
        || {
            Ok(app_pods(cp)?
                .into_iter()
                .find(|p| p["metadata"]["uid"] != uid.as_str() && all_ready(p)))
        },
    )?;
    let events = cp.kubectl_ok([
        "get",
        "events",
        "-n",
        APPS_NS,
        "--field-selector",
        "reason=RestartedPod",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    anyhow::ensure!(
        events.contains(&pod_name),
        "RestartedPod event for {pod_name}: {events}"
    );
    step("restart enforced");

    // 6. Deleting the pool drains the new pod's models before the pool is gone.
    let app = App {
        cp,
        pod: replacement["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    app.use_model("t2v", 48)?;
    cp.kubectl_ok(["delete", "mp", "-n", APPS_NS, "video", "--wait=false"]);
    wait_for(
        "the pool to be gone",
        Duration::from_secs(180),
        &node.dir.join("kubelet.log"),
        || {
            let out = cp.kubectl(["get", "mp", "-n", APPS_NS, "video", "-o", "name"]);
            Ok((!out.status.success()).then_some(()))
        },
    )?;
    let rss = app.send("rss")?;
    anyhow::ensure!(
        rss["held"] == 0,
        "the app freed every model before the pool went: {rss}"
    );
    let drained = cp.kubectl_ok([
        "get",
        "events",
        "-n",
        APPS_NS,
        "--field-selector",
        "reason=Drained",
        "-o",
        "name",
    ]);
    anyhow::ensure!(!drained.trim().is_empty(), "a Drained event");
    step("drained");

    // helm uninstall leaves nothing of the release behind. The operator's run-time objects
    // (leader Lease, webhook certificate Secret) are owned by its Deployment.
    let operator_uid = kubectl_json(
        cp,
        &[
            "get",
            "deployment",
            "-n",
            SYSTEM_NS,
            "mp-modelpool-operator",
        ],
    )?["metadata"]["uid"]
        .clone();
    for (kind, name) in OPERATOR_RUNTIME_OBJECTS {
        let object = kubectl_json(cp, &["get", kind, "-n", SYSTEM_NS, name])?;
        let owners = &object["metadata"]["ownerReferences"];
        anyhow::ensure!(
            owners.as_array().is_some_and(|refs| refs
                .iter()
                .any(|r| r["kind"] == "Deployment" && r["uid"] == operator_uid)),
            "{kind} {name} is not owned by the operator's Deployment ({operator_uid}): ownerReferences {owners}"
        );
    }
    cp.kubectl_ok([
        "delete",
        "deployment",
        "-n",
        APPS_NS,
        "pooled",
        "--wait=true",
    ]);
    let out = cp
        .helm_command()
        .args([
            "uninstall",
            RELEASE,
            "--namespace",
            SYSTEM_NS,
            "--wait",
            "--timeout",
            "3m",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the operator pods to be gone",
        Duration::from_secs(120),
        &node.dir.join("kubelet.log"),
        || {
            let pods = cp.kubectl_ok(["get", "pods", "-n", SYSTEM_NS, "-o", "name"]);
            Ok(pods.trim().is_empty().then_some(()))
        },
    )?;
    // Nothing of the release is left: the operator's Lease and Secret go with its Deployment
    // (garbage collection), so this polls until they are gone.
    wait_for(
        "nothing of the release left after helm uninstall",
        Duration::from_secs(120),
        &node.dir.join("kube-controller-manager.log"),
        || {
            let left = release_objects(cp)?;
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("left after helm uninstall: {left:?}"))
            }
        },
    )?;
    step("helm uninstall clean");
    Ok(())
}

/// The sidecar panels' queries of the Grafana dashboard (operator panels left out: the
/// operator is not scraped here), with Grafana's variables set to the one pod: `(title, expr)`.
fn sidecar_queries(pod: &str) -> anyhow::Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("dashboards/modelpool.json"),
    )?)?;
    let mut panels: Vec<&Value> = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let mut queries = Vec::new();
    for panel in panels {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let Some(e) = t["expr"].as_str() else {
                continue;
            };
            if e.contains("modelpool_operator_") || e.contains("modelpool-operator") {
                continue;
            }
            queries.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                substitute(e, pod),
            ));
        }
    }
    anyhow::ensure!(!queries.is_empty(), "no sidecar panels in the dashboard");
    Ok(queries)
}

/// Grafana's variables as a user picking this pod sets them.
fn substitute(expr: &str, pod: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "5s")
        .replace("${namespace}", APPS_NS)
        .replace("${pool}", POOL_NAME)
        .replace("${pod}", pod)
        .replace("$namespace", APPS_NS)
        .replace("$pool", POOL_NAME)
        .replace("$pod", pod)
}

/// The series selectors of a PromQL expression (`modelpool_x{...}` or a bare `modelpool_x`).
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("modelpool_") {
        let tail = &rest[i..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut end = name_len;
        if tail[name_len..].starts_with('{')
            && let Some(close) = tail[name_len..].find('}')
        {
            end = name_len + close + 1;
        }
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Step 4: a real Prometheus scrapes the sidecar in the pod, as the chart's PodMonitor would
/// (the pod's `mp-metrics` port; job `modelpool-sidecar`; namespace and pod target labels).
/// The dashboard's template variables list the pod, and every sidecar panel query whose input
/// series this pod exports returns series (with the variables set to this pod); the core
/// series must be among them.
fn step4_prometheus(node: &Node, pod: &Value, pod_name: &str) -> anyhow::Result<()> {
    let pod_ip = pod["status"]["podIP"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the pod has no podIP: {}", pod["status"]))?;
    let port = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "modelpool-sidecar")
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == "mp-metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the injected sidecar has no port named mp-metrics (what the chart's PodMonitor scrapes): {}",
                pod["spec"]["initContainers"]
            )
        })?;
    let prom_dir = node.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let prometheus = Prometheus::start(
        &prom_dir,
        &[Target {
            job: "modelpool-sidecar".into(),
            addr: format!("{pod_ip}:{port}").parse()?,
            labels: vec![
                ("namespace".into(), APPS_NS.into()),
                ("pod".into(), pod_name.into()),
            ],
        }],
        &[],
    )?;
    let log = prom_dir.join("prometheus.log");
    wait_for(
        "Prometheus to scrape the sidecar in the pod",
        Duration::from_secs(60),
        &log,
        || {
            let targets = prometheus.targets()?;
            match targets
                .iter()
                .find(|(job, _, _)| job == "modelpool-sidecar")
            {
                Some((_, health, _)) if health == "up" => Ok(Some(())),
                other => Err(anyhow::anyhow!("target {pod_ip}:{port}: {other:?}")),
            }
        },
    )?;

    // The template variables (`label_values(modelpool_pool_info{...}, label)`) list the pod.
    let info = prometheus.query_ok(&format!(
        "modelpool_pool_info{{namespace=\"{APPS_NS}\", pool=\"{POOL_NAME}\", pod=\"{pod_name}\"}}"
    ))?;
    anyhow::ensure!(
        info.len() == 1,
        "modelpool_pool_info of the pod (the dashboard's namespace, pool and pod variables): {info:?}"
    );

    let queries = sidecar_queries(pod_name)?;
    // Rates need two samples in their window: poll until every query that can answer does.
    let answered = wait_for(
        "the dashboard's queries to return the pod's series",
        Duration::from_secs(60),
        &log,
        || {
            let mut answered = Vec::new();
            let mut missing = Vec::new();
            for (title, expr) in &queries {
                let mut inputs = true;
                for sel in selectors(expr) {
                    if prometheus.query_ok(&sel)?.is_empty() {
                        inputs = false;
                    }
                }
                if !prometheus.query_ok(expr)?.is_empty() {
                    answered.push(expr.clone());
                } else if inputs {
                    missing.push(format!("{title}: {expr}"));
                }
            }
            if missing.is_empty() {
                Ok(Some(answered))
            } else {
                Err(anyhow::anyhow!(
                    "no series although the pod exports their inputs:\n{}",
                    missing.join("\n")
                ))
            }
        },
    )?;
    for core in [
        "modelpool_pool_info{",
        "modelpool_ram_used_bytes{",
        "modelpool_pool_bytes{resource=\"ram\"",
        "modelpool_model_bytes{resource=\"ram\"",
        "modelpool_model_loaded{",
        "modelpool_loads_total{",
        "modelpool_load_duration_seconds_bucket{",
        "modelpool_sessions{",
    ] {
        anyhow::ensure!(
            answered.iter().any(|e| e.contains(core)),
            "no dashboard query on {core}...}} returned the pod's series; answered:\n{}",
            answered.join("\n")
        );
    }
    let unanswered: Vec<&str> = queries
        .iter()
        .filter(|(_, e)| !answered.contains(e))
        .map(|(title, _)| title.as_str())
        .collect();
    eprintln!(
        "node test: {}/{} sidecar dashboard queries return the pod's series; without their input series here: {unanswered:?}",
        answered.len(),
        queries.len()
    );
    Ok(())
}

/// What of the release exists: everything in its namespace but what Kubernetes puts in every
/// namespace (and events), anything with the release's label in any namespace or cluster-wide,
/// and the operator's run-time objects by name.
fn release_objects(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    const NAMESPACED: &str = "all,serviceaccounts,roles,rolebindings,secrets,configmaps,leases,poddisruptionbudgets,endpointslices";
    const CLUSTER: &str = "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations,validatingadmissionpolicies,validatingadmissionpolicybindings";
    let get = |args: &[&str]| -> anyhow::Result<Vec<String>> {
        let out = cp.kubectl(args);
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    };
    let mut left = std::collections::BTreeSet::new();
    for o in get(&["get", NAMESPACED, "-n", SYSTEM_NS, "-o", "name"])? {
        if o != "serviceaccount/default" && o != "configmap/kube-root-ca.crt" {
            left.insert(format!("{SYSTEM_NS}/{o}"));
        }
    }
    for o in get(&[
        "get",
        NAMESPACED,
        "-A",
        "-l",
        RELEASE_SELECTOR,
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
    ])? {
        left.insert(o);
    }
    for o in get(&["get", CLUSTER, "-l", RELEASE_SELECTOR, "-o", "name"])? {
        left.insert(o);
    }
    for (kind, name) in OPERATOR_RUNTIME_OBJECTS {
        for o in get(&[
            "get",
            kind,
            "-n",
            SYSTEM_NS,
            name,
            "--ignore-not-found",
            "-o",
            "name",
        ])? {
            left.insert(format!("{SYSTEM_NS}/{o}"));
        }
    }
    Ok(left.into_iter().collect())
}
