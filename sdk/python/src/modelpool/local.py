"""In-process policy: what the SDK does when no sidecar is there (a laptop, a plain server, a test).

Without a pool every registered loader is allowed and only the seed's thresholds apply
(``aggressive_cleanup``, ``check_memory_available``, ``auto_cleanup_if_needed``). With a pool
(``MODELPOOL_POOL=FILE`` or ``pool=``) it also enforces the pool's models, ceilings and policy
within this one process: admission by the larger of declared and measured footprints, eviction of
idle models (LRU or cost-aware), waiting up to ``acquireTimeout`` for room, pinned models, Cache
mode's idle TTL and pressure levels. Sharing one budget between processes needs the sidecar.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from . import memory
from ._wait import WaitReporter
from .errors import AcquireRefusedError, UnknownModelError
from .pool import Pool

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MemoryManager, _Entry

log = logging.getLogger("modelpool")

RESOURCES = ("vram", "ram")


@dataclass
class Grant:
    """An admitted acquire: ``decision`` is ``use`` (already held) or ``load``."""

    model: str
    decision: str
    lease: Optional[str] = None
    session: Optional[str] = None
    generation: int = 0  # which sidecar session (1st, 2nd, ...) the lease belongs to
    instance: Optional[int] = None  # the sidecar's generation of the instance the lease is on


class LocalCoordinator:
    """The pool's policy, applied inside this process."""

    kind = "local"

    def __init__(self, manager: "MemoryManager", pool: Optional[Pool]) -> None:
        self.manager = manager
        self.pool = pool
        self._reserved: Dict[str, Dict[str, int]] = {}
        self._leases = itertools.count(1)
        self._reaper: Optional[threading.Thread] = None
        self._closed = threading.Event()
        self._vram_cap_done = False

    # --- sizes -----------------------------------------------------------------------------

    def _declared(self, name: str) -> Dict[str, int]:
        model = self.pool.models.get(name) if self.pool else None
        if model is None:
            return {"vram": 0, "ram": 0}
        return {"vram": model.vram_bytes or 0, "ram": model.ram_bytes or 0}

    def _size_unknown(self, name: str, entry: Optional["_Entry"] = None) -> bool:
        """Nothing declared, never measured (``spec.policy.unsizedModels`` applies)."""
        measured = name in self.manager._learned or (entry is not None and entry.state == "loaded")
        return self.pool is not None and self.pool.size_unknown(name, measured)

    def _size(self, name: str, entry: Optional["_Entry"]) -> Dict[str, int]:
        """The larger of declared and measured, per resource (measured: this load, or the last).
        A model of unknown size needs the whole ceiling until a load of it is measured."""
        if self._size_unknown(name, entry):
            assert self.pool is not None
            return self.pool.unsized_need()
        declared = self._declared(name)
        learned = self.manager._learned.get(name, {})
        out = {}
        for resource in RESOURCES:
            measured = learned.get(resource, 0)
            if entry is not None:
                measured = max(measured, getattr(entry, f"{resource}_bytes") or 0)
            out[resource] = max(declared[resource], measured)
        return out

    def _held(self) -> Dict[str, int]:
        held = {"vram": 0, "ram": 0}
        entries = self.manager._entries
        for name, entry in entries.items():
            size = self._size(name, entry)
            for resource in RESOURCES:
                held[resource] += size[resource]
        for name, size in self._reserved.items():
            if name not in entries:
                for resource in RESOURCES:
                    held[resource] += size[resource]
        return held

    def _ceiling(self) -> Dict[str, Optional[int]]:
        if self.pool is None:
            return {"vram": None, "ram": None}
        return {"vram": self.pool.limit_vram_bytes, "ram": self.pool.limit_ram_bytes}

    def _fits(self, need: Dict[str, int], held: Dict[str, int]) -> bool:
        ceiling = self._ceiling()
        return all(
            ceiling[r] is None or held[r] + need[r] <= ceiling[r]  # type: ignore[operator]
            for r in RESOURCES
        )

    def _is_pinned(self, name: str) -> bool:
        model = self.pool.models.get(name) if self.pool else None
        return bool(model and model.pinned)

    def _idle(self) -> List[str]:
        """Models that may be evicted now, first to go first."""
        entries = self.manager._entries
        idle = [
            name
            for name, entry in entries.items()
            if entry.state == "loaded" and entry.leases == 0 and not self._is_pinned(name)
        ]

        def cost(name: str) -> Tuple[Any, ...]:
            entry = entries[name]
            if self.pool is None or self.pool.eviction == "Lru":
                return (entry.last_used,)
            spec = self.pool.models.get(name)
            size = sum(self._size(name, entry).values()) or 1
            load_s = entry.load_seconds or (spec.load_seconds if spec else None) or 1.0
            # GreedyDual-Size flavour: cheap to reload per byte, lower priority, older: goes first
            return (spec.priority if spec else 0, load_s / size * 1e9, entry.last_used)

        return sorted(idle, key=cost)

    def _describe_held(self) -> str:
        parts = []
        for name, entry in self.manager._entries.items():
            size = self._size(name, entry)
            parts.append(
                f"{name} (vram {memory.format_bytes(size['vram'])}, ram {memory.format_bytes(size['ram'])},"
                f" {entry.leases} lease{'s' if entry.leases != 1 else ''})"
            )
        return ", ".join(parts) or "nothing"

    # --- the coordinator interface ---------------------------------------------------------

    def start(self) -> None:
        if self.pool is not None and self.pool.mode == "Cache" and self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="modelpool-reaper", daemon=True)
            self._reaper.start()

    def model_registered(self, name: str) -> None:
        if self.pool is not None and name not in self.pool.models:
            raise UnknownModelError(
                f"model {name!r} is not in pool {self.pool.name!r}, which lists "
                f"{', '.join(sorted(self.pool.models)) or 'no models'}"
            )

    def default_aggressive(self) -> bool:
        return self.pool is None or self.pool.mode == "Aggressive"

    def acquire(self, name: str) -> Grant:
        if not self._vram_cap_done:
            self._vram_cap_done = memory.apply_vram_cap(self.pool)
        ceiling = self._ceiling()
        if self.pool is not None and self.pool.unsized_models == "Refuse" and self._size_unknown(name):
            with self.manager._cond:
                held = self._held()
            raise AcquireRefusedError(
                name, "unsized", self.pool.unsized_refusal(name), {"vram": 0, "ram": 0}, ceiling, held
            )
        need = self._size(name, None)
        for resource in RESOURCES:
            limit = ceiling[resource]
            if limit is not None and need[resource] > limit:
                raise AcquireRefusedError(
                    name,
                    "exceeds_ceiling",
                    f"model {name!r} needs {memory.format_bytes(need[resource])} of {resource},"
                    f" ceiling {memory.format_bytes(limit)}",
                    need,
                    ceiling,
                    self._held(),
                )
        timeout = self.pool.acquire_timeout_s if self.pool else 0.0
        deadline = time.monotonic() + timeout
        with WaitReporter(name, lambda: self._describe_room(name, need)):
            return self._acquire_or_wait(name, need, ceiling, timeout, deadline)

    def _describe_room(self, name: str, need: Dict[str, int]) -> str:
        ceiling = self._ceiling()
        with self.manager._cond:
            held = self._held()
            holders = self._describe_held()
        limits = ", ".join(
            f"{r} {memory.format_bytes(ceiling[r])} ({memory.format_bytes(held[r])} held)"
            for r in RESOURCES
            if ceiling[r] is not None
        )
        needs = ", ".join(f"{r} {memory.format_bytes(need[r])}" for r in RESOURCES if need[r])
        return f"needs {needs or 'nothing declared'}; ceiling {limits or 'none'}; held by {holders}"

    def _acquire_or_wait(
        self,
        name: str,
        need: Dict[str, int],
        ceiling: Dict[str, Optional[int]],
        timeout: float,
        deadline: float,
    ) -> Grant:
        cond = self.manager._cond
        with cond:
            while True:
                entry = self.manager._entries.get(name)
                if entry is not None and entry.state in ("loaded", "loading"):
                    return Grant(name, "use", f"local-{next(self._leases)}")
                held = self._held()
                if entry is None and self._fits(need, held):
                    self._reserved[name] = need
                    return Grant(name, "load", f"local-{next(self._leases)}")
                # make room: idle models, in eviction order, until it fits
                victims: List[str] = []
                freed = dict(held)
                for victim in self._idle():
                    if victim == name:
                        continue
                    victims.append(victim)
                    size = self._size(victim, self.manager._entries[victim])
                    for resource in RESOURCES:
                        freed[resource] -= size[resource]
                    if self._fits(need, freed):
                        break
                if entry is None and victims and self._fits(need, freed):
                    for victim in victims:
                        log.info("Evicting idle model %s to make room for %s", victim, name)
                        self.manager._unload(victim, reason="evicted")
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AcquireRefusedError(
                        name,
                        "timeout",
                        f"model {name!r} needs vram {memory.format_bytes(need['vram'])}, ram "
                        f"{memory.format_bytes(need['ram'])}; ceiling vram {memory.format_bytes(ceiling['vram'])}, "
                        f"ram {memory.format_bytes(ceiling['ram'])}; held: {self._describe_held()}; "
                        f"no room after {timeout:.0f} s",
                        need,
                        ceiling,
                        held,
                    )
                cond.wait(min(remaining, 1.0))

    def loaded(self, grant: Grant, ok: bool, **measured: Any) -> Grant:
        with self.manager._cond:
            self._reserved.pop(grant.model, None)
            self.manager._cond.notify_all()
        return grant

    def release(self, grant: Grant, aggressive: bool) -> bool:
        return aggressive and not self._is_pinned(grant.model)

    def unloaded(self, name: str, command: Optional[Any] = None, instance: Optional[int] = None) -> None:
        with self.manager._cond:
            self.manager._cond.notify_all()

    def cleanup(self, force: bool) -> None:
        return None

    def check(self, vram_bytes: int, ram_bytes: int) -> Tuple[bool, str, Dict[str, Any]]:
        reading = memory.vram_reading()
        info = memory._meminfo()
        reclaimable = {"vram": 0, "ram": 0}
        with self.manager._cond:
            for name in self._idle():
                size = self._size(name, self.manager._entries[name])
                for resource in RESOURCES:
                    reclaimable[resource] += size[resource]
            held = self._held()
        free = {
            "vram": max(0, reading.device_total - reading.device_used) if reading.gpu else 0,
            "ram": info.get("MemAvailable", 0),
        }
        ceiling = self._ceiling()
        problems = []
        for resource, need in (("vram", vram_bytes), ("ram", ram_bytes)):
            if need <= 0:
                continue
            if resource == "vram" and not reading.gpu:
                problems.append("no GPU is visible to this process")
                continue
            available = free[resource] + reclaimable[resource]
            limit = ceiling[resource]
            if limit is not None:
                available = min(available, limit - held[resource] + reclaimable[resource])
            if available < need:
                problems.append(
                    f"{resource}: {memory.format_bytes(need)} wanted, {memory.format_bytes(free[resource])} free"
                    f" + {memory.format_bytes(reclaimable[resource])} reclaimable"
                    + (f" (ceiling {memory.format_bytes(limit)})" if limit is not None else "")
                )
        ok = not problems
        message = "enough memory" if ok else "; ".join(problems)
        return ok, message, {"free": free, "reclaimable": reclaimable}

    def state(self) -> Optional[Dict[str, Any]]:
        return None

    def close(self) -> None:
        self._closed.set()

    def after_fork(self) -> None:
        self._reaper = None
        self._closed = threading.Event()
        self.start()

    # --- Cache mode: idle TTL and pressure --------------------------------------------------

    def _reap_loop(self) -> None:
        assert self.pool is not None
        interval = max(0.2, min(5.0, self.pool.idle_ttl_s / 4))
        while not self._closed.wait(interval):
            try:
                self.reap()
            except Exception:  # pragma: no cover - never let the thread die
                log.exception("modelpool: idle check failed")

    def reap(self) -> None:
        """Unloads idle models past the TTL, and idle models while RAM/VRAM is over pressure."""
        if self.pool is None:
            return
        now = time.monotonic()
        with self.manager._cond:
            expired = [
                name for name in self._idle() if now - self.manager._entries[name].last_used >= self.pool.idle_ttl_s
            ]
        for name in expired:
            self.manager._unload(name, reason="idle_ttl")
        stats = memory.memory_stats()
        if stats["ram_percent"] > self.pool.pressure_ram_percent or (
            stats["gpu"] and stats["vram_percent"] > self.pool.pressure_vram_percent
        ):
            with self.manager._cond:
                victims = self._idle()
            if victims:
                log.warning(
                    "Memory pressure (RAM %.1f%%, VRAM %.1f%%): unloading idle model %s",
                    stats["ram_percent"],
                    stats["vram_percent"],
                    victims[0],
                )
                self.manager._unload(victims[0], reason="pressure")
