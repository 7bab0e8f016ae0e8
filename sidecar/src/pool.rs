//! The pool in force: a `ModelPool` manifest read from `--pool FILE`, turned into the policy
//! engine's [`PoolConfig`] plus what the API and metrics show ([`PoolInfo`]). [`PoolFile`]
//! notices edits by polling the file's modification time.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use modelpool_crds::{
    ModelPool, PoolFileError,
    v1alpha1::{DriverKind, Enforcement, Eviction, Mode, UnsizedModels},
};
use modelpool_policy::{EvictionPolicy, Footprint, Limits, ModelConfig, PoolConfig};
use serde::Serialize;

use crate::api::wire::{self, Ceilings};

/// Why a pool cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Reading or validating the manifest failed.
    #[error(transparent)]
    File(#[from] PoolFileError),
    /// A size that validation let through but does not parse (should not happen).
    #[error("{field}: {message}")]
    Quantity {
        /// The field.
        field: String,
        /// The parse error.
        message: String,
    },
}

/// One model as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelInfo {
    /// Its name.
    pub name: String,
    /// Declared VRAM.
    pub vram_bytes: u64,
    /// Declared RAM.
    pub ram_bytes: u64,
    /// Never unloaded by policy.
    pub pinned: bool,
    /// Acquire-queue and eviction priority.
    pub priority: i32,
    /// Whether the pool declares its size (`vram` or `ram`); when not, `vram_bytes` and
    /// `ram_bytes` are the estimate (or zero: unknown).
    pub declared: bool,
    /// `spec.models[].source.uri`: where the weights are, as the app sees them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// The size estimated from the weights' headers (nothing declared).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<wire::Estimate>,
}

impl ModelInfo {
    /// Nothing declared, nothing estimated yet, and weights named by a local path: an
    /// estimate may still come from the app's filesystem view ([`LoadedPool::estimate_through`]).
    pub fn awaits_estimate(&self) -> bool {
        !self.declared
            && self.estimate.is_none()
            && self
                .weights
                .as_deref()
                .is_some_and(|uri| uri.starts_with("file://"))
    }
}

/// Where the sidecar reads a model's weights (`source.uri`, a path as the app sees it) to
/// estimate its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsView {
    /// Its own filesystem, at once (standalone: the sidecar runs beside the app on one host).
    Sidecar,
    /// The app's filesystem, through `/proc/<pid>/root` of the app's process once one is
    /// known (an injected sidecar: the app's files are in another container).
    App,
}

/// The pool as the API and metrics show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (empty when absent).
    pub namespace: String,
    /// `Aggressive` or `Cache`.
    pub mode: Mode,
    /// `Sdk`, `Http`, `KServeV2`, `Ollama` or `Vllm`.
    pub driver: DriverKind,
    /// The driver's base URL (every kind but `Sdk`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_url: Option<String>,
    /// Server drivers: the command-line substring that finds the server's processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_match: Option<String>,
    /// `Vllm`: each model's server.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub driver_servers: BTreeMap<String, String>,
    /// `Vllm`: the sleep level of an unload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep_level: Option<u8>,
    /// `Advisory`, `Evict` or `Restart`.
    pub enforcement: Enforcement,
    /// Per-pod ceilings.
    pub limits: Ceilings,
    /// The models.
    pub models: Vec<ModelInfo>,
}

/// A pool ready to be put in force.
#[derive(Debug, Clone)]
pub struct LoadedPool {
    /// For the API and metrics.
    pub info: PoolInfo,
    /// For the engine.
    pub config: PoolConfig,
    /// The driver kind.
    pub driver: DriverKind,
    /// Sizes learned before, kept in the pool's status by the operator (cluster mode).
    pub learned: BTreeMap<String, modelpool_policy::LearnedSize>,
}

/// What a pool may leave out of a server driver (`KServeV2`, `Ollama`, `Vllm`), from the
/// sidecar's flags: the operator's injection sets them from the server container's port and
/// command line (`--driver-url`, `--process-match`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverDefaults {
    /// The server's URL.
    pub url: Option<String>,
    /// A substring of the server's command line.
    pub process_match: Option<String>,
}

impl LoadedPool {
    /// The pool with what it leaves out of a server driver filled in: `driver.url` from
    /// `defaults`, else the server's usual port on 127.0.0.1 (Ollama 11434, KServeV2 8080,
    /// Vllm 8000); `processMatch` from `defaults`; a one-model `Vllm` pool's `servers` from
    /// that url. What the pool says always wins. `Sdk` and `Http` pools are left as they are.
    pub fn with_driver_defaults(mut self, defaults: &DriverDefaults) -> Self {
        let kind = self.driver;
        if !kind.is_server() {
            return self;
        }
        let info = &mut self.info;
        // A Vllm pool listing its servers has no url of its own (the proxy's default upstream
        // is then the first server).
        let listed = kind == DriverKind::Vllm && !info.driver_servers.is_empty();
        if info.driver_url.is_none() && !listed {
            info.driver_url = defaults.url.clone().or_else(|| {
                kind.default_port()
                    .map(|port| format!("http://127.0.0.1:{port}"))
            });
        }
        if info.process_match.is_none() {
            info.process_match = defaults.process_match.clone();
        }
        if kind == DriverKind::Vllm
            && info.driver_servers.is_empty()
            && let ([model], Some(url)) = (&info.models[..], &info.driver_url)
        {
            info.driver_servers.insert(model.name.clone(), url.clone());
        }
        self
    }
}

fn bytes(
    field: impl Fn() -> String,
    quantity: Option<&modelpool_crds::Quantity>,
) -> Result<Option<u64>, PoolError> {
    quantity
        .map(|q| q.bytes())
        .transpose()
        .map_err(|error| PoolError::Quantity {
            field: field(),
            message: error.to_string(),
        })
}

/// A CUDA context with the runtime's kernels and allocator pools, as a process's first use of a
/// GPU makes it (about 300-600 MiB on current drivers and cards): what a runtime that starts a
/// process per model adds to each model's estimate.
pub const CUDA_CONTEXT_BYTES: u64 = 512 << 20;

/// The per-runtime overhead added to a model's estimate from its weights, charged to VRAM (a
/// pool with a VRAM ceiling): `Ollama` and `Vllm` start a process per model (an Ollama runner,
/// a vLLM server), each with its own CUDA context, so each model pays
/// [`CUDA_CONTEXT_BYTES`]. `Sdk`, `Http` and `KServeV2` hold their models in one process,
/// whose context is paid once and belongs in `spec.baseline`: nothing per model. The KV cache
/// (GGUF) is part of the estimate itself; what a load really takes is learned from measurement.
pub fn runtime_overhead(driver: DriverKind, to_vram: bool) -> u64 {
    match driver {
        DriverKind::Ollama | DriverKind::Vllm if to_vram => CUDA_CONTEXT_BYTES,
        _ => 0,
    }
}

/// How undeclared models are estimated: the crate's bounds, and for GGUF a KV cache for the
/// model's context capped at Ollama's default `num_ctx` (4096) until the pool can say more.
fn estimate_options() -> modelpool_weights::Options {
    modelpool_weights::Options {
        max_default_context: Some(4096),
        ..modelpool_weights::Options::default()
    }
}

/// Turns a validated manifest into the engine's config. `reclaim_timeout` comes from the flags;
/// undeclared models are estimated from their weights at once ([`WeightsView::Sidecar`]).
pub fn convert(pool: &ModelPool, reclaim_timeout: Duration) -> Result<LoadedPool, PoolError> {
    convert_with(pool, reclaim_timeout, WeightsView::Sidecar)
}

/// [`convert`], reading the weights of undeclared models through `view`.
pub fn convert_with(
    pool: &ModelPool,
    reclaim_timeout: Duration,
    view: WeightsView,
) -> Result<LoadedPool, PoolError> {
    let spec = &pool.spec;
    let limits = Limits {
        vram: bytes(|| "spec.limits.vram".into(), spec.limits.vram.as_ref())?,
        ram: bytes(|| "spec.limits.ram".into(), spec.limits.ram.as_ref())?,
    };
    let mut models = Vec::with_capacity(spec.models.len());
    let mut infos = Vec::with_capacity(spec.models.len());
    for (index, model) in spec.models.iter().enumerate() {
        let vram =
            bytes(|| format!("spec.models[{index}].vram"), model.vram.as_ref())?.unwrap_or(0);
        let ram = bytes(|| format!("spec.models[{index}].ram"), model.ram.as_ref())?.unwrap_or(0);
        let declared = model.vram.is_some() || model.ram.is_some();
        models.push(ModelConfig {
            name: model.name.clone(),
            declared: Footprint::new(vram, ram),
            priority: model.priority,
            pinned: model.pinned,
            load_seconds: model.load_seconds,
            sized: declared,
            estimated: false,
        });
        infos.push(ModelInfo {
            name: model.name.clone(),
            vram_bytes: vram,
            ram_bytes: ram,
            pinned: model.pinned,
            priority: model.priority,
            declared,
            weights: model.source.as_ref().map(|s| s.uri.clone()),
            estimate: None,
        });
    }
    let policy = &spec.policy;
    let config = PoolConfig {
        mode: match policy.mode {
            Mode::Aggressive => modelpool_policy::Mode::Aggressive,
            Mode::Cache => modelpool_policy::Mode::Cache,
        },
        idle_ttl: policy.idle_ttl.into(),
        eviction: match policy.eviction {
            Eviction::Lru => EvictionPolicy::Lru,
            Eviction::CostAware => EvictionPolicy::CostAware,
        },
        pressure_vram_percent: policy.pressure.vram_percent,
        pressure_ram_percent: policy.pressure.ram_percent,
        acquire_timeout: policy.acquire_timeout.into(),
        reclaim_timeout,
        evict_over_ceiling: policy.enforcement != Enforcement::Advisory,
        limits,
        unsized_models: match policy.unsized_models {
            UnsizedModels::Alone => modelpool_policy::UnsizedModels::Alone,
            UnsizedModels::Refuse => modelpool_policy::UnsizedModels::Refuse,
        },
        models,
    };
    let info = PoolInfo {
        name: pool.metadata.name.clone().unwrap_or_default(),
        namespace: pool.metadata.namespace.clone().unwrap_or_default(),
        mode: policy.mode,
        driver: spec.driver.kind,
        driver_url: spec.driver.url.clone(),
        process_match: spec.driver.process_match.clone(),
        driver_servers: spec.driver.servers.clone().unwrap_or_default(),
        sleep_level: (spec.driver.kind == DriverKind::Vllm)
            .then(|| spec.driver.sleep_level.unwrap_or(2)),
        enforcement: policy.enforcement,
        limits: Ceilings {
            vram: limits.vram,
            ram: limits.ram,
        },
        models: infos,
    };
    let mut loaded = LoadedPool {
        info,
        config,
        driver: spec.driver.kind,
        learned: learned_in_status(pool),
    };
    // Nothing declared: estimate from the weights' headers, here, or once the app is known.
    if view == WeightsView::Sidecar {
        for (model, outcome) in loaded.estimate_through(&modelpool_weights::Root::host()) {
            if let Err(error) = outcome {
                tracing::warn!(model, %error, "no footprint declared and none could be estimated");
            }
        }
    }
    for model in &loaded.info.models {
        if model.declared || model.estimate.is_some() {
            continue;
        }
        if view == WeightsView::App && model.awaits_estimate() {
            tracing::info!(
                model = model.name,
                weights = model.weights.as_deref().unwrap_or_default(),
                "no footprint declared: estimated from the weights once the app's process is known \
                 (read through /proc/<pid>/root)"
            );
            continue;
        }
        tracing::warn!(
            model = model.name,
            rule = spec.policy.unsized_models.as_str(),
            "the model's size is unknown (no vram/ram declared, nothing to estimate from): \
             spec.policy.unsizedModels {} applies until a load of it is measured",
            match spec.policy.unsized_models {
                UnsizedModels::Alone => "Alone: it is loaded only with nothing else beside it",
                UnsizedModels::Refuse => "Refuse: acquires of it are refused",
            }
        );
    }
    Ok(loaded)
}

impl LoadedPool {
    /// Estimates every model that awaits one ([`ModelInfo::awaits_estimate`]) from its
    /// weights' headers read through `root`, charged to VRAM when the pool has a VRAM ceiling
    /// (a GPU app) and to RAM otherwise (measurement corrects it later). Returns each model
    /// tried with its outcome; an error names the path and why (a link out of the model's
    /// directory, a malformed header, a file the root does not have).
    pub fn estimate_through(
        &mut self,
        root: &modelpool_weights::Root,
    ) -> Vec<(String, Result<(), modelpool_weights::WeightsError>)> {
        let mut outcomes = Vec::new();
        let options = estimate_options();
        let to_vram = self.config.limits.vram.is_some();
        let overhead = runtime_overhead(self.driver, to_vram);
        for (info, config) in self.info.models.iter_mut().zip(&mut self.config.models) {
            if !info.awaits_estimate() {
                continue;
            }
            let uri = info.weights.clone().unwrap_or_default();
            let outcome = modelpool_weights::estimate_uri(&uri, root, &options).map(|estimate| {
                let bytes = estimate.total_bytes().saturating_add(overhead);
                let (vram, ram) = if to_vram { (bytes, 0) } else { (0, bytes) };
                info.vram_bytes = vram;
                info.ram_bytes = ram;
                config.declared = Footprint::new(vram, ram);
                config.sized = true;
                config.estimated = true;
                let through = root.path().display().to_string();
                tracing::info!(
                    model = info.name,
                    uri,
                    through,
                    bytes,
                    weights_bytes = estimate.weights_bytes,
                    kv_cache_bytes = estimate.kv_cache.map_or(0, |kv| kv.bytes),
                    kv_cache_context = estimate.kv_cache.map_or(0, |kv| kv.context),
                    overhead_bytes = overhead,
                    files = estimate.files,
                    "footprint estimated from the weights' header"
                );
                info.estimate = Some(wire::Estimate {
                    bytes,
                    weights_bytes: estimate.weights_bytes,
                    kv_cache_bytes: estimate.kv_cache.map_or(0, |kv| kv.bytes),
                    overhead_bytes: overhead,
                    format: format_name(estimate.format).to_owned(),
                    files: estimate.files as u64,
                    through,
                });
            });
            outcomes.push((info.name.clone(), outcome));
        }
        outcomes
    }

    /// Takes the estimates `previous` made of models this pool lists unchanged (same weights,
    /// still nothing declared): a pool edit elsewhere neither rereads them nor forgets them
    /// (nor what was learned under them).
    pub fn keep_estimates(&mut self, previous: &LoadedPool) {
        for (info, config) in self.info.models.iter_mut().zip(&mut self.config.models) {
            if !info.awaits_estimate() {
                continue;
            }
            let Some(old) = previous
                .info
                .models
                .iter()
                .find(|m| m.name == info.name && m.weights == info.weights && !m.declared)
            else {
                continue;
            };
            let Some(estimate) = &old.estimate else {
                continue;
            };
            info.vram_bytes = old.vram_bytes;
            info.ram_bytes = old.ram_bytes;
            info.estimate = Some(estimate.clone());
            config.declared = Footprint::new(old.vram_bytes, old.ram_bytes);
            config.sized = true;
        }
    }

    /// Whether some model awaits an estimate.
    pub fn awaits_estimates(&self) -> bool {
        self.info.models.iter().any(ModelInfo::awaits_estimate)
    }
}

fn format_name(format: modelpool_weights::Format) -> &'static str {
    match format {
        modelpool_weights::Format::Gguf => "gguf",
        modelpool_weights::Format::Safetensors => "safetensors",
        modelpool_weights::Format::ShardedSafetensors => "sharded_safetensors",
        modelpool_weights::Format::SafetensorsDirectory => "safetensors_directory",
    }
}

/// The sizes the operator keeps in the pool's status (`status.models[].learned`).
fn learned_in_status(pool: &ModelPool) -> BTreeMap<String, modelpool_policy::LearnedSize> {
    pool.status
        .iter()
        .flat_map(|status| &status.models)
        .filter_map(|model| {
            let learned = model.learned.as_ref()?;
            Some((
                model.name.clone(),
                modelpool_policy::LearnedSize {
                    declared: Footprint::new(
                        learned.declared_vram_bytes,
                        learned.declared_ram_bytes,
                    ),
                    peak: Footprint::new(learned.peak_vram_bytes, learned.peak_ram_bytes),
                    load_seconds: None,
                },
            ))
        })
        .collect()
}

/// Reads, validates and converts a pool file.
pub fn load(path: &Path, reclaim_timeout: Duration) -> Result<LoadedPool, PoolError> {
    let pool = modelpool_crds::load_pool_file(path)?;
    convert(&pool, reclaim_timeout)
}

/// A pool file watched for edits by its modification time (and size, for coarse clocks).
#[derive(Debug)]
pub struct PoolFile {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl PoolFile {
    /// Starts watching `path`, taking its current state as seen.
    pub fn new(path: PathBuf) -> Self {
        let seen = stamp(&path);
        Self { path, seen }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once per change of the file since the last call (or since `new`).
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.path);
        if now != self.seen && now.is_some() {
            self.seen = now;
            true
        } else {
            false
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_examples() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pools");
        let cogvideo = load(&root.join("cogvideo.yaml"), Duration::from_secs(10)).unwrap();
        assert_eq!(cogvideo.info.name, "cogvideo");
        assert_eq!(cogvideo.config.limits.vram, Some(20 << 30));
        assert_eq!(
            cogvideo.config.models[0].declared,
            Footprint::new(12 << 30, 2 << 30)
        );
        assert_eq!(cogvideo.config.acquire_timeout, Duration::from_secs(60));
        let llm = load(&root.join("llm-cache.yaml"), Duration::from_secs(10)).unwrap();
        assert_eq!(llm.driver, DriverKind::Http);
        assert_eq!(llm.config.idle_ttl, Duration::from_secs(600));
        assert!(llm.info.models[0].pinned);
    }

    /// Issue 18: a server pool without `driver.url` gets the injection's url, else the
    /// server's usual port; the pool's own values win; a one-model Vllm pool gets its server.
    #[test]
    fn server_pools_get_the_driver_defaults() {
        let pool = |driver: &str, models: &str| {
            let text = format!(
                "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: p}}\nspec:\n  driver: {driver}\n  models: {models}\n"
            );
            let parsed = modelpool_crds::parse_pool(&text, "p.yaml").unwrap();
            convert(&parsed, Duration::from_secs(1)).unwrap()
        };
        let none = DriverDefaults::default();
        let injected = DriverDefaults {
            url: Some("http://127.0.0.1:9999".into()),
            process_match: Some("ollama serve".into()),
        };
        let ollama = pool("{kind: Ollama}", "[{name: a}]");
        let own = ollama.clone().with_driver_defaults(&none).info;
        assert_eq!(own.driver_url.as_deref(), Some("http://127.0.0.1:11434"));
        assert_eq!(own.process_match, None);
        let filled = ollama.with_driver_defaults(&injected).info;
        assert_eq!(filled.driver_url.as_deref(), Some("http://127.0.0.1:9999"));
        assert_eq!(filled.process_match.as_deref(), Some("ollama serve"));
        let kserve = pool(
            "{kind: KServeV2, url: 'http://127.0.0.1:8000', processMatch: tritonserver}",
            "[{name: a}]",
        )
        .with_driver_defaults(&injected)
        .info;
        assert_eq!(kserve.driver_url.as_deref(), Some("http://127.0.0.1:8000"));
        assert_eq!(kserve.process_match.as_deref(), Some("tritonserver"));
        let kserve = pool("{kind: KServeV2}", "[{name: a}]").with_driver_defaults(&none);
        assert_eq!(
            kserve.info.driver_url.as_deref(),
            Some("http://127.0.0.1:8080")
        );
        let vllm = pool("{kind: Vllm, sleepLevel: 1}", "[{name: a}]")
            .with_driver_defaults(&none)
            .info;
        assert_eq!(
            vllm.driver_servers.get("a").map(String::as_str),
            Some("http://127.0.0.1:8000")
        );
        let listed = pool(
            "{kind: Vllm, servers: {a: 'http://127.0.0.1:8001', b: 'http://127.0.0.1:8002'}}",
            "[{name: a}, {name: b}]",
        )
        .with_driver_defaults(&injected)
        .info;
        assert_eq!(
            listed.driver_url, None,
            "a Vllm pool with servers has no url"
        );
        assert_eq!(listed.driver_servers.len(), 2);
        let sdk = pool("{kind: Sdk}", "[{name: a}]").with_driver_defaults(&injected);
        assert_eq!(sdk.info.driver_url, None, "Sdk pools get no url");
    }

    /// Cluster mode: the sizes the operator keeps in the pool's status come with the pool.
    #[test]
    fn learned_sizes_in_the_status_come_with_the_pool() {
        let mut pool: ModelPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"limits": {"ram": "1Gi"}, "models": [{"name": "a", "ram": "100Mi"}, {"name": "b", "ram": "100Mi"}]},
            "status": {"models": [
                {"name": "a", "learned": {"peakVramBytes": 0, "peakRamBytes": 300 << 20,
                    "declaredVramBytes": 0, "declaredRamBytes": 100 << 20}},
                {"name": "b"}
            ]}
        }))
        .unwrap();
        let loaded = convert(&pool, Duration::from_secs(1)).unwrap();
        assert_eq!(loaded.learned.len(), 1, "{:?}", loaded.learned);
        assert_eq!(loaded.learned["a"].peak, Footprint::new(0, 300 << 20));
        assert_eq!(loaded.learned["a"].declared, Footprint::new(0, 100 << 20));
        let mut engine = modelpool_policy::Engine::new(loaded.config.clone());
        assert_eq!(
            engine.restore_learned(&loaded.learned),
            vec!["a".to_owned()]
        );
        assert_eq!(engine.need("a"), Some(Footprint::new(0, 300 << 20)));
        pool.status = None;
        assert!(
            convert(&pool, Duration::from_secs(1))
                .unwrap()
                .learned
                .is_empty()
        );
    }

    #[test]
    fn an_undeclared_model_is_estimated_from_its_safetensors_header() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("rife.safetensors");
        let header = r#"{"w":{"dtype":"F16","shape":[1024,1024],"data_offsets":[0,2097152]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + 2_097_152, 0);
        std::fs::write(&weights, bytes).unwrap();
        let manifest = format!(
            "apiVersion: modelpool.io/v1alpha1\nkind: ModelPool\nmetadata: {{name: p}}\nspec:\n  limits: {{vram: 1Gi}}\n  models:\n    - {{name: rife, source: {{uri: \"file://{}\"}}}}\n    - {{name: declared, vram: 1Mi, source: {{uri: \"file://{}\"}}}}\n",
            weights.display(),
            weights.display()
        );
        let file = dir.path().join("pool.yaml");
        std::fs::write(&file, manifest).unwrap();
        let pool = load(&file, Duration::from_secs(10)).unwrap();
        assert_eq!(pool.config.models[0].declared, Footprint::new(2 << 20, 0));
        // A declared size wins over the estimate.
        assert_eq!(pool.config.models[1].declared, Footprint::new(1 << 20, 0));
    }

    /// A safetensors file of one F32 tensor of `floats` values.
    fn safetensors(path: &Path, floats: u64) {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{floats}],"data_offsets":[0,{}]}}}}"#,
            floats * 4
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + floats as usize * 4, 0);
        std::fs::write(path, bytes).unwrap();
    }

    /// An injected sidecar reads the weights through the app's process (`/proc/<pid>/root`):
    /// nothing is read before a pid is known; a real child process (root `/`) gives the view;
    /// a link out of the model's directory, absolute or relative, and a path climbing above the
    /// root are refused naming the path, and those models stay unsized.
    #[test]
    fn undeclared_models_are_estimated_through_the_apps_process_root() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(models.join("a")).unwrap();
        std::fs::create_dir_all(models.join("b")).unwrap();
        std::fs::create_dir_all(models.join("c")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        safetensors(&models.join("a/model.safetensors"), 1 << 18);
        // b: an absolute link to a real safetensors file outside its directory.
        safetensors(&dir.path().join("outside/secret.safetensors"), 1 << 10);
        symlink(
            dir.path().join("outside/secret.safetensors"),
            models.join("b/model.safetensors"),
        )
        .unwrap();
        // c: a relative link climbing out to the same file.
        symlink(
            "../../outside/secret.safetensors",
            models.join("c/model.safetensors"),
        )
        .unwrap();
        let uri = |p: &Path| format!("file://{}", p.display());
        let manifest = serde_json::json!({
            "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
            "metadata": {"name": "p"},
            "spec": {"limits": {"ram": "1Gi"}, "models": [
                {"name": "a", "source": {"uri": uri(&models.join("a/model.safetensors"))}},
                {"name": "b", "source": {"uri": uri(&models.join("b/model.safetensors"))}},
                {"name": "c", "source": {"uri": uri(&models.join("c/model.safetensors"))}},
                {"name": "d", "source": {"uri": "file:///../../etc/passwd"}},
                {"name": "e", "ram": "5Mi", "source": {"uri": uri(&models.join("a/model.safetensors"))}},
                {"name": "f", "source": {"uri": "hf://org/model"}},
            ]}
        });
        let pool: ModelPool = serde_json::from_value(manifest).unwrap();
        let mut loaded = convert_with(&pool, Duration::from_secs(1), WeightsView::App).unwrap();
        let awaiting: Vec<&str> = loaded
            .info
            .models
            .iter()
            .filter(|m| m.awaits_estimate())
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            awaiting,
            ["a", "b", "c", "d"],
            "declared (e) and hf:// (f) never await"
        );
        assert!(
            loaded
                .config
                .models
                .iter()
                .all(|m| m.sized == (m.name == "e"))
        );

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let root = modelpool_weights::Root::process(child.id());
        let outcomes: BTreeMap<String, Result<(), String>> = loaded
            .estimate_through(&root)
            .into_iter()
            .map(|(model, outcome)| (model, outcome.map_err(|e| e.to_string())))
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(outcomes.len(), 4, "{outcomes:?}");
        assert_eq!(outcomes["a"], Ok(()));
        let a = &loaded.info.models[0];
        assert_eq!(a.ram_bytes, 1 << 20);
        let estimate = a.estimate.as_ref().unwrap();
        assert_eq!(estimate.through, format!("/proc/{}/root", child.id()));
        assert_eq!(
            (estimate.bytes, estimate.format.as_str()),
            (1 << 20, "safetensors")
        );
        assert_eq!(loaded.config.models[0].declared, Footprint::new(0, 1 << 20));
        assert!(loaded.config.models[0].sized);
        for (model, dir_name) in [("b", "b"), ("c", "c")] {
            let error = outcomes[model].as_ref().unwrap_err();
            let named = models.join(dir_name).join("model.safetensors");
            assert!(
                error.contains(&named.display().to_string())
                    && error.contains("refused (links are followed only inside"),
                "{model}: {error}"
            );
        }
        let error = outcomes["d"].as_ref().unwrap_err();
        assert!(
            error.contains("/../../etc") && error.contains("goes above the root"),
            "{error}"
        );
        for model in &loaded.config.models[1..4] {
            assert!(
                !model.sized && model.declared == Footprint::default(),
                "{model:?}"
            );
        }
        assert!(loaded.awaits_estimates(), "b, c and d still await one");

        // A pool edit keeps what was estimated of unchanged models, not of changed ones.
        let mut edited = convert_with(&pool, Duration::from_secs(1), WeightsView::App).unwrap();
        edited.info.models[0].weights = Some(uri(&models.join("a")));
        let mut same = convert_with(&pool, Duration::from_secs(1), WeightsView::App).unwrap();
        same.keep_estimates(&loaded);
        edited.keep_estimates(&loaded);
        assert_eq!(same.config.models[0].declared, Footprint::new(0, 1 << 20));
        assert!(same.info.models[0].estimate.is_some());
        assert!(edited.info.models[0].estimate.is_none());
    }

    /// An estimate is weights (+ KV cache) + the runtime's overhead, shown apart: a CUDA
    /// context per model for the runtimes that start a process per model (Ollama, Vllm) when
    /// the estimate is charged to VRAM; nothing for one-process runtimes (Sdk, Http, KServeV2:
    /// their context is `spec.baseline`) nor for a RAM-only pool.
    #[test]
    fn estimates_add_the_runtimes_overhead_shown_apart() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("m.safetensors");
        safetensors(&weights, 1 << 18);
        let cases = [
            (
                "Ollama",
                Some("http://127.0.0.1:11434"),
                "vram",
                CUDA_CONTEXT_BYTES,
            ),
            (
                "Vllm",
                Some("http://127.0.0.1:8000"),
                "vram",
                CUDA_CONTEXT_BYTES,
            ),
            ("Sdk", None, "vram", 0),
            ("KServeV2", Some("http://127.0.0.1:8080"), "vram", 0),
            ("Ollama", Some("http://127.0.0.1:11434"), "ram", 0),
        ];
        for (kind, url, ceiling, overhead) in cases {
            let mut driver = serde_json::json!({"kind": kind});
            if let Some(url) = url {
                driver["url"] = url.into();
            }
            let pool: ModelPool = serde_json::from_value(serde_json::json!({
                "apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool",
                "metadata": {"name": "p"},
                "spec": {"driver": driver, "limits": {ceiling: "8Gi"}, "models": [
                    {"name": "m", "source": {"uri": format!("file://{}", weights.display())}},
                ]}
            }))
            .unwrap();
            let loaded = convert(&pool, Duration::from_secs(1)).unwrap();
            let model = &loaded.info.models[0];
            let estimate = model.estimate.as_ref().unwrap();
            let what = format!("{kind}, {ceiling} ceiling");
            assert_eq!(estimate.weights_bytes, 1 << 20, "{what}");
            assert_eq!(estimate.overhead_bytes, overhead, "{what}");
            assert_eq!(estimate.bytes, (1 << 20) + overhead, "{what}");
            let charged = if ceiling == "vram" {
                Footprint::new(estimate.bytes, 0)
            } else {
                Footprint::new(0, estimate.bytes)
            };
            assert_eq!(loaded.config.models[0].declared, charged, "{what}");
        }
    }
}
