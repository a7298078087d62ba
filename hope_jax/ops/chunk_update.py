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
keys (a blocked inverse with a hand-written backward pass, `unit_lower_inverse`; its
reference is `unit_lower_inverse_reference`). The closed form's backward pass is written by
hand too, with `chunk_update_closed_plain` (the same forward, differentiated by JAX) as its
reference. `chunk_update_reference` is the literal recurrence, the closed form's test twin.
Everything here is float32 and for one matrix; callers `vmap`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HIGHEST = jax.lax.Precision.HIGHEST


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


def dgd_solve(K_CI: Float[Array, "C I"], omega_C: Float[Array, " C"]) -> Float[Array, "C C"]:
  """T = (I + diag(omega) tril(K K^T, -1))^{-1} diag(omega), lower triangular.

  prod_{j>t} (I - omega_j k_j k_j^T) = I - K_{>t}^T T[>t,>t]^T K_{>t} for every t
  (the trailing block of a triangular inverse is the inverse of the trailing block).
  """
  return _dgd_solve(K_CI, omega_C, unit_lower_inverse)


def dgd_solve_reference(K_CI: Float[Array, "C I"],
                        omega_C: Float[Array, " C"]) -> Float[Array, "C C"]:
  """`dgd_solve` through `unit_lower_inverse_reference`, differentiated by JAX (its test twin)."""
  return _dgd_solve(K_CI, omega_C, unit_lower_inverse_reference)


def _dgd_solve(K_CI, omega_C, inverse):
  A_CC = jnp.einsum("ci,di->cd", K_CI, K_CI)
  N_CC = omega_C[:, None] * jnp.tril(A_CC, -1)
  return inverse(N_CC) * omega_C[None, :]


def unit_lower_inverse_reference(N_CC: Float[Array, "*B C C"]) -> Float[Array, "*B C C"]:
  """(I + N)^{-1} for strictly lower-triangular N, by ceil(log2 C) squarings.

  N is nilpotent (N^C = 0), so (I + N)^{-1} = prod_{j<m} (I + (-N)^{2^j}) with 2^m >= C.
  Plain matmuls lower to the MXU/tensor cores on every backend and avoid the LAPACK
  triangular-solve custom call, which deadlocked XLA:CPU under remat with batch >= 4 (see
  docs/performance.md). Leading axes batch. `unit_lower_inverse`'s diagonal blocks and its
  reference: at C = 64 this takes 10 full C x C products, and JAX's backward pass twice that.
  """
  c = N_CC.shape[-1]
  P_CC = -N_CC
  inv_CC = jnp.broadcast_to(jnp.eye(c, dtype=N_CC.dtype), N_CC.shape) + P_CC
  power = 2
  while power < c:
    P_CC = P_CC @ P_CC
    inv_CC = inv_CC + inv_CC @ P_CC
    power *= 2
  return inv_CC


# Diagonal blocks up to this size are inverted by squarings; larger ones are combined in pairs.
_INVERSE_BLOCK = 16


@jax.custom_vjp
def unit_lower_inverse(N_CC: Float[Array, "C C"]) -> Float[Array, "C C"]:
  """(I + N)^{-1} for strictly lower-triangular N: blocked, with a hand-written backward pass.

  The diagonal blocks of 16 are inverted together by `unit_lower_inverse_reference`; then
  neighbouring blocks are joined level by level, [[T1, 0], [N21, T2]] -> [[T1, 0],
  [-T2 N21 T1, T2]], two products per level for all pairs at once (C is padded with zeros to
  16 * 2^k, which leaves the inverse's leading block unchanged). At C = 64 that is 6 products
  of 16 x 16 and 4 of 16 or 32 wide, against 10 of 64 x 64 for the squarings alone. The
  backward pass is d(I + N)^{-1} = -T dN T: dN = -T^T dT T^T, kept on the strictly lower
  triangle, the matrices this is defined on. Matmuls only, as in the reference.
  """
  return _blocked_inverse(N_CC)


def _blocked_inverse(N_CC):
  c, b = N_CC.shape[-1], _INVERSE_BLOCK
  if c <= b:
    return unit_lower_inverse_reference(N_CC)
  size = b
  while size < c:
    size *= 2
  N_SS = jnp.pad(N_CC, ((0, size - c), (0, size - c)))
  T_KBB = unit_lower_inverse_reference(
      jnp.stack([N_SS[i:i + b, i:i + b] for i in range(0, size, b)]))
  s = b
  while s < size:  # T_KBB: the inverses of the diagonal blocks of size s.
    N21_KBB = jnp.stack([N_SS[i + s:i + 2 * s, i:i + s] for i in range(0, size, 2 * s)])
    T1_KBB, T2_KBB = T_KBB[0::2], T_KBB[1::2]
    X_KBB = -((T2_KBB @ N21_KBB) @ T1_KBB)
    top = jnp.concatenate([T1_KBB, jnp.zeros_like(T1_KBB)], axis=-1)
    T_KBB = jnp.concatenate([top, jnp.concatenate([X_KBB, T2_KBB], axis=-1)], axis=-2)
    s *= 2
  return T_KBB[0, :c, :c]


def _inverse_fwd(N_CC):
  T_CC = _blocked_inverse(N_CC)
  return T_CC, T_CC


def _inverse_bwd(T_CC, gT_CC):
  gN_CC = -jnp.einsum("ji,jk->ik", T_CC, gT_CC) @ T_CC.T
  return (jnp.tril(gN_CC, -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def chunk_update_closed_plain(W_OI, S_OI, K_CI, D_CO, eta_C, co: DecayCoeffs, T_CC=None):
  """W_C and S_C of one chunk in closed form (spec §2.7), differentiated by JAX.

  The plain composition: the reference of `chunk_update_closed`, which computes the same
  and has a hand-written backward pass. Arguments as there.
  """
  return _closed_fwd(W_OI, S_OI, K_CI, D_CO, eta_C, co, T_CC)[0]


def _closed_fwd(W_OI, S_OI, K_CI, D_CO, eta_C, co, T_CC):
  # Gradient terms whose suffix product is the plain retention: -D^T diag(eta cbar) K.
  coef_CC = -jnp.diag(eta_C * co.cbar_C)
  A_CC = G_CC = GT_CC = WK_OC = SK_OC = None
  if T_CC is not None:
    A_CC = jnp.einsum("ci,di->cd", K_CI, K_CI)
    G_CC = A_CC * co.Gamma_CC
    GT_CC = jnp.einsum("im,nm->in", G_CC, T_CC)
    coef_CC = coef_CC + eta_C[:, None] * GT_CC
  U_OC = jnp.einsum("co,cn->on", D_CO, coef_CC)
  W_new = co.a_last * W_OI
  if T_CC is not None:
    # a_C W_0 (I - K^T T^T K): the chunk's DGD projection of the start weights.
    WK_OC = co.a_last * jnp.einsum("oi,ci->oc", W_OI, K_CI)
    if S_OI is not None:
      SK_OC = jnp.einsum("oi,ci->oc", S_OI, K_CI)
      WK_OC = WK_OC + SK_OC * co.gamma_C[None, :]
    U_OC = U_OC - jnp.einsum("om,nm->on", WK_OC, T_CC)
  res = (W_OI, S_OI, K_CI, D_CO, eta_C, co, T_CC, coef_CC, U_OC, A_CC, G_CC, GT_CC, WK_OC, SK_OC)
  if S_OI is None:
    return (W_new + jnp.einsum("oc,ci->oi", U_OC, K_CI), None), res
  W_new = W_new + co.c_sum * S_OI + jnp.einsum("oc,ci->oi", U_OC, K_CI)
  S_new = co.b_last * S_OI - jnp.einsum("co,c,ci->oi", D_CO, eta_C * co.s_decay_C, K_CI)
  return (W_new, S_new), res


def _closed_bwd(res, cts):
  # Every product is written with its output's axes in their natural order (JAX's transpose
  # of a dot_general emits the transposed one and a layout copy after it), and every sum of
  # products as a contraction (XLA:CPU's multiply-and-reduce: see `memory.rowdot`).
  W_OI, S_OI, K_CI, D_CO, eta_C, co, T_CC, coef_CC, U_OC, A_CC, G_CC, GT_CC, WK_OC, SK_OC = res
  gW_new, gS_new = cts
  g = {f: jnp.zeros_like(v) for f, v in co._asdict().items()}  # Unused fields stay zero.
  gU_OC = jnp.einsum("oi,ci->oc", gW_new, K_CI)
  gK_CI = jnp.einsum("oc,oi->ci", U_OC, gW_new)
  gW_OI = co.a_last * gW_new
  wa_OI = gW_new  # Everything a_C multiplies W_0 by, summed: its cotangent is <wa, W_0>.
  gS_OI = gT_CC = None
  if S_OI is not None:
    gS_OI = co.c_sum * gW_new + co.b_last * gS_new
    g["c_sum"] = jnp.sum(gW_new * S_OI)
    g["b_last"] = jnp.sum(gS_new * S_OI)
    # S_new's gradient term -D^T diag(r) K, r = eta s_decay.
    r_C = eta_C * co.s_decay_C
    DgS_CI = jnp.einsum("co,oi->ci", D_CO, gS_new)
    gK_CI = gK_CI - r_C[:, None] * DgS_CI
    gr_C = -jnp.einsum("ci,ci->c", DgS_CI, K_CI, precision=_HIGHEST)
    gD_CO = -r_C[:, None] * jnp.einsum("ci,oi->co", K_CI, gS_new)
    g_eta_C = gr_C * co.s_decay_C
    g["s_decay_C"] = gr_C * eta_C
  else:
    gD_CO = jnp.zeros_like(D_CO)
    g_eta_C = jnp.zeros_like(eta_C)
  if T_CC is not None:
    # U -= WK T^T with WK = a W K^T (+ gamma * S K^T).
    gWK_OC = -jnp.einsum("on,nm->om", gU_OC, T_CC)
    gT_CC = -jnp.einsum("on,om->nm", gU_OC, WK_OC)
    P_OI = jnp.einsum("om,mi->oi", gWK_OC, K_CI)
    gW_OI = gW_OI + co.a_last * P_OI
    wa_OI = wa_OI + P_OI
    gK_CI = gK_CI + co.a_last * jnp.einsum("om,oi->mi", gWK_OC, W_OI)
    if S_OI is not None:
      g["gamma_C"] = jnp.einsum("om,om->m", gWK_OC, SK_OC, precision=_HIGHEST)
      gWKs_OC = gWK_OC * co.gamma_C[None, :]
      gS_OI = gS_OI + jnp.einsum("om,mi->oi", gWKs_OC, K_CI)
      gK_CI = gK_CI + jnp.einsum("om,oi->mi", gWKs_OC, S_OI)
  g["a_last"] = jnp.sum(wa_OI * W_OI)
  # U = D^T coef (before the DGD term above).
  gD_CO = gD_CO + jnp.einsum("cn,on->co", coef_CC, gU_OC)
  gcoef_CC = jnp.einsum("co,on->cn", D_CO, gU_OC)
  gdiag_C = -jnp.diagonal(gcoef_CC)  # coef = -diag(eta cbar) + eta * (A o Gamma) T^T.
  g_eta_C = g_eta_C + gdiag_C * co.cbar_C
  g["cbar_C"] = gdiag_C * eta_C
  if T_CC is not None:
    g_eta_C = g_eta_C + jnp.einsum("in,in->i", gcoef_CC, GT_CC, precision=_HIGHEST)
    gGT_CC = eta_C[:, None] * gcoef_CC
    gG_CC = jnp.einsum("in,nm->im", gGT_CC, T_CC)
    gT_CC = gT_CC + jnp.einsum("in,im->nm", gGT_CC, G_CC)
    g["Gamma_CC"] = gG_CC * A_CC
    gA_CC = gG_CC * co.Gamma_CC
    gK_CI = gK_CI + jnp.einsum("cd,di->ci", gA_CC + gA_CC.T, K_CI)  # A = K K^T.
  return gW_OI, gS_OI, gK_CI, gD_CO, g_eta_C, DecayCoeffs(**g), gT_CC


@jax.custom_vjp
def chunk_update_closed(W_OI, S_OI, K_CI, D_CO, eta_C, co: DecayCoeffs, T_CC=None):
  """W_C and S_C of one chunk in closed form (spec §2.7).

  `chunk_update_closed_plain` with a hand-written backward pass (tested equal to JAX's
  derivative of it): each product of the backward pass comes out in the layout its users
  read, where JAX's transposes of the forward's products leave a transposing copy after
  most of them.

  Args:
    W_OI: weights at chunk start. S_OI: momentum at chunk start, or None.
    K_CI: keys kappa_t. D_CO: gradient factors d_t (G_t = d_t kappa_t^T).
    eta_C: learning rates (0 on padded tokens).
    co: `decay_coeffs` of the chunk.
    T_CC: `dgd_solve(K, eta / alpha)` when P_t carries the DGD factor, else None.
  """
  return _closed_fwd(W_OI, S_OI, K_CI, D_CO, eta_C, co, T_CC)[0]


chunk_update_closed.defvjp(_closed_fwd, _closed_bwd)


def _token_update(W, S, kappa_I, d_O, eta, log_alpha, log_beta, dgd: bool):
  """One token of spec §2.6, with P_t applied as a rank-1 update (S is None without momentum)."""
  grad_OI = eta * d_O[:, None] * kappa_I[None, :]
  W_new = jnp.exp(log_alpha) * W
  if dgd:
    W_new = W_new - eta * jnp.einsum("oi,i->o", W, kappa_I)[:, None] * kappa_I[None, :]
  if S is None:
    return W_new - grad_OI, None
  S = jnp.exp(log_beta) * S - grad_OI
  return W_new + S, S


def chunk_update_reference(W_OI, S_OI, K_CI, D_CO, eta_C, log_alpha_C, log_beta_C=None, *,
                           dgd: bool):
  """The literal token recurrence of spec §2.6 (P_t applied as a rank-1 update)."""

  def token(carry, xs):
    return _token_update(*carry, *xs, dgd), None

  lb = jnp.zeros_like(eta_C) if log_beta_C is None else log_beta_C
  (W, S), _ = jax.lax.scan(token, (W_OI, S_OI), (K_CI, D_CO, eta_C, log_alpha_C, lb))
  return W, S


# ------------------------------------------------------------ within-chunk reads


def chunk_read_dual(W_OI, S_OI, K_CI, D_CO, eta_C, log_alpha_C, log_beta_C, T_CC, X_CI):
  """Y[t] = W^(t) x_t for every token t of a chunk, in closed form (dual reads, Eq. 86).

  W^(t) is the running weight after tokens 0..t-1 of the chunk (token t does not see its
  own update). Derivation in docs/architecture.md ("Dual reads in closed form"): with
  V(m, x) the read of x at position m *without* the DGD factors,

    Y[t] = V(t, x_t) - sum_{i<t} R[t,i] (a_{t-1}/a_{i-1}) V(i, kappa_i),
    R = (tril(X K^T, -1)) T,

  so every term is a C x C matmul; all decay factors are ratios of products over
  contiguous token ranges, taken from log-cumsums masked before `exp` (all <= 1).

  Args:
    W_OI, S_OI: weights and momentum at chunk start (S None without momentum).
    K_CI, D_CO, eta_C: keys, gradient factors and rates, as in `chunk_update_closed`.
    log_alpha_C, log_beta_C: per-token log alpha, log beta (None without momentum).
    T_CC: `dgd_solve(K, eta / alpha)` under DGD, else None.
    X_CI: one query per token.
  """
  c = K_CI.shape[0]
  idx = jnp.arange(c)
  strict_CC = idx[:, None] > idx[None, :]  # [t, s]: s < t.
  la_cum = jnp.cumsum(log_alpha_C)
  la_ex = la_cum - log_alpha_C  # log a_{t-1}: alpha over tokens before t.
  masked_exp = lambda mask, expo: jnp.exp(jnp.where(mask, expo, -jnp.inf))
  # E1[t, s] = prod_{s<j<t} alpha_j: how much of S_s (applied at token s) reaches token t.
  E1_CC = masked_exp(strict_CC, la_ex[:, None] - la_cum[None, :])
  if log_beta_C is None:
    M_CC = E1_CC  # S_s = -eta_s G_s: only token s's own gradient.
  else:
    lb_cum = jnp.cumsum(log_beta_C)
    # E2[s, i] = prod_{i<j<=s} beta_j: token i's gradient inside S_s.
    E2_CC = masked_exp(idx[:, None] >= idx[None, :], lb_cum[:, None] - lb_cum[None, :])
    M_CC = E1_CC @ E2_CC  # [t, i]: total weight of -eta_i G_i in W^(t) (without DGD).
    g_C = E1_CC @ jnp.exp(lb_cum)  # Weight of S_0 in W^(t).
  aex_C = jnp.exp(la_ex)
  eta_D_CO = eta_C[:, None] * D_CO

  def no_dgd_read(Q_CI):  # V(t, q_t) for one query per position.
    QK_CC = jnp.einsum("ti,ci->tc", Q_CI, K_CI)
    V_CO = aex_C[:, None] * jnp.einsum("oi,ti->to", W_OI, Q_CI)
    V_CO = V_CO - jnp.einsum("tc,co->to", M_CC * QK_CC, eta_D_CO)
    if S_OI is not None:
      V_CO = V_CO + g_C[:, None] * jnp.einsum("oi,ti->to", S_OI, Q_CI)
    return V_CO, QK_CC

  Y_CO, XK_CC = no_dgd_read(X_CI)
  if T_CC is None:
    return Y_CO
  # prod_{s<j<t} (I - omega_j kappa_j kappa_j^T) x_t = x_t - sum_{s<i<t} kappa_i R[t, i]
  # for every s (contiguous diagonal blocks of T are the blocks' own solves).
  R_CC = jnp.where(strict_CC, XK_CC, 0.0) @ T_CC
  Ea_CC = masked_exp(strict_CC, la_ex[:, None] - la_ex[None, :])  # a_{t-1} / a_{i-1}.
  Vk_CO, _ = no_dgd_read(K_CI)
  return Y_CO - jnp.einsum("ti,io->to", R_CC * Ea_CC, Vk_CO)


def chunk_read_dual_reference(W_OI, S_OI, K_CI, D_CO, eta_C, log_alpha_C, log_beta_C, X_CI, *,
                              dgd: bool):
  """The literal twin of `chunk_read_dual`: each token reads W x, then applies its update."""

  def token(carry, xs):
    x_I, upd = xs[0], xs[1:]
    y_O = jnp.einsum("oi,i->o", carry[0], x_I)
    return _token_update(*carry, *upd, dgd), y_O

  lb = jnp.zeros_like(eta_C) if log_beta_C is None else log_beta_C
  _, Y_CO = jax.lax.scan(token, (W_OI, S_OI), (X_CI, K_CI, D_CO, eta_C, log_alpha_C, lb))
  return Y_CO
