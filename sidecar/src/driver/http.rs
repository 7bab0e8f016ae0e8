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

/// A plain-HTTP endpoint on loopback (or in the pod): what every driver that calls the app's
/// API talks to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    origin: String,
    authority: String,
    path_prefix: String,
    timeout: Duration,
}

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as text, cut to 500 characters (for error messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(500)
            .collect()
    }
}

impl Endpoint {
    /// An endpoint for `url` (`http://host:port[/prefix]`).
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

    /// The port the endpoint is on.
    pub fn port(&self) -> Option<u16> {
        self.authority.rsplit(':').next()?.parse().ok()
    }

    /// `prefix + path`, for messages.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}{path}", self.origin, self.path_prefix)
    }

    /// One request (`path` under the URL's prefix) with a JSON body (`None`: no body), within
    /// the timeout; any status is an answer.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, DriverError> {
        let path = format!("{}{path}", self.path_prefix);
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
            let mut request = Request::builder()
                .method(method)
                .uri(&path)
                .header(hyper::header::HOST, &self.authority);
            let bytes = match body {
                Some(body) => {
                    request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                    Bytes::from(body.to_string())
                }
                None => Bytes::new(),
            };
            let request = request
                .body(Full::new(bytes))
                .map_err(|e| call(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| call(e.to_string()))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| call(e.to_string()))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| call(format!("no answer within {:?}", self.timeout)))?
    }

    /// A POST whose answer must be a success.
    pub async fn post_ok(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, DriverError> {
        let answer = self.send(hyper::Method::POST, path, body).await?;
        if !(200..300).contains(&answer.status) {
            return Err(DriverError::Status {
                url: self.url(path),
                status: answer.status,
                body: answer.text(),
            });
        }
        Ok(answer.body)
    }

    /// `POST path` for an unload: a 2xx, or a 404 (the server no longer has the model), means
    /// it is gone.
    pub async fn post_unload(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<UnloadOutcome, DriverError> {
        let answer = self.send(hyper::Method::POST, path, body).await?;
        match answer.status {
            200..=299 | 404 => Ok(UnloadOutcome::Done),
            status => Err(DriverError::Status {
                url: self.url(path),
                status,
                body: answer.text(),
            }),
        }
    }
}

/// The `Http` driver.
#[derive(Debug, Clone)]
pub struct HttpDriver {
    endpoint: Endpoint,
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
        Ok(Self {
            endpoint: Endpoint::new(url, timeout)?,
        })
    }

    async fn post(&self, path: String) -> Result<Bytes, DriverError> {
        self.endpoint
            .post_ok(&path, Some(&serde_json::json!({})))
            .await
    }

    fn model_path(&self, model: &str, verb: &str) -> String {
        format!("/models/{model}/{verb}")
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
        assert_eq!(d.endpoint.authority, "127.0.0.1:8000");
        assert_eq!(d.endpoint.port(), Some(8000));
        assert_eq!(
            d.endpoint.url(&d.model_path("t2v", "load")),
            "http://127.0.0.1:8000/models/t2v/load"
        );
        let d = HttpDriver::new("http://app/api/", Duration::from_secs(1)).unwrap();
        assert_eq!(d.endpoint.authority, "app:80");
        assert_eq!(
            d.endpoint.url(&d.model_path("t2v", "unload")),
            "http://app/api/models/t2v/unload"
        );
        assert!(HttpDriver::new("https://x", Duration::from_secs(1)).is_err());
        assert!(HttpDriver::new("ftp://x", Duration::from_secs(1)).is_err());
    }
}
