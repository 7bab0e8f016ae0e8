//! The baselines the engine is compared with: a cache of models with a victim rule (LRU,
//! Ollama's by-name order, Belady and cost-weighted Belady for the clairvoyant schedule), an
//! optional idle TTL and an optional count cap, driven by the same simulated clock as the
//! engine (`super::simulate`).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use modelpool_policy::Footprint;

use super::{Backend, GIB, OLLAMA_MAX_LOADED, Out, Stats, micros, simulate};
use crate::trace::{Model, Workload};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Victim {
    Lru,
    /// Ollama: by keep-alive duration (the same for all here), then model path (name).
    Name,
    Belady,
    BeladyCost,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    loading: bool,
    leases: u32,
    last_used: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    request: usize,
    model: usize,
    since: Duration,
}

/// A cache of models with a victim rule, an optional idle TTL and an optional count limit,
/// queueing like the engine does (FIFO; a blocked head makes room, later requests pass it
/// only while they fit and the head has waited less than half the acquire timeout).
pub(super) struct Simple<'w> {
    models: &'w [Model],
    limits: modelpool_policy::Limits,
    victim: Victim,
    ttl: Option<Duration>,
    max_n: Option<usize>,
    /// The count cap does not know memory (Ray): loads it allows that memory does not are
    /// counted in `would_oom`.
    pub(super) memory_blind: bool,
    timeout: Duration,
    slots: Vec<Option<Slot>>,
    queue: Vec<Waiting>,
    leases: HashMap<u64, usize>,
    next_lease: u64,
    /// Arrival times per model, microseconds, sorted (the clairvoyant rules only).
    future: Vec<Vec<u64>>,
    would_oom: u64,
    oom_requests: HashSet<usize>,
}

impl<'w> Simple<'w> {
    pub(super) fn new(
        w: &'w Workload,
        victim: Victim,
        ttl: Option<Duration>,
        max_n: Option<usize>,
    ) -> Self {
        let mut future = vec![Vec::new(); w.models.len()];
        if matches!(victim, Victim::Belady | Victim::BeladyCost) {
            for r in &w.requests {
                future[r.model].push(micros(r.t));
            }
            for f in &mut future {
                f.sort_unstable();
            }
        }
        Self {
            models: &w.models,
            limits: w.limits,
            victim,
            ttl,
            max_n,
            memory_blind: false,
            timeout: w.acquire_timeout,
            slots: vec![None; w.models.len()],
            queue: Vec::new(),
            leases: HashMap::new(),
            next_lease: 1,
            future,
            would_oom: 0,
            oom_requests: HashSet::new(),
        }
    }

    fn footprint(&self, model: usize) -> Footprint {
        Footprint::new(self.models[model].vram, self.models[model].ram)
    }

    fn count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn fits_memory(&self, need: Footprint) -> bool {
        let held = self.held();
        self.limits.vram.is_none_or(|l| held.vram + need.vram <= l)
            && self.limits.ram.is_none_or(|l| held.ram + need.ram <= l)
    }

    fn fits(&self, model: usize) -> bool {
        self.max_n.is_none_or(|n| self.count() < n) && self.fits_memory(self.footprint(model))
    }

    fn never_fits(&self, model: usize) -> bool {
        let pinned = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.is_some() && self.models[*i].pinned)
            .fold(Footprint::default(), |sum, (i, _)| {
                sum.plus(self.footprint(i))
            });
        let need = self.footprint(model);
        self.limits
            .vram
            .is_some_and(|l| need.vram > l.saturating_sub(pinned.vram))
            || self
                .limits
                .ram
                .is_some_and(|l| need.ram > l.saturating_sub(pinned.ram))
    }

    fn idle(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.is_some_and(|s| !s.loading && s.leases == 0) && !self.models[*i].pinned
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn next_use(&self, model: usize, now: Duration) -> Option<u64> {
        let now = now.as_micros() as u64;
        let f = &self.future[model];
        f.get(f.partition_point(|&t| t <= now)).copied()
    }

    /// Size as a share of the ceilings: the larger of the two.
    fn size(&self, model: usize) -> f64 {
        let m = &self.models[model];
        let share = |bytes: u64, limit: Option<u64>| {
            limit.map_or(bytes as f64 / GIB, |l| bytes as f64 / l.max(1) as f64)
        };
        share(m.vram, self.limits.vram)
            .max(share(m.ram, self.limits.ram))
            .max(1e-9)
    }

    /// Idle models, first to go first.
    fn order(&self, now: Duration, mut idle: Vec<usize>) -> Vec<usize> {
        let last_used = |i: usize| self.slots[i].map_or(Duration::ZERO, |s| s.last_used);
        match self.victim {
            Victim::Lru => idle.sort_by_key(|&i| (last_used(i), i)),
            Victim::Name => idle.sort_by(|&a, &b| self.models[a].name.cmp(&self.models[b].name)),
            Victim::Belady => idle.sort_by(|&a, &b| {
                let next = |i| self.next_use(i, now).unwrap_or(u64::MAX);
                next(b)
                    .cmp(&next(a))
                    .then(self.size(b).total_cmp(&self.size(a)))
                    .then(a.cmp(&b))
            }),
            Victim::BeladyCost => {
                let now_us = now.as_micros() as u64;
                let score = |i: usize| match self.next_use(i, now) {
                    None => 0.0,
                    Some(t) => {
                        self.models[i].load_s
                            / (self.size(i) * ((t - now_us) as f64 / 1e6).max(1e-6))
                    }
                };
                idle.sort_by(|&a, &b| {
                    score(a)
                        .total_cmp(&score(b))
                        .then(self.size(b).total_cmp(&self.size(a)))
                        .then(a.cmp(&b))
                });
            }
        }
        idle
    }

    fn evict(&mut self, model: usize, out: &mut Vec<Out>) {
        self.slots[model] = None;
        out.push(Out::Unload { model });
    }

    /// Evicts idle models until `model` fits, when evicting every idle one would be enough.
    fn make_room(&mut self, now: Duration, request: usize, model: usize, out: &mut Vec<Out>) {
        if let Some(n) = self.max_n {
            let mut victims = self.order(now, self.idle()).into_iter();
            while self.count() >= n {
                let Some(victim) = victims.next() else { return };
                self.evict(victim, out);
            }
            if self.memory_blind
                && !self.fits_memory(self.footprint(model))
                && self.oom_requests.insert(request)
            {
                self.would_oom += 1;
            }
        }
        let need = self.footprint(model);
        let idle = self.idle();
        let freeable = idle
            .iter()
            .fold(Footprint::default(), |sum, &i| sum.plus(self.footprint(i)));
        let held = self.held().minus(freeable);
        let enough = self.limits.vram.is_none_or(|l| held.vram + need.vram <= l)
            && self.limits.ram.is_none_or(|l| held.ram + need.ram <= l);
        if !enough {
            return;
        }
        // Victims in order, each taken when it holds some of what is short.
        let short = |held: Footprint| {
            (
                self.limits.vram.is_some_and(|l| held.vram + need.vram > l),
                self.limits.ram.is_some_and(|l| held.ram + need.ram > l),
            )
        };
        let mut held = self.held();
        let mut victims = Vec::new();
        for victim in self.order(now, idle) {
            let (short_vram, short_ram) = short(held);
            if !short_vram && !short_ram {
                break;
            }
            let v = self.footprint(victim);
            if (short_vram && v.vram > 0) || (short_ram && v.ram > 0) {
                held = held.minus(v);
                victims.push(victim);
            }
        }
        if matches!(self.victim, Victim::Belady | Victim::BeladyCost) {
            // The clairvoyant rules keep a victim whose eviction turned out not to be needed
            // (it held a little of the short resource, and later victims freed enough).
            for i in (0..victims.len()).rev() {
                let kept = held.plus(self.footprint(victims[i]));
                if short(kept) == (false, false) {
                    held = kept;
                    victims.remove(i);
                }
            }
        }
        for victim in victims {
            self.evict(victim, out);
        }
    }

    fn grant(&mut self, now: Duration, w: Waiting, load: bool, out: &mut Vec<Out>) {
        let lease = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(lease, w.model);
        if let Some(slot) = self.slots[w.model].as_mut() {
            slot.leases += 1;
            slot.last_used = now;
        }
        out.push(Out::Granted {
            request: w.request,
            lease,
            load,
        });
    }

    fn process_queue(&mut self, now: Duration, out: &mut Vec<Out>) {
        let mut blocked: Option<Duration> = None;
        let mut index = 0;
        while index < self.queue.len() {
            let w = self.queue[index];
            match self.slots[w.model] {
                Some(slot) if !slot.loading => {
                    self.queue.remove(index);
                    self.grant(now, w, false, out);
                    continue;
                }
                Some(_) => {
                    index += 1;
                    continue;
                }
                None => {}
            }
            if self.never_fits(w.model) {
                self.queue.remove(index);
                out.push(Out::Refused { request: w.request });
                continue;
            }
            let mut fits = self.fits(w.model);
            if !fits && blocked.is_none() {
                self.make_room(now, w.request, w.model, out);
                fits = self.fits(w.model);
                if !fits {
                    blocked = Some(w.since);
                }
            } else if fits
                && let Some(since) = blocked
                && now.saturating_sub(since) >= self.timeout / 2
            {
                break;
            }
            if fits {
                self.queue.remove(index);
                self.slots[w.model] = Some(Slot {
                    loading: true,
                    leases: 0,
                    last_used: now,
                });
                self.grant(now, w, true, out);
                continue;
            }
            index += 1;
        }
    }
}

impl Backend for Simple<'_> {
    fn acquire(&mut self, now: Duration, request: usize, model: usize, out: &mut Vec<Out>) {
        self.queue.push(Waiting {
            request,
            model,
            since: now,
        });
        self.process_queue(now, out);
    }

    fn loaded(&mut self, now: Duration, model: usize, out: &mut Vec<Out>) {
        if let Some(slot) = self.slots[model].as_mut() {
            slot.loading = false;
            slot.last_used = now;
        }
        self.process_queue(now, out);
    }

    fn release(&mut self, now: Duration, lease: u64, out: &mut Vec<Out>) {
        if let Some(model) = self.leases.remove(&lease)
            && let Some(slot) = self.slots[model].as_mut()
        {
            slot.leases = slot.leases.saturating_sub(1);
            slot.last_used = now;
        }
        self.process_queue(now, out);
    }

    fn unloaded(&mut self, _now: Duration, _model: usize, _out: &mut Vec<Out>) {
        // Evictions here leave the ledger when decided (answered at once).
    }

    fn tick(&mut self, now: Duration, out: &mut Vec<Out>) {
        if let Some(ttl) = self.ttl {
            for model in self.idle() {
                if self.slots[model].is_some_and(|s| now.saturating_sub(s.last_used) >= ttl) {
                    self.evict(model, out);
                }
            }
        }
        let timeout = self.timeout;
        let (expired, waiting): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|w| now.saturating_sub(w.since) >= timeout);
        self.queue = waiting;
        for w in expired {
            out.push(Out::Refused { request: w.request });
        }
        self.process_queue(now, out);
    }

    fn held(&self) -> Footprint {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .fold(Footprint::default(), |sum, (i, _)| {
                sum.plus(self.footprint(i))
            })
    }

    fn would_oom(&self) -> Option<u64> {
        self.memory_blind.then_some(self.would_oom)
    }
}

/// The clairvoyant schedule, optionally under an idle TTL: the cheaper of Belady and
/// cost-weighted Belady.
pub(super) fn offline(w: &Workload, ttl: Option<Duration>) -> Stats {
    let mut belady = simulate(w, &mut Simple::new(w, Victim::Belady, ttl, None));
    belady.variant = Some("belady");
    let mut cost = simulate(w, &mut Simple::new(w, Victim::BeladyCost, ttl, None));
    cost.variant = Some("belady_cost");
    if cost.cost() < belady.cost() {
        cost
    } else {
        belady
    }
}

pub(super) fn ollama(w: &Workload, ttl: Option<Duration>) -> Simple<'_> {
    Simple::new(w, Victim::Name, ttl, Some(OLLAMA_MAX_LOADED))
}
