//! What the engine takes in and gives out: ids, actions and their reasons, outputs (grants,
//! unloads, refusals with their numbers), readings, views of instances, and counters.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::footprint::{Footprint, Resource};

/// An app process's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SessionId(pub u64);

/// A lease: permission to use one instance until released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LeaseId(pub u64);

/// The caller's name for one acquire, echoed in its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RequestId(pub u64);

/// What a granted acquire must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The session holds the model: use it.
    Use,
    /// Room is reserved: load it, then report `loaded`.
    Load,
}

/// Why an instance is to be unloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnloadReason {
    /// Aggressive mode, last lease released.
    Released,
    /// Cache mode, idle past the TTL.
    IdleTtl,
    /// Device or pod memory above the pressure threshold.
    Pressure,
    /// Room for another model.
    Evicted,
    /// A cleanup call.
    Cleanup,
    /// Measured usage above a ceiling.
    Ceiling,
    /// The sidecar is stopping.
    Shutdown,
    /// The app process went away.
    SessionGone,
    /// The model server dropped the model by itself (its own eviction, an OOM, a crash or a
    /// restart): seen by a server driver's poll of what the server holds.
    ServerDropped,
}

impl UnloadReason {
    /// The snake_case name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::IdleTtl => "idle_ttl",
            Self::Pressure => "pressure",
            Self::Evicted => "evicted",
            Self::Cleanup => "cleanup",
            Self::Ceiling => "ceiling",
            Self::Shutdown => "shutdown",
            Self::SessionGone => "session_gone",
            Self::ServerDropped => "server_dropped",
        }
    }
}

/// Why an acquire was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The model can never fit: its need is above the ceiling (less what pinned models hold).
    ExceedsCeiling,
    /// No room was made within the acquire timeout.
    Timeout,
    /// The pool does not list the model.
    UnknownModel,
    /// The sidecar is stopping.
    ShuttingDown,
    /// The model's size is unknown (nothing declared, no estimate, never measured) and the
    /// pool refuses such models (`unsizedModels: Refuse`).
    Unsized,
}

impl RefusalReason {
    /// The snake_case name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExceedsCeiling => "exceeds_ceiling",
            Self::Timeout => "timeout",
            Self::UnknownModel => "unknown_model",
            Self::ShuttingDown => "shutting_down",
            Self::Unsized => "unsized",
        }
    }
}

/// Who holds memory, for refusal messages.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holder {
    /// The model.
    pub model: String,
    /// The session that holds it.
    pub session: SessionId,
    /// What it holds.
    pub held: Footprint,
    /// Live leases on it.
    pub leases: usize,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Its state.
    pub state: InstanceState,
}

/// A refusal, with the numbers that made it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// What the model needs (larger of declared and learned).
    pub need: Footprint,
    /// The ceilings (`None`: none).
    pub ceiling_vram: Option<u64>,
    /// The ceilings (`None`: none).
    pub ceiling_ram: Option<u64>,
    /// What the pool holds now.
    pub held: Footprint,
    /// What evicting idle instances could free.
    pub reclaimable: Footprint,
    /// Who holds it.
    pub holders: Vec<Holder>,
    /// One sentence with all of the above.
    pub message: String,
}

/// What the caller must do or know.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Output {
    /// An acquire is granted.
    Granted {
        /// The acquire.
        request: RequestId,
        /// Its session.
        session: SessionId,
        /// The model.
        model: String,
        /// The lease to release later.
        lease: LeaseId,
        /// The instance the lease is on (see [`InstanceView::generation`]).
        generation: u64,
        /// Use what is loaded, or load.
        action: Action,
        /// How long it waited.
        waited: Duration,
    },
    /// An acquire is refused.
    Refused {
        /// The acquire.
        request: RequestId,
        /// Its session.
        session: SessionId,
        /// The model asked for.
        model: String,
        /// Why, with numbers.
        refusal: Box<Refusal>,
    },
    /// Tell a session to unload a model.
    Unload {
        /// The session holding it.
        session: SessionId,
        /// The model.
        model: String,
        /// Which instance of it: the command is for this one only.
        generation: u64,
        /// Why.
        reason: UnloadReason,
    },
    /// An unload's memory was not seen back in time; it stays counted as lost capacity.
    MemoryNotReclaimed {
        /// The session.
        session: SessionId,
        /// The model.
        model: String,
        /// Which instance of it.
        generation: u64,
        /// What it still holds.
        held: Footprint,
    },
    /// Measured usage went above a ceiling (reported on the transition only).
    CeilingExceeded {
        /// Which resource.
        resource: Resource,
        /// What is held.
        held: u64,
        /// The ceiling.
        limit: u64,
    },
}

/// Where an instance is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Load granted, not yet reported.
    Loading,
    /// Loaded and usable.
    Loaded,
    /// Unload requested, not yet confirmed by the app.
    Unloading,
    /// The app unloaded it; memory not yet seen back.
    Reclaiming,
    /// Memory not seen back within the reclaim timeout.
    #[serde(rename = "not_reclaimed")]
    Lost,
}

impl InstanceState {
    /// The name on the wire (the same as serde's) and in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Loaded => "loaded",
            Self::Unloading => "unloading",
            Self::Reclaiming => "reclaiming",
            Self::Lost => "not_reclaimed",
        }
    }
}

/// Device and pod readings for pressure and free-room checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readings {
    /// Device VRAM `(used, total)` over all processes, when a GPU is seen.
    pub vram: Option<(u64, u64)>,
    /// Pod (or node) RAM `(used, limit)`.
    pub ram: Option<(u64, u64)>,
    /// The session whose own claim `vram` is (the sidecar has no device reading of its own):
    /// VRAM pressure then unloads only that session's models, so that one app's reading can
    /// never evict another's.
    pub vram_claimed_by: Option<SessionId>,
}

/// One instance, for state views and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceView {
    /// The model.
    pub model: String,
    /// The session holding it.
    pub session: SessionId,
    /// Which instance: a number given when its load is granted, never reused by this engine.
    /// A later load of the same model in the same session is a new generation, so a command
    /// or an acknowledgement names exactly one instance.
    pub generation: u64,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Live leases.
    pub leases: usize,
    /// What counts against the ceilings.
    pub held: Footprint,
    /// Declared in the pool.
    pub declared: Footprint,
    /// Measured after its load, if reported.
    pub measured: Option<Footprint>,
    /// Largest measured.
    pub peak: Footprint,
    /// Time since last use.
    pub idle: Duration,
    /// Pinned in the pool.
    pub pinned: bool,
    /// Why it is being unloaded, once decided.
    pub unload_reason: Option<UnloadReason>,
}

/// The seed's `check_memory_available`, counting what eviction could free.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckResult {
    /// Whether `need` fits now or after evicting idle instances.
    pub available: bool,
    /// Room now (smaller of ceiling room and device room), per resource; `None`: unbounded.
    pub free_vram: Option<u64>,
    /// Room now for RAM; `None`: unbounded.
    pub free_ram: Option<u64>,
    /// What evicting idle, unpinned instances would free.
    pub reclaimable: Footprint,
    /// A sentence saying so.
    pub message: String,
}

/// Counters since the engine started.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Loads granted.
    pub loads: u64,
    /// Loads reported failed.
    pub load_failures: u64,
    /// Unloads by reason.
    pub unloads: BTreeMap<UnloadReason, u64>,
    /// Refusals by reason (as strings, for metrics).
    pub refusals: BTreeMap<&'static str, u64>,
    /// Reclaims that never completed.
    pub not_reclaimed: u64,
    /// Transitions above a ceiling, per resource name.
    pub ceiling_breaches: BTreeMap<&'static str, u64>,
}
