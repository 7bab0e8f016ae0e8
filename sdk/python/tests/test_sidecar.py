"""The SDK against a real ``modelpool-sidecar`` process (see conftest.py for how it is found)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List

import pytest

from conftest import MIB, Sidecar, pool_yaml, wait_for

pytestmark = pytest.mark.sidecar

TOLERANCE = 0.10


def held_by(sidecar, pid: int) -> List[str]:
    return sorted(m["model"] for m in sidecar.models() if m.get("pid") == pid)


def test_session_acquire_load_release_unload(start_sidecar, start_app):
    sidecar = start_sidecar(pool_yaml([{"name": "upscale", "ram": "300Mi"}, {"name": "tiny", "ram": "8Mi"}], ram="1Gi"))
    app = start_app("a", socket=sidecar.socket)
    assert app.hello["mode"] == "sidecar"
    app.ok("register", name="upscale", mib=200)
    app.ok("register", name="tiny", mib=1)
    app.ok("acquire", name="upscale")
    state = app.ok("state")
    assert state["session"] and state["loaded"] == ["upscale"]
    models = wait_for(lambda: [m for m in sidecar.models() if m["model"] == "upscale"], 30, "upscale in /v1/state")
    entry = models[0]
    assert entry["pid"] == app.pid and entry["leases"] == 1
    # the app measured ~200 MiB of RSS growth around its loader and reported it in /v1/loaded
    measured = entry.get("measured") or {}
    assert measured.get("ram", 0) >= 190 * MIB or entry.get("ram_bytes", 0) >= 190 * MIB, entry
    released = app.ok("release", name="upscale")
    assert released["loaded"] == []  # Aggressive: unloaded at release
    wait_for(lambda: not held_by(sidecar, app.pid), 60, "the sidecar to see upscale unloaded")


def test_rss_returns_to_baseline_after_each_unload(start_sidecar, start_app):
    sidecar = start_sidecar(pool_yaml([{"name": "big", "ram": "300Mi"}, {"name": "tiny", "ram": "8Mi"}], ram="1Gi"))
    app = start_app("rss", socket=sidecar.socket)
    app.ok("register", name="big", mib=200)
    app.ok("register", name="tiny", mib=1)
    app.ok("acquire", name="tiny")
    app.ok("release", name="tiny")
    time.sleep(1.0)  # let the session's threads settle
    baseline = app.ok("state")["rss"]
    for round_ in range(3):
        held = app.ok("acquire", name="big")
        assert held["rss"] - baseline >= 190 * MIB
        released = app.ok("release", name="big")
        assert released["loaded"] == []
        assert released["rss"] <= baseline * (1 + TOLERANCE), (
            f"round {round_}: RSS {released['rss'] / MIB:.1f} MiB vs baseline {baseline / MIB:.1f} MiB"
        )


def test_exception_inside_load_model_leaves_nothing_loaded(start_sidecar, start_app):
    sidecar = start_sidecar(pool_yaml([{"name": "big", "ram": "300Mi"}, {"name": "broken", "ram": "300Mi"}], ram="1Gi"))
    app = start_app("exc", socket=sidecar.socket)
    app.ok("register", name="big", mib=200)
    app.ok("register", name="broken", mib=100, fail_loader=True)
    failed = app.ok("fail", name="big")
    assert failed["error"] == "ValueError" and failed["loaded"] == []
    result = app.call("acquire", name="broken")
    assert not result["ok"] and result["error"] == "RuntimeError"
    assert app.ok("state")["loaded"] == []
    wait_for(lambda: not held_by(sidecar, app.pid), 60, "the sidecar ledger to be empty")
    # the failed load freed its reservation: the model can be acquired again
    app.ok("register", name="broken", mib=1)
    app.ok("acquire", name="broken")
    app.ok("release", name="broken")


def test_two_apps_contend_and_the_ceiling_holds(start_sidecar, start_app):
    """Two processes, one pool: 300 MiB ceiling, two 200 MiB models. The second waits for the first."""
    ceiling = 300 * MIB
    sidecar = start_sidecar(
        pool_yaml([{"name": "a", "ram": "200Mi"}, {"name": "b", "ram": "200Mi"}], ram="300Mi")
    )
    first = start_app("first", socket=sidecar.socket)
    second = start_app("second", socket=sidecar.socket)
    for app in (first, second):
        for name in ("a", "b"):
            app.ok("register", name=name, mib=150)

    samples: List[Dict[str, Any]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(sidecar.state())
            except Exception:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        first.ok("acquire", name="a")
        second.send("acquire", name="b")
        assert second.pending(timeout=3.0) is None, "the second app loaded past the ceiling"
        both = [m["model"] for m in sidecar.models()]
        assert both == ["a"], both
        released_at = time.monotonic()
        first.ok("release", name="a")
        answer = second.receive(timeout=90)
        assert answer["ok"], answer
        assert time.monotonic() >= released_at
        assert held_by(sidecar, second.pid) == ["b"]
        second.ok("release", name="b")
    finally:
        stop.set()
        sampler.join(10)
    assert samples, "no /v1/state samples"
    for state in samples:
        held = (state.get("held_bytes") or {}).get("ram", 0) or 0
        assert held <= ceiling, f"ledger held {held / MIB:.0f} MiB of RAM, ceiling 300 MiB"


def test_acquire_times_out_with_the_numbers(start_sidecar, start_app):
    sidecar = start_sidecar(
        pool_yaml([{"name": "a", "ram": "200Mi"}, {"name": "b", "ram": "200Mi"}], ram="300Mi", acquire_timeout="2s")
    )
    first = start_app("first", socket=sidecar.socket)
    second = start_app("second", socket=sidecar.socket)
    for app in (first, second):
        app.ok("register", name="a", mib=150)  # real memory: the sidecar counts what it measures
        app.ok("register", name="b", mib=150)
    first.ok("acquire", name="a")
    refused = second.call("acquire", name="b", timeout=120)
    assert not refused["ok"] and refused["reason"] == "timeout", refused
    first.ok("release", name="a")
    second.ok("acquire", name="b")
    second.ok("release", name="b")


def test_sidecar_restart_reconnects_and_reannounces_holds(start_sidecar, start_app):
    sidecar = start_sidecar(
        pool_yaml([{"name": "inuse", "ram": "100Mi"}, {"name": "cached", "ram": "100Mi"}], ram="1Gi", mode="Cache")
    )
    app = start_app("restart", socket=sidecar.socket, MODELPOOL_RECONNECT_TIMEOUT="120")
    app.ok("register", name="inuse", mib=50)
    app.ok("register", name="cached", mib=50)
    app.ok("acquire", name="cached")
    app.ok("release", name="cached")  # Cache mode: stays loaded, no lease
    app.ok("acquire", name="inuse")  # held in a `with` block across the restart
    before = app.ok("state")
    assert before["sessions_opened"] == 1
    wait_for(lambda: held_by(sidecar, app.pid) == ["cached", "inuse"], 30, "both models in the first sidecar")

    sidecar.kill()
    sidecar.start()  # same socket, same pool, empty ledger

    wait_for(lambda: held_by(sidecar, app.pid) == ["cached", "inuse"], 60, "the SDK to re-announce its holds")
    # the block still running got a lease in the new session
    wait_for(
        lambda: {m["model"]: m["leases"] for m in sidecar.models()} == {"cached": 0, "inuse": 1},
        60,
        "the lease of the running block to be renewed",
    )
    state = app.ok("state")
    assert state["sessions_opened"] == 2 and sorted(state["loaded"]) == ["cached", "inuse"]
    # the lease of the `with` block died with the old sidecar: leaving the block still works
    app.ok("release", name="inuse")
    # and the new sidecar drives the app: a forced cleanup unloads both
    sidecar.http.request("POST", "/v1/cleanup", {"force": True})
    wait_for(lambda: app.ok("state")["loaded"] == [], 60, "the app to unload on the new sidecar's commands")
    wait_for(lambda: not held_by(sidecar, app.pid), 60, "the new sidecar to see both unloaded")


def test_a_paused_app_is_counted_once_after_it_reannounces(start_sidecar, start_app, monkeypatch):
    """SIGSTOP past two heartbeats ends the app's session while the process keeps its model;
    on SIGCONT the SDK reconnects and re-announces the hold: the sidecar must count it once
    (the ended session's copy is retired), not 2 x 60 MiB with one copy "not reclaimed"."""
    monkeypatch.setenv("MODELPOOL_HEARTBEAT_MS", "200")  # visible pid: asked every 1 s
    sidecar = start_sidecar(pool_yaml([{"name": "m", "ram": "60Mi"}], ram="100Mi", mode="Cache"))
    app = start_app("paused", socket=sidecar.socket, MODELPOOL_RECONNECT_TIMEOUT="120")
    app.ok("register", name="m", mib=50)
    app.ok("acquire", name="m")
    app.ok("release", name="m")  # Cache mode: stays loaded
    wait_for(lambda: held_by(sidecar, app.pid) == ["m"], 30, "m loaded")
    first = sidecar.state()["sessions"][0]["session"]

    os.kill(app.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not sidecar.state()["sessions"], 60, "the paused app's session to end")
    finally:
        os.kill(app.pid, signal.SIGCONT)
    wait_for(
        lambda: [s["session"] for s in sidecar.state()["sessions"]] not in ([], [first]),
        60,
        "the SDK to reconnect with a new session",
    )
    wait_for(lambda: held_by(sidecar, app.pid) == ["m"], 60, "the hold re-announced")
    state = sidecar.state()
    copies = [m for m in state["models"] if m["model"] == "m"]
    assert len(copies) == 1, state
    assert copies[0]["state"] == "loaded", state
    assert app.ok("state")["loaded"] == ["m"]


def test_sidecar_commands_unload_idle_models(start_sidecar, start_app):
    sidecar = start_sidecar(pool_yaml([{"name": "m", "ram": "100Mi"}], ram="1Gi", mode="Cache"))
    app = start_app("cmd", socket=sidecar.socket)
    app.ok("register", name="m", mib=20)
    app.ok("acquire", name="m")
    app.ok("release", name="m")
    assert app.ok("state")["loaded"] == ["m"]
    _, answer = sidecar.http.request("POST", "/v1/cleanup", {"force": False})
    assert answer.get("skipped_leased", []) == []
    wait_for(lambda: app.ok("state")["loaded"] == [], 60, "the app to follow the unload command")
    wait_for(lambda: not held_by(sidecar, app.pid), 60, "the sidecar to see it unloaded")


def test_stats_and_check_come_from_the_sidecar(start_sidecar, start_app):
    sidecar = start_sidecar(pool_yaml([{"name": "m", "ram": "100Mi"}], ram="1Gi"))
    app = start_app("stats", socket=sidecar.socket)
    stats = app.ok("stats")["stats"]
    for key in ("ram_used_gb", "ram_total_gb", "ram_percent", "vram_allocated_gb", "vram_total_gb", "vram_percent"):
        assert isinstance(stats[key], (int, float)), key
    assert app.ok("check", ram_gb=0.1)["available"] is True
    assert app.ok("check", ram_gb=2.0)["available"] is False  # over the pool's 1 GiB ceiling


def test_restart_with_two_apps_and_a_reused_session_id(start_sidecar, start_app, workdir):
    """After a restart, a session id an app still holds may name someone else's new session
    (the ids restart from the beginning). The SDK must notice and re-announce anyway."""
    text = pool_yaml([{"name": "mx", "ram": "100Mi"}, {"name": "my", "ram": "100Mi"}], ram="1Gi", mode="Cache")
    sidecar = start_sidecar(text)
    first = start_app("first", socket=sidecar.socket)
    second = start_app("second", socket=sidecar.socket)
    for app, model in ((first, "mx"), (second, "my")):
        app.ok("register", name="mx", mib=20)
        app.ok("register", name="my", mib=20)
        app.ok("acquire", name=model)  # held in a `with` block across the restart
    wait_for(lambda: held_by(sidecar, first.pid) == ["mx"] and held_by(sidecar, second.pid) == ["my"], 30, "both holds")

    sidecar.kill()
    # The new sidecar comes up elsewhere first; another process opens sessions there (taking
    # the first ids), and only then does it appear at the apps' socket path.
    (workdir / "other").mkdir()
    other = Sidecar(text, workdir / "other")
    other.start()
    stranger = [other.http.request("POST", "/v1/sessions", {"pid": os.getpid(), "app": "stranger", "models": []})[1]["session"] for _ in range(2)]
    os.replace(other.socket, sidecar.socket)
    try:
        other.http.address = sidecar.socket
        wait_for(
            lambda: held_by(other, first.pid) == ["mx"] and held_by(other, second.pid) == ["my"],
            60,
            f"both apps to re-announce their holds (the new sidecar gave out {stranger} first)",
        )
        for app, model in ((first, "mx"), (second, "my")):
            assert app.ok("state")["sessions_opened"] == 2
            app.ok("release", name=model)
        leases = {m["model"]: m["leases"] for m in other.models()}
        assert leases == {"mx": 0, "my": 0}, leases
    finally:
        other.stop()


def test_unsized_models_follow_the_pools_rule(start_sidecar, start_app):
    """The sidecar, local mode and the contract sidecar apply one rule to a model with no size:
    ``unsizedModels: Refuse`` refuses it (reason ``unsized``); ``Alone`` loads it alone."""
    for rule in ("Refuse", "Alone"):
        text = pool_yaml([{"name": "a", "ram": "30Mi"}, {"name": "open"}], ram="300Mi", acquire_timeout="2s")
        sidecar = start_sidecar(text.replace("  policy:\n", f"  policy:\n    unsizedModels: {rule}\n"))
        app = start_app(rule, socket=sidecar.socket)
        app.ok("register", name="a", mib=10)
        app.ok("register", name="open", mib=10)
        app.ok("acquire", name="a")
        answer = app.call("acquire", name="open", timeout=120)
        if rule == "Refuse":
            assert not answer["ok"] and answer["reason"] == "unsized", answer
        else:  # needs the whole ceiling: waits for "a", in use, then times out
            assert not answer["ok"] and answer["reason"] == "timeout", answer
            app.ok("release", name="a")
            app.ok("acquire", name="open")
            app.ok("release", name="open")
        app.close()
        sidecar.stop()
