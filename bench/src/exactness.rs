//! Checks of the lower bound and the offline schedule on random small instances
//! (`eviction --exact N`):
//!
//! - `separate`: holds of zero and requests further apart than any load, where the exact
//!   optimum can be computed ([`bound::exact_optimum`]). The bound must be at most the optimum
//!   and the optimum at most every policy; the table says how far the offline schedule and the
//!   bound are from the optimum.
//! - `overlapping`: holds and loads overlap and requests wait; no exact optimum, but the bound
//!   must be at most every policy, and the table counts how often a policy beat the offline
//!   schedule.

use std::time::Duration;

use anyhow::bail;
use modelpool_policy::Limits;

use crate::{
    bound,
    eviction::{self, Contender},
    report::Row,
    rng::{Rng, Zipf},
    trace::{Model, Request, Workload},
};

/// A random small pool: 3 to 7 models, sizes and load times each over a 10x range,
/// independent; ceilings that hold about 40 to 70 % of the total, and the largest model.
fn small_pool(rng: &mut Rng) -> (Vec<Model>, Limits) {
    let n = 3 + rng.below(5);
    let log_uniform = |rng: &mut Rng, low: f64, high: f64| low * (high / low).powf(rng.uniform());
    let models: Vec<Model> = (0..n)
        .map(|i| {
            Model::new(
                &format!("m{i}"),
                log_uniform(rng, 1.0, 10.0),
                log_uniform(rng, 1.0, 10.0),
                log_uniform(rng, 1.0, 10.0),
            )
        })
        .collect();
    let fraction = 0.4 + 0.3 * rng.uniform();
    let cap = |f: fn(&Model) -> u64| {
        let total: u64 = models.iter().map(f).sum();
        let largest = models.iter().map(f).max().unwrap_or(0);
        ((total as f64 * fraction) as u64).max(largest)
    };
    let limits = Limits {
        vram: Some(cap(|m| m.vram)),
        ram: Some(cap(|m| m.ram)),
    };
    (models, limits)
}

/// A small instance of either class, from a seed.
pub fn instance(seed: u64, separate: bool) -> Workload {
    let mut rng = Rng::new(seed ^ 0xE8AC7);
    let (models, limits) = small_pool(&mut rng);
    let longest = models.iter().map(|m| m.load_s).fold(0.0, f64::max);
    let popularity = Zipf::new(models.len(), 0.3 + rng.uniform());
    let requests = 15 + rng.below(25);
    let mut w = Workload::new(
        if separate { "separate" } else { "overlapping" },
        models,
        limits,
    );
    w.acquire_timeout = Duration::from_secs(20 + rng.below(40) as u64);
    w.idle_ttl = Duration::from_secs(10 + rng.below(60) as u64);
    let mut t = 0.0;
    for _ in 0..requests {
        t += if separate {
            longest + 0.5 + rng.exp(5.0)
        } else {
            rng.exp(3.0)
        };
        let model = popularity.sample(&mut rng);
        let hold_s = if separate { 0.0 } else { rng.exp(4.0) };
        w.requests.push(Request { t, model, hold_s });
    }
    w
}

/// What one instance showed.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The lower bound.
    pub bound: f64,
    /// The exact optimum, where computed.
    pub exact: Option<f64>,
    /// The offline schedule's cost.
    pub offline: f64,
    /// The cheapest cost of any contender, and which.
    pub best: (f64, &'static str),
    /// Contenders (name, cost) that cost less than the bound (must be none).
    pub below_bound: Vec<(&'static str, f64)>,
    /// Contenders that cost less than the exact optimum (must be none).
    pub below_exact: Vec<(&'static str, f64)>,
}

/// Runs every contender, the bound and (where possible) the exact optimum on a workload.
pub fn evaluate(w: &Workload) -> anyhow::Result<Outcome> {
    let b = bound::lower_bound(w, 1000)?;
    if b.cold_only {
        bail!(
            "the LP solver failed on {} ({} requests)",
            w.name,
            w.requests.len()
        );
    }
    let exact = bound::exact_optimum(w);
    let mut best = (f64::INFINITY, "");
    let mut offline = f64::NAN;
    let mut below_bound = Vec::new();
    let mut below_exact = Vec::new();
    for c in Contender::ALL {
        let Some(stats) = eviction::run(w, c) else {
            continue;
        };
        let cost = stats.cost();
        if c == Contender::Offline {
            offline = cost;
        }
        if cost < best.0 {
            best = (cost, c.name());
        }
        if cost < b.cost_s - 1e-6 {
            below_bound.push((c.name(), cost));
        }
        if let Some(e) = exact
            && cost < e - 1e-6
        {
            below_exact.push((c.name(), cost));
        }
    }
    Ok(Outcome {
        bound: b.cost_s,
        exact,
        offline,
        best,
        below_bound,
        below_exact,
    })
}

/// `instances` instances of each class from consecutive seeds, summarised in one row per class.
pub fn check(instances: usize, seed: u64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for separate in [true, false] {
        let mut below_bound = 0u64;
        let mut below_exact = 0u64;
        let mut exact_above_bound = true;
        let mut offline_beaten = 0u64;
        let mut offline_over_exact: Vec<f64> = Vec::new();
        let mut bound_over_exact: Vec<f64> = Vec::new();
        let mut offline_over_bound: Vec<f64> = Vec::new();
        let mut best_over_bound: Vec<f64> = Vec::new();
        for i in 0..instances {
            let w = instance(
                seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                separate,
            );
            let o = evaluate(&w)?;
            below_bound += o.below_bound.len() as u64;
            below_exact += o.below_exact.len() as u64;
            if o.best.0 < o.offline - 1e-6 {
                offline_beaten += 1;
            }
            if let Some(e) = o.exact {
                exact_above_bound &= e >= o.bound - 1e-6;
                offline_over_exact.push(o.offline / e.max(1e-9));
                bound_over_exact.push(o.bound / e.max(1e-9));
            }
            offline_over_bound.push(o.offline / o.bound.max(1e-9));
            best_over_bound.push(o.best.0 / o.bound.max(1e-9));
        }
        let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
        let min = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::min);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut row = Row::new("eviction_exact")
            .with("class", if separate { "separate" } else { "overlapping" })
            .with("instances", instances)
            .with("policy_below_bound", below_bound)
            .with("offline_beaten_by_a_policy", offline_beaten)
            .num("offline_over_bound_mean", mean(&offline_over_bound), 4)
            .num("offline_over_bound_max", max(&offline_over_bound), 4)
            .num("best_policy_over_bound_mean", mean(&best_over_bound), 4);
        if separate {
            row = row
                .with("policy_below_exact", below_exact)
                .with("exact_at_least_bound", exact_above_bound)
                .num("offline_over_exact_mean", mean(&offline_over_exact), 4)
                .num("offline_over_exact_max", max(&offline_over_exact), 4)
                .num("bound_over_exact_mean", mean(&bound_over_exact), 4)
                .num("bound_over_exact_min", min(&bound_over_exact), 4);
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// No policy costs less than the bound; where the exact optimum is known, it lies
        /// between the bound and every policy (the offline schedule included).
        #[test]
        fn bound_below_every_policy_and_the_exact_optimum(seed in any::<u64>(), separate in any::<bool>()) {
            let w = instance(seed, separate);
            let o = evaluate(&w).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(o.below_bound.is_empty(), "below the bound {}: {:?} ({w:?})", o.bound, o.below_bound);
            prop_assert!(o.below_exact.is_empty(), "below the optimum {:?}: {:?}", o.exact, o.below_exact);
            if let Some(e) = o.exact {
                prop_assert!(e >= o.bound - 1e-6, "exact {e} below the bound {}", o.bound);
                prop_assert!(o.offline >= e - 1e-6);
            }
        }
    }

    #[test]
    fn the_exact_optimum_of_a_known_case() {
        // Two 6 GiB models under an 8 GiB ceiling, asked for in turn: every request loads.
        let mut w = Workload::new(
            "alternate",
            vec![
                Model::new("a", 6.0, 1.0, 2.0),
                Model::new("b", 6.0, 1.0, 3.0),
            ],
            Limits {
                vram: Some(8 << 30),
                ram: None,
            },
        );
        for (i, model) in [0, 1, 0, 1, 1].into_iter().enumerate() {
            w.requests.push(Request {
                t: 10.0 * i as f64,
                model,
                hold_s: 0.0,
            });
        }
        assert_eq!(bound::exact_optimum(&w), Some(2.0 + 3.0 + 2.0 + 3.0));
        let b = bound::lower_bound(&w, 100).unwrap();
        assert!(b.cost_s <= 10.0 + 1e-9 && b.cost_s > 9.9, "{b:?}");
    }

    #[test]
    fn windows_only_lower_the_bound() {
        let w = crate::trace::synthetic("phases", 100, 7).unwrap();
        let whole = bound::lower_bound(&w, 100).unwrap().cost_s;
        let cut = bound::lower_bound(&w, 30).unwrap().cost_s;
        assert!(cut <= whole + 1e-6, "{cut} > {whole}");
        let offline = eviction::run(&w, Contender::Offline).unwrap().cost();
        assert!(whole <= offline, "{whole} > {offline}");
    }
}
