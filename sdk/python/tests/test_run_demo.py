"""``examples/pipeline/run_demo.sh`` as a user runs it: ``--help``, and a run with a prebuilt
sidecar (``MODELPOOL_SIDECAR_BIN``) on a machine without cargo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, sidecar_command

DEMO = REPO / "examples" / "pipeline" / "run_demo.sh"


def test_help_prints_clean_usage():
    """Catches ``--help`` printing the script's comments or code instead of a usage text."""
    done = subprocess.run(["bash", str(DEMO), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("Usage: examples/pipeline/run_demo.sh"), out
    for needle in ("--local", "--scale", "MODELPOOL_SIDECAR_BIN", "-h, --help"):
        assert needle in out, f"--help does not mention {needle}:\n{out}"
    assert "#" not in out and "set -euo" not in out and "$" not in out, out
    assert done.stderr == "", "--help must not build or install anything"


@pytest.mark.sidecar
def test_demo_runs_with_a_prebuilt_sidecar_without_cargo(tmp_path: Path):
    """Catches the demo insisting on cargo when the user has a prebuilt sidecar."""
    cmd = sidecar_command()
    if len(cmd) != 1:
        pytest.skip("MODELPOOL_SIDECAR_BIN is a script, not a binary")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    cargo = fake_bin / "cargo"
    cargo.write_text("#!/bin/sh\necho 'cargo must not be called with MODELPOOL_SIDECAR_BIN set' >&2\nexit 97\n")
    cargo.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env.get('PATH', '')}",
        MODELPOOL_SIDECAR_BIN=cmd[0],
        # the test's own virtualenv has the SDK and the demo's pinned numpy/safetensors
        MODELPOOL_DEMO_VENV=sys.prefix,
    )
    report = tmp_path / "report.json"
    done = subprocess.run(
        ["bash", str(DEMO), "--scale", "0.25", "--frames", "4", "--cache-dir", str(tmp_path / "models"),
         "--out", str(tmp_path / "out"), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert f"using the prebuilt sidecar {cmd[0]}" in done.stderr
    assert "cargo must not be called" not in done.stderr
    assert report.exists()


    data = json.loads(report.read_text())
    assert data, "the demo wrote its measurements"


def test_a_missing_prebuilt_sidecar_is_named(tmp_path: Path):
    """Catches a wrong MODELPOOL_SIDECAR_BIN failing later with an unclear error."""
    env = dict(os.environ, MODELPOOL_SIDECAR_BIN=str(tmp_path / "nope"), MODELPOOL_DEMO_VENV=sys.prefix)
    done = subprocess.run(["bash", str(DEMO)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    assert f"MODELPOOL_SIDECAR_BIN={tmp_path / 'nope'} is not an executable file" in done.stderr, done.stderr
