//! The bodies the proxy forwards, both streamed frame by frame (never collected):
//! - [`UpstreamBody`]: a request body going upstream: the bytes read to find the model name,
//!   then the rest as it arrives, cut off with an error past the body limit;
//! - [`LeasedBody`]: the upstream's answer going to the client, holding the request's
//!   [`LeaseGuard`] until its last frame, an upstream error, or its drop (the client went away).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Body;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use super::{
    detect::{ModelScan, Scan},
    metrics::{Outcome, ProxyMetrics},
    upstream::DrivenBody,
};
use crate::shell::Shared;

/// A body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was over the limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is over the proxy's limit of {0} bytes")]
pub struct OverLimit(pub u64);

/// The body named its model twice.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NamedTwice(pub String);

/// Why a request body was cut off on its way upstream.
#[derive(Debug, Default)]
pub struct CutOff {
    /// Over the limit (answer 413).
    pub over: AtomicBool,
    /// A second `"model"` key (answer 400).
    pub twice: AtomicBool,
    /// No progress within the idle timeout (answer 408).
    pub slow: AtomicBool,
}

/// The request body made no progress in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body made no progress for {} ms", .0.as_millis())]
pub struct TooSlow(pub Duration);

/// A request body going upstream.
pub struct UpstreamBody {
    prefix: Option<Bytes>,
    rest: Option<Body>,
    sent: u64,
    limit: Option<u64>,
    /// The scan that found the model, kept on the rest of the body for a second `"model"`.
    scan: Option<ModelScan>,
    cut: Arc<CutOff>,
    /// Longest wait for the next part of the body, and its timer (armed while waiting).
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    rearm: bool,
}

impl UpstreamBody {
    /// `prefix` (already read), then what `rest` still brings; at most `limit` bytes in all;
    /// `scan` (if any) watches the rest for a second model key.
    pub fn new(
        prefix: Bytes,
        rest: Option<Body>,
        limit: Option<u64>,
        scan: Option<ModelScan>,
    ) -> Self {
        Self {
            sent: 0,
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
            limit,
            scan,
            cut: Arc::new(CutOff::default()),
            idle: None,
            timer: None,
            rearm: false,
        }
    }

    /// Cuts the body off (an error upstream) when the client sends nothing of it for `idle`.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Why the body was cut off, once it was (the upstream call then fails).
    pub fn cut_off(&self) -> Arc<CutOff> {
        Arc::clone(&self.cut)
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            this.sent += prefix.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // The wait for the next part starts when it is asked for.
                this.rearm = true;
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                    if let Some(limit) = this.limit
                        && this.sent > limit
                    {
                        this.cut.over.store(true, Ordering::Relaxed);
                        this.rest = None;
                        return Poll::Ready(Some(Err(Box::new(OverLimit(limit)))));
                    }
                    if let Some(scan) = this.scan.as_mut()
                        && let Scan::Invalid(why) = scan.feed(data)
                    {
                        this.cut.twice.store(true, Ordering::Relaxed);
                        this.rest = None;
                        return Poll::Ready(Some(Err(Box::new(NamedTwice(why)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => {
                this.rest = None;
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = this.idle else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if std::mem::take(&mut this.rearm) {
                    timer.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.cut.slow.store(true, Ordering::Relaxed);
                    this.rest = None;
                    this.timer = None;
                    return Poll::Ready(Some(Err(Box::new(TooSlow(idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint);
        let mut hint = SizeHint::new();
        // Upper first: SizeHint refuses a lower bound above its upper one.
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(rest.lower() + prefix);
        hint
    }
}

/// A request's lease (and its per-model permit): released when dropped, counted with the
/// request's outcome.
pub struct LeaseGuard {
    /// The sidecar.
    pub shared: Arc<Shared>,
    /// The proxy's session.
    pub session: String,
    /// The lease.
    pub lease: String,
    /// The model.
    pub model: String,
    /// The metrics.
    pub metrics: ProxyMetrics,
    /// The per-model concurrency permit, if limited.
    pub permit: Option<OwnedSemaphorePermit>,
    /// How it ended (unset: the client went away).
    pub outcome: Option<Outcome>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::ClientGone);
        if let Err(error) = self.shared.release(&self.session, &self.lease) {
            // The session ended (shutdown): its leases went with it.
            tracing::debug!(%error, lease = self.lease, model = self.model, "proxy lease already gone");
        }
        self.metrics.in_flight.dec();
        self.metrics.count(&self.model, outcome);
        tracing::debug!(
            model = self.model,
            lease = self.lease,
            outcome = outcome.as_str(),
            "proxied request ended: lease released"
        );
        self.permit.take();
    }
}

/// The upstream's answer, holding the request's lease until it ends.
pub struct LeasedBody {
    inner: DrivenBody,
    guard: Option<LeaseGuard>,
}

impl LeasedBody {
    /// `inner`, releasing `guard` when it ends.
    pub fn new(inner: DrivenBody, guard: LeaseGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(mut guard) = self.guard.take() {
            guard.outcome = Some(outcome);
        }
    }
}

impl HttpBody for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(Outcome::Ok),
            Poll::Ready(Some(Err(_))) => this.finish(Outcome::UpstreamError),
            // hyper stops polling once the body says it ended.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(Outcome::Ok),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.finish(Outcome::Ok);
        }
        // Otherwise the guard drops unset: the client went away mid-answer.
    }
}
