"""The §8 FLOP count against XLA's own count, and the MFU benchmark end to end."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hope_jax import flops
from hope_jax.config import ModelConfig
from hope_jax.train.state import ModelDef

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("block", ["transformer_pp", "hope_attention"])
def test_forward_count_matches_xla_cost_analysis(block):
  # Blocks without inner scans: XLA's cost analysis sees every op (it does not multiply a
  # while-loop body by its trip count, so scan-based blocks cannot be checked this way).
  # Elementwise work (norms, softmax, SiLU) is not in §8's matmul count: allow 15%.
  cfg = ModelConfig(block=block, hidden_size=64, num_layers=2, num_heads=2,
                    cms_chunks=(16, 32), cms_signal="static")
  length, batch = 64, 2
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  model_def = ModelDef(cfg)
  compiled = jax.jit(model_def.apply).lower(model_def.abstract_params(), tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_token = cost["flops"] / (batch * length)
  ours = flops.step_flops(cfg, length).fwd_model
  assert 0.95 < xla_per_token / ours < 1.15, (xla_per_token, ours)


def test_lm_grad_step_counts_the_cms_writes():
  cfg = ModelConfig(block="hope", hidden_size=64, num_layers=2, num_heads=2)
  f = flops.step_flops(cfg, 8192)
  assert f.train == pytest.approx(3 * f.fwd_model)
  assert f.train_with_cms_writes == pytest.approx(4 * f.fwd_model + 2 * f.cms_layer)
  # At 512 tokens the levels C = 1024 and 4096 (half the width) write after the last token:
  # the loss's forward freezes them and forms no weight gradients (the nested variant keeps
  # every level).
  short = flops.step_flops(cfg, 512)
  assert short.train_with_cms_writes == pytest.approx(4 * short.fwd_model + short.cms_layer)
  nested = flops.step_flops(ModelConfig(**{**cfg.to_dict(), "cms_variant": "nested"}), 512)
  assert nested.train_with_cms_writes == pytest.approx(4 * nested.fwd_model
                                                       + 2 * nested.cms_layer)
  f = short
  static = flops.step_flops(ModelConfig(**{**cfg.to_dict(), "cms_signal": "static"}), 512)
  assert static.train_with_cms_writes == static.train == f.train
  # The inner loop dominates a HOPE layer: more than the 8 D^2 static projections + CMS.
  assert f.fwd_layer > 3 * (8 * 64 * 64 + f.cms_layer)


def test_train_mfu_benchmark_runs_and_never_recompiles(tmp_path):
  out = tmp_path / "mfu.json"
  cmd = [sys.executable, "benchmarks/train_mfu.py", "--models=transformer_pp,hope",
         "--lengths=32", "--tokens_per_step=64", "--steps=2", "--set=hidden_size=32",
         "--set=num_layers=1", "--set=num_heads=2", "--set=chunk_other=4",
         "--set=chunk_mem=8", "--set=cms_chunks=[8,16]", "--bandwidth_mib=16",
         "--peak_sizes=256", "--peak_seconds=0.1", "--set=inner_scan_unroll=1",
         f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["model"] for r in rows] == ["transformer_pp", "hope"]
  assert "| memory GB/s (before / after) |" in proc.stdout
  for r in rows:
    assert "error" not in r, r
    assert r["recompiles_in_timed_steps"] == 0
    assert r["tokens_per_s"] > 0 and 0 < r["mfu_f32"] < 1
    assert r["mfu"] == r["mfu_f32"] and r["peak_dtype"] == "float32"
    assert r["peak_f32"] > 1e8  # At least 0.1 GFLOP/s: the peak was really measured.
    # Read before and after the timed steps; the MFU is against the higher reading.
    assert len(r["peak_f32_readings"]) == 2 and r["peak_f32"] == max(r["peak_f32_readings"])
    # So is the memory bandwidth: at least 100 MB/s, each reading really measured.
    assert len(r["memory_bandwidth_readings"]) == 2
    assert min(r["memory_bandwidth_readings"]) > 1e8, r["memory_bandwidth_readings"]
    assert r["cpu"], r
    # The loss before any update: a freshly initialised model is near uniform over 256 bytes.
    assert abs(r["first_loss"] - math.log(256)) < 0.3, r["first_loss"]
    assert math.isfinite(r["first_grad_norm"]) and r["first_grad_norm"] > 0
  assert rows[1]["mfu_f32_with_cms_writes"] > rows[1]["mfu_f32"]
  assert "| hope | 32 | 2 |" in proc.stdout


def test_train_mfu_rounds_are_summarised_by_median_and_ratio():
  from benchmarks.train_mfu import summarise_rounds
  row = lambda model, step, length=2048: {"model": model, "L": length, "B": 2, "step_s": step}
  rows = [row("hope", 4.9), row("transformer_pp", 2.4), row("hope", 5.1),
          row("transformer_pp", 2.3), row("hope", 4.7), row("transformer_pp", 2.5),
          {"model": "hope", "L": 2048, "B": 2, "error": "timeout"}, row("hope", 9.0, 8192)]
  table = summarise_rounds(rows, ["hope", "transformer_pp"])
  assert table[2] == "| hope | 2048 | 2 | 3 | 4.90 | 4.70-5.10 | - |"
  # 4.9 / 2.4: the medians' ratio, not a mean of the rounds' ratios (2.04, 2.22, 1.88).
  assert table[3] == "| transformer_pp | 2048 | 2 | 3 | 2.40 | 2.30-2.50 | 2.04x |"
  assert table[4] == "| hope | 8192 | 2 | 1 | 9.00 | 9.00-9.00 | - |"  # No partner there.
  assert len(table) == 5


def test_train_mfu_benchmark_reports_a_row_that_times_out(tmp_path):
  out = tmp_path / "mfu.json"
  cmd = [sys.executable, "benchmarks/train_mfu.py", "--models=transformer_pp", "--lengths=32",
         "--timeout=0.05", f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = json.loads(out.read_text())["rows"]
  assert row["error"] == "no result within --timeout=0.05 s"
  assert "| transformer_pp | 32 | 128 | failed: no result within" in proc.stdout


def test_train_mfu_benchmark_runs_data_parallel_on_host_devices(tmp_path):
  out = tmp_path / "mfu.json"
  cmd = [sys.executable, "benchmarks/train_mfu.py", "--models=transformer_pp", "--lengths=32",
         "--tokens_per_step=64", "--steps=1", "--set=hidden_size=32", "--set=num_layers=1",
         "--set=num_heads=2", "--devices=2", "--bandwidth_mib=16", "--peak_sizes=256",
         "--peak_seconds=0.1", f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = json.loads(out.read_text())["rows"]
  assert "error" not in row, row
  assert row["devices"] == 2 and row["recompiles_in_timed_steps"] == 0
  assert row["tokens_per_s"] > 0


def test_xla_options_benchmark_compares_variants_in_one_process(tmp_path):
  # No YNNPACK fusions changes the compiled program; a bad enum value is that row's error.
  out = tmp_path / "options.json"
  cmd = [sys.executable, "benchmarks/xla_options.py", "--model=transformer_pp",
         "--set=hidden_size=32", "--set=num_layers=1", "--set=num_heads=2", "--length=32",
         "--batch=2", "--calls=3", "--option=xla_cpu_experimental_ynn_fusion_type=",
         "--option=xla_cpu_experimental_xnn_graph_fusion_mode=NOT_A_MODE", f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  base, control, no_ynn, bad = json.loads(out.read_text())["rows"]
  assert base["options"] == {} and "same_hlo" not in base
  # The control is the baseline's program again, timed in a slot of its own.
  assert control["options"] == {} and control["control"] is True and control["same_hlo"] is True
  assert len(control["step_s"]) == 3 and 0 <= control["faster_than_baseline"] <= 3
  assert no_ynn["options"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert no_ynn["same_hlo"] is False
  assert no_ynn["first_loss"] == pytest.approx(base["first_loss"], rel=1e-5)
  assert abs(base["first_loss"] - math.log(256)) < 0.3  # A fresh model, near uniform.
  for row in (base, no_ynn):
    assert len(row["step_s"]) == 3 and row["median_step_s"] > 0
    assert 0 <= row["faster_than_baseline"] <= 3
  assert base["faster_than_baseline"] == 0  # Never faster than itself.
  assert "xla_cpu_experimental_xnn_graph_fusion_mode" in bad["error"]
  assert "NOT_A_MODE" in bad["error"] and "step_s" not in bad
  assert "| baseline | – |" in proc.stdout
  assert "| baseline again (control) | yes |" in proc.stdout
  assert "The control (the same program) ran" in proc.stdout
  assert "| xla_cpu_experimental_xnn_graph_fusion_mode=NOT_A_MODE | failed:" in proc.stdout


def test_xla_options_parse_typed_values_and_name_a_bad_item():
  from benchmarks.xla_options import parse_option

  assert parse_option("a=true,b=false,c=32,d=FAST,e=") == {
      "a": True, "b": False, "c": 32, "d": "FAST", "e": ""}
  with pytest.raises(ValueError, match="'novalue'"):
    parse_option("a=1,novalue")


def test_titans_flops_split_by_phase():
  hope = ModelConfig(block="hope", hidden_size=64, num_heads=2)
  lmm = ModelConfig(block="titans_lmm", hidden_size=64, num_heads=2)
  p_hope, p_lmm = flops.titans_fwd_parts(hope), flops.titans_fwd_parts(lmm)
  # Hand-counted with the §8 terms (4 live memories, momentum, DGD, D=64, H=2: Dh=E_p=32,
  # E_m=128, C_o=16, C_m=64; 4 static D x D maps, beta and two width-4 convs):
  assert p_hope.static == 2 * 4 * 64**2 + 2 * 64 * 2 + 2 * 2 * 4 * 64
  assert p_hope.phase_a == (4 * 32 * 64 * 32 + 2 * 16 * 64 + 5 * 2 * 16**2
                            + 6 * 2 * 16 * 4 * 32)
  assert p_hope.phase_b == 32 * 64 * 128 + 2 * 64 * 64 + 5 * 2 * 64**2 + 6 * 2 * 64 * 128
  for cfg, p in ((hope, p_hope), (lmm, p_lmm)):
    assert p.static + p.phase_a + p.phase_b == pytest.approx(flops.titans_fwd(cfg))
  # Titans-LMM has no projection memories: no phase A, and its k/v/eta/alpha maps are static.
  assert p_lmm.phase_a == 0 and p_lmm.static > p_hope.static
  assert p_lmm.phase_b == p_hope.phase_b  # The same main memory.
  # Freezing a memory leaves only its reads (4 D E_p) in phase A.
  frozen = flops.titans_fwd_parts(ModelConfig(**{**hope.to_dict(), "frozen_memories": ("eta",)}))
  assert 0 < p_hope.phase_a - frozen.phase_a < p_hope.phase_a / 4
  # Switches count what the sublayer runs: adaptive q has no W_q and no q conv; post-memory
  # convs run on k, v and q (three, not two); without momentum there is no beta projection.
  static = lambda **kw: flops.titans_fwd_parts(ModelConfig(**{**hope.to_dict(), **kw})).static
  conv = 2 * 4 * 64
  assert p_hope.static - static(adaptive_q=True) == 2 * 64**2 + conv
  assert static(conv_position="post_memory") - p_hope.static == conv
  assert p_hope.static - static(momentum=False) == 2 * 64 * 2


def test_inner_products_benchmark_bounds_the_mfu(tmp_path):
  out = tmp_path / "inner.json"
  cmd = [sys.executable, "benchmarks/inner_products.py", "--hidden=32", "--heads=2",
         "--layers=1", "--batch=1", "--min_seconds=0.01", "--peak_sizes=256",
         "--peak_seconds=0.05", f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(out.read_text())
  assert {r["phase"] for r in res["products"]} == {"A", "B"}
  for r in res["products"]:
    assert sorted(r["flops_per_s"]) == sorted(["mk,kn", "km,kn", "mk,nk", "km,nk"])
    assert all(v > 0 for v in r["flops_per_s"].values())
  share = res["flop_share"]
  assert 0 < share["A"] and 0 < share["B"] and share["A"] + share["B"] < 1
  eff = res["best_efficiency"]
  expected = 1 / (share["A"] / eff["A"] + share["B"] / eff["B"] + 1 - share["A"] - share["B"])
  assert res["mfu_bound"] == pytest.approx(expected) and 0 < res["mfu_bound"]
  assert "Upper bound on a `hope` train step's MFU" in proc.stdout


def test_generation_benchmark_reports_flat_and_growing_caches(tmp_path):
  # The generation target of issue 7: a Titans cache holds the same bytes after more tokens,
  # an attention block's KV cache grows with them.
  out = tmp_path / "gen.json"
  cmd = [sys.executable, "benchmarks/lm_throughput.py", "--skip_train", "--gen=8,24",
         "--models=titans_lmm,transformer_pp", "--set=hidden_size=32", "--set=num_layers=1",
         "--set=num_heads=2", "--set=chunk_other=4", "--set=chunk_mem=8", f"--json={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  data = json.loads(out.read_text())
  assert data["meta"]["D"] == 32 and data["meta"]["layers"] == 1 and data["meta"]["cpu"]
  titans, tpp = data["rows"]
  for r in (titans, tpp):
    assert r["gen8_tokens_per_s"] > 0 and r["gen24_tokens_per_s"] > 0, r
  assert titans["gen8_cache_bytes"] == titans["gen24_cache_bytes"]
  # K and V of 1 layer, 32 channels, float32, for the 16 more positions (+1 for the prompt).
  assert tpp["gen24_cache_bytes"] - tpp["gen8_cache_bytes"] == 2 * 32 * 4 * 16
  assert "| titans_lmm |" in proc.stdout and "| transformer_pp |" in proc.stdout
