//! Acquire, loaded, release and unloaded through the shell: a waiting acquire holds a guard
//! that withdraws it (or hands back a lease granted too late) when its client goes away, and
//! a load the pool's driver performs runs outside the core's lock.

use std::{sync::Arc, time::Instant};

use modelpool_policy::{Action, RequestId, SessionId, human_bytes};
use tokio::sync::oneshot;

use super::{AcquireAnswer, Shared};
use crate::{
    api::wire,
    decide::{Effects, First, LookupError, Verdict, lease_name, parse_id, session_name},
    driver::LoadOutcome,
};

impl Shared {
    /// `POST /v1/acquire`.
    pub async fn acquire(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        wait: bool,
    ) -> Result<AcquireAnswer, LookupError> {
        let started = Instant::now();
        if let Some(reason) = self.server_down() {
            // Resolves the session first, so that an unknown one is still a 404.
            self.lock().session_id(session)?;
            return Ok(AcquireAnswer::LoadFailed {
                message: format!(
                    "the model server does not answer ({reason}): model {model:?} cannot be served until it does"
                ),
            });
        }
        let (sender, receiver) = oneshot::channel();
        let now = self.now();
        let mut fx = Effects::default();
        let first = self
            .lock()
            .acquire(now, session, model, wait, sender, &mut fx);
        self.run(fx);
        let request = match first? {
            First::Now(verdict) => return self.answer(session, model, verdict, started).await,
            First::Wait(message) => return Ok(AcquireAnswer::Wait { message }),
            First::Queued(request) => request,
        };
        self.metrics.acquire_queue.inc();
        let guard = WaitGuard {
            shared: Arc::clone(self),
            request,
            receiver: Some(receiver),
        };
        let verdict = guard.wait().await;
        self.metrics.acquire_queue.dec();
        match verdict {
            Some(verdict) => self.answer(session, model, verdict, started).await,
            // The session ended while waiting.
            None => Err(LookupError::Session(session.to_owned())),
        }
    }

    pub(super) async fn answer(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        verdict: Verdict,
        started: Instant,
    ) -> Result<AcquireAnswer, LookupError> {
        self.metrics
            .acquire_wait
            .observe(started.elapsed().as_secs_f64());
        match verdict {
            Verdict::Refused(refusal) => Ok(AcquireAnswer::Refused(refusal)),
            Verdict::Granted {
                lease,
                action: Action::Load,
                holder,
                generation,
            } if self.driver.loads_itself() => {
                // The driver's load runs in a task of its own: a caller that goes away mid-load
                // (a proxied client that disconnected, an API client whose connection closed)
                // must not leave the instance loading for ever. Its lease is handed back.
                let (sender, receiver) = oneshot::channel();
                let this = Arc::clone(self);
                let (session, model) = (session.to_owned(), model.to_owned());
                tokio::spawn(async move {
                    let answer = this
                        .load_by_driver(&session, &model, lease, holder, generation)
                        .await;
                    if let Err(AcquireAnswer::Granted { lease, .. }) = sender.send(answer) {
                        tracing::info!(model, session, lease = %lease_name(lease), "the client went away during the load: its lease is released");
                        let _ = this.release(&session, &lease_name(lease));
                    }
                });
                Ok(receiver
                    .await
                    .unwrap_or_else(|_| AcquireAnswer::LoadFailed {
                        message: "the load task ended without an answer".to_owned(),
                    }))
            }
            Verdict::Granted {
                lease,
                action,
                generation,
                ..
            } => {
                if action == Action::Load {
                    // The level the app's load adds to: read now, before it starts loading.
                    if let Some(before) = self.read_session(session) {
                        self.baselines
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((session.to_owned(), lease), before.sizes());
                    }
                    tracing::info!(
                        model,
                        session,
                        "Memory before load of {model}: {}",
                        self.memory_line()
                    );
                }
                Ok(AcquireAnswer::Granted {
                    action,
                    lease,
                    generation,
                    load_seconds: None,
                })
            }
        }
    }

    /// The load of a granted instance by the driver (server drivers, `Http`), recorded in the
    /// core whatever its outcome.
    pub(super) async fn load_by_driver(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        lease: modelpool_policy::LeaseId,
        holder: SessionId,
        generation: u64,
    ) -> AcquireAnswer {
        tracing::info!(
            model,
            "Memory before load of {model}: {}",
            self.memory_line()
        );
        let _io = self.server_io.read().await;
        match self.driver.load(holder, model).await {
            Ok(LoadOutcome::Loaded { reported, seconds }) => {
                let now = self.now();
                let mut fx = Effects::default();
                self.lock()
                    .driver_loaded(now, holder, model, generation, reported, seconds, &mut fx);
                self.run(fx);
                tracing::info!(
                    model,
                    seconds,
                    "Memory after load of {model}: {}",
                    self.memory_line()
                );
                AcquireAnswer::Granted {
                    action: Action::Use,
                    lease,
                    generation,
                    load_seconds: Some(seconds),
                }
            }
            Ok(LoadOutcome::AppLoads) => AcquireAnswer::Granted {
                action: Action::Load,
                lease,
                generation,
                load_seconds: None,
            },
            Err(error) => {
                let now = self.now();
                let mut fx = Effects::default();
                self.lock().driver_load_failed(now, holder, model, &mut fx);
                self.run(fx);
                tracing::error!(%error, model, session, "driver failed to load");
                AcquireAnswer::LoadFailed {
                    message: format!("model {model:?} failed to load: {error}"),
                }
            }
        }
    }

    /// `POST /v1/loaded`.
    pub fn loaded(self: &Arc<Self>, request: wire::Loaded) -> Result<(), LookupError> {
        let process = self.read_session(&request.session);
        let before = parse_id(&request.lease, "l-").and_then(|lease| {
            self.baselines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(request.session.clone(), modelpool_policy::LeaseId(lease)))
        });
        let now = self.now();
        let mut fx = Effects::default();
        let report = self.lock().loaded(now, &request, process, before, &mut fx);
        self.run(fx);
        if let Some(report) = report? {
            let model = &report.model;
            tracing::info!(
                model,
                session = %session_name(report.client),
                measured_ram = %report.sidecar.ram.map_or("?".into(), human_bytes),
                reported_ram = %report.app.ram.map_or("?".into(), human_bytes),
                "Memory after load of {model}: {}",
                self.memory_line()
            );
        }
        Ok(())
    }

    /// `POST /v1/release`: whether the client must unload now.
    pub fn release(self: &Arc<Self>, session: &str, lease: &str) -> Result<bool, LookupError> {
        self.forget_baseline(|(s, l)| s == session && parse_id(lease, "l-") == Some(l.0));
        let now = self.now();
        let mut fx = Effects::default();
        let unload = self.lock().release(now, session, lease, &mut fx);
        self.run(fx);
        unload
    }

    /// `POST /v1/unloaded`: the app dropped generation `generation` of `model`.
    pub fn unloaded(
        self: &Arc<Self>,
        session: &str,
        model: &str,
        generation: u64,
        command: Option<u64>,
    ) -> Result<(), LookupError> {
        // The app frees before it reports: its process is read now, for an immediate check.
        let process = self.read_session(session);
        let now = self.now();
        let mut fx = Effects::default();
        let result = self
            .lock()
            .unloaded(now, session, model, generation, command, process, &mut fx);
        self.run(fx);
        result
    }

    /// A waiting acquire's client went away: withdraw it (true), or, when it was answered
    /// already, hand back the lease it never got.
    pub(super) fn abandon(
        self: &Arc<Self>,
        request: RequestId,
        receiver: &mut oneshot::Receiver<Verdict>,
    ) {
        let now = self.now();
        let mut fx = Effects::default();
        let withdrawn = self.lock().abandon(now, request, None, &mut fx);
        if !withdrawn && let Ok(Verdict::Granted { lease, .. }) = receiver.try_recv() {
            let now = self.now();
            self.lock().abandon(now, request, Some(lease), &mut fx);
        }
        self.run(fx);
    }
}

/// Cancels a waiting acquire whose client went away, and releases a lease granted to it
/// that was never delivered.
struct WaitGuard {
    shared: Arc<Shared>,
    request: RequestId,
    receiver: Option<oneshot::Receiver<Verdict>>,
}

impl WaitGuard {
    async fn wait(mut self) -> Option<Verdict> {
        let receiver = self.receiver.as_mut()?;
        let verdict = receiver.await.ok();
        self.receiver = None;
        verdict
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        self.shared.abandon(self.request, &mut receiver);
    }
}
