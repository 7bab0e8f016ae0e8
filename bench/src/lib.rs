//! ModelPool's benchmarks: how close each part is to the limit it cannot beat, measured in the
//! same run as that limit. See `BENCHMARKS.md` for the figures and how to run them.
#![deny(missing_docs)]

pub mod admission;
pub mod bound;
pub mod drivers;
pub mod eviction;
pub mod exactness;
pub mod footprint;
pub mod http;
pub mod process;
pub mod proxy;
pub mod reclaim;
pub mod report;
pub mod rng;
pub mod scale;
pub mod tables;
pub mod trace;
