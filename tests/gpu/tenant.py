"""Another tenant of the GPU: a plain PyTorch process outside the pool that needs VRAM.

It first allocates ``--first`` bytes (taking device use above the sidecar's pressure threshold),
then keeps trying to allocate ``--second`` bytes, which only fit once the sidecar has had idle
models evicted, until ``--timeout`` seconds pass. One JSON event per stdout line; it holds its
memory until a line arrives on stdin (or stdin closes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def emit(**event: Any) -> None:
    event.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--second", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=45.0)
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()

    import torch

    device = torch.device("cuda", args.device)
    torch.cuda.init()
    torch.zeros(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    emit(event="ready", pid=os.getpid(), free_bytes=int(free), total_bytes=int(total))

    first = torch.empty(args.first, dtype=torch.uint8, device=device) if args.first else None
    if first is not None:
        first.fill_(2)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(device)
    emit(event="pressure", first_bytes=args.first, free_bytes=int(free), used_percent=100.0 * (total - free) / total)

    started = time.monotonic()
    attempts = 0
    second = None
    last_error = ""
    while time.monotonic() - started < args.timeout:
        attempts += 1
        try:
            second = torch.empty(args.second, dtype=torch.uint8, device=device)
            second.fill_(3)
            torch.cuda.synchronize()
            break
        except torch.cuda.OutOfMemoryError as error:
            last_error = str(error).splitlines()[0]
            torch.cuda.empty_cache()
            time.sleep(0.05)
    waited = time.monotonic() - started
    free, total = torch.cuda.mem_get_info(device)
    if second is not None:
        emit(event="allocated", second_bytes=args.second, waited_ms=waited * 1000.0, attempts=attempts, free_bytes=int(free))
    else:
        emit(event="gave_up", second_bytes=args.second, waited_ms=waited * 1000.0, attempts=attempts, error=last_error)
    sys.stdin.readline()
    del first, second
    emit(event="bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
