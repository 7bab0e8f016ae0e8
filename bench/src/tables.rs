//! The eviction tables of `BENCHMARKS.md`, written from the result rows
//! (`eviction --update-doc BENCHMARKS.md`).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::report::Row;

/// The line after which the tables go.
pub const BEGIN: &str = "<!-- eviction-tables:begin -->";
/// The line before which they end.
pub const END: &str = "<!-- eviction-tables:end -->";

fn text(row: &Row, key: &str) -> String {
    match row.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(v) => v.to_string(),
    }
}

fn num(row: &Row, key: &str) -> Option<f64> {
    row.get(key).and_then(Value::as_f64)
}

fn find<'a>(rows: &'a [Row], trace: &str, seed: &str, policy: &str) -> Option<&'a Row> {
    rows.iter().find(|r| {
        text(r, "trace") == trace && text(r, "seed") == seed && text(r, "policy") == policy
    })
}

fn fmt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// The ratio columns: the bound, then each contender's cost over the bound.
const RATIO_POLICIES: [&str; 11] = [
    "offline",
    "offline_ttl",
    "rate_oracle",
    "costaware_keep",
    "costaware_cache",
    "lru_cache",
    "aggressive",
    "manifest",
    "lru",
    "ttl_keepalive",
    "max_n_lru",
];

/// The baselines ours must beat by 10 %: (ours, baseline, whether both honour the idle TTL).
const PAIRS: [(&str, &str, bool); 3] = [
    ("costaware_keep", "lru", false),
    ("costaware_cache", "ttl_keepalive", true),
    ("costaware_keep", "max_n_lru", false),
];

/// The contenders that unload what stays idle for the idle TTL (or sooner): the "best known"
/// of a TTL pair is the cheapest of these.
const UNDER_TTL: [&str; 5] = [
    "costaware_cache",
    "lru_cache",
    "aggressive",
    "ttl_keepalive",
    "offline_ttl",
];

/// The markdown of the eviction tables.
pub fn markdown(rows: &[Row], memory: &[Row]) -> String {
    let mut out = String::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let key = (text(r, "trace"), text(r, "seed"));
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let _ = writeln!(
        out,
        "Cost over the lower bound (`ratio_to_bound`; 1.00 would be optimal, and no schedule \
         can be below it). `bound s` is the bound itself."
    );
    let _ = writeln!(out);
    let _ = write!(out, "| trace | seed | bound s |");
    for p in RATIO_POLICIES {
        let _ = write!(out, " {p} |");
    }
    let _ = writeln!(out);
    let _ = write!(out, "|---|---|---|");
    for _ in RATIO_POLICIES {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    for (trace, seed) in &keys {
        let bound = find(rows, trace, seed, "bound").and_then(|r| num(r, "cost_s"));
        let _ = write!(out, "| {trace} | {seed} | {} |", fmt(bound, 0));
        for p in RATIO_POLICIES {
            let ratio = find(rows, trace, seed, p).and_then(|r| num(r, "ratio_to_bound"));
            let _ = write!(out, " {} |", fmt(ratio, 2));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Targets. Ours over the offline schedule (target ≤ 1.15): `costaware_keep` over \
         `offline`, `costaware_cache` over `offline_ttl` (the clairvoyant schedule under the \
         same idle TTL), and, for information, `costaware_cache` over `offline` (no TTL). Ours \
         against each baseline at the same TTL, as a change in cost (target ≤ −10 %), with in \
         brackets the cheapest schedule known for the trace against the same baseline (any \
         contender, the offline ones included; for the TTL pair, any that honours the TTL): \
         where that is above −10 %, no known policy was 10 % cheaper."
    );
    let _ = writeln!(out);
    let _ = write!(
        out,
        "| trace | seed | costaware_keep / offline | costaware_cache / offline_ttl | \
         costaware_cache / offline |"
    );
    for (ours, base, _) in PAIRS {
        let _ = write!(out, " {ours} vs {base} (best known) |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (trace, seed) in &keys {
        let cost = |p: &str| find(rows, trace, seed, p).and_then(|r| num(r, "cost_s"));
        let to_offline =
            |p: &str| find(rows, trace, seed, p).and_then(|r| num(r, "ratio_to_offline"));
        let best = |under_ttl: bool| {
            rows.iter()
                .filter(|r| {
                    &text(r, "trace") == trace
                        && &text(r, "seed") == seed
                        && text(r, "kind") != "bound"
                        && (!under_ttl || UNDER_TTL.contains(&text(r, "policy").as_str()))
                })
                .filter_map(|r| num(r, "cost_s"))
                .fold(f64::INFINITY, f64::min)
        };
        let over = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let _ = write!(
            out,
            "| {trace} | {seed} | {} | {} | {} |",
            fmt(to_offline("costaware_keep"), 3),
            fmt(over(cost("costaware_cache"), cost("offline_ttl")), 3),
            fmt(to_offline("costaware_cache"), 3)
        );
        let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 && a.is_finite() => {
                format!("{:+.1} %", 100.0 * (a / b - 1.0))
            }
            _ => "-".to_owned(),
        };
        for (ours, base, under_ttl) in PAIRS {
            let _ = write!(
                out,
                " {} ({}) |",
                delta(cost(ours), cost(base)),
                delta(Some(best(under_ttl)), cost(base))
            );
        }
        let _ = writeln!(out);
    }
    verdicts(&mut out, rows, &keys);
    if !memory.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Cost against memory held (first seed of each trace): TTL policies at several idle \
             TTLs, Aggressive and plain LRU. ★ marks the Pareto front (nothing else both costs \
             less and holds less VRAM + RAM)."
        );
        let mut traces: Vec<(String, String)> = Vec::new();
        for r in memory {
            let key = (text(r, "trace"), text(r, "seed"));
            if !traces.iter().any(|(t, _)| *t == key.0) {
                traces.push(key);
            }
        }
        for (trace, seed) in traces {
            let _ = writeln!(out);
            let _ = writeln!(out, "`{trace}` (seed {seed}):");
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| policy | cost s | held VRAM GiB | held RAM GiB | loads | |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|");
            for r in memory
                .iter()
                .filter(|r| text(r, "trace") == trace && text(r, "seed") == seed)
            {
                let star = if r.get("pareto") == Some(&Value::Bool(true)) {
                    "★"
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {star} |",
                    text(r, "policy"),
                    fmt(num(r, "cost_s"), 0),
                    fmt(num(r, "held_vram_gib_mean"), 1),
                    fmt(num(r, "held_ram_gib_mean"), 1),
                    text(r, "loads"),
                );
            }
        }
    }
    out
}

/// What can be said of one (ours, baseline) pair on one trace and seed against the 10 %
/// target, from the costs alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Ours is at least 10 % cheaper.
    Met,
    /// Ours is not, and an online contender (one that does not know the future) is.
    MissedOnline,
    /// Ours is not, and only a clairvoyant contender is, the rate oracle among them: knowing
    /// each model's true request rate would have been enough.
    MissedRates,
    /// Ours is not, and only the offline schedule is (not the rate oracle): it takes knowing
    /// the order of the requests.
    MissedClairvoyant,
    /// No known schedule is 10 % cheaper, and the bound does not rule it out.
    NoneKnown,
    /// The lower bound is above 90 % of the baseline: no schedule at all can be 10 % cheaper.
    NoneCan,
}

impl Verdict {
    /// Judges `ours` against `base`, given the cheapest online and clairvoyant costs known,
    /// the rate oracle's (`rate_oracle`, where it applies) and the lower bound (all on the
    /// same trace, under the same TTL rule).
    pub fn judge(
        ours: f64,
        base: f64,
        best_online: f64,
        best_clairvoyant: f64,
        rate_oracle: Option<f64>,
        bound: Option<f64>,
    ) -> Self {
        let target = 0.9 * base;
        if ours <= target {
            Verdict::Met
        } else if bound.is_some_and(|b| b > target) {
            Verdict::NoneCan
        } else if best_online <= target {
            Verdict::MissedOnline
        } else if rate_oracle.is_some_and(|r| r <= target) {
            Verdict::MissedRates
        } else if best_clairvoyant <= target {
            Verdict::MissedClairvoyant
        } else {
            Verdict::NoneKnown
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::MissedOnline => "missed (an online contender is)",
            Verdict::MissedRates => "missed (the rate oracle is)",
            Verdict::MissedClairvoyant => "missed (only the offline schedule is)",
            Verdict::NoneKnown => "none known",
            Verdict::NoneCan => "none can (bound)",
        }
    }
}

/// The per-pair verdicts on the targets, and their counts.
fn verdicts(out: &mut String, rows: &[Row], keys: &[(String, String)]) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Verdicts, computed from the rows above. ≥ 10 % cheaper than the baseline: `met`; \
         `none can (bound)` where the lower bound itself is above 90 % of the baseline (proven: \
         no schedule, online or clairvoyant, is 10 % cheaper); `none known` where no contender \
         is 10 % cheaper and the bound does not rule it out; `missed` where one is, saying \
         whether an online contender (one that does not know the future) is, the rate oracle \
         (ours told each model's true request rate over the trace), or only the offline \
         schedule (which knows the order of the requests). The TTL pair counts only contenders \
         that honour the TTL (the bound holds for every schedule, so for those too)."
    );
    let _ = writeln!(out);
    let _ = write!(out, "| trace | seed | costaware_keep / offline ≤ 1.15 |");
    for (ours, base, _) in PAIRS {
        let _ = write!(out, " {ours} vs {base} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut counts = vec![Vec::new(); PAIRS.len()];
    let mut offline_misses = Vec::new();
    let mut offline_pairs = 0;
    let mut to_bound: Vec<f64> = Vec::new();
    for (trace, seed) in keys {
        let row = |p: &str| find(rows, trace, seed, p);
        let cost = |p: &str| row(p).and_then(|r| num(r, "cost_s"));
        let bound = cost("bound");
        let best = |under_ttl: bool, clairvoyant: bool| {
            rows.iter()
                .filter(|r| {
                    &text(r, "trace") == trace
                        && &text(r, "seed") == seed
                        && text(r, "kind") != "bound"
                        && (text(r, "kind") == "clairvoyant") == clairvoyant
                        && (!under_ttl || UNDER_TTL.contains(&text(r, "policy").as_str()))
                })
                .filter_map(|r| num(r, "cost_s"))
                .fold(f64::INFINITY, f64::min)
        };
        let ratio = row("costaware_keep").and_then(|r| num(r, "ratio_to_offline"));
        if let Some(b) = row("costaware_keep").and_then(|r| num(r, "ratio_to_bound")) {
            to_bound.push(b);
        }
        let within = match ratio {
            Some(r) => {
                offline_pairs += 1;
                if r > 1.15 {
                    offline_misses.push(format!("`{trace}` {seed} ({r:.2})"));
                }
                format!("{} ({r:.3})", if r <= 1.15 { "met" } else { "missed" })
            }
            None => "-".to_owned(),
        };
        let _ = write!(out, "| {trace} | {seed} | {within} |");
        for (i, (ours, base, under_ttl)) in PAIRS.into_iter().enumerate() {
            let (Some(o), Some(b)) = (cost(ours), cost(base)) else {
                let _ = write!(out, " - |");
                continue;
            };
            // The rate oracle keeps models through any lull: not a TTL contender.
            let oracle = if under_ttl { None } else { cost("rate_oracle") };
            let v = Verdict::judge(
                o,
                b,
                best(under_ttl, false),
                best(under_ttl, true),
                oracle,
                bound,
            );
            counts[i].push((v, format!("`{trace}` {seed}")));
            let _ = write!(out, " {} |", v.label());
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- `costaware_keep` ≤ 1.15× the offline schedule on {} of {offline_pairs} pairs{}.",
        offline_pairs - offline_misses.len(),
        if offline_misses.is_empty() {
            String::new()
        } else {
            format!("; not on {}", offline_misses.join(", "))
        }
    );
    if let (Some(low), Some(high)) = (
        to_bound.iter().copied().reduce(f64::min),
        to_bound.iter().copied().reduce(f64::max),
    ) {
        let _ = writeln!(
            out,
            "- `costaware_keep` over the lower bound: {low:.2}–{high:.2}× on {} pairs.",
            to_bound.len()
        );
    }
    for ((ours, base, _), judged) in PAIRS.into_iter().zip(&counts) {
        let of = |v: Verdict| -> Vec<&str> {
            judged
                .iter()
                .filter(|(x, _)| *x == v)
                .map(|(_, k)| k.as_str())
                .collect()
        };
        let (met, online, rates, clairvoyant, known, can) = (
            of(Verdict::Met),
            of(Verdict::MissedOnline),
            of(Verdict::MissedRates),
            of(Verdict::MissedClairvoyant),
            of(Verdict::NoneKnown),
            of(Verdict::NoneCan),
        );
        let list = |v: &[&str]| {
            if v.is_empty() {
                String::new()
            } else {
                format!(": {}", v.join(", "))
            }
        };
        let _ = writeln!(
            out,
            "- `{ours}` vs `{base}`: met on {} of the {} pairs where a known schedule is 10 % \
             cheaper; missed where an online contender is on {}{}; missed where the rate oracle \
             is on {}{}; missed where only the offline schedule is on {}{}; none known on {}; \
             none can (bound) on {}{}.",
            met.len(),
            met.len() + online.len() + rates.len() + clairvoyant.len(),
            online.len(),
            list(&online),
            rates.len(),
            list(&rates),
            clairvoyant.len(),
            list(&clairvoyant),
            known.len(),
            can.len(),
            list(&can),
        );
    }
}

/// Replaces what lies between the markers in a file.
pub fn splice(path: &Path, tables: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let (Some(begin), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        bail!(
            "{} lacks the lines {BEGIN} and {END} that say where the tables go",
            path.display()
        );
    };
    if end < begin {
        bail!("{}: {END} comes before {BEGIN}", path.display());
    }
    let head = &doc[..begin + BEGIN.len()];
    let tail = &doc[end..];
    let new = format!("{head}\n{tables}{tail}");
    std::fs::write(path, new).with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn verdicts_follow_the_costs_and_the_bound() {
        // Baseline 100: the target is 90.
        assert_eq!(
            Verdict::judge(89.0, 100.0, 89.0, 80.0, None, Some(50.0)),
            Verdict::Met
        );
        assert_eq!(
            Verdict::judge(95.0, 100.0, 95.0, 92.0, Some(85.0), Some(91.0)),
            Verdict::NoneCan
        );
        assert_eq!(
            Verdict::judge(95.0, 100.0, 85.0, 80.0, Some(85.0), Some(50.0)),
            Verdict::MissedOnline
        );
        assert_eq!(
            Verdict::judge(95.0, 100.0, 95.0, 80.0, Some(95.0), None),
            Verdict::MissedClairvoyant
        );
        assert_eq!(
            Verdict::judge(95.0, 100.0, 95.0, 80.0, Some(88.0), None),
            Verdict::MissedRates
        );
        assert_eq!(
            Verdict::judge(95.0, 100.0, 93.0, 91.0, None, Some(50.0)),
            Verdict::NoneKnown
        );
    }
}
