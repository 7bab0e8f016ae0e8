#!/usr/bin/env python3
"""Reads the rows `bench/device/proxy.sh` collected and writes summary.json: every cell with
issue 13's verdicts (>= 0.9 of direct throughput; <= 1 ms added p99, read as the median of the
per-slice differences, with where its 95 % interval lies).

    summarise.py OUT [SKIPPED_REASON...]
"""

import json
import pathlib
import sys

MIN_RATIO = 0.9
MAX_ADDED_P99_US = 1000.0

KEYS = (
    "kind",
    "clients",
    "work_us",
    "req_per_s",
    "direct_req_per_s",
    "ratio_to_direct",
    "p50_us",
    "direct_p50_us",
    "p99_us",
    "direct_p99_us",
    "added_p99_slice_median_us",
    "added_p99_slice_low_us",
    "added_p99_slice_high_us",
    "sidecar_cpu_us_per_request",
    "upstream_cpu_us_per_request",
)


def interval_verdict(low: float, high: float) -> str:
    """Where the 95 % interval of the added p99 lies against the 1 ms target."""
    if high <= MAX_ADDED_P99_US:
        return "below"
    if low > MAX_ADDED_P99_US:
        return "above"
    return "straddles"


def cells(out: pathlib.Path) -> list[dict]:
    found = []
    # In the order the runs were made (each file is written while its run goes on).
    for path in sorted(out.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number}: not a JSON row: {error}") from error
            if row.get("scenario") != "proxy":
                continue
            missing = [key for key in KEYS if key not in row]
            if missing:
                raise SystemExit(f"{path}:{number}: the row lacks {', '.join(missing)}")
            cell = {"run": path.stem, **{key: row[key] for key in KEYS}}
            cell["throughput_met"] = row["ratio_to_direct"] >= MIN_RATIO
            cell["p99_met"] = row["added_p99_slice_median_us"] <= MAX_ADDED_P99_US
            cell["p99_interval"] = interval_verdict(
                row["added_p99_slice_low_us"], row["added_p99_slice_high_us"]
            )
            found.append(cell)
    return found


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = pathlib.Path(sys.argv[1])
    skipped = sys.argv[2:]
    found = cells(out)
    machine = (out / "machine.txt").read_text() if (out / "machine.txt").exists() else ""
    cores_file = out / "sidecar-pinned.cores"
    pinned_cores = cores_file.read_text().split(":")[-1].strip() if cores_file.exists() else None
    summary = {
        "target": {"min_ratio_to_direct": MIN_RATIO, "max_added_p99_us": MAX_ADDED_P99_US},
        "machine": machine,
        "pinned_sidecar_cores": pinned_cores,
        "skipped": skipped,
        "cells": found,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for c in found:
        print(
            f"{c['run']:>14} {c['kind']:>6} clients {c['clients']:>2}: "
            f"ratio {c['ratio_to_direct']:.3f} ({'met' if c['throughput_met'] else 'NOT met'}), "
            f"added p99 {c['added_p99_slice_median_us'] / 1000:.2f} ms "
            f"[{c['added_p99_slice_low_us'] / 1000:.2f}, {c['added_p99_slice_high_us'] / 1000:.2f}] "
            f"({'met' if c['p99_met'] else 'NOT met'}, interval {c['p99_interval']}), "
            f"sidecar {c['sidecar_cpu_us_per_request']:.0f} µs CPU/req"
        )
    if not found:
        print(f"no proxy rows under {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
