"""One simulated GPU shared by processes through files: ``$FAKE_GPU_DIR/proc-<pid>`` holds a
process's device bytes; ``unloads.jsonl`` records the fake SDK's unloads for the fake sidecar."""

from __future__ import annotations

import json
import os
from typing import Dict

MIB = 1024**2
GIB = 1024**3
TOTAL = 80 * GIB
CONTEXT = 512 * MIB


def _dir() -> str:
    return os.environ["FAKE_GPU_DIR"]


def set_usage(pid: int, nbytes: int) -> None:
    path = os.path.join(_dir(), f"proc-{pid}")
    with open(path + ".tmp", "w") as handle:
        handle.write(str(int(nbytes)))
    os.replace(path + ".tmp", path)


def usage() -> Dict[int, int]:
    out = {}
    for name in os.listdir(_dir()):
        if not name.startswith("proc-") or name.endswith(".tmp"):
            continue
        pid = int(name[5:])
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            continue
        try:
            with open(os.path.join(_dir(), name)) as handle:
                out[pid] = int(handle.read() or 0)
        except (OSError, ValueError):
            continue
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def used() -> int:
    return sum(usage().values())


def record(kind: str, **fields: object) -> None:
    with open(os.path.join(_dir(), "events.jsonl"), "a") as handle:
        handle.write(json.dumps(dict(fields, kind=kind)) + "\n")


def events() -> list:
    try:
        with open(os.path.join(_dir(), "events.jsonl")) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except OSError:
        return []
