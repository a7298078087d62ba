"""Causal attention: the merged fast form and the decoding layout give the plain form."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax.ops.attention import cached_attention, causal_attention, causal_attention_reference

B, H, S, D = 2, 3, 24, 8


def _as_bshd(cache_NXY, channels_last):
  """The cache `[B*H, S, D]` (values) or `[B*H, D, S]` (keys) as `[B, S, H, D]`."""
  x = cache_NXY.reshape(B, H, *cache_NXY.shape[1:])
  return x.transpose(0, 2, 1, 3) if channels_last else x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("length,offset", [(1, 0), (1, 17), (5, 9)])
def test_cached_attention_equals_the_plain_form(length, offset):
  keys = jax.random.split(jax.random.key(0), 3)
  q_BLHD = jax.random.normal(keys[0], (B, length, H, D))
  k_NDS = jax.random.normal(keys[1], (B * H, D, S))
  v_NSD = jax.random.normal(keys[2], (B * H, S, D))
  kv_len = offset + length
  # Garbage past kv_len must not leak into any output.
  k_NDS = jnp.where(jnp.arange(S) >= kv_len, 1e3, k_NDS)
  v_NSD = jnp.where(jnp.arange(S)[:, None] >= kv_len, -1e3, v_NSD)

  def plain(q, k, v):
    return causal_attention(q, _as_bshd(k, False), _as_bshd(v, True), q_offset=offset,
                            kv_len=kv_len)

  def fast(q, k, v):
    return cached_attention(q, k, v, q_offset=offset, kv_len=kv_len)

  y_fast = jax.jit(fast)(q_BLHD, k_NDS, v_NSD)
  chex.assert_shape(y_fast, (B, length, H, D))
  chex.assert_trees_all_close(y_fast, jax.jit(plain)(q_BLHD, k_NDS, v_NSD), atol=1e-5)
  assert float(jnp.abs(y_fast).max()) < 10.0  # The masked values (1e3) stayed out.
  # Each sequence and head reads its own slice of the merged axis: a change to sequence 1's
  # cache leaves sequence 0's outputs alone.
  y_other = jax.jit(fast)(q_BLHD, k_NDS.at[H:].add(1.0), v_NSD.at[H:].add(1.0))
  np.testing.assert_array_equal(y_other[0], y_fast[0])
  assert not np.allclose(y_other[1], y_fast[1])

  # Same gradients: the boundary write of hope_attention differentiates through the cache.
  w = jax.random.normal(jax.random.key(1), y_fast.shape)
  loss = lambda f: lambda *a: jnp.sum(w * f(*a))
  g_fast = jax.grad(loss(fast), argnums=(0, 1, 2))(q_BLHD, k_NDS, v_NSD)
  g_plain = jax.grad(loss(plain), argnums=(0, 1, 2))(q_BLHD, k_NDS, v_NSD)
  chex.assert_trees_all_close(g_fast, g_plain, atol=1e-5)
  # Positions past kv_len get no gradient.
  np.testing.assert_array_equal(np.asarray(g_fast[1])[:, :, kv_len:], 0.0)


def test_a_float32_cache_of_bfloat16_values_gives_the_bfloat16_attention():
  # A bfloat16 model decodes against a float32 cache (its values held exactly): the queries
  # go up to float32 and the weights are rounded to bfloat16, as the bfloat16 form rounds them.
  keys = jax.random.split(jax.random.key(2), 3)
  q_BLHD = jax.random.normal(keys[0], (B, 1, H, D), jnp.bfloat16)
  k_NDS = jax.random.normal(keys[1], (B * H, D, S), jnp.bfloat16)
  v_NSD = jax.random.normal(keys[2], (B * H, S, D), jnp.bfloat16)
  kw = dict(q_offset=11, kv_len=12)
  plain_BLHD = causal_attention(q_BLHD, _as_bshd(k_NDS, False), _as_bshd(v_NSD, True), **kw)
  wide = lambda **extra: cached_attention(q_BLHD.astype(jnp.float32), k_NDS.astype(jnp.float32),
                                          v_NSD.astype(jnp.float32), **kw, **extra)
  wide_BLHD, unrounded_BLHD = wide(probs_dtype=q_BLHD.dtype), wide()
  assert wide_BLHD.dtype == jnp.float32
  err = lambda y: float(np.abs(np.asarray(y.astype(jnp.bfloat16), np.float32)
                               - np.asarray(plain_BLHD, np.float32)).max())
  # Float32 sums of the same products, rounded once: within a bfloat16 step of the plain form,
  # and closer to it than the float32 attention without the weights' rounding.
  np.testing.assert_allclose(np.asarray(wide_BLHD.astype(jnp.bfloat16), np.float32),
                             np.asarray(plain_BLHD, np.float32), rtol=2 ** -7, atol=1e-3)
  assert err(wide_BLHD) < err(unrounded_BLHD)


@pytest.mark.parametrize("batch,length,offset,kv_len", [(1, 7, 0, None), (3, 5, 0, None),
                                                        (2, 4, 6, 9), (1, 1, 17, 18)])
def test_causal_attention_equals_the_plain_form(batch, length, offset, kv_len):
  s = offset + length if kv_len is None else S
  keys = jax.random.split(jax.random.key(3), 4)
  q_BLHD = jax.random.normal(keys[0], (batch, length, H, D))
  k_BSHD = jax.random.normal(keys[1], (batch, s, H, D))
  v_BSHD = jax.random.normal(keys[2], (batch, s, H, D))
  kw = dict(q_offset=offset, kv_len=kv_len)
  fast = jax.jit(lambda *a: causal_attention(*a, **kw))
  plain = jax.jit(lambda *a: causal_attention_reference(*a, **kw))
  y_fast = fast(q_BLHD, k_BSHD, v_BSHD)
  chex.assert_shape(y_fast, (batch, length, H, D))
  chex.assert_trees_all_close(y_fast, plain(q_BLHD, k_BSHD, v_BSHD), atol=1e-5)
  # The offset and cache length traced, as decoding passes them.
  traced = jax.jit(lambda q, k, v, o, n: causal_attention(q, k, v, q_offset=o, kv_len=n))
  n = jnp.int32(s if kv_len is None else kv_len)
  chex.assert_trees_all_close(traced(q_BLHD, k_BSHD, v_BSHD, jnp.int32(offset), n), y_fast,
                              atol=1e-6)
  w = jax.random.normal(keys[3], y_fast.shape)
  loss = lambda f: lambda *a: jnp.sum(w * f(*a))
  g_fast = jax.grad(loss(fast), argnums=(0, 1, 2))(q_BLHD, k_BSHD, v_BSHD)
  g_plain = jax.grad(loss(plain), argnums=(0, 1, 2))(q_BLHD, k_BSHD, v_BSHD)
  chex.assert_trees_all_close(g_fast, g_plain, atol=1e-5)
  # Heads and sequences stay apart in the merged axis: one (sequence, head)'s keys move only
  # its own outputs, for every head.
  for head in range(H):
    y_moved = np.asarray(fast(q_BLHD, k_BSHD.at[-1, :, head].multiply(2.0), v_BSHD))
    np.testing.assert_array_equal(y_moved[:-1], np.asarray(y_fast)[:-1])
    others = [h for h in range(H) if h != head]
    np.testing.assert_array_equal(y_moved[-1][:, others], np.asarray(y_fast)[-1][:, others])
    assert not np.allclose(y_moved[-1, :, head], y_fast[-1, :, head])
  # Bfloat16 in, bfloat16 out, with the logits in float32 as in the plain form.
  bf = [a.astype(jnp.bfloat16) for a in (q_BLHD, k_BSHD, v_BSHD)]
  y_bf = fast(*bf)
  assert y_bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y_bf, np.float32), np.asarray(plain(*bf), np.float32),
                             atol=2e-2)


def _weight_sized_copies(hlo: str, elements: int) -> list[str]:
  """The copy and transpose instructions (or loop fusions named after them) of `hlo` that
  move at least `elements` float32 values."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= f32\[([\d,]*)\]\{[^}]*\} (\w+)\(", line)
    if not m:
      continue
    op = m.group(2)
    called = re.search(r"calls=%?([\w.-]+)", line)
    is_copy = op in ("copy", "transpose") or (
        op == "fusion" and called and re.search(r"copy|transpose", called.group(1)))
    if is_copy and math.prod(int(x) for x in m.group(1).split(",") if x) >= elements:
      found.append(line.strip()[:160])
  return found


def test_a_batch_of_one_copies_no_attention_weights():
  # A data-parallel batch split over host devices leaves each device one sequence. Written on
  # the [B, L, H, D] axes (`causal_attention_reference`), the compiled forward and backward
  # pass of such a batch transposed or copied the [1, H, L, S] weights four times (XLA:CPU,
  # jaxlib 0.10.2), 27% of transformer_pp's busy time at L=2048; the merged form does not.
  length, h, d = 256, 4, 64
  x_BLHD = jnp.ones((1, length, h, d))

  def copies(attention):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x_BLHD, x_BLHD, x_BLHD).compile()
    return _weight_sized_copies(hlo.as_text(), h * length * length)

  if not copies(causal_attention_reference):  # The detector must see what it looks for.
    pytest.skip("this XLA copies no attention weights in the plain form either")
  assert copies(causal_attention) == []
