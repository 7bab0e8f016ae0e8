//! A proven lower bound on the cost of every schedule of a workload, and the exact optimum of
//! small instances.
//!
//! # The cost
//!
//! As in [`crate::eviction`]: the load time of every load, plus every request's wait from
//! arrival to grant (or to refusal), plus the load time of every refused request.
//!
//! # What any schedule must do
//!
//! The simulated pool holds at most one copy of a model (one session). A copy is held against
//! the ceilings from the grant of its load until it is evicted. Three facts hold for every
//! policy the bench runs (the engine and the baselines alike), and are all the bound assumes:
//!
//! 1. Requests for the same model are answered (granted or refused) in arrival order.
//! 2. A granted request holds its model from its grant until it is done: `hold_s` after the
//!    grant, plus the load time if the grant was a load.
//! 3. Nothing is ever held past a ceiling. A request waits at most the acquire timeout `W`
//!    (plus one tick of the simulated clock) before it is refused, and a refused request
//!    waited at least `W`, unless its model can never fit, in which case it is refused at once.
//! 4. A request whose model's only copy is still loading is granted when the load ends.
//!
//! Let `q` and `q'` be consecutive requests for a model `m` (arrivals `a < a'`), and `D` the
//! wait of `q`. If `q'` did not pay a load (it was served by a copy that also served an earlier
//! request), then by (1) `q` was answered while that copy was held, so the copy was held all
//! through `[a + D, a']`. By (2), `q` holds `m` through `[a + D, a + hold)` and, when it paid
//! the load, through `[a + hold, a + hold + load)` as well.
//!
//! # The linear program
//!
//! Variables per request `q` (arrival `a`): `x` (it pays a load, or is refused: cost `load_s`),
//! `z ≤ x` (it is refused), `D ≥ 0` (its wait: cost 1 per second, and `D ≥ W·z`), and, at a
//! time `t` within `W + tick` of `a`, `v(t)` (not yet answered at `t`: `D ≥ (t − a)·v(t)`, and
//! answered by `t` means `D ≤ t − a`: `D ≤ (t − a) + (W + tick)·v(t)`).
//!
//! The constraints are checked once per request `q`, over the interval from its arrival `t`
//! to the next arrival `t⁺`. Per model, `y ≥ 0` is the share of it held throughout the
//! interval (and, for `q`'s own model, at `q`'s grant when that falls in the interval). For
//! each earlier request `r` of the window:
//!
//! - `y + z_r + v_r(t) ≥ 1` when `r` is still in use at `t⁺` (`a_r + hold_r ≥ t⁺`),
//! - `y + z_r + v_r(t) − x_r ≥ 0` when it would still be loading (`… + load ≥ t⁺`),
//! - `y + z_r + v_r(t) − v_r(s) ≥ 0` with `s = t⁺ − hold_r` otherwise: a wait shifts `r`'s time
//!   in use, so granted after `s` and by `t` it is still in use at `t⁺` (and the same with
//!   `s − load` and `− x_r`, rhs `−1`, for the load of a request that paid one),
//! - `y + x_{r'} + v_r(t) ≥ 1` when the next request `r'` of its model comes at `t⁺` or later,
//!   and `y + x_{r'} + Σ x_k ≥ 1` over `r` and the requests of the model before it that came
//!   within `W + tick` of `t`: the copy `r'` uses was loaded by a request up to `r` that paid,
//!   and it is held all through the interval unless that request was granted after `t`, so
//!   was still unanswered then,
//!
//! and for `q` itself `y + z_q + v_q(t⁺) ≥ 1`. Then for each ceiling `Σ_m size_m / ceiling ·
//! y_m ≤ 1`, and its knapsack-cover inequality: with `e = Σ size/ceiling − 1` the excess,
//! `Σ_m min(size_m/ceiling, e)·(1 − y_m) ≥ e` (whatever is not held must free `e`, and no model
//! counts for more than `e`; valid for every 0/1 point, and much tighter than the plain sum
//! when one model alone would free the excess). After the first solve, the covers of subsets
//! (some models taken as freed, [`violated_cover`]) that the optimum violates are added, and
//! the program is solved again, [`COVER_ROUNDS`] times. By (4), for requests `p` and `q` of
//! one model with `a_p + load > a_q`: `D_q ≥ (a_p + load − a_q)·(x_p − z_p − Σ x)`, the sum over
//! the requests of the model after `p` up to `q` (if none of them paid, `q` is served by
//! `p`'s copy). The first request of each model pays its load (the pool starts empty).
//! Minimise `Σ load_s·x + Σ D`.
//!
//! Every schedule gives a 0/1 point of this program (`v(t) = 1` exactly while the request
//! waits; `y = 1` for the models held throughout the interval, and for `q`'s model when it is
//! granted in it: those are all held at one moment, so they fit) whose objective is at most
//! the schedule's cost, so the optimum of the program is a
//! lower bound on the cost of every schedule. Generalized caching (sizes and costs that
//! differ) is NP-hard (Chrobak, Woeginger, Makino & Xu, "Caching is hard, even in the fault
//! model", 2012), so this relaxation is what can be computed; the interval formulation is the
//! one of Bar-Noy, Bar-Yehuda, Freund, Naor & Schieber ("A unified approach to approximating
//! resource allocation and scheduling", JACM 2001), here with two resources and with waiting.
//!
//! Relaxed, `v` may be fractional: a wait `D` relieves `r` of a share `D / (t − a)` of its
//! time in use at every `t`, so waiting looks much cheaper to the program than it is. That,
//! and fractional evictions, are where the bound is loose (`BENCHMARKS.md`): on the report
//! traces more than half of every schedule's cost is waiting, which the relaxation barely
//! sees. (Solving each window's program with `x`, `z`, `v`, `y` integral, by branch and bound,
//! raised windows of 40 requests by 14 % at 5 000 nodes, about 25 s per 200 requests: too
//! slow for the tables.)
//!
//! Long traces are cut into windows of consecutive requests, each solved on its own. Each
//! window's program keeps only the variables of its own requests and the constraints among
//! them (plus, for a model whose previous request lies in an earlier window, `y ≥ 1 − x'` at
//! times more than `W + tick` after that request). Dropping constraints and costs only lowers
//! an optimum, and the windows share no variable, so the sum of the windows' optima is still a
//! lower bound. The solver is `microlp` (pure Rust simplex); each window's optimum is lowered by
//! 1e-6 of itself before it is added, to cover round-off.

use std::time::Instant;

use anyhow::{Context, bail};
use microlp::{ComparisonOp, OptimizationDirection, Problem, Variable};

use crate::trace::{Model, Workload};

/// The tick of the simulated clock: how late past the acquire timeout a refusal may come.
pub const TICK_S: f64 = 1.0;

/// Rounds of knapsack-cover cuts added to each window's program after its first solve. On
/// `zipf-0.9` seed 1001 two raise the bound by 10 %; four add 1 % more for twice the time.
const COVER_ROUNDS: usize = 2;

/// A lower bound and what computing it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    /// No schedule of the workload costs less than this, seconds.
    pub cost_s: f64,
    /// Linear programs solved.
    pub windows: usize,
    /// Constraints of the largest program.
    pub rows: usize,
    /// Variables of the largest program.
    pub columns: usize,
    /// Wall time of the solves, seconds.
    pub solve_s: f64,
    /// The solver failed on some window, whose part of the bound is then only its cold
    /// loads (still a bound, a weaker one).
    pub cold_only: bool,
}

/// Seconds rounded to whole microseconds, as the simulator's clock has them.
fn micros(seconds: f64) -> f64 {
    (seconds * 1e6).round().max(0.0) / 1e6
}

/// Whether a model can ever fit under the ceilings.
fn fits_ever(m: &Model, w: &Workload) -> bool {
    w.limits.vram.is_none_or(|l| m.vram <= l) && w.limits.ram.is_none_or(|l| m.ram <= l)
}

/// The lower bound of a workload, solving programs of `window` requests each.
pub fn lower_bound(w: &Workload, window: usize) -> anyhow::Result<Bound> {
    // Times as the simulator sees them: whole microseconds.
    let mut rounded = w.clone();
    for r in &mut rounded.requests {
        r.t = micros(r.t);
        r.hold_s = micros(r.hold_s);
    }
    let w = &rounded;
    let window = window.max(1);
    let started = Instant::now();
    let n = w.requests.len();
    // Requests whose model can never fit are refused at once by every policy: each costs its
    // load time, and they take no part in the rest.
    let mut fixed = 0.0;
    let mut active: Vec<usize> = Vec::with_capacity(n);
    for (i, r) in w.requests.iter().enumerate() {
        if fits_ever(&w.models[r.model], w) {
            active.push(i);
        } else {
            fixed += w.models[r.model].load_s;
        }
    }
    // Previous and next request of the same model, among the active ones.
    let mut prev: Vec<Option<usize>> = vec![None; n];
    let mut next: Vec<Option<usize>> = vec![None; n];
    let mut last: Vec<Option<usize>> = vec![None; w.models.len()];
    for &i in &active {
        let m = w.requests[i].model;
        if let Some(p) = last[m] {
            prev[i] = Some(p);
            next[p] = Some(i);
        }
        last[m] = Some(i);
    }
    // With pinned models a request may be refused at once (never fits beside them): then a
    // refusal proves no wait.
    let pinned = w.models.iter().any(|m| m.pinned);
    let refusal_wait = if pinned {
        0.0
    } else {
        w.acquire_timeout.as_secs_f64()
    };
    let horizon = w.acquire_timeout.as_secs_f64() + TICK_S + 1e-9;
    let mut total = fixed;
    let mut bound = Bound {
        cost_s: 0.0,
        windows: 0,
        rows: 0,
        columns: 0,
        solve_s: 0.0,
        cold_only: false,
    };
    let chunks: Vec<&[usize]> = active.chunks(window).collect();
    // The windows are independent: solve them on every CPU.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len().max(1));
    let next_chunk = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, usize, f64, Option<f64>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next_chunk.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(chunk) = chunks.get(k) else { break };
                        let mut program =
                            Program::build(w, chunk, &prev, &next, refusal_wait, horizon);
                        let value = program.solve().ok();
                        done.push((program.rows, program.columns, program.cold, value));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (rows, columns, cold, value) in results {
        bound.windows += 1;
        bound.rows = bound.rows.max(rows);
        bound.columns = bound.columns.max(columns);
        match value {
            Some(value) => total += value - 1e-6 * value.abs(),
            None => {
                bound.cold_only = true;
                total += cold;
            }
        }
    }
    bound.cost_s = total.max(0.0);
    bound.solve_s = started.elapsed().as_secs_f64();
    Ok(bound)
}

/// `y + Σ terms >= rhs`: a lower bound on the share of a model held.
type LowerBound = (Vec<(Variable, f64)>, f64);

/// One window's linear program.
struct Program {
    problem: Problem,
    /// Each interval's `(y, share of the ceiling)` per resource that overflows: where cover
    /// cuts are looked for.
    knapsacks: Vec<Vec<(Variable, f64)>>,
    rows: usize,
    columns: usize,
    /// The cold loads it fixes (its value when the solver fails).
    cold: f64,
}

impl Program {
    fn build(
        w: &Workload,
        chunk: &[usize],
        prev: &[Option<usize>],
        next: &[Option<usize>],
        refusal_wait: f64,
        horizon: f64,
    ) -> Self {
        let mut problem = Problem::new(OptimizationDirection::Minimize);
        let mut rows = 0usize;
        let mut columns = 0usize;
        let mut cold = 0.0;
        let position = |i: usize| chunk.binary_search(&i).ok();
        let mut knapsacks = Vec::new();
        // Distinct arrival times of the window.
        let mut times: Vec<f64> = chunk.iter().map(|&i| w.requests[i].t).collect();
        times.dedup();
        // The next distinct time after t (infinite after the last).
        let after = |t: f64| {
            let k = times.partition_point(|&s| s <= t);
            times.get(k).copied().unwrap_or(f64::INFINITY)
        };
        // Per request: x (pays), z (refused), D (wait).
        let mut pays = Vec::with_capacity(chunk.len());
        let mut refused = Vec::with_capacity(chunk.len());
        let mut waits = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let r = &w.requests[i];
            let load = w.models[r.model].load_s;
            let is_first = prev[i].is_none();
            if is_first {
                cold += load;
            }
            let x = problem.add_var(load, (if is_first { 1.0 } else { 0.0 }, 1.0));
            let z = problem.add_var(0.0, (0.0, 1.0));
            let d = problem.add_var(1.0, (0.0, f64::INFINITY));
            problem.add_constraint([(z, 1.0), (x, -1.0)], ComparisonOp::Le, 0.0);
            problem.add_constraint([(d, 1.0), (z, -refusal_wait)], ComparisonOp::Ge, 0.0);
            columns += 3;
            rows += 2;
            pays.push(x);
            refused.push(z);
            waits.push(d);
        }
        // A request served by a copy an earlier one is loading waits for the load: if `p`
        // paid a load (and was not refused) and no request of its model from `p`'s next to
        // `q` paid, `q` is served by `p`'s copy, usable at `a_p + D_p + load` at the earliest.
        for (kq, &q) in chunk.iter().enumerate() {
            let a_q = w.requests[q].t;
            let mut between: Vec<Variable> = vec![pays[kq]];
            let mut p = prev[q];
            while let Some(i) = p {
                let Some(kp) = position(i) else { break };
                let r = &w.requests[i];
                let gap = r.t + micros(w.models[r.model].load_s) - a_q;
                if gap <= 0.0 {
                    break;
                }
                // D_q >= gap · (x_p − z_p − Σ x between)
                let mut terms = vec![(waits[kq], 1.0), (pays[kp], -gap), (refused[kp], gap)];
                terms.extend(between.iter().map(|&x| (x, gap)));
                problem.add_constraint(terms, ComparisonOp::Ge, 0.0);
                rows += 1;
                between.push(pays[kp]);
                p = prev[i];
            }
        }
        // v: request k not answered by time t (only within the horizon of its arrival).
        let mut unanswered: std::collections::HashMap<(usize, u64), Option<Variable>> =
            std::collections::HashMap::new();
        let mut unanswered_at =
            |problem: &mut Problem, rows: &mut usize, columns: &mut usize, k: usize, t: f64| {
                let a = w.requests[chunk[k]].t;
                let dt = t - a;
                if dt <= 0.0 {
                    return None;
                }
                *unanswered.entry((k, t.to_bits())).or_insert_with(|| {
                    if dt > horizon {
                        return None;
                    }
                    let v = problem.add_var(0.0, (0.0, 1.0));
                    // v = 1 exactly when k is still unanswered at t: then it waited at least
                    // dt; answered by t, it waited at most dt.
                    problem.add_constraint([(waits[k], 1.0), (v, -dt)], ComparisonOp::Ge, 0.0);
                    problem.add_constraint([(waits[k], 1.0), (v, -horizon)], ComparisonOp::Le, dt);
                    *columns += 1;
                    *rows += 2;
                    Some(v)
                })
            };
        // For each request q (a point): the models held throughout [a_q, next time), plus
        // q's own model at q's grant when that comes before the next time; they must fit.
        let n_models = w.models.len();
        for (kq, &q) in chunk.iter().enumerate() {
            let t = w.requests[q].t;
            let t_next = after(t);
            let mq = w.requests[q].model;
            // Lower bounds on the share held of each model: (terms, rhs) meaning
            // y + Σ terms >= rhs.
            let mut lower: Vec<Vec<LowerBound>> = vec![Vec::new(); n_models];
            // q's own model at its grant, unless it is answered at or after the next time.
            let late = if t_next.is_finite() {
                unanswered_at(&mut problem, &mut rows, &mut columns, kq, t_next)
            } else {
                None
            };
            let mut own = vec![(refused[kq], 1.0)];
            own.extend(late.map(|v| (v, 1.0)));
            lower[mq].push((own, 1.0));
            // Earlier requests of the window (and q's simultaneous ones are skipped: they
            // prove nothing held throughout).
            for (kr, &r) in chunk.iter().enumerate() {
                let req = &w.requests[r];
                if req.t >= t {
                    break;
                }
                let m = req.model;
                let model = &w.models[m];
                let v = unanswered_at(&mut problem, &mut rows, &mut columns, kr, t);
                let with_v = |mut terms: Vec<(Variable, f64)>| {
                    terms.extend(v.map(|v| (v, 1.0)));
                    terms
                };
                let load = micros(model.load_s);
                if req.t + req.hold_s >= t_next {
                    lower[m].push((with_v(vec![(refused[kr], 1.0)]), 1.0));
                } else {
                    if req.t + req.hold_s + load >= t_next {
                        lower[m].push((with_v(vec![(refused[kr], 1.0), (pays[kr], -1.0)]), 0.0));
                    }
                    // A wait shifts r's time in use: granted after `s` and by `t`, it is
                    // still in use at the next time (and, when it paid, still loading
                    // after `s'`).
                    let s = t_next - req.hold_s;
                    if s < t
                        && let Some(vs) =
                            unanswered_at(&mut problem, &mut rows, &mut columns, kr, s)
                    {
                        lower[m].push((with_v(vec![(refused[kr], 1.0), (vs, -1.0)]), 0.0));
                    }
                    let s_loading = s - load;
                    if req.t + req.hold_s + load < t_next
                        && s_loading < t
                        && let Some(vs) =
                            unanswered_at(&mut problem, &mut rows, &mut columns, kr, s_loading)
                    {
                        lower[m].push((
                            with_v(vec![(refused[kr], 1.0), (pays[kr], -1.0), (vs, -1.0)]),
                            -1.0,
                        ));
                    }
                }
                if let Some(j) = next[r]
                    && w.requests[j].t >= t_next
                    && let Some(kj) = position(j)
                {
                    lower[m].push((with_v(vec![(pays[kj], 1.0)]), 1.0));
                    // Relief needs a copy loaded after `t`: by a request of the model still
                    // unanswered at `t` (within the horizon) that paid.
                    let mut terms = vec![(pays[kj], 1.0), (pays[kr], 1.0)];
                    let mut back = prev[r];
                    let mut known = true;
                    while let Some(i) = back {
                        if w.requests[i].t + horizon <= t {
                            break;
                        }
                        match position(i) {
                            Some(ki) => terms.push((pays[ki], 1.0)),
                            None => {
                                known = false;
                                break;
                            }
                        }
                        back = prev[i];
                    }
                    if known {
                        lower[m].push((terms, 1.0));
                    }
                }
            }
            // Models whose previous request lies before the window, more than the horizon
            // before t: held until their next request unless it pays.
            for (kj, &j) in chunk.iter().enumerate() {
                let Some(p) = prev[j] else { continue };
                if position(p).is_some() {
                    continue;
                }
                if w.requests[p].t + horizon <= t && w.requests[j].t >= t_next {
                    lower[w.requests[j].model].push((vec![(pays[kj], 1.0)], 1.0));
                }
            }
            let mut held: Vec<(usize, Variable)> = Vec::new();
            for (m, bounds) in lower.into_iter().enumerate() {
                if bounds.is_empty() {
                    continue;
                }
                let y = problem.add_var(0.0, (0.0, 1.0));
                columns += 1;
                for (mut terms, rhs) in bounds {
                    terms.push((y, 1.0));
                    problem.add_constraint(terms, ComparisonOp::Ge, rhs);
                    rows += 1;
                }
                held.push((m, y));
            }
            if held.len() < 2 {
                continue;
            }
            for (limit, size) in [
                (w.limits.vram, (|m: &Model| m.vram) as fn(&Model) -> u64),
                (w.limits.ram, |m: &Model| m.ram),
            ] {
                let Some(limit) = limit.filter(|l| *l > 0) else {
                    continue;
                };
                let shares: Vec<(Variable, f64)> = held
                    .iter()
                    .map(|&(m, y)| (y, size(&w.models[m]) as f64 / limit as f64))
                    .filter(|(_, s)| *s > 0.0)
                    .collect();
                let total: f64 = shares.iter().map(|(_, s)| s).sum();
                let excess = total - 1.0;
                if excess <= 1e-12 {
                    continue;
                }
                problem.add_constraint(shares.clone(), ComparisonOp::Le, 1.0);
                rows += 1;
                // Knapsack cover: whatever is freed must free `excess`, and no model frees
                // more than that counts for. Stronger covers (some models taken as freed)
                // are added by `solve` where the relaxation's optimum violates them.
                let capped: Vec<(Variable, f64)> =
                    shares.iter().map(|&(y, s)| (y, s.min(excess))).collect();
                let capped_total: f64 = capped.iter().map(|(_, s)| s).sum();
                problem.add_constraint(capped, ComparisonOp::Le, capped_total - excess);
                rows += 1;
                knapsacks.push(shares);
            }
        }
        Self {
            problem,
            knapsacks,
            rows,
            columns,
            cold,
        }
    }

    fn solve(&mut self) -> anyhow::Result<f64> {
        let mut value = 0.0;
        for round in 0..=COVER_ROUNDS {
            let outcome = self.problem.solve().context("the LP solver failed")?;
            let solution = outcome
                .into_solution()
                .map_err(|_| anyhow::anyhow!("the LP solver was interrupted"))?;
            if !solution.objective().is_finite() {
                bail!("the LP optimum is not finite");
            }
            value = solution.objective();
            if round == COVER_ROUNDS {
                break;
            }
            let mut cuts = 0;
            for shares in &self.knapsacks {
                if let Some((terms, rhs)) = violated_cover(shares, |y| solution.var_value(y)) {
                    self.problem.add_constraint(terms, ComparisonOp::Le, rhs);
                    self.rows += 1;
                    cuts += 1;
                }
            }
            if cuts == 0 {
                break;
            }
        }
        Ok(value)
    }
}

/// The most violated knapsack cover of one ceiling at a relaxed point, if any: models are
/// taken as freed in the order the point frees them most (`1 − y` largest first), and for each
/// such set `A` whose shares do not free the excess `e` alone, the cover of the rest is
/// `Σ_{m ∉ A} min(s_m, e − s(A))·(1 − y_m) ≥ e − s(A)`. Valid for every 0/1 point: either a
/// freed model outside `A` frees the rest of the excess alone, or each freed one counts in full.
fn violated_cover(
    shares: &[(Variable, f64)],
    value: impl Fn(Variable) -> f64,
) -> Option<(Vec<(Variable, f64)>, f64)> {
    let excess: f64 = shares.iter().map(|(_, s)| s).sum::<f64>() - 1.0;
    let mut order: Vec<usize> = (0..shares.len()).collect();
    let freed = |k: usize| 1.0 - value(shares[k].0).clamp(0.0, 1.0);
    order.sort_by(|&a, &b| freed(b).total_cmp(&freed(a)).then(a.cmp(&b)));
    let mut taken = 0.0;
    let mut best: Option<(f64, usize, f64)> = None;
    for (k, &next_freed) in order.iter().enumerate() {
        let left = excess - taken;
        if left <= 1e-9 {
            break;
        }
        let lhs: f64 = order[k..]
            .iter()
            .map(|&j| shares[j].1.min(left) * freed(j))
            .sum();
        let violation = (left - lhs) / left;
        if violation > 1e-6 && best.is_none_or(|(v, _, _)| violation > v) {
            best = Some((violation, k, left));
        }
        taken += shares[next_freed].1;
    }
    let (_, k, left) = best?;
    let terms: Vec<(Variable, f64)> = order[k..]
        .iter()
        .map(|&j| (shares[j].0, shares[j].1.min(left)))
        .collect();
    let total: f64 = terms.iter().map(|(_, c)| c).sum();
    Some((terms, total - left))
}

/// The exact optimum of a workload where nothing overlaps: every hold is zero and requests are
/// further apart than any load, so at each arrival every loaded model is idle and no request
/// ever waits. The problem is then generalized caching with two resources, solved exactly by
/// dynamic programming over the sets of loaded models (at most 12 models). `None` when the
/// workload is not of that kind.
pub fn exact_optimum(w: &Workload) -> Option<f64> {
    let n = w.models.len();
    if n > 12 || w.models.iter().any(|m| m.pinned) {
        return None;
    }
    let longest = w.models.iter().map(|m| m.load_s).fold(0.0, f64::max);
    let apart = w
        .requests
        .windows(2)
        .all(|pair| pair[1].t - pair[0].t > longest + 1e-6);
    if !apart || w.requests.iter().any(|r| r.hold_s > 0.0) {
        return None;
    }
    let fits = |set: usize| {
        let (mut vram, mut ram) = (0u64, 0u64);
        for (i, m) in w.models.iter().enumerate() {
            if set & (1 << i) != 0 {
                vram += m.vram;
                ram += m.ram;
            }
        }
        w.limits.vram.is_none_or(|l| vram <= l) && w.limits.ram.is_none_or(|l| ram <= l)
    };
    let states = 1usize << n;
    let feasible: Vec<bool> = (0..states).map(fits).collect();
    let mut cost = vec![f64::INFINITY; states];
    cost[0] = 0.0;
    let mut refused_cost = 0.0;
    for r in &w.requests {
        let bit = 1usize << r.model;
        let load = w.models[r.model].load_s;
        if !feasible[bit] {
            // Never fits: refused at once by every policy.
            refused_cost += load;
            continue;
        }
        let mut next = vec![f64::INFINITY; states];
        for (set, &c) in cost.iter().enumerate() {
            if !c.is_finite() {
                continue;
            }
            let paid = if set & bit != 0 { c } else { c + load };
            // Keep any subset of what was loaded, plus the model asked for.
            let base = set | bit;
            let mut sub = base;
            loop {
                if sub & bit != 0 && feasible[sub] && paid < next[sub] {
                    next[sub] = paid;
                }
                if sub == 0 {
                    break;
                }
                sub = (sub - 1) & base;
            }
        }
        cost = next;
    }
    Some(cost.into_iter().fold(f64::INFINITY, f64::min) + refused_cost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelpool_policy::Limits;

    use crate::trace::Request;

    #[test]
    fn a_request_behind_a_loading_copy_pays_its_wait() {
        // One model, no ceiling: the first request loads for 10 s, the second comes 1 s later
        // and is served by that copy when it is loaded, after 9 s. Every schedule costs 19 s.
        let mut w = Workload::new(
            "piggyback",
            vec![Model::new("a", 1.0, 1.0, 10.0)],
            Limits::default(),
        );
        for t in [0.0, 1.0] {
            w.requests.push(Request {
                t,
                model: 0,
                hold_s: 0.5,
            });
        }
        let b = lower_bound(&w, 10).unwrap();
        assert!(b.cost_s > 18.99 && b.cost_s <= 19.0 + 1e-9, "{b:?}");
    }

    #[test]
    fn a_violated_cover_is_found_and_holds_for_every_packing() {
        let mut problem = Problem::new(OptimizationDirection::Minimize);
        let shares: Vec<(Variable, f64)> = [0.6, 0.5, 0.3]
            .into_iter()
            .map(|s| (problem.add_var(0.0, (0.0, 1.0)), s))
            .collect();
        // Fits the plain sum (0.6·1 + 0.5·0.8 + 0.3·0 = 1.0) but keeps most of the two models
        // that cannot both stay.
        let point = [1.0, 0.8, 0.0];
        let value = |y: Variable| point[shares.iter().position(|(v, _)| *v == y).unwrap()];
        let (terms, rhs) = violated_cover(&shares, value).expect("a violated cover");
        let at = |y: &dyn Fn(Variable) -> f64| terms.iter().map(|(v, c)| c * y(*v)).sum::<f64>();
        assert!(at(&value) > rhs + 1e-9, "{terms:?} <= {rhs}");
        // Every 0/1 packing that fits meets the cut.
        for mask in 0..8u32 {
            let bit = |y: Variable| {
                let k = shares.iter().position(|(v, _)| *v == y).unwrap();
                f64::from((mask >> k) & 1)
            };
            let used: f64 = shares.iter().map(|(v, s)| s * bit(*v)).sum();
            if used <= 1.0 + 1e-12 {
                assert!(at(&bit) <= rhs + 1e-9, "packing {mask:03b} cut off");
            }
        }
    }
}
