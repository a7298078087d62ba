"""Streaming decode equals the parallel forward (spec §7 test 5) and sampling is reproducible."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hope_jax
from hope_jax import sample
from tests.lm_helpers import needs_titans, tiny

L = 13  # Not a multiple of any chunk size (4, 8) used below.


BF16_ATOL = 5e-3  # Logits of size ~0.8: bfloat16 layers summed in other orders (1.7e-3 seen).
STEP = nnx.jit(lambda m, t, c: m.decode_step(t, c))  # Shared: equal structures compile once.


def _stream(model, tokens_BL, max_len):
  step = STEP
  cache = model.init_cache(tokens_BL.shape[0], max_len=max_len)
  outs = []
  for t in range(tokens_BL.shape[1]):
    logits_BV, cache = step(model, tokens_BL[:, t], cache)
    outs.append(logits_BV)
  return jnp.stack(outs, axis=1), cache


CASES = {
    "transformer_pp": dict(block="transformer_pp"),
    "hope_attention_lm_grad": dict(cms_lr=30.0),
    # Parallel with the layer scan; decode (and its boundary recompute) with the layer loop.
    "hope_attention_lm_grad_scan_layers": dict(cms_lr=30.0, scan_layers=True),
    "hope_attention_nested": dict(cms_lr=30.0, cms_variant="nested", cms_chunks=(4, 8, 16)),
    "hope_attention_static": dict(cms_signal="static"),
    "hope_lm_grad": pytest.param(dict(block="hope", cms_lr=30.0, num_layers=1),
                                 marks=needs_titans),
    # Parallel: chunked dual reads (closed form); decode: token schedule reading W_run.
    "hope_dual": pytest.param(dict(block="hope", cms_lr=30.0, num_layers=1, read_mode="dual"),
                              marks=needs_titans),
    "titans_lmm": pytest.param(dict(block="titans_lmm"), marks=needs_titans),
    # bfloat16 projections, a float32 KV cache. transformer_pp: the parallel path attends
    # without the cache (same rounding, other summation order); hope_attention with lm_grad
    # attends through the cached step on both paths.
    "transformer_pp_bf16": dict(block="transformer_pp", dtype="bfloat16"),
    "hope_attention_lm_grad_bf16": dict(cms_lr=30.0, dtype="bfloat16"),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_streaming_equals_parallel(overrides):
  model = hope_jax.build_model(tiny(**overrides), seed=0)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, L), 0, 32)
  parallel_BLV = nnx.jit(lambda m, t: m(t))(model, tokens_BL)
  streamed_BLV, _ = _stream(model, tokens_BL, max_len=16)
  # (The layer scan reassociates sums, and chained writes amplify that: an H100 at 'highest'
  # precision gave 1.4e-5 on 2 of 832 logits in that case.)
  atol = 3e-5 if overrides.get("scan_layers") else 1e-5
  if overrides.get("dtype") == "bfloat16" and overrides.get("block") == "transformer_pp":
    atol = BF16_ATOL
  np.testing.assert_allclose(streamed_BLV, parallel_BLV, atol=atol, rtol=0)


@needs_titans
@pytest.mark.parametrize("block", ["hope", "titans_lmm"])
def test_recurrent_state_does_not_grow(block):
  """For hope/titans_lmm the cache's size is independent of the sequence length."""
  model = hope_jax.build_model(tiny(block), seed=0)
  nbytes = lambda c: sum(x.nbytes for x in jax.tree.leaves(c))
  assert nbytes(model.init_cache(1, max_len=16)) == nbytes(model.init_cache(1, max_len=4096))


@pytest.mark.parametrize("overrides", [dict(cms_lr=30.0),
                                       dict(cms_signal="static", scan_layers=True)],
                         ids=["lm_grad", "static_scan_layers"])
def test_prefill_equals_stepping(overrides):
  # lm_grad: prefill runs decode_step in a scan; static: one parallel piece through the blocks.
  model = hope_jax.build_model(tiny(**overrides), seed=0)
  tokens_BL = jax.random.randint(jax.random.key(2), (2, L), 0, 32)
  last_BV, cache = nnx.jit(lambda m, t: m.prefill(t, m.init_cache(2, max_len=16)))(
      model, tokens_BL)
  streamed_BLV, cache2 = _stream(model, tokens_BL, max_len=16)
  np.testing.assert_allclose(last_BV, streamed_BLV[:, -1], atol=1e-5, rtol=0)
  assert int(cache["pos"]) == int(cache2["pos"]) == L


def test_sampling_is_reproducible():
  model = hope_jax.build_model(tiny(cms_lr=30.0), seed=0)
  prompt = np.array([[1, 2, 3, 4, 5]], np.int32)
  kw = dict(temperature=1.0, top_k=8, top_p=0.9)
  a = sample.generate(model, prompt, 12, seed=3, **kw)
  b = sample.generate(model, prompt, 12, seed=3, **kw)
  c = sample.generate(model, prompt, 12, seed=4, **kw)
  assert a.shape == (1, 12) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c), "a different seed gave the same 12 tokens"


def test_greedy_follows_argmax_of_the_parallel_logits():
  model = hope_jax.build_model(tiny(block="transformer_pp"), seed=0)
  prompt = np.array([[7, 3, 9]], np.int32)
  new = sample.generate(model, prompt, 4, temperature=0.0)
  # The model is causal, so one fixed-length (zero-padded) parallel forward per step suffices.
  forward = nnx.jit(lambda m, t: m(t))
  seq = np.zeros((1, 7), np.int32)
  seq[:, :3] = prompt
  for p in range(3, 7):
    seq[0, p] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, p - 1]))
  np.testing.assert_array_equal(new, seq[:, 3:])


def test_top_k_and_top_p_filters():
  logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  np.testing.assert_array_equal(jnp.isfinite(sample.filter_logits(logits_BV, top_k=2)),
                                [[True, True, False, False]])
  np.testing.assert_array_equal(jnp.isfinite(sample.filter_logits(logits_BV, top_p=0.7)),
                                [[True, True, False, False]])
  np.testing.assert_array_equal(jnp.isfinite(sample.filter_logits(logits_BV, top_p=0.5)),
                                [[True, False, False, False]])


def _loop_copies(hlo_text: str, shapes: tuple[str, ...]) -> list[str]:
  """Copies of arrays of the given shapes in loop bodies: outside the entry computation and
  the branches of conditionals (the CMS boundary write recomputes a chunk into copies of the
  caches, once per C_1 tokens)."""
  branches = {name.strip() for group in re.findall(r"branch_computations=\{([^}]*)\}", hlo_text)
              for name in group.split(",")}
  out, comp = [], ""
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY") or (line.startswith("%") and " (" in line.split("=")[0]):
      comp = line.split()[0]
    elif (comp != "ENTRY" and comp not in branches and " copy(" in line
          and any(s in line for s in shapes)):
      out.append(line.strip())
  return out


@pytest.mark.parametrize("overrides", [dict(block="transformer_pp"),
                                       dict(cms_signal="static"), dict(cms_lr=30.0),
                                       dict(block="transformer_pp", dtype="bfloat16"),
                                       dict(cms_lr=30.0, dtype="bfloat16")],
                         ids=["transformer_pp", "hope_attention_static", "hope_attention_lm_grad",
                              "transformer_pp_bf16", "hope_attention_lm_grad_bf16"])
def test_decoding_updates_the_kv_cache_in_place(overrides):
  if jax.default_backend() != "cpu":
    pytest.skip("the copies this guards against are XLA:CPU's; other backends not checked")
  # A batch of one: a size-1 leading axis on the cache stopped XLA:CPU from updating it in
  # place, and it copied every cache twice per token (docs/performance.md). With lm_grad, the
  # first layer's cache was copied while the boundary write's cond could still read it.
  model = hope_jax.build_model(tiny(**overrides), seed=0)
  graphdef, state = nnx.split(model)
  max_len, heads, dh = 37, model.cfg.num_heads, model.cfg.head_dim

  def run(state, tok_B):
    m = nnx.merge(graphdef, state)

    def body(carry, _):
      tok_B, cache = carry
      logits_BV, cache = m.decode_step(tok_B, cache)
      return (jnp.argmax(logits_BV, -1).astype(jnp.int32), cache), None

    return jax.lax.scan(body, (tok_B, m.init_cache(1, max_len=max_len)), None, length=8)[0]

  hlo = jax.jit(run).lower(state, jnp.zeros((1,), jnp.int32)).compile().as_text()
  shapes = (f"f32[{heads},{dh},{max_len}]", f"f32[{heads},{max_len},{dh}]")
  assert any(s in hlo for s in shapes)  # The cache is there, in the layout looked for.
  assert _loop_copies(hlo, shapes) == []
  # A bfloat16 model reads its float32 cache as it is: no token casts a whole cache down (and
  # XLA:CPU widened a bfloat16 cache back to float32 for its update, so one is no better).
  assert not any(s.replace("f32", "bf16") in hlo for s in shapes)


def test_decoding_past_max_len_is_nan_not_silently_wrong():
  # The KV cache's update would be clamped onto its last slot: plausible, wrong logits.
  model = hope_jax.build_model(tiny(block="transformer_pp"), seed=0)
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 6), 0, 32)
  streamed_BLV, _ = _stream(model, tokens_BL, max_len=4)
  assert np.isfinite(np.asarray(streamed_BLV[:, :4])).all()
  assert np.isnan(np.asarray(streamed_BLV[:, 4:])).all()
  with pytest.raises(ValueError, match="max_len=4 is shorter than the prompt"):
    sample.generate(model, np.asarray(tokens_BL[:, :3]), 2, max_len=4)
  with pytest.raises(ValueError, match=r"must be \[batch, length\] token ids .*got shape \(3,\)"):
    sample.generate(model, np.asarray(tokens_BL[0, :3]), 2)


@needs_titans
def test_max_len_binds_only_models_with_an_attention_cache():
  # A titans_lmm cache has no length: a max_len shorter than the output is not an error.
  model = hope_jax.build_model(tiny(block="titans_lmm"), seed=0)
  out = sample.generate(model, np.array([[1, 2, 3]], np.int32), 3, max_len=4)
  assert out.shape == (1, 3)


def test_generate_refuses_settings_that_would_sample_nonsense():
  # Each of these used to return a row of token 0 (top_p=0 masked every logit, nan
  # temperature and out-of-vocabulary ids gave NaN logits) or fail deep inside JAX.
  model = hope_jax.build_model(tiny(block="transformer_pp"), seed=0)
  prompt = np.array([[1, 2, 3]], np.int32)
  for kw, message in ((dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                      (dict(top_p=2.0), r"top_p must be in \(0, 1\]"),
                      (dict(temperature=float("nan")), "temperature must be a finite number"),
                      (dict(temperature=float("inf")), "temperature must be a finite number"),
                      (dict(top_k=-1), "top_k must be an integer >= 0"),
                      (dict(seed=None), "seed must be an integer, got None"),
                      (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
                      (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0")):
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=message):
      sample.generate(model, prompt, **kw)
  for bad, message in (([[300, 1]], "token id 300, outside the model's vocabulary"),
                       ([[-5, 3]], "token id -5, outside"), (np.zeros((1, 0), np.int32),
                                                             r"length >= 1\), got shape \(1, 0\)")):
    with pytest.raises(ValueError, match=message):
      sample.generate(model, np.asarray(bad), 2)
  # The smallest nucleus keeps the top token: greedy, not token 0.
  tiny_p = sample.generate(model, prompt, 4, temperature=1.0, top_p=1e-9)
  np.testing.assert_array_equal(tiny_p, sample.generate(model, prompt, 4, temperature=0.0))


def test_generate_compiles_again_for_a_state_of_another_dtype():
  # The compiled program was cached by the model's structure alone: the same model cast to
  # bfloat16 then failed with "Argument types differ from the types for which this
  # computation was compiled".
  model = hope_jax.build_model(tiny(block="transformer_pp"), seed=0)
  prompt = np.array([[1, 2, 3]], np.int32)
  sample.generate(model, prompt, 2, temperature=0.0)
  graphdef, state = nnx.split(model)
  cast = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  assert sample.generate(cast, prompt, 2, temperature=0.0).shape == (1, 2)
