//! Command-line flags (each can also come from the environment).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Reconciles ModelPools and their pods, and injects the sidecar.
#[derive(Parser, Debug)]
#[command(name = "modelpool-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the ModelPool CustomResourceDefinition as YAML (what `crds/modelpool.yaml` holds).
    Crd,
    /// Run the operator: controller (when leader), webhook and metrics.
    Run(Box<RunArgs>),
}

/// Flags of `run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "MODELPOOL_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Address of the TLS webhook (`/mutate-pods`); `off` disables it.
    #[arg(long, env = "MODELPOOL_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: String,
    /// This replica's name (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "modelpool-operator")]
    pub identity: String,
    /// Namespace of the leader Lease and the webhook Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelpool-system")]
    pub namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "modelpool-operator-leader")]
    pub lease_name: String,
    /// Seconds a leader lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_s: u64,
    /// Seconds between lease renewals.
    #[arg(long, default_value_t = 2)]
    pub lease_retry_s: u64,
    /// Serve this certificate (PEM) instead of managing one (e.g. from cert-manager).
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `--tls-cert-file`.
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Secret where the managed serving certificate lives.
    #[arg(long, default_value = "modelpool-webhook-tls")]
    pub tls_secret: String,
    /// DNS names and IPs of the managed certificate (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "modelpool-webhook.modelpool-system.svc"
    )]
    pub tls_names: Vec<String>,
    /// MutatingWebhookConfiguration whose caBundle the leader keeps current.
    #[arg(long)]
    pub webhook_config: Option<String>,
    /// Sidecar image the webhook injects.
    #[arg(
        long,
        env = "MODELPOOL_SIDECAR_IMAGE",
        default_value = "ghcr.io/modelpool/modelpool-sidecar:0.1.0"
    )]
    pub sidecar_image: String,
    /// CPU request of the injected sidecar.
    #[arg(long, default_value = "10m")]
    pub sidecar_cpu_request: String,
    /// Memory request of the injected sidecar.
    #[arg(long, default_value = "32Mi")]
    pub sidecar_memory_request: String,
    /// Memory limit of the injected sidecar.
    #[arg(long, default_value = "128Mi")]
    pub sidecar_memory_limit: String,
    /// `RUST_LOG` of the injected sidecar.
    #[arg(long, default_value = "info")]
    pub sidecar_log_level: String,
    /// Seconds a deleted pool waits for its sidecars to drain.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout_s: u64,
    /// Seconds between periodic reconciles of an unchanged pool.
    #[arg(long, default_value_t = 300)]
    pub resync_s: u64,
    /// Apiserver requests per second (fixed window) this process may send.
    #[arg(long, default_value_t = 50)]
    pub api_qps: u64,
    /// Watch only this namespace (a namespaced install); default: all namespaces.
    #[arg(long, env = "MODELPOOL_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "MODELPOOL_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}
