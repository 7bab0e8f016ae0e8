//! The shared corpus of pool files (`crds/tests/pool-files/`): the sidecar's reader must find in
//! each what `expected.json` says. The Python SDK's tests read the same files against the same
//! expectations, so a file one reader accepts and the other does not fails a test.

use std::path::PathBuf;

use modelpool_crds::load_pool_file;
use serde_json::{Value, json};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pool-files")
}

fn bytes(q: Option<&modelpool_crds::Quantity>) -> Value {
    q.map_or(Value::Null, |q| json!(q.bytes().expect("a valid quantity")))
}

/// Catches the sidecar's reader disagreeing with the SDK's on a pool file (block scalars,
/// anchors, JSON), or the corpus losing a file its expectations name.
#[test]
fn the_sidecar_reads_every_shared_pool_file_as_expected() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(corpus().join("expected.json")).expect("expected.json"),
    )
    .expect("expected.json is JSON");
    let expected = expected.as_object().expect("an object of files");
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .expect("the corpus folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut named: Vec<String> = expected.keys().cloned().collect();
    named.sort();
    assert_eq!(
        files, named,
        "every corpus file has expectations, and only those"
    );
    for (file, want) in expected {
        let pool = load_pool_file(&corpus().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let spec = &pool.spec;
        let got = json!({
            "name": pool.metadata.name,
            "mode": spec.policy.mode,
            "limits": {"vram_bytes": bytes(spec.limits.vram.as_ref()), "ram_bytes": bytes(spec.limits.ram.as_ref())},
            "models": spec.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            "model_vram_bytes": spec.models.iter().map(|m| (m.name.clone(), bytes(m.vram.as_ref()))).collect::<serde_json::Map<_, _>>(),
        });
        assert_eq!(&got, want, "{file}");
    }
}

/// Issue 15: a FIFO given as the pool file blocked its reader forever (and kept the sidecar
/// alive after SIGTERM). A FIFO, a directory and a file over 1 MiB are refused at once, naming
/// what they are.
#[test]
fn special_and_huge_files_are_refused_without_blocking() {
    let dir = std::env::temp_dir().join(format!("modelpool-pool-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a-directory.yaml")).unwrap();
    let fifo = dir.join("fifo.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let huge = dir.join("huge.yaml");
    std::fs::write(&huge, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    for (file, says) in [
        (fifo, "is a FIFO, not a regular file"),
        (dir.join("a-directory.yaml"), "is a directory"),
        (huge, "over the limit of 1048576 bytes"),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = file.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load_pool_file(&path).map(|_| ()).map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("reading {} blocked", file.display()));
        let error = result.unwrap_err();
        assert!(error.contains(says), "{error}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
