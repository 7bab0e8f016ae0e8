//! The core without processes: a fake clock (`now` passed in) and fake readings (a fake meter:
//! [`Fake`] keeps each pid's RSS and liveness), one test per rule the integration tests cover,
//! and property tests over random event sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{collections::BTreeMap, time::Duration};

use modelpool_policy::{
    Action, EvictionPolicy, Footprint, InstanceState, Limits, ModelConfig, PoolConfig,
    RefusalReason, RequestId, SessionId, Sizes, UnloadReason,
};
use proptest::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::{
    api::wire::{CreateSession, Hold, Loaded},
    measure::{GpuReading, RamReading, Source},
    metrics::Metrics,
    pool::{LoadedPool, ModelInfo, PoolInfo},
};

const MIB: u64 = 1 << 20;
const HEARTBEAT: Duration = Duration::from_secs(2);
const FIRST: u64 = 100;

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A model: name, RAM MiB, pinned.
type M<'a> = (&'a str, u64, bool);

fn pool_with(mode: &'static str, ram_ceiling_mib: Option<u64>, models: &[M<'_>]) -> LoadedPool {
    let configs = models
        .iter()
        .map(|(name, mib, pinned)| {
            let mut m = ModelConfig::new(name, 0, mib * MIB);
            m.pinned = *pinned;
            m
        })
        .collect();
    let limits = Limits::new(None, ram_ceiling_mib.map(|m| m * MIB));
    let mut config = PoolConfig::new(limits, configs);
    config.mode = if mode == "Cache" {
        modelpool_policy::Mode::Cache
    } else {
        modelpool_policy::Mode::Aggressive
    };
    config.eviction = EvictionPolicy::Lru;
    config.idle_ttl = Duration::from_secs(60);
    config.acquire_timeout = Duration::from_secs(10);
    config.reclaim_timeout = Duration::from_secs(5);
    config.pressure_ram_percent = 100;
    config.pressure_vram_percent = 100;
    let info = PoolInfo {
        name: "p".to_owned(),
        namespace: "ns".to_owned(),
        mode: if mode == "Cache" {
            modelpool_crds::v1alpha1::Mode::Cache
        } else {
            modelpool_crds::v1alpha1::Mode::Aggressive
        },
        driver: modelpool_crds::v1alpha1::DriverKind::Sdk,
        driver_url: None,
        process_match: None,
        driver_servers: Default::default(),
        sleep_level: None,
        enforcement: modelpool_crds::v1alpha1::Enforcement::Evict,
        limits,
        models: models
            .iter()
            .map(|(name, mib, pinned)| ModelInfo {
                name: (*name).to_owned(),
                vram_bytes: 0,
                ram_bytes: mib * MIB,
                pinned: *pinned,
                priority: 0,
                declared: true,
                weights: None,
                estimate: None,
            })
            .collect(),
    };
    LoadedPool {
        info,
        config,
        driver: modelpool_crds::v1alpha1::DriverKind::Sdk,
        learned: Default::default(),
    }
}

fn ram(used: u64) -> RamReading {
    RamReading {
        used_bytes: used,
        limit_bytes: Some(64 << 30),
        total_bytes: 64 << 30,
        source: Source::Proc,
    }
}

fn core_with(pool: LoadedPool, app_server: bool) -> Core {
    Core::new(
        pool,
        CoreConfig {
            heartbeat: HEARTBEAT,
            app_server,
        },
        Metrics::new().unwrap(),
        FIRST,
        Measured {
            gpu: GpuReading::down("no GPU in tests".to_owned()),
            ram: ram(0),
        },
    )
}

/// A fake meter: the pids' liveness and RSS, as the tests set them.
#[derive(Debug, Default, Clone)]
struct Fake {
    processes: BTreeMap<u32, ProcessNow>,
}

impl Fake {
    fn set(&mut self, pid: u32, rss: u64) {
        self.processes.insert(
            pid,
            ProcessNow {
                alive: true,
                rss: Some(rss),
                vram: None,
            },
        );
    }
    fn kill(&mut self, pid: u32) {
        self.processes.insert(pid, ProcessNow::default());
    }
    fn get(&self, pid: u32) -> ProcessNow {
        self.processes.get(&pid).copied().unwrap_or_default()
    }
    fn tick(&self) -> TickReadings {
        TickReadings {
            gpu: GpuReading::down("no GPU in tests".to_owned()),
            ram: ram(1 << 30),
            processes: self.processes.clone(),
            pod_devices: Default::default(),
        }
    }
}

/// A core, a fake clock and a fake meter, driven like the shell drives the core.
struct Rig {
    core: Core,
    now: Duration,
    meter: Fake,
    fx: Effects,
    /// Whether `/v1/loaded` comes with a process reading (the sidecar's own measurement).
    measure_loads: bool,
}

impl Rig {
    fn new(mode: &'static str, ceiling_mib: Option<u64>, models: &[M<'_>]) -> Self {
        Self {
            core: core_with(pool_with(mode, ceiling_mib, models), false),
            now: ms(1000),
            meter: Fake::default(),
            fx: Effects::default(),
            measure_loads: true,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn take(&mut self) -> Effects {
        std::mem::take(&mut self.fx)
    }

    fn open(&mut self, pid: u32, models: &[&str]) -> String {
        self.meter.set(pid, 100 * MIB);
        self.open_with(pid, models, Vec::new()).unwrap()["session"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn open_with(
        &mut self,
        pid: u32,
        models: &[&str],
        holds: Vec<Hold>,
    ) -> Result<serde_json::Value, LookupError> {
        let request = CreateSession {
            pid,
            app: Some("test".to_owned()),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            holds,
        };
        let process = self.meter.get(pid);
        self.core
            .open_session(self.now, &request, process, HEARTBEAT, &mut self.fx)
            .map(as_json)
    }

    fn acquire(&mut self, session: &str, model: &str) -> (First, oneshot::Receiver<Verdict>) {
        self.acquire_with(session, model, true).unwrap()
    }

    fn acquire_with(
        &mut self,
        session: &str,
        model: &str,
        wait: bool,
    ) -> Result<(First, oneshot::Receiver<Verdict>), LookupError> {
        let (sender, receiver) = oneshot::channel();
        let first = self
            .core
            .acquire(self.now, session, model, wait, sender, &mut self.fx)?;
        Ok((first, receiver))
    }

    /// Acquires, expecting a grant now: (lease name, action, generation).
    fn grant(&mut self, session: &str, model: &str) -> (String, Action, u64) {
        match self.acquire(session, model).0 {
            First::Now(Verdict::Granted {
                lease,
                action,
                generation,
                ..
            }) => (lease_name(lease), action, generation),
            other => panic!("expected a grant of {model}, got {other:?}"),
        }
    }

    /// Reports a load of `mib` MiB: the fake process grows by that much first.
    fn loaded(&mut self, session: &str, lease: &str, mib: u64) -> Option<LoadedReport> {
        let pid = self.pid(session);
        let rss = self.meter.get(pid).rss.unwrap_or(0) + mib * MIB;
        self.meter.set(pid, rss);
        let request = Loaded {
            session: session.to_owned(),
            lease: lease.to_owned(),
            ok: true,
            load_seconds: Some(1.0),
            vram_bytes: None,
            ram_bytes: Some(mib * MIB),
            error: None,
        };
        let process = self.measure_loads.then(|| self.meter.get(pid));
        self.core
            .loaded(self.now, &request, process, None, &mut self.fx)
            .unwrap()
    }

    /// Acquire + load: (lease, generation).
    fn load(&mut self, session: &str, model: &str, mib: u64) -> (String, u64) {
        let (lease, action, generation) = self.grant(session, model);
        assert_eq!(action, Action::Load, "{model} should load");
        self.loaded(session, &lease, mib);
        (lease, generation)
    }

    fn release(&mut self, session: &str, lease: &str) -> bool {
        self.core
            .release(self.now, session, lease, &mut self.fx)
            .unwrap()
    }

    /// The app frees `mib` MiB (or keeps it: `free` false) and acknowledges.
    fn unloaded(
        &mut self,
        session: &str,
        model: &str,
        generation: u64,
        free_mib: u64,
    ) -> Result<(), LookupError> {
        let pid = self.pid(session);
        let rss = self.meter.get(pid).rss.unwrap_or(0);
        self.meter.set(pid, rss.saturating_sub(free_mib * MIB));
        let process = Some(self.meter.get(pid));
        self.core.unloaded(
            self.now,
            session,
            model,
            generation,
            None,
            process,
            &mut self.fx,
        )
    }

    fn tick(&mut self) {
        let readings = self.meter.tick();
        self.core.tick(self.now, readings, false, &mut self.fx);
    }

    fn pid(&self, session: &str) -> u32 {
        let id = self.core.session_id(session).unwrap();
        self.core.sessions()[&id].pid
    }

    fn state(&self, model: &str) -> Option<(InstanceState, u64, usize)> {
        self.core
            .engine()
            .instances(self.now)
            .into_iter()
            .find(|v| v.model == model)
            .map(|v| (v.state, v.generation, v.leases))
    }

    fn held_ram(&self) -> u64 {
        self.core.engine().held().ram
    }
}

/// A typed answer as the client reads it: the tests' assertions check the wire names too.
fn as_json(answer: impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(answer).unwrap()
}

fn id(session: &str) -> SessionId {
    SessionId(parse_id(session, "s-").unwrap())
}

mod eviction;
mod holds;
mod leases;
mod properties;
mod reclaim;
mod server;
mod sessions;
mod views;
