//! A small blocking client for the sidecar API over its Unix socket (or TCP), on hyper's
//! HTTP/1.1 client: used by `modelpool-sidecar status`, the `modelpool-memhog` test app and
//! the integration tests. One request per connection.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("failed to connect to {target}: {source}")]
    Connect {
        /// Socket path or address.
        target: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("failed to {method} {path}: {source}")]
    Io {
        /// Request method.
        method: String,
        /// Request target.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server's answer was not HTTP.
    #[error("malformed response to {method} {path}: {message}")]
    Malformed {
        /// Request method.
        method: String,
        /// Request target.
        path: String,
        /// What was wrong.
        message: String,
    },
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`Null` when it is empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where the sidecar listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (`127.0.0.1:8080`).
    Tcp(String),
}

/// A client for one endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    token: Option<String>,
}

impl Client {
    /// A client for the Unix socket at `path`.
    pub fn unix(path: impl AsRef<Path>) -> Self {
        Self {
            endpoint: Endpoint::Unix(path.as_ref().to_owned()),
            timeout: Duration::from_secs(60),
            token: None,
        }
    }

    /// A client for a TCP address.
    pub fn tcp(addr: impl Into<String>) -> Self {
        Self {
            endpoint: Endpoint::Tcp(addr.into()),
            timeout: Duration::from_secs(60),
            token: None,
        }
    }

    /// Sets how long a whole request may take (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Response, ClientError> {
        self.request("DELETE", path, None)
    }

    /// Any request with raw body bytes (sent as `application/json`).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        };
        // hyper is async: the exchange runs on a current-thread runtime of its own. Outside any
        // runtime (tests, memhog) on the caller's thread; inside one (`status` under
        // `tokio::main`) on a scoped thread, since a runtime cannot block inside another. No
        // extra thread for plain callers also keeps memhog's RSS, which the tests measure,
        // free of thread stacks.
        let body = body.map(<[u8]>::to_vec);
        let blocking = || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io)?;
            runtime.block_on(async {
                tokio::time::timeout(self.timeout, self.exchange(method, path, body))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {:?}", self.timeout),
                        )))
                    })
            })
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return blocking();
        }
        std::thread::scope(|scope| {
            scope
                .spawn(blocking)
                .join()
                .unwrap_or_else(|_| Err(io(std::io::Error::other("the request's thread panicked"))))
        })
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let failed = |error: hyper::Error| {
            if error.is_parse() || error.is_incomplete_message() {
                ClientError::Malformed {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    message: error.to_string(),
                }
            } else {
                ClientError::Io {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    source: std::io::Error::other(error),
                }
            }
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| ClientError::Malformed {
                method: method.to_owned(),
                path: path.to_owned(),
                message: format!("not a valid request: {error}"),
            })?;
        let response = match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        target: socket.display().to_string(),
                        source,
                    })?;
                send(stream, request).await.map_err(failed)?
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|source| ClientError::Connect {
                        target: addr.clone(),
                        source,
                    })?;
                send(stream, request).await.map_err(failed)?
            }
        };
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(failed)?
            .to_bytes()
            .to_vec();
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh HTTP/1.1 connection (hyper's client), which is dropped after it.
async fn send(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "client connection ended");
        }
    });
    sender.send_request(request).await
}
