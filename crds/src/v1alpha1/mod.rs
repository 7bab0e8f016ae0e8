//! `modelpool.io/v1alpha1`.

pub mod conditions;
mod model_pool;

pub use model_pool::*;
