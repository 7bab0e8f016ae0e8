"""The asyncio API: ``async with mm.load_model_async(name) as model``. Two tasks contend for one
ceiling, against the real sidecar and in local mode; the event loop keeps running while one
waits for room, and a task cancelled while it waits gives its lease back."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from conftest import MIB, pool_yaml, wait_for
from modelpool import MemoryManager
from modelpool.pool import Pool, parse_document


class Weights:
    """Real, resident memory (filled, so every page counts in RSS)."""

    def __init__(self, name: str, mib: int) -> None:
        self.name = name
        self.data = bytearray(b"\x01") * (mib * MIB)

    def process(self, x: int) -> Tuple[str, int]:
        return (self.name, x)


POOL_MODELS = [{"name": "a", "ram": "200Mi"}, {"name": "b", "ram": "200Mi"}]


async def contend(mm: MemoryManager, hold_s: float = 2.0) -> Dict[str, Any]:
    """Task 1 holds ``a`` for ``hold_s``; task 2 asks for ``b``, which fits only once ``a`` is
    gone; a third task ticks every 50 ms to show the loop is never blocked."""
    key_a = mm.register_model_loader("a", lambda: Weights("a", 150))
    key_b = mm.register_model_loader("b", lambda: Weights("b", 150))
    events: List[Tuple[str, float]] = []
    a_in = asyncio.Event()
    done = asyncio.Event()
    ticks: List[float] = []
    start = time.monotonic()

    def mark(what: str) -> None:
        events.append((what, time.monotonic() - start))

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.monotonic() - start)
            await asyncio.sleep(0.05)

    async def first() -> None:
        async with mm.load_model_async(key_a) as model:
            assert model.process(1) == ("a", 1)
            mark("a-in")
            a_in.set()
            await asyncio.sleep(hold_s)
            mark("a-out")

    async def second() -> Tuple[str, int]:
        await a_in.wait()
        mark("b-asks")
        async with mm.load_model_async(key_b) as model:
            mark("b-in")
            loaded = sorted(mm.loaded_models)
            assert loaded == ["b"], f"a and b held together: {loaded}"
            return model.process(2)

    tick_task = asyncio.create_task(ticker())
    result = await asyncio.gather(first(), second())
    done.set()
    await tick_task
    return {"events": dict(events), "ticks": ticks, "result": result[1]}


def check_contention(outcome: Dict[str, Any], hold_s: float) -> None:
    events = outcome["events"]
    assert outcome["result"] == ("b", 2)
    assert events["b-in"] >= events["a-out"], f"b was admitted while a was held: {events}"
    # the loop ran while b waited: ticks all through a's block, not one burst after it
    during = [t for t in outcome["ticks"] if events["b-asks"] <= t <= events["a-out"]]
    assert len(during) >= hold_s / 0.05 / 4, f"the event loop was blocked while b waited: {len(during)} ticks"


def test_two_tasks_contend_for_one_ceiling_in_local_mode(caplog, monkeypatch):
    monkeypatch.setenv("MODELPOOL_WAIT_LOG_AFTER", "0.3")
    caplog.set_level(logging.INFO, logger="modelpool")
    pool = Pool.from_manifest(parse_document(pool_yaml(POOL_MODELS, ram="300Mi", acquire_timeout="60s")))
    mm = MemoryManager(sidecar=False, pool=pool)
    try:
        outcome = asyncio.run(contend(mm))
    finally:
        mm.close()
    check_contention(outcome, 2.0)
    assert "Waiting for room to load b" in caplog.text
    assert list(mm.loaded_models) == []


@pytest.mark.sidecar
def test_two_tasks_contend_for_one_ceiling_against_the_sidecar(start_sidecar, caplog, monkeypatch):
    """One process, two asyncio tasks, a 300 MiB ceiling and two 200 MiB models: the sidecar
    makes the second wait for the first; the ceiling holds in the sidecar's ledger all along."""
    monkeypatch.setenv("MODELPOOL_WAIT_LOG_AFTER", "0.5")
    caplog.set_level(logging.INFO, logger="modelpool")
    sidecar = start_sidecar(pool_yaml(POOL_MODELS, ram="300Mi", acquire_timeout="120s"))
    mm = MemoryManager(sidecar=sidecar.socket)
    assert mm.mode == "sidecar"
    peak = {"ram": 0}
    stop = threading.Event()

    def watch_ledger() -> None:
        while not stop.wait(0.1):
            try:
                held = (sidecar.state().get("held_bytes") or {}).get("ram") or 0
            except Exception:
                continue
            peak["ram"] = max(peak["ram"], held)

    watcher = threading.Thread(target=watch_ledger, daemon=True)
    watcher.start()
    try:
        outcome = asyncio.run(contend(mm, hold_s=3.0))
    finally:
        stop.set()
        watcher.join(10)
        mm.close()
    check_contention(outcome, 3.0)
    assert 0 < peak["ram"] <= 300 * MIB, f"the sidecar's ledger went to {peak['ram'] / MIB:.0f} MiB"
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting for room to load b")]
    assert len(waits) == 1, caplog.text
    assert "held by a (" in waits[0] and "1 lease" in waits[0], waits[0]
    wait_for(lambda: not sidecar.models(), 60, "the sidecar to see both models unloaded")


@pytest.mark.sidecar
def test_a_task_cancelled_while_waiting_gives_its_lease_back(start_sidecar):
    sidecar = start_sidecar(pool_yaml(POOL_MODELS, ram="300Mi", acquire_timeout="120s"))
    mm = MemoryManager(sidecar=sidecar.socket)
    key_a = mm.register_model_loader("a", lambda: Weights("a", 50))
    key_b = mm.register_model_loader("b", lambda: Weights("b", 50))

    async def main() -> None:
        async with mm.load_model_async(key_a):
            async def wants_b() -> None:
                async with mm.load_model_async(key_b):
                    raise AssertionError("b must not be used: its task was cancelled")

            waiter = asyncio.create_task(wants_b())
            await asyncio.sleep(1.0)
            assert not waiter.done()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter

    try:
        asyncio.run(main())
        # a's release lets b's acquire through in its worker thread; b is then given back
        wait_for(lambda: not sidecar.models() and not mm.loaded_models, 60, "no model held and no lease left")
    finally:
        mm.close()
