//! The listeners under hostile load (issue 15): connection caps per listener, header, idle and
//! body timeouts, bounded memory per connection, and the API's JSON error body on every
//! HTTP-layer refusal. Everything runs against the real sidecar process over real sockets.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use common::{PATIENCE, Sidecar, pool};
use modelpool_sidecar::client::Client;
use serde_json::{Value, json};

const POLICY: &str =
    "{mode: Aggressive, acquireTimeout: 1s, pressure: {ramPercent: 100, vramPercent: 100}}";

fn test_pool() -> String {
    pool("listeners", "{ram: 1Gi}", POLICY, &["{name: a, ram: 10Mi}"])
}

/// The sidecar's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Raises this test process's open-file limit to its hard limit; returns the new soft limit.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let target = limit.maximum.unwrap_or(1 << 20).min(1 << 20);
    if setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )
    .is_ok()
    {
        target
    } else {
        limit.current.unwrap_or(1024)
    }
}

/// Sends `bytes` on the API socket and reads until the server closes (or `wait` passes).
fn exchange(socket: &std::path::Path, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    // A connection over the cap is answered and closed before it is read: the write may then
    // fail (broken pipe) while the answer is already waiting to be read.
    let _ = stream.write_all(bytes);
    read_to_close(&mut stream)
}

fn read_to_close(stream: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Status and JSON body of the first answer in `raw`.
fn answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(body.len());
    let json = serde_json::from_str(&body[..length.min(body.len())])
        .unwrap_or_else(|e| panic!("body of {head:?} is not JSON ({e}): {body:?}"));
    (status, json)
}

/// The API's error body: `error` is `code` and the message names the limit.
fn assert_error(raw: &[u8], status: u16, code: &str, mentions: &str) {
    let (got, body) = answer(raw);
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message:?} should name {mentions:?}"
    );
}

/// Every refusal the HTTP layer makes (over-long target 414, head too large 431, unparsable
/// request 400, body over 64 KiB 413, head or body not in time 408, all connections busy 503)
/// carries the API's JSON error body naming the limit; idle connections are closed. Before
/// issue 15, hyper's 400/414/431 had an empty body, and nothing timed out.
#[test]
fn http_layer_refusals_carry_the_api_error_body() {
    let sidecar = Sidecar::start(
        &test_pool(),
        &[
            "--header-timeout",
            "1s",
            "--body-timeout",
            "1s",
            "--max-connections",
            "4",
        ],
    );
    let socket = sidecar.socket.clone();
    let wait = PATIENCE;

    let mut long = b"GET /v1/state?".to_vec();
    long.extend(std::iter::repeat_n(b'a', 9000));
    long.extend(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_error(&exchange(&socket, &long, wait), 414, "uri_too_long", "8192");

    let mut big = b"GET /v1/state HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'b', 20_000));
    big.extend(b"\r\n\r\n");
    assert_error(
        &exchange(&socket, &big, wait),
        431,
        "headers_too_large",
        "16384",
    );

    let mut many = b"GET /v1/state HTTP/1.1\r\n".to_vec();
    for i in 0..80 {
        many.extend(format!("X-{i}: v\r\n").bytes());
    }
    many.extend(b"\r\n");
    assert_error(
        &exchange(&socket, &many, wait),
        431,
        "headers_too_large",
        "64 header",
    );

    let garbage = b"GE\x01T / HTTP/1.1\r\n\r\n";
    assert_error(
        &exchange(&socket, garbage, wait),
        400,
        "bad_request",
        "malformed HTTP",
    );

    let mut huge =
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b' ', 70_000));
    assert_error(&exchange(&socket, &huge, wait), 413, "too_large", "64 KiB");

    // Half a head, then silence: 408 once the header timeout passes, and the connection closes.
    let partial = b"GET /v1/state HTTP/1.1\r\nHost: x\r\n";
    assert_error(
        &exchange(&socket, partial, wait),
        408,
        "request_timeout",
        "--header-timeout",
    );
    // A head, then a body that never comes: 408 after the body timeout.
    let slow_body = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{";
    assert_error(
        &exchange(&socket, slow_body, wait),
        408,
        "request_timeout",
        "--body-timeout",
    );
    // Idle: connected, nothing sent; and keep-alive after an answer. Both are closed by the
    // server (without it, these reads would wait for the whole PATIENCE and fail below).
    let started = Instant::now();
    assert!(exchange(&socket, b"", wait).is_empty());
    let kept = exchange(&socket, b"GET /v1/state HTTP/1.1\r\nHost: x\r\n\r\n", wait);
    assert_eq!(answer(&kept).0, 200);
    assert!(
        started.elapsed() < wait,
        "idle connections were not closed by the server"
    );

    // All four connections answering long polls: the fifth is refused with the body too.
    let r = sidecar.post(
        "/v1/sessions",
        &json!({"pid": std::process::id(), "models": ["a"]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let session = r.json()["session"].as_str().unwrap().to_owned();
    let polls: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            write!(
                s,
                "GET /v1/sessions/{session}/commands?wait_ms=4000 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            .unwrap();
            s
        })
        .collect();
    // The polls are under way once the gauge shows them.
    sidecar.wait_until("four open API connections", |s| {
        s.metric("modelpool_http_connections{listener=\"api\"}") == Some(4.0)
    });
    assert_error(
        &exchange(&socket, b"GET /v1/state HTTP/1.1\r\nHost: x\r\n\r\n", wait),
        503,
        "too_many_connections",
        "--max-connections",
    );
    drop(polls);
    // The room comes back when the polls end; the refusal was counted.
    sidecar.wait_until("the API answers again", |s| {
        s.client().get("/v1/state").is_ok_and(|r| r.status == 200)
    });
    assert!(
        sidecar
            .metric("modelpool_http_connections_refused_total{listener=\"api\"}")
            .unwrap()
            >= 1.0
    );
    assert!(
        sidecar
            .metric("modelpool_http_timeouts_total{kind=\"header\",listener=\"api\"}")
            .unwrap()
            >= 1.0
    );
}

/// Median of `n` timed `/v1/state` calls on the API socket, each one required to answer 200.
fn api_median_ms(sidecar: &Sidecar, n: usize) -> f64 {
    let client = Client::unix(&sidecar.socket).with_timeout(PATIENCE);
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let r = client.get("/v1/state").expect("the API answers");
            assert_eq!(r.status, 200, "{}", r.text());
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

/// Issue 15's attack: with the open-file limit at 256, 300 slow connections made the API and
/// `/healthz` time out, and 8 000 idle connections took RSS from 23 to 154 MiB where it stayed.
/// Here 8 000 slow and idle connections go to the metrics port and the API socket (far beyond
/// either cap): the API and `/healthz` keep answering (the API in a median under 100 ms),
/// memory stays bounded while they are open, and RSS comes back near its start once they close.
#[test]
fn slow_and_idle_connections_beyond_the_caps_leave_the_api_answering() {
    let fd_limit = raise_fd_limit();
    let sidecar = Sidecar::start_wrapped(&test_pool(), &[], &["prlimit", "--nofile=256:256"]);
    let pid = sidecar.pid();
    sidecar.wait_log(
        |l| l.contains("caps lowered to fit").then_some(()),
        "the caps fitted to the fd limit of 256",
    );
    for _ in 0..50 {
        assert_eq!(sidecar.get("/v1/state").status, 200);
    }
    let _ = sidecar.metrics();
    let start = rss_kib(pid);

    let wanted = 8000usize;
    let count = wanted.min(usize::try_from(fd_limit.saturating_sub(200)).unwrap_or(wanted));
    let mut tcp: Vec<TcpStream> = Vec::new();
    let mut unix: Vec<UnixStream> = Vec::new();
    for i in 0..count {
        let slow = i % 4 < 2;
        if i % 2 == 0 {
            let mut s = TcpStream::connect(&sidecar.metrics_addr).unwrap();
            if slow {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            }
            tcp.push(s);
        } else {
            let mut s = UnixStream::connect(&sidecar.socket).unwrap();
            if slow {
                let _ = s.write_all(b"GET /v1/state HTTP/1.1\r\nHost: x\r\n");
            }
            unix.push(s);
        }
    }
    eprintln!(
        "opened {count} connections (fd limit {fd_limit}); sidecar RSS {start} KiB before, {} KiB with them open",
        rss_kib(pid)
    );

    // The API answers within 100 ms (median of 21, three tries on a noisy machine) ...
    let medians: Vec<f64> = (0..3).map(|_| api_median_ms(&sidecar, 21)).collect();
    eprintln!("API median under the flood: {medians:?} ms");
    assert!(
        medians.iter().any(|&m| m < 100.0),
        "the API's median answer took {medians:?} ms under the flood"
    );
    // ... and so does /healthz on the flooded metrics port (an idle connection makes room).
    let r = Client::tcp(sidecar.metrics_addr.clone())
        .with_timeout(PATIENCE)
        .get("/healthz")
        .unwrap();
    assert_eq!(r.status, 200);
    let during = rss_kib(pid);
    assert!(
        during < start + 64 * 1024,
        "RSS grew from {start} to {during} KiB with {count} connections open"
    );

    drop(tcp);
    drop(unix);
    let deadline = Instant::now() + PATIENCE;
    let mut now = rss_kib(pid);
    while now > start + 3 * 1024 {
        assert!(
            Instant::now() < deadline,
            "RSS stayed at {now} KiB after the connections closed (it was {start} KiB before, {during} KiB during)"
        );
        std::thread::sleep(Duration::from_millis(200));
        now = rss_kib(pid);
    }
    eprintln!("RSS {start} KiB before, {during} KiB during, {now} KiB after");
    let metrics = sidecar.metrics();
    for line in metrics.lines().filter(|l| l.starts_with("modelpool_http_")) {
        eprintln!("{line}");
    }
}
