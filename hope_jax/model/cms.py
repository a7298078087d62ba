"""Continuum Memory System: a chain of pre-norm residual SwiGLU levels (spec §3).

  sequential (default):  u <- u + SwiGLU_l(RMSNorm_l(u)) for l = 1..K (cms_order picks the order)
  nested:                same forward; the fast state resets level l at level l+1's boundaries
  independent:           u <- u + sum_l w_l SwiGLU_l(RMSNorm_l(u)),  w_l learnable, init 1/K
  cms_ablate="single_static": u <- u + SwiGLU(RMSNorm(u)) of width sum_l F_l (Table 6 "w/o CMS")
  cms_ablate="static_chain":  the chain above with no in-context writes

Under `cms_signal="lm_grad"` (and `cms_mode="in_context"`) each level's three matrices are
per-sequence fast weights theta_0 + stop_gradient(delta); the deltas are written by the
model-level chunk scan in `lm.py` (`hope_jax.ops.cms.schedule_update`). The RMSNorm scales
stay static outer parameters [choice]. With no fast state the forward is the static one.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.layers import DTYPES, RMSNorm, SwiGLU
from hope_jax.ops import cms as cms_ops


def level_widths(cfg: ModelConfig) -> list[int]:
  """F_l: cfg.cms_width split as equally as possible over the K levels (sum = cms_width)."""
  k = len(cfg.cms_chunks)
  base, extra = divmod(cfg.cms_width, k)
  return [base + (1 if i < extra else 0) for i in range(k)]


def has_fast_weights(cfg: ModelConfig) -> bool:
  """Whether the CMS levels of this config are written in context (spec §3.3)."""
  return (cfg.block in ("hope", "hope_attention") and cfg.cms_signal == "lm_grad"
          and cfg.cms_mode == "in_context" and cfg.cms_ablate == "none")


class CMSLevel(nnx.Module):
  """One level: RMSNorm then SwiGLU (the caller adds the residual)."""

  def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.mlp = SwiGLU(cfg.hidden_size, width, num_layers=cfg.num_layers, rngs=rngs,
                      dtype=DTYPES[cfg.dtype], param_dtype=pd)

  def theta0(self) -> cms_ops.Weights:
    """The meta-init matrices (outer parameters)."""
    return {"gate": self.mlp.gate.kernel[...], "up": self.mlp.up.kernel[...],
            "down": self.mlp.down.kernel[...]}

  def __call__(self, u_BLD, delta: cms_ops.Weights | None = None):
    h_BLD = self.norm(u_BLD)
    if delta is None:
      return self.mlp(h_BLD)
    # Straight-through: the caller passes stop_gradient(delta) for the outer loss, so the
    # outer gradient reaches theta_0 only; the inner vjp differentiates w.r.t. delta itself.
    return cms_ops.swiglu_delta(h_BLD, self.theta0(), delta)


class CMS(nnx.Module):
  """The CMS of one HOPE block: `cms(x_BLD, fast=None) -> x_BLD` (residuals included)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.chunks = tuple(cfg.cms_chunks)
    self.variant = cfg.cms_variant
    self.fast = has_fast_weights(cfg)
    if cfg.cms_ablate == "single_static":
      self.levels = nnx.List([CMSLevel(cfg, cfg.cms_width, rngs=rngs)])
    else:
      self.levels = nnx.List([CMSLevel(cfg, f, rngs=rngs) for f in level_widths(cfg)])
    if self.variant == "independent" and cfg.cms_ablate != "single_static":
      k = len(self.levels)
      self.mix = nnx.Param(jnp.full((k,), 1.0 / k, DTYPES[cfg.param_dtype]))
    order = list(range(len(self.levels)))
    self.order = tuple(order[::-1] if cfg.cms_order == "slow_first" else order)

  def fast_shapes(self) -> list[dict[str, tuple[int, ...]]]:
    """Per level, the shapes of the fast matrices (without the batch axis)."""
    return [{k: tuple(v.shape) for k, v in lvl.theta0().items()} for lvl in self.levels]

  def init_fast_state(self, batch_size: int):
    """Zero per-sequence deltas and accumulators, or None for a static CMS."""
    if not self.fast:
      return None
    return cms_ops.init_fast_state(self.fast_shapes(), batch_size,
                                   nested=self.variant == "nested")

  def __call__(self, x_BLD, fast=None):
    deltas = fast["delta"] if fast is not None else [None] * len(self.levels)
    if self.variant == "independent" and hasattr(self, "mix"):
      mix = self.mix[...].astype(x_BLD.dtype)
      y_BLD = sum(mix[i] * self.levels[i](x_BLD, deltas[i]) for i in self.order)
      return x_BLD + y_BLD
    for i in self.order:
      x_BLD = x_BLD + self.levels[i](x_BLD, deltas[i])
    return x_BLD
