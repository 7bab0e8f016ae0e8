//! The ModelPool API (`modelpool.io/v1alpha1`): the CRD types, the generated CRD, and
//! reading a pool from a YAML manifest with errors that name the field and the problem.
//!
//! No runtime code lives here: the operator, the sidecar and the tests all depend on it.
#![deny(missing_docs)]

pub mod pool_file;
pub mod quantity;
pub mod report;
pub mod v1alpha1;
pub mod validate;

pub use pool_file::{PoolFileError, load_pool_file, parse_pool};
pub use quantity::{Quantity, QuantityError, human_bytes, parse_bytes};
pub use v1alpha1::{ModelPool, ModelPoolSpec, ModelPoolStatus};
pub use validate::{FieldError, FieldErrors, validate_pool};

/// The API group.
pub const GROUP: &str = "modelpool.io";
/// `apiVersion` of the current version.
pub const API_VERSION: &str = "modelpool.io/v1alpha1";
/// The pod label that names a pod's pool (and selects it for injection).
pub const POOL_LABEL: &str = "modelpool.io/pool";

/// The CRD as YAML, exactly as committed in `crds/modelpool.yaml`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser_error::Error> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&ModelPool::crd())
}
