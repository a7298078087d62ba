"""Causal depthwise 1-D convolution with a carried buffer (spec §2.1, §5)."""

from __future__ import annotations

import jax.numpy as jnp

from hope_jax.ops.broadcast import to_shape_of


def causal_dwconv(x_BLD, w_KD, b_D, prev_BKD):
  """y_t = b + sum_j w[j] x_{t-K+1+j}, continuing from the previous K-1 rows.

  Args:
    x_BLD: new inputs.
    w_KD: taps (the last tap multiplies the current token).
    b_D: bias.
    prev_BKD: the K-1 rows before x (zeros at the sequence start).

  Returns:
    (y_BLD, new_prev_BKD): outputs and the last K-1 rows of [prev, x].
  """
  k = w_KD.shape[0]
  length = x_BLD.shape[1]
  xp_BSD = jnp.concatenate([prev_BKD.astype(x_BLD.dtype), x_BLD], axis=1)
  y_BLD = to_shape_of(b_D, x_BLD)  # Full-shape parameters: one gradient sum over B and L.
  for j in range(k):  # K = 4 taps: a static unroll of shifted multiply-adds.
    y_BLD = y_BLD + xp_BSD[:, j:j + length] * to_shape_of(w_KD[j], x_BLD)
  # The buffer keeps the state's dtype (float32) whatever the compute dtype, so a scan
  # carrying it stays type-stable under bfloat16.
  return y_BLD, xp_BSD[:, xp_BSD.shape[1] - (k - 1):].astype(prev_BKD.dtype)
