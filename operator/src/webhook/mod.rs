//! The mutating admission webhook that injects the sidecar, served over TLS.
//!
//! It never blocks a pod: a pod naming an unknown pool, or any failure to look the pool up,
//! is admitted unchanged with a warning the user sees in `kubectl`.

pub mod gpu;
pub mod inject;
pub mod server;

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, routing::post};
use hyper_util::{rt::TokioIo, server::conn::auto, service::TowerToHyperService};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{
    Api, Client,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use modelpool_crds::{ModelPool, POOL_LABEL};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{certs::SwappableCert, metrics::Metrics};
use inject::{SidecarTemplate, inject, is_injected};

/// The path the MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate-pods";

/// What the handler needs.
#[derive(Clone)]
pub struct WebhookState {
    /// To look pools up when the cache does not know them (yet).
    pub client: Client,
    /// Every replica's cache of pools: most admissions are answered from it, without an
    /// apiserver round trip (a burst of pod creations must not queue behind the client's
    /// rate limit).
    pub pools: Store<ModelPool>,
    /// How to build the sidecar.
    pub template: SidecarTemplate,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

async fn mutate(
    State(state): State<WebhookState>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, "malformed admission review");
            return Json(AdmissionResponse::invalid(error.to_string()).into_review());
        }
    };
    Json(admit(&state, &request).await.into_review())
}

async fn admit(state: &WebhookState, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    let outcome = |o: &str| state.metrics.admissions.with_label_values(&[o]).inc();
    let Some(pod) = request.object.as_ref() else {
        return response;
    };
    if request.operation != Operation::Create {
        return response;
    }
    let Some(pool) = pod.metadata.labels.as_ref().and_then(|l| l.get(POOL_LABEL)) else {
        outcome("not_labelled");
        return response;
    };
    if is_injected(pod) {
        outcome("already_injected");
        return response;
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let pods_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let cached = state
        .pools
        .get(&ObjectRef::<ModelPool>::new(pool).within(&namespace))
        .map(|p| {
            (
                p.spec.gpu.clone(),
                p.spec.proxy.clone(),
                p.spec.driver.clone(),
            )
        });
    let api: Api<ModelPool> = Api::namespaced(state.client.clone(), &namespace);
    let lookup = match cached {
        Some(found) => Ok(Some(found)),
        None => api
            .get_opt(pool)
            .await
            .map(|p| p.map(|p| (p.spec.gpu, p.spec.proxy, p.spec.driver))),
    };
    let (pool_gpu, pool_proxy, pool_driver) = match lookup {
        Ok(Some(found)) => found,
        Ok(None) => {
            outcome("unknown_pool");
            tracing::warn!(pod = %pods_name, %namespace, %pool, "pod names an unknown pool; admitted without the sidecar");
            response.warnings = Some(vec![format!(
                "modelpool: pool {namespace}/{pool} not found; pod admitted without the sidecar"
            )]);
            return response;
        }
        Err(error) => {
            outcome("lookup_failed");
            tracing::warn!(%error, pod = %pods_name, %namespace, %pool, "failed to look the pool up; admitted without the sidecar");
            response.warnings = Some(vec![format!(
                "modelpool: could not read pool {namespace}/{pool} ({error}); pod admitted without the sidecar"
            )]);
            return response;
        }
    };
    // The pool's `spec.gpu.access` wins over the operator's default.
    let mut template = state.template.clone();
    if let Some(gpu) = pool_gpu {
        template.gpu_access = gpu.access;
    }
    template.proxy = pool_proxy;
    template.driver = pool_driver;
    if let Some(warning) = pod
        .spec
        .as_ref()
        .and_then(|spec| gpu::plan(&spec.containers, template.gpu_access).warning)
    {
        tracing::warn!(pod = %pods_name, %namespace, %pool, %warning, "sidecar will not read the GPU");
        response.warnings.get_or_insert_with(Vec::new).push(warning);
    }
    if let Some(warning) = pod.spec.as_ref().and_then(|spec| {
        server::plan(
            &spec.containers,
            &template.driver,
            &format!("{namespace}/{pool}"),
        )
        .warning
    }) {
        tracing::warn!(pod = %pods_name, %namespace, %pool, %warning, "no server container for the driver's defaults");
        response.warnings.get_or_insert_with(Vec::new).push(warning);
    }
    let injected = inject(pod, pool, &template);
    let (Ok(before), Ok(after)) = (serde_json::to_value(pod), serde_json::to_value(&injected))
    else {
        outcome("error");
        return response;
    };
    match response
        .clone()
        .with_patch(json_patch::diff(&before, &after))
    {
        Ok(patched) => {
            outcome("injected");
            tracing::info!(pod = %pods_name, %namespace, %pool, "injected the sidecar");
            patched
        }
        Err(error) => {
            outcome("error");
            tracing::warn!(%error, "failed to build the injection patch");
            response
        }
    }
}

/// The webhook's HTTP routes.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .with_state(state)
}

/// Serves the webhook over TLS on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    cert: Arc<SwappableCert>,
    state: WebhookState,
) -> std::io::Result<()> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, path = MUTATE_PATH, "webhook listening (TLS)");
    let app = router(state);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "webhook accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, %peer, "TLS handshake failed");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            if let Err(error) = auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, %peer, "webhook connection ended with an error");
            }
        });
    }
}
