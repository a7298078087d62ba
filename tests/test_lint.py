"""The repository passes `ruff check` under the settings in pyproject.toml."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _ruff_command() -> list[str]:
  """`python -m ruff` when the ruff wheel is importable, else a `ruff` beside the interpreter."""
  if importlib.util.find_spec("ruff") is not None:
    return [sys.executable, "-m", "ruff"]
  beside = shutil.which("ruff", path=os.path.dirname(sys.executable))
  if beside is None:
    pytest.skip("ruff is not installed; it is in the `dev` extra (pip install -e '.[dev]')")
  return [beside]


def test_ruff_check_is_clean():
  # --no-cache: a test run should not write .ruff_cache into the source tree.
  proc = subprocess.run([*_ruff_command(), "check", "--no-cache", "."], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}\n{proc.stderr}"
