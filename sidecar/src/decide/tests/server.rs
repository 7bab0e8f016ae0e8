//! Server drivers: the ledger kept equal to what the model server holds.

use super::*;

/// A server poll that also read the server's process tree (pid 42): its RSS and, where NVML
/// covered it, its VRAM.
fn tree_poll(rss: u64, vram: Option<u64>, loaded: &[&str]) -> ServerPoll {
    let mut poll = server_view(loaded);
    poll.tree = Some(crate::measure::tree::TreeReading {
        root: 42,
        started: 1,
        pids: vec![42],
        rss_bytes: rss,
        vram_bytes: vram,
        found_by: "port",
    });
    poll
}

fn server_view(loaded: &[&str]) -> ServerPoll {
    let models = loaded
        .iter()
        .map(|m| {
            (
                (*m).to_owned(),
                crate::driver::ServerModel {
                    loaded: true,
                    reason: None,
                    reported: Sizes::default(),
                },
            )
        })
        .collect();
    ServerPoll {
        view: Ok(crate::driver::ServerView { models }),
        tree: None,
    }
}

/// Found by CI (`ollama_killed_and_restarted`): the shell reads the server's list before its
/// process tree, so a poll can carry the last list of a process that the tree then shows gone.
/// What died with the process leaves the ledger and is not adopted back from that list; the
/// next poll adopts what the server (a new process, or none) really holds.
#[test]
fn a_list_read_before_the_server_died_does_not_bring_its_models_back() {
    let mut rig = Rig {
        core: core_with(
            pool_with("Cache", Some(1000), &[("a", 60, false), ("b", 60, false)]),
            true,
        ),
        ..Rig::new("Cache", None, &[])
    };
    rig.core.enable_server(true);
    let loaded = |rig: &Rig| -> Vec<String> {
        rig.core
            .engine
            .instances(rig.now)
            .into_iter()
            .filter(|v| v.state == InstanceState::Loaded)
            .map(|v| v.model)
            .collect()
    };
    let with_root = |root: u32, loaded: &[&str]| {
        let mut poll = tree_poll(100 * MIB, None, loaded);
        if let Some(tree) = poll.tree.as_mut() {
            tree.root = root;
            tree.pids = vec![root];
        }
        poll
    };
    rig.core
        .reconcile_server(rig.now, with_root(42, &["a", "b"]), &mut rig.fx);
    assert_eq!(loaded(&rig), ["a", "b"], "adopted");

    // Killed between the list and the tree: the list still names a and b.
    rig.advance(ms(100));
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "b"]), &mut rig.fx);
    assert!(loaded(&rig).is_empty(), "{:?}", loaded(&rig));
    assert_eq!(rig.core.server().dropped, 2);
    assert_eq!(rig.core.server().adopted, 2, "nothing adopted back");
    // Down: nothing comes back either.
    rig.advance(ms(100));
    let down = ServerPoll {
        view: Err("connection refused".to_owned()),
        tree: None,
    };
    rig.core.reconcile_server(rig.now, down, &mut rig.fx);
    assert!(loaded(&rig).is_empty());
    // Restarted, holding a: adopted once.
    rig.advance(ms(100));
    rig.core
        .reconcile_server(rig.now, with_root(43, &["a"]), &mut rig.fx);
    assert_eq!(loaded(&rig), ["a"]);

    // Replaced within one poll (43 gone, 44 serves): the list may be 43's; read again next poll.
    rig.advance(ms(100));
    rig.core
        .reconcile_server(rig.now, with_root(44, &["a", "b"]), &mut rig.fx);
    assert!(loaded(&rig).is_empty(), "{:?}", loaded(&rig));
    rig.advance(ms(100));
    rig.core
        .reconcile_server(rig.now, with_root(44, &["b"]), &mut rig.fx);
    assert_eq!(loaded(&rig), ["b"]);
}

/// Found by CI: a model loaded on the server behind the sidecar's back that does not fit was
/// asked out, and the next poll, which still listed it (the unload in flight, or MLServer's
/// index lagging its unload), asked and counted it a second time. It is asked once, and again
/// only if the server still lists it REFUSED_UNLOAD_RETRY later.
#[test]
fn a_model_loaded_behind_our_back_that_does_not_fit_is_asked_out_once() {
    let mut rig = Rig {
        core: core_with(
            pool_with("Cache", Some(100), &[("a", 60, true), ("big", 80, false)]),
            true,
        ),
        ..Rig::new("Cache", None, &[])
    };
    rig.core.enable_server(true);
    let count = |rig: &Rig| {
        rig.core
            .metrics
            .unloads
            .with_label_values(&["big", "ceiling"])
            .get()
    };
    rig.core
        .reconcile_server(rig.now, server_view(&["a"]), &mut rig.fx);
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Loaded, "adopted");
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "big"]), &mut rig.fx);
    let fx = rig.take();
    assert_eq!(fx.unloads.len(), 1, "{:?}", fx.unloads);
    assert_eq!(
        (fx.unloads[0].model.as_str(), fx.unloads[0].reason),
        ("big", UnloadReason::Ceiling)
    );
    assert_eq!(count(&rig), 1);
    // Still listed one poll later: neither asked nor counted again.
    rig.advance(ms(200));
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "big"]), &mut rig.fx);
    assert!(rig.take().unloads.is_empty());
    assert_eq!(count(&rig), 1);
    // Still there after the retry time: the server ignored it, ask again.
    rig.advance(crate::decide::server::REFUSED_UNLOAD_RETRY);
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "big"]), &mut rig.fx);
    assert_eq!(rig.take().unloads.len(), 1);
    assert_eq!(count(&rig), 2);
    // Gone, then loaded again behind our back: a new refusal at once.
    rig.core
        .reconcile_server(rig.now, server_view(&["a"]), &mut rig.fx);
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "big"]), &mut rig.fx);
    assert_eq!(rig.take().unloads.len(), 1);
    assert_eq!(count(&rig), 3);
}

/// Found by the proxy's MLServer test: a model the server driver loaded and unloaded between
/// two polls of the server was never seen held, so the level its unload had to fall from was
/// the one before its load, and its memory was never seen back (MemoryNotReclaimed, bytes
/// lost). The reference is now at least the last reading plus what the model holds.
#[test]
fn a_server_model_unloaded_before_any_poll_saw_it_is_still_seen_reclaimed() {
    let mut rig = Rig {
        core: core_with(pool_with("Aggressive", None, &[("a", 60, false)]), true),
        ..Rig::new("Aggressive", None, &[])
    };
    rig.core.enable_server(true);
    let poll = |rss: u64, loaded: &[&str]| tree_poll(rss, None, loaded);
    rig.core
        .reconcile_server(rig.now, poll(100 * MIB, &[]), &mut rig.fx);
    let s = rig.open(7, &["a"]);
    let (lease, action, generation) = rig.grant(&s, "a");
    assert_eq!(action, Action::Load);
    rig.core.driver_loaded(
        rig.now,
        APP_HOLDER,
        "a",
        generation,
        Sizes::default(),
        0.1,
        &mut rig.fx,
    );
    // Released (Aggressive: unloaded) before any poll saw the server at 160 MiB.
    rig.release(&s, &lease);
    assert!(rig.take().unloads.iter().any(|u| u.model == "a"));
    rig.core
        .driver_unloaded(rig.now, APP_HOLDER, "a", generation, &mut rig.fx);
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Reclaiming);
    // The server is back at its level before the load: the memory is seen back.
    rig.advance(ms(100));
    rig.core
        .reconcile_server(rig.now, poll(100 * MIB, &[]), &mut rig.fx);
    assert!(rig.state("a").is_none(), "{:?}", rig.state("a"));
    assert_eq!(
        rig.core.metrics.reclaims.with_label_values(&["proc"]).get(),
        1
    );
}

/// `/v1/state` shows each model's sizes side by side: declared, estimated (none here),
/// the last load measured, the peak, and what admission counts.
#[test]
fn state_shows_declared_measured_peak_and_need_side_by_side() {
    let mut rig = Rig::new(
        "Aggressive",
        Some(1024),
        &[("a", 10, false), ("b", 20, false)],
    );
    let s = rig.open(7, &["a", "b"]);
    let (lease, generation) = rig.load(&s, "a", 30);
    let sizes = |rig: &Rig, i: usize| {
        as_json(rig.core.state(rig.now, &BTreeMap::new(), &BTreeMap::new()))["pool"]["models"]
            [i]["sizes"]
            .clone()
    };
    let bytes = |mib: u64| serde_json::json!({"vram": 0, "ram": mib * MIB});
    let a = sizes(&rig, 0);
    assert_eq!(a["declared"], bytes(10), "{a}");
    assert!(a["estimated"].is_null(), "{a}");
    assert_eq!(a["measured"], bytes(30), "{a}");
    assert_eq!(a["peak"], bytes(30), "{a}");
    assert_eq!(a["need"], bytes(30), "{a}");
    let b = sizes(&rig, 1);
    assert_eq!(b["declared"], bytes(20), "{b}");
    assert!(b["measured"].is_null() && b["peak"].is_null(), "{b}");
    assert_eq!(b["need"], bytes(20), "{b}");
    // A later, smaller load: measured follows it, the peak and the need stay.
    rig.release(&s, &lease);
    rig.unloaded(&s, "a", generation, 30).unwrap();
    rig.tick();
    rig.load(&s, "a", 15);
    let a = sizes(&rig, 0);
    assert_eq!(
        (&a["measured"], &a["peak"]),
        (&bytes(15), &bytes(30)),
        "{a}"
    );
    assert_eq!(a["need"], bytes(30), "{a}");
}

/// Issue 14 path (c) and issue 18: a server model that holds VRAM is proven back only by a
/// VRAM reading of the server's process tree (NVML over its pids). With one, the unload is
/// `proc`; with none (no GPU reading in the pod), it is counted `unverified`, in the metric
/// and in `/v1/state`, even though the tree's RSS fell.
#[test]
fn a_server_models_vram_unload_is_proven_only_by_a_vram_reading() {
    const GIB: u64 = 1 << 30;
    for (tree_vram, seen_by) in [(Some((3 * GIB, GIB)), "proc"), (None, "unverified")] {
        let mut pool = pool_with("Aggressive", None, &[("a", 60, false)]);
        pool.config.models[0].declared = Footprint::new(2 * GIB, 60 * MIB);
        pool.info.models[0].vram_bytes = 2 * GIB;
        let mut rig = Rig {
            core: core_with(pool, true),
            ..Rig::new("Aggressive", None, &[])
        };
        rig.core.enable_server(true);
        rig.core.reconcile_server(
            rig.now,
            tree_poll(100 * MIB, tree_vram.map(|v| v.1), &[]),
            &mut rig.fx,
        );
        let s = rig.open(7, &["a"]);
        let (lease, action, generation) = rig.grant(&s, "a");
        assert_eq!(action, Action::Load);
        rig.core.driver_loaded(
            rig.now,
            APP_HOLDER,
            "a",
            generation,
            Sizes::default(),
            0.1,
            &mut rig.fx,
        );
        rig.advance(ms(100));
        rig.core.reconcile_server(
            rig.now,
            tree_poll(160 * MIB, tree_vram.map(|v| v.0), &["a"]),
            &mut rig.fx,
        );
        rig.release(&s, &lease);
        assert!(rig.take().unloads.iter().any(|u| u.model == "a"));
        rig.core
            .driver_unloaded(rig.now, APP_HOLDER, "a", generation, &mut rig.fx);
        rig.advance(ms(100));
        // RSS back to its level before the load; VRAM back too where it is read.
        rig.core.reconcile_server(
            rig.now,
            tree_poll(100 * MIB, tree_vram.map(|v| v.1), &[]),
            &mut rig.fx,
        );
        assert!(rig.state("a").is_none(), "{:?}", rig.state("a"));
        assert_eq!(
            rig.core
                .metrics
                .reclaims
                .with_label_values(&[seen_by])
                .get(),
            1,
            "{seen_by}"
        );
        let state = rig.core.state(rig.now, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(state.counters.reclaims.get(seen_by), Some(&1), "{seen_by}");
        let server = state.server.expect("a server driver's state");
        assert_eq!(server.reclaims.get(seen_by), Some(&1), "{seen_by}");
        assert_eq!(server.vram_bytes, tree_vram.map(|v| v.1));
    }
}

/// Found in round 4's review: a model loaded on the server behind the sidecar's back that fits
/// only after evicting an idle model started that eviction and was then refused anyway, so
/// both models went. Such a model is adopted only if it fits beside what is held; otherwise it
/// alone is asked out (it broke the ceiling), and the idle model stays.
#[test]
fn a_model_loaded_behind_our_back_never_evicts_another_to_be_refused() {
    let mut rig = Rig {
        core: core_with(
            pool_with("Cache", Some(100), &[("a", 60, false), ("big", 80, false)]),
            true,
        ),
        ..Rig::new("Cache", None, &[])
    };
    rig.core.enable_server(true);
    rig.core
        .reconcile_server(rig.now, server_view(&["a"]), &mut rig.fx);
    assert_eq!(rig.state("a").unwrap().0, InstanceState::Loaded, "adopted");
    rig.take();
    rig.advance(ms(200));
    rig.core
        .reconcile_server(rig.now, server_view(&["a", "big"]), &mut rig.fx);
    let fx = rig.take();
    let asked: Vec<(&str, UnloadReason)> = fx
        .unloads
        .iter()
        .map(|u| (u.model.as_str(), u.reason))
        .collect();
    assert_eq!(asked, [("big", UnloadReason::Ceiling)]);
    assert_eq!(
        rig.state("a").unwrap().0,
        InstanceState::Loaded,
        "the idle model stays"
    );
    assert!(
        fx.last_error
            .as_deref()
            .is_some_and(|e| e.contains("big") && e.contains("100.0 MiB")),
        "the refusal names the numbers: {:?}",
        fx.last_error
    );
}
