//! Server drivers (`KServeV2`, `Ollama`, `Vllm`): the ledger kept equal to what the model
//! server really holds. Pure, like the rest of the core: the shell polls the server and reads
//! its process tree before the lock, then makes one call, [`Core::reconcile_server`].
//!
//! ```text
//!  poll (shell): driver.observe() ─► ServerView (loaded set) ─┐
//!                measure::tree   ─► TreeReading (root, RSS) ──┴─► Core::reconcile_server
//!    the server's process changed or is gone ─► its instances leave the ledger (server_dropped)
//!    the server answers with an error        ─► down (readyz, metric, pod report); ledger kept
//!                                                (one server per model, Vllm: none answers,
//!                                                so every model leaves with its server)
//!    Loaded here, not loaded there            ─► leaves the ledger (server_dropped, with why)
//!    loaded there, not here (behind our back) ─► adopted and counted; unloaded if it does not fit
//!    unloaded, waiting for proof              ─► the tree's RSS fell (proc), or no reading at
//!                                                all (unverified)
//! ```
//!
//! Instances are held by [`APP_HOLDER`], the server. The shell never polls while one of its
//! own load or unload calls is under way, so a poll never races the driver's own changes.

use std::{collections::BTreeSet, time::Duration};

use super::{APP_HOLDER, Core, Effects, ProcessNow, SeenBy, Unload};
use crate::{api::wire, driver::ServerView, measure::tree::TreeReading};
use modelpool_policy::{Footprint, InstanceState, Sizes, UnloadReason};

/// What the core knows of the server behind a server driver.
#[derive(Debug, Clone, Default)]
pub struct ServerTrack {
    /// Whether the driver observes a server.
    pub enabled: bool,
    /// One server holds every model (its process gone: all it held is gone); `false`: one
    /// server per model (`Vllm`), each seen through its own answer.
    pub single: bool,
    /// Why the last poll failed; `None` when it answered (or before the first poll).
    pub down: Option<String>,
    /// Polls answered so far.
    pub polls: u64,
    /// The server's process as last found: (root pid, start time).
    pub process: Option<(u32, u64)>,
    /// How it was found (`command line`, `port`).
    pub found_by: Option<&'static str>,
    /// The process tree's RSS at the last reading, bytes.
    pub rss: Option<u64>,
    /// The process tree's VRAM at the last reading (NVML), bytes; `None`: no GPU reading.
    pub vram: Option<u64>,
    /// Instances dropped because the server no longer held them.
    pub dropped: u64,
    /// Models loaded behind the sidecar's back and adopted.
    pub adopted: u64,
    /// Reclaims of the server's instances, by how they were seen (`proc`, `unverified`, …).
    pub reclaims: std::collections::BTreeMap<&'static str, u64>,
    /// Models the server holds that the pool does not list (warned once each).
    pub unlisted: BTreeSet<String>,
    /// Models loaded behind the sidecar's back that did not fit, and when their unload was
    /// asked: later polls that still list them (the unload in flight, or the server's index
    /// lagging its unload) neither ask nor count again until [`REFUSED_UNLOAD_RETRY`] passed.
    pub refused: std::collections::BTreeMap<String, Duration>,
    /// `Vllm` at sleep level 1: the models the sidecar put to sleep, with the host RAM their
    /// weights hold while asleep (counted in the ledger as asleep until the server says awake or
    /// stops answering). A server put to sleep by someone else is not here: `/is_sleeping`
    /// does not say at which level.
    pub asleep: std::collections::BTreeMap<String, u64>,
}

/// How long a model loaded behind the sidecar's back, refused and asked out, may still be
/// listed by the server before it is asked again (a server that ignored the unload).
pub const REFUSED_UNLOAD_RETRY: Duration = Duration::from_secs(5);

/// One poll of the server, taken before the lock.
#[derive(Debug, Clone)]
pub struct ServerPoll {
    /// What the server says it holds, or why it did not answer.
    pub view: Result<ServerView, String>,
    /// Its process tree, if found.
    pub tree: Option<TreeReading>,
}

impl ServerTrack {
    /// The server's state for `/v1/state`.
    pub fn wire(&self) -> wire::ServerState {
        wire::ServerState {
            up: self.enabled && self.down.is_none() && self.polls > 0,
            down_reason: self.down.clone(),
            polls: self.polls,
            pid: self.process.map(|p| p.0),
            found_by: self.found_by.map(str::to_owned),
            rss_bytes: self.rss,
            vram_bytes: self.vram,
            dropped: self.dropped,
            adopted: self.adopted,
            reclaims: self
                .reclaims
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect(),
            unlisted_models: self.unlisted.iter().cloned().collect(),
            asleep_ram_bytes: self.asleep.clone(),
        }
    }
}

impl Core {
    /// Turns on server reconciliation (the driver observes a server; `single`: one server
    /// holds every model).
    pub fn enable_server(&mut self, single: bool) {
        self.server.enabled = true;
        self.server.single = single;
    }

    /// The server's track.
    pub fn server(&self) -> &ServerTrack {
        &self.server
    }

    /// The server's instances' level, for load and unload references.
    pub(super) fn server_levels(&self) -> Option<Sizes> {
        self.server
            .rss
            .map(|rss| Sizes::new(self.server.vram, Some(rss)))
    }

    /// The server's process, for reclaim checks.
    pub(super) fn server_pid(&self) -> Option<u32> {
        self.server.process.map(|(pid, _)| pid)
    }

    /// One poll of the server: see the module docs.
    pub fn reconcile_server(&mut self, now: Duration, poll: ServerPoll, fx: &mut Effects) {
        if !self.server.enabled {
            return;
        }
        let current = poll.tree.as_ref().map(|t| (t.root, t.started));
        let mut replaced = false;
        if self.server.single
            && let Some((old, _)) = self.server.process
            && current != self.server.process
        {
            replaced = true;
            let why = match current {
                Some((pid, _)) => {
                    format!("the server's process {old} is gone (now process {pid} serves)")
                }
                None => format!("the server's process {old} is gone"),
            };
            self.server_gone(now, &why, fx);
        }
        self.server.process = current;
        self.server.found_by = poll.tree.as_ref().map(|t| t.found_by);
        self.server.rss = poll.tree.as_ref().map(|t| t.rss_bytes);
        self.server.vram = poll.tree.as_ref().and_then(|t| t.vram_bytes);
        match poll.view {
            Err(reason) => {
                if self.server.down.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(%reason, "the model server does not answer: acquires are refused until it does");
                    fx.last_error = Some(format!("ServerDown: {reason}"));
                }
                if !self.server.single {
                    // One server per model, none answering: each model is gone with its
                    // server, as when only some do not answer (the view lists them so).
                    for instance in self.engine.instances(now) {
                        if instance.session == APP_HOLDER && instance.state == InstanceState::Loaded
                        {
                            let why = format!("its server does not answer: {reason}");
                            self.drop_server_instance(now, &instance.model, &why, fx);
                        }
                    }
                }
                self.server.down = Some(reason);
            }
            Ok(view) => {
                if let Some(was) = self.server.down.take() {
                    tracing::info!(was, "the model server answers again");
                }
                self.server.polls += 1;
                if replaced {
                    // The view is read before the tree: it may be the old process's last
                    // answer, listing what just died with it (found by CI: a and b, dropped
                    // with the killed Ollama, were adopted back from its last /api/ps and
                    // held while it was down). What the new process holds, the next poll
                    // adopts.
                    tracing::info!(
                        "the server's process changed during the poll: its list is read again next poll"
                    );
                } else {
                    self.reconcile_view(now, &view, fx);
                }
            }
        }
        self.check_server_reclaims(now, fx);
    }

    fn reconcile_view(&mut self, now: Duration, view: &ServerView, fx: &mut Effects) {
        self.reconcile_asleep(now, view, fx);
        // Held here, not there: the server dropped it by itself.
        for instance in self.engine.instances(now) {
            if instance.session != APP_HOLDER
                || instance.state != InstanceState::Loaded
                || view.loaded(&instance.model)
            {
                continue;
            }
            let why = match view.models.get(&instance.model) {
                Some(m) => format!(
                    "the server lists it as not loaded ({})",
                    m.reason.as_deref().unwrap_or("no reason given")
                ),
                None => "the server no longer lists it".to_owned(),
            };
            self.drop_server_instance(now, &instance.model, &why, fx);
        }
        // Loaded there, not here: loaded behind our back.
        let listed: Vec<String> = self
            .engine
            .model_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        self.server.refused.retain(|model, _| view.loaded(model));
        for (model, held) in &view.models {
            if !held.loaded || self.engine.instance(now, APP_HOLDER, model).is_some() {
                continue;
            }
            if self
                .server
                .refused
                .get(model)
                .is_some_and(|asked| now.saturating_sub(*asked) < REFUSED_UNLOAD_RETRY)
            {
                // Asked out already (found by CI: MLServer listed it one poll after the
                // unload call, and it was counted and unloaded twice).
                continue;
            }
            if !listed.contains(model) {
                if self.server.unlisted.insert(model.clone()) {
                    tracing::warn!(
                        model,
                        "the server holds a model the pool does not list: not counted (add it to spec.models to count it)"
                    );
                }
                continue;
            }
            match self.adopt(now, APP_HOLDER, model, held.reported, false, fx) {
                Ok(generation) => {
                    self.server.adopted += 1;
                    tracing::info!(
                        model,
                        generation,
                        "the server loaded {model} behind the sidecar's back: adopted and counted"
                    );
                }
                Err(message) => {
                    tracing::warn!(model, %message, "the server loaded {model} behind the sidecar's back and it does not fit: unloading it");
                    self.metrics
                        .unloads
                        .with_label_values(&[model.as_str(), UnloadReason::Ceiling.as_str()])
                        .inc();
                    fx.last_error = Some(format!(
                        "model {model:?} was loaded on the server behind the sidecar's back and does not fit: {message}"
                    ));
                    self.server.refused.insert(model.clone(), now);
                    // Not in the ledger: generation 0 names "the hold the sidecar refused".
                    fx.unloads.push(Unload {
                        holder: APP_HOLDER,
                        model: model.clone(),
                        generation: 0,
                        reason: UnloadReason::Ceiling,
                    });
                }
            }
        }
    }

    /// `Vllm` at sleep level 1: a sleep moves the weights to host RAM, it frees nothing there.
    /// An unload of ours the server confirms (asleep) ends its instance on the server's word
    /// (`seen_by` `driver`: no fall of memory is waited for) and the model is counted asleep
    /// with the instance's bytes, in RAM, in the same step, so the ledger never drops them. A
    /// model we put to sleep because it was loaded behind our back and did not fit is counted
    /// so with its need. The entry ends when the server says the model is awake (woken through
    /// the pool, which admits it net of its own host copy, or behind our back) or does not
    /// answer (a dead server holds nothing; a restarted one starts awake).
    fn reconcile_asleep(&mut self, now: Duration, view: &ServerView, fx: &mut Effects) {
        if self.pool.sleep_level != Some(1) {
            return;
        }
        let asleep = |model: &str| {
            view.models.get(model).is_some_and(|m| {
                !m.loaded && m.reason.as_deref() == Some(crate::driver::vllm::SLEEPING)
            })
        };
        for instance in self.engine.instances(now) {
            if instance.session != APP_HOLDER
                || instance.state != InstanceState::Reclaiming
                || !asleep(&instance.model)
            {
                continue;
            }
            let host = instance.held.vram.saturating_add(instance.held.ram);
            self.server.asleep.insert(instance.model.clone(), host);
            // Counted asleep before the instance ends: its bytes never leave the ledger.
            let out = self
                .engine
                .set_asleep(now, &instance.model, Some(Footprint::new(0, host)));
            self.apply(now, out, fx);
            let out = self.engine.reclaimed(now, APP_HOLDER, &instance.model);
            self.apply(now, out, fx);
            self.finish_reclaim(now, APP_HOLDER, &instance.model, SeenBy::Driver, fx);
            tracing::info!(
                model = instance.model,
                host_ram_bytes = host,
                "{} is asleep at level 1: its weights hold host RAM, counted against the RAM ceiling",
                instance.model
            );
        }
        let refused: Vec<String> = self
            .server
            .refused
            .keys()
            .filter(|model| asleep(model) && !self.server.asleep.contains_key(*model))
            .cloned()
            .collect();
        for model in refused {
            if let Some(need) = self.engine.need(&model) {
                self.server
                    .asleep
                    .insert(model, need.vram.saturating_add(need.ram));
            }
        }
        let entries: Vec<(String, u64)> = self
            .server
            .asleep
            .iter()
            .map(|(model, bytes)| (model.clone(), *bytes))
            .collect();
        for (model, bytes) in entries {
            let held = asleep(&model).then(|| Footprint::new(0, bytes));
            if held.is_none() {
                self.server.asleep.remove(&model);
            }
            // Idempotent; an instance of the model (its wake-up granted) takes no entry.
            let out = self.engine.set_asleep(now, &model, held);
            self.apply(now, out, fx);
        }
    }

    /// The server's process exited or was replaced: everything it held is gone with it.
    fn server_gone(&mut self, now: Duration, why: &str, fx: &mut Effects) {
        tracing::warn!(
            why,
            "the model server restarted or exited: what it held leaves the ledger"
        );
        fx.last_error = Some(format!("ServerRestarted: {why}"));
        for instance in self.engine.instances(now) {
            if instance.session != APP_HOLDER {
                continue;
            }
            match instance.state {
                // A load under way fails on its own (its call errors).
                InstanceState::Loading => {}
                InstanceState::Loaded => {
                    self.drop_server_instance(now, &instance.model, why, fx);
                }
                InstanceState::Unloading | InstanceState::Reclaiming | InstanceState::Lost => {
                    let out = self.engine.reclaimed(now, APP_HOLDER, &instance.model);
                    self.finish_reclaim(now, APP_HOLDER, &instance.model, SeenBy::ProcessExit, fx);
                    self.apply(now, out, fx);
                }
            }
        }
    }

    fn drop_server_instance(&mut self, now: Duration, model: &str, why: &str, fx: &mut Effects) {
        let reason = UnloadReason::ServerDropped;
        let (dropped, out) = self.engine.dropped(now, APP_HOLDER, model, reason);
        if !dropped {
            return;
        }
        self.server.dropped += 1;
        self.metrics
            .unloads
            .with_label_values(&[model, reason.as_str()])
            .inc();
        self.tracks.remove(&(APP_HOLDER, model.to_owned()));
        self.placeholders.remove(&(APP_HOLDER, model.to_owned()));
        tracing::warn!(
            model,
            reason = reason.as_str(),
            why,
            "{model} left the ledger: {why}"
        );
        self.apply(now, out, fx);
        self.prune_leases();
    }

    /// Unloads of the server's instances waiting for proof: the tree's RSS, or `unverified`
    /// when there is no reading of the server at all.
    fn check_server_reclaims(&mut self, now: Duration, fx: &mut Effects) {
        let waiting: Vec<String> = self
            .engine
            .instances(now)
            .into_iter()
            .filter(|v| v.session == APP_HOLDER && v.state == InstanceState::Reclaiming)
            .map(|v| v.model)
            .collect();
        if waiting.is_empty() {
            return;
        }
        match (self.server_pid(), self.server.rss) {
            (Some(pid), Some(rss)) => {
                let reading = ProcessNow {
                    alive: true,
                    rss: Some(rss),
                    vram: self.server.vram,
                };
                self.check_reclaims(now, &std::collections::BTreeMap::from([(pid, reading)]), fx);
            }
            _ => {
                for model in waiting {
                    tracing::warn!(
                        model,
                        "no reading of the server's processes (not found: set spec.driver.processMatch, share the pod's process namespace): the unload of {model} is counted unverified"
                    );
                    let out = self.engine.reclaimed(now, APP_HOLDER, &model);
                    self.finish_reclaim(now, APP_HOLDER, &model, SeenBy::Unverified, fx);
                    self.apply(now, out, fx);
                }
            }
        }
    }
}
