"""A test app: one process using the SDK, driven by JSON lines on stdin, answering on stdout.

Each model is real memory: numpy arrays of the requested size, written to so the pages are
resident. Requests: register, acquire, release, fail, state, stats, check, cleanup, unload_all,
force_cleanup, quit. Every answer carries this process's RSS (from /proc).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Any, Dict

import numpy as np

import modelpool
from modelpool import memory


class Model:
    """Weights as numpy arrays, touched so they count in RSS."""

    def __init__(self, name: str, mib: float) -> None:
        self.name = name
        chunk = 16 * 1024 * 1024
        total = int(mib * 1024 * 1024)
        self.weights = []
        while total > 0:
            size = min(chunk, total)
            self.weights.append(np.full(size // 4, 1.0, dtype=np.float32))
            total -= size

    def process(self, data: Any) -> float:
        return float(sum(float(w[:1024].sum()) for w in self.weights)) + float(data or 0)


def answer(payload: Dict[str, Any]) -> None:
    payload.setdefault("rss", memory.rss_bytes())
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    logging.basicConfig(level=os.environ.get("WORKER_LOG", "INFO"), stream=sys.stderr, format="%(asctime)s worker %(process)d %(threadName)s: %(message)s")
    aggressive_env = os.environ.get("WORKER_AGGRESSIVE", "")
    aggressive = None if aggressive_env == "" else aggressive_env == "1"
    mm = modelpool.get_memory_manager(aggressive_cleanup=aggressive)
    # warm numpy up so the baseline includes it
    np.ones(1024).sum()
    held: Dict[str, contextlib.ExitStack] = {}
    proxies: Dict[str, Any] = {}
    answer({"ready": True, "mode": mm.mode, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request["op"]
        name = request.get("name")
        try:
            if op == "register":
                mib = float(request.get("mib", 1))
                fail = bool(request.get("fail_loader"))

                def loader(name: str = name, mib: float = mib, fail: bool = fail) -> Model:
                    model = Model(name, mib)
                    if fail:
                        raise RuntimeError(f"loader of {name} failed after allocating {mib} MiB")
                    return model

                mm.register_model_loader(name, loader)
                answer({"ok": True})
            elif op == "acquire":
                stack = contextlib.ExitStack()
                proxies[name] = stack.enter_context(mm.load_model(name))
                held[name] = stack
                answer({"ok": True, "value": proxies[name].process(0)})
            elif op == "release":
                held.pop(name).close()
                answer({"ok": True, "loaded": list(mm.loaded_models)})
            elif op == "use_after":
                try:
                    proxies[name].process(0)
                    answer({"ok": True, "error": None})
                except modelpool.ModelUnloadedError as error:
                    answer({"ok": True, "error": str(error)})
            elif op == "fail":
                try:
                    with mm.load_model(name) as model:
                        model.process("not a number")
                except Exception as error:
                    answer({"ok": True, "error": type(error).__name__, "loaded": list(mm.loaded_models), "rss_in_except": memory.rss_bytes()})
                else:
                    answer({"ok": False})
            elif op == "state":
                answer({"ok": True, "loaded": list(mm.loaded_models), "session": mm.session, "mode": mm.mode,
                        "sessions_opened": getattr(mm._coordinator, "sessions_opened", 0)})
            elif op == "stats":
                answer({"ok": True, "stats": {k: v for k, v in mm.get_memory_stats().items() if k != "sidecar"}})
            elif op == "check":
                answer({"ok": True, "available": mm.check_memory_available(required_vram_gb=request.get("vram_gb", 0.0), required_ram_gb=request.get("ram_gb", 0.0))})
            elif op == "unload_all":
                mm.unload_all_models()
                answer({"ok": True, "loaded": list(mm.loaded_models)})
            elif op == "force_cleanup":
                mm.force_cleanup()
                answer({"ok": True, "loaded": list(mm.loaded_models)})
            elif op == "quit":
                for stack in held.values():
                    stack.close()
                answer({"ok": True})
                return
            else:
                answer({"ok": False, "error": "bad_op", "message": op})
        except Exception as error:
            answer({
                "ok": False,
                "error": type(error).__name__,
                "message": str(error),
                "reason": getattr(error, "reason", None),
                "trace": traceback.format_exc(),
            })


if __name__ == "__main__":
    main()
