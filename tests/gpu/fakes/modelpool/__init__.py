"""A stand-in for the ModelPool SDK's seed API (see ../README.md): in-process, with the mode
the fake sidecar wrote next to its socket."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator

import fakegpu

__version__ = "0.0+fake"


class _Manager:
    def __init__(self) -> None:
        socket = os.environ.get("MODELPOOL_SOCKET", "")
        try:
            with open(socket + ".json") as handle:
                self.pool = json.load(handle)
            self.mode = "sidecar"
        except OSError:
            self.pool = {"mode": "Aggressive", "pressure": None}
            self.mode = "local"
        cap = self.pool.get("vram_cap_bytes")
        torch = sys.modules.get("torch")
        if cap and torch is not None:  # as the real SDK's apply_vram_cap
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / fakegpu.TOTAL))
        self.loaders: Dict[str, Callable[[], Any]] = {}
        self.models: Dict[str, Any] = {}
        self.leases: Dict[str, int] = {}
        self.used_at: Dict[str, float] = {}
        self.lock = threading.RLock()
        self._publish()
        threading.Thread(target=self._pressure, daemon=True).start()

    def _publish(self) -> None:
        state = {name: {"leases": self.leases.get(name, 0)} for name in self.models}
        path = os.path.join(os.environ["FAKE_GPU_DIR"], f"session-{os.getpid()}.json")
        with open(path + ".tmp", "w") as handle:
            json.dump({"pid": os.getpid(), "models": state}, handle)
        os.replace(path + ".tmp", path)

    def register_model_loader(self, name: str, loader: Callable[[], Any]) -> None:
        self.loaders[name] = loader

    @contextlib.contextmanager
    def load_model(self, name: str) -> Iterator[Any]:
        with self.lock:
            if name not in self.models:
                self.models[name] = self.loaders[name]()
            self.leases[name] = self.leases.get(name, 0) + 1
            model = self.models[name]
            self._publish()
        try:
            yield model
        finally:
            del model
            with self.lock:
                self.leases[name] -= 1
                self.used_at[name] = time.monotonic()
                if self.leases[name] == 0 and self.pool["mode"] == "Aggressive":
                    self._unload(name, "released")
                self._publish()

    def _unload(self, name: str, reason: str) -> None:
        self.models.pop(name, None)
        gc.collect()
        import torch

        torch.cuda.empty_cache()
        fakegpu.record("unload", model=name, reason=reason, pid=os.getpid())

    def _pressure(self) -> None:
        threshold = self.pool.get("pressure")
        while threshold:
            time.sleep(0.05)
            with self.lock:
                if fakegpu.used() * 100.0 / fakegpu.TOTAL <= threshold:
                    continue
                idle = [n for n in self.models if self.leases.get(n, 0) == 0]
                if idle:
                    self._unload(min(idle, key=lambda n: self.used_at.get(n, 0.0)), "pressure")
                    self._publish()


_MANAGER = None


def get_memory_manager(aggressive_cleanup: Any = None, **_: Any) -> _Manager:
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = _Manager()
    return _MANAGER
