//! The JSON bodies of the v1 API (docs/sidecar-api.md; `sidecar/api/openapi.yaml`).
//! Requests are lenient about extra fields (newer SDKs may send more); every size is bytes.

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
