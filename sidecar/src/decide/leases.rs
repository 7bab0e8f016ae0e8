//! A model's life under leases: `acquire` (granted, queued or refused), the driver's load
//! and its answer (`loaded`), `release`, and the unload's acknowledgements (`unloaded`,
//! `driver_unloaded`), each one locked call that turns the engine's outputs into effects.

use std::{collections::BTreeMap, time::Duration};

use modelpool_policy::{InstanceState, LeaseId, Output, RequestId, SessionId, Sizes};
use tokio::sync::oneshot;

use super::{
    APP_HOLDER, Core, Effects, First, LoadedReport, LookupError, ProcessNow, SeenBy, Track,
    Verdict, lease_name, session_name, state_name,
};
use crate::api::wire;

impl Core {
    /// `POST /v1/acquire`. `sender` receives the answer if the acquire must wait.
    pub fn acquire(
        &mut self,
        now: Duration,
        session: &str,
        model: &str,
        wait: bool,
        sender: oneshot::Sender<Verdict>,
        fx: &mut Effects,
    ) -> Result<First, LookupError> {
        let client = self.session_id(session)?;
        let holder = if self.config.app_server {
            APP_HOLDER
        } else {
            client
        };
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let out = self.engine.acquire(now, request, holder, model);
        // Grants made for this request record `client` as the lease's owner.
        self.apply_with_client(now, out, Some((request, client)), fx);
        if let Some(verdict) = self.immediate.remove(&request) {
            return Ok(First::Now(verdict));
        }
        if !wait {
            self.engine.cancel(request);
            let need = self.engine.need(model).unwrap_or_default();
            let check = self.engine.check(need);
            return Ok(First::Wait(format!(
                "model {model:?} must wait for room (evictions or releases under way): {}",
                check.message
            )));
        }
        self.waiters.insert(request, (client, sender));
        Ok(First::Queued(request))
    }

    /// A waiting acquire's client went away: withdraw it (true when it was still waiting),
    /// or hand back the lease it was granted but never got.
    pub fn abandon(
        &mut self,
        now: Duration,
        request: RequestId,
        granted: Option<LeaseId>,
        fx: &mut Effects,
    ) -> bool {
        if self.waiters.remove(&request).is_some() {
            self.engine.cancel(request);
            tracing::debug!(request = request.0, "acquire abandoned by its client");
            return true;
        }
        if let Some(lease) = granted {
            tracing::info!(lease = %lease_name(lease), "releasing a lease whose client went away");
            self.leases.remove(&lease);
            let out = self.engine.release(now, lease);
            self.apply(now, out, fx);
        }
        false
    }

    /// The Http driver loaded `model` into the app server.
    #[allow(clippy::too_many_arguments)]
    pub fn driver_loaded(
        &mut self,
        now: Duration,
        holder: SessionId,
        model: &str,
        generation: u64,
        reported: Sizes,
        seconds: f64,
        fx: &mut Effects,
    ) {
        let track = self
            .tracks
            .entry((holder, model.to_owned()))
            .or_insert_with(|| Track::new(generation));
        track.generation = generation;
        track.app = reported;
        let measured = Sizes::combine(Sizes::default(), reported, self.declared(model));
        let out = self
            .engine
            .loaded(now, holder, model, measured, Some(seconds));
        self.apply(now, out, fx);
        // The level its unload must fall from is at least the server's last reading (taken
        // before this load) plus what it holds: a model loaded and unloaded between two polls
        // of the server was never seen held, and its reclaim could not be proven (found by
        // the proxy's MLServer test).
        if let (Some(levels), Some(held)) = (
            self.levels(holder).filter(|_| holder == APP_HOLDER),
            self.engine.instance(now, holder, model).map(|v| v.held),
        ) && let Some(track) = self.tracks.get_mut(&(holder, model.to_owned()))
        {
            track.hold_reference(Sizes::new(
                levels.vram.map(|v| v.saturating_add(held.vram)),
                levels.ram.map(|r| r.saturating_add(held.ram)),
            ));
        }
        self.metrics.loads.with_label_values(&[model, "ok"]).inc();
        self.metrics
            .load_duration
            .with_label_values(&[model])
            .observe(seconds);
    }

    /// The Http driver failed to load `model`.
    pub fn driver_load_failed(
        &mut self,
        now: Duration,
        holder: SessionId,
        model: &str,
        fx: &mut Effects,
    ) {
        let out = self.engine.load_failed(now, holder, model);
        self.apply(now, out, fx);
        self.prune_leases();
        self.metrics
            .loads
            .with_label_values(&[model, "failed"])
            .inc();
        self.metrics
            .acquires_refused
            .with_label_values(&["load_failed"])
            .inc();
    }

    /// `POST /v1/loaded`. `process`: the reporting process's reading, taken before the lock
    /// (`None`: not readable); `before`: its reading when the load was answered, if the shell
    /// took one (else the last tick's). `Ok(Some)`: a load was learned.
    pub fn loaded(
        &mut self,
        now: Duration,
        request: &wire::Loaded,
        process: Option<ProcessNow>,
        before: Option<Sizes>,
        fx: &mut Effects,
    ) -> Result<Option<LoadedReport>, LookupError> {
        let (client, lease) = self.lease_of(&request.session, &request.lease)?;
        let Some(info) = self.leases.get(&lease).cloned() else {
            return Err(LookupError::Lease {
                lease: request.lease.clone(),
                session: request.session.clone(),
            });
        };
        let Some(view) = self.engine.instance(now, info.holder, &info.model) else {
            return Ok(None);
        };
        if view.state != InstanceState::Loading {
            // A `use` lease, or a report repeated: nothing to learn.
            return Ok(None);
        }
        let model = info.model;
        if !request.ok {
            let out = self.engine.load_failed(now, info.holder, &model);
            self.apply(now, out, fx);
            self.prune_leases();
            self.tracks.remove(&(info.holder, model.clone()));
            self.metrics
                .loads
                .with_label_values(&[&model, "failed"])
                .inc();
            tracing::warn!(session = %session_name(client), model, error = request.error.as_deref().unwrap_or("(none given)"), "load failed in the app");
            return Ok(None);
        }
        // What the load added, measured here (RSS, NVML per process) and by the app.
        let after = process.map(ProcessNow::sizes).unwrap_or_default();
        if let Some(session) = self.sessions.get_mut(&info.holder) {
            session.last_rss = after.ram.or(session.last_rss);
            session.last_vram = after.vram.or(session.last_vram);
        }
        let track = self
            .tracks
            .entry((info.holder, model.clone()))
            .or_insert_with(|| Track::new(view.generation));
        if let Some(before) = before {
            track.before = before;
        }
        let delta = |before: Option<u64>, after: Option<u64>| Some(after?.saturating_sub(before?));
        let sidecar = Sizes::new(
            delta(track.before.vram, after.vram),
            delta(track.before.ram, after.ram),
        );
        let app = Sizes::new(request.vram_bytes, request.ram_bytes);
        track.generation = view.generation;
        track.sidecar = sidecar;
        track.app = app;
        track.reference = after;
        let seconds = request.load_seconds.or_else(|| {
            track
                .load_started
                .map(|t| now.saturating_sub(t).as_secs_f64())
        });
        let measured = Sizes::combine(sidecar, app, self.declared(&model));
        let out = self
            .engine
            .loaded(now, info.holder, &model, measured, seconds);
        self.apply(now, out, fx);
        self.metrics.loads.with_label_values(&[&model, "ok"]).inc();
        if let Some(seconds) = seconds {
            self.metrics
                .load_duration
                .with_label_values(&[&model])
                .observe(seconds);
        }
        Ok(Some(LoadedReport {
            client,
            model,
            sidecar,
            app,
        }))
    }

    /// `POST /v1/release`: whether the client must unload now.
    pub fn release(
        &mut self,
        now: Duration,
        session: &str,
        lease: &str,
        fx: &mut Effects,
    ) -> Result<bool, LookupError> {
        let (client, id) = self.lease_of(session, lease)?;
        let Some(info) = self.leases.remove(&id) else {
            return Err(LookupError::Lease {
                lease: lease.to_owned(),
                session: session.to_owned(),
            });
        };
        let mut out = self.engine.release(now, id);
        if let Some(placeholder) = self.placeholders.remove(&(info.holder, info.model.clone())) {
            out.extend(self.engine.release(now, placeholder));
        }
        let unload_now = info.holder == client
            && out.iter().any(|o| {
                matches!(o, Output::Unload { session, model, .. } if *session == client && *model == info.model)
            });
        self.apply(now, out, fx);
        Ok(unload_now)
    }

    /// `POST /v1/unloaded`: the app dropped generation `generation` of `model`. Only that
    /// instance moves on to the reclaim check (at once, with `process`, the reading taken
    /// before the lock); an acknowledgement of an instance the session no longer holds, or of
    /// one already taken, is refused and changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn unloaded(
        &mut self,
        now: Duration,
        session: &str,
        model: &str,
        generation: u64,
        command: Option<u64>,
        process: Option<ProcessNow>,
        fx: &mut Effects,
    ) -> Result<(), LookupError> {
        let id = self.session_id(session)?;
        let instance = self.engine.instance(now, id, model);
        let known = self.pool.models.iter().any(|m| m.name == model) || instance.is_some();
        if !known {
            return Err(LookupError::Model {
                names: vec![model.to_owned()],
                listed: self.engine.model_names().join(", "),
            });
        }
        let Some(view) = instance.clone().filter(|v| v.generation == generation) else {
            if generation == 0 && instance.is_none() {
                // The answer to the unload of a hold the sidecar refused: nothing to count.
                fx.answered.push((id, model.to_owned(), 0));
                return Ok(());
            }
            return Err(LookupError::StaleInstance {
                session: session.to_owned(),
                model: model.to_owned(),
                generation,
                current: instance.map(|v| v.generation),
            });
        };
        let refuse = |why: String| LookupError::NotUnloadable {
            session: session.to_owned(),
            model: model.to_owned(),
            generation,
            why,
        };
        match view.state {
            InstanceState::Loaded | InstanceState::Unloading if view.leases == 0 => {}
            InstanceState::Reclaiming | InstanceState::Lost => {
                return Err(LookupError::AlreadyUnloaded {
                    session: session.to_owned(),
                    model: model.to_owned(),
                    generation,
                    state: state_name(view.state),
                });
            }
            InstanceState::Loading => {
                return Err(refuse(
                    "its load was never reported (POST /v1/loaded, with ok: false for a failed load)"
                        .to_owned(),
                ));
            }
            InstanceState::Loaded | InstanceState::Unloading => {
                return Err(refuse(format!(
                    "{} lease(s) on it are live: release them first",
                    view.leases
                )));
            }
        }
        fx.answered.push((id, model.to_owned(), generation));
        if view.state == InstanceState::Loaded {
            self.metrics
                .unloads
                .with_label_values(&[model, "cleanup"])
                .inc();
        }
        let out = self.engine.unloaded(now, id, model);
        self.apply(now, out, fx);
        let last_rss = self.sessions.get(&id).and_then(|s| s.last_rss);
        let track = self
            .tracks
            .entry((id, model.to_owned()))
            .or_insert_with(|| Track::new(generation));
        if track.generation != generation {
            *track = Track::new(generation);
        }
        if track.unload_started.is_none() {
            // The app unloaded on its own: the last sample while it held the model is the
            // level its memory must fall from.
            track.unload_started = Some(now);
            track.unload_reason = Some("cleanup");
            track.reference.ram = track.reference.ram.max(last_rss);
        }
        tracing::debug!(session, model, generation, command, "unload acknowledged");
        // The app frees before it reports: check at once rather than at the next tick.
        if let (Some(process), Some(pid)) = (process, self.sessions.get(&id).map(|s| s.pid)) {
            self.check_reclaims(now, &BTreeMap::from([(pid, process)]), fx);
        }
        Ok(())
    }

    /// The Http driver's app server answered an unload of generation `generation`: its own
    /// API is the only proof there is, so the answer counts as the reclaim.
    pub fn driver_unloaded(
        &mut self,
        now: Duration,
        holder: SessionId,
        model: &str,
        generation: u64,
        fx: &mut Effects,
    ) {
        let current = self
            .engine
            .instance(now, holder, model)
            .map(|v| v.generation);
        if current != Some(generation) {
            // A later instance: this answer is not about it.
            return;
        }
        if self.server.enabled {
            // A model server: its answer is not the proof; the process tree's RSS is
            // (`server.rs`, at the next poll).
            let out = self.engine.unloaded(now, holder, model);
            self.apply(now, out, fx);
            return;
        }
        let mut out = self.engine.unloaded(now, holder, model);
        out.extend(self.engine.reclaimed(now, holder, model));
        self.finish_reclaim(now, holder, model, SeenBy::Driver, fx);
        self.apply(now, out, fx);
    }
}
