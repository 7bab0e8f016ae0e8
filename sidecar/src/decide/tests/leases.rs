//! Acquire, the load it starts, and release.

use super::*;

#[test]
fn the_first_acquire_loads_and_the_second_uses_the_same_instance() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    let (second, action, same) = rig.grant(&s, "a");
    assert_eq!((action, same), (Action::Use, generation));
    assert_ne!(second, lease);
    assert_eq!(rig.state("a"), Some((InstanceState::Loaded, generation, 2)));
}

#[test]
fn an_unknown_model_is_refused_with_the_list() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &[]);
    match rig.acquire(&s, "zz").0 {
        First::Now(Verdict::Refused(refusal)) => {
            assert_eq!(refusal.reason, RefusalReason::UnknownModel);
            assert!(
                refusal.message.contains("it lists: a"),
                "{}",
                refusal.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rig.core
            .metrics
            .acquires_refused
            .with_label_values(&["unknown_model"])
            .get(),
        1
    );
}

#[test]
fn a_model_above_the_ceiling_is_refused_at_once_with_the_numbers() {
    let mut rig = Rig::new("Cache", Some(100), &[("big", 200, false)]);
    let s = rig.open(7, &[]);
    match rig.acquire(&s, "big").0 {
        First::Now(Verdict::Refused(refusal)) => {
            assert_eq!(refusal.reason, RefusalReason::ExceedsCeiling);
            assert_eq!(refusal.need, Footprint::new(0, 200 * MIB));
            assert_eq!(refusal.ceiling_ram, Some(100 * MIB));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_wait_an_acquire_answers_wait_and_starts_the_evictions() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    let (lease, _) = rig.load(&s, "a", 60);
    rig.release(&s, &lease);
    rig.take();
    match rig.acquire_with(&s, "b", false).unwrap().0 {
        First::Wait(message) => assert!(message.contains("must wait for room"), "{message}"),
        other => panic!("{other:?}"),
    }
    let fx = rig.take();
    assert_eq!(fx.unloads.len(), 1);
    assert_eq!(fx.unloads[0].reason, UnloadReason::Evicted);
    assert_eq!(rig.core.engine().queue_len(), 0, "not left waiting");
}

#[test]
fn a_waiting_acquire_is_answered_on_its_channel_when_room_comes_back() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    let other = rig.open(8, &[]);
    let (lease, generation) = rig.load(&s, "a", 60);
    let (first, mut receiver) = rig.acquire(&other, "b");
    assert!(matches!(first, First::Queued(_)));
    assert_eq!(rig.core.waiting(), 1);
    assert!(receiver.try_recv().is_err(), "leased: no room yet");
    rig.release(&s, &lease);
    // Idle now: evicted for b; b waits for the reclaim.
    let fx = rig.take();
    assert_eq!(fx.unloads[0].generation, generation);
    assert!(receiver.try_recv().is_err());
    rig.unloaded(&s, "a", generation, 60).unwrap();
    match receiver.try_recv().unwrap() {
        Verdict::Granted { action, .. } => assert_eq!(action, Action::Load),
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.core.waiting(), 0);
}

#[test]
fn an_abandoned_acquire_is_withdrawn() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    let (_lease, _) = rig.load(&s, "a", 60);
    let (First::Queued(request), _receiver) = rig.acquire(&s, "b") else {
        panic!("should wait");
    };
    assert!(rig.core.abandon(rig.now, request, None, &mut rig.fx));
    assert_eq!(rig.core.waiting(), 0);
    assert_eq!(rig.core.engine().queue_len(), 0);
    assert!(!rig.core.abandon(rig.now, request, None, &mut rig.fx));
}

#[test]
fn a_grant_whose_client_went_away_is_handed_back() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    let other = rig.open(8, &[]);
    let (lease, generation) = rig.load(&s, "a", 60);
    let (_, receiver) = rig.acquire(&other, "b");
    drop(receiver);
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", generation, 60).unwrap();
    // b was granted, the send failed: its lease went back and nothing holds it.
    assert!(rig.core.leases().is_empty(), "{:?}", rig.core.leases());
    assert_eq!(rig.state("b").map(|s| s.2), Some(0));
}

#[test]
fn the_app_server_holds_instances_with_the_http_driver() {
    let mut core = core_with(pool_with("Aggressive", None, &[("a", 10, false)]), true);
    let mut fx = Effects::default();
    let request = CreateSession {
        pid: 7,
        app: None,
        models: vec![],
        holds: vec![],
    };
    let alive = ProcessNow {
        alive: true,
        rss: Some(MIB),
        vram: None,
    };
    let body = as_json(
        core.open_session(ms(1), &request, alive, HEARTBEAT, &mut fx)
            .unwrap(),
    );
    let s = body["session"].as_str().unwrap().to_owned();
    let (sender, _receiver) = oneshot::channel();
    let First::Now(Verdict::Granted {
        holder,
        generation,
        lease,
        ..
    }) = core.acquire(ms(1), &s, "a", true, sender, &mut fx).unwrap()
    else {
        panic!("granted");
    };
    assert_eq!(holder, APP_HOLDER);
    core.driver_loaded(
        ms(2),
        holder,
        "a",
        generation,
        Sizes::new(None, Some(10 * MIB)),
        0.5,
        &mut fx,
    );
    let state = as_json(core.state(ms(2), &BTreeMap::new(), &BTreeMap::new()));
    assert_eq!(state["models"][0]["session"], "app");
    assert_eq!(state["models"][0]["state"], "loaded");
    // Aggressive: the last release unloads through the driver, not the client.
    let unload = core
        .release(ms(3), &s, &lease_name(lease), &mut fx)
        .unwrap();
    assert!(!unload, "the sidecar unloads, not the client");
    // An answer for another generation changes nothing; the right one reclaims.
    core.driver_unloaded(ms(4), APP_HOLDER, "a", generation + 1, &mut fx);
    assert_eq!(core.engine().instances(ms(4)).len(), 1);
    core.driver_unloaded(ms(4), APP_HOLDER, "a", generation, &mut fx);
    assert!(core.engine().instances(ms(4)).is_empty());
}

#[test]
fn a_failed_driver_load_frees_the_reservation() {
    let mut core = core_with(pool_with("Cache", Some(100), &[("a", 60, false)]), true);
    let mut fx = Effects::default();
    let request = CreateSession {
        pid: 7,
        app: None,
        models: vec![],
        holds: vec![],
    };
    let s = core
        .open_session(ms(1), &request, ProcessNow::default(), HEARTBEAT, &mut fx)
        .unwrap()
        .session;
    let (sender, _receiver) = oneshot::channel();
    core.acquire(ms(1), &s, "a", true, sender, &mut fx).unwrap();
    core.driver_load_failed(ms(2), APP_HOLDER, "a", &mut fx);
    assert_eq!(core.engine().held(), Footprint::default());
    assert!(core.leases().is_empty());
}

// ---- loaded ----

#[test]
fn a_load_is_measured_from_the_process_and_the_larger_figure_counts() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, _, _) = rig.grant(&s, "a");
    // The process grew by 30 MiB; the app reports 25 MiB: the ledger takes 30.
    rig.meter.set(7, 130 * MIB);
    let request = Loaded {
        session: s.clone(),
        lease,
        ok: true,
        load_seconds: None,
        vram_bytes: None,
        ram_bytes: Some(25 * MIB),
        error: None,
    };
    let report = rig
        .core
        .loaded(rig.now, &request, Some(rig.meter.get(7)), None, &mut rig.fx)
        .unwrap()
        .unwrap();
    assert_eq!(report.sidecar.ram, Some(30 * MIB));
    assert_eq!(report.app.ram, Some(25 * MIB));
    assert_eq!(rig.held_ram(), 30 * MIB);
    let state = as_json(rig.core.state(rig.now, &BTreeMap::new(), &BTreeMap::new()));
    assert_eq!(state["models"][0]["measured_by_sidecar"]["ram"], 30 * MIB);
    assert_eq!(state["models"][0]["reported_by_app"]["ram"], 25 * MIB);
}

#[test]
fn a_failed_load_frees_its_reservation_and_lease() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, _, _) = rig.grant(&s, "a");
    let request = Loaded {
        session: s.clone(),
        lease: lease.clone(),
        ok: false,
        load_seconds: None,
        vram_bytes: None,
        ram_bytes: None,
        error: Some("OOM".to_owned()),
    };
    assert_eq!(
        rig.core
            .loaded(rig.now, &request, None, None, &mut rig.fx)
            .unwrap(),
        None
    );
    assert_eq!(rig.held_ram(), 0);
    assert!(rig.core.leases().is_empty());
    assert_eq!(rig.core.engine().counters().load_failures, 1);
    assert!(rig.core.release(rig.now, &s, &lease, &mut rig.fx).is_err());
}

#[test]
fn a_report_on_a_use_lease_is_ignored() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    rig.load(&s, "a", 10);
    let (lease, action, _) = rig.grant(&s, "a");
    assert_eq!(action, Action::Use);
    assert_eq!(rig.loaded(&s, &lease, 500), None);
    assert_eq!(rig.held_ram(), 10 * MIB);
}

#[test]
fn a_report_on_an_unknown_lease_is_refused() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let request = Loaded {
        session: s.clone(),
        lease: "l-99".to_owned(),
        ok: true,
        load_seconds: None,
        vram_bytes: None,
        ram_bytes: None,
        error: None,
    };
    assert_eq!(
        rig.core
            .loaded(rig.now, &request, None, None, &mut rig.fx)
            .unwrap_err(),
        LookupError::Lease {
            lease: "l-99".to_owned(),
            session: s
        }
    );
}

// ---- release ----

#[test]
fn aggressive_mode_unloads_at_the_last_release_and_says_so() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    let (second, _, _) = rig.grant(&s, "a");
    assert!(!rig.release(&s, &second), "another lease lives");
    rig.take();
    assert!(rig.release(&s, &lease));
    let fx = rig.take();
    assert_eq!(
        fx.unloads,
        vec![Unload {
            holder: id(&s),
            model: "a".to_owned(),
            generation,
            reason: UnloadReason::Released
        }]
    );
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Unloading);
    assert_eq!(
        rig.core.unloading(rig.now, id(&s)),
        vec![("a".to_owned(), generation)]
    );
}

#[test]
fn cache_mode_keeps_a_released_model_until_its_ttl() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, _) = rig.load(&s, "a", 10);
    assert!(!rig.release(&s, &lease));
    rig.advance(Duration::from_secs(59));
    rig.core.heartbeat(rig.now, &s, None).unwrap();
    rig.tick();
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Loaded);
    rig.advance(Duration::from_secs(2));
    rig.core.heartbeat(rig.now, &s, None).unwrap();
    rig.take();
    rig.tick();
    let fx = rig.take();
    assert_eq!(fx.unloads[0].reason, UnloadReason::IdleTtl);
}

#[test]
fn a_lease_is_released_once() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let other = rig.open(8, &["a"]);
    let (lease, _) = rig.load(&s, "a", 10);
    assert!(
        rig.core
            .release(rig.now, &other, &lease, &mut rig.fx)
            .is_err(),
        "not the other session's lease"
    );
    rig.release(&s, &lease);
    assert!(rig.core.release(rig.now, &s, &lease, &mut rig.fx).is_err());
}
