//! The GPU side: a CUDA context opened through cudarc's dynamic loading (so the binary builds and
//! starts on machines without CUDA), device buffers from plain `cuMemAlloc`/`cuMemFree` (no
//! stream-ordered pool that would keep freed memory cached), and host-to-device copies staged
//! through two pinned (`cuMemHostAlloc`) buffers so that filling one overlaps the DMA of the other.
//!
//! ```text
//!   file bytes (mmap, page cache) ──memcpy──► pinned staging A ──cuMemcpyHtoDAsync──► device buffer
//!                                 ──memcpy──► pinned staging B ──cuMemcpyHtoDAsync──►   (one per model)
//! ```
//!
//! With dynamic loading a missing `libcuda.so` or symbol panics inside cudarc, so [`Gpu::open`]
//! checks `is_culib_present()` first and opens the context inside `catch_unwind`.
#![allow(unsafe_code)] // FFI: raw device allocations and async copies; each block says why it holds.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Mutex},
    time::Instant,
};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaStream, DriverError, PinnedHostSlice, result, sys,
};

use crate::layout::{Segment, fill_chunk_parallel};

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA driver call returned an error.
    #[error("failed to {what}: {source}")]
    Driver {
        /// The operation.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The device has not enough free memory.
    #[error("out of GPU memory: {need} bytes needed, {free} of {total} bytes free on the device")]
    OutOfMemory {
        /// Bytes asked for.
        need: usize,
        /// Free bytes on the device when it failed.
        free: usize,
        /// Installed bytes.
        total: usize,
    },
    /// cudarc panicked (a symbol missing from an old driver).
    #[error("CUDA driver panicked during {0}")]
    Panicked(&'static str),
}

fn driver(what: &'static str) -> impl FnOnce(DriverError) -> GpuError {
    move |source| GpuError::Driver { what, source }
}

/// An open CUDA device.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    total_bytes: usize,
    /// Threads that fill each staging buffer (see `layout::fill_chunk_parallel`).
    fill_threads: usize,
    /// Pinned staging buffers kept between loads: pinning memory (`cuMemHostAlloc`) runs at a
    /// few GB/s, so allocating 2 x 64 MiB per load would cost as much as the copy itself.
    staging: Mutex<Vec<PinnedHostSlice<u8>>>,
}

/// What `GET /health` says about the device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    /// Device ordinal.
    pub device: usize,
    /// Product name.
    pub name: String,
    /// Installed memory, bytes.
    pub total_bytes: usize,
    /// Free memory now (device-wide, every process), bytes.
    pub free_bytes: Option<usize>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl Gpu {
    /// Opens device `ordinal`, or says why there is no GPU (the reason never starts with
    /// "no GPU": callers prefix it).
    pub fn open(ordinal: usize) -> Result<Self, String> {
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "libcuda.so (the NVIDIA driver's CUDA library) not found or not loadable".into(),
            );
        }
        let opened = catch_unwind(AssertUnwindSafe(|| -> Result<Self, String> {
            let count = result::init()
                .and_then(|()| result::device::get_count())
                .map_err(|error| format!("CUDA driver present but unusable: {error}"))?;
            if count <= 0 || ordinal >= count as usize {
                return Err(format!(
                    "CUDA device {ordinal} not found ({count} device(s) visible)"
                ));
            }
            let ctx = CudaContext::new(ordinal).map_err(|error| {
                format!("failed to create a CUDA context on device {ordinal}: {error}")
            })?;
            let name = ctx
                .name()
                .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
            let total_bytes = ctx
                .total_mem()
                .map_err(|error| format!("failed to read device memory size: {error}"))?;
            let stream = ctx
                .new_stream()
                .map_err(|error| format!("failed to create a CUDA stream: {error}"))?;
            Ok(Self {
                ctx,
                stream,
                ordinal,
                name,
                total_bytes,
                fill_threads: fill_threads(),
                staging: Mutex::new(Vec::new()),
            })
        }));
        match opened {
            Ok(result) => result,
            Err(payload) => Err(format!(
                "CUDA driver could not be used (cudarc panicked: {})",
                panic_message(payload.as_ref())
            )),
        }
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Product name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(free, total)` device memory, bytes (every process's use counts).
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        self.ctx
            .mem_get_info()
            .map_err(driver("read device memory"))
    }

    /// A description for `/health`.
    pub fn info(&self) -> GpuInfo {
        GpuInfo {
            device: self.ordinal,
            name: self.name.clone(),
            total_bytes: self.total_bytes,
            free_bytes: self.mem_info().ok().map(|(free, _)| free),
        }
    }

    /// Allocates `bytes` of device memory with `cuMemAlloc`.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("bind the CUDA context"))?;
        // SAFETY: a plain allocation; the memory is uninitialised until copied into, and
        // DeviceBuffer frees it exactly once.
        match unsafe { result::malloc_sync(bytes.max(1)) } {
            Ok(ptr) => Ok(DeviceBuffer {
                ptr,
                bytes,
                ctx: self.ctx.clone(),
            }),
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let (free, total) = self.mem_info().unwrap_or((0, self.total_bytes));
                Err(GpuError::OutOfMemory {
                    need: bytes,
                    free,
                    total,
                })
            }
            Err(source) => Err(GpuError::Driver {
                what: "allocate device memory",
                source,
            }),
        }
    }

    /// Allocates `bytes` of pinned (page-locked) host memory.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedHostSlice<u8>, GpuError> {
        // SAFETY: u8 has no invalid bit patterns, so uninitialised pinned bytes are only
        // "garbage", and every byte copied to the device is written first. Flags 0: cacheable
        // (not write-combined) so that the raw benchmark's fill is not penalised either.
        unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }
            .map_err(driver("allocate pinned host memory"))
    }

    /// Copies `segments` (sorted by offset, inside `total` bytes) into a new device buffer of
    /// `total` bytes through two pinned staging buffers of `staging_bytes` each. Padding
    /// between segments is written as zeros.
    pub fn upload(
        &self,
        segments: &[Segment<'_>],
        total: usize,
        staging_bytes: usize,
    ) -> Result<DeviceBuffer, GpuError> {
        let guarded = catch_unwind(AssertUnwindSafe(|| {
            self.upload_inner(segments, total, staging_bytes)
        }));
        guarded.unwrap_or(Err(GpuError::Panicked("upload")))
    }

    fn upload_inner(
        &self,
        segments: &[Segment<'_>],
        total: usize,
        staging_bytes: usize,
    ) -> Result<DeviceBuffer, GpuError> {
        let dst = self.alloc(total)?;
        if total == 0 {
            return Ok(dst);
        }
        let chunk = staging_bytes.clamp(1 << 20, total.max(1 << 20));
        let mut slots: [(PinnedHostSlice<u8>, Option<CudaEvent>); 2] = [
            (self.take_staging(chunk)?, None),
            (self.take_staging(chunk)?, None),
        ];
        let copied = self.copy_chunks(&dst, segments, total, chunk, &mut slots);
        // Whatever happened, no copy may still read the staging buffers once they are reused
        // or freed.
        let synced = self
            .stream
            .synchronize()
            .map_err(driver("wait for the copies"));
        if synced.is_ok() {
            let mut kept = self
                .staging
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            kept.extend(slots.into_iter().map(|(pinned, _)| pinned));
        }
        copied?;
        synced?;
        Ok(dst)
    }

    /// A pinned staging buffer of at least `bytes`, reused from an earlier load when one is kept.
    fn take_staging(&self, bytes: usize) -> Result<PinnedHostSlice<u8>, GpuError> {
        let reused = {
            let mut kept = self
                .staging
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            kept.iter()
                .position(|pinned| pinned.len() >= bytes)
                .map(|index| kept.swap_remove(index))
        };
        match reused {
            Some(pinned) => Ok(pinned),
            None => self.alloc_pinned(bytes),
        }
    }

    fn copy_chunks(
        &self,
        dst: &DeviceBuffer,
        segments: &[Segment<'_>],
        total: usize,
        chunk: usize,
        slots: &mut [(PinnedHostSlice<u8>, Option<CudaEvent>); 2],
    ) -> Result<(), GpuError> {
        let mut position = 0usize;
        let mut index = 0usize;
        while position < total {
            let (pinned, pending) = &mut slots[index % 2];
            if let Some(event) = pending.take() {
                // The previous copy out of this staging buffer must be done before refilling it.
                event.synchronize().map_err(driver("wait for a copy"))?;
            }
            let len = chunk.min(total - position);
            let staging = pinned
                .as_mut_slice()
                .map_err(driver("map the pinned staging buffer"))?;
            let staging = &mut staging[..len];
            fill_chunk_parallel(segments, position, staging, self.fill_threads);
            self.ctx
                .bind_to_thread()
                .map_err(driver("bind the CUDA context"))?;
            // SAFETY: `dst` holds `total` bytes and `position + len <= total`; `staging` is
            // pinned memory that is not written again until the event recorded below has
            // completed, and the caller synchronises the stream before freeing it.
            unsafe {
                result::memcpy_htod_async(
                    dst.ptr + position as u64,
                    staging,
                    self.stream.cu_stream(),
                )
            }
            .map_err(driver("copy host to device"))?;
            *pending = Some(
                self.stream
                    .record_event(None)
                    .map_err(driver("record a copy event"))?,
            );
            position += len;
            index += 1;
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` of `buffer` back to the host (for verification).
    pub fn download(
        &self,
        buffer: &DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, GpuError> {
        assert!(offset + len <= buffer.bytes, "download out of bounds");
        let mut out = vec![0u8; len];
        self.ctx
            .bind_to_thread()
            .map_err(driver("bind the CUDA context"))?;
        // SAFETY: the range is inside the allocation (asserted above) and `out` is a host
        // buffer of exactly `len` bytes; the copy is synchronous.
        unsafe { result::memcpy_dtoh_sync(&mut out, buffer.ptr + offset as u64) }
            .map_err(driver("copy device to host"))?;
        Ok(out)
    }

    /// The raw pinned host-to-device bandwidth for `data`: the bytes are first placed in one
    /// pinned buffer, then copied with a single `cuMemcpyHtoDAsync` per repeat. Returns the
    /// fastest repeat's seconds.
    pub fn raw_h2d_seconds(&self, data: &[u8], repeats: usize) -> Result<f64, GpuError> {
        let guarded = catch_unwind(AssertUnwindSafe(|| -> Result<f64, GpuError> {
            let dst = self.alloc(data.len())?;
            let mut pinned = self.alloc_pinned(data.len())?;
            pinned
                .as_mut_slice()
                .map_err(driver("map the pinned buffer"))?[..data.len()]
                .copy_from_slice(data);
            let source = pinned.as_slice().map_err(driver("map the pinned buffer"))?;
            let source = &source[..data.len()];
            let mut best = f64::INFINITY;
            for _ in 0..repeats.max(1) {
                self.stream
                    .synchronize()
                    .map_err(driver("wait for the stream"))?;
                let started = Instant::now();
                // SAFETY: `dst` holds `data.len()` bytes, `source` is pinned and lives until
                // after the synchronize below.
                unsafe { result::memcpy_htod_async(dst.ptr, source, self.stream.cu_stream()) }
                    .map_err(driver("copy host to device"))?;
                self.stream
                    .synchronize()
                    .map_err(driver("wait for the copy"))?;
                best = best.min(started.elapsed().as_secs_f64());
            }
            Ok(best)
        }));
        guarded.unwrap_or(Err(GpuError::Panicked("raw copy")))
    }
}

/// Threads for filling staging buffers: `CANDLE_HOST_FILL_THREADS`, else the cores this
/// process may use, at most 8 (beyond that the host's memory bandwidth, not the cores, limits).
fn fill_threads() -> usize {
    std::env::var("CANDLE_HOST_FILL_THREADS")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
        .filter(|&threads| threads > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8)
        })
}

/// Device memory from `cuMemAlloc`, freed with `cuMemFree` on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    /// Size, bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Err(error) = self.ctx.bind_to_thread() {
            tracing::error!(%error, "failed to bind the CUDA context to free device memory");
            return;
        }
        // SAFETY: `ptr` came from cuMemAlloc in this context and is freed only here; every
        // copy into it was synchronised before the buffer was handed out.
        if let Err(error) = unsafe { result::free_sync(self.ptr) } {
            tracing::error!(%error, bytes = self.bytes, "failed to free device memory");
        }
    }
}
