//! Helpers the operator and CRD tests share: free ports, the workspace's binaries, polling,
//! and installing the CRD.

use std::{
    net::TcpListener,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{ControlPlane, repo_root};

/// A free loopback port (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A binary of the workspace (`modelpool-operator`, `modelpool-sidecar`, ...), built by the
/// test command before the tests run (`cargo build --workspace --bins`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the test command does)",
        path.display()
    );
    path
}

/// Polls `check` every 250 ms until it gives a value, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs `crds/modelpool.yaml` (server-side apply, idempotent) and waits until it is served.
pub fn install_crd(cp: &ControlPlane) {
    let crd = repo_root().join("crds/modelpool.yaml");
    cp.kubectl_ok([
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        crd.to_str().expect("a UTF-8 path"),
    ]);
    wait_crd_established(cp, "modelpools.modelpool.io");
}

/// Waits until the CRD `name` is Established. `kubectl wait` fails at once (".status.conditions
/// accessor error: <nil>") when it reads a CRD before the apiserver has written any condition,
/// so it is retried until a deadline.
pub fn wait_crd_established(cp: &ControlPlane, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cp.kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            &format!("crd/{name}"),
        ]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "crd/{name} never Established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `modelpool-operator run` for one test namespace: it watches only that namespace, keeps its
/// Lease and webhook Secret there, elects fast (4 s leases), and serves metrics on
/// `metrics_port`. Callers add the webhook flags (or `--webhook-listen off`) and stdio.
pub fn operator_command(
    cp: &ControlPlane,
    ns: &str,
    identity: &str,
    metrics_port: u16,
) -> std::process::Command {
    let mut command = std::process::Command::new(workspace_bin("modelpool-operator"));
    command
        .args(["run", "--watch-namespace", ns, "--namespace", ns])
        .args(["--identity", identity, "--lease-name", "modelpool-leader"])
        .args(["--lease-duration-s", "4", "--lease-retry-s", "1"])
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "info,kube=warn");
    command
}

/// A MutatingWebhookConfiguration sending the labelled pods of namespace `ns` to the
/// operator's webhook at `https://{address}/mutate-pods` (`address` is `127.0.0.1:PORT`).
/// `failurePolicy: Fail` so that a broken webhook fails the test instead of going unnoticed.
pub fn webhook_config(name: &str, ns: &str, address: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.modelpool.io",
            "clientConfig": {"url": format!("https://{address}/mutate-pods")},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchExpressions": [{"key": "modelpool.io/pool", "operator": "Exists"}]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 10
        }]
    })
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `DIR/NAME.log`, created for a child's output.
pub fn log_file(dir: &std::path::Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file")
}

/// A `modelpool-memhog` app holding real memory, driven line by line: one JSON reply per
/// command.
pub struct MemhogApp {
    _child: Killed,
    stdin: std::process::ChildStdin,
    replies: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl MemhogApp {
    /// Starts one on `socket` as app `name`, announcing `models` (comma-separated); its log
    /// goes to `DIR/NAME.log`.
    pub fn start(
        socket: &std::path::Path,
        dir: &std::path::Path,
        name: &str,
        models: &str,
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(workspace_bin("modelpool-memhog"))
            .arg("--socket")
            .arg(socket)
            .args(["--app", name, "--models", models])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file(dir, name))
            .spawn()
            .expect("starting modelpool-memhog");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && value["type"] == "reply"
                    && tx.send(value).is_err()
                {
                    return;
                }
            }
        });
        Self {
            _child: Killed(child),
            stdin,
            replies,
        }
    }

    /// Sends a command and waits (up to 60 s) for its reply.
    pub fn send(&mut self, command: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.stdin, "{command}").expect("write to memhog");
        self.stdin.flush().expect("flush");
        self.replies
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("memhog did not answer {command:?}"))
    }

    /// Acquire, load `mib` of real memory, release (Cache mode keeps it loaded).
    pub fn use_model(&mut self, model: &str, mib: u64) {
        let reply = self.send(&format!("acquire {model} {mib}"));
        assert_eq!(reply["status"], 200, "acquire {model}: {reply}");
        let lease = reply["body"]["lease"].as_str().expect("a lease").to_owned();
        let released = self.send(&format!("release {lease}"));
        assert_eq!(released["status"], 200, "release {model}: {released}");
    }
}

/// A `modelpool-sidecar` in cluster mode playing pod `pod` of `ns` for pool `pool` (fast report,
/// heartbeat and tick), its log in `DIR/POD.log`; returns once its socket exists.
pub fn cluster_sidecar(
    cp: &ControlPlane,
    ns: &str,
    pool: &str,
    pod: &str,
    socket: &std::path::Path,
    dir: &std::path::Path,
) -> Killed {
    let child = std::process::Command::new(workspace_bin("modelpool-sidecar"))
        .args([
            "--pool-name",
            pool,
            "--pod-name",
            pod,
            "--pod-namespace",
            ns,
        ])
        .arg("--socket")
        .arg(socket)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--report-interval-ms", "200", "--heartbeat-ms", "500"])
        .args(["--tick-ms", "100"])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env_remove("MODELPOOL_POOL")
        .stderr(log_file(dir, pod))
        .spawn()
        .expect("starting a sidecar");
    let sidecar = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sidecar
}

/// The columns `kubectl get modelpools` prints, in order: the CRD's `additionalPrinterColumns`
/// (crds/modelpool.yaml) after NAME, then AGE. One list, so a new column is added in one place.
pub const GET_MP_COLUMNS: &[&str] = &[
    "NAME",
    "MODELS",
    "PODS",
    "VRAM",
    "CEILING",
    "RAM",
    "MODE",
    "READY",
    "UNVERIFIED",
    "AGE",
];
