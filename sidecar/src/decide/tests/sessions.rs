//! Sessions: opening, heartbeats, liveness, closing.

use super::*;

#[test]
fn open_session_names_the_session_and_the_pool() {
    let mut rig = Rig::new("Aggressive", Some(1024), &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    assert_eq!(s, format!("s-{FIRST}"));
    let fx = rig.take();
    assert_eq!(fx.streams_opened, vec![SessionId(FIRST)]);
    assert_eq!(fx.watch, vec![(SessionId(FIRST), Some(7))]);
    let body = rig.open_with(8, &[], Vec::new()).unwrap();
    assert_eq!(body["session"], format!("s-{}", FIRST + 1));
    assert_eq!(body["pool"]["name"], "p");
    assert_eq!(body["pool"]["models"][0]["ram_bytes"], 10 * MIB);
    assert_eq!(body["heartbeat_ms"], 2000);
}

#[test]
fn open_session_refuses_models_not_in_the_pool_naming_the_list() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false), ("b", 10, false)]);
    let error = rig.open_with(7, &["a", "zz"], Vec::new()).unwrap_err();
    assert_eq!(
        error,
        LookupError::Model {
            names: vec!["zz".to_owned()],
            listed: "a, b".to_owned()
        }
    );
    assert!(rig.core.sessions().is_empty());
}

#[test]
fn no_sessions_while_shutting_down() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    rig.core.shutdown(rig.now, &mut rig.fx);
    assert!(rig.core.shutting_down());
    assert_eq!(
        rig.open_with(7, &[], Vec::new()).unwrap_err(),
        LookupError::ShuttingDown
    );
}

#[test]
fn unknown_sessions_are_named_in_the_error() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    assert_eq!(
        rig.core.heartbeat(rig.now, "s-9", None).unwrap_err(),
        LookupError::Session("s-9".to_owned())
    );
    assert!(rig.acquire_with("nonsense", "a", true).is_err());
    assert!(rig.core.close_session(rig.now, "s-1", &mut rig.fx).is_err());
}

#[test]
fn missed_heartbeats_end_the_session() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    // Pid 9 is not visible: the configured interval.
    let created = rig.open_with(9, &["a"], Vec::new()).unwrap();
    assert_eq!(created["heartbeat_ms"], HEARTBEAT.as_millis() as u64);
    let s = created["session"].as_str().unwrap().to_owned();
    rig.advance(HEARTBEAT);
    rig.core.heartbeat(rig.now, &s, None).unwrap();
    rig.advance(HEARTBEAT * 2);
    rig.tick();
    assert!(rig.core.session_open(id(&s)), "2 intervals: still open");
    rig.advance(ms(1));
    rig.tick();
    assert!(!rig.core.session_open(id(&s)));
    assert_eq!(rig.take().streams_closed, vec![id(&s)]);
}

/// A session whose pid the sidecar sees is asked for heartbeats VISIBLE_PID_HEARTBEAT_FACTOR
/// times less often (its death is seen on the process) and ends after two of those missed.
#[test]
fn a_visible_pid_heartbeats_less_often_and_still_ends_when_silent() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    rig.meter.set(7, 100 * MIB);
    let created = rig.open_with(7, &["a"], Vec::new()).unwrap();
    let interval = HEARTBEAT * VISIBLE_PID_HEARTBEAT_FACTOR;
    assert_eq!(created["heartbeat_ms"], interval.as_millis() as u64);
    let s = created["session"].as_str().unwrap().to_owned();
    rig.advance(HEARTBEAT * 3);
    rig.tick();
    assert!(rig.core.session_open(id(&s)), "3 base intervals: open");
    rig.advance(interval * 2 - HEARTBEAT * 3);
    rig.tick();
    assert!(rig.core.session_open(id(&s)), "2 of its intervals: open");
    rig.advance(ms(1));
    rig.tick();
    assert!(!rig.core.session_open(id(&s)), "past 2 of its intervals");
}

#[test]
fn a_dead_process_ends_its_session() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    rig.tick();
    assert!(rig.core.session_open(id(&s)));
    rig.meter.kill(7);
    rig.tick();
    assert!(!rig.core.session_open(id(&s)));
}

#[test]
fn an_invisible_pid_lives_by_heartbeats_only() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    // Pid 9 is not visible: the reading says not alive at open.
    let s = rig.open_with(9, &[], Vec::new()).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!rig.core.sessions()[&id(&s)].pid_visible);
    rig.tick();
    assert!(
        rig.core.session_open(id(&s)),
        "not ended for an invisible pid"
    );
}

#[test]
fn closing_a_session_ends_its_leases_and_its_models_wait_for_reclaim() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (_lease, generation) = rig.load(&s, "a", 10);
    rig.core.close_session(rig.now, &s, &mut rig.fx).unwrap();
    assert!(rig.core.leases().is_empty());
    assert_eq!(
        rig.state("a"),
        Some((InstanceState::Reclaiming, generation, 0))
    );
    assert_eq!(rig.core.dead_pids().get(&id(&s)), Some(&7));
    assert_eq!(
        rig.core
            .metrics
            .unloads
            .with_label_values(&["a", "session_gone"])
            .get(),
        1
    );
    // Still alive and holding: not reclaimed. Then the process exits.
    rig.tick();
    assert!(rig.state("a").is_some());
    rig.meter.kill(7);
    rig.take();
    rig.tick();
    assert!(rig.state("a").is_none());
    let fx = rig.take();
    assert_eq!(
        fx.reclaimed,
        vec![(id(&s), "a".to_owned(), SeenBy::ProcessExit)]
    );
    assert!(rig.core.dead_pids().is_empty());
    assert!(fx.watch.contains(&(id(&s), None)), "pid no longer watched");
}
