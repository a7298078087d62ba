"""The language-model skeleton shared by every block type (spec §4).

  tokens -> embedding -> N x block -> final RMSNorm -> logits (tied embedding)

A block is a pre-norm residual sequence mixer followed by a feed-forward part:
  transformer_pp:  x += Attention(norm x);  x += SwiGLU(norm x)
  titans_lmm:      x += SelfModTitans(norm x) [static projections];  x += SwiGLU(norm x)
  hope:            x += SelfModTitans(norm x);  x = CMS(x)
  hope_attention:  x += Attention(norm x);  x = CMS(x)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.attention import Attention
from hope_jax.model.layers import DTYPES, Linear, RMSNorm, SwiGLU, normal


def _mixer(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.block in ("transformer_pp", "hope_attention"):
    return Attention(cfg, rngs=rngs)
  from hope_jax.model.titans import SelfModTitans  # Self-modifying Titans (spec §2).

  return SelfModTitans(cfg, rngs=rngs)


class Block(nnx.Module):
  """One residual block: sequence mixer, then SwiGLU (or CMS for HOPE blocks)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.norm_mixer = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.mixer = _mixer(cfg, rngs)
    self.uses_cms = cfg.block in ("hope", "hope_attention")
    if self.uses_cms:
      from hope_jax.model.cms import CMS  # Continuum Memory System (spec §3).

      self.ffn = CMS(cfg, rngs=rngs)
    else:
      self.norm_ffn = RMSNorm(cfg.hidden_size, param_dtype=pd)
      self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_width, num_layers=cfg.num_layers, rngs=rngs,
                        dtype=DTYPES[cfg.dtype], param_dtype=pd)

  def __call__(self, x_BLD):
    x_BLD = x_BLD + self.mixer(self.norm_mixer(x_BLD))
    if self.uses_cms:
      return self.ffn(x_BLD)
    return x_BLD + self.ffn(self.norm_ffn(x_BLD))


class LanguageModel(nnx.Module):
  """A HOPE-family causal LM; `model(tokens_BL)` returns float32 logits `[B, L, V]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = DTYPES[cfg.param_dtype]
    self.embed = nnx.Param(normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, param_dtype=pd)
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, std=0.02, rngs=rngs,
                            dtype=DTYPES[cfg.dtype], param_dtype=pd)

  def embed_tokens(self, tokens_BL):
    return jnp.take(self.embed[...], tokens_BL, axis=0).astype(DTYPES[self.cfg.dtype])

  def logits(self, h_BLD):
    h_BLD = self.final_norm(h_BLD)
    if self.cfg.tie_embeddings:
      return jnp.einsum("bld,vd->blv", h_BLD, self.embed[...].astype(h_BLD.dtype),
                        preferred_element_type=jnp.float32)
    return self.lm_head(h_BLD).astype(jnp.float32)

  def __call__(self, tokens_BL):
    x_BLD = self.embed_tokens(tokens_BL)
    for block in self.blocks:
      x_BLD = block(x_BLD)
    return self.logits(x_BLD)
