//! Room: whether a need fits under the ceilings, what could be reclaimed, and the refusals
//! that explain themselves with the numbers.

use super::*;

impl Engine {
    /// Whether `model` fits now beside what is held, without evicting anything: a model that
    /// is already in memory (loaded on a server behind the sidecar's back, or re-announced by
    /// an app) is adopted only so, since evicting another for it could still end in refusing
    /// it. `Err` says why, with the numbers.
    pub fn fits_without_eviction(&self, model: &str) -> Result<(), String> {
        let Some(index) = self.model_index(model) else {
            return Err(format!("model {model:?} is not in the pool"));
        };
        let need = self.need_of(index);
        if self.fits(need) {
            Ok(())
        } else {
            Err(format!(
                "it does not fit beside what is held: need {need}; {}",
                self.room_sentence(need)
            ))
        }
    }

    /// The seed's `check_memory_available`: would `need` fit now, or after evicting idle
    /// (unpinned) instances?
    pub fn check(&self, need: Footprint) -> CheckResult {
        let held = self.held();
        let reclaimable = self.reclaimable();
        let mut available = true;
        let mut free = [None, None];
        for (slot, resource) in Resource::ALL.into_iter().enumerate() {
            let room = self.room(resource, held);
            free[slot] = room;
            if let Some(room) = room
                && need.get(resource) > room.saturating_add(reclaimable.get(resource))
            {
                available = false;
            }
        }
        let message = format!(
            "{} {}: need {}; {}",
            if available { "fits" } else { "does not fit" },
            if available && !self.fits(need) {
                "after evicting idle models"
            } else {
                "now"
            },
            need,
            self.room_sentence(need)
        );
        CheckResult {
            available,
            free_vram: free[0],
            free_ram: free[1],
            reclaimable,
            message,
        }
    }

    // ---- internals ----

    /// Room left for one resource: the smaller of ceiling room and device room.
    pub(super) fn room(&self, resource: Resource, held: Footprint) -> Option<u64> {
        let ceiling_room = self
            .config
            .limits
            .get(resource)
            .map(|limit| limit.saturating_sub(held.get(resource)));
        // Loads granted but not reported are not yet visible on the device.
        let pending = self
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Loading)
            .fold(0u64, |sum, i| sum.saturating_add(i.held.get(resource)));
        let device = match resource {
            Resource::Vram => self.readings.vram,
            Resource::Ram => self.readings.ram,
        };
        let device_room =
            device.map(|(used, total)| total.saturating_sub(used).saturating_sub(pending));
        match (ceiling_room, device_room) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn fits(&self, need: Footprint) -> bool {
        let held = self.held();
        Resource::ALL.into_iter().all(|r| {
            // Nothing is loaded while the ledger is over a ceiling (a model grew past what it
            // declared), not even a model whose learned size is zero.
            let over = self
                .config
                .limits
                .get(r)
                .is_some_and(|limit| held.get(r) > limit);
            !over && self.room(r, held).is_none_or(|room| need.get(r) <= room)
        })
    }

    pub(super) fn reclaimable(&self) -> Footprint {
        self.evictable()
            .fold(Footprint::default(), |sum, (_, i)| sum.plus(i.held))
    }

    /// `Some(reason)` when the model can never fit: above a ceiling, or above what pinned
    /// instances leave of it.
    /// Why `model` can never fit for `session`: its need is above a ceiling less what pinned
    /// models hold, the session's own instance of it excepted (that one is a `use`, not room
    /// to find).
    pub(super) fn never_fits(
        &self,
        session: SessionId,
        model: usize,
        need: Footprint,
    ) -> Option<String> {
        let name = &self.config.models[model].name;
        for resource in Resource::ALL {
            let Some(limit) = self.config.limits.get(resource) else {
                continue;
            };
            let pinned: u64 = self
                .instances
                .iter()
                .filter(|(key, _)| **key != (session, model) && self.config.models[key.1].pinned)
                .map(|(_, i)| i.held.get(resource))
                .sum();
            if need.get(resource) > limit.saturating_sub(pinned) {
                return Some(format!(
                    "model {name:?} needs {} of {resource}, above the ceiling of {}{}{}",
                    human_bytes(need.get(resource)),
                    human_bytes(limit),
                    if pinned > 0 {
                        format!(" less {} held by pinned models", human_bytes(pinned))
                    } else {
                        String::new()
                    },
                    self.unsized_note(model),
                ));
            }
        }
        None
    }

    /// For refusals: why an unsized model needs the whole ceiling.
    pub(super) fn unsized_note(&self, model: usize) -> &'static str {
        if self.size_unknown(model) {
            " (its size is unknown: nothing declared, no readable estimate, never measured; \
             until a load is measured it needs the whole ceiling and is admitted only alone, \
             spec.policy.unsizedModels: Alone)"
        } else {
            ""
        }
    }

    pub(super) fn holders(&self) -> Vec<Holder> {
        self.instances
            .iter()
            .map(|(&(session, model), i)| Holder {
                model: self.config.models[model].name.clone(),
                session,
                held: i.held,
                leases: i.leases.len(),
                pinned: self.config.models[model].pinned,
                state: i.state,
            })
            .collect()
    }

    /// "ceiling 16.0 GiB of ram, 14.0 GiB held by t2v (2.0 GiB, 1 lease), ...; 0 B could be
    /// freed by evicting idle models"
    pub(super) fn room_sentence(&self, need: Footprint) -> String {
        let held = self.held();
        let mut text = String::new();
        let resources: Vec<Resource> = Resource::ALL
            .into_iter()
            .filter(|r| need.get(*r) > 0 || self.config.limits.get(*r).is_some())
            .collect();
        for (n, resource) in resources.iter().enumerate() {
            if n > 0 {
                text.push_str("; ");
            }
            let _ = write!(text, "{resource}: ");
            match self.config.limits.get(*resource) {
                Some(limit) => {
                    let _ = write!(text, "ceiling {}", human_bytes(limit));
                }
                None => text.push_str("no ceiling"),
            }
            if let Some((used, total)) = match resource {
                Resource::Vram => self.readings.vram,
                Resource::Ram => self.readings.ram,
            } {
                let _ = write!(
                    text,
                    ", device {} used of {}",
                    human_bytes(used),
                    human_bytes(total)
                );
            }
            let _ = write!(text, ", {} held", human_bytes(held.get(*resource)));
            let holders: Vec<String> = self
                .holders()
                .into_iter()
                .filter(|h| h.held.get(*resource) > 0)
                .map(|h| {
                    let mut detail = format!(
                        "{} {}",
                        human_bytes(h.held.get(*resource)),
                        state_word(h.state)
                    );
                    if h.leases > 0 {
                        let _ = write!(
                            detail,
                            ", {} lease{}",
                            h.leases,
                            if h.leases == 1 { "" } else { "s" }
                        );
                    }
                    if h.pinned {
                        detail.push_str(", pinned");
                    }
                    format!("{} ({detail})", h.model)
                })
                .collect();
            let asleep = self
                .asleep
                .iter()
                .filter(|(_, held)| held.get(*resource) > 0)
                .map(|(model, held)| {
                    format!("{model} ({} asleep)", human_bytes(held.get(*resource)))
                });
            let holders: Vec<String> = holders.into_iter().chain(asleep).collect();
            if !holders.is_empty() {
                let _ = write!(text, " by {}", holders.join(", "));
            }
        }
        let _ = write!(
            text,
            "; {} could be freed by evicting idle models",
            self.reclaimable()
        );
        text
    }

    pub(super) fn refusal(
        &self,
        reason: RefusalReason,
        need: Footprint,
        message: String,
    ) -> Refusal {
        Refusal {
            reason,
            need,
            ceiling_vram: self.config.limits.vram,
            ceiling_ram: self.config.limits.ram,
            held: self.held(),
            reclaimable: self.reclaimable(),
            holders: self.holders(),
            message: if reason == RefusalReason::ExceedsCeiling {
                format!("{message}; {}", self.room_sentence(need))
            } else {
                message
            },
        }
    }

    pub(super) fn refuse(
        &mut self,
        request: RequestId,
        session: SessionId,
        model: String,
        refusal: Refusal,
        out: &mut Vec<Output>,
    ) {
        *self
            .counters
            .refusals
            .entry(refusal.reason.as_str())
            .or_default() += 1;
        out.push(Output::Refused {
            request,
            session,
            model,
            refusal: Box::new(refusal),
        });
    }
}
