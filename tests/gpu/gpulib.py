"""Pure logic of the GPU check (``tests/gpu/run.sh``): parsing what nvidia-smi and the sidecar
print, matching processes, the checks' arithmetic and the JSON summary. No I/O on the GPU here,
so ``python -m pytest tests/gpu`` tests all of it on any machine.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

MIB = 1024**2
GIB = 1024**3

#: Exit codes of run.sh / run_gpu.py.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_SETUP = 2  # a binary, the SDK or torch is missing, or a process did not start
EXIT_NO_GPU = 77  # no GPU on this machine: the check was skipped (automake/ctest convention)

#: The four checks the issue asks for, plus the reference host's own; all must pass.
CHECK_NAMES = (
    "process_vram_agrees",  # sidecar's per-process VRAM vs nvidia-smi, within 2 %
    "unload_returns_to_baseline",  # app VRAM back to its baseline after an unload, torch cache empty
    "pressure_evicts_idle",  # other tenant's pressure -> idle models evicted, tenant allocates
    "leased_model_kept",  # the model with a live lease is never evicted
    "candle_host_frees_vram",  # the reference host's unload gives its VRAM back
    "unload_returns_99_percent",  # every in-process unload gives back >= 99 % of the model's VRAM
    "torch_fraction_refuses",  # the SDK's per-process fraction makes real torch refuse past the ceiling
    "exit_reclaims_vram",  # an app killed while holding a model: NVML and the sidecar see it all back
    "h2d_load_path_vs_raw",  # the reference host's pinned load path >= 0.8 of a raw pinned copy
)

#: Below this many samples a "p99" is the sample maximum, and is labelled so.
P99_MIN_SAMPLES = 100


# --- parsing -----------------------------------------------------------------------------------

_UNITS = {"b": 1, "kib": 1024, "mib": MIB, "gib": GIB, "kb": 1000, "mb": 10**6, "gb": 10**9}


def parse_size(text: str, default_unit: str = "MiB") -> Optional[int]:
    """``"4567 MiB"`` -> bytes; ``"[N/A]"``, ``"[Not Supported]"`` or garbage -> None."""
    text = text.strip()
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
    if not match:
        return None
    unit = (match.group(2) or default_unit).lower()
    if unit not in _UNITS:
        return None
    return int(round(float(match.group(1)) * _UNITS[unit]))


def parse_compute_apps(csv_text: str) -> Dict[int, Optional[int]]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv`` -> {pid: bytes or None}.

    Accepts the header line or not, ``nounits`` or not; "No running processes found" -> {}.
    """
    apps: Dict[int, Optional[int]] = {}
    for line in csv_text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        apps[int(parts[0])] = parse_size(parts[1])
    return apps


def parse_gpu_query(csv_text: str) -> List[Dict[str, Any]]:
    """``nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,driver_version
    --format=csv,noheader,nounits`` -> one dict per GPU (sizes in bytes)."""
    gpus = []
    for line in csv_text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 5 or not parts[0].isdigit():
            continue
        gpus.append(
            {
                "index": int(parts[0]),
                "name": parts[1],
                "uuid": parts[2],
                "total_bytes": parse_size(parts[3]),
                "used_bytes": parse_size(parts[4]),
                "driver": parts[5] if len(parts) > 5 else None,
            }
        )
    return gpus


_SAMPLE = re.compile(
    r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample."""

    name: str
    labels: Tuple[Tuple[str, str], ...]
    value: float

    def label(self, key: str) -> Optional[str]:
        return dict(self.labels).get(key)


def parse_prometheus(text: str) -> List[Sample]:
    """The Prometheus text format -> samples (comments and malformed lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = []
        raw = match.group("labels") or ""
        position = 0
        while position < len(raw):
            label = _LABEL.match(raw, position)
            if not label:
                break
            value = label.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            labels.append((label.group(1), value))
            position = label.end()
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        samples.append(Sample(match.group("name"), tuple(sorted(labels)), value))
    return samples


def metric(samples: Iterable[Sample], name: str, **labels: str) -> Optional[float]:
    """The sum of ``name``'s samples whose labels include ``labels`` (None when there is none)."""
    total = None
    for sample in samples:
        if sample.name != name:
            continue
        have = dict(sample.labels)
        if all(have.get(key) == value for key, value in labels.items()):
            total = (total or 0.0) + sample.value
    return total


def metrics_digest(samples: Sequence[Sample]) -> Dict[str, Any]:
    """The sidecar metrics the summary shows side by side with NVML (by name, then labels)."""
    keep = (
        "modelpool_gpu_up",
        "modelpool_vram_total_bytes",
        "modelpool_vram_used_bytes",
        "modelpool_pool_bytes",
        "modelpool_model_loaded",
        "modelpool_model_bytes",
        "modelpool_model_leases",
        "modelpool_unloads_total",
        "modelpool_loads_total",
        "modelpool_memory_not_reclaimed_total",
        "modelpool_reclaim_duration_seconds_sum",
        "modelpool_reclaim_duration_seconds_count",
        "modelpool_sessions",
    )
    digest: Dict[str, Any] = {}
    for sample in samples:
        if sample.name in keep or ("process" in sample.name and "vram" in sample.name):
            key = sample.name
            if sample.labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sample.labels) + "}"
            digest[key] = sample.value
    return digest


# --- which NVML process is which ----------------------------------------------------------------


def parse_nspids(status_text: str) -> List[int]:
    """The ``NSpid:`` line of ``/proc/PID/status`` (outermost visible namespace first)."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            return [int(part) for part in line.split()[1:] if part.isdigit()]
    return []


def attribute_new_pid(before: Iterable[int], after: Iterable[int], known: Iterable[int] = ()) -> Optional[int]:
    """The one NVML pid that appeared between ``before`` and ``after`` and is not already
    attributed to another process (``known``); None when zero or several appeared."""
    new = set(after) - set(before) - set(known)
    return next(iter(new)) if len(new) == 1 else None


def resolve_nvml_pid(
    local_pid: int,
    nvml_pids: Iterable[int],
    nspids: Sequence[int] = (),
    appeared: Optional[int] = None,
) -> Tuple[Optional[int], str]:
    """How NVML names ``local_pid``: itself (same pid namespace), one of its ``NSpid`` ids, or
    the pid that appeared when it initialised CUDA. Returns (pid, how) or (None, why not)."""
    present = set(nvml_pids)
    if local_pid in present:
        return local_pid, "same pid"
    for other in nspids:
        if other in present:
            return other, "NSpid"
    if appeared is not None and appeared in present:
        return appeared, "appeared at CUDA init"
    return None, f"pid {local_pid} not among NVML's processes {sorted(present)}"


# --- the sidecar's per-process figure -----------------------------------------------------------

_VRAM_KEYS = ("process_vram_bytes", "vram_bytes", "vram_used_bytes", "gpu_memory_bytes")


def _number(value: Any) -> Optional[int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def _vram_of(entry: Mapping[str, Any]) -> Optional[Tuple[int, str]]:
    """A per-process VRAM figure in a session/process entry and the key path it came from:
    the sidecar's own measurement first (top level, ``measured``, ``memory``, ``vram``), the
    app's heartbeat ``readings`` (relayed, not measured by the sidecar) last."""
    for key in _VRAM_KEYS:
        if _number(entry.get(key)) is not None:
            return _number(entry.get(key)), key  # type: ignore[return-value]
    for nested in ("measured", "memory", "vram", "readings"):
        inner = entry.get(nested)
        if not isinstance(inner, Mapping):
            continue
        for key in _VRAM_KEYS + ("vram",):
            if _number(inner.get(key)) is not None:
                label = f"{nested}.{key}"
                if nested == "readings":
                    label += f" (app-reported{', ' + str(inner['source']) if inner.get('source') else ''})"
                return _number(inner.get(key)), label  # type: ignore[return-value]
    return None


def sidecar_process_vram(
    state: Optional[Mapping[str, Any]], samples: Sequence[Sample], pid: int
) -> Tuple[Optional[int], str]:
    """The VRAM the sidecar reports for process ``pid``: from ``GET /v1/state`` (a
    ``sessions`` or ``processes`` entry with that ``pid``; its own measurement preferred over
    the app's relayed heartbeat readings) or a ``/metrics`` gauge whose name says process and
    VRAM and whose labels carry the pid. Returns (bytes, where) or (None, what was looked at)."""
    if state:
        for key in ("sessions", "processes"):
            entries = state.get(key)
            if isinstance(entries, Mapping):
                entries = [dict(value, session=name) for name, value in entries.items() if isinstance(value, Mapping)]
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if isinstance(entry, Mapping) and entry.get("pid") == pid:
                    found = _vram_of(entry)
                    if found is not None:
                        source = entry.get("vram_source") or entry.get("source")
                        where = f"/v1/state {key}[pid={pid}].{found[1]}" + (f" ({source})" if source else "")
                        return found[0], where
    for sample in samples:
        if "process" in sample.name and "vram" in sample.name and sample.label("pid") == str(pid):
            return int(sample.value), f"/metrics {sample.name}{{pid={pid}}}"
    return None, (
        f"no per-process VRAM for pid {pid}: looked for /v1/state sessions[]/processes[] entries "
        f"with pid and one of {list(_VRAM_KEYS)} (top level, measured, readings), and /metrics "
        f"gauges named *process*vram* with a pid label"
    )


def state_models(state: Optional[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``GET /v1/state``'s ``models`` list -> {model: entry} (the first entry per model)."""
    out: Dict[str, Dict[str, Any]] = {}
    for entry in (state or {}).get("models") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
            out.setdefault(entry["model"], dict(entry))
    return out


# --- the checks' arithmetic ---------------------------------------------------------------------


def within_percent(a: float, b: float, percent: float = 2.0, slack_bytes: int = MIB) -> bool:
    """``a`` and ``b`` differ by at most ``percent`` % of the larger (and at least
    ``slack_bytes`` are tolerated: nvidia-smi prints whole MiB)."""
    return abs(a - b) <= max(percent / 100.0 * max(abs(a), abs(b)), slack_bytes)


def percent_diff(a: float, b: float) -> Optional[float]:
    """``|a - b|`` as a percentage of the larger; None when both are 0."""
    top = max(abs(a), abs(b))
    return None if top == 0 else abs(a - b) * 100.0 / top


def baseline_tolerance(model_bytes: int) -> int:
    """How far above its baseline an app may stay after unloading a model of ``model_bytes``
    and still count as back: 64 MiB or 1 % of the model, whichever is larger (allocator
    bookkeeping, cuBLAS workspaces)."""
    return max(64 * MIB, model_bytes // 100)


def first_at_or_below(
    samples: Sequence[Tuple[float, Optional[int]]], since: float, limit: int
) -> Optional[float]:
    """The time of the first ``(t, bytes)`` sample at or after ``since`` whose bytes are at or
    below ``limit`` (None when none is)."""
    for t, value in samples:
        if t >= since and value is not None and value <= limit:
            return t
    return None


def reclaim_ms(samples: Sequence[Tuple[float, Optional[int]]], released_at: float, limit: int) -> Optional[float]:
    """Milliseconds from ``released_at`` until the samples first show the memory back
    (``<= limit``); 0 when it was already back at the release."""
    seen = first_at_or_below(samples, released_at, limit)
    return None if seen is None else max(0.0, (seen - released_at) * 1000.0)


def pressure_sizes(total: int, used: int, pressure_percent: float, margin_percent: float, model_bytes: int) -> Tuple[int, int]:
    """The other tenant's two allocations: ``first`` takes device use ``margin_percent`` above
    the sidecar's pressure threshold; ``second`` is sized so that it only fits once at least
    one idle model (``model_bytes``) has been evicted: half a model more than what is free
    after the first. Returns (first, second) in bytes, rounded to 2 MiB."""
    target = int(total * (pressure_percent + margin_percent) / 100.0)
    first = max(0, target - used)
    free_after = total - used - first
    second = free_after + model_bytes // 2
    two_mib = 2 * MIB
    return (first // two_mib) * two_mib, -(-second // two_mib) * two_mib


def median(values: Sequence[float]) -> Optional[float]:
    values = sorted(v for v in values if v is not None and not math.isnan(v))
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2.0


# --- checks and the summary ---------------------------------------------------------------------


@dataclass
class Check:
    """One PASS/FAIL line."""

    name: str
    ok: bool
    detail: str
    values: Dict[str, Any] = field(default_factory=dict)
    #: Not run for a reason the machine has, not the code (e.g. vLLM not installed): never a
    #: PASS (``ok`` is False), and not a failure of the run either.
    skipped: bool = False

    def status(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"

    def line(self) -> str:
        return f"{self.status()} {self.name}: {self.detail}"


def not_run(name: str, why: str) -> Check:
    """A check that could not run counts as failed."""
    return Check(name, False, f"not run: {why}")


def skip(name: str, why: str) -> Check:
    """An optional check this machine cannot run (reported SKIP with why; never PASS)."""
    return Check(name, False, f"skipped: {why}", skipped=True)


def check_agreement(sidecar_bytes: Optional[int], smi_bytes: Optional[int], where: str, percent: float = 2.0) -> Check:
    name = "process_vram_agrees"
    values = {"sidecar_bytes": sidecar_bytes, "nvidia_smi_bytes": smi_bytes, "sidecar_source": where, "tolerance_percent": percent}
    if sidecar_bytes is None:
        return Check(name, False, f"sidecar reports no per-process VRAM ({where})", values)
    if smi_bytes is None:
        return Check(name, False, "nvidia-smi shows no memory for the app's process", values)
    diff = percent_diff(sidecar_bytes, smi_bytes)
    values["diff_percent"] = diff
    ok = within_percent(sidecar_bytes, smi_bytes, percent)
    detail = (
        f"sidecar {sidecar_bytes / MIB:.0f} MiB ({where}) vs nvidia-smi {smi_bytes / MIB:.0f} MiB: "
        f"{diff or 0.0:.2f} % {'<=' if ok else '>'} {percent} %"
    )
    return Check(name, ok, detail, values)


def check_baseline(
    baseline: Optional[int],
    after: Optional[int],
    model_bytes: int,
    reserved_after: Optional[int],
    reclaim: Optional[float],
) -> Check:
    name = "unload_returns_to_baseline"
    tolerance = baseline_tolerance(model_bytes)
    values = {
        "baseline_bytes": baseline,
        "after_unload_bytes": after,
        "tolerance_bytes": tolerance,
        "torch_reserved_after_bytes": reserved_after,
        "vram_reclaim_ms": reclaim,
    }
    if baseline is None or after is None:
        return Check(name, False, "no NVML reading of the app's process before or after the unload", values)
    problems = []
    if after > baseline + tolerance:
        problems.append(f"{(after - baseline) / MIB:.0f} MiB above baseline (tolerance {tolerance / MIB:.0f} MiB)")
    if reserved_after:
        problems.append(f"torch still reserves {reserved_after / MIB:.0f} MiB (cache not emptied)")
    if reclaim is None:
        problems.append("NVML never showed the memory back")
    detail = (
        f"app {after / MIB:.0f} MiB after unload vs baseline {baseline / MIB:.0f} MiB; "
        f"vram_reclaim_ms={'n/a' if reclaim is None else f'{reclaim:.1f}'}"
    )
    if problems:
        detail += "; " + "; ".join(problems)
    return Check(name, not problems, detail, values)


def check_pressure(
    evicted: Sequence[str],
    idle_models: Sequence[str],
    tenant_ok: bool,
    tenant_detail: str,
    unload_reasons: Mapping[str, float],
) -> Check:
    name = "pressure_evicts_idle"
    values = {"evicted": list(evicted), "idle_before": list(idle_models), "tenant_allocated": tenant_ok, "unloads_by_reason": dict(unload_reasons)}
    problems = []
    if not any(model in idle_models for model in evicted):
        problems.append(f"no idle model was evicted (idle: {list(idle_models)})")
    if not tenant_ok:
        problems.append(f"the other tenant's allocation did not succeed: {tenant_detail}")
    detail = f"evicted {list(evicted) or 'nothing'} of idle {list(idle_models)}; tenant: {tenant_detail}"
    if problems:
        detail += "; " + "; ".join(problems)
    return Check(name, not problems, detail, values)


def check_leased(leased: Sequence[str], evicted: Sequence[str], still_loaded: Mapping[str, bool], usable: Mapping[str, bool]) -> Check:
    name = "leased_model_kept"
    lost = [model for model in leased if model in evicted or not still_loaded.get(model, False) or not usable.get(model, False)]
    values = {"leased": list(leased), "evicted": list(evicted), "still_loaded": dict(still_loaded), "usable": dict(usable)}
    if not leased:
        return Check(name, False, "no model held a lease during the pressure phase", values)
    if lost:
        return Check(name, False, f"leased model(s) {lost} were evicted or became unusable", values)
    return Check(name, True, f"leased {list(leased)} stayed loaded and usable through the pressure", values)


def check_candle_host(loaded_vram: Optional[int], process_during: Optional[int], process_after: Optional[int], process_before: Optional[int]) -> Check:
    name = "candle_host_frees_vram"
    values = {"reported_vram_bytes": loaded_vram, "process_before_bytes": process_before, "process_loaded_bytes": process_during, "process_after_bytes": process_after}
    if None in (loaded_vram, process_during, process_after, process_before):
        return Check(name, False, "missing a reading (see values)", values)
    assert loaded_vram is not None and process_during is not None and process_after is not None and process_before is not None
    problems = []
    grew = process_during - process_before
    if not within_percent(grew, loaded_vram, 2.0, slack_bytes=4 * MIB):
        problems.append(f"NVML saw {grew / MIB:.0f} MiB added, the host reported {loaded_vram / MIB:.0f} MiB")
    if process_after > process_before + 16 * MIB:  # the driver may keep a little bookkeeping
        problems.append(f"{(process_after - process_before) / MIB:.0f} MiB still held after unload")
    detail = f"load +{grew / MIB:.0f} MiB (reported {loaded_vram / MIB:.0f} MiB), after unload {process_after / MIB:.0f} MiB vs {process_before / MIB:.0f} MiB before"
    if problems:
        detail += "; " + "; ".join(problems)
    return Check(name, not problems, detail, values)


def session_listed(state: Optional[Mapping[str, Any]], pid: int) -> bool:
    """Whether the sidecar's ``/v1/state`` still lists a session (or a model) of ``pid``."""
    if not isinstance(state, Mapping):
        return True  # no answer: cannot tell it is gone
    for key in ("sessions", "models"):
        for entry in state.get(key) or []:
            if isinstance(entry, Mapping) and entry.get("pid") == pid:
                return True
    return False


def tail_latency(samples: Sequence[float]) -> Tuple[Optional[float], str]:
    """(p99, label): the 99th percentile when there are enough samples for one, else the
    maximum, labelled ``max of N`` so nobody reads a small sample's worst case as a p99."""
    values = sorted(float(v) for v in samples if v is not None)
    if not values:
        return None, "no samples"
    if len(values) < P99_MIN_SAMPLES:
        return values[-1], f"max of {len(values)}"
    index = min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)
    return values[index], f"p99 of {len(values)}"


def check_returned(releases: Sequence[Mapping[str, Any]], model_bytes: int, goal: float = 0.99) -> Check:
    """Each release: the app process's NVML bytes just before it and once stable after it; the
    bytes freed must be at least ``goal`` of the model's size."""
    name = "unload_returns_99_percent"
    fractions = []
    problems = []
    for release in releases:
        before, after = release.get("held_bytes"), release.get("after_bytes")
        if before is None or after is None:
            problems.append(f"{release.get('model')}: no NVML reading before or after the release")
            continue
        fraction = (before - after) / model_bytes
        fractions.append(fraction)
        if fraction < goal:
            problems.append(f"{release.get('model')}: {fraction:.4f} of {model_bytes / MIB:.0f} MiB returned")
    values = {"releases": list(releases), "model_bytes": model_bytes, "goal": goal, "min_fraction": min(fractions) if fractions else None}
    if not releases:
        return Check(name, False, "no release was measured", values)
    worst = min(fractions) if fractions else None
    detail = f"{len(releases)} releases, smallest returned fraction {'n/a' if worst is None else f'{worst:.4f}'} (goal >= {goal})"
    if problems:
        detail += "; " + "; ".join(problems[:5])
    return Check(name, not problems, detail, values)


def check_fraction(cap_bytes: Optional[int], over: Mapping[str, Any], under: Mapping[str, Any], device_free: Optional[int]) -> Check:
    """Real torch under the SDK's ``set_per_process_memory_fraction``: an allocation past the
    pool's ceiling must fail with an out-of-memory error while the device itself had room, and
    one below it must succeed."""
    name = "torch_fraction_refuses"
    values = {"cap_bytes": cap_bytes, "over_ceiling": dict(over), "under_ceiling": dict(under), "device_free_bytes": device_free}
    problems = []
    if cap_bytes is None:
        problems.append("no cap known (the SDK set no fraction)")
    if over.get("ok"):
        problems.append(f"allocating {over.get('bytes', 0) / GIB:.1f} GiB past the ceiling succeeded")
    elif not over.get("oom"):
        problems.append(f"the over-ceiling allocation failed, but not with an out-of-memory error: {over.get('error')}")
    if not under.get("ok"):
        problems.append(f"allocating {under.get('bytes', 0) / GIB:.1f} GiB under the ceiling failed: {under.get('error')}")
    if device_free is not None and over.get("bytes") and device_free <= over["bytes"]:
        problems.append(f"the device had only {device_free / GIB:.1f} GiB free: the refusal proves nothing about the cap")
    detail = (
        f"cap {(cap_bytes or 0) / GIB:.1f} GiB: {over.get('bytes', 0) / GIB:.1f} GiB -> "
        f"{'allocated' if over.get('ok') else 'refused'}, {under.get('bytes', 0) / GIB:.1f} GiB -> "
        f"{'allocated' if under.get('ok') else 'refused'}; device free {(device_free or 0) / GIB:.1f} GiB"
    )
    if problems:
        detail += "; " + "; ".join(problems)
    return Check(name, not problems, detail, values)


def check_exit(exits: Sequence[Mapping[str, Any]], limit_ms: float = 10_000.0, goal: float = 0.99) -> Check:
    """An app killed (SIGKILL) while holding a model: NVML must stop listing its memory, the
    device must get back what the process held, and the sidecar must drop its session."""
    name = "exit_reclaims_vram"
    problems = []
    for index, entry in enumerate(exits):
        nvml_ms, sidecar_ms, fraction = entry.get("nvml_ms"), entry.get("sidecar_ms"), entry.get("device_freed_fraction")
        if nvml_ms is None or nvml_ms > limit_ms:
            problems.append(f"#{index}: NVML still listed the process after {limit_ms:.0f} ms")
        if sidecar_ms is None or sidecar_ms > limit_ms:
            problems.append(f"#{index}: the sidecar kept the dead session past {limit_ms:.0f} ms")
        if fraction is None or fraction < goal:
            problems.append(f"#{index}: the device got back {fraction if fraction is None else round(fraction, 4)} of the process's bytes")
    nvml_tail, nvml_label = tail_latency([e.get("nvml_ms") for e in exits])
    sidecar_tail, sidecar_label = tail_latency([e.get("sidecar_ms") for e in exits])
    values = {"exits": list(exits), "nvml_ms_tail": nvml_tail, "nvml_ms_tail_label": nvml_label,
              "sidecar_ms_tail": sidecar_tail, "sidecar_ms_tail_label": sidecar_label}  # fmt: skip
    if not exits:
        return Check(name, False, "no app was killed", values)
    detail = (
        f"{len(exits)} kills: NVML freed in {nvml_tail if nvml_tail is None else round(nvml_tail, 1)} ms ({nvml_label}), "
        f"sidecar dropped the session in {sidecar_tail if sidecar_tail is None else round(sidecar_tail, 1)} ms ({sidecar_label})"
    )
    if problems:
        detail += "; " + "; ".join(problems[:5])
    return Check(name, not problems, detail, values)


def check_h2d(bench: Mapping[str, Any], goal: float = 0.8) -> Check:
    name = "h2d_load_path_vs_raw"
    load, raw = bench.get("h2d_gb_per_s"), bench.get("raw_h2d_gb_per_s")
    values = {"h2d_gb_per_s": load, "raw_h2d_gb_per_s": raw, "goal": goal}
    if not load or not raw:
        return Check(name, False, "the benchmark gave no figure (see bench)", values)
    ratio = float(load) / float(raw)
    values["ratio"] = ratio
    return Check(name, ratio >= goal, f"load path {float(load):.1f} GB/s vs raw pinned {float(raw):.1f} GB/s: {ratio:.2f} (goal >= {goal})", values)


def exit_code(checks: Sequence[Check], setup_error: Optional[str] = None) -> int:
    if setup_error:
        return EXIT_SETUP
    return EXIT_OK if checks and all(check.ok or check.skipped for check in checks) else EXIT_CHECK_FAILED


def build_summary(
    checks: Sequence[Check],
    *,
    device: Optional[Mapping[str, Any]] = None,
    bench: Optional[Mapping[str, Any]] = None,
    reclaim_samples_ms: Sequence[float] = (),
    side_by_side: Sequence[Mapping[str, Any]] = (),
    extra: Optional[Mapping[str, Any]] = None,
    setup_error: Optional[str] = None,
    seconds: Optional[float] = None,
) -> Dict[str, Any]:
    """The JSON written to ``$OUT/summary.json``. Every check named in :data:`CHECK_NAMES`
    appears (a missing one as "not run"), so a reader never mistakes a skipped check for a
    passed one."""
    by_name = {check.name: check for check in checks}
    ordered = [by_name.pop(name, None) or not_run(name, setup_error or "the run stopped before it") for name in CHECK_NAMES]
    ordered += list(by_name.values())
    bench = dict(bench or {})
    summary: Dict[str, Any] = {
        "ok": exit_code(ordered, setup_error) == EXIT_OK,
        "exit_code": exit_code(ordered, setup_error),
        "setup_error": setup_error,
        "checks": [asdict(check) for check in ordered],
        "passed": [check.name for check in ordered if check.ok],
        "failed": [check.name for check in ordered if not check.ok and not check.skipped],
        "skipped_checks": [check.name for check in ordered if check.skipped],
        "vram_reclaim_ms": median(list(reclaim_samples_ms)),
        "vram_reclaim_ms_samples": list(reclaim_samples_ms),
        "vram_reclaim_ms_p99": tail_latency(reclaim_samples_ms)[0],
        "vram_reclaim_ms_p99_label": tail_latency(reclaim_samples_ms)[1],
        "h2d_gb_per_s": bench.get("h2d_gb_per_s"),
        "raw_h2d_gb_per_s": bench.get("raw_h2d_gb_per_s"),
        "bench": bench or None,
        "device": dict(device or {}) or None,
        "side_by_side": list(side_by_side),
        "seconds": seconds,
    }
    if extra:
        for key, value in extra.items():
            summary.setdefault(key, value)
    return summary


def dumps(summary: Mapping[str, Any]) -> str:
    """JSON with NaN/inf turned into null (strict JSON readers choke on them)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(summary), indent=2, sort_keys=False)


# --- model files --------------------------------------------------------------------------------


def safetensors_header(tensors: Sequence[Tuple[str, str, Sequence[int]]]) -> Tuple[bytes, int]:
    """The header of a safetensors file holding ``(name, dtype, shape)`` tensors laid out one
    after another; returns (header bytes including the 8-byte length, data bytes)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "F64": 8, "I32": 4}
    meta: Dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in tensors:
        count = 1
        for dim in shape:
            count *= int(dim)
        size = count * sizes[dtype]
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offset


def write_safetensors(path: str, tensors: Sequence[Tuple[str, str, Sequence[int]]], fill: Optional[bytes] = None) -> int:
    """Writes a safetensors file whose data is ``fill`` repeated (a sparse file of zeros when
    None: instant to write, and reads like any other file). Returns the data bytes."""
    header, data_bytes = safetensors_header(tensors)
    with open(path, "wb") as handle:
        handle.write(header)
        if fill:
            block = (fill * (MIB // len(fill) + 1))[:MIB]
            remaining = data_bytes
            while remaining > 0:
                handle.write(block[: min(MIB, remaining)])
                remaining -= MIB
        else:
            handle.truncate(len(header) + data_bytes)
    return data_bytes


def read_safetensors_header(path: str) -> Dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


# --- the real-vLLM phase ------------------------------------------------------------------------

#: The optional check of the vLLM phase: SKIP where vLLM is not installed, never PASS then.
VLLM_CHECK = "vllm_sleep_reclaims"

#: A tiny Llama for vLLM: random weights (``--load-format dummy``), ~230 MiB in BF16, so that a
#: level-1 sleep moves a measurable amount to host RAM; the KV cache (set by
#: ``--gpu-memory-utilization``) is most of its VRAM.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_weights_bytes(config: Mapping[str, Any], bytes_per_param: int = 2) -> int:
    """The weights of a Llama config, in bytes: embeddings and head, attention, MLP and norms."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = hidden // heads
    vocab = int(config["vocab_size"])
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    embed = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    attention = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    norms = 2 * hidden
    return (embed + layers * (attention + mlp + norms) + hidden) * bytes_per_param


def tiny_vocab(size: int) -> Dict[str, int]:
    """A word-level vocabulary of ``size`` tokens: ``<unk>``, ``<s>``, ``</s>``, then ``t3``..."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, size)})
    return vocab


def word_level_tokenizer(vocab: Mapping[str, int]) -> Dict[str, Any]:
    """``tokenizer.json`` (the ``tokenizers`` library's format) of a word-level tokenizer over
    ``vocab``, split on whitespace, its first three tokens special: written without importing
    ``tokenizers``."""
    specials = [name for name, _ in sorted(vocab.items(), key=lambda item: item[1])[:3]]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": vocab[name], "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for name in specials
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": dict(vocab), "unk_token": "<unk>"},
    }


def vllm_import_problem(returncode: int, stdout: str, stderr: str, python: str) -> Optional[str]:
    """Why ``python -c 'import vllm'`` says vLLM cannot be used here (None when it can)."""
    if returncode == 0:
        return None
    lines = [line.strip() for line in (stderr or stdout or "").splitlines() if line.strip()]
    why = lines[-1] if lines else f"exit {returncode}"
    return f"vllm is not importable by {python}: {why}"


def vllm_server_argv(python: str, model_dir: str, port: int, name: str, memory_fraction: float) -> List[str]:
    """The vLLM OpenAI server with sleep mode (its /sleep, /wake_up and /is_sleeping need
    ``VLLM_SERVER_DEV_MODE=1`` in its environment too), random weights, no CUDA graphs."""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir,
        "--served-model-name", name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--load-format", "dummy",
        "--enable-sleep-mode",
        "--enforce-eager",
        "--gpu-memory-utilization", f"{memory_fraction:.2f}",
        "--max-model-len", "512",
        "--max-num-seqs", "8",
        "--dtype", "bfloat16",
    ]  # fmt: skip


def vllm_pool_yaml(name: str, url: str, process_match: str, level: int, vram_bytes: int) -> str:
    """A one-model ``Vllm`` pool (no ``servers``: its server is ``url``), Aggressive, so that a
    release puts the model to sleep at ``level`` at once."""
    return (
        "apiVersion: modelpool.io/v1alpha1\n"
        "kind: ModelPool\n"
        f"metadata: {{name: gpu-vllm-l{level}}}\n"
        "spec:\n"
        f"  driver: {{kind: Vllm, url: '{url}', sleepLevel: {level}, processMatch: '{process_match}'}}\n"
        "  policy: {mode: Aggressive, acquireTimeout: 120s, pressure: {vramPercent: 100, ramPercent: 100}}\n"
        "  models:\n"
        f"    - {{name: {name}, vram: {max(1, vram_bytes // MIB)}Mi}}\n"
    )


def check_vllm_sleep(runs: Sequence[Mapping[str, Any]], base_bytes: Optional[int], weights_bytes: int) -> Check:
    """The real vLLM behind the sidecar's ``Vllm`` driver, one run per sleep level: a release
    through the sidecar put the server to sleep and an acquire woke it (``/is_sleeping``); the
    device's VRAM above ``base_bytes`` (before the server started) fell by at least half asleep
    and came back to at least 90 % awake; at level 1 the sidecar counted the model asleep in RAM
    (``server.asleep_ram_bytes``) and the server's process tree grew by at least half the
    weights (they went to host RAM)."""
    name = VLLM_CHECK
    values: Dict[str, Any] = {"runs": list(runs), "base_bytes": base_bytes, "weights_bytes": weights_bytes}
    if base_bytes is None or not runs:
        return Check(name, False, "no run, or no NVML reading before the server started", values)
    problems: List[str] = []
    parts: List[str] = []
    for run in runs:
        level = run.get("level")
        awake, asleep, woken = run.get("awake_bytes"), run.get("asleep_bytes"), run.get("woken_bytes")
        if not run.get("slept"):
            problems.append(f"level {level}: the server was not asleep after the sidecar's release")
        if not run.get("woke"):
            problems.append(f"level {level}: the server was not awake after the sidecar's acquire")
        if awake is None or asleep is None or woken is None:
            problems.append(f"level {level}: a device reading is missing")
            continue
        held = awake - base_bytes
        if held < 256 * MIB:
            problems.append(f"level {level}: the awake server holds only {held / MIB:.0f} MiB")
            continue
        freed = awake - asleep
        back = woken - base_bytes
        parts.append(f"level {level}: {held / MIB:.0f} MiB awake, {freed / MIB:.0f} MiB freed asleep, {back / MIB:.0f} MiB back awake")
        if freed < held / 2:
            problems.append(f"level {level}: asleep freed {freed / MIB:.0f} MiB of {held / MIB:.0f} MiB (< half)")
        if back < held * 0.9:
            problems.append(f"level {level}: woken holds {back / MIB:.0f} MiB of {held / MIB:.0f} MiB (< 90 %)")
        if level == 1:
            counted = run.get("sidecar_asleep_ram_bytes")
            if not counted:
                problems.append("level 1: the sidecar did not count the model asleep in RAM (server.asleep_ram_bytes)")
            grew = None
            if run.get("rss_awake_bytes") is not None and run.get("rss_asleep_bytes") is not None:
                grew = run["rss_asleep_bytes"] - run["rss_awake_bytes"]
            if grew is None or grew < weights_bytes / 2:
                shown = "no reading" if grew is None else f"{grew / MIB:.0f} MiB"
                problems.append(f"level 1: the server's RSS grew by {shown} asleep, less than half the weights ({weights_bytes / MIB:.0f} MiB)")
    detail = "; ".join(parts) or "no readings"
    if problems:
        detail += "; " + "; ".join(problems)
    return Check(name, not problems, detail, values)


def parse_ppid(stat_text: str) -> int:
    """The parent pid in a ``/proc/PID/stat`` line (the command may hold spaces and parens)."""
    return int(stat_text.rsplit(")", 1)[1].split()[1])


def descendants(root: int, parents: Mapping[int, int]) -> List[int]:
    """Every process under ``root`` (children first found, then theirs), ``root`` excluded."""
    children: Dict[int, List[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: List[int] = []
    queue = [root]
    while queue:
        for kid in sorted(children.get(queue.pop(0), [])):
            if kid not in found and kid != root:
                found.append(kid)
                queue.append(kid)
    return found
