//! The server drivers' injection defaults (`KServeV2`, `Ollama`, `Vllm`): which container runs
//! the model server, and from it what the pool left out of `spec.driver`.
//!
//! ```text
//!  spec.driver.container ─► that container  (absent: the pod's only container, else the only
//!                                             one whose image names the server)
//!  url absent        ─► MODELPOOL_DRIVER_URL    http://127.0.0.1:PORT, PORT from the server's
//!                        own setting (OLLAMA_HOST, MLSERVER_HTTP_PORT, --http-port, --port),
//!                        else its containerPort named `http`, else the one equal to the
//!                        server's default, else its only port, else the default
//!  processMatch absent ─► MODELPOOL_PROCESS_MATCH  the container's command and args joined
//!                        (what /proc/PID/cmdline shows), else the server's usual command
//! ```
//!
//! The sidecar takes these as its `--driver-url` / `--process-match` (environment, not
//! arguments: the sidecar's own command line must not match the server's). What the pool says
//! wins, in the sidecar too. `shareProcessNamespace: true`, which lets the sidecar see the
//! server's processes, is set on every injected pod by `inject.rs`.

use k8s_openapi::api::core::v1::{Container, EnvVar};
use modelpool_crds::v1alpha1::{Driver, DriverKind};

/// The sidecar's environment variable for the server's URL.
pub const DRIVER_URL_ENV: &str = "MODELPOOL_DRIVER_URL";
/// The sidecar's environment variable for the server's command-line match.
pub const PROCESS_MATCH_ENV: &str = "MODELPOOL_PROCESS_MATCH";
/// `spec.driver.processMatch`'s longest value (the CRD's bound).
const MAX_MATCH: usize = 256;

/// What the injection adds to the sidecar for a server driver.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServerPlan {
    /// The server's container, when one was found.
    pub container: Option<String>,
    /// Environment for the sidecar container.
    pub env: Vec<EnvVar>,
    /// An admission warning for the user (no server container could be chosen).
    pub warning: Option<String>,
}

/// Image-name fragments that mark a container as the kind's server.
fn image_hints(kind: DriverKind) -> &'static [&'static str] {
    match kind {
        DriverKind::Ollama => &["ollama"],
        DriverKind::KServeV2 => &["mlserver", "tritonserver", "kserve"],
        DriverKind::Vllm => &["vllm"],
        DriverKind::Sdk | DriverKind::Http => &[],
    }
}

fn is_triton(container: &Container) -> bool {
    container
        .image
        .as_deref()
        .is_some_and(|i| i.contains("tritonserver"))
        || container
            .command
            .iter()
            .chain(container.args.iter())
            .flatten()
            .any(|a| a.contains("tritonserver"))
}

/// The server's default port for this container (Triton's differs from KServe's other servers).
fn default_port(kind: DriverKind, container: &Container) -> Option<u16> {
    if kind == DriverKind::KServeV2 && is_triton(container) {
        return Some(8000);
    }
    kind.default_port()
}

/// The value of `--flag N` or `--flag=N` in the container's command and args.
fn flag_value(container: &Container, flag: &str) -> Option<u16> {
    let words: Vec<&String> = container
        .command
        .iter()
        .chain(container.args.iter())
        .flatten()
        .collect();
    words.iter().enumerate().find_map(|(i, word)| {
        if *word == flag {
            words.get(i + 1)?.parse().ok()
        } else {
            word.strip_prefix(flag)?.strip_prefix('=')?.parse().ok()
        }
    })
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The port the server listens on, by the server's own settings, then the declared ports.
fn server_port(kind: DriverKind, container: &Container) -> u16 {
    let configured = match kind {
        // OLLAMA_HOST is `host:port`, `:port`, `http://host:port` or a bare host.
        DriverKind::Ollama => env_value(container, "OLLAMA_HOST")
            .and_then(|host| host.rsplit_once(':'))
            .and_then(|(_, port)| port.trim_end_matches('/').parse().ok()),
        DriverKind::KServeV2 => env_value(container, "MLSERVER_HTTP_PORT")
            .and_then(|port| port.parse().ok())
            .or_else(|| flag_value(container, "--http-port")),
        DriverKind::Vllm => flag_value(container, "--port"),
        DriverKind::Sdk | DriverKind::Http => None,
    };
    let default = default_port(kind, container);
    let ports: Vec<_> = container
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .collect();
    let declared = || {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .or_else(|| {
                ports
                    .iter()
                    .find(|p| Some(p.container_port) == default.map(i32::from))
            })
            .or_else(|| ports.first().filter(|_| ports.len() == 1))
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    configured.or_else(declared).or(default).unwrap_or_default()
}

/// The server's command line as `/proc/PID/cmdline` shows it (arguments joined by spaces), or
/// the kind's usual one when the container leaves it to its image.
fn process_match(kind: DriverKind, container: &Container) -> String {
    let words: Vec<&str> = container
        .command
        .iter()
        .chain(container.args.iter())
        .flatten()
        .map(String::as_str)
        .collect();
    if words.is_empty() {
        return match kind {
            DriverKind::Ollama => "ollama serve",
            DriverKind::KServeV2 if is_triton(container) => "tritonserver",
            DriverKind::KServeV2 => "mlserver start",
            DriverKind::Vllm => "vllm serve",
            DriverKind::Sdk | DriverKind::Http => "",
        }
        .to_owned();
    }
    let mut line = words.join(" ");
    if line.len() > MAX_MATCH {
        // A prefix of the command line is still a substring of it.
        let mut end = MAX_MATCH;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    }
}

/// The plan for pool `pool`'s `driver` given the pod's app containers.
pub fn plan(containers: &[Container], driver: &Driver, pool: &str) -> ServerPlan {
    let kind = driver.kind;
    if !kind.is_server() {
        return ServerPlan::default();
    }
    let wants_url = driver.url.is_none() && !(kind == DriverKind::Vllm && driver.servers.is_some());
    let wants_match = driver.process_match.is_none();
    if !wants_url && !wants_match {
        return ServerPlan::default();
    }
    let names = || {
        containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match &driver.container {
        Some(name) => containers.iter().find(|c| &c.name == name).ok_or_else(|| {
            format!(
                "modelpool: pool {pool}: spec.driver.container {name:?} names no container of this pod (it has: {})",
                names()
            )
        }),
        None if containers.len() == 1 => Ok(&containers[0]),
        None => {
            let hints = image_hints(kind);
            let mut servers = containers.iter().filter(|c| {
                c.image
                    .as_deref()
                    .is_some_and(|image| hints.iter().any(|h| image.contains(h)))
            });
            match (servers.next(), servers.next()) {
                (Some(only), None) => Ok(only),
                _ => Err(format!(
                    "modelpool: pool {pool} (driver.kind {}): cannot tell which of this pod's containers ({}) runs the server; set spec.driver.container",
                    kind.as_str(),
                    names()
                )),
            }
        }
    };
    let container = match chosen {
        Ok(container) => container,
        Err(problem) => {
            let port = kind.default_port().unwrap_or_default();
            return ServerPlan {
                warning: Some(format!(
                    "{problem}; the sidecar uses {}{}",
                    if wants_url {
                        format!("http://127.0.0.1:{port}")
                    } else {
                        "the pool's url".to_owned()
                    },
                    if wants_match {
                        " and finds the server by the port it listens on (unloads may count unverified)"
                    } else {
                        ""
                    }
                )),
                ..ServerPlan::default()
            };
        }
    };
    let mut env_vars = Vec::new();
    if wants_url {
        env_vars.push(env(
            DRIVER_URL_ENV,
            format!("http://127.0.0.1:{}", server_port(kind, container)),
        ));
    }
    if wants_match {
        env_vars.push(env(PROCESS_MATCH_ENV, process_match(kind, container)));
    }
    ServerPlan {
        container: Some(container.name.clone()),
        env: env_vars,
        warning: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    fn driver(value: serde_json::Value) -> Driver {
        serde_json::from_value(value).unwrap()
    }

    fn env_of(plan: &ServerPlan) -> Vec<(&str, &str)> {
        plan.env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect()
    }

    #[test]
    fn ollama_alone_gets_its_port_and_its_command_line() {
        let ollama = container(serde_json::json!({
            "name": "ollama", "image": "docker.io/ollama/ollama:0.17.4",
            "ports": [{"containerPort": 11434, "name": "http"}]
        }));
        let plan = plan(
            std::slice::from_ref(&ollama),
            &driver(serde_json::json!({"kind": "Ollama"})),
            "p",
        );
        assert_eq!(plan.container.as_deref(), Some("ollama"));
        assert_eq!(
            env_of(&plan),
            [
                (DRIVER_URL_ENV, "http://127.0.0.1:11434"),
                (PROCESS_MATCH_ENV, "ollama serve")
            ]
        );
        assert_eq!(plan.warning, None);
        // OLLAMA_HOST moves the port; no declared port needed.
        let moved = container(serde_json::json!({
            "name": "ollama", "image": "ollama/ollama",
            "env": [{"name": "OLLAMA_HOST", "value": "0.0.0.0:8888"}]
        }));
        let plan = super::plan(
            &[moved],
            &driver(serde_json::json!({"kind": "Ollama"})),
            "p",
        );
        assert_eq!(env_of(&plan)[0], (DRIVER_URL_ENV, "http://127.0.0.1:8888"));
    }

    #[test]
    fn kserve_takes_mlserver_or_triton_defaults_and_the_command_line() {
        let mlserver = container(serde_json::json!({
            "name": "mlserver", "image": "docker.io/seldonio/mlserver:1.7.1",
            "args": ["mlserver", "start", "/models"],
            "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 8081, "name": "grpc"}]
        }));
        let logger = container(serde_json::json!({"name": "logs", "image": "fluent/fluent-bit"}));
        let kserve = driver(serde_json::json!({"kind": "KServeV2"}));
        // Two containers: the one whose image names the server.
        let plan = plan(&[logger.clone(), mlserver], &kserve, "p");
        assert_eq!(plan.container.as_deref(), Some("mlserver"));
        assert_eq!(
            env_of(&plan),
            [
                (DRIVER_URL_ENV, "http://127.0.0.1:8080"),
                (PROCESS_MATCH_ENV, "mlserver start /models")
            ]
        );
        // Triton: port 8000 (no ports declared), its command line from command + args.
        let triton = container(serde_json::json!({
            "name": "triton", "image": "nvcr.io/nvidia/tritonserver:25.01-py3",
            "command": ["tritonserver"],
            "args": ["--model-repository=/models", "--model-control-mode=explicit"]
        }));
        let plan = super::plan(&[triton, logger], &kserve, "p");
        assert_eq!(
            env_of(&plan),
            [
                (DRIVER_URL_ENV, "http://127.0.0.1:8000"),
                (
                    PROCESS_MATCH_ENV,
                    "tritonserver --model-repository=/models --model-control-mode=explicit"
                )
            ]
        );
        // The pool's own values win: nothing to add.
        let full = driver(serde_json::json!({
            "kind": "KServeV2", "url": "http://127.0.0.1:9000", "processMatch": "mlserver"
        }));
        let plan = super::plan(&[container(serde_json::json!({"name": "a"}))], &full, "p");
        assert_eq!(plan, ServerPlan::default());
    }

    #[test]
    fn vllm_takes_its_port_flag_and_the_image_entrypoint() {
        let vllm = container(serde_json::json!({
            "name": "llama", "image": "docker.io/vllm/vllm-openai:v0.11.0",
            "args": ["--model", "m", "--port=8001", "--enable-sleep-mode"]
        }));
        let plan = plan(
            std::slice::from_ref(&vllm),
            &driver(serde_json::json!({"kind": "Vllm", "sleepLevel": 1})),
            "p",
        );
        assert_eq!(
            env_of(&plan),
            [
                (DRIVER_URL_ENV, "http://127.0.0.1:8001"),
                (
                    PROCESS_MATCH_ENV,
                    "--model m --port=8001 --enable-sleep-mode"
                )
            ]
        );
        // With servers listed there is no url to fill: only the process match.
        let listed = driver(serde_json::json!({
            "kind": "Vllm", "servers": {"a": "http://127.0.0.1:8001"}
        }));
        let bare = container(serde_json::json!({"name": "v", "image": "vllm/vllm-openai"}));
        let plan = super::plan(&[bare], &listed, "p");
        assert_eq!(env_of(&plan), [(PROCESS_MATCH_ENV, "vllm serve")]);
    }

    #[test]
    fn an_unknown_or_ambiguous_container_is_a_warning_naming_the_field() {
        let a = container(serde_json::json!({"name": "a", "image": "ollama/ollama"}));
        let b = container(serde_json::json!({"name": "b", "image": "ollama/ollama"}));
        let ollama = driver(serde_json::json!({"kind": "Ollama"}));
        let plan = plan(&[a.clone(), b.clone()], &ollama, "ns/p");
        let warning = plan.warning.unwrap();
        assert!(warning.contains("set spec.driver.container"), "{warning}");
        assert!(warning.contains("(a, b)"), "{warning}");
        assert!(warning.contains("http://127.0.0.1:11434"), "{warning}");
        assert!(plan.env.is_empty());
        let named = driver(serde_json::json!({"kind": "Ollama", "container": "c"}));
        let warning = super::plan(&[a.clone(), b.clone()], &named, "ns/p")
            .warning
            .unwrap();
        assert!(
            warning.contains(
                r#"spec.driver.container "c" names no container of this pod (it has: a, b)"#
            ),
            "{warning}"
        );
        // Named and present: chosen among look-alikes.
        let named = driver(serde_json::json!({"kind": "Ollama", "container": "b"}));
        let plan = super::plan(&[a, b], &named, "ns/p");
        assert_eq!(plan.container.as_deref(), Some("b"));
        assert_eq!(plan.warning, None);
    }

    #[test]
    fn sdk_and_http_pools_get_nothing_and_long_command_lines_are_cut() {
        let app =
            container(serde_json::json!({"name": "app", "command": ["python", "x".repeat(300)]}));
        for kind in ["Sdk", "Http"] {
            let plan = plan(
                std::slice::from_ref(&app),
                &driver(serde_json::json!({"kind": kind, "url": "http://127.0.0.1:1"})),
                "p",
            );
            assert_eq!(plan, ServerPlan::default(), "{kind}");
        }
        let plan = plan(
            &[app],
            &driver(serde_json::json!({"kind": "KServeV2", "url": "http://127.0.0.1:1"})),
            "p",
        );
        let matcher = &env_of(&plan)[0];
        assert_eq!(matcher.0, PROCESS_MATCH_ENV);
        assert_eq!(matcher.1.len(), MAX_MATCH);
        assert!(matcher.1.starts_with("python xxx"));
    }
}
