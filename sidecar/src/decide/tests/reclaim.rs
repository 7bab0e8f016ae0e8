//! Unload acknowledgements and the proof that memory came back.

use super::*;

#[test]
fn a_stale_acknowledgement_is_refused_and_changes_nothing() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, first) = rig.load(&s, "a", 10);
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", first, 10).unwrap();
    assert!(rig.state("a").is_none(), "reclaimed at once: RSS fell");
    let (_, second) = rig.load(&s, "a", 10);
    assert_ne!(first, second);
    let counters = rig.core.engine().counters().clone();
    let error = rig.unloaded(&s, "a", first, 0).unwrap_err();
    assert_eq!(
        error,
        LookupError::StaleInstance {
            session: s.clone(),
            model: "a".to_owned(),
            generation: first,
            current: Some(second)
        }
    );
    assert!(error.to_string().contains("nothing changed"));
    assert_eq!(rig.state("a"), Some((InstanceState::Loaded, second, 1)));
    assert_eq!(rig.core.engine().counters(), &counters);
}

/// The ticker reads every process only once per heartbeat interval; the pids it reads on every
/// tick are exactly those an unload is waiting on (a session's, or a closed session's).
#[test]
fn only_pids_with_an_unload_awaiting_proof_are_read_every_tick() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false), ("b", 10, false)]);
    let s = rig.open(7, &["a"]);
    let idle = rig.open(8, &["b"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    let _held = rig.load(&idle, "b", 10);
    assert!(rig.core.pids_awaiting_reclaim(rig.now).is_empty());
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", generation, 0).unwrap();
    assert_eq!(rig.core.pids_awaiting_reclaim(rig.now), vec![7]);
    // The session closes with the proof still owed: its pid is still read.
    rig.core.close_session(rig.now, &s, &mut rig.fx).unwrap();
    assert_eq!(rig.core.pids_awaiting_reclaim(rig.now), vec![7]);
    rig.meter.kill(7);
    rig.tick();
    assert!(rig.core.pids_awaiting_reclaim(rig.now).is_empty());
}

#[test]
fn a_duplicate_acknowledgement_is_refused() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    rig.release(&s, &lease);
    // The app keeps the memory: the instance stays reclaiming.
    rig.unloaded(&s, "a", generation, 0).unwrap();
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Reclaiming);
    let error = rig.unloaded(&s, "a", generation, 0).unwrap_err();
    assert!(
        matches!(
            error,
            LookupError::AlreadyUnloaded {
                state: "reclaiming",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_leased_or_loading_instance_cannot_be_acknowledged() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false), ("b", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (_lease, generation) = rig.load(&s, "a", 10);
    let error = rig.unloaded(&s, "a", generation, 0).unwrap_err();
    assert!(error.to_string().contains("1 lease(s)"), "{error}");
    let (_, _, loading) = rig.grant(&s, "b");
    let error = rig.unloaded(&s, "b", loading, 0).unwrap_err();
    assert!(error.to_string().contains("never reported"), "{error}");
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Loaded);
}

#[test]
fn an_unload_on_the_apps_own_initiative_counts_as_cleanup() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 10);
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", generation, 10).unwrap();
    assert!(rig.state("a").is_none());
    assert_eq!(
        rig.core
            .metrics
            .unloads
            .with_label_values(&["a", "cleanup"])
            .get(),
        1
    );
    let fx = rig.take();
    assert!(fx.answered.contains(&(id(&s), "a".to_owned(), generation)));
    assert_eq!(fx.reclaimed, vec![(id(&s), "a".to_owned(), SeenBy::Proc)]);
}

#[test]
fn a_model_not_in_the_pool_cannot_be_acknowledged() {
    let mut rig = Rig::new("Cache", None, &[("a", 10, false)]);
    let s = rig.open(7, &["a"]);
    assert!(matches!(
        rig.unloaded(&s, "zz", 1, 0).unwrap_err(),
        LookupError::Model { .. }
    ));
}

#[test]
fn reclaim_waits_for_the_rss_to_fall() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 100, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 100);
    rig.release(&s, &lease);
    // Acknowledged but only 10 MiB of 100 given back: not seen yet.
    rig.unloaded(&s, "a", generation, 10).unwrap();
    rig.tick();
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Reclaiming);
    assert_eq!(rig.held_ram(), 100 * MIB, "still counted");
    rig.meter.set(7, 100 * MIB);
    rig.tick();
    assert!(rig.state("a").is_none());
    assert_eq!(rig.held_ram(), 0);
}

#[test]
fn a_reclaim_past_the_timeout_is_lost_and_reported() {
    let mut rig = Rig::new("Aggressive", None, &[("a", 100, false)]);
    let s = rig.open(7, &["a"]);
    let (lease, generation) = rig.load(&s, "a", 100);
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", generation, 0).unwrap();
    rig.take();
    rig.advance(Duration::from_secs(5));
    rig.core.heartbeat(rig.now, &s, None).unwrap();
    rig.tick();
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Lost);
    assert_eq!(rig.core.engine().lost().ram, 100 * MIB);
    let fx = rig.take();
    assert!(fx.last_error.unwrap().contains("MemoryNotReclaimed: a"));
    assert_eq!(rig.core.metrics.memory_not_reclaimed.get(), 1);
    // Seen back later: it leaves the ledger.
    rig.meter.set(7, 100 * MIB);
    rig.tick();
    assert!(rig.state("a").is_none());
}
