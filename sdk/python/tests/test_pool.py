"""Pool files as local mode reads them: quantities, durations, PyYAML or JSON, and the pool files
the sidecar's reader runs too (``crds/tests/pool-files/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpool.pool import (
    Pool,
    PoolFileError,
    load_pool_file,
    parse_duration,
    parse_document,
    parse_quantity,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples" / "pools").glob("*.yaml"))
CORPUS = REPO / "crds" / "tests" / "pool-files"


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


def _expected():
    return json.loads((CORPUS / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(_expected()), ids=str)
def test_reads_the_shared_pool_files_as_the_sidecar_does(name):
    """Catches the SDK reading a pool file differently from the sidecar (crds/tests/pool_files.rs
    checks the sidecar's reader against the same expectations)."""
    want = _expected()[name]
    pool = load_pool_file(str(CORPUS / name))
    assert pool.name == want["name"]
    assert pool.mode == want["mode"]
    assert {"vram_bytes": pool.limit_vram_bytes, "ram_bytes": pool.limit_ram_bytes} == want["limits"]
    assert list(pool.models) == want["models"]
    assert {n: m.vram_bytes for n, m in pool.models.items()} == want["model_vram_bytes"]


def test_every_corpus_file_has_expectations():
    assert sorted(p.name for p in CORPUS.glob("*.yaml")) == sorted(_expected())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_reads_the_example_pools(path):
    pool = load_pool_file(str(path))
    assert pool.models


def test_yaml_without_pyyaml_says_what_to_install(monkeypatch):
    """Catches a missing PyYAML turning into a parse error or a half-read pool."""
    import builtins

    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("No module named 'yaml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    with pytest.raises(PoolFileError, match=r"pool.yaml: reading a YAML pool file needs PyYAML.*modelpool\[yaml\]"):
        parse_document("kind: ModelPool\n", "pool.yaml")
    # JSON needs nothing
    assert parse_document('{"kind": "ModelPool"}', "pool.json") == {"kind": "ModelPool"}


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
