"""A ModelPool manifest as the in-process (local) mode uses it: models, ceilings, policy.

``MODELPOOL_POOL=FILE`` points at the same manifest the sidecar's ``--pool`` reads. The file is
parsed with PyYAML when it is installed; otherwise JSON is accepted, and failing that a small
built-in reader for the YAML subset pool manifests use (block mappings and lists, flow
``{a: b}`` / ``[a, b]`` collections, plain/quoted scalars, comments). Anchors, tags, multi-line
strings and multiple documents need PyYAML. The sidecar stays the authority on validation: this
module checks only what local mode needs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

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

    @property
    def limits(self) -> Dict[str, Optional[int]]:
        return {"vram": self.limit_vram_bytes, "ram": self.limit_ram_bytes}

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
        pool = cls(
            name=str(metadata.get("name", "local")),
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
    """YAML (PyYAML if installed, else the built-in subset reader) or JSON."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise PoolFileError(f"{origin}: not valid YAML: {error}") from error
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError as error:
            raise PoolFileError(f"{origin}: not valid JSON: {error}") from error
    return parse_simple_yaml(text, origin)


# --- the built-in YAML subset reader -------------------------------------------------------


def _strip_comment(line: str) -> str:
    quote: Optional[str] = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        return inner.replace("''", "'") if text[0] == "'" else json.loads(text)
    if text in ("~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", text):
        return float(text)
    return text


def _split_flow(text: str) -> List[str]:
    items, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    tail = text[start:]
    if tail.strip():
        items.append(tail)
    return items


def _split_key(text: str) -> Optional[Tuple[str, str]]:
    """``key: rest`` at the top level of ``text`` (not inside quotes or brackets)."""
    depth, quote = 0, None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == ":" and depth == 0 and (index + 1 == len(text) or text[index + 1] in " \t"):
            return str(_scalar(text[:index])), text[index + 1 :].strip()
    return None


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):
        out: Dict[str, Any] = {}
        for item in _split_flow(text[1:-1]):
            pair = _split_key(item.strip())
            if pair is None:
                raise PoolFileError(f"expected 'key: value' in {{...}}, found {item.strip()!r}")
            out[pair[0]] = _value(pair[1])
        return out
    if text.startswith("[") and text.endswith("]"):
        return [_value(item) for item in _split_flow(text[1:-1])]
    return _scalar(text)


def parse_simple_yaml(text: str, origin: str = "pool") -> Any:
    """Parses the YAML subset described in the module doc."""
    lines: List[Tuple[int, int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip() in ("---", "..."):
            continue
        stripped = _strip_comment(raw)
        if stripped.strip():
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise PoolFileError(f"{origin}: line {number}: tabs are not allowed for indentation")
            lines.append((number, len(stripped) - len(stripped.lstrip(" ")), stripped.strip()))
    if not lines:
        return None
    position = [0]

    def block(indent: int) -> Any:
        number, current, content = lines[position[0]]
        if content.startswith("- ") or content == "-":
            return sequence(current)
        return mapping(current)

    def sequence(indent: int) -> List[Any]:
        items: List[Any] = []
        while position[0] < len(lines):
            number, current, content = lines[position[0]]
            if current < indent or not (content.startswith("- ") or content == "-"):
                if current > indent:
                    raise PoolFileError(f"{origin}: line {number}: bad indentation")
                break
            if current > indent:
                raise PoolFileError(f"{origin}: line {number}: bad indentation")
            rest = content[1:].strip()
            if not rest:
                position[0] += 1
                items.append(block(indent + 1) if position[0] < len(lines) and lines[position[0]][1] > indent else None)
                continue
            pair = _split_key(rest) if not rest.startswith(("{", "[")) else None
            if pair is None:
                items.append(_value(rest))
                position[0] += 1
                continue
            # "- key: value" opens a mapping whose keys sit at the column after "- "
            column = current + (len(content) - len(rest))
            lines[position[0]] = (number, column, rest)
            items.append(mapping(column))
        return items

    def mapping(indent: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        while position[0] < len(lines):
            number, current, content = lines[position[0]]
            if current < indent:
                break
            if current > indent:
                raise PoolFileError(f"{origin}: line {number}: bad indentation")
            if content.startswith("- "):
                break
            pair = _split_key(content)
            if pair is None:
                raise PoolFileError(f"{origin}: line {number}: expected 'key: value', found {content!r}")
            key, rest = pair
            position[0] += 1
            if rest:
                out[key] = _value(rest)
            elif position[0] < len(lines) and (
                lines[position[0]][1] > indent
                or (lines[position[0]][1] == indent and lines[position[0]][2].startswith("- "))
            ):
                out[key] = block(lines[position[0]][1])
            else:
                out[key] = None
        return out

    result = block(lines[0][1])
    if position[0] < len(lines):
        number = lines[position[0]][0]
        raise PoolFileError(f"{origin}: line {number}: unexpected content")
    return result
