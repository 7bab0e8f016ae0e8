//! The sidecar's Prometheus metrics: one registry owned by [`Metrics`], rendered by the text
//! encoder on `GET /metrics`. Names follow DESIGN section 4: `modelpool_` prefix, base units,
//! bounded labels (model names come from the pool, reasons and outcomes from fixed sets).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why metrics could not be set up (a name or label clash: a bug).
#[derive(Debug, thiserror::Error)]
#[error("failed to register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric the sidecar exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `modelpool_pool_info{pool,namespace,mode}`.
    pub pool_info: IntGaugeVec,
    /// `modelpool_gpu_up`.
    pub gpu_up: IntGauge,
    /// `modelpool_vram_total_bytes{gpu,uuid}`.
    pub vram_total: GaugeVec,
    /// `modelpool_vram_used_bytes{gpu,uuid}`.
    pub vram_used: GaugeVec,
    /// `modelpool_ram_used_bytes`.
    pub ram_used: Gauge,
    /// `modelpool_ram_limit_bytes`.
    pub ram_limit: Gauge,
    /// `modelpool_pool_bytes{resource}`.
    pub pool_bytes: GaugeVec,
    /// `modelpool_ceiling_bytes{resource}`.
    pub ceiling_bytes: GaugeVec,
    /// `modelpool_lost_bytes{resource}`.
    pub lost_bytes: GaugeVec,
    /// `modelpool_model_loaded{model}`.
    pub model_loaded: IntGaugeVec,
    /// `modelpool_model_bytes{model,resource}`.
    pub model_bytes: GaugeVec,
    /// `modelpool_model_leases{model}`.
    pub model_leases: IntGaugeVec,
    /// `modelpool_loads_total{model,outcome}`.
    pub loads: IntCounterVec,
    /// `modelpool_unloads_total{model,reason}`.
    pub unloads: IntCounterVec,
    /// `modelpool_load_duration_seconds{model}`.
    pub load_duration: HistogramVec,
    /// `modelpool_reclaim_duration_seconds`.
    pub reclaim_duration: Histogram,
    /// `modelpool_acquire_wait_seconds`.
    pub acquire_wait: Histogram,
    /// `modelpool_acquires_refused_total{reason}`.
    pub acquires_refused: IntCounterVec,
    /// `modelpool_memory_not_reclaimed_total`.
    pub memory_not_reclaimed: IntCounter,
    /// `modelpool_ceiling_breaches_total{resource}`.
    pub ceiling_breaches: IntCounterVec,
    /// `modelpool_sessions`.
    pub sessions: IntGauge,
    /// `modelpool_acquire_queue_length`.
    pub acquire_queue: IntGauge,
    /// `modelpool_pool_reloads_total{outcome}`.
    pub pool_reloads: IntCounterVec,
    /// `modelpool_measure_duration_seconds`.
    pub measure_duration: Histogram,
}

/// The two resources, as label values.
pub const RESOURCES: [&str; 2] = ["vram", "ram"];

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let duration_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ];
        macro_rules! reg {
            ($metric:expr) => {{
                let metric = $metric?;
                registry.register(Box::new(metric.clone()))?;
                metric
            }};
        }
        let metrics = Self {
            pool_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "modelpool_pool_info",
                    "The pool this sidecar enforces (always 1); labels name it for dashboards."
                ),
                &["pool", "namespace", "mode"]
            )),
            gpu_up: reg!(IntGauge::new(
                "modelpool_gpu_up",
                "1 when a GPU reading is available (NVML, CUDA or the app), 0 otherwise."
            )),
            vram_total: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_vram_total_bytes",
                    "Installed GPU memory per device, in bytes."
                ),
                &["gpu", "uuid"]
            )),
            vram_used: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_vram_used_bytes",
                    "GPU memory in use per device by all processes, in bytes."
                ),
                &["gpu", "uuid"]
            )),
            ram_used: reg!(Gauge::new(
                "modelpool_ram_used_bytes",
                "Host memory in use by the pod (cgroup) or machine, in bytes."
            )),
            ram_limit: reg!(Gauge::new(
                "modelpool_ram_limit_bytes",
                "The pod's host memory limit (cgroup), or the machine's memory without one, in bytes."
            )),
            pool_bytes: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_pool_bytes",
                    "Memory held by the pool's models in this pod (measured where possible), in bytes."
                ),
                &["resource"]
            )),
            ceiling_bytes: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_ceiling_bytes",
                    "The pool's per-pod ceiling, in bytes (absent when the pool sets none)."
                ),
                &["resource"]
            )),
            lost_bytes: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_lost_bytes",
                    "Memory of unloaded models not yet seen returned after the reclaim timeout, in bytes."
                ),
                &["resource"]
            )),
            model_loaded: reg!(IntGaugeVec::new(
                Opts::new(
                    "modelpool_model_loaded",
                    "Number of app processes in this pod holding the model (0 when unloaded)."
                ),
                &["model"]
            )),
            model_bytes: reg!(GaugeVec::new(
                Opts::new(
                    "modelpool_model_bytes",
                    "Memory the model holds in this pod (measured, else declared), in bytes."
                ),
                &["model", "resource"]
            )),
            model_leases: reg!(IntGaugeVec::new(
                Opts::new(
                    "modelpool_model_leases",
                    "Live leases on the model in this pod."
                ),
                &["model"]
            )),
            loads: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_loads_total",
                    "Model loads finished, by outcome (ok, failed)."
                ),
                &["model", "outcome"]
            )),
            unloads: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_unloads_total",
                    "Model unloads requested, by reason (released, idle_ttl, pressure, evicted, cleanup, ceiling, shutdown, session_gone, app)."
                ),
                &["model", "reason"]
            )),
            load_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "modelpool_load_duration_seconds",
                    "Time to load a model, from the load decision to the loaded report, in seconds."
                )
                .buckets(duration_buckets.clone()),
                &["model"]
            )),
            reclaim_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "modelpool_reclaim_duration_seconds",
                    "Time from an unload request until its memory was seen returned, in seconds."
                )
                .buckets(duration_buckets.clone())
            )),
            acquire_wait: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "modelpool_acquire_wait_seconds",
                    "Time an acquire waited for room before its answer, in seconds."
                )
                .buckets(duration_buckets.clone())
            )),
            acquires_refused: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_acquires_refused_total",
                    "Acquires refused, by reason (exceeds_ceiling, timeout, unknown_model, load_failed, shutting_down)."
                ),
                &["reason"]
            )),
            memory_not_reclaimed: reg!(IntCounter::new(
                "modelpool_memory_not_reclaimed_total",
                "Unloads whose memory was not seen returned within the reclaim timeout."
            )),
            ceiling_breaches: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_ceiling_breaches_total",
                    "Times measured usage of the pool's models went above a ceiling."
                ),
                &["resource"]
            )),
            sessions: reg!(IntGauge::new(
                "modelpool_sessions",
                "App sessions currently open."
            )),
            acquire_queue: reg!(IntGauge::new(
                "modelpool_acquire_queue_length",
                "Acquires waiting for room."
            )),
            pool_reloads: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_pool_reloads_total",
                    "Pool file reloads, by outcome (ok, invalid)."
                ),
                &["outcome"]
            )),
            measure_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "modelpool_measure_duration_seconds",
                    "Time one measurement pass (NVML, cgroup, /proc) took, in seconds."
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
                ])
            )),
            registry,
        };
        // Series that should exist from the start, so rate() and alerts see a zero.
        for resource in RESOURCES {
            metrics.ceiling_breaches.with_label_values(&[resource]);
            metrics.pool_bytes.with_label_values(&[resource]).set(0.0);
            metrics.lost_bytes.with_label_values(&[resource]).set(0.0);
        }
        for outcome in ["ok", "invalid"] {
            metrics.pool_reloads.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "failed to encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_and_types() {
        let metrics = Metrics::new().unwrap();
        metrics.gpu_up.set(0);
        metrics.loads.with_label_values(&["t2v", "ok"]).inc();
        let text = metrics.render();
        assert!(text.contains("# HELP modelpool_gpu_up "));
        assert!(text.contains("# TYPE modelpool_loads_total counter"));
        assert!(text.contains("modelpool_loads_total{model=\"t2v\",outcome=\"ok\"} 1"));
    }
}
