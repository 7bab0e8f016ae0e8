//! `tests/gpu/` in the normal suite (no GPU needed): `run.sh` without a GPU says "no GPU:
//! <reason>" and exits 77, the pools it runs are valid pools, and the pytest tests of its
//! Python logic (including a dry run of every phase against fakes) pass.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_sh() -> PathBuf {
    repo_root().join("tests/gpu/run.sh")
}

/// `bash`, found on the test's own PATH (the script then runs with another one).
fn bash() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("bash"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("/bin/bash"))
}

fn python() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("python3"))
        .find(|path| path.is_file())
}

/// With nvidia-smi nowhere on PATH (an empty PATH: the script must get that far on bash
/// builtins alone) the script skips with exit 77 and says why, instead of failing later with
/// a confusing error, or passing.
#[test]
fn run_sh_without_nvidia_smi_says_no_gpu_and_exits_77() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(bash())
        .arg(run_sh())
        .env_clear()
        .env("PATH", empty.path())
        .env("OUT", empty.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(77), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "no GPU: nvidia-smi not found in PATH (no NVIDIA driver installed)\n"
    );
}

/// An nvidia-smi that fails (driver installed, not loaded) is "no GPU" too, with the driver's
/// own words, and the skip is recorded in $OUT/summary.json.
#[test]
fn run_sh_with_failing_nvidia_smi_says_no_gpu_and_exits_77() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&smi).status().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = dir.path().join("out");
    let output = Command::new(bash())
        .arg(run_sh())
        .env("PATH", path)
        .env("OUT", &out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(77), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("no GPU: nvidia-smi failed (exit 9): NVIDIA-SMI has failed"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["exit_code"], 77);
    assert_eq!(summary["skipped"], true);
}

/// The pools the GPU check gives the sidecar must be pools the sidecar accepts.
#[test]
fn gpu_check_pools_are_valid() {
    for name in ["pool-aggressive.yaml", "pool-cache.yaml"] {
        let path = repo_root().join("tests/gpu").join(name);
        let pool = modelpool_crds::pool_file::load_pool_file(&path)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(pool.spec.models.len(), 3, "{name}");
    }
}

/// The Python half of tests/gpu (parsing, the 2 % rule, the summary, run.sh's no-GPU paths
/// and a dry run of every phase against fakes) through pytest, when pytest is installed.
#[test]
fn gpu_check_python_tests_pass() {
    let Some(python) = python() else {
        eprintln!("skipped: no python3 on PATH");
        return;
    };
    let has_pytest = Command::new(&python)
        .args(["-c", "import pytest"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_pytest {
        eprintln!("skipped: pytest is not installed for {}", python.display());
        return;
    }
    let output = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
