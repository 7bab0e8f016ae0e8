//! Property tests: random event sequences against the invariants of DESIGN section 4, checked
//! by an oracle that tracks leases on its own (it does not trust the engine's bookkeeping).
//!
//! `PROPTEST_CASES` sets the number of sequences (CI runs 10,000: see `.ci/run`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use modelpool_policy::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        session: u64,
        model: usize,
    },
    Release {
        pick: usize,
    },
    Loaded {
        pick: usize,
        grow: bool,
    },
    LoadFailed {
        pick: usize,
    },
    Unloaded {
        pick: usize,
    },
    Reclaimed {
        pick: usize,
    },
    Tick {
        advance_s: u64,
        vram_used_percent: Option<u64>,
    },
    SessionGone {
        session: u64,
    },
    Cleanup {
        force: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u64, 0..5usize).prop_map(|(session, model)| Op::Acquire { session, model }),
        3 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        3 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, grow)| Op::Loaded { pick, grow }),
        1 => any::<usize>().prop_map(|pick| Op::LoadFailed { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Unloaded { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Reclaimed { pick }),
        2 => (0..120u64, prop::option::of(50..100u64))
            .prop_map(|(advance_s, vram_used_percent)| Op::Tick { advance_s, vram_used_percent }),
        1 => (0..3u64).prop_map(|session| Op::SessionGone { session }),
        1 => any::<bool>().prop_map(|force| Op::Cleanup { force }),
    ]
}

fn pool() -> impl Strategy<Value = PoolConfig> {
    let model = (
        1..8u64,
        1..8u64,
        -1..2i32,
        prop::bool::weighted(0.15),
        prop::option::of(0.5..30.0f64),
        // Some models of unknown size (nothing declared): admitted alone until measured.
        prop::bool::weighted(0.85),
    );
    (
        prop::collection::vec(model, 5),
        prop_oneof![Just(Mode::Aggressive), Just(Mode::Cache)],
        prop_oneof![Just(EvictionPolicy::Lru), Just(EvictionPolicy::CostAware)],
        12..24u64,
        12..24u64,
    )
        .prop_map(|(models, mode, eviction, vram_limit, ram_limit)| {
            let models = models
                .into_iter()
                .enumerate()
                .map(
                    |(i, (vram, ram, priority, pinned, load_seconds, sized))| ModelConfig {
                        name: format!("m{i}"),
                        declared: if sized {
                            Footprint::new(vram * 100 * MIB, ram * 100 * MIB)
                        } else {
                            Footprint::default()
                        },
                        priority,
                        pinned,
                        load_seconds,
                        sized,
                        estimated: false,
                    },
                )
                .collect();
            let mut config = PoolConfig::new(
                Limits {
                    vram: Some(vram_limit * 100 * MIB),
                    ram: Some(ram_limit * 100 * MIB),
                },
                models,
            );
            config.mode = mode;
            config.eviction = eviction;
            config.idle_ttl = Duration::from_secs(90);
            config.acquire_timeout = Duration::from_secs(60);
            config.reclaim_timeout = Duration::from_secs(30);
            config
        })
}

/// What the oracle knows, from outputs alone.
#[derive(Default)]
struct Oracle {
    /// lease -> (session, model)
    leases: BTreeMap<LeaseId, (SessionId, String)>,
    /// Loads granted and not yet reported.
    loading: BTreeSet<(SessionId, String)>,
    /// Unloads asked for and not yet confirmed.
    unloading: BTreeSet<(SessionId, String)>,
    /// Confirmed unloaded, waiting for reclaim.
    reclaiming: BTreeSet<(SessionId, String)>,
    /// Requests asked, and answered.
    asked: BTreeSet<RequestId>,
    answered: BTreeSet<RequestId>,
    /// Requests dropped because their session went away.
    dropped_sessions: BTreeSet<SessionId>,
    request_session: BTreeMap<RequestId, SessionId>,
}

fn check_outputs(
    engine: &Engine,
    config: &PoolConfig,
    oracle: &mut Oracle,
    out: &[Output],
    released_last: Option<(SessionId, String)>,
    force_cleanup: bool,
) -> Result<(), TestCaseError> {
    for output in out {
        match output {
            Output::Granted {
                request,
                session,
                model,
                lease,
                action,
                ..
            } => {
                prop_assert!(
                    oracle.answered.insert(*request),
                    "request {request:?} answered twice"
                );
                oracle.leases.insert(*lease, (*session, model.clone()));
                if *action == Action::Load {
                    oracle.loading.insert((*session, model.clone()));
                    // Never admit past a ceiling: after the grant, the ledger is within limits.
                    let held = engine.held();
                    for r in Resource::ALL {
                        if let Some(limit) = config.limits.get(r) {
                            prop_assert!(
                                held.get(r) <= limit,
                                "admitted {model} past the {r} ceiling: held {} > {limit}",
                                held.get(r)
                            );
                        }
                    }
                }
            }
            Output::Refused { request, .. } => {
                prop_assert!(
                    oracle.answered.insert(*request),
                    "request {request:?} answered twice"
                );
            }
            Output::Unload {
                session,
                model,
                reason,
                ..
            } => {
                // Never evict a model with a live lease.
                let leased = oracle
                    .leases
                    .values()
                    .any(|(s, m)| s == session && m == model);
                prop_assert!(
                    !leased,
                    "unload of leased {model} in {session:?} ({reason:?})"
                );
                // Pinned models stay, unless a forced cleanup asks.
                let pinned = config.models.iter().any(|m| &m.name == model && m.pinned);
                if pinned {
                    prop_assert!(
                        force_cleanup && *reason == UnloadReason::Cleanup,
                        "pinned {model} unloaded for {reason:?}"
                    );
                }
                oracle.unloading.insert((*session, model.clone()));
            }
            _ => {}
        }
    }
    // A release in Aggressive mode unloads now (unless pinned or still leased).
    if let Some((session, model)) = released_last
        && config.mode == Mode::Aggressive
    {
        let pinned = config.models.iter().any(|m| m.name == model && m.pinned);
        let still_leased = oracle
            .leases
            .values()
            .any(|(s, m)| *s == session && *m == model);
        let loaded = engine
            .instances(Duration::ZERO)
            .iter()
            .any(|i| i.session == session && i.model == model && i.state == InstanceState::Loaded);
        if !pinned && !still_leased {
            prop_assert!(!loaded, "aggressive release left {model} loaded");
        }
    }
    Ok(())
}

fn run(config: PoolConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut engine = Engine::new(config.clone());
    let mut oracle = Oracle::default();
    let mut now = Duration::ZERO;
    let mut next_request = 0u64;
    let mut readings = Readings::default();
    for op in ops {
        let mut released_last = None;
        let mut force_cleanup = false;
        let out = match op {
            Op::Acquire { session, model } => {
                next_request += 1;
                let request = RequestId(next_request);
                oracle.asked.insert(request);
                oracle.request_session.insert(request, SessionId(session));
                engine.acquire(now, request, SessionId(session), &config.models[model].name)
            }
            Op::Release { pick } => {
                if oracle.leases.is_empty() {
                    continue;
                }
                let lease = *oracle
                    .leases
                    .keys()
                    .nth(pick % oracle.leases.len())
                    .expect("in range");
                // Only leases on loaded instances are released by a well-behaved app.
                let (session, model) = oracle.leases[&lease].clone();
                if oracle.loading.contains(&(session, model.clone())) {
                    continue;
                }
                oracle.leases.remove(&lease);
                released_last = Some((session, model));
                engine.release(now, lease)
            }
            Op::Loaded { pick, grow } => {
                let Some(key) = oracle
                    .loading
                    .iter()
                    .nth(pick % oracle.loading.len().max(1))
                    .cloned()
                else {
                    continue;
                };
                oracle.loading.remove(&key);
                let declared = config
                    .models
                    .iter()
                    .find(|m| m.name == key.1)
                    .expect("listed")
                    .declared;
                let measured = if grow {
                    Footprint::new(declared.vram * 2, declared.ram)
                } else {
                    declared
                };
                engine.loaded(now, key.0, &key.1, Some(measured), Some(2.0))
            }
            Op::LoadFailed { pick } => {
                let Some(key) = oracle
                    .loading
                    .iter()
                    .nth(pick % oracle.loading.len().max(1))
                    .cloned()
                else {
                    continue;
                };
                oracle.loading.remove(&key);
                oracle.leases.retain(|_, v| *v != key);
                engine.load_failed(now, key.0, &key.1)
            }
            Op::Unloaded { pick } => {
                let Some(key) = oracle
                    .unloading
                    .iter()
                    .nth(pick % oracle.unloading.len().max(1))
                    .cloned()
                else {
                    continue;
                };
                oracle.unloading.remove(&key);
                oracle.reclaiming.insert(key.clone());
                engine.unloaded(now, key.0, &key.1)
            }
            Op::Reclaimed { pick } => {
                let Some(key) = oracle
                    .reclaiming
                    .iter()
                    .nth(pick % oracle.reclaiming.len().max(1))
                    .cloned()
                else {
                    continue;
                };
                oracle.reclaiming.remove(&key);
                engine.reclaimed(now, key.0, &key.1)
            }
            Op::Tick {
                advance_s,
                vram_used_percent,
            } => {
                now += Duration::from_secs(advance_s);
                readings.vram =
                    vram_used_percent.map(|p| (p * 40 * 100 * MIB / 100, 40 * 100 * MIB));
                engine.tick(now, readings)
            }
            Op::SessionGone { session } => {
                let session = SessionId(session);
                oracle.leases.retain(|_, v| v.0 != session);
                oracle.loading.retain(|k| k.0 != session);
                oracle.unloading.retain(|k| k.0 != session);
                // Its instances go to reclaiming, whatever state they were in.
                for view in engine.instances(now) {
                    if view.session == session {
                        oracle.reclaiming.insert((session, view.model.clone()));
                    }
                }
                oracle.dropped_sessions.insert(session);
                let answered_before: Vec<RequestId> = oracle
                    .request_session
                    .iter()
                    .filter(|(_, s)| **s == session)
                    .map(|(r, _)| *r)
                    .collect();
                for request in answered_before {
                    oracle.asked.remove(&request);
                }
                engine.session_gone(now, session)
            }
            Op::Cleanup { force } => {
                force_cleanup = force;
                engine.cleanup(now, force).0
            }
        };
        check_outputs(
            &engine,
            &config,
            &mut oracle,
            &out,
            released_last,
            force_cleanup,
        )?;
        // The ledger never counts a lease the oracle does not know.
        let engine_leases: usize = engine.instances(now).iter().map(|i| i.leases).sum();
        prop_assert_eq!(engine_leases, oracle.leases.len());
    }
    // Liveness: past every timeout, each request still asked has had exactly one answer.
    now += Duration::from_secs(3600);
    let out = engine.tick(now, Readings::default());
    check_outputs(&engine, &config, &mut oracle, &out, None, false)?;
    for request in &oracle.asked {
        prop_assert!(
            oracle.answered.contains(request),
            "request {request:?} never answered"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_over_random_sequences(config in pool(), ops in prop::collection::vec(op(), 1..60)) {
        run(config, ops)?;
    }
}
