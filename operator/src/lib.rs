//! The ModelPool operator: reconciles pools and their pods, injects the sidecar, aggregates
//! what sidecars report into `status`, and drains pools on delete.

pub mod args;
pub mod certs;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod webhook;

/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "modelpool-operator";
