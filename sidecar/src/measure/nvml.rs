//! NVML (through nvml-wrapper, which loads `libnvidia-ml.so.1` at run time): each device's total
//! and used memory, and the VRAM each process uses. `Nvml::init()` runs once; when it fails the
//! probe keeps the reason and every reading is "no GPU (<reason>)", never a crash.

use std::collections::BTreeMap;

use nvml_wrapper::{Nvml, enums::device::UsedGpuMemory, error::NvmlError};

use super::{GpuDevice, GpuReading, Source};

/// One NVML session for the process lifetime, or why there is none.
pub struct NvmlProbe {
    nvml: Result<Nvml, String>,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.nvml {
            Ok(_) => f.write_str("NvmlProbe(up)"),
            Err(reason) => write!(f, "NvmlProbe(down: {reason})"),
        }
    }
}

impl NvmlProbe {
    /// Initialises NVML; a failure is kept as the "no GPU" reason.
    pub fn init() -> Self {
        let nvml = Nvml::init().map_err(|error| describe_init_error(&error));
        match &nvml {
            Ok(_) => tracing::info!("NVML initialised"),
            Err(reason) => tracing::info!(%reason, "NVML unavailable: no GPU readings from NVML"),
        }
        Self { nvml }
    }

    /// A probe that never initialised, with `reason` (for tests and `--no-nvml`).
    pub fn disabled(reason: impl Into<String>) -> Self {
        Self {
            nvml: Err(reason.into()),
        }
    }

    /// Why NVML is unavailable, if it is.
    pub fn down_reason(&self) -> Option<&str> {
        self.nvml.as_ref().err().map(String::as_str)
    }

    /// Every device's memory, or the reason there is none.
    pub fn devices(&self) -> GpuReading {
        let nvml = match &self.nvml {
            Ok(nvml) => nvml,
            Err(reason) => return GpuReading::down(reason.clone()),
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => return GpuReading::down(format!("NVML device count failed: {error}")),
        };
        if count == 0 {
            return GpuReading::down("NVML sees no devices".to_owned());
        }
        let mut devices = Vec::new();
        let mut errors = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(error) => {
                    errors.push(format!("device {index}: {error}"));
                    continue;
                }
            };
            match device.memory_info() {
                Ok(memory) => devices.push(GpuDevice {
                    index,
                    uuid: device.uuid().unwrap_or_default(),
                    name: device.name().unwrap_or_default(),
                    total_bytes: memory.total,
                    used_bytes: memory.used,
                    source: Source::Nvml,
                }),
                // Not supported (some vGPU/MIG set-ups): the reading is absent, not failed.
                Err(NvmlError::NotSupported) => {}
                Err(error) => errors.push(format!("device {index} memory info: {error}")),
            }
        }
        if devices.is_empty() {
            return GpuReading::down(format!("NVML read no device memory: {}", errors.join("; ")));
        }
        GpuReading {
            devices,
            down_reason: None,
        }
    }

    /// VRAM used per process over all devices (compute and graphics contexts), by host pid.
    pub fn process_vram(&self) -> BTreeMap<u32, u64> {
        self.process_vram_by_device()
            .into_iter()
            .map(|(pid, devices)| (pid, devices.values().sum()))
            .collect()
    }

    /// VRAM used per process and device (index), by host pid: a process on several GPUs has
    /// one entry per device, so pressure can be judged per device.
    pub fn process_vram_by_device(&self) -> BTreeMap<u32, BTreeMap<u32, u64>> {
        let mut used: BTreeMap<u32, BTreeMap<u32, u64>> = BTreeMap::new();
        let Ok(nvml) = &self.nvml else {
            return used;
        };
        let count = nvml.device_count().unwrap_or(0);
        for index in 0..count {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            let compute = device.running_compute_processes().unwrap_or_default();
            let graphics = device.running_graphics_processes().unwrap_or_default();
            for process in compute.into_iter().chain(graphics) {
                if let UsedGpuMemory::Used(bytes) = process.used_gpu_memory {
                    *used
                        .entry(process.pid)
                        .or_default()
                        .entry(index)
                        .or_insert(0) += bytes;
                }
            }
        }
        used
    }
}

fn describe_init_error(error: &NvmlError) -> String {
    match error {
        NvmlError::LibloadingError(inner) => {
            tracing::debug!(error = %inner, "loading libnvidia-ml.so.1 failed");
            "libnvidia-ml.so.1 not found".to_owned()
        }
        NvmlError::DriverNotLoaded => "NVIDIA driver not loaded".to_owned(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_owned(),
        other => format!("NVML init failed: {other}"),
    }
}
