//! Loading one model: candle reads the safetensors file (memory-mapped) on the CPU; with a GPU
//! its tensors are copied into one device buffer ([`crate::gpu::Gpu::upload`]) and the host
//! copy is dropped, without one they stay on the CPU as candle tensors.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::{Device, Tensor, safetensors::MmapedSafetensors};
use serde::Serialize;

use crate::{
    gpu::{DeviceBuffer, Gpu, GpuError},
    layout::{DEVICE_PAGE, Segment, TENSOR_ALIGN, plan, round_up},
};

/// The file a model named `name` is read from: `{models_dir}/{name}.safetensors`.
pub fn model_path(models_dir: &Path, name: &str) -> PathBuf {
    models_dir.join(format!("{name}.safetensors"))
}

/// Checks a model name taken from a URL: letters, digits, `.`, `_`, `-`, not starting with a
/// dot, at most 200 characters (so it can never leave the models directory).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "model name must be 1 to 200 characters, got {}",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("model name {name:?} must not start with '.'"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "model name {name:?} contains {bad:?}: only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file for the model.
    #[error("model file {} not found", path.display())]
    NotFound {
        /// The file looked for.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("failed to read model file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not a safetensors file, or a tensor candle cannot read.
    #[error("model file {} is not usable: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The GPU failed (out of memory, driver error).
    #[error("failed to load {} onto the GPU: {source}", path.display())]
    Gpu {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: GpuError,
    },
}

impl LoadError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound { .. } => 404,
            Self::Invalid { .. } => 422,
            Self::Gpu {
                source: GpuError::OutOfMemory { .. },
                ..
            } => 507,
            Self::Io { .. } | Self::Gpu { .. } => 500,
        }
    }

    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Invalid { .. } => "invalid_model",
            Self::Gpu {
                source: GpuError::OutOfMemory { .. },
                ..
            } => "out_of_memory",
            Self::Io { .. } => "io",
            Self::Gpu { .. } => "gpu",
        }
    }
}

/// One tensor of a loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    /// Name in the file.
    pub name: String,
    /// safetensors dtype (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Size, bytes.
    pub bytes: usize,
    /// Offset in the model's device buffer (GPU only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

/// Where the weights live.
pub enum Weights {
    /// One device buffer holding every tensor at its [`TensorInfo::offset`].
    Gpu(DeviceBuffer),
    /// candle tensors in host memory.
    Cpu(Vec<(String, Tensor)>),
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gpu(buffer) => write!(f, "Gpu({} bytes)", buffer.bytes()),
            Self::Cpu(tensors) => write!(f, "Cpu({} tensors)", tensors.len()),
        }
    }
}

/// A model in memory.
#[derive(Debug)]
pub struct LoadedModel {
    /// The file it came from.
    pub path: PathBuf,
    /// `cuda:N` or `cpu`.
    pub device: String,
    /// Its tensors.
    pub tensors: Vec<TensorInfo>,
    /// The weights.
    pub weights: Weights,
    /// Device memory it holds (its allocation, in whole device pages), bytes.
    pub vram_bytes: u64,
    /// Host memory it holds (CPU tensors), bytes.
    pub ram_bytes: u64,
    /// Sum of the tensors' sizes, bytes.
    pub tensor_bytes: u64,
    /// Size of the file, bytes.
    pub file_bytes: u64,
    /// From opening the file until the weights were in place, seconds.
    pub load_seconds: f64,
}

impl LoadedModel {
    /// The CPU tensors (empty on the GPU path).
    pub fn cpu_tensors(&self) -> &[(String, Tensor)] {
        match &self.weights {
            Weights::Cpu(tensors) => tensors,
            Weights::Gpu(_) => &[],
        }
    }

    /// The device buffer (GPU path only).
    pub fn device_buffer(&self) -> Option<&DeviceBuffer> {
        match &self.weights {
            Weights::Gpu(buffer) => Some(buffer),
            Weights::Cpu(_) => None,
        }
    }
}

/// Opens a safetensors file memory-mapped, with candle.
#[allow(unsafe_code)]
pub fn open(path: &Path) -> Result<MmapedSafetensors, LoadError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(LoadError::Invalid {
                path: path.to_owned(),
                message: "not a regular file".into(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::NotFound {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(LoadError::Io {
                path: path.to_owned(),
                source,
            });
        }
    }
    // SAFETY: the mapping is read-only and model files are not modified while a host serves
    // them (the same contract every mmap-based model loader has).
    unsafe { MmapedSafetensors::new(path) }.map_err(|error| LoadError::Invalid {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// Loads the model in `path`: onto `gpu` when given, else into CPU tensors.
pub fn load(
    path: &Path,
    gpu: Option<&Gpu>,
    staging_bytes: usize,
) -> Result<LoadedModel, LoadError> {
    let started = Instant::now();
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let safetensors = open(path)?;
    let mut views = safetensors.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<TensorInfo> = views
        .iter()
        .map(|(name, view)| TensorInfo {
            name: name.clone(),
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
            bytes: view.data().len(),
            offset: None,
        })
        .collect();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.bytes as u64).sum();
    let device = gpu.map_or_else(
        || "cpu".to_string(),
        |gpu| format!("cuda:{}", gpu.ordinal()),
    );
    let (weights, vram_bytes, ram_bytes) = match gpu {
        Some(gpu) => {
            let sizes: Vec<usize> = tensors.iter().map(|t| t.bytes).collect();
            let (offsets, total) = plan(&sizes, TENSOR_ALIGN);
            let segments: Vec<Segment<'_>> = offsets
                .iter()
                .zip(&views)
                .map(|(&offset, (_, view))| Segment {
                    offset,
                    data: view.data(),
                })
                .collect();
            let buffer = gpu
                .upload(&segments, total, staging_bytes)
                .map_err(|source| LoadError::Gpu {
                    path: path.to_owned(),
                    source,
                })?;
            for (tensor, offset) in tensors.iter_mut().zip(offsets) {
                tensor.offset = Some(offset);
            }
            let vram = round_up(total, DEVICE_PAGE) as u64;
            (Weights::Gpu(buffer), vram, 0)
        }
        None => {
            let mut loaded = Vec::with_capacity(views.len());
            let mut held = 0u64;
            for (name, _) in &views {
                let tensor =
                    safetensors
                        .load(name, &Device::Cpu)
                        .map_err(|error| LoadError::Invalid {
                            path: path.to_owned(),
                            message: format!("tensor {name:?}: {error}"),
                        })?;
                held += (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
                loaded.push((name.clone(), tensor));
            }
            (Weights::Cpu(loaded), 0, held)
        }
    };
    drop(views);
    drop(safetensors);
    Ok(LoadedModel {
        path: path.to_owned(),
        device,
        tensors,
        weights,
        vram_bytes,
        ram_bytes,
        tensor_bytes,
        file_bytes,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Path traversal through the URL (`..%2F`) must be refused before touching the disk.
    #[test]
    fn names_cannot_leave_the_models_dir() {
        validate_name("llama-8b_v1.2").unwrap();
        for bad in [
            "",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "a b",
            "a\\b",
            "..",
            "ü",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"x".repeat(201)).is_err());
        assert_eq!(
            model_path(Path::new("/m"), "t2v"),
            PathBuf::from("/m/t2v.safetensors")
        );
    }

    /// The 404 message must name the file looked for, so an operator can fix the path.
    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = model_path(dir.path(), "absent");
        let error = load(&path, None, 1 << 20).unwrap_err();
        assert_eq!(error.status(), 404);
        assert_eq!(error.code(), "not_found");
        assert!(error.to_string().contains(&path.display().to_string()));
    }

    /// A file that is not safetensors is a 422 naming the file, not a crash.
    #[test]
    fn garbage_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = model_path(dir.path(), "junk");
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        let error = load(&path, None, 1 << 20).unwrap_err();
        assert_eq!(error.status(), 422, "{error}");
        assert!(error.to_string().contains("junk.safetensors"));
    }
}
