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

mod events;
mod room;
mod schedule;

pub use events::*;

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
    /// Each model's time between requests, fixed from outside instead of learned (by index in
    /// the pool's list): the eviction benchmark's `rate_oracle` reference only.
    known_gaps: Option<Vec<f64>>,
}

impl Engine {
    /// Fixes each model's expected time between requests, in seconds, by index in the pool's
    /// list, instead of learning it from its requests (`None`: learn again). For the eviction
    /// benchmark's `rate_oracle` reference, an online policy told every model's true long-run
    /// request rate: what is left between it and the clairvoyant schedule is the order of the
    /// requests, which no rate estimate can know. The sidecar never sets it; a pool edit clears it.
    pub fn set_known_gaps(&mut self, gaps: Option<Vec<f64>>) {
        self.known_gaps = gaps;
    }

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
            known_gaps: None,
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
        self.known_gaps = None;
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
                .evictable()
                .filter(|(_, i)| now.saturating_sub(i.last_used) >= ttl)
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
