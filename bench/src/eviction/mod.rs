//! The `eviction` scenario: the real policy engine against the caching rules people use
//! today, on the same trace, the same ceilings and a simulated clock, next to a clairvoyant
//! schedule and a proven lower bound on what any schedule costs.
//!
//! Every request is `acquire` → (when the answer is Load: `loaded` after the model's load
//! time) → hold for `hold_s` → `release`. Unload commands are answered at once (`unloaded` and
//! `reclaimed` in the same instant). A request that finds no room waits (FIFO, as the engine
//! queues) up to the pool's acquire timeout, then is refused.
//!
//! **Cost** (`cost_s`) is the delay users see, in seconds, summed over requests: the time each
//! request waited for its grant (`queue_wait_s`), plus each load (`reload_seconds`: the request
//! that asked for the load waits for it; cold loads count, every policy pays those), plus for
//! each refused request its model's load time (`refused_load_s`: what retrying it would take
//! at the least) on top of the wait it was refused after. So a policy cannot look cheaper by
//! refusing, or by making requests queue.
//!
//! Contenders, all under the same ceilings:
//! - ours: the engine in Cache mode with CostAware or Lru eviction, with the pool's idle TTL
//!   (`costaware_cache`, `lru_cache`) or none (`costaware_keep`); in Aggressive mode (unload at
//!   last release: the seed's behaviour); and `manifest`, the engine exactly as a `ModelPool`
//!   manifest configures it (mode, eviction, idleTTL, pressure with the pod's baseline,
//!   priorities), for workloads that come with one.
//! - `lru`: keep everything, evict the least recently used idle model when a load does not fit.
//! - `ttl_keepalive` (Ollama's scheduler): unload after the idle TTL (`keep_alive`); when a
//!   load does not fit, or `OLLAMA_MAX_LOADED_MODELS` (3, its default for one GPU) are loaded,
//!   unload idle runners in Ollama's order: by keep-alive duration, then by model path (a
//!   fixed order unrelated to use: here the model name), one at a time until it fits.
//! - `max_n_lru` (Ray Serve model multiplexing, `max_num_models_per_replica`): at most N models,
//!   LRU; N is the ceiling over the mean model size. Loads that N allows but memory does not
//!   are counted in `would_oom` (Ray does not know memory: those would fail there) and then
//!   made to fit by evicting more, so that its cost stays comparable.
//! - `offline` (clairvoyant): on each eviction it knows every future arrival. Two rules are run
//!   and the cheaper kept: Belady (evict the idle model whose next use is farthest, larger first
//!   on ties) and cost-weighted Belady (evict the smallest `load_s / (size × time to next use)`
//!   first). A good schedule, not an optimal one: policies can beat it.
//! - `offline_ttl`: the same under the workload's idle TTL (models idle that long are unloaded,
//!   as the TTL contenders must): the reference for `costaware_cache`, `lru_cache` and
//!   `ttl_keepalive`, which cannot keep a model through a lull longer than the TTL whatever
//!   they know.
//! - `rate_oracle` (clairvoyant about rates only): `costaware_keep` told each model's true
//!   long-run request rate over the trace instead of estimating it. Between it and `offline`
//!   lies what knowing the order of the requests buys, which no estimate of rates gives.
//! - `bound` (`bench/src/bound.rs`): the optimum of a linear-programming relaxation, a proven
//!   lower bound on `cost_s` for every schedule of the trace, online or not.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    time::Duration,
};

use modelpool_policy::{
    Action, Engine, EvictionPolicy, Footprint, LeaseId, Mode, ModelConfig, Output, PoolConfig,
    Readings, RequestId, SessionId,
};

use crate::{bound, report::Row, trace::Workload};

mod baselines;
use self::baselines::{Simple, Victim, offline, ollama};

const GIB: f64 = (1u64 << 30) as f64;
const SESSION: SessionId = SessionId(1);
/// Ollama's default `OLLAMA_MAX_LOADED_MODELS` on one GPU (3 per GPU).
pub const OLLAMA_MAX_LOADED: usize = 3;

/// The contenders, in the order results are printed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Contender {
    /// Engine, Cache mode, CostAware, the workload's idle TTL.
    CostAwareCache,
    /// Engine, Cache mode, CostAware, no idle TTL.
    CostAwareKeep,
    /// Engine, Cache mode, Lru, the workload's idle TTL.
    LruCache,
    /// Engine, Aggressive mode.
    Aggressive,
    /// Engine as the workload's ModelPool manifest configures it (only with a manifest).
    Manifest,
    /// Plain LRU.
    Lru,
    /// Ollama's scheduler: keep_alive, its victim order and its max-loaded cap.
    TtlKeepalive,
    /// Ray Serve multiplexing.
    MaxNLru,
    /// The clairvoyant schedule.
    Offline,
    /// The clairvoyant schedule under the workload's idle TTL (it unloads what stays idle that
    /// long, as the TTL policies must): the reference for the TTL policies.
    OfflineTtl,
    /// `costaware_keep` told each model's true long-run request rate (its requests in the
    /// trace over the trace's length) instead of estimating it: what knowing the popularity
    /// buys, apart from knowing the order.
    RateOracle,
}

impl Contender {
    /// All, ours first.
    pub const ALL: [Contender; 11] = [
        Self::CostAwareCache,
        Self::CostAwareKeep,
        Self::LruCache,
        Self::Aggressive,
        Self::Manifest,
        Self::Lru,
        Self::TtlKeepalive,
        Self::MaxNLru,
        Self::Offline,
        Self::OfflineTtl,
        Self::RateOracle,
    ];

    /// The contender of a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Its name in results.
    pub fn name(self) -> &'static str {
        match self {
            Self::CostAwareCache => "costaware_cache",
            Self::CostAwareKeep => "costaware_keep",
            Self::LruCache => "lru_cache",
            Self::Aggressive => "aggressive",
            Self::Manifest => "manifest",
            Self::Lru => "lru",
            Self::TtlKeepalive => "ttl_keepalive",
            Self::MaxNLru => "max_n_lru",
            Self::Offline => "offline",
            Self::OfflineTtl => "offline_ttl",
            Self::RateOracle => "rate_oracle",
        }
    }

    /// `ours`, `baseline` or `clairvoyant`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::CostAwareCache
            | Self::CostAwareKeep
            | Self::LruCache
            | Self::Aggressive
            | Self::Manifest => "ours",
            Self::Offline | Self::OfflineTtl | Self::RateOracle => "clairvoyant",
            _ => "baseline",
        }
    }
}

/// What one contender did on one trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Requests in the trace.
    pub requests: u64,
    /// Loads (cold ones included).
    pub loads: u64,
    /// Unloads (TTL, eviction, release).
    pub unloads: u64,
    /// Requests answered without a load of their own.
    pub hits: u64,
    /// Requests refused (waited past the acquire timeout, or can never fit).
    pub refused: u64,
    /// Bytes moved by loads (the larger footprint of each).
    pub reload_bytes: u64,
    /// Seconds spent loading.
    pub reload_seconds: f64,
    /// The load time of each refused request's model, summed.
    pub refused_load_seconds: f64,
    /// Arrival to grant (or to refusal), summed over all requests.
    pub queue_wait_seconds: f64,
    /// Sum of arrival-to-usable times of granted requests.
    pub wait_seconds: f64,
    /// Requests granted.
    pub granted: u64,
    /// Time integral of held VRAM and RAM, byte-seconds.
    pub held_area: (f64, f64),
    /// Trace span, seconds (first arrival to last release).
    pub span: f64,
    /// `max_n_lru` only: loads its N allowed that memory did not.
    pub would_oom: Option<u64>,
    /// `offline` only: which rule gave the schedule.
    pub variant: Option<&'static str>,
}

impl Stats {
    /// Requests served without a load of their own.
    pub fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.requests.max(1) as f64
    }

    /// The cost: loads, queueing, and refusals priced at their wait plus a load.
    pub fn cost(&self) -> f64 {
        self.reload_seconds + self.refused_load_seconds + self.queue_wait_seconds
    }

    /// Mean VRAM and RAM held, GiB.
    pub fn held_gib_mean(&self) -> (f64, f64) {
        let span = self.span.max(1e-9);
        (self.held_area.0 / span / GIB, self.held_area.1 / span / GIB)
    }
}

// ---- the simulated app and clock ----

enum Out {
    Granted {
        request: usize,
        lease: u64,
        load: bool,
    },
    Unload {
        model: usize,
    },
    Refused {
        request: usize,
    },
}

trait Backend {
    fn acquire(&mut self, now: Duration, request: usize, model: usize, out: &mut Vec<Out>);
    fn loaded(&mut self, now: Duration, model: usize, out: &mut Vec<Out>);
    fn release(&mut self, now: Duration, lease: u64, out: &mut Vec<Out>);
    /// The app unloaded it and its memory is back.
    fn unloaded(&mut self, now: Duration, model: usize, out: &mut Vec<Out>);
    fn tick(&mut self, now: Duration, out: &mut Vec<Out>);
    fn held(&self) -> Footprint;
    fn would_oom(&self) -> Option<u64> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Release(usize),
    LoadDone(usize),
    Arrival(usize),
    Tick,
}

fn micros(seconds: f64) -> u64 {
    (seconds * 1e6).round().max(0.0) as u64
}

/// Runs a workload through a backend.
fn simulate(w: &Workload, backend: &mut dyn Backend) -> Stats {
    let mut stats = Stats {
        requests: w.requests.len() as u64,
        ..Stats::default()
    };
    let mut heap: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, at: u64, event: Event| {
        seq += 1;
        heap.push(Reverse((at, seq, event)));
    };
    for (i, r) in w.requests.iter().enumerate() {
        push(&mut heap, micros(r.t), Event::Arrival(i));
    }
    let mut pending = w.requests.len();
    push(&mut heap, 1_000_000, Event::Tick);
    let mut leases: Vec<Option<u64>> = vec![None; w.requests.len()];
    let mut last = 0u64;
    let mut end = 0u64;
    let mut area = (0.0, 0.0);
    let mut out = Vec::new();
    let mut work = VecDeque::new();
    while let Some(Reverse((at, _, event))) = heap.pop() {
        let now = Duration::from_micros(at);
        let held = backend.held();
        let dt = (at - last) as f64 / 1e6;
        area.0 += held.vram as f64 * dt;
        area.1 += held.ram as f64 * dt;
        last = at;
        if event != Event::Tick {
            end = at;
            stats.held_area = area;
            pending -= 1;
        }
        match event {
            Event::Arrival(i) => backend.acquire(now, i, w.requests[i].model, &mut out),
            Event::LoadDone(i) => {
                let r = &w.requests[i];
                stats.wait_seconds += (now.as_secs_f64() - r.t).max(0.0);
                backend.loaded(now, r.model, &mut out);
                pending += 1;
                push(&mut heap, at + micros(r.hold_s), Event::Release(i));
            }
            Event::Release(i) => {
                if let Some(lease) = leases[i].take() {
                    backend.release(now, lease, &mut out);
                }
            }
            Event::Tick => {
                backend.tick(now, &mut out);
                if pending > 0 {
                    push(&mut heap, at + 1_000_000, Event::Tick);
                }
            }
        }
        // Carry out what the backend asked, including what answering it asks in turn.
        work.extend(out.drain(..));
        while let Some(o) = work.pop_front() {
            match o {
                Out::Granted {
                    request,
                    lease,
                    load,
                } => {
                    let r = &w.requests[request];
                    let model = &w.models[r.model];
                    leases[request] = Some(lease);
                    stats.granted += 1;
                    stats.queue_wait_seconds += (now.as_secs_f64() - r.t).max(0.0);
                    pending += 1;
                    if load {
                        stats.loads += 1;
                        stats.reload_seconds += model.load_s;
                        stats.reload_bytes += model.load_bytes();
                        push(
                            &mut heap,
                            at + micros(model.load_s),
                            Event::LoadDone(request),
                        );
                    } else {
                        stats.hits += 1;
                        stats.wait_seconds += (now.as_secs_f64() - r.t).max(0.0);
                        push(&mut heap, at + micros(r.hold_s), Event::Release(request));
                    }
                }
                Out::Unload { model } => {
                    stats.unloads += 1;
                    backend.unloaded(now, model, &mut out);
                    work.extend(out.drain(..));
                }
                Out::Refused { request } => {
                    let r = &w.requests[request];
                    stats.refused += 1;
                    stats.refused_load_seconds += w.models[r.model].load_s;
                    stats.queue_wait_seconds += (now.as_secs_f64() - r.t).max(0.0);
                }
            }
        }
    }
    let first = w.requests.first().map_or(0, |r| micros(r.t));
    stats.span = end.saturating_sub(first) as f64 / 1e6;
    stats.would_oom = backend.would_oom();
    stats
}

// ---- our engine ----

struct Ours {
    engine: Engine,
    names: Vec<String>,
    index: HashMap<String, usize>,
    load_s: Vec<f64>,
    /// With a manifest: the pod's baseline, added to what the engine holds in the readings
    /// that drive pressure eviction (the pod is taken to be alone on a device the size of its
    /// ceilings).
    readings_baseline: Option<Footprint>,
}

impl Ours {
    fn new(w: &Workload, mode: Mode, eviction: EvictionPolicy, ttl: Option<Duration>) -> Self {
        let models = w
            .models
            .iter()
            .map(|m| ModelConfig {
                name: m.name.clone(),
                declared: Footprint::new(m.vram, m.ram),
                priority: m.priority,
                pinned: m.pinned,
                load_seconds: Some(m.load_s),
                sized: true,
                estimated: false,
            })
            .collect();
        let mut config = PoolConfig::new(w.limits, models);
        config.mode = mode;
        config.eviction = eviction;
        config.idle_ttl = ttl.unwrap_or(Duration::MAX);
        config.acquire_timeout = w.acquire_timeout;
        Self {
            engine: Engine::new(config),
            names: w.models.iter().map(|m| m.name.clone()).collect(),
            index: w
                .models
                .iter()
                .enumerate()
                .map(|(i, m)| (m.name.clone(), i))
                .collect(),
            load_s: w.models.iter().map(|m| m.load_s).collect(),
            readings_baseline: None,
        }
    }

    /// The engine as the workload's manifest configures it, `None` without a manifest.
    fn manifest(w: &Workload) -> Option<Self> {
        let m = w.manifest?;
        let mut ours = Self::new(w, m.mode, m.eviction, Some(w.idle_ttl));
        let mut config = ours.engine.config().clone();
        config.pressure_vram_percent = m.pressure_vram_percent;
        config.pressure_ram_percent = m.pressure_ram_percent;
        config.evict_over_ceiling = m.evict_over_ceiling;
        ours.engine = Engine::new(config);
        ours.readings_baseline = Some(m.baseline);
        Some(ours)
    }

    fn readings(&self) -> Readings {
        let Some(baseline) = self.readings_baseline else {
            return Readings::default();
        };
        // What the device shows: loads granted but not reported are not visible yet.
        let visible = self
            .engine
            .instances(Duration::ZERO)
            .into_iter()
            .filter(|i| i.state != modelpool_policy::InstanceState::Loading)
            .fold(Footprint::default(), |sum, i| sum.plus(i.held));
        let held = visible.plus(baseline);
        let limits = self.engine.config().limits;
        Readings {
            vram: limits.vram.map(|l| (held.vram, l)),
            ram: limits.ram.map(|l| (held.ram, l)),
            vram_claimed_by: None,
        }
    }

    fn convert(&self, outputs: Vec<Output>, out: &mut Vec<Out>) {
        for o in outputs {
            match o {
                Output::Granted {
                    request,
                    lease,
                    action,
                    ..
                } => out.push(Out::Granted {
                    request: request.0 as usize,
                    lease: lease.0,
                    load: action == Action::Load,
                }),
                Output::Unload { model, .. } => {
                    if let Some(&model) = self.index.get(&model) {
                        out.push(Out::Unload { model });
                    }
                }
                Output::Refused { request, .. } => out.push(Out::Refused {
                    request: request.0 as usize,
                }),
                Output::MemoryNotReclaimed { .. } | Output::CeilingExceeded { .. } => {}
            }
        }
    }
}

impl Backend for Ours {
    fn acquire(&mut self, now: Duration, request: usize, model: usize, out: &mut Vec<Out>) {
        let o = self
            .engine
            .acquire(now, RequestId(request as u64), SESSION, &self.names[model]);
        self.convert(o, out);
    }

    fn loaded(&mut self, now: Duration, model: usize, out: &mut Vec<Out>) {
        let o = self.engine.loaded(
            now,
            SESSION,
            &self.names[model],
            None,
            Some(self.load_s[model]),
        );
        self.convert(o, out);
    }

    fn release(&mut self, now: Duration, lease: u64, out: &mut Vec<Out>) {
        let o = self.engine.release(now, LeaseId(lease));
        self.convert(o, out);
    }

    fn unloaded(&mut self, now: Duration, model: usize, out: &mut Vec<Out>) {
        let mut o = self.engine.unloaded(now, SESSION, &self.names[model]);
        o.extend(self.engine.reclaimed(now, SESSION, &self.names[model]));
        self.convert(o, out);
    }

    fn tick(&mut self, now: Duration, out: &mut Vec<Out>) {
        let readings = self.readings();
        let o = self.engine.tick(now, readings);
        self.convert(o, out);
    }

    fn held(&self) -> Footprint {
        self.engine.held()
    }
}

/// Ray Serve's N for a workload: the VRAM ceiling over the mean model size (at least 1).
pub fn max_n(w: &Workload) -> usize {
    let n = w.models.len().max(1);
    let mean = w.models.iter().map(|m| m.vram.max(1) as f64).sum::<f64>() / n as f64;
    match w.limits.vram {
        Some(limit) => ((limit as f64 / mean).floor() as usize).clamp(1, n),
        None => n,
    }
}

/// Runs one contender on a workload; `None` for `manifest` without a manifest.
pub fn run(w: &Workload, contender: Contender) -> Option<Stats> {
    let ttl = Some(w.idle_ttl);
    Some(match contender {
        Contender::CostAwareCache => simulate(
            w,
            &mut Ours::new(w, Mode::Cache, EvictionPolicy::CostAware, ttl),
        ),
        Contender::CostAwareKeep => simulate(
            w,
            &mut Ours::new(w, Mode::Cache, EvictionPolicy::CostAware, None),
        ),
        Contender::LruCache => {
            simulate(w, &mut Ours::new(w, Mode::Cache, EvictionPolicy::Lru, ttl))
        }
        Contender::Aggressive => simulate(
            w,
            &mut Ours::new(w, Mode::Aggressive, EvictionPolicy::CostAware, ttl),
        ),
        Contender::Manifest => simulate(w, &mut Ours::manifest(w)?),
        Contender::Lru => simulate(w, &mut Simple::new(w, Victim::Lru, None, None)),
        Contender::TtlKeepalive => simulate(w, &mut ollama(w, ttl)),
        Contender::MaxNLru => {
            let mut ray = Simple::new(w, Victim::Lru, None, Some(max_n(w)));
            ray.memory_blind = true;
            simulate(w, &mut ray)
        }
        Contender::Offline => offline(w, None),
        Contender::OfflineTtl => offline(w, ttl),
        Contender::RateOracle => {
            let mut ours = Ours::new(w, Mode::Cache, EvictionPolicy::CostAware, None);
            ours.engine.set_known_gaps(Some(true_gaps(w)));
            simulate(w, &mut ours)
        }
    })
}

/// Each model's true mean time between requests over the whole trace (the trace's length over
/// its requests; a model never asked for: never).
fn true_gaps(w: &Workload) -> Vec<f64> {
    let span = w.requests.last().map_or(0.0, |r| r.t).max(1.0);
    let mut requests = vec![0u32; w.models.len()];
    for r in &w.requests {
        if let Some(n) = requests.get_mut(r.model) {
            *n += 1;
        }
    }
    requests
        .into_iter()
        .map(|n| {
            if n == 0 {
                f64::INFINITY
            } else {
                span / f64::from(n)
            }
        })
        .collect()
}

/// Options of a run over one workload.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Contenders to run.
    pub contenders: Vec<Contender>,
    /// Compute the lower bound, with this many requests per linear program (`None`: skip).
    pub bound_window: Option<usize>,
    /// Seed of a synthetic trace, shown in results.
    pub seed: Option<u64>,
}

/// Every contender on a workload, as result rows: the offline schedule and the bound are
/// computed first, in the same run, and every cost is divided by both.
pub fn rows(w: &Workload, options: &RunOptions) -> anyhow::Result<Vec<Row>> {
    let offline = run(w, Contender::Offline).unwrap_or_default();
    let bound = match options.bound_window {
        Some(window) => Some(bound::lower_bound(w, window)?),
        None => None,
    };
    let mut rows = Vec::new();
    for &c in &options.contenders {
        let stats = if c == Contender::Offline {
            Some(offline.clone())
        } else {
            run(w, c)
        };
        if let Some(stats) = stats {
            rows.push(row(
                w,
                options.seed,
                c.name(),
                c.kind(),
                &stats,
                &offline,
                bound.as_ref(),
            ));
        }
    }
    if let Some(b) = &bound {
        let mut r = Row::new("eviction")
            .with("trace", w.name.clone())
            .with("seed", options.seed)
            .with("policy", "bound")
            .with("kind", "bound")
            .with("requests", w.requests.len())
            .num("cost_s", b.cost_s, 6)
            .num("ratio_to_offline", b.cost_s / offline.cost().max(1e-9), 4)
            .num("ratio_to_bound", 1.0, 4)
            .num("offline_cost_s", offline.cost(), 6)
            .num("bound_cost_s", b.cost_s, 6)
            .with("bound_windows", b.windows)
            .with("bound_lp_rows", b.rows)
            .with("bound_lp_columns", b.columns)
            .num("bound_solve_s", b.solve_s, 3);
        if b.cold_only {
            r = r.with("bound_note", "cold loads only");
        }
        rows.push(r);
    }
    Ok(rows)
}

fn ratio(cost: f64, base: f64) -> f64 {
    if base > 0.0 {
        cost / base
    } else if cost == 0.0 {
        1.0
    } else {
        f64::INFINITY
    }
}

fn row(
    w: &Workload,
    seed: Option<u64>,
    name: &str,
    kind: &str,
    s: &Stats,
    offline: &Stats,
    bound: Option<&bound::Bound>,
) -> Row {
    let (vram, ram) = s.held_gib_mean();
    let mut row = Row::new("eviction")
        .with("trace", w.name.clone())
        .with("seed", seed)
        .with("policy", name.to_owned())
        .with("kind", kind.to_owned())
        .with("requests", s.requests)
        .with("loads", s.loads)
        .with("reload_bytes", s.reload_bytes)
        .num("reload_seconds", s.reload_seconds, 6)
        .with("refused", s.refused)
        .num("refused_load_s", s.refused_load_seconds, 6)
        .num("queue_wait_s", s.queue_wait_seconds, 6)
        .num("cost_s", s.cost(), 6)
        .num("hit_ratio", s.hit_ratio(), 4)
        .num("ratio_to_offline", ratio(s.cost(), offline.cost()), 4)
        .num(
            "ratio_to_bound",
            bound.map_or(f64::NAN, |b| ratio(s.cost(), b.cost_s)),
            4,
        )
        .num("offline_cost_s", offline.cost(), 6)
        .num("bound_cost_s", bound.map_or(f64::NAN, |b| b.cost_s), 6)
        .num("wait_s_mean", s.wait_seconds / s.granted.max(1) as f64, 3)
        .num("held_vram_gib_mean", vram, 3)
        .num("held_ram_gib_mean", ram, 3);
    if let Some(n) = s.would_oom {
        row = row.with("max_n", max_n(w)).with("would_oom", n);
    }
    if let Some(v) = s.variant {
        row = row.with("offline_variant", v);
    }
    row
}

/// Idle TTLs of the memory table, seconds (`None`: never unloaded for idleness).
pub const PARETO_TTLS: [Option<u64>; 5] = [Some(30), Some(120), Some(300), Some(1800), None];

/// Cost against memory held: the TTL policies (ours in Cache mode, Ollama's keep_alive) at
/// several idle TTLs, plus Aggressive (holds least) and plain LRU (holds most). A row is
/// `pareto: true` when no other row of the trace both costs less and holds less (mean VRAM +
/// RAM GiB).
pub fn pareto_rows(w: &Workload, seed: Option<u64>) -> Vec<Row> {
    let mut runs: Vec<(String, Stats)> = Vec::new();
    for ttl in PARETO_TTLS {
        let label = ttl.map_or_else(|| "none".to_owned(), |t| format!("{t}s"));
        let ttl = ttl.map(Duration::from_secs);
        let ours = simulate(
            w,
            &mut Ours::new(w, Mode::Cache, EvictionPolicy::CostAware, ttl),
        );
        runs.push((format!("costaware ttl={label}"), ours));
        runs.push((
            format!("ttl_keepalive ttl={label}"),
            simulate(w, &mut ollama(w, ttl)),
        ));
    }
    runs.push((
        "aggressive".to_owned(),
        simulate(
            w,
            &mut Ours::new(w, Mode::Aggressive, EvictionPolicy::CostAware, None),
        ),
    ));
    runs.push((
        "lru".to_owned(),
        simulate(w, &mut Simple::new(w, Victim::Lru, None, None)),
    ));
    let held = |s: &Stats| {
        let (v, r) = s.held_gib_mean();
        v + r
    };
    runs.iter()
        .map(|(name, s)| {
            let dominated = runs.iter().any(|(other, o)| {
                other != name
                    && o.cost() <= s.cost()
                    && held(o) <= held(s)
                    && (o.cost() < s.cost() || held(o) < held(s))
            });
            let (vram, ram) = s.held_gib_mean();
            Row::new("eviction_memory")
                .with("trace", w.name.clone())
                .with("seed", seed)
                .with("policy", name.clone())
                .num("cost_s", s.cost(), 6)
                .num("held_vram_gib_mean", vram, 3)
                .num("held_ram_gib_mean", ram, 3)
                .with("loads", s.loads)
                .with("pareto", !dominated)
        })
        .collect()
}
