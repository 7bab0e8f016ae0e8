//! The proxy's metrics, in the sidecar's registry (rendered on the same `/metrics`).
//! Labels are bounded: `model` is a pool model or `""` (a request naming no model, or one not
//! in the pool), `outcome` one of [`Outcome`]'s names.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::MetricsError;

/// How a proxied request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream's answer was delivered whole (whatever its status).
    Ok,
    /// Named no model: forwarded without a lease.
    Passthrough,
    /// The client went away before the answer was delivered.
    ClientGone,
    /// The upstream could not be reached or failed mid-answer (502).
    UpstreamError,
    /// The model is not in the pool (404).
    UnknownModel,
    /// The body is over the limit (413).
    TooLarge,
    /// The body names no model, or not as a string (400).
    BadRequest,
    /// The request body did not arrive in time (408).
    ClientTimeout,
    /// The admission queue is full (429).
    QueueFull,
    /// No room within the acquire timeout (503).
    Timeout,
    /// The model can never fit under the ceiling (503).
    ExceedsCeiling,
    /// The model's size is unknown and the pool refuses such models (503).
    Unsized,
    /// The driver's load failed, or the server does not answer (502).
    LoadFailed,
    /// The sidecar is stopping (503).
    ShuttingDown,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Passthrough => "passthrough",
            Self::ClientGone => "client_gone",
            Self::UpstreamError => "upstream_error",
            Self::UnknownModel => "unknown_model",
            Self::TooLarge => "too_large",
            Self::BadRequest => "bad_request",
            Self::ClientTimeout => "client_timeout",
            Self::QueueFull => "queue_full",
            Self::Timeout => "timeout",
            Self::ExceedsCeiling => "exceeds_ceiling",
            Self::Unsized => "unsized",
            Self::LoadFailed => "load_failed",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// A refusal by the pool (what the sustained-refusals alert counts).
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Self::QueueFull
                | Self::Timeout
                | Self::ExceedsCeiling
                | Self::Unsized
                | Self::ShuttingDown
        )
    }
}

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// `modelpool_proxy_requests_total{model,outcome}`.
    pub requests: IntCounterVec,
    /// `modelpool_proxy_wait_seconds{model}`: from arrival to the lease (queue, room, load).
    pub wait: HistogramVec,
    /// `modelpool_proxy_load_seconds{model}`: loads made on a request's path.
    pub load: HistogramVec,
    /// `modelpool_proxy_overhead_seconds`: the proxy's own time before the request goes
    /// upstream (reading the model name, admission bookkeeping), waiting for the lease excluded.
    pub overhead: prometheus::Histogram,
    /// `modelpool_proxy_in_flight`: requests holding a lease now.
    pub in_flight: IntGauge,
    /// `modelpool_proxy_queue_length`: requests waiting for admission now.
    pub queued: IntGauge,
}

impl ProxyMetrics {
    /// Registers the proxy's metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let waits = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let overheads = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
        ];
        macro_rules! reg {
            ($metric:expr) => {{
                let metric = $metric?;
                registry.register(Box::new(metric.clone()))?;
                metric
            }};
        }
        Ok(Self {
            requests: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_proxy_requests_total",
                    "Requests through the serving proxy, by model and outcome (ok, passthrough, client_gone, upstream_error, unknown_model, too_large, bad_request, client_timeout, queue_full, timeout, exceeds_ceiling, load_failed, shutting_down)."
                ),
                &["model", "outcome"]
            )),
            wait: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "modelpool_proxy_wait_seconds",
                    "Time a proxied request waited for its lease (queue, room, load), in seconds."
                )
                .buckets(waits.clone()),
                &["model"]
            )),
            load: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "modelpool_proxy_load_seconds",
                    "Time loading a model on a proxied request's path, in seconds."
                )
                .buckets(waits),
                &["model"]
            )),
            overhead: reg!(prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "modelpool_proxy_overhead_seconds",
                    "The proxy's own time before a request goes upstream (reading the model name, admission), waiting for the lease excluded, in seconds."
                )
                .buckets(overheads)
            )),
            in_flight: reg!(IntGauge::new(
                "modelpool_proxy_in_flight",
                "Proxied requests holding a lease now."
            )),
            queued: reg!(IntGauge::new(
                "modelpool_proxy_queue_length",
                "Proxied requests waiting for admission now."
            )),
        })
    }

    /// Counts one request's end.
    pub fn count(&self, model: &str, outcome: Outcome) {
        self.requests
            .with_label_values(&[model, outcome.as_str()])
            .inc();
    }
}
