//! The host's HTTP API on the CPU path (no GPU needed): load, unload, list, health, errors.

mod common;

use common::{Host, write_big_model, write_small_model};

/// The round trip the sidecar's Http driver makes: load reports the bytes held, a second load
/// is a no-op, unload frees, a second unload says it was not loaded.
#[test]
fn load_and_unload_over_http_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let tensor_bytes = write_small_model(dir.path(), "tiny");
    let host = Host::start(dir.path(), &["--cpu"]);

    let (status, health) = host.call("GET", "/health");
    assert_eq!(status, 200);
    assert_eq!(health["gpu"]["up"], false);
    assert_eq!(health["gpu"]["reason"], "no GPU: --cpu given");

    let (status, list) = host.call("GET", "/models");
    assert_eq!(status, 200);
    assert_eq!(list["available"], serde_json::json!(["tiny"]));
    assert_eq!(list["models"], serde_json::json!([]));

    let (status, loaded) = host.call("POST", "/models/tiny/load");
    assert_eq!(status, 200, "{loaded}");
    assert_eq!(loaded["vram_bytes"], 0);
    assert_eq!(loaded["ram_bytes"], tensor_bytes);
    assert_eq!(loaded["tensor_bytes"], tensor_bytes);
    assert_eq!(loaded["tensors"], 5);
    assert_eq!(loaded["device"], "cpu");
    assert_eq!(loaded["already_loaded"], false);
    let seconds = loaded["load_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&seconds), "{seconds}");

    let (status, again) = host.call("POST", "/models/tiny/load");
    assert_eq!(status, 200);
    assert_eq!(again["already_loaded"], true);
    assert_eq!(again["ram_bytes"], tensor_bytes);

    let (_, list) = host.call("GET", "/models");
    assert_eq!(list["models"].as_array().unwrap().len(), 1);
    assert_eq!(list["models"][0]["model"], "tiny");
    let (_, health) = host.call("GET", "/health");
    assert_eq!(health["models_loaded"], 1);
    assert_eq!(health["ram_bytes"], tensor_bytes);

    let (status, unloaded) = host.call("POST", "/models/tiny/unload");
    assert_eq!(status, 200, "{unloaded}");
    assert_eq!(unloaded["unloaded"], true);
    assert_eq!(unloaded["ram_bytes"], tensor_bytes);
    let (_, list) = host.call("GET", "/models");
    assert_eq!(list["models"], serde_json::json!([]));

    let (status, twice) = host.call("POST", "/models/tiny/unload");
    assert_eq!(status, 200);
    assert_eq!(twice["unloaded"], false);
    assert!(host.log_text().contains("loaded tiny: before RSS"));
}

/// Unloading must give the host memory back (the project's whole point), not only forget the
/// model: a 64 MiB model's RSS goes away again.
#[test]
fn unload_returns_the_ram() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_big_model(dir.path(), "big", 64);
    let host = Host::start(dir.path(), &["--cpu"]);
    let rss = |host: &Host| host.call("GET", "/health").1["rss_bytes"].as_u64().unwrap();
    let idle = rss(&host);
    let (status, body) = host.call("POST", "/models/big/load");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ram_bytes"], bytes);
    let loaded = rss(&host);
    assert!(
        loaded >= idle + bytes * 9 / 10,
        "idle {idle}, loaded {loaded}"
    );
    host.call("POST", "/models/big/unload");
    let after = rss(&host);
    assert!(
        after <= loaded - bytes * 9 / 10,
        "loaded {loaded}, after unload {after}"
    );
}

/// A missing file is a 404 whose message names the exact path, so a wrong --models-dir or
/// model name is obvious from the sidecar's log.
#[test]
fn missing_model_file_is_404_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path(), &["--cpu"]);
    let (status, body) = host.call("POST", "/models/nope/load");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    let expected = dir.path().join("nope.safetensors");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&expected.display().to_string()),
        "{message}"
    );
}

/// Names that could escape the models directory are refused before any file is opened.
#[test]
fn bad_names_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path(), &["--cpu"]);
    for path in [
        "/models/..%2Fsecret/load",
        "/models/.hidden/load",
        "/models/a%20b/unload",
    ] {
        let (status, body) = host.call("POST", path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
}

/// A corrupt file is a 422 naming the file; the host keeps serving.
#[test]
fn corrupt_file_is_422() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json}    ",
    )
    .unwrap();
    let host = Host::start(dir.path(), &["--cpu"]);
    let (status, body) = host.call("POST", "/models/bad/load");
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "invalid_model");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("bad.safetensors")
    );
    let (status, _) = host.call("GET", "/health");
    assert_eq!(status, 200);
}

/// Without --cpu the host probes the GPU. Here (no GPU) it must say "no GPU" in its log and in
/// /health and still load onto the CPU; on a GPU machine it loads onto the device instead.
#[test]
fn probes_the_gpu_and_says_no_gpu_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let tensor_bytes = write_small_model(dir.path(), "tiny");
    let host = Host::start(dir.path(), &[]);
    let (_, health) = host.call("GET", "/health");
    let (status, loaded) = host.call("POST", "/models/tiny/load");
    assert_eq!(status, 200, "{loaded}");
    if health["gpu"]["up"] == true {
        assert!(loaded["device"].as_str().unwrap().starts_with("cuda:"));
        assert!(loaded["vram_bytes"].as_u64().unwrap() >= tensor_bytes);
        assert_eq!(loaded["ram_bytes"], 0);
    } else {
        let reason = health["gpu"]["reason"].as_str().unwrap();
        assert!(reason.starts_with("no GPU: "), "{reason}");
        assert!(host.log_text().contains("no GPU: "), "{}", host.log_text());
        assert_eq!(loaded["device"], "cpu");
        assert_eq!(loaded["ram_bytes"], tensor_bytes);
    }
    let (_, unloaded) = host.call("POST", "/models/tiny/unload");
    assert_eq!(unloaded["unloaded"], true);
}

/// `--bench-h2d` without a GPU prints the CPU figures with null GPU rates and exits 77, so a
/// script can tell "skipped" from "slow" or "broken".
#[test]
fn bench_without_gpu_exits_77_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let tensor_bytes = write_small_model(dir.path(), "tiny");
    let file = dir.path().join("tiny.safetensors");
    let output = std::process::Command::new(common::host_bin())
        .arg("--bench-h2d")
        .arg(&file)
        .args(["--cpu", "--bench-repeats", "2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(77), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["gpu"], false);
    assert_eq!(report["reason"], "no GPU: --cpu given");
    assert_eq!(report["bytes"], tensor_bytes);
    assert_eq!(report["tensors"], 5);
    assert!(report["h2d_gb_per_s"].is_null() && report["raw_h2d_gb_per_s"].is_null());
    assert!(report["cpu_load_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(String::from_utf8_lossy(&output.stderr).contains("no GPU"));
}
