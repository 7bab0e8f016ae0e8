"""The seed's own examples run unchanged apart from the import, in local mode and with a sidecar."""

from __future__ import annotations

import json

import pytest

from conftest import APPS, MIB, pool_yaml, run_script

TOLERANCE = 0.10
SEED_POOL = pool_yaml(
    [{"name": "upscale", "ram": "200Mi"}, {"name": "frame_interpolation", "ram": "120Mi"}],
    name="cogvideo",
    ram="1Gi",
)


def check_report(out) -> dict:
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    baseline = report["baseline"]
    assert report["result_shape"] == [4, 64, 64]
    assert report["loaded_after_use"] == []
    assert report["use_after_block"] and "model 'upscale' was unloaded" in report["use_after_block"]
    assert report["error"] == "AttributeError"  # a str has no .reshape: the failure happens in the model
    assert report["loaded_after_error"] == [] and report["loaded_after_all"] == []
    for key in ("after_use", "in_except", "after_error", "after_all"):
        assert report[key] <= baseline * (1 + TOLERANCE), (
            f"{key}: RSS {report[key] / MIB:.1f} MiB vs baseline {baseline / MIB:.1f} MiB"
        )
    for key in ("ram_used_gb", "ram_total_gb", "ram_percent", "vram_allocated_gb", "vram_total_gb", "vram_percent"):
        assert key in report["stats_keys"]
    # the seed's log lines
    assert "Memory before upscale: RAM " in out.stderr
    assert "Loading model: upscale" in out.stderr
    assert "Model unloaded: upscale" in out.stderr
    assert "Starting operation: video_generation" in out.stderr
    assert "RAM: " in out.stdout and "VRAM: " in out.stdout
    return report


def test_seed_examples_local_mode():
    out = run_script(APPS / "seed_examples.py", {"MODELPOOL_SOCKET": "none"})
    report = check_report(out)
    assert report["mode"] == "local"
    assert out.stderr.count("local mode") == 1


@pytest.mark.sidecar
def test_seed_examples_with_the_sidecar(start_sidecar):
    sidecar = start_sidecar(SEED_POOL)
    out = run_script(APPS / "seed_examples.py", {"MODELPOOL_SOCKET": sidecar.socket})
    report = check_report(out)
    assert report["mode"] == "sidecar"
    assert "Connected to ModelPool sidecar" in out.stderr
    assert not sidecar.models()
