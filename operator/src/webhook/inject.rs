//! Pure injection: what the webhook adds to a pod labelled `modelpool.io/pool: <name>`.
//!
//! The sidecar runs as a native sidecar (an init container with `restartPolicy: Always`,
//! Kubernetes 1.29+) so it is up before the app's first acquire and outlives it on shutdown.
//! Every container gets the socket volume; app containers get `MODELPOOL_SOCKET`; the pod
//! shares its process namespace so the sidecar can read the app's `/proc/PID` and map NVML
//! pids. The socket is mode 0660 with group [`SOCKET_GROUP`], which the pod's
//! `supplementalGroups` gives every container (an app running as uid 1000 otherwise got
//! `Permission denied`). The sidecar has a liveness probe on `/healthz`, which fails when its
//! socket is gone and cannot be bound again. How the sidecar reads the app's GPU (the app's DRA claims, the node's GPUs, or only the
//! app's own readings) is `gpu.rs`'s choice; a server driver's url and process match, when the
//! pool leaves them out, come from the server container (`server.rs`).

use modelpool_crds::v1alpha1::{Driver, GpuAccess, ProxySpec};

use super::{
    gpu::{self, GPU_READING_ANNOTATION},
    server,
};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
        HTTPGetAction, ObjectFieldSelector, Pod, PodSecurityContext, Probe, ResourceRequirements,
        SeccompProfile, SecurityContext, Volume, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};

/// The injected container's name; its presence marks a pod as injected.
pub const SIDECAR_NAME: &str = "modelpool-sidecar";
/// The shared socket volume's name.
pub const SOCKET_VOLUME: &str = "modelpool-socket";
/// Where the socket directory is mounted in every container.
pub const SOCKET_DIR: &str = "/var/run/modelpool";
/// The socket path apps are told through `MODELPOOL_SOCKET`.
pub const SOCKET_PATH: &str = "/var/run/modelpool/sidecar.sock";
/// Annotation set on injected pods.
pub const INJECTED_ANNOTATION: &str = "modelpool.io/injected";
/// Annotation naming the container a server driver's defaults were taken from.
pub const SERVER_CONTAINER_ANNOTATION: &str = "modelpool.io/server-container";
/// The sidecar's metrics port.
pub const METRICS_PORT: i32 = 9464;
/// The name of the serving proxy's container port (a Service may target it by name).
pub const PROXY_PORT_NAME: &str = "mp-proxy";
/// The group that may use the API socket: the sidecar runs with it as its group and gives the
/// socket mode 0660 and this group; the webhook adds it to the pod's `supplementalGroups`, so
/// every container of the pod (whatever its uid) can connect, and no one outside the pod can
/// (the socket lives in the pod's own emptyDir).
pub const SOCKET_GROUP: i64 = 65532;

/// How the sidecar container is built.
#[derive(Clone, Debug)]
pub struct SidecarTemplate {
    /// Image reference.
    pub image: String,
    /// CPU request.
    pub cpu_request: String,
    /// Memory request.
    pub memory_request: String,
    /// Memory limit.
    pub memory_limit: String,
    /// CPU limit, if any.
    pub cpu_limit: Option<String>,
    /// `imagePullPolicy`.
    pub pull_policy: String,
    /// `RUST_LOG` for the sidecar.
    pub log_filter: String,
    /// `MODELPOOL_LOG_FORMAT` for the sidecar: `json` or `text`.
    pub log_format: String,
    /// How the sidecar reads the app's GPU (a pool's `spec.gpu.access` overrides it).
    pub gpu_access: GpuAccess,
    /// The pool's serving proxy (`spec.proxy`), if it has one.
    pub proxy: Option<ProxySpec>,
    /// The pool's driver (`spec.driver`): a server driver's left-out url and process match
    /// are taken from the server container (`server.rs`).
    pub driver: Driver,
}

impl Default for SidecarTemplate {
    fn default() -> Self {
        Self {
            image: "ghcr.io/modelpool/modelpool-sidecar:0.1.0".into(),
            cpu_request: "10m".into(),
            memory_request: "32Mi".into(),
            memory_limit: "128Mi".into(),
            cpu_limit: None,
            pull_policy: "IfNotPresent".into(),
            log_filter: "info".into(),
            log_format: "json".into(),
            gpu_access: GpuAccess::Auto,
            proxy: None,
            driver: Driver::default(),
        }
    }
}

/// True when the pod already carries the sidecar (re-admission must not inject twice).
pub fn is_injected(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let named = |containers: Option<&Vec<Container>>| {
        containers.is_some_and(|cs| cs.iter().any(|c| c.name == SIDECAR_NAME))
    };
    spec.is_some_and(|s| named(Some(&s.containers)) || named(s.init_containers.as_ref()))
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn socket_mount() -> VolumeMount {
    VolumeMount {
        name: SOCKET_VOLUME.into(),
        mount_path: SOCKET_DIR.into(),
        ..VolumeMount::default()
    }
}

/// The restricted security context PodSecurity `restricted` asks for.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// The sidecar's flags for a pool's `spec.proxy`.
fn proxy_args(proxy: &ProxySpec) -> Vec<String> {
    let mut args = vec![
        "--proxy-listen".to_owned(),
        format!("0.0.0.0:{}", proxy.port),
    ];
    if let Some(upstream) = &proxy.upstream {
        args.extend(["--upstream".to_owned(), upstream.clone()]);
    }
    if let Some(n) = proxy.max_queue {
        args.extend(["--proxy-max-queue".to_owned(), n.to_string()]);
    }
    if let Some(n) = proxy.max_body_bytes {
        args.extend(["--proxy-body-limit".to_owned(), n.to_string()]);
    }
    if let Some(n) = proxy.model_concurrency {
        args.extend(["--proxy-model-concurrency".to_owned(), n.to_string()]);
    }
    if let Some(n) = proxy.max_connections {
        args.extend(["--proxy-max-connections".to_owned(), n.to_string()]);
    }
    if let Some(n) = proxy.threads {
        args.extend(["--proxy-threads".to_owned(), n.to_string()]);
    }
    args
}

/// The pod with the sidecar injected. `pool` is the pool's name.
pub fn inject(pod: &Pod, pool: &str, template: &SidecarTemplate) -> Pod {
    let mut pod = pod.clone();
    let Some(spec) = pod.spec.as_mut() else {
        return pod;
    };

    // How the sidecar reads the app's GPU: the app's DRA claims, the node's GPUs, or none.
    let gpu = gpu::plan(&spec.containers, template.gpu_access);
    let claims = gpu.claims.clone();
    // A server driver: the url and process match the pool leaves out, from the server container.
    let server = server::plan(&spec.containers, &template.driver, pool);

    for container in &mut spec.containers {
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.name == SOCKET_VOLUME) {
            mounts.push(socket_mount());
        }
        let env = container.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == "MODELPOOL_SOCKET") {
            env.push(EnvVar {
                name: "MODELPOOL_SOCKET".into(),
                value: Some(SOCKET_PATH.into()),
                ..EnvVar::default()
            });
        }
    }
    for container in spec.init_containers.iter_mut().flatten() {
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.name == SOCKET_VOLUME) {
            mounts.push(socket_mount());
        }
    }

    let resources = ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_string(), Quantity(template.cpu_request.clone())),
                (
                    "memory".to_string(),
                    Quantity(template.memory_request.clone()),
                ),
            ]
            .into(),
        ),
        limits: Some(
            std::iter::once((
                "memory".to_string(),
                Quantity(template.memory_limit.clone()),
            ))
            .chain(
                template
                    .cpu_limit
                    .iter()
                    .map(|cpu| ("cpu".to_string(), Quantity(cpu.clone()))),
            )
            .collect(),
        ),
        claims: if claims.is_empty() {
            None
        } else {
            Some(claims)
        },
    };
    let sidecar = Container {
        name: SIDECAR_NAME.into(),
        image: Some(template.image.clone()),
        image_pull_policy: Some(template.pull_policy.clone()),
        args: Some(
            [
                "--socket".into(),
                SOCKET_PATH.into(),
                "--metrics-listen".into(),
                format!("0.0.0.0:{METRICS_PORT}"),
                "--socket-group".into(),
                SOCKET_GROUP.to_string(),
            ]
            .into_iter()
            .chain(gpu.args.iter().cloned())
            .chain(template.proxy.iter().flat_map(proxy_args))
            .collect(),
        ),
        env: Some(
            [
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                EnvVar {
                    name: "MODELPOOL_POOL_NAME".into(),
                    value: Some(pool.into()),
                    ..EnvVar::default()
                },
                EnvVar {
                    name: "RUST_LOG".into(),
                    value: Some(template.log_filter.clone()),
                    ..EnvVar::default()
                },
                EnvVar {
                    name: "MODELPOOL_LOG_FORMAT".into(),
                    value: Some(template.log_format.clone()),
                    ..EnvVar::default()
                },
            ]
            .into_iter()
            .chain(gpu.env.iter().cloned())
            .chain(server.env.iter().cloned())
            .collect(),
        ),
        ports: Some(
            std::iter::once(ContainerPort {
                name: Some("mp-metrics".into()),
                container_port: METRICS_PORT,
                ..ContainerPort::default()
            })
            .chain(template.proxy.iter().map(|proxy| ContainerPort {
                name: Some(PROXY_PORT_NAME.into()),
                container_port: proxy.port,
                ..ContainerPort::default()
            }))
            .collect(),
        ),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::Int(METRICS_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        // Restarts a sidecar whose socket is gone for good or that stopped answering. In
        // cluster mode it waits up to 120 s for its pool before listening: the first probe
        // comes after that.
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(METRICS_PORT),
                ..HTTPGetAction::default()
            }),
            initial_delay_seconds: Some(130),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        resources: Some(resources),
        restart_policy: Some("Always".into()),
        security_context: Some(SecurityContext {
            run_as_group: Some(SOCKET_GROUP),
            ..restricted_security_context()
        }),
        volume_mounts: Some(vec![socket_mount()]),
        ..Container::default()
    };
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, sidecar);

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == SOCKET_VOLUME) {
        volumes.push(Volume {
            name: SOCKET_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("1Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    spec.share_process_namespace = Some(true);
    // Every container joins the socket's group (the pod's own fsGroup, if any, is untouched:
    // setting one would make the kubelet chown every volume, model volumes included).
    let security = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    let groups = security.supplemental_groups.get_or_insert_with(Vec::new);
    if !groups.contains(&SOCKET_GROUP) {
        groups.push(SOCKET_GROUP);
    }
    // The ServiceAccount admission plugin has run before the webhooks: the name is set.
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let annotations = pod
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(INJECTED_ANNOTATION.into(), "true".into());
    annotations.insert(GPU_READING_ANNOTATION.into(), gpu.reading.into());
    if let Some(container) = server.container {
        annotations.insert(SERVER_CONTAINER_ANNOTATION.into(), container);
    }
    // What the operator binds the sidecar's role for (`--sidecar-cluster-role`): it watches
    // pods as metadata only.
    annotations.insert(
        crate::controller::bind::SERVICE_ACCOUNT_ANNOTATION.into(),
        service_account,
    );
    pod
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ResourceClaim;

    use super::*;

    fn app_pod(claim: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app", "labels": {"modelpool.io/pool": "video"}},
            "spec": {"containers": [{"name": "app", "image": "python:3.12"}]}
        }))
        .unwrap();
        if claim {
            let container = &mut pod.spec.as_mut().unwrap().containers[0];
            container.resources = Some(ResourceRequirements {
                claims: Some(vec![ResourceClaim {
                    name: "gpu".into(),
                    request: None,
                }]),
                ..ResourceRequirements::default()
            });
        }
        pod
    }

    #[test]
    fn a_pool_with_a_proxy_gets_its_flags_and_a_named_port() {
        let template = SidecarTemplate {
            proxy: Some(ProxySpec {
                port: 8080,
                upstream: Some("http://127.0.0.1:11434".into()),
                max_queue: Some(64),
                max_body_bytes: None,
                model_concurrency: Some(2),
                max_connections: Some(512),
                threads: Some(2),
            }),
            ..SidecarTemplate::default()
        };
        let pod = inject(&app_pod(false), "video", &template);
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let args = sidecar.args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with(
                "--proxy-listen 0.0.0.0:8080 --upstream http://127.0.0.1:11434 --proxy-max-queue 64 --proxy-model-concurrency 2 --proxy-max-connections 512 --proxy-threads 2"
            ),
            "{args}"
        );
        let ports: Vec<(Option<&str>, i32)> = sidecar
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("mp-metrics"), METRICS_PORT),
                (Some(PROXY_PORT_NAME), 8080)
            ]
        );
        // Without a proxy: neither.
        let pod = inject(&app_pod(false), "video", &SidecarTemplate::default());
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert!(
            !sidecar
                .args
                .as_ref()
                .unwrap()
                .iter()
                .any(|a| a.contains("proxy"))
        );
        assert_eq!(sidecar.ports.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn injects_sidecar_volume_env_and_process_sharing() {
        let pod = inject(&app_pod(false), "video", &SidecarTemplate::default());
        let spec = pod.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.name, SIDECAR_NAME);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let env: Vec<&str> = sidecar
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            env,
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "MODELPOOL_POOL_NAME",
                "RUST_LOG",
                "MODELPOOL_LOG_FORMAT"
            ]
        );
        assert_eq!(spec.share_process_namespace, Some(true));
        // Issue 15: the app (another uid) reaches the socket through the shared group.
        let args = sidecar.args.as_ref().unwrap();
        let at = args.iter().position(|a| a == "--socket-group").unwrap();
        assert_eq!(args[at + 1], SOCKET_GROUP.to_string());
        let security = sidecar.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_group, Some(SOCKET_GROUP));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            spec.security_context
                .as_ref()
                .unwrap()
                .supplemental_groups
                .as_deref(),
            Some(&[SOCKET_GROUP][..])
        );
        // Issue 15: a liveness probe on /healthz (which fails when the socket is gone).
        let liveness = sidecar.liveness_probe.as_ref().unwrap();
        let get = liveness.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.port, IntOrString::Int(METRICS_PORT));
        assert!(liveness.initial_delay_seconds.unwrap() > 120);
        let app = &spec.containers[0];
        assert!(
            app.env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "MODELPOOL_SOCKET")
        );
        assert!(
            app.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == SOCKET_DIR)
        );
        assert!(is_injected(&pod));
        assert!(!is_injected(&app_pod(false)));
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations
                .get(crate::controller::bind::SERVICE_ACCOUNT_ANNOTATION)
                .map(String::as_str),
            Some("default"),
            "a pod without serviceAccountName runs as default"
        );
    }

    #[test]
    fn the_sidecar_shares_the_apps_dra_claim() {
        let pod = inject(&app_pod(true), "video", &SidecarTemplate::default());
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let claims = sidecar.resources.as_ref().unwrap().claims.as_ref().unwrap();
        assert_eq!(claims[0].name, "gpu");
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[GPU_READING_ANNOTATION], "dra-claim");
    }

    #[test]
    fn gpu_access_from_the_template_reaches_the_sidecar() {
        let template = SidecarTemplate {
            gpu_access: GpuAccess::None,
            ..SidecarTemplate::default()
        };
        let pod = inject(&app_pod(true), "video", &template);
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert!(
            sidecar
                .args
                .as_ref()
                .unwrap()
                .iter()
                .any(|a| a == "--no-nvml")
        );
        assert!(sidecar.resources.as_ref().unwrap().claims.is_none());
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[GPU_READING_ANNOTATION], "app-reported");

        let template = SidecarTemplate {
            gpu_access: GpuAccess::VisibleDevices,
            ..SidecarTemplate::default()
        };
        let pod = inject(&app_pod(false), "video", &template);
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let env = sidecar.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "NVIDIA_VISIBLE_DEVICES" && e.value.as_deref() == Some("all"))
        );
    }

    /// Catches the chart's sidecar values (log format and level, CPU limit, pull policy) not
    /// reaching the injected container, and a CPU limit appearing when none was asked for.
    #[test]
    fn the_template_settings_reach_the_injected_container() {
        let sidecar_of = |template: &SidecarTemplate| {
            let pod = inject(&app_pod(false), "video", template);
            pod.spec.unwrap().init_containers.unwrap().remove(0)
        };
        let env = |c: &Container, name: &str| {
            c.env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        let default = sidecar_of(&SidecarTemplate::default());
        assert_eq!(
            env(&default, "MODELPOOL_LOG_FORMAT").as_deref(),
            Some("json")
        );
        assert_eq!(default.image_pull_policy.as_deref(), Some("IfNotPresent"));
        let limits = default.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(!limits.contains_key("cpu"), "no CPU limit unless asked for");

        let custom = sidecar_of(&SidecarTemplate {
            cpu_limit: Some("200m".into()),
            pull_policy: "Always".into(),
            log_filter: "debug".into(),
            log_format: "text".into(),
            ..SidecarTemplate::default()
        });
        assert_eq!(
            env(&custom, "MODELPOOL_LOG_FORMAT").as_deref(),
            Some("text")
        );
        assert_eq!(env(&custom, "RUST_LOG").as_deref(), Some("debug"));
        assert_eq!(custom.image_pull_policy.as_deref(), Some("Always"));
        let limits = custom.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits.get("cpu"), Some(&Quantity("200m".into())));
        assert_eq!(limits.get("memory"), Some(&Quantity("128Mi".into())));
    }

    /// A pod's own supplemental groups and fsGroup stay; the socket's group is added once.
    #[test]
    fn the_socket_group_joins_the_pods_own_groups() {
        let mut pod = app_pod(false);
        pod.spec.as_mut().unwrap().security_context = Some(PodSecurityContext {
            fs_group: Some(2000),
            supplemental_groups: Some(vec![44, SOCKET_GROUP]),
            ..PodSecurityContext::default()
        });
        let pod = inject(&pod, "video", &SidecarTemplate::default());
        let security = pod.spec.unwrap().security_context.unwrap();
        assert_eq!(security.fs_group, Some(2000));
        assert_eq!(security.supplemental_groups, Some(vec![44, SOCKET_GROUP]));
    }

    /// Issue 18: an Ollama pool without url gets the server container's port and command line
    /// in the sidecar's environment, the container named on the pod, and a shared process
    /// namespace; an Sdk pool gets none of it.
    #[test]
    fn a_server_pool_without_url_gets_the_containers_defaults() {
        let mut pod = app_pod(false);
        let app = &mut pod.spec.as_mut().unwrap().containers[0];
        app.name = "ollama".into();
        app.image = Some("ollama/ollama:0.17.4".into());
        let template = SidecarTemplate {
            driver: serde_json::from_value(serde_json::json!({"kind": "Ollama"})).unwrap(),
            ..SidecarTemplate::default()
        };
        let injected = inject(&pod, "video", &template);
        let spec = injected.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let env = |name: &str| {
            sidecar
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            env(server::DRIVER_URL_ENV).as_deref(),
            Some("http://127.0.0.1:11434")
        );
        assert_eq!(
            env(server::PROCESS_MATCH_ENV).as_deref(),
            Some("ollama serve")
        );
        assert_eq!(spec.share_process_namespace, Some(true));
        assert_eq!(
            injected.metadata.annotations.as_ref().unwrap()[SERVER_CONTAINER_ANNOTATION],
            "ollama"
        );
        let plain = inject(&pod, "video", &SidecarTemplate::default());
        let sidecar = &plain
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()[0];
        assert!(
            !sidecar
                .env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name.starts_with("MODELPOOL_DRIVER")
                    || e.name == server::PROCESS_MATCH_ENV)
        );
        assert!(
            !plain
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(SERVER_CONTAINER_ANNOTATION)
        );
    }

    #[test]
    fn injecting_twice_changes_nothing_more() {
        let once = inject(&app_pod(false), "video", &SidecarTemplate::default());
        // The webhook skips injected pods; the function itself also keeps volumes single.
        let spec = once.spec.as_ref().unwrap();
        assert_eq!(spec.volumes.as_ref().unwrap().len(), 1);
    }
}
