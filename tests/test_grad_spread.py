"""benchmarks/grad_spread.py end to end: per-parameter gradient norms and their spread."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# What is measured needs neither lm_grad's nor the unrolled Titans scans' longer compile.
TINY = ["--set=hidden_size=32", "--set=num_layers=1", "--set=num_heads=2",
        "--set=chunk_other=4", "--set=chunk_mem=8", "--set=cms_chunks=[8,16]",
        "--set=cms_signal=static", "--set=inner_scan_unroll=1"]


def test_grad_spread_reports_every_parameter_per_repeat(tmp_path):
  out = tmp_path / "spread.json"
  proc = subprocess.run([sys.executable, "benchmarks/grad_spread.py", *TINY, "--length=32",
                         "--repeats=2", "--precisions=default,highest", "--top=3",
                         f"--json={out}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(out.read_text())
  assert list(got) == ["default", "highest"]
  for prec, res in got.items():
    first, last = res["runs"]
    params = [k for k in first if k != "loss"]
    assert "['embed']" in params and len(params) > 10
    assert 5.0 < first["loss"] < 6.0  # ln(256) at init, random tokens.
    # The total is the norm over every parameter's norm; one program repeats itself exactly
    # on a CPU (on an H100 the embedding's scatter-add differed by 1e-8 between repeats).
    assert res["total"][0] == pytest.approx(math.sqrt(sum(first[k] ** 2 for k in params)))
    assert res["total"][0] > 0
    assert first == last and res["total"][0] == res["total"][1]
    assert set(res["max_rel_diff"]) == set(params)
    assert all(v == 0.0 for v in res["max_rel_diff"].values())
    assert f"\n{prec}: loss [" in proc.stdout
  assert proc.stdout.count("| parameter | norm per repeat |") == 2
