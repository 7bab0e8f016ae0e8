//! Caps on what one client can make the sidecar hold (issue 15): the number of sessions and
//! of leases, and the size of every name and list a client sends. They are checked here, at
//! the API's edge, before a request reaches the decision core, and each refusal names the
//! field, its size and the limit. With them, `/v1/state` stays small (at most
//! `--max-sessions` sessions of at most 64 models each) whatever a client sends.

use std::sync::Mutex;

use axum::http::StatusCode;
use serde_json::Value;

use super::{http::ApiError, wire};

/// Longest model name: the CRD's own limit (`^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$`, 63 characters).
pub const MAX_MODEL_NAME: usize = 63;
/// Most entries in a session's `models` or `holds`: the CRD's limit on a pool's models.
pub const MAX_MODELS: usize = 64;
/// Longest session or lease name (the sidecar's are `s-<number>` / `l-<number>`).
pub const MAX_ID: usize = 64;
/// Longest `app` name of a session.
pub const MAX_APP: usize = 256;
/// Longest `readings.source` of a heartbeat (`torch`, `nvml`).
pub const MAX_SOURCE: usize = 64;
/// A failed load's `error` text is kept up to this many bytes (the rest is cut, not refused).
pub const MAX_LOAD_ERROR: usize = 1024;
/// Most leases held at once, over all sessions; each costs a little memory until released.
pub const MAX_LEASES: usize = 65_536;
/// Default of `--max-sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 256;

/// The caps the API enforces (a request extension on the `/v1` router).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most sessions open at once (`--max-sessions`).
    pub max_sessions: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// Serialises session opening, so that the count check and the open are one step.
pub static OPEN_GATE: Mutex<()> = Mutex::new(());

fn too_long(field: &str, len: usize, max: usize, why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "field {field:?} is {len} bytes, over the limit of {max} bytes{why}"
    ))
    .with("field", Value::from(field))
}

/// `value` at most `max` bytes, else 400 naming `field`.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        let why = match max {
            MAX_MODEL_NAME => " (a pool's model names are at most 63 characters)",
            MAX_ID => " (the sidecar's session and lease names are short: s-<number>, l-<number>)",
            _ => "",
        };
        return Err(too_long(field, value.len(), max, why));
    }
    Ok(())
}

fn list(field: &str, len: usize) -> Result<(), ApiError> {
    if len > MAX_MODELS {
        return Err(ApiError::bad_request(format!(
            "field {field:?} has {len} entries, over the limit of {MAX_MODELS} (a pool lists at most {MAX_MODELS} models)"
        ))
        .with("field", Value::from(field)));
    }
    Ok(())
}

/// 429 `too_many_sessions`.
pub fn too_many_sessions(open: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_sessions",
        format!(
            "{open} sessions are open, the limit (--max-sessions) is {max}: close sessions you no longer use (DELETE /v1/sessions/{{session}}) or raise the limit"
        ),
    )
    .with("limit", Value::from(max))
}

/// 429 `too_many_leases`.
pub fn too_many_leases(held: usize) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_leases",
        format!(
            "{held} leases are held, the limit is {MAX_LEASES}: release leases (POST /v1/release) before acquiring more"
        ),
    )
    .with("limit", Value::from(MAX_LEASES))
}

/// `POST /v1/sessions`.
pub fn create_session(request: &wire::CreateSession) -> Result<(), ApiError> {
    if let Some(app) = &request.app {
        name("app", app, MAX_APP)?;
    }
    list("models", request.models.len())?;
    for (i, model) in request.models.iter().enumerate() {
        name(&format!("models[{i}]"), model, MAX_MODEL_NAME)?;
    }
    list("holds", request.holds.len())?;
    for (i, hold) in request.holds.iter().enumerate() {
        name(&format!("holds[{i}].model"), &hold.model, MAX_MODEL_NAME)?;
        if request.holds[..i].iter().any(|h| h.model == hold.model) {
            return Err(ApiError::bad_request(format!(
                "field \"holds\" lists model {:?} twice: one entry per model (its `leases` counts the blocks using it)",
                hold.model
            ))
            .with("field", Value::from(format!("holds[{i}].model"))));
        }
    }
    Ok(())
}

/// A session name from the path or a body.
pub fn session(value: &str) -> Result<(), ApiError> {
    name("session", value, MAX_ID)
}

/// `POST /v1/sessions/{session}/heartbeat`.
pub fn heartbeat(session_name: &str, request: &wire::Heartbeat) -> Result<(), ApiError> {
    session(session_name)?;
    if let Some(readings) = &request.readings {
        name("readings.source", &readings.source, MAX_SOURCE)?;
    }
    Ok(())
}

/// `POST /v1/acquire`.
pub fn acquire(request: &wire::Acquire) -> Result<(), ApiError> {
    session(&request.session)?;
    name("model", &request.model, MAX_MODEL_NAME)
}

/// `POST /v1/loaded`: names checked, the error text cut to [`MAX_LOAD_ERROR`].
pub fn loaded(request: &mut wire::Loaded) -> Result<(), ApiError> {
    session(&request.session)?;
    name("lease", &request.lease, MAX_ID)?;
    if let Some(error) = &mut request.error
        && error.len() > MAX_LOAD_ERROR
    {
        let mut cut = MAX_LOAD_ERROR;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
        error.push_str(" [cut at 1024 bytes]");
    }
    Ok(())
}

/// `POST /v1/release`.
pub fn release(request: &wire::Release) -> Result<(), ApiError> {
    session(&request.session)?;
    name("lease", &request.lease, MAX_ID)
}

/// `POST /v1/unloaded`.
pub fn unloaded(request: &wire::Unloaded) -> Result<(), ApiError> {
    session(&request.session)?;
    name("model", &request.model, MAX_MODEL_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session_request(json: serde_json::Value) -> wire::CreateSession {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn oversized_names_and_lists_are_refused_naming_the_field() {
        let long = "x".repeat(64);
        let error = create_session(&session_request(
            serde_json::json!({"pid": 1, "models": ["a", long]}),
        ))
        .unwrap_err();
        assert_eq!(error.extra["field"], "models[1]");
        assert!(
            error.message.contains("64 bytes, over the limit of 63"),
            "{}",
            error.message
        );

        let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
        let error = create_session(&session_request(
            serde_json::json!({"pid": 1, "models": many}),
        ))
        .unwrap_err();
        assert!(error.message.contains("65 entries"), "{}", error.message);

        let error = create_session(&session_request(serde_json::json!({
            "pid": 1, "holds": [{"model": "a"}, {"model": "a"}]
        })))
        .unwrap_err();
        assert!(error.message.contains("twice"), "{}", error.message);

        let error = session(&"s".repeat(65)).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        create_session(&session_request(
            serde_json::json!({"pid": 1, "app": "a".repeat(256), "models": ["a"]}),
        ))
        .unwrap();
    }

    #[test]
    fn a_long_load_error_is_cut_on_a_char_boundary() {
        let mut request: wire::Loaded = serde_json::from_value(serde_json::json!({
            "session": "s-1", "lease": "l-1", "ok": false, "error": "é".repeat(2000)
        }))
        .unwrap();
        loaded(&mut request).unwrap();
        let error = request.error.unwrap();
        assert!(error.len() <= MAX_LOAD_ERROR + 32, "{}", error.len());
        assert!(error.ends_with("[cut at 1024 bytes]"));
    }
}
