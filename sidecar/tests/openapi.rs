//! The server against `sidecar/api/openapi.yaml`: every operation in the document answers on
//! the real server (not 404/405), with a documented status, and its JSON body carries the
//! document's required keys and types. The document and the server's routes stay in sync.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use common::{Sidecar, pool};
use modelpool_sidecar::{
    api::wire,
    client::{Client, Response},
};
use serde_json::{Value, json};

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read openapi.yaml");
    serde_saphyr::from_str(&text).expect("openapi.yaml parses")
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling {reference}")),
            )
        }
        None => schema,
    }
}

/// Checks `value` against an OpenAPI 3.0 schema (the subset the document uses).
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    validate_part(doc, schema, value, at, errors, true);
}

/// `whole`: `schema` is the whole schema of `value` (not one part of an `allOf`), so a key
/// none of its parts names is an undocumented key.
fn validate_part(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    errors: &mut Vec<String>,
    whole: bool,
) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            validate_part(doc, part, value, at, errors, false);
        }
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: expected {kind}, got {value}"));
            return;
        }
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array)
        && !choices.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {choices:?}"));
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if value.get(key).is_none() {
                errors.push(format!("{at}: required key {key:?} missing"));
            }
        }
    }
    // A key the server sends that the document does not name: the document is incomplete.
    if let Some(object) = value.as_object().filter(|_| whole) {
        let mut named: BTreeSet<&str> = BTreeSet::new();
        let mut closed = false;
        for part in std::iter::once(schema).chain(
            schema
                .get("allOf")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| resolve(doc, p)),
        ) {
            if let Some(properties) = part.get("properties").and_then(Value::as_object) {
                closed = true;
                named.extend(properties.keys().map(String::as_str));
            }
        }
        if closed && schema.get("additionalProperties").is_none() {
            for key in object.keys() {
                if !named.contains(key.as_str()) {
                    errors.push(format!("{at}: key {key:?} is not in the document"));
                }
            }
        }
    }
    if let (Some(properties), Some(object)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for (key, sub) in properties {
            if let Some(child) = object.get(key) {
                validate(doc, sub, child, &format!("{at}.{key}"), errors);
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{index}]"), errors);
        }
    }
}

/// Asserts a response is documented for the operation and matches its schema.
fn conforms(doc: &Value, method: &str, path: &str, response: &Response) {
    let operation = &doc["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} not in the document");
    let status = response.status.to_string();
    let documented = resolve(doc, &operation["responses"][&status]);
    assert!(
        documented.is_object(),
        "{method} {path} answered {status}, not documented: {}",
        response.text()
    );
    if let Some(schema) = documented.pointer("/content/application~1json/schema") {
        let body: Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: body is not JSON ({e}): {}",
                response.text()
            )
        });
        let mut errors = Vec::new();
        validate(doc, schema, &body, "body", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {errors:#?}\nbody: {body}"
        );
    }
}

/// The body read as the typed answer the handlers build (`api::wire`), and written back
/// unchanged: the struct names every field the server sends.
fn reads_as<T: serde::de::DeserializeOwned + serde::Serialize>(response: &Response) -> T {
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    let typed: T = serde_json::from_value(body.clone()).unwrap_or_else(|e| {
        panic!(
            "body does not read as {}: {e}\n{body}",
            std::any::type_name::<T>()
        )
    });
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        body,
        "{} drops or changes fields",
        std::any::type_name::<T>()
    );
    typed
}

/// Every operation of the document, called for real, conforms; and the document lists
/// exactly the operations this test calls.
#[test]
fn server_conforms_to_the_openapi_document() {
    let doc = document();
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();

    let sidecar = Sidecar::start(
        &pool(
            "contract",
            "{ram: 300Mi}",
            "{mode: Cache, idleTTL: 10m, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}",
            &[
                "{name: a, ram: 10Mi}",
                "{name: pin, ram: 100Mi, pinned: true}",
                "{name: big, ram: 250Mi}",
            ],
        ),
        &[],
    );
    let api = sidecar.client();
    let ops = Client::tcp(sidecar.metrics_addr.clone());
    let mut called: BTreeSet<(String, String)> = BTreeSet::new();
    let mut check = |method: &str, path: &str, response: Response| -> Response {
        assert!(
            response.status != 405
                && !(response.status == 404 && response.json()["error"] == "not_found"),
            "{method} {path}: no such route on the server ({})",
            response.status
        );
        conforms(&doc, method, path, &response);
        called.insert((method.to_owned(), path.to_owned()));
        response
    };

    let created = check(
        "post",
        "/v1/sessions",
        api.post(
            "/v1/sessions",
            &json!({"pid": std::process::id(), "app": "contract", "models": ["a"]}),
        )
        .unwrap(),
    );
    assert_eq!(created.status, 201);
    let session = reads_as::<wire::SessionCreated>(&created).session;
    check(
        "post",
        "/v1/sessions/{session}/heartbeat",
        api.post(
            &format!("/v1/sessions/{session}/heartbeat"),
            &json!({"readings": {"source": "torch", "process_vram_bytes": 0}}),
        )
        .unwrap(),
    );
    let commands = check(
        "get",
        "/v1/sessions/{session}/commands",
        api.get(&format!("/v1/sessions/{session}/commands?wait_ms=0"))
            .unwrap(),
    );
    assert!(reads_as::<wire::Commands>(&commands).commands.is_empty());
    let acquired = check(
        "post",
        "/v1/acquire",
        api.post("/v1/acquire", &json!({"session": session, "model": "a"}))
            .unwrap(),
    );
    let answer = reads_as::<wire::AcquireAnswer>(&acquired);
    assert_eq!(answer.decision, wire::Decision::Load);
    let lease = answer.lease.unwrap();
    let generation = answer.generation.unwrap();
    check(
        "post",
        "/v1/loaded",
        api.post(
            "/v1/loaded",
            &json!({"session": session, "lease": lease, "ok": true, "load_seconds": 0.1, "ram_bytes": 1024}),
        )
        .unwrap(),
    );
    let released = check(
        "post",
        "/v1/release",
        api.post("/v1/release", &json!({"session": session, "lease": lease}))
            .unwrap(),
    );
    reads_as::<wire::ReleaseAnswer>(&released);
    check(
        "post",
        "/v1/unloaded",
        api.post(
            "/v1/unloaded",
            &json!({"session": session, "model": "a", "generation": generation}),
        )
        .unwrap(),
    );
    let cleaned = check(
        "post",
        "/v1/cleanup",
        api.post("/v1/cleanup", &json!({"force": false})).unwrap(),
    );
    reads_as::<wire::CleanupAnswer>(&cleaned);
    // A state with an instance in it.
    let pin = api
        .post("/v1/acquire", &json!({"session": session, "model": "pin"}))
        .unwrap();
    let pin_lease = pin.json()["lease"].as_str().unwrap().to_owned();
    api.post(
        "/v1/loaded",
        &json!({"session": session, "lease": pin_lease, "ram_bytes": 100u64 << 20}),
    )
    .unwrap();
    let state = check("get", "/v1/state", api.get("/v1/state").unwrap());
    let state = reads_as::<wire::State>(&state);
    assert_eq!(state.models.len(), 1, "{state:?}");
    assert_eq!(state.models[0].model, "pin");
    let checked = check(
        "get",
        "/v1/check",
        api.get("/v1/check?ram_bytes=1048576").unwrap(),
    );
    assert!(reads_as::<wire::CheckAnswer>(&checked).available);

    // Error answers conform too.
    let refused = api
        .post("/v1/acquire", &json!({"session": session, "model": "big"}))
        .unwrap();
    assert_eq!(refused.status, 409, "{}", refused.text());
    conforms(&doc, "post", "/v1/acquire", &refused);
    let details: wire::RefusalDetails = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(details.reason, "exceeds_ceiling");
    assert_eq!(details.need_bytes.map(|b| b.ram), Some(250 << 20));
    let unknown = api
        .post("/v1/acquire", &json!({"session": session, "model": "zz"}))
        .unwrap();
    assert_eq!(unknown.status, 404);
    conforms(&doc, "post", "/v1/acquire", &unknown);
    let bad = api.request("POST", "/v1/release", Some(b"{")).unwrap();
    assert_eq!(bad.status, 400);
    conforms(&doc, "post", "/v1/release", &bad);
    let big = api
        .request("POST", "/v1/loaded", Some(&vec![b' '; 70_000]))
        .unwrap();
    assert_eq!(big.status, 413);
    conforms(&doc, "post", "/v1/loaded", &big);
    for (method, path) in [
        ("post", "/v1/sessions/{session}/heartbeat"),
        ("get", "/v1/sessions/{session}/commands"),
        ("delete", "/v1/sessions/{session}"),
    ] {
        let concrete = path.replace("{session}", "s-404");
        let r = api
            .request(
                &method.to_uppercase(),
                &concrete,
                (method == "post").then_some(b"{}".as_slice()),
            )
            .unwrap();
        assert_eq!(r.status, 404, "{method} {concrete}");
        assert_eq!(r.json()["error"], "unknown_session");
        conforms(&doc, method, path, &r);
    }

    check(
        "delete",
        "/v1/sessions/{session}",
        api.delete(&format!("/v1/sessions/{session}")).unwrap(),
    );
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = ops.get(path).unwrap();
        assert_eq!(r.status, 200, "{path}");
        check("get", path, r);
    }

    let missing: Vec<_> = documented.difference(&called).collect();
    let undocumented: Vec<_> = called.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    assert!(
        undocumented.is_empty(),
        "exercised but not documented: {undocumented:?}"
    );
}
