//! Instances are numbered: every granted load is a new generation, and what the engine says
//! about an instance (grants, unloads, lost memory, views) names it.

use std::time::Duration;

use modelpool_policy::*;

const MIB: u64 = 1 << 20;
const APP: SessionId = SessionId(1);

fn pool(mode: Mode) -> PoolConfig {
    let mut config = PoolConfig::new(
        Limits::new(None, Some(100 * MIB)),
        vec![ModelConfig::new("a", 0, 10 * MIB)],
    );
    config.mode = mode;
    config
}

fn granted(out: &[Output]) -> (LeaseId, u64, Action) {
    out.iter()
        .find_map(|o| match o {
            Output::Granted {
                lease,
                generation,
                action,
                ..
            } => Some((*lease, *generation, *action)),
            _ => None,
        })
        .expect("a grant")
}

#[test]
fn each_load_is_a_new_generation_and_unloads_name_it() {
    let mut engine = Engine::new(pool(Mode::Aggressive));
    let t = Duration::from_secs(1);
    let (lease, first, action) = granted(&engine.acquire(t, RequestId(1), APP, "a"));
    assert_eq!(action, Action::Load);
    assert!(first > 0);
    engine.loaded(t, APP, "a", None, None);
    let view = engine.instance(t, APP, "a").unwrap();
    assert_eq!(
        (view.generation, view.state),
        (first, InstanceState::Loaded)
    );

    // A second lease on the same instance names the same generation.
    let (second_lease, same, action) = granted(&engine.acquire(t, RequestId(2), APP, "a"));
    assert_eq!((same, action), (first, Action::Use));
    engine.release(t, second_lease);

    let out = engine.release(t, lease);
    let unload = out
        .iter()
        .find_map(|o| match o {
            Output::Unload { generation, .. } => Some(*generation),
            _ => None,
        })
        .unwrap();
    assert_eq!(unload, first, "the unload is for that instance");
    engine.unloaded(t, APP, "a");
    engine.reclaimed(t, APP, "a");
    assert!(engine.instance(t, APP, "a").is_none());

    let (_, next, action) = granted(&engine.acquire(t, RequestId(3), APP, "a"));
    assert_eq!(action, Action::Load);
    assert!(next > first, "a later load is a later generation");
}

#[test]
fn lost_memory_names_its_instance() {
    let mut config = pool(Mode::Aggressive);
    config.reclaim_timeout = Duration::from_secs(5);
    let mut engine = Engine::new(config);
    let t = Duration::from_secs(1);
    let (lease, generation, _) = granted(&engine.acquire(t, RequestId(1), APP, "a"));
    engine.loaded(t, APP, "a", None, None);
    engine.release(t, lease);
    let out = engine.tick(Duration::from_secs(10), Readings::default());
    let lost = out
        .iter()
        .find_map(|o| match o {
            Output::MemoryNotReclaimed { generation, .. } => Some(*generation),
            _ => None,
        })
        .unwrap();
    assert_eq!(lost, generation);
    assert_eq!(
        engine.instances(Duration::from_secs(10))[0].generation,
        generation
    );
}
