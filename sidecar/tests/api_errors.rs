//! Bad requests get a 4xx with a clear message, and random bodies never crash or wedge the
//! server.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{Sidecar, pool};
use modelpool_sidecar::client::Client;
use proptest::prelude::*;
use serde_json::{Value, json};

const POLICY: &str =
    "{mode: Aggressive, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}";

fn start() -> Sidecar {
    Sidecar::start(
        &pool(
            "errors",
            "{ram: 1Gi}",
            POLICY,
            &["{name: a, ram: 10Mi}", "{name: b, ram: 10Mi}"],
        ),
        &[],
    )
}

fn open(sidecar: &Sidecar) -> String {
    let r = sidecar.post(
        "/v1/sessions",
        &json!({"pid": std::process::id(), "models": ["a"]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session"].as_str().unwrap().to_owned()
}

fn raw(sidecar: &Sidecar, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let r = sidecar
        .client()
        .request(method, path, Some(body))
        .expect("answer");
    (r.status, r.json())
}

/// Each kind of bad request: status, error code and a message that says what is wrong.
#[test]
fn bad_requests_get_clear_4xx_answers() {
    let sidecar = start();
    let session = open(&sidecar);

    let (status, body) = raw(&sidecar, "POST", "/v1/acquire", b"{\"session\": ");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON"),
        "{body}"
    );

    let (status, body) = raw(&sidecar, "POST", "/v1/acquire", br#"{"session": "s-1"}"#);
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("`model`"),
        "names the field: {body}"
    );

    let (status, body) = raw(&sidecar, "POST", "/v1/sessions", br#"{"pid": "twelve"}"#);
    assert_eq!(status, 400);
    assert_eq!(body["field"], "pid", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("\"pid\""),
        "{body}"
    );

    // Readings that cannot be true: refused with the field and the numbers.
    let r = sidecar.post(
        &format!("/v1/sessions/{session}/heartbeat"),
        &json!({"readings": {"device_vram_used_bytes": 10_000_000_000_000_000_000u64, "device_vram_total_bytes": 1}}),
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("bad_readings")),
        "{}",
        r.text()
    );
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("device_vram_used_bytes 10000000000000000000")
            && message.contains("device_vram_total_bytes (1 "),
        "{message}"
    );

    let r = sidecar.post("/v1/acquire", &json!({"session": session, "model": "nope"}));
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["error"], "unknown_model");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("\"nope\"") && message.contains("a, b"),
        "{message}"
    );

    let r = sidecar.post("/v1/sessions", &json!({"pid": 1, "models": ["a", "zz"]}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "unknown_model");
    assert!(r.json()["message"].as_str().unwrap().contains("zz"));

    let r = sidecar.post("/v1/acquire", &json!({"session": "s-999", "model": "a"}));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "unknown_session");
    assert!(r.json()["message"].as_str().unwrap().contains("\"s-999\""));

    let r = sidecar.post("/v1/release", &json!({"session": session, "lease": "l-42"}));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "unknown_lease");
    assert!(r.json()["message"].as_str().unwrap().contains("\"l-42\""));

    let big = vec![b' '; 65 * 1024];
    let (status, body) = raw(&sidecar, "POST", "/v1/acquire", &big);
    assert_eq!(status, 413);
    assert_eq!(body["error"], "too_large");
    assert!(body["message"].as_str().unwrap().contains("64 KiB"));

    let (status, body) = raw(&sidecar, "GET", "/v2/state", b"");
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = raw(&sidecar, "DELETE", "/v1/state", b"");
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let r = sidecar.get(&format!("/v1/sessions/{session}/commands?wait_ms=soon"));
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("wait_ms"));

    // Still serving.
    assert_eq!(sidecar.get("/v1/state").status, 200);
}

/// The TCP API: a non-loopback address is refused without a token, and with one, requests
/// need `Authorization: Bearer`.
#[test]
fn tcp_listener_needs_a_token_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let pool_path = dir.path().join("pool.yaml");
    std::fs::write(
        &pool_path,
        pool("tcp", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpool-sidecar"))
        .args([
            "--pool",
            pool_path.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--api-token"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sidecar = Sidecar::start(
        &pool("tcp", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"]),
        &["--listen", &addr, "--api-token", "sesame"],
    );
    let anonymous = Client::tcp(addr.clone());
    let mut r = anonymous.get("/v1/state");
    sidecar.wait_until("the TCP API", |_| {
        r = anonymous.get("/v1/state");
        r.is_ok()
    });
    let r = r.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "unauthorized");
    let r = Client::tcp(addr)
        .with_token(Some("sesame".into()))
        .get("/v1/state")
        .unwrap();
    assert_eq!(r.status, 200);
    // The Unix socket needs no token (file permissions guard it).
    assert_eq!(sidecar.get("/v1/state").status, 200);
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9-]{0,8}".prop_map(Value::from),
        prop_oneof![Just("s-1"), Just("l-1"), Just("a"), Just("b")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("session".to_owned()),
                    Just("model".to_owned()),
                    Just("lease".to_owned()),
                    Just("pid".to_owned()),
                    Just("wait".to_owned()),
                    Just("ok".to_owned()),
                    Just("force".to_owned()),
                    Just("models".to_owned()),
                    Just("holds".to_owned()),
                    Just("readings".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json_value().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..256),
    ]
}

const PATHS: [&str; 9] = [
    "/v1/sessions",
    "/v1/sessions/s-1/heartbeat",
    "/v1/acquire",
    "/v1/loaded",
    "/v1/release",
    "/v1/unloaded",
    "/v1/cleanup",
    "/v1/sessions/s-1/commands?wait_ms=0",
    "/v1/check?vram_bytes=1&ram_bytes=2",
];

/// A few hundred random bodies on every endpoint: each answered below 500, and afterwards the
/// server still answers /v1/state.
#[test]
fn random_bodies_never_crash_or_wedge_the_server() {
    let sidecar = start();
    let _session = open(&sidecar);
    let client = sidecar
        .client()
        .with_timeout(std::time::Duration::from_secs(30));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(0..PATHS.len(), body()), |(index, body)| {
            let path = PATHS[index];
            let method = if path.contains("commands") || path.contains("check") {
                "GET"
            } else {
                "POST"
            };
            let r = client
                .request(method, path, Some(&body))
                .map_err(|e| TestCaseError::fail(format!("{method} {path}: {e}")))?;
            prop_assert!(
                r.status < 500,
                "{method} {path} answered {}: {}",
                r.status,
                r.text()
            );
            if r.status >= 400 {
                let answer = r.json();
                prop_assert!(answer["error"].is_string(), "{}", r.text());
                prop_assert!(answer["message"].is_string(), "{}", r.text());
            }
            Ok(())
        })
        .unwrap();
    let r = sidecar.get("/v1/state");
    assert_eq!(r.status, 200);
}
