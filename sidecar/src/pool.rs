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

use crate::api::wire::Ceilings;

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

/// How undeclared models are estimated: the crate's bounds, and for GGUF a KV cache for the
/// model's context capped at Ollama's default `num_ctx` (4096) until the pool can say more.
fn estimate_options() -> modelpool_weights::Options {
    modelpool_weights::Options {
        max_default_context: Some(4096),
        ..modelpool_weights::Options::default()
    }
}

/// Turns a validated manifest into the engine's config. `reclaim_timeout` comes from the flags.
pub fn convert(pool: &ModelPool, reclaim_timeout: Duration) -> Result<LoadedPool, PoolError> {
    let spec = &pool.spec;
    let limits = Limits {
        vram: bytes(|| "spec.limits.vram".into(), spec.limits.vram.as_ref())?,
        ram: bytes(|| "spec.limits.ram".into(), spec.limits.ram.as_ref())?,
    };
    let mut models = Vec::with_capacity(spec.models.len());
    let mut infos = Vec::with_capacity(spec.models.len());
    for (index, model) in spec.models.iter().enumerate() {
        let mut vram =
            bytes(|| format!("spec.models[{index}].vram"), model.vram.as_ref())?.unwrap_or(0);
        let mut ram =
            bytes(|| format!("spec.models[{index}].ram"), model.ram.as_ref())?.unwrap_or(0);
        let mut sized = model.vram.is_some() || model.ram.is_some();
        // Nothing declared: estimate from the weights' header, charged to VRAM when the pool
        // has a VRAM ceiling (a GPU app) and to RAM otherwise; measurement corrects it later.
        if model.vram.is_none()
            && model.ram.is_none()
            && let Some(source) = &model.source
        {
            match modelpool_weights::estimate_uri(
                &source.uri,
                &modelpool_weights::Root::host(),
                &estimate_options(),
            ) {
                Ok(estimate) => {
                    let bytes = estimate.total_bytes();
                    sized = true;
                    if limits.vram.is_some() {
                        vram = bytes;
                    } else {
                        ram = bytes;
                    }
                    tracing::info!(
                        model = model.name,
                        uri = source.uri,
                        bytes,
                        weights_bytes = estimate.weights_bytes,
                        kv_cache_bytes = estimate.kv_cache.map_or(0, |kv| kv.bytes),
                        kv_cache_context = estimate.kv_cache.map_or(0, |kv| kv.context),
                        files = estimate.files,
                        "footprint estimated from the weights' header"
                    );
                }
                Err(error) => {
                    tracing::warn!(model = model.name, %error, "no footprint declared and none could be estimated")
                }
            }
        }
        if !sized {
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
        models.push(ModelConfig {
            name: model.name.clone(),
            declared: Footprint::new(vram, ram),
            priority: model.priority,
            pinned: model.pinned,
            load_seconds: model.load_seconds,
            sized,
        });
        infos.push(ModelInfo {
            name: model.name.clone(),
            vram_bytes: vram,
            ram_bytes: ram,
            pinned: model.pinned,
            priority: model.priority,
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
    Ok(LoadedPool {
        info,
        config,
        driver: spec.driver.kind,
        learned: learned_in_status(pool),
    })
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
}
