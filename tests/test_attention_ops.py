"""The decoding layout of the KV cache gives the plain causal attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax.ops.attention import cached_attention, causal_attention

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
