"""`hope_jax.diagnostics.trace`: the replay equals the model, and its records are consistent."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hope_jax
from experiments import tiny
from hope_jax import diagnostics


def _model(block="hope", num_layers=2):
  cfg = tiny.get_config()
  cfg.model.block = block
  cfg.model.num_layers = num_layers
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
