//! Answers the proxy gives itself, in the client's protocol: errors (OpenAI's
//! `{"error": {"message", "type", "param", "code", ...}}`, Ollama's and KServe's
//! `{"error": "message", ...}`) and the model listings (`/v1/models`, `/api/tags`).

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use serde_json::{Map, Value, json};

use super::detect::Protocol;
use crate::api::http::ApiError;

/// An error the proxy answers itself.
#[derive(Debug, Clone)]
pub struct ProxyError {
    /// HTTP status.
    pub status: StatusCode,
    /// A stable code (`unknown_model`, `queue_full`, ...).
    pub code: &'static str,
    /// For people, with the numbers.
    pub message: String,
    /// Extra fields (a refusal's numbers: model, need, ceiling, holders).
    pub extra: Map<String, Value>,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
}

impl ProxyError {
    /// An error without extra fields.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Adds a field.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The response, in `protocol`'s error shape.
    pub fn into_response(self, protocol: Protocol) -> Response {
        let status = self.status;
        let retry_after = self.retry_after;
        let mut response = json_response(status, &self.into_body(protocol));
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: this connection is done.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// The body, in `protocol`'s error shape.
    pub fn into_body(self, protocol: Protocol) -> Value {
        match protocol {
            Protocol::OpenAi => {
                let kind = match self.status.as_u16() {
                    429 => "rate_limit_error",
                    400..=499 => "invalid_request_error",
                    _ => "server_error",
                };
                let mut error = Map::new();
                error.insert("message".into(), Value::from(self.message));
                error.insert("type".into(), Value::from(kind));
                let param = if self.code == "model_not_found" || self.code == "bad_request" {
                    Value::from("model")
                } else {
                    Value::Null
                };
                error.insert("param".into(), param);
                error.insert("code".into(), Value::from(self.code));
                error.extend(self.extra);
                json!({"error": error})
            }
            Protocol::Ollama | Protocol::KServe => {
                let mut body = Map::new();
                body.insert("error".into(), Value::from(self.message));
                body.insert("code".into(), Value::from(self.code));
                body.extend(self.extra);
                Value::Object(body)
            }
        }
    }
}

/// The body of an error the proxy's listener writes itself (the 503 at its connection cap, the
/// 408 of a late head, a malformed request's 400/431, a 414), in the protocol of the request's
/// path; OpenAI's shape when the path is not known (the request line never arrived whole).
pub fn http_layer_body(error: &ApiError, path: Option<&str>) -> Value {
    let mut reply = ProxyError::new(error.status, error.code, error.message.clone());
    reply.extra = error.extra.clone();
    reply.into_body(Protocol::of_path(path.unwrap_or("/")))
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /v1/models`: the pool's models, in OpenAI's list shape.
pub fn openai_models(models: &[String], owner: &str) -> Response {
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /api/tags`: the pool's models, in Ollama's shape (the fields ModelPool knows; the rest
/// empty).
pub fn ollama_tags(models: &[String]) -> Response {
    let list: Vec<Value> = models
        .iter()
        .map(|m| {
            let name = if m.contains(':') {
                m.clone()
            } else {
                format!("{m}:latest")
            };
            json!({"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}})
        })
        .collect();
    json_response(StatusCode::OK, &json!({"models": list}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response) -> Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn errors_speak_the_clients_protocol() {
        let error = ProxyError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", "full")
            .with("model", json!("m"))
            .retry_after(1);
        let openai = error.clone().into_response(Protocol::OpenAi);
        assert_eq!(openai.status(), 429);
        assert_eq!(openai.headers()[header::RETRY_AFTER], "1");
        let value = body(openai).await;
        assert_eq!(value["error"]["message"], "full");
        assert_eq!(value["error"]["type"], "rate_limit_error");
        assert_eq!(value["error"]["code"], "queue_full");
        assert_eq!(value["error"]["model"], "m");
        let value = body(error.into_response(Protocol::Ollama)).await;
        assert_eq!(value["error"], "full");
        assert_eq!(value["model"], "m");
    }
}
