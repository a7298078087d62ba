"""Pure-JAX pieces of the Continuum Memory System (spec §3).

A CMS level is a pre-norm residual SwiGLU. Under `cms_signal="lm_grad"` every
sequence owns fast weights `theta = theta_0 + delta` per level; the deltas and
the gradient accumulators live in a per-layer dict

  {"delta": [level -> {"gate": W_BDF, "up": W_BDF, "down": W_BFD}],
   "acc":   [same shapes],                       # grads since the level's last write
   "slow":  [levels 0..K-2],  "slow_acc": [...]} # only for cms_variant="nested"

and `schedule_update` applies spec §3.2/§3.4 at the end of every C_1-token chunk.
Axis letters: B batch, L length, D model width, F level hidden width.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Weights = dict[str, Array]  # {"gate", "up", "down"} of one level.


def _swiglu_parts(x_BLD, w: Weights):
  """(y_BLD, g_BLF, u_BLF): the output and the two hidden pre-activations."""
  g_BLF = jnp.einsum("bld,bdf->blf", x_BLD, w["gate"].astype(x_BLD.dtype))
  u_BLF = jnp.einsum("bld,bdf->blf", x_BLD, w["up"].astype(x_BLD.dtype))
  y_BLD = jnp.einsum("blf,bfd->bld", jax.nn.silu(g_BLF) * u_BLF, w["down"].astype(x_BLD.dtype))
  return y_BLD, g_BLF, u_BLF


def swiglu_batched(x_BLD: Float[Array, "B L D"], w: Weights) -> Float[Array, "B L D"]:
  """SwiGLU with per-sequence weights: `w` holds `[B, D, F]`/`[B, F, D]` matrices."""
  return _swiglu_parts(x_BLD, w)[0]


def swiglu_batched_reference(x_BLD, w: Weights):
  """Reference twin of `swiglu_batched`: one plain SwiGLU per sequence via a Python loop."""
  outs = []
  for b in range(x_BLD.shape[0]):
    h = jax.nn.silu(x_BLD[b] @ w["gate"][b]) * (x_BLD[b] @ w["up"][b])
    outs.append(h @ w["down"][b])
  return jnp.stack(outs)


@jax.custom_vjp
def swiglu_delta(x_BLD: Float[Array, "B L D"], theta0: Weights, delta: Weights
                 ) -> Float[Array, "B L D"]:
  """`swiglu_batched(x, add_delta(theta0, delta))` with a hand-written backward pass.

  The same function and gradients as that composition (tested), but:
  - d theta0 is one matmul over every token of the batch (X^T G with B and L flattened);
    autodiff of the composition forms per-sequence products `[B, D, F]` and reduces them
    over B, which XLA:CPU fuses into a slow reduction (1.4 s of a HOPE train step's 14.7 s
    of busy thread time at D=256, 4 layers, L=512, B=8);
  - the residuals are x, the two hidden activations and the operands theta0 and delta; the
    sum theta0 + delta (three more `[B, D, F]` arrays per level) is not kept but formed again
    in the backward pass.
  Unused cotangents cost nothing: the in-context write needs only d delta and the outer
  gradient only d theta0 and d x, and XLA drops the rest.
  """
  return swiglu_batched(x_BLD, add_delta(theta0, delta))


def _swiglu_delta_fwd(x_BLD, theta0, delta):
  y_BLD, g_BLF, u_BLF = _swiglu_parts(x_BLD, add_delta(theta0, delta))
  return y_BLD, (x_BLD, g_BLF, u_BLF, theta0, delta)


def _swiglu_delta_bwd(res, dy_BLD):
  x_BLD, g_BLF, u_BLF, theta0, delta = res
  w = {k: v.astype(x_BLD.dtype) for k, v in add_delta(theta0, delta).items()}
  sig_BLF = jax.nn.sigmoid(g_BLF)
  silu_BLF = g_BLF * sig_BLF
  a_BLF = silu_BLF * u_BLF
  dy_BLD = dy_BLD.astype(x_BLD.dtype)
  da_BLF = jnp.einsum("bld,bfd->blf", dy_BLD, w["down"])
  du_BLF = da_BLF * silu_BLF
  dg_BLF = da_BLF * u_BLF * sig_BLF * (1 + g_BLF * (1 - sig_BLF))  # d silu / d g.
  dx_BLD = (jnp.einsum("blf,bdf->bld", dg_BLF, w["gate"])
            + jnp.einsum("blf,bdf->bld", du_BLF, w["up"]))
  # Each weight's gradient once per sequence (for delta) and once contracted over the batch
  # too (theta0 is shared): one matmul each instead of a reduction of the per-sequence ones.
  pairs = {"gate": (x_BLD, dg_BLF), "up": (x_BLD, du_BLF), "down": (a_BLF, dy_BLD)}
  f32 = jnp.float32
  d_delta = {k: jnp.einsum("bli,blo->bio", a, b, preferred_element_type=f32).astype(
      delta[k].dtype) for k, (a, b) in pairs.items()}
  d_theta0 = {k: jnp.einsum("bli,blo->io", a, b, preferred_element_type=f32).astype(
      theta0[k].dtype) for k, (a, b) in pairs.items()}
  return dx_BLD, d_theta0, d_delta


swiglu_delta.defvjp(_swiglu_delta_fwd, _swiglu_delta_bwd)


def add_delta(theta0: Weights, delta: Weights) -> Weights:
  """Per-sequence weights `theta_0 + delta` (theta_0 broadcast over the batch)."""
  return {k: theta0[k][None].astype(jnp.float32) + delta[k] for k in theta0}


def clip_by_norm(g: Weights, max_norm: float) -> Weights:
  """Scales each sequence's gradient so its joint Frobenius norm is at most `max_norm`."""
  sq_B = sum(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))) for v in g.values())
  scale_B = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq_B) + 1e-12))
  return {k: v * scale_B.reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in g.items()}


def level_boundaries(tokens_seen, chunks: Sequence[int]):
  """Which levels write after `tokens_seen` tokens: `tokens_seen % C_l == 0` (bool per level)."""
  return [jnp.equal(jnp.mod(tokens_seen, c), 0) for c in chunks]


def levels_read(chunks: Sequence[int], length: int) -> tuple[bool, ...]:
  """Which levels write at a boundary that a later token of a `length`-token piece reads.

  Level l writes after every C_l tokens from the piece's start (`level_boundaries`). Its
  first write comes after C_l tokens, so with C_l >= length no token reads any of its writes:
  every output sees its initial weights, and its gradients only feed the final fast state.
  """
  return tuple(c < length for c in chunks)


def frozen_levels(chunks: Sequence[int], length: int, variant: str) -> tuple[int, ...]:
  """The levels a logits-only forward over `length` (padded) tokens freezes: those whose
  writes no token reads (`levels_read`); none under the nested variant, whose levels restart
  from each other's slow weights."""
  if variant == "nested":
    return ()
  return tuple(i for i, r in enumerate(levels_read(chunks, length)) if not r)


def init_fast_state(shapes: Sequence[dict[str, tuple[int, ...]]], batch_size: int,
                    nested: bool) -> dict[str, Any]:
  """Zero deltas and accumulators for levels with the given weight shapes."""
  zeros = lambda: [{k: jnp.zeros((batch_size,) + s, jnp.float32) for k, s in lvl.items()}
                   for lvl in shapes]
  state = {"delta": zeros(), "acc": zeros()}
  if nested:
    state["slow"] = zeros()[:-1]
    state["slow_acc"] = zeros()[:-1]
  return state


def schedule_update(state: dict[str, Any], grads: list[Weights], tokens_seen,
                    chunks: Sequence[int], lr: float, clip: float) -> dict[str, Any]:
  """Adds one chunk's gradients and applies every level whose boundary is reached.

  Spec §3.2: at a multiple of C_l, theta_l <- theta_l - lr * clip(sum of the chunk grads
  since the last write). Spec §3.4 nested: at a multiple of C_{l+1}, level l restarts from
  its slow init phi_l, which first takes a step on level l's grads over that C_{l+1} window.

  Args:
    state: the per-layer fast state (see the module docstring).
    grads: per level, the gradient of this chunk's loss w.r.t. the level's current weights.
    tokens_seen: tokens processed including this chunk (a traced int is fine).
    chunks: (C_1, ..., C_K).
  """
  hits = level_boundaries(tokens_seen, chunks)
  step = lambda w, a: jax.tree.map(lambda x, y: x - lr * y, w, clip_by_norm(a, clip))
  pick = lambda c, a, b: jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)
  zero = lambda t: jax.tree.map(jnp.zeros_like, t)
  new = {"delta": [], "acc": []}
  for lvl, g in enumerate(grads):
    acc = jax.tree.map(jnp.add, state["acc"][lvl], g)
    new["delta"].append(pick(hits[lvl], step(state["delta"][lvl], acc), state["delta"][lvl]))
    new["acc"].append(pick(hits[lvl], zero(acc), acc))
  if "slow" in state:
    new["slow"], new["slow_acc"] = [], []
    for lvl in range(len(chunks) - 1):
      slow_acc = jax.tree.map(jnp.add, state["slow_acc"][lvl], grads[lvl])
      slow = pick(hits[lvl + 1], step(state["slow"][lvl], slow_acc), state["slow"][lvl])
      new["slow"].append(slow)
      new["slow_acc"].append(pick(hits[lvl + 1], zero(slow_acc), slow_acc))
      # The reset overrides the level's own write at the same boundary.
      new["delta"][lvl] = pick(hits[lvl + 1], slow, new["delta"][lvl])
      new["acc"][lvl] = pick(hits[lvl + 1], zero(new["acc"][lvl]), new["acc"][lvl])
  return new


def masked_token_ce(logits_BLV, targets_BL, mask_BL):
  """Sum over tokens (and the batch) of next-token cross-entropy in float32, masked."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BL * mask_BL)
