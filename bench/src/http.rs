//! HTTP/1.1 over a Unix socket or loopback TCP, both ways: a keep-alive client for the sidecar
//! API (hyper's connection API, so that the client costs the same against the sidecar and the
//! baseline), and the baseline itself: a bare hyper server answering a fixed reply.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response,
    body::{Bytes, Incoming},
    client::conn::http1::SendRequest,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl Target {
    /// `unix` or `tcp`.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Unix(_) => "unix",
            Self::Tcp(_) => "tcp",
        }
    }
}

/// One keep-alive connection; one request at a time.
pub struct Client {
    target: Target,
    sender: SendRequest<Full<Bytes>>,
}

async fn handshake(target: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let sender = match target {
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("failed to connect to {}", path.display()))?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("failed to connect to {addr}"))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    Ok(sender)
}

impl Client {
    /// Connects.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        Ok(Self {
            sender: handshake(target).await?,
            target: target.clone(),
        })
    }

    /// Sends a request and reads the whole response: status and body bytes. Reconnects once
    /// when the server closed the connection.
    pub async fn raw(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        if self.sender.ready().await.is_err() || self.sender.is_closed() {
            self.sender = handshake(&self.target).await?;
        }
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(body.unwrap_or_default()))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path} failed"))?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// A JSON request; the response body as JSON (`Null` when empty or not JSON).
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let (status, bytes) = self.raw(method, path, body).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// A JSON request that must answer 2xx.
    pub async fn ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.json(method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(value)
    }
}

/// Waits until a connection to `target` succeeds.
pub async fn wait_connectable(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match Client::connect(target).await {
            Ok(_) => return Ok(()),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The baseline: a bare hyper HTTP/1.1 server that reads each request's body and answers
/// `reply` (200, `application/json`). Runs until the process ends; prints `ready` once bound.
pub async fn serve_fixed(target: &Target, reply: Bytes) -> anyhow::Result<()> {
    let serve = move |reply: Bytes| {
        service_fn(move |request: Request<Incoming>| {
            let reply = reply.clone();
            async move {
                // Read the body, as the sidecar must, so both sides do the same I/O.
                let _ = request.into_body().collect().await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(reply))
                        .unwrap_or_default(),
                )
            }
        })
    };
    match target {
        Target::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("failed to bind {}", path.display()))?;
            println!("ready");
            loop {
                let (stream, _) = listener.accept().await?;
                let service = serve(reply.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
        Target::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to bind {addr}"))?;
            println!("ready");
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let service = serve(reply.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// A free loopback TCP port (bound then released; fine on a machine of our own).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
