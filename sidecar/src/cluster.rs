//! Cluster mode: the pool comes from the API (by name, from the downward-API env the webhook
//! sets), and the sidecar reports through its own pod.
//!
//! RBAC this needs, and why it is the least that works: `get`/`list`/`watch` on `modelpools`
//! in its namespace (to follow its one pool: a watch with a name field selector still needs
//! `list` and `watch`), and `patch` on `pods` (to write the report annotation on its own pod;
//! RBAC cannot name "the pod I run in", so the chart pairs the Role with a
//! ValidatingAdmissionPolicy that refuses any other pod). No secrets, no writes to pools.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::watcher::{self, Event},
};
use modelpool_crds::{
    ModelPool,
    report::{EstimateReport, LearnedReport, ModelReport, PodReport, REPORT_ANNOTATION},
};
use modelpool_policy::UnloadReason;
use tokio::sync::watch;

use crate::{
    pool::{self, LoadedPool, WeightsView},
    shell::Shared,
};

/// Where the sidecar runs and what it follows.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The pool's name.
    pub pool: String,
    /// This pod's name.
    pub pod: String,
    /// This pod's namespace (also the pool's).
    pub namespace: String,
}

/// Why cluster mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No kubeconfig / in-cluster config.
    #[error("failed to build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[from] kube::Error),
    /// The pool never became readable.
    #[error("pool {namespace}/{name} could not be read: {message}")]
    Pool {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        message: String,
    },
}

/// A client from the in-cluster config or `KUBECONFIG`.
pub async fn client() -> Result<Client, ClusterError> {
    Ok(Client::try_default().await?)
}

/// Reads the pool, waiting (and saying why) until it exists and validates.
pub async fn first_pool(
    client: &Client,
    placement: &Placement,
    reclaim_timeout: Duration,
    patience: Duration,
) -> Result<LoadedPool, ClusterError> {
    let api: Api<ModelPool> = Api::namespaced(client.clone(), &placement.namespace);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let problem = match api.get_opt(&placement.pool).await {
            Ok(Some(pool)) => match pool::convert_with(&pool, reclaim_timeout, WeightsView::App) {
                Ok(loaded) => return Ok(loaded),
                Err(error) => error.to_string(),
            },
            Ok(None) => "not found".to_owned(),
            Err(error) => error.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Pool {
                namespace: placement.namespace.clone(),
                name: placement.pool.clone(),
                message: problem,
            });
        }
        tracing::warn!(pool = %placement.pool, namespace = %placement.namespace, %problem, "waiting for the pool");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Follows the pool: edits are applied (invalid ones refused, the old pool stays), and a
/// pool being deleted drains the pod: nothing new is admitted and everything is unloaded.
pub async fn follow_pool(
    shared: Arc<Shared>,
    client: Client,
    placement: Placement,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<ModelPool> = Api::namespaced(client, &placement.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", placement.pool));
    let mut events = watcher::watcher(api, config).boxed();
    let mut last_generation = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.wait_for(|s| *s) => return,
        };
        let pool = match event {
            Some(Ok(Event::Apply(pool) | Event::InitApply(pool))) => pool,
            Some(Ok(Event::Delete(_))) => {
                drain(&shared, "the pool was deleted");
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                tracing::warn!(%error, "pool watch error (retrying)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            None => return,
        };
        if pool.metadata.deletion_timestamp.is_some() {
            drain(&shared, "the pool is being deleted");
            continue;
        }
        if pool.metadata.generation == last_generation {
            continue;
        }
        last_generation = pool.metadata.generation;
        match pool::convert_with(&pool, shared.settings.reclaim_timeout, WeightsView::App) {
            Ok(loaded) => {
                tracing::info!(pool = %placement.pool, generation = ?last_generation, "pool in force");
                shared.metrics.pool_reloads.with_label_values(&["ok"]).inc();
                shared.update_pool(loaded);
            }
            Err(error) => {
                shared
                    .metrics
                    .pool_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                shared.set_last_error(format!("pool edit refused: {error}"));
                tracing::error!(%error, "pool changed but is invalid: refused, the previous pool stays in force");
            }
        }
    }
}

fn drain(shared: &Arc<Shared>, why: &str) {
    if !shared.draining() {
        tracing::warn!(
            why,
            "draining: admitting nothing new and unloading every model"
        );
        shared.begin_drain();
    }
}

/// Patches the report annotation on the sidecar's own pod when it changed, at most once per
/// `every`.
pub async fn report_loop(
    shared: Arc<Shared>,
    client: Client,
    placement: Placement,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let pods: Api<Pod> = Api::namespaced(client, &placement.namespace);
    let mut last_sent: Option<PodReport> = None;
    let mut version = 0u64;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let mut report = build_report(&shared, &placement.pool);
        let unchanged = last_sent.as_ref().is_some_and(|last| {
            let mut same = report.clone();
            same.v = last.v;
            &same == last
        });
        if unchanged {
            if stopping {
                return;
            }
            continue;
        }
        version += 1;
        report.v = version;
        let patch = serde_json::json!({
            "metadata": {"annotations": {REPORT_ANNOTATION: report.to_annotation()}}
        });
        match pods
            .patch(
                &placement.pod,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => last_sent = Some(report),
            Err(error) => {
                tracing::warn!(%error, pod = %placement.pod, "failed to report on the pod")
            }
        }
        if stopping {
            return;
        }
    }
}

/// The report of the current state.
pub fn build_report(shared: &Shared, pool: &str) -> PodReport {
    let state = shared.state();
    let models: Vec<ModelReport> = state
        .models
        .iter()
        .filter(|m| matches!(m.state.as_str(), "loaded" | "loading"))
        .map(|m| ModelReport {
            loads: shared
                .metrics
                .loads
                .with_label_values(&[m.model.as_str(), "ok"])
                .get(),
            evictions: eviction_reasons()
                .iter()
                .map(|r| {
                    shared
                        .metrics
                        .unloads
                        .with_label_values(&[m.model.as_str(), r])
                        .get()
                })
                .sum(),
            vram: m.vram_bytes,
            ram: m.ram_bytes,
            leases: u32::try_from(m.leases).unwrap_or(u32::MAX),
            name: m.model.clone(),
        })
        .collect();
    let evictions = eviction_reasons()
        .iter()
        .map(|r| state.counters.unloads.get(*r).copied().unwrap_or(0))
        .sum();
    let gpu =
        (state.vram_total_bytes > 0).then_some((state.vram_used_bytes, state.vram_total_bytes));
    let (held, ceiling) = (state.held_bytes, state.ceiling_bytes);
    let over = ceiling.vram.is_some_and(|limit| held.vram > limit)
        || ceiling.ram.is_some_and(|limit| held.ram > limit);
    PodReport {
        v: 0,
        pool: pool.to_owned(),
        drained: shared.draining() && state.models.is_empty(),
        models,
        vram: held.vram,
        ram: held.ram,
        gpu,
        loads: state.counters.loads,
        evictions,
        over,
        lost: state.lost_bytes.vram.saturating_add(state.lost_bytes.ram),
        unverified: state
            .counters
            .reclaims
            .get("unverified")
            .copied()
            .unwrap_or(0),
        err: shared.last_error(),
        learned: shared
            .with_core(|core| core.learned_sizes())
            .into_iter()
            .map(|(name, size)| {
                let last = state
                    .pool
                    .models
                    .iter()
                    .find(|m| m.name == name)
                    .and_then(|m| m.sizes.as_ref()?.measured)
                    .unwrap_or_default();
                LearnedReport {
                    name,
                    vram: size.peak.vram,
                    ram: size.peak.ram,
                    dvram: size.declared.vram,
                    dram: size.declared.ram,
                    mvram: last.vram,
                    mram: last.ram,
                }
            })
            .collect(),
        est: state
            .pool
            .models
            .iter()
            .filter(|m| m.estimate.is_some())
            .map(|m| EstimateReport {
                name: m.name.clone(),
                vram: m.vram_bytes,
                ram: m.ram_bytes,
            })
            .collect(),
    }
}

fn eviction_reasons() -> [&'static str; 4] {
    [
        UnloadReason::Evicted.as_str(),
        UnloadReason::Pressure.as_str(),
        UnloadReason::Ceiling.as_str(),
        UnloadReason::IdleTtl.as_str(),
    ]
}
