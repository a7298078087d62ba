"""`hope_jax.diagnostics.trace`: the replay equals the model, and its records are consistent."""

import re

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hope_jax
from experiments import gpu_d1024, tiny
from hope_jax import check_init, diagnostics
from hope_jax.config import ConfigError, ModelConfig
from tests.conftest import run_cli


def _model(block="hope", num_layers=2, scan_layers=False):
  cfg = tiny.get_config()
  cfg.model.block = block
  cfg.model.num_layers = num_layers
  cfg.model.scan_layers = scan_layers
  return hope_jax.build_model(cfg.model, seed=0)


def _tokens(b=2, l=32):
  return np.random.default_rng(0).integers(0, 256, (b, l)).astype(np.int32)


def test_trace_replays_the_model_and_records_memories():
  model = _model()
  tokens = _tokens()
  out = diagnostics.trace(model, tokens)
  c = out["chunk"]
  assert c == model.cfg.cms_chunks[0]
  # The replay is the model's own forward (same deltas, same chunks).
  chex.assert_trees_all_close(out["logits_BLV"], np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)),
                              atol=1e-5, rtol=1e-5)
  n = tokens.shape[1] // c
  np.testing.assert_array_equal(out["chunk_ends"], np.arange(1, n + 1) * c)
  h, cfg = model.cfg.num_heads, model.cfg
  for layer in out["layers"]:
    assert layer["eta_BLH"].shape == (2, 32, h)
    assert np.all(layer["eta_BLH"] > 0) and np.all(layer["eta_BLH"] <= cfg.eta_max)
    assert np.all(layer["alpha_BLH"] >= cfg.alpha_min) and np.all(layer["alpha_BLH"] <= 1)
    assert layer["drift"], "a HOPE layer has fast memories"
    for name, d_BNH in layer["drift"].items():
      assert d_BNH.shape == (2, n, h), name
      assert np.all(d_BNH[:, -1] > 0), name
    # CMS: level l writes at multiples of C_l, and its delta changes only then.
    writes, norms = layer["cms_writes"], layer["cms_delta_norm"]
    assert writes.shape == (len(cfg.cms_chunks), n) and norms.shape == (len(cfg.cms_chunks), 2, n)
    for lvl, cl in enumerate(cfg.cms_chunks):
      np.testing.assert_array_equal(writes[lvl], out["chunk_ends"] % cl == 0)
      prev = np.concatenate([np.zeros((2, 1)), norms[lvl][:, :-1]], axis=1)
      changed = np.abs(norms[lvl] - prev) > 0
      assert not np.any(changed[:, ~writes[lvl]]), f"level {lvl} moved between boundaries"
      assert np.all(changed[:, writes[lvl]]), f"level {lvl} did not write at its boundary"
  # Layer 0's input does not depend on CMS deltas: inspect on the embedding gives it directly.
  block = model.blocks[0]
  want = diagnostics._inspect(block.mixer, block.norm_mixer(model.embed_tokens(jnp.asarray(tokens))))
  layer = out["layers"][0]
  chex.assert_trees_all_close(layer["eta_BLH"], np.asarray(want["eta_BLH"]), atol=1e-6)
  for name, d_BH in want["drift"].items():
    chex.assert_trees_all_close(layer["drift"][name][:, -1], np.asarray(d_BH), rtol=1e-4,
                                atol=1e-6)


def test_trace_with_the_layer_scan_writes_as_the_model_does():
  # Under scan_layers the replay takes the write gradients through the stacked blocks, as
  # the model's own scan does; its logits after the first chunk depend on those writes.
  model = _model(scan_layers=True)
  tokens = _tokens(1, 24)
  out = diagnostics.trace(model, tokens)
  chex.assert_trees_all_close(out["logits_BLV"], np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)),
                              atol=1e-5, rtol=1e-5)
  assert np.all(out["layers"][1]["cms_delta_norm"][0, :, -1] > 0)


def test_trace_attention_block_has_no_titans_fields():
  model = _model("hope_attention")
  out = diagnostics.trace(model, _tokens(1, 16))
  layer = out["layers"][0]
  assert layer["eta_BLH"] is None and layer["drift"] == {}
  assert layer["cms_writes"] is not None


def test_trace_without_cms_runs_on_the_mixer_grid():
  model = _model("titans_lmm", num_layers=1)
  tokens = _tokens(1, 16)
  out = diagnostics.trace(model, tokens)
  assert out["chunk"] == model.blocks[0].mixer.align
  chex.assert_trees_all_close(out["logits_BLV"],
                              np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)),
                              atol=1e-5, rtol=1e-5)
  layer = out["layers"][0]
  assert layer["cms_writes"] is None and layer["cms_delta_norm"] is None
  assert layer["eta_BLH"].shape == (1, 16, model.cfg.num_heads) and layer["drift"]


def test_trace_rejects_unaligned_length():
  with pytest.raises(ValueError, match="multiple of the chunk 8"):
    diagnostics.trace(_model(), _tokens(1, 20))


def test_health_reduces_the_trace_of_the_whole_chunks():
  model = _model()
  tokens = _tokens(2, 36)  # 4 tokens past the last whole chunk of 8: left out.
  got = diagnostics.health(model, tokens)
  assert set(got) == {f"health/layer{j}/{k}" for j in range(2) for k in (
      "drift_w1", "drift_w2", "eta_mean", "eta_max", "alpha_mean", "alpha_min")}
  # Layer 0 reads the embedding, so `inspect` on it gives its final drift and rates directly,
  # independently of the replay.
  block = model.blocks[0]
  want = diagnostics._inspect(block.mixer,
                              block.norm_mixer(model.embed_tokens(jnp.asarray(tokens[:, :32]))))
  for w in ("W1", "W2"):
    drift = max(float(np.max(d)) for name, d in want["drift"].items() if name.endswith("/" + w))
    assert got[f"health/layer0/drift_{w.lower()}"] == pytest.approx(drift, rel=1e-4)
  eta, alpha = np.asarray(want["eta_BLH"]), np.asarray(want["alpha_BLH"])
  assert got["health/layer0/eta_mean"] == pytest.approx(float(eta.mean()), rel=1e-5)
  assert got["health/layer0/eta_max"] == pytest.approx(float(eta.max()), rel=1e-5)
  assert got["health/layer0/alpha_min"] == pytest.approx(float(alpha.min()), rel=1e-5)
  assert got["health/layer0/alpha_mean"] == pytest.approx(float(alpha.mean()), rel=1e-5)
  assert 0 < got["health/layer1/eta_mean"] <= got["health/layer1/eta_max"] <= model.cfg.eta_max
  line = diagnostics.format_health(got)
  assert line.startswith("layer 0: drift W1 ") and " | layer 1: drift W1 " in line
  assert f"eta {got['health/layer1/eta_mean']:.3g} (max " in line and ", alpha " in line


def test_the_replay_compiles_its_chunk_step_once_on_committed_parameters(caplog):
  # Training holds its parameters committed to the device. The replay's outputs then land
  # there too, so it starts from states committed there as well: from uncommitted ones, the
  # second chunk was another program and the chunk step compiled twice per health check.
  import logging

  import jax

  cfg = tiny.get_config().model
  cfg.update(block="hope", num_layers=1, hidden_size=24)  # A size no other test compiles.
  graphdef, state = nnx.split(hope_jax.build_model(cfg, seed=0))
  model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    got = diagnostics.health(model, _tokens(1, 24))  # Three chunks of 8.
  assert got["health/layer0/eta_max"] > 0
  compiles = [r for r in caplog.records
              if "Finished XLA compilation of jit(_chunk_step)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]


_MESH_REPLAY = """
import logging, jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import hope_jax
from experiments import tiny
from hope_jax import diagnostics
cfg = tiny.get_config().model
cfg.update(block="hope", num_layers=1, hidden_size=24)
graphdef, state = nnx.split(hope_jax.build_model(cfg, seed=0))
mesh = jax.make_mesh((2, 1), ("data", "fsdp"))
model = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
compiles = []
class Count(logging.Handler):
  def emit(self, record):
    if "Finished XLA compilation of jit(_chunk_step)" in record.getMessage():
      compiles.append(record)
logging.getLogger("jax").addHandler(Count())
with jax.log_compiles(True):
  got = diagnostics.health(model, np.zeros((1, 24), np.int32))
print("eta_max", got["health/layer0/eta_max"], "compiles", len(compiles))
"""


def test_the_replay_compiles_its_chunk_step_once_on_a_replicated_mesh():
  # The default CPU run: two host devices, parameters replicated over the data axis.
  from tests.conftest import run_cli

  proc = run_cli(["-c", _MESH_REPLAY], env={"JAX_NUM_CPU_DEVICES": "2"}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  words = proc.stdout.split()
  assert float(words[words.index("eta_max") + 1]) > 0
  assert words[words.index("compiles") + 1] == "1", proc.stdout


def test_health_is_empty_where_it_does_not_apply():
  assert diagnostics.health(_model("transformer_pp", num_layers=1), _tokens(1, 16)) == {}
  assert diagnostics.health(_model(), _tokens(1, 7)) == {}  # Shorter than one chunk of 8.
  got = diagnostics.health(_model("hope_attention", num_layers=1), _tokens(1, 16))
  assert got == {}  # Attention mixers have no self-modifying memory.


def test_larger_memory_input_init_runs_the_memories_away():
  # The spec's W_in init (std 0.02) at D=256 keeps the memories near their meta-init on random
  # bytes; twice that makes them run away within 512 tokens, as the spec's init does at D=1024
  # (docs/architecture.md, "Runaway fast weights"): W1's drift grows past 100 (calm: ~0.8)
  # and the inner rates reach eta_max. `check_init` marks the one and not the other.
  cfg = gpu_d1024.get_config()  # The model of ModelConfig's defaults, at D=256 here.
  cfg.model.update(hidden_size=256, num_heads=4, num_layers=1, cms_signal="static",
                   dtype="float32", scan_layers=False)
  calm, runaway = check_init.check(cfg, (0.02, 0.04), _tokens(1, 512))
  assert (calm["memory_input_std"], runaway["memory_input_std"]) == (0.02, 0.04)
  assert calm["drift_w1"] < 2 and calm["eta_max"] < 0.02 and not calm["runaway"]
  assert runaway["drift_w1"] > 100 and runaway["runaway"]
  assert runaway["eta_max"] == pytest.approx(0.1, abs=1e-3)
  text = check_init.table([calm, runaway]).splitlines()
  assert text[2].startswith("| 0.02 | 0 | ") and text[2].endswith("| calm |")
  assert text[3].startswith("| 0.04 | 0 | ") and text[3].endswith("| runs away |")
  assert calm["tokens"] == runaway["tokens"] == 512
  assert cfg.model.memory_input_std == 0.02  # check() leaves the config as it was.
  cfg.model.memory_input_std = 0.04
  model = hope_jax.build_model(cfg)
  assert float(np.std(np.asarray(model.blocks[0].mixer.w_in.kernel[...]))) == pytest.approx(
      0.04, rel=0.02)


def test_check_init_cli_prints_a_table_and_names_bad_input():
  proc = run_cli(["-m", "hope_jax.check_init", "--config=experiments/tiny.py",
                  "--config.model.block=hope", "--config.model.cms_signal=static",
                  "--stds=0.02,0.2", "--tokens=70"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  # 64 of the 70 tokens fill whole chunks of C_1 = 8: the replayed count is shown.
  assert lines[0] == "hope, D=32, 1 layer(s), 64 validation tokens, parameter seed 0"
  assert [l.split(" | ")[:2] for l in lines[3:]] == [["| 0.02", "0"], ["| 0.2", "0"]]
  cfg = tiny.get_config()
  for stds, seed, why in (("0.02,x", 0, "--stds must be comma-separated numbers, got '0.02,x'"),
                          ("0,0.01", 0, "--stds must be positive numbers, got '0,0.01'"),
                          (None, -1, "--seed must be a non-negative integer, got -1")):
    with pytest.raises(ConfigError, match=re.escape(why)):
      check_init.check_flags(cfg, stds, seed)
  assert check_init.check_flags(cfg, None, 0) == [0.02]
  cfg.model.update(block="hope", memory_input="identity", num_heads=1)
  with pytest.raises(ConfigError, match=r"^--stds sets the init of W_in, which model\.memory_in"):
    check_init.check_flags(cfg, "0.02,0.5", 0)
  n = len(check_init.tokens_for(tiny.get_config(), "validation", 64)[0])
  for length, why in ((0, "--tokens must be at least 1, got 0"),
                      (10**7, "--tokens must be at most ")):
    with pytest.raises(ConfigError, match=re.escape(why)):
      check_init.tokens_for(tiny.get_config(), "validation", length)
  assert n == 64
  cfg = tiny.get_config()  # transformer_pp
  with pytest.raises(ConfigError, match=r"^model\.block='transformer_pp' has no self-modifying"):
    check_init.check(cfg, [0.02], _tokens(1, 16))
  cfg.model.block = "hope"  # Its replay chunk is C_1 = 8.
  with pytest.raises(ConfigError, match=r"^5 token\(s\) fill no chunk of the replay: give at "
                     r"least 8 \(--tokens\)$"):
    check_init.check(cfg, [0.02], _tokens(1, 5))


def test_trace_and_health_name_a_wrong_token_shape():
  # 1-D tokens failed with "not enough values to unpack" / "tuple index out of range".
  model = hope_jax.build_model(ModelConfig(block="hope", hidden_size=32, num_heads=2,
                                           num_layers=1, chunk_other=4, chunk_mem=8,
                                           cms_chunks=(8, 16)))
  for fn in (diagnostics.trace, diagnostics.health):
    for bad, shown in ((np.arange(8), r"\(8,\)"), (np.zeros((1, 0), np.int32), r"\(1, 0\)"),
                       (np.zeros((1, 8)), r"\(1, 8\) of float64")):
      with pytest.raises(ValueError, match=rf"{fn.__name__}: tokens_BL must be \[batch, length\] "
                         rf"token ids .* got shape {shown}"):
        fn(model, bad)
