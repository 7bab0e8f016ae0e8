//! How the core carries out what the policy engine decided: answers to waiting acquires,
//! lease records, unload commands, counters and logs; adopting what an app announces; ending
//! sessions and finishing reclaims.

use std::time::Duration;

use modelpool_policy::{
    Action, InstanceState, LeaseId, Output, RequestId, SessionId, Sizes, human_bytes,
};

use super::{
    APP_HOLDER, Core, Effects, LeaseInfo, SeenBy, Track, Unload, Verdict, lease_name, session_name,
};

impl Core {
    pub(super) fn apply(&mut self, now: Duration, outputs: Vec<Output>, fx: &mut Effects) {
        self.apply_with_client(now, outputs, None, fx);
    }

    /// Carries out the engine's outputs: answers, lease records, unloads, counters, logs.
    pub(super) fn apply_with_client(
        &mut self,
        now: Duration,
        outputs: Vec<Output>,
        own: Option<(RequestId, SessionId)>,
        fx: &mut Effects,
    ) {
        for output in outputs {
            match output {
                Output::Granted {
                    request,
                    session: holder,
                    model,
                    lease,
                    generation,
                    action,
                    waited,
                } => {
                    let client = match own {
                        Some((r, client)) if r == request => Some(client),
                        _ => self.waiters.get(&request).map(|(client, _)| *client),
                    };
                    let Some(client) = client else {
                        // Nobody waits for it any more: hand the lease straight back.
                        let out = self.engine.release(now, lease);
                        self.apply(now, out, fx);
                        continue;
                    };
                    self.leases.insert(
                        lease,
                        LeaseInfo {
                            client,
                            holder,
                            model: model.clone(),
                        },
                    );
                    // The running block renewed its lease: the placeholder kept for it since a
                    // restart is no longer needed (never the last lease, so nothing unloads).
                    if client == holder
                        && let Some(placeholder) =
                            self.placeholders.remove(&(holder, model.clone()))
                    {
                        let out = self.engine.release(now, placeholder);
                        self.apply(now, out, fx);
                    }
                    if action == Action::Load {
                        // The level the load adds to: the holder's last reading.
                        let before = self.levels(holder).unwrap_or_default();
                        self.tracks.insert(
                            (holder, model.clone()),
                            Track {
                                generation,
                                load_started: Some(now),
                                before,
                                ..Track::default()
                            },
                        );
                    }
                    tracing::info!(
                        model,
                        session = %session_name(client),
                        lease = %lease_name(lease),
                        generation,
                        decision = match action { Action::Use => "use", Action::Load => "load" },
                        waited_ms = waited.as_millis() as u64,
                        "acquire granted"
                    );
                    let verdict = Verdict::Granted {
                        lease,
                        action,
                        holder,
                        generation,
                    };
                    self.deliver(now, request, verdict, fx);
                }
                Output::Refused {
                    request,
                    model,
                    refusal,
                    ..
                } => {
                    self.metrics
                        .acquires_refused
                        .with_label_values(&[refusal.reason.as_str()])
                        .inc();
                    tracing::warn!(model, reason = refusal.reason.as_str(), message = %refusal.message, "acquire refused");
                    self.deliver(now, request, Verdict::Refused(refusal), fx);
                }
                Output::Unload {
                    session: holder,
                    model,
                    generation,
                    reason,
                } => {
                    self.metrics
                        .unloads
                        .with_label_values(&[model.as_str(), reason.as_str()])
                        .inc();
                    let levels = self.levels(holder);
                    let track = self
                        .tracks
                        .entry((holder, model.clone()))
                        .or_insert_with(|| Track::new(generation));
                    if track.generation != generation {
                        *track = Track::new(generation);
                    }
                    if let Some(levels) = levels {
                        // The model is still held: this is the level its unload must fall from.
                        track.hold_reference(levels);
                    }
                    track.unload_started = Some(now);
                    track.unload_reason = Some(reason.as_str());
                    tracing::info!(model, session = %session_name(holder), generation, reason = reason.as_str(), "unloading {model} ({})", reason.as_str());
                    fx.unloads.push(Unload {
                        holder,
                        model,
                        generation,
                        reason,
                    });
                }
                Output::MemoryNotReclaimed {
                    session,
                    model,
                    held,
                    generation,
                } => {
                    self.metrics.memory_not_reclaimed.inc();
                    fx.last_error = Some(format!(
                        "MemoryNotReclaimed: {model} ({held}) not seen back within the reclaim timeout"
                    ));
                    tracing::error!(
                        model,
                        session = %session_name(session),
                        generation,
                        held = %held,
                        timeout_ms = self.engine.config().reclaim_timeout.as_millis() as u64,
                        "MemoryNotReclaimed: {model} was unloaded but its memory was not seen back within the reclaim timeout; it stays counted as lost"
                    );
                    if self.pool.enforcement == modelpool_crds::v1alpha1::Enforcement::Restart {
                        tracing::error!(
                            model,
                            "enforcement Restart: restarting the app container needs the operator (not available in standalone mode)"
                        );
                    }
                }
                Output::CeilingExceeded {
                    resource,
                    held,
                    limit,
                } => {
                    self.metrics
                        .ceiling_breaches
                        .with_label_values(&[resource.as_str()])
                        .inc();
                    tracing::warn!(
                        resource = resource.as_str(),
                        "ceiling exceeded: models hold {} of {resource}, ceiling {}",
                        human_bytes(held),
                        human_bytes(limit)
                    );
                }
            }
        }
    }

    pub(super) fn deliver(
        &mut self,
        now: Duration,
        request: RequestId,
        verdict: Verdict,
        fx: &mut Effects,
    ) {
        match self.waiters.remove(&request) {
            Some((_, sender)) => {
                if let Err(Verdict::Granted { lease, .. }) = sender.send(verdict) {
                    // Its client is gone: hand the lease back.
                    self.leases.remove(&lease);
                    let out = self.engine.release(now, lease);
                    self.apply(now, out, fx);
                }
            }
            // Answered within the acquire call itself.
            None => {
                self.immediate.insert(request, verdict);
            }
        }
    }

    /// Adopts a model a process already holds: its generation. Err: it does not fit (message).
    pub(super) fn adopt(
        &mut self,
        now: Duration,
        id: SessionId,
        model: &str,
        hold_sizes: Sizes,
        in_use: bool,
        fx: &mut Effects,
    ) -> Result<u64, String> {
        // Already in memory: it fits beside what is held, or it alone is refused. Evicting an
        // idle model for it first could still end in refusing it (both gone).
        self.engine.fits_without_eviction(model)?;
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let out = self.engine.acquire(now, request, id, model);
        let granted = out.iter().find_map(|o| match o {
            Output::Granted {
                request: r,
                lease,
                generation,
                action: Action::Load,
                ..
            } if *r == request => Some((*lease, *generation)),
            _ => None,
        });
        let refused = out.iter().find_map(|o| match o {
            Output::Refused {
                request: r,
                refusal,
                ..
            } if *r == request => Some(refusal.message.clone()),
            _ => None,
        });
        // Other outputs (evictions started for it) are carried out.
        let rest: Vec<Output> = out
            .into_iter()
            .filter(|o| !matches!(o, Output::Granted { request: r, .. } | Output::Refused { request: r, .. } if *r == request))
            .collect();
        self.apply(now, rest, fx);
        let Some((lease, generation)) = granted else {
            self.engine.cancel(request);
            return Err(refused.unwrap_or_else(|| "no room for it now".to_owned()));
        };
        let measured = Sizes::combine(Sizes::default(), hold_sizes, self.declared(model));
        let out = self.engine.loaded(now, id, model, measured, None);
        self.apply(now, out, fx);
        let reference = self.levels(id).unwrap_or_default();
        self.tracks.insert(
            (id, model.to_owned()),
            Track {
                generation,
                app: hold_sizes,
                reference,
                ..Track::default()
            },
        );
        if in_use {
            // A block is still using it: keep a placeholder lease until the session's next
            // release of this model.
            self.placeholders.insert((id, model.to_owned()), lease);
            tracing::info!(session = %session_name(id), model, generation, "held model adopted into the ledger, in use");
            return Ok(generation);
        }
        // Held without a lease: Aggressive mode unloads it now, Cache mode keeps it.
        let out = self.engine.release(now, lease);
        self.apply(now, out, fx);
        tracing::info!(session = %session_name(id), model, generation, "held model adopted into the ledger");
        Ok(generation)
    }

    /// A model `pid` announces as held again, while an ended session of that same pid still
    /// has it counted (waiting for a reclaim that cannot come: the process kept it): that
    /// instance leaves the ledger now, so that the re-announced hold replaces it.
    pub(super) fn retire_for_reannounce(
        &mut self,
        now: Duration,
        pid: u32,
        model: &str,
        fx: &mut Effects,
    ) {
        let stale = self.engine.instances(now).into_iter().find(|v| {
            v.model == model
                && matches!(v.state, InstanceState::Reclaiming | InstanceState::Lost)
                && !self.sessions.contains_key(&v.session)
                && self.dead_pids.get(&v.session) == Some(&pid)
        });
        let Some(stale) = stale else {
            return;
        };
        tracing::info!(model, pid, old_session = %session_name(stale.session), generation = stale.generation, "held model re-announced by the same process: its ended session's copy leaves the ledger");
        let out = self.engine.reclaimed(now, stale.session, model);
        self.finish_reclaim(now, stale.session, model, SeenBy::ReAnnounced, fx);
        self.apply(now, out, fx);
    }

    /// Ends a session: its leases go, its waiting acquires fail, its models wait for reclaim.
    pub(super) fn end_session(
        &mut self,
        now: Duration,
        id: SessionId,
        why: &str,
        fx: &mut Effects,
    ) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.placeholders.retain(|(holder, _), _| *holder != id);
        self.dead_pids.insert(id, session.pid);
        for view in self.engine.instances(now) {
            if view.session == id
                && matches!(view.state, InstanceState::Loading | InstanceState::Loaded)
            {
                self.metrics
                    .unloads
                    .with_label_values(&[view.model.as_str(), "session_gone"])
                    .inc();
                let track = self
                    .tracks
                    .entry((id, view.model.clone()))
                    .or_insert_with(|| Track::new(view.generation));
                track.unload_started.get_or_insert(now);
                track.unload_reason.get_or_insert("session_gone");
                track.reference.ram = track.reference.ram.max(session.last_rss);
            }
        }
        // Its leases on instances held by the app server (Http driver) end too.
        let foreign: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.client == id && l.holder != id)
            .map(|(lease, _)| *lease)
            .collect();
        let mut out = Vec::new();
        for lease in foreign {
            out.extend(self.engine.release(now, lease));
        }
        out.extend(self.engine.session_gone(now, id));
        // Waiting acquires of this session end with it (their senders drop: 404 to the client).
        self.waiters.retain(|_, (client, _)| *client != id);
        self.leases.retain(|_, l| l.client != id);
        fx.streams_closed.push(id);
        tracing::warn!(session = %session_name(id), pid = session.pid, app = session.app, why, "session ended: its leases are released and its models leave the accounting once their memory is seen freed");
        self.apply(now, out, fx);
        self.prune_leases();
        self.forget_dead(id, fx);
    }

    pub(super) fn finish_reclaim(
        &mut self,
        now: Duration,
        holder: SessionId,
        model: &str,
        seen_by: SeenBy,
        fx: &mut Effects,
    ) {
        if let Some(track) = self.tracks.remove(&(holder, model.to_owned()))
            && let Some(started) = track.unload_started
        {
            let seconds = now.saturating_sub(started).as_secs_f64();
            self.metrics.reclaim_duration.observe(seconds);
            tracing::debug!(model, seen_by = seen_by.as_str(), seconds, "reclaim seen");
        }
        self.metrics
            .reclaims
            .with_label_values(&[seen_by.as_str()])
            .inc();
        *self.reclaims.entry(seen_by.as_str()).or_default() += 1;
        if holder == APP_HOLDER && self.server.enabled {
            *self.server.reclaims.entry(seen_by.as_str()).or_default() += 1;
        }
        fx.reclaimed.push((holder, model.to_owned(), seen_by));
        self.forget_dead(holder, fx);
    }

    /// An ended session with nothing left to reclaim: its pid is no longer watched.
    pub(super) fn forget_dead(&mut self, holder: SessionId, fx: &mut Effects) {
        if self.sessions.contains_key(&holder) || !self.dead_pids.contains_key(&holder) {
            return;
        }
        let waiting = self
            .engine
            .instances(Duration::ZERO)
            .iter()
            .any(|v| v.session == holder);
        if !waiting {
            self.dead_pids.remove(&holder);
            self.tracks.retain(|(s, _), _| *s != holder);
            fx.watch.push((holder, None));
        }
    }
}
