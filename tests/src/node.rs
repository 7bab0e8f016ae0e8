//! A real single-node cluster for `tests/tests/node.rs`: kube-apiserver + etcd (the shared
//! [`ControlPlane`]), kube-controller-manager, kube-scheduler, containerd + runc, CNI bridge
//! networking and a kubelet, all from pinned sources (`scripts/build-tools.sh node`), with the
//! images of `scripts/build-images.sh` imported into containerd (no registry).
//!
//! Everything runs inside private namespaces so nothing touches the host and nothing outlives
//! the test, even when it fails or is killed:
//! - [`run_isolated`] re-runs the test binary under `unshare --mount --net --pid --fork`: the
//!   test is PID 1 of its own PID namespace (when it exits the kernel kills every process in
//!   it: containerd, shims, containers), its mounts vanish with its mount namespace, and its
//!   network namespace (loopback, the CNI bridge, pod veths) vanishes with it too.
//! - Inside, `/run`, `/var/lib` and `/var/log` are fresh tmpfs (containerd's and the
//!   kubelet's fixed paths: `/run/containerd`, `/run/netns`, `/var/lib/kubelet/device-plugins`,
//!   `/var/lib/cni`, `/var/log/pods`), and plain files are bind-mounted over the `/proc/sys`
//!   entries the kubelet writes (`vm.overcommit_memory`, `kernel.panic`, ...).
//! - The only host state is the v1 cgroup folder `/<controller>/modelpool-node-<pid>` (the
//!   kubelet's `cgroupRoot`), which [`run_isolated`] creates and removes.
//!
//! Networking without kube-proxy: pods get addresses on a CNI bridge (`10.88.0.0/24`, in the
//! namespace only); the apiserver listens on `0.0.0.0:443`, and the `kubernetes` Service's
//! ClusterIP (`10.96.0.1`) and the node IP (`10.201.0.1`) are addresses of the namespace's
//! `lo`, so pods reach the apiserver through their default route. The apiserver calls webhooks
//! at their endpoints (`--enable-aggregator-routing`).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{ControlPlane, Options, flag, repo_root, spawn, tail, write};

/// The node's IP (an address of the node namespace's `lo`).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The node's name.
pub const NODE_NAME: &str = "modelpool-node";
/// The pod network (a CNI bridge inside the node namespace).
pub const POD_SUBNET: &str = "10.88.0.0/24";
/// The sandbox image, built from `tests/tools/node/pause`.
pub const PAUSE_IMAGE: &str = "modelpool.local/pause:1";

const INSIDE_ENV: &str = "MODELPOOL_NODE_INSIDE";
const CGROUP_ENV: &str = "MODELPOOL_NODE_CGROUP";

/// The binaries `scripts/build-tools.sh node` builds or unpacks.
pub const NODE_TOOLS: &[&str] = &[
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "pause",
    "runc",
    "bridge",
    "host-local",
    "loopback",
];

/// Whether this process is the test re-run inside the node's namespaces.
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1")
}

/// Builds (or finds cached) the node tools; returns their folder.
pub fn node_tools() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MODELPOOL_NODE_TOOLS_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if NODE_TOOLS.iter().all(|t| dir.join(t).is_file()) {
            return Ok(dir);
        }
    }
    let script = repo_root().join("scripts/build-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("node")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} node", script.display()))?;
    if !out.status.success() {
        bail!("{} node failed ({})", script.display(), out.status);
    }
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    for t in NODE_TOOLS {
        if !dir.join(t).is_file() {
            bail!(
                "{} node did not produce {}",
                script.display(),
                dir.join(t).display()
            );
        }
    }
    Ok(dir)
}

/// An image archive of `scripts/build-images.sh`.
#[derive(Clone, Debug)]
pub struct Image {
    /// The reference, e.g. `ghcr.io/modelpool/modelpool-sidecar:0.1.0`.
    pub reference: String,
    /// The manifest digest.
    pub digest: String,
    /// The compressed size of its layers, bytes.
    pub size: u64,
    /// The OCI archive.
    pub archive: PathBuf,
}

/// The images: `$MODELPOOL_IMAGES_DIR` when it already holds them (the test command builds
/// them before the tests), otherwise built now by `scripts/build-images.sh` into a temporary
/// folder (`MODELPOOL_IMAGE_PROFILE`, default release).
pub fn images(scratch: &Path) -> Result<Vec<Image>> {
    let script = repo_root().join("scripts/build-images.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let given = std::env::var_os("MODELPOOL_IMAGES_DIR").filter(|d| !d.is_empty());
    let listing = given.as_ref().map(|d| PathBuf::from(d).join("images.txt"));
    if let Some(listing) = listing.filter(|l| l.is_file()) {
        return parse_images(&fs::read_to_string(&listing)?);
    }
    if given.is_none() {
        cmd.env("MODELPOOL_IMAGES_DIR", scratch);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    parse_images(&String::from_utf8_lossy(&out.stdout))
}

fn parse_images(text: &str) -> Result<Vec<Image>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [reference, digest, size, archive] = f[..] else {
                bail!("build-images.sh printed {line:?}: expected REF DIGEST SIZE ARCHIVE");
            };
            Ok(Image {
                reference: reference.into(),
                digest: digest.into(),
                size: size.parse().with_context(|| format!("size in {line:?}"))?,
                archive: archive.into(),
            })
        })
        .collect()
}

fn cgroup_controllers() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Removes a cgroup folder tree, deepest first (only empty cgroups can go).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Runs the test `test_name` of this test binary again inside private mount, network and PID
/// namespaces (see the module docs) and fails if it fails. Creates the kubelet's cgroup root
/// first and removes it afterwards, also when the inner run fails or times out.
pub fn run_isolated(
    test_name: &str,
    timeout: Duration,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<()> {
    // Only root can make the namespaces, mounts and cgroups a node needs.
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("the node test needs root (namespaces, mounts, cgroups); euid is {euid}");
    }
    let cgroup = format!("modelpool-node-{}", std::process::id());
    let controllers = cgroup_controllers();
    for c in &controllers {
        let dir = c.join(&cgroup);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A new cpuset cgroup has no CPUs or memory nodes until given its parent's.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = fs::read_to_string(c.join(f)) {
                let _ = fs::write(dir.join(f), v.trim());
            }
        }
    }
    // Everything the inner run writes (control plane, node, Prometheus) goes under one
    // folder, removed here afterwards.
    let work = tempfile::Builder::new()
        .prefix("modelpool-node-run-")
        .tempdir()
        .context("creating the node test's folder")?;
    let exe = std::env::current_exe().context("the test binary's path")?;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
            "--",
        ])
        .arg(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE_ENV, "1")
        .env(CGROUP_ENV, &cgroup)
        .envs(env.iter().copied())
        .env("TMPDIR", work.path())
        .stdin(Stdio::null())
        .spawn()
        .context("starting unshare (util-linux)")?;
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if began.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Every process of the namespace is gone with its PID 1; the cgroups can go now.
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &controllers {
        let dir = c.join(&cgroup);
        while dir.exists() && Instant::now() < deadline {
            remove_cgroup_tree(&dir);
            if dir.exists() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    if std::env::var_os("MODELPOOL_E2E_KEEP").is_some_and(|v| v == "1") {
        eprintln!("modelpool-e2e: kept {}", work.keep().display());
    }
    let left: Vec<String> = controllers
        .iter()
        .map(|c| c.join(&cgroup))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    match status {
        None => bail!("the node test did not finish in {timeout:?}"),
        Some(s) if !s.success() => bail!("the node test failed inside its namespaces ({s})"),
        Some(_) if !left.is_empty() => bail!("cgroups left behind: {left:?}"),
        Some(_) => Ok(()),
    }
}

fn sh(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mount_tmpfs(dir: &str) -> Result<()> {
    sh(
        &format!("mounting a tmpfs on {dir}"),
        Command::new("mount").args(["-t", "tmpfs", "-o", "mode=755", "tmpfs", dir]),
    )
    .map(drop)
}

/// The namespace's own network and mounts (call first, inside).
fn isolate(dir: &Path) -> Result<()> {
    if !inside() {
        bail!("isolate() outside the node namespaces");
    }
    let ip = |args: &[&str]| {
        sh(
            &format!("ip {}", args.join(" ")),
            Command::new("ip").args(args),
        )
    };
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/32", crate::KUBERNETES_SERVICE_IP),
        "dev",
        "lo",
    ])?;
    ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    for d in ["/run", "/var/lib", "/var/log"] {
        mount_tmpfs(d)?;
    }
    // The kubelet sets these host-wide sysctls; give it plain files instead.
    let sysctl = dir.join("sysctl");
    fs::create_dir_all(&sysctl)?;
    for key in [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
    ] {
        let real = Path::new("/proc/sys").join(key);
        let copy = sysctl.join(key.replace('/', "."));
        fs::write(&copy, fs::read_to_string(&real).unwrap_or_default())?;
        sh(
            &format!("bind-mounting over {}", real.display()),
            Command::new("mount").arg("--bind").arg(&copy).arg(&real),
        )?;
    }
    Ok(())
}

/// A running node: containerd, kube-controller-manager, kube-scheduler and a kubelet
/// registered with `cp`. Its processes are killed when the test process (PID 1) exits.
#[derive(Debug)]
pub struct Node {
    /// The node's folder (configs, logs, containerd's and the kubelet's state).
    pub dir: PathBuf,
    /// The node tools' folder.
    pub bin: PathBuf,
    socket: PathBuf,
}

impl Node {
    /// Isolates the namespace, starts the control plane for a node, containerd (importing
    /// `images` and the pause image), the controllers and the kubelet, and waits for the node
    /// to be Ready.
    pub fn start(bin: &Path, images: &[Image]) -> Result<(&'static ControlPlane, Node)> {
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("modelpool-node-")
            .tempdir()?
            .keep();
        isolate(&dir)?;
        let cp = ControlPlane::shared_with(Options {
            node_ip: Some(NODE_IP),
        });
        let socket = dir.join("containerd.sock");
        let node = Node {
            dir: dir.clone(),
            bin: bin.to_path_buf(),
            socket: socket.clone(),
        };
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );

        // CNI: one bridge in the namespace, host-local addresses, no masquerade.
        let cni_conf = dir.join("cni/net.d");
        fs::create_dir_all(&cni_conf)?;
        write(
            &cni_conf.join("10-modelpool.conflist"),
            &serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "modelpool-e2e",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "mp-cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("cni/ipam"),
                    },
                }],
            })
            .to_string(),
        )?;

        // containerd 2.x.
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{bin}"]
    conf_dir = "{cni_conf}"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = dir.join("containerd/root").display(),
            state = dir.join("containerd/state").display(),
            socket = socket.display(),
            runc = bin.join("runc").display(),
            bin = bin.display(),
            cni_conf = cni_conf.display(),
        );
        write(&dir.join("containerd.toml"), &config)?;
        let mut containerd = Command::new(bin.join("containerd"));
        containerd
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .env("PATH", &path);
        spawn(containerd, &dir.join("containerd.log"))?;
        wait_for(
            "containerd's socket",
            Duration::from_secs(60),
            &dir.join("containerd.log"),
            || Ok(socket.exists().then_some(())),
        )?;

        // The images, from their archives (no registry), and the pause image.
        let pause = dir.join("pause.tar");
        sh(
            "building the pause image",
            Command::new("python3")
                .arg(repo_root().join("images/oci_image.py"))
                .arg("--out")
                .arg(&pause)
                .args(["--ref", PAUSE_IMAGE, "--user", "65535:65535"])
                .arg("--file")
                .arg(format!("/pause={}", bin.join("pause").display()))
                .args(["--entrypoint", "/pause"]),
        )?;
        for archive in images.iter().map(|i| &i.archive).chain([&pause]) {
            node.ctr(&["images", "import", "--local"], Some(archive))
                .with_context(|| format!("importing {}", archive.display()))?;
        }

        let pki = cp.pki_dir();
        let kubeconfig = cp.kubeconfig_path();
        let mut kcm = Command::new(bin.join("kube-controller-manager"));
        kcm.arg(flag("--kubeconfig", kubeconfig.to_path_buf()))
            .arg(flag(
                "--authentication-kubeconfig",
                kubeconfig.to_path_buf(),
            ))
            .arg(flag("--authorization-kubeconfig", kubeconfig.to_path_buf()))
            .arg(flag("--root-ca-file", pki.join("ca.crt")))
            .arg(flag(
                "--service-account-private-key-file",
                pki.join("sa.key"),
            ))
            .arg("--use-service-account-credentials=false")
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", crate::support::free_port()))
            .arg("--node-monitor-grace-period=60s");
        spawn(kcm, &dir.join("kube-controller-manager.log"))?;
        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler
            .arg(flag("--kubeconfig", kubeconfig.to_path_buf()))
            .arg(flag(
                "--authentication-kubeconfig",
                kubeconfig.to_path_buf(),
            ))
            .arg(flag("--authorization-kubeconfig", kubeconfig.to_path_buf()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", crate::support::free_port()));
        spawn(scheduler, &dir.join("kube-scheduler.log"))?;

        // The kubelet: cgroup v1 without systemd (cgroupfs, failCgroupV1: false), its cgroups
        // under the test's own root, small-VM eviction thresholds.
        let cgroup_root = std::env::var(CGROUP_ENV).context("the cgroup root (outer run)")?;
        let kubelet_dir = dir.join("kubelet");
        fs::create_dir_all(&kubelet_dir)?;
        let kubelet_config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{cgroup_root}"),
            "failCgroupV1": false,
            "failSwapOn": false,
            "containerRuntimeEndpoint": format!("unix://{}", socket.display()),
            "address": NODE_IP.to_string(),
            "port": crate::support::free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": crate::support::free_port(),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": pki.join("ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": dir.join("pod-logs"),
            "volumePluginDir": dir.join("volume-plugins"),
            "resolvConf": "",
            "protectKernelDefaults": false,
            "serializeImagePulls": false,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "maxPods": 30,
            "clusterDomain": "cluster.local",
            "syncFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "fileCheckFrequency": "5s",
        });
        write(&dir.join("kubelet.json"), &kubelet_config.to_string())?;
        let mut kubelet = Command::new(bin.join("kubelet"));
        kubelet
            .arg(flag("--config", dir.join("kubelet.json")))
            .arg(flag("--kubeconfig", kubeconfig.to_path_buf()))
            .arg(flag("--root-dir", kubelet_dir))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=1")
            .env("PATH", &path);
        spawn(kubelet, &dir.join("kubelet.log"))?;

        wait_for(
            "the node to be Ready",
            Duration::from_secs(180),
            &dir.join("kubelet.log"),
            || {
                let out = cp.kubectl([
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ]);
                Ok((String::from_utf8_lossy(&out.stdout).trim() == "True").then_some(()))
            },
        )?;
        eprintln!(
            "modelpool-e2e: node {NODE_NAME} Ready in {:.1}s ({})",
            began.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok((cp, node))
    }

    /// Runs `ctr` against this node's containerd in the `k8s.io` namespace (the CRI's).
    pub fn ctr(&self, args: &[&str], file: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args);
        if let Some(f) = file {
            cmd.arg(f);
        }
        sh(&format!("ctr {}", args.join(" ")), &mut cmd)
    }

    /// The last lines of one of the node's logs (`kubelet`, `containerd`,
    /// `kube-controller-manager`, `kube-scheduler`).
    pub fn log_tail(&self, name: &str) -> String {
        tail(&self.dir.join(format!("{name}.log")))
    }
}

/// Polls `check` every 200 ms until it gives a value, failing with the tail of `log` after
/// `timeout` or when a started process has exited.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    log: &Path,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(exited) = crate::exited_child() {
            bail!(
                "waiting for {what}: {exited}\n--- {} ---\n{}",
                log.display(),
                tail(log)
            );
        }
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: not after {timeout:?} {last}\n--- {} ---\n{}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
