//! The `Http` driver: the sidecar itself calls the app's model API,
//! `POST {url}/models/{name}/load` and `POST {url}/models/{name}/unload`, and reads the JSON
//! result `{"vram_bytes": …, "ram_bytes": …}` (both optional) of a load.
//!
//! Plain `http://` only (the app is in the same pod, on loopback); `https://` is refused when
//! the pool is loaded.

use std::time::{Duration, Instant};

use futures::{FutureExt, future::BoxFuture};
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use modelpool_policy::{SessionId, UnloadReason};
use serde::Deserialize;

use super::{Driver, DriverError, LoadOutcome, UnloadOutcome};
use crate::measure::Sizes;

/// The `Http` driver.
#[derive(Debug, Clone)]
pub struct HttpDriver {
    origin: String,
    authority: String,
    path_prefix: String,
    timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
struct LoadResult {
    #[serde(default)]
    vram_bytes: Option<u64>,
    #[serde(default)]
    ram_bytes: Option<u64>,
}

impl HttpDriver {
    /// A driver for the app at `url` (`http://host:port[/prefix]`).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, DriverError> {
        let bad = |reason: &str| DriverError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = if url.starts_with("https://") {
            return Err(bad(
                "https is not supported: the app is in the same pod, use http://127.0.0.1:PORT",
            ));
        } else {
            url.strip_prefix("http://")
                .ok_or_else(|| bad("must start with http://"))?
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("has no host"));
        }
        let origin = format!("http://{authority}");
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            origin,
            authority,
            path_prefix: path.to_owned(),
            timeout,
        })
    }

    async fn post(&self, path: String) -> Result<Bytes, DriverError> {
        let url = format!("{}{path}", self.origin);
        let call = |reason: String| DriverError::Call {
            url: url.clone(),
            reason,
        };
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| call(e.to_string()))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| call(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "driver connection ended");
                }
            });
            let request = Request::post(&path)
                .header(hyper::header::HOST, &self.authority)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .map_err(|e| call(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| call(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| call(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                return Err(DriverError::Status {
                    url: url.clone(),
                    status: status.as_u16(),
                    body: text.chars().take(500).collect(),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| call(format!("no answer within {:?}", self.timeout)))?
    }

    fn model_path(&self, model: &str, verb: &str) -> String {
        format!("{}/models/{model}/{verb}", self.path_prefix)
    }
}

impl Driver for HttpDriver {
    fn kind(&self) -> &'static str {
        "Http"
    }

    fn load(
        &self,
        _holder: SessionId,
        model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>> {
        let this = self.clone();
        let path = self.model_path(model, "load");
        async move {
            let started = Instant::now();
            let body = this.post(path).await?;
            let result: LoadResult = serde_json::from_slice(&body).unwrap_or_default();
            let reported = Sizes {
                vram: result.vram_bytes,
                ram: result.ram_bytes,
            };
            Ok(LoadOutcome::Loaded {
                reported,
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
        let this = self.clone();
        let path = self.model_path(model, "unload");
        async move {
            this.post(path).await?;
            Ok(UnloadOutcome::Done)
        }
        .boxed()
    }

    fn loads_itself(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let d = HttpDriver::new("http://127.0.0.1:8000", Duration::from_secs(1)).unwrap();
        assert_eq!(d.authority, "127.0.0.1:8000");
        assert_eq!(d.model_path("t2v", "load"), "/models/t2v/load");
        let d = HttpDriver::new("http://app/api/", Duration::from_secs(1)).unwrap();
        assert_eq!(d.authority, "app:80");
        assert_eq!(d.model_path("t2v", "unload"), "/api/models/t2v/unload");
        assert!(HttpDriver::new("https://x", Duration::from_secs(1)).is_err());
        assert!(HttpDriver::new("ftp://x", Duration::from_secs(1)).is_err());
    }
}
