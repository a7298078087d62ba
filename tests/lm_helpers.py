"""Tiny model configs shared by the CMS / LM / decode tests."""

import importlib.util

import pytest

from hope_jax.config import ModelConfig

HAS_TITANS = importlib.util.find_spec("hope_jax.model.titans") is not None
needs_titans = pytest.mark.skipif(
    not HAS_TITANS, reason="hope_jax.model.titans (SelfModTitans, issue 3) is not on this branch")


def tiny(block: str = "hope_attention", **overrides) -> ModelConfig:
  """D=32, H=2, 2 layers, V=32, C_o=C_m=4, CMS chunks (4, 8), float32."""
  base = dict(block=block, vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
              chunk_other=4, chunk_mem=4, cms_chunks=(4, 8), cms_hidden=64, ffn_hidden=64)
  if block == "titans_lmm":
    base.update(static_projections=True, memory_target="v", dgd_precond="none")
  base.update(overrides)
  cfg = ModelConfig(**base)
  cfg.validate()
  return cfg
