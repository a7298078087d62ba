"""The per-head residual MLP memory and its analytic inner gradients (spec §2.2, §2.4).

Axis letters: N tokens, D the head width Dh, E the memory's hidden width.
Weights are stored as "output x input" so that every update has the form
`W <- W P + S` with a rank-1 gradient `G = d kappa^T` (spec §2.7):

  M(x) = x + W1 sigma(W2 x),   W1_DE: [Dh, E],   W2_ED: [E, Dh],   sigma = GELU(tanh).

Every function here is for one memory of one head; callers `vmap` over memories,
heads and batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu(x):
  """GELU with the tanh approximation (spec §2.2)."""
  return jax.nn.gelu(x, approximate=True)


def gelu_prime(x):
  """Derivative of `gelu`, written out so the inner gradient is analytic (spec §2.4)."""
  u = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
  t = jnp.tanh(u)
  du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def mlp_apply(W1_DE: Float[Array, "D E"], W2_ED: Float[Array, "E D"],
              x_ND: Float[Array, "N D"]) -> Float[Array, "N D"]:
  """Reads the residual memory: `x + W1 gelu(W2 x)` for every row of `x_ND`."""
  h_NE = gelu(jnp.einsum("ed,nd->ne", W2_ED, x_ND))
  return x_ND + jnp.einsum("de,ne->nd", W1_DE, h_NE)


def l2norm(x, eps: float = 1e-6):
  """Unit-norm rows; the key inside the DGD factor must have norm 1 (spec §6)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _safe_norm(x_ND):
  # sqrt(x.x + tiny): finite gradient at x = 0 (a padded token has e = 0 after masking).
  return jnp.sqrt(jnp.sum(x_ND * x_ND, axis=-1, keepdims=True) + 1e-12)


def _clip_scale(norm_N1, g_max: float):
  """min(1, g_max / norm), written so it is smooth where no clipping happens."""
  return g_max / jnp.maximum(norm_N1, g_max)


def inner_grads(W1_DE, W2_ED, k_ND, vhat_ND, *, clip: float = 0.0):
  """Per-token gradients of 1/2 |M(k) - vhat|^2 at the given (chunk-start) weights.

  `vhat` is a constant of the inner objective (its outer gradient still flows).

  Args:
    W1_DE, W2_ED: the memory's weights at chunk start.
    k_ND: keys (unit norm), one per token.
    vhat_ND: targets.
    clip: g_max of spec §2.4; each token's (e, delta) is scaled so that
      |e||h| <= g_max and |delta| <= g_max (0 disables clipping).

  Returns:
    (e_ND, h_NE, delta_NE): grad W1 = e h^T, grad W2 = delta k^T for each token.
  """
  z_NE = jnp.einsum("ed,nd->ne", W2_ED, k_ND)
  h_NE = gelu(z_NE)
  e_ND = k_ND + jnp.einsum("de,ne->nd", W1_DE, h_NE) - vhat_ND
  # delta is built from the unclipped e: both clips bound the two layers' gradients separately.
  delta_NE = jnp.einsum("de,nd->ne", W1_DE, e_ND) * gelu_prime(z_NE)
  if clip > 0:
    e_ND = e_ND * _clip_scale(_safe_norm(e_ND) * _safe_norm(h_NE), clip)
    delta_NE = delta_NE * _clip_scale(_safe_norm(delta_NE), clip)
  return e_ND, h_NE, delta_NE


def linear_apply(W_DD, x_ND):
  """The linear memory of spec §7 test 6: M(x) = W x."""
  return jnp.einsum("od,nd->no", W_DD, x_ND)


def linear_inner_grad(W_DD, k_ND, vhat_ND, *, objective: str = "l2"):
  """Per-token gradient `d` (grad W = d k^T) of a linear memory at chunk start.

  objective="l2": 1/2 |W k - vhat|^2, d = W k - vhat (Eq. 93).
  objective="dot": -<W k, vhat>, d = -vhat (Eq. 92).
  """
  if objective == "l2":
    return linear_apply(W_DD, k_ND) - vhat_ND
  if objective == "dot":
    return -vhat_ND
  raise ValueError(f"objective={objective!r} is not one of ('l2', 'dot')")
