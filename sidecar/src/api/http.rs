//! HTTP plumbing of the API: the error body every failure uses, the JSON body extractor
//! (64 KiB limit → 413, malformed JSON or a wrong field → 400 naming the field), query parsing,
//! bearer-token auth for TCP, and binding the Unix socket and TCP listeners (served by `listen`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use axum::{
    Json, Router,
    extract::{FromRequest, Request},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// How long a body may take to arrive when the listener set no limit (`--body-timeout`).
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An API error: status, a stable code and a sentence with the numbers.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `bad_request`, `unknown_model`, ...
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Extra fields of the body (a refusal's numbers).
    pub extra: Map<String, Value>,
}

impl ApiError {
    /// An error with no extra fields.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `unknown_session`.
    pub fn unknown_session(session: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!(
                "session {session:?} is not open (closed, timed out after missed heartbeats, or never created): open a new one with POST /v1/sessions"
            ),
        )
    }

    /// 404 `unknown_lease`.
    pub fn unknown_lease(lease: &str, session: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_lease",
            format!("lease {lease:?} is not a live lease of session {session:?}"),
        )
    }

    /// 413 `too_large`.
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over the limit of {BODY_LIMIT} bytes (64 KiB)"),
        )
    }

    /// 408 `request_timeout`: the body did not arrive in time.
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms (--body-timeout)",
                timeout.as_millis()
            ),
        )
    }

    /// 503 `shutting_down`.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the sidecar is shutting down and admits no new sessions or loads",
        )
    }

    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// Adds every field of a typed struct (one of `wire`'s) to the body.
    pub fn with_fields(mut self, fields: &impl serde::Serialize) -> Self {
        if let Ok(Value::Object(map)) = serde_json::to_value(fields) {
            self.extra.extend(map);
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::from(self.code));
        body.insert("message".into(), Value::from(self.message));
        body.extend(self.extra);
        let mut response = (self.status, Json(Value::Object(body))).into_response();
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: this connection is done.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

/// A JSON body, parsed with errors that name the field. An empty body reads as `{}`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let timeout = req
            .extensions()
            .get::<super::listen::BodyTimeout>()
            .map_or(DEFAULT_BODY_TIMEOUT, |t| t.0);
        // The limit is applied here rather than by axum's `DefaultBodyLimit` layer: a layer on
        // the router costs every request a boxed service and a request extension.
        let limited = http_body_util::Limited::new(req.into_body(), BODY_LIMIT);
        let read = tokio::time::timeout(timeout, http_body_util::BodyExt::collect(limited))
            .await
            .map_err(|_| ApiError::body_timeout(timeout))?;
        let bytes = read
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    ApiError::too_large()
                } else {
                    ApiError::bad_request(format!("failed to read the request body: {error}"))
                }
            })?
            .to_bytes();
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body; errors name the field (`field "pid": invalid type ...`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    // The plain parser first; only a body that fails is parsed again to name the field
    // (tracking the path costs every request about a fifth of its parsing).
    if let Ok(value) = serde_json::from_slice(text) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("{what}: {inner}"))
        } else {
            ApiError::bad_request(format!("{what}: field {path:?}: {inner}"))
                .with("field", Value::from(path))
        }
    })?;
    deserializer
        .end()
        .map_err(|error| ApiError::bad_request(format!("malformed JSON: {error}")))?;
    Ok(value)
}

/// A query string's `name=value` pairs (percent-decoding is not needed for our numeric fields).
pub fn query_u64(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return value.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "query parameter {name:?} must be a non-negative integer, got {value:?}"
                ))
                .with("field", Value::from(name))
            });
        }
    }
    Ok(None)
}

/// 404 for paths the API does not have.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such endpoint: {} {} (the API is under /v1; see sidecar/api/openapi.yaml)",
            req.method(),
            req.uri().path()
        ),
    )
}

/// 405 for a known path with the wrong method.
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Requires `Authorization: Bearer <token>` (TCP listener with `--api-token`).
pub async fn require_token(
    token: String,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong Authorization: Bearer <token> (set by --api-token)",
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The socket's directory could not be created.
    #[error("failed to create socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The socket's (or its new directory's) mode or group could not be set.
    #[error(
        "failed to give {path} mode {mode:o}{}: {source} (the sidecar must belong to the group: the webhook adds it to the pod's supplementalGroups)",
        group.map(|g| format!(" and group {g}")).unwrap_or_default()
    )]
    SocketMode {
        /// The socket or directory.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The group asked for.
        group: Option<u32>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another sidecar answers on the socket.
    #[error("socket {0} is in use by a running sidecar; stop it or choose another --socket")]
    SocketInUse(PathBuf),
    /// Binding failed.
    #[error("failed to listen on {what}: {source}")]
    Bind {
        /// Socket path or address.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Mode of the API socket: owner and group may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory the sidecar creates: owner and group only.
pub const SOCKET_DIR_MODE: u32 = 0o770;

/// Binds the Unix socket, removing a stale socket file left by a previous run. The socket
/// gets mode 0660 and, with `group`, that group (the pod's shared supplemental group), so the
/// pod's other containers reach it and nobody else does; a directory the sidecar has to create
/// for it gets 0770 and the same group. Before the mode is set, the umask's mode (0755 at most)
/// applies, which lets no one else connect: there is no window where the socket is open wider.
pub fn bind_unix(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, ListenError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::SocketDir {
            path: dir.to_owned(),
            source,
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SOCKET_DIR_MODE))
            .and_then(|()| std::os::unix::fs::chown(dir, None, group))
            .map_err(|source| ListenError::SocketMode {
                path: dir.to_owned(),
                mode: SOCKET_DIR_MODE,
                group,
                source,
            })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::SocketInUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| ListenError::Bind {
        what: path.display().to_string(),
        source,
    })?;
    std::os::unix::fs::chown(path, None, group)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)))
        .map_err(|source| ListenError::SocketMode {
            path: path.to_owned(),
            mode: SOCKET_MODE,
            group,
            source,
        })?;
    Ok(listener)
}

/// Binds a TCP address.
pub async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind {
            what: addr.to_string(),
            source,
        })
}

/// Adds the token check to a router.
pub fn with_token(router: Router, token: Option<String>) -> Router {
    match token {
        Some(token) => router.layer(axum::middleware::from_fn(move |headers, req, next| {
            require_token(token.clone(), headers, req, next)
        })),
        None => router,
    }
}

/// The JSON `{}`.
pub fn empty() -> Json<super::wire::Empty> {
    Json(super::wire::Empty {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        session: String,
        pid: u32,
    }

    #[test]
    fn errors_name_the_field() {
        let missing = parse_json::<Sample>(br#"{"pid": 1}"#).unwrap_err();
        assert!(missing.message.contains("session"), "{}", missing.message);
        let wrong = parse_json::<Sample>(br#"{"session": "s", "pid": "x"}"#).unwrap_err();
        assert!(wrong.message.contains("\"pid\""), "{}", wrong.message);
        let malformed = parse_json::<Sample>(b"{\"session\": ").unwrap_err();
        assert!(
            malformed.message.starts_with("malformed JSON"),
            "{}",
            malformed.message
        );
        let trailing = parse_json::<Sample>(br#"{"session": "s", "pid": 1} x"#).unwrap_err();
        assert!(trailing.message.starts_with("malformed JSON"));
    }

    #[test]
    fn query_numbers() {
        assert_eq!(
            query_u64(Some("a=1&wait_ms=20"), "wait_ms").unwrap(),
            Some(20)
        );
        assert_eq!(query_u64(None, "wait_ms").unwrap(), None);
        assert!(query_u64(Some("wait_ms=-1"), "wait_ms").is_err());
    }
}
