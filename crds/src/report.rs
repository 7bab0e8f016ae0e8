//! What a sidecar reports about its pod, as a compact JSON annotation on its own pod.
//!
//! The operator learns everything by watching pods (metadata only), never by polling
//! sidecars: each sidecar patches [`REPORT_ANNOTATION`] on its own pod, at most once per
//! rate-limit interval and only when something changed.

use serde::{Deserialize, Serialize};

/// The annotation key.
pub const REPORT_ANNOTATION: &str = "modelpool.io/report";

/// One sidecar's report. Short field names keep the annotation small (it is in every watch
/// event of the pod).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PodReport {
    /// State version: grows with every change the sidecar makes to its ledger.
    pub v: u64,
    /// The pool the sidecar enforces (its name).
    pub pool: String,
    /// Models held now.
    #[serde(default)]
    pub models: Vec<ModelReport>,
    /// VRAM held by the pool's models, bytes.
    #[serde(default)]
    pub vram: u64,
    /// RAM held by the pool's models, bytes.
    #[serde(default)]
    pub ram: u64,
    /// Device VRAM used/total when a GPU is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<(u64, u64)>,
    /// Loads since the sidecar started.
    #[serde(default)]
    pub loads: u64,
    /// Evictions (unloads for room, pressure or ceilings) since the sidecar started.
    #[serde(default)]
    pub evictions: u64,
    /// Whether measured usage is above a ceiling now.
    #[serde(default)]
    pub over: bool,
    /// Bytes (VRAM + RAM) of unloads whose memory was not seen back: lost capacity. With
    /// `enforcement: Restart` the operator restarts the pod while this is non-zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost: u64,
    /// Unloads whose memory no reading proved back (`unverified`) since the sidecar started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unverified: u64,
    /// Whether the sidecar has unloaded everything because its pool is being deleted.
    #[serde(default)]
    pub drained: bool,
    /// The last error, if any (e.g. a refused pool update, memory not reclaimed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    /// Sizes learned by measuring loads (held now or not), for the operator to keep in the
    /// pool's status so that every sidecar of the pool starts with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learned: Vec<LearnedReport>,
    /// Sizes estimated from the models' weights (models with no declared size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub est: Vec<EstimateReport>,
}

/// A model's size estimated from its weights' headers, bytes, where it is charged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct EstimateReport {
    /// The model.
    pub name: String,
    /// VRAM.
    #[serde(default)]
    pub vram: u64,
    /// RAM.
    #[serde(default)]
    pub ram: u64,
}

/// A size learned by measurement, under the size the pool declared (or estimated) for it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnedReport {
    /// The model.
    pub name: String,
    /// The largest VRAM a load of it measured, bytes.
    #[serde(default)]
    pub vram: u64,
    /// The largest RAM a load of it measured, bytes.
    #[serde(default)]
    pub ram: u64,
    /// The VRAM declared or estimated when it was learned (an edit that changes it starts over).
    #[serde(default)]
    pub dvram: u64,
    /// The RAM declared or estimated when it was learned.
    #[serde(default)]
    pub dram: u64,
    /// The VRAM the last load measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mvram: u64,
    /// The RAM the last load measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mram: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// One model in a report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelReport {
    /// The model.
    pub name: String,
    /// VRAM bytes.
    #[serde(default)]
    pub vram: u64,
    /// RAM bytes.
    #[serde(default)]
    pub ram: u64,
    /// Live leases.
    #[serde(default)]
    pub leases: u32,
    /// Loads of this model since start.
    #[serde(default)]
    pub loads: u64,
    /// Evictions of this model since start.
    #[serde(default)]
    pub evictions: u64,
}

impl PodReport {
    /// Parses a report annotation; `None` when absent or not a report.
    pub fn from_annotation(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The annotation text.
    pub fn to_annotation(&self) -> String {
        // A report is plain data; serializing it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}
