//! The async shell around the decision core ([`crate::decide::Core`]): API handlers, the
//! ticker and the drivers call [`Shared`], which reads the clock and the meter *before* taking
//! the core's lock, makes one locked call into the core, and carries out the effects after the
//! lock is released (driver calls, command streams, log lines with memory readings).
//!
//! ```text
//!  API handler ─► Shared::acquire ─ clock ─► lock ─► Core::acquire ─► unlock ─► effects
//!  ticker ─────► Shared::tick ─ clock, meter (gpu, ram, every watched pid) ─► lock ─► Core::tick
//! ```

mod acquire;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use modelpool_policy::{Action, Footprint, SessionId, Sizes};
use tokio::sync::watch;

use crate::{
    api::wire::{self, AppReadings},
    decide::{
        Core, CoreConfig, Effects, LookupError, Measured, ProcessNow, ServerPoll, TickReadings,
        parse_id, session_name,
    },
    driver::{Driver, UnloadOutcome, sdk::CommandHub},
    measure::{
        GpuReading, MemoryLine, Meter, RamReading,
        tree::{ServerMatch, ServerProcesses},
    },
    metrics::{Gauges, Metrics},
    pool::{LoadedPool, PoolInfo},
};

/// Timing knobs from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Heartbeat interval asked of sessions.
    pub heartbeat: Duration,
    /// How often the ticker runs.
    pub tick: Duration,
    /// Reclaim timeout (also given to the engine).
    pub reclaim_timeout: Duration,
    /// Where learned sizes are kept across restarts (`crate::learned`), if anywhere.
    pub learned_file: Option<std::path::PathBuf>,
    /// What a server pool leaves out of its driver (`--driver-url`, `--process-match`).
    pub driver_defaults: crate::pool::DriverDefaults,
}

/// The core's clock: time since the sidecar started.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Duration;
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock(Instant);

impl SystemClock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// The answer to `POST /v1/acquire`.
#[derive(Debug)]
pub enum AcquireAnswer {
    /// `use` or `load`.
    Granted {
        /// `use` / `load`.
        action: Action,
        /// The lease.
        lease: modelpool_policy::LeaseId,
        /// The instance the lease is on.
        generation: u64,
        /// Seconds the driver's load took on this request's path (`None`: no load by the
        /// sidecar).
        load_seconds: Option<f64>,
    },
    /// `wait` (only with `"wait": false`).
    Wait {
        /// Why, with numbers.
        message: String,
    },
    /// Refused, with the numbers.
    Refused(Box<modelpool_policy::Refusal>),
    /// The Http driver's load failed.
    LoadFailed {
        /// The driver's error.
        message: String,
    },
}

/// The sidecar: the core behind one lock, measurement, metrics and the driver, shared by
/// handlers and tasks.
pub struct Shared {
    core: Mutex<Core>,
    /// Pids to measure, by session (open sessions and ended ones still reclaiming): kept from
    /// the core's effects, read before the lock.
    watched: RwLock<BTreeMap<SessionId, u32>>,
    /// The app's process reading when a `load` was answered, by (session, lease): what its
    /// `/v1/loaded` report is measured against.
    baselines: Mutex<HashMap<(String, modelpool_policy::LeaseId), Sizes>>,
    /// The Sdk command streams.
    pub hub: Arc<CommandHub>,
    driver: Arc<dyn Driver>,
    /// Server drivers: how the server's processes are found and read.
    processes: Option<ServerProcesses>,
    /// Server drivers: the driver's load and unload calls hold it shared, a poll of the
    /// server exclusively, so that a poll never races the driver's own changes.
    server_io: tokio::sync::RwLock<()>,
    meter: Arc<dyn Meter>,
    clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Metrics,
    /// Timing.
    pub settings: Settings,
    /// Set once the API listens.
    pub ready: AtomicBool,
    /// Set when the pool is being deleted (cluster mode): unload everything, admit nothing.
    draining: AtomicBool,
    /// The learned sizes last written to `settings.learned_file` (`None` once a write
    /// failed: not retried, said once).
    learned_written: Mutex<Option<BTreeMap<String, modelpool_policy::LearnedSize>>>,
    /// Ticks so far: every session's process is read once per heartbeat interval, the
    /// processes with an unload waiting for its proof on every tick.
    ticks: AtomicU64,
    /// The last problem worth reporting (cluster mode puts it on the pod's report).
    last_error: Mutex<Option<String>>,
    /// Models still to be estimated through the app's filesystem view.
    estimates: Mutex<Estimates>,
    changed: watch::Sender<u64>,
}

/// At most this many app processes' filesystem views are tried per pool for the models
/// awaiting an estimate (a session's pid each, or the model server's).
const MAX_ESTIMATE_PIDS: usize = 8;

/// The pool in force as converted (with the estimates made so far), for the models whose
/// size is estimated from weights only the app's process sees ([`crate::pool::WeightsView`]).
struct Estimates {
    pool: LoadedPool,
    /// Whether some model of `pool` awaits an estimate (checked without reading the pool).
    awaiting: bool,
    /// The pids whose `/proc/<pid>/root` was tried for this pool.
    tried: BTreeSet<u32>,
    /// Learned sizes to take back once an estimate gives a model its size (they were
    /// learned under it): the learned-sizes file's, then the pool status's.
    restorable: Vec<BTreeMap<String, modelpool_policy::LearnedSize>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("driver", &self.driver.kind())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A sidecar enforcing `pool`, on the real clock.
    pub fn new(
        pool: LoadedPool,
        driver: Arc<dyn Driver>,
        hub: Arc<CommandHub>,
        meter: Arc<dyn Meter>,
        metrics: Metrics,
        settings: Settings,
    ) -> Arc<Self> {
        Self::with_clock(
            pool,
            driver,
            hub,
            meter,
            Arc::new(SystemClock::start()),
            metrics,
            settings,
            crate::decide::sessions::first_session_id(),
        )
    }

    /// A sidecar on a given clock, with session ids from `first_session` (tests).
    #[allow(clippy::too_many_arguments)]
    pub fn with_clock(
        pool: LoadedPool,
        driver: Arc<dyn Driver>,
        hub: Arc<CommandHub>,
        meter: Arc<dyn Meter>,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        settings: Settings,
        first_session: u64,
    ) -> Arc<Self> {
        let measured = Measured {
            gpu: meter.gpu(),
            ram: meter.ram(),
        };
        let config = CoreConfig {
            heartbeat: settings.heartbeat,
            app_server: driver.loads_itself(),
        };
        let processes = driver.observes().then(|| {
            ServerProcesses::new(ServerMatch {
                command_line: pool.info.process_match.clone(),
                port: driver.server_port(),
                all: !driver.single_server(),
            })
        });
        let from_status = pool.learned.clone();
        let as_converted = pool.clone();
        let mut core = Core::new(pool, config, metrics.clone(), first_session, measured);
        let mut learned_written = BTreeMap::new();
        if let Some(path) = &settings.learned_file {
            match crate::learned::read(path) {
                Ok(sizes) => {
                    let restored = core.restore_learned(&sizes);
                    if !restored.is_empty() {
                        tracing::info!(file = %path.display(), ?restored, "sizes learned before the restart restored");
                    }
                    learned_written = sizes;
                }
                Err(error) => {
                    tracing::warn!(%error, "starting without the sizes learned before");
                }
            }
        }
        // Cluster mode: what the pool's other sidecars (and this pod's before) measured.
        let restored = core.restore_learned(&from_status);
        if !restored.is_empty() {
            tracing::info!(
                ?restored,
                "sizes learned by the pool's sidecars restored from its status"
            );
        }
        if driver.observes() {
            core.enable_server(driver.single_server());
            metrics.server_up.with_label_values(&[driver.kind()]).set(0);
        }
        let estimates = Estimates {
            awaiting: as_converted.awaits_estimates(),
            pool: as_converted,
            tried: BTreeSet::new(),
            restorable: vec![learned_written.clone(), from_status],
        };
        Arc::new(Self {
            core: Mutex::new(core),
            watched: RwLock::new(BTreeMap::new()),
            baselines: Mutex::new(HashMap::new()),
            hub,
            driver,
            processes,
            server_io: tokio::sync::RwLock::new(()),
            meter,
            clock,
            metrics,
            settings,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            last_error: Mutex::new(None),
            estimates: Mutex::new(estimates),
            learned_written: Mutex::new(Some(learned_written)),
            changed: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Plain data behind the lock: a panicked handler must not wedge the sidecar.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.clock.now()
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
        self.lock().pool().clone()
    }

    /// The driver's kind.
    pub fn driver_kind(&self) -> &'static str {
        self.driver.kind()
    }

    /// Whether SIGTERM was received.
    pub fn shutting_down(&self) -> bool {
        self.lock().shutting_down()
    }

    /// The seed's memory line, measured now.
    pub fn memory_line(&self) -> MemoryLine {
        let ram = self.meter.ram();
        let mut gpu = self.meter.gpu();
        if !gpu.up() {
            // No GPU in the sidecar: the freshest app-side device reading, if any.
            let now = self.now();
            if let Some(app) = self.lock().app_gpu(now) {
                gpu = app;
            }
        }
        line_of(&ram, &gpu)
    }

    /// One reading of a session's process (its pid as the core last knew it), before the lock.
    fn read_session(&self, session: &str) -> Option<ProcessNow> {
        let id = SessionId(parse_id(session, "s-")?);
        let pid = *self
            .watched
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)?;
        Some(self.read_pid(pid))
    }

    /// Every session pid the ticker reads, each once (one process may open several sessions).
    fn watched_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .watched
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    fn read_pid(&self, pid: u32) -> ProcessNow {
        let process = self.meter.process(pid);
        let vram = self
            .meter
            .process_vram(&[pid])
            .get(&pid)
            .map(|(bytes, _)| *bytes);
        ProcessNow {
            alive: process.alive,
            rss: process.rss_bytes,
            vram,
        }
    }

    /// Drops load baselines `drop` picks (their load was reported, released or its session
    /// ended).
    fn forget_baseline(&self, drop: impl Fn(&(String, modelpool_policy::LeaseId)) -> bool) {
        let mut baselines = self.baselines.lock().unwrap_or_else(|e| e.into_inner());
        if !baselines.is_empty() {
            baselines.retain(|key, _| !drop(key));
        }
    }

    /// Carries out what the core decided, after its lock is released.
    fn run(self: &Arc<Self>, fx: Effects) {
        if !fx.watch.is_empty() {
            let mut watched = self.watched.write().unwrap_or_else(|e| e.into_inner());
            for (id, pid) in &fx.watch {
                match pid {
                    Some(pid) => watched.insert(*id, *pid),
                    None => watched.remove(id),
                };
            }
        }
        for id in &fx.streams_opened {
            self.hub.open(*id);
        }
        for id in &fx.streams_closed {
            self.hub.close(*id);
            let name = session_name(*id);
            self.forget_baseline(|(s, _)| *s == name);
        }
        for (id, model, generation) in &fx.answered {
            self.hub.answered(*id, model, *generation);
        }
        if let Some(error) = fx.last_error {
            self.set_last_error(error);
        }
        for unload in fx.unloads {
            let this = Arc::clone(self);
            let call = self.driver.unload(
                unload.holder,
                &unload.model,
                unload.generation,
                unload.reason,
            );
            let loads_itself = self.driver.loads_itself();
            tokio::spawn(async move {
                let (holder, model, generation) = (unload.holder, unload.model, unload.generation);
                let _io = this.server_io.read().await;
                match call.await {
                    Ok(UnloadOutcome::Queued { command }) => {
                        tracing::debug!(model, command, generation, session = %session_name(holder), "unload command queued");
                    }
                    Ok(UnloadOutcome::Done) => {
                        let now = this.now();
                        let mut fx = Effects::default();
                        this.lock()
                            .driver_unloaded(now, holder, &model, generation, &mut fx);
                        this.run(fx);
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
        if !fx.reclaimed.is_empty() {
            let line = self.memory_line();
            for (holder, model, seen_by) in &fx.reclaimed {
                tracing::info!(model, session = %session_name(*holder), seen_by = seen_by.as_str(), "Memory after unload of {model}: {line}");
            }
        }
        self.bump();
    }

    // ---- sessions ----

    /// `POST /v1/sessions`.
    pub fn open_session(
        self: &Arc<Self>,
        request: wire::CreateSession,
    ) -> Result<wire::SessionCreated, LookupError> {
        // The weights the app's process sees were estimated before (api::open_session, off
        // the runtime's thread).
        let process = self.read_pid(request.pid);
        let now = self.now();
        let mut fx = Effects::default();
        let answer =
            self.lock()
                .open_session(now, &request, process, self.settings.heartbeat, &mut fx);
        self.run(fx);
        answer
    }

    /// `POST /v1/sessions/{id}/heartbeat`.
    pub fn heartbeat(
        &self,
        session: &str,
        readings: Option<AppReadings>,
    ) -> Result<(), LookupError> {
        let now = self.now();
        self.lock().heartbeat(now, session, readings)
    }

    /// `DELETE /v1/sessions/{id}`.
    pub fn close_session(self: &Arc<Self>, session: &str) -> Result<(), LookupError> {
        let now = self.now();
        let mut fx = Effects::default();
        let result = self.lock().close_session(now, session, &mut fx);
        self.run(fx);
        result
    }

    /// Resolves a session name for the command stream.
    pub fn command_session(&self, session: &str) -> Result<SessionId, LookupError> {
        self.lock().session_id(session)
    }

    /// Drops commands whose instance no longer waits for its unload.
    pub fn prune_commands(&self, id: SessionId) {
        let now = self.now();
        let unloading = self.lock().unloading(now, id);
        // A command stays while its own instance waits for the unload; a refused hold's
        // (generation 0) stays until it is answered.
        self.hub.retain(id, |c| {
            c.generation == 0
                || unloading
                    .iter()
                    .any(|(model, generation)| *model == c.model && *generation == c.generation)
        });
    }

    /// Whether a session is still open.
    pub fn session_open(&self, id: SessionId) -> bool {
        self.lock().session_open(id)
    }

    // ---- cleanup, check, state ----

    /// `POST /v1/cleanup`.
    pub fn cleanup(self: &Arc<Self>, force: bool) -> wire::CleanupAnswer {
        tracing::info!(force, "Memory before cleanup: {}", self.memory_line());
        let now = self.now();
        let mut fx = Effects::default();
        let answer = self.lock().cleanup(now, force, &mut fx);
        self.run(fx);
        answer
    }

    /// `GET /v1/check`.
    pub fn check(&self, need: Footprint) -> wire::CheckAnswer {
        self.lock().check(need)
    }

    /// `GET /v1/state`.
    pub fn state(&self) -> wire::State {
        let pids = self.watched_pids();
        let process_vram = self.meter.process_vram(&pids);
        let pending = self.hub.pending_all();
        let now = self.now();
        self.lock().state(now, &process_vram, &pending)
    }

    // ---- server drivers ----

    /// Why the model server does not answer, if it does not (server drivers).
    pub fn server_down(&self) -> Option<String> {
        self.lock().server().down.clone()
    }

    /// One poll of the model server (server drivers; nothing otherwise): what it holds and
    /// its process tree, read before the lock, then one reconcile. Skipped while a load or
    /// unload call is under way (the next poll comes a tick later).
    pub async fn poll_server(self: &Arc<Self>) {
        let Some(observe) = self.driver.observe() else {
            return;
        };
        let Ok(io) = self.server_io.try_write() else {
            return;
        };
        let limit = self.settings.tick.max(Duration::from_secs(2));
        let view = match tokio::time::timeout(limit, observe).await {
            Ok(Ok(view)) => Ok(view),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer to the poll within {limit:?}")),
        };
        let up = view.is_ok();
        // A walk of /proc: off the runtime's thread.
        let this = Arc::clone(self);
        let tree = tokio::task::spawn_blocking(move || {
            let mut tree = this.processes.as_ref().and_then(ServerProcesses::read)?;
            this.estimate_through(&tree.pids);
            // NVML on the whole tree (MLServer loads in worker processes). Pids NVML does
            // not list add nothing; none listed at all means no reading, not zero.
            let vram = this.meter.process_vram(&tree.pids);
            tree.vram_bytes =
                (!vram.is_empty()).then(|| vram.values().map(|(bytes, _)| *bytes).sum());
            Some(tree)
        })
        .await
        .ok()
        .flatten();
        // The gauge first: once /readyz (the core's view) says down, a scrape says so too.
        self.metrics
            .server_up
            .with_label_values(&[self.driver.kind()])
            .set(i64::from(up));
        let now = self.now();
        let mut fx = Effects::default();
        self.lock()
            .reconcile_server(now, ServerPoll { view, tree }, &mut fx);
        drop(io);
        self.run(fx);
    }

    // ---- time passing ----

    /// One tick: measure (before the lock), then end dead sessions, verify reclaims and
    /// advance the engine's timers (one locked call).
    pub fn tick(self: &Arc<Self>) {
        let started = Instant::now();
        let ram = self.meter.ram();
        let gpu = self.meter.gpu();
        // A /proc read per session per tick was most of the idle CPU (2.3 % of a core at 100
        // sessions): liveness is read once per heartbeat interval (a dead pid still ends its
        // session before two missed heartbeats would), reclaim proofs on every tick.
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed);
        let every = (self.settings.heartbeat.as_millis() / self.settings.tick.as_millis().max(1))
            .clamp(1, u128::from(u64::MAX)) as u64;
        let pids = if tick.is_multiple_of(every) {
            let pids = self.watched_pids();
            // After a pool edit: the models it added are estimated through the sessions' views.
            self.estimate_through(&pids);
            pids
        } else {
            self.lock().pids_awaiting_reclaim(self.now())
        };
        let vram = if gpu.up() && !pids.is_empty() {
            self.meter.process_vram(&pids)
        } else {
            BTreeMap::new()
        };
        let pod_devices = if gpu.devices.len() > 1 && !pids.is_empty() {
            self.meter.process_devices(&pids)
        } else {
            BTreeSet::new()
        };
        let processes: BTreeMap<u32, ProcessNow> = pids
            .iter()
            .map(|pid| {
                let process = self.meter.process(*pid);
                (
                    *pid,
                    ProcessNow {
                        alive: process.alive,
                        rss: process.rss_bytes,
                        vram: vram.get(pid).map(|(bytes, _)| *bytes),
                    },
                )
            })
            .collect();
        self.metrics
            .measure_duration
            .observe(started.elapsed().as_secs_f64());
        let draining = self.draining();
        let now = self.now();
        let mut fx = Effects::default();
        self.lock().tick(
            now,
            TickReadings {
                gpu,
                ram,
                processes,
                pod_devices,
            },
            draining,
            &mut fx,
        );
        if !fx.is_empty() {
            self.run(fx);
        }
        self.persist_learned();
    }

    /// Writes the learned sizes when they changed (the tick runs on the blocking pool).
    fn persist_learned(&self) {
        let Some(path) = &self.settings.learned_file else {
            return;
        };
        let mut written = self
            .learned_written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(last) = written.as_mut() else {
            return;
        };
        let now = self.lock().learned_sizes();
        // Kept: entries of models the pool no longer lists, for when it lists them again.
        let mut merged = last.clone();
        merged.extend(now);
        if merged == *last {
            return;
        }
        match crate::learned::write(path, &merged) {
            Ok(()) => *last = merged,
            Err(error) => {
                tracing::warn!(%error, "learned sizes will not survive a restart");
                *written = None;
            }
        }
    }

    /// SIGTERM: stop admitting, ask apps to unload idle models.
    pub fn begin_shutdown(self: &Arc<Self>) {
        tracing::info!("Memory before shutdown: {}", self.memory_line());
        let now = self.now();
        let mut fx = Effects::default();
        self.lock().shutdown(now, &mut fx);
        self.run(fx);
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
        let now = self.now();
        self.lock().unloads_in_flight(now)
    }

    /// Puts a new pool in force.
    pub fn update_pool(self: &Arc<Self>, pool: LoadedPool) {
        let mut pool = pool.with_driver_defaults(&self.settings.driver_defaults);
        let mut estimates = self.estimates.lock().unwrap_or_else(|e| e.into_inner());
        pool.keep_estimates(&estimates.pool);
        estimates.awaiting = pool.awaits_estimates();
        estimates.tried.clear();
        estimates.pool = pool.clone();
        let now = self.now();
        let mut fx = Effects::default();
        self.lock().update_pool(now, pool, &mut fx);
        drop(estimates);
        self.run(fx);
    }

    /// Estimates the models still awaiting one ([`crate::pool::ModelInfo::awaits_estimate`])
    /// from their weights read through the filesystem view of the app's processes `pids`
    /// (`/proc/<pid>/root`: the shared process namespace of a pod), each pid tried once per
    /// pool, at most [`MAX_ESTIMATE_PIDS`]. An estimate found puts the pool back in force with
    /// it, and takes back the sizes learned under it before a restart. Header reads only,
    /// bounded (`modelpool_weights::Limits`); cheap when nothing awaits.
    pub fn estimate_through(self: &Arc<Self>, pids: &[u32]) {
        let mut estimates = self.estimates.lock().unwrap_or_else(|e| e.into_inner());
        if !estimates.awaiting {
            return;
        }
        let own = std::process::id();
        let mut changed = false;
        let mut problems = Vec::new();
        for &pid in pids {
            if pid == own || pid == 0 || estimates.tried.contains(&pid) {
                continue;
            }
            if estimates.tried.len() >= MAX_ESTIMATE_PIDS {
                break;
            }
            estimates.tried.insert(pid);
            let root = modelpool_weights::Root::process(pid);
            for (model, outcome) in estimates.pool.estimate_through(&root) {
                match outcome {
                    Ok(()) => changed = true,
                    Err(error) => {
                        tracing::warn!(model, pid, %error, "no footprint declared and none could be estimated through the app's filesystem view");
                        problems.push(format!("model {model}: no size estimated: {error}"));
                    }
                }
            }
            estimates.awaiting = estimates.pool.awaits_estimates();
            if !estimates.awaiting {
                break;
            }
        }
        if estimates.awaiting
            && let Some(problem) = problems.pop()
        {
            self.set_last_error(problem);
        }
        if !changed {
            return;
        }
        let pool = estimates.pool.clone();
        let now = self.now();
        let mut fx = Effects::default();
        {
            let mut core = self.lock();
            core.update_pool(now, pool, &mut fx);
            for sizes in &estimates.restorable {
                let restored = core.restore_learned(sizes);
                if !restored.is_empty() {
                    tracing::info!(
                        ?restored,
                        "sizes learned before under the estimates restored"
                    );
                }
            }
        }
        drop(estimates);
        self.run(fx);
        self.bump();
    }

    /// The levels for `/metrics`, taken under one lock.
    pub fn gauges(&self) -> Gauges {
        let now = self.now();
        self.lock().gauges(now)
    }

    /// `GET /metrics`: the levels of one moment, then the event counters.
    pub fn render_metrics(&self) -> String {
        let gauges = self.gauges();
        self.metrics.render(&gauges)
    }

    /// Runs `f` on the core (tests and views).
    pub fn with_core<T>(&self, f: impl FnOnce(&Core) -> T) -> T {
        f(&self.lock())
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
