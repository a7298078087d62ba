"""Small NNX building blocks shared by every block type."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hope_jax.ops.broadcast import to_shape_of

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def normal(std: float):
  return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale (computed in float32)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * to_shape_of(self.scale[...], y)).astype(x.dtype)


class Linear(nnx.Module):
  """A bias-free linear map `x @ W` with W ~ N(0, std^2)."""

  def __init__(self, d_in: int, d_out: int, *, std: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel = nnx.Param(normal(std)(rngs.params(), (d_in, d_out), param_dtype))
    self.dtype = dtype

  def __call__(self, x):
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class SwiGLU(nnx.Module):
  """W_down(SiLU(W_gate x) * W_up x), no biases."""

  def __init__(self, dim: int, hidden: int, *, num_layers: int, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = Linear(dim, hidden, std=0.02, **kw)
    self.up = Linear(dim, hidden, std=0.02, **kw)
    self.down = Linear(hidden, dim, std=0.02 / (2 * num_layers) ** 0.5, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
