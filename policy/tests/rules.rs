//! One test per rule of the engine.

use std::time::Duration;

use modelpool_policy::*;

const GIB: u64 = 1 << 30;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The seed's pipeline: t2v 12/2 GiB, upscale 4/12 GiB, frame_interpolation 2/9 GiB,
/// ceilings 20 GiB VRAM and 16 GiB RAM.
fn seed_pool(mode: Mode) -> PoolConfig {
    let mut config = PoolConfig::new(
        Limits {
            vram: Some(20 * GIB),
            ram: Some(16 * GIB),
        },
        vec![
            ModelConfig::new("t2v", 12 * GIB, 2 * GIB),
            ModelConfig::new("upscale", 4 * GIB, 12 * GIB),
            ModelConfig::new("frame_interpolation", 2 * GIB, 9 * GIB),
        ],
    );
    config.mode = mode;
    config
}

const APP: SessionId = SessionId(1);
const OTHER: SessionId = SessionId(2);

fn granted(out: &[Output]) -> Vec<(RequestId, Action, LeaseId)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Granted {
                request,
                action,
                lease,
                ..
            } => Some((*request, *action, *lease)),
            _ => None,
        })
        .collect()
}

fn unloads(out: &[Output]) -> Vec<(String, UnloadReason)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Unload { model, reason, .. } => Some((model.clone(), *reason)),
            _ => None,
        })
        .collect()
}

fn refusal(out: &[Output]) -> Option<Refusal> {
    out.iter().find_map(|o| match o {
        Output::Refused { refusal, .. } => Some((**refusal).clone()),
        _ => None,
    })
}

/// Acquire + loaded, returning the lease.
fn load(
    engine: &mut Engine,
    now: Duration,
    request: u64,
    session: SessionId,
    model: &str,
) -> LeaseId {
    let out = engine.acquire(now, RequestId(request), session, model);
    let (_, action, lease) = granted(&out)[0];
    assert_eq!(action, Action::Load);
    engine.loaded(now, session, model, None, None);
    lease
}

/// The app unloads and the sidecar sees the memory back.
fn finish_unload(
    engine: &mut Engine,
    now: Duration,
    session: SessionId,
    model: &str,
) -> Vec<Output> {
    engine.unloaded(now, session, model);
    engine.reclaimed(now, session, model)
}

#[test]
fn first_acquire_loads_second_uses() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let lease = load(&mut engine, secs(0), 1, APP, "t2v");
    engine.release(secs(1), lease);
    let out = engine.acquire(secs(2), RequestId(2), APP, "t2v");
    assert_eq!(granted(&out)[0].1, Action::Use);
}

#[test]
fn aggressive_release_unloads_at_once() {
    let mut engine = Engine::new(seed_pool(Mode::Aggressive));
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    let out = engine.release(secs(5), lease);
    assert_eq!(
        unloads(&out),
        [("upscale".to_owned(), UnloadReason::Released)]
    );
    // Held until the memory is seen back (ModelMesh's rule).
    assert_eq!(engine.held(), Footprint::new(4 * GIB, 12 * GIB));
    engine.unloaded(secs(6), APP, "upscale");
    assert_eq!(engine.held(), Footprint::new(4 * GIB, 12 * GIB));
    engine.reclaimed(secs(6), APP, "upscale");
    assert_eq!(engine.held(), Footprint::default());
}

#[test]
fn aggressive_keeps_a_model_while_another_lease_lives() {
    let mut engine = Engine::new(seed_pool(Mode::Aggressive));
    let first = load(&mut engine, secs(0), 1, APP, "t2v");
    let out = engine.acquire(secs(1), RequestId(2), APP, "t2v");
    let (_, action, second) = granted(&out)[0];
    assert_eq!(action, Action::Use);
    assert!(unloads(&engine.release(secs(2), first)).is_empty());
    assert_eq!(unloads(&engine.release(secs(3), second)).len(), 1);
}

#[test]
fn cache_mode_unloads_after_idle_ttl_only() {
    let mut config = seed_pool(Mode::Cache);
    config.idle_ttl = secs(300);
    let mut engine = Engine::new(config);
    let lease = load(&mut engine, secs(0), 1, APP, "t2v");
    assert!(unloads(&engine.release(secs(10), lease)).is_empty());
    assert!(unloads(&engine.tick(secs(309), Readings::default())).is_empty());
    assert_eq!(
        unloads(&engine.tick(secs(310), Readings::default())),
        [("t2v".to_owned(), UnloadReason::IdleTtl)]
    );
}

#[test]
fn over_ceiling_is_refused_with_the_numbers() {
    let mut config = seed_pool(Mode::Aggressive);
    config.models.push(ModelConfig::new("huge", 24 * GIB, 0));
    let mut engine = Engine::new(config);
    let out = engine.acquire(secs(0), RequestId(1), APP, "huge");
    let refusal = refusal(&out).expect("refused");
    assert_eq!(refusal.reason, RefusalReason::ExceedsCeiling);
    assert!(
        refusal
            .message
            .contains("model \"huge\" needs 24.0 GiB of vram, above the ceiling of 20.0 GiB"),
        "{}",
        refusal.message
    );
    assert_eq!(refusal.need, Footprint::new(24 * GIB, 0));
}

#[test]
fn refusal_names_what_holds_the_rest() {
    let mut config = seed_pool(Mode::Aggressive);
    config.acquire_timeout = secs(30);
    let mut engine = Engine::new(config);
    let _t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    let _upscale = load(&mut engine, secs(0), 2, APP, "upscale");
    // frame_interpolation needs 9 GiB RAM; 14 GiB are held by leased models.
    let out = engine.acquire(secs(1), RequestId(3), OTHER, "frame_interpolation");
    assert!(
        granted(&out).is_empty() && refusal(&out).is_none(),
        "it waits"
    );
    let out = engine.tick(secs(31), Readings::default());
    let refusal = refusal(&out).expect("refused after the timeout");
    assert_eq!(refusal.reason, RefusalReason::Timeout);
    for part in [
        "ram: ceiling 16.0 GiB",
        "14.0 GiB held",
        "upscale (12.0 GiB loaded, 1 lease)",
        "t2v (2.0 GiB loaded, 1 lease)",
    ] {
        assert!(
            refusal.message.contains(part),
            "{part:?} missing from {}",
            refusal.message
        );
    }
}

#[test]
fn idle_models_are_evicted_to_make_room_and_the_acquire_waits_for_the_reclaim() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.release(secs(1), lease);
    // frame_interpolation (9 GiB RAM) does not fit beside idle upscale (12 GiB) under 16 GiB.
    let out = engine.acquire(secs(2), RequestId(2), APP, "frame_interpolation");
    assert_eq!(
        unloads(&out),
        [("upscale".to_owned(), UnloadReason::Evicted)]
    );
    assert!(granted(&out).is_empty());
    let out = finish_unload(&mut engine, secs(3), APP, "upscale");
    let grants = granted(&out);
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].0, grants[0].1), (RequestId(2), Action::Load));
}

#[test]
fn a_leased_model_is_never_evicted() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let _lease = load(&mut engine, secs(0), 1, APP, "upscale");
    let out = engine.acquire(secs(1), RequestId(2), APP, "frame_interpolation");
    assert!(unloads(&out).is_empty());
    assert!(granted(&out).is_empty());
}

#[test]
fn pinned_models_stay_and_shrink_the_room() {
    let mut config = seed_pool(Mode::Aggressive);
    config.models[1].pinned = true; // upscale, 12 GiB RAM
    let mut engine = Engine::new(config);
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    assert!(
        unloads(&engine.release(secs(1), lease)).is_empty(),
        "pinned survives release"
    );
    assert!(unloads(&engine.tick(secs(10_000), Readings::default())).is_empty());
    // 9 GiB RAM can never fit beside a pinned 12 GiB under 16 GiB: refused at once.
    let out = engine.acquire(secs(2), RequestId(2), APP, "frame_interpolation");
    let refusal = refusal(&out).expect("refused");
    assert_eq!(refusal.reason, RefusalReason::ExceedsCeiling);
    assert!(
        refusal.message.contains("held by pinned models"),
        "{}",
        refusal.message
    );
    // Only a forced cleanup unloads it.
    assert!(unloads(&engine.cleanup(secs(3), false).0).is_empty());
    assert_eq!(
        unloads(&engine.cleanup(secs(3), true).0),
        [("upscale".to_owned(), UnloadReason::Cleanup)]
    );
}

#[test]
fn a_loaded_pinned_model_above_half_the_ceiling_is_used_again() {
    // upscale (12 GiB RAM) pinned under 16 GiB: its own instance is not room it must fit
    // beside (it was refused with "needs 12 GiB above the ceiling less 12 GiB pinned").
    let mut config = seed_pool(Mode::Aggressive);
    config.models[1].pinned = true;
    let mut engine = Engine::new(config);
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.release(secs(1), lease);
    let out = engine.acquire(secs(2), RequestId(2), APP, "upscale");
    assert!(refusal(&out).is_none(), "{out:?}");
    assert_eq!(granted(&out)[0].1, Action::Use);
    // Another session's copy would need room of its own: refused with the numbers.
    let out = engine.acquire(secs(3), RequestId(3), OTHER, "upscale");
    assert_eq!(
        refusal(&out).expect("refused").reason,
        RefusalReason::ExceedsCeiling
    );
}

#[test]
fn queue_is_fifo_within_a_priority_and_priority_goes_first() {
    let mut config = seed_pool(Mode::Aggressive);
    config.models[0].priority = 100; // t2v
    let mut engine = Engine::new(config);
    let upscale = load(&mut engine, secs(0), 1, APP, "upscale"); // 12 GiB RAM, leased
    // Both wait for RAM: frame_interpolation (prio 0) first, then t2v (prio 100)... t2v fits
    // (2 GiB) so use a second upscale from another session to force waiting.
    let out = engine.acquire(secs(1), RequestId(2), OTHER, "frame_interpolation");
    assert!(granted(&out).is_empty());
    let out = engine.acquire(secs(2), RequestId(3), OTHER, "upscale");
    assert!(granted(&out).is_empty());
    let out = engine.release(secs(3), upscale);
    assert_eq!(unloads(&out).len(), 1);
    let out = finish_unload(&mut engine, secs(4), APP, "upscale");
    // Same priority: the earlier request (frame_interpolation) is served first.
    assert_eq!(granted(&out)[0].0, RequestId(2));
}

#[test]
fn higher_priority_is_served_first() {
    let mut config = seed_pool(Mode::Aggressive);
    config.models[2].priority = 10; // frame_interpolation
    let mut engine = Engine::new(config);
    let upscale = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.acquire(secs(1), RequestId(2), OTHER, "upscale");
    engine.acquire(secs(2), RequestId(3), OTHER, "frame_interpolation");
    engine.release(secs(3), upscale);
    let out = finish_unload(&mut engine, secs(4), APP, "upscale");
    assert_eq!(granted(&out)[0].0, RequestId(3));
}

#[test]
fn acquire_times_out() {
    let mut config = seed_pool(Mode::Aggressive);
    config.acquire_timeout = secs(60);
    let mut engine = Engine::new(config);
    let _lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.acquire(secs(0), RequestId(2), OTHER, "upscale");
    assert!(refusal(&engine.tick(secs(59), Readings::default())).is_none());
    let refused = refusal(&engine.tick(secs(60), Readings::default())).expect("timed out");
    assert_eq!(refused.reason, RefusalReason::Timeout);
    assert_eq!(engine.queue_len(), 0);
}

#[test]
fn pressure_evicts_idle_models() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    let upscale = load(&mut engine, secs(0), 2, APP, "upscale");
    engine.release(secs(1), t2v);
    engine.release(secs(2), upscale);
    // Another tenant pushes the 80 GiB device to 95 %: 4 GiB over the 90 % line.
    let readings = Readings {
        vram: Some((76 * GIB, 80 * GIB)),
        ram: None,
        vram_claimed_by: None,
    };
    let out = engine.tick(secs(3), readings);
    let evicted = unloads(&out);
    assert_eq!(evicted.len(), 1, "one idle model frees enough: {evicted:?}");
    assert_eq!(evicted[0].1, UnloadReason::Pressure);
}

/// A VRAM reading that is one session's own claim (the sidecar reads no GPU itself) can only
/// push out that session's models: the other session's idle model, first in eviction order,
/// stays.
#[test]
fn a_sessions_own_vram_claim_unloads_only_its_models() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    let upscale = load(&mut engine, secs(0), 2, OTHER, "upscale");
    engine.release(secs(1), t2v);
    engine.release(secs(2), upscale);
    let claim = |by| Readings {
        vram: Some((79 * GIB, 80 * GIB)),
        ram: None,
        vram_claimed_by: Some(by),
    };
    let out = engine.tick(secs(3), claim(OTHER));
    assert_eq!(
        unloads(&out),
        vec![("upscale".to_owned(), UnloadReason::Pressure)],
        "only the claimant's model"
    );
    // A claimant with nothing loaded pushes nothing out.
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    engine.release(secs(1), t2v);
    assert!(unloads(&engine.tick(secs(3), claim(OTHER))).is_empty());
    // The same reading taken by the sidecar itself does.
    let out = engine.tick(
        secs(4),
        Readings {
            vram_claimed_by: None,
            ..claim(OTHER)
        },
    );
    assert_eq!(
        unloads(&out),
        vec![("t2v".to_owned(), UnloadReason::Pressure)]
    );
}

#[test]
fn device_room_counts_other_tenants() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    // 20 GiB ceiling, but the device has only 10 GiB free: t2v (12 GiB) must wait.
    engine.tick(
        secs(0),
        Readings {
            vram: Some((70 * GIB, 80 * GIB)),
            ram: None,
            vram_claimed_by: None,
        },
    );
    let out = engine.acquire(secs(0), RequestId(1), APP, "t2v");
    assert!(granted(&out).is_empty());
    let check = engine.check(Footprint::new(12 * GIB, 0));
    assert!(!check.available);
    assert_eq!(check.free_vram, Some(10 * GIB));
}

#[test]
fn learned_footprint_raises_the_need() {
    let mut engine = Engine::new(seed_pool(Mode::Aggressive));
    let out = engine.acquire(secs(0), RequestId(1), APP, "t2v");
    let lease = granted(&out)[0].2;
    // It really took 14 GiB, not the declared 12.
    engine.loaded(
        secs(1),
        APP,
        "t2v",
        Some(Footprint::new(14 * GIB, 2 * GIB)),
        Some(3.0),
    );
    assert_eq!(engine.need("t2v"), Some(Footprint::new(14 * GIB, 2 * GIB)));
    engine.release(secs(2), lease);
    finish_unload(&mut engine, secs(3), APP, "t2v");
    assert_eq!(engine.need("t2v"), Some(Footprint::new(14 * GIB, 2 * GIB)));
}

#[test]
fn a_reclaim_that_never_completes_is_lost_capacity() {
    let mut config = seed_pool(Mode::Aggressive);
    config.reclaim_timeout = secs(10);
    let mut engine = Engine::new(config);
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.release(secs(1), lease);
    engine.unloaded(secs(1), APP, "upscale");
    let out = engine.tick(secs(11), Readings::default());
    assert!(matches!(out[0], Output::MemoryNotReclaimed { .. }));
    assert_eq!(engine.lost(), Footprint::new(4 * GIB, 12 * GIB));
    assert_eq!(
        engine.held(),
        Footprint::new(4 * GIB, 12 * GIB),
        "still counted"
    );
    assert_eq!(engine.counters().not_reclaimed, 1);
    // Seen back later after all: recovered.
    engine.reclaimed(secs(20), APP, "upscale");
    assert_eq!(engine.held(), Footprint::default());
}

#[test]
fn a_dead_session_frees_its_leases_and_waits_for_the_memory() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let _lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.acquire(secs(1), RequestId(2), OTHER, "frame_interpolation");
    engine.session_gone(secs(2), APP);
    assert!(engine.leases_of(APP).is_empty());
    assert_eq!(engine.held().ram, 12 * GIB, "held until seen freed");
    let out = engine.reclaimed(secs(3), APP, "upscale");
    assert_eq!(granted(&out)[0].0, RequestId(2));
}

#[test]
fn measured_usage_over_the_ceiling_is_reported_and_enforced() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    engine.release(secs(1), t2v);
    let out = engine.acquire(secs(2), RequestId(2), APP, "upscale");
    // upscale turns out to take 10 GiB VRAM: 12 + 10 > 20.
    let _lease = granted(&out)[0].2;
    let out = engine.loaded(
        secs(3),
        APP,
        "upscale",
        Some(Footprint::new(10 * GIB, 12 * GIB)),
        None,
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::CeilingExceeded {
            resource: Resource::Vram,
            ..
        }
    )));
    assert_eq!(unloads(&out), [("t2v".to_owned(), UnloadReason::Ceiling)]);
}

/// A pool filled exactly to its ceiling with declared sizes stays at the ceiling when loads
/// measure a few pages more than declared (measurement noise): no breach, no eviction. A real
/// overshoot (beyond 1 MiB or 0.5 %) is still counted and enforced.
#[test]
fn measurement_noise_over_the_declared_size_never_breaches_the_ceiling() {
    const MIB: u64 = 1 << 20;
    let mut config = PoolConfig::new(
        Limits {
            vram: None,
            ram: Some(40 * MIB),
        },
        (0..4)
            .map(|i| ModelConfig::new(&format!("m{i}"), 0, 10 * MIB))
            .collect(),
    );
    config.mode = Mode::Cache;
    let mut engine = Engine::new(config);
    for i in 0..4u64 {
        let model = format!("m{i}");
        let out = engine.acquire(secs(i), RequestId(i + 1), APP, &model);
        assert_eq!(granted(&out).len(), 1, "{model} fits: {out:?}");
        let out = engine.loaded(
            secs(i),
            APP,
            &model,
            Some(Footprint::new(0, 10 * MIB + 16 * 1024)),
            None,
        );
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::CeilingExceeded { .. })),
            "{out:?}"
        );
        assert!(unloads(&out).is_empty(), "{out:?}");
    }
    assert_eq!(engine.held().ram, 40 * MIB);
    assert_eq!(engine.counters().ceiling_breaches.len(), 0);

    // Beyond the noise: the model is bigger than declared, and that is a breach.
    let mut engine = Engine::new(engine.config().clone());
    for i in 0..3u64 {
        let model = format!("m{i}");
        engine.acquire(secs(i), RequestId(i + 1), APP, &model);
        engine.loaded(secs(i), APP, &model, None, None);
    }
    engine.acquire(secs(3), RequestId(4), APP, "m3");
    let out = engine.loaded(secs(3), APP, "m3", Some(Footprint::new(0, 12 * MIB)), None);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::CeilingExceeded { held, .. } if *held == 42 * MIB)),
        "{out:?}"
    );
}

#[test]
fn unknown_model_is_refused_with_the_list() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let refused = refusal(&engine.acquire(secs(0), RequestId(1), APP, "nope")).expect("refused");
    assert_eq!(refused.reason, RefusalReason::UnknownModel);
    assert!(
        refused
            .message
            .contains("t2v, upscale, frame_interpolation")
    );
}

#[test]
fn config_update_keeps_instances_of_dropped_models_until_idle() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    let mut smaller = seed_pool(Mode::Cache);
    smaller.models.retain(|m| m.name != "upscale");
    let out = engine.update_config(secs(1), smaller);
    assert!(unloads(&out).is_empty(), "still leased");
    assert_eq!(engine.held().ram, 12 * GIB);
    let out = engine.release(secs(2), lease);
    assert_eq!(
        unloads(&out),
        [("upscale".to_owned(), UnloadReason::Cleanup)]
    );
    assert!(refusal(&engine.acquire(secs(3), RequestId(2), APP, "upscale")).is_some());
    finish_unload(&mut engine, secs(4), APP, "upscale");
    assert_eq!(engine.held(), Footprint::default());
}

#[test]
fn shutdown_refuses_waiters_and_unloads_idle() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let lease = load(&mut engine, secs(0), 1, APP, "upscale");
    engine.acquire(secs(1), RequestId(2), OTHER, "upscale");
    let t2v = load(&mut engine, secs(1), 3, APP, "t2v");
    engine.release(secs(2), t2v);
    let out = engine.shutdown(secs(3));
    assert_eq!(
        refusal(&out).map(|r| r.reason),
        Some(RefusalReason::ShuttingDown)
    );
    assert_eq!(unloads(&out), [("t2v".to_owned(), UnloadReason::Shutdown)]);
    let _ = lease;
}

#[test]
fn lru_and_cost_aware_pick_different_victims() {
    // a: 8 GiB, reload 1 s, used long ago... b: 8 GiB, reload 60 s, used later.
    let models = vec![
        ModelConfig {
            load_seconds: Some(60.0),
            ..ModelConfig::new("dear", 8 * GIB, 0)
        },
        ModelConfig {
            load_seconds: Some(1.0),
            ..ModelConfig::new("cheap", 8 * GIB, 0)
        },
        ModelConfig::new("new", 8 * GIB, 0),
    ];
    for (policy, victim) in [
        (EvictionPolicy::Lru, "dear"),
        (EvictionPolicy::CostAware, "cheap"),
    ] {
        let mut config = PoolConfig::new(
            Limits {
                vram: Some(16 * GIB),
                ram: None,
            },
            models.clone(),
        );
        config.mode = Mode::Cache;
        config.eviction = policy;
        let mut engine = Engine::new(config);
        let dear = load(&mut engine, secs(0), 1, APP, "dear");
        engine.release(secs(1), dear);
        let out = engine.acquire(secs(2), RequestId(2), APP, "cheap");
        let cheap = granted(&out)[0].2;
        engine.loaded(secs(2), APP, "cheap", None, None);
        engine.release(secs(3), cheap);
        let out = engine.acquire(secs(4), RequestId(3), APP, "new");
        assert_eq!(unloads(&out)[0].0, victim, "{policy:?}");
    }
}

#[test]
fn a_small_request_may_pass_a_blocked_big_one_but_not_forever() {
    let mut config = seed_pool(Mode::Cache);
    config.acquire_timeout = secs(60);
    let mut engine = Engine::new(config);
    let _upscale = load(&mut engine, secs(0), 1, APP, "upscale"); // 12 GiB RAM, leased
    // OTHER's upscale waits for RAM; t2v (2 GiB) fits now and passes it.
    assert!(granted(&engine.acquire(secs(1), RequestId(2), OTHER, "upscale")).is_empty());
    assert_eq!(
        granted(&engine.acquire(secs(2), RequestId(3), APP, "t2v")).len(),
        1
    );
    // Once the big one has waited half its timeout, nothing passes it any more.
    assert!(granted(&engine.acquire(secs(31), RequestId(4), OTHER, "t2v")).is_empty());
}

#[test]
fn a_model_that_measures_small_still_holds_what_it_declared() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let out = engine.acquire(secs(0), RequestId(1), APP, "upscale");
    let _lease = granted(&out)[0].2;
    engine.loaded(
        secs(1),
        APP,
        "upscale",
        Some(Footprint::new(GIB, GIB)),
        None,
    );
    assert_eq!(engine.held(), Footprint::new(4 * GIB, 12 * GIB));
}

#[test]
fn nothing_passes_a_request_whose_room_is_on_its_way_back() {
    let mut engine = Engine::new(seed_pool(Mode::Cache));
    let lease = load(&mut engine, secs(0), 1, APP, "upscale"); // 12 GiB RAM
    engine.release(secs(1), lease);
    // frame_interpolation (9 GiB RAM) evicts idle upscale and waits for it to come back.
    let out = engine.acquire(secs(2), RequestId(2), OTHER, "frame_interpolation");
    assert_eq!(
        unloads(&out),
        [("upscale".to_owned(), UnloadReason::Evicted)]
    );
    // t2v (2 GiB RAM) fits in the 4 GiB free now, but that room is frame_interpolation's.
    assert!(granted(&engine.acquire(secs(3), RequestId(3), APP, "t2v")).is_empty());
    let out = finish_unload(&mut engine, secs(4), APP, "upscale");
    let served: Vec<RequestId> = granted(&out).iter().map(|g| g.0).collect();
    assert_eq!(
        served,
        [RequestId(2), RequestId(3)],
        "in order, both fit now"
    );
}

/// hot is asked for every 10 s; once is asked for once, more recently; then new, which needs
/// one of them out (16 GiB, 8 each). Returns the victim.
fn victim_of_hot_and_once(policy: EvictionPolicy, known_gaps: Option<Vec<f64>>) -> String {
    let models = vec![
        ModelConfig {
            load_seconds: Some(5.0),
            ..ModelConfig::new("hot", 8 * GIB, 0)
        },
        ModelConfig {
            load_seconds: Some(5.0),
            ..ModelConfig::new("once", 8 * GIB, 0)
        },
        ModelConfig::new("new", 8 * GIB, 0),
    ];
    let mut config = PoolConfig::new(
        Limits {
            vram: Some(16 * GIB),
            ram: None,
        },
        models,
    );
    config.mode = Mode::Cache;
    config.eviction = policy;
    let mut engine = Engine::new(config);
    engine.set_known_gaps(known_gaps);
    let lease = load(&mut engine, secs(0), 1, APP, "hot");
    engine.release(secs(1), lease);
    for (n, t) in [10, 20, 30].into_iter().enumerate() {
        let out = engine.acquire(secs(t), RequestId(2 + n as u64), APP, "hot");
        engine.release(secs(t + 1), granted(&out)[0].2);
    }
    let lease = load(&mut engine, secs(35), 9, APP, "once");
    engine.release(secs(36), lease);
    let out = engine.acquire(secs(40), RequestId(10), APP, "new");
    unloads(&out)[0].0.clone()
}

#[test]
fn cost_aware_keeps_a_model_asked_for_often_over_a_newer_one_asked_for_once() {
    // Lru evicts hot (used longer ago); CostAware expects hot back in 10 s and once not for a
    // long while.
    assert_eq!(victim_of_hot_and_once(EvictionPolicy::Lru, None), "hot");
    assert_eq!(
        victim_of_hot_and_once(EvictionPolicy::CostAware, None),
        "once"
    );
}

/// The benchmark's `rate_oracle`: gaps fixed from outside replace what the requests taught.
/// The same history, the known gaps saying the opposite.
#[test]
fn known_gaps_replace_the_learned_ones() {
    let cost_aware = EvictionPolicy::CostAware;
    assert_eq!(
        victim_of_hot_and_once(cost_aware, Some(vec![1000.0, 1.0, 1.0])),
        "hot"
    );
    assert_eq!(
        victim_of_hot_and_once(cost_aware, Some(vec![1.0, 1000.0, 1.0])),
        "once"
    );
}

#[test]
fn cost_aware_keeps_a_model_asked_for_often_through_a_lull_longer_than_its_gaps() {
    // burst is asked for 10 times 2 s apart, then not for 580 s (a lull far longer than its
    // gaps); once is asked for once, in the lull. When new needs room, both have been idle
    // longer than their recent gaps. Lru evicts burst (used longer ago); CostAware counts
    // burst's whole history (one request every 600 / 9 = 67 s) and evicts once. (Before the
    // long-run gap, `since` alone decided here and burst went: `bursty` in BENCHMARKS.md.)
    let models = vec![
        ModelConfig {
            load_seconds: Some(5.0),
            ..ModelConfig::new("burst", 8 * GIB, 0)
        },
        ModelConfig {
            load_seconds: Some(5.0),
            ..ModelConfig::new("once", 8 * GIB, 0)
        },
        ModelConfig::new("new", 8 * GIB, 0),
    ];
    for (policy, victim) in [
        (EvictionPolicy::Lru, "burst"),
        (EvictionPolicy::CostAware, "once"),
    ] {
        let mut config = PoolConfig::new(
            Limits {
                vram: Some(16 * GIB),
                ram: None,
            },
            models.clone(),
        );
        config.mode = Mode::Cache;
        config.idle_ttl = secs(3600);
        config.eviction = policy;
        let mut engine = Engine::new(config);
        let lease = load(&mut engine, secs(0), 1, APP, "burst");
        engine.release(secs(1), lease);
        for n in 1..10u64 {
            let out = engine.acquire(secs(2 * n), RequestId(1 + n), APP, "burst");
            engine.release(secs(2 * n + 1), granted(&out)[0].2);
        }
        let lease = load(&mut engine, secs(500), 20, APP, "once");
        engine.release(secs(501), lease);
        let out = engine.acquire(secs(600), RequestId(21), APP, "new");
        assert_eq!(unloads(&out)[0].0, victim, "{policy:?}");
    }
}

#[test]
fn cost_aware_evicts_the_one_model_that_frees_the_shortfall_not_every_small_one() {
    // 16 GiB RAM ceiling, full with big (10 GiB) and three smalls (2 GiB each); an 8 GiB RAM
    // load is short of 8 GiB. The smalls are cheaper one by one, but all three free only 6 GiB
    // and would still need big: CostAware evicts big alone.
    let mut models = vec![ModelConfig {
        load_seconds: Some(10.0),
        ..ModelConfig::new("big", 0, 10 * GIB)
    }];
    for name in ["s1", "s2", "s3"] {
        models.push(ModelConfig {
            load_seconds: Some(1.0),
            ..ModelConfig::new(name, 0, 2 * GIB)
        });
    }
    models.push(ModelConfig::new("new", 0, 8 * GIB));
    let mut config = PoolConfig::new(
        Limits {
            vram: None,
            ram: Some(16 * GIB),
        },
        models,
    );
    config.mode = Mode::Cache;
    config.eviction = EvictionPolicy::CostAware;
    let mut engine = Engine::new(config);
    for (n, name) in ["big", "s1", "s2", "s3"].into_iter().enumerate() {
        let lease = load(&mut engine, secs(n as u64), n as u64 + 1, APP, name);
        engine.release(secs(n as u64), lease);
    }
    let out = engine.acquire(secs(10), RequestId(9), APP, "new");
    assert_eq!(unloads(&out), [("big".to_owned(), UnloadReason::Evicted)]);
}

#[test]
fn a_request_for_a_loaded_copy_passes_a_head_that_waits_for_leases() {
    let mut config = seed_pool(Mode::Cache);
    config.acquire_timeout = secs(60);
    let mut engine = Engine::new(config);
    let _upscale = load(&mut engine, secs(0), 1, APP, "upscale"); // 12 GiB RAM, leased
    assert!(granted(&engine.acquire(secs(1), RequestId(2), OTHER, "upscale")).is_empty());
    let t2v = load(&mut engine, secs(2), 3, APP, "t2v");
    engine.release(secs(3), t2v);
    // Another load waits behind the head.
    assert!(
        granted(&engine.acquire(secs(5), RequestId(5), OTHER, "frame_interpolation")).is_empty()
    );
    // The head has waited past half its timeout: no load passes it, but APP's t2v is loaded
    // and takes no room.
    let out = engine.acquire(secs(40), RequestId(4), APP, "t2v");
    assert_eq!(granted(&out).len(), 1, "{out:?}");
    assert_eq!(granted(&out)[0].1, Action::Use);
}

/// Admission uses the largest size a load measured, not the last; what was learned is handed
/// out to persist and taken back after a restart, unless the pool changed the model's
/// declared size meanwhile.
#[test]
fn learned_peaks_are_used_persisted_and_restored() {
    let pool = || {
        let mut config = PoolConfig::new(
            Limits {
                vram: None,
                ram: Some(20 * GIB),
            },
            vec![
                ModelConfig::new("x", 0, 8 * GIB),
                ModelConfig::new("y", 0, 8 * GIB),
            ],
        );
        config.mode = Mode::Aggressive;
        config
    };
    let mut engine = Engine::new(pool());
    for (request, ram) in [(1, 14 * GIB), (2, 10 * GIB)] {
        let out = engine.acquire(secs(request), RequestId(request), APP, "x");
        let lease = granted(&out)[0].2;
        engine.loaded(
            secs(request),
            APP,
            "x",
            Some(Footprint::new(0, ram)),
            Some(3.0),
        );
        let out = engine.release(secs(request), lease);
        assert_eq!(unloads(&out).len(), 1, "Aggressive: unloaded at release");
        engine.unloaded(secs(request), APP, "x");
        engine.reclaimed(secs(request), APP, "x");
    }
    assert_eq!(
        engine.need("x"),
        Some(Footprint::new(0, 14 * GIB)),
        "the peak, not the last 10"
    );
    let learned = engine.learned_sizes();
    assert_eq!(learned.len(), 1, "only measured models: {learned:?}");
    assert_eq!(learned["x"].peak, Footprint::new(0, 14 * GIB));
    assert_eq!(learned["x"].declared, Footprint::new(0, 8 * GIB));
    assert_eq!(learned["x"].load_seconds, Some(3.0));

    // A restarted sidecar's engine without the learned sizes admits x beside y on the declared
    // 8 + 8 GiB; with them, x needs 14 and 14 + 8 > 20: it waits.
    for (restore, admitted) in [(false, true), (true, false)] {
        let mut fresh = Engine::new(pool());
        if restore {
            assert_eq!(fresh.restore_learned(&learned), vec!["x".to_owned()]);
        }
        load(&mut fresh, secs(0), 1, OTHER, "y");
        let out = fresh.acquire(secs(1), RequestId(2), APP, "x");
        assert_eq!(
            !granted(&out).is_empty(),
            admitted,
            "restored: {restore}: {out:?}"
        );
    }

    // The pool changed the model (another declared size): nothing restored, and an edit of
    // a live engine starts the model over too.
    let mut edited = pool();
    edited.models[0].declared.ram = 9 * GIB;
    let mut other = Engine::new(edited.clone());
    assert!(other.restore_learned(&learned).is_empty());
    engine.update_config(secs(5), edited);
    assert_eq!(engine.need("x"), Some(Footprint::new(0, 9 * GIB)));
    assert!(engine.learned_sizes().is_empty());
}

/// A pool with one model of unknown size ("mystery": nothing declared, no estimate) beside
/// two declared ones, ceilings 20 GiB VRAM and 16 GiB RAM.
fn unsized_pool(rule: UnsizedModels) -> PoolConfig {
    let mut config = seed_pool(Mode::Cache);
    config.models.push(ModelConfig {
        sized: false,
        estimated: false,
        ..ModelConfig::new("mystery", 0, 0)
    });
    config.unsized_models = rule;
    config
}

#[test]
fn a_model_of_unknown_size_is_admitted_only_alone_until_measured() {
    let mut engine = Engine::new(unsized_pool(UnsizedModels::Alone));
    assert_eq!(
        engine.need("mystery"),
        Some(Footprint::new(20 * GIB, 16 * GIB)),
        "unknown: the whole ceiling"
    );
    // An idle model is evicted to make room, and the acquire waits for its reclaim.
    let t2v = load(&mut engine, secs(0), 1, APP, "t2v");
    engine.release(secs(1), t2v);
    let out = engine.acquire(secs(2), RequestId(2), APP, "mystery");
    assert!(granted(&out).is_empty(), "{out:?}");
    assert_eq!(unloads(&out), [("t2v".to_owned(), UnloadReason::Evicted)]);
    let out = finish_unload(&mut engine, secs(3), APP, "t2v");
    let (_, action, mystery) = granted(&out)[0];
    assert_eq!(action, Action::Load);
    // Loaded without a measurement: still unknown, so nothing is admitted beside it; the
    // waiting acquire is refused at its timeout with the reason in its message.
    engine.loaded(secs(4), APP, "mystery", None, None);
    assert_eq!(engine.held(), Footprint::new(20 * GIB, 16 * GIB));
    let out = engine.acquire(secs(5), RequestId(3), OTHER, "upscale");
    assert!(granted(&out).is_empty(), "{out:?}");
    let out = engine.tick(secs(70), Readings::default());
    let refused = refusal(&out).expect("refused at the acquire timeout");
    assert_eq!(refused.reason, RefusalReason::Timeout);
    assert!(
        refused.message.contains("waited") && refused.message.contains("mystery"),
        "{}",
        refused.message
    );
    // The session reloads it with a measurement: from then on its learned size counts, and
    // a declared model fits beside it.
    engine.release(secs(71), mystery);
    let (out, _) = engine.cleanup(secs(72), true);
    assert_eq!(unloads(&out).len(), 1, "{out:?}");
    finish_unload(&mut engine, secs(72), APP, "mystery");
    let out = engine.acquire(secs(73), RequestId(4), APP, "mystery");
    let (_, action, _) = granted(&out)[0];
    assert_eq!(action, Action::Load);
    engine.loaded(
        secs(74),
        APP,
        "mystery",
        Some(Footprint::new(3 * GIB, GIB)),
        Some(2.0),
    );
    assert_eq!(engine.need("mystery"), Some(Footprint::new(3 * GIB, GIB)));
    let out = engine.acquire(secs(75), RequestId(5), OTHER, "upscale");
    assert_eq!(granted(&out)[0].1, Action::Load, "{out:?}");
    assert!(engine.learned_sizes().contains_key("mystery"));
}

#[test]
fn a_pool_that_refuses_unknown_sizes_says_why_and_what_to_declare() {
    let mut engine = Engine::new(unsized_pool(UnsizedModels::Refuse));
    let out = engine.acquire(secs(0), RequestId(1), APP, "mystery");
    let refused = refusal(&out).expect("refused");
    assert_eq!(refused.reason, RefusalReason::Unsized);
    assert_eq!(refused.reason.as_str(), "unsized");
    for words in [
        "mystery",
        "no known size",
        "unsizedModels: Refuse",
        "vram/ram",
    ] {
        assert!(
            refused.message.contains(words),
            "{words}: {}",
            refused.message
        );
    }
    assert!(engine.held() == Footprint::default());
    // Declared models are unaffected.
    load(&mut engine, secs(1), 2, APP, "t2v");
    // A size learned before a restart makes it known.
    let mut learned = std::collections::BTreeMap::new();
    learned.insert(
        "mystery".to_owned(),
        LearnedSize {
            declared: Footprint::default(),
            peak: Footprint::new(GIB, GIB),
            load_seconds: Some(1.0),
        },
    );
    let mut restarted = Engine::new(unsized_pool(UnsizedModels::Refuse));
    assert_eq!(
        restarted.restore_learned(&learned),
        vec!["mystery".to_owned()]
    );
    let out = restarted.acquire(secs(0), RequestId(1), APP, "mystery");
    assert_eq!(granted(&out)[0].1, Action::Load, "{out:?}");
}

/// A model asleep with its weights in host RAM (vLLM sleep level 1) counts against the RAM
/// ceiling: a load that would need that RAM waits and is refused naming it; the asleep model's
/// own wake-up is admitted net of its host copy, which then stops counting (not twice).
#[test]
fn a_model_asleep_in_host_ram_counts_against_the_ram_ceiling() {
    let mut config = seed_pool(Mode::Aggressive);
    config.acquire_timeout = secs(30);
    let mut engine = Engine::new(config);
    // upscale (4/12 GiB) went to sleep: its 16 GiB now sit in host RAM, at the RAM ceiling.
    let out = engine.set_asleep(secs(0), "upscale", Some(Footprint::new(0, 16 * GIB)));
    assert!(out.is_empty());
    assert_eq!(engine.held(), Footprint::new(0, 16 * GIB));
    let out = engine.acquire(secs(1), RequestId(1), APP, "t2v");
    assert!(granted(&out).is_empty(), "t2v's 2 GiB of RAM do not fit");
    let out = engine.tick(secs(31), Readings::default());
    let refusal = refusal(&out).expect("refused after the timeout");
    assert_eq!(refusal.reason, RefusalReason::Timeout);
    for part in [
        "ram: ceiling 16.0 GiB",
        "16.0 GiB held by upscale (16.0 GiB asleep)",
    ] {
        assert!(
            refusal.message.contains(part),
            "{part:?} missing from {}",
            refusal.message
        );
    }
    // Waking upscale frees its host copy: admitted, counted once (its loaded footprint).
    let _upscale = load(&mut engine, secs(32), 2, APP, "upscale");
    assert!(engine.asleep().is_empty());
    assert_eq!(engine.held(), Footprint::new(4 * GIB, 12 * GIB));
    // An entry for a model with an instance is not taken (the instance counts it).
    engine.set_asleep(secs(33), "upscale", Some(Footprint::new(0, GIB)));
    assert!(engine.asleep().is_empty());
    // Cleared: the RAM is free again.
    let mut engine = Engine::new(seed_pool(Mode::Aggressive));
    engine.set_asleep(secs(0), "upscale", Some(Footprint::new(0, 16 * GIB)));
    let out = engine.acquire(secs(1), RequestId(1), APP, "t2v");
    assert!(granted(&out).is_empty());
    let out = engine.set_asleep(secs(2), "upscale", None);
    assert_eq!(
        granted(&out).len(),
        1,
        "the waiting acquire is granted once the RAM is free"
    );
}

/// Issue 20: an estimate from the weights' headers is replaced by what loads really took (a
/// runtime overhead guessed too high is not kept reserved), while a declared size stays a
/// floor under the measurement.
#[test]
fn a_measured_load_replaces_an_estimate_but_not_a_declared_size() {
    for (estimated, need_after) in [
        (true, Footprint::new(3 * GIB, GIB)),
        (false, Footprint::new(5 * GIB, 2 * GIB)),
    ] {
        let mut config = seed_pool(Mode::Cache);
        config.models.push(ModelConfig {
            estimated,
            ..ModelConfig::new("guessed", 5 * GIB, 2 * GIB)
        });
        let mut engine = Engine::new(config);
        assert_eq!(
            engine.need("guessed"),
            Some(Footprint::new(5 * GIB, 2 * GIB))
        );
        let out = engine.acquire(secs(0), RequestId(1), APP, "guessed");
        let (_, action, lease) = granted(&out)[0];
        assert_eq!(action, Action::Load);
        engine.loaded(
            secs(1),
            APP,
            "guessed",
            Some(Footprint::new(3 * GIB, GIB)),
            Some(2.0),
        );
        engine.release(secs(2), lease);
        assert_eq!(
            engine.need("guessed"),
            Some(need_after),
            "estimated: {estimated}"
        );
    }
}
