//! Command-line flags (each can also come from the environment).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use modelpool_crds::v1alpha1::GpuAccess;

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
    /// Run the operator: controller (when leader), webhook and metrics. A flag given twice
    /// takes its last value (the chart's `operator.extraArgs` come last).
    #[command(args_override_self = true)]
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
    /// The Deployment that runs this operator, in `--namespace`: the leader Lease and the
    /// managed webhook Secret get an owner reference to it, so that deleting it (`helm
    /// uninstall`) has the garbage collector delete them too. Needs `get` on that Deployment.
    /// Without it they have no owner and outlive the operator.
    #[arg(long, env = "MODELPOOL_OWNER_DEPLOYMENT")]
    pub owner_deployment: Option<String>,
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
    /// CPU limit of the injected sidecar (none by default; namespaces with a ResourceQuota on
    /// `limits.cpu` require one).
    #[arg(long)]
    pub sidecar_cpu_limit: Option<String>,
    /// Image pull policy of the injected sidecar.
    #[arg(long, value_enum, default_value_t = PullPolicy::IfNotPresent)]
    pub sidecar_image_pull_policy: PullPolicy,
    /// How injected sidecars read the app's GPU unless a pool says otherwise:
    /// `Auto`, `SharedClaim`, `VisibleDevices` or `None` (docs/gpu.md).
    #[arg(long, env = "MODELPOOL_SIDECAR_GPU_ACCESS", default_value = "Auto")]
    pub sidecar_gpu_access: GpuAccess,
    /// `RUST_LOG` of the injected sidecar.
    #[arg(long, default_value = "info")]
    pub sidecar_log_level: String,
    /// Log format of the injected sidecar: `json` (one object per line, for `kubectl logs` and
    /// log pipelines) or `text`.
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub sidecar_log_format: LogFormat,
    /// Bind this ClusterRole (the sidecar's permissions) in each pool's namespace, for the
    /// ServiceAccounts the pool's pods run as: a RoleBinding `modelpool-sidecar-<pool>` owned
    /// by the pool. Needs `bind` on the ClusterRole and create/patch on RoleBindings.
    #[arg(long, env = "MODELPOOL_SIDECAR_CLUSTER_ROLE")]
    pub sidecar_cluster_role: Option<String>,
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

/// A container image pull policy (`imagePullPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    /// Pull on every container start.
    #[value(name = "Always")]
    Always,
    /// Pull only when the node lacks the image.
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    /// Never pull (the image must be on the node).
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// A log format (the sidecar's `--log-format` / `MODELPOOL_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The value the sidecar reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Text => "text",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut argv = vec!["modelpool-operator", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Run(args) => *args,
            Command::Crd => panic!("parsed as crd"),
        }
    }

    /// Catches the chart's `operator.extraArgs` (appended after the chart's own flags) being
    /// refused as a repeated flag instead of overriding the chart's value.
    #[test]
    fn a_later_flag_overrides_an_earlier_one() {
        let args = run_args(&["--api-qps=20", "--api-qps=25", "--sidecar-log-format=text"]);
        assert_eq!(args.api_qps, 25);
        assert_eq!(args.sidecar_log_format, LogFormat::Text);
    }

    /// Catches sidecar defaults that would put escape codes in `kubectl logs` or pull on every
    /// start.
    #[test]
    fn sidecar_defaults_suit_a_cluster() {
        let args = run_args(&[]);
        assert_eq!(args.sidecar_log_format, LogFormat::Json);
        assert_eq!(args.sidecar_image_pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(args.sidecar_cpu_limit, None);
        let err = Cli::try_parse_from([
            "modelpool-operator",
            "run",
            "--sidecar-image-pull-policy=Sometimes",
        ])
        .expect_err("a bad pull policy is refused");
        assert!(err.to_string().contains("Always"), "{err}");
    }
}
