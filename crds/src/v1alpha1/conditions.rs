//! Condition types and reasons written to `status.conditions`, one constant per wire string.

/// Condition types.
pub mod types {
    /// The pool is valid and its pods report.
    pub const READY: &str = "Ready";
    /// Some pods do not report, or report errors.
    pub const DEGRADED: &str = "Degraded";
    /// Measured usage in some pod is above a ceiling.
    pub const CEILING_EXCEEDED: &str = "CeilingExceeded";
    /// Another pool in the namespace selects the same pods.
    pub const CONFLICT: &str = "Conflict";
    /// Every pod the pool selects carries the sidecar (False: some run ungoverned).
    pub const SIDECARS_INJECTED: &str = "SidecarsInjected";
    /// Every unload was proven by a reading (False: some pods' unloads are `unverified`).
    pub const RECLAIM_VERIFIED: &str = "ReclaimVerified";
}

/// Condition reasons (PascalCase, as the API conventions ask).
pub mod reasons {
    /// Every matched pod reports.
    pub const ALL_PODS_REPORTING: &str = "AllPodsReporting";
    /// No pod matches the selector yet.
    pub const NO_PODS: &str = "NoPods";
    /// Some matched pods have not reported.
    pub const PODS_NOT_REPORTING: &str = "PodsNotReporting";
    /// A sidecar reported an error.
    pub const SIDECAR_ERROR: &str = "SidecarError";
    /// Usage within the ceilings.
    pub const WITHIN_CEILINGS: &str = "WithinCeilings";
    /// Usage above a ceiling.
    pub const OVER_CEILING: &str = "OverCeiling";
    /// An older pool selects overlapping pods.
    pub const OVERLAPPING_SELECTOR: &str = "OverlappingSelector";
    /// The spec breaks a rule CEL cannot check (see `validate_pool`).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// No overlap with other pools.
    pub const NO_CONFLICT: &str = "NoConflict";
    /// Every selected pod carries the sidecar.
    pub const ALL_PODS_INJECTED: &str = "AllPodsInjected";
    /// Some selected pods run without the sidecar (admitted while the webhook was unreachable,
    /// or before the pool existed): nothing limits them.
    pub const PODS_WITHOUT_SIDECAR: &str = "PodsWithoutSidecar";
    /// Every unload so far was seen back by a reading.
    pub const ALL_UNLOADS_VERIFIED: &str = "AllUnloadsVerified";
    /// Some unloads were taken on the app's or server's word: no reading covers their memory
    /// (VRAM with no GPU reading in the pod, see docs/gpu.md).
    pub const UNLOADS_UNVERIFIED: &str = "UnloadsUnverified";
}
