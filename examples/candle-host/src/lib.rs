//! ModelPool's reference model host: candle reads safetensors on the CPU, cudarc copies the
//! tensors to the GPU through pinned buffers, and an HTTP API lets the sidecar's `Http` driver
//! load and unload models. Without a GPU it serves all the same, keeping tensors on the CPU.
//!
//! ```text
//!   sidecar (Http driver) ── POST /models/{name}/load ──► server.rs ── store.rs ── gpu.rs
//!                                                          (axum)     (candle)    (cudarc)
//! ```

pub mod args;
pub mod bench;
pub mod gpu;
pub mod layout;
pub mod memory;
pub mod server;
pub mod store;

use std::{io::IsTerminal, sync::Arc};

use anyhow::Context as _;

use crate::{
    args::{Args, LogFormat},
    gpu::Gpu,
    server::Host,
};

/// Exit code of `--bench-h2d` without a GPU (the automake/ctest "skipped" code, like
/// `tests/gpu/run.sh`).
pub const EXIT_NO_GPU: i32 = 77;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Opens the GPU unless `--cpu`, logging what was found.
pub fn open_gpu(args: &Args) -> Result<Gpu, String> {
    if args.cpu {
        let reason = "--cpu given".to_string();
        tracing::warn!("no GPU: {reason}; tensors stay on the CPU");
        return Err(reason);
    }
    match Gpu::open(args.device) {
        Ok(gpu) => {
            let info = gpu.info();
            tracing::info!(
                device = info.device,
                name = %info.name,
                total_bytes = info.total_bytes,
                "GPU {}: {} ({})",
                info.device,
                info.name,
                memory::gib(info.total_bytes as u64)
            );
            Ok(gpu)
        }
        Err(reason) => {
            tracing::warn!("no GPU: {reason}; tensors stay on the CPU");
            Err(reason)
        }
    }
}

/// `--bench-h2d`: prints the report; returns the process exit code.
pub fn run_bench(args: &Args) -> anyhow::Result<i32> {
    let file = args
        .bench_h2d
        .clone()
        .context("--bench-h2d FILE is required")?;
    let gpu = open_gpu(args);
    let report = bench::run(
        &file,
        gpu.as_ref().map_err(String::as_str),
        args.bench_repeats as usize,
        args.staging_bytes(),
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(if report.gpu { 0 } else { EXIT_NO_GPU })
}

/// Serves the API until SIGINT or SIGTERM.
pub async fn serve(args: &Args) -> anyhow::Result<()> {
    let models_dir = args
        .models_dir
        .clone()
        .context("--models-dir is required")?;
    if !models_dir.is_dir() {
        tracing::warn!(dir = %models_dir.display(), "models directory does not exist (yet): every load will be a 404");
    }
    let gpu = open_gpu(args);
    let host = Arc::new(Host::new(models_dir.clone(), gpu, args.staging_bytes()));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(models_dir = %models_dir.display(), "listening on http://{addr}");
    axum::serve(listener, server::router(host.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let host_for_drop = host.clone();
    tokio::task::spawn_blocking(move || host_for_drop.unload_all()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
