//! Faults around the sidecar process (issue 15): its socket file deleted or blocked, a FIFO
//! given as the pool file, shutdown with a stuck reader. Real process, real files.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{PATIENCE, Sidecar, pool};
use modelpool_sidecar::client::Client;

const POLICY: &str =
    "{mode: Aggressive, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}";

fn test_pool() -> String {
    pool("faults", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"])
}

fn ops(sidecar: &Sidecar, path: &str) -> (u16, String) {
    let r = Client::tcp(sidecar.metrics_addr.clone())
        .with_timeout(PATIENCE)
        .get(path)
        .unwrap();
    (r.status, r.text())
}

fn mkfifo(path: &std::path::Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Before issue 15, deleting the socket file left the sidecar listening where nobody could
/// reach it, with `/readyz` still 200. Now the file is bound again within a second or so;
/// while that is impossible (a directory in its place) `/readyz` and `/healthz` say why with
/// 503, so the kubelet's liveness probe restarts the container.
#[test]
fn a_deleted_socket_is_bound_again_and_probes_fail_while_it_cannot_be() {
    let sidecar = Sidecar::start(&test_pool(), &[]);
    assert_eq!(ops(&sidecar, "/readyz").0, 200);

    std::fs::remove_file(&sidecar.socket).unwrap();
    sidecar.wait_until("the API socket is back", |s| {
        s.client().get("/v1/state").is_ok_and(|r| r.status == 200)
    });
    sidecar.wait_log(
        |l| l.contains("bound it again").then_some(()),
        "the rebind logged",
    );
    assert_eq!(ops(&sidecar, "/readyz").0, 200);

    // Something else takes the path: the sidecar cannot bind it, and says so.
    std::fs::remove_file(&sidecar.socket).unwrap();
    std::fs::create_dir(&sidecar.socket).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let (status, text) = loop {
        let (status, text) = ops(&sidecar, "/readyz");
        if status == 503 || Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("could not be bound again"), "{text}");
    let (status, text) = ops(&sidecar, "/healthz");
    assert_eq!(status, 503, "liveness fails too: {text}");

    std::fs::remove_dir(&sidecar.socket).unwrap();
    sidecar.wait_until("the API socket is back again", |s| {
        s.client().get("/v1/state").is_ok_and(|r| r.status == 200)
    });
    sidecar.wait_until("the probes pass again", |s| {
        ops(s, "/readyz").0 == 200 && ops(s, "/healthz").0 == 200
    });
}

/// Issue 15: a FIFO given as the pool file kept the process alive after SIGTERM (the hot
/// reload blocked in `read` on a runtime worker, and the runtime could not shut down). Now a
/// FIFO is refused at start and at reload, naming it, and SIGTERM still ends the process.
#[test]
fn a_fifo_as_the_pool_file_is_refused_and_sigterm_still_ends_the_process() {
    // At start: refused at once.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pool.yaml");
    mkfifo(&fifo);
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelpool-sidecar"))
        .arg("--pool")
        .arg(&fifo)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--metrics-listen", "127.0.0.1:0", "--no-nvml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the sidecar blocked on a FIFO pool file at start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("is a FIFO, not a regular file"), "{stderr}");

    // At reload: the edit is refused, the sidecar keeps serving, and SIGTERM ends it.
    let mut sidecar = Sidecar::start(&test_pool(), &[]);
    std::fs::remove_file(&sidecar.pool_path).unwrap();
    mkfifo(&sidecar.pool_path);
    sidecar.wait_log(
        |l| (l.contains("pool file changed but is invalid") && l.contains("FIFO")).then_some(()),
        "the FIFO refused at reload",
    );
    assert_eq!(sidecar.get("/v1/state").status, 200);
    let status = sidecar.terminate();
    assert!(status.success(), "{status:?}");
}
