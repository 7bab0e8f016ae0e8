//! The engine: a ledger of model instances, leases and waiting acquires, driven by events.
//!
//! An *instance* is one model loaded in one app process (session): two processes sharing a
//! pool each load their own copy, and the ceiling counts both. Its lifecycle:
//!
//! ```text
//! acquire ─grant Load─► Loading ─loaded─► Loaded ─(unload decided)─► Unloading
//!                          │                                              │ unloaded
//!                          └─load failed: gone                            ▼
//!                                      gone ◄─reclaimed (memory seen back)─ Reclaiming
//!                                                                         │ reclaim timeout
//!                                                                         ▼
//!                                                                        Lost (still held)
//! ```
//!
//! Every state but "gone" counts as held against the ceilings.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Mode, PoolConfig},
    eviction::{self, Candidate, DEFAULT_LOAD_SECONDS},
    footprint::{Footprint, Resource, human_bytes},
};

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

#[derive(Clone, Debug)]
struct Instance {
    generation: u64,
    state: InstanceState,
    leases: BTreeSet<LeaseId>,
    /// What counts against ceilings: the admission need until measured, then the measurement.
    held: Footprint,
    measured: Option<Footprint>,
    last_used: Duration,
    unload_reason: Option<UnloadReason>,
    /// When the current Unloading/Reclaiming phase began.
    phase_since: Duration,
}

/// What was learned of one model's size, kept across sidecar restarts (the sidecar persists
/// it; [`Engine::restore_learned`] takes it back).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearnedSize {
    /// The declared size it was learned under: a pool edit that changes it starts over.
    pub declared: Footprint,
    /// The largest size a load of it measured.
    pub peak: Footprint,
    /// Smoothed seconds a load took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_seconds: Option<f64>,
}

#[derive(Clone, Debug, Default)]
struct Learned {
    measured: Option<Footprint>,
    peak: Footprint,
    load_seconds: Option<f64>,
    /// Its requests, for eviction (kept while no instance is loaded).
    demand: eviction::Demand,
}

#[derive(Clone, Debug)]
struct Waiting {
    request: RequestId,
    session: SessionId,
    model: usize,
    since: Duration,
    priority: i32,
    seq: u64,
}

type Key = (SessionId, usize);

/// The policy engine. See the module docs.
#[derive(Clone, Debug)]
pub struct Engine {
    config: PoolConfig,
    instances: BTreeMap<Key, Instance>,
    leases: BTreeMap<LeaseId, Key>,
    queue: Vec<Waiting>,
    learned: Vec<Learned>,
    /// Models dropped by a config update whose instances are still in the ledger.
    retired: Vec<bool>,
    readings: Readings,
    /// Acquires of listed models seen, and the first one's time (the pool's request rate,
    /// for models asked for only once so far).
    arrivals: u64,
    first_arrival: Option<Duration>,
    next_lease: u64,
    next_generation: u64,
    next_seq: u64,
    over_ceiling: [bool; 2],
    shutting_down: bool,
    counters: Counters,
    /// Models not loaded whose memory is still held outside any instance, by name: a vLLM
    /// model asleep at sleep level 1 keeps its weights in host RAM. Counted in [`Engine::held`]
    /// (so against the ceilings), never evicted; a load of the model admits it net of its own
    /// entry and ends the entry (waking it moves the weights back).
    asleep: BTreeMap<String, Footprint>,
}

impl Engine {
    /// A new engine for a pool.
    pub fn new(config: PoolConfig) -> Self {
        let learned = vec![Learned::default(); config.models.len()];
        let retired = vec![false; config.models.len()];
        Self {
            retired,
            config,
            instances: BTreeMap::new(),
            leases: BTreeMap::new(),
            queue: Vec::new(),
            learned,
            readings: Readings::default(),
            arrivals: 0,
            first_arrival: None,
            next_lease: 1,
            next_generation: 1,
            next_seq: 0,
            over_ceiling: [false; 2],
            shutting_down: false,
            counters: Counters::default(),
            asleep: BTreeMap::new(),
        }
    }

    /// The pool in force.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Puts a new pool in force. Instances of models the new pool no longer lists stay in the
    /// ledger (their memory is real) and are unloaded once idle (reason `Cleanup`); learned
    /// figures of models kept survive.
    pub fn update_config(&mut self, now: Duration, config: PoolConfig) -> Vec<Output> {
        let old_models = std::mem::take(&mut self.config.models);
        let old_learned = std::mem::take(&mut self.learned);
        let old_retired = std::mem::take(&mut self.retired);
        let mut models = config.models.clone();
        let mut learned = vec![Learned::default(); models.len()];
        let mut retired = vec![false; models.len()];
        let mut remap: BTreeMap<usize, usize> = BTreeMap::new();
        for (old_index, model) in old_models.iter().enumerate() {
            let listed = if old_retired[old_index] {
                None
            } else {
                config.models.iter().position(|m| m.name == model.name)
            };
            if let Some(new_index) = listed {
                learned[new_index] = if config.models[new_index].declared == model.declared {
                    old_learned[old_index].clone()
                } else {
                    // The model changed (its declared size did): what was measured of the
                    // old one no longer says anything; its demand still does.
                    Learned {
                        demand: old_learned[old_index].demand,
                        ..Learned::default()
                    }
                };
                remap.insert(old_index, new_index);
            } else if self.instances.keys().any(|key| key.1 == old_index) {
                let mut kept = model.clone();
                kept.pinned = false;
                models.push(kept);
                learned.push(old_learned[old_index].clone());
                retired.push(true);
                remap.insert(old_index, models.len() - 1);
            }
        }
        self.instances = std::mem::take(&mut self.instances)
            .into_iter()
            .filter_map(|((session, old), instance)| {
                remap.get(&old).map(|&new| ((session, new), instance))
            })
            .collect();
        for key in self.leases.values_mut() {
            if let Some(&new) = remap.get(&key.1) {
                key.1 = new;
            }
        }
        self.queue = std::mem::take(&mut self.queue)
            .into_iter()
            .filter_map(|mut waiting| {
                let new = *remap.get(&waiting.model)?;
                if retired[new] {
                    return None;
                }
                waiting.model = new;
                Some(waiting)
            })
            .collect();
        self.config = PoolConfig { models, ..config };
        self.learned = learned;
        self.retired = retired;
        let mut out = Vec::new();
        let stale: Vec<Key> = self
            .instances
            .iter()
            .filter(|(key, i)| {
                self.retired[key.1] && i.state == InstanceState::Loaded && i.leases.is_empty()
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.start_unload(now, key, UnloadReason::Cleanup, &mut out);
        }
        self.process_queue(now, &mut out);
        out
    }

    fn is_listed(&self, model: usize) -> bool {
        !self.retired.get(model).copied().unwrap_or(true)
    }

    /// The names of the models the pool lists.
    pub fn model_names(&self) -> Vec<&str> {
        self.config
            .models
            .iter()
            .zip(&self.retired)
            .filter(|(_, retired)| !**retired)
            .map(|(m, _)| m.name.as_str())
            .collect()
    }

    /// The index of a listed model.
    fn model_index(&self, name: &str) -> Option<usize> {
        self.config
            .models
            .iter()
            .enumerate()
            .position(|(i, m)| m.name == name && !self.retired[i])
    }

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Acquires waiting for room.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// What a model needs: the larger of declared and learned, per resource.
    pub fn need(&self, model: &str) -> Option<Footprint> {
        self.model_index(model).map(|i| self.need_of(i))
    }

    /// The larger of the declared size and the largest any load measured (not the last:
    /// a model that measured small once may measure large again).
    fn need_of(&self, model: usize) -> Footprint {
        let declared = self.config.models[model].declared;
        let learned = &self.learned[model];
        match learned.measured {
            // An estimate is a guess: what loads really took replaces it (a side no reading
            // measured kept the estimate in the measurement itself).
            Some(_) if self.config.models[model].estimated => learned.peak,
            Some(_) => declared.max(beyond_noise(learned.peak, declared)),
            // Unknown size: it needs the whole ceiling, so it is admitted only alone (the
            // `Refuse` rule never lets it this far).
            None if self.size_unknown(model) => Footprint::new(
                self.config.limits.vram.unwrap_or(0),
                self.config.limits.ram.unwrap_or(0),
            ),
            None => declared,
        }
    }

    /// What loads of a listed model measured: the last and the largest (`None` before a load
    /// of it was measured, or sizes restored from before a restart were taken back).
    pub fn measured(&self, model: &str) -> Option<(Footprint, Footprint)> {
        let learned = &self.learned[self.model_index(model)?];
        learned.measured.map(|last| (last, learned.peak))
    }

    /// Whether the model's size is unknown: nothing declared or estimated, never measured.
    fn size_unknown(&self, model: usize) -> bool {
        !self.config.models[model].sized && self.learned[model].measured.is_none()
    }

    /// What was learned of each listed model that has been measured, to persist.
    pub fn learned_sizes(&self) -> BTreeMap<String, LearnedSize> {
        self.config
            .models
            .iter()
            .zip(&self.learned)
            .zip(&self.retired)
            .filter(|((_, learned), retired)| learned.measured.is_some() && !**retired)
            .map(|((model, learned), _)| {
                (
                    model.name.clone(),
                    LearnedSize {
                        declared: model.declared,
                        peak: learned.peak,
                        load_seconds: learned.load_seconds,
                    },
                )
            })
            .collect()
    }

    /// Takes back sizes learned before a restart, for the listed models whose declared size
    /// is still the one they were learned under and that have measured nothing since.
    /// Returns the models restored.
    pub fn restore_learned(&mut self, sizes: &BTreeMap<String, LearnedSize>) -> Vec<String> {
        let mut restored = Vec::new();
        for (index, model) in self.config.models.iter().enumerate() {
            let Some(size) = sizes.get(&model.name) else {
                continue;
            };
            let learned = &mut self.learned[index];
            if size.declared != model.declared || learned.measured.is_some() {
                continue;
            }
            learned.measured = Some(size.peak);
            learned.peak = size.peak;
            learned.load_seconds = size.load_seconds.filter(|s| s.is_finite() && *s >= 0.0);
            restored.push(model.name.clone());
        }
        restored
    }

    fn load_seconds(&self, model: usize) -> f64 {
        self.learned[model]
            .load_seconds
            .or(self.config.models[model].load_seconds)
            .unwrap_or(DEFAULT_LOAD_SECONDS)
    }

    /// Everything counted against the ceilings: the instances, and the models asleep.
    pub fn held(&self) -> Footprint {
        self.instances
            .values()
            .fold(Footprint::default(), |sum, i| sum.plus(i.held))
            .plus(self.asleep_total())
    }

    /// Counts (`Some`) or stops counting (`None`) what `model` holds while not loaded: a vLLM
    /// model asleep at level 1, its weights in host RAM. A model loading or loaded gets no
    /// entry (its instance counts it); one being unloaded may (set it before
    /// [`Engine::reclaimed`], so that its bytes never leave the ledger). Clearing an entry looks
    /// at the waiting acquires again.
    pub fn set_asleep(
        &mut self,
        now: Duration,
        model: &str,
        held: Option<Footprint>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        match held {
            Some(held)
                if !self.instances.iter().any(|(k, i)| {
                    matches!(i.state, InstanceState::Loading | InstanceState::Loaded)
                        && self.config.models.get(k.1).is_some_and(|m| m.name == model)
                }) =>
            {
                self.asleep.insert(model.to_owned(), held);
            }
            Some(_) => {}
            None => {
                if self.asleep.remove(model).is_some() {
                    self.process_queue(now, &mut out);
                }
            }
        }
        out
    }

    /// The models asleep and what each holds (see [`Engine::set_asleep`]).
    pub fn asleep(&self) -> &BTreeMap<String, Footprint> {
        &self.asleep
    }

    fn asleep_total(&self) -> Footprint {
        self.asleep
            .values()
            .fold(Footprint::default(), |sum, held| sum.plus(*held))
    }

    /// What reclaims that never completed still hold.
    pub fn lost(&self) -> Footprint {
        self.instances
            .values()
            .filter(|i| i.state == InstanceState::Lost)
            .fold(Footprint::default(), |sum, i| sum.plus(i.held))
    }

    /// A view of every instance, in a stable order.
    pub fn instances(&self, now: Duration) -> Vec<InstanceView> {
        self.instances
            .iter()
            .map(|(&key, i)| self.view(now, key, i))
            .collect()
    }

    /// The instance of `model` held by `session`, if any.
    pub fn instance(&self, now: Duration, session: SessionId, model: &str) -> Option<InstanceView> {
        let index = self.index_any(model)?;
        let key = (session, index);
        self.instances.get(&key).map(|i| self.view(now, key, i))
    }

    fn view(&self, now: Duration, (session, model): Key, i: &Instance) -> InstanceView {
        InstanceView {
            model: self.config.models[model].name.clone(),
            session,
            generation: i.generation,
            state: i.state,
            leases: i.leases.len(),
            held: i.held,
            declared: self.config.models[model].declared,
            measured: i.measured,
            peak: self.learned[model].peak,
            idle: if i.leases.is_empty() {
                now.saturating_sub(i.last_used)
            } else {
                Duration::ZERO
            },
            pinned: self.config.models[model].pinned,
            unload_reason: i.unload_reason,
        }
    }

    /// The live leases of a session.
    pub fn leases_of(&self, session: SessionId) -> Vec<LeaseId> {
        self.leases
            .iter()
            .filter(|(_, key)| key.0 == session)
            .map(|(lease, _)| *lease)
            .collect()
    }

    /// The session and model a lease is on.
    pub fn lease(&self, lease: LeaseId) -> Option<(SessionId, &str)> {
        self.leases
            .get(&lease)
            .map(|&(session, model)| (session, self.config.models[model].name.as_str()))
    }

    /// Asks for a model for a session. The answer (now, or later from another call) is one
    /// `Granted` or `Refused` output carrying `request`.
    pub fn acquire(
        &mut self,
        now: Duration,
        request: RequestId,
        session: SessionId,
        model: &str,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(index) = self.model_index(model) else {
            let refusal = self.refusal(
                RefusalReason::UnknownModel,
                Footprint::default(),
                format!(
                    "model {model:?} is not in the pool (it lists: {})",
                    self.model_names().join(", ")
                ),
            );
            self.refuse(request, session, model.to_owned(), refusal, &mut out);
            return out;
        };
        if self.shutting_down {
            let refusal = self.refusal(
                RefusalReason::ShuttingDown,
                self.need_of(index),
                "the sidecar is shutting down".to_owned(),
            );
            self.refuse(request, session, model.to_owned(), refusal, &mut out);
            return out;
        }
        if self.size_unknown(index) && self.config.unsized_models == crate::UnsizedModels::Refuse {
            let refusal = self.refusal(
                RefusalReason::Unsized,
                Footprint::default(),
                format!(
                    "model {model:?} has no known size (no vram or ram declared, no readable \
                     estimate of its weights, never measured) and the pool refuses such models \
                     (spec.policy.unsizedModels: Refuse); declare its vram/ram, or set \
                     unsizedModels: Alone to load it alone once and learn its size"
                ),
            );
            self.refuse(request, session, model.to_owned(), refusal, &mut out);
            return out;
        }
        let need = self.need_of(index);
        if let Some(message) = self.never_fits(session, index, need) {
            let refusal = self.refusal(RefusalReason::ExceedsCeiling, need, message);
            self.refuse(request, session, model.to_owned(), refusal, &mut out);
            return out;
        }
        self.learned[index].demand.record(now);
        self.arrivals += 1;
        self.first_arrival.get_or_insert(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Waiting {
            request,
            session,
            model: index,
            since: now,
            priority: self.config.models[index].priority,
            seq,
        });
        self.process_queue(now, &mut out);
        out
    }

    /// Withdraws a waiting acquire (the caller would rather not wait). True if it was waiting.
    pub fn cancel(&mut self, request: RequestId) -> bool {
        let before = self.queue.len();
        self.queue.retain(|w| w.request != request);
        before != self.queue.len()
    }

    /// The app reports a granted load done. `measured` is what the load added, when known.
    pub fn loaded(
        &mut self,
        now: Duration,
        session: SessionId,
        model: &str,
        measured: Option<Footprint>,
        load_seconds: Option<f64>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(index) = self.model_index(model) else {
            return out;
        };
        let key = (session, index);
        let Some(instance) = self.instances.get_mut(&key) else {
            return out;
        };
        if instance.state != InstanceState::Loading {
            return out;
        }
        instance.state = InstanceState::Loaded;
        instance.last_used = now;
        if let Some(measured) = measured {
            instance.measured = Some(measured);
        }
        let learned = &mut self.learned[index];
        if let Some(measured) = measured {
            learned.measured = Some(measured);
            learned.peak = learned.peak.max(measured);
        }
        // It holds the larger of declared and measured: a model that measured small once
        // may still grow to what its owner declared.
        let held = self.need_of(index);
        if let Some(instance) = self.instances.get_mut(&key) {
            instance.held = held;
        }
        let learned = &mut self.learned[index];
        if let Some(seconds) = load_seconds.filter(|s| s.is_finite() && *s >= 0.0) {
            // Smooth, so that one slow load (a cold page cache) does not dominate the cost.
            learned.load_seconds = Some(match learned.load_seconds {
                Some(previous) => 0.5 * previous + 0.5 * seconds,
                None => seconds,
            });
        }
        self.check_ceilings(now, &mut out);
        self.process_queue(now, &mut out);
        out
    }

    /// The app reports a granted load failed: the reservation and its leases go.
    pub fn load_failed(&mut self, now: Duration, session: SessionId, model: &str) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(index) = self.model_index(model) {
            let key = (session, index);
            if self
                .instances
                .get(&key)
                .is_some_and(|i| i.state == InstanceState::Loading)
            {
                if let Some(instance) = self.instances.remove(&key) {
                    for lease in instance.leases {
                        self.leases.remove(&lease);
                    }
                }
                self.counters.load_failures += 1;
            }
        }
        self.process_queue(now, &mut out);
        out
    }

    /// Ends a lease. In Aggressive mode the last release unloads the model at once.
    pub fn release(&mut self, now: Duration, lease: LeaseId) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(key) = self.leases.remove(&lease) else {
            return out;
        };
        let pinned = self.config.models[key.1].pinned;
        let listed = self.is_listed(key.1);
        let mode = self.config.mode;
        let Some(instance) = self.instances.get_mut(&key) else {
            return out;
        };
        instance.leases.remove(&lease);
        instance.last_used = now;
        let idle_loaded = instance.leases.is_empty() && instance.state == InstanceState::Loaded;
        if idle_loaded && !listed {
            self.start_unload(now, key, UnloadReason::Cleanup, &mut out);
        } else if idle_loaded && mode == Mode::Aggressive && !pinned {
            self.start_unload(now, key, UnloadReason::Released, &mut out);
        }
        self.process_queue(now, &mut out);
        out
    }

    /// The app reports it dropped a model; it stays held until `reclaimed`.
    pub fn unloaded(&mut self, now: Duration, session: SessionId, model: &str) -> Vec<Output> {
        let out = Vec::new();
        let Some(index) = self.index_any(model) else {
            return out;
        };
        if let Some(instance) = self.instances.get_mut(&(session, index))
            && matches!(
                instance.state,
                InstanceState::Unloading | InstanceState::Loaded
            )
            && instance.leases.is_empty()
        {
            if instance.state == InstanceState::Loaded {
                // The app unloaded on its own (e.g. its own cleanup): count it.
                instance.unload_reason = Some(UnloadReason::Cleanup);
                *self
                    .counters
                    .unloads
                    .entry(UnloadReason::Cleanup)
                    .or_default() += 1;
            }
            instance.state = InstanceState::Reclaiming;
            instance.phase_since = now;
        }
        out
    }

    /// Listed first, else a retired model that still has instances.
    fn index_any(&self, model: &str) -> Option<usize> {
        self.model_index(model)
            .or_else(|| self.config.models.iter().position(|m| m.name == model))
    }

    /// The sidecar saw an unloading instance's memory back: it leaves the ledger.
    pub fn reclaimed(&mut self, now: Duration, session: SessionId, model: &str) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(index) = self.index_any(model) else {
            return out;
        };
        let key = (session, index);
        if self.instances.get(&key).is_some_and(|i| {
            matches!(
                i.state,
                InstanceState::Unloading | InstanceState::Reclaiming | InstanceState::Lost
            ) && i.leases.is_empty()
        }) {
            self.instances.remove(&key);
        }
        self.check_ceilings(now, &mut out);
        self.process_queue(now, &mut out);
        out
    }

    /// The server no longer holds an instance (it dropped it by itself, crashed or
    /// restarted): the instance leaves the ledger at once, whatever its state, its leases end,
    /// and the unload is counted with `reason`. True when there was such an instance.
    pub fn dropped(
        &mut self,
        now: Duration,
        session: SessionId,
        model: &str,
        reason: UnloadReason,
    ) -> (bool, Vec<Output>) {
        let mut out = Vec::new();
        let removed = self
            .index_any(model)
            .and_then(|index| self.instances.remove(&(session, index)));
        let Some(instance) = removed else {
            return (false, out);
        };
        for lease in &instance.leases {
            self.leases.remove(lease);
        }
        if matches!(
            instance.state,
            InstanceState::Loading | InstanceState::Loaded
        ) {
            *self.counters.unloads.entry(reason).or_default() += 1;
        }
        self.check_ceilings(now, &mut out);
        self.process_queue(now, &mut out);
        (true, out)
    }

    /// A session ended (closed, timed out or its process died): its leases end, its waiting
    /// acquires are dropped, and its instances wait for their memory to be seen freed.
    pub fn session_gone(&mut self, now: Duration, session: SessionId) -> Vec<Output> {
        let mut out = Vec::new();
        self.queue.retain(|w| w.session != session);
        self.leases.retain(|_, key| key.0 != session);
        let keys: Vec<Key> = self
            .instances
            .keys()
            .filter(|key| key.0 == session)
            .copied()
            .collect();
        for key in keys {
            let Some(instance) = self.instances.get_mut(&key) else {
                continue;
            };
            instance.leases.clear();
            if matches!(
                instance.state,
                InstanceState::Loading | InstanceState::Loaded | InstanceState::Unloading
            ) {
                if instance.state != InstanceState::Unloading {
                    *self
                        .counters
                        .unloads
                        .entry(UnloadReason::SessionGone)
                        .or_default() += 1;
                    instance.unload_reason = Some(UnloadReason::SessionGone);
                }
                instance.state = InstanceState::Reclaiming;
                instance.phase_since = now;
            }
        }
        self.process_queue(now, &mut out);
        out
    }

    /// Unloads idle instances. `force` includes pinned ones (the seed's `force_cleanup`);
    /// leased instances are never unloaded. Returns the outputs and the models skipped
    /// because they are leased.
    pub fn cleanup(&mut self, now: Duration, force: bool) -> (Vec<Output>, Vec<String>) {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        let keys: Vec<Key> = self.instances.keys().copied().collect();
        for key in keys {
            let pinned = self.config.models[key.1].pinned;
            let Some(instance) = self.instances.get(&key) else {
                continue;
            };
            if instance.state != InstanceState::Loaded {
                continue;
            }
            if !instance.leases.is_empty() {
                skipped.push(self.config.models[key.1].name.clone());
                continue;
            }
            if pinned && !force {
                continue;
            }
            self.start_unload(now, key, UnloadReason::Cleanup, &mut out);
        }
        self.process_queue(now, &mut out);
        (out, skipped)
    }

    /// Stops admitting: waiting acquires are refused and idle instances unloaded.
    pub fn shutdown(&mut self, now: Duration) -> Vec<Output> {
        self.shutting_down = true;
        let mut out = Vec::new();
        for waiting in std::mem::take(&mut self.queue) {
            let need = self.need_of(waiting.model);
            let refusal = self.refusal(
                RefusalReason::ShuttingDown,
                need,
                "the sidecar is shutting down".to_owned(),
            );
            let model = self.config.models[waiting.model].name.clone();
            self.refuse(waiting.request, waiting.session, model, refusal, &mut out);
        }
        let idle: Vec<Key> = self
            .instances
            .iter()
            .filter(|(_, i)| i.state == InstanceState::Loaded && i.leases.is_empty())
            .map(|(key, _)| *key)
            .collect();
        for key in idle {
            self.start_unload(now, key, UnloadReason::Shutdown, &mut out);
        }
        out
    }

    /// Advances time: idle TTL, acquire and reclaim timeouts, pressure and ceiling checks.
    pub fn tick(&mut self, now: Duration, readings: Readings) -> Vec<Output> {
        self.readings = readings;
        let mut out = Vec::new();

        // Reclaims that take too long become lost capacity, reported once.
        let timeout = self.config.reclaim_timeout;
        let stalled: Vec<Key> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                matches!(
                    i.state,
                    InstanceState::Unloading | InstanceState::Reclaiming
                ) && now.saturating_sub(i.phase_since) >= timeout
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stalled {
            if let Some(instance) = self.instances.get_mut(&key) {
                instance.state = InstanceState::Lost;
                self.counters.not_reclaimed += 1;
                out.push(Output::MemoryNotReclaimed {
                    session: key.0,
                    model: self.config.models[key.1].name.clone(),
                    generation: instance.generation,
                    held: instance.held,
                });
            }
        }

        if self.config.mode == Mode::Cache {
            let ttl = self.config.idle_ttl;
            let expired: Vec<Key> = self
                .instances
                .iter()
                .filter(|(key, i)| {
                    i.state == InstanceState::Loaded
                        && i.leases.is_empty()
                        && !self.config.models[key.1].pinned
                        && now.saturating_sub(i.last_used) >= ttl
                })
                .map(|(key, _)| *key)
                .collect();
            for key in expired {
                self.start_unload(now, key, UnloadReason::IdleTtl, &mut out);
            }
        }

        self.relieve_pressure(now, &mut out);
        self.check_ceilings(now, &mut out);

        let acquire_timeout = self.config.acquire_timeout;
        let (expired, waiting): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|w| now.saturating_sub(w.since) >= acquire_timeout);
        self.queue = waiting;
        for waiting in expired {
            let need = self.need_of(waiting.model);
            let model = self.config.models[waiting.model].name.clone();
            let message = format!(
                "model {model:?} waited {:.1} s (acquireTimeout) for room: {}{}",
                now.saturating_sub(waiting.since).as_secs_f64(),
                self.room_sentence(need),
                self.unsized_note(waiting.model),
            );
            let refusal = self.refusal(RefusalReason::Timeout, need, message);
            self.refuse(waiting.request, waiting.session, model, refusal, &mut out);
        }
        self.process_queue(now, &mut out);
        out
    }

    /// Whether `model` fits now beside what is held, without evicting anything: a model that
    /// is already in memory (loaded on a server behind the sidecar's back, or re-announced by
    /// an app) is adopted only so, since evicting another for it could still end in refusing
    /// it. `Err` says why, with the numbers.
    pub fn fits_without_eviction(&self, model: &str) -> Result<(), String> {
        let Some(index) = self.model_index(model) else {
            return Err(format!("model {model:?} is not in the pool"));
        };
        let need = self.need_of(index);
        if self.fits(need) {
            Ok(())
        } else {
            Err(format!(
                "it does not fit beside what is held: need {need}; {}",
                self.room_sentence(need)
            ))
        }
    }

    /// The seed's `check_memory_available`: would `need` fit now, or after evicting idle
    /// (unpinned) instances?
    pub fn check(&self, need: Footprint) -> CheckResult {
        let held = self.held();
        let reclaimable = self.reclaimable();
        let mut available = true;
        let mut free = [None, None];
        for (slot, resource) in Resource::ALL.into_iter().enumerate() {
            let room = self.room(resource, held);
            free[slot] = room;
            if let Some(room) = room
                && need.get(resource) > room.saturating_add(reclaimable.get(resource))
            {
                available = false;
            }
        }
        let message = format!(
            "{} {}: need {}; {}",
            if available { "fits" } else { "does not fit" },
            if available && !self.fits(need) {
                "after evicting idle models"
            } else {
                "now"
            },
            need,
            self.room_sentence(need)
        );
        CheckResult {
            available,
            free_vram: free[0],
            free_ram: free[1],
            reclaimable,
            message,
        }
    }

    // ---- internals ----

    /// Room left for one resource: the smaller of ceiling room and device room.
    fn room(&self, resource: Resource, held: Footprint) -> Option<u64> {
        let ceiling_room = self
            .config
            .limits
            .get(resource)
            .map(|limit| limit.saturating_sub(held.get(resource)));
        // Loads granted but not reported are not yet visible on the device.
        let pending = self
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Loading)
            .fold(0u64, |sum, i| sum.saturating_add(i.held.get(resource)));
        let device = match resource {
            Resource::Vram => self.readings.vram,
            Resource::Ram => self.readings.ram,
        };
        let device_room =
            device.map(|(used, total)| total.saturating_sub(used).saturating_sub(pending));
        match (ceiling_room, device_room) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fits(&self, need: Footprint) -> bool {
        let held = self.held();
        Resource::ALL.into_iter().all(|r| {
            // Nothing is loaded while the ledger is over a ceiling (a model grew past what it
            // declared), not even a model whose learned size is zero.
            let over = self
                .config
                .limits
                .get(r)
                .is_some_and(|limit| held.get(r) > limit);
            !over && self.room(r, held).is_none_or(|room| need.get(r) <= room)
        })
    }

    fn reclaimable(&self) -> Footprint {
        self.instances
            .iter()
            .filter(|(key, i)| {
                i.state == InstanceState::Loaded
                    && i.leases.is_empty()
                    && !self.config.models[key.1].pinned
            })
            .fold(Footprint::default(), |sum, (_, i)| sum.plus(i.held))
    }

    /// `Some(reason)` when the model can never fit: above a ceiling, or above what pinned
    /// instances leave of it.
    /// Why `model` can never fit for `session`: its need is above a ceiling less what pinned
    /// models hold, the session's own instance of it excepted (that one is a `use`, not room
    /// to find).
    fn never_fits(&self, session: SessionId, model: usize, need: Footprint) -> Option<String> {
        let name = &self.config.models[model].name;
        for resource in Resource::ALL {
            let Some(limit) = self.config.limits.get(resource) else {
                continue;
            };
            let pinned: u64 = self
                .instances
                .iter()
                .filter(|(key, _)| **key != (session, model) && self.config.models[key.1].pinned)
                .map(|(_, i)| i.held.get(resource))
                .sum();
            if need.get(resource) > limit.saturating_sub(pinned) {
                return Some(format!(
                    "model {name:?} needs {} of {resource}, above the ceiling of {}{}{}",
                    human_bytes(need.get(resource)),
                    human_bytes(limit),
                    if pinned > 0 {
                        format!(" less {} held by pinned models", human_bytes(pinned))
                    } else {
                        String::new()
                    },
                    self.unsized_note(model),
                ));
            }
        }
        None
    }

    /// For refusals: why an unsized model needs the whole ceiling.
    fn unsized_note(&self, model: usize) -> &'static str {
        if self.size_unknown(model) {
            " (its size is unknown: nothing declared, no readable estimate, never measured; \
             until a load is measured it needs the whole ceiling and is admitted only alone, \
             spec.policy.unsizedModels: Alone)"
        } else {
            ""
        }
    }

    fn holders(&self) -> Vec<Holder> {
        self.instances
            .iter()
            .map(|(&(session, model), i)| Holder {
                model: self.config.models[model].name.clone(),
                session,
                held: i.held,
                leases: i.leases.len(),
                pinned: self.config.models[model].pinned,
                state: i.state,
            })
            .collect()
    }

    /// "ceiling 16.0 GiB of ram, 14.0 GiB held by t2v (2.0 GiB, 1 lease), ...; 0 B could be
    /// freed by evicting idle models"
    fn room_sentence(&self, need: Footprint) -> String {
        let held = self.held();
        let mut text = String::new();
        let resources: Vec<Resource> = Resource::ALL
            .into_iter()
            .filter(|r| need.get(*r) > 0 || self.config.limits.get(*r).is_some())
            .collect();
        for (n, resource) in resources.iter().enumerate() {
            if n > 0 {
                text.push_str("; ");
            }
            let _ = write!(text, "{resource}: ");
            match self.config.limits.get(*resource) {
                Some(limit) => {
                    let _ = write!(text, "ceiling {}", human_bytes(limit));
                }
                None => text.push_str("no ceiling"),
            }
            if let Some((used, total)) = match resource {
                Resource::Vram => self.readings.vram,
                Resource::Ram => self.readings.ram,
            } {
                let _ = write!(
                    text,
                    ", device {} used of {}",
                    human_bytes(used),
                    human_bytes(total)
                );
            }
            let _ = write!(text, ", {} held", human_bytes(held.get(*resource)));
            let holders: Vec<String> = self
                .holders()
                .into_iter()
                .filter(|h| h.held.get(*resource) > 0)
                .map(|h| {
                    let mut detail = format!(
                        "{} {}",
                        human_bytes(h.held.get(*resource)),
                        state_word(h.state)
                    );
                    if h.leases > 0 {
                        let _ = write!(
                            detail,
                            ", {} lease{}",
                            h.leases,
                            if h.leases == 1 { "" } else { "s" }
                        );
                    }
                    if h.pinned {
                        detail.push_str(", pinned");
                    }
                    format!("{} ({detail})", h.model)
                })
                .collect();
            let asleep = self
                .asleep
                .iter()
                .filter(|(_, held)| held.get(*resource) > 0)
                .map(|(model, held)| {
                    format!("{model} ({} asleep)", human_bytes(held.get(*resource)))
                });
            let holders: Vec<String> = holders.into_iter().chain(asleep).collect();
            if !holders.is_empty() {
                let _ = write!(text, " by {}", holders.join(", "));
            }
        }
        let _ = write!(
            text,
            "; {} could be freed by evicting idle models",
            self.reclaimable()
        );
        text
    }

    fn refusal(&self, reason: RefusalReason, need: Footprint, message: String) -> Refusal {
        Refusal {
            reason,
            need,
            ceiling_vram: self.config.limits.vram,
            ceiling_ram: self.config.limits.ram,
            held: self.held(),
            reclaimable: self.reclaimable(),
            holders: self.holders(),
            message: if reason == RefusalReason::ExceedsCeiling {
                format!("{message}; {}", self.room_sentence(need))
            } else {
                message
            },
        }
    }

    fn refuse(
        &mut self,
        request: RequestId,
        session: SessionId,
        model: String,
        refusal: Refusal,
        out: &mut Vec<Output>,
    ) {
        *self
            .counters
            .refusals
            .entry(refusal.reason.as_str())
            .or_default() += 1;
        out.push(Output::Refused {
            request,
            session,
            model,
            refusal: Box::new(refusal),
        });
    }

    fn start_unload(
        &mut self,
        now: Duration,
        key: Key,
        reason: UnloadReason,
        out: &mut Vec<Output>,
    ) {
        let Some(instance) = self.instances.get_mut(&key) else {
            return;
        };
        debug_assert!(instance.leases.is_empty(), "never unload a leased instance");
        if instance.state != InstanceState::Loaded || !instance.leases.is_empty() {
            return;
        }
        instance.state = InstanceState::Unloading;
        instance.unload_reason = Some(reason);
        instance.phase_since = now;
        *self.counters.unloads.entry(reason).or_default() += 1;
        let generation = instance.generation;
        out.push(Output::Unload {
            session: key.0,
            model: self.config.models[key.1].name.clone(),
            generation,
            reason,
        });
    }

    /// The pool's mean time between requests times the number of models it lists: the gap
    /// a model would have if all were equally popular (for models not yet asked for twice).
    fn prior_gap_s(&self, now: Duration) -> f64 {
        let models = self.retired.iter().filter(|r| !**r).count().max(1) as f64;
        match self.first_arrival {
            Some(first) if self.arrivals > 0 => {
                now.saturating_sub(first).as_secs_f64() / self.arrivals as f64 * models
            }
            _ => 0.0,
        }
    }

    /// Idle, unpinned, loaded instances, as eviction candidates.
    fn candidates(&self, now: Duration) -> Vec<Candidate<Key>> {
        let prior = self.prior_gap_s(now);
        self.instances
            .iter()
            .filter(|(key, i)| {
                i.state == InstanceState::Loaded
                    && i.leases.is_empty()
                    && !self.config.models[key.1].pinned
            })
            .map(|(key, i)| Candidate {
                key: *key,
                priority: self.config.models[key.1].priority,
                last_used: i.last_used,
                held: i.held,
                loss: self.load_seconds(key.1) / self.learned[key.1].demand.next_s(now, prior),
                size: eviction::size(i.held, self.config.limits),
            })
            .collect()
    }

    /// Idle, unpinned, loaded instances in eviction order.
    fn eviction_order(&self, now: Duration) -> Vec<Key> {
        let mut candidates = self.candidates(now);
        eviction::order(self.config.eviction, &mut candidates);
        candidates.into_iter().map(|c| c.key).collect()
    }

    /// Bytes already on their way back (unloads decided but not yet reclaimed).
    fn in_flight(&self) -> Footprint {
        self.instances
            .values()
            .filter(|i| {
                matches!(
                    i.state,
                    InstanceState::Unloading | InstanceState::Reclaiming
                )
            })
            .fold(Footprint::default(), |sum, i| sum.plus(i.held))
    }

    /// Serves waiting acquires in order (priority, then arrival). The first one that cannot
    /// be served becomes the blocked head, and the evictions that will make its room start.
    /// While that room is coming back nothing may pass it. While it waits for leases to end
    /// instead (no telling when), later requests that fit in the room there is now may pass,
    /// but only until it has waited half its acquire timeout, so that small requests cannot
    /// starve a big one. A request for a copy already loaded in its session is served
    /// whatever waits before it: it takes no room. (Holding those back behind a head that
    /// waited on leases made them wait, and time out, for nothing: found by the eviction
    /// benchmark's `diurnal` trace.)
    fn process_queue(&mut self, now: Duration, out: &mut Vec<Output>) {
        if self.shutting_down {
            return;
        }
        self.queue
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
        let mut blocked_head: Option<Duration> = None;
        // Once closed, only requests for a loaded copy are served (they take no room).
        let mut closed = false;
        let mut index = 0;
        while index < self.queue.len() {
            let waiting = self.queue[index].clone();
            let key = (waiting.session, waiting.model);
            match self.instances.get(&key).map(|i| i.state) {
                Some(InstanceState::Loaded) => {
                    self.queue.remove(index);
                    self.grant(now, &waiting, Action::Use, out);
                    continue;
                }
                // Its own copy is loading, or on its way out: wait without blocking others.
                Some(_) => {
                    index += 1;
                    continue;
                }
                None => {}
            }
            let need = self.need_of(waiting.model);
            if let Some(message) = self.never_fits(waiting.session, waiting.model, need) {
                self.queue.remove(index);
                let refusal = self.refusal(RefusalReason::ExceedsCeiling, need, message);
                let model = self.config.models[waiting.model].name.clone();
                self.refuse(waiting.request, waiting.session, model, refusal, out);
                continue;
            }
            if closed {
                index += 1;
                continue;
            }
            if let Some(head_since) = blocked_head
                && now.saturating_sub(head_since) >= self.config.acquire_timeout / 2
            {
                closed = true;
                index += 1;
                continue;
            }
            // Waking an asleep model frees its own host copy: admitted net of it.
            let name = &self.config.models[waiting.model].name;
            let own = self.asleep.get(name).copied().unwrap_or_default();
            if self.fits(need.minus(own)) {
                self.asleep
                    .remove(&self.config.models[waiting.model].name.clone());
                self.queue.remove(index);
                let generation = self.next_generation;
                self.next_generation += 1;
                self.instances.insert(
                    key,
                    Instance {
                        generation,
                        state: InstanceState::Loading,
                        leases: BTreeSet::new(),
                        held: need,
                        measured: None,
                        last_used: now,
                        unload_reason: None,
                        phase_since: now,
                    },
                );
                self.counters.loads += 1;
                self.grant(now, &waiting, Action::Load, out);
                continue;
            }
            if blocked_head.is_none() {
                self.make_room(now, need.minus(own), out);
                // Room is on its way back for it: nothing may pass and take that room.
                closed = !self.in_flight().is_zero();
                blocked_head = Some(waiting.since);
            }
            index += 1;
        }
    }

    /// Starts evicting idle instances until `need` would fit once they are reclaimed,
    /// counting unloads already under way.
    fn make_room(&mut self, now: Duration, need: Footprint, out: &mut Vec<Output>) {
        let held = self.held();
        // Room does not change while unloads start (they count as held until reclaimed).
        let rooms = Resource::ALL.map(|r| self.room(r, held));
        let short_of = |r: Resource, coming_back: Footprint| -> bool {
            let slot = if r == Resource::Vram { 0 } else { 1 };
            rooms[slot].is_some_and(|room| need.get(r) > room.saturating_add(coming_back.get(r)))
        };
        let short =
            |coming_back: Footprint| Resource::ALL.into_iter().any(|r| short_of(r, coming_back));
        let coming_back = self.in_flight();
        if !short(coming_back) {
            return;
        }
        // Only evict when evicting everything idle would be enough; otherwise leases must
        // end first, and unloading now would cost reloads for nothing.
        if short(coming_back.plus(self.reclaimable())) {
            return;
        }
        let missing = |r: Resource| {
            let slot = if r == Resource::Vram { 0 } else { 1 };
            rooms[slot].map_or(0, |room| {
                need.get(r)
                    .saturating_sub(room.saturating_add(coming_back.get(r)))
            })
        };
        let missing = Footprint::new(missing(Resource::Vram), missing(Resource::Ram));
        let victims = eviction::choose(self.config.eviction, &self.candidates(now), missing);
        for key in victims {
            self.start_unload(now, key, UnloadReason::Evicted, out);
        }
    }

    fn grant(&mut self, now: Duration, waiting: &Waiting, action: Action, out: &mut Vec<Output>) {
        let lease = LeaseId(self.next_lease);
        self.next_lease += 1;
        let key = (waiting.session, waiting.model);
        let mut generation = 0;
        if let Some(instance) = self.instances.get_mut(&key) {
            generation = instance.generation;
            instance.leases.insert(lease);
            instance.last_used = now;
        }
        self.leases.insert(lease, key);
        out.push(Output::Granted {
            request: waiting.request,
            session: waiting.session,
            model: self.config.models[waiting.model].name.clone(),
            lease,
            generation,
            action,
            waited: now.saturating_sub(waiting.since),
        });
    }

    /// Evicts idle instances while device VRAM or pod RAM is above its pressure threshold.
    fn relieve_pressure(&mut self, now: Duration, out: &mut Vec<Output>) {
        let thresholds = [
            (
                Resource::Vram,
                self.readings.vram,
                self.config.pressure_vram_percent,
            ),
            (
                Resource::Ram,
                self.readings.ram,
                self.config.pressure_ram_percent,
            ),
        ];
        for (resource, reading, percent) in thresholds {
            let Some((used, total)) = reading else {
                continue;
            };
            if total == 0 {
                continue;
            }
            let allowed = (u128::from(total) * u128::from(percent) / 100) as u64;
            if used <= allowed {
                continue;
            }
            let mut excess = (used - allowed).saturating_sub(self.in_flight().get(resource));
            let claimed_by = match resource {
                Resource::Vram => self.readings.vram_claimed_by,
                Resource::Ram => None,
            };
            for key in self.eviction_order(now) {
                if excess == 0 {
                    break;
                }
                if claimed_by.is_some_and(|session| key.0 != session) {
                    continue;
                }
                let Some(instance) = self.instances.get(&key) else {
                    continue;
                };
                let bytes = instance.held.get(resource);
                if bytes == 0 {
                    continue;
                }
                excess = excess.saturating_sub(bytes);
                self.start_unload(now, key, UnloadReason::Pressure, out);
            }
        }
    }

    /// Reports a ceiling breach on its transition and, when enforcing, evicts idle instances.
    fn check_ceilings(&mut self, now: Duration, out: &mut Vec<Output>) {
        for (slot, resource) in Resource::ALL.into_iter().enumerate() {
            let Some(limit) = self.config.limits.get(resource) else {
                self.over_ceiling[slot] = false;
                continue;
            };
            let held = self.held().get(resource);
            let over = held > limit;
            if over && !self.over_ceiling[slot] {
                *self
                    .counters
                    .ceiling_breaches
                    .entry(resource.as_str())
                    .or_default() += 1;
                out.push(Output::CeilingExceeded {
                    resource,
                    held,
                    limit,
                });
            }
            self.over_ceiling[slot] = over;
            if over && self.config.evict_over_ceiling {
                let mut excess = (held - limit).saturating_sub(self.in_flight().get(resource));
                for key in self.eviction_order(now) {
                    if excess == 0 {
                        break;
                    }
                    let bytes = self.instances.get(&key).map_or(0, |i| i.held.get(resource));
                    if bytes == 0 {
                        continue;
                    }
                    excess = excess.saturating_sub(bytes);
                    self.start_unload(now, key, UnloadReason::Ceiling, out);
                }
            }
        }
    }
}

/// A measurement this close above a declared size is measurement noise (RSS moves by pages
/// with allocator and page-cache churn), not a bigger model.
pub fn measurement_noise(declared: u64) -> u64 {
    (1 << 20).max(declared / 200)
}

/// `measured`, except where a resource is declared and measured within
/// [`measurement_noise`] above it: there the declared size stands. Admission counted the
/// declared size, so noise alone never puts the accounted total over a ceiling (seen before:
/// 16 KiB over a 40 MiB ceiling under 200 clients, each a breach and an eviction).
fn beyond_noise(measured: Footprint, declared: Footprint) -> Footprint {
    let pick = |m: u64, d: u64| {
        if d > 0 && m > d && m - d <= measurement_noise(d) {
            d
        } else {
            m
        }
    };
    Footprint::new(
        pick(measured.vram, declared.vram),
        pick(measured.ram, declared.ram),
    )
}

fn state_word(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Loading => "loading",
        InstanceState::Loaded => "loaded",
        InstanceState::Unloading => "unloading",
        InstanceState::Reclaiming => "reclaiming",
        InstanceState::Lost => "not reclaimed",
    }
}
