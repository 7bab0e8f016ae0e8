//! The sidecar's state: app sessions, leases, the policy engine (the single decision maker),
//! and what the sidecar measured around each load and unload.
//!
//! ```text
//!  API handlers ──► Shared::{open_session, acquire, loaded, release, unloaded, cleanup, ...}
//!                      │ lock Core                      ▲
//!                      ▼                                │ Output::{Granted, Refused, Unload,
//!                   Engine (modelpool-policy) ──────────┘   MemoryNotReclaimed, CeilingExceeded}
//!                      │ Core::apply turns outputs into effects:
//!                      ├─ answers for waiting acquires (oneshot)
//!                      ├─ unloads through the Driver (Sdk: command stream; Http: app URL)
//!                      └─ metrics and logs
//!  ticker ──► Shared::tick: measure (Meter) → dead sessions → reclaim checks → Engine::tick
//! ```
//!
//! The engine's clock is `Instant` since the sidecar started. An instance is keyed by the
//! session that holds it; with the `Http` driver the app server itself is the holder
//! ([`APP_HOLDER`]) and leases belong to the client sessions.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use modelpool_policy::{
    Action, Engine, Footprint, InstanceState, LeaseId, Output, Readings, Refusal, RequestId,
    Resource, SessionId, UnloadReason,
};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::{
    api::wire::{self, AppReadings, Bytes, Ceilings},
    driver::{Driver, LoadOutcome, UnloadOutcome, sdk::CommandHub},
    measure::{
        GpuDevice, GpuReading, MemoryLine, Meter, ProcessReading, RamReading, Sizes, Source, human,
        percent,
    },
    metrics::Metrics,
    pool::{LoadedPool, PoolInfo},
};

/// The holder of instances loaded by the `Http` driver: the app server itself.
pub const APP_HOLDER: SessionId = SessionId(0);

/// A model below this many bytes of a resource needs no reclaim proof for it.
const RECLAIM_NOISE_BYTES: u64 = 1 << 20;

/// The share of a model's bytes that must be seen returned for an unload to count as done.
const RECLAIM_SHARE: f64 = 0.8;

/// Timing knobs from the flags.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Heartbeat interval asked of sessions.
    pub heartbeat: Duration,
    /// How often the ticker runs.
    pub tick: Duration,
    /// Reclaim timeout (also given to the engine).
    pub reclaim_timeout: Duration,
}

fn first_session_id() -> u64 {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    u64::try_from(millis)
        .unwrap_or(0)
        .saturating_mul(1000)
        .max(1)
}

/// `s-7`.
pub fn session_name(id: SessionId) -> String {
    if id == APP_HOLDER {
        "app".to_owned()
    } else {
        format!("s-{}", id.0)
    }
}

/// `l-7`.
pub fn lease_name(id: LeaseId) -> String {
    format!("l-{}", id.0)
}

fn parse_id(text: &str, prefix: &str) -> Option<u64> {
    text.strip_prefix(prefix)?.parse().ok()
}

/// An open app session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The app process.
    pub pid: u32,
    /// Its name.
    pub app: String,
    /// Models it registered loaders for.
    pub models: Vec<String>,
    /// Last heartbeat (or creation).
    pub last_seen: Instant,
    /// When it opened.
    pub opened: Instant,
    /// Its latest readings.
    pub readings: Option<(AppReadings, Instant)>,
    /// Whether the sidecar sees the pid (same pid namespace: shareProcessNamespace). If not,
    /// liveness is by heartbeats only and the process's memory is not measured.
    pub pid_visible: bool,
    /// The process's VmRSS at the last tick: the reference for unloads the app starts itself.
    pub last_rss: Option<u64>,
}

#[derive(Debug, Clone)]
struct LeaseInfo {
    client: SessionId,
    holder: SessionId,
    model: String,
}

/// What the sidecar measured around one instance.
#[derive(Debug, Clone, Default)]
struct Track {
    /// When the load was granted.
    load_started: Option<Instant>,
    /// Process RSS / VRAM when the load was granted.
    before: (Option<u64>, Option<u64>),
    /// What the sidecar measured the load to add.
    sidecar: Sizes,
    /// What the app reported the load to add.
    app: Sizes,
    /// Process RSS / VRAM while the model was last known held (after load, at unload decision).
    reference: (Option<u64>, Option<u64>),
    /// When the unload was decided or reported.
    unload_started: Option<Instant>,
    /// Why.
    unload_reason: Option<&'static str>,
}

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
    },
    /// Refused.
    Refused(Box<Refusal>),
}

/// What a handler must do after the lock is released.
#[derive(Debug)]
enum Effect {
    Unload {
        holder: SessionId,
        model: String,
        reason: UnloadReason,
    },
}

/// Readings of the latest measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Devices, or why none.
    pub gpu: GpuReading,
    /// Pod memory.
    pub ram: RamReading,
}

/// Everything behind the lock.
pub struct Core {
    epoch: Instant,
    engine: Engine,
    pool: PoolInfo,
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
    pending_effects: Vec<Effect>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("pool", &self.pool.name)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// The sidecar: state, measurement, metrics and the driver, shared by handlers and tasks.
pub struct Shared {
    core: Mutex<Core>,
    /// The Sdk command streams.
    pub hub: Arc<CommandHub>,
    driver: Arc<dyn Driver>,
    meter: Arc<dyn Meter>,
    /// Metrics.
    pub metrics: Metrics,
    /// Timing.
    pub settings: Settings,
    /// Set once the API listens.
    pub ready: AtomicBool,
    /// Set when the pool is being deleted (cluster mode): unload everything, admit nothing.
    draining: AtomicBool,
    /// The last problem worth reporting (cluster mode puts it on the pod's report).
    last_error: Mutex<Option<String>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("driver", &self.driver.kind())
            .finish_non_exhaustive()
    }
}

/// Why a request about a session, lease or model cannot be served.
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
}

/// The answer to `POST /v1/acquire`.
#[derive(Debug)]
pub enum AcquireAnswer {
    /// `use` or `load`.
    Granted {
        /// `use` / `load`.
        action: Action,
        /// The lease.
        lease: LeaseId,
    },
    /// `wait` (only with `"wait": false`).
    Wait {
        /// Why, with numbers.
        message: String,
    },
    /// Refused, with the numbers.
    Refused(Box<Refusal>),
    /// The Http driver's load failed.
    LoadFailed {
        /// The driver's error.
        message: String,
    },
}

impl Shared {
    /// A sidecar enforcing `pool`.
    pub fn new(
        pool: LoadedPool,
        driver: Arc<dyn Driver>,
        hub: Arc<CommandHub>,
        meter: Arc<dyn Meter>,
        metrics: Metrics,
        settings: Settings,
    ) -> Arc<Self> {
        let measured = Measured {
            gpu: meter.gpu(),
            ram: meter.ram(),
        };
        let core = Core {
            epoch: Instant::now(),
            engine: Engine::new(pool.config),
            pool: pool.info,
            sessions: BTreeMap::new(),
            // Ids unique across restarts: an app that outlived a restarted sidecar must not
            // find its old id given to another process's new session.
            next_session: first_session_id(),
            next_request: 1,
            waiters: HashMap::new(),
            immediate: HashMap::new(),
            leases: BTreeMap::new(),
            tracks: BTreeMap::new(),
            dead_pids: BTreeMap::new(),
            placeholders: BTreeMap::new(),
            measured,
            shutting_down: false,
            pending_effects: Vec::new(),
        };
        let shared = Arc::new(Self {
            core: Mutex::new(core),
            hub,
            driver,
            meter,
            metrics,
            settings,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            last_error: Mutex::new(None),
            changed: watch::Sender::new(0),
        });
        shared.update_metrics();
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Plain data behind the lock: a panicked handler must not wedge the sidecar.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to "something changed" (state views, shutdown waits).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// The pool in force.
    pub fn pool(&self) -> PoolInfo {
        self.lock().pool.clone()
    }

    /// The driver's kind.
    pub fn driver_kind(&self) -> &'static str {
        self.driver.kind()
    }

    /// Whether SIGTERM was received.
    pub fn shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// The seed's memory line, measured now.
    pub fn memory_line(&self) -> MemoryLine {
        let ram = self.meter.ram();
        let gpu = self.gpu_reading();
        line_of(&ram, &gpu)
    }

    fn gpu_reading(&self) -> GpuReading {
        let gpu = self.meter.gpu();
        if gpu.up() {
            return gpu;
        }
        // No GPU in the sidecar: the freshest app-side device reading, if any.
        let core = self.lock();
        app_gpu(&core.sessions, self.settings.heartbeat).unwrap_or(gpu)
    }

    /// Runs effects decided under the lock (driver calls).
    fn run_effects(self: &Arc<Self>, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Unload {
                    holder,
                    model,
                    reason,
                } => {
                    let this = Arc::clone(self);
                    let call = self.driver.unload(holder, &model, reason);
                    let loads_itself = self.driver.loads_itself();
                    tokio::spawn(async move {
                        match call.await {
                            Ok(UnloadOutcome::Queued { command }) => {
                                tracing::debug!(model, command, session = %session_name(holder), "unload command queued");
                            }
                            Ok(UnloadOutcome::Done) => {
                                // The app's own API said it unloaded; there is no process of
                                // its own to watch, so the answer counts as the reclaim.
                                let mut core = this.lock();
                                let now = core.now();
                                let mut out = core.engine.unloaded(now, holder, &model);
                                out.extend(core.engine.reclaimed(now, holder, &model));
                                core.finish_reclaim(&this, holder, &model, "driver");
                                core.apply(&this, out);
                                let effects = std::mem::take(&mut core.pending_effects);
                                drop(core);
                                this.run_effects(effects);
                                this.update_metrics();
                            }
                            Err(error) if loads_itself => {
                                tracing::error!(%error, model, "driver failed to unload; the memory stays counted until the reclaim timeout");
                            }
                            Err(error) => {
                                tracing::debug!(%error, model, "no command stream for the unload");
                            }
                        }
                    });
                }
            }
        }
        self.bump();
    }

    fn finish(self: &Arc<Self>, mut core: MutexGuard<'_, Core>) {
        let effects = std::mem::take(&mut core.pending_effects);
        drop(core);
        self.run_effects(effects);
        self.update_metrics();
    }

    // ---- sessions ----

    /// `POST /v1/sessions`.
    pub fn open_session(
        self: &Arc<Self>,
        request: wire::CreateSession,
    ) -> Result<Value, LookupError> {
        let mut core = self.lock();
        if core.shutting_down {
            return Err(LookupError::ShuttingDown);
        }
        let listed = core
            .engine
            .model_names()
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>();
        let unknown: Vec<String> = request
            .models
            .iter()
            .chain(request.holds.iter().map(|h| &h.model))
            .filter(|m| !listed.contains(m))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(LookupError::Model {
                names: unknown,
                listed: listed.join(", "),
            });
        }
        let process = self.meter.process(request.pid);
        if !process.alive {
            tracing::warn!(
                pid = request.pid,
                "the session's pid is not visible to the sidecar (no shareProcessNamespace?): liveness by heartbeats only, process memory not measured"
            );
        }
        let id = SessionId(core.next_session);
        core.next_session += 1;
        let now_instant = Instant::now();
        let app = request
            .app
            .clone()
            .unwrap_or_else(|| format!("pid {}", request.pid));
        core.sessions.insert(
            id,
            Session {
                pid: request.pid,
                app: app.clone(),
                models: request.models.clone(),
                last_seen: now_instant,
                opened: now_instant,
                readings: None,
                pid_visible: process.alive,
                last_rss: process.rss_bytes,
            },
        );
        self.hub.open(id);
        tracing::info!(session = %session_name(id), pid = request.pid, app, models = ?request.models, "session opened");

        // Models the process already holds (it outlived a sidecar restart): into the ledger.
        let mut refused_holds = Vec::new();
        for hold in &request.holds {
            let reported = Sizes {
                vram: hold.vram_bytes,
                ram: hold.ram_bytes,
            };
            match core.adopt(self, id, &hold.model, reported, hold.leases > 0) {
                Ok(()) => {}
                Err(message) => {
                    tracing::warn!(session = %session_name(id), model = hold.model, %message, "held model does not fit: asking the app to unload it");
                    refused_holds.push(json!({"model": hold.model, "message": message}));
                    core.pending_effects.push(Effect::Unload {
                        holder: id,
                        model: hold.model.clone(),
                        reason: UnloadReason::Ceiling,
                    });
                }
            }
        }
        let pool = &core.pool;
        let body = json!({
            "session": session_name(id),
            "heartbeat_ms": self.settings.heartbeat.as_millis() as u64,
            "pool": {
                "name": pool.name,
                "namespace": pool.namespace,
                "mode": pool.mode,
                "driver": pool.driver,
                "limits": {"vram_bytes": pool.limits.vram, "ram_bytes": pool.limits.ram},
                "models": pool.models.iter().map(|m| json!({
                    "name": m.name, "vram_bytes": m.vram_bytes, "ram_bytes": m.ram_bytes,
                    "pinned": m.pinned, "priority": m.priority,
                })).collect::<Vec<_>>(),
            },
            "refused_holds": refused_holds,
        });
        self.finish(core);
        Ok(body)
    }

    /// `POST /v1/sessions/{id}/heartbeat`.
    pub fn heartbeat(
        &self,
        session: &str,
        readings: Option<AppReadings>,
    ) -> Result<(), LookupError> {
        let mut core = self.lock();
        let id = core.session_id(session)?;
        if let Some(s) = core.sessions.get_mut(&id) {
            s.last_seen = Instant::now();
            if let Some(readings) = readings {
                s.readings = Some((readings, Instant::now()));
            }
        }
        Ok(())
    }

    /// `DELETE /v1/sessions/{id}`.
    pub fn close_session(self: &Arc<Self>, session: &str) -> Result<(), LookupError> {
        let mut core = self.lock();
        let id = core.session_id(session)?;
        core.end_session(self, id, "closed by the app");
        self.finish(core);
        Ok(())
    }

    /// Resolves a session name for the command stream.
    pub fn command_session(&self, session: &str) -> Result<SessionId, LookupError> {
        self.lock().session_id(session)
    }

    /// Drops commands whose unload is no longer pending in the engine.
    pub fn prune_commands(&self, id: SessionId) {
        let core = self.lock();
        let now = core.now();
        let unloading: Vec<String> = core
            .engine
            .instances(now)
            .into_iter()
            .filter(|v| v.session == id && v.state == InstanceState::Unloading)
            .map(|v| v.model)
            .collect();
        drop(core);
        self.hub.retain(id, |c| unloading.contains(&c.model));
    }

    /// Whether a session is still open.
    pub fn session_open(&self, id: SessionId) -> bool {
        self.lock().sessions.contains_key(&id)
    }

    // ---- acquire / loaded / release / unloaded ----

    /// `POST /v1/acquire`.
    pub async fn acquire(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        wait: bool,
    ) -> Result<AcquireAnswer, LookupError> {
        let started = Instant::now();
        let holder_is_app = self.driver.loads_itself();
        enum First {
            Now(Verdict),
            Wait(String),
            Queued(RequestId, oneshot::Receiver<Verdict>),
        }
        let first = {
            let mut core = self.lock();
            let client = core.session_id(session)?;
            let holder = if holder_is_app { APP_HOLDER } else { client };
            let request = RequestId(core.next_request);
            core.next_request += 1;
            let now = core.now();
            let out = core.engine.acquire(now, request, holder, model);
            // Grants made for this request record `client` as the lease's owner.
            core.apply_with_client(self, out, Some((request, client)));
            let first = if let Some(verdict) = core.immediate.remove(&request) {
                First::Now(verdict)
            } else if !wait {
                core.engine.cancel(request);
                let need = core.engine.need(model).unwrap_or_default();
                let check = core.engine.check(need);
                First::Wait(format!(
                    "model {model:?} must wait for room (evictions or releases under way): {}",
                    check.message
                ))
            } else {
                let (sender, receiver) = oneshot::channel();
                core.waiters.insert(request, (client, sender));
                First::Queued(request, receiver)
            };
            self.finish(core);
            first
        };
        let (request, receiver) = match first {
            First::Now(verdict) => return self.answer(session, model, verdict, started).await,
            First::Wait(message) => return Ok(AcquireAnswer::Wait { message }),
            First::Queued(request, receiver) => (request, receiver),
        };
        self.metrics.acquire_queue.inc();
        let guard = WaitGuard {
            shared: Arc::clone(self),
            request,
            receiver: Some(receiver),
        };
        let verdict = guard.wait().await;
        self.metrics.acquire_queue.dec();
        match verdict {
            Some(verdict) => self.answer(session, model, verdict, started).await,
            // The session ended while waiting.
            None => Err(LookupError::Session(session.to_owned())),
        }
    }

    async fn answer(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        verdict: Verdict,
        started: Instant,
    ) -> Result<AcquireAnswer, LookupError> {
        self.metrics
            .acquire_wait
            .observe(started.elapsed().as_secs_f64());
        match verdict {
            Verdict::Refused(refusal) => Ok(AcquireAnswer::Refused(refusal)),
            Verdict::Granted {
                lease,
                action: Action::Load,
                holder,
            } if self.driver.loads_itself() => {
                tracing::info!(
                    model,
                    "Memory before load of {model}: {}",
                    self.memory_line()
                );
                match self.driver.load(holder, model).await {
                    Ok(LoadOutcome::Loaded { reported, seconds }) => {
                        let mut core = self.lock();
                        let now = core.now();
                        let track = core.tracks.entry((holder, model.to_owned())).or_default();
                        track.app = reported;
                        let declared = core.declared(model);
                        let measured = core.measured(Sizes::default(), reported, declared);
                        let out = core
                            .engine
                            .loaded(now, holder, model, measured, Some(seconds));
                        core.apply(self, out);
                        self.metrics.loads.with_label_values(&[model, "ok"]).inc();
                        self.metrics
                            .load_duration
                            .with_label_values(&[model])
                            .observe(seconds);
                        self.finish(core);
                        tracing::info!(
                            model,
                            seconds,
                            "Memory after load of {model}: {}",
                            self.memory_line()
                        );
                        Ok(AcquireAnswer::Granted {
                            action: Action::Use,
                            lease,
                        })
                    }
                    Ok(LoadOutcome::AppLoads) => Ok(AcquireAnswer::Granted {
                        action: Action::Load,
                        lease,
                    }),
                    Err(error) => {
                        let mut core = self.lock();
                        let now = core.now();
                        let out = core.engine.load_failed(now, holder, model);
                        core.apply(self, out);
                        core.prune_leases();
                        self.metrics
                            .loads
                            .with_label_values(&[model, "failed"])
                            .inc();
                        self.metrics
                            .acquires_refused
                            .with_label_values(&["load_failed"])
                            .inc();
                        self.finish(core);
                        tracing::error!(%error, model, session, "driver failed to load");
                        Ok(AcquireAnswer::LoadFailed {
                            message: format!("model {model:?} failed to load: {error}"),
                        })
                    }
                }
            }
            Verdict::Granted { lease, action, .. } => {
                if action == Action::Load {
                    tracing::info!(
                        model,
                        session,
                        "Memory before load of {model}: {}",
                        self.memory_line()
                    );
                }
                Ok(AcquireAnswer::Granted { action, lease })
            }
        }
    }

    /// `POST /v1/loaded`.
    pub fn loaded(self: &Arc<Self>, request: wire::Loaded) -> Result<(), LookupError> {
        let mut core = self.lock();
        let (client, lease) = core.lease_of(&request.session, &request.lease)?;
        let Some(info) = core.leases.get(&lease).cloned() else {
            return Err(core.unknown_lease(&request));
        };
        let state = core.instance_state(info.holder, &info.model);
        if state != Some(InstanceState::Loading) {
            // A `use` lease, or a report repeated: nothing to learn.
            return Ok(());
        }
        let now = core.now();
        let model = info.model.clone();
        if !request.ok {
            let out = core.engine.load_failed(now, info.holder, &model);
            core.apply(self, out);
            core.prune_leases();
            core.tracks.remove(&(info.holder, model.clone()));
            self.metrics
                .loads
                .with_label_values(&[&model, "failed"])
                .inc();
            tracing::warn!(session = %session_name(client), model, error = request.error.as_deref().unwrap_or("(none given)"), "load failed in the app");
            self.finish(core);
            return Ok(());
        }
        // What the load added, measured here (RSS, NVML per process) and by the app.
        let pid = core.sessions.get(&info.holder).map(|s| s.pid);
        drop(core);
        let (rss_now, vram_now) = pid.map_or((None, None), |pid| self.process_memory(pid));
        let mut core = self.lock();
        let now = core.now();
        let track = core.tracks.entry((info.holder, model.clone())).or_default();
        let delta = |before: Option<u64>, after: Option<u64>| Some(after?.saturating_sub(before?));
        let sidecar = Sizes {
            vram: delta(track.before.1, vram_now),
            ram: delta(track.before.0, rss_now),
        };
        let app = Sizes {
            vram: request.vram_bytes,
            ram: request.ram_bytes,
        };
        track.sidecar = sidecar;
        track.app = app;
        track.reference = (rss_now, vram_now);
        let seconds = request
            .load_seconds
            .or_else(|| track.load_started.map(|t| t.elapsed().as_secs_f64()));
        let declared = core.declared(&model);
        let measured = core.measured(sidecar, app, declared);
        let out = core
            .engine
            .loaded(now, info.holder, &model, measured, seconds);
        core.apply(self, out);
        self.metrics.loads.with_label_values(&[&model, "ok"]).inc();
        if let Some(seconds) = seconds {
            self.metrics
                .load_duration
                .with_label_values(&[&model])
                .observe(seconds);
        }
        self.finish(core);
        tracing::info!(
            model,
            session = %session_name(client),
            measured_ram = %sidecar.ram.map_or("?".into(), human),
            reported_ram = %app.ram.map_or("?".into(), human),
            "Memory after load of {model}: {}",
            self.memory_line()
        );
        Ok(())
    }

    /// `POST /v1/release`: whether the client must unload now.
    pub fn release(self: &Arc<Self>, session: &str, lease: &str) -> Result<bool, LookupError> {
        let mut core = self.lock();
        let (client, id) = core.lease_of(session, lease)?;
        let Some(info) = core.leases.remove(&id) else {
            return Err(LookupError::Lease {
                lease: lease.to_owned(),
                session: session.to_owned(),
            });
        };
        let now = core.now();
        let mut out = core.engine.release(now, id);
        if let Some(placeholder) = core.placeholders.remove(&(info.holder, info.model.clone())) {
            out.extend(core.engine.release(now, placeholder));
        }
        let unload_now = info.holder == client
            && out.iter().any(|o| {
                matches!(o, Output::Unload { session, model, .. } if *session == client && *model == info.model)
            });
        core.apply(self, out);
        self.finish(core);
        Ok(unload_now)
    }

    /// `POST /v1/unloaded`.
    pub fn unloaded(self: &Arc<Self>, session: &str, model: &str) -> Result<(), LookupError> {
        let mut core = self.lock();
        let id = core.session_id(session)?;
        let known = core.pool.models.iter().any(|m| m.name == model)
            || core.instance_state(id, model).is_some();
        if !known {
            return Err(LookupError::Model {
                names: vec![model.to_owned()],
                listed: core.engine.model_names().join(", "),
            });
        }
        self.hub.answered(id, model);
        let state = core.instance_state(id, model);
        let now = core.now();
        if state == Some(InstanceState::Loaded) {
            self.metrics
                .unloads
                .with_label_values(&[model, "cleanup"])
                .inc();
        }
        let out = core.engine.unloaded(now, id, model);
        core.apply(self, out);
        let last_rss = core.sessions.get(&id).and_then(|s| s.last_rss);
        let track = core.tracks.entry((id, model.to_owned())).or_default();
        if track.unload_started.is_none() {
            // The app unloaded on its own: the last sample while it held the model is the
            // level its memory must fall from.
            track.unload_started = Some(Instant::now());
            track.unload_reason = Some("cleanup");
            track.reference.0 = track.reference.0.max(last_rss);
        }
        drop(core);
        // The app frees before it reports: check at once rather than at the next tick.
        self.check_reclaims();
        Ok(())
    }

    // ---- cleanup, check, state ----

    /// `POST /v1/cleanup`.
    pub fn cleanup(self: &Arc<Self>, force: bool) -> Value {
        tracing::info!(force, "Memory before cleanup: {}", self.memory_line());
        let mut core = self.lock();
        let now = core.now();
        let (out, skipped) = core.engine.cleanup(now, force);
        let unloading: Vec<Value> = out
            .iter()
            .filter_map(|o| match o {
                Output::Unload { session, model, .. } => {
                    Some(json!({"session": session_name(*session), "model": model}))
                }
                _ => None,
            })
            .collect();
        core.apply(self, out);
        self.finish(core);
        json!({"unloading": unloading, "skipped_leased": skipped})
    }

    /// `GET /v1/check`.
    pub fn check(&self, need: Footprint) -> Value {
        let core = self.lock();
        let result = core.engine.check(need);
        json!({
            "available": result.available,
            "need": Bytes::from(need),
            "free": {"vram": result.free_vram, "ram": result.free_ram},
            "reclaimable": Bytes::from(result.reclaimable),
            "message": result.message,
        })
    }

    /// `GET /v1/state`.
    pub fn state(&self) -> Value {
        let core = self.lock();
        let now = core.now();
        let Measured { gpu, ram } = &core.measured;
        let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0;
        let pct = |a: u64, b: u64| (percent(a, b) * 10.0).round() / 10.0;
        let (vram_used, vram_total) = (gpu.used_bytes(), gpu.total_bytes());
        let gpu_source = gpu.devices.first().map(|d| d.source.clone());
        let held = core.engine.held();
        let lost = core.engine.lost();
        let models: Vec<Value> = core
            .engine
            .instances(now)
            .into_iter()
            .map(|view| {
                let session = core.sessions.get(&view.session);
                let track = core.tracks.get(&(view.session, view.model.clone()));
                json!({
                    "model": view.model,
                    "session": session_name(view.session),
                    "pid": session.map(|s| s.pid),
                    "app": session.map(|s| s.app.clone()),
                    "state": state_name(view.state),
                    "leases": view.leases,
                    "vram_bytes": view.held.vram,
                    "ram_bytes": view.held.ram,
                    "declared": Bytes::from(view.declared),
                    "measured": view.measured.map(Bytes::from),
                    "measured_by_sidecar": track.map(|t| t.sidecar).filter(Sizes::is_known),
                    "reported_by_app": track.map(|t| t.app).filter(Sizes::is_known),
                    "peak": Bytes::from(view.peak),
                    "idle_s": (view.idle.as_secs_f64() * 10.0).round() / 10.0,
                    "pinned": view.pinned,
                    "unload_reason": view.unload_reason.map(|r| r.as_str()),
                })
            })
            .collect();
        // The sidecar's own per-process VRAM reading (NVML, by pid), next to what the app
        // reports on its heartbeats: the GPU check compares it with nvidia-smi.
        let pids: Vec<u32> = core.sessions.values().map(|s| s.pid).collect();
        let process_vram = self.meter.process_vram(&pids);
        let sessions: Vec<Value> = core
            .sessions
            .iter()
            .map(|(id, s)| {
                let vram = process_vram.get(&s.pid);
                json!({
                    "session": session_name(*id),
                    "pid": s.pid,
                    "vram_bytes": vram.map(|(bytes, _)| *bytes),
                    "vram_source": vram.map(|(_, source)| source),
                    "app": s.app,
                    "models": s.models,
                    "leases": core.leases.values().filter(|l| l.client == *id).count(),
                    "last_heartbeat_ms": s.last_seen.elapsed().as_millis() as u64,
                    "age_s": s.opened.elapsed().as_secs(),
                    "pending_commands": self.hub.pending(*id),
                    "readings": s.readings.as_ref().map(|(r, _)| r),
                    "pid_visible": s.pid_visible,
                    "rss_bytes": s.last_rss,
                })
            })
            .collect();
        let counters = core.engine.counters();
        json!({
            "ram_used_gb": gib(ram.used_bytes),
            "ram_total_gb": gib(ram.total_bytes),
            "ram_percent": pct(ram.used_bytes, ram.total_bytes),
            "vram_allocated_gb": gib(vram_used),
            "vram_total_gb": gib(vram_total),
            "vram_percent": pct(vram_used, vram_total),
            "ram_used_bytes": ram.used_bytes,
            "ram_total_bytes": ram.total_bytes,
            "ram_limit_bytes": ram.limit_bytes,
            "vram_used_bytes": vram_used,
            "vram_total_bytes": vram_total,
            "gpu": gpu_json(gpu),
            "sources": {
                "ram": ram.source,
                "vram": gpu_source,
                "process_ram": Source::Proc,
                "process_vram": if gpu.devices.iter().any(|d| d.source == Source::Nvml) { Some(Source::Nvml) } else { None },
            },
            "pool": core.pool,
            "held_bytes": Bytes::from(held),
            "ceiling_bytes": Ceilings { vram: core.pool.limits.vram, ram: core.pool.limits.ram },
            "lost_bytes": Bytes::from(lost),
            "queue": core.engine.queue_len(),
            "models": models,
            "sessions": sessions,
            "counters": {
                "loads": counters.loads,
                "load_failures": counters.load_failures,
                "unloads": counters.unloads.iter().map(|(r, n)| (r.as_str().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "refusals": counters.refusals,
                "not_reclaimed": counters.not_reclaimed,
                "ceiling_breaches": counters.ceiling_breaches,
            },
            "shutting_down": core.shutting_down,
        })
    }

    // ---- time passing ----

    fn process_memory(&self, pid: u32) -> (Option<u64>, Option<u64>) {
        let rss = self.meter.process(pid).rss_bytes;
        let vram = self.meter.process_vram(&[pid]).get(&pid).map(|(b, _)| *b);
        (rss, vram)
    }

    /// One tick: measure, end dead sessions, verify reclaims, advance the engine's timers.
    pub fn tick(self: &Arc<Self>) {
        if self.draining() {
            // Models whose last lease just ended go now, pinned ones included.
            self.cleanup(true);
        }
        let started = Instant::now();
        let ram = self.meter.ram();
        let mut gpu = self.meter.gpu();
        let pids: Vec<(SessionId, u32)> = {
            let core = self.lock();
            if !gpu.up()
                && let Some(app) = app_gpu(&core.sessions, self.settings.heartbeat)
            {
                gpu = app;
            }
            core.sessions
                .iter()
                .filter(|(_, s)| s.pid_visible)
                .map(|(id, s)| (*id, s.pid))
                .collect()
        };
        let processes: BTreeMap<SessionId, ProcessReading> = pids
            .iter()
            .map(|(id, pid)| (*id, self.meter.process(*pid)))
            .collect();
        self.metrics
            .measure_duration
            .observe(started.elapsed().as_secs_f64());

        let mut core = self.lock();
        core.measured = Measured {
            gpu: gpu.clone(),
            ram: ram.clone(),
        };
        let dead_after = self.settings.heartbeat * 2;
        let ids: Vec<SessionId> = core.sessions.keys().copied().collect();
        for id in ids {
            let process = processes.get(&id).copied();
            let Some(session) = core.sessions.get_mut(&id) else {
                continue;
            };
            if let Some(rss) = process.and_then(|p| p.rss_bytes) {
                session.last_rss = Some(rss);
            }
            let why = if process.is_some_and(|p| !p.alive) {
                Some(format!("process {} is gone", session.pid))
            } else if session.last_seen.elapsed() > dead_after {
                Some(format!(
                    "missed heartbeats for {} ms (interval {} ms)",
                    session.last_seen.elapsed().as_millis(),
                    self.settings.heartbeat.as_millis()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                core.end_session(self, id, &why);
            }
        }
        drop(core);
        self.check_reclaims();

        let mut core = self.lock();
        let now = core.now();
        let readings = Readings {
            vram: gpu.up().then(|| (gpu.used_bytes(), gpu.total_bytes())),
            ram: (ram.total_bytes > 0).then_some((ram.used_bytes, ram.total_bytes)),
        };
        let out = core.engine.tick(now, readings);
        core.apply(self, out);
        self.finish(core);
    }

    /// Checks every instance waiting for its memory to be seen back.
    pub fn check_reclaims(self: &Arc<Self>) {
        let waiting: Vec<(SessionId, String, Footprint, Option<Footprint>)> = {
            let core = self.lock();
            let now = core.now();
            core.engine
                .instances(now)
                .into_iter()
                .filter(|v| matches!(v.state, InstanceState::Reclaiming | InstanceState::Lost))
                .map(|v| (v.session, v.model, v.held, v.measured))
                .collect()
        };
        if waiting.is_empty() {
            return;
        }
        for (holder, model, held, measured) in waiting {
            let (pid, reference) = {
                let core = self.lock();
                let pid = core
                    .sessions
                    .get(&holder)
                    .map(|s| s.pid)
                    .or_else(|| core.dead_pids.get(&holder).copied());
                let reference = core
                    .tracks
                    .get(&(holder, model.clone()))
                    .map(|t| t.reference)
                    .unwrap_or_default();
                (pid, reference)
            };
            let verdict = match pid {
                // Only the Http driver's own answer proves an app-server unload (see run_effects).
                None if holder == APP_HOLDER => None,
                // The session is gone and so is its pid record: the process ended with it.
                None => Some("session_gone"),
                Some(pid) => {
                    let process = self.meter.process(pid);
                    if !process.alive {
                        Some("process_exit")
                    } else {
                        let expected = measured.unwrap_or(held);
                        let vram_now = self.meter.process_vram(&[pid]).get(&pid).map(|(b, _)| *b);
                        let ram_ok = returned(reference.0, process.rss_bytes, expected.ram);
                        let vram_ok = returned(reference.1, vram_now, expected.vram);
                        match (ram_ok, vram_ok) {
                            (Some(false), _) | (_, Some(false)) => None,
                            (Some(true), _) => Some("proc"),
                            (None, Some(true)) => Some("nvml"),
                            (None, None) => Some("unverified"),
                        }
                    }
                }
            };
            if let Some(seen_by) = verdict {
                let mut core = self.lock();
                let now = core.now();
                let out = core.engine.reclaimed(now, holder, &model);
                core.finish_reclaim(self, holder, &model, seen_by);
                core.apply(self, out);
                self.finish(core);
                tracing::info!(model, session = %session_name(holder), seen_by, "Memory after unload of {model}: {}", self.memory_line());
            }
        }
    }

    /// SIGTERM: stop admitting, ask apps to unload idle models.
    pub fn begin_shutdown(self: &Arc<Self>) {
        tracing::info!("Memory before shutdown: {}", self.memory_line());
        let mut core = self.lock();
        core.shutting_down = true;
        let now = core.now();
        let out = core.engine.shutdown(now);
        core.apply(self, out);
        self.finish(core);
        self.hub.wake();
    }

    /// Starts draining: nothing new is admitted, idle models are unloaded now and the rest
    /// (pinned ones too) as soon as their leases end.
    pub fn begin_drain(self: &Arc<Self>) {
        self.draining.store(true, Ordering::Relaxed);
        self.begin_shutdown();
        self.cleanup(true);
    }

    /// Whether the sidecar is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Records a problem for the pod's report.
    pub fn set_last_error(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    /// The last problem recorded, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether unloads asked of live sessions are still under way.
    pub fn unloads_in_flight(&self) -> usize {
        let core = self.lock();
        let now = core.now();
        core.engine
            .instances(now)
            .iter()
            .filter(|v| {
                matches!(
                    v.state,
                    InstanceState::Unloading | InstanceState::Reclaiming
                ) && (v.session == APP_HOLDER || core.sessions.contains_key(&v.session))
            })
            .count()
    }

    /// Puts a new pool in force.
    pub fn update_pool(self: &Arc<Self>, pool: LoadedPool) {
        let mut core = self.lock();
        let now = core.now();
        let out = core.engine.update_config(now, pool.config);
        core.pool = pool.info;
        core.apply(self, out);
        self.finish(core);
    }

    /// Refreshes the gauges from the ledger and the latest readings.
    pub fn update_metrics(&self) {
        let core = self.lock();
        let now = core.now();
        let m = &self.metrics;
        m.pool_info.reset();
        m.pool_info
            .with_label_values(&[
                core.pool.name.as_str(),
                core.pool.namespace.as_str(),
                core.pool.mode,
            ])
            .set(1);
        let gpu = &core.measured.gpu;
        m.gpu_up.set(i64::from(gpu.up()));
        m.vram_total.reset();
        m.vram_used.reset();
        for device in &gpu.devices {
            let index = device.index.to_string();
            let labels = [index.as_str(), device.uuid.as_str()];
            m.vram_total
                .with_label_values(&labels)
                .set(device.total_bytes as f64);
            m.vram_used
                .with_label_values(&labels)
                .set(device.used_bytes as f64);
        }
        m.ram_used.set(core.measured.ram.used_bytes as f64);
        m.ram_limit.set(core.measured.ram.total_bytes as f64);
        let held = core.engine.held();
        let lost = core.engine.lost();
        m.ceiling_bytes.reset();
        for resource in Resource::ALL {
            let name = resource.as_str();
            m.pool_bytes
                .with_label_values(&[name])
                .set(held.get(resource) as f64);
            m.lost_bytes
                .with_label_values(&[name])
                .set(lost.get(resource) as f64);
            if let Some(limit) = core.engine.config().limits.get(resource) {
                m.ceiling_bytes.with_label_values(&[name]).set(limit as f64);
            }
        }
        m.model_loaded.reset();
        m.model_bytes.reset();
        m.model_leases.reset();
        for model in &core.pool.models {
            m.model_loaded
                .with_label_values(&[model.name.as_str()])
                .set(0);
            m.model_leases
                .with_label_values(&[model.name.as_str()])
                .set(0);
            for resource in Resource::ALL {
                m.model_bytes
                    .with_label_values(&[model.name.as_str(), resource.as_str()])
                    .set(0.0);
            }
        }
        for view in core.engine.instances(now) {
            let name = view.model.as_str();
            if view.state == InstanceState::Loaded {
                m.model_loaded.with_label_values(&[name]).inc();
            }
            m.model_leases
                .with_label_values(&[name])
                .add(view.leases as i64);
            for resource in Resource::ALL {
                m.model_bytes
                    .with_label_values(&[name, resource.as_str()])
                    .add(view.held.get(resource) as f64);
            }
        }
        m.sessions.set(core.sessions.len() as i64);
    }
}

/// Whether memory came back: `Some(true)` when `now` is below `reference` by enough of
/// `expected`, `None` when there is nothing to compare (no reading, or too small to see).
fn returned(reference: Option<u64>, now: Option<u64>, expected: u64) -> Option<bool> {
    if expected < RECLAIM_NOISE_BYTES {
        return None;
    }
    let (reference, now) = (reference?, now?);
    let must_drop = (expected.min(reference) as f64 * RECLAIM_SHARE) as u64;
    Some(reference.saturating_sub(now) >= must_drop)
}

fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Loading => "loading",
        InstanceState::Loaded => "loaded",
        InstanceState::Unloading => "unloading",
        InstanceState::Reclaiming => "reclaiming",
        InstanceState::Lost => "not_reclaimed",
    }
}

fn gpu_json(gpu: &GpuReading) -> Value {
    match &gpu.down_reason {
        Some(reason) => json!({"up": false, "reason": format!("no GPU: {reason}")}),
        None => json!({"up": true, "devices": gpu.devices}),
    }
}

fn line_of(ram: &RamReading, gpu: &GpuReading) -> MemoryLine {
    MemoryLine {
        ram_used: ram.used_bytes,
        ram_total: ram.total_bytes,
        vram: match &gpu.down_reason {
            None => Ok((gpu.used_bytes(), gpu.total_bytes())),
            Some(reason) => Err(reason.clone()),
        },
    }
}

/// The freshest device reading an app sent on its heartbeat.
fn app_gpu(sessions: &BTreeMap<SessionId, Session>, heartbeat: Duration) -> Option<GpuReading> {
    sessions
        .values()
        .filter_map(|s| s.readings.as_ref())
        .filter(|(_, at)| at.elapsed() <= heartbeat * 3)
        .filter_map(|(r, at)| {
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
            ))
        })
        .max_by_key(|(_, at)| *at)
        .map(|(device, _)| GpuReading {
            devices: vec![device],
            down_reason: None,
        })
}

/// Cancels a waiting acquire whose client went away, and releases a lease granted to it
/// that was never delivered.
struct WaitGuard {
    shared: Arc<Shared>,
    request: RequestId,
    receiver: Option<oneshot::Receiver<Verdict>>,
}

impl WaitGuard {
    async fn wait(mut self) -> Option<Verdict> {
        let receiver = self.receiver.as_mut()?;
        let verdict = receiver.await.ok();
        self.receiver = None;
        verdict
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        let mut core = self.shared.lock();
        if core.waiters.remove(&self.request).is_some() {
            core.engine.cancel(self.request);
            tracing::debug!(request = self.request.0, "acquire abandoned by its client");
            return;
        }
        if let Ok(Verdict::Granted { lease, .. }) = receiver.try_recv() {
            tracing::info!(lease = %lease_name(lease), "releasing a lease whose client went away");
            core.leases.remove(&lease);
            let now = core.now();
            let out = core.engine.release(now, lease);
            core.apply(&self.shared, out);
            let effects = std::mem::take(&mut core.pending_effects);
            drop(core);
            self.shared.run_effects(effects);
        }
    }
}

impl Core {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

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

    /// What a load is taken to hold: per resource the larger of the sidecar's and the app's
    /// measurement, the declared figure where neither measured.
    fn measured(&self, sidecar: Sizes, app: Sizes, declared: Footprint) -> Option<Footprint> {
        Sizes::combine(sidecar, app, (declared.vram, declared.ram))
            .map(|(vram, ram)| Footprint::new(vram, ram))
    }

    fn session_id(&self, name: &str) -> Result<SessionId, LookupError> {
        parse_id(name, "s-")
            .map(SessionId)
            .filter(|id| self.sessions.contains_key(id))
            .ok_or_else(|| LookupError::Session(name.to_owned()))
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

    fn unknown_lease(&self, request: &wire::Loaded) -> LookupError {
        LookupError::Lease {
            lease: request.lease.clone(),
            session: request.session.clone(),
        }
    }

    fn instance_state(&self, holder: SessionId, model: &str) -> Option<InstanceState> {
        let now = self.now();
        self.engine
            .instances(now)
            .into_iter()
            .find(|v| v.session == holder && v.model == model)
            .map(|v| v.state)
    }

    /// Drops lease records the engine no longer has.
    fn prune_leases(&mut self) {
        let engine = &self.engine;
        self.leases.retain(|id, _| engine.lease(*id).is_some());
    }

    fn apply(&mut self, shared: &Arc<Shared>, outputs: Vec<Output>) {
        self.apply_with_client(shared, outputs, None);
    }

    /// Carries out the engine's outputs: answers, lease records, unloads, metrics, logs.
    fn apply_with_client(
        &mut self,
        shared: &Arc<Shared>,
        outputs: Vec<Output>,
        own: Option<(RequestId, SessionId)>,
    ) {
        let metrics = &shared.metrics;
        for output in outputs {
            match output {
                Output::Granted {
                    request,
                    session: holder,
                    model,
                    lease,
                    action,
                    waited,
                } => {
                    let client = match own {
                        Some((r, client)) if r == request => Some(client),
                        _ => self.waiters.get(&request).map(|(client, _)| *client),
                    };
                    let Some(client) = client else {
                        // Nobody waits for it any more: hand the lease straight back.
                        let now = self.now();
                        let out = self.engine.release(now, lease);
                        self.apply(shared, out);
                        continue;
                    };
                    self.leases.insert(
                        lease,
                        LeaseInfo {
                            client,
                            holder,
                            model: model.clone(),
                        },
                    );
                    // The running block renewed its lease: the placeholder kept for it since a
                    // restart is no longer needed (never the last lease, so nothing unloads).
                    if client == holder
                        && let Some(placeholder) =
                            self.placeholders.remove(&(holder, model.clone()))
                    {
                        let now = self.now();
                        let out = self.engine.release(now, placeholder);
                        self.apply(shared, out);
                    }
                    if action == Action::Load {
                        let pid = self.sessions.get(&holder).map(|s| s.pid);
                        let before = pid.map_or((None, None), |pid| {
                            let rss = shared.meter.process(pid).rss_bytes;
                            let vram = shared.meter.process_vram(&[pid]).get(&pid).map(|(b, _)| *b);
                            (rss, vram)
                        });
                        self.tracks.insert(
                            (holder, model.clone()),
                            Track {
                                load_started: Some(Instant::now()),
                                before,
                                ..Track::default()
                            },
                        );
                    }
                    tracing::info!(
                        model,
                        session = %session_name(client),
                        lease = %lease_name(lease),
                        decision = match action { Action::Use => "use", Action::Load => "load" },
                        waited_ms = waited.as_millis() as u64,
                        "acquire granted"
                    );
                    let verdict = Verdict::Granted {
                        lease,
                        action,
                        holder,
                    };
                    self.deliver(shared, request, verdict);
                }
                Output::Refused {
                    request,
                    model,
                    refusal,
                    ..
                } => {
                    metrics
                        .acquires_refused
                        .with_label_values(&[refusal.reason.as_str()])
                        .inc();
                    tracing::warn!(model, reason = refusal.reason.as_str(), message = %refusal.message, "acquire refused");
                    self.deliver(shared, request, Verdict::Refused(refusal));
                }
                Output::Unload {
                    session: holder,
                    model,
                    reason,
                } => {
                    metrics
                        .unloads
                        .with_label_values(&[model.as_str(), reason.as_str()])
                        .inc();
                    let pid = self.sessions.get(&holder).map(|s| s.pid);
                    let reference = pid.map(|pid| {
                        let rss = shared.meter.process(pid).rss_bytes;
                        let vram = shared.meter.process_vram(&[pid]).get(&pid).map(|(b, _)| *b);
                        (rss, vram)
                    });
                    let track = self.tracks.entry((holder, model.clone())).or_default();
                    if let Some((rss, vram)) = reference {
                        // The model is still held: this is the level its unload must fall from.
                        track.reference = (rss.max(track.reference.0), vram.max(track.reference.1));
                    }
                    track.unload_started = Some(Instant::now());
                    track.unload_reason = Some(reason.as_str());
                    tracing::info!(model, session = %session_name(holder), reason = reason.as_str(), "unloading {model} ({})", reason.as_str());
                    self.pending_effects.push(Effect::Unload {
                        holder,
                        model,
                        reason,
                    });
                }
                Output::MemoryNotReclaimed {
                    session,
                    model,
                    held,
                } => {
                    metrics.memory_not_reclaimed.inc();
                    shared.set_last_error(format!(
                        "MemoryNotReclaimed: {model} ({held}) not seen back within the reclaim timeout"
                    ));
                    tracing::error!(
                        model,
                        session = %session_name(session),
                        held = %held,
                        timeout_ms = shared.settings.reclaim_timeout.as_millis() as u64,
                        "MemoryNotReclaimed: {model} was unloaded but its memory was not seen back within the reclaim timeout; it stays counted as lost"
                    );
                    if self.pool.enforcement == "Restart" {
                        tracing::error!(
                            model,
                            "enforcement Restart: restarting the app container needs the operator (not available in standalone mode)"
                        );
                    }
                }
                Output::CeilingExceeded {
                    resource,
                    held,
                    limit,
                } => {
                    metrics
                        .ceiling_breaches
                        .with_label_values(&[resource.as_str()])
                        .inc();
                    tracing::warn!(
                        resource = resource.as_str(),
                        "ceiling exceeded: models hold {} of {resource}, ceiling {}",
                        human(held),
                        human(limit)
                    );
                }
            }
        }
    }

    fn deliver(&mut self, shared: &Arc<Shared>, request: RequestId, verdict: Verdict) {
        match self.waiters.remove(&request) {
            Some((_, sender)) => {
                if let Err(Verdict::Granted { lease, .. }) = sender.send(verdict) {
                    // Its client is gone: hand the lease back.
                    self.leases.remove(&lease);
                    let now = self.now();
                    let out = self.engine.release(now, lease);
                    self.apply(shared, out);
                }
            }
            // Answered within the acquire call itself.
            None => {
                self.immediate.insert(request, verdict);
            }
        }
    }

    /// Adopts a model a process already holds. Err: it does not fit (message).
    fn adopt(
        &mut self,
        shared: &Arc<Shared>,
        id: SessionId,
        model: &str,
        hold_sizes: Sizes,
        in_use: bool,
    ) -> Result<(), String> {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let now = self.now();
        let out = self.engine.acquire(now, request, id, model);
        let granted = out.iter().find_map(|o| match o {
            Output::Granted {
                request: r,
                lease,
                action: Action::Load,
                ..
            } if *r == request => Some(*lease),
            _ => None,
        });
        let refused = out.iter().find_map(|o| match o {
            Output::Refused {
                request: r,
                refusal,
                ..
            } if *r == request => Some(refusal.message.clone()),
            _ => None,
        });
        // Other outputs (evictions started for it) are carried out.
        let rest: Vec<Output> = out
            .into_iter()
            .filter(|o| !matches!(o, Output::Granted { request: r, .. } | Output::Refused { request: r, .. } if *r == request))
            .collect();
        self.apply(shared, rest);
        let Some(lease) = granted else {
            self.engine.cancel(request);
            return Err(refused.unwrap_or_else(|| "no room for it now".to_owned()));
        };
        let declared = self.declared(model);
        let measured = self.measured(Sizes::default(), hold_sizes, declared);
        let out = self.engine.loaded(now, id, model, measured, None);
        self.apply(shared, out);
        let pid = self.sessions.get(&id).map(|s| s.pid);
        let reference = pid.map_or((None, None), |pid| {
            let rss = shared.meter.process(pid).rss_bytes;
            let vram = shared.meter.process_vram(&[pid]).get(&pid).map(|(b, _)| *b);
            (rss, vram)
        });
        self.tracks.insert(
            (id, model.to_owned()),
            Track {
                app: Sizes {
                    vram: hold_sizes.vram,
                    ram: hold_sizes.ram,
                },
                reference,
                ..Track::default()
            },
        );
        if in_use {
            // A block is still using it: keep a placeholder lease until the session's next
            // release of this model.
            self.placeholders.insert((id, model.to_owned()), lease);
            tracing::info!(session = %session_name(id), model, "held model adopted into the ledger, in use");
            return Ok(());
        }
        // Held without a lease: Aggressive mode unloads it now, Cache mode keeps it.
        let out = self.engine.release(now, lease);
        self.apply(shared, out);
        tracing::info!(session = %session_name(id), model, "held model adopted into the ledger");
        Ok(())
    }

    /// Ends a session: its leases go, its waiting acquires fail, its models wait for reclaim.
    fn end_session(&mut self, shared: &Arc<Shared>, id: SessionId, why: &str) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.placeholders.retain(|(holder, _), _| *holder != id);
        self.dead_pids.insert(id, session.pid);
        let now = self.now();
        for view in self.engine.instances(now) {
            if view.session == id
                && matches!(view.state, InstanceState::Loading | InstanceState::Loaded)
            {
                shared
                    .metrics
                    .unloads
                    .with_label_values(&[view.model.as_str(), "session_gone"])
                    .inc();
                let track = self.tracks.entry((id, view.model.clone())).or_default();
                track.unload_started.get_or_insert_with(Instant::now);
                track.unload_reason.get_or_insert("session_gone");
                track.reference.0 = track.reference.0.max(session.last_rss);
            }
        }
        // Its leases on instances held by the app server (Http driver) end too.
        let foreign: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.client == id && l.holder != id)
            .map(|(lease, _)| *lease)
            .collect();
        let mut out = Vec::new();
        for lease in foreign {
            out.extend(self.engine.release(now, lease));
        }
        out.extend(self.engine.session_gone(now, id));
        // Waiting acquires of this session end with it (their senders drop: 404 to the client).
        self.waiters.retain(|_, (client, _)| *client != id);
        self.leases.retain(|_, l| l.client != id);
        shared.hub.close(id);
        tracing::warn!(session = %session_name(id), pid = session.pid, app = session.app, why, "session ended: its leases are released and its models leave the accounting once their memory is seen freed");
        self.apply(shared, out);
        self.prune_leases();
    }

    fn finish_reclaim(
        &mut self,
        shared: &Arc<Shared>,
        holder: SessionId,
        model: &str,
        seen_by: &str,
    ) {
        if let Some(track) = self.tracks.remove(&(holder, model.to_owned()))
            && let Some(started) = track.unload_started
        {
            {
                shared
                    .metrics
                    .reclaim_duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(
                    model,
                    seen_by,
                    seconds = started.elapsed().as_secs_f64(),
                    "reclaim seen"
                );
            }
        }
        if !self.tracks.keys().any(|(s, _)| *s == holder) && !self.sessions.contains_key(&holder) {
            self.dead_pids.remove(&holder);
        }
    }
}
