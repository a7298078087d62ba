"""Causal softmax attention with rotary position embeddings (pure JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_angles(positions_L: Int[Array, " L"], head_dim: int, theta: float):
  """cos/sin tables `[L, Dh/2]` for rotary embeddings."""
  inv_freq_K = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang_LK = positions_L.astype(jnp.float32)[:, None] * inv_freq_K[None, :]
  return jnp.cos(ang_LK), jnp.sin(ang_LK)


def apply_rope(x_BLHD: Float[Array, "B L H D"], cos_LK, sin_LK) -> Float[Array, "B L H D"]:
  """Rotates channel pairs (first half, second half) by the position angle."""
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_LK[None, :, None, :], sin_LK[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)


def causal_attention(q_BLHD, k_BSHD, v_BSHD, q_offset: int | Array = 0,
                     kv_len: int | Array | None = None):
  """Softmax attention where query i (at absolute position q_offset + i) sees keys <= it.

  The products run over the batch and head axes merged (N = B * H), as `cached_attention`'s
  do. With the batch kept as its own axis, a batch of one (a host device's share of a
  data-parallel batch) let XLA:CPU lay the `[H, L, S]` weights out against the products and
  copy them: `transformer_pp`'s L=2048 step spent 27% of its busy time in those copies
  (docs/performance.md). `causal_attention_reference` is the plain form (tested equal).

  Args:
    q_BLHD: queries; k_BSHD, v_BSHD: keys/values for absolute positions 0..S-1.
    q_offset: absolute position of the first query (decoding with a KV cache).
    kv_len: number of valid cached keys (positions >= kv_len are masked).

  Returns:
    `[B, L, H, Dv]` outputs in the values' dtype.
  """
  b, length, _, d = q_BLHD.shape
  logits_NLS = jnp.einsum("nld,nsd->nls", merge_heads(q_BLHD), merge_heads(k_BSHD),
                          preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  mask_LS = _causal_mask(length, k_BSHD.shape[1], q_offset, kv_len)
  logits_NLS = jnp.where(mask_LS[None], logits_NLS, -1e30)
  probs_NLS = jax.nn.softmax(logits_NLS, axis=-1).astype(v_BSHD.dtype)
  return _split_heads(jnp.einsum("nls,nsd->nld", probs_NLS, merge_heads(v_BSHD)), b)


def causal_attention_reference(q_BLHD, k_BSHD, v_BSHD, q_offset: int | Array = 0,
                               kv_len: int | Array | None = None):
  """`causal_attention` written on the `[B, L, H, D]` axes as they come: the reference."""
  d = q_BLHD.shape[-1]
  logits_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHD, k_BSHD,
                           preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  mask_LS = _causal_mask(q_BLHD.shape[1], k_BSHD.shape[1], q_offset, kv_len)
  logits_BHLS = jnp.where(mask_LS[None, None], logits_BHLS, -1e30)
  probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1).astype(v_BSHD.dtype)
  return jnp.einsum("bhls,bshd->blhd", probs_BHLS, v_BSHD)


def merge_heads(x_BXHD):
  """`[B, X, H, D]` -> `[B * H, X, D]`, batch-major: the merged axis of the products and cache."""
  b, x, h, d = x_BXHD.shape
  return x_BXHD.swapaxes(1, 2).reshape(b * h, x, d)


def _split_heads(y_NXD, b: int):
  """`[B * H, X, D]` -> `[B, X, H, D]`: `merge_heads` undone."""
  n, x, d = y_NXD.shape
  return y_NXD.reshape(b, n // b, x, d).swapaxes(1, 2)


def _causal_mask(length: int, s: int, q_offset, kv_len):
  """`[L, S]`: key j is visible to query i when j <= q_offset + i (and j < kv_len)."""
  qpos_L = q_offset + jnp.arange(length)
  kpos_S = jnp.arange(s)
  mask_LS = kpos_S[None, :] <= qpos_L[:, None]
  if kv_len is not None:
    mask_LS = mask_LS & (kpos_S[None, :] < kv_len)
  return mask_LS


def cached_attention(q_BLHD, k_cache_NDS, v_cache_NSD, q_offset: int | Array,
                     kv_len: int | Array,
                     probs_dtype: jnp.dtype | None = None) -> Float[Array, "B L H D"]:
  """`causal_attention` against a KV cache laid out for decoding.

  The cache merges the batch and head axes (N = B * H) and holds keys channel-major,
  `[N, D, S]`, and values `[N, S, D]`: the operands of the two products as they stand, so no
  token transposes the cache. The merged axis keeps a size-1 batch from being a size-1
  leading axis, which stopped XLA:CPU from updating the loop-carried cache in place (it
  copied every cache twice per token; docs/performance.md). `causal_attention` over the
  same cache as `[B, S, H, D]` gives the same (tested equal).

  Args:
    q_BLHD: queries at absolute positions q_offset .. q_offset + L - 1.
    k_cache_NDS, v_cache_NSD: the cache, positions 0 .. S - 1 (N = B * H, batch-major);
      positions >= kv_len are masked.
    q_offset: absolute position of the first query.
    kv_len: number of valid cached positions.
    probs_dtype: the attention weights are rounded to it before the value product (default:
      the values' dtype). A bfloat16 model reading a float32 cache passes bfloat16, so the
      weights are what `causal_attention` on its bfloat16 values would use.
  """
  b, length, _, d = q_BLHD.shape
  logits_NLS = jnp.einsum("nld,nds->nls", merge_heads(q_BLHD), k_cache_NDS,
                          preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  mask_LS = _causal_mask(length, k_cache_NDS.shape[-1], q_offset, kv_len)
  logits_NLS = jnp.where(mask_LS[None], logits_NLS, -1e30)
  probs_NLS = jax.nn.softmax(logits_NLS, axis=-1)
  if probs_dtype is not None:
    probs_NLS = probs_NLS.astype(probs_dtype)
  probs_NLS = probs_NLS.astype(v_cache_NSD.dtype)
  return _split_heads(jnp.einsum("nls,nsd->nld", probs_NLS, v_cache_NSD), b)
