"""The per-head residual MLP memory and its analytic inner gradients (spec §2.2, §2.4).

Axis letters: N tokens, D the head width Dh, E the memory's hidden width.
Weights are stored as "output x input" so that every update has the form
`W <- W P + S` with a rank-1 gradient `G = d kappa^T` (spec §2.7):

  M(x) = x + W1 sigma(W2 x),   W1_DE: [Dh, E],   W2_ED: [E, Dh],   sigma = GELU(tanh).

Every function here is for one memory of one head; callers `vmap` over memories,
heads and batch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu(x):
  """GELU with the tanh approximation (spec §2.2)."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_and_derivatives(z):
  """gelu(z), gelu'(z) and gelu''(z) from one tanh (the tanh approximation of spec §2.2)."""
  t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_C * z * z * z))
  du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)  # d/dz of tanh's argument u.
  sech2 = 1.0 - t * t
  g0 = 0.5 * z * (1.0 + t)
  g1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
  # d/dz of g1 = sech2 (du + z (u''/2 - t du^2)), with u'' = 6 c a z.
  g2 = sech2 * (du + 0.5 * z * (6.0 * _SQRT_2_OVER_PI * _GELU_C * z - 2.0 * t * du * du))
  return g0, g1, g2


def gelu_prime(x):
  """Derivative of `gelu`, written out so the inner gradient is analytic (spec §2.4)."""
  return _gelu_and_derivatives(x)[1]


def mlp_apply_reference(W1_DE: Float[Array, "D E"], W2_ED: Float[Array, "E D"],
                        x_ND: Float[Array, "N D"]) -> Float[Array, "N D"]:
  """Reads the residual memory: `x + W1 gelu(W2 x)` for every row of `x_ND`.

  The plain composition, differentiated by JAX: the reference of `mlp_apply`.
  """
  h_NE = gelu(jnp.einsum("ed,nd->ne", W2_ED, x_ND))
  return x_ND + jnp.einsum("de,ne->nd", W1_DE, h_NE)


def _mlp_apply_fwd(W1_DE, W2_ED, x_ND):
  h_NE, g1_NE, _ = _gelu_and_derivatives(jnp.einsum("ed,nd->ne", W2_ED, x_ND))
  return x_ND + jnp.einsum("de,ne->nd", W1_DE, h_NE), (W1_DE, W2_ED, x_ND, h_NE, g1_NE)


def _mlp_apply_bwd(res, gy_ND):
  W1_DE, W2_ED, x_ND, h_NE, g1_NE = res
  gz_NE = jnp.einsum("nd,de->ne", gy_ND, W1_DE) * g1_NE
  return (jnp.einsum("nd,ne->de", gy_ND, h_NE), jnp.einsum("ne,nd->ed", gz_NE, x_ND),
          gy_ND + jnp.einsum("ne,ed->nd", gz_NE, W2_ED))


@jax.custom_vjp
def mlp_apply(W1_DE: Float[Array, "D E"], W2_ED: Float[Array, "E D"],
              x_ND: Float[Array, "N D"]) -> Float[Array, "N D"]:
  """Reads the residual memory: `x + W1 gelu(W2 x)` for every row of `x_ND`.

  `mlp_apply_reference` with a hand-written backward pass: gelu' comes from the forward's
  tanh, and each weight's cotangent is one product (tested equal to the reference's).
  """
  return _mlp_apply_fwd(W1_DE, W2_ED, x_ND)[0]


mlp_apply.defvjp(_mlp_apply_fwd, _mlp_apply_bwd)


def rowdot(a, b):
  """sum(a * b, -1, keepdims=True), as a contraction.

  XLA:CPU runs the multiply-and-reduce form as a YNNPACK reduction, ~5x slower than the
  contraction (`[8, 4, 64, 256]` float32: 1.1 ms against 0.23 ms, docs/performance.md);
  HIGHEST keeps the contraction in float32 where a backend would round a dot (TF32).
  """
  return jnp.einsum("...d,...d->...", a, b, precision=jax.lax.Precision.HIGHEST)[..., None]


def l2norm(x, eps: float = 1e-6):
  """Unit-norm rows; the key inside the DGD factor must have norm 1 (spec §6)."""
  return x * jax.lax.rsqrt(rowdot(x, x) + eps)


def safe_norm(x_ND):
  """Row norms `[..., 1]` as sqrt(x.x + tiny): a finite gradient at x = 0 (a padded token
  has e = 0 after masking)."""
  return jnp.sqrt(rowdot(x_ND, x_ND) + 1e-12)


def _clip_scale(norm_N1, g_max: float):
  """min(1, g_max / norm), written so it is smooth where no clipping happens."""
  return g_max / jnp.maximum(norm_N1, g_max)


def inner_grads_reference(W1_DE, W2_ED, k_ND, vhat_ND, *, clip: float = 0.0):
  """Per-token gradients of 1/2 |M(k) - vhat|^2 at the given (chunk-start) weights.

  The plain composition, differentiated by JAX: the reference of `inner_grads`, which has
  the same outputs and a hand-written backward pass.

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
    e_ND = e_ND * _clip_scale(safe_norm(e_ND) * safe_norm(h_NE), clip)
    delta_NE = delta_NE * _clip_scale(safe_norm(delta_NE), clip)
  return e_ND, h_NE, delta_NE


def _clipped(e_ND, h_NE, delta_NE, clip):
  """(e, h, delta) with each token clipped (spec §2.4), and the norms the backward pass needs
  (None when clip <= 0)."""
  if clip <= 0:
    return (e_ND, h_NE, delta_NE), None
  ne_N1, nh_N1, nd_N1 = safe_norm(e_ND), safe_norm(h_NE), safe_norm(delta_NE)
  out = (e_ND * _clip_scale(ne_N1 * nh_N1, clip), h_NE,
         delta_NE * _clip_scale(nd_N1, clip))
  return out, (delta_NE, ne_N1, nh_N1, nd_N1)


def _inner_grads_fwd(W1_DE, W2_ED, k_ND, vhat_ND, clip):
  z_NE = jnp.einsum("ed,nd->ne", W2_ED, k_ND)
  h_NE, g1_NE, g2_NE = _gelu_and_derivatives(z_NE)
  e_ND = k_ND + jnp.einsum("de,ne->nd", W1_DE, h_NE) - vhat_ND
  a_NE = jnp.einsum("de,nd->ne", W1_DE, e_ND)
  delta_NE = a_NE * g1_NE
  res = (W1_DE, W2_ED, k_ND, e_ND, h_NE, a_NE, g1_NE, g2_NE)
  out, norms = _clipped(e_ND, h_NE, delta_NE, clip)
  return out, res + (norms,)


def _clip_cotangents(clip, norms, e_ND, h_NE, cts):
  """The cotangents of the unclipped (e, h, delta) from those of the clipped outputs."""
  ge_ND, gh_NE, gd_NE = cts
  if norms is None:
    return ge_ND, gh_NE, gd_NE
  # Through the clip scales s(p) = c / max(p, c): ds/dp = -c / p^2 where p > c, else 0.
  delta_NE, ne_N1, nh_N1, nd_N1 = norms
  p_N1 = ne_N1 * nh_N1
  re_N1 = rowdot(ge_ND, e_ND) * jnp.where(p_N1 > clip, -clip / (p_N1 * p_N1), 0.0)
  rd_N1 = rowdot(gd_NE, delta_NE) * jnp.where(nd_N1 > clip, -clip / (nd_N1 * nd_N1), 0.0)
  gh_NE = gh_NE + re_N1 * ne_N1 * h_NE / nh_N1
  ge_ND = ge_ND * _clip_scale(p_N1, clip) + re_N1 * nh_N1 * e_ND / ne_N1
  gd_NE = gd_NE * _clip_scale(nd_N1, clip) + rd_N1 * delta_NE / nd_N1
  return ge_ND, gh_NE, gd_NE


def _inner_grads_bwd(clip, res, cts):
  W1_DE, W2_ED, k_ND, e_ND, h_NE, a_NE, g1_NE, g2_NE, norms = res
  ge_ND, gh_NE, gd_NE = _clip_cotangents(clip, norms, e_ND, h_NE, cts)
  ga_NE = gd_NE * g1_NE  # delta = a gelu'(z), a = W1^T e.
  ge_ND = ge_ND + jnp.einsum("ne,de->nd", ga_NE, W1_DE)
  gh_NE = gh_NE + jnp.einsum("nd,de->ne", ge_ND, W1_DE)  # e = k + W1 h - vhat.
  gz_NE = gh_NE * g1_NE + gd_NE * a_NE * g2_NE
  gW1_DE = jnp.einsum("nd,ne->de", e_ND, ga_NE) + jnp.einsum("nd,ne->de", ge_ND, h_NE)
  gk_ND = ge_ND + jnp.einsum("ne,ed->nd", gz_NE, W2_ED)  # z = W2 k.
  # Contracting the tokens with gz as the right operand reads it as it is laid out; as the
  # left one XLA:CPU wrote the whole fused gz chain transposed ([E, N], ~4x slower).
  gW2_ED = jnp.einsum("nd,ne->de", k_ND, gz_NE).T
  return gW1_DE, gW2_ED, gk_ND, -ge_ND


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _inner_grads(W1_DE, W2_ED, k_ND, vhat_ND, clip):
  return _inner_grads_fwd(W1_DE, W2_ED, k_ND, vhat_ND, clip)[0]


_inner_grads.defvjp(_inner_grads_fwd, _inner_grads_bwd)


def inner_grads(W1_DE: Float[Array, "D E"], W2_ED: Float[Array, "E D"], k_ND: Float[Array, "N D"],
                vhat_ND: Float[Array, "N D"], *, clip: float = 0.0):
  """`inner_grads_reference` with a hand-written backward pass (the outer gradient).

  The same outputs. The backward pass takes gelu and its two derivatives from the one
  tanh the forward computed and forms the six products of the two layers' cotangents
  directly, where JAX would differentiate `gelu_prime`'s formula op by op and add the
  cotangents of the shared weights one use at a time. Tested equal to the reference's
  gradient (`tests/test_titans_ops.py`).
  """
  return _inner_grads(W1_DE, W2_ED, k_ND, vhat_ND, float(clip))


def inner_grads_self_reference(W1_DE, W2_ED, k_ND, v_ND, *, clip: float = 0.0):
  """`inner_grads_reference` with the memory's own read of v as the targets (Eq. 83/87):
  vhat = M(v) at the same weights, the plain composition (the reference of
  `inner_grads_self`)."""
  return inner_grads_reference(W1_DE, W2_ED, k_ND, mlp_apply_reference(W1_DE, W2_ED, v_ND),
                               clip=clip)


def _inner_grads_self_fwd(W1_DE, W2_ED, k_ND, v_ND, clip):
  n = k_ND.shape[0]
  # The keys' and the targets' passes share the weights: one product over both row sets.
  x_XD = jnp.concatenate([k_ND, v_ND], 0)
  h_XE, g1_XE, g2_XE = _gelu_and_derivatives(jnp.einsum("ed,nd->ne", W2_ED, x_XD))
  h_NE, g1_NE, g2_NE = h_XE[:n], g1_XE[:n], g2_XE[:n]
  # e = M(k) - M(v) = (k - v) + W1 (h_k - h_v): one N-row product instead of two.
  dh_NE = h_NE - h_XE[n:]
  e_ND = k_ND - v_ND + jnp.einsum("de,ne->nd", W1_DE, dh_NE)
  a_NE = jnp.einsum("de,nd->ne", W1_DE, e_ND)
  delta_NE = a_NE * g1_NE
  res = (W1_DE, W2_ED, x_XD, e_ND, h_NE, dh_NE, a_NE, g1_XE, g2_NE)
  out, norms = _clipped(e_ND, h_NE, delta_NE, clip)
  return out, res + (norms,)


def _inner_grads_self_bwd(clip, res, cts):
  W1_DE, W2_ED, x_XD, e_ND, h_NE, dh_NE, a_NE, g1_XE, g2_NE, norms = res
  n = e_ND.shape[0]
  ge_ND, gh_NE, gd_NE = _clip_cotangents(clip, norms, e_ND, h_NE, cts)
  ga_NE = gd_NE * g1_XE[:n]  # delta = a gelu'(z_k), a = W1^T e.
  ge_ND = ge_ND + jnp.einsum("ne,de->nd", ga_NE, W1_DE)
  # e = k + W1 h_k - (v + W1 h_v): h_k and h_v take +/- the same product.
  u_NE = jnp.einsum("nd,de->ne", ge_ND, W1_DE)
  gz_XE = jnp.concatenate([(gh_NE + u_NE) * g1_XE[:n] + gd_NE * a_NE * g2_NE,
                           -u_NE * g1_XE[n:]], 0)
  gW1_DE = jnp.einsum("nd,ne->de", e_ND, ga_NE) + jnp.einsum("nd,ne->de", ge_ND, dh_NE)
  gx_XD = jnp.einsum("ne,ed->nd", gz_XE, W2_ED)  # z = W2 x for both row sets.
  gW2_ED = jnp.einsum("nd,ne->de", x_XD, gz_XE).T  # gz as the right operand, as above.
  return gW1_DE, gW2_ED, ge_ND + gx_XD[:n], gx_XD[n:] - ge_ND


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _inner_grads_self(W1_DE, W2_ED, k_ND, v_ND, clip):
  return _inner_grads_self_fwd(W1_DE, W2_ED, k_ND, v_ND, clip)[0]


_inner_grads_self.defvjp(_inner_grads_self_fwd, _inner_grads_self_bwd)


def inner_grads_self(W1_DE: Float[Array, "D E"], W2_ED: Float[Array, "E D"],
                     k_ND: Float[Array, "N D"], v_ND: Float[Array, "N D"], *, clip: float = 0.0):
  """`inner_grads(W1, W2, k, mlp_apply(W1, W2, v))`, the self-generated targets of phases A
  and B, as one fused pass (the outputs of `inner_grads_self_reference`).

  The keys' and the targets' reads share the weights, so their first layer is one product
  over 2N rows and e needs only W1 (h_k - h_v): three products in the forward pass where
  the read and `inner_grads` took five, six in the backward pass where they took ten
  (two of them over 2N rows). Tested equal to the reference, values and gradients
  (`tests/test_titans_ops.py`).
  """
  return _inner_grads_self(W1_DE, W2_ED, k_ND, v_ND, float(clip))


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
