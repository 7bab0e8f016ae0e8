//! Scheduling: the queue of waiting acquires, grants, the eviction order, making room, and
//! relief when memory runs over a ceiling.

use super::*;

impl Engine {
    pub(super) fn start_unload(
        &mut self,
        now: Duration,
        key: Key,
        reason: UnloadReason,
        out: &mut Vec<Output>,
    ) {
        let Some(instance) = self.instances.get_mut(&key) else {
            return;
        };
        debug_assert!(instance.leases.is_empty(), "never unload a leased instance");
        if instance.state != InstanceState::Loaded || !instance.leases.is_empty() {
            return;
        }
        instance.state = InstanceState::Unloading;
        instance.unload_reason = Some(reason);
        instance.phase_since = now;
        *self.counters.unloads.entry(reason).or_default() += 1;
        let generation = instance.generation;
        out.push(Output::Unload {
            session: key.0,
            model: self.config.models[key.1].name.clone(),
            generation,
            reason,
        });
    }

    /// The pool's mean time between requests times the number of models it lists: the gap
    /// a model would have if all were equally popular (for models not yet asked for twice).
    pub(super) fn prior_gap_s(&self, now: Duration) -> f64 {
        let models = self.retired.iter().filter(|r| !**r).count().max(1) as f64;
        match self.first_arrival {
            Some(first) if self.arrivals > 0 => {
                now.saturating_sub(first).as_secs_f64() / self.arrivals as f64 * models
            }
            _ => 0.0,
        }
    }

    /// Idle (no lease), unpinned, loaded instances: what eviction, the idle TTL and the room
    /// count may take.
    pub(super) fn evictable(&self) -> impl Iterator<Item = (&Key, &Instance)> {
        self.instances.iter().filter(|(key, i)| {
            i.state == InstanceState::Loaded
                && i.leases.is_empty()
                && !self.config.models[key.1].pinned
        })
    }

    /// Idle, unpinned, loaded instances, as eviction candidates.
    pub(super) fn candidates(&self, now: Duration) -> Vec<Candidate<Key>> {
        let prior = self.prior_gap_s(now);
        let next_s = |model: usize| {
            self.known_gaps
                .as_ref()
                .and_then(|gaps| gaps.get(model).copied())
                .unwrap_or_else(|| self.learned[model].demand.next_s(now, prior))
                .max(1e-3)
        };
        self.evictable()
            .map(|(key, i)| Candidate {
                key: *key,
                priority: self.config.models[key.1].priority,
                last_used: i.last_used,
                held: i.held,
                loss: self.load_seconds(key.1) / next_s(key.1),
                size: eviction::size(i.held, self.config.limits),
            })
            .collect()
    }

    /// Idle, unpinned, loaded instances in eviction order.
    pub(super) fn eviction_order(&self, now: Duration) -> Vec<Key> {
        let mut candidates = self.candidates(now);
        eviction::order(self.config.eviction, &mut candidates);
        candidates.into_iter().map(|c| c.key).collect()
    }

    /// Bytes already on their way back (unloads decided but not yet reclaimed).
    pub(super) fn in_flight(&self) -> Footprint {
        self.instances
            .values()
            .filter(|i| {
                matches!(
                    i.state,
                    InstanceState::Unloading | InstanceState::Reclaiming
                )
            })
            .fold(Footprint::default(), |sum, i| sum.plus(i.held))
    }

    /// Serves waiting acquires in order (priority, then arrival). The first one that cannot
    /// be served becomes the blocked head, and the evictions that will make its room start.
    /// While that room is coming back nothing may pass it. While it waits for leases to end
    /// instead (no telling when), later requests that fit in the room there is now may pass,
    /// but only until it has waited half its acquire timeout, so that small requests cannot
    /// starve a big one. A request for a copy already loaded in its session is served
    /// whatever waits before it: it takes no room. (Holding those back behind a head that
    /// waited on leases made them wait, and time out, for nothing: found by the eviction
    /// benchmark's `diurnal` trace.)
    pub(super) fn process_queue(&mut self, now: Duration, out: &mut Vec<Output>) {
        if self.shutting_down {
            return;
        }
        self.queue
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
        let mut blocked_head: Option<Duration> = None;
        // Once closed, only requests for a loaded copy are served (they take no room).
        let mut closed = false;
        let mut index = 0;
        while index < self.queue.len() {
            let waiting = self.queue[index].clone();
            let key = (waiting.session, waiting.model);
            match self.instances.get(&key).map(|i| i.state) {
                Some(InstanceState::Loaded) => {
                    self.queue.remove(index);
                    self.grant(now, &waiting, Action::Use, out);
                    continue;
                }
                // Its own copy is loading, or on its way out: wait without blocking others.
                Some(_) => {
                    index += 1;
                    continue;
                }
                None => {}
            }
            let need = self.need_of(waiting.model);
            if let Some(message) = self.never_fits(waiting.session, waiting.model, need) {
                self.queue.remove(index);
                let refusal = self.refusal(RefusalReason::ExceedsCeiling, need, message);
                let model = self.config.models[waiting.model].name.clone();
                self.refuse(waiting.request, waiting.session, model, refusal, out);
                continue;
            }
            if closed {
                index += 1;
                continue;
            }
            if let Some(head_since) = blocked_head
                && now.saturating_sub(head_since) >= self.config.acquire_timeout / 2
            {
                closed = true;
                index += 1;
                continue;
            }
            // Waking an asleep model frees its own host copy: admitted net of it.
            let name = &self.config.models[waiting.model].name;
            let own = self.asleep.get(name).copied().unwrap_or_default();
            if self.fits(need.minus(own)) {
                self.asleep
                    .remove(&self.config.models[waiting.model].name.clone());
                self.queue.remove(index);
                let generation = self.next_generation;
                self.next_generation += 1;
                self.instances.insert(
                    key,
                    Instance {
                        generation,
                        state: InstanceState::Loading,
                        leases: BTreeSet::new(),
                        held: need,
                        measured: None,
                        last_used: now,
                        unload_reason: None,
                        phase_since: now,
                    },
                );
                self.counters.loads += 1;
                self.grant(now, &waiting, Action::Load, out);
                continue;
            }
            if blocked_head.is_none() {
                self.make_room(now, need.minus(own), out);
                // Room is on its way back for it: nothing may pass and take that room.
                closed = !self.in_flight().is_zero();
                blocked_head = Some(waiting.since);
            }
            index += 1;
        }
    }

    /// Starts evicting idle instances until `need` would fit once they are reclaimed,
    /// counting unloads already under way.
    pub(super) fn make_room(&mut self, now: Duration, need: Footprint, out: &mut Vec<Output>) {
        let held = self.held();
        // Room does not change while unloads start (they count as held until reclaimed).
        let rooms = Resource::ALL.map(|r| self.room(r, held));
        let short_of = |r: Resource, coming_back: Footprint| -> bool {
            let slot = if r == Resource::Vram { 0 } else { 1 };
            rooms[slot].is_some_and(|room| need.get(r) > room.saturating_add(coming_back.get(r)))
        };
        let short =
            |coming_back: Footprint| Resource::ALL.into_iter().any(|r| short_of(r, coming_back));
        let coming_back = self.in_flight();
        if !short(coming_back) {
            return;
        }
        // Only evict when evicting everything idle would be enough; otherwise leases must
        // end first, and unloading now would cost reloads for nothing.
        if short(coming_back.plus(self.reclaimable())) {
            return;
        }
        let missing = |r: Resource| {
            let slot = if r == Resource::Vram { 0 } else { 1 };
            rooms[slot].map_or(0, |room| {
                need.get(r)
                    .saturating_sub(room.saturating_add(coming_back.get(r)))
            })
        };
        let missing = Footprint::new(missing(Resource::Vram), missing(Resource::Ram));
        let victims = eviction::choose(self.config.eviction, &self.candidates(now), missing);
        for key in victims {
            self.start_unload(now, key, UnloadReason::Evicted, out);
        }
    }

    pub(super) fn grant(
        &mut self,
        now: Duration,
        waiting: &Waiting,
        action: Action,
        out: &mut Vec<Output>,
    ) {
        let lease = LeaseId(self.next_lease);
        self.next_lease += 1;
        let key = (waiting.session, waiting.model);
        let mut generation = 0;
        if let Some(instance) = self.instances.get_mut(&key) {
            generation = instance.generation;
            instance.leases.insert(lease);
            instance.last_used = now;
        }
        self.leases.insert(lease, key);
        out.push(Output::Granted {
            request: waiting.request,
            session: waiting.session,
            model: self.config.models[waiting.model].name.clone(),
            lease,
            generation,
            action,
            waited: now.saturating_sub(waiting.since),
        });
    }

    /// Evicts idle instances while device VRAM or pod RAM is above its pressure threshold.
    pub(super) fn relieve_pressure(&mut self, now: Duration, out: &mut Vec<Output>) {
        let thresholds = [
            (
                Resource::Vram,
                self.readings.vram,
                self.config.pressure_vram_percent,
            ),
            (
                Resource::Ram,
                self.readings.ram,
                self.config.pressure_ram_percent,
            ),
        ];
        for (resource, reading, percent) in thresholds {
            let Some((used, total)) = reading else {
                continue;
            };
            if total == 0 {
                continue;
            }
            let allowed = (u128::from(total) * u128::from(percent) / 100) as u64;
            if used <= allowed {
                continue;
            }
            let mut excess = (used - allowed).saturating_sub(self.in_flight().get(resource));
            let claimed_by = match resource {
                Resource::Vram => self.readings.vram_claimed_by,
                Resource::Ram => None,
            };
            for key in self.eviction_order(now) {
                if excess == 0 {
                    break;
                }
                if claimed_by.is_some_and(|session| key.0 != session) {
                    continue;
                }
                let Some(instance) = self.instances.get(&key) else {
                    continue;
                };
                let bytes = instance.held.get(resource);
                if bytes == 0 {
                    continue;
                }
                excess = excess.saturating_sub(bytes);
                self.start_unload(now, key, UnloadReason::Pressure, out);
            }
        }
    }

    /// Reports a ceiling breach on its transition and, when enforcing, evicts idle instances.
    pub(super) fn check_ceilings(&mut self, now: Duration, out: &mut Vec<Output>) {
        for (slot, resource) in Resource::ALL.into_iter().enumerate() {
            let Some(limit) = self.config.limits.get(resource) else {
                self.over_ceiling[slot] = false;
                continue;
            };
            let held = self.held().get(resource);
            let over = held > limit;
            if over && !self.over_ceiling[slot] {
                *self
                    .counters
                    .ceiling_breaches
                    .entry(resource.as_str())
                    .or_default() += 1;
                out.push(Output::CeilingExceeded {
                    resource,
                    held,
                    limit,
                });
            }
            self.over_ceiling[slot] = over;
            if over && self.config.evict_over_ceiling {
                let mut excess = (held - limit).saturating_sub(self.in_flight().get(resource));
                for key in self.eviction_order(now) {
                    if excess == 0 {
                        break;
                    }
                    let bytes = self.instances.get(&key).map_or(0, |i| i.held.get(resource));
                    if bytes == 0 {
                        continue;
                    }
                    excess = excess.saturating_sub(bytes);
                    self.start_unload(now, key, UnloadReason::Ceiling, out);
                }
            }
        }
    }
}
