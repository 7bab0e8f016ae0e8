//! End-to-end test support: a real Kubernetes control plane on loopback.
//!
//! etcd and kube-apiserver are built from the Go modules pinned under `tests/tools/`
//! (`scripts/build-tools.sh`, cached outside the repository) and started once per
//! test binary, lazily, on free `127.0.0.1` ports with a temporary data folder.
//! Admission is a real cluster's (PodSecurity, ServiceAccount, webhooks, CEL
//! policies, quotas, ...). There is no kubelet and no controller manager: pods never
//! run, and what controllers would do (a namespace's `default` ServiceAccount, pod
//! status) the tests do themselves.
//!
//! ```no_run
//! # async fn demo() {
//! use modelpool_e2e::ControlPlane;
//! let cp = ControlPlane::shared();
//! let ns = cp.fresh_namespace("demo").await;
//! let client = cp.client(); // one per test: it belongs to the test's tokio runtime
//! let out = cp.kubectl_ok(["get", "serviceaccounts", "-n", &ns]);
//! # }
//! ```
//!
//! Environment:
//! - `MODELPOOL_TOOLS_BIN`: folder holding the tools; built there if missing.
//! - `KUBECTL`: the kubectl to run (default: `kubectl` on `PATH`).
//! - `MODELPOOL_E2E_KEEP=1`: keep the data folder (logs, kubeconfig) after exit.

pub mod monitoring;
pub mod node;
pub mod support;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The binaries `scripts/build-tools.sh` builds.
pub const TOOLS: &[&str] = &["kube-apiserver", "etcd", "helm", "promtool", "prometheus"];

/// How long etcd + kube-apiserver may take to become ready (a busy 2-core machine
/// needs ~10 s).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The folder holding the pinned tools ([`TOOLS`]): `$MODELPOOL_TOOLS_BIN` when it
/// holds them all, otherwise whatever `scripts/build-tools.sh` prints last (it
/// builds what is missing, which takes a while the first time, then is cached).
pub fn tools_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_tools().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The path of one pinned tool, e.g. `tool("promtool")`.
pub fn tool(name: &str) -> Result<PathBuf> {
    Ok(tools_bin()?.join(name))
}

fn find_tools() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MODELPOOL_TOOLS_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if TOOLS.iter().all(|t| dir.join(t).is_file()) {
            return Ok(dir);
        }
    }
    let script = repo_root().join("scripts/build-tools.sh");
    // stderr (the build's progress) goes straight to the terminal.
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    for t in TOOLS {
        if !dir.join(t).is_file() {
            bail!(
                "{} did not produce {}",
                script.display(),
                dir.join(t).display()
            );
        }
    }
    Ok(dir)
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How the control plane is started. The default is loopback only, with no node.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// For a real node (`tests/tests/node.rs`, inside its private network namespace): the
    /// node's IP. The apiserver then listens on `0.0.0.0:443` (pods reach it as the
    /// `kubernetes` Service's ClusterIP `10.96.0.1`, an address of the node namespace's `lo`:
    /// there is no kube-proxy), advertises this IP, reaches webhooks through their endpoints
    /// (`--enable-aggregator-routing`) and authenticates to the kubelet with a client
    /// certificate from the test CA (`pki/kubelet-client.{crt,key}`).
    pub node_ip: Option<std::net::Ipv4Addr>,
}

/// The ClusterIP of the `kubernetes` Service (the first of `--service-cluster-ip-range`).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// A running etcd + kube-apiserver. Get the per-process one with [`ControlPlane::shared`].
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    config: Config,
    tools: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

/// The processes to stop and the folder to remove when the test process exits, and how each
/// process was started (to start it again after [`ControlPlane::kill9`]).
struct Cleanup {
    children: Vec<Child>,
    recipes: Vec<(u32, Recipe)>,
    dir: Option<PathBuf>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    children: Vec::new(),
    recipes: Vec::new(),
    dir: None,
});

/// How a control-plane process was started: the same command line, data and log again.
#[derive(Clone, Debug)]
pub struct Recipe {
    program: OsString,
    args: Vec<OsString>,
    log: PathBuf,
}

impl Recipe {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }

    /// The program's file name (`etcd`, `kube-apiserver`).
    pub fn name(&self) -> String {
        Path::new(&self.program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl ControlPlane {
    /// The control plane of this test process: started by the first caller (which
    /// blocks until `/readyz` answers), stopped when the process exits. Panics if it
    /// cannot start, with the reason and the tail of the server logs.
    pub fn shared() -> &'static ControlPlane {
        Self::shared_with(Options::default())
    }

    /// Like [`shared`](Self::shared), started with `options` by the first caller (later
    /// callers get that control plane whatever they pass).
    pub fn shared_with(options: Options) -> &'static ControlPlane {
        static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            // The children are spawned from a thread that lives as long as the
            // process: PR_SET_PDEATHSIG fires when the spawning *thread* ends.
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("modelpool-control-plane".into())
                .spawn(move || {
                    let _ = tx.send(ControlPlane::start(&options).map_err(|e| format!("{e:#}")));
                    loop {
                        std::thread::park();
                    }
                });
            match spawned {
                Ok(_) => rx
                    .recv()
                    .unwrap_or_else(|_| Err("the control-plane thread died".into())),
                Err(e) => Err(format!("spawning the control-plane thread: {e}")),
            }
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("the test control plane did not start: {e}"),
        }
    }

    /// Kills `component` (`etcd` or `kube-apiserver`) with SIGKILL, as a crash would, and
    /// returns how to start it again ([`start_again`](Self::start_again)). Its data stays.
    pub fn kill9(&self, component: &str) -> Result<Recipe> {
        let mut cleanup = CLEANUP
            .lock()
            .map_err(|_| anyhow::anyhow!("cleanup lock poisoned"))?;
        let (pid, recipe) = cleanup
            .recipes
            .iter()
            .find(|(_, r)| r.name() == component)
            .cloned()
            .with_context(|| format!("no running {component} in this control plane"))?;
        let index = cleanup
            .children
            .iter()
            .position(|c| c.id() == pid)
            .with_context(|| format!("{component} (pid {pid}) is not a child"))?;
        let mut child = cleanup.children.remove(index);
        cleanup.recipes.retain(|(p, _)| *p != pid);
        let killed = child.kill();
        child.wait()?;
        killed.with_context(|| format!("kill -9 {component}"))?;
        Ok(recipe)
    }

    /// Starts a process killed by [`kill9`](Self::kill9) again, with the same command line and
    /// data (from a thread that lives as long as the process, as at the first start).
    pub fn start_again(&self, recipe: &Recipe) -> Result<()> {
        let recipe = recipe.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("modelpool-{}", recipe.name()))
            .spawn(move || {
                let _ = tx.send(spawn(recipe.command(), &recipe.log).map_err(|e| format!("{e:#}")));
                loop {
                    std::thread::park();
                }
            })?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the restarting thread died"))?
            .map_err(anyhow::Error::msg)
    }

    /// Waits until the apiserver answers `/readyz` with `ok` (after [`start_again`]).
    pub async fn wait_ready(&self) -> Result<()> {
        wait_ready(&self.config, &self.dir).await
    }

    /// A new client for this control plane, authenticated as a cluster admin
    /// (`system:masters`). Call it inside the tokio runtime that will use it (in
    /// each test): a client's background task belongs to the runtime it was made in.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("building a kube client")
    }

    /// The client configuration (admin token, the test CA).
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// The generated kubeconfig, for kubectl, helm or a `kube::Client`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// This control plane's temporary folder (logs: `etcd.log`, `kube-apiserver.log`).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The folder holding the pinned tools (helm, promtool, prometheus, ...).
    pub fn tools_bin(&self) -> &Path {
        &self.tools
    }

    /// A `kubectl --kubeconfig <generated>` command, with its own discovery cache.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl with `args` against this control plane.
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        run(&mut cmd, None)
    }

    /// Runs kubectl with `args`, feeding `stdin` (e.g. `apply -f -`).
    pub fn kubectl_stdin<I, S>(&self, args: I, stdin: &str) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        run(&mut cmd, Some(stdin))
    }

    /// Runs kubectl with `args` and returns its stdout; panics (showing stderr) if it fails.
    pub fn kubectl_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.kubectl(&args);
        success_stdout(&format!("kubectl {}", join(&args)), out)
    }

    /// A `helm` command (the pinned one) for this control plane, with helm's
    /// cache/config/data under the data folder.
    pub fn helm_command(&self) -> Command {
        let mut cmd = Command::new(self.tools.join("helm"));
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null());
        cmd
    }

    /// Creates a namespace named `<prefix>-<random>` with its `default`
    /// ServiceAccount (which a controller manager would create) and returns its name.
    pub async fn fresh_namespace(&self, prefix: &str) -> String {
        self.namespace_with_labels(prefix, &[]).await
    }

    /// Like [`fresh_namespace`](Self::fresh_namespace), with PodSecurity `restricted`
    /// enforced (`pod-security.kubernetes.io/enforce=restricted`).
    pub async fn restricted_namespace(&self, prefix: &str) -> String {
        self.namespace_with_labels(
            prefix,
            &[
                ("pod-security.kubernetes.io/enforce", "restricted"),
                ("pod-security.kubernetes.io/enforce-version", "latest"),
            ],
        )
        .await
    }

    /// Like [`fresh_namespace`](Self::fresh_namespace), with these labels.
    pub async fn namespace_with_labels(&self, prefix: &str, labels: &[(&str, &str)]) -> String {
        let client = self.client();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating a namespace {prefix}-*: {e}"));
        let name = created
            .metadata
            .name
            .expect("a created namespace has a name");
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(client, &name)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap_or_else(|e| panic!("creating {name}/default ServiceAccount: {e}"));
        name
    }

    /// The test CA (PEM), which signed the apiserver's serving certificate. Use it
    /// as a webhook's `caBundle` together with [`issue_cert`](Self::issue_cert).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A serving certificate from the test CA for these names and IPs (e.g.
    /// `["127.0.0.1", "localhost"]`), for a webhook server the apiserver will trust.
    pub fn issue_cert(&self, sans: &[&str]) -> IssuedCert {
        issue(&self.ca, sans).expect("issuing a certificate")
    }

    /// The folder of the control plane's credentials: `ca.crt`, `ca.key`, `sa.key`, `sa.pub`,
    /// and with a node `kubelet-client.{crt,key}`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn start(options: &Options) -> Result<ControlPlane> {
        let began = Instant::now();
        let tools = tools_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("modelpool-cp-")
            .tempdir()
            .context("creating the control plane's folder")?
            .keep();
        register_cleanup(&dir);
        write(&dir.join(OWNER), &std::process::id().to_string())?;
        // In the node test's PID namespace other tests' pids are invisible: never prune there.
        if options.node_ip.is_none() {
            prune_stale_dirs(&dir);
        }

        // Credentials: a CA and the apiserver's serving certificate, the
        // service-account signing key, an admin token.
        let pki = dir.join("pki");
        fs::create_dir_all(&pki)?;
        let ca = new_ca()?;
        write(&pki.join("ca.crt"), &ca.pem())?;
        let node_ip = options.node_ip.map(|ip| ip.to_string());
        let mut sans = vec![
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        if let Some(ip) = &node_ip {
            sans.extend([KUBERNETES_SERVICE_IP, ip.as_str()]);
        }
        let serving = issue(&ca, &sans)?;
        write(&pki.join("ca.key"), &ca.key().serialize_pem())?;
        write(&pki.join("apiserver.crt"), &serving.cert_pem)?;
        write(&pki.join("apiserver.key"), &serving.key_pem)?;
        let sa = KeyPair::generate()?;
        write(&pki.join("sa.key"), &sa.serialize_pem())?;
        write(&pki.join("sa.pub"), &sa.public_key_pem())?;
        let token = random_hex();
        write(
            &pki.join("tokens.csv"),
            &format!("{token},modelpool-admin,modelpool-admin,\"system:masters\"\n"),
        )?;

        let [etcd_client, etcd_peer, mut apiserver_port] = free_ports()?;
        if node_ip.is_some() {
            apiserver_port = 443;
        }

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Command::new(tools.join("etcd"));
        etcd.arg("--name=modelpool-e2e")
            .arg(flag("--data-dir", dir.join("etcd")))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=modelpool-e2e={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        spawn(etcd, &dir.join("etcd.log"))?;
        wait_for_port(etcd_client, "etcd", &dir.join("etcd.log"))?;

        let server = format!("https://127.0.0.1:{apiserver_port}");
        let mut apiserver = Command::new(tools.join("kube-apiserver"));
        apiserver.arg(format!("--etcd-servers={etcd_url}"));
        if let Some(ip) = &node_ip {
            let client = issue_client(&ca, "kube-apiserver-kubelet-client", "system:masters")?;
            write(&pki.join("kubelet-client.crt"), &client.cert_pem)?;
            write(&pki.join("kubelet-client.key"), &client.key_pem)?;
            apiserver
                .arg("--bind-address=0.0.0.0")
                .arg(format!("--advertise-address={ip}"))
                .arg("--enable-aggregator-routing=true")
                .arg(flag(
                    "--kubelet-client-certificate",
                    pki.join("kubelet-client.crt"),
                ))
                .arg(flag("--kubelet-client-key", pki.join("kubelet-client.key")))
                .arg("--kubelet-preferred-address-types=InternalIP");
        } else {
            apiserver
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1");
        }
        apiserver
            .arg(format!("--secure-port={apiserver_port}"))
            .arg(flag("--tls-cert-file", pki.join("apiserver.crt")))
            .arg(flag("--tls-private-key-file", pki.join("apiserver.key")))
            .arg(flag("--client-ca-file", pki.join("ca.crt")))
            .arg(flag("--token-auth-file", pki.join("tokens.csv")))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(flag("--service-account-key-file", pki.join("sa.pub")))
            .arg(flag(
                "--service-account-signing-key-file",
                pki.join("sa.key"),
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg(
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,\
                 PodSecurity,DefaultStorageClass,DefaultTolerationSeconds,Priority,RuntimeClass,\
                 NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,\
                 ValidatingAdmissionPolicy,ResourceQuota",
            )
            // No kubelet: the `kubernetes` Service needs no endpoints (and a loopback
            // address is not a valid endpoint).
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false");
        spawn(apiserver, &dir.join("kube-apiserver.log"))?;

        let kubeconfig = dir.join("kubeconfig");
        let kc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "modelpool-e2e", "cluster": {
                "server": server,
                "certificate-authority": pki.join("ca.crt"),
            }}],
            "users": [{"name": "modelpool-admin", "user": {"token": token}}],
            "contexts": [{"name": "modelpool-e2e", "context": {
                "cluster": "modelpool-e2e", "user": "modelpool-admin", "namespace": "default",
            }}],
            "current-context": "modelpool-e2e",
        });
        write(&kubeconfig, &serde_json::to_string_pretty(&kc)?)?;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let config = rt.block_on(async {
            let kc = Kubeconfig::read_from(&kubeconfig)?;
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
            wait_ready(&config, &dir).await?;
            anyhow::Ok(config)
        })?;

        eprintln!(
            "modelpool-e2e: control plane ready at {server} in {:.1}s (kubeconfig {})",
            began.elapsed().as_secs_f64(),
            kubeconfig.display()
        );
        Ok(ControlPlane {
            dir,
            kubeconfig,
            server,
            config,
            tools,
            ca,
        })
    }
}

async fn wait_ready(config: &Config, dir: &Path) -> Result<()> {
    let client = Client::try_from(config.clone())?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(exited) = exited_child() {
            bail!(
                "{exited}\n--- etcd.log ---\n{}\n--- kube-apiserver.log ---\n{}",
                tail(&dir.join("etcd.log")),
                tail(&dir.join("kube-apiserver.log"))
            );
        }
        let req = http::Request::get("/readyz").body(Vec::new())?;
        let last = match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => body,
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!(
                "kube-apiserver not ready after {READY_TIMEOUT:?}: {last}\n--- kube-apiserver.log ---\n{}",
                tail(&dir.join("kube-apiserver.log"))
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A description of the first started child that has exited, if any.
fn exited_child() -> Option<String> {
    let mut cleanup = CLEANUP.lock().ok()?;
    cleanup
        .children
        .iter_mut()
        .find_map(|c| match c.try_wait() {
            Ok(Some(status)) => Some(format!("process {} exited: {status}", c.id())),
            _ => None,
        })
}

fn wait_for_port(port: u16, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(exited) = exited_child() {
            bail!("{what}: {exited}\n--- {} ---\n{}", log.display(), tail(log));
        }
        if Instant::now() > deadline {
            bail!("{what} is not listening on port {port}\n{}", tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts `cmd` with its output in `log`, to be killed at exit (or if we die).
fn spawn(mut cmd: Command, log: &Path) -> Result<()> {
    // Appended: a process started again after kill9 keeps the log of its first life.
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let recipe = Recipe {
        program: cmd.get_program().to_owned(),
        args: cmd.get_args().map(OsStr::to_owned).collect(),
        log: log.to_owned(),
    };
    let mut cleanup = CLEANUP
        .lock()
        .map_err(|_| anyhow::anyhow!("cleanup lock poisoned"))?;
    cleanup.recipes.push((child.id(), recipe));
    cleanup.children.push(child);
    Ok(())
}

/// Has the kernel SIGKILL the child when the thread that spawned it dies, so that a
/// test process that is killed or aborts leaves no etcd/apiserver behind.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec; it only makes
    // async-signal-safe calls (prctl, getppid, _exit) and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn register_cleanup(dir: &Path) {
    static ONCE: Once = Once::new();
    if let Ok(mut c) = CLEANUP.lock() {
        c.dir = Some(dir.to_path_buf());
    }
    ONCE.call_once(register_atexit);
}

#[allow(unsafe_code)]
fn register_atexit() {
    extern "C" fn at_exit() {
        // Never unwind out of an extern "C" function.
        let _ = std::panic::catch_unwind(cleanup_now);
    }
    // SAFETY: `at_exit` is a plain extern "C" fn with no arguments that cannot
    // unwind; atexit only stores the pointer.
    unsafe {
        libc::atexit(at_exit);
    }
}

/// Stops the control plane (apiserver first, then etcd) and removes its folder.
fn cleanup_now() {
    let Ok(mut c) = CLEANUP.lock() else { return };
    for child in c.children.iter_mut().rev() {
        let _ = child.kill();
        let _ = child.wait();
    }
    c.children.clear();
    if let Some(dir) = c.dir.take() {
        if std::env::var_os("MODELPOOL_E2E_KEEP").is_some_and(|v| v == "1") {
            let _ = fs::remove_file(dir.join(OWNER)); // not stale: kept on purpose
            eprintln!("modelpool-e2e: kept {}", dir.display());
        } else {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Names the process that owns a control plane's folder.
const OWNER: &str = "owner.pid";

/// Removes the folders of control planes whose test process was killed (SIGKILL
/// runs no exit handler; the kernel only kills their servers).
fn prune_stale_dirs(ours: &Path) {
    let Some(tmp) = ours.parent() else { return };
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = path != ours
            && entry
                .file_name()
                .to_string_lossy()
                .starts_with("modelpool-cp-")
            && fs::read_to_string(path.join(OWNER))
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn new_ca() -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "modelpool-e2e-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A client certificate (CN `user`, O `group`) from the test CA.
fn issue_client(
    ca: &CertifiedIssuer<'static, KeyPair>,
    user: &str,
    group: &str,
) -> Result<IssuedCert> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, user);
    params
        .distinguished_name
        .push(DnType::OrganizationName, group);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issue(ca: &CertifiedIssuer<'static, KeyPair>, sans: &[&str]) -> Result<IssuedCert> {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans.clone())?;
    params.distinguished_name.push(
        DnType::CommonName,
        sans.first().cloned().unwrap_or_default(),
    );
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Three distinct free loopback ports (held together while choosing them).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let mut ports = [0; 3];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            format!("{:016x}", h.finish())
        })
        .collect()
}

fn flag(name: &str, path: PathBuf) -> OsString {
    let mut f = OsString::from(format!("{name}="));
    f.push(path);
    f
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    let what = format!("{:?}", cmd.get_program());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    // Fed from a thread, so a child that writes a lot before reading cannot deadlock.
    let feeder = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_owned();
            Some(std::thread::spawn(move || pipe.write_all(input.as_bytes())))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    if let Some(Ok(Err(e))) = feeder.map(|f| f.join()) {
        panic!("writing to {what}: {e}");
    }
    out
}

/// The stdout of a command that must have succeeded; panics with its output otherwise.
pub fn success_stdout(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

fn join(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
