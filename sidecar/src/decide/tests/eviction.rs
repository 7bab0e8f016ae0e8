//! Cleanup, eviction, pressure, drain and shutdown.

use super::*;

#[test]
fn cleanup_unloads_idle_models_and_only_force_takes_pinned_ones() {
    let mut rig = Rig::new(
        "Cache",
        None,
        &[("idle", 10, false), ("busy", 10, false), ("pin", 10, true)],
    );
    let s = rig.open(7, &[]);
    let (l1, _) = rig.load(&s, "idle", 10);
    rig.load(&s, "busy", 10);
    let (l3, _) = rig.load(&s, "pin", 10);
    rig.release(&s, &l1);
    rig.release(&s, &l3);
    let answer = as_json(rig.core.cleanup(rig.now, false, &mut rig.fx));
    assert_eq!(answer["unloading"][0]["model"], "idle");
    assert_eq!(answer["unloading"].as_array().unwrap().len(), 1);
    assert_eq!(answer["skipped_leased"], serde_json::json!(["busy"]));
    let answer = as_json(rig.core.cleanup(rig.now, true, &mut rig.fx));
    assert_eq!(answer["unloading"][0]["model"], "pin");
}

#[test]
fn an_idle_model_is_evicted_to_make_room_and_the_acquire_waits_for_its_reclaim() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    let (lease, generation) = rig.load(&s, "a", 60);
    rig.release(&s, &lease);
    rig.take();
    let (first, mut receiver) = rig.acquire(&s, "b");
    assert!(matches!(first, First::Queued(_)));
    let fx = rig.take();
    assert_eq!(fx.unloads[0].reason, UnloadReason::Evicted);
    assert_eq!(
        rig.core
            .metrics
            .unloads
            .with_label_values(&["a", "evicted"])
            .get(),
        1
    );
    rig.unloaded(&s, "a", generation, 60).unwrap();
    assert!(matches!(
        receiver.try_recv().unwrap(),
        Verdict::Granted {
            action: Action::Load,
            ..
        }
    ));
}

#[test]
fn a_leased_model_is_never_evicted() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false), ("b", 60, false)]);
    let s = rig.open(7, &[]);
    rig.load(&s, "a", 60);
    rig.take();
    let (first, _receiver) = rig.acquire(&s, "b");
    assert!(matches!(first, First::Queued(_)));
    assert!(rig.take().unloads.is_empty());
    rig.advance(Duration::from_secs(11));
    rig.core.heartbeat(rig.now, &s, None).unwrap();
    rig.tick();
    assert_eq!(
        rig.core
            .metrics
            .acquires_refused
            .with_label_values(&["timeout"])
            .get(),
        1
    );
}

#[test]
fn draining_unloads_idle_pinned_models_at_the_tick() {
    let mut rig = Rig::new("Cache", None, &[("pin", 10, true)]);
    let s = rig.open(7, &[]);
    let (lease, _) = rig.load(&s, "pin", 10);
    rig.release(&s, &lease);
    rig.take();
    rig.tick();
    assert!(rig.take().unloads.is_empty());
    let readings = rig.meter.tick();
    rig.core.tick(rig.now, readings, true, &mut rig.fx);
    assert_eq!(rig.take().unloads[0].reason, UnloadReason::Cleanup);
}

#[test]
fn shutdown_refuses_waiters_and_unloads_idle_models() {
    let mut rig = Rig::new(
        "Cache",
        Some(100),
        &[("a", 60, false), ("b", 60, false), ("c", 10, false)],
    );
    let s = rig.open(7, &[]);
    rig.load(&s, "a", 60);
    let (lc, _) = rig.load(&s, "c", 10);
    rig.release(&s, &lc);
    let (_, mut receiver) = rig.acquire(&s, "b");
    rig.take();
    rig.core.shutdown(rig.now, &mut rig.fx);
    match receiver.try_recv().unwrap() {
        Verdict::Refused(refusal) => assert_eq!(refusal.reason, RefusalReason::ShuttingDown),
        other => panic!("{other:?}"),
    }
    let fx = rig.take();
    assert_eq!(fx.unloads.len(), 1);
    assert_eq!(fx.unloads[0].reason, UnloadReason::Shutdown);
    assert_eq!(rig.core.unloads_in_flight(rig.now), 1);
}

#[test]
fn a_new_pool_keeps_instances_of_dropped_models_until_idle() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false), ("b", 10, false)]);
    let s = rig.open(7, &[]);
    let (lease, _) = rig.load(&s, "a", 10);
    rig.take();
    rig.core.update_pool(
        rig.now,
        pool_with("Cache", None, &[("b", 10, false)]),
        &mut rig.fx,
    );
    assert_eq!(rig.core.pool().models.len(), 1);
    assert_eq!(
        rig.state("a").unwrap().0,
        InstanceState::Loaded,
        "leased: kept"
    );
    rig.release(&s, &lease);
    assert_eq!(rig.take().unloads[0].reason, UnloadReason::Cleanup);
}
