//! `modelpool-operator run`: wires the client, leader election, certificates, webhook,
//! metrics server and controller together.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use futures::StreamExt;
use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Client, Config,
    client::ClientBuilder,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use modelpool_crds::ModelPool;
use tokio::sync::watch;

use crate::{
    args::RunArgs,
    certs::{self, SwappableCert},
    controller, leader,
    metrics::{CountRequests, Metrics},
    webhook::{self, WebhookState, inject::SidecarTemplate},
};

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig or in-cluster config.
    #[error("failed to find the cluster config (kubeconfig or in-cluster): {0}")]
    Config(#[from] kube::config::InferConfigError),
    /// The client could not be built.
    #[error("failed to build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// Metrics registration.
    #[error("failed to register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listen address.
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `--owner-deployment` could not be read.
    #[error(
        "failed to read deployment {namespace}/{name} (--owner-deployment: the Deployment running the operator, which owns its Lease and webhook Secret; the operator needs get on it): {source}"
    )]
    Owner {
        /// The namespace (`--namespace`).
        namespace: String,
        /// The name given.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The apiserver answered a Deployment without a uid.
    #[error("deployment {namespace}/{name} (--owner-deployment) has no metadata.uid")]
    OwnerWithoutUid {
        /// The namespace (`--namespace`).
        namespace: String,
        /// The name given.
        name: String,
    },
    /// `--webhook-listen` is not an address.
    #[error("--webhook-listen {0:?} is not an address (e.g. 0.0.0.0:8443) or \"off\"")]
    WebhookAddr(String),
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

async fn metrics_text(State(h): State<Health>) -> String {
    h.metrics.render()
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if *h.ready.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook certificate not loaded yet",
        )
    }
}

/// Runs until the process is stopped or leadership is lost.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new()?);
    let config = Config::infer().await?;
    let client: Client = ClientBuilder::try_from(config)?
        .with_layer(&tower::limit::RateLimitLayer::new(
            args.api_qps.max(1),
            Duration::from_secs(1),
        ))
        .with_layer(&CountRequests(metrics.clone()))
        .build();

    let owner = match args.owner_deployment.as_deref().filter(|d| !d.is_empty()) {
        Some(name) => Some(owner_deployment(&client, &args.namespace, name).await?),
        None => None,
    };

    let (ready_tx, ready_rx) = watch::channel(false);
    let health = Health {
        metrics: metrics.clone(),
        ready: ready_rx,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: args.metrics_listen.to_string(),
            source,
        })?;
    tracing::info!(addr = %args.metrics_listen, "metrics and health listening");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });

    // Webhook: serve whatever certificate is current; followers pick it up from the Secret.
    let cert = Arc::new(SwappableCert::default());
    if args.webhook_listen != "off" {
        let addr: SocketAddr = args
            .webhook_listen
            .parse()
            .map_err(|_| Error::WebhookAddr(args.webhook_listen.clone()))?;
        let pools = spawn_pool_cache(client.clone(), args.watch_namespace.clone());
        let state = WebhookState {
            client: client.clone(),
            pools,
            template: SidecarTemplate {
                image: args.sidecar_image.clone(),
                cpu_request: args.sidecar_cpu_request.clone(),
                memory_request: args.sidecar_memory_request.clone(),
                memory_limit: args.sidecar_memory_limit.clone(),
                cpu_limit: args
                    .sidecar_cpu_limit
                    .clone()
                    .filter(|cpu| !cpu.trim().is_empty()),
                pull_policy: args.sidecar_image_pull_policy.as_str().to_owned(),
                log_filter: args.sidecar_log_level.clone(),
                log_format: args.sidecar_log_format.as_str().to_owned(),
                gpu_access: args.sidecar_gpu_access,
                proxy: None,
                driver: Default::default(),
            },
            metrics: metrics.clone(),
        };
        let serving = cert.clone();
        tokio::spawn(async move {
            if let Err(error) = webhook::serve(addr, serving, state).await {
                tracing::error!(%error, "webhook server stopped");
            }
        });
        tokio::spawn(keep_cert_loaded(
            client.clone(),
            args.clone(),
            cert.clone(),
            ready_tx,
        ));
    } else {
        let _ = ready_tx.send(true);
    }

    let (leader_tx, mut leader_rx) = watch::channel(false);
    let election = leader::Election {
        lease_name: args.lease_name.clone(),
        namespace: args.namespace.clone(),
        identity: args.identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration_s),
        retry_period: Duration::from_secs(args.lease_retry_s),
        owner: owner.clone(),
    };
    let election_task = tokio::spawn(leader::run(client.clone(), election, leader_tx));
    while !*leader_rx.borrow() {
        if leader_rx.changed().await.is_err() {
            return Ok(());
        }
    }
    metrics.leader.set(1);
    if args.webhook_listen != "off" && args.tls_cert_file.is_none() {
        tokio::spawn(manage_cert(client.clone(), args.clone(), owner));
    }
    let settings = controller::Settings {
        identity: args.identity.clone(),
        namespace: args.watch_namespace.clone(),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        resync: Duration::from_secs(args.resync_s),
        sidecar_cluster_role: args.sidecar_cluster_role.clone().filter(|r| !r.is_empty()),
    };
    tokio::select! {
        () = controller::run(client, metrics.clone(), settings) => {}
        _ = election_task => {
            tracing::error!("leadership lost: exiting so that a restart rejoins as a follower");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
    metrics.leader.set(0);
    Ok(())
}

/// A reflector of ModelPools for the webhook (every replica runs one).
fn spawn_pool_cache(client: Client, namespace: Option<String>) -> Store<ModelPool> {
    let api: Api<ModelPool> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().page_size(500)),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                tracing::debug!(%error, "pool cache watch error (retrying)");
            }
        }
    });
    reader
}

/// The owner reference to the operator's Deployment (`--owner-deployment`). Retries a few
/// times: the apiserver may be briefly unreachable while the pod starts.
async fn owner_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<OwnerReference, Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let mut attempt = 0;
    let deployment = loop {
        match api.get(name).await {
            Ok(d) => break d,
            Err(source) if attempt >= 5 || is_client_error(&source) => {
                return Err(Error::Owner {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    source,
                });
            }
            Err(error) => {
                attempt += 1;
                tracing::warn!(%error, deployment = name, "failed to read the owner Deployment; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let uid = deployment
        .metadata
        .uid
        .ok_or_else(|| Error::OwnerWithoutUid {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
    // Not the controller of its Lease and Secret (nothing reconciles them from it), and no
    // blockOwnerDeletion (that needs update on deployments/finalizers).
    Ok(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.to_owned(),
        uid,
        ..OwnerReference::default()
    })
}

/// A 4xx answer (not found, forbidden): retrying will not help.
fn is_client_error(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if (400..500).contains(&status.code))
}

/// Leader: create or rotate the serving certificate, and keep the webhook's caBundle on it.
async fn manage_cert(client: Client, args: RunArgs, owner: Option<OwnerReference>) {
    loop {
        if let Err(error) = certs::ensure(
            &client,
            &args.namespace,
            &args.tls_secret,
            &args.tls_names,
            args.webhook_config.as_deref(),
            owner.as_ref(),
        )
        .await
        {
            tracing::warn!(%error, "failed to ensure the webhook certificate");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Every replica: load the serving certificate (from files, or from the Secret the leader
/// keeps) and reload it when it changes.
async fn keep_cert_loaded(
    client: Client,
    args: RunArgs,
    cert: Arc<SwappableCert>,
    ready: watch::Sender<bool>,
) {
    let mut loaded: Option<(String, String)> = None;
    loop {
        let current = match (&args.tls_cert_file, &args.tls_key_file) {
            (Some(cert_file), Some(key_file)) => {
                match (
                    std::fs::read_to_string(cert_file),
                    std::fs::read_to_string(key_file),
                ) {
                    (Ok(c), Ok(k)) => Some((c, k)),
                    (Err(error), _) | (_, Err(error)) => {
                        tracing::warn!(%error, "failed to read the webhook certificate files");
                        None
                    }
                }
            }
            _ => match certs::read_secret(&client, &args.namespace, &args.tls_secret).await {
                Ok(bundle) => bundle.map(|b| (b.cert_pem, b.key_pem)),
                Err(error) => {
                    tracing::warn!(%error, "failed to read the webhook certificate secret");
                    None
                }
            },
        };
        if let Some(pair) = current
            && loaded.as_ref() != Some(&pair)
        {
            match cert.set(&pair.0, &pair.1) {
                Ok(()) => {
                    tracing::info!("webhook certificate loaded");
                    loaded = Some(pair);
                    let _ = ready.send(true);
                }
                Err(error) => tracing::warn!(%error, "failed to load the webhook certificate"),
            }
        }
        let pause = if loaded.is_some() { 30 } else { 1 };
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
}
