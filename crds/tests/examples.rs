//! Every pool in `examples/pools/` reads cleanly and passes the CRD's CEL rules, evaluated
//! locally by kube's `cel` feature (the apiserver evaluates the same rules in the e2e tests).

use std::path::PathBuf;

use modelpool_crds::{ModelPool, load_pool_file};

fn example_pools() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pools");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/pools exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_read_and_pass_the_cel_rules() {
    let files = example_pools();
    assert!(
        files.len() >= 3,
        "expected the three example pools, found {files:?}"
    );
    for file in files {
        let pool = load_pool_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        pool.validate_cel()
            .unwrap_or_else(|e| panic!("{}: CEL rules refused it: {e:?}", file.display()));
    }
}

#[test]
fn cogvideo_keeps_the_seeds_figures() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pools/cogvideo.yaml");
    let pool = load_pool_file(&file).expect("cogvideo pool reads");
    let names: Vec<&str> = pool.spec.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["t2v", "upscale", "frame_interpolation"]);
    assert_eq!(
        pool.spec.baseline.ram.as_ref().unwrap().bytes().unwrap(),
        700 << 20
    );
    assert_eq!(
        pool.spec.baseline.vram.as_ref().unwrap().bytes().unwrap(),
        4 << 30
    );
}

fn pool_from(spec: serde_json::Value) -> ModelPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "modelpool.io/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    }))
    .expect("test pool deserializes")
}

/// Each CEL rule, broken on purpose: the local evaluator must refuse with the rule's message.
#[test]
fn each_cel_rule_refuses_its_bad_pool() {
    use serde_json::json;
    let cases = [
        (
            json!({"models": [{"name": "a"}, {"name": "a"}]}),
            "model names must be unique",
        ),
        (
            json!({"models": [{"name": "Bad_Name"}]}),
            "model name must be lowercase",
        ),
        (
            json!({"limits": {"vram": "10Gi"}, "models": [{"name": "a", "vram": "12Gi"}]}),
            "each model's vram must fit within limits.vram",
        ),
        (
            json!({"limits": {"ram": "1Gi"}, "models": [{"name": "a", "ram": "2Gi"}]}),
            "each model's ram must fit within limits.ram",
        ),
        (
            json!({"driver": {"kind": "Http"}, "models": [{"name": "a"}]}),
            "driver.url is required when driver.kind is Http",
        ),
        (
            json!({"driver": {"kind": "Vllm"}, "models": [{"name": "a"}, {"name": "b"}]}),
            "it may be left out only for a pool of one model",
        ),
        (
            json!({"driver": {"kind": "Http", "url": "ftp://x"}, "models": [{"name": "a"}]}),
            "driver.url must start with http://",
        ),
        // Issue 15: the CRD accepted https://, which the sidecar refuses at start.
        (
            json!({"driver": {"kind": "Ollama", "url": "https://127.0.0.1:11434"}, "models": [{"name": "a"}]}),
            "driver.url must start with http:// (the model server runs in the same pod",
        ),
        (
            json!({"policy": {"pressure": {"vramPercent": 0}}, "models": [{"name": "a"}]}),
            "vramPercent must be between 1 and 100",
        ),
        (
            json!({"policy": {"pressure": {"ramPercent": 101}}, "models": [{"name": "a"}]}),
            "ramPercent must be between 1 and 100",
        ),
        (
            json!({"models": [{"name": "a", "loadSeconds": -1.0}]}),
            "loadSeconds must not be negative",
        ),
    ];
    for (spec, message) in cases {
        let pool = pool_from(spec.clone());
        let error = pool
            .validate_cel()
            .expect_err(&format!("CEL should refuse {spec}"));
        let text = format!("{error:?}");
        assert!(
            text.contains(message),
            "refusing {spec}: wanted {message:?}, got {text}"
        );
    }
}

/// Server drivers leave `url` (and a one-model `Vllm` pool its `servers`) to the operator's
/// injection, which takes them from the server container: the CEL rules and the pool-file
/// validation both accept such pools.
#[test]
fn server_drivers_may_leave_the_url_to_the_injection() {
    use serde_json::json;
    for spec in [
        json!({"driver": {"kind": "Ollama"}, "models": [{"name": "a"}]}),
        json!({"driver": {"kind": "KServeV2", "container": "mlserver"}, "models": [{"name": "a"}, {"name": "b"}]}),
        json!({"driver": {"kind": "Vllm", "sleepLevel": 1}, "models": [{"name": "a"}]}),
    ] {
        let pool = pool_from(spec.clone());
        pool.validate_cel()
            .unwrap_or_else(|e| panic!("CEL refused {spec}: {e:?}"));
        modelpool_crds::validate_pool(&pool)
            .unwrap_or_else(|e| panic!("validation refused {spec}: {e}"));
    }
}
