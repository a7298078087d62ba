"""The self-modifying Titans sublayer of HOPE (spec §2) and its Titans-LMM preset (spec §4).

  u -> x~ = SiLU(conv(u W_in)), q = SiLU(conv(u W_q)), beta = sigmoid(u W_b + b_b)
    -> phase A (chunks of C_o): memories P = {k, v, eta, alpha[, q]} generate k, v, eta, alpha
    -> phase B (chunks of C_m): main memory reads o = M_mem(q) and learns (k -> v^)
    -> y = (RMSNorm_head(o) * SiLU(u W_g)) W_o

With `static_projections` (implied by block="titans_lmm") phase A is replaced
by linear maps of x~ (k, v: D x D; eta, alpha: D x H). All inner math is float32
(`hope_jax.ops.selfmod`). `__call__` is the parallel form; `init_state`/`step`
are the recurrent interface shared by every mixer (spec §5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hope_jax.config import AUTO_UNROLL, ModelConfig
from hope_jax.model.layers import DTYPES, Linear, normal
from hope_jax.ops import selfmod
from hope_jax.ops.broadcast import broadcast_batch, to_shape_of
from hope_jax.ops.conv import causal_dwconv
from hope_jax.ops.memory import l2norm, mlp_apply


def proj_memory_names(cfg: ModelConfig) -> tuple[str, ...]:
  """The projection memories P in their stacking order (empty for static projections)."""
  if cfg.uses_static_projections:
    return ()
  names = ("k", "v") + (("q",) if cfg.adaptive_q else ()) + ("eta",)
  return names + (("alpha",) if cfg.use_alpha else ())


def inner_spec(cfg: ModelConfig) -> selfmod.InnerSpec:
  names = proj_memory_names(cfg)
  return selfmod.InnerSpec(
      live=tuple(n for n in names if n not in cfg.frozen_memories),
      frozen=tuple(n for n in names if n in cfg.frozen_memories),
      chunk_other=cfg.chunk_other, chunk_mem=cfg.chunk_mem, dgd_precond=cfg.dgd_precond,
      momentum=cfg.momentum, use_alpha=cfg.use_alpha, eta_max=cfg.eta_max,
      alpha_min=cfg.alpha_min, clip=cfg.inner_grad_clip, memory_target=cfg.memory_target,
      read_mode=cfg.read_mode, meta_grad=cfg.selfmod_meta_grad, impl=cfg.impl, remat=cfg.remat,
      # Unresolved (`train.sharding.resolve_schedule` never saw the config): the loop.
      unroll=1 if cfg.inner_scan_unroll == AUTO_UNROLL else cfg.inner_scan_unroll)


def _plus_bias(z_BLH, b_H):
  return z_BLH + to_shape_of(b_H, z_BLH)


def _param(rngs, std, shape, dtype):
  return nnx.Param(normal(std)(rngs.params(), shape, dtype))


class SelfModTitans(nnx.Module):
  """Self-modifying Titans: `y_BLD = layer(u_BLD)`, u the block's pre-norm output."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, dh, pd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, DTYPES[cfg.param_dtype]
    self.cfg, self.spec = cfg, inner_spec(cfg)
    self.names = proj_memory_names(cfg)
    kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=pd)
    if cfg.memory_input == "proj":
      self.w_in = Linear(d, d, std=cfg.memory_input_std, **kw)
    if not cfg.adaptive_q:
      self.w_q = Linear(d, d, std=0.02, **kw)
    self.w_g = Linear(d, d, std=0.02, **kw)
    self.w_o = Linear(d, d, std=0.02 / math.sqrt(2 * cfg.num_layers), **kw)
    # Conv taps: identity at the last tap plus noise, so the layer starts near "no conv".
    cw = cfg.conv_width
    ident = jnp.zeros((cw, d), pd).at[cw - 1].set(1.0)
    for name in self.conv_streams:
      setattr(self, f"conv_{name}_w", nnx.Param(ident + normal(0.02)(rngs.params(), (cw, d), pd)))
      setattr(self, f"conv_{name}_b", nnx.Param(jnp.zeros((d,), pd)))
    if cfg.momentum:
      self.w_beta = Linear(d, h, std=0.02, **kw)
      self.b_beta = nnx.Param(jnp.full((h,), 2.2, pd))  # beta ~ 0.9 at init.
    if cfg.uses_static_projections:  # Titans-LMM (spec §4).
      self.w_k = Linear(d, d, std=0.02, **kw)
      self.w_v = Linear(d, d, std=0.02, **kw)
      self.w_eta = Linear(d, h, std=0.02, **kw)
      if cfg.use_alpha:
        self.w_alpha = Linear(d, h, std=0.02, **kw)
    else:
      p, ep = len(self.names), cfg.e_proj
      self.proj_w1 = _param(rngs, 0.1 / math.sqrt(ep), (h, p, dh, ep), pd)
      self.proj_w2 = _param(rngs, 1.0 / math.sqrt(dh), (h, p, ep, dh), pd)
      self.r_eta = _param(rngs, 0.02, (h, dh), pd)
      if cfg.use_alpha:
        self.r_alpha = _param(rngs, 0.02, (h, dh), pd)
    self.b_eta = nnx.Param(jnp.full((h,), -2.0, pd))  # eta ~ 0.012 with eta_max = 0.1.
    if cfg.use_alpha:
      self.b_alpha = nnx.Param(jnp.full((h,), 5.0, pd))  # alpha ~ 0.994.
    em = cfg.e_mem
    self.mem_w1 = _param(rngs, 0.1 / math.sqrt(em), (h, 1, dh, em), pd)
    self.mem_w2 = _param(rngs, 1.0 / math.sqrt(dh), (h, 1, em, dh), pd)
    self.out_scale = nnx.Param(jnp.ones((h, dh), pd))  # Per-head RMSNorm scale.

  # ------------------------------------------------------------------ helpers

  @property
  def conv_streams(self) -> tuple[str, ...]:
    if self.cfg.conv_position == "pre_memory":
      return ("x", "q") if not self.cfg.adaptive_q else ("x",)
    return ("k", "v", "q")

  @property
  def align(self) -> int:
    """Chunk grid period shared by both phases."""
    return max(self.cfg.chunk_other, self.cfg.chunk_mem)

  def _heads(self, x_BLD):  # [B, L, D] -> float32 [B, H, L, Dh]
    b, l, _ = x_BLD.shape
    x = x_BLD.astype(jnp.float32).reshape(b, l, self.cfg.num_heads, self.cfg.head_dim)
    return x.transpose(0, 2, 1, 3)

  def _conv(self, name, x_BLD, conv_state):
    w, b = getattr(self, f"conv_{name}_w")[...], getattr(self, f"conv_{name}_b")[...]
    y, conv_state[name] = causal_dwconv(x_BLD, w, b, conv_state[name])
    return y

  def _meminit(self, w1, w2, idx, batch_size):
    w1 = jnp.asarray(w1[...], jnp.float32)[:, idx]
    w2 = jnp.asarray(w2[...], jnp.float32)[:, idx]
    w1, w2 = broadcast_batch(w1, batch_size), broadcast_batch(w2, batch_size)
    group = {"W1_start": w1, "W2_start": w2, "W1_run": w1, "W2_run": w2}
    if self.cfg.momentum:
      group.update(S1_run=jnp.zeros_like(group["W1_run"]), S2_run=jnp.zeros_like(group["W2_run"]))
    return group

  # --------------------------------------------------------- recurrent state

  def init_state(self, batch_size: int, max_len: int):
    """Fresh per-sample state: fast weights at their meta-init, zero conv buffers, pos 0.

    Its size does not depend on `max_len` (kept for the shared mixer interface).
    """
    del max_len
    live = np.array([self.names.index(n) for n in self.spec.live], np.int32)
    proj = ({} if not len(live) else
            self._meminit(self.proj_w1, self.proj_w2, live, batch_size))
    zeros = jnp.zeros((batch_size, self.cfg.conv_width - 1, self.cfg.hidden_size), jnp.float32)
    return {"pos": jnp.zeros((), jnp.int32),
            "conv": {name: zeros for name in self.conv_streams},
            "proj": proj,
            "mem": self._meminit(self.mem_w1, self.mem_w2, np.array([0]), batch_size)}

  # ------------------------------------------------------------------ forward

  def _forward(self, u_BLD, state, mode: str, read: bool = True):
    """The sublayer on L new tokens from `state`; mode "chunked" needs pos on the grid.

    Returns (y_BLD, new_state, generated streams); with `read=False` y is None and phase B
    only learns (`update`).
    """
    cfg, spec = self.cfg, self.spec
    b, l, _ = u_BLD.shape
    conv = dict(state["conv"])
    f32 = jnp.float32
    # 2.1 Input streams (static, outer level).
    x_pre = self.w_in(u_BLD) if cfg.memory_input == "proj" else u_BLD
    if cfg.conv_position == "pre_memory":
      x_pre = self._conv("x", x_pre, conv)
    xt_BLD = jax.nn.silu(x_pre.astype(f32))
    lb_BLH = (jax.nn.log_sigmoid(_plus_bias(self.w_beta(u_BLD).astype(f32), self.b_beta[...]))
              if cfg.momentum else jnp.zeros((b, l, cfg.num_heads), f32))

    # Padding to the chunk grid (parallel form only): padded tokens have eta = 0,
    # alpha = beta = 1, so they write and decay nothing; with momentum W_run still takes
    # W += S once per padded token, so only the outputs, not the final state, are exact.
    pad = (-l) % self.align if mode == "chunked" else 0
    lp = l + pad
    padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    valid_BHL = jnp.broadcast_to((jnp.arange(lp) < l).astype(f32), (b, cfg.num_heads, lp))
    xs_a = {"x": self._heads(padt(xt_BLD)), "lb": padt(lb_BLH).transpose(0, 2, 1),
            "valid": valid_BHL}
    pos = state["pos"]
    bnd = lambda c: (pos + jnp.arange(lp) + 1) % c == 0

    # Phase A: generated k, v, eta, alpha (, q).
    if cfg.uses_static_projections:
      x = padt(xt_BLD)
      gen = {"k": l2norm(self._heads(self.w_k(x))), "v": self._heads(self.w_v(x))}
      eta = cfg.eta_max * jax.nn.sigmoid(_plus_bias(self.w_eta(x).astype(f32), self.b_eta[...]))
      gen["eta"] = eta.transpose(0, 2, 1) * valid_BHL
      if cfg.use_alpha:
        alpha = cfg.alpha_min + (1 - cfg.alpha_min) * jax.nn.sigmoid(
            _plus_bias(self.w_alpha(x).astype(f32), self.b_alpha[...]))
        gen["la"] = jnp.log(alpha).transpose(0, 2, 1) * valid_BHL
      else:
        gen["la"] = jnp.zeros_like(gen["eta"])
      new_proj = state["proj"]
    else:
      params_a = {"r_eta": self.r_eta[...], "b_eta": self.b_eta[...]}
      if cfg.use_alpha:
        params_a.update(r_alpha=self.r_alpha[...], b_alpha=self.b_alpha[...])
      if spec.frozen:
        idx = np.array([self.names.index(n) for n in spec.frozen], np.int32)
        params_a.update(W1_frozen=jnp.asarray(self.proj_w1[...], f32)[:, idx],
                        W2_frozen=jnp.asarray(self.proj_w2[...], f32)[:, idx])
      params_a = jax.tree.map(lambda a: a.astype(f32), params_a)
      with jax.named_scope("phase_a"):
        new_proj, gen = selfmod.run_phase_bh(
            spec, selfmod.phase_a_body, params_a, state["proj"], xs_a, chunk=cfg.chunk_other,
            mode=mode, boundary_L=bnd(cfg.chunk_other))
    k_BHLD, v_BHLD = gen["k"], gen["v"]
    if cfg.conv_position == "post_memory":
      # Conv on the generated streams (choice, see docs/architecture.md). It runs over
      # the padded length: it is causal, so padding never reaches a real token.
      flat = lambda a: a.transpose(0, 2, 1, 3).reshape(b, lp, -1)
      k_BHLD = l2norm(self._heads(self._conv("k", flat(k_BHLD), conv)))
      v_BHLD = self._heads(self._conv("v", flat(v_BHLD), conv))
    if cfg.adaptive_q and cfg.conv_position == "post_memory":
      q_BHLD = l2norm(self._heads(self._conv("q", flat(gen["q"]), conv)))
    elif cfg.adaptive_q:
      q_BHLD = gen["q"]  # Unit length already: phase A normalises its q read (spec §2.3).
    else:
      q_BHLD = self._static_query(u_BLD, conv, padt)

    # Phase B: the main memory (without "q" it only learns; see `update`).
    xs_b = {"k": k_BHLD, "v": v_BHLD, "eta": gen["eta"], "la": gen["la"], "lb": xs_a["lb"]}
    if read:
      xs_b["q"] = q_BHLD
    with jax.named_scope("phase_b"):
      new_mem, out = selfmod.run_phase_bh(
          spec, selfmod.phase_b_body, {}, state["mem"], xs_b, chunk=cfg.chunk_mem, mode=mode,
          boundary_L=bnd(cfg.chunk_mem))
    new_state = {"pos": pos + l, "conv": conv, "proj": new_proj, "mem": new_mem}
    if not read:
      return None, new_state, gen
    return self._output(out["o"][:, :, :l], u_BLD), new_state, gen

  def _static_query(self, u_BLD, conv, padt=lambda a: a):
    """q = l2norm(SiLU(conv(u W_q))) per head (the conv after SiLU when post-memory)."""
    q_pre, f32 = self.w_q(u_BLD), jnp.float32
    if self.cfg.conv_position == "pre_memory":
      return l2norm(self._heads(padt(jax.nn.silu(self._conv("q", q_pre, conv).astype(f32)))))
    return l2norm(self._heads(self._conv("q", padt(jax.nn.silu(q_pre.astype(f32))), conv)))

  def _output(self, o_BHLD, u_BLD):
    """2.8 Output: per-head RMSNorm, SiLU gate, output projection."""
    b, _, l, _ = o_BHLD.shape
    o = o_BHLD * jax.lax.rsqrt(jnp.mean(o_BHLD * o_BHLD, axis=-1, keepdims=True) + 1e-6)
    o = o * to_shape_of(self.out_scale[...][None, :, None, :], o)
    o_BLD = o.transpose(0, 2, 1, 3).reshape(b, l, self.cfg.hidden_size)
    dt = DTYPES[self.cfg.dtype]
    y_BLD = self.w_o(o_BLD.astype(dt) * jax.nn.silu(self.w_g(u_BLD)).astype(dt))
    return y_BLD.astype(u_BLD.dtype)

  def __call__(self, u_BLD):
    """Parallel form over the whole sequence (chunked scans; padded to the chunk grid)."""
    y, _, _ = self._forward(u_BLD, self.init_state(u_BLD.shape[0], u_BLD.shape[1]), "chunked")
    return y

  def step(self, u_BLD, state, aligned: bool = False):
    """Continues from `state` with L new tokens; equals `__call__` on the whole prefix.

    A piece whose length is a multiple of the chunk grid and that starts on the grid
    takes the chunked scans; any other piece goes token by token (spec §5).

    Args:
      u_BLD: the new tokens' inputs.
      state: from `init_state` or a previous `step`.
      aligned: the caller guarantees that `state` sits on the chunk grid (the model-level
        CMS scan does). Skips the `lax.cond` on the traced position, which would otherwise
        compile (and differentiate) the token-by-token path as well.
    """
    if aligned and u_BLD.shape[1] % self.align == 0:
      y, new_state, _ = self._forward(u_BLD, state, "chunked")
      return y, new_state
    if u_BLD.shape[1] % self.align:
      y, new_state, _ = self._forward(u_BLD, state, "token")
      return y, new_state
    run = lambda mode: (lambda st: self._forward(u_BLD, st, mode)[:2])
    return jax.lax.cond(state["pos"] % self.align == 0, run("chunked"), run("token"), state)

  def splits(self, length: int) -> bool:
    """Whether `read` and `update` may stand in for `step` on an aligned piece of `length`.

    True when the piece is one main-memory chunk read at its start with a static q: its
    outputs then depend on the carried state and q only, and everything it learns (phase A,
    phase B's update) reaches later pieces alone. The model's in-context CMS write
    differentiates this piece's loss only, so it can skip the inner loops' backward pass.
    """
    cfg = self.cfg
    return (not cfg.adaptive_q and cfg.read_mode == "chunk_start" and length == cfg.chunk_mem
            and length % self.align == 0)

  def read(self, u_BLD, state):
    """`step(u_BLD, state, aligned=True)[0]` on a piece where `splits` holds: one read of
    the carried main memory per token, nothing learned."""
    mem = state["mem"]
    q_BHLD = self._static_query(u_BLD, dict(state["conv"]))
    read_bh = jax.vmap(jax.vmap(mlp_apply))
    with jax.named_scope("phase_b"):
      o_BHLD = read_bh(mem["W1_run"][:, :, 0], mem["W2_run"][:, :, 0], q_BHLD)
    return self._output(o_BHLD, u_BLD)

  def update(self, u_BLD, state):
    """`step(u_BLD, state, aligned=True)[1]` on a piece where `splits` holds, without reads."""
    return self._forward(u_BLD, state, "chunked", read=False)[1]

  def inspect(self, u_BLD):
    """Per-token eta_BLH, alpha_BLH and the final drift |W_run - W_0| per memory (health)."""
    state0 = self.init_state(u_BLD.shape[0], u_BLD.shape[1])
    _, state, gen = self._forward(u_BLD, state0, "chunked")
    l = u_BLD.shape[1]
    return {"eta_BLH": gen["eta"][:, :, :l].transpose(0, 2, 1),
            "alpha_BLH": jnp.exp(gen["la"][:, :, :l]).transpose(0, 2, 1),
            "drift": self.drift(state, state0)}

  def drift(self, state, state0) -> dict:
    """{"<memory>/<W1|W2>": [B, H]}: |W_run - W_run0| of every fast memory between two states."""
    out = {}
    for group, names in (("proj", self.spec.live), ("mem", ("memory",))):
      for w in ("W1", "W2") if state[group] else ():
        d = state[group][f"{w}_run"] - state0[group][f"{w}_run"]
        norms = jnp.sqrt(jnp.sum(d * d, axis=(-2, -1)))  # [B, H, M]
        out.update({f"{n}/{w}": norms[..., i] for i, n in enumerate(names)})
    return out
