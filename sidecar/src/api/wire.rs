//! The JSON bodies of the v1 API (docs/sidecar-api.md; `sidecar/api/openapi.yaml`).
//! Requests are lenient about extra fields (newer SDKs may send more); every size is bytes.

use modelpool_crds::v1alpha1::{DriverKind, Enforcement, Mode};
use serde::{Deserialize, Serialize};

/// `POST /v1/sessions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateSession {
    /// The app process's pid (as the sidecar sees it: shareProcessNamespace).
    pub pid: u32,
    /// A name for logs.
    #[serde(default)]
    pub app: Option<String>,
    /// Models the app registered loaders for.
    #[serde(default)]
    pub models: Vec<String>,
    /// Models the process already holds (after a sidecar restart).
    #[serde(default)]
    pub holds: Vec<Hold>,
}

/// A model a process already holds.
#[derive(Debug, Clone, Deserialize)]
pub struct Hold {
    /// The model.
    pub model: String,
    /// VRAM it holds, if the app knows.
    #[serde(default)]
    pub vram_bytes: Option<u64>,
    /// RAM it holds, if the app knows.
    #[serde(default)]
    pub ram_bytes: Option<u64>,
    /// Leases the app still holds on it (a `with load_model(...)` block still running).
    #[serde(default)]
    pub leases: u32,
}

/// `POST /v1/sessions/{session}/heartbeat`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Heartbeat {
    /// What the app measured in its own process.
    #[serde(default)]
    pub readings: Option<AppReadings>,
}

/// Readings the app takes in its own process (torch.cuda.mem_get_info, NVML).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct AppReadings {
    /// `torch` or `nvml`: becomes the source tag `app:<source>`.
    #[serde(default = "default_app_source")]
    pub source: String,
    /// Device VRAM used by all processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_vram_used_bytes: Option<u64>,
    /// Device VRAM installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_vram_total_bytes: Option<u64>,
    /// VRAM this process uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_vram_bytes: Option<u64>,
}

fn default_app_source() -> String {
    "app".to_owned()
}

fn default_true() -> bool {
    true
}

/// `POST /v1/acquire`.
#[derive(Debug, Clone, Deserialize)]
pub struct Acquire {
    /// The session asking.
    pub session: String,
    /// The model.
    pub model: String,
    /// Wait for room (up to the pool's acquireTimeout); `false` answers `wait` at once.
    #[serde(default = "default_true")]
    pub wait: bool,
}

/// `POST /v1/loaded`.
#[derive(Debug, Clone, Deserialize)]
pub struct Loaded {
    /// The session.
    pub session: String,
    /// The lease the `load` decision came with.
    pub lease: String,
    /// Whether the load worked.
    #[serde(default = "default_true")]
    pub ok: bool,
    /// How long it took, as the app measured.
    #[serde(default)]
    pub load_seconds: Option<f64>,
    /// VRAM the load added, as the app measured.
    #[serde(default)]
    pub vram_bytes: Option<u64>,
    /// RAM the load added, as the app measured.
    #[serde(default)]
    pub ram_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /v1/release`.
#[derive(Debug, Clone, Deserialize)]
pub struct Release {
    /// The session.
    pub session: String,
    /// The lease.
    pub lease: String,
}

/// `POST /v1/unloaded`.
#[derive(Debug, Clone, Deserialize)]
pub struct Unloaded {
    /// The session.
    pub session: String,
    /// The model it dropped.
    pub model: String,
    /// Which instance of it: the `generation` of the acquire answer (or of the command, or
    /// of the session answer's `adopted` entry). Only that instance is acknowledged.
    pub generation: u64,
    /// The command it answers, if any.
    #[serde(default)]
    pub command: Option<u64>,
}

/// `POST /v1/cleanup`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cleanup {
    /// Unload pinned models too (the seed's `force_cleanup`).
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/check` query.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CheckQuery {
    /// VRAM needed.
    #[serde(default)]
    pub vram_bytes: Option<u64>,
    /// RAM needed.
    #[serde(default)]
    pub ram_bytes: Option<u64>,
}

/// `GET /v1/sessions/{session}/commands` query.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommandsQuery {
    /// How long to wait for a command, ms (max 30000; default 25000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// What a command asks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Unload the instance.
    Unload,
}

/// A command for the app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Command {
    /// Its id, echoed in `/v1/unloaded`.
    pub id: u64,
    /// `unload`.
    pub kind: CommandKind,
    /// The model.
    pub model: String,
    /// The instance it is for (echoed in `/v1/unloaded`): a command for generation 3 is not
    /// about a later load of the same model. 0: a hold the sidecar refused at session open.
    pub generation: u64,
    /// `released`, `idle_ttl`, `pressure`, `evicted`, `cleanup`, `ceiling`, `shutdown`.
    pub reason: modelpool_policy::UnloadReason,
}

/// VRAM and RAM bytes: `{"vram": .., "ram": ..}` (the policy crate's pair).
pub type Bytes = modelpool_policy::Footprint;

/// Ceilings: `null` where the pool sets none (the policy crate's pair).
pub type Ceilings = modelpool_policy::Limits;

// ---- answers ----
//
// Every answer the API sends is one of these structs: the handlers build them, the `status`
// command reads them back, and `sidecar/tests/openapi.rs` checks them against the document.

/// `{}`: an answer with nothing to say (heartbeat, loaded, unloaded).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

/// The pool's per-pod ceilings in a session answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitBytes {
    /// VRAM ceiling; `null` when the pool sets none.
    pub vram_bytes: Option<u64>,
    /// RAM ceiling; `null` when the pool sets none.
    pub ram_bytes: Option<u64>,
}

/// A model of the pool as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolModel {
    /// Its name in the pool.
    pub name: String,
    /// Declared (or estimated) VRAM.
    pub vram_bytes: u64,
    /// Declared (or estimated) RAM.
    pub ram_bytes: u64,
    /// Never unloaded by policy.
    pub pinned: bool,
    /// Acquire-queue and eviction priority.
    pub priority: i32,
    /// The size estimated from the weights' headers (no size declared), charged as
    /// `vram_bytes` or `ram_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// `/v1/state` only: its sizes side by side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<ModelSizes>,
}

/// A model's sizes side by side (`/v1/state`): what the pool declares, what the weights'
/// headers gave, what the last load measured and the largest any load measured, and what
/// admission counts now (the larger of declared-or-estimated and the peak; the whole ceiling
/// for a model with no size at all).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelSizes {
    /// `spec.models[].vram`/`ram`; `None` when the pool declares neither.
    pub declared: Option<Bytes>,
    /// From the weights' headers (nothing declared): `estimate.bytes` where it is charged.
    pub estimated: Option<Bytes>,
    /// The last load measured (or the size learned before a restart).
    pub measured: Option<Bytes>,
    /// The largest any load measured.
    pub peak: Option<Bytes>,
    /// What admission counts for it now.
    pub need: Bytes,
}

/// A model's size estimated from its weights' headers, before any load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Estimate {
    /// What is charged: weights plus KV cache plus the runtime's overhead.
    pub bytes: u64,
    /// The tensors' bytes.
    pub weights_bytes: u64,
    /// The KV cache for the context (GGUF with attention metadata; else 0).
    pub kv_cache_bytes: u64,
    /// The runtime's own per model (`crate::pool::runtime_overhead`: a CUDA context for
    /// runtimes that start a process per model; else 0).
    #[serde(default)]
    pub overhead_bytes: u64,
    /// `gguf`, `safetensors`, `sharded_safetensors` or `safetensors_directory`.
    pub format: String,
    /// Files read.
    pub files: u64,
    /// The filesystem the weights were read through: `/` (the sidecar's own) or
    /// `/proc/<pid>/root` (the app's process's, through the shared process namespace).
    pub through: String,
}

/// The pool in a session answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionPool {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (empty when absent).
    pub namespace: String,
    /// `Aggressive` or `Cache`.
    pub mode: Mode,
    /// The driver kind.
    pub driver: DriverKind,
    /// Per-pod ceilings.
    pub limits: LimitBytes,
    /// The models.
    pub models: Vec<PoolModel>,
}

/// A held model taken into the ledger at session open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Adopted {
    /// The model.
    pub model: String,
    /// The generation that names this instance.
    pub generation: u64,
}

/// A held model that did not fit: the app is told to unload it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedHold {
    /// The model.
    pub model: String,
    /// Why, with the numbers.
    pub message: String,
}

/// `201` to `POST /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionCreated {
    /// The session's name (`s-1`).
    pub session: String,
    /// How often to heartbeat.
    pub heartbeat_ms: u64,
    /// The pool in force.
    pub pool: SessionPool,
    /// Held models refused (reason `ceiling`, generation 0 on the command stream).
    pub refused_holds: Vec<RefusedHold>,
    /// Held models adopted.
    pub adopted: Vec<Adopted>,
}

/// `GET /v1/sessions/{session}/commands`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Commands {
    /// Commands due, oldest first; empty when the long poll ran out.
    pub commands: Vec<Command>,
}

/// What an acquire decided.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Loaded already: use it.
    Use,
    /// Load it now and report `/v1/loaded`.
    Load,
    /// No room yet (`wait: false`).
    Wait,
    /// Refused (in an error body).
    Refuse,
}

/// `200` to `POST /v1/acquire`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcquireAnswer {
    /// `use`, `load` or `wait`.
    pub decision: Decision,
    /// The model.
    pub model: String,
    /// With `use` and `load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// With `use` and `load`: the instance the lease is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// With `wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A model in a refusal: who holds what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// The model.
    pub model: String,
    /// The session holding it.
    pub session: String,
    /// VRAM it holds.
    pub vram_bytes: u64,
    /// RAM it holds.
    pub ram_bytes: u64,
    /// Leases on it.
    pub leases: u64,
    /// Pinned by the pool.
    pub pinned: bool,
}

/// The fields a refused acquire adds to the error body (`error: refused`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalDetails {
    /// Always `refuse`.
    pub decision: Decision,
    /// `exceeds_ceiling`, `timeout`, `unknown_model`, `load_failed`, `shutting_down`, `unsized`.
    pub reason: String,
    /// The model.
    pub model: String,
    /// What the load needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub need_bytes: Option<Bytes>,
    /// The ceilings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling_bytes: Option<Ceilings>,
    /// What the pool holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<Bytes>,
    /// What unloading idle models could free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaimable_bytes: Option<Bytes>,
    /// Who holds what.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
}

/// `200` to `POST /v1/release`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseAnswer {
    /// Unload now and report `/v1/unloaded` (also queued on the command stream).
    pub unload: bool,
}

/// An unload `POST /v1/cleanup` started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CleanupUnload {
    /// The session told to unload.
    pub session: String,
    /// The model.
    pub model: String,
}

/// `200` to `POST /v1/cleanup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CleanupAnswer {
    /// Unloads started.
    pub unloading: Vec<CleanupUnload>,
    /// Models kept because a lease is open on them.
    pub skipped_leased: Vec<String>,
}

/// `200` to `GET /v1/check`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckAnswer {
    /// Whether `need` fits now (after unloading idle models if needed).
    pub available: bool,
    /// What was asked.
    pub need: Bytes,
    /// Room under each ceiling; `null` where there is none.
    pub free: Ceilings,
    /// What unloading idle models could free.
    pub reclaimable: Bytes,
    /// For people.
    pub message: String,
}

/// One GPU in `/v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GpuDevice {
    /// Device index.
    pub index: u32,
    /// Device UUID (empty when the source does not know it).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Installed memory.
    pub total_bytes: u64,
    /// Memory in use by everyone on the device.
    pub used_bytes: u64,
    /// Where the numbers came from (`nvml`, `cuda`, `app:torch`).
    pub source: String,
}

/// The GPU reading in `/v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GpuState {
    /// Whether there is a reading.
    pub up: bool,
    /// When down: `no GPU: <why>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<GpuDevice>>,
}

/// Where each reading in `/v1/state` came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sources {
    /// Node or pod RAM (`cgroup`, `proc`).
    pub ram: String,
    /// Device VRAM; `null` without a reading.
    pub vram: Option<String>,
    /// Per-process RAM (`proc`).
    pub process_ram: String,
    /// Per-process VRAM (`nvml`); `null` without a reading.
    pub process_vram: Option<String>,
}

/// The pool in `/v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatePool {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (empty when absent).
    pub namespace: String,
    /// `Aggressive` or `Cache`.
    pub mode: Mode,
    /// The driver kind.
    pub driver: DriverKind,
    /// The Http driver's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_url: Option<String>,
    /// `Advisory`, `Evict` or `Restart`.
    pub enforcement: Enforcement,
    /// Per-pod ceilings.
    pub limits: Ceilings,
    /// The models.
    pub models: Vec<PoolModel>,
}

/// One instance in `/v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelState {
    /// The model.
    pub model: String,
    /// Names this instance (a later load of the model is a new one).
    pub generation: u64,
    /// The session holding it (`app` for the Http driver's instances).
    pub session: String,
    /// The session's pid.
    pub pid: Option<u32>,
    /// The session's app name.
    pub app: Option<String>,
    /// `loading`, `loaded`, `unloading`, `reclaiming`, `not_reclaimed`.
    pub state: String,
    /// Leases on it.
    pub leases: u64,
    /// VRAM counted against the ceiling.
    pub vram_bytes: u64,
    /// RAM counted against the ceiling.
    pub ram_bytes: u64,
    /// What the pool declares (or estimates).
    pub declared: Bytes,
    /// What the ledger learned from the load.
    pub measured: Option<Bytes>,
    /// What the sidecar measured around the load.
    #[serde(default)]
    pub measured_by_sidecar: Option<modelpool_policy::Sizes>,
    /// What the app reported.
    #[serde(default)]
    pub reported_by_app: Option<modelpool_policy::Sizes>,
    /// The most it held.
    pub peak: Bytes,
    /// Seconds since its last lease ended.
    pub idle_s: f64,
    /// Pinned by the pool.
    pub pinned: bool,
    /// Why it is being unloaded.
    #[serde(default)]
    pub unload_reason: Option<String>,
}

/// One session in `/v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionState {
    /// The session's name.
    pub session: String,
    /// The app's pid.
    pub pid: u32,
    /// The process's VRAM as the sidecar reads it (NVML, by pid).
    #[serde(default)]
    pub vram_bytes: Option<u64>,
    /// Where `vram_bytes` came from.
    #[serde(default)]
    pub vram_source: Option<String>,
    /// The app's name.
    pub app: String,
    /// Models it registered.
    pub models: Vec<String>,
    /// Leases it holds.
    pub leases: u64,
    /// Since its last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Since it opened.
    #[serde(default)]
    pub age_s: u64,
    /// Commands not yet taken.
    #[serde(default)]
    pub pending_commands: Vec<Command>,
    /// What the app last measured.
    #[serde(default)]
    pub readings: Option<AppReadings>,
    /// Whether the sidecar sees the pid (shared process namespace).
    #[serde(default)]
    pub pid_visible: bool,
    /// The process's RSS at the last tick.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
}

/// Counters since the sidecar started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Loads that worked.
    pub loads: u64,
    /// Loads that failed.
    pub load_failures: u64,
    /// Unloads by reason.
    pub unloads: std::collections::BTreeMap<String, u64>,
    /// Acquires refused, by reason.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Unloads whose memory did not come back in time.
    pub not_reclaimed: u64,
    /// Ticks that found a ceiling broken, by resource.
    pub ceiling_breaches: std::collections::BTreeMap<String, u64>,
    /// Unloads whose memory was seen back, by how (`proc`, `nvml`, `process_exit`, …);
    /// `unverified`: no reading proved it (e.g. VRAM with no GPU reading in the pod).
    #[serde(default)]
    pub reclaims: std::collections::BTreeMap<String, u64>,
}

/// `200` to `GET /v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// RAM used, GiB, 2 decimals (the seed's `get_memory_status`).
    pub ram_used_gb: f64,
    /// RAM installed (or the pod's limit), GiB.
    pub ram_total_gb: f64,
    /// RAM used, percent.
    pub ram_percent: f64,
    /// VRAM used, GiB.
    pub vram_allocated_gb: f64,
    /// VRAM installed, GiB.
    pub vram_total_gb: f64,
    /// VRAM used, percent.
    pub vram_percent: f64,
    /// RAM used.
    pub ram_used_bytes: u64,
    /// RAM installed.
    pub ram_total_bytes: u64,
    /// The pod's cgroup limit, when it has one.
    pub ram_limit_bytes: Option<u64>,
    /// VRAM used.
    pub vram_used_bytes: u64,
    /// VRAM installed.
    pub vram_total_bytes: u64,
    /// The GPU reading.
    pub gpu: GpuState,
    /// Where each reading came from.
    pub sources: Sources,
    /// The pool in force.
    pub pool: StatePool,
    /// What the ledger holds.
    pub held_bytes: Bytes,
    /// The ceilings.
    pub ceiling_bytes: Ceilings,
    /// Unloaded but not given back.
    pub lost_bytes: Bytes,
    /// Acquires waiting for room.
    pub queue: u64,
    /// Instances.
    pub models: Vec<ModelState>,
    /// Sessions.
    pub sessions: Vec<SessionState>,
    /// Counters.
    pub counters: Counters,
    /// The sidecar is stopping.
    pub shutting_down: bool,
    /// The model server behind a server driver (`KServeV2`, `Ollama`, `Vllm`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerState>,
}

/// The model server as the sidecar sees it (server drivers).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerState {
    /// It answered the last poll.
    pub up: bool,
    /// Why the last poll failed.
    pub down_reason: Option<String>,
    /// Polls answered so far.
    pub polls: u64,
    /// The server's root pid, when found.
    pub pid: Option<u32>,
    /// How it was found (`command line`, `port`).
    pub found_by: Option<String>,
    /// Its process tree's RSS at the last reading.
    pub rss_bytes: Option<u64>,
    /// The process tree's VRAM (NVML per process), when a GPU reading covers it.
    #[serde(default)]
    pub vram_bytes: Option<u64>,
    /// Instances dropped because the server no longer held them.
    pub dropped: u64,
    /// Models loaded behind the sidecar's back and adopted.
    pub adopted: u64,
    /// Reclaims of the server's instances, by how they were seen (`proc`, `unverified`, ...).
    pub reclaims: std::collections::BTreeMap<String, u64>,
    /// Models the server holds that the pool does not list.
    pub unlisted_models: Vec<String>,
    /// `Vllm` at sleep level 1: the models the sidecar put to sleep, still asleep, and the host
    /// RAM each one's weights hold there (counted against the RAM ceiling, in `held_bytes`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub asleep_ram_bytes: std::collections::BTreeMap<String, u64>,
}
