"""Broadcasts of shared values whose backward sums XLA:CPU runs fast.

`broadcast_batch`: a leading batch axis for shared values, with a backward pass that sums it
pairwise. `to_shape_of`: a parameter at an activation's full shape (see its docstring).

The Titans sublayer starts every sequence's fast weights at the shared meta-init, so the
meta-init's gradient is a sum over the batch. JAX's transpose of `broadcast_to` is a
`reduce_sum` over the leading axis, and XLA:CPU's YNNPACK fusions run that reduction
~30x slower than adds of the axis' halves (`[8, 4, 1, 64, 256]` float32: ~9 ms against
0.2-0.3 ms, docs/performance.md). `broadcast_batch` sums by halving instead; on every
backend that is float32 adds, so the result does not depend on matmul precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def to_shape_of(p, x):
  """`p` (a parameter, size-one axes where it does not vary) broadcast to `x`'s whole shape.

  Its gradient is then one sum over every broadcast axis. Written as `p[None, None, :]` and
  left to the elementwise op, the transpose sums only over the axes the broadcast grows; with
  one sequence per device (a data-parallel batch split over host devices) the batch axis is
  not among them, and XLA:CPU ran the sum over the length axis alone as a YNNPACK reduction
  of a middle axis, 3-4x slower (docs/performance.md, session 38).
  """
  return jnp.broadcast_to(p.astype(x.dtype), x.shape)


def pairwise_sum(x_B):
  """Sum over the leading axis by adding its halves until one row is left."""
  while x_B.shape[0] > 1:
    half = x_B.shape[0] // 2
    s = x_B[:half] + x_B[half:2 * half]
    x_B = jnp.concatenate([s, x_B[2 * half:]], 0) if x_B.shape[0] % 2 else s
  return x_B[0]


def broadcast_batch_reference(x, batch_size: int):
  """`x` repeated along a new leading axis of `batch_size` (JAX's own backward pass)."""
  return jnp.broadcast_to(x[None], (batch_size, *x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(x, batch_size: int):
  """`broadcast_batch_reference` whose cotangent is summed by `pairwise_sum`."""
  return broadcast_batch_reference(x, batch_size)


def _broadcast_fwd(x, batch_size):
  return broadcast_batch_reference(x, batch_size), None


def _broadcast_bwd(batch_size, _, g_B):
  del batch_size
  return (pairwise_sum(g_B),)


broadcast_batch.defvjp(_broadcast_fwd, _broadcast_bwd)
