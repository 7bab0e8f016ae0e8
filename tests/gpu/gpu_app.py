"""The app under test: PyTorch on CUDA using the ModelPool SDK's seed API
(``get_memory_manager``, ``register_model_loader``, ``with load_model(name)``), driven by
``run_gpu.py`` one JSON command per stdin line; it answers one JSON event per stdout line.

Each "model" is a uint8 CUDA tensor of the given size, filled so that its pages are really
resident. A ``weakref.finalize`` on each model object reports when the SDK really let go of it
(``{"event": "freed"}``), whichever thread the unload ran on.

Commands: ``{"cmd": "hold", "model": m}`` (enter ``load_model(m)`` and keep the lease),
``release`` (leave it), ``use`` (compute on a held model), ``alloc`` (``{"bytes": n}``: try one
allocation of n bytes outside the pool, report whether torch refused it as out of memory, give it
back), ``stats``, ``exit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Dict, Tuple

_lock = threading.Lock()


def emit(**event: Any) -> None:
    event.setdefault("t", time.monotonic())
    with _lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="name:MiB,name:MiB,...")
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    sizes = {name: int(mib) << 20 for name, mib in (item.split(":") for item in args.models.split(","))}

    import torch

    device = torch.device("cuda", args.device)
    torch.cuda.init()
    # Warm up everything "use" touches (context, reduction kernels), then give the cache back:
    # what NVML shows for this process now is its baseline.
    warm = torch.ones(1 << 20, dtype=torch.uint8, device=device)
    int(warm[: 1 << 20].sum().item())
    del warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()

    def readings() -> Dict[str, Any]:
        free, total = torch.cuda.mem_get_info(device)
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "device_used_bytes": int(total - free),
            "device_total_bytes": int(total),
        }

    alive: Dict[str, int] = {}

    def memory_fraction() -> Any:
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        try:
            return getter(device) if getter is not None else None
        except Exception:
            return None

    def try_alloc(nbytes: int) -> Dict[str, Any]:
        """One allocation outside the pool: does the per-process fraction refuse it?"""
        result: Dict[str, Any] = {"bytes": nbytes, "ok": False, "oom": False, "error": None, "fraction": memory_fraction()}
        free_before, _ = torch.cuda.mem_get_info(device)
        result["device_free_before"] = int(free_before)
        try:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            tensor.fill_(1)
            torch.cuda.synchronize()
            result["ok"] = True
            del tensor
        except Exception as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            result["error"] = str(error).splitlines()[0][:300]
            result["oom"] = isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(error)
        torch.cuda.empty_cache()
        result.update(readings())
        return result

    class Weights:
        """A model: one CUDA tensor of ``nbytes``."""

        def __init__(self, name: str, nbytes: int) -> None:
            self.name = name
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.tensor.fill_(1)
            torch.cuda.synchronize()

        def checksum(self) -> int:
            return int(self.tensor[: 1 << 20].sum().item())

    def on_freed(name: str) -> None:
        alive[name] = alive.get(name, 1) - 1
        emit(event="freed", model=name)

    def make_loader(name: str, nbytes: int):
        def loader(*_args: Any, **_kwargs: Any) -> Weights:
            started = time.monotonic()
            weights = Weights(name, nbytes)
            alive[name] = alive.get(name, 0) + 1
            weakref.finalize(weights, on_freed, name)
            emit(event="loaded", model=name, seconds=time.monotonic() - started)
            return weights

        return loader

    import modelpool

    manager = modelpool.get_memory_manager()
    for name, nbytes in sizes.items():
        manager.register_model_loader(name, make_loader(name, nbytes))
    emit(
        event="ready",
        pid=os.getpid(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=torch.cuda.get_device_name(device),
        sdk=getattr(modelpool, "__version__", None),
        sdk_file=getattr(modelpool, "__file__", None),
        sdk_mode=getattr(manager, "mode", None),
        **readings(),
    )

    held: Dict[str, Tuple[contextlib.ExitStack, Any]] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            kind = command.get("cmd")
            name = command.get("model")
            if kind == "hold":
                stack = contextlib.ExitStack()
                started = time.monotonic()
                held[name] = (stack, stack.enter_context(manager.load_model(name)))
                emit(event="held", model=name, seconds=time.monotonic() - started, **readings())
            elif kind == "release":
                # No local name may keep the model alive past the release (the unload must be able
                # to free it): take only the stack out of `held`.
                stack = held.pop(name)[0]
                released_at = time.monotonic()
                stack.close()
                emit(event="released", model=name, t_release=released_at, **readings())
            elif kind == "use":
                emit(event="used", model=name, ok=held[name][1].checksum() == 1 << 20)
            elif kind == "alloc":
                emit(event="alloc", **try_alloc(int(command["bytes"])))
            elif kind == "stats":
                emit(event="stats", alive=sorted(k for k, v in alive.items() if v > 0), held=sorted(held), **readings())
            elif kind == "exit":
                break
            else:
                emit(event="error", message=f"unknown command {kind!r}")
        except Exception as error:  # report and keep serving: the orchestrator decides
            emit(event="error", cmd=line.strip(), message=repr(error), trace=traceback.format_exc())
    while held:
        with contextlib.suppress(Exception):
            held.popitem()[1][0].close()
    emit(event="bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
