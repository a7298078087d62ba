"""benchmarks/init_time.py end to end: the three ways to create a fresh train state."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = ["--set=hidden_size=32", "--set=num_layers=1", "--set=num_heads=2",
        "--set=chunk_other=4", "--set=chunk_mem=8", "--set=cms_chunks=[8,16]"]


def _run(tmp_path, *args):
  out = tmp_path / "init.json"
  proc = subprocess.run([sys.executable, "benchmarks/init_time.py", *TINY, *args,
                         f"--json={out}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text()), proc.stdout


def test_init_modes_create_the_same_parameters(tmp_path):
  rows, stdout = _run(tmp_path)
  assert [r["mode"] for r in rows] == ["jit", "jit_kernel", "eager"]
  assert all("error" not in r for r in rows), rows
  jit, kernel, eager = rows
  assert jit["params"] == kernel["params"] == eager["params"] > 0
  # The GPU kernel option does nothing on a CPU: the same program, the same numbers. Eager
  # initialisers may round the last bit differently.
  assert kernel["checksum"] == jit["checksum"]
  assert eager["checksum"] == pytest.approx(jit["checksum"], rel=1e-6)
  assert jit["lower_s"] > 0 and jit["compile_s"] > 0 and "compile_s" not in eager
  assert "| jit_kernel | cpu |" in stdout


def test_init_row_that_times_out_is_reported(tmp_path):
  rows, stdout = _run(tmp_path, "--modes=jit", "--timeout=0.05")
  assert rows == [{"model": "hope", "mode": "jit", "error": "no result within --timeout=0.05 s"}]
  assert "| jit | error: no result within --timeout=0.05 s |" in stdout
