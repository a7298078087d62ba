"""The self-modifying Titans sublayer read literally from hope-spec.md §2, in float64 NumPy.

Token by token, one head at a time, with no closed forms, no scans and nothing shared with
`hope_jax.ops`: every quantity is computed where the spec defines it. Tests compare
`SelfModTitans` against it (tests/test_titans_layer.py), so an error in the model's
equations, rather than in one of its two paths, shows.
"""

import numpy as np


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_prime(x):
  t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _silu(x):
  return x * _sigmoid(x)


def _unit(x):
  return x / np.sqrt(x @ x + 1e-6)  # The model's L2norm keeps an epsilon of 1e-6.


def _apply(w, x):
  """§2.2: M(x) = x + W1 σ(W2 x)."""
  return x + w[0] @ _gelu(w[1] @ x)


def _grads(w, k, target, clip):
  """§2.4: (e, h, δ) at the weights `w`, clipped so that ‖e‖‖h‖ ≤ clip and ‖δ‖ ≤ clip."""
  z = w[1] @ k
  h = _gelu(z)
  e = k + w[0] @ h - target
  delta = (w[0].T @ e) * _gelu_prime(z)
  e = e * min(1.0, clip / (np.linalg.norm(e) * np.linalg.norm(h)))
  delta = delta * min(1.0, clip / np.linalg.norm(delta))
  return e, h, delta


def _step(w, s, e, h, delta, k, eta, alpha, beta, precond):
  """§2.5 and §2.6: S = βS − ηG; W = W P + S, for W1 (key h) and W2 (key k)."""
  s1 = beta * s[0] - eta * np.outer(e, h)
  s2 = beta * s[1] - eta * np.outer(delta, k)
  p1, p2 = alpha * np.eye(len(h)), alpha * np.eye(len(k))
  if precond != "none":
    p2 = p2 - eta * np.outer(k, k)
  if precond == "per_layer":
    h_unit = h / np.linalg.norm(h)
    p1 = p1 - eta * np.outer(h_unit, h_unit)
  return [w[0] @ p1 + s1, w[1] @ p2 + s2], [s1, s2]


def sublayer(m, u_BLD):
  """The sublayer's output for `u_BLD` (the block's pre-norm output) under `m`'s parameters.

  Covers the default sublayer and its switches read_mode, memory_target, dgd_precond,
  momentum, use_alpha and adaptive_q (pre-memory conv, projected memory input).
  """
  cfg = m.cfg
  p = lambda a: np.asarray(a[...], np.float64)
  u = np.asarray(u_BLD, np.float64)
  b_size, length, d = u.shape
  h_count, dh, width = cfg.num_heads, cfg.head_dim, cfg.conv_width

  def conv(x_LD, name):  # §2.1: causal depthwise, width 4, with bias; the last tap is token t.
    w, b = p(getattr(m, f"conv_{name}_w")), p(getattr(m, f"conv_{name}_b"))
    padded = np.concatenate([np.zeros((width - 1, d)), x_LD])
    return b + sum(w[j] * padded[j:j + length] for j in range(width))

  names = list(m.names)
  out = np.zeros((b_size, length, d))
  for b in range(b_size):
    x_tilde = _silu(conv(u[b] @ p(m.w_in.kernel), "x"))  # §2.1
    q_static = None if cfg.adaptive_q else _silu(conv(u[b] @ p(m.w_q.kernel), "q"))
    beta = (_sigmoid(u[b] @ p(m.w_beta.kernel) + p(m.b_beta)) if cfg.momentum
            else np.zeros((length, h_count)))
    gate = _silu(u[b] @ p(m.w_g.kernel))
    o = np.zeros((length, d))
    for hd in range(h_count):
      cols = slice(hd * dh, (hd + 1) * dh)
      # Phase A (§2.3): the projection memories, read and trained at each C_o chunk's start.
      w = {n: [p(m.proj_w1)[hd, i], p(m.proj_w2)[hd, i]] for i, n in enumerate(names)}
      s = {n: [np.zeros_like(a) for a in w[n]] for n in names}
      gen = []
      for t in range(length):
        if t % cfg.chunk_other == 0:
          start = {n: [a.copy() for a in w[n]] for n in names}
        x = x_tilde[t, cols]
        k, v = _unit(_apply(start["k"], x)), _apply(start["v"], x)
        eta = cfg.eta_max * _sigmoid(p(m.r_eta)[hd] @ _apply(start["eta"], x) + p(m.b_eta)[hd])
        alpha = (cfg.alpha_min + (1 - cfg.alpha_min) * _sigmoid(
            p(m.r_alpha)[hd] @ _apply(start["alpha"], x) + p(m.b_alpha)[hd])
                 if cfg.use_alpha else 1.0)
        q = _unit(_apply(start["q"], x)) if cfg.adaptive_q else _unit(q_static[t, cols])
        gen.append((k, v, q, eta, alpha))
        for n in names:  # Every memory's target is its own read of v (v̂, Eq. 83/87).
          e, h, delta = _grads(start[n], k, _apply(start[n], v), cfg.inner_grad_clip)
          w[n], s[n] = _step(w[n], s[n], e, h, delta, k, eta, alpha, beta[t, hd],
                             cfg.dgd_precond)
      # Phase B (§2.7, §2.8): the main memory over C_m chunks; o_t = M̄_mem(q_t), or the
      # running state before token t with read_mode="dual".
      w = [p(m.mem_w1)[hd, 0], p(m.mem_w2)[hd, 0]]
      s = [np.zeros_like(a) for a in w]
      for t, (k, v, q, eta, alpha) in enumerate(gen):
        if t % cfg.chunk_mem == 0:
          start = [a.copy() for a in w]
        o[t, cols] = _apply(w if cfg.read_mode == "dual" else start, q)
        target = _apply(start, v) if cfg.memory_target == "self" else v
        e, h, delta = _grads(start, k, target, cfg.inner_grad_clip)
        w, s = _step(w, s, e, h, delta, k, eta, alpha, beta[t, hd], cfg.dgd_precond)
    # §2.8: per-head RMSNorm with a learned scale, the SiLU gate, W_o.
    o = o.reshape(length, h_count, dh)
    o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * p(m.out_scale)
    out[b] = (o.reshape(length, d) * gate) @ p(m.w_o.kernel)
  return out
