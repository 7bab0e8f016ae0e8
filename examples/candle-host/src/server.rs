//! The HTTP API the sidecar's `Http` driver calls (`POST {url}/models/{name}/load` and
//! `/unload`), plus `GET /models` and `GET /health`.
//!
//! ```text
//!   POST /models/{name}/load    200 {"model","vram_bytes","ram_bytes","load_seconds","device",...}
//!                               404 no {models_dir}/{name}.safetensors   422 unreadable file
//!                               507 out of GPU memory                    400 bad name
//!   POST /models/{name}/unload  200 {"model","unloaded": true|false,"vram_bytes","ram_bytes",...}
//!   GET  /models                200 {"models": [...loaded], "available": [...files]}
//!   GET  /health                200 {"status":"ok","gpu":{"up":true,...}|{"up":false,"reason":"no GPU: ..."}}
//! ```
//! Errors are `{"error": "<code>", "message": "<sentence>"}` like the sidecar's own API.
//! Loads and unloads run one at a time (the `ops` lock); reads never wait for them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use crate::{
    gpu::Gpu,
    memory,
    store::{self, LoadedModel},
};

/// The host's state.
#[derive(Debug)]
pub struct Host {
    models_dir: PathBuf,
    staging_bytes: usize,
    gpu: Result<Arc<Gpu>, String>,
    models: Mutex<BTreeMap<String, LoadedModel>>,
    ops: tokio::sync::Mutex<()>,
}

impl Host {
    /// A host serving `models_dir`, on `gpu` or (with the reason there is none) on the CPU.
    pub fn new(models_dir: PathBuf, gpu: Result<Gpu, String>, staging_bytes: usize) -> Self {
        Self {
            models_dir,
            staging_bytes,
            gpu: gpu.map(Arc::new),
            models: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    fn models(&self) -> MutexGuard<'_, BTreeMap<String, LoadedModel>> {
        // A panic while holding the lock leaves a consistent map (inserts/removes are atomic).
        self.models
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `{"up": true, ...}` or `{"up": false, "reason": "no GPU: ..."}`.
    pub fn gpu_json(&self) -> Value {
        match &self.gpu {
            Ok(gpu) => {
                let mut info = serde_json::to_value(gpu.info()).unwrap_or_else(|_| json!({}));
                info["up"] = json!(true);
                info
            }
            Err(reason) => json!({"up": false, "reason": format!("no GPU: {reason}")}),
        }
    }

    /// Names of the `*.safetensors` files in the models directory.
    pub fn available(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.models_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".safetensors")?;
                store::validate_name(stem).ok()?;
                Some(stem.to_string())
            })
            .collect();
        names.sort();
        names
    }

    /// Frees every model (on shutdown).
    pub fn unload_all(&self) {
        let models = std::mem::take(&mut *self.models());
        for (name, model) in models {
            tracing::info!(model = %name, vram_bytes = model.vram_bytes, "unloading at shutdown");
        }
    }
}

/// The API router.
pub fn router(host: Arc<Host>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/models", get(list))
        .route("/models/{name}/load", post(load))
        .route("/models/{name}/unload", post(unload))
        .with_state(host)
}

fn error(status: u16, code: &str, message: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

fn summary(name: &str, model: &LoadedModel) -> Value {
    json!({
        "model": name,
        "loaded": true,
        "device": model.device,
        "vram_bytes": model.vram_bytes,
        "ram_bytes": model.ram_bytes,
        "load_seconds": model.load_seconds,
        "tensor_bytes": model.tensor_bytes,
        "file_bytes": model.file_bytes,
        "tensors": model.tensors.len(),
        "file": model.path.display().to_string(),
    })
}

async fn health(State(host): State<Arc<Host>>) -> Response {
    let (count, vram, ram) = {
        let models = host.models();
        (
            models.len(),
            models.values().map(|m| m.vram_bytes).sum::<u64>(),
            models.values().map(|m| m.ram_bytes).sum::<u64>(),
        )
    };
    Json(json!({
        "status": "ok",
        "gpu": host.gpu_json(),
        "models_loaded": count,
        "vram_bytes": vram,
        "ram_bytes": ram,
        "rss_bytes": memory::rss_bytes(),
    }))
    .into_response()
}

async fn list(State(host): State<Arc<Host>>) -> Response {
    let loaded: Vec<Value> = host
        .models()
        .iter()
        .map(|(name, model)| summary(name, model))
        .collect();
    Json(json!({"models": loaded, "available": host.available()})).into_response()
}

async fn load(State(host): State<Arc<Host>>, Path(name): Path<String>) -> Response {
    if let Err(message) = store::validate_name(&name) {
        return error(400, "bad_request", message);
    }
    let _op = host.ops.lock().await;
    if let Some(model) = host.models().get(&name) {
        let mut body = summary(&name, model);
        body["already_loaded"] = json!(true);
        return Json(body).into_response();
    }
    let path = store::model_path(&host.models_dir, &name);
    let gpu = host.gpu.as_ref().ok().cloned();
    let staging = host.staging_bytes;
    let before = memory::line(gpu.as_deref());
    let loaded =
        tokio::task::spawn_blocking(move || store::load(&path, gpu.as_deref(), staging)).await;
    match loaded {
        Ok(Ok(model)) => {
            let after = memory::line(host.gpu.as_ref().ok().map(Arc::as_ref));
            tracing::info!(
                model = %name,
                device = %model.device,
                vram_bytes = model.vram_bytes,
                ram_bytes = model.ram_bytes,
                load_seconds = model.load_seconds,
                "loaded {name}: before {before} | after {after}"
            );
            let mut body = summary(&name, &model);
            body["already_loaded"] = json!(false);
            host.models().insert(name, model);
            Json(body).into_response()
        }
        Ok(Err(failed)) => {
            tracing::warn!(model = %name, error = %failed, "load failed");
            error(failed.status(), failed.code(), failed.to_string())
        }
        Err(join) => error(
            500,
            "internal",
            format!("loading {name:?} panicked: {join}"),
        ),
    }
}

async fn unload(State(host): State<Arc<Host>>, Path(name): Path<String>) -> Response {
    if let Err(message) = store::validate_name(&name) {
        return error(400, "bad_request", message);
    }
    let _op = host.ops.lock().await;
    let Some(model) = host.models().remove(&name) else {
        return Json(json!({
            "model": name,
            "unloaded": false,
            "vram_bytes": 0,
            "ram_bytes": 0,
            "message": format!("model {name:?} is not loaded"),
        }))
        .into_response();
    };
    let gpu = host.gpu.as_ref().ok().cloned();
    let before = memory::line(gpu.as_deref());
    let (vram, ram) = (model.vram_bytes, model.ram_bytes);
    let started = Instant::now();
    // Freeing device memory is a synchronous driver call: keep it off the async workers.
    let freed = tokio::task::spawn_blocking(move || drop(model)).await;
    let seconds = started.elapsed().as_secs_f64();
    if let Err(join) = freed {
        return error(
            500,
            "internal",
            format!("unloading {name:?} panicked: {join}"),
        );
    }
    let after = memory::line(gpu.as_deref());
    tracing::info!(model = %name, vram_bytes = vram, ram_bytes = ram, "unloaded {name}: before {before} | after {after}");
    Json(json!({
        "model": name,
        "unloaded": true,
        "vram_bytes": vram,
        "ram_bytes": ram,
        "unload_seconds": seconds,
    }))
    .into_response()
}
