//! CUDA driver memory info (`cuMemGetInfo`) through cudarc, with libcuda loaded at run time so
//! nothing CUDA is needed to build. A fallback for when NVML is unavailable: it costs a CUDA
//! context on device 0 (about 500 MiB of VRAM on recent drivers), so it is only used when
//! `--cuda-fallback` asks for it.
//!
//! cudarc panics when libcuda or a symbol is missing: [`CudaProbe::init`] checks
//! `is_culib_present()` first and wraps every call that may load symbols in `catch_unwind`.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Mutex},
};

use cudarc::driver::CudaContext;

use super::{GpuDevice, GpuReading, Source};

/// A CUDA context on device 0, or why there is none.
pub struct CudaProbe {
    context: Result<Mutex<Arc<CudaContext>>, String>,
}

impl std::fmt::Debug for CudaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.context {
            Ok(_) => f.write_str("CudaProbe(up)"),
            Err(reason) => write!(f, "CudaProbe(down: {reason})"),
        }
    }
}

#[allow(unsafe_code)]
fn libcuda_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen libcuda and drops the handle; it reads
    // no memory we own. It is `unsafe` because loading a library runs its initialisers.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl CudaProbe {
    /// Loads libcuda and creates (retains) the primary context of device 0.
    pub fn init() -> Self {
        let context = if !libcuda_present() {
            Err("libcuda.so not found".to_owned())
        } else {
            match catch_unwind(|| CudaContext::new(0)) {
                Ok(Ok(context)) => Ok(Mutex::new(context)),
                Ok(Err(error)) => Err(format!("CUDA context creation failed: {error}")),
                Err(_) => Err("CUDA driver library is missing a symbol".to_owned()),
            }
        };
        if let Err(reason) = &context {
            tracing::info!(%reason, "CUDA fallback unavailable");
        }
        Self { context }
    }

    /// Device 0's total and used memory as the CUDA driver sees it.
    pub fn devices(&self) -> GpuReading {
        let context = match &self.context {
            Ok(context) => context,
            Err(reason) => return GpuReading::down(reason.clone()),
        };
        let Ok(context) = context.lock() else {
            return GpuReading::down("CUDA probe lock poisoned".to_owned());
        };
        match catch_unwind(AssertUnwindSafe(|| context.mem_get_info())) {
            Ok(Ok((free, total))) => GpuReading {
                devices: vec![GpuDevice {
                    index: 0,
                    uuid: String::new(),
                    name: "cuda:0".to_owned(),
                    total_bytes: total as u64,
                    used_bytes: total.saturating_sub(free) as u64,
                    source: Source::Cuda,
                }],
                down_reason: None,
            },
            Ok(Err(error)) => GpuReading::down(format!("cuMemGetInfo failed: {error}")),
            Err(_) => GpuReading::down("cuMemGetInfo panicked".to_owned()),
        }
    }
}
