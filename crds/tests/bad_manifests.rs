//! A table of bad pool manifests and the error each must give: the field and the problem.

use modelpool_crds::parse_pool;

const HEAD: &str = "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata:\n  name: p\n";

fn with_spec(spec: &str) -> String {
    format!("{HEAD}spec:\n{spec}")
}

#[test]
fn bad_manifests_name_the_field_and_the_problem() {
    let cases: Vec<(String, &str)> = vec![
        (
            with_spec("  proxy: {port: 8080}\n  models:\n    - {name: a}\n"),
            "spec.proxy: needs a driver that loads models itself",
        ),
        (
            with_spec(
                "  driver: {kind: Ollama, url: \"http://127.0.0.1:11434\"}\n  proxy: {port: 9464, upstream: \"https://x\"}\n  models:\n    - {name: a}\n",
            ),
            "spec.proxy.port: 9464 must be between 1 and 65535 and not 9464",
        ),
        (
            with_spec("  models:\n    - {name: a, vram: 1Gi}\n    - {name: b, vram: 12Gx}\n"),
            r#"spec.models[1].vram: "12Gx" is not a quantity (e.g. 12Gi)"#,
        ),
        (
            with_spec("  limits: {ram: lots}\n  models:\n    - {name: a}\n"),
            r#"spec.limits.ram: "lots" is not a quantity (e.g. 12Gi)"#,
        ),
        (
            with_spec("  models:\n    - {name: a}\n    - {name: a}\n"),
            r#"spec.models[1].name: "a" is listed twice (model names must be unique)"#,
        ),
        (
            with_spec("  models:\n    - {name: Upscale}\n"),
            r#"spec.models[0].name: "Upscale" is not a valid model name"#,
        ),
        (
            with_spec("  limits: {vram: 10Gi}\n  models:\n    - {name: t2v, vram: 12Gi}\n"),
            r#"spec.models[0].vram: model "t2v" needs 12.0 GiB of vram, more than the pool's ceiling spec.limits.vram = 10.0 GiB"#,
        ),
        (
            with_spec("  limits: {ram: 1Gi}\n  models:\n    - {name: a, ram: 1536Mi}\n"),
            r#"spec.models[0].ram: model "a" needs 1.5 GiB of ram, more than the pool's ceiling spec.limits.ram = 1.0 GiB"#,
        ),
        (
            with_spec(
                "  limits: {vram: 10Gi}\n  models:\n    - {name: a, vram: 6Gi, pinned: true}\n    - {name: b, vram: 6Gi, pinned: true}\n",
            ),
            "spec.models: pinned models together need 12.0 GiB of vram, more than spec.limits.vram = 10.0 GiB",
        ),
        (
            with_spec("  driver: {kind: Http}\n  models:\n    - {name: a}\n"),
            "spec.driver.url: is required when spec.driver.kind is Http",
        ),
        (
            with_spec("  driver: {kind: Vllm}\n  models:\n    - {name: a}\n    - {name: b}\n"),
            r#"spec.driver.servers: names no vLLM server for model "a""#,
        ),
        (
            with_spec("  driver: {kind: Vllm, servers: {a: 'http://127.0.0.1:8001'}}\n  models:\n    - {name: a}\n    - {name: b}\n"),
            r#"spec.driver.servers: names no vLLM server for model "b""#,
        ),
        (
            with_spec("  driver: {kind: Http, url: 'localhost:8000'}\n  models:\n    - {name: a}\n"),
            r#"spec.driver.url: "localhost:8000" must start with http:// (the model server runs in the same pod"#,
        ),
        (
            with_spec("  driver: {kind: KServeV2, url: 'https://127.0.0.1:8080'}\n  models:\n    - {name: a}\n"),
            r#"spec.driver.url: "https://127.0.0.1:8080" must start with http://"#,
        ),
        (
            with_spec("  driver: {kind: Grpc}\n  models:\n    - {name: a}\n"),
            "spec.driver.kind: unknown variant `Grpc`, expected one of `Sdk`, `Http`, `KServeV2`, `Ollama`, `Vllm`",
        ),
        (
            with_spec("  policy: {mode: Lazy}\n  models:\n    - {name: a}\n"),
            "spec.policy.mode: unknown variant `Lazy`, expected `Aggressive` or `Cache`",
        ),
        (
            with_spec("  policy: {pressure: {vramPercent: 150}}\n  models:\n    - {name: a}\n"),
            "spec.policy.pressure.vramPercent: 150 must be between 1 and 100",
        ),
        (
            with_spec("  policy: {pressure: {ramPercent: 0}}\n  models:\n    - {name: a}\n"),
            "spec.policy.pressure.ramPercent: 0 must be between 1 and 100",
        ),
        (
            with_spec("  policy: {idleTTL: soon}\n  models:\n    - {name: a}\n"),
            "spec.policy.idleTTL:",
        ),
        (
            with_spec("  policy: {idleTtl: 5m}\n  models:\n    - {name: a}\n"),
            r#"spec.policy.idleTtl: unknown field (did you mean "idleTTL"?)"#,
        ),
        (
            with_spec("  models: []\n"),
            "spec.models: must list at least one model",
        ),
        (
            format!("{HEAD}spec:\n  limits: {{vram: 1Gi}}\n"),
            "spec: missing field `models`",
        ),
        (
            with_spec("  models:\n    - {name: a, loadSeconds: -3}\n"),
            "spec.models[0].loadSeconds: -3 is not a number of seconds >= 0",
        ),
        (
            with_spec("  models:\n    - {name: a, priority: high}\n"),
            "spec.models[0].priority: invalid type: string \"high\", expected i32",
        ),
        (
            "apiVersion: modelpool.io/v1\nkind: ModelPool\nmetadata: {name: p}\nspec: {models: [{name: a}]}\n".into(),
            r#"apiVersion: "modelpool.io/v1" is not supported (expected "modelpool.io/v1alpha1")"#,
        ),
        (
            "apiVersion: modelpool.io/v1alpha1\nkind: Pool\nmetadata: {name: p}\nspec: {models: [{name: a}]}\n".into(),
            r#"kind: "Pool" is not supported (expected "ModelPool")"#,
        ),
        (
            "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {}\nspec: {models: [{name: a}]}\n".into(),
            "metadata.name: is required",
        ),
        (
            "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {name: p\n".into(),
            "not valid YAML",
        ),
        ("- just\n- a list\n".into(), "expected a ModelPool manifest"),
    ];
    assert!(cases.len() >= 15);
    for (manifest, expected) in &cases {
        let error = parse_pool(manifest, "pool.yaml")
            .expect_err(&format!("should be refused:\n{manifest}"))
            .to_string();
        assert!(
            error.contains(expected),
            "manifest:\n{manifest}\nwanted: {expected}\ngot:    {error}"
        );
        assert!(
            error.starts_with("pool.yaml: "),
            "error names the file: {error}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let manifest = with_spec(
        "  limits: {vram: 1Gi}\n  models:\n    - {name: a, vram: 2Gi}\n    - {name: B}\n",
    );
    let error = parse_pool(&manifest, "pool.yaml").unwrap_err();
    let fields: Vec<&str> = error
        .field_errors()
        .iter()
        .map(|e| e.field.as_str())
        .collect();
    assert_eq!(fields, ["spec.models[0].vram", "spec.models[1].name"]);
}

#[test]
fn defaults_fill_what_is_left_out() {
    let pool = parse_pool(&with_spec("  models:\n    - {name: a}\n"), "pool.yaml").unwrap();
    let policy = &pool.spec.policy;
    assert_eq!(policy.mode, modelpool_crds::v1alpha1::Mode::Aggressive);
    assert_eq!(std::time::Duration::from(policy.idle_ttl).as_secs(), 300);
    assert_eq!(
        std::time::Duration::from(policy.acquire_timeout).as_secs(),
        60
    );
    assert_eq!(policy.pressure.vram_percent, 90);
    assert_eq!(policy.pressure.ram_percent, 80);
}

/// Found by fuzzing: kube's duration parser panics on a negative segment, so a pool file with
/// such an `idleTTL` crashed the sidecar. It must be an error naming the value instead.
#[test]
fn durations_that_would_panic_are_refused_with_the_value() {
    for (field, value) in [
        ("idleTTL", "0s-55m0s5m5"),
        ("idleTTL", "-5m"),
        ("acquireTimeout", "99999999999999999999h"),
        ("acquireTimeout", "1e400h"),
        ("idleTTL", "5x"),
    ] {
        let text = with_spec(&format!(
            "  policy: {{mode: Cache, {field}: \"{value}\"}}\n  models:\n    - {{name: a, vram: 1Gi}}\n"
        ));
        let error = parse_pool(&text, "pool.yaml")
            .err()
            .unwrap_or_else(|| panic!("{field}: {value:?} was accepted"))
            .to_string();
        assert!(error.contains(value), "{field} {value:?}: {error}");
        assert!(error.contains("duration"), "{field} {value:?}: {error}");
    }
}

#[test]
fn good_durations_still_parse() {
    use modelpool_crds::v1alpha1::parse_duration;
    for (text, seconds) in [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("0", 0.0),
        ("+2m", 120.0),
    ] {
        let parsed = parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            std::time::Duration::from(parsed).as_secs_f64(),
            seconds,
            "{text}"
        );
    }
}
