//! `--bench-h2d FILE`: the load path's host-to-device rate next to a raw pinned copy of the
//! same bytes, measured in the same run, printed as one JSON object.
//!
//! `h2d_gb_per_s` is the tensor bytes over the fastest full GPU load (open, mmap read, staging,
//! copies, sync; page cache warm after the first repeat); `h2d_first_gb_per_s` is the first
//! (possibly cold) load; `raw_h2d_gb_per_s` is one `cuMemcpyHtoDAsync` of the same bytes from a
//! single pinned buffer (the ceiling the load path can approach). GB are 10^9 bytes.

use std::path::Path;

use serde::Serialize;

use crate::{
    gpu::Gpu,
    layout::{Segment, TENSOR_ALIGN, fill_chunk, plan},
    store::{self, LoadError},
};

/// The benchmark's result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    /// The file measured.
    pub file: String,
    /// Its size, bytes.
    pub file_bytes: u64,
    /// Sum of its tensors, bytes (what is copied).
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Whether a GPU was used.
    pub gpu: bool,
    /// The device's name.
    pub device: Option<String>,
    /// Why there is no GPU (`no GPU: ...`).
    pub reason: Option<String>,
    /// Fastest full load, GB/s.
    pub h2d_gb_per_s: Option<f64>,
    /// First load, GB/s.
    pub h2d_first_gb_per_s: Option<f64>,
    /// Raw pinned copy, GB/s.
    pub raw_h2d_gb_per_s: Option<f64>,
    /// `h2d_gb_per_s / raw_h2d_gb_per_s`.
    pub h2d_vs_raw: Option<f64>,
    /// Fastest full load, seconds.
    pub load_seconds: Option<f64>,
    /// Fastest raw copy, seconds.
    pub raw_seconds: Option<f64>,
    /// Without a GPU: candle's CPU load rate, GB/s.
    pub cpu_load_gb_per_s: Option<f64>,
    /// Repeats of each measurement.
    pub repeats: usize,
    /// Size of each of the two staging buffers, bytes.
    pub staging_bytes: usize,
    /// The first and last bytes of every tensor read back from the device matched the file.
    pub verified: Option<bool>,
}

/// `bytes / seconds` in GB/s (None for a zero time).
pub fn gb_per_s(bytes: u64, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| bytes as f64 / seconds / 1e9)
}

fn verify(gpu: &Gpu, file: &Path, model: &store::LoadedModel) -> Result<bool, LoadError> {
    let Some(buffer) = model.device_buffer() else {
        return Ok(false);
    };
    let safetensors = store::open(file)?;
    for tensor in &model.tensors {
        let view = safetensors
            .get(&tensor.name)
            .map_err(|error| LoadError::Invalid {
                path: file.to_owned(),
                message: error.to_string(),
            })?;
        let data = view.data();
        if data.is_empty() {
            continue;
        }
        let offset = tensor.offset.unwrap_or(0);
        let edge = data.len().min(4096);
        for (at, expected) in [
            (0, &data[..edge]),
            (data.len() - edge, &data[data.len() - edge..]),
        ] {
            let got = gpu
                .download(buffer, offset + at, edge)
                .map_err(|source| LoadError::Gpu {
                    path: file.to_owned(),
                    source,
                })?;
            if got != expected {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Runs the benchmark on `file`; without a GPU (`gpu` is the reason) it reports candle's CPU
/// load rate and `gpu: false`.
pub fn run(
    file: &Path,
    gpu: Result<&Gpu, &str>,
    repeats: usize,
    staging_bytes: usize,
) -> Result<BenchReport, LoadError> {
    let repeats = repeats.max(1);
    let mut report = BenchReport {
        file: file.display().to_string(),
        file_bytes: 0,
        bytes: 0,
        tensors: 0,
        gpu: gpu.is_ok(),
        device: None,
        reason: None,
        h2d_gb_per_s: None,
        h2d_first_gb_per_s: None,
        raw_h2d_gb_per_s: None,
        h2d_vs_raw: None,
        load_seconds: None,
        raw_seconds: None,
        cpu_load_gb_per_s: None,
        repeats,
        staging_bytes,
        verified: None,
    };
    let gpu = match gpu {
        Ok(gpu) => gpu,
        Err(reason) => {
            let model = store::load(file, None, staging_bytes)?;
            report.file_bytes = model.file_bytes;
            report.bytes = model.tensor_bytes;
            report.tensors = model.tensors.len();
            report.reason = Some(format!("no GPU: {reason}"));
            report.cpu_load_gb_per_s = gb_per_s(model.tensor_bytes, model.load_seconds);
            return Ok(report);
        }
    };
    report.device = Some(gpu.name().to_string());
    let mut best = f64::INFINITY;
    for repeat in 0..repeats {
        let model = store::load(file, Some(gpu), staging_bytes)?;
        if repeat == 0 {
            report.file_bytes = model.file_bytes;
            report.bytes = model.tensor_bytes;
            report.tensors = model.tensors.len();
            report.h2d_first_gb_per_s = gb_per_s(model.tensor_bytes, model.load_seconds);
            report.verified = Some(verify(gpu, file, &model)?);
        }
        best = best.min(model.load_seconds);
    }
    report.load_seconds = Some(best);
    report.h2d_gb_per_s = gb_per_s(report.bytes, best);

    // The same bytes, laid out as on the device, in one pinned buffer.
    let image = {
        let safetensors = store::open(file)?;
        let mut views = safetensors.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let sizes: Vec<usize> = views.iter().map(|(_, view)| view.data().len()).collect();
        let (offsets, total) = plan(&sizes, TENSOR_ALIGN);
        let segments: Vec<Segment<'_>> = offsets
            .iter()
            .zip(&views)
            .map(|(&offset, (_, view))| Segment {
                offset,
                data: view.data(),
            })
            .collect();
        let mut image = vec![0u8; total];
        fill_chunk(&segments, 0, 0, &mut image);
        image
    };
    let raw = gpu
        .raw_h2d_seconds(&image, repeats)
        .map_err(|source| LoadError::Gpu {
            path: file.to_owned(),
            source,
        })?;
    report.raw_seconds = Some(raw);
    report.raw_h2d_gb_per_s = gb_per_s(image.len() as u64, raw);
    report.h2d_vs_raw = match (report.h2d_gb_per_s, report.raw_h2d_gb_per_s) {
        (Some(load), Some(raw)) if raw > 0.0 => Some(load / raw),
        _ => None,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_decimal_gigabytes() {
        assert_eq!(gb_per_s(2_000_000_000, 0.5), Some(4.0));
        assert_eq!(gb_per_s(1, 0.0), None);
    }
}
