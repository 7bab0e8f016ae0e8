//! The `proxy` scenario: requests through the sidecar's serving proxy (`--proxy-listen`)
//! against the same client going straight to the same upstream, in the same run, alternating
//! in slices. The upstream is a bare hyper server in a process of its own
//! (`modelpool-bench proxy-upstream`, multi-threaded tokio like the sidecar):
//! `POST /v1/completions` answers a small JSON body (an embedding-sized reply),
//! `POST /v1/chat/completions` a stream of `--chunks` chunks written one frame each (an SSE
//! answer), each after `--work-us` of simulated inference (default 0: the proxy's cost against
//! a server that does nothing). The pool's model is loaded by the first request and stays
//! loaded (Cache mode): the figures are the proxy's cost on a loaded model, a lease taken and
//! released per request.
//!
//! The added p99 is given twice: the whole run's p99 less the direct side's
//! (`added_p99_us`), and the median over slices of each proxied slice's p99 less the direct
//! slice's just before it, with a 95 % interval ([`median_with_interval`]). On a shared
//! machine the first moves by milliseconds with a single stall of the host; the second
//! resolves a millisecond.
//!
//! CPU per request is read from /proc/PID/stat (user + system): the sidecar's over the
//! proxied slices (`sidecar_cpu_us_per_request`), the upstream's over the direct slices
//! (`upstream_cpu_us_per_request`, what a bare server spends on the same request), and their
//! ratio (`sidecar_cpu_to_upstream`). On a machine with few cores the proxy's added latency is
//! its CPU per request queued behind the others', so this says where the time goes.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response,
    body::{Bytes, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;

use crate::{
    http::{Client, Target, free_port},
    process::{Proc, Sidecar, clock_ticks_per_second, cpu_ticks, percentile, spawn},
    report::{Printer, Row},
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds measured per (kind, clients, side).
    pub seconds: f64,
    /// Alternating slices the seconds are cut in.
    pub slices: usize,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Chunks of a streaming answer.
    pub chunks: usize,
    /// Simulated inference time per request, µs.
    pub work_us: u64,
    /// Bytes of prompt text per request body (0: a one-word prompt).
    pub prompt_bytes: usize,
}

const SMALL_REPLY: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3,0.4]}],"model":"m"}"#;
const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"},\"index\":0}]}\n\n";

type UpBody = BoxBody<Bytes, Infallible>;

async fn upstream_answer(
    request: Request<Incoming>,
    chunks: usize,
    work: Duration,
) -> Response<UpBody> {
    let path = request.uri().path().to_owned();
    // Read the body, as a real server does.
    let _ = request.into_body().collect().await;
    if !work.is_zero() && !path.starts_with("/models/") {
        // Not tokio's timer: it wakes on whole milliseconds, so a 10 ms answer took 10-12 ms
        // and both sides' p99 moved in 1 ms steps, more than the proxy adds. A thread's sleep
        // wakes within tens of µs of its time, as a model's answer would.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(work)).await;
    }
    let body: UpBody = if path == "/v1/chat/completions" {
        let frames = (0..chunks)
            .map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(CHUNK.as_bytes()))))
            .chain(std::iter::once(Ok(Frame::data(Bytes::from_static(
                b"data: [DONE]\n\n",
            )))));
        BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
    } else if path.starts_with("/models/") {
        BodyExt::boxed(Full::new(Bytes::from_static(b"{}")))
    } else {
        BodyExt::boxed(Full::new(Bytes::from_static(SMALL_REPLY.as_bytes())))
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The upstream server (`modelpool-bench proxy-upstream`): serves on `addr` until the process
/// ends; prints `ready` once bound.
pub async fn serve_upstream(addr: SocketAddr, chunks: usize, work_us: u64) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {addr}"))?;
    let work = Duration::from_micros(work_us);
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(move |request| async move {
                Ok::<_, Infallible>(upstream_answer(request, chunks, work).await)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the upstream in a process of its own and waits until it is bound.
fn start_upstream(dir: &Path, addr: SocketAddr, options: &Options) -> anyhow::Result<Proc> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("proxy-upstream")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--chunks")
        .arg(options.chunks.max(1).to_string())
        .arg("--work-us")
        .arg(options.work_us.to_string());
    let mut proc = spawn(command, dir.join("upstream.log"), "the upstream server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("the upstream server did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// The two kinds of request.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Small,
    Stream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Stream => "stream",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Small => "/v1/completions",
            Self::Stream => "/v1/chat/completions",
        }
    }

    /// The request body, with `prompt_bytes` of text (words, with an escaped quote and a
    /// newline now and then, as a chat history has) in place of "hello" when not zero.
    fn body(self, prompt_bytes: usize) -> Bytes {
        let prompt = if prompt_bytes == 0 {
            "hello".to_owned()
        } else {
            let words = [
                "the ",
                "model ",
                "said ",
                "\\\"yes\\\" ",
                "and\\n",
                "tokens ",
            ];
            let mut text = String::with_capacity(prompt_bytes + 16);
            for word in words.iter().cycle() {
                if text.len() >= prompt_bytes {
                    break;
                }
                text.push_str(word);
            }
            text
        };
        let body = match self {
            Self::Small => format!(r#"{{"model": "m", "prompt": "{prompt}"}}"#),
            Self::Stream => format!(
                r#"{{"messages": [{{"role": "user", "content": "{prompt}"}}], "model": "m", "stream": true}}"#
            ),
        };
        Bytes::from(body)
    }
}

/// Requests per second and sorted latencies (µs) of `clients` concurrent clients for `seconds`.
async fn measure(
    target: &Target,
    kind: Kind,
    body: &Bytes,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut connections = Vec::new();
    for _ in 0..clients {
        let mut client = Client::connect(target).await?;
        // Warm up the connection (and, the first time, load the model).
        let (status, body) = client
            .raw(Method::POST, kind.path(), Some(body.clone()))
            .await?;
        if status != 200 {
            bail!(
                "{} answered {status}: {}",
                kind.path(),
                String::from_utf8_lossy(&body)
            );
        }
        connections.push(client);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for mut client in connections {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let (status, _) = client
                    .raw(Method::POST, kind.path(), Some(body.clone()))
                    .await?;
                if status != 200 {
                    bail!("{} answered {status}", kind.path());
                }
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((all.len() as f64 / elapsed, all))
}

/// Runs the scenario.
pub async fn run(options: &Options, dir: &Path, printer: &mut Printer) -> anyhow::Result<()> {
    let upstream = free_port()?;
    let upstream_proc = start_upstream(dir, upstream, options)?;
    let pool = dir.join("pool.yaml");
    std::fs::write(
        &pool,
        format!(
            "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata:\n  name: bench\nspec:\n  driver: {{kind: Http, url: \"http://{upstream}\"}}\n  policy:\n    mode: Cache\n    idleTTL: 1h\n  models:\n    - name: m\n      ram: 1Mi\n"
        ),
    )?;
    let proxy = free_port()?;
    let listen = proxy.to_string();
    let sidecar = Sidecar::start_with(
        dir,
        &pool,
        None,
        None,
        &["--proxy-listen", &listen, "--no-nvml"],
    )
    .await?;
    crate::http::wait_connectable(&Target::Tcp(proxy), Duration::from_secs(10))
        .await
        .context("the proxy did not listen")?;
    let direct = Target::Tcp(upstream);
    let through = Target::Tcp(proxy);
    let slices = options.slices.max(1);
    let slice = options.seconds / slices as f64;
    let tick_us = 1e6 / clock_ticks_per_second() as f64;
    let sidecar_pid = sidecar.proc.pid();
    let upstream_pid = upstream_proc.pid();
    for kind in [Kind::Small, Kind::Stream] {
        let body = kind.body(options.prompt_bytes);
        for &clients in &options.clients {
            let (mut base_n, mut base_lat, mut n, mut lat) = (0.0, Vec::new(), 0.0, Vec::new());
            let mut slice_added_p99 = Vec::with_capacity(slices);
            let (mut upstream_cpu, mut sidecar_cpu) = (CpuSpent::default(), CpuSpent::default());
            for _ in 0..slices {
                let before = cpu_ticks(upstream_pid)?;
                let (ops, l) = measure(&direct, kind, &body, clients, slice).await?;
                upstream_cpu.add(cpu_ticks(upstream_pid)?.saturating_sub(before), l.len());
                base_n += ops * slice;
                let direct_p99 = percentile(&l, 99.0);
                base_lat.extend(l);
                let before = cpu_ticks(sidecar_pid)?;
                let (ops, l) = measure(&through, kind, &body, clients, slice).await?;
                sidecar_cpu.add(cpu_ticks(sidecar_pid)?.saturating_sub(before), l.len());
                n += ops * slice;
                slice_added_p99.push(percentile(&l, 99.0) - direct_p99);
                lat.extend(l);
            }
            let (slice_median, slice_low, slice_high) = median_with_interval(slice_added_p99);
            base_lat.sort_by(f64::total_cmp);
            lat.sort_by(f64::total_cmp);
            let base_ops = base_n / options.seconds;
            let ops = n / options.seconds;
            let sidecar_us = sidecar_cpu.us_per_request(tick_us);
            let upstream_us = upstream_cpu.us_per_request(tick_us);
            printer.row(
                &Row::new("proxy")
                    .with("kind", kind.name())
                    .with("clients", clients)
                    .with("work_us", options.work_us)
                    .with("body_bytes", body.len())
                    .num("req_per_s", ops, 4)
                    .num("p50_us", percentile(&lat, 50.0), 3)
                    .num("p99_us", percentile(&lat, 99.0), 3)
                    .num("direct_req_per_s", base_ops, 4)
                    .num("direct_p50_us", percentile(&base_lat, 50.0), 3)
                    .num("direct_p99_us", percentile(&base_lat, 99.0), 3)
                    .num("ratio_to_direct", ops / base_ops, 3)
                    .num(
                        "added_p99_us",
                        percentile(&lat, 99.0) - percentile(&base_lat, 99.0),
                        3,
                    )
                    .num("added_p99_slice_median_us", slice_median, 3)
                    .num("added_p99_slice_low_us", slice_low, 3)
                    .num("added_p99_slice_high_us", slice_high, 3)
                    .num("sidecar_cpu_us_per_request", sidecar_us, 3)
                    .num("upstream_cpu_us_per_request", upstream_us, 3)
                    .num("sidecar_cpu_to_upstream", sidecar_us / upstream_us, 3)
                    .with("requests", lat.len()),
            );
        }
    }
    drop(sidecar);
    Ok(())
}

/// CPU clock ticks a process spent over some slices, and the requests answered in them.
#[derive(Default)]
struct CpuSpent {
    ticks: u64,
    requests: usize,
}

impl CpuSpent {
    fn add(&mut self, ticks: u64, requests: usize) {
        self.ticks += ticks;
        self.requests += requests;
    }

    /// µs of CPU per request (NaN when no request was answered).
    fn us_per_request(&self, tick_us: f64) -> f64 {
        if self.requests == 0 {
            return f64::NAN;
        }
        self.ticks as f64 * tick_us / self.requests as f64
    }
}

/// The median of `values` and a distribution-free 95 % confidence interval for it (the
/// order statistics that the binomial distribution puts the median between, as in a sign
/// test): `(median, low, high)`, the interval NaN with fewer than 6 values (no pair of order
/// statistics covers 95 % then).
///
/// The per-slice added p99 is judged this way because the p99 of a whole run is the tail of
/// its worst slices: on a shared machine one stall of the host in a direct slice or a proxied
/// one moves it by milliseconds either way, while the median of the paired slices (each
/// proxied slice against the direct slice just before it) does not move with a few of them.
pub fn median_with_interval(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    // The largest k with P(Binomial(n, 1/2) < k) <= 2.5 %: the median lies between the k-th
    // smallest and the k-th largest value with at least 95 % confidence.
    let mut below = 0.0;
    let mut k = 0;
    for i in 0..n {
        below += binomial_half(n, i);
        if below > 0.025 {
            break;
        }
        k = i + 1;
    }
    if k == 0 {
        return (median, f64::NAN, f64::NAN);
    }
    (median, values[k - 1], values[n - k])
}

/// P(Binomial(n, 1/2) = i).
fn binomial_half(n: usize, i: usize) -> f64 {
    let mut ln_choose = 0.0;
    for j in 0..i {
        ln_choose += ((n - j) as f64).ln() - ((j + 1) as f64).ln();
    }
    (ln_choose - n as f64 * std::f64::consts::LN_2).exp()
}

#[cfg(test)]
mod tests {
    use super::median_with_interval;

    #[test]
    fn the_median_interval_uses_the_sign_test_order_statistics() {
        // n = 6: P(X < 1) = 1/64 <= 2.5 %, P(X < 2) = 7/64 > 2.5 %: the extremes.
        let (median, low, high) = median_with_interval(vec![6.0, 1.0, 5.0, 2.0, 4.0, 3.0]);
        assert_eq!((median, low, high), (3.5, 1.0, 6.0));
        // n = 20: the 6th smallest and the 6th largest (P(X <= 5) = 2.07 %, P(X <= 6) = 5.8 %).
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(median_with_interval(values), (10.5, 6.0, 15.0));
        // Too few values for a 95 % interval.
        let (median, low, high) = median_with_interval(vec![2.0, 1.0, 3.0]);
        assert_eq!(median, 2.0);
        assert!(low.is_nan() && high.is_nan());
        assert!(median_with_interval(Vec::new()).0.is_nan());
    }
}
