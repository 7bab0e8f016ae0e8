//! Eviction order among idle instances.
//!
//! `CostAware` is GreedyDual-Size (Cao & Irani, "Cost-Aware WWW Proxy Caching Algorithms",
//! USENIX Symposium on Internet Technologies and Systems, 1997): each cached item carries
//! `H = L + cost / size`, refreshed on every hit; the item with the smallest `H` is evicted and
//! the inflation value `L` becomes that `H`, so items not used for a long time age out even
//! when they are expensive. Here cost is the model's measured load time in seconds (the pool's
//! `loadSeconds` hint until a load has been measured, 1 s without either) and size is the
//! larger share of a ceiling it holds (`max(vram / limits.vram, ram / limits.ram)`): a model
//! that fills most of the RAM ceiling is big even when it holds little VRAM. Without
//! ceilings, size is the larger of its VRAM and RAM in GiB. (Sizing by VRAM alone made
//! CostAware keep RAM-heavy models while RAM was the tight ceiling: `BENCHMARKS.md`.)
//!
//! Priority comes first under both policies: a lower-priority instance is always evicted
//! before a higher-priority one.

use std::time::Duration;

use crate::{
    config::{EvictionPolicy, Limits},
    footprint::{Footprint, Resource},
};

/// Cost used when neither a measurement nor a hint exists.
pub const DEFAULT_LOAD_SECONDS: f64 = 1.0;

/// The size GreedyDual-Size divides by: the larger share of a ceiling, or GiB without any.
pub fn size(held: Footprint, limits: Limits) -> f64 {
    let shares: Vec<f64> = Resource::ALL
        .into_iter()
        .filter_map(|r| {
            limits
                .get(r)
                .filter(|limit| *limit > 0)
                .map(|limit| held.get(r) as f64 / limit as f64)
        })
        .collect();
    if shares.is_empty() {
        (held.vram.max(held.ram) as f64 / (1u64 << 30) as f64).max(1.0 / 1024.0)
    } else {
        shares.into_iter().fold(0.0, f64::max).max(1e-6)
    }
}

/// GreedyDual-Size credit of one instance: `L + cost / size`.
pub fn gds_credit(inflation: f64, load_seconds: f64, held: Footprint, limits: Limits) -> f64 {
    inflation + load_seconds.max(0.0) / size(held, limits)
}

/// A candidate for eviction, with what orders it.
#[derive(Clone, Debug)]
pub struct Candidate<K> {
    /// Which instance.
    pub key: K,
    /// Its model's priority.
    pub priority: i32,
    /// When it was last used.
    pub last_used: Duration,
    /// Its GreedyDual-Size credit.
    pub credit: f64,
}

/// Sorts candidates so that the first one is evicted first.
pub fn order<K: Ord>(policy: EvictionPolicy, candidates: &mut [Candidate<K>]) {
    candidates.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| match policy {
                EvictionPolicy::Lru => a.last_used.cmp(&b.last_used),
                EvictionPolicy::CostAware => a
                    .credit
                    .total_cmp(&b.credit)
                    .then_with(|| a.last_used.cmp(&b.last_used)),
            })
            .then_with(|| a.key.cmp(&b.key))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(key: u32, priority: i32, last_used: u64, credit: f64) -> Candidate<u32> {
        Candidate {
            key,
            priority,
            last_used: Duration::from_secs(last_used),
            credit,
        }
    }

    #[test]
    fn lru_evicts_the_oldest_and_priority_wins() {
        let mut c = vec![
            candidate(1, 0, 30, 0.0),
            candidate(2, 0, 10, 0.0),
            candidate(3, 5, 0, 0.0),
        ];
        order(EvictionPolicy::Lru, &mut c);
        let keys: Vec<u32> = c.iter().map(|c| c.key).collect();
        assert_eq!(keys, [2, 1, 3]);
    }

    #[test]
    fn cost_aware_evicts_cheap_per_byte_first() {
        // A 1 GiB model that reloads in 1 s vs a 1 GiB model that takes 30 s.
        let cheap = gds_credit(0.0, 1.0, Footprint::new(1 << 30, 0), Limits::default());
        let dear = gds_credit(0.0, 30.0, Footprint::new(1 << 30, 0), Limits::default());
        // Same cost, bigger model: lower credit per byte, so evicted first.
        let big = gds_credit(0.0, 1.0, Footprint::new(8 << 30, 0), Limits::default());
        let mut c = vec![
            candidate(1, 0, 0, dear),
            candidate(2, 0, 5, cheap),
            candidate(3, 0, 9, big),
        ];
        order(EvictionPolicy::CostAware, &mut c);
        let keys: Vec<u32> = c.iter().map(|c| c.key).collect();
        assert_eq!(keys, [3, 2, 1]);
    }

    #[test]
    fn a_model_filling_the_ram_ceiling_is_big_whatever_its_vram() {
        let limits = Limits {
            vram: Some(20 << 30),
            ram: Some(16 << 30),
        };
        // upscale: 4 GiB of 20 VRAM but 12 GiB of 16 RAM; t2v: 12 of 20 VRAM, 2 of 16 RAM.
        let upscale = size(Footprint::new(4 << 30, 12 << 30), limits);
        let t2v = size(Footprint::new(12 << 30, 2 << 30), limits);
        assert!((upscale - 0.75).abs() < 1e-9 && (t2v - 0.6).abs() < 1e-9);
        assert!(
            gds_credit(0.0, 8.0, Footprint::new(4 << 30, 12 << 30), limits)
                < gds_credit(0.0, 8.0, Footprint::new(12 << 30, 2 << 30), limits)
        );
    }

    #[test]
    fn inflation_ages_expensive_models() {
        // After evictions raised L, a fresh cheap model outranks an old expensive one.
        let old_dear = gds_credit(0.0, 30.0, Footprint::new(1 << 30, 0), Limits::default());
        let fresh_cheap = gds_credit(40.0, 1.0, Footprint::new(1 << 30, 0), Limits::default());
        assert!(fresh_cheap > old_dear);
    }
}
