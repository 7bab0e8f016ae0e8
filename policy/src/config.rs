//! What the engine needs to know of a pool: plain data, free of Kubernetes types, so that the
//! sidecar, the benchmarks and the tests can all build one.

use std::time::Duration;

use crate::footprint::Footprint;
pub use crate::footprint::Limits;

/// The seed's `aggressive_cleanup` switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Unload at the last release.
    Aggressive,
    /// Keep until idle for the TTL, or evicted.
    Cache,
}

/// Which idle instance goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// Least recently used first.
    Lru,
    /// Least expected reload cost per second, as a set of victims (see `eviction.rs`).
    CostAware,
}

/// What admission does with a model of unknown size: nothing declared, no readable estimate
/// of its weights, and never measured (`spec.policy.unsizedModels`). Once a load of it has
/// been measured, its learned size is used like any other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnsizedModels {
    /// Admit it only alone: until measured it counts as needing the whole ceiling, so every
    /// idle model is evicted first and nothing else is admitted beside it (the default: the
    /// model works, and the ceiling holds whatever it turns out to need).
    #[default]
    Alone,
    /// Refuse every acquire of it, saying why.
    Refuse,
}

impl UnsizedModels {
    /// The CRD's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alone => "Alone",
            Self::Refuse => "Refuse",
        }
    }
}

/// One model of the pool.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Its name.
    pub name: String,
    /// Declared needs (zero where not declared).
    pub declared: Footprint,
    /// Higher is served first and evicted last.
    pub priority: i32,
    /// Never unloaded by policy.
    pub pinned: bool,
    /// Reload cost hint, used until a load is measured.
    pub load_seconds: Option<f64>,
    /// Whether `declared` says anything: a size was declared or estimated from the weights.
    /// False: the size is unknown until a load is measured (see [`UnsizedModels`]).
    pub sized: bool,
    /// `declared` is an estimate from the weights' headers (plus a runtime's overhead), not
    /// the pool's word: once a load is measured, the measured peak replaces it. A declared
    /// size stays a floor under what is measured.
    pub estimated: bool,
}

/// The pool as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// Unload at last release, or cache.
    pub mode: Mode,
    /// Cache mode: unload after this long idle.
    pub idle_ttl: Duration,
    /// Eviction order.
    pub eviction: EvictionPolicy,
    /// Evict idle models while device VRAM use is above this percent.
    pub pressure_vram_percent: u32,
    /// Evict idle models while RAM use (of the pod limit) is above this percent.
    pub pressure_ram_percent: u32,
    /// How long an acquire may wait for room.
    pub acquire_timeout: Duration,
    /// How long an unload may take to show its memory back before it is reported lost.
    pub reclaim_timeout: Duration,
    /// Evict idle models when measured usage exceeds a ceiling (`Evict`/`Restart`), or only
    /// report it (`Advisory`).
    pub evict_over_ceiling: bool,
    /// Per-pod ceilings.
    pub limits: Limits,
    /// What admission does with models of unknown size.
    pub unsized_models: UnsizedModels,
    /// The models.
    pub models: Vec<ModelConfig>,
}

impl PoolConfig {
    /// A pool with the CRD's defaults and the given models and limits (handy in tests).
    pub fn new(limits: Limits, models: Vec<ModelConfig>) -> Self {
        Self {
            mode: Mode::Aggressive,
            idle_ttl: Duration::from_secs(300),
            eviction: EvictionPolicy::CostAware,
            pressure_vram_percent: 90,
            pressure_ram_percent: 80,
            acquire_timeout: Duration::from_secs(60),
            reclaim_timeout: Duration::from_secs(10),
            evict_over_ceiling: true,
            limits,
            unsized_models: UnsizedModels::Alone,
            models,
        }
    }
}

impl ModelConfig {
    /// A model with declared needs and no priority, pinning or cost hint.
    pub fn new(name: &str, vram: u64, ram: u64) -> Self {
        Self {
            name: name.to_owned(),
            declared: Footprint::new(vram, ram),
            priority: 0,
            pinned: false,
            load_seconds: None,
            sized: true,
            estimated: false,
        }
    }
}
