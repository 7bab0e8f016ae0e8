//! Properties over random event sequences.

use super::*;

const MODELS: [&str; 3] = ["a", "b", "c"];
const SIZES: [u64; 3] = [40, 30, 50];
const CEILING_MIB: u64 = 100;

#[derive(Debug, Clone)]
enum Event {
    Open(usize),
    Close(usize),
    Acquire(usize, usize, bool),
    Load(usize),
    Release(usize),
    Ack(usize, bool),
    Abandon(usize),
    Tick(u64),
    Cleanup(bool),
    Kill(usize),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0..3usize).prop_map(Event::Open),
        (0..3usize).prop_map(Event::Close),
        (0..3usize, 0..3usize, any::<bool>()).prop_map(|(s, m, w)| Event::Acquire(s, m, w)),
        (0..8usize).prop_map(Event::Load),
        (0..8usize).prop_map(Event::Release),
        (0..8usize, any::<bool>()).prop_map(|(i, stale)| Event::Ack(i, stale)),
        (0..4usize).prop_map(Event::Abandon),
        (0..4000u64).prop_map(Event::Tick),
        any::<bool>().prop_map(Event::Cleanup),
        (0..3usize).prop_map(Event::Kill),
    ]
}

/// The app side of the property test: sessions, leases, commands it was given.
#[derive(Default)]
struct Apps {
    sessions: [Option<String>; 3],
    /// Granted leases: (session slot, model, lease, loaded?).
    leases: Vec<(usize, usize, String, bool)>,
    /// Waiting acquires.
    waiting: Vec<(usize, usize, RequestId, oneshot::Receiver<Verdict>)>,
    /// Unload commands seen and not yet answered: (holder, model, generation).
    commands: Vec<(SessionId, String, u64)>,
}

fn slot_of(apps: &Apps, holder: SessionId) -> Option<usize> {
    apps.sessions
        .iter()
        .position(|s| s.as_deref().map(id) == Some(holder))
}

fn collect(rig: &mut Rig, apps: &mut Apps) {
    let fx = rig.take();
    for unload in fx.unloads {
        apps.commands
            .push((unload.holder, unload.model, unload.generation));
    }
    let mut still = Vec::new();
    for (slot, model, request, mut receiver) in std::mem::take(&mut apps.waiting) {
        match receiver.try_recv() {
            Ok(Verdict::Granted { lease, action, .. }) => {
                apps.leases
                    .push((slot, model, lease_name(lease), action == Action::Use));
            }
            Ok(Verdict::Refused(_)) | Err(oneshot::error::TryRecvError::Closed) => {}
            Err(oneshot::error::TryRecvError::Empty) => {
                still.push((slot, model, request, receiver))
            }
        }
    }
    apps.waiting = still;
}

fn check_invariants(rig: &Rig) -> Result<(), TestCaseError> {
    let engine = rig.core.engine();
    // The ceiling is never exceeded (every load reports its declared size).
    prop_assert!(
        engine.held().ram <= CEILING_MIB * MIB,
        "held {} over the ceiling",
        engine.held().ram
    );
    // No lease on an instance that is on its way out.
    for (lease, info) in rig.core.leases() {
        let view = engine.instance(rig.now, info.holder, &info.model);
        prop_assert!(
            view.as_ref()
                .is_some_and(|v| matches!(v.state, InstanceState::Loading | InstanceState::Loaded)),
            "lease {lease:?} on {} in state {:?}",
            info.model,
            view.map(|v| v.state)
        );
    }
    Ok(())
}

fn step(rig: &mut Rig, apps: &mut Apps, event: Event) {
    match event {
        Event::Open(slot) => {
            if apps.sessions[slot].is_none() {
                let pid = 1000 + slot as u32;
                apps.sessions[slot] = Some(rig.open(pid, &[]));
            }
        }
        Event::Close(slot) => {
            if let Some(s) = apps.sessions[slot].take() {
                let _ = rig.core.close_session(rig.now, &s, &mut rig.fx);
                apps.leases.retain(|l| l.0 != slot);
                apps.waiting.retain(|w| w.0 != slot);
            }
        }
        Event::Kill(slot) => {
            if let Some(s) = apps.sessions[slot].take() {
                rig.meter.kill(1000 + slot as u32);
                rig.tick();
                let _ = s;
                apps.leases.retain(|l| l.0 != slot);
                apps.waiting.retain(|w| w.0 != slot);
            }
        }
        Event::Acquire(slot, model, wait) => {
            let Some(s) = apps.sessions[slot].clone() else {
                return;
            };
            let Ok((first, receiver)) = rig.acquire_with(&s, MODELS[model], wait) else {
                return;
            };
            match first {
                First::Now(Verdict::Granted { lease, action, .. }) => {
                    apps.leases
                        .push((slot, model, lease_name(lease), action == Action::Use));
                }
                First::Queued(request) => apps.waiting.push((slot, model, request, receiver)),
                First::Now(Verdict::Refused(_)) | First::Wait(_) => {}
            }
        }
        Event::Load(i) => {
            let pending: Vec<usize> = (0..apps.leases.len())
                .filter(|&j| !apps.leases[j].3)
                .collect();
            if let Some(&j) = pending.get(i % pending.len().max(1)) {
                let (slot, model, lease, _) = apps.leases[j].clone();
                let s = apps.sessions[slot].clone().unwrap();
                rig.loaded(&s, &lease, SIZES[model]);
                apps.leases[j].3 = true;
            }
        }
        Event::Release(i) => {
            let loaded: Vec<usize> = (0..apps.leases.len())
                .filter(|&j| apps.leases[j].3)
                .collect();
            if let Some(&j) = loaded.get(i % loaded.len().max(1)) {
                let (slot, _, lease, _) = apps.leases.remove(j);
                let s = apps.sessions[slot].clone().unwrap();
                let _ = rig.core.release(rig.now, &s, &lease, &mut rig.fx);
            }
        }
        Event::Ack(i, stale) => {
            if apps.commands.is_empty() {
                return;
            }
            let j = i % apps.commands.len();
            let (holder, model, generation) = apps.commands[j].clone();
            let Some(slot) = slot_of(apps, holder) else {
                apps.commands.remove(j);
                return;
            };
            let s = apps.sessions[slot].clone().unwrap();
            let index = MODELS.iter().position(|m| *m == model).unwrap();
            if stale {
                // A stale acknowledgement never changes anything.
                let before = rig.core.engine().instances(rig.now);
                if rig.unloaded(&s, &model, generation + 1000, 0).is_err() {
                    assert_eq!(rig.core.engine().instances(rig.now), before);
                }
                return;
            }
            apps.commands.remove(j);
            let _ = rig.unloaded(&s, &model, generation, SIZES[index]);
        }
        Event::Abandon(i) => {
            if !apps.waiting.is_empty() {
                let (_, _, request, mut receiver) = apps.waiting.remove(i % apps.waiting.len());
                let withdrawn = rig.core.abandon(rig.now, request, None, &mut rig.fx);
                if !withdrawn && let Ok(Verdict::Granted { lease, .. }) = receiver.try_recv() {
                    rig.core.abandon(rig.now, request, Some(lease), &mut rig.fx);
                }
            }
        }
        Event::Tick(by) => {
            rig.advance(ms(by));
            for s in apps.sessions.iter().flatten() {
                let _ = rig.core.heartbeat(rig.now, s, None);
            }
            rig.tick();
        }
        Event::Cleanup(force) => {
            rig.core.cleanup(rig.now, force, &mut rig.fx);
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Over random sequences of opens, closes, acquires, loads, releases, acknowledgements
    /// (right and stale), abandons, ticks, cleanups and crashes: the ceiling is never
    /// exceeded, no lease is on an instance on its way out, every unload command is answered
    /// or times out, and once every session is gone and its memory seen back nothing is left.
    #[test]
    fn random_event_sequences_keep_the_invariants(
        mode in prop_oneof![Just("Aggressive"), Just("Cache")],
        events in prop::collection::vec(event(), 1..40),
    ) {
        let models: Vec<M<'_>> = MODELS.iter().zip(SIZES).map(|(m, s)| (*m, s, false)).collect();
        let mut rig = Rig::new(mode, Some(CEILING_MIB), &models);
        // Loads count what the app reports (its declared size): concurrent loads in one
        // process would otherwise be measured into each other.
        rig.measure_loads = false;
        let mut apps = Apps::default();
        for event in events {
            step(&mut rig, &mut apps, event);
            collect(&mut rig, &mut apps);
            check_invariants(&rig)?;
        }

        // Every command is answered (the apps answer all) or times out.
        for (holder, model, generation) in std::mem::take(&mut apps.commands) {
            if let Some(slot) = slot_of(&apps, holder) {
                let s = apps.sessions[slot].clone().unwrap();
                let index = MODELS.iter().position(|m| *m == model).unwrap();
                let _ = rig.unloaded(&s, &model, generation, SIZES[index]);
            }
        }
        collect(&mut rig, &mut apps);
        rig.advance(Duration::from_secs(6));
        for s in apps.sessions.iter().flatten() {
            let _ = rig.core.heartbeat(rig.now, s, None);
        }
        rig.tick();
        collect(&mut rig, &mut apps);
        // Only unloads this last tick decided may still wait for their answer.
        for view in rig.core.engine().instances(rig.now) {
            prop_assert!(
                view.state != InstanceState::Unloading
                    || apps.commands.contains(&(view.session, view.model.clone(), view.generation)),
                "an unload command neither answered nor timed out: {view:?}"
            );
        }

        // Every session closes, every process exits: nothing is left in the ledger.
        for slot in 0..3 {
            if let Some(s) = apps.sessions[slot].take() {
                rig.core.close_session(rig.now, &s, &mut rig.fx).unwrap();
            }
            rig.meter.kill(1000 + slot as u32);
        }
        rig.tick();
        prop_assert!(rig.core.engine().instances(rig.now).is_empty(),
            "left in the ledger: {:?}", rig.core.engine().instances(rig.now));
        prop_assert!(rig.core.leases().is_empty());
        prop_assert!(rig.core.tracks().is_empty(), "{:?}", rig.core.tracks());
        prop_assert!(rig.core.dead_pids().is_empty());
        prop_assert_eq!(rig.core.waiting(), 0);
        prop_assert_eq!(rig.core.engine().held(), Footprint::default());
    }
}
