//! What the core shows: gauges, state, device readings, watched pids.

use super::*;

#[test]
fn gauges_cover_every_model_with_zeros_and_sum_instances() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 10, false), ("b", 10, false)]);
    let s = rig.open(7, &[]);
    let other = rig.open(8, &[]);
    rig.load(&s, "a", 10);
    rig.load(&other, "a", 10);
    let gauges = rig.core.gauges(rig.now);
    assert_eq!(gauges.sessions, 2);
    assert_eq!(gauges.ceilings.ram, Some(100 * MIB));
    let a = gauges.models.iter().find(|m| m.name == "a").unwrap();
    assert_eq!((a.loaded, a.leases, a.held.ram), (2, 2, 20 * MIB));
    let b = gauges.models.iter().find(|m| m.name == "b").unwrap();
    assert_eq!((b.loaded, b.leases, b.held.ram), (0, 0, 0));
    assert_eq!(gauges.held.ram, 20 * MIB);
}

#[test]
fn state_lists_instances_sessions_and_pending_commands() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    rig.release(&s, &lease);
    let pending = BTreeMap::from([(
        id(&s),
        vec![crate::api::wire::Command {
            id: 1,
            kind: crate::api::wire::CommandKind::Unload,
            model: "a".to_owned(),
            generation,
            reason: UnloadReason::Released,
        }],
    )]);
    let vram = BTreeMap::from([(7, (5 * MIB, Source::Nvml))]);
    let state = as_json(rig.core.state(rig.now, &vram, &pending));
    assert_eq!(state["models"][0]["generation"], generation);
    assert_eq!(state["models"][0]["state"], "unloading");
    assert_eq!(state["models"][0]["unload_reason"], "released");
    assert_eq!(state["sessions"][0]["pid"], 7);
    assert_eq!(state["sessions"][0]["vram_bytes"], 5 * MIB);
    assert_eq!(
        state["sessions"][0]["pending_commands"][0]["generation"],
        generation
    );
    assert_eq!(state["counters"]["unloads"]["released"], 1);
}

#[test]
fn an_apps_device_reading_stands_in_for_a_missing_gpu_while_fresh() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &[]);
    let readings = crate::api::wire::AppReadings {
        source: "torch".to_owned(),
        device_vram_used_bytes: Some(3),
        device_vram_total_bytes: Some(8),
        process_vram_bytes: None,
    };
    rig.core.heartbeat(rig.now, &s, Some(readings)).unwrap();
    let gpu = rig.core.app_gpu(rig.now).unwrap();
    assert_eq!((gpu.used_bytes(), gpu.total_bytes()), (3, 8));
    rig.tick();
    assert!(rig.core.gauges(rig.now).gpu_up);
    // Fresh for three of the session's intervals (pid 7 is visible: the longer one).
    let interval = HEARTBEAT * VISIBLE_PID_HEARTBEAT_FACTOR;
    assert!(rig.core.app_gpu(rig.now + interval * 3).is_some());
    assert!(
        rig.core.app_gpu(rig.now + interval * 3 + ms(1)).is_none(),
        "stale"
    );
}

/// Found by attacking the sidecar: a heartbeat claiming 1e19 bytes used of 1 made it evict
/// another session's idle model for "pressure". Impossible readings are refused (the heartbeat
/// still counts), and a possible but hostile claim (the device full) only pushes out the
/// claimant's own models while the sidecar has no GPU reading of its own.
#[test]
fn one_sessions_device_claim_never_evicts_another_sessions_model() {
    let models = [("a", 10, false), ("b", 10, false)];
    let mut pool = pool_with("Cache", None, &models);
    pool.config.pressure_vram_percent = 90;
    for m in &mut pool.config.models {
        m.declared.vram = 4 * MIB;
    }
    for m in &mut pool.info.models {
        m.vram_bytes = 4 * MIB;
    }
    let mut rig = Rig {
        core: core_with(pool, false),
        ..Rig::new("Cache", None, &models)
    };
    let victim = rig.open(7, &["a"]);
    let (lease, _) = rig.load(&victim, "a", 10);
    rig.release(&victim, &lease);
    let hostile = rig.open(8, &["b"]);
    let claim = |used, total| crate::api::wire::AppReadings {
        source: "torch".to_owned(),
        device_vram_used_bytes: Some(used),
        device_vram_total_bytes: Some(total),
        process_vram_bytes: None,
    };
    rig.advance(ms(100));
    let error = rig
        .core
        .heartbeat(
            rig.now,
            &hostile,
            Some(claim(10_000_000_000_000_000_000, 1)),
        )
        .unwrap_err();
    assert!(
        matches!(&error, LookupError::Readings { why, .. } if why.contains("device_vram_used_bytes")),
        "{error}"
    );
    assert_eq!(
        rig.core.sessions()[&id(&hostile)].last_seen,
        rig.now,
        "still alive"
    );
    assert!(rig.core.app_gpu(rig.now).is_none(), "not taken");
    // A full device, claimed by a session that holds nothing: nothing to push out.
    rig.core
        .heartbeat(rig.now, &hostile, Some(claim(8 * MIB, 8 * MIB)))
        .unwrap();
    rig.tick();
    assert_eq!(
        rig.state("a").unwrap().0,
        InstanceState::Loaded,
        "the victim's model stays"
    );
    assert!(rig.take().unloads.is_empty());
}

#[test]
fn watched_pids_are_open_sessions_and_ended_ones_still_reclaiming() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &[]);
    let other = rig.open(8, &[]);
    rig.load(&s, "a", 10);
    rig.core.close_session(rig.now, &s, &mut rig.fx).unwrap();
    rig.core
        .close_session(rig.now, &other, &mut rig.fx)
        .unwrap();
    assert_eq!(rig.core.watched(), BTreeMap::from([(id(&s), 7)]));
}
