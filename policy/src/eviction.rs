//! Which idle instances go when room is needed.
//!
//! Priority comes first under both policies: a lower-priority instance is always chosen
//! before a higher-priority one.
//!
//! `Lru` evicts the least recently used idle instance first, each one that holds some of the
//! resource that is short, until the request fits.
//!
//! `CostAware` estimates, for each idle model, what evicting it will cost per second: its
//! reload time divided by the time until it is next asked for, `load_s / next_s`. That is the
//! rule of the clairvoyant schedule the eviction benchmark compares against (cost-weighted
//! Belady: evict the smallest `load_s / (size × time to next use)`), with the future replaced by
//! an estimate from the past:
//!
//! - `next_s = min(max(gap, since), long_gap)`. `gap` is a moving average of the time between
//!   requests for the model (weight [`GAP_WEIGHT`] on the newest), `since` the time since its
//!   last request: a model whose requests stop (the hot set moved on) sees `since` grow past
//!   its `gap`, so it loses its place without any tuned horizon, and a model that turns hot
//!   gets a short `gap` within a few requests. `long_gap` is its long-run mean time between
//!   requests, `(now − first request) / (requests − 1)`: the recent estimate may not make a
//!   model look colder than its whole history says. Without it, once every idle model had
//!   been idle longer than its recent gaps (a lull longer than the bursts' gaps, as in the
//!   benchmark's `bursty` trace), `since` alone decided, and the rule was LRU weighted by
//!   load time: the models that every other burst comes back to were evicted for a model
//!   asked for once in the lull, and reloaded at the next burst. `long_gap` is counted up to
//!   now, so it grows too while a model stays idle, `1 / (requests − 1)` as fast as `since`:
//!   a model asked for 100 times keeps its place about 100 times as long as one asked for
//!   twice, and a formerly hot model that is never asked for again still ages out. It adds no
//!   constant. Measured against the offline schedule (eviction benchmark, `costaware_keep`):
//!   on the tuning seeds `bursty` went from 1.07–1.24× to 1.00–1.14× and the geometric mean
//!   over all families from 1.064× to 1.051×; on 370 other trace/seed pairs (seeds 4–40, none
//!   of them report seeds) the geometric mean went from 1.062× to 1.059× and the pairs above
//!   1.15× from 32 to 29, better on seven of the nine families that have room, but `bursty`
//!   *rose* on average (1.146× to 1.173×): which models the next burst picks is a draw that no
//!   history predicts well, and keeping the often-used ones is right for some draws only.
//! - The estimates outlive the instance: an evicted model keeps its history (a "ghost", as in
//!   ARC or LeCaR), so a model evicted by mistake and asked for again soon comes back with a
//!   short `gap` and is kept the next time. A model never asked for twice gets the pool's mean
//!   time between requests times the number of models (what it would be if all were equally
//!   popular), so a one-off load does not look hot just because it is recent.
//!
//! The victims are then chosen as a *set*, not one by one in a fixed order: greedily the
//! candidate with the least cost per second per share of the shortfall it frees (only what is
//! short counts, and nothing beyond the shortfall), then any victim the others made
//! unnecessary is kept (the dearest first). So a cheap model that holds a little of the short
//! resource is not evicted when a model that frees the whole shortfall costs less per second,
//! and several small models are not evicted where one larger, colder one is enough. Under
//! pressure and over-ceiling eviction (which only know an excess in bytes) candidates go in
//! order of cost per second per share of the ceilings they hold ([`size`]).
//!
//! No adaptation between estimates (ARC/LeCaR-style): following whichever of this estimate
//! and a pure frequency one had evicted fewer models that were asked for again gained
//! 0.1–0.3 % on 1 000 trace/seed pairs, seeds 1–100 (`BENCHMARKS.md`, eviction, round 10), not
//! worth a second estimate and a regret ledger in the engine.
//!
//! This replaced GreedyDual-Size (`H = L + load_s / size`), which measured frequency only
//! through recency and gave small, cheap, RAM-heavy models the lowest credit, so those were
//! reloaded over and over when RAM was short (`BENCHMARKS.md`, eviction).

use std::time::Duration;

use crate::{
    config::{EvictionPolicy, Limits},
    footprint::{Footprint, Resource},
};

/// Cost used when neither a measurement nor a hint exists.
pub const DEFAULT_LOAD_SECONDS: f64 = 1.0;

/// Weight of the newest gap in a model's moving average of the time between its requests.
pub const GAP_WEIGHT: f64 = 0.3;

/// The size a model's cost is spread over: the larger share of a ceiling it holds, or GiB
/// without any ceiling.
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

/// What the engine remembers of a model's requests, kept after its instances are gone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// When it was last asked for.
    pub last_request: Option<Duration>,
    /// Moving average of the seconds between its requests.
    pub gap_s: Option<f64>,
    /// When it was first asked for.
    pub first_request: Option<Duration>,
    /// Requests counted.
    pub count: u64,
}

impl Demand {
    /// Counts a request at `now`.
    pub fn record(&mut self, now: Duration) {
        if let Some(last) = self.last_request {
            let gap = now.saturating_sub(last).as_secs_f64();
            self.gap_s = Some(match self.gap_s {
                Some(mean) => (1.0 - GAP_WEIGHT) * mean + GAP_WEIGHT * gap,
                None => gap,
            });
        }
        self.first_request.get_or_insert(now);
        self.count += 1;
        self.last_request = Some(now);
    }

    /// The long-run mean time between its requests, counted up to `now`: `(now − first) /
    /// (count − 1)`. `None` before its second request.
    pub fn long_gap_s(&self, now: Duration) -> Option<f64> {
        let first = self.first_request?;
        (self.count >= 2).then(|| now.saturating_sub(first).as_secs_f64() / (self.count - 1) as f64)
    }

    /// Seconds until it is likely asked for again: `min(max(gap, since), long_gap)`, with
    /// `prior_gap_s` standing in for a gap not yet seen (see the module docs).
    pub fn next_s(&self, now: Duration, prior_gap_s: f64) -> f64 {
        let since = self
            .last_request
            .map_or(prior_gap_s, |last| now.saturating_sub(last).as_secs_f64());
        let recent = self.gap_s.unwrap_or(prior_gap_s).max(since);
        self.long_gap_s(now)
            .map_or(recent, |long| recent.min(long))
            .max(1e-3)
    }
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
    /// What it holds.
    pub held: Footprint,
    /// Seconds of reloading per second that evicting it is expected to cost
    /// (`load_s / next_s`).
    pub loss: f64,
    /// Its [`size`].
    pub size: f64,
}

/// Sorts candidates so that the first one is evicted first (pressure and ceilings).
pub fn order<K: Ord>(policy: EvictionPolicy, candidates: &mut [Candidate<K>]) {
    candidates.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| match policy {
                EvictionPolicy::Lru => a.last_used.cmp(&b.last_used),
                EvictionPolicy::CostAware => (a.loss / a.size)
                    .total_cmp(&(b.loss / b.size))
                    .then_with(|| a.last_used.cmp(&b.last_used)),
            })
            .then_with(|| a.key.cmp(&b.key))
    });
}

/// The victims that free `short` (bytes still missing per resource), chosen as a set (see the
/// module docs). Returns them in the order chosen; empty when all of them together would not
/// be enough.
pub fn choose<K: Ord + Clone>(
    policy: EvictionPolicy,
    candidates: &[Candidate<K>],
    short: Footprint,
) -> Vec<K> {
    let covers = |chosen: &[usize]| {
        let freed = chosen
            .iter()
            .fold(Footprint::default(), |sum, &i| sum.plus(candidates[i].held));
        freed.vram >= short.vram && freed.ram >= short.ram
    };
    let all: Vec<usize> = (0..candidates.len()).collect();
    if short.is_zero() || !covers(&all) {
        return Vec::new();
    }
    let mut chosen: Vec<usize> = Vec::new();
    match policy {
        EvictionPolicy::Lru => {
            let mut sorted = candidates.to_vec();
            order(policy, &mut sorted);
            let mut missing = short;
            for c in sorted {
                if missing.is_zero() {
                    break;
                }
                let helps = Resource::ALL
                    .into_iter()
                    .any(|r| missing.get(r) > 0 && c.held.get(r) > 0);
                if helps {
                    missing = missing.minus(c.held);
                    if let Some(i) = candidates.iter().position(|x| x.key == c.key) {
                        chosen.push(i);
                    }
                }
            }
        }
        EvictionPolicy::CostAware => {
            let mut missing = short;
            let mut left: Vec<usize> = all;
            while !missing.is_zero() {
                // Share of what is still missing that a candidate frees.
                let useful = |c: &Candidate<K>| -> f64 {
                    Resource::ALL
                        .into_iter()
                        .filter(|r| missing.get(*r) > 0)
                        .map(|r| c.held.get(r).min(missing.get(r)) as f64 / missing.get(r) as f64)
                        .sum()
                };
                let best = left
                    .iter()
                    .copied()
                    .filter(|&i| useful(&candidates[i]) > 0.0)
                    .min_by(|&a, &b| {
                        let (ca, cb) = (&candidates[a], &candidates[b]);
                        ca.priority
                            .cmp(&cb.priority)
                            .then_with(|| (ca.loss / useful(ca)).total_cmp(&(cb.loss / useful(cb))))
                            .then_with(|| ca.last_used.cmp(&cb.last_used))
                            .then_with(|| ca.key.cmp(&cb.key))
                    });
                let Some(best) = best else { break };
                missing = missing.minus(candidates[best].held);
                chosen.push(best);
                left.retain(|&i| i != best);
            }
            // Keep any victim the others made unnecessary, the dearest (highest priority,
            // then highest loss) first.
            let mut by_dearness = chosen.clone();
            by_dearness.sort_by(|&a, &b| {
                let (ca, cb) = (&candidates[a], &candidates[b]);
                cb.priority
                    .cmp(&ca.priority)
                    .then_with(|| cb.loss.total_cmp(&ca.loss))
            });
            for i in by_dearness {
                let without: Vec<usize> = chosen.iter().copied().filter(|&j| j != i).collect();
                if covers(&without) {
                    chosen = without;
                }
            }
        }
    }
    chosen
        .into_iter()
        .map(|i| candidates[i].key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn candidate(key: u32, priority: i32, last_used: u64, loss: f64) -> Candidate<u32> {
        Candidate {
            key,
            priority,
            last_used: Duration::from_secs(last_used),
            held: Footprint::new(GIB, 0),
            loss,
            size: 1.0,
        }
    }

    fn with_held(mut c: Candidate<u32>, vram: u64, ram: u64) -> Candidate<u32> {
        c.held = Footprint::new(vram * GIB, ram * GIB);
        c
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
    fn next_use_is_the_larger_of_gap_and_idle_time() {
        let mut d = Demand::default();
        // Never asked twice: the prior.
        d.record(Duration::from_secs(0));
        assert_eq!(d.next_s(Duration::from_secs(5), 100.0), 100.0);
        d.record(Duration::from_secs(10));
        d.record(Duration::from_secs(20));
        // Gaps of 10 s: expected in 10 s while recently asked for ...
        assert!((d.next_s(Duration::from_secs(21), 100.0) - 10.0).abs() < 1e-9);
        // ... and no sooner than the time already gone by once it has gone quiet, unless its
        // whole history says sooner: 520 s over two gaps is one every 260 s.
        assert!((d.next_s(Duration::from_secs(520), 100.0) - 260.0).abs() < 1e-9);
        assert!((d.next_s(Duration::from_secs(200), 100.0) - 100.0).abs() < 1e-9);
        // A burst of short gaps pulls the average down.
        for t in [21, 22, 23, 24, 25] {
            d.record(Duration::from_secs(t));
        }
        assert!(d.next_s(Duration::from_secs(25), 100.0) < 3.0);
    }

    #[test]
    fn a_model_asked_for_often_stays_warm_through_a_lull() {
        // Bursts: 10 requests 2 s apart every 600 s, for 3 bursts (t = 0..18, 600..618,
        // 1200..1218). At t = 1800 the last burst is 582 s ago: its recent gap (2 s) says
        // nothing any more and `since` is 582 s, but over its history it was asked for every
        // 1800 / 29 = 62 s.
        let mut burst = Demand::default();
        for start in [0, 600, 1200] {
            for k in 0..10 {
                burst.record(Duration::from_secs(start + 2 * k));
            }
        }
        let now = Duration::from_secs(1800);
        assert!((burst.long_gap_s(now).unwrap() - 1800.0 / 29.0).abs() < 1e-9);
        assert!((burst.next_s(now, 100.0) - 1800.0 / 29.0).abs() < 1e-9);
        // A model asked for twice, once at the start and once in the lull 100 s ago, is
        // expected later than the bursting one, though used more recently.
        let mut twice = Demand::default();
        twice.record(Duration::from_secs(0));
        twice.record(Duration::from_secs(1700));
        assert!(twice.next_s(now, 100.0) > 1000.0);
        // The long-run gap grows while a model stays idle: a formerly hot model ages out.
        let later = Duration::from_secs(1800 + 29 * 600);
        assert!(burst.next_s(later, 100.0) > 600.0);
    }

    #[test]
    fn cost_aware_order_is_loss_per_share_and_priority_first() {
        let mut c = vec![
            candidate(1, 0, 0, 3.0),
            candidate(2, 0, 5, 1.0),
            candidate(3, 1, 9, 0.0),
        ];
        c[0].size = 3.0; // 1.0 per share
        c[1].size = 0.5; // 2.0 per share
        order(EvictionPolicy::CostAware, &mut c);
        let keys: Vec<u32> = c.iter().map(|c| c.key).collect();
        assert_eq!(keys, [1, 2, 3]);
    }

    #[test]
    fn one_model_that_covers_the_shortfall_beats_several_cheap_ones() {
        // 8 GiB VRAM missing: one 10 GiB model costing 5/s, or eight 1 GiB models at 1/s each.
        let mut c: Vec<Candidate<u32>> = (0..8)
            .map(|k| with_held(candidate(k, 0, 0, 1.0), 1, 0))
            .collect();
        c.push(with_held(candidate(99, 0, 0, 5.0), 10, 0));
        let victims = choose(EvictionPolicy::CostAware, &c, Footprint::new(8 * GIB, 0));
        assert_eq!(victims, [99]);
    }

    #[test]
    fn a_model_holding_none_of_what_is_short_stays() {
        // RAM is short; the cheapest model holds VRAM only.
        let c = vec![
            with_held(candidate(1, 0, 0, 0.1), 10, 0),
            with_held(candidate(2, 0, 0, 2.0), 1, 6),
        ];
        let victims = choose(EvictionPolicy::CostAware, &c, Footprint::new(0, 4 * GIB));
        assert_eq!(victims, [2]);
    }

    #[test]
    fn a_victim_made_unnecessary_by_later_ones_is_kept() {
        // 6 GiB missing. Greedy takes the 2 GiB model at 0.3/s first (0.3 per third of the
        // shortfall... 0.9 per whole), then needs the 6 GiB one (1.0 per whole), which alone
        // is enough: the first is kept.
        let c = vec![
            with_held(candidate(1, 0, 0, 0.3), 2, 0),
            with_held(candidate(2, 0, 0, 1.0), 6, 0),
        ];
        let victims = choose(EvictionPolicy::CostAware, &c, Footprint::new(6 * GIB, 0));
        assert_eq!(victims, [2]);
    }

    #[test]
    fn lower_priority_goes_first_even_when_dearer() {
        let c = vec![
            with_held(candidate(1, 5, 0, 0.1), 8, 0),
            with_held(candidate(2, 0, 0, 9.0), 8, 0),
        ];
        let victims = choose(EvictionPolicy::CostAware, &c, Footprint::new(4 * GIB, 0));
        assert_eq!(victims, [2]);
    }

    #[test]
    fn nothing_is_chosen_when_all_would_not_be_enough() {
        let c = vec![with_held(candidate(1, 0, 0, 0.1), 2, 0)];
        assert!(choose(EvictionPolicy::CostAware, &c, Footprint::new(4 * GIB, 0)).is_empty());
        assert!(choose(EvictionPolicy::Lru, &c, Footprint::new(4 * GIB, 0)).is_empty());
    }

    #[test]
    fn a_model_filling_the_ram_ceiling_is_big_whatever_its_vram() {
        let limits = Limits {
            vram: Some(20 << 30),
            ram: Some(16 << 30),
        };
        let upscale = size(Footprint::new(4 << 30, 12 << 30), limits);
        let t2v = size(Footprint::new(12 << 30, 2 << 30), limits);
        assert!((upscale - 0.75).abs() < 1e-9 && (t2v - 0.6).abs() < 1e-9);
    }
}
