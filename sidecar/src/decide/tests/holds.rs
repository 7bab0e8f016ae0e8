//! Models the app already holds, announced and adopted.

use super::*;

fn hold(model: &str, mib: u64, leases: u32) -> Hold {
    Hold {
        model: model.to_owned(),
        vram_bytes: None,
        ram_bytes: Some(mib * MIB),
        leases,
    }
}

#[test]
fn held_models_are_adopted_with_their_generation() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    rig.meter.set(7, 200 * MIB);
    let body = rig.open_with(7, &["a"], vec![hold("a", 50, 0)]).unwrap();
    let generation = body["adopted"][0]["generation"].as_u64().unwrap();
    assert_eq!(body["adopted"][0]["model"], "a");
    assert_eq!(rig.state("a"), Some((InstanceState::Loaded, generation, 0)));
    assert_eq!(rig.held_ram(), 50 * MIB, "the larger of held and declared");
}

/// An app paused past two heartbeats (SIGSTOP, a long native call) loses its session while
/// its process keeps the model; when it comes back and re-announces the hold, the ended
/// session's copy leaves the ledger as the new one enters: counted once, never twice.
#[test]
fn a_paused_app_that_reannounces_its_hold_is_counted_once() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 60, false)]);
    let s = rig.open(7, &["a"]);
    rig.load(&s, "a", 60);
    let interval = HEARTBEAT * VISIBLE_PID_HEARTBEAT_FACTOR;
    rig.advance(interval * 2 + ms(1));
    rig.tick();
    assert!(!rig.core.session_open(id(&s)), "silent: ended");
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Reclaiming);
    assert_eq!(
        rig.held_ram(),
        60 * MIB,
        "still counted: the process kept it"
    );

    // Back: a new session of the same pid announces the hold. With 60 of 100 MiB counted
    // twice it could not even be adopted.
    let body = rig.open_with(7, &["a"], vec![hold("a", 60, 0)]).unwrap();
    assert_eq!(body["adopted"][0]["model"], "a", "{body}");
    assert_eq!(body["refused_holds"], serde_json::json!([]), "{body}");
    let instances = rig.core.engine().instances(rig.now);
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].state, InstanceState::Loaded);
    assert_ne!(instances[0].session, id(&s));
    assert_eq!(rig.held_ram(), 60 * MIB);
    assert_eq!(
        rig.core
            .metrics
            .reclaims
            .with_label_values(&["re_announced"])
            .get(),
        1
    );
    // The ended session has nothing left to reclaim: its pid is no longer watched for it.
    assert!(!rig.core.dead_pids().contains_key(&id(&s)));
}

/// Only the same process takes over an ended session's copy: another pid announcing the same
/// model adds its own.
#[test]
fn a_hold_announced_by_another_pid_does_not_retire_an_ended_sessions_copy() {
    let mut rig = Rig::new("Cache", Some(200), &[("a", 60, false)]);
    let s = rig.open(7, &["a"]);
    rig.load(&s, "a", 60);
    rig.core.close_session(rig.now, &s, &mut rig.fx).unwrap();
    rig.meter.set(8, 100 * MIB);
    rig.open_with(8, &["a"], vec![hold("a", 60, 0)]).unwrap();
    assert_eq!(rig.core.engine().instances(rig.now).len(), 2);
    assert_eq!(rig.held_ram(), 120 * MIB);
}

#[test]
fn a_held_model_that_does_not_fit_is_refused_and_commanded_out() {
    let mut rig = Rig::new("Cache", Some(100), &[("a", 80, false), ("b", 80, false)]);
    rig.meter.set(7, 200 * MIB);
    let body = rig
        .open_with(7, &[], vec![hold("a", 80, 0), hold("b", 80, 0)])
        .unwrap();
    assert_eq!(body["refused_holds"][0]["model"], "b");
    let fx = rig.take();
    let unload = fx.unloads.iter().find(|u| u.model == "b").unwrap();
    assert_eq!(
        (unload.generation, unload.reason),
        (0, UnloadReason::Ceiling)
    );
    // Its answer names generation 0: accepted, nothing to count.
    let s = body["session"].as_str().unwrap().to_owned();
    rig.unloaded(&s, "b", 0, 80).unwrap();
}

#[test]
fn an_idle_hold_in_aggressive_mode_is_unloaded_at_once() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    rig.meter.set(7, 200 * MIB);
    rig.open_with(7, &["a"], vec![hold("a", 10, 0)]).unwrap();
    let fx = rig.take();
    assert_eq!(fx.unloads.len(), 1);
    assert_eq!(fx.unloads[0].reason, UnloadReason::Released);
}

#[test]
fn a_hold_in_use_keeps_a_placeholder_until_the_first_release() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    rig.meter.set(7, 200 * MIB);
    let body = rig.open_with(7, &["a"], vec![hold("a", 10, 1)]).unwrap();
    let s = body["session"].as_str().unwrap().to_owned();
    assert!(rig.take().unloads.is_empty(), "in use: kept");
    assert_eq!(rig.state("a").unwrap().2, 1, "the placeholder lease");
    // The block renews its lease (use), then ends: the placeholder goes too, and it unloads.
    let (lease, action, _) = rig.grant(&s, "a");
    assert_eq!(action, Action::Use);
    assert_eq!(rig.state("a").unwrap().2, 1, "placeholder replaced");
    assert!(rig.release(&s, &lease));
}
