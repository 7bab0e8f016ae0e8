//! Who can reach the API socket (issue 15), with real uids: the injected sidecar runs as uid
//! 65532 and `examples/deployment.yaml`'s app as uid 1000. The socket's mode used to follow the
//! umask (0755: nobody but its owner may connect), so the app got `Permission denied` and the
//! SDK ran without any ceiling. Now the socket is 0660 with the group the webhook shares through
//! the pod's `supplementalGroups`: a process in that group connects, one outside it does not.
//! The test runs as root and starts each process under its own uid with `setpriv`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{PATIENCE, pool};

const SIDECAR_UID: &str = "65532";
const SOCKET_GROUP: u32 = 65532;
const APP_UID: &str = "1000";

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn as_user(uid: &str, groups: &str) -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        &if groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={groups}")
        },
    ]);
    command.arg(env!("CARGO_BIN_EXE_modelpool-sidecar"));
    command
}

/// `modelpool-sidecar status` as `uid` with supplementary `groups`.
fn status_as(uid: &str, groups: &str, socket: &Path) -> Output {
    as_user(uid, groups)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_app_reaches_the_socket_through_the_shared_group_and_no_one_else_does() {
    assert!(
        is_root(),
        "this test starts processes under other uids and must run as root"
    );
    // The pod's emptyDir: world-writable, as the kubelet makes it; the sidecar creates its
    // socket directory inside (0770, the group) as it does when run on a plain server.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pool_path = dir.path().join("pool.yaml");
    std::fs::write(
        &pool_path,
        pool(
            "access",
            "{ram: 1Gi}",
            "{mode: Aggressive}",
            &["{name: a, ram: 1Mi}"],
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pool_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = dir.path().join("run/sidecar.sock");

    let _sidecar = Running(
        as_user(SIDECAR_UID, &SOCKET_GROUP.to_string())
            .arg("--pool")
            .arg(&pool_path)
            .arg("--socket")
            .arg(&socket)
            .args(["--socket-group", &SOCKET_GROUP.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0", "--no-nvml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not bind its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The sidecar owns the socket, mode 0660, group 65532; its directory 0770, same group.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.uid(), 65532);
    assert_eq!(meta.gid(), SOCKET_GROUP);
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    let run = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(run.mode() & 0o777, 0o770, "directory mode {:o}", run.mode());
    assert_eq!(run.gid(), SOCKET_GROUP);

    // The app (uid 1000) in the pod's shared group connects.
    let deadline = Instant::now() + PATIENCE;
    let app = loop {
        let out = status_as(APP_UID, &SOCKET_GROUP.to_string(), &socket);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        app.status.success(),
        "the app could not reach the sidecar: {}",
        String::from_utf8_lossy(&app.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&app.stdout).unwrap();
    assert_eq!(state["pool"]["name"], "access");

    // Another uid outside the group does not.
    let other = status_as("2000", "", &socket);
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
}
