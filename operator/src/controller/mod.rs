//! The reconciler: a kube-runtime `Controller` over ModelPools that also watches the pods
//! they govern (metadata only: the sidecars' reports are annotations), settles selector
//! conflicts, aggregates reports into `status` with server-side apply, records Events on
//! transitions, and holds a finalizer until the pool's sidecars have drained.

pub mod bind;
pub mod select;
pub mod status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use modelpool_crds::{
    ModelPool, POOL_LABEL,
    report::{PodReport, REPORT_ANNOTATION},
    v1alpha1::Enforcement,
    v1alpha1::conditions::{reasons, types},
};

use crate::{FIELD_MANAGER, metrics::Metrics};

/// The finalizer that holds a pool until its sidecars have unloaded everything.
pub const FINALIZER: &str = "modelpool.io/drain";

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a field every stored object has.
    #[error("the object lacks {0}")]
    MissingObjectKey(&'static str),
    /// Writing status failed.
    #[error("failed to write the status of {pool}: {source}")]
    WriteStatus {
        /// namespace/name
        pool: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer machinery failed.
    #[error("finalizer failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not an error: the pool's sidecars are still unloading (requeued soon).
    #[error("waiting for {0} pod(s) to drain")]
    StillDraining(usize),
}

impl Error {
    /// A short label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MissingObjectKey(_) => "invalid",
            Self::WriteStatus { .. } => "write_status",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::CleanupFailed(Error::StillDraining(_)) => {
                    "draining"
                }
                _ => "finalizer",
            },
            Self::StillDraining(_) => "draining",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The client.
    pub client: Client,
    /// Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Labelled pods (metadata only).
    pub pods: Store<PartialObjectMeta<Pod>>,
    /// All pools.
    pub pools: Store<ModelPool>,
    /// Per-pool error count, for backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// How long a deleted pool waits for its sidecars before the finalizer goes anyway.
    pub drain_timeout: Duration,
    /// Periodic resync.
    pub resync: Duration,
    /// The sidecar's ClusterRole to bind in each pool's namespace (opt-in), see [`bind`].
    pub sidecar_role: Option<String>,
    /// Per pool, the ServiceAccounts its RoleBinding was last written with.
    pub bound: Mutex<HashMap<String, Vec<String>>>,
    /// Pods (by uid) already given a `PodsWithoutSidecar` Event.
    pub warned_pods: Mutex<std::collections::HashSet<String>>,
}

fn pool_key(pool: &ModelPool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

/// The pods of a namespace in the store, as metadata.
fn pods_in(ctx: &Context, namespace: &str) -> Vec<Arc<PartialObjectMeta<Pod>>> {
    ctx.pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .collect()
}

/// Whether the webhook injected the sidecar into this pod.
fn injected(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(crate::webhook::inject::INJECTED_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// A Warning Event on each pod the pool selects that runs without the sidecar, once per pod
/// (by uid) in this process's life.
async fn warn_pods_without_sidecar(pool: &ModelPool, pods: &[&ObjectMeta], ctx: &Context) {
    for meta in pods {
        let Some(uid) = meta.uid.clone() else {
            continue;
        };
        let first = ctx
            .warned_pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.clone());
        if !first {
            continue;
        }
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: Some(uid),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reasons::PODS_WITHOUT_SIDECAR.into(),
            note: Some(format!(
                "pool {} selects this pod but it runs without the modelpool sidecar, so nothing limits its models (admitted while the webhook was unreachable, or before the pool existed); delete it to have it recreated with the sidecar",
                pool.name_any()
            )),
            action: "Reconcile".into(),
            secondary: Some(pool.object_ref(&())),
        };
        tracing::warn!(pod = ?meta.name, pool = %pool.name_any(), "a selected pod runs without the sidecar");
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, "failed to publish an event");
        }
    }
}

fn report_of(meta: &ObjectMeta) -> Option<Result<PodReport, String>> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REPORT_ANNOTATION))
        .map(|text| PodReport::from_annotation(text).map_err(|e| e.to_string()))
}

async fn reconcile(pool: Arc<ModelPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingObjectKey(".metadata.namespace"))?;
    let api: Api<ModelPool> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply(&pool, &ctx).await,
            Finalizer::Cleanup(pool) => drain(&pool, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .pools
        .set(i64::try_from(ctx.pools.state().len()).unwrap_or(i64::MAX));
    ctx.metrics
        .pods_managed
        .set(i64::try_from(ctx.pods.state().len()).unwrap_or(i64::MAX));
    match &result {
        Ok(_) => ctx.metrics.reconciles.with_label_values(&["ok"]).inc(),
        Err(error) => ctx
            .metrics
            .reconciles
            .with_label_values(&[error.category()])
            .inc(),
    }
    result
}

async fn apply(pool: &ModelPool, ctx: &Context) -> Result<Action, Error> {
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingObjectKey(".metadata.namespace"))?;
    let name = pool.name_any();
    let pods = pods_in(ctx, &namespace);
    let metas: Vec<&ObjectMeta> = pods.iter().map(|p| &p.metadata).collect();
    let others: Vec<Arc<ModelPool>> = ctx
        .pools
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    let selection = select::select(pool, others.iter().map(AsRef::as_ref), &metas);
    let views: Vec<status::PodView> = selection
        .pods
        .iter()
        .map(|pod_name| status::PodView {
            name: pod_name.clone(),
            report: metas
                .iter()
                .find(|m| m.name.as_deref() == Some(pod_name))
                .and_then(|m| report_of(m)),
            injected: metas
                .iter()
                .find(|m| m.name.as_deref() == Some(pod_name))
                .is_some_and(|m| injected(m)),
        })
        .collect();
    let without: Vec<&ObjectMeta> = metas
        .iter()
        .copied()
        .filter(|m| !injected(m) && m.name.as_ref().is_some_and(|n| selection.pods.contains(n)))
        .collect();
    ctx.metrics
        .pods_without_sidecar
        .with_label_values(&[namespace.as_str(), name.as_str()])
        .set(i64::try_from(without.len()).unwrap_or(i64::MAX));
    warn_pods_without_sidecar(pool, &without, ctx).await;
    let new_status = status::compute(&status::Inputs {
        pool,
        selection: &selection,
        pods: &views,
        now: Time(Timestamp::now()),
        invalid: modelpool_crds::validate_pool(pool)
            .err()
            .map(|errors| errors.to_string()),
    });

    if pool.status.as_ref() != Some(&new_status) {
        let api: Api<ModelPool> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": modelpool_crds::API_VERSION,
            "kind": "ModelPool",
            "status": new_status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            pool: format!("{namespace}/{name}"),
            source,
        })?;
        ctx.metrics.status_writes.inc();
        publish_transitions(pool, &new_status, ctx).await;
    }
    if let Some(role) = &ctx.sidecar_role {
        bind_sidecars(pool, &metas, &selection.pods, role, ctx).await;
    }
    if pool.spec.policy.enforcement == Enforcement::Restart {
        restart_leaking_pods(pool, &metas, &selection.pods, ctx).await;
    }
    Ok(Action::requeue(ctx.resync))
}

/// `--sidecar-cluster-role`: keeps the pool's RoleBinding on the ServiceAccounts its pods run
/// as; writes only when they changed since the last write of this process.
async fn bind_sidecars(
    pool: &ModelPool,
    metas: &[&ObjectMeta],
    governed: &[String],
    role: &str,
    ctx: &Context,
) {
    let key = pool_key(pool);
    let accounts = bind::service_accounts(metas.iter().copied(), governed);
    let unchanged = ctx
        .bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .is_some_and(|done| *done == accounts);
    if unchanged {
        return;
    }
    match bind::apply(&ctx.client, &bind::desired(pool, role, &accounts)).await {
        Ok(()) => {
            tracing::info!(pool = %key, service_accounts = ?accounts, cluster_role = role, "sidecar RoleBinding written");
            ctx.bound
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, accounts);
        }
        Err(error) => {
            tracing::warn!(%error, pool = %key, cluster_role = role, "failed to write the sidecar RoleBinding (does the operator have bind on the ClusterRole?)")
        }
    }
}

/// `enforcement: Restart`: a pod whose sidecar reports memory that never came back after an
/// unload is deleted, so that its controller (ReplicaSet, StatefulSet, ...) starts it afresh.
/// Kubernetes cannot restart one container from outside; deleting the pod is the restart.
/// Pods without a controller are left alone (nothing would bring them back).
async fn restart_leaking_pods(
    pool: &ModelPool,
    metas: &[&ObjectMeta],
    governed: &[String],
    ctx: &Context,
) {
    let Some(namespace) = pool.namespace() else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for meta in metas {
        let Some(name) = meta.name.as_deref() else {
            continue;
        };
        if !governed.iter().any(|g| g == name) || meta.deletion_timestamp.is_some() {
            continue;
        }
        let Some(Ok(report)) = report_of(meta) else {
            continue;
        };
        if report.lost == 0 {
            continue;
        }
        let controlled = meta
            .owner_references
            .as_ref()
            .is_some_and(|owners| owners.iter().any(|o| o.controller == Some(true)));
        if !controlled {
            tracing::warn!(
                pod = name,
                lost = report.lost,
                "memory not reclaimed, but the pod has no controller to recreate it: not restarting"
            );
            continue;
        }
        let params = DeleteParams {
            preconditions: meta.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(name, &params).await {
            Ok(_) => {
                ctx.metrics.pod_restarts.inc();
                let event = Event {
                    type_: EventType::Warning,
                    reason: "RestartedPod".into(),
                    note: Some(format!(
                        "pod {name}: {} not reclaimed after an unload; deleted so that its controller recreates it (enforcement: Restart)",
                        modelpool_crds::human_bytes(report.lost)
                    )),
                    action: "Restart".into(),
                    secondary: None,
                };
                if let Err(error) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
                    tracing::warn!(%error, "failed to publish an event");
                }
                tracing::warn!(
                    pod = name,
                    lost = report.lost,
                    "restarted a pod whose memory was not reclaimed"
                );
            }
            Err(error) => {
                tracing::warn!(%error, pod = name, "failed to restart a pod whose memory was not reclaimed")
            }
        }
    }
}

/// Events for what a person should see in `kubectl describe mp`: transitions only.
async fn publish_transitions(
    pool: &ModelPool,
    new: &modelpool_crds::ModelPoolStatus,
    ctx: &Context,
) {
    let old = pool.status.as_ref();
    let mut events = Vec::new();
    for (type_, warn_when) in [
        (types::READY, "False"),
        (types::CEILING_EXCEEDED, "True"),
        (types::CONFLICT, "True"),
        (types::DEGRADED, "True"),
        (types::SIDECARS_INJECTED, "False"),
    ] {
        let Some(now) = status::find(Some(new), type_) else {
            continue;
        };
        let before = status::find(old, type_).map(|c| c.status.as_str());
        if before == Some(now.status.as_str()) {
            continue;
        }
        // First appearance of a healthy condition is not news.
        if before.is_none() && now.status != warn_when && type_ != types::READY {
            continue;
        }
        let type_event = if now.status == warn_when {
            EventType::Warning
        } else {
            EventType::Normal
        };
        events.push(Event {
            type_: type_event,
            reason: now.reason.clone(),
            note: Some(format!("{type_}={}: {}", now.status, now.message)),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    let reference = pool.object_ref(&());
    for event in events {
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, "failed to publish an event");
        }
    }
}

/// The pool is being deleted: its sidecars see `deletionTimestamp` on their pool, unload
/// everything and report `drained`. The finalizer goes when all have, or at the timeout.
async fn drain(pool: &ModelPool, ctx: &Context) -> Result<Action, Error> {
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingObjectKey(".metadata.namespace"))?;
    // A pool going away governs nothing any more: its series goes too.
    let _ = ctx
        .metrics
        .pods_without_sidecar
        .remove_label_values(&[namespace.as_str(), pool.name_any().as_str()]);
    let pods = pods_in(ctx, &namespace);
    let metas: Vec<&ObjectMeta> = pods.iter().map(|p| &p.metadata).collect();
    let selection = select::select(pool, std::iter::empty(), &metas);
    let pending: Vec<String> = selection
        .pods
        .iter()
        .filter(|pod_name| {
            let report = metas
                .iter()
                .find(|m| m.name.as_deref() == Some(pod_name.as_str()))
                .and_then(|m| report_of(m));
            // A pod without a (readable) report has no sidecar to wait for.
            matches!(report, Some(Ok(r)) if !(r.drained && r.models.is_empty()))
        })
        .cloned()
        .collect();
    let waited = pool
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            Duration::from_millis(
                u64::try_from(Timestamp::now().as_millisecond() - t.0.as_millisecond())
                    .unwrap_or(0),
            )
        })
        .unwrap_or_default();
    let reference = pool.object_ref(&());
    if pending.is_empty() {
        let event = Event {
            type_: EventType::Normal,
            reason: "Drained".into(),
            note: Some(format!(
                "{} pod(s) unloaded every model; removing the finalizer",
                selection.pods.len()
            )),
            action: "Finalize".into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &reference).await;
        return Ok(Action::await_change());
    }
    if waited >= ctx.drain_timeout {
        let event = Event {
            type_: EventType::Warning,
            reason: "DrainTimeout".into(),
            note: Some(format!(
                "{} did not report empty within {} s; removing the finalizer anyway",
                pending.join(", "),
                ctx.drain_timeout.as_secs()
            )),
            action: "Finalize".into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &reference).await;
        return Ok(Action::await_change());
    }
    Err(Error::StillDraining(pending.len()))
}

fn error_policy(pool: Arc<ModelPool>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.category() == "draining" {
        return Action::requeue(Duration::from_secs(1));
    }
    if error.category() == "invalid" {
        return Action::await_change();
    }
    let key = pool_key(&pool);
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    // 5 s doubling up to 5 min (kube-rs/kube#1916): the retry never hammers the apiserver.
    let delay = Duration::from_secs(5 * 2u64.saturating_pow(failures.saturating_sub(1).min(6)))
        .min(Duration::from_secs(300));
    tracing::warn!(pool = %key, %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This replica's name (Event reporter instance).
    pub identity: String,
    /// Watch one namespace only.
    pub namespace: Option<String>,
    /// How long a deleted pool waits for its sidecars.
    pub drain_timeout: Duration,
    /// Periodic resync of unchanged pools.
    pub resync: Duration,
    /// Bind this ClusterRole for each pool's pods' ServiceAccounts in the pool's namespace.
    pub sidecar_cluster_role: Option<String>,
}

/// Runs the controller until the process ends.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings) {
    let (pools, pods): (Api<ModelPool>, Api<PartialObjectMeta<Pod>>) = match &settings.namespace {
        Some(namespace) => (
            Api::namespaced(client.clone(), namespace),
            Api::namespaced(client.clone(), namespace),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let Settings {
        identity,
        drain_timeout,
        resync,
        sidecar_cluster_role,
        ..
    } = settings;

    // Only pods carrying the pool label are watched, as metadata, in pages, without
    // managedFields: an injected pod always carries it, and the report is an annotation.
    let (pod_reader, pod_writer) = reflector::store();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(
            pods,
            watcher::Config::default().labels(POOL_LABEL).page_size(500),
        )
        .modify(|pod| {
            pod.managed_fields_mut().clear();
        }),
    )
    .touched_objects();

    let controller = Controller::new(pools, watcher::Config::default().page_size(500));
    let pool_store = controller.store();
    let mapper_store = pool_store.clone();
    let controller = controller.watches_stream(pod_stream, move |pod: PartialObjectMeta<Pod>| {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        mapper_store
            .state()
            .into_iter()
            .filter(|pool| {
                pool.namespace().as_deref() == Some(namespace.as_str())
                    && select::pool_selects(pool, &pod.metadata)
            })
            .map(|pool| ObjectRef::from_obj(pool.as_ref()))
            .collect::<Vec<_>>()
    });

    let reporter = Reporter {
        controller: "modelpool-operator".into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        metrics,
        pods: pod_reader,
        pools: pool_store,
        failures: Mutex::new(HashMap::new()),
        drain_timeout,
        resync,
        sidecar_role: sidecar_cluster_role,
        bound: Mutex::new(HashMap::new()),
        warned_pods: Mutex::new(std::collections::HashSet::new()),
    });
    let reset = ctx.clone();
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((object, _)) => {
                    let key = format!(
                        "{}/{}",
                        object.namespace.clone().unwrap_or_default(),
                        object.name
                    );
                    reset
                        .failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
            futures::future::ready(())
        })
        .await;
}
