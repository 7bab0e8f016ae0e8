//! The serving proxy (`--proxy-listen`): protocol edge cases against a plain streaming HTTP
//! server written here (it is also the `Http` driver's app: `/models/{name}/load|unload`), then
//! unmodified Ollama and OpenAI requests against a real Ollama.
//!
//! Every wait polls a condition with a generous deadline, except the one the issue sets: a
//! client that disconnects mid-stream releases its lease within 1 s.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{MIB, PATIENCE, Sidecar, held_ram, ollama::Ollama, server::free_port};
use modelpool_sidecar::client::{Client, Response};
use serde_json::{Value, json};

/// Requests an upstream saw: (method, path, body).
type Seen = Mutex<Vec<(String, String, Vec<u8>)>>;

/// A plain HTTP/1.1 server: `/models/{name}/load|unload` answer `{}` at once; any other POST
/// is answered with a chunked stream: a first chunk at once, then a `tick` chunk every 50 ms
/// until the gate opens, then a last chunk. `GET /health` answers `upstream ok`.
struct Upstream {
    port: u16,
    gate: Arc<AtomicBool>,
    /// Every request: (method, path, body).
    seen: Arc<Seen>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let gate = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        {
            let (gate, seen) = (Arc::clone(&gate), Arc::clone(&seen));
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { break };
                    let (gate, seen) = (Arc::clone(&gate), Arc::clone(&seen));
                    thread::spawn(move || serve_connection(stream, &gate, &seen));
                }
            });
        }
        Self { port, gate, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect()
    }
}

/// Reads one request head and its body (Content-Length or chunked).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body).ok()?;
    }
    Some((method, path, body))
}

fn serve_connection(stream: TcpStream, gate: &AtomicBool, seen: &Seen) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while let Some((method, path, body)) = read_request(&mut reader) {
        seen.lock()
            .unwrap()
            .push((method.clone(), path.clone(), body));
        let result = if path.starts_with("/models/") || method == "GET" {
            let text = if method == "GET" { "upstream ok" } else { "{}" };
            write!(
                writer,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            )
        } else {
            stream_answer(&mut writer, gate)
        };
        if result.is_err() {
            return;
        }
    }
}

fn chunk(writer: &mut TcpStream, text: &str) -> std::io::Result<()> {
    write!(writer, "{:x}\r\n{text}\r\n", text.len())?;
    writer.flush()
}

fn stream_answer(writer: &mut TcpStream, gate: &AtomicBool) -> std::io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )?;
    chunk(writer, "data: first\n\n")?;
    let deadline = Instant::now() + PATIENCE;
    while !gate.load(Ordering::Relaxed) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        chunk(writer, "data: tick\n\n")?;
    }
    chunk(writer, "data: [DONE]\n\n")?;
    write!(writer, "0\r\n\r\n")?;
    writer.flush()
}

/// An HTTP exchange read by hand: the head, then the body as it comes.
struct Exchange {
    reader: BufReader<TcpStream>,
    status: u16,
}

impl Exchange {
    /// Sends a request (the body in `parts`, written one after the other with a pause, as a
    /// client streaming its upload would) and reads the response head.
    fn open(port: u16, path: &str, headers: &str, parts: &[&[u8]]) -> Self {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{headers}\r\n"
        )
        .unwrap();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                thread::sleep(Duration::from_millis(100));
            }
            stream.write_all(part).unwrap();
            stream.flush().unwrap();
        }
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header.trim_end().is_empty() {
                break;
            }
        }
        if status != 200 {
            let mut rest = String::new();
            let _ = reader
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(500)));
            let _ = reader.read_to_string(&mut rest);
            eprintln!("{path}: {status}: {rest}");
        }
        Self { reader, status }
    }

    /// The next chunk of a chunked body (`None` at its end).
    fn next_chunk(&mut self) -> Option<String> {
        let mut size = String::new();
        self.reader.read_line(&mut size).unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).unwrap();
        (size > 0).then(|| String::from_utf8_lossy(&chunk[..size]).into_owned())
    }
}

fn pool_yaml(driver_url: &str, limits: &str, policy: &str, models: &[&str]) -> String {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: proxied}}\nspec:\n  driver: {{kind: Http, url: \"{driver_url}\"}}\n  limits: {limits}\n  policy: {policy}\n  models:\n{models}"
    )
}

/// A sidecar proxying on a free port to `upstream`; returns it and the proxy's port.
fn proxy_sidecar(pool: &str, upstream: &str, extra: &[&str]) -> (Sidecar, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--proxy-listen", &listen, "--upstream", upstream];
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start(pool, &args);
    sidecar.wait_log(
        |line| line.contains("serving proxy listening").then_some(()),
        "the proxy listener",
    );
    (sidecar, port)
}

fn proxy_client(port: u16) -> Client {
    Client::tcp(format!("127.0.0.1:{port}")).with_timeout(PATIENCE)
}

/// The live leases on `model` (0 when it is not in the ledger).
fn leases(sidecar: &Sidecar, model: &str) -> u64 {
    Sidecar::instances(&sidecar.state(), model)
        .iter()
        .map(|m| m["leases"].as_u64().unwrap())
        .sum()
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

const CACHE: &str = "{mode: Cache, idleTTL: 10m, acquireTimeout: 2s, pressure: {ramPercent: 100, vramPercent: 100}}";

/// A streaming answer comes through as it is written (the first chunk before the upstream
/// finishes), under a lease on the model that the request got loaded; the lease ends with the
/// body. The request body reaches the upstream byte for byte though the proxy read only as far
/// as the model name, which came after the messages and in a later write.
#[test]
fn streams_incrementally_under_a_lease_that_ends_with_the_body() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 1Gi}",
        CACHE,
        &["{name: a, ram: 64Mi}"],
    );
    let (sidecar, port) = proxy_sidecar(&pool, &upstream.url(), &[]);

    let head = br#"{"messages": [{"role": "user", "content": "say \"model\": \"b\""}], "#;
    let tail = br#""model": "a", "stream": true}"#;
    let body = [&head[..], &tail[..]].concat();
    let mut exchange = Exchange::open(
        port,
        "/v1/chat/completions",
        &format!("content-length: {}\r\n", body.len()),
        &[head, tail],
    );
    assert_eq!(exchange.status, 200);
    assert_eq!(exchange.next_chunk().as_deref(), Some("data: first\n\n"));
    // The upstream has not finished (its gate is closed), the client has its first chunk, and
    // the request holds a lease on the model it got loaded.
    assert!(upstream.paths().contains(&"POST /models/a/load".to_owned()));
    assert_eq!(leases(&sidecar, "a"), 1);
    assert_eq!(exchange.next_chunk().as_deref(), Some("data: tick\n\n"));
    upstream.gate.store(true, Ordering::Relaxed);
    let mut rest = Vec::new();
    while let Some(chunk) = exchange.next_chunk() {
        rest.push(chunk);
    }
    assert_eq!(rest.last().map(String::as_str), Some("data: [DONE]\n\n"));
    sidecar.wait_until("the lease to end with the body", |s| leases(s, "a") == 0);
    let forwarded = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|(_, p, _)| p == "/v1/chat/completions")
        .map(|(_, _, b)| b.clone())
        .unwrap();
    assert_eq!(forwarded, body);
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"ok\"}"),
        Some(1.0)
    );

    // The same with a chunked upload (no Content-Length): the model in the second chunk.
    let chunked = [
        format!("{:x}\r\n", head.len()).into_bytes(),
        head.to_vec(),
        b"\r\n".to_vec(),
    ]
    .concat();
    let last = [
        format!("{:x}\r\n", tail.len()).into_bytes(),
        tail.to_vec(),
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    let mut exchange = Exchange::open(
        port,
        "/v1/chat/completions",
        "transfer-encoding: chunked\r\n",
        &[&chunked, &last],
    );
    assert_eq!(exchange.status, 200);
    while exchange.next_chunk().is_some() {}
    let bodies: Vec<Vec<u8>> = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _)| p == "/v1/chat/completions")
        .map(|(_, _, b)| b.clone())
        .collect();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[1], body);
}

/// A client that goes away mid-stream releases its lease within 1 s (the issue's bound).
#[test]
fn client_disconnect_mid_stream_releases_the_lease_within_1s() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 1Gi}",
        CACHE,
        &["{name: a, ram: 64Mi}"],
    );
    let (sidecar, port) = proxy_sidecar(&pool, &upstream.url(), &[]);
    let body = br#"{"model": "a", "prompt": "hi"}"#;
    let mut exchange = Exchange::open(
        port,
        "/api/generate",
        &format!("content-length: {}\r\n", body.len()),
        &[body],
    );
    assert_eq!(exchange.status, 200);
    assert!(exchange.next_chunk().is_some());
    assert_eq!(leases(&sidecar, "a"), 1);
    drop(exchange);
    let gone = Instant::now();
    sidecar.wait_until("the lease released", |s| leases(s, "a") == 0);
    let took = gone.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the lease took {took:?} to be released"
    );
    sidecar.wait_until("the request counted as client_gone", |s| {
        s.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"client_gone\"}") == Some(1.0)
    });
}

/// 413 above the body limit (by Content-Length at once, or while reading a chunked body for
/// its model), 404 for a model not in the pool, 400 for a body naming none: each in the
/// client's protocol. Requests naming no model pass through; the listings are the pool's.
#[test]
fn refusals_speak_the_clients_protocol() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 1Gi}",
        CACHE,
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    let (sidecar, port) = proxy_sidecar(&pool, &upstream.url(), &["--proxy-body-limit", "1024"]);
    let client = proxy_client(port);

    // 413 by Content-Length, in OpenAI's shape and Ollama's.
    let big = json!({"model": "a", "prompt": "x".repeat(2000)});
    let r = client.post("/v1/completions", &big).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "too_large");
    let r = client.post("/api/generate", &big).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("1024 bytes"));
    // 413 while reading a chunked body whose model comes after the limit.
    let text = format!(r#"{{"prompt": "{}", "model": "a"}}"#, "y".repeat(2000));
    let chunked = format!("{:x}\r\n{text}\r\n0\r\n\r\n", text.len());
    let exchange = Exchange::open(
        port,
        "/api/generate",
        "transfer-encoding: chunked\r\n",
        &[chunked.as_bytes()],
    );
    assert_eq!(exchange.status, 413);

    // 404 for a model the pool does not list, in each protocol.
    let r = client
        .post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": []}),
        )
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["type"], "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("it lists: a, b"),
        "{error}"
    );
    let r = client.post("/api/chat", &json!({"model": "nope"})).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("\"nope\" is not in the pool")
    );
    let r = client
        .post("/v2/models/nope/infer", &json!({"inputs": []}))
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["error"].is_string());

    // 400 for a body naming no model.
    let r = client
        .post("/api/generate", &json!({"prompt": "hi"}))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = client.post("/v1/embeddings", &json!({"model": 7})).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "model");

    // Nothing was loaded and no lease is left.
    assert!(sidecar.state()["models"].as_array().unwrap().is_empty());
    assert!(!upstream.paths().iter().any(|p| p.contains("/load")));

    // No model named: passed through untouched.
    let r = client.get("/health").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "upstream ok"));
    // The listings are the pool's.
    let models = client.get("/v1/models").unwrap().json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let tags = client.get("/api/tags").unwrap().json();
    assert_eq!(tags["models"][1]["name"], "b:latest");
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"\",outcome=\"unknown_model\"}"),
        Some(3.0)
    );

    // A body naming its model twice (a Go server reads the last, without regard to case): 400,
    // whether the second key comes with the first or in a later write of the body.
    let r = client
        .post("/api/generate", &json!({"model": "a", "MODEL": "b"}))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("second top-level")
    );
    let first = br#"{"model": "a", "prompt": "#;
    let second = br#""x", "Model": "b"}"#;
    let exchange = Exchange::open(
        port,
        "/v1/completions",
        &format!("content-length: {}\r\n", first.len() + second.len()),
        &[first, second],
    );
    assert_eq!(exchange.status, 400);
    sidecar.wait_until("no lease left", |s| leases(s, "a") == 0);
    assert!(
        !upstream
            .paths()
            .iter()
            .any(|p| p.ends_with("/completions") || p.ends_with("/generate")),
        "a refused request reached the server: {:?}",
        upstream.paths()
    );
}

/// The upstream down: 502 in the client's protocol, and no lease left behind.
#[test]
fn upstream_down_is_502_and_leaks_no_lease() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 1Gi}",
        CACHE,
        &["{name: a, ram: 64Mi}"],
    );
    // The driver's app answers; the server requests go to answers nothing.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (sidecar, port) = proxy_sidecar(&pool, &dead, &[]);
    let client = proxy_client(port);
    let r = client
        .post(
            "/v1/chat/completions",
            &json!({"model": "a", "messages": []}),
        )
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["code"], "upstream_unavailable");
    assert!(
        error["message"].as_str().unwrap().contains(&dead),
        "{error}"
    );
    let r = client
        .post("/api/generate", &json!({"model": "a"}))
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.json()["error"].is_string());
    let state = sidecar.state();
    assert_eq!(leases(&sidecar, "a"), 0, "{state}");
    let proxy_sessions: Vec<&Value> = state["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["app"] == "proxy")
        .collect();
    assert_eq!(proxy_sessions.len(), 1, "{state}");
    assert_eq!(proxy_sessions[0]["leases"], 0, "{state}");
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"upstream_error\"}"),
        Some(2.0)
    );
}

/// No room in time: 503 with Retry-After naming the model, its need, the ceiling and what
/// holds it. The per-model limit queues a second request; a full queue answers 429.
#[test]
fn no_room_is_503_and_a_full_queue_429_with_retry_after() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 100Mi}",
        CACHE,
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    let (sidecar, port) = proxy_sidecar(
        &pool,
        &upstream.url(),
        &["--proxy-max-queue", "1", "--proxy-model-concurrency", "1"],
    );
    let client = proxy_client(port);
    let body = br#"{"model": "a", "prompt": "hi"}"#;
    let length = format!("content-length: {}\r\n", body.len());
    let mut holding = Exchange::open(port, "/api/generate", &length, &[body]);
    assert_eq!(holding.status, 200);
    assert!(holding.next_chunk().is_some());

    // b cannot fit beside a, whose request holds it: 503 after acquireTimeout, with numbers.
    let r = client
        .post("/v1/completions", &json!({"model": "b", "prompt": "hi"}))
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(header(&r, "retry-after"), Some("5"));
    let error = &r.json()["error"];
    assert_eq!(error["code"], "timeout");
    assert_eq!(error["model"], "b");
    assert_eq!(error["need_bytes"]["ram"], 64 * MIB);
    assert_eq!(error["ceiling_bytes"]["ram"], 100 * MIB);
    assert_eq!(error["holders"][0]["model"], "a");
    assert_eq!(error["holders"][0]["leases"], 1);

    // a's limit is one request in flight: the next waits in the queue (maxQueue 1), and one
    // more finds the queue full.
    let waiting = thread::spawn(move || {
        let body = br#"{"model": "a", "prompt": "again"}"#;
        let mut exchange = Exchange::open(
            port,
            "/api/generate",
            &format!("content-length: {}\r\n", body.len()),
            &[body],
        );
        let status = exchange.status;
        while exchange.next_chunk().is_some() {}
        status
    });
    sidecar.wait_until("one request queued", |s| {
        s.metric("modelpool_proxy_queue_length") == Some(1.0)
    });
    let r = client
        .post("/api/generate", &json!({"model": "a"}))
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(header(&r, "retry-after"), Some("1"));
    assert!(r.json()["error"].as_str().unwrap().contains("maxQueue 1"));

    // The holder ends: the queued request is served.
    upstream.gate.store(true, Ordering::Relaxed);
    while holding.next_chunk().is_some() {}
    assert_eq!(waiting.join().unwrap(), 200);
    sidecar.wait_until("every lease released", |s| leases(s, "a") == 0);
    assert!(held_ram(&sidecar.state()) <= 100 * MIB);
}

// ---- a real Ollama ----

fn ollama_proxy(server: &Ollama, limits: &str, models: &[&str]) -> (Sidecar, u16) {
    let models: String = models.iter().map(|m| format!("  - {m}\n")).collect();
    let yaml = format!(
        "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: ollama}}\nspec:\n  driver: {{kind: Ollama, url: \"{}\"}}\n  limits: {limits}\n  policy: {{mode: Cache, idleTTL: 10m, acquireTimeout: 2m, pressure: {{ramPercent: 100, vramPercent: 100}}}}\n  models:\n{models}",
        server.url(),
    );
    // No --upstream: the pool's driver url is the default.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sidecar = Sidecar::start(&yaml, &["--proxy-listen", &listen, "--tick-ms", "200"]);
    sidecar.wait_state("the sidecar to poll the server", |s| {
        s["server"]["up"] == true
    });
    (sidecar, port)
}

/// Unmodified Ollama and OpenAI requests to models that are not loaded get them loaded and
/// answered (Ollama's NDJSON stream, an OpenAI chat completion).
#[test]
fn ollama_and_openai_requests_load_and_answer() {
    let server = Ollama::start(&["a", "b"]);
    let (sidecar, port) = ollama_proxy(
        &server,
        "{ram: 1Gi}",
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    assert!(server.ps().is_empty());
    let client = proxy_client(port);

    let r = client
        .post(
            "/api/generate",
            &json!({"model": "a", "prompt": "hi", "options": {"num_predict": 4}}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // NDJSON: one line per token (the tiny model's tokens may be empty, and Ollama then sends
    // fewer), ending with the `done` line.
    assert!(!lines.is_empty(), "a stream of lines: {lines:?}");
    assert_eq!(lines.last().unwrap()["done"], true);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    assert!(server.holds("a"));

    let r = client
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "model": "b:latest", "max_tokens": 4}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    assert!(server.holds("b"));
    let state = sidecar.wait_state("both leases released", |s| {
        s["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["leases"] == 0)
    });
    assert_eq!(held_ram(&state), 128 * MIB);
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"b\",outcome=\"ok\"}"),
        Some(1.0)
    );
    assert!(
        sidecar
            .metric("modelpool_proxy_load_seconds_count{model=\"a\"}")
            .is_some_and(|n| n >= 1.0)
    );
}

/// Two models that do not fit together, asked for at the same time by several clients: all are
/// served, one model after the other, and neither the ledger nor Ollama ever holds both.
#[test]
fn models_that_do_not_fit_together_are_served_one_after_the_other() {
    let server = Ollama::start(&["a", "b"]);
    let (sidecar, port) = ollama_proxy(
        &server,
        "{ram: 100Mi}",
        &["{name: a, ram: 64Mi}", "{name: b, ram: 64Mi}"],
    );
    let server = Arc::new(server);
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (server, done) = (Arc::clone(&server), Arc::clone(&done));
        let socket = sidecar.socket.clone();
        thread::spawn(move || {
            let mut worst = (0usize, 0u64);
            while !done.load(Ordering::Relaxed) {
                // A poll that fails on a loaded machine is skipped, not fatal.
                let held = server
                    .client()
                    .get("/api/ps")
                    .ok()
                    .and_then(|r| r.json()["models"].as_array().map(Vec::len));
                let state = Client::unix(&socket)
                    .get("/v1/state")
                    .ok()
                    .map(|r| r.json());
                if let (Some(held), Some(state)) = (held, state) {
                    worst = (worst.0.max(held), worst.1.max(held_ram(&state)));
                }
                thread::sleep(Duration::from_millis(20));
            }
            worst
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let model = if i % 2 == 0 { "a" } else { "b" };
            thread::spawn(move || {
                proxy_client(port).post(
                    "/api/generate",
                    &json!({"model": model, "prompt": "hi", "stream": false, "options": {"num_predict": 4}}),
                )
            })
        })
        .collect();
    for client in clients {
        let r = client.join().unwrap().unwrap_or_else(|error| {
            panic!(
                "a proxied request failed: {error}\nstate: {}\nsidecar logs:\n{}\nollama log:\n{}",
                sidecar.state(),
                sidecar.logs().join("\n"),
                server.log()
            )
        });
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["done"], true);
    }
    done.store(true, Ordering::Relaxed);
    let (most_in_ollama, most_held) = watcher.join().unwrap();
    assert_eq!(most_in_ollama, 1, "Ollama held both models at once");
    assert!(most_held <= 100 * MIB, "the ledger held {most_held} bytes");
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"ok\"}"),
        Some(2.0)
    );
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"b\",outcome=\"ok\"}"),
        Some(2.0)
    );
}

/// Sends `bytes` to the proxy and reads until the server closes (or `wait` passes).
fn raw_exchange(port: u16, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

/// Status and JSON body of the answer in `raw`.
fn raw_answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer in {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("body of {head:?} is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Issue 15's listener limits on the proxy's port: with `--header-timeout 1s --body-timeout
/// 1s` and a cap of 8 connections, a streamed answer that lasts longer than both arrives
/// whole while 40 idle and slow-head connections pile up beyond the cap (they close each
/// other; the stream's connection, busy, is never the one closed), and a fresh client of the
/// proxy and of the API socket are answered throughout. A head that comes too slowly, a body
/// that stalls, an over-long target and a ninth connection when all eight are answering are
/// refused in the client's protocol (Ollama's shape on `/api/...`, OpenAI's otherwise).
#[test]
fn proxy_listener_limits_cut_slow_clients_not_long_streams() {
    let upstream = Upstream::start();
    let pool = pool_yaml(
        &upstream.url(),
        "{ram: 1Gi}",
        CACHE,
        &["{name: a, ram: 64Mi}"],
    );
    let (sidecar, port) = proxy_sidecar(
        &pool,
        &upstream.url(),
        &[
            "--header-timeout",
            "1s",
            "--body-timeout",
            "1s",
            "--proxy-max-connections",
            "8",
        ],
    );
    let request = br#"{"model": "a", "prompt": "hi", "stream": true}"#;
    let length = format!("content-length: {}\r\n", request.len());

    // A stream under way, then a flood of idle and slow connections beyond the cap.
    let started = Instant::now();
    let mut stream = Exchange::open(port, "/v1/completions", &length, &[request]);
    assert_eq!(stream.status, 200);
    assert_eq!(stream.next_chunk().as_deref(), Some("data: first\n\n"));
    let mut flood = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
        }
        flood.push(s);
    }
    // A fresh client is answered on the proxy (a passthrough) and on the API socket.
    let r = proxy_client(port).get("/health").unwrap();
    assert_eq!((r.status, r.text()), (200, "upstream ok".to_owned()));
    assert_eq!(sidecar.get("/v1/state").status, 200);
    assert!(
        sidecar
            .metric("modelpool_http_timeouts_total{kind=\"evicted\",listener=\"proxy\"}")
            .unwrap()
            >= 30.0,
        "the flood did not reach the cap"
    );
    // The stream outlives both timeouts, then ends whole.
    while started.elapsed() < Duration::from_millis(2500) {
        assert_eq!(stream.next_chunk().as_deref(), Some("data: tick\n\n"));
    }
    upstream.gate.store(true, Ordering::Relaxed);
    let mut last = None;
    while let Some(chunk) = stream.next_chunk() {
        last = Some(chunk);
    }
    assert_eq!(last.as_deref(), Some("data: [DONE]\n\n"));
    drop(flood);
    sidecar.wait_until("the stream's lease released", |s| leases(s, "a") == 0);

    // Eight streams answering: a ninth connection is refused, in OpenAI's shape (no request
    // read yet), naming the flag.
    upstream.gate.store(false, Ordering::Relaxed);
    let streams: Vec<Exchange> = (0..8)
        .map(|_| Exchange::open(port, "/v1/completions", &length, &[request]))
        .collect();
    assert!(streams.iter().all(|s| s.status == 200));
    let (status, body) = raw_answer(&raw_exchange(port, b"", PATIENCE));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--proxy-max-connections"), "{message}");
    upstream.gate.store(true, Ordering::Relaxed);
    for mut s in streams {
        while s.next_chunk().is_some() {}
    }
    sidecar.wait_until("the eight leases released", |s| leases(s, "a") == 0);

    // Half a head, then silence: 408 after the header timeout, in the path's protocol.
    let took = Instant::now();
    let raw = raw_exchange(
        port,
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\n",
        PATIENCE,
    );
    let (status, body) = raw_answer(&raw);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("--header-timeout"),
        "{body}"
    );
    assert!(took.elapsed() < PATIENCE);
    // A body that stalls before its model name: 408, and no lease was taken.
    let raw = raw_exchange(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"messages\": [",
        PATIENCE,
    );
    let (status, body) = raw_answer(&raw);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--body-timeout")
    );
    // A body that stalls after its model name: cut off upstream, 408 too, lease released.
    let raw = raw_exchange(
        port,
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": \"a\", \"prompt\": \"",
        PATIENCE,
    );
    let (status, body) = raw_answer(&raw);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );
    assert_eq!(
        sidecar.metric("modelpool_proxy_requests_total{model=\"a\",outcome=\"client_timeout\"}"),
        Some(1.0)
    );
    assert_eq!(leases(&sidecar, "a"), 0);
    // An over-long target on an Ollama path: 414 in Ollama's shape.
    let mut long = b"GET /api/show?".to_vec();
    long.extend(std::iter::repeat_n(b'a', 9000));
    long.extend(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, body) = raw_answer(&raw_exchange(port, &long, PATIENCE));
    assert_eq!(
        (status, body["code"].as_str()),
        (414, Some("uri_too_long")),
        "{body}"
    );
    // Idle connections are closed by the server (else this read waits for all of PATIENCE).
    let took = Instant::now();
    assert!(raw_exchange(port, b"", PATIENCE).is_empty());
    assert!(took.elapsed() < PATIENCE);
}
