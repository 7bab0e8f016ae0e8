//! The policy engine: a pure, deterministic core that decides admissions and evictions.
//!
//! No I/O and no clock of its own: every call gets `now` (time since an arbitrary epoch), and
//! every decision comes back as [`Output`]s for the caller (the sidecar, a benchmark, a test) to
//! carry out. The invariants (DESIGN section 4): never admit past a ceiling; never evict a model
//! with a live lease; pinned models stay; a release in Aggressive mode unloads at once; in Cache
//! mode, idle TTL and pressure unload.
//!
//! Accounting follows ModelMesh: an instance counts as held from the moment its load is granted
//! until its memory is *seen* back (`reclaimed`), and a reclaim that never completes is kept as
//! lost capacity rather than forgotten.
#![deny(missing_docs)]

mod config;
mod engine;
mod eviction;
mod footprint;

pub use config::{EvictionPolicy, Mode, ModelConfig, PoolConfig, UnsizedModels};
pub use engine::{
    Action, CheckResult, Counters, Engine, Holder, InstanceState, InstanceView, LearnedSize,
    LeaseId, Output, Readings, Refusal, RefusalReason, RequestId, SessionId, UnloadReason,
};
pub use footprint::{Footprint, Limits, Pair, Resource, Sizes, human_bytes};
