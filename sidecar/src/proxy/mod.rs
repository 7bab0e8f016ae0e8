//! The serving proxy (`--proxy-listen`, `spec.proxy`): the sidecar in front of the pod's
//! inference server, so that clients change nothing but the port. Each request that names a
//! model holds a lease on it for its whole life, taken through the same
//! [`Shared::acquire`](crate::shell::Shared::acquire) the API's `POST /v1/acquire` uses (room
//! made, the model loaded through the pool's driver, waiting within `acquireTimeout`), and
//! released when the answer's body ends, the client goes away, or the upstream fails.
//!
//! ```text
//!  client ─► proxy ─ detect (path, or the body's "model" read as far as needed)
//!                  ─ admit (queue ≤ maxQueue, per-model permit, lease: Shared::acquire)
//!                  ─► upstream ─► LeasedBody (streamed frame by frame) ─► client
//!                                      └─ end / error / drop ─► release
//! ```
//!
//! All requests share one session of the sidecar's own (`app: "proxy"`, the sidecar's pid,
//! heartbeated here): a session is a process with a command stream and memory readings, and
//! the proxy is one process; a lease per request is what ties the model to the request.

pub mod body;
pub mod detect;
pub mod headers;
pub mod metrics;
pub mod reply;
pub mod upstream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::Response,
};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use modelpool_crds::v1alpha1::DriverKind;
use modelpool_policy::RefusalReason;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use self::{
    body::{LeaseGuard, LeasedBody, UpstreamBody},
    detect::{ModelScan, Named, Protocol, Scan},
    headers::{copy_headers, strip_hop_by_hop},
    metrics::{Outcome, ProxyMetrics},
    reply::ProxyError,
};
use crate::{
    api::{refusal_body, wire},
    decide::LookupError,
    metrics::MetricsError,
    shell::{AcquireAnswer, Shared},
};

/// Default request body limit: 32 MiB (chat requests with images run to a few MiB).
pub const DEFAULT_BODY_LIMIT: u64 = 32 << 20;
/// Default most client connections open at once on the proxy's port.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default most requests waiting for admission at once.
pub const DEFAULT_MAX_QUEUE: usize = 1024;
/// `Retry-After` of a 429 (queue full), in seconds.
pub const RETRY_QUEUE_FULL_S: u64 = 1;
/// `Retry-After` of a 503 (no room in time, stopping), in seconds.
pub const RETRY_NO_ROOM_S: u64 = 5;

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The inference server, `http://host:port`.
    pub upstream: String,
    /// Largest request body, in bytes (413 above).
    pub body_limit: u64,
    /// Most requests waiting for admission at once (429 above).
    pub max_queue: usize,
    /// Most requests in flight per model (0: no limit); more wait their turn in the queue.
    pub model_concurrency: u32,
    /// A request body must bring its model name within this long, and then make progress at
    /// least this often (else 408); the answer streams for as long as it takes.
    pub body_timeout: Duration,
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The proxy's runtime could not start.
    #[error("its runtime could not start: {0}")]
    Runtime(#[source] std::io::Error),
    /// The upstream URL is unusable.
    #[error("--upstream {url:?} {reason}")]
    BadUpstream {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No upstream given and none in the pool.
    #[error(
        "the proxy needs --upstream URL (the pod's inference server, e.g. http://127.0.0.1:11434): the pool's driver has no url to default to"
    )]
    NoUpstream,
    /// The driver does not load models itself.
    #[error(
        "the proxy needs a driver that loads models itself (Http, KServeV2, Ollama, Vllm): with the Sdk driver the app loads them, and a proxied request has no app to load for it"
    )]
    SdkDriver,
    /// The proxy's session could not be opened.
    #[error("failed to open the proxy's session: {0}")]
    Session(#[from] LookupError),
    /// Metrics registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

struct Upstream {
    url: String,
    prefix: String,
    host: HeaderValue,
    pool: Arc<upstream::Pool>,
}

impl Upstream {
    fn new(url: &str) -> Result<Self, SetupError> {
        let bad = |reason: &str| SetupError::BadUpstream {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "must start with http:// (the server is in the same pod: https is not supported)",
            ));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("has no host"))?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("has a bad host"))?;
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Self {
            url: url.to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            host,
            pool: upstream::Pool::new(addr),
        })
    }

    /// The request target upstream, in origin form (the URL's path prefix, then the path).
    fn uri(&self, original: &Uri) -> Result<Uri, axum::http::Error> {
        let Some(path) = original.path_and_query() else {
            return Ok(Uri::from_static("/"));
        };
        if self.prefix.is_empty() {
            return Ok(Uri::from(path.clone()));
        }
        Ok(Uri::try_from(format!("{}{path}", self.prefix))?)
    }
}

/// The proxy: shared by its handlers.
pub struct Proxy {
    shared: Arc<Shared>,
    upstream: Arc<Upstream>,
    /// `Vllm` pools: each model's own server (`driver.servers`), by URL, made on first use.
    servers: Option<Mutex<HashMap<String, Arc<Upstream>>>>,
    config: ProxyConfig,
    session: RwLock<String>,
    queued: AtomicUsize,
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    metrics: ProxyMetrics,
    /// Ollama pools: `tiny:latest` is the pool's `tiny`.
    ollama_names: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn open_session(shared: &Arc<Shared>) -> Result<String, LookupError> {
    let created = shared.open_session(wire::CreateSession {
        pid: std::process::id(),
        app: Some("proxy".to_owned()),
        models: Vec::new(),
        holds: Vec::new(),
    })?;
    Ok(created.session)
}

impl Proxy {
    /// A proxy for `shared`'s pool: opens its session and registers its metrics.
    pub fn new(shared: Arc<Shared>, config: ProxyConfig) -> Result<Arc<Self>, SetupError> {
        let driver = shared.with_core(|core| core.pool().driver);
        if driver == DriverKind::Sdk {
            return Err(SetupError::SdkDriver);
        }
        let upstream = Upstream::new(&config.upstream)?;
        let metrics = ProxyMetrics::new(shared.metrics.registry())?;
        let session = open_session(&shared)?;
        tracing::info!(session, upstream = config.upstream, "proxy session opened");
        Ok(Arc::new(Self {
            ollama_names: driver == DriverKind::Ollama,
            servers: (driver == DriverKind::Vllm).then(|| Mutex::new(HashMap::new())),
            shared,
            upstream: Arc::new(upstream),
            config,
            session: RwLock::new(session),
            queued: AtomicUsize::new(0),
            permits: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    fn session(&self) -> String {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Opens a new session when `stale` is still the current one (it ended: missed
    /// heartbeats while the process stalled, say).
    fn reopen(&self, stale: &str) -> Result<String, LookupError> {
        let mut session = self.session.write().unwrap_or_else(|e| e.into_inner());
        if *session == stale {
            *session = open_session(&self.shared)?;
            tracing::warn!(old = stale, new = *session, "proxy session reopened");
        }
        Ok(session.clone())
    }

    /// Keeps the proxy's session alive until `stop`.
    pub async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = (self.shared.settings.heartbeat / 2).max(Duration::from_millis(10));
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let session = self.session();
            if let Err(LookupError::Session(_)) = self.shared.heartbeat(&session, None)
                && !self.shared.shutting_down()
                && let Err(error) = self.reopen(&session)
            {
                tracing::error!(%error, "failed to reopen the proxy session");
            }
        }
    }

    fn model_names(&self) -> Vec<String> {
        self.shared
            .with_core(|core| core.pool().models.iter().map(|m| m.name.clone()).collect())
    }

    /// Whether the pool lists `model`, the leases held now, and (`Vllm` pools) the URL of
    /// the model's own server (one lock).
    fn in_pool(&self, model: &str) -> (bool, usize, Option<String>) {
        let vllm = self.servers.is_some();
        self.shared.with_core(|core| {
            let pool = core.pool();
            (
                pool.models.iter().any(|m| m.name == model),
                core.leases().len(),
                vllm.then(|| pool.driver_servers.get(model).cloned())
                    .flatten(),
            )
        })
    }

    /// Where a request for a model goes: its own server in a `Vllm` pool, else the upstream.
    fn upstream_for(&self, server: Option<String>) -> Result<Arc<Upstream>, SetupError> {
        let (Some(servers), Some(url)) = (&self.servers, server) else {
            return Ok(Arc::clone(&self.upstream));
        };
        let mut servers = servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(upstream) = servers.get(&url) {
            return Ok(Arc::clone(upstream));
        }
        let upstream = Arc::new(Upstream::new(&url)?);
        servers.insert(url, Arc::clone(&upstream));
        Ok(upstream)
    }

    fn acquire_timeout(&self) -> Duration {
        self.shared
            .with_core(|core| core.engine().config().acquire_timeout)
    }

    fn permits_for(&self, model: &str) -> Option<Arc<Semaphore>> {
        let limit = self.config.model_concurrency;
        if limit == 0 {
            return None;
        }
        let mut permits = self.permits.lock().unwrap_or_else(|e| e.into_inner());
        Some(Arc::clone(
            permits
                .entry(model.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(limit as usize))),
        ))
    }

    /// Forwards a request that names no model, untouched and without a lease.
    async fn pass(&self, request: Request) -> Response {
        let protocol = Protocol::of_path(request.uri().path());
        let (parts, body) = request.into_parts();
        let upstream_body = UpstreamBody::new(Bytes::new(), Some(body), None, None)
            .idle_timeout(self.config.body_timeout);
        match self.send(&self.upstream, &parts, upstream_body).await {
            Ok(response) => {
                self.metrics.count("", Outcome::Passthrough);
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => {
                self.metrics.count("", Outcome::UpstreamError);
                upstream_down(&self.upstream.url, &error).into_response(protocol)
            }
        }
    }

    async fn send(
        &self,
        upstream: &Upstream,
        parts: &axum::http::request::Parts,
        body: UpstreamBody,
    ) -> Result<hyper::Response<upstream::DrivenBody>, SendError> {
        let uri = upstream
            .uri(&parts.uri)
            .map_err(|e| SendError::Build(e.to_string()))?;
        let mut request = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(axum::http::Version::HTTP_11)
            .body(body)
            .map_err(|e| SendError::Build(e.to_string()))?;
        let headers = request.headers_mut();
        copy_headers(&parts.headers, headers);
        headers.insert(header::HOST, upstream.host.clone());
        upstream
            .pool
            .send(request)
            .await
            .map_err(SendError::Upstream)
    }

    /// A request naming a model: admitted under a lease, forwarded, released at its end.
    async fn leased(
        self: &Arc<Self>,
        request: Request,
        named: Named,
        arrived: Instant,
    ) -> Response {
        let protocol = match &named {
            Named::Body(protocol) | Named::Path(protocol, _) => *protocol,
        };
        match self
            .admit_and_forward(request, named, protocol, arrived)
            .await
        {
            Ok(response) => response,
            Err((model, outcome, error)) => {
                self.metrics.count(&model, outcome);
                error.into_response(protocol)
            }
        }
    }

    async fn admit_and_forward(
        self: &Arc<Self>,
        request: Request,
        named: Named,
        protocol: Protocol,
        arrived: Instant,
    ) -> Result<Response, (String, Outcome, ProxyError)> {
        let limit = self.config.body_limit;
        let (parts, body) = request.into_parts();
        if content_length(&parts.headers).is_some_and(|length| length > limit) {
            return Err((String::new(), Outcome::TooLarge, too_large(limit)));
        }
        let (model, prefix, rest, scan) = match named {
            Named::Path(_, name) => (name, Bytes::new(), Some(body), None),
            Named::Body(_) => {
                let timeout = self.config.body_timeout;
                tokio::time::timeout(timeout, read_model(body, limit))
                    .await
                    .map_err(|_| {
                        (
                            String::new(),
                            Outcome::ClientTimeout,
                            body_too_slow(timeout),
                        )
                    })??
            }
        };
        let model = match model.strip_suffix(":latest") {
            Some(short) if self.ollama_names => short.to_owned(),
            _ => model,
        };
        let (known, held, server) = self.in_pool(&model);
        if !known {
            let names = self.model_names();
            return Err((
                String::new(),
                Outcome::UnknownModel,
                ProxyError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!(
                        "model {model:?} is not in the pool (it lists: {})",
                        names.join(", ")
                    ),
                )
                .with("model", json!(model))
                .with("models", json!(names)),
            ));
        }

        if held >= crate::api::limits::MAX_LEASES {
            return Err((
                model.clone(),
                Outcome::QueueFull,
                ProxyError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_leases",
                    format!(
                        "{held} leases are held, the sidecar's limit is {}",
                        crate::api::limits::MAX_LEASES
                    ),
                )
                .with("model", json!(model))
                .retry_after(RETRY_QUEUE_FULL_S),
            ));
        }
        // Admission: a place in the queue, the model's permit, then the lease.
        let slot = QueueSlot::enter(self).ok_or_else(|| {
            (
                model.clone(),
                Outcome::QueueFull,
                ProxyError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "model {model:?}: {} requests already wait for admission (maxQueue {})",
                        self.config.max_queue, self.config.max_queue
                    ),
                )
                .with("model", json!(model))
                .with("max_queue", json!(self.config.max_queue))
                .retry_after(RETRY_QUEUE_FULL_S),
            )
        })?;
        let permit = match self.permits_for(&model) {
            None => None,
            Some(semaphore) => {
                let timeout = self.acquire_timeout();
                match tokio::time::timeout(timeout, semaphore.acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => {
                        return Err((
                            model.clone(),
                            Outcome::Timeout,
                            ProxyError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "timeout",
                                format!(
                                    "model {model:?}: {} requests already in flight (the per-model concurrency limit) for {:.1} s (acquireTimeout)",
                                    self.config.model_concurrency,
                                    timeout.as_secs_f64()
                                ),
                            )
                            .with("model", json!(model))
                            .with("model_concurrency", json!(self.config.model_concurrency))
                            .retry_after(RETRY_NO_ROOM_S),
                        ));
                    }
                }
            }
        };
        let (session, lease, load_seconds) = self.lease(&model).await?;
        drop(slot);
        let waited = arrived.elapsed();
        self.metrics
            .wait
            .with_label_values(&[&model])
            .observe(waited.as_secs_f64());
        if let Some(seconds) = load_seconds {
            self.metrics
                .load
                .with_label_values(&[&model])
                .observe(seconds);
        }
        self.metrics.in_flight.inc();
        let mut guard = LeaseGuard {
            shared: Arc::clone(&self.shared),
            session,
            lease,
            model: model.clone(),
            metrics: self.metrics.clone(),
            permit,
            outcome: None,
        };

        let upstream_body = UpstreamBody::new(prefix, rest, Some(limit), scan)
            .idle_timeout(self.config.body_timeout);
        let cut = upstream_body.cut_off();
        let overhead_until = Instant::now();
        let upstream = match self.upstream_for(server) {
            Ok(upstream) => upstream,
            Err(error) => {
                guard.outcome = Some(Outcome::UpstreamError);
                drop(guard);
                return Ok(ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    format!("model {model:?}: its server in driver.servers is unusable: {error}"),
                )
                .with("model", json!(model))
                .into_response(protocol));
            }
        };
        let sent = self.send(&upstream, &parts, upstream_body);
        self.metrics.overhead.observe(
            overhead_until
                .saturating_duration_since(arrived)
                .saturating_sub(waited)
                .as_secs_f64(),
        );
        match sent.await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let mut response =
                    Response::from_parts(parts, Body::new(LeasedBody::new(body, guard)));
                strip_hop_by_hop(response.headers_mut());
                Ok(response)
            }
            Err(error) => {
                let (outcome, reply) = if cut.over.load(Ordering::Relaxed) {
                    (Outcome::TooLarge, too_large(limit))
                } else if cut.twice.load(Ordering::Relaxed) {
                    (Outcome::BadRequest, named_twice())
                } else if cut.slow.load(Ordering::Relaxed) {
                    (
                        Outcome::ClientTimeout,
                        body_too_slow(self.config.body_timeout),
                    )
                } else {
                    (
                        Outcome::UpstreamError,
                        upstream_down(&upstream.url, &error).with("model", json!(model)),
                    )
                };
                // Counted by the guard, which releases the lease now.
                guard.outcome = Some(outcome);
                drop(guard);
                Ok(reply.into_response(protocol))
            }
        }
    }

    /// Takes a lease on `model` through the sidecar's acquire (the API's path).
    async fn lease(
        &self,
        model: &str,
    ) -> Result<(String, String, Option<f64>), (String, Outcome, ProxyError)> {
        let fail = |outcome: Outcome, error: ProxyError| (model.to_owned(), outcome, error);
        let mut session = self.session();
        let mut answer = self.shared.acquire(&session, model, true).await;
        if let Err(LookupError::Session(_)) = answer {
            session = self
                .reopen(&session)
                .map_err(|e| fail(Outcome::ShuttingDown, stopping(&e.to_string())))?;
            answer = self.shared.acquire(&session, model, true).await;
        }
        match answer {
            Ok(AcquireAnswer::Granted {
                lease,
                load_seconds,
                ..
            }) => Ok((session, crate::decide::lease_name(lease), load_seconds)),
            Ok(AcquireAnswer::Refused(refusal)) => {
                let details = refusal_body(model, &refusal);
                let (status, code, outcome, retry) = match refusal.reason {
                    RefusalReason::UnknownModel => (
                        StatusCode::NOT_FOUND,
                        "model_not_found",
                        Outcome::UnknownModel,
                        None,
                    ),
                    RefusalReason::ExceedsCeiling => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "exceeds_ceiling",
                        Outcome::ExceedsCeiling,
                        None,
                    ),
                    RefusalReason::Unsized => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unsized",
                        Outcome::Unsized,
                        None,
                    ),
                    RefusalReason::Timeout => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        Outcome::Timeout,
                        Some(RETRY_NO_ROOM_S),
                    ),
                    RefusalReason::ShuttingDown => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        Outcome::ShuttingDown,
                        Some(RETRY_NO_ROOM_S),
                    ),
                };
                let mut error = ProxyError::new(status, code, details.message);
                error.extra = details.extra;
                error.extra.remove("decision");
                if let Some(seconds) = retry {
                    error = error.retry_after(seconds);
                }
                Err(fail(outcome, error))
            }
            Ok(AcquireAnswer::LoadFailed { message }) => Err(fail(
                Outcome::LoadFailed,
                ProxyError::new(StatusCode::BAD_GATEWAY, "load_failed", message)
                    .with("model", json!(model)),
            )),
            Ok(AcquireAnswer::Wait { message }) => Err(fail(
                Outcome::Timeout,
                ProxyError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
                    .with("model", json!(model))
                    .retry_after(RETRY_NO_ROOM_S),
            )),
            Err(LookupError::ShuttingDown) => Err(fail(
                Outcome::ShuttingDown,
                stopping("the sidecar is shutting down"),
            )),
            Err(error) => Err(fail(
                Outcome::ShuttingDown,
                stopping(&format!("the proxy's session is gone: {error}")),
            )),
        }
    }
}

/// Why a request could not be sent upstream.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("bad upstream request: {0}")]
    Build(String),
    #[error("{0}")]
    Upstream(#[from] upstream::UpstreamError),
}

fn stopping(message: &str) -> ProxyError {
    ProxyError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
        .retry_after(RETRY_NO_ROOM_S)
}

fn body_too_slow(timeout: Duration) -> ProxyError {
    ProxyError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive in time: its model name within {} ms, then some of the rest at least every {} ms (--body-timeout)",
            timeout.as_millis(),
            timeout.as_millis()
        ),
    )
}

fn too_large(limit: u64) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the request body is over the proxy's limit of {limit} bytes (--proxy-body-limit)"),
    )
    .with("limit_bytes", json!(limit))
}

fn upstream_down(upstream: &str, error: &SendError) -> ProxyError {
    let mut message = format!("the inference server at {upstream} did not answer: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ProxyError::new(StatusCode::BAD_GATEWAY, "upstream_unavailable", message)
}

/// A place in the admission queue (released when dropped).
struct QueueSlot<'a>(&'a Proxy);

impl<'a> QueueSlot<'a> {
    fn enter(proxy: &'a Proxy) -> Option<Self> {
        let max = proxy.config.max_queue;
        proxy
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        proxy.metrics.queued.inc();
        Some(Self(proxy))
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.queued.dec();
    }
}

fn named_twice() -> ProxyError {
    ProxyError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request must name its model once: the body has a second top-level \"model\" key (compared without regard to case, as Go servers read keys)",
    )
}

/// What [`read_model`] read: the name, the bytes read, the rest, and the scan (kept on the
/// rest for a second model key).
type ModelRead = (String, Bytes, Option<Body>, Option<ModelScan>);

/// Reads a body as far as its top-level `"model"`.
async fn read_model(
    mut body: Body,
    limit: u64,
) -> Result<ModelRead, (String, Outcome, ProxyError)> {
    let bad = |why: String| {
        (
            String::new(),
            Outcome::BadRequest,
            ProxyError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "the request must be a JSON object naming its model (\"model\": \"...\"): {why}"
                ),
            ),
        )
    };
    let mut scan = ModelScan::new();
    let mut read = Vec::new();
    loop {
        let Some(frame) = body.frame().await else {
            return match scan.finish() {
                Scan::Invalid(why) => Err(bad(why)),
                _ => Err(bad("it names no model".to_owned())),
            };
        };
        let frame = frame.map_err(|e| bad(format!("failed to read the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if (read.len() + data.len()) as u64 > limit {
            return Err((String::new(), Outcome::TooLarge, too_large(limit)));
        }
        read.extend_from_slice(&data);
        match scan.feed(&data) {
            Scan::More => {}
            Scan::Found(model) => return Ok((model, Bytes::from(read), Some(body), Some(scan))),
            Scan::NoModel => return Err(bad("it names no model".to_owned())),
            Scan::Invalid(why) if why.contains("twice") => {
                return Err((String::new(), Outcome::BadRequest, named_twice()));
            }
            Scan::Invalid(why) => return Err(bad(why)),
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The proxy's router: the listings it answers itself, everything else forwarded.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(handle).with_state(proxy)
}

async fn handle(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let arrived = Instant::now();
    let path = request.uri().path();
    if request.method() == Method::GET {
        if path == "/v1/models" {
            return reply::openai_models(&proxy.model_names(), "modelpool");
        }
        if path == "/api/tags" {
            return reply::ollama_tags(&proxy.model_names());
        }
    }
    match detect::route(path) {
        None => proxy.pass(request).await,
        Some(named) => proxy.leased(request, named, arrived).await,
    }
}

/// The proxy's own multi-thread runtime, `threads` workers (0: one per core, at most 4).
///
/// Apart from the API's single thread: a proxied request is a second HTTP exchange (tens of
/// µs of CPU), and requests that arrive together would otherwise wait for each other on one
/// core, and the API's acquires behind them.
pub fn runtime(threads: u16) -> Result<ProxyRuntime, SetupError> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        n => usize::from(n),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("proxy")
        .enable_all()
        .build()
        .map_err(SetupError::Runtime)?;
    Ok(ProxyRuntime {
        handle: runtime.handle().clone(),
        runtime: Some(runtime),
    })
}

/// The proxy's runtime. It lives inside the sidecar's own runtime, where dropping a tokio
/// runtime panics, so dropping this one (at shutdown, or on an early return such as the
/// proxy's port in use) shuts it down in the background instead.
#[derive(Debug)]
pub struct ProxyRuntime {
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ProxyRuntime {
    /// Where to spawn the proxy's tasks.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runtime;

    #[test]
    fn proxy_runtime_has_one_worker_per_core_up_to_four_unless_told() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default = runtime(0).expect("default runtime");
        assert_eq!(default.handle().metrics().num_workers(), cores.min(4));
        let three = runtime(3).expect("three workers");
        assert_eq!(three.handle().metrics().num_workers(), 3);
    }
}
