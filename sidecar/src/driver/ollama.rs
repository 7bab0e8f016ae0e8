//! The `Ollama` driver: Ollama's own API.
//!
//! ```text
//!  load    POST /api/generate {"model", "keep_alive": -1, "stream": false}   done_reason "load"
//!          (no prompt: load only; -1: Ollama's own timer never unloads it behind our back)
//!  unload  POST /api/generate {"model", "keep_alive": 0, "stream": false}    done_reason "unload"
//!          (the runner process exits; Ollama answers 404 for a model it does not know: done)
//!  observe GET /api/ps   {"models": [{"name": "tiny:latest", "size", "size_vram", …}]}
//! ```
//!
//! Names: a pool model `tiny` is Ollama's `tiny:latest`; a tag other than `latest` is part of
//! the name (`llama3:8b`). `size_vram` and `size` are the server's own reading of what a loaded
//! model holds (VRAM, and the rest in RAM): they are reported with each load and adoption.

use std::time::{Duration, Instant};

use futures::{FutureExt, future::BoxFuture};
use modelpool_policy::{SessionId, UnloadReason};
use serde::Deserialize;
use serde_json::json;

use super::{
    Driver, DriverError, LoadOutcome, ServerModel, ServerView, UnloadOutcome, http::Endpoint,
};
use crate::measure::Sizes;

/// The `Ollama` driver.
#[derive(Debug, Clone)]
pub struct OllamaDriver {
    endpoint: Endpoint,
}

#[derive(Debug, Deserialize)]
struct Ps {
    #[serde(default)]
    models: Vec<Running>,
}

#[derive(Debug, Deserialize)]
struct Running {
    name: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    size_vram: Option<u64>,
}

/// The pool's name for an Ollama model name (`tiny:latest` → `tiny`).
fn pool_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// The loaded set from a `/api/ps` answer.
fn parse_ps(url: &str, body: &[u8]) -> Result<ServerView, DriverError> {
    let ps: Ps = serde_json::from_slice(body).map_err(|e| DriverError::Call {
        url: url.to_owned(),
        reason: format!(
            "/api/ps is not {{\"models\": [...]}}: {e}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        ),
    })?;
    let mut view = ServerView::default();
    for running in ps.models {
        let vram = running.size_vram;
        let ram = match (running.size, vram) {
            (Some(size), Some(vram)) => Some(size.saturating_sub(vram)),
            (size, None) => size,
            (None, Some(_)) => None,
        };
        view.models.insert(
            pool_name(&running.name).to_owned(),
            ServerModel {
                loaded: true,
                reason: None,
                reported: Sizes { vram, ram },
            },
        );
    }
    Ok(view)
}

impl OllamaDriver {
    /// A driver for the Ollama server at `url` (`http://host:11434`).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, DriverError> {
        Ok(Self {
            endpoint: Endpoint::new(url, timeout)?,
        })
    }

    async fn ps(endpoint: &Endpoint) -> Result<ServerView, DriverError> {
        let path = "/api/ps";
        let answer = endpoint.send(hyper::Method::GET, path, None).await?;
        if answer.status != 200 {
            return Err(DriverError::Status {
                url: endpoint.url(path),
                status: answer.status,
                body: answer.text(),
            });
        }
        parse_ps(&endpoint.url(path), &answer.body)
    }
}

impl Driver for OllamaDriver {
    fn kind(&self) -> &'static str {
        "Ollama"
    }

    fn load(
        &self,
        _holder: SessionId,
        model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>> {
        let endpoint = self.endpoint.clone();
        let model = model.to_owned();
        async move {
            let started = Instant::now();
            endpoint
                .post_ok(
                    "/api/generate",
                    Some(&json!({"model": model, "keep_alive": -1, "stream": false})),
                )
                .await?;
            let seconds = started.elapsed().as_secs_f64();
            // The server's own reading of what it holds; none if /api/ps fails now.
            let reported = match Self::ps(&endpoint).await {
                Ok(view) => view.models.get(&model).map(|m| m.reported),
                Err(error) => {
                    tracing::debug!(%error, model, "no /api/ps reading after the load");
                    None
                }
            };
            Ok(LoadOutcome::Loaded {
                reported: reported.unwrap_or_default(),
                seconds,
            })
        }
        .boxed()
    }

    fn unload(
        &self,
        _holder: SessionId,
        model: &str,
        _generation: u64,
        _reason: UnloadReason,
    ) -> BoxFuture<'static, Result<UnloadOutcome, DriverError>> {
        let endpoint = self.endpoint.clone();
        let model = model.to_owned();
        async move {
            let body = json!({"model": model, "keep_alive": 0, "stream": false});
            endpoint.post_unload("/api/generate", Some(&body)).await
        }
        .boxed()
    }

    fn loads_itself(&self) -> bool {
        true
    }

    fn observes(&self) -> bool {
        true
    }

    fn observe(&self) -> Option<BoxFuture<'static, Result<ServerView, DriverError>>> {
        let endpoint = self.endpoint.clone();
        Some(async move { Self::ps(&endpoint).await }.boxed())
    }

    fn server_port(&self) -> Option<u16> {
        self.endpoint.port()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_names_and_sizes() {
        let body = br#"{"models":[
            {"name":"tiny:latest","model":"tiny:latest","size":6291456,"size_vram":0,"expires_at":"2318-01-01T00:00:00Z"},
            {"name":"llama3:8b","size":6000,"size_vram":4000},
            {"name":"old","size":10}]}"#;
        let view = parse_ps("u", body).unwrap();
        assert!(view.loaded("tiny"));
        assert_eq!(
            view.models["tiny"].reported,
            Sizes {
                vram: Some(0),
                ram: Some(6291456)
            }
        );
        assert_eq!(
            view.models["llama3:8b"].reported,
            Sizes {
                vram: Some(4000),
                ram: Some(2000)
            }
        );
        assert_eq!(
            view.models["old"].reported,
            Sizes {
                vram: None,
                ram: Some(10)
            }
        );
        assert!(
            parse_ps("u", br#"{"models":[]}"#)
                .unwrap()
                .models
                .is_empty()
        );
        assert!(parse_ps("u", br#"{"models": 3}"#).is_err());
    }
}
