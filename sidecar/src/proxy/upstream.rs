//! The proxy's connections to the inference server: a pool of its own over hyper's low-level
//! HTTP/1.1 client, each connection driven inside the task of the request using it.
//!
//! hyper-util's pooled client runs every connection in a task of its own and hands each
//! answer's frames to the request's task through a channel: a task wake-up per chunk, and since
//! the proxy's side then sees one chunk at a time, a write to the client per chunk even when the
//! server wrote many together. Here the connection is polled by the request's own future and,
//! once the answer's head is in, by the answer's body before each frame: chunks that arrived
//! together are decoded and handed to the client's connection in one pass (and written
//! together), with no task or cross-task channel between the two sockets.
//!
//! ```text
//!  checkout (idle, not closed, younger than IDLE_TIMEOUT) or connect
//!    └─► send (the connection polled with the request) ─► DrivenBody (polls it before frames)
//!          └─ body ended, connection still open ─► back to the idle list
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::UpstreamBody;

/// An idle connection older than this is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle connections kept.
pub const MAX_IDLE: usize = 256;
/// Largest read buffer of a connection (hyper's default grows to about 400 KiB): a large answer
/// is read in more pieces, and a thousand connections stay within 64 MiB.
pub const MAX_READ_BUFFER: usize = 64 * 1024;

type Conn = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// One connection to the server: the request handle and the connection it drives.
struct Link {
    sender: http1::SendRequest<UpstreamBody>,
    conn: Conn,
    /// The connection future has completed (the connection is closed).
    done: bool,
}

impl Link {
    /// Polls the connection (reads, writes, decodes) unless it is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.conn).poll(cx);
        if polled.is_ready() {
            self.done = true;
        }
        polled
    }

    fn reusable(&self) -> bool {
        !self.done && !self.sender.is_closed()
    }
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting failed.
    #[error("failed to connect to {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    link: Link,
    since: Instant,
}

/// The pool.
pub struct Pool {
    addr: String,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    /// Connections to `addr` (`host:port`).
    pub fn new(addr: String) -> Arc<Self> {
        Arc::new(Self {
            addr,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open, if any.
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Link> {
        loop {
            let Idle { mut link, since } = self.idle().pop()?;
            if since.elapsed() > IDLE_TIMEOUT {
                // Older ones are further down: drop them all.
                self.idle().clear();
                return None;
            }
            // A server that closed the connection while idle: the poll reads its EOF.
            let _ = link.drive(cx);
            if link.reusable() {
                return Some(link);
            }
        }
    }

    fn checkin(&self, link: Link) {
        if !link.reusable() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                link,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Link, UpstreamError> {
        let stream =
            TcpStream::connect(&self.addr)
                .await
                .map_err(|source| UpstreamError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        // Streams are many small writes: without TCP_NODELAY each waits for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_READ_BUFFER)
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Link {
            sender,
            conn,
            done: false,
        })
    }

    /// Sends `request` on an idle connection (or a new one when none is left, or when the idle
    /// one turned out closed before the request went out) and returns the answer, its body
    /// driving the connection.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<DrivenBody>, UpstreamError> {
        loop {
            let pooled = std::future::poll_fn(|cx| Poll::Ready(self.checkout(cx))).await;
            let fresh = pooled.is_none();
            let mut link = match pooled {
                Some(link) => link,
                None => self.connect().await?,
            };
            // Ready for a request (a connection just given back may still be finishing the
            // previous answer's bookkeeping; one closed meanwhile fails here).
            let ready = std::future::poll_fn(|cx| match link.sender.poll_ready(cx) {
                Poll::Pending => match link.drive(cx) {
                    Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) => link.sender.poll_ready(cx),
                    Poll::Pending => Poll::Pending,
                },
                ready => ready,
            })
            .await;
            match ready {
                Ok(()) => {}
                Err(_) if !fresh => continue,
                Err(error) => return Err(error.into()),
            }
            let sent = link.sender.try_send_request(request);
            let mut sent = std::pin::pin!(sent);
            let answer = std::future::poll_fn(|cx| {
                if let Poll::Ready(answer) = sent.as_mut().poll(cx) {
                    return Poll::Ready(answer);
                }
                if link.drive(cx).is_ready() {
                    // Closed: the request's future now holds its error.
                    return sent.as_mut().poll(cx);
                }
                Poll::Pending
            })
            .await;
            match answer {
                Ok(response) => {
                    return Ok(response.map(|incoming| DrivenBody {
                        incoming,
                        link: Some(link),
                        pool: Arc::clone(self),
                    }));
                }
                Err(mut error) => match error.take_message() {
                    // Not sent (the pooled connection closed meanwhile): again on another.
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }
}

/// An answer's body: polls its connection before each frame, and gives the connection back to
/// the pool once the body has ended.
pub struct DrivenBody {
    incoming: Incoming,
    link: Option<Link>,
    pool: Arc<Pool>,
}

impl DrivenBody {
    fn finish(&mut self) {
        if let Some(link) = self.link.take() {
            self.pool.checkin(link);
        }
    }
}

impl HttpBody for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.incoming).poll_frame(cx);
        if polled.is_pending()
            && let Some(link) = this.link.as_mut()
        {
            // The frame may be in the connection's buffer, or on the socket: decode it now.
            let _ = link.drive(cx);
            polled = Pin::new(&mut this.incoming).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.link = None,
            Poll::Ready(Some(Ok(_))) if this.incoming.is_end_stream() => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        if self.incoming.is_end_stream() {
            self.finish();
        }
        // Otherwise the answer was not read whole: the connection closes with it.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server answering `ok` to each request head; it closes a connection after
    /// `per_connection` answers (a server's keep-alive timeout, without saying so).
    async fn server(per_connection: usize) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    while answered < per_connection {
                        let mut chunk = [0u8; 1024];
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            answered += 1;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Arc<Pool>) -> String {
        let request = Request::builder()
            .uri("/x")
            .header("host", "test")
            .body(UpstreamBody::new(Bytes::new(), None, None, None))
            .unwrap();
        let response = pool.send(request).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn connections_are_reused_and_one_closed_while_idle_is_replaced() {
        let (addr, accepted) = server(usize::MAX).await;
        let pool = Pool::new(addr);
        for _ in 0..5 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");

        // A server that closes each connection after its answer: the idle one is found
        // closed at checkout and the request goes on a new one.
        let (addr, accepted) = server(1).await;
        let pool = Pool::new(addr);
        for _ in 0..3 {
            assert_eq!(get(&pool).await, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// An answer far larger than the read buffer arrives whole (in pieces).
    #[tokio::test]
    async fn a_large_answer_passes_the_bounded_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let size = 16 * MAX_READ_BUFFER + 7;
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n").into_bytes();
            answer.extend(std::iter::repeat_n(b'x', size));
            stream.write_all(&answer).await.unwrap();
        });
        let pool = Pool::new(addr);
        assert_eq!(get(&pool).await.len(), size);
    }

    #[tokio::test]
    async fn a_server_that_is_down_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = Pool::new(addr.clone());
        let request = Request::builder()
            .uri("/")
            .body(UpstreamBody::new(Bytes::new(), None, None, None))
            .unwrap();
        let Err(error) = pool.send(request).await else {
            panic!("a request to a closed port was answered");
        };
        assert!(error.to_string().contains(&addr), "{error}");
    }
}
