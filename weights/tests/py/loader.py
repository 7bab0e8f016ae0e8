"""A real loader: reads every tensor of a model into memory with the format's own reference
package (gguf-py's GGUFReader, safetensors' numpy loader), and says how much anonymous memory
that took (RssAnon from /proc/self/status, before and after).

    python loader.py gguf FILE
    python loader.py safetensors FILE [FILE...]

Prints one JSON line: {"rss_anon_before", "rss_anon_after", "held_bytes", "tensors"}.
"""

import gc
import json
import sys


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main() -> None:
    fmt, files = sys.argv[1], sys.argv[2:]
    import numpy as np

    held = []
    if fmt == "gguf":
        from gguf import GGUFReader

        readers = [GGUFReader(f) for f in files]  # parses the header; data stays mapped
        gc.collect()
        before = rss_anon()
        for reader in readers:
            for t in reader.tensors:
                held.append(np.array(t.data, copy=True))
    elif fmt == "safetensors":
        from safetensors.numpy import load_file

        gc.collect()
        before = rss_anon()
        for f in files:
            held.extend(load_file(f).values())
    else:
        raise SystemExit(f"unknown format {fmt!r}")
    gc.collect()
    after = rss_anon()
    print(
        json.dumps(
            {
                "rss_anon_before": before,
                "rss_anon_after": after,
                "held_bytes": sum(a.nbytes for a in held),
                "tensors": len(held),
            }
        )
    )


if __name__ == "__main__":
    main()
