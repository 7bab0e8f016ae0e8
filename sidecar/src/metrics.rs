//! The sidecar's Prometheus metrics. Names follow DESIGN section 4: `modelpool_` prefix, base
//! units, bounded labels (model names come from the pool, reasons and outcomes from fixed sets).
//!
//! Two kinds, rendered together on `GET /metrics`:
//! - events (counters, histograms, the acquire queue): atomics in one registry, updated where
//!   they happen, rendered by the text encoder;
//! - levels (pool, devices, models, sessions): a [`Gauges`] snapshot the caller takes under one
//!   lock at scrape time, rendered here. Nothing resets or refills a family between scrapes, so
//!   a scrape always sees whole families of one moment, and API calls pay nothing for them.

use std::fmt::Write as _;

use modelpool_policy::{Footprint, Limits, Resource};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why metrics could not be set up (a name or label clash: a bug).
#[derive(Debug, thiserror::Error)]
#[error("failed to register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The event metrics (counters, histograms, the acquire queue). Levels come from [`Gauges`].
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
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
    /// `modelpool_reclaims_total{seen_by}`.
    pub reclaims: IntCounterVec,
    /// `modelpool_server_up{driver}` (server drivers only).
    pub server_up: IntGaugeVec,
    /// `modelpool_ceiling_breaches_total{resource}`.
    pub ceiling_breaches: IntCounterVec,
    /// `modelpool_acquire_queue_length`.
    pub acquire_queue: IntGauge,
    /// `modelpool_pool_reloads_total{outcome}`.
    pub pool_reloads: IntCounterVec,
    /// `modelpool_measure_duration_seconds`.
    pub measure_duration: Histogram,
    /// `modelpool_http_connections{listener}`, `modelpool_http_connections_refused_total{listener}`,
    /// `modelpool_http_timeouts_total{listener,kind}`.
    pub connections: crate::api::listen::ConnMetrics,
}

/// The two resources, as label values.
pub const RESOURCES: [&str; 2] = ["vram", "ram"];

impl Metrics {
    /// The registry, for metrics registered elsewhere (the proxy's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

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
                    "Model unloads requested, by reason (released, idle_ttl, pressure, evicted, cleanup, ceiling, shutdown, session_gone, server_dropped, app)."
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
                    "Acquires refused, by reason (exceeds_ceiling, timeout, unknown_model, load_failed, shutting_down, unsized)."
                ),
                &["reason"]
            )),
            reclaims: reg!(IntCounterVec::new(
                Opts::new(
                    "modelpool_reclaims_total",
                    "Unloads whose memory was seen returned, by how: proc (the process's or the model server's process tree's RSS fell), nvml, process_exit, session_gone, driver (the Http driver's answer), unverified (no reading possible: taken on the app's or server's word)."
                ),
                &["seen_by"]
            )),
            server_up: reg!(IntGaugeVec::new(
                Opts::new(
                    "modelpool_server_up",
                    "Server drivers (KServeV2, Ollama, Vllm): 1 when the model server answered the last poll of what it holds, 0 when it did not."
                ),
                &["driver"]
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
            connections: crate::api::listen::ConnMetrics {
                open: reg!(IntGaugeVec::new(
                    Opts::new(
                        "modelpool_http_connections",
                        "Open connections, by listener (api: the Unix socket, api_tcp: --listen, ops: --metrics-listen, proxy: --proxy-listen)."
                    ),
                    &["listener"]
                )),
                refused: reg!(IntCounterVec::new(
                    Opts::new(
                        "modelpool_http_connections_refused_total",
                        "Connections answered 503 too_many_connections and closed because the listener was at its connection limit."
                    ),
                    &["listener"]
                )),
                timeouts: reg!(IntCounterVec::new(
                    Opts::new(
                        "modelpool_http_timeouts_total",
                        "Connections closed by a timeout, by listener and kind (header: a request head not complete in time, idle: a keep-alive connection unused, write: a client that stopped reading its answer, evicted: a connection with no request under way closed to make room at the connection limit)."
                    ),
                    &["listener", "kind"]
                )),
            },
            registry,
        };
        // Series that should exist from the start, so rate() and alerts see a zero.
        for resource in RESOURCES {
            metrics.ceiling_breaches.with_label_values(&[resource]);
        }
        for outcome in ["ok", "invalid"] {
            metrics.pool_reloads.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    /// The Prometheus text exposition of every metric: the levels of `gauges`, then the
    /// events.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut text = gauges.render();
        let families = self.registry.gather();
        if !crate::exposition::encode(&families, &mut text) {
            let mut buffer = Vec::new();
            if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
                tracing::error!(%error, "failed to encode metrics");
            }
            text.push_str(&String::from_utf8_lossy(&buffer));
        }
        text
    }
}

/// One GPU device's reading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceGauges {
    /// Its index.
    pub index: u32,
    /// Its UUID.
    pub uuid: String,
    /// Installed bytes.
    pub total: u64,
    /// Used bytes (all processes).
    pub used: u64,
}

/// One model's levels, summed over the instances of it in this pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelGauges {
    /// The model.
    pub name: String,
    /// Instances loaded.
    pub loaded: u64,
    /// Live leases.
    pub leases: u64,
    /// Bytes held.
    pub held: Footprint,
}

/// The levels at one moment: taken under one lock, rendered after it is released.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Pool name, namespace and mode.
    pub pool: (String, String, &'static str),
    /// Whether a GPU reading is available.
    pub gpu_up: bool,
    /// The devices.
    pub devices: Vec<DeviceGauges>,
    /// Pod RAM used.
    pub ram_used: u64,
    /// Pod RAM limit (or the machine's memory).
    pub ram_limit: u64,
    /// What the pool's models hold.
    pub held: Footprint,
    /// What unloads not seen back hold.
    pub lost: Footprint,
    /// The ceilings.
    pub ceilings: Limits,
    /// Every model of the pool (zeros when not loaded), and models no longer listed that still
    /// have instances.
    pub models: Vec<ModelGauges>,
    /// Open sessions.
    pub sessions: u64,
}

/// Escapes a label value for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

impl Gauges {
    /// The text exposition of the levels.
    pub fn render(&self) -> String {
        // Room for the event families rendered after the levels too (about 1.2 KB a model).
        let mut out = String::with_capacity(16 * 1024 + self.models.len() * 1600);
        let (pool, namespace, mode) = &self.pool;
        family(
            &mut out,
            "modelpool_pool_info",
            "The pool this sidecar enforces (always 1); labels name it for dashboards.",
        );
        let _ = writeln!(
            out,
            "modelpool_pool_info{{mode=\"{}\",namespace=\"{}\",pool=\"{}\"}} 1",
            escape(mode),
            escape(namespace),
            escape(pool)
        );
        family(
            &mut out,
            "modelpool_gpu_up",
            "1 when a GPU reading is available (NVML, CUDA or the app), 0 otherwise.",
        );
        let _ = writeln!(out, "modelpool_gpu_up {}", u8::from(self.gpu_up));
        if !self.devices.is_empty() {
            for (name, help, pick) in [
                (
                    "modelpool_vram_total_bytes",
                    "Installed GPU memory per device, in bytes.",
                    (|d: &DeviceGauges| d.total) as fn(&DeviceGauges) -> u64,
                ),
                (
                    "modelpool_vram_used_bytes",
                    "GPU memory in use per device by all processes, in bytes.",
                    |d: &DeviceGauges| d.used,
                ),
            ] {
                family(&mut out, name, help);
                for device in &self.devices {
                    let _ = writeln!(
                        out,
                        "{name}{{gpu=\"{}\",uuid=\"{}\"}} {}",
                        device.index,
                        escape(&device.uuid),
                        pick(device)
                    );
                }
            }
        }
        family(
            &mut out,
            "modelpool_ram_used_bytes",
            "Host memory in use by the pod (cgroup) or machine, in bytes.",
        );
        let _ = writeln!(out, "modelpool_ram_used_bytes {}", self.ram_used);
        family(
            &mut out,
            "modelpool_ram_limit_bytes",
            "The pod's host memory limit (cgroup), or the machine's memory without one, in bytes.",
        );
        let _ = writeln!(out, "modelpool_ram_limit_bytes {}", self.ram_limit);
        family(
            &mut out,
            "modelpool_pool_bytes",
            "Memory held by the pool's models in this pod (measured where possible), in bytes.",
        );
        for resource in Resource::ALL {
            let _ = writeln!(
                out,
                "modelpool_pool_bytes{{resource=\"{resource}\"}} {}",
                self.held.get(resource)
            );
        }
        if Resource::ALL
            .iter()
            .any(|r| self.ceilings.get(*r).is_some())
        {
            family(
                &mut out,
                "modelpool_ceiling_bytes",
                "The pool's per-pod ceiling, in bytes (absent when the pool sets none).",
            );
            for resource in Resource::ALL {
                if let Some(limit) = self.ceilings.get(resource) {
                    let _ = writeln!(
                        out,
                        "modelpool_ceiling_bytes{{resource=\"{resource}\"}} {limit}"
                    );
                }
            }
        }
        family(
            &mut out,
            "modelpool_lost_bytes",
            "Memory of unloaded models not yet seen returned after the reclaim timeout, in bytes.",
        );
        for resource in Resource::ALL {
            let _ = writeln!(
                out,
                "modelpool_lost_bytes{{resource=\"{resource}\"}} {}",
                self.lost.get(resource)
            );
        }
        if !self.models.is_empty() {
            family(
                &mut out,
                "modelpool_model_loaded",
                "Number of app processes in this pod holding the model (0 when unloaded).",
            );
            for model in &self.models {
                let _ = writeln!(
                    out,
                    "modelpool_model_loaded{{model=\"{}\"}} {}",
                    escape(&model.name),
                    model.loaded
                );
            }
            family(
                &mut out,
                "modelpool_model_bytes",
                "Memory the model holds in this pod (measured, else declared), in bytes.",
            );
            for model in &self.models {
                let name = escape(&model.name);
                for resource in Resource::ALL {
                    let _ = writeln!(
                        out,
                        "modelpool_model_bytes{{model=\"{name}\",resource=\"{resource}\"}} {}",
                        model.held.get(resource)
                    );
                }
            }
            family(
                &mut out,
                "modelpool_model_leases",
                "Live leases on the model in this pod.",
            );
            for model in &self.models {
                let _ = writeln!(
                    out,
                    "modelpool_model_leases{{model=\"{}\"}} {}",
                    escape(&model.name),
                    model.leases
                );
            }
        }
        family(
            &mut out,
            "modelpool_sessions",
            "App sessions currently open.",
        );
        let _ = writeln!(out, "modelpool_sessions {}", self.sessions);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_and_types() {
        let metrics = Metrics::new().unwrap();
        metrics.loads.with_label_values(&["t2v", "ok"]).inc();
        let text = metrics.render(&Gauges::default());
        assert!(text.contains("# HELP modelpool_gpu_up "));
        assert!(text.contains("modelpool_gpu_up 0\n"));
        assert!(text.contains("# TYPE modelpool_loads_total counter"));
        assert!(text.contains("modelpool_loads_total{model=\"t2v\",outcome=\"ok\"} 1"));
    }

    #[test]
    fn renders_levels_with_escaped_labels() {
        let gauges = Gauges {
            pool: ("p\"1".to_owned(), "ns".to_owned(), "Cache"),
            gpu_up: true,
            devices: vec![DeviceGauges {
                index: 0,
                uuid: "GPU-1".to_owned(),
                total: 8,
                used: 3,
            }],
            ceilings: Limits::new(None, Some(100)),
            held: Footprint::new(1, 2),
            models: vec![ModelGauges {
                name: "a".to_owned(),
                loaded: 2,
                leases: 1,
                held: Footprint::new(5, 6),
            }],
            sessions: 3,
            ..Gauges::default()
        };
        let text = gauges.render();
        for line in [
            "modelpool_pool_info{mode=\"Cache\",namespace=\"ns\",pool=\"p\\\"1\"} 1",
            "modelpool_vram_used_bytes{gpu=\"0\",uuid=\"GPU-1\"} 3",
            "modelpool_pool_bytes{resource=\"ram\"} 2",
            "modelpool_ceiling_bytes{resource=\"ram\"} 100",
            "modelpool_model_loaded{model=\"a\"} 2",
            "modelpool_model_bytes{model=\"a\",resource=\"vram\"} 5",
            "modelpool_model_leases{model=\"a\"} 1",
            "modelpool_sessions 3",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("modelpool_ceiling_bytes{resource=\"vram\"}"));
    }
}
