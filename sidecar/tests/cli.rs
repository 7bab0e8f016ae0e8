//! The command line as a user meets it: `validate` for CI pipelines, duration flags with units,
//! `--log-level`, plain (uncoloured) logs when stderr is not a terminal, and `status` against
//! a socket nobody answers on.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use modelpool_sidecar::client::Client;

const BIN: &str = env!("CARGO_BIN_EXE_modelpool-sidecar");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("MODELPOOL_SOCKET")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example(name: &str) -> String {
    format!("{}/../examples/pools/{name}", env!("CARGO_MANIFEST_DIR"))
}

const BAD_POOL: &str = "apiVersion: modelpool.io/v1alpha1
kind: ModelPool
metadata: {name: bad}
spec:
  selector: {matchLabels: {app: x}}
  limits: {ram: 1Gi}
  policy: {mode: Cache, idleTTL: 5m}
  models:
    - {name: big, ram: 2Gi}
";

#[test]
fn validate_passes_good_files_and_names_what_is_wrong_in_bad_ones() {
    let good = run(&[
        "validate",
        &example("cogvideo.yaml"),
        &example("llm-cache.yaml"),
    ]);
    assert!(good.status.success(), "{}", text(&good.stderr));
    let out = text(&good.stdout);
    assert!(
        out.contains("cogvideo.yaml: ok: pool cogvideo | mode Aggressive | driver Sdk"),
        "{out}"
    );
    assert!(
        out.contains("ceilings VRAM 20.0 GiB, RAM 16.0 GiB"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2, "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, BAD_POOL).unwrap();
    let mixed = run(&["validate", &example("cogvideo.yaml"), bad.to_str().unwrap()]);
    assert_eq!(mixed.status.code(), Some(1));
    let out = text(&mixed.stdout);
    assert!(out.contains("cogvideo.yaml: ok"), "{out}");
    // The same message startup gives: the model, its size and the ceiling.
    let line = out.lines().find(|l| l.contains("bad.yaml")).unwrap();
    assert!(line.contains("invalid"), "{line}");
    assert!(line.contains("big"), "{line}");
    assert!(line.contains("ram"), "{line}");

    let startup = run(&[
        "--pool",
        bad.to_str().unwrap(),
        "--socket",
        dir.path().join("s.sock").to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-nvml",
    ]);
    assert_eq!(startup.status.code(), Some(1));
    let reason = line.split("invalid: ").nth(1).unwrap();
    assert!(
        text(&startup.stderr).contains(reason),
        "startup says something else than validate ({reason}):\n{}",
        text(&startup.stderr)
    );

    let missing = run(&["validate", "/nonexistent/pool.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stdout).contains("/nonexistent/pool.yaml: invalid"),
        "{}",
        text(&missing.stdout)
    );
}

#[test]
fn duration_flags_take_units_and_refuse_bad_values_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| -> Output {
        let socket = dir.path().join("s.sock");
        let mut args = vec![
            "--pool".to_owned(),
            example("cpu-laptop.yaml"),
            "--socket".to_owned(),
            socket.display().to_string(),
            "--metrics-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--no-nvml".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args)
    };
    let bad_unit = base(&["--heartbeat", "2x"]);
    assert_eq!(bad_unit.status.code(), Some(2));
    let err = text(&bad_unit.stderr);
    assert!(err.contains("--heartbeat-ms"), "{err}");
    assert!(
        err.contains("expected a duration like 500ms, 10s or 2m"),
        "{err}"
    );
    let too_short = base(&["--tick", "5ms"]);
    assert_eq!(too_short.status.code(), Some(2));
    let err = text(&too_short.stderr);
    assert!(err.contains("under the minimum of 10 ms"), "{err}");
    let negative = base(&["--tick-ms", "-1s"]);
    assert_eq!(
        negative.status.code(),
        Some(2),
        "{}",
        text(&negative.stderr)
    );

    // Units work, old bare milliseconds too: the session answer carries the heartbeat.
    let socket = dir.path().join("units.sock");
    let mut child = Command::new(BIN)
        .args([
            "--pool",
            &example("cpu-laptop.yaml"),
            "--socket",
            socket.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-nvml",
            "--heartbeat",
            "2.5s",
            "--tick",
            "250ms",
            "--reclaim-timeout-ms",
            "30000",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = Client::unix(&socket).with_timeout(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        if let Ok(r) = client.post(
            "/v1/sessions",
            // A pid no process can have (over pid_max): not visible, so the session is asked
            // for the configured interval itself (a visible one gets a multiple of it).
            &serde_json::json!({"pid": 1u32 << 30}),
        ) {
            break r;
        }
        assert!(Instant::now() < deadline, "the sidecar did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.status, 201, "{}", answer.text());
    assert_eq!(answer.json()["heartbeat_ms"], 2500);
}

/// Starts the sidecar with `extra` and returns its stderr up to the "pool loaded" line (or
/// everything it wrote in 60 s), then stops it.
fn startup_logs(dir: &Path, extra: &[&str]) -> String {
    let socket = dir.join(format!("logs-{}.sock", extra.len()));
    let mut child = Command::new(BIN)
        .args([
            "--pool",
            &example("cpu-laptop.yaml"),
            "--socket",
            socket.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-nvml",
        ])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    // The API socket appears once the pool is loaded and the logs of startup are written.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap()
}

#[test]
fn log_level_filters_and_logs_are_plain_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let info = startup_logs(dir.path(), &[]);
    assert!(info.contains("pool loaded"), "{info}");
    assert!(
        !info.contains('\u{1b}'),
        "escape codes in logs that go to a pipe:\n{info:?}"
    );
    let warn = startup_logs(dir.path(), &["--log-level", "warn"]);
    assert!(!warn.contains("pool loaded"), "{warn}");
    let invalid = startup_logs(dir.path(), &["--log-level", "loud=??"]);
    assert!(invalid.contains("invalid log level"), "{invalid}");
    assert!(
        invalid.contains("pool loaded"),
        "falls back to info: {invalid}"
    );
}

#[test]
fn status_says_what_to_check_when_nobody_answers() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let out = run(&["status", "--socket", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("no sidecar answers on {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("MODELPOOL_SOCKET"), "{err}");
    assert!(err.contains("is the sidecar running"), "{err}");

    // A socket that accepts and never answers (a paused sidecar): a bounded wait, then why.
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    let holder = std::thread::spawn(move || {
        let held = listener.accept();
        std::thread::sleep(Duration::from_secs(8));
        drop(held);
    });
    let started = Instant::now();
    let out = run(&["status", "--socket", silent.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("did not answer"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "status hung for {:?}",
        started.elapsed()
    );
    holder.join().unwrap();
}

/// The proxy's port taken by another process: the sidecar exits with the listen error naming
/// the address, not a panic (the proxy's own runtime is shut down on the way out).
#[test]
fn a_proxy_port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let socket = dir.path().join("proxy.sock");
    let out = run(&[
        "--pool",
        &example("ollama.yaml"),
        "--socket",
        socket.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-nvml",
        "--proxy-listen",
        &addr,
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("failed to listen on {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
}
