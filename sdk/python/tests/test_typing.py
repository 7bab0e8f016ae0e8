"""Type checkers see what users write: the SDK passes ``mypy --strict``, and the model bound by
``with mm.load_model(key) as model`` (or ``async with mm.load_model_async(key)``) has the type
its loader returns when ``key`` is what ``register_model_loader`` gave back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SDK

pytest.importorskip("mypy")

USER_CODE = '''
from modelpool import MemoryManager


class Upscaler:
    def process(self, frames: list[int]) -> list[int]:
        return frames


async def run_async(mm: MemoryManager) -> None:
    key = mm.register_model_loader("upscale", Upscaler)
    async with mm.load_model_async(key) as model:
        reveal_type(model)
        model.process([1])


def run(mm: MemoryManager) -> None:
    key = mm.register_model_loader("upscale", Upscaler, lambda m: None)
    with mm.load_model(key) as model:
        reveal_type(model)
        model.process([1])
        {mistake}
    with mm.load_model("upscale") as anything:  # a plain name still works, untyped
        anything.whatever()
'''


def mypy(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "user_app.py"
    path.write_text(code)
    env = dict(os.environ, MYPYPATH=str(SDK / "src"))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
         str(tmp_path / "cache"), str(path)],
        capture_output=True, text=True, timeout=300, env=env,
    )


def test_the_sdk_passes_mypy_strict(tmp_path):
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "-p", "modelpool"],
        capture_output=True, text=True, timeout=300, env=env, cwd=SDK / "src",
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_load_model_keeps_the_loaders_type(tmp_path):
    """Catches ``load_model`` typing the model as ``Any``: a misspelt method must be an error."""
    fine = mypy(USER_CODE.replace("{mistake}", "pass"), tmp_path)
    assert fine.stdout.count('Revealed type is "user_app.Upscaler"') == 2, fine.stdout
    assert "error" not in fine.stdout, fine.stdout
    wrong = mypy(USER_CODE.replace("{mistake}", "model.proces([1])"), tmp_path)
    assert wrong.returncode != 0
    assert '"Upscaler" has no attribute "proces"' in wrong.stdout, wrong.stdout
