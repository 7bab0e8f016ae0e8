"""Local mode: no sidecar, the seed's behaviour in-process (plus a pool's ceilings when given one)."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref

import pytest

from conftest import MIB, SDK, pool_yaml
from modelpool import AcquireRefusedError, MemoryManager, ModelUnloadedError, Pool, SidecarUnavailableError, UnknownModelError
from modelpool.pool import Pool as PoolType

TOLERANCE = 0.10


class Weights:
    def __init__(self, name: str, size: int = 1024):
        self.name = name
        self.data = bytearray(size)

    def process(self, x):
        return (self.name, x)


def manager(pool: PoolType | None = None, aggressive=None) -> MemoryManager:
    return MemoryManager(aggressive, sidecar=False, pool=pool)


def test_load_use_unload_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="modelpool")
    mm = manager()
    assert mm.mode == "local"
    made = []
    mm.register_model_loader("upscale", lambda: made.append(1) or Weights("upscale"))
    with mm.load_model("upscale") as model:
        assert model.process(3) == ("upscale", 3)
        assert list(mm.loaded_models.keys()) == ["upscale"]
    assert list(mm.loaded_models) == []
    with pytest.raises(ModelUnloadedError, match="model 'upscale' was unloaded"):
        model.process(1)
    text = caplog.text
    assert "Memory before upscale: RAM " in text and "| VRAM " in text
    assert "Loading model: upscale" in text
    assert "Model unloaded: upscale" in text
    assert made == [1]


def test_nothing_keeps_the_model_alive_after_the_block():
    mm = manager()
    mm.register_model_loader("m", lambda: Weights("m"))
    refs = []
    with mm.load_model("m") as model:
        refs.append(weakref.ref(mm.loaded_models["m"]))
    gc.collect()
    assert refs[0]() is None, "the SDK (or the proxy) still references the model"
    del model


def test_cache_mode_keeps_models_until_unloaded():
    mm = manager(aggressive=False)
    calls = []
    mm.register_model_loader("m", lambda: calls.append(1) or Weights("m"))
    for _ in range(3):
        with mm.load_model("m") as model:
            model.process(1)
    assert calls == [1] and list(mm.loaded_models) == ["m"]
    with pytest.raises(ModelUnloadedError, match="released"):
        model.process(1)
    assert mm.unload_model("m") is True
    assert list(mm.loaded_models) == []


def test_unloader_runs_and_exception_in_block_still_unloads():
    mm = manager()
    unloaded = []
    mm.register_model_loader("m", lambda: Weights("m"), unloader=lambda model: unloaded.append(model.name))
    with pytest.raises(ValueError):
        with mm.load_model("m") as model:
            model.process(1)
            raise ValueError("boom")
    assert unloaded == ["m"] and list(mm.loaded_models) == []


def test_failing_loader_leaves_nothing_loaded():
    mm = manager()

    def broken():
        raise OSError("weights file is corrupt")

    mm.register_model_loader("m", broken)
    with pytest.raises(OSError, match="corrupt"):
        with mm.load_model("m"):
            pass
    assert list(mm.loaded_models) == []
    mm.register_model_loader("m", lambda: Weights("m"))
    with mm.load_model("m") as model:
        assert model.process(0) == ("m", 0)


def test_unknown_model():
    mm = manager()
    with pytest.raises(UnknownModelError, match="no loader registered for model 'nope'"):
        mm.load_model("nope")


def test_leased_model_is_not_unloaded():
    mm = manager(aggressive=False)
    mm.register_model_loader("m", lambda: Weights("m"))
    with mm.load_model("m") as model:
        assert mm.unload_model("m") is False
        mm.unload_all_models()
        mm.force_cleanup()
        assert model.process(1) == ("m", 1)
    mm.unload_all_models()
    assert list(mm.loaded_models) == []


def test_nested_and_concurrent_blocks_share_one_load():
    mm = manager()
    loads = []
    mm.register_model_loader("m", lambda: (loads.append(1), time.sleep(0.2), Weights("m"))[2])
    results = []

    def worker():
        with mm.load_model("m") as model:
            time.sleep(0.3)
            results.append(model.process(1))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    assert list(mm.loaded_models) == []
    assert len(loads) <= 4  # one load per overlapping group, never a second copy at once


def test_memory_stats_have_the_seed_keys():
    stats = manager().get_memory_stats()
    for key in ("ram_used_gb", "ram_total_gb", "ram_percent", "vram_allocated_gb", "vram_total_gb", "vram_percent"):
        assert isinstance(stats[key], float), key
    assert 0 < stats["ram_used_gb"] <= stats["ram_total_gb"]
    assert 0 <= stats["ram_percent"] <= 100


def test_check_memory_available_and_auto_cleanup():
    mm = manager(aggressive=False)
    assert mm.check_memory_available(required_vram_gb=0.0) is True
    assert mm.check_memory_available(required_vram_gb=0.0, required_ram_gb=0.001) is True
    assert mm.check_memory_available(required_vram_gb=0.0, required_ram_gb=10_000.0) is False
    mm.register_model_loader("m", lambda: Weights("m"))
    with mm.load_model("m"):
        pass
    assert mm.auto_cleanup_if_needed(threshold_percent=100.0) is False
    assert list(mm.loaded_models) == ["m"]
    assert mm.auto_cleanup_if_needed(threshold_percent=0.0) is True
    assert list(mm.loaded_models) == []


def test_temporary_operation_cleans_up_even_on_error(caplog):
    caplog.set_level(logging.INFO, logger="modelpool")
    mm = manager(aggressive=True)
    mm.register_model_loader("m", lambda: Weights("m"))
    with pytest.raises(RuntimeError):
        with mm.temporary_operation("video_generation"):
            with mm.load_model("m"):
                pass
            raise RuntimeError("job failed")
    assert list(mm.loaded_models) == []
    assert "Starting operation: video_generation" in caplog.text
    assert "Memory before video_generation:" in caplog.text
    assert "Cleaning up after: video_generation" in caplog.text
    assert "Memory after video_generation:" in caplog.text


# --- local mode with a pool --------------------------------------------------------------------


def laptop_pool(mode: str = "Cache", timeout: str = "2s", ttl: str = "5m") -> PoolType:
    from modelpool.pool import parse_document

    text = pool_yaml(
        [{"name": "a", "ram": "60Mi"}, {"name": "b", "ram": "60Mi"}, {"name": "pin", "ram": "10Mi", "pinned": True},
         {"name": "huge", "ram": "1Gi"}],
        mode=mode,
        ram="100Mi",
        acquire_timeout=timeout,
        idle_ttl=ttl,
    )
    return Pool.from_manifest(parse_document(text))


def test_pool_refuses_models_it_does_not_list():
    mm = manager(laptop_pool())
    with pytest.raises(UnknownModelError, match="not in pool"):
        mm.register_model_loader("other", lambda: 1)


def test_pool_ceiling_refuses_a_model_larger_than_the_ceiling():
    mm = manager(laptop_pool())
    mm.register_model_loader("huge", lambda: Weights("huge"))
    with pytest.raises(AcquireRefusedError) as refused:
        with mm.load_model("huge"):
            pass
    assert refused.value.reason == "exceeds_ceiling"
    assert "ceiling 100.0 MiB" in str(refused.value)


def unsized_pool(rule: str, mode: str = "Cache") -> PoolType:
    """A pool with one undeclared model (``open``), the sidecar's ``unsizedModels`` rule."""
    from modelpool.pool import parse_document

    text = pool_yaml(
        [{"name": "a", "ram": "30Mi"}, {"name": "open"}], mode=mode, ram="100Mi", acquire_timeout="1s"
    )
    text = text.replace("  policy:\n", f"  policy:\n    unsizedModels: {rule}\n")
    return Pool.from_manifest(parse_document(text))


def test_unsized_models_refuse_is_the_sidecars_refusal():
    mm = manager(unsized_pool("Refuse"))
    mm.register_model_loader("open", lambda: Weights("open"))
    with pytest.raises(AcquireRefusedError) as refused:
        with mm.load_model("open"):
            pass
    assert refused.value.reason == "unsized"
    assert "spec.policy.unsizedModels: Refuse" in str(refused.value)
    assert refused.value.need_bytes == {"vram": 0, "ram": 0}


def test_unsized_models_alone_need_the_whole_ceiling_until_measured():
    mm = manager(unsized_pool("Alone"))
    mm.register_model_loader("a", lambda: Weights("a"))
    mm.register_model_loader("open", lambda: Weights("open"))
    with mm.load_model("a"):
        # "a" is in use: the undeclared model needs the whole ceiling, so it waits, then times out.
        with pytest.raises(AcquireRefusedError) as refused:
            with mm.load_model("open"):
                pass
        assert refused.value.reason == "timeout"
        assert refused.value.need_bytes == {"vram": 0, "ram": 100 * MIB}
    # Idle now (Cache mode): "a" is evicted, "open" loads alone and its size is measured.
    with mm.load_model("open"):
        assert list(mm.loaded_models) == ["open"]
    with mm.load_model("a"):  # measured small: both fit now
        assert sorted(mm.loaded_models) == ["a", "open"]


def test_unsized_models_rule_is_checked():
    from modelpool.pool import PoolFileError, parse_document

    text = pool_yaml([{"name": "open"}], ram="1Gi").replace("  policy:\n", "  policy:\n    unsizedModels: Maybe\n")
    with pytest.raises(PoolFileError, match="spec.policy.unsizedModels: 'Maybe' is not Alone or Refuse"):
        Pool.from_manifest(parse_document(text))
    assert Pool.from_manifest(parse_document(pool_yaml([{"name": "open"}], ram="1Gi"))).unsized_models == "Alone"


def test_pool_ceiling_evicts_idle_models_in_cache_mode():
    mm = manager(laptop_pool())
    for name in ("a", "b", "pin"):
        mm.register_model_loader(name, lambda name=name: Weights(name))
    with mm.load_model("pin"):
        pass
    with mm.load_model("a"):
        pass
    assert sorted(mm.loaded_models) == ["a", "pin"]
    with mm.load_model("b"):  # 60 + 60 + 10 > 100: "a" is idle, so it goes; "pin" stays
        assert sorted(mm.loaded_models) == ["b", "pin"]


def test_pool_ceiling_waits_for_a_lease_then_times_out():
    mm = manager(laptop_pool(timeout="1s"))
    for name in ("a", "b"):
        mm.register_model_loader(name, lambda name=name: Weights(name))
    with mm.load_model("a"):
        started = time.monotonic()
        with pytest.raises(AcquireRefusedError) as refused:
            with mm.load_model("b"):
                pass
        assert refused.value.reason == "timeout"
        assert time.monotonic() - started >= 0.9
        assert "a (vram 0 B, ram 60.0 MiB, 1 lease)" in str(refused.value)


def test_pool_ceiling_admits_after_another_thread_releases():
    mm = manager(laptop_pool(mode="Aggressive", timeout="60s"))
    for name in ("a", "b"):
        mm.register_model_loader(name, lambda name=name: Weights(name))
    release = threading.Event()
    entered = threading.Event()

    def holder():
        with mm.load_model("a"):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(30)
    threading.Timer(0.5, release.set).start()
    with mm.load_model("b"):
        assert list(mm.loaded_models) == ["b"]
    thread.join(30)


def test_cache_mode_idle_ttl_unloads():
    mm = manager(laptop_pool(ttl="300ms"))
    mm.register_model_loader("a", lambda: Weights("a"))
    with mm.load_model("a"):
        pass
    assert list(mm.loaded_models) == ["a"]
    deadline = time.monotonic() + 30
    while mm.loaded_models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(mm.loaded_models) == []


def test_pool_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "pool.yaml"
    path.write_text(pool_yaml([{"name": "only", "ram": "1Mi"}], mode="Cache"))
    monkeypatch.setenv("MODELPOOL_POOL", str(path))
    mm = manager()
    assert mm.pool is not None and mm.pool.mode == "Cache"
    mm.register_model_loader("only", lambda: Weights("only"))
    with mm.load_model("only"):
        pass
    assert list(mm.loaded_models) == ["only"]  # Cache mode from the pool


def test_local_mode_is_announced_once():
    code = (
        "import logging, modelpool\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "modelpool.MemoryManager(); modelpool.MemoryManager(); modelpool.get_memory_manager()\n"
    )
    env = dict(os.environ, MODELPOOL_SOCKET="/nonexistent/sidecar.sock", MODELPOOL_CONNECT_TIMEOUT="0",
               MODELPOOL_REQUIRE_SIDECAR="0", PYTHONPATH=str(SDK / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("managing memory in-process (local mode") == 1, out.stderr
    assert "No ModelPool sidecar answers at /nonexistent/sidecar.sock" in out.stderr


# --- real memory, measured from /proc, in a separate process -----------------------------------


def assert_back_to_baseline(rss: int, baseline: int, what: str) -> None:
    assert rss <= baseline * (1 + TOLERANCE), (
        f"{what}: RSS {rss / MIB:.1f} MiB is more than {TOLERANCE:.0%} above the baseline {baseline / MIB:.1f} MiB"
    )


@pytest.mark.parametrize("aggressive", ["1", ""], ids=["aggressive", "default"])
def test_rss_returns_to_baseline_after_each_unload(start_app, aggressive):
    app = start_app("rss", WORKER_AGGRESSIVE=aggressive)
    assert app.hello["mode"] == "local"
    app.ok("register", name="tiny", mib=1)
    app.ok("register", name="big", mib=200)
    app.ok("acquire", name="tiny")
    app.ok("release", name="tiny")  # warm-up: the SDK's own first-use allocations
    baseline = app.ok("state")["rss"]
    for round_ in range(3):
        held = app.ok("acquire", name="big")
        assert held["rss"] - baseline >= 190 * MIB, f"round {round_}: the model did not load ({held})"
        released = app.ok("release", name="big")
        assert released["loaded"] == []
        assert_back_to_baseline(released["rss"], baseline, f"round {round_} after unload")


def test_exception_in_block_frees_memory_even_inside_except(start_app):
    app = start_app("exc", WORKER_AGGRESSIVE="1")
    app.ok("register", name="tiny", mib=1)
    app.ok("register", name="big", mib=200)
    app.ok("acquire", name="tiny")
    app.ok("release", name="tiny")
    baseline = app.ok("state")["rss"]
    failed = app.ok("fail", name="big")
    assert failed["error"] == "ValueError" and failed["loaded"] == []
    assert_back_to_baseline(failed["rss_in_except"], baseline, "inside the except block")


def test_failing_loader_frees_what_it_allocated(start_app):
    app = start_app("loader")
    app.ok("register", name="tiny", mib=1)
    app.ok("register", name="broken", mib=200, fail_loader=True)
    app.ok("acquire", name="tiny")
    app.ok("release", name="tiny")
    baseline = app.ok("state")["rss"]
    result = app.call("acquire", name="broken")
    assert not result["ok"] and result["error"] == "RuntimeError"
    assert app.ok("state")["loaded"] == []
    assert_back_to_baseline(result["rss"], baseline, "after the failed load")


def test_memory_line_says_no_gpu_without_one():
    from modelpool.memory import format_stats

    line = format_stats({"ram_used_gb": 2.3, "ram_total_gb": 20.0, "ram_percent": 11.5,
                         "vram_allocated_gb": 0.0, "vram_total_gb": 0.0, "vram_percent": 0.0})
    assert line == "RAM 2.3/20.0GB (11.5%) | VRAM no GPU"
    line = format_stats({"ram_used_gb": 2.3, "ram_total_gb": 20.0, "ram_percent": 11.5,
                         "vram_allocated_gb": 12.1, "vram_total_gb": 24.0, "vram_percent": 50.4})
    assert line == "RAM 2.3/20.0GB (11.5%) | VRAM 12.1/24.0GB (50.4%)"


# --- failing closed, saying so, and waiting out loud ---------------------------------------------


def test_required_sidecar_missing_is_an_error_naming_what_to_check(monkeypatch, tmp_path):
    """Catches MODELPOOL_REQUIRE_SIDECAR=1 running unconstrained in local mode anyway."""
    missing = str(tmp_path / "sidecar.sock")
    monkeypatch.setenv("MODELPOOL_REQUIRE_SIDECAR", "1")
    monkeypatch.setenv("MODELPOOL_SOCKET", missing)
    monkeypatch.setenv("MODELPOOL_CONNECT_TIMEOUT", "0.5")
    with pytest.raises(SidecarUnavailableError) as caught:
        MemoryManager()
    message = str(caught.value)
    assert f"No ModelPool sidecar answers at {missing} ($MODELPOOL_SOCKET; no such socket file)" in message
    assert "MODELPOOL_REQUIRE_SIDECAR=1" in message and "--socket" in message
    # the flag does the same without the environment variable
    monkeypatch.delenv("MODELPOOL_REQUIRE_SIDECAR")
    with pytest.raises(SidecarUnavailableError, match=r"require_sidecar=True"):
        MemoryManager(sidecar=missing, require_sidecar=True)
    # and asking for local mode while requiring a sidecar is a contradiction, said at once
    with pytest.raises(SidecarUnavailableError, match=r"local mode was asked for \(sidecar=False\)"):
        MemoryManager(sidecar=False, require_sidecar=True)
    monkeypatch.setenv("MODELPOOL_SOCKET", "none")
    with pytest.raises(SidecarUnavailableError, match=r"\$MODELPOOL_SOCKET is 'none'"):
        MemoryManager(require_sidecar=True)


def test_required_sidecar_that_does_not_answer_is_an_error(monkeypatch, tmp_path):
    """A socket file nobody serves (a crashed sidecar) fails closed too, after the timeout."""
    import socket as socketlib

    path = str(tmp_path / "dead.sock")
    server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    server.bind(path)
    server.close()  # the file stays, nothing listens: connection refused
    monkeypatch.setenv("MODELPOOL_CONNECT_TIMEOUT", "0.5")
    started = time.monotonic()
    with pytest.raises(SidecarUnavailableError, match=r"did not answer GET /v1/state within 0\.5 s"):
        MemoryManager(sidecar=path, require_sidecar=True)
    assert time.monotonic() - started < 30


def test_local_mode_without_a_sidecar_is_a_warning_with_the_reason():
    """Catches an app that expected a sidecar silently running without the pod's ceilings."""
    code = (
        "import modelpool\n"  # no logging configured: Python's last-resort handler shows warnings
        "modelpool.MemoryManager()\n"
    )
    env = dict(os.environ, MODELPOOL_SOCKET="/nonexistent/sidecar.sock", MODELPOOL_CONNECT_TIMEOUT="0",
               MODELPOOL_REQUIRE_SIDECAR="0", PYTHONPATH=str(SDK / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No ModelPool sidecar answers at /nonexistent/sidecar.sock ($MODELPOOL_SOCKET; no such socket file)" in out.stderr
    assert "local mode" in out.stderr and "MODELPOOL_REQUIRE_SIDECAR=1" in out.stderr


def test_an_injected_socket_that_does_not_answer_is_an_error_not_local_mode():
    """Issue 15: the webhook injects MODELPOOL_SOCKET; when the sidecar there cannot be reached
    the SDK ran in local mode, without any ceiling, after one warning. Now that is an error,
    unless MODELPOOL_REQUIRE_SIDECAR=0 says local mode is fine."""
    code = "import modelpool\nmodelpool.MemoryManager()\n"
    env = dict(os.environ, MODELPOOL_SOCKET="/nonexistent/sidecar.sock", MODELPOOL_CONNECT_TIMEOUT="0.3",
               PYTHONPATH=str(SDK / "src"))
    env.pop("MODELPOOL_REQUIRE_SIDECAR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stderr
    assert "SidecarUnavailableError" in out.stderr, out.stderr
    assert "$MODELPOOL_SOCKET is set" in out.stderr and "MODELPOOL_REQUIRE_SIDECAR=0" in out.stderr
    assert "local mode (" not in out.stderr


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("setpriv") is None, reason="needs root and setpriv to run as another uid")
def test_an_app_of_another_uid_without_the_socket_group_fails_closed_saying_why():
    """Issue 15, with real uids: the sidecar's socket is mode 0660 with the pod's shared group;
    an app running as uid 1000 without that group used to get Permission denied and fall back
    to local mode with no ceiling. It must fail, naming the permission problem."""
    import socket as socketlib
    import tempfile

    work = tempfile.mkdtemp(prefix="modelpool-uid-")
    try:
        os.chmod(work, 0o755)
        shutil.copytree(SDK / "src" / "modelpool", os.path.join(work, "modelpool"))
        for root, dirs, files in os.walk(work):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        path = os.path.join(work, "sidecar.sock")
        server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        server.bind(path)
        server.listen(8)
        os.chown(path, 65532, 65532)
        os.chmod(path, 0o660)
        code = "import modelpool\nmodelpool.MemoryManager()\n"
        env = dict(os.environ, MODELPOOL_SOCKET=path, MODELPOOL_CONNECT_TIMEOUT="0.3", PYTHONPATH=work,
                   HOME=work)
        env.pop("MODELPOOL_REQUIRE_SIDECAR", None)
        out = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c", code],
                             env=env, capture_output=True, text=True, timeout=120, cwd=work)
        server.close()
        assert out.returncode != 0, out.stderr
        assert "permission denied on the socket" in out.stderr, out.stderr
        assert "supplementalGroups" in out.stderr, out.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_waiting_acquire_logs_what_it_waits_for_and_behind_whom(caplog, monkeypatch):
    """Catches a silent wait: the seed's users watch the logs to see why a job does not start."""
    monkeypatch.setenv("MODELPOOL_WAIT_LOG_AFTER", "0.3")
    monkeypatch.setenv("MODELPOOL_WAIT_LOG_INTERVAL", "0.5")
    caplog.set_level(logging.INFO, logger="modelpool")
    mm = manager(laptop_pool(mode="Aggressive", timeout="30s"))
    mm.register_model_loader("a", lambda: Weights("a"))
    mm.register_model_loader("b", lambda: Weights("b"))
    holding = threading.Event()
    let_go = threading.Event()

    def hold_a():
        with mm.load_model("a"):
            holding.set()
            let_go.wait(30)

    holder = threading.Thread(target=hold_a)
    holder.start()
    assert holding.wait(30)
    timer = threading.Timer(2.0, let_go.set)
    timer.start()
    with mm.load_model("b") as model:  # a (60 Mi) + b (60 Mi) > 100 Mi: waits for a's block
        assert model.process(1) == ("b", 1)
    holder.join(30)
    text = caplog.text
    first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting for room to load b")]
    assert len(first) == 1, text
    assert "needs ram 60.0 MiB" in first[0] and "ceiling ram 100.0 MiB (60.0 MiB held)" in first[0], first[0]
    assert "held by a (vram 0 B, ram 60.0 MiB, 1 lease)" in first[0], first[0]
    assert "Still waiting for room to load b after" in text
    assert "Room for b after waiting" in text


def test_an_acquire_answered_at_once_logs_no_wait(caplog, monkeypatch):
    monkeypatch.setenv("MODELPOOL_WAIT_LOG_AFTER", "0.2")
    caplog.set_level(logging.INFO, logger="modelpool")
    mm = manager(laptop_pool(mode="Aggressive"))
    mm.register_model_loader("a", lambda: Weights("a"))
    with mm.load_model("a"):
        time.sleep(0.5)  # longer than the first-log delay, but the acquire was answered already
    assert "Waiting for room" not in caplog.text
