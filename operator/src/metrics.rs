//! The operator's own metrics, and a client layer that counts every apiserver request.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Metrics of one operator process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result (`ok`, `error`, `draining`).
    pub reconciles: IntCounterVec,
    /// Reconcile durations.
    pub reconcile_duration: Histogram,
    /// Pools seen.
    pub pools: IntGauge,
    /// Pods governed by some pool.
    pub pods_managed: IntGauge,
    /// Requests sent to the apiserver, by verb.
    pub api_requests: IntCounterVec,
    /// Status writes (a reconcile that changes nothing writes nothing).
    pub status_writes: prometheus::IntCounter,
    /// Pods admitted by the webhook, by outcome.
    pub admissions: IntCounterVec,
    /// 1 while this replica leads.
    pub leader: IntGauge,
    /// Pods deleted because their memory was not reclaimed (`enforcement: Restart`).
    pub pod_restarts: prometheus::IntCounter,
    /// Per pool, selected pods that run without the sidecar.
    pub pods_without_sidecar: prometheus::IntGaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "modelpool_operator_reconciles_total",
                "Reconciles of ModelPools, by result.",
            ),
            &["result"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "modelpool_operator_reconcile_duration_seconds",
                "Time one reconcile of a ModelPool took.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )?;
        let pools = IntGauge::new(
            "modelpool_operator_pools",
            "ModelPools the operator knows of.",
        )?;
        let pods_managed = IntGauge::new(
            "modelpool_operator_pods_managed",
            "Pods governed by a ModelPool.",
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "modelpool_operator_api_requests_total",
                "Requests the operator sent to the apiserver, by HTTP verb (watch for watches).",
            ),
            &["verb"],
        )?;
        let status_writes = prometheus::IntCounter::new(
            "modelpool_operator_status_writes_total",
            "ModelPool status writes (server-side apply).",
        )?;
        let admissions = IntCounterVec::new(
            Opts::new(
                "modelpool_operator_admissions_total",
                "Pods seen by the injection webhook, by outcome.",
            ),
            &["outcome"],
        )?;
        let leader = IntGauge::new(
            "modelpool_operator_leader",
            "1 while this replica is the leader.",
        )?;
        let pod_restarts = prometheus::IntCounter::new(
            "modelpool_operator_pod_restarts_total",
            "Pods deleted for their controller to recreate, because memory was not reclaimed after an unload (enforcement: Restart).",
        )?;
        let pods_without_sidecar = prometheus::IntGaugeVec::new(
            Opts::new(
                "modelpool_operator_pods_without_sidecar",
                "Pods a ModelPool selects that run without the sidecar (admitted while the webhook was unreachable with failurePolicy Ignore, or before the pool existed): nothing limits them.",
            ),
            &["namespace", "pool"],
        )?;
        // Every result exists from the start, so graphs and alerts see zeros, not gaps.
        for result in ["ok", "invalid", "write_status", "finalizer", "draining"] {
            reconciles.with_label_values(&[result]);
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(pools.clone()))?;
        registry.register(Box::new(pods_managed.clone()))?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(status_writes.clone()))?;
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(pod_restarts.clone()))?;
        registry.register(Box::new(pods_without_sidecar.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            pools,
            pods_managed,
            api_requests,
            status_writes,
            admissions,
            leader,
            pod_restarts,
            pods_without_sidecar,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Counts each request by verb before it goes out.
#[derive(Clone)]
pub struct CountRequests(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service of [`CountRequests`].
pub struct Counted<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let verb = if watch {
            "watch".to_owned()
        } else {
            request.method().as_str().to_lowercase()
        };
        self.metrics
            .api_requests
            .with_label_values(&[verb.as_str()])
            .inc();
        Box::pin(self.inner.call(request))
    }
}
