//! The `ModelPool` resource: which models the selected pods may load, what each needs,
//! the per-pod ceilings and the policy that keeps them within those ceilings.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema, core::Duration};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;

/// The most models one pool may declare: keeps the CRD's CEL cost estimate bounded.
pub const MAX_MODELS: usize = 64;

/// A pool of models that the selected inference pods may load, with per-pod memory ceilings
/// and the policy (unload after use, idle TTL, pressure eviction) the sidecar enforces.
// `printcolumn(...)` repeats `type_`: clippy reads the derive arguments as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "modelpool.io",
    version = "v1alpha1",
    kind = "ModelPool",
    plural = "modelpools",
    singular = "modelpool",
    shortname = "mp",
    category = "modelpool",
    namespaced,
    cel,
    status = "ModelPoolStatus",
    doc = "A pool of models that selected inference pods may load, with per-pod ceilings and an unload/eviction policy.",
    printcolumn(
        name = "Models",
        type_ = "string",
        description = "Models loaded somewhere / declared",
        json_path = ".status.modelsLoaded"
    ),
    printcolumn(
        name = "Pods",
        type_ = "string",
        description = "Pods reporting / matched",
        json_path = ".status.podsReady"
    ),
    printcolumn(
        name = "VRAM",
        type_ = "string",
        description = "VRAM held by the pool's models, summed over pods",
        json_path = ".status.vramUsed"
    ),
    printcolumn(
        name = "Ceiling",
        type_ = "string",
        description = "Per-pod VRAM ceiling",
        json_path = ".spec.limits.vram"
    ),
    printcolumn(
        name = "RAM",
        type_ = "string",
        description = "RAM held by the pool's models, summed over pods",
        json_path = ".status.ramUsed"
    ),
    printcolumn(
        name = "RAM Ceiling",
        type_ = "string",
        description = "Per-pod RAM ceiling",
        json_path = ".spec.limits.ram",
        priority = 1
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.policy.mode"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Unverified",
        type_ = "integer",
        description = "Unloads no reading proved (e.g. VRAM with no GPU reading in the pod: docs/gpu.md), summed over pods",
        json_path = ".status.unverifiedUnloads"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.models.all(m, self.models.exists_one(n, n.name == m.name))").message("model names must be unique").field_path(".models"),
    validation = Rule::new("!has(self.limits.vram) || self.models.all(m, !has(m.vram) || quantity(m.vram).compareTo(quantity(self.limits.vram)) <= 0)").message("each model's vram must fit within limits.vram").field_path(".models"),
    validation = Rule::new("!has(self.limits.ram) || self.models.all(m, !has(m.ram) || quantity(m.ram).compareTo(quantity(self.limits.ram)) <= 0)").message("each model's ram must fit within limits.ram").field_path(".models"),
    validation = Rule::new("!has(self.driver) || !has(self.driver.kind) || self.driver.kind != 'Vllm' || (has(self.driver.servers) ? self.models.all(m, m.name in self.driver.servers) : size(self.models) == 1)").message("driver.servers must name every model's vLLM server when driver.kind is Vllm (it may be left out only for a pool of one model, whose server is driver.url or the pod's vLLM container)").field_path(".driver.servers"),
)]
// "Pinned models together within the ceilings" is not a CEL rule: the apiserver estimates a
// `filter().map().sum()` over quantities at more than 100x its cost budget and refuses the
// CRD. `validate_pool` checks it (the sidecar refuses such a pool file; the operator reports
// it as `Ready=False, reason InvalidSpec`).
#[serde(rename_all = "camelCase")]
pub struct ModelPoolSpec {
    /// The pods this pool governs. Absent: pods labelled `modelpool.io/pool: <pool name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// How the sidecar makes the app load and unload models.
    #[serde(default)]
    pub driver: Driver,

    /// Per-pod ceilings for what the pool's models may hold together. Absent: no ceiling
    /// beyond the device itself.
    #[serde(default)]
    pub limits: Resources,

    /// What the app holds with nothing loaded (its runtime, CUDA context, buffers).
    #[serde(default)]
    pub baseline: Resources,

    /// When to unload and whom to evict.
    #[serde(default)]
    pub policy: Policy,

    /// The models pods of this pool may load.
    #[schemars(length(min = 1, max = 64))]
    pub models: Vec<ModelSpec>,

    /// How the injected sidecar reads the app's GPU. Absent: the operator's default
    /// (`--sidecar-gpu-access`, chart value `sidecar.gpuAccess`, itself `Auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,

    /// The serving proxy (docs/proxy.md): the injected sidecar listens on `port` (container
    /// port `mp-proxy`) and forwards to the pod's inference server, admitting each request
    /// that names a model under a lease on it. Point the pod's Service at this port. Needs a
    /// driver that loads models itself (not `Sdk`). Absent: no proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySpec>,
}

/// The serving proxy of a pool's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// The port the proxy listens on, in every pod of the pool (the Service's `targetPort`).
    /// Must differ from the app's own ports and from the sidecar's metrics port, 9464.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The inference server, `http://127.0.0.1:PORT`. Absent: the driver's `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The most requests waiting for admission at once; more are answered 429. Absent: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_queue: Option<u32>,
    /// The largest request body, in bytes; larger ones are answered 413. Absent: 32 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_body_bytes: Option<u64>,
    /// The most requests in flight per model; more wait their turn (up to the policy's
    /// `acquireTimeout`). Absent or 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_concurrency: Option<u32>,
    /// The most client connections the proxy holds open at once; more are answered 503 and
    /// closed. Each also holds a connection to the server, and the sidecar lowers the cap to
    /// fit its open-file limit (it logs the figure). Absent: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    /// Worker threads of the proxy, apart from the sidecar's API thread. More serve requests
    /// that arrive together in parallel; 1 uses the least CPU. Absent: one per core the
    /// sidecar may use (its CPU limit counts), at most 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub threads: Option<u16>,
}

/// How the sidecar sees the app's GPU in a pod (see docs/gpu.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// Which way the sidecar gets its GPU readings.
    #[serde(default)]
    pub access: GpuAccess,
}

/// Ways for the injected sidecar to read the app's GPU. A container that requests no GPU sees
/// none, so each has a cost; `Auto` is the default because it asks for no extra privilege.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GpuAccess {
    /// `SharedClaim` when an app container uses DRA resource claims, else the app's own
    /// readings (SDK heartbeats, server drivers); unloads no reading proves are `unverified`.
    #[default]
    Auto,
    /// The sidecar joins the app containers' DRA resource claims (Kubernetes 1.34+) and reads
    /// NVML for exactly the app's devices. A pod whose app uses no claim is admitted with a
    /// warning and the `none` reading.
    SharedClaim,
    /// The sidecar gets `NVIDIA_VISIBLE_DEVICES=all` and `NVIDIA_DRIVER_CAPABILITIES=utility`
    /// (device plugin clusters): NVML for every GPU of the node, attributed to the app by pid.
    /// It sees (and could allocate on) other tenants' GPUs: opt in per pool or cluster.
    VisibleDevices,
    /// No GPU reading in the sidecar (`--no-nvml`): only what the app reports.
    None,
}

impl GpuAccess {
    /// The spelling used in the CRD, flags and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "Auto",
            Self::SharedClaim => "SharedClaim",
            Self::VisibleDevices => "VisibleDevices",
            Self::None => "None",
        }
    }
}

impl std::str::FromStr for GpuAccess {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [
            Self::Auto,
            Self::SharedClaim,
            Self::VisibleDevices,
            Self::None,
        ]
        .into_iter()
        .find(|access| access.as_str() == text)
        .ok_or_else(|| {
            format!(
                "unknown GPU access {text:?}: expected Auto, SharedClaim, VisibleDevices or None"
            )
        })
    }
}

/// Memory sizes for the GPU (`vram`) and host (`ram`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram: Option<Quantity>,
    /// Host memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<Quantity>,
}

/// How the sidecar drives loads and unloads in the app.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.kind != 'Http' || has(self.url)").message("driver.url is required when driver.kind is Http").field_path(".url"))]
#[serde(rename_all = "camelCase")]
pub struct Driver {
    /// `Sdk`: the app's SDK session receives the commands. `Http`: the sidecar calls
    /// `POST {url}/models/{name}/load` and `/unload` on the app. `KServeV2` (Triton, MLServer,
    /// KServe model servers), `Ollama` and `Vllm` (sleep mode, one server per model): the
    /// sidecar drives that server's own API and keeps the ledger equal to what the server
    /// reports it holds.
    #[serde(default)]
    pub kind: DriverKind,
    /// Base URL of the app's model API, e.g. `http://127.0.0.1:8000`. Required for `Http`.
    /// Server drivers, absent: the operator's injection takes the server container's port
    /// (see `container`), else the server's default: `Ollama` 11434, `KServeV2` 8080
    /// (MLServer, KServe; a Triton image 8000), `Vllm` 8000 (a one-model pool without
    /// `servers`). Plain `http://` only: the server runs in the same pod (the sidecar refuses
    /// `https://` at start, and so does this rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://')").message("driver.url must start with http:// (the model server runs in the same pod; the sidecar does not speak https)"))]
    #[schemars(length(max = 512))]
    pub url: Option<String>,
    /// Server drivers: how the sidecar finds the server's processes, whose memory (the
    /// whole process tree's RSS) proves an unload: a substring of the server's command
    /// line (`/proc/PID/cmdline`, arguments joined by spaces), e.g. `mlserver start`. Unset:
    /// the process that listens on the URL's port. In a pod, absent: the operator's injection
    /// takes the server container's `command` and `args` (else the server's usual command
    /// line: `ollama serve`, `mlserver start`, `tritonserver`, `vllm serve`) and shares the
    /// pod's process namespace. Where no process is found, unloads are counted `unverified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub process_match: Option<String>,
    /// Server drivers, in a pod: the container that runs the model server, whose port and
    /// command line give the defaults of `url` and `processMatch`. Absent: the pod's only
    /// container, or the only one whose image names the server (`ollama`, `mlserver`,
    /// `tritonserver`, `vllm`); otherwise the pod is admitted with a warning naming this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,
    /// `Vllm`: each model's vLLM server (one per model, started with `--enable-sleep-mode`
    /// and `VLLM_SERVER_DEV_MODE=1`), by model name, e.g. `{llama: "http://127.0.0.1:8001"}`.
    /// Absent, for a pool of one model: its server is `url` (or that default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub servers: Option<std::collections::BTreeMap<String, String>>,
    /// `Vllm`: the sleep level of an unload: `1` offloads the weights to host RAM (fast
    /// wake-up; the model then counts against the RAM ceiling while asleep), `2` drops them
    /// (the wake-up reloads them). Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub sleep_level: Option<u8>,
}

/// The kinds of driver.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DriverKind {
    /// Commands go to the app's SDK session.
    #[default]
    Sdk,
    /// The sidecar calls the app's load/unload URLs.
    Http,
    /// The KServe v2 / Triton model-repository extension (`/v2/repository/...`): Triton,
    /// MLServer, KServe's model servers.
    KServeV2,
    /// Ollama's API (`/api/generate` with `keep_alive`, `/api/ps`).
    Ollama,
    /// vLLM's sleep mode (`/sleep`, `/wake_up`, `/is_sleeping`), one server per model.
    Vllm,
}

impl DriverKind {
    /// The kind's name, as written in the pool.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sdk => "Sdk",
            Self::Http => "Http",
            Self::KServeV2 => "KServeV2",
            Self::Ollama => "Ollama",
            Self::Vllm => "Vllm",
        }
    }

    /// Whether `driver.url` is required (`Http`: server drivers have a default).
    pub fn needs_url(self) -> bool {
        self == Self::Http
    }

    /// Whether the sidecar drives a model server's own API (`KServeV2`, `Ollama`, `Vllm`).
    pub fn is_server(self) -> bool {
        matches!(self, Self::KServeV2 | Self::Ollama | Self::Vllm)
    }

    /// The server's usual port, when nothing says otherwise: Ollama 11434, MLServer and
    /// KServe's servers 8080 (Triton's is 8000: the injection tells it by the image), vLLM
    /// 8000. `None` for `Sdk` and `Http`.
    pub fn default_port(self) -> Option<u16> {
        match self {
            Self::Ollama => Some(11434),
            Self::KServeV2 => Some(8080),
            Self::Vllm => Some(8000),
            Self::Sdk | Self::Http => None,
        }
    }
}

/// When models are unloaded and which are evicted first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `Aggressive`: unload at the last release. `Cache`: keep until idle for `idleTTL` or
    /// evicted under pressure.
    #[serde(default)]
    pub mode: Mode,
    /// Cache mode: unload a model idle for this long (e.g. `5m`).
    #[serde(
        default = "default_idle_ttl",
        rename = "idleTTL",
        deserialize_with = "checked_duration"
    )]
    pub idle_ttl: Duration,
    /// Which idle model goes first when room is needed.
    #[serde(default)]
    pub eviction: Eviction,
    /// Usage levels above which idle models are evicted.
    #[serde(default)]
    pub pressure: Pressure,
    /// How long an acquire waits for room before it is refused (e.g. `60s`).
    #[serde(
        default = "default_acquire_timeout",
        deserialize_with = "checked_duration"
    )]
    pub acquire_timeout: Duration,
    /// What happens when measured usage exceeds a ceiling.
    #[serde(default)]
    pub enforcement: Enforcement,
    /// What admission does with a model whose size is unknown (no `vram`/`ram`, no readable
    /// `source` to estimate from, never measured): `Alone` (default) loads it only with
    /// nothing else loaded beside it until a load is measured; `Refuse` refuses it.
    #[serde(default)]
    pub unsized_models: UnsizedModels,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            idle_ttl: default_idle_ttl(),
            eviction: Eviction::default(),
            pressure: Pressure::default(),
            acquire_timeout: default_acquire_timeout(),
            enforcement: Enforcement::default(),
            unsized_models: UnsizedModels::default(),
        }
    }
}

/// The longest duration a pool may name: ten years (beyond it a duration is a typo).
pub const MAX_DURATION_SECONDS: f64 = 10.0 * 365.0 * 24.0 * 3600.0;

/// Parses a Go-style duration (`30s`, `5m`, `1h30m`, `500ms`, `0`) and refuses what would make
/// kube's own parser panic: a negative or non-finite segment (`"0s-55m"`, found by fuzzing) or a
/// total beyond [`MAX_DURATION_SECONDS`]. The error names the value and what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected = "expected a non-negative duration such as 30s, 5m, 1h30m or 500ms";
    let body = text.trim_start_matches('+');
    if body.starts_with('-') {
        return Err(format!("duration {text:?} is negative: {expected}"));
    }
    let mut rest = body;
    let mut seconds = 0.0_f64;
    while !rest.is_empty() && rest != "0" {
        let unit_at = rest
            .find(|c: char| c.is_alphabetic())
            .ok_or_else(|| format!("duration {text:?} has a number without a unit: {expected}"))?;
        let (number, tail) = rest.split_at(unit_at);
        let unit_end = tail
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let well_formed = !number.is_empty()
            && number.chars().all(|c| c.is_ascii_digit() || c == '.')
            && number.chars().filter(|&c| c == '.').count() <= 1
            && number != ".";
        let value: f64 = if well_formed {
            number
                .parse()
                .map_err(|_| format!("duration {text:?}: {number:?} is not a number: {expected}"))?
        } else {
            return Err(format!(
                "duration {text:?}: {number:?} is not a non-negative number: {expected}"
            ));
        };
        let unit_seconds = match unit {
            "ns" => 1e-9,
            "us" | "\u{00b5}s" | "\u{03bc}s" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "duration {text:?}: unknown unit {other:?}: {expected}"
                ));
            }
        };
        seconds += value * unit_seconds;
        if !seconds.is_finite() || seconds > MAX_DURATION_SECONDS {
            return Err(format!(
                "duration {text:?} is longer than ten years: {expected}"
            ));
        }
        rest = next;
    }
    body.parse::<Duration>()
        .map_err(|error| format!("duration {text:?}: {error}: {expected}"))
}

fn checked_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn default_idle_ttl() -> Duration {
    Duration::from(std::time::Duration::from_secs(300))
}

fn default_acquire_timeout() -> Duration {
    Duration::from(std::time::Duration::from_secs(60))
}

/// The seed's `aggressive_cleanup` switch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Unload a model as soon as its last lease is released.
    #[default]
    Aggressive,
    /// Keep released models until idle for `idleTTL` or evicted under pressure.
    Cache,
}

impl Mode {
    /// The spelling of the manifest (and of serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aggressive => "Aggressive",
            Self::Cache => "Cache",
        }
    }
}

/// Eviction order among idle models.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Eviction {
    /// Least recently used first.
    Lru,
    /// GreedyDual-Size: cheapest to reload per byte freed, aged by recency.
    #[default]
    CostAware,
}

/// What to do when measured usage exceeds a ceiling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Enforcement {
    /// Report only (metric, condition, event).
    Advisory,
    /// Evict idle models until usage is back under the ceiling.
    #[default]
    Evict,
    /// Evict, and restart the app container when memory is not reclaimed.
    Restart,
}

impl Enforcement {
    /// The spelling of the manifest (and of serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advisory => "Advisory",
            Self::Evict => "Evict",
            Self::Restart => "Restart",
        }
    }
}

/// What admission does with a model of unknown size (`policy.unsizedModels`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UnsizedModels {
    /// Until a load of it is measured, it counts as needing the whole ceiling: idle models are
    /// evicted first and nothing else is loaded beside it.
    #[default]
    Alone,
    /// Every acquire of it is refused (reason `unsized`), naming what to declare.
    Refuse,
}

impl UnsizedModels {
    /// The spelling of the manifest (and of serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alone => "Alone",
            Self::Refuse => "Refuse",
        }
    }
}

/// Usage levels (percent of the device / pod limit) above which idle models are evicted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pressure {
    /// GPU memory in use on the device, in percent.
    #[serde(default = "default_vram_percent")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("vramPercent must be between 1 and 100"))]
    pub vram_percent: u32,
    /// Host memory in use by the pod (cgroup) or node, in percent.
    #[serde(default = "default_ram_percent")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("ramPercent must be between 1 and 100"))]
    pub ram_percent: u32,
}

impl Default for Pressure {
    fn default() -> Self {
        Self {
            vram_percent: default_vram_percent(),
            ram_percent: default_ram_percent(),
        }
    }
}

fn default_vram_percent() -> u32 {
    90
}

fn default_ram_percent() -> u32 {
    80
}

/// One model pods of the pool may load.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The name apps acquire it by: lowercase letters, digits, `-` and `_`, at most 63.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$')").message("model name must be lowercase letters, digits, '-' or '_', starting and ending with a letter or digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// GPU memory the model needs once loaded (before any load is measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram: Option<Quantity>,
    /// Host memory the model needs once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<Quantity>,
    /// Higher goes first in the acquire queue and is evicted last.
    #[serde(default)]
    pub priority: i32,
    /// Never evicted or unloaded by policy once loaded.
    #[serde(default)]
    pub pinned: bool,
    /// Reload cost hint in seconds, used until a load has been measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0").message("loadSeconds must not be negative"))]
    pub load_seconds: Option<f64>,
    /// Where the weights live. With no `vram`/`ram` declared, the local weights' headers (`file:///...`:
    /// a .gguf or .safetensors file, or a model directory) give the footprint estimate until a load is measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ModelSource>,
}

/// Where a model's weights are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// e.g. `file:///models/rife.safetensors`.
    #[schemars(length(max = 1024))]
    pub uri: String,
}

/// What the operator last saw of the pool's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPoolStatus {
    /// The spec generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Degraded`, `CeilingExceeded`, `Conflict`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Pods the selector matches.
    #[serde(default)]
    pub pods_matched: i32,
    /// Pods whose sidecar has reported.
    #[serde(default)]
    pub pods_reporting: i32,
    /// `reporting/matched`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_ready: Option<String>,
    /// `loaded/declared` models, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_loaded: Option<String>,
    /// Per-model counts over the pool's pods.
    #[serde(default)]
    #[schemars(schema_with = "model_status_schema")]
    pub models: Vec<ModelStatus>,
    /// Loads over all pods since they started.
    #[serde(default)]
    pub loads: i64,
    /// Evictions over all pods since they started.
    #[serde(default)]
    pub evictions: i64,
    /// Unloads whose memory no reading proved back (VRAM with no GPU reading in the pod, a
    /// model server whose processes were not found), over all pods since they started:
    /// counted apart, never as reclaimed memory.
    #[serde(default)]
    pub unverified_unloads: i64,
    /// VRAM held by the pool's models, summed over pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_used: Option<Quantity>,
    /// RAM held by the pool's models, summed over pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_used: Option<Quantity>,
}

/// One model's state across the pool's pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The model's name.
    pub name: String,
    /// Pods that hold it now.
    #[serde(default)]
    pub loaded_in: i32,
    /// Loads over all pods.
    #[serde(default)]
    pub loads: i64,
    /// Evictions over all pods.
    #[serde(default)]
    pub evictions: i64,
    /// The largest size measured by any pod's sidecar, kept across restarts of pods and
    /// sidecars (every sidecar of the pool starts admitting with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedStatus>,
    /// Its sizes side by side: declared, estimated from the weights, last measured, peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<ModelSizes>,
}

/// A model's sizes side by side. Admission counts the larger of declared and peak; a model with
/// nothing declared counts its estimate until a load is measured, then its peak.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSizes {
    /// What the pool declares (`vram`/`ram`); absent when neither is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<SizeBytes>,
    /// From the weights' headers by a pod's sidecar (nothing declared); the largest reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated: Option<SizeBytes>,
    /// What the last load measured in the pods reporting now (the largest of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<SizeBytes>,
    /// The largest any load measured (`learned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<SizeBytes>,
}

/// Bytes of VRAM and RAM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SizeBytes {
    /// VRAM bytes.
    pub vram_bytes: u64,
    /// RAM bytes.
    pub ram_bytes: u64,
}

/// A model's size learned by measurement, in bytes, and the size declared (or estimated from
/// its weights) when it was learned: a pool edit that changes that starts the model over.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LearnedStatus {
    /// Largest VRAM a load measured.
    pub peak_vram_bytes: u64,
    /// Largest RAM a load measured.
    pub peak_ram_bytes: u64,
    /// VRAM declared or estimated when learned.
    pub declared_vram_bytes: u64,
    /// RAM declared or estimated when learned.
    pub declared_ram_bytes: u64,
}

fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item
    })
}

fn model_status_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<ModelStatus>();
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": item
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spelled<T: Serialize>(value: T) -> String {
        serde_json::to_value(value)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// One spelling per enum: `as_str` (logs, metrics labels, `/v1/state`) is what serde writes.
    #[test]
    fn as_str_is_the_serde_spelling() {
        for kind in [DriverKind::Sdk, DriverKind::Http, DriverKind::KServeV2] {
            assert_eq!(spelled(kind), kind.as_str());
        }
        for mode in [Mode::Aggressive, Mode::Cache] {
            assert_eq!(spelled(mode), mode.as_str());
        }
        for enforcement in [
            Enforcement::Advisory,
            Enforcement::Evict,
            Enforcement::Restart,
        ] {
            assert_eq!(spelled(enforcement), enforcement.as_str());
        }
    }
}
