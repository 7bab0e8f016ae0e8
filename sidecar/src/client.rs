//! A small blocking HTTP/1.1 client for the sidecar API over its Unix socket (or TCP): used by
//! `modelpool-sidecar status`, the `modelpool-memhog` test app and the integration tests.
//! One request per connection (`Connection: close`), so a response ends at EOF.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

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

    /// Sets the read/write timeout (default 60 s).
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

    /// Any request with raw body bytes.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let extra = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        self.raw(method, path, &extra, body)
    }

    /// A request with extra header lines (each ending in `\r\n`).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        extra_headers: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n{extra_headers}"
        );
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        } else if method != "GET" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());

        let raw = match &self.endpoint {
            Endpoint::Unix(socket) => {
                let mut stream =
                    UnixStream::connect(socket).map_err(|source| ClientError::Connect {
                        target: socket.display().to_string(),
                        source,
                    })?;
                stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
                stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
                exchange(&mut stream, &request).map_err(io)?
            }
            Endpoint::Tcp(addr) => {
                let mut stream =
                    TcpStream::connect(addr).map_err(|source| ClientError::Connect {
                        target: addr.clone(),
                        source,
                    })?;
                stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
                stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
                exchange(&mut stream, &request).map_err(io)?
            }
        };
        parse_response(&raw).map_err(|message| ClientError::Malformed {
            method: method.to_owned(),
            path: path.to_owned(),
            message,
        })
    }
}

fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        // The server may reset after answering a request it refused to read (413).
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => {
            Ok(raw)
        }
        Err(error) => Err(error),
    }
}

/// Parses a full HTTP/1.1 response (status line, headers, body by length, chunks or EOF).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..length)
            .ok_or_else(|| format!("body shorter than content-length {length}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "{}"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "abcde"));
    }
}
