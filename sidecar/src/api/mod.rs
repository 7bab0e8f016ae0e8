//! The versioned HTTP API (`/v1`, docs/sidecar-api.md) and the operations endpoints
//! (`/metrics`, `/healthz`, `/readyz`). Handlers are thin: they parse, call [`Shared`], and
//! shape the answer.

pub mod http;
pub mod limits;
pub mod listen;
pub mod socket;
pub mod wire;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    extract::{Path, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use modelpool_policy::{Action, Footprint, Limits, Refusal, RefusalReason};
use serde_json::json;

use self::http::{ApiError, JsonBody, empty, query_u64};
use crate::{
    decide::{LookupError, lease_name, session_name},
    shell::{AcquireAnswer, Shared},
};

/// Longest long poll of the command stream.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Long poll length when `wait_ms` is not given.
pub const DEFAULT_WAIT_MS: u64 = 25_000;

type AppState = State<Arc<Shared>>;

impl From<LookupError> for ApiError {
    fn from(error: LookupError) -> Self {
        match &error {
            LookupError::Session(session) => ApiError::unknown_session(session),
            LookupError::Lease { lease, session } => ApiError::unknown_lease(lease, session),
            LookupError::Model { names, listed } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_model",
                format!(
                    "models not in the pool: {} (the pool lists: {listed})",
                    names.join(", ")
                ),
            )
            .with("models", json!(names)),
            LookupError::ShuttingDown => ApiError::shutting_down(),
            LookupError::Readings { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_readings", error.to_string())
            }
            LookupError::StaleInstance { .. } => {
                ApiError::new(StatusCode::CONFLICT, "stale_instance", error.to_string())
            }
            LookupError::AlreadyUnloaded { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_unloaded", error.to_string())
            }
            LookupError::NotUnloadable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_unloadable", error.to_string())
            }
        }
    }
}

/// The `/v1` router with the default caps.
pub fn router(shared: Arc<Shared>) -> Router {
    router_with(shared, limits::ApiLimits::default())
}

/// The `/v1` router with `caps` (`--max-sessions`).
pub fn router_with(shared: Arc<Shared>, caps: limits::ApiLimits) -> Router {
    Router::new()
        // The caps reach only the handler that needs them: an extension layer on the whole
        // router would cost every acquire and release a request extension.
        .route("/v1/sessions", post(open_session).layer(Extension(caps)))
        .route("/v1/sessions/{session}", delete(close_session))
        .route("/v1/sessions/{session}/heartbeat", post(heartbeat))
        .route("/v1/sessions/{session}/commands", get(commands))
        .route("/v1/acquire", post(acquire))
        .route("/v1/loaded", post(loaded))
        .route("/v1/release", post(release))
        .route("/v1/unloaded", post(unloaded))
        .route("/v1/cleanup", post(cleanup))
        .route("/v1/state", get(state))
        .route("/v1/check", get(check))
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .with_state(shared)
}

/// The operations router: `/metrics`, `/healthz`, `/readyz`.
pub fn ops_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(http::not_found)
        .with_state(shared)
}

async fn metrics(State(shared): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.render_metrics(),
    )
        .into_response()
}

/// The API socket's watcher, when the sidecar runs one (not in router-only tests).
type Socket = Option<Extension<Arc<socket::SocketWatch>>>;

async fn healthz(socket: Socket) -> Response {
    match socket.and_then(|s| s.problem()) {
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response(),
        None => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn readyz(State(shared): AppState, socket: Socket) -> Response {
    if let Some(problem) = socket.and_then(|s| s.problem()) {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response()
    } else if let Some(reason) = shared.server_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the model server does not answer: {reason}\n"),
        )
            .into_response()
    } else if shared.ready.load(Ordering::Relaxed) && !shared.shutting_down() {
        (StatusCode::OK, "ready\n").into_response()
    } else if shared.shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "API not listening yet\n").into_response()
    }
}

async fn open_session(
    State(shared): AppState,
    Extension(caps): Extension<limits::ApiLimits>,
    JsonBody(body): JsonBody<wire::CreateSession>,
) -> Result<Response, ApiError> {
    limits::create_session(&body)?;
    // The app's process is known: the weights only it sees can be estimated (once per pid).
    // That reads files (up to 2 s each): on the blocking pool, not the runtime's one thread,
    // and before the session opens, so its first acquire sees the estimate.
    let estimator = Arc::clone(&shared);
    let pid = body.pid;
    let _ = tokio::task::spawn_blocking(move || estimator.estimate_through(&[pid])).await;
    let answer = {
        // The count and the open as one step, so concurrent opens cannot pass the cap.
        let _gate = limits::OPEN_GATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = shared.with_core(|core| core.sessions().len());
        if open >= caps.max_sessions && !shared.shutting_down() {
            return Err(limits::too_many_sessions(open, caps.max_sessions));
        }
        shared.open_session(body)?
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn close_session(
    State(shared): AppState,
    Path(session): Path<String>,
) -> Result<StatusCode, ApiError> {
    limits::session(&session)?;
    shared.close_session(&session)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn heartbeat(
    State(shared): AppState,
    Path(session): Path<String>,
    JsonBody(body): JsonBody<wire::Heartbeat>,
) -> Result<Json<wire::Empty>, ApiError> {
    limits::heartbeat(&session, &body)?;
    shared.heartbeat(&session, body.readings)?;
    Ok(empty())
}

async fn commands(
    State(shared): AppState,
    Path(session): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<wire::Commands>, ApiError> {
    limits::session(&session)?;
    let wait_ms = query_u64(query.as_deref(), "wait_ms")?
        .unwrap_or(DEFAULT_WAIT_MS)
        .min(MAX_WAIT_MS);
    let id = shared.command_session(&session)?;
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let mut changes = shared.hub.subscribe();
    loop {
        changes.borrow_and_update();
        shared.prune_commands(id);
        let Some(taken) = shared.hub.take(id, Instant::now()) else {
            return Err(ApiError::unknown_session(&session));
        };
        if !taken.commands.is_empty() {
            return Ok(Json(wire::Commands {
                commands: taken.commands,
            }));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Json(wire::Commands::default()));
        }
        let until = taken.next_due.map_or(deadline, |due| due.min(deadline));
        let _ = tokio::time::timeout_at(until.into(), changes.changed()).await;
    }
}

/// A refusal as the API's error, with its numbers (the proxy shapes the same fields in the
/// client's protocol).
pub(crate) fn refusal_body(model: &str, refusal: &Refusal) -> ApiError {
    let (status, code) = match refusal.reason {
        RefusalReason::UnknownModel => (StatusCode::NOT_FOUND, "unknown_model"),
        RefusalReason::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        _ => (StatusCode::CONFLICT, "refused"),
    };
    ApiError::new(status, code, refusal.message.clone()).with_fields(&wire::RefusalDetails {
        decision: wire::Decision::Refuse,
        reason: refusal.reason.as_str().to_owned(),
        model: model.to_owned(),
        need_bytes: Some(refusal.need),
        ceiling_bytes: Some(Limits::new(refusal.ceiling_vram, refusal.ceiling_ram)),
        held_bytes: Some(refusal.held),
        reclaimable_bytes: Some(refusal.reclaimable),
        holders: refusal
            .holders
            .iter()
            .map(|h| wire::Holder {
                model: h.model.clone(),
                session: session_name(h.session),
                vram_bytes: h.held.vram,
                ram_bytes: h.held.ram,
                leases: h.leases as u64,
                pinned: h.pinned,
            })
            .collect(),
    })
}

async fn acquire(
    State(shared): AppState,
    JsonBody(body): JsonBody<wire::Acquire>,
) -> Result<Json<wire::AcquireAnswer>, ApiError> {
    limits::acquire(&body)?;
    let held = shared.with_core(|core| core.leases().len());
    if held >= limits::MAX_LEASES {
        return Err(limits::too_many_leases(held));
    }
    match shared
        .acquire(&body.session, &body.model, body.wait)
        .await?
    {
        AcquireAnswer::Granted {
            action,
            lease,
            generation,
            ..
        } => Ok(Json(wire::AcquireAnswer {
            decision: match action {
                Action::Use => wire::Decision::Use,
                Action::Load => wire::Decision::Load,
            },
            model: body.model,
            lease: Some(lease_name(lease)),
            generation: Some(generation),
            message: None,
        })),
        AcquireAnswer::Wait { message } => Ok(Json(wire::AcquireAnswer {
            decision: wire::Decision::Wait,
            model: body.model,
            lease: None,
            generation: None,
            message: Some(message),
        })),
        AcquireAnswer::Refused(refusal) => Err(refusal_body(&body.model, &refusal)),
        AcquireAnswer::LoadFailed { message } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused",
            message,
        )
        .with_fields(&wire::RefusalDetails {
            decision: wire::Decision::Refuse,
            reason: "load_failed".to_owned(),
            model: body.model,
            need_bytes: None,
            ceiling_bytes: None,
            held_bytes: None,
            reclaimable_bytes: None,
            holders: Vec::new(),
        })),
    }
}

async fn loaded(
    State(shared): AppState,
    JsonBody(mut body): JsonBody<wire::Loaded>,
) -> Result<Json<wire::Empty>, ApiError> {
    limits::loaded(&mut body)?;
    shared.loaded(body)?;
    Ok(empty())
}

async fn release(
    State(shared): AppState,
    JsonBody(body): JsonBody<wire::Release>,
) -> Result<Json<wire::ReleaseAnswer>, ApiError> {
    limits::release(&body)?;
    let unload = shared.release(&body.session, &body.lease)?;
    Ok(Json(wire::ReleaseAnswer { unload }))
}

async fn unloaded(
    State(shared): AppState,
    JsonBody(body): JsonBody<wire::Unloaded>,
) -> Result<Json<wire::Empty>, ApiError> {
    limits::unloaded(&body)?;
    shared
        .unloaded(&body.session, &body.model, body.generation, body.command)
        .map_err(|error| match error {
            LookupError::Model { names, listed } => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!(
                    "model {:?} is not in the pool (it lists: {listed})",
                    names.join(", ")
                ),
            ),
            other => other.into(),
        })?;
    Ok(empty())
}

async fn cleanup(
    State(shared): AppState,
    JsonBody(body): JsonBody<wire::Cleanup>,
) -> Json<wire::CleanupAnswer> {
    Json(shared.cleanup(body.force))
}

async fn state(State(shared): AppState) -> Json<wire::State> {
    Json(shared.state())
}

async fn check(
    State(shared): AppState,
    RawQuery(query): RawQuery,
) -> Result<Json<wire::CheckAnswer>, ApiError> {
    let vram = query_u64(query.as_deref(), "vram_bytes")?.unwrap_or(0);
    let ram = query_u64(query.as_deref(), "ram_bytes")?.unwrap_or(0);
    Ok(Json(shared.check(Footprint::new(vram, ram))))
}
