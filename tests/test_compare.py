"""The comparison command runs end to end on its tiny setting."""

import importlib.util
import json

import pytest

from tests.conftest import run_cli

# Modules each block needs; HOPE also needs the self-modifying Titans sublayer.
NEEDS = {"transformer_pp": [], "titans_lmm": ["hope_jax.model.titans"],
         "hope": ["hope_jax.model.titans", "hope_jax.model.cms"]}


def test_tiny_comparison_runs_and_reports_every_model(tmp_path):
  missing = {m: [n for n in needs if importlib.util.find_spec(n) is None]
             for m, needs in NEEDS.items()}
  models = [m for m in ("hope", "titans_lmm", "transformer_pp") if not missing[m]]
  out = tmp_path / "results.json"
  proc = run_cli(["-m", "experiments.compare", "--tiny", f"--models={','.join(models)}",
                  f"--workdir={tmp_path / 'runs'}", f"--json={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert sorted(results) == sorted(models)
  counts = [r["default"]["params"] for r in results.values()]
  assert max(counts) <= 1.25 * min(counts)  # Sized to the same parameter budget.
  for model, runs in results.items():
    assert runs["default"]["train_tokens"] == runs["mqar"]["train_tokens"] > 0
    assert 0.0 < runs["default"]["metrics"]["eval/bits_per_byte"] < 16.0
    assert 0.0 <= runs["mqar"]["metrics"]["task/accuracy"] <= 1.0
    assert runs["mqar"]["data"].startswith("MQAR")
  table = proc.stdout
  assert "| model |" in table and all(f"| {name} |" in table for name in (
      {"hope": "HOPE", "titans_lmm": "Titans-LMM", "transformer_pp": "Transformer++"}[m]
      for m in models))
  if any(missing.values()):
    pytest.skip(f"ran {models}; blocks not in this tree yet: "
                f"{ {m: n for m, n in missing.items() if n} }")
