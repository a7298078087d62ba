"""One chunk of the inner update W <- W P_t + S_t in closed form and token by token (spec §2.6-2.7).

For one weight matrix W_OI (output x input) with momentum buffer S_OI, tokens
t = 1..C with keys kappa_t (rows of K_CI), rank-1 gradients G_t = d_t kappa_t^T
(rows d_t of D_CO), rates eta_t, retention alpha_t and momentum decay beta_t:

  S_t = beta_t S_{t-1} - eta_t G_t
  W_t = W_{t-1} P_t + S_t,    P_t = alpha_t I - eta_t kappa_t kappa_t^T  (DGD)  or  alpha_t I

`chunk_update_closed` applies the whole chunk at once: every product is taken
from cumulative sums of logs, and the DGD suffix products share one
unit-lower-triangular solve `T` (`dgd_solve`), which depends only on
(K, eta, alpha) and is therefore computed once for every memory that shares the
keys. `chunk_update_reference` is the literal recurrence, its test twin.
Everything here is float32 and for one matrix; callers `vmap`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class DecayCoeffs(NamedTuple):
  """The scalar products of spec §2.7 for one chunk (a_t = prod alpha, b_t = prod beta)."""

  a_last: Array  # a_C.
  c_sum: Array  # sum_t c_t, the S_0 coefficient.
  gamma_C: Array  # gamma_m = sum_{t<m} c_t.
  cbar_C: Array  # cbar_i = sum_{t>=i} c_{t,i}.
  Gamma_CC: Array  # Gamma[i, m] = sum_{i<=t<m} c_{t,i}.
  s_decay_C: Array  # b_C / b_i, the weight of token i's gradient in S_C.
  b_last: Array  # b_C.


def decay_coeffs(log_alpha_C, log_beta_C=None) -> DecayCoeffs:
  """Decay products of one chunk from log-space cumulative sums.

  Args:
    log_alpha_C: log alpha_t (0 where alpha = 1, e.g. padding or use_alpha=False).
    log_beta_C: log beta_t, or None without momentum (beta = 0, S never carried).
  """
  c = log_alpha_C.shape[0]
  la_C = jnp.cumsum(log_alpha_C)
  idx = jnp.arange(c)
  lower_CC = idx[:, None] >= idx[None, :]  # [t, i]: t >= i.
  strict_CC = idx[:, None] < idx[None, :]  # [t, m]: t < m.
  # a_C / a_t, never as a ratio of products.
  tail_a_C = jnp.exp(la_C[-1] - la_C)
  if log_beta_C is None:
    # beta = 0: c_{t,i} = delta_{ti} a_C/a_t (the ratio b_t/b_i would be 0/0).
    zeros = jnp.zeros((c,), log_alpha_C.dtype)
    cmat_CC = jnp.diag(tail_a_C)
    c_C = zeros
    s_decay, b_last = zeros, jnp.zeros((), log_alpha_C.dtype)
  else:
    lb_C = jnp.cumsum(log_beta_C)
    # Mask the exponent before exp: the upper triangle would overflow.
    expo_CC = (la_C[-1] - la_C + lb_C)[:, None] - lb_C[None, :]
    cmat_CC = jnp.exp(jnp.where(lower_CC, expo_CC, -jnp.inf))
    c_C = jnp.exp(la_C[-1] - la_C + lb_C)
    s_decay = jnp.exp(lb_C[-1] - lb_C)
    b_last = jnp.exp(lb_C[-1])
  # Exclusive cumulative sums over t give gamma and Gamma^T.
  gamma_C = jnp.einsum("tm,t->m", strict_CC.astype(c_C.dtype), c_C)
  Gamma_CC = jnp.einsum("tm,ti->im", strict_CC.astype(cmat_CC.dtype), cmat_CC)
  return DecayCoeffs(a_last=jnp.exp(la_C[-1]), c_sum=jnp.sum(c_C), gamma_C=gamma_C,
                     cbar_C=jnp.sum(cmat_CC, axis=0), Gamma_CC=Gamma_CC, s_decay_C=s_decay,
                     b_last=b_last)


def dgd_solve(K_CI: Float[Array, "C I"], omega_C: Float[Array, "C"]) -> Float[Array, "C C"]:
  """T = (I + diag(omega) tril(K K^T, -1))^{-1} diag(omega), lower triangular.

  prod_{j>t} (I - omega_j k_j k_j^T) = I - K_{>t}^T T[>t,>t]^T K_{>t} for every t
  (the trailing block of a triangular inverse is the inverse of the trailing block).
  """
  c = K_CI.shape[0]
  A_CC = jnp.einsum("ci,di->cd", K_CI, K_CI)
  lhs_CC = jnp.eye(c, dtype=K_CI.dtype) + omega_C[:, None] * jnp.tril(A_CC, -1)
  return jax.scipy.linalg.solve_triangular(lhs_CC, jnp.diag(omega_C), lower=True,
                                           unit_diagonal=True)


def chunk_update_closed(W_OI, S_OI, K_CI, D_CO, eta_C, co: DecayCoeffs, T_CC=None):
  """W_C and S_C of one chunk in closed form (spec §2.7).

  Args:
    W_OI: weights at chunk start. S_OI: momentum at chunk start, or None.
    K_CI: keys kappa_t. D_CO: gradient factors d_t (G_t = d_t kappa_t^T).
    eta_C: learning rates (0 on padded tokens).
    co: `decay_coeffs` of the chunk.
    T_CC: `dgd_solve(K, eta / alpha)` when P_t carries the DGD factor, else None.
  """
  # Gradient terms whose suffix product is the plain retention: -D^T diag(eta cbar) K.
  coef_CC = -jnp.diag(eta_C * co.cbar_C)
  if T_CC is not None:
    A_CC = jnp.einsum("ci,di->cd", K_CI, K_CI)
    coef_CC = coef_CC + eta_C[:, None] * jnp.einsum("im,nm->in", A_CC * co.Gamma_CC, T_CC)
  U_OC = jnp.einsum("co,cn->on", D_CO, coef_CC)
  W_new = co.a_last * W_OI
  if T_CC is not None:
    # a_C W_0 (I - K^T T^T K): the chunk's DGD projection of the start weights.
    WK_OC = co.a_last * jnp.einsum("oi,ci->oc", W_OI, K_CI)
    if S_OI is not None:
      WK_OC = WK_OC + jnp.einsum("oi,ci->oc", S_OI, K_CI) * co.gamma_C[None, :]
    U_OC = U_OC - jnp.einsum("om,nm->on", WK_OC, T_CC)
  if S_OI is None:
    return W_new + jnp.einsum("oc,ci->oi", U_OC, K_CI), None
  W_new = W_new + co.c_sum * S_OI + jnp.einsum("oc,ci->oi", U_OC, K_CI)
  S_new = co.b_last * S_OI - jnp.einsum("co,c,ci->oi", D_CO, eta_C * co.s_decay_C, K_CI)
  return W_new, S_new


def chunk_update_reference(W_OI, S_OI, K_CI, D_CO, eta_C, log_alpha_C, log_beta_C=None, *,
                           dgd: bool):
  """The literal token recurrence of spec §2.6 (P_t applied as a rank-1 update)."""

  def token(carry, xs):
    W, S = carry
    kappa_I, d_O, eta, log_alpha, log_beta = xs
    grad_OI = eta * d_O[:, None] * kappa_I[None, :]
    W = jnp.exp(log_alpha) * W
    if dgd:
      W = W - eta * jnp.einsum("oi,i->o", carry[0], kappa_I)[:, None] * kappa_I[None, :]
    if S is None:
      return (W - grad_OI, None), None
    S = jnp.exp(log_beta) * S - grad_OI
    return (W + S, S), None

  lb = jnp.zeros_like(eta_C) if log_beta_C is None else log_beta_C
  (W, S), _ = jax.lax.scan(token, (W_OI, S_OI), (K_CI, D_CO, eta_C, log_alpha_C, lb))
  return W, S
