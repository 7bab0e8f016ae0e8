//! Workloads for the eviction scenario: a pool (models with sizes and load costs, ceilings)
//! and a trace of requests. Synthetic ones come from a seeded generator; a recorded one is read
//! from JSON lines `{"t": seconds, "model": name, "hold_s": seconds}` with the pool from a
//! `ModelPool` manifest.

use std::{io::BufRead, path::Path, time::Duration};

use anyhow::{Context, bail};
use modelpool_crds::{ModelPool, parse_pool, v1alpha1};
use modelpool_policy::{EvictionPolicy, Footprint, Limits, Mode};
use serde::{Deserialize, Serialize};

use crate::rng::{Rng, Zipf};

const GIB: u64 = 1 << 30;

/// The seed's pipeline pool, as committed in the examples.
pub const COGVIDEO_POOL: &str = include_str!("../../examples/pools/cogvideo.yaml");

/// One model of a workload's pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Its name.
    pub name: String,
    /// VRAM it holds once loaded.
    pub vram: u64,
    /// RAM it holds once loaded.
    pub ram: u64,
    /// What one load costs, seconds.
    pub load_s: f64,
    /// Evicted last when higher (our engine honours it; the baselines do not know it).
    pub priority: i32,
    /// Never evicted.
    pub pinned: bool,
}

impl Model {
    /// A model of `vram_gib` and `ram_gib` GiB that loads in `load_s` seconds, no priority.
    pub fn new(name: &str, vram_gib: f64, ram_gib: f64, load_s: f64) -> Self {
        Self {
            name: name.to_owned(),
            vram: (vram_gib * GIB as f64) as u64,
            ram: (ram_gib * GIB as f64) as u64,
            load_s,
            priority: 0,
            pinned: false,
        }
    }

    /// The bytes one load moves: the larger of its two footprints (weights pass through host
    /// memory on their way to the GPU).
    pub fn load_bytes(&self) -> u64 {
        self.vram.max(self.ram)
    }
}

/// One request: acquire `model` at `t`, hold it `hold_s` once usable, release.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Arrival, seconds from the start of the trace.
    pub t: f64,
    /// Index into the workload's models.
    pub model: usize,
    /// How long it is used once loaded.
    pub hold_s: f64,
}

/// A pool and a trace over it.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Name shown in results.
    pub name: String,
    /// The models.
    pub models: Vec<Model>,
    /// The per-pod ceilings.
    pub limits: Limits,
    /// Idle TTL for the Cache-mode policies and the keep_alive baseline.
    pub idle_ttl: Duration,
    /// How long an acquire may wait for room, for every policy.
    pub acquire_timeout: Duration,
    /// Requests by arrival.
    pub requests: Vec<Request>,
    /// The pool's own policy, when the workload comes from a `ModelPool` manifest.
    pub manifest: Option<ManifestPolicy>,
}

/// What a `ModelPool` manifest says about eviction, for the `manifest` contender.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ManifestPolicy {
    /// `spec.policy.mode`.
    pub mode: Mode,
    /// `spec.policy.eviction`.
    pub eviction: EvictionPolicy,
    /// `spec.policy.pressure.vramPercent`.
    pub pressure_vram_percent: u32,
    /// `spec.policy.pressure.ramPercent`.
    pub pressure_ram_percent: u32,
    /// `spec.baseline`: what the app holds with no model loaded.
    pub baseline: Footprint,
    /// `spec.policy.enforcement` is not `Advisory`.
    pub evict_over_ceiling: bool,
}

/// A line of a trace file.
#[derive(Debug, Deserialize, Serialize)]
pub struct TraceLine {
    /// Arrival, seconds.
    pub t: f64,
    /// Model name (must be in the pool).
    pub model: String,
    /// Seconds it is used once loaded.
    pub hold_s: f64,
}

/// The synthetic trace families, by name: the default report runs each of them on every seed
/// of [`REPORT_SEEDS`].
pub const SYNTHETIC: [&str; 10] = [
    "zipf-0.6",
    "zipf-0.9",
    "zipf-1.2",
    "bursty",
    "pipeline",
    "phases",
    "diurnal",
    "small-huge",
    "pipelines",
    "random-zipf",
];

/// Seeds the policies were tuned on (`eviction --seeds` with these while changing the engine).
pub const TUNE_SEEDS: [u64; 3] = [1, 2, 3];

/// Seeds held apart: the figures in `BENCHMARKS.md` come from these only, and no choice in the
/// engine was made while looking at them.
pub const REPORT_SEEDS: [u64; 3] = [1001, 1002, 1003];

/// Builds a synthetic workload of a family in [`SYNTHETIC`] (or `zipf-S` for any skew S).
pub fn synthetic(name: &str, requests: usize, seed: u64) -> anyhow::Result<Workload> {
    if let Some(skew) = name.strip_prefix("zipf-") {
        let skew: f64 = skew
            .parse()
            .with_context(|| format!("trace {name:?}: the skew after zipf- is not a number"))?;
        return Ok(zipf(skew, requests, seed));
    }
    let mut w = match name {
        "bursty" => bursty(requests, seed),
        "pipeline" => pipeline(requests.div_ceil(3), seed)?,
        "phases" => phases(requests, seed),
        "diurnal" => diurnal(requests, seed),
        "small-huge" => small_huge(requests, seed),
        "pipelines" => pipelines(requests, seed),
        "random-zipf" => random_zipf(requests, seed),
        _ => bail!(
            "unknown trace {name:?} (known: {}, or zipf-S for any skew S)",
            SYNTHETIC.join(", ")
        ),
    };
    w.requests.truncate(requests);
    Ok(w)
}

/// A random pool of `n` models: VRAM, RAM and load time each log-uniform over a 10x range and
/// drawn independently (a big model is not always slow to load, and VRAM does not predict
/// RAM). The ceilings hold about `fraction` of the total of each resource, and at least the
/// largest model. Mean hold times are log-uniform from 0.5 to 20 s, also independent.
fn random_pool(rng: &mut Rng, n: usize, fraction: f64) -> (Vec<Model>, Vec<f64>, Limits) {
    let log_uniform = |rng: &mut Rng, low: f64, high: f64| low * (high / low).powf(rng.uniform());
    let mut models = Vec::with_capacity(n);
    let mut holds = Vec::with_capacity(n);
    for i in 0..n {
        let vram = log_uniform(rng, 1.5, 15.0);
        let ram = log_uniform(rng, 1.0, 10.0);
        let load = log_uniform(rng, 3.0, 30.0);
        models.push(Model::new(&format!("m{i:02}"), vram, ram, load));
        holds.push(log_uniform(rng, 0.5, 20.0));
    }
    let limits = ceilings(&models, fraction);
    (models, holds, limits)
}

/// Ceilings holding `fraction` of the total of each resource, and at least the largest model.
fn ceilings(models: &[Model], fraction: f64) -> Limits {
    let total = |f: fn(&Model) -> u64| models.iter().map(f).sum::<u64>() as f64;
    let largest = |f: fn(&Model) -> u64| models.iter().map(f).max().unwrap_or(0);
    let vram = ((total(|m| m.vram) * fraction) as u64).max(largest(|m| m.vram));
    let ram = ((total(|m| m.ram) * fraction) as u64).max(largest(|m| m.ram));
    Limits {
        vram: Some(vram),
        ram: Some(ram),
    }
}

/// Zipf(0.9) popularity over a random pool of 12 models (see [`random_pool`]), one request
/// every 4 s.
pub fn random_zipf(requests: usize, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ 0x2A2A);
    let (models, holds, limits) = random_pool(&mut rng, 12, 0.45);
    let popularity = Zipf::new(models.len(), 0.9);
    let mut w = workload("random-zipf".to_owned(), models, limits);
    let mut t = 0.0;
    for _ in 0..requests {
        t += rng.exp(4.0);
        let model = popularity.sample(&mut rng);
        let hold_s = rng.jitter(holds[model], 0.5);
        w.requests.push(Request { t, model, hold_s });
    }
    w
}

/// Shifting hot sets: 12 random models; in each phase (5 to 20 minutes) 85 % of requests go to
/// a hot set of 3 or 4 models drawn afresh, the rest to any model. One request every 3 s.
pub fn phases(requests: usize, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ 0xFA5E);
    let (models, holds, limits) = random_pool(&mut rng, 12, 0.4);
    let n = models.len();
    let mut w = workload("phases".to_owned(), models, limits);
    let mut t = 0.0;
    while w.requests.len() < requests {
        let size = 3 + rng.below(2);
        let mut hot: Vec<usize> = Vec::new();
        while hot.len() < size {
            let m = rng.below(n);
            if !hot.contains(&m) {
                hot.push(m);
            }
        }
        let end = t + 300.0 + rng.uniform() * 900.0;
        while t < end && w.requests.len() < requests {
            t += rng.exp(3.0);
            let model = if rng.uniform() < 0.85 {
                hot[rng.below(hot.len())]
            } else {
                rng.below(n)
            };
            let hold_s = rng.jitter(holds[model], 0.5);
            w.requests.push(Request { t, model, hold_s });
        }
    }
    w
}

/// A day compressed into two hours: the request rate follows a sine between one every 1.5 s
/// and one every 60 s, and the popular models by day (Zipf 1.0 over one order) differ from
/// those by night (the reverse order). 12 random models.
pub fn diurnal(requests: usize, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ 0xD1A1);
    let (models, holds, limits) = random_pool(&mut rng, 12, 0.4);
    let n = models.len();
    let popularity = Zipf::new(n, 1.0);
    let mut w = workload("diurnal".to_owned(), models, limits);
    let period = 7200.0;
    let mut t = 0.0;
    while w.requests.len() < requests {
        let day = 0.5 + 0.5 * (std::f64::consts::TAU * t / period).sin();
        let mean_gap = 60.0 * (1.5f64 / 60.0).powf(day);
        t += rng.exp(mean_gap);
        let rank = popularity.sample(&mut rng);
        let by_day = rng.uniform() < day;
        let model = if by_day { rank } else { n - 1 - rank };
        let hold_s = rng.jitter(holds[model], 0.5);
        w.requests.push(Request { t, model, hold_s });
    }
    w
}

/// Many small models and a few huge ones: 20 small (0.3 to 3 GiB, loading in 1 to 10 s, each
/// drawn independently) and 3 huge (20 to 30 GiB of VRAM, 30 to 90 s to load) under a ceiling
/// that holds one huge model and most of the small ones. Zipf(0.8) popularity over a random
/// order of all 23, one request every 3 s.
pub fn small_huge(requests: usize, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ 0x5A11);
    let log_uniform = |rng: &mut Rng, low: f64, high: f64| low * (high / low).powf(rng.uniform());
    let mut models = Vec::new();
    let mut holds = Vec::new();
    for i in 0..20 {
        let vram = log_uniform(&mut rng, 0.3, 3.0);
        let ram = log_uniform(&mut rng, 0.3, 3.0);
        let load = log_uniform(&mut rng, 1.0, 10.0);
        models.push(Model::new(&format!("small{i:02}"), vram, ram, load));
        holds.push(log_uniform(&mut rng, 0.3, 5.0));
    }
    for i in 0..3 {
        let vram = 20.0 + 10.0 * rng.uniform();
        let ram = log_uniform(&mut rng, 2.0, 8.0);
        let load = log_uniform(&mut rng, 30.0, 90.0);
        models.push(Model::new(&format!("huge{i}"), vram, ram, load));
        holds.push(log_uniform(&mut rng, 5.0, 30.0));
    }
    let small_vram: u64 = models[..20].iter().map(|m| m.vram).sum();
    let small_ram: u64 = models[..20].iter().map(|m| m.ram).sum();
    let huge_vram = models[20..].iter().map(|m| m.vram).max().unwrap_or(0);
    let huge_ram = models[20..].iter().map(|m| m.ram).max().unwrap_or(0);
    let limits = Limits {
        vram: Some(huge_vram + small_vram * 6 / 10),
        ram: Some(huge_ram + small_ram * 6 / 10),
    };
    let mut order: Vec<usize> = (0..models.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let popularity = Zipf::new(models.len(), 0.8);
    let mut w = workload("small-huge".to_owned(), models, limits);
    let mut t = 0.0;
    for _ in 0..requests {
        t += rng.exp(3.0);
        let model = order[popularity.sample(&mut rng)];
        let hold_s = rng.jitter(holds[model], 0.5);
        w.requests.push(Request { t, model, hold_s });
    }
    w
}

/// Correlated pipelines: 10 random models, 5 job kinds, each a chain of 2 to 4 distinct models
/// (a model may serve several kinds). Jobs arrive every 40 s on average, kinds by Zipf(1.0);
/// each stage is asked for when the previous one would be done after a load.
pub fn pipelines(requests: usize, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ 0x9199);
    let (models, holds, limits) = random_pool(&mut rng, 10, 0.45);
    let n = models.len();
    let kinds: Vec<Vec<usize>> = (0..5)
        .map(|_| {
            let len = 2 + rng.below(3);
            let mut chain: Vec<usize> = Vec::new();
            while chain.len() < len {
                let m = rng.below(n);
                if !chain.contains(&m) {
                    chain.push(m);
                }
            }
            chain
        })
        .collect();
    let popularity = Zipf::new(kinds.len(), 1.0);
    let mut w = workload("pipelines".to_owned(), models, limits);
    let mut t = 0.0;
    while w.requests.len() < requests {
        t += rng.exp(40.0);
        let mut at = t;
        for &model in &kinds[popularity.sample(&mut rng)] {
            let hold_s = rng.jitter(holds[model], 0.3);
            w.requests.push(Request {
                t: at,
                model,
                hold_s,
            });
            at += w.models[model].load_s + hold_s;
        }
    }
    w.requests.sort_by(|a, b| a.t.total_cmp(&b.t));
    w
}

/// Twelve models of a shared GPU server, heterogeneous in size (0.5 to 26 GiB of VRAM, 1 to
/// 12 GiB of RAM) and load cost (1 to 30 s), under a 40 GiB VRAM / 24 GiB RAM ceiling that
/// holds about half of them. Returned in popularity order, with each model's mean hold time.
fn mixed_pool() -> (Vec<Model>, Vec<f64>, Limits) {
    let table = [
        // name, vram GiB, ram GiB, load s, mean hold s; most popular first
        ("embed", 0.5, 1.0, 1.0, 0.5),
        ("llm-7b", 14.0, 2.0, 14.0, 8.0),
        ("sdxl", 7.0, 3.0, 9.0, 6.0),
        ("whisper", 3.0, 2.0, 4.0, 10.0),
        ("t2v", 12.0, 2.0, 20.0, 45.0),
        ("clip", 1.0, 1.0, 2.0, 0.5),
        ("upscale", 4.0, 12.0, 8.0, 15.0),
        ("rerank", 1.0, 1.5, 1.5, 0.5),
        ("llm-13b", 26.0, 3.0, 30.0, 10.0),
        ("tts", 2.0, 2.0, 3.0, 4.0),
        ("frame-interp", 2.0, 9.0, 5.0, 8.0),
        ("ocr", 1.5, 3.0, 2.5, 2.0),
    ];
    let models = table
        .iter()
        .map(|&(name, vram, ram, load, _)| Model::new(name, vram, ram, load))
        .collect();
    let holds = table.iter().map(|row| row.4).collect();
    let limits = Limits {
        vram: Some(40 * GIB),
        ram: Some(24 * GIB),
    };
    (models, holds, limits)
}

fn workload(name: String, models: Vec<Model>, limits: Limits) -> Workload {
    Workload::new(&name, models, limits)
}

impl Workload {
    /// A workload with no requests yet, the CRD's default idle TTL (300 s) and acquire
    /// timeout (60 s), and no manifest policy.
    pub fn new(name: &str, models: Vec<Model>, limits: Limits) -> Self {
        Workload {
            name: name.to_owned(),
            models,
            limits,
            idle_ttl: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(60),
            requests: Vec::new(),
            manifest: None,
        }
    }
}

/// Poisson arrivals (one every 4 s on average), model by Zipf popularity of skew `skew`.
pub fn zipf(skew: f64, requests: usize, seed: u64) -> Workload {
    let (models, holds, limits) = mixed_pool();
    let popularity = Zipf::new(models.len(), skew);
    let mut rng = Rng::new(seed ^ skew.to_bits());
    let mut w = workload(format!("zipf-{skew}"), models, limits);
    let mut t = 0.0;
    for _ in 0..requests {
        t += rng.exp(4.0);
        let model = popularity.sample(&mut rng);
        let hold_s = rng.jitter(holds[model], 0.5);
        w.requests.push(Request { t, model, hold_s });
    }
    w
}

/// Bursts and lulls: a burst (about 3 min, a request every 2 s) works on three models drawn
/// by Zipf(0.9) popularity; a lull (about 10 min, longer than the 5 min idle TTL) has a
/// request every 2 min from the whole pool. Idle TTLs unload the burst's models in the lull.
pub fn bursty(requests: usize, seed: u64) -> Workload {
    let (models, holds, limits) = mixed_pool();
    let popularity = Zipf::new(models.len(), 0.9);
    let inside = Zipf::new(3, 1.0);
    let mut rng = Rng::new(seed ^ 0xB0B5);
    let mut w = workload("bursty".to_owned(), models, limits);
    let mut t = 0.0;
    while w.requests.len() < requests {
        let mut hot: Vec<usize> = Vec::new();
        while hot.len() < 3 {
            let m = popularity.sample(&mut rng);
            if !hot.contains(&m) {
                hot.push(m);
            }
        }
        let burst_end = t + rng.exp(180.0);
        while t < burst_end && w.requests.len() < requests {
            t += rng.exp(2.0);
            let model = hot[inside.sample(&mut rng)];
            let hold_s = rng.jitter(holds[model], 0.5);
            w.requests.push(Request { t, model, hold_s });
        }
        let lull_end = t + rng.exp(600.0);
        loop {
            t += rng.exp(120.0);
            if t >= lull_end || w.requests.len() >= requests {
                t = t.max(lull_end);
                break;
            }
            let model = popularity.sample(&mut rng);
            let hold_s = rng.jitter(holds[model], 0.5);
            w.requests.push(Request { t, model, hold_s });
        }
    }
    w
}

/// The seed's video pipeline on its own pool (`examples/pools/cogvideo.yaml`): jobs arrive
/// about every 2.5 min; each runs t2v (about 45 s), then upscale (15 s), then
/// frame_interpolation (8 s), each stage asked for once the previous one would be done after
/// a load. upscale and frame_interpolation together exceed the 16 GiB RAM ceiling, so every
/// job evicts at least one of them.
pub fn pipeline(jobs: usize, seed: u64) -> anyhow::Result<Workload> {
    let pool = parse_pool(COGVIDEO_POOL, "examples/pools/cogvideo.yaml")?;
    let mut w = from_pool(&pool, "pipeline")?;
    let stages: Vec<(usize, f64)> = [
        ("t2v", 45.0),
        ("upscale", 15.0),
        ("frame_interpolation", 8.0),
    ]
    .iter()
    .map(|(name, hold)| {
        let index = w.models.iter().position(|m| m.name == *name);
        index
            .map(|i| (i, *hold))
            .with_context(|| format!("cogvideo.yaml lacks model {name}"))
    })
    .collect::<anyhow::Result<_>>()?;
    let mut rng = Rng::new(seed ^ 0x91BE);
    let mut t = 0.0;
    for _ in 0..jobs {
        t += rng.exp(150.0);
        let mut at = t;
        for &(model, hold) in &stages {
            let hold_s = rng.jitter(hold, 0.3);
            w.requests.push(Request {
                t: at,
                model,
                hold_s,
            });
            at += w.models[model].load_s + hold_s;
        }
    }
    w.requests.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(w)
}

/// A load cost for a model whose pool gives none: 1 s per GiB of its larger footprint (local
/// NVMe read plus transfer), at least 1 s.
pub fn default_load_seconds(vram: u64, ram: u64) -> f64 {
    (vram.max(ram) as f64 / GIB as f64).max(1.0)
}

/// The models, ceilings and timers of a `ModelPool`, with no requests yet.
pub fn from_pool(pool: &ModelPool, name: &str) -> anyhow::Result<Workload> {
    let bytes = |q: &Option<modelpool_crds::Quantity>| -> anyhow::Result<Option<u64>> {
        q.as_ref()
            .map(|q| q.bytes().map_err(anyhow::Error::from))
            .transpose()
    };
    let spec = &pool.spec;
    let mut models = Vec::new();
    for m in &spec.models {
        let vram = bytes(&m.vram)?.unwrap_or(0);
        let ram = bytes(&m.ram)?.unwrap_or(0);
        models.push(Model {
            name: m.name.clone(),
            vram,
            ram,
            load_s: m
                .load_seconds
                .unwrap_or_else(|| default_load_seconds(vram, ram)),
            priority: m.priority,
            pinned: m.pinned,
        });
    }
    Ok(Workload {
        name: name.to_owned(),
        models,
        limits: Limits {
            vram: bytes(&spec.limits.vram)?,
            ram: bytes(&spec.limits.ram)?,
        },
        idle_ttl: Duration::from(spec.policy.idle_ttl),
        acquire_timeout: Duration::from(spec.policy.acquire_timeout),
        requests: Vec::new(),
        manifest: Some(ManifestPolicy {
            mode: match spec.policy.mode {
                v1alpha1::Mode::Aggressive => Mode::Aggressive,
                v1alpha1::Mode::Cache => Mode::Cache,
            },
            eviction: match spec.policy.eviction {
                v1alpha1::Eviction::Lru => EvictionPolicy::Lru,
                v1alpha1::Eviction::CostAware => EvictionPolicy::CostAware,
            },
            pressure_vram_percent: spec.policy.pressure.vram_percent,
            pressure_ram_percent: spec.policy.pressure.ram_percent,
            baseline: Footprint::new(
                bytes(&spec.baseline.vram)?.unwrap_or(0),
                bytes(&spec.baseline.ram)?.unwrap_or(0),
            ),
            evict_over_ceiling: spec.policy.enforcement != v1alpha1::Enforcement::Advisory,
        }),
    })
}

/// Reads a trace file (JSON lines) against a pool manifest.
pub fn from_files(trace: &Path, pool: &Path) -> anyhow::Result<Workload> {
    let manifest = modelpool_crds::load_pool_file(pool)?;
    let name = trace
        .file_stem()
        .map_or_else(|| "trace".to_owned(), |s| s.to_string_lossy().into_owned());
    let mut w = from_pool(&manifest, &name)?;
    let file = std::fs::File::open(trace)
        .with_context(|| format!("failed to open trace {}", trace.display()))?;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("failed to read {}", trace.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: TraceLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: expected {{\"t\": seconds, \"model\": name, \"hold_s\": seconds}}",
                trace.display(),
                n + 1
            )
        })?;
        let Some(model) = w.models.iter().position(|m| m.name == parsed.model) else {
            bail!(
                "{}:{}: model {:?} is not in pool {} (it lists: {})",
                trace.display(),
                n + 1,
                parsed.model,
                pool.display(),
                w.models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if !(parsed.t.is_finite() && parsed.t >= 0.0 && parsed.hold_s.is_finite())
            || parsed.hold_s < 0.0
        {
            bail!(
                "{}:{}: t and hold_s must be finite and not negative",
                trace.display(),
                n + 1
            );
        }
        w.requests.push(Request {
            t: parsed.t,
            model,
            hold_s: parsed.hold_s,
        });
    }
    if w.requests.is_empty() {
        bail!("{}: no requests", trace.display());
    }
    w.requests.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(w)
}

/// A workload's requests as trace-file lines.
pub fn to_lines(w: &Workload) -> Vec<TraceLine> {
    w.requests
        .iter()
        .map(|r| TraceLine {
            t: (r.t * 1000.0).round() / 1000.0,
            model: w.models[r.model].name.clone(),
            hold_s: (r.hold_s * 1000.0).round() / 1000.0,
        })
        .collect()
}
