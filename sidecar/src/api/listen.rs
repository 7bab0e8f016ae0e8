//! Serving a router on a listener with limits, so a hostile or broken client cannot starve the
//! API: a connection cap per listener (each listener has its own accept task and its own cap,
//! so load on the metrics port never takes the API socket's room), a header timeout (a request
//! head must be complete this long after the connection opened or after its previous answer,
//! which also closes idle keep-alive connections), a body timeout (a body must arrive, and an
//! answer must drain, within it), a bounded read buffer per connection and a head size limit.
//!
//! ```text
//!  accept ──► cap reached? ── yes ─► close the oldest connection with no request under way
//!               │                     and take its room; none: 503 too_many_connections
//!               │ no: a permit, one task
//!               ▼
//!  GuardedIo (write stall timeout; hyper's bare 400/414/431 become our JSON error body)
//!    └─► hyper http1 (header timeout, head ≤ 16 KiB, read buffer ≤ 32 KiB)
//!          └─► Counted (URI ≤ 8 KiB else 414, ≤ 64 header fields else 431)
//!                └─► router (JSON bodies ≤ 64 KiB read within the body timeout, else 413/408)
//! ```
//!
//! Every refusal carries the API's error body `{"error": ..., "message": ...}`, naming the limit.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    Router,
    extract::Request,
    http::StatusCode,
    response::{IntoResponse, Response},
    serve::Listener,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, Semaphore, watch},
    task::{JoinHandle, JoinSet},
};

use super::http::ApiError;

/// Longest request target (path and query), in bytes: longer gets 414 `uri_too_long`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest request head (request line and header fields), in bytes: larger gets 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one request: more gets 431.
pub const MAX_HEADERS: usize = 64;
/// Largest read buffer a connection may grow to (hyper's default is about 400 KiB).
pub const MAX_READ_BUFFER: usize = 32 * 1024;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request head must be complete within this long of the connection opening or of the
    /// previous answer (so an idle keep-alive connection closes after it too).
    pub header_timeout: Duration,
    /// A request body must arrive within this long (else 408); an answer whose bytes make no
    /// progress for this long (a client that stopped reading) ends the connection.
    pub body_timeout: Duration,
}

/// File descriptors kept free of every listener's cap: the pool file, NVML, /proc reads,
/// driver connections, the cluster client, the log.
pub const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard one, then lowers `caps` (each listener's
/// connection cap) in proportion if together with [`FD_RESERVE`] they still exceed it, so an
/// open connection never costs the process the descriptor it needs to accept on the API
/// socket. Returns the limit when the caps had to be lowered.
pub fn fit_to_fd_limit(caps: &mut [usize]) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current;
    if let (Some(current), maximum) = (limit.current, limit.maximum)
        && maximum.is_none_or(|max| max > current)
    {
        // An unlimited hard limit: go no further than the kernel's usual nr_open.
        let target = maximum.unwrap_or(1 << 20).min(1 << 20);
        if target > current
            && setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(target),
                    maximum,
                },
            )
            .is_ok()
        {
            soft = Some(target);
        }
    }
    let soft = soft?;
    fit_caps(caps, soft)
}

fn fit_caps(caps: &mut [usize], soft: u64) -> Option<u64> {
    let total: u64 = caps.iter().map(|&c| c as u64).sum();
    let room = soft.saturating_sub(FD_RESERVE).max(caps.len() as u64);
    if total <= room {
        return None;
    }
    for cap in caps.iter_mut() {
        let scaled = (*cap as u64).saturating_mul(room) / total.max(1);
        *cap = usize::try_from(scaled.max(1)).unwrap_or(usize::MAX);
    }
    Some(soft)
}

/// Connections closed (or refused) since the process started: the trimmer's cue.
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// Hands the memory of closed connections back to the system: every `every`, when at least
/// 128 connections closed since the last pass, glibc's `malloc_trim(0)` returns the free pages
/// of every malloc arena (freed connection buffers otherwise stay in the process's RSS after a
/// burst of connections is gone). A no-op where the C library is not glibc.
pub fn spawn_trimmer(every: Duration, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = CLOSED.load(Ordering::Relaxed);
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = stopped(&mut stop) => return,
            }
            let closed = CLOSED.load(Ordering::Relaxed);
            if closed.saturating_sub(last) >= 128 {
                last = closed;
                let _ = tokio::task::spawn_blocking(trim_heap).await;
            }
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own arenas under
    // their locks; glibc documents it as thread-safe (MT-Safe).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// How a listener words the answers it writes itself, outside its router's handlers (the
/// 503 at the cap, the 408 of a late head, hyper's 400/414/431): the API's error body on the
/// API and ops listeners, the serving proxy's in its clients' protocols.
#[derive(Debug, Clone, Copy)]
pub struct Wording {
    /// The flag that sets the listener's connection cap, named in the 503.
    pub cap_flag: &'static str,
    /// The JSON body of an error, given the request's path when it is known.
    pub body: fn(&ApiError, Option<&str>) -> serde_json::Value,
}

impl Wording {
    /// The API's: `{"error": code, "message": ..., extra...}`.
    pub fn api(cap_flag: &'static str) -> Self {
        Self {
            cap_flag,
            body: api_body,
        }
    }
}

fn api_body(error: &ApiError, _path: Option<&str>) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), error.code.into());
    body.insert("message".into(), error.message.clone().into());
    body.extend(error.extra.clone());
    serde_json::Value::Object(body)
}

/// The body timeout, as a request extension read by [`super::http::JsonBody`].
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// The connection counters of the listeners (`modelpool_http_*`).
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    /// `modelpool_http_connections{listener}`.
    pub open: IntGaugeVec,
    /// `modelpool_http_connections_refused_total{listener}`.
    pub refused: IntCounterVec,
    /// `modelpool_http_timeouts_total{listener,kind}`.
    pub timeouts: IntCounterVec,
}

/// The open connections of one listener, oldest first, for choosing whom to close at the cap.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, Tracked>,
}

/// One open connection: how many of its requests are being answered, and how to close it.
#[derive(Debug, Clone, Default)]
struct Tracked {
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

impl Open {
    fn add(&mut self) -> (u64, Tracked) {
        let id = self.next;
        self.next += 1;
        let tracked = Tracked::default();
        self.conns.insert(id, tracked.clone());
        (id, tracked)
    }

    /// Closes the oldest connection with no request under way (idle, or still sending its
    /// head): at the cap, a new connection takes the room of one that is doing nothing.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .find(|(_, t)| t.busy.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        let Some(tracked) = victim.and_then(|id| self.conns.remove(&id)) else {
            return false;
        };
        tracked.close.notify_one();
        true
    }
}

/// Serves `router` on `listener` under `limits` until `stop` turns true; then open
/// connections get a graceful close and a moment to finish.
///
/// At the cap, a new connection closes the oldest connection that has no request under way
/// (idle keep-alive, or a head still arriving) and takes its place; only when every
/// connection is answering a request is the new one refused (503 `too_many_connections`).
pub fn serve<L>(
    listener: L,
    router: Router,
    limits: ListenLimits,
    metrics: ConnMetrics,
    stop: watch::Receiver<bool>,
    name: &'static str,
) -> JoinHandle<()>
where
    L: Listener,
    L::Io: Refusable,
{
    let cap_flag = if name == "ops" {
        "--metrics-max-connections"
    } else {
        "--max-connections"
    };
    serve_worded(
        listener,
        router,
        limits,
        metrics,
        stop,
        name,
        Wording::api(cap_flag),
    )
}

/// [`serve`], with the answers the listener writes itself worded by `wording`.
pub fn serve_worded<L>(
    mut listener: L,
    router: Router,
    limits: ListenLimits,
    metrics: ConnMetrics,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    wording: Wording,
) -> JoinHandle<()>
where
    L: Listener,
    L::Io: Refusable,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open_conns = Arc::new(Mutex::new(Open::default()));
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        let open = metrics.open.with_label_values(&[name]);
        let refused = metrics.refused.with_label_values(&[name]);
        let evicted = metrics.timeouts.with_label_values(&[name, "evicted"]);
        loop {
            let io = tokio::select! {
                (io, _addr) = listener.accept() => io,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = stopped(&mut stop) => break,
            };
            let permit = match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let evicting = lock(&open_conns).evict_idle();
                    if evicting {
                        evicted.inc();
                        // The evicted task ends at its next poll: its permit comes back at once.
                        tokio::time::timeout(
                            Duration::from_millis(200),
                            Arc::clone(&permits).acquire_owned(),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok)
                    } else {
                        None
                    }
                }
            };
            let Some(permit) = permit else {
                refused.inc();
                refuse(&io, name, limits.max_connections, &wording);
                drop(io);
                CLOSED.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let router = router.clone();
            let stop = stop.clone();
            let open = open.clone();
            let timeouts = metrics.timeouts.clone();
            let open_conns = Arc::clone(&open_conns);
            let (id, tracked) = lock(&open_conns).add();
            connections.spawn(async move {
                open.inc();
                tokio::select! {
                    () = connection(io, router, &tracked.busy, limits, stop, name, &timeouts, wording) => {}
                    () = tracked.close.notified() => {}
                }
                lock(&open_conns).conns.remove(&id);
                open.dec();
                CLOSED.fetch_add(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        // Stopping: connections were asked to close gracefully; give them a moment, then
        // drop the rest (a long poll ends at its deadline anyway).
        let drain = tokio::time::sleep(Duration::from_millis(1500));
        tokio::pin!(drain);
        while !connections.is_empty() {
            tokio::select! {
                _ = connections.join_next() => {}
                _ = &mut drain => break,
            }
        }
        connections.abort_all();
    })
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a connection's requests under way (from the head parsed to the answer's body sent:
/// a streamed answer keeps its connection busy, never closed as idle at the cap).
struct BusyGuard(Arc<AtomicUsize>);

impl BusyGuard {
    fn new(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(busy))
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router as hyper's service: counts requests under way, refuses an over-long request
/// target or too many header fields, and hands the body timeout to the body extractors.
///
/// The checks live here rather than in router layers: a layer on a `Router` wraps every
/// route in a boxed, cloned service per request, which cost about 10 000 instructions a
/// request (a third of an acquire's cost in the sidecar; measured with callgrind).
#[derive(Clone)]
struct Counted {
    inner: hyper_util::service::TowerToHyperService<Router>,
    busy: Arc<AtomicUsize>,
    body_timeout: BodyTimeout,
    wording: Wording,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Counted {
    type Response = Response<BusyBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        if let Some(error) = uri_too_long(&req).or_else(|| too_many_headers(&req)) {
            let body = (self.wording.body)(&error, Some(req.uri().path()));
            let answer = (error.status, axum::Json(body)).into_response();
            return Box::pin(std::future::ready(Ok(
                answer.map(|inner| BusyBody { inner, guard: None })
            )));
        }
        req.extensions_mut().insert(self.body_timeout);
        let guard = BusyGuard::new(&self.busy);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|inner| BusyBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// An answer's body, keeping its connection counted busy until its last frame.
struct BusyBody {
    inner: axum::body::Body,
    guard: Option<BusyGuard>,
}

impl hyper::body::Body for BusyBody {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Writes the 503 for a connection over the cap without waiting (the answer is far smaller
/// than a socket's send buffer; if it does not fit, the client sees the connection close).
fn refuse<T: Refusable>(io: &T, name: &str, max: usize, wording: &Wording) {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!(
            "the {name} listener already has {max} open connections, its limit ({}); close idle connections or try again shortly",
            wording.cap_flag
        ),
    );
    let _ = io.try_write_now(&raw_response(
        &error,
        wording,
        None,
        &[("retry-after", "1")],
    ));
}

/// A socket that can be written without waiting.
pub trait Refusable {
    /// `try_write`: writes what fits now.
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize>;
}

impl Refusable for tokio::net::TcpStream {
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }
}

impl Refusable for tokio::net::UnixStream {
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write(buf)
    }
}

#[allow(clippy::too_many_arguments)] // one call site: the accept loop
async fn connection<T>(
    io: T,
    router: Router,
    busy: &Arc<AtomicUsize>,
    limits: ListenLimits,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    timeouts: &IntCounterVec,
    wording: Wording,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = Counted {
        inner: hyper_util::service::TowerToHyperService::new(router),
        busy: Arc::clone(busy),
        body_timeout: BodyTimeout(limits.body_timeout),
        wording,
    };
    let io = TokioIo::new(GuardedIo::new(io, limits.body_timeout, wording));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_READ_BUFFER)
        .max_header_size(MAX_HEAD_BYTES)
        .writev(false);
    let mut conn = builder.serve_connection(io, service);
    let result = tokio::select! {
        result = &mut conn => result,
        () = stopped(&mut stop) => {
            Pin::new(&mut conn).graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(1), &mut conn).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    let Err(error) = result else { return };
    if error.is_timeout() {
        // The header timeout. With part of a head received, say why before closing; an idle
        // keep-alive connection is closed silently (a client may have just reused it).
        let parts = conn.into_parts();
        if parts.read_buf.is_empty() {
            timeouts.with_label_values(&[name, "idle"]).inc();
            return;
        }
        timeouts.with_label_values(&[name, "header"]).inc();
        let error = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request head was not complete within {} ms (--header-timeout)",
                limits.header_timeout.as_millis()
            ),
        );
        // The path, when the request line arrived whole.
        let path = std::str::from_utf8(&parts.read_buf)
            .ok()
            .and_then(|head| head.split_once("\r\n"))
            .and_then(|(line, _)| line.split(' ').nth(1));
        let response = raw_response(&error, &wording, path, &[]);
        let mut io = parts.io.into_inner();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncWriteExt;
            io.write_all(&response).await?;
            io.shutdown().await
        })
        .await;
    } else if error
        .source_io()
        .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
    {
        timeouts.with_label_values(&[name, "write"]).inc();
        tracing::debug!(
            listener = name,
            "a client stopped reading its answer: connection closed"
        );
    } else {
        tracing::debug!(listener = name, %error, "connection ended with an error");
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

trait SourceIo {
    fn source_io(&self) -> Option<&io::Error>;
}

impl SourceIo for hyper::Error {
    fn source_io(&self) -> Option<&io::Error> {
        let mut source = std::error::Error::source(self);
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<io::Error>() {
                return Some(io);
            }
            source = error.source();
        }
        None
    }
}

/// The 431 error for a request with more than [`MAX_HEADERS`] header fields.
///
/// Counted here, not by hyper's `max_headers`: with that set hyper builds a heap array of that
/// many header slots for every request (callgrind: 1 400 instructions a request). Without it
/// hyper stops at its own default of 100 fields (answered by [`bare_parse_error`]).
fn too_many_headers<B>(req: &Request<B>) -> Option<ApiError> {
    let fields = req.headers().len();
    (fields > MAX_HEADERS).then(|| {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {fields} header fields, over the limit of {MAX_HEADERS} header fields"
            ),
        )
    })
}

/// The 414 `uri_too_long` error for a request target over [`MAX_URI_BYTES`].
fn uri_too_long<B>(req: &Request<B>) -> Option<ApiError> {
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    (len > MAX_URI_BYTES).then(|| {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {len} bytes, over the limit of {MAX_URI_BYTES} bytes"),
        )
    })
}

/// An error as raw HTTP/1.1 bytes (for answers written outside hyper), closing the connection.
fn raw_response(
    error: &ApiError,
    wording: &Wording,
    path: Option<&str>,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let body = (wording.body)(error, path).to_string();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    for (name, value) in extra {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

/// hyper answers a request it cannot parse by itself, with an empty body (`400`, `414`,
/// `431`), and closes the connection. Such an answer, and only such, is recognised here: the
/// API's own answers always carry a JSON body.
fn bare_parse_error(buf: &[u8]) -> Option<ApiError> {
    // Every answer's write passes here: rule out the API's own answers by their first bytes.
    if !matches!(buf.get(9..11), Some(b"40" | b"41" | b"43")) {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let rest = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))?;
    if !head.ends_with("\r\n\r\n") || head.matches("\r\n\r\n").count() != 1 {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if !lower.contains("\r\ncontent-length: 0\r\n") || lower.contains("\r\ncontent-type:") {
        return None;
    }
    Some(match rest.get(..4)? {
        "400 " => ApiError::bad_request(
            "malformed HTTP request: the request line or a header field could not be parsed",
        ),
        "414 " => ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is over the limit of {MAX_URI_BYTES} bytes"),
        ),
        "431 " => ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request head is over the limit of {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header fields"
            ),
        ),
        _ => return None,
    })
}

/// The connection's socket, as hyper sees it: writes that make no progress for the stall
/// timeout fail (`TimedOut`), and hyper's bare parse-error answers are replaced by the API's
/// JSON error body.
struct GuardedIo<T> {
    inner: T,
    stall: Duration,
    wording: Wording,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A replacement answer being written, and how many bytes of hyper's to report once done.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<T> GuardedIo<T> {
    fn new(inner: T, stall: Duration, wording: Wording) -> Self {
        Self {
            inner,
            stall,
            wording,
            timer: None,
            replacing: None,
        }
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let stall = self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of the answer for {} ms",
                    stall.as_millis()
                ),
            ));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_none()
            && let Some(error) = bare_parse_error(buf)
        {
            this.replacing = Some((raw_response(&error, &this.wording, None, &[]), 0, buf.len()));
        }
        if let Some((bytes, written, claimed)) = &mut this.replacing {
            while *written < bytes.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        *written += n;
                        this.timer = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.stalled(cx)?;
                        return Poll::Pending;
                    }
                }
            }
            let claimed = *claimed;
            // Anything hyper writes after its error answer is not sent.
            this.replacing = Some((Vec::new(), 0, usize::MAX));
            return Poll::Ready(Ok(claimed.min(buf.len())));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                this.stalled(cx)?;
                Poll::Pending
            }
            ready => {
                this.timer = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => {
                this.stalled(cx)?;
                Poll::Pending
            }
            ready => {
                this.timer = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bare_errors_are_recognised_and_ours_are_not() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 17:00:00 GMT\r\n\r\n";
        let error = bare_parse_error(bare).unwrap();
        assert_eq!(error.code, "headers_too_large");
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(bare_parse_error(bare).unwrap().code, "bad_request");
        let bare = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(bare_parse_error(bare).unwrap().code, "uri_too_long");
        let ours = raw_response(
            &ApiError::bad_request("field \"pid\""),
            &Wording::api("--max-connections"),
            None,
            &[],
        );
        assert!(bare_parse_error(&ours).is_none());
        // A 204 or an empty 200 of the API's is left alone.
        assert!(bare_parse_error(b"HTTP/1.1 204 No Content\r\n\r\n").is_none());
        assert!(bare_parse_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        // Two answers in one write (pipelining) are not rewritten.
        assert!(
            bare_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").is_none()
        );
    }

    /// A client that stops reading: the answer's write fails after the stall timeout instead
    /// of holding the connection (and its buffers) forever.
    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        use tokio::io::AsyncWriteExt;
        let (near, _far) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(
            near,
            Duration::from_millis(50),
            Wording::api("--max-connections"),
        );
        let error = io.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("50 ms"), "{error}");
    }

    #[test]
    fn caps_fit_under_the_fd_limit() {
        let mut caps = [512, 64];
        assert_eq!(fit_caps(&mut caps, 20_000), None);
        assert_eq!(caps, [512, 64]);
        // ulimit -n 256: 192 descriptors for connections, shared in proportion.
        assert_eq!(fit_caps(&mut caps, 256), Some(256));
        assert_eq!(caps, [170, 21]);
        assert!(caps.iter().sum::<usize>() as u64 + FD_RESERVE <= 256);
        let mut caps = [512, 512, 64];
        fit_caps(&mut caps, 10);
        assert_eq!(caps, [1, 1, 1], "never zero");
    }

    #[test]
    fn raw_answers_carry_the_api_error_body() {
        let bytes = raw_response(
            &ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "full",
            ),
            &Wording::api("--max-connections"),
            None,
            &[("retry-after", "1")],
        );
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("retry-after: 1"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "too_many_connections");
        assert_eq!(body["message"], "full");
    }
}
