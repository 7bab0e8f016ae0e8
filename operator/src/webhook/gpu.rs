//! How the injected sidecar gets to read the app's GPU (`spec.gpu.access`, see docs/gpu.md).
//!
//! A container that requests no GPU sees none: under the NVIDIA device plugin only the
//! container that asked for `nvidia.com/gpu` gets the device nodes and `libnvidia-ml`. So the
//! sidecar's NVML readings need one of:
//!
//! ```text
//!   SharedClaim     DRA: the sidecar lists the app containers' resource claims (1.34+ shares
//!                   a claim between containers of a pod) -> exactly the app's devices
//!   VisibleDevices  device plugin: NVIDIA_VISIBLE_DEVICES=all, capabilities=utility (NVML only)
//!                   -> every GPU of the node; the app's share attributed by pid
//!   None            no reading in the sidecar: the app's own readings (SDK heartbeat) or none
//! ```
//!
//! `Auto` picks `SharedClaim` when the app uses claims and otherwise asks for nothing. The
//! choice is written on the pod (`modelpool.io/gpu-reading`) so a platform team can see which
//! pods' unloads the sidecar can prove and which stay `unverified`.

use k8s_openapi::api::core::v1::{Container, EnvVar, ResourceClaim};
use modelpool_crds::v1alpha1::GpuAccess;

/// Pod annotation naming where the sidecar's GPU readings come from.
pub const GPU_READING_ANNOTATION: &str = "modelpool.io/gpu-reading";

/// What the injection adds to the sidecar for its GPU readings.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GpuPlan {
    /// DRA claims the sidecar joins.
    pub claims: Vec<ResourceClaim>,
    /// Environment for the sidecar container.
    pub env: Vec<EnvVar>,
    /// Extra sidecar arguments.
    pub args: Vec<String>,
    /// The `modelpool.io/gpu-reading` value: `dra-claim`, `visible-devices`, `app-reported`.
    pub reading: &'static str,
    /// An admission warning for the user, when the plan cannot give what was asked.
    pub warning: Option<String>,
}

/// The app containers' DRA claims, each once, in order.
pub fn app_claims(containers: &[Container]) -> Vec<ResourceClaim> {
    let mut claims: Vec<ResourceClaim> = Vec::new();
    for claim in containers
        .iter()
        .filter_map(|c| c.resources.as_ref().and_then(|r| r.claims.as_ref()))
        .flatten()
    {
        if !claims
            .iter()
            .any(|c| c.name == claim.name && c.request == claim.request)
        {
            claims.push(claim.clone());
        }
    }
    claims
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The plan for `access` given the pod's app containers.
pub fn plan(containers: &[Container], access: GpuAccess) -> GpuPlan {
    let claims = app_claims(containers);
    let shared = |claims: Vec<ResourceClaim>| GpuPlan {
        claims,
        reading: "dra-claim",
        ..GpuPlan::default()
    };
    let app_reported = |warning: Option<String>| GpuPlan {
        reading: "app-reported",
        warning,
        ..GpuPlan::default()
    };
    match access {
        GpuAccess::Auto if claims.is_empty() => app_reported(None),
        GpuAccess::Auto => shared(claims),
        GpuAccess::SharedClaim if claims.is_empty() => app_reported(Some(
            "modelpool: gpu.access is SharedClaim but no app container uses a DRA resource claim; \
             the sidecar cannot read the GPU and unloads are verified only by the app's own readings"
                .into(),
        )),
        GpuAccess::SharedClaim => shared(claims),
        GpuAccess::VisibleDevices => GpuPlan {
            env: vec![
                env("NVIDIA_VISIBLE_DEVICES", "all"),
                env("NVIDIA_DRIVER_CAPABILITIES", "utility"),
            ],
            reading: "visible-devices",
            ..GpuPlan::default()
        },
        GpuAccess::None => GpuPlan {
            args: vec!["--no-nvml".into()],
            ..app_reported(None)
        },
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ResourceRequirements;

    use super::*;

    fn container(name: &str, claims: &[&str]) -> Container {
        Container {
            name: name.into(),
            resources: (!claims.is_empty()).then(|| ResourceRequirements {
                claims: Some(
                    claims
                        .iter()
                        .map(|c| ResourceClaim {
                            name: (*c).into(),
                            request: None,
                        })
                        .collect(),
                ),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        }
    }

    #[test]
    fn auto_shares_the_apps_claims_once_each() {
        let pod = [
            container("app", &["gpu", "nic"]),
            container("worker", &["gpu"]),
        ];
        let plan = plan(&pod, GpuAccess::Auto);
        let names: Vec<&str> = plan.claims.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["gpu", "nic"]);
        assert_eq!(plan.reading, "dra-claim");
        assert!(plan.env.is_empty() && plan.args.is_empty() && plan.warning.is_none());
    }

    #[test]
    fn auto_without_claims_asks_for_nothing() {
        let plan = plan(&[container("app", &[])], GpuAccess::Auto);
        assert_eq!(plan.reading, "app-reported");
        assert!(plan.claims.is_empty() && plan.env.is_empty() && plan.args.is_empty());
        assert!(plan.warning.is_none());
    }

    #[test]
    fn shared_claim_without_a_claim_warns() {
        let plan = plan(&[container("app", &[])], GpuAccess::SharedClaim);
        assert_eq!(plan.reading, "app-reported");
        assert!(plan.warning.as_deref().unwrap().contains("SharedClaim"));
    }

    #[test]
    fn visible_devices_gives_nvml_only_capabilities() {
        let plan = plan(&[container("app", &["gpu"])], GpuAccess::VisibleDevices);
        assert!(plan.claims.is_empty(), "no claim is joined in this mode");
        let env: Vec<(&str, &str)> = plan
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            env,
            [
                ("NVIDIA_VISIBLE_DEVICES", "all"),
                ("NVIDIA_DRIVER_CAPABILITIES", "utility")
            ]
        );
        assert_eq!(plan.reading, "visible-devices");
    }

    #[test]
    fn none_turns_nvml_off() {
        let plan = plan(&[container("app", &["gpu"])], GpuAccess::None);
        assert_eq!(plan.args, ["--no-nvml"]);
        assert!(plan.claims.is_empty());
        assert_eq!(plan.reading, "app-reported");
    }

    #[test]
    fn access_spellings_round_trip() {
        for access in [
            GpuAccess::Auto,
            GpuAccess::SharedClaim,
            GpuAccess::VisibleDevices,
            GpuAccess::None,
        ] {
            assert_eq!(access.as_str().parse::<GpuAccess>(), Ok(access));
            let json = serde_json::to_value(access).unwrap();
            assert_eq!(json, access.as_str());
        }
        let error = "Dra".parse::<GpuAccess>().unwrap_err();
        assert!(error.contains("\"Dra\"") && error.contains("SharedClaim"));
    }
}
