"""Pure inner-loop ops of the self-modifying Titans sublayer (spec §7 tests 1, 6, 7)."""

import itertools

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hope_jax.ops import broadcast, memory
from hope_jax.ops import chunk_update as cu
from hope_jax.ops.conv import causal_dwconv


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _chunk_inputs(seed, c, o=6, i=5, *, momentum=True, use_alpha=True):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  W = jax.random.normal(ks[0], (o, i))
  S = jax.random.normal(ks[1], (o, i)) if momentum else None
  K = _unit(jax.random.normal(ks[2], (c, i)))
  D = jax.random.normal(ks[3], (c, o))
  eta = jax.random.uniform(ks[4], (c,), minval=0.05, maxval=0.5)
  la = (jnp.log(jax.random.uniform(ks[5], (c,), minval=0.5, maxval=1.0)) if use_alpha
        else jnp.zeros((c,)))
  lb = jnp.log(jax.random.uniform(ks[6], (c,), minval=0.1, maxval=0.99)) if momentum else None
  return W, S, K, D, eta, la, lb


@pytest.mark.parametrize("c,dgd,momentum,use_alpha",
                         list(itertools.product([1, 3, 8], [True, False], [True, False],
                                                [True, False])))
def test_closed_form_equals_token_scan(c, dgd, momentum, use_alpha):
  """Spec §7.1: the chunk closed form reproduces the literal recurrence of §2.6."""
  W, S, K, D, eta, la, lb = _chunk_inputs(17 * c + 2 * dgd + momentum, c, momentum=momentum,
                                          use_alpha=use_alpha)
  co = cu.decay_coeffs(la, lb)
  T = cu.dgd_solve(K, eta * jnp.exp(-la)) if dgd else None
  W_c, S_c = cu.chunk_update_closed(W, S, K, D, eta, co, T)
  W_r, S_r = cu.chunk_update_reference(W, S, K, D, eta, la, lb, dgd=dgd)
  assert float(jnp.max(jnp.abs(W_r - W))) > 1e-2  # The chunk really moves the weights.
  chex.assert_trees_all_close(W_c, W_r, atol=1e-5, rtol=1e-5)
  if momentum:
    chex.assert_trees_all_close(S_c, S_r, atol=1e-5, rtol=1e-5)
  else:
    assert S_c is None and S_r is None


@pytest.mark.parametrize("c,dgd,momentum", [(8, True, True), (8, True, False),
                                             (8, False, True), (3, False, False),
                                             (1, True, True)])
def test_closed_form_backward_equals_the_plain_one(c, dgd, momentum):
  """The hand-written backward pass of `chunk_update_closed` equals JAX's through the plain one.

  T is an input of its own here (in the model it is `dgd_solve` of the keys) so that its
  cotangent is checked too; log alpha and log beta reach the update through `decay_coeffs`.
  """
  W, S, K, D, eta, la, lb = _chunk_inputs(5 * c + 2 * dgd + momentum, c, momentum=momentum)
  T = cu.dgd_solve(K, eta * jnp.exp(-la)) if dgd else None
  args = (W, S, K, D, eta, la, lb, T)

  def run(update):
    return lambda W, S, K, D, eta, la, lb, T: update(W, S, K, D, eta, cu.decay_coeffs(la, lb), T)

  out_f, vjp_f = jax.vjp(run(cu.chunk_update_closed), *args)
  out_p, vjp_p = jax.vjp(run(cu.chunk_update_closed_plain), *args)
  chex.assert_trees_all_close(out_f, out_p, atol=1e-6, rtol=1e-6)
  ks = jax.random.split(jax.random.PRNGKey(c), 2)
  cts = (jax.random.normal(ks[0], W.shape), jax.random.normal(ks[1], W.shape) if momentum else None)
  grads_f, grads_p = jax.jit(vjp_f)(cts), jax.jit(vjp_p)(cts)
  assert len(jax.tree.leaves(grads_p)) == 5 + 2 * momentum + dgd  # W, K, D, eta, la [S, lb] [T].
  for g_f, g_p in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_p), strict=True):
    scale = float(jnp.max(jnp.abs(g_p)))
    assert scale > 1e-3 or c == 1  # Every input gets a gradient (one token: la[0] may not).
    chex.assert_trees_all_close(g_f, g_p, atol=1e-5 * max(scale, 1.0), rtol=1e-4)


def _dgd_system(seed, c, i=8):
  """Unit keys and rates omega = eta / alpha as the model makes them, and N of (I + N)^-1."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 2)
  K = _unit(jax.random.normal(ks[0], (c, i)))
  omega = jax.random.uniform(ks[1], (c,), minval=0.01, maxval=0.9)
  return K, omega, omega[:, None] * jnp.tril(K @ K.T, -1)


@pytest.mark.parametrize("c", [1, 5, 16, 17, 48, 64, 100])
def test_blocked_unit_lower_inverse_equals_the_reference(c):
  """The blocked inverse (padded to 16 * 2^k past one block) equals the squarings and numpy's."""
  _, _, N = _dgd_system(c, c)
  T = cu.unit_lower_inverse(N)
  chex.assert_trees_all_close(T, cu.unit_lower_inverse_reference(N), atol=1e-5, rtol=1e-5)
  exact = np.linalg.inv(np.eye(c) + np.asarray(N, np.float64))
  np.testing.assert_allclose(np.asarray(T), exact, atol=1e-5, rtol=1e-4)
  np.testing.assert_array_equal(np.triu(np.asarray(T), 1), 0.0)  # Lower triangular...
  np.testing.assert_array_equal(np.diagonal(np.asarray(T)), 1.0)  # ... with a unit diagonal.
  if c > 1:
    assert float(jnp.max(jnp.abs(jnp.tril(T, -1)))) > 1e-2  # Not just the identity.


@pytest.mark.parametrize("c", [16, 48, 64])
def test_unit_lower_inverse_backward_equals_the_reference(c):
  """The hand-written backward pass equals JAX's through the squarings, alone and in dgd_solve.

  Alone, N is read through tril(., -1): the inverse is defined on strictly lower N only.
  """
  K, omega, N = _dgd_system(3 * c, c)
  ct = jax.random.normal(jax.random.PRNGKey(c), (c, c))
  on_lower = lambda inverse: (lambda n: inverse(jnp.tril(n, -1)))
  _, vjp_f = jax.vjp(on_lower(cu.unit_lower_inverse), N)
  _, vjp_r = jax.vjp(on_lower(cu.unit_lower_inverse_reference), N)
  (g_f,), (g_r,) = jax.jit(vjp_f)(ct), jax.jit(vjp_r)(ct)
  assert float(jnp.max(jnp.abs(g_r))) > 1e-1
  chex.assert_trees_all_close(g_f, g_r, atol=1e-4, rtol=1e-4)
  out_f, vjp_f = jax.vjp(cu.dgd_solve, K, omega)
  out_r, vjp_r = jax.vjp(cu.dgd_solve_reference, K, omega)
  chex.assert_trees_all_close(out_f, out_r, atol=1e-5, rtol=1e-5)
  for g_f, g_r in zip(jax.jit(vjp_f)(ct), jax.jit(vjp_r)(ct), strict=True):
    scale = float(jnp.max(jnp.abs(g_r)))
    assert scale > 1e-2
    chex.assert_trees_all_close(g_f, g_r, atol=1e-5 * max(scale, 1.0), rtol=1e-4)


@pytest.mark.parametrize("c", [40, 64])
def test_closed_form_equals_token_scan_past_one_inverse_block(c):
  """Spec §7.1 at chunks whose DGD solve combines blocks (the tests above stop at C = 8)."""
  W, S, K, D, eta, la, lb = _chunk_inputs(c, c, o=6, i=12)
  eta = eta * 0.2  # Rates of the model's order (eta_max = 0.1): 64 tokens stay well scaled.
  co = cu.decay_coeffs(la, lb)
  W_c, S_c = cu.chunk_update_closed(W, S, K, D, eta, co, cu.dgd_solve(K, eta * jnp.exp(-la)))
  W_r, S_r = cu.chunk_update_reference(W, S, K, D, eta, la, lb, dgd=True)
  assert float(jnp.max(jnp.abs(W_r - W))) > 1e-2
  chex.assert_trees_all_close(W_c, W_r, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(S_c, S_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c,dgd,momentum,use_alpha",
                         list(itertools.product([1, 3, 8], [True, False], [True, False],
                                                [True, False])))
def test_dual_read_closed_form_equals_token_scan(c, dgd, momentum, use_alpha):
  """Dual reads: token t sees the updates of tokens < t of its chunk, not its own."""
  W, S, K, D, eta, la, lb = _chunk_inputs(31 * c + 2 * dgd + momentum, c, momentum=momentum,
                                          use_alpha=use_alpha)
  X = jax.random.normal(jax.random.PRNGKey(c), (c, K.shape[1]))
  T = cu.dgd_solve(K, eta * jnp.exp(-la)) if dgd else None
  Y_c = cu.chunk_read_dual(W, S, K, D, eta, la, lb, T, X)
  Y_r = cu.chunk_read_dual_reference(W, S, K, D, eta, la, lb, X, dgd=dgd)
  chex.assert_shape(Y_c, (c, W.shape[0]))
  chex.assert_trees_all_close(Y_c[0], X[0] @ W.T, atol=1e-6)  # Token 0 reads W_0.
  if c > 1:
    assert float(jnp.max(jnp.abs(Y_r[1:] - X[1:] @ W.T))) > 1e-2  # Later tokens do not.
  chex.assert_trees_all_close(Y_c, Y_r, atol=1e-5, rtol=1e-5)


def test_inner_grads_match_autodiff():
  """The analytic per-token gradients of §2.4 equal jax.grad of 1/2|M(k) - vhat|^2."""
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  W1 = 0.3 * jax.random.normal(ks[0], (8, 12))
  W2 = jax.random.normal(ks[1], (12, 8)) / np.sqrt(8)
  k = _unit(jax.random.normal(ks[2], (5, 8)))
  vhat = jax.random.normal(ks[3], (5, 8))
  e, h, delta = memory.inner_grads(W1, W2, k, vhat, clip=0.0)
  loss = lambda w1, w2, kk, vv: 0.5 * jnp.sum(
      (memory.mlp_apply_reference(w1, w2, kk[None]) - vv[None]) ** 2)  # JAX's own grad.
  g1, g2 = jax.vmap(jax.grad(loss, argnums=(0, 1)), (None, None, 0, 0))(W1, W2, k, vhat)
  chex.assert_trees_all_close(jnp.einsum("nd,ne->nde", e, h), g1, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(jnp.einsum("ne,nd->ned", delta, k), g2, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(memory.gelu_prime(k), jax.vmap(jax.vmap(jax.grad(memory.gelu)))(k),
                              atol=1e-6)


def test_inner_grad_clipping_bounds_each_token():
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  W1 = 3.0 * jax.random.normal(ks[0], (8, 12))
  W2 = 3.0 * jax.random.normal(ks[1], (12, 8))
  k = _unit(jax.random.normal(ks[2], (6, 8)))
  vhat = 10.0 * jax.random.normal(ks[3], (6, 8))
  e0, h0, d0 = memory.inner_grads(W1, W2, k, vhat, clip=0.0)
  e, h, d = memory.inner_grads(W1, W2, k, vhat, clip=1.0)
  norm = lambda x: jnp.linalg.norm(x, axis=-1)
  assert float(jnp.max(norm(e0) * norm(h0))) > 1.0 and float(jnp.max(norm(d0))) > 1.0
  np.testing.assert_array_less(norm(e) * norm(h), 1.0 + 1e-5)
  np.testing.assert_array_less(norm(d), 1.0 + 1e-5)
  # Clipping rescales; it never turns the direction.
  chex.assert_trees_all_close(e / norm(e)[:, None], e0 / norm(e0)[:, None], atol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 1.0, 0.05])
def test_inner_grads_backward_equals_the_reference(clip):
  """The hand-written backward pass of `inner_grads` equals JAX's through the reference.

  clip=1.0 clips some tokens and not others, 0.05 clips every token; one token has e = 0
  (the safe norms of a padded token).
  """
  ks = jax.random.split(jax.random.PRNGKey(2), 8)
  W1 = 0.8 * jax.random.normal(ks[0], (8, 12))
  W2 = 1.5 * jax.random.normal(ks[1], (12, 8)) / np.sqrt(8)
  k = _unit(jax.random.normal(ks[2], (7, 8)))
  vhat = 2.0 * jax.random.normal(ks[3], (7, 8))
  vhat = vhat.at[0].set(memory.mlp_apply(W1, W2, k[:1])[0])  # e = 0 at token 0.
  args = (W1, W2, k, vhat)
  fast = lambda *a: memory.inner_grads(*a, clip=clip)
  ref = lambda *a: memory.inner_grads_reference(*a, clip=clip)
  out_f, vjp_f = jax.vjp(fast, *args)
  out_r, vjp_r = jax.vjp(ref, *args)
  chex.assert_trees_all_close(out_f, out_r, atol=1e-6, rtol=1e-6)
  e0, h0, d0 = memory.inner_grads_reference(*args, clip=0.0)
  scaled = (jnp.linalg.norm(e0, axis=-1) * jnp.linalg.norm(h0, axis=-1) > clip,
            jnp.linalg.norm(d0, axis=-1) > clip)
  if clip == 1.0:  # Both branches of both clips are taken.
    assert all(bool(jnp.any(s)) and not bool(jnp.all(s)) for s in scaled), scaled
  cts = tuple(jax.random.normal(kk, o.shape) for kk, o in zip(ks[4:7], out_r, strict=True))
  grads_f, grads_r = jax.jit(vjp_f)(cts), jax.jit(vjp_r)(cts)
  for g_f, g_r in zip(grads_f, grads_r, strict=True):
    assert float(jnp.max(jnp.abs(g_r))) > 1e-3  # Every input gets a gradient.
    chex.assert_trees_all_close(g_f, g_r, atol=1e-5 * float(jnp.max(jnp.abs(g_r))), rtol=1e-4)


@pytest.mark.parametrize("clip", [0.0, 1.0, 0.05])
def test_inner_grads_self_equals_the_reference(clip):
  """The fused self-target pass (vhat = M(v) inside the gradients) equals the composition of
  the references, values and gradients with respect to W1, W2, k and v; token 0 has v = k
  (e = 0, a padded token's safe norms)."""
  ks = jax.random.split(jax.random.PRNGKey(12), 8)
  W1 = 0.8 * jax.random.normal(ks[0], (8, 12))
  W2 = 1.5 * jax.random.normal(ks[1], (12, 8)) / np.sqrt(8)
  k = _unit(jax.random.normal(ks[2], (7, 8)))
  v = (2.0 * jax.random.normal(ks[3], (7, 8))).at[0].set(k[0])
  args = (W1, W2, k, v)
  out_f, vjp_f = jax.vjp(lambda *a: memory.inner_grads_self(*a, clip=clip), *args)
  out_r, vjp_r = jax.vjp(lambda *a: memory.inner_grads_self_reference(*a, clip=clip), *args)
  chex.assert_trees_all_close(out_f, out_r, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(out_r[0][0]).max()) == 0.0 and float(jnp.abs(out_r[0][1:]).min()) > 0.0
  if clip == 1.0:  # Some tokens clipped, some not.
    e0, h0, _ = memory.inner_grads_self_reference(*args, clip=0.0)
    p = jnp.linalg.norm(e0, axis=-1) * jnp.linalg.norm(h0, axis=-1)
    assert bool(jnp.any(p > clip)) and not bool(jnp.all(p > clip))
  cts = tuple(jax.random.normal(kk, o.shape) for kk, o in zip(ks[4:7], out_r, strict=True))
  for g_f, g_r in zip(jax.jit(vjp_f)(cts), jax.jit(vjp_r)(cts), strict=True):
    assert float(jnp.max(jnp.abs(g_r))) > 1e-3  # Every input gets a gradient.
    chex.assert_trees_all_close(g_f, g_r, atol=1e-5 * float(jnp.max(jnp.abs(g_r))), rtol=1e-4)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_group_factors_with_self_targets_equal_the_explicit_reads(impl):
  """`group_factors(..., vhat=None, v_CD=v)` (fused) equals passing every memory's read of v."""
  from hope_jax.ops import selfmod

  spec = selfmod.InnerSpec()
  ks = jax.random.split(jax.random.PRNGKey(13), 4)
  W1 = 0.3 * jax.random.normal(ks[0], (3, 4, 6))
  W2 = jax.random.normal(ks[1], (3, 6, 4))
  k = _unit(jax.random.normal(ks[2], (5, 4)))
  v = jax.random.normal(ks[3], (5, 4))
  eta, la = jnp.full((5,), 0.3), jnp.full((5,), -0.2)

  def factors(W1, W2, k, v, fused):
    vhat = None if fused else jax.vmap(memory.mlp_apply, (0, 0, None))(W1, W2, v)
    fac = selfmod.group_factors(spec, (W1, W2), k, vhat, eta, la, impl, v_CD=v)
    return [f for f in fac if f is not None]

  chex.assert_trees_all_close(factors(W1, W2, k, v, True), factors(W1, W2, k, v, False),
                              atol=1e-5, rtol=1e-5)
  loss = lambda *a: sum(jnp.sum(jnp.sin(f)) for f in factors(*a))
  chex.assert_trees_all_close(jax.grad(loss, argnums=(0, 1, 2, 3))(W1, W2, k, v, True),
                              jax.grad(loss, argnums=(0, 1, 2, 3))(W1, W2, k, v, False),
                              atol=1e-4, rtol=1e-4)


def test_mlp_apply_backward_equals_the_reference():
  """The hand-written backward pass of the memory read equals JAX's through the reference."""
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  args = (0.8 * jax.random.normal(ks[0], (8, 12)), jax.random.normal(ks[1], (12, 8)),
          jax.random.normal(ks[2], (6, 8)))
  out_f, vjp_f = jax.vjp(memory.mlp_apply, *args)
  out_r, vjp_r = jax.vjp(memory.mlp_apply_reference, *args)
  chex.assert_trees_all_close(out_f, out_r, atol=1e-6, rtol=1e-6)
  ct = jax.random.normal(ks[3], out_r.shape)
  for g_f, g_r in zip(jax.jit(vjp_f)(ct), jax.jit(vjp_r)(ct), strict=True):
    assert float(jnp.max(jnp.abs(g_r))) > 1e-3
    chex.assert_trees_all_close(g_f, g_r, atol=1e-5 * float(jnp.max(jnp.abs(g_r))), rtol=1e-4)


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("c", [1, 4])
def test_linear_memory_matches_eq_92_93(objective, c):
  """Spec §7.6: a linear memory under the closed form follows Eq. 93 (l2) / Eq. 92 (dot)."""
  W0, _, K, _, eta, la, _ = _chunk_inputs(5 + c, c, o=5, i=5, momentum=False)
  vhat = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (c, 5)), np.float64)
  d = memory.linear_inner_grad(W0, K, jnp.asarray(vhat, jnp.float32), objective=objective)
  co = cu.decay_coeffs(la, None)
  W_c, _ = cu.chunk_update_closed(W0, None, K, d, eta, co, cu.dgd_solve(K, eta * jnp.exp(-la)))
  # Eq. 93 written out in float64: M_t = M_{t-1}(alpha I - eta k k^T) - eta (M_t' k - vhat) k^T.
  W_start = np.asarray(W0, np.float64)
  M = W_start.copy()
  for t in range(c):
    k_t = np.asarray(K[t], np.float64)
    a_t, e_t = float(np.exp(la[t])), float(eta[t])
    g_t = (W_start @ k_t - vhat[t]) if objective == "l2" else -vhat[t]
    M = M @ (a_t * np.eye(5) - e_t * np.outer(k_t, k_t)) - e_t * np.outer(g_t, k_t)
  np.testing.assert_allclose(np.asarray(W_c), M, atol=1e-5, rtol=1e-5)


def test_sherman_morrison_reading_of_dgd():
  """Spec §7.7: W(I - eta' x x^T) + eta' u x^T is the exact minimiser of Eq. 56."""
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  W = jax.random.normal(ks[0], (4, 6))
  x = _unit(jax.random.normal(ks[1], (6,)))
  u = jax.random.normal(ks[2], (4,))
  eta = 0.3
  # argmin_W' 1/2 |W' x - u|^2 + 1/(2 eta) |W' - W|^2  <=>  W' (x x^T + I/eta) = u x^T + W/eta.
  lhs = jnp.outer(x, x) + jnp.eye(6) / eta
  exact = jnp.linalg.solve(lhs.T, (jnp.outer(u, x) + W / eta).T).T
  eta_p = eta / (1 + eta)
  formula = W @ (jnp.eye(6) - eta_p * jnp.outer(x, x)) + eta_p * jnp.outer(u, x)
  chex.assert_trees_all_close(formula, exact, atol=1e-5)
  # Our DGD update with rate eta', alpha = 1 and the dot objective (d = -u) is that minimiser.
  one = lambda a: jnp.asarray([a], jnp.float32)
  d = memory.linear_inner_grad(W, x[None], u[None], objective="dot")
  co = cu.decay_coeffs(one(0.0), None)
  W_dgd, _ = cu.chunk_update_closed(W, None, x[None], d, one(eta_p), co,
                                    cu.dgd_solve(x[None], one(eta_p)))
  chex.assert_trees_all_close(W_dgd, exact, atol=1e-5)
  # Eq. 88 with the l2 gradient shrinks along x twice (the paper's rule, kept literally).
  d_l2 = memory.linear_inner_grad(W, x[None], u[None], objective="l2")
  W_l2, _ = cu.chunk_update_closed(W, None, x[None], d_l2, one(eta_p), co,
                                   cu.dgd_solve(x[None], one(eta_p)))
  twice = W @ (jnp.eye(6) - eta_p * jnp.outer(x, x)) - eta_p * jnp.outer(W @ x - u, x)
  chex.assert_trees_all_close(W_l2, twice, atol=1e-5)


def _partial_sums(jaxpr):
  """reduce_sum equations of a jaxpr (sub-jaxprs included) that skip the leading axis of a
  rank >= 3 input while summing another axis before the last: a sum over L alone."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum":
      ndim, axes = eqn.invars[0].aval.ndim, eqn.params["axes"]
      if ndim >= 3 and 0 not in axes and any(a < ndim - 1 for a in axes):
        found.append((eqn.invars[0].aval.shape, axes))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _partial_sums(sub)
  return found


def test_parameter_gradients_sum_over_batch_and_length_at_once():
  """At a batch of one the conv taps, conv bias and RMSNorm scale summed their gradients over
  L alone ([1, 1, D] operands), a slow YNNPACK reduction on XLA:CPU; `broadcast.to_shape_of`
  makes it one sum over B and L."""
  from hope_jax.model.layers import RMSNorm

  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  x = jax.random.normal(ks[0], (1, 8, 16))
  w, b = jax.random.normal(ks[1], (4, 16)), jax.random.normal(ks[2], (16,))
  conv = lambda w, b: jnp.sum(jnp.tanh(causal_dwconv(x, w, b, jnp.zeros((1, 3, 16)))[0]))
  jaxpr = jax.make_jaxpr(jax.grad(conv, (0, 1)))(w, b).jaxpr
  assert sum(e.primitive.name == "reduce_sum" for e in jaxpr.eqns) >= 5  # 4 taps + bias.
  assert _partial_sums(jaxpr) == []
  scaled = lambda s: jnp.sum(jnp.tanh(x * s[None, None, :]))  # The old form, for contrast.
  assert _partial_sums(jax.make_jaxpr(jax.grad(scaled))(b).jaxpr) != []
  graphdef, state = nnx.split(RMSNorm(16))
  normed = lambda st: jnp.sum(jnp.tanh(nnx.merge(graphdef, st)(x)))
  jaxpr = jax.make_jaxpr(jax.grad(normed))(state).jaxpr
  assert any(e.primitive.name == "reduce_sum" for e in jaxpr.eqns)
  assert _partial_sums(jaxpr) == []


def test_causal_conv_in_pieces_equals_whole():
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  x = jax.random.normal(ks[0], (2, 11, 3))
  w, b = jax.random.normal(ks[1], (4, 3)), jax.random.normal(ks[2], (3,))
  y, _ = causal_dwconv(x, w, b, jnp.zeros((2, 3, 3)))
  prev, outs = jnp.zeros((2, 3, 3)), []
  for lo, hi in ((0, 1), (1, 3), (3, 10), (10, 11)):
    yy, prev = causal_dwconv(x[:, lo:hi], w, b, prev)
    outs.append(yy)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), y, atol=1e-6)
  # Causal: y_t is w[3] x_t + ... + w[0] x_{t-3} + b.
  expect = b[None] + sum(w[j][None] * x[:, 2 + j] for j in range(4))
  chex.assert_trees_all_close(y[:, 5], expect, atol=1e-5)


@pytest.mark.parametrize("meta_grad", ["full", "first_order"])
def test_first_order_meta_grad_is_straight_through(meta_grad):
  """first_order: each chunk's update is a constant, the meta-init gets d W_C / d W_0 = I."""
  from hope_jax.ops import selfmod

  spec = selfmod.InnerSpec(meta_grad=meta_grad, clip=0.0)
  ks = jax.random.split(jax.random.PRNGKey(6), 5)
  W1 = 0.3 * jax.random.normal(ks[0], (1, 4, 6))
  W2 = jax.random.normal(ks[1], (1, 6, 4))
  k = _unit(jax.random.normal(ks[2], (3, 4)))
  vhat = jax.random.normal(ks[3], (1, 3, 4))
  proj = jax.random.normal(ks[4], (1, 6, 4))
  eta, la, lb = jnp.full((3,), 0.3), jnp.full((3,), -0.2), jnp.full((3,), -0.5)

  def loss(W2, k):
    run = {"W1": W1, "W2": W2, "S1": jnp.zeros_like(W1), "S2": jnp.zeros_like(W2)}
    new = selfmod.group_update(spec, (W1, W2), run, k, vhat, eta, la, lb, "chunked")
    return jnp.sum(new["W2"] * proj)

  g_w, g_k = jax.grad(loss, argnums=(0, 1))(W2, k)
  if meta_grad == "first_order":
    chex.assert_trees_all_close(g_w, proj, atol=1e-6)
    assert float(jnp.abs(g_k).max()) == 0.0
  else:
    assert float(jnp.abs(g_w - proj).max()) > 1e-2 and float(jnp.abs(g_k).max()) > 1e-2


@pytest.mark.parametrize("meta_grad", ["full", "first_order"])
def test_dual_read_chunked_equals_reference_and_honours_first_order(meta_grad):
  """selfmod.dual_read: closed form == token scan (values, grads); first_order stops the keys."""
  from hope_jax.ops import selfmod

  spec = selfmod.InnerSpec(meta_grad=meta_grad, clip=0.0)
  ks = jax.random.split(jax.random.PRNGKey(7), 5)
  W1 = 0.3 * jax.random.normal(ks[0], (1, 4, 6))
  W2 = jax.random.normal(ks[1], (1, 6, 4))
  run = {"W1": W1, "W2": W2, "S1": 0.1 * W1, "S2": 0.1 * W2}
  k = _unit(jax.random.normal(ks[2], (5, 4)))
  vhat = jax.random.normal(ks[3], (1, 5, 4))
  q = _unit(jax.random.normal(ks[4], (5, 4)))
  eta, la, lb = jnp.full((5,), 0.3), jnp.full((5,), -0.2), jnp.full((5,), -0.5)

  def out(W2, k, q, impl):
    fac = selfmod.group_factors(spec, (W1, W2), k, vhat, eta, la, impl)
    return selfmod.dual_read(spec, {**run, "W2": W2}, k, fac, eta, la, lb, q, impl)

  loss = lambda *a: jnp.sum(jnp.sin(out(*a)))
  y_c, y_r = out(W2, k, q, "chunked"), out(W2, k, q, "reference")
  chex.assert_trees_all_close(y_c, y_r, atol=1e-5, rtol=1e-5)
  g_c = jax.grad(loss, argnums=(0, 1, 2))(W2, k, q, "chunked")
  g_r = jax.grad(loss, argnums=(0, 1, 2))(W2, k, q, "reference")
  chex.assert_trees_all_close(g_c, g_r, atol=1e-5, rtol=1e-4)
  # Keys enter only the within-chunk change, which first_order treats as a constant.
  assert (float(jnp.abs(g_c[1]).max()) == 0.0) == (meta_grad == "first_order")


@pytest.mark.parametrize("batch", [1, 2, 7, 8])
def test_broadcast_batch_backward_equals_the_reference(batch):
  """The meta-init's batch broadcast: same values, and its pairwise-summed gradient is the sum."""
  x = jax.random.normal(jax.random.PRNGKey(batch), (3, 4, 5))
  g = jax.random.normal(jax.random.PRNGKey(10 + batch), (batch, 3, 4, 5))
  out_f, vjp_f = jax.vjp(lambda a: broadcast.broadcast_batch(a, batch), x)
  out_r, vjp_r = jax.vjp(lambda a: broadcast.broadcast_batch_reference(a, batch), x)
  chex.assert_trees_all_equal(out_f, out_r)
  chex.assert_trees_all_close(jax.jit(vjp_f)(g), jax.jit(vjp_r)(g), atol=1e-5, rtol=1e-6)
  chex.assert_trees_all_close(broadcast.pairwise_sum(g), np.asarray(g, np.float64).sum(0),
                              atol=1e-5, rtol=1e-6)
