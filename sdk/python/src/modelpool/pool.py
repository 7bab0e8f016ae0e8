"""A ModelPool manifest as the in-process (local) mode uses it: models, ceilings, policy.

``MODELPOOL_POOL=FILE`` points at the same manifest the sidecar's ``--pool`` reads. YAML is read
with PyYAML (the ``yaml`` extra: ``pip install 'modelpool[yaml]'``), JSON with the standard
library; without PyYAML a YAML file is refused with that advice. The pool files of
``crds/tests/pool-files/`` are read by both this module and the sidecar's reader, in the tests of
each, so that both accept the same files. The sidecar stays the authority on validation: this
module checks only what local mode needs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_FACTORS: Dict[Optional[str], int] = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class PoolFileError(ValueError):
    """A pool file that cannot be read or used; the message names the field."""


def parse_quantity(value: Any, field_name: str = "quantity") -> Optional[int]:
    """Bytes from a Kubernetes quantity (``12Gi``, ``700Mi``, ``1.5G``, ``512``), rounded up."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PoolFileError(f"{field_name}: {value!r} is not a quantity (e.g. 12Gi)")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(math.ceil(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise PoolFileError(f"{field_name}: {value!r} is not a quantity (e.g. 12Gi)")
    number: str = match.group(1)
    suffix: Optional[str] = match.group(2)
    if "." in number:
        whole, frac = number.split(".")
        scaled = int(whole + frac) * _FACTORS[suffix]
        denominator = int(10 ** len(frac))
        return -(-scaled // denominator)
    return int(number) * _FACTORS[suffix]


def parse_duration(value: Any, field_name: str = "duration") -> Optional[float]:
    """Seconds from a Go duration (``5m``, ``60s``, ``1h30m``, ``500ms``)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise PoolFileError(f"{field_name}: {value!r} is not a duration (e.g. 5m, 60s)")
    return total


@dataclass
class PoolModel:
    """One model of the pool, with its declared footprint."""

    name: str
    vram_bytes: Optional[int] = None
    ram_bytes: Optional[int] = None
    priority: int = 0
    pinned: bool = False
    load_seconds: Optional[float] = None

    @property
    def declared(self) -> bool:
        """Whether the pool declares its size (``vram`` or ``ram``)."""
        return self.vram_bytes is not None or self.ram_bytes is not None


UNSIZED_RULES = ("Alone", "Refuse")


@dataclass
class Pool:
    """What local mode enforces of a ModelPool."""

    name: str = "local"
    mode: str = "Aggressive"
    idle_ttl_s: float = 300.0
    eviction: str = "CostAware"
    pressure_vram_percent: float = 90.0
    pressure_ram_percent: float = 80.0
    acquire_timeout_s: float = 60.0
    limit_vram_bytes: Optional[int] = None
    limit_ram_bytes: Optional[int] = None
    baseline_vram_bytes: Optional[int] = None
    baseline_ram_bytes: Optional[int] = None
    models: Dict[str, PoolModel] = field(default_factory=dict)
    unsized_models: str = "Alone"

    @property
    def limits(self) -> Dict[str, Optional[int]]:
        return {"vram": self.limit_vram_bytes, "ram": self.limit_ram_bytes}

    def size_unknown(self, name: str, measured: bool) -> bool:
        """``spec.policy.unsizedModels`` applies: the model declares no size and no load of it was
        measured. (The sidecar also estimates a model from its ``source`` weights' headers; local
        mode does not read them, so such a model counts as unknown here until it is measured.)"""
        model = self.models.get(name)
        return model is not None and not model.declared and not measured

    def unsized_need(self) -> Dict[str, int]:
        """What a model of unknown size needs under ``Alone``: the whole ceiling (so it is loaded
        only with nothing else beside it), as the sidecar counts it."""
        return {"vram": self.limit_vram_bytes or 0, "ram": self.limit_ram_bytes or 0}

    def unsized_refusal(self, name: str) -> str:
        """The message of an ``unsized`` refusal (``unsizedModels: Refuse``), the sidecar's words."""
        return (
            f'model "{name}" has no known size (no vram or ram declared, no readable estimate of its '
            "weights, never measured) and the pool refuses such models (spec.policy.unsizedModels: "
            "Refuse); declare its vram/ram, or set unsizedModels: Alone to load it alone once and "
            "learn its size"
        )

    @classmethod
    def from_manifest(cls, doc: Any, origin: str = "pool") -> "Pool":
        """A pool from a parsed manifest (``apiVersion``, ``kind``, ``metadata``, ``spec``)."""
        if not isinstance(doc, dict):
            raise PoolFileError(f"{origin}: expected a ModelPool manifest (a mapping)")
        if doc.get("kind", "ModelPool") != "ModelPool":
            raise PoolFileError(f"{origin}: kind: {doc.get('kind')!r} is not \"ModelPool\"")
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise PoolFileError(f"{origin}: spec: missing")
        metadata = doc.get("metadata") or {}
        limits = spec.get("limits") or {}
        baseline = spec.get("baseline") or {}
        policy = spec.get("policy") or {}
        pressure = policy.get("pressure") or {}
        mode = policy.get("mode", "Aggressive")
        if mode not in ("Aggressive", "Cache"):
            raise PoolFileError(f"{origin}: spec.policy.mode: {mode!r} is not Aggressive or Cache")
        eviction = policy.get("eviction", "CostAware")
        if eviction not in ("Lru", "CostAware"):
            raise PoolFileError(f"{origin}: spec.policy.eviction: {eviction!r} is not Lru or CostAware")
        unsized = policy.get("unsizedModels", "Alone")
        if unsized not in UNSIZED_RULES:
            raise PoolFileError(f"{origin}: spec.policy.unsizedModels: {unsized!r} is not Alone or Refuse")
        pool = cls(
            name=str(metadata.get("name", "local")),
            unsized_models=unsized,
            mode=mode,
            idle_ttl_s=_or(parse_duration(policy.get("idleTTL"), "spec.policy.idleTTL"), 300.0),
            eviction=eviction,
            pressure_vram_percent=float(pressure.get("vramPercent", 90)),
            pressure_ram_percent=float(pressure.get("ramPercent", 80)),
            acquire_timeout_s=_or(
                parse_duration(policy.get("acquireTimeout"), "spec.policy.acquireTimeout"), 60.0
            ),
            limit_vram_bytes=parse_quantity(limits.get("vram"), "spec.limits.vram"),
            limit_ram_bytes=parse_quantity(limits.get("ram"), "spec.limits.ram"),
            baseline_vram_bytes=parse_quantity(baseline.get("vram"), "spec.baseline.vram"),
            baseline_ram_bytes=parse_quantity(baseline.get("ram"), "spec.baseline.ram"),
        )
        models = spec.get("models")
        if not isinstance(models, list) or not models:
            raise PoolFileError(f"{origin}: spec.models: a pool needs at least one model")
        for index, entry in enumerate(models):
            where = f"spec.models[{index}]"
            if not isinstance(entry, dict) or not entry.get("name"):
                raise PoolFileError(f"{origin}: {where}.name: missing")
            name = str(entry["name"])
            if name in pool.models:
                raise PoolFileError(f"{origin}: {where}.name: {name!r} is declared twice")
            load_seconds = entry.get("loadSeconds")
            pool.models[name] = PoolModel(
                name=name,
                vram_bytes=parse_quantity(entry.get("vram"), f"{where}.vram"),
                ram_bytes=parse_quantity(entry.get("ram"), f"{where}.ram"),
                priority=int(entry.get("priority", 0)),
                pinned=bool(entry.get("pinned", False)),
                load_seconds=None if load_seconds is None else float(load_seconds),
            )
        return pool

    @classmethod
    def from_session(cls, info: Dict[str, Any]) -> "Pool":
        """The pool as a sidecar describes it in its answer to ``POST /v1/sessions``."""
        limits = info.get("limits") or {}
        baseline = info.get("baseline") or {}
        pool = cls(
            name=str(info.get("name", "pool")),
            mode=str(info.get("mode", "Aggressive")),
            limit_vram_bytes=limits.get("vram_bytes"),
            limit_ram_bytes=limits.get("ram_bytes"),
            baseline_vram_bytes=baseline.get("vram_bytes") if isinstance(baseline, dict) else None,
            baseline_ram_bytes=baseline.get("ram_bytes") if isinstance(baseline, dict) else None,
        )
        for entry in info.get("models") or []:
            if isinstance(entry, dict) and entry.get("name"):
                pool.models[entry["name"]] = PoolModel(
                    name=entry["name"],
                    vram_bytes=entry.get("vram_bytes"),
                    ram_bytes=entry.get("ram_bytes"),
                    pinned=bool(entry.get("pinned", False)),
                    priority=int(entry.get("priority", 0) or 0),
                )
        return pool


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value


def load_pool_file(path: str) -> Pool:
    """Reads a pool manifest (YAML or JSON) from ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise PoolFileError(f"failed to read pool file {path}: {error}") from error
    return Pool.from_manifest(parse_document(text, path), path)


def parse_document(text: str, origin: str = "pool") -> Any:
    """A pool manifest's text: JSON, or YAML through PyYAML (``pip install 'modelpool[yaml]'``).

    The SDK has no YAML reader of its own: a second reader would accept a different language
    than the sidecar's (block scalars, anchors, ...). Without PyYAML a YAML file is refused
    with what to install; JSON needs nothing."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError as error:
            raise PoolFileError(f"{origin}: not valid JSON: {error}") from error
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise PoolFileError(
            f"{origin}: reading a YAML pool file needs PyYAML, which is not installed: "
            "pip install 'modelpool[yaml]' (or PyYAML), or give the pool as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PoolFileError(f"{origin}: not valid YAML: {error}") from error
