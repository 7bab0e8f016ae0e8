//! What the API shows of the core: `/v1/check` and `/v1/state` as the wire types, built from
//! the ledger and the readings the core holds (read-only, under the same lock as every call).

use std::{collections::BTreeMap, time::Duration};

use modelpool_policy::{Footprint, Limits, SessionId, Sizes};

use super::{Core, Measured, session_name, state_name};
use crate::{
    api::wire::{self, Command},
    measure::{GpuReading, Source, percent},
    pool::PoolInfo,
};

impl Core {
    /// `GET /v1/check`.
    pub fn check(&self, need: Footprint) -> wire::CheckAnswer {
        let result = self.engine.check(need);
        wire::CheckAnswer {
            available: result.available,
            need,
            free: Limits::new(result.free_vram, result.free_ram),
            reclaimable: result.reclaimable,
            message: result.message,
        }
    }

    /// `GET /v1/state`. `process_vram`: the sidecar's NVML reading per pid; `pending`: each
    /// session's pending commands (both read before the lock).
    pub fn state(
        &self,
        now: Duration,
        process_vram: &BTreeMap<u32, (u64, Source)>,
        pending: &BTreeMap<SessionId, Vec<Command>>,
    ) -> wire::State {
        let Measured { gpu, ram } = &self.measured;
        let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0;
        let pct = |a: u64, b: u64| (percent(a, b) * 10.0).round() / 10.0;
        let (vram_used, vram_total) = (gpu.used_bytes(), gpu.total_bytes());
        let gpu_source = gpu.devices.first().map(|d| d.source.to_string());
        let models = self
            .engine
            .instances(now)
            .into_iter()
            .map(|view| {
                let session = self.sessions.get(&view.session);
                let track = self
                    .tracks
                    .get(&(view.session, view.model.clone()))
                    .filter(|t| t.generation == view.generation);
                wire::ModelState {
                    generation: view.generation,
                    session: session_name(view.session),
                    pid: session.map(|s| s.pid),
                    app: session.map(|s| s.app.clone()),
                    state: state_name(view.state).to_owned(),
                    leases: view.leases as u64,
                    vram_bytes: view.held.vram,
                    ram_bytes: view.held.ram,
                    declared: view.declared,
                    measured: view.measured,
                    measured_by_sidecar: track.map(|t| t.sidecar).filter(Sizes::is_known),
                    reported_by_app: track.map(|t| t.app).filter(Sizes::is_known),
                    peak: view.peak,
                    idle_s: (view.idle.as_secs_f64() * 10.0).round() / 10.0,
                    pinned: view.pinned,
                    unload_reason: view.unload_reason.map(|r| r.as_str().to_owned()),
                    model: view.model,
                }
            })
            .collect();
        let sessions = self
            .sessions
            .iter()
            .map(|(id, s)| {
                let vram = process_vram.get(&s.pid);
                wire::SessionState {
                    session: session_name(*id),
                    pid: s.pid,
                    vram_bytes: vram.map(|(bytes, _)| *bytes),
                    vram_source: vram.map(|(_, source)| source.to_string()),
                    app: s.app.clone(),
                    models: s.models.clone(),
                    leases: self.leases.values().filter(|l| l.client == *id).count() as u64,
                    last_heartbeat_ms: now.saturating_sub(s.last_seen).as_millis() as u64,
                    age_s: now.saturating_sub(s.opened).as_secs(),
                    pending_commands: pending.get(id).cloned().unwrap_or_default(),
                    readings: s.readings.as_ref().map(|(r, _)| r.clone()),
                    pid_visible: s.pid_visible,
                    rss_bytes: s.last_rss,
                }
            })
            .collect();
        let counters = self.engine.counters();
        wire::State {
            ram_used_gb: gib(ram.used_bytes),
            ram_total_gb: gib(ram.total_bytes),
            ram_percent: pct(ram.used_bytes, ram.total_bytes),
            vram_allocated_gb: gib(vram_used),
            vram_total_gb: gib(vram_total),
            vram_percent: pct(vram_used, vram_total),
            ram_used_bytes: ram.used_bytes,
            ram_total_bytes: ram.total_bytes,
            ram_limit_bytes: ram.limit_bytes,
            vram_used_bytes: vram_used,
            vram_total_bytes: vram_total,
            gpu: gpu_state(gpu),
            sources: wire::Sources {
                ram: ram.source.to_string(),
                vram: gpu_source,
                process_ram: Source::Proc.to_string(),
                process_vram: gpu
                    .devices
                    .iter()
                    .any(|d| d.source == Source::Nvml)
                    .then(|| Source::Nvml.to_string()),
            },
            pool: self.state_pool(),
            held_bytes: self.engine.held(),
            ceiling_bytes: self.pool.limits,
            lost_bytes: self.engine.lost(),
            queue: self.engine.queue_len() as u64,
            models,
            sessions,
            counters: wire::Counters {
                loads: counters.loads,
                load_failures: counters.load_failures,
                unloads: counters
                    .unloads
                    .iter()
                    .map(|(r, n)| (r.as_str().to_owned(), *n))
                    .collect(),
                refusals: owned_keys(&counters.refusals),
                not_reclaimed: counters.not_reclaimed,
                ceiling_breaches: owned_keys(&counters.ceiling_breaches),
                reclaims: owned_keys(&self.reclaims),
            },
            shutting_down: self.shutting_down,
            server: self.server.enabled.then(|| self.server.wire()),
        }
    }
}

fn gpu_state(gpu: &GpuReading) -> wire::GpuState {
    match &gpu.down_reason {
        Some(reason) => wire::GpuState {
            up: false,
            reason: Some(format!("no GPU: {reason}")),
            devices: None,
        },
        None => wire::GpuState {
            up: true,
            reason: None,
            devices: Some(
                gpu.devices
                    .iter()
                    .map(|d| wire::GpuDevice {
                        index: d.index,
                        uuid: d.uuid.clone(),
                        name: d.name.clone(),
                        total_bytes: d.total_bytes,
                        used_bytes: d.used_bytes,
                        source: d.source.to_string(),
                    })
                    .collect(),
            ),
        },
    }
}

pub(super) fn pool_models(pool: &PoolInfo) -> Vec<wire::PoolModel> {
    pool.models
        .iter()
        .map(|m| wire::PoolModel {
            name: m.name.clone(),
            vram_bytes: m.vram_bytes,
            ram_bytes: m.ram_bytes,
            pinned: m.pinned,
            priority: m.priority,
            estimate: m.estimate.clone(),
            sizes: None,
        })
        .collect()
}

impl Core {
    /// The pool in `/v1/state`: each model with its sizes side by side.
    fn state_pool(&self) -> wire::StatePool {
        let mut pool = state_pool(&self.pool);
        for (model, info) in pool.models.iter_mut().zip(&self.pool.models) {
            let size = Footprint::new(info.vram_bytes, info.ram_bytes);
            let measured = self.engine.measured(&info.name);
            model.sizes = Some(wire::ModelSizes {
                declared: info.declared.then_some(size),
                estimated: info.estimate.as_ref().map(|_| size),
                measured: measured.map(|(last, _)| last),
                peak: measured.map(|(_, peak)| peak),
                need: self.engine.need(&info.name).unwrap_or_default(),
            });
        }
        pool
    }
}

fn state_pool(pool: &PoolInfo) -> wire::StatePool {
    wire::StatePool {
        name: pool.name.clone(),
        namespace: pool.namespace.clone(),
        mode: pool.mode,
        driver: pool.driver,
        driver_url: pool.driver_url.clone(),
        enforcement: pool.enforcement,
        limits: pool.limits,
        models: pool_models(pool),
    }
}

fn owned_keys(counts: &BTreeMap<&str, u64>) -> BTreeMap<String, u64> {
    counts.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
}
