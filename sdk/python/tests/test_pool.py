"""Pool files as local mode reads them: quantities, durations, the built-in YAML subset reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpool.pool import (
    Pool,
    PoolFileError,
    load_pool_file,
    parse_duration,
    parse_quantity,
    parse_simple_yaml,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples" / "pools").glob("*.yaml"))


@pytest.mark.parametrize(
    "text,expected",
    [("12Gi", 12 * 1024**3), ("700Mi", 700 * 1024**2), ("1.5G", 1_500_000_000), ("512", 512), ("0.5Ki", 512), ("1.0001k", 1001), (64, 64)],
)
def test_quantities_match_the_crd_language(text, expected):
    """Regression: local mode must size models exactly as the sidecar does (rounded up)."""
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["12GB", "-1Gi", "1e3", "Gi", "", True])
def test_bad_quantities_name_the_field(bad):
    with pytest.raises(PoolFileError, match="spec.limits.ram"):
        parse_quantity(bad, "spec.limits.ram")


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("60s", 60), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5), ("0", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_bad_duration():
    with pytest.raises(PoolFileError, match="idleTTL"):
        parse_duration("5 minutes", "spec.policy.idleTTL")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_builtin_reader_agrees_with_pyyaml_on_the_example_pools(path):
    """Without PyYAML the SDK falls back to its own reader: it must read our pools the same."""
    yaml = pytest.importorskip("yaml")
    text = path.read_text()
    assert parse_simple_yaml(text) == yaml.safe_load(text)


def test_builtin_reader_flow_collections_quotes_and_comments():
    yaml = pytest.importorskip("yaml")
    text = (
        "a: {x: 1, y: [1, 2, \"q: r\"]}  # comment\n"
        "b:\n- 1\n- k: v\n  j: 'it''s'\n  l:\n    - z\n"
        "c: \"#not a comment\"\nd: ~\ne: true\nf: 1.5\n"
        "models:\n  - {name: t2v, vram: 12Gi, ram: 2Gi, priority: 100}\n"
    )
    assert parse_simple_yaml(text) == yaml.safe_load(text)


def test_cogvideo_pool():
    pool = load_pool_file(str(next(p for p in EXAMPLES if p.name == "cogvideo.yaml")))
    assert pool.mode == "Aggressive"
    assert pool.limit_ram_bytes == 16 * 1024**3 and pool.limit_vram_bytes == 20 * 1024**3
    assert list(pool.models) == ["t2v", "upscale", "frame_interpolation"]
    assert pool.models["upscale"].ram_bytes == 12 * 1024**3
    assert pool.acquire_timeout_s == 60


def test_json_pool_file(tmp_path):
    doc = {"apiVersion": "modelpool.io/v1alpha1", "kind": "ModelPool", "metadata": {"name": "j"},
           "spec": {"limits": {"ram": "1Gi"}, "policy": {"mode": "Cache", "idleTTL": "2m"}, "models": [{"name": "m", "ram": "100Mi", "pinned": True}]}}
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(doc))
    pool = load_pool_file(str(path))
    assert pool.mode == "Cache" and pool.idle_ttl_s == 120 and pool.models["m"].pinned


def test_invalid_pool_names_the_field():
    with pytest.raises(PoolFileError, match=r"spec.models\[1\].ram"):
        Pool.from_manifest({"kind": "ModelPool", "spec": {"models": [{"name": "a"}, {"name": "b", "ram": "lots"}]}})
    with pytest.raises(PoolFileError, match="spec.policy.mode"):
        Pool.from_manifest({"kind": "ModelPool", "spec": {"policy": {"mode": "Lazy"}, "models": [{"name": "a"}]}})
