"""CMS: pure ops, module variants, the lm_grad schedule and write values (spec §7 test 9)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hope_jax
from hope_jax.model.cms import CMS, level_widths
from hope_jax.ops import cms as cms_ops
from hope_jax.train.outer_freq import level_frequencies, wrap_outer_frequency
from tests.lm_helpers import tiny


def _weights(key, b, d=6, f=5):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"gate": jax.random.normal(k1, (b, d, f)), "up": jax.random.normal(k2, (b, d, f)),
          "down": jax.random.normal(k3, (b, f, d))}


def test_swiglu_batched_matches_reference():
  w = _weights(jax.random.key(0), 3)
  x_BLD = jax.random.normal(jax.random.key(1), (3, 4, 6))
  np.testing.assert_allclose(cms_ops.swiglu_batched(x_BLD, w),
                             cms_ops.swiglu_batched_reference(x_BLD, w), rtol=1e-5, atol=1e-5)


def test_swiglu_delta_equals_autodiff_of_the_composition():
  """The hand-written backward of `swiglu_delta` against jax.vjp of swiglu_batched(add_delta)."""
  b, l, d, f = 3, 5, 6, 4
  delta = _weights(jax.random.key(3), b, d, f)
  theta0 = {k: v[0] for k, v in _weights(jax.random.key(4), 1, d, f).items()}
  x_BLD = jax.random.normal(jax.random.key(5), (b, l, d))
  dy_BLD = jax.random.normal(jax.random.key(6), (b, l, d))
  plain = lambda x, t, dl: cms_ops.swiglu_batched(x, cms_ops.add_delta(t, dl))
  y_ref, vjp_ref = jax.vjp(plain, x_BLD, theta0, delta)
  y, vjp = jax.vjp(cms_ops.swiglu_delta, x_BLD, theta0, delta)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
  grads, grads_ref = vjp(dy_BLD), vjp_ref(dy_BLD)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, grads_ref)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)
  # Each sequence's delta gradient depends on its own tokens only.
  dy_BLD = dy_BLD.at[1:].set(0.0)
  _, _, d_delta = vjp(dy_BLD)
  assert float(jnp.abs(d_delta["gate"][1:]).max()) == 0.0
  assert float(jnp.abs(d_delta["gate"][0]).max()) > 0.0


def test_clip_by_norm_is_per_sequence_and_joint():
  g = _weights(jax.random.key(2), 2)
  g["gate"] = g["gate"].at[1].multiply(1e-3)
  g["up"] = g["up"].at[1].multiply(1e-3)
  g["down"] = g["down"].at[1].multiply(1e-3)
  clipped = cms_ops.clip_by_norm(g, 1.0)
  norm = lambda t, b: float(jnp.sqrt(sum(jnp.sum(v[b] ** 2) for v in t.values())))
  assert norm(clipped, 0) == pytest.approx(1.0, rel=1e-5)  # Big one scaled to the limit.
  assert norm(clipped, 1) == pytest.approx(norm(g, 1), rel=1e-6)  # Small one untouched.


def test_schedule_writes_each_level_only_at_its_boundaries():
  chunks, lr = (2, 4, 8), 0.5
  shapes = [{"gate": (3, 2), "up": (3, 2), "down": (2, 3)}] * 3
  state = cms_ops.init_fast_state(shapes, 1, nested=False)
  history = []
  for c in range(8):  # Chunk c ends after (c + 1) * C_1 tokens.
    grads = [{k: jnp.full((1,) + s, float(c + 1)) for k, s in lvl.items()} for lvl in shapes]
    state = cms_ops.schedule_update(state, grads, (c + 1) * chunks[0], chunks, lr, clip=1e9)
    history.append([float(state["delta"][lvl]["gate"][0, 0, 0]) for lvl in range(3)])
  history = np.array(history)
  # Level l writes after chunk c iff (c + 1) * C_1 is a multiple of C_l, with the sum of the
  # chunk grads since its last write.
  expected = np.zeros((8, 3))
  for lvl, c_l in enumerate(chunks):
    delta, acc = 0.0, 0.0
    for c in range(8):
      acc += c + 1
      if ((c + 1) * chunks[0]) % c_l == 0:
        delta, acc = delta - lr * acc, 0.0
      expected[c, lvl] = delta
  np.testing.assert_allclose(history, expected)


def test_nested_variant_resets_to_slow_init():
  chunks, lr = (2, 4), 1.0
  shapes = [{"gate": (1, 1), "up": (1, 1), "down": (1, 1)}] * 2
  state = cms_ops.init_fast_state(shapes, 1, nested=True)
  one = [{k: jnp.ones((1, 1, 1)) for k in ("gate", "up", "down")}] * 2
  state = cms_ops.schedule_update(state, one, 2, chunks, lr, clip=1e9)
  assert float(state["delta"][0]["gate"][0, 0, 0]) == -1.0  # Own write at C_1.
  state = cms_ops.schedule_update(state, one, 4, chunks, lr, clip=1e9)
  # At C_2 the slow init phi_1 steps on the 2 accumulated grads and level 1 restarts from it.
  assert float(state["slow"][0]["gate"][0, 0, 0]) == -2.0
  assert float(state["delta"][0]["gate"][0, 0, 0]) == -2.0
  assert float(state["delta"][1]["gate"][0, 0, 0]) == -2.0


@pytest.mark.parametrize("overrides", [
    dict(cms_variant="independent"), dict(cms_order="slow_first"),
    dict(cms_ablate="single_static")])
def test_cms_variants_change_the_output(overrides):
  cfg = tiny(cms_signal="static", cms_chunks=(4, 8, 16))
  x_BLD = jax.random.normal(jax.random.key(3), (2, 5, 32))
  ref = CMS(cfg, rngs=nnx.Rngs(0))
  other = CMS(tiny(cms_signal="static", cms_chunks=(4, 8, 16), **overrides), rngs=nnx.Rngs(0))
  # Larger weights so the levels' non-linear interplay shows.
  for m in (ref, other):
    for _, p in nnx.iter_graph(m):
      if isinstance(p, nnx.Param) and p[...].ndim == 2:
        p[...] = p[...] * 20
  assert float(jnp.max(jnp.abs(ref(x_BLD) - other(x_BLD)))) > 1e-4


def test_single_static_is_parameter_matched():
  cfg = tiny(cms_signal="static", cms_chunks=(4, 8, 16), cms_hidden=70)
  assert sum(level_widths(cfg)) == 70
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)) if p.ndim == 2)
  chain = CMS(cfg, rngs=nnx.Rngs(0))
  single = CMS(tiny(cms_chunks=(4, 8, 16), cms_hidden=70, cms_ablate="single_static"),
               rngs=nnx.Rngs(0))
  assert count(chain) == count(single) == 3 * 32 * 70


# --------------------------------------------------- spec §7 test 9 on the whole LM


def _set_level0(model, delta_b):
  lvl = model.blocks[0].ffn.levels[0].mlp
  for name in ("gate", "up", "down"):
    layer = getattr(lvl, name)
    layer.kernel[...] = layer.kernel[...] + delta_b[name]


def _static_level_grads(model, tokens_1L, start, end):
  """jax.grad of the CE summed over positions [start, end) (targets t+1) w.r.t. each level."""

  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens_1L[:, :end + 1])
    return cms_ops.masked_token_ce(logits[:, start:end], tokens_1L[:, start + 1:end + 1],
                                   jnp.ones((1, end - start)))

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))["blocks"][0]["ffn"]["levels"]
  return [{k: grads[i]["mlp"][k]["kernel"] for k in ("gate", "up", "down")} for i in range(2)]


@pytest.mark.parametrize("clip", [1e9, 2e-3], ids=["unclipped", "clipped"])
def test_lm_grad_writes_equal_jax_grad_of_the_chunk_loss(clip):
  # One attention layer: its keys/values depend only on the tokens, so a static model with
  # level 1's weights set to theta_0 + delta reproduces chunk 2's forward exactly.
  lr = 3.0
  cfg = tiny(num_layers=1, cms_chunks=(4, 8), cms_lr=lr, cms_grad_clip=clip)
  model = hope_jax.build_model(cfg, seed=0)
  tokens_BL = jax.random.randint(jax.random.key(4), (2, 17), 0, 32)
  _, _, deltas = nnx.jit(lambda m, t: m.forward_with_fast_state(t, collect_deltas=True))(
      model, tokens_BL)
  d0, d1 = deltas[0]  # Per level: {name: [chunk, B, ...]}.
  # float32 tolerance relative to each array's scale: the two sides sum in different orders.
  close = lambda a, w: np.testing.assert_allclose(a, w, rtol=0, atol=1e-5 * float(jnp.max(
      jnp.abs(w))))
  clip_fn = lambda g: jax.tree.map(lambda x: x[0], cms_ops.clip_by_norm(
      jax.tree.map(lambda x: x[None], g), clip))
  static_cfg = tiny(num_layers=1, cms_chunks=(4, 8), cms_signal="static")
  for b in range(2):
    tok = tokens_BL[b:b + 1]
    g0_c0, g1_c0 = _static_level_grads(hope_jax.build_model(static_cfg, seed=0), tok, 0, 4)
    at = lambda tree, c, b=b: {k: v[c, b] for k, v in tree.items()}
    # Level 1 (C=4) writes after every chunk: delta = -lr * clip(chunk-0 grad).
    want = jax.tree.map(lambda g: -lr * g, clip_fn(g0_c0))
    jax.tree.map(close, at(d0, 0), want)
    # Level 2 (C=8) holds still after chunk 0 ...
    for v in at(d1, 0).values():
      np.testing.assert_array_equal(v, 0.0)
    # ... and after chunk 1 writes the clipped sum of both chunks' grads, chunk 1's taken
    # with level 1 already at theta_0 + delta.
    shifted = hope_jax.build_model(static_cfg, seed=0)
    _set_level0(shifted, at(d0, 0))
    _, g1_c1 = _static_level_grads(shifted, tok, 4, 8)
    want1 = jax.tree.map(lambda a, c: -lr * a, clip_fn(jax.tree.map(jnp.add, g1_c0, g1_c1)),
                         g1_c0)
    jax.tree.map(close, at(d1, 1), want1)
    # Level 2 changes only at multiples of 8 tokens: after chunks 1 and 3, not 2.
    for k in ("gate", "up", "down"):
      np.testing.assert_array_equal(d1[k][2, b], d1[k][1, b])
      assert float(jnp.max(jnp.abs(d1[k][3, b] - d1[k][2, b]))) > 0
      assert float(jnp.max(jnp.abs(d0[k][1, b] - d0[k][0, b]))) > 0
  if clip < 1.0:  # The clipped case really clipped: each write has norm lr * clip.
    step = jnp.sqrt(sum(jnp.sum(d0[k][0, 0] ** 2) for k in d0))
    assert float(step) == pytest.approx(lr * clip, rel=1e-4)


def test_outer_frequency_steps_levels_every_f_steps():
  cfg = tiny(cms_chunks=(4, 8), cms_mode="outer_freq", num_layers=1)
  model = hope_jax.build_model(cfg, seed=0)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  freqs = level_frequencies(params, cfg)
  assert freqs["blocks"][0]["ffn"]["levels"][1]["mlp"]["down"]["kernel"] == 2
  assert freqs["blocks"][0]["ffn"]["levels"][0]["mlp"]["down"]["kernel"] == 1
  assert freqs["embed"] == 1
  from experiments import base
  from hope_jax.train.optimizer import make_optimizer

  t = base.get_config().training
  t.warmup_steps = 0
  tx = make_optimizer(t, params, cfg)  # The train loop's optimizer, wrapped for outer_freq.
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  moved = []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    lvl = lambda p, i: p["blocks"][0]["ffn"]["levels"][i]["mlp"]["down"]["kernel"]
    moved.append((bool(jnp.any(lvl(new, 0) != lvl(params, 0))),
                  bool(jnp.any(lvl(new, 1) != lvl(params, 1)))))
    params = new
  # Step 1 moves nothing (the warmup starts at lr 0); then level 2 only on even steps.
  assert moved == [(False, False), (True, True), (True, False), (True, True)]
  plain = optax.adamw(1e-2)
  assert wrap_outer_frequency(plain, params, tiny()) is plain  # Other modes: unchanged.
