//! The decision core: one synchronous, pure object that owns the sidecar's state (sessions,
//! leases, placeholders, waiting acquires, reclaim tracks, the policy engine) and turns each
//! event into effects.
//!
//! ```text
//!  shell (shell/): take readings (meter, clock) ─► lock ─► Core::<event>(now, readings, &mut fx)
//!                                                              │ engine outputs ─► apply (apply.rs)
//!                                                              ▼
//!                   answers (return value, waiting acquires' oneshots), Effects: driver unloads,
//!                   command streams, pids to watch, reclaims seen, the last error; counters
//!  shell: unlock ─► run the effects (driver calls, logs with memory lines)
//! ```
//!
//! No I/O, no meter and no clock in here: `now` (time since the sidecar started) and every
//! reading come in as arguments, so the whole core runs in unit tests with a fake clock and
//! fake readings (`tests.rs`). The async shell (`shell/`) stays thin.
//!
//! An instance is keyed by the session that holds it; with the `Http` driver the app server
//! itself is the holder ([`APP_HOLDER`]) and leases belong to the client sessions. Every
//! instance has a generation (from the engine): commands and acknowledgements name it, so a
//! stale command can never free or count a later load.

mod apply;
mod leases;
pub mod reclaim;
pub mod server;
pub mod sessions;
#[cfg(test)]
mod tests;
mod views;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use modelpool_policy::{
    Action, Engine, Footprint, InstanceState, LeaseId, Output, Readings, Refusal, RequestId,
    SessionId, Sizes, UnloadReason,
};
use tokio::sync::oneshot;

pub use self::{
    reclaim::{ProcessNow, SeenBy, Track},
    server::{ServerPoll, ServerTrack},
    sessions::{APP_HOLDER, LeaseInfo, Session, lease_name, parse_id, session_name},
};
use crate::{
    api::wire::{self, AppReadings},
    measure::{GpuDevice, GpuReading, RamReading, Source},
    metrics::{DeviceGauges, Gauges, Metrics, ModelGauges},
    pool::{LoadedPool, PoolInfo},
};

/// Sessions whose pid the sidecar sees are asked for heartbeats this many times less often
/// than the configured interval: their death is seen on the process, read every base interval.
/// (At the base 2 s, 100 sessions' heartbeats cost 0.8 % of a core.)
pub const VISIBLE_PID_HEARTBEAT_FACTOR: u32 = 5;

/// The answer to an acquire.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Granted.
    Granted {
        /// The lease.
        lease: LeaseId,
        /// Use or load.
        action: Action,
        /// Who holds the instance.
        holder: SessionId,
        /// Which instance.
        generation: u64,
    },
    /// Refused.
    Refused(Box<Refusal>),
}

/// What an acquire call learns at once.
#[derive(Debug)]
pub enum First {
    /// Answered now.
    Now(Verdict),
    /// `"wait": false` and no room yet: why.
    Wait(String),
    /// Queued: the answer comes on the sender given.
    Queued(RequestId),
}

/// Why a request about a session, lease, model or instance cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No such open session.
    #[error("unknown session {0:?}")]
    Session(String),
    /// No such live lease of the session.
    #[error("unknown lease {lease:?} of session {session:?}")]
    Lease {
        /// The lease.
        lease: String,
        /// The session.
        session: String,
    },
    /// Models the pool does not list.
    #[error("models not in the pool: {names:?} (it lists: {listed})")]
    Model {
        /// The unknown names.
        names: Vec<String>,
        /// The pool's models.
        listed: String,
    },
    /// The sidecar is stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// A heartbeat's readings cannot be true (the heartbeat itself still counts).
    #[error("readings of session {session} refused: {why}")]
    Readings {
        /// The session.
        session: String,
        /// What is impossible about them, with the numbers.
        why: String,
    },
    /// An acknowledgement names an instance the session does not hold (any more).
    #[error(
        "session {session} holds no generation {generation} of model {model:?} ({}): a stale acknowledgement, nothing changed",
        match current { Some(g) => format!("it holds generation {g}"), None => "it holds no instance of it".to_owned() }
    )]
    StaleInstance {
        /// The session.
        session: String,
        /// The model.
        model: String,
        /// The generation acknowledged.
        generation: u64,
        /// The generation the session holds now, if any.
        current: Option<u64>,
    },
    /// An acknowledgement repeats one already taken.
    #[error(
        "generation {generation} of model {model:?} in session {session} was already reported unloaded (state {state}): a duplicate acknowledgement, nothing changed"
    )]
    AlreadyUnloaded {
        /// The session.
        session: String,
        /// The model.
        model: String,
        /// The generation acknowledged.
        generation: u64,
        /// Its state.
        state: &'static str,
    },
    /// The instance cannot be unloaded now.
    #[error(
        "generation {generation} of model {model:?} in session {session} cannot be reported unloaded: {why}; nothing changed"
    )]
    NotUnloadable {
        /// The session.
        session: String,
        /// The model.
        model: String,
        /// The generation acknowledged.
        generation: u64,
        /// Why (still loading, leases live).
        why: String,
    },
}

/// A driver call the shell makes after the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unload {
    /// Who holds the instance.
    pub holder: SessionId,
    /// The model.
    pub model: String,
    /// The instance.
    pub generation: u64,
    /// Why.
    pub reason: UnloadReason,
}

/// What the shell carries out once the lock is released.
#[derive(Debug, Default)]
pub struct Effects {
    /// Unloads to ask of the driver.
    pub unloads: Vec<Unload>,
    /// Sessions whose command stream opens.
    pub streams_opened: Vec<SessionId>,
    /// Sessions whose command stream closes (pending commands dropped).
    pub streams_closed: Vec<SessionId>,
    /// Commands answered: (session, model, generation).
    pub answered: Vec<(SessionId, String, u64)>,
    /// Pids to measure from now on (`Some`) or no more (`None`), by session.
    pub watch: Vec<(SessionId, Option<u32>)>,
    /// Instances whose memory was seen back (for the memory log line).
    pub reclaimed: Vec<(SessionId, String, SeenBy)>,
    /// A problem worth reporting on the pod's report.
    pub last_error: Option<String>,
}

impl Effects {
    /// Whether anything is to be done (besides waking watchers).
    pub fn is_empty(&self) -> bool {
        self.unloads.is_empty()
            && self.streams_opened.is_empty()
            && self.streams_closed.is_empty()
            && self.answered.is_empty()
            && self.watch.is_empty()
            && self.reclaimed.is_empty()
            && self.last_error.is_none()
    }
}

/// Readings of the latest measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Devices, or why none.
    pub gpu: GpuReading,
    /// Pod memory.
    pub ram: RamReading,
}

/// Everything a tick needs, read before the lock.
#[derive(Debug, Clone)]
pub struct TickReadings {
    /// Devices (from the sidecar's own meter).
    pub gpu: GpuReading,
    /// Pod memory.
    pub ram: RamReading,
    /// Every watched pid.
    pub processes: BTreeMap<u32, ProcessNow>,
    /// The GPUs (device indexes) the watched pids hold memory on; empty when unknown.
    pub pod_devices: BTreeSet<u32>,
}

/// What the core needs to know of the sidecar's setup.
#[derive(Debug, Clone, Copy)]
pub struct CoreConfig {
    /// Heartbeat interval asked of sessions (two missed: the session ends).
    pub heartbeat: Duration,
    /// The driver loads and unloads itself (Http): the app server holds the instances.
    pub app_server: bool,
}

/// What a `/v1/loaded` report taught, for the shell's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedReport {
    /// The session that reported.
    pub client: SessionId,
    /// The model.
    pub model: String,
    /// What the sidecar measured.
    pub sidecar: Sizes,
    /// What the app reported.
    pub app: Sizes,
}

/// The decision core. See the module docs.
pub struct Core {
    config: CoreConfig,
    engine: Engine,
    pool: PoolInfo,
    metrics: Metrics,
    sessions: BTreeMap<SessionId, Session>,
    next_session: u64,
    next_request: u64,
    waiters: HashMap<RequestId, (SessionId, oneshot::Sender<Verdict>)>,
    immediate: HashMap<RequestId, Verdict>,
    leases: BTreeMap<LeaseId, LeaseInfo>,
    tracks: BTreeMap<(SessionId, String), Track>,
    /// Leases kept for models re-announced as in use (`holds[].leases > 0`): the session's
    /// first release of that model releases this one too, so an Aggressive pool does not
    /// unload a model under a running block, and unloads it when the block ends.
    placeholders: BTreeMap<(SessionId, String), LeaseId>,
    /// Pids of ended sessions whose models still wait for reclaim.
    dead_pids: BTreeMap<SessionId, u32>,
    measured: Measured,
    shutting_down: bool,
    /// Server drivers: what the core knows of the server (`server.rs`).
    server: ServerTrack,
    /// Reclaims since start by how they were seen (`SeenBy`): `unverified` ones are shown
    /// apart in `/v1/state` and the pod report, never as proven.
    reclaims: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("pool", &self.pool.name)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// The name of a state on the wire and in logs (the policy crate's one spelling).
pub fn state_name(state: InstanceState) -> &'static str {
    state.as_str()
}

impl Core {
    /// A core enforcing `pool`; session ids start at `first_session`.
    pub fn new(
        pool: LoadedPool,
        config: CoreConfig,
        metrics: Metrics,
        first_session: u64,
        measured: Measured,
    ) -> Self {
        Self {
            config,
            engine: Engine::new(pool.config),
            pool: pool.info,
            metrics,
            sessions: BTreeMap::new(),
            next_session: first_session,
            next_request: 1,
            waiters: HashMap::new(),
            immediate: HashMap::new(),
            leases: BTreeMap::new(),
            tracks: BTreeMap::new(),
            placeholders: BTreeMap::new(),
            dead_pids: BTreeMap::new(),
            measured,
            shutting_down: false,
            server: ServerTrack::default(),
            reclaims: BTreeMap::new(),
        }
    }

    // ---- views ----

    /// The pool in force.
    pub fn pool(&self) -> &PoolInfo {
        &self.pool
    }

    /// What was learned of each measured model's size, to persist.
    pub fn learned_sizes(&self) -> BTreeMap<String, modelpool_policy::LearnedSize> {
        self.engine.learned_sizes()
    }

    /// Takes back sizes learned before a restart ([`Engine::restore_learned`]).
    pub fn restore_learned(
        &mut self,
        sizes: &BTreeMap<String, modelpool_policy::LearnedSize>,
    ) -> Vec<String> {
        self.engine.restore_learned(sizes)
    }

    /// The engine (read-only: views and checks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether SIGTERM was received.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// The open sessions.
    pub fn sessions(&self) -> &BTreeMap<SessionId, Session> {
        &self.sessions
    }

    /// Live lease records.
    pub fn leases(&self) -> &BTreeMap<LeaseId, LeaseInfo> {
        &self.leases
    }

    /// Acquires waiting for an answer.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Pids whose instances still wait for reclaim after their session ended.
    pub fn dead_pids(&self) -> &BTreeMap<SessionId, u32> {
        &self.dead_pids
    }

    /// Reclaim tracks.
    pub fn tracks(&self) -> &BTreeMap<(SessionId, String), Track> {
        &self.tracks
    }

    /// Every pid the shell should read at a tick: open sessions' and ended ones still
    /// waiting for reclaim.
    pub fn watched(&self) -> BTreeMap<SessionId, u32> {
        let mut pids: BTreeMap<SessionId, u32> =
            self.sessions.iter().map(|(id, s)| (*id, s.pid)).collect();
        pids.extend(self.dead_pids.iter().map(|(id, pid)| (*id, *pid)));
        pids
    }

    /// A session's id from its name, if open.
    pub fn session_id(&self, name: &str) -> Result<SessionId, LookupError> {
        parse_id(name, "s-")
            .map(SessionId)
            .filter(|id| self.sessions.contains_key(id))
            .ok_or_else(|| LookupError::Session(name.to_owned()))
    }

    /// Whether a session is still open.
    pub fn session_open(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// The instances of a session waiting for its unload: (model, generation). A command for
    /// anything else is obsolete.
    pub fn unloading(&self, now: Duration, id: SessionId) -> Vec<(String, u64)> {
        self.engine
            .instances(now)
            .into_iter()
            .filter(|v| v.session == id && v.state == InstanceState::Unloading)
            .map(|v| (v.model, v.generation))
            .collect()
    }

    /// Unloads asked of live sessions (or the app server) still under way.
    pub fn unloads_in_flight(&self, now: Duration) -> usize {
        self.engine
            .instances(now)
            .iter()
            .filter(|v| {
                matches!(
                    v.state,
                    InstanceState::Unloading | InstanceState::Reclaiming
                ) && (v.session == APP_HOLDER || self.sessions.contains_key(&v.session))
            })
            .count()
    }

    /// The freshest device reading an app sent on its heartbeat (used without a GPU of our
    /// own), fresh for three of that session's heartbeat intervals.
    pub fn app_gpu(&self, now: Duration) -> Option<GpuReading> {
        self.app_gpu_claim(now).map(|(reading, _)| reading)
    }

    /// [`Core::app_gpu`] and the session whose claim it is.
    fn app_gpu_claim(&self, now: Duration) -> Option<(GpuReading, SessionId)> {
        self.sessions
            .iter()
            .filter_map(|(id, s)| s.readings.as_ref().map(|r| (id, r, s.heartbeat * 3)))
            .filter(|(_, (_, at), fresh)| now.saturating_sub(*at) <= *fresh)
            .filter_map(|(id, (r, at), _)| {
                Some((
                    GpuDevice {
                        index: 0,
                        uuid: String::new(),
                        name: String::new(),
                        total_bytes: r.device_vram_total_bytes?,
                        used_bytes: r.device_vram_used_bytes?,
                        source: Source::App(r.source.clone()),
                    },
                    *at,
                    *id,
                ))
            })
            .max_by_key(|(_, at, _)| *at)
            .map(|(device, _, id)| {
                (
                    GpuReading {
                        devices: vec![device],
                        down_reason: None,
                    },
                    id,
                )
            })
    }

    /// The levels for `/metrics`: one moment of the ledger and the latest readings.
    pub fn gauges(&self, now: Duration) -> Gauges {
        let gpu = &self.measured.gpu;
        let mut models: Vec<ModelGauges> = self
            .pool
            .models
            .iter()
            .map(|m| ModelGauges {
                name: m.name.clone(),
                ..ModelGauges::default()
            })
            .collect();
        for view in self.engine.instances(now) {
            let index = match models.iter().position(|m| m.name == view.model) {
                Some(index) => index,
                None => {
                    models.push(ModelGauges {
                        name: view.model.clone(),
                        ..ModelGauges::default()
                    });
                    models.len() - 1
                }
            };
            let model = &mut models[index];
            model.loaded += u64::from(view.state == InstanceState::Loaded);
            model.leases += view.leases as u64;
            model.held = model.held.plus(view.held);
        }
        Gauges {
            pool: (
                self.pool.name.clone(),
                self.pool.namespace.clone(),
                self.pool.mode.as_str(),
            ),
            gpu_up: gpu.up(),
            devices: gpu
                .devices
                .iter()
                .map(|d| DeviceGauges {
                    index: d.index,
                    uuid: d.uuid.clone(),
                    total: d.total_bytes,
                    used: d.used_bytes,
                })
                .collect(),
            ram_used: self.measured.ram.used_bytes,
            ram_limit: self.measured.ram.total_bytes,
            held: self.engine.held(),
            lost: self.engine.lost(),
            ceilings: self.engine.config().limits,
            models,
            sessions: self.sessions.len() as u64,
        }
    }

    // ---- sessions ----

    /// `POST /v1/sessions`. `process`: the pid's reading, taken before the lock.
    pub fn open_session(
        &mut self,
        now: Duration,
        request: &wire::CreateSession,
        process: ProcessNow,
        heartbeat: Duration,
        fx: &mut Effects,
    ) -> Result<wire::SessionCreated, LookupError> {
        if self.shutting_down {
            return Err(LookupError::ShuttingDown);
        }
        let listed = self.engine.model_names();
        let unknown: Vec<String> = request
            .models
            .iter()
            .chain(request.holds.iter().map(|h| &h.model))
            .filter(|m| !listed.contains(&m.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(LookupError::Model {
                names: unknown,
                listed: listed.join(", "),
            });
        }
        if !process.alive {
            tracing::warn!(
                pid = request.pid,
                "the session's pid is not visible to the sidecar (no shareProcessNamespace?): liveness by heartbeats only, process memory not measured"
            );
        }
        // A visible pid's death is seen on the process itself (read once per base interval):
        // its heartbeats only carry readings and catch a hung SDK, so they come less often.
        let interval = if process.alive {
            heartbeat * VISIBLE_PID_HEARTBEAT_FACTOR
        } else {
            heartbeat
        };
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let app = request
            .app
            .clone()
            .unwrap_or_else(|| format!("pid {}", request.pid));
        self.sessions.insert(
            id,
            Session {
                pid: request.pid,
                app: app.clone(),
                models: request.models.clone(),
                last_seen: now,
                heartbeat: interval,
                opened: now,
                readings: None,
                pid_visible: process.alive,
                last_rss: process.rss,
                last_vram: process.vram,
            },
        );
        fx.streams_opened.push(id);
        fx.watch.push((id, Some(request.pid)));
        tracing::info!(session = %session_name(id), pid = request.pid, app, models = ?request.models, "session opened");

        // Models the process already holds (it outlived a sidecar restart): into the ledger.
        let mut refused_holds = Vec::new();
        let mut adopted = Vec::new();
        for hold in &request.holds {
            // Still counted for an ended session of this same process (it was paused past two
            // heartbeats, or its SDK reconnected): the memory never left, so that instance
            // leaves the ledger as this one enters it, never both.
            self.retire_for_reannounce(now, request.pid, &hold.model, fx);
            let reported = Sizes::new(hold.vram_bytes, hold.ram_bytes);
            match self.adopt(now, id, &hold.model, reported, hold.leases > 0, fx) {
                Ok(generation) => {
                    adopted.push(wire::Adopted {
                        model: hold.model.clone(),
                        generation,
                    });
                }
                Err(message) => {
                    tracing::warn!(session = %session_name(id), model = hold.model, %message, "held model does not fit: asking the app to unload it");
                    refused_holds.push(wire::RefusedHold {
                        model: hold.model.clone(),
                        message: message.clone(),
                    });
                    // Not in the ledger: generation 0 names "the hold the sidecar refused".
                    fx.unloads.push(Unload {
                        holder: id,
                        model: hold.model.clone(),
                        generation: 0,
                        reason: UnloadReason::Ceiling,
                    });
                }
            }
        }
        let pool = &self.pool;
        Ok(wire::SessionCreated {
            session: session_name(id),
            heartbeat_ms: interval.as_millis() as u64,
            pool: wire::SessionPool {
                name: pool.name.clone(),
                namespace: pool.namespace.clone(),
                mode: pool.mode,
                driver: pool.driver,
                limits: wire::LimitBytes {
                    vram_bytes: pool.limits.vram,
                    ram_bytes: pool.limits.ram,
                },
                models: views::pool_models(pool),
            },
            refused_holds,
            adopted,
        })
    }

    /// `POST /v1/sessions/{id}/heartbeat`.
    pub fn heartbeat(
        &mut self,
        now: Duration,
        session: &str,
        readings: Option<AppReadings>,
    ) -> Result<(), LookupError> {
        let id = self.session_id(session)?;
        // Checked against the sidecar's own device reading (the last tick's): a claim that
        // cannot be true is refused, never used for pressure.
        let checked =
            readings.map(|r| sessions::check_readings(&r, &self.measured.gpu).map(|()| r));
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        // A heartbeat with bad readings is still a sign of life.
        s.last_seen = now;
        match checked {
            Some(Ok(readings)) => s.readings = Some((readings, now)),
            Some(Err(why)) => {
                tracing::warn!(session, app = s.app, why, "heartbeat readings refused");
                return Err(LookupError::Readings {
                    session: session.to_owned(),
                    why,
                });
            }
            None => {}
        }
        Ok(())
    }

    /// `DELETE /v1/sessions/{id}`.
    pub fn close_session(
        &mut self,
        now: Duration,
        session: &str,
        fx: &mut Effects,
    ) -> Result<(), LookupError> {
        let id = self.session_id(session)?;
        self.end_session(now, id, "closed by the app", fx);
        Ok(())
    }

    // ---- cleanup, time passing, pool, shutdown ----

    /// `POST /v1/cleanup`.
    pub fn cleanup(&mut self, now: Duration, force: bool, fx: &mut Effects) -> wire::CleanupAnswer {
        let (out, skipped_leased) = self.engine.cleanup(now, force);
        let unloading = out
            .iter()
            .filter_map(|o| match o {
                Output::Unload { session, model, .. } => Some(wire::CleanupUnload {
                    session: session_name(*session),
                    model: model.clone(),
                }),
                _ => None,
            })
            .collect();
        self.apply(now, out, fx);
        wire::CleanupAnswer {
            unloading,
            skipped_leased,
        }
    }

    /// One tick, with every reading taken before the lock: the measurement is kept, dead
    /// sessions end, reclaims are checked, the engine's timers advance. `draining`: unload
    /// whatever is idle first, pinned models too.
    pub fn tick(
        &mut self,
        now: Duration,
        readings: TickReadings,
        draining: bool,
        fx: &mut Effects,
    ) {
        if draining {
            self.cleanup(now, true, fx);
        }
        let TickReadings {
            ram,
            mut gpu,
            processes,
            pod_devices,
        } = readings;
        let mut vram_claimed_by = None;
        if !gpu.up()
            && let Some((app, claimant)) = self.app_gpu_claim(now)
        {
            gpu = app;
            vram_claimed_by = Some(claimant);
        }
        self.measured = Measured {
            gpu: gpu.clone(),
            ram: ram.clone(),
        };
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            let process = processes
                .get(&session.pid)
                .copied()
                .filter(|_| session.pid_visible);
            if let Some(process) = process {
                session.last_rss = process.rss.or(session.last_rss);
                session.last_vram = process.vram.or(session.last_vram);
            }
            let silent = now.saturating_sub(session.last_seen);
            let dead_after = session.heartbeat * 2;
            let why = if process.is_some_and(|p| !p.alive) {
                Some(format!("process {} is gone", session.pid))
            } else if silent > dead_after {
                Some(format!(
                    "missed heartbeats for {} ms (interval {} ms)",
                    silent.as_millis(),
                    session.heartbeat.as_millis()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.end_session(now, id, &why, fx);
            }
        }
        self.check_reclaims(now, &processes, fx);
        // Pressure is a share of one device, the most used of the pod's (GpuReading::pressure):
        // summing a node's GPUs would dilute one full GPU among idle ones.
        let readings = Readings {
            vram: gpu.pressure(&pod_devices),
            ram: (ram.total_bytes > 0).then_some((ram.used_bytes, ram.total_bytes)),
            vram_claimed_by,
        };
        let out = self.engine.tick(now, readings);
        self.apply(now, out, fx);
    }

    /// The pids whose readings would prove an unload now: the holders of instances waiting for
    /// their memory to be seen back (the ticker reads them on every tick, the rest less often).
    pub fn pids_awaiting_reclaim(&self, now: Duration) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .engine
            .instances(now)
            .into_iter()
            .filter(|v| matches!(v.state, InstanceState::Reclaiming | InstanceState::Lost))
            // The model server's tree is read by its own poll, not by the ticker.
            .filter(|v| v.session != APP_HOLDER)
            .filter_map(|v| self.holder_pid(v.session))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The pid whose memory holds `holder`'s instances: its session's, a closed session's
    /// (until its reclaims finish), or the model server's.
    fn holder_pid(&self, holder: SessionId) -> Option<u32> {
        self.sessions
            .get(&holder)
            .map(|s| s.pid)
            .or_else(|| self.dead_pids.get(&holder).copied())
            .or_else(|| (holder == APP_HOLDER).then(|| self.server_pid()).flatten())
    }

    /// Checks every instance waiting for its memory to be seen back, with the readings of
    /// `processes` (by pid; an instance whose pid was not read waits for the next check).
    pub fn check_reclaims(
        &mut self,
        now: Duration,
        processes: &BTreeMap<u32, ProcessNow>,
        fx: &mut Effects,
    ) {
        let waiting: Vec<_> = self
            .engine
            .instances(now)
            .into_iter()
            .filter(|v| matches!(v.state, InstanceState::Reclaiming | InstanceState::Lost))
            .collect();
        for view in waiting {
            let holder = view.session;
            let pid = self.holder_pid(holder);
            let reference = self
                .tracks
                .get(&(holder, view.model.clone()))
                .filter(|t| t.generation == view.generation)
                .map(|t| t.reference)
                .unwrap_or_default();
            let expected = view.measured.unwrap_or(view.held);
            let process = pid.and_then(|pid| processes.get(&pid).copied());
            let Some(seen_by) =
                reclaim::seen_back(holder == APP_HOLDER, pid, process, reference, expected)
            else {
                continue;
            };
            let out = self.engine.reclaimed(now, holder, &view.model);
            self.finish_reclaim(now, holder, &view.model, seen_by, fx);
            self.apply(now, out, fx);
        }
    }

    /// SIGTERM: stop admitting, ask apps to unload idle models.
    pub fn shutdown(&mut self, now: Duration, fx: &mut Effects) {
        self.shutting_down = true;
        let out = self.engine.shutdown(now);
        self.apply(now, out, fx);
    }

    /// Puts a new pool in force.
    pub fn update_pool(&mut self, now: Duration, pool: LoadedPool, fx: &mut Effects) {
        let out = self.engine.update_config(now, pool.config);
        self.pool = pool.info;
        self.apply(now, out, fx);
    }

    // ---- internals ----

    /// A model's declared footprint.
    fn declared(&self, model: &str) -> Footprint {
        self.pool
            .models
            .iter()
            .find(|m| m.name == model)
            .map_or_else(Footprint::default, |m| {
                Footprint::new(m.vram_bytes, m.ram_bytes)
            })
    }

    fn lease_of(&self, session: &str, lease: &str) -> Result<(SessionId, LeaseId), LookupError> {
        let client = self.session_id(session)?;
        let id = parse_id(lease, "l-")
            .map(LeaseId)
            .filter(|id| self.leases.get(id).is_some_and(|l| l.client == client))
            .ok_or_else(|| LookupError::Lease {
                lease: lease.to_owned(),
                session: session.to_owned(),
            })?;
        Ok((client, id))
    }

    /// Drops lease records the engine no longer has.
    fn prune_leases(&mut self) {
        let engine = &self.engine;
        self.leases.retain(|id, _| engine.lease(*id).is_some());
    }

    /// The process levels of `holder` at its last reading.
    fn levels(&self, holder: SessionId) -> Option<Sizes> {
        if holder == APP_HOLDER && self.server.enabled {
            return self.server_levels();
        }
        self.sessions
            .get(&holder)
            .map(|s| Sizes::new(s.last_vram, s.last_rss))
    }
}
