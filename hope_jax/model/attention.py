"""Causal multi-head softmax attention with RoPE (Transformer++ and HOPE-Attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.layers import DTYPES, Linear
from hope_jax.ops import attention as attn_ops


class Attention(nnx.Module):
  """Pre-projected MHA: q, k, v, o projections without biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
    self.q = Linear(d, d, std=0.02, **kw)
    self.k = Linear(d, d, std=0.02, **kw)
    self.v = Linear(d, d, std=0.02, **kw)
    self.o = Linear(d, d, std=0.02 / (2 * cfg.num_layers) ** 0.5, **kw)
    self.num_heads, self.head_dim, self.theta = cfg.num_heads, cfg.head_dim, cfg.rope_theta

  def _qkv(self, u_BLD, positions_L):
    b, l, _ = u_BLD.shape
    shape = (b, l, self.num_heads, self.head_dim)
    q_BLHK, k_BLHK, v_BLHK = (f(u_BLD).reshape(shape) for f in (self.q, self.k, self.v))
    cos, sin = attn_ops.rope_angles(positions_L, self.head_dim, self.theta)
    return attn_ops.apply_rope(q_BLHK, cos, sin), attn_ops.apply_rope(k_BLHK, cos, sin), v_BLHK

  def __call__(self, u_BLD):
    q, k, v = self._qkv(u_BLD, jnp.arange(u_BLD.shape[1]))
    y_BLHK = attn_ops.causal_attention(q, k, v)
    return self.o(y_BLHK.reshape(u_BLD.shape))

  # Recurrent interface shared by every mixer: `init_state` and `step`.
  def init_state(self, batch_size: int, max_len: int):
    """A preallocated float32 KV cache of `max_len` positions, batch and heads merged
    (N = B * H): keys `[N, Dh, S]`, values `[N, S, Dh]` (the layout
    `ops.attention.cached_attention` reads). Float32 whatever the model's dtype: a bfloat16
    model's keys and values are held exactly.
    """
    n, dh, f32 = batch_size * self.num_heads, self.head_dim, jnp.float32
    return {"k": jnp.zeros((n, dh, max_len), f32), "v": jnp.zeros((n, max_len, dh), f32),
            "pos": jnp.zeros((), jnp.int32)}

  def splits(self, length: int) -> bool:
    """Never: a piece's own keys and values shape its outputs (see `SelfModTitans.splits`)."""
    del length
    return False

  def step(self, u_BLD, cache, aligned: bool = False):
    """Processes L new tokens against the cache (exactly as the parallel call would).

    `aligned` is accepted for interface parity with the Titans mixer; any position works.
    """
    del aligned
    pos = cache["pos"]
    b, length, _ = u_BLD.shape
    q, k, v = self._qkv(u_BLD, pos + jnp.arange(length))
    n, dh = b * self.num_heads, self.head_dim
    k_NDL = k.transpose(0, 2, 3, 1).reshape(n, dh, length)
    v_NLD = attn_ops.merge_heads(v)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_NDL.astype(cache["k"].dtype), pos, 2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_NLD.astype(cache["v"].dtype), pos, 1)
    new_pos = pos + length
    # The products run in float32: casting the few queries up, not the whole cache down,
    # saves a pass over every layer's cache per token (docs/performance.md, generation).
    y_BLHK = attn_ops.cached_attention(q.astype(k_cache.dtype), k_cache, v_cache, q_offset=pos,
                                       kv_len=new_pos, probs_dtype=q.dtype)
    # Past the cache's `max_len` the update above is clamped onto its last slots, which would
    # give plausible but wrong outputs: NaN instead, so the misuse shows.
    y_BLHK = jnp.where(new_pos <= cache["k"].shape[2], y_BLHK, jnp.nan)
    return (self.o(y_BLHK.astype(q.dtype).reshape(u_BLD.shape)),
            {"k": k_cache, "v": v_cache, "pos": new_pos})
