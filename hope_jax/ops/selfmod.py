"""The two inner-loop phases of the self-modifying Titans sublayer (spec §2.3-2.7, §5).

Phase A runs the projection memories P (k, v, eta, alpha[, q]) over chunks of
C_o tokens and emits k, v, eta, alpha (and q) for every token; phase B runs the
main memory over chunks of C_m tokens and emits its reads o. Each phase is a
`lax.scan` over one of two schedules:

  mode="chunked": scan over whole chunks; reads and gradients use the carried
    weights (chunk start), the update is `chunk_update_closed` (impl="chunked")
    or the token recurrence (impl="reference"). Under read_mode="dual" phase B's
    reads see the earlier tokens of their chunk (`dual_read`, the same two impls).
    Needs the chunk grid aligned with the sequence start.
  mode="token": scan over tokens with (W_start, W_run, S_run) carried (spec §5);
    reads and gradients use W_start, W_run/S_run take the rank-1 update and
    W_start <- W_run at each global chunk boundary. Exact for any offset.

Functions here handle one (batch element, head); the `*_bh` wrappers vmap them
over batch and heads. A group of memories is stacked on a leading axis M, and
its fast state is a dict of float32 arrays:
  W1_start [M,Dh,E], W2_start [M,E,Dh], W1_run, W2_run (, S1_run, S2_run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hope_jax.ops import chunk_update as cu
from hope_jax.ops.memory import gelu, inner_grads, inner_grads_self, l2norm, mlp_apply, safe_norm

PROJ_MEMORIES = ("k", "v", "q", "eta", "alpha")  # Canonical stacking order of P.


@dataclasses.dataclass(frozen=True)
class InnerSpec:
  """Static settings of the inner loop (hashable; part of the compiled program)."""

  live: tuple[str, ...] = ("k", "v", "eta", "alpha")  # P memories updated in context.
  frozen: tuple[str, ...] = ()  # P memories kept at their meta-init (read only).
  chunk_other: int = 16
  chunk_mem: int = 64
  dgd_precond: str = "input_layer"
  momentum: bool = True
  use_alpha: bool = True
  eta_max: float = 0.1
  alpha_min: float = 0.1
  clip: float = 1.0
  memory_target: str = "self"
  read_mode: str = "chunk_start"
  meta_grad: str = "full"
  impl: str = "chunked"
  remat: bool = True
  unroll: int = 1  # Chunks per iteration of `scan_chunked`'s loop; 0: the whole scan unrolled.


# ----------------------------------------------------------------- group update


class Factors(NamedTuple):
  """One chunk's rank-1 gradient factors of a stack of M memories (G = d kappa^T, spec §2.7)."""

  delta_MCE: jax.Array  # W2: d = delta, kappa = k (shared by every memory).
  key1_MCE: jax.Array  # W1's keys: h, or h/|h| under dgd_precond="per_layer".
  d1_MCD: jax.Array  # W1's factors: e, or e|h| under "per_layer".
  T2_CC: jax.Array | None  # dgd_solve(k, eta/alpha) for W2 (impl="chunked" with DGD).
  T1_MCC: jax.Array | None  # dgd_solve(key1, eta/alpha) for W1 ("chunked", "per_layer").


def group_factors(spec: InnerSpec, read_W, k_CD, vhat_MCD, eta_C, la_C, impl: str,
                  v_CD=None) -> Factors:
  """Inner gradients at `read_W` (chunk start) and, for the closed form, the DGD solves.

  Computed once per chunk and shared by the update and (under read_mode="dual") the reads.
  `vhat_MCD` None with `v_CD`: each memory's targets are its own read of v_CD at `read_W`
  (self-generated, Eq. 83/87), fused with the gradients (`memory.inner_grads_self`).
  """
  W1, W2 = read_W
  if vhat_MCD is None:
    grads = lambda w1, w2: inner_grads_self(w1, w2, k_CD, v_CD, clip=spec.clip)
    e_MCD, h_MCE, delta_MCE = jax.vmap(grads)(W1, W2)
  else:
    grads = lambda w1, w2, vh: inner_grads(w1, w2, k_CD, vh, clip=spec.clip)
    e_MCD, h_MCE, delta_MCE = jax.vmap(grads)(W1, W2, vhat_MCD)
  if spec.dgd_precond == "per_layer":
    # W1's own input h, normalised as §4.5 assumes; the gradient e h^T is unchanged.
    hn = safe_norm(h_MCE)
    key1_MCE, d1_MCD = h_MCE / hn, e_MCD * hn
  else:
    key1_MCE, d1_MCD = h_MCE, e_MCD
  T2 = T1 = None
  if impl == "chunked":
    omega_C = eta_C * jnp.exp(-la_C)
    # One triangular solve for W2 of every memory: it depends only on (k, eta, alpha).
    if spec.dgd_precond != "none":
      T2 = cu.dgd_solve(k_CD, omega_C)
    if spec.dgd_precond == "per_layer":
      T1 = jax.vmap(cu.dgd_solve, (0, None))(key1_MCE, omega_C)
  return Factors(delta_MCE, key1_MCE, d1_MCD, T2, T1)


def group_update(spec: InnerSpec, read_W, run, k_CD, vhat_MCD, eta_C, la_C, lb_C, impl: str,
                 factors: Factors | None = None, v_CD=None):
  """Applies one chunk of inner updates to a stack of M memories sharing keys and rates.

  Args:
    read_W: (W1_MDE, W2_MED) at which reads and gradients are taken (chunk start).
    run: {"W1", "W2"[, "S1", "S2"]} running weights and momentum to update.
    k_CD: unit keys (shared by every memory). vhat_MCD: each memory's targets, or None
      for its own read of `v_CD` (self-generated targets; see `group_factors`).
    eta_C, la_C, lb_C: rates, log alpha, log beta (lb ignored without momentum).
    impl: "chunked" (closed form) or "reference" (token recurrence).
    factors: `group_factors` of this chunk when the caller already has them.
  """
  if factors is None:
    factors = group_factors(spec, read_W, k_CD, vhat_MCD, eta_C, la_C, impl, v_CD)
  delta_MCE, key1_MCE, d1_MCD, T2, T1 = factors
  lb = lb_C if spec.momentum else None
  S1, S2 = run.get("S1"), run.get("S2")
  dgd2 = spec.dgd_precond != "none"
  dgd1 = spec.dgd_precond == "per_layer"
  s_ax = 0 if S2 is not None else None
  if impl == "chunked":
    co = cu.decay_coeffs(la_C, lb)
    upd = cu.chunk_update_closed
    W2n, S2n = jax.vmap(upd, (0, s_ax, None, 0, None, None, None))(
        run["W2"], S2, k_CD, delta_MCE, eta_C, co, T2)
    W1n, S1n = jax.vmap(upd, (0, s_ax, 0, 0, None, None, 0 if dgd1 else None))(
        run["W1"], S1, key1_MCE, d1_MCD, eta_C, co, T1)
  else:
    ref = lambda W, S, K, D, dgd: cu.chunk_update_reference(W, S, K, D, eta_C, la_C, lb, dgd=dgd)
    W2n, S2n = jax.vmap(lambda W, S, D: ref(W, S, k_CD, D, dgd2), (0, s_ax, 0))(
        run["W2"], S2, delta_MCE)
    W1n, S1n = jax.vmap(lambda W, S, K, D: ref(W, S, K, D, dgd1), (0, s_ax, 0, 0))(
        run["W1"], S1, key1_MCE, d1_MCD)
  new = {"W1": W1n, "W2": W2n}
  if spec.momentum:
    new.update(S1=S1n, S2=S2n)
  if spec.meta_grad == "first_order":
    # Each chunk's update is a constant; the meta-init keeps a straight-through gradient.
    new = {n: (run[n] + jax.lax.stop_gradient(v - run[n]) if n.startswith("W")
               else jax.lax.stop_gradient(v)) for n, v in new.items()}
  return new


def dual_read(spec: InnerSpec, run, k_CD, factors: Factors, eta_C, la_C, lb_C, x_CD, impl: str):
  """o_t = M_{t-1}(x_t) of one memory (M = 1) for every token of a chunk (read_mode="dual").

  `run` holds the weights at chunk start; token t reads them after the updates of tokens
  < t of this chunk (spec §2.7, Eq. 86): W2 first, then W1 on gelu of that read, each by
  `chunk_read_dual` (impl="chunked") or by its token-scan twin (impl="reference").
  """
  lb = lb_C if spec.momentum else None
  S1, S2 = (run["S1"][0], run["S2"][0]) if spec.momentum else (None, None)
  first_order = spec.meta_grad == "first_order"

  def read(W, S, K, D, T, X, dgd):
    args = (W, S, K, D, eta_C, la_C, lb)
    if first_order:
      # As on the token schedule: W^(t) = W_0 + sg(change within the chunk); X keeps its grad.
      args, T = jax.lax.stop_gradient((args, T))
    if impl == "chunked":
      Y = cu.chunk_read_dual(*args, T, X)
    else:
      Y = cu.chunk_read_dual_reference(*args, X, dgd=dgd)
    if first_order:
      Y = Y + jnp.einsum("oi,ci->co", W - jax.lax.stop_gradient(W), X)
    return Y

  f = factors
  T1 = None if f.T1_MCC is None else f.T1_MCC[0]
  z_CE = read(run["W2"][0], S2, k_CD, f.delta_MCE[0], f.T2_CC, x_CD, spec.dgd_precond != "none")
  y_CD = read(run["W1"][0], S1, f.key1_MCE[0], f.d1_MCD[0], T1, gelu(z_CE),
              spec.dgd_precond == "per_layer")
  return x_CD + y_CD  # The same residual MLP as `mlp_apply`.


# ----------------------------------------------------------------- phase bodies


def _stack_apply(W1_MDE, W2_MED, x_ND):
  return jax.vmap(mlp_apply, (0, 0, None))(W1_MDE, W2_MED, x_ND)


def phase_a_body(spec: InnerSpec, params, read_W, run, xs, impl: str):
  """One chunk of phase A: reads of P at `read_W`, generated streams, update of the live P.

  Args:
    params: this head's {"r_eta", "b_eta"[, "r_alpha", "b_alpha"][, "W1_frozen", "W2_frozen"]}.
    read_W: (W1, W2) of the live memories (stacked in `spec.live` order) at chunk start.
    run: running fast state of the live memories.
    xs: {"x": [N, Dh] memory input, "lb": [N] log beta, "valid": [N] 1/0}.

  Returns:
    (run, {"k", "v", "eta", "la"[, "q"]}) with one row per token.
  """
  x_ND, valid_N = xs["x"], xs["valid"]
  reads = {}
  if spec.live:
    reads.update(zip(spec.live, _stack_apply(*read_W, x_ND), strict=True))
  if spec.frozen:
    reads.update(zip(spec.frozen, _stack_apply(params["W1_frozen"], params["W2_frozen"], x_ND),
                     strict=True))
  k_ND, v_ND = l2norm(reads["k"]), reads["v"]
  # Scalar rates from a per-head readout of the residual memories (spec §2.3).
  eta_N = spec.eta_max * jax.nn.sigmoid(reads["eta"] @ params["r_eta"] + params["b_eta"])
  eta_N = eta_N * valid_N  # Padded tokens never write.
  if spec.use_alpha:
    alpha_N = spec.alpha_min + (1.0 - spec.alpha_min) * jax.nn.sigmoid(
        reads["alpha"] @ params["r_alpha"] + params["b_alpha"])
    la_N = jnp.log(alpha_N) * valid_N  # alpha = 1 on padding: the state is left untouched.
  else:
    la_N = jnp.zeros_like(eta_N)
  out = {"k": k_ND, "v": v_ND, "eta": eta_N, "la": la_N}
  if "q" in reads:
    out["q"] = l2norm(reads["q"])
  if spec.live:
    # Self-generated targets (Eq. 83/87): each memory's read of v, inside the gradients.
    run = group_update(spec, read_W, run, k_ND, None, eta_N, la_N, xs["lb"], impl, v_CD=v_ND)
  return run, out


def phase_b_body(spec: InnerSpec, params, read_W, run, xs, impl: str):
  """One chunk of phase B: the main memory's output reads o and its update.

  xs: {"q", "k", "v": [N, Dh], "eta", "la", "lb": [N]}. Under read_mode="dual" token t
  reads M_{t-1}: the running weights on the token schedule (N = 1), the within-chunk
  running weights (`dual_read`) on the chunked one. Without "q" the memory only learns and
  nothing is read (the outputs are {}).
  """
  del params
  W1, W2 = read_W[0][0], read_W[1][0]
  # memory_target="self": vhat = M(v) at chunk start, fused into the gradients.
  vhat_MND, v_ND = (None, xs["v"]) if spec.memory_target == "self" else (xs["v"][None], None)
  fac = group_factors(spec, read_W, xs["k"], vhat_MND, xs["eta"], xs["la"], impl, v_ND)
  if "q" not in xs:
    o_ND = None
  elif spec.read_mode == "dual" and xs["q"].shape[0] > 1:
    o_ND = dual_read(spec, run, xs["k"], fac, xs["eta"], xs["la"], xs["lb"], xs["q"], impl)
  elif spec.read_mode == "dual":
    o_ND = mlp_apply(run["W1"][0], run["W2"][0], xs["q"])  # One token: M_{t-1} = W_run.
  else:
    o_ND = mlp_apply(W1, W2, xs["q"])  # Chunk-start read (Eq. 90).
  run = group_update(spec, read_W, run, xs["k"], vhat_MND, xs["eta"], xs["la"], xs["lb"],
                     impl, factors=fac)
  return run, ({} if o_ND is None else {"o": o_ND})


# ----------------------------------------------------------------- schedules


def _split(state):
  run = {n[:-4]: v for n, v in state.items() if n.endswith("_run")}
  start = (state["W1_start"], state["W2_start"]) if "W1_start" in state else (None, None)
  return start, run


def _join(start, run):
  state = {f"{n}_run": v for n, v in run.items()}
  if run:
    state.update(W1_start=start[0], W2_start=start[1])
  return state


def scan_chunked(spec: InnerSpec, body, params, state, xs, chunk: int):
  """Scans `body` over whole chunks; the state must sit on a chunk boundary (start == run)."""
  _, run = _split(state)
  length = jax.tree.leaves(xs)[0].shape[0]
  n = length // chunk

  def step(run, xs_c):
    read_W = (run["W1"], run["W2"]) if run else (None, None)
    return body(spec, params, read_W, run, xs_c, spec.impl)

  if spec.remat:
    step = jax.checkpoint(step)
  xs_c = jax.tree.map(lambda a: a.reshape(n, chunk, *a.shape[1:]), xs)
  # Unrolling trades compile time for fewer loop iterations (the GPU's per-iteration cost).
  run, ys = jax.lax.scan(step, run, xs_c, unroll=spec.unroll or True)
  ys = jax.tree.map(lambda a: a.reshape(n * chunk, *a.shape[2:]), ys)
  return _join((run.get("W1"), run.get("W2")), run), ys


def scan_tokens(spec: InnerSpec, body, params, state, xs, boundary_L):
  """Scans `body` token by token from any position (spec §5).

  boundary_L[t] is True when token t closes a chunk of the global grid; then
  W_start <- W_run after its update.
  """
  start, run = _split(state)

  def tok(carry, xs_t):
    start, run = carry
    x1, bnd = xs_t
    run, out = body(spec, params, start, run, jax.tree.map(lambda a: a[None], x1), "reference")
    if run:
      start = (jnp.where(bnd, run["W1"], start[0]), jnp.where(bnd, run["W2"], start[1]))
    return (start, run), jax.tree.map(lambda a: a[0], out)

  (start, run), ys = jax.lax.scan(tok, (start, run), (xs, boundary_L))
  return _join(start, run), ys


# Jitted for its trace cache, not for dispatch: inside a traced step it is one call that XLA
# inlines (the same compiled program), and every later call with the same shapes (the other
# layers, the eval step) reuses its jaxpr and the linearised, batched and transposed forms
# JAX caches per jaxpr, where a plain function was traced and transformed again each time.
@functools.partial(jax.jit, static_argnames=("spec", "body", "chunk", "mode"))
def run_phase_bh(spec: InnerSpec, body, params_H, state_BH, xs_BHL, *, chunk: int,
                 mode: str, boundary_L=None):
  """Runs one phase for every batch element and head.

  Args:
    params_H: per-head parameters (leading axis H, shared by the batch).
    state_BH: fast state, leading axes [B, H] (every sample owns its state).
    xs_BHL: per-token inputs, leading axes [B, H, L].
    mode: "chunked" (L a multiple of `chunk`, aligned) or "token".
    boundary_L: chunk-boundary flags for mode="token".
  """
  if mode == "chunked":
    one = lambda p, s, x: scan_chunked(spec, body, p, s, x, chunk)
  elif mode == "token":
    one = lambda p, s, x: scan_tokens(spec, body, p, s, x, boundary_L)
  else:
    raise ValueError(f"mode={mode!r} is not one of ('chunked', 'token')")
  return jax.vmap(jax.vmap(one, (0, 0, 0)), (None, 0, 0))(params_H, state_BH, xs_BHL)
