//! A model's size before its first load (DESIGN section 3: declared, or estimated from the
//! weights' header, then learned from measurement).
//!
//! Reads only headers: GGUF (v2, v3: tensor infos, ggml types incl. quantized blocks, and the
//! metadata a KV-cache estimate needs), safetensors (one file, a sharded checkpoint with its
//! `model.safetensors.index.json`, or a directory of files). Every read is bounded in bytes
//! and time, every size is checked against the file (offsets inside it, no overlaps, no
//! overflow, below a sane cap), links are followed only inside the model's directory, and no
//! error quotes a file's bytes before its format is recognised.
#![deny(missing_docs)]

mod bounded;
mod error;
pub mod gguf;
mod resolve;
pub mod safetensors;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub use error::WeightsError;
pub use resolve::Root;
use serde::Serialize;

/// Bounds on what one estimate may read and conclude.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The most header bytes read from one file (GGUF metadata with a large vocabulary runs
    /// to ~20 MiB; safetensors headers to a few MiB). Default 64 MiB; parsed as a stream, so
    /// memory stays small whatever this is.
    pub max_header_bytes: u64,
    /// The most time one file's header may take. Default 2 s.
    pub time_budget: Duration,
    /// An estimate above this is refused as absurd. Default 16 TiB.
    pub max_total_bytes: u64,
    /// The most weight files in one directory or index. Default 4096.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 << 20,
            time_budget: Duration::from_secs(2),
            max_total_bytes: 16 << 40,
            max_files: 4096,
        }
    }
}

/// How to estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The bounds.
    pub limits: Limits,
    /// The context (tokens) the runtime is configured for; `None`: the model's own
    /// `context_length` (an upper bound: runtimes often default to less).
    pub context: Option<u64>,
    /// When no context is configured: the model's own context length capped at this (Ollama's
    /// default `num_ctx` is 4096; llama.cpp's and vLLM's default is the model's own).
    pub max_default_context: Option<u64>,
    /// Bytes per cached K or V element: 2 (f16, llama.cpp's and Ollama's default).
    pub kv_element_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            context: None,
            max_default_context: None,
            kv_element_bytes: 2,
        }
    }
}

/// The format that was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One or more GGUF files (a split model when more).
    Gguf,
    /// One safetensors file.
    Safetensors,
    /// An index plus its shards.
    ShardedSafetensors,
    /// A directory of safetensors files without an index.
    SafetensorsDirectory,
}

/// The KV cache a runtime will allocate for the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvCache {
    /// Tokens.
    pub context: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A model's size from its headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Estimate {
    /// What was read.
    pub format: Format,
    /// Files read.
    pub files: usize,
    /// Tensors in them.
    pub tensors: u64,
    /// The bytes of the tensors (what a loader holds for the weights).
    pub weights_bytes: u64,
    /// The KV cache for the context (GGUF with attention metadata).
    pub kv_cache: Option<KvCache>,
}

impl Estimate {
    /// Weights plus KV cache.
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            .saturating_add(self.kv_cache.map_or(0, |kv| kv.bytes))
    }
}

/// The estimate for a `file://` URI (a file or a directory), read through `root`.
pub fn estimate_uri(uri: &str, root: &Root, options: &Options) -> Result<Estimate, WeightsError> {
    let path = uri
        .strip_prefix("file://")
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| WeightsError::Unsupported {
            what: uri.to_owned(),
            reason: "only file:///absolute/path URIs (a .gguf or .safetensors file, or a directory of them) can be estimated".into(),
        })?;
    estimate(root, Path::new(path), options)
}

/// The estimate for `inner` (a file or a directory, as the app sees it) read through `root`.
/// For a file, links are followed only inside the file's own directory; for a directory,
/// only inside it.
pub fn estimate(root: &Root, inner: &Path, options: &Options) -> Result<Estimate, WeightsError> {
    let estimate = estimate_unchecked(root, inner, options)?;
    let limits = &options.limits;
    if estimate.total_bytes() > limits.max_total_bytes {
        return Err(WeightsError::invalid(
            inner,
            "estimate",
            format!(
                "{} bytes (weights {}, KV cache {})",
                estimate.total_bytes(),
                estimate.weights_bytes,
                estimate.kv_cache.map_or(0, |kv| kv.bytes)
            ),
            format!("at most {} bytes", limits.max_total_bytes),
        ));
    }
    Ok(estimate)
}

fn estimate_unchecked(
    root: &Root,
    inner: &Path,
    options: &Options,
) -> Result<Estimate, WeightsError> {
    // A directory is the model's directory, wherever links inside the root lead to it.
    if let Ok(resolved) = root.resolve(inner)
        && std::fs::metadata(root.host_path(&resolved)).is_ok_and(|m| m.is_dir())
    {
        return directory(root, inner, &resolved, options);
    }
    // The model's directory is the one the file is named in: resolve it, then the file inside.
    let parent = inner.parent().unwrap_or(Path::new("/"));
    let dir = root.resolve(parent)?;
    let name = inner.file_name().ok_or_else(|| WeightsError::Unsupported {
        what: inner.display().to_string(),
        reason: "names no file".into(),
    })?;
    let file = root.resolve_within(&dir.join(name), &dir)?;
    single_file(root, inner, &file, options)
}

fn is_gguf(name: &Path) -> bool {
    name.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn is_safetensors(name: &Path) -> bool {
    name.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

fn single_file(
    root: &Root,
    shown: &Path,
    file: &Path,
    options: &Options,
) -> Result<Estimate, WeightsError> {
    let host = root.host_path(file);
    if is_gguf(shown) || is_gguf(file) {
        return gguf_files(root, shown, &[file.to_owned()], options);
    }
    if is_safetensors(shown) || is_safetensors(file) {
        let summary = safetensors::read_file(&host, shown, &options.limits, false)?;
        return Ok(Estimate {
            format: Format::Safetensors,
            files: 1,
            tensors: summary.tensors,
            weights_bytes: summary.bytes,
            kv_cache: None,
        });
    }
    Err(WeightsError::Unsupported {
        what: shown.display().to_string(),
        reason: "not a .gguf or .safetensors file (pickled .bin/.pt checkpoints cannot be sized without loading them)".into(),
    })
}

fn gguf_files(
    root: &Root,
    shown: &Path,
    files: &[PathBuf],
    options: &Options,
) -> Result<Estimate, WeightsError> {
    let mut estimate = Estimate {
        format: Format::Gguf,
        files: files.len(),
        tensors: 0,
        weights_bytes: 0,
        kv_cache: None,
    };
    for (i, file) in files.iter().enumerate() {
        let shown_file = if files.len() == 1 && !shown.is_dir() {
            shown.to_owned()
        } else {
            file.clone()
        };
        let (header, kv) = gguf::estimate(&root.host_path(file), &shown_file, options)?;
        estimate.tensors += header.tensor_count;
        estimate.weights_bytes = estimate.weights_bytes.saturating_add(header.tensor_bytes);
        // A split model keeps its metadata in the first file.
        if i == 0 {
            estimate.kv_cache = kv;
        }
    }
    Ok(estimate)
}

/// A directory: a safetensors index with its shards, else every `.safetensors` file, else its
/// `.gguf` file(s).
fn directory(
    root: &Root,
    shown: &Path,
    dir: &Path,
    options: &Options,
) -> Result<Estimate, WeightsError> {
    let limits = &options.limits;
    let host = root.host_path(dir);
    let io = |source| WeightsError::Io {
        path: shown.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&host).map_err(io)? {
        let entry = entry.map_err(io)?;
        names.push(PathBuf::from(entry.file_name()));
        if names.len() > limits.max_files.saturating_mul(4) {
            return Err(WeightsError::invalid(
                shown,
                "directory entries",
                format!("more than {}", limits.max_files.saturating_mul(4)),
                "a model directory, not a store of many models",
            ));
        }
    }
    names.sort();
    let indexes: Vec<&PathBuf> = names
        .iter()
        .filter(|n| n.to_string_lossy().ends_with(".safetensors.index.json"))
        .collect();
    let too_many = |count: usize| {
        WeightsError::invalid(
            shown,
            "weight files",
            count,
            format!("at most {}", limits.max_files),
        )
    };
    if let Some(index) = indexes.first() {
        if indexes.len() > 1 {
            return Err(WeightsError::invalid(
                shown,
                "safetensors indexes",
                indexes.len(),
                "one *.safetensors.index.json per model directory",
            ));
        }
        let index_inner = root.resolve_within(&dir.join(index), dir)?;
        let shown_index = shown.join(index);
        let shards = safetensors::read_index(&root.host_path(&index_inner), &shown_index, limits)?;
        if shards.len() > limits.max_files {
            return Err(too_many(shards.len()));
        }
        let mut estimate = Estimate {
            format: Format::ShardedSafetensors,
            files: shards.len(),
            tensors: 0,
            weights_bytes: 0,
            kv_cache: None,
        };
        for (shard, expected) in shards {
            let inner = root.resolve_within(&dir.join(&shard), dir)?;
            let shown_shard = shown.join(&shard);
            let summary =
                safetensors::read_file(&root.host_path(&inner), &shown_shard, limits, true)?;
            let held = summary.names.unwrap_or_default();
            if let Some(missing) = expected.difference(&held).next() {
                return Err(WeightsError::invalid(
                    &shown_index,
                    format!("weight_map[{}]", error::shown(missing)),
                    error::shown(&shard.to_string_lossy()),
                    "a shard that holds that tensor",
                ));
            }
            estimate.tensors += summary.tensors;
            estimate.weights_bytes = estimate.weights_bytes.saturating_add(summary.bytes);
        }
        return Ok(estimate);
    }
    let safetensors: Vec<&PathBuf> = names.iter().filter(|n| is_safetensors(n)).collect();
    if !safetensors.is_empty() {
        if safetensors.len() > limits.max_files {
            return Err(too_many(safetensors.len()));
        }
        let mut estimate = Estimate {
            format: Format::SafetensorsDirectory,
            files: safetensors.len(),
            tensors: 0,
            weights_bytes: 0,
            kv_cache: None,
        };
        for name in safetensors {
            let inner = root.resolve_within(&dir.join(name), dir)?;
            let summary =
                safetensors::read_file(&root.host_path(&inner), &shown.join(name), limits, false)?;
            estimate.tensors += summary.tensors;
            estimate.weights_bytes = estimate.weights_bytes.saturating_add(summary.bytes);
        }
        return Ok(estimate);
    }
    let ggufs: Vec<&PathBuf> = names.iter().filter(|n| is_gguf(n)).collect();
    match ggufs.len() {
        0 => Err(WeightsError::Unsupported {
            what: shown.display().to_string(),
            reason: "no .safetensors, *.safetensors.index.json or .gguf file in this directory"
                .into(),
        }),
        1 => {
            let inner = root.resolve_within(&dir.join(ggufs[0]), dir)?;
            gguf_files(root, &shown.join(ggufs[0]), &[inner], options)
        }
        n => {
            // A split model: NAME-00001-of-0000N.gguf ... (llama.cpp's gguf-split); anything
            // else is several models in one directory.
            let split = ggufs.iter().all(|n| is_split_part(n, ggufs.len()));
            if !split {
                return Err(WeightsError::invalid(
                    shown,
                    "GGUF files",
                    n,
                    "one model per directory (one .gguf, or the parts NAME-0000K-of-0000N.gguf of one split model)",
                ));
            }
            let mut files = Vec::with_capacity(n);
            for name in ggufs {
                files.push(root.resolve_within(&dir.join(name), dir)?);
            }
            gguf_files(root, shown, &files, options)
        }
    }
}

fn is_split_part(name: &Path, count: usize) -> bool {
    let name = name.to_string_lossy();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let Some((rest, total)) = stem.rsplit_once("-of-") else {
        return false;
    };
    let Some((_, _part)) = rest.rsplit_once('-') else {
        return false;
    };
    total.parse::<usize>() == Ok(count)
}
