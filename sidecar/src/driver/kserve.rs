//! The `KServeV2` driver: the model-repository extension of the KServe v2 / Triton protocol,
//! served by Triton, MLServer and KServe's model servers.
//!
//! ```text
//!  load    POST /v2/repository/models/{name}/load     200 once loaded (Triton, MLServer)
//!  unload  POST /v2/repository/models/{name}/unload   200; 404 (not known) counts as done
//!  observe POST /v2/repository/index  {}              [{"name","version"?,"state","reason"?}]
//!                                                      state READY = loaded (any version)
//! ```
//!
//! The index needs `content-type: application/json` (MLServer answers 422 without it). The
//! servers report no sizes: the model's declared footprint is what it holds, and unloads are
//! proven on the server's process tree.

use std::time::{Duration, Instant};

use futures::{FutureExt, future::BoxFuture};
use modelpool_policy::{SessionId, UnloadReason};
use serde::Deserialize;
use serde_json::json;

use super::{
    Driver, DriverError, LoadOutcome, ServerModel, ServerView, UnloadOutcome, http::Endpoint,
};
use crate::measure::Sizes;

/// The `KServeV2` driver.
#[derive(Debug, Clone)]
pub struct KServeDriver {
    endpoint: Endpoint,
}

#[derive(Debug, Deserialize)]
struct IndexEntry {
    name: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    reason: Option<String>,
}

impl KServeDriver {
    /// A driver for the server at `url` (`http://host:port`).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, DriverError> {
        Ok(Self {
            endpoint: Endpoint::new(url, timeout)?,
        })
    }

    fn path(model: &str, verb: &str) -> String {
        format!("/v2/repository/models/{model}/{verb}")
    }
}

/// The loaded set from an index answer.
fn parse_index(url: &str, body: &[u8]) -> Result<ServerView, DriverError> {
    let entries: Vec<IndexEntry> = serde_json::from_slice(body).map_err(|e| DriverError::Call {
        url: url.to_owned(),
        reason: format!(
            "the repository index is not a list of {{name, state}}: {e}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        ),
    })?;
    let mut view = ServerView::default();
    for entry in entries {
        let loaded = entry.state.eq_ignore_ascii_case("READY");
        let reason = match entry.reason.as_deref().filter(|r| !r.is_empty()) {
            Some(reason) => format!("{}: {reason}", entry.state),
            None => entry.state.clone(),
        };
        let model = view.models.entry(entry.name).or_insert(ServerModel {
            loaded: false,
            reason: None,
            reported: Sizes::default(),
        });
        // Several versions of one model: loaded when any version is.
        model.loaded |= loaded;
        if !model.loaded {
            model.reason = Some(reason);
        } else {
            model.reason = None;
        }
    }
    Ok(view)
}

impl Driver for KServeDriver {
    fn kind(&self) -> &'static str {
        "KServeV2"
    }

    fn load(
        &self,
        _holder: SessionId,
        model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>> {
        let endpoint = self.endpoint.clone();
        let path = Self::path(model, "load");
        async move {
            let started = Instant::now();
            endpoint.post_ok(&path, Some(&json!({}))).await?;
            Ok(LoadOutcome::Loaded {
                reported: Sizes::default(),
                seconds: started.elapsed().as_secs_f64(),
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
        let path = Self::path(model, "unload");
        async move { endpoint.post_unload(&path, Some(&json!({}))).await }.boxed()
    }

    fn loads_itself(&self) -> bool {
        true
    }

    fn observes(&self) -> bool {
        true
    }

    fn observe(&self) -> Option<BoxFuture<'static, Result<ServerView, DriverError>>> {
        let endpoint = self.endpoint.clone();
        Some(
            async move {
                let path = "/v2/repository/index";
                let body = endpoint.post_ok(path, Some(&json!({}))).await?;
                parse_index(&endpoint.url(path), &body)
            }
            .boxed(),
        )
    }

    fn server_port(&self) -> Option<u16> {
        self.endpoint.port()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_of_mlserver_and_triton() {
        let body = br#"[{"name":"a","state":"READY","reason":""},
            {"name":"b","state":"UNAVAILABLE","reason":"unloaded"},
            {"name":"c","version":"1","state":"UNAVAILABLE"},
            {"name":"c","version":"2","state":"READY"}]"#;
        let view = parse_index("u", body).unwrap();
        assert!(view.loaded("a"));
        assert!(!view.loaded("b"));
        assert_eq!(
            view.models["b"].reason.as_deref(),
            Some("UNAVAILABLE: unloaded")
        );
        assert!(view.loaded("c"), "any version READY");
        assert!(!view.loaded("d"));
        let error = parse_index("http://x/v2/repository/index", b"{\"detail\":1}").unwrap_err();
        assert!(error.to_string().contains("not a list"), "{error}");
    }
}
